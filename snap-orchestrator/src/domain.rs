//! `snapctl domain start|list|destroy` and what every domain command shares: the context (state
//! dir, hypervisor choice, dry run) and loading a defined domain.

use std::path::Path;

use serde_json::json;
use snap_core::{Error, ErrorKind, Result};

use crate::cli::Hypervisor as HypervisorArg;
use crate::hypervisor::{Hypervisor, LiveState, StartMode};
use crate::qemu::QemuDriver;
use crate::store::{DomainLock, DomainRecord, Store};
use crate::xlcfg;

/// What every domain command runs with.
#[derive(Debug)]
pub struct Ctx {
    /// The metadata store.
    pub store: Store,
    /// `--hypervisor`, when given.
    pub hypervisor: Option<HypervisorArg>,
    /// `--dry-run`.
    pub dry_run: bool,
    /// `--wait`: how long to wait for a domain another snapctl is working on.
    pub lock_timeout: std::time::Duration,
}

/// Whether this host is a Xen dom0.
pub fn is_xen_dom0() -> bool {
    std::fs::read_to_string("/proc/xen/capabilities").is_ok_and(|c| c.contains("control_d"))
}

impl Ctx {
    /// Locks domain `name` for an operation, waiting up to `--wait` for another snapctl.
    pub fn lock(&self, name: &str) -> Result<crate::store::DomainLock> {
        self.store.lock_timeout(name, self.lock_timeout)
    }

    /// The hypervisor new domains get: `--hypervisor`, else xen on a dom0, else qemu.
    pub fn default_hypervisor(&self) -> &'static str {
        match self.hypervisor {
            Some(HypervisorArg::Xen) => "xen",
            Some(HypervisorArg::Qemu) => "qemu",
            None if is_xen_dom0() => "xen",
            None => "qemu",
        }
    }

    /// The driver of a hypervisor by name.
    pub fn driver(&self, name: &str) -> Result<Box<dyn Hypervisor>> {
        match name {
            "qemu" => Ok(Box::new(QemuDriver::new(self.store.clone()))),
            #[cfg(feature = "xen")]
            "xen" => Ok(Box::new(crate::xen::XenDriver::new(self.store.clone())?)),
            #[cfg(not(feature = "xen"))]
            "xen" => Err(Error::unsupported(
                "this snapctl was built without Xen support (cargo feature `xen`, which links \
                 libxenlight); rebuild it with `--features xen` or use --hypervisor qemu",
            )),
            other => Err(Error::corrupt(format!("unknown hypervisor {other:?}"))),
        }
    }

    /// The driver of a defined domain (the one it was defined with; `--hypervisor` must agree).
    pub fn driver_for(&self, rec: &DomainRecord) -> Result<Box<dyn Hypervisor>> {
        if let Some(arg) = self.hypervisor {
            let wanted = match arg {
                HypervisorArg::Xen => "xen",
                HypervisorArg::Qemu => "qemu",
            };
            if wanted != rec.hypervisor {
                return Err(Error::invalid(format!(
                    "domain {} is a {} domain, not {wanted}",
                    rec.name, rec.hypervisor
                )));
            }
        }
        self.driver(&rec.hypervisor)
    }
}

/// Loads a domain under its lock; NotFound when it was never defined.
pub fn load_defined(lock: &DomainLock, domain: &str) -> Result<DomainRecord> {
    lock.load()?.ok_or_else(|| {
        Error::not_found(format!(
            "domain {domain} is not defined here; start it with `snapctl domain start CFG`"
        ))
    })
}

/// `domain start CFG`: defines the domain from its xl.cfg (the first time) and starts it.
/// Later starts take the file's settings again, but disks keep following their snapshots: a disk
/// whose active layer changed through snapctl stays on that layer.
pub async fn start(ctx: &Ctx, cfg: &Path) -> Result<u8> {
    let mut config = xlcfg::parse_file(cfg)?;
    let source = std::fs::canonicalize(cfg).map_err(|e| Error::io("open", e).with_path(cfg))?;
    if let Some(dir) = source.parent() {
        config.resolve_relative(dir);
    }
    let name = config.name.clone();
    crate::store::validate_name("domain", &name)?;
    let lock = ctx.lock(&name)?;
    let known = match lock.load()? {
        Some(rec) => Some(crate::exec::settle(ctx, &lock, rec).await?),
        None => None,
    };
    let mut rec = match known {
        Some(mut rec) => {
            for disk in &mut config.disks {
                if let Some(known) = rec.config.disk(&disk.vdev)
                    && known.target != disk.target
                    && !rec.snapshots.is_empty()
                {
                    eprintln!(
                        "snapctl: note: disk {} stays on its current layer {} (it follows the domain's snapshots; the config names {})",
                        disk.vdev, known.target, disk.target
                    );
                    disk.target = known.target.clone();
                }
            }
            rec.config = config;
            rec.source = Some(source);
            rec
        }
        None => DomainRecord {
            version: 1,
            name: name.clone(),
            hypervisor: ctx.default_hypervisor().to_string(),
            config,
            source: Some(source),
            runtime: None,
            current: None,
            snapshots: Vec::new(),
        },
    };
    let driver = ctx.driver_for(&rec)?;
    let state = driver.state(&rec).await?;
    if state != LiveState::Shutoff {
        return Err(Error::new(
            ErrorKind::Exists,
            format!("domain {name} is already {}", state.as_str()),
        ));
    }
    if ctx.dry_run {
        println!(
            "plan: define domain {name} from {} and start it with the {} driver ({} MiB, {} vCPU, {} disk(s))",
            cfg.display(),
            driver.name(),
            rec.config.memory_mib,
            rec.config.vcpus,
            rec.config.disks.len()
        );
        println!("nothing changed (--dry-run)");
        return Ok(0);
    }
    let runtime = driver.start(&rec, StartMode::Running).await?;
    let pid = runtime.pid;
    rec.runtime = Some(runtime);
    lock.save(&rec)?;
    match pid {
        Some(pid) => println!("domain {name} started ({} pid {pid})", driver.name()),
        None => println!("domain {name} started ({})", driver.name()),
    }
    Ok(0)
}

/// `domain list`.
pub async fn list(ctx: &Ctx, json: bool) -> Result<u8> {
    if ctx.hypervisor.is_some() {
        // An explicit --hypervisor must be usable, even with no domain defined yet.
        ctx.driver(ctx.default_hypervisor())?;
    }
    let mut rows = Vec::new();
    for name in ctx.store.list_domains()? {
        let Some(rec) = ctx.store.read(&name)? else {
            continue;
        };
        let state = match ctx.driver_for(&rec) {
            Ok(driver) => match driver.state(&rec).await {
                Ok(s) => s.as_str().to_string(),
                Err(e) => {
                    tracing::warn!("domain {name}: {e}");
                    "unknown".to_string()
                }
            },
            Err(_) => "unknown".to_string(),
        };
        rows.push((rec, state));
    }
    if json {
        let list: Vec<_> = rows
            .iter()
            .map(|(rec, state)| json!({"name": rec.name, "state": state, "hypervisor": rec.hypervisor}))
            .collect();
        println!("{}", serde_json::Value::Array(list));
        return Ok(0);
    }
    if rows.is_empty() {
        println!(
            "no domains defined (state dir {})",
            ctx.store.root().display()
        );
        return Ok(0);
    }
    let width = rows
        .iter()
        .map(|(r, _)| r.name.len())
        .max()
        .unwrap_or(4)
        .clamp(4, 64);
    println!(
        "{:<width$}  {:<13}  {:<10}  snapshots",
        "name", "state", "hypervisor"
    );
    for (rec, state) in &rows {
        println!(
            "{:<width$}  {:<13}  {:<10}  {}",
            rec.name,
            state,
            rec.hypervisor,
            rec.snapshots.len()
        );
    }
    Ok(0)
}

/// `domain destroy NAME`.
pub async fn destroy(ctx: &Ctx, name: &str) -> Result<u8> {
    crate::store::validate_name("domain", name)?;
    let (lock, mut rec) = crate::exec::open_domain(ctx, name).await?;
    let driver = ctx.driver_for(&rec)?;
    let state = driver.state(&rec).await.unwrap_or(LiveState::Running);
    if ctx.dry_run {
        println!(
            "plan: stop domain {name} ({}) at once; its definition and snapshots stay",
            state.as_str()
        );
        println!("nothing changed (--dry-run)");
        return Ok(0);
    }
    driver.destroy(&rec).await?;
    rec.runtime = None;
    lock.save(&rec)?;
    if state == LiveState::Shutoff {
        println!("domain {name} was not running");
    } else {
        println!("domain {name} destroyed (it stays defined with its snapshots)");
    }
    Ok(0)
}
