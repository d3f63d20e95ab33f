//! qcow2 external snapshots through the CLI, with QEMU 10 as the oracle: `disk create
//! --external [--overlay]`, `disk revert --layer`, `disk delete --layer [--dry-run]`, the chain in
//! `disk list --json`, and refused backing chains (protocols, `json:`, loops).
//!
//! The guest view of the active layer (`qemu-img convert -O raw`) computed by QEMU on the original
//! chain is the reference every later step must reproduce byte for byte; `qemu-img check` judges
//! every image after every step, and layers that must not be written are compared byte for byte.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;
use snapctl_tests::*;
use tempfile::TempDir;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;

fn tmp() -> TempDir {
    TempDir::new().expect("tempdir")
}

// ---------------------------------------------------------------------------------------------
// Local helpers
// ---------------------------------------------------------------------------------------------

/// The guest view of IMG as QEMU reads it through its backing chain (`qemu-img convert -O raw`).
fn raw_view(img: &Path) -> Vec<u8> {
    let out_dir = tmp();
    let out = out_dir.path().join("view.raw");
    qemu_img(["convert", "-U", "-f", "qcow2", "-O", "raw", p(img), p(&out)]).ok();
    file_bytes(&out)
}

/// Asserts two guest views are equal, naming the first differing offset otherwise.
#[track_caller]
fn assert_same_view(now: &[u8], before: &[u8], when: &str) {
    if now != before {
        let first = now
            .iter()
            .zip(before)
            .position(|(a, b)| a != b)
            .unwrap_or(now.len().min(before.len()));
        panic!(
            "{when}: guest view differs: length {} -> {}, first difference at guest offset {first} ({first:#x}): \
             {:#x?} -> {:#x?}",
            before.len(),
            now.len(),
            before.get(first),
            now.get(first)
        );
    }
}

/// Every file under `dir` (recursively) with its content.
fn dir_files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in fs::read_dir(&d).expect("read_dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                todo.push(path);
            } else {
                let bytes = file_bytes(&path);
                files.insert(path, bytes);
            }
        }
    }
    files
}

/// Asserts no file under `dir` was created, removed or changed since `before`.
#[track_caller]
fn assert_dir_same(dir: &Path, before: &BTreeMap<PathBuf, Vec<u8>>, when: &str) {
    let now = dir_files(dir);
    let names = |m: &BTreeMap<PathBuf, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(&now),
        names(before),
        "{when}: the set of files changed"
    );
    for (path, bytes) in before {
        assert_same_bytes(path, bytes, when);
    }
}

/// `qemu-img info --backing-chain --output=json IMG`: one object per layer, the image first.
fn chain_info(img: &Path) -> Vec<Value> {
    let r = qemu_img([
        "info",
        "-U",
        "-f",
        "qcow2",
        "--backing-chain",
        "--output=json",
        p(img),
    ])
    .ok();
    let v: Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("qemu-img info JSON: {e}\n{}", r.describe()));
    v.as_array()
        .unwrap_or_else(|| panic!("--backing-chain gives an array\n{}", r.describe()))
        .clone()
}

fn str_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// The backing file name recorded in IMG (`None`: standalone) and its recorded format.
fn backing_of(img: &Path) -> (Option<String>, Option<String>) {
    let info = qemu_info(img);
    (
        str_field(&info, "backing-filename").map(str::to_string),
        str_field(&info, "backing-filename-format").map(str::to_string),
    )
}

/// Whether qemu-img reports IMG as using extended L2 entries (subclusters).
fn extended_l2(img: &Path) -> bool {
    qemu_info(img)
        .pointer("/format-specific/data/extended-l2")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// `snapctl disk list IMG --json`, checked for success.
fn snap_list(img: &Path) -> Value {
    let r = snapctl_run(["disk", "list", p(img), "--json"]).ok();
    serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("disk list JSON: {e}\n{}", r.describe()))
}

/// The `chain` of `disk list --json` as (path, format) pairs.
fn snap_chain(img: &Path) -> Vec<(String, String)> {
    let v = snap_list(img);
    let chain = v
        .get("chain")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("disk list --json has a chain array: {v}"));
    chain
        .iter()
        .map(|l| {
            (
                str_field(l, "path").unwrap_or("").to_string(),
                str_field(l, "format").unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn chain_of(layers: &[&Path]) -> Vec<(String, String)> {
    layers
        .iter()
        .map(|l| (p(l).to_string(), "qcow2".to_string()))
        .collect()
}

/// `qemu-img check` is clean on every image.
#[track_caller]
fn check_all(imgs: &[&Path], when: &str) {
    for img in imgs {
        assert_qemu_clean(img, &format!("{when} ({})", img.display()));
    }
}

/// `allocated-clusters` as `qemu-img check` counts them (data clusters owned by IMG itself).
fn allocated_clusters(img: &Path) -> u64 {
    let r = qemu_img(["check", "-f", "qcow2", "--output=json", p(img)]).ok();
    let v: Value = serde_json::from_str(&r.stdout).expect("check JSON");
    v.get("allocated-clusters")
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// `snapctl disk create IMG NAME --external [--overlay PATH]`; returns the printed active path.
#[track_caller]
fn create_external(img: &Path, name: &str, overlay: Option<&Path>) -> PathBuf {
    let mut args = vec!["disk", "create", p(img), name, "--external"];
    if let Some(o) = overlay {
        args.extend(["--overlay", p(o)]);
    }
    let r = snapctl_run(&args).ok();
    let printed = r.stdout.trim();
    assert!(
        !printed.is_empty() && !printed.contains('\n'),
        "create --external prints the new active path alone\n{}",
        r.describe()
    );
    PathBuf::from(printed)
}

#[track_caller]
fn assert_range(view: &[u8], offset: u64, len: u64, byte: u8, what: &str) {
    let range = &view[offset as usize..(offset + len) as usize];
    if let Some(i) = range.iter().position(|&b| b != byte) {
        panic!(
            "{what}: guest byte at {:#x} is {:#x}, expected {byte:#x} over [{offset:#x}, +{len:#x})",
            offset + i as u64,
            range[i]
        );
    }
}

fn w(byte: u8, offset: u64, len: u64) -> String {
    format!("write -P {byte:#x} {offset} {len}")
}

fn wz(offset: u64, len: u64) -> String {
    format!("write -z {offset} {len}")
}

/// A base image with data, for the tests that need no particular layout.
fn simple_base(dir: &Path, name: &str) -> PathBuf {
    let base = dir.join(name);
    Qcow2Spec::new(SIZE).create(&base);
    qemu_io_ok(
        &base,
        &[
            w(0x11, 0, 2 * MIB),
            w(0x12, 8 * MIB, MIB),
            w(0x13, 24 * MIB, 256 << 10),
        ],
    );
    base
}

// ---------------------------------------------------------------------------------------------
// base <- s1 <- top: create, list, delete the middle layer, then the base
// ---------------------------------------------------------------------------------------------

/// Guest data per layer, in clusters `c` of the variant. Zero writes land on data a lower layer
/// has (full and partial clusters), partial writes share clusters across layers so a merge must
/// combine subclusters (or, without extended L2, copy-on-write whole clusters) from both.
fn base_writes(c: u64) -> Vec<String> {
    vec![
        w(0x11, 0, 8 * c),
        w(0x12, 16 * c, 4 * c),
        w(0x13, 24 * MIB, MIB),
    ]
}

fn s1_writes(c: u64) -> Vec<String> {
    vec![
        wz(2 * c, 2 * c),               // whole clusters of zeroes over base data
        w(0x21, 4 * c + c / 4, c / 2),  // partial, over base data
        w(0x22, 10 * c, 2 * c),         // where the base has nothing
        w(0x23, 12 * c + c / 8, c / 8), // partial, nothing below
        w(0x24, 17 * c, c),             // a whole cluster over base data
        wz(18 * c + c / 2, c / 2),      // partial zeroes over base data
        wz(24 * MIB + c, c / 4),        // partial zeroes in the far region (another L2 table)
        w(0x25, 24 * MIB + 3 * c, c),   // data in the far region
    ]
}

fn top_writes(c: u64) -> Vec<String> {
    vec![
        w(0x31, 5 * c + c / 2, c / 4), // partial over base data, s1 lacks the cluster
        w(0x32, 4 * c, c / 8),         // partial in a cluster s1 also has partially
        wz(10 * c, c),                 // whole zero cluster over s1 data
        wz(11 * c + c / 4, c / 4),     // partial zeroes over s1 data
        w(0x33, 12 * c, c / 8),        // partial next to s1's partial data
        w(0x34, 30 * c, c),            // fresh data
    ]
}

struct Variant {
    name: &'static str,
    spec: fn() -> Qcow2Spec,
}

const VARIANTS: &[Variant] = &[
    Variant {
        name: "v3-64k",
        spec: || Qcow2Spec::new(SIZE).compat("1.1"),
    },
    Variant {
        name: "v3-64k-extended-l2",
        spec: || Qcow2Spec::new(SIZE).compat("1.1").opt("extended_l2", "on"),
    },
    Variant {
        name: "v3-16k-extended-l2",
        spec: || {
            Qcow2Spec::new(SIZE)
                .compat("1.1")
                .cluster_size(16384)
                .opt("extended_l2", "on")
        },
    },
    Variant {
        name: "v3-4k",
        spec: || Qcow2Spec::new(SIZE).compat("1.1").cluster_size(4096),
    },
    Variant {
        name: "v2-64k",
        spec: || Qcow2Spec::new(SIZE).compat("0.10"),
    },
];

fn chain_variant(v: &Variant) {
    let when = |step: &str| format!("[{}] {step}", v.name);
    let dir = tmp();
    let base = dir.path().join("base.qcow2");
    let spec = (v.spec)();
    let c = spec.cluster();
    spec.create(&base);
    qemu_io_ok(&base, &base_writes(c));
    let base_ext = extended_l2(&base);

    // s1 at the default path DIR/STEM.NAME.EXT.
    let s1 = dir.path().join("base.s1.qcow2");
    let printed = create_external(&base, "s1", None);
    assert_eq!(printed, s1, "{}", when("create s1 prints the overlay path"));
    assert!(s1.exists());
    assert_eq!(
        backing_of(&s1),
        (Some("base.qcow2".into()), Some("qcow2".into())),
        "{}",
        when("s1: relative backing name with its format")
    );
    assert_eq!(
        extended_l2(&s1),
        base_ext,
        "{}",
        when("s1 keeps extended L2")
    );
    assert_same_view(&raw_view(&s1), &raw_view(&base), &when("s1 is empty"));
    qemu_io_ok(&s1, &s1_writes(c));

    // top at an explicit path, with --json.
    let top = dir.path().join("top.qcow2");
    let r = snapctl_run([
        "disk",
        "create",
        p(&s1),
        "s2",
        "--external",
        "--overlay",
        p(&top),
        "--json",
    ])
    .ok();
    let j: Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("create --json: {e}\n{}", r.describe()));
    assert_eq!(str_field(&j, "image"), Some(p(&s1)), "{}", r.describe());
    assert_eq!(str_field(&j, "active"), Some(p(&top)), "{}", r.describe());
    assert_eq!(
        j.pointer("/snapshot/name").and_then(Value::as_str),
        Some("s2"),
        "{}",
        r.describe()
    );
    assert_eq!(
        extended_l2(&top),
        base_ext,
        "{}",
        when("top keeps extended L2")
    );
    qemu_io_ok(&top, &top_writes(c));

    // QEMU sees the chain with explicit formats.
    let info = chain_info(&top);
    assert_eq!(info.len(), 3, "{}: {info:#?}", when("qemu chain length"));
    let expect = [
        (&top, Some("base.s1.qcow2")),
        (&s1, Some("base.qcow2")),
        (&base, None),
    ];
    for (layer, (path, backing)) in info.iter().zip(expect) {
        assert_eq!(str_field(layer, "filename"), Some(p(path)), "{layer:#?}");
        assert_eq!(str_field(layer, "backing-filename"), backing, "{layer:#?}");
        if backing.is_some() {
            assert_eq!(
                str_field(layer, "backing-filename-format"),
                Some("qcow2"),
                "{}: {layer:#?}",
                when("explicit backing format")
            );
        }
    }
    // snapctl lists the same chain, parent first.
    let listing = snap_list(&top);
    assert_eq!(str_field(&listing, "format"), Some("qcow2"));
    assert_eq!(
        listing.get("virtual_size").and_then(Value::as_u64),
        Some(SIZE)
    );
    assert_eq!(
        snap_chain(&top),
        chain_of(&[&s1, &base]),
        "{}",
        when("list top")
    );
    assert_eq!(snap_chain(&s1), chain_of(&[&base]), "{}", when("list s1"));
    assert_eq!(snap_chain(&base), chain_of(&[]), "{}", when("list base"));
    check_all(&[&base, &s1, &top], &when("after building the chain"));

    let view = raw_view(&top);
    // Premises: the zero writes cover data from lower layers, and the partial writes combine.
    assert_range(&view, 2 * c, 2 * c, 0, &when("s1's zeroes over base data"));
    assert_range(
        &view,
        18 * c + c / 2,
        c / 2,
        0,
        &when("s1's partial zeroes"),
    );
    assert_range(
        &view,
        18 * c,
        c / 2,
        0x12,
        &when("base data next to s1's zeroes"),
    );
    assert_range(&view, 10 * c, c, 0, &when("top's zeroes over s1 data"));
    assert_range(
        &view,
        11 * c + c / 4,
        c / 4,
        0,
        &when("top's partial zeroes"),
    );
    assert_range(
        &view,
        11 * c,
        c / 4,
        0x22,
        &when("s1 data next to top's zeroes"),
    );
    assert_range(&view, 4 * c, c / 8, 0x32, &when("top's part of cluster 4"));
    assert_range(
        &view,
        4 * c + c / 4,
        c / 2,
        0x21,
        &when("s1's part of cluster 4"),
    );
    assert_range(
        &view,
        4 * c + 3 * c / 4,
        c / 4,
        0x11,
        &when("base's part of cluster 4"),
    );
    assert_range(
        &view,
        12 * c + c / 8,
        c / 8,
        0x23,
        &when("s1's part of cluster 12"),
    );
    assert_range(&view, 24 * MIB + c, c / 4, 0, &when("far partial zeroes"));

    // --dry-run changes nothing and prints the plan.
    let before = dir_files(dir.path());
    let r = snapctl_run(["--dry-run", "disk", "delete", p(&top), "--layer", p(&s1)]).ok();
    assert!(
        r.stdout.contains("plan") && r.stdout.contains(p(&s1)),
        "{}\n{}",
        when("dry-run prints the plan"),
        r.describe()
    );
    assert_dir_same(dir.path(), &before, &when("delete --layer s1 --dry-run"));

    // Delete the middle layer: streamed into top, top relinked to base, s1 removed.
    let base_bytes = file_bytes(&base);
    let r = snapctl_run(["disk", "delete", p(&top), "--layer", p(&s1)]).ok();
    assert!(r.stdout.contains("removed"), "{}", r.describe());
    assert!(
        !s1.exists(),
        "{}: s1 removed\n{}",
        when("delete s1"),
        r.describe()
    );
    assert_same_bytes(
        &base,
        &base_bytes,
        &when("delete s1: the parent is never written"),
    );
    check_all(&[&base, &top], &when("after delete --layer s1"));
    assert_same_view(&raw_view(&top), &view, &when("after delete --layer s1"));
    assert_eq!(
        backing_of(&top),
        (Some("base.qcow2".into()), Some("qcow2".into())),
        "{}",
        when("top relinked to base")
    );
    assert_eq!(
        snap_chain(&top),
        chain_of(&[&base]),
        "{}",
        when("list after delete s1")
    );
    assert_eq!(chain_info(&top).len(), 2);

    // Delete the base: top becomes standalone.
    let before = dir_files(dir.path());
    let r = snapctl_run(["--dry-run", "disk", "delete", p(&top), "--layer", p(&base)]).ok();
    assert!(r.stdout.contains(p(&base)), "{}", r.describe());
    assert_dir_same(dir.path(), &before, &when("delete --layer base --dry-run"));
    let r = snapctl_run(["disk", "delete", p(&top), "--layer", p(&base)]).ok();
    assert!(r.stdout.contains("removed"), "{}", r.describe());
    assert!(!base.exists(), "{}\n{}", when("base removed"), r.describe());
    check_all(&[&top], &when("after delete --layer base"));
    assert_same_view(&raw_view(&top), &view, &when("after delete --layer base"));
    assert_eq!(backing_of(&top), (None, None), "{}", when("top standalone"));
    assert_eq!(
        snap_chain(&top),
        chain_of(&[]),
        "{}",
        when("list standalone top")
    );
    // QEMU still reads exactly what it wrote, through qemu-io too.
    verify_patterns(
        &top,
        &[
            Pattern::new(2 * c, 2 * c, 0),
            Pattern::new(10 * c, c, 0),
            Pattern::new(17 * c, c, 0x24),
            Pattern::new(30 * c, c, 0x34),
        ],
        &when("standalone top"),
    );
}

#[test]
fn chain_delete_middle_then_base_v3_64k() {
    chain_variant(&VARIANTS[0]);
}

#[test]
fn chain_delete_middle_then_base_v3_64k_extended_l2() {
    chain_variant(&VARIANTS[1]);
}

#[test]
fn chain_delete_middle_then_base_v3_16k_extended_l2() {
    chain_variant(&VARIANTS[2]);
}

#[test]
fn chain_delete_middle_then_base_v3_4k() {
    chain_variant(&VARIANTS[3]);
}

#[test]
fn chain_delete_middle_then_base_v2_64k() {
    chain_variant(&VARIANTS[4]);
}

/// Deleting the base first (the middle layer is its child) streams into the middle layer only.
#[test]
fn delete_base_below_middle_layer() {
    let dir = tmp();
    let base = dir.path().join("base.qcow2");
    Qcow2Spec::new(SIZE).opt("extended_l2", "on").create(&base);
    let c = 65536;
    qemu_io_ok(&base, &base_writes(c));
    let s1 = create_external(&base, "s1", None);
    qemu_io_ok(&s1, &s1_writes(c));
    let top = create_external(&s1, "s2", None);
    qemu_io_ok(&top, &top_writes(c));
    let view = raw_view(&top);
    let s1_view = raw_view(&s1);
    let top_bytes = file_bytes(&top);

    let r = snapctl_run(["disk", "delete", p(&top), "--layer", p(&base)]).ok();
    assert!(!base.exists(), "{}", r.describe());
    assert_same_bytes(
        &top,
        &top_bytes,
        "deleting the base writes only its child (s1)",
    );
    check_all(&[&s1, &top], "after delete --layer base");
    assert_same_view(&raw_view(&s1), &s1_view, "s1 after delete --layer base");
    assert_same_view(&raw_view(&top), &view, "top after delete --layer base");
    assert_eq!(backing_of(&s1), (None, None));
    assert_eq!(snap_chain(&top), chain_of(&[&s1]));
}

// ---------------------------------------------------------------------------------------------
// Siblings sharing a base
// ---------------------------------------------------------------------------------------------

#[test]
fn sibling_keeps_shared_base() {
    let dir = tmp();
    let base = simple_base(dir.path(), "base.qcow2");
    let a = create_external(&base, "a", None);
    let b = create_external(&base, "b", None);
    assert_eq!(a, dir.path().join("base.a.qcow2"));
    assert_eq!(b, dir.path().join("base.b.qcow2"));
    qemu_io_ok(&a, &[w(0xa1, 64 << 10, 64 << 10), wz(MIB, 128 << 10)]);
    qemu_io_ok(&b, &[w(0xb1, 0, 4096), wz(8 * MIB, 64 << 10)]);
    let (a_view, b_view) = (raw_view(&a), raw_view(&b));
    let (base_bytes, b_bytes) = (file_bytes(&base), file_bytes(&b));

    // The plan says the base is kept.
    let before = dir_files(dir.path());
    let r = snapctl_run(["--dry-run", "disk", "delete", p(&a), "--layer", p(&base)]).ok();
    assert!(
        r.stdout.contains("keep") && r.stdout.contains(p(&b)),
        "the plan names the other user\n{}",
        r.describe()
    );
    assert_dir_same(dir.path(), &before, "dry-run on a shared base");

    let r = snapctl_run(["disk", "delete", p(&a), "--layer", p(&base)]).ok();
    assert!(
        r.stdout.contains("kept") && r.stdout.contains(p(&b)) && !r.stdout.contains("removed"),
        "the output says the base was kept for the sibling\n{}",
        r.describe()
    );
    assert!(base.exists(), "the shared base is kept");
    assert_same_bytes(&base, &base_bytes, "the shared base is never written");
    assert_same_bytes(&b, &b_bytes, "the sibling is never written");
    check_all(&[&base, &a, &b], "after delete --layer base from a");
    assert_same_view(&raw_view(&a), &a_view, "a after delete --layer base");
    assert_same_view(&raw_view(&b), &b_view, "b after a dropped the base");
    assert_eq!(backing_of(&a), (None, None), "a is standalone");
    assert_eq!(snap_chain(&b), chain_of(&[&base]), "b still uses the base");

    // Now b is the last user: the base goes.
    let r = snapctl_run(["disk", "delete", p(&b), "--layer", p(&base)]).ok();
    assert!(r.stdout.contains("removed"), "{}", r.describe());
    assert!(
        !base.exists(),
        "no user left: base removed\n{}",
        r.describe()
    );
    check_all(&[&a, &b], "after delete --layer base from b");
    assert_same_view(&raw_view(&b), &b_view, "b standalone");
    assert_same_view(&raw_view(&a), &a_view, "a untouched");
}

// ---------------------------------------------------------------------------------------------
// revert --layer
// ---------------------------------------------------------------------------------------------

#[test]
fn revert_to_layer_gives_empty_overlay() {
    let dir = tmp();
    let base = dir.path().join("base.qcow2");
    Qcow2Spec::new(SIZE).opt("extended_l2", "on").create(&base);
    let c = 65536;
    qemu_io_ok(&base, &base_writes(c));
    let s1 = create_external(&base, "s1", None);
    qemu_io_ok(&s1, &s1_writes(c));
    let top = create_external(&s1, "s2", None);
    qemu_io_ok(&top, &top_writes(c));
    let (base_bytes, s1_bytes) = (file_bytes(&base), file_bytes(&s1));
    let (base_view, s1_view) = (raw_view(&base), raw_view(&s1));
    assert_ne!(raw_view(&top), s1_view, "premise: top has its own data");

    let before = dir_files(dir.path());
    snapctl_run(["--dry-run", "disk", "revert", p(&top), "--layer", p(&s1)]).ok();
    assert_dir_same(dir.path(), &before, "revert --layer --dry-run");

    snapctl_run(["disk", "revert", p(&top), "--layer", p(&s1)]).ok();
    check_all(&[&base, &s1, &top], "after revert --layer s1");
    assert_same_view(&raw_view(&top), &s1_view, "top reverted to s1");
    assert_eq!(
        allocated_clusters(&top),
        0,
        "the reverted image is an empty overlay"
    );
    assert_eq!(
        backing_of(&top),
        (Some("base.s1.qcow2".into()), Some("qcow2".into()))
    );
    assert_eq!(extended_l2(&top), extended_l2(&s1));
    assert_eq!(snap_chain(&top), chain_of(&[&s1, &base]));
    assert_same_bytes(&base, &base_bytes, "revert never writes the layers");
    assert_same_bytes(&s1, &s1_bytes, "revert never writes the layers");

    // Writes after the revert go to top only.
    qemu_io_ok(&top, &[w(0x77, 0, 4096)]);
    assert_same_bytes(&s1, &s1_bytes, "guest writes after the revert");

    // Revert past the middle layer: s1 stays on disk, untouched.
    snapctl_run(["disk", "revert", p(&top), "--layer", p(&base)]).ok();
    check_all(&[&base, &s1, &top], "after revert --layer base");
    assert_same_view(&raw_view(&top), &base_view, "top reverted to base");
    assert_eq!(allocated_clusters(&top), 0);
    assert_eq!(
        backing_of(&top),
        (Some("base.qcow2".into()), Some("qcow2".into()))
    );
    assert_eq!(snap_chain(&top), chain_of(&[&base]));
    assert_same_bytes(&s1, &s1_bytes, "the skipped layer stays");
    assert_same_bytes(&base, &base_bytes, "the base stays");
}

// ---------------------------------------------------------------------------------------------
// Refused operations
// ---------------------------------------------------------------------------------------------

/// Runs snapctl, expects the error contract, and that no file under `dir` changed.
#[track_caller]
fn assert_refused(dir: &Path, args: &[&str], when: &str) -> Run {
    let before = dir_files(dir);
    let r = snapctl_run(args);
    assert_error_line(&r);
    assert_dir_same(dir, &before, when);
    r
}

#[test]
fn refused_layer_operations_change_nothing() {
    let dir = tmp();
    let base = simple_base(dir.path(), "base.qcow2");
    let s1 = create_external(&base, "s1", None);
    qemu_io_ok(&s1, &[w(0x21, 0, 64 << 10)]);
    let top = create_external(&s1, "s2", None);
    qemu_io_ok(&top, &[w(0x31, MIB, 64 << 10)]);
    let other = simple_base(dir.path(), "other.qcow2");
    let missing = dir.path().join("missing.qcow2");
    let d = dir.path();

    // A layer that is not in the chain (another image, the image itself, a missing file).
    for layer in [&other, &top, &missing] {
        assert_refused(
            d,
            &["disk", "delete", p(&top), "--layer", p(layer)],
            &format!("delete --layer {}", layer.display()),
        );
        assert_refused(
            d,
            &["disk", "revert", p(&top), "--layer", p(layer)],
            &format!("revert --layer {}", layer.display()),
        );
        assert_refused(
            d,
            &["--dry-run", "disk", "delete", p(&top), "--layer", p(layer)],
            &format!("delete --dry-run --layer {}", layer.display()),
        );
    }
    // A layer above the image, not below it: s1's chain is [base].
    assert_refused(
        d,
        &["disk", "delete", p(&s1), "--layer", p(&top)],
        "delete s1 --layer top",
    );

    // The overlay path exists: explicit and default.
    let r = assert_refused(
        d,
        &[
            "disk",
            "create",
            p(&top),
            "s3",
            "--external",
            "--overlay",
            p(&other),
        ],
        "create --overlay EXISTING",
    );
    assert!(r.stderr.contains("exist"), "{}", r.describe());
    assert_refused(
        d,
        &["disk", "create", p(&base), "s1", "--external"],
        "create --external at an existing default path",
    );
    assert_refused(
        d,
        &[
            "disk",
            "create",
            p(&top),
            "s3",
            "--external",
            "--overlay",
            p(&s1),
        ],
        "create --overlay onto a layer of the chain",
    );

    // An image holding internal snapshots is not reverted to a layer (they would be lost).
    qemu_img(["snapshot", "-c", "internal1", p(&top)]).ok();
    let r = assert_refused(
        d,
        &["disk", "revert", p(&top), "--layer", p(&s1)],
        "revert --layer with internal snapshots",
    );
    assert!(r.stderr.contains("snapshot"), "{}", r.describe());
    assert_eq!(qemu_snapshot_names(&top), ["internal1"]);
    check_all(&[&base, &s1, &top, &other], "after the refusals");
}

// ---------------------------------------------------------------------------------------------
// Folders and backing names
// ---------------------------------------------------------------------------------------------

#[test]
fn overlay_in_another_folder_gets_absolute_backing() {
    let dir = tmp();
    let other = tmp();
    let base = simple_base(dir.path(), "base.qcow2");
    let s1 = create_external(&base, "s1", None);
    qemu_io_ok(&s1, &[w(0x21, 0, 64 << 10), wz(8 * MIB, 64 << 10)]);
    let top = other.path().join("sub").join("top.qcow2");
    fs::create_dir(top.parent().unwrap()).unwrap();
    assert_eq!(create_external(&s1, "s2", Some(&top)), top);
    qemu_io_ok(&top, &[w(0x31, 4096, 4096)]);

    let s1_abs = fs::canonicalize(&s1).unwrap();
    assert_eq!(
        backing_of(&top),
        (Some(p(&s1_abs).to_string()), Some("qcow2".into())),
        "another folder: absolute backing name"
    );
    assert_eq!(snap_chain(&top), chain_of(&[&s1_abs, &base]));
    check_all(&[&base, &s1, &top], "after building across folders");
    let view = raw_view(&top);

    // The child is in another folder than the new backing: it gets an absolute name again.
    let base_bytes = file_bytes(&base);
    let r = snapctl_run(["disk", "delete", p(&top), "--layer", p(&s1)]).ok();
    assert!(!s1.exists(), "{}", r.describe());
    let base_abs = fs::canonicalize(&base).unwrap();
    assert_eq!(
        backing_of(&top),
        (Some(p(&base_abs).to_string()), Some("qcow2".into())),
        "relinked across folders: absolute backing name"
    );
    assert_same_bytes(&base, &base_bytes, "the parent is never written");
    check_all(&[&base, &top], "after delete across folders");
    assert_same_view(&raw_view(&top), &view, "after delete across folders");

    // Reverting across folders records an absolute name as well.
    snapctl_run(["disk", "revert", p(&top), "--layer", p(&base)]).ok();
    assert_eq!(
        backing_of(&top),
        (Some(p(&base_abs).to_string()), Some("qcow2".into()))
    );
    assert_same_view(&raw_view(&top), &raw_view(&base), "revert across folders");
    check_all(&[&top], "after revert across folders");
}

#[test]
fn protocol_and_json_backing_names_refused() {
    let dir = tmp();
    let d = dir.path();
    let target = simple_base(d, "target.qcow2");
    let cases = [
        ("nbd.qcow2", "nbd://127.0.0.1/x".to_string(), "raw"),
        (
            "nbd-unix.qcow2",
            "nbd:unix:/tmp/snapctl-none.sock".to_string(),
            "raw",
        ),
        (
            "json.qcow2",
            format!(
                r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{}"}}}}"#,
                p(&target)
            ),
            "qcow2",
        ),
    ];
    for (name, backing, fmt) in &cases {
        let img = d.join(name);
        qemu_img([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            backing,
            "-F",
            fmt,
            p(&img),
            "16M",
        ])
        .ok();
        assert_eq!(
            backing_of(&img).0.as_deref(),
            Some(backing.as_str()),
            "premise: QEMU recorded the name"
        );
        let r = assert_refused(d, &["disk", "list", p(&img)], &format!("list {name}"));
        assert!(
            r.stderr.contains(backing.as_str())
                || r.stderr.contains("protocol")
                || r.stderr.contains("json"),
            "the error names the refused backing\n{}",
            r.describe()
        );
        assert_refused(
            d,
            &["disk", "list", p(&img), "--json"],
            &format!("list --json {name}"),
        );
        assert_refused(
            d,
            &["disk", "delete", p(&img), "--layer", p(&target)],
            &format!("delete --layer on {name}"),
        );
        assert_refused(
            d,
            &["disk", "revert", p(&img), "--layer", p(&target)],
            &format!("revert --layer on {name}"),
        );
    }
}

#[test]
fn backing_loop_refused() {
    let dir = tmp();
    let d = dir.path();
    let a = d.join("a.qcow2");
    let b = d.join("b.qcow2");
    let selfloop = d.join("self.qcow2");
    for img in [&a, &b, &selfloop] {
        Qcow2Spec::new(16 * MIB).create(img);
    }
    qemu_img([
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        p(&a),
    ])
    .ok();
    qemu_img([
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        p(&b),
    ])
    .ok();
    qemu_img([
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-b",
        "self.qcow2",
        "-F",
        "qcow2",
        p(&selfloop),
    ])
    .ok();
    assert_eq!(backing_of(&a).0.as_deref(), Some("b.qcow2"), "premise");
    assert_eq!(backing_of(&b).0.as_deref(), Some("a.qcow2"), "premise");

    for (img, layer) in [(&a, &b), (&b, &a), (&selfloop, &selfloop)] {
        for json in [false, true] {
            let mut args = vec!["disk", "list", p(img)];
            if json {
                args.push("--json");
            }
            let r = assert_refused(d, &args, &format!("list {}", img.display()));
            assert!(
                r.stderr.contains("loop"),
                "a backing loop is named as such\n{}",
                r.describe()
            );
        }
        assert_refused(
            d,
            &["disk", "delete", p(img), "--layer", p(layer)],
            &format!("delete --layer in a loop ({})", img.display()),
        );
        assert_refused(
            d,
            &["disk", "revert", p(img), "--layer", p(layer)],
            &format!("revert --layer in a loop ({})", img.display()),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// More chains: raw base, relative names, other spellings of a layer
// ---------------------------------------------------------------------------------------------

#[test]
fn raw_base_layer_streams_and_relinks() {
    raw_base_chain(SIZE);
}

/// A virtual size that ends inside a cluster (and inside a sector): the last cluster is partial.
#[test]
fn raw_base_layer_of_unaligned_size() {
    raw_base_chain(SIZE + 4608 + 100);
}

fn raw_base_chain(size: u64) {
    let dir = tmp();
    let base = dir.path().join("base.raw");
    qemu_img(["create", "-q", "-f", "raw", p(&base), &size.to_string()]).ok();
    run(std::process::Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x11 0 1M",
        "-c",
        "write -P 0x12 8M 64k",
        p(&base),
    ]))
    .ok();
    let mid = dir.path().join("mid.qcow2");
    qemu_img([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        p(&mid),
    ])
    .ok();
    qemu_io_ok(
        &mid,
        &[
            wz(0, 64 << 10),
            w(0x21, 4096, 4096),
            w(0x22, 4 * MIB, 64 << 10),
        ],
    );
    let top = create_external(&mid, "top", None);
    qemu_io_ok(&top, &[w(0x31, 128 << 10, 4096), wz(8 * MIB, 4096)]);
    assert_eq!(
        snap_chain(&top),
        vec![
            (p(&mid).to_string(), "qcow2".to_string()),
            (p(&base).to_string(), "raw".to_string())
        ]
    );
    let view = raw_view(&top);
    let base_bytes = file_bytes(&base);

    snapctl_run(["disk", "delete", p(&top), "--layer", p(&mid)]).ok();
    assert!(!mid.exists());
    assert_eq!(
        backing_of(&top),
        (Some("base.raw".into()), Some("raw".into())),
        "relinked to the raw base with its format"
    );
    assert_same_bytes(&base, &base_bytes, "the raw parent is never written");
    check_all(&[&top], "after delete --layer mid (raw base)");
    assert_same_view(
        &raw_view(&top),
        &view,
        "after delete --layer mid (raw base)",
    );

    snapctl_run(["disk", "delete", p(&top), "--layer", p(&base)]).ok();
    assert!(!base.exists());
    assert_eq!(backing_of(&top), (None, None));
    check_all(&[&top], "after delete --layer base.raw");
    assert_same_view(&raw_view(&top), &view, "after delete --layer base.raw");
}

/// Relative image names from another working folder, and a layer named by another spelling.
#[test]
fn relative_names_and_layer_spellings() {
    let dir = tmp();
    let base = simple_base(dir.path(), "base.qcow2");
    let sub = dir.path().join("work");
    fs::create_dir(&sub).unwrap();
    let in_sub = |args: &[&str]| run(snapctl().current_dir(&sub).args(args));

    let r = in_sub(&["disk", "create", "../base.qcow2", "s1", "--external"]).ok();
    let s1 = dir.path().join("base.s1.qcow2");
    assert!(
        s1.exists(),
        "default path next to the image\n{}",
        r.describe()
    );
    assert_eq!(
        fs::canonicalize(sub.join(r.stdout.trim())).unwrap(),
        fs::canonicalize(&s1).unwrap(),
        "the printed path names the overlay\n{}",
        r.describe()
    );
    assert_eq!(backing_of(&s1).0.as_deref(), Some("base.qcow2"));
    qemu_io_ok(&s1, &[w(0x21, 0, 64 << 10)]);
    in_sub(&[
        "disk",
        "create",
        "../base.s1.qcow2",
        "s2",
        "--external",
        "--overlay",
        "../top.qcow2",
    ])
    .ok();
    let top = dir.path().join("top.qcow2");
    assert_eq!(backing_of(&top).0.as_deref(), Some("base.s1.qcow2"));
    qemu_io_ok(&top, &[w(0x31, MIB, 4096)]);
    let view = raw_view(&top);

    // `--layer` through `..` and `.` components, relative to the working folder.
    in_sub(&[
        "disk",
        "delete",
        "../top.qcow2",
        "--layer",
        "./../work/../base.s1.qcow2",
    ])
    .ok();
    assert!(!s1.exists());
    assert_eq!(backing_of(&top).0.as_deref(), Some("base.qcow2"));
    check_all(&[&base, &top], "after delete with relative names");
    assert_same_view(&raw_view(&top), &view, "after delete with relative names");
    // And through a symbolic link to the layer.
    let link = sub.join("link.qcow2");
    std::os::unix::fs::symlink(&base, &link).unwrap();
    in_sub(&["disk", "delete", "../top.qcow2", "--layer", "link.qcow2"]).ok();
    assert!(!base.exists(), "the layer (not the link) is removed");
    assert_eq!(backing_of(&top), (None, None));
    assert_same_view(&raw_view(&top), &view, "after delete through a link");
}

// ---------------------------------------------------------------------------------------------
// More refusals
// ---------------------------------------------------------------------------------------------

/// A child holding internal snapshots reads through the layer in those snapshots too: streaming
/// into its active state alone would change them, so the deletion is refused.
#[test]
fn delete_layer_refused_when_child_has_internal_snapshots() {
    let dir = tmp();
    let base = simple_base(dir.path(), "base.qcow2");
    let s1 = create_external(&base, "s1", None);
    qemu_io_ok(&s1, &[w(0x21, 0, 64 << 10)]);
    let top = create_external(&s1, "s2", None);
    qemu_img(["snapshot", "-c", "internal1", p(&top)]).ok();
    let r = assert_refused(
        dir.path(),
        &["disk", "delete", p(&top), "--layer", p(&s1)],
        "delete --layer into a child with internal snapshots",
    );
    assert!(r.stderr.contains("snapshot"), "{}", r.describe());
    check_all(&[&base, &s1, &top], "after the refusal");
}

/// Streaming between different cluster sizes is refused before anything is written.
#[test]
fn delete_layer_refused_on_cluster_size_mismatch() {
    let dir = tmp();
    let base = dir.path().join("base.qcow2");
    Qcow2Spec::new(SIZE).cluster_size(4096).create(&base);
    qemu_io_ok(&base, &[w(0x11, 0, 2 * MIB)]);
    let top = dir.path().join("top.qcow2");
    qemu_img([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=65536",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        p(&top),
    ])
    .ok();
    qemu_io_ok(&top, &[w(0x31, 0, 4096)]);
    assert_refused(
        dir.path(),
        &["disk", "delete", p(&top), "--layer", p(&base)],
        "delete --layer across cluster sizes",
    );
}

/// While QEMU holds the active image (or a layer's child), nothing in the chain is changed.
#[test]
fn layer_operations_refused_while_qemu_holds_the_image() {
    let dir = tmp();
    let base = simple_base(dir.path(), "base.qcow2");
    let s1 = create_external(&base, "s1", None);
    qemu_io_ok(&s1, &[w(0x21, 0, 64 << 10)]);
    let top = create_external(&s1, "s2", None);
    qemu_io_ok(&top, &[w(0x31, MIB, 64 << 10)]);
    let sock_dir = tmp();
    let _daemon = StorageDaemon::start(&top, &sock_dir.path().join("nbd.sock"));
    let d = dir.path();
    for args in [
        vec!["disk", "delete", p(&top), "--layer", p(&s1)],
        vec!["disk", "delete", p(&top), "--layer", p(&base)],
        vec!["disk", "revert", p(&top), "--layer", p(&s1)],
        vec!["disk", "create", p(&top), "s3", "--external"],
        // s1 is open read-only under the running top: it must not be written either.
        vec!["disk", "delete", p(&s1), "--layer", p(&base)],
        vec!["disk", "revert", p(&s1), "--layer", p(&base)],
    ] {
        assert_refused(d, &args, &args.join(" "));
    }
}

/// A revert replaces the image file: it must keep the file's permission bits (a 0600 disk must
/// not become world-readable when the guest writes into it again).
#[test]
fn revert_to_layer_keeps_file_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tmp();
    let base = simple_base(dir.path(), "base.qcow2");
    let top = create_external(&base, "s1", None);
    qemu_io_ok(&top, &[w(0x31, 0, 4096)]);
    fs::set_permissions(&top, fs::Permissions::from_mode(0o600)).unwrap();
    snapctl_run(["disk", "revert", p(&top), "--layer", p(&base)]).ok();
    let mode = fs::metadata(&top).unwrap().permissions().mode() & 0o7777;
    assert_eq!(
        mode, 0o600,
        "revert --layer changed the image's mode to {mode:o}"
    );
}

/// A layer with compressed clusters (as `qemu-img convert -c` writes them) is streamed by value.
#[test]
fn compressed_layer_streams() {
    let dir = tmp();
    let base = simple_base(dir.path(), "base.qcow2");
    let plain = dir.path().join("plain.qcow2");
    Qcow2Spec::new(SIZE).create(&plain);
    qemu_io_ok(
        &plain,
        &[w(0x21, 0, MIB), w(0x22, 8 * MIB + 4096, 64 << 10)],
    );
    let mid = dir.path().join("mid.qcow2");
    qemu_img([
        "convert",
        "-q",
        "-c",
        "-f",
        "qcow2",
        "-O",
        "qcow2",
        p(&plain),
        p(&mid),
    ])
    .ok();
    fs::remove_file(&plain).unwrap();
    qemu_img([
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        p(&mid),
    ])
    .ok();
    // Zeroes over base data next to the compressed clusters.
    qemu_io_ok(&mid, &[wz(MIB, 128 << 10)]);
    let map = qemu_img(["map", "-f", "qcow2", "--output=json", p(&mid)]).ok();
    assert!(
        map.stdout.contains("\"compressed\": true"),
        "premise: the layer has compressed clusters\n{}",
        map.stdout
    );
    let top = create_external(&mid, "top", None);
    qemu_io_ok(&top, &[w(0x31, 128 << 10, 4096)]);
    let view = raw_view(&top);
    let base_bytes = file_bytes(&base);

    snapctl_run(["disk", "delete", p(&top), "--layer", p(&mid)]).ok();
    assert!(!mid.exists());
    assert_same_bytes(&base, &base_bytes, "the parent is never written");
    check_all(&[&base, &top], "after streaming a compressed layer");
    assert_same_view(&raw_view(&top), &view, "after streaming a compressed layer");
}
