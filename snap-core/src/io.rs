//! Block I/O: the only way format code touches an image.
//!
//! Format code is written against [`BlockIo`] so the same operation runs on a real file
//! ([`FileIo`]), in memory ([`MemIo`], for property tests and fuzzing) or under a
//! [`RecordingIo`] that logs every write and flush in order — the crash-state tests replay
//! prefixes and reorderings of that log to materialize every image a crash could leave.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{Error, ErrorKind, Result};

/// Positional block I/O on one image file.
///
/// `read_exact_at` fails on a short read (metadata must lie inside the file);
/// [`read_zero_fill`](BlockIo::read_zero_fill) reads what exists and zero-fills past the end,
/// as QEMU does for data clusters in a sparse, metadata-preallocated image.
pub trait BlockIo: Send + Sync {
    /// Reads up to `buf.len()` bytes at `offset`, returning how many were read (0 at end of file).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize>;
    /// Writes all of `buf` at `offset`, extending the file if needed.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes every completed write durable (fdatasync for files).
    fn flush(&self) -> Result<()>;
    /// The current length in bytes.
    fn len(&self) -> Result<u64>;
    /// Sets the length (truncate or extend with a hole).
    fn set_len(&self, len: u64) -> Result<()>;

    /// The underlying file, when there is one (lets callers use `copy_file_range`).
    fn file(&self) -> Option<&File> {
        None
    }

    /// True when the length is zero.
    fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Reads exactly `buf.len()` bytes at `offset`; a short read is a [`ErrorKind::Corrupt`] error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let rest = buf.get_mut(done..).unwrap_or_default();
            let pos = offset
                .checked_add(done as u64)
                .ok_or_else(|| Error::corrupt("offset overflow"))?;
            let n = self.read_at(rest, pos)?;
            if n == 0 {
                return Err(Error::corrupt(format!(
                    "structure of {} bytes at {offset:#x} runs past the end of the file",
                    buf.len()
                ))
                .with_offset(offset));
            }
            done += n;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`, filling with zeroes past the end of the file.
    fn read_zero_fill(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let rest = buf.get_mut(done..).unwrap_or_default();
            let pos = offset
                .checked_add(done as u64)
                .ok_or_else(|| Error::corrupt("offset overflow"))?;
            let n = self.read_at(rest, pos)?;
            if n == 0 {
                rest.fill(0);
                break;
            }
            done += n;
        }
        Ok(())
    }
}

impl<T: BlockIo + ?Sized> BlockIo for Arc<T> {
    fn file(&self) -> Option<&File> {
        (**self).file()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        (**self).read_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        (**self).write_all_at(buf, offset)
    }
    fn flush(&self) -> Result<()> {
        (**self).flush()
    }
    fn len(&self) -> Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> Result<()> {
        (**self).set_len(len)
    }
}

impl<T: BlockIo + ?Sized> BlockIo for Box<T> {
    fn file(&self) -> Option<&File> {
        (**self).file()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        (**self).read_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        (**self).write_all_at(buf, offset)
    }
    fn flush(&self) -> Result<()> {
        (**self).flush()
    }
    fn len(&self) -> Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> Result<()> {
        (**self).set_len(len)
    }
}

/// A regular file (or block device) opened by path.
#[derive(Debug)]
pub struct FileIo {
    file: File,
    path: PathBuf,
}

impl FileIo {
    /// Opens `path` read-only or read-write. Never creates a file.
    pub fn open(path: impl AsRef<Path>, writable: bool) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(&path)
            .map_err(|e| Error::io("open", e).with_path(&path))?;
        Ok(FileIo { file, path })
    }

    /// Wraps an already open file.
    pub fn from_file(file: File, path: impl AsRef<Path>) -> Self {
        FileIo {
            file,
            path: path.as_ref().to_path_buf(),
        }
    }

    /// The underlying file (for locking).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The path it was opened by.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl BlockIo for FileIo {
    fn file(&self) -> Option<&File> {
        Some(&self.file)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        loop {
            match self.file.read_at(buf, offset) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(Error::io("read", e)
                        .with_path(&self.path)
                        .with_offset(offset));
                }
            }
        }
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.file.write_all_at(buf, offset).map_err(|e| {
            Error::io("write", e)
                .with_path(&self.path)
                .with_offset(offset)
        })
    }
    fn flush(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io("flush", e).with_path(&self.path))
    }
    fn len(&self) -> Result<u64> {
        let meta = self
            .file
            .metadata()
            .map_err(|e| Error::io("stat", e).with_path(&self.path))?;
        if meta.file_type().is_file() {
            return Ok(meta.len());
        }
        // Block devices report length 0 in metadata; seek to the end instead.
        use std::io::Seek;
        let mut f = &self.file;
        f.seek(std::io::SeekFrom::End(0))
            .map_err(|e| Error::io("seek", e).with_path(&self.path))
    }
    fn set_len(&self, len: u64) -> Result<()> {
        self.file
            .set_len(len)
            .map_err(|e| Error::io("truncate", e).with_path(&self.path))
    }
}

/// An image held in memory: for tests, property tests and fuzzing.
#[derive(Debug, Default, Clone)]
pub struct MemIo {
    bytes: Arc<Mutex<Vec<u8>>>,
}

impl MemIo {
    /// An empty image.
    pub fn new() -> Self {
        Self::default()
    }

    /// An image holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        MemIo {
            bytes: Arc::new(Mutex::new(bytes)),
        }
    }

    /// A copy of the current contents.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        // A poisoned lock only means another test thread panicked; the bytes are still usable.
        self.bytes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn mem_range(offset: u64, len: usize) -> Result<(usize, usize)> {
    let start = usize::try_from(offset)
        .map_err(|_| Error::new(ErrorKind::Io, "offset too large for memory image"))?;
    let end = start
        .checked_add(len)
        .ok_or_else(|| Error::new(ErrorKind::Io, "offset overflow"))?;
    // Memory images are for tests: refuse anything beyond 1 TiB of address space outright.
    if end > (1usize << 40) {
        return Err(Error::new(ErrorKind::Io, "memory image too large"));
    }
    Ok((start, end))
}

impl BlockIo for MemIo {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let bytes = self.lock();
        let (start, _) = mem_range(offset, 0)?;
        let Some(avail) = bytes.get(start..) else {
            return Ok(0);
        };
        let n = avail.len().min(buf.len());
        if let (Some(dst), Some(src)) = (buf.get_mut(..n), avail.get(..n)) {
            dst.copy_from_slice(src);
        }
        Ok(n)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let (start, end) = mem_range(offset, buf.len())?;
        let mut bytes = self.lock();
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        if let Some(dst) = bytes.get_mut(start..end) {
            dst.copy_from_slice(buf);
        }
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn len(&self) -> Result<u64> {
        Ok(self.lock().len() as u64)
    }
    fn set_len(&self, len: u64) -> Result<()> {
        let (end, _) = mem_range(len, 0)?;
        self.lock().resize(end, 0);
        Ok(())
    }
}

/// One entry of a [`RecordingIo`] log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoEvent {
    /// A write of `data` at `offset`.
    Write {
        /// Byte offset in the image.
        offset: u64,
        /// The bytes written.
        data: Vec<u8>,
    },
    /// A change of length.
    SetLen(u64),
    /// A flush: every event before it is durable.
    Flush,
}

/// Passes I/O through to an inner [`BlockIo`] and records every write, length change and flush in
/// order, so a crash test can rebuild the image as of any crash point: start from the image before
/// the operation, apply every event up to a flush, then any subset of the events after it.
#[derive(Debug)]
pub struct RecordingIo<T> {
    inner: T,
    log: Mutex<Vec<IoEvent>>,
}

impl<T: BlockIo> RecordingIo<T> {
    /// Starts recording over `inner`.
    pub fn new(inner: T) -> Self {
        RecordingIo {
            inner,
            log: Mutex::new(Vec::new()),
        }
    }

    /// The events recorded so far.
    pub fn events(&self) -> Vec<IoEvent> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The inner I/O.
    pub fn into_inner(self) -> T {
        self.inner
    }

    fn push(&self, event: IoEvent) {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event);
    }
}

impl<T: BlockIo> BlockIo for RecordingIo<T> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.inner.write_all_at(buf, offset)?;
        self.push(IoEvent::Write {
            offset,
            data: buf.to_vec(),
        });
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()?;
        self.push(IoEvent::Flush);
        Ok(())
    }
    fn len(&self) -> Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> Result<()> {
        self.inner.set_len(len)?;
        self.push(IoEvent::SetLen(len));
        Ok(())
    }
}

/// Applies `events` to `target` in order (used to materialize crash states).
pub fn replay(target: &dyn BlockIo, events: &[IoEvent]) -> Result<()> {
    for event in events {
        match event {
            IoEvent::Write { offset, data } => target.write_all_at(data, *offset)?,
            IoEvent::SetLen(len) => target.set_len(*len)?,
            IoEvent::Flush => {}
        }
    }
    Ok(())
}

/// Copies `len` bytes from `src` at `src_offset` to `dst` at `dst_offset` inside the kernel
/// (`copy_file_range`), so the data never passes through user space. Returns `Ok(false)` when the
/// kernel or file system cannot (the caller then copies by hand); a short copy (source ends)
/// also returns `Ok(false)` after copying what it could, so the caller redoes the range.
pub fn copy_range(
    src: &File,
    src_offset: u64,
    dst: &File,
    dst_offset: u64,
    len: u64,
) -> Result<bool> {
    let to_i64 =
        |v: u64| i64::try_from(v).map_err(|_| Error::new(ErrorKind::Io, "offset too large"));
    let mut off_in = to_i64(src_offset)?;
    let mut off_out = to_i64(dst_offset)?;
    let mut left = len;
    while left > 0 {
        let chunk = usize::try_from(left.min(1 << 30)).unwrap_or(1 << 30);
        match nix::fcntl::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), chunk) {
            Ok(0) => return Ok(false),
            Ok(n) => left -= n as u64,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(
                nix::errno::Errno::EXDEV
                | nix::errno::Errno::ENOSYS
                | nix::errno::Errno::EOPNOTSUPP
                | nix::errno::Errno::EINVAL,
            ) => {
                return Ok(false);
            }
            Err(e) => return Err(Error::io("copy_file_range", std::io::Error::from(e))),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_read_write_and_zero_fill() {
        let io = MemIo::new();
        io.write_all_at(b"hello", 3).unwrap();
        assert_eq!(io.len().unwrap(), 8);
        let mut buf = [0xffu8; 10];
        io.read_zero_fill(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"\0\0\0hello\0\0");
        let mut exact = [0u8; 6];
        let err = io.read_exact_at(&mut exact, 3).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn recording_logs_in_order_and_replays() {
        let base = MemIo::from_bytes(vec![0; 16]);
        let rec = RecordingIo::new(base.clone());
        rec.write_all_at(&[1, 2], 0).unwrap();
        rec.flush().unwrap();
        rec.write_all_at(&[3], 8).unwrap();
        let events = rec.events();
        assert_eq!(
            events,
            vec![
                IoEvent::Write {
                    offset: 0,
                    data: vec![1, 2]
                },
                IoEvent::Flush,
                IoEvent::Write {
                    offset: 8,
                    data: vec![3]
                }
            ]
        );
        let crashed = MemIo::from_bytes(vec![0; 16]);
        replay(&crashed, &events[..2]).unwrap();
        assert_eq!(&crashed.to_bytes()[..3], &[1, 2, 0]);
        assert_eq!(crashed.to_bytes()[8], 0);
        assert_eq!(base.to_bytes()[8], 3);
    }

    #[test]
    fn file_io_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        let io = FileIo::open(&p, true).unwrap();
        io.write_all_at(b"Z", 5).unwrap();
        io.flush().unwrap();
        assert_eq!(io.len().unwrap(), 6);
        let mut b = [0u8; 6];
        io.read_exact_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"abc\0\0Z");
        let ro = FileIo::open(&p, false).unwrap();
        assert!(ro.write_all_at(b"x", 0).is_err());
    }
}
