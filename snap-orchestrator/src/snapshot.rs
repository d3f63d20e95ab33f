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
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use snap_backend_qcow2::online::{self as qonline, OnlineDisk, StreamOptions};
use snap_core::qmp::QmpClient;
use snap_core::{Error, ErrorKind, Result};

use crate::domain::{Ctx, load_defined};
use crate::hypervisor::{Control, LiveState, StartMode, window_ms};
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
    fn step(&mut self, text: impl Into<String>) {
        self.steps.push(text.into());
    }

    /// Prints the plan (for `--dry-run`).
    pub fn print(&self, title: &str) {
        println!("plan: {title}");
        for (i, step) in self.steps.iter().enumerate() {
            println!("  {}. {step}", i + 1);
        }
        println!(
            "  bytes to copy: {}; space needed: up to {}; pause window: {}",
            human(self.bytes_to_copy),
            human(self.space_needed),
            self.pause_window
        );
        println!("nothing changed (--dry-run)");
    }
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS.get(unit).copied().unwrap_or("B"))
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_string())
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

/// Every file the domain's records point at for `vdev`: snapshot layers and images, the
/// current active file.
fn tracked_files(rec: &DomainRecord, vdev: &str) -> Vec<PathBuf> {
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

/// Whether `path` is the frozen layer of an external snapshot of `vdev` (other than `except`).
fn frozen_by(rec: &DomainRecord, vdev: &str, path: &Path, except: Option<&str>) -> Option<String> {
    rec.snapshots
        .iter()
        .filter(|s| Some(s.name.as_str()) != except)
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
    let lock = ctx.store.lock(domain)?;
    let mut rec = load_defined(&lock, domain)?;
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
            Backend::Qcow2 if opts.external => DiskKind::External,
            Backend::Vhd => DiskKind::External,
            _ => DiskKind::Internal,
        };
        let online = live_domain && backend != Backend::Lvm && driver.disk_via_qmp(disk);
        if online && backend != Backend::Qcow2 {
            return Err(Error::unsupported(format!(
                "disk {}: {} disks of a running QEMU domain cannot be snapshotted through QEMU \
                 (it makes qcow2 overlays only); shut the domain off first or convert the disk \
                 to qcow2",
                disk.vdev,
                backend.as_str()
            )));
        }
        if backend == Backend::Rbd {
            return Err(Error::unsupported(format!(
                "disk {}: RBD disks are not supported in domain snapshots yet",
                disk.vdev
            )));
        }
        if backend == Backend::Lvm && !layers::have_device_mapper() {
            return Err(Error::unsupported(format!(
                "disk {}: an LV snapshot needs device-mapper, which this kernel does not have",
                disk.vdev
            )));
        }
        if backend == Backend::Qcow2 && kind == DiskKind::Internal {
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
        let overlay = (kind == DiskKind::External).then(|| {
            let root = layers::stem_root(&image, &names);
            let path = layers::fresh_overlay(&image, &root, name, &taken);
            taken.push(path.clone());
            path
        });
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

    // The plan.
    let mut plan = Plan::default();
    if opts.quiesce {
        plan.step("freeze the guest's file systems (qemu-ga guest-fsfreeze-freeze)");
    }
    let offline_lv = disks.iter().any(|d| !d.online) && state == LiveState::Running;
    let pauses = memory == Memory::NonLive && state == LiveState::Running
        || (memory == Memory::None && offline_lv);
    if pauses {
        plan.step("pause the guest");
    }
    if let Some(path) = &memory_path {
        let ram = rec.config.memory_mib.saturating_mul(1 << 20);
        plan.space_needed = plan.space_needed.saturating_add(ram);
        plan.bytes_to_copy = plan.bytes_to_copy.saturating_add(ram);
        plan.step(format!(
            "save memory {} to {} (up to {})",
            if memory == Memory::Live {
                "while the guest runs (it stops for the final stage only)"
            } else {
                "with the guest paused"
            },
            path.display(),
            human(ram)
        ));
        plan.step("reactivate the disk images (a save hands them over inactive)");
    }
    let qmp_disks: Vec<&DiskCreate> = disks.iter().filter(|d| d.online).collect();
    if !qmp_disks.is_empty() {
        let what: Vec<String> = qmp_disks.iter().map(|d| describe_create(d, name)).collect();
        plan.step(format!(
            "one QMP transaction (all or none): {}",
            what.join("; ")
        ));
    }
    for d in disks.iter().filter(|d| !d.online) {
        plan.step(describe_create(d, name));
    }
    if pauses || memory != Memory::None && state == LiveState::Running {
        plan.step("resume the guest");
    }
    if opts.quiesce {
        plan.step("thaw the guest's file systems");
    }
    let parent = rec.current.clone();
    plan.step(format!(
        "record snapshot {name} (parent {}) as the current snapshot",
        parent.as_deref().unwrap_or("none")
    ));
    plan.pause_window = match (state.clone(), memory) {
        (LiveState::Running, Memory::Live) => {
            "the final stage of the live save (tens of ms)".into()
        }
        (LiveState::Running, Memory::NonLive) => "the whole memory save".into(),
        (LiveState::Running, Memory::None) if pauses => "the LV snapshots".into(),
        (LiveState::Running, Memory::None) => "none (one atomic QMP transaction)".into(),
        _ => "none (the guest is not running)".into(),
    };
    if ctx.dry_run {
        plan.print(&format!("snapshot create {domain} {name}"));
        return Ok(0);
    }

    // Execute.
    let mut ctl = if live_domain {
        Some(driver.attach(&rec).await?)
    } else {
        None
    };
    let mut agent = None;
    if opts.quiesce {
        let socket = ctl
            .as_ref()
            .and_then(|c| c.guest_agent())
            .ok_or_else(|| Error::unsupported("this domain has no guest agent channel"))?;
        let mut a = GuestAgent::connect(&socket, AGENT_TIMEOUT)
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "cannot quiesce domain {domain}: {}; nothing was changed — run without \
                     --quiesce for a crash-consistent disk-only snapshot",
                        e.message()
                    ),
                )
            })?;
        a.freeze().await?;
        agent = Some(a);
    }
    let outcome = create_steps(
        ctl.as_mut(),
        &disks,
        name,
        memory,
        memory_path.as_deref(),
        pauses,
        &state,
    )
    .await;
    if let Some(mut a) = agent {
        if let Err(e) = a.thaw().await {
            tracing::warn!("thawing the guest's file systems failed: {e}");
            eprintln!("snapctl: warning: thawing the guest's file systems failed: {e}");
        }
    }
    let window = outcome?;

    // Record.
    let disk_records: Vec<SnapshotDisk> = disks
        .iter()
        .map(|d| SnapshotDisk {
            vdev: d.vdev.clone(),
            backend: d.backend.as_str().to_string(),
            kind: d.kind,
            path: d.image.clone(),
            snapshot: (d.kind == DiskKind::Internal).then(|| name.to_string()),
        })
        .collect();
    let snapshot = SnapshotRecord {
        name: name.to_string(),
        parent,
        created: now_rfc3339(),
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
        pause_window_ms: window,
        config: rec.config.clone(),
        disks: disk_records,
    };
    for d in &disks {
        if let (Some(overlay), Some(spec)) = (
            &d.overlay,
            rec.config.disks.iter_mut().find(|s| s.vdev == d.vdev),
        ) {
            spec.target = overlay.to_string_lossy().into_owned();
        }
    }
    rec.add_snapshot(snapshot)?;
    rec.current = Some(name.to_string());
    lock.save(&rec)?;
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

fn describe_create(d: &DiskCreate, name: &str) -> String {
    match (&d.kind, &d.overlay, d.backend) {
        (DiskKind::External, Some(overlay), _) => format!(
            "{}: new overlay {} on {}",
            d.vdev,
            overlay.display(),
            d.image.display()
        ),
        (_, _, Backend::Lvm) => format!("{}: snapshot LV {name} of {}", d.vdev, d.image.display()),
        _ => format!(
            "{}: internal snapshot {name} in {}",
            d.vdev,
            d.image.display()
        ),
    }
}

/// The create's actions after the freeze; returns the pause window (ms).
async fn create_steps(
    mut ctl: Option<&mut Box<dyn Control>>,
    disks: &[DiskCreate],
    name: &str,
    memory: Memory,
    memory_path: Option<&Path>,
    pauses: bool,
    state: &LiveState,
) -> Result<Option<f64>> {
    let running = *state == LiveState::Running;
    let mut stopped_at: Option<SystemTime> = None;
    let mut stopped_by_us = false;
    let result = async {
        if let Some(ctl) = ctl.as_deref_mut() {
            if pauses {
                stopped_at = Some(ctl.pause().await?);
                stopped_by_us = true;
            }
            if let (Some(path), true) = (memory_path, memory != Memory::None) {
                let report = ctl.save_memory(path, memory == Memory::Live).await?;
                if running {
                    stopped_by_us = true;
                    if memory == Memory::Live {
                        stopped_at = Some(report.stopped_at);
                    }
                }
                let since = |label: &str| {
                    if let Some(s) = stopped_at {
                        tracing::debug!(
                            "{label}: {:.1} ms after the guest stopped",
                            window_ms(s, SystemTime::now())
                        );
                    }
                };
                since("memory saved");
                ctl.activate_disks().await?;
                since("disks reactivated");
            } else if *state == LiveState::Paused {
                ctl.activate_disks().await?;
            }
            let qmp = ctl.disk_qmp();
            let online: Vec<&DiskCreate> = disks.iter().filter(|d| d.online).collect();
            if !online.is_empty() {
                let qmp = qmp.ok_or_else(|| {
                    Error::unsupported("this domain's disks are not reachable over QMP")
                })?;
                qmp_create(&qmp, &online, name).await?;
                if let Some(s) = stopped_at {
                    tracing::debug!(
                        "disk snapshots taken: {:.1} ms after the guest stopped",
                        window_ms(s, SystemTime::now())
                    );
                }
            }
        }
        offline_create(disks.iter().filter(|d| !d.online), name).await
    }
    .await;
    // Resume whatever happened, if the guest ran before.
    let mut window = None;
    if let Some(ctl) = ctl {
        if running && stopped_by_us {
            match ctl.resume().await {
                Ok(resumed) => {
                    window = stopped_at.map(|s| window_ms(s, resumed));
                }
                Err(e) => {
                    if result.is_ok() {
                        return Err(
                            e.context("the snapshot was taken but the guest did not resume")
                        );
                    }
                    eprintln!("snapctl: warning: resuming the guest failed: {e}");
                }
            }
        } else if running {
            window = Some(0.0);
        }
    }
    if result.is_err()
        && let Some(path) = memory_path
    {
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_file(crate::qemu::memory_info_path(path));
    }
    result.map(|()| window)
}

/// The QMP transaction of the qcow2 disks of a running domain.
async fn qmp_create(qmp: &QmpClient, disks: &[&DiskCreate], name: &str) -> Result<()> {
    let external: Vec<&&DiskCreate> = disks.iter().filter(|d| d.overlay.is_some()).collect();
    if external.is_empty() {
        let requests: Vec<(&str, &str)> = disks.iter().map(|d| (d.vdev.as_str(), name)).collect();
        qonline::create_many_internal(qmp, &requests).await?;
        return Ok(());
    }
    if external.len() != disks.len() {
        return Err(Error::unsupported(
            "internal and external disk snapshots in one QMP transaction",
        ));
    }
    let stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() % 1_000_000_000)
        .unwrap_or(0);
    let nodes: Vec<String> = disks
        .iter()
        .map(|d| format!("{}-{stamp}", d.vdev))
        .collect();
    let mut requests: Vec<(&str, &Path, &str)> = Vec::new();
    for (d, node) in disks.iter().zip(&nodes) {
        let overlay = d
            .overlay
            .as_deref()
            .ok_or_else(|| Error::invalid("external disk without overlay"))?;
        requests.push((d.vdev.as_str(), overlay, node.as_str()));
    }
    qonline::create_many_external(qmp, &requests).await?;
    Ok(())
}

/// The offline disk snapshots (shut-off domain, or LVs); undone in reverse on failure.
async fn offline_create<'a>(disks: impl Iterator<Item = &'a DiskCreate>, name: &str) -> Result<()> {
    let mut done: Vec<&DiskCreate> = Vec::new();
    for d in disks {
        let result = match &d.overlay {
            Some(overlay) => layers::create_overlay(d.backend, &d.image, name, overlay).await,
            None => layers::create_internal(d.backend, &d.image, name).await,
        };
        if let Err(e) = result {
            for undo in done.iter().rev() {
                let undone = match &undo.overlay {
                    Some(overlay) => std::fs::remove_file(overlay)
                        .map_err(|e| Error::io("remove overlay", e).with_path(overlay)),
                    None => layers::delete_internal(undo.backend, &undo.image, name).await,
                };
                if let Err(u) = undone {
                    eprintln!(
                        "snapctl: warning: undoing disk {}'s snapshot failed: {u}",
                        undo.vdev
                    );
                }
            }
            return Err(e.context(format!("disk {}", d.vdev)));
        }
        done.push(d);
    }
    Ok(())
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
    /// A new empty overlay on the frozen layer becomes the active file.
    Overlay { layer: PathBuf, overlay: PathBuf },
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
    let lock = ctx.store.lock(domain)?;
    let mut rec = load_defined(&lock, domain)?;
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
                if let Some(other) = frozen_by(&rec, &d.vdev, &d.path, None) {
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
                if !d.path.exists() && backend != Backend::Lvm {
                    return Err(Error::not_found(format!("disk {}: image missing", d.vdev))
                        .with_path(&d.path));
                }
                DiskRevert::Internal {
                    image: d.path.clone(),
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
                }
            }
        };
        // The old active file goes when nothing else needs it.
        let drop_old = match &active {
            Some(old)
                if !referenced(&rec, &d.vdev, old)
                    && !matches!(&action, DiskRevert::Internal { image } if layers::same_file(image, old))
                    && old.exists() =>
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

    let mut plan = Plan::default();
    if matches!(state, LiveState::Running | LiveState::Paused) {
        plan.step(format!(
            "stop domain {domain} (its current state is dropped)"
        ));
    }
    for d in &disks {
        match &d.action {
            DiskRevert::Internal { image } => plan.step(format!(
                "{}: revert internal snapshot {name} in {}",
                d.vdev,
                image.display()
            )),
            DiskRevert::Overlay { layer, overlay } => plan.step(format!(
                "{}: new empty overlay {} on {}",
                d.vdev,
                overlay.display(),
                layer.display()
            )),
        }
    }
    plan.step(format!("record snapshot {name} as current"));
    for d in &disks {
        if let Some(old) = &d.drop_old {
            plan.step(format!(
                "{}: remove the old active layer {} (no snapshot uses it)",
                d.vdev,
                old.display()
            ));
        }
    }
    match (&target, &restore) {
        (DomainState::Shutoff, _) => plan.step("leave the domain shut off"),
        (_, Some(memory)) => plan.step(format!(
            "start the domain from memory image {} and leave it {}",
            memory.display(),
            if target == DomainState::Running {
                "running"
            } else {
                "paused"
            }
        )),
        (DomainState::Running, None) => plan.step("boot the domain (the snapshot has no memory)"),
        (_, None) => plan.step("start the domain paused, before its first instruction"),
    }
    plan.pause_window = "none (the domain restarts)".into();
    if ctx.dry_run {
        plan.print(&format!("snapshot revert {domain} {name}"));
        return Ok(0);
    }

    if matches!(state, LiveState::Running | LiveState::Paused) {
        driver.destroy(&rec).await?;
        rec.runtime = None;
    }
    for d in &disks {
        let done = match &d.action {
            DiskRevert::Internal { image } => layers::revert_internal(d.backend, image, name).await,
            DiskRevert::Overlay { layer, overlay } => {
                layers::create_overlay(d.backend, layer, name, overlay).await
            }
        };
        done.map_err(|e| {
            e.context(format!(
                "disk {} (domain {domain} is shut off now; run the revert again)",
                d.vdev
            ))
        })?;
    }
    // The domain's config becomes the snapshot's, on the new active files.
    let mut config = snap.config.clone();
    for d in &disks {
        if let Some(spec) = config.disks.iter_mut().find(|s| s.vdev == d.vdev) {
            spec.target = d.new_active().to_string_lossy().into_owned();
        }
    }
    rec.config = config;
    rec.current = Some(name.to_string());
    lock.save(&rec)?;
    for d in &disks {
        if let Some(old) = &d.drop_old
            && let Err(e) = std::fs::remove_file(old)
        {
            eprintln!(
                "snapctl: warning: could not remove the old active layer {}: {e}",
                old.display()
            );
        }
    }
    let mode = match (&target, restore) {
        (DomainState::Shutoff, _) => None,
        (t, Some(memory)) => Some(StartMode::Restore {
            memory,
            running: *t == DomainState::Running,
        }),
        (DomainState::Running, None) => Some(StartMode::Running),
        (_, None) => Some(StartMode::Paused),
    };
    if let Some(mode) = mode {
        let runtime = driver.start(&rec, mode).await.map_err(|e| {
            e.context(format!(
                "the disks are reverted to {name} but domain {domain} did not start"
            ))
        })?;
        rec.runtime = Some(runtime);
        lock.save(&rec)?;
    }
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
    Internal {
        image: PathBuf,
        name: String,
        online: bool,
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
    let lock = ctx.store.lock(domain)?;
    let mut rec = load_defined(&lock, domain)?;
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

    let mut plan = Plan::default();
    if opts.metadata_only {
        for t in &targets {
            plan.step(format!(
                "forget snapshot {t} (its disk snapshots and layers stay on disk)"
            ));
        }
        plan.pause_window = "none".into();
        if ctx.dry_run {
            plan.print(&format!("snapshot delete {domain} {name} --metadata-only"));
            return Ok(0);
        }
        for t in &targets {
            let memory = rec.get(t)?.memory.clone();
            rec.remove_snapshot(t)?;
            lock.save(&rec)?;
            if let Some(memory) = memory {
                remove_memory(&memory);
            }
        }
        println!(
            "forgot {} snapshot(s) of domain {domain}: {} (disks untouched)",
            targets.len(),
            targets.join(", ")
        );
        return Ok(0);
    }

    // Plan every target on the record as it will be when its turn comes (descendants first).
    let mut sim = rec.clone();
    let mut per_target: Vec<(String, Vec<DeleteDisk>)> = Vec::new();
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
            let action = match d.kind {
                DiskKind::Internal => {
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
                        online,
                    }
                }
                DiskKind::External => {
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
                    let files = tracked_files(&sim, &d.vdev);
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
                                bytes = bytes.saturating_add(p.stream_bytes);
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

    for (t, disks) in &per_target {
        for d in disks {
            match &d.action {
                DiskDelete::Internal {
                    image,
                    name: inner,
                    online,
                } => plan.step(format!(
                    "{t}/{}: delete internal snapshot {inner} in {}{}",
                    d.vdev,
                    image.display(),
                    if *online { " (through QMP)" } else { "" }
                )),
                DiskDelete::Layer {
                    layer,
                    children,
                    bytes,
                } => {
                    plan.bytes_to_copy = plan.bytes_to_copy.saturating_add(*bytes);
                    plan.space_needed = plan.space_needed.saturating_add(*bytes);
                    if children.is_empty() {
                        plan.step(format!(
                            "{t}/{}: remove layer {} (nothing reads through it)",
                            d.vdev,
                            layer.display()
                        ));
                    }
                    for (child, online) in children {
                        plan.step(format!(
                            "{t}/{}: merge layer {} into {}{}",
                            d.vdev,
                            layer.display(),
                            child.display(),
                            if *online {
                                " (block-stream job in the running QEMU)"
                            } else {
                                ""
                            }
                        ));
                    }
                    if !children.is_empty() {
                        plan.step(format!("{t}/{}: remove {}", d.vdev, layer.display()));
                    }
                }
            }
        }
        if rec.get(t)?.memory.is_some() {
            plan.step(format!("{t}: remove its memory image"));
        }
        plan.step(format!("forget snapshot {t}"));
    }
    plan.pause_window = "none".into();
    if ctx.dry_run {
        plan.print(&format!("snapshot delete {domain} {name}"));
        return Ok(0);
    }

    let mut ctl: Option<Box<dyn Control>> = None;
    for (t, disks) in &per_target {
        for d in disks {
            let needs_qmp = match &d.action {
                DiskDelete::Internal { online, .. } => *online,
                DiskDelete::Layer { children, .. } => children.iter().any(|(_, o)| *o),
            };
            let qmp = if needs_qmp {
                if ctl.is_none() {
                    let mut c = driver.attach(&rec).await?;
                    if state == LiveState::Paused {
                        c.activate_disks().await?;
                    }
                    ctl = Some(c);
                }
                ctl.as_ref().and_then(|c| c.disk_qmp())
            } else {
                None
            };
            run_disk_delete(d, qmp)
                .await
                .map_err(|e| e.context(format!("snapshot {t}, disk {}", d.vdev)))?;
        }
        let memory = rec.get(t)?.memory.clone();
        rec.remove_snapshot(t)?;
        lock.save(&rec)?;
        if let Some(memory) = memory {
            remove_memory(&memory);
        }
        println!("deleted snapshot {t} of domain {domain}");
    }
    Ok(0)
}

fn remove_memory(memory: &Path) {
    let _ = std::fs::remove_file(memory);
    let _ = std::fs::remove_file(crate::qemu::memory_info_path(memory));
}

async fn run_disk_delete(d: &DeleteDisk, qmp: Option<Arc<QmpClient>>) -> Result<()> {
    match &d.action {
        DiskDelete::Internal {
            image,
            name,
            online: true,
        } => {
            let qmp = qmp.ok_or_else(|| Error::unsupported("no QMP connection"))?;
            let disk = OnlineDisk::from_shared(Arc::clone(&qmp), &d.vdev);
            let top = disk.active_node().await?;
            let on_image = OnlineDisk::from_shared(qmp, &top.name);
            if !layers::same_file(&top.file, image) {
                return Err(Error::invalid(format!(
                    "QEMU's active layer of {} is {}, not {}",
                    d.vdev,
                    top.file.display(),
                    image.display()
                )));
            }
            on_image.delete_internal(name).await.map(|_| ())
        }
        DiskDelete::Internal { image, name, .. } => {
            layers::delete_internal(d.backend, image, name).await
        }
        DiskDelete::Layer {
            layer, children, ..
        } => {
            for (child, online) in children {
                if *online {
                    let qmp = qmp
                        .clone()
                        .ok_or_else(|| Error::unsupported("no QMP connection"))?;
                    let disk = OnlineDisk::from_shared(qmp, &d.vdev);
                    disk.delete_layer(
                        layer,
                        &StreamOptions::default(),
                        |_, _| {},
                        std::future::pending(),
                    )
                    .await?;
                } else {
                    layers::merge_into_child(d.backend, child, layer).await?;
                }
            }
            if layer.exists() {
                std::fs::remove_file(layer)
                    .map_err(|e| Error::io("remove the merged layer", e).with_path(layer))?;
            }
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// list / info

/// `snapshot list`.
pub fn list(ctx: &Ctx, domain: &str, tree: bool, json: bool) -> Result<u8> {
    let rec = read_defined(ctx, domain)?;
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
pub fn info(ctx: &Ctx, domain: &str, name: &str, json: bool) -> Result<u8> {
    let rec = read_defined(ctx, domain)?;
    let snap = rec.get(name)?;
    if json {
        println!("{}", store::snapshot_json(&rec, snap));
    } else {
        print!("{}", store::render_info(&rec, snap));
    }
    Ok(0)
}

fn read_defined(ctx: &Ctx, domain: &str) -> Result<DomainRecord> {
    store::validate_name("domain", domain)?;
    ctx.store.read(domain)?.ok_or_else(|| {
        Error::not_found(format!(
            "domain {domain} is not defined here (state dir {}); start it with `snapctl domain start CFG`",
            ctx.store.root().display()
        ))
    })
}
