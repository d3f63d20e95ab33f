//! `snapctl disk ...` on Ceph RBD images against a real one-node cluster (see
//! `snapctl_tests::ceph`), one cluster per test. Data is written through QEMU's rbd driver
//! (`qemu-io`) and checked with `rbd export` and `qemu-img compare`; every refusal must leave
//! the pool's listing and the images' bytes as they were.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use serde_json::Value;
use snapctl_tests::ceph::Ceph;
use snapctl_tests::{Run, assert_error_line, run, snapctl};

const MIB: u64 = 1 << 20;

fn sc(ceph: &Ceph, args: &[&str]) -> Run {
    let r = run(ceph.env(&mut snapctl()).args(args));
    assert!(
        !r.stderr.contains("panicked") && r.code != Some(101),
        "snapctl panicked\n{}",
        r.describe()
    );
    r
}

#[track_caller]
fn ok(ceph: &Ceph, args: &[&str]) -> Run {
    let r = sc(ceph, args);
    assert!(r.success(), "snapctl failed\n{}", r.describe());
    r
}

#[track_caller]
fn list_json(ceph: &Ceph, disk: &str) -> Value {
    let r = ok(ceph, &["disk", "list", disk, "--json"]);
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("list JSON: {e}\n{}", r.describe()))
}

/// What a refusal must leave alone: the pool's listing and these images' bytes.
struct Unchanged<'a> {
    images: Vec<&'a str>,
    state: (Value, Vec<Vec<u8>>),
}

impl<'a> Unchanged<'a> {
    #[track_caller]
    fn now(ceph: &Ceph, images: &[&'a str]) -> Self {
        Unchanged {
            images: images.to_vec(),
            state: ceph.fingerprint(images),
        }
    }
}

/// Asserts a refusal: exit 1, one error line containing `needle`, nothing changed.
#[track_caller]
fn refused(ceph: &Ceph, before: &Unchanged, args: &[&str], needle: &str) {
    let r = sc(ceph, args);
    assert_error_line(&r);
    assert!(
        r.stderr.contains(needle),
        "expected {needle:?} in the error\n{}",
        r.describe()
    );
    assert!(
        ceph.fingerprint(&before.images) == before.state,
        "a refused {args:?} changed the pool"
    );
}

fn filled(len: u64, pattern: u8) -> Vec<u8> {
    vec![pattern; usize::try_from(len).unwrap()]
}

#[test]
fn internal_snapshots_list_revert_delete() {
    let Some(ceph) = Ceph::start() else {
        return;
    };
    eprintln!("ceph started in {:?}", ceph.started_in);
    let disk = ceph.disk("vm");
    ceph.create("vm", "64M");
    ceph.write("vm", 0, MIB, 0xa1);
    ceph.write("vm", 40 * MIB, MIB, 0xa2);

    let r = ok(&ceph, &["disk", "create", &disk, "s1"]);
    assert!(
        r.stdout.contains("created snapshot \"s1\""),
        "{}",
        r.describe()
    );
    let l = list_json(&ceph, &disk);
    assert_eq!(l["format"], "rbd");
    assert_eq!(l["image"], disk);
    assert_eq!(l["virtual_size"], 64 * MIB);
    assert_eq!(l["snapshots"][0]["name"], "s1");
    assert_eq!(l["chain"], serde_json::json!([]));
    let date = l["snapshots"][0]["date"].as_str().unwrap();
    assert!(date.starts_with("20") && date.ends_with('Z'), "{date}");
    // The same image through conf= in its name, and with --format.
    let with_conf = ceph.disk_with_conf("vm");
    let l2 = list_json(&ceph, &with_conf);
    assert_eq!(l2["snapshots"], l["snapshots"]);
    let r = ok(&ceph, &["disk", "list", &disk, "--format", "rbd"]);
    assert!(
        r.stdout.contains("s1") && r.stdout.contains("open by: nobody"),
        "{}",
        r.describe()
    );
    let at_s1 = ceph.export("vm@s1");

    // Change the data, take s2, change again.
    ceph.write("vm", 0, MIB, 0xb1);
    ok(&ceph, &["disk", "create", &disk, "s2", "--json"]);
    ceph.write("vm", 8 * MIB, MIB, 0xb2);
    assert!(!ceph.qemu_same("vm", "vm@s1"));
    assert_eq!(ceph.snap_names("vm"), ["s1", "s2"]);

    // --dry-run changes nothing.
    let before = ceph.fingerprint(&["vm"]);
    let r = ok(&ceph, &["--dry-run", "disk", "revert", &disk, "s1"]);
    assert!(r.stdout.contains("plan: roll"), "{}", r.describe());
    ok(&ceph, &["--dry-run", "disk", "delete", &disk, "s2"]);
    ok(&ceph, &["--dry-run", "disk", "create", &disk, "s3"]);
    assert!(ceph.fingerprint(&["vm"]) == before);

    // Revert: the image holds s1's data again; the snapshots stay.
    ok(&ceph, &["disk", "revert", &disk, "s1"]);
    assert!(ceph.qemu_same("vm", "vm@s1"));
    let now = ceph.export("vm");
    assert_eq!(now, at_s1);
    assert_eq!(&now[..MIB as usize], filled(MIB, 0xa1).as_slice());
    assert_eq!(
        &now[40 * MIB as usize..41 * MIB as usize],
        filled(MIB, 0xa2).as_slice()
    );
    assert_eq!(ceph.snap_names("vm"), ["s1", "s2"]);

    // Delete by name and by id; the image keeps its data.
    ok(&ceph, &["disk", "delete", &disk, "s1"]);
    let id = list_json(&ceph, &disk)["snapshots"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    ok(&ceph, &["disk", "delete", &disk, &id]);
    assert!(ceph.snap_names("vm").is_empty());
    assert_eq!(ceph.export("vm"), at_s1);
}

#[test]
fn refusals_change_nothing() {
    let Some(ceph) = Ceph::start() else {
        return;
    };
    let disk = ceph.disk("r");
    ceph.create("r", "16M");
    ceph.write("r", 0, MIB, 0x11);
    ok(&ceph, &["disk", "create", &disk, "s1"]);
    ceph.write("r", 0, MIB, 0x22);
    let u = Unchanged::now(&ceph, &["r"]);

    // Unknown pool, unknown image, unknown snapshot, a name in use.
    refused(&ceph, &u, &["disk", "list", "rbd:nopool/r"], "nopool");
    refused(
        &ceph,
        &u,
        &["disk", "create", "rbd:nopool/r", "s9"],
        "nopool",
    );
    refused(
        &ceph,
        &u,
        &["disk", "create", &ceph.disk("nope"), "s9"],
        "nope",
    );
    refused(
        &ceph,
        &u,
        &["disk", "revert", &ceph.disk("nope"), "s1"],
        "nope",
    );
    refused(
        &ceph,
        &u,
        &["disk", "revert", &disk, "s9"],
        "no snapshot named",
    );
    refused(
        &ceph,
        &u,
        &["disk", "delete", &disk, "s9"],
        "no snapshot named",
    );
    refused(
        &ceph,
        &u,
        &["disk", "create", &disk, "s1"],
        "already exists",
    );
    // Names are checked before rbd runs.
    refused(&ceph, &u, &["disk", "create", &disk, "a@b"], "contains '@'");
    refused(&ceph, &u, &["disk", "create", &disk, "a/b"], "contains '/'");
    refused(
        &ceph,
        &u,
        &["disk", "list", "rbd:rbd/-x"],
        "starts with '-'",
    );
    refused(
        &ceph,
        &u,
        &["disk", "list", "rbd:rbd/r:mon_host=1.2.3.4"],
        "not supported",
    );
    refused(
        &ceph,
        &u,
        &["disk", "list", "rbd:rbd/r@s1"],
        "names snapshot",
    );
    refused(
        &ceph,
        &u,
        &["disk", "list", "r", "--format", "rbd"],
        "not an RBD disk name",
    );
    refused(
        &ceph,
        &u,
        &["disk", "list", &disk, "--qmp", "/x.sock", "--node", "n"],
        "do not apply to RBD",
    );
    refused(&ceph, &u, &["disk", "check", &disk], "Ceph checks");
    // A layer that is not in the chain (the image is no clone).
    refused(
        &ceph,
        &u,
        &["disk", "delete", &disk, "--layer", "rbd:rbd/other"],
        "not a clone parent",
    );
    refused(
        &ceph,
        &u,
        &["disk", "revert", &disk, "--layer", "rbd:rbd/other"],
        "not a clone parent",
    );

    // A client has the image open (a running QEMU): revert is refused, snapshots still work
    // (Ceph coordinates them with the client).
    {
        let _qemu = ceph.hold("r");
        let r = ok(&ceph, &["disk", "list", &disk]);
        assert!(r.stdout.contains("open by: client."), "{}", r.describe());
        refused(
            &ceph,
            &u,
            &["disk", "revert", &disk, "s1"],
            "stop the guest first",
        );
        refused(
            &ceph,
            &u,
            &["--dry-run", "disk", "revert", &disk, "s1"],
            "open by 1 client",
        );
        ok(&ceph, &["disk", "create", &disk, "while-open"]);
        ok(&ceph, &["disk", "delete", &disk, "while-open"]);
    }
    // Closed again: the revert goes through.
    ok(&ceph, &["disk", "revert", &disk, "s1"]);
    assert!(ceph.qemu_same("r", "r@s1"));

    // A snapshot clones depend on cannot be deleted.
    ceph.rbd(&["snap", "protect", "rbd/r@s1"]).ok();
    ceph.rbd(&["clone", "rbd/r@s1", "rbd/rc"]).ok();
    let u = Unchanged::now(&ceph, &["r", "rc"]);
    refused(
        &ceph,
        &u,
        &["disk", "delete", &disk, "s1"],
        "clone(s) depending on it (rbd:rbd/rc)",
    );
    refused(
        &ceph,
        &u,
        &["--dry-run", "disk", "delete", &disk, "s1"],
        "depending on it",
    );
    // A clone with snapshots cannot be replaced by a fresh clone.
    ok(&ceph, &["disk", "create", &ceph.disk("rc"), "c1"]);
    let u = Unchanged::now(&ceph, &["r", "rc"]);
    refused(
        &ceph,
        &u,
        &["disk", "revert", &ceph.disk("rc"), "--layer", &disk],
        "has snapshots (c1)",
    );
    // An external snapshot onto an image that exists.
    refused(
        &ceph,
        &u,
        &[
            "disk",
            "create",
            &disk,
            "x",
            "--external",
            "--overlay",
            "rbd:rbd/rc",
        ],
        "already exists",
    );
    refused(
        &ceph,
        &u,
        &[
            "disk",
            "create",
            &disk,
            "x",
            "--external",
            "--overlay",
            "rbd:nopool/x",
        ],
        "nopool",
    );
}

#[test]
fn clones_chain_layer_delete_and_revert() {
    let Some(ceph) = Ceph::start() else {
        return;
    };
    // A gold image with data.
    let gold = ceph.disk("gold");
    ceph.create("gold", "32M");
    ceph.write("gold", 0, MIB, 0x61);
    ceph.write("gold", 20 * MIB, 2 * MIB, 0x62);

    // --external: snapshot, protect, clone; the clone is printed and becomes the active image.
    let r = ok(
        &ceph,
        &["--dry-run", "disk", "create", &gold, "base", "--external"],
    );
    assert!(r.stdout.contains("rbd:rbd/gold.base"), "{}", r.describe());
    assert!(ceph.snap_names("gold").is_empty());
    let r = ok(&ceph, &["disk", "create", &gold, "base", "--external"]);
    assert_eq!(r.stdout.trim(), "rbd:rbd/gold.base");
    let vm1 = ceph.disk("gold.base");
    let l = list_json(&ceph, &vm1);
    assert_eq!(l["chain"][0]["path"], "rbd:rbd/gold@base");
    assert_eq!(l["chain"][0]["format"], "rbd");
    assert!(ceph.qemu_same("gold.base", "gold@base"));
    let info = ceph.rbd_json(&["snap", "ls", "rbd/gold"]);
    assert_eq!(info[0]["protected"], "true");

    // A second clone of another snapshot at a given name, and a clone of a clone.
    ceph.write("gold", 4 * MIB, MIB, 0x63);
    let r = ok(
        &ceph,
        &[
            "disk",
            "create",
            &gold,
            "v2",
            "--external",
            "--overlay",
            "rbd:rbd/vm2",
            "--json",
        ],
    );
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["active"], "rbd:rbd/vm2");
    let vm2 = ceph.disk("vm2");
    ceph.write("vm2", 10 * MIB, MIB, 0x71);
    ok(
        &ceph,
        &[
            "disk",
            "create",
            &vm2,
            "t",
            "--external",
            "--overlay",
            "rbd:rbd/vm3",
        ],
    );
    let vm3 = ceph.disk("vm3");
    let chain: Vec<Value> = list_json(&ceph, &vm3)["chain"].as_array().unwrap().clone();
    let paths: Vec<&str> = chain.iter().map(|c| c["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["rbd:rbd/vm2@t", "rbd:rbd/gold@v2"]);

    // Writes to the clone leave gold alone.
    ceph.write("gold.base", 0, MIB, 0x99);
    assert!(!ceph.qemu_same("gold.base", "gold@base"));
    let vm1_data = ceph.export("gold.base");
    let vm3_data = ceph.export("vm3");

    // The parent snapshots are in use.
    refused(
        &ceph,
        &Unchanged::now(&ceph, &["gold", "gold.base", "vm2"]),
        &["disk", "delete", &gold, "base"],
        "depending on it",
    );

    // Layer delete: vm1 is flattened; gold stays (vm2 still hangs off v2, and base's clone is
    // gone but gold has another snapshot).
    let r = ok(
        &ceph,
        &["--dry-run", "disk", "delete", &vm1, "--layer", &gold],
    );
    assert!(
        r.stdout.contains("flatten rbd:rbd/gold.base"),
        "{}",
        r.describe()
    );
    assert!(r.stdout.contains("keep rbd:rbd/gold"), "{}", r.describe());
    let r = ok(&ceph, &["disk", "delete", &vm1, "--layer", &gold]);
    assert!(r.stdout.contains("kept rbd:rbd/gold"), "{}", r.describe());
    assert_eq!(list_json(&ceph, &vm1)["chain"], serde_json::json!([]));
    assert_eq!(ceph.export("gold.base"), vm1_data);
    // Now base has no clone: it can be deleted (unprotected first).
    ok(&ceph, &["disk", "delete", &gold, "base"]);
    assert_eq!(ceph.snap_names("gold"), ["v2"]);

    // Delete the grandparent layer of vm3: vm2 (its child in the chain) is flattened; gold
    // has no other user or snapshot left, so it goes.
    let r = ok(
        &ceph,
        &["disk", "delete", &vm3, "--layer", "rbd:rbd/gold@v2"],
    );
    assert!(
        r.stdout.contains("flattened rbd:rbd/vm2"),
        "{}",
        r.describe()
    );
    assert!(
        r.stdout.contains("removed rbd:rbd/gold"),
        "{}",
        r.describe()
    );
    assert!(!ceph.images().contains(&"gold".to_string()));
    assert_eq!(ceph.export("vm3"), vm3_data);
    let paths: Vec<Value> = list_json(&ceph, &vm3)["chain"].as_array().unwrap().clone();
    assert_eq!(paths.len(), 1);
    assert_eq!(paths[0]["path"], "rbd:rbd/vm2@t");

    // Layer revert: vm3 becomes an empty clone of vm2@t again (its own writes dropped).
    ceph.write("vm3", 0, MIB, 0x55);
    assert!(!ceph.qemu_same("vm3", "vm2@t"));
    ok(
        &ceph,
        &["--dry-run", "disk", "revert", &vm3, "--layer", &vm2],
    );
    assert!(!ceph.qemu_same("vm3", "vm2@t"));
    let r = ok(&ceph, &["disk", "revert", &vm3, "--layer", &vm2]);
    assert!(
        r.stdout.contains("empty clone of rbd:rbd/vm2@t"),
        "{}",
        r.describe()
    );
    assert!(ceph.qemu_same("vm3", "vm2@t"));
    assert_eq!(list_json(&ceph, &vm3)["chain"][0]["path"], "rbd:rbd/vm2@t");
    let leftovers: Vec<String> = ceph
        .images()
        .into_iter()
        .filter(|i| i.contains("snapctl"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
