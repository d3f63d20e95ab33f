//! Crash-state exploration (in the manner of CrashMonkey) for internal snapshot create / revert /
//! delete and guest writes.
//!
//! Each operation runs on an in-memory image under a [`RecordingIo`]; the log of writes, length
//! changes and flushes is then cut at every flush boundary, and at each boundary a bounded,
//! deterministic sample of subsets of the not-yet-flushed events is applied as well (those may or
//! may not have reached the disk, in any combination). Every crash state so materialized must be
//! exactly the old image or exactly the new one: it opens, our check finds neither corruption nor
//! leaks, and snapshot list and guest view (plus, at flush boundaries, every snapshot's guest
//! view) all equal the before side or all equal the after side. Flush-boundary states are also
//! given to `qemu-img check`. Each boundary also gets one state with its multi-sector pending
//! writes torn in the middle, and the old image as left by a crash just before the header switch
//! must take the same operation again and give the new image. Refused operations must leave the
//! file byte-identical and never write inside the old file. A self-test shows the oracle rejects
//! states that break the write order (header switched, some staged structure missing).
//!
//! Guest writes are kept below `WRITE_BATCH_CLUSTERS` clusters: a longer write is several
//! transactions, and a crash between them leaves a state that is neither before nor after.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::process::Command;

use snap_backend_qcow2::{Qcow2, Qcow2Disk, SnapshotTime};
use snap_core::ErrorKind;
use snap_core::crash::{CrashState, describe};
use snap_core::io::{IoEvent, MemIo, RecordingIo};

const TIME: SnapshotTime = SnapshotTime {
    sec: 1_700_000_000,
    nsec: 0,
};
/// Most subsets of pending events tried per flush boundary.
const SUBSETS_PER_BOUNDARY: usize = 16;

/// An image variant made by `qemu-img create`.
#[derive(Debug, Clone, Copy)]
struct Variant {
    name: &'static str,
    options: &'static str,
    size: u64,
    /// Whether the setup takes a second snapshot (refcount_bits=2 cannot: the create under test
    /// would overflow).
    two_snapshots: bool,
    /// Whether `write -z` makes zero clusters (v3 only).
    zero_clusters: bool,
}

const V3_64K: Variant = Variant {
    name: "v3-64k",
    options: "compat=1.1,cluster_size=65536",
    size: 4 << 20,
    two_snapshots: true,
    zero_clusters: true,
};
const V2_512: Variant = Variant {
    name: "v2-512b",
    options: "compat=0.10,cluster_size=512",
    size: 256 << 10,
    two_snapshots: true,
    zero_clusters: false,
};
const EXT_L2: Variant = Variant {
    name: "extended-l2",
    options: "compat=1.1,extended_l2=on",
    size: 2 << 20,
    two_snapshots: true,
    zero_clusters: true,
};
const RB2_4K: Variant = Variant {
    name: "rb2-4k",
    options: "compat=1.1,cluster_size=4096,refcount_bits=2",
    size: 512 << 10,
    two_snapshots: false,
    zero_clusters: true,
};
const RB64_512: Variant = Variant {
    name: "rb64-512b",
    options: "compat=1.1,cluster_size=512,refcount_bits=64",
    size: 4 << 20,
    two_snapshots: true,
    zero_clusters: true,
};

fn qemu_img_available() -> bool {
    Command::new("qemu-img")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn qemu_io_available() -> bool {
    Command::new("qemu-io")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// A fresh image of `options` and `size`, with `qemu_io` commands run on it, as bytes.
fn qemu_image(options: &str, size: u64, qemu_io: &[String]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("base.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", options])
        .arg(&path)
        .arg(size.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "qemu-img create -o {options} failed");
    if !qemu_io.is_empty() {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "qcow2"]);
        for c in qemu_io {
            cmd.arg("-c").arg(c);
        }
        let out = cmd.arg(&path).output().unwrap();
        assert!(
            out.status.success(),
            "qemu-io {qemu_io:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::read(&path).unwrap()
}

fn cluster_size(bytes: &[u8]) -> u64 {
    Qcow2::open(MemIo::from_bytes(bytes.to_vec()), false)
        .unwrap()
        .cluster_size()
}

fn write_guest(io: &MemIo, offset: u64, data: &[u8]) {
    let image = Qcow2::open(io.clone(), true).unwrap();
    Qcow2Disk::new(image, None).write(offset, data).unwrap();
}

/// Setup: data written by qemu-io (plain, compressed and zero clusters, two L2 regions), then
/// through the crate: a throw-away snapshot, copy-on-write over it, `s1`, more writes, the
/// throw-away snapshot deleted (leaving holes inside the file for the operation under test to
/// reuse), and optionally `s2` with more writes after it.
fn setup(v: Variant) -> Vec<u8> {
    let probe = qemu_image(v.options, v.size, &[]);
    let cs = cluster_size(&probe);
    let mut cmds = vec![
        format!("write -P 0x11 0 {}", 3 * cs),
        format!("write -c -P 0x22 {} {}", 4 * cs, cs),
        format!("write -P 0x33 {} {}", v.size / 2, 2 * cs),
    ];
    if v.zero_clusters {
        cmds.push(format!("write -z {} {}", 6 * cs, cs));
    }
    let bytes = if qemu_io_available() {
        qemu_image(v.options, v.size, &cmds)
    } else {
        eprintln!("qemu-io not available: setup data written by the crate only");
        probe
    };
    let io = MemIo::from_bytes(bytes);
    let snap = |op: &dyn Fn(&mut Qcow2<MemIo>)| {
        let mut image = Qcow2::open(io.clone(), true).unwrap();
        op(&mut image);
    };
    snap(&|i| {
        i.create_snapshot("tmp", TIME).unwrap();
    });
    write_guest(&io, cs / 2, &vec![0x44; cs as usize]);
    snap(&|i| {
        i.create_snapshot("s1", TIME).unwrap();
    });
    write_guest(&io, 2 * cs, &vec![0x55; cs as usize + 17]);
    write_guest(&io, v.size - cs - 100, &[0x56; 300]);
    snap(&|i| i.delete_snapshot("tmp").unwrap());
    if v.two_snapshots {
        snap(&|i| {
            i.create_snapshot("s2", TIME).unwrap();
        });
        write_guest(&io, v.size / 2 + 10, &vec![0x66; 2 * cs as usize]);
    }
    let bytes = io.to_bytes();
    let report = Qcow2::open(io, false).unwrap().check().unwrap();
    assert!(
        report.is_clean(),
        "{}: setup image not clean: {:?}",
        v.name,
        report.messages
    );
    assert!(
        report.allocated_clusters > 0,
        "{}: setup wrote no data",
        v.name
    );
    bytes
}

/// What a crash state must equal on one side: snapshot list and guest views.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    snapshots: Vec<(String, String)>,
    guest: Vec<u8>,
}

fn guest_view(image: Qcow2<MemIo>) -> Vec<u8> {
    let size = image.virtual_size();
    let disk = Qcow2Disk::new(image, None);
    let mut buf = vec![0u8; size as usize];
    disk.read(0, &mut buf).unwrap();
    buf
}

/// Opens `bytes` read-only, checks it (must be clean) and takes its fingerprint.
fn fingerprint(bytes: &[u8]) -> Result<Fingerprint, String> {
    let image = Qcow2::open(MemIo::from_bytes(bytes.to_vec()), false)
        .map_err(|e| format!("open failed: {e}"))?;
    let report = image.check().map_err(|e| format!("check failed: {e}"))?;
    if !report.is_clean() {
        return Err(format!(
            "check: {} corruptions, {} leaks: {:?}",
            report.corruptions, report.leaks, report.messages
        ));
    }
    let snapshots = image
        .snapshots()
        .iter()
        .map(|s| (s.id.clone(), s.name.clone()))
        .collect();
    let size = image.virtual_size();
    let disk = Qcow2Disk::new(image, None);
    let mut guest = vec![0u8; size as usize];
    disk.read(0, &mut guest)
        .map_err(|e| format!("guest read failed: {e}"))?;
    Ok(Fingerprint { snapshots, guest })
}

/// The guest view of every snapshot (reverting a private copy to it).
fn snapshot_views(bytes: &[u8], fp: &Fingerprint) -> Result<Vec<Vec<u8>>, String> {
    fp.snapshots
        .iter()
        .map(|(id, _)| {
            let io = MemIo::from_bytes(bytes.to_vec());
            let mut image =
                Qcow2::open(io.clone(), true).map_err(|e| format!("open rw failed: {e}"))?;
            image
                .revert_snapshot(id)
                .map_err(|e| format!("revert to {id} failed: {e}"))?;
            Ok(guest_view(Qcow2::open(io, false).unwrap()))
        })
        .collect()
}

/// Runs `qemu-img check --output=json` on `bytes`; an error describes what it found.
fn qemu_check(bytes: &[u8]) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.qcow2");
    std::fs::write(&path, bytes).unwrap();
    qemu_check_path(&path)
}

fn qemu_check_path(path: &Path) -> Result<(), String> {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", "--output=json"])
        .arg(path)
        .output()
        .unwrap();
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |name: &str| -> u64 {
        let key = format!("\"{name}\":");
        json.find(&key)
            .map(|at| {
                json[at + key.len()..]
                    .trim_start()
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
                    .parse()
                    .unwrap_or(u64::MAX)
            })
            .unwrap_or(0)
    };
    let (corruptions, leaks, errors) =
        (field("corruptions"), field("leaks"), field("check-errors"));
    if !out.status.success() || corruptions != 0 || leaks != 0 || errors != 0 {
        return Err(format!(
            "qemu-img check exit {:?}, corruptions {corruptions}, leaks {leaks}, check-errors {errors}: {json} {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

fn materialize(before: &[u8], events: &[IoEvent]) -> Vec<u8> {
    snap_core::crash::materialize(before, events).unwrap()
}

fn crash_states(log: &[IoEvent], seed: &str) -> Vec<CrashState> {
    snap_core::crash::crash_states(log, seed, SUBSETS_PER_BOUNDARY)
}

#[derive(Debug)]
enum Op {
    Create(&'static str),
    Revert(&'static str),
    Delete(&'static str),
    Write { offset: u64, len: usize, byte: u8 },
}

fn run_op(io: RecordingIo<MemIo>, op: &Op) -> (snap_core::Result<()>, Vec<IoEvent>, Vec<u8>) {
    let mut image = Qcow2::open(io, true).unwrap();
    let result = match op {
        Op::Create(name) => image.create_snapshot(name, TIME).map(|_| ()),
        Op::Revert(name) => image.revert_snapshot(name),
        Op::Delete(name) => image.delete_snapshot(name),
        Op::Write { offset, len, byte } => {
            let mut disk = Qcow2Disk::new(image, None);
            let r = disk.write(*offset, &vec![*byte; *len]);
            image = disk.image;
            r
        }
    };
    let events = image.io().events();
    let after = image.into_io().into_inner().to_bytes();
    (result, events, after)
}

/// What [`explore`] covered.
struct Explored {
    states: usize,
    hole_writes: usize,
}

/// Runs `op` on `before` and checks every crash state it explores.
fn explore(v: Variant, before: &[u8], op: &Op) -> Explored {
    let tag = format!("{} {op:?}", v.name);
    let (result, log, after) = run_op(RecordingIo::new(MemIo::from_bytes(before.to_vec())), op);
    result.unwrap_or_else(|e| panic!("{tag}: operation failed: {e}"));
    assert_eq!(
        materialize(before, &log),
        after,
        "{tag}: replaying the log does not give the image after"
    );

    // The commit structure the claim relies on: the header is only ever changed by single
    // 512-byte writes at offset 0, each alone between two flushes.
    let cs = cluster_size(before);
    for (i, e) in log.iter().enumerate() {
        if let IoEvent::Write { offset, data } = e {
            if *offset < cs {
                assert!(
                    *offset == 0 && data.len() == 512,
                    "{tag}: write of {} bytes at {offset:#x} inside the header cluster (log: {})",
                    data.len(),
                    describe(&log)
                );
                assert!(
                    i > 0
                        && matches!(log[i - 1], IoEvent::Flush)
                        && matches!(log.get(i + 1), Some(IoEvent::Flush)),
                    "{tag}: header write {i} is not alone between flushes (log: {})",
                    describe(&log)
                );
            }
        }
    }

    let sides = Sides::new(&tag, before, &after);
    let inside = log
        .iter()
        .filter(|e| matches!(e, IoEvent::Write { offset, .. } if *offset != 0 && *offset < before.len() as u64))
        .count();
    let states = crash_states(&log, &tag);
    // Identical images (a prefix just before and just after a flush, an empty subset) are judged
    // once: hash of the bytes -> (is the new side, deep checks done).
    let mut judged: HashMap<u64, (bool, bool)> = HashMap::new();
    let (mut old_side, mut new_side, mut qemu_runs) = (0usize, 0usize, 0usize);
    for state in &states {
        let bytes = materialize(before, &state.events);
        let mut h = std::collections::hash_map::DefaultHasher::new();
        bytes.hash(&mut h);
        let key = h.finish();
        let is_new = match judged.get(&key) {
            Some(&(is_new, deep_done)) if deep_done || !state.boundary => is_new,
            _ => {
                if state.boundary {
                    qemu_runs += 1;
                }
                let is_new = sides.judge(&bytes, state.boundary).unwrap_or_else(|e| {
                    panic!(
                        "{tag}: crash state [{}] (log: {}): {e}",
                        state.label,
                        describe(&log)
                    )
                });
                judged.insert(key, (is_new, state.boundary));
                is_new
            }
        };
        if is_new {
            new_side += 1;
        } else {
            old_side += 1;
        }
    }
    // Recovery: the old image as a crash just before the header switch leaves it (everything
    // staged, nothing switched) must take the same operation again and give the new image.
    let header = log
        .iter()
        .position(|e| matches!(e, IoEvent::Write { offset: 0, .. }))
        .expect("no header write");
    let leftover = materialize(before, &log[..header]);
    assert!(
        !sides.judge(&leftover, false).unwrap(),
        "{tag}: the header write is not what switches sides"
    );
    let (result, _, redone) = run_op(RecordingIo::new(MemIo::from_bytes(leftover)), op);
    result.unwrap_or_else(|e| panic!("{tag}: operation on the crash leftover failed: {e}"));
    assert!(
        sides
            .judge(&redone, true)
            .unwrap_or_else(|e| panic!("{tag}: operation redone on the crash leftover: {e}")),
        "{tag}: operation redone on the crash leftover gave the old image"
    );
    eprintln!(
        "{tag}: {} events ({inside} writes into holes of the old file), {} crash states checked \
         ({} distinct images; {old_side} old, {new_side} new), {qemu_runs} given to qemu-img check",
        log.len(),
        states.len(),
        judged.len()
    );
    assert!(!states.is_empty());
    assert!(old_side > 0 && new_side > 0, "{tag}: one side never seen");
    Explored {
        states: states.len(),
        hole_writes: inside,
    }
}

/// The two images a crash may leave, and the oracle deciding which one a crash state is.
struct Sides {
    before: Fingerprint,
    after: Fingerprint,
    views_before: Vec<Vec<u8>>,
    views_after: Vec<Vec<u8>>,
}

impl Sides {
    fn new(tag: &str, before: &[u8], after: &[u8]) -> Self {
        let fp_before = fingerprint(before).unwrap_or_else(|e| panic!("{tag}: before: {e}"));
        let fp_after = fingerprint(after).unwrap_or_else(|e| panic!("{tag}: after: {e}"));
        assert_ne!(
            fp_before, fp_after,
            "{tag}: the operation changed nothing visible; the test would prove nothing"
        );
        qemu_check(before).unwrap_or_else(|e| panic!("{tag}: before: {e}"));
        qemu_check(after).unwrap_or_else(|e| panic!("{tag}: after: {e}"));
        Sides {
            views_before: snapshot_views(before, &fp_before).unwrap(),
            views_after: snapshot_views(after, &fp_after).unwrap(),
            before: fp_before,
            after: fp_after,
        }
    }

    /// Ok(false) for exactly the old image, Ok(true) for exactly the new one. `deep` adds every
    /// snapshot's guest view and `qemu-img check`.
    fn judge(&self, bytes: &[u8], deep: bool) -> Result<bool, String> {
        let fp = fingerprint(bytes)?;
        let is_new = if fp == self.before {
            false
        } else if fp == self.after {
            true
        } else {
            return Err(format!(
                "neither the old nor the new image (snapshots {:?}; old {:?}, new {:?}; guest view \
                 equals old: {}, equals new: {})",
                fp.snapshots,
                self.before.snapshots,
                self.after.snapshots,
                fp.guest == self.before.guest,
                fp.guest == self.after.guest
            ));
        };
        if deep {
            let views = snapshot_views(bytes, &fp)?;
            let want = if is_new {
                &self.views_after
            } else {
                &self.views_before
            };
            if &views != want {
                return Err(format!(
                    "a snapshot's guest view differs from the {} image's",
                    if is_new { "new" } else { "old" }
                ));
            }
            qemu_check(bytes)?;
        }
        Ok(is_new)
    }
}

fn explore_variant(v: Variant) {
    if !qemu_img_available() {
        eprintln!(
            "qemu-img not available; skipping crash-state test {}",
            v.name
        );
        return;
    }
    let start = std::time::Instant::now();
    let before = setup(v);
    let cs = cluster_size(&before);
    let mut ops = vec![
        Op::Create("new"),
        Op::Revert("s1"),
        Op::Delete("s1"),
        // Unaligned, over shared, compressed and zero clusters.
        Op::Write {
            offset: cs + 7,
            len: (6 * cs) as usize,
            byte: 0x77,
        },
        // A region no L2 table of the active image maps yet (small clusters) or a shared one.
        Op::Write {
            offset: v.size * 3 / 4 + 3,
            len: (2 * cs) as usize,
            byte: 0x78,
        },
    ];
    if v.two_snapshots {
        ops.push(Op::Delete("s2"));
        ops.push(Op::Revert("s2"));
    }
    let (mut total, mut hole_writes) = (0, 0);
    for op in &ops {
        let n = explore(v, &before, op);
        assert!(n.states > 0);
        total += n.states;
        hole_writes += n.hole_writes;
    }
    // The setup deleted a snapshot so the file has holes: crash states with metadata written
    // into them (not only appended) must have been among those explored.
    assert!(
        hole_writes > 0,
        "{}: no operation reused a hole; the hole path went untested",
        v.name
    );
    eprintln!(
        "{}: {total} crash states over {} operations in {:.1?}",
        v.name,
        ops.len(),
        start.elapsed()
    );
}

#[test]
fn crash_states_v3_64k_clusters() {
    explore_variant(V3_64K);
}

#[test]
fn crash_states_v2_512b_clusters() {
    explore_variant(V2_512);
}

#[test]
fn crash_states_extended_l2() {
    explore_variant(EXT_L2);
}

#[test]
fn crash_states_refcount_bits_2() {
    explore_variant(RB2_4K);
}

#[test]
fn crash_states_512b_clusters_refcount_bits_64_multi_cluster_tables() {
    explore_variant(RB64_512);
}

/// Runs an operation that must be refused; the file must be byte-identical afterwards and no
/// write may have landed inside the old file.
fn assert_refused(tag: &str, before: &[u8], op: &Op, kind: ErrorKind) {
    let (result, log, after) = run_op(RecordingIo::new(MemIo::from_bytes(before.to_vec())), op);
    let err = match result {
        Ok(()) => panic!("{tag}: {op:?} succeeded but must be refused"),
        Err(e) => e,
    };
    assert_eq!(err.kind(), kind, "{tag}: {op:?} refused with {err}");
    assert!(after == before, "{tag}: refused {op:?} changed the file");
    for e in &log {
        if let IoEvent::Write { offset, data } = e {
            assert!(
                *offset >= before.len() as u64,
                "{tag}: refused {op:?} wrote {} bytes at {offset:#x}, inside the old file of {} \
                 bytes (log: {})",
                data.len(),
                before.len(),
                describe(&log)
            );
        }
    }
    // Every prefix of a refused operation's log is the old image too (appended data only).
    for end in 0..=log.len() {
        let bytes = materialize(before, &log[..end]);
        let fp = fingerprint(&bytes).unwrap_or_else(|e| panic!("{tag}: {op:?} prefix {end}: {e}"));
        assert_eq!(
            fp,
            fingerprint(before).unwrap(),
            "{tag}: {op:?} prefix {end}"
        );
    }
    eprintln!(
        "{tag}: {op:?} refused ({err}); {} events, none inside the old file",
        log.len()
    );
}

#[test]
fn refused_operations_leave_the_file_identical() {
    if !qemu_img_available() {
        eprintln!("qemu-img not available; skipping refused-operation test");
        return;
    }
    let before = setup(V3_64K);
    assert_refused("v3-64k", &before, &Op::Create("s1"), ErrorKind::Exists);
    assert_refused("v3-64k", &before, &Op::Delete("nope"), ErrorKind::NotFound);
    assert_refused("v3-64k", &before, &Op::Revert("nope"), ErrorKind::NotFound);

    // refcount_bits=1 with allocated data: a snapshot needs refcount 2.
    let rb1 = if qemu_io_available() {
        qemu_image(
            "compat=1.1,cluster_size=4096,refcount_bits=1",
            256 << 10,
            &["write -P 0x11 0 20480".to_string()],
        )
    } else {
        let bytes = qemu_image(
            "compat=1.1,cluster_size=4096,refcount_bits=1",
            256 << 10,
            &[],
        );
        let io = MemIo::from_bytes(bytes);
        write_guest(&io, 0, &[0x11; 20480]);
        io.to_bytes()
    };
    qemu_check(&rb1).unwrap();
    assert_refused("rb1-4k", &rb1, &Op::Create("x"), ErrorKind::Overflow);

    // refcount_bits=2 with clusters already at 3 (two snapshots of unchanged data).
    let io = MemIo::from_bytes(qemu_image(
        "compat=1.1,cluster_size=4096,refcount_bits=2",
        256 << 10,
        &[],
    ));
    write_guest(&io, 0, &[0x11; 20480]);
    for name in ["a", "b"] {
        Qcow2::open(io.clone(), true)
            .unwrap()
            .create_snapshot(name, TIME)
            .unwrap();
    }
    write_guest(&io, 4096, &[0x22; 100]);
    let rb2 = io.to_bytes();
    qemu_check(&rb2).unwrap();
    assert_refused("rb2-4k", &rb2, &Op::Create("c"), ErrorKind::Overflow);
}

/// The oracle must be able to fail: states a crash cannot produce under the claimed ordering (the
/// header switched while some structure written before it is missing) are rejected, by our check
/// or the side comparison, and the header-only one by `qemu-img check` as well.
#[test]
fn oracle_rejects_states_that_break_the_write_order() {
    if !qemu_img_available() {
        eprintln!("qemu-img not available; skipping oracle self-test");
        return;
    }
    let before = setup(V2_512);
    for op in [
        Op::Create("new"),
        Op::Delete("s1"),
        Op::Write {
            offset: 700,
            len: 2000,
            byte: 0x99,
        },
    ] {
        let tag = format!("v2-512b {op:?}");
        let (result, log, after) = run_op(RecordingIo::new(MemIo::from_bytes(before.clone())), &op);
        result.unwrap();
        let sides = Sides::new(&tag, &before, &after);
        let header = log
            .iter()
            .position(|e| matches!(e, IoEvent::Write { offset: 0, .. }))
            .expect("no header write");
        let header_only = materialize(&before, &log[header..=header]);
        assert!(
            sides.judge(&header_only, false).is_err(),
            "{tag}: header switched with nothing behind it was accepted"
        );
        assert!(
            qemu_check(&header_only).is_err(),
            "{tag}: qemu-img check accepts the header switched with nothing behind it"
        );
        let pre: Vec<usize> = (0..header)
            .filter(|&i| matches!(log[i], IoEvent::Write { .. }))
            .collect();
        let mut rejected = 0;
        for &drop in &pre {
            let events: Vec<IoEvent> = log[..=header]
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != drop)
                .map(|(_, e)| e.clone())
                .collect();
            if sides.judge(&materialize(&before, &events), false).is_err() {
                rejected += 1;
            }
        }
        eprintln!(
            "{tag}: header write with one of {} earlier writes missing: {rejected} rejected",
            pre.len()
        );
        assert!(
            rejected > 0,
            "{tag}: no reordering across the pre-header flush is detected"
        );
    }
}
