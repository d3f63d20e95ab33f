//! The VHD [`DiskBackend`]: offline operations on files under QEMU-compatible locks, the
//! blocking work on tokio's blocking pool.

use std::path::PathBuf;

use async_trait::async_trait;
use snap_core::backend::CreateOutcome;
use snap_core::{
    Capabilities, CreateRequest, DiskBackend, DiskFormat, DiskListing, Error, ErrorKind, Result,
    Target,
};

use crate::format::locator::ParentPolicy;
use crate::ops::{create_external, delete_layer, list_path, revert_to_layer};

/// The message for internal snapshot requests.
pub const NO_INTERNAL: &str = "VHD has no internal snapshots; use --external";

/// Offline VHD snapshots (differencing chains) of one image file.
#[derive(Debug, Clone)]
pub struct VhdBackend {
    path: PathBuf,
    policy: ParentPolicy,
}

impl VhdBackend {
    /// A backend for the image at `path` following parents only inside each child's folder
    /// ([`ParentPolicy::ChildFolder`]); nothing is opened until an operation runs.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        VhdBackend {
            path: path.into(),
            policy: ParentPolicy::default(),
        }
    }

    /// Sets which parent paths found in images may be followed.
    pub fn with_parent_policy(mut self, policy: ParentPolicy) -> Self {
        self.policy = policy;
        self
    }

    async fn blocking<T: Send + 'static>(
        &self,
        op: impl FnOnce(PathBuf, ParentPolicy) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let path = self.path.clone();
        let policy = self.policy;
        tokio::task::spawn_blocking(move || op(path, policy))
            .await
            .map_err(|e| Error::new(ErrorKind::Io, format!("worker thread failed: {e}")))?
    }
}

#[async_trait]
impl DiskBackend for VhdBackend {
    fn format(&self) -> DiskFormat {
        DiskFormat::Vhd
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            internal: false,
            external: true,
            offline: true,
            online: false,
        }
    }

    async fn list(&self) -> Result<DiskListing> {
        self.blocking(|path, policy| list_path(&path, policy)).await
    }

    async fn create(&self, request: &CreateRequest) -> Result<CreateOutcome> {
        match request.clone() {
            CreateRequest::Internal { .. } => Err(Error::unsupported(NO_INTERNAL)),
            CreateRequest::External { name, overlay } => {
                self.blocking(move |path, policy| {
                    let active = create_external(&path, &name, overlay.as_deref(), policy)?;
                    Ok(CreateOutcome { active, id: None })
                })
                .await
            }
        }
    }

    async fn revert(&self, target: &Target) -> Result<()> {
        match target.clone() {
            Target::Internal(_) => Err(Error::unsupported(NO_INTERNAL)),
            Target::Layer(layer) => {
                self.blocking(move |path, policy| revert_to_layer(&path, &layer, policy))
                    .await
            }
        }
    }

    async fn delete(&self, target: &Target) -> Result<()> {
        match target.clone() {
            Target::Internal(_) => Err(Error::unsupported(NO_INTERNAL)),
            Target::Layer(layer) => {
                self.blocking(move |path, policy| delete_layer(&path, &layer, policy).map(drop))
                    .await
            }
        }
    }
}
