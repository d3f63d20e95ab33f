//! The qcow2 header (v2 and v3) and its extensions.
//!
//! The header is decoded into [`Header`]; the bytes of the first cluster that follow it — header
//! extensions, the backing file name — are kept as [`Extension`]s and raw bytes so an encode after
//! a decode reproduces them byte for byte, including extensions and feature bits we do not know.

use snap_core::{Error, Result};

use super::{align_up, be32, be64, put_be32, put_be64};

/// "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
/// Length of a version 2 header (and of the fields common to both versions).
pub const V2_HEADER_LEN: usize = 72;
/// Minimum length of a version 3 header.
pub const V3_MIN_HEADER_LEN: usize = 104;
/// Smallest cluster size QEMU supports (512 B).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size QEMU supports (2 MiB).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Longest backing file name QEMU accepts.
pub const MAX_BACKING_FILE_NAME: u32 = 1023;

/// Incompatible feature bit 0: refcounts may be inconsistent (lazy refcounts, unclean close).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: QEMU found corruption; the image must not be written.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: the compression type field is valid (non-zlib).
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: extended L2 entries (32 subclusters per cluster).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// All incompatible bits this implementation understands.
pub const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/// Compatible feature bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature bit 0: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;

/// Header extension type: end of the extension area.
pub const EXT_END: u32 = 0;
/// Header extension type: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension type: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension type: persistent dirty bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension type: full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension type: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Compression type: zlib (deflate).
pub const COMPRESSION_ZLIB: u8 = 0;
/// Compression type: zstd.
pub const COMPRESSION_ZSTD: u8 = 1;

/// Byte offsets of the header fields snapshot operations change; all lie in the first sector, so
/// one 512-byte write switches an image from its old metadata to its new metadata atomically.
pub mod field {
    /// Virtual disk size (u64).
    pub const SIZE: usize = 24;
    /// Number of active L1 entries (u32).
    pub const L1_SIZE: usize = 36;
    /// Active L1 table offset (u64).
    pub const L1_TABLE_OFFSET: usize = 40;
    /// Refcount table offset (u64).
    pub const REFCOUNT_TABLE_OFFSET: usize = 48;
    /// Refcount table length in clusters (u32).
    pub const REFCOUNT_TABLE_CLUSTERS: usize = 56;
    /// Number of snapshots (u32).
    pub const NB_SNAPSHOTS: usize = 60;
    /// Snapshot table offset (u64).
    pub const SNAPSHOTS_OFFSET: usize = 64;
}

/// The decoded fixed part of a qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Where the backing file name is (0: none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters the refcount table occupies.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (v3; 0 for v2).
    pub incompatible_features: u64,
    /// Compatible feature bits (v3; 0 for v2).
    pub compatible_features: u64,
    /// Autoclear feature bits (v3; 0 for v2).
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits (v2: 4).
    pub refcount_order: u32,
    /// Length of the header structure (v2: 72).
    pub header_length: u32,
    /// Compression type (v3 with header_length > 104; 0 = zlib otherwise).
    pub compression_type: u8,
    /// Header bytes after the fields we decode, up to header_length, kept verbatim.
    pub unknown_tail: Vec<u8>,
}

/// One header extension, kept verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    /// Extension type.
    pub kind: u32,
    /// Extension data (without the 8-byte padding).
    pub data: Vec<u8>,
}

/// Everything in an image's first cluster that the header owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderCluster {
    /// The fixed header.
    pub header: Header,
    /// Header extensions in file order, unknown ones included (the end marker is implied).
    pub extensions: Vec<Extension>,
    /// The backing file name bytes, if any.
    pub backing_file: Option<Vec<u8>>,
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1u32 << self.refcount_order
    }

    /// True for images with extended L2 entries (subclusters).
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }

    /// Bytes per L2 entry (8, or 16 with extended L2).
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() { 16 } else { 8 }
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// Bytes of guest data one L1 entry covers.
    pub fn l1_entry_span(&self) -> u64 {
        self.l2_entries() << self.cluster_bits
    }

    /// The smallest L1 size that covers `size` bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.l1_entry_span())
    }

    /// Decodes the fixed header from the start of the first cluster and validates what can be
    /// validated without the file's length.
    pub fn decode(bytes: &[u8]) -> Result<Header> {
        let short = || Error::corrupt("file too short for a qcow2 header");
        let magic = be32(bytes, 0).ok_or_else(short)?;
        if magic != MAGIC {
            return Err(Error::invalid("not a qcow2 image (bad magic)"));
        }
        let version = be32(bytes, 4).ok_or_else(short)?;
        if version != 2 && version != 3 {
            return Err(Error::unsupported(format!(
                "qcow2 version {version} is not supported (only 2 and 3)"
            )));
        }
        let field32 = |at| be32(bytes, at).ok_or_else(short);
        let field64 = |at| be64(bytes, at).ok_or_else(short);
        let mut header = Header {
            version,
            backing_file_offset: field64(8)?,
            backing_file_size: field32(16)?,
            cluster_bits: field32(20)?,
            size: field64(24)?,
            crypt_method: field32(32)?,
            l1_size: field32(36)?,
            l1_table_offset: field64(40)?,
            refcount_table_offset: field64(48)?,
            refcount_table_clusters: field32(56)?,
            nb_snapshots: field32(60)?,
            snapshots_offset: field64(64)?,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN as u32,
            compression_type: COMPRESSION_ZLIB,
            unknown_tail: Vec::new(),
        };
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&header.cluster_bits) {
            return Err(Error::corrupt(format!(
                "cluster_bits {} is outside 9..=21 (512 B to 2 MiB clusters)",
                header.cluster_bits
            )));
        }
        if version == 3 {
            header.incompatible_features = field64(72)?;
            header.compatible_features = field64(80)?;
            header.autoclear_features = field64(88)?;
            header.refcount_order = field32(96)?;
            header.header_length = field32(100)?;
            let len = header.header_length as u64;
            if len < V3_MIN_HEADER_LEN as u64 || len % 8 != 0 || len > header.cluster_size() {
                return Err(Error::corrupt(format!(
                    "header_length {len} must be a multiple of 8 between 104 and the cluster size"
                )));
            }
            let len = len as usize;
            if len > V3_MIN_HEADER_LEN {
                header.compression_type = *bytes.get(V3_MIN_HEADER_LEN).ok_or_else(short)?;
                header.unknown_tail = bytes
                    .get(V3_MIN_HEADER_LEN + 1..len)
                    .ok_or_else(short)?
                    .to_vec();
            }
            if header.refcount_order > 6 {
                return Err(Error::corrupt(format!(
                    "refcount_order {} is above 6",
                    header.refcount_order
                )));
            }
        }
        let compression_bit = header.incompatible_features & INCOMPAT_COMPRESSION != 0;
        match (compression_bit, header.compression_type) {
            (false, COMPRESSION_ZLIB) | (true, COMPRESSION_ZSTD) => {}
            (true, COMPRESSION_ZLIB) => {
                return Err(Error::corrupt(
                    "compression type bit set with the default (zlib) type",
                ));
            }
            (false, other) | (true, other) => {
                return Err(Error::unsupported(format!(
                    "compression type {other} is not supported"
                )));
            }
        }
        if header.backing_file_offset != 0 {
            if header.backing_file_size > MAX_BACKING_FILE_NAME {
                return Err(Error::corrupt(format!(
                    "backing file name is {} bytes long; the limit is {MAX_BACKING_FILE_NAME}",
                    header.backing_file_size
                )));
            }
            let end = header
                .backing_file_offset
                .checked_add(header.backing_file_size as u64);
            if end.is_none_or(|end| end > header.cluster_size()) {
                return Err(Error::corrupt(
                    "backing file name lies outside the first cluster",
                ));
            }
        }
        Ok(header)
    }

    /// Encodes the fixed header (`header_length` bytes; 72 for v2).
    pub fn encode(&self) -> Vec<u8> {
        let len = if self.version >= 3 {
            self.header_length as usize
        } else {
            V2_HEADER_LEN
        };
        let mut out = vec![0u8; len.max(V2_HEADER_LEN)];
        put_be32(&mut out, 0, MAGIC);
        put_be32(&mut out, 4, self.version);
        put_be64(&mut out, 8, self.backing_file_offset);
        put_be32(&mut out, 16, self.backing_file_size);
        put_be32(&mut out, 20, self.cluster_bits);
        put_be64(&mut out, 24, self.size);
        put_be32(&mut out, 32, self.crypt_method);
        put_be32(&mut out, 36, self.l1_size);
        put_be64(&mut out, 40, self.l1_table_offset);
        put_be64(&mut out, 48, self.refcount_table_offset);
        put_be32(&mut out, 56, self.refcount_table_clusters);
        put_be32(&mut out, 60, self.nb_snapshots);
        put_be64(&mut out, 64, self.snapshots_offset);
        if self.version >= 3 {
            put_be64(&mut out, 72, self.incompatible_features);
            put_be64(&mut out, 80, self.compatible_features);
            put_be64(&mut out, 88, self.autoclear_features);
            put_be32(&mut out, 96, self.refcount_order);
            put_be32(&mut out, 100, self.header_length);
            if len > V3_MIN_HEADER_LEN {
                if let Some(b) = out.get_mut(V3_MIN_HEADER_LEN) {
                    *b = self.compression_type;
                }
                let tail_end = (V3_MIN_HEADER_LEN + 1 + self.unknown_tail.len()).min(len);
                if let (Some(dst), Some(src)) = (
                    out.get_mut(V3_MIN_HEADER_LEN + 1..tail_end),
                    self.unknown_tail.get(..tail_end - V3_MIN_HEADER_LEN - 1),
                ) {
                    dst.copy_from_slice(src);
                }
            }
        }
        out
    }
}

impl HeaderCluster {
    /// Decodes the header, its extensions and the backing file name from the first cluster (or as
    /// much of it as the file has).
    pub fn decode(cluster0: &[u8]) -> Result<HeaderCluster> {
        let header = Header::decode(cluster0)?;
        let mut extensions = Vec::new();
        let mut at = header.header_length as usize;
        let limit = cluster0.len().min(header.cluster_size() as usize);
        loop {
            let (Some(kind), Some(len)) = (be32(cluster0, at), be32(cluster0, at + 4)) else {
                return Err(Error::corrupt(
                    "header extension area runs past the first cluster",
                ));
            };
            if kind == EXT_END {
                break;
            }
            let start = at + 8;
            let end = start
                .checked_add(len as usize)
                .filter(|end| *end <= limit)
                .ok_or_else(|| {
                    Error::corrupt(format!(
                        "header extension {kind:#x} runs past the first cluster"
                    ))
                })?;
            let data = cluster0.get(start..end).unwrap_or_default().to_vec();
            extensions.push(Extension { kind, data });
            at = align_up(end as u64, 8).unwrap_or(u64::MAX) as usize;
            if at >= limit {
                return Err(Error::corrupt("header extension area has no end marker"));
            }
        }
        let backing_file = if header.backing_file_offset != 0 {
            let start = header.backing_file_offset as usize;
            let end = start + header.backing_file_size as usize;
            Some(
                cluster0
                    .get(start..end)
                    .ok_or_else(|| {
                        Error::corrupt("backing file name runs past the end of the file")
                    })?
                    .to_vec(),
            )
        } else {
            None
        };
        Ok(HeaderCluster {
            header,
            extensions,
            backing_file,
        })
    }

    /// Encodes header, extensions (with the end marker) and backing file name into the first
    /// `len` bytes of a cluster. Fails when they do not fit or the backing name would overlap the
    /// extensions.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut out = self.header.encode();
        for ext in &self.extensions {
            let len = u32::try_from(ext.data.len())
                .map_err(|_| Error::invalid("header extension too long"))?;
            out.extend_from_slice(&ext.kind.to_be_bytes());
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&ext.data);
            out.resize(
                align_up(out.len() as u64, 8).unwrap_or(u64::MAX) as usize,
                0,
            );
        }
        out.extend_from_slice(&[0u8; 8]);
        if let Some(name) = &self.backing_file {
            let start = self.header.backing_file_offset as usize;
            if start < out.len() {
                return Err(Error::invalid(
                    "backing file name would overlap the header extensions",
                ));
            }
            out.resize(start, 0);
            out.extend_from_slice(name);
        }
        if out.len() as u64 > self.header.cluster_size() {
            return Err(Error::invalid(
                "header, extensions and backing name do not fit in the first cluster",
            ));
        }
        Ok(out)
    }

    /// The data of the first extension of `kind`.
    pub fn extension(&self, kind: u32) -> Option<&[u8]> {
        self.extensions
            .iter()
            .find(|e| e.kind == kind)
            .map(|e| e.data.as_slice())
    }

    /// The backing format recorded in the backing-format extension, if any.
    pub fn backing_format(&self) -> Option<String> {
        self.extension(EXT_BACKING_FORMAT)
            .map(|d| String::from_utf8_lossy(d).into_owned())
    }

    /// The backing file name as a string (lossy for non-UTF-8 bytes).
    pub fn backing_file_name(&self) -> Option<String> {
        self.backing_file
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v3 header as `qemu-img create -f qcow2 -o compat=1.1 x 64M` writes it (64 KiB clusters,
    /// 16-bit refcounts), with a feature name table and a backing format extension.
    fn v3_cluster() -> Vec<u8> {
        let mut c = vec![0u8; 65536];
        put_be32(&mut c, 0, MAGIC);
        put_be32(&mut c, 4, 3);
        put_be32(&mut c, 20, 16);
        put_be64(&mut c, 24, 64 << 20);
        put_be32(&mut c, 36, 1);
        put_be64(&mut c, 40, 0x30000);
        put_be64(&mut c, 48, 0x10000);
        put_be32(&mut c, 56, 1);
        put_be64(&mut c, 80, COMPAT_LAZY_REFCOUNTS);
        put_be64(&mut c, 88, 1 << 7); // an unknown autoclear bit
        put_be32(&mut c, 96, 4);
        put_be32(&mut c, 100, 112);
        // extension: unknown type 0x12345678, 5 bytes, padded to 8
        put_be32(&mut c, 112, 0x1234_5678);
        put_be32(&mut c, 116, 5);
        c[120..125].copy_from_slice(b"hello");
        put_be32(&mut c, 128, EXT_BACKING_FORMAT);
        put_be32(&mut c, 132, 5);
        c[136..141].copy_from_slice(b"qcow2");
        // end marker at 144..152, backing name at 512
        put_be64(&mut c, 8, 512);
        put_be32(&mut c, 16, 8);
        c[512..520].copy_from_slice(b"base.img");
        c
    }

    #[test]
    fn v3_roundtrip_is_byte_identical() {
        let c = v3_cluster();
        let hc = HeaderCluster::decode(&c).unwrap();
        assert_eq!(hc.header.version, 3);
        assert_eq!(hc.header.cluster_size(), 65536);
        assert_eq!(hc.header.refcount_bits(), 16);
        assert_eq!(hc.header.autoclear_features, 1 << 7);
        assert_eq!(hc.extensions.len(), 2);
        assert_eq!(hc.backing_format().as_deref(), Some("qcow2"));
        assert_eq!(hc.backing_file_name().as_deref(), Some("base.img"));
        let enc = hc.encode().unwrap();
        assert_eq!(&enc[..], &c[..enc.len()]);
        assert!(c[enc.len()..].iter().all(|b| *b == 0));
    }

    #[test]
    fn v2_defaults() {
        let mut c = v3_cluster();
        put_be32(&mut c, 4, 2);
        let h = Header::decode(&c).unwrap();
        assert_eq!(h.refcount_order, 4);
        assert_eq!(h.header_length, 72);
        assert_eq!(h.incompatible_features, 0);
        assert_eq!(h.encode().len(), 72);
        assert_eq!(&h.encode()[..72], &c[..72]);
    }

    #[test]
    fn rejects_bad_fields() {
        let c = v3_cluster();
        let mut bad = c.clone();
        bad[0] = 0;
        assert!(Header::decode(&bad).is_err());
        let mut bad = c.clone();
        put_be32(&mut bad, 20, 22);
        assert!(Header::decode(&bad).is_err());
        let mut bad = c.clone();
        put_be32(&mut bad, 100, 108);
        assert!(Header::decode(&bad).is_err());
        let mut bad = c.clone();
        put_be32(&mut bad, 96, 7);
        assert!(Header::decode(&bad).is_err());
        let mut bad = c.clone();
        put_be32(&mut bad, 16, 70000);
        assert!(Header::decode(&bad).is_err());
        let mut bad = c.clone();
        bad[104] = 1; // zstd without the incompatible bit
        assert!(Header::decode(&bad).is_err());
        assert!(Header::decode(&c[..50]).is_err());
    }

    #[test]
    fn extension_without_end_in_cluster_is_corrupt() {
        let mut c = v3_cluster();
        c.truncate(130);
        assert!(HeaderCluster::decode(&c).is_err());
        let mut c = v3_cluster();
        put_be32(&mut c, 116, 0xffff_fff0);
        assert!(HeaderCluster::decode(&c).is_err());
    }
}
