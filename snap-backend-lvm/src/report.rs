//! `lvs --reportformat json --units b --nosuffix` output, parsed into typed rows.
//!
//! lvm2 (2.03.16) prints `{"report":[{"lv":[{FIELD: VALUE, ...}, ...]}]}` with every value a
//! string: sizes in bytes without suffix, percentages like `"12.50"`, empty strings for "none",
//! and `"unknown"` for state it could not ask the kernel about.

use serde_json::Value;
use snap_core::{Error, ErrorKind, Result};

/// The `-o` fields [`LvRow`] is built from.
pub const LV_FIELDS: &str = "lv_name,vg_name,lv_uuid,lv_attr,lv_size,origin,snap_percent,\
data_percent,pool_lv,lv_time,segtype,lv_role,lv_skip_activation,lv_snapshot_invalid,lv_merging,\
lv_device_open";

/// One logical volume as `lvs` reports it, with numbers parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct LvRow {
    /// LV name (hidden LVs, listed with `-a`, are in brackets: `[pool_tdata]`).
    pub name: String,
    /// Volume group name.
    pub vg: String,
    /// LV UUID.
    pub uuid: String,
    /// The 10-character attribute string (`owi-a-s---`).
    pub attr: String,
    /// Size in bytes (for a classic snapshot: its COW store).
    pub size: u64,
    /// The origin LV's name for a snapshot; `None` otherwise.
    pub origin: Option<String>,
    /// Classic snapshot fill in percent, when lvm2 could read it (needs the kernel).
    pub snap_percent: Option<f64>,
    /// Thin volume / pool data fill in percent, when lvm2 could read it.
    pub data_percent: Option<f64>,
    /// The thin pool of a thin LV.
    pub pool_lv: Option<String>,
    /// Creation time, seconds since the Unix epoch, when recorded.
    pub time: Option<i64>,
    /// Segment type (`linear`, `striped`, `thin`, `thin-pool`, ...).
    pub segtype: String,
    /// lvm2's roles (`public`, `origin`, `snapshot`, `thicksnapshot`, `thinsnapshot`, ...).
    pub roles: Vec<String>,
    /// Whether the LV is skipped on normal activation (thin snapshots by default).
    pub skip_activation: bool,
    /// `Some(true)` when a classic snapshot is invalid (it filled up); `None` when unknown.
    pub snapshot_invalid: Option<bool>,
    /// Whether a merge into the origin is in progress or pending.
    pub merging: bool,
    /// Whether the device is open; `None` when lvm2 could not tell.
    pub device_open: Option<bool>,
}

impl LvRow {
    /// Whether lvm2 gives the LV role `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    /// A thin LV (not the pool).
    pub fn is_thin(&self) -> bool {
        self.segtype == "thin"
    }

    /// A classic (COW) snapshot: `s`/`S` volume type in the attributes, or the thicksnapshot role.
    pub fn is_classic_snapshot(&self) -> bool {
        matches!(self.attr.chars().next(), Some('s' | 'S')) || self.has_role("thicksnapshot")
    }

    /// A thin snapshot: a thin LV with an origin.
    pub fn is_thin_snapshot(&self) -> bool {
        self.is_thin() && self.origin.is_some()
    }
}

fn report_error(message: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Command,
        format!("lvs printed an unexpected report: {message}"),
    )
}

/// Parses `lvs --reportformat json --units b --nosuffix -o` [`LV_FIELDS`] output into rows.
/// Rows of every `report` entry are returned in order; a missing required field or a value that
/// is not a number where one is expected is an [`ErrorKind::Command`] error naming it.
pub fn parse_lvs(json: &str) -> Result<Vec<LvRow>> {
    let value: Value =
        serde_json::from_str(json).map_err(|e| report_error(format!("not JSON ({e})")))?;
    let reports = value
        .get("report")
        .and_then(Value::as_array)
        .ok_or_else(|| report_error("no \"report\" array"))?;
    let mut rows = Vec::new();
    for report in reports {
        let Some(lvs) = report.get("lv") else {
            continue;
        };
        let lvs = lvs
            .as_array()
            .ok_or_else(|| report_error("\"lv\" is not an array"))?;
        for (index, lv) in lvs.iter().enumerate() {
            rows.push(parse_row(lv).map_err(|e| e.context(format!("row {}", index + 1)))?);
        }
    }
    Ok(rows)
}

fn parse_row(lv: &Value) -> Result<LvRow> {
    let obj = lv
        .as_object()
        .ok_or_else(|| report_error("an LV entry is not an object"))?;
    let text = |field: &str| -> Result<&str> {
        match obj.get(field) {
            Some(Value::String(s)) => Ok(s.as_str()),
            Some(Value::Number(_)) | Some(Value::Bool(_)) | Some(Value::Null) => Err(report_error(
                format!("field {field} is not a string (lvm2 prints every value as one)"),
            )),
            Some(_) => Err(report_error(format!("field {field} is not a string"))),
            None => Err(report_error(format!("field {field} is missing"))),
        }
    };
    // Optional fields: absent or empty means none.
    let optional = |field: &str| -> Result<Option<&str>> {
        match obj.get(field) {
            None => Ok(None),
            Some(_) => text(field).map(|s| (!s.is_empty()).then_some(s)),
        }
    };
    let percent = |field: &str| -> Result<Option<f64>> {
        match optional(field)? {
            None | Some("unknown") => Ok(None),
            Some(s) => s
                .parse::<f64>()
                .ok()
                .filter(|p| p.is_finite())
                .map(Some)
                .ok_or_else(|| report_error(format!("field {field} is {s:?}, not a percentage"))),
        }
    };
    let tri = |field: &str, yes: &str| -> Result<Option<bool>> {
        Ok(match optional(field)? {
            None => Some(false),
            Some("unknown") => None,
            Some(s) => Some(s == yes),
        })
    };
    let size_text = text("lv_size")?;
    let size = size_text.parse::<u64>().map_err(|_| {
        report_error(format!(
            "field lv_size is {size_text:?}, not a byte count (run lvs with --units b --nosuffix)"
        ))
    })?;
    let time = match optional("lv_time")? {
        None => None,
        Some(s) => Some(parse_lv_time(s)?),
    };
    Ok(LvRow {
        name: text("lv_name")?.to_string(),
        vg: text("vg_name")?.to_string(),
        uuid: text("lv_uuid")?.to_string(),
        attr: text("lv_attr")?.to_string(),
        size,
        origin: optional("origin")?.map(str::to_string),
        snap_percent: percent("snap_percent")?,
        data_percent: percent("data_percent")?,
        pool_lv: optional("pool_lv")?.map(str::to_string),
        time,
        segtype: text("segtype")?.to_string(),
        roles: optional("lv_role")?
            .map(|r| r.split(',').map(str::to_string).collect())
            .unwrap_or_default(),
        skip_activation: optional("lv_skip_activation")?.is_some(),
        snapshot_invalid: tri("lv_snapshot_invalid", "snapshot invalid")?,
        merging: optional("lv_merging")?.is_some_and(|s| s != "unknown"),
        device_open: tri("lv_device_open", "open")?,
    })
}

/// Parses lvm2's `lv_time` (`2023-11-14 22:13:20 +0000`) into seconds since the Unix epoch.
pub fn parse_lv_time(text: &str) -> Result<i64> {
    let format = time::format_description::parse(
        "[year]-[month]-[day] [hour]:[minute]:[second] [offset_hour sign:mandatory][offset_minute]",
    )
    .map_err(|e| report_error(format!("time format: {e}")))?;
    time::OffsetDateTime::parse(text, &format)
        .map(|t| t.unix_timestamp())
        .map_err(|e| report_error(format!("field lv_time is {text:?}, not a time ({e})")))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Captured from lvm2 2.03.16 (`lvs --driverloaded n --reportformat json --units b --nosuffix
    /// -o LV_FIELDS VG`): an origin with a classic snapshot.
    pub(crate) const CLASSIC: &str = r#"  {
      "report": [
          {
              "lv": [
                  {"lv_name":"o", "vg_name":"vgt14767", "lv_uuid":"z3Tfin-L3Xa-KQki-GRos-VX64-dBR0-iJIZTN", "lv_attr":"owi-XXs---", "lv_size":"16777216", "origin":"", "snap_percent":"", "data_percent":"", "pool_lv":"", "lv_time":"2026-11-25 23:53:36 +0000", "segtype":"linear", "lv_role":"public,origin,thickorigin", "lv_skip_activation":"", "lv_snapshot_invalid":"unknown", "lv_merging":"", "lv_device_open":"unknown"},
                  {"lv_name":"s", "vg_name":"vgt14767", "lv_uuid":"07RXcb-prgW-N1FX-DCLn-dyQP-Vm9N-9tqDa6", "lv_attr":"swi-XXs---", "lv_size":"8388608", "origin":"o", "snap_percent":"", "data_percent":"", "pool_lv":"", "lv_time":"2026-11-25 23:53:36 +0000", "segtype":"linear", "lv_role":"public,snapshot,thicksnapshot", "lv_skip_activation":"", "lv_snapshot_invalid":"unknown", "lv_merging":"", "lv_device_open":"unknown"}
              ]
          }
      ]
  }
"#;

    /// Captured from lvm2 2.03.16 with `-a` (`vg_name` moved last, the fields asked in another order): a thin pool, its hidden data and metadata LVs, a thin
    /// origin and a thin snapshot (activation skipped), restored with `vgcfgrestore --force`.
    pub(crate) const THIN: &str = r#"  {
      "report": [
          {
              "lv": [
                  {"lv_name":"pool", "lv_uuid":"aaaaaa-aaaa-aaaa-aaaa-aaaa-aaaa-aaaaa1", "lv_attr":"twi-XXtz--", "lv_size":"33554432", "origin":"", "snap_percent":"", "data_percent":"", "pool_lv":"", "lv_time":"2023-11-14 22:13:20 +0000", "segtype":"thin-pool", "lv_role":"private", "origin_size":"", "lv_skip_activation":"", "vg_name":"vgthin"},
                  {"lv_name":"[pool_tdata]", "lv_uuid":"aaaaaa-aaaa-aaaa-aaaa-aaaa-aaaa-aaaaa5", "lv_attr":"Twi-XX----", "lv_size":"33554432", "origin":"", "snap_percent":"", "data_percent":"", "pool_lv":"", "lv_time":"2023-11-14 22:13:20 +0000", "segtype":"linear", "lv_role":"private,thin,pool,data", "origin_size":"", "lv_skip_activation":"", "vg_name":"vgthin"},
                  {"lv_name":"[pool_tmeta]", "lv_uuid":"aaaaaa-aaaa-aaaa-aaaa-aaaa-aaaa-aaaaa4", "lv_attr":"ewi-XX----", "lv_size":"4194304", "origin":"", "snap_percent":"", "data_percent":"", "pool_lv":"", "lv_time":"2023-11-14 22:13:20 +0000", "segtype":"linear", "lv_role":"private,thin,pool,metadata", "origin_size":"", "lv_skip_activation":"", "vg_name":"vgthin"},
                  {"lv_name":"t", "lv_uuid":"aaaaaa-aaaa-aaaa-aaaa-aaaa-aaaa-aaaaa2", "lv_attr":"Vwi-XXtz--", "lv_size":"16777216", "origin":"", "snap_percent":"", "data_percent":"", "pool_lv":"pool", "lv_time":"2023-11-14 22:13:21 +0000", "segtype":"thin", "lv_role":"public,origin,thinorigin", "origin_size":"", "lv_skip_activation":"", "vg_name":"vgthin"},
                  {"lv_name":"ts", "lv_uuid":"aaaaaa-aaaa-aaaa-aaaa-aaaa-aaaa-aaaaa3", "lv_attr":"Vwi-XXtz-k", "lv_size":"16777216", "origin":"t", "snap_percent":"", "data_percent":"", "pool_lv":"pool", "lv_time":"2023-11-14 22:13:22 +0000", "segtype":"thin", "lv_role":"public,snapshot,thinsnapshot", "origin_size":"", "lv_skip_activation":"skip activation", "vg_name":"vgthin"}
              ]
          }
      ]
  }
"#;

    #[test]
    fn classic_rows() {
        let rows = parse_lvs(CLASSIC).unwrap();
        assert_eq!(rows.len(), 2);
        let (o, s) = (&rows[0], &rows[1]);
        assert_eq!(o.name, "o");
        assert_eq!(o.size, 16 << 20);
        assert_eq!(o.origin, None);
        assert!(o.has_role("origin"));
        assert!(!o.is_classic_snapshot());
        assert_eq!(o.device_open, None);
        assert_eq!(o.snapshot_invalid, None);
        assert_eq!(s.origin.as_deref(), Some("o"));
        assert!(s.is_classic_snapshot());
        assert!(!s.is_thin_snapshot());
        assert_eq!(s.size, 8 << 20);
        assert_eq!(s.snap_percent, None);
        assert_eq!(s.time, Some(1_795_650_816));
        assert!(!s.merging);
        assert_eq!(s.uuid, "07RXcb-prgW-N1FX-DCLn-dyQP-Vm9N-9tqDa6");
    }

    #[test]
    fn thin_rows() {
        let rows = parse_lvs(THIN).unwrap();
        assert_eq!(rows.len(), 5);
        let ts = rows.iter().find(|r| r.name == "ts").unwrap();
        assert!(ts.is_thin_snapshot());
        assert!(!ts.is_classic_snapshot());
        assert!(ts.skip_activation);
        assert_eq!(ts.pool_lv.as_deref(), Some("pool"));
        assert_eq!(ts.time, Some(1_700_000_002));
        assert_eq!(ts.snapshot_invalid, Some(false));
        let t = rows.iter().find(|r| r.name == "t").unwrap();
        assert!(t.is_thin() && !t.is_thin_snapshot());
        assert!(!t.skip_activation);
    }

    #[test]
    fn percentages_and_states() {
        let json = r#"{"report":[{"lv":[{"lv_name":"s","vg_name":"v","lv_uuid":"u","lv_attr":"swi-aos---",
            "lv_size":"8388608","origin":"o","snap_percent":"93.75","data_percent":"93.75","pool_lv":"",
            "lv_time":"2024-02-29 12:00:00 +0100","segtype":"linear","lv_role":"public,snapshot,thicksnapshot",
            "lv_skip_activation":"","lv_snapshot_invalid":"","lv_merging":"merging","lv_device_open":"open"}]}]}"#;
        let row = &parse_lvs(json).unwrap()[0];
        assert_eq!(row.snap_percent, Some(93.75));
        assert_eq!(row.time, Some(1_709_204_400));
        assert!(row.merging);
        assert_eq!(row.device_open, Some(true));
        assert_eq!(row.snapshot_invalid, Some(false));
    }

    #[test]
    fn empty_and_log_only_reports() {
        let empty = "  {\n      \"report\": [\n          {\n              \"lv\": [\n              ]\n          }\n      ]\n  }\n";
        assert!(parse_lvs(empty).unwrap().is_empty());
        assert!(parse_lvs(r#"{"report":[{}],"log":[]}"#).unwrap().is_empty());
    }

    #[test]
    fn errors_name_the_problem() {
        let e = parse_lvs("  {\n  }\n").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Command);
        assert!(e.message().contains("no \"report\""), "{e}");
        assert!(parse_lvs("not json").is_err());
        let bad_size = CLASSIC.replacen("\"16777216\"", "\"16.00m\"", 1);
        let e = parse_lvs(&bad_size).unwrap_err();
        assert!(e.message().contains("lv_size is \"16.00m\""), "{e}");
        assert!(e.message().contains("row 1"), "{e}");
        let bad_pct = CLASSIC.replacen("\"snap_percent\":\"\"", "\"snap_percent\":\"x\"", 1);
        assert!(parse_lvs(&bad_pct).is_err());
        let number = CLASSIC.replacen("\"16777216\"", "16777216", 1);
        assert!(
            parse_lvs(&number)
                .unwrap_err()
                .message()
                .contains("not a string")
        );
        let missing = CLASSIC.replacen("\"lv_uuid\":", "\"lv_uuidx\":", 1);
        assert!(
            parse_lvs(&missing)
                .unwrap_err()
                .message()
                .contains("lv_uuid is missing")
        );
        assert!(parse_lv_time("yesterday").is_err());
    }
}
