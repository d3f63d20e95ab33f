//! Structure-level fuzzing: header cluster, snapshot table, L2 entries, refcount blocks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snap_backend_qcow2::format::header::{Header, HeaderCluster};
use snap_backend_qcow2::format::refcount::RefcountGeometry;
use snap_backend_qcow2::format::snapshot::decode_table;
use snap_backend_qcow2::format::table::{L2Entry, L2Geometry};

fuzz_target!(|data: &[u8]| {
    if let Ok(hc) = HeaderCluster::decode(data) {
        let _ = hc.encode();
        let _ = Header::decode(data);
    }
    if let Some((&count, rest)) = data.split_first() {
        let _ = decode_table(rest, count as u32, 3);
    }
    for chunk in data.chunks(16) {
        let raw = chunk.iter().take(8).fold(0u64, |a, b| (a << 8) | *b as u64);
        let bitmap = chunk.iter().skip(8).fold(0u64, |a, b| (a << 8) | *b as u64);
        for cluster_bits in [9, 16, 21] {
            for extended in [false, true] {
                let g = L2Geometry { cluster_bits, extended };
                if let Ok(m) = g.mapping(L2Entry { raw, bitmap }) {
                    let _ = g.referenced_clusters(m);
                }
            }
        }
    }
    for order in 0..=6 {
        let g = RefcountGeometry { cluster_bits: 9, refcount_order: order };
        let mut block = data.to_vec();
        for i in 0..64 {
            if let Some(v) = g.get(&block, i) {
                let _ = g.set(&mut block, i, v);
            }
        }
    }
});
