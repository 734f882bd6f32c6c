//! A chunk group's Raft log and vote, kept in the node's RocksDB (keys in [`crate::keys`]).
//!
//! Appends go to the WAL without a sync (they survive `kill -9`). An append holding a durable
//! entry (see [`Cmd::durable`]) is reported stored only after the chunk store's full barrier,
//! which fsyncs that WAL after the data files: completion reports leave in append order
//! through one flusher task per group, so a later append never overtakes a durable one.
//!
//! The newest entries are also kept in memory ([`Recent`]): a leader's replication streams
//! read back what was just appended, and decoding it again from RocksDB cost about a tenth of
//! a leader's CPU under small random writes.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{EntryPayload, RaftLogReader, StorageIOError};
use tokio::sync::mpsc;

use super::{decode, encode, Entry, LogId, StorageError, TypeConfig, Vote};
use crate::keys::RaftField;
use crate::meta::MetaStore;
use crate::store::ChunkStore;

fn read_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::read_logs(openraft::AnyError::error(e.to_string())).into()
}

fn write_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::write_logs(openraft::AnyError::error(e.to_string())).into()
}

/// Entries kept in memory per group, at most.
const RECENT_ENTRIES: usize = 256;
/// Payload bytes kept in memory per group, at most (beyond the newest entry).
const RECENT_BYTES: usize = 4 << 20;

/// The newest entries of a group's log, consecutive, mirroring what RocksDB holds.
#[derive(Default)]
struct Recent {
    entries: VecDeque<Entry>,
    bytes: usize,
}

fn payload_bytes(e: &Entry) -> usize {
    match &e.payload {
        EntryPayload::Normal(super::Cmd::Write { data, .. }) => data.len(),
        _ => 0,
    }
}

impl Recent {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|e| e.log_id.index)
    }

    fn push(&mut self, e: Entry) {
        // Appends are consecutive; anything else (never expected) starts the cache afresh.
        if let Some(last) = self.entries.back() {
            if last.log_id.index + 1 != e.log_id.index {
                self.clear();
            }
        }
        self.bytes += payload_bytes(&e);
        self.entries.push_back(e);
        while self.entries.len() > RECENT_ENTRIES
            || (self.bytes > RECENT_BYTES && self.entries.len() > 1)
        {
            let old = self.entries.pop_front().expect("non-empty");
            self.bytes -= payload_bytes(&old);
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Drops entries with index `>= from` (log truncation).
    fn truncate(&mut self, from: u64) {
        while self.entries.back().is_some_and(|e| e.log_id.index >= from) {
            let old = self.entries.pop_back().expect("non-empty");
            self.bytes -= payload_bytes(&old);
        }
    }

    /// Drops entries with index `<= upto` (log purge).
    fn purge(&mut self, upto: u64) {
        while self.entries.front().is_some_and(|e| e.log_id.index <= upto) {
            let old = self.entries.pop_front().expect("non-empty");
            self.bytes -= payload_bytes(&old);
        }
    }

    /// Entries `[from, to)` if all of them are here.
    fn get(&self, from: u64, to: u64) -> Option<Vec<Entry>> {
        let first = self.first_index()?;
        let last = self.entries.back()?.log_id.index;
        if from < first || to > last + 1 {
            return None;
        }
        let skip = (from - first) as usize;
        Some(self.entries.iter().skip(skip).take((to - from) as usize).cloned().collect())
    }
}

/// One group's log. Cheap to clone (readers are clones).
#[derive(Clone)]
pub struct LogStore {
    group: u32,
    meta: Arc<MetaStore>,
    recent: Arc<Mutex<Recent>>,
    flusher: mpsc::UnboundedSender<(LogFlushed<TypeConfig>, bool)>,
    /// Completions queued at the flusher and not yet reported.
    queued: Arc<AtomicUsize>,
    /// The last commit index openraft reported, plus one (0: none since the start); in
    /// memory only, for the commit lag metric.
    committed: Arc<AtomicU64>,
}

impl LogStore {
    pub fn new(group: u32, meta: Arc<MetaStore>, store: Arc<ChunkStore>) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<(LogFlushed<TypeConfig>, bool)>();
        let queued = Arc::new(AtomicUsize::new(0));
        let q = queued.clone();
        tokio::spawn(async move {
            while let Some((callback, durable)) = rx.recv().await {
                let r = if durable {
                    store.barrier().await.map_err(std::io::Error::other)
                } else {
                    Ok(())
                };
                callback.log_io_completed(r);
                q.fetch_sub(1, Ordering::AcqRel);
            }
        });
        Self { group, meta, recent: Arc::default(), flusher: tx, queued, committed: Arc::default() }
    }

    /// The commit index last reported to this log, plus one (0: none yet), shared.
    pub fn committed(&self) -> Arc<AtomicU64> {
        self.committed.clone()
    }

    fn get_state<T: serde::de::DeserializeOwned>(
        &self,
        field: RaftField,
    ) -> Result<Option<T>, StorageError> {
        match self.meta.raft_state(self.group, field).map_err(read_err)? {
            None => Ok(None),
            Some(b) => decode(&b).map(Some).map_err(read_err),
        }
    }
}

impl LogStore {
    /// The last purged log id. Stored as a `LogId`; builds before 0.1 stored an
    /// `Option<LogId>` (one byte longer), which was then misread after a restart: both are
    /// read right.
    fn last_purged(&self) -> Result<Option<LogId>, StorageError> {
        match self.meta.raft_state(self.group, RaftField::LastPurged).map_err(read_err)? {
            None => Ok(None),
            Some(b) if b.len() == LOG_ID_LEN + 1 => decode::<Option<LogId>>(&b).map_err(read_err),
            Some(b) => decode::<LogId>(&b).map(Some).map_err(read_err),
        }
    }
}

/// Bytes of an encoded `LogId` (term, node id, index).
const LOG_ID_LEN: usize = 24;

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let (from, to) = tern_common::index_range(&range);
        if from >= to {
            return Ok(Vec::new());
        }
        if let Some(hit) = self.recent.lock().expect("log cache lock").get(from, to) {
            return Ok(hit);
        }
        let raw = self.meta.raft_entries(self.group, from, to).map_err(read_err)?;
        raw.iter().map(|(_, b)| decode::<Entry>(b).map_err(read_err)).collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id = self.last_purged()?;
        let last = match self.meta.raft_last_entry(self.group).map_err(read_err)? {
            Some(b) => Some(decode::<Entry>(&b).map_err(read_err)?.log_id),
            None => last_purged_log_id,
        };
        Ok(LogState { last_purged_log_id, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        // Synced: a vote forgotten after a power loss could elect two leaders in one term.
        self.meta
            .put_raft_state(self.group, RaftField::Vote, &encode(vote), true)
            .map_err(|e| StorageIOError::write_vote(openraft::AnyError::error(e.to_string())))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.get_state(RaftField::Vote)
    }

    /// The commit index is not saved (`read_committed` keeps openraft's default): the state
    /// machine persists what it applied (see `state_machine`), and reads are served only by a
    /// leader that confirmed its commit index with a quorum. Saving it cost a RocksDB write per
    /// commit on every replica. It is only noted in memory, for the commit lag metric.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.committed.store(committed.map_or(0, |c| c.index + 1), Ordering::Relaxed);
        Ok(())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut durable = false;
        let entries: Vec<Entry> = entries.into_iter().collect();
        let batch: Vec<(u64, Vec<u8>)> = entries
            .iter()
            .map(|e| {
                durable |= match &e.payload {
                    EntryPayload::Normal(cmd) => cmd.durable(),
                    EntryPayload::Membership(_) => true,
                    EntryPayload::Blank => false,
                };
                (e.log_id.index, encode(e))
            })
            .collect();
        // In the WAL (page cache) when this returns: survives the process being killed.
        self.meta.raft_append(self.group, &batch).map_err(write_err)?;
        {
            let mut recent = self.recent.lock().expect("log cache lock");
            for e in entries {
                recent.push(e);
            }
        }
        if !durable && self.queued.load(Ordering::Acquire) == 0 {
            callback.log_io_completed(Ok(()));
        } else {
            self.queued.fetch_add(1, Ordering::AcqRel);
            if let Err(mpsc::error::SendError((cb, _))) = self.flusher.send((callback, durable)) {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                cb.log_io_completed(Err(std::io::Error::other("log flusher stopped")));
            }
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.recent.lock().expect("log cache lock").truncate(log_id.index);
        self.meta.raft_delete(self.group, log_id.index, u64::MAX, None).map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.recent.lock().expect("log cache lock").purge(log_id.index);
        self.meta
            .raft_delete(
                self.group,
                0,
                log_id.index + 1,
                Some((RaftField::LastPurged, encode(&log_id))),
            )
            .map_err(write_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use openraft::CommittedLeaderId;

    fn entry(index: u64, bytes: usize) -> Entry {
        let payload = if bytes == 0 {
            EntryPayload::Blank
        } else {
            EntryPayload::Normal(super::super::Cmd::Write {
                volume: 1,
                offset: 0,
                data: Bytes::from(vec![0u8; bytes]),
                fua: false,
                generation: 0,
                epoch: 0,
            })
        };
        Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload }
    }

    fn indexes(v: Option<Vec<Entry>>) -> Option<Vec<u64>> {
        v.map(|v| v.iter().map(|e| e.log_id.index).collect())
    }

    #[test]
    fn recent_serves_only_ranges_it_holds() {
        let mut r = Recent::default();
        for i in 5..10 {
            r.push(entry(i, 0));
        }
        assert_eq!(indexes(r.get(5, 10)), Some(vec![5, 6, 7, 8, 9]));
        assert_eq!(indexes(r.get(7, 9)), Some(vec![7, 8]));
        assert_eq!(r.get(4, 6).map(|v| v.len()), None, "before the first entry");
        assert_eq!(r.get(8, 11).map(|v| v.len()), None, "past the last entry");
        r.truncate(8);
        assert_eq!(r.get(7, 9).map(|v| v.len()), None, "truncated");
        assert_eq!(indexes(r.get(5, 8)), Some(vec![5, 6, 7]));
        r.purge(6);
        assert_eq!(indexes(r.get(7, 8)), Some(vec![7]));
        assert_eq!(r.get(6, 8).map(|v| v.len()), None, "purged");
        // A gap (never expected) restarts the cache rather than mixing two runs.
        r.push(entry(20, 0));
        assert_eq!(indexes(r.get(20, 21)), Some(vec![20]));
        assert_eq!(r.get(7, 8).map(|v| v.len()), None);
    }

    #[test]
    fn recent_is_bounded_by_count_and_bytes() {
        let mut r = Recent::default();
        for i in 1..=(RECENT_ENTRIES as u64 + 10) {
            r.push(entry(i, 0));
        }
        assert_eq!(r.entries.len(), RECENT_ENTRIES);
        assert_eq!(r.first_index(), Some(11));
        let mut r = Recent::default();
        for i in 1..=8 {
            r.push(entry(i, 1 << 20));
        }
        assert!(r.bytes <= RECENT_BYTES, "{} bytes kept", r.bytes);
        assert_eq!(r.first_index(), Some(5));
        r.truncate(0);
        assert_eq!(r.bytes, 0);
    }

    /// A node restarted after its log was purged reads the purge point back from RocksDB (it
    /// once read garbage there and could not start).
    #[tokio::test]
    async fn last_purged_reads_back() {
        use openraft::storage::RaftLogStorage;
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open_for_test(dir.path());
        let meta = store.meta();
        let purged = LogId::new(CommittedLeaderId::new(2, 1), 767);
        let mut log = LogStore::new(3, meta.clone(), store.clone());
        meta.raft_append(3, &(760..800).map(|i| (i, encode(&entry(i, 8)))).collect::<Vec<_>>())
            .unwrap();
        log.purge(purged).await.unwrap();
        // A fresh log store (as after a restart) reads everything from RocksDB.
        let mut log = LogStore::new(3, meta.clone(), store);
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(purged));
        assert_eq!(state.last_log_id.map(|l| l.index), Some(799));
        // What earlier builds stored reads the same.
        meta.put_raft_state(3, RaftField::LastPurged, &encode(&Some(purged)), false).unwrap();
        assert_eq!(log.get_log_state().await.unwrap().last_purged_log_id, Some(purged));
    }
}
