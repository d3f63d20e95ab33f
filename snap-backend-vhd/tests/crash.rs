//! Crash-state exploration of the VHD layer delete (`disk delete IMAGE --layer PATH`): the
//! layer's sectors are coalesced into its child (block allocation and bitmap updates in the
//! crash-safe order of `image.rs`), the child is relinked to the layer's parent (new locators,
//! then the header switch) or made dynamic (footer, its copy, then the header), and the layer's
//! file is removed.
//!
//! The delete runs on real files with every layer's I/O recorded ([`delete_layer_with`] over a
//! [`RecordingIo`]); only the child may be written. The child's log is cut at every flush
//! boundary, with a bounded sample of subsets of the unflushed writes and torn multi-sector
//! writes at each ([`snap_core::crash`]), plus a last state with the layer's file removed. Every
//! state is put back in the chain's folder and must open as a chain whose guest view (of the
//! image, and of the child when it is a layer below the image) equals the view before, with the
//! child free of corruption for our check (leaks allowed). At a sample of boundaries the same
//! delete is run again and must finish (or, once the child is relinked, be refused with nothing
//! changed). Writes are torn only at 4 KiB page boundaries: the header switch is one write inside
//! the first page, as `image.rs` documents (see [`ATOMIC_WRITE`]). A footer copy at offset 0 that
//! differs from the valid end footer (a crash between the two footer writes of a type change) is
//! allowed: the check notes it, not as a corruption.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use snap_backend_vhd::check::check;
use snap_backend_vhd::{ParentPolicy, Vhd, create_dynamic, create_external, delete_layer_with};
use snap_core::ErrorKind;
use snap_core::crash::{crash_states_with_unit, describe, materialize};
use snap_core::io::{FileIo, IoEvent, RecordingIo};
use snap_core::lock::LockMode;

const SUBSETS_PER_BOUNDARY: usize = 8;
/// The writes the VHD code relies on being atomic: one aligned 4 KiB page (the 1024-byte dynamic
/// header is switched by one write inside the first page; the format keeps no second copy of it,
/// so no sector-by-sector order could make its switch survive a torn write). Longer writes are torn
/// at page boundaries.
const ATOMIC_WRITE: usize = 4096;
const RERUNS: usize = 5;
const POLICY: ParentPolicy = ParentPolicy::ChildFolder;

/// One guest write: offset, length, byte.
type Write = (u64, usize, u8);

struct Case {
    name: &'static str,
    size: u64,
    block_size: u32,
    /// Guest writes into each layer, base first; layer i+1 is an external snapshot of layer i.
    layers: &'static [&'static [Write]],
    /// Index of the layer deleted (0 = base) and of the image (the last layer).
    delete: usize,
}

fn layer_path(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("layer{i}.vhd"))
}

fn build(case: &Case, dir: &Path) {
    let base = layer_path(dir, 0);
    create_dynamic(&base, case.size, Some(case.block_size)).unwrap();
    for (i, writes) in case.layers.iter().enumerate() {
        let path = layer_path(dir, i);
        if i > 0 {
            let made = create_external(
                &layer_path(dir, i - 1),
                "next",
                Some(path.as_path()),
                POLICY,
            )
            .unwrap();
            assert_eq!(made, path);
        }
        let mut chain = snap_backend_vhd::open_chain(&path, POLICY, |level, _| {
            if level == 0 {
                LockMode::Exclusive
            } else {
                LockMode::Shared
            }
        })
        .unwrap();
        for &(offset, len, byte) in *writes {
            chain.write(offset, &vec![byte; len]).unwrap();
        }
    }
}

fn view(path: &Path) -> Result<Vec<u8>, String> {
    let chain = snap_backend_vhd::open_chain(path, POLICY, |_, _| LockMode::Shared)
        .map_err(|e| format!("open chain of {path:?}: {e}"))?;
    let mut buf = vec![0u8; chain.size() as usize];
    chain
        .read(0, &mut buf)
        .map_err(|e| format!("read {path:?}: {e}"))?;
    Ok(buf)
}

/// Our check of the file at `path` alone: no corruption (leaks allowed).
fn our_check(path: &Path) -> Result<(), String> {
    let image = Vhd::open(FileIo::open(path, false).map_err(|e| e.to_string())?, false)
        .map_err(|e| format!("open {path:?}: {e}"))?;
    let report = check(&image).map_err(|e| format!("check: {e}"))?;
    if !report.is_clean() {
        return Err(format!("check of {path:?}: {:?}", report.messages));
    }
    Ok(())
}

fn hash(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

fn explore(case: &Case) -> usize {
    let start = std::time::Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    build(case, dir);
    let top = case.layers.len() - 1;
    let (image, layer, child) = (
        layer_path(dir, top),
        layer_path(dir, case.delete),
        layer_path(dir, case.delete + 1),
    );
    let files: Vec<(PathBuf, Vec<u8>)> = (0..=top)
        .map(|i| {
            let p = layer_path(dir, i);
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    let watched: Vec<PathBuf> = if child == image {
        vec![image.clone()]
    } else {
        vec![image.clone(), child.clone()]
    };
    let views_before: Vec<Vec<u8>> = watched.iter().map(|p| view(p).unwrap()).collect();
    let child_before = std::fs::read(&child).unwrap();
    let layer_bytes = std::fs::read(&layer).unwrap();

    let mut recorders: Vec<(usize, Arc<RecordingIo<FileIo>>)> = Vec::new();
    let outcome = delete_layer_with(&image, &layer, POLICY, |level, io| {
        let rec = Arc::new(RecordingIo::new(io));
        recorders.push((level, Arc::clone(&rec)));
        rec
    })
    .unwrap_or_else(|e| panic!("{}: delete failed: {e}", case.name));
    assert!(outcome.removed && !layer.exists(), "{}", case.name);
    assert_eq!(outcome.child, child);
    assert!(outcome.sectors_copied > 0);
    let child_level = top - (case.delete + 1);
    let mut log = Vec::new();
    for (level, rec) in &recorders {
        let events = rec.events();
        if *level == child_level {
            log = events;
        } else {
            assert!(
                events.is_empty(),
                "{}: layer {level} (not the child) was written",
                case.name
            );
        }
    }
    let child_after = std::fs::read(&child).unwrap();
    assert_eq!(
        materialize(&child_before, &log).unwrap(),
        child_after,
        "{}",
        case.name
    );
    for (path, bytes) in &files {
        if path != &child && path != &layer {
            assert!(
                &std::fs::read(path).unwrap() == bytes,
                "{path:?} was written"
            );
        }
    }
    for (path, want) in watched.iter().zip(&views_before) {
        assert!(&view(path).unwrap() == want, "{}: view changed", case.name);
    }
    our_check(&child).unwrap();

    let put = |child_bytes: &[u8], layer_present: bool| {
        std::fs::write(&child, child_bytes).unwrap();
        if layer_present {
            std::fs::write(&layer, &layer_bytes).unwrap();
        } else {
            let _ = std::fs::remove_file(&layer);
        }
    };
    let states = crash_states_with_unit(&log, case.name, SUBSETS_PER_BOUNDARY, ATOMIC_WRITE);
    let boundaries = states.iter().filter(|s| s.boundary).count();
    let rerun_every = (boundaries / RERUNS).max(1);
    let (mut boundary_index, mut reruns) = (0usize, 0usize);
    let mut judged: HashMap<u64, ()> = HashMap::new();
    let mut judge = |label: &str, bytes: &[u8], layer_present: bool| {
        let key = hash(bytes) ^ u64::from(layer_present);
        if judged.insert(key, ()).is_some() {
            return;
        }
        put(bytes, layer_present);
        let fail = |what: String| -> ! {
            panic!(
                "{}: crash state [{label}] (log: {}): {what}",
                case.name,
                describe(&log)
            )
        };
        for (path, want) in watched.iter().zip(&views_before) {
            match view(path) {
                Ok(v) if &v == want => {}
                Ok(_) => fail(format!("the guest view of {path:?} changed")),
                Err(e) => fail(e),
            }
        }
        our_check(&child).unwrap_or_else(|e| fail(e));
    };
    for state in &states {
        let bytes = materialize(&child_before, &state.events).unwrap();
        judge(&state.label, &bytes, true);
        if !state.boundary {
            continue;
        }
        boundary_index += 1;
        if boundary_index % rerun_every != 0 || reruns >= RERUNS {
            continue;
        }
        reruns += 1;
        put(&bytes, true);
        // Relinked: the image's chain no longer goes through the layer.
        let relinked = !snap_backend_vhd::open_chain(&image, POLICY, |_, _| LockMode::Shared)
            .unwrap()
            .layers()
            .iter()
            .any(|l| l.path == layer);
        let again = delete_layer_with(&image, &layer, POLICY, |_, io| io);
        match (again, relinked) {
            (Ok(again), false) => assert!(again.removed && !layer.exists()),
            (Err(e), true) => {
                assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
                assert!(std::fs::read(&child).unwrap() == bytes);
            }
            (result, _) => panic!(
                "{}: [{}] delete run again (relinked: {relinked}): {result:?}",
                case.name, state.label
            ),
        }
        for (path, want) in watched.iter().zip(&views_before) {
            assert!(
                &view(path).unwrap() == want,
                "{}: [{}] view changed by the rerun",
                case.name,
                state.label
            );
        }
        our_check(&child).unwrap();
    }
    judge("layer removed", &child_after, false);
    let total = states.len() + 1;
    eprintln!(
        "{}: {} events ({} flushes), {total} crash states checked ({} distinct), {reruns} reruns, \
         in {:.1?}",
        case.name,
        log.len(),
        log.iter().filter(|e| matches!(e, IoEvent::Flush)).count(),
        judged.len(),
        start.elapsed()
    );
    total
}

const K: u64 = 1024;

#[test]
fn delete_crash_states_middle_layer() {
    let total = explore(&Case {
        name: "middle layer, 4 KiB blocks",
        size: 256 * K,
        block_size: 4096,
        layers: &[
            &[(0, 256 * 1024, 0x11)],
            &[
                (4 * K, 8 * 1024, 0x22),
                (20 * K, 4096, 0x23),
                (36 * K + 512, 1000, 0x24),
                (52 * K, 6 * 1024, 0x25),
                (72 * K, 4096, 0x26),
                (90 * K, 4096, 0x27),
                (120 * K, 12 * 1024, 0x28),
                (160 * K, 4096, 0x29),
                (200 * K, 4 * 1024, 0x2a),
                (250 * K, 6 * 1024, 0x2b),
            ],
            &[(6 * K, 4 * 1024, 0x33), (201 * K, 512, 0x34)],
        ],
        delete: 1,
    });
    assert!(total > 50);
}

#[test]
fn delete_crash_states_base_layer() {
    let total = explore(&Case {
        name: "base layer, the child becomes dynamic",
        size: 256 * K,
        block_size: 4096,
        layers: &[
            &[(0, 20 * 1024, 0x11), (100 * K, 3 * 1024, 0x12)],
            &[(8 * K, 4 * 1024, 0x33), (130 * K, 4 * 1024, 0x34)],
        ],
        delete: 0,
    });
    assert!(total > 50);
}

#[test]
fn delete_crash_states_child_below_the_image() {
    let total = explore(&Case {
        name: "child below the image, 2 MiB blocks",
        size: 4 << 20,
        block_size: 2 << 20,
        layers: &[
            &[(0, 64 * 1024, 0x11), (3 << 20, 8 * 1024, 0x12)],
            &[(16 * K, 16 * 1024, 0x21), ((2 << 20) + 4096, 4096, 0x22)],
            &[(20 * K, 4 * 1024, 0x31)],
            &[(0, 4096, 0x41)],
        ],
        delete: 1,
    });
    assert!(total > 30);
}
