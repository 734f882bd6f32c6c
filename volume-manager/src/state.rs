//! The manager's replicated state and the commands that change it.
//!
//! Pure and deterministic: every replica applies the same commands in the same order and gets
//! the same state. Anything that depends on the clock or on other services (heartbeat ages,
//! the storage cluster's answers) is decided by the leader *before* proposing, and the
//! outcome travels in the command (e.g. `now`, `storage_id`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    Up,
    Down,
    Draining,
    Removed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: u64,
    pub address: String,
    pub datacenter: String,
    pub state: NodeState,
    pub registered_at: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Class {
    Local,
    Replicated,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// The same id as the storage cluster's (one id space for frontends and nodes).
    pub id: u64,
    pub name: String,
    pub size: u64,
    pub class: Class,
    pub read_only: bool,
    pub tenant: String,
    pub labels: BTreeMap<String, String>,
    pub created_at: u64,
    /// A clone: the volume and snapshot epoch it was cloned from.
    pub parent: Option<(u64, u64)>,
    /// A `local` volume: the storage node holding it.
    pub home: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub volume_id: u64,
    pub host: String,
    pub generation: u64,
    pub attached_at: u64,
}

/// Everything the manager replicates.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub nodes: BTreeMap<u64, NodeRecord>,
    pub volumes: BTreeMap<u64, VolumeRecord>,
    pub attachments: BTreeMap<u64, Attachment>,
    /// The last fencing generation issued per volume (kept after a detach, so a generation is
    /// never issued twice for a volume).
    pub generations: BTreeMap<u64, u64>,
    /// The storage cluster's members and chunk groups, chosen once; members change only by
    /// a finished move.
    pub cluster: Option<StorageCluster>,
    /// The node whose replicas are being moved to a spare, if any (one at a time).
    pub moving: Option<Move>,
    /// Each volume's head epoch, the epoch of its next snapshot (absent: [`FIRST_EPOCH`]).
    /// Never goes down, so an epoch is never reused.
    pub epochs: BTreeMap<u64, u64>,
    /// Snapshots by `(volume id, epoch)`.
    pub snapshots: BTreeMap<(u64, u64), SnapshotRecord>,
}

/// A volume's first head epoch (epoch 0 is never a snapshot).
pub const FIRST_EPOCH: u64 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotState {
    /// Recorded; being committed in every chunk group.
    Creating,
    Ready,
    /// Being deleted in every chunk group.
    Deleting,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub volume_id: u64,
    pub name: String,
    pub epoch: u64,
    pub created_at: u64,
    pub size: u64,
    pub state: SnapshotState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MoveReason {
    /// An operator drained the node.
    Drain,
    /// It was down longer than the manager waits (`--replace-down-after`).
    Down,
    /// A node joined (or has more room): some groups move to it from a fuller node.
    Rebalance,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    pub old: u64,
    pub new: u64,
    pub reason: MoveReason,
    pub started_at: u64,
    /// The groups whose replica on `old` moves to `new`; empty: all of them (and `old`
    /// leaves the members).
    pub groups: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageCluster {
    /// Node ids: every node holding replicas (or a meta learner), in every datacenter.
    pub members: Vec<u64>,
    pub groups: u32,
    /// The voters of groups `0..=groups` (index = group), one per datacenter
    /// (`tern_common::placement`). Moves keep it current.
    pub placement: Vec<Vec<u64>>,
}

impl StorageCluster {
    /// The groups (`0..=groups`) with a replica on `node`.
    pub fn groups_of(&self, node: u64) -> Vec<u32> {
        (0..self.placement.len() as u32)
            .filter(|&g| self.placement[g as usize].contains(&node))
            .collect()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cmd {
    RegisterNode {
        id: u64,
        address: String,
        datacenter: String,
        now: u64,
    },
    SetNodeState {
        id: u64,
        state: NodeState,
    },
    CreateVolume(VolumeRecord),
    UpdateVolume {
        id: u64,
        size: Option<u64>,
        read_only: Option<bool>,
    },
    DeleteVolume {
        id: u64,
    },
    Attach {
        volume_id: u64,
        host: String,
        takeover: bool,
        now: u64,
    },
    Detach {
        volume_id: u64,
        host: String,
    },
    /// Fixes the storage cluster's members and chunk groups (refused once set).
    FormCluster(StorageCluster),
    /// Starts moving a member's replicas to a spare of its datacenter.
    StartMove(Move),
    /// The move is done: the spare takes the old node's place among the members.
    FinishMove {
        old: u64,
        new: u64,
    },
    /// Records a snapshot of the volume at its head epoch (the volume moves on to the next);
    /// it is `Creating` until every chunk group committed it.
    CreateSnapshot {
        volume_id: u64,
        name: String,
        now: u64,
    },
    /// Every chunk group committed the snapshot.
    SnapshotCreated {
        volume_id: u64,
        epoch: u64,
    },
    /// Marks the snapshot `Deleting` (refused while it is being created).
    DeleteSnapshot {
        volume_id: u64,
        epoch: u64,
    },
    /// Every chunk group committed the deletion of these snapshots: their records go.
    SnapshotsDeleted {
        volume_id: u64,
        epochs: Vec<u64>,
    },
    /// A clone no longer needs its parent (flattened).
    ClearParent {
        id: u64,
    },
    /// Issues the volume's next fencing generation without attaching it (refused while it is
    /// attached): before a rollback, so no host writes into it meanwhile.
    NextGeneration {
        volume_id: u64,
    },
}

/// What a command did, or why it was refused (the same on every replica).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    #[default]
    Done,
    Node(NodeRecord),
    Volume(VolumeRecord),
    Attachment(Attachment),
    Cluster(StorageCluster),
    Snapshot(SnapshotRecord),
    Generation(u64),
    Refused(Refusal),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
}

impl From<Refusal> for tonic::Status {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::NotFound(m) => tonic::Status::not_found(m),
            Refusal::AlreadyExists(m) => tonic::Status::already_exists(m),
            Refusal::FailedPrecondition(m) => tonic::Status::failed_precondition(m),
            Refusal::InvalidArgument(m) => tonic::Status::invalid_argument(m),
        }
    }
}

impl State {
    pub fn volume_by_name(&self, name: &str) -> Option<&VolumeRecord> {
        self.volumes.values().find(|v| v.name == name)
    }

    /// A volume's head epoch: the one its writes carry.
    pub fn head_epoch(&self, volume_id: u64) -> u64 {
        self.epochs.get(&volume_id).copied().unwrap_or(FIRST_EPOCH)
    }

    /// The snapshots of a volume, oldest first.
    pub fn snapshots_of(&self, volume_id: u64) -> impl Iterator<Item = &SnapshotRecord> {
        self.snapshots.range((volume_id, 0)..=(volume_id, u64::MAX)).map(|(_, s)| s)
    }

    /// The snapshot of that name; one being deleted only if no other has the name (a name is
    /// free again once its snapshot's deletion is recorded).
    pub fn snapshot_by_name(&self, volume_id: u64, name: &str) -> Option<&SnapshotRecord> {
        let mut named = self.snapshots_of(volume_id).filter(|s| s.name == name);
        let first = named.next()?;
        if first.state != SnapshotState::Deleting {
            return Some(first);
        }
        Some(named.find(|s| s.state != SnapshotState::Deleting).unwrap_or(first))
    }

    pub fn apply(&mut self, cmd: Cmd) -> Reply {
        match self.try_apply(cmd) {
            Ok(r) => r,
            Err(e) => Reply::Refused(e),
        }
    }

    fn try_apply(&mut self, cmd: Cmd) -> Result<Reply, Refusal> {
        match cmd {
            Cmd::RegisterNode { id, address, datacenter, now } => {
                if id == 0 {
                    return Err(Refusal::InvalidArgument("node id 0 is reserved".into()));
                }
                if let Some(n) = self.nodes.get_mut(&id) {
                    if n.state == NodeState::Removed {
                        return Err(Refusal::FailedPrecondition(format!(
                            "node {id} was removed; a new node needs a new id"
                        )));
                    }
                    if n.datacenter != datacenter {
                        return Err(Refusal::FailedPrecondition(format!(
                            "node {id} is registered in datacenter {:?}, not {datacenter:?}",
                            n.datacenter
                        )));
                    }
                    n.address = address;
                    if n.state == NodeState::Down {
                        n.state = NodeState::Up;
                    }
                    return Ok(Reply::Node(n.clone()));
                }
                if let Some(other) = self
                    .nodes
                    .values()
                    .find(|n| n.address == address && n.state != NodeState::Removed)
                {
                    return Err(Refusal::AlreadyExists(format!(
                        "address {address} belongs to node {}",
                        other.id
                    )));
                }
                let n = NodeRecord {
                    id,
                    address,
                    datacenter,
                    state: NodeState::Up,
                    registered_at: now,
                };
                self.nodes.insert(id, n.clone());
                Ok(Reply::Node(n))
            }
            Cmd::SetNodeState { id, state } => {
                let n = self
                    .nodes
                    .get_mut(&id)
                    .ok_or_else(|| Refusal::NotFound(format!("no storage node {id}")))?;
                if n.state == NodeState::Removed && state != NodeState::Removed {
                    return Err(Refusal::FailedPrecondition(format!(
                        "node {id} was removed for good"
                    )));
                }
                // Down <-> Up follow heartbeats; an operator's Draining sticks through both.
                match (n.state, state) {
                    (NodeState::Draining, NodeState::Down) => {}
                    _ => n.state = state,
                }
                Ok(Reply::Node(n.clone()))
            }
            Cmd::CreateVolume(v) => {
                if let Some(old) = self.volume_by_name(&v.name) {
                    if old.id == v.id {
                        return Ok(Reply::Volume(old.clone()));
                    }
                    return Err(Refusal::AlreadyExists(format!(
                        "volume {:?} already exists",
                        v.name
                    )));
                }
                if self.volumes.contains_key(&v.id) {
                    return Err(Refusal::AlreadyExists(format!("volume id {} is taken", v.id)));
                }
                self.volumes.insert(v.id, v.clone());
                Ok(Reply::Volume(v))
            }
            Cmd::UpdateVolume { id, size, read_only } => {
                let v = self
                    .volumes
                    .get_mut(&id)
                    .ok_or_else(|| Refusal::NotFound(format!("no volume with id {id}")))?;
                if let Some(s) = size {
                    v.size = s;
                }
                if let Some(r) = read_only {
                    v.read_only = r;
                }
                Ok(Reply::Volume(v.clone()))
            }
            Cmd::DeleteVolume { id } => {
                if let Some(c) = self.volumes.values().find(|v| v.parent.is_some_and(|p| p.0 == id))
                {
                    return Err(Refusal::FailedPrecondition(format!(
                        "volume {id} has a clone, {:?}: flatten or delete it first",
                        c.name
                    )));
                }
                if let Some(a) = self.attachments.get(&id) {
                    return Err(Refusal::FailedPrecondition(format!(
                        "volume {id} is attached to host {:?}; detach it first",
                        a.host
                    )));
                }
                self.volumes.remove(&id);
                // The storage cluster dropped every version with the volume.
                let snaps: Vec<(u64, u64)> =
                    self.snapshots.range((id, 0)..=(id, u64::MAX)).map(|(k, _)| *k).collect();
                for k in snaps {
                    self.snapshots.remove(&k);
                }
                Ok(Reply::Done)
            }
            Cmd::Attach { volume_id, host, takeover, now } => {
                let v = self
                    .volumes
                    .get(&volume_id)
                    .ok_or_else(|| Refusal::NotFound(format!("no volume with id {volume_id}")))?;
                if let Some(a) = self.attachments.get(&volume_id) {
                    if a.host == host {
                        return Ok(Reply::Attachment(a.clone()));
                    }
                    if !takeover {
                        return Err(Refusal::FailedPrecondition(format!(
                            "volume {:?} is attached to host {:?} (generation {}); take it \
                             over to move it",
                            v.name, a.host, a.generation
                        )));
                    }
                }
                let generation = self.generations.get(&volume_id).copied().unwrap_or(0) + 1;
                self.generations.insert(volume_id, generation);
                let a = Attachment { volume_id, host, generation, attached_at: now };
                self.attachments.insert(volume_id, a.clone());
                Ok(Reply::Attachment(a))
            }
            Cmd::FormCluster(c) => {
                if let Some(existing) = &self.cluster {
                    return Ok(Reply::Cluster(existing.clone()));
                }
                let mut dcs: Vec<&str> = Vec::new();
                for id in &c.members {
                    let n = self
                        .nodes
                        .get(id)
                        .ok_or_else(|| Refusal::NotFound(format!("no storage node {id}")))?;
                    if !dcs.contains(&n.datacenter.as_str()) {
                        dcs.push(&n.datacenter);
                    }
                }
                if c.groups == 0 {
                    return Err(Refusal::InvalidArgument("a cluster has chunk groups".into()));
                }
                if c.placement.len() != c.groups as usize + 1 {
                    return Err(Refusal::InvalidArgument(format!(
                        "the placement covers {} groups, not {} and the meta group",
                        c.placement.len(),
                        c.groups
                    )));
                }
                for (g, voters) in c.placement.iter().enumerate() {
                    let mut seen: Vec<&str> = Vec::new();
                    for v in voters {
                        let dc = self.nodes.get(v).map(|n| n.datacenter.as_str());
                        match dc {
                            Some(dc) if c.members.contains(v) && !seen.contains(&dc) => {
                                seen.push(dc)
                            }
                            _ => {
                                return Err(Refusal::InvalidArgument(format!(
                                    "group {g}: node {v} is not a member, or a second replica \
                                     in its datacenter"
                                )))
                            }
                        }
                    }
                    if seen.len() != dcs.len() {
                        return Err(Refusal::InvalidArgument(format!(
                            "group {g} lacks a replica in some datacenter"
                        )));
                    }
                }
                self.cluster = Some(c.clone());
                Ok(Reply::Cluster(c))
            }
            Cmd::StartMove(mv) => {
                if let Some(cur) = &self.moving {
                    if *cur == mv {
                        return Ok(Reply::Done);
                    }
                    return Err(Refusal::FailedPrecondition(format!(
                        "node {} is being moved to node {} already",
                        cur.old, cur.new
                    )));
                }
                let cluster = self.cluster.as_ref().ok_or_else(|| {
                    Refusal::FailedPrecondition("the storage cluster is not formed yet".into())
                })?;
                if !cluster.members.contains(&mv.old) || mv.old == mv.new {
                    return Err(Refusal::FailedPrecondition(format!(
                        "moving node {} to node {}: the first must be a member, the second \
                         another node",
                        mv.old, mv.new
                    )));
                }
                let dc = |id: u64| self.nodes.get(&id).map(|n| n.datacenter.clone());
                if dc(mv.old).is_none() || dc(mv.old) != dc(mv.new) {
                    return Err(Refusal::FailedPrecondition(format!(
                        "node {} and node {} are not in one datacenter",
                        mv.old, mv.new
                    )));
                }
                if let Some(g) = mv.groups.iter().find(|&&g| {
                    cluster.placement.get(g as usize).is_none_or(|v| !v.contains(&mv.old))
                }) {
                    return Err(Refusal::FailedPrecondition(format!(
                        "node {} holds no replica of group {g}",
                        mv.old
                    )));
                }
                self.moving = Some(mv);
                Ok(Reply::Done)
            }
            Cmd::FinishMove { old, new } => {
                let mv = match &self.moving {
                    Some(cur) if cur.old == old && cur.new == new => cur.clone(),
                    _ => return Ok(Reply::Done),
                };
                self.moving = None;
                if let Some(c) = self.cluster.as_mut() {
                    for (g, voters) in c.placement.iter_mut().enumerate() {
                        if mv.groups.is_empty() || mv.groups.contains(&(g as u32)) {
                            for v in voters.iter_mut() {
                                if *v == old {
                                    *v = new;
                                }
                            }
                        }
                    }
                    if !c.members.contains(&new) {
                        c.members.push(new);
                    }
                    if mv.groups.is_empty() {
                        c.members.retain(|m| *m != old);
                    }
                }
                Ok(Reply::Done)
            }
            Cmd::CreateSnapshot { volume_id, name, now } => {
                let v = self
                    .volumes
                    .get(&volume_id)
                    .ok_or_else(|| Refusal::NotFound(format!("no volume with id {volume_id}")))?;
                if v.class != Class::Replicated {
                    return Err(Refusal::InvalidArgument(format!(
                        "volume {:?} is local: snapshots need the replicated class",
                        v.name
                    )));
                }
                if self
                    .snapshot_by_name(volume_id, &name)
                    .is_some_and(|s| s.state != SnapshotState::Deleting)
                {
                    return Err(Refusal::AlreadyExists(format!(
                        "volume {:?} has a snapshot named {name:?} already",
                        v.name
                    )));
                }
                // One creation at a time (each takes the next epoch in every group). Deletions
                // in progress do not matter: a group drops a snapshot independently of newer
                // ones, in whichever order the two entries reach it.
                if let Some(s) =
                    self.snapshots_of(volume_id).find(|s| s.state == SnapshotState::Creating)
                {
                    return Err(Refusal::FailedPrecondition(format!(
                        "snapshot {:?} of volume {:?} is still being created; try again shortly",
                        s.name, v.name,
                    )));
                }
                let epoch = self.head_epoch(volume_id);
                let rec = SnapshotRecord {
                    volume_id,
                    name,
                    epoch,
                    created_at: now,
                    size: v.size,
                    state: SnapshotState::Creating,
                };
                self.epochs.insert(volume_id, epoch + 1);
                self.snapshots.insert((volume_id, epoch), rec.clone());
                Ok(Reply::Snapshot(rec))
            }
            Cmd::SnapshotCreated { volume_id, epoch } => {
                let s = self.snapshots.get_mut(&(volume_id, epoch)).ok_or_else(|| {
                    Refusal::NotFound(format!("no snapshot at epoch {epoch} of volume {volume_id}"))
                })?;
                if s.state == SnapshotState::Creating {
                    s.state = SnapshotState::Ready;
                }
                Ok(Reply::Snapshot(s.clone()))
            }
            Cmd::DeleteSnapshot { volume_id, epoch } => {
                if let Some(c) =
                    self.volumes.values().find(|v| v.parent == Some((volume_id, epoch)))
                {
                    return Err(Refusal::FailedPrecondition(format!(
                        "the snapshot has a clone, {:?}: flatten or delete it first",
                        c.name
                    )));
                }
                let s = self.snapshots.get_mut(&(volume_id, epoch)).ok_or_else(|| {
                    Refusal::NotFound(format!("no snapshot at epoch {epoch} of volume {volume_id}"))
                })?;
                if s.state == SnapshotState::Creating {
                    return Err(Refusal::FailedPrecondition(format!(
                        "snapshot {:?} is still being created; try again shortly",
                        s.name
                    )));
                }
                s.state = SnapshotState::Deleting;
                Ok(Reply::Snapshot(s.clone()))
            }
            Cmd::SnapshotsDeleted { volume_id, epochs } => {
                for epoch in epochs {
                    self.snapshots.remove(&(volume_id, epoch));
                }
                Ok(Reply::Done)
            }
            Cmd::ClearParent { id } => {
                let v = self
                    .volumes
                    .get_mut(&id)
                    .ok_or_else(|| Refusal::NotFound(format!("no volume with id {id}")))?;
                v.parent = None;
                Ok(Reply::Volume(v.clone()))
            }
            Cmd::NextGeneration { volume_id } => {
                let v = self
                    .volumes
                    .get(&volume_id)
                    .ok_or_else(|| Refusal::NotFound(format!("no volume with id {volume_id}")))?;
                if let Some(a) = self.attachments.get(&volume_id) {
                    return Err(Refusal::FailedPrecondition(format!(
                        "volume {:?} is attached to host {:?}; detach it first",
                        v.name, a.host
                    )));
                }
                let generation = self.generations.get(&volume_id).copied().unwrap_or(0) + 1;
                self.generations.insert(volume_id, generation);
                Ok(Reply::Generation(generation))
            }
            Cmd::Detach { volume_id, host } => match self.attachments.get(&volume_id) {
                None => Ok(Reply::Done),
                Some(a) if a.host == host => {
                    self.attachments.remove(&volume_id);
                    Ok(Reply::Done)
                }
                Some(a) => Err(Refusal::FailedPrecondition(format!(
                    "volume {volume_id} is attached to host {:?}, not {host:?}",
                    a.host
                ))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(id: u64, name: &str) -> VolumeRecord {
        VolumeRecord {
            id,
            name: name.into(),
            size: 1 << 30,
            class: Class::Replicated,
            read_only: false,
            tenant: String::new(),
            labels: BTreeMap::new(),
            created_at: 1,
            parent: None,
            home: 0,
        }
    }

    fn reg(id: u64, address: &str, dc: &str) -> Cmd {
        Cmd::RegisterNode { id, address: address.into(), datacenter: dc.into(), now: 7 }
    }

    #[test]
    fn nodes_register_once_per_id_and_keep_their_datacenter() {
        let mut s = State::default();
        assert!(matches!(s.apply(reg(1, "a:1", "dc1")), Reply::Node(_)));
        // Re-registering (a restart) may change the address, not the datacenter.
        assert!(matches!(s.apply(reg(1, "a:2", "dc1")), Reply::Node(n) if n.address == "a:2"));
        assert!(matches!(
            s.apply(reg(1, "a:2", "dc2")),
            Reply::Refused(Refusal::FailedPrecondition(_))
        ));
        assert!(matches!(s.apply(reg(2, "a:2", "dc2")), Reply::Refused(Refusal::AlreadyExists(_))));
        assert!(matches!(s.apply(reg(0, "b:1", "dc2")), Reply::Refused(_)));
        // Down comes back up on registration; removed never does.
        s.apply(Cmd::SetNodeState { id: 1, state: NodeState::Down });
        assert!(
            matches!(s.apply(reg(1, "a:2", "dc1")), Reply::Node(n) if n.state == NodeState::Up)
        );
        s.apply(Cmd::SetNodeState { id: 1, state: NodeState::Removed });
        assert!(matches!(s.apply(reg(1, "a:2", "dc1")), Reply::Refused(_)));
        assert!(matches!(
            s.apply(Cmd::SetNodeState { id: 1, state: NodeState::Up }),
            Reply::Refused(_)
        ));
    }

    #[test]
    fn the_storage_cluster_is_formed_once_with_a_valid_placement() {
        let mut s = State::default();
        s.apply(reg(1, "a:1", "dc1"));
        s.apply(reg(2, "a:2", "dc1"));
        s.apply(reg(3, "a:3", "dc2"));
        let form = |members: Vec<u64>, placement: Vec<Vec<u64>>| {
            Cmd::FormCluster(StorageCluster { members, groups: 1, placement })
        };
        let refused = |r: Reply| matches!(r, Reply::Refused(Refusal::InvalidArgument(_)));
        assert!(refused(s.apply(form(vec![1, 3], vec![vec![1, 3]]))), "a group missing");
        assert!(refused(s.apply(form(vec![1, 3], vec![vec![1, 3], vec![1, 2]]))), "not a member");
        assert!(
            refused(s.apply(form(vec![1, 2, 3], vec![vec![1, 3], vec![1, 2, 3]]))),
            "two in dc1"
        );
        assert!(refused(s.apply(form(vec![1, 3], vec![vec![1, 3], vec![3]]))), "dc1 missing");
        assert!(matches!(
            s.apply(form(vec![1, 9], vec![vec![1], vec![9]])),
            Reply::Refused(Refusal::NotFound(_))
        ));
        let ok = form(vec![1, 2, 3], vec![vec![1, 3], vec![2, 3]]);
        assert!(matches!(s.apply(ok), Reply::Cluster(c) if c.members == vec![1, 2, 3]));
        // Once formed, it stays.
        assert!(matches!(
            s.apply(form(vec![2, 3], vec![vec![2, 3], vec![2, 3]])),
            Reply::Cluster(c) if c.members == vec![1, 2, 3]
        ));
        assert_eq!(s.cluster.as_ref().unwrap().groups_of(3), vec![0, 1]);
        assert_eq!(s.cluster.as_ref().unwrap().groups_of(2), vec![1]);
    }

    #[test]
    fn a_move_puts_another_node_of_the_same_datacenter_in_a_members_place() {
        let mut s = State::default();
        for (id, dc) in [(1, "dc1"), (2, "dc2"), (3, "dc3"), (4, "dc3"), (5, "dc1")] {
            s.apply(reg(id, &format!("a:{id}"), dc));
        }
        let mv = |old, new, groups: Vec<u32>| Move {
            old,
            new,
            reason: MoveReason::Drain,
            started_at: 1,
            groups,
        };
        assert!(
            matches!(s.apply(Cmd::StartMove(mv(3, 4, vec![]))), Reply::Refused(_)),
            "no cluster"
        );
        let placement = vec![vec![1, 2, 3]; 5];
        s.apply(Cmd::FormCluster(StorageCluster { members: vec![1, 2, 3], groups: 4, placement }));
        assert!(matches!(s.apply(Cmd::StartMove(mv(3, 5, vec![]))), Reply::Refused(_)), "other dc");
        assert!(
            matches!(s.apply(Cmd::StartMove(mv(4, 3, vec![]))), Reply::Refused(_)),
            "not a member"
        );
        assert!(matches!(s.apply(Cmd::StartMove(mv(3, 3, vec![]))), Reply::Refused(_)), "itself");
        // A rebalance: groups 1 and 2 go to node 4, which joins the members; node 3 stays.
        assert_eq!(s.apply(Cmd::StartMove(mv(3, 4, vec![1, 2]))), Reply::Done);
        assert_eq!(s.apply(Cmd::StartMove(mv(3, 4, vec![1, 2]))), Reply::Done, "idempotent");
        assert!(
            matches!(s.apply(Cmd::StartMove(mv(1, 5, vec![]))), Reply::Refused(_)),
            "one at a time"
        );
        // Finishing another move than the current one changes nothing.
        assert_eq!(s.apply(Cmd::FinishMove { old: 1, new: 5 }), Reply::Done);
        assert_eq!(s.cluster.as_ref().unwrap().members, vec![1, 2, 3]);
        assert_eq!(s.apply(Cmd::FinishMove { old: 3, new: 4 }), Reply::Done);
        let c = s.cluster.clone().unwrap();
        assert_eq!(c.members, vec![1, 2, 3, 4]);
        assert_eq!((c.groups_of(3), c.groups_of(4)), (vec![0, 3, 4], vec![1, 2]));
        // A group node 3 does not hold is refused; a drain moves the rest and retires it.
        assert!(matches!(s.apply(Cmd::StartMove(mv(3, 4, vec![1]))), Reply::Refused(_)));
        assert_eq!(s.apply(Cmd::StartMove(mv(3, 4, vec![]))), Reply::Done);
        assert_eq!(s.apply(Cmd::FinishMove { old: 3, new: 4 }), Reply::Done);
        let c = s.cluster.clone().unwrap();
        assert_eq!(c.members, vec![1, 2, 4]);
        assert_eq!(c.groups_of(4), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn draining_survives_down_and_up() {
        let mut s = State::default();
        s.apply(reg(1, "a:1", "dc1"));
        s.apply(Cmd::SetNodeState { id: 1, state: NodeState::Draining });
        s.apply(Cmd::SetNodeState { id: 1, state: NodeState::Down });
        assert_eq!(s.nodes[&1].state, NodeState::Draining);
    }

    #[test]
    fn attachments_are_exclusive_with_growing_generations() {
        let mut s = State::default();
        s.apply(Cmd::CreateVolume(vol(5, "v")));
        let attach = |host: &str, takeover| Cmd::Attach {
            volume_id: 5,
            host: host.into(),
            takeover,
            now: 9,
        };
        let Reply::Attachment(a) = s.apply(attach("h1", false)) else { panic!() };
        assert_eq!(a.generation, 1);
        // Idempotent for the same host.
        assert_eq!(s.apply(attach("h1", false)), Reply::Attachment(a.clone()));
        // Another host is refused, unless it takes over (a new generation).
        assert!(matches!(
            s.apply(attach("h2", false)),
            Reply::Refused(Refusal::FailedPrecondition(_))
        ));
        let Reply::Attachment(b) = s.apply(attach("h2", true)) else { panic!() };
        assert_eq!((b.host.as_str(), b.generation), ("h2", 2));
        // The old host can no longer detach it; the new one can; generations never repeat.
        assert!(matches!(
            s.apply(Cmd::Detach { volume_id: 5, host: "h1".into() }),
            Reply::Refused(_)
        ));
        assert_eq!(s.apply(Cmd::Detach { volume_id: 5, host: "h2".into() }), Reply::Done);
        assert_eq!(s.apply(Cmd::Detach { volume_id: 5, host: "h2".into() }), Reply::Done);
        let Reply::Attachment(c) = s.apply(attach("h1", false)) else { panic!() };
        assert_eq!(c.generation, 3);
        // An attached volume is not deleted.
        assert!(matches!(s.apply(Cmd::DeleteVolume { id: 5 }), Reply::Refused(_)));
        assert!(matches!(
            s.apply(Cmd::Attach { volume_id: 6, host: "h".into(), takeover: false, now: 1 }),
            Reply::Refused(Refusal::NotFound(_))
        ));
    }

    #[test]
    fn volume_names_are_unique_and_creation_is_idempotent() {
        let mut s = State::default();
        assert!(matches!(s.apply(Cmd::CreateVolume(vol(1, "a"))), Reply::Volume(_)));
        assert!(matches!(s.apply(Cmd::CreateVolume(vol(1, "a"))), Reply::Volume(_)));
        assert!(matches!(
            s.apply(Cmd::CreateVolume(vol(2, "a"))),
            Reply::Refused(Refusal::AlreadyExists(_))
        ));
        assert!(matches!(
            s.apply(Cmd::UpdateVolume { id: 1, size: Some(2 << 30), read_only: None }),
            Reply::Volume(v) if v.size == 2 << 30
        ));
        assert_eq!(s.apply(Cmd::DeleteVolume { id: 1 }), Reply::Done);
        assert!(s.volume_by_name("a").is_none());
    }

    #[test]
    fn snapshots_take_the_head_epoch_one_at_a_time() {
        let mut s = State::default();
        s.apply(Cmd::CreateVolume(vol(1, "a")));
        let snap = |name: &str| Cmd::CreateSnapshot { volume_id: 1, name: name.into(), now: 9 };
        let Reply::Snapshot(a) = s.apply(snap("a")) else { panic!() };
        assert_eq!((a.epoch, a.state), (FIRST_EPOCH, SnapshotState::Creating));
        assert_eq!(s.head_epoch(1), 2);
        // One at a time per volume, and names are unique per volume.
        assert!(matches!(s.apply(snap("b")), Reply::Refused(Refusal::FailedPrecondition(_))));
        s.apply(Cmd::SnapshotCreated { volume_id: 1, epoch: 1 });
        assert!(matches!(s.apply(snap("a")), Reply::Refused(Refusal::AlreadyExists(_))));
        let Reply::Snapshot(b) = s.apply(snap("b")) else { panic!() };
        assert_eq!(b.epoch, 2);
        assert!(matches!(
            s.apply(Cmd::DeleteSnapshot { volume_id: 1, epoch: 2 }),
            Reply::Refused(Refusal::FailedPrecondition(_))
        ));
        s.apply(Cmd::SnapshotCreated { volume_id: 1, epoch: 2 });
        assert!(matches!(
            s.apply(Cmd::DeleteSnapshot { volume_id: 1, epoch: 1 }),
            Reply::Snapshot(r) if r.state == SnapshotState::Deleting
        ));
        // While "a" is being deleted its name is free, and snapshots can still be taken.
        let Reply::Snapshot(c) = s.apply(snap("a")) else { panic!() };
        assert_eq!(c.epoch, 3);
        assert_eq!(s.snapshot_by_name(1, "a").map(|r| r.epoch), Some(3));
        s.apply(Cmd::SnapshotCreated { volume_id: 1, epoch: 3 });
        assert!(matches!(
            s.apply(Cmd::DeleteSnapshot { volume_id: 1, epoch: 2 }),
            Reply::Snapshot(r) if r.state == SnapshotState::Deleting
        ));
        s.apply(Cmd::SnapshotsDeleted { volume_id: 1, epochs: vec![1, 2] });
        let names = |s: &State| s.snapshots_of(1).map(|r| r.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&s), vec!["a"]);
        // Epochs are never reused, even after deletions.
        let Reply::Snapshot(d) = s.apply(snap("d")) else { panic!() };
        assert_eq!(d.epoch, 4);
        // Local volumes have none; a deleted volume's go with it.
        let mut local = vol(2, "l");
        local.class = Class::Local;
        s.apply(Cmd::CreateVolume(local));
        let r = s.apply(Cmd::CreateSnapshot { volume_id: 2, name: "x".into(), now: 1 });
        assert!(matches!(r, Reply::Refused(Refusal::InvalidArgument(_))));
        s.apply(Cmd::DeleteVolume { id: 1 });
        assert_eq!(s.snapshots_of(1).count(), 0);
    }
}
