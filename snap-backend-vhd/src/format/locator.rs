//! Parent locator paths: encoding the W2ku (absolute) and W2ru (relative) entries, decoding them
//! as vhd-util does, and resolving a decoded name against the child's folder under a
//! [`ParentPolicy`].
//!
//! Decoding (like vhd-util's `vhd_w2u_decode_location`): UTF-16 LE, NULs trimmed, a `\\?\` or
//! `\\.\` prefix stripped, backslashes mapped to slashes, a drive letter (`C:`) stripped; a
//! relative path's leading `./` is dropped.

use std::path::{Component, Path, PathBuf};

use snap_core::{Error, ErrorKind, Result};

/// Longest locator data this crate reads or writes (16 KiB: a 4096-character path in UTF-16,
/// twice over).
pub const MAX_LOCATOR_BYTES: u32 = 16 << 10;

/// Which parent paths found inside an image may be opened.
///
/// An image can be hostile: its locators could name any file on the host. By default only
/// parents inside the child's own folder are followed (relative paths without `..` that escape,
/// absolute paths that lie in the folder, and no symlink leading out of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ParentPolicy {
    /// Follow only parents inside the child's folder (the default).
    #[default]
    ChildFolder,
    /// Follow any absolute path and relative paths that climb out of the folder.
    Anywhere,
}

/// Decodes UTF-16 LE locator data into a path in `/` form.
pub fn decode_utf16le(data: &[u8]) -> Result<String> {
    if data.len() % 2 != 0 {
        return Err(Error::corrupt(
            "VHD parent locator data has an odd length for UTF-16",
        ));
    }
    let units: Vec<u16> = data
        .chunks_exact(2)
        .map(|c| {
            u16::from_le_bytes([
                c.first().copied().unwrap_or(0),
                c.get(1).copied().unwrap_or(0),
            ])
        })
        .collect();
    let text = String::from_utf16(&units)
        .map_err(|_| Error::corrupt("VHD parent locator is not valid UTF-16"))?;
    Ok(normalize_windows_path(&text))
}

/// Maps a Windows-style path to the `/` form vhd-util uses: trailing NULs trimmed, `\\?\` and
/// `\\.\` prefixes stripped, backslashes to slashes, a drive letter stripped, a leading `./`
/// dropped.
pub fn normalize_windows_path(text: &str) -> String {
    let mut text = text.trim_end_matches('\0');
    for prefix in ["\\\\?\\", "\\\\.\\", "//?/", "//./"] {
        if let Some(rest) = text.strip_prefix(prefix) {
            text = rest;
        }
    }
    let mut path = text.replace('\\', "/");
    let bytes = path.as_bytes();
    if bytes.len() >= 2
        && bytes.first().is_some_and(u8::is_ascii_alphabetic)
        && bytes.get(1) == Some(&b':')
    {
        path = path.get(2..).unwrap_or_default().to_string();
    }
    while let Some(rest) = path.strip_prefix("./") {
        path = rest.to_string();
    }
    path
}

/// Encodes a path for a W2ku / W2ru locator: backslashes, UTF-16 LE. A relative path gets vhd-util's
/// `.\` prefix (Windows requires it).
pub fn encode_utf16le(path: &str, relative: bool) -> Vec<u8> {
    let mut text = path.replace('/', "\\");
    if relative && !text.starts_with(".\\") && !text.starts_with("..\\") {
        text = format!(".\\{text}");
    }
    text.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

/// Lexically normalizes `path` (drops `.`, resolves `..` against earlier components); `None` when
/// `..` climbs above the root of a relative path... or of `/`.
pub fn lexical_normalize(path: &Path) -> Option<PathBuf> {
    let mut out: Vec<Component<'_>> = Vec::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => match out.last() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                _ => return None,
            },
            other => out.push(other),
        }
    }
    Some(out.iter().collect())
}

/// Resolves a decoded locator name against the child's folder under `policy` (lexically: the
/// caller still checks that the file exists and that symlinks do not lead out of the folder).
///
/// Errors: [`ErrorKind::Unsupported`] when the path leaves the folder under
/// [`ParentPolicy::ChildFolder`]; [`ErrorKind::InvalidInput`] for an empty name.
pub fn resolve(child_dir: &Path, name: &str, policy: ParentPolicy) -> Result<PathBuf> {
    if name.is_empty() || name.contains('\0') {
        return Err(Error::invalid("empty parent locator path"));
    }
    let joined = if Path::new(name).is_absolute() {
        PathBuf::from(name)
    } else {
        child_dir.join(name)
    };
    let normalized = lexical_normalize(&joined);
    match (policy, normalized) {
        (ParentPolicy::Anywhere, Some(path)) => Ok(path),
        (ParentPolicy::Anywhere, None) => Ok(joined),
        (ParentPolicy::ChildFolder, Some(path)) => {
            let dir = lexical_normalize(child_dir).unwrap_or_else(|| child_dir.to_path_buf());
            if path.parent() == Some(dir.as_path()) || path.starts_with(&dir) && path != dir {
                Ok(path)
            } else {
                Err(outside(name, child_dir))
            }
        }
        (ParentPolicy::ChildFolder, None) => Err(outside(name, child_dir)),
    }
}

/// The error for a parent path that leaves the child's folder.
pub fn outside(name: &str, child_dir: &Path) -> Error {
    Error::new(
        ErrorKind::Unsupported,
        format!(
            "parent path {name:?} leads out of the child's folder {}; refusing to follow it \
             (allow parents outside the folder explicitly to open this chain)",
            child_dir.display()
        ),
    )
}

/// The path of `target` relative to the folder `from_dir` (both absolute and normalized), e.g.
/// `base.vhd` or `../other/base.vhd`.
pub fn relative_path(from_dir: &Path, target: &Path) -> PathBuf {
    let from: Vec<Component<'_>> = from_dir.components().collect();
    let to: Vec<Component<'_>> = target.components().collect();
    let common = from
        .iter()
        .zip(to.iter())
        .take_while(|(a, b)| a == b)
        .count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for component in to.iter().skip(common) {
        out.push(component);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_like_vhd_util() {
        let enc = |s: &str| -> Vec<u8> { s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect() };
        assert_eq!(decode_utf16le(&enc(".\\base.vhd")).unwrap(), "base.vhd");
        assert_eq!(
            decode_utf16le(&enc("C:\\vms\\base.vhd\0\0")).unwrap(),
            "/vms/base.vhd"
        );
        assert_eq!(
            decode_utf16le(&enc("\\\\?\\D:\\vms\\b.vhd")).unwrap(),
            "/vms/b.vhd"
        );
        assert_eq!(decode_utf16le(&enc("..\\x\\b.vhd")).unwrap(), "../x/b.vhd");
        assert!(decode_utf16le(&[0x41]).is_err());
        assert!(decode_utf16le(&[0x00, 0xd8]).is_err());
    }

    #[test]
    fn encodes_relative_with_dot_prefix() {
        let back = |b: Vec<u8>| decode_utf16le(&b).unwrap();
        let rel = encode_utf16le("base.vhd", true);
        assert_eq!(&rel[..4], &[b'.', 0, b'\\', 0]);
        assert_eq!(back(rel), "base.vhd");
        assert_eq!(back(encode_utf16le("/vm/base.vhd", false)), "/vm/base.vhd");
        assert_eq!(back(encode_utf16le("../a/b.vhd", true)), "../a/b.vhd");
    }

    #[test]
    fn resolution_policy() {
        let dir = Path::new("/vm/d");
        let strict = ParentPolicy::ChildFolder;
        assert_eq!(
            resolve(dir, "base.vhd", strict).unwrap(),
            PathBuf::from("/vm/d/base.vhd")
        );
        assert_eq!(
            resolve(dir, "sub/../base.vhd", strict).unwrap(),
            PathBuf::from("/vm/d/base.vhd")
        );
        assert_eq!(
            resolve(dir, "/vm/d/base.vhd", strict).unwrap(),
            PathBuf::from("/vm/d/base.vhd")
        );
        for bad in [
            "../base.vhd",
            "/etc/passwd",
            "/vm/d/../x.vhd",
            "..",
            "/vm/d",
        ] {
            let err = resolve(dir, bad, strict).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Unsupported, "{bad}");
        }
        assert_eq!(
            resolve(dir, "../base.vhd", ParentPolicy::Anywhere).unwrap(),
            PathBuf::from("/vm/base.vhd")
        );
        assert!(resolve(dir, "", ParentPolicy::Anywhere).is_err());
    }

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative_path(Path::new("/vm/d"), Path::new("/vm/d/b.vhd")),
            PathBuf::from("b.vhd")
        );
        assert_eq!(
            relative_path(Path::new("/vm/d"), Path::new("/vm/e/b.vhd")),
            PathBuf::from("../e/b.vhd")
        );
    }
}
