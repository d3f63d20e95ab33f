//! Online disk operations: the disk is open in a running QEMU (or qemu-storage-daemon), so every
//! change goes through QMP and the image files are never opened here.
//!
//! An [`OnlineDisk`] names a block node in that QEMU. The node given by the user is followed up
//! to the active top of its chain (the node no other node uses as its backing), so a node name
//! keeps naming the disk after an external snapshot put a new overlay above it.
//!
//! - [`OnlineDisk::list`] reads `query-named-block-nodes` (the node's image, its internal snapshots)
//!   and the backing chain from QEMU's block graph.
//! - [`OnlineDisk::create_internal`] / [`OnlineDisk::delete_internal`] run
//!   `blockdev-snapshot-internal-sync` / `blockdev-snapshot-delete-internal-sync`.
//! - [`OnlineDisk::create_external`] runs `blockdev-snapshot-sync` (QEMU creates the overlay and
//!   records the backing format).
//! - [`OnlineDisk::delete_layer`] runs a `block-stream` job into the layer's child, followed through
//!   `JOB_STATUS_CHANGE` events, cancellable.
//! - [`OnlineDisk::commit_layer`] runs a `block-commit` job that merges a backing layer into
//!   its own backing (allowed only when nothing else in QEMU uses that backing);
//!   [`OnlineDisk::commit_active`] folds the active layer into its backing (active commit:
//!   `BLOCK_JOB_READY`, `job-complete`, pivot). [`OnlineDisk::plan_layer`] compares both ways
//!   and [`OnlineDisk::remove_layer`] runs the [`LayerStrategy`] chosen.
//! - [`create_many_internal`] / [`create_many_external`] snapshot several disks atomically (all
//!   or none) with one QMP `transaction`.
//! - reverting is refused: see [`revert_refusal`].

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};
use snap_core::qmp::{Event, QmpClient, QmpError};
use snap_core::{ChainLayer, DiskFormat, DiskListing, Error, ErrorKind, Result, SnapshotInfo};

/// How long connecting to the QMP socket may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a running block job's progress is polled (`query-jobs`) between its events.
const JOB_POLL: Duration = Duration::from_millis(200);

/// The longest node name QEMU accepts (its `id_wellformed` limit is 31 characters).
const MAX_NODE_NAME: usize = 31;

/// The error for `disk revert --qmp`: a revert replaces the data a running guest reads.
pub fn revert_refusal() -> Error {
    Error::unsupported(
        "reverting a disk that a running guest uses is not a QMP operation: stop the guest first \
         (the domain layer does this)",
    )
}

/// One block node as QEMU reports it (the parts used here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockNode {
    /// The node name (auto-generated ones start with `#`).
    pub name: String,
    /// The driver (`qcow2`, `raw`, `file`, ...).
    pub driver: String,
    /// The file name QEMU reports for it.
    pub file: PathBuf,
}

/// A disk in a running QEMU: its QMP connection and the node the user named.
#[derive(Debug)]
pub struct OnlineDisk {
    qmp: Arc<QmpClient>,
    node: String,
}

/// What [`OnlineDisk::create_external`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalOutcome {
    /// The new overlay file, now the active layer.
    pub overlay: PathBuf,
    /// Its node name in QEMU.
    pub node: String,
    /// The node it was put on (now its backing).
    pub backing_node: String,
}

/// Settings for [`OnlineDisk::delete_layer`].
#[derive(Debug, Clone, Default)]
pub struct StreamOptions {
    /// Rate limit for the job in bytes per second (`None`: unlimited).
    pub speed: Option<u64>,
}

/// What [`OnlineDisk::delete_layer`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerOutcome {
    /// The layer whose data was streamed.
    pub layer: PathBuf,
    /// The node that received the data (the layer's child).
    pub child: BlockNode,
    /// The child's new backing node, `None` when it has no backing any more.
    pub new_backing: Option<BlockNode>,
    /// Bytes the job reported as processed.
    pub bytes: u64,
}

/// The block graph: every named node and the backing edges between them.
#[derive(Debug, Default)]
struct Graph {
    /// Flat `query-named-block-nodes` entries by node name.
    nodes: HashMap<String, Value>,
    /// node -> its backing node.
    backing: HashMap<String, String>,
    /// node -> every user of it in QEMU's graph (other nodes, block backends of devices and
    /// exports, jobs), each as `KIND NAME (EDGE)`; `None` when the graph command is missing.
    users: Option<HashMap<String, Vec<String>>>,
}

impl Graph {
    fn node(&self, name: &str) -> Result<&Value> {
        self.nodes
            .get(name)
            .ok_or_else(|| Error::not_found(format!("QEMU has no block node named {name:?}")))
    }

    fn info(&self, name: &str) -> Result<BlockNode> {
        let v = self.node(name)?;
        Ok(BlockNode {
            name: name.to_string(),
            driver: str_field(v, "drv").unwrap_or_default(),
            file: PathBuf::from(str_field(v, "file").unwrap_or_default()),
        })
    }

    /// The nodes that use `name` as their backing.
    fn backing_parents(&self, name: &str) -> Vec<String> {
        let mut parents: Vec<String> = self
            .backing
            .iter()
            .filter(|(_, child)| child.as_str() == name)
            .map(|(parent, _)| parent.clone())
            .collect();
        parents.sort();
        parents
    }

    /// `start` followed up the backing edges to the active top.
    fn top_of(&self, start: &str) -> Result<String> {
        self.node(start)?;
        let mut top = start.to_string();
        for _ in 0..=self.nodes.len() {
            let parents = self.backing_parents(&top);
            match parents.as_slice() {
                [] => return self.attached(top),
                [one] => top = one.clone(),
                many => {
                    return Err(Error::invalid(format!(
                        "node {top:?} is the backing of several nodes ({}); name the active node with --node",
                        many.join(", ")
                    )));
                }
            }
        }
        Err(Error::corrupt(format!(
            "QEMU's block graph has a backing loop above node {start:?}"
        )))
    }

    /// `top` itself when something in QEMU uses it (a device, an export, a job); a node nothing
    /// uses is left over — e.g. the old base after its data was streamed into an overlay, which
    /// QEMU keeps open but detached — and acting on it would miss the guest's disk.
    fn attached(&self, top: String) -> Result<String> {
        match &self.users {
            Some(users) if users.get(&top).is_none_or(|u| u.is_empty()) => {
                Err(Error::invalid(format!(
                    "node {top:?} is not used by any device, export or job in QEMU (a detached node, e.g. a \
                 base whose data was streamed into an overlay); name the node the device uses now (see \
                 `query-block`)"
                )))
            }
            _ => Ok(top),
        }
    }

    /// `top` and its backing nodes, top first.
    fn chain(&self, top: &str) -> Result<Vec<String>> {
        let mut chain = vec![top.to_string()];
        let mut at = top.to_string();
        while let Some(next) = self.backing.get(&at) {
            if chain.contains(next) {
                return Err(Error::corrupt(format!(
                    "QEMU's block graph has a backing loop at node {next:?}"
                )));
            }
            chain.push(next.clone());
            at = next.clone();
        }
        Ok(chain)
    }
}

fn str_field(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_string)
}

fn u64_field(v: &Value, key: &str) -> u64 {
    v.get(key)
        .and_then(|x| x.as_u64().or_else(|| x.as_i64().map(|i| i.max(0) as u64)))
        .unwrap_or(0)
}

/// Whether `name` is a node name QEMU accepts: a letter first, then letters, digits, `-`, `.`,
/// `_`; at most 31 characters.
fn valid_node_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
        && name.len() <= MAX_NODE_NAME
}

/// A node name for the overlay of snapshot `snap` on `node`: `NODE-SNAP` made valid.
fn overlay_node_name(node: &str, snap: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-._".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    let mut name = format!("{}-{}", clean(node.trim_start_matches('#')), clean(snap));
    if !name.chars().next().is_some_and(|c| c.is_ascii_alphabetic()) {
        name.insert(0, 'n');
    }
    name.chars().take(MAX_NODE_NAME).collect()
}

/// Whether two paths name the same file (canonically when both exist, else literally).
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

fn snapshot_from(v: &Value) -> SnapshotInfo {
    let clock = u64_field(v, "vm-clock-sec")
        .saturating_mul(1_000_000_000)
        .saturating_add(u64_field(v, "vm-clock-nsec"));
    SnapshotInfo {
        id: str_field(v, "id").unwrap_or_default(),
        name: str_field(v, "name").unwrap_or_default(),
        vm_state_size: u64_field(v, "vm-state-size"),
        date_sec: u64_field(v, "date-sec"),
        date_nsec: u32::try_from(u64_field(v, "date-nsec")).unwrap_or(0),
        vm_clock_ns: clock,
        disk_size: None,
    }
}

fn format_of(image: &Value, driver: &str) -> Result<DiskFormat> {
    let name = str_field(image, "format").unwrap_or_else(|| driver.to_string());
    DiskFormat::parse(&name).map_err(|_| {
        Error::unsupported(format!(
            "the node's format {name:?} is not one snapctl handles"
        ))
    })
}

/// Reads QEMU's block graph: the named nodes, the backing edges and every node's users.
async fn graph_of(qmp: &QmpClient) -> Result<Graph> {
    let list = qmp
        .execute_raw("query-named-block-nodes", json!({"flat": true}))
        .await?;
    let mut graph = Graph::default();
    for node in list.as_array().into_iter().flatten() {
        if let Some(name) = str_field(node, "node-name").filter(|n| !n.is_empty()) {
            graph.nodes.insert(name, node.clone());
        }
    }
    match qmp
        .execute_raw("x-debug-query-block-graph", Value::Null)
        .await
    {
        Ok(g) => {
            let mut names = HashMap::new();
            let mut labels = HashMap::new();
            for n in g
                .get("nodes")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let Some(id) = n.get("id").and_then(Value::as_u64) else {
                    continue;
                };
                let kind = str_field(n, "type").unwrap_or_default();
                let name = str_field(n, "name").unwrap_or_default();
                let label = if name.is_empty() {
                    format!("{kind} #{id}")
                } else {
                    format!("{kind} {name}")
                };
                labels.insert(id, label);
                if kind == "block-driver" && !name.is_empty() {
                    names.insert(id, name);
                }
            }
            let mut users: HashMap<String, Vec<String>> = HashMap::new();
            for e in g
                .get("edges")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let child = e
                    .get("child")
                    .and_then(Value::as_u64)
                    .and_then(|id| names.get(&id));
                let parent = e
                    .get("parent")
                    .and_then(Value::as_u64)
                    .and_then(|id| labels.get(&id));
                if let (Some(child), Some(parent)) = (child, parent) {
                    users.entry(child.clone()).or_default().push(format!(
                        "{parent} ({})",
                        str_field(e, "name").unwrap_or_default()
                    ));
                }
                if e.get("name").and_then(Value::as_str) != Some("backing") {
                    continue;
                }
                let end = |k: &str| {
                    e.get(k)
                        .and_then(Value::as_u64)
                        .and_then(|id| names.get(&id))
                };
                if let (Some(parent), Some(child)) = (end("parent"), end("child")) {
                    graph.backing.insert(parent.clone(), child.clone());
                }
            }
            graph.users = Some(users);
        }
        Err(e) if QmpError::of(&e).is_some() => {
            // No graph command: match each node's backing file name to the one format node
            // that has that file open.
            tracing::debug!(error = %e, "no x-debug-query-block-graph; matching backing files by name");
            let mut edges = Vec::new();
            for (name, v) in &graph.nodes {
                let Some(image) = v.get("image") else {
                    continue;
                };
                let Some(backing) = str_field(image, "full-backing-filename")
                    .or_else(|| str_field(image, "backing-filename"))
                else {
                    continue;
                };
                let candidates: Vec<&String> = graph
                    .nodes
                    .iter()
                    .filter(|(other, w)| {
                        *other != name
                            && str_field(w, "file").as_deref() == Some(backing.as_str())
                            && w.get("image")
                                .and_then(|i| str_field(i, "format"))
                                .as_deref()
                                == str_field(w, "drv").as_deref()
                            && str_field(w, "drv").as_deref() != Some("file")
                    })
                    .map(|(other, _)| other)
                    .collect();
                if let [one] = candidates.as_slice() {
                    edges.push((name.clone(), (*one).clone()));
                }
            }
            graph.backing.extend(edges);
        }
        Err(e) => return Err(e),
    }
    Ok(graph)
}

impl OnlineDisk {
    /// Connects to the QMP socket and checks that `node` exists there.
    pub async fn connect(socket: &Path, node: &str) -> Result<OnlineDisk> {
        let qmp = QmpClient::connect(socket, CONNECT_TIMEOUT).await?;
        let disk = Self::from_client(qmp, node);
        disk.graph().await?.node(node)?;
        Ok(disk)
    }

    /// Wraps an existing connection.
    pub fn from_client(qmp: QmpClient, node: &str) -> OnlineDisk {
        Self::from_shared(Arc::new(qmp), node)
    }

    /// Uses a connection shared with other users (one QMP monitor serves one client at a time,
    /// so a caller that also pauses the guest or saves its memory lends its connection).
    pub fn from_shared(qmp: Arc<QmpClient>, node: &str) -> OnlineDisk {
        OnlineDisk {
            qmp,
            node: node.to_string(),
        }
    }

    /// The QMP connection.
    pub fn client(&self) -> &QmpClient {
        &self.qmp
    }

    /// The node name the user gave.
    pub fn node(&self) -> &str {
        &self.node
    }

    async fn graph(&self) -> Result<Graph> {
        graph_of(&self.qmp).await
    }

    /// The active node of the disk: the user's node followed up to the top of its chain.
    pub async fn active_node(&self) -> Result<BlockNode> {
        let graph = self.graph().await?;
        let top = graph.top_of(&self.node)?;
        graph.info(&top)
    }

    /// The nodes of the disk's chain, active first, each with its file.
    pub async fn chain_nodes(&self) -> Result<Vec<BlockNode>> {
        let graph = self.graph().await?;
        let top = graph.top_of(&self.node)?;
        graph.chain(&top)?.iter().map(|n| graph.info(n)).collect()
    }

    /// Checks that `image` is a file of this disk's chain (so the user did not pair a path with
    /// another disk's node).
    pub async fn check_image(&self, image: &Path) -> Result<()> {
        let chain = self.chain_nodes().await?;
        if chain.iter().any(|n| same_file(&n.file, image)) {
            return Ok(());
        }
        let files: Vec<String> = chain.iter().map(|n| n.file.display().to_string()).collect();
        Err(Error::invalid(format!(
            "node {:?} is not this image: its chain is {}",
            self.node,
            files.join(" <- ")
        ))
        .with_path(image))
    }

    /// The disk's listing as QEMU sees it: the active node's image, its internal snapshots and
    /// its backing chain (parent first, base last).
    pub async fn list(&self) -> Result<DiskListing> {
        let graph = self.graph().await?;
        let top = graph.top_of(&self.node)?;
        let chain = graph.chain(&top)?;
        let node = graph.node(&top)?;
        let image = node.get("image").cloned().unwrap_or(Value::Null);
        let driver = str_field(node, "drv").unwrap_or_default();
        let mut layers = Vec::new();
        for name in chain.iter().skip(1) {
            let v = graph.node(name)?;
            let img = v.get("image").cloned().unwrap_or(Value::Null);
            layers.push(ChainLayer {
                path: PathBuf::from(
                    str_field(v, "file")
                        .or_else(|| str_field(&img, "filename"))
                        .unwrap_or_default(),
                ),
                format: format_of(&img, &str_field(v, "drv").unwrap_or_default())?,
            });
        }
        Ok(DiskListing {
            image: PathBuf::from(
                str_field(node, "file")
                    .or_else(|| str_field(&image, "filename"))
                    .unwrap_or_default(),
            ),
            format: format_of(&image, &driver)?,
            virtual_size: u64_field(&image, "virtual-size"),
            snapshots: image
                .get("snapshots")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(snapshot_from)
                .collect(),
            chain: layers,
        })
    }

    /// Creates internal snapshot `name` in the active node's image. A name (or id) already in
    /// use is refused before QEMU is asked.
    pub async fn create_internal(&self, name: &str) -> Result<SnapshotInfo> {
        snap_core::model::validate_snapshot_name(name)?;
        let listing = self.list().await?;
        if listing
            .snapshots
            .iter()
            .any(|s| s.name == name || s.id == name)
        {
            return Err(Error::new(
                ErrorKind::Exists,
                format!("a snapshot named {name:?} already exists"),
            )
            .with_path(&listing.image));
        }
        let top = self.active_node().await?;
        self.qmp
            .execute_raw(
                "blockdev-snapshot-internal-sync",
                json!({"device": top.name, "name": name}),
            )
            .await?;
        let after = self.list().await?;
        after
            .snapshots
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Command,
                    format!("QEMU reported success but does not list snapshot {name:?}"),
                )
            })
    }

    /// Deletes internal snapshot `name` (a name, else an id) from the active node's image.
    pub async fn delete_internal(&self, name: &str) -> Result<SnapshotInfo> {
        let listing = self.list().await?;
        let Some(snap) = listing
            .snapshots
            .iter()
            .find(|s| s.name == name)
            .or_else(|| listing.snapshots.iter().find(|s| s.id == name))
            .cloned()
        else {
            return Err(
                Error::not_found(format!("no snapshot named {name:?}")).with_path(&listing.image)
            );
        };
        let top = self.active_node().await?;
        self.qmp
            .execute_raw(
                "blockdev-snapshot-delete-internal-sync",
                json!({"device": top.name, "id": snap.id, "name": snap.name}),
            )
            .await?;
        Ok(snap)
    }

    /// The overlay path and node name [`create_external`](Self::create_external) would use,
    /// checked (the path must not exist, the node name must be free).
    pub async fn plan_external(
        &self,
        name: &str,
        overlay: Option<&Path>,
    ) -> Result<(BlockNode, PathBuf, String)> {
        snap_core::model::validate_snapshot_name(name)?;
        let graph = self.graph().await?;
        let top = graph.info(&graph.top_of(&self.node)?)?;
        let overlay = match overlay {
            Some(p) => p.to_path_buf(),
            None => crate::external::default_overlay_path(&top.file, name),
        };
        if overlay.exists() || overlay.symlink_metadata().is_ok() {
            return Err(Error::new(
                ErrorKind::Exists,
                "the overlay file already exists; QEMU would overwrite it",
            )
            .with_path(&overlay));
        }
        let base = overlay_node_name(&top.name, name);
        let mut node = base.clone();
        let mut n = 2u32;
        while graph.nodes.contains_key(&node) {
            let suffix = format!("-{n}");
            let keep = MAX_NODE_NAME.saturating_sub(suffix.len());
            node = format!("{}{suffix}", base.chars().take(keep).collect::<String>());
            n += 1;
            if n > 1000 {
                return Err(Error::new(
                    ErrorKind::Exists,
                    format!("no free node name like {base:?}"),
                ));
            }
        }
        if !valid_node_name(&node) {
            return Err(Error::invalid(format!(
                "cannot make a valid QEMU node name from {name:?}"
            )));
        }
        Ok((top, overlay, node))
    }

    /// Puts a new qcow2 overlay (default `DIR/STEM.NAME.EXT` next to the active image) on the
    /// active node with `blockdev-snapshot-sync`; QEMU creates the file, records the backing
    /// file and its format, and moves the node's users (devices, exports) to the overlay.
    ///
    /// QEMU frees an overlay nobody uses at once: the node should have a user (a guest device or
    /// a block export).
    pub async fn create_external(
        &self,
        name: &str,
        overlay: Option<&Path>,
    ) -> Result<ExternalOutcome> {
        let (top, overlay, node) = self.plan_external(name, overlay).await?;
        let absolute = if overlay.is_absolute() {
            overlay.clone()
        } else {
            std::env::current_dir()
                .map_err(|e| Error::io("current directory", e))?
                .join(&overlay)
        };
        let file = absolute.to_str().ok_or_else(|| {
            Error::invalid("the overlay path is not UTF-8 (QMP needs text)").with_path(&absolute)
        })?;
        self.qmp
            .execute_raw(
                "blockdev-snapshot-sync",
                json!({
                    "node-name": top.name,
                    "snapshot-file": file,
                    "snapshot-node-name": node,
                    "format": "qcow2",
                    "mode": "absolute-paths",
                }),
            )
            .await?;
        let graph = self.graph().await?;
        if !graph.nodes.contains_key(&node) {
            return Err(Error::new(
                ErrorKind::Command,
                format!(
                    "QEMU created overlay node {node:?} but freed it at once: node {:?} has no user \
                     (no guest device or block export); the file {} may be left behind",
                    top.name,
                    absolute.display()
                ),
            ));
        }
        Ok(ExternalOutcome {
            overlay: absolute,
            node,
            backing_node: top.name,
        })
    }

    /// Merges backing layer `layer` into its child with a `block-stream` job (the child copies
    /// the layer's data and is relinked to the layer's backing, or to none). `progress` gets
    /// (done, total) bytes; when `cancel` completes first, the job is cancelled (the chain stays
    /// valid) and the error has kind [`ErrorKind::Cancelled`]. The layer's file is left alone.
    pub async fn delete_layer<P, C>(
        &self,
        layer: &Path,
        options: &StreamOptions,
        mut progress: P,
        cancel: C,
    ) -> Result<LayerOutcome>
    where
        P: FnMut(u64, u64),
        C: Future<Output = ()>,
    {
        let graph = self.graph().await?;
        let top = graph.top_of(&self.node)?;
        let chain = graph.chain(&top)?;
        let Some(index) = chain
            .iter()
            .position(|n| graph.info(n).is_ok_and(|i| same_file(&i.file, layer)))
        else {
            return Err(Error::not_found(format!(
                "{} is not a layer of node {:?}'s chain",
                layer.display(),
                self.node
            ))
            .with_path(layer));
        };
        let Some(child) = index.checked_sub(1).and_then(|i| chain.get(i)) else {
            return Err(Error::invalid(
                "this is the active layer, not a backing layer; name one of its backing files",
            )
            .with_path(layer));
        };
        let child = graph.info(child)?;
        let new_backing = match chain.get(index + 1) {
            Some(n) => Some(graph.info(n)?),
            None => None,
        };
        let job = format!("snapctl-stream-{}", std::process::id());
        let mut args = Map::new();
        args.insert("job-id".into(), json!(job));
        args.insert("device".into(), json!(child.name));
        args.insert("auto-dismiss".into(), json!(false));
        if let Some(base) = &new_backing {
            args.insert("base-node".into(), json!(base.name));
        }
        if let Some(speed) = options.speed {
            args.insert("speed".into(), json!(speed));
        }
        let mut events = self.qmp.subscribe();
        self.qmp
            .execute_raw("block-stream", Value::Object(args))
            .await?;
        let bytes = self
            .follow_job(&job, &mut events, &mut progress, cancel, false)
            .await?;
        Ok(LayerOutcome {
            layer: layer.to_path_buf(),
            child,
            new_backing,
            bytes,
        })
    }

    /// Follows job `id` until it concludes, reports its progress, cancels it when `cancel`
    /// completes, reads its result and dismisses it. Returns the bytes it processed.
    ///
    /// With `complete_on_ready` (mirror-like jobs: active commit), the job's `ready` state
    /// (`JOB_STATUS_CHANGE` to `ready`, `BLOCK_JOB_READY`, or `query-jobs`) is answered once
    /// with `job-complete`, so the job pivots and concludes.
    async fn follow_job<P, C>(
        &self,
        id: &str,
        events: &mut tokio::sync::broadcast::Receiver<Event>,
        progress: &mut P,
        cancel: C,
        complete_on_ready: bool,
    ) -> Result<u64>
    where
        P: FnMut(u64, u64),
        C: Future<Output = ()>,
    {
        let is_end = |e: &Event| {
            e.name == "JOB_STATUS_CHANGE"
                && e.data.get("id").and_then(Value::as_str) == Some(id)
                && matches!(
                    e.data.get("status").and_then(Value::as_str),
                    Some("concluded" | "null")
                )
        };
        let is_ready = |e: &Event| {
            (e.name == "JOB_STATUS_CHANGE"
                && e.data.get("id").and_then(Value::as_str) == Some(id)
                && e.data.get("status").and_then(Value::as_str) == Some("ready"))
                || (e.name == "BLOCK_JOB_READY"
                    && e.data.get("device").and_then(Value::as_str) == Some(id))
        };
        tokio::pin!(cancel);
        let mut cancelled = false;
        let mut ended = false;
        let mut ready = false;
        let mut completing = false;
        let mut complete_error = None;
        let mut tick = tokio::time::interval(JOB_POLL);
        while !ended {
            if complete_on_ready && ready && !completing && !cancelled {
                completing = true;
                if let Err(e) = self
                    .qmp
                    .execute_raw("job-complete", json!({"id": id}))
                    .await
                {
                    // Leave no ready job behind: cancel it (the chain stays as it was) and
                    // report why once it has ended.
                    tracing::warn!(error = %e, "job-complete {id}");
                    if let Err(e) = self
                        .qmp
                        .execute_raw("block-job-cancel", json!({"device": id}))
                        .await
                    {
                        tracing::debug!(error = %e, "block-job-cancel");
                    }
                    cancelled = true;
                    complete_error = Some(e);
                }
            }
            tokio::select! {
                () = &mut cancel, if !cancelled => {
                    cancelled = true;
                    if let Err(e) = self.qmp.execute_raw("block-job-cancel", json!({"device": id})).await {
                        // The job may have ended meanwhile; its events still come.
                        tracing::debug!(error = %e, "block-job-cancel");
                    }
                }
                ev = events.recv() => match ev {
                    Ok(e) if is_end(&e) => ended = true,
                    Ok(e) if is_ready(&e) => ready = true,
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        // Events were lost: the job's state comes from query-jobs below.
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        return Err(Error::new(ErrorKind::Io, format!("QMP connection closed while job {id} ran")));
                    }
                },
                _ = tick.tick() => {
                    match self.job(id).await? {
                        Some(j) => {
                            progress(u64_field(&j, "current-progress"), u64_field(&j, "total-progress"));
                            match str_field(&j, "status").as_deref() {
                                Some("concluded" | "null") => ended = true,
                                Some("ready") => ready = true,
                                _ => {}
                            }
                        }
                        None => ended = true,
                    }
                }
            }
        }
        let job = self.job(id).await?;
        if job.is_some() {
            if let Err(e) = self.qmp.execute_raw("job-dismiss", json!({"id": id})).await {
                tracing::warn!(error = %e, "job-dismiss {id}");
            }
        }
        let job = job.ok_or_else(|| {
            Error::new(
                ErrorKind::Command,
                format!("job {id} vanished before its result could be read"),
            )
        })?;
        let done = u64_field(&job, "current-progress");
        progress(done, u64_field(&job, "total-progress"));
        if let Some(e) = complete_error {
            return Err(e);
        }
        if let Some(err) = str_field(&job, "error") {
            if cancelled {
                return Err(Error::new(
                    ErrorKind::Cancelled,
                    format!("cancelled: job {id} stopped ({err}); the chain is unchanged"),
                ));
            }
            return Err(Error::new(
                ErrorKind::Command,
                format!("job {id} failed: {err}"),
            ));
        }
        if cancelled {
            // The cancel came too late: the job had finished.
            tracing::info!("job {id} completed before the cancel took effect");
        }
        Ok(done)
    }

    /// Job `id` as `query-jobs` reports it.
    async fn job(&self, id: &str) -> Result<Option<Value>> {
        let jobs = self.qmp.execute_raw("query-jobs", Value::Null).await?;
        Ok(jobs
            .as_array()
            .into_iter()
            .flatten()
            .find(|j| j.get("id").and_then(Value::as_str) == Some(id))
            .cloned())
    }
}

/// How a backing layer leaves the chain online. Either way the layer's path disappears from the
/// chain and the guest reads the same data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LayerStrategy {
    /// `block-stream`: the layer's child copies the layer's data and is relinked past it
    /// ([`OnlineDisk::delete_layer`]). Writes only the child; always allowed.
    #[default]
    Stream,
    /// `block-commit`: the layer's data is written down into its backing (parent) layer and the
    /// child is relinked to that parent ([`OnlineDisk::commit_layer`]). Writes the parent, so
    /// it is allowed only when nothing else in QEMU uses the parent.
    Commit,
}

/// What each [`LayerStrategy`] would do to one backing layer ([`OnlineDisk::plan_layer`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnlineLayerPlan {
    /// The layer that leaves the chain.
    pub layer: BlockNode,
    /// Its child (the node that uses it as backing).
    pub child: BlockNode,
    /// Its backing node, `None` when it is the base of the chain.
    pub parent: Option<BlockNode>,
    /// Upper bound of the bytes a stream copies into the child: the layer's allocated size on
    /// the host (QEMU's `actual-size`, metadata included; clusters the child already has are
    /// skipped). `None` when QEMU does not report it.
    pub stream_bytes: Option<u64>,
    /// Upper bound of the bytes a commit writes into the parent (the layer's allocated size
    /// likewise); `None` when unknown or when a commit is not possible.
    pub commit_bytes: Option<u64>,
    /// Why a commit is refused (no parent, or the parent has other users); `None` when allowed.
    pub commit_refusal: Option<String>,
}

/// What [`OnlineDisk::commit_layer`] / [`OnlineDisk::commit_active`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitOutcome {
    /// The layer whose data was committed; it is no longer in the chain.
    pub layer: BlockNode,
    /// The node that received the data (the layer's former backing).
    pub into: BlockNode,
    /// After a middle commit, the layer's former child, now backed by `into`; `None` after an
    /// active commit (then `into` is the active node).
    pub child: Option<BlockNode>,
    /// Bytes the job reported as processed.
    pub bytes: u64,
}

/// `layer` located in the chain above `top`: the chain (top first) and the layer's index.
fn locate_layer(
    graph: &Graph,
    top: &str,
    layer: &Path,
    node: &str,
) -> Result<(Vec<String>, usize)> {
    let chain = graph.chain(top)?;
    let Some(index) = chain
        .iter()
        .position(|n| graph.info(n).is_ok_and(|i| same_file(&i.file, layer)))
    else {
        return Err(Error::not_found(format!(
            "{} is not a layer of node {node:?}'s chain",
            layer.display()
        ))
        .with_path(layer));
    };
    Ok((chain, index))
}

/// Why committing `layer` into `parent` is refused: `parent` must have no user in QEMU's graph
/// besides `layer`'s backing link (a commit rewrites its data). `None` when it is allowed.
fn commit_refusal(graph: &Graph, layer: &str, parent: &str) -> Option<String> {
    let Some(users) = &graph.users else {
        return Some(format!(
            "QEMU does not show its block graph (x-debug-query-block-graph), so the users of node \
             {parent:?} cannot be checked; a commit writes into it"
        ));
    };
    let own = format!("block-driver {layer} (backing)");
    let others: Vec<&str> = users
        .get(parent)
        .into_iter()
        .flatten()
        .filter(|u| **u != own)
        .map(String::as_str)
        .collect();
    if others.is_empty() {
        return None;
    }
    Some(format!(
        "node {parent:?} has other users in QEMU ({}); committing into it would change what they \
         read: stream the layer into its child instead",
        others.join(", ")
    ))
}

/// The layer's allocated bytes on the host as QEMU reports them.
fn allocated(graph: &Graph, node: &str) -> Option<u64> {
    graph
        .nodes
        .get(node)?
        .get("image")?
        .get("actual-size")?
        .as_u64()
}

impl OnlineDisk {
    /// Plans removing backing layer `layer` from the chain both ways (see [`LayerStrategy`]):
    /// the nodes involved, an upper bound of the bytes each would copy, and whether a commit is
    /// allowed. Changes nothing.
    pub async fn plan_layer(&self, layer: &Path) -> Result<OnlineLayerPlan> {
        let graph = self.graph().await?;
        let top = graph.top_of(&self.node)?;
        let (chain, index) = locate_layer(&graph, &top, layer, &self.node)?;
        let Some(child) = index.checked_sub(1).and_then(|i| chain.get(i)) else {
            return Err(Error::invalid(
                "this is the active layer, not a backing layer; name one of its backing files \
                 (folding the active layer into its backing is an active commit)",
            )
            .with_path(layer));
        };
        let name = chain.get(index).cloned().unwrap_or_default();
        let parent = chain.get(index + 1);
        let refusal = match parent {
            Some(p) => commit_refusal(&graph, &name, p),
            None => Some(
                "the layer is the base of the chain: there is nothing to commit it into".into(),
            ),
        };
        let bytes = allocated(&graph, &name);
        Ok(OnlineLayerPlan {
            layer: graph.info(&name)?,
            child: graph.info(child)?,
            parent: parent.map(|p| graph.info(p)).transpose()?,
            stream_bytes: bytes,
            commit_bytes: if refusal.is_none() { bytes } else { None },
            commit_refusal: refusal,
        })
    }

    /// Removes backing layer `layer` from the chain with `strategy`: [`delete_layer`]
    /// (stream) or [`commit_layer`] (commit). Returns (the node that received the data, bytes).
    ///
    /// [`delete_layer`]: Self::delete_layer
    /// [`commit_layer`]: Self::commit_layer
    pub async fn remove_layer<P, C>(
        &self,
        layer: &Path,
        strategy: LayerStrategy,
        options: &StreamOptions,
        progress: P,
        cancel: C,
    ) -> Result<(BlockNode, u64)>
    where
        P: FnMut(u64, u64),
        C: Future<Output = ()>,
    {
        match strategy {
            LayerStrategy::Stream => {
                let done = self.delete_layer(layer, options, progress, cancel).await?;
                Ok((done.child, done.bytes))
            }
            LayerStrategy::Commit => {
                let done = self.commit_layer(layer, options, progress, cancel).await?;
                Ok((done.into, done.bytes))
            }
        }
    }

    /// Merges backing layer `layer` into ITS BACKING (parent) with a `block-commit` job
    /// (`top-node` = the layer, `base-node` = its backing); QEMU then relinks the layer's child
    /// to the parent (recording the backing file) and drops the layer from the chain. The guest
    /// view is unchanged. The layer's file is left alone.
    ///
    /// Refused (before anything runs) for the active layer (see [`commit_active`]), for the
    /// base of the chain, and when the parent has any other user in QEMU's graph. Progress and
    /// cancelling work as for [`delete_layer`]: a cancelled commit leaves the chain as it was
    /// (the parent may hold some of the layer's data, which the layer still hides).
    ///
    /// [`commit_active`]: Self::commit_active
    /// [`delete_layer`]: Self::delete_layer
    pub async fn commit_layer<P, C>(
        &self,
        layer: &Path,
        options: &StreamOptions,
        mut progress: P,
        cancel: C,
    ) -> Result<CommitOutcome>
    where
        P: FnMut(u64, u64),
        C: Future<Output = ()>,
    {
        let plan = self.plan_layer(layer).await?;
        if let Some(why) = &plan.commit_refusal {
            return Err(Error::new(
                ErrorKind::InUse,
                format!("cannot commit {}: {why}", layer.display()),
            )
            .with_path(layer));
        }
        let Some(parent) = plan.parent.clone() else {
            return Err(Error::invalid("the layer has no backing to commit into").with_path(layer));
        };
        let top = self.active_node().await?;
        let job = format!("snapctl-commit-{}", std::process::id());
        let bytes = self
            .run_commit(
                &job,
                &top.name,
                &plan.layer.name,
                &parent.name,
                options,
                &mut progress,
                cancel,
                false,
            )
            .await?;
        Ok(CommitOutcome {
            layer: plan.layer,
            into: parent,
            child: Some(plan.child),
            bytes,
        })
    }

    /// Folds the ACTIVE layer into its backing (active commit): a `block-commit` job with
    /// `top-node` = the active node, which copies the active data down, reaches `ready`
    /// (`BLOCK_JOB_READY`), is completed with `job-complete` and pivots: the backing node
    /// becomes the active node (devices and exports follow it) and the old active layer leaves
    /// the chain (its file is left alone).
    ///
    /// Refused when the active node has no backing or the backing has other users in QEMU.
    /// Cancelling before the pivot keeps the old active layer active (the chain is unchanged;
    /// the backing may hold a copy of data the active layer still hides): kind
    /// [`ErrorKind::Cancelled`].
    pub async fn commit_active<P, C>(
        &self,
        options: &StreamOptions,
        mut progress: P,
        cancel: C,
    ) -> Result<CommitOutcome>
    where
        P: FnMut(u64, u64),
        C: Future<Output = ()>,
    {
        let graph = self.graph().await?;
        let top = graph.top_of(&self.node)?;
        let Some(base) = graph.backing.get(&top).cloned() else {
            return Err(Error::invalid(format!(
                "the active node {top:?} has no backing layer to commit into"
            )));
        };
        if let Some(why) = commit_refusal(&graph, &top, &base) {
            return Err(Error::new(
                ErrorKind::InUse,
                format!("cannot commit the active layer: {why}"),
            ));
        }
        let (layer, into) = (graph.info(&top)?, graph.info(&base)?);
        let job = format!("snapctl-active-commit-{}", std::process::id());
        let bytes = self
            .run_commit(
                &job,
                &top,
                &top,
                &base,
                options,
                &mut progress,
                cancel,
                true,
            )
            .await?;
        let after = self.graph().await?;
        let now = after.top_of(&base)?;
        if now != base {
            return Err(Error::new(
                ErrorKind::Cancelled,
                format!(
                    "cancelled: the commit stopped before its pivot; node {now:?} is still the \
                     active layer and the chain is unchanged"
                ),
            ));
        }
        Ok(CommitOutcome {
            layer,
            into,
            child: None,
            bytes,
        })
    }

    /// Starts a `block-commit` job on the chain rooted at `device` and follows it to its end.
    #[allow(clippy::too_many_arguments)]
    async fn run_commit<P, C>(
        &self,
        job: &str,
        device: &str,
        top: &str,
        base: &str,
        options: &StreamOptions,
        progress: &mut P,
        cancel: C,
        active: bool,
    ) -> Result<u64>
    where
        P: FnMut(u64, u64),
        C: Future<Output = ()>,
    {
        let mut args = Map::new();
        args.insert("job-id".into(), json!(job));
        args.insert("device".into(), json!(device));
        args.insert("top-node".into(), json!(top));
        args.insert("base-node".into(), json!(base));
        args.insert("auto-dismiss".into(), json!(false));
        if let Some(speed) = options.speed {
            args.insert("speed".into(), json!(speed));
        }
        // Subscribe before the job starts so none of its events are missed.
        let mut events = self.qmp.subscribe();
        self.qmp
            .execute_raw("block-commit", Value::Object(args))
            .await?;
        self.follow_job(job, &mut events, progress, cancel, active)
            .await
    }
}

/// The checked, absolute form of a list of per-disk requests: every node exists (followed to
/// its active top) and appears once.
fn distinct_tops<'a>(graph: &Graph, nodes: impl Iterator<Item = &'a str>) -> Result<Vec<String>> {
    let mut tops: Vec<String> = Vec::new();
    for node in nodes {
        let top = graph.top_of(node)?;
        if tops.contains(&top) {
            return Err(Error::invalid(format!(
                "node {node:?} names a disk (active node {top:?}) already in this request; each \
                 disk may appear once"
            )));
        }
        tops.push(top);
    }
    Ok(tops)
}

/// Takes internal snapshots on several disks atomically (all or none) with one QMP
/// `transaction` of `blockdev-snapshot-internal-sync` actions. Each entry is (node, snapshot
/// name); a node is followed to the active top of its chain. Refused before anything is sent:
/// an empty list, a disk named twice, an invalid name, a name (or id) already used on that disk.
/// Returns the snapshots as QEMU lists them afterwards, in the order given.
pub async fn create_many_internal(
    client: &QmpClient,
    requests: &[(&str, &str)],
) -> Result<Vec<SnapshotInfo>> {
    if requests.is_empty() {
        return Err(Error::invalid("no disks to snapshot"));
    }
    let graph = graph_of(client).await?;
    let tops = distinct_tops(&graph, requests.iter().map(|(n, _)| *n))?;
    let mut actions = Vec::new();
    for ((_, name), top) in requests.iter().zip(&tops) {
        snap_core::model::validate_snapshot_name(name)?;
        let node = graph.node(top)?;
        let taken = node
            .get("image")
            .and_then(|i| i.get("snapshots"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(snapshot_from)
            .any(|s| s.name == *name || s.id == *name);
        if taken {
            return Err(Error::new(
                ErrorKind::Exists,
                format!("node {top:?} already has a snapshot named {name:?}; nothing was created"),
            )
            .with_path(graph.info(top)?.file));
        }
        actions.push(json!({
            "type": "blockdev-snapshot-internal-sync",
            "data": {"device": top, "name": name},
        }));
    }
    client
        .execute_raw("transaction", json!({"actions": actions}))
        .await?;
    let after = graph_of(client).await?;
    let mut made = Vec::new();
    for ((_, name), top) in requests.iter().zip(&tops) {
        let snap = after
            .node(top)?
            .get("image")
            .and_then(|i| i.get("snapshots"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(snapshot_from)
            .find(|s| s.name == *name)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Command,
                    format!(
                        "QEMU reported success but node {top:?} does not list snapshot {name:?}"
                    ),
                )
            })?;
        made.push(snap);
    }
    Ok(made)
}

/// Puts a new qcow2 overlay on several disks atomically (all or none) with one QMP
/// `transaction` of `blockdev-snapshot-sync` actions. Each entry is (node, overlay path, new
/// node name); a node is followed to the active top of its chain, and relative overlay paths
/// are taken from the current directory. Refused before anything is sent: an empty list, a disk
/// named twice, an overlay path given twice or already existing, a new node name given twice,
/// invalid, or already in QEMU. Returns what was made, in the order given.
///
/// QEMU frees an overlay nobody uses: every node should have a user (a device or an export).
pub async fn create_many_external(
    client: &QmpClient,
    requests: &[(&str, &Path, &str)],
) -> Result<Vec<ExternalOutcome>> {
    if requests.is_empty() {
        return Err(Error::invalid("no disks to snapshot"));
    }
    let graph = graph_of(client).await?;
    let tops = distinct_tops(&graph, requests.iter().map(|(n, _, _)| *n))?;
    let cwd = std::env::current_dir().map_err(|e| Error::io("current directory", e))?;
    let mut files: Vec<PathBuf> = Vec::new();
    let mut names: Vec<&str> = Vec::new();
    let mut actions = Vec::new();
    for ((_, overlay, new_node), top) in requests.iter().zip(&tops) {
        let absolute = if overlay.is_absolute() {
            overlay.to_path_buf()
        } else {
            cwd.join(overlay)
        };
        if files.contains(&absolute) {
            return Err(Error::invalid("this overlay path is given twice").with_path(&absolute));
        }
        if absolute.symlink_metadata().is_ok() {
            return Err(Error::new(
                ErrorKind::Exists,
                "the overlay file already exists; QEMU would overwrite it",
            )
            .with_path(&absolute));
        }
        if !valid_node_name(new_node) {
            return Err(Error::invalid(format!(
                "{new_node:?} is not a valid QEMU node name (a letter, then letters, digits, \
                 '-', '.', '_'; at most {MAX_NODE_NAME} characters)"
            )));
        }
        if names.contains(new_node) {
            return Err(Error::invalid(format!(
                "node name {new_node:?} is given twice"
            )));
        }
        if graph.nodes.contains_key(*new_node) {
            return Err(Error::new(
                ErrorKind::Exists,
                format!("QEMU already has a node named {new_node:?}"),
            ));
        }
        let file = absolute.to_str().ok_or_else(|| {
            Error::invalid("the overlay path is not UTF-8 (QMP needs text)").with_path(&absolute)
        })?;
        actions.push(json!({
            "type": "blockdev-snapshot-sync",
            "data": {
                "node-name": top,
                "snapshot-file": file,
                "snapshot-node-name": new_node,
                "format": "qcow2",
                "mode": "absolute-paths",
            },
        }));
        files.push(absolute);
        names.push(new_node);
    }
    client
        .execute_raw("transaction", json!({"actions": actions}))
        .await?;
    let after = graph_of(client).await?;
    let mut made = Vec::new();
    for ((top, overlay), node) in tops.into_iter().zip(files).zip(names) {
        if !after.nodes.contains_key(node) {
            return Err(Error::new(
                ErrorKind::Command,
                format!(
                    "QEMU created overlay node {node:?} but freed it at once: node {top:?} has no \
                     user (no guest device or block export); the file {} may be left behind",
                    overlay.display()
                ),
            ));
        }
        made.push(ExternalOutcome {
            overlay,
            node: node.to_string(),
            backing_node: top,
        });
    }
    Ok(made)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        assert!(valid_node_name("base-s1"));
        assert!(!valid_node_name("1base"));
        assert!(!valid_node_name("#block12"));
        assert!(!valid_node_name(&"a".repeat(32)));
        assert_eq!(overlay_node_name("base", "s1"), "base-s1");
        assert_eq!(overlay_node_name("#block5", "a b"), "block5-a_b");
        assert_eq!(overlay_node_name("x", "9"), "x-9");
        let long = overlay_node_name("drive-virtio-disk0", "nightly-2024-01-01");
        assert!(valid_node_name(&long), "{long}");
    }

    #[test]
    fn snapshot_fields() {
        let s = snapshot_from(&json!({"id": "1", "name": "s1", "vm-state-size": 0,
            "date-sec": 10, "date-nsec": 5, "vm-clock-sec": 2, "vm-clock-nsec": 3, "new": 1}));
        assert_eq!((s.id.as_str(), s.name.as_str()), ("1", "s1"));
        assert_eq!(
            (s.date_sec, s.date_nsec, s.vm_clock_ns),
            (10, 5, 2_000_000_003)
        );
    }
}
