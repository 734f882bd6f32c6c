//! The history workload (`tests/scripts/history.py`): writers and readers on blocks of a
//! volume over NBD, every operation recorded, the history checked at the end (no lost
//! acknowledged write, no stale read, no I/O error).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::require_tool;

pub struct Workload {
    child: Child,
    /// The JSON summary the script writes at the end.
    pub out: PathBuf,
    log: PathBuf,
}

impl Workload {
    /// Starts the workload on `uri` for `secs` seconds, its files in `dir` named after
    /// `name`; returns once it is writing. `logs` explains a failure to start.
    pub fn start(dir: &Path, uri: &str, name: &str, secs: u32, logs: impl Fn() -> String) -> Self {
        require_tool("python3");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/history.py");
        let out = dir.join(format!("history-{name}.json"));
        let mut child = Command::new("/usr/bin/python3")
            .arg(script)
            .arg(uri)
            .arg(secs.to_string())
            .arg(&out)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        match lines.next() {
            Some(Ok(l)) if l == "READY" => {}
            other => panic!("workload did not start: {other:?}\n{}", logs()),
        }
        // Keep draining stdout in the background so the script never blocks on a full pipe.
        let log = dir.join(format!("history-{name}.log"));
        let log2 = log.clone();
        std::thread::spawn(move || {
            let all: Vec<String> = lines.map_while(Result::ok).collect();
            std::fs::write(log2, all.join("\n")).unwrap();
        });
        Self { child, out, log }
    }

    /// Waits for the workload; returns (success, its report).
    pub fn finish(self) -> (bool, String) {
        let out = self.child.wait_with_output().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let report = format!("{log}\n{}", String::from_utf8_lossy(&out.stderr));
        (out.status.success(), report)
    }

    /// The summary (counts, longest write stall) of a finished workload.
    pub fn summary(path: &Path) -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }
}
