//! `scripts/dev-cluster`, the README's first command: up brings the whole deployment up
//! (three managers, three storage nodes, a frontend) and serves the demo volume over NBD;
//! status shows it; down stops it all.

use std::net::TcpListener;
use std::process::Command;

use tern_tests::{require_tool, run, test_root, text};

fn free_port(ip: &str) -> u16 {
    TcpListener::bind(format!("{ip}:0")).unwrap().local_addr().unwrap().port()
}

#[test]
fn dev_cluster_up_serves_the_demo_volume_and_down_stops_it() {
    require_tool("qemu-io");
    let dir = tempfile::Builder::new().prefix("tern-dev-").tempdir_in(test_root()).unwrap();
    // Ports free on every datacenter's address (the defaults may be taken by a running
    // dev cluster).
    let port = || (1..=3).map(|n| free_port(&format!("127.0.{n}.1"))).max().unwrap();
    let nbd = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/dev-cluster");
    let (mport, nport) = (port().to_string(), port().to_string());
    // Three consecutive ports (managers, nodes, frontend).
    let metrics = loop {
        let p = port();
        let free = |q: u16| {
            (1..=3).all(|n| TcpListener::bind(format!("127.0.{n}.1:{q}")).is_ok())
                && TcpListener::bind(format!("127.0.0.1:{q}")).is_ok()
        };
        if p < 65000 && free(p + 1) && free(p + 2) {
            break p.to_string();
        }
    };
    let dev = |arg: &str| {
        Command::new("bash")
            .arg(script)
            .arg(arg)
            .env("TERN_DEV_DIR", dir.path())
            .env("TERN_DEV_MANAGER_PORT", &mport)
            .env("TERN_DEV_NODE_PORT", &nport)
            .env("TERN_DEV_NBD_ADDR", &nbd)
            .env("TERN_DEV_METRICS_PORT", &metrics)
            .env("TERN_DEV_GROUPS", "8")
            .env("TERN_DEV_VOLUME_SIZE", "256M")
            .output()
            .unwrap()
    };
    let up = dev("up");
    let stopped = || dev("down");
    if !up.status.success() {
        let _ = stopped();
        panic!("dev-cluster up failed\n{}", text(&up));
    }
    let uri = String::from_utf8_lossy(&up.stdout).lines().last().unwrap_or_default().to_string();
    assert_eq!(uri, format!("nbd://{nbd}/demo"), "the last line is the URI\n{}", text(&up));

    let io = run(
        60,
        "qemu-io",
        &["-f", "raw", &uri, "-c", "write -P 0x5a 1M 64k", "-c", "read -P 0x5a 1M 64k"],
    );
    let status = dev("status");
    let base: u16 = metrics.parse().unwrap();
    let frontend_metrics: std::net::SocketAddr = format!("127.0.0.1:{}", base + 2).parse().unwrap();
    let node_metrics: std::net::SocketAddr = format!("127.0.2.1:{}", base + 1).parse().unwrap();
    let manager_metrics: std::net::SocketAddr = format!("127.0.3.1:{base}").parse().unwrap();
    let pages: Vec<String> = [frontend_metrics, node_metrics, manager_metrics]
        .iter()
        .map(|a| tern_tests::metrics::must_scrape(*a))
        .collect();
    let down = stopped();
    assert!(
        io.status.success() && !String::from_utf8_lossy(&io.stdout).contains("fail"),
        "I/O through the demo volume\n{}",
        text(&io)
    );
    let st = String::from_utf8_lossy(&status.stdout);
    for role in ["manager1", "manager3", "node2", "nbd-frontend"] {
        assert!(st.lines().any(|l| l.starts_with(role) && l.contains("running")), "{role}\n{st}");
    }
    assert!(st.contains("8 healthy"), "cluster status shows the groups\n{st}");
    assert!(
        pages[0].contains("tern_frontend_ops_total{op=\"write\",volume=\"demo\"}"),
        "{}",
        pages[0]
    );
    assert!(pages[1].contains("tern_storage_node_raft_term"), "{}", pages[1]);
    assert!(pages[2].contains("tern_manager_is_leader"), "{}", pages[2]);
    assert!(down.status.success(), "{}", text(&down));
    let after = dev("status");
    let st = String::from_utf8_lossy(&after.stdout);
    assert!(!st.contains("running"), "everything stopped\n{st}");
}
