//! The internal snapshot table: variable-length entries, 8-byte aligned, with extra data.

use snap_core::{Error, Result};

use super::{be16, be32, be64};

/// Most snapshots QEMU allows in one image.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Largest snapshot table QEMU reads (64 MiB).
pub const MAX_TABLE_BYTES: u64 = 64 << 20;
/// Largest extra-data area QEMU accepts per entry.
pub const MAX_EXTRA_DATA: u32 = 1024;
/// Extra data QEMU writes today: vm_state_size_large, disk_size, icount.
pub const EXTRA_DATA_LEN: usize = 24;
/// Longest snapshot id accepted (QEMU writes decimal numbers; 256 bytes is generous).
pub const MAX_ID_LEN: usize = 256;
/// Longest snapshot name accepted: longer ones only come from damaged tables whose entries run
/// into other clusters.
pub const MAX_NAME_LEN: usize = 4096;
/// Length of an entry's fixed part.
pub const ENTRY_FIXED_LEN: usize = 40;

/// One snapshot table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// Unique id string.
    pub id: String,
    /// Name.
    pub name: String,
    /// Creation time, seconds.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest clock, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Bytes of saved VM state (32-bit field; see `extra`).
    pub vm_state_size: u32,
    /// Extra data, verbatim (its known fields are read through accessors).
    pub extra: Vec<u8>,
}

impl SnapshotEntry {
    /// VM state size, preferring the 64-bit extra-data field.
    pub fn vm_state_size(&self) -> u64 {
        be64(&self.extra, 0).unwrap_or(self.vm_state_size as u64)
    }
    /// Virtual disk size when the snapshot was taken, if recorded.
    pub fn disk_size(&self) -> Option<u64> {
        be64(&self.extra, 8)
    }
    /// Instruction count (record/replay), if recorded.
    pub fn icount(&self) -> Option<u64> {
        be64(&self.extra, 16).filter(|v| *v != u64::MAX)
    }
    /// Encoded length, padded to 8 bytes.
    pub fn encoded_len(&self) -> usize {
        (ENTRY_FIXED_LEN + self.extra.len() + self.id.len() + self.name.len()).div_ceil(8) * 8
    }
    /// Appends the encoded entry to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<()> {
        let id_len =
            u16::try_from(self.id.len()).map_err(|_| Error::invalid("snapshot id too long"))?;
        let name_len =
            u16::try_from(self.name.len()).map_err(|_| Error::invalid("snapshot name too long"))?;
        let extra_len =
            u32::try_from(self.extra.len()).map_err(|_| Error::invalid("extra data too long"))?;
        let start = out.len();
        out.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&id_len.to_be_bytes());
        out.extend_from_slice(&name_len.to_be_bytes());
        out.extend_from_slice(&self.date_sec.to_be_bytes());
        out.extend_from_slice(&self.date_nsec.to_be_bytes());
        out.extend_from_slice(&self.vm_clock_nsec.to_be_bytes());
        out.extend_from_slice(&self.vm_state_size.to_be_bytes());
        out.extend_from_slice(&extra_len.to_be_bytes());
        out.extend_from_slice(&self.extra);
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.resize(start + self.encoded_len(), 0);
        Ok(())
    }
}

/// Decodes `count` entries from `table` (the bytes from the snapshot table offset on).
/// Returns the entries and the number of bytes they occupy.
pub fn decode_table(table: &[u8], count: u32, version: u32) -> Result<(Vec<SnapshotEntry>, usize)> {
    if count > MAX_SNAPSHOTS {
        return Err(Error::corrupt(format!(
            "{count} snapshots; QEMU's limit is {MAX_SNAPSHOTS}"
        )));
    }
    let mut entries = Vec::with_capacity(count.min(1024) as usize);
    let mut at = 0usize;
    let short = |i: u32| {
        Error::corrupt(format!(
            "snapshot table entry {i} runs past the end of the table"
        ))
    };
    for i in 0..count {
        let (Some(l1_table_offset), Some(l1_size), Some(id_len), Some(name_len)) = (
            be64(table, at),
            be32(table, at + 8),
            be16(table, at + 12),
            be16(table, at + 14),
        ) else {
            return Err(short(i));
        };
        let (
            Some(date_sec),
            Some(date_nsec),
            Some(vm_clock_nsec),
            Some(vm_state_size),
            Some(extra_len),
        ) = (
            be32(table, at + 16),
            be32(table, at + 20),
            be64(table, at + 24),
            be32(table, at + 32),
            be32(table, at + 36),
        )
        else {
            return Err(short(i));
        };
        if extra_len > MAX_EXTRA_DATA {
            return Err(Error::corrupt(format!(
                "snapshot table entry {i} has {extra_len} bytes of extra data; the limit is {MAX_EXTRA_DATA}"
            )));
        }
        if id_len as usize > MAX_ID_LEN || name_len as usize > MAX_NAME_LEN {
            return Err(Error::corrupt(format!(
                "snapshot table entry {i} has an implausible id/name length ({id_len}/{name_len} bytes; at most \
                 {MAX_ID_LEN}/{MAX_NAME_LEN})"
            )));
        }
        if version >= 3 && extra_len < 16 {
            return Err(Error::corrupt(format!(
                "snapshot table entry {i} has {extra_len} bytes of extra data; version 3 requires 16"
            )));
        }
        let extra_start = at + ENTRY_FIXED_LEN;
        let id_start = extra_start + extra_len as usize;
        let name_start = id_start + id_len as usize;
        let end = name_start + name_len as usize;
        let extra = table
            .get(extra_start..id_start)
            .ok_or_else(|| short(i))?
            .to_vec();
        let id = table.get(id_start..name_start).ok_or_else(|| short(i))?;
        let name = table.get(name_start..end).ok_or_else(|| short(i))?;
        entries.push(SnapshotEntry {
            l1_table_offset,
            l1_size,
            id: String::from_utf8_lossy(id).into_owned(),
            name: String::from_utf8_lossy(name).into_owned(),
            date_sec,
            date_nsec,
            vm_clock_nsec,
            vm_state_size,
            extra,
        });
        at = end.div_ceil(8) * 8;
        if at as u64 > MAX_TABLE_BYTES {
            return Err(Error::corrupt("snapshot table is larger than 64 MiB"));
        }
    }
    Ok((entries, at))
}

/// Encodes a whole snapshot table.
pub fn encode_table(entries: &[SnapshotEntry]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for e in entries {
        e.encode_into(&mut out)?;
    }
    Ok(out)
}

/// The id QEMU would give a new snapshot: one more than the largest numeric id.
pub fn next_id(entries: &[SnapshotEntry]) -> String {
    let max = entries
        .iter()
        .filter_map(|e| e.id.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    (max + 1).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, name: &str) -> SnapshotEntry {
        let mut extra = vec![0u8; 24];
        extra[8..16].copy_from_slice(&(64u64 << 20).to_be_bytes());
        extra[16..24].copy_from_slice(&u64::MAX.to_be_bytes());
        SnapshotEntry {
            l1_table_offset: 0x50000,
            l1_size: 1,
            id: id.into(),
            name: name.into(),
            date_sec: 1_700_000_000,
            date_nsec: 5,
            vm_clock_nsec: 7,
            vm_state_size: 0,
            extra,
        }
    }

    #[test]
    fn roundtrip_and_padding() {
        let entries = vec![entry("1", "first"), entry("2", "second-snapshot")];
        let bytes = encode_table(&entries).unwrap();
        assert_eq!(bytes.len() % 8, 0);
        assert_eq!(
            bytes.len(),
            entries[0].encoded_len() + entries[1].encoded_len()
        );
        let (back, len) = decode_table(&bytes, 2, 3).unwrap();
        assert_eq!(back, entries);
        assert_eq!(len, bytes.len());
        assert_eq!(back[0].disk_size(), Some(64 << 20));
        assert_eq!(back[0].icount(), None);
        assert_eq!(next_id(&back), "3");
    }

    #[test]
    fn rejects_truncation_and_absurd_lengths() {
        let bytes = encode_table(&[entry("1", "a")]).unwrap();
        assert!(decode_table(&bytes[..bytes.len() - 8], 1, 3).is_err());
        assert!(decode_table(&bytes, 2, 3).is_err());
        let mut big = bytes.clone();
        big[36..40].copy_from_slice(&5000u32.to_be_bytes());
        assert!(decode_table(&big, 1, 3).is_err());
        let mut long = bytes.clone();
        long[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
        assert!(decode_table(&long, 1, 3).is_err());
        let mut small = bytes.clone();
        small[36..40].copy_from_slice(&8u32.to_be_bytes());
        assert!(decode_table(&small, 1, 3).is_err());
        assert!(decode_table(&bytes, MAX_SNAPSHOTS + 1, 3).is_err());
    }
}
