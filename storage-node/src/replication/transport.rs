//! Raft traffic between storage nodes.
//!
//! Each peer node has one [`Peer`]: two lanes (TCP connections), one for small messages
//! (heartbeats, votes, small appends) and one for appends carrying data. Each lane keeps one
//! long-lived `RaftTransport.Stream` and a task that batches the queued messages of all chunk
//! groups into `RaftBatch`es on it, so hundreds of groups' heartbeats cost a few frames. The
//! peer answers each message as soon as its group handled it (replies carry the message's
//! id), so an append waiting for a durable barrier holds up no other group. A peer without
//! `Stream` (an older build) gets unary `RaftTransport.Send` batches, [`MAX_IN_FLIGHT`] at a
//! time.
//!
//! A test-only fault switch ([`Transport::set_isolated`], enabled by `--fault-injection`)
//! drops all traffic to and from chosen nodes, as a network partition would.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{Fatal, ReplicationClosed};
use openraft::error::{
    NetworkError, RPCError, RaftError, RemoteError, StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse};
use openraft::raft::{VoteRequest, VoteResponse};
use openraft::Snapshot;
use parking_lot::RwLock;
use tern_proto::v1::{self, raft_transport_client::RaftTransportClient, RaftKind};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tonic::transport::Endpoint;

use super::snapshot::{self, Header, SnapshotFile};
use super::{decode, encode, Member, TypeConfig};
use crate::store::ChunkStore;

/// Batches in flight per lane before messages wait (and batch up).
const MAX_IN_FLIGHT: usize = 4;
/// Messages per batch at most.
const MAX_BATCH: usize = 512;
/// Bytes of payload per batch, beyond its first message.
const MAX_BATCH_BYTES: usize = 8 << 20;
/// Messages larger than this (appends carrying data) travel on the bulk lane, so that
/// heartbeats and votes never queue behind megabytes of data: a vote stuck behind a large
/// append would time out, and elections would churn.
const BULK_BYTES: usize = 64 << 10;

type Reply = Result<Vec<u8>, String>;

struct Outgoing {
    msg: v1::RaftMessage,
    reply: oneshot::Sender<Reply>,
}

type Client = RaftTransportClient<tonic::transport::Channel>;

/// The connections to one peer node: a lane for small messages and one for bulk, each its
/// own TCP connection.
struct Peer {
    small: mpsc::UnboundedSender<Outgoing>,
    bulk: mpsc::UnboundedSender<Outgoing>,
    /// For snapshot streams (the bulk connection).
    client: Client,
    /// When the peer last answered a batch, in milliseconds since the transport started
    /// (0: never). For the health metric: heartbeats make a live peer answer every 100 ms.
    answered: Arc<AtomicU64>,
}

impl Peer {
    fn start(
        from: u64,
        to: u64,
        address: &str,
        epoch: Instant,
    ) -> Result<Self, tonic::transport::Error> {
        let ep = Endpoint::from_shared(format!("http://{address}"))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_millis(500))
            // A peer that vanished without closing the connection (power loss, a silent
            // network) is noticed, and its streams reopened, within a few seconds.
            .http2_keep_alive_interval(Duration::from_secs(2))
            .keep_alive_timeout(Duration::from_secs(3))
            .keep_alive_while_idle(true)
            .initial_stream_window_size(8 << 20)
            .initial_connection_window_size(32 << 20);
        let client = || {
            RaftTransportClient::new(ep.connect_lazy())
                .max_decoding_message_size(256 << 20)
                .max_encoding_message_size(256 << 20)
        };
        let bulk = client();
        let answered = Arc::new(AtomicU64::new(0));
        let heard = Heard { at: answered.clone(), epoch };
        Ok(Self {
            small: lane(from, to, client(), heard.clone()),
            bulk: lane(from, to, bulk.clone(), heard),
            client: bulk,
            answered,
        })
    }

    fn send(&self, o: Outgoing) -> Result<(), Outgoing> {
        let lane = if o.msg.payload.len() > BULK_BYTES { &self.bulk } else { &self.small };
        lane.send(o).map_err(|e| e.0)
    }
}

/// Where a lane notes that its peer answered (see `Peer::answered`).
#[derive(Clone)]
struct Heard {
    at: Arc<AtomicU64>,
    epoch: Instant,
}

impl Heard {
    fn now(&self) {
        // At least 1: 0 means never.
        let ms = self.epoch.elapsed().as_millis().max(1) as u64;
        self.at.store(ms, Ordering::Relaxed);
    }
}

/// Starts a lane: a task batching queued messages onto one `RaftTransport.Stream` (opened on
/// first use and again after it breaks). A peer that does not know `Stream` (an older build,
/// during a rolling upgrade) gets unary `Send` calls instead.
fn lane(from: u64, to: u64, client: Client, heard: Heard) -> mpsc::UnboundedSender<Outgoing> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Outgoing>();
    tokio::spawn(async move {
        let mut held: Option<Outgoing> = None;
        let mut stream: Option<LaneStream> = None;
        // Since when the peer gets unary batches (it lacked `Stream`); the stream is tried
        // again after [`UNARY_RETRY`], in case the peer was upgraded meanwhile.
        let mut unary: Option<Instant> = None;
        let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        loop {
            let first = match held.take() {
                Some(m) => m,
                None => match rx.recv().await {
                    Some(m) => m,
                    None => return,
                },
            };
            let mut bytes = first.msg.payload.len();
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(m) if bytes + m.msg.payload.len() > MAX_BATCH_BYTES => {
                        held = Some(m);
                        break;
                    }
                    Ok(m) => {
                        bytes += m.msg.payload.len();
                        batch.push(m);
                    }
                    Err(_) => break,
                }
            }
            if unary.is_some_and(|since| since.elapsed() >= UNARY_RETRY) {
                unary = None;
            }
            if unary.is_none() && stream.as_ref().is_none_or(LaneStream::broken) {
                match LaneStream::open(client.clone(), heard.clone()).await {
                    Ok(s) => stream = Some(s),
                    Err(s) if s.code() == tonic::Code::Unimplemented => {
                        tracing::info!(peer = to, "peer has no Raft stream: unary batches");
                        unary = Some(Instant::now());
                    }
                    Err(s) => {
                        for o in batch {
                            let _ = o.reply.send(Err(status_text(&s)));
                        }
                        continue;
                    }
                }
            }
            if unary.is_some() {
                let Ok(permit) = slots.clone().acquire_owned().await else { return };
                tokio::spawn(send_unary(from, to, client.clone(), heard.clone(), batch, permit));
                continue;
            }
            let s = stream.as_mut().expect("stream just opened");
            let messages = s.register(batch);
            if !messages.is_empty()
                && s.tx.send(v1::RaftBatch { from, to, messages }).await.is_err()
            {
                // The stream broke; its reader fails what was registered on it.
                s.close();
            }
        }
    });
    tx
}

/// One batch as a unary `Send` call (peers without `Stream`).
async fn send_unary(
    from: u64,
    to: u64,
    mut client: Client,
    heard: Heard,
    batch: Vec<Outgoing>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let (messages, waiters): (Vec<_>, Vec<_>) = batch.into_iter().map(|o| (o.msg, o.reply)).unzip();
    match client.send(v1::RaftBatch { from, to, messages }).await {
        Ok(r) => {
            heard.now();
            let mut replies = r.into_inner().replies.into_iter();
            for w in waiters {
                let _ = w.send(reply_of(replies.next()));
            }
        }
        Err(s) => {
            for w in waiters {
                let _ = w.send(Err(status_text(&s)));
            }
        }
    }
    drop(permit);
}

fn status_text(s: &tonic::Status) -> String {
    format!("{}: {}", s.code(), s.message())
}

fn reply_of(r: Option<v1::RaftReply>) -> Reply {
    match r {
        Some(r) if r.error.is_empty() => Ok(r.payload.to_vec()),
        Some(r) => Err(r.error),
        None => Err("peer sent too few replies".to_string()),
    }
}

/// Who waits for which message of a lane's stream; `None` once the stream ended.
type Waiters = Arc<parking_lot::Mutex<Option<HashMap<u64, oneshot::Sender<Reply>>>>>;

/// Ends a stream's bookkeeping: every waiter gets `why`, later ones are refused.
fn fail_all(waiters: &Waiters, why: &str) {
    for (_, waiter) in waiters.lock().take().into_iter().flatten() {
        let _ = waiter.send(Err(why.to_string()));
    }
}

/// A lane's open `RaftTransport.Stream`.
struct LaneStream {
    tx: mpsc::Sender<v1::RaftBatch>,
    waiters: Waiters,
    next_id: u64,
}

/// How long a lane sends unary batches to a peer without `Stream` before trying again.
const UNARY_RETRY: Duration = Duration::from_secs(60);

/// Batches queued on a lane's stream before the lane waits.
const STREAM_DEPTH: usize = 64;
/// Waiters kept before those that gave up (timed out) are dropped.
const WAITERS_SWEEP: usize = 4096;

impl LaneStream {
    async fn open(mut client: Client, heard: Heard) -> Result<Self, tonic::Status> {
        let (tx, rx) = mpsc::channel(STREAM_DEPTH);
        let mut inbound =
            client.stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
        let waiters: Waiters = Arc::new(parking_lot::Mutex::new(Some(HashMap::new())));
        let w = waiters.clone();
        tokio::spawn(async move {
            let why = loop {
                match inbound.message().await {
                    Ok(Some(batch)) => {
                        heard.now();
                        let mut w = w.lock();
                        let Some(map) = w.as_mut() else { return };
                        for r in batch.replies {
                            if let Some(waiter) = map.remove(&r.id) {
                                let _ = waiter.send(reply_of(Some(r)));
                            }
                        }
                    }
                    Ok(None) => break "peer closed the Raft stream".to_string(),
                    Err(s) => break status_text(&s),
                }
            };
            // Everything still waiting fails now (openraft retries); the next batch reopens.
            fail_all(&w, &why);
        });
        Ok(Self { tx, waiters, next_id: 0 })
    }

    fn broken(&self) -> bool {
        self.tx.is_closed() || self.waiters.lock().is_none()
    }

    fn close(&mut self) {
        fail_all(&self.waiters, "Raft stream closed");
    }

    /// Numbers `batch`'s messages and notes who waits for each reply.
    fn register(&mut self, batch: Vec<Outgoing>) -> Vec<v1::RaftMessage> {
        let mut w = self.waiters.lock();
        let Some(map) = w.as_mut() else {
            for o in batch {
                let _ = o.reply.send(Err("Raft stream closed".to_string()));
            }
            return Vec::new();
        };
        if map.len() >= WAITERS_SWEEP {
            map.retain(|_, waiter| !waiter.is_closed());
        }
        batch
            .into_iter()
            // Callers that gave up (timed out) need no message: a late vote or hand-over
            // request would only confuse the peer.
            .filter(|o| !o.reply.is_closed())
            .map(|o| {
                self.next_id += 1;
                map.insert(self.next_id, o.reply);
                v1::RaftMessage { id: self.next_id, ..o.msg }
            })
            .collect()
    }
}

/// Why a message got no answer.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("node {0} is cut off by the fault switch")]
    Isolated(u64),
    #[error("no answer from node {0} within {1:?}")]
    Timeout(u64, Duration),
    #[error("node {0}: {1}")]
    Failed(u64, String),
    #[error("unknown node {0}")]
    UnknownNode(u64),
    #[error("undecodable reply from node {0}: {1}")]
    BadReply(u64, String),
}

/// The node's side of Raft traffic: a [`Peer`] per other node, and the fault switch.
pub struct Transport {
    node_id: u64,
    /// Peers by node id, created when a group first needs one (members added by a membership
    /// change come with their address).
    peers: RwLock<HashMap<u64, Arc<Peer>>>,
    isolated: RwLock<HashSet<u64>>,
    /// Snapshots are streamed from here.
    store: Arc<ChunkStore>,
    groups: u32,
    /// Each group's epoch state (index = group), shared with its state machine: snapshots
    /// stream it, digests read it.
    pub epochs: Vec<super::state_machine::GroupEpochs>,
    /// When the transport started: the origin of `Peer::answered`.
    epoch: Instant,
    /// Bytes of chunk group state streamed to other replicas, and received (metrics).
    pub snapshot_sent_bytes: AtomicU64,
    pub snapshot_received_bytes: AtomicU64,
    /// Per group (index = group): the peers that accepted this node's appends as their
    /// leader's, with the term and when the newest such append was handed to the transport
    /// (the base of leader leases: see `Cluster::lease_valid`).
    acks: Vec<parking_lot::Mutex<Vec<Ack>>>,
    /// When each peer last sent this node a batch (any group's messages).
    heard_nodes: parking_lot::Mutex<HashMap<u64, Instant>>,
}

/// A peer accepted an append of `term` (any answer but a higher vote: it then refuses to
/// vote for another candidate for a lease after it got the append).
#[derive(Clone, Copy, Debug)]
struct Ack {
    peer: u64,
    term: u64,
    sent: Instant,
}

impl Transport {
    pub fn new(
        node_id: u64,
        nodes: &[(u64, String)],
        store: Arc<ChunkStore>,
        groups: u32,
    ) -> Result<Arc<Self>, tonic::transport::Error> {
        let mut peers = HashMap::new();
        let epoch = Instant::now();
        for (id, address) in nodes {
            if *id != node_id {
                peers.insert(*id, Arc::new(Peer::start(node_id, *id, address, epoch)?));
            }
        }
        Ok(Arc::new(Self {
            node_id,
            peers: RwLock::new(peers),
            isolated: RwLock::default(),
            store,
            groups,
            epochs: (0..=groups).map(|_| Default::default()).collect(),
            epoch,
            snapshot_sent_bytes: AtomicU64::new(0),
            snapshot_received_bytes: AtomicU64::new(0),
            acks: (0..=groups).map(|_| Default::default()).collect(),
            heard_nodes: Default::default(),
        }))
    }

    /// Notes that `peer` accepted an append of `term` for `group` that left at `sent`.
    fn note_ack(&self, group: u32, peer: u64, term: u64, sent: Instant) {
        let Some(acks) = self.acks.get(group as usize) else { return };
        let mut acks = acks.lock();
        match acks.iter_mut().find(|a| a.peer == peer) {
            Some(a) if (a.term, a.sent) < (term, sent) => *a = Ack { peer, term, sent },
            Some(_) => {}
            None => acks.push(Ack { peer, term, sent }),
        }
    }

    /// How many of `peers` accepted an append of `term` for `group` sent less than `window`
    /// ago (read on every replicated read: no allocation).
    pub fn acked_within(
        &self,
        group: u32,
        term: u64,
        window: Duration,
        peers: &std::collections::BTreeSet<u64>,
    ) -> usize {
        let Some(acks) = self.acks.get(group as usize) else { return 0 };
        let now = Instant::now();
        acks.lock()
            .iter()
            .filter(|a| a.term == term && now.saturating_duration_since(a.sent) < window)
            .filter(|a| peers.contains(&a.peer))
            .count()
    }

    /// How long ago `node` last sent this node a batch (`None`: never since the start).
    pub fn heard_from_node(&self, node: u64) -> Option<Duration> {
        self.heard_nodes.lock().get(&node).map(Instant::elapsed)
    }

    fn note_heard_from(&self, node: u64) {
        self.heard_nodes.lock().insert(node, Instant::now());
    }

    /// Forgets `group`'s acknowledgements: no lease survives a leadership hand-over.
    pub fn forget_acks(&self, group: u32) {
        if let Some(acks) = self.acks.get(group as usize) {
            acks.lock().clear();
        }
    }

    /// The peer `id` at `address`, connecting (lazily) if it is new or moved.
    fn ensure_peer(&self, id: u64, address: &str) {
        if id == self.node_id || self.peers.read().contains_key(&id) {
            return;
        }
        match Peer::start(self.node_id, id, address, self.epoch) {
            Ok(p) => {
                self.peers.write().entry(id).or_insert_with(|| Arc::new(p));
            }
            Err(e) => tracing::warn!(node = id, address, %e, "bad peer address"),
        }
    }

    fn peer(&self, id: u64) -> Option<Arc<Peer>> {
        self.peers.read().get(&id).cloned()
    }

    /// The bulk-lane client of node `id` at `address`, for calls outside Raft messages
    /// (fetching blocks to repair): the peer's connection, not a new one per call.
    pub fn client(&self, id: u64, address: &str) -> Option<Client> {
        self.ensure_peer(id, address);
        self.peer(id).map(|p| p.client.clone())
    }

    pub fn set_isolated(&self, nodes: impl IntoIterator<Item = u64>) {
        *self.isolated.write() = nodes.into_iter().collect();
    }

    pub fn is_isolated(&self, node: u64) -> bool {
        self.isolated.read().contains(&node)
    }

    /// How long node `id` has not answered a Raft batch (since the transport started if it
    /// never did); `None` for a node this transport has no connection to.
    pub fn silent_for(&self, id: u64) -> Option<Duration> {
        let peer = self.peer(id)?;
        let at = Duration::from_millis(peer.answered.load(Ordering::Relaxed));
        Some(self.epoch.elapsed().saturating_sub(at))
    }

    /// Sends one message to `to` and waits (at most `ttl`) for its reply payload.
    pub async fn call(
        &self,
        to: u64,
        group: u32,
        kind: RaftKind,
        payload: Vec<u8>,
        ttl: Duration,
    ) -> Result<Vec<u8>, SendError> {
        if self.is_isolated(to) {
            return Err(SendError::Isolated(to));
        }
        let peer = self.peer(to).ok_or(SendError::UnknownNode(to))?;
        let (w, r) = oneshot::channel();
        let msg = v1::RaftMessage { group, kind: kind as i32, payload: payload.into(), id: 0 };
        peer.send(Outgoing { msg, reply: w })
            .map_err(|_| SendError::Failed(to, "transport stopped".into()))?;
        match tokio::time::timeout(ttl, r).await {
            Err(_) => Err(SendError::Timeout(to, ttl)),
            Ok(Err(_)) => Err(SendError::Failed(to, "batch dropped".into())),
            Ok(Ok(r)) => r.map_err(|e| SendError::Failed(to, e)),
        }
    }

    pub fn node_id(&self) -> u64 {
        self.node_id
    }
}

/// The network of one group: openraft creates one client per target node.
#[derive(Clone)]
pub struct GroupNetworkFactory {
    pub group: u32,
    pub transport: Arc<Transport>,
}

impl RaftNetworkFactory<TypeConfig> for GroupNetworkFactory {
    type Network = GroupNetwork;

    async fn new_client(&mut self, target: u64, node: &Member) -> Self::Network {
        self.transport.ensure_peer(target, &node.address);
        GroupNetwork { group: self.group, target, transport: self.transport.clone() }
    }
}

pub struct GroupNetwork {
    group: u32,
    target: u64,
    transport: Arc<Transport>,
}

type RpcErr = RPCError<u64, Member, RaftError<u64>>;

impl GroupNetwork {
    async fn rpc<Req: serde::Serialize, Resp: serde::de::DeserializeOwned>(
        &self,
        kind: RaftKind,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RpcErr> {
        let bytes = self
            .transport
            .call(self.target, self.group, kind, encode(req), option.hard_ttl())
            .await
            .map_err(|e| match e {
                // Back off: openraft retries unreachable nodes less eagerly.
                SendError::Isolated(_) | SendError::Failed(..) | SendError::UnknownNode(_) => {
                    RPCError::Unreachable(Unreachable::new(&e))
                }
                SendError::Timeout(..) | SendError::BadReply(..) => {
                    RPCError::Network(NetworkError::new(&e))
                }
            })?;
        let r: Result<Resp, RaftError<u64>> = decode(&bytes).map_err(|e| {
            RPCError::Network(NetworkError::new(&SendError::BadReply(self.target, e.to_string())))
        })?;
        r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for GroupNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RpcErr> {
        let (sent, term) = (Instant::now(), rpc.vote.leader_id().term);
        let resp: AppendEntriesResponse<u64> = self.rpc(RaftKind::Append, &rpc, &option).await?;
        // Any answer but a higher vote: the peer took this node's vote as its leader's and
        // refreshed its lease (openraft rejects other candidates' votes within it).
        if rpc.vote.is_committed() && !matches!(resp, AppendEntriesResponse::HigherVote(_)) {
            self.transport.note_ack(self.group, self.target, term, sent);
        }
        Ok(resp)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RpcErr> {
        self.rpc(RaftKind::Vote, &rpc, &option).await
    }

    /// Streams the group's live state to the target (see [`snapshot`]).
    async fn full_snapshot(
        &mut self,
        vote: openraft::Vote<u64>,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<u64>, StreamingError<TypeConfig, Fatal<u64>>> {
        let unreachable = |e: SendError| StreamingError::Unreachable(Unreachable::new(&e));
        let t = &self.transport;
        if t.is_isolated(self.target) {
            return Err(unreachable(SendError::Isolated(self.target)));
        }
        let mut client = t
            .peer(self.target)
            .ok_or_else(|| unreachable(SendError::UnknownNode(self.target)))?
            .client
            .clone();
        let (group, from, target) = (self.group, t.node_id, self.target);
        let header = encode(&Header { vote, meta: snapshot.meta.clone() });
        let (part_tx, part_rx) = mpsc::channel::<v1::SnapshotPart>(4);
        let (rec_tx, mut rec_rx) = mpsc::channel::<Vec<u8>>(4);
        let first = v1::SnapshotPart { from, group, header: header.into(), ..Default::default() };
        let _ = part_tx.send(first).await;
        let (store, groups) = (t.store.clone(), t.groups);
        let epochs = t.epochs.get(group as usize).cloned().unwrap_or_default();
        let transport = t.clone();
        let produce = tokio::spawn(async move {
            snapshot::stream_group(&store, group, groups, &epochs, rec_tx).await
        });
        // Stops the producer if openraft drops this call half-way.
        let _stop = AbortOnDrop(produce.abort_handle());
        let forward = tokio::spawn(async move {
            let mut record_bytes = 0u64;
            while let Some(records) = rec_rx.recv().await {
                record_bytes += records.len() as u64;
                transport.snapshot_sent_bytes.fetch_add(records.len() as u64, Ordering::Relaxed);
                let part =
                    v1::SnapshotPart { from, group, records: records.into(), ..Default::default() };
                if part_tx.send(part).await.is_err() {
                    return None;
                }
            }
            Some((part_tx, record_bytes))
        });
        // Only a complete stream gets its final part: the receiver installs nothing else.
        let producer = tokio::spawn(async move {
            let r = produce.await;
            if let (Ok(Ok(_)), Ok(Some((part_tx, record_bytes)))) = (&r, forward.await) {
                let last = v1::SnapshotPart {
                    from,
                    group,
                    last: true,
                    record_bytes,
                    ..Default::default()
                };
                let _ = part_tx.send(last).await;
            }
            r
        });
        let started = std::time::Instant::now();
        let call = client.install_snapshot(tokio_stream::wrappers::ReceiverStream::new(part_rx));
        let reply = tokio::select! {
            r = call => r,
            closed = cancel => {
                producer.abort();
                return Err(StreamingError::Closed(closed));
            }
        };
        let sent = match producer.await {
            Ok(Ok(Ok(bytes))) => bytes,
            Ok(Ok(Err(e))) => {
                return Err(unreachable(SendError::Failed(
                    target,
                    format!("reading the group: {e}"),
                )))
            }
            Ok(Err(e)) | Err(e) => {
                return Err(unreachable(SendError::Failed(target, e.to_string())))
            }
        };
        let reply =
            reply.map_err(|s| unreachable(SendError::Failed(target, s.message().to_string())))?;
        let reply = reply.into_inner();
        if !reply.error.is_empty() {
            return Err(unreachable(SendError::Failed(target, reply.error)));
        }
        let r: Result<SnapshotResponse<u64>, Fatal<u64>> = decode(&reply.payload)
            .map_err(|e| unreachable(SendError::BadReply(target, e.to_string())))?;
        let secs = started.elapsed().as_secs_f64();
        tracing::info!(
            group,
            target,
            bytes = sent,
            secs,
            mb_per_s = sent as f64 / 1e6 / secs.max(1e-3),
            "sent a chunk group snapshot"
        );
        r.map_err(|f| StreamingError::RemoteError(RemoteError::new(target, f)))
    }
}

/// The receiving side: `RaftTransport` on every node of a cluster.
#[derive(Clone)]
pub struct TransportService {
    pub cluster: Arc<super::Cluster>,
}

impl TransportService {
    /// Checks that a batch is for this node and not cut off by the fault switch.
    fn admit(&self, b: &v1::RaftBatch) -> Result<(), tonic::Status> {
        let t = self.cluster.transport();
        let me = t.node_id();
        if b.to != me {
            return Err(tonic::Status::failed_precondition(format!(
                "batch for node {} reached node {me}",
                b.to
            )));
        }
        if t.is_isolated(b.from) {
            return Err(tonic::Status::unavailable("cut off by the fault switch"));
        }
        t.note_heard_from(b.from);
        Ok(())
    }

    async fn deliver(&self, m: v1::RaftMessage) -> v1::RaftReply {
        let id = m.id;
        v1::RaftReply { id, ..self.handle(m).await }
    }

    async fn handle(&self, m: v1::RaftMessage) -> v1::RaftReply {
        let fail = |e: String| v1::RaftReply { error: e, ..Default::default() };
        let Some(raft) = self.cluster.raft(m.group) else {
            return fail(format!("no chunk group {}", m.group));
        };
        let payload = match RaftKind::try_from(m.kind) {
            Ok(RaftKind::Append) => match decode::<AppendEntriesRequest<TypeConfig>>(&m.payload) {
                Ok(req) => {
                    self.cluster.heard_from_leader(m.group);
                    encode(&raft.append_entries(req).await)
                }
                Err(e) => return fail(format!("bad append-entries payload: {e}")),
            },
            Ok(RaftKind::Vote) => match decode::<VoteRequest<u64>>(&m.payload) {
                Ok(req) => encode(&self.cluster.vote(m.group, &raft, req).await),
                Err(e) => return fail(format!("bad vote payload: {e}")),
            },
            // The group's leader hands it over to this node: campaign now, if this node still
            // follows that leader in that term (a late or repeated request does nothing).
            Ok(RaftKind::Elect) => match decode::<openraft::Vote<u64>>(&m.payload) {
                Ok(v) if raft.metrics().borrow().vote == v => match raft.trigger().elect().await {
                    Ok(()) => Vec::new(),
                    Err(e) => return fail(format!("campaigning: {e}")),
                },
                Ok(v) => return fail(format!("stale hand-over from {v}: not campaigning")),
                Err(e) => return fail(format!("bad hand-over payload: {e}")),
            },
            _ => return fail(format!("unknown Raft message kind {}", m.kind)),
        };
        v1::RaftReply { payload: payload.into(), ..Default::default() }
    }
}

/// Replies of one `RaftTransport.Stream`.
pub type RaftReplies = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<v1::RaftBatchReply, tonic::Status>> + Send>,
>;

#[tonic::async_trait]
impl v1::raft_transport_server::RaftTransport for TransportService {
    async fn send(
        &self,
        req: tonic::Request<v1::RaftBatch>,
    ) -> Result<tonic::Response<v1::RaftBatchReply>, tonic::Status> {
        let b = req.into_inner();
        self.admit(&b)?;
        // Messages of different groups run concurrently; each group's Raft core orders its own.
        let replies =
            futures::future::join_all(b.messages.into_iter().map(|m| self.deliver(m))).await;
        Ok(tonic::Response::new(v1::RaftBatchReply { replies }))
    }

    type StreamStream = RaftReplies;

    /// One task per stream runs its messages concurrently and sends each reply as soon as its
    /// group answered, together with the others ready at that moment.
    async fn stream(
        &self,
        req: tonic::Request<tonic::Streaming<v1::RaftBatch>>,
    ) -> Result<tonic::Response<RaftReplies>, tonic::Status> {
        use futures::stream::{FuturesUnordered, StreamExt};
        use futures::FutureExt;
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_DEPTH);
        let svc = self.clone();
        tokio::spawn(async move {
            let mut running = FuturesUnordered::new();
            let mut open = true;
            loop {
                tokio::select! {
                    biased;
                    Some(first) = running.next(), if !running.is_empty() => {
                        let mut replies = vec![first];
                        while let Some(Some(r)) = running.next().now_or_never() {
                            replies.push(r);
                        }
                        if tx.send(Ok(v1::RaftBatchReply { replies })).await.is_err() {
                            return;
                        }
                    }
                    batch = inbound.message(), if open => match batch {
                        Ok(Some(b)) => {
                            let refused = svc.admit(&b).err();
                            for m in b.messages {
                                let svc = svc.clone();
                                let refused = refused.clone();
                                running.push(async move {
                                    match refused {
                                        Some(s) => v1::RaftReply {
                                            id: m.id,
                                            error: s.message().to_string(),
                                            ..Default::default()
                                        },
                                        None => svc.deliver(m).await,
                                    }
                                });
                            }
                        }
                        Ok(None) => open = false,
                        Err(e) => {
                            tracing::debug!(%e, "Raft stream ended");
                            open = false;
                        }
                    },
                    else => return,
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    /// Stages a snapshot stream in a file, then hands it to the group's Raft, which installs
    /// it on the state machine's worker.
    async fn install_snapshot(
        &self,
        req: tonic::Request<tonic::Streaming<v1::SnapshotPart>>,
    ) -> Result<tonic::Response<v1::SnapshotReply>, tonic::Status> {
        use tonic::Status;
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        if self.cluster.transport().is_isolated(first.from) {
            return Err(Status::unavailable("cut off by the fault switch"));
        }
        let header: Header = decode(&first.header)
            .map_err(|e| Status::invalid_argument(format!("bad snapshot header: {e}")))?;
        let group = first.group;
        let raft = self
            .cluster
            .raft(group)
            .ok_or_else(|| Status::invalid_argument(format!("no chunk group {group}")))?
            .clone();
        let dir = snapshot::staging_dir(&self.cluster.transport().store);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = dir.join(format!("g{group}-{nanos}.part"));
        let mut file = std::fs::File::create(&path)
            .map_err(|e| Status::internal(format!("staging {}: {e}", path.display())))?;
        let mut bytes = 0u64;
        let received: Result<(), Status> = async {
            while let Some(part) = inbound.message().await? {
                if !part.records.is_empty() {
                    bytes += part.records.len() as u64;
                    self.cluster
                        .transport()
                        .snapshot_received_bytes
                        .fetch_add(part.records.len() as u64, Ordering::Relaxed);
                    snapshot::write_part(&mut file, &part.records)
                        .map_err(|e| Status::internal(format!("staging a snapshot: {e}")))?;
                }
                if part.last {
                    if part.record_bytes != bytes {
                        return Err(Status::data_loss(format!(
                            "snapshot stream of {bytes} bytes, the sender sent {}",
                            part.record_bytes
                        )));
                    }
                    return Ok(());
                }
            }
            Err(Status::aborted("snapshot stream ended before its final part"))
        }
        .await;
        drop(file);
        if let Err(e) = received {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        tracing::info!(group, from = first.from, bytes, "received a chunk group snapshot");
        let snap = Snapshot {
            meta: header.meta,
            snapshot: Box::new(SnapshotFile { path: Some(path.clone()) }),
        };
        let r = raft.install_full_snapshot(header.vote, snap).await;
        let _ = std::fs::remove_file(&path);
        Ok(tonic::Response::new(v1::SnapshotReply {
            payload: encode(&r).into(),
            error: String::new(),
        }))
    }

    async fn fetch_block(
        &self,
        req: tonic::Request<v1::FetchBlockRequest>,
    ) -> Result<tonic::Response<v1::FetchBlockReply>, tonic::Status> {
        let r = req.into_inner();
        let store = &self.cluster.transport().store;
        let v = store.get(r.volume).map_err(tonic::Status::from)?;
        let len = if r.length == 0 { tern_common::BLOCK_SIZE } else { r.length };
        let data = store.read(&v, r.offset, len).await.map_err(tonic::Status::from)?;
        Ok(tonic::Response::new(v1::FetchBlockReply { data }))
    }

    async fn digest(
        &self,
        req: tonic::Request<v1::DigestRequest>,
    ) -> Result<tonic::Response<v1::DigestReply>, tonic::Status> {
        let group = req.into_inner().group;
        let raft = self
            .cluster
            .raft(group)
            .ok_or_else(|| tonic::Status::invalid_argument(format!("no chunk group {group}")))?;
        // Applied index first: the digest then covers at least that much.
        let applied_index = raft.metrics().borrow().last_applied.map_or(0, |l| l.index);
        let t = self.cluster.transport();
        let (digest, data_blocks, detail) =
            snapshot::digest_group(&t.store, group, t.groups, &t.epochs[group as usize])
                .await
                .map_err(tonic::Status::from)?;
        Ok(tonic::Response::new(v1::DigestReply { applied_index, digest, data_blocks, detail }))
    }

    async fn set_faults(
        &self,
        req: tonic::Request<v1::SetFaultsRequest>,
    ) -> Result<tonic::Response<v1::SetFaultsReply>, tonic::Status> {
        if !self.cluster.config().fault_injection {
            return Err(tonic::Status::permission_denied(
                "fault injection is off (start the node with --fault-injection)",
            ));
        }
        let isolate = req.into_inner().isolate_from;
        tracing::warn!(?isolate, "fault switch: Raft traffic with these nodes is cut");
        self.cluster.transport().set_isolated(isolate);
        Ok(tonic::Response::new(v1::SetFaultsReply {}))
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::{Request, Response, Status};

    /// A peer of an older build: unary `Send` only. Answers each message with its own
    /// payload reversed, and counts the batches.
    #[derive(Clone, Default)]
    struct OldPeer {
        batches: Arc<AtomicU64>,
    }

    #[tonic::async_trait]
    impl v1::raft_transport_server::RaftTransport for OldPeer {
        async fn send(
            &self,
            req: Request<v1::RaftBatch>,
        ) -> Result<Response<v1::RaftBatchReply>, Status> {
            self.batches.fetch_add(1, Ordering::SeqCst);
            let replies = req
                .into_inner()
                .messages
                .into_iter()
                .map(|m| {
                    let mut p = m.payload.to_vec();
                    p.reverse();
                    v1::RaftReply { payload: p.into(), ..Default::default() }
                })
                .collect();
            Ok(Response::new(v1::RaftBatchReply { replies }))
        }
        type StreamStream = RaftReplies;
        async fn stream(
            &self,
            _: Request<tonic::Streaming<v1::RaftBatch>>,
        ) -> Result<Response<RaftReplies>, Status> {
            Err(Status::unimplemented("not in this build"))
        }
        async fn install_snapshot(
            &self,
            _: Request<tonic::Streaming<v1::SnapshotPart>>,
        ) -> Result<Response<v1::SnapshotReply>, Status> {
            Err(Status::unimplemented("-"))
        }
        async fn set_faults(
            &self,
            _: Request<v1::SetFaultsRequest>,
        ) -> Result<Response<v1::SetFaultsReply>, Status> {
            Err(Status::unimplemented("-"))
        }
        async fn digest(
            &self,
            _: Request<v1::DigestRequest>,
        ) -> Result<Response<v1::DigestReply>, Status> {
            Err(Status::unimplemented("-"))
        }
        async fn fetch_block(
            &self,
            _: Request<v1::FetchBlockRequest>,
        ) -> Result<Response<v1::FetchBlockReply>, Status> {
            Err(Status::unimplemented("-"))
        }
    }

    /// During a rolling upgrade a peer may not know `Stream`: its messages go as unary
    /// batches and every answer reaches its caller.
    #[tokio::test]
    async fn a_peer_without_the_stream_gets_unary_batches() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = OldPeer::default();
        let server = tonic::transport::Server::builder()
            .add_service(v1::raft_transport_server::RaftTransportServer::new(peer.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        tokio::spawn(server);
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open_for_test(dir.path());
        let t = Transport::new(1, &[(1, "127.0.0.1:1".into()), (2, addr.to_string())], store, 4)
            .unwrap();
        let calls = (0..50u8).map(|i| {
            let t = t.clone();
            async move {
                let r = t.call(2, 1, RaftKind::Append, vec![i, 1, 2], Duration::from_secs(5)).await;
                (i, r)
            }
        });
        for (i, r) in futures::future::join_all(calls).await {
            assert_eq!(r.unwrap(), vec![2, 1, i], "message {i}");
        }
        let batches = peer.batches.load(Ordering::SeqCst);
        assert!((1..=50).contains(&batches), "{batches} unary batches");
    }
}
