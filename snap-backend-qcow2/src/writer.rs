//! Writing a new, standalone qcow2 image in one sequential pass (an export, a flattened copy).
//!
//! [`SequentialWriter`] takes guest data in increasing guest order and appends it to the file as
//! it comes: host clusters are allocated one after the other, with no metadata transaction per
//! cluster. Each L2 table is written once, when the data moves past the 512 MiB (at 64 KiB
//! clusters) it covers; at [`SequentialWriter::finish`] the L1 table, the refcount blocks (every
//! cluster of the file has refcount 1, so they are one run of ones) and the refcount table are
//! appended, flushed, and only then is the header written into cluster 0 and flushed again.
//!
//! Guest clusters that are never written stay unallocated (they read as zeroes: the image has no
//! backing file), so a caller that skips zero clusters gets a sparse image. Until the header is
//! written the file does not start with the qcow2 magic, so an interrupted write never leaves
//! something that looks like a valid image. Memory: one L2 table and the L1 table.

use snap_core::{BlockIo, Error, ErrorKind, Result};

use crate::format::header::{COMPRESSION_ZLIB, Header, HeaderCluster};
use crate::format::refcount::RefcountGeometry;
use crate::format::table::COPIED;
use crate::image::{MAX_L1_BYTES, MAX_VIRTUAL_SIZE};

/// The refcount width written (16 bits, QEMU's default).
const REFCOUNT_ORDER: u32 = 4;

/// Writes a standalone qcow2 v3 image (no backing file) sequentially; see the module docs.
#[derive(Debug)]
pub struct SequentialWriter<IO> {
    io: IO,
    size: u64,
    cluster_bits: u32,
    /// Where the next host cluster goes.
    next_host: u64,
    /// L2 table offsets by L1 index (0: none).
    l1: Vec<u64>,
    /// The L2 table being filled: its L1 index and host offsets by L2 index.
    current: Option<(usize, Vec<u64>)>,
    /// The first guest offset a write may start at (writes go in increasing order).
    written_to: u64,
    /// Guest data clusters written.
    data_clusters: u64,
}

impl<IO: BlockIo> SequentialWriter<IO> {
    /// Starts an image of `size` guest bytes with clusters of `1 << cluster_bits` bytes (9..=21)
    /// on `io`, which should be empty. Nothing is written until data comes.
    pub fn new(io: IO, size: u64, cluster_bits: u32) -> Result<Self> {
        if !(9..=21).contains(&cluster_bits) {
            return Err(Error::invalid(
                "cluster size must be between 512 bytes and 2 MiB",
            ));
        }
        if size > MAX_VIRTUAL_SIZE {
            return Err(Error::invalid(format!("virtual size {size} is too large")));
        }
        let entries = l2_entries(cluster_bits);
        let span = entries << cluster_bits;
        let l1_entries = size.div_ceil(span);
        if l1_entries * 8 > MAX_L1_BYTES {
            return Err(Error::invalid(
                "the L1 table would exceed 32 MiB; use a larger cluster size",
            ));
        }
        Ok(SequentialWriter {
            io,
            size,
            cluster_bits,
            next_host: 1 << cluster_bits,
            l1: vec![0; l1_entries as usize],
            current: None,
            written_to: 0,
            data_clusters: 0,
        })
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The guest size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Guest data clusters written so far.
    pub fn data_clusters(&self) -> u64 {
        self.data_clusters
    }

    /// Writes whole guest clusters: `data` goes to the guest at `guest` (cluster aligned), its
    /// length a multiple of the cluster size except for a last cluster that ends the disk.
    /// Calls must come in increasing guest order without overlapping; the data of one call is
    /// written with one write (L2 tables that fill up on the way are written in between).
    pub fn write(&mut self, guest: u64, data: &[u8]) -> Result<()> {
        let cs = self.cluster_size();
        let len = data.len() as u64;
        if guest % cs != 0 {
            return Err(Error::invalid(format!(
                "write at {guest} is not cluster aligned"
            )));
        }
        let end = guest
            .checked_add(len)
            .filter(|end| *end <= self.size)
            .ok_or_else(|| Error::invalid("write past the end of the disk"))?;
        if len % cs != 0 && end != self.size {
            return Err(Error::invalid(
                "writes must be whole clusters (except the disk's last one)",
            ));
        }
        if guest < self.written_to {
            return Err(Error::invalid("writes must come in increasing guest order"));
        }
        if len == 0 {
            return Ok(());
        }
        let clusters = len.div_ceil(cs);
        // Split where L2 tables end: a full table is written before the data that follows it,
        // so each call's data stays one contiguous host run per table.
        let span = l2_entries(self.cluster_bits) << self.cluster_bits;
        let mut done = 0u64;
        while done < clusters {
            let at = guest + done * cs;
            let in_table = (span - at % span) / cs;
            let n = in_table.min(clusters - done);
            self.enter_table((at / span) as usize)?;
            let host = self.next_host;
            let from = (done * cs) as usize;
            let to = ((done + n) * cs).min(len) as usize;
            let chunk = data
                .get(from..to)
                .ok_or_else(|| Error::invalid("write buffer range"))?;
            self.io.write_all_at(chunk, host)?;
            let first = ((at % span) / cs) as usize;
            if let Some((_, table)) = &mut self.current {
                for i in 0..n as usize {
                    if let Some(slot) = table.get_mut(first + i) {
                        *slot = host + i as u64 * cs;
                    }
                }
            }
            self.next_host += n * cs;
            self.data_clusters += n;
            done += n;
        }
        self.written_to = end;
        Ok(())
    }

    /// Makes the L2 table of L1 index `index` the current one, writing the previous one out.
    fn enter_table(&mut self, index: usize) -> Result<()> {
        if matches!(&self.current, Some((i, _)) if *i == index) {
            return Ok(());
        }
        self.flush_table()?;
        let entries = l2_entries(self.cluster_bits) as usize;
        self.current = Some((index, vec![0; entries]));
        Ok(())
    }

    /// Writes the current L2 table (if any) at the next host cluster.
    fn flush_table(&mut self) -> Result<()> {
        let Some((index, table)) = self.current.take() else {
            return Ok(());
        };
        let cs = self.cluster_size();
        let mut bytes = vec![0u8; cs as usize];
        for (slot, host) in bytes.chunks_exact_mut(8).zip(&table) {
            let raw = if *host == 0 { 0 } else { host | COPIED };
            slot.copy_from_slice(&raw.to_be_bytes());
        }
        let at = self.next_host;
        self.io.write_all_at(&bytes, at)?;
        self.next_host += cs;
        let slot = self
            .l1
            .get_mut(index)
            .ok_or_else(|| Error::invalid("L1 index out of range"))?;
        *slot = at;
        Ok(())
    }

    /// Writes the last L2 table, the L1 table, refcount blocks and table, flushes, writes the
    /// header and flushes again. Returns the I/O.
    pub fn finish(mut self) -> Result<IO> {
        self.flush_table()?;
        let cs = self.cluster_size();
        let l1_offset = self.next_host;
        let l1_clusters = (self.l1.len() as u64 * 8).div_ceil(cs);
        if l1_clusters > 0 {
            let mut bytes = vec![0u8; (l1_clusters * cs) as usize];
            for (slot, l2) in bytes.chunks_exact_mut(8).zip(&self.l1) {
                let raw = if *l2 == 0 { 0 } else { l2 | COPIED };
                slot.copy_from_slice(&raw.to_be_bytes());
            }
            self.io.write_all_at(&bytes, l1_offset)?;
        }
        let before_refcounts = l1_offset / cs + l1_clusters;
        let geo = RefcountGeometry {
            cluster_bits: self.cluster_bits,
            refcount_order: REFCOUNT_ORDER,
        };
        // Refcount blocks and table cover every cluster, themselves included.
        let (mut blocks, mut table) = (1u64, 1u64);
        loop {
            let total = before_refcounts + blocks + table;
            let need_blocks = total.div_ceil(geo.block_entries());
            let need_table = (need_blocks * 8).div_ceil(cs);
            if need_blocks == blocks && need_table == table {
                break;
            }
            blocks = need_blocks;
            table = need_table;
        }
        let total = before_refcounts + blocks + table;
        let blocks_at = before_refcounts * cs;
        let table_at = blocks_at + blocks * cs;
        let mut block_bytes = vec![0u8; (blocks * cs) as usize];
        for cluster in 0..total {
            let block = cluster / geo.block_entries();
            let entry = (cluster % geo.block_entries()) as usize;
            let start = (block * cs) as usize;
            if let Some(b) = block_bytes.get_mut(start..start + cs as usize) {
                geo.set(b, entry, 1)?;
            }
        }
        self.io.write_all_at(&block_bytes, blocks_at)?;
        let mut table_bytes = vec![0u8; (table * cs) as usize];
        for (i, slot) in table_bytes
            .chunks_exact_mut(8)
            .take(blocks as usize)
            .enumerate()
        {
            slot.copy_from_slice(&(blocks_at + i as u64 * cs).to_be_bytes());
        }
        self.io.write_all_at(&table_bytes, table_at)?;
        let header = Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: self.cluster_bits,
            size: self.size,
            crypt_method: 0,
            l1_size: u32::try_from(self.l1.len())
                .map_err(|_| Error::new(ErrorKind::Overflow, "L1 table too large"))?,
            l1_table_offset: if self.l1.is_empty() { 0 } else { l1_offset },
            refcount_table_offset: table_at,
            refcount_table_clusters: u32::try_from(table)
                .map_err(|_| Error::new(ErrorKind::Overflow, "refcount table too large"))?,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: REFCOUNT_ORDER,
            header_length: 112,
            compression_type: COMPRESSION_ZLIB,
            unknown_tail: vec![0; 7],
        };
        let hc = HeaderCluster {
            header,
            extensions: Vec::new(),
            backing_file: None,
        };
        let mut cluster0 = hc.encode()?;
        cluster0.resize(cs as usize, 0);
        self.io.flush()?;
        self.io.write_all_at(&cluster0, 0)?;
        self.io.flush()?;
        Ok(self.io)
    }
}

/// L2 entries per table (standard 8-byte entries).
fn l2_entries(cluster_bits: u32) -> u64 {
    (1u64 << cluster_bits) / 8
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{GuestRead, Qcow2Disk};
    use crate::image::Qcow2;
    use proptest::prelude::*;
    use snap_core::io::MemIo;

    /// Writes `runs` (guest cluster index, clusters, fill byte) with `bits`-sized clusters and
    /// checks the result: clean, and every cluster reads back as written (zero elsewhere).
    fn roundtrip(size: u64, bits: u32, runs: &[(u64, u64, u8)]) {
        let io = MemIo::new();
        let mut w = SequentialWriter::new(io.clone(), size, bits).unwrap();
        let cs = 1u64 << bits;
        let mut model = vec![0u8; size as usize];
        for &(first, count, byte) in runs {
            let at = first * cs;
            let len = (count * cs).min(size - at);
            let data = vec![byte; len as usize];
            w.write(at, &data).unwrap();
            model[at as usize..(at + len) as usize].fill(byte);
        }
        let written = w.data_clusters();
        w.finish().unwrap();
        let image = Qcow2::open(io.clone(), false).unwrap();
        let report = image.check().unwrap();
        assert!(report.is_clean(), "{:?}", report.messages);
        assert_eq!(image.virtual_size(), size);
        let disk = Qcow2Disk::new(image, None);
        let mut got = vec![0u8; size as usize];
        disk.read(0, &mut got).unwrap();
        assert!(got == model, "guest view differs");
        // Allocation: exactly the written clusters are data.
        let mut data = 0u64;
        let mut at = 0u64;
        while at < size {
            let e = disk.extent(at, size - at).unwrap();
            assert!(e.len > 0);
            if e.data {
                data += e.len;
            }
            at += e.len;
        }
        assert_eq!(
            data,
            runs.iter()
                .map(|r| (r.1 * cs).min(size - r.0 * cs))
                .sum::<u64>()
        );
        assert_eq!(
            written,
            runs.iter().map(|r| r.1).sum::<u64>(),
            "data clusters counted"
        );
    }

    #[test]
    fn empty_and_small_images() {
        roundtrip(0, 16, &[]);
        roundtrip(1 << 20, 16, &[]);
        roundtrip(1 << 20, 16, &[(0, 1, 0x11), (3, 2, 0x22), (15, 1, 0x33)]);
        // A partial last cluster.
        roundtrip((1 << 20) + 512, 16, &[(16, 1, 0x44)]);
    }

    #[test]
    fn crosses_l2_tables() {
        // 512-byte clusters: one L2 table covers 32 KiB.
        roundtrip(
            1 << 20,
            9,
            &[(0, 100, 0x55), (120, 300, 0x66), (2047, 1, 0x77)],
        );
    }

    #[test]
    fn refuses_bad_writes() {
        let mut w = SequentialWriter::new(MemIo::new(), 1 << 20, 16).unwrap();
        assert!(w.write(512, &[1; 65536]).is_err());
        assert!(w.write(0, &[1; 100]).is_err());
        w.write(65536, &[1; 65536]).unwrap();
        assert!(w.write(0, &[1; 65536]).is_err());
        assert!(w.write(1 << 20, &[1; 65536]).is_err());
        assert!(SequentialWriter::new(MemIo::new(), 1 << 20, 8).is_err());
        assert!(SequentialWriter::new(MemIo::new(), 1 << 50, 9).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn random_sparse_images(
            bits in 9u32..=16,
            clusters in 1u64..600,
            tail in 0u64..2,
            picks in proptest::collection::vec((0u64..600, 1u64..40, 1u8..255), 0..12),
        ) {
            let cs = 1u64 << bits;
            let size = clusters * cs - if tail == 1 && clusters > 1 { cs / 2 } else { 0 };
            let total = size.div_ceil(cs);
            let mut runs: Vec<(u64, u64, u8)> = Vec::new();
            let mut picks = picks;
            picks.sort();
            let mut next = 0u64;
            for (first, count, byte) in picks {
                let first = first.max(next);
                if first >= total {
                    break;
                }
                let count = count.min(total - first);
                runs.push((first, count, byte));
                next = first + count;
            }
            roundtrip(size, bits, &runs);
        }
    }
}
