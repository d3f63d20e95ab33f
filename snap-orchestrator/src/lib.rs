//! snap-orchestrator: the `snapctl` command line and, in later work, domain snapshots (metadata
//! store, hypervisor drivers, planner and journal).
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
pub mod disk;
pub mod logging;
