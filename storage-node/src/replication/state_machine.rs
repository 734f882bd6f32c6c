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
use crate::chunk::At;
use crate::epoch::{EpochRefusal, Epochs};
use crate::error::Error;
use crate::keys::RaftField;
use crate::meta::MetaStore;
use crate::store::{ChunkStore, NewVolume, Volume};

/// The epoch state of each volume in one chunk group: changed by the group's state machine
/// (and the reclaim it starts), read by reads at a snapshot. Each value is shared
/// copy-on-write, so a write holds its volume's state without a lock across its I/O.
pub type GroupEpochs = Arc<parking_lot::Mutex<HashMap<u64, Arc<Epochs>>>>;

fn sm_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::write_state_machine(openraft::AnyError::error(e.to_string())).into()
}

type Meta = SnapshotMeta<u64, super::Member>;

/// The pause between two reclaim passes of one volume.
const RECLAIM_GAP: Duration = Duration::from_secs(1);

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
    /// Epoch state per volume in this group (see `crate::epoch`), mirrored from RocksDB.
    epochs: GroupEpochs,
    /// Volumes with a reclaim running here, and whether another pass is wanted after it.
    reclaims: Arc<parking_lot::Mutex<HashMap<u64, bool>>>,
    /// Index of the applied id last persisted.
    saved_index: u64,
    membership: Membership,
    /// Set when this node's replica of the group retires (see `Cluster::retire`).
    gate: Arc<RetireGate>,
}

/// Stops a retired replica's state machine from writing anything more: openraft's shutdown
/// stops the group's core, not the state machine worker, which may still hold entries or a
/// snapshot to apply. Each apply holds `busy`; the retirement sets `retired`, then takes
/// `busy` (waiting out an apply under way) before it forgets the group's state.
#[derive(Default)]
pub struct RetireGate {
    pub retired: std::sync::atomic::AtomicBool,
    pub busy: tokio::sync::Mutex<()>,
}

impl RetireGate {
    fn retired(&self) -> bool {
        self.retired.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl StateMachine {
    /// The gate the retirement of this replica closes.
    pub fn retire_gate(&self) -> Arc<RetireGate> {
        self.gate.clone()
    }

    pub fn open(
        group: u32,
        groups: u32,
        store: Arc<ChunkStore>,
        meta: Arc<MetaStore>,
        volume_created: Arc<Notify>,
        epochs: GroupEpochs,
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
        *epochs.lock() = meta.epochs(group)?.into_iter().map(|(v, e)| (v, Arc::new(e))).collect();
        Ok(Self {
            group,
            groups,
            store,
            meta,
            volume_created,
            last_applied,
            fences,
            epochs,
            reclaims: Arc::default(),
            saved_index,
            membership,
            gate: Arc::default(),
        })
    }

    /// Resumes the reclaims a restart interrupted (called once the group runs).
    pub fn resume_collects(&self) {
        let pending: Vec<(u64, u64)> = self
            .epochs
            .lock()
            .iter()
            .flat_map(|(v, e)| e.collecting.iter().map(move |s| (*v, *s)))
            .collect();
        for (volume, _) in pending {
            self.spawn_collect(volume);
        }
    }

    /// The epoch a data command of `volume` writes at, with the state deciding what it keeps;
    /// or the refusal every replica gives alike.
    fn write_at(
        &self,
        volume: u64,
        asked: u64,
    ) -> Result<Result<(u64, Arc<Epochs>), Reply>, StorageError> {
        let mut map = self.epochs.lock();
        let cur = map.entry(volume).or_default();
        let epoch = match cur.write_epoch(asked) {
            Ok(e) => e,
            Err(EpochRefusal::Stale { floor }) => {
                return Ok(Err(Reply::StaleEpoch { volume, epoch: asked, floor }))
            }
            Err(EpochRefusal::Unknown { floor }) => {
                return Ok(Err(Reply::Refused {
                    code: tonic::Code::InvalidArgument as i32,
                    message: format!(
                        "volume {volume} has no epoch {asked} (its writes are at epoch {floor})"
                    ),
                }))
            }
        };
        if epoch > cur.floor {
            // A writer that learned of a snapshot this group has not applied yet: later
            // writes of the older epoch are refused from here on.
            Arc::make_mut(cur).floor = epoch;
            self.meta.put_epochs(self.group, volume, cur).map_err(sm_err)?;
        }
        Ok(Ok((epoch, cur.clone())))
    }

    /// Changes a volume's epoch state here, persisted before the entry counts as applied.
    fn change_epochs(&self, volume: u64, f: impl FnOnce(&mut Epochs)) -> Result<(), StorageError> {
        let mut map = self.epochs.lock();
        let cur = map.entry(volume).or_default();
        f(Arc::make_mut(cur));
        self.meta.put_epochs(self.group, volume, cur).map_err(sm_err)
    }

    /// Reclaims, in the background, what the deleted snapshots of `volume` alone held in this
    /// group's chunks; then forgets that it has to. One pass at a time per volume: deletions
    /// while a pass runs ask for one more pass after it (a pass covers every deletion applied
    /// before it started).
    fn spawn_collect(&self, volume: u64) {
        {
            let mut running = self.reclaims.lock();
            if let Some(again) = running.get_mut(&volume) {
                *again = true;
                return;
            }
            running.insert(volume, false);
        }
        let (store, meta, epochs) = (self.store.clone(), self.meta.clone(), self.epochs.clone());
        let running = self.reclaims.clone();
        let (group, groups) = (self.group, self.groups);
        tokio::spawn(async move {
            loop {
                let Ok(v) = store.get(volume) else { break };
                let rec = v.record();
                let chunks: Vec<u32> = snapshot::group_chunks(&rec, group, groups).collect();
                // Decided with the state as it is now: snapshots created later are at newer
                // epochs and see only what is newest now, never what this reclaims.
                let state = epochs.lock().get(&volume).cloned().unwrap_or_default();
                match store.collect(&v, &chunks, &state).await {
                    Ok(freed) => {
                        let done = &state.collecting;
                        tracing::info!(group, volume, ?done, freed, "snapshot space reclaimed");
                        let mut map = epochs.lock();
                        if let Some(cur) = map.get_mut(&volume) {
                            Arc::make_mut(cur).collecting.retain(|e| !done.contains(e));
                            if let Err(e) = meta.put_epochs(group, volume, cur) {
                                tracing::warn!(%e, "saving the epoch state after a reclaim");
                            }
                        }
                    }
                    Err(Error::VolumeDeleted(_)) => break,
                    Err(e) => {
                        tracing::error!(group, volume, %e, "reclaiming snapshot space");
                        break;
                    }
                }
                {
                    let mut r = running.lock();
                    if r.get(&volume) != Some(&true) {
                        r.remove(&volume);
                        return;
                    }
                    r.insert(volume, false);
                }
                // More deletions came during the pass: one more pass covers them all, after
                // a pause that lets a burst of deletions gather (and client I/O breathe).
                tokio::time::sleep(RECLAIM_GAP).await;
            }
            running.lock().remove(&volume);
        });
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
        // A data command's epoch, and the state deciding what it keeps (or its refusal).
        let mut written: Option<(u64, Arc<Epochs>)> = None;
        match &cmd {
            Cmd::Write { volume, generation, epoch: asked, .. }
            | Cmd::WriteZeroes { volume, generation, epoch: asked, .. }
            | Cmd::Trim { volume, generation, epoch: asked, .. } => {
                if let Some(refusal) = self.fenced(*volume, *generation) {
                    return Ok(refusal);
                }
                match self.write_at(*volume, *asked)? {
                    Ok(at) => written = Some(at),
                    Err(refusal) => return Ok(refusal),
                }
            }
            Cmd::Fence { volume, generation } => {
                self.raise_fence(*volume, *generation)?;
                return Ok(Reply::Done);
            }
            Cmd::Snapshot { volume, epoch } => {
                let epoch = *epoch;
                self.change_epochs(*volume, |e| e.snapshot(epoch))?;
                return Ok(Reply::Done);
            }
            Cmd::DeleteSnapshot { volume, epochs } => {
                self.change_epochs(*volume, |e| epochs.iter().for_each(|&epoch| e.delete(epoch)))?;
                self.spawn_collect(*volume);
                return Ok(Reply::Done);
            }
            Cmd::Rollback { volume, epoch } => return self.rollback(*volume, *epoch).await,
            Cmd::Flatten { volume } => return self.flatten(*volume).await,
            Cmd::Truncate { volume, size, from } => {
                return self.truncate(*volume, *size, *from).await
            }
            _ => {}
        }
        let at = match &written {
            Some((epoch, state)) => At::Epoch { epoch: *epoch, epochs: state },
            None => crate::store::head_at(), // not a data command: unused
        };
        let r = match cmd {
            Cmd::Write { volume, offset, data, .. } => match self.volume(volume).await? {
                Some(v) => self.store.apply_write(&v, offset, data, at).await,
                None => Ok(()),
            },
            Cmd::WriteZeroes { volume, offset, len, punch, .. } => {
                match self.volume(volume).await? {
                    Some(v) => self.store.apply_write_zeroes(&v, offset, len, punch, at).await,
                    None => Ok(()),
                }
            }
            Cmd::Trim { volume, offset, len, .. } => match self.volume(volume).await? {
                Some(v) => self.store.apply_trim(&v, offset, len, at).await,
                None => Ok(()),
            },
            // Its durability was the log's business (see `log_store`).
            Cmd::Flush => Ok(()),
            Cmd::Fence { .. }
            | Cmd::Snapshot { .. }
            | Cmd::DeleteSnapshot { .. }
            | Cmd::Rollback { .. }
            | Cmd::Flatten { .. }
            | Cmd::Truncate { .. } => Ok(()),
            Cmd::CreateVolume { name, size, read_only, tenant, labels, created_at, parent } => {
                let new = NewVolume {
                    id: Some(index),
                    name,
                    size,
                    read_only,
                    storage_class: "replicated".into(),
                    created_at: Some(created_at),
                    tenant,
                    labels,
                    parent,
                    ..Default::default()
                };
                return self.create_volume(index, new).await;
            }
            Cmd::CreateLocalVolume { name, size, read_only, tenant, labels, created_at, home } => {
                let new = NewVolume {
                    id: Some(index),
                    name,
                    size,
                    read_only,
                    storage_class: "local".into(),
                    created_at: Some(created_at),
                    tenant,
                    labels,
                    home,
                    ..Default::default()
                };
                return self.create_volume(index, new).await;
            }
            Cmd::ClearParent { id } => match self.store.get(id) {
                Ok(v) => self.store.clear_parent(&v).await,
                Err(e) => Err(e),
            },
            Cmd::ResizeVolume { id, size } => match self.store.get(id) {
                Ok(v) => match validate_volume_size(size) {
                    // A replicated volume's chunks were truncated through their own groups'
                    // logs before its record shrinks (`Cmd::Truncate`): only the size changes.
                    Ok(()) if v.is_replicated() => self.store.set_size(&v, size).await,
                    // A local volume's data is on its home node: discarded there.
                    Ok(()) => self.store.resize_volume(&v, size, true).await,
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

    /// Rolls this group's chunks of `volume` back to the snapshot at `epoch`, on the state
    /// machine worker (nothing of the group applies meanwhile).
    async fn rollback(&mut self, volume: u64, epoch: u64) -> Result<Reply, StorageError> {
        let state = self.epochs.lock().get(&volume).cloned().unwrap_or_default();
        if !state.has(epoch) {
            return Ok(Reply::Refused {
                code: tonic::Code::NotFound as i32,
                message: format!("volume {volume} has no snapshot at epoch {epoch}"),
            });
        }
        let Some(v) = self.volume(volume).await? else {
            return Ok(Reply::Refused {
                code: tonic::Code::NotFound as i32,
                message: format!("volume {volume} was deleted"),
            });
        };
        let chunks: Vec<u32> =
            snapshot::group_chunks(&v.record(), self.group, self.groups).collect();
        self.store.rollback(&v, &chunks, epoch, state.floor, &state).await.map_err(sm_err)?;
        tracing::info!(group = self.group, volume, epoch, "rolled back to a snapshot");
        Ok(Reply::Done)
    }

    /// Copies a clone's inherited blocks of this group's chunks into it, on the state machine
    /// worker.
    async fn flatten(&mut self, volume: u64) -> Result<Reply, StorageError> {
        let Some(v) = self.volume(volume).await? else {
            return Ok(Reply::Refused {
                code: tonic::Code::NotFound as i32,
                message: format!("volume {volume} was deleted"),
            });
        };
        if v.parent().is_none() {
            return Ok(Reply::Done);
        }
        let state = self.epochs.lock().get(&volume).cloned().unwrap_or_default();
        let chunks: Vec<u32> =
            snapshot::group_chunks(&v.record(), self.group, self.groups).collect();
        self.store.copy_up(&v, &chunks, &state).await.map_err(sm_err)?;
        Ok(Reply::Done)
    }

    /// Discards the volume's blocks from `size` on in this group's chunks, up to `from` (the
    /// size when the shrink began) or the record's size if larger: this replica may have
    /// applied the meta group's shrink already, so the record alone does not say how far the
    /// data went. Whole chunks are wiped (a clone's get discards, so its parent does not show
    /// through), the one `size` falls in is trimmed from there. Every replica decides the
    /// same (the epoch state is the log's).
    async fn truncate(&mut self, volume: u64, size: u64, from: u64) -> Result<Reply, StorageError> {
        let Some(v) = self.volume(volume).await? else { return Ok(Reply::Done) };
        let live = self.epochs.lock().get(&volume).is_some_and(|e| !e.snapshots.is_empty());
        if live {
            return Ok(Reply::Refused {
                code: tonic::Code::FailedPrecondition as i32,
                message: format!("volume {volume} has snapshots: delete them before shrinking"),
            });
        }
        let rec = v.record();
        let upto = rec.size.max(from);
        let clone = rec.parent.is_some();
        for chunk in size / CHUNK_SIZE..upto.div_ceil(CHUNK_SIZE) {
            if tern_common::chunk_group(rec.placement(), chunk, self.groups) != self.group {
                continue;
            }
            let start = chunk * CHUNK_SIZE;
            let end = (start + CHUNK_SIZE).min(upto);
            let head = crate::store::head_at();
            if start >= size && !clone {
                self.wipe_chunk(&v, chunk as u32).await?;
            } else if end > start.max(size) {
                let at = start.max(size);
                self.store.apply_trim(&v, at, end - at, head).await.map_err(sm_err)?;
            }
        }
        Ok(Reply::Done)
    }

    async fn create_volume(
        &mut self,
        index: u64,
        mut new: NewVolume,
    ) -> Result<Reply, StorageError> {
        // Re-applied after a restart: it exists, or it was created and deleted since.
        if self.store.get(index).is_ok() || index < self.meta.next_volume_id().map_err(sm_err)? {
            return Ok(Reply::Volume(index));
        }
        // A clone's chunks share chunk groups with its parent's.
        if let Some(p) = new.parent {
            match self.store.get(p.volume) {
                Ok(pv) => new.placement = pv.record().placement(),
                Err(e) => return refuse_or_fail(e),
            }
        }
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
        let mut epochs_installed = false;
        // The newest epoch of any version installed, per volume (see below).
        let mut newest: HashMap<u64, u64> = HashMap::new();
        for part in snapshot::read_parts(path).map_err(sm_err)? {
            for record in part.map_err(sm_err)? {
                match record {
                    Record::Volumes(recs) => self.install_volumes(recs).await?,
                    Record::Fences(fences) => {
                        for (volume, generation) in fences {
                            self.raise_fence(volume, generation)?;
                        }
                    }
                    Record::Epochs(states) => {
                        // The sender's state replaces this replica's (entries replayed after
                        // the snapshot apply on top of it, as they did on the sender).
                        let old: Vec<u64> = self.epochs.lock().keys().copied().collect();
                        let new: HashSet<u64> = states.iter().map(|(v, _)| *v).collect();
                        for v in old.into_iter().filter(|v| !new.contains(v)) {
                            self.epochs.lock().remove(&v);
                            self.meta.delete_epochs(self.group, v).map_err(sm_err)?;
                        }
                        for (v, e) in states {
                            self.change_epochs(v, |cur| *cur = e)?;
                        }
                        epochs_installed = true;
                    }
                    Record::Chunk { volume, chunk } => {
                        current = match self.volume(volume).await? {
                            Some(v) => {
                                self.store.wipe_chunk(&v, chunk).await.map_err(sm_err)?;
                                listed.insert((volume, chunk));
                                Some((v, chunk))
                            }
                            None => None,
                        };
                    }
                    Record::Blocks { first, epoch, data } => {
                        if let Some((v, chunk)) = &current {
                            let n = newest.entry(v.id.0).or_default();
                            *n = (*n).max(epoch);
                            let n = (data.len() as u64 / BLOCK_SIZE) as u32;
                            let e = crate::meta::Entry::Hole;
                            self.store
                                .install_version(v, *chunk, first, epoch, e, n, Some(data))
                                .await
                                .map_err(sm_err)?;
                        }
                    }
                    Record::Entries { first, epoch, n, discarded } => {
                        if let Some((v, chunk)) = &current {
                            let newest = newest.entry(v.id.0).or_default();
                            *newest = (*newest).max(epoch);
                            let e = if discarded {
                                crate::meta::Entry::Discarded
                            } else {
                                crate::meta::Entry::Zero
                            };
                            self.store
                                .install_version(v, *chunk, first, epoch, e, n, None)
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
        if !epochs_installed {
            for v in self.epochs.lock().keys() {
                self.meta.delete_epochs(self.group, *v).map_err(sm_err)?;
            }
            self.epochs.lock().clear();
        }
        // The epoch states were read when the stream started, the chunks after: a chunk may
        // hold versions written at an epoch past the floor sent. The sender had raised its
        // floor to that epoch before writing them, so every write at an older epoch that the
        // log replays from here on was either refused there or is already in the chunks:
        // raise the floor likewise, so they are refused here too.
        for (volume, epoch) in newest {
            let raise = self.epochs.lock().get(&volume).is_none_or(|e| e.floor < epoch);
            if raise {
                self.change_epochs(volume, |e| e.floor = e.floor.max(epoch))?;
            }
        }
        self.resume_collects();
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

    /// Removes every version of a chunk.
    async fn wipe_chunk(&self, v: &Volume, chunk: u32) -> Result<(), StorageError> {
        self.store.wipe_chunk(v, chunk).await.map_err(sm_err)
    }

    /// Makes the volume table equal to the snapshot's.
    async fn install_volumes(
        &mut self,
        recs: Vec<crate::meta::VolumeRecord>,
    ) -> Result<(), StorageError> {
        let keep: HashSet<u64> = recs.iter().map(|r| r.id).collect();
        for v in self.store.list() {
            // The cluster's volumes: replicated ones and local ones with a home node.
            let rec = v.record();
            let cluster_volume = rec.storage_class == "replicated" || rec.home != 0;
            if cluster_volume && !keep.contains(&v.id.0) {
                self.store.delete_volume(&v).await.map_err(sm_err)?;
            }
        }
        for rec in recs {
            match self.store.get(rec.id) {
                Ok(v) => {
                    let have = v.record();
                    if have.size != rec.size {
                        // As `ResizeVolume` applies: a replicated volume's chunks are truncated
                        // through their own groups' logs.
                        let r = if v.is_replicated() {
                            self.store.set_size(&v, rec.size).await
                        } else {
                            self.store.resize_volume(&v, rec.size, true).await
                        };
                        r.map_err(sm_err)?;
                    }
                    if have.read_only != rec.read_only {
                        self.store.set_read_only(&v, rec.read_only).await.map_err(sm_err)?;
                    }
                    if have.parent.is_some() && rec.parent.is_none() {
                        self.store.clear_parent(&v).await.map_err(sm_err)?;
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
                        parent: rec.parent,
                        placement: rec.placement,
                        home: rec.home,
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
        let gate = self.gate.clone();
        let _busy = gate.busy.lock().await;
        if gate.retired() {
            // Retired: nothing is applied or written any more (the group's state is gone).
            return Ok(entries.into_iter().map(|_| Reply::Done).collect());
        }
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
        let gate = self.gate.clone();
        let _busy = gate.busy.lock().await;
        if gate.retired() {
            if let Some(path) = &snapshot.path {
                let _ = std::fs::remove_file(path);
            }
            return Ok(());
        }
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
