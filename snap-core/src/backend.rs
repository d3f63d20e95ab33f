//! The contract every disk backend implements.
//!
//! A backend owns one disk format. Heavy metadata work runs on tokio's blocking pool inside the
//! backend; the async surface exists for QMP jobs and subprocesses (lvm2, rbd).

use std::path::PathBuf;

use async_trait::async_trait;

use crate::error::Result;
use crate::model::{DiskFormat, DiskListing};

/// What a backend can do for a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// Snapshots inside the disk (qcow2 internal, LVM snapshot LV, RBD snap).
    pub internal: bool,
    /// Snapshots as a new active layer (qcow2 overlay, VHD child, RBD clone).
    pub external: bool,
    /// Works on a disk no process has open.
    pub offline: bool,
    /// Works on a disk open in a running QEMU (through QMP).
    pub online: bool,
}

/// Which snapshot an operation addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An internal snapshot, by name (or, for qcow2, by id when no name matches).
    Internal(String),
    /// A backing layer of the disk's chain, by path.
    Layer(PathBuf),
}

/// What to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateRequest {
    /// An internal snapshot of this name.
    Internal {
        /// Snapshot name (unique in the disk).
        name: String,
    },
    /// A new active layer on top of the disk.
    External {
        /// Snapshot name (used for the default overlay path).
        name: String,
        /// Where the new active layer goes; the backend's default when `None`.
        overlay: Option<PathBuf>,
    },
}

/// What a create did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOutcome {
    /// The disk's active path after the operation (the new overlay for an external snapshot).
    pub active: PathBuf,
    /// The snapshot's id, where the format has one.
    pub id: Option<String>,
}

/// A disk format's snapshot operations.
#[async_trait]
pub trait DiskBackend: Send + Sync {
    /// The format this backend handles.
    fn format(&self) -> DiskFormat;
    /// What this backend supports.
    fn capabilities(&self) -> Capabilities;
    /// Lists the disk's snapshots and chain.
    async fn list(&self) -> Result<DiskListing>;
    /// Creates a snapshot.
    async fn create(&self, request: &CreateRequest) -> Result<CreateOutcome>;
    /// Reverts the disk to a snapshot (its current state is dropped).
    async fn revert(&self, target: &Target) -> Result<()>;
    /// Deletes a snapshot, keeping the disk's current state.
    async fn delete(&self, target: &Target) -> Result<()>;
}
