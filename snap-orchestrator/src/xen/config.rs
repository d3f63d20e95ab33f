//! xl.cfg ([`DomainConfig`]) to libxl's JSON form of `libxl_domain_config`, the way xl's parser
//! (tools/xl/xl_parse.c) fills the struct, and back the few things snapctl reads from libxl's
//! view of a running domain. Pure code: no libxl call, no I/O except what the caller passes in
//! (whether a disk target is a block device).
//!
//! The JSON follows libxl's generated (de)serialisers (gentypes.py, libxl_types.idl): enums as
//! lower-case strings, `libxl_defbool` as `"True"`/`"False"`, bitmaps as lists of set bits,
//! the build-info union as `"type.pv"` / `"type.pvh"` / `"type.hvm"`. Only non-default values
//! are written, so that what libxl writes back (it leaves defaults out) holds every value
//! given — a check the unit tests run against the real libxl when they can.
//!
//! What is translated: name, uuid, memory / maxmem, vcpus / maxvcpus, type (or the legacy
//! builder), kernel, ramdisk, cmdline (or root + extra, as xl joins them), bootloader, the
//! on_* actions, disks (target, format, vdev, access, cdrom, backend as libxl would choose it,
//! script, discard, direct-io-safe, trusted), vifs (mac, bridge, ip, model, type, vifname,
//! script, gatewaydev, mtu) and, for HVM, serial, boot, vnc, sdl, acpi, apic, pae, hap,
//! localtime and the device model version. Anything else in the file is refused by name rather
//! than silently dropped (PCI passthrough, driver domains, COLO...).

use std::path::Path;

use serde_json::{Map, Value, json};
use snap_core::{Error, Result};

use crate::xlcfg::{self, DiskAccess, DiskFormat, DiskSpec, DomainConfig};

/// A Xen domain type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainType {
    /// Paravirtualised.
    Pv,
    /// PVH.
    Pvh,
    /// Fully virtualised (with a QEMU device model).
    Hvm,
}

impl DomainType {
    /// libxl's name.
    pub fn as_str(self) -> &'static str {
        match self {
            DomainType::Pv => "pv",
            DomainType::Pvh => "pvh",
            DomainType::Hvm => "hvm",
        }
    }

    /// From libxl's name.
    pub fn parse(name: &str) -> Option<DomainType> {
        match name {
            "pv" => Some(DomainType::Pv),
            "pvh" => Some(DomainType::Pvh),
            "hvm" => Some(DomainType::Hvm),
            _ => None,
        }
    }
}

/// The backend that serves a disk to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskBackend {
    /// blkback on a block device (LVs): the kernel, no QEMU.
    Phy,
    /// QEMU's xen-block (qdisk): the image is open in the domain's device model.
    Qdisk,
    /// blktap (tapdisk); libxl since Xen 4.13 no longer offers it.
    Tap,
}

impl DiskBackend {
    /// libxl's name.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskBackend::Phy => "phy",
            DiskBackend::Qdisk => "qdisk",
            DiskBackend::Tap => "tap",
        }
    }
}

/// The extra parameters of a disk spec that libxl knows (from [`DiskSpec::to_spec`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskParams {
    /// `script=`.
    pub script: Option<String>,
    /// `backend=` (a driver domain).
    pub backend_domain: Option<String>,
    /// `discard` / `no-discard`.
    pub discard: Option<bool>,
    /// `direct-io-safe`.
    pub direct_io_safe: bool,
    /// `trusted` / `untrusted`.
    pub trusted: Option<bool>,
    /// Parameters snapctl does not translate.
    pub unsupported: Vec<String>,
}

/// The parameters of `disk`'s spec besides target, format, vdev, access, backendtype, devtype.
pub fn disk_params(disk: &DiskSpec) -> DiskParams {
    let canonical = disk.to_spec();
    let head = canonical
        .split_once(",target=")
        .map_or(canonical.as_str(), |(head, _)| head);
    let mut params = DiskParams::default();
    for token in head.split(',') {
        let (key, value) = token.split_once('=').unwrap_or((token, ""));
        match key {
            "format" | "vdev" | "access" | "backendtype" | "devtype" => {}
            "script" => params.script = Some(value.to_string()),
            "backend" => params.backend_domain = Some(value.to_string()),
            "discard" => params.discard = Some(true),
            "no-discard" => params.discard = Some(false),
            "direct-io-safe" => params.direct_io_safe = true,
            "trusted" => params.trusted = Some(true),
            "untrusted" => params.trusted = Some(false),
            "specification" if value == "xen" => {}
            _ => params.unsupported.push(token.to_string()),
        }
    }
    params
}

/// The backend libxl picks for `disk` (libxl_device.c, `libxl__device_disk_set_backend` in Xen
/// 4.17): the one given as `backendtype=`, else `phy` for a raw disk on a block device (or with
/// a `script=`), else `qdisk`. `is_block_device`: whether the target is one.
pub fn disk_backend(disk: &DiskSpec, is_block_device: bool) -> DiskBackend {
    match disk.backendtype.as_deref() {
        Some("phy") => return DiskBackend::Phy,
        Some("tap") => return DiskBackend::Tap,
        Some("qdisk") => return DiskBackend::Qdisk,
        _ => {}
    }
    let params = disk_params(disk);
    if disk.format == DiskFormat::Raw
        && (is_block_device || params.script.is_some() || params.backend_domain.is_some())
    {
        DiskBackend::Phy
    } else {
        DiskBackend::Qdisk
    }
}

/// Whether `target` is a block device (LVs); an absent path under /dev counts as one (libxl
/// would refuse it anyway when it does not exist).
pub fn is_block_device(target: &str) -> bool {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(target) {
        Ok(meta) => meta.file_type().is_block_device(),
        Err(_) => target.starts_with("/dev/"),
    }
}

/// QEMU's block driver for an xl format, as Xen's qdisk backend names it.
pub fn qemu_driver(format: DiskFormat) -> Option<&'static str> {
    match format {
        DiskFormat::Raw => Some("raw"),
        DiskFormat::Qcow => Some("qcow"),
        DiskFormat::Qcow2 => Some("qcow2"),
        DiskFormat::Vhd => Some("vpc"),
        DiskFormat::Qed => Some("qed"),
        DiskFormat::Empty => None,
    }
}

/// The QMP node name of a qdisk disk: QEMU's xen-block backend adds each disk as a blockdev named
/// `VDEV-DRIVER` (hw/block/xen-block.c, `xen_block_blockdev_add`), e.g. `xvda-qcow2`.
pub fn qdisk_node(vdev: &str, format: DiskFormat) -> String {
    format!("{vdev}-{}", qemu_driver(format).unwrap_or("raw"))
}

/// A translation and what it could not carry over (said to the user, not fatal).
#[derive(Debug, Clone, PartialEq)]
pub struct Translation {
    /// libxl's `libxl_domain_config` JSON.
    pub json: Value,
    /// Settings left out, one sentence each.
    pub notes: Vec<String>,
}

/// The domain type an xl.cfg asks for: `type`, else the legacy `builder`, else PV (xl on x86).
pub fn domain_type(cfg: &DomainConfig) -> Result<DomainType> {
    let text = |key: &str| -> Result<Option<&str>> {
        match other(cfg, key) {
            None => Ok(None),
            Some(xlcfg::Value::Str(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(Error::invalid(format!(
                "xl.cfg key `{key}`: expected a string"
            ))),
        }
    };
    let by_type = match text("type")? {
        None => None,
        Some(name) => Some(DomainType::parse(name).ok_or_else(|| {
            Error::invalid(format!(
                "xl.cfg key `type`: unknown domain type {name:?} (pv, pvh or hvm)"
            ))
        })?),
    };
    let by_builder = match text("builder")? {
        None => None,
        Some("hvm") => Some(DomainType::Hvm),
        Some("generic") => Some(DomainType::Pv),
        Some(other) => {
            return Err(Error::invalid(format!(
                "xl.cfg key `builder`: unknown builder {other:?} (hvm or generic)"
            )));
        }
    };
    match (by_type, by_builder) {
        (Some(a), Some(b)) if a != b => Err(Error::invalid(
            "xl.cfg keys `type` and `builder` contradict each other",
        )),
        (Some(t), _) | (None, Some(t)) => Ok(t),
        (None, None) => Ok(DomainType::Pv),
    }
}

fn other<'a>(cfg: &'a DomainConfig, key: &str) -> Option<&'a xlcfg::Value> {
    cfg.other.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

/// The keys of `other` the translation understands.
const TRANSLATED_KEYS: [&str; 18] = [
    "type",
    "builder",
    "maxvcpus",
    "on_poweroff",
    "on_reboot",
    "on_crash",
    "on_watchdog",
    "bootloader",
    "cmdline",
    "boot",
    "vnc",
    "sdl",
    "acpi",
    "apic",
    "pae",
    "hap",
    "localtime",
    "device_model_version",
];

fn int_of(key: &str, value: &xlcfg::Value) -> Result<i64> {
    match value {
        xlcfg::Value::Int(i) => Ok(*i),
        _ => Err(Error::invalid(format!(
            "xl.cfg key `{key}`: expected an integer"
        ))),
    }
}

fn str_of<'a>(key: &str, value: &'a xlcfg::Value) -> Result<&'a str> {
    match value {
        xlcfg::Value::Str(s) => Ok(s),
        _ => Err(Error::invalid(format!(
            "xl.cfg key `{key}`: expected a string"
        ))),
    }
}

/// xl's boolean: an integer, 0 false.
fn defbool(key: &str, value: &xlcfg::Value) -> Result<Value> {
    Ok(json!(if int_of(key, value)? != 0 {
        "True"
    } else {
        "False"
    }))
}

/// An `on_*` action in libxl's spelling.
fn action(key: &str, value: &xlcfg::Value) -> Result<Value> {
    let name = str_of(key, value)?;
    let libxl = match name {
        "destroy" => "destroy",
        "restart" => "restart",
        "rename-restart" => "restart_rename",
        "preserve" => "preserve",
        "coredump-destroy" => "coredump_destroy",
        "coredump-restart" => "coredump_restart",
        "soft-reset" => "soft_reset",
        other => {
            return Err(Error::invalid(format!(
                "xl.cfg key `{key}`: unknown action {other:?}"
            )));
        }
    };
    Ok(json!(libxl))
}

fn path_text(what: &str, path: &Path) -> Result<String> {
    path.to_str()
        .map(str::to_string)
        .ok_or_else(|| Error::invalid(format!("{what} path is not UTF-8")).with_path(path))
}

/// The kernel command line as xl builds it: `cmdline`, else `root=ROOT EXTRA`.
fn cmdline(cfg: &DomainConfig) -> Result<Option<String>> {
    if let Some(value) = other(cfg, "cmdline") {
        return Ok(Some(str_of("cmdline", value)?.to_string()));
    }
    Ok(match (&cfg.root, &cfg.extra) {
        (Some(root), Some(extra)) => Some(format!("root={root} {extra}")),
        (Some(root), None) => Some(format!("root={root}")),
        (None, Some(extra)) => Some(extra.clone()),
        (None, None) => None,
    })
}

/// One disk in libxl's JSON form.
pub fn disk_json(disk: &DiskSpec, is_block_device: bool) -> Result<Value> {
    let vdev = &disk.vdev;
    let params = disk_params(disk);
    if let Some(param) = params.unsupported.first() {
        return Err(Error::unsupported(format!(
            "disk {vdev}: parameter `{param}` is not supported by snapctl's Xen driver"
        )));
    }
    if params.backend_domain.is_some() {
        return Err(Error::unsupported(format!(
            "disk {vdev}: driver domains (`backend=`) are not supported by snapctl's Xen driver"
        )));
    }
    if disk.target.starts_with("rbd:") {
        return Err(Error::unsupported(format!(
            "disk {vdev}: RBD disks are not supported by snapctl's Xen driver yet"
        )));
    }
    let backend = disk_backend(disk, is_block_device);
    match backend {
        DiskBackend::Tap => {
            return Err(Error::unsupported(format!(
                "disk {vdev}: backendtype=tap (blktap) is not available in libxl since Xen \
                 4.13; use backendtype=qdisk or leave it out"
            )));
        }
        DiskBackend::Phy if disk.format != DiskFormat::Raw => {
            return Err(Error::invalid(format!(
                "disk {vdev}: backendtype=phy serves raw disks only, not {}",
                disk.format.as_str()
            )));
        }
        _ => {}
    }
    let cdrom = disk.devtype.as_deref() == Some("cdrom");
    let mut out = Map::new();
    if !disk.target.is_empty() {
        out.insert("pdev_path".into(), json!(disk.target));
    }
    out.insert("vdev".into(), json!(vdev));
    out.insert("backend".into(), json!(backend.as_str()));
    out.insert("format".into(), json!(disk.format.as_str()));
    if let Some(script) = &params.script {
        out.insert("script".into(), json!(script));
    }
    if cdrom {
        out.insert("removable".into(), json!(1));
        out.insert("is_cdrom".into(), json!(1));
    } else if disk.access == DiskAccess::ReadWrite {
        out.insert("readwrite".into(), json!(1));
    }
    if params.direct_io_safe {
        out.insert("direct_io_safe".into(), json!(true));
    }
    if let Some(discard) = params.discard {
        out.insert(
            "discard_enable".into(),
            json!(if discard { "True" } else { "False" }),
        );
    }
    if let Some(trusted) = params.trusted {
        out.insert(
            "trusted".into(),
            json!(if trusted { "True" } else { "False" }),
        );
    }
    Ok(Value::Object(out))
}

/// One `vif` spec (`mac=...,bridge=...`) in libxl's JSON form.
pub fn nic_json(spec: &str) -> Result<Value> {
    let mut out = Map::new();
    for token in spec.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let Some((key, value)) = token.split_once('=') else {
            return Err(Error::invalid(format!(
                "vif {spec:?}: expected KEY=VALUE, found {token:?}"
            )));
        };
        let (key, value) = (key.trim(), value.trim());
        match key {
            "mac" => {
                let octets: Vec<&str> = value.split(':').collect();
                let valid = octets.len() == 6
                    && octets
                        .iter()
                        .all(|o| o.len() == 2 && o.chars().all(|c| c.is_ascii_hexdigit()));
                if !valid {
                    return Err(Error::invalid(format!("vif {spec:?}: bad mac {value:?}")));
                }
                out.insert("mac".into(), json!(value.to_ascii_lowercase()));
            }
            "bridge" | "ip" | "model" | "script" | "gatewaydev" => {
                out.insert(key.into(), json!(value));
            }
            "vifname" => {
                out.insert("ifname".into(), json!(value));
            }
            "type" => {
                let nictype = match value {
                    "ioemu" => "vif_ioemu",
                    "vif" => "vif",
                    other => {
                        return Err(Error::invalid(format!(
                            "vif {spec:?}: unknown type {other:?} (ioemu or vif)"
                        )));
                    }
                };
                out.insert("nictype".into(), json!(nictype));
            }
            "mtu" => {
                let mtu: u32 =
                    value.parse().ok().filter(|m| *m > 0).ok_or_else(|| {
                        Error::invalid(format!("vif {spec:?}: bad mtu {value:?}"))
                    })?;
                out.insert("mtu".into(), json!(mtu));
            }
            other => {
                return Err(Error::unsupported(format!(
                    "vif {spec:?}: key `{other}` is not supported by snapctl's Xen driver \
                     (mac, bridge, ip, model, type, vifname, script, gatewaydev, mtu)"
                )));
            }
        }
    }
    Ok(Value::Object(out))
}

/// Translates an xl.cfg into libxl's domain config JSON. `is_block_device(target)` tells
/// whether a disk target is a block device (see [`is_block_device`]).
pub fn translate(
    cfg: &DomainConfig,
    is_block_device: &dyn Fn(&str) -> bool,
) -> Result<Translation> {
    let mut notes = Vec::new();
    if let Some((key, _)) = cfg
        .other
        .iter()
        .find(|(k, _)| !TRANSLATED_KEYS.contains(&k.as_str()))
    {
        return Err(Error::unsupported(format!(
            "xl.cfg key `{key}` is not supported by snapctl's Xen driver (it translates name, \
             uuid, memory, maxmem, vcpus, kernel, ramdisk, extra, root, serial, vif, disk and {})",
            TRANSLATED_KEYS.join(", ")
        )));
    }
    let dtype = domain_type(cfg)?;
    let hvm = dtype == DomainType::Hvm;

    let mut c_info = Map::new();
    c_info.insert("type".into(), json!(dtype.as_str()));
    c_info.insert("name".into(), json!(cfg.name));
    if let Some(uuid) = &cfg.uuid {
        c_info.insert("uuid".into(), json!(uuid.to_ascii_lowercase()));
    }

    let vcpus = cfg.vcpus.max(1);
    let max_vcpus = match other(cfg, "maxvcpus") {
        Some(v) => {
            let max = int_of("maxvcpus", v)?;
            if max < i64::from(vcpus) {
                return Err(Error::invalid(format!(
                    "xl.cfg: maxvcpus ({max}) is below vcpus ({vcpus})"
                )));
            }
            max
        }
        None => i64::from(vcpus),
    };
    let memory_kib = cfg.memory_mib.saturating_mul(1024);
    let max_kib = cfg
        .maxmem_mib
        .unwrap_or(cfg.memory_mib)
        .saturating_mul(1024);
    let mut b_info = Map::new();
    b_info.insert("max_vcpus".into(), json!(max_vcpus));
    b_info.insert(
        "avail_vcpus".into(),
        Value::Array((0..vcpus).map(|i| json!(i)).collect()),
    );
    b_info.insert("max_memkb".into(), json!(max_kib));
    b_info.insert("target_memkb".into(), json!(memory_kib));
    if let Some(kernel) = &cfg.kernel {
        b_info.insert("kernel".into(), json!(path_text("kernel", kernel)?));
    }
    if let Some(ramdisk) = &cfg.ramdisk {
        b_info.insert("ramdisk".into(), json!(path_text("ramdisk", ramdisk)?));
    }
    if let Some(cmdline) = cmdline(cfg)? {
        b_info.insert("cmdline".into(), json!(cmdline));
    }
    if let Some(v) = other(cfg, "bootloader") {
        b_info.insert("bootloader".into(), json!(str_of("bootloader", v)?));
    }
    if let Some(v) = other(cfg, "localtime") {
        b_info.insert("localtime".into(), defbool("localtime", v)?);
    }
    if let Some(v) = other(cfg, "device_model_version") {
        let version = match str_of("device_model_version", v)? {
            "qemu-xen" => "qemu_xen",
            "qemu-xen-traditional" => "qemu_xen_traditional",
            other => {
                return Err(Error::invalid(format!(
                    "xl.cfg key `device_model_version`: unknown version {other:?}"
                )));
            }
        };
        b_info.insert("device_model_version".into(), json!(version));
    }
    if let Some(v) = other(cfg, "hap") {
        c_info.insert("hap".into(), defbool("hap", v)?);
    }
    for key in ["acpi", "apic"] {
        if let Some(v) = other(cfg, key) {
            b_info.insert(key.into(), defbool(key, v)?);
        }
    }

    let mut union = Map::new();
    if hvm {
        if let Some(serial) = &cfg.serial {
            union.insert("serial".into(), json!(serial));
        }
        if let Some(v) = other(cfg, "boot") {
            union.insert("boot".into(), json!(str_of("boot", v)?));
        }
        if let Some(v) = other(cfg, "pae") {
            union.insert("pae".into(), defbool("pae", v)?);
        }
        for key in ["vnc", "sdl"] {
            if let Some(v) = other(cfg, key) {
                union.insert(key.into(), json!({"enable": defbool(key, v)?}));
            }
        }
    } else {
        if cfg.serial.is_some() {
            notes.push(format!(
                "`serial` is for HVM guests; a {} guest's console goes through xenconsoled \
                 (`xl console {}`)",
                dtype.as_str(),
                cfg.name
            ));
        }
        for key in ["boot", "pae", "vnc", "sdl"] {
            if other(cfg, key).is_some() {
                notes.push(format!(
                    "`{key}` applies to HVM guests only; left out for a {} guest",
                    dtype.as_str()
                ));
            }
        }
    }
    b_info.insert(format!("type.{}", dtype.as_str()), Value::Object(union));

    let mut disks = Vec::new();
    for disk in &cfg.disks {
        disks.push(disk_json(disk, is_block_device(&disk.target))?);
    }
    let mut nics = Vec::new();
    for vif in &cfg.vifs {
        nics.push(nic_json(vif)?);
    }

    let mut root = Map::new();
    root.insert("c_info".into(), Value::Object(c_info));
    root.insert("b_info".into(), Value::Object(b_info));
    if !disks.is_empty() {
        root.insert("disks".into(), Value::Array(disks));
    }
    if !nics.is_empty() {
        root.insert("nics".into(), Value::Array(nics));
    }
    // xl's defaults (on_reboot = restart matters to a toolstack that watches the domain; snapctl
    // does not, like `xl create` without its monitor).
    let actions = [
        ("on_poweroff", "destroy"),
        ("on_reboot", "restart"),
        ("on_watchdog", "destroy"),
        ("on_crash", "destroy"),
    ];
    for (key, default) in actions {
        let value = match other(cfg, key) {
            Some(v) => action(key, v)?,
            None => json!(default),
        };
        // libxl's default is destroy: left out, like libxl writes it.
        if value != json!("destroy") {
            root.insert(key.into(), value);
        }
    }
    Ok(Translation {
        json: Value::Object(root),
        notes,
    })
}

/// A disk as libxl sees it in a running domain's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibxlDisk {
    /// The guest's device name.
    pub vdev: String,
    /// The image or device (empty for an empty cdrom).
    pub target: String,
    /// libxl's format name (`qcow2`, `raw`...).
    pub format: String,
    /// libxl's backend name (`qdisk`, `phy`...; `unknown` when not chosen yet).
    pub backend: String,
}

/// The disks of a `libxl_domain_config` JSON.
pub fn libxl_disks(config: &Value) -> Vec<LibxlDisk> {
    let text = |disk: &Value, key: &str, default: &str| {
        disk.get(key)
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_string()
    };
    config
        .get("disks")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|disk| LibxlDisk {
            vdev: text(disk, "vdev", ""),
            target: text(disk, "pdev_path", ""),
            format: text(disk, "format", "unknown"),
            backend: text(disk, "backend", "unknown"),
        })
        .collect()
}

/// The domain type of a `libxl_domain_config` JSON.
pub fn libxl_domain_type(config: &Value) -> Option<DomainType> {
    config
        .get("c_info")
        .and_then(|c| c.get("type"))
        .and_then(Value::as_str)
        .and_then(DomainType::parse)
}

/// Makes a saved `libxl_domain_config` JSON fit for re-creating the domain now: every disk
/// follows `cfg` (the active layers change with snapshots and reverts; matched by vdev), and
/// the domid is left to Xen.
pub fn for_restore(saved: &Value, cfg: &DomainConfig) -> Result<Value> {
    let mut config = saved.clone();
    let Some(root) = config.as_object_mut() else {
        return Err(Error::corrupt(
            "the saved libxl configuration is not a JSON object",
        ));
    };
    if let Some(c_info) = root.get_mut("c_info").and_then(Value::as_object_mut) {
        c_info.remove("domid");
    }
    if let Some(disks) = root.get_mut("disks").and_then(Value::as_array_mut) {
        for disk in disks.iter_mut() {
            let Some(vdev) = disk.get("vdev").and_then(Value::as_str) else {
                continue;
            };
            let Some(spec) = cfg.disk(vdev) else {
                continue;
            };
            if let Some(object) = disk.as_object_mut() {
                if spec.target.is_empty() {
                    object.remove("pdev_path");
                } else {
                    object.insert("pdev_path".into(), json!(spec.target));
                }
                object.insert("format".into(), json!(spec.format.as_str()));
            }
        }
    }
    Ok(config)
}

/// Where `ours` (a translation) and `libxl`'s rendering of it differ: every value given must
/// come back equal (libxl ignores keys it does not know, and leaves defaults out). One line per
/// difference, with its JSON path.
pub fn lost_in_libxl(ours: &Value, libxl: &Value) -> Vec<String> {
    let mut lost = Vec::new();
    compare(ours, libxl, "", &mut lost);
    lost
}

fn compare(ours: &Value, theirs: &Value, path: &str, lost: &mut Vec<String>) {
    match (ours, theirs) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                let at = format!("{path}/{key}");
                match b.get(key) {
                    Some(other) => compare(value, other, &at, lost),
                    // An empty object (a union arm with no fields) is written back empty.
                    None if value.as_object().is_some_and(Map::is_empty) => {}
                    None => lost.push(format!("{at}: {value} is missing")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                compare(x, y, &format!("{path}/{i}"), lost);
            }
        }
        (a, b) if a == b => {}
        (a, b) => lost.push(format!("{path}: {a} came back as {b}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> DomainConfig {
        xlcfg::parse(text).unwrap()
    }

    fn no_block(_: &str) -> bool {
        false
    }

    fn lvm_is_block(target: &str) -> bool {
        target.starts_with("/dev/")
    }

    #[test]
    fn golden_pv_guest() {
        let cfg = parse(
            r#"
name = "web"
uuid = "6A1E8F3C-2B7D-4E59-9C1A-0D2E3F405162"
memory = 512
maxmem = 1024
vcpus = 2
kernel = "/boot/vmlinuz"
ramdisk = "/boot/initrd.img"
root = "/dev/xvda1"
extra = "console=hvc0 quiet"
vif = [ "mac=00:16:3E:01:02:03,bridge=xenbr0", "" ]
disk = [
    "format=qcow2,vdev=xvda,access=rw,target=/srv/web.qcow2",
    "/dev/vg0/data,raw,xvdb,rw",
    "format=vhd,vdev=xvdc,access=ro,target=/srv/ro.vhd",
    ",,hdc:cdrom,r",
]
"#,
        );
        let t = translate(&cfg, &lvm_is_block).unwrap();
        assert!(t.notes.is_empty());
        let expected = json!({
            "c_info": {"type": "pv", "name": "web", "uuid": "6a1e8f3c-2b7d-4e59-9c1a-0d2e3f405162"},
            "b_info": {
                "max_vcpus": 2,
                "avail_vcpus": [0, 1],
                "max_memkb": 1048576,
                "target_memkb": 524288,
                "kernel": "/boot/vmlinuz",
                "ramdisk": "/boot/initrd.img",
                "cmdline": "root=/dev/xvda1 console=hvc0 quiet",
                "type.pv": {}
            },
            "disks": [
                {"pdev_path": "/srv/web.qcow2", "vdev": "xvda", "backend": "qdisk",
                 "format": "qcow2", "readwrite": 1},
                {"pdev_path": "/dev/vg0/data", "vdev": "xvdb", "backend": "phy",
                 "format": "raw", "readwrite": 1},
                {"pdev_path": "/srv/ro.vhd", "vdev": "xvdc", "backend": "qdisk", "format": "vhd"},
                {"vdev": "hdc", "backend": "qdisk", "format": "empty", "removable": 1,
                 "is_cdrom": 1}
            ],
            "nics": [{"mac": "00:16:3e:01:02:03", "bridge": "xenbr0"}, {}],
            "on_reboot": "restart"
        });
        assert_eq!(
            t.json,
            expected,
            "{}",
            serde_json::to_string_pretty(&t.json).unwrap()
        );
    }

    #[test]
    fn golden_hvm_guest() {
        let cfg = parse(
            r#"
name = "win"
type = "hvm"
memory = 2048
vcpus = 4
maxvcpus = 8
serial = "file:/var/log/win.console"
boot = "c"
vnc = 0
acpi = 1
hap = 1
on_reboot = "destroy"
on_crash = "coredump-restart"
device_model_version = "qemu-xen"
disk = [ "format=qcow2,vdev=hda,access=rw,discard,direct-io-safe,target=/srv/win.qcow2" ]
"#,
        );
        let t = translate(&cfg, &no_block).unwrap();
        let expected = json!({
            "c_info": {"type": "hvm", "name": "win", "hap": "True"},
            "b_info": {
                "max_vcpus": 8,
                "avail_vcpus": [0, 1, 2, 3],
                "max_memkb": 2097152,
                "target_memkb": 2097152,
                "acpi": "True",
                "device_model_version": "qemu_xen",
                "type.hvm": {
                    "serial": "file:/var/log/win.console",
                    "boot": "c",
                    "vnc": {"enable": "False"}
                }
            },
            "disks": [
                {"pdev_path": "/srv/win.qcow2", "vdev": "hda", "backend": "qdisk",
                 "format": "qcow2", "readwrite": 1, "direct_io_safe": true,
                 "discard_enable": "True"}
            ],
            "on_crash": "coredump_restart"
        });
        assert_eq!(
            t.json,
            expected,
            "{}",
            serde_json::to_string_pretty(&t.json).unwrap()
        );
    }

    #[test]
    fn golden_pvh_with_notes() {
        let cfg = parse(
            "name = \"p\"\ntype = \"pvh\"\nkernel = \"/k\"\nextra = \"console=hvc0\"\n\
             cmdline = \"ro quiet\"\nserial = \"file:/tmp/c\"\n",
        );
        let t = translate(&cfg, &no_block).unwrap();
        assert_eq!(t.json["c_info"]["type"], "pvh");
        assert_eq!(
            t.json["b_info"]["cmdline"], "ro quiet",
            "cmdline wins, as in xl"
        );
        assert_eq!(t.json["b_info"]["type.pvh"], json!({}));
        assert_eq!(t.json["b_info"]["max_memkb"], 131072, "128 MiB default");
        assert_eq!(t.notes.len(), 1);
        assert!(t.notes[0].contains("serial"));
        assert!(t.json.get("disks").is_none());
    }

    #[test]
    fn builder_and_type() {
        let hvm = parse("name = \"a\"\nbuilder = \"hvm\"\n");
        assert_eq!(domain_type(&hvm).unwrap(), DomainType::Hvm);
        let both = parse("name = \"a\"\nbuilder = \"hvm\"\ntype = \"pv\"\n");
        assert!(domain_type(&both).is_err());
        let bad = parse("name = \"a\"\ntype = \"kvm\"\n");
        assert!(translate(&bad, &no_block).is_err());
        assert_eq!(
            domain_type(&parse("name = \"a\"\n")).unwrap(),
            DomainType::Pv
        );
    }

    #[test]
    fn refusals_name_the_problem() {
        let err = |text: &str| translate(&parse(text), &no_block).unwrap_err().to_string();
        assert!(err("name = \"a\"\npci = [ \"01:00.0\" ]\n").contains("`pci`"));
        assert!(err("name = \"a\"\nvcpus = 4\nmaxvcpus = 2\n").contains("maxvcpus"));
        assert!(
            err("name = \"a\"\ndisk = [ \"format=qcow2,vdev=xvda,backendtype=tap,target=/a\" ]\n")
                .contains("blktap")
        );
        assert!(
            err("name = \"a\"\ndisk = [ \"format=qcow2,vdev=xvda,backendtype=phy,target=/a\" ]\n")
                .contains("raw disks only")
        );
        assert!(
            err("name = \"a\"\ndisk = [ \"backend=dd,format=raw,vdev=xvda,target=/dev/x\" ]\n")
                .contains("driver domains")
        );
        assert!(err("name = \"a\"\ndisk = [ \"colo,/x,raw,xvda\" ]\n").contains("`colo`"));
        assert!(err("name = \"a\"\nvif = [ \"rate=10Mb/s\" ]\n").contains("`rate`"));
        assert!(err("name = \"a\"\nvif = [ \"mac=zz\" ]\n").contains("bad mac"));
        assert!(err("name = \"a\"\non_crash = \"explode\"\n").contains("on_crash"));
    }

    #[test]
    fn backend_choice_per_disk_type() {
        let disk = |spec: &str| xlcfg::parse_disk_spec(spec).unwrap();
        // phy: an LV (raw on a block device), or backendtype=phy, or a script
        let lv = disk("/dev/vg0/lv,raw,xvda,rw");
        assert_eq!(disk_backend(&lv, true), DiskBackend::Phy);
        assert_eq!(
            disk_backend(&disk("phy:/dev/vg0/lv,xvda,w"), false),
            DiskBackend::Phy
        );
        assert_eq!(
            disk_backend(&disk("drbd:res0,xvda,w"), false),
            DiskBackend::Phy
        );
        // a raw file: qdisk
        assert_eq!(
            disk_backend(&disk("/srv/a.img,raw,xvda,rw"), false),
            DiskBackend::Qdisk
        );
        // qcow2 and vhd: qdisk (phy serves raw only; blktap is gone), even on a block device
        let qcow2 = disk("format=qcow2,vdev=xvda,target=/srv/a.qcow2");
        assert_eq!(disk_backend(&qcow2, false), DiskBackend::Qdisk);
        assert_eq!(disk_backend(&qcow2, true), DiskBackend::Qdisk);
        let vhd = disk("format=vhd,vdev=xvda,target=/srv/a.vhd");
        assert_eq!(disk_backend(&vhd, false), DiskBackend::Qdisk);
        // explicit tap/vhd: tap (not QEMU)
        let tap = disk("format=vhd,vdev=xvda,backendtype=tap,target=/srv/a.vhd");
        assert_eq!(disk_backend(&tap, false), DiskBackend::Tap);
        // an explicit qdisk on an LV
        let qlv = disk("format=raw,vdev=xvda,backendtype=qdisk,target=/dev/vg0/lv");
        assert_eq!(disk_backend(&qlv, true), DiskBackend::Qdisk);
    }

    #[test]
    fn node_names() {
        assert_eq!(qdisk_node("xvda", DiskFormat::Qcow2), "xvda-qcow2");
        assert_eq!(qdisk_node("hda", DiskFormat::Vhd), "hda-vpc");
        assert_eq!(qdisk_node("xvdb", DiskFormat::Raw), "xvdb-raw");
    }

    #[test]
    fn block_devices() {
        assert!(!is_block_device("/etc/hostname"));
        assert!(is_block_device("/dev/no-such-vg/lv"));
        assert!(!is_block_device("/srv/no-such.qcow2"));
    }

    #[test]
    fn disks_from_libxl_view() {
        let config = json!({
            "c_info": {"type": "pvh", "name": "a"},
            "disks": [
                {"pdev_path": "/srv/a.qcow2", "vdev": "xvda", "backend": "qdisk", "format": "qcow2"},
                {"vdev": "xvdb"}
            ]
        });
        assert_eq!(libxl_domain_type(&config), Some(DomainType::Pvh));
        assert_eq!(
            libxl_disks(&config),
            vec![
                LibxlDisk {
                    vdev: "xvda".into(),
                    target: "/srv/a.qcow2".into(),
                    format: "qcow2".into(),
                    backend: "qdisk".into()
                },
                LibxlDisk {
                    vdev: "xvdb".into(),
                    target: String::new(),
                    format: "unknown".into(),
                    backend: "unknown".into()
                }
            ]
        );
        assert!(libxl_disks(&json!({})).is_empty());
    }

    #[test]
    fn restore_follows_the_active_layers() {
        let saved = json!({
            "c_info": {"type": "pv", "name": "a", "domid": 7},
            "disks": [
                {"pdev_path": "/srv/a.qcow2", "vdev": "xvda", "backend": "qdisk", "format": "qcow2"},
                {"pdev_path": "/dev/vg/lv", "vdev": "xvdb", "backend": "phy", "format": "raw"}
            ]
        });
        let cfg =
            parse("name = \"a\"\ndisk = [ \"format=qcow2,vdev=xvda,target=/srv/a.s1.qcow2\" ]\n");
        let config = for_restore(&saved, &cfg).unwrap();
        assert!(config["c_info"].get("domid").is_none());
        assert_eq!(config["disks"][0]["pdev_path"], "/srv/a.s1.qcow2");
        assert_eq!(
            config["disks"][1]["pdev_path"], "/dev/vg/lv",
            "unknown vdev kept"
        );
        assert!(for_restore(&json!([1]), &cfg).is_err());
    }

    #[test]
    fn comparison_with_libxl_output() {
        let ours = json!({"b_info": {"type.pv": {}, "max_memkb": 1}, "disks": [{"vdev": "a"}]});
        let same = json!({"b_info": {"type.pv": {}, "max_memkb": 1, "sched_params": {}},
                          "disks": [{"vdev": "a", "backend": "qdisk"}]});
        assert!(lost_in_libxl(&ours, &same).is_empty());
        let dropped = json!({"b_info": {"max_memkb": 2}, "disks": []});
        let lost = lost_in_libxl(&ours, &dropped);
        assert_eq!(lost.len(), 2, "{lost:?}");
        assert!(lost[0].contains("/b_info/max_memkb"));
    }
}
