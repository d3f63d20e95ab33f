//! The qcow2 on-disk format: every structure parsed from and encoded to bytes, one definition
//! each, big-endian, with ranges checked. Nothing in here does I/O, so all of it is testable from
//! byte arrays and fuzzable.

pub mod header;
pub mod refcount;
pub mod snapshot;
pub mod table;

pub(crate) use snap_core::bytes::{align_up, be16, be32, be64, put_be32, put_be64};
