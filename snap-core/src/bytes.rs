//! Big-endian field access on byte slices, checked: every on-disk format parser reads and writes
//! its fields through these, so no offset taken from a file can index out of range.

/// Reads a big-endian u16 at `at`, or `None` when out of range.
pub fn be16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(array(bytes, at)?))
}

/// Reads a big-endian u32 at `at`, or `None` when out of range.
pub fn be32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(array(bytes, at)?))
}

/// Reads a big-endian u64 at `at`, or `None` when out of range.
pub fn be64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(array(bytes, at)?))
}

/// Copies `N` bytes at `at`, or `None` when out of range.
pub fn array<const N: usize>(bytes: &[u8], at: usize) -> Option<[u8; N]> {
    bytes.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// Writes `src` at `at`; returns false when out of range.
pub fn put(bytes: &mut [u8], at: usize, src: &[u8]) -> bool {
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

/// Writes `value` big-endian at `at`; returns false when out of range.
pub fn put_be16(bytes: &mut [u8], at: usize, value: u16) -> bool {
    put(bytes, at, &value.to_be_bytes())
}

/// Writes `value` big-endian at `at`; returns false when out of range.
pub fn put_be32(bytes: &mut [u8], at: usize, value: u32) -> bool {
    put(bytes, at, &value.to_be_bytes())
}

/// Writes `value` big-endian at `at`; returns false when out of range.
pub fn put_be64(bytes: &mut [u8], at: usize, value: u64) -> bool {
    put(bytes, at, &value.to_be_bytes())
}

/// Rounds `value` up to a multiple of `align` (a power of two), or `None` on overflow.
pub fn align_up(value: u64, align: u64) -> Option<u64> {
    Some(value.checked_add(align - 1)? & !(align - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_access() {
        let mut b = [0u8; 8];
        assert!(put_be32(&mut b, 4, 0xdead_beef));
        assert_eq!(be32(&b, 4), Some(0xdead_beef));
        assert_eq!(be16(&b, 6), Some(0xbeef));
        assert_eq!(be64(&b, 1), None);
        assert!(!put_be64(&mut b, 1, 1));
        assert!(!put(&mut b, usize::MAX, &[1]));
        assert_eq!(array::<2>(&b, usize::MAX), None);
        assert_eq!(align_up(513, 512), Some(1024));
        assert_eq!(align_up(u64::MAX, 512), None);
    }
}
