//! An open qcow2 image: the validated header, active L1 table, refcount table and snapshot table,
//! and read access to L2 tables and refcounts.
//!
//! Opening validates every structure an operation will rely on — header fields, table offsets and
//! sizes against the file's length, overlaps between tables, reserved bits — so an operation on a
//! damaged image is refused before anything is written.

use snap_core::{BlockIo, Error, ErrorKind, Result};

use crate::format::header::{
    self, AUTOCLEAR_BITMAPS, EXT_BITMAPS, EXT_CRYPTO, Header, HeaderCluster, INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, INCOMPAT_KNOWN,
};
use crate::format::refcount::{RefcountGeometry, reftable_entry};
use crate::format::snapshot::{self, MAX_TABLE_BYTES, SnapshotEntry};
use crate::format::table::{L1Entry, L2Geometry};
use crate::format::{be64, put_be32, put_be64};

/// Largest L1 table QEMU accepts (32 MiB).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table QEMU accepts (8 MiB).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Largest virtual size QEMU creates (2 EiB - 1, bounded by the 56-bit offset fields).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 61;

/// An open, validated qcow2 image.
#[derive(Debug)]
pub struct Qcow2<IO> {
    pub(crate) io: IO,
    pub(crate) hc: HeaderCluster,
    pub(crate) file_len: u64,
    pub(crate) l1: Vec<L1Entry>,
    pub(crate) reftable: Vec<u64>,
    pub(crate) snapshots: Vec<SnapshotEntry>,
    pub(crate) snapshot_table_len: u64,
    pub(crate) writable: bool,
}

/// What an image can be used for, decided from its feature bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// Listing, checking, reading.
    Read,
    /// Internal snapshot operations and writes.
    Write,
}

pub(crate) fn corrupt_at(offset: u64, message: impl Into<String>) -> Error {
    Error::corrupt(message).with_offset(offset)
}

impl<IO: BlockIo> Qcow2<IO> {
    /// Opens and validates an image. `writable` says whether snapshot operations will follow;
    /// images whose features forbid that (dirty, corrupt, external data file) are refused then.
    pub fn open(io: IO, writable: bool) -> Result<Self> {
        let file_len = io.len()?;
        if file_len < header::V2_HEADER_LEN as u64 {
            let mut magic = [0u8; 4];
            if io.read_at(&mut magic, 0)? == 4 && u32::from_be_bytes(magic) == header::MAGIC {
                return Err(Error::corrupt(
                    "qcow2 image is truncated: shorter than its header",
                ));
            }
            return Err(Error::invalid("not a qcow2 image (too short)"));
        }
        // Read the first 512 bytes to learn the cluster size, then the whole first cluster.
        let mut first = vec![0u8; file_len.min(512) as usize];
        io.read_exact_at(&mut first, 0)?;
        let pre = Header::decode(&first)?;
        let cluster0_len = pre.cluster_size().min(file_len) as usize;
        let mut cluster0 = vec![0u8; cluster0_len];
        io.read_exact_at(&mut cluster0, 0)?;
        let hc = HeaderCluster::decode(&cluster0)?;
        let mut image = Qcow2 {
            io,
            hc,
            file_len,
            l1: Vec::new(),
            reftable: Vec::new(),
            snapshots: Vec::new(),
            snapshot_table_len: 0,
            writable,
        };
        image.check_features(if writable {
            Intent::Write
        } else {
            Intent::Read
        })?;
        image.load_tables()?;
        Ok(image)
    }

    fn check_features(&self, intent: Intent) -> Result<()> {
        let h = &self.hc.header;
        let unknown = h.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(Error::unsupported(format!(
                "image uses incompatible features this version does not know ({unknown:#x})"
            )));
        }
        if h.incompatible_features & INCOMPAT_CORRUPT != 0 && intent == Intent::Write {
            return Err(Error::corrupt(
                "image is marked corrupt by QEMU; repair it with `qemu-img check -r all` before changing snapshots",
            ));
        }
        if h.incompatible_features & INCOMPAT_DIRTY != 0 && intent == Intent::Write {
            return Err(Error::new(
                ErrorKind::Corrupt,
                "image is marked dirty (it was not closed cleanly, e.g. with lazy refcounts), so its refcounts may be \
                 stale; run `qemu-img check -r all` on it first",
            ));
        }
        if h.incompatible_features & INCOMPAT_DATA_FILE != 0 && intent == Intent::Write {
            return Err(Error::unsupported(
                "image keeps its data in an external data file; internal snapshots are impossible there (QEMU refuses \
                 them too) — use an external snapshot",
            ));
        }
        match h.crypt_method {
            0 | 2 => {}
            1 => {
                return Err(Error::unsupported(
                    "image uses qcow2's legacy AES encryption, which is insecure and which QEMU no longer \
                     supports for use; convert it (`qemu-img convert` to LUKS or plain) first",
                ));
            }
            other => {
                return Err(Error::unsupported(format!(
                    "unknown encryption method {other}"
                )));
            }
        }
        Ok(())
    }

    pub(crate) fn load_tables(&mut self) -> Result<()> {
        let h = self.hc.header.clone();
        let cs = h.cluster_size();
        if h.size > MAX_VIRTUAL_SIZE {
            return Err(Error::corrupt(format!(
                "virtual size {} is too large",
                h.size
            )));
        }
        // Active L1 table.
        let l1_bytes = (h.l1_size as u64) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(Error::corrupt(format!(
                "L1 table of {} entries is larger than 32 MiB",
                h.l1_size
            )));
        }
        if (h.l1_size as u64) < h.l1_entries_for(h.size) {
            return Err(Error::corrupt(format!(
                "L1 table of {} entries is too small for a virtual size of {} bytes",
                h.l1_size, h.size
            )));
        }
        self.check_range(
            "active L1 table",
            h.l1_table_offset,
            l1_bytes,
            h.l1_size > 0,
        )?;
        self.l1 = self.read_l1(h.l1_table_offset, h.l1_size)?;
        // Refcount table.
        let rt_bytes = (h.refcount_table_clusters as u64) * cs;
        if h.refcount_table_clusters == 0 {
            return Err(Error::corrupt("refcount table has zero clusters"));
        }
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(Error::corrupt(format!(
                "refcount table of {} clusters is larger than 8 MiB",
                h.refcount_table_clusters
            )));
        }
        self.check_range("refcount table", h.refcount_table_offset, rt_bytes, true)?;
        let mut rt = vec![0u8; rt_bytes as usize];
        self.io.read_exact_at(&mut rt, h.refcount_table_offset)?;
        self.reftable = rt
            .chunks_exact(8)
            .enumerate()
            .map(|(i, c)| {
                let raw = u64::from_be_bytes(c.try_into().unwrap_or([0; 8]));
                reftable_entry(raw, cs).and_then(|off| {
                    if off != 0 {
                        self.check_range("refcount block", off, cs, true)
                            .map_err(|e| e.context(format!("refcount table entry {i}")))?;
                    }
                    Ok(off)
                })
            })
            .collect::<Result<Vec<u64>>>()?;
        // Snapshot table.
        if h.nb_snapshots > snapshot::MAX_SNAPSHOTS {
            return Err(Error::corrupt(format!(
                "{} snapshots; QEMU's limit is 65536",
                h.nb_snapshots
            )));
        }
        if h.nb_snapshots > 0 {
            if h.snapshots_offset == 0 || h.snapshots_offset % cs != 0 {
                return Err(corrupt_at(
                    h.snapshots_offset,
                    "snapshot table offset is not cluster aligned",
                ));
            }
            if h.snapshots_offset >= self.file_len {
                return Err(corrupt_at(
                    h.snapshots_offset,
                    "snapshot table starts past the end of the file",
                ));
            }
            let (entries, len) =
                self.read_snapshot_table(h.snapshots_offset, h.nb_snapshots, h.version)?;
            for (i, sn) in entries.iter().enumerate() {
                let what = format!("L1 table of snapshot {} ({:?})", sn.id, sn.name);
                if sn.l1_size as u64 * 8 > MAX_L1_BYTES {
                    return Err(Error::corrupt(format!("{what} is larger than 32 MiB")));
                }
                self.check_range(
                    &what,
                    sn.l1_table_offset,
                    sn.l1_size as u64 * 8,
                    sn.l1_size > 0,
                )
                .map_err(|e| e.context(format!("snapshot table entry {i}")))?;
            }
            self.snapshots = entries;
            self.snapshot_table_len = len as u64;
        }
        self.check_overlaps()?;
        Ok(())
    }

    /// Reads the snapshot table entry by entry, so memory follows the table's real size (not the
    /// 64 MiB it may have at most).
    fn read_snapshot_table(
        &self,
        offset: u64,
        count: u32,
        version: u32,
    ) -> Result<(Vec<SnapshotEntry>, usize)> {
        let mut entries = Vec::with_capacity(count.min(1024) as usize);
        let mut at = 0u64;
        let mut fixed = [0u8; snapshot::ENTRY_FIXED_LEN];
        for i in 0..count {
            let pos = offset + at;
            let past_end = || {
                corrupt_at(
                    pos,
                    format!("snapshot table entry {i} runs past the end of the file"),
                )
            };
            if pos + fixed.len() as u64 > self.file_len {
                return Err(past_end());
            }
            self.io.read_exact_at(&mut fixed, pos)?;
            let id_len = crate::format::be16(&fixed, 12).unwrap_or(0) as u64;
            let name_len = crate::format::be16(&fixed, 14).unwrap_or(0) as u64;
            let extra_len = crate::format::be32(&fixed, 36).unwrap_or(0) as u64;
            if id_len > snapshot::MAX_ID_LEN as u64 || name_len > snapshot::MAX_NAME_LEN as u64 {
                return Err(corrupt_at(
                    pos,
                    format!(
                        "snapshot table entry {i} has an implausible id/name length ({id_len}/{name_len} bytes)"
                    ),
                ));
            }
            if extra_len > snapshot::MAX_EXTRA_DATA as u64 {
                return Err(corrupt_at(
                    pos,
                    format!(
                        "snapshot table entry {i} has {extra_len} bytes of extra data; the limit is 1024"
                    ),
                ));
            }
            let len = (fixed.len() as u64 + extra_len + id_len + name_len).div_ceil(8) * 8;
            if at + len > MAX_TABLE_BYTES {
                return Err(corrupt_at(offset, "snapshot table is larger than 64 MiB"));
            }
            let mut bytes = vec![0u8; len as usize];
            if pos + len > self.file_len {
                // The padding may be missing at the very end of a file; the entry itself may not.
                let unpadded = fixed.len() as u64 + extra_len + id_len + name_len;
                if pos + unpadded > self.file_len {
                    return Err(past_end());
                }
                bytes.truncate(unpadded as usize);
            }
            self.io.read_exact_at(&mut bytes, pos)?;
            bytes.resize(len as usize, 0);
            let (mut one, _) = snapshot::decode_table(&bytes, 1, version).map_err(|e| {
                e.context(format!("snapshot table entry {i}"))
                    .with_offset(pos)
            })?;
            entries.append(&mut one);
            at += len;
        }
        Ok((entries, at as usize))
    }

    /// Checks that a table lies inside the file, cluster aligned, not over the header.
    fn check_range(&self, what: &str, offset: u64, len: u64, required: bool) -> Result<()> {
        let cs = self.cluster_size();
        if !required && offset == 0 {
            return Ok(());
        }
        if offset % cs != 0 {
            return Err(corrupt_at(offset, format!("{what} is not cluster aligned")));
        }
        if offset < cs {
            return Err(corrupt_at(
                offset,
                format!("{what} overlaps the image header"),
            ));
        }
        let end = offset
            .checked_add(len)
            .ok_or_else(|| corrupt_at(offset, format!("{what} offset overflows")))?;
        if end > self.file_len {
            return Err(corrupt_at(
                offset,
                format!(
                    "{what} ({len} bytes) runs past the end of the file ({} bytes)",
                    self.file_len
                ),
            ));
        }
        Ok(())
    }

    fn check_overlaps(&self) -> Result<()> {
        let h = &self.hc.header;
        let cs = self.cluster_size();
        let mut ranges: Vec<(u64, u64, String)> = Vec::new();
        let mut add = |offset: u64, len: u64, what: String| {
            if len > 0 {
                let end = (offset + len).div_ceil(cs) * cs;
                ranges.push((offset, end, what));
            }
        };
        add(
            h.l1_table_offset,
            h.l1_size as u64 * 8,
            "active L1 table".into(),
        );
        add(
            h.refcount_table_offset,
            h.refcount_table_clusters as u64 * cs,
            "refcount table".into(),
        );
        add(
            h.snapshots_offset,
            self.snapshot_table_len,
            "snapshot table".into(),
        );
        for sn in &self.snapshots {
            add(
                sn.l1_table_offset,
                sn.l1_size as u64 * 8,
                format!("L1 table of snapshot {:?}", sn.name),
            );
        }
        ranges.sort();
        for pair in ranges.windows(2) {
            if let [a, b] = pair {
                if b.0 < a.1 {
                    return Err(corrupt_at(b.0, format!("{} overlaps {}", b.2, a.2)));
                }
            }
        }
        Ok(())
    }

    /// Reads and validates an L1 table.
    pub(crate) fn read_l1(&self, offset: u64, entries: u32) -> Result<Vec<L1Entry>> {
        let cs = self.cluster_size();
        let mut bytes = vec![0u8; entries as usize * 8];
        self.io.read_exact_at(&mut bytes, offset)?;
        let mut l1 = Vec::with_capacity(entries as usize);
        for (i, c) in bytes.chunks_exact(8).enumerate() {
            let e = L1Entry(u64::from_be_bytes(c.try_into().unwrap_or([0; 8])));
            e.validate(cs).map_err(|err| {
                err.context(format!("L1 entry {i}"))
                    .with_offset(offset + i as u64 * 8)
            })?;
            if e.l2_offset() != 0 {
                self.check_range("L2 table", e.l2_offset(), cs, true)
                    .map_err(|err| err.context(format!("L1 entry {i}")))?;
            }
            l1.push(e);
        }
        Ok(l1)
    }

    /// Reads the L2 table at `offset` into `buf` (one cluster).
    pub(crate) fn read_l2_into(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range("L2 table", offset, self.cluster_size(), true)?;
        self.io.read_exact_at(buf, offset)
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.hc.header
    }

    /// Header, extensions and backing file name.
    pub fn header_cluster(&self) -> &HeaderCluster {
        &self.hc
    }

    /// The snapshot table.
    pub fn snapshots(&self) -> &[SnapshotEntry] {
        &self.snapshots
    }

    /// Virtual size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.hc.header.size
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.hc.header.cluster_size()
    }

    /// The file length when the image was opened.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// The active L1 table.
    pub fn active_l1(&self) -> &[L1Entry] {
        &self.l1
    }

    /// The refcount table (refcount block offsets).
    pub fn refcount_table(&self) -> &[u64] {
        &self.reftable
    }

    /// The underlying I/O.
    pub fn io(&self) -> &IO {
        &self.io
    }

    /// Consumes the image, returning its I/O.
    pub fn into_io(self) -> IO {
        self.io
    }

    pub(crate) fn l2_geometry(&self) -> L2Geometry {
        L2Geometry {
            cluster_bits: self.hc.header.cluster_bits,
            extended: self.hc.header.extended_l2(),
        }
    }

    pub(crate) fn refcount_geometry(&self) -> RefcountGeometry {
        RefcountGeometry {
            cluster_bits: self.hc.header.cluster_bits,
            refcount_order: self.hc.header.refcount_order,
        }
    }

    /// The stored refcount of the cluster at byte `offset` (0 past the refcount table's reach).
    pub fn refcount(&self, offset: u64) -> Result<u64> {
        let g = self.refcount_geometry();
        let cluster = offset >> self.hc.header.cluster_bits;
        let block_index = cluster >> g.block_entries_bits();
        let Some(&block) = self.reftable.get(block_index as usize) else {
            return Ok(0);
        };
        if block == 0 {
            return Ok(0);
        }
        let index = (cluster & (g.block_entries() - 1)) as usize;
        let width = (g.bits() as usize).div_ceil(8);
        let byte = index * g.bits() as usize / 8;
        let mut buf = [0u8; 8];
        let slice = buf.get_mut(..width).unwrap_or_default();
        self.io.read_exact_at(slice, block + byte as u64)?;
        // Re-base the index into the small buffer for sub-byte widths.
        let local = if g.bits() < 8 {
            index % (8 / g.bits() as usize)
        } else {
            0
        };
        g.get(slice, local)
            .ok_or_else(|| Error::corrupt("refcount read out of range"))
    }

    /// Whether the image has persistent bitmaps whose clusters must be accounted for.
    pub(crate) fn has_bitmaps(&self) -> bool {
        self.hc.header.autoclear_features & AUTOCLEAR_BITMAPS != 0
            && self.hc.extension(EXT_BITMAPS).is_some()
    }

    /// How many persistent dirty bitmaps the bitmaps extension declares (0 without one).
    pub fn persistent_bitmap_count(&self) -> u32 {
        if !self.has_bitmaps() {
            return 0;
        }
        self.hc
            .extension(EXT_BITMAPS)
            .and_then(|d| crate::format::be32(d, 0))
            .unwrap_or(0)
    }

    /// The full-disk-encryption header's (offset, length), if any.
    pub(crate) fn crypto_header(&self) -> Option<(u64, u64)> {
        let d = self.hc.extension(EXT_CRYPTO)?;
        Some((be64(d, 0)?, be64(d, 8)?))
    }

    /// Writes the header fields snapshot operations change, in one 512-byte write of sector 0.
    pub(crate) fn write_header_fields(&self, fields: &HeaderUpdate) -> Result<()> {
        let len = self.file_len.min(512) as usize;
        let mut sector = vec![0u8; len];
        self.io.read_exact_at(&mut sector, 0)?;
        use crate::format::header::field;
        let ok = put_be64(&mut sector, field::SIZE, fields.size)
            && put_be32(&mut sector, field::L1_SIZE, fields.l1_size)
            && put_be64(&mut sector, field::L1_TABLE_OFFSET, fields.l1_table_offset)
            && put_be64(
                &mut sector,
                field::REFCOUNT_TABLE_OFFSET,
                fields.refcount_table_offset,
            )
            && put_be32(
                &mut sector,
                field::REFCOUNT_TABLE_CLUSTERS,
                fields.refcount_table_clusters,
            )
            && put_be32(&mut sector, field::NB_SNAPSHOTS, fields.nb_snapshots)
            && put_be64(
                &mut sector,
                field::SNAPSHOTS_OFFSET,
                fields.snapshots_offset,
            );
        if !ok {
            return Err(Error::corrupt("header sector too short"));
        }
        self.io.write_all_at(&sector, 0)
    }
}

/// The header fields an operation switches in its commit write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HeaderUpdate {
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
}
