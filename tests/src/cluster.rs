//! A replicated deployment for tests: three storage nodes, one per datacenter, each on its own
//! loopback range (datacenter N on 127.0.N.x), and an NBD frontend in datacenter 1. Every
//! daemon is a real process; faults are real: `kill -9`, SIGSTOP/SIGCONT, and network
//! partitions through the nodes' fault switch (`--fault-injection`).

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use tern_proto::v1;

use crate::{bin, log_tails, run, spawn_daemon, test_root, text};

pub struct Node {
    pub id: u64,
    pub addr: SocketAddr,
    pub datacenter: String,
    /// Where the node serves `/metrics` (clusters started with metrics only).
    pub metrics_addr: Option<SocketAddr>,
    /// More flags for this node alone, from its next start on.
    pub extra_args: Vec<String>,
    child: Option<Child>,
    stopped: bool,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
    pub nbd_addr: SocketAddr,
    frontend: Option<Child>,
    /// Frontends started with [`Self::start_another_frontend`].
    others: Vec<Child>,
    groups: u32,
    node_args: Vec<String>,
    /// Where the frontend serves `/metrics` (clusters started with metrics only).
    pub frontend_metrics: Option<SocketAddr>,
    /// Nodes take their membership from these volume managers (no `--cluster`).
    managers: Option<String>,
}

/// A free port on `ip`.
fn free_port_on(ip: &str) -> u16 {
    TcpListener::bind(format!("{ip}:0")).unwrap().local_addr().unwrap().port()
}

/// A free address on `ip`, if `wanted`.
fn metrics_addr_on(ip: &str, wanted: bool) -> Option<SocketAddr> {
    wanted.then(|| format!("{ip}:{}", free_port_on(ip)).parse().unwrap())
}

/// Runs one gRPC call on a throwaway runtime.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

impl Cluster {
    /// Three nodes with `groups` data chunk groups, and a frontend.
    pub fn start(groups: u32) -> Self {
        Self::start_with(groups, &[])
    }

    /// As [`Self::start`], with extra flags for every storage node.
    pub fn start_with(groups: u32, node_args: &[&str]) -> Self {
        Self::launch(groups, node_args, false)
    }

    /// As [`Self::start`], every daemon serving its metrics (`--metrics-listen`) on a port of
    /// its own address: see [`Node::metrics_addr`], [`Self::frontend_metrics`] and
    /// [`Self::metrics_targets`].
    pub fn start_with_metrics(groups: u32) -> Self {
        Self::launch(groups, &[], true)
    }

    /// Three nodes that register with the volume managers at `managers` (HOST:PORT,...) and
    /// take their membership from them (the managers' `--groups` must be `groups`), and a
    /// frontend.
    pub fn start_managed(groups: u32, managers: &str) -> Self {
        Self::launch_with(groups, &[], false, Some(managers.to_string()), 1)
    }

    /// As [`Self::start_managed`], with `per_dc` nodes in each datacenter (node `i` in
    /// datacenter `(i - 1) % 3 + 1`), all started together.
    pub fn start_managed_wide(groups: u32, managers: &str, per_dc: usize) -> Self {
        Self::launch_with(groups, &[], false, Some(managers.to_string()), per_dc)
    }

    fn launch(groups: u32, node_args: &[&str], metrics: bool) -> Self {
        Self::launch_with(groups, node_args, metrics, None, 1)
    }

    fn launch_with(
        groups: u32,
        node_args: &[&str],
        metrics: bool,
        managers: Option<String>,
        per_dc: usize,
    ) -> Self {
        let dir = tempfile::Builder::new().prefix("tern-cluster-").tempdir_in(test_root()).unwrap();
        let nodes = (1..=3 * per_dc as u64)
            .map(|i| {
                let dc = (i - 1) % 3 + 1;
                let ip = format!("127.0.{dc}.{}", 1 + (i - 1) / 3 * 3);
                let port = free_port_on(&ip);
                Node {
                    id: i,
                    addr: format!("{ip}:{port}").parse().unwrap(),
                    datacenter: format!("dc{dc}"),
                    metrics_addr: metrics_addr_on(&ip, metrics),
                    extra_args: Vec::new(),
                    child: None,
                    stopped: false,
                }
            })
            .collect();
        let ip = "127.0.1.2";
        let nbd_addr = format!("{ip}:{}", free_port_on(ip)).parse().unwrap();
        let mut c = Self {
            dir,
            nodes,
            nbd_addr,
            frontend: None,
            others: Vec::new(),
            groups,
            node_args: node_args.iter().map(|s| s.to_string()).collect(),
            frontend_metrics: metrics_addr_on(ip, metrics),
            managers,
        };
        if c.managers.is_some() {
            // A managed node opens its port once the managers formed the cluster, which
            // takes all three: start them together, then wait.
            for i in 0..c.nodes.len() {
                let cmd = c.node_command(i);
                let log = format!("node{}", c.nodes[i].id);
                c.nodes[i].child = Some(crate::spawn_daemon_nowait(c.dir.path(), &log, cmd));
            }
            for n in &c.nodes {
                if !crate::wait_port(n.addr, Duration::from_secs(30)) {
                    panic!("node{} did not come up\n{}", n.id, c.logs());
                }
            }
        } else {
            for i in 0..3 {
                c.start_node(i);
            }
        }
        c.wait_leaders(Duration::from_secs(30));
        c.start_frontend();
        c
    }

    /// The original members (`--cluster`); nodes added later join with `--join`.
    fn members(&self) -> String {
        self.nodes[..3]
            .iter()
            .map(|n| format!("{}={}@{}", n.id, n.addr, n.datacenter))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts node `i` (0-based) again after a kill, on the same data directory.
    pub fn start_node(&mut self, i: usize) {
        assert!(self.nodes[i].child.is_none(), "node {i} already running");
        let n = &self.nodes[i];
        let cmd = self.node_command(i);
        let child =
            spawn_daemon(self.dir.path(), &format!("node{}", n.id), cmd, n.addr, || self.logs());
        self.nodes[i].child = Some(child);
        self.nodes[i].stopped = false;
    }

    fn node_command(&self, i: usize) -> Command {
        let n = &self.nodes[i];
        let mut cmd = Command::new(bin("tern-storage-node"));
        cmd.args(["--listen", &n.addr.to_string()])
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("node{}", n.id)))
            .args(["--node-id", &n.id.to_string(), "--datacenter", &n.datacenter])
            .arg("--fault-injection")
            .args(&self.node_args)
            .args(&n.extra_args);
        match &self.managers {
            // The managers say whether it is a member or a spare.
            Some(m) => {
                cmd.args(["--manager", m]);
            }
            None => {
                cmd.args(["--cluster", &self.members(), "--groups", &self.groups.to_string()]);
                if i >= 3 {
                    cmd.arg("--join");
                }
            }
        }
        if let Some(m) = n.metrics_addr {
            cmd.args(["--metrics-listen", &m.to_string()]);
        }
        cmd
    }

    /// Starts a new node in datacenter `dc` (1-based), outside the original members, to
    /// replace one; returns its index.
    pub fn add_node(&mut self, id: u64, dc: usize) -> usize {
        let ip = format!(
            "127.0.{dc}.{}",
            1 + self.nodes.iter().filter(|n| n.datacenter == format!("dc{dc}")).count()
        );
        let port = free_port_on(&ip);
        let metrics = self.frontend_metrics.is_some();
        self.nodes.push(Node {
            id,
            addr: format!("{ip}:{port}").parse().unwrap(),
            datacenter: format!("dc{dc}"),
            metrics_addr: metrics_addr_on(&ip, metrics),
            extra_args: Vec::new(),
            child: None,
            stopped: false,
        });
        let i = self.nodes.len() - 1;
        self.start_node(i);
        i
    }

    /// Every `/metrics` endpoint, as `(job, address)`: `storage_node` for each node, then
    /// `frontend` (empty unless started with [`Self::start_with_metrics`]).
    pub fn metrics_targets(&self) -> Vec<(&'static str, SocketAddr)> {
        let nodes = self.nodes.iter().filter_map(|n| n.metrics_addr).map(|a| ("storage_node", a));
        nodes.chain(self.frontend_metrics.map(|a| ("frontend", a))).collect()
    }

    /// `ID=HOST:PORT@DC` of node `i`, as `tern node replace --with` takes it.
    pub fn spec(&self, i: usize) -> String {
        let n = &self.nodes[i];
        format!("{}={}@{}", n.id, n.addr, n.datacenter)
    }

    pub fn start_frontend(&mut self) {
        assert!(self.frontend.is_none(), "frontend already running");
        let storage =
            self.nodes.iter().map(|n| format!("http://{}", n.addr)).collect::<Vec<_>>().join(",");
        let mut cmd = Command::new(bin("tern-nbd-frontend"));
        cmd.args(["--listen", &self.nbd_addr.to_string(), "--storage", &storage]);
        // It runs in datacenter 1: the groups it uses move their leaders to node 1.
        cmd.args(["--datacenter", "dc1"]);
        if let Some(m) = self.frontend_metrics {
            cmd.args(["--metrics-listen", &m.to_string()]);
        }
        self.frontend =
            Some(spawn_daemon(self.dir.path(), "frontend", cmd, self.nbd_addr, || self.logs()));
    }

    /// Starts another frontend (another hypervisor host) with `args`, on 127.0.1.x; returns
    /// its NBD address. Stopped with the cluster.
    pub fn start_another_frontend(&mut self, name: &str, args: &[&str]) -> SocketAddr {
        let ip = "127.0.1.2";
        let addr: SocketAddr = format!("{ip}:{}", free_port_on(ip)).parse().unwrap();
        let storage =
            self.nodes.iter().map(|n| format!("http://{}", n.addr)).collect::<Vec<_>>().join(",");
        let mut cmd = Command::new(bin("tern-nbd-frontend"));
        cmd.args(["--listen", &addr.to_string(), "--storage", &storage]).args(args);
        let child = spawn_daemon(self.dir.path(), name, cmd, addr, || self.logs());
        self.others.push(child);
        addr
    }

    /// `kill -9` of node `i`.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    fn signal(&mut self, i: usize, sig: libc::c_int) {
        let pid = self.nodes[i].child.as_ref().expect("node running").id();
        let out =
            Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).output().unwrap();
        assert!(out.status.success(), "kill -{sig} {pid}: {}", text(&out));
    }

    /// Freezes node `i` (SIGSTOP): it holds its connections but answers nothing.
    pub fn freeze(&mut self, i: usize) {
        self.signal(i, libc::SIGSTOP);
        self.nodes[i].stopped = true;
    }

    pub fn thaw(&mut self, i: usize) {
        self.signal(i, libc::SIGCONT);
        self.nodes[i].stopped = false;
    }

    fn set_faults(&self, node: usize, isolate_from: Vec<u64>) {
        let addr = format!("http://{}", self.nodes[node].addr);
        block_on(async move {
            let mut c = v1::raft_transport_client::RaftTransportClient::connect(addr)
                .await
                .expect("connect for SetFaults");
            c.set_faults(v1::SetFaultsRequest { isolate_from }).await.expect("SetFaults");
        });
    }

    /// Cuts node `i`'s datacenter off from the others (Raft traffic both ways).
    pub fn partition(&self, i: usize) {
        let cut = self.nodes[i].id;
        for (j, n) in self.nodes.iter().enumerate() {
            if j == i {
                self.set_faults(
                    j,
                    self.nodes.iter().map(|m| m.id).filter(|&id| id != cut).collect(),
                );
            } else if n.child.is_some() {
                self.set_faults(j, vec![cut]);
            }
        }
    }

    pub fn heal(&self) {
        for (j, n) in self.nodes.iter().enumerate() {
            if n.child.is_some() && !n.stopped {
                self.set_faults(j, Vec::new());
            }
        }
    }

    /// The cluster map as node `i` sees it.
    pub fn map(&self, i: usize) -> Option<v1::ClusterMap> {
        let addr = format!("http://{}", self.nodes[i].addr);
        block_on(async move {
            let mut c = v1::cluster_client::ClusterClient::connect(addr).await.ok()?;
            let r = tokio::time::timeout(
                Duration::from_secs(2),
                c.get_cluster_map(v1::GetClusterMapRequest {}),
            )
            .await
            .ok()?;
            r.ok().map(|r| r.into_inner())
        })
    }

    /// Waits until every group (meta included) has a leader that a node holding a replica
    /// of it knows of.
    pub fn wait_leaders(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let known = self.group_leaders();
            if known.len() == self.groups as usize + 1 && known.iter().all(|l| l.0 != 0) {
                return;
            }
            assert!(Instant::now() < deadline, "groups got no leaders\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `(leader, voters)` of every group (index = group), from the running nodes' maps: each
    /// group as the node that leads it reports it (`(0, [])` where no leader answered).
    pub fn group_leaders(&self) -> Vec<(u64, Vec<u64>)> {
        let mut out = vec![(0, Vec::new()); self.groups as usize + 1];
        for (i, n) in self.nodes.iter().enumerate() {
            if n.child.is_none() || n.stopped {
                continue;
            }
            let Some(m) = self.map(i) else { continue };
            for g in m.group_state {
                if g.leader == m.self_id && (g.group as usize) < out.len() {
                    out[g.group as usize] = (g.leader, g.voters);
                }
            }
        }
        out
    }

    /// How many groups each node leads, by node id (as node `i` sees it).
    pub fn leaders(&self, i: usize) -> std::collections::BTreeMap<u64, usize> {
        let mut out = std::collections::BTreeMap::new();
        for g in self.map(i).map(|m| m.group_state).unwrap_or_default() {
            *out.entry(g.leader).or_insert(0) += 1;
        }
        out
    }

    /// `(applied index, digest, data blocks)` of `group` on node `i`.
    pub fn digest(&self, i: usize, group: u32) -> Option<(u64, u64, u64)> {
        let addr = format!("http://{}", self.nodes[i].addr);
        block_on(async move {
            let mut c = v1::raft_transport_client::RaftTransportClient::connect(addr).await.ok()?;
            let r = c.digest(v1::DigestRequest { group }).await.ok()?.into_inner();
            if std::env::var_os("TERN_DIGEST_DETAIL").is_some() {
                eprintln!("node {i} group {group}: {}", r.detail);
            }
            Some((r.applied_index, r.digest, r.data_blocks))
        })
    }

    /// Waits until every running node holds the same state for every group (same applied
    /// index and digest); returns the data blocks per group. Panics after `timeout`.
    pub fn wait_replicas_agree(&self, timeout: Duration) -> Vec<u64> {
        let deadline = Instant::now() + timeout;
        let running: Vec<usize> =
            (0..self.nodes.len()).filter(|&i| self.nodes[i].child.is_some()).collect();
        loop {
            let mut blocks = Vec::new();
            let mut differ = None;
            // With more nodes than datacenters, each group lives on some nodes only.
            let leaders = self.group_leaders();
            for g in 0..=self.groups {
                let voters = &leaders[g as usize].1;
                let holders: Vec<usize> = running
                    .iter()
                    .copied()
                    .filter(|&i| voters.is_empty() || voters.contains(&self.nodes[i].id))
                    .collect();
                let ds: Vec<_> = holders.iter().map(|&i| self.digest(i, g)).collect();
                match (ds.iter().all(Option::is_some), ds.first().copied().flatten()) {
                    (true, Some(first)) if ds.iter().all(|d| *d == Some(first)) => {
                        blocks.push(first.2)
                    }
                    _ => {
                        differ = Some((g, ds));
                        break;
                    }
                }
            }
            match differ {
                None => return blocks,
                Some((g, ds)) => assert!(
                    Instant::now() < deadline,
                    "replicas disagree on group {g}: {ds:?} (applied, digest, blocks)\n{}",
                    self.logs()
                ),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The full log of node `i`.
    pub fn node_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("node{}.log", self.nodes[i].id)))
            .unwrap_or_default()
    }

    pub fn logs(&self) -> String {
        let mut names: Vec<String> = self.nodes.iter().map(|n| format!("node{}", n.id)).collect();
        names.push("frontend".into());
        log_tails(self.dir.path(), &names.iter().map(String::as_str).collect::<Vec<_>>())
    }

    pub fn uri(&self, volume: &str) -> String {
        format!("nbd://{}/{volume}", self.nbd_addr)
    }

    /// Runs the `tern` CLI against node `i`.
    pub fn tern(&self, i: usize, args: &[&str]) -> Output {
        let endpoint = format!("http://{}", self.nodes[i].addr);
        let mut all = vec!["--endpoint", endpoint.as_str()];
        all.extend_from_slice(args);
        run(30, bin("tern").to_str().unwrap(), &all)
    }

    pub fn must_tern(&self, i: usize, args: &[&str]) -> String {
        let o = self.tern(i, args);
        assert!(o.status.success(), "tern {args:?} failed\n{}\n{}", text(&o), self.logs());
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Every daemon that should run still does.
    pub fn must_be_alive(&mut self) {
        let mut dead = Vec::new();
        for n in &mut self.nodes {
            if let Some(st) = n.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                dead.push(format!("node {} exited with {st}", n.id));
            }
        }
        if let Some(st) = self.frontend.as_mut().and_then(|c| c.try_wait().unwrap()) {
            dead.push(format!("frontend exited with {st}"));
        }
        assert!(dead.is_empty(), "{}\n{}", dead.join("; "), self.logs());
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].stopped {
                self.thaw(i);
            }
        }
        let others = std::mem::take(&mut self.others);
        let children = self
            .nodes
            .iter_mut()
            .filter_map(|n| n.child.take())
            .chain(self.frontend.take())
            .chain(others);
        for mut c in children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
