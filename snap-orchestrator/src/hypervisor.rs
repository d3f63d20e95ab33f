//! What a hypervisor driver does for domain snapshots: report a domain's state, start it (fresh,
//! paused, or from a saved memory image), destroy it, and — while it runs — pause, resume, save
//! its memory, and hand out the QMP endpoint that owns its disks and its guest agent socket.
//!
//! The qemu driver ([`crate::qemu`]) implements it with qemu-system-x86_64 and QMP; the Xen
//! driver plugs in the same way through libxl.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use snap_core::Result;
use snap_core::qmp::QmpClient;

use crate::store::{DomainRecord, Runtime};
use crate::xlcfg::DiskSpec;

/// A domain's state as the hypervisor sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveState {
    /// The guest runs.
    Running,
    /// The guest is stopped but its memory is kept (paused, or after a memory save).
    Paused,
    /// No process / no domain: only the definition and the disks exist.
    Shutoff,
    /// In a state where no snapshot may be taken or reverted (shutting down, dying, migrating,
    /// crashed); the text says which.
    Busy(String),
}

impl LiveState {
    /// The word `domain list` prints.
    pub fn as_str(&self) -> &str {
        match self {
            LiveState::Running => "running",
            LiveState::Paused => "paused",
            LiveState::Shutoff => "shutoff",
            LiveState::Busy(what) => what,
        }
    }
}

/// How [`Hypervisor::start`] starts a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartMode {
    /// Boot and run.
    Running,
    /// Boot paused (the guest has not run a single instruction).
    Paused,
    /// Load a memory image saved by [`Control::save_memory`], then run or stay paused.
    Restore {
        /// The memory image.
        memory: PathBuf,
        /// Run once loaded (false: stay paused).
        running: bool,
    },
}

/// What a memory save reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SaveReport {
    /// When the guest stopped (for a live save: when the final stage began).
    pub stopped_at: SystemTime,
    /// Bytes of the memory image on disk.
    pub bytes: u64,
}

/// A hypervisor driver.
#[async_trait]
pub trait Hypervisor: Send + Sync + fmt::Debug {
    /// "qemu" or "xen".
    fn name(&self) -> &'static str;

    /// The domain's state now.
    async fn state(&self, dom: &DomainRecord) -> Result<LiveState>;

    /// Starts the domain from `dom.config` (whose disk targets are the current active layers).
    /// Returns what the store records about the running instance.
    async fn start(&self, dom: &DomainRecord, mode: StartMode) -> Result<Runtime>;

    /// Stops the domain at once (its disks are left as they are; the definition stays).
    async fn destroy(&self, dom: &DomainRecord) -> Result<()>;

    /// Takes control of a running or paused domain for an operation.
    async fn attach(&self, dom: &DomainRecord) -> Result<Box<dyn Control>>;

    /// Whether, while the domain runs, this disk is open in a QEMU reachable over QMP (then
    /// its snapshots go through QMP); otherwise it is snapshotted through its offline backend
    /// with the guest paused. The qemu driver: every disk. Xen: qdisk-backed disks only.
    fn disk_via_qmp(&self, disk: &DiskSpec) -> bool;
}

/// Control of one running (or paused) domain during an operation.
#[async_trait]
pub trait Control: Send + Sync + fmt::Debug {
    /// The domain's state, asked over this control's own connection (a second connection to a
    /// QMP monitor would wait for this one to close).
    async fn state(&mut self) -> Result<LiveState>;

    /// Stops the guest; returns when it stopped.
    async fn pause(&mut self) -> Result<SystemTime>;

    /// Lets the guest run again; returns when it resumed.
    async fn resume(&mut self) -> Result<SystemTime>;

    /// Saves the guest's memory and device state to `path`. `live`: while the guest runs (it is
    /// stopped only for the final stage); otherwise the guest must already be paused. Either
    /// way the guest is paused afterwards.
    async fn save_memory(&mut self, path: &Path, live: bool) -> Result<SaveReport>;

    /// Makes the disks writable again after a memory save (which hands them over, inactive), so
    /// disk snapshots can be taken before the guest resumes.
    async fn activate_disks(&mut self) -> Result<()>;

    /// The QMP connection of the process that has the disks open, if the disks are open in a
    /// QEMU (the qemu driver; Xen's qdisk device model).
    fn disk_qmp(&self) -> Option<Arc<QmpClient>>;

    /// The QMP node name of the disk the guest sees as `vdev`: the qemu driver names nodes
    /// after the vdev; Xen's qdisk backend names them `VDEV-DRIVER` (e.g. `xvda-qcow2`).
    fn disk_node(&self, vdev: &str) -> String {
        vdev.to_string()
    }

    /// The guest agent socket (qemu-ga over virtio-serial), if the domain has one.
    fn guest_agent(&self) -> Option<PathBuf>;
}

/// Milliseconds from `from` to `to` (0 when the clock went backwards), rounded to 0.1 ms.
pub fn window_ms(from: SystemTime, to: SystemTime) -> f64 {
    let ms = to
        .duration_since(from)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0);
    (ms * 10.0).round() / 10.0
}
