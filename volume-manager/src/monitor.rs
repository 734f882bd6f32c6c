//! The leader's watch over storage node heartbeats: a node not heard from for `down_after`
//! is marked down (through the log, so every replica agrees); its next heartbeat marks it up.
//! Heartbeat times are the leader's own (not replicated): a new leader gives every node
//! `down_after` from the moment it took the lead.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::service::Manager;
use crate::state::{Cmd, NodeState};

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
