//! The 1024-byte dynamic disk header ("cxsparse") with its 8 parent locator entries.

use snap_core::{Error, Result};

use super::{SECTOR, array, be32, be64, checksum, put};

/// Length of the dynamic header.
pub const HEADER_LEN: usize = 1024;
/// The cookie that starts the dynamic header.
pub const COOKIE: &[u8; 8] = b"cxsparse";
/// Header version 1.0.
pub const HEADER_VERSION: u32 = 0x0001_0000;
/// Default block size (2 MiB), as QEMU, vhd-util and Windows use.
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;
/// Smallest block size accepted (one bitmap byte's worth of sectors).
pub const MIN_BLOCK_SIZE: u32 = 4096;
/// Largest block size accepted (256 MiB).
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Number of parent locator entries.
pub const LOCATOR_COUNT: usize = 8;
/// Length of the parent unicode name field (UTF-16 BE).
pub const PARENT_NAME_LEN: usize = 512;

/// Field offsets inside the header.
pub mod field {
    /// Data offset (u64, 0xFFFFFFFFFFFFFFFF).
    pub const DATA_OFFSET: usize = 8;
    /// BAT offset (u64).
    pub const TABLE_OFFSET: usize = 16;
    /// Header version (u32).
    pub const VERSION: usize = 24;
    /// Max table entries (u32).
    pub const MAX_TABLE_ENTRIES: usize = 28;
    /// Block size (u32).
    pub const BLOCK_SIZE: usize = 32;
    /// Checksum (u32).
    pub const CHECKSUM: usize = 36;
    /// Parent unique id (16 bytes).
    pub const PARENT_UNIQUE_ID: usize = 40;
    /// Parent timestamp (u32).
    pub const PARENT_TIMESTAMP: usize = 56;
    /// Parent unicode name (512 bytes, UTF-16 BE).
    pub const PARENT_NAME: usize = 64;
    /// First of 8 parent locator entries (24 bytes each).
    pub const LOCATORS: usize = 576;
    /// Length of one locator entry.
    pub const LOCATOR_LEN: usize = 24;
}

/// Platform code of a parent locator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PlatformCode {
    /// Unused entry (0).
    None,
    /// "W2ru": relative Windows path, UTF-16 LE.
    W2ru,
    /// "W2ku": absolute Windows path, UTF-16 LE.
    W2ku,
    /// "Wi2r": deprecated relative path.
    Wi2r,
    /// "Wi2k": deprecated absolute path.
    Wi2k,
    /// "Mac ": Mac OS alias blob.
    Mac,
    /// "MacX": file URL, UTF-8.
    MacX,
    /// Anything else, kept verbatim.
    Other(u32),
}

impl PlatformCode {
    /// Decodes the on-disk value.
    pub fn from_code(code: u32) -> PlatformCode {
        match &code.to_be_bytes() {
            [0, 0, 0, 0] => PlatformCode::None,
            b"W2ru" => PlatformCode::W2ru,
            b"W2ku" => PlatformCode::W2ku,
            b"Wi2r" => PlatformCode::Wi2r,
            b"Wi2k" => PlatformCode::Wi2k,
            b"Mac " => PlatformCode::Mac,
            b"MacX" => PlatformCode::MacX,
            _ => PlatformCode::Other(code),
        }
    }

    /// The on-disk value.
    pub fn code(self) -> u32 {
        let four = |b: &[u8; 4]| u32::from_be_bytes(*b);
        match self {
            PlatformCode::None => 0,
            PlatformCode::W2ru => four(b"W2ru"),
            PlatformCode::W2ku => four(b"W2ku"),
            PlatformCode::Wi2r => four(b"Wi2r"),
            PlatformCode::Wi2k => four(b"Wi2k"),
            PlatformCode::Mac => four(b"Mac "),
            PlatformCode::MacX => four(b"MacX"),
            PlatformCode::Other(code) => code,
        }
    }
}

/// One parent locator entry: where in the file a platform-specific parent path is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocatorEntry {
    /// Platform code.
    pub platform: PlatformCode,
    /// Space reserved for the data: in sectors per the spec, in bytes as Windows and vhd-util
    /// write it (see [`LocatorEntry::space_bytes`]).
    pub data_space: u32,
    /// Length of the data in bytes.
    pub data_length: u32,
    /// Reserved (should be 0).
    pub reserved: u32,
    /// Absolute file offset of the data.
    pub data_offset: u64,
}

impl LocatorEntry {
    /// An unused entry.
    pub const EMPTY: LocatorEntry = LocatorEntry {
        platform: PlatformCode::None,
        data_space: 0,
        data_length: 0,
        reserved: 0,
        data_offset: 0,
    };

    /// The reserved space in bytes, read as vhd-util does: values below 512 are sectors, other
    /// multiples of 512 are bytes; anything else is `None` (invalid).
    pub fn space_bytes(&self) -> Option<u64> {
        let space = u64::from(self.data_space);
        if space < SECTOR {
            Some(space * SECTOR)
        } else if space % SECTOR == 0 {
            Some(space)
        } else {
            None
        }
    }
}

/// A decoded dynamic disk header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicHeader {
    /// Next structure (unused, 0xFFFFFFFFFFFFFFFF).
    pub data_offset: u64,
    /// Absolute offset of the BAT.
    pub table_offset: u64,
    /// Header version (0x00010000).
    pub version: u32,
    /// Entries the BAT has room for.
    pub max_table_entries: u32,
    /// Bytes of guest data per block (a power of two).
    pub block_size: u32,
    /// The parent's unique id (differencing disks).
    pub parent_unique_id: [u8; 16],
    /// The parent's timestamp as recorded at link time (differencing disks).
    pub parent_timestamp: u32,
    /// The parent's file name, UTF-16 BE, NUL-padded (differencing disks).
    pub parent_name: [u8; PARENT_NAME_LEN],
    /// The 8 parent locator entries.
    pub locators: [LocatorEntry; LOCATOR_COUNT],
    /// Reserved bytes 4 at 60 and 256 at 768, kept verbatim.
    pub reserved1: u32,
    /// Reserved tail (256 bytes), kept verbatim.
    pub reserved2: Vec<u8>,
}

impl DynamicHeader {
    /// A header for a new disk with no parent.
    pub fn new(table_offset: u64, max_table_entries: u32, block_size: u32) -> DynamicHeader {
        DynamicHeader {
            data_offset: u64::MAX,
            table_offset,
            version: HEADER_VERSION,
            max_table_entries,
            block_size,
            parent_unique_id: [0; 16],
            parent_timestamp: 0,
            parent_name: [0; PARENT_NAME_LEN],
            locators: [LocatorEntry::EMPTY; LOCATOR_COUNT],
            reserved1: 0,
            reserved2: vec![0; HEADER_LEN - 768],
        }
    }

    /// Parses a header: cookie, checksum, version and block size are validated (table bounds
    /// need the file size and are checked by the image).
    pub fn parse(bytes: &[u8]) -> Result<DynamicHeader> {
        let bytes = bytes
            .get(..HEADER_LEN)
            .ok_or_else(|| Error::corrupt("VHD dynamic header is shorter than 1024 bytes"))?;
        if bytes.get(..8) != Some(COOKIE.as_slice()) {
            return Err(Error::corrupt(
                "VHD dynamic header cookie \"cxsparse\" missing",
            ));
        }
        let stored = be32(bytes, field::CHECKSUM).unwrap_or_default();
        let computed = checksum(bytes, field::CHECKSUM);
        if stored != computed {
            return Err(Error::corrupt(format!(
                "VHD dynamic header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            )));
        }
        let field32 = |at| be32(bytes, at).unwrap_or_default();
        let version = field32(field::VERSION);
        if version >> 16 != 1 {
            return Err(Error::unsupported(format!(
                "VHD dynamic header version {version:#010x} is not 1.x"
            )));
        }
        let block_size = field32(field::BLOCK_SIZE);
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(Error::unsupported(format!(
                "VHD block size {block_size} is not a power of two between 4 KiB and 256 MiB"
            )));
        }
        let mut locators = [LocatorEntry::EMPTY; LOCATOR_COUNT];
        for (i, entry) in locators.iter_mut().enumerate() {
            let at = field::LOCATORS + i * field::LOCATOR_LEN;
            *entry = LocatorEntry {
                platform: PlatformCode::from_code(field32(at)),
                data_space: field32(at + 4),
                data_length: field32(at + 8),
                reserved: field32(at + 12),
                data_offset: be64(bytes, at + 16).unwrap_or_default(),
            };
        }
        Ok(DynamicHeader {
            data_offset: be64(bytes, field::DATA_OFFSET).unwrap_or_default(),
            table_offset: be64(bytes, field::TABLE_OFFSET).unwrap_or_default(),
            version,
            max_table_entries: field32(field::MAX_TABLE_ENTRIES),
            block_size,
            parent_unique_id: array(bytes, field::PARENT_UNIQUE_ID).unwrap_or_default(),
            parent_timestamp: field32(field::PARENT_TIMESTAMP),
            parent_name: array(bytes, field::PARENT_NAME).unwrap_or([0; PARENT_NAME_LEN]),
            locators,
            reserved1: field32(60),
            reserved2: bytes.get(768..).unwrap_or_default().to_vec(),
        })
    }

    /// Encodes the header with a fresh checksum.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        put(&mut out, 0, COOKIE);
        put(
            &mut out,
            field::DATA_OFFSET,
            &self.data_offset.to_be_bytes(),
        );
        put(
            &mut out,
            field::TABLE_OFFSET,
            &self.table_offset.to_be_bytes(),
        );
        put(&mut out, field::VERSION, &self.version.to_be_bytes());
        put(
            &mut out,
            field::MAX_TABLE_ENTRIES,
            &self.max_table_entries.to_be_bytes(),
        );
        put(&mut out, field::BLOCK_SIZE, &self.block_size.to_be_bytes());
        put(&mut out, field::PARENT_UNIQUE_ID, &self.parent_unique_id);
        put(
            &mut out,
            field::PARENT_TIMESTAMP,
            &self.parent_timestamp.to_be_bytes(),
        );
        put(&mut out, 60, &self.reserved1.to_be_bytes());
        put(&mut out, field::PARENT_NAME, &self.parent_name);
        for (i, entry) in self.locators.iter().enumerate() {
            let at = field::LOCATORS + i * field::LOCATOR_LEN;
            put(&mut out, at, &entry.platform.code().to_be_bytes());
            put(&mut out, at + 4, &entry.data_space.to_be_bytes());
            put(&mut out, at + 8, &entry.data_length.to_be_bytes());
            put(&mut out, at + 12, &entry.reserved.to_be_bytes());
            put(&mut out, at + 16, &entry.data_offset.to_be_bytes());
        }
        put(&mut out, 768, self.reserved2.get(..256).unwrap_or_default());
        let sum = checksum(&out, field::CHECKSUM);
        put(&mut out, field::CHECKSUM, &sum.to_be_bytes());
        out
    }

    /// Bytes of one block's sector bitmap, padded to a whole sector.
    pub fn bitmap_bytes(&self) -> u64 {
        bitmap_bytes(self.block_size)
    }

    /// The parent's name decoded from UTF-16 BE (up to the first NUL); `None` when empty or not
    /// valid UTF-16.
    pub fn parent_name(&self) -> Option<String> {
        let units: Vec<u16> = self
            .parent_name
            .chunks_exact(2)
            .map(|c| {
                u16::from_be_bytes([
                    c.first().copied().unwrap_or(0),
                    c.get(1).copied().unwrap_or(0),
                ])
            })
            .take_while(|&u| u != 0)
            .collect();
        if units.is_empty() {
            return None;
        }
        String::from_utf16(&units).ok()
    }

    /// Stores `name` as the parent name (UTF-16 BE, NUL-padded). Errors when it does not fit in
    /// 512 bytes.
    pub fn set_parent_name(&mut self, name: &str) -> Result<()> {
        let mut field = [0u8; PARENT_NAME_LEN];
        let mut at = 0usize;
        for unit in name.encode_utf16() {
            if !put(&mut field, at, &unit.to_be_bytes()) {
                return Err(Error::invalid(format!(
                    "parent file name {name:?} does not fit in the VHD header's 512-byte field"
                )));
            }
            at += 2;
        }
        self.parent_name = field;
        Ok(())
    }
}

/// Bytes of a sector bitmap for blocks of `block_size` bytes, padded to a whole sector.
pub fn bitmap_bytes(block_size: u32) -> u64 {
    let sectors = u64::from(block_size) / SECTOR;
    sectors.div_ceil(8).div_ceil(SECTOR) * SECTOR
}

#[cfg(test)]
mod tests {
    use super::*;
    use snap_core::ErrorKind;

    #[test]
    fn roundtrip_with_parent() {
        let mut h = DynamicHeader::new(1536, 32, DEFAULT_BLOCK_SIZE);
        h.parent_unique_id = [9; 16];
        h.parent_timestamp = 77;
        h.set_parent_name("base é.vhd").unwrap();
        h.locators[0] = LocatorEntry {
            platform: PlatformCode::W2ru,
            data_space: 512,
            data_length: 24,
            reserved: 0,
            data_offset: 2048,
        };
        let bytes = h.encode();
        let back = DynamicHeader::parse(&bytes).unwrap();
        assert_eq!(back, h);
        assert_eq!(back.parent_name().as_deref(), Some("base é.vhd"));
        assert_eq!(&bytes[576..580], b"W2ru");
        assert_eq!(h.bitmap_bytes(), 512);
        assert_eq!(bitmap_bytes(256 << 20), 65536);
    }

    #[test]
    fn rejects_bad_header() {
        let h = DynamicHeader::new(1536, 32, DEFAULT_BLOCK_SIZE);
        let mut bytes = h.encode();
        bytes[700] ^= 0x10;
        assert_eq!(
            DynamicHeader::parse(&bytes).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        let odd = DynamicHeader::new(1536, 32, 3 << 20).encode();
        assert_eq!(
            DynamicHeader::parse(&odd).unwrap_err().kind(),
            ErrorKind::Unsupported
        );
        assert!(DynamicHeader::parse(&bytes[..10]).is_err());
        let mut h = DynamicHeader::new(1536, 32, DEFAULT_BLOCK_SIZE);
        assert!(h.set_parent_name(&"x".repeat(257)).is_err());
        assert!(h.set_parent_name(&"x".repeat(256)).is_ok());
    }

    #[test]
    fn locator_space_units() {
        let mut e = LocatorEntry::EMPTY;
        e.data_space = 1;
        assert_eq!(e.space_bytes(), Some(512));
        e.data_space = 1024;
        assert_eq!(e.space_bytes(), Some(1024));
        e.data_space = 1000;
        assert_eq!(e.space_bytes(), None);
    }
}
