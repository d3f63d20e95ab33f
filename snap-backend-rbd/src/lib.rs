//! snap-backend-rbd: Ceph RBD snapshots, clones and flatten through the `rbd` command.
//!
//! No maintained crate wraps librbd (the `ceph` crate covers librados only), so this crate runs
//! the rbd command with JSON output, as QEMU-level tools and Proxmox do:
//!
//! - [`name`]: disk names as QEMU and xl spell them, `rbd:POOL[/NS]/IMAGE[@SNAP][:conf=PATH]
//!   [:id=USER]`, and the rules for every name, checked before any command runs.
//! - [`command`]: [`Rbd`], the one place rbd commands are built and run (`tokio::process`,
//!   bounded monitor timeouts), with rbd's failures (its exit code is the errno) turned into
//!   [`snap_core::ErrorKind`]s that keep rbd's own message.
//! - [`report`]: `rbd info`, `snap ls`, `status` and `children` JSON parsed into typed values.
//! - [`RbdBackend`]: the [`DiskBackend`](snap_core::DiskBackend) for one image: snapshots,
//!   rollback, clones as external snapshots, flatten as layer delete, export.
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
pub mod command;
pub mod name;
pub mod report;

pub use backend::{LayerOutcome, LayerPlan, RbdBackend, RbdListing, RbdSnapshot};
pub use command::{Rbd, RbdOutput, classify_failure};
pub use name::{RbdSpec, validate_name, validate_snapshot_name};
pub use report::{Child, ImageInfo, ParentRef, SnapRow, Watcher};
