//! snap-core: the shared vocabulary of snapctl.
//!
//! - [`model`]: what a snapshot, a chain layer and a disk's snapshot listing are.
//! - [`backend`]: the [`DiskBackend`](backend::DiskBackend) trait every disk format implements.
//! - [`error`]: one error type with a small kind enum and context.
//! - [`io`]: the block I/O trait (positional read/write, flush, length) with a file implementation,
//!   an in-memory one, and a recording one whose log of writes and flushes crash tests replay.
//! - [`crash`]: the crash states of a recorded write log (flush boundaries, subsets of unflushed
//!   writes, torn writes), for crash-state tests.
//! - [`lock`]: image locking compatible with QEMU's OFD byte locks.
//! - [`perm`]: owner and mode of new overlays and rebuilt images (never looser than their origin).
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
pub mod bytes;
pub mod crash;
pub mod error;
pub mod io;
pub mod lock;
pub mod model;
pub mod perm;
pub mod qmp;

pub use backend::{Capabilities, CreateRequest, DiskBackend, Target};
pub use error::{Error, ErrorKind, Result};
pub use io::BlockIo;
pub use model::{ChainLayer, DiskFormat, DiskListing, SnapshotInfo};
