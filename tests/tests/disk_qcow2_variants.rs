//! `snapctl disk create|revert|delete` on internal qcow2 snapshots across image variants, with
//! QEMU as the oracle in both directions:
//! - forward: snapctl creates a snapshot, QEMU (`qemu-img snapshot -a`) reverts to it;
//! - reverse: QEMU creates a snapshot, snapctl reverts to it and deletes it.
//!
//! Every step is judged by `qemu-img check` (no corruptions, no leaks) and by reading the guest
//! data back through `qemu-io`. Plus the refcount-overflow cases of narrow refcounts.

use std::path::Path;

use snapctl_tests::*;
use tempfile::TempDir;

const SIZE: u64 = 64 << 20;

/// One image variant: its creation options and whether compressed clusters can be written.
struct Variant {
    spec: Qcow2Spec,
    compressed: bool,
}

fn variant(opts: &[(&str, &str)]) -> Variant {
    let mut spec = Qcow2Spec::new(SIZE);
    for (k, v) in opts {
        spec = spec.opt(k, v);
    }
    // Compressed writes need unallocated clusters (not preallocated ones), and with
    // refcount_bits=2 two compressed clusters packed into one host cluster already have
    // refcount 2, so a snapshot would overflow (tested on its own below).
    let compressed = !opts.iter().any(|(k, v)| {
        (*k == "preallocation" && *v != "off") || (*k == "refcount_bits" && *v == "2")
    });
    Variant { spec, compressed }
}

/// The guest layout written before the snapshot (`old`) and over it afterwards (`new`).
/// With cluster size `c`:
/// - `[0, a)` 0x11, `a = min(c, 8k)`: the start of the first cluster;
/// - `[3c-h, 3c+h)` 0x22: a write across the boundary of clusters 2 and 3;
/// - `[6c, 7c)` zero-written (`write -z`) over `[6c, 8c)` 0x44;
/// - `[10c, 12c)` 0x33 written compressed (when the variant allows);
/// - `[14c, 15c)` and `[20c, 21c)` never written before the snapshot (read as zeros).
struct Layout {
    writes_old: Vec<String>,
    old: Vec<Pattern>,
    new: Vec<Pattern>,
}

fn layout(c: u64, compressed: bool) -> Layout {
    let a = c.min(8 << 10);
    let h = (c / 2).clamp(512, 2048);
    let b = 3 * c - h;
    let mut writes_old = vec![
        format!("write -P 0x11 0 {a}"),
        format!("write -P 0x22 {b} {}", 2 * h),
        format!("write -P 0x44 {} {}", 6 * c, 2 * c),
        format!("write -z {} {c}", 6 * c),
    ];
    let mut old = vec![
        Pattern::new(0, a, 0x11),
        Pattern::new(b, 2 * h, 0x22),
        Pattern::new(6 * c, c, 0),
        Pattern::new(7 * c, c, 0x44),
        Pattern::new(14 * c, c, 0),
        Pattern::new(20 * c, c, 0),
    ];
    if compressed {
        writes_old.push(format!("write -c -P 0x33 {} {}", 10 * c, 2 * c));
        old.push(Pattern::new(10 * c, 2 * c, 0x33));
    } else {
        old.push(Pattern::new(10 * c, 2 * c, 0));
    }
    let new = vec![
        Pattern::new(0, a, 0xa1),
        Pattern::new(b, 2 * h, 0xa2),
        Pattern::new(6 * c, 2 * c, 0xa3),
        Pattern::new(10 * c, 2 * c, 0xa4),
        Pattern::new(14 * c, c, 0),
        Pattern::new(20 * c, c, 0xa5),
    ];
    Layout {
        writes_old,
        old,
        new,
    }
}

fn new_writes(l: &Layout) -> Vec<Pattern> {
    l.new.iter().copied().filter(|pt| pt.byte != 0).collect()
}

/// snapctl creates s1, then (after new writes) s2; QEMU reverts to each.
fn forward(v: &Variant) {
    let dir = TempDir::new().expect("tempdir");
    let img = dir.path().join("disk.qcow2");
    v.spec.create(&img);
    let l = layout(v.spec.cluster(), v.compressed);
    qemu_io_ok(&img, &l.writes_old);
    verify_patterns(&img, &l.old, "after writing the old data");
    assert_qemu_clean(&img, "before snapctl");

    snapctl_run(["disk", "create", p(&img), "s1"]).ok();
    assert_qemu_clean(&img, "after snapctl disk create s1");
    assert_eq!(
        qemu_snapshot_names(&img),
        ["s1"],
        "qemu-img info after create"
    );
    verify_patterns(&img, &l.old, "current data right after snapctl disk create");

    write_patterns(&img, &new_writes(&l));
    verify_patterns(&img, &l.new, "after overwriting");
    assert_qemu_clean(&img, "after overwriting the snapshotted data");

    // A second snapshot on top of the first (tables now partly shared, partly copied).
    snapctl_run(["disk", "create", p(&img), "s2"]).ok();
    assert_qemu_clean(&img, "after snapctl disk create s2");
    assert_eq!(qemu_snapshot_names(&img), ["s1", "s2"]);
    verify_patterns(
        &img,
        &l.new,
        "current data right after snapctl disk create s2",
    );

    // Each snapshot's data, seen by QEMU on a copy; then s1 in place.
    let copy = dir.path().join("copy.qcow2");
    for (snap, data) in [("s1", &l.old), ("s2", &l.new)] {
        cp_sparse(&img, &copy);
        qemu_img(["snapshot", "-a", snap, p(&copy)]).ok();
        verify_patterns(
            &copy,
            data,
            &format!("copy after qemu-img snapshot -a {snap}"),
        );
    }

    qemu_img(["snapshot", "-a", "s1", p(&img)]).ok();
    verify_patterns(&img, &l.old, "after qemu-img snapshot -a s1");
    assert_qemu_clean(&img, "after qemu-img snapshot -a s1");
    assert_eq!(qemu_snapshot_names(&img), ["s1", "s2"]);
}

/// QEMU creates q1; snapctl reverts to it and deletes it.
fn reverse(v: &Variant) {
    let dir = TempDir::new().expect("tempdir");
    let img = dir.path().join("disk.qcow2");
    v.spec.create(&img);
    let c = v.spec.cluster();
    let l = layout(c, v.compressed);
    qemu_io_ok(&img, &l.writes_old);
    qemu_img(["snapshot", "-c", "q1", p(&img)]).ok();
    write_patterns(&img, &new_writes(&l));
    verify_patterns(&img, &l.new, "after overwriting");

    snapctl_run(["disk", "revert", p(&img), "q1"]).ok();
    assert_qemu_clean(&img, "after snapctl disk revert q1");
    verify_patterns(&img, &l.old, "after snapctl disk revert q1");
    assert_eq!(
        qemu_snapshot_names(&img),
        ["q1"],
        "revert keeps the snapshot"
    );

    // A write after the revert must copy-on-write (the clusters are shared with q1 again).
    let a = c.min(8 << 10);
    write_patterns(&img, &[Pattern::new(0, a, 0xb1)]);
    assert_qemu_clean(&img, "after writing over the reverted data");

    let copy = dir.path().join("copy.qcow2");
    cp_sparse(&img, &copy);
    qemu_img(["snapshot", "-a", "q1", p(&copy)]).ok();
    verify_patterns(&copy, &l.old, "q1 still intact after revert + write");

    snapctl_run(["disk", "delete", p(&img), "q1"]).ok();
    assert_eq!(
        qemu_snapshots(&img),
        [],
        "qemu-img info after snapctl disk delete q1"
    );
    assert_qemu_clean(&img, "after snapctl disk delete q1");
    let mut current = l.old.clone();
    current[0] = Pattern::new(0, a, 0xb1);
    verify_patterns(&img, &current, "current data after snapctl disk delete q1");

    // The image stays usable for QEMU: a new snapshot and a write.
    write_patterns(&img, &[Pattern::new(20 * c, c, 0xb2)]);
    qemu_img(["snapshot", "-c", "after", p(&img)]).ok();
    assert_qemu_clean(&img, "QEMU using the image after snapctl's delete");
}

macro_rules! variant_tests {
    ($($name:ident: [$(($k:literal, $v:literal)),* $(,)?];)*) => {
        mod forward {
            use super::*;
            $(#[test] fn $name() { forward(&variant(&[$(($k, $v)),*])); })*
        }
        mod reverse {
            use super::*;
            $(#[test] fn $name() { reverse(&variant(&[$(($k, $v)),*])); })*
        }
    };
}

variant_tests! {
    v3_default: [];
    v2_c64k: [("compat", "0.10")];
    v2_c512: [("compat", "0.10"), ("cluster_size", "512")];
    v3_c512: [("cluster_size", "512")];
    v3_c4k: [("cluster_size", "4096")];
    v3_c2m: [("cluster_size", "2M")];
    rb2: [("refcount_bits", "2")];
    rb4: [("refcount_bits", "4")];
    rb8: [("refcount_bits", "8")];
    rb32: [("refcount_bits", "32")];
    rb64: [("refcount_bits", "64")];
    rb8_c512: [("refcount_bits", "8"), ("cluster_size", "512")];
    rb64_c2m: [("refcount_bits", "64"), ("cluster_size", "2M")];
    rb64_c512: [("refcount_bits", "64"), ("cluster_size", "512")];
    extl2_c64k: [("extended_l2", "on")];
    extl2_c2m: [("extended_l2", "on"), ("cluster_size", "2M")];
    lazy_refcounts: [("lazy_refcounts", "on")];
    zlib: [("compression_type", "zlib")];
    zstd: [("compression_type", "zstd")];
    prealloc_metadata: [("preallocation", "metadata")];
    prealloc_metadata_extl2: [("preallocation", "metadata"), ("extended_l2", "on")];
}

/// Asserts snapctl refuses `disk create IMG NAME` with the error contract and no change to the
/// file, and that QEMU refuses the same on a copy (the premise).
fn assert_create_refused(dir: &Path, img: &Path, name: &str) {
    let copy = dir.join("qemu-copy.qcow2");
    cp_sparse(img, &copy);
    let q = qemu_img(["snapshot", "-c", name, p(&copy)]);
    assert!(
        !q.success(),
        "premise: QEMU should refuse this snapshot too\n{}",
        q.describe()
    );

    let before = file_bytes(img);
    let r = snapctl_run(["disk", "create", p(img), name]);
    assert_error_line(&r);
    assert_same_bytes(img, &before, "refused create");
    assert_qemu_clean(img, "after the refused create");
}

#[test]
fn refcount_bits_1_first_snapshot_of_data_overflows() {
    // Any allocated cluster would reach refcount 2, which does not fit in 1 bit.
    let dir = TempDir::new().expect("tempdir");
    let img = dir.path().join("rb1.qcow2");
    Qcow2Spec::new(SIZE).refcount_bits(1).create(&img);
    write_patterns(&img, &[Pattern::new(0, 64 << 10, 0x11)]);
    assert_create_refused(dir.path(), &img, "s1");
    assert_eq!(qemu_snapshots(&img), []);
    verify_patterns(
        &img,
        &[Pattern::new(0, 64 << 10, 0x11)],
        "data after refusal",
    );
}

#[test]
fn refcount_bits_1_second_snapshot_overflows() {
    // An empty image shares no cluster, so its first snapshot fits in 1-bit refcounts; data
    // written afterwards would be shared by a second snapshot (refcount 2): refused.
    let dir = TempDir::new().expect("tempdir");
    let img = dir.path().join("rb1.qcow2");
    Qcow2Spec::new(SIZE).refcount_bits(1).create(&img);
    snapctl_run(["disk", "create", p(&img), "s1"]).ok();
    assert_qemu_clean(&img, "after the first snapshot");
    assert_eq!(qemu_snapshot_names(&img), ["s1"]);
    write_patterns(&img, &[Pattern::new(0, 64 << 10, 0x11)]);
    assert_qemu_clean(&img, "after writing");

    assert_create_refused(dir.path(), &img, "s2");
    assert_eq!(qemu_snapshot_names(&img), ["s1"]);

    // Reverting to the empty s1 needs no refcount above 1.
    snapctl_run(["disk", "revert", p(&img), "s1"]).ok();
    assert_qemu_clean(&img, "after revert to s1");
    verify_patterns(&img, &[Pattern::new(0, 64 << 10, 0)], "after revert to s1");
}

#[test]
fn refcount_bits_2_third_snapshot_overflows() {
    // refcount_bits=2 holds at most 3: active + two snapshots.
    let dir = TempDir::new().expect("tempdir");
    let img = dir.path().join("rb2.qcow2");
    Qcow2Spec::new(SIZE).refcount_bits(2).create(&img);
    write_patterns(&img, &[Pattern::new(0, 64 << 10, 0x11)]);
    snapctl_run(["disk", "create", p(&img), "s1"]).ok();
    snapctl_run(["disk", "create", p(&img), "s2"]).ok();
    assert_qemu_clean(&img, "after two snapshots");
    assert_eq!(qemu_snapshot_names(&img), ["s1", "s2"]);

    assert_create_refused(dir.path(), &img, "s3");
    assert_eq!(qemu_snapshot_names(&img), ["s1", "s2"]);

    // Deleting one makes room again.
    snapctl_run(["disk", "delete", p(&img), "s1"]).ok();
    assert_qemu_clean(&img, "after delete s1");
    snapctl_run(["disk", "create", p(&img), "s3"]).ok();
    assert_qemu_clean(&img, "after s3");
    assert_eq!(qemu_snapshot_names(&img), ["s2", "s3"]);
}

#[test]
fn refcount_bits_2_packed_compressed_clusters_overflow() {
    // Two tiny compressed clusters share one host cluster (refcount 2 already); a snapshot adds
    // one reference per L2 entry, so that host cluster would need 4 > 3. Refcounts must be
    // counted per reference, not per distinct cluster.
    let dir = TempDir::new().expect("tempdir");
    let img = dir.path().join("rb2c.qcow2");
    Qcow2Spec::new(SIZE).refcount_bits(2).create(&img);
    qemu_io_ok(&img, &["write -c -P 0x33 655360 131072".to_string()]);
    assert_qemu_clean(&img, "after the compressed write");
    assert_create_refused(dir.path(), &img, "s1");
    verify_patterns(
        &img,
        &[Pattern::new(655360, 131072, 0x33)],
        "data after refusal",
    );
}
