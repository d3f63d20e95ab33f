//! The qcow2 [`DiskBackend`]: offline operations on a file, under QEMU-compatible locks.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use snap_core::io::FileIo;
use snap_core::lock::{ImageLock, LockMode, open_locked};
use snap_core::{
    Capabilities, CreateRequest, DiskBackend, DiskFormat, DiskListing, Error, Result, SnapshotInfo,
    Target, backend::CreateOutcome,
};

use crate::chain::backing_chain;
use crate::check::CheckReport;
use crate::image::Qcow2;
use crate::internal::SnapshotTime;

/// An image opened for an offline operation, with the lock that keeps QEMU and other snapctl
/// processes out while it is held.
#[derive(Debug)]
pub struct LockedImage {
    /// The image.
    pub image: Qcow2<FileIo>,
    /// The lock (released on drop).
    pub lock: ImageLock,
}

/// Opens `path` as qcow2 under a lock: shared for reading, exclusive for changes.
pub fn open_image(path: &Path, writable: bool) -> Result<LockedImage> {
    let mode = if writable {
        LockMode::Exclusive
    } else {
        LockMode::Shared
    };
    let (io, lock) = open_locked(path, mode)?;
    let image = Qcow2::open(io, writable).map_err(|e| e.with_path(path))?;
    Ok(LockedImage { image, lock })
}

/// Lists the snapshots and backing chain of the qcow2 image at `path`.
pub fn list_path(path: &Path) -> Result<DiskListing> {
    let locked = open_image(path, false)?;
    listing_of(path, &locked.image)
}

/// [`list_path`] without taking the image lock (like `qemu-img info -U`): for reading the
/// snapshot table and backing chain of an image another process (a running QEMU) has open. The
/// image is only read; if its owner is changing metadata at that moment, the listing may be
/// stale or the read may fail (validation catches a half-written table).
pub fn list_path_unlocked(path: &Path) -> Result<DiskListing> {
    let io = FileIo::open(path, false)?;
    let image = Qcow2::open(io, false).map_err(|e| e.with_path(path))?;
    listing_of(path, &image)
}

fn listing_of(path: &Path, image: &Qcow2<FileIo>) -> Result<DiskListing> {
    let snapshots = image
        .snapshots()
        .iter()
        .map(|s| SnapshotInfo {
            id: s.id.clone(),
            name: s.name.clone(),
            vm_state_size: s.vm_state_size(),
            date_sec: s.date_sec as u64,
            date_nsec: s.date_nsec,
            vm_clock_ns: s.vm_clock_nsec,
            disk_size: s.disk_size(),
        })
        .collect();
    let chain = backing_chain(path, image)?;
    Ok(DiskListing {
        image: path.to_path_buf(),
        format: DiskFormat::Qcow2,
        virtual_size: image.virtual_size(),
        snapshots,
        chain,
    })
}

/// Checks the qcow2 image at `path`.
pub fn check_path(path: &Path) -> Result<CheckReport> {
    let locked = open_image(path, false)?;
    locked.image.check().map_err(|e| e.with_path(path))
}

/// Offline qcow2 snapshots of one image file.
#[derive(Debug, Clone)]
pub struct Qcow2Backend {
    path: PathBuf,
}

impl Qcow2Backend {
    /// A backend for the image at `path` (nothing is opened until an operation runs).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Qcow2Backend { path: path.into() }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        op: impl FnOnce(PathBuf) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || op(path))
            .await
            .map_err(|e| {
                Error::new(
                    snap_core::ErrorKind::Io,
                    format!("worker thread failed: {e}"),
                )
            })?
    }
}

#[async_trait]
impl DiskBackend for Qcow2Backend {
    fn format(&self) -> DiskFormat {
        DiskFormat::Qcow2
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            internal: true,
            external: false,
            offline: true,
            online: false,
        }
    }

    async fn list(&self) -> Result<DiskListing> {
        self.blocking(|path| list_path(&path)).await
    }

    async fn create(&self, request: &CreateRequest) -> Result<CreateOutcome> {
        match request.clone() {
            CreateRequest::Internal { name } => {
                self.blocking(move |path| {
                    let mut locked = open_image(&path, true)?;
                    let id = locked
                        .image
                        .create_snapshot(&name, SnapshotTime::now())
                        .map_err(|e| e.with_path(&path))?;
                    Ok(CreateOutcome {
                        active: path,
                        id: Some(id),
                    })
                })
                .await
            }
            CreateRequest::External { name, overlay } => {
                self.blocking(move |path| {
                    let active = crate::external::create_external(&path, &name, overlay)?;
                    Ok(CreateOutcome { active, id: None })
                })
                .await
            }
        }
    }

    async fn revert(&self, target: &Target) -> Result<()> {
        match target.clone() {
            Target::Internal(name) => {
                self.blocking(move |path| {
                    let mut locked = open_image(&path, true)?;
                    locked
                        .image
                        .revert_snapshot(&name)
                        .map_err(|e| e.with_path(&path))
                })
                .await
            }
            Target::Layer(layer) => {
                self.blocking(move |path| crate::external::revert_to_layer(&path, &layer))
                    .await
            }
        }
    }

    async fn delete(&self, target: &Target) -> Result<()> {
        match target.clone() {
            Target::Internal(name) => {
                self.blocking(move |path| {
                    let mut locked = open_image(&path, true)?;
                    locked
                        .image
                        .delete_snapshot(&name)
                        .map_err(|e| e.with_path(&path))
                })
                .await
            }
            Target::Layer(layer) => {
                self.blocking(move |path| {
                    crate::external::delete_layer(&path, &layer, |_, _| true).map(|_| ())
                })
                .await
            }
        }
    }
}
