//! Gold-image clones of a domain on an RBD disk (`snapshot clone`) against a real one-node Ceph:
//! each clone's disk is `rbd clone` of the snapshot (protected first), its config points at
//! `rbd:POOL/IMAGE.CLONE`, a clone resumes from the snapshot's memory, and deleting the gold
//! snapshot keeps the RBD snapshot while clones depend on it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::time::Duration;

use snapctl_tests::ceph::RbdGuest;
use snapctl_tests::domain::*;
use snapctl_tests::*;

const BOOT: Duration = Duration::from_secs(90);

#[test]
fn clones_of_an_rbd_snapshot_are_rbd_clones() {
    let name = "gold";
    let Some(g) = RbdGuest::start(name, "gvm", 5) else {
        return;
    };
    let n = g.counter;
    let RbdGuest { ceph, lab, .. } = g;

    // A snapshot with memory (the RBD snapshot through QMP).
    lab.ok(&["snapshot", "create", name, "base"]);
    assert_eq!(ceph.snap_names("gvm"), ["base"]);

    // A clone whose image name is taken is refused before anything is made.
    ceph.create("gvm.dup", "1M");
    let before = ceph.fingerprint(&[]);
    let r = lab.snapctl(["snapshot", "clone", name, "base", "dup", "--shutoff"]);
    assert_error_line(&r);
    assert!(r.stderr.contains("already exists"), "{}", r.describe());
    assert!(
        ceph.fingerprint(&[]) == before,
        "a refused clone changed the pool"
    );
    assert!(lab.snapctl(["snapshot", "list", "dup"]).code == Some(1));

    // --dry-run plans the clones and makes nothing.
    let r = lab.ok(&[
        "--dry-run",
        "snapshot",
        "clone",
        name,
        "base",
        "c",
        "--count",
        "2",
    ]);
    assert!(r.stdout.contains("rbd:rbd/gvm.c-1"), "{}", r.describe());
    assert!(ceph.fingerprint(&[]) == before);

    // Two clones, shut off: RBD clones of gvm@base (now protected), configs on them.
    lab.ok(&[
        "snapshot",
        "clone",
        name,
        "base",
        "c",
        "--count",
        "2",
        "--shutoff",
    ]);
    for c in ["c-1", "c-2"] {
        let info = ceph.rbd_json(&["info", &format!("rbd/gvm.{c}")]);
        assert_eq!(info["parent"]["image"], "gvm", "{info}");
        assert_eq!(info["parent"]["snapshot"], "base", "{info}");
        assert!(ceph.qemu_same(&format!("gvm.{c}"), "gvm@base"));
        let active = lab.active(c, "xvda");
        assert!(
            active
                .to_string_lossy()
                .starts_with(&format!("rbd:rbd/gvm.{c}")),
            "{}",
            active.display()
        );
        assert_eq!(lab.state_of(c), "shutoff");
    }
    let snaps = ceph.rbd_json(&["snap", "ls", "rbd/gvm"]);
    assert_eq!(snaps[0]["protected"], "true");

    // A clone resumed from the snapshot's memory continues from its counter.
    lab.ok(&["snapshot", "clone", name, "base", "web"]);
    lab.adopt("web");
    let web_console = lab.path("gold.console.web");
    assert!(
        wait_until(BOOT, || console_counters(&web_console).len() >= 3),
        "the clone printed no counters"
    );
    let web = console_counters(&web_console);
    assert!(web[0] >= n, "the clone resumes from the snapshot: {web:?}");
    assert!(ceph.rbd(&["info", "rbd/gvm.web"]).success());

    // Deleting the gold snapshot keeps the RBD snapshot the clones hang off.
    let r = lab.ok(&["snapshot", "delete", name, "base"]);
    assert!(r.stdout.contains("kept"), "{}", r.describe());
    assert!(r.stdout.contains("c-1"), "{}", r.describe());
    assert_eq!(ceph.snap_names("gvm"), ["base"]);
    assert_eq!(lab.snapshots(name)["snapshots"], serde_json::json!([]));
}
