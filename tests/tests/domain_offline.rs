//! Domain snapshots of a shut-off domain (the RFC's offline rows): create, revert and delete on
//! branching trees of internal and external snapshots over several disks, checked through
//! qemu-io (guest data per snapshot) and `qemu-img check`. The domains are defined by starting
//! them once (QEMU without a kernel sits in its firmware) and destroying them at once.

use std::path::{Path, PathBuf};

use serde_json::Value;
use snapctl_tests::domain::*;
use snapctl_tests::*;

const MIB: u64 = 1 << 20;

fn qcow2(path: &Path, size: &str) {
    qemu_img(["create", "-q", "-f", "qcow2", p(path), size]).ok();
}

/// Guest data: `byte` at MiB `slot`.
fn put(img: &Path, slot: u64, byte: u8) {
    write_patterns(img, &[Pattern::new(slot * MIB, MIB, byte)]);
}

fn expect(img: &Path, slots: &[(u64, u8)], when: &str) {
    let patterns: Vec<Pattern> = slots
        .iter()
        .map(|(slot, byte)| Pattern::new(slot * MIB, MIB, *byte))
        .collect();
    verify_patterns(img, &patterns, when);
}

/// Defines (start + destroy) a domain over `disks`; returns the lab.
fn offline_domain(name: &str, disks: &[(&str, &str, &Path)], lab: &DomainLab) {
    let cfg = lab.write_cfg(name, &plain_cfg(name, disks));
    lab.start(&cfg, name);
    assert_eq!(lab.state_of(name), "running");
    lab.ok(&["domain", "destroy", name]);
    assert_eq!(lab.state_of(name), "shutoff");
}

fn names(list: &Value) -> Vec<String> {
    list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

fn snap<'a>(list: &'a Value, name: &str) -> &'a Value {
    list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no snapshot {name} in {list}"))
}

fn all_clean(dir: &Path, when: &str) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "qcow2") {
            assert_qemu_clean(&path, when);
        }
    }
}

/// Every file in the lab folder (not the state dir) with its bytes.
fn folder_bytes(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn rfc_offline_external_tree_create_revert_delete_with_several_children() {
    if !have_qemu_system() {
        eprintln!("note: qemu-system-x86_64 missing; skipping");
        return;
    }
    let lab = DomainLab::new();
    let disks = lab.path("disks");
    std::fs::create_dir(&disks).unwrap();
    let a = disks.join("a.qcow2");
    let b = disks.join("b.qcow2");
    qcow2(&a, "16M");
    qcow2(&b, "16M");
    put(&a, 0, 0xa0);
    put(&b, 0, 0xb0);
    offline_domain("ext", &[("xvda", "qcow2", &a), ("xvdb", "qcow2", &b)], &lab);

    // s1 external: a.qcow2 and b.qcow2 freeze; new overlays become active.
    let r = lab.ok(&[
        "snapshot",
        "create",
        "ext",
        "s1",
        "--external",
        "--description",
        "first",
    ]);
    assert!(r.stdout.contains("a.s1.qcow2"), "{}", r.describe());
    let a1 = lab.active("ext", "xvda");
    assert_eq!(a1, disks.join("a.s1.qcow2"));
    let info = lab.info("ext", "s1");
    assert_eq!(info["state"], "shutoff");
    assert_eq!(info["memory"], false);
    assert_eq!(info["consistency"], "crash");
    assert_eq!(info["pause_window_ms"], Value::Null);
    assert_eq!(info["description"], "first");
    assert_eq!(info["disks"][0]["kind"], "external");
    assert_eq!(info["disks"][0]["path"], p(&a));
    assert_eq!(info["disks"][1]["path"], p(&b));
    put(&a1, 1, 0xa1);

    // s2 external on top; then revert to s1: a new overlay on a.qcow2, the abandoned active goes.
    lab.ok(&["snapshot", "create", "ext", "s2", "--external"]);
    let a2 = lab.active("ext", "xvda");
    put(&a2, 2, 0xa2);
    lab.ok(&["snapshot", "revert", "ext", "s1"]);
    assert_eq!(lab.state_of("ext"), "shutoff");
    let a1b = lab.active("ext", "xvda");
    assert_ne!(a1b, a1, "a new overlay, not the frozen layer of s2");
    assert!(!a2.exists(), "the abandoned active layer is removed");
    expect(&a1b, &[(0, 0xa0), (1, 0), (2, 0)], "after revert to s1");
    put(&a1b, 3, 0xa3);

    // s3 on the s1 branch: s1 now has two children (s2, s3).
    lab.ok(&["snapshot", "create", "ext", "s3", "--external"]);
    let a3 = lab.active("ext", "xvda");
    put(&a3, 4, 0xa4);
    let list = lab.snapshots("ext");
    assert_eq!(list["current"], "s3");
    assert_eq!(
        snap(&list, "s1")["children"],
        serde_json::json!(["s2", "s3"])
    );
    assert_eq!(snap(&list, "s2")["parent"], "s1");
    assert_eq!(snap(&list, "s3")["parent"], "s1");
    let tree = lab.ok(&["snapshot", "list", "ext", "--tree"]).stdout;
    for n in ["s1", "s2", "s3"] {
        assert!(tree.contains(n), "{tree}");
    }

    // --dry-run of the delete: a plan, nothing changed.
    let before = folder_bytes(&disks);
    let state_before = std::fs::read(lab.state().join("domains/ext/domain.json")).unwrap();
    let plan = lab
        .ok(&["--dry-run", "snapshot", "delete", "ext", "s1"])
        .stdout;
    assert!(plan.contains("merge layer"), "{plan}");
    assert!(plan.contains("nothing changed"), "{plan}");
    assert_eq!(folder_bytes(&disks), before, "dry run changed the disks");
    assert_eq!(
        std::fs::read(lab.state().join("domains/ext/domain.json")).unwrap(),
        state_before
    );

    // Delete s1 (a node with two children): a.qcow2 is merged into both children and removed.
    lab.ok(&["snapshot", "delete", "ext", "s1"]);
    assert!(!a.exists(), "s1's layer is merged away");
    assert!(!b.exists(), "s1's layer is merged away");
    let list = lab.snapshots("ext");
    assert_eq!(names(&list), ["s2", "s3"]);
    assert_eq!(snap(&list, "s2")["parent"], Value::Null);
    assert_eq!(snap(&list, "s3")["parent"], Value::Null);
    all_clean(&disks, "after deleting s1");
    expect(
        &a3,
        &[(0, 0xa0), (1, 0), (3, 0xa3), (4, 0xa4)],
        "active after deleting s1",
    );

    // s2 (off the current branch) still reverts to its data.
    lab.ok(&["snapshot", "revert", "ext", "s2"]);
    let now = lab.active("ext", "xvda");
    expect(
        &now,
        &[(0, 0xa0), (1, 0xa1), (2, 0), (3, 0)],
        "s2 after deleting s1",
    );
    assert!(
        !a3.exists(),
        "the abandoned active layer of s3's branch is removed"
    );
    // s3 too.
    lab.ok(&["snapshot", "revert", "ext", "s3"]);
    let now = lab.active("ext", "xvda");
    expect(
        &now,
        &[(0, 0xa0), (1, 0), (3, 0xa3), (4, 0)],
        "s3 after deleting s1",
    );
    let b_now = lab.active("ext", "xvdb");
    expect(&b_now, &[(0, 0xb0)], "second disk");
    all_clean(&disks, "after the reverts");

    // Delete s2, a leaf off the current branch: its layer has no children left and goes.
    let s2_layer = PathBuf::from(lab.info("ext", "s2")["disks"][0]["path"].as_str().unwrap());
    lab.ok(&["snapshot", "delete", "ext", "s2"]);
    assert!(!s2_layer.exists());
    assert_eq!(names(&lab.snapshots("ext")), ["s3"]);
    expect(&now, &[(0, 0xa0), (3, 0xa3)], "after deleting s2");
    all_clean(&disks, "at the end");
}

#[test]
fn rfc_offline_internal_tree_and_refusals() {
    if !have_qemu_system() {
        eprintln!("note: qemu-system-x86_64 missing; skipping");
        return;
    }
    let lab = DomainLab::new();
    let a = lab.path("vm.qcow2");
    qcow2(&a, "16M");
    put(&a, 0, 0x10);
    offline_domain("int", &[("xvda", "qcow2", &a)], &lab);

    lab.ok(&["snapshot", "create", "int", "s1"]);
    put(&a, 1, 0x11);
    lab.ok(&["snapshot", "create", "int", "s2"]);
    put(&a, 2, 0x12);
    assert_eq!(qemu_snapshot_names(&a), ["s1", "s2"]);
    let info = lab.info("int", "s2");
    assert_eq!(info["disks"][0]["kind"], "internal");
    assert_eq!(info["disks"][0]["path"], p(&a));
    assert_eq!(info["parent"], "s1");

    lab.ok(&["snapshot", "revert", "int", "s1"]);
    expect(&a, &[(0, 0x10), (1, 0), (2, 0)], "revert s1");
    put(&a, 3, 0x13);
    lab.ok(&["snapshot", "create", "int", "s3"]);
    let list = lab.snapshots("int");
    assert_eq!(
        snap(&list, "s1")["children"],
        serde_json::json!(["s2", "s3"])
    );

    // Refusals leave everything byte-identical.
    let image = file_bytes(&a);
    let record = std::fs::read(lab.state().join("domains/int/domain.json")).unwrap();
    for args in [
        vec!["snapshot", "create", "int", "s1"],
        vec!["snapshot", "create", "int", "q", "--quiesce", "--disk-only"],
        vec!["snapshot", "revert", "int", "nope"],
        vec!["snapshot", "delete", "int", "nope"],
        vec!["snapshot", "delete", "int", "s3", "--children-only"],
        vec!["snapshot", "info", "int", "nope"],
        vec!["snapshot", "list", "ghost"],
        vec!["snapshot", "create", "ghost", "x"],
        vec!["snapshot", "create", "int", "../evil"],
        vec!["domain", "destroy", "ghost"],
    ] {
        let r = lab.snapctl(&args);
        assert_error_line(&r);
    }
    assert_same_bytes(&a, &image, "after refusals");
    assert_eq!(
        std::fs::read(lab.state().join("domains/int/domain.json")).unwrap(),
        record
    );

    // Delete the middle node s1: its children become roots, their data stays.
    lab.ok(&["snapshot", "delete", "int", "s1"]);
    assert_eq!(qemu_snapshot_names(&a), ["s2", "s3"]);
    lab.ok(&["snapshot", "revert", "int", "s2"]);
    expect(
        &a,
        &[(0, 0x10), (1, 0x11), (2, 0), (3, 0)],
        "revert s2 after deleting s1",
    );
    assert_qemu_clean(&a, "internal tree");

    // --children from a root; --metadata-only keeps the disk snapshots.
    lab.ok(&["snapshot", "create", "int", "s4"]);
    lab.ok(&["snapshot", "delete", "int", "s2", "--children"]);
    assert_eq!(names(&lab.snapshots("int")), ["s3"]);
    assert_eq!(qemu_snapshot_names(&a), ["s3"]);
    lab.ok(&["snapshot", "delete", "int", "s3", "--metadata-only"]);
    assert_eq!(names(&lab.snapshots("int")), Vec::<String>::new());
    assert_eq!(
        qemu_snapshot_names(&a),
        ["s3"],
        "metadata-only keeps the disk snapshot"
    );
    assert_qemu_clean(&a, "end");
}

#[test]
fn rfc_offline_internal_revert_refused_when_its_image_is_frozen() {
    if !have_qemu_system() {
        eprintln!("note: qemu-system-x86_64 missing; skipping");
        return;
    }
    let lab = DomainLab::new();
    let a = lab.path("vm.qcow2");
    qcow2(&a, "16M");
    offline_domain("mix", &[("xvda", "qcow2", &a)], &lab);
    lab.ok(&["snapshot", "create", "mix", "in1"]);
    lab.ok(&["snapshot", "create", "mix", "ex1", "--external"]);
    let bytes = file_bytes(&a);
    let r = lab.snapctl(["snapshot", "revert", "mix", "in1"]);
    assert_error_line(&r);
    assert!(r.stderr.contains("ex1"), "{}", r.describe());
    assert_same_bytes(&a, &bytes, "refused revert");
    // Deleting ex1's layer would drop in1 (it lives in that layer): refused too.
    let r = lab.snapctl(["snapshot", "delete", "mix", "ex1"]);
    assert_error_line(&r);
    assert_same_bytes(&a, &bytes, "refused delete");
    // Delete in1 first, then ex1 merges fine.
    lab.ok(&["snapshot", "delete", "mix", "in1"]);
    lab.ok(&["snapshot", "delete", "mix", "ex1"]);
    assert!(!a.exists());
    assert_qemu_clean(&lab.active("mix", "xvda"), "end");
}

#[test]
fn raw_disks_are_refused_with_a_clear_error() {
    if !have_qemu_system() {
        eprintln!("note: qemu-system-x86_64 missing; skipping");
        return;
    }
    let lab = DomainLab::new();
    let raw = lab.path("raw.img");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    offline_domain("raw", &[("xvda", "raw", &raw)], &lab);
    let r = lab.snapctl(["snapshot", "create", "raw", "s1"]);
    assert_error_line(&r);
    assert!(r.stderr.contains("raw"), "{}", r.describe());
}

#[test]
fn rfc_offline_mixed_qcow2_and_vhd_disks() {
    if !have_qemu_system() {
        eprintln!("note: qemu-system-x86_64 missing; skipping");
        return;
    }
    let lab = DomainLab::new();
    let a = lab.path("mixed.qcow2");
    let v = lab.path("mixed-data.vhd");
    qcow2(&a, "16M");
    qemu_img([
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        "subformat=dynamic",
        p(&v),
        "16M",
    ])
    .ok();
    offline_domain("mixed", &[("xvda", "qcow2", &a), ("xvdb", "vhd", &v)], &lab);

    // Default create: qcow2 internal, VHD a differencing child (its own kind of snapshot).
    lab.ok(&["snapshot", "create", "mixed", "s1"]);
    let info = lab.info("mixed", "s1");
    assert_eq!(info["disks"][0]["kind"], "internal");
    assert_eq!(info["disks"][1]["kind"], "external");
    assert_eq!(info["disks"][1]["path"], p(&v));
    let child = lab.active("mixed", "xvdb");
    assert_eq!(child, lab.path("mixed-data.s1.vhd"));
    let listing: Value =
        serde_json::from_str(&lab.ok(&["disk", "list", p(&child), "--json"]).stdout).unwrap();
    assert_eq!(listing["format"], "vhd");
    assert_eq!(listing["chain"][0]["path"], p(&v));

    // Revert: qcow2 in place, VHD a fresh child of the frozen parent.
    lab.ok(&["snapshot", "revert", "mixed", "s1"]);
    let again = lab.active("mixed", "xvdb");
    assert_ne!(again, child);
    assert!(!child.exists(), "the abandoned VHD child is removed");

    // Delete: the qcow2 snapshot goes, the VHD parent is merged into its child.
    lab.ok(&["snapshot", "delete", "mixed", "s1"]);
    assert!(qemu_snapshot_names(&a).is_empty());
    assert!(!v.exists(), "the VHD parent is coalesced into its child");
    let listing: Value =
        serde_json::from_str(&lab.ok(&["disk", "list", p(&again), "--json"]).stdout).unwrap();
    assert_eq!(listing["chain"], serde_json::json!([]));
    lab.ok(&["disk", "check", p(&again)]);
    assert_qemu_clean(&a, "mixed end");
}

#[test]
fn concurrent_snapctl_runs_on_one_domain_take_turns() {
    if !have_qemu_system() {
        eprintln!("note: qemu-system-x86_64 missing; skipping");
        return;
    }
    let lab = DomainLab::new();
    let a = lab.path("busy.qcow2");
    qcow2(&a, "16M");
    offline_domain("busy", &[("xvda", "qcow2", &a)], &lab);
    let runs: Vec<Run> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let lab = &lab;
                scope.spawn(move || lab.snapctl(["snapshot", "create", "busy", &format!("c{i}")]))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &runs {
        assert!(r.success(), "a concurrent create failed\n{}", r.describe());
    }
    // All four recorded, each on top of the one before (none lost, none saw a stale tree).
    let list = lab.snapshots("busy");
    let snaps = list["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 4);
    let roots = snaps.iter().filter(|s| s["parent"].is_null()).count();
    assert_eq!(roots, 1, "a linear chain: {list}");
    for s in snaps {
        assert!(s["children"].as_array().unwrap().len() <= 1, "{list}");
    }
    let mut on_disk = qemu_snapshot_names(&a);
    on_disk.sort();
    assert_eq!(on_disk, ["c0", "c1", "c2", "c3"]);
    assert_qemu_clean(&a, "after concurrent creates");
}

#[test]
fn bad_configs_point_at_the_line_and_key() {
    let lab = DomainLab::new();
    let cfg = lab.write_cfg("bad", "name = \"bad\"\nmemory = 64\nvcpus = \"two\"\n");
    let r = lab.snapctl(["domain", "start", p(&cfg)]);
    assert_error_line(&r);
    assert!(
        r.stderr.contains("line 3") && r.stderr.contains("vcpus"),
        "{}",
        r.describe()
    );
    let cfg = lab.write_cfg(
        "bad2",
        "name = \"bad2\"\ndisk = [ 'x.qcow2,qcow2,xvda',\n  'format=qcow3,vdev=xvdb,target=y' ]\n",
    );
    let r = lab.snapctl(["domain", "start", p(&cfg)]);
    assert_error_line(&r);
    assert!(
        r.stderr.contains("line 3") && r.stderr.contains("qcow3"),
        "{}",
        r.describe()
    );
    let cfg = lab.write_cfg(
        "bad3",
        "name = \"bad3\"\ndisk = [ 'nothere.qcow2,qcow2,xvda' ]\n",
    );
    let r = lab.snapctl(["domain", "start", p(&cfg)]);
    assert_error_line(&r);
    assert!(r.stderr.contains("does not exist"), "{}", r.describe());
    // Nothing was defined by the refused starts.
    let listed = lab.ok(&["domain", "list", "--json"]).stdout;
    assert_eq!(listed.trim(), "[]");
}

#[test]
fn wait_chooses_between_waiting_for_another_snapctl_and_failing_at_once() {
    if !have_qemu_system() {
        return;
    }
    let lab = DomainLab::new();
    let a = lab.path("held.qcow2");
    qcow2(&a, "16M");
    offline_domain("held", &[("xvda", "qcow2", &a)], &lab);
    let lock = lab.state().join("domains/held/lock");
    // Another process holds the domain's lock for 2 s.
    let mut holder = std::process::Command::new("flock")
        .arg(&lock)
        .args(["sleep", "2"])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let r = lab.snapctl(["--wait", "0", "snapshot", "create", "held", "s1"]);
    assert_error_line(&r);
    assert!(r.stderr.contains("another snapctl"), "{}", r.describe());
    assert!(qemu_snapshot_names(&a).is_empty(), "nothing was done");
    let started = std::time::Instant::now();
    lab.ok(&["--wait", "20", "snapshot", "create", "held", "s1"]);
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(1000),
        "it waited"
    );
    assert_eq!(qemu_snapshot_names(&a), ["s1"]);
    holder.wait().unwrap();
}
