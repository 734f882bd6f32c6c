//! The metadata store: one RocksDB instance per storage node, holding volume records and the
//! block map (which blocks exist, in which slot of which data file, with which checksum).
//! Key layout is owned by [`crate::keys`]; this module owns the value encodings.
//!
//! Durability: writes here go to RocksDB's WAL (a `write()` per batch, so a killed process
//! loses nothing); [`MetaStore::sync_wal`] makes them survive power loss too, and is called by
//! the store's durability barrier only after the data files were fdatasynced.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use rocksdb::{Direction, IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};

use crate::epoch::Epochs;
use crate::error::{Error, Result};
use crate::keys::{self, BlockKey};

/// What a volume is: persisted as JSON under its volume key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: u64,
    pub name: String,
    pub size: u64,
    #[serde(default)]
    pub read_only: bool,
    pub created_at: u64,
    #[serde(default = "default_class")]
    pub storage_class: String,
    #[serde(default)]
    pub tenant: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// A clone's parent: blocks the clone has no version of read from there.
    #[serde(default)]
    pub parent: Option<Parent>,
    /// The id its chunks are placed by (a clone's is its parent's: their chunks share chunk
    /// groups, so a replica reads a clone's unwritten blocks from its own copy of the
    /// parent). 0: the volume's own id.
    #[serde(default)]
    pub placement: u64,
    /// A `local` volume on a cluster: the node holding it (0: replicated, or a single
    /// node's own).
    #[serde(default)]
    pub home: u64,
}

/// The snapshot a clone was made from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parent {
    pub volume: u64,
    pub epoch: u64,
}

impl VolumeRecord {
    /// The id chunk groups are chosen by.
    pub fn placement(&self) -> u64 {
        if self.placement == 0 {
            self.id
        } else {
            self.placement
        }
    }
}

fn retired_key(group: u32) -> String {
    format!("retired-group-{group}")
}

fn default_class() -> String {
    "local".to_string()
}

/// The state of one block at one epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// No version at all: never written, or trimmed with nothing older to hide. Reads as
    /// zeros, holds no space. Not stored.
    Hole,
    /// Trimmed or punched over older versions a snapshot still sees: reads as zeros, holds no
    /// space, hides what is below it. Stored.
    Discarded,
    /// Written as zeros (or zeroed without punching): reads as zeros, holds no space.
    Zero,
    /// Data in slot `slot` of the chunk's data file, with crc32c `crc` of its 4096 bytes.
    Data { slot: u32, crc: u32 },
}

const ENTRY_ZERO: u8 = 1;
const ENTRY_DATA: u8 = 2;
const ENTRY_DISCARDED: u8 = 3;

/// One change of a block map batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockOp {
    /// Sets the version of `block` at `epoch` (never to [`Entry::Hole`]).
    Put { block: u32, epoch: u64, entry: Entry },
    /// Removes the version of `block` at `epoch`.
    Delete { block: u32, epoch: u64 },
}

/// One stored version of a block: `(block within its chunk, epoch, entry)`.
pub type Version = (u32, u64, Entry);

impl Entry {
    pub fn encode(self) -> Option<[u8; 9]> {
        let mut out = [0u8; 9];
        match self {
            Entry::Hole => return None,
            Entry::Zero => out[0] = ENTRY_ZERO,
            Entry::Discarded => out[0] = ENTRY_DISCARDED,
            Entry::Data { slot, crc } => {
                out[0] = ENTRY_DATA;
                out[1..5].copy_from_slice(&slot.to_le_bytes());
                out[5..9].copy_from_slice(&crc.to_le_bytes());
            }
        }
        Some(out)
    }

    pub fn decode(v: &[u8]) -> Option<Entry> {
        match (v.len(), v.first()?) {
            (9, &ENTRY_ZERO) => Some(Entry::Zero),
            (9, &ENTRY_DISCARDED) => Some(Entry::Discarded),
            (9, &ENTRY_DATA) => Some(Entry::Data {
                slot: u32::from_le_bytes(v[1..5].try_into().ok()?),
                crc: u32::from_le_bytes(v[5..9].try_into().ok()?),
            }),
            _ => None,
        }
    }
}

pub struct MetaStore {
    db: DB,
}

const NEXT_VOLUME_ID: &str = "next_volume_id";

impl MetaStore {
    pub fn open(path: &Path) -> Result<Self> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.set_max_background_jobs(2);
        opts.set_bytes_per_sync(1 << 20);
        // Values are block-map entries and Raft log entries carrying block data (rarely
        // compressible): compression only costs CPU.
        opts.set_compression_type(rocksdb::DBCompressionType::None);
        Ok(Self { db: DB::open(&opts, path)? })
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// Makes every write so far durable against power loss.
    pub fn sync_wal(&self) -> Result<()> {
        self.db.flush_wal(true)?;
        Ok(())
    }

    pub fn load_volumes(&self) -> Result<Vec<VolumeRecord>> {
        let mut out = Vec::new();
        let start = [keys::PREFIX_VOLUME];
        for item in self.db.iterator(IteratorMode::From(&start, Direction::Forward)) {
            let (k, v) = item?;
            if k.first() != Some(&keys::PREFIX_VOLUME) {
                break;
            }
            let rec: VolumeRecord = serde_json::from_slice(&v).map_err(|e| Error::CorruptMeta {
                key: format!("{k:02x?}"),
                what: e.to_string(),
            })?;
            out.push(rec);
        }
        Ok(out)
    }

    /// Allocates the next volume id (persisted with the volume by [`Self::put_volume`]).
    pub fn next_volume_id(&self) -> Result<u64> {
        match self.db.get(keys::meta_key(NEXT_VOLUME_ID))? {
            None => Ok(1),
            Some(v) => Ok(u64::from_be_bytes(v.as_slice().try_into().map_err(|_| {
                Error::CorruptMeta { key: NEXT_VOLUME_ID.into(), what: "not 8 bytes".into() }
            })?)),
        }
    }

    /// Creates or updates a volume record, durably (synced) before returning.
    pub fn put_volume(&self, rec: &VolumeRecord, old_name: Option<&str>) -> Result<()> {
        let mut b = WriteBatch::default();
        b.put(keys::volume_key(rec.id), serde_json::to_vec(rec).expect("record serializes"));
        if let Some(old) = old_name.filter(|o| *o != rec.name) {
            b.delete(keys::volume_name_key(old));
        }
        b.put(keys::volume_name_key(&rec.name), rec.id.to_be_bytes());
        let next = self.next_volume_id()?.max(rec.id + 1);
        b.put(keys::meta_key(NEXT_VOLUME_ID), next.to_be_bytes());
        self.write(b, true)
    }

    /// Deletes a volume record and all its blocks, durably.
    pub fn delete_volume(&self, rec: &VolumeRecord) -> Result<()> {
        let mut b = WriteBatch::default();
        let (s, e) = keys::volume_blocks_range(rec.id);
        b.delete_range(s, e);
        b.delete(keys::volume_key(rec.id));
        b.delete(keys::volume_name_key(&rec.name));
        self.write(b, true)
    }

    /// Every stored version of blocks `[first, first + n)` of one chunk, by block, newest
    /// first (one consistent view).
    pub fn chunk_versions(
        &self,
        volume: u64,
        chunk: u32,
        first: u32,
        n: u32,
    ) -> Result<Vec<Version>> {
        let s = keys::block_key(BlockKey { volume, chunk, block: first, epoch: u64::MAX });
        let end = first as u64 + n as u64;
        let e = if end > u32::MAX as u64 {
            keys::chunk_blocks_range(volume, chunk).1
        } else {
            keys::block_key(BlockKey { volume, chunk, block: end as u32, epoch: u64::MAX }).to_vec()
        };
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(e);
        let mut out = Vec::new();
        for item in self.db.iterator_opt(IteratorMode::From(&s, Direction::Forward), ro) {
            let (k, v) = item?;
            out.push(decode_version(&k, &v)?);
        }
        Ok(out)
    }

    /// Every stored version of one chunk (see [`Self::chunk_versions`]).
    pub fn load_chunk(&self, volume: u64, chunk: u32) -> Result<Vec<Version>> {
        self.chunk_versions(volume, chunk, 0, u32::MAX)
    }

    /// The entry each of `blocks` (of one chunk) has at `epoch`: its newest version at or
    /// below it, [`Entry::Hole`] if none.
    pub fn entries_at(
        &self,
        volume: u64,
        chunk: u32,
        blocks: impl Iterator<Item = u32>,
        epoch: u64,
    ) -> Result<Vec<Entry>> {
        let mut it = self.db.raw_iterator();
        let mut out = Vec::new();
        for block in blocks {
            it.seek(keys::block_key(BlockKey { volume, chunk, block, epoch }));
            let mut entry = Entry::Hole;
            if it.valid() {
                if let (Some(k), Some(v)) = (it.key(), it.value()) {
                    let (b, _, e) = match keys::parse_block_key(k) {
                        Some(key) if key.volume == volume && key.chunk == chunk => {
                            decode_version(k, v)?
                        }
                        _ => (u32::MAX, 0, Entry::Hole),
                    };
                    if b == block {
                        entry = e;
                    }
                }
            }
            it.status()?;
            out.push(entry);
        }
        Ok(out)
    }

    /// The epoch states of `group`'s volumes.
    pub fn epochs(&self, group: u32) -> Result<Vec<(u64, Epochs)>> {
        let (s, e) = keys::epochs_range(group);
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(e.to_vec());
        let mut out = Vec::new();
        for item in self.db.iterator_opt(IteratorMode::From(&s, Direction::Forward), ro) {
            let (k, v) = item?;
            let bad = |what: String| Error::CorruptMeta { key: format!("{k:02x?}"), what };
            let volume =
                keys::parse_epochs_key(&k).ok_or_else(|| bad("not an epoch key".into()))?;
            let epochs: Epochs = bincode::deserialize(&v).map_err(|e| bad(e.to_string()))?;
            out.push((volume, epochs));
        }
        Ok(out)
    }

    /// Stores a volume's epoch state in `group` (WAL written, not synced: the entry that
    /// changed it is in the group's log, replayed after a crash).
    pub fn put_epochs(&self, group: u32, volume: u64, epochs: &Epochs) -> Result<()> {
        let mut b = WriteBatch::default();
        b.put(keys::epochs_key(group, volume), bincode::serialize(epochs).expect("encodes"));
        self.write(b, false)
    }

    /// Forgets a volume's epoch state in `group` (the volume was deleted).
    pub fn delete_epochs(&self, group: u32, volume: u64) -> Result<()> {
        let mut b = WriteBatch::default();
        b.delete(keys::epochs_key(group, volume));
        self.write(b, false)
    }

    /// Data blocks held by each volume (one scan at start-up).
    pub fn count_data_blocks(&self) -> Result<HashMap<u64, u64>> {
        let mut out = HashMap::new();
        let start = [keys::PREFIX_BLOCK];
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(vec![keys::PREFIX_BLOCK + 1]);
        for item in self.db.iterator_opt(IteratorMode::From(&start, Direction::Forward), ro) {
            let (k, v) = item?;
            if let (Some(key), Some(Entry::Data { .. })) =
                (keys::parse_block_key(&k), Entry::decode(&v))
            {
                *out.entry(key.volume).or_insert(0) += 1;
            }
        }
        Ok(out)
    }

    // ----- Raft groups (log and state; the layout is in `keys`) ---------------------------

    /// Appends encoded log entries `(index, bytes)` of `group` in one batch. Written to the
    /// WAL, not synced: the log store's flusher runs a barrier when an entry needs it.
    pub fn raft_append(&self, group: u32, entries: &[(u64, Vec<u8>)]) -> Result<()> {
        let mut b = WriteBatch::default();
        for (index, bytes) in entries {
            b.put(keys::raft_log_key(group, *index), bytes);
        }
        self.write(b, false)
    }

    /// Encoded log entries of `group` with index in `[from, to)`, in order.
    pub fn raft_entries(&self, group: u32, from: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        let (s, e) = keys::raft_log_range(group, from, to);
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(e.to_vec());
        let mut out = Vec::new();
        for item in self.db.iterator_opt(IteratorMode::From(&s, Direction::Forward), ro) {
            let (k, v) = item?;
            let (_, index) = keys::parse_raft_log_key(&k).ok_or_else(|| Error::CorruptMeta {
                key: format!("{k:02x?}"),
                what: "not a Raft log key".into(),
            })?;
            out.push((index, v.to_vec()));
        }
        Ok(out)
    }

    /// The last log entry of `group`, if any.
    pub fn raft_last_entry(&self, group: u32) -> Result<Option<Vec<u8>>> {
        let (s, e) = keys::raft_group_log_range(group);
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(s);
        let mut it = self.db.iterator_opt(IteratorMode::From(&e, Direction::Reverse), ro);
        match it.next() {
            Some(item) => Ok(Some(item?.1.to_vec())),
            None => Ok(None),
        }
    }

    /// Deletes `group`'s log entries with index in `[from, to)`, with `state` updates in the
    /// same batch (e.g. the last purged log id).
    pub fn raft_delete(
        &self,
        group: u32,
        from: u64,
        to: u64,
        state: Option<(keys::RaftField, Vec<u8>)>,
    ) -> Result<()> {
        let mut b = WriteBatch::default();
        let (s, e) = keys::raft_log_range(group, from, to);
        b.delete_range(s, e);
        if let Some((field, v)) = state {
            b.put(keys::raft_state_key(group, field), v);
        }
        self.write(b, false)
    }

    /// Forgets everything of `group`'s Raft replica here: its log, vote, applied state and
    /// snapshot meta, fences and epoch states, in one synced batch (the replica was moved to
    /// another node; the group's chunks are wiped after this, see `Cluster::retire`).
    pub fn forget_group(&self, group: u32) -> Result<()> {
        let mut b = WriteBatch::default();
        let (s, e) = keys::raft_group_log_range(group);
        b.delete_range(s, e);
        for f in [
            keys::RaftField::Vote,
            keys::RaftField::Committed,
            keys::RaftField::LastPurged,
            keys::RaftField::Applied,
            keys::RaftField::Snapshot,
        ] {
            b.delete(keys::raft_state_key(group, f));
        }
        let (s, e) = keys::fence_range(group);
        b.delete_range(s, e);
        let (s, e) = keys::epochs_range(group);
        b.delete_range(s, e);
        // So that a restart does not initialize the group here again from a static placement.
        b.put(keys::meta_key(&retired_key(group)), [1u8]);
        self.write(b, true)
    }

    /// Whether this node's replica of `group` retired (see [`Self::forget_group`]).
    pub fn retired_group(&self, group: u32) -> Result<bool> {
        Ok(self.db.get(keys::meta_key(&retired_key(group)))?.is_some())
    }

    /// The fencing generations of `group`'s volumes (volume -> generation).
    pub fn fences(&self, group: u32) -> Result<Vec<(u64, u64)>> {
        let (s, e) = keys::fence_range(group);
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(e.to_vec());
        let mut out = Vec::new();
        for item in self.db.iterator_opt(IteratorMode::From(&s, Direction::Forward), ro) {
            let (k, v) = item?;
            let bad =
                |what: &str| Error::CorruptMeta { key: format!("{k:02x?}"), what: what.into() };
            let volume = keys::parse_fence_key(&k).ok_or_else(|| bad("not a fence key"))?;
            let generation =
                u64::from_be_bytes(v.as_ref().try_into().map_err(|_| bad("not 8 bytes"))?);
            out.push((volume, generation));
        }
        Ok(out)
    }

    /// Sets a volume's fencing generation in `group` (WAL written, not synced: the fence
    /// entry's own durability is the log's, see `replication::log_store`).
    pub fn put_fence(&self, group: u32, volume: u64, generation: u64) -> Result<()> {
        let mut b = WriteBatch::default();
        b.put(keys::fence_key(group, volume), generation.to_be_bytes());
        self.write(b, false)
    }

    pub fn raft_state(&self, group: u32, field: keys::RaftField) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get(keys::raft_state_key(group, field))?)
    }

    /// Stores one field of a group's state; `sync` for what must survive power loss before
    /// the caller goes on (the vote).
    pub fn put_raft_state(
        &self,
        group: u32,
        field: keys::RaftField,
        value: &[u8],
        sync: bool,
    ) -> Result<()> {
        let mut b = WriteBatch::default();
        b.put(keys::raft_state_key(group, field), value);
        self.write(b, sync)
    }

    /// Applies block map changes of one chunk in one atomic batch (WAL written, not synced:
    /// see the module comment).
    pub fn write_entries(&self, volume: u64, chunk: u32, ops: &[BlockOp]) -> Result<()> {
        let mut b = WriteBatch::default();
        for op in ops {
            match *op {
                BlockOp::Put { block, epoch, entry } => {
                    let k = keys::block_key(BlockKey { volume, chunk, block, epoch });
                    match entry.encode() {
                        Some(v) => b.put(k, v),
                        None => b.delete(k),
                    }
                }
                BlockOp::Delete { block, epoch } => {
                    b.delete(keys::block_key(BlockKey { volume, chunk, block, epoch }));
                }
            }
        }
        self.write(b, false)
    }
}

fn decode_version(k: &[u8], v: &[u8]) -> Result<Version> {
    let key = keys::parse_block_key(k).ok_or_else(|| Error::CorruptMeta {
        key: format!("{k:02x?}"),
        what: "not a block key".into(),
    })?;
    let entry = Entry::decode(v).ok_or_else(|| Error::CorruptMeta {
        key: format!("{key:?}"),
        what: format!("bad block entry {v:02x?}"),
    })?;
    Ok((key.block, key.epoch, entry))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_round_trip() {
        for e in [Entry::Zero, Entry::Discarded, Entry::Data { slot: 7, crc: 0xdead_beef }] {
            assert_eq!(Entry::decode(&e.encode().unwrap()), Some(e));
        }
        assert_eq!(Entry::Hole.encode(), None);
        assert_eq!(Entry::decode(&[9; 9]), None);
        assert_eq!(Entry::decode(&[2; 3]), None);
    }

    #[test]
    fn volumes_and_blocks_persist() {
        let dir = tempfile::tempdir().unwrap();
        let rec = VolumeRecord {
            id: 3,
            name: "a".into(),
            size: 1 << 20,
            read_only: false,
            created_at: 1,
            storage_class: "local".into(),
            tenant: String::new(),
            labels: Default::default(),
            parent: None,
            placement: 0,
            home: 0,
        };
        {
            let m = MetaStore::open(dir.path()).unwrap();
            m.put_volume(&rec, None).unwrap();
            let put = |block, epoch, entry| BlockOp::Put { block, epoch, entry };
            m.write_entries(
                3,
                0,
                &[put(1, 1, Entry::Data { slot: 0, crc: 5 }), put(2, 1, Entry::Zero)],
            )
            .unwrap();
            m.write_entries(3, 0, &[BlockOp::Delete { block: 2, epoch: 1 }]).unwrap();
            m.write_entries(3, 0, &[put(4, 1, Entry::Discarded), put(4, 3, Entry::Zero)]).unwrap();
        }
        let m = MetaStore::open(dir.path()).unwrap();
        assert_eq!(m.load_volumes().unwrap(), vec![rec.clone()]);
        assert_eq!(m.next_volume_id().unwrap(), 4);
        assert_eq!(
            m.load_chunk(3, 0).unwrap(),
            vec![
                (1, 1, Entry::Data { slot: 0, crc: 5 }),
                (4, 3, Entry::Zero),
                (4, 1, Entry::Discarded)
            ]
        );
        let at = |e| m.entries_at(3, 0, [0, 1, 4, 5].into_iter(), e).unwrap();
        assert_eq!(at(0), vec![Entry::Hole; 4]);
        assert_eq!(
            at(2),
            vec![Entry::Hole, Entry::Data { slot: 0, crc: 5 }, Entry::Discarded, Entry::Hole]
        );
        assert_eq!(at(3)[2], Entry::Zero);
        assert_eq!(m.count_data_blocks().unwrap().get(&3), Some(&1));
        m.delete_volume(&rec).unwrap();
        assert!(m.load_volumes().unwrap().is_empty());
        assert!(m.load_chunk(3, 0).unwrap().is_empty());
    }
}
