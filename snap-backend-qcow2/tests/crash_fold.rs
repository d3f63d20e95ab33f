//! The fold strategy of a layer delete (`disk delete IMAGE --layer PATH` when the child holds
//! less data than the layer gives it): every cluster the child has is written into the layer,
//! which is then renamed over the child.
//!
//! - The choice: a small child over a large layer folds, the other way round streams; both give
//!   the same guest view as `qemu-img rebase`, and the folded file keeps the child's mode.
//! - Crash states: the fold runs with the layer's I/O recorded ([`fold_layer_with`] over a
//!   [`RecordingIo`]); the log is cut at every flush boundary (with subsets of unflushed writes
//!   and torn writes, [`snap_core::crash`]). In every state, put back in place of the layer, the
//!   image (and the child, when it is below the image) reads exactly as before, the layer has no
//!   corruption for our check and, at flush boundaries, for `qemu-img check`; from a sample of
//!   boundaries the delete runs again and finishes.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::{ok, our_check, qemu_check, view};
use snap_backend_qcow2::external::{
    create_external, delete_layer, fold_layer_with, fold_marker, plan_delete_layer, revert_to_layer,
};
use snap_core::crash::{crash_states, describe, materialize};
use snap_core::io::{FileIo, RecordingIo};

/// Subsets of pending events tried per flush boundary.
const SUBSETS_PER_BOUNDARY: usize = 8;
/// Boundary states from which the delete is run again.
const RERUNS: usize = 4;

fn tools_available() -> bool {
    ["qemu-img", "qemu-io"].iter().all(|tool| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

fn qemu_img(dir: &Path, args: &[&str]) {
    ok(Command::new("qemu-img").current_dir(dir).args(args));
}

fn qemu_io(dir: &Path, image: &str, cmds: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.current_dir(dir).args(["-f", "qcow2"]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    ok(cmd.arg(image));
}

/// base (data) <- mid (a lot of data) <- top (a little: data, zeroes over mid's data, a
/// compressed cluster) [<- above (a little), when `above`].
fn build(dir: &Path, above: bool) {
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "8M"]);
    qemu_io(dir, "base.qcow2", &["write -P 0x11 0 2M"]);
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            "base.qcow2",
            "mid.qcow2",
        ],
    );
    qemu_io(dir, "mid.qcow2", &["write -P 0x22 1M 5M"]);
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            "mid.qcow2",
            "top.qcow2",
        ],
    );
    qemu_io(
        dir,
        "top.qcow2",
        &[
            "write -P 0x33 0 192k",
            "write -z 2M 128k",
            "write -c -P 0x44 4M 64k",
        ],
    );
    if above {
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                "-b",
                "top.qcow2",
                "above.qcow2",
            ],
        );
        qemu_io(dir, "above.qcow2", &["write -P 0x55 64k 64k"]);
    }
}

fn hash(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

#[test]
fn a_small_child_folds_and_a_large_one_streams() {
    if !tools_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    build(dir, false);
    let (top, mid) = (dir.join("top.qcow2"), dir.join("mid.qcow2"));
    std::fs::set_permissions(&top, std::fs::Permissions::from_mode(0o640)).unwrap();
    let before = view(&top).unwrap();
    // The reference: qemu-img rebase on a copy.
    let reference = tempfile::tempdir().unwrap();
    for f in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
        std::fs::copy(dir.join(f), reference.path().join(f)).unwrap();
    }
    qemu_img(
        reference.path(),
        &["rebase", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"],
    );

    let plan = plan_delete_layer(&top, &mid).unwrap();
    assert!(plan.folds(), "{plan:?}");
    assert_eq!(
        plan.fold_bytes,
        Some(4 * 65536),
        "3 data clusters + 1 compressed"
    );
    // mid's 5 MiB but the 2 zero clusters and the compressed one top has over it.
    assert_eq!(plan.stream_bytes, (5 << 20) - 3 * 65536);
    let done = delete_layer(&top, &mid, |_, _| true).unwrap();
    assert!(done.removed && !mid.exists());
    assert_eq!(view(&top).unwrap(), before);
    qemu_check(&top).unwrap();
    let info = common::info(&top);
    assert!(info.contains("backing file: base.qcow2"), "{info}");
    assert_eq!(
        std::fs::metadata(&top).unwrap().permissions().mode() & 0o777,
        0o640
    );
    let same = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "qcow2"])
        .arg(&top)
        .arg(reference.path().join("top.qcow2"))
        .output()
        .unwrap();
    assert!(same.status.success(), "{same:?}");

    // An interrupted fold marks the layer half-written: its own view is refused (a revert to it,
    // an overlay on it) until the delete is run again.
    let tmp2 = tempfile::tempdir().unwrap();
    let d2 = tmp2.path();
    build(d2, false);
    let (top2, mid2) = (d2.join("top.qcow2"), d2.join("mid.qcow2"));
    let before2 = view(&top2).unwrap();
    let err = fold_layer_with(&top2, &mid2, 65536, |_, _| false, |io| io).unwrap_err();
    assert_eq!(err.kind(), snap_core::ErrorKind::Cancelled, "{err}");
    assert!(err.to_string().contains("half-written"), "{err}");
    assert!(fold_marker(&mid2).exists());
    assert_eq!(view(&top2).unwrap(), before2);
    let refused = revert_to_layer(&top2, &mid2).unwrap_err();
    assert!(
        refused.to_string().contains("run `snapctl disk delete"),
        "{refused}"
    );
    assert!(create_external(&mid2, "x", None).is_err());
    delete_layer(&top2, &mid2, |_, _| true).unwrap();
    assert!(!mid2.exists() && !fold_marker(&mid2).exists());
    assert_eq!(view(&top2).unwrap(), before2);

    // No fold through a symlink: the layer may be shared under another name.
    let tmp3 = tempfile::tempdir().unwrap();
    let d3 = tmp3.path();
    build(d3, false);
    std::fs::rename(d3.join("mid.qcow2"), d3.join("real-mid.qcow2")).unwrap();
    std::os::unix::fs::symlink("real-mid.qcow2", d3.join("mid.qcow2")).unwrap();
    let plan = plan_delete_layer(&d3.join("top.qcow2"), &d3.join("mid.qcow2")).unwrap();
    assert_eq!(plan.fold_bytes, None, "{plan:?}");

    // A child with more data than the layer gives it streams (and the layer is removed).
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    build(dir, false);
    let (top, mid) = (dir.join("top.qcow2"), dir.join("mid.qcow2"));
    qemu_io(dir, "top.qcow2", &["write -P 0x66 0 8M"]);
    let plan = plan_delete_layer(&top, &mid).unwrap();
    assert!(!plan.folds(), "{plan:?}");
    let before = view(&top).unwrap();
    delete_layer(&top, &mid, |_, _| true).unwrap();
    assert_eq!(view(&top).unwrap(), before);
    assert!(!mid.exists());

    // No fold when something else uses the layer: another child in its folder keeps it.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    build(dir, false);
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            "mid.qcow2",
            "sib.qcow2",
        ],
    );
    let plan = plan_delete_layer(&dir.join("top.qcow2"), &dir.join("mid.qcow2")).unwrap();
    assert_eq!(plan.fold_bytes, None);
    assert!(
        fold_layer_with(
            &dir.join("top.qcow2"),
            &dir.join("mid.qcow2"),
            1 << 20,
            |_, _| true,
            |io| io
        )
        .is_err()
    );
}

/// Runs the fold under the recorder and checks every crash state; returns how many.
fn explore(above: bool, batch: u64) -> usize {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    build(dir, above);
    let image = dir.join(if above { "above.qcow2" } else { "top.qcow2" });
    let (top, mid) = (dir.join("top.qcow2"), dir.join("mid.qcow2"));
    let watched = if above {
        vec![image.clone(), top.clone()]
    } else {
        vec![top.clone()]
    };
    let views: Vec<Vec<u8>> = watched.iter().map(|p| view(p).unwrap()).collect();
    let top_bytes = std::fs::read(&top).unwrap();
    let mid_before = std::fs::read(&mid).unwrap();
    let others: Vec<(std::path::PathBuf, Vec<u8>)> = ["base.qcow2", "above.qcow2"]
        .iter()
        .map(|f| dir.join(f))
        .filter(|p| p.exists())
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();

    let mut recorder: Option<Arc<RecordingIo<FileIo>>> = None;
    let done = fold_layer_with(
        &image,
        &mid,
        batch,
        |_, _| true,
        |io| {
            let rec = Arc::new(RecordingIo::new(io));
            recorder = Some(Arc::clone(&rec));
            rec
        },
    )
    .unwrap();
    assert!(done.removed && !mid.exists());
    let log = recorder.unwrap().events();
    let folded = std::fs::read(&top).unwrap();
    assert_eq!(materialize(&mid_before, &log).unwrap(), folded);
    for (path, want) in watched.iter().zip(&views) {
        assert_eq!(&view(path).unwrap(), want, "{path:?} after the fold");
    }
    for (path, bytes) in &others {
        assert!(
            &std::fs::read(path).unwrap() == bytes,
            "{path:?} was written"
        );
    }
    qemu_check(&top).unwrap();

    let states = crash_states(&log, "fold", SUBSETS_PER_BOUNDARY);
    let boundaries = states.iter().filter(|s| s.boundary).count();
    let rerun_every = (boundaries / RERUNS).max(1);
    let (mut seen, mut boundary_index, mut checked) = (HashSet::new(), 0usize, 0usize);
    for state in &states {
        let bytes = materialize(&mid_before, &state.events).unwrap();
        if !seen.insert((hash(&bytes), state.boundary)) {
            continue;
        }
        checked += 1;
        // The state of a crash before the rename: the child as it was, the layer half-written.
        std::fs::write(&top, &top_bytes).unwrap();
        std::fs::write(&mid, &bytes).unwrap();
        let fail = |what: String| -> ! {
            panic!(
                "crash state [{}] (log: {}): {what}",
                state.label,
                describe(&log)
            )
        };
        for (path, want) in watched.iter().zip(&views) {
            match view(path) {
                Ok(v) if &v == want => {}
                Ok(_) => fail(format!("the guest view of {path:?} changed")),
                Err(e) => fail(e),
            }
        }
        our_check(&mid).unwrap_or_else(|e| fail(e));
        if state.boundary {
            qemu_check(&mid).unwrap_or_else(|e| fail(e));
            boundary_index += 1;
            if boundary_index % rerun_every == 0 {
                let again = delete_layer(&image, &mid, |_, _| true)
                    .unwrap_or_else(|e| fail(format!("run again: {e}")));
                assert!(again.removed && !mid.exists());
                for (path, want) in watched.iter().zip(&views) {
                    assert_eq!(&view(path).unwrap(), want, "{path:?} after a rerun");
                }
                qemu_check(&top).unwrap_or_else(|e| fail(e));
            }
        }
    }
    // After the rename: the folded layer in the child's place.
    std::fs::write(&top, &folded).unwrap();
    let _ = std::fs::remove_file(&mid);
    for (path, want) in watched.iter().zip(&views) {
        assert_eq!(&view(path).unwrap(), want);
    }
    checked + 1
}

#[test]
fn fold_crash_states_child_is_the_image() {
    if !tools_available() {
        return;
    }
    let n = explore(false, 64 << 10);
    assert!(n > 10, "only {n} states");
    eprintln!("fold, child is the image: {n} crash states");
}

#[test]
fn fold_crash_states_child_below_the_image() {
    if !tools_available() {
        return;
    }
    let n = explore(true, 128 << 10);
    assert!(n > 10, "only {n} states");
    eprintln!("fold, child below the image: {n} crash states");
}
