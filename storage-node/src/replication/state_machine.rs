//! Applies a chunk group's committed log entries to the node's [`ChunkStore`].
//!
//! Every replica applies the same entries in the same order and gets the same state: data
//! commands go through the store's `apply_*` entry points, which skip the checks the leader
//! already made (a replica must never refuse what its group committed). Commands are
//! idempotent (block writes, zeroing, trims; volumes created with the id of their log index),
//! so re-applying entries after a crash, from the last persisted applied id on, is harmless.
//!
//! That is also why the applied id is persisted lazily ([`SAVE_APPLIED_EVERY`] entries, and at
//! once for membership and meta group entries): after a crash the group re-applies the few
//! entries since, from its log. The log is purged only up to a snapshot, and building one
//! persists its applied id first, so the entries to re-apply are always still in the log.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{EntryPayload, RaftSnapshotBuilder, StorageIOError, StoredMembership};
use tern_common::{validate_volume_size, BLOCK_SIZE, CHUNK_SIZE, META_GROUP};
use tokio::sync::Notify;

use super::snapshot::{self, Record, SnapshotFile};
use super::{decode, encode, Cmd, Entry, LogId, Membership, Reply, StorageError, TypeConfig};
use crate::error::Error;
use crate::keys::RaftField;
use crate::meta::MetaStore;
use crate::store::{ChunkStore, NewVolume, Volume};

fn sm_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::write_state_machine(openraft::AnyError::error(e.to_string())).into()
}

type Meta = SnapshotMeta<u64, super::Member>;

/// Data entries applied between two saves of the applied id, at most.
const SAVE_APPLIED_EVERY: u64 = 64;

pub struct StateMachine {
    group: u32,
    /// Data groups of the cluster (to know which chunks are this group's).
    groups: u32,
    store: Arc<ChunkStore>,
    meta: Arc<MetaStore>,
    /// Node-wide: signalled when the meta group creates a volume (data groups may apply a
    /// volume's first write before this node's meta group applied its creation).
    volume_created: Arc<Notify>,
    last_applied: Option<LogId>,
    /// Fencing generation per volume in this group (see `Cmd::Fence`), mirrored from RocksDB.
    fences: HashMap<u64, u64>,
    /// Index of the applied id last persisted.
    saved_index: u64,
    membership: Membership,
}

impl StateMachine {
    pub fn open(
        group: u32,
        groups: u32,
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
        let saved_index = last_applied.map_or(0, |l| l.index);
        let fences = meta.fences(group)?.into_iter().collect();
        Ok(Self {
            group,
            groups,
            store,
            meta,
            volume_created,
            last_applied,
            fences,
            saved_index,
            membership,
        })
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

    /// A refusal if `generation` is older than `volume`'s fence here.
    fn fenced(&self, volume: u64, generation: u64) -> Option<Reply> {
        let fence = self.fences.get(&volume).copied().unwrap_or(0);
        (generation < fence).then(|| Reply::Refused {
            code: tonic::Code::FailedPrecondition as i32,
            message: format!(
                "volume {volume} was attached elsewhere: writes of generation {generation} are \
                 fenced off (current generation {fence})"
            ),
        })
    }

    /// Raises a volume's fence (fences never go down).
    fn raise_fence(&mut self, volume: u64, generation: u64) -> Result<(), StorageError> {
        if self.fences.get(&volume).copied().unwrap_or(0) >= generation {
            return Ok(());
        }
        self.meta.put_fence(self.group, volume, generation).map_err(sm_err)?;
        self.fences.insert(volume, generation);
        Ok(())
    }

    async fn apply_cmd(&mut self, index: u64, cmd: Cmd) -> Result<Reply, StorageError> {
        match &cmd {
            Cmd::Write { volume, generation, .. }
            | Cmd::WriteZeroes { volume, generation, .. }
            | Cmd::Trim { volume, generation, .. } => {
                if let Some(refusal) = self.fenced(*volume, *generation) {
                    return Ok(refusal);
                }
            }
            Cmd::Fence { volume, generation } => {
                self.raise_fence(*volume, *generation)?;
                return Ok(Reply::Done);
            }
            _ => {}
        }
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
            Cmd::Fence { .. } => Ok(()),
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

    /// Installs a received snapshot staged at `path` (see [`snapshot`]).
    async fn install_from(&mut self, path: &std::path::Path) -> Result<(), StorageError> {
        let mut listed: HashSet<(u64, u32)> = HashSet::new();
        let mut current: Option<(Arc<Volume>, u32)> = None;
        for part in snapshot::read_parts(path).map_err(sm_err)? {
            for record in part.map_err(sm_err)? {
                match record {
                    Record::Volumes(recs) => self.install_volumes(recs).await?,
                    Record::Fences(fences) => {
                        for (volume, generation) in fences {
                            self.raise_fence(volume, generation)?;
                        }
                    }
                    Record::Chunk { volume, chunk } => {
                        current = match self.volume(volume).await? {
                            Some(v) => {
                                self.wipe_chunk(&v, chunk).await?;
                                listed.insert((volume, chunk));
                                Some((v, chunk))
                            }
                            None => None,
                        };
                    }
                    Record::Blocks { first, data } => {
                        if let Some((v, chunk)) = &current {
                            let off =
                                u64::from(*chunk) * CHUNK_SIZE + u64::from(first) * BLOCK_SIZE;
                            self.store.apply_write(v, off, data).await.map_err(sm_err)?;
                        }
                    }
                    Record::Zeros { first, n } => {
                        if let Some((v, chunk)) = &current {
                            let off =
                                u64::from(*chunk) * CHUNK_SIZE + u64::from(first) * BLOCK_SIZE;
                            let len = u64::from(n) * BLOCK_SIZE;
                            self.store
                                .apply_write_zeroes(v, off, len, false)
                                .await
                                .map_err(sm_err)?;
                        }
                    }
                }
            }
        }
        if self.group == META_GROUP {
            return Ok(());
        }
        // Chunks of this group the snapshot does not list hold nothing on the leader.
        for v in self.store.list() {
            let rec = v.record();
            if rec.storage_class != "replicated" {
                continue;
            }
            for chunk in snapshot::group_chunks(&rec, self.group, self.groups) {
                if !listed.contains(&(rec.id, chunk)) {
                    self.wipe_chunk(&v, chunk).await?;
                }
            }
        }
        Ok(())
    }

    /// Turns a chunk into holes (no-op for a chunk with nothing in it).
    async fn wipe_chunk(&self, v: &Volume, chunk: u32) -> Result<(), StorageError> {
        let map = self.store.chunk_map(v, chunk).await.map_err(sm_err)?;
        if map.iter().all(|e| *e == crate::meta::Entry::Hole) {
            return Ok(());
        }
        let off = u64::from(chunk) * CHUNK_SIZE;
        self.store.apply_trim(v, off, CHUNK_SIZE).await.map_err(sm_err)
    }

    /// Makes the volume table equal to the snapshot's.
    async fn install_volumes(
        &mut self,
        recs: Vec<crate::meta::VolumeRecord>,
    ) -> Result<(), StorageError> {
        let keep: HashSet<u64> = recs.iter().map(|r| r.id).collect();
        for v in self.store.list() {
            if v.record().storage_class == "replicated" && !keep.contains(&v.id.0) {
                self.store.delete_volume(&v).await.map_err(sm_err)?;
            }
        }
        for rec in recs {
            match self.store.get(rec.id) {
                Ok(v) => {
                    let have = v.record();
                    if have.size != rec.size {
                        self.store.resize_volume(&v, rec.size, true).await.map_err(sm_err)?;
                    }
                    if have.read_only != rec.read_only {
                        self.store.set_read_only(&v, rec.read_only).await.map_err(sm_err)?;
                    }
                }
                Err(_) => {
                    let new = NewVolume {
                        id: Some(rec.id),
                        name: rec.name,
                        size: rec.size,
                        read_only: rec.read_only,
                        storage_class: rec.storage_class,
                        created_at: Some(rec.created_at),
                        tenant: rec.tenant,
                        labels: rec.labels,
                    };
                    self.store.create_volume(new).await.map_err(sm_err)?;
                    self.volume_created.notify_waiters();
                }
            }
        }
        Ok(())
    }

    fn save_applied(&mut self) -> Result<(), StorageError> {
        save_applied(&self.meta, self.group, self.last_applied, &self.membership)?;
        self.saved_index = self.last_applied.map_or(0, |l| l.index);
        Ok(())
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
        let mut save_now = self.group == META_GROUP;
        for e in entries {
            let reply = match e.payload {
                EntryPayload::Blank => Reply::Done,
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(e.log_id), m);
                    save_now = true;
                    Reply::Done
                }
                EntryPayload::Normal(cmd) => self.apply_cmd(e.log_id.index, cmd).await?,
            };
            self.last_applied = Some(e.log_id);
            replies.push(reply);
        }
        // Written after the changes it covers (same WAL, in order): after a crash the
        // persisted id is never ahead of what was applied (it may be behind: see the module
        // comment).
        let index = self.last_applied.map_or(0, |l| l.index);
        if save_now || index >= self.saved_index + SAVE_APPLIED_EVERY {
            self.save_applied()?;
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            group: self.group,
            meta_store: self.meta.clone(),
            store: self.store.clone(),
            meta: SnapshotMeta {
                last_log_id: self.last_applied,
                last_membership: self.membership.clone(),
                snapshot_id: format!("g{}-{:?}", self.group, self.last_applied.map(|l| l.index)),
            },
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotFile>, StorageError> {
        Ok(Box::default())
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<SnapshotFile>,
    ) -> Result<(), StorageError> {
        if let Some(path) = &snapshot.path {
            self.install_from(path).await?;
            let _ = std::fs::remove_file(path);
        }
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.save_applied()?;
        save_snapshot_meta(&self.meta, self.group, meta)?;
        tracing::info!(group = self.group, last = ?meta.last_log_id, "installed a chunk group snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let Some(b) = self.meta.raft_state(self.group, RaftField::Snapshot).map_err(sm_err)? else {
            return Ok(None);
        };
        let meta: Meta = decode(&b).map_err(sm_err)?;
        Ok(Some(Snapshot { meta, snapshot: Box::default() }))
    }
}

fn save_applied(
    store: &MetaStore,
    group: u32,
    applied: Option<LogId>,
    membership: &Membership,
) -> Result<(), StorageError> {
    let b = encode(&(applied, membership));
    store.put_raft_state(group, RaftField::Applied, &b, false).map_err(sm_err)
}

fn save_snapshot_meta(store: &MetaStore, group: u32, meta: &Meta) -> Result<(), StorageError> {
    store.put_raft_state(group, RaftField::Snapshot, &encode(meta), false).map_err(sm_err)
}

/// Builds a snapshot: records its meta (the chunk store already holds the state).
pub struct SnapshotBuilder {
    group: u32,
    meta_store: Arc<MetaStore>,
    store: Arc<ChunkStore>,
    meta: Meta,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        // The log up to this meta may be purged once it is saved: first make the state it
        // stands for durable (data files, then the WAL), so that not even a power loss leaves
        // a purged log without its applied state.
        //
        // The applied id is persisted lazily; the log is purged up to this snapshot, so first
        // persist an applied id at least this far (the state machine has applied at least
        // this much, and everything it persists later is newer).
        save_applied(
            &self.meta_store,
            self.group,
            self.meta.last_log_id,
            &self.meta.last_membership,
        )?;
        self.store.barrier().await.map_err(sm_err)?;
        save_snapshot_meta(&self.meta_store, self.group, &self.meta)?;
        Ok(Snapshot { meta: self.meta.clone(), snapshot: Box::default() })
    }
}
