//! `snapctl disk ... --qmp SOCKET --node NODE` against a real `qemu-system-x86_64` machine whose
//! qcow2 disk sits on a virtio-blk device: no guest OS, the machine stays stopped (`-S`), but the
//! block layer is the one a running VM has (a device attached to the node, so QEMU holds the
//! image's lock and `blockdev-snapshot-sync` must move the device to the overlay). Checked with
//! qemu-img (`-U`) and QEMU's own `query-block` over a raw QMP exchange. Skipped (with a note) when
//! qemu-system-x86_64 is not installed.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use snapctl_tests::*;
use tempfile::TempDir;

const QEMU: &str = "qemu-system-x86_64";

/// A stopped q35 machine with `disk.qcow2` as node "disk0" on virtio-blk device "vd0"; killed on
/// drop.
struct Machine {
    child: Child,
    dir: TempDir,
    qmp: PathBuf,
    image: PathBuf,
    log: PathBuf,
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn have_qemu() -> bool {
    let found = Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("note: {QEMU} not installed; skipping the QEMU machine (--qmp) test");
    }
    found
}

/// TCG under PVM (this kind of sandbox's /dev/kvm: guests hang there and `kvm:tcg` does not fall
/// back), else KVM when it works, TCG otherwise.
fn accel() -> &'static str {
    if Path::new("/sys/module/kvm_pvm").exists() {
        "tcg"
    } else {
        "kvm:tcg"
    }
}

fn start() -> Machine {
    let dir = TempDir::new().expect("tempdir");
    let image = dir.path().join("disk.qcow2");
    let qmp = dir.path().join("qmp.sock");
    let log = dir.path().join("qemu.log");
    qemu_img(["create", "-q", "-f", "qcow2", p(&image), "16M"]).ok();
    qemu_io_ok(&image, &["write -P 0x5a 0 1M".to_string()]);
    let log_file = std::fs::File::create(&log).expect("qemu log");
    let child = Command::new(QEMU)
        .args(["-machine", &format!("q35,accel={}", accel())])
        .args(["-nodefaults", "-display", "none", "-S", "-m", "64"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", p(&qmp)))
        .arg("-blockdev")
        .arg(format!(
            "driver=file,filename={},node-name=disk0-file",
            p(&image)
        ))
        .args(["-blockdev", "driver=qcow2,file=disk0-file,node-name=disk0"])
        .args(["-device", "virtio-blk-pci,drive=disk0,id=vd0"])
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("qemu log"))
        .stderr(log_file)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {QEMU}: {e}"));
    let mut machine = Machine {
        child,
        dir,
        qmp,
        image,
        log,
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while !machine.qmp.exists() {
        if let Ok(Some(status)) = machine.child.try_wait() {
            panic!("{QEMU} exited ({status}): {}", machine.log_text());
        }
        assert!(
            Instant::now() < deadline,
            "{QEMU} did not create its QMP socket in 15 s: {}",
            machine.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    machine
}

impl Machine {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `snapctl disk VERB IMAGE ARGS... --qmp SOCKET --node disk0`.
    fn snapctl(&self, verb: &str, args: &[&str]) -> Run {
        let mut all = vec!["disk", verb, p(&self.image)];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--qmp", p(&self.qmp), "--node", "disk0"]);
        snapctl_run(all)
    }

    /// One QMP command over a fresh connection (QEMU serves one client at a time; snapctl's own
    /// connections are closed when it exits): greeting, capabilities, the command, its return.
    fn qmp(&self, command: &str, arguments: Value) -> Value {
        let stream = UnixStream::connect(&self.qmp).expect("connect to QMP");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        let mut writer = stream.try_clone().expect("clone QMP stream");
        let mut lines = BufReader::new(stream).lines();
        let mut next = || -> Value {
            loop {
                let line = lines.next().expect("QMP closed").expect("QMP read");
                let v: Value = serde_json::from_str(&line).expect("QMP sends JSON");
                if v.get("event").is_none() {
                    return v;
                }
            }
        };
        assert!(next().get("QMP").is_some(), "QMP greeting");
        for (execute, arguments) in [("qmp_capabilities", json!({})), (command, arguments)] {
            writeln!(
                writer,
                "{}",
                json!({ "execute": execute, "arguments": arguments })
            )
            .expect("QMP write");
            let reply = next();
            assert!(reply.get("error").is_none(), "{execute}: {reply}");
            if execute == command {
                return reply["return"].clone();
            }
        }
        unreachable!()
    }

    /// Runs qemu-io command `cmd` on node `node` inside QEMU (HMP `qemu-io`, whose report goes
    /// to QEMU's stdout, our log) and asserts it reports no failure: reads go through QEMU's own
    /// block graph, caches included.
    fn qemu_io_in(&self, node: &str, cmd: &str) {
        let before = self.log_text().len();
        let reply = self.qmp(
            "human-monitor-command",
            json!({ "command-line": format!("qemu-io {node} \"{cmd}\"") }),
        );
        assert_eq!(reply, "", "qemu-io {node} {cmd}");
        let deadline = Instant::now() + Duration::from_secs(5);
        let report = loop {
            let log = self.log_text();
            let report = log.get(before..).unwrap_or_default().to_string();
            if report.contains("ops;") || Instant::now() > deadline {
                break report;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(
            report.contains("bytes at offset") && !report.contains("fail"),
            "qemu-io {node} {cmd}: {report}"
        );
    }

    /// What device vd0 has inserted, from `query-block`.
    fn vd0_inserted(&self) -> Value {
        let blocks = self.qmp("query-block", json!({}));
        let vd0 = blocks
            .as_array()
            .expect("query-block returns a list")
            .iter()
            .find(|b| b["qdev"].as_str().is_some_and(|q| q.contains("vd0")))
            .unwrap_or_else(|| panic!("no vd0 in query-block: {blocks}"));
        vd0["inserted"].clone()
    }
}

fn info_u(path: &Path) -> String {
    qemu_img(["info", "-U", p(path)]).ok().stdout
}

#[test]
fn virtio_blk_disk_of_a_qemu_machine() {
    if !have_qemu() {
        return;
    }
    let mut m = start();
    let started = Instant::now();

    // The device starts on disk0.
    let inserted = m.vd0_inserted();
    assert_eq!(inserted["node-name"], "disk0", "{inserted}");
    assert_eq!(inserted["file"], Value::from(p(&m.image)), "{inserted}");

    // list --json: the contract's shape.
    let r = m.snapctl("list", &["--json"]).ok();
    let v: Value = serde_json::from_str(&r.stdout).expect("list --json is JSON");
    let mut keys: Vec<&str> = v
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["chain", "format", "image", "snapshots", "virtual_size"]
    );
    assert_eq!(v["image"], Value::from(p(&m.image)));
    assert_eq!(v["format"], "qcow2");
    assert_eq!(v["virtual_size"], 16u64 << 20);
    assert_eq!(v["chain"], json!([]));
    assert_eq!(v["snapshots"], json!([]));

    // An internal snapshot through the machine.
    let r = m.snapctl("create", &["s1"]).ok();
    assert!(r.stdout.contains("s1"), "{}", r.describe());
    let snaps = qemu_img(["snapshot", "-l", "-U", p(&m.image)]).ok().stdout;
    assert!(snaps.contains("s1"), "{snaps}");
    let r = m.snapctl("list", &["--json"]).ok();
    let v: Value = serde_json::from_str(&r.stdout).expect("JSON");
    assert_eq!(v["snapshots"][0]["name"], "s1", "{v}");

    // Reverting under a running machine is refused, saying to stop the guest.
    let r = m.snapctl("revert", &["s1"]);
    assert_error_line(&r);
    assert!(r.stderr.contains("stop the guest"), "{}", r.describe());

    // Offline operations on the image QEMU holds fail and point at --qmp.
    let r = snapctl_run(["disk", "create", p(&m.image), "x"]);
    assert_error_line(&r);
    assert!(r.stderr.contains("--qmp"), "{}", r.describe());
    let r = m.snapctl("list", &["--json"]).ok();
    let v: Value = serde_json::from_str(&r.stdout).expect("JSON");
    assert_eq!(v["snapshots"].as_array().map(Vec::len), Some(1), "{v}");

    // An external overlay: QEMU creates it and moves the device onto it.
    let r = m.snapctl("create", &["ext", "--external"]).ok();
    let overlay = m.dir.path().join("disk.ext.qcow2");
    assert_eq!(r.stdout.trim(), p(&overlay), "{}", r.describe());
    assert!(overlay.exists());
    let text = info_u(&overlay);
    assert!(text.contains("file format: qcow2"), "{text}");
    assert!(
        text.contains(&format!("backing file: {}", p(&m.image))),
        "{text}"
    );
    assert!(text.contains("backing file format: qcow2"), "{text}");
    let inserted = m.vd0_inserted();
    assert_eq!(inserted["file"], Value::from(p(&overlay)), "{inserted}");
    assert_eq!(
        inserted["backing_file"],
        Value::from(p(&m.image)),
        "{inserted}"
    );
    let r = m.snapctl("list", &["--json"]).ok();
    let v: Value = serde_json::from_str(&r.stdout).expect("JSON");
    assert_eq!(v["image"], Value::from(p(&overlay)), "{v}");
    assert_eq!(
        v["chain"],
        json!([{"path": p(&m.image), "format": "qcow2"}]),
        "{v}"
    );

    // Deleting the base layer streams it into the overlay, which ends standalone.
    let r = m.snapctl("delete", &["--layer", p(&m.image)]).ok();
    assert!(r.stdout.contains("no backing file"), "{}", r.describe());
    let text = info_u(&overlay);
    assert!(!text.contains("backing file"), "{text}");
    let inserted = m.vd0_inserted();
    assert_eq!(inserted["file"], Value::from(p(&overlay)), "{inserted}");
    assert!(inserted.get("backing_file").is_none(), "{inserted}");
    // The device's node is now the overlay's. (QEMU keeps node disk0 itself open, detached: it
    // was created with -blockdev, so only blockdev-del would close it; --node disk0 now names
    // that detached node, not the disk the device uses.)
    let top = inserted["node-name"]
        .as_str()
        .expect("node-name")
        .to_string();
    assert_ne!(top, "disk0", "{inserted}");
    // The base's data was copied up into the overlay, which the device reads alone.
    m.qemu_io_in(&top, "read -P 0x5a 0 1M");
    m.qemu_io_in(&top, "read -P 0 1M 1M");
    let on_top = |verb: &str, args: &[&str]| {
        let mut all = vec!["disk", verb, p(&overlay)];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--qmp", p(&m.qmp), "--node", &top]);
        snapctl_run(all)
    };
    let r = on_top("list", &["--json"]).ok();
    let v: Value = serde_json::from_str(&r.stdout).expect("JSON");
    assert_eq!(v["image"], Value::from(p(&overlay)), "{v}");
    assert_eq!(v["chain"], json!([]), "{v}");
    assert_eq!(v["snapshots"], json!([]), "{v}");
    // Revert is refused on the new active layer too.
    let r = on_top("revert", &["s1"]);
    assert_error_line(&r);
    assert!(r.stderr.contains("stop the guest"), "{}", r.describe());

    assert!(
        m.child.try_wait().expect("try_wait").is_none(),
        "{QEMU} died: {}",
        m.log_text()
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
}
