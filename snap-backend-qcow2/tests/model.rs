//! Property tests: random sequences of guest writes and snapshot create / revert / delete on
//! in-memory images (made by `qemu-img create` in several variants), checked after every step
//! against a model of the guest view of the current state and of every snapshot, and with the
//! image's own refcount check.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::OnceLock;

use proptest::prelude::*;
use snap_backend_qcow2::{Qcow2, Qcow2Disk, SnapshotTime};
use snap_core::io::MemIo;
use snap_core::{BlockIo, ErrorKind};

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: usize, byte: u8 },
    Create(u8),
    Revert(u8),
    Delete(u8),
}

fn op_strategy(size: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..size, 1usize..20_000, any::<u8>()).prop_map(move |(offset, len, byte)| {
            let len = len.min((size - offset) as usize).max(1);
            Op::Write { offset, len, byte }
        }),
        2 => (0u8..4).prop_map(Op::Create),
        1 => (0u8..4).prop_map(Op::Revert),
        1 => (0u8..4).prop_map(Op::Delete),
    ]
}

/// A fresh image made by qemu-img with `options`, as bytes (made once per variant).
fn image_bytes(options: &str, size: u64) -> Option<Vec<u8>> {
    static CACHE: OnceLock<std::sync::Mutex<BTreeMap<String, Vec<u8>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = format!("{options}/{size}");
    if let Some(b) = cache.lock().unwrap().get(&key) {
        return Some(b.clone());
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", options])
        .arg(&path)
        .arg(size.to_string())
        .status()
        .ok()?;
    assert!(status.success(), "qemu-img create -o {options} failed");
    let bytes = std::fs::read(&path).unwrap();
    cache.lock().unwrap().insert(key, bytes.clone());
    Some(bytes)
}

fn guest_view(io: &MemIo) -> Vec<u8> {
    let image = Qcow2::open(io.clone(), false).unwrap();
    let size = image.virtual_size();
    let disk = Qcow2Disk::new(image, None);
    let mut buf = vec![0u8; size as usize];
    disk.read(0, &mut buf).unwrap();
    buf
}

fn snapshot_view(io: &MemIo, name: &str) -> Vec<u8> {
    let copy = MemIo::from_bytes(io.to_bytes());
    let mut image = Qcow2::open(copy.clone(), true).unwrap();
    image.revert_snapshot(name).unwrap();
    guest_view(&copy)
}

fn run_model(options: &str, size: u64, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let Some(bytes) = image_bytes(options, size) else {
        eprintln!("qemu-img not available; skipping");
        return Ok(());
    };
    let io = MemIo::from_bytes(bytes);
    let mut current = vec![0u8; size as usize];
    let mut snapshots: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let time = SnapshotTime {
        sec: 1_700_000_000,
        nsec: 0,
    };
    for op in ops {
        let before = io.to_bytes();
        let result = match &op {
            Op::Write { offset, len, byte } => {
                let image = Qcow2::open(io.clone(), true).unwrap();
                let mut disk = Qcow2Disk::new(image, None);
                disk.write(*offset, &vec![*byte; *len]).map(|_| ())
            }
            Op::Create(n) => Qcow2::open(io.clone(), true)
                .unwrap()
                .create_snapshot(&format!("s{n}"), time)
                .map(|_| ()),
            Op::Revert(n) => Qcow2::open(io.clone(), true)
                .unwrap()
                .revert_snapshot(&format!("s{n}")),
            Op::Delete(n) => Qcow2::open(io.clone(), true)
                .unwrap()
                .delete_snapshot(&format!("s{n}")),
        };
        match (&op, result) {
            (Op::Write { offset, len, byte }, Ok(())) => {
                current[*offset as usize..*offset as usize + len].fill(*byte);
            }
            (Op::Create(n), Ok(())) => {
                prop_assert!(
                    !snapshots.contains_key(&format!("s{n}")),
                    "duplicate create succeeded"
                );
                snapshots.insert(format!("s{n}"), current.clone());
            }
            (Op::Revert(n), Ok(())) => {
                current = snapshots
                    .get(&format!("s{n}"))
                    .cloned()
                    .expect("revert of unknown snapshot succeeded");
            }
            (Op::Delete(n), Ok(())) => {
                prop_assert!(
                    snapshots.remove(&format!("s{n}")).is_some(),
                    "delete of unknown snapshot succeeded"
                );
            }
            (op, Err(e)) => {
                let expected = match op {
                    Op::Create(n) => {
                        snapshots.contains_key(&format!("s{n}")) && e.kind() == ErrorKind::Exists
                    }
                    Op::Revert(n) | Op::Delete(n) => {
                        !snapshots.contains_key(&format!("s{n}")) && e.kind() == ErrorKind::NotFound
                    }
                    Op::Write { .. } => false,
                } || e.kind() == ErrorKind::Overflow;
                prop_assert!(expected, "{op:?} failed unexpectedly: {e}");
                prop_assert!(io.to_bytes() == before, "refused {op:?} changed the image");
            }
        }
        let report = Qcow2::open(io.clone(), false).unwrap().check().unwrap();
        prop_assert!(report.is_clean(), "after {op:?}: {:?}", report.messages);
        prop_assert!(
            guest_view(&io) == current,
            "guest view differs after {op:?}"
        );
    }
    for (name, view) in &snapshots {
        prop_assert!(&snapshot_view(&io, name) == view, "snapshot {name} changed");
    }
    // qemu-img agrees the final image is clean.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("final.qcow2");
    std::fs::write(&path, io.to_bytes()).unwrap();
    let out = Command::new("qemu-img")
        .args(["check", "-q"])
        .arg(&path)
        .output()
        .unwrap();
    prop_assert!(
        out.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = io.len();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn v3_4k_clusters(ops in prop::collection::vec(op_strategy(256 << 10), 1..16)) {
        run_model("compat=1.1,cluster_size=4096", 256 << 10, ops)?;
    }

    #[test]
    fn v2_512b_clusters(ops in prop::collection::vec(op_strategy(64 << 10), 1..16)) {
        run_model("compat=0.10,cluster_size=512", 64 << 10, ops)?;
    }

    #[test]
    fn extended_l2_64k(ops in prop::collection::vec(op_strategy(1 << 20), 1..12)) {
        run_model("compat=1.1,extended_l2=on", 1 << 20, ops)?;
    }

    /// 512-byte clusters and 64-bit refcounts: multi-cluster L1 and refcount tables, so holes and
    /// runs of holes are both allocated within one transaction.
    #[test]
    fn tiny_clusters_multi_cluster_tables(ops in prop::collection::vec(op_strategy(4 << 20), 1..12)) {
        run_model("compat=1.1,cluster_size=512,refcount_bits=64", 4 << 20, ops)?;
    }

    #[test]
    fn refcount_bits_2(ops in prop::collection::vec(op_strategy(128 << 10), 1..16)) {
        run_model("compat=1.1,cluster_size=4096,refcount_bits=2", 128 << 10, ops)?;
    }
}

/// Space does not creep: many create / revert / delete cycles leave the refcount table and the
/// file the size they settle at after the first cycles (freed metadata is reused, the table is
/// sized from the blocks in use).
#[test]
fn repeated_operations_do_not_grow_the_image() {
    let Some(bytes) = image_bytes("compat=1.1,cluster_size=4096", 1 << 20) else {
        return;
    };
    let io = MemIo::from_bytes(bytes);
    {
        let image = Qcow2::open(io.clone(), true).unwrap();
        let mut disk = Qcow2Disk::new(image, None);
        disk.write(0, &vec![7u8; 256 << 10]).unwrap();
    }
    let time = SnapshotTime {
        sec: 1_700_000_000,
        nsec: 0,
    };
    let cycle = || {
        Qcow2::open(io.clone(), true)
            .unwrap()
            .create_snapshot("s", time)
            .unwrap();
        Qcow2::open(io.clone(), true)
            .unwrap()
            .revert_snapshot("s")
            .unwrap();
        Qcow2::open(io.clone(), true)
            .unwrap()
            .delete_snapshot("s")
            .unwrap();
    };
    for _ in 0..5 {
        cycle();
    }
    let settled_len = io.len().unwrap();
    let settled_rt = Qcow2::open(io.clone(), false)
        .unwrap()
        .header()
        .refcount_table_clusters;
    for _ in 0..60 {
        cycle();
    }
    let image = Qcow2::open(io.clone(), false).unwrap();
    assert!(image.check().unwrap().is_clean());
    assert_eq!(
        image.header().refcount_table_clusters,
        settled_rt,
        "refcount table grew"
    );
    let len = io.len().unwrap();
    assert!(
        len <= settled_len + 8 * 4096,
        "file grew from {settled_len} to {len} bytes over 60 cycles"
    );
}
