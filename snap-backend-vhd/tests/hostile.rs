//! Hostile and broken images, and the file-level operations' contracts: clear errors of the
//! right kind, nothing written (byte-identical files), no panic.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::path::{Path, PathBuf};

use snap_backend_vhd::format::footer::Footer;
use snap_backend_vhd::format::header::DynamicHeader;
use snap_backend_vhd::format::{checksum, locator::ParentPolicy};
use snap_backend_vhd::{
    NO_INTERNAL, VhdBackend, check_path, create_dynamic, create_external, delete_layer, list_path,
    open_chain, revert_to_layer,
};
use snap_core::lock::LockMode;
use snap_core::{CreateRequest, DiskBackend, ErrorKind, Target};

const STRICT: ParentPolicy = ParentPolicy::ChildFolder;

fn write_guest(path: &Path, offset: u64, data: &[u8]) {
    let mut chain = open_chain(path, STRICT, |l, _| {
        if l == 0 {
            LockMode::Exclusive
        } else {
            LockMode::Shared
        }
    })
    .unwrap();
    chain.write(offset, data).unwrap();
}

fn view(path: &Path, policy: ParentPolicy) -> Vec<u8> {
    let chain = open_chain(path, policy, |_, _| LockMode::Shared).unwrap();
    let mut buf = vec![0u8; chain.size() as usize];
    chain.read(0, &mut buf).unwrap();
    buf
}

fn base(dir: &Path) -> PathBuf {
    let p = dir.join("base.vhd");
    create_dynamic(&p, 8 << 20, None).unwrap();
    write_guest(&p, 0, &[0xab; 70_000]);
    p
}

/// Patches a field of the structure at `at` (len bytes) and fixes its checksum at `sum_at`.
fn patch(path: &Path, at: usize, len: usize, sum_at: usize, field: usize, value: &[u8]) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at + field..at + field + value.len()].copy_from_slice(value);
    let sum = checksum(&bytes[at..at + len], sum_at);
    bytes[at + sum_at..at + sum_at + 4].copy_from_slice(&sum.to_be_bytes());
    std::fs::write(path, bytes).unwrap();
}

fn all_ops_refused(image: &Path, layer: Option<&Path>, kind: ErrorKind) {
    let before = std::fs::read(image).unwrap();
    let err = list_path(image, STRICT).unwrap_err();
    assert_eq!(err.kind(), kind, "{err}");
    let err = check_path(image, STRICT).unwrap_err();
    assert_eq!(err.kind(), kind, "{err}");
    let err = create_external(image, "s", None, STRICT).unwrap_err();
    assert_eq!(err.kind(), kind, "{err}");
    if let Some(layer) = layer {
        let err = delete_layer(image, layer, STRICT).unwrap_err();
        assert_eq!(err.kind(), kind, "{err}");
        let err = revert_to_layer(image, layer, STRICT).unwrap_err();
        assert_eq!(err.kind(), kind, "{err}");
    }
    assert!(std::fs::read(image).unwrap() == before, "refused op wrote");
    let overlay = snap_backend_vhd::default_overlay_path(image, "s");
    assert!(!overlay.exists());
}

#[test]
fn bad_checksums_are_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let p = base(dir.path());
    let len = std::fs::metadata(&p).unwrap().len() as usize;
    // Dynamic header checksum.
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[512 + 100] ^= 1;
    std::fs::write(&p, &bytes).unwrap();
    all_ops_refused(&p, None, ErrorKind::Corrupt);
    // Both footers damaged.
    bytes[512 + 100] ^= 1;
    bytes[20] ^= 1;
    bytes[len - 512 + 20] ^= 1;
    std::fs::write(&p, &bytes).unwrap();
    all_ops_refused(&p, None, ErrorKind::Corrupt);
}

#[test]
fn trailing_footer_damaged_falls_back_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let p = base(dir.path());
    let expected = view(&p, STRICT);
    let len = std::fs::metadata(&p).unwrap().len() as usize;
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[len - 512 + 30] ^= 0xff;
    std::fs::write(&p, &bytes).unwrap();
    assert!(view(&p, STRICT) == expected);
    let report = check_path(&p, STRICT).unwrap();
    assert!(!report.is_clean());
    assert!(
        report.messages[0].contains("copy at offset 0"),
        "{report:?}"
    );
    let err = create_external(&p, "s", None, STRICT);
    // Creating a child only reads the parent: allowed. Writing to it is not.
    assert!(err.is_ok());
    let err = open_chain(&p, STRICT, |_, _| LockMode::Exclusive).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(err.to_string().contains("refusing to write"), "{err}");
}

#[test]
fn bat_entry_past_end_and_huge_table() {
    let dir = tempfile::tempdir().unwrap();
    let p = base(dir.path());
    let bytes = std::fs::read(&p).unwrap();
    let header = DynamicHeader::parse(&bytes[512..1536]).unwrap();
    let bat = header.table_offset as usize;
    // Entry 1 far past the end.
    let mut bad = bytes.clone();
    bad[bat + 4..bat + 8].copy_from_slice(&0x0100_0000u32.to_be_bytes());
    std::fs::write(&p, &bad).unwrap();
    all_ops_refused(&p, None, ErrorKind::Corrupt);
    // Entry pointing into the header.
    let mut bad = bytes.clone();
    bad[bat..bat + 4].copy_from_slice(&1u32.to_be_bytes());
    std::fs::write(&p, &bad).unwrap();
    all_ops_refused(&p, None, ErrorKind::Corrupt);
    // Max table entries beyond the file / beyond any sane size.
    std::fs::write(&p, &bytes).unwrap();
    patch(&p, 512, 1024, 36, 28, &0x0010_0000u32.to_be_bytes());
    all_ops_refused(&p, None, ErrorKind::Corrupt);
    std::fs::write(&p, &bytes).unwrap();
    patch(&p, 512, 1024, 36, 28, &u32::MAX.to_be_bytes());
    all_ops_refused(&p, None, ErrorKind::Unsupported);
    // A footer size larger than the BAT can map.
    std::fs::write(&p, &bytes).unwrap();
    let len = bytes.len();
    let mut footer = Footer::parse(&bytes[len - 512..]).unwrap();
    footer.current_size = 1 << 30;
    let enc = footer.encode();
    let mut bad = bytes.clone();
    bad[..512].copy_from_slice(&enc);
    bad[len - 512..].copy_from_slice(&enc);
    std::fs::write(&p, &bad).unwrap();
    all_ops_refused(&p, None, ErrorKind::Corrupt);
}

#[test]
fn missing_parent_loops_and_id_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let b = base(dir.path());
    let child = create_external(&b, "s1", None, STRICT).unwrap();
    // Missing parent.
    let moved = dir.path().join("moved.vhd");
    std::fs::rename(&b, &moved).unwrap();
    all_ops_refused(&child, None, ErrorKind::NotFound);
    // A different disk under the parent's name: unique id mismatch.
    create_dynamic(&b, 8 << 20, None).unwrap();
    all_ops_refused(&child, Some(&b), ErrorKind::Corrupt);
    std::fs::remove_file(&b).unwrap();
    std::fs::rename(&moved, &b).unwrap();
    assert_eq!(list_path(&child, STRICT).unwrap().chain.len(), 1);
    // A loop: make the base a differencing child of its own child.
    {
        let layer = snap_backend_vhd::chain::open_layer(&child, LockMode::Shared).unwrap();
        let link = snap_backend_vhd::ops::parent_link(&b, &child, &layer.image, STRICT).unwrap();
        drop(layer);
        let mut base_layer = snap_backend_vhd::chain::open_layer(&b, LockMode::Exclusive).unwrap();
        base_layer.image.set_parent(&link).unwrap();
    }
    all_ops_refused(&child, Some(&b), ErrorKind::Corrupt);
    let err = list_path(&child, STRICT).unwrap_err();
    assert!(err.to_string().contains("loops"), "{err}");
}

#[test]
fn parents_outside_the_folder_need_permission() {
    let dir = tempfile::tempdir().unwrap();
    let b = base(dir.path());
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let overlay = sub.join("child.vhd");
    // Refused at create time under the strict policy (the chain could not be reopened).
    let err = create_external(&b, "s", Some(&overlay), STRICT).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert!(!overlay.exists());
    create_external(&b, "s", Some(&overlay), ParentPolicy::Anywhere).unwrap();
    write_guest_any(&overlay, 4096, &[0x11; 4096]);
    all_ops_refused(&overlay, None, ErrorKind::Unsupported);
    let err = list_path(&overlay, STRICT).unwrap_err();
    assert!(err.to_string().contains("leads out of"), "{err}");
    let listing = list_path(&overlay, ParentPolicy::Anywhere).unwrap();
    assert_eq!(listing.chain.len(), 1);
    let v = view(&overlay, ParentPolicy::Anywhere);
    assert_eq!(v[0], 0xab);
    assert_eq!(v[4096], 0x11);
}

fn write_guest_any(path: &Path, offset: u64, data: &[u8]) {
    let mut chain = open_chain(path, ParentPolicy::Anywhere, |l, _| {
        if l == 0 {
            LockMode::Exclusive
        } else {
            LockMode::Shared
        }
    })
    .unwrap();
    chain.write(offset, data).unwrap();
}

#[test]
fn delete_revert_and_keep_rules() {
    let dir = tempfile::tempdir().unwrap();
    let b = base(dir.path());
    let s1 = create_external(&b, "s1", None, STRICT).unwrap();
    write_guest(&s1, 8192, &[0x22; 10_000]);
    let s2 = create_external(&s1, "s2", None, STRICT).unwrap();
    write_guest(&s2, 100_000, &[0x33; 5000]);
    let listing = list_path(&s2, STRICT).unwrap();
    assert_eq!(
        listing
            .chain
            .iter()
            .map(|l| l.path.clone())
            .collect::<Vec<_>>(),
        vec![s1.clone(), b.clone()]
    );
    assert!(listing.snapshots.is_empty());
    assert!(check_path(&s2, STRICT).unwrap().is_clean());
    let expected = view(&s2, STRICT);

    // Deleting the active layer or a stranger is refused, nothing written.
    let before = std::fs::read(&s2).unwrap();
    assert_eq!(
        delete_layer(&s2, &s2, STRICT).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    let stranger = dir.path().join("x.vhd");
    create_dynamic(&stranger, 1 << 20, None).unwrap();
    assert_eq!(
        delete_layer(&s2, &stranger, STRICT).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert!(std::fs::read(&s2).unwrap() == before);

    // A second child of s1 keeps s1 alive after deleting it from s2's chain.
    let other = create_external(&s1, "other", None, STRICT).unwrap();
    let out = delete_layer(&s2, &s1, STRICT).unwrap();
    assert!(!out.removed);
    assert_eq!(out.kept_for, vec![other.clone()]);
    assert!(s1.exists());
    assert!(view(&s2, STRICT) == expected);
    assert_eq!(list_path(&s2, STRICT).unwrap().chain.len(), 1);
    assert!(check_path(&s2, STRICT).unwrap().is_clean());

    // Deleting the base: s2 becomes dynamic; base kept (s1 still names it).
    let out = delete_layer(&s2, &b, STRICT).unwrap();
    assert!(out.child_now_dynamic && !out.removed);
    assert!(view(&s2, STRICT) == expected);
    assert!(list_path(&s2, STRICT).unwrap().chain.is_empty());

    // Revert `other` to s1: empty child of s1, base content visible.
    write_guest(&other, 0, &[0x77; 4096]);
    revert_to_layer(&other, &s1, STRICT).unwrap();
    assert!(view(&other, STRICT) == view(&s1, STRICT));
    assert!(check_path(&other, STRICT).unwrap().is_clean());
    assert_eq!(
        revert_to_layer(&other, &other, STRICT).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
}

#[test]
fn exclusive_lock_refuses_a_second_writer() {
    let dir = tempfile::tempdir().unwrap();
    let b = base(dir.path());
    let s1 = create_external(&b, "s1", None, STRICT).unwrap();
    let _held = open_chain(&s1, STRICT, |l, _| {
        if l == 0 {
            LockMode::Exclusive
        } else {
            LockMode::Shared
        }
    })
    .unwrap();
    let err = delete_layer(&s1, &b, STRICT).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InUse, "{err}");
    // The base is held shared by the open chain: a child can still be made from it.
    assert!(create_external(&b, "s2", None, STRICT).is_ok());
}

#[tokio::test]
async fn backend_contract() {
    let dir = tempfile::tempdir().unwrap();
    let b = base(dir.path());
    let backend = VhdBackend::new(&b);
    assert!(backend.capabilities().external && !backend.capabilities().internal);
    let err = backend
        .create(&CreateRequest::Internal { name: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert_eq!(err.message(), NO_INTERNAL);
    let out = backend
        .create(&CreateRequest::External {
            name: "s1".into(),
            overlay: None,
        })
        .await
        .unwrap();
    assert_eq!(out.active, dir.path().join("base.s1.vhd"));
    let err = backend
        .create(&CreateRequest::External {
            name: "s1".into(),
            overlay: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Exists);
    let top = VhdBackend::new(&out.active);
    let listing = top.list().await.unwrap();
    assert_eq!(listing.chain.len(), 1);
    assert_eq!(listing.virtual_size, 8 << 20);
    top.delete(&Target::Layer(b.clone())).await.unwrap();
    assert!(!b.exists());
    assert!(top.list().await.unwrap().chain.is_empty());
    assert_eq!(
        top.revert(&Target::Internal("x".into()))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::Unsupported
    );
}
