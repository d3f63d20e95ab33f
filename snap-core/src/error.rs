//! One error type for every snapctl crate: a small kind enum a caller can match on, a message a
//! user can act on, and the context (path, offset, operation) that says where it happened.

use std::fmt;
use std::path::{Path, PathBuf};

/// Result alias used across snapctl.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, coarsely: callers (and the CLI's exit codes) decide on this alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A named snapshot, layer, file or volume does not exist.
    NotFound,
    /// Something of that name already exists.
    Exists,
    /// The image is held by another process (QEMU, another snapctl).
    InUse,
    /// On-disk metadata is inconsistent or out of range.
    Corrupt,
    /// A valid feature or request this code does not (or will not) handle.
    Unsupported,
    /// The request itself is malformed (bad name, bad option combination).
    InvalidInput,
    /// A counter or size would not fit (refcount overflow, size overflow).
    Overflow,
    /// An operating-system I/O error.
    Io,
    /// An external command (lvm2, rbd, qemu) failed.
    Command,
    /// The operation was stopped on request (Ctrl-C) at a safe point.
    Cancelled,
}

impl ErrorKind {
    /// A short lower-case name for JSON and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not-found",
            ErrorKind::Exists => "exists",
            ErrorKind::InUse => "in-use",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::InvalidInput => "invalid-input",
            ErrorKind::Overflow => "overflow",
            ErrorKind::Io => "io",
            ErrorKind::Command => "command",
            ErrorKind::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The snapctl error: kind, message, optional context and source.
#[derive(Debug, thiserror::Error)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    path: Option<PathBuf>,
    offset: Option<u64>,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    /// A new error of `kind` with a message a user can act on.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            path: None,
            offset: None,
            source: None,
        }
    }

    /// Shorthand for [`ErrorKind::Corrupt`].
    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, message)
    }

    /// Shorthand for [`ErrorKind::Unsupported`].
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }

    /// Shorthand for [`ErrorKind::InvalidInput`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }

    /// Shorthand for [`ErrorKind::NotFound`].
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    /// Wraps an OS I/O error, keeping it as the source.
    pub fn io(operation: impl Into<String>, err: std::io::Error) -> Self {
        let kind = match err.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::AlreadyExists => ErrorKind::Exists,
            _ => ErrorKind::Io,
        };
        let message = format!("{}: {}", operation.into(), err);
        Error {
            kind,
            message,
            path: None,
            offset: None,
            source: Some(Box::new(err)),
        }
    }

    /// Attaches the path the error concerns (the first one attached wins).
    pub fn with_path(mut self, path: impl AsRef<Path>) -> Self {
        if self.path.is_none() {
            self.path = Some(path.as_ref().to_path_buf());
        }
        self
    }

    /// Attaches the file offset the error concerns (the first one attached wins).
    pub fn with_offset(mut self, offset: u64) -> Self {
        if self.offset.is_none() {
            self.offset = Some(offset);
        }
        self
    }

    /// Attaches a source error.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Prefixes the message with what was being done (`"create snapshot s1: ..."`).
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }

    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The bare message, without path or offset.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The path the error concerns, if known.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The file offset the error concerns, if known.
    pub fn offset(&self) -> Option<u64> {
        self.offset
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(path) = &self.path {
            write!(f, "{}: ", path.display())?;
        }
        f.write_str(&self.message)?;
        if let Some(offset) = self.offset {
            write!(f, " (at offset {offset:#x})")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_has_path_message_offset() {
        let e = Error::corrupt("L1 table past end of file")
            .with_path("/x.qcow2")
            .with_offset(0x30000);
        assert_eq!(
            e.to_string(),
            "/x.qcow2: L1 table past end of file (at offset 0x30000)"
        );
        assert_eq!(e.kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn io_not_found_maps_kind() {
        let e = Error::io("open", std::io::Error::from(std::io::ErrorKind::NotFound));
        assert_eq!(e.kind(), ErrorKind::NotFound);
    }

    #[test]
    fn first_path_wins() {
        let e = Error::invalid("x").with_path("/a").with_path("/b");
        assert_eq!(e.path(), Some(Path::new("/a")));
    }
}
