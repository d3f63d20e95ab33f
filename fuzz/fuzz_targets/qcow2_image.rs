//! Whole-image fuzzing: open arbitrary bytes as qcow2, list, check, read, and run snapshot
//! operations. Nothing may panic; every refusal must leave the bytes unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snap_backend_qcow2::{Qcow2, Qcow2Disk, SnapshotTime};
use snap_core::io::MemIo;

fuzz_target!(|data: &[u8]| {
    if data.len() > 1 << 20 {
        return;
    }
    let io = MemIo::from_bytes(data.to_vec());
    let Ok(image) = Qcow2::open(io.clone(), false) else { return };
    let _ = image.check();
    let names: Vec<String> = image.snapshots().iter().map(|s| s.name.clone()).collect();
    let size = image.virtual_size();
    let disk = Qcow2Disk::new(image, None);
    let mut buf = vec![0u8; 4096];
    if size >= 4096 {
        let _ = disk.read(0, &mut buf);
        let _ = disk.read(size - 4096, &mut buf);
    }
    let time = SnapshotTime { sec: 0, nsec: 0 };
    let ops: [&dyn Fn(&mut Qcow2<MemIo>) -> snap_core::Result<()>; 3] = [
        &|img| img.create_snapshot("fuzz", time).map(|_| ()),
        &|img| match names.first() {
            Some(n) => img.revert_snapshot(n),
            None => Ok(()),
        },
        &|img| match names.first() {
            Some(n) => img.delete_snapshot(n),
            None => Ok(()),
        },
    ];
    for (index, op) in ops.iter().enumerate() {
        let copy = MemIo::from_bytes(data.to_vec());
        let Ok(mut img) = Qcow2::open(copy.clone(), true) else { return };
        if let Err(e) = op(&mut img) {
            assert!(copy.to_bytes() == data, "refused operation {index} changed the image: {e}");
        }
    }
});
