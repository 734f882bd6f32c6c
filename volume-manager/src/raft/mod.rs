//! The managers' Raft group: one group, three replicas (one per datacenter).
//!
//! - `log_store`: the log and vote in the manager's own RocksDB, every write synced (control
//!   plane writes are rare, and an attachment's generation must survive a power loss).
//! - `state_machine`: the [`State`](crate::state::State) in memory, snapshots written to a
//!   file (synced, renamed into place).
//! - `network`: `ManagerRaft.Call` with bincode payloads, one channel per peer.

// openraft's storage and network traits return its large error types.
#![allow(clippy::result_large_err)]

pub mod log_store;
pub mod network;
pub mod state_machine;

use serde::{Deserialize, Serialize};

use crate::state::{Cmd, Reply};

/// A manager replica as the membership records it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub address: String,
    pub datacenter: String,
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.address, self.datacenter)
    }
}

openraft::declare_raft_types!(
    /// The manager's Raft types: the whole state travels as one snapshot (it is small).
    pub TypeConfig:
        D = Cmd,
        R = Reply,
        NodeId = u64,
        Node = Member,
        SnapshotData = std::io::Cursor<Vec<u8>>,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<u64>;
pub type Vote = openraft::Vote<u64>;
pub type StorageError = openraft::StorageError<u64>;
pub type Membership = openraft::StoredMembership<u64, Member>;

pub(crate) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serialize(v).expect("bincode encodes our types")
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, bincode::Error> {
    bincode::deserialize(b)
}

/// Heartbeats every 100 ms, elections after 500-1000 ms: a lost leading manager is replaced
/// in about a second, like the data groups' leaders.
pub fn raft_config() -> openraft::Config {
    openraft::Config {
        cluster_name: "tern-manager".into(),
        heartbeat_interval: 100,
        election_timeout_min: 500,
        election_timeout_max: 1000,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(1000),
        max_in_snapshot_log_to_keep: 100,
        ..Default::default()
    }
}
