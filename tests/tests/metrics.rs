//! The `/metrics` endpoints of the storage nodes and the NBD frontend, end to end: real
//! daemons serving real NBD I/O (qemu-io), every page linted by `promtool check metrics`, a
//! real Prometheus server scraping them every second and answering PromQL, and the Grafana
//! dashboard's queries run against it. Needs `prometheus` and `promtool` (Debian's
//! `prometheus` package, installed by `scripts/install-deps --tests`): missing, the tests fail.

use std::net::SocketAddr;
use std::time::Duration;

use tern_tests::cluster::Cluster;
use tern_tests::metrics::{
    check_dashboard, dashboard_queries, http_get, must_pass_promtool, must_scrape, sample,
    Prometheus, Sample,
};
use tern_tests::{require_tool, run, text, Deployment};

const MIB: f64 = (1 << 20) as f64;
/// Data chunk groups of the test cluster; with the meta group, each node has one more.
const GROUPS: u32 = 4;
const ALL_GROUPS: f64 = (GROUPS + 1) as f64;
const WAIT: Duration = Duration::from_secs(30);

/// Runs qemu-io against `uri` and panics unless every command (patterns checked) succeeds.
fn must_qemu_io(uri: &str, cmds: &[&str], logs: impl Fn() -> String) {
    require_tool("qemu-io");
    let mut args = vec!["-f", "raw", uri];
    for c in cmds {
        args.extend(["-c", c]);
    }
    let o = run(120, "qemu-io", &args);
    let all = text(&o);
    assert!(
        o.status.success() && !all.contains("Pattern verification failed"),
        "qemu-io {cmds:?} failed\n{all}\n{}",
        logs()
    );
}

/// Writes (4 MiB, then 2 MiB across the first chunk boundary: two chunk groups), zeroes and
/// discards 1 MiB each, flushes and reads back: 4 MiB of data remain.
const IO: &[&str] = &[
    "write -P 0xab 0 4M",
    "write -P 0x5a 63M 2M",
    "write -z 1M 1M",
    "discard 2M 1M",
    "flush",
    "read -P 0xab 0 1M",
    "read -P 0 1M 2M",
    "read -P 0x5a 63M 2M",
];
const DATA_LEFT: f64 = 4.0 * MIB;

fn one(samples: &[Sample]) -> f64 {
    match samples {
        [s] => s.value,
        _ => f64::NAN,
    }
}

/// Waits until the groups led across the cluster are `healthy` and `degraded` in one
/// evaluation (while leadership moves, two nodes may briefly both count a group).
fn wait_health(p: &Prometheus, what: &str, healthy: f64, degraded: f64) {
    let q = "sum by (health) (tern_storage_node_groups_by_health)";
    p.wait_for(what, q, WAIT, |s| {
        let of = |h: &str| s.iter().find(|x| x.labels["health"] == h).map(|x| x.value);
        of("healthy") == Some(healthy) && of("degraded") == Some(degraded)
    });
}

#[test]
fn prometheus_scrapes_a_cluster_and_its_frontend() {
    require_tool("prometheus");
    require_tool("promtool");
    let mut c = Cluster::start_with_metrics(GROUPS);
    let targets = c.metrics_targets();
    assert_eq!(targets.len(), 4, "three nodes and a frontend: {targets:?}");
    for n in 1..=3 {
        assert!(c.node_log(n - 1).contains("metrics listening on"), "node {n} logs its address");
    }
    c.must_tern(0, &["volume", "create", "mvol", "--size", "256M"]);
    must_qemu_io(&c.uri("mvol"), IO, || c.logs());

    // Each page, as scraped: well-formed for promtool, and saying what happened.
    let pages: Vec<String> = targets.iter().map(|(_, a)| must_scrape(*a)).collect();
    for ((job, addr), page) in targets.iter().zip(&pages) {
        must_pass_promtool(&format!("{job} at {addr}"), page);
    }
    let frontend = &pages[3];
    let writes = sample(frontend, r#"tern_frontend_ops_total{op="write",volume="mvol"}"#);
    assert!(writes.is_some_and(|w| w >= 2.0), "{frontend}");
    for page in &pages[..3] {
        assert!(page.contains("tern_storage_node_raft_term{group=\"0\"}"), "{page}");
    }

    let p = Prometheus::start(c.dir.path(), &targets);
    p.wait_all_up(&targets, WAIT);

    // The frontend: what qemu-io did to the volume.
    let q = r#"tern_frontend_ops_total{volume="mvol",op="write"}"#;
    let writes = one(&p.wait_for("write ops of mvol", q, WAIT, |s| one(s) >= 2.0));
    let q = r#"tern_frontend_op_duration_seconds_count{volume="mvol",op="write"}"#;
    assert_eq!(one(&p.query(q)), writes, "one latency observation per write");
    let q = r#"tern_frontend_bytes_total{volume="mvol",op="write"}"#;
    assert_eq!(one(&p.query(q)), 6.0 * MIB, "bytes written through NBD");
    let q = r#"tern_frontend_bytes_total{volume="mvol",op="read"}"#;
    assert_eq!(one(&p.query(q)), 5.0 * MIB, "bytes read through NBD");
    for op in ["flush", "trim", "write_zeroes"] {
        let q = format!(r#"tern_frontend_ops_total{{volume="mvol",op="{op}"}}"#);
        assert!(one(&p.query(&q)) >= 1.0, "{op}: {:?}", p.query(&q));
    }
    assert_eq!(one(&p.query(r#"sum(tern_frontend_errors_total{volume="mvol"})"#)), 0.0);
    let open = "tern_frontend_connections";
    p.wait_for("qemu-io's connection closed", open, WAIT, |s| one(s) == 0.0);

    // The storage nodes: every group has a term, one leader, and is healthy.
    let terms = p.query("tern_storage_node_raft_term");
    assert_eq!(terms.len() as f64, 3.0 * ALL_GROUPS, "{terms:?}");
    assert!(terms.iter().all(|s| s.value >= 1.0), "terms start at 1: {terms:?}");
    let per_node = p.query("sum by (instance) (tern_storage_node_groups)");
    assert_eq!(per_node.len(), 3, "{per_node:?}");
    assert!(
        per_node.iter().all(|s| s.value == ALL_GROUPS),
        "roles cover every group: {per_node:?}"
    );
    let leaders = r#"sum(tern_storage_node_groups{role="leader"})"#;
    p.wait_for("one leader per group", leaders, WAIT, |s| one(s) == ALL_GROUPS);
    wait_health(&p, "every group healthy", ALL_GROUPS, 0.0);
    let lags = p.query("tern_storage_node_raft_apply_lag_entries");
    assert_eq!(lags.len() as f64, 3.0 * ALL_GROUPS, "{lags:?}");
    let lag = "max(tern_storage_node_raft_commit_lag_entries)";
    p.wait_for("commit lag back to 0 at idle", lag, WAIT, |s| one(s) == 0.0);
    // Every replica holds the data left (applied everywhere), and served the writes.
    let held = "tern_storage_node_allocated_bytes";
    p.wait_for("4 MiB on every replica", held, WAIT, |s| {
        s.len() == 3 && s.iter().all(|x| x.value == DATA_LEFT)
    });
    let q = r#"sum(tern_storage_node_io_bytes_total{op="write"})"#;
    assert!(one(&p.query(q)) >= 6.0 * MIB, "the leaders took the writes: {:?}", p.query(q));
    let cap = p.query("tern_storage_node_capacity_bytes");
    assert!(cap.len() == 3 && cap.iter().all(|s| s.value > 0.0), "{cap:?}");
    assert!(p.query("tern_storage_node_used_bytes > tern_storage_node_capacity_bytes").is_empty());
    assert_eq!(one(&p.query("sum(tern_storage_node_checksum_errors_total)")), 0.0);
    assert_eq!(one(&p.query("sum(tern_storage_node_rebuild_active)")), 0.0);

    check_dashboard(&p, &pages, &["tern_storage_node_", "tern_frontend_"]);

    // A node dies: its target goes down, the others take its groups over and judge them
    // degraded (a voter is missing), leader changes are counted, and the frontend retries.
    let leaders = c.leaders(0);
    let (&busiest, &led) = leaders.iter().max_by_key(|(_, n)| **n).expect("leaders");
    let victim = c.nodes.iter().position(|n| n.id == busiest).expect("leader is a member");
    let victim_metrics = c.nodes[victim].metrics_addr.expect("metrics");
    c.kill9(victim);
    // One write per chunk: one per data group, so some go to a group the victim led.
    let after = ["write -P 0x77 0 1M", "write -P 0x77 64M 1M", "write -P 0x77 128M 1M"];
    let after = [&after[..], &["write -P 0x77 192M 1M", "read -P 0x77 0 1M"]].concat();
    must_qemu_io(&c.uri("mvol"), &after, || c.logs());
    let down = format!(r#"up{{instance="{victim_metrics}"}}"#);
    p.wait_for("the killed node's target down", &down, WAIT, |s| one(s) == 0.0);
    let leaders = r#"sum(tern_storage_node_groups{role="leader"})"#;
    p.wait_for("the survivors lead every group", leaders, WAIT, |s| one(s) == ALL_GROUPS);
    wait_health(&p, "every group degraded", 0.0, ALL_GROUPS);
    let changes = "sum(tern_storage_node_raft_leader_changes_total)";
    p.wait_for("leader changes counted", changes, WAIT, |s| one(s) >= led as f64);
    let tries =
        "sum(tern_frontend_backend_retries_total) + sum(tern_frontend_backend_redirects_total)";
    p.wait_for("the frontend looked for the new leaders", tries, WAIT, |s| one(s) >= 1.0);

    // Back: healthy again.
    c.start_node(victim);
    p.wait_for("the node's target up again", &down, WAIT, |s| one(s) == 1.0);
    wait_health(&p, "every group healthy again", ALL_GROUPS, 0.0);
    c.must_be_alive();
}

#[test]
fn a_single_node_and_its_frontend_export_what_applies() {
    require_tool("promtool");
    let mut d = Deployment::start_with_metrics();
    let (node, frontend) = (d.node_metrics.expect("metrics"), d.frontend_metrics.expect("metrics"));
    d.create_volume("svol", "64M");
    must_qemu_io(&d.uri("svol"), &["write -P 0x11 0 1M", "read -P 0x11 0 1M", "flush"], || {
        d.logs()
    });
    let logs = d.logs();
    assert!(logs.contains(&format!("metrics listening on http://{node}/metrics")), "{logs}");
    assert!(logs.contains(&format!("metrics listening on http://{frontend}/metrics")), "{logs}");

    let f = must_scrape(frontend);
    must_pass_promtool("the frontend", &f);
    assert_eq!(
        sample(&f, r#"tern_frontend_ops_total{op="write",volume="svol"}"#),
        Some(1.0),
        "{f}"
    );
    assert_eq!(sample(&f, r#"tern_frontend_bytes_total{op="read",volume="svol"}"#), Some(MIB));
    // qemu-io flushes once more as it closes the export.
    let flushes = sample(&f, r#"tern_frontend_ops_total{op="flush",volume="svol"}"#);
    assert!(flushes.is_some_and(|n| n >= 1.0), "{f}");
    assert_eq!(sample(&f, "tern_frontend_backend_retries_total"), Some(0.0), "{f}");

    let n = must_scrape(node);
    must_pass_promtool("the storage node", &n);
    assert_eq!(sample(&n, r#"tern_storage_node_io_ops_total{op="write"}"#), Some(1.0), "{n}");
    assert_eq!(sample(&n, r#"tern_storage_node_io_bytes_total{op="write"}"#), Some(MIB));
    assert_eq!(sample(&n, "tern_storage_node_allocated_bytes"), Some(MIB), "{n}");
    assert_eq!(sample(&n, "tern_storage_node_volumes"), Some(1.0));
    // The frontend keeps its data lanes open (two per node) after the client has gone.
    assert_eq!(sample(&n, "tern_storage_node_data_lanes"), Some(2.0), "{n}");
    assert!(sample(&n, "tern_storage_node_capacity_bytes").is_some_and(|c| c > 0.0), "{n}");
    // Raft and replacement exist only in a cluster.
    assert!(!n.contains("tern_storage_node_raft_term"), "{n}");
    assert!(!n.contains("tern_storage_node_groups{"), "{n}");

    // Only /metrics is served; the daemons shrug off junk.
    for addr in [node, frontend] {
        let r = http_get(addr, "/").unwrap();
        assert_eq!(r.status, 404, "{r:?}");
        send_junk(addr);
        must_scrape(addr);
    }
    dashboard_queries();
    d.must_be_alive();
}

/// Bytes that are not HTTP, and a connection left open mid-request.
fn send_junk(addr: SocketAddr) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let _ = s.write_all(&[0xff; 3000]);
    let _idle = std::net::TcpStream::connect(addr).unwrap();
    let mut half = std::net::TcpStream::connect(addr).unwrap();
    let _ = half.write_all(b"GET /metr");
}
