//! The daemons' Prometheus endpoint: serves a [`prometheus::Registry`] over HTTP at
//! `GET /metrics` in the text exposition format 0.0.4, and [`Family`], the helper for metrics
//! whose values are read when scraped. Behind the `metrics` feature of `tern-common`.
//!
//! Every daemon (storage node, NBD frontend, volume manager) owns its metrics in its own
//! `metrics.rs`, registers them in one `Registry`, and hands it to [`spawn`] when started with
//! `--metrics-listen HOST:PORT`:
//!
//! ```no_run
//! # async fn f() -> std::io::Result<()> {
//! let registry = prometheus::Registry::new();
//! // ... register the daemon's counters, gauges, histograms and collectors ...
//! let bound = tern_common::metrics::spawn("127.0.0.1:9100".parse().unwrap(), registry).await?;
//! # let _ = bound; Ok(()) }
//! ```
//!
//! Answers: `200` with `Content-Type: text/plain; version=0.0.4` for `GET` (and `HEAD`)
//! `/metrics` (any query string is ignored), `404` for another path, `405` for another
//! method, `500` if encoding fails (a collector producing inconsistent families).
//!
//! **Invariant: nothing a client sends can harm the daemon.** Each connection runs in its own
//! task; at most [`MAX_CONNECTIONS`] at once (more are closed at once, so the accept loop never
//! waits); request heads are limited in size ([`MAX_BUF`]) and time ([`HEADER_TIMEOUT`], which
//! also closes idle keep-alive connections); a connection lives at most
//! [`MAX_CONNECTION_AGE`] (a client that never reads its answer is dropped); accept errors
//! (out of file descriptors) pause the loop instead of ending it. Encoding runs on the
//! blocking pool: collectors may make a quick syscall (`statvfs`) without stalling a runtime
//! worker.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::core::Desc;
use prometheus::proto::{self, MetricType};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

/// The path served.
pub const PATH: &str = "/metrics";
/// The `Content-Type` of a scrape: Prometheus' text exposition format 0.0.4.
pub const CONTENT_TYPE_TEXT: &str = prometheus::TEXT_FORMAT;
/// Connections served at once; more are closed on accept. Scrapers use one or two each.
pub const MAX_CONNECTIONS: usize = 32;
/// A request head must arrive within this; an idle keep-alive connection is closed after it.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection is closed (gracefully: the request in progress is answered) after this.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(120);
/// Read buffer of a connection: bounds a request head (hyper's minimum is 8 KiB).
pub const MAX_BUF: usize = 16 << 10;
/// After a graceful close starts, the answer in progress gets this long to go out.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Binds `addr`, logs the bound address ("metrics listening on ...") and serves `registry`
/// there in a background task for the life of the runtime. Returns the bound address (`addr`
/// may have port 0).
pub async fn spawn(addr: SocketAddr, registry: Registry) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    info!("metrics listening on http://{bound}{PATH}");
    tokio::spawn(serve(listener, registry));
    Ok(bound)
}

/// Serves `registry` on `listener` until dropped: one task per connection, within the limits
/// described in the module documentation. Never returns on its own.
pub async fn serve(listener: TcpListener, registry: Registry) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, or a connection reset before it was accepted:
                // pause rather than spin, and keep serving.
                warn!(error = %e, "accepting a metrics connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "too many metrics connections; closing a new one");
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            connection(stream, registry).await;
            drop(slot);
        });
    }
}

async fn connection(stream: tokio::net::TcpStream, registry: Registry) {
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let registry = registry.clone();
        async move { Ok::<_, Infallible>(answer(&registry, req.method(), req.uri().path()).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_BUF)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = tokio::time::sleep(MAX_CONNECTION_AGE) => {
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout(CLOSE_GRACE, conn.as_mut()).await.unwrap_or(Ok(()))
        }
    };
    // Malformed requests, timeouts and clients going away end up here: theirs to fix.
    if let Err(e) = result {
        debug!(error = %e, "metrics connection ended");
    }
}

/// The answer to one request: the routing and status codes of the endpoint.
async fn answer(registry: &Registry, method: &Method, path: &str) -> Response<Full<Bytes>> {
    if path != PATH {
        return plain(StatusCode::NOT_FOUND, format!("not found: metrics are at {PATH}\n"));
    }
    if method != Method::GET && method != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into());
        r.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let registry = registry.clone();
    match tokio::task::spawn_blocking(move || encode(&registry)).await {
        Ok(Ok(body)) => {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_TEXT));
            r
        }
        Ok(Err(e)) => {
            warn!(error = %e, "encoding metrics failed");
            plain(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics failed: {e}\n"))
        }
        Err(e) => {
            warn!(error = %e, "a metrics collector panicked");
            plain(StatusCode::INTERNAL_SERVER_ERROR, "a metrics collector failed\n".into())
        }
    }
}

fn plain(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// Everything `registry` holds, in the text exposition format.
pub fn encode(registry: &Registry) -> prometheus::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(16 << 10);
    TextEncoder::new().encode(&registry.gather(), &mut out)?;
    Ok(out)
}

/// A metric family whose samples are computed when scraped, from values the daemon keeps
/// anyway (counters it already maintains as atomics, Raft state, filesystem sizes): no
/// second copy to keep in step, and nothing runs between scrapes.
///
/// A custom [`prometheus::core::Collector`] holds its families, returns their descriptors
/// from `desc()`, and builds them from fresh values in `collect()`.
#[derive(Clone, Debug)]
pub struct Family {
    desc: Desc,
    kind: MetricType,
}

impl Family {
    /// A counter (the name must end in `_total`) with the given label names.
    pub fn counter(name: &str, help: &str, labels: &[&str]) -> prometheus::Result<Self> {
        Self::new(name, help, labels, MetricType::COUNTER)
    }

    /// A gauge with the given label names.
    pub fn gauge(name: &str, help: &str, labels: &[&str]) -> prometheus::Result<Self> {
        Self::new(name, help, labels, MetricType::GAUGE)
    }

    fn new(name: &str, help: &str, labels: &[&str], kind: MetricType) -> prometheus::Result<Self> {
        let labels = labels.iter().map(|l| l.to_string()).collect();
        let desc = Desc::new(name.into(), help.into(), labels, HashMap::new())?;
        Ok(Self { desc, kind })
    }

    pub fn desc(&self) -> &Desc {
        &self.desc
    }

    /// The family with one sample per `(label values, value)`; the label values are in the
    /// order of the label names given at creation. A sample with the wrong number of label
    /// values is a bug: it is left out (in debug builds, it panics).
    pub fn collect<'a, L>(&self, samples: impl IntoIterator<Item = (L, f64)>) -> proto::MetricFamily
    where
        L: AsRef<[&'a str]>,
    {
        let names = &self.desc.variable_labels;
        let metrics = samples
            .into_iter()
            .filter(|(values, _)| {
                let ok = values.as_ref().len() == names.len();
                debug_assert!(ok, "{}: label values do not match {names:?}", self.desc.fq_name);
                ok
            })
            .map(|(values, v)| {
                let pairs = names
                    .iter()
                    .zip(values.as_ref())
                    .map(|(n, v)| {
                        let mut p = proto::LabelPair::default();
                        p.set_name(n.clone());
                        p.set_value(v.to_string());
                        p
                    })
                    .collect();
                let mut m = proto::Metric::from_label(pairs);
                match self.kind {
                    MetricType::COUNTER => {
                        let mut c = proto::Counter::default();
                        c.set_value(v);
                        m.set_counter(c);
                    }
                    _ => {
                        let mut g = proto::Gauge::default();
                        g.set_value(v);
                        m.set_gauge(g);
                    }
                }
                m
            })
            .collect();
        let mut f = proto::MetricFamily::default();
        f.set_name(self.desc.fq_name.clone());
        f.set_help(self.desc.help.clone());
        f.set_field_type(self.kind);
        f.set_metric(metrics);
        f
    }

    /// The family as one sample without labels.
    pub fn single(&self, value: f64) -> proto::MetricFamily {
        let none: &[&str] = &[];
        self.collect([(none, value)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    fn registry() -> Registry {
        let r = Registry::new();
        let c = prometheus::IntCounter::new("tern_test_things_total", "Things done.").unwrap();
        c.inc_by(7);
        r.register(Box::new(c)).unwrap();
        r
    }

    async fn start() -> SocketAddr {
        spawn("127.0.0.1:0".parse().unwrap(), registry()).await.unwrap()
    }

    /// Sends `raw` on a fresh connection and reads until the server closes it (every request
    /// here asks for that, or is bad enough to be closed on).
    async fn exchange(addr: SocketAddr, raw: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(raw).await.unwrap();
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out)).await;
        read.expect("the server answers and closes in time").unwrap_or_default();
        String::from_utf8_lossy(&out).into_owned()
    }

    fn status(resp: &str) -> u16 {
        resp.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
    }

    fn header<'a>(resp: &'a str, name: &str) -> Option<&'a str> {
        resp.split("\r\n\r\n").next()?.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn get(path: &str) -> Vec<u8> {
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").into_bytes()
    }

    #[tokio::test]
    async fn metrics_are_served_as_text_0_0_4() {
        let addr = start().await;
        let r = exchange(addr, &get("/metrics")).await;
        assert_eq!(status(&r), 200, "{r}");
        assert_eq!(header(&r, "content-type"), Some("text/plain; version=0.0.4"));
        assert!(r.contains("# HELP tern_test_things_total Things done."), "{r}");
        assert!(r.contains("# TYPE tern_test_things_total counter"), "{r}");
        assert!(r.contains("\ntern_test_things_total 7\n"), "{r}");
        // A query string is fine (some scrapers add one).
        assert_eq!(status(&exchange(addr, &get("/metrics?x=1")).await), 200);
        // HEAD: the headers without the body.
        let head =
            exchange(addr, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
        assert_eq!(status(&head), 200, "{head}");
        assert!(!head.contains("tern_test_things_total"), "{head}");
    }

    #[tokio::test]
    async fn other_paths_and_methods_are_refused() {
        let addr = start().await;
        for path in ["/", "/metricsx", "/metrics/", "/favicon.ico"] {
            let r = exchange(addr, &get(path)).await;
            assert_eq!(status(&r), 404, "{path}: {r}");
        }
        for method in ["POST", "PUT", "DELETE", "OPTIONS"] {
            let raw = format!(
                "{method} /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\
                 Connection: close\r\n\r\nabc"
            );
            let r = exchange(addr, raw.as_bytes()).await;
            assert_eq!(status(&r), 405, "{method}: {r}");
            assert_eq!(header(&r, "allow"), Some("GET, HEAD"), "{r}");
        }
    }

    #[tokio::test]
    async fn garbage_does_not_harm_the_server() {
        let addr = start().await;
        // Not HTTP at all, binary junk, a head larger than the buffer, a truncated request
        // line: each is answered with an error or closed, and the server keeps serving.
        let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(64 << 10));
        let junk: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        for raw in [&b"hello\r\n\r\n"[..], &junk, huge.as_bytes(), b"GET /metr"] {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let _ = s.write_all(raw).await;
            // Half-close: the truncated request can never complete.
            let _ = s.shutdown().await;
            let mut out = Vec::new();
            let r = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out)).await;
            assert!(r.is_ok(), "the server must close a bad connection in time");
            let text = String::from_utf8_lossy(&out);
            assert!(text.is_empty() || !text.contains(" 200 "), "{text}");
        }
        // Many idle connections beyond the limit: refused, not queued.
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS + 8 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        drop(idle);
        // Still serving.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = exchange(addr, &get("/metrics")).await;
        assert_eq!(status(&r), 200, "{r}");
    }

    #[tokio::test]
    async fn keep_alive_serves_several_scrapes_on_one_connection() {
        let addr = start().await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        for _ in 0..3 {
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
            let mut buf = vec![0u8; 8192];
            let mut got = String::new();
            while !got.contains("tern_test_things_total 7\n") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed early: {got}");
                got.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
            assert_eq!(status(&got), 200);
        }
    }

    #[test]
    fn families_build_counters_and_gauges_with_labels() {
        let c = Family::counter("tern_test_repairs_total", "Repairs.", &[]).unwrap();
        let g = Family::gauge("tern_test_groups", "Groups by role.", &["role"]).unwrap();
        let r = Registry::new();
        struct Both(Family, Family);
        impl prometheus::core::Collector for Both {
            fn desc(&self) -> Vec<&Desc> {
                vec![self.0.desc(), self.1.desc()]
            }
            fn collect(&self) -> Vec<proto::MetricFamily> {
                vec![self.0.single(3.0), self.1.collect([(["leader"], 2.0), (["follower"], 5.0)])]
            }
        }
        r.register(Box::new(Both(c, g))).unwrap();
        let text = String::from_utf8(encode(&r).unwrap()).unwrap();
        assert!(
            text.contains("# TYPE tern_test_repairs_total counter\ntern_test_repairs_total 3\n")
        );
        assert!(text.contains("# TYPE tern_test_groups gauge\n"), "{text}");
        assert!(text.contains("tern_test_groups{role=\"leader\"} 2\n"), "{text}");
        assert!(text.contains("tern_test_groups{role=\"follower\"} 5\n"), "{text}");
        assert!(Family::gauge("bad name", "x", &[]).is_err());
    }
}
