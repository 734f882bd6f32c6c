//! Routing in a replicated cluster: the members, the leader of each chunk group as last heard,
//! and the retries that follow leadership around (redirects, elections, dead nodes).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use futures::future::try_join_all;
use parking_lot::{Mutex, RwLock};
use tern_common::{chunk_group, volume_groups, META_GROUP};
use tern_proto::v1::{self, io_request::Op, volume_admin_client::VolumeAdminClient};
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tracing::{debug, info, warn};

use super::node::Node;
use super::parts::{chunk_parts, Part};
use super::{io_status, is_transient, map_status, Reply};
use crate::backend::BackendError;
use crate::metrics::BackendMetrics;

/// How long one request keeps trying (following leaders, waiting out elections, moving off
/// dead nodes) before it fails with EIO.
pub(crate) const RETRY_BUDGET: Duration = Duration::from_secs(30);
/// The first pause before a retry; pauses double up to [`MAX_PAUSE`]. An election takes a few
/// hundred milliseconds: short pauses find the new leader soon after it is there.
const FIRST_PAUSE: Duration = Duration::from_millis(20);
const MAX_PAUSE: Duration = Duration::from_millis(100);
/// Redirects followed at once before pausing: two nodes that each name the other (both with a
/// stale view) must not make a request spin.
const MAX_HOPS: u32 = 3;
/// The cluster map is fetched again at most this often.
const REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// One attempt at a node waits this long for an answer before the request is tried
/// elsewhere. Far above any healthy answer time (milliseconds even under load), and below the
/// 2 s in which I/O must resume after a node freezes.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// More chunk groups than any sane cluster has: a map claiming more is refused rather than
/// sizing the leader table by it.
const MAX_GROUPS: u32 = 1 << 16;

/// What the frontend knows of a cluster of storage nodes, shared by all its connections.
pub(crate) struct Cluster {
    /// Data chunk groups: `1..=groups`. Fixed for a cluster's life (chunks are placed by it).
    groups: u32,
    /// The leader's node id for each group (index = group; [`META_GROUP`] is 0); 0 = unknown.
    /// Read on every request, hence atomics rather than a lock.
    leaders: Vec<AtomicU64>,
    /// The Raft term in which a cluster map last reported each group's leader.
    terms: Vec<AtomicU64>,
    /// Each group's voters as a map last reported them (where to look for a leader not known
    /// yet: with more nodes than datacenters, a group lives on some nodes only).
    voters: RwLock<Vec<Vec<u64>>>,
    /// The members, by ascending id. Written only when a fetched map changes them.
    nodes: RwLock<Vec<Arc<Node>>>,
    /// The configured endpoints: asked for the map when no member answers.
    seeds: Vec<Arc<Node>>,
    /// Round robin over members, for groups without a known leader.
    next: AtomicUsize,
    /// When the map was last fetched (or a fetch started).
    refreshed: Mutex<Instant>,
    /// Volume sizes seen by `lookup`, to know which groups a flush must reach.
    sizes: Mutex<HashMap<u64, u64>>,
    metrics: BackendMetrics,
}

impl Cluster {
    /// The cluster as `map` (with `groups > 0`) describes it.
    pub fn new(map: v1::ClusterMap, seeds: Vec<Arc<Node>>) -> Result<Self, String> {
        if map.groups > MAX_GROUPS {
            return Err(format!(
                "node {} reports {} chunk groups (at most {MAX_GROUPS} are supported)",
                map.self_id, map.groups
            ));
        }
        let slots = map.groups as usize + 1;
        let cluster = Self {
            groups: map.groups,
            leaders: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            terms: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            voters: RwLock::new(vec![Vec::new(); slots]),
            nodes: RwLock::new(Vec::new()),
            seeds,
            next: AtomicUsize::new(0),
            refreshed: Mutex::new(Instant::now()),
            sizes: Mutex::default(),
            metrics: BackendMetrics::default(),
        };
        cluster.set_nodes(&map.nodes);
        if cluster.nodes.read().is_empty() {
            return Err(format!("the cluster map of node {} lists no usable node", map.self_id));
        }
        cluster.learn_leaders(&map.group_state);
        Ok(cluster)
    }

    /// Counts retries and redirects in `metrics` (the backend's) from now on.
    pub fn with_metrics(mut self, metrics: BackendMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn groups(&self) -> u32 {
        self.groups
    }

    pub fn members(&self) -> usize {
        self.nodes.read().len()
    }

    /// The chunk group of chunk `chunk` of `volume`.
    pub fn group_of(&self, volume: u64, chunk: u64) -> u32 {
        chunk_group(volume, chunk, self.groups)
    }

    /// Remembers a volume's size for [`Cluster::flush`]. The largest size seen wins: a flush
    /// reaching a group too many costs little, one too few would lose durability.
    pub fn remember_size(&self, volume: u64, size: u64) {
        let mut sizes = self.sizes.lock();
        let known = sizes.entry(volume).or_insert(0);
        *known = (*known).max(size);
    }

    /// Sends one request per chunk piece of `[offset, offset + len)`, built by `op`, each to
    /// its group's leader, all at once. The answers come in the pieces' order.
    pub async fn scatter(
        self: &Arc<Self>,
        volume: u64,
        offset: u64,
        len: u64,
        op: impl Fn(Part) -> Op,
    ) -> Result<Vec<Reply>, BackendError> {
        let sends =
            chunk_parts(offset, len).map(|p| self.send(self.group_of(volume, p.chunk), op(p)));
        try_join_all(sends).await
    }

    /// Sends a flush, built by `op` for each group, to the leader of every group holding a
    /// chunk of `volume` (every group if the volume's size is unknown), all at once; succeeds
    /// if every one does.
    pub async fn flush(
        self: &Arc<Self>,
        volume: u64,
        op: impl Fn(u32) -> Op,
    ) -> Result<(), BackendError> {
        let groups = self.flush_groups(volume);
        try_join_all(groups.into_iter().map(|g| self.send(g, op(g)))).await.map(drop)
    }

    fn flush_groups(&self, volume: u64) -> Vec<u32> {
        let size = self.sizes.lock().get(&volume).copied();
        match size {
            Some(size) => volume_groups(volume, size, self.groups),
            None => (1..=self.groups).collect(),
        }
    }

    /// Sends `op` to the leader of `group`, following the cluster's word on who leads, until
    /// it is answered or [`RETRY_BUDGET`] is spent. Final errors are returned at once.
    pub async fn send(self: &Arc<Self>, group: u32, op: Op) -> Result<Reply, BackendError> {
        let deadline = Instant::now() + RETRY_BUDGET;
        // The deadline also bounds a node that takes a request and never answers.
        match tokio::time::timeout_at(deadline, self.send_until(group, &op, deadline)).await {
            Ok(answer) => answer,
            Err(_) => Err(BackendError::Unavailable(format!(
                "chunk group {group} did not answer within {RETRY_BUDGET:?}"
            ))),
        }
    }

    async fn send_until(
        self: &Arc<Self>,
        group: u32,
        op: &Op,
        deadline: Instant,
    ) -> Result<Reply, BackendError> {
        let mut backoff = Backoff::new(deadline);
        let mut avoid = 0;
        loop {
            let node = self.target(group, avoid).ok_or_else(no_members)?;
            let answer = match tokio::time::timeout(ATTEMPT_TIMEOUT, node.call(op.clone())).await {
                Ok(answer) => answer,
                // A frozen or wedged node holds requests without answering: after a while,
                // ask elsewhere (a retried write is harmless; block writes are idempotent).
                Err(_) => {
                    self.metrics.attempt_timeouts.inc();
                    // Whatever else it leads is as stuck: send those groups elsewhere too,
                    // instead of each paying the attempt timeout in turn.
                    self.forget_node(node.id);
                    Err(BackendError::Unavailable(format!("no answer within {ATTEMPT_TIMEOUT:?}")))
                }
            };
            let why = match classify(answer) {
                Outcome::Done(reply) => return Ok(reply),
                Outcome::Fail(e) => return Err(e),
                Outcome::Redirect(leader) => {
                    self.metrics.redirects.inc();
                    self.follow(group, leader);
                    if !self.knows(leader) {
                        // A member we have not heard of: the map is out of date.
                        self.refresh_soon();
                    }
                    if backoff.hop() {
                        avoid = 0;
                        continue;
                    }
                    format!("node {} sends chunk group {group} to node {leader}", node.id)
                }
                Outcome::Retry(why) => {
                    // Leader unknown, node down or stream broken: ask around.
                    self.forget(group, node.id);
                    self.refresh_soon();
                    format!("node {}: {why}", node.id)
                }
            };
            debug!(group, %why, "retrying a request");
            avoid = node.id;
            if !backoff.wait().await {
                return Err(BackendError::Unavailable(format!(
                    "gave up on chunk group {group} after {RETRY_BUDGET:?}; last: {why}"
                )));
            }
            self.metrics.retries.inc();
        }
    }

    /// Sends `op` to node `node` (the home of a `local` volume), retrying while it is
    /// unreachable, within [`RETRY_BUDGET`]. Final errors are returned at once.
    pub async fn send_to(self: &Arc<Self>, node: u64, op: Op) -> Result<Reply, BackendError> {
        let deadline = Instant::now() + RETRY_BUDGET;
        let attempts = async {
            let mut backoff = Backoff::new(deadline);
            loop {
                let target = self.nodes.read().iter().find(|n| n.id == node).cloned();
                let why = match target {
                    None => {
                        self.refresh_soon();
                        format!("node {node} is not in the cluster map")
                    }
                    Some(n) => {
                        match tokio::time::timeout(ATTEMPT_TIMEOUT, n.call(op.clone())).await {
                            Err(_) => format!("node {node}: no answer within {ATTEMPT_TIMEOUT:?}"),
                            Ok(answer) => match classify(answer) {
                                Outcome::Done(reply) => return Ok(reply),
                                Outcome::Fail(e) => return Err(e),
                                Outcome::Redirect(l) => {
                                    format!("node {node} sends the volume to node {l}")
                                }
                                Outcome::Retry(why) => format!("node {node}: {why}"),
                            },
                        }
                    }
                };
                debug!(node, %why, "retrying a request to a local volume's node");
                if !backoff.wait().await {
                    return Err(BackendError::Unavailable(format!(
                        "gave up on node {node} after {RETRY_BUDGET:?}; last: {why}"
                    )));
                }
                self.metrics.retries.inc();
            }
        };
        match tokio::time::timeout_at(deadline, attempts).await {
            Ok(answer) => answer,
            Err(_) => Err(BackendError::Unavailable(format!(
                "node {node} did not answer within {RETRY_BUDGET:?}"
            ))),
        }
    }

    /// A volume admin call: to the meta group's leader if known (it holds the volume
    /// records), else to any member, as every node forwards admin calls. Another member is
    /// tried while the answer is UNAVAILABLE, within [`RETRY_BUDGET`].
    pub async fn control<T, F, Fut>(self: &Arc<Self>, call: F) -> Result<T, Status>
    where
        F: Fn(VolumeAdminClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let deadline = Instant::now() + RETRY_BUDGET;
        let attempts = async {
            let mut backoff = Backoff::new(deadline);
            let mut avoid = 0;
            loop {
                let Some(node) = self.target(META_GROUP, avoid) else {
                    return Err(Status::unavailable("the cluster map lists no storage node"));
                };
                match call(node.admin()).await {
                    Ok(r) => return Ok(r.into_inner()),
                    Err(s) if is_transient(s.code()) => {
                        debug!(node = node.id, status = %s, "retrying an admin call");
                        self.forget(META_GROUP, node.id);
                        self.refresh_soon();
                        avoid = node.id;
                        if !backoff.wait().await {
                            return Err(s);
                        }
                        self.metrics.retries.inc();
                    }
                    Err(s) => return Err(s),
                }
            }
        };
        tokio::time::timeout_at(deadline, attempts).await.unwrap_or_else(|_| {
            Err(Status::unavailable(format!("no storage node answered within {RETRY_BUDGET:?}")))
        })
    }

    /// Where the next try for `group` goes: its leader if known (and not `avoid`, the node
    /// that just failed), else the next of its voters in turn, else the next member in turn,
    /// other than `avoid`.
    fn target(&self, group: u32, avoid: u64) -> Option<Arc<Node>> {
        let leader = self.leader(group);
        let nodes = self.nodes.read();
        if leader != 0 && leader != avoid {
            if let Some(n) = nodes.iter().find(|n| n.id == leader) {
                return Some(n.clone());
            }
        }
        let start = self.next.fetch_add(1, Relaxed);
        {
            let voters = self.voters.read();
            let ours: Vec<&Arc<Node>> = voters
                .get(group as usize)
                .into_iter()
                .flatten()
                .filter(|&&v| v != avoid)
                .filter_map(|v| nodes.iter().find(|n| n.id == *v))
                .collect();
            if !ours.is_empty() {
                return Some(ours[start % ours.len()].clone());
            }
        }
        (0..nodes.len())
            .map(|k| &nodes[(start + k) % nodes.len()])
            .find(|n| n.id != avoid)
            .or_else(|| nodes.first())
            .cloned()
    }

    fn leader(&self, group: u32) -> u64 {
        self.leaders.get(group as usize).map_or(0, |l| l.load(Relaxed))
    }

    fn knows(&self, id: u64) -> bool {
        self.nodes.read().iter().any(|n| n.id == id)
    }

    /// A node named `leader` as the leader of `group` (a not-leader answer).
    fn follow(&self, group: u32, leader: u64) {
        if let Some(l) = self.leaders.get(group as usize) {
            l.store(leader, Relaxed);
        }
    }

    /// `node` failed a request for `group`: stop sending there until someone names it again.
    /// Only if it is still the cached leader: another request may already know better.
    fn forget(&self, group: u32, node: u64) {
        if let Some(l) = self.leaders.get(group as usize) {
            let _ = l.compare_exchange(node, 0, Relaxed, Relaxed);
        }
    }

    /// `node` stopped answering: forget it as the leader of every group.
    fn forget_node(&self, node: u64) {
        for l in self.leaders.iter() {
            let _ = l.compare_exchange(node, 0, Relaxed, Relaxed);
        }
    }

    fn learn_leaders(&self, states: &[v1::GroupInfo]) {
        for g in states {
            self.learn(g.group, g.leader, g.term);
        }
        let mut voters = self.voters.write();
        for g in states {
            // A node that knows the leader holds a replica: its word on the voters is current.
            if let Some(v) = voters.get_mut(g.group as usize) {
                if !g.voters.is_empty() && (g.leader != 0 || v.is_empty()) {
                    *v = g.voters.clone();
                }
            }
        }
    }

    /// A cluster map's word on a group's leader. Taken unless a map already reported a newer
    /// term, so a lagging node's map does not undo a newer one. (Leader and term are two atomics: a
    /// race leaves at worst a stale leader, which answers with a redirect.)
    fn learn(&self, group: u32, leader: u64, term: u64) {
        let (Some(l), Some(t)) = (self.leaders.get(group as usize), self.terms.get(group as usize))
        else {
            return;
        };
        let known = t.load(Relaxed);
        // A map without a leader says nothing useful: requests to a leader that is gone fail
        // and forget it anyway, and a replica moved off a group (which may campaign on, at
        // ever higher terms) must not wipe the real leader.
        if leader != 0 && term >= known {
            t.store(term, Relaxed);
            l.store(leader, Relaxed);
        }
    }

    /// Fetches the map in the background, unless that happened less than
    /// [`REFRESH_INTERVAL`] ago: requests never wait for it, they retry on their own schedule
    /// and find the fresher map when it is there.
    fn refresh_soon(self: &Arc<Self>) {
        {
            let mut last = self.refreshed.lock();
            if last.elapsed() < REFRESH_INTERVAL {
                return;
            }
            *last = Instant::now();
        }
        let me = self.clone();
        tokio::spawn(async move { me.refresh().await });
    }

    async fn refresh(&self) {
        let mut failures = Vec::new();
        for node in self.askable() {
            match node.cluster_map().await {
                Ok(map) => return self.apply(map),
                Err(s) => failures.push(format!("{}: {}", node.uri, s.message())),
            }
        }
        warn!("could not refresh the cluster map: {}", failures.join("; "));
    }

    /// Who to ask for the map: the members, starting at a different one each time, then the
    /// configured endpoints.
    fn askable(&self) -> Vec<Arc<Node>> {
        let mut nodes = self.nodes.read().clone();
        if !nodes.is_empty() {
            let k = self.next.fetch_add(1, Relaxed) % nodes.len();
            nodes.rotate_left(k);
        }
        nodes.extend(self.seeds.iter().cloned());
        nodes
    }

    fn apply(&self, map: v1::ClusterMap) {
        if map.groups != self.groups {
            // Chunks are placed by the group count: routing by another one would be wrong.
            warn!(
                "node {} reports {} chunk groups, this frontend routes by {}: map ignored \
                 (restart the frontend if the cluster was re-created)",
                map.self_id, map.groups, self.groups
            );
            return;
        }
        self.set_nodes(&map.nodes);
        self.learn_leaders(&map.group_state);
    }

    /// Takes the member list of a map, keeping the connections to members that did not move.
    fn set_nodes(&self, infos: &[v1::NodeInfo]) {
        let old = self.nodes.read().clone();
        let mut new: Vec<Arc<Node>> =
            infos.iter().filter(|i| i.id != 0).filter_map(|i| member(&old, i)).collect();
        if new.is_empty() {
            warn!("a cluster map lists no usable node; keeping the members known so far");
            return;
        }
        new.sort_by_key(|n| n.id);
        new.dedup_by_key(|n| n.id);
        let same = old.len() == new.len() && old.iter().zip(&new).all(|(a, b)| Arc::ptr_eq(a, b));
        if !same {
            let list: Vec<String> = new.iter().map(|n| format!("{}={}", n.id, n.uri)).collect();
            info!("storage cluster members: {}", list.join(", "));
            *self.nodes.write() = new;
        }
    }
}

/// The connection to a member: the one we have if it did not move, else a new one.
fn member(old: &[Arc<Node>], info: &v1::NodeInfo) -> Option<Arc<Node>> {
    let uri = node_uri(&info.address);
    if let Some(n) = old.iter().find(|n| n.id == info.id && n.uri == uri) {
        return Some(n.clone());
    }
    match Node::member(info.id, &uri) {
        Ok(n) => Some(Arc::new(n)),
        Err(e) => {
            warn!("node {} has an unusable address {:?}: {e}", info.id, info.address);
            None
        }
    }
}

/// The endpoint of a map's `host:port` address.
fn node_uri(address: &str) -> String {
    if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    }
}

fn no_members() -> BackendError {
    BackendError::Unavailable("the cluster map lists no storage node".into())
}

/// What to do after one try of a data request.
#[derive(Debug, PartialEq)]
enum Outcome {
    Done(Reply),
    /// Not the leader; this node is (resend there at once).
    Redirect(u64),
    /// Transient (leader unknown, node down, stream broken): pause, then ask elsewhere.
    Retry(String),
    /// Final: retrying would give the same answer.
    Fail(BackendError),
}

fn classify(answer: Result<Reply, BackendError>) -> Outcome {
    match answer {
        Ok(Reply::Error(e)) if e.code == Code::Unavailable as i32 && e.leader != 0 => {
            Outcome::Redirect(e.leader)
        }
        Ok(Reply::Error(e)) if e.code == Code::Aborted as i32 && e.epoch != 0 => {
            Outcome::Fail(BackendError::StaleEpoch(e.epoch))
        }
        Ok(Reply::Error(e)) => retry_or_fail(map_status(io_status(e))),
        Ok(reply) => Outcome::Done(reply),
        Err(e) => retry_or_fail(e),
    }
}

fn retry_or_fail(e: BackendError) -> Outcome {
    match e {
        BackendError::Unavailable(why) => Outcome::Retry(why),
        e => Outcome::Fail(e),
    }
}

/// Paces one request's retries: pauses doubling from [`FIRST_PAUSE`] to [`MAX_PAUSE`], until
/// the deadline.
struct Backoff {
    deadline: Instant,
    pause: Duration,
    /// Redirects followed since the last pause.
    hops: u32,
}

impl Backoff {
    fn new(deadline: Instant) -> Self {
        Self { deadline, pause: FIRST_PAUSE, hops: 0 }
    }

    /// Whether a redirect may be followed at once.
    fn hop(&mut self) -> bool {
        self.hops += 1;
        self.hops <= MAX_HOPS
    }

    /// Pauses before the next try; false (at once) if the pause would end past the deadline.
    async fn wait(&mut self) -> bool {
        if Instant::now() + self.pause > self.deadline {
            return false;
        }
        tokio::time::sleep(self.pause).await;
        self.pause = next_pause(self.pause);
        self.hops = 0;
        true
    }
}

fn next_pause(pause: Duration) -> Duration {
    (pause * 2).min(MAX_PAUSE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: u64, port: u16) -> v1::NodeInfo {
        v1::NodeInfo { id, address: format!("127.0.0.1:{port}"), datacenter: String::new() }
    }

    fn state(group: u32, leader: u64, term: u64) -> v1::GroupInfo {
        v1::GroupInfo { group, leader, term, ..Default::default() }
    }

    /// Three members (ids 1..=3, nothing listening: connections are lazy), four groups.
    fn map(states: Vec<v1::GroupInfo>) -> v1::ClusterMap {
        v1::ClusterMap {
            self_id: 1,
            nodes: vec![info(3, 9), info(1, 7), info(2, 8)],
            groups: 4,
            group_state: states,
        }
    }

    fn cluster(states: Vec<v1::GroupInfo>) -> Arc<Cluster> {
        Arc::new(Cluster::new(map(states), Vec::new()).unwrap())
    }

    fn target(c: &Cluster, group: u32, avoid: u64) -> u64 {
        c.target(group, avoid).unwrap().id
    }

    #[tokio::test]
    async fn requests_go_to_the_known_leader() {
        let c = cluster(vec![state(2, 3, 7)]);
        assert_eq!(c.members(), 3);
        assert_eq!(target(&c, 2, 0), 3);
        // The leader just failed: some other member.
        assert_ne!(target(&c, 2, 3), 3);
    }

    #[tokio::test]
    async fn groups_without_a_leader_go_round_robin_around_the_failed_node() {
        let c = cluster(vec![]);
        let mut seen: Vec<u64> = (0..6).map(|_| target(&c, 1, 0)).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen, vec![1, 2, 3]);
        assert!((0..6).all(|_| target(&c, 1, 2) != 2));
    }

    #[tokio::test]
    async fn hints_and_failures_update_the_leader_cache() {
        let c = cluster(vec![state(1, 1, 5)]);
        c.follow(1, 2);
        assert_eq!(c.leader(1), 2);
        // Node 1 failed, but the cache already moved on: keep node 2.
        c.forget(1, 1);
        assert_eq!(c.leader(1), 2);
        c.forget(1, 2);
        assert_eq!(c.leader(1), 0);
        // Out-of-range groups are ignored, not a panic.
        c.follow(99, 1);
        c.forget(99, 1);
        assert_eq!(c.leader(99), 0);
    }

    #[tokio::test]
    async fn a_map_from_an_older_term_does_not_undo_a_newer_one() {
        let c = cluster(vec![state(1, 2, 5)]);
        c.learn(1, 3, 4);
        assert_eq!(c.leader(1), 2);
        // Same term, leader unknown to the answering node: keep what we know.
        c.learn(1, 0, 5);
        assert_eq!(c.leader(1), 2);
        // A newer term without a leader: an election, or a replica moved off the group that
        // campaigns on. Either way it names no one: keep what we know.
        c.learn(1, 0, 6);
        assert_eq!(c.leader(1), 2);
        c.learn(1, 3, 6);
        assert_eq!(c.leader(1), 3);
    }

    #[tokio::test]
    async fn a_new_map_keeps_connections_to_members_that_did_not_move() {
        let c = cluster(vec![]);
        let one = |c: &Cluster, id| c.nodes.read().iter().find(|n| n.id == id).cloned().unwrap();
        let (n1, n2) = (one(&c, 1), one(&c, 2));
        let mut m = map(vec![state(3, 4, 1)]);
        m.nodes = vec![info(1, 7), info(2, 18), info(4, 10)];
        c.apply(m);
        assert!(Arc::ptr_eq(&n1, &one(&c, 1)));
        assert!(!Arc::ptr_eq(&n2, &one(&c, 2)), "node 2 moved: a new connection");
        assert_eq!(one(&c, 2).uri, "http://127.0.0.1:18");
        assert!(!c.knows(3));
        assert_eq!(target(&c, 3, 0), 4);
    }

    #[tokio::test]
    async fn maps_that_cannot_be_routed_by_are_ignored_or_refused() {
        let c = cluster(vec![state(1, 2, 1)]);
        let mut other = map(vec![state(1, 3, 9)]);
        other.groups = 8;
        c.apply(other);
        assert_eq!(c.leader(1), 2, "a map with another group count is ignored");
        let mut empty = map(vec![]);
        empty.nodes.clear();
        c.apply(empty);
        assert_eq!(c.members(), 3, "a map without members keeps the known ones");
        let mut none = map(vec![]);
        none.nodes = vec![info(0, 1)];
        assert!(Cluster::new(none, Vec::new()).is_err());
        let mut huge = map(vec![]);
        huge.groups = u32::MAX;
        assert!(Cluster::new(huge, Vec::new()).is_err());
    }

    #[tokio::test]
    async fn flushes_reach_the_groups_of_the_volume() {
        let c = cluster(vec![]);
        assert_eq!(c.flush_groups(7), vec![1, 2, 3, 4], "size unknown: every group");
        c.remember_size(7, 4096);
        assert_eq!(c.flush_groups(7), vec![c.group_of(7, 0)]);
        c.remember_size(7, 2 * tern_common::CHUNK_SIZE);
        c.remember_size(7, 4096);
        assert_eq!(c.flush_groups(7).len(), 2, "the largest size seen counts");
    }

    #[test]
    fn answers_are_classified_by_code_and_leader_hint() {
        let err = |code: Code, leader| {
            Ok(Reply::Error(v1::IoError {
                code: code as i32,
                message: "m".into(),
                leader,
                epoch: 0,
            }))
        };
        assert_eq!(classify(err(Code::Unavailable, 3)), Outcome::Redirect(3));
        assert_eq!(classify(err(Code::Unavailable, 0)), Outcome::Retry("m".into()));
        assert_eq!(classify(err(Code::DeadlineExceeded, 0)), Outcome::Retry("m".into()));
        assert_eq!(classify(err(Code::NotFound, 0)), Outcome::Fail(BackendError::NotFound));
        assert_eq!(
            classify(err(Code::FailedPrecondition, 2)),
            Outcome::Fail(BackendError::ReadOnly)
        );
        assert!(matches!(classify(err(Code::DataLoss, 0)), Outcome::Fail(BackendError::Io(_))));
        assert!(matches!(
            classify(err(Code::OutOfRange, 0)),
            Outcome::Fail(BackendError::InvalidArgument(_))
        ));
        assert_eq!(
            classify(Err(BackendError::Unavailable("broken".into()))),
            Outcome::Retry("broken".into())
        );
        assert_eq!(classify(Ok(Reply::Done(true))), Outcome::Done(Reply::Done(true)));
    }

    #[test]
    fn pauses_double_up_to_the_cap() {
        let mut p = FIRST_PAUSE;
        let mut seen = vec![p];
        for _ in 0..5 {
            p = next_pause(p);
            seen.push(p);
        }
        let ms: Vec<u128> = seen.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, vec![20, 40, 80, 100, 100, 100]);
    }

    #[test]
    fn redirects_are_followed_at_once_only_a_few_times() {
        let mut b = Backoff::new(Instant::now() + RETRY_BUDGET);
        assert!((0..MAX_HOPS).all(|_| b.hop()));
        assert!(!b.hop());
    }

    #[tokio::test]
    async fn the_budget_ends_retries() {
        let mut b = Backoff::new(Instant::now() + Duration::from_millis(30));
        assert!(b.wait().await, "20 ms fit in 30 ms");
        assert!(!b.wait().await, "40 ms more do not");
    }

    #[test]
    fn map_addresses_become_endpoints() {
        assert_eq!(node_uri("10.0.0.1:7700"), "http://10.0.0.1:7700");
        assert_eq!(node_uri("https://n1:7700"), "https://n1:7700");
    }
}
