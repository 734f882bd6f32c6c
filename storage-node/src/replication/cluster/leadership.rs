//! Where a group's leader is, and what being it allows.
//!
//! - **Leader leases.** A leader serves linearizable reads without a heartbeat round while a
//!   quorum of its group accepted its appends within [`READ_LEASE`] (the transport notes each
//!   accepted append with the time it left: `Transport::acked_within`). No other leader can be
//!   elected in that time: a follower that accepted an append refuses other candidates for
//!   openraft's leader lease (`election_timeout_max`, 800 ms) after it got it, and the leader
//!   itself refuses them while its quorum is fresh within [`VOTE_LEASE`]
//!   ([`Cluster::refuses_vote`]). The margin between the read lease (70% of it) and the vote
//!   lease covers clocks that run at slightly different rates. A leader that has not applied an entry of its own term yet
//!   (the blank entry every new leader commits) uses no lease: entries acknowledged by the
//!   previous leader might not be applied here.
//! - **Hand-over** ([`Cluster::hand_over`]): the leader stops taking requests for the group,
//!   waits for those in flight, waits until the target replica holds its whole log, and asks
//!   it to campaign. The old leader votes for it (its own vote lease dates from its election,
//!   long past), so the target wins at once with the old leader's vote: a pause of a few
//!   milliseconds, not an election timeout. Requests that waited are then sent to the new
//!   leader.
//! - **Prompt elections** ([`Cluster::campaign_when_leader_silent`]): a follower that has
//!   heard nothing from its leader's node (no group's message) for the leader lease plus a
//!   margin campaigns at once,
//!   instead of waiting out openraft's randomized election timeout on top of the lease. The
//!   group's followers take turns (150 ms apart, by id) so they do not split the vote. Once
//!   the lease is over the other follower grants its vote, so a dead leader's groups elect
//!   about 0.9-1.1 s after it died instead of 1.2-1.6 s.
//! - **Following the workload** ([`Cluster::follow_the_workload`]): frontends name their
//!   datacenter when they open an `Io` stream; a leader counts the requests each group gets
//!   from each datacenter and hands the group over to its replica in the datacenter that
//!   sends most of them (three quarters at least), so a write from there costs one
//!   inter-datacenter round trip (leader to the nearest follower) instead of two.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use openraft::raft::VoteResponse;
use tern_common::{chunk_group, CHUNK_SIZE};
use tern_proto::v1::RaftKind;
use tokio::sync::Notify;

use super::{Cluster, Raft};
use crate::error::{Error, Result};
use crate::replication::ELECTION_TIMEOUT_MAX_MS;

/// Reads are served on the lease while a quorum accepted appends sent this recently.
const READ_LEASE: Duration = Duration::from_millis(ELECTION_TIMEOUT_MAX_MS * 7 / 10);
/// The leader refuses other candidates' votes while a quorum accepted appends sent this
/// recently (openraft's lease on followers: `election_timeout_max`).
const VOTE_LEASE: Duration = Duration::from_millis(ELECTION_TIMEOUT_MAX_MS);
/// How long a hand-over waits for requests in flight, for the target to catch up, and for
/// the target to win.
const HAND_OVER_STEP: Duration = Duration::from_secs(1);
/// How often a leader weighs where its groups' requests come from.
const PLAN_EVERY: Duration = Duration::from_secs(2);
/// A group changes leader at most this often, and only once its leader has led it this long
/// (a new leader's own vote lease must be over for it to vote for the target).
const SETTLED_FOR: Duration = Duration::from_secs(3);
/// Requests a group must get in a planning round before its leader moves for them.
const MIN_REQUESTS: u32 = 16;
/// A follower campaigns once its leader was silent this long past the lease, plus
/// [`CAMPAIGN_STAGGER`] for each follower of the group with a lower id.
const CAMPAIGN_MARGIN: Duration = Duration::from_millis(50);
const CAMPAIGN_STAGGER: Duration = Duration::from_millis(150);
/// How often followers look for silent leaders.
const SILENCE_CHECK: Duration = Duration::from_millis(50);

/// Datacenters whose requests are counted (more are not counted).
pub(super) const MAX_ORIGINS: usize = 8;

/// One group's hand-over state on this node.
#[derive(Default)]
pub(super) struct Handover {
    /// The node the group is being handed to (0: none).
    target: AtomicU64,
    /// Proposals under way on this node.
    in_flight: AtomicUsize,
    /// Wakes requests that waited for a hand-over to end.
    over: Notify,
    /// Requests from each datacenter (index in `Origins`) since the last planning round.
    pub(super) requests: [AtomicU32; MAX_ORIGINS],
    /// When this node last got an append (heartbeats included) for the group, in
    /// milliseconds since the cluster started (0: never).
    heard: AtomicU64,
    /// A term in which this node serves no reads on its lease: it asked another voter to
    /// campaign in it, or granted another candidate its vote (0: none).
    no_lease_term: AtomicU64,
    /// Vote requests being handled by openraft: no lease while one is (its grant would end
    /// this node's leadership before the metrics say so).
    votes_in_flight: AtomicUsize,
}

/// Datacenter names, in the order frontends first named them.
#[derive(Default)]
pub(super) struct Origins(parking_lot::RwLock<Vec<String>>);

/// Proposals under way on one group; ends when dropped.
pub(super) struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counters for the metrics.
#[derive(Default)]
pub struct LeadershipStats {
    pub handovers_done: AtomicU64,
    pub handovers_failed: AtomicU64,
    pub reads_on_lease: AtomicU64,
    pub reads_confirmed: AtomicU64,
}

impl Cluster {
    /// Whether `raft` (group `group`) leads with a lease a quorum renewed within `window`
    /// and has applied an entry of its own term.
    fn lease_valid(&self, group: u32, raft: &Raft, window: Duration) -> bool {
        let me = self.cfg.node_id;
        let m = raft.metrics();
        let m = m.borrow();
        if m.state != openraft::ServerState::Leader
            || m.current_leader != Some(me)
            || !m.vote.is_committed()
        {
            return false;
        }
        let term = m.current_term;
        if m.last_applied.as_ref().map(|l| l.leader_id.term) != Some(term) {
            return false;
        }
        let h = &self.handovers[group as usize];
        if h.votes_in_flight.load(Ordering::SeqCst) > 0
            || h.no_lease_term.load(Ordering::SeqCst) == term
        {
            return false;
        }
        let configs = m.membership_config.membership().get_joint_config();
        let [voters] = configs.as_slice() else { return false };
        let votes = usize::from(voters.contains(&me))
            + self.transport.acked_within(group, term, window, voters);
        votes * 2 > voters.len()
    }

    /// Whether a linearizable read of `group` may be served now without asking a quorum.
    pub(super) fn read_on_lease(&self, group: u32, raft: &Raft) -> bool {
        let ok = self.handovers[group as usize].target.load(Ordering::SeqCst) == 0
            && self.lease_valid(group, raft, READ_LEASE);
        let counter =
            if ok { &self.leadership.reads_on_lease } else { &self.leadership.reads_confirmed };
        counter.fetch_add(1, Ordering::Relaxed);
        ok
    }

    /// Handles a vote request for `group`: refused while this node leads with a fresh lease
    /// (reads served on it rely on that), else openraft's answer. While openraft handles it,
    /// and for the rest of the term if it granted the vote, this node uses no lease.
    pub async fn vote(
        &self,
        group: u32,
        raft: &Raft,
        req: openraft::raft::VoteRequest<u64>,
    ) -> std::result::Result<VoteResponse<u64>, openraft::error::RaftError<u64>> {
        let candidate = req.vote.leader_id().node_id;
        if let Some(refusal) = self.refuses_vote(group, raft, candidate) {
            return Ok(refusal);
        }
        let Some(h) = self.handovers.get(group as usize) else { return raft.vote(req).await };
        let term = raft.metrics().borrow().current_term;
        h.votes_in_flight.fetch_add(1, Ordering::SeqCst);
        let r = raft.vote(req).await;
        if r.as_ref().is_ok_and(|v| v.vote_granted) {
            h.no_lease_term.fetch_max(term, Ordering::SeqCst);
        }
        h.votes_in_flight.fetch_sub(1, Ordering::SeqCst);
        r
    }

    /// The answer to a vote request for `group` from `candidate` when this node must refuse
    /// it: it leads with a fresh lease (and is not handing the group to `candidate`).
    fn refuses_vote(&self, group: u32, raft: &Raft, candidate: u64) -> Option<VoteResponse<u64>> {
        let h = self.handovers.get(group as usize)?;
        if h.target.load(Ordering::SeqCst) == candidate {
            return None;
        }
        if !self.lease_valid(group, raft, VOTE_LEASE) {
            return None;
        }
        let vote = raft.metrics().borrow().vote;
        let last = raft.data_metrics().borrow().last_log;
        tracing::debug!(group, candidate, "vote refused: this leader's lease holds");
        Some(VoteResponse::new(vote, last, false))
    }

    /// Waits while `group` is being handed over, then counts a proposal under way until the
    /// returned guard drops.
    pub(super) async fn enter(&self, group: u32) -> InFlight<'_> {
        let h = &self.handovers[group as usize];
        loop {
            let over = h.over.notified();
            h.in_flight.fetch_add(1, Ordering::SeqCst);
            if h.target.load(Ordering::SeqCst) == 0 {
                return InFlight(&h.in_flight);
            }
            h.in_flight.fetch_sub(1, Ordering::SeqCst);
            // A hand-over ends within a few seconds; look again now and then regardless.
            let _ = tokio::time::timeout(HAND_OVER_STEP, over).await;
        }
    }

    /// Waits while `group` is being handed over (reads: they count as nothing in flight).
    pub(super) async fn wait_hand_over(&self, group: u32) {
        let h = &self.handovers[group as usize];
        loop {
            let over = h.over.notified();
            if h.target.load(Ordering::SeqCst) == 0 {
                return;
            }
            let _ = tokio::time::timeout(HAND_OVER_STEP, over).await;
        }
    }

    /// Hands the leadership of `group` to its voter `to` (see the module docs). Requests for
    /// the group wait meanwhile and then go to the new leader.
    pub async fn hand_over(&self, group: u32, to: u64) -> Result<()> {
        let raft = self.raft(group).ok_or(Error::NoSuchGroup(group))?;
        let h = self.handovers.get(group as usize).ok_or(Error::NoSuchGroup(group))?;
        if h.target.compare_exchange(0, to, Ordering::SeqCst, Ordering::SeqCst).is_err() {
            return Err(Error::Unavailable(format!("group {group} is already being handed over")));
        }
        let started = Instant::now();
        let r = self.hand_over_to(group, &raft, h, to).await;
        h.target.store(0, Ordering::SeqCst);
        h.over.notify_waiters();
        let stats = &self.leadership;
        match &r {
            Ok(()) => {
                stats.handovers_done.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    group,
                    to,
                    ms = started.elapsed().as_millis() as u64,
                    "handed the group over"
                );
            }
            Err(e) => {
                stats.handovers_failed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(group, to, %e, "hand-over failed");
            }
        }
        r
    }

    async fn hand_over_to(&self, group: u32, raft: &Raft, h: &Handover, to: u64) -> Result<()> {
        let me = self.cfg.node_id;
        {
            let m = raft.metrics();
            let m = m.borrow();
            if m.current_leader != Some(me) {
                return Err(Error::NotLeader { group, leader: m.current_leader });
            }
            let configs = m.membership_config.membership().get_joint_config();
            if configs.len() != 1 || !configs[0].contains(&to) || to == me {
                return Err(Error::Unavailable(format!(
                    "node {to} is not another voter of group {group}"
                )));
            }
            // The target wins with this node's vote alone only if the two are a majority
            // (three voters: one per datacenter); with more, the others' leases would leave
            // the group leaderless for a lease.
            if configs[0].len() > 3 {
                return Err(Error::Unavailable(format!(
                    "group {group} has {} voters: no quick hand-over",
                    configs[0].len()
                )));
            }
        }
        // No new proposals; the ones under way finish (their clients get their answers here).
        until(|| h.in_flight.load(Ordering::SeqCst) == 0, "proposals to finish").await?;
        // The target must hold this leader's whole log, or this node would refuse it its vote.
        until(
            || {
                let m = raft.metrics();
                let m = m.borrow();
                let matched = m.replication.as_ref().and_then(|r| r.get(&to).cloned().flatten());
                m.current_leader == Some(me) && matched.map(|l| l.index) == m.last_log_index
            },
            "the target to catch up",
        )
        .await?;
        // From here on the target may campaign (even if the answer gets lost): no more
        // reads on this term's lease. The target campaigns only while it still follows this
        // leader in this term, so a late or repeated request does nothing.
        let vote = {
            let m = raft.metrics();
            let m = m.borrow();
            h.no_lease_term.fetch_max(m.current_term, Ordering::SeqCst);
            m.vote
        };
        self.transport
            .call(to, group, RaftKind::Elect, super::super::encode(&vote), HAND_OVER_STEP)
            .await
            .map_err(|e| Error::Unavailable(format!("asking node {to} to campaign: {e}")))?;
        until(|| raft.metrics().borrow().current_leader != Some(me), "the target to win").await?;
        self.transport.forget_acks(group);
        Ok(())
    }

    /// Notes that an append for `group` arrived from its leader.
    pub fn heard_from_leader(&self, group: u32) {
        if let Some(h) = self.handovers.get(group as usize) {
            let ms = self.started.elapsed().as_millis().max(1) as u64;
            h.heard.fetch_max(ms, Ordering::Relaxed);
        }
    }

    /// Every [`SILENCE_CHECK`]: each group whose leader has been silent past its lease (see
    /// the module docs) gets a campaign from this node, once per leader term.
    pub(super) async fn campaign_when_leader_silent(self: std::sync::Arc<Self>) {
        let me = self.cfg.node_id;
        let lease = Duration::from_millis(ELECTION_TIMEOUT_MAX_MS) + CAMPAIGN_MARGIN;
        // The term in which this node last campaigned early, per group.
        let mut campaigned: HashMap<u32, u64> = HashMap::new();
        let mut last_look = self.started.elapsed();
        loop {
            tokio::time::sleep(SILENCE_CHECK).await;
            let now = self.started.elapsed();
            // This node was frozen or starved of CPU: the silence may be its own. Let the
            // leaders' next heartbeats arrive first.
            if now.saturating_sub(last_look) > SILENCE_CHECK * 4 {
                last_look = now;
                continue;
            }
            last_look = now;
            for group in 0..=self.cfg.groups {
                let heard = self.handovers[group as usize].heard.load(Ordering::Relaxed);
                if heard == 0 {
                    continue;
                }
                let silent = now.saturating_sub(Duration::from_millis(heard));
                if silent < lease {
                    continue;
                }
                let Some(raft) = self.raft(group) else { continue };
                let (term, turn, leader) = {
                    let m = raft.metrics();
                    let m = m.borrow();
                    let Some(leader) = m.current_leader.filter(|l| *l != me) else { continue };
                    if m.state != openraft::ServerState::Follower {
                        continue;
                    }
                    let configs = m.membership_config.membership().get_joint_config();
                    let [voters] = configs.as_slice() else { continue };
                    if !voters.contains(&me) {
                        continue;
                    }
                    let turn = voters.iter().filter(|v| **v != leader && **v < me).count() as u32;
                    (m.current_term, turn, leader)
                };
                // A leader node that still sends anything (other groups' heartbeats) is alive
                // and this group's messages are only slow: openraft's own timer decides.
                if self.transport.heard_from_node(leader).is_some_and(|d| d < lease) {
                    continue;
                }
                if silent < lease + CAMPAIGN_STAGGER * turn || campaigned.get(&group) == Some(&term)
                {
                    continue;
                }
                campaigned.insert(group, term);
                tracing::info!(
                    group,
                    term,
                    silent_ms = silent.as_millis() as u64,
                    "leader silent past its lease: campaigning"
                );
                let _ = raft.trigger().elect().await;
            }
        }
    }

    /// The index of datacenter `name` among request origins (`None`: too many).
    pub fn origin(&self, name: &str) -> Option<usize> {
        if let Some(i) = self.origins.0.read().iter().position(|d| d == name) {
            return Some(i);
        }
        let mut names = self.origins.0.write();
        if let Some(i) = names.iter().position(|d| d == name) {
            return Some(i);
        }
        if names.len() >= MAX_ORIGINS {
            return None;
        }
        names.push(name.to_string());
        Some(names.len() - 1)
    }

    /// Counts a request for `volume` at `offset` from datacenter `origin`.
    pub fn note_origin(&self, volume: u64, offset: u64, origin: usize) {
        let group = chunk_group(volume, offset / CHUNK_SIZE, self.cfg.groups);
        if let Some(c) = self.handovers.get(group as usize).and_then(|h| h.requests.get(origin)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Every [`PLAN_EVERY`]: each data group this node has led for a while, and whose
    /// requests came mostly from another datacenter, is handed to its voter there.
    pub(super) async fn follow_the_workload(self: std::sync::Arc<Self>) {
        let me = self.cfg.node_id;
        // Since when this node leads each group, in which term.
        let mut leading: HashMap<u32, (u64, Instant)> = HashMap::new();
        let my_dc = self.cfg.nodes.iter().find(|n| n.id == me).map(|n| n.datacenter.clone());
        loop {
            tokio::time::sleep(PLAN_EVERY).await;
            let origins = self.origins.0.read().clone();
            let mut moves = Vec::new();
            for group in 1..=self.cfg.groups {
                let h = &self.handovers[group as usize];
                let counts: Vec<u32> =
                    h.requests.iter().map(|c| c.swap(0, Ordering::Relaxed)).collect();
                let Some(raft) = self.raft(group) else { continue };
                let (term, target) = {
                    let m = raft.metrics();
                    let m = m.borrow();
                    if m.current_leader != Some(me) {
                        leading.remove(&group);
                        continue;
                    }
                    let total: u32 = counts.iter().sum();
                    let (top, n) = counts
                        .iter()
                        .enumerate()
                        .max_by_key(|(_, n)| **n)
                        .map(|(i, n)| (i, *n))
                        .unwrap_or_default();
                    let dc = origins.get(top);
                    let membership = m.membership_config.membership();
                    let target = (total >= MIN_REQUESTS
                        && u64::from(n) * 4 >= u64::from(total) * 3
                        && dc.is_some()
                        && dc != my_dc.as_ref())
                    .then(|| {
                        membership.voter_ids().find(|v| {
                            membership.get_node(v).is_some_and(|m| Some(&m.datacenter) == dc)
                        })
                    })
                    .flatten();
                    (m.current_term, target)
                };
                let since = leading.entry(group).or_insert((term, Instant::now()));
                if since.0 != term {
                    *since = (term, Instant::now());
                }
                let Some(to) = target else { continue };
                let reachable =
                    self.transport.silent_for(to).is_some_and(|d| d < Duration::from_secs(1));
                if since.1.elapsed() >= SETTLED_FOR && reachable {
                    moves.push((group, to));
                }
            }
            if moves.is_empty() {
                continue;
            }
            tracing::info!(
                groups = moves.len(),
                "handing groups over to where their requests come from"
            );
            let all = moves.iter().map(|&(g, to)| self.hand_over(g, to));
            let _ = futures::future::join_all(all).await;
        }
    }
}

/// Polls `done` every millisecond for up to [`HAND_OVER_STEP`].
async fn until(done: impl Fn() -> bool, what: &str) -> Result<()> {
    let deadline = Instant::now() + HAND_OVER_STEP;
    while !done() {
        if Instant::now() >= deadline {
            return Err(Error::Unavailable(format!("hand-over: waited too long for {what}")));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}
