//! snap-backend-qcow2: native qcow2 internal snapshots, written for safety first.
//!
//! - [`format`]: every on-disk structure, parsed and encoded without I/O.
//! - [`Qcow2`]: an open, validated image (header, L1, refcount and snapshot tables).
//! - internal snapshots: [`Qcow2::create_snapshot`], [`Qcow2::revert_snapshot`],
//!   [`Qcow2::delete_snapshot`] — each a copy-on-write metadata transaction committed by one
//!   header-sector write, so a crash leaves either the old or the new image.
//! - [`check`]: rebuilds refcounts from all metadata and compares (leaks vs corruption).
//! - [`data`]: guest reads through the backing chain and writes with refcount-checked
//!   copy-on-write, so snapshot data never changes.
//! - [`backend`]: the [`DiskBackend`](snap_core::DiskBackend) for qcow2 files, with QEMU-compatible
//!   locking.
//! - [`writer`]: a new standalone image written in one sequential pass (exports).
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
pub mod create;
pub mod data;
pub mod external;
pub mod format;
mod image;
mod internal;
pub mod online;
mod txn;
pub mod writer;

pub use image::{MAX_L1_BYTES, MAX_REFTABLE_BYTES, Qcow2};
pub use internal::SnapshotTime;

pub use backend::{
    LockedImage, Qcow2Backend, check_path, list_path, list_path_unlocked, open_image,
};
pub use check::CheckReport;
pub use data::{Extent, GuestRead, Qcow2Disk, RawLayer};
pub use writer::SequentialWriter;
