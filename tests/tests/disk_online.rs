//! `snapctl disk ... --qmp SOCKET --node NODE` against a real qemu-storage-daemon that holds the
//! image and exports it over NBD (as a running guest would use it): internal snapshots, an
//! external overlay, streaming a layer away, the revert refusal, and the offline refusal that
//! points at --qmp. Guest data goes through NBD with qemu-io; files are read with `-U`. Skipped
//! (with a note) when qemu-storage-daemon is not installed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use snapctl_tests::*;
use tempfile::TempDir;

/// A daemonized qemu-storage-daemon serving `disk.qcow2` as node "base" (NBD export "disk");
/// killed through its pidfile on drop.
struct Daemon {
    dir: TempDir,
    pidfile: PathBuf,
    qmp: PathBuf,
    nbd: PathBuf,
    image: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let Ok(pid) = std::fs::read_to_string(&self.pidfile) else {
            return;
        };
        let pid = pid.trim().to_string();
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn have_daemon() -> bool {
    let found = Command::new("qemu-storage-daemon")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("note: qemu-storage-daemon not installed; skipping the online (--qmp) tests");
    }
    found
}

fn start() -> Daemon {
    let dir = TempDir::new().expect("tempdir");
    let image = dir.path().join("disk.qcow2");
    let qmp = dir.path().join("qmp.sock");
    let nbd = dir.path().join("nbd.sock");
    let pidfile = dir.path().join("qsd.pid");
    qemu_img(["create", "-q", "-f", "qcow2", p(&image), "16M"]).ok();
    run(Command::new("qemu-storage-daemon")
        .args(["--daemonize", "--pidfile", p(&pidfile)])
        .arg("--chardev")
        .arg(format!("socket,path={},server=on,wait=off,id=c", p(&qmp)))
        .args(["--monitor", "chardev=c"])
        .arg("--blockdev")
        .arg(format!(
            "driver=file,filename={},node-name=base-file",
            p(&image)
        ))
        .args(["--blockdev", "driver=qcow2,file=base-file,node-name=base"])
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", p(&nbd)))
        .args([
            "--export",
            "type=nbd,id=exp0,node-name=base,name=disk,writable=on",
        ]))
    .ok();
    Daemon {
        dir,
        pidfile,
        qmp,
        nbd,
        image,
    }
}

impl Daemon {
    fn io(&self, cmd: &str) -> Run {
        run(Command::new("qemu-io").args([
            "-f",
            "raw",
            &format!("nbd+unix:///disk?socket={}", p(&self.nbd)),
            "-c",
            cmd,
        ]))
    }

    /// `snapctl disk VERB IMAGE ARGS... --qmp SOCKET --node base`.
    fn snapctl(&self, verb: &str, args: &[&str]) -> Run {
        let mut all = vec!["disk", verb, p(&self.image)];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--qmp", p(&self.qmp), "--node", "base"]);
        snapctl_run(all)
    }
}

fn info_u(path: &Path) -> String {
    qemu_img(["info", "-U", p(path)]).ok().stdout
}

fn snapshots_u(path: &Path) -> String {
    qemu_img(["snapshot", "-l", "-U", p(path)]).ok().stdout
}

#[test]
fn internal_snapshots_list_json_and_refusals() {
    if !have_daemon() {
        return;
    }
    let d = start();
    d.io("write -P 0x11 0 1M").ok();

    let r = d.snapctl("create", &["s1"]).ok();
    assert!(r.stdout.contains("s1"), "{}", r.describe());
    assert!(snapshots_u(&d.image).contains("s1"));
    // A duplicate is refused before QEMU is asked.
    let r = d.snapctl("create", &["s1"]);
    assert_error_line(&r);
    assert!(r.stderr.contains("already exists"), "{}", r.describe());

    let r = d.snapctl("list", &["--json"]).ok();
    let v: Value = serde_json::from_str(&r.stdout).expect("list --json is JSON");
    assert_eq!(v["image"], Value::from(p(&d.image)));
    assert_eq!(v["format"], "qcow2");
    assert_eq!(v["virtual_size"], 16u64 << 20);
    assert_eq!(v["chain"], Value::Array(vec![]));
    let snaps = v["snapshots"].as_array().expect("snapshots array");
    assert_eq!(snaps.len(), 1);
    let s = &snaps[0];
    let mut keys: Vec<&str> = s
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, ["date", "id", "name", "vm_clock_ns", "vm_state_size"]);
    assert_eq!(s["name"], "s1");
    assert_eq!(s["vm_state_size"], 0);
    assert!(
        parse_rfc3339(s["date"].as_str().expect("date")).is_some(),
        "{s}"
    );
    let r = d.snapctl("list", &[]).ok();
    assert!(r.stdout.contains("s1"), "{}", r.describe());

    // Reverting under a running guest is refused.
    let r = d.snapctl("revert", &["s1"]);
    assert_error_line(&r);
    assert!(
        r.stderr
            .contains("reverting a disk that a running guest uses is not a QMP operation: stop the guest first"),
        "{}",
        r.describe()
    );

    // Offline operations on the held image fail with the lock error that points at --qmp.
    let r = snapctl_run(["disk", "create", p(&d.image), "s2"]);
    assert_error_line(&r);
    assert!(
        r.stderr.contains("--qmp SOCKET --node NODE"),
        "{}",
        r.describe()
    );

    let r = d.snapctl("delete", &["s1"]).ok();
    assert!(r.stdout.contains("deleted"), "{}", r.describe());
    assert!(!snapshots_u(&d.image).contains("s1"));
    let r = d.snapctl("delete", &["s1"]);
    assert_error_line(&r);

    // A path that is not the node's image is refused.
    let other = d.dir.path().join("other.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", p(&other), "1M"]).ok();
    let r = snapctl_run([
        "disk",
        "list",
        p(&other),
        "--qmp",
        p(&d.qmp),
        "--node",
        "base",
    ]);
    assert_error_line(&r);
    d.io("read -P 0x11 0 1M").ok();
}

#[test]
fn external_overlay_then_stream_the_base_away() {
    if !have_daemon() {
        return;
    }
    let d = start();
    d.io("write -P 0x11 0 1M").ok();

    let r = d.snapctl("create", &["s1", "--external"]).ok();
    let overlay = d.dir.path().join("disk.s1.qcow2");
    assert_eq!(r.stdout.trim(), p(&overlay), "{}", r.describe());
    let text = info_u(&overlay);
    assert!(text.contains("backing file format: qcow2"), "{text}");
    assert!(
        text.contains(&format!("backing file: {}", p(&d.image))),
        "{text}"
    );

    // QEMU's node graph has the new top.
    let r = d.snapctl("list", &["--json"]).ok();
    let v: Value = serde_json::from_str(&r.stdout).expect("JSON");
    assert_eq!(v["image"], Value::from(p(&overlay)));
    assert_eq!(
        v["chain"],
        serde_json::json!([{"path": p(&d.image), "format": "qcow2"}])
    );
    assert!(r.stderr.contains("base-s1"), "{}", r.describe());

    // Writes go to the overlay; the base is unchanged.
    d.io("write -P 0x22 0 64k").ok();
    run(Command::new("qemu-io").args([
        "-U",
        "-r",
        "-f",
        "qcow2",
        p(&d.image),
        "-c",
        "read -P 0x11 0 1M",
    ]))
    .ok();

    // --dry-run plans and changes nothing.
    let r = d
        .snapctl("delete", &["--layer", p(&d.image), "--dry-run"])
        .ok();
    assert!(r.stdout.starts_with("plan: "), "{}", r.describe());
    assert!(info_u(&overlay).contains("backing file format: qcow2"));
    let r = d.snapctl("create", &["s2", "--external", "--dry-run"]).ok();
    assert!(r.stdout.starts_with("plan: "), "{}", r.describe());
    assert!(!d.dir.path().join("disk.s1.s2.qcow2").exists());

    // Streaming the base into the overlay leaves it standalone, with all the data.
    let r = d.snapctl("delete", &["--layer", p(&d.image)]).ok();
    assert!(r.stdout.contains("no backing file"), "{}", r.describe());
    let text = info_u(&overlay);
    assert!(!text.contains("backing file"), "{text}");
    d.io("read -P 0x22 0 64k").ok();
    d.io("read -P 0x11 64k 960k").ok();
    // The old base node is detached now: it no longer names the disk, and snapctl says so.
    let r = d.snapctl("list", &["--json"]);
    assert_eq!(r.code, Some(1), "{}", r.describe());
    assert!(
        r.stderr.contains("not used by any device"),
        "{}",
        r.describe()
    );
    // The node the export uses now lists the standalone overlay.
    let r = snapctl_run([
        "disk",
        "list",
        p(&overlay),
        "--json",
        "--qmp",
        p(&d.qmp),
        "--node",
        "base-s1",
    ])
    .ok();
    let v: Value = serde_json::from_str(&r.stdout).expect("JSON");
    assert_eq!(v["chain"], Value::Array(vec![]));
    // The layer's file is kept (online operations never remove files).
    assert!(d.image.exists());
}
