//! One open VHD file: validated metadata, sector-level reads and writes, block allocation and
//! the parent link (reparent / make dynamic).
//!
//! # Write order (the crash-safety invariant)
//! A crash at any point leaves the old or the new content of every sector, and never a BAT
//! entry pointing at unwritten space:
//! 1. growing the file (new blocks, new locator data) first writes the footer at the new end and
//!    flushes, so the file always ends with a valid footer, and the space between the old and
//!    the new end belongs to nobody;
//! 2. then the new blocks' bitmaps and data (or locator data) are written and flushed;
//! 3. only then do the BAT entries (4 bytes each, inside one sector) or the header (one aligned
//!    1024-byte write inside the first 4 KiB page) start pointing at them, and are flushed.
//!
//! Data written into an already allocated block goes to its sectors first and the bitmap bits
//! are set after a flush, so a sector is never marked present before its data is there. A crash
//! after step 1 or 2 leaves only unreferenced space (a leak `check` reports, never corruption).
//! The footer's content never changes on a guest write, so the copy at offset 0 stays equal.

use snap_core::{BlockIo, Error, ErrorKind, Result};

use crate::format::bat::{self, BlockLayout, MAX_BAT_BYTES, UNUSED};
use crate::format::footer::{DiskType, FOOTER_LEN, Footer, NO_DATA_OFFSET};
use crate::format::header::{
    DEFAULT_BLOCK_SIZE, DynamicHeader, HEADER_LEN, LOCATOR_COUNT, LocatorEntry, PlatformCode,
};
use crate::format::locator::MAX_LOCATOR_BYTES;
use crate::format::{SECTOR, bitmap_get, bitmap_set, sectors_for};

/// Where the BAT of a disk this crate creates starts (after the footer copy and the header).
pub const TABLE_OFFSET: u64 = (FOOTER_LEN + HEADER_LEN) as u64;
/// Offset of the dynamic header in disks this crate creates.
pub const HEADER_OFFSET: u64 = FOOTER_LEN as u64;
/// Largest run of bytes moved in one buffer by copy loops (bounds memory).
const COPY_CHUNK: u64 = 4 << 20;

/// A run of guest sectors and where one layer keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectorRun {
    /// First guest sector.
    pub sector: u64,
    /// Number of sectors.
    pub count: u64,
    /// File offset of the first sector's data when the layer has them; `None` when absent
    /// (read from the parent, or zero without one).
    pub file_offset: Option<u64>,
}

/// A parent to link a differencing disk to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentLink {
    /// The parent's footer unique id.
    pub unique_id: [u8; 16],
    /// The parent's timestamp to record.
    pub timestamp: u32,
    /// The parent's file name for the header's unicode name field.
    pub name: String,
    /// Locator entries to write: platform code and encoded data.
    pub locators: Vec<(PlatformCode, Vec<u8>)>,
}

/// An open VHD (fixed, dynamic or differencing) on any [`BlockIo`].
#[derive(Debug)]
pub struct Vhd<IO> {
    io: IO,
    footer: Footer,
    header: Option<DynamicHeader>,
    bat: Vec<u32>,
    /// Where the trailing footer is; new blocks go here.
    footer_offset: u64,
    /// The trailing footer was unusable and the copy at offset 0 is in use.
    footer_from_copy: bool,
    /// Both footers are valid but differ (an interrupted type change or relink leaves this; the
    /// end one is used).
    footer_copy_stale: bool,
    /// Things worth telling the user that did not stop the open.
    notes: Vec<String>,
    writable: bool,
}

impl<IO: BlockIo> Vhd<IO> {
    /// Opens and validates a VHD: footer (the trailing one, or the copy at 0 when the trailing
    /// one is damaged, with a note), dynamic header, BAT (bounded by the file size; every entry
    /// inside the data area). Nothing is written.
    pub fn open(io: IO, writable: bool) -> Result<Self> {
        let len = io.len()?;
        if len < FOOTER_LEN as u64 {
            return Err(Error::corrupt(format!(
                "file of {len} bytes is too small for a VHD footer"
            )));
        }
        let footer_offset = len - FOOTER_LEN as u64;
        let mut end = [0u8; FOOTER_LEN];
        io.read_exact_at(&mut end, footer_offset)?;
        let mut notes = Vec::new();
        let mut footer_from_copy = false;
        let mut footer_copy_stale = false;
        let footer = match Footer::parse(&end) {
            Ok(footer) => {
                if footer.disk_type.is_sparse() {
                    let mut copy = [0u8; FOOTER_LEN];
                    io.read_exact_at(&mut copy, 0)?;
                    if copy != end {
                        footer_copy_stale = true;
                        notes.push(
                            "the footer copy at offset 0 differs from the footer at the end \
                             (the end copy is used)"
                                .to_string(),
                        );
                    }
                }
                footer
            }
            Err(end_err) => {
                let mut copy = [0u8; FOOTER_LEN];
                io.read_exact_at(&mut copy, 0)?;
                match Footer::parse(&copy) {
                    Ok(footer) if footer.disk_type.is_sparse() => {
                        notes.push(format!(
                            "the footer at the end of the file is unusable ({}); using the copy \
                             at offset 0 (the image is read-only until repaired)",
                            end_err.message()
                        ));
                        footer_from_copy = true;
                        footer
                    }
                    _ => return Err(end_err.with_offset(footer_offset)),
                }
            }
        };
        if writable && footer_from_copy {
            return Err(Error::corrupt(format!(
                "{}; refusing to write",
                notes.last().map(String::as_str).unwrap_or_default()
            )));
        }
        // New blocks and locator data go where the footer is, and BAT entries and locators
        // address whole sectors: a footer off a sector boundary would make them point next to
        // the data written.
        if writable && footer_offset % SECTOR != 0 {
            return Err(Error::corrupt(format!(
                "file length {len} is not a multiple of 512 (truncated or appended to?); \
                 refusing to write"
            )));
        }
        let mut vhd = Vhd {
            io,
            footer,
            header: None,
            bat: Vec::new(),
            footer_offset,
            footer_from_copy,
            footer_copy_stale,
            notes,
            writable,
        };
        match vhd.footer.disk_type {
            DiskType::Fixed => {
                if vhd.footer.current_size > footer_offset {
                    return Err(Error::corrupt(format!(
                        "fixed VHD of {} bytes is truncated (file holds {footer_offset})",
                        vhd.footer.current_size
                    )));
                }
            }
            DiskType::Dynamic | DiskType::Differencing => vhd.load_sparse()?,
        }
        Ok(vhd)
    }

    fn load_sparse(&mut self) -> Result<()> {
        let data_offset = self.footer.data_offset;
        let header_end = data_offset
            .checked_add(HEADER_LEN as u64)
            .filter(|end| data_offset >= FOOTER_LEN as u64 && *end <= self.footer_offset)
            .ok_or_else(|| {
                Error::corrupt(format!(
                    "VHD dynamic header offset {data_offset:#x} is outside the file"
                ))
            })?;
        let mut bytes = [0u8; HEADER_LEN];
        self.io.read_exact_at(&mut bytes, data_offset)?;
        let header = DynamicHeader::parse(&bytes).map_err(|e| e.with_offset(data_offset))?;
        let bat_bytes = u64::from(header.max_table_entries) * 4;
        if bat_bytes > MAX_BAT_BYTES {
            return Err(Error::unsupported(format!(
                "VHD BAT of {} entries is larger than {MAX_BAT_BYTES} bytes",
                header.max_table_entries
            )));
        }
        let table_offset = header.table_offset;
        let bat_end = table_offset
            .checked_add(bat_bytes)
            .filter(|end| table_offset >= FOOTER_LEN as u64 && *end <= self.footer_offset)
            .ok_or_else(|| {
                Error::corrupt(format!(
                    "VHD BAT at {table_offset:#x} with {} entries runs past the end of the file",
                    header.max_table_entries
                ))
                .with_offset(table_offset)
            })?;
        let layout = BlockLayout {
            block_size: u64::from(header.block_size),
            bitmap_bytes: header.bitmap_bytes(),
            disk_size: self.footer.current_size,
            end_of_data: self.footer_offset,
            start_of_data: header_end.max(bat_end).max(FOOTER_LEN as u64),
        };
        let blocks = layout.blocks();
        if blocks > u64::from(header.max_table_entries) {
            return Err(Error::corrupt(format!(
                "VHD of {} bytes needs {blocks} blocks but its BAT has room for {}",
                self.footer.current_size, header.max_table_entries
            )));
        }
        let entries = usize::try_from(header.max_table_entries)
            .map_err(|_| Error::unsupported("VHD BAT too large for this machine"))?;
        let mut raw = vec![0u8; entries * 4];
        self.io.read_exact_at(&mut raw, table_offset)?;
        let table = bat::parse(&raw, entries)?;
        for (index, entry) in (0..blocks).zip(table.iter()) {
            layout.check_entry(index, *entry)?;
        }
        if self.footer.disk_type == DiskType::Differencing && header.parent_unique_id == [0; 16] {
            return Err(Error::corrupt(
                "differencing VHD records no parent unique id",
            ));
        }
        self.bat = table;
        self.header = Some(header);
        Ok(())
    }

    /// The footer in use.
    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    /// The dynamic header (`None` for fixed disks).
    pub fn header(&self) -> Option<&DynamicHeader> {
        self.header.as_ref()
    }

    /// The BAT (empty for fixed disks).
    pub fn bat(&self) -> &[u32] {
        &self.bat
    }

    /// The disk type.
    pub fn disk_type(&self) -> DiskType {
        self.footer.disk_type
    }

    /// Guest-visible size in bytes.
    pub fn size(&self) -> u64 {
        self.footer.current_size
    }

    /// Where the trailing footer is (the end of the data area).
    pub fn footer_offset(&self) -> u64 {
        self.footer_offset
    }

    /// Whether the copy at offset 0 had to be used.
    pub fn footer_from_copy(&self) -> bool {
        self.footer_from_copy
    }

    /// Whether the footer copy at offset 0 differs from the (valid, used) footer at the end: the
    /// state an interrupted type change or relink leaves (which
    /// [`repair_footer_copy`](Vhd::repair_footer_copy) ends). Not a corruption.
    pub fn footer_copy_stale(&self) -> bool {
        self.footer_copy_stale
    }

    /// Notes from opening (footer fallback, differing copies).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// The underlying I/O.
    pub fn io(&self) -> &IO {
        &self.io
    }

    /// Gives the I/O back.
    pub fn into_io(self) -> IO {
        self.io
    }

    fn sparse(&self) -> Result<&DynamicHeader> {
        self.header
            .as_ref()
            .ok_or_else(|| Error::unsupported("fixed VHDs have no blocks"))
    }

    fn block_size(&self) -> u64 {
        self.header
            .as_ref()
            .map(|h| u64::from(h.block_size))
            .unwrap_or(u64::from(DEFAULT_BLOCK_SIZE))
    }

    fn sectors_per_block(&self) -> u64 {
        self.block_size() / SECTOR
    }

    fn bat_entry(&self, block: u64) -> u32 {
        usize::try_from(block)
            .ok()
            .and_then(|b| self.bat.get(b))
            .copied()
            .unwrap_or(UNUSED)
    }

    /// Reads the sector bitmap of an allocated block.
    pub fn read_bitmap(&self, block: u64) -> Result<Option<Vec<u8>>> {
        let header = self.sparse()?;
        let entry = self.bat_entry(block);
        if entry == UNUSED {
            return Ok(None);
        }
        let mut bitmap = vec![0u8; usize::try_from(header.bitmap_bytes()).unwrap_or(0)];
        self.io
            .read_exact_at(&mut bitmap, u64::from(entry) * SECTOR)?;
        Ok(Some(bitmap))
    }

    /// Splits guest sectors `sector..sector + count` (clamped to the disk) into runs this layer
    /// has (with their file offsets) and runs it does not.
    pub fn sector_runs(&self, sector: u64, count: u64) -> Result<Vec<SectorRun>> {
        let total = self.size() / SECTOR;
        let end = sector.saturating_add(count).min(total);
        let mut runs: Vec<SectorRun> = Vec::new();
        let mut push = |s: u64, n: u64, off: Option<u64>| match runs.last_mut() {
            Some(last)
                if last.sector + last.count == s
                    && match (last.file_offset, off) {
                        (None, None) => true,
                        (Some(a), Some(b)) => a + last.count * SECTOR == b,
                        _ => false,
                    } =>
            {
                last.count += n;
            }
            _ => runs.push(SectorRun {
                sector: s,
                count: n,
                file_offset: off,
            }),
        };
        if self.disk_type() == DiskType::Fixed {
            if sector < end {
                runs.push(SectorRun {
                    sector,
                    count: end - sector,
                    file_offset: Some(sector * SECTOR),
                });
            }
            return Ok(runs);
        }
        let spb = self.sectors_per_block();
        let bitmap_bytes = self.sparse()?.bitmap_bytes();
        let mut s = sector;
        while s < end {
            let block = s / spb;
            let block_end = ((block + 1) * spb).min(end);
            match self.read_bitmap(block)? {
                None => push(s, block_end - s, None),
                Some(bitmap) => {
                    let data = u64::from(self.bat_entry(block)) * SECTOR + bitmap_bytes;
                    for x in s..block_end {
                        let within = x - block * spb;
                        let off = bitmap_get(&bitmap, within).then_some(data + within * SECTOR);
                        push(x, 1, off);
                    }
                }
            }
            s = block_end;
        }
        Ok(runs)
    }

    /// Writes whole guest sectors starting at `sector` into this layer (allocating blocks as
    /// needed) and marks them present, in the crash-safe order described in the module docs.
    pub fn write_sectors(&mut self, sector: u64, data: &[u8]) -> Result<()> {
        if !self.writable {
            return Err(Error::new(ErrorKind::InvalidInput, "VHD opened read-only"));
        }
        let len = data.len() as u64;
        if len % SECTOR != 0 {
            return Err(Error::invalid("VHD writes must be whole sectors"));
        }
        let count = len / SECTOR;
        let end_byte = sector
            .checked_add(count)
            .and_then(|s| s.checked_mul(SECTOR))
            .filter(|end| *end <= self.size())
            .ok_or_else(|| Error::invalid("write past the end of the VHD"))?;
        let _ = end_byte;
        if count == 0 {
            return Ok(());
        }
        if self.disk_type() == DiskType::Fixed {
            self.io.write_all_at(data, sector * SECTOR)?;
            return self.io.flush();
        }
        let header = self.sparse()?.clone();
        let spb = self.sectors_per_block();
        let bitmap_bytes = header.bitmap_bytes();
        let block_bytes = bitmap_bytes + u64::from(header.block_size);
        let first_block = sector / spb;
        let last_block = (sector + count - 1) / spb;

        // Step 1: room for every unallocated block touched, at the end; footer moved first.
        let mut new_blocks: Vec<(u64, u64)> = Vec::new();
        let mut next = self.footer_offset;
        for block in first_block..=last_block {
            if self.bat_entry(block) == UNUSED {
                new_blocks.push((block, next));
                next += block_bytes;
            }
        }
        if !new_blocks.is_empty() {
            if next / SECTOR > u64::from(u32::MAX - 1) {
                return Err(Error::new(
                    ErrorKind::Overflow,
                    "VHD would grow past the 2 TiB a 32-bit BAT sector offset can address",
                ));
            }
            self.io.write_all_at(&self.footer.encode(), next)?;
            self.io.flush()?;
        }

        // Step 2: data (and bitmaps of new blocks), then flush.
        let mut bitmap_updates: Vec<(u64, Vec<u8>)> = Vec::new();
        for block in first_block..=last_block {
            let block_first = block * spb;
            let from = sector.max(block_first);
            let to = (sector + count).min(block_first + spb);
            let src_start = usize::try_from((from - sector) * SECTOR).unwrap_or(usize::MAX);
            let src_end = usize::try_from((to - sector) * SECTOR).unwrap_or(usize::MAX);
            let chunk = data
                .get(src_start..src_end)
                .ok_or_else(|| Error::invalid("write buffer range"))?;
            let new_at = new_blocks
                .iter()
                .find(|(b, _)| *b == block)
                .map(|(_, at)| *at);
            let (block_at, mut bitmap) = match new_at {
                Some(at) => (at, vec![0u8; usize::try_from(bitmap_bytes).unwrap_or(0)]),
                None => {
                    let at = u64::from(self.bat_entry(block)) * SECTOR;
                    let bitmap = self.read_bitmap(block)?.unwrap_or_default();
                    (at, bitmap)
                }
            };
            self.io.write_all_at(
                chunk,
                block_at + bitmap_bytes + (from - block_first) * SECTOR,
            )?;
            let mut changed = new_at.is_some();
            for s in from..to {
                if !bitmap_get(&bitmap, s - block_first) {
                    bitmap_set(&mut bitmap, s - block_first);
                    changed = true;
                }
            }
            if new_at.is_some() {
                self.io.write_all_at(&bitmap, block_at)?;
            } else if changed {
                bitmap_updates.push((block_at, bitmap));
            }
        }
        self.io.flush()?;

        // Step 3: bitmap bits of existing blocks and BAT entries of new ones, then flush.
        for (at, bitmap) in &bitmap_updates {
            self.io.write_all_at(bitmap, *at)?;
        }
        for (block, at) in &new_blocks {
            let entry = u32::try_from(at / SECTOR)
                .map_err(|_| Error::new(ErrorKind::Overflow, "block offset beyond 2 TiB"))?;
            self.io
                .write_all_at(&entry.to_be_bytes(), header.table_offset + block * 4)?;
            if let Some(slot) = usize::try_from(*block)
                .ok()
                .and_then(|b| self.bat.get_mut(b))
            {
                *slot = entry;
            }
        }
        if !(bitmap_updates.is_empty() && new_blocks.is_empty()) {
            self.io.flush()?;
        }
        self.footer_offset = next;
        Ok(())
    }

    /// Reads this layer's data for `file_offset..` into `buf` (a present run).
    pub fn read_run(&self, file_offset: u64, buf: &mut [u8]) -> Result<()> {
        self.io.read_exact_at(buf, file_offset)
    }

    /// Reads the data of locator `entry` (bounded; it must lie before the trailing footer).
    pub fn read_locator(&self, entry: &LocatorEntry) -> Result<Vec<u8>> {
        let space = entry
            .space_bytes()
            .ok_or_else(|| Error::corrupt("VHD parent locator has an invalid data space"))?;
        let length = u64::from(entry.data_length);
        if length == 0 || entry.data_length > MAX_LOCATOR_BYTES || length > space.max(length) {
            return Err(Error::corrupt(format!(
                "VHD parent locator length {} is invalid",
                entry.data_length
            )));
        }
        let end = entry
            .data_offset
            .checked_add(length)
            .filter(|end| entry.data_offset >= FOOTER_LEN as u64 && *end <= self.footer_offset)
            .ok_or_else(|| {
                Error::corrupt(format!(
                    "VHD parent locator at {:#x} lies outside the file",
                    entry.data_offset
                ))
            })?;
        let _ = end;
        let mut data = vec![0u8; usize::try_from(length).unwrap_or(0)];
        self.io.read_exact_at(&mut data, entry.data_offset)?;
        Ok(data)
    }

    /// Links this differencing (or dynamic) disk to a new parent: new locator data is written
    /// to fresh space at the end (never over the old locators the current header still names),
    /// then the header switches in one 1024-byte write. Becomes a differencing disk.
    pub fn set_parent(&mut self, parent: &ParentLink) -> Result<()> {
        let mut header = self.sparse()?.clone();
        if parent.locators.len() > LOCATOR_COUNT {
            return Err(Error::invalid("more than 8 parent locators"));
        }
        header.set_parent_name(&parent.name)?;
        header.parent_unique_id = parent.unique_id;
        header.parent_timestamp = parent.timestamp;
        header.locators = [LocatorEntry::EMPTY; LOCATOR_COUNT];
        let mut at = self.footer_offset;
        let mut writes = Vec::new();
        for (slot, (platform, data)) in header.locators.iter_mut().zip(&parent.locators) {
            let space = sectors_for(data.len() as u64).unwrap_or(1).max(1) * SECTOR;
            *slot = LocatorEntry {
                platform: *platform,
                // Bytes, as Windows and vhd-util write it (readers accept sectors or bytes).
                data_space: u32::try_from(space)
                    .map_err(|_| Error::invalid("parent locator too long"))?,
                data_length: u32::try_from(data.len())
                    .map_err(|_| Error::invalid("parent locator too long"))?,
                reserved: 0,
                data_offset: at,
            };
            let mut padded = data.clone();
            padded.resize(usize::try_from(space).unwrap_or(0), 0);
            writes.push((at, padded));
            at += space;
        }
        let mut footer = self.footer.clone();
        footer.disk_type = DiskType::Differencing;
        // 1: footer at the new end (as a differencing disk only once the header says so: the
        // type changes in step 3 through the copy rewrite when it was dynamic).
        if at != self.footer_offset {
            self.io.write_all_at(&self.footer.encode(), at)?;
            self.io.flush()?;
        }
        // 2: locator data.
        for (offset, data) in &writes {
            self.io.write_all_at(data, *offset)?;
        }
        self.io.flush()?;
        // 3: the header switch (one write), then the footer type if it changes.
        self.io
            .write_all_at(&header.encode(), self.footer.data_offset)?;
        self.io.flush()?;
        self.footer_offset = at;
        self.header = Some(header);
        if self.footer.disk_type != DiskType::Differencing {
            self.rewrite_footer(footer)?;
        }
        Ok(())
    }

    /// Turns this disk into a dynamic disk with no parent: the footer at the end first (one
    /// sector), then its copy at 0, then the header's parent fields are cleared.
    pub fn make_dynamic(&mut self) -> Result<()> {
        let mut header = self.sparse()?.clone();
        let mut footer = self.footer.clone();
        footer.disk_type = DiskType::Dynamic;
        self.rewrite_footer(footer)?;
        header.parent_unique_id = [0; 16];
        header.parent_timestamp = 0;
        header.parent_name = [0; crate::format::header::PARENT_NAME_LEN];
        header.locators = [LocatorEntry::EMPTY; LOCATOR_COUNT];
        self.io
            .write_all_at(&header.encode(), self.footer.data_offset)?;
        self.io.flush()?;
        self.header = Some(header);
        Ok(())
    }

    fn rewrite_footer(&mut self, footer: Footer) -> Result<()> {
        let bytes = footer.encode();
        self.io.write_all_at(&bytes, self.footer_offset)?;
        self.io.flush()?;
        self.io.write_all_at(&bytes, 0)?;
        self.io.flush()?;
        self.footer = footer;
        Ok(())
    }

    /// Rewrites the footer copy at offset 0 from the trailing footer when they differ (the end
    /// copy is authoritative; an interrupted type change leaves them different).
    pub fn repair_footer_copy(&mut self) -> Result<bool> {
        if !self.writable || !self.footer.disk_type.is_sparse() {
            return Ok(false);
        }
        let mut copy = [0u8; FOOTER_LEN];
        self.io.read_exact_at(&mut copy, 0)?;
        let end = self.footer.encode();
        if copy == end {
            return Ok(false);
        }
        self.io.write_all_at(&end, 0)?;
        self.io.flush()?;
        self.footer_copy_stale = false;
        Ok(true)
    }
}

/// Creates a dynamic (no parent) or differencing (with `parent`) disk on an empty `io`: footer
/// copy, header, BAT, locator data, footer; flushed.
pub fn create<IO: BlockIo>(
    io: IO,
    footer: Footer,
    block_size: u32,
    parent: Option<&ParentLink>,
) -> Result<Vhd<IO>> {
    if footer.current_size % SECTOR != 0 || footer.current_size == 0 {
        return Err(Error::invalid(format!(
            "VHD size {} must be a positive multiple of 512",
            footer.current_size
        )));
    }
    if footer.current_size > crate::format::footer::MAX_DISK_SIZE {
        return Err(Error::invalid("VHD size above 2 TiB"));
    }
    if !block_size.is_power_of_two()
        || !(crate::format::header::MIN_BLOCK_SIZE..=crate::format::header::MAX_BLOCK_SIZE)
            .contains(&block_size)
    {
        return Err(Error::invalid(format!("VHD block size {block_size}")));
    }
    let entries = footer.current_size.div_ceil(u64::from(block_size));
    let max_entries = u32::try_from(entries).map_err(|_| Error::invalid("too many VHD blocks"))?;
    let bat_bytes = sectors_for(entries * 4).unwrap_or(1).max(1) * SECTOR;
    let mut footer = footer;
    footer.data_offset = HEADER_OFFSET;
    // Dynamic until the header names the parent (set_parent switches the type after it).
    footer.disk_type = DiskType::Dynamic;
    let header = DynamicHeader::new(TABLE_OFFSET, max_entries, block_size);
    let mut bat_area = bat::encode(&vec![UNUSED; usize::try_from(entries).unwrap_or(0)]);
    bat_area.resize(usize::try_from(bat_bytes).unwrap_or(0), 0xff);
    io.set_len(0)?;
    io.write_all_at(&footer.encode(), 0)?;
    io.write_all_at(&header.encode(), HEADER_OFFSET)?;
    io.write_all_at(&bat_area, TABLE_OFFSET)?;
    let end = TABLE_OFFSET + bat_bytes;
    io.write_all_at(&footer.encode(), end)?;
    io.flush()?;
    let mut vhd = Vhd::open(io, true)?;
    if let Some(parent) = parent {
        vhd.set_parent(parent)?;
    }
    Ok(vhd)
}

/// A footer for a new disk, with this crate's creator fields.
pub fn new_footer(size: u64, unique_id: [u8; 16], timestamp: u32) -> Footer {
    Footer::new(
        DiskType::Dynamic,
        size,
        unique_id,
        timestamp,
        NO_DATA_OFFSET,
    )
}

/// Copies `COPY_CHUNK`-bounded pieces: the size of a buffer for `bytes` bytes.
pub(crate) fn chunk_len(bytes: u64) -> usize {
    usize::try_from(bytes.min(COPY_CHUNK)).unwrap_or(0)
}
