//! Plans as data, executed step by step under a durable journal.
//!
//! A domain operation (snapshot create, revert, delete) is planned as a list of [`Step`]s. The
//! executor writes the list to `STATE/domains/NAME/journal.json` before the first step and
//! records progress after each step (atomically, synced), so when snapctl is killed part-way,
//! the next snapctl that opens the domain ([`open_domain`]) finds the journal and settles the
//! operation before doing anything else, and says what it did:
//!
//! - **create** rolls back unless its disk snapshots were all taken (then it finishes: resumes
//!   and thaws the guest, records the snapshot). Whether they were taken is checked on the disks
//!   themselves, not trusted from the journal: the steps inside the guest's pause window
//!   (reactivating the disks, the QMP transaction, the resume) are not journaled one by one, to
//!   keep the window short.
//! - **revert** and **delete** always finish: every step is idempotent (a revert re-reverts, a
//!   new overlay is made afresh, a layer already merged is skipped, a removed file stays removed),
//!   and once the domain was stopped for a revert there is nothing to go back to.
//!
//! `SNAPCTL_TEST_CRASH=before:N` or `after:N` makes snapctl exit at once (exit code 86, no
//! clean-up) just before step N runs or just after it ran, before the journal says so; the tests
//! use it to kill snapctl at every step.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use snap_backend_qcow2::online::{self as qonline, OnlineDisk, StreamOptions};
use snap_backend_rbd::{RbdBackend, RbdSpec};
use snap_core::qmp::QmpClient;
use snap_core::{Error, ErrorKind, Result};

use crate::domain::Ctx;
use crate::hypervisor::{Control, Hypervisor, LiveState, StartMode, window_ms};
use crate::layers::{self, Backend};
use crate::qga::GuestAgent;
use crate::store::{DiskKind, DomainLock, DomainRecord, SnapshotRecord, remove_if_present};
use crate::xlcfg::DomainConfig;

/// The journal's file in the domain folder.
pub const JOURNAL_FILE: &str = "journal.json";

/// How long the guest agent has to answer.
const AGENT_TIMEOUT: Duration = Duration::from_secs(5);

/// One disk's part of a snapshot create.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskAction {
    /// The disk.
    pub vdev: String,
    /// Its backend ("qcow2", "vhd", "lvm", "rbd").
    pub backend: String,
    /// Internal (in the image / an LV snapshot) or external (a new overlay).
    pub kind: DiskKind,
    /// The active file now (an external snapshot freezes it).
    pub image: PathBuf,
    /// External: the new active overlay.
    pub overlay: Option<PathBuf>,
}

impl DiskAction {
    fn backend(&self) -> Result<Backend> {
        Backend::parse(&self.backend)
    }
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum Step {
    /// Freeze the guest's file systems (qemu-ga).
    Freeze,
    /// Stop the guest.
    Pause,
    /// Save memory to `path` (live: while the guest runs; it ends paused either way).
    SaveMemory {
        /// The memory image.
        path: PathBuf,
        /// While the guest runs.
        live: bool,
    },
    /// Make the images writable again after a save.
    ActivateDisks,
    /// Snapshot these disks in one QMP transaction.
    QmpSnapshots {
        /// Snapshot name.
        name: String,
        /// The disks.
        disks: Vec<DiskAction>,
    },
    /// Snapshot one disk through its offline backend.
    OfflineSnapshot {
        /// Snapshot name.
        name: String,
        /// The disk.
        disk: DiskAction,
    },
    /// External snapshot of an RBD disk of the running QEMU (paused): snapshot the image
    /// through QMP, protect and clone it, move QEMU's disk to the clone.
    SwitchRbd {
        /// Snapshot name.
        name: String,
        /// The disk (`overlay` is the clone).
        disk: DiskAction,
    },
    /// Let the guest run again.
    Resume,
    /// Thaw the guest's file systems.
    Thaw,
    /// Record the new snapshot; the domain's disks move to the new overlays.
    RecordCreate {
        /// The record (its pause window is filled in from what was measured).
        snapshot: Box<SnapshotRecord>,
        /// (vdev, new active file) for external disks.
        targets: Vec<(String, PathBuf)>,
    },
    /// Stop the domain.
    Destroy,
    /// Revert an internal snapshot in place.
    RevertInternal {
        /// The disk.
        vdev: String,
        /// Its backend.
        backend: String,
        /// The image holding the snapshot.
        image: PathBuf,
        /// The snapshot's name in it.
        name: String,
    },
    /// Make a new empty overlay on a frozen layer (made afresh if it exists).
    NewOverlay {
        /// The disk.
        vdev: String,
        /// Its backend.
        backend: String,
        /// The frozen layer.
        layer: PathBuf,
        /// The new overlay.
        overlay: PathBuf,
        /// The snapshot reverted to.
        name: String,
    },
    /// Record the revert: current snapshot and the domain's config (on the new active files).
    RecordRevert {
        /// The snapshot reverted to.
        name: String,
        /// The domain's config from now on.
        config: Box<DomainConfig>,
    },
    /// Remove a file nothing uses any more.
    RemoveFile {
        /// The file.
        path: PathBuf,
    },
    /// Start the domain (from a memory image, or booting).
    Start {
        /// The memory image to load.
        memory: Option<PathBuf>,
        /// Run (else stay paused).
        running: bool,
    },
    /// Delete an internal snapshot (through QMP when its image is the running domain's active
    /// layer).
    DeleteInternal {
        /// The disk.
        vdev: String,
        /// Its backend.
        backend: String,
        /// The image holding it.
        image: PathBuf,
        /// Its name there.
        name: String,
    },
    /// Merge a frozen layer into one image reading through it (skipped when already merged).
    MergeLayer {
        /// The disk.
        vdev: String,
        /// Its backend.
        backend: String,
        /// The layer.
        layer: PathBuf,
        /// The image whose backing it is.
        child: PathBuf,
    },
    /// Remove a merged layer (refused while an image still reads through it).
    RemoveLayer {
        /// The disk.
        vdev: String,
        /// Its backend.
        backend: String,
        /// The layer.
        layer: PathBuf,
    },
    /// Copy the parent's data into an RBD clone so it no longer reads through its parent
    /// (`rbd flatten`; skipped when it has no parent).
    FlattenRbd {
        /// The disk.
        vdev: String,
        /// The clone.
        image: PathBuf,
    },
    /// Remove an RBD snapshot (unprotected first; refused while clones depend on it; skipped
    /// when it is gone).
    DeleteRbdSnapshot {
        /// The disk.
        vdev: String,
        /// The image holding it.
        image: PathBuf,
        /// Its name.
        name: String,
    },
    /// Remove a memory image and its description.
    RemoveMemory {
        /// The memory image.
        path: PathBuf,
    },
    /// Forget a snapshot in the record (its children move to its parent).
    ForgetSnapshot {
        /// The snapshot.
        name: String,
    },
}

impl Step {
    /// The plan line of this step.
    pub fn describe(&self) -> String {
        match self {
            Step::Freeze => {
                "freeze the guest's file systems (qemu-ga guest-fsfreeze-freeze)".into()
            }
            Step::Pause => "pause the guest".into(),
            Step::SaveMemory { path, live } => format!(
                "save memory {} to {}",
                if *live {
                    "while the guest runs (it stops for the final stage only)"
                } else {
                    "with the guest paused"
                },
                path.display()
            ),
            Step::ActivateDisks => {
                "reactivate the disk images (a save hands them over inactive)".into()
            }
            Step::QmpSnapshots { name, disks } => {
                let what: Vec<String> = disks.iter().map(|d| describe_disk(d, name)).collect();
                format!("one QMP transaction (all or none): {}", what.join("; "))
            }
            Step::OfflineSnapshot { name, disk } => describe_disk(disk, name),
            Step::SwitchRbd { name, disk } => format!(
                "{}: RBD snapshot {name} of {}, protected and cloned to {}; QEMU moves the disk \
                 to the clone",
                disk.vdev,
                disk.image.display(),
                disk.overlay
                    .as_deref()
                    .map(|o| o.display().to_string())
                    .unwrap_or_default()
            ),
            Step::Resume => "resume the guest".into(),
            Step::Thaw => "thaw the guest's file systems".into(),
            Step::RecordCreate { snapshot, .. } => format!(
                "record snapshot {} (parent {}) as the current snapshot",
                snapshot.name,
                snapshot.parent.as_deref().unwrap_or("none")
            ),
            Step::Destroy => "stop the domain (its current state is dropped)".into(),
            Step::RevertInternal {
                vdev, image, name, ..
            } => format!(
                "{vdev}: revert internal snapshot {name} in {}",
                image.display()
            ),
            Step::NewOverlay {
                vdev,
                layer,
                overlay,
                ..
            } => format!(
                "{vdev}: new empty overlay {} on {}",
                overlay.display(),
                layer.display()
            ),
            Step::RecordRevert { name, .. } => format!("record snapshot {name} as current"),
            Step::RemoveFile { path } => format!(
                "remove {} (the abandoned active layer; no snapshot uses it)",
                path.display()
            ),
            Step::Start {
                memory: Some(m),
                running,
            } => format!(
                "start the domain from memory image {} and leave it {}",
                m.display(),
                if *running { "running" } else { "paused" }
            ),
            Step::Start {
                memory: None,
                running: true,
            } => "boot the domain (the snapshot has no memory)".into(),
            Step::Start {
                memory: None,
                running: false,
            } => "start the domain paused, before its first instruction".into(),
            Step::DeleteInternal {
                vdev, image, name, ..
            } => format!(
                "{vdev}: delete internal snapshot {name} in {}",
                image.display()
            ),
            Step::MergeLayer {
                vdev, layer, child, ..
            } => format!(
                "{vdev}: merge layer {} into {} (a block-stream job if the running domain uses it)",
                layer.display(),
                child.display()
            ),
            Step::RemoveLayer { vdev, layer, .. } => {
                format!("{vdev}: remove layer {}", layer.display())
            }
            Step::FlattenRbd { vdev, image } => format!(
                "{vdev}: flatten {} (copy its parent's data into it: rbd flatten)",
                image.display()
            ),
            Step::DeleteRbdSnapshot { vdev, image, name } => {
                format!("{vdev}: remove RBD snapshot {name} of {}", image.display())
            }
            Step::RemoveMemory { path } => format!("remove memory image {}", path.display()),
            Step::ForgetSnapshot { name } => format!("forget snapshot {name}"),
        }
    }

    /// A snapshot-taking step of a create (the point of no return).
    pub fn takes_snapshots(&self) -> bool {
        matches!(
            self,
            Step::QmpSnapshots { .. } | Step::OfflineSnapshot { .. } | Step::SwitchRbd { .. }
        )
    }

    /// Steps whose completion is not journaled: they end inside the guest's pause window
    /// (an fsync there would lengthen it). Recovery checks the disks instead.
    fn in_pause_window(&self) -> bool {
        matches!(
            self,
            Step::Pause
                | Step::SaveMemory { .. }
                | Step::ActivateDisks
                | Step::QmpSnapshots { .. }
                | Step::SwitchRbd { .. }
        )
    }
}

fn describe_disk(d: &DiskAction, name: &str) -> String {
    match (&d.kind, &d.overlay) {
        (DiskKind::External, Some(overlay)) => format!(
            "{}: new overlay {} on {}",
            d.vdev,
            overlay.display(),
            d.image.display()
        ),
        _ if d.backend == "lvm" => {
            format!("{}: snapshot LV {name} of {}", d.vdev, d.image.display())
        }
        _ => format!(
            "{}: internal snapshot {name} in {}",
            d.vdev,
            d.image.display()
        ),
    }
}

/// The durable record of an operation in progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Journal {
    /// "create", "revert" or "delete".
    pub operation: String,
    /// The snapshot named on the command line.
    pub snapshot: String,
    /// When it started (RFC 3339).
    pub started: String,
    /// Whether the guest was running when it started (a rollback lets it run again).
    pub was_running: bool,
    /// The plan.
    pub steps: Vec<Step>,
    /// How many steps are known to be done.
    pub done: usize,
}

impl Journal {
    /// A journal for `operation` on `snapshot`, nothing done yet.
    pub fn new(operation: &str, snapshot: &str, was_running: bool, steps: Vec<Step>) -> Journal {
        Journal {
            operation: operation.to_string(),
            snapshot: snapshot.to_string(),
            started: now(),
            was_running,
            steps,
            done: 0,
        }
    }
}

/// Runs a revert's or a delete's plan to its end; a failing step leaves the journal, and the
/// error says that the next snapctl on the domain finishes the operation.
pub async fn finish(
    lock: &DomainLock,
    rec: DomainRecord,
    driver: Box<dyn Hypervisor>,
    journal: Journal,
) -> Result<DomainRecord> {
    let (operation, domain) = (journal.operation.clone(), rec.name.clone());
    let mut exec = Exec::new(lock, rec, driver, None, journal);
    exec.run(0).await.map_err(|(index, e)| {
        e.context(format!(
            "step {} of the {operation}; run any snapctl command on domain {domain} to finish it",
            index + 1
        ))
    })?;
    Ok(exec.rec)
}

/// The test hook: exit at once before or after step `index`.
fn crash_point(when: &str, index: usize) {
    if let Ok(spec) = std::env::var("SNAPCTL_TEST_CRASH")
        && spec == format!("{when}:{index}")
    {
        eprintln!("snapctl: test crash {when} step {index}");
        std::process::exit(86);
    }
}

/// Runs a plan.
pub struct Exec<'a> {
    lock: &'a DomainLock,
    /// The domain record, as the steps change it.
    pub rec: DomainRecord,
    driver: Box<dyn Hypervisor>,
    ctl: Option<Box<dyn Control>>,
    agent: Option<GuestAgent>,
    stopped_at: Option<SystemTime>,
    resumed_at: Option<SystemTime>,
    /// The journal (its `done` moves as steps finish).
    pub journal: Journal,
}

impl std::fmt::Debug for Exec<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exec")
            .field("domain", &self.rec.name)
            .field("journal", &self.journal)
            .finish_non_exhaustive()
    }
}

impl<'a> Exec<'a> {
    /// An executor for `journal` on domain `rec`, with an attached control when the domain runs.
    pub fn new(
        lock: &'a DomainLock,
        rec: DomainRecord,
        driver: Box<dyn Hypervisor>,
        ctl: Option<Box<dyn Control>>,
        journal: Journal,
    ) -> Exec<'a> {
        Exec {
            lock,
            rec,
            driver,
            ctl,
            agent: None,
            stopped_at: None,
            resumed_at: None,
            journal,
        }
    }

    /// Hands over a guest agent connection made (and checked) before the run.
    pub fn set_agent(&mut self, agent: Option<GuestAgent>) {
        self.agent = agent;
    }

    /// The measured pause window, if the guest was stopped and resumed by this run.
    pub fn pause_window(&self) -> Option<f64> {
        match (self.stopped_at, self.resumed_at) {
            (Some(s), Some(r)) => Some(window_ms(s, r)),
            _ => None,
        }
    }

    fn save_journal(&self) -> Result<()> {
        self.lock.save_file(JOURNAL_FILE, &self.journal)
    }

    /// Runs the steps from `journal.done` on. A failing step stops the run and is returned with
    /// its index, unless it comes at or after `keep_going_from`: those are all tried and the
    /// first error is returned at the end. The journal is removed when the last step ran.
    pub async fn run(&mut self, keep_going_from: usize) -> std::result::Result<(), (usize, Error)> {
        self.save_journal().map_err(|e| (self.journal.done, e))?;
        let mut first_error: Option<(usize, Error)> = None;
        while let Some(step) = self.journal.steps.get(self.journal.done).cloned() {
            let index = self.journal.done;
            crash_point("before", index);
            let result = self.step(&step).await;
            crash_point("after", index);
            if let Err(e) = result {
                if index < keep_going_from {
                    return Err((index, e));
                }
                eprintln!("snapctl: warning: {}: {e}", step.describe());
                first_error.get_or_insert((index, e));
            }
            self.journal.done = index + 1;
            if !step.in_pause_window() {
                self.save_journal().map_err(|e| (index, e))?;
            }
        }
        self.lock
            .remove_file(JOURNAL_FILE)
            .map_err(|e| (self.journal.done, e))?;
        match first_error {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    /// The control of the running domain (attached on first use).
    async fn control(&mut self) -> Result<&mut Box<dyn Control>> {
        if self.ctl.is_none() {
            self.ctl = Some(self.driver.attach(&self.rec).await?);
        }
        self.ctl
            .as_mut()
            .ok_or_else(|| Error::invalid("domain not attached"))
    }

    /// The QMP node of disk `vdev` (Xen's qdisk backend does not name nodes after the vdev).
    fn node(&self, vdev: &str) -> String {
        self.ctl
            .as_ref()
            .map_or_else(|| vdev.to_string(), |c| c.disk_node(vdev))
    }

    async fn qmp(&mut self) -> Result<Arc<QmpClient>> {
        self.control()
            .await?
            .disk_qmp()
            .ok_or_else(|| Error::unsupported("this domain's disks are not reachable over QMP"))
    }

    async fn guest_agent(&mut self) -> Result<&mut GuestAgent> {
        if self.agent.is_none() {
            let socket = self
                .control()
                .await?
                .guest_agent()
                .ok_or_else(|| Error::unsupported("this domain has no guest agent channel"))?;
            self.agent = Some(GuestAgent::connect(&socket, AGENT_TIMEOUT).await?);
        }
        self.agent
            .as_mut()
            .ok_or_else(|| Error::invalid("no guest agent"))
    }

    /// The domain's state: over the attached control when there is one (a second QMP
    /// connection would wait for the first to close).
    async fn live_state(&mut self) -> Result<LiveState> {
        match self.ctl.as_mut() {
            Some(ctl) => ctl.state().await,
            None => self.driver.state(&self.rec).await,
        }
    }

    /// Runs one step.
    async fn step(&mut self, step: &Step) -> Result<()> {
        match step {
            Step::Freeze => {
                self.guest_agent().await?.freeze().await?;
            }
            Step::Pause => {
                let at = self.control().await?.pause().await?;
                self.stopped_at = Some(at);
            }
            Step::SaveMemory { path, live } => {
                let report = self.control().await?.save_memory(path, *live).await?;
                if *live {
                    self.stopped_at = Some(report.stopped_at);
                }
            }
            Step::ActivateDisks => self.control().await?.activate_disks().await?,
            Step::QmpSnapshots { name, disks } => {
                let qmp = self.qmp().await?;
                let nodes: Vec<String> = disks.iter().map(|d| self.node(&d.vdev)).collect();
                qmp_snapshots(&qmp, disks, &nodes, name).await?;
            }
            Step::OfflineSnapshot { name, disk } => {
                let backend = disk.backend()?;
                match &disk.overlay {
                    Some(overlay) => {
                        layers::create_overlay(backend, &disk.image, name, overlay).await?
                    }
                    None => layers::create_internal(backend, &disk.image, name).await?,
                }
            }
            Step::SwitchRbd { name, disk } => {
                let clone = disk
                    .overlay
                    .as_deref()
                    .ok_or_else(|| Error::invalid("an RBD switch without its clone"))?;
                // Inside the pause window: the plan checked the names and the layering
                // feature, so this is one QMP snapshot, two rbd commands and the switch.
                let node = self.node(&disk.vdev);
                let qmp = self.qmp().await?;
                qonline::create_many_internal(&qmp, &[(node.as_str(), name.as_str())]).await?;
                RbdBackend::new(&disk.image)?
                    .protect_and_clone(name, &RbdSpec::from_path(clone)?)
                    .await?;
                crate::rbdlive::switch(&qmp, &node, clone).await?;
            }
            Step::Resume => {
                if self.live_state().await? == LiveState::Paused {
                    let at = self.control().await?.resume().await?;
                    self.resumed_at = Some(at);
                }
            }
            Step::Thaw => {
                self.guest_agent().await?.thaw().await?;
            }
            Step::RecordCreate { snapshot, targets } => {
                let mut snapshot = (**snapshot).clone();
                if snapshot.pause_window_ms.is_none() {
                    snapshot.pause_window_ms = self.pause_window();
                }
                if self.rec.snapshot(&snapshot.name).is_none() {
                    let name = snapshot.name.clone();
                    self.rec.add_snapshot(snapshot)?;
                    self.rec.current = Some(name);
                }
                for (vdev, path) in targets {
                    if let Some(spec) = self.rec.config.disks.iter_mut().find(|s| &s.vdev == vdev) {
                        spec.target = path.to_string_lossy().into_owned();
                    }
                }
                self.lock.save(&self.rec)?;
            }
            Step::Destroy => {
                self.ctl = None;
                self.driver.destroy(&self.rec).await?;
                self.rec.runtime = None;
                self.lock.save(&self.rec)?;
            }
            Step::RevertInternal {
                backend,
                image,
                name,
                ..
            } => {
                layers::revert_internal(Backend::parse(backend)?, image, name).await?;
            }
            Step::NewOverlay {
                backend,
                layer,
                overlay,
                name,
                ..
            } => {
                if Backend::parse(backend)? == Backend::Rbd {
                    // A clone of the layer's snapshot (one left by an interrupted run is taken
                    // as made: nothing has written to it yet).
                    RbdBackend::new(layer)?
                        .clone_snapshot(name, &RbdSpec::from_path(overlay)?)
                        .await?;
                    return Ok(());
                }
                // Made afresh: a file left by an interrupted run is ours and empty.
                if overlay.exists() {
                    std::fs::remove_file(overlay).map_err(|e| {
                        Error::io("remove a half-made overlay", e).with_path(overlay)
                    })?;
                }
                layers::create_overlay(Backend::parse(backend)?, layer, name, overlay).await?;
            }
            Step::RecordRevert { name, config } => {
                self.rec.config = (**config).clone();
                self.rec.current = Some(name.clone());
                self.lock.save(&self.rec)?;
            }
            Step::RemoveFile { path } => layers::remove_layer(path).await?,
            Step::FlattenRbd { image, .. } => {
                let rbd = RbdBackend::new(image)?;
                if rbd.exists().await? {
                    rbd.flatten().await?;
                }
            }
            Step::DeleteRbdSnapshot { image, name, .. } => {
                // Gone already (image or snapshot) is done; any other failure is an error.
                if layers::rbd_has_snapshot(image, name).await? {
                    RbdBackend::new(image)?.delete_snapshot(name).await?;
                }
            }
            Step::RemoveMemory { path } => {
                remove_if_present(path)?;
                remove_if_present(&crate::qemu::memory_info_path(path))?;
            }
            Step::Start { memory, running } => {
                if self.live_state().await? == LiveState::Shutoff {
                    let mode = match memory {
                        Some(memory) => StartMode::Restore {
                            memory: memory.clone(),
                            running: *running,
                        },
                        None if *running => StartMode::Running,
                        None => StartMode::Paused,
                    };
                    let runtime = self.driver.start(&self.rec, mode).await?;
                    self.rec.runtime = Some(runtime);
                    self.lock.save(&self.rec)?;
                }
            }
            Step::DeleteInternal {
                vdev,
                backend,
                image,
                name,
            } => {
                let backend = Backend::parse(backend)?;
                if !has_internal(backend, image, name).await {
                    return Ok(());
                }
                if self.in_running_chain(vdev, image).await {
                    let qmp = self.qmp().await?;
                    let disk = OnlineDisk::from_shared(Arc::clone(&qmp), &self.node(vdev));
                    let top = disk.active_node().await?;
                    if !layers::same_file(&top.file, image) {
                        return Err(Error::unsupported(format!(
                            "disk {vdev}: {} is a backing layer of the running domain (open \
                             read-only); delete the snapshot with the domain shut off",
                            image.display()
                        )));
                    }
                    OnlineDisk::from_shared(qmp, &top.name)
                        .delete_internal(name)
                        .await?;
                } else {
                    layers::delete_internal(backend, image, name).await?;
                }
            }
            Step::MergeLayer {
                vdev,
                backend,
                layer,
                child,
            } => {
                let backend = Backend::parse(backend)?;
                let still = layers::backing_of(backend, child)
                    .await?
                    .is_some_and(|b| layers::same_file(&b, layer));
                if !still {
                    return Ok(());
                }
                if self.in_running_chain(vdev, child).await {
                    let qmp = self.qmp().await?;
                    OnlineDisk::from_shared(qmp, &self.node(vdev))
                        .delete_layer(
                            layer,
                            &StreamOptions::default(),
                            |_, _| {},
                            std::future::pending(),
                        )
                        .await?;
                } else {
                    layers::merge_into_child(backend, child, layer).await?;
                }
            }
            Step::RemoveLayer {
                vdev,
                backend,
                layer,
            } => {
                let backend = Backend::parse(backend)?;
                if backend == Backend::Rbd {
                    // rbd refuses to remove an image with snapshots, hence with clones.
                    layers::remove_layer(layer).await?;
                } else if layer.exists() {
                    let files = tracked_files(&self.rec, vdev);
                    let users = layers::children_of(backend, layer, &files).await?;
                    if let Some(user) = users.first() {
                        return Err(Error::new(
                            ErrorKind::InUse,
                            format!("{} still reads through this layer", user.display()),
                        )
                        .with_path(layer));
                    }
                    remove_if_present(layer)?;
                }
            }
            Step::ForgetSnapshot { name } => {
                if self.rec.snapshot(name).is_some() {
                    self.rec.remove_snapshot(name)?;
                    self.lock.save(&self.rec)?;
                }
            }
        }
        Ok(())
    }

    /// Whether `file` is in the chain the running domain has open for `vdev`.
    async fn in_running_chain(&mut self, vdev: &str, file: &Path) -> bool {
        let via_qmp = self
            .rec
            .config
            .disk(vdev)
            .is_some_and(|s| self.driver.disk_via_qmp(s));
        if !via_qmp
            || !matches!(
                self.live_state().await,
                Ok(LiveState::Running | LiveState::Paused)
            )
        {
            return false;
        }
        let Some(active) = self.rec.config.disk(vdev).map(|s| PathBuf::from(&s.target)) else {
            return false;
        };
        if layers::same_file(&active, file) {
            return true;
        }
        let backend = self
            .rec
            .config
            .disk(vdev)
            .and_then(|s| layers::classify(s).ok())
            .unwrap_or(Backend::Qcow2);
        match layers::listing(backend, &active).await {
            Ok(l) => l.chain.iter().any(|c| layers::same_file(&c.path, file)),
            Err(_) => false,
        }
    }

    /// Undoes a create that did not take its disk snapshots: removes what the steps up to
    /// `upto` (inclusive) left, lets the guest run again if it ran before, thaws.
    pub async fn roll_back_create(&mut self, upto: usize) -> Result<()> {
        let steps: Vec<Step> = self.journal.steps.iter().take(upto + 1).cloned().collect();
        let mut problems = Vec::new();
        for step in steps.iter().rev() {
            let undone = match step {
                Step::SaveMemory { path, .. } => remove_if_present(path)
                    .and_then(|()| remove_if_present(&crate::qemu::memory_info_path(path))),
                Step::OfflineSnapshot { name, disk } => undo_disk(disk, name).await,
                Step::SwitchRbd { name, disk } => self.undo_switch(disk, name).await,
                Step::QmpSnapshots { disks, .. } => {
                    // An aborted transaction may leave overlay files behind; nobody uses them.
                    let mut result = Ok(());
                    for d in disks {
                        if let Some(overlay) = &d.overlay
                            && !self.uses(&d.vdev, overlay).await
                        {
                            result = result.and(remove_if_present(overlay));
                        }
                    }
                    result
                }
                _ => Ok(()),
            };
            if let Err(e) = undone {
                problems.push(e);
            }
        }
        if self.journal.was_running && self.live_state().await? == LiveState::Paused {
            let resumed = async { self.control().await?.resume().await }.await;
            if let Err(e) = resumed {
                problems.push(e);
            }
        }
        if steps.contains(&Step::Freeze) {
            let thawed = async { self.guest_agent().await?.thaw().await }.await;
            if let Err(e) = thawed {
                problems.push(e);
            }
        }
        self.lock.remove_file(JOURNAL_FILE)?;
        match problems.into_iter().next() {
            Some(e) => Err(e.context("rolling back")),
            None => Ok(()),
        }
    }

    /// Undoes an RBD switch: QEMU goes back to the image if it moved to the clone, the clone
    /// and the snapshot go.
    async fn undo_switch(&mut self, d: &DiskAction, name: &str) -> Result<()> {
        if let Some(clone) = &d.overlay {
            let live = matches!(
                self.live_state().await,
                Ok(LiveState::Running | LiveState::Paused)
            );
            if live {
                let node = self.node(&d.vdev);
                let qmp = self.qmp().await?;
                if crate::rbdlive::image_of(&qmp, &node)
                    .await?
                    .is_some_and(|i| layers::same_file(&i, clone))
                {
                    crate::rbdlive::switch(&qmp, &node, &d.image).await?;
                }
            }
        }
        undo_disk(d, name).await
    }

    /// Whether the running domain's disk `vdev` has `file` as its active layer.
    async fn uses(&self, vdev: &str, file: &Path) -> bool {
        let Some(ctl) = &self.ctl else {
            return false;
        };
        let Some(qmp) = ctl.disk_qmp() else {
            return false;
        };
        match OnlineDisk::from_shared(qmp, &ctl.disk_node(vdev))
            .active_node()
            .await
        {
            Ok(top) => layers::same_file(&top.file, file),
            Err(_) => false,
        }
    }

    /// Whether every disk snapshot of the create's plan is there (checked on the disks).
    async fn snapshots_taken(&mut self) -> bool {
        let steps: Vec<Step> = self.journal.steps.clone();
        for step in &steps {
            match step {
                Step::QmpSnapshots { name, disks } => {
                    if self.ctl.is_none() {
                        match self.driver.attach(&self.rec).await {
                            Ok(c) => self.ctl = Some(c),
                            Err(_) => return false,
                        }
                    }
                    for d in disks {
                        let present = match &d.overlay {
                            Some(overlay) => self.uses(&d.vdev, overlay).await,
                            None => match d.backend() {
                                Ok(b) => has_internal(b, &d.image, name).await,
                                Err(_) => false,
                            },
                        };
                        if !present {
                            return false;
                        }
                    }
                }
                Step::OfflineSnapshot { name, disk } if !disk_taken(disk, name).await => {
                    return false;
                }
                Step::SwitchRbd { name, disk } => {
                    if self.ctl.is_none() {
                        match self.driver.attach(&self.rec).await {
                            Ok(c) => self.ctl = Some(c),
                            // QEMU is gone: the clone decides. Once it exists the guest may have
                            // written to it (or, paused since the snapshot, wrote nothing after
                            // it): either way it is the disk now, never to be removed.
                            Err(_) => {
                                if rbd_clone_made(disk, name).await {
                                    continue;
                                }
                                return false;
                            }
                        }
                    }
                    let node = self.node(&disk.vdev);
                    let moved = match (self.qmp().await, &disk.overlay) {
                        (Ok(qmp), Some(clone)) => crate::rbdlive::image_of(&qmp, &node)
                            .await
                            .ok()
                            .flatten()
                            .is_some_and(|i| layers::same_file(&i, clone)),
                        _ => false,
                    };
                    if !moved {
                        return false;
                    }
                }
                _ => {}
            }
        }
        true
    }
}

/// Whether `image` holds internal snapshot `name` (an LV: a snapshot LV of that name).
async fn has_internal(backend: Backend, image: &Path, name: &str) -> bool {
    match layers::listing(backend, image).await {
        Ok(l) => l.snapshots.iter().any(|s| s.name == name),
        Err(_) => false,
    }
}

/// Whether the clone of an RBD switch exists and hangs off the image's snapshot `name`.
async fn rbd_clone_made(d: &DiskAction, name: &str) -> bool {
    let Some(clone) = &d.overlay else {
        return false;
    };
    match layers::backing_of(Backend::Rbd, clone).await {
        Ok(Some(parent)) => {
            layers::same_file(&parent, &d.image)
                && RbdSpec::from_path(&parent).is_ok_and(|p| p.snapshot() == Some(name))
        }
        _ => false,
    }
}

/// Whether an offline disk snapshot was taken (a complete overlay on the image, or the internal
/// snapshot).
async fn disk_taken(d: &DiskAction, name: &str) -> bool {
    let Ok(backend) = d.backend() else {
        return false;
    };
    match &d.overlay {
        Some(overlay) => match layers::backing_of(backend, overlay).await {
            Ok(Some(b)) => layers::same_file(&b, &d.image),
            _ => false,
        },
        None => has_internal(backend, &d.image, name).await,
    }
}

/// Undoes one offline disk snapshot if it is there (a partial overlay is removed too; an RBD
/// clone and the snapshot it hangs off both go).
async fn undo_disk(d: &DiskAction, name: &str) -> Result<()> {
    let backend = d.backend()?;
    match &d.overlay {
        Some(clone) if backend == Backend::Rbd => {
            layers::remove_layer(clone).await?;
            if has_internal(backend, &d.image, name).await {
                RbdBackend::new(&d.image)?.delete_snapshot(name).await?;
            }
            Ok(())
        }
        Some(overlay) => remove_if_present(overlay),
        None if has_internal(backend, &d.image, name).await => {
            layers::delete_internal(backend, &d.image, name).await
        }
        None => Ok(()),
    }
}

/// The QMP transaction of a create (all disks internal, or all external); `nodes[i]` is the QMP
/// node of `disks[i]`.
async fn qmp_snapshots(
    qmp: &QmpClient,
    disks: &[DiskAction],
    nodes: &[String],
    name: &str,
) -> Result<()> {
    let external = disks.iter().filter(|d| d.overlay.is_some()).count();
    if external == 0 {
        let requests: Vec<(&str, &str)> = nodes.iter().map(|n| (n.as_str(), name)).collect();
        qonline::create_many_internal(qmp, &requests).await?;
        return Ok(());
    }
    if external != disks.len() {
        return Err(Error::unsupported(
            "internal and external disk snapshots in one QMP transaction",
        ));
    }
    let stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() % 1_000_000_000)
        .unwrap_or(0);
    let new_nodes: Vec<String> = disks
        .iter()
        .map(|d| format!("{}-{stamp}", d.vdev))
        .collect();
    let mut requests: Vec<(&str, &Path, &str)> = Vec::new();
    for ((d, node), new_node) in disks.iter().zip(nodes).zip(&new_nodes) {
        let overlay = d
            .overlay
            .as_deref()
            .ok_or_else(|| Error::invalid("external disk without overlay"))?;
        requests.push((node.as_str(), overlay, new_node.as_str()));
    }
    qonline::create_many_external(qmp, &requests).await?;
    Ok(())
}

/// Every file the domain's records point at for `vdev`: snapshot layers and images, the current
/// active file.
pub fn tracked_files(rec: &DomainRecord, vdev: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = Vec::new();
    for snap in &rec.snapshots {
        for disk in snap.disks.iter().filter(|d| d.vdev == vdev) {
            if !files.contains(&disk.path) {
                files.push(disk.path.clone());
            }
        }
    }
    if let Some(disk) = rec.config.disk(vdev) {
        let active = PathBuf::from(&disk.target);
        if !files.contains(&active) {
            files.push(active);
        }
    }
    files
}

/// Locks a defined domain and settles an operation a killed snapctl left half-done (see the
/// module documentation); returns the lock and the current record.
pub async fn open_domain(ctx: &Ctx, domain: &str) -> Result<(DomainLock, DomainRecord)> {
    crate::store::validate_name("domain", domain)?;
    let lock = ctx.lock(domain)?;
    let rec = crate::domain::load_defined(&lock, domain)?;
    let rec = settle(ctx, &lock, rec).await?;
    Ok((lock, rec))
}

/// Settles an operation a killed snapctl left in the domain's journal, if any; returns the
/// record as it is afterwards.
pub async fn settle(ctx: &Ctx, lock: &DomainLock, rec: DomainRecord) -> Result<DomainRecord> {
    match lock.load_file::<Journal>(JOURNAL_FILE)? {
        Some(journal) => recover(ctx, lock, rec, journal).await,
        None => Ok(rec),
    }
}

/// Whether the domain has an operation to settle (for read-only commands).
pub fn has_journal(ctx: &Ctx, domain: &str) -> bool {
    ctx.store.domain_dir(domain).join(JOURNAL_FILE).exists()
}

async fn recover(
    ctx: &Ctx,
    lock: &DomainLock,
    rec: DomainRecord,
    journal: Journal,
) -> Result<DomainRecord> {
    let driver = ctx.driver_for(&rec)?;
    let what = format!("snapshot {} {}", journal.operation, journal.snapshot);
    let operation = journal.operation.clone();
    let done = journal.done;
    let mut exec = Exec::new(lock, rec, driver, None, journal);
    if operation == "create" {
        let last_disk = exec
            .journal
            .steps
            .iter()
            .rposition(Step::takes_snapshots)
            .unwrap_or(0);
        let committed = done > last_disk || exec.snapshots_taken().await;
        if !committed {
            exec.roll_back_create(last_disk).await?;
            eprintln!(
                "snapctl: note: rolled back the interrupted `{what}` (its disk snapshots were not all taken)"
            );
            return Ok(exec.rec);
        }
        exec.journal.done = exec.journal.done.max(last_disk + 1);
        let keep_going = exec.journal.done;
        exec.run(keep_going)
            .await
            .map_err(|(_, e)| e.context(format!("finishing the interrupted `{what}`")))?;
        eprintln!(
            "snapctl: note: finished the interrupted `{what}` (its disk snapshots were taken)"
        );
        return Ok(exec.rec);
    }
    exec.run(0)
        .await
        .map_err(|(_, e)| e.context(format!("finishing the interrupted `{what}`")))?;
    eprintln!("snapctl: note: finished the interrupted `{what}`");
    Ok(exec.rec)
}

/// The timestamp journals carry.
pub fn now() -> String {
    crate::store::timestamp_now()
}
