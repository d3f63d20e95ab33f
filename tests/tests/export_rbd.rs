//! `snapctl disk export` of RBD images (a snapshot or the image now, streamed from `rbd export`)
//! and `--since` (`rbd export-diff`) against a real one-node cluster: the output's guest view is
//! `rbd export`'s bytes, sparse, with the same checksum as every other export; refusals create
//! nothing and change nothing.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

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
fn ok_json(ceph: &Ceph, args: &[&str]) -> Value {
    let r = ok(ceph, args);
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("JSON: {e}\n{}", r.describe()))
}

/// The export checksum of `bytes` (blake3 of the blake3 digests of each 4 MiB).
fn checksum(bytes: &[u8]) -> String {
    let mut total = blake3::Hasher::new();
    for chunk in bytes.chunks(4 << 20) {
        total.update(blake3::hash(chunk).as_bytes());
    }
    total.finalize().to_hex().to_string()
}

/// The guest view of an exported file, through `qemu-img convert -O raw`.
#[track_caller]
fn view_of(file: &Path, format: &str) -> Vec<u8> {
    let raw = file.with_extension("view.raw");
    let r = run(Command::new("qemu-img").args([
        "convert",
        "-f",
        format,
        "-O",
        "raw",
        file.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]));
    assert!(r.success(), "qemu-img convert\n{}", r.describe());
    let bytes = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    bytes
}

#[test]
fn exports_snapshots_and_the_image_sparse() {
    let Some(ceph) = Ceph::start() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = |name: &str| tmp.path().join(name);
    let vm = ceph.disk("vm");
    ceph.create("vm", "64M");
    ceph.write("vm", 0, MIB, 0x61);
    ceph.write("vm", 40 * MIB, 2 * MIB, 0x62);
    ok(&ceph, &["disk", "create", &vm, "s1"]);
    ceph.write("vm", 8 * MIB, MIB, 0x63);
    ceph.write("vm", 0, MIB / 2, 0);
    let at_s1 = ceph.export("vm@s1");
    let now = ceph.export("vm");

    // A snapshot, raw: rbd export's bytes, sparse, 0600, the checksum of the view.
    let raw = out("s1.raw");
    let v = ok_json(
        &ceph,
        &[
            "disk",
            "export",
            &vm,
            "s1",
            raw.to_str().unwrap(),
            "--format",
            "raw",
            "--json",
        ],
    );
    assert_eq!(std::fs::read(&raw).unwrap(), at_s1);
    assert_eq!(v["virtual_size"], 64 * MIB);
    assert_eq!(v["data_bytes"], 3 * MIB);
    assert_eq!(v["checksum"], checksum(&at_s1));
    assert_eq!(v["view"]["snapshot"], "s1");
    let meta = std::fs::metadata(&raw).unwrap();
    assert!(meta.blocks() * 512 <= 4 * MIB, "not sparse: {meta:?}");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    // The image now, qcow2 and VHD: the same view as rbd export (and qemu-img compare), the
    // same checksum as an export of a local copy of it.
    let q = out("now.qcow2");
    let v = ok_json(
        &ceph,
        &["disk", "export", &vm, q.to_str().unwrap(), "--json"],
    );
    assert_eq!(view_of(&q, "qcow2"), now);
    assert_eq!(v["checksum"], checksum(&now));
    let r = run(Command::new("qemu-img").args([
        "compare",
        "-f",
        "qcow2",
        q.to_str().unwrap(),
        &ceph.disk_with_conf("vm"),
    ]));
    assert!(r.success(), "qemu-img compare\n{}", r.describe());
    let again = out("again.raw");
    let v2 = ok_json(
        &ceph,
        &[
            "disk",
            "export",
            q.to_str().unwrap(),
            again.to_str().unwrap(),
            "--json",
            "--format",
            "raw",
        ],
    );
    assert_eq!(v2["checksum"], v["checksum"]);
    let vhd = out("now.vhd");
    let v3 = ok_json(
        &ceph,
        &[
            "disk",
            "export",
            &vm,
            vhd.to_str().unwrap(),
            "--format",
            "vhd",
            "--json",
        ],
    );
    assert_eq!(v3["checksum"], v["checksum"]);

    // A clone's export holds its parent's data too.
    let r = ok(
        &ceph,
        &[
            "disk",
            "create",
            &vm,
            "gold",
            "--external",
            "--overlay",
            "rbd:rbd/c1",
        ],
    );
    assert_eq!(r.stdout.trim(), "rbd:rbd/c1");
    ceph.write("c1", 60 * MIB, MIB, 0x64);
    let c1 = out("c1.raw");
    ok(
        &ceph,
        &[
            "disk",
            "export",
            &ceph.disk("c1"),
            c1.to_str().unwrap(),
            "--format",
            "raw",
        ],
    );
    assert_eq!(std::fs::read(&c1).unwrap(), ceph.export("c1"));

    // --dry-run prints the plan and creates nothing.
    let d = out("dry.qcow2");
    let r = ok(
        &ceph,
        &[
            "--dry-run",
            "disk",
            "export",
            &vm,
            "s1",
            d.to_str().unwrap(),
        ],
    );
    assert!(r.stdout.contains("plan: export"), "{}", r.describe());
    assert!(!d.exists());
}

#[test]
fn incremental_exports_apply_with_import_diff() {
    let Some(ceph) = Ceph::start() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let vm = ceph.disk("vm");
    ceph.create("vm", "32M");
    ceph.write("vm", 0, MIB, 0x41);
    ok(&ceph, &["disk", "create", &vm, "s1"]);
    ceph.write("vm", 16 * MIB, MIB, 0x42);
    ok(&ceph, &["disk", "create", &vm, "s2"]);
    ceph.write("vm", 4 * MIB, MIB, 0x43);

    // The full export of s1, the diff s1 -> s2 and the diff s2 -> now.
    let full = tmp.path().join("s1.raw");
    ok(
        &ceph,
        &[
            "disk",
            "export",
            &vm,
            "s1",
            full.to_str().unwrap(),
            "--format",
            "raw",
        ],
    );
    let d12 = tmp.path().join("s1-s2.diff");
    let v = ok_json(
        &ceph,
        &[
            "disk",
            "export",
            &vm,
            "s2",
            d12.to_str().unwrap(),
            "--since",
            "s1",
            "--json",
        ],
    );
    assert_eq!(v["format"], "rbd-diff");
    assert_eq!(v["since"], "s1");
    let meta = std::fs::metadata(&d12).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert!(
        meta.len() < 2 * MIB,
        "the diff holds only the changes: {meta:?}"
    );
    let dnow = tmp.path().join("s2-now.diff");
    ok(
        &ceph,
        &[
            "disk",
            "export",
            &vm,
            dnow.to_str().unwrap(),
            "--since",
            "s2",
        ],
    );

    // Restored elsewhere: import the full export, then the diffs in order.
    ceph.rbd(&[
        "import",
        "--no-progress",
        full.to_str().unwrap(),
        "rbd/restore",
    ])
    .ok();
    ceph.rbd(&["snap", "create", "rbd/restore@s1"]).ok();
    ceph.rbd(&[
        "import-diff",
        "--no-progress",
        d12.to_str().unwrap(),
        "rbd/restore",
    ])
    .ok();
    assert_eq!(ceph.export("restore"), ceph.export("vm@s2"));
    ceph.rbd(&[
        "import-diff",
        "--no-progress",
        dnow.to_str().unwrap(),
        "rbd/restore",
    ])
    .ok();
    assert_eq!(ceph.export("restore"), ceph.export("vm"));
}

#[test]
fn refused_exports_create_nothing() {
    let Some(ceph) = Ceph::start() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let vm = ceph.disk("vm");
    ceph.create("vm", "16M");
    ceph.write("vm", 0, MIB, 0x51);
    ok(&ceph, &["disk", "create", &vm, "s1"]);
    let before = ceph.fingerprint(&["vm"]);
    let o = tmp.path().join("o.qcow2");
    let os = o.to_str().unwrap();
    let layer = tmp.path().join("layer.qcow2");
    let refusals: Vec<(Vec<&str>, &str)> = vec![
        (vec!["disk", "export", &vm, "nope", os], "no snapshot named"),
        (
            vec!["disk", "export", "rbd:rbd/missing", os],
            "rbd:rbd/missing",
        ),
        (vec!["disk", "export", "rbd:nopool/vm", os], "nopool"),
        (vec!["disk", "export", &vm, "bad/name", os], "bad/name"),
        (
            vec![
                "disk",
                "export",
                &vm,
                os,
                "--layer",
                layer.to_str().unwrap(),
            ],
            "snapshot of another image",
        ),
        (
            vec!["disk", "export", &vm, os, "--since", "nope"],
            "no snapshot named",
        ),
    ];
    for (args, needle) in refusals {
        let r = sc(&ceph, &args);
        assert_error_line(&r);
        assert!(
            r.stderr.contains(needle),
            "expected {needle:?}\n{}",
            r.describe()
        );
        assert!(!o.exists(), "{args:?} left {os}");
    }
    // An existing output is never replaced.
    std::fs::write(&o, b"keep").unwrap();
    for args in [
        vec!["disk", "export", &vm, "s1", os],
        vec!["disk", "export", &vm, "s1", os, "--since", "s1"],
    ] {
        let r = sc(&ceph, &args);
        assert_error_line(&r);
        assert!(r.stderr.contains("exists"), "{}", r.describe());
        assert_eq!(std::fs::read(&o).unwrap(), b"keep");
    }
    std::fs::remove_file(&o).unwrap();
    // --since is for RBD only; with --format or --layer it is a usage error.
    let local = tmp.path().join("local.qcow2");
    let r = run(Command::new("qemu-img").args([
        "create",
        "-f",
        "qcow2",
        local.to_str().unwrap(),
        "1M",
    ]));
    assert!(r.success(), "{}", r.describe());
    let r = sc(
        &ceph,
        &[
            "disk",
            "export",
            local.to_str().unwrap(),
            os,
            "--since",
            "s1",
        ],
    );
    assert_error_line(&r);
    assert!(r.stderr.contains("RBD images"), "{}", r.describe());
    let r = sc(
        &ceph,
        &[
            "disk", "export", &vm, os, "--since", "s1", "--format", "raw",
        ],
    );
    assert_eq!(r.code, Some(2), "{}", r.describe());
    assert!(!o.exists());
    // The image now, while a client has it open, changes under the reader: refused; its
    // snapshot is fine.
    {
        let _holder = ceph.hold("vm");
        let r = sc(&ceph, &["disk", "export", &vm, os]);
        assert_error_line(&r);
        assert!(r.stderr.contains("open by"), "{}", r.describe());
        assert!(!o.exists());
        ok(&ceph, &["disk", "export", &vm, "s1", os]);
        std::fs::remove_file(&o).unwrap();
    }
    assert!(
        ceph.fingerprint(&["vm"]) == before,
        "a refusal changed the pool"
    );
}
