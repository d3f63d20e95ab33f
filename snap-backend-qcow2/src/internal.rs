//! Offline internal snapshots: create, revert, delete, list.
//!
//! Each operation is expressed as a [`Plan`]: which L1 tables stop being referenced, which new L1
//! tables appear, and what the new snapshot table is. [`commit`] turns a plan into refcount
//! changes and new metadata through a copy-on-write [`Txn`](crate::txn::Txn):
//!
//! 1. L2-level net: every L2 table gains one reference per new L1 entry naming it and loses one
//!    per dropped L1 entry. Tables whose net is zero are not read at all: their data clusters'
//!    refcounts do not change (a refcount counts the L1 paths to a cluster, as `qemu-img check`
//!    counts them).
//! 2. Data: tables with a negative net are walked first, then those with a positive net, so a
//!    cluster's refcount moves by the net difference and never overflows on the way (with 1- or
//!    2-bit refcounts, a +1 before the matching -1 would).
//! 3. COPIED: in the new L1 tables an L1 entry is COPIED exactly when its L2 table's refcount is
//!    1, and an L2 entry exactly when its data cluster's refcount is 1 (never for compressed
//!    clusters). An L2 table whose flags are wrong for the new refcounts is copied with corrected
//!    flags — never patched in place, since the old image still uses it.
//! 4. New L1 tables and snapshot table are written, refcount blocks and table follow, a flush,
//!    then one header sector switches everything, then a flush.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{SystemTime, UNIX_EPOCH};

use snap_core::{BlockIo, Error, ErrorKind, Result};

use crate::format::snapshot::{
    self, EXTRA_DATA_LEN, MAX_SNAPSHOTS, MAX_TABLE_BYTES, SnapshotEntry,
};
use crate::format::table::{COPIED, L1Entry, L2Entry, OFFSET_MASK, ZERO};
use crate::image::{HeaderUpdate, MAX_L1_BYTES, Qcow2};
use crate::txn::Txn;

/// One entry of the snapshot table after an operation.
#[derive(Debug, Clone)]
enum Slot {
    /// An existing snapshot, unchanged (its L1 table stays where it is).
    Keep(SnapshotEntry),
    /// A new snapshot whose L1 table is `added[index]` of the plan.
    New { entry: SnapshotEntry, l1: usize },
}

/// What an operation changes, before any I/O.
#[derive(Debug)]
struct Plan {
    /// L1 tables (offset, entries) no longer referenced afterwards.
    dropped: Vec<(u64, Vec<L1Entry>)>,
    /// New L1 tables; index 0 is the new active table.
    added: Vec<Vec<L1Entry>>,
    /// The new snapshot table.
    slots: Vec<Slot>,
    /// The new virtual size.
    size: u64,
}

/// The time used for new snapshot entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotTime {
    /// Seconds since the epoch.
    pub sec: u32,
    /// Nanoseconds.
    pub nsec: u32,
}

impl SnapshotTime {
    /// The current wall-clock time.
    pub fn now() -> Self {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        SnapshotTime {
            sec: u32::try_from(d.as_secs()).unwrap_or(u32::MAX),
            nsec: d.subsec_nanos(),
        }
    }
}

impl<IO: BlockIo> Qcow2<IO> {
    /// Finds a snapshot by name, or by id when no name matches (as QEMU does).
    pub fn find_snapshot(&self, name_or_id: &str) -> Result<usize> {
        if let Some(i) = self.snapshots.iter().position(|s| s.name == name_or_id) {
            if self
                .snapshots
                .iter()
                .filter(|s| s.name == name_or_id)
                .count()
                > 1
            {
                return Err(Error::invalid(format!(
                    "several snapshots are named {name_or_id:?}; address one by its id"
                )));
            }
            return Ok(i);
        }
        self.snapshots
            .iter()
            .position(|s| s.id == name_or_id)
            .ok_or_else(|| Error::not_found(format!("no snapshot named {name_or_id:?}")))
    }

    fn require_writable(&self) -> Result<()> {
        if !self.writable {
            return Err(Error::invalid("image was opened read-only"));
        }
        Ok(())
    }

    /// Creates an internal snapshot of the current state named `name`. Returns its id.
    pub fn create_snapshot(&mut self, name: &str, time: SnapshotTime) -> Result<String> {
        self.require_writable()?;
        snap_core::model::validate_snapshot_name(name)?;
        if self.snapshots.iter().any(|s| s.name == name) {
            return Err(Error::new(
                ErrorKind::Exists,
                format!("a snapshot named {name:?} already exists"),
            ));
        }
        if self.snapshots.iter().any(|s| s.id == name) {
            return Err(Error::new(
                ErrorKind::Exists,
                format!("{name:?} is the id of an existing snapshot; choose another name"),
            ));
        }
        if self.snapshots.len() as u32 >= MAX_SNAPSHOTS {
            return Err(Error::new(
                ErrorKind::Overflow,
                format!("the image already has {MAX_SNAPSHOTS} snapshots"),
            ));
        }
        let id = snapshot::next_id(&self.snapshots);
        let mut extra = vec![0u8; EXTRA_DATA_LEN];
        extra
            .get_mut(8..16)
            .unwrap_or_default()
            .copy_from_slice(&self.virtual_size().to_be_bytes());
        extra
            .get_mut(16..24)
            .unwrap_or_default()
            .copy_from_slice(&u64::MAX.to_be_bytes());
        let entry = SnapshotEntry {
            l1_table_offset: 0,
            l1_size: self.header().l1_size,
            id: id.clone(),
            name: name.to_string(),
            date_sec: time.sec,
            date_nsec: time.nsec,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            extra,
        };
        let mut slots: Vec<Slot> = self.snapshots.iter().cloned().map(Slot::Keep).collect();
        slots.push(Slot::New { entry, l1: 1 });
        let plan = Plan {
            dropped: vec![(self.header().l1_table_offset, self.l1.clone())],
            added: vec![self.l1.clone(), self.l1.clone()],
            slots,
            size: self.virtual_size(),
        };
        self.commit(plan)?;
        Ok(id)
    }

    /// Reverts the current state to snapshot `name_or_id`; the current state is dropped.
    pub fn revert_snapshot(&mut self, name_or_id: &str) -> Result<()> {
        self.require_writable()?;
        let index = self.find_snapshot(name_or_id)?;
        if self.persistent_bitmap_count() > 0 {
            // A revert changes guest data behind the bitmaps' back: an incremental backup based
            // on them would silently miss those changes.
            return Err(Error::unsupported(
                "image has persistent dirty bitmaps (incremental backup state) that a revert would \
                 invalidate; remove them first (`qemu-img bitmap --remove IMAGE NAME`)",
            ));
        }
        let sn = self
            .snapshots
            .get(index)
            .cloned()
            .ok_or_else(|| Error::not_found("snapshot vanished"))?;
        let size = sn.disk_size().unwrap_or(self.virtual_size());
        if size > crate::image::MAX_VIRTUAL_SIZE {
            return Err(Error::corrupt(format!(
                "snapshot {:?} records an impossible disk size {size}",
                sn.name
            )));
        }
        let l1 = self.read_l1(sn.l1_table_offset, sn.l1_size)?;
        if (l1.len() as u64) < self.header().l1_entries_for(size) {
            return Err(Error::corrupt(format!(
                "snapshot {:?} has an L1 table of {} entries, too small for its disk size {size}",
                sn.name,
                l1.len()
            )));
        }
        let plan = Plan {
            dropped: vec![(self.header().l1_table_offset, self.l1.clone())],
            added: vec![l1],
            slots: self.snapshots.iter().cloned().map(Slot::Keep).collect(),
            size,
        };
        self.commit(plan)
    }

    /// Deletes snapshot `name_or_id`; the current state is kept.
    pub fn delete_snapshot(&mut self, name_or_id: &str) -> Result<()> {
        self.require_writable()?;
        let index = self.find_snapshot(name_or_id)?;
        let sn = self
            .snapshots
            .get(index)
            .cloned()
            .ok_or_else(|| Error::not_found("snapshot vanished"))?;
        let sn_l1 = self.read_l1(sn.l1_table_offset, sn.l1_size)?;
        let slots = self
            .snapshots
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != index)
            .map(|(_, s)| Slot::Keep(s.clone()))
            .collect();
        let plan = Plan {
            dropped: vec![
                (self.header().l1_table_offset, self.l1.clone()),
                (sn.l1_table_offset, sn_l1),
            ],
            added: vec![self.l1.clone()],
            slots,
            size: self.virtual_size(),
        };
        self.commit(plan)
    }

    /// Carries out a plan (see the module documentation), then reloads the image's tables.
    fn commit(&mut self, plan: Plan) -> Result<()> {
        let size = plan.size;
        self.run_txn(size, |img, txn| stage(img, txn, &plan))
    }

    /// Runs one copy-on-write transaction: `build` changes refcounts and writes new structures,
    /// then refcount blocks and table are placed, everything is flushed, one header-sector write
    /// switches to the new metadata, and a flush makes it durable. Any failure before the switch
    /// truncates the file back.
    pub(crate) fn run_txn(
        &mut self,
        size: u64,
        build: impl FnOnce(&Qcow2<IO>, &mut Txn<'_, IO>) -> Result<Staged>,
    ) -> Result<()> {
        let mut txn = Txn::new(self)?;
        let staged = match build(self, &mut txn) {
            Ok(staged) => staged,
            Err(e) => {
                txn.abort()?;
                return Err(e);
            }
        };
        let (reftable, mut guard) = match txn.finish() {
            Ok(v) => v,
            Err(e) => {
                self.io.set_len(self.file_len)?;
                return Err(e);
            }
        };
        let switch = HeaderUpdate {
            size,
            l1_size: staged.active_l1_size,
            l1_table_offset: staged.active_l1_offset,
            refcount_table_offset: reftable.offset,
            refcount_table_clusters: reftable.clusters,
            nb_snapshots: staged.nb_snapshots,
            snapshots_offset: staged.snapshots_offset,
        };
        // Everything new must be durable before the header points at it.
        if let Err(e) = self.io.flush() {
            guard.abort(&self.io)?;
            return Err(e);
        }
        self.write_header_fields(&switch)?;
        guard.disarm();
        self.io.flush()?;
        self.reload()?;
        // Free clusters at the tail (metadata this or an earlier operation moved away from the
        // end) are cut off: nothing references a cluster whose refcount is 0.
        let keep = crate::txn::last_used_cluster_end(self)?;
        if keep < self.file_len {
            self.io.set_len(keep)?;
            self.file_len = keep;
        }
        Ok(())
    }

    /// Re-reads header and tables after a commit.
    fn reload(&mut self) -> Result<()> {
        let file_len = self.io.len()?;
        let mut cluster0 = vec![0u8; self.cluster_size().min(file_len) as usize];
        self.io.read_exact_at(&mut cluster0, 0)?;
        self.hc = crate::format::header::HeaderCluster::decode(&cluster0)?;
        self.file_len = file_len;
        self.load_tables_again()
    }
}

/// Where the new active L1 and snapshot table went.
#[derive(Debug)]
pub(crate) struct Staged {
    pub(crate) active_l1_offset: u64,
    pub(crate) active_l1_size: u32,
    pub(crate) snapshots_offset: u64,
    pub(crate) nb_snapshots: u32,
}

/// Applies the plan's refcount changes and writes its new structures (not the header).
fn stage<IO: BlockIo>(img: &Qcow2<IO>, txn: &mut Txn<'_, IO>, plan: &Plan) -> Result<Staged> {
    let cs = img.cluster_size();
    let geom = img.l2_geometry();

    // 1. Net references per L2 table, and how many references the new L1 tables make to each.
    let mut net: HashMap<u64, i64> = HashMap::new();
    let mut added_refs: HashMap<u64, u64> = HashMap::new();
    for (_, l1) in &plan.dropped {
        for e in l1.iter().filter(|e| e.l2_offset() != 0) {
            *net.entry(e.l2_offset()).or_insert(0) -= 1;
        }
    }
    for l1 in &plan.added {
        for e in l1.iter().filter(|e| e.l2_offset() != 0) {
            *net.entry(e.l2_offset()).or_insert(0) += 1;
            *added_refs.entry(e.l2_offset()).or_insert(0) += 1;
        }
    }
    let old_active: HashSet<u64> = img
        .l1
        .iter()
        .map(|e| e.l2_offset())
        .filter(|o| *o != 0)
        .collect();

    // 2. Data refcounts: decreases first, then increases (sorted by offset: sequential reads).
    let mut minus: Vec<(u64, i64)> = net
        .iter()
        .filter(|(_, n)| **n < 0)
        .map(|(o, n)| (*o, *n))
        .collect();
    let mut plus: Vec<(u64, i64)> = net
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(o, n)| (*o, *n))
        .collect();
    minus.sort_unstable();
    plus.sort_unstable();
    let mut old_l2_refcount: HashMap<u64, u64> = HashMap::new();
    for &(l2, _) in minus.iter().chain(plus.iter()) {
        old_l2_refcount.insert(l2, img.refcount(l2)?);
    }
    let mut table = vec![0u8; cs as usize];
    let mut hosts: Vec<u64> = Vec::with_capacity(img.header().l2_entries() as usize);
    for (pass, list) in [(0, &minus), (1, &plus)] {
        for &(l2, n) in list.iter() {
            img.read_l2_into(l2, &mut table)?;
            hosts.clear();
            collect_referenced(img, &table, l2, &mut hosts)?;
            txn.add_clusters(&mut hosts, n, pass == 1)?;
            txn.add_clusters(&mut [l2 >> img.header().cluster_bits], n, pass == 1)?;
        }
    }

    // 3. COPIED flags of the new L1 tables, copying L2 tables whose flags must change.
    let mut replacement: BTreeMap<u64, (u64, bool)> = BTreeMap::new(); // l2 -> (new l2, l1 COPIED)
    let mut l2_offsets: Vec<u64> = added_refs.keys().copied().collect();
    l2_offsets.sort_unstable();
    // Tables the passes above did not walk (net zero) but the COPIED pass will read are
    // validated first, so every refusal happens before the first write inside the image.
    for &l2 in &l2_offsets {
        if net.get(&l2).copied().unwrap_or(0) != 0
            || (old_active.contains(&l2) && img.refcount(l2)? >= 2)
        {
            continue;
        }
        img.read_l2_into(l2, &mut table)?;
        for i in 0..img.header().l2_entries() as usize {
            let entry = geom
                .entry(&table, i)
                .ok_or_else(|| Error::corrupt("L2 entry out of range"))?;
            geom.mapping(entry).map_err(|e| e.with_offset(l2))?;
        }
    }
    // Every L2 table the new L1 tables use keeps at least one reference per use, and none shares
    // a cluster with another structure (checked now: the copies below are written into holes).
    let mut claimed: Vec<u64> = added_refs
        .keys()
        .copied()
        .chain(old_active.iter().copied())
        .collect();
    claimed.sort_unstable();
    claimed.dedup();
    crate::txn::validate_metadata_refcounts(img, &claimed)?;
    for (&l2, &refs) in &added_refs {
        if txn.refcount(l2)? < refs {
            return Err(Error::corrupt(format!(
                "L2 table {l2:#x} is used {refs} times but its refcount is lower; repair the image with \
                 `qemu-img check -r all` first"
            ))
            .with_offset(l2));
        }
    }
    // The structures the new state drops are freed before validation ends.
    for (offset, l1) in &plan.dropped {
        if !l1.is_empty() {
            let clusters = (l1.len() as u64 * 8).div_ceil(cs);
            for c in 0..clusters {
                txn.free_later(offset + c * cs);
            }
        }
    }

    let old = img.header();
    if old.nb_snapshots > 0 && img.snapshot_table_len > 0 {
        for c in 0..img.snapshot_table_len.div_ceil(cs) {
            txn.free_later(old.snapshots_offset + c * cs);
        }
    }
    txn.mark_validated()?;
    for l2 in l2_offsets {
        let refs = added_refs.get(&l2).copied().unwrap_or(0);
        let final_rc = txn.refcount(l2)?;
        let old_rc = match old_l2_refcount.get(&l2) {
            Some(v) => *v,
            None => img.refcount(l2)?,
        };
        // A table shared before and after, and reachable from the old active L1, has all its
        // COPIED flags clear already (QEMU's invariant, which `qemu-img check` verifies).
        if old_active.contains(&l2) && old_rc >= 2 && final_rc >= 2 {
            replacement.insert(l2, (l2, false));
            continue;
        }
        img.read_l2_into(l2, &mut table)?;
        let mut fixed = table.clone();
        let mut changed = false;
        // With a table referenced once, each entry is COPIED exactly when its cluster's refcount
        // is 1; with a shared table, never.
        let entries = img.header().l2_entries() as usize;
        let mut data_refcounts: Vec<Option<u64>> = vec![None; entries];
        if final_rc == 1 {
            let mut wanted: Vec<(usize, u64)> = Vec::new();
            for i in 0..entries {
                let entry = geom
                    .entry(&table, i)
                    .ok_or_else(|| Error::corrupt("L2 entry out of range"))?;
                if let Some(host) = copied_candidate(img, entry).map_err(|e| e.with_offset(l2))? {
                    wanted.push((i, host >> img.header().cluster_bits));
                }
            }
            let clusters: Vec<u64> = wanted.iter().map(|(_, c)| *c).collect();
            let counts = txn.refcounts_of(&clusters)?;
            for ((i, _), rc) in wanted.iter().zip(counts) {
                if let Some(slot) = data_refcounts.get_mut(*i) {
                    *slot = Some(rc);
                }
            }
        }
        for (i, data_rc) in data_refcounts.iter().enumerate() {
            let entry = geom
                .entry(&table, i)
                .ok_or_else(|| Error::corrupt("L2 entry out of range"))?;
            let want = *data_rc == Some(1);
            if (entry.raw & COPIED != 0) != want {
                let raw = if want {
                    entry.raw | COPIED
                } else {
                    entry.raw & !COPIED
                };
                geom.set_entry(
                    &mut fixed,
                    i,
                    L2Entry {
                        raw,
                        bitmap: entry.bitmap,
                    },
                );
                changed = true;
            }
        }
        if !changed {
            replacement.insert(l2, (l2, final_rc == 1));
            continue;
        }
        // Move every reference the new L1 tables make from the old table to a corrected copy.
        let copy = txn.alloc_one()?;
        txn.write_new(copy, &fixed)?;
        let refs_i64 =
            i64::try_from(refs).map_err(|_| Error::corrupt("reference count overflow"))?;
        txn.add(l2, -refs_i64)?;
        if refs > 1 {
            // The allocation sweep counts one reference; the others are added here.
            txn.add(copy, refs_i64 - 1)?;
        }
        replacement.insert(l2, (copy, refs == 1));
    }

    // 4. New L1 tables.
    let mut l1_offsets = Vec::with_capacity(plan.added.len());
    for l1 in &plan.added {
        let bytes_len = l1.len() as u64 * 8;
        if bytes_len > MAX_L1_BYTES {
            return Err(Error::corrupt("L1 table larger than 32 MiB"));
        }
        if l1.is_empty() {
            l1_offsets.push(0);
            continue;
        }
        let clusters = bytes_len.div_ceil(cs);
        let offset = txn.alloc_run(clusters)?;
        let mut bytes = vec![0u8; (clusters * cs) as usize];
        for (e, chunk) in l1.iter().zip(bytes.chunks_exact_mut(8)) {
            let out = match replacement.get(&e.l2_offset()) {
                Some(&(new, copied)) if e.l2_offset() != 0 => L1Entry::new(new, copied),
                _ => L1Entry(0),
            };
            chunk.copy_from_slice(&out.0.to_be_bytes());
        }
        txn.write_new(offset, &bytes)?;
        l1_offsets.push(offset);
    }
    // 5. The new snapshot table.
    let mut entries = Vec::with_capacity(plan.slots.len());
    for slot in &plan.slots {
        match slot {
            Slot::Keep(e) => entries.push(e.clone()),
            Slot::New { entry, l1 } => {
                let mut e = entry.clone();
                e.l1_table_offset = l1_offsets.get(*l1).copied().unwrap_or(0);
                e.l1_size = plan.added.get(*l1).map(|t| t.len() as u32).unwrap_or(0);
                entries.push(e);
            }
        }
    }
    let table_bytes = snapshot::encode_table(&entries)?;
    if table_bytes.len() as u64 > MAX_TABLE_BYTES {
        return Err(Error::new(
            ErrorKind::Overflow,
            "snapshot table would exceed QEMU's 64 MiB limit",
        ));
    }
    let snapshots_offset = if table_bytes.is_empty() {
        0
    } else {
        let clusters = (table_bytes.len() as u64).div_ceil(cs);
        let offset = txn.alloc_run(clusters)?;
        let mut padded = table_bytes;
        padded.resize((clusters * cs) as usize, 0);
        txn.write_new(offset, &padded)?;
        offset
    };
    let active = plan
        .added
        .first()
        .ok_or_else(|| Error::corrupt("internal error: plan without active L1"))?;
    Ok(Staged {
        active_l1_offset: l1_offsets.first().copied().unwrap_or(0),
        active_l1_size: active.len() as u32,
        snapshots_offset,
        nb_snapshots: entries.len() as u32,
    })
}

impl<IO: BlockIo> Qcow2<IO> {
    fn load_tables_again(&mut self) -> Result<()> {
        self.l1.clear();
        self.reftable.clear();
        self.snapshots.clear();
        self.snapshot_table_len = 0;
        self.load_tables()
    }
}

/// Appends the cluster index of every host cluster the L2 table `table` (at `l2`) references.
pub(crate) fn collect_referenced<IO: BlockIo>(
    img: &Qcow2<IO>,
    table: &[u8],
    l2: u64,
    out: &mut Vec<u64>,
) -> Result<()> {
    let geom = img.l2_geometry();
    let cb = img.header().cluster_bits;
    let cs_mask = img.cluster_size() - 1;
    let plain_bits = OFFSET_MASK | COPIED | if geom.extended { 0 } else { ZERO };
    for i in 0..img.header().l2_entries() as usize {
        let entry = geom
            .entry(table, i)
            .ok_or_else(|| Error::corrupt("L2 entry out of range"))?;
        if entry.raw == 0 && entry.bitmap == 0 {
            continue;
        }
        // Fast path: a plain, valid, allocated standard entry (the vast majority).
        if !geom.extended && entry.raw & !plain_bits == 0 {
            let host = entry.raw & OFFSET_MASK;
            if host != 0 && host & cs_mask == 0 {
                out.push(host >> cb);
                continue;
            }
        }
        let mapping = geom.mapping(entry).map_err(|e| e.with_offset(l2))?;
        if let Some((first, count)) = geom.referenced_clusters(mapping) {
            let first = first >> cb;
            out.extend(first..first + count);
        }
    }
    Ok(())
}

/// The host cluster whose refcount decides an L2 entry's COPIED flag, or `None` for entries that
/// never carry it (unallocated, zero without a cluster, compressed).
fn copied_candidate<IO: BlockIo>(img: &Qcow2<IO>, entry: L2Entry) -> Result<Option<u64>> {
    let geom = img.l2_geometry();
    if entry.raw == 0 && entry.bitmap == 0 {
        return Ok(None);
    }
    if !geom.extended && entry.raw & !(OFFSET_MASK | COPIED | ZERO) == 0 {
        let host = entry.raw & OFFSET_MASK;
        if host & (img.cluster_size() - 1) == 0 {
            return Ok((host != 0).then_some(host));
        }
    }
    let mapping = geom.mapping(entry)?;
    if !geom.may_be_copied(mapping) {
        return Ok(None);
    }
    Ok(geom.referenced_clusters(mapping).map(|(host, _)| host))
}
