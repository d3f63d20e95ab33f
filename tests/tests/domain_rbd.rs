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

use snapctl_tests::ceph::Ceph;
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
    let Some((kernel, initrd)) = guest() else {
        return;
    };
    let Some(ceph) = Ceph::start() else {
        return;
    };
    let lab = DomainLab::new();
    let name = "rbd-guest";
    ceph.create("gvm", "64M");
    let target = ceph.disk_with_conf("gvm");
    let console = lab.path("rbd-guest.console");
    let cfg = lab.write_cfg(
        name,
        &guest_cfg(
            name,
            &kernel,
            &initrd,
            &console,
            128,
            &[("xvda", "raw", Path::new(&target))],
        ),
    );
    lab.start(&cfg, name);
    wait_counter(&console, 5, BOOT);

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
    // --external is refused for RBD disks, nothing changed.
    let r = lab.snapctl(["snapshot", "create", name, "x", "--external"]);
    assert_error_line(&r);
    assert!(r.stderr.contains("RBD"), "{}", r.describe());
    assert!(ceph.snap_names("gvm").is_empty());

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
