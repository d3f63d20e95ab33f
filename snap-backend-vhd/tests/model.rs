//! Property test: random guest writes across an in-memory chain of 1-3 layers, new layers on
//! top, and coalesce + reparent of random layers, checked after every step against a model of
//! the guest view, with every layer's own check clean.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use proptest::prelude::*;
use snap_backend_vhd::check::check;
use snap_backend_vhd::format::header::PlatformCode;
use snap_backend_vhd::image::{create, new_footer};
use snap_backend_vhd::{Chain, Layer, ParentLink, Vhd};
use snap_core::io::MemIo;

const SIZE: u64 = 1 << 20;
const BLOCK: u32 = 64 << 10;

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: usize, byte: u8 },
    Snapshot,
    Coalesce(usize),
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..SIZE, 1usize..150_000, any::<u8>()).prop_map(|(offset, len, byte)| {
            let len = len.min((SIZE - offset) as usize).max(1);
            Op::Write { offset, len, byte }
        }),
        1 => Just(Op::Snapshot),
        1 => (1usize..3).prop_map(Op::Coalesce),
    ]
}

fn link_to(parent: &Vhd<MemIo>, name: &str) -> ParentLink {
    let rel: Vec<u8> = format!(".\\{name}")
        .encode_utf16()
        .flat_map(|u| u.to_le_bytes())
        .collect();
    ParentLink {
        unique_id: parent.footer().unique_id,
        timestamp: parent.footer().timestamp,
        name: name.to_string(),
        locators: vec![(PlatformCode::W2ru, rel)],
    }
}

fn new_layer(parent: Option<&Vhd<MemIo>>, serial: u8) -> Vhd<MemIo> {
    let footer = new_footer(SIZE, [serial; 16], u32::from(serial));
    let link = parent.map(|p| link_to(p, &format!("l{}", serial - 1)));
    create(MemIo::new(), footer, BLOCK, link.as_ref()).unwrap()
}

fn assert_view(chain: &Chain<MemIo>, model: &[u8]) {
    let mut buf = vec![0u8; SIZE as usize];
    chain.read(0, &mut buf).unwrap();
    assert!(buf == model, "guest view differs from the model");
    // An unaligned read agrees too.
    let mut part = vec![0u8; 1000];
    chain.read(12_345, &mut part).unwrap();
    assert_eq!(&part[..], &model[12_345..13_345]);
    for layer in chain.layers() {
        let report = check(&layer.image).unwrap();
        assert!(report.is_clean(), "{report:?}");
        // Leaks are allowed: a relink leaves the old locator data unused by design.
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn chain_matches_model(depth in 1usize..=3, ops in prop::collection::vec(op_strategy(), 1..24)) {
        let mut serial = 1u8;
        let mut images = vec![new_layer(None, serial)];
        for _ in 1..depth {
            serial += 1;
            let child = new_layer(images.last(), serial);
            images.push(child);
        }
        images.reverse();
        let layers = images
            .into_iter()
            .map(|image| Layer::unlocked("mem", image))
            .collect();
        let mut chain = Chain::new(layers).unwrap();
        let mut model = vec![0u8; SIZE as usize];
        for op in ops {
            match op {
                Op::Write { offset, len, byte } => {
                    let data = vec![byte; len];
                    chain.write(offset, &data).unwrap();
                    model[offset as usize..offset as usize + len].fill(byte);
                }
                Op::Snapshot => {
                    if chain.layers().len() >= 4 {
                        continue;
                    }
                    serial += 1;
                    let top = new_layer(chain.layers().first().map(|l| &l.image), serial);
                    let mut layers = chain.into_layers();
                    layers.insert(0, Layer::unlocked("mem", top));
                    chain = Chain::new(layers).unwrap();
                }
                Op::Coalesce(level) => {
                    if level >= chain.layers().len() {
                        continue;
                    }
                    chain.coalesce_into_child(level).unwrap();
                    // The guest view is unchanged after the copy alone (an interrupted delete).
                    assert_view(&chain, &model);
                    let link = chain.layers().get(level + 1).map(|p| link_to(&p.image, "p"));
                    let child = chain.image_mut(level - 1).unwrap();
                    match link {
                        Some(link) => child.set_parent(&link).unwrap(),
                        None => child.make_dynamic().unwrap(),
                    }
                    let mut layers = chain.into_layers();
                    layers.remove(level);
                    chain = Chain::new(layers).unwrap();
                }
            }
            assert_view(&chain, &model);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random byte corruptions of a differencing image never panic: open, read and check
    /// either work or return an error.
    #[test]
    fn corrupted_images_never_panic(flips in prop::collection::vec((0usize..8192, any::<u8>()), 1..8)) {
        let parent = new_layer(None, 1);
        let mut child = new_layer(Some(&parent), 2);
        child.write_sectors(8, &[0x5a; 4096]).unwrap();
        let mut bytes = child.io().to_bytes();
        let len = bytes.len();
        for (at, value) in flips {
            // Hit the head (footer copy, header, BAT, locators) and the tail (footer).
            let at = if at < 4096 { at } else { len - 1 - (at - 4096) % 4096.min(len) };
            if let Some(b) = bytes.get_mut(at) {
                *b ^= value;
            }
        }
        if let Ok(image) = Vhd::open(MemIo::from_bytes(bytes), false) {
            let _ = image.sector_runs(0, SIZE / 512);
            let _ = check(&image);
            let layers = vec![Layer::unlocked("c", image), Layer::unlocked("p", new_layer(None, 1))];
            if let Ok(chain) = Chain::new(layers) {
                let mut buf = vec![0u8; 65536];
                let _ = chain.read(0, &mut buf);
            }
        }
    }
}
