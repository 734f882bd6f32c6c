//! The leader's watch over storage node heartbeats: a node not heard from for `down_after`
//! is marked down (through the log, so every replica agrees); its next heartbeat marks it up.
//! Heartbeat times are the leader's own (not replicated): a new leader gives every node
//! `down_after` from the moment it took the lead. [`keep_cluster_whole`] moves the replicas of
//! a drained or lost member to another node of its datacenter, and rebalances.

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use tern_common::placement::{pick_target, replicas_held, Candidate};

use crate::service::{now_secs, Manager};
use crate::state::{Cmd, Move, MoveReason, NodeState, StorageCluster};
use crate::storage;

pub async fn watch_nodes(m: Arc<Manager>, down_after: Duration) {
    let mut leading_since: Option<Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let leads = m.raft.metrics().borrow().current_leader == Some(m.id);
        if !leads {
            if leading_since.take().is_some() {
                m.seen.lock().clear();
            }
            continue;
        }
        let since = *leading_since.get_or_insert_with(Instant::now);
        let silent: Vec<u64> = {
            let seen = m.seen.lock();
            let st = m.state.read();
            st.nodes
                .values()
                .filter(|n| n.state == NodeState::Up)
                .filter(|n| {
                    let last = seen.get(&n.id).map_or(since, |s| s.at.max(since));
                    last.elapsed() > down_after
                })
                .map(|n| n.id)
                .collect()
        };
        for id in silent {
            tracing::warn!(node = id, ?down_after, "storage node silent: marking it down");
            if let Err(e) = m.propose(Cmd::SetNodeState { id, state: NodeState::Down }).await {
                tracing::warn!(node = id, "marking a node down: {}", e.message());
            }
        }
    }
}

/// The leader finishes snapshot creations that a failure interrupted (a
/// manager killed half-way, a storage node that did not answer), every few seconds.
pub async fn finish_snapshots(m: Arc<Manager>) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if m.raft.metrics().borrow().current_leader == Some(m.id) {
            m.finish_interrupted_snapshots().await;
        }
    }
}

/// The leader tells the chunk groups of recorded snapshot deletions in batches: woken by
/// each recorded deletion (and every few seconds, for ones recorded under an earlier leader),
/// then resting `DELETE_GAP`, so the deletions that queue up meanwhile go together. Deleting
/// a thousand snapshots back to back then costs each chunk group a few dozen log entries, not
/// a thousand durable ones that client writes queue behind.
pub async fn delete_snapshots(m: Arc<Manager>) {
    const DELETE_GAP: Duration = Duration::from_millis(500);
    loop {
        let _ = tokio::time::timeout(Duration::from_secs(2), m.deletions.notified()).await;
        if m.raft.metrics().borrow().current_leader == Some(m.id) {
            m.finish_deletions().await;
        }
        tokio::time::sleep(DELETE_GAP).await;
    }
}

/// How the leader keeps the storage cluster whole and balanced, one move at a time:
/// - a member that is draining, or down for longer than `replace_after`, has all its replicas
///   moved to the node of its datacenter that should take them (up, not draining; a spare or
///   another member; the most free space per replica held, as heartbeats tell);
/// - otherwise, in a datacenter whose nodes hold uneven shares (a node joined, or has more
///   room), groups move from the fullest node to the emptiest until the shares are even
///   (`rebalance`), while every member is up.
///
/// A move is the storage cluster's node replacement (`Cluster.ReplaceNode`, for some or all
/// groups), driven by the live member with the lowest id; the leader asks again every second
/// (which resumes it wherever it stopped, also after a manager or storage node failover)
/// until it is finished, then records the new placement (`FinishMove`).
pub async fn keep_cluster_whole(m: Arc<Manager>, replace_after: Duration) {
    let mut down_since: std::collections::HashMap<u64, Instant> = Default::default();
    let mut said_no_target: Option<u64> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if m.raft.metrics().borrow().current_leader != Some(m.id) {
            down_since.clear();
            continue;
        }
        let (cluster, moving, nodes) = {
            let st = m.state.read();
            (st.cluster.clone(), st.moving.clone(), st.nodes.clone())
        };
        let Some(cluster) = cluster else { continue };
        for id in &cluster.members {
            match nodes.get(id).map(|n| n.state) {
                Some(NodeState::Down) => {
                    down_since.entry(*id).or_insert_with(Instant::now);
                }
                _ => {
                    down_since.remove(id);
                }
            }
        }
        if let Some(mv) = moving {
            drive_move(&m, &cluster.members, &nodes, &mv).await;
            continue;
        }
        // Free space picks where a lost node's replicas go. Rebalancing weighs by capacity:
        // the moves themselves change free space (by the data moved, and a retired replica
        // frees its space only later), so weighing by it would move groups back and forth.
        let (free, capacity): (BTreeMap<u64, u64>, BTreeMap<u64, u64>) = {
            let seen = m.seen.lock();
            (
                seen.iter().map(|(id, s)| (*id, s.free())).collect(),
                seen.iter().map(|(id, s)| (*id, s.capacity)).collect(),
            )
        };
        let candidates_by = |dc: &str, not: u64, room: &BTreeMap<u64, u64>| -> Vec<Candidate> {
            nodes
                .values()
                .filter(|n| n.datacenter == dc && n.state == NodeState::Up && n.id != not)
                .map(|n| Candidate {
                    id: n.id,
                    datacenter: n.datacenter.clone(),
                    free_bytes: room.get(&n.id).copied().unwrap_or(0),
                })
                .collect()
        };
        let candidates = |dc: &str, not: u64| candidates_by(dc, not, &free);
        let wanted = cluster.members.iter().find_map(|id| {
            let n = nodes.get(id)?;
            match n.state {
                NodeState::Draining => Some((n, MoveReason::Drain)),
                NodeState::Down
                    if !replace_after.is_zero()
                        && down_since.get(id).is_some_and(|t| t.elapsed() > replace_after) =>
                {
                    Some((n, MoveReason::Down))
                }
                _ => None,
            }
        });
        let mv = if let Some((old, reason)) = wanted {
            let held = replicas_held(&cluster.placement);
            let Some(new) = pick_target(&candidates(&old.datacenter, old.id), &held) else {
                if said_no_target != Some(old.id) {
                    tracing::warn!(
                        node = old.id,
                        datacenter = %old.datacenter,
                        ?reason,
                        "a node's replicas should move, but its datacenter has no other node up"
                    );
                    said_no_target = Some(old.id);
                }
                continue;
            };
            said_no_target = None;
            Move { old: old.id, new, reason, started_at: now_secs(), groups: Vec::new() }
        } else {
            let all_up = cluster
                .members
                .iter()
                .all(|id| nodes.get(id).is_some_and(|n| n.state == NodeState::Up));
            if !all_up {
                continue;
            }
            let dcs: std::collections::BTreeSet<&str> =
                nodes.values().map(|n| n.datacenter.as_str()).collect();
            let step = dcs
                .into_iter()
                .find_map(|dc| rebalance(&cluster, &candidates_by(dc, 0, &capacity)));
            let Some((old, new, groups)) = step else { continue };
            Move { old, new, reason: MoveReason::Rebalance, started_at: now_secs(), groups }
        };
        tracing::info!(old = mv.old, new = mv.new, reason = ?mv.reason, groups = ?mv.groups, "moving replicas");
        if let Err(e) = m.propose(Cmd::StartMove(mv)).await {
            tracing::warn!("starting a move: {}", e.message());
        }
    }
}

/// One rebalancing step among `nodes` (the nodes up in one datacenter, `free_bytes` being
/// the room they weigh by: their capacity): the groups that should move from the node with
/// the most replicas per byte of room to the one with the fewest,
/// so that neither ends up fuller than the other was; `None` when the shares are even.
pub fn rebalance(cluster: &StorageCluster, nodes: &[Candidate]) -> Option<(u64, u64, Vec<u32>)> {
    if nodes.len() < 2 {
        return None;
    }
    let held = replicas_held(&cluster.placement);
    let h = |id: u64| held.get(&id).copied().unwrap_or(0);
    let target = pick_target(nodes, &held)?;
    let f =
        |id: u64| u128::from(nodes.iter().find(|n| n.id == id).map_or(0, |n| n.free_bytes).max(1));
    // The donor: the most replicas per free byte (h_a / f_a > h_b / f_b), the lower id first.
    let donor = nodes
        .iter()
        .map(|n| n.id)
        .filter(|&id| id != target && h(id) > 0)
        .reduce(|a, b| if u128::from(h(b)) * f(a) > u128::from(h(a)) * f(b) { b } else { a })?;
    // The most k with (h_t + k) / f_t <= (h_d - k) / f_d.
    let (ht, hd, ft, fd) = (u128::from(h(target)), u128::from(h(donor)), f(target), f(donor));
    let k = (hd * ft).saturating_sub(ht * fd) / (ft + fd);
    if k == 0 {
        return None;
    }
    // Data groups only, from the highest: the meta group stays (a node that leaves its
    // voters would have to stay a learner; it moves only with a whole node).
    let mut groups = cluster.groups_of(donor);
    groups.retain(|&g| g != 0);
    groups.sort_by_key(|&g| std::cmp::Reverse(g));
    groups.truncate(k as usize);
    if groups.is_empty() {
        return None;
    }
    Some((donor, target, groups))
}
/// One step of a move: (re)start it on the driving member and finish it once it is done.
async fn drive_move(
    m: &Manager,
    members: &[u64],
    nodes: &std::collections::BTreeMap<u64, crate::state::NodeRecord>,
    mv: &Move,
) {
    let Some(new) = nodes.get(&mv.new) else { return };
    let new_info = tern_proto::v1::NodeInfo {
        id: new.id,
        address: new.address.clone(),
        datacenter: new.datacenter.clone(),
    };
    // The driver: the live member with the lowest id (stable, so one node drives).
    let drivers: Vec<&crate::state::NodeRecord> = members
        .iter()
        .filter(|id| **id != mv.old)
        .filter_map(|id| nodes.get(id))
        .filter(|n| matches!(n.state, NodeState::Up | NodeState::Draining))
        .collect();
    for d in drivers {
        // Its progress first: asking it to replace again after it finished would start over
        // (quickly: moved groups are skipped, but it would never be seen finished).
        match storage::replacement(&d.address).await {
            Ok(r) if r.old == mv.old && r.new == mv.new && r.groups == mv.groups && r.finished => {
                tracing::info!(old = mv.old, new = mv.new, secs = r.seconds, "node move finished");
                if let Err(e) = m.propose(Cmd::FinishMove { old: mv.old, new: mv.new }).await {
                    tracing::warn!("finishing a node move: {}", e.message());
                }
                return;
            }
            Ok(r) if r.old == mv.old && r.new == mv.new && r.groups == mv.groups && r.active => {
                return
            }
            Ok(_) => {}
            Err(s) => {
                tracing::debug!(driver = d.id, "node move progress: {}", s.message());
                continue;
            }
        }
        match storage::replace_node(&d.address, mv.old, new_info.clone(), mv.groups.clone()).await {
            Ok(_) => return,
            Err(s) => tracing::warn!(driver = d.id, "node move: {}", s.message()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64, free: u64) -> Candidate {
        Candidate { id, datacenter: "dc3".into(), free_bytes: free }
    }

    fn cluster(placement: Vec<Vec<u64>>) -> StorageCluster {
        StorageCluster { members: vec![1, 2, 3], groups: placement.len() as u32 - 1, placement }
    }

    #[test]
    fn a_joining_node_takes_half_of_its_datacenters_groups() {
        // Node 3 holds all nine groups of dc3; node 4 joins.
        let c = cluster(vec![vec![1, 2, 3]; 9]);
        let (old, new, groups) = rebalance(&c, &[node(3, 100), node(4, 100)]).unwrap();
        assert_eq!((old, new), (3, 4));
        assert_eq!(groups, vec![8, 7, 6, 5], "data groups first, the highest first");
        // Once even (within one), nothing moves.
        let mut after = c.clone();
        for g in &groups {
            after.placement[*g as usize] = vec![1, 2, 4];
        }
        assert_eq!(rebalance(&after, &[node(3, 100), node(4, 100)]), None);
        assert_eq!(rebalance(&c, &[node(3, 100)]), None, "one node alone");
    }

    #[test]
    fn free_space_sets_the_shares() {
        // Node 4 has three times node 3's room: it should end up with three quarters.
        let c = cluster(vec![vec![1, 2, 3]; 8]);
        let (_, new, groups) = rebalance(&c, &[node(3, 100), node(4, 300)]).unwrap();
        assert_eq!((new, groups.len()), (4, 6));
        assert_eq!(groups.last(), Some(&2), "never the meta group");
    }
}
