//! Metrics in tests: scraping a daemon's `/metrics`, linting the page with `promtool check
//! metrics`, and a real Prometheus server scraping a deployment and answering PromQL. The
//! server is the `prometheus` binary of Debian's package run directly, with a configuration
//! and a database in the test's directory and a free loopback port (never the package's
//! service).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, log_tails, require_tool, wait_port};

/// The content type of a scrape (text exposition format 0.0.4).
pub const TEXT_FORMAT: &str = "text/plain; version=0.0.4";

/// An HTTP answer.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    /// The head (status line and headers), as sent.
    pub head: String,
    pub body: String,
}

impl HttpReply {
    /// The value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// `GET path` (with its query) from `addr` over HTTP/1.0, so the server closes the connection
/// after its answer; at most 10 s.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<HttpReply> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw.as_str(), ""));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok(HttpReply { status, head: head.to_string(), body: body.to_string() })
}

/// The `/metrics` page of the daemon at `addr`; panics unless it answers 200 in the text
/// format 0.0.4.
pub fn must_scrape(addr: SocketAddr) -> String {
    let r = http_get(addr, "/metrics").unwrap_or_else(|e| panic!("scraping {addr}: {e}"));
    assert_eq!(r.status, 200, "scraping {addr}: {}\n{}", r.head, r.body);
    assert_eq!(r.header("content-type"), Some(TEXT_FORMAT), "scraping {addr}: {}", r.head);
    r.body
}

/// Lints a `/metrics` page with `promtool check metrics`; panics with its findings unless it
/// is clean.
pub fn must_pass_promtool(what: &str, page: &str) {
    require_tool("promtool");
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running promtool");
    child.stdin.take().expect("promtool's stdin").write_all(page.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics refused the page of {what} ({}):\n{said}\n--- page ---\n{page}",
        out.status
    );
}

/// The value of the sample `name` (with exactly the labels given, in the page's order, e.g.
/// `tern_frontend_ops_total{op="write",volume="v"}`) on a scraped page.
pub fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// One sample of a PromQL instant query: its labels and value.
#[derive(Clone, Debug)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A Prometheus server scraping given targets every second.
pub struct Prometheus {
    pub addr: SocketAddr,
    dir: PathBuf,
    child: Option<Child>,
}

impl Prometheus {
    /// Starts Prometheus in `<dir>/prometheus` scraping `targets` (`(job, address)`) every
    /// second; returns once it is ready. Panics (with its log) if it does not start.
    pub fn start(dir: &Path, targets: &[(&str, SocketAddr)]) -> Self {
        require_tool("prometheus");
        let dir = dir.join("prometheus");
        std::fs::create_dir_all(&dir).unwrap();
        let mut jobs: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (job, addr) in targets {
            jobs.entry(job).or_default().push(format!("\"{addr}\""));
        }
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n",
        );
        for (job, addrs) in jobs {
            config += &format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: [{}]\n",
                addrs.join(", ")
            );
        }
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("running prometheus: {e}"));
        let p = Self { addr, dir, child: Some(child) };
        let deadline = Instant::now() + Duration::from_secs(30);
        let ready = wait_port(addr, Duration::from_secs(30))
            && loop {
                if http_get(addr, "/-/ready").is_ok_and(|r| r.status == 200) {
                    break true;
                }
                if Instant::now() > deadline {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(100));
            };
        assert!(ready, "prometheus did not get ready\n{}", p.log());
        p
    }

    pub fn log(&self) -> String {
        log_tails(&self.dir, &["prometheus"])
    }

    /// The answer to the instant query `promql` (`data` of the API's JSON); panics unless the
    /// query succeeds.
    pub fn query_data(&self, promql: &str) -> serde_json::Value {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let r = http_get(self.addr, &path).unwrap_or_else(|e| panic!("querying {promql}: {e}"));
        let v: serde_json::Value = serde_json::from_str(&r.body)
            .unwrap_or_else(|e| panic!("query {promql}: {e}: {} {}", r.head, r.body));
        assert_eq!(v["status"], "success", "query {promql} failed: {v}\n{}", self.log());
        v["data"].clone()
    }

    /// The samples of the instant vector query `promql`.
    pub fn query(&self, promql: &str) -> Vec<Sample> {
        let data = self.query_data(promql);
        let result = data["result"].as_array().cloned().unwrap_or_default();
        result
            .iter()
            .map(|s| {
                let labels = s["metric"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                            .collect()
                    })
                    .unwrap_or_default();
                let value = s["value"][1].as_str().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
                Sample { labels, value }
            })
            .collect()
    }

    /// Polls `promql` until `ok` holds for its samples; returns them. Panics after `timeout`
    /// with the last answer, saying `what` was awaited.
    pub fn wait_for(
        &self,
        what: &str,
        promql: &str,
        timeout: Duration,
        ok: impl Fn(&[Sample]) -> bool,
    ) -> Vec<Sample> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.query(promql);
            if ok(&got) {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "waited {timeout:?} for {what}: `{promql}` = {got:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Waits until Prometheus scraped each of `targets` successfully (`up == 1`).
    pub fn wait_all_up(&self, targets: &[(&str, SocketAddr)], timeout: Duration) {
        self.wait_for("every target up", "up", timeout, |s| {
            targets.iter().all(|(job, addr)| {
                s.iter().any(|x| {
                    x.labels.get("job").map(String::as_str) == Some(*job)
                        && x.labels.get("instance") == Some(&addr.to_string())
                        && x.value == 1.0
                })
            })
        });
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log());
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters (for a query string).
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub fn dashboard_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/tern-dashboard.json")
}

/// Every query of the Grafana dashboard, with its variables set to "everything".
pub fn dashboard_queries() -> Vec<String> {
    let path = dashboard_path();
    let raw = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let d: serde_json::Value = serde_json::from_str(&raw)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    assert_eq!(d["__inputs"][0]["name"], "DS_PROMETHEUS", "the datasource is an input");
    let mut queries = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "panel {}", p["title"]);
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            queries.push(expr.replace("$__rate_interval", "30s").replace("$volume", ".*"));
        }
    }
    assert!(queries.len() >= 15, "the dashboard lost panels: {queries:?}");
    queries
}

/// The metric names a page declares (`# TYPE`), histograms with their series' suffixes.
pub fn declared(page: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for l in page.lines() {
        let mut w = l.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (w.next(), w.next(), w.next(), w.next())
        {
            out.insert(name.to_string());
            if kind == "histogram" {
                for s in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{name}{s}"));
                }
            }
        }
    }
    out
}

/// The dashboard queries only metrics the daemons export (those of its names starting with
/// one of `prefixes`: the daemons `pages` come from), and each query is valid PromQL that
/// Prometheus evaluates.
pub fn check_dashboard(p: &Prometheus, pages: &[String], prefixes: &[&str]) {
    let known: BTreeSet<String> = pages.iter().flat_map(|p| declared(p)).collect();
    for q in dashboard_queries() {
        for name in q.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if prefixes.iter().any(|pre| name.starts_with(pre)) {
                assert!(
                    known.contains(name),
                    "the dashboard queries {name}, which no daemon exports"
                );
            }
        }
        p.query_data(&q);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_percent_encoded() {
        assert_eq!(percent_encode("up{job=\"a b\"}"), "up%7Bjob%3D%22a%20b%22%7D");
        assert_eq!(percent_encode("sum(x)/2"), "sum%28x%29%2F2");
    }

    #[test]
    fn samples_are_found_by_series() {
        let page = "# HELP a A.\n# TYPE a counter\na{op=\"w\"} 3\na{op=\"r\"} 4.5\nab 1\n";
        assert_eq!(sample(page, "a{op=\"r\"}"), Some(4.5));
        assert_eq!(sample(page, "a"), None, "a prefix of another series is not it");
        assert_eq!(sample(page, "ab"), Some(1.0));
    }
}
