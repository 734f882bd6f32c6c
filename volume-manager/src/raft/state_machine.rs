//! The manager's state machine: [`State`] in memory, shared with the gRPC service for reads.
//!
//! A snapshot is the whole state, bincode-encoded, written to `<data-dir>/snapshot` (a
//! temporary file, fsynced, renamed into place, directory fsynced). On start the state is the
//! snapshot's; openraft then re-applies the log's committed entries after it (the committed
//! id is persisted by the log store).

use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{EntryPayload, RaftSnapshotBuilder, StorageIOError, StoredMembership};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use super::{decode, encode, Entry, LogId, Member, Membership, StorageError, TypeConfig};
use crate::state::{Reply, State};

type Meta = SnapshotMeta<u64, Member>;

fn sm_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::write_state_machine(openraft::AnyError::error(e.to_string())).into()
}

#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: Meta,
    state: State,
}

pub struct StateMachine {
    state: Arc<RwLock<State>>,
    last_applied: Option<LogId>,
    membership: Membership,
    path: PathBuf,
    /// The last snapshot: its meta and the encoded state it carries.
    current: Option<(Meta, Vec<u8>)>,
}

impl StateMachine {
    /// Opens the state machine from the snapshot in `dir`, if any.
    pub fn open(dir: &Path, state: Arc<RwLock<State>>) -> anyhow::Result<Self> {
        let path = dir.join("snapshot");
        let mut sm = Self {
            state,
            last_applied: None,
            membership: Membership::default(),
            path,
            current: None,
        };
        match std::fs::read(&sm.path) {
            Ok(bytes) => {
                let f: SnapshotFile =
                    decode(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", sm.path.display()))?;
                sm.last_applied = f.meta.last_log_id;
                sm.membership = f.meta.last_membership.clone();
                sm.current = Some((f.meta, encode(&f.state)));
                *sm.state.write() = f.state;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(anyhow::anyhow!("{}: {e}", sm.path.display())),
        }
        Ok(sm)
    }
}

/// Writes `bytes` to `path` so that a crash leaves the old file or the new one, whole.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
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
        let mut state = self.state.write();
        for e in entries {
            let reply = match e.payload {
                EntryPayload::Blank => Reply::Done,
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(e.log_id), m);
                    Reply::Done
                }
                EntryPayload::Normal(cmd) => state.apply(cmd),
            };
            self.last_applied = Some(e.log_id);
            replies.push(reply);
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let meta = Meta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id: format!("m-{:?}", self.last_applied.map(|l| l.index)),
        };
        SnapshotBuilder {
            file: SnapshotFile { meta, state: self.state.read().clone() },
            path: self.path.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::default())
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let state: State = decode(snapshot.get_ref()).map_err(sm_err)?;
        let bytes = encode(&SnapshotFile { meta: meta.clone(), state: state.clone() });
        write_atomically(&self.path, &bytes).map_err(sm_err)?;
        *self.state.write() = state;
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.current = Some((meta.clone(), snapshot.into_inner()));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        // Re-read: a builder may have written a newer one since.
        match std::fs::read(&self.path) {
            Ok(bytes) => {
                let f: SnapshotFile = decode(&bytes).map_err(sm_err)?;
                self.current = Some((f.meta, encode(&f.state)));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(sm_err(e)),
        }
        // The receiver gets the state alone.
        Ok(self.current.as_ref().map(|(meta, state)| Snapshot {
            meta: meta.clone(),
            snapshot: Box::new(Cursor::new(state.clone())),
        }))
    }
}

pub struct SnapshotBuilder {
    file: SnapshotFile,
    path: PathBuf,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let bytes = encode(&self.file);
        write_atomically(&self.path, &bytes).map_err(sm_err)?;
        Ok(Snapshot {
            meta: self.file.meta.clone(),
            snapshot: Box::new(Cursor::new(encode(&self.file.state))),
        })
    }
}
