//! The manager's Raft log, vote and committed id in its own RocksDB (`<data-dir>/raft`).
//!
//! Durability: every write is synced (WAL fsync) before it returns, so an entry reported
//! stored, a vote and a committed id survive `kill -9` and power loss alike. Manager writes
//! are rare (registrations, volume changes, attachments), so the cost does not matter.

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{RaftLogReader, StorageIOError};
use rocksdb::{Direction, IteratorMode, WriteBatch, WriteOptions, DB};

use super::{decode, encode, Entry, LogId, StorageError, TypeConfig, Vote};

/// Log entries: `l` + index (big-endian). State keys start with `s`, after every log key.
const LOG: u8 = b'l';
const VOTE: &[u8] = b"svote";
const COMMITTED: &[u8] = b"scommitted";
const PURGED: &[u8] = b"spurged";

fn log_key(index: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = LOG;
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

fn read_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::read_logs(openraft::AnyError::error(e.to_string())).into()
}

fn write_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::write_logs(openraft::AnyError::error(e.to_string())).into()
}

#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
}

impl LogStore {
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        let db = DB::open(&opts, dir)?;
        Ok(Self { db: Arc::new(db) })
    }

    fn write(&self, b: WriteBatch) -> Result<(), rocksdb::Error> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(b, &wo)
    }

    fn put(&self, key: &[u8], value: Vec<u8>) -> Result<(), StorageError> {
        let mut b = WriteBatch::default();
        b.put(key, value);
        self.write(b).map_err(write_err)
    }

    fn get<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        match self.db.get(key).map_err(read_err)? {
            Some(b) => decode(&b).map(Some).map_err(read_err),
            None => Ok(None),
        }
    }

    fn last_entry(&self) -> Result<Option<Entry>, StorageError> {
        let end = [LOG + 1];
        let mut it = self.db.iterator(IteratorMode::From(&end, Direction::Reverse));
        match it.next() {
            Some(Ok((k, v))) if k.first() == Some(&LOG) => decode(&v).map(Some).map_err(read_err),
            Some(Err(e)) => Err(read_err(e)),
            _ => Ok(None),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let (from, to) = tern_common::index_range(&range);
        let mut out = Vec::new();
        let start = log_key(from);
        for item in self.db.iterator(IteratorMode::From(&start, Direction::Forward)) {
            let (k, v) = item.map_err(read_err)?;
            if k.len() != 9 || k[0] != LOG {
                break;
            }
            let index = u64::from_be_bytes(k[1..9].try_into().expect("9-byte key"));
            if index >= to {
                break;
            }
            out.push(decode::<Entry>(&v).map_err(read_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.get(PURGED)?;
        let last_log_id = match self.last_entry()? {
            Some(e) => Some(e.log_id),
            None => last_purged_log_id,
        };
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.put(VOTE, encode(vote))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.get(VOTE)
    }

    /// Saved so that a restarted replica re-applies what was committed at once (its state
    /// machine starts from the last snapshot).
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.put(COMMITTED, encode(&committed))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.get::<Option<LogId>>(COMMITTED)?.flatten())
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
        let mut b = WriteBatch::default();
        for e in entries {
            b.put(log_key(e.log_id.index), encode(&e));
        }
        // Synced: on stable storage when reported.
        let r = self.write(b).map_err(std::io::Error::other);
        callback.log_io_completed(r);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut b = WriteBatch::default();
        b.delete_range(&log_key(log_id.index)[..], &[LOG + 1][..]);
        self.write(b).map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut b = WriteBatch::default();
        b.delete_range(log_key(0), log_key(log_id.index + 1));
        b.put(PURGED, encode(&Some(log_id)));
        self.write(b).map_err(write_err)
    }
}
