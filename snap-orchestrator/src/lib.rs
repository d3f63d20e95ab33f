//! snap-orchestrator: the `snapctl` command line and domain snapshots: the metadata store, the
//! hypervisor drivers, and the planned create / revert / delete operations.
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )
)]

pub mod cli;
pub mod clone;
pub mod disk;
pub mod domain;
pub mod exec;
pub mod export;
pub mod hypervisor;
pub mod layers;
pub mod logging;
pub mod qemu;
pub mod qga;
pub mod rbdlive;
pub mod snapshot;
pub mod store;
#[cfg(feature = "xen")]
pub mod xen;
pub mod xlcfg;
