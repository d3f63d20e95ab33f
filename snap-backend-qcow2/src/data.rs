//! Guest data: reads through the backing chain, writes with copy-on-write.
//!
//! A write never changes a cluster another table may see: every written guest cluster gets a new
//! host cluster holding its whole new content, and every L2 table on the way is replaced by a new
//! one, inside one metadata transaction (see [`crate::txn`]). So data a snapshot references is
//! never overwritten, a crash leaves the old or the new guest view, and a refused write (refcount
//! overflow: a shared L2 table's entries gain a reference when the table is copied) writes
//! nothing. Clusters whose refcount is 1 are marked COPIED, as QEMU expects.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::Path;

use snap_core::io::FileIo;
use snap_core::{BlockIo, DiskFormat, Error, Result};

use crate::chain::{MAX_CHAIN_DEPTH, probe_format, resolve_backing};
use crate::format::header::{COMPRESSION_ZSTD, Header};
use crate::format::table::{COPIED, L1Entry, L2Entry, Mapping};
use crate::image::Qcow2;
use crate::internal::{Staged, collect_referenced};

/// Where the new content of a guest cluster comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClusterSource {
    /// These bytes (one cluster).
    Bytes(Vec<u8>),
    /// Zeroes (a zero cluster where the version has the flag).
    Zero,
    /// One cluster of the copy source file at this offset (copied in the kernel when possible).
    Copy(u64),
}

/// Clusters written per metadata transaction by [`Qcow2Disk::write`].
const WRITE_BATCH_CLUSTERS: usize = 256;

/// A run of a guest view: whether some layer holds data for it, and how long it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// `true` when a layer holds data for the run (it may still be zeroes); `false` when the
    /// run reads as zeroes without any layer holding data (unallocated through the whole chain,
    /// zero clusters, or past a layer's end).
    pub data: bool,
    /// Length in bytes (at least 1 when asked about a non-empty range).
    pub len: u64,
}

/// Read access to a disk's guest view.
pub trait GuestRead: Send + Sync + fmt::Debug {
    /// The guest-visible size in bytes.
    fn guest_size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset`; bytes past the guest size read as zeroes.
    fn read_guest(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// How the guest range `offset..offset + len` begins (like QEMU's block status): the first
    /// run, at most `len` bytes long. The default says "data" for the whole range, which is
    /// always correct (only less sparse).
    fn extent(&self, offset: u64, len: u64) -> Result<Extent> {
        let _ = offset;
        Ok(Extent { data: true, len })
    }
}

/// A raw file used as a backing layer.
#[derive(Debug)]
pub struct RawLayer {
    io: FileIo,
    size: u64,
}

impl RawLayer {
    /// Opens a raw layer read-only.
    pub fn open(path: &Path) -> Result<Self> {
        let io = FileIo::open(path, false)?;
        let size = io.len()?;
        Ok(RawLayer { io, size })
    }
}

impl GuestRead for RawLayer {
    fn guest_size(&self) -> u64 {
        self.size
    }
    fn read_guest(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.io.read_zero_fill(buf, offset)
    }
}

/// A qcow2 image with its backing chain opened: the guest's view of the disk.
pub struct Qcow2Disk<IO> {
    /// The image.
    pub image: Qcow2<IO>,
    backing: Option<Box<dyn GuestRead>>,
}

impl<IO> fmt::Debug for Qcow2Disk<IO> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qcow2Disk")
            .field("backing", &self.backing)
            .finish_non_exhaustive()
    }
}

impl Qcow2Disk<FileIo> {
    /// Opens the qcow2 image at `path` and its backing chain (read-only layers), as the image
    /// records them: explicit backing formats are trusted, others probed; protocols, `json:`
    /// names, loops and chains deeper than 64 are refused.
    pub fn open_path(path: &Path, writable: bool) -> Result<Self> {
        let io = FileIo::open(path, writable)?;
        let image = Qcow2::open(io, writable).map_err(|e| e.with_path(path))?;
        let backing = open_backing(path, &image, 0)?;
        Ok(Qcow2Disk { image, backing })
    }

    /// Opens a read-only guest view of the image at `path`: its current view, or with
    /// `snapshot` (a name, or an id when no name matches) the view of that internal snapshot —
    /// its own L1 table and virtual size, reading unallocated clusters through the image's
    /// backing chain as QEMU does. No lock is taken (the caller decides: see
    /// [`snap_core::lock`]); a snapshot's clusters never change while it exists, so its view
    /// can be read while another process (a running QEMU) writes the image.
    pub fn open_view(path: &Path, snapshot: Option<&str>) -> Result<Self> {
        let io = FileIo::open(path, false)?;
        let mut image = Qcow2::open(io, false).map_err(|e| e.with_path(path))?;
        if let Some(name) = snapshot {
            image = image
                .into_snapshot_view(name)
                .map_err(|e| e.with_path(path))?;
        }
        let backing = open_backing(path, &image, 0)?;
        Ok(Qcow2Disk { image, backing })
    }
}

impl<IO: BlockIo> Qcow2<IO> {
    /// Turns a read-only image into the guest view of its internal snapshot `name_or_id` (a
    /// name, or an id when no name matches): the snapshot's L1 table becomes the one reads go
    /// through, and the virtual size is the snapshot's (when recorded; the image's otherwise).
    /// Refused for an image opened writable: writes must never go through a snapshot's table.
    pub fn into_snapshot_view(mut self, name_or_id: &str) -> Result<Self> {
        if self.writable {
            return Err(Error::invalid(
                "a snapshot's view can only be read: open the image read-only",
            ));
        }
        let index = self.find_snapshot(name_or_id)?;
        let Some(sn) = self.snapshots.get(index).cloned() else {
            return Err(Error::not_found(format!(
                "no snapshot named {name_or_id:?}"
            )));
        };
        let size = sn.disk_size().unwrap_or(self.hc.header.size);
        if size > crate::image::MAX_VIRTUAL_SIZE {
            return Err(Error::corrupt(format!(
                "snapshot {:?} records an implausible disk size {size}",
                sn.name
            )));
        }
        let l1 = self
            .read_l1(sn.l1_table_offset, sn.l1_size)
            .map_err(|e| e.context(format!("L1 table of snapshot {:?}", sn.name)))?;
        self.l1 = l1;
        self.hc.header.size = size;
        Ok(self)
    }
}

/// Opens the backing chain of `image` (found at `path`) for reading.
pub(crate) fn open_backing_of<IO: BlockIo>(
    path: &Path,
    image: &Qcow2<IO>,
) -> Result<Option<Box<dyn GuestRead>>> {
    open_backing(path, image, 0)
}

fn open_backing<IO: BlockIo>(
    path: &Path,
    image: &Qcow2<IO>,
    depth: usize,
) -> Result<Option<Box<dyn GuestRead>>> {
    let Some(name) = image.header_cluster().backing_file_name() else {
        return Ok(None);
    };
    if depth >= MAX_CHAIN_DEPTH {
        return Err(Error::unsupported(format!(
            "backing chain is deeper than {MAX_CHAIN_DEPTH} layers"
        ))
        .with_path(path));
    }
    let backing_path = resolve_backing(path, &name).map_err(|e| e.with_path(path))?;
    if std::fs::canonicalize(&backing_path).ok() == std::fs::canonicalize(path).ok() {
        return Err(Error::corrupt("image is its own backing file").with_path(path));
    }
    let io = FileIo::open(&backing_path, false)?;
    let format = match image.header_cluster().backing_format() {
        Some(f) => DiskFormat::parse(&f)?,
        None => probe_format(&io)?,
    };
    match format {
        DiskFormat::Raw => Ok(Some(Box::new(RawLayer::open(&backing_path)?))),
        DiskFormat::Qcow2 => {
            let layer = Qcow2::open(io, false).map_err(|e| e.with_path(&backing_path))?;
            let below = open_backing(&backing_path, &layer, depth + 1)?;
            Ok(Some(Box::new(Qcow2Disk {
                image: layer,
                backing: below,
            })))
        }
        other => Err(
            Error::unsupported(format!("{other} backing files are not supported yet"))
                .with_path(path),
        ),
    }
}

impl<IO: BlockIo> Qcow2Disk<IO> {
    /// Wraps an open image with an optional backing layer.
    pub fn new(image: Qcow2<IO>, backing: Option<Box<dyn GuestRead>>) -> Self {
        Qcow2Disk { image, backing }
    }

    fn check_data_access(&self) -> Result<()> {
        let h: &Header = self.image.header();
        if h.crypt_method != 0 {
            return Err(Error::unsupported(
                "guest data of encrypted images cannot be read or written",
            ));
        }
        Ok(())
    }

    /// The L2 entry mapping the guest cluster at `guest` (cluster aligned).
    fn entry_for(&self, guest: u64) -> Result<L2Entry> {
        let h = self.image.header();
        let l1_index = (guest / h.l1_entry_span()) as usize;
        let l2_index = (guest % h.l1_entry_span()) >> h.cluster_bits;
        let Some(l1) = self.image.l1.get(l1_index) else {
            return Ok(L2Entry { raw: 0, bitmap: 0 });
        };
        if l1.l2_offset() == 0 {
            return Ok(L2Entry { raw: 0, bitmap: 0 });
        }
        let size = h.l2_entry_size();
        let mut bytes = [0u8; 16];
        let slice = bytes.get_mut(..size as usize).unwrap_or_default();
        self.image
            .io
            .read_exact_at(slice, l1.l2_offset() + l2_index * size)?;
        let raw = crate::format::be64(slice, 0).unwrap_or(0);
        let bitmap = if size == 16 {
            crate::format::be64(slice, 8).unwrap_or(0)
        } else {
            0
        };
        Ok(L2Entry { raw, bitmap })
    }

    /// The L2 entries of up to `max` guest clusters from the cluster at `guest` (cluster
    /// aligned), all inside one L2 table: one read for the lot. At least one entry when `max`
    /// is not 0; unallocated entries where the L1 table has no L2 table.
    fn entries_from(&self, guest: u64, max: u64) -> Result<Vec<L2Entry>> {
        let h = self.image.header();
        let span = h.l1_entry_span();
        let l1_index = (guest / span) as usize;
        let first = (guest % span) >> h.cluster_bits;
        let count = max.min(h.l2_entries() - first).max(1);
        let none = L2Entry { raw: 0, bitmap: 0 };
        let l2 = self
            .image
            .l1
            .get(l1_index)
            .map(|e| e.l2_offset())
            .unwrap_or(0);
        if l2 == 0 {
            return Ok(vec![none; count as usize]);
        }
        let geom = self.image.l2_geometry();
        let size = geom.entry_size() as u64;
        let mut bytes = vec![0u8; (count * size) as usize];
        self.image.io.read_exact_at(&mut bytes, l2 + first * size)?;
        Ok((0..count as usize)
            .map(|i| geom.entry(&bytes, i).unwrap_or(none))
            .collect())
    }

    fn read_backing(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match &self.backing {
            Some(b) => b.read_guest(offset, buf),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Reads within one guest cluster.
    fn read_in_cluster(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let cs = self.image.cluster_size();
        let cluster = offset & !(cs - 1);
        let within = offset - cluster;
        let geom = self.image.l2_geometry();
        let entry = self.entry_for(cluster)?;
        match geom.mapping(entry)? {
            Mapping::Unallocated => self.read_backing(offset, buf),
            Mapping::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            Mapping::Normal { host } => self.image.io.read_zero_fill(buf, host + within),
            Mapping::Compressed {
                offset: coff,
                sectors,
            } => {
                let plain = self.decompress(coff, sectors)?;
                let src = plain
                    .get(within as usize..within as usize + buf.len())
                    .ok_or_else(|| Error::corrupt("compressed cluster decompressed short"))?;
                buf.copy_from_slice(src);
                Ok(())
            }
            Mapping::Subclusters { host, alloc, zero } => {
                let sc = cs / crate::format::table::SUBCLUSTERS as u64;
                let mut done = 0usize;
                while done < buf.len() {
                    let pos = within + done as u64;
                    let index = (pos / sc) as u32;
                    let n = ((sc - pos % sc) as usize).min(buf.len() - done);
                    let part = buf.get_mut(done..done + n).unwrap_or_default();
                    if alloc & (1 << index) != 0 {
                        self.image.io.read_zero_fill(part, host + pos)?;
                    } else if zero & (1 << index) != 0 {
                        part.fill(0);
                    } else {
                        self.read_backing(cluster + pos, part)?;
                    }
                    done += n;
                }
                Ok(())
            }
        }
    }

    /// Inflates a compressed cluster (zlib raw deflate or zstd) to exactly one cluster.
    fn decompress(&self, offset: u64, sectors: u64) -> Result<Vec<u8>> {
        let cs = self.image.cluster_size() as usize;
        let len = (sectors * 512).saturating_sub(offset & 511);
        if len > 2 * cs as u64 + 512 {
            return Err(Error::corrupt(
                "compressed cluster descriptor claims more than two clusters",
            )
            .with_offset(offset));
        }
        let mut input = vec![0u8; len as usize];
        self.image.io.read_zero_fill(&mut input, offset)?;
        let mut out = vec![0u8; cs];
        if self.image.header().compression_type == COMPRESSION_ZSTD {
            let mut decoder = zstd::stream::read::Decoder::new(input.as_slice())
                .map_err(|e| Error::corrupt(format!("zstd: {e}")).with_offset(offset))?;
            decoder.read_exact(&mut out).map_err(|e| {
                Error::corrupt(format!("zstd cluster does not inflate to one cluster: {e}"))
                    .with_offset(offset)
            })?;
        } else {
            let mut inflate = flate2::Decompress::new(false);
            inflate
                .decompress(&input, &mut out, flate2::FlushDecompress::Finish)
                .map_err(|e| Error::corrupt(format!("deflate: {e}")).with_offset(offset))?;
            if inflate.total_out() != cs as u64 {
                return Err(
                    Error::corrupt("compressed cluster does not inflate to one cluster")
                        .with_offset(offset),
                );
            }
        }
        Ok(out)
    }

    /// Reads guest data at `offset` (the range must lie inside the virtual disk).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_data_access()?;
        let size = self.image.virtual_size();
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > size)
        {
            return Err(Error::invalid(format!(
                "read of {} bytes at {offset} is past the disk's end ({size})",
                buf.len()
            )));
        }
        let cs = self.image.cluster_size();
        let geom = self.image.l2_geometry();
        let mut done = 0usize;
        while done < buf.len() {
            // The entries of the clusters ahead (one read per L2 table slice); runs of clusters
            // that are contiguous on the host are read with one read.
            let pos = offset + done as u64;
            let cluster = pos & !(cs - 1);
            let want = (offset + buf.len() as u64 - cluster).div_ceil(cs);
            let entries = self.entries_from(cluster, want)?;
            let mut i = 0usize;
            while i < entries.len() && done < buf.len() {
                let pos = offset + done as u64;
                let within = pos % cs;
                let n = ((cs - within) as usize).min(buf.len() - done);
                let entry = entries
                    .get(i)
                    .copied()
                    .unwrap_or(L2Entry { raw: 0, bitmap: 0 });
                if let Mapping::Normal { host } = geom.mapping(entry)? {
                    let mut len = n;
                    let mut next = i + 1;
                    while done + len < buf.len() {
                        let Some(e) = entries.get(next) else { break };
                        match geom.mapping(*e)? {
                            Mapping::Normal { host: h } if h == host + (next - i) as u64 * cs => {
                                len += (cs as usize).min(buf.len() - done - len);
                                next += 1;
                            }
                            _ => break,
                        }
                    }
                    self.image.io.read_zero_fill(
                        buf.get_mut(done..done + len).unwrap_or_default(),
                        host + within,
                    )?;
                    done += len;
                    i = next;
                } else {
                    self.read_in_cluster(pos, buf.get_mut(done..done + n).unwrap_or_default())?;
                    done += n;
                    i += 1;
                }
            }
        }
        Ok(())
    }

    /// Writes guest data at `offset` with copy-on-write (see the module documentation).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_data_access()?;
        let size = self.image.virtual_size();
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > size)
        {
            return Err(Error::invalid(format!(
                "write of {} bytes at {offset} is past the disk's end ({size})",
                data.len()
            )));
        }
        let cs = self.image.cluster_size();
        let mut pending: Vec<(u64, ClusterSource)> = Vec::new();
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let cluster = pos & !(cs - 1);
            let n = ((cs - (pos - cluster)) as usize).min(data.len() - done);
            // The whole new cluster: the current guest view with the written bytes on top.
            let valid = (size - cluster).min(cs) as usize;
            let mut content = vec![0u8; cs as usize];
            self.read(cluster, content.get_mut(..valid).unwrap_or_default())?;
            let at = (pos - cluster) as usize;
            if let (Some(dst), Some(src)) = (content.get_mut(at..at + n), data.get(done..done + n))
            {
                dst.copy_from_slice(src);
            }
            pending.push((cluster, ClusterSource::Bytes(content)));
            done += n;
            if pending.len() >= WRITE_BATCH_CLUSTERS {
                self.write_clusters(std::mem::take(&mut pending), None)?;
            }
        }
        if !pending.is_empty() {
            self.write_clusters(pending, None)?;
        }
        Ok(())
    }

    /// Replaces whole guest clusters in one transaction: each gets a new host cluster holding its
    /// new content, or becomes a zero cluster (v3 images; version 2 has no zero flag, so zeroes
    /// are written as data there). `ClusterSource::Copy` offsets refer to `copy_source`.
    pub(crate) fn write_clusters(
        &mut self,
        clusters: Vec<(u64, ClusterSource)>,
        copy_source: Option<&std::fs::File>,
    ) -> Result<()> {
        let cs = self.image.cluster_size() as usize;
        let v2 = self.image.header().version < 3;
        let clusters: Vec<(u64, ClusterSource)> = clusters
            .into_iter()
            .map(|(g, c)| match c {
                ClusterSource::Zero if v2 => (g, ClusterSource::Bytes(vec![0u8; cs])),
                other => (g, other),
            })
            .collect();
        let size = self.image.virtual_size();
        self.image.run_txn(size, |img, txn| {
            let h = img.header();
            let cb = h.cluster_bits;
            let geom = img.l2_geometry();
            let entries = h.l2_entries() as usize;
            // Fresh data clusters, appended (a refusal below truncates them away).
            let mut by_table: BTreeMap<usize, Vec<(usize, u64)>> = BTreeMap::new();
            // Runs of clusters copied from the source, contiguous on both sides: one copy each.
            let mut run: Option<(u64, u64, u64)> = None; // (source offset, host offset, length)
            let cs64 = h.cluster_size();
            let data_clusters = clusters
                .iter()
                .filter(|(_, c)| !matches!(c, ClusterSource::Zero))
                .count() as u64;
            let mut next_host = txn.reserve(data_clusters)?;
            let mut take_host = || {
                let host = next_host;
                next_host += cs64;
                host
            };
            for (guest, content) in &clusters {
                // Host 0 stands for "zero cluster".
                let host = match content {
                    ClusterSource::Bytes(content) => {
                        let host = take_host();
                        txn.write_new(host, content)?;
                        host
                    }
                    ClusterSource::Zero => 0,
                    ClusterSource::Copy(src) => {
                        let Some(file) = copy_source else {
                            return Err(Error::invalid(
                                "internal error: copy without a source file",
                            ));
                        };
                        let host = take_host();
                        run = match run {
                            Some((s, d, len)) if s + len == *src && d + len == host => {
                                Some((s, d, len + cs64))
                            }
                            Some((s, d, len)) => {
                                txn.copy_in(file, s, d, len)?;
                                Some((*src, host, cs64))
                            }
                            None => Some((*src, host, cs64)),
                        };
                        host
                    }
                };
                let l1_index = (guest / h.l1_entry_span()) as usize;
                let l2_index = ((guest % h.l1_entry_span()) >> cb) as usize;
                by_table.entry(l1_index).or_default().push((l2_index, host));
            }
            if let (Some((s, d, len)), Some(file)) = (run, copy_source) {
                txn.copy_in(file, s, d, len)?;
            }
            // New tables: the old one's entries with the written ones replaced.
            let mut new_tables: Vec<(usize, Vec<u8>, Vec<usize>)> = Vec::new();
            let mut table = vec![0u8; h.cluster_size() as usize];
            let mut hosts = Vec::new();
            for (l1_index, writes) in &by_table {
                let old = img.l1.get(*l1_index).copied().unwrap_or(L1Entry(0));
                if old.l2_offset() != 0 {
                    img.read_l2_into(old.l2_offset(), &mut table)?;
                    // The active table stops referencing the old table and, through it, its data.
                    hosts.clear();
                    collect_referenced(img, &table, old.l2_offset(), &mut hosts)?;
                    txn.add_clusters(&mut hosts, -1, false)?;
                    txn.add(old.l2_offset(), -1)?;
                } else {
                    table.fill(0);
                }
                let mut fresh = Vec::with_capacity(writes.len());
                for &(l2_index, host) in writes {
                    let entry = match (host, geom.extended) {
                        (0, true) => L2Entry {
                            raw: 0,
                            bitmap: 0xffff_ffff << 32,
                        },
                        (0, false) => L2Entry {
                            raw: crate::format::table::ZERO,
                            bitmap: 0,
                        },
                        (h, true) => L2Entry {
                            raw: h,
                            bitmap: 0xffff_ffff,
                        },
                        (h, false) => L2Entry { raw: h, bitmap: 0 },
                    };
                    geom.set_entry(&mut table, l2_index, entry);
                    if host != 0 {
                        fresh.push(l2_index);
                    }
                }
                new_tables.push((*l1_index, table.clone(), fresh));
            }
            for (_, new_table, fresh) in &new_tables {
                hosts.clear();
                let mut carried = new_table.clone();
                for &i in fresh {
                    geom.set_entry(&mut carried, i, L2Entry { raw: 0, bitmap: 0 });
                }
                collect_referenced(img, &carried, 0, &mut hosts)?;
                // Carried entries may have just dropped to 0 above (their old table was the only
                // path); this restores them, so no "referenced" check here.
                txn.add_clusters(&mut hosts, 1, false)?;
            }
            let tables: Vec<u64> = img
                .l1
                .iter()
                .map(|e| e.l2_offset())
                .filter(|o| *o != 0)
                .collect();
            crate::txn::validate_metadata_refcounts(img, &tables)?;
            let cs = h.cluster_size();
            let old_l1_clusters = (img.l1.len() as u64 * 8).div_ceil(cs);
            for c in 0..old_l1_clusters {
                txn.free_later(h.l1_table_offset + c * cs);
            }
            txn.mark_validated()?;
            // COPIED: fresh clusters have refcount 1; carried ones per their final refcount.
            let mut new_l1 = img.l1.clone();
            for (l1_index, mut new_table, fresh) in new_tables {
                for i in 0..entries {
                    let Some(entry) = geom.entry(&new_table, i) else {
                        break;
                    };
                    let mapping = geom.mapping(entry)?;
                    let want = if fresh.contains(&i) {
                        true
                    } else if geom.may_be_copied(mapping) {
                        match geom.referenced_clusters(mapping) {
                            Some((host, _)) => txn.refcount(host)? == 1,
                            None => false,
                        }
                    } else {
                        false
                    };
                    let raw = if want {
                        entry.raw | COPIED
                    } else {
                        entry.raw & !COPIED
                    };
                    geom.set_entry(
                        &mut new_table,
                        i,
                        L2Entry {
                            raw,
                            bitmap: entry.bitmap,
                        },
                    );
                }
                let offset = txn.alloc_one()?;
                txn.write_new(offset, &new_table)?;
                if let Some(slot) = new_l1.get_mut(l1_index) {
                    *slot = L1Entry::new(offset, true);
                }
            }
            let l1_bytes = new_l1.len() as u64 * 8;
            let l1_clusters = l1_bytes.div_ceil(cs);
            let l1_offset = txn.alloc_run(l1_clusters)?;
            let mut bytes = vec![0u8; (l1_clusters * cs) as usize];
            for (e, chunk) in new_l1.iter().zip(bytes.chunks_exact_mut(8)) {
                chunk.copy_from_slice(&e.0.to_be_bytes());
            }
            txn.write_new(l1_offset, &bytes)?;
            Ok(Staged {
                active_l1_offset: l1_offset,
                active_l1_size: new_l1.len() as u32,
                snapshots_offset: h.snapshots_offset,
                nb_snapshots: h.nb_snapshots,
            })
        })
    }
}

/// How one cluster of a layer reads, for [`GuestRead::extent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClusterKind {
    /// The layer holds (some) data.
    Data,
    /// Zeroes, whatever the backing holds.
    Zero,
    /// Read from the backing.
    Backing,
}

fn cluster_kind(mapping: Mapping) -> ClusterKind {
    match mapping {
        Mapping::Unallocated => ClusterKind::Backing,
        Mapping::Zero { .. } => ClusterKind::Zero,
        Mapping::Subclusters { alloc: 0, zero, .. } if zero == u32::MAX => ClusterKind::Zero,
        Mapping::Subclusters {
            alloc: 0, zero: 0, ..
        } => ClusterKind::Backing,
        Mapping::Normal { .. } | Mapping::Compressed { .. } | Mapping::Subclusters { .. } => {
            ClusterKind::Data
        }
    }
}

impl<IO: BlockIo> GuestRead for Qcow2Disk<IO> {
    fn guest_size(&self) -> u64 {
        self.image.virtual_size()
    }

    /// Runs of whole clusters of the same kind, read one L2 table slice at a time; unallocated
    /// runs are asked of the backing chain (zeroes without one).
    fn extent(&self, offset: u64, len: u64) -> Result<Extent> {
        let size = self.image.virtual_size();
        if offset >= size || len == 0 {
            return Ok(Extent { data: false, len });
        }
        self.check_data_access()?;
        let len = len.min(size - offset);
        let cs = self.image.cluster_size();
        let geom = self.image.l2_geometry();
        let start = offset & !(cs - 1);
        let end = offset + len;
        let mut kind: Option<ClusterKind> = None;
        let mut at = start;
        'tables: while at < end {
            let want = (end - at).div_ceil(cs);
            for entry in self.entries_from(at, want)? {
                let this = cluster_kind(geom.mapping(entry)?);
                match kind {
                    None => kind = Some(this),
                    Some(k) if k == this => {}
                    Some(_) => break 'tables,
                }
                at += cs;
                if at >= end {
                    break 'tables;
                }
            }
        }
        let run = at.min(end) - offset;
        match kind.unwrap_or(ClusterKind::Backing) {
            ClusterKind::Data => Ok(Extent {
                data: true,
                len: run,
            }),
            ClusterKind::Zero => Ok(Extent {
                data: false,
                len: run,
            }),
            ClusterKind::Backing => match &self.backing {
                None => Ok(Extent {
                    data: false,
                    len: run,
                }),
                Some(b) => {
                    let below = b.extent(offset, run)?;
                    Ok(Extent {
                        data: below.data,
                        len: below.len.clamp(1, run),
                    })
                }
            },
        }
    }
    fn read_guest(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let size = self.image.virtual_size();
        let inside = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(inside);
        tail.fill(0);
        if head.is_empty() {
            return Ok(());
        }
        self.read(offset, head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::create::{CreateOptions, create_image};
    use crate::internal::SnapshotTime;
    use snap_core::io::MemIo;

    fn image(size: u64) -> MemIo {
        let io = MemIo::new();
        create_image(&io, &CreateOptions::new(size)).unwrap();
        io
    }

    fn data_bytes(disk: &dyn GuestRead) -> u64 {
        let size = disk.guest_size();
        let mut at = 0;
        let mut data = 0;
        while at < size {
            let e = disk.extent(at, size - at).unwrap();
            assert!(e.len > 0 && e.len <= size - at);
            if e.data {
                data += e.len;
            }
            at += e.len;
        }
        data
    }

    #[test]
    fn snapshot_views_read_the_snapshots_clusters() {
        let io = image(4 << 20);
        let mut disk = Qcow2Disk::new(Qcow2::open(io.clone(), true).unwrap(), None);
        disk.write(0, &[0x11; 65536]).unwrap();
        disk.write(3 << 20, &[0x22; 1000]).unwrap();
        disk.image
            .create_snapshot("s1", SnapshotTime { sec: 1, nsec: 0 })
            .unwrap();
        disk.write(0, &[0x33; 4096]).unwrap();
        disk.write(1 << 20, &[0x44; 65536]).unwrap();
        drop(disk);

        let view = Qcow2::open(io.clone(), false)
            .unwrap()
            .into_snapshot_view("s1")
            .unwrap();
        let view = Qcow2Disk::new(view, None);
        let mut buf = vec![0u8; 4 << 20];
        view.read(0, &mut buf).unwrap();
        assert!(buf[..65536].iter().all(|b| *b == 0x11));
        assert!(buf[1 << 20..(1 << 20) + 65536].iter().all(|b| *b == 0));
        assert!(buf[3 << 20..(3 << 20) + 1000].iter().all(|b| *b == 0x22));
        assert_eq!(data_bytes(&view), 2 * 65536);

        let current = Qcow2Disk::new(Qcow2::open(io.clone(), false).unwrap(), None);
        current.read(0, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|b| *b == 0x33));
        assert_eq!(data_bytes(&current), 3 * 65536);

        // By id too; unknown names and writable images are refused.
        assert!(
            Qcow2::open(io.clone(), false)
                .unwrap()
                .into_snapshot_view("1")
                .is_ok()
        );
        let missing = Qcow2::open(io.clone(), false)
            .unwrap()
            .into_snapshot_view("nope")
            .unwrap_err();
        assert_eq!(missing.kind(), snap_core::ErrorKind::NotFound);
        assert!(
            Qcow2::open(io.clone(), true)
                .unwrap()
                .into_snapshot_view("s1")
                .is_err()
        );
    }

    #[test]
    fn extents_follow_the_backing_chain() {
        let base = image(2 << 20);
        let mut b = Qcow2Disk::new(Qcow2::open(base.clone(), true).unwrap(), None);
        b.write(0, &[1; 65536]).unwrap();
        b.write(1 << 20, &[2; 131072]).unwrap();
        drop(b);
        let top = image(4 << 20);
        let lower: Box<dyn GuestRead> =
            Box::new(Qcow2Disk::new(Qcow2::open(base, false).unwrap(), None));
        let mut t = Qcow2Disk::new(Qcow2::open(top.clone(), true).unwrap(), Some(lower));
        t.write(65536, &[3; 65536]).unwrap();
        t.write(3 << 20, &[4; 65536]).unwrap();
        // The base's data, the top's data; past the base's end only the top counts.
        assert_eq!(data_bytes(&t), 65536 * 5);
        let first = t.extent(0, 4 << 20).unwrap();
        assert_eq!(
            first,
            Extent {
                data: true,
                len: 65536
            }
        );
        let hole = t.extent(2 * 65536, 4 << 20).unwrap();
        assert!(!hole.data);
        assert_eq!(hole.len, (1 << 20) - 2 * 65536);
        assert_eq!(
            t.extent(100, 10).unwrap(),
            Extent {
                data: true,
                len: 10
            }
        );
    }
}
