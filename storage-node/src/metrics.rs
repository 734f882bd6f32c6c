//! The storage node's metrics (`tern_storage_node_*`), served at `/metrics` when the node is
//! started with `--metrics-listen` (see `tern_common::metrics`); ARCHITECTURE.md lists them.
//!
//! Most values are read when scraped, from what the node keeps anyway: the chunk store's
//! checksum error and repair counters, the scrub's byte counter, each chunk group's openraft
//! metrics (role, term, log indexes, replication progress), the replacement progress, the
//! data directory's filesystem (`statvfs`). Nothing runs between scrapes for them.
//!
//! Counted as they happen, at the cost of a few atomic increments:
//! - block I/O served ([`IoMetrics`]: handles precomputed per operation, so the hot path
//!   never looks up labels);
//! - leader changes: one task per chunk group waits on openraft's server-metrics watch, which
//!   changes only with role, vote, leader or membership (never per write).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tern_common::metrics::Family;

use crate::replication::{Cluster, Member};
use crate::store::ChunkStore;

/// A voter whose node has not answered any Raft message for this long makes the groups this
/// node leads degraded (heartbeats go every 100 ms; elections start after 1.2-1.6 s of silence).
pub const PEER_SILENCE: Duration = Duration::from_secs(1);

/// The node's registry and the handles the data path counts with.
pub struct NodeMetrics {
    registry: Registry,
    io: Arc<IoMetrics>,
}

impl NodeMetrics {
    /// Registers every metric of the node. With a cluster, starts one task per chunk group
    /// counting leader changes (call from within the runtime).
    pub fn new(
        store: Arc<ChunkStore>,
        cluster: Option<Arc<Cluster>>,
        node_id: u64,
        datacenter: &str,
    ) -> Self {
        let registry = Registry::new();
        let built = (|| -> prometheus::Result<Arc<IoMetrics>> {
            let io = Arc::new(IoMetrics::new()?);
            io.register(&registry)?;
            let scraped = Scraped::new(store.clone(), cluster.clone(), node_id, datacenter)?;
            registry.register(Box::new(scraped))?;
            if let Some(c) = &cluster {
                let changes = IntCounter::new(
                    "tern_storage_node_raft_leader_changes_total",
                    "Times this node saw a chunk group's leader move to another node (its first \
                     leader after the node started is not counted).",
                )?;
                registry.register(Box::new(changes.clone()))?;
                count_leader_changes(c, changes);
            }
            Ok(io)
        })();
        // Names, help and labels are constants: the unit tests build every metric.
        let io = built.expect("storage node metrics are well-formed");
        Self { registry, io }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The handles the gRPC data path counts served I/O with.
    pub fn io(&self) -> Arc<IoMetrics> {
        self.io.clone()
    }
}

/// A block I/O operation of the `BlockIo` service (the `op` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOp {
    Read,
    Write,
    WriteZeroes,
    Trim,
    Flush,
    BlockStatus,
}

impl IoOp {
    pub const ALL: [IoOp; 6] =
        [IoOp::Read, IoOp::Write, IoOp::WriteZeroes, IoOp::Trim, IoOp::Flush, IoOp::BlockStatus];

    pub fn label(self) -> &'static str {
        match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::WriteZeroes => "write_zeroes",
            IoOp::Trim => "trim",
            IoOp::Flush => "flush",
            IoOp::BlockStatus => "block_status",
        }
    }
}

/// Block I/O served by this node's `BlockIo` service, per operation. **Hot path**: one to
/// three atomic increments per request, on handles resolved once here.
pub struct IoMetrics {
    ops_vec: IntCounterVec,
    errors_vec: IntCounterVec,
    bytes_vec: IntCounterVec,
    ops: [IntCounter; 6],
    errors: [IntCounter; 6],
    read_bytes: IntCounter,
    written_bytes: IntCounter,
    /// Data lanes open.
    pub(crate) lanes: IntGauge,
}

impl IoMetrics {
    /// The counters, not registered anywhere (tests; [`NodeMetrics::new`] registers them).
    pub fn new() -> prometheus::Result<Self> {
        let ops_vec = IntCounterVec::new(
            Opts::new(
                "tern_storage_node_io_ops_total",
                "Block I/O requests received by this node's BlockIo service, by operation.",
            ),
            &["op"],
        )?;
        let errors_vec = IntCounterVec::new(
            Opts::new(
                "tern_storage_node_io_errors_total",
                "Block I/O requests answered with an error, by operation (includes not-leader \
                 redirects and refusals during elections).",
            ),
            &["op"],
        )?;
        let bytes_vec = IntCounterVec::new(
            Opts::new(
                "tern_storage_node_io_bytes_total",
                "Bytes read and written by successful block I/O requests (op=read|write).",
            ),
            &["op"],
        )?;
        let lanes = IntGauge::new(
            "tern_storage_node_data_lanes",
            "Data lanes open: frontends' connections carrying block I/O.",
        )?;
        let per_op = |v: &IntCounterVec| IoOp::ALL.map(|op| v.with_label_values(&[op.label()]));
        Ok(Self {
            lanes,
            ops: per_op(&ops_vec),
            errors: per_op(&errors_vec),
            read_bytes: bytes_vec.with_label_values(&["read"]),
            written_bytes: bytes_vec.with_label_values(&["write"]),
            ops_vec,
            errors_vec,
            bytes_vec,
        })
    }

    fn register(&self, r: &Registry) -> prometheus::Result<()> {
        r.register(Box::new(self.ops_vec.clone()))?;
        r.register(Box::new(self.errors_vec.clone()))?;
        r.register(Box::new(self.bytes_vec.clone()))?;
        r.register(Box::new(self.lanes.clone()))
    }

    /// Counts one request: `bytes` of a successful read or write (0 otherwise).
    pub fn done(&self, op: IoOp, ok: bool, bytes: u64) {
        let i = op as usize;
        self.ops[i].inc();
        if !ok {
            self.errors[i].inc();
            return;
        }
        match op {
            IoOp::Read => self.read_bytes.inc_by(bytes),
            IoOp::Write => self.written_bytes.inc_by(bytes),
            _ => {}
        }
    }
}

/// A task per chunk group, woken by its server-metrics watch (role, vote, leader and
/// membership changes only), counting moves of the leader to another node.
fn count_leader_changes(cluster: &Cluster, counter: IntCounter) {
    for group in 0..=cluster.config().groups {
        let Some(raft) = cluster.raft(group) else { continue };
        let mut rx = raft.server_metrics();
        let counter = counter.clone();
        tokio::spawn(async move {
            let mut last = rx.borrow_and_update().current_leader;
            // Ends when the group's Raft stops (its sender is dropped).
            while rx.changed().await.is_ok() {
                let now = rx.borrow_and_update().current_leader;
                if leader_changed(last, now) {
                    counter.inc();
                }
                if now.is_some() {
                    last = now;
                }
            }
        });
    }
}

/// Whether a group's leader moved: a leader is known now, and it is not the last one known.
/// An election that ends with the same leader is not a change, nor is the first leader
/// learned after this node started.
fn leader_changed(last: Option<u64>, now: Option<u64>) -> bool {
    matches!((last, now), (Some(a), Some(b)) if a != b)
}

/// A chunk group's role on this node (the `role` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Leader,
    Follower,
    Learner,
    Candidate,
    /// The group's Raft stopped on a fatal error.
    Shutdown,
}

impl Role {
    const ALL: [Role; 5] =
        [Role::Leader, Role::Follower, Role::Learner, Role::Candidate, Role::Shutdown];

    fn of(s: ServerState) -> Self {
        match s {
            ServerState::Leader => Role::Leader,
            ServerState::Follower => Role::Follower,
            ServerState::Learner => Role::Learner,
            ServerState::Candidate => Role::Candidate,
            ServerState::Shutdown => Role::Shutdown,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Learner => "learner",
            Role::Candidate => "candidate",
            Role::Shutdown => "shutdown",
        }
    }
}

/// What the metrics say about one chunk group on this node.
#[derive(Debug, PartialEq, Eq)]
struct GroupView {
    role: Role,
    term: u64,
    /// Log entries this replica holds beyond the commit index it knows: on a leader, entries
    /// proposed but not yet on a quorum; on a follower, entries whose commit it has not heard
    /// of yet.
    commit_lag: u64,
    /// Committed entries not yet applied to the chunk store.
    apply_lag: u64,
    /// For a group this node leads: whether a voter is missing (see [`group_view`]).
    degraded: Option<bool>,
}

/// One group's view from its openraft metrics. `committed` is the commit index the log store
/// last heard of (none after a restart until the next commit: then the applied index, a lower
/// bound, stands in). A group this node leads is degraded when some other voter has not
/// answered for [`PEER_SILENCE`] (`silent`), has no matched log entry in this term, or is more
/// than `lag_limit` entries behind the leader's log (a replica that far behind needs the
/// group's state streamed).
fn group_view(
    m: &openraft::RaftMetrics<u64, Member>,
    committed: Option<u64>,
    lag_limit: u64,
    silent: impl Fn(u64) -> bool,
) -> GroupView {
    let applied = m.last_applied.map(|l| l.index);
    let known = match (committed, applied) {
        (Some(c), Some(a)) => Some(c.max(a)),
        (c, a) => c.or(a),
    };
    let behind = |index: Option<u64>, of: Option<u64>| match (index, of) {
        (_, None) => 0,
        (None, Some(of)) => of + 1,
        (Some(i), Some(of)) => of.saturating_sub(i),
    };
    let role = Role::of(m.state);
    let degraded = (role == Role::Leader).then(|| {
        let matched = m.replication.as_ref();
        m.membership_config.membership().voter_ids().filter(|&v| v != m.id).any(|v| {
            let at = matched.and_then(|r| r.get(&v).copied().flatten()).map(|l| l.index);
            silent(v) || at.is_none_or(|i| i + lag_limit < m.last_log_index.unwrap_or(0))
        })
    });
    GroupView {
        role,
        term: m.current_term,
        commit_lag: behind(known, m.last_log_index),
        apply_lag: behind(applied, known),
        degraded,
    }
}

/// Size of the filesystem holding a directory (`statvfs`), in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FsUsage {
    pub(crate) size: u64,
    free: u64,
    /// Free for unprivileged users (what the node can still write).
    pub(crate) available: u64,
}

pub(crate) fn fs_usage(dir: &Path) -> Option<FsUsage> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a valid NUL-terminated string and `st` points to writable memory
    // the size of a statvfs.
    let rc = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    let bytes = |blocks: libc::fsblkcnt_t| blocks.saturating_mul(st.f_frsize);
    Some(FsUsage {
        size: bytes(st.f_blocks),
        free: bytes(st.f_bfree),
        available: bytes(st.f_bavail),
    })
}

/// The families read at scrape time.
struct Scraped {
    store: Arc<ChunkStore>,
    cluster: Option<Arc<Cluster>>,
    data_dir: PathBuf,
    info_labels: [String; 3],
    info: Family,
    checksum_errors: Family,
    repairs: Family,
    prewrites: Family,
    scrubbed: Family,
    capacity: Family,
    full: Family,
    used: Family,
    available: Family,
    allocated: Family,
    volumes: Family,
    term: Family,
    commit_lag: Family,
    apply_lag: Family,
    groups: Family,
    health: Family,
    rebuild_active: Family,
    rebuild_done: Family,
    rebuild_planned: Family,
    snapshot_sent: Family,
    snapshot_received: Family,
    handovers: Family,
    linearizable_reads: Family,
}

impl Scraped {
    fn new(
        store: Arc<ChunkStore>,
        cluster: Option<Arc<Cluster>>,
        node_id: u64,
        datacenter: &str,
    ) -> prometheus::Result<Self> {
        let group = &["group"];
        Ok(Self {
            data_dir: store.data_dir().to_path_buf(),
            store,
            cluster,
            info_labels: [
                node_id.to_string(),
                datacenter.to_string(),
                env!("CARGO_PKG_VERSION").into(),
            ],
            info: Family::gauge(
                "tern_storage_node_info",
                "Always 1; the node's id, datacenter and version as labels.",
                &["node", "datacenter", "version"],
            )?,
            checksum_errors: Family::counter(
                "tern_storage_node_checksum_errors_total",
                "Blocks read whose crc32c did not match their block map entry (each failed \
                 the read, or was repaired from another replica).",
                &[],
            )?,
            repairs: Family::counter(
                "tern_storage_node_repairs_total",
                "Damaged blocks rewritten from another replica's copy.",
                &[],
            )?,
            prewrites: Family::counter(
                "tern_storage_node_prewrites_total",
                "Replicated writes whose data this node, as leader, wrote while their log \
                 entry replicated: applied (the entry's apply used it) or unused (the apply \
                 wrote the data itself, or the entry failed).",
                &["result"],
            )?,
            scrubbed: Family::counter(
                "tern_storage_node_scrubbed_bytes_total",
                "Bytes the background scrub has verified (cluster mode).",
                &[],
            )?,
            capacity: Family::gauge(
                "tern_storage_node_capacity_bytes",
                "Size of the filesystem holding the data directory.",
                &[],
            )?,
            full: Family::gauge(
                "tern_storage_node_full",
                "1 while writes are refused for want of space (this node's disk is beyond \
                 --full-ratio, or the volume manager says a node of the cluster is).",
                &[],
            )?,
            used: Family::gauge(
                "tern_storage_node_used_bytes",
                "Bytes in use on the filesystem holding the data directory (size - free).",
                &[],
            )?,
            available: Family::gauge(
                "tern_storage_node_available_bytes",
                "Bytes the node can still write on its data directory's filesystem.",
                &[],
            )?,
            allocated: Family::gauge(
                "tern_storage_node_allocated_bytes",
                "Bytes of volume data this node holds (4 KiB blocks with data, all volumes).",
                &[],
            )?,
            volumes: Family::gauge("tern_storage_node_volumes", "Volumes this node knows.", &[])?,
            term: Family::gauge(
                "tern_storage_node_raft_term",
                "Current Raft term of each chunk group's replica on this node (group 0 is the \
                 meta group).",
                group,
            )?,
            commit_lag: Family::gauge(
                "tern_storage_node_raft_commit_lag_entries",
                "Log entries a replica holds beyond the commit index it knows (on a leader: \
                 proposed, not yet on a quorum).",
                group,
            )?,
            apply_lag: Family::gauge(
                "tern_storage_node_raft_apply_lag_entries",
                "Committed log entries not yet applied to this node's chunk store.",
                group,
            )?,
            groups: Family::gauge(
                "tern_storage_node_groups",
                "Chunk groups (the meta group included) by this node's role in them.",
                &["role"],
            )?,
            health: Family::gauge(
                "tern_storage_node_groups_by_health",
                "Chunk groups this node leads, by health: degraded when another voter has not \
                 answered for a second, has no matched entry, or is a snapshot interval behind.",
                &["health"],
            )?,
            rebuild_active: Family::gauge(
                "tern_storage_node_rebuild_active",
                "1 while a node replacement driven from this node is under way.",
                &[],
            )?,
            rebuild_done: Family::gauge(
                "tern_storage_node_rebuild_groups_done",
                "Chunk groups moved to the new node by the last replacement driven from here.",
                &[],
            )?,
            rebuild_planned: Family::gauge(
                "tern_storage_node_rebuild_groups_planned",
                "Chunk groups the last replacement driven from here moves in all (0: none yet).",
                &[],
            )?,
            snapshot_sent: Family::counter(
                "tern_storage_node_snapshot_sent_bytes_total",
                "Chunk group state streamed to replicas that fell behind the log (catch-up \
                 and rebuild).",
                &[],
            )?,
            snapshot_received: Family::counter(
                "tern_storage_node_snapshot_received_bytes_total",
                "Chunk group state received from a leader (catch-up and rebuild).",
                &[],
            )?,
            handovers: Family::counter(
                "tern_storage_node_leader_handovers_total",
                "Group leaderships this node handed to a replica in the datacenter its \
                 requests come from, by result.",
                &["result"],
            )?,
            linearizable_reads: Family::counter(
                "tern_storage_node_linearizable_reads_total",
                "Replicated reads this node served as leader, by how it knew it still led: \
                 its lease (no round trip) or a quorum confirming it.",
                &["by"],
            )?,
        })
    }

    fn all(&self) -> [&Family; 23] {
        [
            &self.info,
            &self.checksum_errors,
            &self.repairs,
            &self.prewrites,
            &self.scrubbed,
            &self.capacity,
            &self.full,
            &self.used,
            &self.available,
            &self.allocated,
            &self.volumes,
            &self.term,
            &self.commit_lag,
            &self.apply_lag,
            &self.groups,
            &self.health,
            &self.rebuild_active,
            &self.rebuild_done,
            &self.rebuild_planned,
            &self.snapshot_sent,
            &self.snapshot_received,
            &self.handovers,
            &self.linearizable_reads,
        ]
    }

    fn cluster_families(&self, c: &Cluster, out: &mut Vec<MetricFamily>) {
        let lag_limit = c.config().snapshot_every.max(1);
        let transport = c.transport();
        let silent = |node: u64| transport.silent_for(node).is_none_or(|d| d >= PEER_SILENCE);
        let mut per_group: Vec<(String, GroupView)> = Vec::new();
        let mut roles = [0u64; Role::ALL.len()];
        let (mut healthy, mut degraded) = (0u64, 0u64);
        for group in 0..=c.config().groups {
            let Some(raft) = c.raft(group) else { continue };
            if !c.holds(group) {
                // Placed on other nodes: its Raft instance here stays idle.
                continue;
            }
            let view = {
                let m = raft.metrics();
                let m = m.borrow();
                group_view(&m, c.committed_index(group), lag_limit, silent)
            };
            roles[view.role as usize] += 1;
            match view.degraded {
                Some(true) => degraded += 1,
                Some(false) => healthy += 1,
                None => {}
            }
            per_group.push((group.to_string(), view));
        }
        let by_group = |f: fn(&GroupView) -> u64| {
            per_group.iter().map(move |(g, v)| ([g.as_str()], f(v) as f64))
        };
        out.push(self.term.collect(by_group(|v| v.term)));
        out.push(self.commit_lag.collect(by_group(|v| v.commit_lag)));
        out.push(self.apply_lag.collect(by_group(|v| v.apply_lag)));
        out.push(self.groups.collect(Role::ALL.map(|r| ([r.label()], roles[r as usize] as f64))));
        out.push(
            self.health.collect([(["healthy"], healthy as f64), (["degraded"], degraded as f64)]),
        );
        let r = c.replacement();
        let active = r.as_ref().is_some_and(|r| r.finished.is_none());
        out.push(self.rebuild_active.single(if active { 1.0 } else { 0.0 }));
        out.push(self.rebuild_done.single(r.as_ref().map_or(0, |r| r.done) as f64));
        out.push(self.rebuild_planned.single(r.as_ref().map_or(0, |r| r.total) as f64));
        out.push(self.scrubbed.single(load(&c.scrubbed) as f64));
        out.push(self.snapshot_sent.single(load(&transport.snapshot_sent_bytes) as f64));
        out.push(self.snapshot_received.single(load(&transport.snapshot_received_bytes) as f64));
        let l = &c.leadership;
        out.push(self.handovers.collect([
            (["done"], load(&l.handovers_done) as f64),
            (["failed"], load(&l.handovers_failed) as f64),
        ]));
        out.push(self.linearizable_reads.collect([
            (["lease"], load(&l.reads_on_lease) as f64),
            (["quorum"], load(&l.reads_confirmed) as f64),
        ]));
    }
}

fn load(a: &std::sync::atomic::AtomicU64) -> u64 {
    a.load(std::sync::atomic::Ordering::Relaxed)
}

impl Collector for Scraped {
    fn desc(&self) -> Vec<&Desc> {
        self.all().into_iter().map(Family::desc).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut out = Vec::with_capacity(self.all().len());
        let [node, dc, version] = &self.info_labels;
        out.push(self.info.collect([([node.as_str(), dc.as_str(), version.as_str()], 1.0)]));
        out.push(self.checksum_errors.single(self.store.checksum_errors() as f64));
        out.push(self.repairs.single(self.store.repairs() as f64));
        let (applied, unused) = self.store.prewrites();
        out.push(
            self.prewrites.collect([(["applied"], applied as f64), (["unused"], unused as f64)]),
        );
        let volumes = self.store.list();
        out.push(self.volumes.single(volumes.len() as f64));
        let allocated: u64 = volumes.iter().map(|v| v.allocated_bytes()).sum();
        out.push(self.allocated.single(allocated as f64));
        // A filesystem that cannot be asked (the directory vanished) leaves its gauges out
        // rather than reporting a full or empty disk.
        out.push(self.full.single(f64::from(u8::from(self.store.fullness.refusing()))));
        if let Some(fs) = fs_usage(&self.data_dir) {
            out.push(self.capacity.single(fs.size as f64));
            out.push(self.used.single(fs.size.saturating_sub(fs.free) as f64));
            out.push(self.available.single(fs.available as f64));
        }
        if let Some(c) = &self.cluster {
            self.cluster_families(c, &mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use openraft::{CommittedLeaderId, LogId, Membership, StoredMembership};

    use super::*;

    fn log_id(index: u64) -> LogId<u64> {
        LogId::new(CommittedLeaderId::new(3, 1), index)
    }

    /// Node 1's metrics of a group of voters 1, 2, 3.
    fn metrics(state: ServerState) -> openraft::RaftMetrics<u64, Member> {
        let mut m = openraft::RaftMetrics::new_initial(1);
        m.state = state;
        m.current_term = 3;
        m.last_log_index = Some(100);
        m.last_applied = Some(log_id(90));
        let voters: BTreeSet<u64> = [1, 2, 3].into();
        let nodes: BTreeMap<u64, Member> = voters.iter().map(|&v| (v, Member::default())).collect();
        m.membership_config =
            Arc::new(StoredMembership::new(Some(log_id(1)), Membership::new(vec![voters], nodes)));
        m
    }

    #[test]
    fn lags_use_the_commit_index_or_fall_back_to_applied() {
        let m = metrics(ServerState::Follower);
        let v = group_view(&m, Some(95), 1024, |_| false);
        assert_eq!((v.role, v.term, v.commit_lag, v.apply_lag), (Role::Follower, 3, 5, 5));
        assert_eq!(v.degraded, None, "only leaders judge health");
        // No commit heard of since the restart: applied stands in.
        let v = group_view(&m, None, 1024, |_| false);
        assert_eq!((v.commit_lag, v.apply_lag), (10, 0));
        // An empty log: no lag.
        let mut empty = metrics(ServerState::Learner);
        empty.last_log_index = None;
        empty.last_applied = None;
        let v = group_view(&empty, None, 1024, |_| false);
        assert_eq!((v.role, v.commit_lag, v.apply_lag), (Role::Learner, 0, 0));
        // Index 0 holds an entry: a log of one uncommitted entry lags by one.
        empty.last_log_index = Some(0);
        assert_eq!(group_view(&empty, None, 1024, |_| false).commit_lag, 1);
    }

    #[test]
    fn a_leader_is_degraded_when_a_voter_is_silent_unmatched_or_far_behind() {
        let mut m = metrics(ServerState::Leader);
        m.replication =
            Some([(1, Some(log_id(100))), (2, Some(log_id(99))), (3, Some(log_id(98)))].into());
        assert_eq!(group_view(&m, Some(99), 10, |_| false).degraded, Some(false));
        // A voter silent on the transport (down, frozen, partitioned).
        assert_eq!(group_view(&m, Some(99), 10, |n| n == 3).degraded, Some(true));
        // The leader's own silence is meaningless.
        assert_eq!(group_view(&m, Some(99), 10, |n| n == 1).degraded, Some(false));
        // Far behind.
        m.replication.as_mut().unwrap().insert(3, Some(log_id(80)));
        assert_eq!(group_view(&m, Some(99), 10, |_| false).degraded, Some(true));
        // Never matched in this term.
        m.replication.as_mut().unwrap().insert(3, None);
        assert_eq!(group_view(&m, Some(99), 10, |_| false).degraded, Some(true));
        m.replication.as_mut().unwrap().remove(&3);
        assert_eq!(group_view(&m, Some(99), 10, |_| false).degraded, Some(true));
    }

    #[test]
    fn leader_changes_count_moves_only() {
        assert!(!leader_changed(None, Some(1)), "the first leader learned");
        assert!(!leader_changed(Some(1), None), "an election under way");
        assert!(!leader_changed(Some(1), Some(1)), "re-elected");
        assert!(leader_changed(Some(1), Some(2)));
    }

    #[test]
    fn io_counters_count_per_operation() {
        let io = IoMetrics::new().unwrap();
        io.done(IoOp::Write, true, 4096);
        io.done(IoOp::Write, false, 4096);
        io.done(IoOp::Read, true, 512);
        io.done(IoOp::Flush, true, 0);
        assert_eq!(io.ops_vec.with_label_values(&["write"]).get(), 2);
        assert_eq!(io.errors_vec.with_label_values(&["write"]).get(), 1);
        assert_eq!(io.bytes_vec.with_label_values(&["write"]).get(), 4096);
        assert_eq!(io.bytes_vec.with_label_values(&["read"]).get(), 512);
        assert_eq!(io.ops_vec.with_label_values(&["flush"]).get(), 1);
        assert_eq!(io.ops_vec.with_label_values(&["trim"]).get(), 0);
    }

    #[test]
    fn the_filesystem_of_a_directory_is_measured() {
        let fs = fs_usage(Path::new("/")).expect("statvfs of /");
        assert!(fs.size > 0 && fs.free <= fs.size && fs.available <= fs.free, "{fs:?}");
        assert_eq!(fs_usage(Path::new("/nonexistent/tern")), None);
    }

    #[tokio::test]
    async fn a_single_node_exports_what_applies() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open_for_test(dir.path());
        let m = NodeMetrics::new(store, None, 7, "dc9");
        m.io().done(IoOp::Write, true, 8192);
        let text = String::from_utf8(tern_common::metrics::encode(m.registry()).unwrap()).unwrap();
        for want in [
            "tern_storage_node_info{node=\"7\",datacenter=\"dc9\",version=\"",
            "tern_storage_node_checksum_errors_total 0\n",
            "tern_storage_node_repairs_total 0\n",
            "tern_storage_node_volumes 0\n",
            "tern_storage_node_io_ops_total{op=\"write\"} 1\n",
            "tern_storage_node_io_bytes_total{op=\"write\"} 8192\n",
            "# TYPE tern_storage_node_capacity_bytes gauge\n",
        ] {
            assert!(text.contains(want), "{want:?} missing from\n{text}");
        }
        assert!(!text.contains("tern_storage_node_raft_term"), "no Raft without a cluster");
    }
}
