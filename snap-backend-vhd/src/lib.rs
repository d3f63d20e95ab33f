//! snap-backend-vhd: native VHD differencing-disk snapshots.
//!
//! Not implemented yet: this crate is the place for the VHD footer, dynamic header, BAT, sector
//! bitmaps and parent locators, and for differencing create / coalesce / reparent / revert (see the
//! external-chains issue). Until then snapctl refuses VHD images with a clear "unsupported" error.

/// The footer cookie that identifies a VHD file (its last 512 bytes, and a copy at offset 0 for
/// dynamic and differencing disks). Used by snapctl's format probe.
pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
