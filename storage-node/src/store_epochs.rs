//! The chunk store's side of snapshots: versions below the newest (see [`crate::epoch`]).
//!
//! Reclaiming versions, the changed blocks between two epochs, the space snapshots hold, and
//! moving every version of a chunk to another replica.

use std::collections::BTreeMap;

use super::*;

/// Blocks per step of a background reclaim (one RocksDB scan and batch under the chunk
/// lock). Steps run one at a time on the whole node, however many groups and volumes
/// reclaim, with a pause after each: `COLLECT_PAUSE` on an idle node (about 50k blocks, 200
/// MiB of address space, a second), `COLLECT_PAUSE_BUSY` while reads and writes come in
/// (about 5k blocks a second, a step taking a few milliseconds: client I/O keeps the chunk
/// locks, the disk and the cores, in the spirit of Ceph's `osd_snap_trim_sleep`).
const COLLECT_STEP: u32 = 1024;
const COLLECT_PAUSE: Duration = Duration::from_millis(20);
const COLLECT_PAUSE_BUSY: Duration = Duration::from_millis(200);

/// Space a volume's versions hold in one group, in blocks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Data blocks of every version.
    pub total: u64,
    /// Data blocks only the head reads.
    pub head_only: u64,
    /// Data blocks only one snapshot reads, by its epoch.
    pub exclusive: BTreeMap<u64, u64>,
}

impl Usage {
    pub fn add(&mut self, o: &Usage) {
        self.total += o.total;
        self.head_only += o.head_only;
        for (e, n) in &o.exclusive {
            *self.exclusive.entry(*e).or_default() += n;
        }
    }
}

/// Splits versions (by block, newest first) into one slice per block.
fn per_block(versions: &[Version]) -> impl Iterator<Item = &[Version]> {
    let mut i = 0;
    std::iter::from_fn(move || {
        if i >= versions.len() {
            return None;
        }
        let b = versions[i].0;
        let start = i;
        while i < versions.len() && versions[i].0 == b {
            i += 1;
        }
        Some(&versions[start..i])
    })
}

impl ChunkStore {
    /// Every stored version of a chunk (by block, newest first).
    pub async fn chunk_versions(&self, v: &Volume, index: u32) -> Result<Vec<Version>> {
        let meta = self.meta.clone();
        let volume = v.id.0;
        tokio::task::spawn_blocking(move || meta.load_chunk(volume, index))
            .await
            .map_err(|e| Error::Internal(e.to_string()))?
    }

    /// Whether a chunk holds any version.
    pub async fn chunk_is_empty(&self, v: &Volume, index: u32) -> Result<bool> {
        let c = self.chunk(v, index).await?;
        Ok(c.heads(0, BLOCKS_PER_CHUNK as u32).iter().all(|h| h.entry == Entry::Hole))
    }

    /// The data of `entries` (blocks of chunk `index`, each a stored version), checksums
    /// verified: `None` if one of them no longer matches because the version was reclaimed
    /// meanwhile (the caller reads the versions again).
    pub async fn read_entries(
        &self,
        v: &Volume,
        index: u32,
        entries: &[Entry],
    ) -> Result<Option<Vec<u8>>> {
        let c = self.chunk(v, index).await?;
        let mut out = vec![0u8; entries.len() * BS as usize];
        self.read_blocks(v, &c, entries, &mut out).await?;
        for (i, e) in entries.iter().enumerate() {
            if let Entry::Data { crc, .. } = *e {
                if crc32c::crc32c(&out[i * BS as usize..(i + 1) * BS as usize]) != crc {
                    return Ok(None);
                }
            }
        }
        Ok(Some(out))
    }

    /// Removes every version of a chunk (a replica about to receive the chunk from another).
    pub async fn wipe_chunk(&self, v: &Volume, index: u32) -> Result<()> {
        let c = self.chunk(v, index).await?;
        let done = c.wipe(&self.meta)?;
        self.note_committed(v, &c, done.data_delta, done.freed);
        Ok(())
    }

    /// Stores one version of blocks `[first, first + n)` of a chunk as another replica sent
    /// it: `data` for data blocks, else `entry` (`Zero` or `Discarded`) for each. A version
    /// at the same epoch is replaced; the newest version of each block becomes its head.
    #[allow(clippy::too_many_arguments)]
    pub async fn install_version(
        &self,
        v: &Volume,
        index: u32,
        first: u32,
        epoch: u64,
        entry: Entry,
        n: u32,
        data: Option<Bytes>,
    ) -> Result<()> {
        let c = self.chunk(v, index).await?;
        let mut versions: Vec<Version> = Vec::with_capacity(n as usize);
        let mut slots = Vec::new();
        if let Some(data) = &data {
            if data.len() as u64 != u64::from(n) * BS {
                return Err(Error::Internal("snapshot record of the wrong length".into()));
            }
            slots = c.alloc(n as usize);
            self.write_to_slots(v, &c, &slots, |i| &data[i * BS as usize..(i + 1) * BS as usize])
                .await?;
        }
        for i in 0..n {
            let e = match &data {
                Some(d) => Entry::Data {
                    slot: slots[i as usize],
                    crc: crc32c::crc32c(
                        &d[i as usize * BS as usize..(i as usize + 1) * BS as usize],
                    ),
                },
                None => entry,
            };
            versions.push((first + i, epoch, e));
        }
        let done = c.install(&self.meta, &versions)?;
        self.note_committed(v, &c, done.data_delta, done.freed);
        Ok(())
    }

    /// Reclaims, in the background and at a bounded rate, the versions of `chunks` that no
    /// snapshot of `epochs` sees any more (after a snapshot's deletion). Returns the data
    /// blocks freed.
    pub async fn collect(&self, v: &Volume, chunks: &[u32], epochs: &Epochs) -> Result<u64> {
        let mut freed = 0u64;
        for &index in chunks {
            let c = self.chunk(v, index).await?;
            let mut first = 0;
            while first < BLOCKS_PER_CHUNK as u32 {
                let (meta, c2, e) = (self.meta.clone(), c.clone(), epochs.clone());
                let gate = self.reclaim_gate.lock().await;
                let io_before = self.io_count.load(Ordering::Relaxed);
                let n =
                    tokio::task::spawn_blocking(move || c2.collect(&meta, first, COLLECT_STEP, &e))
                        .await
                        .map_err(|e| Error::Internal(e.to_string()))??;
                self.note_committed(v, &c, -(n as i64), n);
                freed += n as u64;
                first += COLLECT_STEP;
                // Steps that found nothing cost a map walk only: no pause for them.
                if n > 0 {
                    tokio::time::sleep(COLLECT_PAUSE).await;
                    let busy = self.io_count.load(Ordering::Relaxed) != io_before;
                    if busy {
                        tokio::time::sleep(COLLECT_PAUSE_BUSY - COLLECT_PAUSE).await;
                    }
                }
                drop(gate);
            }
        }
        Ok(freed)
    }

    /// Rolls `chunks` back to snapshot `to`: afterwards each block reads as the snapshot saw
    /// it. Versions newer than the snapshot that no live snapshot of `epochs` sees go; where
    /// some remain (later snapshots hold them), the snapshot's content is copied on top at
    /// `floor`, the epoch writes go to. Deterministic, and idempotent on re-apply.
    pub async fn rollback(
        &self,
        v: &Volume,
        chunks: &[u32],
        to: u64,
        floor: u64,
        epochs: &Epochs,
    ) -> Result<()> {
        for &index in chunks {
            let c = self.chunk(v, index).await?;
            let versions = self.chunk_versions(v, index).await?;
            let mut deletes: Vec<(u32, u64)> = Vec::new();
            let mut copies: Vec<(u32, Entry)> = Vec::new();
            for vs in per_block(&versions) {
                let b = vs[0].0;
                let above: Vec<&Version> = vs.iter().filter(|x| x.1 > to).collect();
                if above.is_empty() {
                    continue;
                }
                let seen = vs.iter().find(|x| x.1 <= to).map_or(Entry::Hole, |x| x.2);
                let mut kept = false;
                let mut next = floor;
                for &&(_, e, _) in &above {
                    if epochs.needed(e, next) {
                        kept = true;
                        next = e;
                    } else {
                        deletes.push((b, e));
                    }
                }
                if kept {
                    copies.push((b, seen));
                }
            }
            if deletes.is_empty() && copies.is_empty() {
                continue;
            }
            // Copies of the snapshot's data go to fresh slots first.
            let data: Vec<Entry> = copies
                .iter()
                .filter(|(_, e)| matches!(e, Entry::Data { .. }))
                .map(|x| x.1)
                .collect();
            let slots = c.alloc(data.len());
            let mut puts: Vec<Version> = Vec::with_capacity(copies.len());
            if !data.is_empty() {
                let bytes = match self.read_entries(v, index, &data).await {
                    Ok(Some(b)) => b,
                    Ok(None) => {
                        c.unalloc(&slots);
                        return Err(Error::Internal(format!(
                            "a version of chunk {index} of volume {} that snapshot {to} sees \
                             does not match its checksum",
                            v.id
                        )));
                    }
                    Err(e) => {
                        c.unalloc(&slots);
                        return Err(e);
                    }
                };
                let block = |i: usize| &bytes[i * BS as usize..(i + 1) * BS as usize];
                self.write_to_slots(v, &c, &slots, block).await?;
            }
            let mut si = 0;
            for (b, e) in copies {
                let entry = match e {
                    Entry::Data { crc, .. } => {
                        si += 1;
                        Entry::Data { slot: slots[si - 1], crc }
                    }
                    Entry::Zero => Entry::Zero,
                    Entry::Hole | Entry::Discarded => Entry::Discarded,
                };
                puts.push((b, floor, entry));
            }
            match c.apply_versions(&self.meta, &deletes, &puts) {
                Ok(done) => self.note_committed(v, &c, done.data_delta, done.freed),
                Err(e) => {
                    c.unalloc(&slots);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Copies into the clone `v` the blocks of `chunks` that some epoch of it still reads
    /// from its parent's snapshot: those with no version at all, and those whose oldest
    /// version is newer than one of the clone's live snapshots (`epochs`). The copies go in
    /// at epoch 0, beneath every version of the clone (whose epochs start at 1), so every
    /// epoch of the clone reads them where it read the parent. Only blocks holding data
    /// there are copied (the rest reads as zeros without a parent too). Afterwards the clone
    /// no longer needs its parent. Idempotent (a block with an epoch-0 version is done).
    pub async fn copy_up(&self, v: &Volume, chunks: &[u32], epochs: &Epochs) -> Result<()> {
        let Some(p) = v.parent() else { return Ok(()) };
        let oldest_snapshot = epochs.snapshots.first().copied();
        for &index in chunks {
            let c = self.chunk(v, index).await?;
            let versions = self.chunk_versions(v, index).await?;
            let mut oldest: Vec<Option<u64>> = vec![None; BLOCKS_PER_CHUNK as usize];
            for &(b, e, _) in &versions {
                let o = &mut oldest[b as usize];
                *o = Some(o.map_or(e, |x| x.min(e)));
            }
            let inherits = |b: usize| match oldest[b] {
                None => true,
                Some(0) => false,
                Some(m) => oldest_snapshot.is_some_and(|s| s < m),
            };
            let mut b = 0usize;
            while b < oldest.len() {
                if !inherits(b) {
                    b += 1;
                    continue;
                }
                // A run of inherited blocks, at most 256 (1 MiB) at a time.
                let start = b;
                while b < oldest.len() && inherits(b) && b - start < 256 {
                    b += 1;
                }
                let n = b - start;
                let mut data = vec![0u8; n * BS as usize];
                let holes = vec![Entry::Hole; n];
                self.fill_from_parent(p, &c, start as u32, &holes, &mut data).await?;
                let block = |i: usize| &data[i * BS as usize..(i + 1) * BS as usize];
                let keep: Vec<usize> = (0..n).filter(|&i| !is_zero(block(i))).collect();
                if keep.is_empty() {
                    continue;
                }
                let slots = c.alloc(keep.len());
                self.write_to_slots(v, &c, &slots, |i| block(keep[i])).await?;
                let copies: Vec<Version> = keep
                    .iter()
                    .zip(&slots)
                    .map(|(&i, &slot)| {
                        let crc = crc32c::crc32c(block(i));
                        ((start + i) as u32, 0, Entry::Data { slot, crc })
                    })
                    .collect();
                match c.install(&self.meta, &copies) {
                    Ok(done) => self.note_committed(v, &c, done.data_delta, done.freed),
                    Err(e) => {
                        c.unalloc(&slots);
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// The ranges of `chunks` whose content differs between epochs `from` and `to` (0 for
    /// `to`: the head; 0 for `from`: nothing, so every allocated range counts). Both must be
    /// live snapshots (or the head): then a block changed exactly when the version `to` sees
    /// is newer than `from`.
    pub async fn changes(
        &self,
        v: &Volume,
        chunks: &[u32],
        from: u64,
        to: u64,
    ) -> Result<Vec<Change>> {
        let mut out: Vec<Change> = Vec::new();
        for &index in chunks {
            let versions = self.chunk_versions(v, index).await?;
            for vs in per_block(&versions) {
                let seen = vs.iter().find(|(_, e, _)| to == 0 || *e <= to);
                let Some(&(b, epoch, entry)) = seen else { continue };
                let changed = if from == 0 {
                    matches!(entry, Entry::Data { .. } | Entry::Zero)
                } else {
                    epoch > from
                };
                if !changed {
                    continue;
                }
                let off = u64::from(index) * CHUNK_SIZE + u64::from(b) * BS;
                let zero = !matches!(entry, Entry::Data { .. });
                match out.last_mut() {
                    Some((o, l, z)) if *o + *l == off && *z == zero => *l += BS,
                    _ => out.push((off, BS, zero)),
                }
            }
        }
        Ok(out)
    }

    /// The space `chunks`' versions hold: in all, only for the head, and only for each
    /// snapshot of `epochs`.
    pub async fn usage(&self, v: &Volume, chunks: &[u32], epochs: &Epochs) -> Result<Usage> {
        let mut u = Usage::default();
        for &index in chunks {
            let versions = self.chunk_versions(v, index).await?;
            for vs in per_block(&versions) {
                let mut next = u64::MAX;
                for (i, &(_, epoch, entry)) in vs.iter().enumerate() {
                    if matches!(entry, Entry::Data { .. }) {
                        u.total += 1;
                        let mut readers = epochs.snapshots.range(epoch..next);
                        let first = readers.next();
                        let more = readers.next().is_some();
                        match (i == 0, first, more) {
                            (true, None, _) => u.head_only += 1,
                            (false, Some(s), false) => *u.exclusive.entry(*s).or_default() += 1,
                            _ => {}
                        }
                    }
                    next = epoch;
                }
            }
        }
        Ok(u)
    }
}
