//! Cases the `vhd_image` fuzz target and the crash-state exploration found, kept as tests.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use snap_backend_vhd::Vhd;
use snap_backend_vhd::check::check;
use snap_backend_vhd::format::footer::DiskType;
use snap_backend_vhd::image::{create, new_footer};
use snap_core::ErrorKind;
use snap_core::io::MemIo;

fn dynamic_disk() -> Vec<u8> {
    let io = MemIo::new();
    let mut vhd = create(io.clone(), new_footer(1 << 20, [1; 16], 0), 4096, None).unwrap();
    vhd.write_sectors(0, &[0x11; 4096]).unwrap();
    io.to_bytes()
}

/// Found by fuzzing: a file whose length is not a multiple of 512 put new blocks at an unaligned
/// offset while BAT entries (sector numbers) pointed next to them, so written sectors read back
/// as absent. Such a file is now read but never written.
#[test]
fn unaligned_file_length_is_read_only() {
    let mut bytes = dynamic_disk();
    // Three stray bytes before the trailing footer.
    let footer = bytes.split_off(bytes.len() - 512);
    bytes.extend_from_slice(&[0, 0, 0]);
    bytes.extend_from_slice(&footer);
    let ro = Vhd::open(MemIo::from_bytes(bytes.clone()), false).unwrap();
    let mut sector = [0u8; 512];
    let runs = ro.sector_runs(0, 1).unwrap();
    ro.read_run(runs[0].file_offset.unwrap(), &mut sector)
        .unwrap();
    assert_eq!(sector, [0x11; 512]);
    let err = Vhd::open(MemIo::from_bytes(bytes), true).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(err.to_string().contains("multiple of 512"), "{err}");
}

/// Found by the crash-state exploration: a crash between the two footer writes of a type change
/// leaves the copy at offset 0 different from the valid end footer. The end one is used; the
/// check notes the difference without calling it a corruption, and a repair ends it.
#[test]
fn a_stale_footer_copy_is_noted_not_corrupt() {
    let bytes = dynamic_disk();
    let mut stale = bytes.clone();
    // The copy at 0 says "differencing", as a relink interrupted after the end footer would.
    let mut vhd = Vhd::open(MemIo::from_bytes(bytes), false).unwrap();
    let mut footer = vhd.footer().clone();
    footer.disk_type = DiskType::Differencing;
    stale[..512].copy_from_slice(&footer.encode());
    vhd = Vhd::open(MemIo::from_bytes(stale.clone()), false).unwrap();
    assert!(vhd.footer_copy_stale());
    assert_eq!(vhd.disk_type(), DiskType::Dynamic);
    let report = check(&vhd).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert!(
        report
            .messages
            .iter()
            .any(|m| m.contains("interrupted relink")),
        "{report:?}"
    );
    let io = MemIo::from_bytes(stale);
    let mut rw = Vhd::open(io.clone(), true).unwrap();
    assert!(rw.repair_footer_copy().unwrap());
    assert!(!rw.footer_copy_stale());
    assert!(!Vhd::open(io, false).unwrap().footer_copy_stale());
}
