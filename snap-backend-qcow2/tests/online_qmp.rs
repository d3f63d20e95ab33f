//! Online operations (snap_backend_qcow2::online) against a real qemu-storage-daemon that holds
//! the image and exports it over NBD: internal snapshots, an external overlay by
//! blockdev-snapshot-sync, streaming a layer away (and cancelling that). Guest data is written
//! and read through NBD with qemu-io; files are inspected with `qemu-img -U`. Skipped (with a
//! note) when qemu-storage-daemon is not installed.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use snap_backend_qcow2::online::{OnlineDisk, StreamOptions};
mod common;
use common::*;
use snap_core::ErrorKind;

/// A daemonized qemu-storage-daemon serving `disk.qcow2` as node "base" (exported over NBD as
/// "disk"); killed through its pidfile on drop.
struct Daemon {
    // First, so the daemon is killed before its folder (and pidfile) goes.
    _pidfile: PidfileGuard,
    dir: tempfile::TempDir,
    qmp: PathBuf,
    nbd: PathBuf,
    image: PathBuf,
}

fn start(size: &str) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    let qmp = dir.path().join("qmp.sock");
    let nbd = dir.path().join("nbd.sock");
    let pidfile = dir.path().join("qsd.pid");
    ok(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg(size));
    ok(Command::new("qemu-storage-daemon")
        .args(["--daemonize", "--pidfile"])
        .arg(&pidfile)
        .arg("--chardev")
        .arg(format!(
            "socket,path={},server=on,wait=off,id=c",
            qmp.display()
        ))
        .args(["--monitor", "chardev=c"])
        .arg("--blockdev")
        .arg(format!(
            "driver=file,filename={},node-name=base-file",
            image.display()
        ))
        .args(["--blockdev", "driver=qcow2,file=base-file,node-name=base"])
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", nbd.display()))
        .args([
            "--export",
            "type=nbd,id=exp0,node-name=base,name=disk,writable=on",
        ]));
    Daemon {
        dir,
        _pidfile: PidfileGuard(pidfile),
        qmp,
        nbd,
        image,
    }
}

impl Daemon {
    fn nbd_url(&self) -> String {
        format!("nbd+unix:///disk?socket={}", self.nbd.display())
    }

    fn qemu_io(&self, cmd: &str) -> String {
        ok(Command::new("qemu-io").args(["-f", "raw", &self.nbd_url(), "-c", cmd]))
    }

    async fn disk(&self) -> OnlineDisk {
        OnlineDisk::connect(&self.qmp, "base").await.unwrap()
    }
}

fn snapshot_list(path: &Path) -> String {
    ok(Command::new("qemu-img")
        .args(["snapshot", "-l", "-U"])
        .arg(path))
}

#[tokio::test]
async fn internal_snapshots_and_listing() {
    if !have_daemon("the online (QMP) tests") {
        return;
    }
    let d = start("16M");
    d.qemu_io("write -P 0x11 0 1M");
    let disk = d.disk().await;
    let listing = disk.list().await.unwrap();
    assert_eq!(listing.image, d.image);
    assert_eq!(listing.virtual_size, 16 << 20);
    assert!(listing.snapshots.is_empty() && listing.chain.is_empty());

    let snap = disk.create_internal("s1").await.unwrap();
    assert_eq!(snap.name, "s1");
    assert!(snapshot_list(&d.image).contains("s1"));
    let err = disk.create_internal("s1").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Exists, "{err}");
    let listing = disk.list().await.unwrap();
    assert_eq!(listing.snapshots.len(), 1);
    assert!(listing.snapshots[0].date_sec > 1_600_000_000);

    // Data written after the snapshot does not change it.
    d.qemu_io("write -P 0x22 0 64k");
    let removed = disk.delete_internal("s1").await.unwrap();
    assert_eq!(removed.id, snap.id);
    assert!(!snapshot_list(&d.image).contains("s1"));
    let err = disk.delete_internal("s1").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");

    // A node name that does not exist (the daemon's monitor serves one client at a time).
    drop(disk);
    let err = OnlineDisk::connect(&d.qmp, "nope").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
}

#[tokio::test]
async fn external_overlay_then_stream_the_base_away() {
    if !have_daemon("the online (QMP) tests") {
        return;
    }
    let d = start("16M");
    d.qemu_io("write -P 0x11 0 1M");
    let disk = d.disk().await;
    let out = disk.create_external("s1", None).await.unwrap();
    let overlay = d.dir.path().join("disk.s1.qcow2");
    assert_eq!(out.overlay, overlay);
    assert_eq!(out.node, "base-s1");
    let text = info(&overlay);
    assert!(text.contains("backing file format: qcow2"), "{text}");
    assert!(
        text.contains(&format!("backing file: {}", d.image.display())),
        "{text}"
    );
    // The user's node name follows the disk to its new top.
    let top = disk.active_node().await.unwrap();
    assert_eq!(top.name, "base-s1");
    let listing = disk.list().await.unwrap();
    assert_eq!(listing.image, overlay);
    assert_eq!(listing.chain.len(), 1);
    assert_eq!(listing.chain[0].path, d.image);
    // An existing overlay path is refused before QEMU could overwrite it.
    let err = disk
        .create_external("s2", Some(&overlay))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Exists, "{err}");

    // New writes go to the overlay; the base keeps the old data.
    d.qemu_io("write -P 0x22 0 64k");
    ok(Command::new("qemu-io")
        .args(["-U", "-r", "-f", "qcow2"])
        .arg(&d.image)
        .args(["-c", "read -P 0x11 0 1M"]));

    // The active layer itself is not a backing layer.
    let err = disk
        .delete_layer(
            &overlay,
            &StreamOptions::default(),
            |_, _| {},
            std::future::pending(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");

    let mut seen = Vec::new();
    let done = disk
        .delete_layer(
            &d.image,
            &StreamOptions::default(),
            |a, b| seen.push((a, b)),
            std::future::pending(),
        )
        .await
        .unwrap();
    assert_eq!(done.child.name, "base-s1");
    assert!(done.new_backing.is_none());
    assert!(!seen.is_empty());
    let text = info(&overlay);
    assert!(!text.contains("backing file"), "{text}");
    // The old base node stays open in QEMU but detached: it no longer names the disk.
    let err = disk.list().await.unwrap_err();
    assert!(err.to_string().contains("not used by any device"), "{err}");
    d.qemu_io("read -P 0x22 0 64k");
    d.qemu_io("read -P 0x11 64k 960k");
    // No job is left behind.
    let jobs = disk
        .client()
        .execute_raw("query-jobs", serde_json::Value::Null)
        .await
        .unwrap();
    assert_eq!(jobs, serde_json::json!([]));
    drop(disk);
    let top = OnlineDisk::connect(&d.qmp, "base-s1").await.unwrap();
    assert!(top.list().await.unwrap().chain.is_empty());
}

#[tokio::test]
async fn cancelled_stream_leaves_a_valid_chain() {
    if !have_daemon("the online (QMP) tests") {
        return;
    }
    let d = start("64M");
    d.qemu_io("write -P 0x33 0 16M");
    let disk = d.disk().await;
    let out = disk.create_external("s1", None).await.unwrap();
    let started = Instant::now();
    let err = disk
        .delete_layer(
            &d.image,
            &StreamOptions {
                speed: Some(1 << 20),
            },
            |_, _| {},
            tokio::time::sleep(Duration::from_millis(300)),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Cancelled, "{err}");
    assert!(err.to_string().contains("cancelled"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // Still an overlay on the base, with the data readable through the export.
    let text = info(&out.overlay);
    assert!(text.contains("backing file format: qcow2"), "{text}");
    assert_eq!(disk.list().await.unwrap().chain.len(), 1);
    d.qemu_io("read -P 0x33 0 16M");
    let jobs = disk
        .client()
        .execute_raw("query-jobs", serde_json::Value::Null)
        .await
        .unwrap();
    assert_eq!(jobs, serde_json::json!([]));
}

#[tokio::test]
async fn stream_a_middle_layer_keeps_the_base() {
    if !have_daemon("the online (QMP) tests") {
        return;
    }
    let d = start("16M");
    d.qemu_io("write -P 0x11 0 1M");
    let disk = d.disk().await;
    let s1 = disk.create_external("s1", None).await.unwrap();
    d.qemu_io("write -P 0x22 0 64k");
    let s2 = disk.create_external("s2", None).await.unwrap();
    assert_eq!(s2.node, "base-s1-s2");
    d.qemu_io("write -P 0x33 128k 64k");
    let chain: Vec<PathBuf> = disk
        .list()
        .await
        .unwrap()
        .chain
        .into_iter()
        .map(|l| l.path)
        .collect();
    assert_eq!(chain, vec![s1.overlay.clone(), d.image.clone()]);

    let done = disk
        .delete_layer(
            &s1.overlay,
            &StreamOptions::default(),
            |_, _| {},
            std::future::pending(),
        )
        .await
        .unwrap();
    assert_eq!(done.child.name, s2.node);
    assert_eq!(done.new_backing.as_ref().unwrap().name, "base");
    let text = info(&s2.overlay);
    assert!(
        text.contains(&format!("backing file: {}", d.image.display())),
        "{text}"
    );
    assert!(text.contains("backing file format: qcow2"), "{text}");
    let listing = disk.list().await.unwrap();
    assert_eq!(listing.image, s2.overlay);
    assert_eq!(listing.chain.len(), 1);
    assert_eq!(listing.chain[0].path, d.image);
    d.qemu_io("read -P 0x22 0 64k");
    d.qemu_io("read -P 0x11 64k 64k");
    d.qemu_io("read -P 0x33 128k 64k");
    d.qemu_io("read -P 0x11 192k 832k");
}
