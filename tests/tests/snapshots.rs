//! Snapshots with real processes: three manager replicas, three storage nodes, a frontend
//! attached through the manager, writers over NBD, and the `tern` CLI.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tern_tests::cluster::Cluster;
use tern_tests::managers::Managers;
use tern_tests::{bin, require_tool, text};

fn deployment() -> (Managers, Cluster) {
    let m = Managers::start(&["--node-down-after", "10"]);
    let c = Cluster::start_with(8, &["--manager", &m.addrs()]);
    m.wait_json(&["node", "list"], Duration::from_secs(30), "three nodes up", |v| {
        v.as_array().is_some_and(|ns| ns.len() == 3 && ns.iter().all(|n| n["state"] == "up"))
    });
    (m, c)
}

/// Runs `tests/scripts/snapshots.py` against `volume` through the frontend at `nbd`, files in
/// `dir`; returns its output and summary.
fn run_snapshot_workload(
    endpoints: &str,
    dir: &std::path::Path,
    nbd: &str,
    volume: &str,
    snapshots: u32,
) -> (std::process::Output, String) {
    require_tool("python3");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/snapshots.py");
    let out_json = dir.join(format!("snapshots-{volume}.json"));
    let o = Command::new("/usr/bin/python3")
        .arg(script)
        .args([nbd, volume, bin("tern").to_str().unwrap(), endpoints])
        .arg(snapshots.to_string())
        .arg(&out_json)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    (o, std::fs::read_to_string(&out_json).unwrap_or_default())
}

fn snapshot_workload(m: &Managers, c: &Cluster, nbd: &str, volume: &str, snapshots: u32) {
    let (o, summary) = run_snapshot_workload(&m.endpoints(), c.dir.path(), nbd, volume, snapshots);
    assert!(
        o.status.success(),
        "snapshot workload failed:\n{}\n{}\n{}",
        text(&o),
        c.logs(),
        m.logs()
    );
    eprintln!("snapshot workload: {summary}");
}

fn usage_total(m: &Managers, volume: &str) -> u64 {
    m.json(&["snapshot", "list", volume, "--usage"])["total_bytes"].as_u64().unwrap()
}

#[test]
fn snapshots_under_writes_hold_what_was_acknowledged_and_deletion_reclaims() {
    let (m, c0) = deployment();
    let mut c = c0;
    m.must_tern(&["volume", "create", "vm", "--size", "512M"]);
    let hv1 = c.start_another_frontend("hv1", &["--manager", &m.endpoints(), "--host", "hv1"]);
    snapshot_workload(&m, &c, &hv1.to_string(), "vm", 8);

    // Every replica holds the same versions of every block (and the same snapshots).
    c.wait_replicas_agree(Duration::from_secs(30));
    let list = m.json(&["snapshot", "list", "vm", "--usage"]);
    let snaps = list["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 8, "{list}");
    assert!(snaps.iter().all(|s| s["state"] == "ready"), "{list}");
    let epochs: Vec<u64> = snaps.iter().map(|s| s["epoch"].as_u64().unwrap()).collect();
    assert!(epochs.windows(2).all(|w| w[0] < w[1]), "epochs rise: {epochs:?}");
    let exclusive: u64 = snaps.iter().map(|s| s["exclusive_bytes"].as_u64().unwrap()).sum();
    let total = list["total_bytes"].as_u64().unwrap();
    assert!(exclusive > 0 && exclusive < total, "{list}");

    // Names are unique per volume; bad names and unknown snapshots get clear errors.
    let dup = m.tern(&["snapshot", "create", "vm", "s1"]);
    assert_eq!(dup.status.code(), Some(4), "{}", text(&dup));
    let bad = m.tern(&["snapshot", "create", "vm", "no/slash"]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
    let missing = m.tern(&["snapshot", "delete", "vm", "nope"]);
    assert_eq!(missing.status.code(), Some(3), "{}", text(&missing));
    let backwards = m.tern(&["snapshot", "diff", "vm", "--from", "s3", "--to", "s2"]);
    assert_eq!(backwards.status.code(), Some(2), "{}", text(&backwards));

    // Deleting all but the last snapshot frees what only they held, on every replica, in
    // the background.
    // A deletion answers once recorded: the snapshot shows as deleting until every chunk
    // group has dropped it (batched), which `--wait` waits for.
    for s in 1..7 {
        m.must_tern(&["snapshot", "delete", "vm", &format!("s{s}")]);
    }
    let gone = tern_tests::run(30, "nbdinfo", &[&format!("nbd://{hv1}/vm@s1")]);
    assert!(!gone.status.success(), "a deleted snapshot is not exported: {}", text(&gone));
    m.must_tern(&["snapshot", "delete", "vm", "s7", "--wait"]);
    m.wait_json(&["snapshot", "list", "vm"], Duration::from_secs(30), "deletions done", |v| {
        v.as_array().is_some_and(|a| a.len() == 1)
    });
    // What s1..s7 held alone goes, and then some: with only s8 left, each of the 192 blocks
    // written has at most two versions (the head's and s8's).
    let s8_alone = snaps[7]["exclusive_bytes"].as_u64().unwrap();
    let expect = (total - (exclusive - s8_alone)).min(2 * 192 * 4096);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = usage_total(&m, "vm");
        if now <= expect {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "space not reclaimed: {now} bytes held, expected at most {expect}\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    c.wait_replicas_agree(Duration::from_secs(30));
    // The one left still reads: its export serves every block it held.
    let o = tern_tests::run(30, "nbdinfo", &[&format!("nbd://{hv1}/vm@s8")]);
    assert!(o.status.success() && text(&o).contains("read_only: true"), "{}", text(&o));
}

#[test]
fn a_snapshot_interrupted_by_a_manager_kill_is_finished_by_the_next_leader() {
    let (mut m, mut c) = deployment();
    m.must_tern(&["volume", "create", "vm", "--size", "256M"]);
    let hv1 = c.start_another_frontend("hv1", &["--manager", &m.endpoints(), "--host", "hv1"]);
    let uri = format!("nbd://{hv1}/vm");
    let o = tern_tests::run(60, "qemu-io", &["-f", "raw", "-c", "write -P 0x5a 0 1M", &uri]);
    assert!(o.status.success(), "{}", text(&o));

    // With every storage node frozen, the manager records the snapshot and then waits on
    // the chunk groups; its leader is killed there.
    for i in 0..3 {
        c.freeze(i);
    }
    let mut create = Command::new(bin("tern"))
        .args(["--endpoint", &m.endpoints(), "snapshot", "create", "vm", "mid"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    m.wait_json(&["snapshot", "list", "vm"], Duration::from_secs(20), "snapshot recorded", |v| {
        v[0]["state"] == "creating"
    });
    let leader = m.leader();
    m.kill9(leader);
    for i in 0..3 {
        c.thaw(i);
    }
    let _ = create.kill();
    let _ = create.wait();
    m.wait_json(&["snapshot", "list", "vm"], Duration::from_secs(60), "snapshot finished", |v| {
        v[0]["state"] == "ready"
    });
    // Writes after it go to the next epoch; the snapshot keeps what was there.
    let o = tern_tests::run(60, "qemu-io", &["-f", "raw", "-c", "write -P 0x33 0 1M", &uri]);
    assert!(o.status.success(), "{}", text(&o));
    let snap = format!("nbd://{hv1}/vm@mid");
    let o = tern_tests::run(60, "qemu-io", &["-r", "-f", "raw", "-c", "read -P 0x5a 0 1M", &snap]);
    assert!(o.status.success() && !text(&o).contains("fail"), "{}", text(&o));
    let o = tern_tests::run(60, "qemu-io", &["-f", "raw", "-c", "read -P 0x33 0 1M", &uri]);
    assert!(o.status.success() && !text(&o).contains("fail"), "{}", text(&o));
    // A deletion interrupted the same way is finished the same way.
    m.start_replica(leader);
    m.wait_leader(Duration::from_secs(30));
    for i in 0..3 {
        c.freeze(i);
    }
    let mut delete = Command::new(bin("tern"))
        .args(["--endpoint", &m.endpoints(), "snapshot", "delete", "vm", "mid"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    m.wait_json(&["snapshot", "list", "vm"], Duration::from_secs(20), "deletion recorded", |v| {
        v[0]["state"] == "deleting"
    });
    let leader = m.leader();
    m.kill9(leader);
    for i in 0..3 {
        c.thaw(i);
    }
    let _ = delete.kill();
    let _ = delete.wait();
    m.wait_json(&["snapshot", "list", "vm"], Duration::from_secs(60), "snapshot deleted", |v| {
        v.as_array().is_some_and(|a| a.is_empty())
    });
    let gone = tern_tests::run(30, "nbdinfo", &[&format!("nbd://{hv1}/vm@mid")]);
    assert!(!gone.status.success(), "a deleted snapshot is not exported: {}", text(&gone));
    // The storage nodes agree throughout.
    c.wait_replicas_agree(Duration::from_secs(30));
}

#[test]
fn rollback_restores_a_snapshot_and_fences_the_old_host() {
    let (m, mut c) = deployment();
    m.must_tern(&["volume", "create", "vm", "--size", "256M"]);
    let hv1 = c.start_another_frontend("hv1", &["--manager", &m.endpoints(), "--host", "hv1"]);
    let io = |addr: &std::net::SocketAddr, export: &str, cmd: &str| {
        let uri = format!("nbd://{addr}/{export}");
        let ro = if export.contains('@') { "-r" } else { "-n" };
        tern_tests::run(60, "qemu-io", &[ro, "-f", "raw", "-c", cmd, &uri])
    };
    let ok = |o: std::process::Output| {
        assert!(o.status.success() && !text(&o).contains("fail"), "{}", text(&o));
    };
    // Chunk 0 and chunk 2 (two groups) hold 0x5a in s1, 0x33 in s2, 0x77 at the head.
    for (p, snap) in [("0x5a", Some("s1")), ("0x33", Some("s2")), ("0x77", None)] {
        for off in ["0", "128M"] {
            ok(io(&hv1, "vm", &format!("write -P {p} {off} 1M")));
        }
        if let Some(s) = snap {
            m.must_tern(&["snapshot", "create", "vm", s]);
        }
    }
    // A connection hv1 keeps open across the rollback (it attached the volume).
    let script = "import nbd, sys\nh = nbd.NBD(); h.connect_uri(sys.argv[1])\nprint('READY', flush=True)\nsys.stdin.readline()\ntry:\n    h.pwrite(b'\\x11' * 65536, 0); print('WROTE')\nexcept nbd.Error as e:\n    print('REFUSED', e.errno)\n";
    let mut open = Command::new("/usr/bin/python3")
        .args(["-c", script, &format!("nbd://{hv1}/vm")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(open.stdout.take().unwrap()));
    assert_eq!(lines.next().unwrap().unwrap(), "READY");
    // Not while attached.
    let busy = m.tern(&["snapshot", "rollback", "vm", "s1"]);
    assert_eq!(busy.status.code(), Some(6), "{}", text(&busy));
    m.must_tern(&["volume", "detach", "vm", "--host", "hv1"]);
    m.must_tern(&["snapshot", "rollback", "vm", "s1"]);
    // hv1's open connection writes with the old generation: fenced off.
    std::io::Write::write_all(open.stdin.as_mut().unwrap(), b"go\n").unwrap();
    let said = lines.next().unwrap().unwrap();
    assert_eq!(said, "REFUSED EPERM", "a write of the old host after the rollback: {said}");
    let _ = open.wait();
    // Another host sees s1's content; s2 is intact; replicas agree.
    let hv2 = c.start_another_frontend("hv2", &["--manager", &m.endpoints(), "--host", "hv2"]);
    for off in ["0", "128M"] {
        ok(io(&hv2, "vm", &format!("read -P 0x5a {off} 1M")));
        ok(io(&hv2, "vm@s2", &format!("read -P 0x33 {off} 1M")));
    }
    ok(io(&hv2, "vm", "write -P 0x44 0 1M"));
    ok(io(&hv2, "vm@s1", "read -P 0x5a 0 1M"));
    c.wait_replicas_agree(Duration::from_secs(30));
    // Since s1: hv2's write, and the ranges the rollback restored under s2's versions (new
    // versions with s1's content: a backup copies them again, never misses a change).
    let diff = m.json(&["snapshot", "diff", "vm", "--from", "s1"]);
    let ranges: Vec<(u64, u64)> = diff
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(ranges, vec![(0, 1 << 20), (128 << 20, 1 << 20)], "{diff}");
}

#[test]
fn a_storage_node_killed_during_snapshots_catches_up_and_replicas_agree() {
    let (m, mut c) = deployment();
    m.must_tern(&["volume", "create", "vm", "--size", "512M"]);
    let hv1 = c.start_another_frontend("hv1", &["--manager", &m.endpoints(), "--host", "hv1"]);
    // Snapshots taken under writes while node 2 is killed and comes back: every snapshot still
    // holds exactly what was acknowledged (the script checks), and node 2 catches up.
    let endpoints = m.endpoints();
    let dir = c.dir.path().to_path_buf();
    let nbd = hv1.to_string();
    let workload =
        std::thread::spawn(move || run_snapshot_workload(&endpoints, &dir, &nbd, "vm", 10));
    std::thread::sleep(Duration::from_millis(1500));
    c.kill9(1);
    std::thread::sleep(Duration::from_secs(2));
    c.start_node(1);
    let (o, summary) = workload.join().unwrap();
    assert!(o.status.success(), "snapshot workload failed:\n{}\n{}", text(&o), c.logs());
    eprintln!("snapshot workload across a kill: {summary}");
    c.wait_replicas_agree(Duration::from_secs(60));

    // Deletions while node 3 is down reach it when it returns; its space is reclaimed too.
    c.kill9(2);
    for s in 1..=5 {
        m.must_tern(&["snapshot", "delete", "vm", &format!("s{s}"), "--wait"]);
    }
    c.start_node(2);
    c.wait_replicas_agree(Duration::from_secs(60));
    let left = m.json(&["snapshot", "list", "vm"]);
    assert_eq!(left.as_array().unwrap().len(), 5, "{left}");
    let o = tern_tests::run(30, "nbdinfo", &["--size", &format!("nbd://{hv1}/vm@s10")]);
    let size = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(o.status.success() && size == "536870912", "{}", text(&o));
}

#[test]
fn a_rollback_survives_kill9_of_a_storage_node_and_of_the_manager() {
    let (mut m, mut c) = deployment();
    m.must_tern(&["volume", "create", "vm", "--size", "256M"]);
    let hv1 = c.start_another_frontend("hv1", &["--manager", &m.endpoints(), "--host", "hv1"]);
    let io = |export: &str, cmd: &str| {
        let uri = format!("nbd://{hv1}/{export}");
        let mode = if export.contains('@') { "-r" } else { "-n" };
        let o = tern_tests::run(60, "qemu-io", &[mode, "-f", "raw", "-c", cmd, &uri]);
        assert!(o.status.success() && !text(&o).contains("fail"), "{}", text(&o));
    };
    // 16 MiB in each of the four chunks: s1 holds 0x5a, s2 0x33, the head 0x77.
    for (p, snap) in [("0x5a", Some("s1")), ("0x33", Some("s2")), ("0x77", None)] {
        for off in ["0", "64M", "128M", "192M"] {
            io("vm", &format!("write -P {p} {off} 16M"));
        }
        if let Some(s) = snap {
            m.must_tern(&["snapshot", "create", "vm", s]);
        }
    }
    m.must_tern(&["volume", "detach", "vm", "--host", "hv1"]);
    // Node 2 and the leading manager die while the rollback runs; asked again, it completes
    // (it is idempotent), and node 2 catches up to the same state.
    let mut rollback = Command::new(bin("tern"))
        .args(["--endpoint", &m.endpoints(), "snapshot", "rollback", "vm", "s1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(150));
    c.kill9(1);
    let leader = m.leader();
    m.kill9(leader);
    let _ = rollback.wait();
    m.must_tern(&["snapshot", "rollback", "vm", "s1"]);
    c.start_node(1);
    m.start_replica(leader);
    c.wait_replicas_agree(Duration::from_secs(60));
    for off in ["0", "64M", "128M", "192M"] {
        io("vm", &format!("read -P 0x5a {off} 16M"));
        io("vm@s2", &format!("read -P 0x33 {off} 16M"));
    }
}

#[test]
fn clones_share_blocks_stay_isolated_both_ways_and_flatten() {
    let (m, mut c) = deployment();
    m.must_tern(&["volume", "create", "base", "--size", "256M"]);
    let hv1 = c.start_another_frontend("hv1", &["--manager", &m.endpoints(), "--host", "hv1"]);
    let io = |export: &str, cmd: &str| {
        let uri = format!("nbd://{hv1}/{export}");
        let mode = if export.contains('@') { "-r" } else { "-n" };
        let o = tern_tests::run(60, "qemu-io", &[mode, "-f", "raw", "-c", cmd, &uri]);
        assert!(o.status.success() && !text(&o).contains("fail"), "{export}: {}", text(&o));
    };
    // base: 0x5a in chunks 0 and 2 when s1 is taken, then 0x33 over chunk 0.
    io("base", "write -P 0x5a 0 4M");
    io("base", "write -P 0x5a 128M 4M");
    m.must_tern(&["snapshot", "create", "base", "s1"]);
    io("base", "write -P 0x33 0 4M");
    // The clone is instant and reads as s1 did.
    let v = m.json(&["snapshot", "clone", "base", "s1", "c1"]);
    assert!(v["parent_volume_id"].as_u64().unwrap() > 0, "{v}");
    io("c1", "read -P 0x5a 0 4M");
    io("c1", "read -P 0x5a 128M 4M");
    io("c1", "read -P 0 8M 1M");
    // Writes to the clone (whole and partial blocks, a trim) leave base and s1 alone...
    io("c1", "write -P 0x77 0 1M");
    io("c1", "write -P 0x78 130M 1000");
    io("c1", "discard 129M 1M");
    io("base", "read -P 0x33 0 4M");
    io("base@s1", "read -P 0x5a 0 4M");
    io("base@s1", "read -P 0x5a 128M 4M");
    // ...and writes to base leave the clone alone.
    io("base", "write -P 0x44 128M 4M");
    io("c1", "read -P 0x5a 1M 3M");
    io("c1", "read -P 0x5a 128M 1M");
    io("c1", "read -P 0 129M 1M");
    io("c1", "read -P 0x78 130M 1000");
    io("c1", "read -P 0x5a 131M 1M");
    // While the clone shares s1, neither s1 nor base can go.
    let busy = m.tern(&["snapshot", "delete", "base", "s1"]);
    assert_eq!(busy.status.code(), Some(6), "{}", text(&busy));
    let busy = m.tern(&["volume", "delete", "base"]);
    assert_eq!(busy.status.code(), Some(6), "{}", text(&busy));
    // A snapshot of the clone sees through to s1 too.
    m.must_tern(&["snapshot", "create", "c1", "cs"]);
    io("c1@cs", "read -P 0x5a 128M 1M");
    // Flattened, it no longer needs base: s1 and base can go, the clone reads the same.
    let v = m.json(&["volume", "flatten", "c1"]);
    assert_eq!(v["parent_volume_id"], 0, "{v}");
    m.must_tern(&["snapshot", "delete", "base", "s1"]);
    m.must_tern(&["volume", "detach", "base", "--host", "hv1"]);
    m.must_tern(&["volume", "delete", "base"]);
    io("c1", "read -P 0x77 0 1M");
    io("c1", "read -P 0x5a 1M 3M");
    io("c1", "read -P 0x5a 128M 1M");
    io("c1", "read -P 0 129M 1M");
    io("c1", "read -P 0x78 130M 1000");
    io("c1@cs", "read -P 0x5a 131M 1M");
    c.wait_replicas_agree(Duration::from_secs(30));
}

#[test]
fn fio_verify_holds_while_snapshots_come_and_go() {
    require_tool("fio");
    require_tool("nbdcopy");
    let (m, mut c) = deployment();
    m.must_tern(&["volume", "create", "vm", "--size", "256M"]);
    let hv1 = c.start_another_frontend("hv1", &["--manager", &m.endpoints(), "--host", "hv1"]);
    let fio = Command::new("fio")
        .args([
            "--name=snapshots",
            "--ioengine=nbd",
            &format!("--uri=nbd://{hv1}/vm"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--size=256M",
            "--io_size=32M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            // No verify state file left in the working directory.
            "--verify_state_save=0",
            "--random_generator=tausworthe64",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Snapshots taken and deleted while fio writes: its writes are refused as stale and sent
    // again at each new epoch, and every one of them reads back verified.
    let mut taken = 0;
    while taken < 8 {
        std::thread::sleep(Duration::from_millis(250));
        taken += 1;
        m.must_tern(&["snapshot", "create", "vm", &format!("f{taken}")]);
        if taken % 2 == 0 {
            m.must_tern(&["snapshot", "delete", "vm", &format!("f{}", taken - 1)]);
        }
    }
    let out = fio.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "fio verify failed across snapshots\n{}\n{}",
        text(&out),
        c.logs()
    );
    // The snapshots left read whole through their exports.
    for s in [2, 4, 6, 8] {
        let o = tern_tests::run(60, "nbdcopy", &[&format!("nbd://{hv1}/vm@f{s}"), "null:"]);
        assert!(o.status.success(), "f{s}: {}", text(&o));
    }
    c.wait_replicas_agree(Duration::from_secs(30));
}

#[test]
fn a_clone_interrupted_by_a_manager_kill_is_adopted_when_asked_again() {
    let (mut m, mut c) = deployment();
    m.must_tern(&["volume", "create", "base", "--size", "64M"]);
    let hv1 = c.start_another_frontend("hv1", &["--manager", &m.endpoints(), "--host", "hv1"]);
    let o = tern_tests::run(
        60,
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5a 0 1M", &format!("nbd://{hv1}/base")],
    );
    assert!(o.status.success(), "{}", text(&o));
    m.must_tern(&["snapshot", "create", "base", "s1"]);
    // The storage nodes are frozen while the manager creates the clone there; its leader is
    // killed; asked again, the new leader finds the clone the storage cluster made (or makes
    // it) and records it.
    for i in 0..3 {
        c.freeze(i);
    }
    let mut clone = Command::new(bin("tern"))
        .args(["--endpoint", &m.endpoints(), "snapshot", "clone", "base", "s1", "c1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let leader = m.leader();
    m.kill9(leader);
    for i in 0..3 {
        c.thaw(i);
    }
    let _ = clone.kill();
    let _ = clone.wait();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = m.tern(&["snapshot", "clone", "base", "s1", "c1"]);
        let exists = String::from_utf8_lossy(&o.stderr).contains("already exists");
        if o.status.success() || exists {
            break;
        }
        assert!(Instant::now() < deadline, "clone not made: {}", text(&o));
        std::thread::sleep(Duration::from_millis(500));
    }
    let v = m.json(&["volume", "get", "c1"]);
    assert!(v["parent_volume_id"].as_u64().unwrap() > 0, "{v}");
    let o = tern_tests::run(
        60,
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x5a 0 1M", &format!("nbd://{hv1}/c1")],
    );
    assert!(o.status.success() && !text(&o).contains("fail"), "{}", text(&o));
    c.wait_replicas_agree(Duration::from_secs(30));
}
