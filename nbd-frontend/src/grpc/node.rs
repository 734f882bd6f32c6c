//! The connections to one storage node: a few long-lived `Io` streams ([`Lane`]s) for data,
//! and a channel for control calls (volume admin, cluster map).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tern_proto::v1::{
    self, block_io_client::BlockIoClient, cluster_client::ClusterClient,
    volume_admin_client::VolumeAdminClient,
};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::{Channel, Endpoint};

use super::{map_status, Reply};
use crate::backend::BackendError;

/// `Io` streams (and HTTP/2 connections) to each storage node for data.
const DATA_LANES: usize = 2;
/// Requests a lane queues before senders wait.
const LANE_DEPTH: usize = 1024;
/// How long a node may take to send its cluster map: a map is small, and a node that cannot
/// send it promptly is no good guide to the cluster.
const MAP_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 pings to cluster members: a node that vanished without closing its connections
/// (power loss, partition) is noticed within interval + timeout, well inside the retry budget,
/// and its requests move to another node.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// One storage node. Lanes and channels connect on first use.
pub(crate) struct Node {
    /// The node's id in the cluster map; 0 for a configured endpoint (not yet identified).
    pub id: u64,
    /// The gRPC endpoint, e.g. `http://127.0.0.1:7700`.
    pub uri: String,
    lanes: Vec<Lane>,
    next: AtomicUsize,
    control: Channel,
}

impl Node {
    /// A configured endpoint (`--storage`): the connections are set up exactly as they were
    /// before clusters, so a single node is served as before.
    pub fn seed(uri: &str) -> Result<Self, tonic::transport::Error> {
        Ok(Self::connect_lazy(0, uri, endpoint(uri)?))
    }

    /// A member of the cluster map, watched by HTTP/2 keep-alive pings.
    pub fn member(id: u64, uri: &str) -> Result<Self, tonic::transport::Error> {
        let ep = endpoint(uri)?
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT);
        Ok(Self::connect_lazy(id, uri, ep))
    }

    fn connect_lazy(id: u64, uri: &str, ep: Endpoint) -> Self {
        let lanes = (0..DATA_LANES)
            .map(|_| Lane {
                client: BlockIoClient::new(ep.connect_lazy())
                    .max_decoding_message_size(64 << 20)
                    .max_encoding_message_size(64 << 20),
                current: tokio::sync::Mutex::new(None),
                next_id: AtomicU64::new(0),
            })
            .collect();
        let control = ep.connect_lazy();
        Self { id, uri: uri.to_string(), lanes, next: AtomicUsize::new(0), control }
    }

    /// Sends one data request on one of the lanes, in turn. The node's answer is returned as
    /// it came (it may be an `IoError`); `Err` means the stream broke or could not be opened.
    /// (The lane's own future, not one wrapped around it: it is part of every request's task.)
    pub fn call(
        &self,
        op: v1::io_request::Op,
    ) -> impl Future<Output = Result<Reply, BackendError>> + Send + '_ {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.lanes[i % self.lanes.len()].call(op)
    }

    pub fn admin(&self) -> VolumeAdminClient<Channel> {
        VolumeAdminClient::new(self.control.clone())
    }

    /// The node's view of the cluster. Old nodes answer `UNIMPLEMENTED`.
    pub async fn cluster_map(&self) -> Result<v1::ClusterMap, tonic::Status> {
        let mut client = ClusterClient::new(self.control.clone());
        let call = client.get_cluster_map(v1::GetClusterMapRequest {});
        match tokio::time::timeout(MAP_TIMEOUT, call).await {
            Ok(r) => r.map(tonic::Response::into_inner),
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "{} sent no cluster map within {MAP_TIMEOUT:?}",
                self.uri
            ))),
        }
    }
}

fn endpoint(uri: &str) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(uri.to_string())?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(3))
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(32 << 20)
        // Large frames: a 1 MiB read comes back in a few frames instead of 64 of 16 KiB.
        .max_frame_size(1 << 20))
}

/// The datacenter this frontend runs in, sent on every `Io` stream (see
/// [`set_datacenter`]).
static DATACENTER: std::sync::OnceLock<tonic::metadata::AsciiMetadataValue> =
    std::sync::OnceLock::new();

/// Names this host's datacenter to the storage nodes (once, at start-up): the leaders of the
/// chunk groups it sends requests to move there.
pub fn set_datacenter(dc: &str) -> Result<(), String> {
    let valid = !dc.is_empty()
        && dc.len() <= 64
        && dc.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !valid {
        return Err(format!(
            "bad datacenter name {dc:?}: 1-64 characters of letters, digits, '-', '_' or '.'"
        ));
    }
    let v = dc.parse().map_err(|e| format!("bad datacenter name {dc:?}: {e}"))?;
    DATACENTER.set(v).map_err(|_| "the datacenter is already set".to_string())
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Reply, BackendError>>>>>;

/// One `Io` stream on its own HTTP/2 connection, established on first use and again after it
/// breaks, carrying many requests matched to their responses by id.
struct Lane {
    client: BlockIoClient<Channel>,
    current: tokio::sync::Mutex<Option<Stream>>,
    next_id: AtomicU64,
}

/// An established stream: where to send requests and who waits for which id.
#[derive(Clone)]
struct Stream {
    tx: mpsc::Sender<v1::IoRequest>,
    pending: Pending,
}

impl Lane {
    /// The live stream, establishing one if there is none (or the last one broke).
    async fn stream(&self) -> Result<Stream, BackendError> {
        let mut cur = self.current.lock().await;
        if let Some(s) = cur.as_ref().filter(|s| !s.tx.is_closed()) {
            return Ok(s.clone());
        }
        let (tx, rx) = mpsc::channel(LANE_DEPTH);
        let pending: Pending = Arc::default();
        let mut open = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        if let Some(dc) = DATACENTER.get() {
            open.metadata_mut().insert(tern_common::DATACENTER_HEADER, dc.clone());
        }
        // A stream that cannot be opened for no stated reason is the node's or the
        // connection's trouble ("transport error" comes as UNKNOWN when a connection breaks
        // while the stream starts): another node, or a later try, may do. Not EIO.
        let mut inbound = self
            .client
            .clone()
            .io(open)
            .await
            .map_err(|s| match map_status(s) {
                BackendError::Io(m) => {
                    BackendError::Unavailable(format!("opening an I/O stream: {m}"))
                }
                e => e,
            })?
            .into_inner();
        let p = pending.clone();
        tokio::spawn(async move {
            let why = loop {
                match inbound.message().await {
                    Ok(Some(resp)) => {
                        let waiter = p.lock().remove(&resp.id);
                        if let (Some(w), Some(r)) = (waiter, resp.result) {
                            let _ = w.send(Ok(r));
                        }
                    }
                    Ok(None) => break "storage node closed the I/O stream".to_string(),
                    Err(s) => break s.message().to_string(),
                }
            };
            // Everything still waiting on this stream fails (EIO, or a retry on another node
            // in a cluster); the next request opens a new stream.
            for (_, w) in p.lock().drain() {
                let _ = w.send(Err(BackendError::Unavailable(why.clone())));
            }
        });
        let s = Stream { tx, pending };
        *cur = Some(s.clone());
        Ok(s)
    }

    async fn call(&self, op: v1::io_request::Op) -> Result<Reply, BackendError> {
        let s = self.stream().await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (w, r) = oneshot::channel();
        s.pending.lock().insert(id, w);
        if s.tx.send(v1::IoRequest { id, op: Some(op) }).await.is_err() {
            s.pending.lock().remove(&id);
            return Err(BackendError::Unavailable("I/O stream closed".into()));
        }
        match r.await {
            Ok(result) => result,
            Err(_) => Err(BackendError::Unavailable("I/O stream dropped the request".into())),
        }
    }
}
