//! The qcow2 on-disk format: every structure parsed from and encoded to bytes, one definition
//! each, big-endian, with ranges checked. Nothing in here does I/O, so all of it is testable from
//! byte arrays and fuzzable.

pub mod header;
pub mod refcount;
pub mod snapshot;
pub mod table;

/// Reads a big-endian u16 at `at`, or `None` when out of range.
pub(crate) fn be16(bytes: &[u8], at: usize) -> Option<u16> {
    let b = bytes.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes(b.try_into().ok()?))
}

/// Reads a big-endian u32 at `at`, or `None` when out of range.
pub(crate) fn be32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes(b.try_into().ok()?))
}

/// Reads a big-endian u64 at `at`, or `None` when out of range.
pub(crate) fn be64(bytes: &[u8], at: usize) -> Option<u64> {
    let b = bytes.get(at..at.checked_add(8)?)?;
    Some(u64::from_be_bytes(b.try_into().ok()?))
}

/// Writes `value` big-endian at `at`; returns false when out of range.
pub(crate) fn put_be32(bytes: &mut [u8], at: usize, value: u32) -> bool {
    put(bytes, at, &value.to_be_bytes())
}

/// Writes `value` big-endian at `at`; returns false when out of range.
pub(crate) fn put_be64(bytes: &mut [u8], at: usize, value: u64) -> bool {
    put(bytes, at, &value.to_be_bytes())
}

fn put(bytes: &mut [u8], at: usize, src: &[u8]) -> bool {
    match at
        .checked_add(src.len())
        .and_then(|end| bytes.get_mut(at..end))
    {
        Some(dst) => {
            dst.copy_from_slice(src);
            true
        }
        None => false,
    }
}

/// Rounds `value` up to a multiple of `align` (a power of two), or `None` on overflow.
pub(crate) fn align_up(value: u64, align: u64) -> Option<u64> {
    Some(value.checked_add(align - 1)? & !(align - 1))
}
