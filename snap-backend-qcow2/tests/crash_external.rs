//! Crash-state exploration of the external layer merge (`disk delete IMAGE --layer PATH`):
//! the layer's data is streamed into its child in batches (one copy-on-write transaction each),
//! the child is relinked past the layer, and the layer's file is removed.
//!
//! The merge runs on real files with the child's I/O recorded ([`delete_layer_with`] over a
//! [`RecordingIo`]); the log is cut at every flush boundary, with a bounded sample of subsets of
//! the unflushed writes and torn multi-sector writes at each ([`snap_core::crash`]), and a last
//! state with the layer's file removed. Every state is put back in the chain's folder and must:
//! - read, through the chain, exactly the guest view of the image (and of the child, when the
//!   child is a layer below the image) before the merge;
//! - leave the child without corruption for our check and, at flush boundaries, for
//!   `qemu-img check` (leaks allowed: a crash between an allocation and its use leaks);
//! - at a sample of boundaries, take the same delete again and finish it (the layer removed, the
//!   view unchanged, the child clean or leaks-only).
//!
//! The layer and every other file are never written. Cases: a middle layer (64 KiB clusters,
//! compressed and zero clusters), the base layer (the child becomes standalone), a raw base, a
//! merge into a child below the image, an extended-L2 child with partly allocated clusters, a
//! version 2 child (zeroes written as data), and 512-byte clusters (many transactions).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

mod common;

use common::{our_check, qemu_check, view};
use snap_backend_qcow2::external::delete_layer_with;
use snap_core::ErrorKind;
use snap_core::crash::{crash_states, describe, materialize};
use snap_core::io::{FileIo, IoEvent, RecordingIo};

/// Subsets of pending events tried per flush boundary.
const SUBSETS_PER_BOUNDARY: usize = 8;
/// Boundary states from which the delete is run again.
const RERUNS: usize = 5;

fn tools_available() -> bool {
    ["qemu-img", "qemu-io"].iter().all(|tool| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// One file of the chain, base first.
struct Layer {
    name: &'static str,
    /// Whether the file lives in a deep subfolder (its children then name it by an absolute path
    /// longer than 400 bytes, which does not fit in a header's first sector).
    deep: bool,
    /// `qemu-img create -o` options (qcow2), or `None` for a raw file.
    options: Option<&'static str>,
    /// The layer below (qcow2 only), recorded with its format.
    backing: Option<&'static str>,
    /// qemu-io commands run on the new file.
    writes: &'static [&'static str],
}

struct Case {
    name: &'static str,
    size: &'static str,
    layers: &'static [Layer],
    /// The active image.
    image: &'static str,
    /// The layer deleted.
    delete: &'static str,
    /// The layer's child, which receives its data.
    child: &'static str,
    batch: u64,
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn format_of(case: &Case, name: &str) -> &'static str {
    let layer = case.layers.iter().find(|l| l.name == name).unwrap();
    if layer.options.is_some() {
        "qcow2"
    } else {
        "raw"
    }
}

/// The folder of a deep layer: an absolute path of more than 400 bytes.
fn deep_dir(dir: &Path) -> PathBuf {
    dir.join("d".repeat(200))
        .join("e".repeat(200))
        .join("f".repeat(40))
}

fn layer_path(case: &Case, dir: &Path, name: &str) -> PathBuf {
    let layer = case.layers.iter().find(|l| l.name == name).unwrap();
    if layer.deep {
        deep_dir(dir).join(name)
    } else {
        dir.join(name)
    }
}

fn build(case: &Case, dir: &Path) {
    std::fs::create_dir_all(deep_dir(dir)).unwrap();
    for layer in case.layers {
        let path = layer_path(case, dir, layer.name);
        let mut create = Command::new("qemu-img");
        create.current_dir(dir).args(["create", "-q"]);
        match layer.options {
            Some(options) => {
                create.args(["-f", "qcow2", "-o", options]);
                if let Some(backing) = layer.backing {
                    let backing_path = layer_path(case, dir, backing);
                    let name = if backing_path.parent() == path.parent() {
                        PathBuf::from(backing)
                    } else {
                        backing_path
                    };
                    create
                        .arg("-b")
                        .arg(name)
                        .args(["-F", format_of(case, backing)]);
                }
            }
            None => {
                create.args(["-f", "raw"]);
            }
        }
        run(create.arg(&path).arg(case.size));
        if !layer.writes.is_empty() {
            let mut io = Command::new("qemu-io");
            io.current_dir(dir).args([
                "-f",
                if layer.options.is_some() {
                    "qcow2"
                } else {
                    "raw"
                },
            ]);
            for w in layer.writes {
                io.arg("-c").arg(w);
            }
            run(io.arg(&path));
        }
    }
}

/// The guest view of the qcow2 image at `path`, through its chain.
fn hash(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Puts a crash state in `dir`: the child's bytes, and the layer present or removed.
fn put(dir: &Path, case: &Case, child: &[u8], layer: Option<&[u8]>) {
    std::fs::write(layer_path(case, dir, case.child), child).unwrap();
    let path = layer_path(case, dir, case.delete);
    match layer {
        Some(bytes) => std::fs::write(&path, bytes).unwrap(),
        None => {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Runs one case; returns the number of crash states checked.
fn explore(case: &Case) -> usize {
    let start = std::time::Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    build(case, dir);
    let files: Vec<(PathBuf, Vec<u8>)> = case
        .layers
        .iter()
        .map(|l| {
            let path = layer_path(case, dir, l.name);
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();
    let bytes_of = |name: &str| {
        files
            .iter()
            .find(|(p, _)| p.file_name().unwrap() == name)
            .unwrap()
            .1
            .clone()
    };
    let (image, child, layer) = (
        layer_path(case, dir, case.image),
        layer_path(case, dir, case.child),
        layer_path(case, dir, case.delete),
    );
    let watched: Vec<PathBuf> = if case.child == case.image {
        vec![image.clone()]
    } else {
        vec![image.clone(), child.clone()]
    };
    let views_before: Vec<Vec<u8>> = watched.iter().map(|p| view(p).unwrap()).collect();
    let child_before = bytes_of(case.child);
    let layer_bytes = bytes_of(case.delete);

    let mut recorder: Option<Arc<RecordingIo<FileIo>>> = None;
    let deleted = delete_layer_with(
        &image,
        &layer,
        case.batch,
        |_, _| true,
        |io| {
            let rec = Arc::new(RecordingIo::new(io));
            recorder = Some(Arc::clone(&rec));
            rec
        },
    )
    .unwrap_or_else(|e| panic!("{}: delete failed: {e}", case.name));
    assert!(deleted.removed, "{}: the layer was kept", case.name);
    assert_eq!(deleted.plan.child, child);
    let log = recorder.unwrap().events();
    let child_after = std::fs::read(&child).unwrap();
    assert_eq!(
        materialize(&child_before, &log).unwrap(),
        child_after,
        "{}: replaying the log does not give the child after",
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
    assert!(!layer.exists());
    for (path, want) in watched.iter().zip(&views_before) {
        assert!(&view(path).unwrap() == want, "{}: view changed", case.name);
    }
    qemu_check(&child).unwrap_or_else(|e| panic!("{}: after: {e}", case.name));
    let flushes = log.iter().filter(|e| matches!(e, IoEvent::Flush)).count();
    assert!(flushes >= 4, "{}: only {flushes} flushes", case.name);

    let states = crash_states(&log, case.name, SUBSETS_PER_BOUNDARY);
    // bytes -> deep checks done
    let mut judged: HashMap<u64, bool> = HashMap::new();
    let (mut qemu_runs, mut reruns) = (0usize, 0usize);
    // The relink is the last switch of the header (each batch's commit switches it too).
    let relink = log
        .iter()
        .rposition(|e| matches!(e, IoEvent::Write { offset: 0, .. }))
        .unwrap();
    let boundaries = states.iter().filter(|s| s.boundary).count();
    let rerun_every = (boundaries / RERUNS).max(1);
    let mut boundary_index = 0usize;
    let mut judge = |label: &str, child_bytes: &[u8], layer_present: bool, deep: bool| {
        let key = hash(child_bytes) ^ u64::from(layer_present);
        match judged.get(&key) {
            Some(&done) if done || !deep => return,
            _ => {}
        }
        put(
            dir,
            case,
            child_bytes,
            layer_present.then_some(layer_bytes.as_slice()),
        );
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
        if deep {
            qemu_runs += 1;
            qemu_check(&child).unwrap_or_else(|e| fail(e));
        }
        judged.insert(key, deep);
    };
    for state in &states {
        let bytes = materialize(&child_before, &state.events).unwrap();
        judge(&state.label, &bytes, true, state.boundary);
        if state.boundary {
            boundary_index += 1;
            if boundary_index % rerun_every == 0 && reruns < RERUNS {
                // Run the same delete again from here: before the relink it must finish the
                // job; after it the child no longer names the layer, and the delete is refused
                // without a change (the layer's file is left for the user).
                reruns += 1;
                put(dir, case, &bytes, Some(&layer_bytes));
                let relinked = state.events.len() > relink;
                let again = delete_layer_with(&image, &layer, case.batch, |_, _| true, |io| io);
                match (again, relinked) {
                    (Ok(again), false) => assert!(again.removed && !layer.exists()),
                    (Err(e), true) => {
                        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
                        assert!(std::fs::read(&child).unwrap() == bytes);
                        assert!(std::fs::read(&layer).unwrap() == layer_bytes);
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
                qemu_check(&child).unwrap_or_else(|e| {
                    panic!("{}: [{}] after the rerun: {e}", case.name, state.label)
                });
            }
        }
    }
    // The last step: the layer's file removed after the relink.
    judge("layer removed", &child_after, false, true);
    let total = states.len() + 1;
    eprintln!(
        "{}: {} events ({flushes} flushes), {total} crash states checked ({} distinct), \
         {qemu_runs} given to qemu-img check, {reruns} reruns, in {:.1?}",
        case.name,
        log.len(),
        judged.len(),
        start.elapsed()
    );
    total
}

const MIDDLE: Case = Case {
    name: "middle layer, 64 KiB clusters",
    size: "1M",
    layers: &[
        Layer {
            deep: false,
            name: "base.qcow2",
            options: Some("cluster_size=65536"),
            backing: None,
            writes: &["write -P 0x11 0 1M"],
        },
        Layer {
            deep: false,
            name: "mid.qcow2",
            options: Some("cluster_size=65536"),
            backing: Some("base.qcow2"),
            writes: &[
                "write -P 0x22 64k 256k",
                "write -c -P 0x23 512k 64k",
                "write -z 640k 64k",
                "write -P 0x24 900k 10k",
            ],
        },
        Layer {
            deep: false,
            name: "top.qcow2",
            options: Some("cluster_size=65536"),
            backing: Some("mid.qcow2"),
            writes: &["write -P 0x33 100k 20k", "write -P 0x34 960k 64k"],
        },
    ],
    image: "top.qcow2",
    delete: "mid.qcow2",
    child: "top.qcow2",
    batch: 1 << 16,
};

const BASE: Case = Case {
    name: "base layer, the child becomes standalone",
    size: "512k",
    layers: &[
        Layer {
            deep: false,
            name: "base.qcow2",
            options: Some("cluster_size=4096"),
            backing: None,
            writes: &[
                "write -P 0x11 0 64k",
                "write -z 64k 8k",
                "write -P 0x12 200k 40k",
                "write -c -P 0x13 300k 4k",
            ],
        },
        Layer {
            deep: false,
            name: "top.qcow2",
            options: Some("cluster_size=4096"),
            backing: Some("base.qcow2"),
            writes: &["write -P 0x33 10k 3k", "write -P 0x34 220k 4k"],
        },
    ],
    image: "top.qcow2",
    delete: "base.qcow2",
    child: "top.qcow2",
    batch: 2 << 12,
};

const RAW_BASE: Case = Case {
    name: "raw base",
    size: "512k",
    layers: &[
        Layer {
            deep: false,
            name: "base.raw",
            options: None,
            backing: None,
            writes: &["write -P 0x11 0 40k", "write -P 0x12 256k 100k"],
        },
        Layer {
            deep: false,
            name: "top.qcow2",
            options: Some("cluster_size=4096"),
            backing: Some("base.raw"),
            writes: &["write -P 0x33 8k 6k", "write -P 0x34 300k 4k"],
        },
    ],
    image: "top.qcow2",
    delete: "base.raw",
    child: "top.qcow2",
    batch: 2 << 12,
};

const BELOW_IMAGE: Case = Case {
    name: "child below the image",
    size: "1M",
    layers: &[
        Layer {
            deep: false,
            name: "base.qcow2",
            options: Some("cluster_size=65536"),
            backing: None,
            writes: &["write -P 0x11 0 1M"],
        },
        Layer {
            deep: false,
            name: "l1.qcow2",
            options: Some("cluster_size=65536"),
            backing: Some("base.qcow2"),
            writes: &["write -P 0x21 0 200k", "write -z 400k 128k"],
        },
        Layer {
            deep: false,
            name: "l2.qcow2",
            options: Some("cluster_size=65536"),
            backing: Some("l1.qcow2"),
            writes: &["write -P 0x22 150k 100k"],
        },
        Layer {
            deep: false,
            name: "top.qcow2",
            options: Some("cluster_size=65536"),
            backing: Some("l2.qcow2"),
            writes: &["write -P 0x33 0 64k", "write -P 0x34 420k 8k"],
        },
    ],
    image: "top.qcow2",
    delete: "l1.qcow2",
    child: "l2.qcow2",
    batch: 1 << 16,
};

const EXTENDED_L2: Case = Case {
    name: "extended-L2 child with partly allocated clusters",
    size: "1M",
    layers: &[
        Layer {
            deep: false,
            name: "base.qcow2",
            options: Some("cluster_size=65536"),
            backing: None,
            writes: &["write -P 0x11 0 1M"],
        },
        Layer {
            deep: false,
            name: "mid.qcow2",
            options: Some("cluster_size=65536,extended_l2=on"),
            backing: Some("base.qcow2"),
            writes: &["write -P 0x22 0 512k", "write -z 600k 64k"],
        },
        Layer {
            deep: false,
            name: "top.qcow2",
            options: Some("cluster_size=65536,extended_l2=on"),
            backing: Some("mid.qcow2"),
            writes: &[
                "write -P 0x33 4k 4k",
                "write -P 0x34 130k 8k",
                "write -z 200k 4k",
            ],
        },
    ],
    image: "top.qcow2",
    delete: "mid.qcow2",
    child: "top.qcow2",
    batch: 1 << 16,
};

const V2_CHILD: Case = Case {
    name: "version 2 child (zeroes as data)",
    size: "512k",
    layers: &[
        Layer {
            deep: false,
            name: "base.qcow2",
            options: Some("cluster_size=4096"),
            backing: None,
            writes: &["write -P 0x11 0 512k"],
        },
        Layer {
            deep: false,
            name: "mid.qcow2",
            options: Some("cluster_size=4096"),
            backing: Some("base.qcow2"),
            writes: &["write -z 0 32k", "write -P 0x22 100k 20k"],
        },
        Layer {
            deep: false,
            name: "top.qcow2",
            options: Some("compat=0.10,cluster_size=4096"),
            backing: Some("mid.qcow2"),
            writes: &["write -P 0x33 8k 4k"],
        },
    ],
    image: "top.qcow2",
    delete: "mid.qcow2",
    child: "top.qcow2",
    batch: 2 << 12,
};

const SMALL_CLUSTERS: Case = Case {
    name: "512-byte clusters",
    size: "128k",
    layers: &[
        Layer {
            deep: false,
            name: "base.qcow2",
            options: Some("cluster_size=512"),
            backing: None,
            writes: &["write -P 0x11 0 128k"],
        },
        Layer {
            deep: false,
            name: "mid.qcow2",
            options: Some("cluster_size=512"),
            backing: Some("base.qcow2"),
            writes: &[
                "write -P 0x22 0 24k",
                "write -z 40k 2k",
                "write -P 0x23 100k 5k",
            ],
        },
        Layer {
            deep: false,
            name: "top.qcow2",
            options: Some("cluster_size=512"),
            backing: Some("mid.qcow2"),
            writes: &["write -P 0x33 1k 1k"],
        },
    ],
    image: "top.qcow2",
    delete: "mid.qcow2",
    child: "top.qcow2",
    batch: 8 << 9,
};

const LONG_NAME: Case = Case {
    name: "relink to a name longer than a sector",
    size: "512k",
    layers: &[
        Layer {
            deep: true,
            name: "base.qcow2",
            options: Some("cluster_size=4096"),
            backing: None,
            writes: &["write -P 0x11 0 512k"],
        },
        Layer {
            deep: false,
            name: "mid.qcow2",
            options: Some("cluster_size=4096"),
            backing: Some("base.qcow2"),
            writes: &["write -P 0x22 0 24k", "write -z 64k 8k"],
        },
        Layer {
            deep: false,
            name: "top.qcow2",
            options: Some("cluster_size=4096"),
            backing: Some("mid.qcow2"),
            writes: &["write -P 0x33 4k 2k"],
        },
    ],
    image: "top.qcow2",
    delete: "mid.qcow2",
    child: "top.qcow2",
    batch: 2 << 12,
};

fn check_case(case: &Case) {
    if !tools_available() {
        eprintln!("qemu-img/qemu-io not available; skipping {}", case.name);
        return;
    }
    assert!(explore(case) > 40);
}

#[test]
fn merge_crash_states_middle_layer() {
    check_case(&MIDDLE);
}

#[test]
fn merge_crash_states_base_layer() {
    check_case(&BASE);
}

#[test]
fn merge_crash_states_raw_base() {
    check_case(&RAW_BASE);
}

#[test]
fn merge_crash_states_child_below_the_image() {
    check_case(&BELOW_IMAGE);
}

#[test]
fn merge_crash_states_extended_l2_child() {
    check_case(&EXTENDED_L2);
}

#[test]
fn merge_crash_states_v2_child() {
    check_case(&V2_CHILD);
}

#[test]
fn merge_crash_states_512_byte_clusters() {
    check_case(&SMALL_CLUSTERS);
}

#[test]
fn merge_crash_states_relink_to_a_long_name() {
    check_case(&LONG_NAME);
}
