//! `snapctl disk list|create|revert|delete|check` on qcow2 images (offline, internal snapshots):
//! the CLI contract of DESIGN.md, checked against what QEMU 10 reads and writes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;
use snapctl_tests::*;
use tempfile::TempDir;

const MIB: u64 = 1 << 20;

fn tmp() -> TempDir {
    TempDir::new().expect("tempdir")
}

/// A default qcow2 (v3, 64 KiB clusters) of `size` bytes in `dir`.
fn qcow2(dir: &Path, name: &str, size: u64) -> PathBuf {
    let img = dir.join(name);
    Qcow2Spec::new(size).create(&img);
    img
}

/// The guest data a snapshot holds, read by QEMU: `qemu-img snapshot -a` on a sparse copy, then
/// `qemu-io read -P`.
fn verify_snapshot_via_qemu(dir: &Path, img: &Path, snap: &str, expect: &[Pattern]) {
    let copy = dir.join(format!("verify-{snap}.qcow2"));
    cp_sparse(img, &copy);
    qemu_img(["snapshot", "-a", snap, p(&copy)]).ok();
    verify_patterns(
        &copy,
        expect,
        &format!("snapshot {snap} via qemu-img snapshot -a"),
    );
    std::fs::remove_file(&copy).expect("remove copy");
}

/// The same through snapctl: `snapctl disk revert` on a sparse copy, judged by QEMU.
fn verify_snapshot_via_snapctl(dir: &Path, img: &Path, snap: &str, expect: &[Pattern]) {
    let copy = dir.join(format!("verify-snapctl-{snap}.qcow2"));
    cp_sparse(img, &copy);
    snapctl_run(["disk", "revert", p(&copy), snap]).ok();
    assert_qemu_clean(&copy, &format!("copy after snapctl disk revert {snap}"));
    verify_patterns(
        &copy,
        expect,
        &format!("snapshot {snap} via snapctl disk revert"),
    );
    std::fs::remove_file(&copy).expect("remove copy");
}

fn json_keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("expected a JSON object, got {v}"))
        .keys()
        .cloned()
        .collect()
}

fn set(keys: &[&str]) -> BTreeSet<String> {
    keys.iter().map(|k| k.to_string()).collect()
}

fn now_secs() -> i64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    i64::try_from(d.as_secs()).expect("time fits")
}

// ---------------------------------------------------------------------------------------------
// 2. disk list
// ---------------------------------------------------------------------------------------------

#[test]
fn list_json_matches_contract_and_qemu() {
    let dir = tmp();
    let img = qcow2(dir.path(), "disk.qcow2", 48 * MIB);
    write_patterns(&img, &[Pattern::new(0, 64 << 10, 0x11)]);
    qemu_img(["snapshot", "-c", "qa", p(&img)]).ok();
    write_patterns(&img, &[Pattern::new(0, 64 << 10, 0x12)]);
    let t0 = now_secs();
    snapctl_run(["disk", "create", p(&img), "sb"]).ok();
    let t1 = now_secs();
    qemu_img(["snapshot", "-c", "with space", p(&img)]).ok();

    let before = file_bytes(&img);
    let r = snapctl_run(["disk", "list", p(&img), "--json"]).ok();
    assert_same_bytes(&img, &before, "disk list --json is read-only");
    let v: Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON value: {e}\n{}", r.describe()));

    assert_eq!(
        json_keys(&v),
        set(&["image", "format", "virtual_size", "snapshots", "chain"]),
        "top-level keys\n{v:#}"
    );
    let image = v["image"].as_str().expect("image is a string");
    let canonical = img.canonicalize().expect("canonicalize");
    assert!(
        image == p(&img) || Path::new(image) == canonical,
        "image {image:?} should be the path given ({})",
        img.display()
    );
    assert_eq!(v["format"], "qcow2");
    let info = qemu_info(&img);
    assert_eq!(v["virtual_size"].as_u64(), info["virtual-size"].as_u64());
    assert_eq!(v["virtual_size"].as_u64(), Some(48 * MIB));
    assert_eq!(
        v["chain"],
        Value::Array(vec![]),
        "standalone image has chain []"
    );

    let ours = v["snapshots"].as_array().expect("snapshots is an array");
    let qemu = qemu_snapshots(&img);
    assert_eq!(qemu.len(), 3);
    assert_eq!(ours.len(), qemu.len(), "snapshot count\n{v:#}");
    for (s, q) in ours.iter().zip(&qemu) {
        assert_eq!(
            json_keys(s),
            set(&["id", "name", "vm_state_size", "date", "vm_clock_ns"]),
            "snapshot keys\n{s:#}"
        );
        assert_eq!(
            s["id"].as_str(),
            Some(q.id.as_str()),
            "id (a string)\n{s:#}"
        );
        assert_eq!(s["name"].as_str(), Some(q.name.as_str()), "name\n{s:#}");
        assert_eq!(
            s["vm_state_size"].as_u64(),
            Some(q.vm_state_size),
            "vm_state_size\n{s:#}"
        );
        assert_eq!(
            s["vm_clock_ns"].as_u64(),
            Some(q.vm_clock_ns),
            "vm_clock_ns\n{s:#}"
        );
        let date = s["date"].as_str().expect("date is a string");
        let (secs, _) =
            parse_rfc3339(date).unwrap_or_else(|| panic!("date {date:?} is not RFC 3339"));
        assert_eq!(
            secs,
            i64::try_from(q.date_sec).expect("date fits"),
            "date {date:?} vs qemu date-sec {}",
            q.date_sec
        );
    }
    assert_eq!(
        ours.iter()
            .map(|s| s["name"].as_str().unwrap_or(""))
            .collect::<Vec<_>>(),
        ["qa", "sb", "with space"]
    );
    // snapctl stamps its snapshot with the time it was taken.
    let sb = &qemu[1];
    let sb_secs = i64::try_from(sb.date_sec).expect("date fits");
    assert!(
        (t0 - 2..=t1 + 2).contains(&sb_secs),
        "snapctl's snapshot date {sb_secs} not within [{t0}, {t1}]"
    );
    assert_eq!(sb.vm_state_size, 0, "disk-only snapshot has no VM state");
}

#[test]
fn list_json_without_snapshots() {
    let dir = tmp();
    let img = qcow2(dir.path(), "empty.qcow2", 3 * MIB + 512);
    let r = snapctl_run(["disk", "list", p(&img), "--json"]).ok();
    let v: Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON: {e}\n{}", r.describe()));
    assert_eq!(v["snapshots"], Value::Array(vec![]), "{v:#}");
    assert_eq!(v["chain"], Value::Array(vec![]), "{v:#}");
    assert_eq!(v["virtual_size"].as_u64(), Some(3 * MIB + 512));
    assert_eq!(v["format"], "qcow2");
}

#[test]
fn list_human_mentions_every_snapshot() {
    let dir = tmp();
    let img = qcow2(dir.path(), "disk.qcow2", 16 * MIB);
    qemu_img(["snapshot", "-c", "alpha-from-qemu", p(&img)]).ok();
    snapctl_run(["disk", "create", p(&img), "beta_from_snapctl"]).ok();
    let before = file_bytes(&img);
    let r = snapctl_run(["disk", "list", p(&img)]).ok();
    assert_same_bytes(&img, &before, "disk list is read-only");
    for name in ["alpha-from-qemu", "beta_from_snapctl"] {
        assert!(r.stdout.contains(name), "{name} missing\n{}", r.describe());
    }
}

// ---------------------------------------------------------------------------------------------
// 3. several snapshots, branching
// ---------------------------------------------------------------------------------------------

#[test]
fn branching_snapshots_and_middle_delete() {
    let dir = tmp();
    let d = dir.path();
    let img = qcow2(d, "disk.qcow2", 16 * MIB);
    let k64 = 64 << 10;

    write_patterns(
        &img,
        &[Pattern::new(0, k64, 0x11), Pattern::new(MIB, k64, 0x12)],
    );
    snapctl_run(["disk", "create", p(&img), "s1"]).ok();
    assert_qemu_clean(&img, "after s1");

    write_patterns(
        &img,
        &[Pattern::new(0, k64, 0x21), Pattern::new(2 * MIB, k64, 0x22)],
    );
    snapctl_run(["disk", "create", p(&img), "s2"]).ok();
    assert_qemu_clean(&img, "after s2");

    write_patterns(&img, &[Pattern::new(MIB, k64, 0x31)]);
    assert_qemu_clean(&img, "after writing on top of s2");
    snapctl_run(["disk", "revert", p(&img), "s1"]).ok();
    assert_qemu_clean(&img, "after revert to s1");

    let s1 = [
        Pattern::new(0, k64, 0x11),
        Pattern::new(MIB, k64, 0x12),
        Pattern::new(2 * MIB, k64, 0),
        Pattern::new(3 * MIB, k64, 0),
    ];
    verify_patterns(&img, &s1, "current data after revert to s1");

    write_patterns(&img, &[Pattern::new(3 * MIB, k64, 0x41)]);
    snapctl_run(["disk", "create", p(&img), "s3"]).ok();
    assert_qemu_clean(&img, "after s3");
    assert_eq!(qemu_snapshot_names(&img), ["s1", "s2", "s3"]);

    let s2 = [
        Pattern::new(0, k64, 0x21),
        Pattern::new(MIB, k64, 0x12),
        Pattern::new(2 * MIB, k64, 0x22),
        Pattern::new(3 * MIB, k64, 0),
    ];
    let s3 = [
        Pattern::new(0, k64, 0x11),
        Pattern::new(MIB, k64, 0x12),
        Pattern::new(2 * MIB, k64, 0),
        Pattern::new(3 * MIB, k64, 0x41),
    ];
    for (name, data) in [("s1", &s1), ("s2", &s2), ("s3", &s3)] {
        verify_snapshot_via_qemu(d, &img, name, data);
        verify_snapshot_via_snapctl(d, &img, name, data);
    }

    // The current layer diverges from s3 before the deletes.
    write_patterns(&img, &[Pattern::new(0, k64, 0x51)]);
    let mut current = s3;
    current[0] = Pattern::new(0, k64, 0x51);

    snapctl_run(["disk", "delete", p(&img), "s2"]).ok();
    assert_qemu_clean(&img, "after deleting the middle snapshot s2");
    assert_eq!(qemu_snapshot_names(&img), ["s1", "s3"]);
    verify_snapshot_via_qemu(d, &img, "s1", &s1);
    verify_snapshot_via_qemu(d, &img, "s3", &s3);
    verify_patterns(&img, &current, "current data after delete s2");

    snapctl_run(["disk", "delete", p(&img), "s1"]).ok();
    assert_qemu_clean(&img, "after deleting s1");
    assert_eq!(qemu_snapshot_names(&img), ["s3"]);
    verify_snapshot_via_qemu(d, &img, "s3", &s3);
    verify_patterns(&img, &current, "current data after delete s1");

    snapctl_run(["disk", "delete", p(&img), "s3"]).ok();
    assert_qemu_clean(&img, "after deleting s3");
    assert_eq!(qemu_snapshots(&img), []);
    verify_patterns(&img, &current, "current data after deleting every snapshot");
}

// ---------------------------------------------------------------------------------------------
// 4. bad input
// ---------------------------------------------------------------------------------------------

/// Runs `snapctl disk OP IMG [NAME]` for each op and asserts the error contract and an unchanged
/// file.
fn assert_all_refused(img: &Path, ops: &[&[&str]], what: &str) {
    let before = file_bytes(img);
    for op in ops {
        let mut args = vec!["disk", op[0], p(img)];
        args.extend_from_slice(&op[1..]);
        let r = snapctl_run(&args);
        assert_error_line(&r);
        assert_same_bytes(
            img,
            &before,
            &format!("{what}: snapctl disk {}", op.join(" ")),
        );
    }
}

const ALL_OPS: &[&[&str]] = &[
    &["list"],
    &["list", "--json"],
    &["create", "x"],
    &["revert", "q1"],
    &["delete", "q1"],
];

#[test]
fn unknown_snapshot_name_refused() {
    let dir = tmp();
    let img = qcow2(dir.path(), "disk.qcow2", 16 * MIB);
    write_patterns(&img, &[Pattern::new(0, 64 << 10, 0x11)]);
    qemu_img(["snapshot", "-c", "q1", p(&img)]).ok();
    assert_all_refused(
        &img,
        &[
            &["revert", "nope"],
            &["delete", "nope"],
            &["revert", "Q1"],
            &["delete", "q"],
        ],
        "unknown snapshot",
    );
}

#[test]
fn duplicate_snapshot_name_refused() {
    let dir = tmp();
    let img = qcow2(dir.path(), "disk.qcow2", 16 * MIB);
    write_patterns(&img, &[Pattern::new(0, 64 << 10, 0x11)]);
    qemu_img(["snapshot", "-c", "q1", p(&img)]).ok();
    snapctl_run(["disk", "create", p(&img), "s1"]).ok();
    assert_all_refused(
        &img,
        &[&["create", "q1"], &["create", "s1"]],
        "duplicate name",
    );
    assert_eq!(qemu_snapshot_names(&img), ["q1", "s1"]);
}

#[test]
fn raw_file_refused() {
    let dir = tmp();
    let img = dir.path().join("disk.raw");
    qemu_img(["create", "-q", "-f", "raw", p(&img), "4M"]).ok();
    std::fs::write(&img, [0x5au8; 8192]).expect("write raw data");
    qemu_img(["resize", "-q", "-f", "raw", p(&img), "4M"]).ok();
    let mut ops = ALL_OPS.to_vec();
    ops.push(&["check"]);
    assert_all_refused(&img, &ops, "raw file");
}

/// Deterministic pseudo-random bytes (xorshift64*), so the junk file is the same every run.
fn junk(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

#[test]
fn junk_file_refused() {
    let dir = tmp();
    let img = dir.path().join("junk.img");
    std::fs::write(&img, junk(256 << 10)).expect("write junk");
    let mut ops = ALL_OPS.to_vec();
    ops.push(&["check"]);
    assert_all_refused(&img, &ops, "junk file");
}

#[test]
fn junk_after_qcow2_magic_refused() {
    // The magic says qcow2; nothing else makes sense.
    let dir = tmp();
    let img = dir.path().join("junk.qcow2");
    let mut bytes = junk(256 << 10);
    bytes[..4].copy_from_slice(b"QFI\xfb");
    std::fs::write(&img, bytes).expect("write junk");
    assert_all_refused(&img, ALL_OPS, "qcow2 magic + junk");
}

#[test]
fn empty_file_refused() {
    let dir = tmp();
    let img = dir.path().join("empty.img");
    std::fs::write(&img, b"").expect("write empty");
    let mut ops = ALL_OPS.to_vec();
    ops.push(&["check"]);
    assert_all_refused(&img, &ops, "empty file");
}

#[test]
fn nonexistent_path_refused() {
    let dir = tmp();
    let img = dir.path().join("missing.qcow2");
    let mut ops = ALL_OPS.to_vec();
    ops.push(&["check"]);
    for op in ops {
        let mut args = vec!["disk", op[0], p(&img)];
        args.extend_from_slice(&op[1..]);
        let r = snapctl_run(&args);
        assert_error_line(&r);
        assert!(
            !img.exists(),
            "snapctl disk {} created the file",
            op.join(" ")
        );
    }
}

#[test]
fn l1_table_past_eof_refused() {
    let dir = tmp();
    let img = qcow2(dir.path(), "disk.qcow2", 16 * MIB);
    write_patterns(&img, &[Pattern::new(0, 64 << 10, 0x11)]);
    qemu_img(["snapshot", "-c", "q1", p(&img)]).ok();
    // l1_table_offset (header byte 40): cluster aligned, 1 TiB past the end of a tiny file.
    patch_be_u64(&img, 40, 1 << 40);
    let (errors, _) = qemu_img_check(&img);
    assert!(errors > 0, "premise: qemu-img check sees the damage");
    assert_all_refused(&img, ALL_OPS, "L1 table past EOF");
}

#[test]
fn truncated_qcow2_refused() {
    // L2 table for 768M, its data cluster and the snapshot table all lie in the second half of
    // the file; cutting it in half leaves metadata pointing past the end.
    let dir = tmp();
    let img = qcow2(dir.path(), "disk.qcow2", 1 << 30);
    write_patterns(
        &img,
        &[
            Pattern::new(0, 256 << 10, 0x11),
            Pattern::new(768 * MIB, 64 << 10, 0x22),
        ],
    );
    qemu_img(["snapshot", "-c", "q1", p(&img)]).ok();
    let len = std::fs::metadata(&img).expect("stat").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .and_then(|f| f.set_len(len / 2))
        .expect("truncate");
    let (errors, _) = qemu_img_check(&img);
    assert!(errors > 0, "premise: qemu-img check sees the damage");
    assert_all_refused(&img, ALL_OPS, "truncated qcow2");
}

#[test]
fn image_in_use_refused() {
    let dir = tmp();
    let img = qcow2(dir.path(), "disk.qcow2", 16 * MIB);
    write_patterns(&img, &[Pattern::new(0, 64 << 10, 0x11)]);
    qemu_img(["snapshot", "-c", "q1", p(&img)]).ok();
    let sock = dir.path().join("nbd.sock");
    let daemon = StorageDaemon::start(&img, &sock);
    let before = file_bytes(&img);
    for op in [["create", "x"], ["revert", "q1"], ["delete", "q1"]] {
        let r = snapctl_run(["disk", op[0], p(&img), op[1]]);
        assert_error_line(&r);
        assert!(
            r.stderr.contains("in use"),
            "the error should say the image is in use\n{}",
            r.describe()
        );
        assert_same_bytes(
            &img,
            &before,
            &format!("in use: snapctl disk {}", op.join(" ")),
        );
    }
    drop(daemon);
    // Once released, the image is ours again.
    snapctl_run(["disk", "create", p(&img), "x"]).ok();
    assert_qemu_clean(&img, "after the daemon left");
    assert_eq!(qemu_snapshot_names(&img), ["q1", "x"]);
}

#[test]
fn usage_errors_exit_2() {
    let dir = tmp();
    let img = qcow2(dir.path(), "disk.qcow2", 16 * MIB);
    let before = file_bytes(&img);
    let cases: &[&[&str]] = &[
        &["disk", "create", p(&img)],
        &["disk", "revert", p(&img)],
        &["disk", "delete", p(&img)],
        &["disk", "list"],
        &["disk", "check"],
        &["disk", "frobnicate", p(&img)],
        &["frobnicate"],
        &["disk", "list", p(&img), "--no-such-option"],
    ];
    for args in cases {
        let r = snapctl_run(*args);
        assert_usage_error(&r);
        assert_same_bytes(&img, &before, &format!("usage error {args:?}"));
    }
}

// ---------------------------------------------------------------------------------------------
// 5. disk check
// ---------------------------------------------------------------------------------------------

/// `snapctl disk check --json IMG` as JSON, with the exit code; the file must not change.
fn check_json(img: &Path) -> (Option<i32>, Value, Run) {
    let before = file_bytes(img);
    let r = snapctl_run(["disk", "check", p(img), "--json"]);
    assert_same_bytes(img, &before, "disk check --json is read-only");
    assert!(!r.stderr.contains("panicked"), "{}", r.describe());
    let v: Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("check --json stdout is not JSON: {e}\n{}", r.describe()));
    assert!(
        v.is_object(),
        "check --json prints an object\n{}",
        r.describe()
    );
    (r.code, v, r)
}

/// A count in the check report: key `leaks` / `corruptions` (qemu-img check's names).
fn count(v: &Value, key: &str, r: &Run) -> u64 {
    v.get(key)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("check --json has no numeric {key:?}\n{}", r.describe()))
}

#[test]
fn check_clean_image() {
    let dir = tmp();
    let img = qcow2(dir.path(), "disk.qcow2", 16 * MIB);
    write_patterns(&img, &[Pattern::new(0, 128 << 10, 0x11)]);
    qemu_img(["snapshot", "-c", "q1", p(&img)]).ok();
    write_patterns(&img, &[Pattern::new(0, 64 << 10, 0x12)]);
    assert_qemu_clean(&img, "premise");

    let before = file_bytes(&img);
    let r = snapctl_run(["disk", "check", p(&img)]);
    assert_eq!(r.code, Some(0), "clean image\n{}", r.describe());
    assert_same_bytes(&img, &before, "disk check is read-only");

    let (code, v, r) = check_json(&img);
    assert_eq!(code, Some(0), "clean image (--json)\n{}", r.describe());
    assert_eq!(count(&v, "leaks", &r), 0);
    assert_eq!(count(&v, "corruptions", &r), 0);
}

#[test]
fn check_reports_leaks_exit_3() {
    let dir = tmp();
    let img = qcow2(dir.path(), "disk.qcow2", 16 * MIB);
    write_patterns(&img, &[Pattern::new(0, 128 << 10, 0x11)]);
    // Two clusters appended to the file with refcount 1 and no reference: two leaks.
    let h = Qcow2Header::read(&img);
    let len = std::fs::metadata(&img).expect("stat").len();
    let first = len.div_ceil(h.cluster_size);
    patch_bytes(
        &img,
        first * h.cluster_size,
        &vec![0u8; 2 * h.cluster_size as usize],
    );
    h.set_refcount16(&img, first, 1);
    h.set_refcount16(&img, first + 1, 1);
    assert_eq!(
        qemu_img_check(&img),
        (0, 2),
        "premise: qemu-img check sees 2 leaks"
    );

    let before = file_bytes(&img);
    let r = snapctl_run(["disk", "check", p(&img)]);
    assert_eq!(r.code, Some(3), "leaks only -> exit 3\n{}", r.describe());
    assert_same_bytes(&img, &before, "disk check is read-only");

    let (code, v, r) = check_json(&img);
    assert_eq!(
        code,
        Some(3),
        "leaks only -> exit 3 (--json)\n{}",
        r.describe()
    );
    assert_eq!(count(&v, "leaks", &r), 2, "leak count as qemu-img check");
    assert_eq!(count(&v, "corruptions", &r), 0);
}

#[test]
fn check_reports_corruption_exit_1() {
    let dir = tmp();
    let img = qcow2(dir.path(), "disk.qcow2", 16 * MIB);
    write_patterns(&img, &[Pattern::new(0, 128 << 10, 0x11)]);
    // The L1 table's cluster is in use, but its refcount becomes 0.
    let h = Qcow2Header::read(&img);
    h.set_refcount16(&img, h.l1_table_offset / h.cluster_size, 0);
    assert_eq!(
        qemu_img_check(&img),
        (1, 0),
        "premise: qemu-img check sees 1 error"
    );

    let before = file_bytes(&img);
    let r = snapctl_run(["disk", "check", p(&img)]);
    assert_eq!(r.code, Some(1), "corruption -> exit 1\n{}", r.describe());
    assert!(!r.stderr.contains("panicked"), "{}", r.describe());
    assert_same_bytes(&img, &before, "disk check is read-only");

    let (code, v, r) = check_json(&img);
    assert_eq!(
        code,
        Some(1),
        "corruption -> exit 1 (--json)\n{}",
        r.describe()
    );
    assert_eq!(
        count(&v, "corruptions", &r),
        1,
        "corruption count as qemu-img check"
    );
    assert_eq!(count(&v, "leaks", &r), 0);
}

// ---------------------------------------------------------------------------------------------
// 6. a bigger image
// ---------------------------------------------------------------------------------------------

#[test]
fn bigger_image_round_trip() {
    let dir = tmp();
    let d = dir.path();
    let img = qcow2(d, "big.qcow2", 1 << 30);
    // 64 MiB at 0 and 8 MiB at 512 MiB: two L2 tables (each maps 512 MiB), 1152 data clusters.
    qemu_io_ok(
        &img,
        &[
            "write -P 0x5a 0 64M".to_string(),
            "write -P 0x6b 512M 8M".to_string(),
        ],
    );
    let orig = d.join("orig.qcow2");
    cp_sparse(&img, &orig);

    snapctl_run(["disk", "create", p(&img), "s1"]).ok();
    assert_qemu_clean(&img, "after create s1");

    qemu_io_ok(
        &img,
        &[
            "write -P 0x7c 32M 64M".to_string(),
            "write -P 0x7d 1000M 1M".to_string(),
            "write -z 512M 4M".to_string(),
        ],
    );
    verify_patterns(
        &img,
        &[
            Pattern::new(0, 32 * MIB, 0x5a),
            Pattern::new(32 * MIB, 64 * MIB, 0x7c),
            Pattern::new(512 * MIB, 4 * MIB, 0),
            Pattern::new(516 * MIB, 4 * MIB, 0x6b),
            Pattern::new(1000 * MIB, MIB, 0x7d),
        ],
        "after overwriting",
    );
    assert_qemu_clean(&img, "after overwriting");

    snapctl_run(["disk", "revert", p(&img), "s1"]).ok();
    assert_qemu_clean(&img, "after revert s1");
    let cmp = qemu_img(["compare", "-f", "qcow2", "-F", "qcow2", p(&orig), p(&img)]);
    assert_eq!(
        cmp.code,
        Some(0),
        "reverted image differs from the original\n{}",
        cmp.describe()
    );

    // Diverge both copies the same way, drop the snapshot, compare again.
    for target in [&img, &orig] {
        qemu_io_ok(target, &["write -P 0x7e 0 1M".to_string()]);
    }
    snapctl_run(["disk", "delete", p(&img), "s1"]).ok();
    assert_qemu_clean(&img, "after delete s1");
    assert_eq!(qemu_snapshots(&img), []);
    let cmp = qemu_img(["compare", "-f", "qcow2", "-F", "qcow2", p(&orig), p(&img)]);
    assert_eq!(
        cmp.code,
        Some(0),
        "current data changed by delete\n{}",
        cmp.describe()
    );
}
