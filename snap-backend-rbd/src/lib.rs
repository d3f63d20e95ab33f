//! snap-backend-rbd: Ceph RBD snapshots, clones and flatten through the `rbd` command.
//!
//! Not implemented yet (see the distributed-storage issue). Until then snapctl refuses RBD disks
//! with a clear "unsupported" error.
