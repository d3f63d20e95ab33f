//! Who may read the files snapctl makes: new overlays and replaced images.
//!
//! A new overlay receives the guest's writes from then on, so it must be no easier to read than
//! the disk it grows from (libvirt's CVE-2025-13193: overlays created with the process umask,
//! world-readable). [`Ownership::for_overlay_of`] derives an overlay's owner, group and mode from
//! its backing file: the same owner and group, the backing file's permissions with every bit for
//! "other" cleared (and the owner's read and write added: the overlay is the active layer), and
//! the group's bits dropped too when the group could not be given. [`Ownership::of`] keeps an
//! image's own when it is replaced by a rebuilt file (a revert).
//!
//! New files are created private (0600) and given their final owner and mode through the open
//! file before they are linked under their name, so no moment exists in which a looser mode is
//! visible.

use std::fs::File;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use nix::libc;

use crate::error::{Error, Result};

/// The mode new files are created with, before [`Ownership::apply`] gives them their own.
pub const PRIVATE_MODE: u32 = 0o600;

/// An owner, a group and permission bits for a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ownership {
    /// The owner's user id.
    pub uid: u32,
    /// The group id.
    pub gid: u32,
    /// Permission bits (`0o7777` at most).
    pub mode: u32,
    /// Whether `mode`'s group bits may stay when the group cannot be given (the file then
    /// belongs to the creator's group instead). False for overlays: the bits were meant for
    /// another group.
    keep_group_bits_anyway: bool,
}

/// What [`Ownership::apply`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// The owner was set (false: not allowed, the file stays the creator's).
    pub owner: bool,
    /// The group was set.
    pub group: bool,
    /// The mode given.
    pub mode: u32,
}

/// An overlay's mode derived from its backing file's: "other" bits and the special bits
/// (setuid, setgid, sticky) cleared, the owner's read and write added.
pub fn overlay_mode(backing_mode: u32) -> u32 {
    (backing_mode & 0o770) | 0o600
}

impl Ownership {
    /// The owner, group and mode of the file at `path` (kept as they are: for a rebuilt file
    /// that replaces it).
    pub fn of(path: &Path) -> Result<Ownership> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io("stat", e).with_path(path))?;
        Ok(Ownership {
            uid: meta.uid(),
            gid: meta.gid(),
            mode: meta.permissions().mode() & 0o7777,
            keep_group_bits_anyway: true,
        })
    }

    /// What a new overlay on the backing file at `backing` gets: its owner and group, and
    /// [`overlay_mode`] of its mode.
    pub fn for_overlay_of(backing: &Path) -> Result<Ownership> {
        let of = Self::of(backing)?;
        Ok(Ownership {
            mode: overlay_mode(of.mode),
            keep_group_bits_anyway: false,
            ..of
        })
    }

    /// Gives the open `file` (named `path` in errors) this owner, group and mode. Changing the
    /// owner needs privileges: without them the owner stays the creator (like `cp`), and the
    /// group is still set when the creator belongs to it. A group that cannot be set makes an
    /// overlay's group bits go (see [`Ownership::for_overlay_of`]).
    pub fn apply(&self, file: &File, path: &Path) -> Result<Applied> {
        let denied = |e: &std::io::Error| {
            matches!(
                e.raw_os_error(),
                Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EINVAL)
            )
        };
        let meta = file
            .metadata()
            .map_err(|e| Error::io("stat", e).with_path(path))?;
        let (mut owner, mut group) = (meta.uid() == self.uid, meta.gid() == self.gid);
        if !(owner && group) {
            match std::os::unix::fs::fchown(file, Some(self.uid), Some(self.gid)) {
                Ok(()) => (owner, group) = (true, true),
                Err(e) if denied(&e) => {
                    if !group {
                        match std::os::unix::fs::fchown(file, None, Some(self.gid)) {
                            Ok(()) => group = true,
                            Err(e) if denied(&e) => {}
                            Err(e) => return Err(Error::io("set group", e).with_path(path)),
                        }
                    }
                }
                Err(e) => return Err(Error::io("set owner", e).with_path(path)),
            }
        }
        let mode = if group || self.keep_group_bits_anyway {
            self.mode
        } else {
            self.mode & !0o070
        };
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io("set permissions", e).with_path(path))?;
        Ok(Applied { owner, group, mode })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    #[test]
    fn overlay_modes_drop_other_and_special_bits() {
        assert_eq!(overlay_mode(0o644), 0o640);
        assert_eq!(overlay_mode(0o666), 0o660);
        assert_eq!(overlay_mode(0o600), 0o600);
        assert_eq!(overlay_mode(0o444), 0o640);
        assert_eq!(overlay_mode(0o000), 0o600);
        assert_eq!(overlay_mode(0o7777), 0o770);
    }

    #[test]
    fn applies_mode_through_the_open_file() {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("base");
        std::fs::write(&backing, b"x").unwrap();
        std::fs::set_permissions(&backing, std::fs::Permissions::from_mode(0o664)).unwrap();
        let new = dir.path().join("overlay");
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(PRIVATE_MODE)
            .open(&new)
            .unwrap();
        let own = Ownership::for_overlay_of(&backing).unwrap();
        assert_eq!(own.mode, 0o660);
        let applied = own.apply(&file, &new).unwrap();
        // Same owner and group as the backing file (both ours here).
        assert!(applied.owner && applied.group);
        let meta = std::fs::metadata(&new).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o660);
        let kept = Ownership::of(&backing).unwrap();
        kept.apply(&file, &new).unwrap();
        assert_eq!(
            std::fs::metadata(&new).unwrap().permissions().mode() & 0o7777,
            0o664
        );
    }

    #[test]
    fn root_gives_owner_and_group_away() {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("base");
        std::fs::write(&backing, b"x").unwrap();
        // A file we create is owned by our effective user id.
        if std::fs::metadata(&backing).unwrap().uid() != 0 {
            eprintln!("not root: owner changes are not tested");
            return;
        }
        std::os::unix::fs::chown(&backing, Some(4321), Some(8765)).unwrap();
        std::fs::set_permissions(&backing, std::fs::Permissions::from_mode(0o640)).unwrap();
        let new = dir.path().join("overlay");
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(PRIVATE_MODE)
            .open(&new)
            .unwrap();
        let applied = Ownership::for_overlay_of(&backing)
            .unwrap()
            .apply(&file, &new)
            .unwrap();
        assert_eq!(
            applied,
            Applied {
                owner: true,
                group: true,
                mode: 0o640
            }
        );
        let meta = std::fs::metadata(&new).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (4321, 8765));
    }
}
