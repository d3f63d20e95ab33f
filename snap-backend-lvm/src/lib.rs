//! snap-backend-lvm: LVM classic and thin snapshots through the lvm2 commands.
//!
//! No maintained crate wraps the lvm2 CLI, so this crate runs the commands itself:
//!
//! - [`name`]: disk names (`/dev/VG/LV` or `VG/LV`) and LV names, validated against lvm2's rules
//!   before any command runs (nothing starting with `-` can reach lvm2 as an option).
//! - [`command`]: [`Lvm`], the one place lvm2 commands are built and run (async through
//!   `tokio::process`, or blocking), with lvm2's failures turned into [`snap_core::ErrorKind`]s
//!   that keep lvm2's own message. Extra lvm2 arguments come from `SNAPCTL_LVM_ARGS` (never by
//!   default).
//! - [`report`]: `lvs --reportformat json` output parsed into typed [`LvRow`]s.
//! - [`ops`]: the snapshot operations (list, create, revert = merge, delete), planned from a
//!   report so they are checked before anything changes, plus the richer [`LvmListing`].
//! - [`LvmBackend`]: the [`DiskBackend`](snap_core::DiskBackend) for one logical volume.
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
pub mod ops;
pub mod report;

pub use backend::LvmBackend;
pub use command::{ARGS_ENV, Lvm, LvmOutput, classify_failure};
pub use name::{LvRef, validate_lv_name, validate_vg_name};
pub use ops::{
    CreateInfo, DEFAULT_COW_PERCENT, LvmListing, LvmSnapshot, NEAR_FULL_PERCENT, RevertOutcome,
    SnapshotKind, SnapshotSize,
};
pub use report::{LV_FIELDS, LvRow, parse_lvs};
