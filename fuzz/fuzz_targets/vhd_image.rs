//! Whole-image VHD fuzzing: arbitrary bytes as a VHD file (footer and its copy, dynamic header,
//! BAT, sector bitmaps, parent locators). Opened read-only: listed (footer, header, parent name,
//! locators decoded and resolved), checked, read (first and last 64 KiB through the layer and,
//! where a chain can be formed, through the chain). Then, on copies: a guest write, a reparent
//! and a make-dynamic (a refusal must leave the bytes unchanged; a success must keep the layer's
//! own data and reopen), and the snapshot operations as the backend runs them: a new child of
//! the image (create: the child's view equals the image's), and a delete that coalesces the image
//! into its child and relinks the child (the view never changes). A differencing image gets a
//! made-up dynamic parent with the unique id it records, so its chain can be formed too.
//! Nothing may panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use snap_backend_vhd::check::check;
use snap_backend_vhd::format::SECTOR;
use snap_backend_vhd::format::footer::{DiskType, Footer};
use snap_backend_vhd::format::header::PlatformCode;
use snap_backend_vhd::format::locator::{self, ParentPolicy};
use snap_backend_vhd::image::{ParentLink, create, new_footer};
use snap_backend_vhd::{Chain, Layer, Vhd};
use snap_core::io::MemIo;

/// Bytes read (and compared) at each end of the guest view.
const WINDOW: u64 = 64 << 10;
/// Largest disk the chain operations are run on (coalescing walks every sector).
const MAX_OPS_SIZE: u64 = 16 << 20;

fn open(bytes: &[u8], writable: bool) -> Option<Vhd<MemIo>> {
    Vhd::open(MemIo::from_bytes(bytes.to_vec()), writable).ok()
}

/// The guest offsets compared: the start and the end of the disk.
fn windows(size: u64) -> Vec<(u64, u64)> {
    let first = WINDOW.min(size);
    let last = size.saturating_sub(WINDOW).max(first);
    let mut out = vec![(0, first)];
    if last < size {
        out.push((last, size - last));
    }
    out
}

/// The guest view of `chain` in the compared windows; `None` if a read fails.
fn view(chain: &Chain<MemIo>) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for (offset, len) in windows(chain.size()) {
        let mut buf = vec![0u8; len as usize];
        chain.read(offset, &mut buf).ok()?;
        out.extend_from_slice(&buf);
    }
    Some(out)
}

/// A link naming `parent` (what the backend records for a parent in the same folder).
fn link_to(parent: &Vhd<MemIo>, name: &str) -> ParentLink {
    ParentLink {
        unique_id: parent.footer().unique_id,
        timestamp: parent.footer().timestamp,
        name: name.to_string(),
        locators: vec![
            (
                PlatformCode::W2ku,
                locator::encode_utf16le(&format!("/fuzz/{name}"), false),
            ),
            (PlatformCode::W2ru, locator::encode_utf16le(name, true)),
        ],
    }
}

/// A new empty child of `parent`, as `create --external` makes it.
fn new_child(parent: &Vhd<MemIo>, id: u8) -> Option<Vhd<MemIo>> {
    let block_size = parent.header().map(|h| h.block_size).unwrap_or(2 << 20);
    let mut footer: Footer = new_footer(parent.size(), [id; 16], 0);
    footer.geometry = parent.footer().geometry;
    create(
        MemIo::new(),
        footer,
        block_size,
        Some(&link_to(parent, "fuzz.vhd")),
    )
    .ok()
}

/// A dynamic disk with unique id `id` and `size`, holding a pattern in its first block: the
/// parent a differencing image says it has.
fn made_up_parent(id: [u8; 16], size: u64, block_size: u32) -> Option<Vhd<MemIo>> {
    let footer = new_footer(size, id, 0);
    let mut vhd = create(MemIo::new(), footer, block_size, None).ok()?;
    let len = (8 * SECTOR).min(size) as usize;
    vhd.write_sectors(0, &vec![0x5a; len]).ok()?;
    Some(vhd)
}

/// The layers below the image, if it needs any (a differencing image gets a made-up parent).
fn parents_of(image: &Vhd<MemIo>) -> Option<Vec<Vhd<MemIo>>> {
    if image.disk_type() != DiskType::Differencing {
        return Some(Vec::new());
    }
    let header = image.header()?;
    if image.size() > MAX_OPS_SIZE {
        return None;
    }
    Some(vec![made_up_parent(
        header.parent_unique_id,
        image.size(),
        header.block_size,
    )?])
}

fn chain_of(layers: Vec<Vhd<MemIo>>) -> Option<Chain<MemIo>> {
    let layers = layers
        .into_iter()
        .enumerate()
        .map(|(i, image)| Layer::unlocked(format!("/fuzz/layer{i}.vhd"), image))
        .collect();
    Chain::new(layers).ok()
}

fn with_parents(top: Vec<Vhd<MemIo>>, data: &[u8]) -> Option<Chain<MemIo>> {
    let mut layers = top;
    let image = open(data, false)?;
    let parents = parents_of(&image)?;
    layers.push(image);
    layers.extend(parents);
    chain_of(layers)
}

/// Runs `op` on a writable copy; a refusal must leave the bytes as they were.
fn on_copy(data: &[u8], what: &str, op: impl FnOnce(&mut Vhd<MemIo>) -> snap_core::Result<()>) {
    let Some(mut copy) = open(data, true) else {
        return;
    };
    let io = copy.io().clone();
    if let Err(e) = op(&mut copy) {
        assert!(
            io.to_bytes() == data,
            "refused {what} changed the image: {e}"
        );
    }
}

fn list_and_read(image: &Vhd<MemIo>) {
    let _ = image.footer().encode();
    let _ = check(image);
    if let Some(header) = image.header() {
        let _ = header.encode();
        let _ = header.parent_name();
        for entry in &header.locators {
            let _ = entry.space_bytes();
            let Ok(raw) = image.read_locator(entry) else {
                continue;
            };
            let Ok(name) = locator::decode_utf16le(&raw) else {
                continue;
            };
            let dir = Path::new("/fuzz");
            for policy in [ParentPolicy::ChildFolder, ParentPolicy::Anywhere] {
                let _ = locator::resolve(dir, &name, policy);
            }
        }
        for block in 0..image.bat().len().min(64) as u64 {
            let _ = image.read_bitmap(block);
        }
    }
    for (offset, len) in windows(image.size()) {
        let Ok(runs) = image.sector_runs(offset / SECTOR, len.div_ceil(SECTOR)) else {
            continue;
        };
        for run in runs {
            if let Some(at) = run.file_offset {
                let mut buf = vec![0u8; (run.count * SECTOR).min(WINDOW) as usize];
                let _ = image.read_run(at, &mut buf);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() > 1 << 20 {
        return;
    }
    let Some(image) = open(data, false) else {
        return;
    };
    list_and_read(&image);
    let size = image.size();
    let own_runs = image.sector_runs(0, WINDOW / SECTOR).ok();
    drop(image);
    let before = with_parents(Vec::new(), data).and_then(|chain| view(&chain));

    // A guest write (through the chain when there is one, else into the layer alone).
    on_copy(data, "guest write", |copy| {
        let len = (8 * SECTOR).min(size & !(SECTOR - 1)) as usize;
        copy.write_sectors(0, &vec![0xa5; len])?;
        let mut back = vec![0u8; len];
        let runs = copy.sector_runs(0, len as u64 / SECTOR)?;
        for run in runs {
            let at = run.file_offset.expect("a written sector is absent");
            let from = (run.sector * SECTOR) as usize;
            copy.read_run(at, &mut back[from..from + (run.count * SECTOR) as usize])?;
        }
        assert!(
            back.iter().all(|b| *b == 0xa5),
            "written sectors read back differently"
        );
        Ok(())
    });

    // Reparent and make-dynamic keep the layer's own data.
    let check_own = |copy: &Vhd<MemIo>, what: &str| {
        let bytes = copy.io().to_bytes();
        let reopened = Vhd::open(MemIo::from_bytes(bytes), false)
            .unwrap_or_else(|e| panic!("the image no longer opens after {what}: {e}"));
        if let Some(runs) = &own_runs {
            let now = reopened.sector_runs(0, WINDOW / SECTOR).ok();
            assert!(
                now.as_ref().map(|n| n
                    .iter()
                    .map(|r| (r.sector, r.count, r.file_offset.is_some()))
                    .collect::<Vec<_>>())
                    == Some(
                        runs.iter()
                            .map(|r| (r.sector, r.count, r.file_offset.is_some()))
                            .collect()
                    ),
                "{what} changed which sectors the layer holds"
            );
        }
    };
    if size <= MAX_OPS_SIZE {
        on_copy(data, "reparent", |copy| {
            let parent = made_up_parent([7; 16], size, 4096)
                .ok_or_else(|| snap_core::Error::invalid("no parent"))?;
            copy.set_parent(&link_to(&parent, "other.vhd"))?;
            check_own(copy, "a reparent");
            Ok(())
        });
    }
    on_copy(data, "make dynamic", |copy| {
        copy.make_dynamic()?;
        check_own(copy, "make-dynamic");
        Ok(())
    });
    on_copy(data, "footer copy repair", |copy| {
        copy.repair_footer_copy().map(drop)
    });

    if size > MAX_OPS_SIZE {
        return;
    }
    let Some(before) = before else { return };

    // create --external: a new empty child reads as its parent.
    let Some(image) = open(data, false) else {
        return;
    };
    let Some(child) = new_child(&image, 1) else {
        return;
    };
    drop(image);
    let Some(mut chain) = with_parents(vec![child], data) else {
        return;
    };
    assert_eq!(
        view(&chain).as_ref(),
        Some(&before),
        "a new child reads differently from its parent"
    );

    // delete --layer: the image is coalesced into its child (which has data of its own), the
    // child is relinked past it; the view never changes.
    let len = (16 * SECTOR).min(size) as usize;
    if chain
        .write(
            size / 2 / SECTOR * SECTOR,
            &vec![0x3c; len.min((size - size / 2 / SECTOR * SECTOR) as usize)],
        )
        .is_err()
    {
        return;
    }
    let Some(with_child) = view(&chain) else {
        return;
    };
    if chain.coalesce_into_child(1).is_err() {
        return;
    }
    assert_eq!(
        view(&chain).as_ref(),
        Some(&with_child),
        "coalescing changed the guest view"
    );
    let mut layers = chain.into_layers();
    let rest = layers.split_off(2);
    let Some(mut child) = layers.into_iter().next().map(|l| l.image) else {
        return;
    };
    let relinked = match rest.first() {
        Some(parent) => child.set_parent(&link_to(&parent.image, "parent.vhd")),
        None => child.make_dynamic(),
    };
    if relinked.is_err() {
        return;
    }
    let mut after = vec![child];
    after.extend(rest.into_iter().map(|l| l.image));
    let chain =
        chain_of(after).expect("the relinked child does not form a chain with its new parent");
    assert_eq!(
        view(&chain).as_ref(),
        Some(&with_child),
        "deleting the layer changed the guest view"
    );
});
