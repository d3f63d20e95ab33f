//! RBD disks of a running QEMU: moving a disk to another RBD image while the guest is paused.
//!
//! An external snapshot of an RBD disk is a snapshot of the image, protected and cloned into a
//! new image that becomes the disk from then on (see snap-backend-rbd). In a running QEMU the
//! disk is a raw node over an rbd protocol node; the switch adds an rbd node for the clone,
//! reopens the raw node with the new node as its `file` child (`blockdev-reopen`), and drops the
//! old rbd node, which closes the old image. The guest device never changes, and the guest must
//! be paused while its disk moves (the clone holds the image as it was at the snapshot).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use snap_backend_rbd::RbdSpec;
use snap_core::qmp::QmpClient;
use snap_core::{Error, Result};

/// QEMU's longest node name.
const MAX_NODE_NAME: usize = 31;

/// A disk node and its `file` child, as QEMU has them now.
struct FileChild {
    /// The disk node's driver ("raw" for snapctl's RBD disks).
    driver: String,
    /// The child's node name.
    name: String,
    /// The child's image as `rbd:...` or QEMU's `json:` name, when it is an rbd node.
    image: Option<PathBuf>,
}

/// Node `node` and its `file` child (one graph query and one node listing).
async fn file_child(qmp: &QmpClient, node: &str) -> Result<FileChild> {
    let graph = qmp
        .execute_raw("x-debug-query-block-graph", Value::Null)
        .await?;
    let nodes = graph
        .get("nodes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let id_of = |name: &str| {
        nodes
            .iter()
            .find(|n| {
                n.get("type").and_then(Value::as_str) == Some("block-driver")
                    && n.get("name").and_then(Value::as_str) == Some(name)
            })
            .and_then(|n| n.get("id").and_then(Value::as_u64))
    };
    let parent = id_of(node)
        .ok_or_else(|| Error::not_found(format!("QEMU has no block node named {node:?}")))?;
    let child = graph
        .get("edges")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|e| {
            e.get("parent").and_then(Value::as_u64) == Some(parent)
                && e.get("name").and_then(Value::as_str) == Some("file")
        })
        .and_then(|e| e.get("child").and_then(Value::as_u64))
        .ok_or_else(|| Error::unsupported(format!("QEMU's node {node:?} has no file child")))?;
    let name = nodes
        .iter()
        .find(|n| n.get("id").and_then(Value::as_u64) == Some(child))
        .and_then(|n| n.get("name").and_then(Value::as_str))
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            Error::unsupported(format!(
                "the file child of QEMU's node {node:?} has no node name"
            ))
        })?
        .to_string();
    let list = qmp
        .execute_raw("query-named-block-nodes", json!({"flat": true}))
        .await?;
    let named = |want: &str| {
        list.as_array()
            .into_iter()
            .flatten()
            .find(|n| n.get("node-name").and_then(Value::as_str) == Some(want))
    };
    let driver = named(node)
        .and_then(|n| n.get("drv").and_then(Value::as_str))
        .unwrap_or_default()
        .to_string();
    let image = named(&name)
        .filter(|n| n.get("drv").and_then(Value::as_str) == Some("rbd"))
        .and_then(|n| n.get("file").and_then(Value::as_str))
        .map(PathBuf::from);
    Ok(FileChild {
        driver,
        name,
        image,
    })
}

/// The RBD image QEMU's disk node `node` reads now, if it is an rbd image.
pub async fn image_of(qmp: &QmpClient, node: &str) -> Result<Option<PathBuf>> {
    Ok(file_child(qmp, node).await?.image)
}

/// A node name for the rbd node of `node`'s new image.
fn new_node_name(node: &str) -> String {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() % 1_000_000_000)
        .unwrap_or(0);
    let tail = format!("-rbd{stamp}");
    let head: String = node
        .chars()
        .take(MAX_NODE_NAME.saturating_sub(tail.len()))
        .collect();
    format!("{head}{tail}")
}

/// Moves QEMU's raw disk node `node` onto RBD image `to` (see the module documentation). Done
/// already when the node reads `to`. The guest must be paused.
pub async fn switch(qmp: &QmpClient, node: &str, to: &Path) -> Result<()> {
    let spec = RbdSpec::from_path(to)?;
    let FileChild {
        driver,
        name: old,
        image,
    } = file_child(qmp, node).await?;
    if image
        .as_deref()
        .is_some_and(|i| crate::layers::same_file(i, to))
    {
        return Ok(());
    }
    if driver != "raw" {
        return Err(Error::unsupported(format!(
            "QEMU's disk node {node:?} is {driver:?}, not a raw node over rbd; cannot move it to \
             another RBD image"
        )));
    }
    let default_conf = std::env::var_os("CEPH_CONF")
        .filter(|c| !c.is_empty())
        .map(PathBuf::from);
    let mut options = spec.blockdev_json(default_conf.as_deref())?;
    let new = new_node_name(node);
    if let Some(map) = options.as_object_mut() {
        map.insert("node-name".into(), Value::String(new.clone()));
    }
    qmp.execute_raw("blockdev-add", options)
        .await
        .map_err(|e| e.context(format!("opening {spec} in QEMU")))?;
    let reopened = qmp
        .execute_raw(
            "blockdev-reopen",
            json!({"options": [{"driver": "raw", "node-name": node, "file": new}]}),
        )
        .await;
    if let Err(e) = reopened {
        if let Err(d) = qmp
            .execute_raw("blockdev-del", json!({"node-name": new}))
            .await
        {
            tracing::warn!("closing the unused node {new} failed: {d}");
        }
        return Err(e.context(format!("moving disk node {node} to {spec}")));
    }
    // The old image is closed; a node that will not go keeps it open (and its watch).
    if let Err(e) = qmp
        .execute_raw("blockdev-del", json!({"node-name": old}))
        .await
    {
        eprintln!("snapctl: warning: QEMU keeps the old rbd node {old} of disk {node} open: {e}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_fit() {
        let n = new_node_name("xvda");
        assert!(n.starts_with("xvda-rbd"), "{n}");
        let long = new_node_name(&"x".repeat(40));
        assert!(long.len() <= MAX_NODE_NAME, "{long}");
        assert!(long.contains("-rbd"), "{long}");
    }
}
