//! Writing new images and changing an image's backing file.
//!
//! A new image is laid out as header, refcount table, refcount blocks, L1 table, in that order,
//! every cluster counted once. A backing file is always recorded with its format (the
//! backing-format extension), so nothing is ever probed later.

use snap_core::{BlockIo, DiskFormat, Error, ErrorKind, Result};

use crate::format::header::{
    COMPRESSION_ZLIB, EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, Extension, Header, HeaderCluster,
    INCOMPAT_EXTL2, MAGIC, MAX_BACKING_FILE_NAME,
};
use crate::format::refcount::RefcountGeometry;
use crate::image::{MAX_L1_BYTES, MAX_VIRTUAL_SIZE};

/// What a new image looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// log2 of the cluster size (9..=21; 16 is QEMU's default).
    pub cluster_bits: u32,
    /// Extended L2 entries (subclusters).
    pub extended_l2: bool,
    /// Backing file name as it is to be stored, and its format.
    pub backing: Option<(String, DiskFormat)>,
}

impl CreateOptions {
    /// A standalone image of `size` bytes with QEMU's defaults.
    pub fn new(size: u64) -> Self {
        CreateOptions {
            size,
            cluster_bits: 16,
            extended_l2: false,
            backing: None,
        }
    }
}

fn backing_extensions(
    backing: &Option<(String, DiskFormat)>,
) -> Result<(Vec<Extension>, Option<Vec<u8>>)> {
    match backing {
        None => Ok((Vec::new(), None)),
        Some((name, format)) => {
            if name.is_empty() || name.len() > MAX_BACKING_FILE_NAME as usize {
                return Err(Error::invalid(format!(
                    "backing file name must be 1 to {MAX_BACKING_FILE_NAME} bytes long"
                )));
            }
            if !matches!(format, DiskFormat::Qcow2 | DiskFormat::Raw) {
                return Err(Error::unsupported(format!(
                    "a qcow2 image cannot have a {format} backing file"
                )));
            }
            let ext = Extension {
                kind: EXT_BACKING_FORMAT,
                data: format.as_str().as_bytes().to_vec(),
            };
            Ok((vec![ext], Some(name.as_bytes().to_vec())))
        }
    }
}

/// Lays the backing file name out right after the extensions (8-byte aligned).
fn place_backing(hc: &mut HeaderCluster) {
    let Some(name) = &hc.backing_file else {
        hc.header.backing_file_offset = 0;
        hc.header.backing_file_size = 0;
        return;
    };
    let mut ext_len = hc.header.header_length as u64;
    for e in &hc.extensions {
        ext_len += 8 + (e.data.len() as u64).div_ceil(8) * 8;
    }
    ext_len += 8;
    hc.header.backing_file_offset = ext_len;
    hc.header.backing_file_size = name.len() as u32;
}

/// Writes a new, empty qcow2 v3 image to `io` (which should be empty).
pub fn create_image(io: &dyn BlockIo, options: &CreateOptions) -> Result<()> {
    if !(9..=21).contains(&options.cluster_bits) {
        return Err(Error::invalid(
            "cluster size must be between 512 bytes and 2 MiB",
        ));
    }
    if options.size > MAX_VIRTUAL_SIZE {
        return Err(Error::invalid(format!(
            "virtual size {} is too large",
            options.size
        )));
    }
    let cs = 1u64 << options.cluster_bits;
    let mut header = Header {
        version: 3,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: options.cluster_bits,
        size: options.size,
        crypt_method: 0,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: if options.extended_l2 {
            INCOMPAT_EXTL2
        } else {
            0
        },
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: 4,
        header_length: 112,
        compression_type: COMPRESSION_ZLIB,
        unknown_tail: vec![0; 7],
    };
    let l1_entries = header.l1_entries_for(options.size);
    if l1_entries * 8 > MAX_L1_BYTES {
        return Err(Error::invalid(
            "the L1 table would exceed 32 MiB; use a larger cluster size",
        ));
    }
    let l1_clusters = (l1_entries * 8).div_ceil(cs);
    let geo = RefcountGeometry {
        cluster_bits: options.cluster_bits,
        refcount_order: 4,
    };
    // Refcount table and blocks must cover every cluster the layout uses, themselves included.
    let (mut rt_clusters, mut rb_count) = (1u64, 1u64);
    loop {
        let total = 1 + rt_clusters + rb_count + l1_clusters;
        let need_rb = total.div_ceil(geo.block_entries());
        let need_rt = (need_rb * 8).div_ceil(cs);
        if need_rb == rb_count && need_rt == rt_clusters {
            break;
        }
        rb_count = need_rb;
        rt_clusters = need_rt;
    }
    let total = 1 + rt_clusters + rb_count + l1_clusters;
    header.refcount_table_clusters = u32::try_from(rt_clusters)
        .map_err(|_| Error::new(ErrorKind::Overflow, "refcount table too large"))?;
    header.l1_size = u32::try_from(l1_entries)
        .map_err(|_| Error::new(ErrorKind::Overflow, "L1 table too large"))?;
    header.l1_table_offset = (1 + rt_clusters + rb_count) * cs;
    let (extensions, backing_file) = backing_extensions(&options.backing)?;
    let mut hc = HeaderCluster {
        header,
        extensions,
        backing_file,
    };
    place_backing(&mut hc);
    let mut cluster0 = hc.encode()?;
    cluster0.resize(cs as usize, 0);
    // Refcount table and blocks.
    let mut reftable = vec![0u8; (rt_clusters * cs) as usize];
    for (i, chunk) in reftable
        .chunks_exact_mut(8)
        .take(rb_count as usize)
        .enumerate()
    {
        chunk.copy_from_slice(&((1 + rt_clusters + i as u64) * cs).to_be_bytes());
    }
    let mut blocks = vec![0u8; (rb_count * cs) as usize];
    for cluster in 0..total {
        let block = (cluster / geo.block_entries()) as usize;
        let entry = (cluster % geo.block_entries()) as usize;
        let start = block * cs as usize;
        if let Some(b) = blocks.get_mut(start..start + cs as usize) {
            geo.set(b, entry, 1)?;
        }
    }
    io.write_all_at(&reftable, cs)?;
    io.write_all_at(&blocks, (1 + rt_clusters) * cs)?;
    io.write_all_at(
        &vec![0u8; (l1_clusters * cs) as usize],
        hc.header.l1_table_offset,
    )?;
    io.flush()?;
    io.write_all_at(&cluster0, 0)?;
    io.flush()
}

/// Points the image in `io` at a new backing file (or none), keeping every other extension.
///
/// Crash-safe: the switch is one write of the first sector (sector writes are atomic), and
/// nothing the old header still uses is written before it. When header, extensions and name fit
/// in 512 bytes — dropping QEMU's informational feature-name table if that makes them fit — the
/// first sector is all there is to write. A longer name is written first where the old layout
/// does not reach (after its end, inside the first cluster), flushed, and then the first sector
/// switches to it. Bytes the old layout used past the first sector are cleared afterwards.
/// Refused, with nothing written, when the header and extensions alone exceed 512 bytes or the
/// name does not fit in the first cluster.
pub fn set_backing(io: &dyn BlockIo, backing: Option<(String, DiskFormat)>) -> Result<()> {
    const SECTOR: usize = 512;
    let len = io.len()?;
    let mut first = vec![0u8; len.min(SECTOR as u64) as usize];
    io.read_exact_at(&mut first, 0)?;
    if crate::format::be32(&first, 0) != Some(MAGIC) {
        return Err(Error::invalid("not a qcow2 image"));
    }
    let pre = Header::decode(&first)?;
    let cluster_size = pre.cluster_size().min(len) as usize;
    let mut cluster0 = vec![0u8; cluster_size];
    io.read_exact_at(&mut cluster0, 0)?;
    let mut hc = HeaderCluster::decode(&cluster0)?;
    // Where the old layout ends: everything before it may still be read until the switch.
    let old_len = hc.encode()?.len();
    let (new_ext, name) = backing_extensions(&backing)?;
    hc.extensions.retain(|e| e.kind != EXT_BACKING_FORMAT);
    // The backing-format extension goes first, as QEMU writes it.
    for (i, e) in new_ext.into_iter().enumerate() {
        hc.extensions.insert(i, e);
    }
    hc.backing_file = name;
    place_backing(&mut hc);
    let mut bytes = hc.encode()?;
    if bytes.len() > SECTOR && hc.extensions.iter().any(|e| e.kind == EXT_FEATURE_TABLE) {
        hc.extensions.retain(|e| e.kind != EXT_FEATURE_TABLE);
        place_backing(&mut hc);
        bytes = hc.encode()?;
    }
    if bytes.len() <= SECTOR {
        // One sector holds it all; clear what the old layout used in it.
        bytes.resize(old_len.clamp(bytes.len(), SECTOR), 0);
        io.write_all_at(&bytes, 0)?;
        io.flush()?;
    } else {
        let name_len = hc.backing_file.as_ref().map_or(0, Vec::len);
        let extensions_end = bytes.len() - name_len;
        if name_len == 0 || extensions_end > SECTOR {
            return Err(Error::unsupported(
                "the header and its extensions take more than 512 bytes; changing the backing \
                 file could not be done crash-safely",
            ));
        }
        let name_at = (old_len.max(SECTOR) as u64).next_multiple_of(8);
        if name_at as usize + name_len > cluster_size {
            return Err(Error::unsupported(
                "the backing file name does not fit in the first cluster beside the old header",
            ));
        }
        hc.header.backing_file_offset = name_at;
        let bytes = hc.encode()?;
        let (sector0, tail) = bytes.split_at(SECTOR);
        let name = tail.get(name_at as usize - SECTOR..).unwrap_or_default();
        io.write_all_at(name, name_at)?;
        io.flush()?;
        io.write_all_at(sector0, 0)?;
        io.flush()?;
    }
    // The old layout's bytes past the first sector are unused now (a new long name lies after
    // them).
    if old_len > SECTOR {
        io.write_all_at(&vec![0u8; old_len - SECTOR], SECTOR as u64)?;
        io.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::Qcow2;
    use snap_core::io::MemIo;

    #[test]
    fn new_images_open_and_check_clean() {
        for (bits, size) in [
            (16, 64u64 << 20),
            (9, 64 << 20),
            (21, 1 << 40),
            (12, 3 << 30),
        ] {
            let io = MemIo::new();
            let mut opts = CreateOptions::new(size);
            opts.cluster_bits = bits;
            create_image(&io, &opts).unwrap();
            let image = Qcow2::open(io.clone(), false).unwrap();
            assert_eq!(image.virtual_size(), size);
            let report = image.check().unwrap();
            assert!(report.is_clean(), "{bits}: {:?}", report.messages);
        }
    }

    #[test]
    fn backing_recorded_with_format_and_relinked() {
        let io = MemIo::new();
        let mut opts = CreateOptions::new(1 << 20);
        opts.backing = Some(("base.qcow2".into(), DiskFormat::Qcow2));
        create_image(&io, &opts).unwrap();
        let image = Qcow2::open(io.clone(), false).unwrap();
        assert_eq!(
            image.header_cluster().backing_file_name().as_deref(),
            Some("base.qcow2")
        );
        assert_eq!(
            image.header_cluster().backing_format().as_deref(),
            Some("qcow2")
        );
        set_backing(
            &io,
            Some((
                "a/much/longer/name/for/the/base.raw".into(),
                DiskFormat::Raw,
            )),
        )
        .unwrap();
        let image = Qcow2::open(io.clone(), false).unwrap();
        assert_eq!(
            image.header_cluster().backing_file_name().as_deref(),
            Some("a/much/longer/name/for/the/base.raw")
        );
        assert_eq!(
            image.header_cluster().backing_format().as_deref(),
            Some("raw")
        );
        set_backing(&io, None).unwrap();
        let image = Qcow2::open(io.clone(), false).unwrap();
        assert_eq!(image.header_cluster().backing_file_name(), None);
        assert_eq!(image.header_cluster().backing_format(), None);
        assert!(image.check().unwrap().is_clean());
    }

    /// An image whose header holds a feature-name table like QEMU's and backing file `name`.
    fn qemu_like(name: &str) -> MemIo {
        let io = MemIo::new();
        let mut opts = CreateOptions::new(1 << 20);
        opts.backing = Some((name.to_string(), DiskFormat::Qcow2));
        create_image(&io, &opts).unwrap();
        let mut cluster0 = vec![0u8; 65536];
        io.read_exact_at(&mut cluster0, 0).unwrap();
        let mut hc = HeaderCluster::decode(&cluster0).unwrap();
        hc.extensions.push(crate::format::header::Extension {
            kind: EXT_FEATURE_TABLE,
            data: vec![0x42; 336],
        });
        place_backing(&mut hc);
        let bytes = hc.encode().unwrap();
        io.write_all_at(&bytes, 0).unwrap();
        io
    }

    fn backing_of(bytes: &[u8]) -> Result<Option<(String, Option<String>)>> {
        let image = Qcow2::open(MemIo::from_bytes(bytes.to_vec()), false)?;
        let hc = image.header_cluster();
        Ok(hc
            .backing_file_name()
            .map(|name| (name, hc.backing_format())))
    }

    /// Every crash state of a relink (flush boundaries, subsets of unflushed writes, torn
    /// writes) has the old backing file or the new one, never a broken header.
    #[test]
    fn relinks_are_crash_safe() {
        let long_a = format!("/images/{}/base.qcow2", "a".repeat(430));
        let long_b = format!("/other/{}/base.raw", "b".repeat(440));
        let cases: Vec<(String, Option<(String, DiskFormat)>)> = vec![
            (
                "mid.qcow2".into(),
                Some(("base.qcow2".into(), DiskFormat::Qcow2)),
            ),
            ("mid.qcow2".into(), None),
            (
                "mid.qcow2".into(),
                Some((long_a.clone(), DiskFormat::Qcow2)),
            ),
            (
                long_a.clone(),
                Some(("base.qcow2".into(), DiskFormat::Qcow2)),
            ),
            (long_a.clone(), Some((long_b.clone(), DiskFormat::Raw))),
            (long_a.clone(), None),
        ];
        let mut total = 0;
        for (old, new) in cases {
            let io = qemu_like(&old);
            let before = io.to_bytes();
            let old_backing = backing_of(&before).unwrap();
            assert_eq!(
                old_backing.as_ref().map(|b| b.0.as_str()),
                Some(old.as_str())
            );
            let rec = snap_core::io::RecordingIo::new(io.clone());
            set_backing(&rec, new.clone()).unwrap();
            let after = io.to_bytes();
            let new_backing = backing_of(&after).unwrap();
            assert_eq!(
                new_backing,
                new.as_ref()
                    .map(|(n, f)| (n.clone(), Some(f.as_str().to_string())))
            );
            assert!(
                Qcow2::open(io.clone(), false)
                    .unwrap()
                    .check()
                    .unwrap()
                    .is_clean()
            );
            let log = rec.events();
            for state in snap_core::crash::crash_states(&log, &old, 16) {
                let bytes = snap_core::crash::materialize(&before, &state.events).unwrap();
                let got = backing_of(&bytes).unwrap_or_else(|e| {
                    panic!(
                        "{old} -> {new:?}: [{}] ({}): {e}",
                        state.label,
                        snap_core::crash::describe(&log)
                    )
                });
                assert!(
                    got == old_backing || got == new_backing,
                    "{old} -> {new:?}: [{}]: backing {got:?}",
                    state.label
                );
                total += 1;
            }
        }
        eprintln!("set_backing: {total} crash states of six relinks checked");
        assert!(total > 20);
    }

    #[test]
    fn refuses_bad_options() {
        let io = MemIo::new();
        let mut opts = CreateOptions::new(1 << 20);
        opts.cluster_bits = 8;
        assert!(create_image(&io, &opts).is_err());
        let mut opts = CreateOptions::new(1 << 50);
        opts.cluster_bits = 9;
        assert!(create_image(&io, &opts).is_err());
        let mut opts = CreateOptions::new(1 << 20);
        opts.backing = Some((String::new(), DiskFormat::Qcow2));
        assert!(create_image(&io, &opts).is_err());
    }
}
