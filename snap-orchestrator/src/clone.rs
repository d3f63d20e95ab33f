//! `snapctl snapshot clone DOMAIN SNAPSHOT NEW [--count N]`: gold-image clones.
//!
//! Each clone is a new domain whose disks are thin overlays on the snapshot's frozen layers
//! (a qcow2 overlay or a VHD differencing child — nothing is copied, so a clone takes the same
//! time whatever the disk size), and whose config is the snapshot's with a new name, a fresh
//! UUID, fresh MAC addresses and its own console file. With memory, a clone resumes from the
//! snapshot's memory image, which all clones share read-only.
//!
//! The gold snapshot's layers become shared: the gold domain's `clones.json` records which
//! clones read through which layer, and deleting the gold snapshot keeps those layers (and says
//! so) while a clone that uses them is defined.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use snap_core::{Error, ErrorKind, Result};

use crate::domain::Ctx;
use crate::exec;
use crate::hypervisor::StartMode;
use crate::layers::{self, Backend};
use crate::store::{self, DiskKind, DomainLock, DomainRecord, DomainState, SnapshotRecord};
use crate::xlcfg::DomainConfig;
use snap_backend_rbd::{RbdBackend, RbdSpec};

/// The file in the gold domain's folder that records its clones.
pub const CLONES_FILE: &str = "clones.json";

/// Most clones one command makes.
pub const MAX_COUNT: u32 = 1000;

/// Which clones read through which layer of a gold domain.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CloneRegistry {
    /// Layer path → names of the clone domains whose overlays sit on it.
    pub layers: BTreeMap<PathBuf, Vec<String>>,
}

impl CloneRegistry {
    /// Loads the registry of a locked gold domain (empty when there is none).
    pub fn load(lock: &DomainLock) -> Result<CloneRegistry> {
        Ok(lock.load_file(CLONES_FILE)?.unwrap_or_default())
    }

    /// The clones that still use `layer`: registered, and still defined in `store`. An RBD
    /// layer is a snapshot, `rbd:POOL/IMAGE@SNAP`: image and snapshot must both match.
    pub fn users(&self, layer: &Path, store: &store::Store) -> Vec<String> {
        self.layers
            .iter()
            .filter(|(path, _)| same_layer(path, layer))
            .flat_map(|(_, names)| names.iter())
            .filter(|name| matches!(store.read(name), Ok(Some(_))))
            .cloned()
            .collect()
    }
}

/// Whether two registry layers are the same: RBD specs by image and snapshot, files as files.
fn same_layer(a: &Path, b: &Path) -> bool {
    let rbd = |p: &Path| {
        let text = p.to_str()?;
        RbdSpec::looks_like(text)
            .then(|| RbdSpec::parse(text).ok())
            .flatten()
    };
    match (rbd(a), rbd(b)) {
        (Some(x), Some(y)) => x.same_image(&y) && x.snapshot() == y.snapshot(),
        (None, None) => layers::same_file(a, b),
        _ => false,
    }
}

/// The layer an RBD snapshot is registered under: `rbd:POOL/IMAGE@SNAP`.
pub fn rbd_layer(image: &Path, snapshot: &str) -> Result<PathBuf> {
    Ok(RbdSpec::from_path(image)?
        .without_snapshot()
        .at_snapshot(snapshot)?
        .to_path())
}

/// One disk of a planned clone: (vdev, backend, the layer it sits on, its new overlay).
type CloneDisk = (String, Backend, PathBuf, PathBuf);

/// How a clone is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneState {
    /// As the snapshot was taken.
    Snapshot,
    /// Running.
    Running,
    /// Paused.
    Paused,
    /// Defined, not started.
    Shutoff,
}

/// `snapshot clone`.
pub async fn clone(
    ctx: &Ctx,
    domain: &str,
    name: &str,
    new: &str,
    count: Option<u32>,
    state: CloneState,
) -> Result<u8> {
    let names: Vec<String> = match count {
        None => vec![new.to_string()],
        Some(n) if (1..=MAX_COUNT).contains(&n) => (1..=n).map(|i| format!("{new}-{i}")).collect(),
        Some(n) => {
            return Err(Error::invalid(format!(
                "--count {n}: expected 1 to {MAX_COUNT}"
            )));
        }
    };
    for clone in &names {
        store::validate_name("domain", clone)?;
        if ctx.store.read(clone)?.is_some() {
            return Err(Error::new(
                ErrorKind::Exists,
                format!("a domain named {clone} is already defined"),
            ));
        }
    }
    let (lock, gold) = exec::open_domain(ctx, domain).await?;
    let snap = gold.get(name)?.clone();
    let target = match state {
        CloneState::Snapshot => snap.state,
        CloneState::Running => DomainState::Running,
        CloneState::Paused => DomainState::Paused,
        CloneState::Shutoff => DomainState::Shutoff,
    };
    let memory = snap
        .memory
        .clone()
        .filter(|_| target != DomainState::Shutoff);
    if let Some(m) = &memory
        && !m.exists()
    {
        return Err(
            Error::not_found(format!("snapshot {name}'s memory image is missing")).with_path(m),
        );
    }

    // What each disk of a clone sits on.
    let mut bases: Vec<(String, Backend, PathBuf)> = Vec::new();
    // Internal snapshots to export first: (image, snapshot, base file).
    let mut exports: Vec<(PathBuf, String, PathBuf)> = Vec::new();
    for d in &snap.disks {
        let backend = Backend::parse(&d.backend)?;
        match (d.kind, backend) {
            (DiskKind::External, Backend::Qcow2 | Backend::Vhd) => {
                if !d.path.exists() {
                    return Err(Error::not_found(format!(
                        "disk {}: snapshot {name}'s layer is missing",
                        d.vdev
                    ))
                    .with_path(&d.path));
                }
                bases.push((d.vdev.clone(), backend, d.path.clone()));
            }
            (DiskKind::Internal, Backend::Qcow2) => {
                // Clones cannot sit on an internal snapshot: its state is exported once to a
                // read-only base beside the image, which all clones of it share.
                let base = internal_base(&d.path, name);
                bases.push((d.vdev.clone(), backend, base.clone()));
                if !base.exists() {
                    exports.push((d.path.clone(), name.to_string(), base));
                }
            }
            (_, Backend::Rbd) => {
                // An RBD snapshot (an external snapshot's too) is cloned by rbd itself
                // (protect + clone: metadata only).
                let inner = d.snapshot.clone().unwrap_or_else(|| name.to_string());
                bases.push((d.vdev.clone(), backend, rbd_layer(&d.path, &inner)?));
            }
            (_, Backend::Lvm) => {
                return Err(Error::unsupported(format!(
                    "disk {}: cloning an LV needs a thin snapshot of the snapshot LV (and \
                     device-mapper); classic LVs cannot be cloned thinly",
                    d.vdev
                )));
            }
            (_, other) => {
                return Err(Error::unsupported(format!(
                    "disk {}: {} disks cannot be cloned yet",
                    d.vdev,
                    other.as_str()
                )));
            }
        }
    }

    // The plan.
    let root_names: Vec<&str> = gold.snapshots.iter().map(|s| s.name.as_str()).collect();
    let mut taken: Vec<PathBuf> = Vec::new();
    let mut plans: Vec<(String, Vec<CloneDisk>)> = Vec::new();
    for clone in &names {
        let mut disks = Vec::new();
        for (vdev, backend, base) in &bases {
            if *backend == Backend::Rbd {
                // rbd:POOL/IMAGE.CLONE beside the gold image, checked free now.
                let at = RbdSpec::from_path(base)?;
                let image = at.without_snapshot();
                let target = image.sibling(
                    image.pool(),
                    image.namespace(),
                    &format!("{}.{clone}", image.image()),
                )?;
                let snap = at.snapshot().unwrap_or(name);
                RbdBackend::from_spec(image.clone())?
                    .plan_clone_snapshot(snap, &target)
                    .await
                    .map_err(|e| e.context(format!("clone {clone}, disk {vdev}")))?;
                disks.push((vdev.clone(), *backend, base.clone(), target.to_path()));
                continue;
            }
            let root = layers::stem_root(base, &root_names);
            let overlay = layers::fresh_overlay(base, &root, clone, &taken);
            taken.push(overlay.clone());
            disks.push((vdev.clone(), *backend, base.clone(), overlay));
        }
        plans.push((clone.clone(), disks));
    }
    if ctx.dry_run {
        println!(
            "plan: snapshot clone {domain} {name} -> {}",
            names.join(", ")
        );
        for (clone, disks) in &plans {
            println!("  domain {clone}: the snapshot's config with a new name, UUID and MACs");
            for (vdev, _, base, overlay) in disks {
                println!(
                    "    {vdev}: new overlay {} on {} (nothing copied)",
                    overlay.display(),
                    base.display()
                );
            }
            match (&memory, target) {
                (_, DomainState::Shutoff) => println!("    left shut off"),
                (Some(m), t) => println!(
                    "    started from memory image {} (shared, read-only), {}",
                    m.display(),
                    if t == DomainState::Running {
                        "running"
                    } else {
                        "paused"
                    }
                ),
                (None, DomainState::Running) => println!("    booted"),
                (None, _) => println!("    started paused"),
            }
        }
        println!("  space needed: a few hundred KiB per overlay; bytes to copy: 0");
        println!("nothing changed (--dry-run)");
        return Ok(0);
    }

    for (image, snapshot, base) in &exports {
        export_base(image, snapshot, base).await?;
        println!(
            "exported internal snapshot {snapshot} of {} to the shared base {}",
            image.display(),
            base.display()
        );
    }
    let driver = ctx.driver_for(&gold)?;
    let mut registry = CloneRegistry::load(&lock)?;
    let mut made = Vec::new();
    for (clone, disks) in &plans {
        let mut created: Vec<PathBuf> = Vec::new();
        let result = async {
            for (vdev, backend, base, overlay) in disks {
                if *backend == Backend::Rbd {
                    let at = RbdSpec::from_path(base)?;
                    let snap = at.snapshot().unwrap_or(name).to_string();
                    created.push(overlay.clone());
                    RbdBackend::from_spec(at.without_snapshot())?
                        .clone_snapshot(&snap, &RbdSpec::from_path(overlay)?)
                        .await
                        .map_err(|e| e.context(format!("clone {clone}, disk {vdev}")))?;
                    continue;
                }
                layers::create_overlay(*backend, base, clone, overlay)
                    .await
                    .map_err(|e| e.context(format!("clone {clone}, disk {vdev}")))?;
                created.push(overlay.clone());
            }
            let config = clone_config(&snap, clone, disks)?;
            let clone_lock = ctx.lock(clone)?;
            if clone_lock.load()?.is_some() {
                return Err(Error::new(
                    ErrorKind::Exists,
                    format!("a domain named {clone} was defined meanwhile"),
                ));
            }
            let mut rec = DomainRecord::new(clone, &gold.hypervisor, config, None);
            clone_lock.save(&rec)?;
            for (_, _, base, _) in disks {
                let users = registry.layers.entry(base.clone()).or_default();
                if !users.contains(clone) {
                    users.push(clone.clone());
                }
            }
            lock.save_file(CLONES_FILE, &registry)?;
            let mode = match (&memory, target) {
                (_, DomainState::Shutoff) => None,
                (Some(m), t) => Some(StartMode::Restore {
                    memory: m.clone(),
                    running: t == DomainState::Running,
                }),
                (None, DomainState::Running) => Some(StartMode::Running),
                (None, _) => Some(StartMode::Paused),
            };
            if let Some(mode) = mode {
                let runtime = driver.start(&rec, mode).await?;
                rec.runtime = Some(runtime);
                clone_lock.save(&rec)?;
            }
            Ok::<(), Error>(())
        }
        .await;
        if let Err(e) = result {
            // Nothing of this clone stays half-made (earlier clones are complete and stay).
            if ctx.store.read(clone).ok().flatten().is_none() {
                for file in &created {
                    if RbdSpec::looks_like(&file.to_string_lossy()) {
                        if let Ok(b) = RbdBackend::new(file) {
                            let _ = b.remove_image().await;
                        }
                    } else {
                        let _ = std::fs::remove_file(file);
                    }
                }
            }
            return Err(e);
        }
        made.push(clone.clone());
        println!(
            "domain {clone} cloned from snapshot {name} of {domain}{}",
            match (&memory, target) {
                (_, DomainState::Shutoff) => " (shut off)",
                (Some(_), DomainState::Running) => " and resumed from its memory",
                (Some(_), _) => " (paused, memory loaded)",
                (None, DomainState::Running) => " and booted",
                (None, _) => " (paused)",
            }
        );
    }
    Ok(0)
}

/// The shared base clones of internal snapshot `snapshot` of `image` sit on:
/// `DIR/STEM.SNAPSHOT.base.qcow2`.
fn internal_base(image: &Path, snapshot: &str) -> PathBuf {
    let stem = image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "disk".into());
    image.with_file_name(format!("{stem}.{snapshot}.base.qcow2"))
}

/// Where [`export_base`] writes a base before it is complete: `BASE.partial`.
fn partial_base(base: &Path) -> PathBuf {
    let mut name = base.as_os_str().to_os_string();
    name.push(".partial");
    PathBuf::from(name)
}

/// Exports an internal snapshot's view to a new standalone qcow2 `base` (read-only for
/// everyone: mode 0400; clones open it read-only through their overlays). The export goes to
/// `BASE.partial` (one a killed run left is replaced) and is renamed into place once complete
/// and synced, so `base` existing means it is whole: later clone runs reuse it.
async fn export_base(image: &Path, snapshot: &str, base: &Path) -> Result<()> {
    let (image, snapshot, base) = (
        image.to_path_buf(),
        snapshot.to_string(),
        base.to_path_buf(),
    );
    tokio::task::spawn_blocking(move || {
        let partial = partial_base(&base);
        crate::store::remove_if_present(&partial)?;
        let view =
            crate::export::SourceView::open(&image, &crate::export::ViewSpec::Snapshot(snapshot))?;
        let cancel = std::sync::atomic::AtomicBool::new(false);
        crate::export::export_view(
            &view,
            &partial,
            crate::export::OutputFormat::Qcow2,
            &mut |_, _| {},
            &cancel,
        )?;
        use std::os::unix::fs::PermissionsExt;
        let placed = std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o400))
            .map_err(|e| Error::io("make the base read-only", e).with_path(&partial))
            .and_then(|()| {
                std::fs::rename(&partial, &base)
                    .map_err(|e| Error::io("put the base in place", e).with_path(&base))
            });
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        crate::store::sync_dir(base.parent().unwrap_or_else(|| Path::new(".")))
    })
    .await
    .map_err(|e| Error::new(ErrorKind::Io, format!("worker thread failed: {e}")))?
}

/// A clone's config: the snapshot's, renamed, with a fresh UUID and MACs, its own console file
/// and its own overlays.
fn clone_config(snap: &SnapshotRecord, clone: &str, disks: &[CloneDisk]) -> Result<DomainConfig> {
    let mut config = snap.config.clone();
    config.name = clone.to_string();
    config.uuid = Some(random_uuid()?);
    config.vifs = config
        .vifs
        .iter()
        .map(|vif| fresh_mac(vif))
        .collect::<Result<Vec<_>>>()?;
    if let Some(path) = config.serial_file() {
        let mut text = path.into_os_string();
        text.push(format!(".{clone}"));
        config.serial = Some(format!("file:{}", PathBuf::from(text).display()));
    }
    for (vdev, _, _, overlay) in disks {
        if let Some(spec) = config.disks.iter_mut().find(|s| &s.vdev == vdev) {
            spec.target = overlay.to_string_lossy().into_owned();
        }
    }
    Ok(config)
}

fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut buf = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| Error::io("read /dev/urandom", e))?;
    Ok(buf)
}

/// A random (version 4) UUID.
fn random_uuid() -> Result<String> {
    let mut b: [u8; 16] = random_bytes()?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut out = String::with_capacity(36);
    for (i, x) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push_str(&format!("{x:02x}"));
    }
    Ok(out)
}

/// A vif spec with its `mac=` replaced by a fresh one in Xen's range (00:16:3e); a spec
/// without a MAC is left alone (the toolstack makes one up at start).
fn fresh_mac(vif: &str) -> Result<String> {
    if !vif.split(',').any(|kv| kv.trim_start().starts_with("mac=")) {
        return Ok(vif.to_string());
    }
    let r: [u8; 3] = random_bytes()?;
    let mac = format!("00:16:3e:{:02x}:{:02x}:{:02x}", r[0] & 0x7f, r[1], r[2]);
    Ok(vif
        .split(',')
        .map(|kv| {
            if kv.trim_start().starts_with("mac=") {
                format!("mac={mac}")
            } else {
                kv.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_v4_and_differ() {
        let a = random_uuid().unwrap();
        let b = random_uuid().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"));
    }

    #[test]
    fn macs_are_replaced_only_where_present() {
        let v = fresh_mac("mac=00:16:3e:00:00:01,bridge=xenbr0").unwrap();
        assert!(v.starts_with("mac=00:16:3e:"));
        assert!(v.ends_with(",bridge=xenbr0"));
        assert_ne!(v, "mac=00:16:3e:00:00:01,bridge=xenbr0");
        assert_eq!(fresh_mac("bridge=xenbr0").unwrap(), "bridge=xenbr0");
    }
}
