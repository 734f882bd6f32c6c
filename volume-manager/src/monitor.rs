//! The leader's watch over storage node heartbeats: a node not heard from for `down_after`
//! is marked down (through the log, so every replica agrees); its next heartbeat marks it up.
//! Heartbeat times are the leader's own (not replicated): a new leader gives every node
//! `down_after` from the moment it took the lead. [`keep_cluster_whole`] moves the replicas of
//! a drained or lost member to a spare node.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::service::Manager;
use crate::state::{Cmd, Move, MoveReason, NodeState};
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

/// How the leader keeps the storage cluster whole: a member that is draining, or down for
/// longer than `replace_after`, has its replicas moved to a spare node of its datacenter (a
/// registered node that is up and not a member; the one with the most free space), one node
/// at a time. The move itself is the
/// storage cluster's node replacement (`Cluster.ReplaceNode`), driven by the live member with
/// the lowest id; the leader asks again every second (which resumes it wherever it stopped,
/// also after a manager or storage node failover) until it is finished, then records the
/// spare as a member.
pub async fn keep_cluster_whole(m: Arc<Manager>, replace_after: Duration) {
    let mut down_since: std::collections::HashMap<u64, Instant> = Default::default();
    let mut said_no_spare: Option<u64> = None;
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
        let Some((old, reason)) = wanted else { continue };
        // The spare with the most free space (as its heartbeats tell), then the lowest id.
        let spare = {
            let seen = m.seen.lock();
            let free = |id: u64| seen.get(&id).map_or(0, |s| s.capacity.saturating_sub(s.used));
            nodes
                .values()
                .filter(|n| {
                    n.datacenter == old.datacenter
                        && n.state == NodeState::Up
                        && !cluster.members.contains(&n.id)
                })
                .map(|n| (std::cmp::Reverse(free(n.id)), n.id))
                .min()
                .map(|(_, id)| id)
        };
        let Some(new) = spare else {
            if said_no_spare != Some(old.id) {
                tracing::warn!(
                    node = old.id,
                    datacenter = %old.datacenter,
                    ?reason,
                    "a node's replicas should move, but its datacenter has no spare node up"
                );
                said_no_spare = Some(old.id);
            }
            continue;
        };
        said_no_spare = None;
        let mv = Move { old: old.id, new, reason, started_at: crate::service::now_secs() };
        tracing::info!(old = old.id, new, ?reason, "moving a node's replicas to a spare");
        if let Err(e) = m.propose(Cmd::StartMove(mv)).await {
            tracing::warn!("starting a node move: {}", e.message());
        }
    }
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
            Ok(r) if r.old == mv.old && r.new == mv.new && r.finished => {
                tracing::info!(old = mv.old, new = mv.new, secs = r.seconds, "node move finished");
                if let Err(e) = m.propose(Cmd::FinishMove { old: mv.old, new: mv.new }).await {
                    tracing::warn!("finishing a node move: {}", e.message());
                }
                return;
            }
            Ok(r) if r.old == mv.old && r.new == mv.new && r.active => return,
            Ok(_) => {}
            Err(s) => {
                tracing::debug!(driver = d.id, "node move progress: {}", s.message());
                continue;
            }
        }
        match storage::replace_node(&d.address, mv.old, new_info.clone()).await {
            Ok(_) => return,
            Err(s) => tracing::warn!(driver = d.id, "node move: {}", s.message()),
        }
    }
}
