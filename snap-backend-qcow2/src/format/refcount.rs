//! Refcount table entries and refcount blocks of every width (1 to 64 bits).
//!
//! Widths below 8 bits pack entries into bytes least-significant bits first, as QEMU does;
//! 8 bits and above are big-endian integers.

use snap_core::{Error, Result};

/// Reserved low bits of a refcount table entry.
pub const REFTABLE_RESERVED: u64 = 0x1ff;

/// The geometry of refcount blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefcountGeometry {
    /// log2 cluster size.
    pub cluster_bits: u32,
    /// log2 refcount width in bits (0..=6).
    pub refcount_order: u32,
}

impl RefcountGeometry {
    /// Refcount width in bits.
    pub fn bits(self) -> u32 {
        1 << self.refcount_order
    }
    /// The largest refcount a block entry can hold.
    pub fn max_refcount(self) -> u64 {
        if self.bits() == 64 {
            u64::MAX
        } else {
            (1u64 << self.bits()) - 1
        }
    }
    /// log2 of entries per refcount block.
    pub fn block_entries_bits(self) -> u32 {
        self.cluster_bits + 3 - self.refcount_order
    }
    /// Entries per refcount block.
    pub fn block_entries(self) -> u64 {
        1u64 << self.block_entries_bits()
    }

    /// Reads refcount `index` of `block`.
    pub fn get(self, block: &[u8], index: usize) -> Option<u64> {
        // Fast paths for the byte-aligned widths (16 bits is QEMU's default).
        match self.refcount_order {
            3 => return block.get(index).map(|b| *b as u64),
            4 => {
                let at = index.checked_mul(2)?;
                return block
                    .get(at..at + 2)
                    .and_then(|b| <[u8; 2]>::try_from(b).ok())
                    .map(|b| u16::from_be_bytes(b) as u64);
            }
            _ => {}
        }
        let bits = self.bits() as usize;
        if bits < 8 {
            let per_byte = 8 / bits;
            let byte = *block.get(index / per_byte)?;
            let shift = (index % per_byte) * bits;
            return Some(((byte >> shift) as u64) & ((1u64 << bits) - 1));
        }
        let width = bits / 8;
        let at = index.checked_mul(width)?;
        let b = block.get(at..at + width)?;
        Some(b.iter().fold(0u64, |acc, x| (acc << 8) | *x as u64))
    }

    /// Writes refcount `index` of `block`; fails when `value` does not fit the width.
    pub fn set(self, block: &mut [u8], index: usize, value: u64) -> Result<()> {
        if value > self.max_refcount() {
            return Err(Error::new(
                snap_core::ErrorKind::Overflow,
                format!("refcount {value} does not fit in {} bits", self.bits()),
            ));
        }
        let out_of_range = || Error::corrupt("refcount index out of block");
        if self.refcount_order == 4 {
            let at = index.checked_mul(2).ok_or_else(out_of_range)?;
            let dst = block.get_mut(at..at + 2).ok_or_else(out_of_range)?;
            dst.copy_from_slice(&(value as u16).to_be_bytes());
            return Ok(());
        }
        let bits = self.bits() as usize;
        if bits < 8 {
            let per_byte = 8 / bits;
            let byte = block.get_mut(index / per_byte).ok_or_else(out_of_range)?;
            let shift = (index % per_byte) * bits;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            *byte = (*byte & !mask) | (((value as u8) << shift) & mask);
            return Ok(());
        }
        let width = bits / 8;
        let at = index.checked_mul(width).ok_or_else(out_of_range)?;
        let dst = block.get_mut(at..at + width).ok_or_else(out_of_range)?;
        let bytes = value.to_be_bytes();
        dst.copy_from_slice(bytes.get(8 - width..).unwrap_or_default());
        Ok(())
    }
}

/// Decodes a refcount table entry into a refcount block offset (0 = none).
pub fn reftable_entry(raw: u64, cluster_size: u64) -> Result<u64> {
    if raw & REFTABLE_RESERVED != 0 {
        return Err(Error::corrupt(format!(
            "refcount table entry {raw:#x} has reserved bits set"
        )));
    }
    if raw % cluster_size != 0 {
        return Err(Error::corrupt(format!(
            "refcount block offset {raw:#x} is not cluster aligned"
        )));
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_layouts() {
        let g1 = RefcountGeometry {
            cluster_bits: 9,
            refcount_order: 0,
        };
        let mut b = vec![0u8; 512];
        g1.set(&mut b, 0, 1).unwrap();
        g1.set(&mut b, 9, 1).unwrap();
        assert_eq!(b[0], 0b0000_0001);
        assert_eq!(b[1], 0b0000_0010);
        assert!(g1.set(&mut b, 3, 2).is_err());
        let g4 = RefcountGeometry {
            cluster_bits: 9,
            refcount_order: 2,
        };
        let mut b = vec![0u8; 512];
        g4.set(&mut b, 1, 0xa).unwrap();
        assert_eq!(b[0], 0xa0);
        let g16 = RefcountGeometry {
            cluster_bits: 16,
            refcount_order: 4,
        };
        let mut b = vec![0u8; 65536];
        g16.set(&mut b, 2, 0x1234).unwrap();
        assert_eq!(&b[4..6], &[0x12, 0x34]);
        assert_eq!(g16.block_entries(), 32768);
        let g64 = RefcountGeometry {
            cluster_bits: 16,
            refcount_order: 6,
        };
        assert_eq!(g64.max_refcount(), u64::MAX);
        assert_eq!(g64.get(&b, 100_000), None);
    }

    proptest! {
        #[test]
        fn set_get_roundtrip_without_touching_neighbours(order in 0u32..=6, index in 0usize..4096, value: u64, noise: Vec<u8>) {
            let g = RefcountGeometry { cluster_bits: 12, refcount_order: order };
            let mut block = vec![0u8; 4096];
            for (i, n) in noise.iter().enumerate().take(4096) { block[i] = *n; }
            let index = index % g.block_entries() as usize;
            let before = block.clone();
            let value = value & g.max_refcount();
            g.set(&mut block, index, value).unwrap();
            prop_assert_eq!(g.get(&block, index), Some(value));
            for other in [index.wrapping_sub(1), index + 1] {
                if other < g.block_entries() as usize {
                    prop_assert_eq!(g.get(&block, other), g.get(&before, other));
                }
            }
        }
    }
}
