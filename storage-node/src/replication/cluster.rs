//! The node's chunk groups and the replicated data and admin paths.
//!
//! Membership is static for now (from `--cluster`): every group has one replica on each
//! node, and the cluster needs one node per datacenter. The node with the lowest id
//! initializes the groups the first time the cluster starts.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::ChangeMembers;
use parking_lot::Mutex;
use tern_common::{chunk_group, CHUNK_SIZE, META_GROUP};
use tokio::sync::{oneshot, Notify};

use super::log_store::LogStore;
use super::state_machine::StateMachine;
use super::transport::{GroupNetworkFactory, Transport};
use super::{raft_config, Cmd, Member, Raft, Reply};
use crate::error::{Error, Result};
use crate::meta::MetaStore;
use crate::store::{ChunkStore, Volume};

/// A member of the cluster.
pub use tern_common::NodeAddr;

#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub node_id: u64,
    pub nodes: Vec<NodeAddr>,
    /// Data chunk groups (`1..=groups`).
    pub groups: u32,
    /// Accept `RaftTransport.SetFaults` (tests only).
    pub fault_injection: bool,
    /// Tests only: the group leader applies writes to its own store and acknowledges them
    /// without the log, so losing it loses them. Shows that the fault suite's checker notices.
    pub unsafe_no_replication: bool,
    /// Log entries between snapshots of a group (see `raft_config`).
    pub snapshot_every: u64,
    /// Background scrub: bytes per second at most (0 = off), and the pause between passes.
    pub scrub_rate: u64,
    pub scrub_pause: Duration,
    /// This node is new, not in `nodes`: it starts with empty groups and waits to be added
    /// to them (a replacement).
    pub join: bool,
}

/// The most data groups a cluster may have.
pub const MAX_GROUPS: u32 = 4096;

impl ClusterConfig {
    /// Parses `ID=HOST:PORT@DATACENTER,...`.
    pub fn parse_nodes(s: &str) -> std::result::Result<Vec<NodeAddr>, String> {
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| p.parse().map_err(|e| format!("bad cluster member: {e}")))
            .collect()
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.nodes.is_empty() {
            return Err("the cluster has no members".into());
        }
        let ids: HashSet<u64> = self.nodes.iter().map(|n| n.id).collect();
        if ids.len() != self.nodes.len() {
            return Err("a node id appears twice in the cluster".into());
        }
        if !ids.contains(&self.node_id) && !self.join {
            return Err(format!(
                "this node ({}) is not in the cluster list (a new node joining to replace one \
                 runs with --join)",
                self.node_id
            ));
        }
        if ids.contains(&self.node_id) && self.join {
            return Err(format!("node {} is already a cluster member; drop --join", self.node_id));
        }
        let dcs: HashSet<&str> = self.nodes.iter().map(|n| n.datacenter.as_str()).collect();
        if dcs.len() != self.nodes.len() {
            return Err("every group keeps one replica per datacenter: list one node per \
                        datacenter (placement of more nodes comes with the volume manager)"
                .into());
        }
        if self.groups == 0 || self.groups > MAX_GROUPS {
            return Err(format!("--groups must be in 1..={MAX_GROUPS}"));
        }
        Ok(())
    }
}

/// Batches linearizable-read confirmations of one group: reads arriving while a round runs
/// share the next round (each round is one heartbeat exchange with a quorum).
#[derive(Default)]
struct ReadGate {
    state: Mutex<(bool, Vec<oneshot::Sender<Result<()>>>)>,
}

/// Progress of a node replacement driven from this node.
#[derive(Clone, Debug)]
pub struct Replacement {
    pub old: u64,
    pub new: u64,
    pub total: u32,
    pub done: u32,
    pub started: std::time::Instant,
    pub finished: Option<Duration>,
    pub last_error: String,
}

pub struct Cluster {
    /// Bytes the background scrub has verified.
    pub scrubbed: std::sync::atomic::AtomicU64,
    cfg: ClusterConfig,
    replacement: Arc<Mutex<Option<Replacement>>>,
    store: Arc<ChunkStore>,
    transport: Arc<Transport>,
    /// Index = group id (0 = the meta group).
    rafts: Vec<Raft>,
    reads: Vec<Arc<ReadGate>>,
    /// Each group's commit index as its log store last heard it, plus one (0: none yet).
    committed: Vec<Arc<std::sync::atomic::AtomicU64>>,
}

/// Proposals that get no answer this long fail with UNAVAILABLE (the client retries,
/// perhaps elsewhere): a leader cut off from its quorum never completes them.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// A leader without a quorum's acknowledgement for this long stops taking requests (the
/// followers elect a new leader after 500-1000 ms of silence; heartbeats go every 100 ms).
const QUORUM_SILENCE_MS: u64 = 500;
/// How often waiting requests check that their leader still has its quorum.
const CUT_OFF_POLL: Duration = Duration::from_millis(100);

/// Whether `raft` leads but has not heard from a quorum for [`QUORUM_SILENCE_MS`].
fn leader_cut_off(raft: &Raft) -> bool {
    let m = raft.metrics();
    let m = m.borrow();
    m.state == openraft::ServerState::Leader
        && m.millis_since_quorum_ack.is_some_and(|ms| ms > QUORUM_SILENCE_MS)
}

/// Resolves once `raft` is a leader cut off from its quorum: requests already waiting on it
/// then go elsewhere instead of waiting out a timeout.
async fn until_cut_off(raft: &Raft) {
    loop {
        tokio::time::sleep(CUT_OFF_POLL).await;
        if leader_cut_off(raft) {
            return;
        }
    }
}

impl Cluster {
    pub async fn start(
        cfg: ClusterConfig,
        store: Arc<ChunkStore>,
        meta: Arc<MetaStore>,
    ) -> anyhow::Result<Arc<Self>> {
        cfg.validate().map_err(anyhow::Error::msg)?;
        let nodes: Vec<(u64, String)> =
            cfg.nodes.iter().map(|n| (n.id, n.address.clone())).collect();
        let transport = Transport::new(cfg.node_id, &nodes, store.clone(), cfg.groups)?;
        let config = Arc::new(raft_config(cfg.snapshot_every).validate()?);
        super::snapshot::clear_staging(&store);
        let created = Arc::new(Notify::new());
        let mut rafts = Vec::new();
        let mut committed = Vec::new();
        for group in 0..=cfg.groups {
            let log = LogStore::new(group, meta.clone(), store.clone());
            committed.push(log.committed());
            let sm = StateMachine::open(
                group,
                cfg.groups,
                store.clone(),
                meta.clone(),
                created.clone(),
                transport.epochs[group as usize].clone(),
            )?;
            sm.resume_collects();
            let net = GroupNetworkFactory { group, transport: transport.clone() };
            rafts.push(Raft::new(cfg.node_id, config.clone(), net, log, sm).await?);
        }
        let reads = (0..=cfg.groups).map(|_| Arc::default()).collect();
        let c = Arc::new(Self {
            scrubbed: Default::default(),
            cfg,
            store,
            transport,
            rafts,
            reads,
            committed,
            replacement: Arc::default(),
        });
        if c.cfg.scrub_rate > 0 {
            tokio::spawn(c.clone().scrub());
        }
        c.clone().spawn_bootstrap();
        tracing::info!(groups = c.cfg.groups, nodes = c.cfg.nodes.len(), "cluster groups started");
        Ok(c)
    }

    /// The lowest node id initializes every group once, with all nodes as voters.
    fn spawn_bootstrap(self: Arc<Self>) {
        if self.cfg.join || self.cfg.nodes.iter().map(|n| n.id).min() != Some(self.cfg.node_id) {
            return;
        }
        tokio::spawn(async move {
            let members: BTreeMap<u64, Member> = self
                .cfg
                .nodes
                .iter()
                .map(|n| {
                    let m = Member { address: n.address.clone(), datacenter: n.datacenter.clone() };
                    (n.id, m)
                })
                .collect();
            let mut fresh = 0;
            for raft in &self.rafts {
                if raft.is_initialized().await.unwrap_or(true) {
                    continue;
                }
                match raft.initialize(members.clone()).await {
                    Ok(()) => fresh += 1,
                    Err(e) => tracing::warn!(%e, "initializing a chunk group"),
                }
            }
            if fresh > 0 {
                tracing::info!(groups = fresh, "bootstrapped chunk groups");
            }
        });
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.cfg
    }

    pub fn transport(&self) -> &Arc<Transport> {
        &self.transport
    }

    pub fn raft(&self, group: u32) -> Option<&Raft> {
        self.rafts.get(group as usize)
    }

    /// The commit index of `group` as this replica last heard it; `None` if it heard of none
    /// since the node started (openraft's metrics do not carry it).
    pub fn committed_index(&self, group: u32) -> Option<u64> {
        let c = self.committed.get(group as usize)?;
        c.load(std::sync::atomic::Ordering::Relaxed).checked_sub(1)
    }

    pub fn address_of(&self, node: u64) -> Option<String> {
        self.members().remove(&node).map(|m| m.address)
    }

    /// Every node this one knows of: the configured members and every member of a group's
    /// membership (replacements join that way).
    pub fn members(&self) -> BTreeMap<u64, Member> {
        let mut out: BTreeMap<u64, Member> = self
            .cfg
            .nodes
            .iter()
            .map(|n| {
                (n.id, Member { address: n.address.clone(), datacenter: n.datacenter.clone() })
            })
            .collect();
        for r in &self.rafts {
            let m = r.metrics().borrow().membership_config.clone();
            for (id, node) in m.membership().nodes() {
                out.insert(*id, node.clone());
            }
        }
        out
    }

    /// Starts moving every replica of `old` to `new` (see `Cluster.ReplaceNode`).
    pub fn start_replacement(self: &Arc<Self>, old: u64, new: u64, member: Member) -> Result<()> {
        let members = self.members();
        let Some(old_member) = members.get(&old) else {
            return Err(Error::Unsupported("replacing a node that is not a member"));
        };
        if old_member.datacenter != member.datacenter {
            return Err(Error::Refused {
                code: tonic::Code::InvalidArgument as i32,
                message: format!(
                    "node {old} is in {}; its replacement must be too (got {})",
                    old_member.datacenter, member.datacenter
                ),
            });
        }
        if members.contains_key(&new) && self.cfg.nodes.iter().any(|n| n.id == new) {
            return Err(Error::Unsupported("the replacement is an original member already"));
        }
        {
            let mut r = self.replacement.lock();
            if let Some(cur) = r.as_ref().filter(|c| c.finished.is_none()) {
                if cur.old == old && cur.new == new {
                    return Ok(());
                }
                return Err(Error::Refused {
                    code: tonic::Code::FailedPrecondition as i32,
                    message: format!("replacing node {} by {} is under way", cur.old, cur.new),
                });
            }
            *r = Some(Replacement {
                old,
                new,
                total: self.rafts.len() as u32,
                done: 0,
                started: std::time::Instant::now(),
                finished: None,
                last_error: String::new(),
            });
        }
        let me = self.clone();
        tokio::spawn(async move {
            tracing::info!(old, new, "replacing a node");
            for group in 0..me.rafts.len() as u32 {
                loop {
                    match me.replace_in_group(group, old, new, &member).await {
                        Ok(()) => break,
                        Err(e) => {
                            tracing::warn!(group, %e, "replacement step failed; retrying");
                            if let Some(r) = me.replacement.lock().as_mut() {
                                r.last_error = format!("group {group}: {e}");
                            }
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
                if let Some(r) = me.replacement.lock().as_mut() {
                    r.done += 1;
                }
            }
            if let Some(r) = me.replacement.lock().as_mut() {
                r.finished = Some(r.started.elapsed());
                tracing::info!(old, new, secs = r.started.elapsed().as_secs_f64(), "node replaced");
            }
        });
        Ok(())
    }

    pub fn replacement(&self) -> Option<Replacement> {
        self.replacement.lock().clone()
    }

    /// Raises `volume`'s fence to `generation` in every data group (all of them: a volume
    /// that grows later reaches more groups), each through its leader. Returns once every
    /// group committed it.
    pub async fn fence_volume(&self, volume: u64, generation: u64) -> Result<()> {
        let groups: Vec<u32> = (1..=self.cfg.groups).collect();
        let op = GroupOp::Fence { volume, generation };
        let results =
            futures::future::join_all(groups.iter().map(|&g| self.on_leader(g, &op))).await;
        for (g, r) in groups.iter().zip(results) {
            r.map_err(|e| match e {
                Error::Refused { .. } => e,
                e => Error::Unavailable(format!("fencing volume {volume} in group {g}: {e}")),
            })?;
        }
        tracing::info!(volume, generation, groups = groups.len(), "volume fenced");
        Ok(())
    }

    /// On `group`'s leader: commits the fence in the group's log.
    pub async fn fence_group(&self, group: u32, volume: u64, generation: u64) -> Result<()> {
        if group == META_GROUP || group > self.cfg.groups {
            return Err(Error::NoSuchGroup(group));
        }
        Self::done(self.propose(group, Cmd::Fence { volume, generation }).await?)
    }

    /// One group's step, sent to the group's leader.
    async fn replace_in_group(
        &self,
        group: u32,
        old: u64,
        new: u64,
        member: &Member,
    ) -> Result<()> {
        let raft = self.raft(group).ok_or(Error::NoSuchGroup(group))?;
        let leader = raft.metrics().borrow().current_leader;
        match leader {
            None => Err(Error::Unavailable(format!("group {group} has no leader"))),
            Some(l) if l == self.cfg.node_id => {
                self.change_replica(group, old, new, member.clone()).await
            }
            Some(l) => {
                let addr =
                    self.address_of(l).ok_or(Error::Unavailable(format!("leader {l} unknown")))?;
                let mut c = tern_proto::v1::cluster_client::ClusterClient::connect(format!(
                    "http://{addr}"
                ))
                .await
                .map_err(|e| Error::Unavailable(e.to_string()))?;
                let req = tern_proto::v1::ChangeReplicaRequest {
                    group,
                    old,
                    new: Some(tern_proto::v1::NodeInfo {
                        id: new,
                        address: member.address.clone(),
                        datacenter: member.datacenter.clone(),
                    }),
                };
                c.change_replica(req)
                    .await
                    .map_err(|s| Error::Unavailable(s.message().to_string()))?;
                Ok(())
            }
        }
    }

    /// On `group`'s leader: adds `new` as a learner and waits until it caught up (from the
    /// log, or a snapshot streamed from the chunk store), then makes it a voter in `old`'s
    /// place. Idempotent: a group already moved is left alone.
    pub async fn change_replica(
        &self,
        group: u32,
        old: u64,
        new: u64,
        member: Member,
    ) -> Result<()> {
        let raft = self.raft(group).ok_or(Error::NoSuchGroup(group))?;
        let m = raft.metrics().borrow().membership_config.clone();
        let voters: BTreeSet<u64> = m.membership().voter_ids().collect();
        if voters.contains(&new) && !voters.contains(&old) {
            return Ok(());
        }
        let map = |group: u32| {
            move |e: RaftError<u64, ClientWriteError<u64, Member>>| match e {
                RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
                    Error::NotLeader { group, leader: f.leader_id }
                }
                e => Error::Unavailable(e.to_string()),
            }
        };
        if !m.membership().nodes().any(|(id, _)| *id == new) {
            raft.add_learner(new, member, true).await.map_err(map(group))?;
        }
        let mut next = voters;
        next.remove(&old);
        next.insert(new);
        raft.change_membership(ChangeMembers::ReplaceAllVoters(next), false)
            .await
            .map_err(map(group))?;
        tracing::info!(group, old, new, "replica moved");
        Ok(())
    }

    /// `(group, leader as known here, term)` of every group.
    pub fn group_states(&self) -> Vec<(u32, Option<u64>, u64)> {
        self.rafts
            .iter()
            .enumerate()
            .map(|(g, r)| {
                let m = r.metrics();
                let m = m.borrow();
                (g as u32, m.current_leader, m.current_term)
            })
            .collect()
    }

    /// The data group of `[offset, offset + len)`, which must lie within one chunk (the
    /// frontend splits requests at chunk boundaries).
    pub fn group_of(&self, volume: u64, offset: u64, len: u64) -> Result<u32> {
        let chunk = offset / CHUNK_SIZE;
        if len > 0 && (offset + len - 1) / CHUNK_SIZE != chunk {
            return Err(Error::CrossesChunk { offset, len });
        }
        Ok(chunk_group(volume, chunk, self.cfg.groups))
    }

    /// Proposes `cmd` to `group` and waits until it is committed and applied here.
    pub async fn propose(&self, group: u32, cmd: Cmd) -> Result<Reply> {
        let raft = self.raft(group).ok_or(Error::NoSuchGroup(group))?;
        self.refuse_if_cut_off(group, raft)?;
        let write = tokio::time::timeout(PROPOSE_TIMEOUT, raft.client_write(cmd));
        let answer = tokio::select! {
            r = write => r,
            () = until_cut_off(raft) => return Err(Error::NotLeader { group, leader: None }),
        };
        match answer {
            Err(_) => Err(Error::Unavailable(format!(
                "group {group} did not commit within {PROPOSE_TIMEOUT:?}"
            ))),
            Ok(Ok(resp)) => Ok(resp.data),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                Err(Error::NotLeader { group, leader: f.leader_id })
            }
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
                Err(Error::Unavailable(e.to_string()))
            }
            Ok(Err(RaftError::Fatal(e))) => {
                Err(Error::Unavailable(format!("group {group} stopped on this node: {e}")))
            }
        }
    }

    /// A leader that has not heard from a quorum for a while (cut off by a partition, or its
    /// peers are down) says so at once instead of letting requests wait for a commit that
    /// cannot come: clients go and find the new leader.
    fn refuse_if_cut_off(&self, group: u32, raft: &Raft) -> Result<()> {
        if leader_cut_off(raft) {
            return Err(Error::NotLeader { group, leader: None });
        }
        Ok(())
    }

    /// Returns once this node may serve a linearizable read of `group`: it is the leader, a
    /// quorum confirmed it after the read arrived, and it applied everything committed before.
    pub async fn linearize(&self, group: u32) -> Result<()> {
        let raft = self.raft(group).ok_or(Error::NoSuchGroup(group))?.clone();
        self.refuse_if_cut_off(group, &raft)?;
        let gate = self.reads[group as usize].clone();
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut s = gate.state.lock();
            s.1.push(tx);
            !std::mem::replace(&mut s.0, true)
        };
        if start {
            tokio::spawn(async move {
                loop {
                    let waiters = {
                        let mut s = gate.state.lock();
                        if s.1.is_empty() {
                            s.0 = false;
                            return;
                        }
                        std::mem::take(&mut s.1)
                    };
                    let confirm = tokio::time::timeout(PROPOSE_TIMEOUT, raft.ensure_linearizable());
                    let r = tokio::select! {
                        r = confirm => r,
                        () = until_cut_off(&raft) => Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(
                            openraft::error::ForwardToLeader::empty(),
                        )))),
                    };
                    let r = match r {
                        Err(_) => Err(Error::Unavailable(format!(
                            "group {group}: no quorum confirmed leadership"
                        ))),
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                            Err(Error::NotLeader { group, leader: f.leader_id })
                        }
                        Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e)))) => {
                            Err(Error::Unavailable(e.to_string()))
                        }
                        Ok(Err(RaftError::Fatal(e))) => Err(Error::Unavailable(e.to_string())),
                    };
                    for w in waiters {
                        let _ = w.send(match &r {
                            Ok(()) => Ok(()),
                            Err(Error::NotLeader { group, leader }) => {
                                Err(Error::NotLeader { group: *group, leader: *leader })
                            }
                            Err(e) => Err(Error::Unavailable(e.to_string())),
                        });
                    }
                }
            });
        }
        rx.await.map_err(|_| Error::Unavailable("read confirmation dropped".into()))?
    }

    /// Checks a request against the volume as this node knows it; returns its group.
    fn check(&self, v: &Volume, offset: u64, len: u64, write: bool) -> Result<u32> {
        if !v.is_replicated() {
            return Err(Error::Unsupported("local volumes on a replicated cluster"));
        }
        v.check_io(offset, len, write)?;
        self.group_of(v.placement(), offset, len)
    }

    pub fn done(reply: Reply) -> Result<()> {
        match reply {
            Reply::Done | Reply::Volume(_) => Ok(()),
            Reply::Refused { code, message } => Err(Error::Refused { code, message }),
            Reply::StaleEpoch { volume, epoch, floor } => {
                Err(Error::StaleEpoch { volume, epoch, floor })
            }
        }
    }

    pub async fn write(
        &self,
        v: &Volume,
        offset: u64,
        data: Bytes,
        fua: bool,
        generation: u64,
        epoch: u64,
    ) -> Result<()> {
        let len = data.len() as u64;
        if len > tern_common::MAX_IO_SIZE {
            return Err(Error::TooLarge { len, max: tern_common::MAX_IO_SIZE });
        }
        let group = self.check(v, offset, len, true)?;
        if self.cfg.unsafe_no_replication {
            self.linearize(group).await?;
            return self.store.write(v, offset, data, fua).await;
        }
        let cmd = Cmd::Write { volume: v.id.0, offset, data, fua, generation, epoch };
        Self::done(self.propose(group, cmd).await?)
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn write_zeroes(
        &self,
        v: &Volume,
        offset: u64,
        len: u64,
        punch: bool,
        fua: bool,
        generation: u64,
        epoch: u64,
    ) -> Result<()> {
        let group = self.check(v, offset, len, true)?;
        if self.cfg.unsafe_no_replication {
            self.linearize(group).await?;
            return self.store.write_zeroes(v, offset, len, punch, fua).await;
        }
        let cmd = Cmd::WriteZeroes { volume: v.id.0, offset, len, punch, fua, generation, epoch };
        Self::done(self.propose(group, cmd).await?)
    }

    pub async fn trim(
        &self,
        v: &Volume,
        offset: u64,
        len: u64,
        fua: bool,
        generation: u64,
        epoch: u64,
    ) -> Result<()> {
        let group = self.check(v, offset, len, true)?;
        if self.cfg.unsafe_no_replication {
            self.linearize(group).await?;
            return self.store.trim(v, offset, len, fua).await;
        }
        let cmd = Cmd::Trim { volume: v.id.0, offset, len, fua, generation, epoch };
        Self::done(self.propose(group, cmd).await?)
    }

    /// Makes every write acknowledged before it in `group` durable on a quorum.
    pub async fn flush(&self, v: &Volume, group: u32) -> Result<()> {
        if group == META_GROUP || group > self.cfg.groups {
            return Err(Error::NoSuchGroup(group));
        }
        let _ = v;
        if self.cfg.unsafe_no_replication {
            self.linearize(group).await?;
            return self.store.barrier().await;
        }
        Self::done(self.propose(group, Cmd::Flush).await?)
    }

    /// Reads at snapshot `epoch` (0: the head).
    pub async fn read(&self, v: &Volume, offset: u64, len: u64, epoch: u64) -> Result<Bytes> {
        if len > tern_common::MAX_IO_SIZE {
            return Err(Error::TooLarge { len, max: tern_common::MAX_IO_SIZE });
        }
        let group = self.check(v, offset, len, false)?;
        self.linearize(group).await?;
        self.store.note_client_read();
        if epoch != 0 {
            self.check_snapshot(group, v.id.0, epoch)?;
            return self.store.read_at(v, offset, len, epoch).await;
        }
        self.read_repairing(v, group, offset, len).await
    }

    /// Refuses `epoch` unless it is a live snapshot of `volume` in `group` here.
    fn check_snapshot(&self, group: u32, volume: u64, epoch: u64) -> Result<()> {
        let live =
            self.transport.epochs[group as usize].lock().get(&volume).is_some_and(|e| e.has(epoch));
        if live {
            Ok(())
        } else {
            Err(Error::NoSnapshot { volume, epoch })
        }
    }

    /// Reads, repairing damaged blocks from the other replicas on the way: a read never
    /// returns wrong data, and fails (DATA_LOSS) only if no replica has a good copy.
    async fn read_repairing(&self, v: &Volume, group: u32, offset: u64, len: u64) -> Result<Bytes> {
        match self.store.read(v, offset, len).await {
            Err(Error::ChecksumMismatch { .. }) => {
                self.repair_range(v, group, offset, len).await?;
                self.store.read(v, offset, len).await
            }
            r => r,
        }
    }

    /// Finds the damaged blocks of `[offset, offset + len)` and rewrites each from another
    /// replica of `group` holding the same version (its checksum equals this replica's
    /// block map entry): one range fetched per replica asked.
    pub async fn repair_range(&self, v: &Volume, group: u32, offset: u64, len: u64) -> Result<()> {
        const BS: u64 = tern_common::BLOCK_SIZE;
        let mut bad = Vec::new();
        let mut b = offset / BS * BS;
        while b < offset + len {
            if let Err(Error::ChecksumMismatch { .. }) = self.store.read(v, b, BS).await {
                bad.push(b);
            }
            b += BS;
        }
        let (Some(&first), Some(&last)) = (bad.first(), bad.last()) else { return Ok(()) };
        let span = last + BS - first;
        let raft = self.raft(group).ok_or(Error::NoSuchGroup(group))?;
        let voters: Vec<u64> =
            raft.metrics().borrow().membership_config.membership().voter_ids().collect();
        let mut why = String::from("no other replica");
        for peer in voters.into_iter().filter(|&p| p != self.cfg.node_id) {
            let Some(addr) = self.address_of(peer) else { continue };
            let Some(mut c) = self.transport.client(peer, &addr) else { continue };
            let fetched = async {
                let req = tern_proto::v1::FetchBlockRequest {
                    volume: v.id.0,
                    offset: first,
                    length: span,
                };
                match tokio::time::timeout(Duration::from_secs(5), c.fetch_block(req)).await {
                    Ok(Ok(r)) => Ok(r.into_inner().data),
                    Ok(Err(s)) => Err(s.message().to_string()),
                    Err(_) => Err("timed out".to_string()),
                }
            }
            .await;
            let data = match fetched {
                Ok(d) if d.len() as u64 == span => d,
                Ok(_) => {
                    why = format!("node {peer} sent a short range");
                    continue;
                }
                Err(e) => {
                    why = format!("node {peer}: {e}");
                    continue;
                }
            };
            let mut left = Vec::new();
            for &at in &bad {
                let o = (at - first) as usize;
                if !self.store.repair_block(v, at, &data[o..o + BS as usize]).await? {
                    left.push(at);
                }
            }
            if left.is_empty() {
                return Ok(());
            }
            why = format!("node {peer} holds another version of {} blocks", left.len());
            bad = left;
        }
        Err(Error::Unavailable(format!(
            "{} damaged blocks of volume {} from offset {first} could not be repaired: {why}",
            bad.len(),
            v.id
        )))
    }

    /// The background scrub: reads every data block this node holds, at most `scrub_rate`
    /// bytes per second, and repairs damaged ones from the other replicas.
    async fn scrub(self: Arc<Self>) {
        const PIECE: u64 = 1 << 20;
        loop {
            tokio::time::sleep(self.cfg.scrub_pause).await;
            for v in self.store.list() {
                let rec = v.record();
                if rec.storage_class != "replicated" {
                    continue;
                }
                let mut off = 0;
                while off < rec.size {
                    let len = PIECE.min(rec.size - off);
                    let group = chunk_group(rec.placement(), off / CHUNK_SIZE, self.cfg.groups);
                    match self.read_repairing(&v, group, off, len).await {
                        Ok(_) => {}
                        Err(Error::VolumeDeleted(_)) | Err(Error::VolumeNotFound(_)) => break,
                        Err(e) => tracing::error!(volume = rec.id, offset = off, %e, "scrub"),
                    }
                    self.scrubbed.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
                    off += len;
                    // Holes cost no I/O, but are paced as if they did: simple and bounded.
                    tokio::time::sleep(Duration::from_secs_f64(
                        len as f64 / self.cfg.scrub_rate as f64,
                    ))
                    .await;
                }
            }
        }
    }

    pub async fn block_status(
        &self,
        v: &Volume,
        offset: u64,
        len: u64,
        epoch: u64,
    ) -> Result<Vec<(u64, crate::meta::Entry)>> {
        // Clip to the chunk: the frontend asks one chunk at a time.
        let clipped = len.min(CHUNK_SIZE - offset % CHUNK_SIZE);
        let group = self.check(v, offset, clipped, false)?;
        self.linearize(group).await?;
        if epoch != 0 {
            self.check_snapshot(group, v.id.0, epoch)?;
        }
        self.store.block_status_at(v, offset, clipped, epoch).await
    }

    // ----- snapshots ---------------------------------------------------------------------

    /// Creates, deletes or rolls the volume back to the snapshot at `epochs[0]` of `volume`
    /// in every data group, each through its leader; returns once every group committed it.
    /// A deletion may name several snapshots: each group drops them all in one entry.
    pub async fn snapshot_volume(&self, volume: u64, epochs: &[u64], op: SnapOp) -> Result<()> {
        check_snapshot_epochs(epochs, op)?;
        let op = GroupOp::Snapshot { volume, epochs: epochs.into(), op };
        let groups: Vec<u32> = (1..=self.cfg.groups).collect();
        let results =
            futures::future::join_all(groups.iter().map(|&g| self.on_leader(g, &op))).await;
        for (g, r) in groups.iter().zip(results) {
            r.map_err(|e| match e {
                Error::Refused { .. } => e,
                e => Error::Unavailable(format!("snapshot of volume {volume} in group {g}: {e}")),
            })?;
        }
        tracing::info!(volume, ?epochs, ?op, "snapshot operation committed in every group");
        Ok(())
    }

    /// On `group`'s leader: commits a snapshot's creation or deletion (of all of `epochs`),
    /// or a rollback to one, in the group's log.
    pub async fn snapshot_group(
        &self,
        group: u32,
        volume: u64,
        epochs: &[u64],
        op: SnapOp,
    ) -> Result<()> {
        if group == META_GROUP || group > self.cfg.groups {
            return Err(Error::NoSuchGroup(group));
        }
        check_snapshot_epochs(epochs, op)?;
        let epoch = epochs[0];
        let cmd = match op {
            SnapOp::Create => Cmd::Snapshot { volume, epoch },
            SnapOp::Delete => Cmd::DeleteSnapshot { volume, epochs: epochs.to_vec() },
            SnapOp::Rollback => Cmd::Rollback { volume, epoch },
            SnapOp::Flatten => Cmd::Flatten { volume },
        };
        Self::done(self.propose(group, cmd).await?)
    }

    /// The ranges of `volume` that differ between epochs `from` and `to` (see
    /// `Cluster.VolumeChanges`), from every group's leader, in offset order.
    pub async fn volume_changes(
        &self,
        volume: u64,
        from: u64,
        to: u64,
    ) -> Result<Vec<crate::store::Change>> {
        let groups: Vec<u32> = (1..=self.cfg.groups).collect();
        let op = GroupOp::Changes { volume, from, to };
        let mut out = Vec::new();
        for r in futures::future::join_all(groups.iter().map(|&g| self.on_leader(g, &op))).await {
            if let GroupAnswer::Changes(c) = r? {
                out.extend(c);
            }
        }
        out.sort_by_key(|c| c.0);
        Ok(out)
    }

    /// On `group`'s leader: the changed ranges of its chunks of `volume`.
    pub async fn group_changes(
        &self,
        group: u32,
        volume: u64,
        from: u64,
        to: u64,
    ) -> Result<Vec<crate::store::Change>> {
        let v = self.store.get(volume)?;
        self.linearize(group).await?;
        for e in [from, to] {
            if e != 0 {
                self.check_snapshot(group, volume, e)?;
            }
        }
        if from != 0 && to != 0 && from >= to {
            return Err(Error::Unsupported("the changes go from an older epoch to a newer one"));
        }
        let chunks: Vec<u32> =
            super::snapshot::group_chunks(&v.record(), group, self.cfg.groups).collect();
        self.store.changes(&v, &chunks, from, to).await
    }

    /// The space `volume`'s versions hold, summed over every group's leader.
    pub async fn volume_usage(&self, volume: u64) -> Result<crate::store::Usage> {
        let groups: Vec<u32> = (1..=self.cfg.groups).collect();
        let op = GroupOp::Usage { volume };
        let mut out = crate::store::Usage::default();
        for r in futures::future::join_all(groups.iter().map(|&g| self.on_leader(g, &op))).await {
            if let GroupAnswer::Usage(u) = r? {
                out.add(&u);
            }
        }
        Ok(out)
    }

    /// On `group`'s leader: the space its chunks of `volume` hold.
    pub async fn group_usage(&self, group: u32, volume: u64) -> Result<crate::store::Usage> {
        let v = self.store.get(volume)?;
        self.linearize(group).await?;
        let state = self.transport.epochs[group as usize]
            .lock()
            .get(&volume)
            .map(|e| crate::epoch::Epochs::clone(e))
            .unwrap_or_default();
        let chunks: Vec<u32> =
            super::snapshot::group_chunks(&v.record(), group, self.cfg.groups).collect();
        self.store.usage(&v, &chunks, &state).await
    }

    /// Runs `op` on `group`'s leader (this node, or the one it names), retrying through an
    /// election for a few seconds.
    async fn on_leader(&self, group: u32, op: &GroupOp) -> Result<GroupAnswer> {
        let raft = self.raft(group).ok_or(Error::NoSuchGroup(group))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let leader = raft.metrics().borrow().current_leader;
            let r = match leader {
                Some(l) if l == self.cfg.node_id => self.run_group_op(group, op).await,
                Some(l) => match self.address_of(l) {
                    Some(addr) => remote_group_op(&addr, group, op).await,
                    None => Err(Error::Unavailable(format!("leader {l} unknown"))),
                },
                None => Err(Error::Unavailable(format!("group {group} has no leader"))),
            };
            match r {
                Err(e @ (Error::Unavailable(_) | Error::NotLeader { leader: None, .. }))
                    if tokio::time::Instant::now() < deadline =>
                {
                    tracing::debug!(group, ?op, "{e}; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                r => return r,
            }
        }
    }

    async fn run_group_op(&self, group: u32, op: &GroupOp) -> Result<GroupAnswer> {
        match *op {
            GroupOp::Fence { volume, generation } => {
                self.fence_group(group, volume, generation).await.map(|()| GroupAnswer::Done)
            }
            GroupOp::Snapshot { volume, ref epochs, op } => {
                self.snapshot_group(group, volume, epochs, op).await.map(|()| GroupAnswer::Done)
            }
            GroupOp::Changes { volume, from, to } => {
                self.group_changes(group, volume, from, to).await.map(GroupAnswer::Changes)
            }
            GroupOp::Usage { volume } => {
                self.group_usage(group, volume).await.map(GroupAnswer::Usage)
            }
        }
    }
}

/// What a snapshot operation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapOp {
    Create,
    Delete,
    Rollback,
    /// Copies a clone's parent blocks into it (`epoch`: the parent snapshot's).
    Flatten,
}

impl SnapOp {
    pub fn of(delete: bool, rollback: bool, flatten: bool) -> Result<Self> {
        match (delete, rollback, flatten) {
            (false, false, false) => Ok(Self::Create),
            (true, false, false) => Ok(Self::Delete),
            (false, true, false) => Ok(Self::Rollback),
            (false, false, true) => Ok(Self::Flatten),
            _ => Err(Error::Unsupported("one snapshot operation at a time")),
        }
    }
}

/// The epochs of a snapshot operation: at least one, none of them 0; only a deletion names
/// more than one.
fn check_snapshot_epochs(epochs: &[u64], op: SnapOp) -> Result<()> {
    match epochs {
        [] => Err(Error::Unsupported("a snapshot operation needs an epoch")),
        _ if epochs.contains(&0) => Err(Error::Unsupported("epoch 0 is never a snapshot")),
        [_, _, ..] if op != SnapOp::Delete => {
            Err(Error::Unsupported("only a deletion takes several snapshots at once"))
        }
        _ => Ok(()),
    }
}

/// A step of a volume-wide operation that one chunk group's leader runs.
#[derive(Clone, Debug)]
enum GroupOp {
    Fence { volume: u64, generation: u64 },
    Snapshot { volume: u64, epochs: std::sync::Arc<[u64]>, op: SnapOp },
    Changes { volume: u64, from: u64, to: u64 },
    Usage { volume: u64 },
}

enum GroupAnswer {
    Done,
    Changes(Vec<crate::store::Change>),
    Usage(crate::store::Usage),
}

/// Sends `op` to the node at `addr`, the group's leader as known here.
async fn remote_group_op(addr: &str, group: u32, op: &GroupOp) -> Result<GroupAnswer> {
    use tern_proto::v1;
    let mut c = v1::cluster_client::ClusterClient::connect(format!("http://{addr}"))
        .await
        .map_err(|e| Error::Unavailable(e.to_string()))?;
    // UNAVAILABLE (election, stale leader) is retried; anything else is the answer.
    let status = |s: tonic::Status| match s.code() {
        tonic::Code::Unavailable => Error::Unavailable(s.message().to_string()),
        code => Error::Refused { code: code as i32, message: s.message().to_string() },
    };
    match *op {
        GroupOp::Fence { volume, generation } => {
            let req = v1::FenceGroupRequest { group, volume_id: volume, generation };
            c.fence_group(req).await.map_err(status)?;
            Ok(GroupAnswer::Done)
        }
        GroupOp::Snapshot { volume, ref epochs, op } => {
            let req = v1::SnapshotVolumeRequest {
                volume_id: volume,
                epoch: epochs[0],
                more_epochs: epochs[1..].to_vec(),
                delete: op == SnapOp::Delete,
                rollback: op == SnapOp::Rollback,
                flatten: op == SnapOp::Flatten,
                group: Some(group),
            };
            c.snapshot_volume(req).await.map_err(status)?;
            Ok(GroupAnswer::Done)
        }
        GroupOp::Changes { volume, from, to } => {
            let req = v1::VolumeChangesRequest {
                volume_id: volume,
                from_epoch: from,
                to_epoch: to,
                group: Some(group),
            };
            let r = c.volume_changes(req).await.map_err(status)?.into_inner();
            Ok(GroupAnswer::Changes(
                r.extents.into_iter().map(|e| (e.offset, e.length, e.zero)).collect(),
            ))
        }
        GroupOp::Usage { volume } => {
            let req = v1::VolumeUsageRequest { volume_id: volume, group: Some(group) };
            let r = c.volume_usage(req).await.map_err(status)?.into_inner();
            const BS: u64 = tern_common::BLOCK_SIZE;
            Ok(GroupAnswer::Usage(crate::store::Usage {
                total: r.total_bytes / BS,
                head_only: r.head_only_bytes / BS,
                exclusive: r.exclusive.into_iter().map(|e| (e.epoch, e.bytes / BS)).collect(),
            }))
        }
    }
}
