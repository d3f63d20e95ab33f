//! External snapshots through the library, with QEMU as the oracle: an interrupted layer merge
//! (cancelled after its first 32 MiB batch) leaves an intact chain with the same guest view and
//! finishes when run again; `plan_delete_layer` counts exactly the clusters a stream copies.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use snap_backend_qcow2::external::{
    create_external, delete_layer, delete_layer_with, plan_delete_layer, revert_to_layer,
};
use snap_core::{ChainLayer, DiskFormat, ErrorKind};
use tempfile::TempDir;

const MIB: u64 = 1 << 20;
const CLUSTER: u64 = 65536;

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    assert!(
        !text.contains("failed"),
        "{cmd:?} reported a failure:\n{text}"
    );
    text
}

fn qemu_img(args: &[&str]) -> String {
    run(Command::new("qemu-img").args(args))
}

/// `qemu-img create -f qcow2 [-o OPTS] PATH SIZE`.
fn create(path: &Path, opts: &str, size: u64) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    let size = size.to_string();
    args.extend([s(path), size.as_str()]);
    qemu_img(&args);
}

/// `qemu-io -f qcow2 -c CMD... PATH`.
fn qemu_io(path: &Path, cmds: &[String]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(path);
    run(&mut cmd);
}

fn s(path: &Path) -> &str {
    path.to_str().expect("UTF-8 test path")
}

fn w(byte: u8, offset: u64, len: u64) -> String {
    format!("write -P {byte:#x} {offset} {len}")
}

fn wz(offset: u64, len: u64) -> String {
    format!("write -z {offset} {len}")
}

/// `qemu-img check` finds neither errors nor leaks.
#[track_caller]
fn assert_clean(path: &Path, when: &str) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", s(path)])
        .output()
        .expect("run qemu-img check");
    assert!(
        out.status.success(),
        "{when}: qemu-img check {}:\n{}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The guest view of `img` through its chain, as QEMU reads it.
fn raw_view(img: &Path) -> Vec<u8> {
    let dir = TempDir::new().unwrap();
    let out = dir.path().join("view.raw");
    qemu_img(&["convert", "-U", "-f", "qcow2", "-O", "raw", s(img), s(&out)]);
    std::fs::read(&out).unwrap()
}

#[track_caller]
fn assert_same_view(now: &[u8], before: &[u8], when: &str) {
    if now != before {
        let first = now
            .iter()
            .zip(before)
            .position(|(a, b)| a != b)
            .unwrap_or(now.len().min(before.len()));
        panic!(
            "{when}: guest view differs (length {} -> {}), first at guest offset {first:#x}",
            before.len(),
            now.len()
        );
    }
}

/// The backing file line of `qemu-img info` (None: standalone) and the format line.
fn backing_of(img: &Path) -> (Option<String>, Option<String>) {
    let info = qemu_img(&["info", "-U", "-f", "qcow2", s(img)]);
    let line = |key: &str| {
        info.lines().find_map(|l| l.strip_prefix(key)).map(|v| {
            // `backing file: NAME (actual path: PATH)` when NAME is relative.
            let v = v.split(" (actual path: ").next().unwrap_or(v);
            v.trim().to_string()
        })
    };
    (line("backing file:"), line("backing file format:"))
}

fn sorted_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

/// base (128 MiB virtual) <- mid (80 MiB of data: several stream batches) <- top.
struct BigChain {
    _dir: TempDir,
    dir: PathBuf,
    base: PathBuf,
    mid: PathBuf,
    top: PathBuf,
}

fn big_chain() -> BigChain {
    let dir = TempDir::new().unwrap();
    let d = dir.path().to_path_buf();
    let base = d.join("base.qcow2");
    create(&base, "compat=1.1", 128 * MIB);
    qemu_io(&base, &[w(0x11, 0, 16 * MIB), w(0x12, 100 * MIB, 4 * MIB)]);
    let mid = create_external(&base, "mid", None).unwrap();
    assert_eq!(mid, d.join("base.mid.qcow2"));
    qemu_io(
        &mid,
        &[
            wz(0, MIB),                 // zero clusters over base data: must stay zero
            w(0x21, 8 * MIB, 80 * MIB), // 1280 clusters: three 32 MiB batches
            wz(102 * MIB, 64 * 1024),   // more zeroes over base data, after the data
        ],
    );
    let top = create_external(&mid, "top", Some(d.join("top.qcow2"))).unwrap();
    qemu_io(
        &top,
        &[
            w(0x31, 40 * MIB, MIB),        // 16 clusters the child already has
            wz(60 * MIB, 64 * 1024),       // 1 zero cluster the child already has
            w(0x32, 120 * MIB, 64 * 1024), // outside the layer's data
        ],
    );
    BigChain {
        _dir: dir,
        dir: d,
        base,
        mid,
        top,
    }
}

#[test]
fn interrupted_merge_resumes() {
    let c = big_chain();
    let view = raw_view(&c.top);
    for img in [&c.base, &c.mid, &c.top] {
        assert_clean(img, "before the merge");
    }

    let plan = plan_delete_layer(&c.top, &c.mid).unwrap();
    // mid's 1280 data clusters minus the 17 top already has; its zero clusters copy no data.
    assert_eq!(plan.stream_bytes, (1280 - 17) * CLUSTER, "{plan:#?}");
    assert!(plan.stream_bytes > 64 * MIB, "several batches");
    assert_eq!(plan.child, c.top);
    assert_eq!(plan.layer, c.mid);
    assert_eq!(
        plan.new_backing,
        Some(ChainLayer {
            path: c.base.clone(),
            format: DiskFormat::Qcow2
        })
    );

    let files = sorted_files(&c.dir);
    let base_bytes = std::fs::read(&c.base).unwrap();
    let mid_bytes = std::fs::read(&c.mid).unwrap();

    // (top holds little, so `delete_layer` would fold it into mid; this is the stream.)
    assert!(plan.folds(), "{plan:#?}");
    // Stop after the first batch.
    let mut calls = Vec::new();
    // 32 MiB batches (the default is larger) so the 80 MiB layer takes several.
    let err = delete_layer_with(
        &c.top,
        &c.mid,
        32 * MIB,
        |done, total| {
            calls.push((done, total));
            false
        },
        |io| io,
    )
    .expect_err("a merge told to stop must fail");
    assert_eq!(err.kind(), ErrorKind::Cancelled, "{err}");
    assert_eq!(
        calls.len(),
        1,
        "progress is asked once per batch: {calls:?}"
    );
    let (first_done, first_total) = calls[0];
    assert_eq!(first_total, plan.stream_bytes);
    assert!(
        first_done > 0 && first_done <= 32 * MIB,
        "one batch is at most 32 MiB of data: {calls:?}"
    );

    // The chain is intact: same files, layers untouched, every image clean, same guest view.
    assert_eq!(sorted_files(&c.dir), files, "no file created or removed");
    assert!(
        std::fs::read(&c.base).unwrap() == base_bytes,
        "base untouched"
    );
    assert!(std::fs::read(&c.mid).unwrap() == mid_bytes, "mid untouched");
    for img in [&c.base, &c.mid, &c.top] {
        assert_clean(img, "after the cancelled merge");
    }
    assert_eq!(
        backing_of(&c.top),
        (Some("base.mid.qcow2".into()), Some("qcow2".into())),
        "top still reads from mid"
    );
    assert_same_view(&raw_view(&c.top), &view, "after the cancelled merge");

    // What was streamed is not planned again.
    let again = plan_delete_layer(&c.top, &c.mid).unwrap();
    assert_eq!(
        again.stream_bytes,
        plan.stream_bytes - first_done,
        "the committed batch is not copied again"
    );

    // Run it again to the end.
    let mut calls = Vec::new();
    let deleted = delete_layer_with(
        &c.top,
        &c.mid,
        32 * MIB,
        |done, total| {
            calls.push((done, total));
            true
        },
        |io| io,
    )
    .unwrap();
    assert!(deleted.removed, "{deleted:#?}");
    assert!(
        calls.len() >= 2,
        "the rest is still several batches: {calls:?}"
    );
    assert!(
        calls.windows(2).all(|p| p[0].0 <= p[1].0),
        "progress never goes back: {calls:?}"
    );
    let &(last_done, last_total) = calls.last().unwrap();
    assert_eq!(last_total, again.stream_bytes);
    assert_eq!(last_done, last_total, "progress ends at the total");
    assert!(!c.mid.exists(), "mid removed");
    assert!(
        std::fs::read(&c.base).unwrap() == base_bytes,
        "base never written"
    );
    for img in [&c.base, &c.top] {
        assert_clean(img, "after the resumed merge");
    }
    assert_eq!(
        backing_of(&c.top),
        (Some("base.qcow2".into()), Some("qcow2".into())),
        "top relinked to base"
    );
    assert_same_view(&raw_view(&c.top), &view, "after the resumed merge");
}

/// A hand-built chain: base (20 clusters) <- layer (10 clusters) <- child (`child_cmds`).
fn small_chain(opts: &str, child_cmds: &[String]) -> (TempDir, PathBuf, PathBuf, PathBuf) {
    let dir = TempDir::new().unwrap();
    let base = dir.path().join("base.qcow2");
    create(&base, opts, 16 * MIB);
    qemu_io(&base, &[w(0x11, 0, 20 * CLUSTER)]);
    let layer = create_external(&base, "layer", None).unwrap();
    qemu_io(&layer, &[w(0x21, 0, 10 * CLUSTER)]);
    let child = create_external(&layer, "child", None).unwrap();
    if !child_cmds.is_empty() {
        qemu_io(&child, child_cmds);
    }
    (dir, base, layer, child)
}

#[test]
fn plan_counts_clusters_the_child_lacks() {
    // The child has 3 of the layer's 10 clusters.
    let (dir, base, layer, child) = small_chain(
        "compat=1.1",
        &[
            w(0x31, 2 * CLUSTER, CLUSTER),
            w(0x32, 5 * CLUSTER, CLUSTER),
            w(0x33, 7 * CLUSTER, CLUSTER),
        ],
    );
    let files: Vec<(PathBuf, Vec<u8>)> = sorted_files(dir.path())
        .into_iter()
        .map(|f| {
            let b = std::fs::read(&f).unwrap();
            (f, b)
        })
        .collect();
    let plan = plan_delete_layer(&child, &layer).unwrap();
    assert_eq!(plan.stream_bytes, 7 * CLUSTER, "{plan:#?}");
    assert_eq!(plan.commit_bytes, Some(10 * CLUSTER), "{plan:#?}");
    assert_eq!(plan.layer, layer);
    assert_eq!(plan.child, child);
    assert_eq!(
        plan.new_backing,
        Some(ChainLayer {
            path: base.clone(),
            format: DiskFormat::Qcow2
        })
    );
    assert!(plan.other_users.is_empty(), "{plan:#?}");
    // Planning writes nothing.
    for (f, b) in &files {
        assert!(&std::fs::read(f).unwrap() == b, "{} changed", f.display());
    }

    // The base as the layer: its child is the layer, which has 10 of the base's 20 clusters.
    let plan = plan_delete_layer(&child, &base).unwrap();
    assert_eq!(plan.child, layer);
    assert_eq!(plan.stream_bytes, 10 * CLUSTER, "{plan:#?}");
    assert_eq!(
        plan.commit_bytes, None,
        "the base has no parent to commit into"
    );
    assert_eq!(plan.new_backing, None);

    // The plan is what a deletion copies: the child's 3 clusters folded into the layer, which
    // is cheaper than streaming 7 the other way.
    let plan = plan_delete_layer(&child, &layer).unwrap();
    assert_eq!(plan.fold_bytes, Some(3 * CLUSTER), "{plan:#?}");
    assert!(plan.folds());
    let view = raw_view(&child);
    let mut last = (0, 0);
    let deleted = delete_layer(&child, &layer, |done, total| {
        last = (done, total);
        true
    })
    .unwrap();
    assert_eq!(last, (3 * CLUSTER, 3 * CLUSTER));
    assert!(!layer.exists());
    assert!(deleted.removed);
    assert_same_view(&raw_view(&child), &view, "after the deletion");
    assert_clean(&child, "after the deletion");
}

#[test]
fn plan_counts_partial_subclusters_as_lacking() {
    // extended L2: a cluster the child has only part of still needs the layer's data.
    let (_dir, _base, layer, child) = small_chain(
        "compat=1.1,extended_l2=on",
        &[
            w(0x31, 2 * CLUSTER, CLUSTER),
            w(0x32, 5 * CLUSTER, CLUSTER),
            wz(7 * CLUSTER, CLUSTER),
            w(0x34, 8 * CLUSTER + 4096, 4096), // partial: still streamed
        ],
    );
    let plan = plan_delete_layer(&child, &layer).unwrap();
    assert_eq!(plan.stream_bytes, 7 * CLUSTER, "{plan:#?}");
    assert_eq!(plan.commit_bytes, Some(10 * CLUSTER), "{plan:#?}");
    let view = raw_view(&child);
    delete_layer(&child, &layer, |_, _| true).unwrap();
    assert_same_view(&raw_view(&child), &view, "after the deletion");
    assert_clean(&child, "after the deletion");
}

#[test]
fn plan_names_other_users_and_keeps_the_layer() {
    let (dir, base, layer, child) = small_chain("compat=1.1", &[]);
    let sibling = create_external(&layer, "sibling", None).unwrap();
    qemu_io(&sibling, &[w(0x41, 0, 4096)]);
    let plan = plan_delete_layer(&child, &layer).unwrap();
    assert_eq!(plan.other_users, vec![sibling.clone()], "{plan:#?}");
    assert_eq!(plan.stream_bytes, 10 * CLUSTER);

    let (child_view, sibling_view) = (raw_view(&child), raw_view(&sibling));
    let layer_bytes = std::fs::read(&layer).unwrap();
    let deleted = delete_layer(&child, &layer, |_, _| true).unwrap();
    assert!(!deleted.removed, "the sibling still uses the layer");
    assert!(
        std::fs::read(&layer).unwrap() == layer_bytes,
        "layer kept as is"
    );
    assert_same_view(&raw_view(&child), &child_view, "child");
    assert_same_view(&raw_view(&sibling), &sibling_view, "sibling");
    for img in [&base, &layer, &child, &sibling] {
        assert_clean(img, "after the deletion");
    }
    drop(dir);
}

#[test]
fn revert_to_layer_refuses_internal_snapshots() {
    let (_dir, _base, layer, child) = small_chain("compat=1.1", &[w(0x31, 0, 4096)]);
    qemu_img(&["snapshot", "-c", "keep", s(&child)]);
    let before = std::fs::read(&child).unwrap();
    let err = revert_to_layer(&child, &layer).expect_err("internal snapshots would be lost");
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert!(std::fs::read(&child).unwrap() == before, "child unchanged");

    // Without them, the child becomes an empty overlay on the layer.
    qemu_img(&["snapshot", "-d", "keep", s(&child)]);
    revert_to_layer(&child, &layer).unwrap();
    assert_same_view(&raw_view(&child), &raw_view(&layer), "after the revert");
    assert_clean(&child, "after the revert");
}
