//! `GrpcBackend` routing against fake storage nodes in this process: tonic servers that answer
//! the cluster map and volume lookups, and data lanes that answer I/O, by a script (who leads
//! which group), so leader hints, elections, dead nodes, chunk splitting and flushes are
//! exercised without a real cluster. (End-to-end tests with real storage nodes live in
//! `tests/`.)

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tern_common::{chunk_group, CHUNK_SIZE};
use tern_nbd_frontend::backend::{Backend, BackendError, Extent};
use tern_nbd_frontend::grpc::GrpcBackend;
use tern_proto::lane;
use tern_proto::v1::block_io_server::{BlockIo, BlockIoServer};
use tern_proto::v1::cluster_server::{Cluster, ClusterServer};
use tern_proto::v1::io_request::Op;
use tern_proto::v1::io_response::Result as Reply;
use tern_proto::v1::volume_admin_server::{VolumeAdmin, VolumeAdminServer};
use tern_proto::v1::{self as v1};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tonic::{Code, Request, Response, Status};

const C: u64 = CHUNK_SIZE;
const GROUPS: u32 = 4;
/// The volume every test uses: 8 chunks, so it touches all groups.
const VOL: u64 = 42;
const VOL_SIZE: u64 = 8 * C;

/// One request a fake node served (answered as the leader).
#[derive(Clone, Debug)]
struct Served {
    node: u64,
    kind: &'static str,
    offset: u64,
    len: u64,
    /// The group the request belongs to: its chunk's, or the flush's.
    group: Option<u32>,
    data: Option<Bytes>,
}

/// What a fake node does, changeable while it runs.
#[derive(Default)]
struct Script {
    /// The map it serves; `None`: no `Cluster` service at all (a node from before clusters).
    map: Option<v1::ClusterMap>,
    /// Who leads each group, as this node believes; groups not listed: this node leads.
    leaders: HashMap<u32, u64>,
    /// Answer this many data requests with UNAVAILABLE, leader unknown (an election).
    electing: u32,
    /// Answer every data request with this code.
    fail: Option<Code>,
    /// Answer admin calls with UNAVAILABLE.
    admin_down: bool,
    /// Data requests received, served or not.
    asked: u64,
    admin_calls: u64,
}

#[derive(Clone)]
struct Fake {
    id: u64,
    script: Arc<Mutex<Script>>,
    log: Arc<Mutex<Vec<Served>>>,
}

/// The byte a fake node returns at volume offset `pos`.
fn pattern(pos: u64) -> u8 {
    (pos % 251) as u8
}

fn io_error(code: Code, leader: u64) -> Reply {
    Reply::Error(v1::IoError { code: code as i32, message: "scripted".into(), leader, epoch: 0 })
}

fn volume() -> v1::Volume {
    v1::Volume { id: VOL, name: "vol".into(), size_bytes: VOL_SIZE, ..Default::default() }
}

/// A one-chunk volume: its chunks are all in one group.
const SMALL: u64 = 43;

fn small_volume() -> v1::Volume {
    v1::Volume { id: SMALL, name: "small".into(), size_bytes: 1 << 20, ..Default::default() }
}

impl Fake {
    fn answer(&self, op: Op) -> Reply {
        let mut s = self.script.lock();
        s.asked += 1;
        if let Some(code) = s.fail {
            return io_error(code, 0);
        }
        if s.electing > 0 {
            s.electing -= 1;
            return io_error(Code::Unavailable, 0);
        }
        let groups = s.map.as_ref().map_or(0, |m| m.groups);
        let (kind, offset, len, group, data) = describe(&op, groups);
        if groups > 0 && offset / C != (offset + len.max(1) - 1) / C {
            return Reply::Error(v1::IoError {
                code: Code::InvalidArgument as i32,
                message: format!("{kind} of {len} bytes at {offset} crosses a chunk boundary"),
                leader: 0,
                epoch: 0,
            });
        }
        let leader = group.and_then(|g| s.leaders.get(&g).copied()).unwrap_or(self.id);
        if leader != self.id {
            return io_error(Code::Unavailable, leader);
        }
        self.log.lock().push(Served { node: self.id, kind, offset, len, group, data });
        match op {
            Op::Read(_) => Reply::Read(v1::ReadResponse {
                data: (offset..offset + len).map(pattern).collect::<Vec<u8>>().into(),
            }),
            Op::BlockStatus(_) => Reply::BlockStatus(v1::BlockStatusResponse {
                extents: vec![v1::Extent { length: len, hole: true, zero: true }],
            }),
            _ => Reply::Done(true),
        }
    }
}

type Described = (&'static str, u64, u64, Option<u32>, Option<Bytes>);

/// A request's kind, range and group (`None` on a single node).
fn describe(op: &Op, groups: u32) -> Described {
    let group = |offset: u64| (groups > 0).then(|| chunk_group(VOL, offset / C, groups));
    match op {
        Op::Read(r) => ("read", r.offset, r.length.into(), group(r.offset), None),
        Op::Write(r) => {
            ("write", r.offset, r.data.len() as u64, group(r.offset), Some(r.data.clone()))
        }
        Op::WriteZeroes(r) => ("write_zeroes", r.offset, r.length, group(r.offset), None),
        Op::Trim(r) => ("trim", r.offset, r.length, group(r.offset), None),
        Op::BlockStatus(r) => ("block_status", r.offset, r.length, group(r.offset), None),
        Op::Flush(r) => ("flush", 0, 0, r.group, None),
        Op::Ping(_) => ("ping", 0, 0, None, None),
    }
}

#[tonic::async_trait]
impl Cluster for Fake {
    async fn get_cluster_map(
        &self,
        _: Request<v1::GetClusterMapRequest>,
    ) -> Result<Response<v1::ClusterMap>, Status> {
        let map = self.script.lock().map.clone();
        map.map(Response::new).ok_or_else(|| Status::unimplemented("no cluster here"))
    }

    async fn replace_node(
        &self,
        _: Request<v1::ReplaceNodeRequest>,
    ) -> Result<Response<v1::ReplacementStatus>, Status> {
        unimplemented()
    }

    async fn get_replacement(
        &self,
        _: Request<v1::GetReplacementRequest>,
    ) -> Result<Response<v1::ReplacementStatus>, Status> {
        unimplemented()
    }

    async fn change_replica(
        &self,
        _: Request<v1::ChangeReplicaRequest>,
    ) -> Result<Response<v1::ChangeReplicaReply>, Status> {
        unimplemented()
    }

    async fn fence_volume(
        &self,
        _: Request<v1::FenceVolumeRequest>,
    ) -> Result<Response<v1::FenceVolumeReply>, Status> {
        unimplemented()
    }

    async fn fence_group(
        &self,
        _: Request<v1::FenceGroupRequest>,
    ) -> Result<Response<v1::FenceVolumeReply>, Status> {
        unimplemented()
    }

    async fn snapshot_volume(
        &self,
        _: Request<v1::SnapshotVolumeRequest>,
    ) -> Result<Response<v1::SnapshotVolumeReply>, Status> {
        unimplemented()
    }

    async fn volume_changes(
        &self,
        _: Request<v1::VolumeChangesRequest>,
    ) -> Result<Response<v1::VolumeChangesReply>, Status> {
        unimplemented()
    }

    async fn volume_usage(
        &self,
        _: Request<v1::VolumeUsageRequest>,
    ) -> Result<Response<v1::VolumeUsageReply>, Status> {
        unimplemented()
    }
    async fn truncate_volume(
        &self,
        _: Request<v1::TruncateVolumeRequest>,
    ) -> Result<Response<v1::TruncateVolumeReply>, Status> {
        unimplemented()
    }
}

type IoStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::IoResponse, Status>> + Send + 'static>>;

/// Serves data lanes as a storage node does: each request answered by the script, in order;
/// pings at once.
async fn serve_lanes(fake: Fake, mut lanes: mpsc::Receiver<(TcpStream, SocketAddr)>) {
    while let Some((mut s, _)) = lanes.recv().await {
        let me = fake.clone();
        tokio::spawn(async move {
            if lane::accept_hello(&mut s).await.is_err() {
                return;
            }
            let welcome =
                v1::LaneWelcome { version: lane::VERSION, node_id: me.id, error: String::new() };
            if lane::send_welcome(&mut s, &welcome).await.is_err() {
                return;
            }
            let (mut buf, mut out) = (BytesMut::new(), BytesMut::new());
            loop {
                loop {
                    let req: v1::IoRequest = match lane::take_frame(&mut buf) {
                        Ok(Some(f)) => match lane::decode(f) {
                            Ok(r) => r,
                            Err(_) => return,
                        },
                        Ok(None) => break,
                        Err(_) => return,
                    };
                    let result = match req.op {
                        Some(Op::Ping(_)) => Some(Reply::Pong(true)),
                        op => op.map(|op| me.answer(op)),
                    };
                    lane::put_frame(&v1::IoResponse { id: req.id, result }, &mut out);
                }
                if !out.is_empty() {
                    if s.write_all(&out).await.is_err() {
                        return;
                    }
                    out.clear();
                }
                match s.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        });
    }
}

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not in the fake"))
}

#[tonic::async_trait]
impl BlockIo for Fake {
    type IoStream = IoStream;

    async fn io(
        &self,
        req: Request<tonic::Streaming<v1::IoRequest>>,
    ) -> Result<Response<IoStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let me = self.clone();
        tokio::spawn(async move {
            while let Ok(Some(r)) = inbound.message().await {
                let result = r.op.map(|op| me.answer(op));
                if tx.send(Ok(v1::IoResponse { id: r.id, result })).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn read(
        &self,
        _: Request<v1::ReadRequest>,
    ) -> Result<Response<v1::ReadResponse>, Status> {
        unimplemented()
    }

    async fn write(
        &self,
        _: Request<v1::WriteRequest>,
    ) -> Result<Response<v1::WriteResponse>, Status> {
        unimplemented()
    }

    async fn write_zeroes(
        &self,
        _: Request<v1::WriteZeroesRequest>,
    ) -> Result<Response<v1::WriteZeroesResponse>, Status> {
        unimplemented()
    }

    async fn trim(
        &self,
        _: Request<v1::TrimRequest>,
    ) -> Result<Response<v1::TrimResponse>, Status> {
        unimplemented()
    }

    async fn flush(
        &self,
        _: Request<v1::FlushRequest>,
    ) -> Result<Response<v1::FlushResponse>, Status> {
        unimplemented()
    }

    async fn block_status(
        &self,
        _: Request<v1::BlockStatusRequest>,
    ) -> Result<Response<v1::BlockStatusResponse>, Status> {
        unimplemented()
    }
}

impl Fake {
    fn admin_call(&self) -> Result<(), Status> {
        let mut s = self.script.lock();
        s.admin_calls += 1;
        if s.admin_down {
            return Err(Status::unavailable("scripted"));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl VolumeAdmin for Fake {
    async fn get_volume(
        &self,
        req: Request<v1::GetVolumeRequest>,
    ) -> Result<Response<v1::Volume>, Status> {
        self.admin_call()?;
        let wanted = req.into_inner().volume.and_then(|v| v.r#ref);
        match wanted {
            Some(v1::volume_ref::Ref::Name(n)) if n == "vol" => Ok(Response::new(volume())),
            Some(v1::volume_ref::Ref::Name(n)) if n == "small" => Ok(Response::new(small_volume())),
            _ => Err(Status::not_found("no such volume")),
        }
    }

    async fn list_volumes(
        &self,
        _: Request<v1::ListVolumesRequest>,
    ) -> Result<Response<v1::ListVolumesResponse>, Status> {
        self.admin_call()?;
        Ok(Response::new(v1::ListVolumesResponse { volumes: vec![volume()] }))
    }

    async fn create_volume(
        &self,
        _: Request<v1::CreateVolumeRequest>,
    ) -> Result<Response<v1::Volume>, Status> {
        unimplemented()
    }

    async fn resize_volume(
        &self,
        _: Request<v1::ResizeVolumeRequest>,
    ) -> Result<Response<v1::Volume>, Status> {
        unimplemented()
    }

    async fn update_volume(
        &self,
        _: Request<v1::UpdateVolumeRequest>,
    ) -> Result<Response<v1::Volume>, Status> {
        unimplemented()
    }

    async fn delete_volume(
        &self,
        _: Request<v1::DeleteVolumeRequest>,
    ) -> Result<Response<v1::DeleteVolumeResponse>, Status> {
        unimplemented()
    }

    async fn node_status(
        &self,
        _: Request<v1::NodeStatusRequest>,
    ) -> Result<Response<v1::NodeStatusResponse>, Status> {
        unimplemented()
    }
}

/// Fake nodes 1..=n sharing one log of served requests.
struct Nodes {
    fakes: Vec<Fake>,
    addrs: Vec<SocketAddr>,
    log: Arc<Mutex<Vec<Served>>>,
}

impl Nodes {
    /// Starts `n` nodes; `script(id, addrs)` says what node `id` does.
    async fn start(n: u64, script: impl Fn(u64, &[SocketAddr]) -> Script) -> Self {
        let mut listeners = Vec::new();
        for _ in 0..n {
            listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
        }
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut fakes = Vec::new();
        for (id, listener) in (1..).zip(listeners) {
            let fake =
                Fake { id, script: Arc::new(Mutex::new(script(id, &addrs))), log: log.clone() };
            let cluster =
                fake.script.lock().map.is_some().then(|| ClusterServer::new(fake.clone()));
            let router = tonic::transport::Server::builder()
                .add_service(BlockIoServer::new(fake.clone()))
                .add_service(VolumeAdminServer::new(fake.clone()))
                .add_optional_service(cluster);
            let incoming = lane::split(listener);
            tokio::spawn(serve_lanes(fake.clone(), incoming.lanes));
            let grpc = tokio_stream::wrappers::ReceiverStream::new(incoming.grpc);
            tokio::spawn(router.serve_with_incoming(grpc));
            fakes.push(fake);
        }
        Self { fakes, addrs, log }
    }

    fn uri(&self, id: u64) -> String {
        format!("http://{}", self.addrs[id as usize - 1])
    }

    fn script(&self, id: u64) -> parking_lot::MutexGuard<'_, Script> {
        self.fakes[id as usize - 1].script.lock()
    }

    fn served(&self) -> Vec<Served> {
        self.log.lock().clone()
    }

    fn asked(&self) -> u64 {
        self.fakes.iter().map(|f| f.script.lock().asked).sum()
    }
}

/// The node that leads `group` in [`cluster_script`]: groups spread over the nodes.
fn lead(group: u32, nodes: u64) -> u64 {
    u64::from(group - 1) % nodes + 1
}

/// A map listing `addrs` as nodes 1..=n, with `GROUPS` groups whose leaders are unknown.
fn map(addrs: &[SocketAddr]) -> v1::ClusterMap {
    v1::ClusterMap {
        self_id: 1,
        nodes: (1..)
            .zip(addrs)
            .map(|(id, a)| v1::NodeInfo { id, address: a.to_string(), datacenter: String::new() })
            .collect(),
        groups: GROUPS,
        group_state: Vec::new(),
    }
}

/// Every node knows who leads (and names it to requests for groups it does not lead); the map
/// they serve does not, so the frontend has to learn it from their answers.
fn cluster_script(id: u64, addrs: &[SocketAddr]) -> Script {
    let n = addrs.len() as u64;
    let leaders = (1..=GROUPS).map(|g| (g, lead(g, n))).filter(|&(_, l)| l != id).collect();
    Script { map: Some(map(addrs)), leaders, ..Default::default() }
}

fn backend(uris: &str) -> GrpcBackend {
    GrpcBackend::connect_lazy(uris).unwrap()
}

fn group_of(offset: u64) -> u32 {
    chunk_group(VOL, offset / C, GROUPS)
}

#[tokio::test]
async fn a_node_from_before_clusters_gets_every_request_whole() {
    let nodes = Nodes::start(1, |_, _| Script::default()).await;
    let b = backend(&nodes.uri(1));
    assert_eq!(b.lookup("vol").await.unwrap().unwrap().size, VOL_SIZE);
    assert_eq!(b.lookup("nope").await.unwrap(), None);
    b.write(VOL, C - 4096, Bytes::from(vec![7u8; 8192]), false).await.unwrap();
    let data = b.read(VOL, C - 4096, 8192).await.unwrap();
    assert!(data.iter().enumerate().all(|(i, &x)| x == pattern(C - 4096 + i as u64)));
    b.flush(VOL).await.unwrap();
    let served = nodes.served();
    let kinds: Vec<_> = served.iter().map(|s| (s.kind, s.offset, s.len, s.group)).collect();
    assert_eq!(
        kinds,
        [("write", C - 4096, 8192, None), ("read", C - 4096, 8192, None), ("flush", 0, 0, None)],
        "no splitting, no flush per group"
    );
}

#[tokio::test]
async fn a_single_node_fails_requests_at_once() {
    let nodes = Nodes::start(1, |_, addrs| {
        let mut m = map(addrs);
        m.groups = 0;
        Script { map: Some(m), fail: Some(Code::FailedPrecondition), ..Default::default() }
    })
    .await;
    let b = backend(&nodes.uri(1));
    let r = b.write(VOL, 0, Bytes::from_static(&[1; 512]), false).await;
    assert_eq!(r, Err(BackendError::ReadOnly));
    nodes.script(1).fail = Some(Code::Unavailable);
    let r = b.read(VOL, 0, 512).await;
    assert!(matches!(r, Err(BackendError::Unavailable(_))), "{r:?}");
    assert_eq!(nodes.asked(), 2, "a single node's answers are final");
}

#[tokio::test]
async fn requests_find_the_leader_of_their_group() {
    let nodes = Nodes::start(3, cluster_script).await;
    let b = backend(&nodes.uri(2));
    for chunk in 0..8 {
        b.write(VOL, chunk * C + 4096, Bytes::from(vec![chunk as u8; 4096]), false).await.unwrap();
    }
    let served = nodes.served();
    assert_eq!(served.len(), 8);
    for s in &served {
        let g = group_of(s.offset);
        assert_eq!(s.group, Some(g));
        assert_eq!(s.node, lead(g, 3), "{s:?}");
    }
    // Now the leaders are cached: one request each, no redirects.
    let asked = nodes.asked();
    for chunk in 0..8 {
        b.read(VOL, chunk * C, 4096).await.unwrap();
    }
    assert_eq!(nodes.asked() - asked, 8);
}

#[tokio::test]
async fn requests_across_a_chunk_boundary_are_split_there() {
    let nodes = Nodes::start(3, cluster_script).await;
    let b = backend(&nodes.uri(1));
    let data: Bytes = (0..8192u32).map(|i| (i / 4096) as u8 + 1).collect::<Vec<u8>>().into();
    b.write(VOL, C - 4096, data, true).await.unwrap();
    let read = b.read(VOL, C - 4096, 8192).await.unwrap();
    assert!(read.iter().enumerate().all(|(i, &x)| x == pattern(C - 4096 + i as u64)));
    b.trim(VOL, C / 2, 2 * C, false).await.unwrap();
    b.write_zeroes(VOL, 3 * C - 512, 1024, true, false).await.unwrap();
    let extents = b.block_status(VOL, 2 * C - 4096, 1 << 20).await.unwrap();
    assert_eq!(extents, [Extent { length: 4096, hole: true, zero: true }], "first chunk only");

    let by_kind = |kind| -> Vec<(u64, u64)> {
        nodes.served().iter().filter(|s| s.kind == kind).map(|s| (s.offset, s.len)).collect()
    };
    let writes: Vec<Served> = nodes.served().into_iter().filter(|s| s.kind == "write").collect();
    assert_eq!(writes.len(), 2);
    for w in &writes {
        assert_eq!(w.node, lead(group_of(w.offset), 3));
        let want = if w.offset < C { 1 } else { 2 };
        assert!(w.data.as_ref().unwrap().iter().all(|&x| x == want), "each half to its chunk");
    }
    let mut reads = by_kind("read");
    reads.sort_unstable();
    assert_eq!(reads, [(C - 4096, 4096), (C, 4096)]);
    let mut trims = by_kind("trim");
    trims.sort_unstable();
    assert_eq!(trims, [(C / 2, C / 2), (C, C), (2 * C, C / 2)]);
    let mut zeroes = by_kind("write_zeroes");
    zeroes.sort_unstable();
    assert_eq!(zeroes, [(3 * C - 512, 512), (3 * C, 512)]);
    assert_eq!(by_kind("block_status"), [(2 * C - 4096, 4096)]);
}

#[tokio::test]
async fn elections_are_waited_out() {
    let nodes =
        Nodes::start(3, |id, addrs| Script { electing: 2, ..cluster_script(id, addrs) }).await;
    let b = backend(&nodes.uri(1));
    let started = Instant::now();
    b.write(VOL, 0, Bytes::from_static(&[3; 4096]), false).await.unwrap();
    assert!(nodes.asked() > 1);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(nodes.served().len(), 1);
}

#[tokio::test]
async fn final_errors_are_not_retried() {
    for (code, want) in [
        (Code::NotFound, BackendError::NotFound),
        (Code::FailedPrecondition, BackendError::ReadOnly),
        (Code::OutOfRange, BackendError::InvalidArgument("scripted".into())),
        (Code::DataLoss, BackendError::Io("scripted".into())),
    ] {
        let nodes =
            Nodes::start(2, |id, addrs| Script { fail: Some(code), ..cluster_script(id, addrs) })
                .await;
        let b = backend(&nodes.uri(1));
        assert_eq!(b.read(VOL, 0, 4096).await, Err(want));
        assert_eq!(nodes.asked(), 1, "{code:?} is final");
    }
}

#[tokio::test]
async fn a_flush_reaches_every_group_of_the_volume() {
    let nodes = Nodes::start(3, cluster_script).await;
    let b = backend(&nodes.uri(1));
    // Size unknown (no lookup yet): every group, each at its leader.
    b.flush(SMALL).await.unwrap();
    let mut groups: Vec<u32> = nodes.served().iter().filter_map(|s| s.group).collect();
    groups.sort_unstable();
    assert_eq!(groups, [1, 2, 3, 4]);
    assert!(nodes.served().iter().all(|s| s.node == lead(s.group.unwrap(), 3)));
    // Size known: only the groups holding its chunks.
    assert_eq!(b.lookup("small").await.unwrap().unwrap().volume_id, SMALL);
    nodes.log.lock().clear();
    b.flush(SMALL).await.unwrap();
    let served = nodes.served();
    assert_eq!(served.len(), 1);
    let g = chunk_group(SMALL, 0, GROUPS);
    assert_eq!((served[0].group, served[0].node), (Some(g), lead(g, 3)));
}

#[tokio::test]
async fn a_dead_first_endpoint_is_skipped() {
    let nodes = Nodes::start(2, cluster_script).await;
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let b = backend(&format!("http://{dead},{}", nodes.uri(2)));
    assert!(b.lookup("vol").await.unwrap().is_some());
    b.write(VOL, 0, Bytes::from_static(&[1; 4096]), false).await.unwrap();
}

#[tokio::test]
async fn no_endpoint_answering_fails_the_request_and_the_next_one_tries_again() {
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let b = backend(&format!("http://{dead}"));
    let r = b.lookup("vol").await;
    assert!(matches!(r, Err(BackendError::Unavailable(_))), "{r:?}");
    // A node comes up at that address.
    let listener = TcpListener::bind(dead).await.unwrap();
    let fake = Fake { id: 1, script: Arc::new(Mutex::new(Script::default())), log: Arc::default() };
    let router = tonic::transport::Server::builder()
        .add_service(BlockIoServer::new(fake.clone()))
        .add_service(VolumeAdminServer::new(fake));
    tokio::spawn(router.serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)));
    let mut found = None;
    for _ in 0..50 {
        if let Ok(v) = b.lookup("vol").await {
            found = v;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(found.is_some());
}

#[tokio::test]
async fn a_dead_leader_is_left_for_the_new_one() {
    // Node 3 is in the map and led group g, but it is gone; node 1 leads g now, and the live
    // nodes say so.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let g = group_of(0);
    let nodes = Nodes::start(2, |id, addrs| {
        let mut m = map(&[addrs[0], addrs[1], dead]);
        m.group_state = vec![v1::GroupInfo { group: g, leader: 3, term: 1, ..Default::default() }];
        let leaders = (id != 1).then_some((g, 1)).into_iter().collect();
        Script { map: Some(m), leaders, ..Default::default() }
    })
    .await;
    let b = backend(&nodes.uri(2));
    let started = Instant::now();
    b.write(VOL, 0, Bytes::from_static(&[5; 4096]), false).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    let served = nodes.served();
    assert_eq!(served.len(), 1);
    assert_eq!(served[0].node, 1);
}

#[tokio::test]
async fn a_leader_missing_from_the_map_is_found_by_fetching_it_again() {
    // Every group is led by node 3, which the first map does not list (it just joined).
    let nodes = Nodes::start(3, |id, addrs| {
        let leaders = if id == 3 { HashMap::new() } else { (1..=GROUPS).map(|g| (g, 3)).collect() };
        Script { map: Some(map(&addrs[..2])), leaders, ..Default::default() }
    })
    .await;
    let b = backend(&nodes.uri(1));
    assert!(b.lookup("vol").await.unwrap().is_some());
    let full = map(&nodes.addrs);
    for id in 1..=3 {
        nodes.script(id).map = Some(full.clone());
    }
    b.write(VOL, 0, Bytes::from_static(&[5; 4096]), false).await.unwrap();
    let served = nodes.served();
    assert_eq!(served.len(), 1);
    assert_eq!(served[0].node, 3);
}

#[tokio::test]
async fn admin_calls_move_past_unavailable_nodes() {
    let nodes =
        Nodes::start(3, |id, addrs| Script { admin_down: id != 2, ..cluster_script(id, addrs) })
            .await;
    let b = backend(&nodes.uri(1));
    for _ in 0..3 {
        assert!(b.lookup("vol").await.unwrap().is_some());
        assert_eq!(b.list().await.unwrap().len(), 1);
    }
    assert!(nodes.script(2).admin_calls >= 6);
}
