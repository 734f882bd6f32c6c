//! A chunk group's Raft log and vote, kept in the node's RocksDB (keys in [`crate::keys`]).
//!
//! Appends go to the WAL without a sync (they survive `kill -9`). An append holding a durable
//! entry (see [`Cmd::durable`]) is reported stored only after the chunk store's full barrier,
//! which fsyncs that WAL after the data files: completion reports leave in append order
//! through one flusher task per group, so a later append never overtakes a durable one.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

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

/// One group's log. Cheap to clone (readers are clones).
#[derive(Clone)]
pub struct LogStore {
    group: u32,
    meta: Arc<MetaStore>,
    flusher: mpsc::UnboundedSender<(LogFlushed<TypeConfig>, bool)>,
    /// Completions queued at the flusher and not yet reported.
    queued: Arc<AtomicUsize>,
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
        Self { group, meta, flusher: tx, queued }
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

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let from = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i + 1,
            Bound::Unbounded => 0,
        };
        let to = match range.end_bound() {
            Bound::Included(&i) => i.saturating_add(1),
            Bound::Excluded(&i) => i,
            Bound::Unbounded => u64::MAX,
        };
        if from >= to {
            return Ok(Vec::new());
        }
        let raw = self.meta.raft_entries(self.group, from, to).map_err(read_err)?;
        raw.iter().map(|(_, b)| decode::<Entry>(b).map_err(read_err)).collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.get_state(RaftField::LastPurged)?;
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

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.meta
            .put_raft_state(self.group, RaftField::Committed, &encode(&committed), false)
            .map_err(write_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.get_state::<Option<LogId>>(RaftField::Committed)?.flatten())
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
        let batch: Vec<(u64, Vec<u8>)> = entries
            .into_iter()
            .map(|e| {
                durable |= match &e.payload {
                    EntryPayload::Normal(cmd) => cmd.durable(),
                    EntryPayload::Membership(_) => true,
                    EntryPayload::Blank => false,
                };
                (e.log_id.index, encode(&e))
            })
            .collect();
        // In the WAL (page cache) when this returns: survives the process being killed.
        self.meta.raft_append(self.group, &batch).map_err(write_err)?;
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
        self.meta.raft_delete(self.group, log_id.index, u64::MAX, None).map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.meta
            .raft_delete(
                self.group,
                0,
                log_id.index + 1,
                Some((RaftField::LastPurged, encode(&Some(log_id)))),
            )
            .map_err(write_err)
    }
}
