//! The snapshot operations on one origin LV, planned from an `lvs` report so every check runs
//! before lvm2 changes anything, then carried out with one lvm2 command.
//!
//! - list: the snapshot LVs whose origin is the disk, with size, type and fill.
//! - create: `lvcreate -s` — a thin snapshot (no size; lvm2 sets its activation-skip flag) when
//!   the origin is a thin LV, else a classic COW snapshot of the given size or
//!   [`DEFAULT_COW_PERCENT`] of the origin. A snapshot of a classic snapshot is refused.
//! - revert: `lvconvert --merge`; when the origin is open lvm2 defers the merge to the origin's
//!   next activation ([`RevertOutcome::Deferred`]).
//! - delete: `lvremove` of a snapshot of the disk (never of another LV).
//!
//! Blocking versions are here; [`LvmBackend`](crate::LvmBackend) has the async ones.

use serde::Serialize;
use snap_core::{DiskFormat, DiskListing, Error, ErrorKind, Result, SnapshotInfo};

use crate::command::{Lvm, LvmOutput, kernel_has_device_mapper};
use crate::name::{LvRef, validate_lv_name};
use crate::report::LvRow;

/// Default size of a classic snapshot's COW store, in percent of the origin's size (lvm2's
/// `-l 20%ORIGIN`). Enough for a snapshot kept while a fifth of the origin is rewritten.
pub const DEFAULT_COW_PERCENT: u32 = 20;

/// Fill (percent) from which a classic snapshot gets a warning: it becomes invalid when full.
pub const NEAR_FULL_PERCENT: f64 = 80.0;

/// Which kind of LVM snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotKind {
    /// A classic snapshot: a COW store of fixed size, invalid once full.
    Classic,
    /// A thin snapshot in the origin's thin pool.
    Thin,
}

impl SnapshotKind {
    /// `"classic"` or `"thin"`.
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotKind::Classic => "classic",
            SnapshotKind::Thin => "thin",
        }
    }
}

/// The size of a new classic snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SnapshotSize {
    /// [`DEFAULT_COW_PERCENT`] of the origin.
    #[default]
    Default,
    /// This many bytes (lvm2 rounds up to whole extents).
    Bytes(u64),
    /// This percentage of the origin (1 to 100).
    PercentOfOrigin(u32),
}

/// One snapshot LV of a disk, as `disk list` prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LvmSnapshot {
    /// LV name (also the snapshot's name).
    pub name: String,
    /// LV UUID.
    pub uuid: String,
    /// Classic or thin.
    pub kind: SnapshotKind,
    /// Classic: the COW store's size; thin: the virtual size. Bytes.
    pub size: u64,
    /// Fill in percent (classic: `snap_percent`, thin: `data_percent`), when lvm2 could read it
    /// (it needs the LV active and the kernel's device-mapper).
    pub fill_percent: Option<f64>,
    /// Creation time, seconds since the Unix epoch, when recorded.
    pub time: Option<i64>,
    /// `Some(true)` when a classic snapshot is invalid (it filled up); `None` when unknown.
    pub invalid: Option<bool>,
    /// A merge into the origin is pending or running.
    pub merging: bool,
    /// Skipped on normal activation (thin snapshots by default): activate with `-K`.
    pub skip_activation: bool,
}

/// The richer `disk list` of an LVM disk: the origin and its snapshots with size, type and fill.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LvmListing {
    /// `/dev/VG/LV`.
    pub image: String,
    /// The origin's size in bytes.
    pub size: u64,
    /// Whether the origin is a thin LV (its snapshots are thin).
    pub thin: bool,
    /// The thin pool, for a thin origin.
    pub pool: Option<String>,
    /// The snapshots, in lvm2's order (by name).
    pub snapshots: Vec<LvmSnapshot>,
    /// Warnings to show: classic snapshots near full or invalid, merges pending.
    pub warnings: Vec<String>,
}

impl LvmListing {
    /// The listing in the shared model (`disk list --json`): format lvm, snapshot id and name the
    /// LV name, no VM state, the date from `lv_time` (0 when unknown), no chain.
    pub fn to_disk_listing(&self) -> DiskListing {
        DiskListing {
            image: self.image.clone().into(),
            format: DiskFormat::Lvm,
            virtual_size: self.size,
            snapshots: self
                .snapshots
                .iter()
                .map(|s| SnapshotInfo {
                    id: s.name.clone(),
                    name: s.name.clone(),
                    vm_state_size: 0,
                    date_sec: s.time.and_then(|t| u64::try_from(t).ok()).unwrap_or(0),
                    date_nsec: 0,
                    vm_clock_ns: 0,
                    disk_size: None,
                })
                .collect(),
            chain: Vec::new(),
        }
    }

    /// The snapshot of this name.
    pub fn snapshot(&self, name: &str) -> Option<&LvmSnapshot> {
        self.snapshots.iter().find(|s| s.name == name)
    }
}

/// What `create` made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CreateInfo {
    /// `VG/NAME` of the new snapshot LV.
    pub lv: String,
    /// Classic or thin.
    pub kind: SnapshotKind,
    /// The size asked for a classic snapshot (`None`: thin, or a percentage of the origin).
    pub size: Option<u64>,
    /// lvm2 sets the activation-skip flag on thin snapshots: they stay inactive on normal
    /// activation (`lvchange -ay -K VG/NAME` activates one).
    pub skip_activation: bool,
    /// lvm2's messages.
    pub messages: Vec<String>,
}

/// What `revert` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum RevertOutcome {
    /// The snapshot was merged into the origin and is gone.
    Merged {
        /// lvm2's messages.
        messages: Vec<String>,
    },
    /// The origin is open (or inactive): lvm2 merges at the origin's next activation; until then
    /// the origin keeps its current data and the snapshot shows as merging.
    Deferred {
        /// lvm2's messages, which say when the merge will happen.
        messages: Vec<String>,
    },
}

impl RevertOutcome {
    /// Builds the outcome from `lvconvert --merge`'s messages.
    pub fn from_output(output: &LvmOutput) -> Self {
        let messages = output.messages();
        let deferred = messages.iter().any(|m| {
            m.contains("will occur on next activation")
                || m.contains("Delaying merge")
                || m.contains("next activation")
        });
        if deferred {
            RevertOutcome::Deferred { messages }
        } else {
            RevertOutcome::Merged { messages }
        }
    }

    /// A sentence for the user.
    pub fn describe(&self, disk: &str, snapshot: &str) -> String {
        match self {
            RevertOutcome::Merged { .. } => {
                format!(
                    "reverted {disk} to {snapshot} (snapshot merged into the origin and removed)"
                )
            }
            RevertOutcome::Deferred { messages } => format!(
                "{disk} is open or inactive: the merge of {snapshot} is deferred to its next \
                 activation; until then {disk} keeps its current data ({})",
                messages.join(" ")
            ),
        }
    }
}

/// Builds the listing of `origin` from the rows of its volume group.
pub fn listing_from_rows(origin: &LvRef, rows: &[LvRow]) -> Result<LvmListing> {
    let row = find_origin(origin, rows)?;
    let mut warnings = Vec::new();
    let snapshots: Vec<LvmSnapshot> = rows
        .iter()
        .filter(|r| r.origin.as_deref() == Some(origin.lv()))
        .filter(|r| r.is_classic_snapshot() || r.is_thin_snapshot())
        .map(|r| {
            let kind = if r.is_thin_snapshot() {
                SnapshotKind::Thin
            } else {
                SnapshotKind::Classic
            };
            let fill = match kind {
                SnapshotKind::Classic => r.snap_percent,
                SnapshotKind::Thin => r.data_percent,
            };
            let invalid = match kind {
                SnapshotKind::Classic => r
                    .snapshot_invalid
                    .map(|i| i || r.attr.starts_with('S'))
                    .or_else(|| r.attr.starts_with('S').then_some(true)),
                SnapshotKind::Thin => Some(false),
            };
            if kind == SnapshotKind::Classic {
                if invalid == Some(true) {
                    warnings.push(format!(
                        "snapshot {} is invalid: its COW store filled up and its data is lost; delete it",
                        r.name
                    ));
                } else if let Some(p) = fill.filter(|p| *p >= NEAR_FULL_PERCENT) {
                    warnings.push(format!(
                        "snapshot {} is {p:.2}% full: a classic snapshot becomes invalid when full \
                         (grow it with `lvextend -L +SIZE {}/{}`)",
                        r.name,
                        origin.vg(),
                        r.name
                    ));
                }
            }
            if r.merging {
                warnings.push(format!(
                    "snapshot {} is being merged into {} (pending until the origin's next activation if it is open)",
                    r.name,
                    origin.lv()
                ));
            }
            LvmSnapshot {
                name: r.name.clone(),
                uuid: r.uuid.clone(),
                kind,
                size: r.size,
                fill_percent: fill,
                time: r.time,
                invalid,
                merging: r.merging,
                skip_activation: r.skip_activation,
            }
        })
        .collect();
    Ok(LvmListing {
        image: origin.dev_path(),
        size: row.size,
        thin: row.is_thin(),
        pool: row.pool_lv.clone(),
        snapshots,
        warnings,
    })
}

fn find_origin<'a>(origin: &LvRef, rows: &'a [LvRow]) -> Result<&'a LvRow> {
    rows.iter().find(|r| r.name == origin.lv()).ok_or_else(|| {
        Error::not_found(format!(
            "logical volume {origin} not found in volume group {}",
            origin.vg()
        ))
    })
}

/// Checks that the kernel can do what create, merge and thin removal need, before lvm2 runs:
/// lvm2 may change metadata before it finds out (a thin merge or removal does), so refuse up
/// front with [`ErrorKind::Unsupported`].
pub fn require_device_mapper(operation: &str) -> Result<()> {
    if kernel_has_device_mapper() {
        return Ok(());
    }
    Err(Error::unsupported(format!(
        "{operation}: the kernel has no device-mapper driver (no device-mapper in /proc/misc, no \
         dm_mod module): lvm2 cannot create or merge snapshots without it; nothing was changed"
    )))
}

/// A planned lvm2 command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The lvm2 subcommand.
    pub subcommand: &'static str,
    /// Its arguments.
    pub args: Vec<String>,
    /// Thin or classic (create).
    pub kind: SnapshotKind,
    /// Size asked for (create, classic).
    pub size: Option<u64>,
}

/// Plans `lvcreate -s` of snapshot `name` of `origin`, checked against the VG's rows.
pub fn plan_create(origin: &LvRef, rows: &[LvRow], name: &str, size: SnapshotSize) -> Result<Plan> {
    snap_core::model::validate_snapshot_name(name)?;
    validate_lv_name(name)?;
    let row = find_origin(origin, rows)?;
    if rows.iter().any(|r| r.name == name) {
        return Err(Error::new(
            ErrorKind::Exists,
            format!(
                "a logical volume named {name} already exists in volume group {}",
                origin.vg()
            ),
        ));
    }
    if row.is_classic_snapshot() {
        return Err(Error::unsupported(format!(
            "{origin} is a classic snapshot; lvm2 does not support snapshots of snapshots"
        )));
    }
    if row.segtype == "thin-pool" || row.roles.iter().any(|r| r == "private") {
        return Err(Error::unsupported(format!(
            "{origin} is an internal or pool volume ({}), not a disk",
            row.segtype
        )));
    }
    let target = origin.arg();
    if row.is_thin() {
        if size != SnapshotSize::Default {
            return Err(Error::invalid(format!(
                "{origin} is a thin volume: its snapshots are thin and take no size"
            )));
        }
        return Ok(Plan {
            subcommand: "lvcreate",
            args: vec![
                "-y".into(),
                "-s".into(),
                "-n".into(),
                name.into(),
                "--".into(),
                target,
            ],
            kind: SnapshotKind::Thin,
            size: None,
        });
    }
    let (size_args, bytes) = match size {
        SnapshotSize::Default => (
            vec!["-l".to_string(), format!("{DEFAULT_COW_PERCENT}%ORIGIN")],
            None,
        ),
        SnapshotSize::PercentOfOrigin(p) if (1..=100).contains(&p) => {
            (vec!["-l".to_string(), format!("{p}%ORIGIN")], None)
        }
        SnapshotSize::PercentOfOrigin(p) => {
            return Err(Error::invalid(format!(
                "snapshot size {p}% of the origin is not between 1 and 100"
            )));
        }
        SnapshotSize::Bytes(0) => return Err(Error::invalid("snapshot size is 0")),
        SnapshotSize::Bytes(b) => (vec!["-L".to_string(), format!("{b}b")], Some(b)),
    };
    let mut args = vec!["-y".into(), "-s".into(), "-n".into(), name.into()];
    args.extend(size_args);
    args.extend(["--".into(), target]);
    Ok(Plan {
        subcommand: "lvcreate",
        args,
        kind: SnapshotKind::Classic,
        size: bytes,
    })
}

fn find_snapshot<'a>(origin: &LvRef, rows: &'a [LvRow], name: &str) -> Result<&'a LvRow> {
    validate_lv_name(name)?;
    find_origin(origin, rows)?;
    let row = rows
        .iter()
        .find(|r| r.name == name)
        .ok_or_else(|| Error::not_found(format!("no snapshot {name} of {origin}")))?;
    if row.origin.as_deref() != Some(origin.lv())
        || !(row.is_classic_snapshot() || row.is_thin_snapshot())
    {
        return Err(Error::not_found(format!(
            "{}/{name} is not a snapshot of {origin}",
            origin.vg()
        )));
    }
    Ok(row)
}

/// Plans `lvconvert --merge` of snapshot `name` into `origin`.
pub fn plan_revert(origin: &LvRef, rows: &[LvRow], name: &str) -> Result<Plan> {
    let row = find_snapshot(origin, rows, name)?;
    if row.snapshot_invalid == Some(true) || row.attr.starts_with('S') {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!("snapshot {name} is invalid (its COW store filled up); it cannot be merged"),
        ));
    }
    Ok(Plan {
        subcommand: "lvconvert",
        args: vec![
            "-y".into(),
            "--merge".into(),
            "--".into(),
            origin.sibling(name)?.arg(),
        ],
        kind: kind_of(row),
        size: None,
    })
}

/// Plans `lvremove` of snapshot `name` of `origin`.
pub fn plan_delete(origin: &LvRef, rows: &[LvRow], name: &str) -> Result<Plan> {
    let row = find_snapshot(origin, rows, name)?;
    Ok(Plan {
        subcommand: "lvremove",
        args: vec!["-y".into(), "--".into(), origin.sibling(name)?.arg()],
        kind: kind_of(row),
        size: None,
    })
}

fn kind_of(row: &LvRow) -> SnapshotKind {
    if row.is_thin_snapshot() {
        SnapshotKind::Thin
    } else {
        SnapshotKind::Classic
    }
}

/// The outcome of a create plan run by lvm2.
pub fn create_info(origin: &LvRef, name: &str, plan: &Plan, output: &LvmOutput) -> CreateInfo {
    CreateInfo {
        lv: format!("{}/{name}", origin.vg()),
        kind: plan.kind,
        size: plan.size,
        skip_activation: plan.kind == SnapshotKind::Thin,
        messages: output.messages(),
    }
}

/// Lists the snapshots of `origin` (blocking).
pub fn list(lvm: &Lvm, origin: &LvRef) -> Result<LvmListing> {
    listing_from_rows(origin, &lvm.lvs_blocking(origin.vg())?)
}

/// Creates snapshot LV `name` of `origin` (blocking); see the module docs.
pub fn create(lvm: &Lvm, origin: &LvRef, name: &str, size: SnapshotSize) -> Result<CreateInfo> {
    let plan = plan_create(origin, &lvm.lvs_blocking(origin.vg())?, name, size)?;
    require_device_mapper(&format!("create snapshot {name} of {origin}"))?;
    let output = lvm.run_blocking(plan.subcommand, &plan.args)?;
    Ok(create_info(origin, name, &plan, &output))
}

/// Merges snapshot `name` into `origin` (blocking); see [`RevertOutcome`].
pub fn revert(lvm: &Lvm, origin: &LvRef, name: &str) -> Result<RevertOutcome> {
    let plan = plan_revert(origin, &lvm.lvs_blocking(origin.vg())?, name)?;
    require_device_mapper(&format!("revert {origin} to {name}"))?;
    let output = lvm.run_blocking(plan.subcommand, &plan.args)?;
    Ok(RevertOutcome::from_output(&output))
}

/// Removes snapshot LV `name` of `origin` (blocking).
pub fn delete(lvm: &Lvm, origin: &LvRef, name: &str) -> Result<()> {
    let plan = plan_delete(origin, &lvm.lvs_blocking(origin.vg())?, name)?;
    if plan.kind == SnapshotKind::Thin {
        require_device_mapper(&format!("delete thin snapshot {name} of {origin}"))?;
    }
    lvm.run_blocking(plan.subcommand, &plan.args).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::parse_lvs;

    const CLASSIC: &str = r#"{"report":[{"lv":[
      {"lv_name":"o", "vg_name":"vg", "lv_uuid":"U1", "lv_attr":"owi-XXs---", "lv_size":"16777216", "origin":"", "snap_percent":"", "data_percent":"", "pool_lv":"", "lv_time":"2026-11-25 23:53:36 +0000", "segtype":"linear", "lv_role":"public,origin,thickorigin", "lv_skip_activation":"", "lv_snapshot_invalid":"unknown", "lv_merging":"", "lv_device_open":"unknown"},
      {"lv_name":"s", "vg_name":"vg", "lv_uuid":"U2", "lv_attr":"swi-aos---", "lv_size":"8388608", "origin":"o", "snap_percent":"85.00", "data_percent":"85.00", "pool_lv":"", "lv_time":"2026-11-25 23:53:36 +0000", "segtype":"linear", "lv_role":"public,snapshot,thicksnapshot", "lv_skip_activation":"", "lv_snapshot_invalid":"", "lv_merging":"", "lv_device_open":""},
      {"lv_name":"bad", "vg_name":"vg", "lv_uuid":"U3", "lv_attr":"Swi-I-s---", "lv_size":"8388608", "origin":"o", "snap_percent":"100.00", "data_percent":"", "pool_lv":"", "lv_time":"", "segtype":"linear", "lv_role":"public,snapshot,thicksnapshot", "lv_skip_activation":"", "lv_snapshot_invalid":"snapshot invalid", "lv_merging":"", "lv_device_open":""},
      {"lv_name":"other", "vg_name":"vg", "lv_uuid":"U4", "lv_attr":"-wi-------", "lv_size":"4194304", "origin":"", "snap_percent":"", "data_percent":"", "pool_lv":"", "lv_time":"", "segtype":"linear", "lv_role":"public", "lv_skip_activation":"", "lv_snapshot_invalid":"", "lv_merging":"", "lv_device_open":""}
    ]}]}"#;

    fn rows() -> Vec<LvRow> {
        parse_lvs(CLASSIC).unwrap()
    }

    fn origin() -> LvRef {
        LvRef::new("vg", "o").unwrap()
    }

    #[test]
    fn lists_with_fill_and_warnings() {
        let l = listing_from_rows(&origin(), &rows()).unwrap();
        assert_eq!(l.image, "/dev/vg/o");
        assert_eq!(l.size, 16 << 20);
        assert!(!l.thin);
        assert_eq!(l.snapshots.len(), 2);
        let s = l.snapshot("s").unwrap();
        assert_eq!(s.kind, SnapshotKind::Classic);
        assert_eq!(s.fill_percent, Some(85.0));
        assert_eq!(s.invalid, Some(false));
        assert_eq!(l.snapshot("bad").unwrap().invalid, Some(true));
        assert_eq!(l.warnings.len(), 2, "{:?}", l.warnings);
        assert!(l.warnings[0].contains("85.00% full"));
        assert!(l.warnings[1].contains("bad is invalid"));
        let d = l.to_disk_listing();
        assert_eq!(d.format, DiskFormat::Lvm);
        assert_eq!(d.virtual_size, 16 << 20);
        assert_eq!(d.snapshots[0].id, "s");
        assert_eq!(d.snapshots[0].date_sec, 1_795_650_816);
        assert_eq!(d.snapshots[1].date_sec, 0);
        assert!(d.chain.is_empty());
        let e = listing_from_rows(&LvRef::new("vg", "nope").unwrap(), &rows()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
    }

    #[test]
    fn create_plans() {
        let p = plan_create(&origin(), &rows(), "n1", SnapshotSize::Default).unwrap();
        assert_eq!(p.kind, SnapshotKind::Classic);
        assert_eq!(
            p.args,
            ["-y", "-s", "-n", "n1", "-l", "20%ORIGIN", "--", "vg/o"]
        );
        let p = plan_create(&origin(), &rows(), "n1", SnapshotSize::Bytes(1 << 20)).unwrap();
        assert_eq!(p.args[4..6], ["-L", "1048576b"]);
        assert_eq!(p.size, Some(1 << 20));
        let e = plan_create(&origin(), &rows(), "s", SnapshotSize::Default).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Exists);
        let e = plan_create(&origin(), &rows(), "-n", SnapshotSize::Default).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        let e = plan_create(&origin(), &rows(), "snapshot1", SnapshotSize::Default).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        let snap = LvRef::new("vg", "s").unwrap();
        let e = plan_create(&snap, &rows(), "n1", SnapshotSize::Default).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.message().contains("snapshots of snapshots"));
        assert!(plan_create(&origin(), &rows(), "n1", SnapshotSize::PercentOfOrigin(0)).is_err());
        assert!(plan_create(&origin(), &rows(), "n1", SnapshotSize::Bytes(0)).is_err());
    }

    #[test]
    fn thin_create_plan() {
        let thin = parse_lvs(crate::report::tests::THIN).unwrap();
        let t = LvRef::new("vgthin", "t").unwrap();
        let p = plan_create(&t, &thin, "n", SnapshotSize::Default).unwrap();
        assert_eq!(p.kind, SnapshotKind::Thin);
        assert_eq!(p.args, ["-y", "-s", "-n", "n", "--", "vgthin/t"]);
        assert!(plan_create(&t, &thin, "n", SnapshotSize::Bytes(4096)).is_err());
        let pool = LvRef::new("vgthin", "pool").unwrap();
        assert!(plan_create(&pool, &thin, "n", SnapshotSize::Default).is_err());
        // A thin snapshot of a thin snapshot is fine.
        let ts = LvRef::new("vgthin", "ts").unwrap();
        assert!(plan_create(&ts, &thin, "n", SnapshotSize::Default).is_ok());
        let l = listing_from_rows(&t, &thin).unwrap();
        assert!(l.thin);
        assert_eq!(l.pool.as_deref(), Some("pool"));
        assert_eq!(l.snapshots.len(), 1);
        assert_eq!(l.snapshots[0].kind, SnapshotKind::Thin);
        assert!(l.snapshots[0].skip_activation);
        assert!(l.warnings.is_empty());
    }

    #[test]
    fn revert_and_delete_plans_only_touch_snapshots_of_the_disk() {
        let p = plan_revert(&origin(), &rows(), "s").unwrap();
        assert_eq!(p.args, ["-y", "--merge", "--", "vg/s"]);
        assert_eq!(
            plan_revert(&origin(), &rows(), "bad").unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        let p = plan_delete(&origin(), &rows(), "bad").unwrap();
        assert_eq!(p.args, ["-y", "--", "vg/bad"]);
        for name in ["other", "o", "nope"] {
            assert_eq!(
                plan_delete(&origin(), &rows(), name).unwrap_err().kind(),
                ErrorKind::NotFound,
                "{name}"
            );
            assert!(plan_revert(&origin(), &rows(), name).is_err());
        }
        assert_eq!(
            plan_delete(&origin(), &rows(), "--force")
                .unwrap_err()
                .kind(),
            ErrorKind::InvalidInput
        );
    }

    #[test]
    fn deferred_merge_is_recognised() {
        let out = LvmOutput {
            stdout: "  Delaying merge since origin is open.\n  Merging of snapshot vg/s will occur on next activation of vg/o.\n".into(),
            stderr: String::new(),
        };
        let r = RevertOutcome::from_output(&out);
        assert!(matches!(r, RevertOutcome::Deferred { .. }));
        assert!(r.describe("/dev/vg/o", "s").contains("deferred"));
        let out = LvmOutput {
            stdout: "  Merging of volume vg/s started.\n  vg/o: Merged: 100.00%\n".into(),
            stderr: String::new(),
        };
        assert!(matches!(
            RevertOutcome::from_output(&out),
            RevertOutcome::Merged { .. }
        ));
    }
}
