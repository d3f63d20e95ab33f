//! The VHD on-disk format: footer, dynamic header (with parent locators), BAT and sector bitmaps,
//! each parsed from and encoded to bytes by one definition, big-endian, with ranges checked.
//! Nothing in here does I/O, so all of it is testable from byte arrays and fuzzable.
//!
//! Layout of a dynamic or differencing disk as this crate writes it (QEMU and vhd-util agree):
//! ```text
//! 0      footer copy (512)
//! 512    dynamic header (1024)
//! 1536   BAT: max_table_entries u32 sector offsets, padded to 512
//! ...    parent locator data (differencing), each padded to 512
//! ...    blocks: sector bitmap (padded to 512) + block_size data bytes
//! end    footer (512)
//! ```

pub mod bat;
pub mod footer;
pub mod header;
pub mod locator;

/// Bytes per sector (VHD sectors are always 512 bytes).
pub const SECTOR: u64 = 512;

/// Seconds between the Unix epoch and the VHD epoch (2000-01-01 00:00:00 UTC).
pub const VHD_EPOCH_UNIX: u64 = 946_684_800;

pub(crate) use snap_core::bytes::{array, be16, be32, be64, put};

/// The VHD checksum: the one's complement of the sum of all bytes, with the 4-byte checksum field
/// at `checksum_at` counted as zero.
pub fn checksum(bytes: &[u8], checksum_at: usize) -> u32 {
    let field = checksum_at..checksum_at.saturating_add(4);
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !field.contains(i))
        .fold(0u32, |sum, (_, b)| sum.wrapping_add(u32::from(*b)));
    !sum
}

/// Rounds `bytes` up to whole sectors, or `None` on overflow.
pub fn sectors_for(bytes: u64) -> Option<u64> {
    Some(bytes.checked_add(SECTOR - 1)? / SECTOR)
}

/// Whether sector `index` is marked present in a VHD sector bitmap (most significant bit first:
/// sector 0 is bit 7 of byte 0). Out-of-range sectors read as absent.
pub fn bitmap_get(bitmap: &[u8], index: u64) -> bool {
    usize::try_from(index / 8)
        .ok()
        .and_then(|byte| bitmap.get(byte))
        .is_some_and(|b| b & (0x80 >> (index % 8)) != 0)
}

/// Marks sector `index` present in a sector bitmap; returns false when out of range.
pub fn bitmap_set(bitmap: &mut [u8], index: u64) -> bool {
    match usize::try_from(index / 8)
        .ok()
        .and_then(|byte| bitmap.get_mut(byte))
    {
        Some(b) => {
            *b |= 0x80 >> (index % 8);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_is_msb_first() {
        let mut bm = [0u8; 2];
        assert!(bitmap_set(&mut bm, 0));
        assert!(bitmap_set(&mut bm, 9));
        assert_eq!(bm, [0x80, 0x40]);
        assert!(bitmap_get(&bm, 0) && bitmap_get(&bm, 9));
        assert!(!bitmap_get(&bm, 1) && !bitmap_get(&bm, 100));
        assert!(!bitmap_set(&mut bm, 16));
    }

    #[test]
    fn checksum_skips_its_field() {
        let bytes = [1u8, 2, 0xff, 0xff, 0xff, 0xff, 3];
        assert_eq!(checksum(&bytes, 2), !6u32);
    }
}
