//! The RBD [`DiskBackend`]: one image, its snapshots and clones, through the rbd command.
//!
//! Every operation reads what it needs first (`rbd info`, `snap ls`, `status`, `children`) and
//! refuses before changing anything: an unknown pool or image, a snapshot name in use, a
//! revert while clients have the image open (a running QEMU: the domain layer stops the guest
//! first), a delete while clones depend on the snapshot.
//!
//! - internal snapshot: `rbd snap create`; revert: `rbd snap rollback`; delete: `rbd snap rm`
//!   (unprotecting first a protected snapshot no clone uses).
//! - external snapshot: snapshot, protect, `rbd clone` into a new image that becomes the active
//!   one (default `POOL/IMAGE.NAME`).
//! - chain: the clone parents, nearest first, as `rbd:POOL/IMAGE@SNAP`.
//! - layer revert: the image becomes an empty clone of the layer's snapshot (clone under a
//!   temporary name, remove the image, rename the clone).
//! - layer delete: `rbd flatten` of the layer's child in the chain, then the layer image is
//!   removed when nothing else uses it (no clone of any of its snapshots, no other snapshot,
//!   no client), else kept with the reason.
//! - export: `rbd export` (sparse) of the image or a snapshot; `rbd export-diff` since a
//!   snapshot.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Serialize;
use snap_core::backend::CreateOutcome;
use snap_core::{
    Capabilities, ChainLayer, CreateRequest, DiskBackend, DiskFormat, DiskListing, Error,
    ErrorKind, Result, SnapshotInfo, Target,
};

use crate::command::Rbd;
use crate::name::{RbdSpec, validate_snapshot_name};
use crate::report::{
    Child, ImageInfo, SnapRow, Watcher, parse_children, parse_info, parse_snaps, parse_watchers,
};

/// The deepest clone chain followed (a loop in metadata cannot hang a listing).
pub const MAX_CHAIN: usize = 64;

/// Snapshots and clones of one RBD image.
#[derive(Debug, Clone)]
pub struct RbdBackend {
    spec: RbdSpec,
    rbd: Rbd,
}

/// One snapshot as `disk list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RbdSnapshot {
    /// rbd's snapshot id.
    pub id: u64,
    /// Its name.
    pub name: String,
    /// The image size when it was taken.
    pub size: u64,
    /// Protected: clones may hang off it.
    pub protected: bool,
    /// Creation time, seconds since the Unix epoch, when known.
    pub time: Option<i64>,
}

impl From<&SnapRow> for RbdSnapshot {
    fn from(r: &SnapRow) -> Self {
        RbdSnapshot {
            id: r.id,
            name: r.name.clone(),
            size: r.size,
            protected: r.protected,
            time: r.time,
        }
    }
}

/// The richer `disk list` of an RBD image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RbdListing {
    /// `rbd:POOL/IMAGE...`.
    pub image: String,
    /// Size in bytes.
    pub size: u64,
    /// The image's features.
    pub features: Vec<String>,
    /// Its snapshots, in rbd's order (by id).
    pub snapshots: Vec<RbdSnapshot>,
    /// Clone parents, nearest first, as `rbd:POOL/IMAGE@SNAP`.
    pub chain: Vec<String>,
    /// Clients that have the image open (`None` when not asked).
    pub watchers: Option<Vec<String>>,
}

impl RbdListing {
    /// The listing in the shared model (`disk list --json`): id the rbd snapshot id, no VM
    /// state, the date from rbd's timestamp (0 when unknown), the clone parents as chain.
    pub fn to_disk_listing(&self) -> DiskListing {
        DiskListing {
            image: PathBuf::from(&self.image),
            format: DiskFormat::Rbd,
            virtual_size: self.size,
            snapshots: self
                .snapshots
                .iter()
                .map(|s| SnapshotInfo {
                    id: s.id.to_string(),
                    name: s.name.clone(),
                    vm_state_size: 0,
                    date_sec: s.time.and_then(|t| u64::try_from(t).ok()).unwrap_or(0),
                    date_nsec: 0,
                    vm_clock_ns: 0,
                    disk_size: Some(s.size),
                })
                .collect(),
            chain: self
                .chain
                .iter()
                .map(|c| ChainLayer {
                    path: PathBuf::from(c),
                    format: DiskFormat::Rbd,
                })
                .collect(),
        }
    }
}

/// What a layer delete will do (planned before anything changes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerPlan {
    /// The layer image (`rbd:POOL/IMAGE`).
    pub layer: RbdSpec,
    /// The layer's snapshot the chain hangs off.
    pub snapshot: String,
    /// The image flattened (the layer's child in the chain).
    pub child: RbdSpec,
    /// Other clones of the layer's snapshots (they keep it).
    pub other_users: Vec<String>,
    /// Other snapshots of the layer (they keep it).
    pub other_snapshots: Vec<String>,
}

impl LayerPlan {
    /// Why the layer image stays after the flatten, or `None` when it goes.
    pub fn keep_reason(&self) -> Option<String> {
        if !self.other_users.is_empty() {
            return Some(format!(
                "it is still the parent of {}",
                self.other_users.join(", ")
            ));
        }
        if !self.other_snapshots.is_empty() {
            return Some(format!(
                "it has other snapshots ({})",
                self.other_snapshots.join(", ")
            ));
        }
        None
    }
}

/// What a layer delete did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerOutcome {
    /// The plan it carried out.
    pub plan: LayerPlan,
    /// Whether the layer image was removed.
    pub removed: bool,
    /// Why it was kept, when it was.
    pub kept_because: Option<String>,
}

fn spec_of_child(base: &RbdSpec, c: &Child) -> Result<String> {
    Ok(base
        .sibling(&c.pool, c.namespace.as_deref(), &c.image)?
        .to_string())
}

impl RbdBackend {
    /// A backend for the disk `rbd:POOL[/NS]/IMAGE[:conf=PATH][:id=USER]` (checked now; nothing
    /// runs until an operation). A name with `@SNAP` is refused: a snapshot is not a disk.
    pub fn new(disk: impl AsRef<Path>) -> Result<Self> {
        Self::from_spec(RbdSpec::from_path(disk.as_ref())?)
    }

    /// A backend for a parsed image spec.
    pub fn from_spec(spec: RbdSpec) -> Result<Self> {
        if let Some(snap) = spec.snapshot() {
            return Err(Error::invalid(format!(
                "{spec} names snapshot {snap:?}; give the image (rbd:POOL/IMAGE) and the snapshot name separately"
            )));
        }
        Ok(RbdBackend {
            rbd: Rbd::for_spec(&spec),
            spec,
        })
    }

    /// Runs rbd as `rbd` says instead.
    pub fn with_rbd(mut self, rbd: Rbd) -> Self {
        self.rbd = rbd;
        self
    }

    /// The image.
    pub fn spec(&self) -> &RbdSpec {
        &self.spec
    }

    /// The rbd runner.
    pub fn rbd(&self) -> &Rbd {
        &self.rbd
    }

    fn image_error(&self, spec: &RbdSpec, e: Error) -> Error {
        e.with_path(spec.to_path())
    }

    async fn info_of(&self, spec: &RbdSpec) -> Result<ImageInfo> {
        let v = self
            .rbd
            .json(&["info".into(), spec.image_arg()])
            .await
            .map_err(|e| self.image_error(spec, e))?;
        parse_info(&v)
    }

    async fn snaps_of(&self, spec: &RbdSpec) -> Result<Vec<SnapRow>> {
        let v = self
            .rbd
            .json(&["snap".into(), "ls".into(), spec.image_arg()])
            .await
            .map_err(|e| self.image_error(spec, e))?;
        parse_snaps(&v)
    }

    async fn watchers_of(&self, spec: &RbdSpec) -> Result<Vec<Watcher>> {
        let v = self
            .rbd
            .json(&["status".into(), spec.image_arg()])
            .await
            .map_err(|e| self.image_error(spec, e))?;
        parse_watchers(&v)
    }

    /// Clones of `spec@snap`, including those in the trash.
    async fn children_of(&self, spec: &RbdSpec, snap: &str) -> Result<Vec<Child>> {
        let at = spec.at_snapshot(snap)?;
        let v = self
            .rbd
            .json(&["children".into(), "--all".into(), at.arg()])
            .await
            .map_err(|e| self.image_error(spec, e))?;
        parse_children(&v)
    }

    /// Clients that have the image open.
    pub async fn watchers(&self) -> Result<Vec<Watcher>> {
        self.watchers_of(&self.spec).await
    }

    /// Waits up to `timeout` for every client to close the image (a QEMU that just quit; a
    /// killed one's watch expires after about 30 s). Errs with [`ErrorKind::InUse`] when some
    /// are still there.
    pub async fn wait_unwatched(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let watchers = self.watchers().await?;
            if watchers.is_empty() {
                return Ok(());
            }
            if start.elapsed() >= timeout {
                return Err(self.in_use(&watchers, "it"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn in_use(&self, watchers: &[Watcher], what: &str) -> Error {
        let who: Vec<String> = watchers
            .iter()
            .take(3)
            .map(|w| format!("client.{} at {}", w.client, w.address))
            .collect();
        Error::new(
            ErrorKind::InUse,
            format!(
                "{} is open by {} client(s) ({}), e.g. a running QEMU; {what} would change data under them — \
                 stop the guest first; nothing was changed",
                self.spec,
                watchers.len(),
                who.join(", ")
            ),
        )
    }

    /// The clone parents of `spec` (nearest first) as specs with their snapshot.
    async fn chain_of(&self, info: &ImageInfo) -> Result<Vec<RbdSpec>> {
        let mut chain: Vec<RbdSpec> = Vec::new();
        let mut parent = info.parent.clone();
        while let Some(p) = parent {
            if chain.len() >= MAX_CHAIN {
                return Err(Error::corrupt(format!(
                    "{}: the clone chain is longer than {MAX_CHAIN} images (a loop?)",
                    self.spec
                )));
            }
            let image = self
                .spec
                .sibling(&p.pool, p.namespace.as_deref(), &p.image)?;
            let at = image.at_snapshot(&p.snapshot)?;
            let info = self.info_of(&image).await?;
            parent = info.parent;
            chain.push(at);
        }
        Ok(chain)
    }

    async fn listing(&self, with_watchers: bool) -> Result<RbdListing> {
        // Independent reads run at once (each rbd command costs tens of ms to connect).
        let watchers = async {
            if with_watchers {
                self.watchers().await.map(Some)
            } else {
                Ok(None)
            }
        };
        let (info, snaps, watchers) = tokio::join!(
            self.info_of(&self.spec),
            self.snaps_of(&self.spec),
            watchers
        );
        let (info, snaps, watchers) = (info?, snaps?, watchers?);
        let chain = self.chain_of(&info).await?;
        let watchers = watchers.map(|list| {
            list.iter()
                .map(|w| format!("client.{} at {}", w.client, w.address))
                .collect()
        });
        Ok(RbdListing {
            image: self.spec.to_string(),
            size: info.size,
            features: info.features,
            snapshots: snaps.iter().map(RbdSnapshot::from).collect(),
            chain: chain.iter().map(|c| c.to_string()).collect(),
            watchers,
        })
    }

    /// The snapshots with protection, the clone chain and the clients that have it open.
    pub async fn list_detailed(&self) -> Result<RbdListing> {
        self.listing(true).await
    }

    fn find<'a>(&self, snaps: &'a [SnapRow], name: &str) -> Result<&'a SnapRow> {
        snaps
            .iter()
            .find(|s| s.name == name)
            .or_else(|| snaps.iter().find(|s| s.id.to_string() == name))
            .ok_or_else(|| {
                Error::not_found(format!("no snapshot named {name:?}"))
                    .with_path(self.spec.to_path())
            })
    }

    fn refuse_taken(&self, snaps: &[SnapRow], name: &str) -> Result<()> {
        if snaps.iter().any(|s| s.name == name) {
            return Err(Error::new(
                ErrorKind::Exists,
                format!("a snapshot named {name:?} already exists"),
            )
            .with_path(self.spec.to_path()));
        }
        Ok(())
    }

    /// Takes snapshot `name` (`rbd snap create`); returns it as rbd lists it.
    pub async fn create_snapshot(&self, name: &str) -> Result<RbdSnapshot> {
        validate_snapshot_name(name)?;
        let snaps = self.snaps_of(&self.spec).await?;
        self.refuse_taken(&snaps, name)?;
        let at = self.spec.at_snapshot(name)?;
        self.rbd
            .run(&["snap".into(), "create".into(), at.arg()])
            .await
            .map_err(|e| self.image_error(&self.spec, e))?;
        let after = self.snaps_of(&self.spec).await?;
        self.find(&after, name).map(RbdSnapshot::from)
    }

    /// Where an external snapshot `name` puts its clone: `overlay` (same cluster), else
    /// `POOL[/NS]/IMAGE.NAME`. Checked: the snapshot name is free, the image can be cloned
    /// (layering), the clone's pool exists and the clone does not.
    pub async fn plan_clone(&self, name: &str, overlay: Option<&RbdSpec>) -> Result<RbdSpec> {
        validate_snapshot_name(name)?;
        let target = match overlay {
            Some(o) => {
                if o.snapshot().is_some() {
                    return Err(Error::invalid(format!(
                        "--overlay {o} names a snapshot; give the new image as rbd:POOL/IMAGE"
                    )));
                }
                let o = o.clone().inherit_cluster(&self.spec);
                if !o.same_cluster(&self.spec) {
                    return Err(Error::invalid(format!(
                        "--overlay {o} names another cluster (conf/id); a clone lives in its parent's cluster"
                    )));
                }
                o
            }
            None => self.spec.sibling(
                self.spec.pool(),
                self.spec.namespace(),
                &format!("{}.{name}", self.spec.image()),
            )?,
        };
        if target.same_image(&self.spec) {
            return Err(Error::invalid("the clone cannot be the image itself"));
        }
        let (info, snaps, existing) = tokio::join!(
            self.info_of(&self.spec),
            self.snaps_of(&self.spec),
            self.info_of(&target)
        );
        let info = info?;
        if !info.features.iter().any(|f| f == "layering") {
            return Err(Error::unsupported(format!(
                "{} lacks the layering feature, which clones need (`rbd feature enable` cannot add \
                 it; copy the image with `rbd deep cp` first)",
                self.spec
            )));
        }
        self.refuse_taken(&snaps?, name)?;
        match existing {
            Ok(_) => {
                return Err(Error::new(
                    ErrorKind::Exists,
                    format!("image {target} already exists"),
                ));
            }
            Err(e) if e.kind() == ErrorKind::NotFound && !e.message().contains("opening pool") => {}
            Err(e) => return Err(e.context(format!("new image {target}"))),
        }
        Ok(target)
    }

    /// An external snapshot: snapshot `name`, protect it, clone it into `overlay` (see
    /// [`plan_clone`](Self::plan_clone)), which becomes the active image. Undone when a step
    /// fails.
    pub async fn create_clone(&self, name: &str, overlay: Option<&RbdSpec>) -> Result<RbdSpec> {
        let target = self.plan_clone(name, overlay).await?;
        let at = self.spec.at_snapshot(name)?;
        self.rbd
            .run(&["snap".into(), "create".into(), at.arg()])
            .await
            .map_err(|e| self.image_error(&self.spec, e))?;
        let made = async {
            self.rbd
                .run(&["snap".into(), "protect".into(), at.arg()])
                .await?;
            self.rbd
                .run(&["clone".into(), at.arg(), target.image_arg()])
                .await
                .map(drop)
        }
        .await;
        if let Err(e) = made {
            let _ = self
                .rbd
                .run(&["snap".into(), "unprotect".into(), at.arg()])
                .await;
            if let Err(u) = self.rbd.run(&["snap".into(), "rm".into(), at.arg()]).await {
                tracing::warn!("undoing snapshot {at} failed: {u}");
            }
            return Err(self.image_error(&self.spec, e));
        }
        Ok(target)
    }

    /// Checks a clone of the existing snapshot `snap` into the new image `target` (same
    /// cluster): the snapshot exists, the image can be cloned (layering), `target` does not
    /// exist (its pool does). Returns the snapshot.
    pub async fn plan_clone_snapshot(&self, snap: &str, target: &RbdSpec) -> Result<RbdSnapshot> {
        validate_snapshot_name(snap)?;
        if target.snapshot().is_some() || target.same_image(&self.spec) {
            return Err(Error::invalid(format!(
                "{target}: a clone is a new image (rbd:POOL/IMAGE), not {}",
                self.spec
            )));
        }
        let (info, snaps, existing) = tokio::join!(
            self.info_of(&self.spec),
            self.snaps_of(&self.spec),
            self.info_of(target)
        );
        let info = info?;
        if !info.features.iter().any(|f| f == "layering") {
            return Err(Error::unsupported(format!(
                "{} lacks the layering feature, which clones need",
                self.spec
            )));
        }
        let snaps = snaps?;
        let row = self.find(&snaps, snap)?;
        match existing {
            Ok(_) => {
                return Err(Error::new(
                    ErrorKind::Exists,
                    format!("image {target} already exists"),
                ));
            }
            Err(e) if e.kind() == ErrorKind::NotFound && !e.message().contains("opening pool") => {}
            Err(e) => return Err(e.context(format!("new image {target}"))),
        }
        Ok(RbdSnapshot::from(row))
    }

    /// Clones the existing snapshot `snap` into the new image `target`: protects the snapshot
    /// when it is not yet (`rbd snap protect`), then `rbd clone` — metadata only, whatever the
    /// image's size. Idempotent: a `target` that already is a clone of `snap` is taken as done.
    pub async fn clone_snapshot(&self, snap: &str, target: &RbdSpec) -> Result<RbdSpec> {
        let target = target.clone().inherit_cluster(&self.spec);
        if let Ok(info) = self.info_of(&target).await
            && info.parent.as_ref().is_some_and(|p| {
                p.image == self.spec.image()
                    && p.pool == self.spec.pool()
                    && p.namespace.as_deref() == self.spec.namespace()
                    && p.snapshot == snap
            })
        {
            return Ok(target);
        }
        let row = self.plan_clone_snapshot(snap, &target).await?;
        self.protect_clone(&row.name, &target, !row.protected).await
    }

    /// Protects snapshot `snap` (when `protect`), then clones it into `target`; a protection
    /// this call added is taken back when the clone fails and no other clone uses it.
    async fn protect_clone(&self, snap: &str, target: &RbdSpec, protect: bool) -> Result<RbdSpec> {
        let at = self.spec.at_snapshot(snap)?;
        if protect {
            self.rbd
                .run(&["snap".into(), "protect".into(), at.arg()])
                .await
                .map_err(|e| self.image_error(&self.spec, e))?;
        }
        if let Err(e) = self
            .rbd
            .run(&["clone".into(), at.arg(), target.image_arg()])
            .await
        {
            if protect
                && self
                    .children_of(&self.spec, snap)
                    .await
                    .is_ok_and(|c| c.is_empty())
            {
                let _ = self
                    .rbd
                    .run(&["snap".into(), "unprotect".into(), at.arg()])
                    .await;
            }
            return Err(self.image_error(&self.spec, e));
        }
        Ok(target.clone())
    }

    /// The clones of this image's snapshot `snap` (in the trash too), as `rbd:...` specs in
    /// this image's cluster.
    pub async fn clones_of(&self, snap: &str) -> Result<Vec<RbdSpec>> {
        self.children_of(&self.spec, snap)
            .await?
            .iter()
            .map(|c| self.spec.sibling(&c.pool, c.namespace.as_deref(), &c.image))
            .collect()
    }

    /// Whether the image exists (its pool must).
    pub async fn exists(&self) -> Result<bool> {
        match self.info_of(&self.spec).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound && !e.message().contains("opening pool") => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Protects the existing snapshot `snap` and clones it into the new image `target`, without
    /// the reads [`clone_snapshot`](Self::clone_snapshot) checks with first: two rbd commands,
    /// for callers that checked with [`plan_clone`](Self::plan_clone) earlier and now hold a
    /// paused guest. The snapshot is unprotected again when the clone fails.
    pub async fn protect_and_clone(&self, snap: &str, target: &RbdSpec) -> Result<RbdSpec> {
        let target = target.clone().inherit_cluster(&self.spec);
        self.protect_clone(snap, &target, true).await
    }

    /// Removes the image itself (`rbd rm`; it must have no snapshots). An image that does not
    /// exist is taken as removed.
    pub async fn remove_image(&self) -> Result<()> {
        match self
            .rbd
            .run_with(&["rm".into(), self.spec.image_arg()], None)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound && !e.message().contains("opening pool") => {
                Ok(())
            }
            Err(e) => Err(self.image_error(&self.spec, e)),
        }
    }

    /// Copies the parent's data into the image so it stands alone (`rbd flatten`); an image
    /// without a parent is left as it is.
    pub async fn flatten(&self) -> Result<()> {
        let info = self.info_of(&self.spec).await?;
        if info.parent.is_none() {
            return Ok(());
        }
        self.rbd
            .run_with(&["flatten".into(), self.spec.image_arg()], None)
            .await
            .map(drop)
            .map_err(|e| self.image_error(&self.spec, e))
    }

    /// Rolls the image back to snapshot `name` (`rbd snap rollback`); refused while clients
    /// have it open.
    pub async fn revert_snapshot(&self, name: &str) -> Result<RbdSnapshot> {
        let snap = self.plan_revert_snapshot(name).await?;
        let at = self.spec.at_snapshot(&snap.name)?;
        self.rbd
            .run_with(&["snap".into(), "rollback".into(), at.arg()], None)
            .await
            .map_err(|e| self.image_error(&self.spec, e))?;
        Ok(snap)
    }

    /// Checks a rollback to snapshot `name` (it exists, no client has the image open) without
    /// doing it.
    pub async fn plan_revert_snapshot(&self, name: &str) -> Result<RbdSnapshot> {
        let (snaps, watchers) = tokio::join!(self.snaps_of(&self.spec), self.watchers());
        let snaps = snaps?;
        let snap = self.find(&snaps, name)?;
        let watchers = watchers?;
        if !watchers.is_empty() {
            return Err(self.in_use(&watchers, "a rollback"));
        }
        Ok(RbdSnapshot::from(snap))
    }

    /// Removes snapshot `name` (`rbd snap rm`, after `unprotect` when it is protected); refused
    /// while clones depend on it.
    pub async fn delete_snapshot(&self, name: &str) -> Result<RbdSnapshot> {
        let snap = self.plan_delete_snapshot(name).await?;
        let at = self.spec.at_snapshot(&snap.name)?;
        if snap.protected {
            self.rbd
                .run(&["snap".into(), "unprotect".into(), at.arg()])
                .await
                .map_err(|e| self.image_error(&self.spec, e))?;
        }
        if let Err(e) = self.rbd.run(&["snap".into(), "rm".into(), at.arg()]).await {
            if snap.protected {
                let _ = self
                    .rbd
                    .run(&["snap".into(), "protect".into(), at.arg()])
                    .await;
            }
            return Err(self.image_error(&self.spec, e));
        }
        Ok(snap)
    }

    /// Checks the removal of snapshot `name` (it exists, no clone depends on it) without doing
    /// it.
    pub async fn plan_delete_snapshot(&self, name: &str) -> Result<RbdSnapshot> {
        // The clones are asked for at once under the given name (usually the snapshot's).
        let early = async {
            match validate_snapshot_name(name) {
                Ok(()) => Some(self.children_of(&self.spec, name).await),
                Err(_) => None,
            }
        };
        let (snaps, early) = tokio::join!(self.snaps_of(&self.spec), early);
        let snaps = snaps?;
        let snap = self.find(&snaps, name)?;
        let children = match early {
            Some(Ok(children)) if snap.name == name => children,
            _ => self.children_of(&self.spec, &snap.name).await?,
        };
        if !children.is_empty() {
            let names: Vec<String> = children
                .iter()
                .map(|c| spec_of_child(&self.spec, c))
                .collect::<Result<_>>()?;
            return Err(Error::new(
                ErrorKind::InUse,
                format!(
                    "snapshot {:?} has {} clone(s) depending on it ({}): flatten them first \
                     (`snapctl disk delete CLONE --layer {}`); nothing was changed",
                    snap.name,
                    children.len(),
                    names.join(", "),
                    self.spec
                ),
            )
            .with_path(self.spec.to_path()));
        }
        Ok(RbdSnapshot::from(snap))
    }

    /// Finds `layer` (an image, optionally `@SNAP`) in the chain; returns its index and the
    /// chain.
    async fn locate_layer(&self, layer: &Path) -> Result<(usize, Vec<RbdSpec>)> {
        let want = RbdSpec::from_path(layer)?.inherit_cluster(&self.spec);
        let info = self.info_of(&self.spec).await?;
        let chain = self.chain_of(&info).await?;
        let index = chain
            .iter()
            .position(|c| {
                c.same_image(&want) && want.snapshot().is_none_or(|s| c.snapshot() == Some(s))
            })
            .ok_or_else(|| {
                let have: Vec<String> = chain.iter().map(|c| c.to_string()).collect();
                Error::not_found(format!(
                    "{want} is not a clone parent of this image (its chain: {})",
                    if have.is_empty() {
                        "none, it is not a clone".to_string()
                    } else {
                        have.join(" <- ")
                    }
                ))
                .with_path(self.spec.to_path())
            })?;
        Ok((index, chain))
    }

    /// Makes the image an empty clone of layer `layer`'s snapshot, dropping its data: the clone
    /// is made under a temporary name, the image removed, the clone renamed. Refused while the
    /// image has snapshots (they would be lost) or clients.
    pub async fn revert_to_layer(&self, layer: &Path) -> Result<RbdSpec> {
        let base = self.plan_revert_to_layer(layer).await?;
        let tmp = self.spec.sibling(
            self.spec.pool(),
            self.spec.namespace(),
            &format!(
                "{}.snapctl-revert-{}",
                self.spec.image(),
                std::process::id()
            ),
        )?;
        self.rbd
            .run(&["clone".into(), base.arg(), tmp.image_arg()])
            .await
            .map_err(|e| self.image_error(&self.spec, e))?;
        if let Err(e) = self
            .rbd
            .run_with(&["rm".into(), self.spec.image_arg()], None)
            .await
        {
            let _ = self.rbd.run(&["rm".into(), tmp.image_arg()]).await;
            return Err(self.image_error(&self.spec, e));
        }
        self.rbd
            .run(&["rename".into(), tmp.image_arg(), self.spec.image_arg()])
            .await
            .map_err(|e| {
                e.context(format!(
                    "the image was removed and its new clone is still named {tmp}; rename it with \
                     `rbd rename {} {}`",
                    tmp.image_arg(),
                    self.spec.image_arg()
                ))
            })?;
        Ok(base)
    }

    /// Checks a revert to layer `layer` (it is in the chain; the image has no snapshots and no
    /// clients); returns the layer's snapshot the new clone will hang off.
    pub async fn plan_revert_to_layer(&self, layer: &Path) -> Result<RbdSpec> {
        let (index, chain) = self.locate_layer(layer).await?;
        let base = chain
            .get(index)
            .cloned()
            .ok_or_else(|| Error::not_found("layer vanished from the chain"))?;
        let snaps = self.snaps_of(&self.spec).await?;
        if !snaps.is_empty() {
            let names: Vec<&str> = snaps.iter().map(|s| s.name.as_str()).collect();
            return Err(Error::unsupported(format!(
                "{} has snapshots ({}), which replacing it by a new clone would drop; delete them first; nothing was changed",
                self.spec,
                names.join(", ")
            )));
        }
        let watchers = self.watchers().await?;
        if !watchers.is_empty() {
            return Err(self.in_use(&watchers, "a revert"));
        }
        Ok(base)
    }

    /// Plans a layer delete: which image is flattened, and whether the layer image can go.
    pub async fn plan_delete_layer(&self, layer: &Path) -> Result<LayerPlan> {
        let (index, chain) = self.locate_layer(layer).await?;
        let at = chain
            .get(index)
            .cloned()
            .ok_or_else(|| Error::not_found("layer vanished from the chain"))?;
        let child = match index.checked_sub(1) {
            Some(i) => chain
                .get(i)
                .map(RbdSpec::without_snapshot)
                .ok_or_else(|| Error::not_found("layer child vanished from the chain"))?,
            None => self.spec.clone(),
        };
        let snapshot = at.snapshot().unwrap_or_default().to_string();
        let layer_image = at.without_snapshot();
        let (other_users, other_snapshots) = self
            .layer_users(&layer_image, &snapshot, Some(&child))
            .await?;
        Ok(LayerPlan {
            layer: layer_image,
            snapshot,
            child,
            other_users,
            other_snapshots,
        })
    }

    /// Clones of any snapshot of `layer` (but `except`), and snapshots of `layer` other than
    /// `branch`.
    async fn layer_users(
        &self,
        layer: &RbdSpec,
        branch: &str,
        except: Option<&RbdSpec>,
    ) -> Result<(Vec<String>, Vec<String>)> {
        let snaps = self.snaps_of(layer).await?;
        let mut users = Vec::new();
        for s in &snaps {
            for c in self.children_of(layer, &s.name).await? {
                let spec = layer.sibling(&c.pool, c.namespace.as_deref(), &c.image)?;
                if !except.is_some_and(|e| spec.same_image(e)) {
                    users.push(spec.to_string());
                }
            }
        }
        let others = snaps
            .iter()
            .filter(|s| s.name != branch)
            .map(|s| s.name.clone())
            .collect();
        Ok((users, others))
    }

    /// Deletes a layer: flattens its child in the chain (which then reads nothing through it),
    /// then removes the layer image unless something else still uses it.
    pub async fn delete_layer(&self, layer: &Path) -> Result<LayerOutcome> {
        let plan = self.plan_delete_layer(layer).await?;
        self.rbd
            .run_with(&["flatten".into(), plan.child.image_arg()], None)
            .await
            .map_err(|e| self.image_error(&plan.child, e))?;
        // Look again: a child whose snapshots still read through the layer (no deep-flatten)
        // keeps it too.
        let (users, others) = self.layer_users(&plan.layer, &plan.snapshot, None).await?;
        let mut reason = LayerPlan {
            other_users: users,
            other_snapshots: others,
            ..plan.clone()
        }
        .keep_reason();
        if reason.is_none() {
            let watchers = self.watchers_of(&plan.layer).await?;
            if !watchers.is_empty() {
                reason = Some(format!("{} client(s) have it open", watchers.len()));
            }
        }
        if let Some(why) = reason {
            return Ok(LayerOutcome {
                plan,
                removed: false,
                kept_because: Some(why),
            });
        }
        let at = plan.layer.at_snapshot(&plan.snapshot)?;
        let snaps = self.snaps_of(&plan.layer).await?;
        if snaps.iter().any(|s| s.name == plan.snapshot && s.protected) {
            self.rbd
                .run(&["snap".into(), "unprotect".into(), at.arg()])
                .await
                .map_err(|e| self.image_error(&plan.layer, e))?;
        }
        if snaps.iter().any(|s| s.name == plan.snapshot) {
            self.rbd
                .run(&["snap".into(), "rm".into(), at.arg()])
                .await
                .map_err(|e| self.image_error(&plan.layer, e))?;
        }
        self.rbd
            .run_with(&["rm".into(), plan.layer.image_arg()], None)
            .await
            .map_err(|e| self.image_error(&plan.layer, e))?;
        Ok(LayerOutcome {
            plan,
            removed: true,
            kept_because: None,
        })
    }

    /// Writes the image (or its snapshot `snapshot`) to the new file `out` as raw, sparse
    /// (`rbd export`).
    pub async fn export(&self, snapshot: Option<&str>, out: &Path) -> Result<()> {
        let out_text = check_out(out)?;
        let source = self.export_source(snapshot).await?;
        self.rbd
            .run_with(&["export".into(), source.arg(), out_text], None)
            .await
            .map(drop)
            .map_err(|e| self.image_error(&self.spec, e))
    }

    /// Writes the changes since snapshot `since` up to `snapshot` (or the image now) to the new
    /// file `out` in rbd's diff format (`rbd export-diff --from-snap`): an incremental backup.
    pub async fn export_diff(&self, since: &str, snapshot: Option<&str>, out: &Path) -> Result<()> {
        let out_text = check_out(out)?;
        let snaps = self.snaps_of(&self.spec).await?;
        let from = self.find(&snaps, since)?.name.clone();
        let source = self.export_source(snapshot).await?;
        self.rbd
            .run_with(
                &[
                    "export-diff".into(),
                    "--from-snap".into(),
                    from,
                    source.arg(),
                    out_text,
                ],
                None,
            )
            .await
            .map(drop)
            .map_err(|e| self.image_error(&self.spec, e))
    }

    /// What `rbd export SPEC -` of the image (or its snapshot `snapshot`) streams: the source
    /// (`POOL/IMAGE[@SNAP]`) and its size in bytes. Checked now (unknown image or snapshot are
    /// errors); the caller runs the stream (`rbd().command(...)`).
    pub async fn export_stream(&self, snapshot: Option<&str>) -> Result<(RbdSpec, u64)> {
        match snapshot {
            Some(name) => {
                let snaps = self.snaps_of(&self.spec).await?;
                let snap = self.find(&snaps, name)?;
                Ok((self.spec.at_snapshot(&snap.name)?, snap.size))
            }
            None => {
                let info = self.info_of(&self.spec).await?;
                Ok((self.spec.clone(), info.size))
            }
        }
    }

    /// The arguments of `rbd export-diff --from-snap SINCE SPEC -`: the changes since snapshot
    /// `since` up to `snapshot` (or the image now) in rbd's diff format on stdout. Both checked
    /// now.
    pub async fn export_diff_args(
        &self,
        since: &str,
        snapshot: Option<&str>,
    ) -> Result<Vec<String>> {
        let snaps = self.snaps_of(&self.spec).await?;
        let from = self.find(&snaps, since)?.name.clone();
        let source = self.export_source(snapshot).await?;
        Ok(vec![
            "export-diff".into(),
            "--from-snap".into(),
            from,
            source.arg(),
            "-".into(),
        ])
    }

    async fn export_source(&self, snapshot: Option<&str>) -> Result<RbdSpec> {
        match snapshot {
            Some(name) => {
                let snaps = self.snaps_of(&self.spec).await?;
                let snap = self.find(&snaps, name)?;
                self.spec.at_snapshot(&snap.name)
            }
            None => {
                self.info_of(&self.spec).await?;
                Ok(self.spec.clone())
            }
        }
    }
}

fn check_out(out: &Path) -> Result<String> {
    if out.symlink_metadata().is_ok() {
        return Err(Error::new(ErrorKind::Exists, "the output file already exists").with_path(out));
    }
    let text = out
        .to_str()
        .ok_or_else(|| Error::invalid("output path is not UTF-8").with_path(out))?;
    if text.starts_with('-') {
        return Err(Error::invalid("output path starts with '-'").with_path(out));
    }
    Ok(text.to_string())
}

#[async_trait]
impl DiskBackend for RbdBackend {
    fn format(&self) -> DiskFormat {
        DiskFormat::Rbd
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            internal: true,
            external: true,
            offline: true,
            online: true,
        }
    }

    async fn list(&self) -> Result<DiskListing> {
        Ok(self.listing(false).await?.to_disk_listing())
    }

    async fn create(&self, request: &CreateRequest) -> Result<CreateOutcome> {
        match request {
            CreateRequest::Internal { name } => {
                let snap = self.create_snapshot(name).await?;
                Ok(CreateOutcome {
                    active: self.spec.to_path(),
                    id: Some(snap.id.to_string()),
                })
            }
            CreateRequest::External { name, overlay } => {
                let overlay = overlay.as_deref().map(RbdSpec::from_path).transpose()?;
                let clone = self.create_clone(name, overlay.as_ref()).await?;
                Ok(CreateOutcome {
                    active: clone.to_path(),
                    id: None,
                })
            }
        }
    }

    async fn revert(&self, target: &Target) -> Result<()> {
        match target {
            Target::Internal(name) => self.revert_snapshot(name).await.map(drop),
            Target::Layer(layer) => self.revert_to_layer(layer).await.map(drop),
        }
    }

    async fn delete(&self, target: &Target) -> Result<()> {
        match target {
            Target::Internal(name) => self.delete_snapshot(name).await.map(drop),
            Target::Layer(layer) => {
                let outcome = self.delete_layer(layer).await?;
                if let Some(why) = &outcome.kept_because {
                    tracing::info!("kept {}: {why}", outcome.plan.layer);
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::{BASE_INFO, SNAPS};

    #[tokio::test]
    async fn refuses_before_running_rbd() {
        let b = RbdBackend::new("rbd:p/i")
            .unwrap()
            .with_rbd(Rbd::default().with_binary("/nonexistent/rbd"));
        assert_eq!(b.format(), DiskFormat::Rbd);
        assert_eq!(
            RbdBackend::new("rbd:p/i@s").unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        assert_eq!(
            RbdBackend::new("/dev/vg/lv").unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        for bad in ["-s", "a/b", "a@b", ""] {
            let e = b.create_snapshot(bad).await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}: {e}");
        }
        let e = b
            .create(&CreateRequest::External {
                name: "s".into(),
                overlay: Some("rbd:p/x@s".into()),
            })
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        let e = b
            .create(&CreateRequest::External {
                name: "s".into(),
                overlay: Some("rbd:p/x:conf=/other.conf".into()),
            })
            .await
            .unwrap_err();
        assert!(e.message().contains("another cluster"), "{e}");
        let e = b
            .delete(&Target::Layer("/x.qcow2".into()))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        let e = b.export(None, Path::new("/")).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Exists);
        // Reaching rbd fails cleanly without the binary.
        let e = b.list().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.message().contains("ceph-common installed"), "{e}");
    }

    #[test]
    fn listing_model() {
        let info = parse_info(&serde_json::from_str(BASE_INFO).unwrap()).unwrap();
        let snaps = parse_snaps(&serde_json::from_str(SNAPS).unwrap()).unwrap();
        let l = RbdListing {
            image: "rbd:rbd/a".into(),
            size: info.size,
            features: info.features,
            snapshots: snaps.iter().map(RbdSnapshot::from).collect(),
            chain: vec!["rbd:rbd/g@base".into()],
            watchers: None,
        };
        let d = l.to_disk_listing();
        assert_eq!(d.format, DiskFormat::Rbd);
        assert_eq!(d.snapshots[0].id, "6");
        assert_eq!(d.snapshots[0].name, "s1");
        assert_eq!(d.snapshots[1].disk_size, Some(32 << 20));
        assert_eq!(d.chain[0].path, PathBuf::from("rbd:rbd/g@base"));
        assert_eq!(d.chain[0].format, DiskFormat::Rbd);
    }

    #[test]
    fn keep_reasons() {
        let spec = RbdSpec::parse("rbd:p/g").unwrap();
        let mut plan = LayerPlan {
            layer: spec.clone(),
            snapshot: "base".into(),
            child: RbdSpec::parse("rbd:p/vm1").unwrap(),
            other_users: vec![],
            other_snapshots: vec![],
        };
        assert_eq!(plan.keep_reason(), None);
        plan.other_snapshots = vec!["old".into()];
        assert!(
            plan.keep_reason()
                .unwrap()
                .contains("other snapshots (old)")
        );
        plan.other_users = vec!["rbd:p/vm2".into()];
        assert!(plan.keep_reason().unwrap().contains("parent of rbd:p/vm2"));
    }
}
