//! The volume manager with real processes: three manager replicas (127.0.N.3, one per
//! datacenter), three storage nodes registered with them, an NBD frontend, the `tern` CLI.

use std::time::Duration;

use tern_proto::v1::{self, manager_client::ManagerClient, volume_admin_client::VolumeAdminClient};
use tern_tests::cluster::Cluster;
use tern_tests::history::Workload;
use tern_tests::managers::Managers;
use tern_tests::text;
use tonic::Code;

/// Managers (marking a silent node down after `down_after` s) and a cluster registered
/// with them; returns once the manager sees all three nodes up.
fn deployment(down_after: &str) -> (Managers, Cluster) {
    let m = Managers::start(&["--node-down-after", down_after]);
    let c = Cluster::start_with(8, &["--manager", &m.addrs()]);
    m.wait_json(&["node", "list"], Duration::from_secs(30), "three nodes up", |v| {
        v.as_array().is_some_and(|ns| ns.len() == 3 && ns.iter().all(|n| n["state"] == "up"))
    });
    (m, c)
}

fn attachment(m: &Managers, volume: &str) -> serde_json::Value {
    let all = m.json(&["volume", "attachments"]);
    all.as_array().unwrap().iter().find(|a| a["volume"] == volume).cloned().unwrap_or_default()
}

#[test]
fn manager_failover_keeps_the_cli_attachments_and_io_working() {
    let (mut m, mut c) = deployment("10");
    m.must_tern(&["volume", "create", "vm1", "--size", "1G"]);
    m.must_tern(&["volume", "create", "vm2", "--size", "1G"]);
    // The workload goes through hv1's frontend, which attached vm1 (generation 1) and sends
    // that generation with every write.
    let hv1 = c.start_another_frontend("hv1", &["--manager", &m.endpoints(), "--host", "hv1"]);
    let w = Workload::start(c.dir.path(), &format!("nbd://{hv1}/vm1"), "vm1", 10, || c.logs());
    assert_eq!(attachment(&m, "vm1")["generation"], 1);
    std::thread::sleep(Duration::from_secs(1));

    let leader = m.leader();
    m.kill9(leader);
    // Any surviving replica answers (the CLI is given all three; the dead one is skipped).
    let listed = m.json(&["volume", "list"]);
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    m.must_tern(&["volume", "attach", "vm2", "--host", "hv2"]);
    let a = m.json(&["volume", "attach", "vm2", "--host", "hv3", "--takeover"]);
    assert_eq!(a[0]["generation"], 2, "a takeover issues the next generation: {a}");
    assert_ne!(m.leader(), leader, "a new manager leads");

    // hv1's I/O went on: the data path never waits for the manager.
    let out = w.out.clone();
    let (ok, report) = w.finish();
    assert!(ok, "I/O failed while the manager failed over\n{report}\n{}", c.logs());
    eprintln!("workload: {}", Workload::summary(&out));

    // The killed replica comes back and catches up: with another replica killed it is part
    // of every quorum, and the state is whole.
    m.start_replica(leader);
    let other = (leader + 1) % 3;
    m.kill9(other);
    let a = attachment(&m, "vm2");
    assert_eq!((a["host"].as_str(), a["generation"].as_u64()), (Some("hv3"), Some(2)), "{a}");
    assert_eq!(attachment(&m, "vm1")["host"], "hv1");
    m.must_tern(&["volume", "detach", "vm2", "--host", "hv3"]);
    m.start_replica(other);
    assert!(attachment(&m, "vm2").is_null());
}

#[test]
fn manager_state_survives_kill9_of_every_replica() {
    let (mut m, _c) = deployment("10");
    m.must_tern(&[
        "volume",
        "create",
        "keep",
        "--size",
        "256M",
        "--label",
        "tier=gold",
        "--tenant",
        "acme",
    ]);
    m.must_tern(&["volume", "attach", "keep", "--host", "hv1"]);
    m.must_tern(&["volume", "attach", "keep", "--host", "hv2", "--takeover"]);
    m.must_tern(&["node", "drain", "2"]);
    for i in 0..3 {
        m.kill9(i);
    }
    for i in 0..3 {
        m.start_replica(i);
    }
    m.wait_leader(Duration::from_secs(30));
    let a = attachment(&m, "keep");
    assert_eq!((a["host"].as_str(), a["generation"].as_u64()), (Some("hv2"), Some(2)), "{a}");
    let v = m.json(&["volume", "get", "keep"]);
    assert_eq!(
        (v["labels"]["tier"].as_str(), v["tenant"].as_str()),
        (Some("gold"), Some("acme")),
        "{v}"
    );
    let n = m.json(&["node", "list"]);
    assert_eq!(n[1]["state"], "draining", "{n}");
    // Generations are never issued twice, across restarts too.
    let a = m.json(&["volume", "attach", "keep", "--host", "hv1", "--takeover"]);
    assert_eq!(a[0]["generation"], 3, "{a}");
}

#[test]
fn a_silent_storage_node_is_marked_down_then_up_again() {
    let (m, mut c) = deployment("2");
    let status = m.json(&["cluster", "status"]);
    assert_eq!(status["groups"]["healthy"], 8, "{status}");
    assert_eq!(status["datacenters"].as_array().unwrap().len(), 3, "{status}");
    c.kill9(2);
    m.wait_json(&["node", "list"], Duration::from_secs(20), "node 3 down", |v| {
        v[2]["state"] == "down"
    });
    let status = m.json(&["cluster", "status"]);
    assert_eq!(status["groups"]["degraded"], 8, "a replica of every group is down: {status}");
    c.start_node(2);
    m.wait_json(&["node", "list"], Duration::from_secs(20), "node 3 up", |v| v[2]["state"] == "up");
    m.wait_json(&["cluster", "status"], Duration::from_secs(20), "groups healthy", |s| {
        s["groups"]["healthy"] == 8
    });
}

/// Runs one gRPC call against the managers' first live replica.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

#[test]
fn bad_requests_get_clear_errors_and_exit_codes() {
    let (m, _c) = deployment("10");
    m.must_tern(&["volume", "create", "busy", "--size", "64M"]);
    m.must_tern(&["volume", "attach", "busy", "--host", "hv1"]);
    let expect = |args: &[&str], code: i32, says: &str| {
        let o = m.tern(args);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(o.status.code(), Some(code), "tern {args:?}\n{}", text(&o));
        assert!(err.contains(says), "tern {args:?} should say {says:?}\n{}", text(&o));
    };
    expect(&["volume", "attach", "nope", "--host", "hv1"], 3, "no volume named");
    expect(&["volume", "attach", "busy", "--host", "hv2"], 6, "attached to host \"hv1\"");
    expect(&["volume", "detach", "busy", "--host", "hv2"], 6, "not \"hv2\"");
    expect(&["volume", "delete", "busy"], 6, "detach it first");
    expect(&["volume", "create", "busy", "--size", "64M"], 4, "already exists");
    expect(&["node", "drain", "99"], 3, "no storage node 99");
    expect(&["volume", "create", "bad name!", "--size", "1G"], 2, "");
    let o = tern_tests::run(
        30,
        tern_tests::bin("tern").to_str().unwrap(),
        &["--endpoint", "http://127.0.0.1:1", "volume", "list"],
    );
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));

    // The server checks too, whatever the client sends.
    let endpoint = format!("http://{}", m.replicas[0].addr);
    block_on(async {
        let ch =
            tonic::transport::Endpoint::from_shared(endpoint).unwrap().connect().await.unwrap();
        let mut admin = VolumeAdminClient::new(ch.clone());
        let mut mgr = ManagerClient::new(ch);
        let bad_name = v1::CreateVolumeRequest {
            name: "../etc".into(),
            size_bytes: 1 << 30,
            ..Default::default()
        };
        assert_eq!(admin.create_volume(bad_name).await.unwrap_err().code(), Code::InvalidArgument);
        let bad_size =
            v1::CreateVolumeRequest { name: "x".into(), size_bytes: 12345, ..Default::default() };
        assert_eq!(admin.create_volume(bad_size).await.unwrap_err().code(), Code::InvalidArgument);
        let bad_tenant = v1::CreateVolumeRequest {
            name: "t".into(),
            size_bytes: 1 << 30,
            tenant: "a/b".into(),
            ..Default::default()
        };
        assert_eq!(
            admin.create_volume(bad_tenant).await.unwrap_err().code(),
            Code::InvalidArgument
        );
        let bad_class = v1::CreateVolumeRequest {
            name: "y".into(),
            size_bytes: 1 << 30,
            storage_class: 77,
            ..Default::default()
        };
        assert_eq!(admin.create_volume(bad_class).await.unwrap_err().code(), Code::InvalidArgument);
        let down = v1::SetNodeStateRequest { node_id: 1, state: v1::NodeState::Down as i32 };
        assert_eq!(mgr.set_node_state(down).await.unwrap_err().code(), Code::InvalidArgument);
        let no_host = v1::AttachRequest {
            volume: Some(v1::VolumeRef { r#ref: Some(v1::volume_ref::Ref::Name("busy".into())) }),
            host: String::new(),
            takeover: false,
        };
        assert_eq!(mgr.attach(no_host).await.unwrap_err().code(), Code::InvalidArgument);
        let no_volume = v1::AttachRequest { volume: None, host: "h".into(), takeover: false };
        assert_eq!(mgr.attach(no_volume).await.unwrap_err().code(), Code::InvalidArgument);
        let anon = v1::RegisterNodeRequest { id: 9, ..Default::default() };
        assert_eq!(mgr.register_node(anon).await.unwrap_err().code(), Code::InvalidArgument);
        let other_dc = v1::RegisterNodeRequest {
            id: 1,
            address: "127.0.9.9:1".into(),
            datacenter: "dc9".into(),
            ..Default::default()
        };
        assert_eq!(mgr.register_node(other_dc).await.unwrap_err().code(), Code::FailedPrecondition);
        let ghost = v1::HeartbeatRequest { node_id: 42, ..Default::default() };
        assert_eq!(mgr.heartbeat(ghost).await.unwrap_err().code(), Code::NotFound);
    });
    // Nothing above disturbed the service.
    let a = attachment(&m, "busy");
    assert_eq!(a["host"], "hv1", "{a}");
}

/// Two hypervisor hosts' frontends attach through the manager. When hv2 takes the volume
/// over, hv1's open connection keeps sending writes: the storage nodes refuse every one of
/// them (EPERM), and nothing of them reaches the data.
#[test]
fn a_taken_over_attachment_fences_the_old_hosts_writes() {
    takeover_fences_the_old_host(&[]);
}

/// As above, for a `local` volume: its home node keeps the fence.
#[test]
fn a_taken_over_attachment_of_a_local_volume_fences_the_old_hosts_writes() {
    takeover_fences_the_old_host(&["--class", "local", "--node", "3"]);
}

fn takeover_fences_the_old_host(class: &[&str]) {
    tern_tests::require_tool("python3");
    let (m, mut c) = deployment("10");
    let mut create = vec!["volume", "create", "shared", "--size", "256M"];
    create.extend_from_slice(class);
    m.must_tern(&create);
    let managers = m.endpoints();
    let hv1 = c.start_another_frontend("hv1", &["--manager", &managers, "--host", "hv1"]);
    let hv2 = c.start_another_frontend("hv2", &["--manager", &managers, "--host", "hv2"]);
    let flag = c.dir.path().join("taken-over");
    // hv1 writes A, waits for the takeover, then tries B at the same place and C elsewhere.
    let script = format!(
        r#"
import nbd, os, sys, time
h = nbd.NBD(); h.connect_uri("nbd://{hv1}/shared")
h.pwrite(b"A" * 4096, 0); h.flush()
print("WROTE", flush=True)
while not os.path.exists("{flag}"):
    time.sleep(0.05)
refused = 0
for off, byte in ((0, b"B"), (64 << 20, b"C"), (128 << 20, b"D")):
    try:
        h.pwrite(byte * 4096, off)
    except nbd.Error as e:
        refused += 1
        print("REFUSED", off, e, flush=True)
print("DONE", refused, flush=True)
"#,
        flag = flag.display()
    );
    let old = std::process::Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while attachment(&m, "shared").is_null() {
        assert!(std::time::Instant::now() < deadline, "hv1 never attached\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(attachment(&m, "shared")["host"], "hv1");

    // hv2 cannot open the volume while hv1 holds it.
    let o = tern_tests::run(
        30,
        "/usr/bin/python3",
        &["-c", &format!("import nbd; h = nbd.NBD(); h.connect_uri('nbd://{hv2}/shared')")],
    );
    assert!(!o.status.success(), "hv2 opened a volume attached to hv1\n{}", text(&o));

    // The takeover: generation 2, fenced on every chunk group before it returns.
    let a = m.json(&["volume", "attach", "shared", "--host", "hv2", "--takeover"]);
    assert_eq!(a[0]["generation"], 2, "{a}");
    std::fs::write(&flag, b"").unwrap();
    let out = old.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("DONE 3"),
        "hv1's writes after the takeover must all fail\n{said}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.logs()
    );

    // hv2 now serves the volume: hv1's first write is there, none of the later ones.
    let check = format!(
        r#"
import nbd
h = nbd.NBD(); h.connect_uri("nbd://{hv2}/shared")
assert h.pread(4096, 0) == b"A" * 4096, "the acknowledged write before the takeover"
assert h.pread(4096, 64 << 20) == bytes(4096), "a fenced write reached the data"
assert h.pread(4096, 128 << 20) == bytes(4096), "a fenced write reached the data"
h.pwrite(b"E" * 4096, 0); h.flush()
assert h.pread(4096, 0) == b"E" * 4096
print("OK")
"#
    );
    let o = tern_tests::run(60, "/usr/bin/python3", &["-c", &check]);
    assert!(o.status.success(), "hv2 after the takeover\n{}\n{}", text(&o), c.logs());
}

/// A real Prometheus scrapes the three managers: exactly one leads, and they agree on the
/// state; promtool accepts every page.
#[test]
fn prometheus_scrapes_the_managers() {
    use tern_tests::metrics::{
        check_dashboard, must_pass_promtool, must_scrape, sample, Prometheus,
    };
    tern_tests::require_tool("prometheus");
    tern_tests::require_tool("promtool");
    let (m, _c) = deployment("10");
    m.must_tern(&["volume", "create", "seen", "--size", "64M"]);
    m.must_tern(&["volume", "attach", "seen", "--host", "hv1"]);
    let mut leaders = 0.0;
    let mut pages = Vec::new();
    for r in &m.replicas {
        let page = must_scrape(r.metrics);
        must_pass_promtool(&format!("manager {}", r.id), &page);
        leaders += sample(&page, "tern_manager_is_leader").expect("is_leader");
        assert!(sample(&page, "tern_manager_raft_term").unwrap() >= 1.0, "{page}");
        pages.push(page);
    }
    assert_eq!(leaders, 1.0, "exactly one manager leads");
    let targets: Vec<(String, std::net::SocketAddr)> =
        m.replicas.iter().map(|r| (format!("manager{}", r.id), r.metrics)).collect();
    let targets: Vec<(&str, std::net::SocketAddr)> =
        targets.iter().map(|(n, a)| (n.as_str(), *a)).collect();
    let p = Prometheus::start(m.dir.path(), &targets);
    p.wait_all_up(&targets, Duration::from_secs(60));
    p.wait_for("one leader", "sum(tern_manager_is_leader)", Duration::from_secs(30), |s| {
        s.len() == 1 && s[0].value == 1.0
    });
    // Every replica applied the same state.
    p.wait_for(
        "three nodes up",
        "tern_manager_nodes{state=\"up\"}",
        Duration::from_secs(30),
        |s| s.len() == 3 && s.iter().all(|x| x.value == 3.0),
    );
    p.wait_for("one attachment", "tern_manager_attachments", Duration::from_secs(30), |s| {
        s.len() == 3 && s.iter().all(|x| x.value == 1.0)
    });
    p.wait_for("capacity", "tern_manager_capacity_bytes", Duration::from_secs(30), |s| {
        s.len() == 1 && s[0].value > 0.0
    });
    // The dashboard's manager panels query what the managers export.
    check_dashboard(&p, &pages, &["tern_manager_"]);
}

/// qemu-io commands against `uri`, which must all succeed.
fn qemu_io(uri: &str, cmds: &[String]) {
    let mut args = vec!["-f", "raw", uri];
    for cmd in cmds {
        args.extend(["-c", cmd.as_str()]);
    }
    let o = tern_tests::run(60, "qemu-io", &args);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success() && !out.contains("fail"), "qemu-io {cmds:?}\n{}", text(&o));
}

/// 1 MiB of pattern `i + 1` at `i * 64 + 2` MiB for `i` in 0..16: one write in each chunk
/// of a 1 GiB volume (every chunk group), away from the workload's blocks.
fn chunk_patterns(op: &str) -> Vec<String> {
    (0..16).map(|i| format!("{op} -P {} {}M 1M", i + 1, i * 64 + 2)).collect()
}

fn node_field(v: &serde_json::Value, id: u64, field: &str) -> serde_json::Value {
    v.as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == id)
        .map_or(serde_json::Value::Null, |n| n[field].clone())
}

/// The managers keep the storage cluster whole and balanced: a node that joins takes half
/// of its datacenter's groups; a drained member hands all of its replicas to another node
/// of its datacenter, and so does a lost member once it has been down for a while; I/O goes
/// on throughout and the data stays.
#[test]
fn joining_nodes_take_groups_and_drained_or_lost_nodes_hand_theirs_over() {
    let m =
        Managers::start(&["--node-down-after", "2", "--replace-down-after", "3", "--groups", "8"]);
    let mut c = Cluster::start_managed(8, &m.addrs());
    m.must_tern(&["volume", "create", "data", "--size", "1G"]);
    let uri = c.uri("data");
    qemu_io(&uri, &chunk_patterns("write"));

    // Nine groups (eight and the meta group) in each datacenter: a newcomer takes four.
    c.add_node(4, 3);
    c.add_node(5, 2);
    m.wait_json(&["node", "list"], Duration::from_secs(90), "nodes 4 and 5 rebalanced", |v| {
        [(3, 5), (4, 4), (2, 5), (5, 4), (1, 9)].iter().all(|&(id, n)| {
            node_field(v, id, "replicas") == n && node_field(v, id, "member") == true
        })
    });
    m.wait_json(&["cluster", "status"], Duration::from_secs(30), "no move left", |s| {
        s["moving"].is_null() && s["groups"]["healthy"] == 8
    });
    let table = m.must_tern(&["node", "list"]);
    assert!(table.contains("REPLICAS"), "{table}");
    qemu_io(&uri, &chunk_patterns("read"));
    c.wait_replicas_agree(Duration::from_secs(30));

    let w = Workload::start(c.dir.path(), &uri, "data", 25, || c.logs());
    let out = m.must_tern(&["node", "drain", "3", "--wait"]);
    assert!(out.contains("node 3 drained"), "{out}");
    let v = m.json(&["node", "list"]);
    assert_eq!(node_field(&v, 4, "replicas"), 9, "{v}");
    assert_eq!(node_field(&v, 3, "member"), false, "{v}");
    let s = m.json(&["cluster", "status"]);
    assert!(s["moving"].is_null(), "{s}");
    // Node 3, still running, retires its replicas: its chunks' space is freed.
    m.wait_json(&["node", "list"], Duration::from_secs(60), "node 3 holds no data", |v| {
        node_field(v, 3, "used_bytes") == 0
    });
    assert!(c.node_log(2).contains("retired this node's replica"), "{}", c.node_log(2));

    c.kill9(1); // node 2
    m.wait_json(&["node", "list"], Duration::from_secs(60), "node 5 took node 2's groups", |v| {
        node_field(v, 5, "replicas") == 9 && node_field(v, 2, "member") == false
    });
    let (ok, report) = w.finish();
    assert!(ok, "I/O failed while nodes moved\n{report}\n{}", c.logs());

    // Everything written before is still there, now served by nodes 1, 4 and 5.
    qemu_io(&uri, &chunk_patterns("read"));
    m.wait_json(&["cluster", "status"], Duration::from_secs(20), "all groups healthy", |s| {
        s["groups"]["healthy"] == 8
    });
}

/// Six nodes started together, two per datacenter: the managers spread the groups over all
/// of them (each node holds about half of its datacenter's), the data path finds each
/// group's leader among its own nodes, a lost node's groups keep serving from the other two
/// datacenters and then move to the other node of its datacenter.
#[test]
fn groups_spread_over_every_node_and_a_lost_nodes_share_moves_within_its_datacenter() {
    let m =
        Managers::start(&["--node-down-after", "2", "--replace-down-after", "3", "--groups", "8"]);
    let mut c = Cluster::start_managed_wide(8, &m.addrs(), 2);
    let v = m.json(&["node", "list"]);
    for id in 1..=6u64 {
        let n = node_field(&v, id, "replicas").as_u64().unwrap_or(0);
        assert!((4..=5).contains(&n), "node {id} holds {n} replicas\n{v}");
        assert_eq!(node_field(&v, id, "member"), true, "{v}");
    }
    m.must_tern(&["volume", "create", "data", "--size", "1G"]);
    let uri = c.uri("data");
    qemu_io(&uri, &chunk_patterns("write"));
    c.wait_replicas_agree(Duration::from_secs(30));
    // A node holds only its own groups' data: no node has all of it.
    let leaders = c.group_leaders();
    for (g, (_, voters)) in leaders.iter().enumerate() {
        assert_eq!(voters.len(), 3, "group {g}: {leaders:?}");
    }

    let w = Workload::start(c.dir.path(), &uri, "data", 20, || c.logs());
    std::thread::sleep(Duration::from_secs(3));
    c.kill9(3); // node 4, dc1's second node
    m.wait_json(&["node", "list"], Duration::from_secs(60), "node 1 took node 4's groups", |v| {
        node_field(v, 1, "replicas") == 9 && node_field(v, 4, "member") == false
    });
    let (ok, report) = w.finish();
    assert!(ok, "I/O failed across the loss of a node\n{report}\n{}", c.logs());
    qemu_io(&uri, &chunk_patterns("read"));
    m.wait_json(&["cluster", "status"], Duration::from_secs(20), "all groups healthy", |s| {
        s["groups"]["healthy"] == 8 && s["moving"].is_null()
    });
    c.wait_replicas_agree(Duration::from_secs(30));
}

/// A `local` volume on a cluster: one copy, on the node the managers chose (or the operator
/// named), served through any frontend; it survives a `kill -9` of that node; snapshots and
/// bad home nodes are refused clearly.
#[test]
fn a_local_volume_lives_on_one_node() {
    let (m, mut c) = deployment("10");
    let v = m.json(&[
        "volume", "create", "scratch", "--size", "256M", "--class", "local", "--node", "2",
    ]);
    assert_eq!(
        (v["storage_class"].as_str(), v["home_node"].as_u64()),
        (Some("local"), Some(2)),
        "{v}"
    );
    let auto = m.json(&["volume", "create", "auto", "--size", "64M", "--class", "local"]);
    assert!((1..=3).contains(&auto["home_node"].as_u64().unwrap_or(0)), "{auto}");
    let o =
        m.tern(&["volume", "create", "bad", "--size", "64M", "--class", "local", "--node", "99"]);
    assert!(!o.status.success() && text(&o).contains("node 99"), "{}", text(&o));
    let o = m.tern(&["volume", "create", "bad", "--size", "64M", "--node", "2"]);
    assert!(!o.status.success() && text(&o).contains("'local'"), "{}", text(&o));
    let table = m.must_tern(&["volume", "list"]);
    assert!(table.contains("local (node 2)"), "{table}");

    let uri = c.uri("scratch");
    qemu_io(&uri, &["write -P 0x17 0 8M".into(), "write -P 0x18 200M 1M".into()]);
    qemu_io(&uri, &["read -P 0x17 0 8M".into(), "read -P 0x18 200M 1M".into()]);
    // The data is on node 2 alone.
    m.wait_json(&["node", "list"], Duration::from_secs(20), "only node 2 holds data", |v| {
        node_field(v, 2, "used_bytes").as_u64().unwrap_or(0) >= 9 << 20
            && node_field(v, 1, "used_bytes") == 0
            && node_field(v, 3, "used_bytes") == 0
    });
    let o = m.tern(&["snapshot", "create", "scratch"]);
    assert!(!o.status.success() && text(&o).contains("'local'"), "{}", text(&o));
    // Its node cannot be drained while it holds the only copy.
    let o = m.tern(&["node", "drain", "2"]);
    assert!(!o.status.success() && text(&o).contains("scratch"), "{}", text(&o));

    // Acknowledged (flushed: qemu-io flushes before it exits) writes survive kill -9.
    c.kill9(1);
    c.start_node(1);
    qemu_io(&uri, &["read -P 0x17 0 8M".into(), "read -P 0x18 200M 1M".into()]);
    m.must_tern(&["volume", "delete", "scratch"]);
    m.wait_json(&["node", "list"], Duration::from_secs(20), "the space is freed", |v| {
        node_field(v, 2, "used_bytes") == 0
    });
}

/// Shrinking a replicated volume: refused without `--allow-shrink` and while snapshots hold
/// its blocks; forced, the blocks past the new end go from every replica (grown back, that
/// range reads as zeros), the rest stays.
#[test]
fn a_forced_shrink_discards_the_tail_on_every_replica() {
    let (m, mut c) = deployment("10");
    m.must_tern(&["volume", "create", "s", "--size", "1G"]);
    let uri = c.uri("s");
    qemu_io(&uri, &["write -P 0x21 0 1M".into(), "write -P 0x22 700M 1M".into()]);

    let o = m.tern(&["volume", "resize", "s", "512M"]);
    assert!(!o.status.success() && text(&o).contains("allow"), "{}", text(&o));
    m.must_tern(&["snapshot", "create", "s", "keep"]);
    let o = m.tern(&["volume", "resize", "s", "512M", "--allow-shrink"]);
    assert!(!o.status.success() && text(&o).contains("snapshots"), "{}", text(&o));
    m.must_tern(&["snapshot", "delete", "s", "keep", "--wait"]);

    m.must_tern(&["volume", "resize", "s", "512M", "--allow-shrink"]);
    let v = m.json(&["volume", "get", "s"]);
    assert_eq!(v["size_bytes"], 512u64 << 20, "{v}");
    let o = tern_tests::run(60, "qemu-io", &["-f", "raw", "-c", "read 700M 1M", &uri]);
    assert!(!o.status.success() || text(&o).contains("error"), "read past the end\n{}", text(&o));

    m.must_tern(&["volume", "resize", "s", "1G"]);
    qemu_io(&uri, &["read -P 0x21 0 1M".into(), "read -P 0 700M 1M".into()]);

    // A clone's discarded tail does not show its parent's blocks once grown back. (The
    // shrink fenced the volume: writes now need an attachment, as a host has.)
    let hv1 = c.start_another_frontend("hv1", &["--manager", &m.endpoints(), "--host", "hv1"]);
    qemu_io(&format!("nbd://{hv1}/s"), &["write -P 0x23 700M 1M".into()]);
    m.must_tern(&["snapshot", "create", "s", "base"]);
    m.must_tern(&["snapshot", "clone", "s", "base", "k"]);
    let k = c.uri("k");
    qemu_io(&k, &["read -P 0x23 700M 1M".into()]);
    m.must_tern(&["volume", "resize", "k", "512M", "--allow-shrink"]);
    m.must_tern(&["volume", "resize", "k", "1G"]);
    qemu_io(&k, &["read -P 0x21 0 1M".into(), "read -P 0 700M 1M".into()]);
    c.wait_replicas_agree(Duration::from_secs(30));
}

/// A node whose disk is beyond its full ratio makes the whole cluster refuse writes with
/// ENOSPC (its replicas could not apply them), while reads go on; it shows as full; once it
/// has room again, writes resume.
/// Restarts node 3 (`kill -9`) with `args`, and waits until the manager says it is `full`
/// or not.
fn restart_node3(m: &Managers, c: &mut Cluster, args: &[&str], full: bool) {
    c.nodes[2].extra_args = args.iter().map(|a| a.to_string()).collect();
    c.kill9(2);
    c.start_node(2);
    m.wait_json(&["node", "list"], Duration::from_secs(20), "node 3's full flag", |v| {
        node_field(v, 3, "full") == full
    });
}

#[test]
fn a_full_node_stops_writes_everywhere_and_reads_go_on() {
    let (m, mut c) = deployment("10");
    m.must_tern(&["volume", "create", "f", "--size", "1G"]);
    let uri = c.uri("f");
    qemu_io(&uri, &chunk_patterns("write"));

    // Node 3 restarts believing its disk full (this machine's disk is far above 0.1%).
    restart_node3(&m, &mut c, &["--full-ratio", "0.001"], true);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        // Every chunk group: those led by nodes 1 and 2 refuse too.
        let o = tern_tests::run(
            60,
            "qemu-io",
            &["-f", "raw", "-c", "write -P 9 0 1M", "-c", "write -P 9 640M 1M", &uri],
        );
        if text(&o).contains("No space left on device") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "writes were not refused\n{}", text(&o));
        std::thread::sleep(Duration::from_millis(500));
    }
    let table = m.must_tern(&["node", "list"]);
    assert!(table.contains("up (full)"), "{table}");
    qemu_io(&uri, &chunk_patterns("read"));

    restart_node3(&m, &mut c, &[], false);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let o = tern_tests::run(60, "qemu-io", &["-f", "raw", "-c", "write -P 9 0 1M", &uri]);
        if o.status.success() && !text(&o).contains("failed") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "writes did not resume\n{}", text(&o));
        std::thread::sleep(Duration::from_millis(500));
    }
    qemu_io(&uri, &["read -P 9 0 1M".into()]);
}
