//! The Xen driver: xl-style domains through libxl (cargo feature `xen`).
//!
//! - Domains are found by name (or domid, [`XenDriver::lookup`]); their state comes from
//!   `libxl_domain_info` ([`live_state`]: running, paused, and refusals for dying, shutting down,
//!   suspended or crashed domains).
//! - `domain start` translates the xl.cfg into libxl's JSON domain config ([`config`]) and
//!   creates the domain (`libxl_domain_create_new`); a revert with memory re-creates it from the
//!   libxl config saved next to the memory image (`libxl_domain_create_restore`), with its disks
//!   on the current active layers.
//! - A memory save is `libxl_domain_suspend` to the image's file descriptor (`LIBXL_SUSPEND_LIVE`
//!   for a live save), after which the domain is paused and `libxl_domain_resume` with
//!   suspend_cancel (what `xl save -p` does) makes it a plain paused domain again, so disk
//!   snapshots are taken before the guest runs; resuming unpauses it. A PV guest (or an HVM guest
//!   with PV drivers) acknowledges the suspend request itself, so a paused guest is unpaused for
//!   the moment it takes to suspend.
//! - Disks: libxl serves qcow2 and VHD images (and raw files) with QEMU's qdisk backend in the
//!   domain's device model, whose QMP socket is `/var/run/xen/qmp-libxl-DOMID`; those go through
//!   QMP ([`Control::disk_qmp`], node `VDEV-DRIVER`, e.g. `xvda-qcow2`). Raw disks on block
//!   devices (LVs) use the kernel's blkback (`phy`) and are snapshotted through their offline
//!   backend with the guest paused ([`Hypervisor::disk_via_qmp`] says false).
//!
//! Async: every libxl call is synchronous (NULL `ao_how`) and runs on tokio's blocking threads
//! (`spawn_blocking`), so the runtime keeps running — which it must, because libxl's children
//! (save helper, device model, hotplug scripts) are reaped through the SIGCHLD stream this
//! driver forwards to `libxl_childproc_sigchld_occurred` (see [`ffi`]).
//!
//! For HVM guests libxl itself talks to the device model's QMP socket (pause, resume, save),
//! which takes one client at a time: the driver's own QMP connection is closed around those
//! calls. PV and PVH guests' device models only serve disks, and libxl leaves their QMP alone.

pub mod config;
mod ffi;
mod layout;

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use snap_core::qmp::{QmpClient, QmpConfig};
use snap_core::{Error, ErrorKind, Result};

use self::config::{DiskBackend, DomainType};
use self::ffi::Libxl;
use crate::hypervisor::{Control, Hypervisor, LiveState, SaveReport, StartMode};
use crate::store::{DomainRecord, Runtime, Store};
use crate::xlcfg::{DiskFormat, DiskSpec, DomainConfig};

/// Where libxl's device models listen for QMP (`libxl__qemu_qmp_path`).
const XEN_RUN_DIR: &str = "/var/run/xen";
/// How often a live save checks whether the guest stopped for the final round.
const SAVE_POLL: Duration = Duration::from_millis(5);

/// The QMP socket of domain `domid`'s device model.
pub fn qmp_socket(domid: u32) -> PathBuf {
    Path::new(XEN_RUN_DIR).join(format!("qmp-libxl-{domid}"))
}

/// `libxl_dominfo`, the fields snapctl reads (libxl leaves false and default fields out of its
/// JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct DomInfo {
    /// The domain id.
    pub domid: u32,
    /// A vCPU is running.
    pub running: bool,
    /// vCPUs are blocked (idle).
    pub blocked: bool,
    /// Paused by the toolstack.
    pub paused: bool,
    /// Shut down (powered off, rebooting, crashed, suspended), not yet destroyed.
    pub shutdown: bool,
    /// Being destroyed.
    pub dying: bool,
    /// Why it shut down: poweroff, reboot, suspend, crash, watchdog, soft_reset.
    pub shutdown_reason: Option<String>,
    /// pv, pvh or hvm.
    pub domain_type: Option<String>,
}

impl DomInfo {
    /// From libxl's JSON.
    pub fn parse(json: &str) -> Result<DomInfo> {
        serde_json::from_str(json).map_err(|e| {
            Error::corrupt(format!("libxl's domain info is not what was expected: {e}"))
        })
    }

    fn suspended(&self) -> bool {
        self.shutdown && self.shutdown_reason.as_deref() == Some("suspend")
    }
}

/// A domain's state as snapctl sees it: running (vCPUs running or idle), paused, or a state in
/// which it refuses to work (dying, shutting down, suspended, crashed).
pub fn live_state(info: &DomInfo) -> LiveState {
    if info.dying {
        return LiveState::Busy("dying".into());
    }
    if info.shutdown {
        return LiveState::Busy(match info.shutdown_reason.as_deref() {
            Some("suspend") => "suspended (a memory save did not finish)".into(),
            Some("crash") => "crashed".into(),
            Some("reboot") => "shutting down (reboot)".into(),
            Some("watchdog") => "shutting down (watchdog)".into(),
            Some("soft_reset") => "shutting down (soft reset)".into(),
            _ => "shutting down (poweroff)".into(),
        });
    }
    if info.paused {
        LiveState::Paused
    } else {
        LiveState::Running
    }
}

/// Whether snapctl takes this disk's snapshots through the device model's QMP while the domain
/// runs: exactly the disks libxl serves with qdisk.
pub fn disk_via_qmp(disk: &DiskSpec) -> bool {
    config::disk_backend(disk, config::is_block_device(&disk.target)) == DiskBackend::Qdisk
}

/// The error for a host where libxl cannot open a context.
fn no_xen(e: &Error) -> Error {
    let why = e.message();
    let text = if crate::domain::is_xen_dom0() {
        format!(
            "cannot open the Xen control interface (libxl: {why}); this is a Xen dom0, so \
             check that snapctl runs as root and that xenstored runs"
        )
    } else {
        format!(
            "not a Xen dom0: cannot open the Xen control interface (libxl: {why}); run \
             snapctl on a Xen dom0 (/proc/xen/capabilities says control_d), or use \
             --hypervisor qemu"
        )
    };
    Error::new(ErrorKind::Unsupported, text)
}

/// The process's libxl context, shared by every driver while one is alive.
fn shared_libxl() -> Result<Arc<Libxl>> {
    static SHARED: Mutex<Weak<Libxl>> = Mutex::new(Weak::new());
    let mut shared = SHARED
        .lock()
        .map_err(|_| Error::new(ErrorKind::Io, "the libxl context lock is poisoned"))?;
    if let Some(lib) = shared.upgrade() {
        return Ok(lib);
    }
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(Error::new(
            ErrorKind::Io,
            "the Xen driver needs the tokio runtime (to reap libxl's child processes)",
        ));
    }
    let lib = Arc::new(Libxl::open().map_err(|e| no_xen(&e))?);
    forward_sigchld(&lib)?;
    *shared = Arc::downgrade(&lib);
    Ok(lib)
}

/// Hands every SIGCHLD to libxl (its children are reaped by it, ours by tokio).
fn forward_sigchld(lib: &Arc<Libxl>) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut signals =
        signal(SignalKind::child()).map_err(|e| Error::io("watch SIGCHLD for libxl", e))?;
    let weak = Arc::downgrade(lib);
    tokio::spawn(async move {
        while signals.recv().await.is_some() {
            let Some(lib) = weak.upgrade() else {
                break;
            };
            let _ = tokio::task::spawn_blocking(move || lib.sigchld_occurred()).await;
        }
    });
    Ok(())
}

/// Runs a libxl call on a blocking thread.
async fn blocking<T, F>(lib: &Arc<Libxl>, call: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(&Libxl) -> Result<T> + Send + 'static,
{
    let lib = Arc::clone(lib);
    tokio::task::spawn_blocking(move || call(&lib))
        .await
        .map_err(|e| Error::new(ErrorKind::Io, format!("a libxl call did not finish: {e}")))?
}

/// The domid and info of the domain named `name`, if it exists.
fn find_blocking(lib: &Libxl, name: &str) -> Result<Option<DomInfo>> {
    let Some(domid) = lib.domid_of(name)? else {
        return Ok(None);
    };
    match lib.domain_info_json(domid)? {
        Some(json) => {
            let mut info = DomInfo::parse(&json)?;
            info.domid = domid;
            Ok(Some(info))
        }
        None => Ok(None),
    }
}

fn info_blocking(lib: &Libxl, domid: u32) -> Result<Option<DomInfo>> {
    match lib.domain_info_json(domid)? {
        Some(json) => {
            let mut info = DomInfo::parse(&json)?;
            info.domid = domid;
            Ok(Some(info))
        }
        None => Ok(None),
    }
}

/// How a memory image was written (the sidecar `IMAGE.json`, beside the qemu driver's).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct XenImageInfo {
    /// "xen".
    pub driver: String,
    /// Whether the save ran while the guest ran.
    pub live: bool,
    /// libxl's stream version (2).
    pub stream_version: u32,
    /// pv, pvh or hvm.
    pub domain_type: String,
    /// The domain's `libxl_domain_config` when it was saved (what the restore creates).
    pub libxl_config: Value,
}

/// A random (version 4) UUID, as xl gives a domain without `uuid`.
fn random_uuid() -> Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| Error::io("read /dev/urandom", e))?;
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    ))
}

/// Refuses a config whose files are missing, before libxl creates anything.
fn check_files(cfg: &DomainConfig) -> Result<()> {
    for disk in &cfg.disks {
        if disk.target.is_empty() || disk.target.starts_with("rbd:") {
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
    for (what, path) in [("kernel", &cfg.kernel), ("ramdisk", &cfg.ramdisk)] {
        if let Some(path) = path
            && !path.exists()
        {
            return Err(
                Error::not_found(format!("domain {}: {what} not found", cfg.name)).with_path(path),
            );
        }
    }
    Ok(())
}

/// The Xen driver.
#[derive(Debug, Clone)]
pub struct XenDriver {
    lib: Arc<Libxl>,
    store: Store,
}

impl XenDriver {
    /// Opens libxl; fails with a clear error where this is not a Xen dom0 (or libxl cannot open
    /// the hypervisor's control interface). Needs the tokio runtime.
    pub fn new(store: Store) -> Result<XenDriver> {
        Ok(XenDriver {
            lib: shared_libxl()?,
            store,
        })
    }

    /// The state dir the driver was made for.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Finds a domain by name or, when `name_or_domid` is a number that is no domain's name, by
    /// domid. Returns its domid, name and state.
    pub async fn lookup(&self, name_or_domid: &str) -> Result<Option<(u32, String, LiveState)>> {
        let spec = name_or_domid.to_string();
        blocking(&self.lib, move |lib| {
            if let Some(info) = find_blocking(lib, &spec)? {
                return Ok(Some((info.domid, spec, live_state(&info))));
            }
            let Ok(domid) = spec.parse::<u32>() else {
                return Ok(None);
            };
            let Some(info) = info_blocking(lib, domid)? else {
                return Ok(None);
            };
            let name = lib.name_of(domid).unwrap_or_default();
            Ok(Some((domid, name, live_state(&info))))
        })
        .await
    }

    async fn find(&self, name: &str) -> Result<Option<DomInfo>> {
        let name = name.to_string();
        blocking(&self.lib, move |lib| find_blocking(lib, &name)).await
    }

    /// The `libxl_domain_config` JSON to create `dom` fresh.
    fn fresh_config(dom: &DomainRecord) -> Result<String> {
        let translation = config::translate(&dom.config, &config::is_block_device)?;
        for note in &translation.notes {
            eprintln!("snapctl: note: domain {}: {note}", dom.name);
        }
        let mut json = translation.json;
        if dom.config.uuid.is_none()
            && let Some(c_info) = json.get_mut("c_info").and_then(Value::as_object_mut)
        {
            c_info.insert("uuid".into(), json!(random_uuid()?));
        }
        serde_json::to_string(&json)
            .map_err(|e| Error::invalid(format!("encode the libxl configuration: {e}")))
    }
}

#[async_trait]
impl Hypervisor for XenDriver {
    fn name(&self) -> &'static str {
        "xen"
    }

    async fn state(&self, dom: &DomainRecord) -> Result<LiveState> {
        Ok(match self.find(&dom.name).await? {
            Some(info) => live_state(&info),
            None => LiveState::Shutoff,
        })
    }

    async fn start(&self, dom: &DomainRecord, mode: StartMode) -> Result<Runtime> {
        if let Some(info) = self.find(&dom.name).await? {
            return Err(Error::new(
                ErrorKind::Exists,
                format!(
                    "domain {} is already {} (Xen domid {})",
                    dom.name,
                    live_state(&info).as_str(),
                    info.domid
                ),
            ));
        }
        check_files(&dom.config)?;
        let (json, image, dtype, running) = match &mode {
            StartMode::Running | StartMode::Paused => (
                Self::fresh_config(dom)?,
                None,
                config::domain_type(&dom.config)?,
                mode == StartMode::Running,
            ),
            StartMode::Restore { memory, running } => {
                let info = read_image_info(memory)?;
                let restored = config::for_restore(&info.libxl_config, &dom.config)?;
                let dtype = config::libxl_domain_type(&restored).unwrap_or(DomainType::Pv);
                let text = serde_json::to_string(&restored)
                    .map_err(|e| Error::invalid(format!("encode the libxl configuration: {e}")))?;
                let file = File::open(memory)
                    .map_err(|e| Error::io("open the memory image", e).with_path(memory))?;
                (text, Some(file), dtype, *running)
            }
        };
        let domid = blocking(&self.lib, move |lib| {
            lib.create(&json, image.as_ref().map(|f| f.as_fd()))
        })
        .await
        .map_err(|e| e.context(format!("domain {}", dom.name)))?;
        if running && let Err(e) = blocking(&self.lib, move |lib| lib.unpause(domid)).await {
            let _ = blocking(&self.lib, move |lib| lib.destroy(domid)).await;
            return Err(e.context(format!("domain {} was created but did not start", dom.name)));
        }
        let qdisk = dom.config.disks.iter().any(disk_via_qmp);
        Ok(Runtime {
            driver: "xen".into(),
            pid: None,
            qmp: (qdisk || dtype == DomainType::Hvm).then(|| qmp_socket(domid)),
            qga: None,
            started: crate::store::timestamp_now(),
        })
    }

    async fn destroy(&self, dom: &DomainRecord) -> Result<()> {
        let Some(info) = self.find(&dom.name).await? else {
            return Ok(());
        };
        let domid = info.domid;
        blocking(&self.lib, move |lib| lib.destroy(domid)).await
    }

    async fn attach(&self, dom: &DomainRecord) -> Result<Box<dyn Control>> {
        let Some(info) = self.find(&dom.name).await? else {
            return Err(Error::invalid(format!(
                "domain {} is not running",
                dom.name
            )));
        };
        let domid = info.domid;
        let view = blocking(&self.lib, move |lib| lib.retrieve_config_json(domid)).await;
        let view: Option<Value> = match view {
            Ok(text) => serde_json::from_str(&text).ok(),
            Err(e) => {
                tracing::debug!("domain {}: libxl's view of its disks: {e}", dom.name);
                None
            }
        };
        let hvm = info.domain_type.as_deref() == Some("hvm")
            || view
                .as_ref()
                .and_then(config::libxl_domain_type)
                .is_some_and(|t| t == DomainType::Hvm);
        let nodes = qmp_nodes(&dom.config, view.as_ref())
            .map_err(|e| e.context(format!("domain {}", dom.name)))?;
        let mut control = XenControl {
            lib: Arc::clone(&self.lib),
            domid,
            name: dom.name.clone(),
            hvm,
            qmp_path: qmp_socket(domid),
            wants_qmp: !nodes.is_empty(),
            qmp: None,
            nodes,
            suspended: info.suspended(),
        };
        control.connect_qmp().await?;
        Ok(Box::new(control))
    }

    fn disk_via_qmp(&self, disk: &DiskSpec) -> bool {
        disk_via_qmp(disk)
    }
}

/// The QMP node of every qdisk disk the domain's record snapshots (vdev → node), checked
/// against libxl's view of the running domain when there is one: same backend, same image.
fn qmp_nodes(cfg: &DomainConfig, view: Option<&Value>) -> Result<HashMap<String, String>> {
    let running = view.map(config::libxl_disks).unwrap_or_default();
    let mut nodes = HashMap::new();
    for disk in cfg.disks.iter().filter(|d| crate::layers::snapshotted(d)) {
        let expected = disk_via_qmp(disk);
        if !expected && disk.format != DiskFormat::Raw {
            // blkback / tapdisk keep the image open: a new active layer would go unused.
            return Err(Error::unsupported(format!(
                "disk {}: a {} image served by the kernel or blktap (not QEMU's qdisk) cannot \
                 get a new active layer while the domain runs; shut the domain off first",
                disk.vdev,
                disk.format.as_str()
            )));
        }
        let Some(seen) = running.iter().find(|d| d.vdev == disk.vdev) else {
            if view.is_some() {
                return Err(Error::invalid(format!(
                    "disk {} is not attached to the running domain",
                    disk.vdev
                )));
            }
            if expected {
                nodes.insert(
                    disk.vdev.clone(),
                    config::qdisk_node(&disk.vdev, disk.format),
                );
            }
            continue;
        };
        let qdisk = seen.backend == "qdisk";
        if qdisk != expected {
            return Err(Error::unsupported(format!(
                "disk {}: libxl serves it with the {} backend, not the {} snapctl expects from \
                 the config; refusing to snapshot it",
                disk.vdev,
                seen.backend,
                if expected { "qdisk" } else { "phy" }
            )));
        }
        if !crate::layers::same_file(Path::new(&seen.target), Path::new(&disk.target)) {
            return Err(Error::invalid(format!(
                "disk {}: the running domain has {} open, but snapctl's record says {}",
                disk.vdev, seen.target, disk.target
            )));
        }
        if qdisk {
            let format = match seen.format.as_str() {
                "qcow2" => DiskFormat::Qcow2,
                "vhd" => DiskFormat::Vhd,
                "qcow" => DiskFormat::Qcow,
                "qed" => DiskFormat::Qed,
                _ => DiskFormat::Raw,
            };
            nodes.insert(disk.vdev.clone(), config::qdisk_node(&disk.vdev, format));
        }
    }
    Ok(nodes)
}

fn read_image_info(memory: &Path) -> Result<XenImageInfo> {
    let path = crate::qemu::memory_info_path(memory);
    let info: XenImageInfo = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| {
            Error::corrupt("the memory image's description is missing or unreadable")
                .with_path(&path)
        })?;
    if info.driver != "xen" {
        return Err(Error::invalid(format!(
            "the memory image was saved by the {} driver, not xen",
            info.driver
        ))
        .with_path(memory));
    }
    if info.stream_version != 2 {
        return Err(Error::unsupported(format!(
            "the memory image is a libxl v{} stream; snapctl restores v2",
            info.stream_version
        ))
        .with_path(memory));
    }
    Ok(info)
}

/// Control of one running Xen domain.
#[derive(Debug)]
struct XenControl {
    lib: Arc<Libxl>,
    domid: u32,
    name: String,
    /// libxl talks to an HVM guest's device model over QMP itself.
    hvm: bool,
    qmp_path: PathBuf,
    /// Some disks are qdisk ones.
    wants_qmp: bool,
    qmp: Option<Arc<QmpClient>>,
    /// vdev → QMP node of the qdisk disks.
    nodes: HashMap<String, String>,
    /// Shut down for a memory save, waiting for [`Libxl::resume`] with suspend_cancel.
    suspended: bool,
}

impl XenControl {
    async fn connect_qmp(&mut self) -> Result<()> {
        if !self.wants_qmp || self.qmp.is_some() {
            return Ok(());
        }
        let config = QmpConfig {
            connect_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(60),
            ..QmpConfig::default()
        };
        let qmp = QmpClient::connect_with(&self.qmp_path, config)
            .await
            .map_err(|e| {
                e.context(format!(
                    "domain {}: the QMP socket of its device model (qdisk disks)",
                    self.name
                ))
            })?;
        self.qmp = Some(Arc::new(qmp));
        Ok(())
    }

    /// Closes our QMP connection before a libxl call that talks to an HVM guest's device model
    /// (QEMU serves one QMP client at a time).
    async fn release_qmp(&mut self) {
        if !self.hvm {
            return;
        }
        if let Some(qmp) = self.qmp.take() {
            if Arc::strong_count(&qmp) > 1 {
                tracing::warn!(
                    "domain {}: the QMP connection is still in use while libxl needs the socket",
                    self.name
                );
            }
            drop(qmp);
            tokio::task::yield_now().await;
        }
    }

    async fn call<T, F>(&mut self, call: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Libxl, u32) -> Result<T> + Send + 'static,
    {
        self.release_qmp().await;
        let domid = self.domid;
        let result = blocking(&self.lib, move |lib| call(lib, domid)).await;
        let reconnected = self.connect_qmp().await;
        let value = result?;
        reconnected?;
        Ok(value)
    }

    async fn info(&self) -> Result<DomInfo> {
        let domid = self.domid;
        blocking(&self.lib, move |lib| info_blocking(lib, domid))
            .await?
            .ok_or_else(|| Error::not_found(format!("domain {} is gone", self.name)))
    }

    /// Back from "suspended" to "paused" (the guest will continue where it stopped).
    async fn cancel_suspend(&mut self) -> Result<()> {
        if !self.suspended {
            return Ok(());
        }
        self.call(|lib, domid| lib.resume(domid, true)).await?;
        self.suspended = false;
        Ok(())
    }

    /// After a failed save: the guest continues as before (paused if it was).
    async fn undo_save(&mut self, was_paused: bool) {
        if self.info().await.is_ok_and(|i| i.suspended()) {
            if let Err(e) = self.call(|lib, domid| lib.resume(domid, true)).await {
                eprintln!(
                    "snapctl: warning: domain {} stays suspended after the failed save: {e}",
                    self.name
                );
                return;
            }
        }
        self.suspended = false;
        let paused = self.info().await.is_ok_and(|i| i.paused);
        if was_paused && !paused {
            let _ = self.call(|lib, domid| lib.pause(domid)).await;
        }
    }
}

#[async_trait]
impl Control for XenControl {
    async fn state(&mut self) -> Result<LiveState> {
        Ok(live_state(&self.info().await?))
    }

    async fn pause(&mut self) -> Result<SystemTime> {
        if self.info().await?.paused {
            return Ok(SystemTime::now());
        }
        self.call(|lib, domid| lib.pause(domid)).await?;
        Ok(SystemTime::now())
    }

    async fn resume(&mut self) -> Result<SystemTime> {
        self.cancel_suspend().await?;
        if self.info().await?.paused {
            self.call(|lib, domid| lib.unpause(domid)).await?;
        }
        Ok(SystemTime::now())
    }

    async fn save_memory(&mut self, path: &Path, live: bool) -> Result<SaveReport> {
        let info = self.info().await?;
        if info.shutdown || info.dying {
            return Err(Error::new(
                ErrorKind::InUse,
                format!("domain {} is {}", self.name, live_state(&info).as_str()),
            ));
        }
        if !live && !info.paused {
            return Err(Error::invalid(
                "a non-live save needs the guest paused first",
            ));
        }
        if path.exists() {
            return Err(
                Error::new(ErrorKind::Exists, "the memory image already exists").with_path(path),
            );
        }
        // The configuration to re-create the domain from, as libxl keeps it (what `xl save`
        // stores in its image header too).
        let text = self
            .call(|lib, domid| lib.retrieve_config_json(domid))
            .await
            .map_err(|e| {
                e.context(format!(
                    "domain {}: cannot read the configuration to save with the memory",
                    self.name
                ))
            })?;
        let libxl_config: Value = serde_json::from_str(&text).map_err(|e| {
            Error::corrupt(format!("libxl's domain configuration is not JSON: {e}"))
        })?;
        let image = XenImageInfo {
            driver: "xen".into(),
            live,
            stream_version: 2,
            domain_type: info.domain_type.clone().unwrap_or_else(|| "pv".into()),
            libxl_config,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io("create the memory image folder", e).with_path(dir))?;
        }
        let info_path = crate::qemu::memory_info_path(path);
        let text = serde_json::to_vec_pretty(&image)
            .map_err(|e| Error::invalid(format!("encode memory image info: {e}")))?;
        std::fs::write(&info_path, text)
            .map_err(|e| Error::io("write memory image info", e).with_path(&info_path))?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| Error::io("create the memory image", e).with_path(path))?;
        let remove = || {
            let _ = std::fs::remove_file(path);
            let _ = std::fs::remove_file(&info_path);
        };

        // A PV guest (or HVM with PV drivers) must run to acknowledge the suspend request.
        let was_paused = info.paused;
        if was_paused && let Err(e) = self.call(|lib, domid| lib.unpause(domid)).await {
            remove();
            return Err(e);
        }
        self.release_qmp().await;
        let started = SystemTime::now();
        let domid = self.domid;
        let mut save = tokio::task::spawn_blocking({
            let lib = Arc::clone(&self.lib);
            move || lib.suspend(domid, file.as_fd(), live)
        });
        // A live save stops the guest for its last round: find when.
        let mut stopped_at = (!live).then_some(started);
        let saved = loop {
            tokio::select! {
                result = &mut save => break result,
                _ = tokio::time::sleep(SAVE_POLL), if stopped_at.is_none() => {
                    let lib = Arc::clone(&self.lib);
                    if let Ok(Ok(Some(now))) =
                        tokio::task::spawn_blocking(move || info_blocking(&lib, domid)).await
                        && (now.suspended() || now.paused)
                    {
                        stopped_at = Some(SystemTime::now());
                    }
                }
            }
        };
        let saved = saved
            .map_err(|e| {
                Error::new(
                    ErrorKind::Io,
                    format!("the memory save did not finish: {e}"),
                )
            })
            .and_then(|r| r);
        if let Err(e) = saved {
            self.undo_save(was_paused).await;
            let _ = self.connect_qmp().await;
            remove();
            return Err(e.context(format!("domain {}", self.name)));
        }
        let finished = SystemTime::now();
        self.suspended = true;
        // Paused, so that leaving the suspended state does not let the guest run.
        if let Err(e) = self.call(|lib, domid| lib.pause(domid)).await {
            self.undo_save(was_paused).await;
            remove();
            return Err(e.context(format!("domain {} after its memory save", self.name)));
        }
        let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        Ok(SaveReport {
            stopped_at: stopped_at.unwrap_or(finished),
            bytes,
        })
    }

    async fn activate_disks(&mut self) -> Result<()> {
        // libxl's resume with suspend_cancel also has an HVM device model reactivate its images
        // (QMP `cont`); the guest stays paused until `resume`.
        self.cancel_suspend().await
    }

    fn disk_qmp(&self) -> Option<Arc<QmpClient>> {
        self.qmp.clone()
    }

    fn disk_node(&self, vdev: &str) -> String {
        self.nodes
            .get(vdev)
            .cloned()
            .unwrap_or_else(|| vdev.to_string())
    }

    fn guest_agent(&self) -> Option<PathBuf> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xlcfg;

    #[test]
    fn state_mapping() {
        let info = |json: &str| DomInfo::parse(json).unwrap();
        // what libxl_dominfo_to_json writes: false and default fields left out
        let running = info(
            r#"{"uuid": "6a1e8f3c-2b7d-4e59-9c1a-0d2e3f405162", "domid": 3,
            "running": true, "current_memkb": 524288, "max_memkb": 525312, "cpu_time": 1234,
            "vcpu_max_id": 1, "vcpu_online": 2, "domain_type": "pv"}"#,
        );
        assert_eq!(running.domid, 3);
        assert_eq!(live_state(&running), LiveState::Running);
        // idle vCPUs: still running
        assert_eq!(
            live_state(&info(r#"{"domid": 4, "blocked": true}"#)),
            LiveState::Running
        );
        assert_eq!(
            live_state(&info(r#"{"domid": 4, "blocked": true, "paused": true}"#)),
            LiveState::Paused
        );
        let busy = |json: &str| match live_state(&info(json)) {
            LiveState::Busy(what) => what,
            other => panic!("{json}: {other:?}"),
        };
        assert_eq!(busy(r#"{"dying": true, "shutdown": true}"#), "dying");
        assert_eq!(
            busy(r#"{"shutdown": true, "shutdown_reason": "poweroff"}"#),
            "shutting down (poweroff)"
        );
        assert_eq!(busy(r#"{"shutdown": true}"#), "shutting down (poweroff)");
        assert_eq!(
            busy(r#"{"shutdown": true, "shutdown_reason": "reboot"}"#),
            "shutting down (reboot)"
        );
        assert_eq!(
            busy(r#"{"shutdown": true, "shutdown_reason": "crash"}"#),
            "crashed"
        );
        assert!(
            busy(r#"{"shutdown": true, "shutdown_reason": "suspend", "paused": true}"#)
                .starts_with("suspended")
        );
        assert!(DomInfo::parse("\"running\"").is_err());
    }

    #[test]
    fn online_or_offline_per_disk_type() {
        let disk = |spec: &str| xlcfg::parse_disk_spec(spec).unwrap();
        // phy/LVM: offline with the guest paused
        assert!(!disk_via_qmp(&disk("/dev/vg0/lv,raw,xvda,rw")));
        assert!(!disk_via_qmp(&disk("phy:/dev/vg0/lv,xvda,w")));
        // tap/vhd: not QEMU's
        assert!(!disk_via_qmp(&disk(
            "format=vhd,vdev=xvda,backendtype=tap,target=/srv/a.vhd"
        )));
        // qdisk qcow2 (and vhd, which libxl serves with qdisk too): through QMP
        assert!(disk_via_qmp(&disk(
            "format=qcow2,vdev=xvda,target=/srv/a.qcow2"
        )));
        assert!(disk_via_qmp(&disk(
            "format=qcow2,vdev=xvda,backendtype=qdisk,target=/srv/a.qcow2"
        )));
        assert!(disk_via_qmp(&disk(
            "format=vhd,vdev=xvda,target=/srv/a.vhd"
        )));
    }

    #[test]
    fn nodes_checked_against_libxl() {
        let cfg = xlcfg::parse(
            "name = \"a\"\ndisk = [ \"format=qcow2,vdev=xvda,target=/srv/a.qcow2\", \
             \"/dev/vg0/lv,raw,xvdb,rw\", \",,hdc:cdrom,r\" ]\n",
        )
        .unwrap();
        let view = json!({"disks": [
            {"pdev_path": "/srv/a.qcow2", "vdev": "xvda", "backend": "qdisk", "format": "qcow2"},
            {"pdev_path": "/dev/vg0/lv", "vdev": "xvdb", "backend": "phy", "format": "raw"}
        ]});
        let nodes = qmp_nodes(&cfg, Some(&view)).unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes["xvda"], "xvda-qcow2");
        // without libxl's view: from the config
        assert_eq!(qmp_nodes(&cfg, None).unwrap(), nodes);
        // a different image open
        let moved = json!({"disks": [
            {"pdev_path": "/srv/b.qcow2", "vdev": "xvda", "backend": "qdisk", "format": "qcow2"},
            {"pdev_path": "/dev/vg0/lv", "vdev": "xvdb", "backend": "phy", "format": "raw"}
        ]});
        assert!(qmp_nodes(&cfg, Some(&moved)).is_err());
        // a different backend than the config implies
        let phy = json!({"disks": [
            {"pdev_path": "/srv/a.qcow2", "vdev": "xvda", "backend": "qdisk", "format": "qcow2"},
            {"pdev_path": "/dev/vg0/lv", "vdev": "xvdb", "backend": "qdisk", "format": "raw"}
        ]});
        assert!(
            qmp_nodes(&cfg, Some(&phy))
                .unwrap_err()
                .to_string()
                .contains("refusing")
        );
        // a tap/vhd disk: not QEMU's, and its layers cannot change under tapdisk
        let tap = xlcfg::parse(
            "name = \"a\"\ndisk = [ \"format=vhd,vdev=xvda,backendtype=tap,target=/srv/a.vhd\" ]\n",
        )
        .unwrap();
        assert!(
            qmp_nodes(&tap, None)
                .unwrap_err()
                .to_string()
                .contains("blktap")
        );
        // a disk missing from the running domain
        let missing = json!({"disks": []});
        assert!(qmp_nodes(&cfg, Some(&missing)).is_err());
    }

    #[test]
    fn image_info_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let memory = dir.path().join("s1.mem");
        let info = XenImageInfo {
            driver: "xen".into(),
            live: true,
            stream_version: 2,
            domain_type: "pvh".into(),
            libxl_config: json!({"c_info": {"name": "a"}}),
        };
        std::fs::write(
            crate::qemu::memory_info_path(&memory),
            serde_json::to_vec(&info).unwrap(),
        )
        .unwrap();
        assert_eq!(read_image_info(&memory).unwrap(), info);
        std::fs::write(
            crate::qemu::memory_info_path(&memory),
            r#"{"driver": "qemu", "mapped_ram": true, "qemu_version": null, "live": true}"#,
        )
        .unwrap();
        assert!(read_image_info(&memory).is_err());
        assert!(read_image_info(&dir.path().join("none.mem")).is_err());
    }

    #[test]
    fn uuids() {
        let a = random_uuid().unwrap();
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert_ne!(a, random_uuid().unwrap());
        assert_eq!(qmp_socket(12), PathBuf::from("/var/run/xen/qmp-libxl-12"));
    }

    /// The error where there is no Xen: one line, naming the problem.
    #[tokio::test]
    async fn driver_refuses_without_xen() {
        let dir = tempfile::tempdir().unwrap();
        match XenDriver::new(Store::new(dir.path())) {
            Ok(_) => assert!(crate::domain::is_xen_dom0()),
            Err(e) => {
                let text = e.to_string();
                assert_eq!(e.kind(), ErrorKind::Unsupported);
                assert!(
                    text.contains("cannot open the Xen control interface"),
                    "{text}"
                );
                assert!(!text.contains('\n'));
                if !crate::domain::is_xen_dom0() {
                    assert!(text.starts_with("not a Xen dom0"), "{text}");
                }
            }
        }
    }

    // ---- libxl's own parser on the translations ----------------------------------------------
    //
    // libxl_ctx_alloc needs a hypervisor, but reading and writing the JSON config does not: the
    // test below preloads a stub for the two handles libxl_ctx_alloc opens (libxc, xenstore),
    // runs `libxl_child_round_trip` in a child process, and checks libxl gives back every value
    // the translation wrote.

    const SHIM_ENV: &str = "SNAPCTL_TEST_LIBXL_SHIM";

    const SHIM_C: &str = r#"
static int xc_handle, xs_handle;
void *xc_interface_open(void *a, void *b, unsigned f) { (void)a; (void)b; (void)f; return &xc_handle; }
int xc_interface_close(void *x) { (void)x; return 0; }
void *xs_open(unsigned long flags) { (void)flags; return &xs_handle; }
void xs_close(void *h) { (void)h; }
"#;

    fn golden_configs() -> Vec<DomainConfig> {
        [
            "name = \"web\"\nuuid = \"6a1e8f3c-2b7d-4e59-9c1a-0d2e3f405162\"\nmemory = 512\n\
             maxmem = 1024\nvcpus = 2\nkernel = \"/boot/vmlinuz\"\nramdisk = \"/boot/initrd\"\n\
             root = \"/dev/xvda1\"\nextra = \"console=hvc0\"\n\
             vif = [ \"mac=00:16:3e:01:02:03,bridge=xenbr0,vifname=web0,mtu=9000\" ]\n\
             disk = [ \"format=qcow2,vdev=xvda,access=rw,target=/srv/web.qcow2\", \
             \"/dev/vg0/data,raw,xvdb,rw\", \"format=vhd,vdev=xvdc,access=ro,target=/srv/r.vhd\", \
             \",,hdc:cdrom,r\" ]\n",
            "name = \"win\"\ntype = \"hvm\"\nmemory = 2048\nvcpus = 4\nmaxvcpus = 8\n\
             serial = \"file:/var/log/w\"\nboot = \"dc\"\nvnc = 0\nsdl = 0\nacpi = 1\napic = 1\n\
             pae = 1\nhap = 1\nlocaltime = 1\non_reboot = \"destroy\"\n\
             on_crash = \"coredump-restart\"\ndevice_model_version = \"qemu-xen\"\n\
             vif = [ \"type=ioemu,model=e1000,bridge=br0,ip=10.0.0.2,script=vif-bridge\" ]\n\
             disk = [ \"format=qcow2,vdev=hda,discard,direct-io-safe,trusted,target=/srv/w.qcow2\" ]\n",
            "name = \"p\"\ntype = \"pvh\"\nkernel = \"/k\"\ncmdline = \"ro\"\n\
             bootloader = \"pygrub\"\non_poweroff = \"preserve\"\n\
             disk = [ \"drbd:res0,xvda,w\", \"format=raw,vdev=xvdb,backendtype=qdisk,target=/srv/raw.img\" ]\n",
        ]
        .iter()
        .map(|text| xlcfg::parse(text).unwrap())
        .collect()
    }

    #[test]
    fn libxl_child_round_trip() {
        if std::env::var_os(SHIM_ENV).is_none() {
            return; // run by translations_read_by_libxl in a child process
        }
        let lib = Libxl::open().expect("libxl context with the stub handles");
        let configs = golden_configs();
        for cfg in &configs {
            let ours = config::translate(cfg, &|t: &str| t.starts_with("/dev/"))
                .unwrap()
                .json;
            let text = lib
                .normalize_config_json(&serde_json::to_string(&ours).unwrap())
                .unwrap();
            let theirs: Value = serde_json::from_str(&text).unwrap();
            let lost = config::lost_in_libxl(&ours, &theirs);
            assert!(lost.is_empty(), "{}: {lost:#?}\n{text}", cfg.name);
        }
        // and libxl refuses what is not its JSON
        assert!(
            lib.normalize_config_json(r#"{"c_info": {"type": "kvm"}}"#)
                .is_err()
        );
        println!("libxl round trip: {} configs", configs.len());
    }

    #[test]
    fn translations_read_by_libxl() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("shim.c");
        let shim = dir.path().join("shim.so");
        std::fs::write(&source, SHIM_C).unwrap();
        let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let built = std::process::Command::new(&compiler)
            .args(["-shared", "-fPIC", "-o"])
            .arg(&shim)
            .arg(&source)
            .status();
        match built {
            Ok(status) if status.success() => {}
            other => {
                eprintln!("skipped: cannot build the libxl stub with {compiler}: {other:?}");
                return;
            }
        }
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "xen::tests::libxl_child_round_trip",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(SHIM_ENV, "1")
            .env("LD_PRELOAD", &shim)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{stdout}\n{stderr}");
        assert!(
            stdout.contains("libxl round trip: 3 configs"),
            "{stdout}\n{stderr}"
        );
    }
}
