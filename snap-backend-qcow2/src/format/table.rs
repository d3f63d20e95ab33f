//! L1 and L2 table entries, standard and extended, and compressed cluster descriptors.

use snap_core::{Error, Result};

/// L1/L2 bit 63: the cluster's refcount is exactly 1 (may be written in place).
pub const COPIED: u64 = 1 << 63;
/// L2 bit 62: the cluster is compressed.
pub const COMPRESSED: u64 = 1 << 62;
/// Standard L2 bit 0: the cluster reads as zeroes (v3, without extended L2).
pub const ZERO: u64 = 1;
/// Host offset bits 9..=55 of L1 entries and of standard L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved L1 bits: 0..=8 and 56..=62.
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;

/// An L1 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L1Entry(pub u64);

impl L1Entry {
    /// Offset of the L2 table, 0 when unallocated.
    pub fn l2_offset(self) -> u64 {
        self.0 & OFFSET_MASK
    }
    /// The COPIED flag.
    pub fn copied(self) -> bool {
        self.0 & COPIED != 0
    }
    /// An entry for `l2_offset` with COPIED set when `copied`.
    pub fn new(l2_offset: u64, copied: bool) -> L1Entry {
        L1Entry(l2_offset | if copied && l2_offset != 0 { COPIED } else { 0 })
    }
    /// Checks reserved bits and alignment for a cluster of `cluster_size` bytes.
    pub fn validate(self, cluster_size: u64) -> Result<()> {
        if self.0 & L1_RESERVED != 0 {
            return Err(Error::corrupt(format!(
                "L1 entry {:#x} has reserved bits set",
                self.0
            )));
        }
        if self.l2_offset() % cluster_size != 0 {
            return Err(Error::corrupt(format!(
                "L2 table offset {:#x} is not cluster aligned",
                self.l2_offset()
            )));
        }
        Ok(())
    }
}

/// The geometry needed to decode L2 entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2Geometry {
    /// log2 cluster size.
    pub cluster_bits: u32,
    /// Extended L2 entries (16 bytes, subcluster bitmaps).
    pub extended: bool,
}

/// What one guest cluster maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Not allocated here: read from the backing file (or zeroes without one).
    Unallocated,
    /// Reads as zeroes. `host` is a preallocated cluster that still holds a reference.
    Zero {
        /// A preallocated host cluster, if any.
        host: Option<u64>,
    },
    /// Data at `host` (cluster aligned).
    Normal {
        /// Host cluster offset.
        host: u64,
    },
    /// Extended L2: some subclusters allocated at `host`, some zero, some unallocated.
    Subclusters {
        /// Host cluster offset (0 when no subcluster is allocated).
        host: u64,
        /// Bit i: subcluster i is allocated at host + i * subcluster size.
        alloc: u32,
        /// Bit i: subcluster i reads as zeroes.
        zero: u32,
    },
    /// Compressed data starting at byte `offset`, stored in `sectors` 512-byte sectors counted
    /// from `offset & !511`.
    Compressed {
        /// Byte offset of the compressed stream.
        offset: u64,
        /// Number of 512-byte sectors it occupies (from `offset` rounded down to 512).
        sectors: u64,
    },
}

/// A decoded L2 entry: its mapping and COPIED flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2Entry {
    /// The raw 64-bit descriptor.
    pub raw: u64,
    /// The subcluster bitmap (extended L2 only; 0 otherwise).
    pub bitmap: u64,
}

impl L2Geometry {
    /// Bits of the compressed-descriptor offset field.
    fn compressed_offset_bits(self) -> u32 {
        62 - (self.cluster_bits - 8)
    }

    /// Decodes an entry into its mapping, rejecting reserved bits and misalignment.
    pub fn mapping(self, entry: L2Entry) -> Result<Mapping> {
        let raw = entry.raw;
        let cluster_size = 1u64 << self.cluster_bits;
        if raw & COMPRESSED != 0 {
            if raw & COPIED != 0 {
                return Err(Error::corrupt(format!(
                    "compressed L2 entry {raw:#x} has COPIED set"
                )));
            }
            if self.extended && entry.bitmap != 0 {
                return Err(Error::corrupt(
                    "compressed cluster with a non-zero subcluster bitmap",
                ));
            }
            let bits = self.compressed_offset_bits();
            let offset = raw & ((1u64 << bits) - 1);
            let sectors = ((raw >> bits) & ((1u64 << (self.cluster_bits - 8)) - 1)) + 1;
            return Ok(Mapping::Compressed { offset, sectors });
        }
        let host = raw & OFFSET_MASK;
        let reserved = raw & !(OFFSET_MASK | COPIED | if self.extended { 0 } else { ZERO });
        if reserved != 0 {
            return Err(Error::corrupt(format!(
                "L2 entry {raw:#x} has reserved bits set"
            )));
        }
        if host % cluster_size != 0 {
            return Err(Error::corrupt(format!(
                "data cluster offset {host:#x} is not cluster aligned"
            )));
        }
        if host == 0 && raw & COPIED != 0 {
            return Err(Error::corrupt(format!(
                "L2 entry {raw:#x} has COPIED set without a cluster"
            )));
        }
        if self.extended {
            let alloc = (entry.bitmap & 0xffff_ffff) as u32;
            let zero = (entry.bitmap >> 32) as u32;
            if alloc & zero != 0 {
                return Err(Error::corrupt("subcluster marked both allocated and zero"));
            }
            if alloc != 0 && host == 0 {
                return Err(Error::corrupt(
                    "allocated subclusters without a host cluster",
                ));
            }
            return Ok(match (host, alloc, zero) {
                (0, 0, 0) => Mapping::Unallocated,
                (0, 0, u32::MAX) => Mapping::Zero { host: None },
                (h, u32::MAX, 0) => Mapping::Normal { host: h },
                (h, a, z) => Mapping::Subclusters {
                    host: h,
                    alloc: a,
                    zero: z,
                },
            });
        }
        Ok(match (host, raw & ZERO != 0) {
            (0, false) => Mapping::Unallocated,
            (0, true) => Mapping::Zero { host: None },
            (h, true) => Mapping::Zero { host: Some(h) },
            (h, false) => Mapping::Normal { host: h },
        })
    }

    /// The host byte ranges an entry holds references on, as (first cluster offset, clusters).
    /// A compressed stream may straddle host clusters: each one it touches is referenced.
    pub fn referenced_clusters(self, mapping: Mapping) -> Option<(u64, u64)> {
        let cluster_size = 1u64 << self.cluster_bits;
        match mapping {
            Mapping::Unallocated | Mapping::Zero { host: None } => None,
            Mapping::Zero { host: Some(h) } | Mapping::Normal { host: h } => Some((h, 1)),
            Mapping::Subclusters { host, .. } => (host != 0).then_some((host, 1)),
            Mapping::Compressed { offset, sectors } => {
                let start = offset & !511;
                let end = start.saturating_add(sectors * 512);
                let first = start & !(cluster_size - 1);
                let last = (end - 1) & !(cluster_size - 1);
                Some((first, (last - first) / cluster_size + 1))
            }
        }
    }

    /// Whether a COPIED flag is meaningful for this mapping (compressed entries never carry it).
    pub fn may_be_copied(self, mapping: Mapping) -> bool {
        !matches!(
            mapping,
            Mapping::Compressed { .. } | Mapping::Unallocated | Mapping::Zero { host: None }
        ) && !matches!(mapping, Mapping::Subclusters { host: 0, .. })
    }

    /// Bytes per entry.
    pub fn entry_size(self) -> usize {
        if self.extended { 16 } else { 8 }
    }

    /// Reads entry `index` of an L2 table.
    pub fn entry(self, table: &[u8], index: usize) -> Option<L2Entry> {
        let at = index.checked_mul(self.entry_size())?;
        let raw = super::be64(table, at)?;
        let bitmap = if self.extended {
            super::be64(table, at + 8)?
        } else {
            0
        };
        Some(L2Entry { raw, bitmap })
    }

    /// Writes entry `index` of an L2 table.
    pub fn set_entry(self, table: &mut [u8], index: usize, entry: L2Entry) -> bool {
        let Some(at) = index.checked_mul(self.entry_size()) else {
            return false;
        };
        super::put_be64(table, at, entry.raw)
            && (!self.extended || super::put_be64(table, at + 8, entry.bitmap))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STD64K: L2Geometry = L2Geometry {
        cluster_bits: 16,
        extended: false,
    };
    const EXT64K: L2Geometry = L2Geometry {
        cluster_bits: 16,
        extended: true,
    };

    fn map(g: L2Geometry, raw: u64, bitmap: u64) -> Result<Mapping> {
        g.mapping(L2Entry { raw, bitmap })
    }

    #[test]
    fn standard_entries() {
        assert_eq!(map(STD64K, 0, 0).unwrap(), Mapping::Unallocated);
        assert_eq!(map(STD64K, 1, 0).unwrap(), Mapping::Zero { host: None });
        assert_eq!(
            map(STD64K, COPIED | 0x50000, 0).unwrap(),
            Mapping::Normal { host: 0x50000 }
        );
        assert_eq!(
            map(STD64K, 0x50001, 0).unwrap(),
            Mapping::Zero {
                host: Some(0x50000)
            }
        );
        assert!(map(STD64K, 0x50200, 0).is_err(), "misaligned");
        assert!(map(STD64K, 1 << 60, 0).is_err(), "reserved bit");
        assert!(map(STD64K, COPIED, 0).is_err(), "COPIED without a cluster");
    }

    #[test]
    fn compressed_descriptor_spans_clusters() {
        // 64 KiB clusters: offset field is 62 - 8 = 54 bits; sectors field above it.
        let offset = 0x2_fe00u64 + 0x100; // 256 bytes into the last sector of cluster 2
        let raw = COMPRESSED | (3u64 << 54) | offset; // 4 sectors
        let m = map(STD64K, raw, 0).unwrap();
        assert_eq!(m, Mapping::Compressed { offset, sectors: 4 });
        // bytes 0x2fe00..0x30600: clusters 2 and 3
        assert_eq!(STD64K.referenced_clusters(m), Some((0x20000, 2)));
        assert!(map(STD64K, raw | COPIED, 0).is_err());
        assert!(!STD64K.may_be_copied(m));
    }

    #[test]
    fn compressed_512b_clusters() {
        let g = L2Geometry {
            cluster_bits: 9,
            extended: false,
        };
        // offset bits = 62 - 1 = 61; one sector-count bit
        let raw = COMPRESSED | (1u64 << 61) | 0x1000;
        assert_eq!(
            map(g, raw, 0).unwrap(),
            Mapping::Compressed {
                offset: 0x1000,
                sectors: 2
            }
        );
        assert_eq!(
            g.referenced_clusters(map(g, raw, 0).unwrap()),
            Some((0x1000, 2))
        );
    }

    #[test]
    fn extended_entries() {
        assert_eq!(map(EXT64K, 0, 0).unwrap(), Mapping::Unallocated);
        assert_eq!(
            map(EXT64K, 0, 0xffff_ffff << 32).unwrap(),
            Mapping::Zero { host: None }
        );
        assert_eq!(
            map(EXT64K, 0x70000, 0xffff_ffff).unwrap(),
            Mapping::Normal { host: 0x70000 }
        );
        assert_eq!(
            map(EXT64K, 0x70000, 0x3 | (0x4 << 32)).unwrap(),
            Mapping::Subclusters {
                host: 0x70000,
                alloc: 3,
                zero: 4
            }
        );
        assert!(
            map(EXT64K, 0x70000, 1 | (1 << 32)).is_err(),
            "alloc and zero"
        );
        assert!(map(EXT64K, 0, 1).is_err(), "alloc without host");
        assert!(
            map(EXT64K, 1, 0).is_err(),
            "bit 0 is reserved with extended L2"
        );
    }

    #[test]
    fn table_access() {
        let mut t = vec![0u8; 64];
        assert!(EXT64K.set_entry(
            &mut t,
            1,
            L2Entry {
                raw: 0x10000,
                bitmap: 5
            }
        ));
        assert_eq!(
            EXT64K.entry(&t, 1),
            Some(L2Entry {
                raw: 0x10000,
                bitmap: 5
            })
        );
        assert_eq!(EXT64K.entry(&t, 4), None);
        assert!(!STD64K.set_entry(&mut t, 8, L2Entry { raw: 1, bitmap: 0 }));
        assert!(L1Entry(0x30000 | COPIED).validate(65536).is_ok());
        assert!(L1Entry(0x30001).validate(65536).is_err());
        assert!(L1Entry(0x30200).validate(65536).is_err());
    }
}
