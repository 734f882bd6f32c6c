//! Applies a chunk group's committed log entries to the node's [`ChunkStore`].
//!
//! Every replica applies the same entries in the same order and gets the same state: data
//! commands go through the store's `apply_*` entry points, which skip the checks the leader
//! already made (a replica must never refuse what its group committed). Commands are
//! idempotent (block writes, zeroing, trims; volumes created with the id of their log index),
//! so re-applying entries after a crash, from the last persisted applied id on, is harmless.

use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{EntryPayload, RaftSnapshotBuilder, StorageIOError, StoredMembership};
use tern_common::validate_volume_size;
use tokio::sync::Notify;

use super::{decode, encode, Cmd, Entry, LogId, Membership, Reply, StorageError, TypeConfig};
use crate::error::Error;
use crate::keys::RaftField;
use crate::meta::MetaStore;
use crate::store::{ChunkStore, NewVolume, Volume};

fn sm_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::write_state_machine(openraft::AnyError::error(e.to_string())).into()
}

pub struct StateMachine {
    group: u32,
    store: Arc<ChunkStore>,
    meta: Arc<MetaStore>,
    /// Node-wide: signalled when the meta group creates a volume (data groups may apply a
    /// volume's first write before this node's meta group applied its creation).
    volume_created: Arc<Notify>,
    last_applied: Option<LogId>,
    membership: Membership,
}

impl StateMachine {
    pub fn open(
        group: u32,
        store: Arc<ChunkStore>,
        meta: Arc<MetaStore>,
        volume_created: Arc<Notify>,
    ) -> crate::Result<Self> {
        let (last_applied, membership) = match meta.raft_state(group, RaftField::Applied)? {
            Some(b) => {
                decode::<(Option<LogId>, Membership)>(&b).map_err(|e| Error::CorruptMeta {
                    key: format!("group {group} applied state"),
                    what: e.to_string(),
                })?
            }
            None => (None, Membership::default()),
        };
        Ok(Self { group, store, meta, volume_created, last_applied, membership })
    }

    /// The volume a data command addresses, waiting for its creation if this node has not
    /// applied it yet; `None` if it was deleted (its id is below the next id).
    async fn volume(&self, id: u64) -> Result<Option<Arc<Volume>>, StorageError> {
        let mut waited = Duration::ZERO;
        loop {
            let created = self.volume_created.notified();
            tokio::pin!(created);
            created.as_mut().enable();
            if let Ok(v) = self.store.get(id) {
                return Ok(Some(v));
            }
            if id < self.meta.next_volume_id().map_err(sm_err)? {
                return Ok(None);
            }
            if tokio::time::timeout(Duration::from_secs(1), created).await.is_err() {
                waited += Duration::from_secs(1);
                tracing::warn!(
                    group = self.group,
                    volume = id,
                    ?waited,
                    "waiting for this node to learn of a volume that a committed entry writes to"
                );
            }
        }
    }

    async fn apply_cmd(&mut self, index: u64, cmd: Cmd) -> Result<Reply, StorageError> {
        let r = match cmd {
            Cmd::Write { volume, offset, data, .. } => match self.volume(volume).await? {
                Some(v) => self.store.apply_write(&v, offset, data).await,
                None => Ok(()),
            },
            Cmd::WriteZeroes { volume, offset, len, punch, .. } => {
                match self.volume(volume).await? {
                    Some(v) => self.store.apply_write_zeroes(&v, offset, len, punch).await,
                    None => Ok(()),
                }
            }
            Cmd::Trim { volume, offset, len, .. } => match self.volume(volume).await? {
                Some(v) => self.store.apply_trim(&v, offset, len).await,
                None => Ok(()),
            },
            // Its durability was the log's business (see `log_store`).
            Cmd::Flush => Ok(()),
            Cmd::CreateVolume { name, size, read_only, tenant, labels, created_at } => {
                return self
                    .create_volume(index, name, size, read_only, tenant, labels, created_at)
                    .await
            }
            Cmd::ResizeVolume { id, size } => match self.store.get(id) {
                Ok(v) => match validate_volume_size(size) {
                    Ok(()) => self.store.resize_volume(&v, size, false).await,
                    Err(e) => Err(e.into()),
                },
                Err(e) => Err(e),
            },
            Cmd::SetReadOnly { id, read_only } => match self.store.get(id) {
                Ok(v) => self.store.set_read_only(&v, read_only).await,
                Err(e) => Err(e),
            },
            Cmd::DeleteVolume { id } => match self.store.get(id) {
                Ok(v) => self.store.delete_volume(&v).await,
                Err(e) => Err(e),
            },
        };
        match r {
            Ok(()) => Ok(Reply::Done),
            // A volume deleted while this entry waited to apply: nothing left to write.
            Err(Error::VolumeDeleted(_)) => Ok(Reply::Done),
            Err(e) => refuse_or_fail(e),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn create_volume(
        &mut self,
        index: u64,
        name: String,
        size: u64,
        read_only: bool,
        tenant: String,
        labels: std::collections::BTreeMap<String, String>,
        created_at: u64,
    ) -> Result<Reply, StorageError> {
        // Re-applied after a restart: it exists, or it was created and deleted since.
        if self.store.get(index).is_ok() || index < self.meta.next_volume_id().map_err(sm_err)? {
            return Ok(Reply::Volume(index));
        }
        let new = NewVolume {
            id: Some(index),
            name,
            size,
            read_only,
            storage_class: "replicated".into(),
            created_at: Some(created_at),
            tenant,
            labels,
        };
        match self.store.create_volume(new).await {
            Ok(_) => {
                self.volume_created.notify_waiters();
                Ok(Reply::Volume(index))
            }
            Err(e) => refuse_or_fail(e),
        }
    }

    fn save_applied(&self) -> Result<(), StorageError> {
        let b = encode(&(self.last_applied, &self.membership));
        self.meta.put_raft_state(self.group, RaftField::Applied, &b, false).map_err(sm_err)
    }
}

/// Refusals every replica reaches alike become a [`Reply::Refused`]; anything else (a disk
/// error) stops this replica of the group.
fn refuse_or_fail(e: Error) -> Result<Reply, StorageError> {
    match e {
        Error::VolumeNotFound(_)
        | Error::VolumeExists(_)
        | Error::Input(_)
        | Error::ShrinkRefused { .. }
        | Error::OutOfRange { .. } => {
            let s = tonic::Status::from(e);
            Ok(Reply::Refused { code: s.code() as i32, message: s.message().to_string() })
        }
        e => Err(sm_err(e)),
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), StorageError> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Reply>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut replies = Vec::new();
        for e in entries {
            let reply = match e.payload {
                EntryPayload::Blank => Reply::Done,
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(e.log_id), m);
                    Reply::Done
                }
                EntryPayload::Normal(cmd) => self.apply_cmd(e.log_id.index, cmd).await?,
            };
            self.last_applied = Some(e.log_id);
            replies.push(reply);
        }
        // Written after the changes it covers (same WAL, in order): after a crash the
        // persisted id is never ahead of what was applied.
        self.save_applied()?;
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            meta: SnapshotMeta {
                last_log_id: self.last_applied,
                last_membership: self.membership.clone(),
                snapshot_id: format!("g{}-{:?}", self.group, self.last_applied.map(|l| l.index)),
            },
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        _meta: &SnapshotMeta<u64, openraft::BasicNode>,
        _snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        // The log is never compacted yet (`SnapshotPolicy::Never`), so no leader sends one.
        Err(sm_err("installing a chunk group snapshot is not supported yet"))
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(None)
    }
}

pub struct SnapshotBuilder {
    meta: SnapshotMeta<u64, openraft::BasicNode>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        Ok(Snapshot { meta: self.meta.clone(), snapshot: Box::new(Cursor::new(Vec::new())) })
    }
}
