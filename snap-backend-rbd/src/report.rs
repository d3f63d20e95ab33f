//! rbd's JSON output (`--format json`), parsed into typed values.
//!
//! Ceph 16 prints: `rbd info` an object (`name`, `id`, `size`, `features`, `parent`: {`pool`,
//! `pool_namespace`, `image`, `snapshot`...} on a clone); `rbd snap ls` an array of {`id`,
//! `name`, `size`, `protected`: "true"|"false", `timestamp`: ctime text}; `rbd status`
//! {`watchers`: [{`address`, `client`, `cookie`}]}; `rbd children` an array of {`pool`,
//! `pool_namespace`, `image`, `trash`...}.

use serde_json::Value;
use snap_core::{Error, ErrorKind, Result};

/// The parent of a clone: the image and snapshot it reads through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentRef {
    /// Pool of the parent image.
    pub pool: String,
    /// Its namespace (`None` for the default one).
    pub namespace: Option<String>,
    /// The parent image.
    pub image: String,
    /// The parent snapshot the clone hangs off.
    pub snapshot: String,
}

/// `rbd info` of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Image name.
    pub name: String,
    /// Image id.
    pub id: String,
    /// Size in bytes.
    pub size: u64,
    /// Feature names (`layering`, `exclusive-lock`...).
    pub features: Vec<String>,
    /// The clone parent, if this image is a clone.
    pub parent: Option<ParentRef>,
    /// Number of snapshots, when reported.
    pub snapshot_count: Option<u64>,
}

/// One snapshot of `rbd snap ls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapRow {
    /// The snapshot id (unique in the image).
    pub id: u64,
    /// The snapshot's name.
    pub name: String,
    /// The image size when it was taken.
    pub size: u64,
    /// Protected (clones may hang off it; cannot be removed).
    pub protected: bool,
    /// Creation time, seconds since the Unix epoch, when printed.
    pub time: Option<i64>,
}

/// One client that has the image open (`rbd status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watcher {
    /// The client's address (`127.0.0.1:0/123456`).
    pub address: String,
    /// The client id (`4123`).
    pub client: String,
}

/// One clone of a snapshot (`rbd children`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Child {
    /// Its pool.
    pub pool: String,
    /// Its namespace (`None` for the default one).
    pub namespace: Option<String>,
    /// Its image name.
    pub image: String,
    /// Whether it is in the trash.
    pub trash: bool,
}

impl Child {
    /// `POOL[/NS]/IMAGE`.
    pub fn arg(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{}/{ns}/{}", self.pool, self.image),
            None => format!("{}/{}", self.pool, self.image),
        }
    }
}

fn report_error(what: &str, message: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Command,
        format!("rbd {what} printed unexpected JSON: {message}"),
    )
}

fn text<'a>(what: &str, v: &'a Value, field: &str) -> Result<&'a str> {
    match v.get(field) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(report_error(what, format!("{field} is not a string"))),
        None => Err(report_error(what, format!("{field} is missing"))),
    }
}

fn number(what: &str, v: &Value, field: &str) -> Result<u64> {
    match v.get(field) {
        Some(n) => n
            .as_u64()
            .ok_or_else(|| report_error(what, format!("{field} is not a byte count or id"))),
        None => Err(report_error(what, format!("{field} is missing"))),
    }
}

fn namespace(v: &Value) -> Option<String> {
    v.get("pool_namespace")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// Parses `rbd info --format json`.
pub fn parse_info(v: &Value) -> Result<ImageInfo> {
    const W: &str = "info";
    if !v.is_object() {
        return Err(report_error(W, "not an object"));
    }
    let parent = match v.get("parent") {
        None | Some(Value::Null) => None,
        Some(p) => Some(ParentRef {
            pool: text(W, p, "pool")?.to_string(),
            namespace: namespace(p),
            image: text(W, p, "image")?.to_string(),
            snapshot: text(W, p, "snapshot")?.to_string(),
        }),
    };
    Ok(ImageInfo {
        name: text(W, v, "name")?.to_string(),
        id: v
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        size: number(W, v, "size")?,
        features: v
            .get("features")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        parent,
        snapshot_count: v.get("snapshot_count").and_then(Value::as_u64),
    })
}

/// Parses `rbd snap ls --format json`.
pub fn parse_snaps(v: &Value) -> Result<Vec<SnapRow>> {
    const W: &str = "snap ls";
    let rows = v
        .as_array()
        .ok_or_else(|| report_error(W, "not an array"))?;
    rows.iter()
        .enumerate()
        .map(|(i, row)| {
            let protected = match row.get("protected") {
                Some(Value::String(s)) => s == "true",
                Some(Value::Bool(b)) => *b,
                _ => false,
            };
            Ok(SnapRow {
                id: number(W, row, "id")?,
                name: text(W, row, "name")?.to_string(),
                size: number(W, row, "size")?,
                protected,
                time: row
                    .get("timestamp")
                    .and_then(Value::as_str)
                    .and_then(parse_ctime),
            })
            .map_err(|e: Error| e.context(format!("snapshot {}", i + 1)))
        })
        .collect()
}

/// Parses `rbd status --format json`.
pub fn parse_watchers(v: &Value) -> Result<Vec<Watcher>> {
    const W: &str = "status";
    let list = v
        .get("watchers")
        .and_then(Value::as_array)
        .ok_or_else(|| report_error(W, "no watchers array"))?;
    Ok(list
        .iter()
        .map(|w| Watcher {
            address: w
                .get("address")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string(),
            client: match w.get("client") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                _ => "?".to_string(),
            },
        })
        .collect())
}

/// Parses `rbd children --format json`.
pub fn parse_children(v: &Value) -> Result<Vec<Child>> {
    const W: &str = "children";
    let list = v
        .as_array()
        .ok_or_else(|| report_error(W, "not an array"))?;
    list.iter()
        .map(|c| {
            Ok(Child {
                pool: text(W, c, "pool")?.to_string(),
                namespace: namespace(c),
                image: text(W, c, "image")?.to_string(),
                trash: c.get("trash").and_then(Value::as_bool).unwrap_or(false),
            })
        })
        .collect()
}

/// Parses `ctime` text as rbd prints it (`Thu Nov 26 01:19:55 2026`, `Thu Nov  6 ...`), taken
/// as UTC (snapctl runs rbd with `TZ=UTC`); seconds since the Unix epoch.
pub fn parse_ctime(text: &str) -> Option<i64> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let [_, month, day, clock, year] = words.as_slice() else {
        return None;
    };
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| m == month)?;
    let month = time::Month::try_from(u8::try_from(month + 1).ok()?).ok()?;
    let mut hms = clock.split(':').map(|p| p.parse::<u8>().ok());
    let (h, m, s) = (hms.next()??, hms.next()??, hms.next()??);
    let date = time::Date::from_calendar_date(year.parse().ok()?, month, day.parse().ok()?).ok()?;
    let t = time::Time::from_hms(h, m, s).ok()?;
    Some(
        time::PrimitiveDateTime::new(date, t)
            .assume_utc()
            .unix_timestamp(),
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Captured from Ceph 16.2.15 (`rbd info --format json rbd/c1` of a clone).
    pub(crate) const CLONE_INFO: &str = r#"{"name":"c1","id":"101d23a9d147","size":67108864,"objects":16,"order":22,"object_size":4194304,"snapshot_count":0,"block_name_prefix":"rbd_data.101d23a9d147","format":2,"features":["layering","exclusive-lock","object-map","fast-diff","deep-flatten"],"op_features":[],"flags":[],"create_timestamp":"Thu Nov 26 01:19:55 2026","access_timestamp":"Thu Nov 26 01:19:55 2026","modify_timestamp":"Thu Nov 26 01:19:55 2026","parent":{"pool":"rbd","pool_namespace":"","image":"a","id":"100f26f4793","snapshot":"s1","trash":false,"overlap":67108864}}"#;
    pub(crate) const BASE_INFO: &str = r#"{"name":"a","id":"100f26f4793","size":67108864,"objects":16,"order":22,"object_size":4194304,"snapshot_count":1,"block_name_prefix":"rbd_data.100f26f4793","format":2,"features":["layering","exclusive-lock","object-map","fast-diff","deep-flatten"],"op_features":[],"flags":[],"create_timestamp":"Thu Nov 26 01:19:50 2026","access_timestamp":"Thu Nov 26 01:19:50 2026","modify_timestamp":"Thu Nov 26 01:19:50 2026"}"#;
    pub(crate) const SNAPS: &str = r#"[{"id":6,"name":"s1","size":67108864,"protected":"true","timestamp":"Thu Nov 26 01:19:55 2026"},{"id":9,"name":"s2","size":33554432,"protected":"false","timestamp":"Fri Nov  6 01:02:03 2026"}]"#;
    pub(crate) const STATUS: &str =
        r#"{"watchers":[{"address":"127.0.0.1:0/3218456785","client":4167,"cookie":140243785}]}"#;
    pub(crate) const CHILDREN: &str =
        r#"[{"pool":"rbd","pool_namespace":"","image":"c1","id":"101d23a9d147","trash":false}]"#;

    fn json(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn captured_reports() {
        let c = parse_info(&json(CLONE_INFO)).unwrap();
        assert_eq!(c.name, "c1");
        assert_eq!(c.size, 64 << 20);
        assert!(c.features.iter().any(|f| f == "layering"));
        let p = c.parent.unwrap();
        assert_eq!((p.pool.as_str(), p.image.as_str()), ("rbd", "a"));
        assert_eq!(p.snapshot, "s1");
        assert_eq!(p.namespace, None);
        assert_eq!(parse_info(&json(BASE_INFO)).unwrap().parent, None);
        let s = parse_snaps(&json(SNAPS)).unwrap();
        assert_eq!(s.len(), 2);
        assert!(s[0].protected && !s[1].protected);
        assert_eq!(s[0].id, 6);
        assert_eq!(s[0].time, Some(1_795_655_995));
        assert_eq!(s[1].time, Some(1_793_926_923));
        let w = parse_watchers(&json(STATUS)).unwrap();
        assert_eq!(w[0].client, "4167");
        assert!(
            parse_watchers(&json(r#"{"watchers":[]}"#))
                .unwrap()
                .is_empty()
        );
        let ch = parse_children(&json(CHILDREN)).unwrap();
        assert_eq!(ch[0].arg(), "rbd/c1");
    }

    #[test]
    fn bad_reports_are_errors() {
        assert!(parse_info(&json("[]")).is_err());
        assert!(parse_info(&json(r#"{"name":"a","size":"x"}"#)).is_err());
        let e = parse_snaps(&json(r#"[{"id":1,"size":2}]"#)).unwrap_err();
        assert!(e.message().contains("name is missing"), "{e}");
        assert!(parse_watchers(&json("{}")).is_err());
        assert!(parse_children(&json(r#"[{"pool":1}]"#)).is_err());
        assert_eq!(parse_ctime("yesterday"), None);
        assert_eq!(parse_ctime("Thu Xyz 26 01:19:55 2026"), None);
        assert_eq!(parse_ctime("Thu Nov 31 01:19:55 2026"), None);
    }
}
