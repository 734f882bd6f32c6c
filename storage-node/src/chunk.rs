//! One chunk of a volume in memory: its block map (head epoch), its data file and the slot
//! allocator of that file.
//!
//! Data is written **redirect-on-write**: a write never overwrites the slot a committed entry
//! points to. It goes to a free slot, then one metadata batch switches the entries over. So a
//! crash at any point leaves every block either old or new, never torn, and never pointing at
//! data whose checksum does not match. The slot an overwrite freed is *pending* until the next
//! durability barrier has synced the metadata that stopped referring to it; only then can it
//! be punched and reused (before that, a crash could bring the old entry back).
//!
//! The map is the in-memory image of each block's newest version in RocksDB (its *head*,
//! with the version's epoch and whether older versions lie below it); both are changed
//! together under the chunk's lock, RocksDB first. Older versions (kept for snapshots, see
//! [`crate::epoch`]) are only in RocksDB; their slots stay allocated until reclaimed.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tern_common::BLOCKS_PER_CHUNK;

use crate::engine::DataFile;
use crate::epoch::Epochs;
use crate::error::{Error, Result};
use crate::meta::{BlockOp, Entry, MetaStore, Version};

/// Free and pending slots of one data file.
#[derive(Debug, Default)]
pub struct SlotAlloc {
    free: BTreeSet<u32>,
    /// Slots at or above this have never been used.
    hwm: u32,
    /// Freed by a committed overwrite, reusable after the next barrier (no punch: the next
    /// writes take them again).
    pending: Vec<u32>,
    /// Freed by trim or zeroing: punched at the next barrier (space goes back to the
    /// filesystem), then reusable.
    pending_punch: Vec<u32>,
}

impl SlotAlloc {
    /// Rebuilds the allocator from the slots the map references.
    pub fn from_used(used: impl Iterator<Item = u32>) -> Self {
        let used: BTreeSet<u32> = used.collect();
        let hwm = used.last().map_or(0, |&s| s + 1);
        let free = (0..hwm).filter(|s| !used.contains(s)).collect();
        Self { free, hwm, pending: Vec::new(), pending_punch: Vec::new() }
    }

    /// `n` slots, lowest free first, then fresh ones: consecutive blocks of one write land in
    /// consecutive slots whenever possible, so they go out as one I/O.
    pub fn alloc(&mut self, n: usize) -> Vec<u32> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match self.free.pop_first() {
                Some(s) => out.push(s),
                None => break,
            }
        }
        while out.len() < n {
            out.push(self.hwm);
            self.hwm += 1;
        }
        out
    }

    /// Returns slots that were never referenced by a committed entry.
    pub fn unalloc(&mut self, slots: &[u32]) {
        self.free.extend(slots.iter().copied());
    }

    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    pub fn hwm(&self) -> u32 {
        self.hwm
    }
}

/// A block's newest version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    /// [`Entry::Hole`]: the block has no version at all.
    pub entry: Entry,
    pub epoch: u64,
    /// Older versions exist below this one.
    pub below: bool,
}

const NO_VERSION: Head = Head { entry: Entry::Hole, epoch: 0, below: false };

/// Where a commit writes.
#[derive(Clone, Copy)]
pub enum At<'a> {
    /// A write at `epoch`, deciding with `epochs` whether overwritten versions are kept.
    Epoch { epoch: u64, epochs: &'a Epochs },
    /// The newest version itself is replaced (a repair: same content, fresh slot).
    InPlace,
}

struct State {
    map: Vec<Head>,
    alloc: SlotAlloc,
}

impl State {
    /// Frees a slot a version stopped referencing: reused (`punch` false) or punched first
    /// after the next barrier.
    fn free(&mut self, old: Entry, punch: bool) -> bool {
        if let Entry::Data { slot, .. } = old {
            if punch {
                self.alloc.pending_punch.push(slot);
            } else {
                self.alloc.pending.push(slot);
            }
            return true;
        }
        false
    }
}

pub struct Chunk {
    pub volume: u64,
    pub index: u32,
    pub file: Arc<DataFile>,
    state: Mutex<State>,
    /// Set when a write completed since the last barrier took this chunk.
    pub dirty: AtomicBool,
    /// The volume is a clone: a block with no version reads from the parent, so a discard
    /// of it must be stored (it hides the parent's block).
    pub has_parent: bool,
    /// Data a group leader wrote to free slots while its write's log entry replicated (see
    /// [`crate::store::ChunkStore::prewrite`]). No block map entry references these slots:
    /// the entry's apply takes them, or the proposer gives them back.
    prewritten: Mutex<Vec<Prewritten>>,
}

/// Blocks written ahead of their commit: `data` (whole blocks from `first`) goes to `slots`,
/// one per non-zero block, in order; `written` says when that write ended, and whether it
/// succeeded.
struct Prewritten {
    id: u64,
    first: u32,
    data: bytes::Bytes,
    slots: Vec<u32>,
    written: tokio::sync::oneshot::Receiver<bool>,
}

/// Result of a commit: whether it applied, and the change in data blocks held.
pub struct Committed {
    pub applied: bool,
    pub data_delta: i64,
    pub freed: usize,
}

impl Chunk {
    /// Builds the chunk from its persisted versions (by block, newest first).
    pub fn new(
        volume: u64,
        index: u32,
        file: Arc<DataFile>,
        versions: Vec<Version>,
        has_parent: bool,
    ) -> Self {
        let mut map = vec![NO_VERSION; BLOCKS_PER_CHUNK as usize];
        let mut used = Vec::new();
        for (b, epoch, e) in versions {
            if let Entry::Data { slot, .. } = e {
                used.push(slot);
            }
            if let Some(h) = map.get_mut(b as usize) {
                if h.entry == Entry::Hole {
                    *h = Head { entry: e, epoch, below: false };
                } else {
                    h.below = true;
                }
            }
        }
        let alloc = SlotAlloc::from_used(used.into_iter());
        Self {
            volume,
            index,
            file,
            state: Mutex::new(State { map, alloc }),
            dirty: AtomicBool::new(false),
            has_parent,
            prewritten: Mutex::new(Vec::new()),
        }
    }

    /// Records blocks being written ahead of their commit (see [`Self::take_prewritten`]);
    /// returns the id to give them back by.
    pub fn add_prewritten(
        &self,
        first: u32,
        data: bytes::Bytes,
        slots: Vec<u32>,
        written: tokio::sync::oneshot::Receiver<bool>,
    ) -> u64 {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        self.prewritten.lock().push(Prewritten { id, first, data, slots, written });
        id
    }

    /// The slots receiving exactly `data` at block `first` ahead of the commit that now
    /// applies it, if there are any, with the news of that write's end; they are the
    /// caller's from now on. The bytes are compared in full: a different write to the same
    /// blocks never takes them.
    pub fn take_prewritten(
        &self,
        first: u32,
        data: &[u8],
    ) -> Option<(Vec<u32>, tokio::sync::oneshot::Receiver<bool>)> {
        let mut pre = self.prewritten.lock();
        let i = pre.iter().position(|p| p.first == first && p.data[..] == *data)?;
        let p = pre.swap_remove(i);
        Some((p.slots, p.written))
    }

    /// Gives back prewritten slots nobody took (the entry failed, or applied without them);
    /// false if an apply took them. Only once the write to them ended.
    pub fn release_prewritten(&self, id: u64) -> bool {
        let slots = {
            let mut pre = self.prewritten.lock();
            let Some(i) = pre.iter().position(|p| p.id == id) else { return false };
            pre.swap_remove(i).slots
        };
        self.unalloc(&slots);
        true
    }

    /// The newest entries of blocks `[first, first + n)`.
    pub fn entries(&self, first: u32, n: u32) -> Vec<Entry> {
        let st = self.state.lock();
        st.map[first as usize..(first + n) as usize].iter().map(|h| h.entry).collect()
    }

    /// The heads of blocks `[first, first + n)`.
    pub fn heads(&self, first: u32, n: u32) -> Vec<Head> {
        let st = self.state.lock();
        st.map[first as usize..(first + n) as usize].to_vec()
    }

    pub fn entry(&self, block: u32) -> Entry {
        self.state.lock().map[block as usize].entry
    }

    pub fn alloc(&self, n: usize) -> Vec<u32> {
        self.state.lock().alloc.alloc(n)
    }

    pub fn unalloc(&self, slots: &[u32]) {
        self.state.lock().alloc.unalloc(slots);
    }

    /// Writes new entries (`Data`, `Zero`, or `Hole` to discard) of blocks: RocksDB first
    /// (one atomic batch), then the map. With `expect`, applies only if every block's newest
    /// entry still is the expected one (the compare-and-swap of read-modify-write). The
    /// versions a write overwrites are kept when a snapshot may read them (see
    /// [`crate::epoch`]); slots it stops referencing become pending.
    pub fn commit(
        &self,
        meta: &MetaStore,
        updates: &[(u32, Entry)],
        expect: Option<&[Entry]>,
        at: At<'_>,
    ) -> Result<Committed> {
        let mut st = self.state.lock();
        if let Some(expect) = expect {
            let same =
                updates.iter().zip(expect).all(|((b, _), e)| st.map[*b as usize].entry == *e);
            if !same {
                return Ok(Committed { applied: false, data_delta: 0, freed: 0 });
            }
        }
        let mut ops = Vec::with_capacity(updates.len() + 1);
        let mut heads = Vec::with_capacity(updates.len());
        // Old entries to free once the batch is written: (entry, punch).
        let mut frees: Vec<(Entry, bool)> = Vec::new();
        let mut delta = 0i64;
        for &(b, new) in updates {
            let h = st.map[b as usize];
            let discard = matches!(new, Entry::Hole | Entry::Discarded);
            let punch = !matches!(new, Entry::Data { .. });
            let (epoch, keep) = match at {
                At::InPlace => (h.epoch, false),
                At::Epoch { epoch, epochs } => {
                    if h.entry != Entry::Hole && h.epoch > epoch {
                        return Err(Error::Internal(format!(
                            "block {b} of chunk {}/{} has a version at epoch {} above the \
                             write's epoch {epoch} (floor {}, known {})",
                            self.volume, self.index, h.epoch, epochs.floor, epochs.known
                        )));
                    }
                    (epoch, h.entry != Entry::Hole && epochs.keeps(h.epoch, epoch))
                }
            };
            let head = if h.entry == Entry::Hole {
                // No version yet: a discard hides nothing, unless a parent's block shows.
                if discard && !self.has_parent {
                    continue;
                }
                let entry = if discard { Entry::Discarded } else { new };
                Head { entry, epoch, below: false }
            } else if keep {
                // The old version stays for a snapshot; the new one goes on top.
                let entry = if discard { Entry::Discarded } else { new };
                Head { entry, epoch, below: true }
            } else {
                // The old version goes.
                if h.epoch != epoch {
                    ops.push(BlockOp::Delete { block: b, epoch: h.epoch });
                }
                frees.push((h.entry, punch));
                match (discard, h.below) {
                    (true, false) => {
                        if h.epoch == epoch {
                            ops.push(BlockOp::Delete { block: b, epoch });
                        }
                        heads.push((b, NO_VERSION));
                        continue;
                    }
                    (true, true) => Head { entry: Entry::Discarded, epoch, below: true },
                    (false, below) => Head { entry: new, epoch, below },
                }
            };
            if head == h {
                frees.pop();
                continue;
            }
            ops.push(BlockOp::Put { block: b, epoch, entry: head.entry });
            heads.push((b, head));
        }
        // Held under the chunk lock so RocksDB sees updates of a block in map order.
        meta.write_entries(self.volume, self.index, &ops)?;
        let mut freed = 0;
        for (old, punch) in frees {
            if st.free(old, punch) {
                freed += 1;
                delta -= 1;
            }
        }
        for (b, head) in heads {
            if matches!(head.entry, Entry::Data { .. }) {
                delta += 1;
            }
            st.map[b as usize] = head;
        }
        Ok(Committed { applied: true, data_delta: delta, freed })
    }

    /// Removes every version of the chunk (their slots are punched after the next barrier).
    pub fn wipe(&self, meta: &MetaStore) -> Result<Committed> {
        let mut st = self.state.lock();
        let versions = meta.load_chunk(self.volume, self.index)?;
        if versions.is_empty() {
            return Ok(Committed { applied: true, data_delta: 0, freed: 0 });
        }
        let ops: Vec<BlockOp> =
            versions.iter().map(|&(block, epoch, _)| BlockOp::Delete { block, epoch }).collect();
        meta.write_entries(self.volume, self.index, &ops)?;
        let mut freed = 0;
        for (_, _, e) in versions {
            if st.free(e, true) {
                freed += 1;
            }
        }
        st.map.iter_mut().for_each(|h| *h = NO_VERSION);
        Ok(Committed { applied: true, data_delta: -(freed as i64), freed })
    }

    /// Stores versions `(block, epoch, entry)` another replica sent, into a chunk that has no
    /// other version at those epochs below the newest (it was wiped first); a version at the
    /// newest's epoch replaces it.
    pub fn install(&self, meta: &MetaStore, versions: &[Version]) -> Result<Committed> {
        let mut st = self.state.lock();
        let ops: Vec<BlockOp> = versions
            .iter()
            .map(|&(block, epoch, entry)| BlockOp::Put { block, epoch, entry })
            .collect();
        meta.write_entries(self.volume, self.index, &ops)?;
        let (mut delta, mut freed) = (0i64, 0usize);
        for &(b, epoch, entry) in versions {
            if matches!(entry, Entry::Data { .. }) {
                delta += 1;
            }
            let h = st.map[b as usize];
            let head = if h.entry == Entry::Hole {
                Head { entry, epoch, below: false }
            } else if epoch > h.epoch {
                Head { entry, epoch, below: true }
            } else if epoch == h.epoch {
                if st.free(h.entry, false) {
                    freed += 1;
                    delta -= 1;
                }
                Head { entry, epoch, below: h.below }
            } else {
                Head { below: true, ..h }
            };
            st.map[b as usize] = head;
        }
        Ok(Committed { applied: true, data_delta: delta, freed })
    }

    /// Deletes the versions `deletes` that still exist and stores `puts`, in one batch; the
    /// touched blocks' heads are then rebuilt from what is stored (a rollback's last step).
    pub fn apply_versions(
        &self,
        meta: &MetaStore,
        deletes: &[(u32, u64)],
        puts: &[Version],
    ) -> Result<Committed> {
        let mut st = self.state.lock();
        let before = meta.load_chunk(self.volume, self.index)?;
        let present: std::collections::HashMap<(u32, u64), Entry> =
            before.iter().map(|&(b, e, x)| ((b, e), x)).collect();
        let mut ops = Vec::new();
        let mut frees = Vec::new();
        for &(b, e) in deletes {
            if let Some(&old) = present.get(&(b, e)) {
                ops.push(BlockOp::Delete { block: b, epoch: e });
                frees.push(old);
            }
        }
        let mut delta = 0i64;
        for &(b, e, entry) in puts {
            if let Some(&old) = present.get(&(b, e)) {
                if !deletes.contains(&(b, e)) {
                    frees.push(old);
                }
            }
            if matches!(entry, Entry::Data { .. }) {
                delta += 1;
            }
            ops.push(BlockOp::Put { block: b, epoch: e, entry });
        }
        meta.write_entries(self.volume, self.index, &ops)?;
        let mut freed = 0;
        for e in frees {
            if st.free(e, true) {
                freed += 1;
                delta -= 1;
            }
        }
        let touched: std::collections::HashSet<u32> =
            deletes.iter().map(|d| d.0).chain(puts.iter().map(|p| p.0)).collect();
        for &b in &touched {
            st.map[b as usize] = NO_VERSION;
        }
        for (b, epoch, entry) in meta.load_chunk(self.volume, self.index)? {
            if !touched.contains(&b) {
                continue;
            }
            let h = &mut st.map[b as usize];
            if h.entry == Entry::Hole {
                *h = Head { entry, epoch, below: false };
            } else {
                h.below = true;
            }
        }
        Ok(Committed { applied: true, data_delta: delta, freed })
    }

    /// Removes the versions below the newest of blocks `[first, first + n)` that no snapshot
    /// of `epochs` sees any more (their slots go pending), and a discard with nothing left
    /// below it. Returns the data blocks freed.
    pub fn collect(&self, meta: &MetaStore, first: u32, n: u32, epochs: &Epochs) -> Result<usize> {
        let mut st = self.state.lock();
        // Blocks with one version and no discard have nothing to reclaim: skip the RocksDB
        // scan when the map says so for the whole range.
        let end = ((first as usize) + n as usize).min(st.map.len());
        let range = &st.map[(first as usize).min(end)..end];
        if !range.iter().any(|h| h.below || h.entry == Entry::Discarded) {
            return Ok(0);
        }
        let versions = meta.chunk_versions(self.volume, self.index, first, n)?;
        let mut ops = Vec::new();
        let mut frees = Vec::new();
        let mut heads = Vec::new();
        let mut i = 0;
        while i < versions.len() {
            let b = versions[i].0;
            let mut j = i;
            while j < versions.len() && versions[j].0 == b {
                j += 1;
            }
            let vs = &versions[i..j];
            i = j;
            // vs[0] is the newest; keep it, then walk down tracking the next kept epoch.
            let mut kept = vec![vs[0]];
            let mut next = vs[0].1;
            for &(_, epoch, entry) in &vs[1..] {
                if epochs.needed(epoch, next) {
                    kept.push((b, epoch, entry));
                    next = epoch;
                } else {
                    ops.push(BlockOp::Delete { block: b, epoch });
                    frees.push(entry);
                }
            }
            // A discard at the bottom hides nothing.
            while let Some(&(_, epoch, Entry::Discarded)) = kept.last() {
                ops.push(BlockOp::Delete { block: b, epoch });
                kept.pop();
            }
            let head = match kept.first() {
                None => NO_VERSION,
                Some(&(_, epoch, entry)) => Head { entry, epoch, below: kept.len() > 1 },
            };
            if head != st.map[b as usize] {
                heads.push((b, head));
            }
        }
        if ops.is_empty() {
            return Ok(0);
        }
        meta.write_entries(self.volume, self.index, &ops)?;
        let mut freed = 0;
        for e in frees {
            if st.free(e, true) {
                freed += 1;
            }
        }
        for (b, head) in heads {
            st.map[b as usize] = head;
        }
        Ok(freed)
    }

    /// Takes the pending slots, `(reuse, punch)`: the caller's barrier syncs metadata,
    /// punches the second list and then hands both back with [`Self::release`].
    pub fn take_pending(&self) -> (Vec<u32>, Vec<u32>) {
        let mut st = self.state.lock();
        (std::mem::take(&mut st.alloc.pending), std::mem::take(&mut st.alloc.pending_punch))
    }

    pub fn release(&self, slots: &[u32]) {
        self.state.lock().alloc.free.extend(slots.iter().copied());
    }

    /// Marks the chunk dirty; true if the caller must queue it for the next barrier.
    pub fn mark_dirty(&self) -> bool {
        !self.dirty.swap(true, Ordering::AcqRel)
    }
}

/// Groups `(index, slot)` pairs into runs where both go up by one: `(first slot, first
/// index, count)`. Each run is one contiguous I/O between a buffer and the data file.
pub fn slot_runs(pairs: impl IntoIterator<Item = (usize, u32)>) -> Vec<(u32, usize, usize)> {
    let mut runs: Vec<(u32, usize, usize)> = Vec::new();
    for (i, s) in pairs {
        match runs.last_mut() {
            Some((first, start, n)) if *first + (*n as u32) == s && *start + *n == i => *n += 1,
            _ => runs.push((s, i, 1)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_prefers_low_free_then_fresh() {
        let mut a = SlotAlloc::from_used([0, 2, 5].into_iter());
        assert_eq!(a.hwm(), 6);
        assert_eq!(a.free_count(), 3);
        assert_eq!(a.alloc(5), vec![1, 3, 4, 6, 7]);
        a.unalloc(&[3]);
        assert_eq!(a.alloc(1), vec![3]);
    }

    #[test]
    fn runs() {
        let slots = [4u32, 5, 6, 9, 10, 2];
        let runs = slot_runs(slots.iter().copied().enumerate());
        assert_eq!(runs, vec![(4, 0, 3), (9, 3, 2), (2, 5, 1)]);
        // A gap in the indices (a hole between two data blocks) splits a run too.
        assert_eq!(slot_runs([(0, 7), (2, 8)]), vec![(7, 0, 1), (8, 2, 1)]);
        assert!(slot_runs([]).is_empty());
    }
}
