//! Online commit and transactions (snap_backend_qcow2::online) against a real
//! qemu-storage-daemon exporting its images over NBD: committing a middle layer into its
//! parent, an active commit that pivots, a cancelled rate-limited commit, the refusal when the
//! parent has another user, and atomic multi-disk snapshots through `transaction`. Guest data is
//! written and read through NBD with qemu-io; files are inspected with `qemu-img -U`. Skipped
//! (with a note) when qemu-storage-daemon is not installed.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use snap_backend_qcow2::online::{
    LayerStrategy, OnlineDisk, StreamOptions, create_many_external, create_many_internal,
};
mod common;
use common::*;
use snap_core::ErrorKind;
use snap_core::qmp::QmpClient;

/// A daemonized qemu-storage-daemon serving `diskN.qcow2` as node `nodeN` (exported over NBD
/// as `diskN`); killed through its pidfile on drop.
struct Daemon {
    // First, so the daemon is killed before its folder (and pidfile) goes.
    _pidfile: PidfileGuard,
    dir: tempfile::TempDir,
    qmp: PathBuf,
    nbd: PathBuf,
    images: Vec<PathBuf>,
}

/// Starts the daemon with one image per entry of `read_only` (node `node1`, `node2`, ...;
/// read-only ones are exported read-only).
fn start(size: &str, read_only: &[bool]) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let qmp = dir.path().join("qmp.sock");
    let nbd = dir.path().join("nbd.sock");
    let pidfile = dir.path().join("qsd.pid");
    let mut cmd = Command::new("qemu-storage-daemon");
    cmd.args(["--daemonize", "--pidfile"])
        .arg(&pidfile)
        .arg("--chardev")
        .arg(format!(
            "socket,path={},server=on,wait=off,id=c",
            qmp.display()
        ))
        .args(["--monitor", "chardev=c"])
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", nbd.display()));
    let mut images = Vec::new();
    for (i, ro) in read_only.iter().enumerate() {
        let n = i + 1;
        let image = dir.path().join(format!("disk{n}.qcow2"));
        ok(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&image)
            .arg(size));
        let ro = if *ro { "on" } else { "off" };
        cmd.arg("--blockdev")
            .arg(format!(
                "driver=file,filename={},node-name=file{n},read-only={ro}",
                image.display()
            ))
            .arg("--blockdev")
            .arg(format!(
                "driver=qcow2,file=file{n},node-name=node{n},read-only={ro}"
            ))
            .arg("--export")
            .arg(format!(
                "type=nbd,id=exp{n},node-name=node{n},name=disk{n},writable={}",
                if ro == "on" { "off" } else { "on" }
            ));
        images.push(image);
    }
    ok(&mut cmd);
    Daemon {
        dir,
        _pidfile: PidfileGuard(pidfile),
        qmp,
        nbd,
        images,
    }
}

impl Daemon {
    fn qemu_io(&self, export: usize, cmd: &str) -> String {
        let url = format!("nbd+unix:///disk{export}?socket={}", self.nbd.display());
        ok(Command::new("qemu-io").args(["-f", "raw", &url, "-c", cmd]))
    }

    async fn disk(&self, node: &str) -> OnlineDisk {
        OnlineDisk::connect(&self.qmp, node).await.unwrap()
    }

    async fn client(&self) -> QmpClient {
        QmpClient::connect(&self.qmp, Duration::from_secs(10))
            .await
            .unwrap()
    }
}

fn snapshot_list(path: &Path) -> String {
    ok(Command::new("qemu-img")
        .args(["snapshot", "-l", "-U"])
        .arg(path))
}

async fn no_jobs(disk: &OnlineDisk) {
    let jobs = disk
        .client()
        .execute_raw("query-jobs", serde_json::Value::Null)
        .await
        .unwrap();
    assert_eq!(jobs, serde_json::json!([]));
}

async fn chain_paths(disk: &OnlineDisk) -> Vec<PathBuf> {
    disk.list()
        .await
        .unwrap()
        .chain
        .into_iter()
        .map(|l| l.path)
        .collect()
}

#[tokio::test]
async fn commit_a_middle_layer_into_its_parent() {
    if !have_daemon("the online commit tests") {
        return;
    }
    let d = start("16M", &[false]);
    let base = d.images[0].clone();
    d.qemu_io(1, "write -P 0x11 0 1M");
    let disk = d.disk("node1").await;
    let mid = disk.create_external("s1", None).await.unwrap();
    d.qemu_io(1, "write -P 0x22 0 64k");
    let top = disk.create_external("s2", None).await.unwrap();
    d.qemu_io(1, "write -P 0x33 128k 64k");
    assert_eq!(
        chain_paths(&disk).await,
        vec![mid.overlay.clone(), base.clone()]
    );

    // The plan offers both; the base has no other user, so a commit is allowed.
    let plan = disk.plan_layer(&mid.overlay).await.unwrap();
    assert_eq!(plan.layer.name, mid.node);
    assert_eq!(plan.child.name, top.node);
    assert_eq!(plan.parent.as_ref().unwrap().name, "node1");
    assert!(plan.commit_refusal.is_none(), "{plan:?}");
    assert!(plan.stream_bytes.is_some() && plan.commit_bytes.is_some());
    // The base cannot be committed (nothing below it), the active layer is no backing layer.
    let plan = disk.plan_layer(&base).await.unwrap();
    assert!(plan.commit_refusal.is_some() && plan.commit_bytes.is_none());
    let err = disk
        .commit_layer(
            &base,
            &StreamOptions::default(),
            |_, _| {},
            std::future::pending(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InUse, "{err}");
    let err = disk.plan_layer(&top.overlay).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");

    let mut seen = Vec::new();
    let (into, _) = disk
        .remove_layer(
            &mid.overlay,
            LayerStrategy::Commit,
            &StreamOptions::default(),
            |a, b| seen.push((a, b)),
            std::future::pending(),
        )
        .await
        .unwrap();
    assert_eq!(into.name, "node1");
    assert!(!seen.is_empty());
    // top's backing is now the base, recorded with its format; mid is out of the chain.
    let text = info(&top.overlay);
    assert!(
        text.contains(&format!("backing file: {}", base.display())),
        "{text}"
    );
    assert!(text.contains("backing file format: qcow2"), "{text}");
    assert_eq!(chain_paths(&disk).await, vec![base.clone()]);
    assert_eq!(disk.active_node().await.unwrap().name, top.node);
    // The guest view is intact, and the base itself now holds mid's data.
    d.qemu_io(1, "read -P 0x22 0 64k");
    d.qemu_io(1, "read -P 0x11 64k 64k");
    d.qemu_io(1, "read -P 0x33 128k 64k");
    d.qemu_io(1, "read -P 0x11 192k 832k");
    ok(Command::new("qemu-io")
        .args(["-U", "-r", "-f", "qcow2"])
        .arg(&base)
        .args(["-c", "read -P 0x22 0 64k"]));
    // Nobody in QEMU uses mid any more: its node is gone (or has no user).
    let graph = disk
        .client()
        .execute_raw("query-named-block-nodes", serde_json::json!({"flat": true}))
        .await
        .unwrap();
    assert!(
        !graph
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["node-name"] == mid.node.as_str()),
        "{graph}"
    );
    no_jobs(&disk).await;
}

#[tokio::test]
async fn active_commit_folds_the_overlay_into_the_base() {
    if !have_daemon("the online commit tests") {
        return;
    }
    let d = start("16M", &[false]);
    let base = d.images[0].clone();
    d.qemu_io(1, "write -P 0x11 0 1M");
    let disk = d.disk("node1").await;
    let overlay = disk.create_external("s1", None).await.unwrap();
    d.qemu_io(1, "write -P 0x22 0 64k");
    assert_eq!(disk.active_node().await.unwrap().name, overlay.node);

    let mut seen = Vec::new();
    let done = disk
        .commit_active(
            &StreamOptions::default(),
            |a, b| seen.push((a, b)),
            std::future::pending(),
        )
        .await
        .unwrap();
    assert_eq!(done.layer.name, overlay.node);
    assert_eq!(done.into.name, "node1");
    assert!(done.child.is_none());
    assert!(!seen.is_empty());
    // The base is active again and the export follows it.
    let listing = disk.list().await.unwrap();
    assert_eq!(listing.image, base);
    assert!(listing.chain.is_empty());
    d.qemu_io(1, "read -P 0x22 0 64k");
    d.qemu_io(1, "read -P 0x11 64k 960k");
    d.qemu_io(1, "write -P 0x44 2M 64k");
    ok(Command::new("qemu-io")
        .args(["-U", "-r", "-f", "qcow2"])
        .arg(&base)
        .args(["-c", "read -P 0x22 0 64k", "-c", "read -P 0x44 2M 64k"]));
    no_jobs(&disk).await;
    // Nothing left to commit into.
    let err = disk
        .commit_active(&StreamOptions::default(), |_, _| {}, std::future::pending())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
}

#[tokio::test]
async fn cancelled_commit_leaves_a_valid_chain() {
    if !have_daemon("the online commit tests") {
        return;
    }
    let d = start("64M", &[false]);
    let base = d.images[0].clone();
    d.qemu_io(1, "write -P 0x11 0 32M");
    let disk = d.disk("node1").await;
    let mid = disk.create_external("s1", None).await.unwrap();
    d.qemu_io(1, "write -P 0x22 0 16M");
    let top = disk.create_external("s2", None).await.unwrap();
    let started = Instant::now();
    let err = disk
        .commit_layer(
            &mid.overlay,
            &StreamOptions {
                speed: Some(1 << 20),
            },
            |_, _| {},
            tokio::time::sleep(Duration::from_millis(300)),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Cancelled, "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        chain_paths(&disk).await,
        vec![mid.overlay.clone(), base.clone()]
    );
    let text = info(&top.overlay);
    assert!(
        text.contains(&format!("backing file: {}", mid.overlay.display())),
        "{text}"
    );
    d.qemu_io(1, "read -P 0x22 0 16M");
    d.qemu_io(1, "read -P 0x11 16M 16M");
    no_jobs(&disk).await;

    // A cancelled active commit keeps the overlay active.
    d.qemu_io(1, "write -P 0x55 0 16M");
    let err = disk
        .commit_active(
            &StreamOptions {
                speed: Some(1 << 20),
            },
            |_, _| {},
            tokio::time::sleep(Duration::from_millis(300)),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Cancelled, "{err}");
    assert_eq!(disk.active_node().await.unwrap().name, top.node);
    assert_eq!(chain_paths(&disk).await.len(), 2);
    d.qemu_io(1, "read -P 0x55 0 16M");
    d.qemu_io(1, "read -P 0x11 16M 16M");
    no_jobs(&disk).await;
}

#[tokio::test]
async fn commit_refused_when_the_parent_has_another_user() {
    if !have_daemon("the online commit tests") {
        return;
    }
    let d = start("16M", &[false]);
    d.qemu_io(1, "write -P 0x11 0 1M");
    let disk = d.disk("node1").await;
    let mid = disk.create_external("s1", None).await.unwrap();
    disk.create_external("s2", None).await.unwrap();
    // A second export of the base: it is read by someone else.
    disk.client()
        .execute_raw(
            "block-export-add",
            serde_json::json!({"type": "nbd", "id": "other", "node-name": "node1",
                "name": "other"}),
        )
        .await
        .unwrap();
    let plan = disk.plan_layer(&mid.overlay).await.unwrap();
    let why = plan.commit_refusal.unwrap();
    assert!(why.contains("other users"), "{why}");
    let err = disk
        .commit_layer(
            &mid.overlay,
            &StreamOptions::default(),
            |_, _| {},
            std::future::pending(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InUse, "{err}");
    assert_eq!(chain_paths(&disk).await.len(), 2);
    // Streaming is still possible.
    disk.remove_layer(
        &mid.overlay,
        LayerStrategy::Stream,
        &StreamOptions::default(),
        |_, _| {},
        std::future::pending(),
    )
    .await
    .unwrap();
    assert_eq!(chain_paths(&disk).await, vec![d.images[0].clone()]);
}

#[tokio::test]
async fn transaction_of_internal_snapshots_is_all_or_none() {
    if !have_daemon("the online commit tests") {
        return;
    }
    // node3 is read-only: QEMU refuses an internal snapshot there.
    let d = start("16M", &[false, false, true]);
    let client = d.client().await;
    let made = create_many_internal(&client, &[("node1", "s1"), ("node2", "s1")])
        .await
        .unwrap();
    assert_eq!(made.len(), 2);
    assert!(made.iter().all(|s| s.name == "s1"));
    assert!(snapshot_list(&d.images[0]).contains("s1"));
    assert!(snapshot_list(&d.images[1]).contains("s1"));

    // A name already used on one disk is refused before QEMU is asked: none is made.
    let err = create_many_internal(&client, &[("node1", "s2"), ("node2", "s1")])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Exists, "{err}");
    assert!(!snapshot_list(&d.images[0]).contains("s2"));
    // The same disk twice is refused.
    let err = create_many_internal(&client, &[("node1", "a"), ("node1", "b")])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");

    // QEMU fails the second action: the transaction rolls the first one back.
    let err = create_many_internal(&client, &[("node1", "s3"), ("node3", "s3")])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Command, "{err}");
    assert!(!snapshot_list(&d.images[0]).contains("s3"));
    assert!(!snapshot_list(&d.images[2]).contains("s3"));
}

#[tokio::test]
async fn transaction_of_external_overlays() {
    if !have_daemon("the online commit tests") {
        return;
    }
    let d = start("16M", &[false, false]);
    d.qemu_io(1, "write -P 0x11 0 64k");
    d.qemu_io(2, "write -P 0x22 0 64k");
    let client = d.client().await;
    let o1 = d.dir.path().join("disk1.s1.qcow2");
    let o2 = d.dir.path().join("disk2.s1.qcow2");
    // Refusals before anything is sent.
    let err = create_many_external(&client, &[("node1", &o1, "n1-s1"), ("node2", &o1, "n2-s1")])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    let err = create_many_external(&client, &[("node1", &o1, "same"), ("node2", &o2, "same")])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    let err = create_many_external(&client, &[("node1", &o1, "node2"), ("node2", &o2, "x")])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Exists, "{err}");
    assert!(!o1.exists() && !o2.exists());

    let made = create_many_external(&client, &[("node1", &o1, "n1-s1"), ("node2", &o2, "n2-s1")])
        .await
        .unwrap();
    assert_eq!(made[0].overlay, o1);
    assert_eq!(made[1].backing_node, "node2");
    for (overlay, image) in [(&o1, &d.images[0]), (&o2, &d.images[1])] {
        let text = info(overlay);
        assert!(
            text.contains(&format!("backing file: {}", image.display())),
            "{text}"
        );
    }
    // The exports follow the overlays.
    d.qemu_io(1, "write -P 0x33 0 4k");
    d.qemu_io(2, "read -P 0x22 0 64k");
    ok(Command::new("qemu-io")
        .args(["-U", "-r", "-f", "qcow2"])
        .arg(&d.images[0])
        .args(["-c", "read -P 0x11 0 64k"]));
}
