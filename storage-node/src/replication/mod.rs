//! Replication: every chunk group is one Raft group (openraft) with one replica per
//! datacenter; group 0 (`META_GROUP`) holds the volume records.
//!
//! - [`log_store`]: each group's Raft log and vote in the node's one RocksDB instance.
//! - [`state_machine`]: applies committed entries to the [`ChunkStore`](crate::store::ChunkStore).
//! - [`transport`]: one gRPC connection per peer node carries all groups' messages, batched.
//! - [`cluster`]: the node's groups, bootstrap, and the replicated data and admin paths.
//!
//! # Durability of a replicated write
//!
//! A write is acknowledged once its log entry (which carries the data) is in the RocksDB WAL
//! of a majority of the group's replicas and the leader applied it to its chunk store. The WAL
//! write survives `kill -9` of any process. For power loss, an entry marked durable (FUA
//! writes, and the `Flush` entry an NBD flush proposes) is only reported stored by a replica's
//! log after that replica ran its full barrier (data files fdatasynced, then the WAL fsynced):
//! so a flushed write is on stable storage on a majority before the flush is acknowledged.

// openraft's storage traits fix the (large) error type these modules return.
#![allow(clippy::result_large_err)]

pub mod cluster;
pub mod log_store;
pub mod snapshot;
pub mod state_machine;
pub mod transport;

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use cluster::{Cluster, ClusterConfig, NodeAddr};

/// A command in a Raft log.
///
/// Data commands carry the writer's attachment `generation` (0 = not attached through the
/// volume manager): a replica applying one with a generation below the volume's fence (see
/// `Fence`) refuses it, identically on every replica, since the fence is in the same log.
/// They also carry the `epoch` they write at (0 = the head, whatever it is): one below the
/// group's floor (a snapshot was taken since) is refused, and the writer writes again at the
/// newer epoch (see [`crate::epoch`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Cmd {
    // ----- data groups -----
    Write {
        volume: u64,
        offset: u64,
        data: Bytes,
        fua: bool,
        generation: u64,
        epoch: u64,
    },
    WriteZeroes {
        volume: u64,
        offset: u64,
        len: u64,
        punch: bool,
        fua: bool,
        generation: u64,
        epoch: u64,
    },
    Trim {
        volume: u64,
        offset: u64,
        len: u64,
        fua: bool,
        generation: u64,
        epoch: u64,
    },
    /// A durability point: every entry up to this one is on stable storage on each replica
    /// that reports it stored.
    Flush,
    /// From here on, this group refuses the volume's data commands of an older generation
    /// (the volume manager gave the attachment to another host). Fences only rise.
    Fence {
        volume: u64,
        generation: u64,
    },
    /// Freezes the volume's blocks at `epoch` in this group: a snapshot. Writes move on to
    /// later epochs; the versions the snapshot sees are kept.
    Snapshot {
        volume: u64,
        epoch: u64,
    },
    /// Deletes the snapshots at `epochs` in this group; the versions only they saw are
    /// reclaimed in the background.
    DeleteSnapshot {
        volume: u64,
        epochs: Vec<u64>,
    },
    /// Rolls the volume's chunks in this group back to the snapshot at `epoch` (see
    /// `ChunkStore::rollback`).
    Rollback {
        volume: u64,
        epoch: u64,
    },
    /// Copies into a clone every block of this group's chunks it has no version of, from its
    /// parent's snapshot (see `ChunkStore::copy_up`).
    Flatten {
        volume: u64,
    },
    // ----- the meta group -----
    /// Creates a volume whose id is this entry's log index (the same on every replica).
    CreateVolume {
        name: String,
        size: u64,
        read_only: bool,
        tenant: String,
        labels: BTreeMap<String, String>,
        created_at: u64,
        /// A clone: its chunks are placed like the parent's (see `VolumeRecord::placement`).
        parent: Option<crate::meta::Parent>,
    },
    /// Forgets a clone's parent (every block was copied up by `Flatten`).
    ClearParent {
        id: u64,
    },
    ResizeVolume {
        id: u64,
        size: u64,
    },
    SetReadOnly {
        id: u64,
        read_only: bool,
    },
    DeleteVolume {
        id: u64,
    },
    /// (Appended after the original variants: log entries encode the variant's index.)
    /// Creates a `local` volume held by node `home` alone (its I/O never goes through a
    /// Raft log; the record is the cluster's, so every node can tell where it lives).
    CreateLocalVolume {
        name: String,
        size: u64,
        read_only: bool,
        tenant: String,
        labels: BTreeMap<String, String>,
        created_at: u64,
        home: u64,
    },
    // ----- data groups, added later (variants are encoded by index: append only) -----
    /// Discards the volume's blocks from `size` on (up to `from`, the size when the shrink
    /// began, or the record's if larger) in this group's chunks: the first step of a shrink.
    /// Refused while the group holds snapshots of the volume.
    Truncate {
        volume: u64,
        size: u64,
        from: u64,
    },
}

impl Cmd {
    /// Whether a replica must run its durability barrier before reporting this entry stored.
    pub fn durable(&self) -> bool {
        match self {
            Cmd::Write { fua, .. } | Cmd::WriteZeroes { fua, .. } | Cmd::Trim { fua, .. } => *fua,
            Cmd::Flush => true,
            // A fence must outlive a power loss: the old host might write again.
            Cmd::Fence { .. } => true,
            // So must a snapshot: writes after it must not land in it after a power loss.
            Cmd::Snapshot { .. }
            | Cmd::DeleteSnapshot { .. }
            | Cmd::Rollback { .. }
            | Cmd::Flatten { .. }
            | Cmd::Truncate { .. } => true,
            // Volume records are small and rare: always durable.
            Cmd::CreateVolume { .. }
            | Cmd::CreateLocalVolume { .. }
            | Cmd::ResizeVolume { .. }
            | Cmd::SetReadOnly { .. }
            | Cmd::ClearParent { .. }
            | Cmd::DeleteVolume { .. } => true,
        }
    }
}

/// The outcome of applying a command: identical on every replica.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub enum Reply {
    #[default]
    Done,
    /// The volume created or changed.
    Volume(u64),
    /// The command was refused (e.g. a name already taken): a gRPC code and a message.
    Refused { code: i32, message: String },
    /// A write at an epoch a snapshot has frozen since: write again at `floor`.
    StaleEpoch { volume: u64, epoch: u64, floor: u64 },
}

/// A replica's node as group memberships record it: where to reach it, and its datacenter.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub address: String,
    pub datacenter: String,
}

impl Member {
    pub fn of(n: &tern_common::NodeAddr) -> Self {
        Self { address: n.address.clone(), datacenter: n.datacenter.clone() }
    }
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.address, self.datacenter)
    }
}

openraft::declare_raft_types!(
    /// Tern's Raft types: node ids are storage node ids; snapshots are streamed by the
    /// transport from the live chunk store (see [`snapshot`]).
    pub TypeConfig:
        D = Cmd,
        R = Reply,
        NodeId = u64,
        Node = Member,
        SnapshotData = snapshot::SnapshotFile,
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

/// Longest election timeout, in milliseconds: also openraft's leader lease (a follower that
/// heard from its leader refuses other candidates this long), on which the leader's read
/// lease rests (see `cluster::leadership`).
pub const ELECTION_TIMEOUT_MAX_MS: u64 = 800;

/// Raft timing: heartbeats every 100 ms. openraft makes a follower campaign once its leader
/// lease ([`ELECTION_TIMEOUT_MAX_MS`]) and then an election timeout of 400-800 ms passed
/// without word from its leader (1.2-1.6 s); a follower whose leader's node fell silent
/// altogether campaigns sooner, 850 ms in (`cluster::leadership`). Hundreds of groups
/// share one connection per peer, where their heartbeats are batched.
///
/// Log compaction: a snapshot (only its meta: see [`snapshot`]) every `snapshot_every`
/// entries, keeping a quarter of that behind it, so a replica that was away briefly catches
/// up from the log and one away longer gets the group's state streamed.
pub fn raft_config(snapshot_every: u64) -> openraft::Config {
    openraft::Config {
        cluster_name: "tern".into(),
        heartbeat_interval: 100,
        election_timeout_min: ELECTION_TIMEOUT_MAX_MS / 2,
        election_timeout_max: ELECTION_TIMEOUT_MAX_MS,
        // 1 MiB writes make large entries. A group's heartbeats wait behind its appends in
        // flight, so appends stay small enough (8 MiB) to travel well within an election
        // timeout even on a loaded machine: measured, 32 MiB appends under 1 MiB sequential
        // writes starved heartbeats and groups kept re-electing.
        max_payload_entries: 8,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_every.max(1)),
        max_in_snapshot_log_to_keep: snapshot_every / 4,
        purge_batch_size: 256,
        // Streaming a large group takes a while.
        install_snapshot_timeout: 600_000,
        ..Default::default()
    }
}
