//! The harness for Tern's multi-process tests: starts real daemons (`tern-storage-node`,
//! `tern-nbd-frontend`) on free loopback ports with their state in a temporary directory, runs
//! real clients against them (qemu-io, qemu-img, libnbd tools, fio), and kills them for real.
//!
//! Helpers named `must_*` panic with the command, its output and the daemons' logs, so a
//! failing test says why. Tools are required, never optional: a missing one fails the test
//! with the command that installs it (`scripts/install-deps`).
#![forbid(unsafe_code)]

pub mod cluster;
pub mod history;
pub mod managers;
pub mod metrics;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The directory holding the workspace's built binaries (`target/<profile>`).
pub fn bin_dir() -> PathBuf {
    // Test executables live in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent().and_then(Path::parent).expect("target dir").to_path_buf()
}

/// Path of a workspace binary; panics if it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, which \
         scripts/test does)",
        p.display()
    );
    p
}

/// Panics unless `tool` is on PATH.
pub fn require_tool(tool: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "required tool {tool:?} is not installed: run scripts/install-deps");
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits until `addr` accepts TCP connections.
pub fn wait_port(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Runs a command to completion with a time limit (via coreutils `timeout`).
pub fn run(secs: u64, prog: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("-k")
        .arg("5")
        .arg(secs.to_string())
        .arg(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"))
}

pub fn text(o: &Output) -> String {
    format!(
        "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Spawns a daemon logging to `<dir>/<log>.log` and waits until it accepts connections on
/// `addr` (panicking with `logs()` if it does not).
pub fn spawn_daemon(
    dir: &Path,
    log: &str,
    cmd: Command,
    addr: SocketAddr,
    logs: impl Fn() -> String,
) -> Child {
    let child = spawn_daemon_nowait(dir, log, cmd);
    if !wait_port(addr, Duration::from_secs(20)) {
        panic!("{log} did not come up\n{}", logs());
    }
    child
}

/// Spawns a daemon logging to `<dir>/<log>.log`, without waiting for it.
pub fn spawn_daemon_nowait(dir: &Path, log: &str, mut cmd: Command) -> Child {
    let file = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{log}.log")))
            .unwrap()
    };
    cmd.env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(file())
        .stderr(file())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {log}: {e}"))
}

/// The last 40 lines of each `<dir>/<name>.log`, after any panic message in it (a backtrace
/// would push it out of the tail).
pub fn log_tails(dir: &Path, names: &[&str]) -> String {
    let mut s = String::new();
    for n in names {
        let t = std::fs::read_to_string(dir.join(format!("{n}.log"))).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            if l.contains("panicked at") {
                s += &format!("--- {n}.log: {}\n", lines[i..(i + 3).min(lines.len())].join("\n"));
            }
        }
        let tail: Vec<&str> = t.lines().rev().take(40).collect();
        s += &format!("--- {n}.log (last 40 lines) ---\n");
        for l in tail.into_iter().rev() {
            s += l;
            s += "\n";
        }
    }
    s
}

/// One storage node and one NBD frontend, each a real process.
pub struct Deployment {
    pub dir: tempfile::TempDir,
    pub node_addr: SocketAddr,
    pub nbd_addr: SocketAddr,
    /// Where the node and the frontend serve `/metrics` (with [`Self::start_with_metrics`]).
    pub node_metrics: Option<SocketAddr>,
    pub frontend_metrics: Option<SocketAddr>,
    node: Option<Child>,
    frontend: Option<Child>,
    pub io_engine: String,
}

impl Deployment {
    /// Starts a node (io_uring engine) and a frontend.
    pub fn start() -> Self {
        Self::start_with_engine("uring")
    }

    pub fn start_with_engine(engine: &str) -> Self {
        Self::launch(engine, false)
    }

    /// As [`Self::start`], both daemons serving their metrics (`--metrics-listen`).
    pub fn start_with_metrics() -> Self {
        Self::launch("uring", true)
    }

    fn launch(engine: &str, metrics: bool) -> Self {
        let dir = tempfile::Builder::new().prefix("tern-test-").tempdir_in(test_root()).unwrap();
        let local = || -> SocketAddr { format!("127.0.0.1:{}", free_port()).parse().unwrap() };
        let mut d = Self {
            dir,
            node_addr: local(),
            nbd_addr: local(),
            node_metrics: metrics.then(local),
            frontend_metrics: metrics.then(local),
            node: None,
            frontend: None,
            io_engine: engine.to_string(),
        };
        d.start_node();
        d.start_frontend();
        d
    }

    fn spawn_daemon(&self, log: &str, cmd: Command, addr: SocketAddr) -> Child {
        spawn_daemon(self.dir.path(), log, cmd, addr, || self.logs())
    }

    pub fn start_node(&mut self) {
        assert!(self.node.is_none(), "node already running");
        let mut cmd = Command::new(bin("tern-storage-node"));
        cmd.args(["--listen", &self.node_addr.to_string()])
            .arg("--data-dir")
            .arg(self.dir.path().join("node"))
            .args(["--io-engine", &self.io_engine]);
        if let Some(m) = self.node_metrics {
            cmd.args(["--metrics-listen", &m.to_string()]);
        }
        self.node = Some(self.spawn_daemon("node", cmd, self.node_addr));
    }

    pub fn start_frontend(&mut self) {
        assert!(self.frontend.is_none(), "frontend already running");
        let mut cmd = Command::new(bin("tern-nbd-frontend"));
        cmd.args(["--listen", &self.nbd_addr.to_string()])
            .args(["--storage", &format!("http://{}", self.node_addr)]);
        if let Some(m) = self.frontend_metrics {
            cmd.args(["--metrics-listen", &m.to_string()]);
        }
        self.frontend = Some(self.spawn_daemon("frontend", cmd, self.nbd_addr));
    }

    /// `kill -9` of the storage node.
    pub fn kill9_node(&mut self) {
        if let Some(mut c) = self.node.take() {
            c.kill().unwrap(); // SIGKILL
            c.wait().unwrap();
        }
    }

    pub fn kill9_frontend(&mut self) {
        if let Some(mut c) = self.frontend.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Both daemons still running (neither crashed).
    pub fn must_be_alive(&mut self) {
        let mut dead = Vec::new();
        for (name, c) in [("storage node", &mut self.node), ("frontend", &mut self.frontend)] {
            if let Some(st) = c.as_mut().and_then(|c| c.try_wait().unwrap()) {
                dead.push(format!("{name} exited with {st}"));
            }
        }
        assert!(dead.is_empty(), "{}\n{}", dead.join("; "), self.logs());
    }

    pub fn logs(&self) -> String {
        log_tails(self.dir.path(), &["node", "frontend"])
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.node_addr)
    }

    pub fn uri(&self, volume: &str) -> String {
        format!("nbd://{}/{volume}", self.nbd_addr)
    }

    /// Runs the `tern` CLI against this deployment.
    pub fn tern(&self, args: &[&str]) -> Output {
        let endpoint = self.endpoint();
        let mut all = vec!["--endpoint", endpoint.as_str()];
        all.extend_from_slice(args);
        run(30, bin("tern").to_str().unwrap(), &all)
    }

    pub fn must_tern(&self, args: &[&str]) -> String {
        let o = self.tern(args);
        assert!(o.status.success(), "tern {args:?} failed\n{}\n{}", text(&o), self.logs());
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn create_volume(&self, name: &str, size: &str) {
        self.must_tern(&["volume", "create", name, "--size", size]);
    }

    /// Runs a client and panics with everything useful if it fails.
    pub fn must_run(&self, secs: u64, prog: &str, args: &[&str]) -> String {
        require_tool(prog);
        let o = run(secs, prog, args);
        assert!(o.status.success(), "{prog} {args:?} failed\n{}\n{}", text(&o), self.logs());
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs a Python script with libnbd's bindings (Debian's python3-libnbd), passing `args`.
    pub fn python(&self, secs: u64, script: &str, args: &[&str]) -> Output {
        let path = self.dir.path().join(format!("script-{}.py", free_port()));
        std::fs::write(&path, script).unwrap();
        let mut all = vec![path.to_str().unwrap()];
        all.extend_from_slice(args);
        run(secs, "/usr/bin/python3", &all)
    }

    pub fn must_python(&self, secs: u64, script: &str, args: &[&str]) -> String {
        let o = self.python(secs, script, args);
        assert!(
            o.status.success(),
            "python script failed\n{script}\n{}\n{}",
            text(&o),
            self.logs()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        for c in [self.frontend.take(), self.node.take()].into_iter().flatten() {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Where test state goes: `$TERN_TEST_DIR`, or the system temp dir. It must be a filesystem
/// with O_DIRECT and hole punching (ext4, xfs), which /tmp on this machine is.
pub fn test_root() -> PathBuf {
    let p = std::env::var_os("TERN_TEST_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// Deterministic pseudo-random bytes (xorshift), for test images.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
