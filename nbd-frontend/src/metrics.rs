//! The NBD frontend's metrics (`tern_frontend_*`), served at `/metrics` when the frontend is
//! started with `--metrics-listen` (see `tern_common::metrics`); ARCHITECTURE.md lists them.
//!
//! Per volume (label `volume`: the export name) and operation (label `op`): requests,
//! errors, payload bytes and a latency histogram; open connections; and the gRPC backend's
//! retries and redirects ([`BackendMetrics`], owned by `GrpcBackend`).
//!
//! **Hot path**: a connection resolves its volume's handles once, after the handshake
//! ([`Metrics::volume`]); a request then costs a clock read and a few atomic increments, never
//! a label lookup. A volume's series stay until the frontend restarts, so their number is
//! bounded by the volumes this host served since it started.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

use crate::codec::Command;

/// Latency buckets, in seconds: from the NBD layer alone (~50 us) to the backend's retry
/// pauses during a failover (seconds).
const LATENCY_BUCKETS: [f64; 17] = [
    50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3,
    1.0, 2.5, 5.0, 10.0,
];

/// An NBD operation (the `op` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OpKind {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    BlockStatus,
}

impl OpKind {
    const ALL: [OpKind; 6] = [
        OpKind::Read,
        OpKind::Write,
        OpKind::Flush,
        OpKind::Trim,
        OpKind::WriteZeroes,
        OpKind::BlockStatus,
    ];

    fn label(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Flush => "flush",
            OpKind::Trim => "trim",
            OpKind::WriteZeroes => "write_zeroes",
            OpKind::BlockStatus => "block_status",
        }
    }

    /// The operation of a data command; `None` for DISC, CACHE and unknown commands.
    pub(crate) fn of(c: Command) -> Option<Self> {
        match c {
            Command::Read => Some(OpKind::Read),
            Command::Write => Some(OpKind::Write),
            Command::Flush => Some(OpKind::Flush),
            Command::Trim => Some(OpKind::Trim),
            Command::WriteZeroes => Some(OpKind::WriteZeroes),
            Command::BlockStatus => Some(OpKind::BlockStatus),
            Command::Disc | Command::Cache | Command::Unknown(_) => None,
        }
    }
}

/// The frontend's metrics. Cheap to clone (clones share everything).
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    ops: IntCounterVec,
    errors: IntCounterVec,
    bytes: IntCounterVec,
    duration: HistogramVec,
    connections: IntGauge,
    /// Handles per volume name, resolved once per volume.
    volumes: Mutex<HashMap<String, Arc<VolumeMetrics>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").field("volumes", &self.inner.volumes.lock().len()).finish()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// The metrics, registered in a registry of their own ([`Metrics::registry`]).
    pub fn new() -> Self {
        // Names, help and labels are constants: the unit tests build every metric.
        Self::build().expect("frontend metrics are well-formed")
    }

    fn build() -> prometheus::Result<Self> {
        let by_volume_op = &["volume", "op"];
        let ops = IntCounterVec::new(
            Opts::new(
                "tern_frontend_ops_total",
                "NBD requests answered, by volume and operation (refused ones included).",
            ),
            by_volume_op,
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "tern_frontend_errors_total",
                "NBD requests answered with an error, by volume and operation.",
            ),
            by_volume_op,
        )?;
        let bytes = IntCounterVec::new(
            Opts::new(
                "tern_frontend_bytes_total",
                "Payload bytes of successful NBD reads and writes, by volume (op=read|write).",
            ),
            by_volume_op,
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "tern_frontend_op_duration_seconds",
                "Time from an NBD request's arrival (its payload read) to its reply being \
                 queued, by volume and operation.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            by_volume_op,
        )?;
        let connections = IntGauge::new(
            "tern_frontend_connections",
            "Open NBD connections (in the handshake or serving a volume).",
        )?;
        let registry = Registry::new();
        registry.register(Box::new(ops.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(connections.clone()))?;
        let inner = Inner {
            registry,
            ops,
            errors,
            bytes,
            duration,
            connections,
            volumes: Mutex::default(),
        };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// The registry to serve (and to register other components' metrics in).
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// The handles of volume `name`: looked up once per connection, not per request.
    pub(crate) fn volume(&self, name: &str) -> Arc<VolumeMetrics> {
        let mut volumes = self.inner.volumes.lock();
        if let Some(v) = volumes.get(name) {
            return v.clone();
        }
        let i = &self.inner;
        let per_op = OpKind::ALL.map(|op| OpMetrics {
            ops: i.ops.with_label_values(&[name, op.label()]),
            errors: i.errors.with_label_values(&[name, op.label()]),
            duration: i.duration.with_label_values(&[name, op.label()]),
        });
        let v = Arc::new(VolumeMetrics {
            per_op,
            read_bytes: i.bytes.with_label_values(&[name, "read"]),
            written_bytes: i.bytes.with_label_values(&[name, "write"]),
        });
        volumes.insert(name.to_string(), v.clone());
        v
    }

    /// Counts an open connection until the returned guard is dropped (also by a panic).
    pub(crate) fn connection(&self) -> ConnectionGuard {
        self.inner.connections.inc();
        ConnectionGuard(self.inner.connections.clone())
    }
}

/// One open connection (see [`Metrics::connection`]).
pub(crate) struct ConnectionGuard(IntGauge);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

struct OpMetrics {
    ops: IntCounter,
    errors: IntCounter,
    duration: Histogram,
}

/// One volume's handles.
pub(crate) struct VolumeMetrics {
    per_op: [OpMetrics; 6],
    read_bytes: IntCounter,
    written_bytes: IntCounter,
}

impl VolumeMetrics {
    /// Counts one answered request: `bytes` of a read or write's payload (counted only if
    /// it succeeded), and how long it took.
    pub(crate) fn done(&self, op: OpKind, ok: bool, bytes: u64, took: Duration) {
        let m = &self.per_op[op as usize];
        m.ops.inc();
        m.duration.observe(took.as_secs_f64());
        if !ok {
            m.errors.inc();
            return;
        }
        match op {
            OpKind::Read => self.read_bytes.inc_by(bytes),
            OpKind::Write => self.written_bytes.inc_by(bytes),
            _ => {}
        }
    }
}

/// The gRPC backend's counters: how often it had to look for a chunk group's leader. Owned by
/// `GrpcBackend` (created unregistered) and registered by the binary with
/// `GrpcBackend::register_metrics`. Cheap to clone.
#[derive(Clone, Debug)]
pub struct BackendMetrics {
    /// Tries sent again after a pause: an election, a node down or unreachable, a broken
    /// stream, an attempt timeout (admin calls included).
    pub(crate) retries: IntCounter,
    /// Tries sent at once to the leader a node named (`IoError.leader`).
    pub(crate) redirects: IntCounter,
    /// Tries abandoned after `ATTEMPT_TIMEOUT` without an answer (a frozen or wedged node).
    pub(crate) attempt_timeouts: IntCounter,
}

impl Default for BackendMetrics {
    fn default() -> Self {
        let c = |name: &str, help: &str| {
            // Constant names: the unit tests build them.
            IntCounter::new(name, help).expect("backend metrics are well-formed")
        };
        Self {
            retries: c(
                "tern_frontend_backend_retries_total",
                "Storage node requests tried again after a pause (election, node down, broken \
                 stream, attempt timeout).",
            ),
            redirects: c(
                "tern_frontend_backend_redirects_total",
                "Storage node requests resent to the chunk group leader another node named.",
            ),
            attempt_timeouts: c(
                "tern_frontend_backend_attempt_timeouts_total",
                "Storage node requests given up on after 1 s without an answer, then tried \
                 elsewhere.",
            ),
        }
    }
}

impl BackendMetrics {
    pub fn register(&self, r: &Registry) -> prometheus::Result<()> {
        r.register(Box::new(self.retries.clone()))?;
        r.register(Box::new(self.redirects.clone()))?;
        r.register(Box::new(self.attempt_timeouts.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(m: &Metrics) -> String {
        String::from_utf8(tern_common::metrics::encode(m.registry()).unwrap()).unwrap()
    }

    #[test]
    fn requests_are_counted_per_volume_and_operation() {
        let m = Metrics::new();
        let a = m.volume("vol-a");
        assert!(Arc::ptr_eq(&a, &m.volume("vol-a")), "handles are resolved once per volume");
        a.done(OpKind::Write, true, 4096, Duration::from_micros(80));
        a.done(OpKind::Write, false, 4096, Duration::from_millis(3));
        a.done(OpKind::Read, true, 512, Duration::from_secs(20));
        m.volume("vol-b").done(OpKind::Flush, true, 0, Duration::from_millis(1));
        let t = text(&m);
        for want in [
            "tern_frontend_ops_total{op=\"write\",volume=\"vol-a\"} 2\n",
            "tern_frontend_errors_total{op=\"write\",volume=\"vol-a\"} 1\n",
            "tern_frontend_bytes_total{op=\"write\",volume=\"vol-a\"} 4096\n",
            "tern_frontend_bytes_total{op=\"read\",volume=\"vol-a\"} 512\n",
            "tern_frontend_ops_total{op=\"flush\",volume=\"vol-b\"} 1\n",
            "tern_frontend_op_duration_seconds_bucket{op=\"write\",volume=\"vol-a\",le=\"0.0001\"} 1\n",
            "tern_frontend_op_duration_seconds_bucket{op=\"write\",volume=\"vol-a\",le=\"0.005\"} 2\n",
            "tern_frontend_op_duration_seconds_bucket{op=\"read\",volume=\"vol-a\",le=\"10\"} 0\n",
            "tern_frontend_op_duration_seconds_count{op=\"read\",volume=\"vol-a\"} 1\n",
        ] {
            assert!(t.contains(want), "{want:?} missing from\n{t}");
        }
    }

    #[test]
    fn connections_are_counted_while_open() {
        let m = Metrics::new();
        let one = m.connection();
        let two = m.connection();
        assert!(text(&m).contains("tern_frontend_connections 2\n"));
        drop(one);
        drop(two);
        assert!(text(&m).contains("tern_frontend_connections 0\n"));
    }

    #[test]
    fn backend_counters_register_once() {
        let m = Metrics::new();
        let b = BackendMetrics::default();
        b.register(m.registry()).unwrap();
        b.redirects.inc();
        assert!(text(&m).contains("tern_frontend_backend_redirects_total 1\n"));
        assert!(b.register(m.registry()).is_err(), "registered twice");
    }

    #[test]
    fn data_commands_have_an_operation() {
        assert_eq!(OpKind::of(Command::WriteZeroes), Some(OpKind::WriteZeroes));
        assert_eq!(OpKind::of(Command::Disc), None);
        assert_eq!(OpKind::of(Command::Unknown(99)), None);
    }
}
