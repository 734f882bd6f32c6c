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
//! The map is the in-memory image of the chunk's head-epoch keys in RocksDB; both are changed
//! together under the chunk's lock, RocksDB first.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tern_common::BLOCKS_PER_CHUNK;

use crate::engine::DataFile;
use crate::error::Result;
use crate::meta::{Entry, MetaStore};

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

struct State {
    map: Vec<Entry>,
    alloc: SlotAlloc,
}

pub struct Chunk {
    pub volume: u64,
    pub index: u32,
    pub file: Arc<DataFile>,
    state: Mutex<State>,
    /// Set when a write completed since the last barrier took this chunk.
    pub dirty: AtomicBool,
}

/// Result of a commit: whether it applied, and the change in data blocks held.
pub struct Committed {
    pub applied: bool,
    pub data_delta: i64,
    pub freed: usize,
}

impl Chunk {
    /// Builds the chunk from its persisted entries.
    pub fn new(volume: u64, index: u32, file: Arc<DataFile>, entries: Vec<(u32, Entry)>) -> Self {
        let mut map = vec![Entry::Hole; BLOCKS_PER_CHUNK as usize];
        for (b, e) in entries {
            if let Some(slot) = map.get_mut(b as usize) {
                *slot = e;
            }
        }
        let alloc = SlotAlloc::from_used(map.iter().filter_map(|e| match e {
            Entry::Data { slot, .. } => Some(*slot),
            _ => None,
        }));
        Self {
            volume,
            index,
            file,
            state: Mutex::new(State { map, alloc }),
            dirty: AtomicBool::new(false),
        }
    }

    /// The entries of blocks `[first, first + n)`.
    pub fn entries(&self, first: u32, n: u32) -> Vec<Entry> {
        let st = self.state.lock();
        st.map[first as usize..(first + n) as usize].to_vec()
    }

    pub fn entry(&self, block: u32) -> Entry {
        self.state.lock().map[block as usize]
    }

    pub fn alloc(&self, n: usize) -> Vec<u32> {
        self.state.lock().alloc.alloc(n)
    }

    pub fn unalloc(&self, slots: &[u32]) {
        self.state.lock().alloc.unalloc(slots);
    }

    /// Switches blocks to new entries: RocksDB first (one atomic batch), then the map. With
    /// `expect`, applies only if every block still holds the expected entry (the
    /// compare-and-swap of read-modify-write). Slots the update stops referencing become
    /// pending.
    pub fn commit(
        &self,
        meta: &MetaStore,
        updates: &[(u32, Entry)],
        expect: Option<&[Entry]>,
    ) -> Result<Committed> {
        let mut st = self.state.lock();
        if let Some(expect) = expect {
            let same = updates.iter().zip(expect).all(|((b, _), e)| st.map[*b as usize] == *e);
            if !same {
                return Ok(Committed { applied: false, data_delta: 0, freed: 0 });
            }
        }
        // Held under the chunk lock so RocksDB sees updates of a block in map order.
        meta.write_entries(self.volume, self.index, updates)?;
        let mut delta = 0i64;
        let mut freed = 0;
        for &(b, new) in updates {
            let old = std::mem::replace(&mut st.map[b as usize], new);
            if let Entry::Data { slot, .. } = old {
                if matches!(new, Entry::Data { .. }) {
                    st.alloc.pending.push(slot);
                } else {
                    st.alloc.pending_punch.push(slot);
                }
                freed += 1;
                delta -= 1;
            }
            if matches!(new, Entry::Data { .. }) {
                delta += 1;
            }
        }
        Ok(Committed { applied: true, data_delta: delta, freed })
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
