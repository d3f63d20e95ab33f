//! Writing a new dynamic VHD in one sequential pass (an export, a flattened copy).
//!
//! [`SequentialWriter`] takes guest data in increasing guest order. The layout is the one
//! [`crate::image::create`] makes — footer copy, dynamic header, BAT, then blocks, then the
//! footer — but blocks are appended as data reaches them, each written once: its data as it
//! comes (sectors never written stay holes in the file, reading as zeroes), its sector bitmap
//! when the data moves past it. [`SequentialWriter::finish`] writes the BAT, the header, the
//! trailing footer, flushes, and writes the footer copy at offset 0 last, so an interrupted
//! write never looks like a valid VHD at its start.
//!
//! Bitmap bits are set in whole bytes (8 sectors, 4 KiB) for every byte a write touched: every
//! reader agrees on them (libvhdi reads a partly set byte as all present), and sectors of such
//! a group that were not written read as zeroes from the file's holes, which is what a dynamic
//! disk with no data there reads too. Blocks never written stay unallocated.

use snap_core::{BlockIo, Error, ErrorKind, Result};

use crate::format::SECTOR;
use crate::format::bat::{self, UNUSED};
use crate::format::footer::{DiskType, MAX_DISK_SIZE};
use crate::format::header::{DEFAULT_BLOCK_SIZE, DynamicHeader, bitmap_bytes};
use crate::image::{HEADER_OFFSET, TABLE_OFFSET, new_footer};

/// Writes a dynamic VHD (no parent) sequentially; see the module docs.
#[derive(Debug)]
pub struct SequentialWriter<IO> {
    io: IO,
    size: u64,
    block_size: u64,
    bitmap_bytes: u64,
    unique_id: [u8; 16],
    timestamp: u32,
    bat: Vec<u32>,
    /// Where the next block goes.
    next: u64,
    /// The block being filled: its index, file offset and bitmap.
    current: Option<(u64, u64, Vec<u8>)>,
    /// The first guest offset a write may start at.
    written_to: u64,
}

impl<IO: BlockIo> SequentialWriter<IO> {
    /// Starts a dynamic VHD of `size` bytes (a positive multiple of 512, at most 2 TiB) with
    /// 2 MiB blocks on `io`, which should be empty. `unique_id` and `timestamp` go into the
    /// footer.
    pub fn new(io: IO, size: u64, unique_id: [u8; 16], timestamp: u32) -> Result<Self> {
        if size == 0 || size % SECTOR != 0 {
            return Err(Error::invalid(format!(
                "a VHD's size must be a positive multiple of 512 bytes, not {size}"
            )));
        }
        if size > MAX_DISK_SIZE {
            return Err(Error::unsupported(format!(
                "a VHD holds at most 2 TiB; this disk has {size} bytes"
            )));
        }
        let block_size = u64::from(DEFAULT_BLOCK_SIZE);
        let entries = size.div_ceil(block_size);
        let bat_bytes = (entries * 4).div_ceil(SECTOR) * SECTOR;
        Ok(SequentialWriter {
            io,
            size,
            block_size,
            bitmap_bytes: bitmap_bytes(DEFAULT_BLOCK_SIZE),
            unique_id,
            timestamp,
            bat: vec![UNUSED; usize::try_from(entries).unwrap_or(0)],
            next: TABLE_OFFSET + bat_bytes,
            current: None,
            written_to: 0,
        })
    }

    /// The guest size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Blocks allocated so far.
    pub fn blocks(&self) -> u64 {
        self.bat.iter().filter(|e| **e != UNUSED).count() as u64
    }

    /// Writes `data` at guest offset `guest` (both whole sectors). Calls must come in
    /// increasing guest order without overlapping.
    pub fn write(&mut self, guest: u64, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        if guest % SECTOR != 0 || len % SECTOR != 0 {
            return Err(Error::invalid("VHD writes must be whole sectors"));
        }
        let end = guest
            .checked_add(len)
            .filter(|end| *end <= self.size)
            .ok_or_else(|| Error::invalid("write past the end of the VHD"))?;
        if guest < self.written_to {
            return Err(Error::invalid("writes must come in increasing guest order"));
        }
        let mut at = guest;
        while at < end {
            let block = at / self.block_size;
            let block_start = block * self.block_size;
            let upto = end.min(block_start + self.block_size);
            let file_at = self.enter_block(block)?;
            let from = usize::try_from(at - guest).unwrap_or(usize::MAX);
            let to = usize::try_from(upto - guest).unwrap_or(usize::MAX);
            let chunk = data
                .get(from..to)
                .ok_or_else(|| Error::invalid("write buffer range"))?;
            self.io
                .write_all_at(chunk, file_at + self.bitmap_bytes + (at - block_start))?;
            if let Some((_, _, bitmap)) = &mut self.current {
                let first = (at - block_start) / SECTOR / 8;
                let last = (upto - block_start).div_ceil(SECTOR).div_ceil(8);
                for byte in first..last {
                    if let Some(b) = usize::try_from(byte).ok().and_then(|i| bitmap.get_mut(i)) {
                        *b = 0xff;
                    }
                }
            }
            at = upto;
        }
        self.written_to = end;
        Ok(())
    }

    /// Makes `block` the current block (allocating it at the end), writing the previous one's
    /// bitmap; returns its file offset.
    fn enter_block(&mut self, block: u64) -> Result<u64> {
        if let Some((index, at, _)) = &self.current
            && *index == block
        {
            return Ok(*at);
        }
        self.flush_block()?;
        let at = self.next;
        let sector = u32::try_from(at / SECTOR)
            .ok()
            .filter(|s| *s != UNUSED)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Overflow,
                    "the VHD would grow past the 2 TiB a BAT entry can address",
                )
            })?;
        let slot = usize::try_from(block)
            .ok()
            .and_then(|b| self.bat.get_mut(b))
            .ok_or_else(|| Error::invalid("block out of range"))?;
        *slot = sector;
        self.next += self.bitmap_bytes + self.block_size;
        let bitmap = vec![0u8; usize::try_from(self.bitmap_bytes).unwrap_or(0)];
        self.current = Some((block, at, bitmap));
        Ok(at)
    }

    fn flush_block(&mut self) -> Result<()> {
        if let Some((_, at, bitmap)) = self.current.take() {
            self.io.write_all_at(&bitmap, at)?;
        }
        Ok(())
    }

    /// Writes the last bitmap, the BAT, the header and the trailing footer, flushes, then the
    /// footer copy at offset 0, and flushes again. Returns the I/O.
    pub fn finish(mut self) -> Result<IO> {
        self.flush_block()?;
        let mut footer = new_footer(self.size, self.unique_id, self.timestamp);
        footer.disk_type = DiskType::Dynamic;
        footer.data_offset = HEADER_OFFSET;
        let entries =
            u32::try_from(self.bat.len()).map_err(|_| Error::invalid("too many VHD blocks"))?;
        let header = DynamicHeader::new(TABLE_OFFSET, entries, DEFAULT_BLOCK_SIZE);
        let mut table = bat::encode(&self.bat);
        let padded = (table.len() as u64).div_ceil(SECTOR) * SECTOR;
        table.resize(usize::try_from(padded).unwrap_or(0), 0xff);
        self.io.write_all_at(&table, TABLE_OFFSET)?;
        self.io.write_all_at(&header.encode(), HEADER_OFFSET)?;
        let bytes = footer.encode();
        self.io.write_all_at(&bytes, self.next)?;
        self.io.flush()?;
        self.io.write_all_at(&bytes, 0)?;
        self.io.flush()?;
        Ok(self.io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::{Chain, Layer};
    use crate::check::check;
    use crate::image::Vhd;
    use proptest::prelude::*;
    use snap_core::io::MemIo;

    fn roundtrip(size: u64, writes: &[(u64, u64, u8)]) {
        let io = MemIo::new();
        let mut w = SequentialWriter::new(io.clone(), size, [7; 16], 1234).unwrap();
        let mut model = vec![0u8; size as usize];
        for &(at, len, byte) in writes {
            w.write(at, &vec![byte; len as usize]).unwrap();
            model[at as usize..(at + len) as usize].fill(byte);
        }
        w.finish().unwrap();
        let vhd = Vhd::open(io.clone(), false).unwrap();
        assert_eq!(vhd.size(), size);
        assert_eq!(vhd.disk_type(), DiskType::Dynamic);
        let report = check(&vhd).unwrap();
        assert!(report.is_clean(), "{report:?}");
        let chain = Chain::new(vec![Layer::unlocked("x.vhd", vhd)]).unwrap();
        let mut got = vec![0u8; size as usize];
        chain.read(0, &mut got).unwrap();
        assert!(got == model, "guest view differs");
    }

    #[test]
    fn small_disks() {
        roundtrip(512, &[]);
        roundtrip(512, &[(0, 512, 1)]);
        roundtrip(
            8 << 20,
            &[
                (0, 65536, 0x11),
                (3 << 20, 4096, 0x22),
                ((8 << 20) - 512, 512, 3),
            ],
        );
        // A write across a block boundary.
        roundtrip(6 << 20, &[((2 << 20) - 4096, 8192, 0x44)]);
    }

    #[test]
    fn refuses_bad_input() {
        assert!(SequentialWriter::new(MemIo::new(), 0, [1; 16], 0).is_err());
        assert!(SequentialWriter::new(MemIo::new(), 1000, [1; 16], 0).is_err());
        assert!(SequentialWriter::new(MemIo::new(), 4 << 40, [1; 16], 0).is_err());
        let mut w = SequentialWriter::new(MemIo::new(), 1 << 20, [1; 16], 0).unwrap();
        assert!(w.write(100, &[0; 512]).is_err());
        w.write(4096, &[1; 512]).unwrap();
        assert!(w.write(0, &[1; 512]).is_err());
        assert!(w.write(1 << 20, &[1; 512]).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn random_sparse_disks(
            sectors in 1u64..(20 << 11),
            picks in proptest::collection::vec((0u64..(20 << 11), 1u64..300, 1u8..255), 0..10),
        ) {
            let mut picks = picks;
            picks.sort();
            let mut writes = Vec::new();
            let mut next = 0u64;
            for (first, count, byte) in picks {
                let first = first.max(next);
                if first >= sectors {
                    break;
                }
                let count = count.min(sectors - first);
                writes.push((first * SECTOR, count * SECTOR, byte));
                next = first + count;
            }
            roundtrip(sectors * SECTOR, &writes);
        }
    }
}
