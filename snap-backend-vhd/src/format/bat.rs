//! The block allocation table: one big-endian u32 per block, the sector offset of the block's
//! bitmap, or [`UNUSED`].

use snap_core::{Error, Result};

use super::{SECTOR, be32};

/// A BAT entry for a block that is not allocated.
pub const UNUSED: u32 = u32::MAX;
/// Largest BAT this crate reads (64 MiB, 16 M entries): 2 TiB in 128 KiB blocks.
pub const MAX_BAT_BYTES: u64 = 64 << 20;

/// Decodes `entries` BAT entries from `bytes`.
pub fn parse(bytes: &[u8], entries: usize) -> Result<Vec<u32>> {
    (0..entries)
        .map(|i| {
            be32(bytes, i * 4).ok_or_else(|| Error::corrupt("VHD BAT is shorter than its entries"))
        })
        .collect()
}

/// Encodes BAT entries (not padded).
pub fn encode(entries: &[u32]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_be_bytes()).collect()
}

/// Where blocks may lie in a file, for validating BAT entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLayout {
    /// Guest bytes per block.
    pub block_size: u64,
    /// Bytes of each block's bitmap (sector padded).
    pub bitmap_bytes: u64,
    /// Guest size of the disk.
    pub disk_size: u64,
    /// Where the trailing footer starts: no block may reach past it.
    pub end_of_data: u64,
    /// First byte after the fixed metadata (footer copy, header): no block may start before it.
    pub start_of_data: u64,
}

impl BlockLayout {
    /// Number of blocks the guest size needs.
    pub fn blocks(&self) -> u64 {
        self.disk_size.div_ceil(self.block_size)
    }

    /// Guest bytes of block `index` that lie inside the disk (the last block may be partial).
    pub fn used_bytes(&self, index: u64) -> u64 {
        let start = index.saturating_mul(self.block_size);
        self.disk_size.saturating_sub(start).min(self.block_size)
    }

    /// Checks that block `index` at BAT entry `entry` lies in the file's data area: after the
    /// fixed metadata and, bitmap and used data, before the trailing footer.
    pub fn check_entry(&self, index: u64, entry: u32) -> Result<()> {
        if entry == UNUSED {
            return Ok(());
        }
        let start = u64::from(entry) * SECTOR;
        let end = start + self.bitmap_bytes + self.used_bytes(index);
        if start < self.start_of_data || end > self.end_of_data {
            return Err(Error::corrupt(format!(
                "VHD BAT entry {index} points at {start:#x}..{end:#x}, outside the data area \
                 {:#x}..{:#x}",
                self.start_of_data, self.end_of_data
            ))
            .with_offset(start));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use snap_core::ErrorKind;

    #[test]
    fn parse_encode() {
        let bat = vec![UNUSED, 3, 0x1000];
        let bytes = encode(&bat);
        assert_eq!(parse(&bytes, 3).unwrap(), bat);
        assert!(parse(&bytes, 4).is_err());
    }

    #[test]
    fn entries_must_lie_in_data_area() {
        let layout = BlockLayout {
            block_size: 4096,
            bitmap_bytes: 512,
            disk_size: 3 * 4096 + 1024,
            end_of_data: 100 * 512,
            start_of_data: 3 * 512,
        };
        assert_eq!(layout.blocks(), 4);
        assert_eq!(layout.used_bytes(3), 1024);
        assert!(layout.check_entry(0, UNUSED).is_ok());
        assert!(layout.check_entry(0, 3).is_ok());
        assert_eq!(
            layout.check_entry(0, 2).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        // Block 0 needs 9 sectors: 91..100 fits, 92 does not.
        assert!(layout.check_entry(0, 91).is_ok());
        assert!(layout.check_entry(0, 92).is_err());
        // The partial last block needs 3 sectors.
        assert!(layout.check_entry(3, 97).is_ok());
        assert!(layout.check_entry(3, 98).is_err());
    }
}
