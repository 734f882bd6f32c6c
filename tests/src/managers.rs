//! Three volume manager replicas for tests, one per datacenter (replica N on 127.0.N.3), each
//! a real `tern-volume-manager` process with its own data directory.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use crate::{bin, log_tails, run, spawn_daemon, test_root, text};

pub struct Replica {
    pub id: u64,
    pub addr: SocketAddr,
    /// Its Prometheus endpoint (`--metrics-listen`).
    pub metrics: SocketAddr,
    child: Option<Child>,
}

pub struct Managers {
    pub dir: tempfile::TempDir,
    pub replicas: Vec<Replica>,
    args: Vec<String>,
}

impl Managers {
    /// Starts three replicas with `args` added to each command line, and waits for a leader.
    pub fn start(args: &[&str]) -> Self {
        let dir =
            tempfile::Builder::new().prefix("tern-managers-").tempdir_in(test_root()).unwrap();
        let replicas = (1..=3u64)
            .map(|i| {
                let ip = format!("127.0.{i}.3");
                let port =
                    || TcpListener::bind(format!("{ip}:0")).unwrap().local_addr().unwrap().port();
                Replica {
                    id: i,
                    addr: format!("{ip}:{}", port()).parse().unwrap(),
                    metrics: format!("{ip}:{}", port()).parse().unwrap(),
                    child: None,
                }
            })
            .collect();
        let mut m = Self { dir, replicas, args: args.iter().map(|s| s.to_string()).collect() };
        for i in 0..3 {
            m.start_replica(i);
        }
        m.wait_leader(Duration::from_secs(30));
        m
    }

    fn peers(&self) -> String {
        self.replicas
            .iter()
            .map(|r| format!("{}={}@dc{}", r.id, r.addr, r.id))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `HOST:PORT,...` as storage nodes' `--manager` takes it.
    pub fn addrs(&self) -> String {
        self.replicas.iter().map(|r| r.addr.to_string()).collect::<Vec<_>>().join(",")
    }

    /// `http://HOST:PORT,...` as the CLI's `--endpoint` takes it (any replica will do).
    pub fn endpoints(&self) -> String {
        self.replicas.iter().map(|r| format!("http://{}", r.addr)).collect::<Vec<_>>().join(",")
    }

    /// Starts replica `i` (0-based), again after a kill on the same data directory.
    pub fn start_replica(&mut self, i: usize) {
        assert!(self.replicas[i].child.is_none(), "manager {i} already running");
        let r = &self.replicas[i];
        let mut cmd = Command::new(bin("tern-volume-manager"));
        cmd.args(["--node-id", &r.id.to_string(), "--peers", &self.peers()])
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("manager{}", r.id)))
            .args(["--metrics-listen", &r.metrics.to_string()])
            .args(&self.args);
        let child =
            spawn_daemon(self.dir.path(), &format!("manager{}", r.id), cmd, r.addr, || self.logs());
        self.replicas[i].child = Some(child);
    }

    /// `kill -9` of replica `i`.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.replicas[i].child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn logs(&self) -> String {
        let names: Vec<String> = self.replicas.iter().map(|r| format!("manager{}", r.id)).collect();
        log_tails(self.dir.path(), &names.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// Runs the `tern` CLI against the managers (every replica listed: any will do).
    pub fn tern(&self, args: &[&str]) -> Output {
        let endpoints = self.endpoints();
        let mut all = vec!["--endpoint", endpoints.as_str()];
        all.extend_from_slice(args);
        run(60, bin("tern").to_str().unwrap(), &all)
    }

    pub fn must_tern(&self, args: &[&str]) -> String {
        let o = self.tern(args);
        assert!(o.status.success(), "tern {args:?} failed\n{}\n{}", text(&o), self.logs());
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `tern --json ARGS`, parsed.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.must_tern(&all);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("tern {args:?}: {e}: {out}"))
    }

    /// Index of the leading replica.
    pub fn leader(&self) -> usize {
        let s = self.json(&["cluster", "status"]);
        let id = s["leader"].as_u64().expect("leader id");
        self.replicas.iter().position(|r| r.id == id).expect("leader is a replica")
    }

    pub fn wait_leader(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let o = self.tern(&["--json", "cluster", "status"]);
            if o.status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("no leading manager after {timeout:?}\n{}", self.logs());
    }

    /// Waits until `f` holds for the output of `tern --json ARGS`.
    pub fn wait_json(
        &self,
        args: &[&str],
        timeout: Duration,
        what: &str,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.json(args);
            if f(&v) {
                return v;
            }
            if Instant::now() > deadline {
                panic!("{what}: not after {timeout:?}; last: {v}\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Managers {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        for r in &mut self.replicas {
            if let Some(mut c) = r.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
