//! Exports: `snapctl disk export`, `snapctl snapshot export` and `snapctl snapshot import`.
//!
//! # Disk export
//! A flat, standalone, sparse copy of one guest view of a disk — an internal snapshot of a qcow2
//! image, a backing layer of an image's chain (the view through that layer and its backings), or
//! the image's current view — as a new qcow2 image, a dynamic VHD or a raw file. The view is
//! read natively through the backends (qcow2 L1/L2 tables through the backing chain; VHD BATs
//! and sector bitmaps through the differencing chain) and walked by extent: runs no layer holds
//! data for are never read; data runs are read 4 MiB at a time, checked for zeroes per 64 KiB
//! and only non-zero data is written (a qcow2 output gets sequentially allocated clusters and
//! one L2 table write per 512 MiB; a raw output stays a sparse file; a VHD output gets blocks
//! only where data is). Every zero stays a hole.
//!
//! The output is created new (an existing file is refused, never overwritten), held under an
//! exclusive QEMU-compatible lock while it is written, flushed, and removed on any error or on
//! Ctrl-C.
//!
//! # Checksum
//! Every export reports a checksum of the whole guest view, zeroes included: the BLAKE3 hash of
//! the concatenated BLAKE3 digests of its consecutive 4 MiB chunks (the last one shorter). A
//! chunk no layer holds data for has a known digest, so holes cost nothing to hash however large
//! the disk, and the chunks are hashed on a second thread while the first copies. BLAKE3 (SIMD)
//! hashes several GB/s on one core, where SHA-256 (about 1.3 GB/s with SHA-NI here) would make
//! the hash, not the copy, set an export's speed. Recompute it from any copy (`b3sum`, Debian
//! package b3sum):
//!
//! ```text
//! qemu-img convert -O raw OUT out.raw
//! split -b 4M --filter='b3sum --no-names' out.raw | xxd -r -p | b3sum --no-names
//! ```
//!
//! # Locking, and images a running QEMU holds
//! The source is only read. Each file of the view is locked shared (QEMU's protocol: consistent
//! read, refusing writers). When a running QEMU (or anything else) writes a file, that lock is
//! refused; then:
//! - an internal snapshot's view, or a backing layer's, is read without the lock, like
//!   `qemu-img -U`: a snapshot's L1/L2 tables and data clusters are never written while it exists
//!   (QEMU copies on write what a snapshot shares), and a backing layer is frozen (snapctl merges
//!   layers by streaming into the child, never by writing the layer). So `--qmp` is not needed;
//!   only deleting the snapshot, or a commit into the layer, at the same time would disturb it;
//! - the current view of an image being written is refused: it changes while it is read (take a
//!   snapshot and export that).
//!
//! # Domain export and import
//! `snapshot export DOMAIN NAME DIR` writes into DIR (new, or empty): `VDEV.qcow2` for every disk
//! of the snapshot (its view at the snapshot, standalone), `memory.mem` and `memory.mem.json`
//! when the snapshot has memory (a sparse copy), `domain.cfg` (the snapshot's config as xl.cfg,
//! its disks on the exported files) and `snapshot.json` last (the snapshot's record, each disk's
//! size and checksum, and [`EXPORT_FORMAT_VERSION`]). It runs under the domain's lock, while the
//! domain runs if it does. `snapshot import DIR [NEW]` verifies every disk's checksum and defines
//! a new, shut off domain whose only snapshot is the exported one: its disks are the exported
//! files as frozen external layers, the domain's active disks new empty overlays on them in DIR,
//! its memory `DIR/memory.mem`; `snapshot revert NEW NAME` then starts it from there.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::json;
use snap_backend_qcow2::{GuestRead, Qcow2Disk};
use snap_backend_vhd::{Chain, Layer, ParentPolicy, Vhd};
use snap_core::io::FileIo;
use snap_core::lock::{ImageLock, LockMode};
use snap_core::{BlockIo, DiskFormat, Error, ErrorKind, Result};

use crate::domain::Ctx;
use crate::exec;
use crate::layers::{self, Backend};
use crate::store::{self, DiskKind, DomainRecord, SnapshotDisk, SnapshotRecord};
use crate::xlcfg::{self, DiskFormat as XlFormat};

/// The version of the export folder's layout (`snapshot.json`'s `format_version`).
pub const EXPORT_FORMAT_VERSION: u32 = 1;

/// Bytes per checksum chunk (see the module docs).
pub const CHUNK: u64 = 4 << 20;

/// Granularity of zero detection and of writes to the output.
const GRAIN: u64 = 64 << 10;

/// How the checksum is computed, as reported.
pub const CHECKSUM_ALGORITHM: &str = "blake3 of the blake3 digests of each 4 MiB of the guest view";

/// The manifest file of an export folder.
pub const MANIFEST: &str = "snapshot.json";

/// The largest manifest read.
const MAX_MANIFEST_BYTES: u64 = 16 << 20;

/// The output formats of `disk export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// A standalone qcow2 v3 image (64 KiB clusters).
    Qcow2,
    /// A sparse raw file.
    Raw,
    /// A dynamic VHD (2 MiB blocks).
    Vhd,
}

impl OutputFormat {
    /// The format's name.
    pub fn as_str(self) -> &'static str {
        match self {
            OutputFormat::Qcow2 => "qcow2",
            OutputFormat::Raw => "raw",
            OutputFormat::Vhd => "vhd",
        }
    }
}

/// Which guest view of a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewSpec {
    /// The image's current view.
    Current,
    /// An internal snapshot (qcow2), by name or id.
    Snapshot(String),
    /// A backing layer of the image's chain: the view through it and its backings.
    Layer(PathBuf),
}

impl ViewSpec {
    fn describe(&self, image: &Path) -> String {
        match self {
            ViewSpec::Current => format!("the current view of {}", image.display()),
            ViewSpec::Snapshot(name) => format!("snapshot {name:?} of {}", image.display()),
            ViewSpec::Layer(layer) => {
                format!("layer {} (of {}'s chain)", layer.display(), image.display())
            }
        }
    }

    fn json(&self) -> serde_json::Value {
        match self {
            ViewSpec::Current => json!({"current": true}),
            ViewSpec::Snapshot(name) => json!({"snapshot": name}),
            ViewSpec::Layer(layer) => json!({"layer": layer}),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Source views

enum Reader {
    Qcow2(Box<Qcow2Disk<FileIo>>),
    Vhd(Chain<FileIo>),
    Rbd(std::sync::Mutex<RbdStream>),
}

/// An RBD image or snapshot read as the stream `rbd export SPEC -` prints (the raw guest view,
/// zeroes included, in order): the copy reads its chunks in increasing order, so one stream
/// serves them all; zero detection keeps the output sparse. Started at the first read (a dry run
/// starts nothing); killed when dropped unfinished.
struct RbdStream {
    rbd: snap_backend_rbd::Rbd,
    source: String,
    size: u64,
    pos: u64,
    child: Option<(std::process::Child, std::process::ChildStdout)>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl RbdStream {
    fn start(&mut self) -> Result<()> {
        let mut cmd = self
            .rbd
            .command(&["export".into(), self.source.clone(), "-".into()]);
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::io("run rbd export", e).with_path(&self.source))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| Error::new(ErrorKind::Io, "rbd export: no stdout"))?;
        if let Some(mut err) = child.stderr.take() {
            self.stderr = std::thread::Builder::new()
                .name("rbd-export-stderr".into())
                .spawn(move || {
                    let mut text = String::new();
                    let _ = err.read_to_string(&mut text);
                    text
                })
                .ok();
        }
        self.child = Some((child, stdout));
        Ok(())
    }

    /// Waits for rbd to exit; an error with rbd's message unless it succeeded.
    fn finish(&mut self) -> Result<()> {
        let Some((mut child, stdout)) = self.child.take() else {
            return Ok(());
        };
        drop(stdout);
        let status = child
            .wait()
            .map_err(|e| Error::io("wait for rbd export", e))?;
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        if status.success() {
            return Ok(());
        }
        let mut e = snap_backend_rbd::classify_failure("export", status.code(), &stderr);
        if status.code().is_none() {
            e = Error::new(ErrorKind::Io, format!("rbd export was killed ({status})"));
        }
        Err(e.with_path(&self.source))
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if offset != self.pos {
            return Err(Error::invalid(format!(
                "rbd export stream read out of order (at {}, asked {offset})",
                self.pos
            )));
        }
        if offset + buf.len() as u64 > self.size {
            return Err(Error::invalid("read past the end of the RBD image"));
        }
        if self.child.is_none() {
            self.start()?;
        }
        let result = match &mut self.child {
            Some((_, stdout)) => stdout.read_exact(buf),
            None => return Err(Error::new(ErrorKind::Io, "rbd export is not running")),
        };
        if let Err(e) = result {
            // rbd stopped early: its own error says why.
            self.finish()?;
            return Err(Error::io("read rbd export's stream", e).with_path(&self.source));
        }
        self.pos += buf.len() as u64;
        if self.pos == self.size {
            self.finish()?;
        }
        Ok(())
    }
}

impl Drop for RbdStream {
    fn drop(&mut self) {
        if let Some((mut child, _)) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reader::Qcow2(_) => f.write_str("Reader::Qcow2"),
            Reader::Vhd(_) => f.write_str("Reader::Vhd"),
            Reader::Rbd(_) => f.write_str("Reader::Rbd"),
        }
    }
}

/// An open, read-only guest view, with the shared locks it could take.
#[derive(Debug)]
pub struct SourceView {
    /// The file the view starts at (the image, or the layer).
    pub path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
    /// Whether some file of the view was read without its lock (another process writes it).
    pub lock_free: bool,
    reader: Reader,
    _locks: Vec<ImageLock>,
}

/// Locks `path` shared; `None` when another process holds a conflicting lock (a writer).
fn try_shared(path: &Path) -> Result<Option<ImageLock>> {
    let file = File::open(path).map_err(|e| Error::io("open", e).with_path(path))?;
    match ImageLock::acquire(&file, path, LockMode::Shared) {
        Ok(lock) => Ok(Some(lock)),
        Err(e) if e.kind() == ErrorKind::InUse => Ok(None),
        Err(e) => Err(e),
    }
}

/// The files of a VHD chain from `path` down, opened without locks.
fn vhd_chain(path: &Path) -> Result<Chain<FileIo>> {
    let mut layers: Vec<Layer<FileIo>> = Vec::new();
    let mut seen: Vec<PathBuf> = Vec::new();
    let mut next = Some(path.to_path_buf());
    while let Some(layer_path) = next.take() {
        if layers.len() > snap_backend_vhd::MAX_CHAIN_DEPTH {
            return Err(Error::unsupported("VHD chain is deeper than 64 layers").with_path(path));
        }
        let canonical = std::fs::canonicalize(&layer_path)
            .map_err(|e| Error::io("open VHD", e).with_path(&layer_path))?;
        if seen.contains(&canonical) {
            return Err(Error::corrupt("VHD parent chain loops").with_path(path));
        }
        let image = Vhd::open(FileIo::open(&layer_path, false)?, false)
            .map_err(|e| e.with_path(&layer_path))?;
        if image.disk_type() == snap_backend_vhd::format::footer::DiskType::Differencing {
            next = Some(snap_backend_vhd::chain::find_parent(
                &layer_path,
                &image,
                ParentPolicy::ChildFolder,
            )?);
        }
        seen.push(canonical);
        layers.push(Layer::unlocked(layer_path, image));
    }
    Chain::new(layers)
}

/// The files of the view's chain from `path` (`path` first).
fn chain_files(format: DiskFormat, path: &Path) -> Result<Vec<PathBuf>> {
    match format {
        DiskFormat::Qcow2 => {
            let listing = snap_backend_qcow2::list_path_unlocked(path)?;
            let mut files = vec![path.to_path_buf()];
            files.extend(listing.chain.into_iter().map(|l| l.path));
            Ok(files)
        }
        _ => Ok(vhd_chain(path)?
            .layers()
            .iter()
            .map(|l| l.path.clone())
            .collect()),
    }
}

impl SourceView {
    /// Opens `view` of `image` for reading (see the module docs for locking).
    pub fn open(image: &Path, view: &ViewSpec) -> Result<SourceView> {
        let format = crate::disk::detect(image, None)?;
        match format {
            DiskFormat::Qcow2 | DiskFormat::Vhd => {}
            DiskFormat::Raw => {
                return Err(Error::unsupported(
                    "the image is raw or of an unknown format: disk export reads qcow2 and VHD \
                     images (a raw file is already flat)",
                )
                .with_path(image));
            }
            other => {
                return Err(Error::unsupported(format!(
                    "disk export reads qcow2 and VHD images, not {other}"
                ))
                .with_path(image));
            }
        }
        // Where the view starts, and whether it is frozen (a snapshot or a backing layer).
        let (path, snapshot, frozen) = match view {
            ViewSpec::Current => (image.to_path_buf(), None, false),
            ViewSpec::Snapshot(name) => {
                if format == DiskFormat::Vhd {
                    return Err(Error::unsupported(
                        "VHD images have no internal snapshots; export a layer of the chain \
                         with --layer PATH",
                    )
                    .with_path(image));
                }
                (image.to_path_buf(), Some(name.as_str()), true)
            }
            ViewSpec::Layer(layer) => {
                snap_backend_qcow2::external::refuse_half_folded(layer)?;
                let want = std::fs::canonicalize(layer)
                    .map_err(|e| Error::io("open layer", e).with_path(layer))?;
                let files = chain_files(format, image)?;
                let index = files
                    .iter()
                    .position(|f| std::fs::canonicalize(f).ok().as_deref() == Some(&want));
                match index {
                    None => {
                        return Err(Error::not_found(format!(
                            "{} is not a layer of this image's backing chain",
                            layer.display()
                        ))
                        .with_path(image));
                    }
                    // The image itself: its current view.
                    Some(0) => (image.to_path_buf(), None, false),
                    Some(_) => (layer.clone(), None, true),
                }
            }
        };
        let files = chain_files(format, &path)?;
        let mut locks = Vec::new();
        let mut lock_free = false;
        for (i, file) in files.iter().enumerate() {
            match try_shared(file)? {
                Some(lock) => locks.push(lock),
                None if i == 0 && !frozen => {
                    return Err(Error::new(
                        ErrorKind::InUse,
                        "another process (a running QEMU?) writes this image, so its current \
                         view changes while it is read; take a snapshot (internal, or --external \
                         with `disk create --qmp`) and export that, or stop the guest",
                    )
                    .with_path(file));
                }
                None => {
                    tracing::info!(path = %file.display(), "reading without the lock (frozen view)");
                    lock_free = true;
                }
            }
        }
        let reader = match format {
            DiskFormat::Qcow2 => Reader::Qcow2(Box::new(Qcow2Disk::open_view(&path, snapshot)?)),
            _ => Reader::Vhd(vhd_chain(&path)?),
        };
        Ok(SourceView {
            path,
            format,
            lock_free,
            reader,
            _locks: locks,
        })
    }

    /// Opens `view` of the RBD image `image` (`rbd:POOL/IMAGE...`): the image now, or one of
    /// its snapshots, read through `rbd export SPEC -`. The current view of an image a client
    /// (a running QEMU) has open is refused, as for files: it changes while it is read.
    pub async fn open_rbd(image: &Path, view: &ViewSpec) -> Result<SourceView> {
        let backend = snap_backend_rbd::RbdBackend::new(image)?;
        let snapshot = match view {
            ViewSpec::Current => None,
            ViewSpec::Snapshot(name) => {
                snap_backend_rbd::validate_snapshot_name(name)?;
                Some(name.as_str())
            }
            ViewSpec::Layer(_) => {
                return Err(Error::unsupported(
                    "--layer names a file of a qcow2 or VHD chain; an RBD clone's parent is a \
                     snapshot of another image: export that (IMAGE PARENT-SNAPSHOT OUT)",
                )
                .with_path(image));
            }
        };
        let (source, size) = backend.export_stream(snapshot).await?;
        if snapshot.is_none() {
            let watchers = backend.watchers().await?;
            if !watchers.is_empty() {
                return Err(Error::new(
                    ErrorKind::InUse,
                    format!(
                        "{} is open by {} client(s) (a running QEMU?), so its current view \
                         changes while it is read; take a snapshot (snapctl disk create, or \
                         snapshot create on the domain) and export that, or stop the guest",
                        backend.spec(),
                        watchers.len()
                    ),
                )
                .with_path(image));
            }
        }
        Ok(SourceView {
            path: image.to_path_buf(),
            format: DiskFormat::Rbd,
            lock_free: false,
            reader: Reader::Rbd(std::sync::Mutex::new(RbdStream {
                rbd: backend.rbd().clone(),
                source: source.arg(),
                size,
                pos: 0,
                child: None,
                stderr: None,
            })),
            _locks: Vec::new(),
        })
    }

    /// The view's guest size.
    pub fn size(&self) -> u64 {
        match &self.reader {
            Reader::Qcow2(d) => d.guest_size(),
            Reader::Vhd(c) => c.size(),
            Reader::Rbd(s) => s.lock().map(|s| s.size).unwrap_or(0),
        }
    }

    /// The first run of `offset..offset + len`: `(holds data, length)`.
    fn extent(&self, offset: u64, len: u64) -> Result<(bool, u64)> {
        match &self.reader {
            Reader::Qcow2(d) => {
                let e = d.extent(offset, len)?;
                Ok((e.data, e.len.clamp(1, len.max(1))))
            }
            Reader::Vhd(c) => vhd_extent(c, offset, len),
            // The stream has every byte; zero detection finds the holes.
            Reader::Rbd(_) => Ok((true, len.max(1))),
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match &self.reader {
            Reader::Qcow2(d) => d.read_guest(offset, buf),
            Reader::Vhd(c) => c.read(offset, buf),
            Reader::Rbd(s) => s
                .lock()
                .map_err(|_| Error::new(ErrorKind::Io, "the rbd export stream failed"))?
                .read(offset, buf),
        }
    }

    /// Bytes some layer holds data for (what an export reads at most).
    pub fn allocated(&self) -> Result<u64> {
        let size = self.size();
        let mut at = 0;
        let mut data = 0;
        while at < size {
            let (is_data, len) = self.extent(at, size - at)?;
            if is_data {
                data += len;
            }
            at += len;
        }
        Ok(data)
    }
}

/// A VHD chain's extent, by block: data when any layer has the block allocated (or is fixed).
fn vhd_extent(chain: &Chain<FileIo>, offset: u64, len: u64) -> Result<(bool, u64)> {
    let size = chain.size();
    if offset >= size || len == 0 {
        return Ok((false, len.max(1)));
    }
    let len = len.min(size - offset);
    let block_of = |image: &Vhd<FileIo>| image.header().map(|h| u64::from(h.block_size));
    // The smallest block size in the chain decides the step.
    let step = chain
        .layers()
        .iter()
        .filter_map(|l| block_of(&l.image))
        .min()
        .unwrap_or(2 << 20)
        .max(512);
    let allocated = |at: u64| -> bool {
        for layer in chain.layers() {
            let image = &layer.image;
            match block_of(image) {
                None => return true,
                Some(bs) => {
                    let index = usize::try_from(at / bs).unwrap_or(usize::MAX);
                    if image
                        .bat()
                        .get(index)
                        .is_some_and(|e| *e != snap_backend_vhd::format::bat::UNUSED)
                    {
                        return true;
                    }
                }
            }
            if image.disk_type() != snap_backend_vhd::format::footer::DiskType::Differencing {
                break;
            }
        }
        false
    };
    let first = allocated(offset);
    let mut at = (offset / step + 1) * step;
    while at < offset + len && allocated(at) == first {
        at += step;
    }
    Ok((first, at.min(offset + len) - offset))
}

// ---------------------------------------------------------------------------------------------
// Outputs

/// Where exported data goes.
trait Sink: Send {
    /// Writes non-zero data at `guest` (64 KiB aligned; in increasing order).
    fn write(&mut self, guest: u64, data: &[u8]) -> Result<()>;
    /// Completes the output and flushes it.
    fn finish(self: Box<Self>) -> Result<()>;
}

struct Qcow2Sink(snap_backend_qcow2::SequentialWriter<FileIo>);

impl Sink for Qcow2Sink {
    fn write(&mut self, guest: u64, data: &[u8]) -> Result<()> {
        self.0.write(guest, data)
    }
    fn finish(self: Box<Self>) -> Result<()> {
        self.0.finish().map(drop)
    }
}

struct VhdSink(snap_backend_vhd::writer::SequentialWriter<FileIo>);

impl Sink for VhdSink {
    fn write(&mut self, guest: u64, data: &[u8]) -> Result<()> {
        self.0.write(guest, data)
    }
    fn finish(self: Box<Self>) -> Result<()> {
        self.0.finish().map(drop)
    }
}

struct RawSink {
    io: FileIo,
    size: u64,
}

impl Sink for RawSink {
    fn write(&mut self, guest: u64, data: &[u8]) -> Result<()> {
        self.io.write_all_at(data, guest)
    }
    fn finish(self: Box<Self>) -> Result<()> {
        self.io.set_len(self.size)?;
        self.io.flush()
    }
}

/// Reads and hashes only (import verification).
struct NullSink;

impl Sink for NullSink {
    fn write(&mut self, _guest: u64, _data: &[u8]) -> Result<()> {
        Ok(())
    }
    fn finish(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

/// A new output file: created exclusively (never replacing anything), locked, and removed again
/// unless [`NewFile::keep`] is called.
struct NewFile {
    path: PathBuf,
    keep: bool,
}

impl NewFile {
    fn create(path: &Path, mode: u32) -> Result<(NewFile, File)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Error::new(
                        ErrorKind::Exists,
                        "the output exists already; snapctl never overwrites it",
                    )
                    .with_path(path)
                } else {
                    Error::io("create the output", e).with_path(path)
                }
            })?;
        Ok((
            NewFile {
                path: path.to_path_buf(),
                keep: false,
            },
            file,
        ))
    }

    fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn refuse_existing(path: &Path) -> Result<()> {
    if path.symlink_metadata().is_ok() {
        return Err(Error::new(
            ErrorKind::Exists,
            "the output exists already; snapctl never overwrites it",
        )
        .with_path(path));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The copy

/// What a copy did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyReport {
    /// The guest size.
    pub virtual_size: u64,
    /// Bytes of (non-zero) data written.
    pub data_bytes: u64,
    /// The checksum of the whole guest view (see the module docs), hex.
    pub checksum: String,
}

/// The digest of a chunk of `len` zero bytes.
fn zero_digest(len: u64) -> [u8; 32] {
    static ZEROES: [u8; 64 << 10] = [0; 64 << 10];
    let mut h = blake3::Hasher::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(ZEROES.len() as u64);
        h.update(ZEROES.get(..n as usize).unwrap_or_default());
        left -= n;
    }
    *h.finalize().as_bytes()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the hashing thread gets, in chunk order.
enum Chunk {
    /// A chunk's bytes (the buffer goes back for reuse).
    Data(Vec<u8>),
    /// A chunk of zeroes of this length.
    Zero(u64),
}

/// A progress callback: (bytes of the guest view done, total).
type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// Copies the view into `sink`: extent by extent, 4 MiB at a time, zero 64 KiB pieces skipped;
/// hashes every chunk on a second thread. Stops with an error when `cancel` is set.
fn copy_view(
    view: &SourceView,
    mut sink: Box<dyn Sink>,
    output: Option<&File>,
    progress: Progress<'_>,
    cancel: &AtomicBool,
) -> Result<CopyReport> {
    let size = view.size();
    let full_zero = zero_digest(CHUNK);
    let (to_hasher, from_main) = mpsc::sync_channel::<Chunk>(3);
    let (give_back, buffers) = mpsc::channel::<Vec<u8>>();
    let hasher = std::thread::Builder::new()
        .name("export-hash".into())
        .spawn(move || {
            let mut total = blake3::Hasher::new();
            for chunk in from_main {
                match chunk {
                    Chunk::Data(buf) => {
                        total.update(blake3::hash(&buf).as_bytes());
                        let _ = give_back.send(buf);
                    }
                    Chunk::Zero(len) if len == CHUNK => {
                        total.update(&full_zero);
                    }
                    Chunk::Zero(len) => {
                        total.update(&zero_digest(len));
                    }
                }
            }
            hex(total.finalize().as_bytes())
        })
        .map_err(|e| Error::io("start the hashing thread", e))?;
    let result = (|| -> Result<u64> {
        let mut data_bytes = 0u64;
        let mut allocated_buffers = 0;
        let mut at = 0u64;
        while at < size {
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::new(ErrorKind::Io, "interrupted"));
            }
            let len = CHUNK.min(size - at);
            // Which parts of the chunk some layer holds data for.
            let mut runs: Vec<(u64, u64)> = Vec::new();
            let mut pos = at;
            while pos < at + len {
                let (data, n) = view.extent(pos, at + len - pos)?;
                if data {
                    match runs.last_mut() {
                        Some(last) if last.0 + last.1 == pos => last.1 += n,
                        _ => runs.push((pos, n)),
                    }
                }
                pos += n;
            }
            if runs.is_empty() {
                send(&to_hasher, Chunk::Zero(len))?;
            } else {
                let mut buf = match buffers.try_recv() {
                    Ok(buf) => buf,
                    Err(_) if allocated_buffers < 5 => {
                        allocated_buffers += 1;
                        Vec::with_capacity(CHUNK as usize)
                    }
                    Err(_) => buffers
                        .recv()
                        .map_err(|_| Error::new(ErrorKind::Io, "the hashing thread stopped"))?,
                };
                // Runs are read; only the gaps between them are zeroed.
                buf.resize(len as usize, 0);
                let mut cursor = 0usize;
                for &(start, n) in &runs {
                    let from = (start - at) as usize;
                    buf.get_mut(cursor..from).unwrap_or_default().fill(0);
                    let slice = buf
                        .get_mut(from..from + n as usize)
                        .ok_or_else(|| Error::invalid("read range"))?;
                    view.read(start, slice)?;
                    cursor = from + n as usize;
                }
                buf.get_mut(cursor..).unwrap_or_default().fill(0);
                // Non-zero grains, coalesced into runs, go to the output.
                let mut any = false;
                let mut pending: Option<(usize, usize)> = None;
                for (i, grain) in buf.chunks(GRAIN as usize).enumerate() {
                    let start = i * GRAIN as usize;
                    if is_zero(grain) {
                        if let Some((s, e)) = pending.take() {
                            write_run(&mut *sink, at, &buf, s, e, &mut data_bytes)?;
                        }
                        continue;
                    }
                    any = true;
                    pending = match pending {
                        Some((s, _)) => Some((s, start + grain.len())),
                        None => Some((start, start + grain.len())),
                    };
                }
                if let Some((s, e)) = pending {
                    write_run(&mut *sink, at, &buf, s, e, &mut data_bytes)?;
                }
                if any {
                    send(&to_hasher, Chunk::Data(buf))?;
                } else {
                    send(&to_hasher, Chunk::Zero(len))?;
                    allocated_buffers -= 1;
                }
            }
            at += len;
            if let Some(file) = output
                && (at / CHUNK) % WRITEBACK_CHUNKS == 0
            {
                start_writeback(file);
            }
            progress(at, size);
        }
        Ok(data_bytes)
    })();
    drop(to_hasher);
    let checksum = hasher
        .join()
        .map_err(|_| Error::new(ErrorKind::Io, "the hashing thread failed"))?;
    let data_bytes = result?;
    sink.finish()?;
    Ok(CopyReport {
        virtual_size: size,
        data_bytes,
        checksum,
    })
}

/// Every this many chunks the output's dirty pages are handed to writeback.
const WRITEBACK_CHUNKS: u64 = 8;

/// Starts writeback of what was written to `file` so far (`POSIX_FADV_DONTNEED` writes dirty
/// pages back asynchronously before dropping clean ones): the disk works while the copy goes on,
/// and the final flush has little left to wait for. Best effort.
fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    let _ = nix::fcntl::posix_fadvise(
        file.as_raw_fd(),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
}

fn send(to: &mpsc::SyncSender<Chunk>, chunk: Chunk) -> Result<()> {
    to.send(chunk)
        .map_err(|_| Error::new(ErrorKind::Io, "the hashing thread stopped"))
}

fn write_run(
    sink: &mut dyn Sink,
    chunk_at: u64,
    buf: &[u8],
    start: usize,
    end: usize,
    data_bytes: &mut u64,
) -> Result<()> {
    let data = buf
        .get(start..end)
        .ok_or_else(|| Error::invalid("write range"))?;
    sink.write(chunk_at + start as u64, data)?;
    *data_bytes += data.len() as u64;
    Ok(())
}

/// Whether `bytes` are all zero (word at a time).
fn is_zero(bytes: &[u8]) -> bool {
    let mut words = bytes.chunks_exact(16);
    let wide = words
        .by_ref()
        .all(|w| u128::from_ne_bytes(w.try_into().unwrap_or([1; 16])) == 0);
    wide && words.remainder().iter().all(|b| *b == 0)
}

/// Exports `view` to a new file `out` in `format` (see the module docs).
pub fn export_view(
    view: &SourceView,
    out: &Path,
    format: OutputFormat,
    progress: Progress<'_>,
    cancel: &AtomicBool,
) -> Result<CopyReport> {
    let size = view.size();
    if format == OutputFormat::Vhd && (size % 512 != 0 || size == 0) {
        return Err(Error::unsupported(format!(
            "a VHD's size must be a positive multiple of 512 bytes; this disk has {size}"
        )));
    }
    if format == OutputFormat::Vhd && size > snap_backend_vhd::format::footer::MAX_DISK_SIZE {
        return Err(Error::unsupported(
            "a VHD holds at most 2 TiB; export this disk as qcow2 or raw",
        ));
    }
    let (guard, file) = NewFile::create(out, 0o600)?;
    let _lock = ImageLock::acquire(&file, out, LockMode::Exclusive)?;
    let writeback = file
        .try_clone()
        .map_err(|e| Error::io("open the output", e).with_path(out))?;
    let io = FileIo::from_file(file, out);
    let sink: Box<dyn Sink> = match format {
        OutputFormat::Qcow2 => Box::new(Qcow2Sink(snap_backend_qcow2::SequentialWriter::new(
            io, size, 16,
        )?)),
        OutputFormat::Vhd => {
            let id = snap_backend_vhd::ops::new_unique_id()?;
            Box::new(VhdSink(snap_backend_vhd::writer::SequentialWriter::new(
                io,
                size,
                id,
                snap_backend_vhd::format::footer::vhd_time_now(),
            )?))
        }
        OutputFormat::Raw => Box::new(RawSink { io, size }),
    };
    let report =
        copy_view(view, sink, Some(&writeback), progress, cancel).map_err(|e| e.with_path(out))?;
    guard.keep();
    Ok(report)
}

/// The checksum of a view, reading it all (nothing written).
pub fn checksum_view(
    view: &SourceView,
    progress: Progress<'_>,
    cancel: &AtomicBool,
) -> Result<CopyReport> {
    copy_view(view, Box::new(NullSink), None, progress, cancel)
}

// ---------------------------------------------------------------------------------------------
// CLI plumbing

/// A progress bar on stderr when it is a terminal.
fn progress_bar(label: &str) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} {bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    bar.set_message(label.to_string());
    Some(bar)
}

/// Runs `work` on the blocking pool with a progress bar labelled `label`; Ctrl-C cancels it (the
/// work removes what it created and fails).
async fn with_progress<T: Send + 'static>(
    label: &str,
    work: impl FnOnce(Progress<'_>, &AtomicBool) -> Result<T> + Send + 'static,
) -> Result<T> {
    let cancel = Arc::new(AtomicBool::new(false));
    let bar = progress_bar(label);
    let worker_bar = bar.clone();
    let worker_cancel = cancel.clone();
    let mut task = tokio::task::spawn_blocking(move || {
        let mut show = |done: u64, total: u64| {
            if let Some(bar) = &worker_bar {
                bar.set_length(total);
                bar.set_position(done);
            }
        };
        work(&mut show, &worker_cancel)
    });
    let joined = tokio::select! {
        joined = &mut task => joined,
        _ = tokio::signal::ctrl_c() => {
            cancel.store(true, Ordering::Relaxed);
            task.await
        }
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let result = joined.map_err(|e| Error::new(ErrorKind::Io, format!("worker failed: {e}")))?;
    if cancel.load(Ordering::Relaxed) {
        return Err(Error::new(
            ErrorKind::Io,
            "interrupted (Ctrl-C); nothing was left behind",
        ));
    }
    result
}

/// Metadata an output of `data` bytes of a `size`-byte disk adds, at most (a generous bound).
fn metadata_bound(format: OutputFormat, size: u64, data: u64) -> u64 {
    match format {
        // L2 tables (8 bytes per 64 KiB) and their rounding, L1, refcounts, header.
        OutputFormat::Qcow2 => data / 8192 + size / (512 << 20) * 65536 + size / 8192 + (1 << 20),
        // BAT and a bitmap per 2 MiB block, footers and header.
        OutputFormat::Vhd => size / (512 << 10) + data / 4096 + 4096,
        OutputFormat::Raw => 0,
    }
}

/// Splits `disk export`'s positional arguments `IMAGE [NAME] OUT` (and `--layer`) into the
/// image, the view and the output. A name together with `--layer` is a usage error (exit 2).
pub fn parse_export_args(
    args: Vec<PathBuf>,
    layer: Option<PathBuf>,
) -> Result<(PathBuf, ViewSpec, PathBuf)> {
    let mut args = args.into_iter();
    let (image, name, out) = match (args.next(), args.next(), args.next(), args.next()) {
        (Some(image), Some(out), None, None) => (image, None, out),
        (Some(image), Some(name), Some(out), None) => (image, Some(name), out),
        _ => usage_error("disk export takes IMAGE [NAME] OUT"),
    };
    let view = match (name, layer) {
        (Some(_), Some(_)) => usage_error("NAME and --layer PATH exclude each other"),
        (Some(name), None) => {
            let name = name
                .into_os_string()
                .into_string()
                .map_err(|_| Error::invalid("the snapshot name is not UTF-8"))?;
            ViewSpec::Snapshot(name)
        }
        (None, Some(layer)) => ViewSpec::Layer(layer),
        (None, None) => ViewSpec::Current,
    };
    Ok((image, view, out))
}

/// Reports a usage error the way clap does (usage on stderr, exit 2).
fn usage_error(message: &str) -> ! {
    use clap::CommandFactory;
    let mut cmd = crate::cli::Cli::command();
    let err = cmd.error(clap::error::ErrorKind::WrongNumberOfValues, message);
    err.exit()
}

/// `snapctl disk export IMAGE [NAME] OUT [--layer PATH] [--format F] [--json]`.
pub async fn disk_export(
    image: PathBuf,
    view: ViewSpec,
    out: PathBuf,
    format: OutputFormat,
    json: bool,
    dry_run: bool,
) -> Result<u8> {
    refuse_existing(&out)?;
    let (image2, view2) = (image.clone(), view.clone());
    let source = if snap_backend_rbd::RbdSpec::looks_like(&image.to_string_lossy()) {
        SourceView::open_rbd(&image, &view).await?
    } else {
        tokio::task::spawn_blocking(move || SourceView::open(&image2, &view2))
            .await
            .map_err(|e| Error::new(ErrorKind::Io, format!("worker failed: {e}")))??
    };
    let what = view.describe(&image);
    if dry_run {
        let source = Arc::new(source);
        let s = source.clone();
        let allocated = tokio::task::spawn_blocking(move || s.allocated())
            .await
            .map_err(|e| Error::new(ErrorKind::Io, format!("worker failed: {e}")))??;
        let size = source.size();
        println!(
            "plan: export {what} to {} ({})",
            out.display(),
            format.as_str()
        );
        println!("  files created: {}", out.display());
        println!(
            "  bytes to copy: up to {} (allocated in the view; zero data is skipped) of a {} disk",
            crate::disk::human_size(allocated),
            crate::disk::human_size(size)
        );
        println!(
            "  space needed: up to {}",
            crate::disk::human_size(allocated + metadata_bound(format, size, allocated))
        );
        if source.lock_free {
            println!(
                "  read without the lock (another process holds the image; the view is frozen)"
            );
        }
        println!("nothing changed (--dry-run)");
        return Ok(0);
    }
    let started = Instant::now();
    let target = out.clone();
    let report = with_progress("export", move |progress, cancel| {
        export_view(&source, &target, format, progress, cancel)
    })
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    if json {
        println!(
            "{}",
            json!({
                "image": image,
                "view": view.json(),
                "output": out,
                "format": format.as_str(),
                "virtual_size": report.virtual_size,
                "data_bytes": report.data_bytes,
                "checksum": report.checksum,
                "checksum_algorithm": CHECKSUM_ALGORITHM,
                "seconds": seconds,
            })
        );
    } else {
        println!(
            "exported {what} to {} ({}): {} of data in a {} disk, {seconds:.2} s",
            out.display(),
            format.as_str(),
            crate::disk::human_size(report.data_bytes),
            crate::disk::human_size(report.virtual_size)
        );
        println!("checksum ({CHECKSUM_ALGORITHM}): {}", report.checksum);
    }
    Ok(0)
}

/// `snapctl disk export rbd:POOL/IMAGE [NAME] OUT --since SNAP`: the changes since snapshot SNAP
/// up to snapshot NAME (or the image now) as `rbd export-diff` writes them (rbd's diff format, to
/// be applied with `rbd import-diff` onto an image at SNAP): an incremental backup. OUT is created
/// new, 0600, flushed, and removed on any failure. RBD images only.
pub async fn disk_export_diff(
    image: PathBuf,
    view: ViewSpec,
    since: &str,
    out: PathBuf,
    json: bool,
    dry_run: bool,
) -> Result<u8> {
    if !snap_backend_rbd::RbdSpec::looks_like(&image.to_string_lossy()) {
        return Err(Error::unsupported(
            "--since (an incremental export in rbd's diff format) is for RBD images \
             (rbd:POOL/IMAGE) only",
        )
        .with_path(&image));
    }
    refuse_existing(&out)?;
    snap_backend_rbd::validate_snapshot_name(since)?;
    let backend = snap_backend_rbd::RbdBackend::new(&image)?;
    let snapshot = match &view {
        ViewSpec::Snapshot(name) => {
            snap_backend_rbd::validate_snapshot_name(name)?;
            Some(name.as_str())
        }
        _ => None,
    };
    let args = backend.export_diff_args(since, snapshot).await?;
    if snapshot.is_none() && !backend.watchers().await?.is_empty() {
        return Err(Error::new(
            ErrorKind::InUse,
            format!(
                "{} is open by a client (a running QEMU?), so its current data changes while it \
                 is read; take a snapshot and export the changes up to it (IMAGE NAME OUT --since \
                 SNAP), or stop the guest",
                backend.spec()
            ),
        )
        .with_path(&image));
    }
    let what = match snapshot {
        Some(name) => format!(
            "the changes of {image} from {since:?} to {name:?}",
            image = image.display()
        ),
        None => format!("the changes of {} since {since:?}", image.display()),
    };
    if dry_run {
        println!("plan: export {what} to {} (rbd diff)", out.display());
        println!("  files created: {}", out.display());
        println!("  command: rbd {}", args.join(" "));
        println!("nothing changed (--dry-run)");
        return Ok(0);
    }
    let started = Instant::now();
    let (guard, file) = NewFile::create(&out, 0o600)?;
    let sync = file
        .try_clone()
        .map_err(|e| Error::io("open the output", e).with_path(&out))?;
    let mut cmd = backend.rbd().command(&args);
    cmd.stdout(file);
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    // Not `output()`: it would pipe stdout instead of writing the file.
    let child = cmd
        .spawn()
        .map_err(|e| Error::io("run rbd export-diff", e).with_path(&image))?;
    let output = tokio::select! {
        output = child.wait_with_output() => output,
        _ = tokio::signal::ctrl_c() => {
            return Err(Error::new(ErrorKind::Io, "interrupted (Ctrl-C); nothing was left behind"));
        }
    };
    backend
        .rbd()
        .interpret("export-diff", &args, output)
        .map_err(|e| e.with_path(&image))?;
    sync.sync_all()
        .map_err(|e| Error::io("flush the output", e).with_path(&out))?;
    let bytes = sync
        .metadata()
        .map_err(|e| Error::io("stat the output", e).with_path(&out))?
        .len();
    guard.keep();
    let seconds = started.elapsed().as_secs_f64();
    if json {
        println!(
            "{}",
            json!({
                "image": image,
                "view": view.json(),
                "since": since,
                "output": out,
                "format": "rbd-diff",
                "bytes": bytes,
                "seconds": seconds,
            })
        );
    } else {
        println!(
            "exported {what} to {} (rbd diff, {}), {seconds:.2} s; apply with `rbd import-diff`",
            out.display(),
            crate::disk::human_size(bytes)
        );
    }
    Ok(0)
}

// ---------------------------------------------------------------------------------------------
// Domain export

/// One disk in an export folder's manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportedDisk {
    /// The guest device.
    pub vdev: String,
    /// The file in the folder (`VDEV.qcow2`).
    pub file: String,
    /// Always `qcow2`.
    pub format: String,
    /// Guest size.
    pub virtual_size: u64,
    /// Non-zero data bytes written.
    pub data_bytes: u64,
    /// The guest view's checksum (see the module docs).
    pub checksum: String,
    /// Where it came from: the snapshot's disk record.
    pub source: SnapshotDisk,
}

/// The memory image in an export folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportedMemory {
    /// The image (`memory.mem`).
    pub file: String,
    /// Its description (`memory.mem.json`).
    pub info: String,
    /// Its size in bytes (apparent; the file is sparse).
    pub size: u64,
}

/// `snapshot.json` of an export folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`EXPORT_FORMAT_VERSION`].
    pub format_version: u32,
    /// When the export was made.
    pub exported: String,
    /// The domain it came from.
    pub domain: String,
    /// Its hypervisor.
    pub hypervisor: String,
    /// The snapshot's record as the domain had it.
    pub snapshot: SnapshotRecord,
    /// The exported disks.
    pub disks: Vec<ExportedDisk>,
    /// The memory image, if the snapshot has one.
    pub memory: Option<ExportedMemory>,
    /// The config file (`domain.cfg`).
    pub config: String,
    /// [`CHECKSUM_ALGORITHM`].
    pub checksum_algorithm: String,
}

/// The exported file of disk `vdev`.
fn disk_file(vdev: &str) -> String {
    format!("{vdev}.qcow2")
}

const MEMORY_FILE: &str = "memory.mem";
const CONFIG_FILE: &str = "domain.cfg";

/// The view of a snapshot's disk, and the image to open it on.
fn snapshot_view(d: &SnapshotDisk, snap: &str) -> Result<(PathBuf, ViewSpec)> {
    let backend = Backend::parse(&d.backend)?;
    match (backend, d.kind) {
        (Backend::Qcow2, DiskKind::Internal) => Ok((
            d.path.clone(),
            ViewSpec::Snapshot(d.snapshot.clone().unwrap_or_else(|| snap.to_string())),
        )),
        (Backend::Qcow2 | Backend::Vhd, DiskKind::External) => {
            Ok((d.path.clone(), ViewSpec::Current))
        }
        (other, kind) => Err(Error::unsupported(format!(
            "disk {}: exporting a {} {} snapshot is not supported (qcow2 internal or external, \
             and VHD layers are)",
            d.vdev,
            other.as_str(),
            kind.as_str()
        ))),
    }
}

/// Checks that `dir` is absent or an empty folder; returns whether it exists.
fn check_export_dir(dir: &Path) -> Result<bool> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io("inspect", e).with_path(dir)),
        Ok(meta) if !meta.is_dir() => {
            Err(Error::new(ErrorKind::Exists, "exists and is not a folder").with_path(dir))
        }
        Ok(_) => {
            let mut entries =
                std::fs::read_dir(dir).map_err(|e| Error::io("read", e).with_path(dir))?;
            if entries.next().is_some() {
                return Err(Error::new(
                    ErrorKind::Exists,
                    "the export folder is not empty; snapctl never overwrites anything there",
                )
                .with_path(dir));
            }
            Ok(true)
        }
    }
}

/// Copies a (sparse) file: data ranges only (SEEK_DATA / SEEK_HOLE), in the kernel when it can.
fn sparse_copy(src: &Path, dst: &Path, mode: u32) -> Result<NewFile> {
    use nix::unistd::{Whence, lseek};
    use std::os::fd::AsRawFd;
    let from = File::open(src).map_err(|e| Error::io("open", e).with_path(src))?;
    let len = from
        .metadata()
        .map_err(|e| Error::io("stat", e).with_path(src))?
        .len();
    let (guard, to) = NewFile::create(dst, mode)?;
    let mut at = 0u64;
    let fd = from.as_raw_fd();
    let src_io = FileIo::from_file(
        from.try_clone()
            .map_err(|e| Error::io("open", e).with_path(src))?,
        src,
    );
    let dst_io = FileIo::from_file(
        to.try_clone()
            .map_err(|e| Error::io("open", e).with_path(dst))?,
        dst,
    );
    while at < len {
        let offset = i64::try_from(at).map_err(|_| Error::invalid("offset too large"))?;
        #[allow(deprecated)]
        let data = match lseek(fd, offset, Whence::SeekData) {
            Ok(d) => u64::try_from(d).unwrap_or(len),
            Err(nix::errno::Errno::ENXIO) => break,
            Err(_) => at,
        };
        #[allow(deprecated)]
        let hole = match lseek(
            fd,
            i64::try_from(data).unwrap_or(i64::MAX),
            Whence::SeekHole,
        ) {
            Ok(h) => u64::try_from(h).unwrap_or(len).min(len),
            Err(_) => len,
        };
        if hole <= data {
            break;
        }
        if !snap_core::io::copy_range(&from, data, &to, data, hole - data)? {
            let mut buf = vec![0u8; (1 << 20).min(hole - data) as usize];
            let mut pos = data;
            while pos < hole {
                let n = buf.len().min((hole - pos) as usize);
                let part = buf.get_mut(..n).unwrap_or_default();
                src_io.read_zero_fill(part, pos)?;
                dst_io.write_all_at(part, pos)?;
                pos += n as u64;
            }
        }
        at = hole;
    }
    dst_io.set_len(len)?;
    dst_io.flush()?;
    Ok(guard)
}

/// Reads a small file whole (at most 16 MiB).
fn read_small(path: &Path) -> Result<Vec<u8>> {
    let file = File::open(path).map_err(|e| Error::io("open", e).with_path(path))?;
    let mut bytes = Vec::new();
    file.take(MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io("read", e).with_path(path))?;
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(Error::corrupt("file is larger than 16 MiB").with_path(path));
    }
    Ok(bytes)
}

/// Writes `bytes` to a new file `path` (synced).
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<NewFile> {
    let (guard, file) = NewFile::create(path, mode)?;
    let io = FileIo::from_file(file, path);
    io.write_all_at(bytes, 0)?;
    io.flush()?;
    Ok(guard)
}

/// `snapctl snapshot export DOMAIN NAME DIR`.
pub async fn snapshot_export(
    ctx: &Ctx,
    domain: &str,
    name: &str,
    dir: &Path,
    json: bool,
) -> Result<u8> {
    let (lock, rec) = exec::open_domain(ctx, domain).await?;
    let snap = rec.get(name)?.clone();
    let dir_exists = check_export_dir(dir)?;
    // Every disk's view is opened before anything is written: a refusal writes nothing.
    let mut views = Vec::new();
    for d in &snap.disks {
        let (image, view) = snapshot_view(d, name)?;
        let spec = view.clone();
        let source = tokio::task::spawn_blocking(move || SourceView::open(&image, &spec))
            .await
            .map_err(|e| Error::new(ErrorKind::Io, format!("worker failed: {e}")))?
            .map_err(|e| e.context(format!("disk {}", d.vdev)))?;
        views.push((d.clone(), source));
    }
    let memory = match &snap.memory {
        Some(m) => {
            let info = crate::qemu::memory_info_path(m);
            let size = std::fs::metadata(m)
                .map_err(|e| Error::io("snapshot memory image", e).with_path(m))?
                .len();
            if !info.exists() {
                return Err(
                    Error::not_found("the memory image's description is missing").with_path(&info),
                );
            }
            Some((m.clone(), info, size))
        }
        None => None,
    };
    if ctx.dry_run {
        println!(
            "plan: snapshot export {domain} {name} into {}",
            dir.display()
        );
        let mut total = 0u64;
        for (d, source) in views {
            let source = Arc::new(source);
            let s = source.clone();
            let allocated = tokio::task::spawn_blocking(move || s.allocated())
                .await
                .map_err(|e| Error::new(ErrorKind::Io, format!("worker failed: {e}")))??;
            let bound = allocated + metadata_bound(OutputFormat::Qcow2, source.size(), allocated);
            total += bound;
            println!(
                "  create {}: disk {} ({} {}), up to {} of data in a {} disk",
                dir.join(disk_file(&d.vdev)).display(),
                d.vdev,
                d.backend,
                d.kind.as_str(),
                crate::disk::human_size(allocated),
                crate::disk::human_size(source.size())
            );
        }
        if let Some((m, _, size)) = &memory {
            total += size;
            println!(
                "  create {} and {}.json: copy of the memory image {} ({}, sparse)",
                dir.join(MEMORY_FILE).display(),
                MEMORY_FILE,
                m.display(),
                crate::disk::human_size(*size)
            );
        }
        println!(
            "  create {} (xl.cfg, disks on the exported files) and {}",
            dir.join(CONFIG_FILE).display(),
            MANIFEST
        );
        println!(
            "  bytes to copy: up to {}; space needed: up to {}",
            crate::disk::human_size(total),
            crate::disk::human_size(total)
        );
        println!("nothing changed (--dry-run)");
        return Ok(0);
    }

    if !dir_exists {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(|e| Error::io("create the export folder", e).with_path(dir))?;
    }
    let outcome = export_into(domain, &rec, &snap, dir, views, memory).await;
    match outcome {
        Ok(manifest) => {
            let _ = crate::store::sync_dir(dir);
            drop(lock);
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&manifest)
                        .map_err(|e| Error::invalid(format!("encode: {e}")))?
                );
            } else {
                println!(
                    "exported snapshot {name} of domain {domain} into {}",
                    dir.display()
                );
                for d in &manifest.disks {
                    println!(
                        "  {}: {} ({} of data in a {} disk), checksum {}",
                        d.vdev,
                        d.file,
                        crate::disk::human_size(d.data_bytes),
                        crate::disk::human_size(d.virtual_size),
                        d.checksum
                    );
                }
                if let Some(m) = &manifest.memory {
                    println!("  memory: {} ({})", m.file, crate::disk::human_size(m.size));
                }
                println!("  config: {CONFIG_FILE}; record: {MANIFEST}");
            }
            Ok(0)
        }
        Err(e) => {
            if !dir_exists {
                let _ = std::fs::remove_dir(dir);
            }
            Err(e)
        }
    }
}

/// Writes the export folder; every file it made is removed again on an error.
async fn export_into(
    domain: &str,
    rec: &DomainRecord,
    snap: &SnapshotRecord,
    dir: &Path,
    views: Vec<(SnapshotDisk, SourceView)>,
    memory: Option<(PathBuf, PathBuf, u64)>,
) -> Result<Manifest> {
    let mut made: Vec<NewFile> = Vec::new();
    let mut disks = Vec::new();
    for (d, source) in views {
        let file = disk_file(&d.vdev);
        let out = dir.join(&file);
        let label = format!("export {}", d.vdev);
        let target = out.clone();
        let report = with_progress(&label, move |progress, cancel| {
            export_view(&source, &target, OutputFormat::Qcow2, progress, cancel)
        })
        .await
        .map_err(|e| e.context(format!("disk {}", d.vdev)))?;
        made.push(NewFile {
            path: out,
            keep: false,
        });
        disks.push(ExportedDisk {
            vdev: d.vdev.clone(),
            file,
            format: "qcow2".into(),
            virtual_size: report.virtual_size,
            data_bytes: report.data_bytes,
            checksum: report.checksum,
            source: d,
        });
    }
    let mut exported_memory = None;
    if let Some((m, info, size)) = memory {
        let dst = dir.join(MEMORY_FILE);
        let dst_info = crate::qemu::memory_info_path(&dst);
        let copied = tokio::task::spawn_blocking(move || -> Result<Vec<NewFile>> {
            let a = sparse_copy(&m, &dst, 0o600)?;
            let b = sparse_copy(&info, &dst_info, 0o600)?;
            Ok(vec![a, b])
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Io, format!("worker failed: {e}")))??;
        made.extend(copied);
        exported_memory = Some(ExportedMemory {
            file: MEMORY_FILE.into(),
            info: format!("{MEMORY_FILE}.json"),
            size,
        });
    }
    // The snapshot's config, its disks on the exported files.
    let mut config = snap.config.clone();
    for d in &disks {
        if let Some(spec) = config.disks.iter_mut().find(|s| s.vdev == d.vdev) {
            spec.target = dir.join(&d.file).to_string_lossy().into_owned();
            spec.format = XlFormat::Qcow2;
            spec.spec = spec.to_spec();
        }
    }
    made.push(write_new(
        &dir.join(CONFIG_FILE),
        config.to_xl().as_bytes(),
        0o644,
    )?);
    let manifest = Manifest {
        format_version: EXPORT_FORMAT_VERSION,
        exported: store::timestamp_now(),
        domain: domain.to_string(),
        hypervisor: rec.hypervisor.clone(),
        snapshot: snap.clone(),
        disks,
        memory: exported_memory,
        config: CONFIG_FILE.into(),
        checksum_algorithm: CHECKSUM_ALGORITHM.into(),
    };
    let mut bytes = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| Error::invalid(format!("encode {MANIFEST}: {e}")))?;
    bytes.push(b'\n');
    made.push(write_new(&dir.join(MANIFEST), &bytes, 0o644)?);
    for file in made {
        file.keep();
    }
    Ok(manifest)
}

// ---------------------------------------------------------------------------------------------
// Import

/// Reads and checks an export folder's manifest.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let bytes = read_small(&path)?;
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::corrupt(format!("cannot parse: {e}")).with_path(&path))?;
    let version = value
        .get("format_version")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| Error::corrupt("no format_version").with_path(&path))?;
    if version != u64::from(EXPORT_FORMAT_VERSION) {
        return Err(Error::unsupported(format!(
            "export format version {version} is not supported (this snapctl reads version \
             {EXPORT_FORMAT_VERSION})"
        ))
        .with_path(&path));
    }
    let manifest: Manifest = serde_json::from_value(value)
        .map_err(|e| Error::corrupt(format!("cannot parse: {e}")).with_path(&path))?;
    store::validate_name("snapshot", &manifest.snapshot.name)?;
    for d in &manifest.disks {
        let plain = Path::new(&d.file)
            .file_name()
            .is_some_and(|f| f == std::ffi::OsStr::new(&d.file));
        if !plain || d.file.starts_with('.') || d.format != "qcow2" {
            return Err(Error::corrupt(format!(
                "disk {}: {:?} is not a qcow2 file of the export folder",
                d.vdev, d.file
            ))
            .with_path(&path));
        }
    }
    if let Some(m) = &manifest.memory
        && (m.file != MEMORY_FILE || m.info != format!("{MEMORY_FILE}.json"))
    {
        return Err(Error::corrupt("unexpected memory image names").with_path(&path));
    }
    Ok(manifest)
}

/// `snapctl snapshot import DIR [NEW]`.
pub async fn snapshot_import(ctx: &Ctx, dir: &Path, new: Option<&str>, json: bool) -> Result<u8> {
    let dir = std::fs::canonicalize(dir).map_err(|e| Error::io("open", e).with_path(dir))?;
    let manifest = read_manifest(&dir)?;
    let name = new.unwrap_or(&manifest.domain).to_string();
    store::validate_name("domain", &name)?;
    if ctx.store.read(&name)?.is_some() {
        return Err(Error::new(
            ErrorKind::Exists,
            format!("a domain named {name} is already defined"),
        ));
    }
    let snap_name = manifest.snapshot.name.clone();
    let mut config = xlcfg::parse_file(&dir.join(&manifest.config))?;
    config.name = name.clone();
    // Every exported disk: present, standalone qcow2 of the recorded size.
    let mut taken: Vec<PathBuf> = Vec::new();
    let mut plan: Vec<(ExportedDisk, PathBuf, PathBuf)> = Vec::new();
    for d in &manifest.disks {
        let layer = dir.join(&d.file);
        let listing = snap_backend_qcow2::list_path(&layer)
            .map_err(|e| e.context(format!("disk {}", d.vdev)))?;
        if !listing.chain.is_empty() || listing.virtual_size != d.virtual_size {
            return Err(Error::corrupt(format!(
                "disk {}: not the standalone image of {} bytes the export recorded",
                d.vdev, d.virtual_size
            ))
            .with_path(&layer));
        }
        if config.disk(&d.vdev).is_none() {
            return Err(Error::corrupt(format!(
                "disk {} is not in {}",
                d.vdev, manifest.config
            )));
        }
        let overlay = layers::fresh_overlay(&layer, &d.vdev, &name, &taken);
        taken.push(overlay.clone());
        plan.push((d.clone(), layer, overlay));
    }
    let memory = match &manifest.memory {
        Some(m) => {
            let path = dir.join(&m.file);
            let info = dir.join(&m.info);
            if !path.is_file() || !info.is_file() {
                return Err(
                    Error::not_found("the memory image or its description is missing")
                        .with_path(&path),
                );
            }
            Some(path)
        }
        None => None,
    };
    if ctx.dry_run {
        println!(
            "plan: import {} as domain {name} ({} driver), shut off, with snapshot {snap_name}",
            dir.display(),
            ctx.default_hypervisor()
        );
        let mut bytes = 0;
        for (d, layer, overlay) in &plan {
            bytes += d.virtual_size;
            println!(
                "  verify {} ({} disk): read its guest view and compare its checksum",
                layer.display(),
                crate::disk::human_size(d.virtual_size)
            );
            println!(
                "  create {}: an empty overlay on {} (disk {})",
                overlay.display(),
                layer.display(),
                d.vdev
            );
        }
        if let Some(m) = &memory {
            println!("  memory image: {}", m.display());
        }
        println!(
            "  bytes to read: {}; space needed: up to {} (overlay metadata)",
            crate::disk::human_size(bytes),
            crate::disk::human_size(plan.len() as u64 * (1 << 20))
        );
        println!("nothing changed (--dry-run)");
        return Ok(0);
    }
    // Verify every disk against its checksum before anything is created.
    for (d, layer, _) in &plan {
        let layer2 = layer.clone();
        let label = format!("verify {}", d.vdev);
        let report = with_progress(&label, move |progress, cancel| {
            let view = SourceView::open(&layer2, &ViewSpec::Current)?;
            checksum_view(&view, progress, cancel)
        })
        .await?;
        if report.checksum != d.checksum {
            return Err(Error::corrupt(format!(
                "disk {}: checksum {} does not match the exported {}; the file changed or is \
                 damaged",
                d.vdev, report.checksum, d.checksum
            ))
            .with_path(layer));
        }
    }
    let lock = ctx.lock(&name)?;
    if lock.load()?.is_some() {
        return Err(Error::new(
            ErrorKind::Exists,
            format!("a domain named {name} is already defined"),
        ));
    }
    let mut made: Vec<NewFile> = Vec::new();
    let result = async {
        for (d, layer, overlay) in &plan {
            layers::create_overlay(Backend::Qcow2, layer, &snap_name, overlay)
                .await
                .map_err(|e| e.context(format!("disk {}", d.vdev)))?;
            made.push(NewFile {
                path: overlay.clone(),
                keep: false,
            });
        }
        let mut snap_config = config.clone();
        let mut active = config.clone();
        let mut disks = Vec::new();
        for (d, layer, overlay) in &plan {
            for (cfg, target) in [(&mut snap_config, layer), (&mut active, overlay)] {
                if let Some(spec) = cfg.disks.iter_mut().find(|s| s.vdev == d.vdev) {
                    spec.target = target.to_string_lossy().into_owned();
                    spec.format = XlFormat::Qcow2;
                    spec.spec = spec.to_spec();
                }
            }
            disks.push(SnapshotDisk {
                vdev: d.vdev.clone(),
                backend: "qcow2".into(),
                kind: DiskKind::External,
                path: layer.clone(),
                snapshot: None,
            });
        }
        let mut snapshot = manifest.snapshot.clone();
        snapshot.parent = None;
        snapshot.memory = memory.clone();
        snapshot.config = snap_config;
        snapshot.disks = disks;
        let mut rec = DomainRecord::new(&name, ctx.default_hypervisor(), active, None);
        rec.add_snapshot(snapshot)?;
        rec.current = Some(snap_name.clone());
        lock.save(&rec)?;
        Ok::<DomainRecord, Error>(rec)
    }
    .await;
    let rec = match result {
        Ok(rec) => rec,
        Err(e) => {
            drop(made);
            return Err(e);
        }
    };
    for file in made {
        file.keep();
    }
    if json {
        println!("{}", store::list_json(&rec));
    } else {
        println!(
            "imported {} as domain {name} (shut off) with snapshot {snap_name}; start it with \
             `snapctl snapshot revert {name} {snap_name}`",
            dir.display()
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 65536]));
        let mut v = vec![0u8; 65536 + 7];
        assert!(is_zero(&v));
        *v.last_mut().unwrap() = 1;
        assert!(!is_zero(&v));
        v[65536 + 6] = 0;
        v[3] = 9;
        assert!(!is_zero(&v));
    }

    #[test]
    fn zero_digests_match_hashing_zeroes() {
        for len in [0u64, 1, 512, 65536, 65537, CHUNK] {
            let direct: [u8; 32] = *blake3::hash(&vec![0u8; len as usize]).as_bytes();
            assert_eq!(zero_digest(len), direct, "{len}");
        }
    }

    #[test]
    fn export_dir_must_be_absent_or_empty() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(!check_export_dir(&tmp.path().join("new")).unwrap());
        assert!(check_export_dir(tmp.path()).unwrap());
        std::fs::write(tmp.path().join("x"), b"1").unwrap();
        assert_eq!(
            check_export_dir(tmp.path()).unwrap_err().kind(),
            ErrorKind::Exists
        );
        assert_eq!(
            check_export_dir(&tmp.path().join("x")).unwrap_err().kind(),
            ErrorKind::Exists
        );
    }

    #[test]
    fn new_files_go_unless_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        let (guard, _file) = NewFile::create(&a, 0o600).unwrap();
        assert!(a.exists());
        assert_eq!(
            NewFile::create(&a, 0o600).err().map(|e| e.kind()),
            Some(ErrorKind::Exists)
        );
        drop(guard);
        assert!(!a.exists());
        let (guard, _file) = NewFile::create(&a, 0o600).unwrap();
        guard.keep();
        assert!(a.exists());
    }

    #[test]
    fn sparse_copies_keep_holes() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        let f = File::create(&src).unwrap();
        let io = FileIo::from_file(f, &src);
        io.write_all_at(b"hello", 4096).unwrap();
        io.write_all_at(&[7u8; 8192], 8 << 20).unwrap();
        io.set_len(64 << 20).unwrap();
        let dst = tmp.path().join("dst");
        sparse_copy(&src, &dst, 0o600).unwrap().keep();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&dst).unwrap().blocks();
        assert!(
            blocks * 512 < 4 << 20,
            "copy is not sparse: {blocks} blocks"
        );
        assert!(sparse_copy(&src, &dst, 0o600).is_err());
    }

    #[test]
    fn manifests_refuse_paths_and_versions() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(MANIFEST), br#"{"format_version": 99}"#).unwrap();
        assert_eq!(
            read_manifest(tmp.path()).unwrap_err().kind(),
            ErrorKind::Unsupported
        );
        std::fs::write(tmp.path().join(MANIFEST), b"not json").unwrap();
        assert_eq!(
            read_manifest(tmp.path()).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
    }
}
