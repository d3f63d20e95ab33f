//! The snapshot model shared by every backend and the CLI.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A disk image format snapctl knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// QEMU copy-on-write v2/v3.
    Qcow2,
    /// Microsoft Virtual Hard Disk (dynamic or differencing).
    Vhd,
    /// An LVM logical volume.
    Lvm,
    /// A Ceph RBD image.
    Rbd,
    /// A raw file: only ever a backing layer, never snapshotted itself.
    Raw,
}

impl DiskFormat {
    /// The name used on the command line and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Vhd => "vhd",
            DiskFormat::Lvm => "lvm",
            DiskFormat::Rbd => "rbd",
            DiskFormat::Raw => "raw",
        }
    }

    /// Parses a format name as given on the command line.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "qcow2" => Ok(DiskFormat::Qcow2),
            "vhd" | "vpc" => Ok(DiskFormat::Vhd),
            "lvm" => Ok(DiskFormat::Lvm),
            "rbd" => Ok(DiskFormat::Rbd),
            "raw" => Ok(DiskFormat::Raw),
            other => Err(Error::invalid(format!(
                "unknown disk format {other:?} (expected qcow2, vhd, lvm or rbd)"
            ))),
        }
    }
}

impl std::fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One internal snapshot of a disk as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// The format's unique id (qcow2: the id string).
    pub id: String,
    /// The user's name for it.
    pub name: String,
    /// Bytes of VM state saved with it (0 for disk-only).
    pub vm_state_size: u64,
    /// Creation time, seconds since the Unix epoch.
    pub date_sec: u64,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock at creation, nanoseconds.
    pub vm_clock_ns: u64,
    /// The virtual disk size when it was taken, when recorded.
    pub disk_size: Option<u64>,
}

impl SnapshotInfo {
    /// The creation time as RFC 3339 (UTC), to the second (as `qemu-img snapshot -l` shows it).
    pub fn date_rfc3339(&self) -> String {
        let secs = i64::try_from(self.date_sec).unwrap_or(i64::MAX);
        time::OffsetDateTime::from_unix_timestamp(secs)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_string())
    }
}

/// One backing layer of a disk's chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainLayer {
    /// Where the layer is.
    pub path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
}

/// What `disk list` reports for one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskListing {
    /// The image (active layer).
    pub image: PathBuf,
    /// Its format.
    pub format: DiskFormat,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Internal snapshots, in table order.
    pub snapshots: Vec<SnapshotInfo>,
    /// Backing layers, parent first, base last; empty when there are none.
    pub chain: Vec<ChainLayer>,
}

/// Validates a snapshot name given by a user: non-empty, printable, no NUL, bounded, and not
/// starting with `-` (so it can never be taken for an option by a tool we run).
pub fn validate_snapshot_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid("snapshot name is empty"));
    }
    if name.len() > 255 {
        return Err(Error::invalid(format!(
            "snapshot name is {} bytes long; the limit is 255",
            name.len()
        )));
    }
    if name.starts_with('-') {
        return Err(Error::invalid(format!(
            "snapshot name {name:?} starts with '-'"
        )));
    }
    if name.chars().any(|c| c.is_control()) {
        return Err(Error::invalid(format!(
            "snapshot name {name:?} contains control characters"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formatting() {
        let s = SnapshotInfo {
            id: "1".into(),
            name: "a".into(),
            vm_state_size: 0,
            date_sec: 1_700_000_000,
            date_nsec: 0,
            vm_clock_ns: 0,
            disk_size: None,
        };
        assert_eq!(s.date_rfc3339(), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn names() {
        assert!(validate_snapshot_name("s1").is_ok());
        assert!(validate_snapshot_name("").is_err());
        assert!(validate_snapshot_name("-x").is_err());
        assert!(validate_snapshot_name("a\nb").is_err());
        assert!(validate_snapshot_name(&"x".repeat(256)).is_err());
        assert_eq!(DiskFormat::parse("qcow2").unwrap(), DiskFormat::Qcow2);
        assert!(DiskFormat::parse("raw2").is_err());
    }
}
