//! snap-backend-vhd: native VHD (dynamic and differencing) disks and their snapshot chains.
//!
//! - [`format`]: footer, dynamic header with parent locators, BAT, sector bitmaps — parsed and
//!   encoded without I/O.
//! - [`Vhd`] ([`image`]): one open, validated file; sector reads, crash-safe writes, reparent.
//! - [`Chain`] ([`chain`]): active layer to base, reads through it, writes, coalesce; opened
//!   from files by following parent locators under a [`ParentPolicy`].
//! - [`ops`]: the snapshot operations on files (create --external, revert/delete --layer, list,
//!   check), each under QEMU-compatible locks; [`check`] for consistency.
//! - [`writer`]: a new dynamic VHD written in one sequential pass (exports).
//! - [`VhdBackend`]: the [`DiskBackend`](snap_core::DiskBackend) for VHD files.
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )
)]

pub mod backend;
pub mod chain;
pub mod check;
pub mod format;
pub mod image;
pub mod ops;
pub mod writer;

pub use backend::{NO_INTERNAL, VhdBackend};
pub use chain::{Chain, Layer, MAX_CHAIN_DEPTH, open_chain, open_chain_with};
pub use check::CheckReport;
pub use format::locator::ParentPolicy;
pub use image::{ParentLink, SectorRun, Vhd};
pub use ops::{
    DeleteOutcome, check_path, create_differencing, create_dynamic, create_external,
    default_overlay_path, delete_layer, delete_layer_with, delete_layer_with_progress, list_path,
    probe, revert_to_layer,
};

/// The footer cookie that identifies a VHD file (its last 512 bytes, and a copy at offset 0 for
/// dynamic and differencing disks). Used by snapctl's format probe.
pub const FOOTER_COOKIE: &[u8; 8] = format::footer::COOKIE;
