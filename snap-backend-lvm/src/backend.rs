//! The LVM [`DiskBackend`]: one origin LV, lvm2 commands run through `tokio::process`.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use snap_core::backend::CreateOutcome;
use snap_core::{
    Capabilities, CreateRequest, DiskBackend, DiskFormat, DiskListing, Error, Result, Target,
};

use crate::command::Lvm;
use crate::name::LvRef;
use crate::ops::{
    self, CreateInfo, LvmListing, RevertOutcome, SnapshotKind, SnapshotSize, create_info,
    listing_from_rows, plan_create, plan_delete, plan_revert, require_device_mapper,
};

/// The message for layer and external requests.
pub const NO_LAYERS: &str =
    "LVM disks have no backing layers or external snapshots; use a snapshot LV name";

/// Snapshots (classic or thin snapshot LVs) of one logical volume.
#[derive(Debug, Clone)]
pub struct LvmBackend {
    origin: LvRef,
    image: PathBuf,
    lvm: Lvm,
    size: SnapshotSize,
}

impl LvmBackend {
    /// A backend for the disk `/dev/VG/LV` or `VG/LV` (names checked now; nothing runs until an
    /// operation). lvm2 gets the extra arguments of `SNAPCTL_LVM_ARGS` when that is set
    /// ([`Lvm::from_env`]), none otherwise.
    pub fn new(disk: impl AsRef<Path>) -> Result<Self> {
        let image = disk.as_ref().to_path_buf();
        let text = image.to_str().ok_or_else(|| {
            Error::invalid(format!("LVM disk name {} is not UTF-8", image.display()))
        })?;
        Ok(LvmBackend {
            origin: LvRef::parse(text)?,
            image,
            lvm: Lvm::from_env(),
            size: SnapshotSize::Default,
        })
    }

    /// Runs lvm2 as `lvm` says (binary, extra arguments) instead.
    pub fn with_lvm(mut self, lvm: Lvm) -> Self {
        self.lvm = lvm;
        self
    }

    /// The size of classic snapshots made by [`create`](DiskBackend::create) (CLI `--size`);
    /// default [`DEFAULT_COW_PERCENT`](crate::DEFAULT_COW_PERCENT) of the origin. Thin origins
    /// refuse any explicit size.
    pub fn with_snapshot_size(mut self, size: SnapshotSize) -> Self {
        self.size = size;
        self
    }

    /// The origin LV.
    pub fn origin(&self) -> &LvRef {
        &self.origin
    }

    /// The lvm2 runner.
    pub fn lvm(&self) -> &Lvm {
        &self.lvm
    }

    /// The snapshots with size, type, fill and warnings.
    pub async fn list_detailed(&self) -> Result<LvmListing> {
        let rows = self.lvm.lvs(self.origin.vg()).await?;
        let mut listing = listing_from_rows(&self.origin, &rows)?;
        listing.image = self.image.to_string_lossy().into_owned();
        Ok(listing)
    }

    /// Creates snapshot LV `name` (thin for a thin origin, else classic of the configured size).
    pub async fn create_snapshot(&self, name: &str) -> Result<CreateInfo> {
        let rows = self.lvm.lvs(self.origin.vg()).await?;
        let plan = plan_create(&self.origin, &rows, name, self.size)?;
        require_device_mapper(&format!("create snapshot {name} of {}", self.origin))?;
        let output = self.lvm.run(plan.subcommand, &plan.args).await?;
        Ok(create_info(&self.origin, name, &plan, &output))
    }

    /// Merges snapshot `name` into the origin; [`RevertOutcome::Deferred`] when lvm2 postpones
    /// the merge to the origin's next activation (the origin is open).
    pub async fn revert_snapshot(&self, name: &str) -> Result<RevertOutcome> {
        let rows = self.lvm.lvs(self.origin.vg()).await?;
        let plan = plan_revert(&self.origin, &rows, name)?;
        require_device_mapper(&format!("revert {} to {name}", self.origin))?;
        let output = self.lvm.run(plan.subcommand, &plan.args).await?;
        Ok(RevertOutcome::from_output(&output))
    }

    /// Removes snapshot LV `name` (only a snapshot of this origin).
    pub async fn delete_snapshot(&self, name: &str) -> Result<()> {
        let rows = self.lvm.lvs(self.origin.vg()).await?;
        let plan = plan_delete(&self.origin, &rows, name)?;
        if plan.kind == SnapshotKind::Thin {
            require_device_mapper(&format!("delete thin snapshot {name} of {}", self.origin))?;
        }
        self.lvm.run(plan.subcommand, &plan.args).await.map(drop)
    }

    /// Blocking [`list_detailed`](Self::list_detailed).
    pub fn list_blocking(&self) -> Result<LvmListing> {
        let mut listing = ops::list(&self.lvm, &self.origin)?;
        listing.image = self.image.to_string_lossy().into_owned();
        Ok(listing)
    }

    /// Blocking [`create_snapshot`](Self::create_snapshot).
    pub fn create_blocking(&self, name: &str) -> Result<CreateInfo> {
        ops::create(&self.lvm, &self.origin, name, self.size)
    }

    /// Blocking [`revert_snapshot`](Self::revert_snapshot).
    pub fn revert_blocking(&self, name: &str) -> Result<RevertOutcome> {
        ops::revert(&self.lvm, &self.origin, name)
    }

    /// Blocking [`delete_snapshot`](Self::delete_snapshot).
    pub fn delete_blocking(&self, name: &str) -> Result<()> {
        ops::delete(&self.lvm, &self.origin, name)
    }
}

fn internal(target: &Target) -> Result<&str> {
    match target {
        Target::Internal(name) => Ok(name),
        Target::Layer(_) => Err(Error::unsupported(NO_LAYERS)),
    }
}

#[async_trait]
impl DiskBackend for LvmBackend {
    fn format(&self) -> DiskFormat {
        DiskFormat::Lvm
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            internal: true,
            external: false,
            offline: true,
            online: true,
        }
    }

    async fn list(&self) -> Result<DiskListing> {
        Ok(self.list_detailed().await?.to_disk_listing())
    }

    async fn create(&self, request: &CreateRequest) -> Result<CreateOutcome> {
        match request {
            CreateRequest::Internal { name } => {
                let info = self.create_snapshot(name).await?;
                if info.skip_activation {
                    tracing::info!(
                        "thin snapshot {} has the activation-skip flag: activate it with `lvchange -ay -K {}`",
                        info.lv,
                        info.lv
                    );
                }
                Ok(CreateOutcome {
                    active: self.image.clone(),
                    id: Some(name.clone()),
                })
            }
            CreateRequest::External { .. } => Err(Error::unsupported(NO_LAYERS)),
        }
    }

    async fn revert(&self, target: &Target) -> Result<()> {
        let name = internal(target)?;
        let outcome = self.revert_snapshot(name).await?;
        if let RevertOutcome::Deferred { .. } = outcome {
            tracing::warn!("{}", outcome.describe(&self.image.to_string_lossy(), name));
        }
        Ok(())
    }

    async fn delete(&self, target: &Target) -> Result<()> {
        self.delete_snapshot(internal(target)?).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use snap_core::ErrorKind;

    #[tokio::test]
    async fn refuses_layers_and_bad_names_without_running_lvm2() {
        let b = LvmBackend::new("/dev/vg/lv")
            .unwrap()
            .with_lvm(Lvm::new().with_binary("/nonexistent/lvm"));
        assert_eq!(b.format(), DiskFormat::Lvm);
        let e = b.delete(&Target::Layer("/x".into())).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        let e = b
            .create(&CreateRequest::External {
                name: "x".into(),
                overlay: None,
            })
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert_eq!(
            LvmBackend::new("-vg/lv").unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        // The binary is missing: reaching lvm2 is an Io/NotFound error, not a panic.
        let e = b.list().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.message().contains("lvm2 installed"));
    }
}
