//! QEMU-compatible image locking (OFD byte locks). Filled in by the locking work.
