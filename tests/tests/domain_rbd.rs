//! Domain snapshots of the test guest running on an RBD disk (`target=rbd:rbd/IMAGE:conf=...`,
//! format raw: QEMU's rbd driver) against a real one-node Ceph. The guest writes its counter to
//! sector 0 of its disk and to the console every ~100 ms, so the RBD snapshot holds the counter
//! N the guest had when it stopped, and after a revert with memory the console continues from N.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::path::Path;
use std::time::Duration;

use snapctl_tests::ceph::{Ceph, RbdGuest};
use snapctl_tests::domain::*;
use snapctl_tests::*;

const BOOT: Duration = Duration::from_secs(90);

/// The counter in sector 0 of `rbd/SPEC` (an image or `IMAGE@SNAP`).
fn rbd_counter(ceph: &Ceph, spec: &str) -> Option<u64> {
    let bytes = ceph.export(spec);
    let sector = bytes.get(..512)?;
    let text = String::from_utf8_lossy(sector);
    text.strip_prefix("counter ")?
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .ok()
}

/// After a revert: the counters from the first one below its predecessor (where the reverted
/// guest took over), once `count` of them arrived.
fn resumed_counters(console: &Path, start: usize, count: usize) -> Vec<u64> {
    let split = |all: &[u64]| (start.max(1)..all.len()).find(|&i| all[i] < all[i - 1]);
    assert!(
        wait_until(BOOT, || {
            let all = console_counters(console);
            split(&all).is_some_and(|d| all.len() >= d + count)
        }),
        "the reverted guest printed no counters; console:\n{}",
        String::from_utf8_lossy(&std::fs::read(console).unwrap_or_default())
    );
    let mut all = console_counters(console);
    let d = split(&all).unwrap();
    all.split_off(d)
}

#[test]
fn live_snapshot_on_rbd_revert_continues_and_online_delete() {
    let name = "rbd-guest";
    let Some(g) = RbdGuest::start(name, "gvm", 5) else {
        return;
    };
    // (Bound in this order, the lab is dropped before the cluster.)
    let RbdGuest {
        ceph,
        lab,
        target,
        console,
        ..
    } = g;

    // QEMU has the image open: a disk-level rollback is refused and changes nothing.
    ceph.rbd(&["snap", "create", "rbd/gvm@outside"]).ok();
    let r = run(ceph
        .env(&mut snapctl())
        .args(["disk", "revert", &target, "outside"]));
    assert_error_line(&r);
    assert!(
        r.stderr.contains("stop the guest first"),
        "{}",
        r.describe()
    );
    ceph.rbd(&["snap", "rm", "rbd/gvm@outside"]).ok();

    // A live snapshot: memory saved while the guest runs, the disk's RBD snapshot through QMP.
    let r = lab.ok(&["snapshot", "create", name, "s1", "--live"]);
    assert!(r.stdout.contains("memory saved live"), "{}", r.describe());
    let info = lab.info(name, "s1");
    assert_eq!(info["memory"], true);
    assert_eq!(info["disks"][0]["kind"], "internal");
    assert_eq!(info["disks"][0]["path"], target);
    assert_eq!(ceph.snap_names("gvm"), ["s1"]);
    let n = rbd_counter(&ceph, "gvm@s1").expect("counter in the RBD snapshot");
    assert!(n >= 5, "counter {n}");

    // Run on, then revert: QEMU stops, the image is rolled back, the guest resumes from N.
    let later = wait_counter(&console, n + 20, BOOT);
    let seen = console_counters(&console).len();
    let r = lab.ok(&["snapshot", "revert", name, "s1"]);
    assert!(r.stdout.contains("running"), "{}", r.describe());
    let new = resumed_counters(&console, seen, 5);
    assert!(
        new[0] >= n && new[0] <= n + 2 && new[0] < later,
        "after the revert the guest must continue from the snapshot's counter {n}: {new:?}"
    );
    assert!(new.windows(2).all(|w| w[1] == w[0] + 1), "{new:?}");
    assert_eq!(lab.state_of(name), "running");
    let on_disk = rbd_counter(&ceph, "gvm").unwrap();
    assert!(on_disk >= n && on_disk < later, "sector 0: {on_disk}");

    // A disk-only snapshot of the running guest (one QMP transaction), then delete s1 online.
    lab.ok(&["snapshot", "create", name, "s2", "--disk-only"]);
    assert_eq!(ceph.snap_names("gvm"), ["s1", "s2"]);
    let seen = console_counters(&console).len();
    lab.ok(&["snapshot", "delete", name, "s1"]);
    assert_eq!(ceph.snap_names("gvm"), ["s2"]);
    wait_until(BOOT, || console_counters(&console).len() >= seen + 3);
    let after = console_counters(&console).split_off(seen);
    assert!(
        after.windows(2).all(|w| w[1] == w[0] + 1),
        "guest kept running: {after:?}"
    );

    // Shut off: a revert to the disk-only s2 rolls the image back and boots the guest afresh.
    lab.ok(&["domain", "destroy", name]);
    let seen = console_counters(&console).len();
    lab.ok(&["snapshot", "revert", name, "s2"]);
    let fresh = resumed_counters(&console, seen, 3);
    assert!(fresh[0] <= 2, "a disk-only revert boots again: {fresh:?}");
    assert_eq!(lab.snapshots(name)["current"], "s2");
}

/// Whether `rbd/IMAGE` is a clone of `rbd/PARENT@SNAP`.
fn parent_of(ceph: &Ceph, image: &str) -> Option<String> {
    let info = ceph.rbd_json(&["info", &format!("rbd/{image}")]);
    let p = info.get("parent")?;
    Some(format!(
        "{}@{}",
        p["image"].as_str()?,
        p["snapshot"].as_str()?
    ))
}

/// The image name of an `rbd:rbd/IMAGE:conf=...` disk.
fn image_name(disk: &Path) -> String {
    let text = disk.to_string_lossy();
    let rest = text.strip_prefix("rbd:rbd/").expect("rbd:rbd/ name");
    rest.split(':').next().unwrap().to_string()
}

/// External snapshots of a running guest on an RBD disk: each is an RBD snapshot, protected and
/// cloned, and QEMU moves the disk to the clone while the guest is paused; a revert makes a new
/// clone and drops the abandoned one; a delete flattens the clones and removes what nothing
/// needs; all while the guest keeps counting.
#[test]
fn external_snapshots_on_rbd_move_the_running_disk_to_clones() {
    let name = "rbd-ext";
    let Some(g) = RbdGuest::start(name, "xvm", 5) else {
        return;
    };
    // (Bound in this order, the lab is dropped before the cluster.)
    let RbdGuest {
        ceph,
        lab,
        target,
        console,
        ..
    } = g;

    // The plan says what happens, and a dry run changes nothing.
    let r = lab.ok(&[
        "--dry-run",
        "snapshot",
        "create",
        name,
        "e1",
        "--external",
        "--disk-only",
    ]);
    assert!(r.stdout.contains("QEMU moves the disk"), "{}", r.describe());
    assert!(r.stdout.contains("pause the guest"), "{}", r.describe());
    assert!(ceph.snap_names("xvm").is_empty());
    assert_eq!(ceph.images(), ["xvm"]);

    // e1: disk-only, external. The guest pauses while its disk moves to the clone xvm.e1.
    let r = lab.ok(&[
        "snapshot",
        "create",
        name,
        "e1",
        "--external",
        "--disk-only",
    ]);
    assert!(r.stdout.contains("guest paused"), "{}", r.describe());
    eprintln!("{}", r.stdout.trim());
    assert_eq!(ceph.snap_names("xvm"), ["e1"]);
    assert_eq!(image_name(&lab.active(name, "xvda")), "xvm.e1");
    assert_eq!(parent_of(&ceph, "xvm.e1").as_deref(), Some("xvm@e1"));
    let info = lab.info(name, "e1");
    assert_eq!(info["disks"][0]["kind"], "external");
    assert_eq!(info["disks"][0]["path"], target);
    let n1 = rbd_counter(&ceph, "xvm@e1").expect("counter in xvm@e1");
    // The guest writes on into the clone; the base stays as the snapshot froze it.
    let later = wait_counter(&console, n1 + 15, BOOT);
    assert!(wait_until(BOOT, || rbd_counter(&ceph, "xvm.e1")
        .is_some_and(|c| c > n1 + 5)));
    assert_eq!(
        rbd_counter(&ceph, "xvm"),
        Some(n1),
        "the base was written after e1"
    );
    assert!(later > n1);

    // e2: live, with memory, external on the clone.
    let r = lab.ok(&["snapshot", "create", name, "e2", "--external", "--live"]);
    assert!(r.stdout.contains("memory saved live"), "{}", r.describe());
    eprintln!("{}", r.stdout.trim());
    assert_eq!(ceph.snap_names("xvm.e1"), ["e2"]);
    assert_eq!(image_name(&lab.active(name, "xvda")), "xvm.e2");
    assert_eq!(parent_of(&ceph, "xvm.e2").as_deref(), Some("xvm.e1@e2"));
    let n2 = rbd_counter(&ceph, "xvm.e1@e2").expect("counter in xvm.e1@e2");
    assert!(n2 > n1);

    // Revert to e2: a new clone of xvm.e1@e2 (xvm.e2 is taken), the guest resumes from n2, and
    // the abandoned xvm.e2 (no snapshot needs it) is removed.
    let later = wait_counter(&console, n2 + 20, BOOT);
    let seen = console_counters(&console).len();
    lab.ok(&["snapshot", "revert", name, "e2"]);
    let new = resumed_counters(&console, seen, 5);
    assert!(
        new[0] >= n2 && new[0] <= n2 + 2 && new[0] < later,
        "after the revert the guest must continue from e2's counter {n2}: {new:?}"
    );
    assert_eq!(image_name(&lab.active(name, "xvda")), "xvm.e2-1");
    assert_eq!(parent_of(&ceph, "xvm.e2-1").as_deref(), Some("xvm.e1@e2"));
    assert_eq!(ceph.images(), ["xvm", "xvm.e1", "xvm.e2-1"]);

    // The plan of deleting both at once: the running disk is flattened, each snapshot goes
    // and each image after it (xvm.e1, e2's, needs no flatten since it goes too).
    let r = lab.ok(&["--dry-run", "snapshot", "delete", name, "e1", "--children"]);
    let plan = &r.stdout;
    let flattens: Vec<&str> = plan.lines().filter(|l| l.contains("flatten")).collect();
    assert_eq!(flattens.len(), 1, "{plan}");
    assert!(flattens[0].contains("xvm.e2-1"), "{plan}");
    for gone in ["rbd:rbd/xvm.e1:", "rbd:rbd/xvm:"] {
        assert!(
            plan.lines()
                .any(|l| l.contains("remove ") && l.contains(gone)),
            "{gone} is removed: {plan}"
        );
    }
    assert_eq!(ceph.images(), ["xvm", "xvm.e1", "xvm.e2-1"]);

    // Delete e1 while the guest runs: xvm.e1 (e2's layer) is flattened, xvm@e1 and then xvm
    // itself go. What the guest sees does not change.
    let seen = console_counters(&console).len();
    let r = lab.ok(&["snapshot", "delete", name, "e1"]);
    assert!(r.stdout.contains("deleted snapshot e1"), "{}", r.describe());
    assert_eq!(ceph.images(), ["xvm.e1", "xvm.e2-1"]);
    assert_eq!(parent_of(&ceph, "xvm.e1"), None);
    assert_eq!(rbd_counter(&ceph, "xvm.e1@e2"), Some(n2));
    // Delete e2: the running disk xvm.e2-1 is flattened (through QEMU, which owns its lock),
    // then xvm.e1@e2 and xvm.e1 go.
    lab.ok(&["snapshot", "delete", name, "e2"]);
    assert_eq!(ceph.images(), ["xvm.e2-1"]);
    assert_eq!(parent_of(&ceph, "xvm.e2-1"), None);
    assert!(wait_until(BOOT, || console_counters(&console).len() >= seen + 10));
    let after = console_counters(&console).split_off(seen);
    assert!(
        after.windows(2).all(|w| w[1] == w[0] + 1),
        "the guest kept running through both deletes: {after:?}"
    );
    assert!(
        lab.snapshots(name)["snapshots"]
            .as_array()
            .is_some_and(|a| a.is_empty())
    );

    // Shut off: an external snapshot is a plain clone, and a revert to it a fresh one. (Names
    // grow from the image's: e2 is gone, so "xvm.e2-1" is a plain name now.)
    lab.ok(&["domain", "destroy", name]);
    lab.ok(&["snapshot", "create", name, "e3", "--external"]);
    assert_eq!(image_name(&lab.active(name, "xvda")), "xvm.e2-1.e3");
    assert_eq!(
        parent_of(&ceph, "xvm.e2-1.e3").as_deref(),
        Some("xvm.e2-1@e3")
    );
    lab.ok(&["snapshot", "revert", name, "e3"]);
    assert_eq!(lab.state_of(name), "shutoff");
    assert_eq!(image_name(&lab.active(name, "xvda")), "xvm.e2-1.e3-1");
    assert_eq!(ceph.images(), ["xvm.e2-1", "xvm.e2-1.e3-1"]);
    assert!(ceph.qemu_same("xvm.e2-1.e3-1", "xvm.e2-1@e3"));
    // Deleting e3 offline: the clone is flattened, then xvm.e2-1@e3 and xvm.e2-1 (nothing else
    // needs it) go.
    lab.ok(&["snapshot", "delete", name, "e3"]);
    assert_eq!(ceph.images(), ["xvm.e2-1.e3-1"]);
    assert_eq!(parent_of(&ceph, "xvm.e2-1.e3-1"), None);

    // A gold clone of an external snapshot is an rbd clone of its RBD snapshot, which a delete
    // then keeps (with the domain's own clone hanging off it too).
    lab.ok(&["snapshot", "create", name, "e4", "--external"]);
    lab.ok(&["snapshot", "clone", name, "e4", "cx", "--shutoff"]);
    assert_eq!(
        parent_of(&ceph, "xvm.e2-1.e3-1.cx").as_deref(),
        Some("xvm.e2-1.e3-1@e4")
    );
    let r = lab.ok(&["snapshot", "delete", name, "e4"]);
    assert!(r.stdout.contains("kept"), "{}", r.describe());
    assert_eq!(ceph.snap_names("xvm.e2-1.e3-1"), ["e4"]);
    assert_eq!(
        parent_of(&ceph, "xvm.e2-1.e3-1.e4").as_deref(),
        Some("xvm.e2-1.e3-1@e4")
    );
}

/// A kill in the middle of an online RBD switch: just before it, the next snapctl rolls the
/// create back (no snapshot, no clone, the guest runs on the image); just after it, the next
/// snapctl finds QEMU on the clone and finishes the create.
#[test]
fn killed_rbd_switch_is_rolled_back_or_finished() {
    let name = "rbd-kill";
    let Some(g) = RbdGuest::start(name, "kvm", 3) else {
        return;
    };
    let RbdGuest {
        ceph, lab, console, ..
    } = g;
    // The plan: pause (1), the switch (2), resume (3), record (4).
    let crash = |when: &str| {
        let mut cmd = snapctl();
        cmd.arg("--state-dir")
            .arg(lab.state())
            .args(["snapshot", "create", name, "k", "--external", "--disk-only"])
            .env("SNAPCTL_TEST_CRASH", when);
        let r = run(&mut cmd);
        assert_eq!(r.code, Some(86), "{}", r.describe());
    };

    crash("before:1");
    let r = lab.ok(&["snapshot", "list", name]);
    assert!(r.stderr.contains("rolled back"), "{}", r.describe());
    assert!(ceph.snap_names("kvm").is_empty());
    assert_eq!(ceph.images(), ["kvm"]);
    assert_eq!(lab.state_of(name), "running");
    let c = console_counters(&console).len();
    assert!(wait_until(BOOT, || console_counters(&console).len() > c + 3));

    crash("after:1");
    let r = lab.ok(&["snapshot", "list", name]);
    assert!(r.stderr.contains("finished"), "{}", r.describe());
    assert_eq!(ceph.snap_names("kvm"), ["k"]);
    assert_eq!(image_name(&lab.active(name, "xvda")), "kvm.k");
    assert_eq!(lab.snapshots(name)["current"], "k");
    assert_eq!(lab.state_of(name), "running");
    let c = console_counters(&console).len();
    assert!(wait_until(BOOT, || console_counters(&console).len() > c + 3));
    assert!(wait_until(BOOT, || rbd_counter(&ceph, "kvm.k")
        .zip(rbd_counter(&ceph, "kvm@k"))
        .is_some_and(|(now, then)| now > then)));
}

/// Refusals of RBD external snapshots change nothing in the cluster: an image without the
/// layering feature cannot be cloned (refused while planning), and a delete refuses to flatten
/// a clone of the snapshot that the domain does not track.
#[test]
fn refused_rbd_external_operations_change_nothing() {
    if !have_qemu_system() {
        return;
    }
    let Some(ceph) = Ceph::start() else {
        return;
    };
    let lab = DomainLab::new();
    ceph.rbd(&[
        "create",
        "--size",
        "16M",
        "--image-feature",
        "exclusive-lock",
        "rbd/flat",
    ])
    .ok();
    ceph.create("lay", "16M");
    ceph.write("lay", 0, 65536, 0x5a);
    let define = |name: &str, image: &str| {
        let target = ceph.disk_with_conf(image);
        let cfg = lab.write_cfg(
            name,
            &plain_cfg(name, &[("xvda", "raw", Path::new(&target))]),
        );
        lab.start(&cfg, name);
        lab.ok(&["domain", "destroy", name]);
    };
    define("noflat", "flat");
    define("lay", "lay");

    let before = ceph.fingerprint(&["flat", "lay"]);
    let r = lab.snapctl(["snapshot", "create", "noflat", "s", "--external"]);
    assert_error_line(&r);
    assert!(r.stderr.contains("layering"), "{}", r.describe());
    assert_eq!(ceph.fingerprint(&["flat", "lay"]), before);
    assert!(
        lab.snapshots("noflat")["snapshots"]
            .as_array()
            .is_some_and(|a| a.is_empty())
    );

    // An outside clone of the snapshot's RBD snapshot: the delete refuses to flatten it away.
    lab.ok(&["snapshot", "create", "lay", "e", "--external"]);
    ceph.rbd(&["clone", "rbd/lay@e", "rbd/outsider"]).ok();
    let before = ceph.fingerprint(&["lay", "lay.e", "outsider"]);
    let r = lab.snapctl(["snapshot", "delete", "lay", "e"]);
    assert_error_line(&r);
    assert!(r.stderr.contains("rbd:rbd/outsider"), "{}", r.describe());
    assert!(r.stderr.contains("does not track"), "{}", r.describe());
    assert_eq!(ceph.fingerprint(&["lay", "lay.e", "outsider"]), before);
    assert_eq!(lab.snapshots("lay")["current"], "e");
}
