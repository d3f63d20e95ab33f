//! Criterion benchmarks for the hot loops of the native qcow2 code.
//!
//! - `refcount`: `RefcountGeometry::get` + `set` over every entry of one 64 KiB refcount block,
//!   for refcount widths 1, 4, 16 and 64 bits (refcount_order 0, 2, 4, 6).
//! - `l2_walk`: every entry of one 64 KiB L2 table (standard: 8192 entries, extended: 4096)
//!   read with `L2Geometry::entry`, decoded with `mapping` and resolved with
//!   `referenced_clusters`; the table mixes normal, zero, compressed, unallocated (and, for
//!   extended L2, partly allocated) entries built by hand from the documented bit layouts.
//! - `snapshot_ops`: `Qcow2::open`; `create_snapshot` + `delete_snapshot` as a pair, and each
//!   alone; `revert_snapshot` to a snapshot made in setup; and `check` — on real files made by
//!   `qemu-img create -f qcow2 -o preallocation=metadata X 16G` (sparse, 262144 referenced
//!   64 KiB clusters, in a temporary directory). Each mutating iteration runs on a fresh sparse
//!   copy made and synced outside the timing. The operations flush (fsync) as they would in
//!   production, so these figures include the disk's sync latency. The group is skipped, with a
//!   note, when `qemu-img` is not installed.
//!
//! These are measurements only: nothing here asserts on time.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use criterion::{
    BatchSize, BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use snap_backend_qcow2::format::refcount::RefcountGeometry;
use snap_backend_qcow2::format::table::{COMPRESSED, COPIED, L2Geometry, ZERO};
use snap_backend_qcow2::{Qcow2, SnapshotTime};
use snap_core::BlockIo;
use snap_core::io::FileIo;

/// 64 KiB clusters, QEMU's default.
const CLUSTER_BITS: u32 = 16;
const CLUSTER_SIZE: usize = 1 << CLUSTER_BITS;

// ---------------------------------------------------------------------------------------------
// refcount

fn refcount(c: &mut Criterion) {
    let mut group = c.benchmark_group("refcount");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for order in [0u32, 2, 4, 6] {
        let g = RefcountGeometry {
            cluster_bits: CLUSTER_BITS,
            refcount_order: order,
        };
        let entries = g.block_entries() as usize;
        let max = g.max_refcount();
        // Start from a block of varied, valid refcounts.
        let mut block = vec![0u8; CLUSTER_SIZE];
        for i in 0..entries {
            g.set(&mut block, i, (i as u64).wrapping_mul(0x9e37_79b9) & max)
                .unwrap();
        }
        group.throughput(Throughput::Elements(entries as u64));
        group.bench_function(
            BenchmarkId::new("get_set", format!("order{order}_{}bit", g.bits())),
            |b| {
                b.iter(|| {
                    let block = black_box(block.as_mut_slice());
                    for i in 0..entries {
                        let v = g.get(block, i).unwrap();
                        g.set(block, i, v.wrapping_add(1) & max).unwrap();
                    }
                });
            },
        );
    }
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// l2_walk

/// Standard L2 entry layout (qcow2 spec): bit 63 COPIED, bit 62 compressed; for a normal
/// cluster bits 9..=55 hold the host offset and bit 0 means "reads as zeroes"; for a compressed
/// cluster the low `62 - (cluster_bits - 8)` bits hold the byte offset and the next
/// `cluster_bits - 8` bits the number of additional 512-byte sectors.
fn compressed_descriptor(offset: u64, sectors: u64) -> u64 {
    let offset_bits = 62 - (CLUSTER_BITS - 8);
    COMPRESSED | ((sectors - 1) << offset_bits) | offset
}

/// One 64 KiB L2 table with a fixed mix of entry kinds. Returns the table and its entry count.
fn build_l2(extended: bool) -> (Vec<u8>, usize) {
    let entry_size = if extended { 16 } else { 8 };
    let entries = CLUSTER_SIZE / entry_size;
    let mut table = vec![0u8; CLUSTER_SIZE];
    let cluster = CLUSTER_SIZE as u64;
    for i in 0..entries {
        let host = (0x10_0000 + i as u64) * cluster; // cluster aligned, well inside 56 bits
        let compressed = compressed_descriptor(0x4000_0000 + i as u64 * 1234, 1 + (i as u64 % 128));
        // Extended L2 bitmap: low 32 bits "allocated", high 32 bits "reads as zeroes".
        let all_alloc = 0xffff_ffff_u64;
        let all_zero = 0xffff_ffff_u64 << 32;
        let (raw, bitmap) = match (i % 8, extended) {
            // Normal data clusters (most of a used disk).
            (0..=2, false) => (COPIED | host, 0),
            (0..=2, true) => (COPIED | host, all_alloc),
            // Half allocated, half zero (extended) / a shared normal cluster (standard).
            (3, false) => (host, 0),
            (3, true) => (COPIED | host, 0xffff_0000_0000_ffff),
            // Zero with a preallocated host cluster.
            (4, false) => (COPIED | host | ZERO, 0),
            (4, true) => (COPIED | host, all_zero),
            // Zero without a host cluster.
            (5, false) => (ZERO, 0),
            (5, true) => (0, all_zero),
            // Compressed (never COPIED, bitmap 0).
            (6, _) => (compressed, 0),
            // Unallocated.
            _ => (0, 0),
        };
        let at = i * entry_size;
        table[at..at + 8].copy_from_slice(&raw.to_be_bytes());
        if extended {
            table[at + 8..at + 16].copy_from_slice(&bitmap.to_be_bytes());
        }
    }
    (table, entries)
}

fn l2_walk(c: &mut Criterion) {
    let mut group = c.benchmark_group("l2_walk");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for extended in [false, true] {
        let g = L2Geometry {
            cluster_bits: CLUSTER_BITS,
            extended,
        };
        let (table, entries) = build_l2(extended);
        // Every entry must decode (the bench would otherwise measure error paths).
        for i in 0..entries {
            g.mapping(g.entry(&table, i).unwrap()).unwrap();
        }
        group.throughput(Throughput::Elements(entries as u64));
        let name = if extended { "extended" } else { "standard" };
        group.bench_function(BenchmarkId::new("mapping_referenced", name), |b| {
            b.iter(|| {
                let table = black_box(table.as_slice());
                let mut clusters = 0u64;
                for i in 0..entries {
                    let m = g.mapping(g.entry(table, i).unwrap()).unwrap();
                    if let Some((_, n)) = g.referenced_clusters(m) {
                        clusters += n;
                    }
                }
                clusters
            });
        });
    }
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// snapshot_ops

fn qemu_img_available() -> bool {
    Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `qemu-img create -f qcow2 -o preallocation=metadata PATH 16G`.
fn make_image(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let out = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
        ])
        .arg(&path)
        .arg("16G")
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

fn open_rw(path: &Path) -> Qcow2<FileIo> {
    Qcow2::open(FileIo::open(path, true).unwrap(), true).unwrap()
}

/// A fresh sparse copy of `base` at `work`, opened writable, with the copy already synced so
/// the measured operation's flushes only pay for its own writes.
fn fresh_copy(base: &Path, work: &Path) -> Qcow2<FileIo> {
    match std::fs::remove_file(work) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("remove {}: {e}", work.display()),
    }
    let status = Command::new("cp")
        .arg("--sparse=always")
        .arg(base)
        .arg(work)
        .status()
        .expect("run cp");
    assert!(status.success(), "cp --sparse=always failed");
    let img = open_rw(work);
    img.io().flush().unwrap();
    img
}

fn snapshot_ops(c: &mut Criterion) {
    if !qemu_img_available() {
        println!("snapshot_ops: qemu-img not found; skipping this group");
        return;
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    // `plain`: no snapshots. `snapped`: one snapshot named "base" of the same disk.
    let plain = make_image(dir.path(), "plain.qcow2");
    let snapped = make_image(dir.path(), "snapped.qcow2");
    open_rw(&snapped)
        .create_snapshot("base", SnapshotTime::now())
        .unwrap();
    let work = dir.path().join("work.qcow2");
    println!(
        "snapshot_ops: 16G preallocation=metadata images (262144 referenced clusters) in {}",
        dir.path().display()
    );

    let mut group = c.benchmark_group("snapshot_ops");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));

    group.bench_function("open", |b| {
        b.iter(|| black_box(open_rw(&snapped)));
    });

    // Every mutating iteration gets its own fresh copy (made and synced outside the timing):
    // repeated transactions on one file do not return it to the same shape (each grows the
    // refcount table by a cluster), which would skew the figures and eventually fail.
    group.bench_function("create_delete_pair", |b| {
        b.iter_batched(
            || fresh_copy(&plain, &work),
            |mut img| {
                img.create_snapshot("tmp", SnapshotTime::now()).unwrap();
                img.delete_snapshot("tmp").unwrap();
                img
            },
            BatchSize::PerIteration,
        );
    });
    group.bench_function("create", |b| {
        b.iter_batched(
            || fresh_copy(&plain, &work),
            |mut img| {
                img.create_snapshot("tmp", SnapshotTime::now()).unwrap();
                img
            },
            BatchSize::PerIteration,
        );
    });
    group.bench_function("delete", |b| {
        b.iter_batched(
            || fresh_copy(&snapped, &work),
            |mut img| {
                img.delete_snapshot("base").unwrap();
                img
            },
            BatchSize::PerIteration,
        );
    });
    group.bench_function("revert", |b| {
        b.iter_batched(
            || fresh_copy(&snapped, &work),
            |mut img| {
                img.revert_snapshot("base").unwrap();
                img
            },
            BatchSize::PerIteration,
        );
    });

    for (name, path) in [
        ("check_no_snapshot", &plain),
        ("check_one_snapshot", &snapped),
    ] {
        let img = open_rw(path);
        group.bench_function(name, |b| {
            b.iter(|| black_box(img.check().unwrap()));
        });
    }
    group.finish();
}

criterion_group!(benches, refcount, l2_walk, snapshot_ops);
criterion_main!(benches);
