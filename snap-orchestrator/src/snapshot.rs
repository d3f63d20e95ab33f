//! Domain snapshots: `snapctl snapshot create|revert|delete|list|info`.
//!
//! Every operation runs under the domain's lock and in two phases: it first builds a [`Plan`]
//! (checking everything it can: names, the domain's state, every disk's backend and files,
//! space), which `--dry-run` prints; then it executes the plan's steps in order, saving the
//! metadata after each step that changes what the store must know. Anything refused in the
//! first phase changes nothing.
//!
//! Disks: a qcow2 disk gets an internal snapshot (or, with `--external`, a new overlay); a VHD
//! disk a differencing child; an LV a snapshot LV. While the domain runs, its disks are QEMU's:
//! qcow2 snapshots go through one QMP `transaction` (all disks or none), layer merges through
//! block jobs. A snapshot's `disks[].path` is where its state lives: the frozen layer of an
//! external snapshot, the image holding an internal one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use snap_core::{Error, ErrorKind, Result};

use snap_backend_rbd::{RbdBackend, RbdSpec};

use crate::disk::human_size;
use crate::domain::Ctx;
use crate::exec::{self, DiskAction, Exec, Journal, Step};
use crate::hypervisor::LiveState;
use crate::layers::{self, Backend};
use crate::qga::GuestAgent;
use crate::store::{
    self, Consistency, DiskKind, DomainRecord, DomainState, SnapshotDisk, SnapshotRecord,
};

/// How long the guest agent has to answer before a quiesce is refused.
const AGENT_TIMEOUT: Duration = Duration::from_secs(5);

/// A plan: what an operation will do, step by step, and what it costs.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// One line per step, in execution order.
    pub steps: Vec<String>,
    /// Bytes the operation copies (layer merges, memory image).
    pub bytes_to_copy: u64,
    /// Extra space the operation needs at most.
    pub space_needed: u64,
    /// How long the guest is expected to be stopped.
    pub pause_window: String,
}

impl Plan {
    /// A plan listing `steps`.
    pub fn of(steps: &[Step]) -> Plan {
        Plan {
            steps: steps.iter().map(Step::describe).collect(),
            ..Plan::default()
        }
    }

    /// Prints the plan (for `--dry-run`).
    pub fn print(&self, title: &str) {
        println!("plan: {title}");
        for (i, step) in self.steps.iter().enumerate() {
            println!("  {}. {step}", i + 1);
        }
        println!(
            "  bytes to copy: {}; space needed: up to {}; pause window: {}",
            human_size(self.bytes_to_copy),
            human_size(self.space_needed),
            self.pause_window
        );
        println!("nothing changed (--dry-run)");
    }
}

/// Whether a live state lets us operate; the error names what is going on.
fn usable(domain: &str, state: &LiveState) -> Result<()> {
    match state {
        LiveState::Busy(what) => Err(Error::new(
            ErrorKind::InUse,
            format!("domain {domain} is {what}; try again when it is running, paused or shut off"),
        )),
        _ => Ok(()),
    }
}

fn stored_state(state: &LiveState) -> DomainState {
    match state {
        LiveState::Running => DomainState::Running,
        LiveState::Paused => DomainState::Paused,
        _ => DomainState::Shutoff,
    }
}

/// The external snapshot of `vdev` whose frozen layer `path` is, if any.
fn frozen_by(rec: &DomainRecord, vdev: &str, path: &Path) -> Option<String> {
    rec.snapshots
        .iter()
        .find(|s| {
            s.disks.iter().any(|d| {
                d.vdev == vdev && d.kind == DiskKind::External && layers::same_file(&d.path, path)
            })
        })
        .map(|s| s.name.clone())
}

/// Whether a snapshot record points at `path` for `vdev` (as layer or internal holder).
fn referenced(rec: &DomainRecord, vdev: &str, path: &Path) -> bool {
    rec.snapshots.iter().any(|s| {
        s.disks
            .iter()
            .any(|d| d.vdev == vdev && layers::same_file(&d.path, path))
    })
}

// ---------------------------------------------------------------------------------------------
// create

/// Options of `snapshot create`.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Save memory while the guest runs.
    pub live: bool,
    /// Save no memory.
    pub disk_only: bool,
    /// External disk snapshots (new overlays).
    pub external: bool,
    /// Freeze guest file systems around the disk snapshots.
    pub quiesce: bool,
    /// Free text.
    pub description: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Memory {
    None,
    Live,
    NonLive,
}

/// One disk's part of a create.
#[derive(Debug, Clone)]
struct DiskCreate {
    vdev: String,
    backend: Backend,
    kind: DiskKind,
    /// The active file now (becomes the frozen layer of an external snapshot).
    image: PathBuf,
    /// External: the new active overlay.
    overlay: Option<PathBuf>,
    /// Through QMP (the disk is open in the running QEMU).
    online: bool,
}

/// `snapshot create`.
pub async fn create(ctx: &Ctx, domain: &str, name: &str, opts: &CreateOptions) -> Result<u8> {
    store::validate_name("snapshot", name)?;
    let (lock, rec) = exec::open_domain(ctx, domain).await?;
    if rec.snapshot(name).is_some() {
        return Err(Error::new(
            ErrorKind::Exists,
            format!("domain {domain} already has a snapshot named {name:?}"),
        ));
    }
    let driver = ctx.driver_for(&rec)?;
    let state = driver.state(&rec).await?;
    usable(domain, &state)?;
    let live_domain = matches!(state, LiveState::Running | LiveState::Paused);

    let memory = match state {
        LiveState::Running if opts.disk_only => Memory::None,
        LiveState::Running if opts.live => Memory::Live,
        LiveState::Running => Memory::NonLive,
        LiveState::Paused if !opts.disk_only => Memory::NonLive,
        _ => Memory::None,
    };
    if opts.quiesce {
        if state != LiveState::Running {
            return Err(Error::invalid(format!(
                "--quiesce needs the guest agent of a running guest; domain {domain} is {}",
                state.as_str()
            )));
        }
        if memory != Memory::None {
            return Err(Error::invalid(
                "--quiesce is for disk-only snapshots (add --disk-only); a snapshot with memory \
                 is consistent by itself",
            ));
        }
    }

    // Every disk: backend, kind, files; refused here if anything does not fit.
    let names: Vec<&str> = rec
        .snapshots
        .iter()
        .map(|s| s.name.as_str())
        .chain([name])
        .collect();
    let mut disks: Vec<DiskCreate> = Vec::new();
    let mut taken: Vec<PathBuf> = Vec::new();
    for disk in rec.config.disks.iter().filter(|d| layers::snapshotted(d)) {
        let backend = layers::classify(disk)?;
        let image = PathBuf::from(&disk.target);
        let kind = match backend {
            Backend::Qcow2 | Backend::Rbd if opts.external => DiskKind::External,
            Backend::Vhd => DiskKind::External,
            _ => DiskKind::Internal,
        };
        let online = live_domain && backend != Backend::Lvm && driver.disk_via_qmp(disk);
        // RBD: QEMU's rbd driver takes the image's own snapshots (blockdev-snapshot-internal-sync).
        if online && !matches!(backend, Backend::Qcow2 | Backend::Rbd) {
            return Err(Error::unsupported(format!(
                "disk {}: {} disks of a running QEMU domain cannot be snapshotted through QEMU \
                 (it makes qcow2 overlays only); shut the domain off first or convert the disk \
                 to qcow2",
                disk.vdev,
                backend.as_str()
            )));
        }
        if backend == Backend::Lvm && !layers::have_device_mapper() {
            return Err(Error::unsupported(format!(
                "disk {}: an LV snapshot needs device-mapper, which this kernel does not have",
                disk.vdev
            )));
        }
        if backend == Backend::Rbd || backend == Backend::Qcow2 && kind == DiskKind::Internal {
            // (An RBD external snapshot is an RBD snapshot too, which the clone hangs off.)
            let listing = layers::listing(backend, &image).await?;
            if listing
                .snapshots
                .iter()
                .any(|s| s.name == name || s.id == name)
            {
                return Err(Error::new(
                    ErrorKind::Exists,
                    format!(
                        "disk {}: the image already has an internal snapshot named {name:?}",
                        disk.vdev
                    ),
                )
                .with_path(&image));
            }
        }
        let overlay = match (kind, backend) {
            (DiskKind::External, Backend::Rbd) => {
                let path = layers::fresh_rbd_overlay(&image, name, &names, &taken)
                    .await
                    .map_err(|e| e.context(format!("disk {}", disk.vdev)))?;
                // The clone can be made (layering, names): checked now, not in the pause.
                RbdBackend::new(&image)?
                    .plan_clone(name, Some(&RbdSpec::from_path(&path)?))
                    .await
                    .map_err(|e| e.context(format!("disk {}", disk.vdev)))?;
                taken.push(path.clone());
                Some(path)
            }
            (DiskKind::External, _) => {
                let root = layers::stem_root(&image, &names);
                let path = layers::fresh_overlay(&image, &root, name, &taken);
                taken.push(path.clone());
                Some(path)
            }
            _ => None,
        };
        disks.push(DiskCreate {
            vdev: disk.vdev.clone(),
            backend,
            kind,
            image,
            overlay,
            online,
        });
    }
    if disks.is_empty() {
        return Err(Error::invalid(format!(
            "domain {domain} has no writable disk to snapshot"
        )));
    }
    let memory_path = (memory != Memory::None).then(|| ctx.store.memory_path(domain, name));
    if let Some(path) = &memory_path
        && path.exists()
    {
        return Err(Error::new(
            ErrorKind::Exists,
            "a memory image for this snapshot name is left over from earlier; remove it first",
        )
        .with_path(path));
    }

    // The plan. An RBD disk moves to its clone with the guest paused (as do LV snapshots).
    let switches = |d: &DiskCreate| d.online && d.backend == Backend::Rbd && d.overlay.is_some();
    let offline_lv = disks.iter().any(|d| !d.online) && state == LiveState::Running;
    let rbd_switch = disks.iter().any(switches) && state == LiveState::Running;
    let pauses = memory == Memory::NonLive && state == LiveState::Running
        || (memory == Memory::None && (offline_lv || rbd_switch));
    let action = |d: &DiskCreate| DiskAction {
        vdev: d.vdev.clone(),
        backend: d.backend.as_str().to_string(),
        kind: d.kind,
        image: d.image.clone(),
        overlay: d.overlay.clone(),
    };
    let mut steps = Vec::new();
    if opts.quiesce {
        steps.push(Step::Freeze);
    }
    if pauses {
        steps.push(Step::Pause);
    }
    if let Some(path) = &memory_path {
        steps.push(Step::SaveMemory {
            path: path.clone(),
            live: memory == Memory::Live,
        });
    }
    let qmp_disks: Vec<DiskAction> = disks
        .iter()
        .filter(|d| d.online && !switches(d))
        .map(action)
        .collect();
    if live_domain
        && (memory != Memory::None || state == LiveState::Paused)
        && disks.iter().any(|d| d.online)
    {
        steps.push(Step::ActivateDisks);
    }
    // RBD switches first: they can be undone if the transaction after them fails.
    for d in disks.iter().filter(|d| switches(d)) {
        steps.push(Step::SwitchRbd {
            name: name.to_string(),
            disk: action(d),
        });
    }
    if !qmp_disks.is_empty() {
        steps.push(Step::QmpSnapshots {
            name: name.to_string(),
            disks: qmp_disks,
        });
    }
    for d in disks.iter().filter(|d| !d.online) {
        steps.push(Step::OfflineSnapshot {
            name: name.to_string(),
            disk: action(d),
        });
    }
    if state == LiveState::Running && (pauses || memory != Memory::None) {
        steps.push(Step::Resume);
    }
    if opts.quiesce {
        steps.push(Step::Thaw);
    }
    let snapshot = SnapshotRecord {
        name: name.to_string(),
        parent: rec.current.clone(),
        created: store::timestamp_now(),
        description: opts.description.clone(),
        state: stored_state(&state),
        memory: memory_path.clone(),
        consistency: if memory != Memory::None {
            Consistency::Memory
        } else if opts.quiesce {
            Consistency::Quiesced
        } else {
            Consistency::Crash
        },
        // Running and never paused: no pause at all; else measured while running.
        pause_window_ms: (state == LiveState::Running && !pauses && memory == Memory::None)
            .then_some(0.0),
        config: rec.config.clone(),
        disks: disks
            .iter()
            .map(|d| SnapshotDisk {
                vdev: d.vdev.clone(),
                backend: d.backend.as_str().to_string(),
                kind: d.kind,
                path: d.image.clone(),
                // An RBD external snapshot keeps its state in the image's snapshot, which the
                // clone hangs off.
                snapshot: (d.kind == DiskKind::Internal || d.backend == Backend::Rbd)
                    .then(|| name.to_string()),
            })
            .collect(),
    };
    let targets: Vec<(String, PathBuf)> = disks
        .iter()
        .filter_map(|d| d.overlay.clone().map(|o| (d.vdev.clone(), o)))
        .collect();
    steps.push(Step::RecordCreate {
        snapshot: Box::new(snapshot),
        targets,
    });
    let mut plan = Plan::of(&steps);
    if memory_path.is_some() {
        let ram = rec.config.memory_mib.saturating_mul(1 << 20);
        plan.space_needed = plan.space_needed.saturating_add(ram);
        plan.bytes_to_copy = plan.bytes_to_copy.saturating_add(ram);
    }
    plan.pause_window = match (state.clone(), memory) {
        (LiveState::Running, Memory::Live) if rbd_switch => {
            "the final stage of the live save, then the RBD snapshots and clones".into()
        }
        (LiveState::Running, Memory::Live) => {
            "the final stage of the live save (tens of ms)".into()
        }
        (LiveState::Running, Memory::NonLive) => "the whole memory save".into(),
        (LiveState::Running, Memory::None) if offline_lv => "the LV snapshots".into(),
        (LiveState::Running, Memory::None) if pauses => {
            "the RBD snapshots and clones (QEMU moves each disk to its clone)".into()
        }
        (LiveState::Running, Memory::None) => "none (one atomic QMP transaction)".into(),
        _ => "none (the guest is not running)".into(),
    };
    if ctx.dry_run {
        plan.print(&format!("snapshot create {domain} {name}"));
        return Ok(0);
    }

    // Execute.
    let ctl = if live_domain {
        Some(driver.attach(&rec).await?)
    } else {
        None
    };
    let agent = if opts.quiesce {
        let socket = ctl
            .as_ref()
            .and_then(|c| c.guest_agent())
            .ok_or_else(|| Error::unsupported("this domain has no guest agent channel"))?;
        Some(
            GuestAgent::connect(&socket, AGENT_TIMEOUT)
                .await
                .map_err(|e| {
                    Error::new(
                        ErrorKind::Unsupported,
                        format!(
                            "cannot quiesce domain {domain}: {}; nothing was changed — run \
                             without --quiesce for a crash-consistent disk-only snapshot",
                            e.message()
                        ),
                    )
                })?,
        )
    } else {
        None
    };
    let journal = Journal::new("create", name, state == LiveState::Running, steps);
    let last_disk = journal
        .steps
        .iter()
        .rposition(Step::takes_snapshots)
        .unwrap_or(0);
    let mut exec = Exec::new(&lock, rec, driver, ctl, journal);
    exec.set_agent(agent);
    match exec.run(last_disk + 1).await {
        Ok(()) => {}
        Err((index, e)) if index <= last_disk => {
            if let Err(undo) = exec.roll_back_create(index).await {
                eprintln!("snapctl: warning: {undo}");
            }
            return Err(e);
        }
        Err((_, e)) => {
            return Err(e.context(format!("snapshot {name} was taken and recorded, but")));
        }
    }
    let window = exec.rec.snapshot(name).and_then(|s| s.pause_window_ms);
    let mut line = format!(
        "snapshot {name} of domain {domain} created: {} disk(s){}",
        disks.len(),
        match memory {
            Memory::Live => ", memory saved live",
            Memory::NonLive => ", memory saved",
            Memory::None => ", disk only",
        }
    );
    if let Some(ms) = window {
        line.push_str(&format!(", guest paused {ms:.1} ms"));
    }
    println!("{line}");
    for d in &disks {
        if let Some(overlay) = &d.overlay {
            println!("  {}: active layer now {}", d.vdev, overlay.display());
        }
    }
    Ok(0)
}

// ---------------------------------------------------------------------------------------------
// revert

/// Where a revert leaves the domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndState {
    /// As the snapshot was taken (running / paused / shut off).
    Snapshot,
    /// Running.
    Running,
    /// Paused.
    Paused,
}

#[derive(Debug, Clone)]
enum DiskRevert {
    /// Revert the internal snapshot in place; the image becomes the active file.
    Internal { image: PathBuf },
    /// A new empty overlay on the frozen layer (an RBD image: a clone of its `snapshot`)
    /// becomes the active file.
    Overlay {
        layer: PathBuf,
        overlay: PathBuf,
        snapshot: String,
    },
}

#[derive(Debug, Clone)]
struct RevertDisk {
    vdev: String,
    backend: Backend,
    action: DiskRevert,
    /// The active file before, to remove after the switch (when nothing else needs it).
    drop_old: Option<PathBuf>,
}

impl RevertDisk {
    fn new_active(&self) -> &Path {
        match &self.action {
            DiskRevert::Internal { image } => image,
            DiskRevert::Overlay { overlay, .. } => overlay,
        }
    }
}

/// `snapshot revert`.
pub async fn revert(ctx: &Ctx, domain: &str, name: &str, end: EndState) -> Result<u8> {
    let (lock, rec) = exec::open_domain(ctx, domain).await?;
    let snap = rec.get(name)?.clone();
    let driver = ctx.driver_for(&rec)?;
    let state = driver.state(&rec).await?;
    usable(domain, &state)?;
    let target = match end {
        EndState::Running => DomainState::Running,
        EndState::Paused => DomainState::Paused,
        EndState::Snapshot => snap.state,
    };
    let restore = snap
        .memory
        .clone()
        .filter(|_| target != DomainState::Shutoff);
    if let Some(memory) = &restore
        && !memory.exists()
    {
        return Err(
            Error::not_found(format!("snapshot {name}'s memory image is missing"))
                .with_path(memory),
        );
    }

    let names: Vec<&str> = rec.snapshots.iter().map(|s| s.name.as_str()).collect();
    let mut taken: Vec<PathBuf> = Vec::new();
    let mut disks: Vec<RevertDisk> = Vec::new();
    for d in &snap.disks {
        let backend = Backend::parse(&d.backend)?;
        let active = rec.config.disk(&d.vdev).map(|s| PathBuf::from(&s.target));
        let action = match d.kind {
            DiskKind::Internal => {
                // (An RBD image's snapshots never change: rolling back the image leaves the
                // snapshot clones of an external snapshot hang off alone.)
                if let Some(other) = frozen_by(&rec, &d.vdev, &d.path)
                    && backend != Backend::Rbd
                {
                    return Err(Error::unsupported(format!(
                        "disk {}: snapshot {name}'s internal snapshot lives in {}, which is now \
                         the frozen layer of external snapshot {other}; reverting it in place \
                         would change {other} — delete {other} first",
                        d.vdev,
                        d.path.display()
                    )));
                }
                if backend == Backend::Lvm && !layers::have_device_mapper() {
                    return Err(Error::unsupported(format!(
                        "disk {}: reverting an LV snapshot merges it, which needs device-mapper \
                         (not in this kernel); nothing was changed",
                        d.vdev
                    )));
                }
                if !d.path.exists() && !matches!(backend, Backend::Lvm | Backend::Rbd) {
                    return Err(Error::not_found(format!("disk {}: image missing", d.vdev))
                        .with_path(&d.path));
                }
                DiskRevert::Internal {
                    image: d.path.clone(),
                }
            }
            DiskKind::External if backend == Backend::Rbd => {
                // A new clone of the image's snapshot becomes the disk.
                let inner = d.snapshot.clone().unwrap_or_else(|| name.to_string());
                if !layers::rbd_has_snapshot(&d.path, &inner).await? {
                    return Err(Error::not_found(format!(
                        "disk {}: snapshot {name}'s RBD snapshot {inner} is missing",
                        d.vdev
                    ))
                    .with_path(&d.path));
                }
                let overlay = layers::fresh_rbd_overlay(&d.path, name, &names, &taken).await?;
                taken.push(overlay.clone());
                DiskRevert::Overlay {
                    layer: d.path.clone(),
                    overlay,
                    snapshot: inner,
                }
            }
            DiskKind::External => {
                if !d.path.exists() {
                    return Err(Error::not_found(format!(
                        "disk {}: snapshot {name}'s layer is missing",
                        d.vdev
                    ))
                    .with_path(&d.path));
                }
                let root = layers::stem_root(&d.path, &names);
                let overlay = layers::fresh_overlay(&d.path, &root, name, &taken);
                taken.push(overlay.clone());
                DiskRevert::Overlay {
                    layer: d.path.clone(),
                    overlay,
                    snapshot: name.to_string(),
                }
            }
        };
        // The old active file goes when nothing else needs it.
        let drop_old = match &active {
            Some(old)
                if !referenced(&rec, &d.vdev, old)
                    && !matches!(&action, DiskRevert::Internal { image } if layers::same_file(image, old))
                    && (old.exists() || backend == Backend::Rbd) =>
            {
                let holds_snapshots = layers::listing(backend, old)
                    .await
                    .map(|l| !l.snapshots.is_empty())
                    .unwrap_or(true);
                let users = layers::untracked_users(backend, old, &[]).await;
                (!holds_snapshots && users.is_empty()).then(|| old.to_path_buf())
            }
            _ => None,
        };
        disks.push(RevertDisk {
            vdev: d.vdev.clone(),
            backend,
            action,
            drop_old,
        });
    }

    let mut steps = Vec::new();
    if matches!(state, LiveState::Running | LiveState::Paused) {
        steps.push(Step::Destroy);
    }
    for d in &disks {
        steps.push(match &d.action {
            DiskRevert::Internal { image } => Step::RevertInternal {
                vdev: d.vdev.clone(),
                backend: d.backend.as_str().to_string(),
                image: image.clone(),
                name: name.to_string(),
            },
            DiskRevert::Overlay {
                layer,
                overlay,
                snapshot,
            } => Step::NewOverlay {
                vdev: d.vdev.clone(),
                backend: d.backend.as_str().to_string(),
                layer: layer.clone(),
                overlay: overlay.clone(),
                name: snapshot.clone(),
            },
        });
    }
    // The domain's config becomes the snapshot's, on the new active files.
    let mut config = snap.config.clone();
    for d in &disks {
        if let Some(spec) = config.disks.iter_mut().find(|s| s.vdev == d.vdev) {
            spec.target = d.new_active().to_string_lossy().into_owned();
        }
    }
    steps.push(Step::RecordRevert {
        name: name.to_string(),
        config: Box::new(config),
    });
    for d in &disks {
        if let Some(old) = &d.drop_old {
            steps.push(Step::RemoveFile { path: old.clone() });
        }
    }
    if target != DomainState::Shutoff {
        steps.push(Step::Start {
            memory: restore.clone(),
            running: target == DomainState::Running,
        });
    }
    let mut plan = Plan::of(&steps);
    if target == DomainState::Shutoff {
        plan.steps.push("leave the domain shut off".into());
    }
    plan.pause_window = "none (the domain restarts)".into();
    if ctx.dry_run {
        plan.print(&format!("snapshot revert {domain} {name}"));
        return Ok(0);
    }
    let journal = Journal::new("revert", name, state == LiveState::Running, steps);
    exec::finish(&lock, rec, driver, journal).await?;
    println!(
        "domain {domain} reverted to snapshot {name}; it is {}",
        match target {
            DomainState::Running => "running",
            DomainState::Paused => "paused",
            DomainState::Shutoff => "shut off",
        }
    );
    Ok(0)
}

// ---------------------------------------------------------------------------------------------
// delete

/// Options of `snapshot delete`.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeleteOptions {
    /// Also delete its descendants.
    pub children: bool,
    /// Delete only its descendants.
    pub children_only: bool,
    /// Forget the records, keep the disks.
    pub metadata_only: bool,
}

#[derive(Debug, Clone)]
enum DiskDelete {
    /// Delete an internal snapshot (online through QMP on `node` when the image is the active
    /// layer of the running QEMU).
    Internal { image: PathBuf, name: String },
    /// Keep the layer: clones of this snapshot read through it.
    Keep { layer: PathBuf, users: Vec<String> },
    /// An RBD external snapshot: flatten the clones of `image@snapshot`, remove the snapshot,
    /// then the image when nothing needs it any more.
    RbdLayer {
        image: PathBuf,
        snapshot: String,
        clones: Vec<PathBuf>,
        remove_image: bool,
        bytes: u64,
    },
    /// Merge a frozen layer into each child, then remove it.
    Layer {
        layer: PathBuf,
        children: Vec<(PathBuf, bool)>,
        bytes: u64,
    },
}

#[derive(Debug, Clone)]
struct DeleteDisk {
    vdev: String,
    backend: Backend,
    action: DiskDelete,
}

/// `snapshot delete`.
pub async fn delete(ctx: &Ctx, domain: &str, name: &str, opts: DeleteOptions) -> Result<u8> {
    let (lock, rec) = exec::open_domain(ctx, domain).await?;
    rec.get(name)?;
    let targets: Vec<String> = if opts.children || opts.children_only {
        let mut t = rec.descendants(name);
        if opts.children_only && t.is_empty() {
            return Err(Error::invalid(format!(
                "snapshot {name} of domain {domain} has no children; nothing to delete"
            )));
        }
        if !opts.children_only {
            t.push(name.to_string());
        }
        t
    } else {
        vec![name.to_string()]
    };
    let driver = ctx.driver_for(&rec)?;
    let state = driver.state(&rec).await?;
    usable(domain, &state)?;
    let live_domain = matches!(state, LiveState::Running | LiveState::Paused);

    if opts.metadata_only {
        let mut steps = Vec::new();
        for t in &targets {
            steps.push(Step::ForgetSnapshot { name: t.clone() });
            if let Some(memory) = rec.get(t)?.memory.clone() {
                steps.push(Step::RemoveMemory { path: memory });
            }
        }
        let mut plan = Plan::of(&steps);
        plan.steps
            .push("(the snapshots' disk snapshots and layers stay on disk)".into());
        plan.pause_window = "none".into();
        if ctx.dry_run {
            plan.print(&format!("snapshot delete {domain} {name} --metadata-only"));
            return Ok(0);
        }
        let journal = Journal::new("delete", name, state == LiveState::Running, steps);
        Exec::new(&lock, rec, driver, None, journal)
            .run(0)
            .await
            .map_err(|(_, e)| e)?;
        println!(
            "forgot {} snapshot(s) of domain {domain}: {} (disks untouched)",
            targets.len(),
            targets.join(", ")
        );
        return Ok(0);
    }

    // Plan every target on the record as it will be when its turn comes (descendants first).
    let registry = crate::clone::CloneRegistry::load(&lock)?;
    let clone_users = |layer: &Path| registry.users(layer, &ctx.store);
    let mut sim = rec.clone();
    let mut per_target: Vec<(String, Vec<DeleteDisk>)> = Vec::new();
    // RBD images that earlier targets' plans remove (their clones need no flatten).
    let mut doomed: Vec<PathBuf> = Vec::new();
    for t in &targets {
        let snap = sim.get(t)?.clone();
        let mut disks = Vec::new();
        for d in &snap.disks {
            let backend = Backend::parse(&d.backend)?;
            let active = sim.config.disk(&d.vdev).map(|s| PathBuf::from(&s.target));
            let via_qmp = sim
                .config
                .disk(&d.vdev)
                .is_some_and(|s| driver.disk_via_qmp(s));
            let running_chain = if live_domain && via_qmp {
                match &active {
                    Some(a) => {
                        let mut chain = vec![a.clone()];
                        if let Ok(l) = layers::listing(backend, a).await {
                            chain.extend(l.chain.into_iter().map(|c| c.path));
                        }
                        chain
                    }
                    None => Vec::new(),
                }
            } else {
                Vec::new()
            };
            let in_qemu = |p: &Path| running_chain.iter().any(|c| layers::same_file(c, p));
            // Where clones of this snapshot hang off (an RBD snapshot, or the frozen layer):
            // kept, not deleted, while clones use it.
            let clone_layer = match (d.kind, backend) {
                (_, Backend::Rbd) => Some(crate::clone::rbd_layer(
                    &d.path,
                    d.snapshot.as_deref().unwrap_or(t),
                )?),
                (DiskKind::External, _) => Some(d.path.clone()),
                _ => None,
            };
            let users = clone_layer.as_deref().map(clone_users).unwrap_or_default();
            let action = match (d.kind, clone_layer) {
                (_, Some(layer)) if !users.is_empty() => DiskDelete::Keep { layer, users },
                (DiskKind::Internal, _) => {
                    let inner = d.snapshot.clone().unwrap_or_else(|| t.clone());
                    let online = in_qemu(&d.path);
                    if online
                        && active
                            .as_deref()
                            .is_some_and(|a| !layers::same_file(a, &d.path))
                    {
                        return Err(Error::unsupported(format!(
                            "disk {}: snapshot {t}'s internal snapshot lives in {}, which the \
                             running domain has open read-only as a backing layer; delete it \
                             with the domain shut off",
                            d.vdev,
                            d.path.display()
                        )));
                    }
                    if backend == Backend::Lvm && !layers::have_device_mapper() {
                        return Err(Error::unsupported(format!(
                            "disk {}: removing an LV snapshot needs device-mapper, which this \
                             kernel does not have",
                            d.vdev
                        )));
                    }
                    DiskDelete::Internal {
                        image: d.path.clone(),
                        name: inner,
                    }
                }
                (DiskKind::External, _) if backend == Backend::Rbd => {
                    let inner = d.snapshot.clone().unwrap_or_else(|| t.clone());
                    let action = plan_rbd_layer(
                        &sim,
                        t,
                        &d.vdev,
                        &d.path,
                        &inner,
                        active.as_deref(),
                        &doomed,
                    )
                    .await?;
                    if let DiskDelete::RbdLayer {
                        image,
                        remove_image: true,
                        ..
                    } = &action
                    {
                        doomed.push(image.clone());
                    }
                    action
                }
                (DiskKind::External, _) => {
                    if !d.path.exists() {
                        return Err(Error::not_found(format!(
                            "disk {}: snapshot {t}'s layer is missing",
                            d.vdev
                        ))
                        .with_path(&d.path));
                    }
                    let listing = layers::listing(backend, &d.path).await?;
                    if !listing.snapshots.is_empty() {
                        return Err(Error::unsupported(format!(
                            "disk {}: snapshot {t}'s layer {} also holds {} internal \
                             snapshot(s) (e.g. {}); merging it away would drop them — delete \
                             those first",
                            d.vdev,
                            d.path.display(),
                            listing.snapshots.len(),
                            listing
                                .snapshots
                                .first()
                                .map(|s| s.name.as_str())
                                .unwrap_or("?")
                        )));
                    }
                    let files = exec::tracked_files(&sim, &d.vdev);
                    let children = layers::children_of(backend, &d.path, &files).await?;
                    let untracked = layers::untracked_users(backend, &d.path, &files).await;
                    if !untracked.is_empty() {
                        return Err(Error::unsupported(format!(
                            "disk {}: {} also backs {} image(s) snapctl does not track (e.g. \
                             {}); refusing to merge it away",
                            d.vdev,
                            d.path.display(),
                            untracked.len(),
                            untracked
                                .first()
                                .map(|p| p.display().to_string())
                                .unwrap_or_default()
                        )));
                    }
                    let mut with_mode = Vec::new();
                    let mut bytes = 0u64;
                    for child in children {
                        let online = in_qemu(&child);
                        if !online {
                            let child_listing = layers::listing(backend, &child).await?;
                            if !child_listing.snapshots.is_empty() {
                                return Err(Error::unsupported(format!(
                                    "disk {}: {} holds internal snapshots that read through \
                                     {}; merging the layer would change them — delete them first",
                                    d.vdev,
                                    child.display(),
                                    d.path.display()
                                )));
                            }
                            if backend == Backend::Qcow2 {
                                let p = snap_backend_qcow2::external::plan_delete_layer(
                                    &child, &d.path,
                                )?;
                                let copied = match p.fold_bytes {
                                    Some(f) if p.folds() => f,
                                    _ => p.stream_bytes,
                                };
                                bytes = bytes.saturating_add(copied);
                            }
                        } else {
                            bytes = bytes.saturating_add(listing.virtual_size);
                        }
                        with_mode.push((child, online));
                    }
                    if with_mode.iter().any(|(_, online)| *online) && backend != Backend::Qcow2 {
                        return Err(Error::unsupported(format!(
                            "disk {}: merging {} layers of a running domain",
                            d.vdev,
                            backend.as_str()
                        )));
                    }
                    // Offline children first; the file goes after the last child.
                    with_mode.sort_by_key(|(_, online)| *online);
                    DiskDelete::Layer {
                        layer: d.path.clone(),
                        children: with_mode,
                        bytes,
                    }
                }
            };
            disks.push(DeleteDisk {
                vdev: d.vdev.clone(),
                backend,
                action,
            });
        }
        sim.remove_snapshot(t)?;
        per_target.push((t.clone(), disks));
    }

    let mut steps = Vec::new();
    let mut kept: Vec<String> = Vec::new();
    let mut bytes_total = 0u64;
    for (t, disks) in &per_target {
        for d in disks {
            let backend = d.backend.as_str().to_string();
            match &d.action {
                DiskDelete::Keep { layer, users } => {
                    kept.push(format!(
                        "{t}/{}: kept layer {} — clones {} read through it",
                        d.vdev,
                        layer.display(),
                        users.join(", ")
                    ));
                }
                DiskDelete::RbdLayer {
                    image,
                    snapshot,
                    clones,
                    remove_image,
                    bytes,
                } => {
                    bytes_total = bytes_total.saturating_add(*bytes);
                    for clone in clones {
                        steps.push(Step::FlattenRbd {
                            vdev: d.vdev.clone(),
                            image: clone.clone(),
                        });
                    }
                    steps.push(Step::DeleteRbdSnapshot {
                        vdev: d.vdev.clone(),
                        image: image.clone(),
                        name: snapshot.clone(),
                    });
                    if *remove_image {
                        steps.push(Step::RemoveLayer {
                            vdev: d.vdev.clone(),
                            backend,
                            layer: image.clone(),
                        });
                    }
                }
                DiskDelete::Internal { image, name: inner } => {
                    steps.push(Step::DeleteInternal {
                        vdev: d.vdev.clone(),
                        backend,
                        image: image.clone(),
                        name: inner.clone(),
                    });
                }
                DiskDelete::Layer {
                    layer,
                    children,
                    bytes,
                } => {
                    bytes_total = bytes_total.saturating_add(*bytes);
                    for (child, _) in children {
                        steps.push(Step::MergeLayer {
                            vdev: d.vdev.clone(),
                            backend: backend.clone(),
                            layer: layer.clone(),
                            child: child.clone(),
                        });
                    }
                    steps.push(Step::RemoveLayer {
                        vdev: d.vdev.clone(),
                        backend,
                        layer: layer.clone(),
                    });
                }
            }
        }
        if let Some(memory) = rec.get(t)?.memory.clone() {
            steps.push(Step::RemoveMemory { path: memory });
        }
        steps.push(Step::ForgetSnapshot { name: t.clone() });
    }
    let mut plan = Plan::of(&steps);
    plan.steps.extend(kept.iter().cloned());
    plan.bytes_to_copy = bytes_total;
    plan.space_needed = bytes_total;
    plan.pause_window = "none".into();
    if ctx.dry_run {
        plan.print(&format!("snapshot delete {domain} {name}"));
        return Ok(0);
    }
    let journal = Journal::new("delete", name, state == LiveState::Running, steps);
    exec::finish(&lock, rec, driver, journal).await?;
    for t in &targets {
        println!("deleted snapshot {t} of domain {domain}");
    }
    for line in &kept {
        println!("  {line}");
    }
    Ok(0)
}

/// Plans the delete of an RBD external snapshot's disk: the clones of `image@snap` are the
/// disk's later layers (the active disk, or frozen layers of later snapshots) and are flattened;
/// then the snapshot goes, and the image too unless the domain still needs it (it is the
/// active disk, another snapshot's, or holds other snapshots). Clones snapctl does not track
/// are refused, as are tracked clones whose own snapshots would keep reading through the image.
/// Clones in `doomed` are removed by an earlier part of the same delete and left alone.
async fn plan_rbd_layer(
    rec: &DomainRecord,
    t: &str,
    vdev: &str,
    image: &Path,
    snap: &str,
    active: Option<&Path>,
    doomed: &[PathBuf],
) -> Result<DiskDelete> {
    let rbd = RbdBackend::new(image)?;
    if !rbd.exists().await? {
        // Gone already (a delete that was interrupted after removing it): nothing to do.
        return Ok(DiskDelete::RbdLayer {
            image: image.to_path_buf(),
            snapshot: snap.to_string(),
            clones: Vec::new(),
            remove_image: false,
            bytes: 0,
        });
    }
    let listing = rbd.list_detailed().await?;
    let has_snap = listing.snapshots.iter().any(|s| s.name == snap);
    let clones = if has_snap {
        rbd.clones_of(snap).await?
    } else {
        Vec::new()
    };
    let files = exec::tracked_files(rec, vdev);
    let mut to_flatten = Vec::new();
    for clone in &clones {
        let path = clone.to_path();
        if doomed.iter().any(|d| layers::same_file(d, &path)) {
            continue;
        }
        if !files.iter().any(|f| layers::same_file(f, &path)) {
            return Err(Error::unsupported(format!(
                "disk {vdev}: {}@{snap} also has the clone {clone}, which snapctl does not track \
                 for this domain; refusing to flatten it away — flatten or remove it first",
                listing.image
            )));
        }
        let detail = RbdBackend::from_spec(clone.clone())?
            .list_detailed()
            .await?;
        if !detail.snapshots.is_empty() && !detail.features.iter().any(|f| f == "deep-flatten") {
            return Err(Error::unsupported(format!(
                "disk {vdev}: {clone} holds snapshots that read through {}@{snap} and lacks the \
                 deep-flatten feature, so flattening cannot free them — delete them first",
                listing.image
            )));
        }
        to_flatten.push(path);
    }
    let others_need = rec.snapshots.iter().any(|s| {
        s.name != t
            && s.disks
                .iter()
                .any(|d| d.vdev == vdev && layers::same_file(&d.path, image))
    });
    let remove_image = !others_need
        && !active.is_some_and(|a| layers::same_file(a, image))
        && listing.snapshots.iter().all(|s| s.name == snap);
    Ok(DiskDelete::RbdLayer {
        image: image.to_path_buf(),
        snapshot: snap.to_string(),
        bytes: listing.size.saturating_mul(to_flatten.len() as u64),
        clones: to_flatten,
        remove_image,
    })
}

// ---------------------------------------------------------------------------------------------
// list / info

/// `snapshot list`.
pub async fn list(ctx: &Ctx, domain: &str, tree: bool, json: bool) -> Result<u8> {
    let rec = read_defined(ctx, domain).await?;
    if json {
        println!("{}", store::list_json(&rec));
    } else if tree {
        print!("{}", store::render_tree(&rec));
    } else {
        print!("{}", store::render_table(&rec));
    }
    Ok(0)
}

/// `snapshot info`.
pub async fn info(ctx: &Ctx, domain: &str, name: &str, json: bool) -> Result<u8> {
    let rec = read_defined(ctx, domain).await?;
    let snap = rec.get(name)?;
    if json {
        println!("{}", store::snapshot_json(&rec, snap));
    } else {
        print!("{}", store::render_info(&rec, snap));
    }
    Ok(0)
}

async fn read_defined(ctx: &Ctx, domain: &str) -> Result<DomainRecord> {
    store::validate_name("domain", domain)?;
    if exec::has_journal(ctx, domain) {
        // A killed snapctl left an operation half-done: settle it first.
        return exec::open_domain(ctx, domain).await.map(|(_, rec)| rec);
    }
    ctx.store.read(domain)?.ok_or_else(|| {
        Error::not_found(format!(
            "domain {domain} is not defined here (state dir {}); start it with `snapctl domain start CFG`",
            ctx.store.root().display()
        ))
    })
}
