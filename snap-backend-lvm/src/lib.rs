//! snap-backend-lvm: LVM classic and thin snapshots through the lvm2 commands.
//!
//! Not implemented yet (see the LVM issue). Until then snapctl refuses LVM disks with a clear
//! "unsupported" error.
