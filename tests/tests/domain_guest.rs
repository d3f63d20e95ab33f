//! Domain snapshots of a real running guest (the test guest of `cargo xtask guest` under
//! qemu-system-x86_64; TCG where /dev/kvm is PVM). The guest keeps a counter in RAM, writes it
//! to sector 0 of its disk and then to the console every ~100 ms, so:
//! - the snapshot's disk state holds the counter N the guest had when it stopped;
//! - after a revert with memory the console continues from N (not from the later value, not
//!   from 1), and sector 0 holds the continued values;
//! - after a revert to a disk-only snapshot the guest boots again (counter from 1).
//!
//! Each test names the RFC matrix rows it covers.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use snapctl_tests::domain::*;
use snapctl_tests::*;

const BOOT: Duration = Duration::from_secs(90);

struct Guest {
    lab: DomainLab,
    name: String,
    console: PathBuf,
    disk: PathBuf,
}

impl Guest {
    /// Defines and boots domain `name` with one 64 MiB qcow2 disk; waits for counter 5.
    fn boot(name: &str) -> Option<Guest> {
        Self::boot_with(name, false)
    }

    /// [`Guest::boot`], with a second qcow2 disk `NAME-b.qcow2` as xvdb when `second`.
    fn boot_with(name: &str, second: bool) -> Option<Guest> {
        let (kernel, initrd) = guest()?;
        let lab = DomainLab::new();
        let disk = lab.path(&format!("{name}.qcow2"));
        qemu_img(["create", "-q", "-f", "qcow2", p(&disk), "64M"]).ok();
        let other = lab.path(&format!("{name}-b.qcow2"));
        let mut disks = vec![("xvda", "qcow2", disk.as_path())];
        if second {
            qemu_img(["create", "-q", "-f", "qcow2", p(&other), "16M"]).ok();
            disks.push(("xvdb", "qcow2", other.as_path()));
        }
        let console = lab.path(&format!("{name}.console"));
        let cfg = lab.write_cfg(
            name,
            &guest_cfg(name, &kernel, &initrd, &console, 128, &disks),
        );
        lab.start(&cfg, name);
        wait_counter(&console, 5, BOOT);
        Some(Guest {
            lab,
            name: name.to_string(),
            console,
            disk,
        })
    }

    fn ok(&self, args: &[&str]) -> Run {
        self.lab.ok(args)
    }

    fn counters(&self) -> Vec<u64> {
        console_counters(&self.console)
    }

    /// Waits until `from` more counter lines arrived after index `start`; returns them.
    /// After a revert: the counters from the first one that dropped below its predecessor
    /// (where the reverted guest took over — the old guest may have printed a few more lines
    /// before it was stopped), once `count` of them arrived.
    fn resumed_counters(&self, start: usize, count: usize) -> Vec<u64> {
        let split = |all: &[u64]| -> Option<usize> {
            (start.max(1)..all.len()).find(|&i| all[i] < all[i - 1])
        };
        assert!(
            wait_until(BOOT, || {
                let all = self.counters();
                split(&all).is_some_and(|d| all.len() >= d + count)
            }),
            "the reverted guest printed no counters; console:\n{}",
            String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default())
        );
        let mut all = self.counters();
        let d = split(&all).unwrap();
        all.split_off(d)
    }

    fn new_counters(&self, start: usize, count: usize) -> Vec<u64> {
        assert!(
            wait_until(BOOT, || self.counters().len() >= start + count),
            "the guest printed no new counters; console:\n{}",
            String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default())
        );
        self.counters().split_off(start)
    }

    fn info(&self, snap: &str) -> Value {
        self.lab.info(&self.name, snap)
    }

    fn active(&self) -> PathBuf {
        self.lab.active(&self.name, "xvda")
    }
}

fn assert_continues_from(new: &[u64], n: u64, what: &str) {
    let first = new[0];
    assert!(
        first >= n && first <= n + 2,
        "{what}: after the revert the guest must continue from the snapshot's counter {n}, but printed {new:?}"
    );
    for pair in new.windows(2) {
        assert_eq!(
            pair[1],
            pair[0] + 1,
            "{what}: counters must run on: {new:?}"
        );
    }
}

#[test]
fn rfc_live_memory_external_disks_revert_running_delete_online() {
    let Some(g) = Guest::boot("live-ext") else {
        return;
    };
    // create: live, memory saved live, external disks.
    let r = g.ok(&["snapshot", "create", &g.name, "s1", "--live", "--external"]);
    assert!(r.stdout.contains("memory saved live"), "{}", r.describe());
    let info = g.info("s1");
    assert_eq!(info["state"], "running");
    assert_eq!(info["memory"], true);
    assert_eq!(info["consistency"], "memory");
    assert_eq!(info["disks"][0]["kind"], "external");
    assert_eq!(info["disks"][0]["path"], p(&g.disk));
    let window = info["pause_window_ms"]
        .as_f64()
        .expect("pause window measured");
    assert!(window > 0.0 && window < 5000.0, "pause window {window} ms");
    let overlay = g.active();
    assert_ne!(overlay, g.disk);
    // The frozen layer holds the counter the guest had when it stopped.
    let n = disk_counter(&g.disk, None).expect("counter in the frozen layer");
    assert!(n >= 5, "counter {n}");

    // Let it run on, then revert (running, as the snapshot was taken).
    let later = wait_counter(&g.console, n + 20, BOOT);
    assert!(disk_counter(&overlay, None).unwrap() > n + 10);
    let seen = g.counters().len();
    let r = g.ok(&["snapshot", "revert", &g.name, "s1"]);
    assert!(r.stdout.contains("running"), "{}", r.describe());
    let new = g.resumed_counters(seen, 5);
    assert_continues_from(&new, n, "live external revert");
    assert!(new[0] < later);
    assert_eq!(g.lab.state_of(&g.name), "running");
    let active = g.active();
    let on_disk = disk_counter(&active, None).unwrap();
    assert!(
        on_disk >= n && on_disk < later,
        "sector 0 after revert: {on_disk} (snapshot {n}, before revert {later})"
    );

    // delete (online): the frozen layer is streamed into the running overlay by a block job.
    let seen = g.counters().len();
    g.ok(&["snapshot", "delete", &g.name, "s1"]);
    assert!(!g.disk.exists(), "s1's layer is merged away");
    let after = g.new_counters(seen, 3);
    assert!(
        after.windows(2).all(|w| w[1] == w[0] + 1),
        "guest kept running: {after:?}"
    );
    let list = g.lab.snapshots(&g.name);
    assert_eq!(list["snapshots"].as_array().unwrap().len(), 0);
    g.ok(&["domain", "destroy", &g.name]);
    assert_eq!(g.lab.state_of(&g.name), "shutoff");
    assert_qemu_clean(&active, "after the online delete");
    assert!(qemu_info(&active).get("backing-filename").is_none());
}

#[test]
fn rfc_nonlive_memory_internal_disks_revert_paused_then_running_and_offline() {
    let Some(g) = Guest::boot("nonlive-int") else {
        return;
    };
    // create: live domain, memory saved non-live (the default), internal disk snapshots.
    g.ok(&[
        "snapshot",
        "create",
        &g.name,
        "s1",
        "--description",
        "non-live",
    ]);
    let info = g.info("s1");
    assert_eq!(info["memory"], true);
    assert_eq!(info["disks"][0]["kind"], "internal");
    assert_eq!(info["disks"][0]["path"], p(&g.disk));
    assert!(info["pause_window_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(qemu_snapshot_names(&g.disk), ["s1"]);
    let n = disk_counter(&g.disk, Some("s1")).expect("counter in the internal snapshot");
    wait_counter(&g.console, n + 20, BOOT);

    // revert --paused: the guest is loaded but stays stopped.
    g.ok(&["snapshot", "revert", &g.name, "s1", "--paused"]);
    assert_eq!(g.lab.state_of(&g.name), "paused");
    let seen = g.counters().len();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(g.counters().len(), seen, "a paused guest prints nothing");

    // revert --running: continues from the snapshot's counter.
    g.ok(&["snapshot", "revert", &g.name, "s1", "--running"]);
    let new = g.resumed_counters(seen, 5);
    assert_continues_from(&new, n, "non-live internal revert");

    // Another snapshot; then delete s1 online (QMP on the active image).
    g.ok(&["snapshot", "create", &g.name, "s2"]);
    g.ok(&["snapshot", "delete", &g.name, "s1"]);
    assert_eq!(qemu_snapshot_names(&g.disk), ["s2"]);
    let list = g.lab.snapshots(&g.name);
    assert_eq!(list["current"], "s2");

    // Offline revert with memory: destroy, then revert starts the guest from the memory image.
    let n2 = disk_counter(&g.disk, Some("s2")).unwrap();
    g.ok(&["domain", "destroy", &g.name]);
    let seen = g.counters().len();
    g.ok(&["snapshot", "revert", &g.name, "s2"]);
    assert_eq!(g.lab.state_of(&g.name), "running");
    let new = g.new_counters(seen, 5);
    assert_continues_from(&new, n2, "offline revert with memory");
    g.ok(&["domain", "destroy", &g.name]);
    assert_qemu_clean(&g.disk, "end");
}

#[test]
fn rfc_disk_only_live_quiesce_and_crash_consistent_revert_boots_fresh() {
    let Some(g) = Guest::boot("diskonly") else {
        return;
    };
    let record = std::fs::read(g.lab.state().join("domains/diskonly/domain.json")).unwrap();
    // --quiesce without --disk-only is refused.
    let r = g
        .lab
        .snapctl(["snapshot", "create", &g.name, "q0", "--quiesce"]);
    assert_error_line(&r);
    if guest_has_agent() {
        let r = g.ok(&[
            "snapshot",
            "create",
            &g.name,
            "q1",
            "--disk-only",
            "--quiesce",
            "--external",
        ]);
        assert!(r.stdout.contains("disk only"), "{}", r.describe());
        let info = g.info("q1");
        assert_eq!(info["consistency"], "quiesced");
        assert_eq!(info["memory"], false);
        assert_eq!(info["pause_window_ms"], 0.0);
    } else {
        let r = g.lab.snapctl([
            "snapshot",
            "create",
            &g.name,
            "q1",
            "--disk-only",
            "--quiesce",
        ]);
        assert_error_line(&r);
        assert!(r.stderr.contains("agent"), "{}", r.describe());
        assert_eq!(
            std::fs::read(g.lab.state().join("domains/diskonly/domain.json")).unwrap(),
            record
        );
        g.ok(&[
            "snapshot",
            "create",
            &g.name,
            "q1",
            "--disk-only",
            "--external",
        ]);
    }
    // A crash-consistent disk-only snapshot (internal on the new active layer).
    g.ok(&["snapshot", "create", &g.name, "c1", "--disk-only"]);
    assert_eq!(g.info("c1")["consistency"], "crash");
    assert_eq!(g.info("c1")["parent"], "q1");
    let later = wait_counter(&g.console, 30, BOOT);
    // Reverting to a disk-only snapshot of a running domain boots it again: counter from 1.
    let seen = g.counters().len();
    g.ok(&["snapshot", "revert", &g.name, "q1"]);
    let new = g.resumed_counters(seen, 3);
    assert!(
        new[0] <= 2 && new[0] < later,
        "a fresh boot counts from 1: {new:?}"
    );
    assert_eq!(g.lab.state_of(&g.name), "running");
    let tree = g.ok(&["snapshot", "list", &g.name, "--tree"]).stdout;
    assert!(tree.contains("q1") && tree.contains("c1"), "{tree}");
}

#[test]
fn domain_lifecycle_and_clear_errors() {
    let Some(g) = Guest::boot("life") else {
        return;
    };
    // A second start of a running domain is refused.
    let cfg = g.lab.path("life.cfg");
    let r = g.lab.snapctl(["domain", "start", p(&cfg)]);
    assert_error_line(&r);
    let listed = g.ok(&["domain", "list", "--json"]).stdout;
    let v: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(v[0]["name"], "life");
    assert_eq!(v[0]["state"], "running");
    assert_eq!(v[0]["hypervisor"], "qemu");
    // A dry run changes nothing and says what would happen.
    let before = std::fs::read(g.lab.state().join("domains/life/domain.json")).unwrap();
    let plan = g
        .ok(&[
            "--dry-run",
            "snapshot",
            "create",
            "life",
            "s1",
            "--live",
            "--external",
        ])
        .stdout;
    assert!(
        plan.contains("save memory") && plan.contains("QMP transaction"),
        "{plan}"
    );
    assert_eq!(
        std::fs::read(g.lab.state().join("domains/life/domain.json")).unwrap(),
        before
    );
    assert!(!g.lab.path("life.s1.qcow2").exists());
    // Destroy: the domain stays defined.
    g.ok(&["domain", "destroy", "life"]);
    assert_eq!(g.lab.state_of("life"), "shutoff");
    // Xen is not available here: a clear error.
    let r = g
        .lab
        .snapctl(["--hypervisor", "xen", "snapshot", "create", "life", "x"]);
    assert_error_line(&r);
    let _ = Path::new("");
}

#[test]
fn rfc_matrix_two_disks_live_internal_nonlive_external_offline_memory_revert_children_only() {
    let Some(g) = Guest::boot_with("matrix", true) else {
        return;
    };
    let b = g.lab.path("matrix-b.qcow2");
    // create: live, memory saved live, internal disks — both disks in one QMP transaction.
    g.ok(&["snapshot", "create", &g.name, "s1", "--live"]);
    assert_eq!(qemu_snapshot_names(&g.disk), ["s1"]);
    assert_eq!(qemu_snapshot_names(&b), ["s1"]);
    let info = g.info("s1");
    assert_eq!(info["disks"].as_array().unwrap().len(), 2);
    assert_eq!(info["disks"][1]["vdev"], "xvdb");
    assert_eq!(info["consistency"], "memory");

    // create: live, memory saved non-live, external disks (two new overlays).
    g.ok(&["snapshot", "create", &g.name, "s2", "--external"]);
    let n2 = disk_counter(&g.disk, None).expect("s2's frozen layer");
    let a2 = g.active();
    let b2 = g.lab.active(&g.name, "xvdb");
    assert_ne!(a2, g.disk);
    assert_ne!(b2, b);
    assert_eq!(g.info("s2")["parent"], "s1");

    // A crash-consistent disk-only internal snapshot in the new overlay; revert to it while
    // running: no memory, so the guest boots again (counter from 1).
    g.ok(&["snapshot", "create", &g.name, "c1", "--disk-only"]);
    assert_eq!(qemu_snapshot_names(&a2), ["c1"]);
    let later = wait_counter(&g.console, n2 + 20, BOOT);
    let seen = g.counters().len();
    g.ok(&["snapshot", "revert", &g.name, "c1"]);
    let fresh = g.resumed_counters(seen, 3);
    assert!(
        fresh[0] <= 2 && fresh[0] < later,
        "revert to a disk-only snapshot boots: {fresh:?}"
    );

    // Offline revert with memory to an external snapshot: the guest continues from s2.
    g.ok(&["domain", "destroy", &g.name]);
    let seen = g.counters().len();
    g.ok(&["snapshot", "revert", &g.name, "s2"]);
    let new = g.new_counters(seen, 5);
    assert_continues_from(&new, n2, "offline revert with memory, external");
    assert!(a2.exists(), "c1 lives in the old overlay, which is kept");

    // s3 on this branch: s2 now has two children (c1, s3).
    g.ok(&["snapshot", "create", &g.name, "s3", "--external"]);
    let list = g.lab.snapshots(&g.name);
    let s2 = list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "s2")
        .unwrap();
    assert_eq!(s2["children"], serde_json::json!(["c1", "s3"]));

    // delete --children-only while running: c1 offline (its image is not in QEMU's chain any
    // more), s3 online (its layer is merged into the running overlay by a block job).
    let seen = g.counters().len();
    g.ok(&["snapshot", "delete", &g.name, "s2", "--children-only"]);
    let list = g.lab.snapshots(&g.name);
    let names: Vec<&str> = list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["s1", "s2"]);
    assert!(
        qemu_snapshot_names(&a2).is_empty(),
        "c1 deleted from its image"
    );
    let after = g.new_counters(seen, 3);
    assert!(after.windows(2).all(|w| w[1] == w[0] + 1));

    // s1's internal snapshots live in images QEMU reads as backing: refused while running,
    // done once the domain is off.
    let r = g.lab.snapctl(["snapshot", "delete", &g.name, "s1"]);
    assert_error_line(&r);
    assert!(r.stderr.contains("shut off"), "{}", r.describe());
    g.ok(&["domain", "destroy", &g.name]);
    g.ok(&["snapshot", "delete", &g.name, "s1"]);
    assert!(qemu_snapshot_names(&g.disk).is_empty());
    assert!(qemu_snapshot_names(&b).is_empty());
    for image in [
        g.active(),
        g.lab.active(&g.name, "xvdb"),
        g.disk.clone(),
        b.clone(),
    ] {
        assert_qemu_clean(image.as_path(), "end of the matrix");
    }
}
