//! The manager's Prometheus metrics (`--metrics-listen`), all read when scraped from the Raft
//! metrics and the replicated state: nothing is counted on a hot path. Only the leader knows
//! heartbeats, so capacity is reported by the leader alone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::Registry;
use tern_common::metrics::Family;

use crate::service::Manager;
use crate::state::NodeState;

struct Scraped {
    m: Arc<Manager>,
    leader_changes: Arc<AtomicU64>,
    is_leader: Family,
    term: Family,
    leader_changes_f: Family,
    applied: Family,
    nodes: Family,
    volumes: Family,
    attachments: Family,
    capacity: Family,
    used: Family,
}

impl Scraped {
    fn all(&self) -> [&Family; 9] {
        [
            &self.is_leader,
            &self.term,
            &self.leader_changes_f,
            &self.applied,
            &self.nodes,
            &self.volumes,
            &self.attachments,
            &self.capacity,
            &self.used,
        ]
    }
}

impl Collector for Scraped {
    fn desc(&self) -> Vec<&Desc> {
        self.all().into_iter().map(Family::desc).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let r = self.m.raft.metrics().borrow().clone();
        let leads = r.current_leader == Some(self.m.id);
        let mut out = vec![
            self.is_leader.single(if leads { 1.0 } else { 0.0 }),
            self.term.single(r.current_term as f64),
            self.leader_changes_f.single(self.leader_changes.load(Ordering::Relaxed) as f64),
            self.applied.single(r.last_applied.map_or(0, |l| l.index) as f64),
        ];
        let (by_state, volumes, attachments) = {
            let st = self.m.state.read();
            let mut by_state = [0u64; 4];
            for n in st.nodes.values() {
                by_state[n.state as usize] += 1;
            }
            (by_state, st.volumes.len(), st.attachments.len())
        };
        let states = [
            (NodeState::Up, "up"),
            (NodeState::Down, "down"),
            (NodeState::Draining, "draining"),
            (NodeState::Removed, "removed"),
        ];
        out.push(
            self.nodes
                .collect(states.iter().map(|(s, name)| ([*name], by_state[*s as usize] as f64))),
        );
        out.push(self.volumes.single(volumes as f64));
        out.push(self.attachments.single(attachments as f64));
        if leads {
            let seen = self.m.seen.lock();
            out.push(self.capacity.single(seen.values().map(|s| s.capacity).sum::<u64>() as f64));
            out.push(self.used.single(seen.values().map(|s| s.used).sum::<u64>() as f64));
        }
        out
    }
}

/// Registers the manager's metrics and starts counting leader changes.
pub fn registry(m: Arc<Manager>) -> prometheus::Result<Registry> {
    let leader_changes = Arc::new(AtomicU64::new(0));
    let counter = leader_changes.clone();
    let mut watch = m.raft.metrics();
    tokio::spawn(async move {
        let mut last = watch.borrow().current_leader;
        while watch.changed().await.is_ok() {
            let now = watch.borrow().current_leader;
            if now.is_some() && now != last {
                if last.is_some() {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                last = now;
            }
        }
    });
    let s = Scraped {
        m,
        leader_changes,
        is_leader: Family::gauge(
            "tern_manager_is_leader",
            "1 if this replica leads the managers' Raft group.",
            &[],
        )?,
        term: Family::gauge("tern_manager_raft_term", "The managers' Raft term seen here.", &[])?,
        leader_changes_f: Family::counter(
            "tern_manager_leader_changes_total",
            "Times the leading manager changed to another replica, as seen here.",
            &[],
        )?,
        applied: Family::gauge(
            "tern_manager_raft_applied_index",
            "Index of the last log entry this replica applied.",
            &[],
        )?,
        nodes: Family::gauge(
            "tern_manager_nodes",
            "Registered storage nodes by state.",
            &["state"],
        )?,
        volumes: Family::gauge("tern_manager_volumes", "Volumes.", &[])?,
        attachments: Family::gauge("tern_manager_attachments", "Attached volumes.", &[])?,
        capacity: Family::gauge(
            "tern_manager_capacity_bytes",
            "Filesystem bytes of the storage nodes heard from (leader only).",
            &[],
        )?,
        used: Family::gauge(
            "tern_manager_used_bytes",
            "Bytes of volume data the storage nodes hold (leader only).",
            &[],
        )?,
    };
    let r = Registry::new();
    r.register(Box::new(s))?;
    Ok(r)
}
