//! The 512-byte hard disk footer: at the end of every VHD, and copied at offset 0 of dynamic and
//! differencing disks.

use snap_core::{Error, Result};

use super::{SECTOR, VHD_EPOCH_UNIX, array, be16, be32, be64, checksum, put};

/// Length of the footer.
pub const FOOTER_LEN: usize = 512;
/// The cookie that starts every footer.
pub const COOKIE: &[u8; 8] = b"conectix";
/// Feature bit that must always be set ("reserved").
pub const FEATURE_RESERVED: u32 = 0x2;
/// The only file format version there is (1.0).
pub const FORMAT_VERSION: u32 = 0x0001_0000;
/// Data offset of a fixed disk (no dynamic header).
pub const NO_DATA_OFFSET: u64 = u64::MAX;
/// "Wi2k": creator host OS Windows.
pub const HOST_OS_WINDOWS: u32 = 0x5769_326B;
/// Largest disk size the format allows (65535 * 16 * 255 sectors, about 127 GiB of CHS; VHD
/// itself tops out at 2040 GiB): sizes above 2 TiB are refused.
pub const MAX_DISK_SIZE: u64 = 2 << 40;

/// Creator application this crate writes: blktap's "tap\0".
///
/// QEMU decides how big a VHD is from this field: for unknown creators (and "vpc ", "qemu") it
/// uses the CHS geometry, which rounds most sizes down; for "tap\0", "win ", "qem2"... it uses
/// the current size, like Hyper-V, blktap and libvhdi do. Our sizes are exact (never rounded to
/// CHS) and our layout is blktap's, so we write blktap's id to make every reader agree on the size.
pub const CREATOR_APP: [u8; 4] = *b"tap\0";
/// Creator version written with [`CREATOR_APP`]. Not 0.1: vhd-util decodes the parent name of
/// "tap" 0.1 images differently.
pub const CREATOR_VERSION: u32 = 0x0001_0000;

/// Field offsets inside the footer.
pub mod field {
    /// Features (u32).
    pub const FEATURES: usize = 8;
    /// File format version (u32).
    pub const VERSION: usize = 12;
    /// Offset of the dynamic header (u64).
    pub const DATA_OFFSET: usize = 16;
    /// Timestamp (u32).
    pub const TIMESTAMP: usize = 24;
    /// Creator application (4 bytes).
    pub const CREATOR_APP: usize = 28;
    /// Creator version (u32).
    pub const CREATOR_VERSION: usize = 32;
    /// Creator host OS (u32).
    pub const CREATOR_OS: usize = 36;
    /// Original size (u64).
    pub const ORIGINAL_SIZE: usize = 40;
    /// Current size (u64).
    pub const CURRENT_SIZE: usize = 48;
    /// Geometry: cylinders u16, heads u8, sectors per track u8.
    pub const GEOMETRY: usize = 56;
    /// Disk type (u32).
    pub const DISK_TYPE: usize = 60;
    /// Checksum (u32).
    pub const CHECKSUM: usize = 64;
    /// Unique id (16 bytes).
    pub const UNIQUE_ID: usize = 68;
    /// Saved state (u8).
    pub const SAVED_STATE: usize = 84;
    /// Reserved bytes (427).
    pub const RESERVED: usize = 85;
}

/// The kind of VHD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiskType {
    /// Type 2: the data is the file, followed by the footer.
    Fixed,
    /// Type 3: sparse, blocks allocated on write.
    Dynamic,
    /// Type 4: sparse, sectors not present read from the parent.
    Differencing,
}

impl DiskType {
    /// The on-disk code.
    pub fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }

    /// Decodes an on-disk code.
    pub fn from_code(code: u32) -> Result<Self> {
        match code {
            2 => Ok(DiskType::Fixed),
            3 => Ok(DiskType::Dynamic),
            4 => Ok(DiskType::Differencing),
            other => Err(Error::unsupported(format!(
                "VHD disk type {other} is not fixed (2), dynamic (3) or differencing (4)"
            ))),
        }
    }

    /// "fixed", "dynamic" or "differencing".
    pub fn as_str(self) -> &'static str {
        match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        }
    }

    /// Dynamic and differencing disks have a header, a BAT and a footer copy at 0.
    pub fn is_sparse(self) -> bool {
        !matches!(self, DiskType::Fixed)
    }
}

/// CHS geometry as the footer records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Cylinders.
    pub cylinders: u16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors_per_track: u8,
}

impl Geometry {
    /// The geometry for a disk of `size` bytes, by the algorithm in the VHD specification
    /// (appendix "CHS calculation").
    pub fn for_size(size: u64) -> Geometry {
        let mut total = size / SECTOR;
        total = total.min(65535 * 16 * 255);
        let (spt, heads, cyl_times_heads);
        if total >= 65535 * 16 * 63 {
            spt = 255u64;
            heads = 16u64;
            cyl_times_heads = total / spt;
        } else {
            let mut s = 17u64;
            let mut cth = total / s;
            let mut h = cth.div_ceil(1024).max(4);
            if cth >= h * 1024 || h > 16 {
                s = 31;
                h = 16;
                cth = total / s;
            }
            if cth >= h * 1024 {
                s = 63;
                h = 16;
                cth = total / s;
            }
            spt = s;
            heads = h;
            cyl_times_heads = cth;
        }
        Geometry {
            cylinders: u16::try_from(cyl_times_heads / heads).unwrap_or(u16::MAX),
            heads: u8::try_from(heads).unwrap_or(u8::MAX),
            sectors_per_track: u8::try_from(spt).unwrap_or(u8::MAX),
        }
    }
}

/// A decoded footer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// Feature bits (bit 1 always set; bit 0 "temporary").
    pub features: u32,
    /// File format version (0x00010000).
    pub version: u32,
    /// Offset of the dynamic header; [`NO_DATA_OFFSET`] for fixed disks.
    pub data_offset: u64,
    /// Creation time, seconds since 2000-01-01 UTC.
    pub timestamp: u32,
    /// Creator application, e.g. "qemu", "tap\0", "win ".
    pub creator_app: [u8; 4],
    /// Creator version.
    pub creator_version: u32,
    /// Creator host OS ("Wi2k", "Mac ").
    pub creator_os: u32,
    /// Size at creation, bytes.
    pub original_size: u64,
    /// Guest-visible size, bytes.
    pub current_size: u64,
    /// CHS geometry.
    pub geometry: Geometry,
    /// Fixed, dynamic or differencing.
    pub disk_type: DiskType,
    /// The disk's identity; a differencing child records its parent's.
    pub unique_id: [u8; 16],
    /// Whether the disk is in a saved state.
    pub saved_state: u8,
    /// The 427 reserved bytes, kept verbatim so a rewrite changes only what we mean to change.
    pub reserved: Vec<u8>,
}

impl Footer {
    /// A footer for a new disk of `size` bytes (a multiple of 512).
    pub fn new(
        disk_type: DiskType,
        size: u64,
        unique_id: [u8; 16],
        timestamp: u32,
        data_offset: u64,
    ) -> Footer {
        Footer {
            features: FEATURE_RESERVED,
            version: FORMAT_VERSION,
            data_offset,
            timestamp,
            creator_app: CREATOR_APP,
            creator_version: CREATOR_VERSION,
            creator_os: HOST_OS_WINDOWS,
            original_size: size,
            current_size: size,
            geometry: Geometry::for_size(size),
            disk_type,
            unique_id,
            saved_state: 0,
            reserved: vec![0; FOOTER_LEN - field::RESERVED],
        }
    }

    /// Parses a footer: cookie, checksum, version, disk type and size are validated.
    ///
    /// Errors: [`snap_core::ErrorKind::Corrupt`] for a wrong cookie, checksum or size;
    /// [`snap_core::ErrorKind::Unsupported`] for another format version or disk type.
    pub fn parse(bytes: &[u8]) -> Result<Footer> {
        let bytes = bytes
            .get(..FOOTER_LEN)
            .ok_or_else(|| Error::corrupt("VHD footer is shorter than 512 bytes"))?;
        if bytes.get(..8) != Some(COOKIE.as_slice()) {
            return Err(Error::corrupt(
                "no VHD footer (cookie \"conectix\" missing)",
            ));
        }
        let stored = be32(bytes, field::CHECKSUM).unwrap_or_default();
        let computed = checksum(bytes, field::CHECKSUM);
        if stored != computed {
            return Err(Error::corrupt(format!(
                "VHD footer checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            )));
        }
        let field32 = |at| be32(bytes, at).unwrap_or_default();
        let field64 = |at| be64(bytes, at).unwrap_or_default();
        let version = field32(field::VERSION);
        if version >> 16 != 1 {
            return Err(Error::unsupported(format!(
                "VHD file format version {version:#010x} is not 1.x"
            )));
        }
        let disk_type = DiskType::from_code(field32(field::DISK_TYPE))?;
        let current_size = field64(field::CURRENT_SIZE);
        if current_size % SECTOR != 0 {
            return Err(Error::corrupt(format!(
                "VHD size {current_size} is not a multiple of 512"
            )));
        }
        if current_size > MAX_DISK_SIZE {
            return Err(Error::unsupported(format!(
                "VHD size {current_size} is larger than 2 TiB"
            )));
        }
        Ok(Footer {
            features: field32(field::FEATURES),
            version,
            data_offset: field64(field::DATA_OFFSET),
            timestamp: field32(field::TIMESTAMP),
            creator_app: array(bytes, field::CREATOR_APP).unwrap_or_default(),
            creator_version: field32(field::CREATOR_VERSION),
            creator_os: field32(field::CREATOR_OS),
            original_size: field64(field::ORIGINAL_SIZE),
            current_size,
            geometry: Geometry {
                cylinders: be16(bytes, field::GEOMETRY).unwrap_or_default(),
                heads: bytes.get(field::GEOMETRY + 2).copied().unwrap_or_default(),
                sectors_per_track: bytes.get(field::GEOMETRY + 3).copied().unwrap_or_default(),
            },
            disk_type,
            unique_id: array(bytes, field::UNIQUE_ID).unwrap_or_default(),
            saved_state: bytes.get(field::SAVED_STATE).copied().unwrap_or_default(),
            reserved: bytes.get(field::RESERVED..).unwrap_or_default().to_vec(),
        })
    }

    /// Encodes the footer with a fresh checksum.
    pub fn encode(&self) -> [u8; FOOTER_LEN] {
        let mut out = [0u8; FOOTER_LEN];
        put(&mut out, 0, COOKIE);
        put(&mut out, field::FEATURES, &self.features.to_be_bytes());
        put(&mut out, field::VERSION, &self.version.to_be_bytes());
        put(
            &mut out,
            field::DATA_OFFSET,
            &self.data_offset.to_be_bytes(),
        );
        put(&mut out, field::TIMESTAMP, &self.timestamp.to_be_bytes());
        put(&mut out, field::CREATOR_APP, &self.creator_app);
        put(
            &mut out,
            field::CREATOR_VERSION,
            &self.creator_version.to_be_bytes(),
        );
        put(&mut out, field::CREATOR_OS, &self.creator_os.to_be_bytes());
        put(
            &mut out,
            field::ORIGINAL_SIZE,
            &self.original_size.to_be_bytes(),
        );
        put(
            &mut out,
            field::CURRENT_SIZE,
            &self.current_size.to_be_bytes(),
        );
        put(
            &mut out,
            field::GEOMETRY,
            &self.geometry.cylinders.to_be_bytes(),
        );
        put(&mut out, field::GEOMETRY + 2, &[self.geometry.heads]);
        put(
            &mut out,
            field::GEOMETRY + 3,
            &[self.geometry.sectors_per_track],
        );
        put(
            &mut out,
            field::DISK_TYPE,
            &self.disk_type.code().to_be_bytes(),
        );
        put(&mut out, field::UNIQUE_ID, &self.unique_id);
        put(&mut out, field::SAVED_STATE, &[self.saved_state]);
        let reserved_len = FOOTER_LEN - field::RESERVED;
        let reserved = self.reserved.get(..reserved_len).unwrap_or_default();
        put(&mut out, field::RESERVED, reserved);
        let sum = checksum(&out, field::CHECKSUM);
        put(&mut out, field::CHECKSUM, &sum.to_be_bytes());
        out
    }
}

/// The current time as a VHD timestamp (seconds since 2000-01-01 UTC, saturating).
pub fn vhd_time_now() -> u32 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    vhd_time_from_unix(unix)
}

/// Converts Unix seconds to a VHD timestamp (saturating at both ends).
pub fn vhd_time_from_unix(unix: u64) -> u32 {
    u32::try_from(unix.saturating_sub(VHD_EPOCH_UNIX)).unwrap_or(u32::MAX)
}

/// Converts a VHD timestamp to Unix seconds.
pub fn vhd_time_to_unix(timestamp: u32) -> u64 {
    u64::from(timestamp) + VHD_EPOCH_UNIX
}

#[cfg(test)]
mod tests {
    use super::*;
    use snap_core::ErrorKind;

    fn sample() -> Footer {
        Footer::new(DiskType::Dynamic, 64 << 20, [7; 16], 1234, 512)
    }

    #[test]
    fn roundtrip_and_checksum() {
        let f = sample();
        let bytes = f.encode();
        assert_eq!(&bytes[..8], b"conectix");
        assert_eq!(Footer::parse(&bytes).unwrap(), f);
        // Checksum is the one's complement of the byte sum without the field.
        let sum: u32 = bytes
            .iter()
            .enumerate()
            .filter(|(i, _)| !(64..68).contains(i))
            .map(|(_, b)| u32::from(*b))
            .sum();
        assert_eq!(be32(&bytes, 64).unwrap(), !sum);
    }

    #[test]
    fn rejects_bad_checksum_cookie_type_and_size() {
        let mut bytes = sample().encode();
        bytes[100] ^= 1;
        assert_eq!(
            Footer::parse(&bytes).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        let mut bytes = sample().encode();
        bytes[0] = b'x';
        assert_eq!(
            Footer::parse(&bytes).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        let mut f = sample();
        f.current_size = 1000;
        assert_eq!(
            Footer::parse(&f.encode()).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        let mut bytes = sample().encode();
        put(&mut bytes, field::DISK_TYPE, &9u32.to_be_bytes());
        let sum = checksum(&bytes, field::CHECKSUM);
        put(&mut bytes, field::CHECKSUM, &sum.to_be_bytes());
        assert_eq!(
            Footer::parse(&bytes).unwrap_err().kind(),
            ErrorKind::Unsupported
        );
        assert!(Footer::parse(&bytes[..100]).is_err());
    }

    #[test]
    fn geometry_matches_spec_examples() {
        // qemu-img create -f vpc 64M records 963/8/17.
        assert_eq!(
            Geometry::for_size(64 << 20),
            Geometry {
                cylinders: 963,
                heads: 8,
                sectors_per_track: 17
            }
        );
        let big = Geometry::for_size(1 << 40);
        assert_eq!((big.heads, big.sectors_per_track), (16, 255));
    }

    #[test]
    fn time_conversions() {
        assert_eq!(vhd_time_from_unix(VHD_EPOCH_UNIX + 5), 5);
        assert_eq!(vhd_time_from_unix(0), 0);
        assert_eq!(vhd_time_to_unix(5), VHD_EPOCH_UNIX + 5);
    }
}
