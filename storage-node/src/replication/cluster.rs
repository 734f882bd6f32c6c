//! The node's chunk groups and the replicated data and admin paths.
//!
//! Every group keeps one replica (a Raft voter) per datacenter, on the nodes its *placement*
//! names (`tern_common::placement`): given by the volume manager, or computed from the
//! `--cluster` list. With one node per datacenter every node holds every group. Each node
//! runs a Raft instance for every group; those it holds no replica of stay uninitialized and
//! idle. The lowest voter of each group initializes it the first time the cluster starts.
//! Every node holds the meta group (volume records), as a voter or as a learner.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
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

mod leadership;
pub use leadership::LeadershipStats;

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
    /// The voters of groups `0..=groups` (index = group) as first placed; empty: computed
    /// from `nodes` (see [`ClusterConfig::resolve_placement`]). Moves change the groups'
    /// memberships afterwards; this stays the starting point and a routing hint.
    pub placement: Vec<Vec<u64>>,
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
        if self.groups == 0 || self.groups > MAX_GROUPS {
            return Err(format!("--groups must be in 1..={MAX_GROUPS}"));
        }
        if self.placement.is_empty() {
            return Ok(());
        }
        if self.placement.len() != self.groups as usize + 1 {
            return Err(format!(
                "the placement names {} groups, the cluster has {} (and the meta group)",
                self.placement.len(),
                self.groups
            ));
        }
        let dcs: HashSet<&str> = self.nodes.iter().map(|n| n.datacenter.as_str()).collect();
        for (g, voters) in self.placement.iter().enumerate() {
            let mut seen = HashSet::new();
            for v in voters {
                let Some(n) = self.nodes.iter().find(|n| n.id == *v) else {
                    return Err(format!("group {g} is placed on node {v}, not a member"));
                };
                if !seen.insert(n.datacenter.as_str()) {
                    return Err(format!("group {g} has two replicas in {}", n.datacenter));
                }
            }
            if seen.len() != dcs.len() {
                return Err(format!("group {g} lacks a replica in some datacenter: {voters:?}"));
            }
        }
        Ok(())
    }

    /// Fills in the placement computed from the member list when none was given (every node
    /// computes the same one).
    pub fn resolve_placement(&mut self) {
        if self.placement.is_empty() {
            let nodes: Vec<_> = self
                .nodes
                .iter()
                .map(|n| tern_common::placement::Candidate {
                    id: n.id,
                    datacenter: n.datacenter.clone(),
                    free_bytes: 0,
                })
                .collect();
            self.placement = tern_common::placement::place_groups(&nodes, self.groups);
        }
    }
}

impl GroupOpener {
    /// Opens `group`'s Raft instance over its stored state (none: an empty replica).
    async fn open(
        &self,
        cfg: &ClusterConfig,
        group: u32,
        store: &Arc<ChunkStore>,
        transport: &Arc<Transport>,
    ) -> anyhow::Result<GroupSlot> {
        let log = LogStore::new(group, self.meta.clone(), store.clone());
        let committed = log.committed();
        let sm = StateMachine::open(
            group,
            cfg.groups,
            store.clone(),
            self.meta.clone(),
            self.created.clone(),
            transport.epochs[group as usize].clone(),
        )?;
        sm.resume_collects();
        let gate = sm.retire_gate();
        let net = GroupNetworkFactory { group, transport: transport.clone() };
        let raft = Raft::new(cfg.node_id, self.config.clone(), net, log, sm).await?;
        Ok(GroupSlot { raft, committed, gate })
    }
}

/// A group's Raft instance and what the node keeps beside it.
struct GroupSlot {
    raft: Raft,
    committed: Arc<std::sync::atomic::AtomicU64>,
    gate: Arc<super::state_machine::RetireGate>,
}

/// Batches linearizable-read confirmations of one group: reads arriving while a round runs
/// share the next round (each round is one heartbeat exchange with a quorum).
#[derive(Default)]
struct ReadGate {
    state: Mutex<(bool, Vec<oneshot::Sender<Result<()>>>)>,
}

/// A group as one node knows it.
#[derive(Clone, Debug)]
pub struct GroupState {
    pub group: u32,
    /// Its leader, if this node holds a replica and knows one.
    pub leader: Option<u64>,
    pub term: u64,
    /// Its voters: the membership when this node holds a replica, else the placement.
    pub voters: Vec<u64>,
    pub held: bool,
    /// This node holds a replica and knows its membership to be committed.
    pub voters_committed: bool,
    /// The log index of the membership this node knows (0: none), and all its nodes.
    pub membership_index: u64,
    pub nodes: Vec<u64>,
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
    /// The groups asked for (empty: all).
    pub requested: Vec<u32>,
}

pub struct Cluster {
    /// Bytes the background scrub has verified.
    pub scrubbed: std::sync::atomic::AtomicU64,
    cfg: ClusterConfig,
    replacement: Arc<Mutex<Option<Replacement>>>,
    /// Nodes this one moved replicas away from (not made meta learners again).
    retired: Mutex<HashSet<u64>>,
    store: Arc<ChunkStore>,
    transport: Arc<Transport>,
    /// Index = group id (0 = the meta group). A slot's instance is replaced when this node's
    /// replica of the group retires (see [`Cluster::retire`]).
    rafts: Vec<parking_lot::RwLock<Raft>>,
    reads: Vec<Arc<ReadGate>>,
    /// Each group's commit index as its log store last heard it, plus one (0: none yet).
    committed: Vec<parking_lot::RwLock<Arc<std::sync::atomic::AtomicU64>>>,
    /// What a group's Raft instance is opened with.
    opener: GroupOpener,
    /// When each group last had a leader as this node knows it (for [`Cluster::retire`]).
    led_at: Vec<Mutex<std::time::Instant>>,
    /// Each group's state machine gate (closed when the replica retires).
    gates: Vec<parking_lot::RwLock<Arc<super::state_machine::RetireGate>>>,
    /// Fencing generations of the `local` volumes this node is home to, mirrored from
    /// RocksDB (under [`LOCAL_FENCES`]). Writes hold it shared from their fence check to
    /// their completion, a fence raise exclusively: once a raise returns, no older write is
    /// in flight or to come.
    local_fences: tokio::sync::RwLock<HashMap<u64, u64>>,
    /// Each group's hand-over state and request origins (see [`leadership`]).
    handovers: Vec<leadership::Handover>,
    origins: leadership::Origins,
    pub leadership: LeadershipStats,
    /// When the cluster started (the origin of times kept in milliseconds).
    started: std::time::Instant,
}

/// The key space (a group id no group has) of the fences of local volumes.
const LOCAL_FENCES: u32 = u32::MAX;

/// What opening a group's Raft instance takes.
struct GroupOpener {
    config: Arc<openraft::Config>,
    meta: Arc<MetaStore>,
    created: Arc<Notify>,
}

/// Proposals that get no answer this long fail with UNAVAILABLE (the client retries,
/// perhaps elsewhere): a leader cut off from its quorum never completes them.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// A leader without a quorum's acknowledgement for this long stops taking requests (the
/// followers elect a new leader after 1.2-1.6 s of silence; heartbeats go every 100 ms).
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
        let mut cfg = cfg;
        cfg.validate().map_err(anyhow::Error::msg)?;
        cfg.resolve_placement();
        let nodes: Vec<(u64, String)> =
            cfg.nodes.iter().map(|n| (n.id, n.address.clone())).collect();
        let transport = Transport::new(cfg.node_id, &nodes, store.clone(), cfg.groups)?;
        let config = Arc::new(raft_config(cfg.snapshot_every).validate()?);
        super::snapshot::clear_staging(&store);
        let opener = GroupOpener { config, meta, created: Arc::new(Notify::new()) };
        let mut rafts = Vec::new();
        let mut committed = Vec::new();
        let mut gates = Vec::new();
        for group in 0..=cfg.groups {
            let slot = opener.open(&cfg, group, &store, &transport).await?;
            rafts.push(parking_lot::RwLock::new(slot.raft));
            committed.push(parking_lot::RwLock::new(slot.committed));
            gates.push(parking_lot::RwLock::new(slot.gate));
        }
        let groups = cfg.groups;
        let reads = (0..=cfg.groups).map(|_| Arc::default()).collect();
        let led_at = (0..=cfg.groups).map(|_| Mutex::new(std::time::Instant::now())).collect();
        let local_fences = opener.meta.fences(LOCAL_FENCES)?.into_iter().collect();
        let c = Arc::new(Self {
            scrubbed: Default::default(),
            cfg,
            store,
            transport,
            rafts,
            reads,
            committed,
            opener,
            led_at,
            gates,
            local_fences: tokio::sync::RwLock::new(local_fences),
            replacement: Arc::default(),
            retired: Mutex::default(),
            handovers: (0..=groups).map(|_| Default::default()).collect(),
            origins: Default::default(),
            leadership: Default::default(),
            started: std::time::Instant::now(),
        });
        tokio::spawn(c.clone().retire_moved_replicas());
        tokio::spawn(c.clone().follow_the_workload());
        tokio::spawn(c.clone().campaign_when_leader_silent());
        if c.cfg.scrub_rate > 0 {
            tokio::spawn(c.clone().scrub());
        }
        c.clone().spawn_bootstrap();
        tracing::info!(groups = c.cfg.groups, nodes = c.cfg.nodes.len(), "cluster groups started");
        Ok(c)
    }

    /// The lowest voter of each group initializes it once, with the voters its placement
    /// names. The meta group's leader then keeps every member a learner of it at least.
    fn spawn_bootstrap(self: Arc<Self>) {
        if self.cfg.join {
            return;
        }
        if self.cfg.nodes.len() > self.cfg.placement[META_GROUP as usize].len() {
            tokio::spawn(self.clone().keep_meta_learners());
        }
        tokio::spawn(async move {
            let mut fresh = 0;
            for (group, voters) in self.cfg.placement.iter().enumerate() {
                if voters.iter().min() != Some(&self.cfg.node_id) {
                    continue;
                }
                let raft = self.rafts[group].read().clone();
                if raft.is_initialized().await.unwrap_or(true) {
                    continue;
                }
                // Moved away from this node once: the group lives elsewhere.
                if self.opener.meta.retired_group(group as u32).unwrap_or(true) {
                    continue;
                }
                let members: BTreeMap<u64, Member> = self
                    .cfg
                    .nodes
                    .iter()
                    .filter(|n| voters.contains(&n.id))
                    .map(|n| (n.id, Member::of(n)))
                    .collect();
                match raft.initialize(members).await {
                    Ok(()) => fresh += 1,
                    Err(e) => tracing::warn!(group, %e, "initializing a chunk group"),
                }
            }
            if fresh > 0 {
                tracing::info!(groups = fresh, "bootstrapped chunk groups");
            }
        });
    }

    /// While this node leads the meta group: every configured member that holds no meta
    /// replica becomes a learner (each node needs the volume records of the chunks it holds).
    /// A node this one retired (replaced) is not added back.
    async fn keep_meta_learners(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let raft = self.rafts[META_GROUP as usize].read().clone();
            let (leads, present) = {
                let m = raft.metrics();
                let m = m.borrow();
                let present: BTreeSet<u64> =
                    m.membership_config.membership().nodes().map(|(id, _)| *id).collect();
                (m.current_leader == Some(self.cfg.node_id), present)
            };
            if !leads {
                continue;
            }
            let retired = self.retired.lock().clone();
            for n in &self.cfg.nodes {
                if present.contains(&n.id) || retired.contains(&n.id) {
                    continue;
                }
                match raft.add_learner(n.id, Member::of(n), false).await {
                    Ok(_) => tracing::info!(node = n.id, "added as a learner of the meta group"),
                    Err(e) => tracing::debug!(node = n.id, %e, "adding a meta learner"),
                }
            }
        }
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.cfg
    }

    pub fn transport(&self) -> &Arc<Transport> {
        &self.transport
    }

    pub fn raft(&self, group: u32) -> Option<Raft> {
        self.rafts.get(group as usize).map(|r| r.read().clone())
    }

    /// The commit index of `group` as this replica last heard it; `None` if it heard of none
    /// since the node started (openraft's metrics do not carry it).
    pub fn committed_index(&self, group: u32) -> Option<u64> {
        let c = self.committed.get(group as usize)?.read().clone();
        c.load(std::sync::atomic::Ordering::Relaxed).checked_sub(1)
    }

    pub fn address_of(&self, node: u64) -> Option<String> {
        self.members().remove(&node).map(|m| m.address)
    }

    /// Every node this one knows of: the configured members and every member of a group's
    /// membership (replacements join that way).
    pub fn members(&self) -> BTreeMap<u64, Member> {
        let mut out: BTreeMap<u64, Member> =
            self.cfg.nodes.iter().map(|n| (n.id, Member::of(n))).collect();
        for r in &self.rafts {
            let m = r.read().metrics().borrow().membership_config.clone();
            for (id, node) in m.membership().nodes() {
                out.insert(*id, node.clone());
            }
        }
        out
    }

    /// Starts moving every replica of `old` to `new` (see `Cluster.ReplaceNode`).
    /// Only `groups` when not empty (a rebalance moves a few).
    pub fn start_replacement(
        self: &Arc<Self>,
        old: u64,
        new: u64,
        member: Member,
        requested: Vec<u32>,
    ) -> Result<()> {
        let groups: Vec<u32> = if requested.is_empty() {
            (0..self.rafts.len() as u32).collect()
        } else {
            requested.clone()
        };
        if let Some(g) = groups.iter().find(|&&g| g as usize >= self.rafts.len()) {
            return Err(Error::NoSuchGroup(*g));
        }
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
        if old == new {
            return Err(Error::Unsupported("a node cannot replace itself"));
        }
        {
            let mut r = self.replacement.lock();
            if let Some(cur) = r.as_ref().filter(|c| c.finished.is_none()) {
                if cur.old == old && cur.new == new && cur.requested == requested {
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
                total: groups.len() as u32,
                done: 0,
                started: std::time::Instant::now(),
                finished: None,
                last_error: String::new(),
                requested,
            });
        }
        let me = self.clone();
        tokio::spawn(async move {
            tracing::info!(old, new, "replacing a node");
            // The new node learns the volume records first (every node holds the meta group).
            loop {
                match me.replace_in_group(META_GROUP, 0, new, &member).await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(%e, "making the new node a meta learner failed; retrying");
                        if let Some(r) = me.replacement.lock().as_mut() {
                            r.last_error = format!("meta group: {e}");
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
            for group in groups {
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
        let v = self.store.get(volume)?;
        if !v.is_replicated() {
            return self.fence_local(&v, generation).await;
        }
        let op = GroupOp::Fence { volume, generation };
        self.on_every_group(&op, &format!("fencing volume {volume}")).await?;
        tracing::info!(volume, generation, groups = self.cfg.groups, "volume fenced");
        Ok(())
    }

    /// Runs `op` on every data group's leader at once; succeeds once every group did. A
    /// refusal is passed on as it is, anything else is UNAVAILABLE naming `what` and the group.
    async fn on_every_group(&self, op: &GroupOp, what: &str) -> Result<()> {
        let groups: Vec<u32> = (1..=self.cfg.groups).collect();
        let results =
            futures::future::join_all(groups.iter().map(|&g| self.on_leader(g, op))).await;
        for (g, r) in groups.iter().zip(results) {
            r.map_err(|e| match e {
                Error::Refused { .. } => e,
                e => Error::Unavailable(format!("{what} in group {g}: {e}")),
            })?;
        }
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
        let op = GroupOp::ChangeReplica { old, new, member: member.clone() };
        self.on_leader(group, &op).await.map(|_| ())
    }

    /// On `group`'s leader: adds `new` as a learner and waits until it caught up (from the
    /// log, or a snapshot streamed from the chunk store), then makes it a voter in `old`'s
    /// place (a learner, if `old` was one; `old == 0`: only adds the learner). Idempotent: a
    /// group already moved is left alone.
    pub async fn change_replica(
        &self,
        group: u32,
        old: u64,
        new: u64,
        member: Member,
    ) -> Result<()> {
        let raft = self.raft(group).ok_or(Error::NoSuchGroup(group))?;
        let m = raft.metrics().borrow().membership_config.clone();
        if raft.metrics().borrow().current_leader != Some(self.cfg.node_id) {
            let leader = raft.metrics().borrow().current_leader;
            return Err(Error::NotLeader { group, leader });
        }
        let voters: BTreeSet<u64> = m.membership().voter_ids().collect();
        let holds = |id: u64| m.membership().nodes().any(|(n, _)| *n == id);
        let map = |group: u32| {
            move |e: RaftError<u64, ClientWriteError<u64, Member>>| match e {
                RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
                    Error::NotLeader { group, leader: f.leader_id }
                }
                e => Error::Unavailable(e.to_string()),
            }
        };
        if old != 0 && !holds(old) {
            // Moved already, or never here (placement puts each group on some nodes only).
            return Ok(());
        }
        if old == 0 {
            // Only make `new` a learner (of the meta group, before it takes data groups:
            // applying their entries needs the volume records).
            if !holds(new) {
                raft.add_learner(new, member, true).await.map_err(map(group))?;
                tracing::info!(group, new, "learner added");
            }
            return Ok(());
        }
        if !voters.contains(&old) {
            // `old` is a learner (of the meta group): `new` takes its place as one, unless
            // it holds a replica already.
            if !holds(new) {
                raft.add_learner(new, member, true).await.map_err(map(group))?;
            }
            raft.change_membership(ChangeMembers::RemoveNodes([old].into()), false)
                .await
                .map_err(map(group))?;
            self.retired.lock().insert(old);
            tracing::info!(group, old, new, "learner replaced");
            return Ok(());
        }
        // `old` and `new` both voters: a change interrupted in joint consensus (by a leader
        // change); replacing all voters below finishes it.
        if !holds(new) {
            raft.add_learner(new, member, true).await.map_err(map(group))?;
        }
        let mut next = voters;
        next.remove(&old);
        next.insert(new);
        raft.change_membership(ChangeMembers::ReplaceAllVoters(next), false)
            .await
            .map_err(map(group))?;
        self.retired.lock().insert(old);
        tracing::info!(group, old, new, "replica moved");
        Ok(())
    }

    /// Retires the replicas this node holds of groups that moved elsewhere. A replica moved
    /// off a group does not always hear of it (the leader stops sending to it once the new
    /// membership is in its log): it keeps its old membership, campaigns in vain (its log is
    /// behind, so no voter grants it), and its chunks hold space. One that did hear of it
    /// (it led the change, or applied it) sees a membership without itself. So every few
    /// seconds each group this node is a voter of by its own word but has had no leader for a
    /// while, and each group whose membership here leaves this node out, is checked with the
    /// nodes of that membership: once the group's leader reports a committed membership
    /// newer than the one known here and without this node, the replica retires
    /// ([`Cluster::retire`]). A learner (of the meta group) is left alone.
    async fn retire_moved_replicas(self: Arc<Self>) {
        const CHECK_EVERY: Duration = Duration::from_secs(2);
        const LEADERLESS_FOR: Duration = Duration::from_secs(6);
        loop {
            tokio::time::sleep(CHECK_EVERY).await;
            for g in 0..self.rafts.len() {
                let group = g as u32;
                let Some(raft) = self.raft(group) else { continue };
                let (voter, present, leader, nodes, index) = {
                    let m = raft.metrics();
                    let m = m.borrow();
                    let membership = m.membership_config.membership();
                    let nodes: Vec<u64> = membership.nodes().map(|(n, _)| *n).collect();
                    let me = self.cfg.node_id;
                    (
                        membership.voter_ids().any(|v| v == me),
                        nodes.contains(&me),
                        m.current_leader,
                        nodes,
                        m.membership_config.log_id().map_or(0, |l| l.index),
                    )
                };
                let suspect = if voter {
                    leader.is_none()
                } else {
                    // Initialized here, but without this node: moved off (or a learner
                    // being added back, which the leader's answer tells).
                    !present && !nodes.is_empty()
                };
                if !suspect {
                    *self.led_at[g].lock() = std::time::Instant::now();
                    continue;
                }
                if self.led_at[g].lock().elapsed() < LEADERLESS_FOR {
                    continue;
                }
                *self.led_at[g].lock() = std::time::Instant::now();
                // This node's own membership (if it is in it) must be older than the leader's.
                let newer_than = if present { index + 1 } else { index };
                if self.moved_off(group, &nodes, newer_than).await {
                    if let Err(e) = self.retire(group).await {
                        tracing::error!(group, %e, "retiring a moved replica");
                    }
                }
            }
        }
    }

    /// Whether the leader of `group`, found among `nodes`, reports a committed membership at
    /// log index `newer_than` or later that leaves this node out (as voter and as learner).
    /// A stale leader (one cut off, still at an older membership) does not count.
    async fn moved_off(&self, group: u32, nodes: &[u64], newer_than: u64) -> bool {
        for &peer in nodes.iter().filter(|&&p| p != self.cfg.node_id) {
            let Some(addr) = self.address_of(peer) else { continue };
            let map = async {
                let mut c = tern_proto::v1::cluster_client::ClusterClient::connect(format!(
                    "http://{addr}"
                ))
                .await
                .ok()?;
                let req = tern_proto::v1::GetClusterMapRequest {};
                Some(c.get_cluster_map(req).await.ok()?.into_inner())
            };
            let Ok(Some(map)) = tokio::time::timeout(Duration::from_secs(2), map).await else {
                continue;
            };
            let Some(g) = map.group_state.iter().find(|g| g.group == group) else { continue };
            if g.leader == map.self_id && g.leader != 0 {
                return g.voters_committed
                    && g.membership_index >= newer_than
                    && !g.nodes.contains(&self.cfg.node_id);
            }
        }
        false
    }

    /// Drops this node's replica of `group`: stops its Raft instance, forgets its state (one
    /// synced batch), wipes its chunks, and opens an empty instance in its place (should the
    /// group come back here, it catches up like any new replica). Only for a replica the
    /// group's committed membership no longer names: nothing depends on what it held. A crash
    /// between forgetting and wiping leaves unreferenced chunk data (space, never wrong data:
    /// a replica that comes back is rebuilt by a snapshot, which wipes the chunks it installs).
    async fn retire(&self, group: u32) -> anyhow::Result<()> {
        let old = self.raft(group).ok_or(Error::NoSuchGroup(group))?;
        let _ = old.shutdown().await;
        // The state machine worker outlives the shutdown: close its gate and wait out an
        // apply under way, so nothing of the old replica is written after this.
        let gate = self.gates[group as usize].read().clone();
        gate.retired.store(true, std::sync::atomic::Ordering::Release);
        drop(gate.busy.lock().await);
        self.opener.meta.forget_group(group)?;
        self.transport.epochs[group as usize].lock().clear();
        let mut wiped = 0u32;
        if group != META_GROUP {
            for v in self.store.list() {
                let rec = v.record();
                if rec.storage_class != "replicated" {
                    continue;
                }
                for chunk in super::snapshot::group_chunks(&rec, group, self.cfg.groups) {
                    self.store.wipe_chunk(&v, chunk).await?;
                    wiped += 1;
                }
            }
        }
        let slot = self.opener.open(&self.cfg, group, &self.store, &self.transport).await?;
        *self.rafts[group as usize].write() = slot.raft;
        *self.committed[group as usize].write() = slot.committed;
        *self.gates[group as usize].write() = slot.gate;
        tracing::info!(group, chunks = wiped, "retired this node's replica (moved elsewhere)");
        Ok(())
    }

    /// Every group as this node knows it.
    pub fn group_states(&self) -> Vec<GroupState> {
        (0..self.rafts.len())
            .map(|g| {
                let r = self.rafts[g].read().clone();
                let m = r.metrics();
                let m = m.borrow();
                let membership = m.membership_config.membership();
                let held = membership.nodes().any(|(n, _)| *n == self.cfg.node_id);
                let voters = if held {
                    membership.voter_ids().collect()
                } else {
                    self.cfg.placement.get(g).cloned().unwrap_or_default()
                };
                let committed = self.committed_index(g as u32);
                let voters_committed = held
                    && match m.membership_config.log_id() {
                        None => true,
                        Some(l) => committed.is_some_and(|c| c >= l.index),
                    };
                GroupState {
                    group: g as u32,
                    leader: m.current_leader.filter(|_| held),
                    term: m.current_term,
                    voters,
                    held,
                    voters_committed,
                    membership_index: m.membership_config.log_id().map_or(0, |l| l.index),
                    nodes: membership.nodes().map(|(n, _)| *n).collect(),
                }
            })
            .collect()
    }

    /// Whether this node holds a replica (voter or learner) of `group`.
    pub fn holds(&self, group: u32) -> bool {
        self.raft(group).is_some_and(|r| {
            r.metrics()
                .borrow()
                .membership_config
                .membership()
                .nodes()
                .any(|(n, _)| *n == self.cfg.node_id)
        })
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
        let _in_flight = self.enter(group).await;
        self.refuse_if_cut_off(group, &raft)?;
        let write = tokio::time::timeout(PROPOSE_TIMEOUT, raft.client_write(cmd));
        let answer = tokio::select! {
            r = write => r,
            () = until_cut_off(&raft) => return Err(Error::NotLeader { group, leader: None }),
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
        self.wait_hand_over(group).await;
        self.refuse_if_cut_off(group, &raft)?;
        if self.read_on_lease(group, &raft) {
            return Ok(());
        }
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

    // ----- local volumes ----------------------------------------------------------------
    //
    // A `local` volume lives on its home node alone: its I/O is served from that node's chunk
    // store, never through a Raft log. Durability is the single node's: an acknowledged FUA
    // write, or one covered by an acknowledged flush, went through the store's barrier (data
    // fdatasync, then the RocksDB WAL fsync) and survives `kill -9` and power loss of the
    // home node; losing the node's disk loses the volume (that is the class's contract).

    /// Refuses a request for a local volume that this node is not home to.
    fn local_here(&self, v: &Volume) -> Result<()> {
        let home = v.record().home;
        if home == self.cfg.node_id {
            Ok(())
        } else {
            Err(Error::Refused {
                code: tonic::Code::FailedPrecondition as i32,
                message: format!("volume {} is local to node {home}, not this node", v.id),
            })
        }
    }

    /// The fence check of a write to a local volume; the guard is held until it completes.
    async fn local_write_guard(
        &self,
        v: &Volume,
        generation: u64,
    ) -> Result<tokio::sync::RwLockReadGuard<'_, HashMap<u64, u64>>> {
        self.local_here(v)?;
        let fences = self.local_fences.read().await;
        let fence = fences.get(&v.id.0).copied().unwrap_or(0);
        if generation < fence {
            return Err(Error::Refused {
                code: tonic::Code::FailedPrecondition as i32,
                message: format!(
                    "volume {} was attached elsewhere: writes of generation {generation} are \
                     fenced off (current generation {fence})",
                    v.id
                ),
            });
        }
        Ok(fences)
    }

    /// Raises a local volume's fence on its home node (asked there if this is another).
    async fn fence_local(&self, v: &Volume, generation: u64) -> Result<()> {
        let home = v.record().home;
        if home != self.cfg.node_id {
            let addr = self
                .address_of(home)
                .ok_or_else(|| Error::Unavailable(format!("home node {home} unknown")))?;
            let mut c =
                tern_proto::v1::cluster_client::ClusterClient::connect(format!("http://{addr}"))
                    .await
                    .map_err(|e| Error::Unavailable(format!("home node {home}: {e}")))?;
            let req = tern_proto::v1::FenceVolumeRequest { volume_id: v.id.0, generation };
            c.fence_volume(req)
                .await
                .map_err(|s| Error::Unavailable(format!("home node {home}: {}", s.message())))?;
            return Ok(());
        }
        // Exclusive: writes of older generations in flight finish first.
        let mut fences = self.local_fences.write().await;
        if fences.get(&v.id.0).copied().unwrap_or(0) < generation {
            // Durable before it counts: the old host must stay fenced after a crash.
            self.opener.meta.put_fence(LOCAL_FENCES, v.id.0, generation)?;
            self.opener.meta.sync_wal()?;
            fences.insert(v.id.0, generation);
        }
        tracing::info!(volume = v.id.0, generation, "local volume fenced");
        Ok(())
    }

    /// A flush of a local volume: the home node's barrier (covering every write it
    /// completed, on any connection).
    pub async fn flush_local(&self, v: &Volume) -> Result<()> {
        self.local_here(v)?;
        self.store.barrier().await
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
        if !v.is_replicated() {
            let _fence = self.local_write_guard(v, generation).await?;
            return self.store.write(v, offset, data, fua).await;
        }
        let group = self.check(v, offset, len, true)?;
        if self.cfg.unsafe_no_replication {
            self.linearize(group).await?;
            return self.store.write(v, offset, data, fua).await;
        }
        let cmd = Cmd::Write { volume: v.id.0, offset, data: data.clone(), fua, generation, epoch };
        if !self.leads(group) {
            return Self::done(self.propose(group, cmd).await?);
        }
        // The leader writes the data to free slots while the entry replicates; the apply then
        // only updates the block map (see `ChunkStore::prewrite`). The proposal goes first.
        let (answer, pre) =
            tokio::join!(self.propose(group, cmd), self.store.prewrite(v, offset, &data));
        if let Some(p) = pre {
            self.store.release_prewritten(p);
        }
        Self::done(answer?)
    }

    /// Whether this node leads `group` (by its own latest view).
    fn leads(&self, group: u32) -> bool {
        self.raft(group)
            .is_some_and(|r| r.metrics().borrow().current_leader == Some(self.cfg.node_id))
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
        if !v.is_replicated() {
            let _fence = self.local_write_guard(v, generation).await?;
            return self.store.write_zeroes(v, offset, len, punch, fua).await;
        }
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
        if !v.is_replicated() {
            let _fence = self.local_write_guard(v, generation).await?;
            return self.store.trim(v, offset, len, fua).await;
        }
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
        if !v.is_replicated() {
            self.local_here(v)?;
            if epoch != 0 {
                return Err(Error::LocalSnapshot(v.id.0));
            }
            return self.store.read(v, offset, len).await;
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
                    if !self.holds(group) {
                        off += len;
                        continue;
                    }
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
        if !v.is_replicated() {
            self.local_here(v)?;
            if epoch != 0 {
                return Err(Error::LocalSnapshot(v.id.0));
            }
            return self.store.block_status(v, offset, len).await;
        }
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
        let group_op = GroupOp::Snapshot { volume, epochs: epochs.into(), op };
        self.on_every_group(&group_op, &format!("snapshot of volume {volume}")).await?;
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

    /// Discards `volume`'s blocks from `size` on in every data group, each through its
    /// leader (`Cmd::Truncate`); returns once every group committed it.
    pub async fn truncate_volume(&self, volume: u64, size: u64, from: u64) -> Result<()> {
        let op = GroupOp::Truncate { volume, size, from };
        self.on_every_group(&op, &format!("truncating volume {volume}")).await?;
        tracing::info!(volume, size, "volume truncated in every group");
        Ok(())
    }

    /// On `group`'s leader: commits the truncation in the group's log.
    pub async fn truncate_group(
        &self,
        group: u32,
        volume: u64,
        size: u64,
        from: u64,
    ) -> Result<()> {
        if group == META_GROUP || group > self.cfg.groups {
            return Err(Error::NoSuchGroup(group));
        }
        Self::done(self.propose(group, Cmd::Truncate { volume, size, from }).await?)
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

    /// The nodes that may lead `group`, best guess first: its voters as this node knows them
    /// (its membership when it holds a replica, else the placement it started with), then
    /// every other member. Without this node.
    fn leader_candidates(&self, group: u32) -> Vec<u64> {
        let mut out: Vec<u64> = Vec::new();
        if let Some(raft) = self.raft(group) {
            let m = raft.metrics().borrow().membership_config.clone();
            out.extend(m.membership().voter_ids());
        }
        if let Some(p) = self.cfg.placement.get(group as usize) {
            out.extend(p.iter().copied());
        }
        out.extend(self.members().into_keys());
        let mut seen = HashSet::new();
        out.retain(|&n| n != self.cfg.node_id && seen.insert(n));
        out
    }

    /// Runs `op` on `group`'s leader (this node, or another), retrying through an election
    /// for a few seconds. The leader as this node knows it goes first; a node that holds no
    /// replica of the group asks the group's voters in turn and follows their leader hints.
    async fn on_leader(&self, group: u32, op: &GroupOp) -> Result<GroupAnswer> {
        let raft = self.raft(group).ok_or(Error::NoSuchGroup(group))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut hint: Option<u64> = None;
        let mut attempt = 0usize;
        let mut hops = 0u32;
        loop {
            let known =
                if self.holds(group) { raft.metrics().borrow().current_leader } else { None };
            let target = hint.take().or(known).or_else(|| {
                let c = self.leader_candidates(group);
                attempt += 1;
                (!c.is_empty()).then(|| c[(attempt - 1) % c.len()])
            });
            let r = match target {
                Some(l) if l == self.cfg.node_id => self.run_group_op(group, op).await,
                Some(l) => match self.address_of(l) {
                    Some(addr) => remote_group_op(&addr, group, op).await,
                    None => Err(Error::Unavailable(format!("leader {l} unknown"))),
                },
                None => Err(Error::Unavailable(format!("group {group} has no leader"))),
            };
            let late = tokio::time::Instant::now() >= deadline;
            match r {
                Err(Error::NotLeader { leader: Some(l), .. }) if !late && Some(l) != target => {
                    hint = Some(l);
                    hops += 1;
                    if hops.is_multiple_of(4) {
                        // Nodes naming each other (an election settling): do not spin.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                Err(e @ (Error::Unavailable(_) | Error::NotLeader { .. })) if !late => {
                    tracing::debug!(group, ?op, "{e}; retrying");
                    // Asking around (no leader known here) goes faster than waiting for one.
                    let pause = if known.is_none() { 20 } else { 100 };
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                Err(Error::NotLeader { .. }) => {
                    return Err(Error::Unavailable(format!("group {group}: no leader found")))
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
            GroupOp::ChangeReplica { old, new, ref member } => self
                .change_replica(group, old, new, member.clone())
                .await
                .map(|()| GroupAnswer::Done),
            GroupOp::Truncate { volume, size, from } => {
                self.truncate_group(group, volume, size, from).await.map(|()| GroupAnswer::Done)
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
    ChangeReplica { old: u64, new: u64, member: Member },
    Truncate { volume: u64, size: u64, from: u64 },
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
        tonic::Code::Unavailable => {
            let hint = s.metadata().get(crate::error::LEADER_HINT);
            match hint.and_then(|h| h.to_str().ok()?.parse::<u64>().ok()) {
                Some(l) => Error::NotLeader { group, leader: Some(l) },
                None => Error::Unavailable(s.message().to_string()),
            }
        }
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
        GroupOp::Truncate { volume, size, from } => {
            let req = v1::TruncateVolumeRequest {
                from_size: from,
                volume_id: volume,
                size_bytes: size,
                group: Some(group),
            };
            c.truncate_volume(req).await.map_err(status)?;
            Ok(GroupAnswer::Done)
        }
        GroupOp::ChangeReplica { old, new, ref member } => {
            let req = v1::ChangeReplicaRequest {
                group,
                old,
                new: Some(v1::NodeInfo {
                    id: new,
                    address: member.address.clone(),
                    datacenter: member.datacenter.clone(),
                }),
            };
            c.change_replica(req).await.map_err(status)?;
            Ok(GroupAnswer::Done)
        }
    }
}
