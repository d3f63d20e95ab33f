//! Backing chains as the image records them: names resolved relative to the image's folder,
//! formats taken from the backing-format extension (never probed when recorded), protocols and
//! `json:` names refused, loops and over-deep chains detected.

use std::path::{Path, PathBuf};

use snap_core::{BlockIo, ChainLayer, DiskFormat, Error, Result, io::FileIo};

use crate::image::Qcow2;

/// The deepest backing chain snapctl follows.
pub const MAX_CHAIN_DEPTH: usize = 64;

/// Resolves a backing file name found in the image at `image_path`.
pub fn resolve_backing(image_path: &Path, name: &str) -> Result<PathBuf> {
    if name.starts_with("json:") {
        return Err(Error::unsupported(format!(
            "backing file {name:?} is a json: specification; refusing it"
        )));
    }
    if let Some((proto, _)) = name.split_once("://") {
        if !proto.is_empty()
            && proto
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '-')
        {
            return Err(Error::unsupported(format!(
                "backing file {name:?} uses a protocol ({proto}); refusing it"
            )));
        }
    }
    if let Some((proto, _)) = name.split_once(':') {
        if matches!(
            proto,
            "nbd" | "rbd" | "iscsi" | "ssh" | "http" | "https" | "ftp" | "ftps" | "gluster" | "nfs"
        ) {
            return Err(Error::unsupported(format!(
                "backing file {name:?} uses a protocol ({proto}); refusing it"
            )));
        }
    }
    let path = Path::new(name);
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    let dir = image_path.parent().unwrap_or(Path::new("."));
    Ok(dir.join(path))
}

/// Probes a file's format from its content: qcow2 magic, VHD footer, else raw.
pub fn probe_format(io: &dyn BlockIo) -> Result<DiskFormat> {
    let mut magic = [0u8; 4];
    if io.read_at(&mut magic, 0)? == 4 && u32::from_be_bytes(magic) == crate::format::header::MAGIC
    {
        return Ok(DiskFormat::Qcow2);
    }
    let len = io.len()?;
    let mut cookie = [0u8; 8];
    if len >= 512 && io.read_at(&mut cookie, len - 512)? == 8 && &cookie == b"conectix" {
        return Ok(DiskFormat::Vhd);
    }
    if len >= 511 && io.read_at(&mut cookie, len - 511)? == 8 && &cookie == b"conectix" {
        return Ok(DiskFormat::Vhd);
    }
    Ok(DiskFormat::Raw)
}

/// Walks the backing chain of the qcow2 image at `path` (already open as `image`), parent first.
pub fn backing_chain<IO: BlockIo>(path: &Path, image: &Qcow2<IO>) -> Result<Vec<ChainLayer>> {
    let mut chain = Vec::new();
    let mut seen = vec![std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())];
    let mut current_path = path.to_path_buf();
    let mut next = image
        .header_cluster()
        .backing_file_name()
        .map(|n| (n, image.header_cluster().backing_format()));
    while let Some((name, recorded_format)) = next.take() {
        if chain.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::unsupported(format!(
                "backing chain is deeper than {MAX_CHAIN_DEPTH} layers"
            )));
        }
        let backing =
            resolve_backing(&current_path, &name).map_err(|e| e.with_path(&current_path))?;
        let canonical = std::fs::canonicalize(&backing)
            .map_err(|e| Error::io("open backing file", e).with_path(&backing))?;
        if seen.contains(&canonical) {
            return Err(Error::corrupt(format!(
                "backing chain loops back to {}",
                backing.display()
            ))
            .with_path(path));
        }
        seen.push(canonical);
        let io = FileIo::open(&backing, false)?;
        let format = match recorded_format.as_deref() {
            Some(f) => DiskFormat::parse(f).map_err(|e| e.with_path(&current_path))?,
            None => probe_format(&io)?,
        };
        chain.push(ChainLayer {
            path: backing.clone(),
            format,
        });
        if format == DiskFormat::Qcow2 {
            let layer = Qcow2::open(io, false).map_err(|e| e.with_path(&backing))?;
            next = layer
                .header_cluster()
                .backing_file_name()
                .map(|n| (n, layer.header_cluster().backing_format()));
        }
        current_path = backing;
    }
    Ok(chain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_protocols_and_json() {
        let img = Path::new("/vm/a.qcow2");
        assert!(resolve_backing(img, "json:{\"file\":{}}").is_err());
        assert!(resolve_backing(img, "nbd://host/export").is_err());
        assert!(resolve_backing(img, "nbd:unix:/tmp/s").is_err());
        assert_eq!(
            resolve_backing(img, "base.qcow2").unwrap(),
            PathBuf::from("/vm/base.qcow2")
        );
        assert_eq!(
            resolve_backing(img, "/b/base.raw").unwrap(),
            PathBuf::from("/b/base.raw")
        );
    }
}
