//! The qemu driver: domains are qemu-system-x86_64 processes started from their xl.cfg, driven
//! over QMP.
//!
//! Per domain, the state dir holds `qmp.sock` (QMP), `qga.sock` (the guest agent's virtio-serial
//! port), `qemu.pid` and, without `serial = "file:PATH"` in the config, `console.log`. Every disk
//! is a `-blockdev` pair (protocol node `VDEV-file`, format node `VDEV`) on a virtio-blk device
//! `blk-VDEV`, so snapshots address disks by their vdev. The accelerator is TCG when the host's
//! /dev/kvm is PVM (a nested sandbox where stock guests hang), KVM when /dev/kvm opens, TCG
//! otherwise; `SNAPCTL_QEMU_ACCEL` overrides it and `SNAPCTL_QEMU` names the binary.
//!
//! Memory is saved with `migrate` to a `file:` URI, with `mapped-ram` when QEMU has it (every page
//! at a fixed offset: a live save rewrites pages in place instead of appending), after raising
//! the bandwidth cap that would otherwise throttle it. A sidecar `IMAGE.json` records how the
//! image was written so the restore sets the same capabilities.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use snap_core::qmp::{Event, QmpClient, QmpConfig};
use snap_core::{Error, ErrorKind, Result};
use tokio::sync::broadcast;

use crate::hypervisor::{Control, Hypervisor, LiveState, SaveReport, StartMode};
use crate::store::{DomainRecord, Runtime, Store};
use crate::xlcfg::{DiskAccess, DiskFormat, DiskSpec, DomainConfig};

/// How long QEMU may take to start (parse, open images, daemonize).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a memory save or load may take.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Bandwidth cap for saves: effectively none (QEMU's default 128 MiB/s also throttles files).
const SAVE_BANDWIDTH: u64 = 1 << 40;
/// Longest stop the final stage of a live save should plan for.
const SAVE_DOWNTIME_MS: u64 = 50;

/// The binary to run.
fn qemu_binary() -> String {
    std::env::var("SNAPCTL_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".to_string())
}

/// The accelerator for this host.
pub fn accel() -> String {
    if let Ok(forced) = std::env::var("SNAPCTL_QEMU_ACCEL") {
        return forced;
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return "tcg".to_string();
    }
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    if kvm.is_ok() { "kvm" } else { "tcg" }.to_string()
}

/// How a memory image was written (the sidecar `IMAGE.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemoryImageInfo {
    /// "qemu".
    pub driver: String,
    /// Whether the `mapped-ram` capability was on.
    pub mapped_ram: bool,
    /// The saving QEMU's version (major, minor, micro).
    pub qemu_version: Option<(i64, i64, i64)>,
    /// Whether the save ran while the guest ran.
    pub live: bool,
    /// Where the migration stream starts in the file.
    #[serde(default)]
    pub offset: u64,
}

/// The sidecar path of a memory image.
pub fn memory_info_path(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(".json");
    PathBuf::from(name)
}

/// The qemu driver.
#[derive(Debug, Clone)]
pub struct QemuDriver {
    store: Store,
}

impl QemuDriver {
    /// A driver keeping its sockets in `store`'s domain folders.
    pub fn new(store: Store) -> QemuDriver {
        QemuDriver { store }
    }

    fn paths(&self, name: &str) -> Paths {
        let dir = self.store.domain_dir(name);
        Paths {
            qmp: dir.join("qmp.sock"),
            qga: dir.join("qga.sock"),
            pid: dir.join("qemu.pid"),
            console: dir.join("console.log"),
            dir,
        }
    }

    /// The live QEMU process of the domain, if any (the pid file names a live process whose
    /// command line has our QMP socket).
    fn live_pid(&self, dom: &DomainRecord) -> Option<i32> {
        let paths = self.paths(&dom.name);
        let pid = dom
            .runtime
            .as_ref()
            .and_then(|r| r.pid)
            .or_else(|| read_pid(&paths.pid))?;
        process_alive(pid, &paths.qmp).then_some(pid)
    }

    async fn connect(&self, dom: &DomainRecord) -> Result<QmpClient> {
        let paths = self.paths(&dom.name);
        let config = QmpConfig {
            connect_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(60),
            ..QmpConfig::default()
        };
        QmpClient::connect_with(&paths.qmp, config)
            .await
            .map_err(|e| e.context(format!("domain {}: QMP", dom.name)))
    }
}

#[derive(Debug)]
struct Paths {
    dir: PathBuf,
    qmp: PathBuf,
    qga: PathBuf,
    pid: PathBuf,
    console: PathBuf,
}

fn read_pid(path: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(path).ok()?;
    text.trim().parse().ok().filter(|p: &i32| *p > 1)
}

/// Whether `pid` is a live (not zombie) process whose command line mentions `qmp`.
fn process_alive(pid: i32, qmp: &Path) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, Some("Z") | Some("X") | None) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = qmp.as_os_str().as_encoded_bytes();
    !needle.is_empty() && cmdline.windows(needle.len()).any(|w| w == needle)
}

fn path_text(path: &Path) -> Result<&str> {
    let text = path
        .to_str()
        .ok_or_else(|| Error::invalid("path is not UTF-8 (QEMU needs text)").with_path(path))?;
    if text.contains(',') {
        // QEMU's option syntax would need ",," escapes; refuse rather than guess.
        return Err(
            Error::invalid("path contains ',' (not supported on a QEMU command line)")
                .with_path(path),
        );
    }
    Ok(text)
}

/// Whether `name` is a valid QEMU node / device id (a letter first, then letters, digits, `-`,
/// `.`, `_`; at most 31 characters).
fn valid_id(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && name.len() <= 31
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// The QEMU block driver of an xl disk format.
fn format_driver(format: DiskFormat) -> Option<&'static str> {
    match format {
        DiskFormat::Raw => Some("raw"),
        DiskFormat::Qcow2 => Some("qcow2"),
        DiskFormat::Vhd => Some("vpc"),
        DiskFormat::Qcow => Some("qcow"),
        DiskFormat::Qed => Some("qed"),
        DiskFormat::Empty => None,
    }
}

/// The `-blockdev`/`-device` arguments of one disk.
fn disk_args(disk: &DiskSpec, index: usize) -> Result<Vec<String>> {
    let vdev = &disk.vdev;
    if !valid_id(vdev) {
        return Err(Error::invalid(format!(
            "disk {index}: vdev {vdev:?} cannot name a QEMU node (a letter, then letters, digits, '-', '.', '_')"
        )));
    }
    let cdrom = disk.devtype.as_deref() == Some("cdrom");
    if disk.target.is_empty() || disk.format == DiskFormat::Empty {
        if cdrom {
            return Ok(vec!["-device".into(), format!("ide-cd,id=blk-{vdev}")]);
        }
        return Err(Error::invalid(format!(
            "disk {vdev}: no target (only an empty cdrom may have none)"
        )));
    }
    if disk.target.starts_with(snap_backend_rbd::name::PREFIX) {
        return rbd_disk_args(disk);
    }
    let target = Path::new(&disk.target);
    let file = path_text(target)?;
    let driver = format_driver(disk.format).ok_or_else(|| {
        Error::invalid(format!(
            "disk {vdev}: format {} has no QEMU driver",
            disk.format.as_str()
        ))
    })?;
    let protocol = if disk.target.starts_with("/dev/") {
        "host_device"
    } else {
        "file"
    };
    let ro = if cdrom || disk.access == DiskAccess::ReadOnly {
        ",read-only=on"
    } else {
        ""
    };
    let device = if cdrom {
        format!("ide-cd,drive={vdev},id=blk-{vdev}")
    } else {
        format!("virtio-blk-pci,drive={vdev},id=blk-{vdev}")
    };
    Ok(vec![
        "-blockdev".into(),
        format!("driver={protocol},filename={file},node-name={vdev}-file{ro}"),
        "-blockdev".into(),
        format!("driver={driver},file={vdev}-file,node-name={vdev}{ro}"),
        "-device".into(),
        device,
    ])
}

/// The `-blockdev`/`-device` arguments of an RBD disk (`target=rbd:POOL/IMAGE[:conf=PATH]
/// [:id=USER]`, format raw): QEMU's rbd driver (package qemu-block-extra) under a raw node. The
/// conf is the name's, else `CEPH_CONF`'s, else librados' default.
fn rbd_disk_args(disk: &DiskSpec) -> Result<Vec<String>> {
    let vdev = &disk.vdev;
    let spec = snap_backend_rbd::RbdSpec::parse(&disk.target)
        .map_err(|e| e.context(format!("disk {vdev}")))?;
    if disk.format != DiskFormat::Raw {
        return Err(Error::unsupported(format!(
            "disk {vdev}: an RBD disk is a raw image (format=raw), not {}",
            disk.format.as_str()
        )));
    }
    if disk.devtype.as_deref() == Some("cdrom") {
        return Err(Error::unsupported(format!(
            "disk {vdev}: an RBD image cannot be a cdrom"
        )));
    }
    let default_conf = std::env::var_os("CEPH_CONF")
        .filter(|c| !c.is_empty())
        .map(PathBuf::from);
    let options = spec
        .blockdev_options(default_conf.as_deref())
        .map_err(|e| e.context(format!("disk {vdev}")))?;
    let ro = if disk.access == DiskAccess::ReadOnly || spec.snapshot().is_some() {
        ",read-only=on"
    } else {
        ""
    };
    Ok(vec![
        "-blockdev".into(),
        format!("{options},node-name={vdev}-file{ro}"),
        "-blockdev".into(),
        format!("driver=raw,file={vdev}-file,node-name={vdev}{ro}"),
        "-device".into(),
        format!("virtio-blk-pci,drive={vdev},id=blk-{vdev}"),
    ])
}

/// The full qemu-system-x86_64 command line of a domain.
fn command_line(cfg: &DomainConfig, paths: &Paths, mode: &StartMode) -> Result<Vec<String>> {
    let mut args: Vec<String> = vec![
        "-name".into(),
        format!("guest={},debug-threads=on", cfg.name),
        "-machine".into(),
        format!("q35,accel={}", accel()),
        "-m".into(),
        cfg.memory_mib.to_string(),
        "-smp".into(),
        cfg.vcpus.to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-daemonize".into(),
        "-pidfile".into(),
        path_text(&paths.pid)?.to_string(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", path_text(&paths.qmp)?),
        "-device".into(),
        "virtio-serial-pci,id=vser0".into(),
        "-chardev".into(),
        format!(
            "socket,id=qga0,path={},server=on,wait=off",
            path_text(&paths.qga)?
        ),
        "-device".into(),
        "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0".into(),
    ];
    if let Some(uuid) = &cfg.uuid {
        args.extend(["-uuid".into(), uuid.clone()]);
    }
    let console = cfg.serial_file().unwrap_or_else(|| paths.console.clone());
    args.extend([
        "-chardev".into(),
        format!("file,id=ser0,path={},append=on", path_text(&console)?),
        "-serial".into(),
        "chardev:ser0".into(),
    ]);
    if let Some(kernel) = &cfg.kernel {
        args.extend(["-kernel".into(), path_text(kernel)?.to_string()]);
        if let Some(ramdisk) = &cfg.ramdisk {
            args.extend(["-initrd".into(), path_text(ramdisk)?.to_string()]);
        }
        let mut cmdline = Vec::new();
        if let Some(root) = &cfg.root {
            cmdline.push(format!("root={root}"));
        }
        if let Some(extra) = &cfg.extra {
            cmdline.push(extra.clone());
        }
        if !cmdline.is_empty() {
            args.extend(["-append".into(), cmdline.join(" ")]);
        }
    }
    for (index, disk) in cfg.disks.iter().enumerate() {
        args.extend(disk_args(disk, index)?);
    }
    match mode {
        StartMode::Running => {}
        StartMode::Paused => args.push("-S".into()),
        StartMode::Restore { .. } => {
            args.extend(["-S".into(), "-incoming".into(), "defer".into()]);
        }
    }
    Ok(args)
}

/// Refuses a config the driver cannot run, before anything starts.
fn check_config(cfg: &DomainConfig) -> Result<()> {
    let mut seen: Vec<&str> = Vec::new();
    for disk in &cfg.disks {
        if seen.contains(&disk.vdev.as_str()) {
            return Err(Error::invalid(format!(
                "domain {}: vdev {} is used by two disks",
                cfg.name, disk.vdev
            )));
        }
        seen.push(&disk.vdev);
        if disk.target.starts_with(snap_backend_rbd::name::PREFIX) {
            rbd_disk_args(disk).map_err(|e| e.context(format!("domain {}", cfg.name)))?;
            continue;
        }
        if disk.target.is_empty() {
            continue;
        }
        if !Path::new(&disk.target).exists() {
            return Err(Error::not_found(format!(
                "domain {}: disk {} does not exist",
                cfg.name, disk.vdev
            ))
            .with_path(&disk.target));
        }
    }
    if let Some(kernel) = &cfg.kernel
        && !kernel.exists()
    {
        return Err(
            Error::not_found(format!("domain {}: kernel not found", cfg.name)).with_path(kernel),
        );
    }
    if let Some(ramdisk) = &cfg.ramdisk
        && !ramdisk.exists()
    {
        return Err(
            Error::not_found(format!("domain {}: ramdisk not found", cfg.name)).with_path(ramdisk),
        );
    }
    Ok(())
}

fn event_time(event: &Event) -> SystemTime {
    event
        .timestamp
        .and_then(|t| {
            let secs = u64::try_from(t.seconds).ok()?;
            let micros = u64::try_from(t.microseconds).ok()?;
            SystemTime::UNIX_EPOCH
                .checked_add(Duration::from_secs(secs).checked_add(Duration::from_micros(micros))?)
        })
        .unwrap_or_else(SystemTime::now)
}

/// Waits for event `name` on `rx` and returns when it happened (QEMU's stamp).
async fn event_stamp(
    rx: &mut broadcast::Receiver<Event>,
    name: &str,
    timeout: Duration,
) -> Result<SystemTime> {
    let event = snap_core::qmp::wait_for_event(rx, |e| e.name == name, timeout).await?;
    Ok(event_time(&event))
}

/// The status word of `query-status`.
async fn run_status(qmp: &QmpClient) -> Result<String> {
    let status = qmp.execute_raw("query-status", Value::Null).await?;
    Ok(status
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_string())
}

fn live_state(status: &str) -> LiveState {
    match status {
        "running" => LiveState::Running,
        "paused" | "postmigrate" | "prelaunch" | "suspended" | "debug" | "io-error" => {
            LiveState::Paused
        }
        "shutdown" => LiveState::Busy("shutting down".into()),
        "guest-panicked" | "internal-error" => LiveState::Busy(format!("crashed ({status})")),
        other => LiveState::Busy(other.to_string()),
    }
}

/// Waits until the migration ends — on its `MIGRATION` event (the `events` capability must be
/// on), asking `query-migrate` when no event came for a second — and errs unless it completed.
async fn wait_migration(
    qmp: &QmpClient,
    events: &mut broadcast::Receiver<Event>,
    what: &str,
) -> Result<Value> {
    let started = Instant::now();
    loop {
        let ended =
            |status: Option<&str>| matches!(status, Some("completed" | "failed" | "cancelled"));
        let event = snap_core::qmp::wait_for_event(
            events,
            |e| e.name == "MIGRATION" && ended(e.data.get("status").and_then(Value::as_str)),
            Duration::from_secs(1),
        )
        .await;
        if event.is_ok() || started.elapsed() > Duration::from_secs(1) {
            let info = qmp.execute_raw("query-migrate", Value::Null).await?;
            match info.get("status").and_then(Value::as_str) {
                Some("completed") => {
                    tracing::debug!(
                        "{what}: completed; QEMU reports downtime {} ms, total {} ms",
                        info.get("downtime")
                            .map(|v| v.to_string())
                            .unwrap_or_default(),
                        info.get("total-time")
                            .map(|v| v.to_string())
                            .unwrap_or_default()
                    );
                    return Ok(info);
                }
                Some(s @ ("failed" | "cancelled")) => {
                    let why = info
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("no reason given");
                    return Err(Error::new(ErrorKind::Command, format!("{what} {s}: {why}")));
                }
                _ => {}
            }
        }
        if started.elapsed() > MIGRATE_TIMEOUT {
            let _ = qmp.execute_raw("migrate_cancel", Value::Null).await;
            return Err(Error::new(
                ErrorKind::Io,
                format!("{what} did not finish within {MIGRATE_TIMEOUT:?}; cancelled"),
            ));
        }
    }
}

/// Whether QEMU offers migration capability `name`.
async fn has_capability(qmp: &QmpClient, name: &str) -> Result<bool> {
    let caps = qmp
        .execute_raw("query-migrate-capabilities", Value::Null)
        .await?;
    Ok(caps
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c.get("capability").and_then(Value::as_str) == Some(name)))
}

async fn set_capability(qmp: &QmpClient, name: &str, on: bool) -> Result<()> {
    qmp.execute_raw(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": name, "state": on}]}),
    )
    .await
    .map(|_| ())
}

/// Where the migration stream starts in a memory image. Not 0 on purpose: QEMU truncates a
/// `file:` target to the offset, and on ext4 a file truncated to size 0 is flushed when closed
/// (`auto_da_alloc`), which stalls QEMU's main loop — and so the guest's resume — for 50-100 ms
/// per 256 MiB. The first 4 KiB stay unused.
pub const MEMORY_OFFSET: u64 = 4096;

fn file_uri(path: &Path, offset: u64) -> Result<String> {
    let text = path_text(path)?;
    Ok(if offset == 0 {
        format!("file:{text}")
    } else {
        format!("file:{text},offset={offset}")
    })
}

#[async_trait]
impl Hypervisor for QemuDriver {
    fn name(&self) -> &'static str {
        "qemu"
    }

    async fn state(&self, dom: &DomainRecord) -> Result<LiveState> {
        if self.live_pid(dom).is_none() {
            return Ok(LiveState::Shutoff);
        }
        let qmp = self.connect(dom).await?;
        Ok(live_state(&run_status(&qmp).await?))
    }

    async fn start(&self, dom: &DomainRecord, mode: StartMode) -> Result<Runtime> {
        if let Some(pid) = self.live_pid(dom) {
            return Err(Error::new(
                ErrorKind::Exists,
                format!("domain {} is already running (QEMU pid {pid})", dom.name),
            ));
        }
        check_config(&dom.config)?;
        let paths = self.paths(&dom.name);
        std::fs::create_dir_all(&paths.dir)
            .map_err(|e| Error::io("create the domain folder", e).with_path(&paths.dir))?;
        for stale in [&paths.qmp, &paths.qga, &paths.pid] {
            let _ = std::fs::remove_file(stale);
        }
        let args = command_line(&dom.config, &paths, &mode)?;
        tracing::debug!(?args, "starting QEMU");
        let binary = qemu_binary();
        let child = tokio::process::Command::new(&binary)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| Error::io(format!("run {binary}"), e))?;
        let output = tokio::time::timeout(START_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Io,
                    format!("{binary} did not finish starting within {START_TIMEOUT:?}"),
                )
            })?
            .map_err(|e| Error::io(format!("run {binary}"), e))?;
        if !output.status.success() {
            let text = String::from_utf8_lossy(&output.stderr);
            let first = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no message");
            return Err(Error::new(
                ErrorKind::Command,
                format!(
                    "QEMU could not start domain {}: {}",
                    dom.name,
                    first.chars().take(400).collect::<String>()
                ),
            ));
        }
        let pid = read_pid(&paths.pid).ok_or_else(|| {
            Error::new(ErrorKind::Command, "QEMU started but wrote no pid file")
                .with_path(&paths.pid)
        })?;
        let runtime = Runtime {
            driver: "qemu".into(),
            pid: Some(pid),
            qmp: Some(paths.qmp.clone()),
            qga: Some(paths.qga.clone()),
            started: crate::store::timestamp_now(),
        };
        if let StartMode::Restore { memory, running } = &mode {
            let restored = async {
                let qmp = self.connect(dom).await?;
                restore(&qmp, memory, *running).await
            }
            .await;
            if let Err(e) = restored {
                let mut probe = dom.clone();
                probe.runtime = Some(runtime.clone());
                let _ = self.destroy(&probe).await;
                return Err(e);
            }
        }
        Ok(runtime)
    }

    async fn destroy(&self, dom: &DomainRecord) -> Result<()> {
        let paths = self.paths(&dom.name);
        let Some(pid) = self.live_pid(dom) else {
            for stale in [&paths.qmp, &paths.qga, &paths.pid] {
                let _ = std::fs::remove_file(stale);
            }
            return Ok(());
        };
        // Ask QEMU to quit; kill it if it does not go.
        if let Ok(Ok(qmp)) = tokio::time::timeout(
            Duration::from_secs(3),
            QmpClient::connect(&paths.qmp, Duration::from_secs(3)),
        )
        .await
        {
            let _ = qmp
                .execute_raw_timeout("quit", Value::Null, Duration::from_secs(3))
                .await;
        }
        let nix_pid = nix::unistd::Pid::from_raw(pid);
        for (signal, wait) in [
            (None, Duration::from_secs(5)),
            (
                Some(nix::sys::signal::Signal::SIGTERM),
                Duration::from_secs(5),
            ),
            (
                Some(nix::sys::signal::Signal::SIGKILL),
                Duration::from_secs(10),
            ),
        ] {
            if let Some(signal) = signal {
                let _ = nix::sys::signal::kill(nix_pid, signal);
            }
            let deadline = Instant::now() + wait;
            while process_alive(pid, &paths.qmp) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if !process_alive(pid, &paths.qmp) {
                for stale in [&paths.qmp, &paths.qga, &paths.pid] {
                    let _ = std::fs::remove_file(stale);
                }
                return Ok(());
            }
        }
        Err(Error::new(
            ErrorKind::Io,
            format!("domain {}: QEMU (pid {pid}) does not die", dom.name),
        ))
    }

    fn disk_via_qmp(&self, _disk: &DiskSpec) -> bool {
        true
    }

    async fn attach(&self, dom: &DomainRecord) -> Result<Box<dyn Control>> {
        if self.live_pid(dom).is_none() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("domain {} is not running", dom.name),
            ));
        }
        let qmp = self.connect(dom).await?;
        let events = qmp.subscribe();
        Ok(Box::new(QemuControl {
            qmp: Arc::new(qmp),
            events,
            qga: self.paths(&dom.name).qga,
        }))
    }
}

/// Loads a memory image into a QEMU started with `-incoming defer -S`.
async fn restore(qmp: &QmpClient, memory: &Path, running: bool) -> Result<()> {
    let info_path = memory_info_path(memory);
    let info: MemoryImageInfo = std::fs::read(&info_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| {
            Error::corrupt("the memory image's description is missing or unreadable")
                .with_path(&info_path)
        })?;
    if info.mapped_ram {
        if !has_capability(qmp, "mapped-ram").await? {
            return Err(Error::unsupported(
                "the memory image was saved with mapped-ram, which this QEMU does not have",
            )
            .with_path(memory));
        }
        set_capability(qmp, "mapped-ram", true).await?;
    }
    set_capability(qmp, "events", true).await?;
    let mut events = qmp.subscribe();
    qmp.execute_raw(
        "migrate-incoming",
        json!({"uri": file_uri(memory, info.offset)?}),
    )
    .await?;
    wait_migration(qmp, &mut events, "loading the memory image").await?;
    if running {
        qmp.execute_raw("cont", Value::Null).await?;
    }
    Ok(())
}

/// Control of a running QEMU domain.
#[derive(Debug)]
struct QemuControl {
    qmp: Arc<QmpClient>,
    events: broadcast::Receiver<Event>,
    qga: PathBuf,
}

#[async_trait]
impl Control for QemuControl {
    async fn state(&mut self) -> Result<LiveState> {
        Ok(live_state(&run_status(&self.qmp).await?))
    }

    async fn pause(&mut self) -> Result<SystemTime> {
        if run_status(&self.qmp).await? != "running" {
            return Ok(SystemTime::now());
        }
        self.events = self.qmp.subscribe();
        self.qmp.execute_raw("stop", Value::Null).await?;
        event_stamp(&mut self.events, "STOP", Duration::from_secs(10)).await
    }

    async fn resume(&mut self) -> Result<SystemTime> {
        self.events = self.qmp.subscribe();
        self.qmp.execute_raw("cont", Value::Null).await?;
        event_stamp(&mut self.events, "RESUME", Duration::from_secs(10)).await
    }

    async fn save_memory(&mut self, path: &Path, live: bool) -> Result<SaveReport> {
        let status = run_status(&self.qmp).await?;
        if !live && status == "running" {
            return Err(Error::invalid(
                "a non-live save needs the guest paused first",
            ));
        }
        if path.exists() {
            return Err(
                Error::new(ErrorKind::Exists, "the memory image already exists").with_path(path),
            );
        }
        // SNAPCTL_QEMU_MAPPED_RAM=0 writes the classic stream format instead.
        let wanted = std::env::var("SNAPCTL_QEMU_MAPPED_RAM").map_or(true, |v| v != "0");
        let mapped_ram = wanted && has_capability(&self.qmp, "mapped-ram").await?;
        if mapped_ram {
            set_capability(&self.qmp, "mapped-ram", true).await?;
        }
        self.qmp
            .execute_raw(
                "migrate-set-parameters",
                json!({"max-bandwidth": SAVE_BANDWIDTH, "downtime-limit": SAVE_DOWNTIME_MS}),
            )
            .await?;
        let info = MemoryImageInfo {
            driver: "qemu".into(),
            mapped_ram,
            qemu_version: self.qmp.greeting().qemu_version(),
            live,
            offset: MEMORY_OFFSET,
        };
        if let Some(dir) = path.parent() {
            // Private: memory images hold the guest's RAM (QEMU creates them 0600).
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| Error::io("create the memory image folder", e).with_path(dir))?;
        }
        let info_path = memory_info_path(path);
        let text = serde_json::to_vec_pretty(&info)
            .map_err(|e| Error::invalid(format!("encode memory image info: {e}")))?;
        {
            use std::io::Write;
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&info_path)
                .and_then(|mut file| {
                    // A file left by an earlier run keeps its mode on open: set it.
                    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
                    file.write_all(&text)
                })
                .map_err(|e| Error::io("write memory image info", e).with_path(&info_path))?;
        }
        set_capability(&self.qmp, "events", true).await?;
        let started = SystemTime::now();
        self.events = self.qmp.subscribe();
        let mut progress = self.qmp.subscribe();
        let saved = async {
            self.qmp
                .execute_raw("migrate", json!({"uri": file_uri(path, MEMORY_OFFSET)?}))
                .await?;
            wait_migration(&self.qmp, &mut progress, "saving memory").await
        }
        .await;
        if let Err(e) = saved {
            let _ = std::fs::remove_file(path);
            let _ = std::fs::remove_file(&info_path);
            return Err(e);
        }
        // A live save stops the guest for its final stage; find when.
        let mut stopped_at = started;
        if live {
            while let Ok(event) = self.events.try_recv() {
                if event.name == "STOP" {
                    stopped_at = event_time(&event);
                }
            }
        }
        let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        Ok(SaveReport { stopped_at, bytes })
    }

    async fn activate_disks(&mut self) -> Result<()> {
        self.qmp
            .execute_raw("blockdev-set-active", json!({"active": true}))
            .await
            .map(|_| ())
    }

    fn disk_qmp(&self) -> Option<Arc<QmpClient>> {
        Some(Arc::clone(&self.qmp))
    }

    fn guest_agent(&self) -> Option<PathBuf> {
        Some(self.qga.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xlcfg;

    #[test]
    fn disk_arguments() {
        let disk =
            xlcfg::parse_disk_spec("format=qcow2,vdev=xvda,access=rw,target=/img/a.qcow2").unwrap();
        let args = disk_args(&disk, 0).unwrap();
        assert_eq!(
            args,
            [
                "-blockdev",
                "driver=file,filename=/img/a.qcow2,node-name=xvda-file",
                "-blockdev",
                "driver=qcow2,file=xvda-file,node-name=xvda",
                "-device",
                "virtio-blk-pci,drive=xvda,id=blk-xvda",
            ]
        );
        let ro = xlcfg::parse_disk_spec("/dev/vg/lv,raw,xvdb,ro").unwrap();
        let args = disk_args(&ro, 1).unwrap();
        assert!(args[1].starts_with("driver=host_device,filename=/dev/vg/lv"));
        assert!(args[1].ends_with(",read-only=on"));
        let comma = xlcfg::parse_disk_spec("format=raw,vdev=xvdc,target=/a,b").unwrap();
        assert!(disk_args(&comma, 2).is_err());
        let rbd = xlcfg::parse_disk_spec(
            "format=raw,vdev=xvdd,access=rw,target=rbd:pool/img:conf=/etc/ceph/c.conf:id=u",
        )
        .unwrap();
        assert_eq!(
            disk_args(&rbd, 3).unwrap(),
            [
                "-blockdev",
                "driver=rbd,pool=pool,image=img,conf=/etc/ceph/c.conf,user=u,node-name=xvdd-file",
                "-blockdev",
                "driver=raw,file=xvdd-file,node-name=xvdd",
                "-device",
                "virtio-blk-pci,drive=xvdd,id=blk-xvdd",
            ]
        );
        let qcow2 = xlcfg::parse_disk_spec("format=qcow2,vdev=xvdd,target=rbd:pool/img").unwrap();
        assert_eq!(
            disk_args(&qcow2, 3).unwrap_err().kind(),
            ErrorKind::Unsupported
        );
        let bad = xlcfg::parse_disk_spec("format=raw,vdev=xvdd,target=rbd:pool/-img").unwrap();
        assert_eq!(
            disk_args(&bad, 3).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
    }

    #[test]
    fn status_words() {
        assert_eq!(live_state("running"), LiveState::Running);
        assert_eq!(live_state("postmigrate"), LiveState::Paused);
        assert!(matches!(live_state("shutdown"), LiveState::Busy(_)));
        assert!(matches!(live_state("inmigrate"), LiveState::Busy(_)));
    }

    #[test]
    fn ids() {
        assert!(valid_id("xvda"));
        assert!(!valid_id("1abc"));
        assert!(!valid_id("a b"));
        assert!(!valid_id(&"a".repeat(40)));
    }
}
