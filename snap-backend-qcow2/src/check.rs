//! Consistency check: rebuild every refcount from the metadata and compare with the stored ones,
//! the way `qemu-img check` does. A stored refcount below the number of references is corruption
//! (a write could free or overwrite live data); above it is a leak (wasted space, no harm).
//! COPIED flags of the active tables must say exactly "refcount is 1".

use std::collections::BTreeMap;

use snap_core::{BlockIo, Result};

use crate::format::table::{COPIED, L1Entry};
use crate::format::{be16, be32, be64};
use crate::image::Qcow2;

/// Most messages a report keeps (counts are always complete).
const MAX_MESSAGES: usize = 200;

/// The result of a check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Errors that may lose data: refcounts below references, bad COPIED flags, broken tables.
    pub corruptions: u64,
    /// Clusters whose refcount is above their references.
    pub leaks: u64,
    /// Clusters referenced by metadata (allocated).
    pub allocated_clusters: u64,
    /// Clusters the virtual disk has.
    pub total_clusters: u64,
    /// The end of the last referenced cluster.
    pub image_end_offset: u64,
    /// Human-readable findings, at most 200.
    pub messages: Vec<String>,
}

impl CheckReport {
    fn corruption(&mut self, message: String) {
        self.corruptions += 1;
        self.note(message);
    }
    fn note(&mut self, message: String) {
        if self.messages.len() < MAX_MESSAGES {
            self.messages.push(message);
        }
    }
    /// True when there is neither corruption nor a leak.
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0 && self.leaks == 0
    }
}

/// Reference counts rebuilt from metadata: one byte per cluster inside the file, with an overflow
/// map for counts above 254 and for clusters past the end of the file (so a hostile offset cannot
/// make us allocate a huge array).
struct RebuiltRefs {
    dense: Vec<u8>,
    big: BTreeMap<u64, u64>,
}

impl RebuiltRefs {
    fn new(clusters: u64) -> Self {
        RebuiltRefs {
            dense: vec![0; clusters as usize],
            big: BTreeMap::new(),
        }
    }
    fn inc(&mut self, cluster: u64) {
        match self.dense.get_mut(cluster as usize) {
            Some(v) if *v < 255 => {
                *v += 1;
                if *v == 255 {
                    self.big.insert(cluster, 255);
                }
            }
            Some(_) => {
                *self.big.entry(cluster).or_insert(255) += 1;
            }
            None => {
                *self.big.entry(cluster).or_insert(0) += 1;
            }
        }
    }
    fn get(&self, cluster: u64) -> u64 {
        match self.dense.get(cluster as usize) {
            Some(255) | None => self.big.get(&cluster).copied().unwrap_or(0),
            Some(v) => *v as u64,
        }
    }
    fn last(&self) -> Option<u64> {
        let dense_last = self.dense.iter().rposition(|v| *v != 0).map(|i| i as u64);
        let big_last = self.big.keys().next_back().copied();
        dense_last.max(big_last)
    }
}

impl<IO: BlockIo> Qcow2<IO> {
    /// Checks the image's refcounts and COPIED flags against its metadata.
    pub fn check(&self) -> Result<CheckReport> {
        let cs = self.cluster_size();
        let cb = self.header().cluster_bits;
        let file_clusters = self.file_len().div_ceil(cs);
        let mut refs = RebuiltRefs::new(file_clusters);
        let mut report = CheckReport {
            total_clusters: self.virtual_size().div_ceil(cs),
            ..CheckReport::default()
        };
        let mut inc_range = |refs: &mut RebuiltRefs, offset: u64, len: u64| {
            if len == 0 {
                return;
            }
            let first = offset >> cb;
            let last = (offset + len - 1) >> cb;
            for c in first..=last {
                refs.inc(c);
            }
        };
        inc_range(&mut refs, 0, cs);
        let h = self.header().clone();
        inc_range(&mut refs, h.l1_table_offset, h.l1_size as u64 * 8);
        self.walk_l1(&self.l1, true, &mut refs, &mut report)?;
        for sn in &self.snapshots {
            inc_range(&mut refs, sn.l1_table_offset, sn.l1_size as u64 * 8);
            match self.read_l1(sn.l1_table_offset, sn.l1_size) {
                Ok(l1) => self.walk_l1(&l1, false, &mut refs, &mut report)?,
                Err(e) => report.corruption(format!("snapshot {:?}: {e}", sn.name)),
            }
        }
        if h.nb_snapshots > 0 {
            inc_range(&mut refs, h.snapshots_offset, self.snapshot_table_len);
        }
        inc_range(
            &mut refs,
            h.refcount_table_offset,
            h.refcount_table_clusters as u64 * cs,
        );
        for &block in self.reftable.iter().filter(|b| **b != 0) {
            inc_range(&mut refs, block, cs);
        }
        if let Some((offset, len)) = self.crypto_header() {
            inc_range(&mut refs, offset, len);
        }
        if self.has_bitmaps() {
            self.walk_bitmaps(&mut refs, &mut report, &mut inc_range)?;
        }
        self.compare(&refs, &mut report)?;
        report.image_end_offset = refs.last().map(|c| (c + 1) * cs).unwrap_or(0);
        Ok(report)
    }

    /// The stored refcount of the cluster at `offset`, reading each refcount block once while
    /// consecutive lookups stay inside it.
    fn cached_refcount(&self, offset: u64, cache: &mut Option<(u64, Vec<u8>)>) -> Result<u64> {
        let g = self.refcount_geometry();
        let cluster = offset >> self.header().cluster_bits;
        let index = cluster >> g.block_entries_bits();
        if cache.as_ref().is_none_or(|(i, _)| *i != index) {
            let mut block = vec![0u8; self.cluster_size() as usize];
            match self.reftable.get(index as usize) {
                Some(&b) if b != 0 => self.io.read_exact_at(&mut block, b)?,
                _ => {}
            }
            *cache = Some((index, block));
        }
        let entry = (cluster & (g.block_entries() - 1)) as usize;
        Ok(cache
            .as_ref()
            .and_then(|(_, b)| g.get(b, entry))
            .unwrap_or(0))
    }

    fn walk_l1(
        &self,
        l1: &[L1Entry],
        active: bool,
        refs: &mut RebuiltRefs,
        report: &mut CheckReport,
    ) -> Result<()> {
        let mut rc_cache: Option<(u64, Vec<u8>)> = None;
        let cs = self.cluster_size();
        let cb = self.header().cluster_bits;
        let geom = self.l2_geometry();
        let mut table = vec![0u8; cs as usize];
        for (i, e) in l1.iter().enumerate() {
            let l2 = e.l2_offset();
            if l2 == 0 {
                continue;
            }
            refs.inc(l2 >> cb);
            if active {
                let rc = self.cached_refcount(l2, &mut rc_cache)?;
                if (rc == 1) != e.copied() {
                    report.corruption(format!(
                        "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={:x} refcount={rc}",
                        e.0
                    ));
                }
            }
            if let Err(err) = self.read_l2_into(l2, &mut table) {
                report.corruption(format!("L2 table at {l2:#x}: {err}"));
                continue;
            }
            for j in 0..self.header().l2_entries() as usize {
                let Some(entry) = geom.entry(&table, j) else {
                    break;
                };
                let mapping = match geom.mapping(entry) {
                    Ok(m) => m,
                    Err(err) => {
                        report.corruption(format!(
                            "L2 table at {l2:#x} entry {j}: {}",
                            err.message()
                        ));
                        continue;
                    }
                };
                if let Some((first, count)) = geom.referenced_clusters(mapping) {
                    for c in 0..count {
                        refs.inc((first >> cb) + c);
                    }
                    if active {
                        report.allocated_clusters += 1;
                    }
                    if active && geom.may_be_copied(mapping) {
                        let rc = self.cached_refcount(first, &mut rc_cache)?;
                        if (rc == 1) != (entry.raw & COPIED != 0) {
                            report.corruption(format!(
                                "ERROR OFLAG_COPIED data cluster: l2_entry={:x} refcount={rc}",
                                entry.raw
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn walk_bitmaps(
        &self,
        refs: &mut RebuiltRefs,
        report: &mut CheckReport,
        inc_range: &mut impl FnMut(&mut RebuiltRefs, u64, u64),
    ) -> Result<()> {
        let cs = self.cluster_size();
        let Some(ext) = self.hc.extension(crate::format::header::EXT_BITMAPS) else {
            return Ok(());
        };
        let (Some(count), Some(dir_size), Some(dir_offset)) =
            (be32(ext, 0), be64(ext, 8), be64(ext, 16))
        else {
            report.corruption("bitmaps extension is too short".into());
            return Ok(());
        };
        if dir_size > 64 << 20
            || dir_offset
                .checked_add(dir_size)
                .is_none_or(|end| end > self.file_len())
        {
            report.corruption("bitmap directory lies outside the file".into());
            return Ok(());
        }
        inc_range(refs, dir_offset, dir_size);
        let mut dir = vec![0u8; dir_size as usize];
        self.io.read_exact_at(&mut dir, dir_offset)?;
        let mut at = 0usize;
        for _ in 0..count {
            let (Some(table_offset), Some(table_size), Some(name_size), Some(extra_size)) = (
                be64(&dir, at),
                be32(&dir, at + 8),
                be16(&dir, at + 18),
                be32(&dir, at + 20),
            ) else {
                report.corruption("bitmap directory entry runs past the directory".into());
                return Ok(());
            };
            let table_bytes = table_size as u64 * 8;
            if table_bytes > 64 << 20
                || table_offset
                    .checked_add(table_bytes)
                    .is_none_or(|e| e > self.file_len())
            {
                report.corruption("bitmap table lies outside the file".into());
                return Ok(());
            }
            inc_range(refs, table_offset, table_bytes);
            let mut table = vec![0u8; table_bytes as usize];
            self.io.read_exact_at(&mut table, table_offset)?;
            for chunk in table.chunks_exact(8) {
                let e = u64::from_be_bytes(chunk.try_into().unwrap_or([0; 8]));
                let data = e & 0x00ff_ffff_ffff_fe00;
                if data != 0 {
                    inc_range(refs, data, cs);
                }
            }
            at = (at + 24 + extra_size as usize + name_size as usize).div_ceil(8) * 8;
        }
        Ok(())
    }

    fn compare(&self, refs: &RebuiltRefs, report: &mut CheckReport) -> Result<()> {
        let cs = self.cluster_size();
        let g = self.refcount_geometry();
        let per_block = g.block_entries();
        let mut block = vec![0u8; cs as usize];
        let mut covered = 0u64;
        for (index, &offset) in self.reftable.iter().enumerate() {
            let base = index as u64 * per_block;
            covered = base + per_block;
            if offset == 0 {
                // No block: every cluster it would cover has refcount 0.
                for (&c, &n) in refs.big.range(base..base + per_block) {
                    if n > 0 {
                        report.corruption(format!("ERROR cluster {c} refcount=0 reference={n}"));
                    }
                }
                let dense_end = (base + per_block).min(refs.dense.len() as u64);
                for c in base.min(dense_end)..dense_end {
                    let n = refs.get(c);
                    if n > 0 {
                        report.corruption(format!("ERROR cluster {c} refcount=0 reference={n}"));
                    }
                }
                continue;
            }
            self.io.read_exact_at(&mut block, offset)?;
            for i in 0..per_block as usize {
                let c = base + i as u64;
                let stored = g.get(&block, i).unwrap_or(0);
                let want = refs.get(c);
                if stored < want {
                    report.corruption(format!(
                        "ERROR cluster {c} refcount={stored} reference={want}"
                    ));
                } else if stored > want {
                    report.leaks += 1;
                    report.note(format!(
                        "Leaked cluster {c} refcount={stored} reference={want}"
                    ));
                }
            }
        }
        // References beyond what the refcount table can describe.
        for c in covered..refs.dense.len() as u64 {
            let n = refs.get(c);
            if n > 0 {
                report.corruption(format!(
                    "ERROR cluster {c} refcount=0 reference={n} (beyond the refcount table)"
                ));
            }
        }
        for (&c, &n) in refs.big.range(covered.max(refs.dense.len() as u64)..) {
            if n > 0 {
                report.corruption(format!(
                    "ERROR cluster {c} refcount=0 reference={n} (beyond the refcount table)"
                ));
            }
        }
        Ok(())
    }
}
