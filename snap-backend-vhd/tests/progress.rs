//! Progress of the VHD layer delete (`disk delete IMAGE --layer PATH`, the progress bar's
//! source): the callback is told (done, total) bytes after each committed write into the child,
//! `done` grows with every call and ends at `total`, which is what the coalesce copies; a
//! callback that says stop leaves the chain's guest view unchanged and a second run finishes.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::path::{Path, PathBuf};

use snap_backend_vhd::{
    ParentPolicy, create_dynamic, create_external, delete_layer_with_progress, open_chain,
};
use snap_core::ErrorKind;
use snap_core::lock::LockMode;

const POLICY: ParentPolicy = ParentPolicy::ChildFolder;
const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const BLOCK: u32 = 2 << 20;

/// base <- mid <- top in `dir`. mid holds several runs over many blocks (more than one copy
/// piece of 4 MiB), top covers some of them whole and some in part (sector gaps inside blocks).
fn build(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let base = dir.join("base.vhd");
    let mid = dir.join("mid.vhd");
    let top = dir.join("top.vhd");
    create_dynamic(&base, SIZE, Some(BLOCK)).unwrap();
    write(&base, &[(0, 8 * MIB, 0x11)]);
    create_external(&base, "mid", Some(mid.as_path()), POLICY).unwrap();
    write(
        &mid,
        &[
            (MIB, 13 * MIB, 0x22),
            (20 * MIB + 4096, 3 * MIB, 0x23),
            (40 * MIB, 9 * MIB + 512 * 8, 0x24),
            (63 * MIB, MIB, 0x25),
        ],
    );
    create_external(&mid, "top", Some(top.as_path()), POLICY).unwrap();
    write(
        &top,
        &[
            (2 * MIB, 2 * MIB, 0x33),
            (6 * MIB + 8192, 4096, 0x34),
            (21 * MIB, 64 * 1024, 0x35),
            (44 * MIB, 3 * MIB + 4096, 0x36),
        ],
    );
    (base, mid, top)
}

fn write(path: &Path, writes: &[(u64, u64, u8)]) {
    let mut chain = open_chain(path, POLICY, |level, _| {
        if level == 0 {
            LockMode::Exclusive
        } else {
            LockMode::Shared
        }
    })
    .unwrap();
    for &(offset, len, byte) in writes {
        chain.write(offset, &vec![byte; len as usize]).unwrap();
    }
}

fn view(path: &Path) -> Vec<u8> {
    let chain = open_chain(path, POLICY, |_, _| LockMode::Shared).unwrap();
    let mut buf = vec![0u8; chain.size() as usize];
    chain.read(0, &mut buf).unwrap();
    buf
}

/// What the coalesce of `layer` into its child in `image`'s chain will copy.
fn planned_bytes(image: &Path, level: usize) -> u64 {
    let chain = open_chain(image, POLICY, |_, _| LockMode::Shared).unwrap();
    chain.coalesce_bytes(level).unwrap()
}

/// Every call's `done` is above the previous one, `total` is the same in all, and the last call
/// reaches it.
fn assert_progress(calls: &[(u64, u64)], total: u64) {
    assert!(!calls.is_empty(), "the progress callback was never called");
    for pair in calls.windows(2) {
        assert!(
            pair[1].0 > pair[0].0,
            "done went from {} to {}: not increasing ({calls:?})",
            pair[0].0,
            pair[1].0
        );
    }
    assert!(
        calls.iter().all(|&(_, t)| t == total),
        "total changed or differs from the planned {total}: {calls:?}"
    );
    assert_eq!(
        calls.last().map(|&(done, _)| done),
        Some(total),
        "the last call does not reach total"
    );
}

#[test]
fn delete_reports_progress_up_to_the_bytes_copied() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, mid, top) = build(tmp.path());
    let before = view(&top);
    let total = planned_bytes(&top, 1);
    assert!(total > 4 * MIB, "the case must span several copy pieces");

    let mut calls = Vec::new();
    let outcome = delete_layer_with_progress(&top, &mid, POLICY, |done, total| {
        calls.push((done, total));
        true
    })
    .unwrap();

    assert_progress(&calls, total);
    assert!(
        calls.len() > 2,
        "expected a call per committed write, got {calls:?}"
    );
    assert_eq!(outcome.sectors_copied * 512, total);
    assert!(outcome.removed && !mid.exists());
    assert_eq!(view(&top), before, "the guest view changed");
    let chain = open_chain(&top, POLICY, |_, _| LockMode::Shared).unwrap();
    assert_eq!(chain.layers().len(), 2);
    assert_eq!(
        std::fs::canonicalize(&chain.layers()[1].path).unwrap(),
        std::fs::canonicalize(&base).unwrap()
    );
}

#[test]
fn a_layer_the_child_already_covers_reports_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (base, mid, top) = (dir.join("b.vhd"), dir.join("m.vhd"), dir.join("t.vhd"));
    create_dynamic(&base, SIZE, Some(BLOCK)).unwrap();
    create_external(&base, "mid", Some(mid.as_path()), POLICY).unwrap();
    write(&mid, &[(0, 4 * MIB, 0x22)]);
    create_external(&mid, "top", Some(top.as_path()), POLICY).unwrap();
    write(&top, &[(0, 4 * MIB, 0x33)]);
    let mut calls = Vec::new();
    let outcome = delete_layer_with_progress(&top, &mid, POLICY, |done, total| {
        calls.push((done, total));
        true
    })
    .unwrap();
    assert_eq!(outcome.sectors_copied, 0);
    assert!(calls.is_empty(), "nothing was copied, yet: {calls:?}");
}

#[test]
fn stopping_from_the_callback_leaves_the_view_and_a_rerun_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, mid, top) = build(tmp.path());
    let before = view(&top);
    let total = planned_bytes(&top, 1);

    let mut first = Vec::new();
    let err = delete_layer_with_progress(&top, &mid, POLICY, |done, total| {
        first.push((done, total));
        first.len() < 3
    })
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Cancelled, "{err}");
    assert_eq!(first.len(), 3);
    let stopped_at = first[2].0;
    assert!(stopped_at > 0 && stopped_at < total);
    assert!(
        mid.exists(),
        "the layer was removed although the copy stopped"
    );
    assert_eq!(view(&top), before, "the guest view changed");

    // What is left is exactly what the first run did not copy.
    let rest = planned_bytes(&top, 1);
    assert_eq!(rest, total - stopped_at);
    let mut second = Vec::new();
    let outcome = delete_layer_with_progress(&top, &mid, POLICY, |done, total| {
        second.push((done, total));
        true
    })
    .unwrap();
    assert_progress(&second, rest);
    assert_eq!(outcome.sectors_copied * 512, rest);
    assert!(!mid.exists());
    assert_eq!(view(&top), before, "the guest view changed");
}
