//! Failover and rebuild benchmark (bench/failover runs it with release binaries):
//!
//! 1. a three-datacenter cluster, a replicated volume filled with `FILL` MiB (fio);
//! 2. the I/O stall when the node leading the most chunk groups is `kill -9`ed under the
//!    history workload (tests/scripts/history.py: the longest stretch without a completed
//!    write, with every acknowledged write checked afterwards);
//! 3. the rebuild rate when that node is replaced (`tern node replace`): bytes a replica
//!    holds divided by the replacement's duration.
//!
//! Prints a Markdown table. Environment: FILL (MiB, default 1024), CHUNK_GROUPS (32).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tern_tests::cluster::Cluster;
use tern_tests::text;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let fill = env_u64("FILL", 1024);
    let groups = env_u64("CHUNK_GROUPS", 32) as u32;
    let mut c = Cluster::start_with(groups, &["--worker-threads", "1"]);
    c.must_tern(0, &["volume", "create", "fill", "--size", &format!("{fill}M")]);
    let t = Instant::now();
    let o = Command::new("fio")
        .args([
            "--name=fill",
            "--ioengine=nbd",
            &format!("--uri={}", c.uri("fill")),
            "--rw=write",
            "--bs=1M",
            "--iodepth=8",
            &format!("--size={fill}M"),
        ])
        .output()
        .expect("fio");
    assert!(o.status.success(), "fio fill failed\n{}", text(&o));
    let fill_secs = t.elapsed().as_secs_f64();

    // Failover stall.
    let leaders = c.leaders(0);
    let (&leader_id, &led) = leaders.iter().max_by_key(|(_, n)| **n).unwrap();
    let victim = c.nodes.iter().position(|n| n.id == leader_id).unwrap();
    c.must_tern((victim + 1) % 3, &["volume", "create", "hist", "--size", "1G"]);
    let out = c.dir.path().join("history.json");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/history.py");
    let mut w = Command::new("/usr/bin/python3")
        .arg(script)
        .arg(c.uri("hist"))
        .arg("10")
        .arg(&out)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    c.kill9(victim);
    let st = w.wait().unwrap();
    let summary = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(st.success(), "history check failed across the kill: {summary}\n{}", c.logs());
    let s: serde_json::Value = serde_json::from_str(&summary).unwrap();

    // Rebuild onto a new node of the same datacenter.
    let dc = victim + 1;
    let new = c.add_node(9, dc);
    let spec = c.spec(new);
    let old = c.nodes[victim].id.to_string();
    let t = Instant::now();
    c.must_tern((victim + 1) % 3, &["node", "replace", &old, "--with", &spec]);
    let rebuild_secs = t.elapsed().as_secs_f64();
    let blocks: u64 = c.wait_replicas_agree(Duration::from_secs(120)).iter().sum();
    let bytes = blocks * 4096;
    println!("| measure | value |");
    println!("|---|---:|");
    println!(
        "| fill: {fill} MiB written with fio 1M QD8 | {:.0} MB/s |",
        fill as f64 * 1.048576 / fill_secs
    );
    println!(
        "| kill -9 of the node leading {led} of {} groups: longest write stall | {} ms |",
        groups + 1,
        s["max_write_stall_ms"]
    );
    println!(
        "| writes acknowledged / reads during the 10 s failover run | {} / {} |",
        s["writes_acknowledged"], s["reads"]
    );
    println!("| rebuild: replace the killed node, {:.0} MiB per replica | {rebuild_secs:.1} s = {:.0} MB/s |",
        bytes as f64 / 1048576.0, bytes as f64 / 1e6 / rebuild_secs);
}
