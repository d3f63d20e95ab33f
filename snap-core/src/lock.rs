//! Image locking compatible with QEMU's, so snapctl and QEMU never change one image at once.
//!
//! This module owns the advisory locks snapctl takes on an image file it works on offline
//! (see DESIGN.md: "a disk is offline (we own the file: take QEMU-compatible OFD locks, refuse
//! if someone holds them)"). It speaks QEMU's protocol from `block/file-posix.c`
//! (`raw_apply_lock_bytes` / `raw_check_lock_bytes`) exactly, so that a running QEMU,
//! `qemu-storage-daemon`, `qemu-img` and `qemu-io` see snapctl as just another QEMU user, and
//! snapctl sees them.
//!
//! # The lock bytes
//! QEMU takes Linux open-file-description locks (`F_OFD_SETLK`), always *read* locks, on single
//! bytes of the image file. Each block-layer permission bit `i` has two bytes:
//!
//! - byte `100 + i` (`RAW_LOCK_PERM_BASE`) is locked while the holder *has* permission `i`;
//! - byte `200 + i` (`RAW_LOCK_SHARED_BASE`) is locked while the holder *does not share*
//!   permission `i` with anybody else.
//!
//! (Libvirt's lock manager uses byte 0; QEMU starts at 100 to leave it room.) The permission bits
//! in QEMU 6.2 and later (`BLK_PERM_*` in `include/block/block-common.h`) are
//! 0 `consistent read`, 1 `write`, 2 `write unchanged`, 3 `resize`. QEMU 6.1 and older also had
//! bit 4 (`change children`, bytes 104 / 204); nobody checks it any more, so neither do we.
//!
//! Because every lock is a read lock, taking our own bytes never fails because of another holder;
//! conflicts are found afterwards by *testing*: with `F_OFD_GETLK` and a write-lock probe on one
//! byte, the kernel reports any lock on it held by another open file description (the locks of
//! our own description never conflict with the probe). A conflict exists when someone else holds
//! byte `200 + i` for a permission `i` we want, or byte `100 + i` for a permission `i` we do not
//! share. Like QEMU we first take our bytes and then test, so two processes racing for the same
//! image cannot both win; on a conflict we release what we took.
//!
//! # Lifetime
//! OFD locks belong to the open file description, not to the process or the file descriptor:
//! they live until explicitly released or until the last descriptor of that description is
//! closed. [`ImageLock`] keeps a duplicate of the descriptor (same description), so the locks stay
//! as long as the lock object lives, and dropping it releases them. Keep at most one [`ImageLock`]
//! per open file description: locks of one description do not stack, so releasing one would
//! release the other's bytes too.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, fcntl};
use nix::libc;

use crate::error::{Error, ErrorKind, Result};
use crate::io::FileIo;

/// `RAW_LOCK_PERM_BASE`: byte `100 + i` is locked while the holder has permission `i`.
const PERM_BASE: i64 = 100;
/// `RAW_LOCK_SHARED_BASE`: byte `200 + i` is locked while the holder does not share permission `i`.
const SHARED_BASE: i64 = 200;

/// `BLK_PERM_CONSISTENT_READ`: reading gives self-consistent data.
const PERM_CONSISTENT_READ: u8 = 1 << 0;
/// `BLK_PERM_WRITE`: changing the data.
const PERM_WRITE: u8 = 1 << 1;
/// `BLK_PERM_WRITE_UNCHANGED`: writes that do not change what a reader sees.
const PERM_WRITE_UNCHANGED: u8 = 1 << 2;
/// `BLK_PERM_RESIZE`: changing the size.
const PERM_RESIZE: u8 = 1 << 3;
/// `BLK_PERM_ALL` (QEMU 6.2 and later).
const PERM_ALL: u8 = PERM_CONSISTENT_READ | PERM_WRITE | PERM_WRITE_UNCHANGED | PERM_RESIZE;

/// The permission bits in order, with QEMU's names for them (`bdrv_perm_names`).
const PERMS: [(u8, &str); 4] = [
    (PERM_CONSISTENT_READ, "consistent read"),
    (PERM_WRITE, "write"),
    (PERM_WRITE_UNCHANGED, "write unchanged"),
    (PERM_RESIZE, "resize"),
];

/// How snapctl uses an image while it holds the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LockMode {
    /// We only read (list, check, export): hold `consistent read`; share `consistent read` and
    /// `write unchanged`; refuse writers and resizers. Any number of readers (snapctl,
    /// `qemu-img info`) coexist; a running VM writing the image does not.
    Shared,
    /// We change metadata (create, revert, delete): hold `consistent read`, `write` and
    /// `resize`; share nothing. Only one holder at all.
    Exclusive,
}

impl LockMode {
    /// The permissions this mode holds (bytes `100 + i`).
    fn perm(self) -> u8 {
        match self {
            LockMode::Shared => PERM_CONSISTENT_READ,
            LockMode::Exclusive => PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE,
        }
    }

    /// The permissions this mode shares with others (the complement is locked at `200 + i`).
    fn shared(self) -> u8 {
        match self {
            LockMode::Shared => PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
            LockMode::Exclusive => 0,
        }
    }

    /// Every byte this mode locks, in QEMU's order (permission bytes, then unshared bytes).
    fn bytes(self) -> Vec<i64> {
        let mut bytes = Vec::new();
        for (i, (bit, _)) in (0i64..).zip(PERMS) {
            if self.perm() & bit != 0 {
                bytes.push(PERM_BASE + i);
            }
        }
        let unshared = PERM_ALL & !self.shared();
        for (i, (bit, _)) in (0i64..).zip(PERMS) {
            if unshared & bit != 0 {
                bytes.push(SHARED_BASE + i);
            }
        }
        bytes
    }
}

/// QEMU-compatible locks on one image file, held until dropped.
///
/// Created by [`ImageLock::acquire`] (on a file you opened) or [`open_locked`]. It holds a
/// duplicate of the file's descriptor, so the locks outlive the caller's handle; dropping it
/// releases the lock bytes (best effort: if the release fails, closing the last descriptor of the
/// open file description releases them anyway).
#[derive(Debug)]
pub struct ImageLock {
    file: File,
    path: PathBuf,
    mode: LockMode,
    bytes: Vec<i64>,
}

impl ImageLock {
    /// Locks `file` (opened from `path`, which is used in messages) for `mode`, the way QEMU does:
    /// takes our lock bytes, then tests for conflicting holders.
    ///
    /// Errors: [`ErrorKind::InUse`] naming the conflicting permission if another open file
    /// description (QEMU, qemu-img, another snapctl) holds a conflicting lock; [`ErrorKind::Io`]
    /// if the locks cannot be taken at all (e.g. a file system without OFD locks). Nothing stays
    /// locked after an error.
    pub fn acquire(file: &File, path: &Path, mode: LockMode) -> Result<ImageLock> {
        let file = file
            .try_clone()
            .map_err(|e| Error::io("duplicate file descriptor for locking", e).with_path(path))?;
        let mut lock = ImageLock {
            file,
            path: path.to_path_buf(),
            mode,
            bytes: Vec::new(),
        };
        // On an early return `lock` is dropped, which releases the bytes taken so far.
        for byte in mode.bytes() {
            set_lock(&lock.file, byte, LockOp::Read)
                .map_err(|errno| lock_error(errno, &format!("lock byte {byte}"), path))?;
            lock.bytes.push(byte);
        }
        lock.check_conflicts()?;
        Ok(lock)
    }

    /// Tests the bytes of other holders that conflict with our mode (`raw_check_lock_bytes`).
    fn check_conflicts(&self) -> Result<()> {
        let perm = self.mode.perm();
        let shared = self.mode.shared();
        for (i, (bit, name)) in (0i64..).zip(PERMS) {
            if perm & bit != 0 && self.held_by_other(SHARED_BASE + i)? {
                return Err(in_use(
                    &format!(
                        "another process does not share the \"{name}\" permission snapctl needs"
                    ),
                    &self.path,
                ));
            }
        }
        for (i, (bit, name)) in (0i64..).zip(PERMS) {
            if shared & bit == 0 && self.held_by_other(PERM_BASE + i)? {
                return Err(in_use(
                    &format!(
                        "another process holds the \"{name}\" permission, which snapctl cannot share"
                    ),
                    &self.path,
                ));
            }
        }
        Ok(())
    }

    /// Whether another open file description holds a lock on `byte` (`qemu_lock_fd_test` with a
    /// write-lock probe).
    fn held_by_other(&self, byte: i64) -> Result<bool> {
        let mut probe = flock(byte, libc::F_WRLCK);
        fcntl(self.file.as_raw_fd(), FcntlArg::F_OFD_GETLK(&mut probe))
            .map_err(|errno| lock_error(errno, &format!("test lock byte {byte}"), &self.path))?;
        Ok(i32::from(probe.l_type) != libc::F_UNLCK)
    }

    /// The mode the image is locked in.
    pub fn mode(&self) -> LockMode {
        self.mode
    }

    /// The path the image was locked by.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ImageLock {
    fn drop(&mut self) {
        for &byte in &self.bytes {
            if let Err(errno) = set_lock(&self.file, byte, LockOp::Unlock) {
                tracing::warn!(
                    path = %self.path.display(),
                    byte,
                    "releasing image lock byte failed: {errno}"
                );
            }
        }
    }
}

/// Opens `path` and locks it: read-only for [`LockMode::Shared`], read-write for
/// [`LockMode::Exclusive`]. Returns the file and the lock; keep the lock alive as long as you use
/// the file.
pub fn open_locked(path: &Path, mode: LockMode) -> Result<(FileIo, ImageLock)> {
    let io = FileIo::open(path, mode == LockMode::Exclusive)?;
    let lock = ImageLock::acquire(io.file(), path, mode)?;
    Ok((io, lock))
}

/// What [`set_lock`] does to a byte.
#[derive(Debug, Clone, Copy)]
enum LockOp {
    /// Take a read (shared) lock, as QEMU does for every lock byte.
    Read,
    /// Release the byte.
    Unlock,
}

/// A one-byte `struct flock` at `byte` of type `l_type` (`l_pid` must be 0 for OFD locks).
fn flock(byte: i64, l_type: libc::c_int) -> libc::flock {
    libc::flock {
        l_type: l_type as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte,
        l_len: 1,
        l_pid: 0,
    }
}

/// `F_OFD_SETLK` on one byte (`qemu_lock_fd` / `qemu_unlock_fd`).
fn set_lock(file: &File, byte: i64, op: LockOp) -> std::result::Result<(), Errno> {
    let l_type = match op {
        LockOp::Read => libc::F_RDLCK,
        LockOp::Unlock => libc::F_UNLCK,
    };
    let lock = flock(byte, l_type);
    fcntl(file.as_raw_fd(), FcntlArg::F_OFD_SETLK(&lock)).map(drop)
}

/// The error for an image someone else holds.
fn in_use(detail: &str, path: &Path) -> Error {
    Error::new(
        ErrorKind::InUse,
        format!(
            "image is in use by another process (QEMU or snapctl holds its lock): {detail}; \
             if the disk is open in a running QEMU, work through it with --qmp SOCKET --node NODE"
        ),
    )
    .with_path(path)
}

/// The error for a failed `fcntl` on a lock byte.
fn lock_error(errno: Errno, what: &str, path: &Path) -> Error {
    match errno {
        // Someone holds a *write* lock on the byte (QEMU never does, but other tools may).
        Errno::EAGAIN | Errno::EACCES => in_use(
            &format!("{what}: another process holds a conflicting lock"),
            path,
        ),
        Errno::EINVAL | Errno::EOPNOTSUPP | Errno::ENOLCK => Error::new(
            ErrorKind::Io,
            format!(
                "{what}: {errno}; the file system does not support open-file-description \
                 (OFD) locks, so snapctl cannot lock the image the way QEMU does"
            ),
        )
        .with_source(errno)
        .with_path(path),
        _ => Error::new(ErrorKind::Io, format!("{what}: {errno}"))
            .with_source(errno)
            .with_path(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_image() -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        f
    }

    /// A separate open, i.e. a separate open file description, as another process would have.
    fn reopen(path: &Path, writable: bool) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .unwrap()
    }

    #[test]
    fn bytes_match_qemu() {
        // Shared is what `qemu-img info` (read-only, no -U) takes: 100, 201, 203.
        assert_eq!(LockMode::Shared.bytes(), vec![100, 201, 203]);
        assert_eq!(
            LockMode::Exclusive.bytes(),
            vec![100, 101, 103, 200, 201, 202, 203]
        );
    }

    #[test]
    fn exclusive_excludes_exclusive() {
        let img = temp_image();
        let (a, b) = (reopen(img.path(), true), reopen(img.path(), true));
        let _first = ImageLock::acquire(&a, img.path(), LockMode::Exclusive).unwrap();
        let err = ImageLock::acquire(&b, img.path(), LockMode::Exclusive).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InUse);
        assert!(err.to_string().contains("in use"), "{err}");
        assert!(
            err.to_string().contains("--qmp SOCKET --node NODE"),
            "{err}"
        );
        assert_eq!(err.path(), Some(img.path()));
    }

    #[test]
    fn shared_coexist() {
        let img = temp_image();
        let (a, b) = (reopen(img.path(), false), reopen(img.path(), false));
        let first = ImageLock::acquire(&a, img.path(), LockMode::Shared).unwrap();
        let second = ImageLock::acquire(&b, img.path(), LockMode::Shared).unwrap();
        assert_eq!(first.mode(), LockMode::Shared);
        assert_eq!(second.mode(), LockMode::Shared);
    }

    #[test]
    fn shared_then_exclusive_conflicts_until_dropped() {
        let img = temp_image();
        let (a, b) = (reopen(img.path(), false), reopen(img.path(), true));
        let first = ImageLock::acquire(&a, img.path(), LockMode::Shared).unwrap();
        let err = ImageLock::acquire(&b, img.path(), LockMode::Exclusive).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InUse);
        // The reader does not share "write", which the writer needs.
        assert!(err.message().contains("\"write\""), "{err}");
        // The failed attempt released its bytes: the reader can still be joined by a reader.
        let c = reopen(img.path(), false);
        drop(ImageLock::acquire(&c, img.path(), LockMode::Shared).unwrap());
        drop(first);
        // `a` is still open: dropping the lock released the bytes, not just closing the fd.
        let _second = ImageLock::acquire(&b, img.path(), LockMode::Exclusive).unwrap();
        drop(a);
    }

    #[test]
    fn exclusive_then_shared_conflicts_until_dropped() {
        let img = temp_image();
        let (a, b) = (reopen(img.path(), true), reopen(img.path(), false));
        let first = ImageLock::acquire(&a, img.path(), LockMode::Exclusive).unwrap();
        let err = ImageLock::acquire(&b, img.path(), LockMode::Shared).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InUse);
        assert!(err.message().contains("\"consistent read\""), "{err}");
        drop(first);
        let _second = ImageLock::acquire(&b, img.path(), LockMode::Shared).unwrap();
    }

    #[test]
    fn lock_outlives_callers_handle() {
        let img = temp_image();
        let a = reopen(img.path(), true);
        let first = ImageLock::acquire(&a, img.path(), LockMode::Exclusive).unwrap();
        drop(a);
        let b = reopen(img.path(), true);
        let err = ImageLock::acquire(&b, img.path(), LockMode::Exclusive).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InUse);
        drop(first);
        ImageLock::acquire(&b, img.path(), LockMode::Exclusive).unwrap();
    }

    #[test]
    fn open_locked_modes() {
        let img = temp_image();
        let (io, lock) = open_locked(img.path(), LockMode::Exclusive).unwrap();
        assert_eq!(lock.path(), img.path());
        let err = open_locked(img.path(), LockMode::Shared).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InUse);
        drop(lock);
        drop(io);
        let (_io1, _l1) = open_locked(img.path(), LockMode::Shared).unwrap();
        let (_io2, _l2) = open_locked(img.path(), LockMode::Shared).unwrap();
    }

    #[test]
    fn open_locked_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = open_locked(&dir.path().join("nope.qcow2"), LockMode::Shared).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
    }
}
