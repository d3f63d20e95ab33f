//! Differencing chains: the active layer first, its parent next, the base last. Reads go
//! through the chain (a differencing layer's absent sector comes from its parent; a dynamic or
//! fixed base's absent sector is zero), writes go to the active layer, and a coalesce copies a
//! layer's sectors into its child.
//!
//! Opening a chain from files follows parent locators (W2ru first, then W2ku, then the header's
//! unicode name) under a [`ParentPolicy`], checks each parent's unique id against the child's
//! header (a mismatch is an error, as in vhd-util: the parent is not the disk the child was
//! made from) and its timestamp (a mismatch is only a warning: vhd-util records the parent's
//! file mtime, which any copy changes, while Windows and this crate record the parent's footer
//! timestamp, so no single value can be demanded), and refuses loops and chains deeper than 64.

use std::path::{Path, PathBuf};

use snap_core::io::FileIo;
use snap_core::lock::{ImageLock, LockMode};
use snap_core::{BlockIo, Error, ErrorKind, Result};

use crate::format::SECTOR;
use crate::format::footer::{DiskType, vhd_time_from_unix};
use crate::format::header::PlatformCode;
use crate::format::locator::{self, ParentPolicy};
use crate::image::{SectorRun, Vhd, chunk_len};

/// Granularity of guest writes: one sector-bitmap byte (8 sectors).
pub const WRITE_GRAIN: u64 = 8 * SECTOR;

/// The deepest chain followed.
pub const MAX_CHAIN_DEPTH: usize = 64;

/// One layer of a chain: where it is, the open image, and its lock while held.
#[derive(Debug)]
pub struct Layer<IO> {
    /// The layer's path (as found: the given path for the active layer, resolved locators for
    /// parents).
    pub path: PathBuf,
    /// The open image.
    pub image: Vhd<IO>,
    lock: Option<ImageLock>,
}

impl<IO> Layer<IO> {
    /// A layer without a lock (in-memory images, tests).
    pub fn unlocked(path: impl Into<PathBuf>, image: Vhd<IO>) -> Self {
        Layer {
            path: path.into(),
            image,
            lock: None,
        }
    }

    /// The lock mode held on the file, if any.
    pub fn lock_mode(&self) -> Option<LockMode> {
        self.lock.as_ref().map(ImageLock::mode)
    }
}

/// A chain of VHD layers, active first.
#[derive(Debug)]
pub struct Chain<IO> {
    layers: Vec<Layer<IO>>,
}

impl<IO: BlockIo> Chain<IO> {
    /// Builds a chain from open layers (active first), checking every link: each layer but the
    /// last is differencing and records the next one's unique id; the last has no parent.
    pub fn new(layers: Vec<Layer<IO>>) -> Result<Self> {
        if layers.is_empty() {
            return Err(Error::invalid("empty VHD chain"));
        }
        if layers.len() > MAX_CHAIN_DEPTH + 1 {
            return Err(too_deep());
        }
        for pair in layers.windows(2) {
            if let [child, parent] = pair {
                check_link(child, parent)?;
            }
        }
        if let Some(last) = layers.last() {
            if last.image.disk_type() == DiskType::Differencing {
                return Err(Error::not_found(format!(
                    "the parent of differencing disk {} is missing from the chain",
                    last.path.display()
                )));
            }
        }
        Ok(Chain { layers })
    }

    /// The layers, active first.
    pub fn layers(&self) -> &[Layer<IO>] {
        &self.layers
    }

    /// Mutable access to one layer's image (e.g. to reparent it).
    pub fn image_mut(&mut self, level: usize) -> Option<&mut Vhd<IO>> {
        self.layers.get_mut(level).map(|l| &mut l.image)
    }

    /// Takes the layers back.
    pub fn into_layers(self) -> Vec<Layer<IO>> {
        self.layers
    }

    /// The guest-visible size (the active layer's).
    pub fn size(&self) -> u64 {
        self.layers.first().map(|l| l.image.size()).unwrap_or(0)
    }

    /// Reads the guest view at `offset`; bytes past the size read as zero.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_from(0, offset, buf)
    }

    /// Reads the guest view of the chain starting at layer `level` (its own size applies).
    pub fn read_from(&self, level: usize, offset: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        let len = buf.len() as u64;
        if len == 0 {
            return Ok(());
        }
        let first = offset / SECTOR;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Error::invalid("read offset overflow"))?
            .div_ceil(SECTOR);
        if offset % SECTOR == 0 && len % SECTOR == 0 {
            return self.read_sectors(level, first, buf);
        }
        let mut aligned = vec![0u8; usize::try_from((end - first) * SECTOR).unwrap_or(0)];
        self.read_sectors(level, first, &mut aligned)?;
        let skip = usize::try_from(offset - first * SECTOR).unwrap_or(0);
        if let Some(src) = aligned.get(skip..skip + buf.len()) {
            buf.copy_from_slice(src);
        }
        Ok(())
    }

    /// Reads whole sectors starting at `sector` into `buf` (pre-zeroed by the caller or not:
    /// absent sectors are zeroed here).
    fn read_sectors(&self, level: usize, sector: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        let count = buf.len() as u64 / SECTOR;
        let mut pending = vec![(sector, count)];
        for layer in self.layers.iter().skip(level) {
            let mut next = Vec::new();
            for (s, c) in pending {
                for run in layer.image.sector_runs(s, c)? {
                    match run.file_offset {
                        Some(at) => {
                            let from = usize::try_from((run.sector - sector) * SECTOR)
                                .unwrap_or(usize::MAX);
                            let to = usize::try_from((run.sector + run.count - sector) * SECTOR)
                                .unwrap_or(usize::MAX);
                            let dst = buf
                                .get_mut(from..to)
                                .ok_or_else(|| Error::invalid("read range"))?;
                            layer.image.read_run(at, dst)?;
                        }
                        None => next.push((run.sector, run.count)),
                    }
                }
            }
            if layer.image.disk_type() != DiskType::Differencing || next.is_empty() {
                break;
            }
            pending = next;
        }
        Ok(())
    }

    /// Writes `data` at guest `offset` into the active layer.
    ///
    /// Writes are widened to whole 4 KiB groups (8 sectors: one byte of the sector bitmap),
    /// the added bytes taken from the current guest view, so every bitmap byte this crate writes
    /// is all-set or all-clear. libvhdi treats a partially set bitmap byte as fully present
    /// (it would read zeroes instead of the parent's sectors), so this keeps every reader in
    /// agreement.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        let size = self.size();
        let end = offset
            .checked_add(len)
            .filter(|end| *end <= size)
            .ok_or_else(|| Error::invalid("write past the end of the disk"))?;
        if len == 0 {
            return Ok(());
        }
        let first = offset / WRITE_GRAIN * WRITE_GRAIN;
        let last = end
            .div_ceil(WRITE_GRAIN)
            .saturating_mul(WRITE_GRAIN)
            .min(size);
        let mut aligned = vec![0u8; usize::try_from(last - first).unwrap_or(0)];
        let grain = usize::try_from(WRITE_GRAIN).unwrap_or(4096);
        if offset != first {
            let head_len = grain.min(aligned.len());
            if let Some(head) = aligned.get_mut(..head_len) {
                self.read_sectors(0, first / SECTOR, head)?;
            }
        }
        if end != last {
            let tail_start =
                usize::try_from((end - first) / WRITE_GRAIN * WRITE_GRAIN).unwrap_or(0);
            if let Some(tail) = aligned.get_mut(tail_start..) {
                self.read_sectors(0, (first + tail_start as u64) / SECTOR, tail)?;
            }
        }
        let skip = usize::try_from(offset - first).unwrap_or(0);
        aligned
            .get_mut(skip..skip + data.len())
            .ok_or_else(|| Error::invalid("write range"))?
            .copy_from_slice(data);
        let top = self
            .layers
            .first_mut()
            .ok_or_else(|| Error::invalid("empty VHD chain"))?;
        top.image.write_sectors(first / SECTOR, &aligned)
    }

    /// Copies every sector layer `level` has and its child (layer `level - 1`) does not into
    /// the child, marking them present there. Returns the number of sectors copied.
    ///
    /// The guest view of every layer above never changes: a copied sector holds exactly what
    /// the child used to read through from `level` (data first, bitmap bit after), so an
    /// interrupted coalesce can simply be run again; layer `level` is only read.
    pub fn coalesce_into_child(&mut self, level: usize) -> Result<u64> {
        self.coalesce_into_child_with_progress(level, |_, _| true)
    }

    /// The bytes [`coalesce_into_child`](Self::coalesce_into_child) would copy from layer
    /// `level` into its child: the sectors the layer has and the child lacks. Only reads.
    pub fn coalesce_bytes(&self, level: usize) -> Result<u64> {
        let (child, layer) = self.coalesce_pair(level)?;
        let mut sectors = 0u64;
        for_each_gap(
            &layer.image,
            &mut &child.image,
            child.image.size(),
            |child, sector, count| child.sector_runs(sector, count),
            |_, gap, _| {
                sectors += gap.count;
                Ok(true)
            },
        )?;
        Ok(sectors * SECTOR)
    }

    /// [`coalesce_into_child`](Self::coalesce_into_child), telling `progress` (done, total)
    /// bytes after each committed write into the child (its data, bitmaps and BAT entries are
    /// flushed then): `done` grows with every call and the last call has `done == total`,
    /// where `total` is [`coalesce_bytes`](Self::coalesce_bytes) (nothing is called when there
    /// is nothing to copy). `progress` returns whether to go on: `false` stops there with
    /// [`ErrorKind::Cancelled`], leaving a chain whose guest view is unchanged — running the
    /// coalesce again finishes it.
    pub fn coalesce_into_child_with_progress(
        &mut self,
        level: usize,
        mut progress: impl FnMut(u64, u64) -> bool,
    ) -> Result<u64> {
        let total = self.coalesce_bytes(level)?;
        let (upper, lower) = self.split_for_coalesce(level)?;
        let child_size = upper.image.size();
        let mut copied = 0u64;
        for_each_gap(
            &lower.image,
            &mut upper.image,
            child_size,
            |child, sector, count| child.sector_runs(sector, count),
            |child, gap, layer_at| {
                let mut data = vec![0u8; usize::try_from(gap.count * SECTOR).unwrap_or(0)];
                lower.image.read_run(layer_at, &mut data)?;
                child.write_sectors(gap.sector, &data)?;
                copied += gap.count;
                Ok(progress((copied * SECTOR).min(total), total))
            },
        )
        .and_then(|finished| {
            if finished {
                Ok(copied)
            } else {
                Err(Error::new(
                    ErrorKind::Cancelled,
                    format!(
                        "stopped after copying {} of {total} bytes; the chain is intact and unchanged for \
                         the guest — run the same command again to finish",
                        copied * SECTOR
                    ),
                ))
            }
        })
    }

    /// Layer `level - 1` (the child) and layer `level`, for reading.
    fn coalesce_pair(&self, level: usize) -> Result<(&Layer<IO>, &Layer<IO>)> {
        if level == 0 || level >= self.layers.len() {
            return Err(Error::invalid("no such layer below the active one"));
        }
        let child = self
            .layers
            .get(level - 1)
            .ok_or_else(|| Error::invalid("no child layer"))?;
        let layer = self
            .layers
            .get(level)
            .ok_or_else(|| Error::invalid("no layer to coalesce"))?;
        Ok((child, layer))
    }

    /// Layer `level - 1` (the child, writable) and layer `level`.
    fn split_for_coalesce(&mut self, level: usize) -> Result<(&mut Layer<IO>, &Layer<IO>)> {
        if level == 0 || level >= self.layers.len() {
            return Err(Error::invalid("no such layer below the active one"));
        }
        let (upper, lower) = self.layers.split_at_mut(level);
        let child = upper
            .last_mut()
            .ok_or_else(|| Error::invalid("no child layer"))?;
        let layer = lower
            .first()
            .ok_or_else(|| Error::invalid("no layer to coalesce"))?;
        Ok((child, layer))
    }
}

/// Calls `visit(child, gap, offset)` for every run of sectors `layer` has and the child (of
/// `child_size` bytes) lacks, in guest order, with the run's offset in `layer`'s file.
/// `child_runs(child, sector, count)` tells how the child keeps a range; it is asked about a
/// range only after every earlier gap was visited. Each gap lies inside one `COPY_CHUNK` piece
/// of the guest range. Stops when `visit` returns `false`; returns whether it went through.
fn for_each_gap<IO: BlockIo, C>(
    layer: &Vhd<IO>,
    child: &mut C,
    child_size: u64,
    child_runs: impl Fn(&C, u64, u64) -> Result<Vec<SectorRun>>,
    mut visit: impl FnMut(&mut C, SectorRun, u64) -> Result<bool>,
) -> Result<bool> {
    let total = layer.size().min(child_size) / SECTOR;
    let step = (chunk_len(u64::MAX) as u64 / SECTOR).max(1);
    let mut s = 0u64;
    while s < total {
        let count = step.min(total - s);
        for run in layer.sector_runs(s, count)? {
            let Some(run_at) = run.file_offset else {
                continue;
            };
            for gap in child_runs(child, run.sector, run.count)? {
                if gap.file_offset.is_some() {
                    continue;
                }
                if !visit(child, gap, run_at + (gap.sector - run.sector) * SECTOR)? {
                    return Ok(false);
                }
            }
        }
        s += count;
    }
    Ok(true)
}

fn too_deep() -> Error {
    Error::unsupported(format!("VHD chain is deeper than {MAX_CHAIN_DEPTH} layers"))
}

/// Checks that `parent` is the disk `child` was made from (unique id; timestamp only warns).
fn check_link<IO: BlockIo>(child: &Layer<IO>, parent: &Layer<IO>) -> Result<()> {
    let Some(header) = child.image.header() else {
        return Err(Error::corrupt("a fixed VHD cannot have a parent").with_path(&child.path));
    };
    if child.image.disk_type() != DiskType::Differencing {
        return Err(Error::invalid(format!(
            "{} is not a differencing disk, so it has no parent",
            child.path.display()
        )));
    }
    if header.parent_unique_id != parent.image.footer().unique_id {
        return Err(Error::corrupt(format!(
            "parent {} has unique id {} but the child records {}: it is not the disk this \
             child was made from",
            parent.path.display(),
            hex(&parent.image.footer().unique_id),
            hex(&header.parent_unique_id)
        ))
        .with_path(&child.path));
    }
    let recorded = header.parent_timestamp;
    let footer_ts = parent.image.footer().timestamp;
    let mtime = std::fs::metadata(&parent.path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| vhd_time_from_unix(d.as_secs()));
    if recorded != footer_ts && Some(recorded) != mtime {
        tracing::warn!(
            child = %child.path.display(),
            parent = %parent.path.display(),
            recorded,
            parent_footer_timestamp = footer_ts,
            "VHD parent timestamp differs from the one the child recorded (the parent may have \
             been copied or modified); unique ids match, so the chain is used"
        );
    }
    Ok(())
}

/// A unique id as hex.
pub fn hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Opens the VHD at `path` and its parents. `mode(level, canonical_path)` decides each layer's
/// lock (and whether it is opened writable: [`LockMode::Exclusive`]).
pub fn open_chain(
    path: &Path,
    policy: ParentPolicy,
    mode: impl FnMut(usize, &Path) -> LockMode,
) -> Result<Chain<FileIo>> {
    open_chain_with(path, policy, mode, |_, io| io)
}

/// [`open_chain`] with each layer's file I/O passed through `wrap(level, io)` before the layer is
/// read (e.g. a [`RecordingIo`](snap_core::io::RecordingIo), for crash-state tests); locks are
/// taken on the files themselves.
pub fn open_chain_with<IO: BlockIo>(
    path: &Path,
    policy: ParentPolicy,
    mut mode: impl FnMut(usize, &Path) -> LockMode,
    mut wrap: impl FnMut(usize, FileIo) -> IO,
) -> Result<Chain<IO>> {
    let mut layers: Vec<Layer<IO>> = Vec::new();
    let mut seen: Vec<PathBuf> = Vec::new();
    let mut next = Some(path.to_path_buf());
    while let Some(layer_path) = next.take() {
        if layers.len() > MAX_CHAIN_DEPTH {
            return Err(too_deep().with_path(path));
        }
        let canonical = std::fs::canonicalize(&layer_path)
            .map_err(|e| Error::io("open VHD", e).with_path(&layer_path))?;
        if seen.contains(&canonical) {
            return Err(Error::corrupt(format!(
                "VHD parent chain loops back to {}",
                layer_path.display()
            ))
            .with_path(path));
        }
        let level = layers.len();
        let lock_mode = mode(level, &canonical);
        let layer = open_layer_with(&layer_path, lock_mode, |io| wrap(level, io))?;
        if let Some(child) = layers.last() {
            check_link(child, &layer)?;
        }
        if layer.image.disk_type() == DiskType::Differencing {
            next = Some(find_parent(&layer_path, &layer.image, policy)?);
        }
        seen.push(canonical);
        layers.push(layer);
    }
    Chain::new(layers)
}

/// Opens one VHD file under a lock of `mode` (writable for [`LockMode::Exclusive`]).
pub fn open_layer(path: &Path, mode: LockMode) -> Result<Layer<FileIo>> {
    open_layer_with(path, mode, |io| io)
}

/// [`open_layer`] with the file's I/O passed through `wrap` (the lock is on the file).
fn open_layer_with<IO: BlockIo>(
    path: &Path,
    mode: LockMode,
    wrap: impl FnOnce(FileIo) -> IO,
) -> Result<Layer<IO>> {
    let writable = mode == LockMode::Exclusive;
    let io = FileIo::open(path, writable)?;
    let lock = ImageLock::acquire(io.file(), path, mode)?;
    let image = Vhd::open(wrap(io), writable).map_err(|e| e.with_path(path))?;
    for note in image.notes() {
        tracing::warn!(path = %path.display(), "{note}");
    }
    Ok(Layer {
        path: path.to_path_buf(),
        image,
        lock: Some(lock),
    })
}

/// Finds the parent file of the differencing disk `child` at `child_path`: W2ru locators first,
/// then W2ku, then the unicode name; each resolved against the child's folder under `policy`.
///
/// Errors: [`ErrorKind::Unsupported`] when the only candidates lead out of the folder;
/// [`ErrorKind::NotFound`] when none exists.
pub fn find_parent<IO: BlockIo>(
    child_path: &Path,
    child: &Vhd<IO>,
    policy: ParentPolicy,
) -> Result<PathBuf> {
    let header = child
        .header()
        .ok_or_else(|| Error::corrupt("fixed VHD has no parent").with_path(child_path))?;
    let canonical_child = std::fs::canonicalize(child_path)
        .map_err(|e| Error::io("resolve VHD path", e).with_path(child_path))?;
    let child_dir = canonical_child
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    let mut names: Vec<String> = Vec::new();
    for wanted in [PlatformCode::W2ru, PlatformCode::W2ku] {
        for entry in header.locators.iter().filter(|e| e.platform == wanted) {
            match child
                .read_locator(entry)
                .and_then(|data| locator::decode_utf16le(&data))
            {
                Ok(name) => names.push(name),
                Err(e) => tracing::warn!(
                    path = %child_path.display(),
                    "skipping unreadable parent locator: {e}"
                ),
            }
        }
    }
    if let Some(name) = header.parent_name() {
        names.push(locator::normalize_windows_path(&name));
    }
    let mut refused: Option<Error> = None;
    let mut tried = Vec::new();
    for name in names {
        let candidate = match locator::resolve(&child_dir, &name, policy) {
            Ok(candidate) => candidate,
            Err(e) => {
                refused.get_or_insert(e);
                continue;
            }
        };
        let Ok(canonical) = std::fs::canonicalize(&candidate) else {
            tried.push(candidate.display().to_string());
            continue;
        };
        if policy == ParentPolicy::ChildFolder && !canonical.starts_with(&child_dir) {
            refused.get_or_insert(locator::outside(&name, &child_dir));
            continue;
        }
        if !canonical.is_file() {
            tried.push(candidate.display().to_string());
            continue;
        }
        return Ok(candidate);
    }
    if let Some(e) = refused {
        let e = if tried.is_empty() {
            e
        } else {
            e.context(format!("parent not found at {}", tried.join(", ")))
        };
        return Err(e.with_path(child_path));
    }
    Err(Error::new(
        ErrorKind::NotFound,
        format!(
            "parent of differencing VHD not found (tried: {})",
            if tried.is_empty() {
                "no usable locator or parent name".to_string()
            } else {
                tried.join(", ")
            }
        ),
    )
    .with_path(child_path))
}
