//! The manager's gRPC services: `VolumeAdmin` (volumes) and `Manager` (nodes, attachments,
//! cluster status).
//!
//! Any replica answers: a follower forwards the call to the leader (marked with
//! `x-tern-forwarded`, so a call is forwarded at most once), waiting out an election for up to
//! [`LEADER_WAIT`]. The leader reads its state after confirming its leadership with a quorum
//! (linearizable), and changes it only through the Raft log.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use openraft::error::{ClientWriteError, RaftError};
use parking_lot::{Mutex, RwLock};
use tern_common::placement::{pick_target, place_groups, Candidate};
use tern_common::{validate_volume_name, validate_volume_size, BLOCK_SIZE, CHUNK_SIZE};
use tern_proto::v1::{self, manager_client::ManagerClient, volume_admin_client::VolumeAdminClient};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::raft::network::Network;
use crate::raft::Raft;
use crate::state::{
    Attachment, Class, Cmd, NodeRecord, NodeState, Reply, SnapshotRecord, SnapshotState, State,
    StorageCluster, VolumeRecord,
};
use crate::storage;

const FORWARDED: &str = "x-tern-forwarded";
/// The storage cluster forms only once no node has registered for this long: nodes started
/// together all become members (later ones join by rebalancing).
const FORM_SETTLE_SECS: u64 = 2;
/// How long a call waits for a leader (an election takes about a second).
pub const LEADER_WAIT: Duration = Duration::from_secs(8);

/// What the leading manager last heard from a storage node (not replicated: a new leader
/// starts afresh and gives every node `node_down_after` to be heard from).
#[derive(Clone, Copy, Debug)]
pub struct Seen {
    pub at: Instant,
    pub capacity: u64,
    pub used: u64,
    /// Its disk is beyond its full ratio.
    pub full: bool,
}

impl Seen {
    /// Free bytes as the node's heartbeat told (its filesystem's size less what it stores).
    pub fn free(&self) -> u64 {
        self.capacity.saturating_sub(self.used)
    }
}

pub struct Manager {
    pub id: u64,
    /// Chunk groups of the storage cluster it forms (see `GetClusterConfig`).
    pub groups: u32,
    pub raft: Raft,
    pub state: Arc<RwLock<State>>,
    pub seen: Arc<Mutex<HashMap<u64, Seen>>>,
    /// The Raft network's channels to the other replicas, reused for forwarding.
    network: Network,
    /// Volumes whose fence this leader saw committed, with that generation (soft state: a
    /// new leader pushes a fence again once).
    fenced: Mutex<HashMap<u64, u64>>,
    /// Serializes volume administration on the leader (each step calls the storage cluster,
    /// then proposes; two creates of one name must not interleave).
    admin: tokio::sync::Mutex<()>,
    /// Woken when a snapshot deletion is recorded (see `monitor::delete_snapshots`).
    pub deletions: tokio::sync::Notify,
}

pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn forwarded<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(FORWARDED, "1".parse().expect("ascii"));
    r
}

fn is_forwarded<T>(r: &Request<T>) -> bool {
    r.metadata().contains_key(FORWARDED)
}

fn refused(reply: Reply) -> Result<Reply, Status> {
    match reply {
        Reply::Refused(r) => Err(r.into()),
        other => Ok(other),
    }
}

fn node_state_to_wire(s: NodeState) -> v1::NodeState {
    match s {
        NodeState::Up => v1::NodeState::Up,
        NodeState::Down => v1::NodeState::Down,
        NodeState::Draining => v1::NodeState::Draining,
        NodeState::Removed => v1::NodeState::Removed,
    }
}

fn class_to_wire(c: Class) -> v1::StorageClass {
    match c {
        Class::Local => v1::StorageClass::Local,
        Class::Replicated => v1::StorageClass::Replicated,
    }
}

fn volume_to_wire(v: &VolumeRecord, allocated: u64) -> v1::Volume {
    v1::Volume {
        id: v.id,
        name: v.name.clone(),
        size_bytes: v.size,
        block_size: BLOCK_SIZE as u32,
        chunk_size: CHUNK_SIZE,
        storage_class: class_to_wire(v.class) as i32,
        read_only: v.read_only,
        created_at: v.created_at,
        allocated_bytes: allocated,
        tenant: v.tenant.clone(),
        labels: v.labels.clone().into_iter().collect(),
        parent_volume_id: v.parent.map_or(0, |p| p.0),
        parent_epoch: v.parent.map_or(0, |p| p.1),
        // Routing is the storage nodes' business (they fill it in).
        placement_id: 0,
        home_node: v.home,
    }
}

fn attachment_to_wire(a: &Attachment, state: &State) -> v1::Attachment {
    v1::Attachment {
        volume_id: a.volume_id,
        volume: state.volumes.get(&a.volume_id).map(|v| v.name.clone()).unwrap_or_default(),
        host: a.host.clone(),
        generation: a.generation,
        attached_at: a.attached_at,
        epoch: state.head_epoch(a.volume_id),
    }
}

fn snapshot_to_wire(s: &SnapshotRecord, state: &State, exclusive: u64) -> v1::Snapshot {
    v1::Snapshot {
        volume_id: s.volume_id,
        volume: state.volumes.get(&s.volume_id).map(|v| v.name.clone()).unwrap_or_default(),
        name: s.name.clone(),
        epoch: s.epoch,
        created_at: s.created_at,
        size_bytes: s.size,
        state: match s.state {
            SnapshotState::Creating => v1::SnapshotState::Creating,
            SnapshotState::Ready => v1::SnapshotState::Ready,
            SnapshotState::Deleting => v1::SnapshotState::Deleting,
        } as i32,
        exclusive_bytes: exclusive,
    }
}

impl Manager {
    pub fn new(
        id: u64,
        groups: u32,
        raft: Raft,
        state: Arc<RwLock<State>>,
        network: Network,
    ) -> Arc<Self> {
        Arc::new(Self {
            id,
            groups,
            raft,
            state,
            seen: Arc::default(),
            network,
            fenced: Mutex::default(),
            admin: tokio::sync::Mutex::new(()),
            deletions: tokio::sync::Notify::new(),
        })
    }

    fn channel(&self, address: &str) -> Result<Channel, Status> {
        self.network
            .channel(address)
            .map_err(|e| Status::internal(format!("manager address {address:?}: {e}")))
    }

    /// `None` if this replica leads (handle the call here), else a channel to the leader.
    async fn leader<T>(&self, req: &Request<T>) -> Result<Option<Channel>, Status> {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        let mut metrics = self.raft.metrics();
        loop {
            let (leader, address) = {
                let m = metrics.borrow_and_update();
                let leader = m.current_leader;
                let address = leader.and_then(|l| {
                    m.membership_config.membership().get_node(&l).map(|n| n.address.clone())
                });
                (leader, address)
            };
            match (leader, address) {
                // A replica restarted with its own committed vote believes it leads until it
                // hears of a newer term: confirm with a quorum before serving, else wait for
                // the leader the others elected.
                (Some(l), _) if l == self.id => {
                    let confirm = tokio::time::timeout(
                        Duration::from_secs(2),
                        self.raft.ensure_linearizable(),
                    );
                    if let Ok(Ok(_)) = confirm.await {
                        return Ok(None);
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(Status::unavailable(format!(
                            "manager {}: leadership not confirmed by a quorum",
                            self.id
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                (Some(_), Some(a)) if !is_forwarded(req) => return Ok(Some(self.channel(&a)?)),
                _ => {}
            }
            if tokio::time::timeout_at(deadline, metrics.changed()).await.is_err() {
                return Err(Status::unavailable(format!(
                    "manager {}: no leading manager (leader known: {:?})",
                    self.id, leader
                )));
            }
        }
    }

    /// Confirms leadership with a quorum: what this replica's state says is then current.
    async fn linearize(&self) -> Result<(), Status> {
        self.raft.ensure_linearizable().await.map(|_| ()).map_err(|e| {
            Status::unavailable(format!("manager {}: leadership not confirmed: {e}", self.id))
        })
    }

    pub async fn propose(&self, cmd: Cmd) -> Result<Reply, Status> {
        match self.raft.client_write(cmd).await {
            Ok(r) => refused(r.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(Status::unavailable(format!(
                    "manager {}: leadership moved (to {:?}); retry",
                    self.id, f.leader_id
                )))
            }
            Err(e) => Err(Status::unavailable(format!("manager {}: {e}", self.id))),
        }
    }

    /// Addresses of the storage nodes that are up: the storage cluster's members first (a
    /// former member or a spare holds no replica and knows no leader), each kind by the
    /// freshest heartbeat first.
    fn storage_addresses(&self) -> Vec<String> {
        let seen = self.seen.lock();
        let st = self.state.read();
        let member = |id: u64| st.cluster.as_ref().is_none_or(|c| c.members.contains(&id));
        let mut up: Vec<&NodeRecord> = st
            .nodes
            .values()
            .filter(|n| matches!(n.state, NodeState::Up | NodeState::Draining))
            .collect();
        up.sort_by_key(|n| (!member(n.id), std::cmp::Reverse(seen.get(&n.id).map(|s| s.at))));
        up.into_iter().map(|n| n.address.clone()).collect()
    }

    /// Addresses of the members that are up (all up nodes before the cluster is formed).
    fn member_addresses(&self) -> Vec<String> {
        let all = self.storage_addresses();
        let st = self.state.read();
        let Some(c) = &st.cluster else { return all };
        let members: Vec<&str> = c
            .members
            .iter()
            .filter_map(|id| st.nodes.get(id))
            .map(|n| n.address.as_str())
            .collect();
        all.into_iter().filter(|a| members.contains(&a.as_str())).collect()
    }

    fn find_volume(&self, r: Option<&v1::VolumeRef>) -> Result<VolumeRecord, Status> {
        let st = self.state.read();
        match r.and_then(|r| r.r#ref.as_ref()) {
            Some(v1::volume_ref::Ref::Id(id)) => st
                .volumes
                .get(id)
                .cloned()
                .ok_or_else(|| Status::not_found(format!("no volume with id {id}"))),
            Some(v1::volume_ref::Ref::Name(n)) => st
                .volume_by_name(n)
                .cloned()
                .ok_or_else(|| Status::not_found(format!("no volume named {n:?}"))),
            None => Err(Status::invalid_argument("a volume (id or name) is required")),
        }
    }

    fn node_to_wire(&self, n: &NodeRecord) -> v1::StorageNode {
        let seen = self.seen.lock().get(&n.id).copied();
        let (member, replicas) = match &self.state.read().cluster {
            Some(c) => (c.members.contains(&n.id), c.groups_of(n.id).len() as u32),
            None => (false, 0),
        };
        v1::StorageNode {
            id: n.id,
            address: n.address.clone(),
            datacenter: n.datacenter.clone(),
            state: node_state_to_wire(n.state) as i32,
            capacity_bytes: seen.map_or(0, |s| s.capacity),
            used_bytes: seen.map_or(0, |s| s.used),
            registered_at: n.registered_at,
            heartbeat_age_ms: seen.map(|s| s.at.elapsed().as_millis() as u64),
            member,
            replicas,
            full: seen.is_some_and(|s| s.full),
        }
    }

    // ------------------------------------------------------------------ volumes (leader)

    async fn create_here(&self, req: v1::CreateVolumeRequest) -> Result<v1::Volume, Status> {
        validate_volume_name(&req.name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        // A tenant is named like a volume (or empty: none).
        if !req.tenant.is_empty() {
            validate_volume_name(&req.tenant)
                .map_err(|e| Status::invalid_argument(format!("tenant: {e}")))?;
        }
        validate_volume_size(req.size_bytes)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let class = match v1::StorageClass::try_from(req.storage_class) {
            Ok(v1::StorageClass::Local) => Class::Local,
            Ok(v1::StorageClass::Replicated | v1::StorageClass::Unspecified) => Class::Replicated,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown storage class {}",
                    req.storage_class
                )))
            }
        };
        let _admin = self.admin.lock().await;
        self.linearize().await?;
        if self.state.read().volume_by_name(&req.name).is_some() {
            return Err(Status::already_exists(format!("volume {:?} already exists", req.name)));
        }
        let addrs = self.storage_addresses();
        let mut wire = req.clone();
        wire.storage_class = class_to_wire(class) as i32;
        wire.home_node = match class {
            Class::Local => self.local_home(req.home_node)?,
            Class::Replicated if req.home_node != 0 => {
                return Err(Status::invalid_argument(
                    "a home node is for 'local' volumes; 'replicated' ones live in every \
                     datacenter",
                ))
            }
            Class::Replicated => 0,
        };
        let made = match storage::create_volume(&addrs, wire).await {
            Ok(v) => v,
            // Created by an earlier attempt that did not get to record it: adopt it.
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                let by_name =
                    v1::VolumeRef { r#ref: Some(v1::volume_ref::Ref::Name(req.name.clone())) };
                let v = storage::get_volume(&addrs, by_name).await?;
                if v.storage_class != class_to_wire(class) as i32 {
                    return Err(s);
                }
                v
            }
            Err(s) => return Err(s),
        };
        let rec = VolumeRecord {
            id: made.id,
            name: made.name.clone(),
            size: made.size_bytes,
            class,
            read_only: made.read_only,
            tenant: req.tenant,
            labels: req.labels.into_iter().collect::<BTreeMap<_, _>>(),
            created_at: made.created_at,
            parent: None,
            home: made.home_node,
        };
        match self.propose(Cmd::CreateVolume(rec)).await? {
            Reply::Volume(v) => Ok(volume_to_wire(&v, made.allocated_bytes)),
            other => Err(Status::internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// The node a new `local` volume lives on: `asked` if given (it must be a member that is
    /// up), else the member up with the most free space, as heartbeats tell.
    fn local_home(&self, asked: u64) -> Result<u64, Status> {
        let st = self.state.read();
        // The members (all registered nodes for a storage cluster configured with --cluster).
        let members: Vec<u64> = match &st.cluster {
            Some(c) => c.members.clone(),
            None => st.nodes.keys().copied().collect(),
        };
        let up = |id: &u64| st.nodes.get(id).is_some_and(|n| n.state == NodeState::Up);
        if asked != 0 {
            if !members.contains(&asked) || !up(&asked) {
                return Err(Status::failed_precondition(format!(
                    "node {asked} is not a storage cluster member that is up"
                )));
            }
            return Ok(asked);
        }
        let seen = self.seen.lock();
        let candidates: Vec<Candidate> = members
            .iter()
            .filter(|id| up(id))
            .map(|&id| Candidate {
                id,
                datacenter: String::new(),
                free_bytes: seen.get(&id).map_or(0, Seen::free),
            })
            .collect();
        // Nothing held yet counts: the most free space, the lower id on a tie.
        pick_target(&candidates, &BTreeMap::new())
            .ok_or_else(|| Status::unavailable("no storage cluster member is up"))
    }

    /// Before a volume's blocks change under it (rollback, shrink): no host may write. The
    /// volume must be detached (refused otherwise), and a new generation, fenced in every
    /// chunk group before this returns, shuts out any host that still writes with an old one.
    async fn fence_detached(&self, volume_id: u64) -> Result<u64, Status> {
        let Reply::Generation(generation) = self.propose(Cmd::NextGeneration { volume_id }).await?
        else {
            return Err(Status::internal("unexpected reply to a generation change"));
        };
        storage::fence_volume(&self.storage_addresses(), volume_id, generation).await?;
        Ok(generation)
    }

    async fn allocated(&self, id: u64) -> u64 {
        let r = v1::VolumeRef { r#ref: Some(v1::volume_ref::Ref::Id(id)) };
        storage::get_volume(&self.storage_addresses(), r).await.map_or(0, |v| v.allocated_bytes)
    }

    async fn resize_here(&self, req: v1::ResizeVolumeRequest) -> Result<v1::Volume, Status> {
        let _admin = self.admin.lock().await;
        self.linearize().await?;
        let v = self.find_volume(req.volume.as_ref())?;
        validate_volume_size(req.size_bytes)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if req.size_bytes < v.size && !req.allow_shrink {
            return Err(Status::failed_precondition(format!(
                "shrinking volume {:?} from {} to {} bytes discards data: pass allow_shrink",
                v.name, v.size, req.size_bytes
            )));
        }
        if req.size_bytes < v.size {
            // Blocks past the new end go: no snapshot may hold them, and no host may write
            // meanwhile (detached, and a new generation fences off any that still writes).
            if let Some(s) = self.state.read().snapshots_of(v.id).next() {
                return Err(Status::failed_precondition(format!(
                    "volume {:?} has snapshots (e.g. {:?}): delete them before shrinking it",
                    v.name, s.name
                )));
            }
            let generation = self.fence_detached(v.id).await?;
            tracing::info!(volume = %v.name, generation, "fenced for a shrink");
        }
        let by_id = v1::VolumeRef { r#ref: Some(v1::volume_ref::Ref::Id(v.id)) };
        let wire = v1::ResizeVolumeRequest { volume: Some(by_id), ..req.clone() };
        let made = storage::resize_volume(&self.storage_addresses(), wire).await?;
        let cmd = Cmd::UpdateVolume { id: v.id, size: Some(made.size_bytes), read_only: None };
        match self.propose(cmd).await? {
            Reply::Volume(v) => Ok(volume_to_wire(&v, made.allocated_bytes)),
            other => Err(Status::internal(format!("unexpected reply {other:?}"))),
        }
    }

    async fn update_here(&self, req: v1::UpdateVolumeRequest) -> Result<v1::Volume, Status> {
        let _admin = self.admin.lock().await;
        self.linearize().await?;
        let v = self.find_volume(req.volume.as_ref())?;
        let by_id = v1::VolumeRef { r#ref: Some(v1::volume_ref::Ref::Id(v.id)) };
        let wire = v1::UpdateVolumeRequest { volume: Some(by_id), ..req.clone() };
        let made = storage::update_volume(&self.storage_addresses(), wire).await?;
        let cmd = Cmd::UpdateVolume { id: v.id, size: None, read_only: Some(made.read_only) };
        match self.propose(cmd).await? {
            Reply::Volume(v) => Ok(volume_to_wire(&v, made.allocated_bytes)),
            other => Err(Status::internal(format!("unexpected reply {other:?}"))),
        }
    }

    async fn delete_here(&self, req: v1::DeleteVolumeRequest) -> Result<(), Status> {
        let _admin = self.admin.lock().await;
        self.linearize().await?;
        let v = self.find_volume(req.volume.as_ref())?;
        if let Some(a) = self.state.read().attachments.get(&v.id) {
            return Err(Status::failed_precondition(format!(
                "volume {:?} is attached to host {:?}; detach it first",
                v.name, a.host
            )));
        }
        match storage::delete_volume(&self.storage_addresses(), v.id).await {
            Ok(()) => {}
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => return Err(s),
        }
        self.propose(Cmd::DeleteVolume { id: v.id }).await?;
        Ok(())
    }

    /// Commits `a`'s fence in every chunk group of the storage cluster (see `attach`).
    async fn push_fence(&self, v: &VolumeRecord, a: &Attachment) -> Result<(), Status> {
        storage::fence_volume(&self.storage_addresses(), v.id, a.generation).await.map_err(
            |s| {
                Status::new(
                    s.code(),
                    format!(
                        "volume {:?} is attached to {:?} (generation {}) but not yet fenced on \
                         the storage nodes; attach again to retry: {}",
                        v.name,
                        a.host,
                        a.generation,
                        s.message()
                    ),
                )
            },
        )?;
        let mut fenced = self.fenced.lock();
        let g = fenced.entry(v.id).or_insert(0);
        *g = (*g).max(a.generation);
        Ok(())
    }

    // ------------------------------------------------------------------ snapshots (leader)

    async fn create_snapshot_here(
        &self,
        req: v1::CreateSnapshotRequest,
    ) -> Result<v1::Snapshot, Status> {
        let _admin = self.admin.lock().await;
        self.linearize().await?;
        let v = self.find_volume(req.volume.as_ref())?;
        if v.class == Class::Local {
            return Err(Status::failed_precondition(format!(
                "volume {:?} is 'local': snapshots are of 'replicated' volumes",
                v.name
            )));
        }
        let name = if req.name.is_empty() {
            format!("snap-{}", self.state.read().head_epoch(v.id))
        } else {
            validate_volume_name(&req.name)
                .map_err(|e| Status::invalid_argument(format!("bad snapshot name: {e}")))?;
            req.name
        };
        let cmd = Cmd::CreateSnapshot { volume_id: v.id, name, now: now_secs() };
        let Reply::Snapshot(rec) = self.propose(cmd).await? else {
            return Err(Status::internal("unexpected reply to a snapshot creation"));
        };
        let rec = self.finish_snapshot(rec).await?;
        tracing::info!(volume = %v.name, snapshot = %rec.name, epoch = rec.epoch, "snapshot created");
        let st = self.state.read();
        Ok(snapshot_to_wire(&rec, &st, 0))
    }

    /// Records the deletion (durably, in the manager's log: from then on the snapshot is
    /// neither read, exported nor cloned, and whichever replica leads finishes it); the chunk
    /// groups are told in batches by `finish_deletions`.
    async fn delete_snapshot_here(&self, req: v1::DeleteSnapshotRequest) -> Result<(), Status> {
        let (volume_id, epoch) = {
            let _admin = self.admin.lock().await;
            self.linearize().await?;
            let v = self.find_volume(req.volume.as_ref())?;
            let rec = self.find_snapshot(&v, &req.name)?;
            if rec.state != SnapshotState::Deleting {
                let cmd = Cmd::DeleteSnapshot { volume_id: v.id, epoch: rec.epoch };
                let Reply::Snapshot(_) = self.propose(cmd).await? else {
                    return Err(Status::internal("unexpected reply to a snapshot deletion"));
                };
                tracing::info!(volume = %v.name, snapshot = %req.name, "snapshot deletion recorded");
            }
            (v.id, rec.epoch)
        };
        self.deletions.notify_one();
        if req.wait {
            // Epochs are never reused: the record's going is the deletion's end.
            while self.state.read().snapshots.contains_key(&(volume_id, epoch)) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    async fn clone_here(&self, req: v1::CloneVolumeRequest) -> Result<v1::Volume, Status> {
        validate_volume_name(&req.name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let _admin = self.admin.lock().await;
        self.linearize().await?;
        let p = self.find_volume(req.volume.as_ref())?;
        let snap = self.find_snapshot(&p, &req.snapshot)?;
        if snap.state != SnapshotState::Ready {
            return Err(Status::failed_precondition(format!(
                "snapshot {:?} is {:?}",
                snap.name, snap.state
            )));
        }
        if self.state.read().volume_by_name(&req.name).is_some() {
            return Err(Status::already_exists(format!("volume {:?} already exists", req.name)));
        }
        let addrs = self.storage_addresses();
        let wire = v1::CreateVolumeRequest {
            name: req.name.clone(),
            size_bytes: snap.size,
            storage_class: v1::StorageClass::Replicated as i32,
            read_only: false,
            tenant: p.tenant.clone(),
            labels: p.labels.clone().into_iter().collect(),
            parent_volume_id: p.id,
            parent_epoch: snap.epoch,
            home_node: 0,
        };
        let made = match storage::create_volume(&addrs, wire).await {
            Ok(v) => v,
            // Made by an earlier attempt that did not get to record it: adopt it.
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                let by_name =
                    v1::VolumeRef { r#ref: Some(v1::volume_ref::Ref::Name(req.name.clone())) };
                let v = storage::get_volume(&addrs, by_name).await?;
                if (v.parent_volume_id, v.parent_epoch) != (p.id, snap.epoch) {
                    return Err(s);
                }
                v
            }
            Err(s) => return Err(s),
        };
        let rec = VolumeRecord {
            id: made.id,
            name: made.name.clone(),
            size: made.size_bytes,
            class: Class::Replicated,
            read_only: false,
            tenant: p.tenant.clone(),
            labels: p.labels.clone(),
            created_at: made.created_at,
            parent: Some((p.id, snap.epoch)),
            home: 0,
        };
        tracing::info!(volume = %rec.name, parent = %p.name, snapshot = %snap.name, "volume cloned");
        match self.propose(Cmd::CreateVolume(rec)).await? {
            Reply::Volume(v) => Ok(volume_to_wire(&v, made.allocated_bytes)),
            other => Err(Status::internal(format!("unexpected reply {other:?}"))),
        }
    }

    async fn flatten_here(&self, req: v1::FlattenVolumeRequest) -> Result<v1::Volume, Status> {
        let _admin = self.admin.lock().await;
        self.linearize().await?;
        let v = self.find_volume(req.volume.as_ref())?;
        let Some((_, epoch)) = v.parent else {
            return Ok(volume_to_wire(&v, self.allocated(v.id).await));
        };
        let addrs = self.storage_addresses();
        storage::snapshot_volume(&addrs, v.id, &[epoch], storage::SnapOp::Flatten).await?;
        let clear = v1::UpdateVolumeRequest {
            volume: Some(v1::VolumeRef { r#ref: Some(v1::volume_ref::Ref::Id(v.id)) }),
            read_only: None,
            clear_parent: true,
        };
        storage::update_volume(&addrs, clear).await?;
        let Reply::Volume(v) = self.propose(Cmd::ClearParent { id: v.id }).await? else {
            return Err(Status::internal("unexpected reply to a flatten"));
        };
        tracing::info!(volume = %v.name, "volume flattened");
        Ok(volume_to_wire(&v, self.allocated(v.id).await))
    }

    async fn rollback_here(&self, req: v1::RollbackSnapshotRequest) -> Result<(), Status> {
        let _admin = self.admin.lock().await;
        self.linearize().await?;
        let v = self.find_volume(req.volume.as_ref())?;
        if v.parent.is_some() {
            return Err(Status::failed_precondition(format!(
                "volume {:?} is a clone: flatten it before rolling it back",
                v.name
            )));
        }
        let rec = self.find_snapshot(&v, &req.name)?;
        if rec.state != SnapshotState::Ready {
            return Err(Status::failed_precondition(format!(
                "snapshot {:?} is {:?}",
                rec.name, rec.state
            )));
        }
        let generation = self.fence_detached(v.id).await?;
        let op = storage::SnapOp::Rollback;
        storage::snapshot_volume(&self.storage_addresses(), v.id, &[rec.epoch], op).await?;
        tracing::info!(volume = %v.name, snapshot = %rec.name, generation, "volume rolled back");
        Ok(())
    }

    fn find_snapshot(&self, v: &VolumeRecord, name: &str) -> Result<SnapshotRecord, Status> {
        if name.is_empty() {
            return Err(Status::invalid_argument("a snapshot name is required"));
        }
        self.state.read().snapshot_by_name(v.id, name).cloned().ok_or_else(|| {
            Status::not_found(format!("volume {:?} has no snapshot named {name:?}", v.name))
        })
    }

    /// Brings a snapshot being created to its end: commits it in every chunk group
    /// (idempotent, so also after an interruption), then records it as ready.
    pub async fn finish_snapshot(&self, rec: SnapshotRecord) -> Result<SnapshotRecord, Status> {
        let (id, epoch) = (rec.volume_id, rec.epoch);
        if rec.state != SnapshotState::Creating {
            return Ok(rec);
        }
        let op = storage::SnapOp::Create;
        storage::snapshot_volume(&self.storage_addresses(), id, &[epoch], op).await?;
        match self.propose(Cmd::SnapshotCreated { volume_id: id, epoch }).await? {
            Reply::Snapshot(r) => Ok(r),
            other => Err(Status::internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Finishes snapshot creations a failure interrupted (leader only; skipped while a volume
    /// administration call runs, which may be finishing one itself).
    pub async fn finish_interrupted_snapshots(&self) {
        let Ok(_admin) = self.admin.try_lock() else { return };
        let open: Vec<SnapshotRecord> = self
            .state
            .read()
            .snapshots
            .values()
            .filter(|s| s.state == SnapshotState::Creating)
            .cloned()
            .collect();
        for rec in open {
            let what = format!("{:?} of volume {}", rec.name, rec.volume_id);
            match self.finish_snapshot(rec).await {
                Ok(_) => tracing::info!("finished creating the snapshot {what}"),
                Err(s) => tracing::warn!("finishing the snapshot {what}: {}", s.message()),
            }
        }
    }

    /// Tells the chunk groups of every snapshot deletion recorded so far (leader only): per
    /// volume one batch, which each group commits as one log entry, then drops the records.
    /// Idempotent: a batch cut short by a failure is simply sent again.
    pub async fn finish_deletions(&self) {
        /// Bounds one entry's size.
        const MAX_BATCH: usize = 1024;
        let mut pending: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for s in self.state.read().snapshots.values() {
            if s.state == SnapshotState::Deleting {
                let batch = pending.entry(s.volume_id).or_default();
                if batch.len() < MAX_BATCH {
                    batch.push(s.epoch);
                }
            }
        }
        for (volume_id, epochs) in pending {
            let op = storage::SnapOp::Delete;
            match storage::snapshot_volume(&self.storage_addresses(), volume_id, &epochs, op).await
            {
                Ok(()) => {}
                // The volume is gone, and every version with it.
                Err(s) if s.code() == tonic::Code::NotFound => {}
                Err(s) => {
                    tracing::warn!(volume_id, "deleting snapshots {epochs:?}: {}", s.message());
                    continue;
                }
            }
            let n = epochs.len();
            match self.propose(Cmd::SnapshotsDeleted { volume_id, epochs }).await {
                Ok(_) => tracing::info!(volume_id, "{n} snapshot deletion(s) finished"),
                Err(s) => tracing::warn!(volume_id, "recording deletions: {}", s.message()),
            }
        }
    }

    // ------------------------------------------------------------------ storage cluster

    /// The storage cluster, formed on the first request once nodes of three datacenters are
    /// up: the lowest node id of each of the first three datacenters (by name).
    async fn cluster_config_here(&self, node_id: u64) -> Result<v1::ClusterConfig, Status> {
        self.linearize().await?;
        let existing = self.state.read().cluster.clone();
        let cluster = match existing {
            Some(c) => c,
            None => {
                let (members, placement) = {
                    let st = self.state.read();
                    let up: Vec<&NodeRecord> =
                        st.nodes.values().filter(|n| n.state == NodeState::Up).collect();
                    let dcs: std::collections::BTreeSet<&str> =
                        up.iter().map(|n| n.datacenter.as_str()).collect();
                    if dcs.len() < 3 {
                        return Err(Status::unavailable(format!(
                            "waiting for storage nodes in three datacenters (up: {dcs:?})"
                        )));
                    }
                    // Nodes starting together register within moments of each other: the
                    // cluster forms once registrations have settled, with all of them.
                    let last = up.iter().map(|n| n.registered_at).max().unwrap_or(0);
                    if now_secs().saturating_sub(last) < FORM_SETTLE_SECS {
                        return Err(Status::unavailable(
                            "waiting for storage nodes still registering",
                        ));
                    }
                    let seen = self.seen.lock();
                    let candidates: Vec<Candidate> = up
                        .iter()
                        .map(|n| Candidate {
                            id: n.id,
                            datacenter: n.datacenter.clone(),
                            free_bytes: seen.get(&n.id).map_or(0, Seen::free),
                        })
                        .collect();
                    let placement = place_groups(&candidates, self.groups);
                    (up.iter().map(|n| n.id).collect::<Vec<u64>>(), placement)
                };
                let cmd =
                    Cmd::FormCluster(StorageCluster { members, groups: self.groups, placement });
                match self.propose(cmd).await? {
                    Reply::Cluster(c) => {
                        tracing::info!(members = ?c.members, groups = c.groups, "storage cluster formed");
                        c
                    }
                    other => return Err(Status::internal(format!("unexpected reply {other:?}"))),
                }
            }
        };
        let st = self.state.read();
        let members = cluster
            .members
            .iter()
            .filter_map(|id| st.nodes.get(id))
            .map(|n| v1::NodeInfo {
                id: n.id,
                address: n.address.clone(),
                datacenter: n.datacenter.clone(),
            })
            .collect();
        let placement = cluster
            .placement
            .iter()
            .enumerate()
            .map(|(g, voters)| v1::GroupVoters { group: g as u32, voters: voters.clone() })
            .collect();
        Ok(v1::ClusterConfig {
            members,
            groups: cluster.groups,
            join: !cluster.members.contains(&node_id),
            placement,
        })
    }

    // ------------------------------------------------------------------ status

    async fn cluster_status_here(&self) -> Result<v1::ClusterStatusResponse, Status> {
        self.linearize().await?;
        let m = self.raft.metrics().borrow().clone();
        let managers = m
            .membership_config
            .membership()
            .nodes()
            .map(|(id, n)| v1::ManagerReplica {
                id: *id,
                address: n.address.clone(),
                datacenter: n.datacenter.clone(),
            })
            .collect();
        let (nodes, volumes, attachments, down): (Vec<NodeRecord>, u64, u64, Vec<u64>) = {
            let st = self.state.read();
            let down =
                st.nodes.values().filter(|n| n.state != NodeState::Up).map(|n| n.id).collect();
            (
                st.nodes.values().cloned().collect(),
                st.volumes.len() as u64,
                st.attachments.len() as u64,
                down,
            )
        };
        let nodes: Vec<v1::StorageNode> = nodes.iter().map(|n| self.node_to_wire(n)).collect();
        let mut dcs: BTreeMap<String, v1::DatacenterStatus> = BTreeMap::new();
        for n in nodes.iter().filter(|n| n.state != v1::NodeState::Removed as i32) {
            let d = dcs.entry(n.datacenter.clone()).or_insert_with(|| v1::DatacenterStatus {
                name: n.datacenter.clone(),
                ..Default::default()
            });
            d.nodes += 1;
            if n.state == v1::NodeState::Up as i32 || n.state == v1::NodeState::Draining as i32 {
                d.nodes_up += 1;
            }
            d.capacity_bytes += n.capacity_bytes;
            d.used_bytes += n.used_bytes;
        }
        let moving = self.state.read().moving.clone().map(|mv| v1::NodeMove {
            old: mv.old,
            new: mv.new,
            reason: match mv.reason {
                crate::state::MoveReason::Drain => "drain".into(),
                crate::state::MoveReason::Down => "down".into(),
                crate::state::MoveReason::Rebalance => "rebalance".into(),
            },
            started_at: mv.started_at,
        });
        let mut out = v1::ClusterStatusResponse {
            moving,
            managers,
            leader: m.current_leader.unwrap_or(0),
            term: m.current_term,
            datacenters: dcs.into_values().collect(),
            nodes,
            volumes,
            attachments,
            ..Default::default()
        };
        // Only members know the groups' leaders.
        let addrs = self.member_addresses();
        match storage::cluster_map(&addrs).await {
            Ok(map) => {
                // The members as this manager placed them (the map also lists nodes that
                // used to be members).
                let placement: Vec<Vec<u64>> = match &self.state.read().cluster {
                    Some(c) => c.placement.clone(),
                    None => Vec::new(),
                };
                // A group is degraded while a node holding one of its replicas is down.
                let replica_down = |g: u32| match placement.get(g as usize) {
                    Some(voters) => voters.iter().any(|id| down.contains(id)),
                    None => !down.is_empty(),
                };
                let rebuilding = storage::groups_rebuilding(&addrs).await;
                out.groups = map.groups;
                for g in &map.group_state {
                    if g.group == 0 {
                        continue;
                    }
                    if g.leader == 0 || replica_down(g.group) {
                        out.groups_degraded += 1;
                    } else {
                        out.groups_healthy += 1;
                    }
                }
                let moved = rebuilding.min(out.groups_healthy);
                out.groups_healthy -= moved;
                out.groups_rebuilding = moved;
            }
            Err(s) => out.storage_error = s.message().to_string(),
        }
        Ok(out)
    }
}

/// A status tonic made up on this side (no server answered: the leader we knew is gone), so
/// the request never reached a server and is safe to send again.
fn never_reached_a_server(s: &Status) -> bool {
    s.code() == tonic::Code::Unavailable && s.metadata().get("content-type").is_none()
}

/// Forwards the call to the leader unless this replica leads. A leader that cannot be reached
/// (killed a moment ago) is asked again as the replicas elect a new one, for up to
/// [`LEADER_WAIT`].
macro_rules! forward {
    ($self:ident, $req:ident, $client:ident, $method:ident) => {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        while let Some(ch) = $self.leader(&$req).await? {
            match $client::new(ch).$method(forwarded($req.get_ref().clone())).await {
                Err(s) if never_reached_a_server(&s) && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                r => return r,
            }
        }
    };
}

#[derive(Clone)]
pub struct Service(pub Arc<Manager>);

#[tonic::async_trait]
impl v1::volume_admin_server::VolumeAdmin for Service {
    async fn create_volume(
        &self,
        req: Request<v1::CreateVolumeRequest>,
    ) -> Result<Response<v1::Volume>, Status> {
        let m = &self.0;
        forward!(m, req, VolumeAdminClient, create_volume);
        m.create_here(req.into_inner()).await.map(Response::new)
    }

    async fn get_volume(
        &self,
        req: Request<v1::GetVolumeRequest>,
    ) -> Result<Response<v1::Volume>, Status> {
        let m = &self.0;
        forward!(m, req, VolumeAdminClient, get_volume);
        m.linearize().await?;
        let v = m.find_volume(req.get_ref().volume.as_ref())?;
        let allocated = m.allocated(v.id).await;
        Ok(Response::new(volume_to_wire(&v, allocated)))
    }

    async fn list_volumes(
        &self,
        req: Request<v1::ListVolumesRequest>,
    ) -> Result<Response<v1::ListVolumesResponse>, Status> {
        let m = &self.0;
        forward!(m, req, VolumeAdminClient, list_volumes);
        m.linearize().await?;
        let records: Vec<VolumeRecord> = m.state.read().volumes.values().cloned().collect();
        // Allocation is the storage cluster's to tell; a volume it does not answer for shows 0.
        let allocated: HashMap<u64, u64> = storage::list_volumes(&m.storage_addresses())
            .await
            .map(|vs| vs.into_iter().map(|v| (v.id, v.allocated_bytes)).collect())
            .unwrap_or_default();
        let volumes = records
            .iter()
            .map(|v| volume_to_wire(v, allocated.get(&v.id).copied().unwrap_or(0)))
            .collect();
        Ok(Response::new(v1::ListVolumesResponse { volumes }))
    }

    async fn resize_volume(
        &self,
        req: Request<v1::ResizeVolumeRequest>,
    ) -> Result<Response<v1::Volume>, Status> {
        let m = &self.0;
        forward!(m, req, VolumeAdminClient, resize_volume);
        m.resize_here(req.into_inner()).await.map(Response::new)
    }

    async fn update_volume(
        &self,
        req: Request<v1::UpdateVolumeRequest>,
    ) -> Result<Response<v1::Volume>, Status> {
        let m = &self.0;
        forward!(m, req, VolumeAdminClient, update_volume);
        m.update_here(req.into_inner()).await.map(Response::new)
    }

    async fn delete_volume(
        &self,
        req: Request<v1::DeleteVolumeRequest>,
    ) -> Result<Response<v1::DeleteVolumeResponse>, Status> {
        let m = &self.0;
        forward!(m, req, VolumeAdminClient, delete_volume);
        m.delete_here(req.into_inner()).await?;
        Ok(Response::new(v1::DeleteVolumeResponse {}))
    }

    async fn node_status(
        &self,
        _req: Request<v1::NodeStatusRequest>,
    ) -> Result<Response<v1::NodeStatusResponse>, Status> {
        Err(Status::unimplemented(
            "this is a volume manager: ask a storage node for its status (tern node status \
             --endpoint http://NODE:PORT), or the manager for the cluster's (tern cluster status)",
        ))
    }
}

#[tonic::async_trait]
impl v1::manager_server::Manager for Service {
    async fn register_node(
        &self,
        req: Request<v1::RegisterNodeRequest>,
    ) -> Result<Response<v1::StorageNode>, Status> {
        let m = &self.0;
        forward!(m, req, ManagerClient, register_node);
        let r = req.into_inner();
        if r.datacenter.is_empty() || r.address.is_empty() {
            return Err(Status::invalid_argument(
                "a node registers with an address and a datacenter",
            ));
        }
        let cmd = Cmd::RegisterNode {
            id: r.id,
            address: r.address,
            datacenter: r.datacenter,
            now: now_secs(),
        };
        let Reply::Node(n) = m.propose(cmd).await? else {
            return Err(Status::internal("unexpected reply to a registration"));
        };
        m.seen.lock().insert(
            n.id,
            Seen {
                at: Instant::now(),
                capacity: r.capacity_bytes,
                used: r.used_bytes,
                full: false,
            },
        );
        tracing::info!(node = n.id, address = %n.address, datacenter = %n.datacenter, "storage node registered");
        Ok(Response::new(m.node_to_wire(&n)))
    }

    async fn heartbeat(
        &self,
        req: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatReply>, Status> {
        let m = &self.0;
        forward!(m, req, ManagerClient, heartbeat);
        let r = req.into_inner();
        let state = m.state.read().nodes.get(&r.node_id).map(|n| n.state);
        let Some(state) = state else {
            return Err(Status::not_found(format!("node {} is not registered", r.node_id)));
        };
        let seen = Seen {
            at: Instant::now(),
            capacity: r.capacity_bytes,
            used: r.used_bytes,
            full: r.full,
        };
        m.seen.lock().insert(r.node_id, seen);
        if r.full {
            tracing::warn!(node = r.node_id, "storage node is full: the cluster refuses writes");
        }
        // Any node up that is full stops writes everywhere: its replicas of every group it
        // holds would fail to apply them. (A node down says nothing new until it is back.)
        let cluster_full = {
            let st = m.state.read();
            let seen = m.seen.lock();
            seen.iter()
                .any(|(id, s)| s.full && st.nodes.get(id).is_some_and(|n| n.state == NodeState::Up))
        };
        let state = if state == NodeState::Down {
            tracing::info!(node = r.node_id, "storage node is back up");
            match m.propose(Cmd::SetNodeState { id: r.node_id, state: NodeState::Up }).await? {
                Reply::Node(n) => n.state,
                _ => state,
            }
        } else {
            state
        };
        Ok(Response::new(v1::HeartbeatReply {
            state: node_state_to_wire(state) as i32,
            cluster_full,
        }))
    }

    async fn list_nodes(
        &self,
        req: Request<v1::ListNodesRequest>,
    ) -> Result<Response<v1::ListNodesResponse>, Status> {
        let m = &self.0;
        forward!(m, req, ManagerClient, list_nodes);
        m.linearize().await?;
        let nodes: Vec<NodeRecord> = m.state.read().nodes.values().cloned().collect();
        Ok(Response::new(v1::ListNodesResponse {
            nodes: nodes.iter().map(|n| m.node_to_wire(n)).collect(),
        }))
    }

    async fn set_node_state(
        &self,
        req: Request<v1::SetNodeStateRequest>,
    ) -> Result<Response<v1::StorageNode>, Status> {
        let m = &self.0;
        forward!(m, req, ManagerClient, set_node_state);
        let r = req.into_inner();
        let state = match v1::NodeState::try_from(r.state) {
            Ok(v1::NodeState::Up) => NodeState::Up,
            Ok(v1::NodeState::Draining) => NodeState::Draining,
            Ok(v1::NodeState::Removed) => NodeState::Removed,
            Ok(v1::NodeState::Down) => {
                return Err(Status::invalid_argument(
                    "DOWN is set by the manager when heartbeats stop, not by request",
                ))
            }
            _ => return Err(Status::invalid_argument(format!("unknown node state {}", r.state))),
        };
        if matches!(state, NodeState::Draining | NodeState::Removed) {
            // A local volume's one copy cannot move with the node's replicas.
            m.linearize().await?;
            let st = m.state.read();
            let held: Vec<&str> = st
                .volumes
                .values()
                .filter(|v| v.class == Class::Local && v.home == r.node_id)
                .map(|v| v.name.as_str())
                .collect();
            if !held.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "node {} holds the only copy of local volume(s) {held:?}: copy and delete \
                     them first (local volumes do not move)",
                    r.node_id
                )));
            }
        }
        let Reply::Node(n) = m.propose(Cmd::SetNodeState { id: r.node_id, state }).await? else {
            return Err(Status::internal("unexpected reply to a node state change"));
        };
        tracing::info!(node = n.id, state = ?n.state, "storage node state set");
        Ok(Response::new(m.node_to_wire(&n)))
    }

    async fn attach(
        &self,
        req: Request<v1::AttachRequest>,
    ) -> Result<Response<v1::Attachment>, Status> {
        let m = &self.0;
        forward!(m, req, ManagerClient, attach);
        let r = req.into_inner();
        if r.host.is_empty() {
            return Err(Status::invalid_argument("an attachment needs a host"));
        }
        // Not while a shrink or a rollback changes the volume's blocks (they hold the admin
        // lock throughout, detached and fenced): the attachment waits for the result.
        let (v, a) = {
            let _admin = m.admin.lock().await;
            m.linearize().await?;
            let v = m.find_volume(r.volume.as_ref())?;
            let cmd = Cmd::Attach {
                volume_id: v.id,
                host: r.host,
                takeover: r.takeover,
                now: now_secs(),
            };
            let Reply::Attachment(a) = m.propose(cmd).await? else {
                return Err(Status::internal("unexpected reply to an attach"));
            };
            (v, a)
        };
        // The attachment is only handed out once every chunk group refuses older
        // generations: the previous host can no longer change the volume. (Again for an
        // attachment that already existed, unless this leader saw its fence committed: an
        // earlier attempt may have failed here. A frontend attaches at every NBD connection.)
        let confirmed = m.fenced.lock().get(&v.id).is_some_and(|g| *g >= a.generation);
        if !confirmed {
            m.push_fence(&v, &a).await?;
        }
        tracing::info!(volume = %v.name, host = %a.host, generation = a.generation, "volume attached");
        let st = m.state.read();
        Ok(Response::new(attachment_to_wire(&a, &st)))
    }

    async fn detach(
        &self,
        req: Request<v1::DetachRequest>,
    ) -> Result<Response<v1::DetachResponse>, Status> {
        let m = &self.0;
        forward!(m, req, ManagerClient, detach);
        let r = req.into_inner();
        m.linearize().await?;
        let v = m.find_volume(r.volume.as_ref())?;
        m.propose(Cmd::Detach { volume_id: v.id, host: r.host }).await?;
        Ok(Response::new(v1::DetachResponse {}))
    }

    async fn list_attachments(
        &self,
        req: Request<v1::ListAttachmentsRequest>,
    ) -> Result<Response<v1::ListAttachmentsResponse>, Status> {
        let m = &self.0;
        forward!(m, req, ManagerClient, list_attachments);
        m.linearize().await?;
        let st = m.state.read();
        Ok(Response::new(v1::ListAttachmentsResponse {
            attachments: st.attachments.values().map(|a| attachment_to_wire(a, &st)).collect(),
        }))
    }

    async fn cluster_status(
        &self,
        req: Request<v1::ClusterStatusRequest>,
    ) -> Result<Response<v1::ClusterStatusResponse>, Status> {
        let m = &self.0;
        forward!(m, req, ManagerClient, cluster_status);
        m.cluster_status_here().await.map(Response::new)
    }

    async fn create_snapshot(
        &self,
        req: Request<v1::CreateSnapshotRequest>,
    ) -> Result<Response<v1::Snapshot>, Status> {
        let m = &self.0;
        forward!(m, req, ManagerClient, create_snapshot);
        m.create_snapshot_here(req.into_inner()).await.map(Response::new)
    }

    async fn get_snapshot(
        &self,
        req: Request<v1::GetSnapshotRequest>,
    ) -> Result<Response<v1::Snapshot>, Status> {
        let m = &self.0;
        forward!(m, req, ManagerClient, get_snapshot);
        m.linearize().await?;
        let r = req.into_inner();
        let v = m.find_volume(r.volume.as_ref())?;
        let rec = m.find_snapshot(&v, &r.name)?;
        let st = m.state.read();
        Ok(Response::new(snapshot_to_wire(&rec, &st, 0)))
    }

    async fn list_snapshots(
        &self,
        req: Request<v1::ListSnapshotsRequest>,
    ) -> Result<Response<v1::ListSnapshotsResponse>, Status> {
        let m = &self.0;
        forward!(m, req, ManagerClient, list_snapshots);
        m.linearize().await?;
        let r = req.into_inner();
        let v = m.find_volume(r.volume.as_ref())?;
        let usage = if r.with_usage {
            Some(storage::volume_usage(&m.storage_addresses(), v.id).await?)
        } else {
            None
        };
        let exclusive = |epoch: u64| {
            usage
                .as_ref()
                .map_or(0, |u| u.exclusive.iter().find(|e| e.epoch == epoch).map_or(0, |e| e.bytes))
        };
        let st = m.state.read();
        let snapshots =
            st.snapshots_of(v.id).map(|s| snapshot_to_wire(s, &st, exclusive(s.epoch))).collect();
        Ok(Response::new(v1::ListSnapshotsResponse {
            snapshots,
            total_bytes: usage.as_ref().map_or(0, |u| u.total_bytes),
            head_only_bytes: usage.as_ref().map_or(0, |u| u.head_only_bytes),
        }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<v1::DeleteSnapshotRequest>,
    ) -> Result<Response<v1::DeleteSnapshotResponse>, Status> {
        let m = &self.0;
        forward!(m, req, ManagerClient, delete_snapshot);
        m.delete_snapshot_here(req.into_inner()).await?;
        Ok(Response::new(v1::DeleteSnapshotResponse {}))
    }

    async fn clone_volume(
        &self,
        req: Request<v1::CloneVolumeRequest>,
    ) -> Result<Response<v1::Volume>, Status> {
        let m = &self.0;
        forward!(m, req, ManagerClient, clone_volume);
        m.clone_here(req.into_inner()).await.map(Response::new)
    }

    async fn flatten_volume(
        &self,
        req: Request<v1::FlattenVolumeRequest>,
    ) -> Result<Response<v1::Volume>, Status> {
        let m = &self.0;
        forward!(m, req, ManagerClient, flatten_volume);
        m.flatten_here(req.into_inner()).await.map(Response::new)
    }

    async fn rollback_snapshot(
        &self,
        req: Request<v1::RollbackSnapshotRequest>,
    ) -> Result<Response<v1::RollbackSnapshotResponse>, Status> {
        let m = &self.0;
        forward!(m, req, ManagerClient, rollback_snapshot);
        m.rollback_here(req.into_inner()).await?;
        Ok(Response::new(v1::RollbackSnapshotResponse {}))
    }

    async fn diff_snapshots(
        &self,
        req: Request<v1::DiffSnapshotsRequest>,
    ) -> Result<Response<v1::DiffSnapshotsResponse>, Status> {
        let m = &self.0;
        forward!(m, req, ManagerClient, diff_snapshots);
        m.linearize().await?;
        let r = req.into_inner();
        let v = m.find_volume(r.volume.as_ref())?;
        let epoch_of = |name: &str| -> Result<u64, Status> {
            if name.is_empty() {
                return Ok(0);
            }
            let s = m.find_snapshot(&v, name)?;
            if s.state != SnapshotState::Ready {
                return Err(Status::failed_precondition(format!(
                    "snapshot {name:?} is {:?}",
                    s.state
                )));
            }
            Ok(s.epoch)
        };
        let (from, to) = (epoch_of(&r.from)?, epoch_of(&r.to)?);
        if from != 0 && to != 0 && from >= to {
            return Err(Status::invalid_argument(format!(
                "snapshot {:?} is not older than {:?}",
                r.from, r.to
            )));
        }
        let extents = storage::volume_changes(&m.storage_addresses(), v.id, from, to).await?;
        Ok(Response::new(v1::DiffSnapshotsResponse { extents }))
    }

    async fn get_cluster_config(
        &self,
        req: Request<v1::GetClusterConfigRequest>,
    ) -> Result<Response<v1::ClusterConfig>, Status> {
        let m = &self.0;
        forward!(m, req, ManagerClient, get_cluster_config);
        let node_id = req.get_ref().node_id;
        if !m.state.read().nodes.contains_key(&node_id) {
            return Err(Status::not_found(format!("node {node_id} is not registered")));
        }
        m.cluster_config_here(node_id).await.map(Response::new)
    }
}
