//! The node's side of data lanes (`tern_proto::lane`): the `Io` stream's requests on a plain
//! TCP connection to the gRPC port.
//!
//! [`accept`] takes every connection to the port and looks at its first byte
//! (`tern_proto::lane::split`): a lane starts with `lane::MAGIC`, anything else goes on to
//! tonic (HTTP/2). A connection that sends nothing within the handshake timeout is closed.
//!
//! [`serve_lane`] runs one lane in one task: it reads as many requests as arrived, runs them
//! concurrently (at most `IO_STREAM_DEPTH`), and writes the responses that are ready together
//! (up to [`WRITE_BATCH`] bytes a write), after giving the tasks that are ready now one turn (so
//! completions that arrive together leave in one write). A broken frame closes the lane,
//! logged; other lanes go on.

use std::io;
use std::sync::Arc;

use bytes::BytesMut;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use tern_proto::lane;
use tern_proto::v1;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::service::{Service, IO_STREAM_DEPTH};

/// Responses gathered before they are written even if more are ready: about four 4 KiB
/// reads. Small enough that the frontend starts passing the first replies on while the node
/// works through the rest (the stages overlap instead of moving the whole queue depth as one
/// convoy), large enough that write acknowledgements (a few bytes each) still leave
/// together. Measured, single node, 4 KiB randread QD32: 64 KiB 41.8k IOPS, 16 KiB 43.9k,
/// 8 KiB 42.1k, one response per write 37.6k.
const WRITE_BATCH: usize = 16 << 10;

/// TCP keep-alive on accepted lanes: a frontend host that vanished without closing its
/// connections (power loss, partition) has its lanes closed after about 30 s + 3 x 5 s of
/// silence, instead of holding them forever.
const KEEPALIVE_IDLE: std::time::Duration = std::time::Duration::from_secs(30);
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);
const KEEPALIVE_PROBES: u32 = 3;

/// The lanes being served: their count (`tern_storage_node_data_lanes`), which a stopping
/// node waits to fall to zero.
#[derive(Clone)]
pub(crate) struct Lanes {
    open: prometheus::IntGauge,
    closed: Arc<tokio::sync::Notify>,
}

impl Lanes {
    pub(crate) fn new(open: prometheus::IntGauge) -> Self {
        Self { open, closed: Arc::default() }
    }

    /// Waits until no lane is open.
    pub(crate) async fn drained(&self) {
        loop {
            let notified = self.closed.notified();
            if self.open.get() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Serves the lanes among the connections accepted on `listener` and returns the others
/// (gRPC) for tonic. Lanes stop taking requests when `stop` turns true.
pub(crate) fn accept(
    listener: TcpListener,
    svc: Service,
    stop: watch::Receiver<bool>,
    lanes: Lanes,
) -> mpsc::Receiver<io::Result<TcpStream>> {
    let lane::Incoming { lanes: mut incoming, grpc } = lane::split(listener);
    tokio::spawn(async move {
        while let Some((stream, peer)) = incoming.recv().await {
            let keepalive = socket2::TcpKeepalive::new()
                .with_time(KEEPALIVE_IDLE)
                .with_interval(KEEPALIVE_INTERVAL)
                .with_retries(KEEPALIVE_PROBES);
            if let Err(e) = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive) {
                tracing::warn!(%peer, %e, "cannot set TCP keep-alive on a data lane");
            }
            let (svc, stop, lanes) = (svc.clone(), stop.clone(), lanes.clone());
            lanes.open.inc();
            tokio::spawn(async move {
                if let Err(e) = serve_lane(svc, stream, stop).await {
                    tracing::info!(%peer, %e, "data lane closed");
                }
                lanes.open.dec();
                lanes.closed.notify_waiters();
            });
        }
    });
    grpc
}

/// Serves one lane until the client closes it, it breaks, or the node stops (then the
/// requests already running are answered first).
async fn serve_lane(
    svc: Service,
    mut stream: TcpStream,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()> {
    let hello = lane::accept_hello(&mut stream).await?;
    let error = if hello.version == lane::VERSION {
        String::new()
    } else {
        format!("lane version {} is not served (this node speaks {})", hello.version, lane::VERSION)
    };
    let welcome = v1::LaneWelcome { version: lane::VERSION, node_id: svc.node_id(), error };
    lane::send_welcome(&mut stream, &welcome).await?;
    if !welcome.error.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, welcome.error));
    }
    // Where the frontend runs: leaders follow their requests there (see `leadership`).
    let origin = svc.origin(&hello.datacenter);

    let (mut rd, mut wr) = stream.into_split();
    let mut inbuf = BytesMut::with_capacity(lane::READ_CHUNK);
    let mut out = BytesMut::new();
    let mut running = FuturesUnordered::new();
    let mut open = !*stop.borrow();
    loop {
        // Start every request that arrived whole (while there is room).
        while running.len() < IO_STREAM_DEPTH {
            let Some(frame) = lane::take_frame(&mut inbuf)? else { break };
            // A ping does no I/O: it is answered by the first `gather` below.
            running.push(svc.clone().do_io_owned(lane::decode(frame)?, origin));
        }
        // Gather what is done; then give the tasks that are ready now (the engine's reaper,
        // other lanes) one turn, so that completions arriving together go in one write.
        gather(&mut running, &mut out);
        if !out.is_empty() {
            tokio::task::yield_now().await;
            gather(&mut running, &mut out);
            wr.write_all(&out).await?;
            out.clear();
            continue;
        }
        if !open && running.is_empty() {
            return Ok(());
        }
        lane::make_room(&mut inbuf);
        tokio::select! {
            biased;
            Some(resp) = running.next(), if !running.is_empty() => lane::put_frame(&resp, &mut out),
            r = rd.read_buf(&mut inbuf), if open && running.len() < IO_STREAM_DEPTH => {
                if r? == 0 {
                    open = false;
                    if !inbuf.is_empty() {
                        tracing::debug!(bytes = inbuf.len(), "lane closed in the middle of a frame");
                    }
                }
            }
            r = stop.changed(), if open => {
                if r.is_err() || *stop.borrow() {
                    open = false;
                }
            }
        }
    }
}

/// Appends the responses of the requests that are done to `out` (up to [`WRITE_BATCH`]).
fn gather<F: std::future::Future<Output = v1::IoResponse>>(
    running: &mut FuturesUnordered<F>,
    out: &mut BytesMut,
) {
    while out.len() < WRITE_BATCH {
        match running.next().now_or_never() {
            Some(Some(resp)) => lane::put_frame(&resp, out),
            _ => return,
        }
    }
}
