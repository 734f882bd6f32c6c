//! The connections to one storage node: a few long-lived data lanes ([`Lane`]s, see
//! `tern_proto::lane`) for data, and a gRPC channel for control calls (volume admin, cluster
//! map).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use parking_lot::Mutex;
use tern_proto::lane;
use tern_proto::v1::{self, cluster_client::ClusterClient, volume_admin_client::VolumeAdminClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot, watch};
use tonic::transport::{Channel, Endpoint};

use super::Reply;
use crate::backend::BackendError;

/// Data lanes (TCP connections) to each storage node.
const DATA_LANES: usize = 2;
/// Requests a lane queues before senders wait.
const LANE_DEPTH: usize = 1024;
/// How long a node may take to send its cluster map: a map is small, and a node that cannot
/// send it promptly is no good guide to the cluster.
const MAP_TIMEOUT: Duration = Duration::from_secs(2);
/// Pings to cluster members (HTTP/2 pings on the control channel, lane pings on data lanes):
/// a node that vanished without closing its connections (power loss, partition) is noticed
/// within interval + timeout, well inside the retry budget, and its requests move to another
/// node. A lane pings only after an interval in which it heard nothing.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long opening a lane's TCP connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Requests gathered into one write even if more are queued.
const WRITE_BATCH: usize = 4 << 20;
/// A lane's write buffer is given back after a write larger than this (a 64 MiB request must
/// not pin 64 MiB for the life of the lane).
const KEEP_BUFFER: usize = 8 << 20;
/// The id of lane pings (requests count up from 0 and never reach it).
const PING_ID: u64 = u64::MAX;

/// One storage node. Lanes and channels connect on first use.
pub(crate) struct Node {
    /// The node's id in the cluster map; 0 for a configured endpoint (not yet identified).
    pub id: u64,
    /// The gRPC endpoint, e.g. `http://127.0.0.1:7700` (lanes go to the same host and port).
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
        // Members are pinged; a lone configured node is waited for, as a disk would be.
        let keepalive = id != 0;
        let addr = lane_addr(uri);
        let lanes = (0..DATA_LANES)
            .map(|_| Lane {
                addr: addr.clone(),
                keepalive,
                current: tokio::sync::Mutex::new(None),
                next_id: AtomicU64::new(0),
            })
            .collect();
        let control = ep.connect_lazy();
        Self { id, uri: uri.to_string(), lanes, next: AtomicUsize::new(0), control }
    }

    /// Sends one data request on one of the lanes, in turn. The node's answer is returned as
    /// it came (it may be an `IoError`); `Err` means the lane broke or could not be opened.
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

/// `host:port` of a gRPC endpoint (`http://host:port/`).
fn lane_addr(uri: &str) -> String {
    let rest = uri.split_once("://").map_or(uri, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest).to_string()
}

/// The datacenter this frontend runs in, sent in every lane's hello (see [`set_datacenter`]).
static DATACENTER: std::sync::OnceLock<String> = std::sync::OnceLock::new();

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
    DATACENTER.set(dc.to_string()).map_err(|_| "the datacenter is already set".to_string())
}

/// Who waits for which id on one lane; `closed` once the lane broke (with why), after which
/// nobody is added.
#[derive(Default)]
struct Waiters {
    by_id: HashMap<u64, oneshot::Sender<Result<Reply, BackendError>>>,
    closed: Option<String>,
}

type Pending = Arc<Mutex<Waiters>>;

/// One data lane to the node, opened on first use and again after it breaks, carrying many
/// requests matched to their responses by id.
struct Lane {
    /// `host:port` of the node.
    addr: String,
    /// Ping when the lane has heard nothing for a while (members of a cluster).
    keepalive: bool,
    current: tokio::sync::Mutex<Option<Stream>>,
    next_id: AtomicU64,
}

/// An open lane: where to send requests and who waits for which id.
#[derive(Clone)]
struct Stream {
    tx: mpsc::Sender<v1::IoRequest>,
    pending: Pending,
}

impl Stream {
    fn is_open(&self) -> bool {
        !self.tx.is_closed() && self.pending.lock().closed.is_none()
    }
}

impl Lane {
    /// The open lane, opening one if there is none (or the last one broke).
    async fn stream(&self) -> Result<Stream, BackendError> {
        let mut cur = self.current.lock().await;
        if let Some(s) = cur.as_ref().filter(|s| s.is_open()) {
            return Ok(s.clone());
        }
        let s = self.open().await?;
        *cur = Some(s.clone());
        Ok(s)
    }

    /// Connects and shakes hands. Failures are the node's or the network's trouble: another
    /// node, or a later try, may do (`Unavailable`, not EIO).
    async fn open(&self) -> Result<Stream, BackendError> {
        let unavailable = |e: &dyn std::fmt::Display| {
            BackendError::Unavailable(format!("opening a data lane to {}: {e}", self.addr))
        };
        let mut sock =
            match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&self.addr))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(unavailable(&e)),
                Err(_) => return Err(unavailable(&"connection timed out")),
            };
        // Requests are written as soon as they are gathered: never held for an ACK.
        sock.set_nodelay(true).map_err(|e| unavailable(&e))?;
        let hello = v1::LaneHello {
            version: lane::VERSION,
            datacenter: DATACENTER.get().cloned().unwrap_or_default(),
        };
        lane::client_handshake(&mut sock, &hello).await.map_err(|e| unavailable(&e))?;
        let (rd, wr) = sock.into_split();
        let (tx, rx) = mpsc::channel(LANE_DEPTH);
        let pending: Pending = Arc::default();
        // Either task ending ends the other: the lane is then closed for good.
        let dead = Arc::new(watch::channel(false).0);
        tokio::spawn(write_lane(wr, rx, dead.clone()));
        let pings = self.keepalive.then(|| tx.clone());
        tokio::spawn(read_lane(rd, pending.clone(), pings, dead));
        Ok(Stream { tx, pending })
    }

    async fn call(&self, op: v1::io_request::Op) -> Result<Reply, BackendError> {
        let s = self.stream().await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (w, r) = oneshot::channel();
        {
            let mut p = s.pending.lock();
            if let Some(why) = &p.closed {
                return Err(BackendError::Unavailable(why.clone()));
            }
            p.by_id.insert(id, w);
        }
        if s.tx.send(v1::IoRequest { id, op: Some(op) }).await.is_err() {
            s.pending.lock().by_id.remove(&id);
            return Err(BackendError::Unavailable("data lane closed".into()));
        }
        match r.await {
            Ok(result) => result,
            Err(_) => Err(BackendError::Unavailable("data lane dropped the request".into())),
        }
    }
}

/// Writes a lane's requests: whatever is queued goes in one write, after the tasks that are
/// ready now had one turn to add theirs.
async fn write_lane(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<v1::IoRequest>,
    dead: Arc<watch::Sender<bool>>,
) {
    let mut died = dead.subscribe();
    let mut out = BytesMut::new();
    loop {
        let first = tokio::select! {
            r = rx.recv() => match r {
                Some(r) => r,
                None => break,
            },
            _ = died.wait_for(|d| *d) => break,
        };
        lane::put_frame(&first, &mut out);
        tokio::task::yield_now().await;
        while out.len() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(r) => lane::put_frame(&r, &mut out),
                Err(_) => break,
            }
        }
        if let Err(e) = wr.write_all(&out).await {
            tracing::debug!(%e, "data lane write failed");
            break;
        }
        if out.capacity() > KEEP_BUFFER {
            out = BytesMut::new();
        }
        out.clear();
    }
    dead.send_replace(true);
}

/// Reads a lane's responses and hands each to its waiter. When the lane ends (the node closed
/// it, it broke, a frame was bad, or a ping went unanswered), everyone still waiting gets
/// `Unavailable` (EIO, or a retry on another node in a cluster).
async fn read_lane(
    mut rd: OwnedReadHalf,
    pending: Pending,
    pings: Option<mpsc::Sender<v1::IoRequest>>,
    dead: Arc<watch::Sender<bool>>,
) {
    let mut died = dead.subscribe();
    let mut buf = BytesMut::with_capacity(lane::READ_CHUNK);
    // Liveness: `heard` is set by every read; a tick that finds it unset sends a ping, and
    // the next tick (KEEPALIVE_TIMEOUT later) that still finds it unset ends the lane.
    let mut heard = false;
    let mut pinged = false;
    let tick = tokio::time::sleep(KEEPALIVE_INTERVAL);
    tokio::pin!(tick);
    let why = 'lane: loop {
        loop {
            let frame = match lane::take_frame(&mut buf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => break 'lane e.to_string(),
            };
            let resp: v1::IoResponse = match lane::decode(frame) {
                Ok(r) => r,
                Err(e) => break 'lane e.to_string(),
            };
            let waiter = pending.lock().by_id.remove(&resp.id);
            if let (Some(w), Some(r)) = (waiter, resp.result) {
                let _ = w.send(Ok(r));
            }
        }
        lane::make_room(&mut buf);
        tokio::select! {
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) => break "the storage node closed the data lane".to_string(),
                Ok(_) => heard = true,
                Err(e) => break format!("data lane: {e}"),
            },
            () = &mut tick, if pings.is_some() => {
                if heard {
                    heard = false;
                    pinged = false;
                } else if pinged {
                    break format!("the storage node did not answer a ping within {KEEPALIVE_TIMEOUT:?}");
                } else if let Some(tx) = &pings {
                    let ping = v1::IoRequest { id: PING_ID, op: Some(v1::io_request::Op::Ping(v1::Ping {})) };
                    // A full queue is traffic enough: the next tick decides.
                    let _ = tx.try_send(ping);
                    pinged = true;
                }
                let wait = if pinged { KEEPALIVE_TIMEOUT } else { KEEPALIVE_INTERVAL };
                tick.as_mut().reset(tokio::time::Instant::now() + wait);
            }
            _ = died.wait_for(|d| *d) => break "the data lane's writer stopped".to_string(),
        }
    };
    dead.send_replace(true);
    let waiters = {
        let mut p = pending.lock();
        p.closed = Some(why.clone());
        std::mem::take(&mut p.by_id)
    };
    for w in waiters.into_values() {
        let _ = w.send(Err(BackendError::Unavailable(why.clone())));
    }
}

#[cfg(test)]
mod tests {
    use super::lane_addr;

    #[test]
    fn lanes_go_to_the_endpoints_host_and_port() {
        assert_eq!(lane_addr("http://127.0.0.1:7700"), "127.0.0.1:7700");
        assert_eq!(lane_addr("http://node-2.dc1:7700/"), "node-2.dc1:7700");
        assert_eq!(lane_addr("127.0.0.1:7700"), "127.0.0.1:7700");
    }
}
