//! Copy-on-write metadata transactions: how every snapshot operation reaches the disk.
//!
//! An operation never changes a structure the current header points at. It writes new L1 tables,
//! new L2 tables where flags must change, a new snapshot table and new copies of every refcount
//! block it changes, plus a new refcount table — all in clusters appended past the image's end,
//! which the current refcounts call free. After a flush, one 512-byte write of the header's first
//! sector switches L1, refcount table and snapshot table at once; a flush follows. So:
//!
//! - a crash before the header write leaves the old image, untouched (the appended clusters are
//!   unreferenced and have refcount 0: not even a leak);
//! - a crash after it leaves the new image, complete;
//! - an operation refused midway (refcount overflow, corruption found while walking) truncates the
//!   file back to its old length, so the file is byte-identical to before.
//!
//! Refcount changes are applied to in-memory copies of refcount blocks, bounded by a cache; a block
//! evicted under memory pressure is written to its new (appended) location and read back from there
//! if it is needed again, so memory stays bounded whatever the image size.

use std::collections::{BTreeMap, HashMap};

use snap_core::{BlockIo, Error, ErrorKind, Result};

use crate::format::refcount::RefcountGeometry;
use crate::image::Qcow2;

/// Bytes of refcount blocks kept in memory during one operation.
pub(crate) const REFBLOCK_CACHE_BYTES: u64 = 16 << 20;
/// The highest offset a qcow2 host cluster can have (56-bit offsets).
const MAX_HOST_OFFSET: u64 = 1 << 56;

/// An open transaction over an image.
pub(crate) struct Txn<'a, IO: BlockIo> {
    img: &'a Qcow2<IO>,
    geo: RefcountGeometry,
    cluster_bits: u32,
    cs: u64,
    original_len: u64,
    alloc_start: u64,
    cursor: u64,
    counted_upto: u64,
    cache: HashMap<u64, Vec<u8>>,
    ticks: HashMap<u64, u64>,
    lru: BTreeMap<u64, u64>,
    tick: u64,
    capacity: usize,
    relocated: BTreeMap<u64, u64>,
    pending_frees: Vec<u64>,
    wrote: bool,
}

impl<IO: BlockIo> std::fmt::Debug for Txn<'_, IO> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Txn")
            .field("alloc_start", &self.alloc_start)
            .field("cursor", &self.cursor)
            .finish()
    }
}

/// Where the committed refcount table went.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NewReftable {
    pub offset: u64,
    pub clusters: u32,
}

impl<'a, IO: BlockIo> Txn<'a, IO> {
    /// Starts a transaction; new clusters go past both the file's end and the last cluster the
    /// refcounts call used.
    pub(crate) fn new(img: &'a Qcow2<IO>) -> Result<Self> {
        let cs = img.cluster_size();
        let geo = img.refcount_geometry();
        let used_end = last_used_cluster_end(img)?;
        let file_end = crate::format::align_up(img.file_len(), cs)
            .ok_or_else(|| Error::corrupt("file too large"))?;
        let alloc_start = used_end.max(file_end);
        let capacity = (REFBLOCK_CACHE_BYTES / cs).max(4) as usize;
        Ok(Txn {
            img,
            geo,
            cluster_bits: img.header().cluster_bits,
            cs,
            original_len: img.file_len(),
            alloc_start,
            cursor: alloc_start,
            counted_upto: alloc_start,
            cache: HashMap::new(),
            ticks: HashMap::new(),
            lru: BTreeMap::new(),
            tick: 0,
            capacity,
            relocated: BTreeMap::new(),
            pending_frees: Vec::new(),
            wrote: false,
        })
    }

    /// Allocates `clusters` contiguous new clusters. Their refcounts are raised at commit.
    pub(crate) fn alloc(&mut self, clusters: u64) -> Result<u64> {
        let offset = self.cursor;
        let end = clusters
            .checked_mul(self.cs)
            .and_then(|len| offset.checked_add(len))
            .filter(|end| *end <= MAX_HOST_OFFSET)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Overflow,
                    "image would grow past the largest qcow2 offset",
                )
            })?;
        self.cursor = end;
        Ok(offset)
    }

    /// Writes new metadata (only ever into clusters this transaction allocated).
    pub(crate) fn write_new(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        if offset < self.alloc_start {
            return Err(Error::new(
                ErrorKind::Io,
                "internal error: write outside the transaction's clusters",
            ));
        }
        self.wrote = true;
        self.img.io.write_all_at(bytes, offset)
    }

    /// Schedules a cluster's refcount to drop by one at commit (a structure the new state no
    /// longer uses).
    pub(crate) fn free_later(&mut self, offset: u64) {
        self.pending_frees.push(offset);
    }

    fn block_index(&self, offset: u64) -> (u64, usize) {
        let cluster = offset >> self.cluster_bits;
        let bits = self.geo.block_entries_bits();
        (cluster >> bits, (cluster & ((1u64 << bits) - 1)) as usize)
    }

    /// Loads refcount block `index` into the cache (new version if relocated, else old, else zeros).
    fn load(&mut self, index: u64) -> Result<()> {
        if self.cache.contains_key(&index) {
            self.touch(index);
            return Ok(());
        }
        while self.cache.len() >= self.capacity {
            self.evict_one()?;
        }
        let mut block = vec![0u8; self.cs as usize];
        if let Some(&new_offset) = self.relocated.get(&index) {
            self.img.io.read_exact_at(&mut block, new_offset)?;
        } else if let Some(&old) = self.img.reftable.get(index as usize) {
            if old != 0 {
                self.img.io.read_exact_at(&mut block, old)?;
            }
        }
        self.cache.insert(index, block);
        self.touch(index);
        Ok(())
    }

    fn touch(&mut self, index: u64) {
        self.tick += 1;
        if let Some(old) = self.ticks.insert(index, self.tick) {
            self.lru.remove(&old);
        }
        self.lru.insert(self.tick, index);
    }

    fn evict_one(&mut self) -> Result<()> {
        let Some((&tick, &index)) = self.lru.iter().next() else {
            return Ok(());
        };
        self.lru.remove(&tick);
        self.ticks.remove(&index);
        let offset = self.locate(index)?;
        if let Some(block) = self.cache.remove(&index) {
            self.write_new(offset, &block)?;
        }
        Ok(())
    }

    /// The new location of refcount block `index`, allocating one on first use. The old block,
    /// if any, is freed at commit.
    fn locate(&mut self, index: u64) -> Result<u64> {
        if let Some(&offset) = self.relocated.get(&index) {
            return Ok(offset);
        }
        let offset = self.alloc(1)?;
        self.relocated.insert(index, offset);
        if let Some(&old) = self.img.reftable.get(index as usize) {
            if old != 0 {
                self.pending_frees.push(old);
            }
        }
        Ok(offset)
    }

    /// The refcount of the cluster at `offset` as this transaction has it now.
    pub(crate) fn refcount(&mut self, offset: u64) -> Result<u64> {
        let (block, entry) = self.block_index(offset);
        if !self.cache.contains_key(&block) && !self.relocated.contains_key(&block) {
            return self.img.refcount(offset);
        }
        self.load(block)?;
        let geo = self.geo;
        let data = self
            .cache
            .get(&block)
            .ok_or_else(|| Error::corrupt("refcount block cache miss"))?;
        geo.get(data, entry)
            .ok_or_else(|| Error::corrupt("refcount index out of range"))
    }

    /// Adds `delta` to the refcount of the cluster at `offset`. A result below zero means the
    /// image referenced the cluster more often than its refcount says (corruption); above the
    /// width's maximum is an overflow. Both refuse the operation.
    pub(crate) fn add(&mut self, offset: u64, delta: i64) -> Result<u64> {
        let (block, entry) = self.block_index(offset);
        self.load(block)?;
        let geo = self.geo;
        let cluster = offset >> self.cluster_bits;
        let data = self
            .cache
            .get_mut(&block)
            .ok_or_else(|| Error::corrupt("refcount block cache miss"))?;
        let old = geo
            .get(data, entry)
            .ok_or_else(|| Error::corrupt("refcount index out of range"))?;
        let new = if delta >= 0 {
            old.checked_add(delta as u64)
        } else {
            old.checked_sub(delta.unsigned_abs())
        };
        let new = match new {
            Some(v) if v <= geo.max_refcount() => v,
            Some(v) => {
                return Err(Error::new(
                    ErrorKind::Overflow,
                    format!(
                        "refcount overflow: cluster {cluster} (offset {offset:#x}) would need refcount {v}, but this \
                         image stores refcounts in {} bits (at most {}); widen them first with `qemu-img amend -o \
                         refcount_bits=16`",
                        geo.bits(),
                        geo.max_refcount()
                    ),
                ));
            }
            None if delta < 0 => {
                return Err(Error::corrupt(format!(
                    "cluster {cluster} (offset {offset:#x}) is referenced more often than its refcount {old} says"
                ))
                .with_offset(offset));
            }
            None => return Err(Error::new(ErrorKind::Overflow, "refcount overflow")),
        };
        geo.set(data, entry, new)?;
        Ok(new)
    }

    /// Raises the refcounts of everything allocated since the last sweep, gives every changed
    /// refcount block a new home, sizes a new refcount table, and writes blocks and table. Returns
    /// the new table's location. Nothing the old header points at is touched.
    pub(crate) fn finish(mut self) -> Result<(NewReftable, TxnGuard)> {
        let old_rt_offset = self.img.header().refcount_table_offset;
        for i in 0..self.img.header().refcount_table_clusters as u64 {
            self.pending_frees.push(old_rt_offset + i * self.cs);
        }
        let mut reftable: Option<(u64, u64)> = None;
        loop {
            while let Some(offset) = self.pending_frees.pop() {
                self.add(offset, -1)?;
            }
            while self.counted_upto < self.cursor {
                let c = self.counted_upto;
                self.add(c, 1)?;
                self.counted_upto += self.cs;
            }
            let unplaced: Vec<u64> = self
                .cache
                .keys()
                .copied()
                .filter(|i| !self.relocated.contains_key(i))
                .collect();
            for index in unplaced {
                self.locate(index)?;
            }
            if !self.pending_frees.is_empty() || self.counted_upto < self.cursor {
                continue;
            }
            let last_block = self.relocated.keys().next_back().copied().unwrap_or(0);
            let entries = (self.img.reftable.len() as u64).max(last_block + 1);
            let clusters = (entries * 8).div_ceil(self.cs);
            match reftable {
                Some((_, have)) if have >= clusters => break,
                Some((offset, have)) => {
                    for i in 0..have {
                        self.pending_frees.push(offset + i * self.cs);
                    }
                }
                None => {}
            }
            // One spare cluster of table so the common case settles in one round.
            let want = clusters + 1;
            reftable = Some((self.alloc(want)?, want));
        }
        let Some((rt_offset, rt_clusters)) = reftable else {
            return Err(Error::corrupt(
                "internal error: no refcount table allocated",
            ));
        };
        if rt_clusters * self.cs > crate::image::MAX_REFTABLE_BYTES {
            return Err(Error::new(
                ErrorKind::Overflow,
                "refcount table would exceed QEMU's 8 MiB limit",
            ));
        }
        // Write every block still in memory to its new home.
        let blocks: Vec<(u64, Vec<u8>)> = self.cache.drain().collect();
        for (index, block) in blocks {
            let offset = self.locate(index)?;
            self.write_new(offset, &block)?;
        }
        let mut table = vec![0u8; (rt_clusters * self.cs) as usize];
        for (i, chunk) in table.chunks_exact_mut(8).enumerate() {
            let entry = match self.relocated.get(&(i as u64)) {
                Some(&new) => new,
                None => self.img.reftable.get(i).copied().unwrap_or(0),
            };
            chunk.copy_from_slice(&entry.to_be_bytes());
        }
        self.write_new(rt_offset, &table)?;
        let guard = TxnGuard {
            original_len: self.original_len,
            armed: true,
        };
        Ok((
            NewReftable {
                offset: rt_offset,
                clusters: rt_clusters as u32,
            },
            guard,
        ))
    }

    /// Undoes an unfinished transaction: drops everything appended, restoring the file's length.
    pub(crate) fn abort(&self) -> Result<()> {
        if self.wrote || self.img.io.len()? != self.original_len {
            self.img.io.set_len(self.original_len)?;
        }
        Ok(())
    }
}

/// After [`Txn::finish`], until the header is written: undoing still means truncating.
#[derive(Debug)]
pub(crate) struct TxnGuard {
    original_len: u64,
    armed: bool,
}

impl TxnGuard {
    /// Truncates back (the header was not switched).
    pub(crate) fn abort<IO: BlockIo>(&mut self, io: &IO) -> Result<()> {
        if self.armed {
            self.armed = false;
            io.set_len(self.original_len)?;
        }
        Ok(())
    }
    /// The header now points at the new metadata: nothing to undo.
    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }
}

/// The end of the last cluster whose stored refcount is non-zero.
fn last_used_cluster_end<IO: BlockIo>(img: &Qcow2<IO>) -> Result<u64> {
    let geo = img.refcount_geometry();
    let cs = img.cluster_size();
    let mut block = vec![0u8; cs as usize];
    for (index, &offset) in img.reftable.iter().enumerate().rev() {
        if offset == 0 {
            continue;
        }
        img.io.read_exact_at(&mut block, offset)?;
        for entry in (0..geo.block_entries() as usize).rev() {
            if geo.get(&block, entry).unwrap_or(0) != 0 {
                let cluster = ((index as u64) << geo.block_entries_bits()) + entry as u64;
                return Ok((cluster + 1) * cs);
            }
        }
    }
    Ok(cs)
}
