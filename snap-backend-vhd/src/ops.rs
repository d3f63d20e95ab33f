//! The snapshot operations on VHD files, one function each, in the order validate -> plan ->
//! write in a safe order -> report:
//!
//! - [`create_external`]: a new, empty differencing child of the image becomes the active layer;
//! - [`revert_to_layer`]: the image becomes an empty differencing child of a layer of its chain;
//! - [`delete_layer`]: a layer's data is coalesced into its child, the child is relinked to the
//!   layer's parent (or becomes dynamic), and the layer's file is removed unless another VHD in
//!   its folder still names it as parent;
//! - [`list_path`] and [`check_path`].
//!
//! Every file opened for writing holds an exclusive QEMU-compatible lock; files only read hold a
//! shared one. New files are built under a temporary name in the target folder and linked into
//! place only when complete, so a crash never leaves a half-made image under the final name.

use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use snap_core::io::FileIo;
use snap_core::lock::{ImageLock, LockMode};
use snap_core::model::validate_snapshot_name;
use snap_core::perm::{Ownership, PRIVATE_MODE};
use snap_core::{BlockIo, ChainLayer, DiskFormat, DiskListing, Error, ErrorKind, Result};

use crate::chain::{Chain, Layer, open_chain, open_chain_with};
use crate::check::{CheckReport, check};
use crate::format::footer::{DiskType, FOOTER_LEN, Footer, vhd_time_now};
use crate::format::header::{DEFAULT_BLOCK_SIZE, DynamicHeader, HEADER_LEN, PlatformCode};
use crate::format::locator::{self, ParentPolicy};
use crate::image::{ParentLink, Vhd, create, new_footer};

/// Most files of a folder examined when looking for other children of a layer.
const MAX_FOLDER_SCAN: usize = 10_000;

/// A new random unique id (RFC 4122 version 4 layout), from the kernel's random source.
pub fn new_unique_id() -> Result<[u8; 16]> {
    let mut id = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut id))
        .map_err(|e| Error::io("read /dev/urandom for a VHD unique id", e))?;
    if let Some(b) = id.get_mut(6) {
        *b = (*b & 0x0f) | 0x40;
    }
    if let Some(b) = id.get_mut(8) {
        *b = (*b & 0x3f) | 0x80;
    }
    Ok(id)
}

/// The parent link a child at `child_path` records for the parent at `parent_path`: W2ru
/// (relative to the child's folder) and W2ku (absolute) locators, the parent's file name, its
/// unique id and footer timestamp.
///
/// Under [`ParentPolicy::ChildFolder`] a parent outside the child's folder is refused
/// ([`ErrorKind::Unsupported`]): the chain could not be opened again under that policy.
pub fn parent_link<IO: BlockIo>(
    child_path: &Path,
    parent_path: &Path,
    parent: &Vhd<IO>,
    policy: ParentPolicy,
) -> Result<ParentLink> {
    let parent_abs = std::fs::canonicalize(parent_path)
        .map_err(|e| Error::io("resolve parent path", e).with_path(parent_path))?;
    let child_dir = child_folder(child_path)?;
    let relative = locator::relative_path(&child_dir, &parent_abs);
    if policy == ParentPolicy::ChildFolder && !parent_abs.starts_with(&child_dir) {
        return Err(locator::outside(&relative.to_string_lossy(), &child_dir));
    }
    let name = parent_abs
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::invalid("parent path has no file name").with_path(parent_path))?;
    Ok(ParentLink {
        unique_id: parent.footer().unique_id,
        timestamp: parent.footer().timestamp,
        name,
        locators: vec![
            (
                PlatformCode::W2ku,
                locator::encode_utf16le(&parent_abs.to_string_lossy(), false),
            ),
            (
                PlatformCode::W2ru,
                locator::encode_utf16le(&relative.to_string_lossy(), true),
            ),
        ],
    })
}

/// The canonical folder a (possibly not yet existing) file at `path` lives in.
fn child_folder(path: &Path) -> Result<PathBuf> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::canonicalize(&dir).map_err(|e| Error::io("resolve folder", e).with_path(&dir))
}

/// Builds a new image at `path` through a temporary file in the same folder, linked into place
/// (never replacing an existing file) only when complete and flushed. With `ownership` the
/// temporary file is created private (0600) and given that owner and mode before anything is
/// written; without, it gets the default mode (a new base disk, as `qemu-img create` makes it).
/// On any error the temporary file is removed and nothing is left under `path`.
fn create_file_atomically(
    path: &Path,
    ownership: Option<Ownership>,
    build: impl FnOnce(FileIo) -> Result<()>,
) -> Result<()> {
    let dir = child_folder(path)?;
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid("image path has no file name").with_path(path))?;
    if path.exists() {
        return Err(Error::new(ErrorKind::Exists, "file already exists").with_path(path));
    }
    let tmp = dir.join(format!(
        ".{}.snapctl-tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(if ownership.is_some() {
            PRIVATE_MODE
        } else {
            0o666
        })
        .open(&tmp)
        .map_err(|e| Error::io("create temporary image", e).with_path(&tmp))?;
    let result = (|| {
        let lock = ImageLock::acquire(&file, &tmp, LockMode::Exclusive)?;
        if let Some(ownership) = ownership {
            ownership.apply(&file, &tmp)?;
        }
        build(FileIo::from_file(file, &tmp))?;
        std::fs::hard_link(&tmp, path)
            .map_err(|e| Error::io("link new image", e).with_path(path))?;
        drop(lock);
        Ok(())
    })();
    let _ = std::fs::remove_file(&tmp);
    result?;
    sync_folder(&dir);
    Ok(())
}

fn sync_folder(dir: &Path) {
    if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(folder = %dir.display(), "folder sync failed: {e}");
    }
}

/// Creates a new dynamic VHD of `size` bytes (a multiple of 512) at `path`; refuses an
/// existing file.
pub fn create_dynamic(path: &Path, size: u64, block_size: Option<u32>) -> Result<()> {
    let id = new_unique_id()?;
    let footer = new_footer(size, id, vhd_time_now());
    create_file_atomically(path, None, |io| {
        create(io, footer, block_size.unwrap_or(DEFAULT_BLOCK_SIZE), None).map(drop)
    })
    .map_err(|e| e.with_path(path))
}

/// Creates a new, empty differencing VHD at `child_path` whose parent is the open `parent`
/// (found at `parent_path`): size, geometry and block size from the parent; owner, group and
/// mode from the parent's file too, minus every bit for "other"
/// ([`Ownership::for_overlay_of`]): the child takes the guest's writes and must be no easier to
/// read than the parent.
pub fn create_differencing<IO: BlockIo>(
    child_path: &Path,
    parent_path: &Path,
    parent: &Vhd<IO>,
    policy: ParentPolicy,
) -> Result<()> {
    let link = parent_link(child_path, parent_path, parent, policy)?;
    let id = new_unique_id()?;
    let mut footer: Footer = new_footer(parent.size(), id, vhd_time_now());
    footer.geometry = parent.footer().geometry;
    footer.original_size = parent.size();
    let block_size = parent
        .header()
        .map(|h| h.block_size)
        .unwrap_or(DEFAULT_BLOCK_SIZE);
    let ownership = Ownership::for_overlay_of(parent_path)?;
    create_file_atomically(child_path, Some(ownership), |io| {
        create(io, footer, block_size, Some(&link)).map(drop)
    })
    .map_err(|e| e.with_path(child_path))
}

/// The default path of an external snapshot NAME of `image`: `DIR/STEM.NAME.vhd`.
pub fn default_overlay_path(image: &Path, name: &str) -> PathBuf {
    let stem = image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    image.with_file_name(format!("{stem}.{name}.vhd"))
}

/// `disk create IMAGE NAME --external [--overlay PATH]`: a new empty differencing child of
/// IMAGE at PATH (default [`default_overlay_path`]) becomes the active layer. IMAGE's whole
/// chain is opened (and so validated) under shared locks; IMAGE is not written. Returns the
/// new active path.
pub fn create_external(
    image: &Path,
    name: &str,
    overlay: Option<&Path>,
    policy: ParentPolicy,
) -> Result<PathBuf> {
    validate_snapshot_name(name)?;
    let overlay = overlay
        .map(Path::to_path_buf)
        .unwrap_or_else(|| default_overlay_path(image, name));
    let chain = open_chain(image, policy, |_, _| LockMode::Shared)?;
    let top = chain
        .layers()
        .first()
        .ok_or_else(|| Error::invalid("empty chain"))?;
    create_differencing(&overlay, image, &top.image, policy)?;
    Ok(overlay)
}

/// Finds `layer` in the chain by canonical path; errors name what the layer is instead.
fn layer_index<IO: BlockIo>(chain: &Chain<IO>, image: &Path, layer: &Path) -> Result<usize> {
    let wanted =
        std::fs::canonicalize(layer).map_err(|e| Error::io("resolve layer", e).with_path(layer))?;
    let index = chain
        .layers()
        .iter()
        .position(|l| std::fs::canonicalize(&l.path).ok().as_ref() == Some(&wanted))
        .ok_or_else(|| {
            Error::not_found(format!(
                "{} is not a layer of {}'s chain",
                layer.display(),
                image.display()
            ))
        })?;
    if index == 0 {
        return Err(Error::invalid(format!(
            "{} is the image itself (the active layer), not a backing layer",
            layer.display()
        )));
    }
    Ok(index)
}

/// VHDs in the folder of `layer` (other than `except`) whose header names `unique_id` as their
/// parent. Files that are not VHDs, or cannot be read, are skipped.
pub fn other_children(layer: &Path, unique_id: &[u8; 16], except: &[PathBuf]) -> Vec<PathBuf> {
    let Ok(dir) = child_folder(layer) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let layer_canonical = std::fs::canonicalize(layer).ok();
    let mut found = Vec::new();
    for entry in entries.flatten().take(MAX_FOLDER_SCAN) {
        let path = entry.path();
        let canonical = std::fs::canonicalize(&path).ok();
        if canonical.is_none()
            || canonical == layer_canonical
            || except
                .iter()
                .any(|e| std::fs::canonicalize(e).ok() == canonical)
        {
            continue;
        }
        if names_parent(&path, unique_id).unwrap_or(false) {
            found.push(path);
        }
    }
    found.sort();
    found
}

/// Whether the file at `path` is a differencing VHD whose header names `unique_id`.
fn names_parent(path: &Path, unique_id: &[u8; 16]) -> Result<bool> {
    if !path.is_file() {
        return Ok(false);
    }
    let io = FileIo::open(path, false)?;
    let len = io.len()?;
    if len < (FOOTER_LEN * 2 + HEADER_LEN) as u64 {
        return Ok(false);
    }
    let mut bytes = [0u8; FOOTER_LEN];
    io.read_exact_at(&mut bytes, len - FOOTER_LEN as u64)?;
    let footer = match Footer::parse(&bytes) {
        Ok(f) => f,
        Err(_) => {
            io.read_exact_at(&mut bytes, 0)?;
            Footer::parse(&bytes)?
        }
    };
    if footer.disk_type != DiskType::Differencing {
        return Ok(false);
    }
    let mut header = [0u8; HEADER_LEN];
    io.read_exact_at(&mut header, footer.data_offset)?;
    Ok(DynamicHeader::parse(&header)?.parent_unique_id == *unique_id)
}

/// `disk revert IMAGE --layer PATH`: IMAGE becomes an empty differencing child of PATH (its
/// current data is dropped; the layers between are kept). The new IMAGE is built beside it and
/// renamed over it in one step. Refused, with nothing written, when PATH is not a backing layer
/// of IMAGE or another VHD in IMAGE's folder names IMAGE as its parent (its content would
/// change under it).
pub fn revert_to_layer(image: &Path, layer: &Path, policy: ParentPolicy) -> Result<()> {
    let chain = open_chain(image, policy, |level, _| {
        if level == 0 {
            LockMode::Exclusive
        } else {
            LockMode::Shared
        }
    })?;
    let index = layer_index(&chain, image, layer)?;
    let top = chain
        .layers()
        .first()
        .ok_or_else(|| Error::invalid("empty chain"))?;
    let users = other_children(image, &top.image.footer().unique_id, &[]);
    if !users.is_empty() {
        return Err(Error::new(
            ErrorKind::InUse,
            format!(
                "{} is the parent of {}; reverting it would change their content",
                image.display(),
                display_list(&users)
            ),
        )
        .with_path(image));
    }
    let target = chain
        .layers()
        .get(index)
        .ok_or_else(|| Error::invalid("layer index"))?;
    let dir = child_folder(image)?;
    let name = image
        .file_name()
        .ok_or_else(|| Error::invalid("image path has no file name").with_path(image))?;
    let staged = dir.join(format!(
        ".{}.snapctl-revert-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&staged);
    let keep = Ownership::of(image)?;
    create_differencing(&staged, &target.path, &target.image, policy)?;
    // The rebuilt image keeps the owner and mode the image had.
    let replaced = std::fs::File::open(&staged)
        .map_err(|e| Error::io("open rebuilt image", e).with_path(&staged))
        .and_then(|file| keep.apply(&file, &staged))
        .and_then(|_| {
            std::fs::rename(&staged, image)
                .map_err(|e| Error::io("replace image", e).with_path(image))
        });
    if let Err(e) = replaced {
        let _ = std::fs::remove_file(&staged);
        return Err(e);
    }
    sync_folder(&dir);
    drop(chain);
    Ok(())
}

/// What [`delete_layer`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteOutcome {
    /// The child that took the layer's data and was relinked.
    pub child: PathBuf,
    /// Sectors copied into the child.
    pub sectors_copied: u64,
    /// Whether the child became a dynamic disk (the layer was the base).
    pub child_now_dynamic: bool,
    /// Whether the layer's file was removed.
    pub removed: bool,
    /// Other VHDs in the layer's folder that still name it as parent (then it is kept).
    pub kept_for: Vec<PathBuf>,
}

/// `disk delete IMAGE --layer PATH`: coalesces PATH's data into its child in IMAGE's chain
/// (every sector PATH has and the child lacks), relinks the child to PATH's parent (or makes it
/// a dynamic disk when PATH was the base), then removes PATH unless another VHD in its folder
/// still names it as parent. The guest view of IMAGE never changes at any moment, so an
/// interrupted delete can be run again; PATH's parent is never written.
pub fn delete_layer(image: &Path, layer: &Path, policy: ParentPolicy) -> Result<DeleteOutcome> {
    delete_layer_with_progress(image, layer, policy, |_, _| true)
}

/// [`delete_layer`], telling `progress` (done, total) bytes copied into the child after each
/// committed write (see [`Chain::coalesce_into_child_with_progress`]); `done` grows to
/// `total`. `progress` returns whether to go on: `false` stops the copy there with
/// [`ErrorKind::Cancelled`], before the relink, leaving a chain whose guest view is unchanged
/// — running the same delete again finishes it.
///
/// [`Chain::coalesce_into_child_with_progress`]: crate::Chain::coalesce_into_child_with_progress
pub fn delete_layer_with_progress(
    image: &Path,
    layer: &Path,
    policy: ParentPolicy,
    progress: impl FnMut(u64, u64) -> bool,
) -> Result<DeleteOutcome> {
    delete_layer_steps(image, layer, policy, |_, io| io, progress)
}

/// [`delete_layer`] with each layer's file I/O passed through `wrap(level, io)` (level 0 is the
/// image) before anything is read or written through it — e.g. a
/// [`RecordingIo`](snap_core::io::RecordingIo), for crash-state tests. The steps and their order
/// are the same.
pub fn delete_layer_with<IO: BlockIo>(
    image: &Path,
    layer: &Path,
    policy: ParentPolicy,
    wrap: impl FnMut(usize, FileIo) -> IO,
) -> Result<DeleteOutcome> {
    delete_layer_steps(image, layer, policy, wrap, |_, _| true)
}

fn delete_layer_steps<IO: BlockIo>(
    image: &Path,
    layer: &Path,
    policy: ParentPolicy,
    wrap: impl FnMut(usize, FileIo) -> IO,
    progress: impl FnMut(u64, u64) -> bool,
) -> Result<DeleteOutcome> {
    let wanted =
        std::fs::canonicalize(layer).map_err(|e| Error::io("resolve layer", e).with_path(layer))?;
    let mut below = false;
    let mut chain = open_chain_with(
        image,
        policy,
        |_, canonical| {
            if below {
                return LockMode::Shared;
            }
            if canonical == wanted {
                below = true;
            }
            LockMode::Exclusive
        },
        wrap,
    )?;
    let index = layer_index(&chain, image, layer)?;
    let child_path = chain
        .layers()
        .get(index - 1)
        .map(|l| l.path.clone())
        .ok_or_else(|| Error::invalid("layer index"))?;
    let layer_id = chain
        .layers()
        .get(index)
        .map(|l| l.image.footer().unique_id)
        .ok_or_else(|| Error::invalid("layer index"))?;
    // Validate the relink before writing anything.
    let link = match chain.layers().get(index + 1) {
        Some(parent) => Some(parent_link(
            &child_path,
            &parent.path,
            &parent.image,
            policy,
        )?),
        None => None,
    };
    let sectors_copied = chain
        .coalesce_into_child_with_progress(index, progress)
        .map_err(|e| e.context("copy layer data into its child"))?;
    let child = chain
        .image_mut(index - 1)
        .ok_or_else(|| Error::invalid("layer index"))?;
    match &link {
        Some(link) => child.set_parent(link),
        None => child.make_dynamic(),
    }
    .map_err(|e| e.context("relink the child").with_path(&child_path))?;
    let kept_for = other_children(layer, &layer_id, std::slice::from_ref(&child_path));
    let removed = kept_for.is_empty();
    if removed {
        std::fs::remove_file(layer).map_err(|e| Error::io("remove layer", e).with_path(layer))?;
        if let Ok(dir) = child_folder(layer) {
            sync_folder(&dir);
        }
    } else {
        tracing::warn!(
            layer = %layer.display(),
            "layer kept: {} still name it as parent",
            display_list(&kept_for)
        );
    }
    drop(chain);
    Ok(DeleteOutcome {
        child: child_path,
        sectors_copied,
        child_now_dynamic: link.is_none(),
        removed,
        kept_for,
    })
}

fn display_list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `disk list IMAGE`: size and chain (parent first, base last); VHD has no internal snapshots.
pub fn list_path(image: &Path, policy: ParentPolicy) -> Result<DiskListing> {
    let chain = open_chain(image, policy, |_, _| LockMode::Shared)?;
    Ok(listing(image, &chain))
}

fn listing<IO: BlockIo>(image: &Path, chain: &Chain<IO>) -> DiskListing {
    DiskListing {
        image: image.to_path_buf(),
        format: DiskFormat::Vhd,
        virtual_size: chain.size(),
        snapshots: Vec::new(),
        chain: chain
            .layers()
            .iter()
            .skip(1)
            .map(|l: &Layer<IO>| ChainLayer {
                path: l.path.clone(),
                format: DiskFormat::Vhd,
            })
            .collect(),
    }
}

/// `disk check IMAGE`: checks every layer of the chain (each finding prefixed with its file when
/// the chain has more than one layer).
pub fn check_path(image: &Path, policy: ParentPolicy) -> Result<CheckReport> {
    let chain = open_chain(image, policy, |_, _| LockMode::Shared)?;
    let several = chain.layers().len() > 1;
    let mut total = CheckReport::default();
    for (level, layer) in chain.layers().iter().enumerate() {
        let report = check(&layer.image).map_err(|e| e.with_path(&layer.path))?;
        if level == 0 {
            total.allocated_blocks = report.allocated_blocks;
            total.total_blocks = report.total_blocks;
        }
        total.corruptions += report.corruptions;
        total.leaked_bytes += report.leaked_bytes;
        for message in report.messages {
            total.messages.push(if several {
                format!("{}: {message}", layer.path.display())
            } else {
                message
            });
        }
    }
    Ok(total)
}

/// Whether `io` holds a VHD: a footer cookie in its last 512 bytes (or, for a dynamic disk whose
/// trailing footer is damaged, at offset 0).
pub fn probe(io: &dyn BlockIo) -> Result<bool> {
    let len = io.len()?;
    if len < FOOTER_LEN as u64 {
        return Ok(false);
    }
    let mut cookie = [0u8; 8];
    for at in [len - FOOTER_LEN as u64, 0] {
        if io.read_at(&mut cookie, at)? == 8 && &cookie == crate::format::footer::COOKIE {
            return Ok(true);
        }
    }
    Ok(false)
}
