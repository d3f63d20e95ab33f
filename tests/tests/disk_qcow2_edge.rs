//! Edge cases of `snapctl disk` on qcow2 beyond the basic matrix: header flags QEMU refuses to
//! write through, snapshot ids, resized images, backing chains, and metadata growth (refcount
//! table, snapshot table) on tiny clusters.

use std::path::Path;

use serde_json::Value;
use snapctl_tests::*;
use tempfile::TempDir;

const MIB: u64 = 1 << 20;

fn tmp() -> TempDir {
    TempDir::new().expect("tempdir")
}

/// Sets bits in the v3 header's `incompatible_features` (byte 72).
fn set_incompatible_bits(img: &Path, bits: u64) {
    let v = read_be_u64(img, 72);
    patch_be_u64(img, 72, v | bits);
}

/// snapctl create/revert/delete are all refused with the error contract, file unchanged.
fn assert_changes_refused(img: &Path, what: &str) {
    let before = file_bytes(img);
    for op in [["create", "x"], ["revert", "q1"], ["delete", "q1"]] {
        let r = snapctl_run(["disk", op[0], p(img), op[1]]);
        assert_error_line(&r);
        assert_same_bytes(
            img,
            &before,
            &format!("{what}: snapctl disk {}", op.join(" ")),
        );
    }
}

#[test]
fn corrupt_flag_refused() {
    // QEMU sets incompatible bit 1 ("corrupt") when it finds damage, and then refuses to open the
    // image read-write until it is repaired.
    let dir = tmp();
    let img = dir.path().join("disk.qcow2");
    Qcow2Spec::new(16 * MIB).create(&img);
    write_patterns(&img, &[Pattern::new(0, 64 << 10, 0x11)]);
    qemu_img(["snapshot", "-c", "q1", p(&img)]).ok();
    set_incompatible_bits(&img, 1 << 1);
    let copy = dir.path().join("copy.qcow2");
    cp_sparse(&img, &copy);
    assert!(
        !qemu_img(["snapshot", "-c", "x", p(&copy)]).success(),
        "premise: QEMU refuses"
    );
    assert_changes_refused(&img, "corrupt flag");
}

#[test]
fn unknown_incompatible_feature_refused() {
    let dir = tmp();
    let img = dir.path().join("disk.qcow2");
    Qcow2Spec::new(16 * MIB).create(&img);
    qemu_img(["snapshot", "-c", "q1", p(&img)]).ok();
    set_incompatible_bits(&img, 1 << 40);
    assert!(
        !qemu_img(["info", p(&img)]).success(),
        "premise: QEMU refuses to open it"
    );
    assert_changes_refused(&img, "unknown incompatible feature");
    let before = file_bytes(&img);
    for args in [["list", ""], ["list", "--json"]] {
        let mut a = vec!["disk", args[0], p(&img)];
        if !args[1].is_empty() {
            a.push(args[1]);
        }
        assert_error_line(&snapctl_run(&a));
    }
    assert_same_bytes(&img, &before, "list");
}

#[test]
fn dirty_lazy_refcounts_image_not_corrupted() {
    // A QEMU that dies with lazy_refcounts=on leaves the dirty bit set and refcounts stale
    // (qemu-img check reports errors until repaired). snapctl must not build on the stale
    // refcounts: it either refuses (error contract, file unchanged) or repairs first so the
    // result is clean.
    let dir = tmp();
    let img = dir.path().join("dirty.qcow2");
    Qcow2Spec::new(16 * MIB)
        .opt("lazy_refcounts", "on")
        .create(&img);
    let r = qemu_io(
        &img,
        &["write -P 0x11 0 128k".to_string(), "abort".to_string()],
    );
    assert!(!r.success(), "premise: qemu-io aborted\n{}", r.describe());
    assert_ne!(read_be_u64(&img, 72) & 1, 0, "premise: dirty bit set");
    let (errors, _) = qemu_img_check(&img);
    assert!(errors > 0, "premise: refcounts are stale");

    let before = file_bytes(&img);
    let r = snapctl_run(["disk", "create", p(&img), "s1"]);
    if r.success() {
        assert_qemu_clean(&img, "snapctl created a snapshot on a dirty image");
        let copy = dir.path().join("copy.qcow2");
        cp_sparse(&img, &copy);
        qemu_img(["snapshot", "-a", "s1", p(&copy)]).ok();
        verify_patterns(&copy, &[Pattern::new(0, 128 << 10, 0x11)], "s1");
    } else {
        assert_error_line(&r);
        assert_same_bytes(&img, &before, "refused create on a dirty image");
    }
}

#[test]
fn external_data_file_refused() {
    // QEMU does not support internal snapshots with an external data file.
    let dir = tmp();
    let img = dir.path().join("disk.qcow2");
    let data = dir.path().join("disk.data");
    Qcow2Spec::new(16 * MIB)
        .opt("data_file", p(&data))
        .create(&img);
    assert!(
        !qemu_img(["snapshot", "-c", "x", p(&img)]).success(),
        "premise: QEMU refuses"
    );
    let (before, data_before) = (file_bytes(&img), file_bytes(&data));
    let r = snapctl_run(["disk", "create", p(&img), "x"]);
    assert_error_line(&r);
    assert_same_bytes(&img, &before, "create with a data file");
    assert_same_bytes(&data, &data_before, "create with a data file (data file)");
}

#[test]
fn snapshot_ids_follow_qemu() {
    // After deletes, a new snapshot's id is the one QEMU would give (max numeric id + 1).
    let dir = tmp();
    let img = dir.path().join("disk.qcow2");
    Qcow2Spec::new(16 * MIB).create(&img);
    for s in ["a", "b", "c"] {
        snapctl_run(["disk", "create", p(&img), s]).ok();
    }
    snapctl_run(["disk", "delete", p(&img), "c"]).ok();
    snapctl_run(["disk", "delete", p(&img), "a"]).ok();
    let copy = dir.path().join("copy.qcow2");
    cp_sparse(&img, &copy);
    snapctl_run(["disk", "create", p(&img), "d"]).ok();
    qemu_img(["snapshot", "-c", "d", p(&copy)]).ok();
    let ids = |path: &Path| -> Vec<(String, String)> {
        qemu_snapshots(path)
            .into_iter()
            .map(|s| (s.id, s.name))
            .collect()
    };
    assert_eq!(ids(&img), ids(&copy), "snapctl vs qemu-img snapshot ids");
    assert_qemu_clean(&img, "after d");
}

#[test]
fn revert_restores_virtual_size_of_snapshot() {
    // QEMU 10 grows images that have internal snapshots; each snapshot records its disk size,
    // and a revert brings that size back.
    let dir = tmp();
    let img = dir.path().join("disk.qcow2");
    Qcow2Spec::new(16 * MIB).create(&img);
    write_patterns(&img, &[Pattern::new(0, 64 << 10, 0x11)]);
    snapctl_run(["disk", "create", p(&img), "small"]).ok();
    qemu_img(["resize", "-q", "-f", "qcow2", p(&img), "2G"]).ok();
    write_patterns(&img, &[Pattern::new(1 << 30, 64 << 10, 0x22)]);
    snapctl_run(["disk", "create", p(&img), "big"]).ok();
    assert_qemu_clean(&img, "after big");

    let list = |img: &Path| -> Value {
        let r = snapctl_run(["disk", "list", p(img), "--json"]).ok();
        serde_json::from_str(&r.stdout).expect("list JSON")
    };
    assert_eq!(list(&img)["virtual_size"].as_u64(), Some(2 << 30));

    snapctl_run(["disk", "revert", p(&img), "small"]).ok();
    assert_qemu_clean(&img, "after revert small");
    assert_eq!(qemu_info(&img)["virtual-size"].as_u64(), Some(16 * MIB));
    assert_eq!(list(&img)["virtual_size"].as_u64(), Some(16 * MIB));
    verify_patterns(&img, &[Pattern::new(0, 64 << 10, 0x11)], "small");

    snapctl_run(["disk", "revert", p(&img), "big"]).ok();
    assert_qemu_clean(&img, "after revert big");
    assert_eq!(qemu_info(&img)["virtual-size"].as_u64(), Some(2 << 30));
    verify_patterns(
        &img,
        &[
            Pattern::new(0, 64 << 10, 0x11),
            Pattern::new(1 << 30, 64 << 10, 0x22),
        ],
        "big",
    );
}

#[test]
fn overlay_with_backing_file() {
    // Internal snapshots of an overlay: the chain is listed, unallocated clusters still read
    // through to the base, and the base is never written.
    let dir = tmp();
    let base = dir.path().join("base.qcow2");
    let overlay = dir.path().join("overlay.qcow2");
    Qcow2Spec::new(16 * MIB).create(&base);
    write_patterns(&base, &[Pattern::new(0, MIB, 0x10)]);
    qemu_img([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        p(&overlay),
    ])
    .ok();
    write_patterns(&overlay, &[Pattern::new(0, 64 << 10, 0x20)]);
    let base_before = file_bytes(&base);

    let r = snapctl_run(["disk", "list", p(&overlay), "--json"]).ok();
    let v: Value = serde_json::from_str(&r.stdout).expect("list JSON");
    let chain = v["chain"].as_array().expect("chain array");
    assert_eq!(chain.len(), 1, "one backing layer\n{v:#}");
    assert_eq!(chain[0]["format"], "qcow2", "{v:#}");
    let layer = Path::new(chain[0]["path"].as_str().expect("path string"));
    let resolved = if layer.is_absolute() {
        layer.to_path_buf()
    } else {
        dir.path().join(layer)
    };
    assert_eq!(
        resolved.canonicalize().expect("chain path exists"),
        base.canonicalize().expect("base"),
        "{v:#}"
    );

    snapctl_run(["disk", "create", p(&overlay), "s1"]).ok();
    write_patterns(&overlay, &[Pattern::new(64 << 10, 64 << 10, 0x30)]);
    snapctl_run(["disk", "revert", p(&overlay), "s1"]).ok();
    assert_qemu_clean(&overlay, "overlay after revert");
    verify_patterns(
        &overlay,
        &[
            Pattern::new(0, 64 << 10, 0x20),
            Pattern::new(64 << 10, MIB - (64 << 10), 0x10),
            Pattern::new(MIB, MIB, 0),
        ],
        "overlay after revert",
    );
    snapctl_run(["disk", "delete", p(&overlay), "s1"]).ok();
    assert_qemu_clean(&overlay, "overlay after delete");
    assert_same_bytes(&base, &base_before, "the backing file");
    let info = qemu_info(&overlay);
    assert_eq!(info["backing-filename"], "base.qcow2", "backing link kept");
}

#[test]
fn metadata_growth_on_tiny_clusters() {
    // 512-byte clusters with 64-bit refcounts: a refcount block covers 64 clusters (32 KiB of
    // file) and a refcount-table cluster 64 blocks (2 MiB). Growing the data step by step past
    // 2 MiB makes snapshots allocate refcount blocks and grow the refcount table, and 20
    // snapshots make the snapshot table span several clusters.
    let dir = tmp();
    let d = dir.path();
    let img = d.join("tiny.qcow2");
    Qcow2Spec::new(4 * MIB)
        .cluster_size(512)
        .refcount_bits(64)
        .create(&img);
    let start: u64 = 1900 << 10;
    let step: u64 = 12 << 10;
    qemu_io_ok(&img, &[format!("write -P 0x01 4096 {}", start - 4096)]);
    let n = 20u8;
    for i in 1..=n {
        let off = start + u64::from(i - 1) * step;
        write_patterns(
            &img,
            &[Pattern::new(0, 4096, i), Pattern::new(off, step, 0x80 | i)],
        );
        let name = format!("snapshot-number-{i:02}-with-a-longer-name-to-fill-the-table");
        snapctl_run(["disk", "create", p(&img), &name]).ok();
        assert_qemu_clean(&img, &format!("after {name}"));
    }
    let names = qemu_snapshot_names(&img);
    assert_eq!(names.len(), usize::from(n));

    // What snapshot i holds.
    let expect = |i: u8| -> Vec<Pattern> {
        let mut v = vec![
            Pattern::new(0, 4096, i),
            Pattern::new(4096, start - 4096, 0x01),
        ];
        for j in 1..=n {
            let off = start + u64::from(j - 1) * step;
            v.push(Pattern::new(off, step, if j <= i { 0x80 | j } else { 0 }));
        }
        v
    };
    for i in [1, 7, n] {
        let copy = d.join("copy.qcow2");
        cp_sparse(&img, &copy);
        qemu_img(["snapshot", "-a", &names[usize::from(i - 1)], p(&copy)]).ok();
        verify_patterns(&copy, &expect(i), &format!("snapshot {i} via QEMU"));
    }

    // Delete every other one, then revert to a survivor with snapctl.
    for i in (2..=n).step_by(2) {
        snapctl_run(["disk", "delete", p(&img), &names[usize::from(i - 1)]]).ok();
        assert_qemu_clean(&img, &format!("after deleting snapshot {i}"));
    }
    assert_eq!(qemu_snapshots(&img).len(), usize::from(n / 2));
    snapctl_run(["disk", "revert", p(&img), &names[6]]).ok();
    assert_qemu_clean(&img, "after revert to snapshot 7");
    verify_patterns(&img, &expect(7), "current after revert to snapshot 7");
}
