//! Disk-level building blocks of domain snapshots: which backend a domain disk uses, its chain,
//! which tracked files read through a layer, fresh overlay names, and the offline actions.

use std::path::{Path, PathBuf};

use snap_backend_lvm::LvmBackend;
use snap_backend_qcow2::Qcow2Backend;
use snap_backend_rbd::{RbdBackend, RbdSpec};
use snap_backend_vhd::VhdBackend;
use snap_core::{
    CreateRequest, DiskBackend, DiskFormat, DiskListing, Error, ErrorKind, Result, Target,
};

use crate::xlcfg::{DiskAccess, DiskFormat as XlFormat, DiskSpec};

/// The backend of a domain disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A qcow2 image.
    Qcow2,
    /// A VHD image.
    Vhd,
    /// An LVM logical volume.
    Lvm,
    /// A Ceph RBD image.
    Rbd,
}

impl Backend {
    /// The name the store records.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Qcow2 => "qcow2",
            Backend::Vhd => "vhd",
            Backend::Lvm => "lvm",
            Backend::Rbd => "rbd",
        }
    }

    /// Parses a stored name.
    pub fn parse(name: &str) -> Result<Backend> {
        match name {
            "qcow2" => Ok(Backend::Qcow2),
            "vhd" => Ok(Backend::Vhd),
            "lvm" => Ok(Backend::Lvm),
            "rbd" => Ok(Backend::Rbd),
            other => Err(Error::corrupt(format!("unknown disk backend {other:?}"))),
        }
    }
}

/// Whether a domain disk takes part in snapshots: read-only disks, cdroms and empty drives
/// never change, so they are left out.
pub fn snapshotted(disk: &DiskSpec) -> bool {
    disk.access == DiskAccess::ReadWrite
        && disk.devtype.as_deref() != Some("cdrom")
        && !disk.target.is_empty()
        && disk.format != XlFormat::Empty
}

/// The backend of a writable domain disk; refuses what has no snapshots (raw files) or a
/// target whose content is not the format the config says.
pub fn classify(disk: &DiskSpec) -> Result<Backend> {
    let vdev = &disk.vdev;
    if disk.target.starts_with(snap_backend_rbd::name::PREFIX) {
        RbdSpec::parse(&disk.target).map_err(|e| e.context(format!("disk {vdev}")))?;
        if disk.format != XlFormat::Raw {
            return Err(Error::unsupported(format!(
                "disk {vdev}: an RBD disk is a raw image (format=raw), not {}",
                disk.format.as_str()
            )));
        }
        return Ok(Backend::Rbd);
    }
    let path = Path::new(&disk.target);
    let probed = crate::disk::detect(path, None).map_err(|e| e.context(format!("disk {vdev}")))?;
    let wanted = match disk.format {
        XlFormat::Qcow2 => DiskFormat::Qcow2,
        XlFormat::Vhd => DiskFormat::Vhd,
        XlFormat::Raw if probed == DiskFormat::Lvm => DiskFormat::Lvm,
        XlFormat::Raw => {
            return Err(Error::unsupported(format!(
                "disk {vdev} is a raw file: raw images have no snapshots; convert it with \
                 `qemu-img convert -O qcow2` and change the config to format=qcow2"
            ))
            .with_path(path));
        }
        other => {
            return Err(Error::unsupported(format!(
                "disk {vdev}: format {} has no snapshot support (use qcow2, vhd or an LV)",
                other.as_str()
            ))
            .with_path(path));
        }
    };
    if probed != wanted {
        return Err(Error::invalid(format!(
            "disk {vdev}: the config says {} but the file holds {probed}",
            disk.format.as_str()
        ))
        .with_path(path));
    }
    Ok(match wanted {
        DiskFormat::Qcow2 => Backend::Qcow2,
        DiskFormat::Vhd => Backend::Vhd,
        _ => Backend::Lvm,
    })
}

/// The disk backend object for `path`.
pub fn backend(kind: Backend, path: &Path) -> Result<Box<dyn DiskBackend>> {
    match kind {
        Backend::Qcow2 => Ok(Box::new(Qcow2Backend::new(path))),
        Backend::Vhd => Ok(Box::new(VhdBackend::new(path))),
        Backend::Lvm => Ok(Box::new(LvmBackend::new(path)?)),
        Backend::Rbd => Ok(Box::new(RbdBackend::new(path)?)),
    }
}

/// Lists a file's internal snapshots and chain, for planning. A qcow2 image is read without its
/// lock (like `qemu-img info -U`), since a running domain's QEMU holds the lock of its active
/// layer; the operations themselves take the locks (or go through QMP).
pub async fn listing(kind: Backend, path: &Path) -> Result<DiskListing> {
    if kind == Backend::Qcow2 {
        let path = path.to_path_buf();
        return tokio::task::spawn_blocking(move || snap_backend_qcow2::list_path_unlocked(&path))
            .await
            .map_err(|e| Error::new(ErrorKind::Io, format!("worker thread failed: {e}")))?;
    }
    backend(kind, path)?.list().await
}

/// Whether two paths name the same file (by canonical path; equal text when neither exists).
/// RBD images are the same when pool, namespace and image match, whether named `rbd:...` or
/// by QEMU's `json:{...}` filename of an rbd node.
pub fn same_file(a: &Path, b: &Path) -> bool {
    if let (Some(x), Some(y)) = (rbd_image(a), rbd_image(b)) {
        return x == y;
    }
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// (pool, namespace, image) of an RBD disk name, or of QEMU's `json:` filename of an rbd node
/// (directly or as the `file` child of a format node).
fn rbd_image(path: &Path) -> Option<(String, Option<String>, String)> {
    let text = path.to_str()?;
    if let Ok(spec) = RbdSpec::parse(text) {
        return Some((
            spec.pool().to_string(),
            spec.namespace().map(str::to_string),
            spec.image().to_string(),
        ));
    }
    let json: serde_json::Value = serde_json::from_str(text.strip_prefix("json:")?).ok()?;
    let node = if json.get("driver").and_then(|d| d.as_str()) == Some("rbd") {
        &json
    } else {
        json.get("file")
            .filter(|f| f.get("driver").and_then(|d| d.as_str()) == Some("rbd"))?
    };
    let field = |k: &str| node.get(k).and_then(|v| v.as_str()).map(str::to_string);
    Some((
        field("pool")?,
        field("namespace").filter(|n| !n.is_empty()),
        field("image")?,
    ))
}

/// The direct backing file of a layer, if any.
pub async fn backing_of(kind: Backend, path: &Path) -> Result<Option<PathBuf>> {
    Ok(listing(kind, path)
        .await?
        .chain
        .into_iter()
        .next()
        .map(|l| l.path))
}

/// Of `files`, those whose direct backing file is `layer` (each file once).
pub async fn children_of(kind: Backend, layer: &Path, files: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = Vec::new();
    for file in files {
        if !file.exists() || same_file(file, layer) || out.iter().any(|o| same_file(o, file)) {
            continue;
        }
        if let Some(backing) = backing_of(kind, file).await?
            && same_file(&backing, layer)
        {
            out.push(file.clone());
        }
    }
    Ok(out)
}

/// Other images in `layer`'s folder whose backing is `layer` (qcow2 or VHD files that are not
/// in `known`): users we do not track but must not break.
pub async fn untracked_users(kind: Backend, layer: &Path, known: &[PathBuf]) -> Vec<PathBuf> {
    let dir = match layer.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut users = Vec::new();
    for entry in entries.flatten().take(10_000) {
        let path = entry.path();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let wanted = match kind {
            Backend::Qcow2 => ext == "qcow2",
            Backend::Vhd => ext == "vhd" || ext == "vpc",
            _ => false,
        };
        if !wanted || same_file(&path, layer) || known.iter().any(|k| same_file(k, &path)) {
            continue;
        }
        if let Ok(Some(backing)) = backing_of(kind, &path).await
            && same_file(&backing, layer)
        {
            users.push(path);
        }
    }
    users.sort();
    users
}

/// The stem overlays of a disk are named from: the file stem with suffixes `.NAME` and
/// `.NAME-N` that earlier snapshots of the domain (`names`) added removed.
pub fn stem_root(path: &Path, names: &[&str]) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "disk".to_string());
    strip_snapshot_suffixes(stem, names)
}

/// `stem` with the suffixes `.NAME` and `.NAME-N` that snapshots `names` added removed.
fn strip_snapshot_suffixes(mut stem: String, names: &[&str]) -> String {
    loop {
        let before = stem.len();
        for name in names {
            if let Some(rest) = stem.strip_suffix(&format!(".{name}"))
                && !rest.is_empty()
            {
                stem = rest.to_string();
                break;
            }
            if let Some((rest, tail)) = stem.rsplit_once('-')
                && !tail.is_empty()
                && tail.bytes().all(|b| b.is_ascii_digit())
                && let Some(base) = rest.strip_suffix(&format!(".{name}"))
                && !base.is_empty()
            {
                stem = base.to_string();
                break;
            }
        }
        if stem.len() == before {
            return stem;
        }
    }
}

/// A path for a new overlay of snapshot `snap` next to `beside`: `DIR/ROOT.SNAP.EXT`, or
/// `DIR/ROOT.SNAP-N.EXT` with the smallest free N, avoiding `taken` too.
pub fn fresh_overlay(beside: &Path, root: &str, snap: &str, taken: &[PathBuf]) -> PathBuf {
    let dir = beside.parent().unwrap_or_else(|| Path::new("."));
    let ext = beside
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_else(|| "qcow2".to_string());
    let free = |p: &PathBuf| p.symlink_metadata().is_err() && !taken.contains(p);
    let first = dir.join(format!("{root}.{snap}.{ext}"));
    if free(&first) {
        return first;
    }
    (1u32..)
        .map(|n| dir.join(format!("{root}.{snap}-{n}.{ext}")))
        .find(free)
        .unwrap_or(first)
}

/// Whether a disk name is an RBD image (`rbd:POOL/IMAGE...`).
pub fn is_rbd(path: &Path) -> bool {
    path.to_str()
        .is_some_and(|t| t.starts_with(snap_backend_rbd::name::PREFIX))
}

/// A name for the clone an external snapshot `snap` of RBD image `image` makes, in the same
/// pool and cluster: `ROOT.SNAP`, or `ROOT.SNAP-N` with the smallest free N, where ROOT is the
/// image name without the suffixes of earlier snapshots (`names`); free in the cluster and not
/// in `taken`.
pub async fn fresh_rbd_overlay(
    image: &Path,
    snap: &str,
    names: &[&str],
    taken: &[PathBuf],
) -> Result<PathBuf> {
    let spec = RbdSpec::from_path(image)?.without_snapshot();
    let root = strip_snapshot_suffixes(spec.image().to_string(), names);
    for n in 0..1000u32 {
        let name = match n {
            0 => format!("{root}.{snap}"),
            n => format!("{root}.{snap}-{n}"),
        };
        let candidate = spec.sibling(spec.pool(), spec.namespace(), &name)?;
        let path = candidate.to_path();
        if taken.iter().any(|t| same_file(t, &path)) {
            continue;
        }
        if !RbdBackend::from_spec(candidate)?.exists().await? {
            return Ok(path);
        }
    }
    Err(Error::new(
        ErrorKind::Exists,
        format!("no free image name {root}.{snap}[-N] beside {spec} (N up to 999)"),
    ))
}

/// Whether RBD image `image` holds snapshot `name`: false when the image is gone, an error when
/// rbd cannot tell (its pool missing, the cluster unreachable).
pub async fn rbd_has_snapshot(image: &Path, name: &str) -> Result<bool> {
    let rbd = RbdBackend::new(image)?;
    Ok(rbd.exists().await?
        && rbd
            .list_detailed()
            .await?
            .snapshots
            .iter()
            .any(|s| s.name == name))
}

/// Removes an abandoned layer: a file, or an RBD image once no client has it open (a QEMU
/// that was just stopped). Gone already is fine; an RBD image with snapshots is refused by rbd.
pub async fn remove_layer(path: &Path) -> Result<()> {
    if !is_rbd(path) {
        return crate::store::remove_if_present(path);
    }
    let rbd = RbdBackend::new(path)?;
    if !rbd.exists().await? {
        return Ok(());
    }
    rbd.wait_unwatched(RBD_CLOSE_WAIT).await?;
    rbd.remove_image().await
}

/// Creates an empty overlay at `overlay` whose backing is `layer` (offline).
pub async fn create_overlay(kind: Backend, layer: &Path, name: &str, overlay: &Path) -> Result<()> {
    let request = CreateRequest::External {
        name: name.to_string(),
        overlay: Some(overlay.to_path_buf()),
    };
    let made = backend(kind, layer)?.create(&request).await?;
    if !same_file(&made.active, overlay) {
        return Err(Error::new(
            ErrorKind::Command,
            format!(
                "the overlay was made at {} instead of {}",
                made.active.display(),
                overlay.display()
            ),
        ));
    }
    Ok(())
}

/// Takes an internal snapshot offline (qcow2 internal, LV snapshot).
pub async fn create_internal(kind: Backend, image: &Path, name: &str) -> Result<()> {
    if kind == Backend::Lvm {
        return LvmBackend::new(image)?
            .create_snapshot(name)
            .await
            .map(|_| ());
    }
    backend(kind, image)?
        .create(&CreateRequest::Internal {
            name: name.to_string(),
        })
        .await
        .map(|_| ())
}

/// How long a revert waits for the clients of an RBD image to go (a QEMU that was just told to
/// quit closes it at once; the watch of a killed one expires after about 30 s).
const RBD_CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(40);

/// Reverts an internal snapshot offline. An RBD image is rolled back once no client has it open
/// (the domain's QEMU was just stopped).
pub async fn revert_internal(kind: Backend, image: &Path, name: &str) -> Result<()> {
    if kind == Backend::Rbd {
        let rbd = RbdBackend::new(image)?;
        rbd.wait_unwatched(RBD_CLOSE_WAIT).await?;
        return rbd.revert_snapshot(name).await.map(drop);
    }
    backend(kind, image)?
        .revert(&Target::Internal(name.to_string()))
        .await
}

/// Deletes an internal snapshot offline.
pub async fn delete_internal(kind: Backend, image: &Path, name: &str) -> Result<()> {
    backend(kind, image)?
        .delete(&Target::Internal(name.to_string()))
        .await
}

/// Merges backing layer `layer` into `child` (whose direct backing it is) offline; the layer's
/// file is removed when no other image in its folder uses it.
pub async fn merge_into_child(kind: Backend, child: &Path, layer: &Path) -> Result<()> {
    backend(kind, child)?
        .delete(&Target::Layer(layer.to_path_buf()))
        .await
}

/// Whether device-mapper is there (LV snapshot activation, merge).
pub fn have_device_mapper() -> bool {
    Path::new("/dev/mapper/control").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems() {
        let names = ["s1", "s2", "before-upgrade"];
        assert_eq!(stem_root(Path::new("/v/a.qcow2"), &names), "a");
        assert_eq!(stem_root(Path::new("/v/a.s1.qcow2"), &names), "a");
        assert_eq!(stem_root(Path::new("/v/a.s1.s2-3.qcow2"), &names), "a");
        assert_eq!(
            stem_root(Path::new("/v/vm.before-upgrade.qcow2"), &names),
            "vm"
        );
        assert_eq!(stem_root(Path::new("/v/s1.qcow2"), &names), "s1");
        assert_eq!(stem_root(Path::new("/v/a.x.qcow2"), &names), "a.x");
    }

    #[test]
    fn rbd_names_match_qemu_filenames() {
        let a = Path::new("rbd:vms/disk1");
        let q = Path::new(
            r#"json:{"driver": "raw", "file": {"pool": "vms", "image": "disk1", "conf": "/c", "driver": "rbd", "namespace": ""}}"#,
        );
        assert!(same_file(a, q));
        assert!(same_file(Path::new("rbd:vms/disk1:conf=/c"), a));
        assert!(!same_file(Path::new("rbd:vms/disk2"), q));
        assert!(!same_file(Path::new("rbd:vms/ns/disk1"), q));
        let protocol = Path::new(r#"json:{"driver": "rbd", "pool": "vms", "image": "disk1"}"#);
        assert!(same_file(protocol, a));
    }

    #[test]
    fn fresh_names() {
        let dir = tempfile::TempDir::new().unwrap();
        let base = dir.path().join("a.qcow2");
        let first = fresh_overlay(&base, "a", "s1", &[]);
        assert_eq!(first, dir.path().join("a.s1.qcow2"));
        std::fs::write(&first, b"x").unwrap();
        assert_eq!(
            fresh_overlay(&base, "a", "s1", &[]),
            dir.path().join("a.s1-1.qcow2")
        );
        assert_eq!(
            fresh_overlay(&base, "a", "s1", &[dir.path().join("a.s1-1.qcow2")]),
            dir.path().join("a.s1-2.qcow2")
        );
    }
}
