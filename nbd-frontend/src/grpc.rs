//! [`Backend`] over gRPC: the frontend as a network client of the storage nodes.
//!
//! **Invariant:** the frontend never opens a storage node's files or RocksDB; everything goes
//! through the `BlockIo`, `VolumeAdmin` and `Cluster` services. gRPC status codes are mapped to
//! [`BackendError`] here, in one place (`map_status`).
//!
//! # Connections
//!
//! Each storage node is a `Node`: data travels on a few long-lived `BlockIo.Io` streams
//! ("lanes"), each on its own HTTP/2 connection, carrying many requests matched to their
//! responses by id. A stream that breaks fails the requests waiting on it, and the next request
//! opens a new one. Admin calls and cluster maps use one more channel per node.
//!
//! # Single node or cluster
//!
//! `--storage` names one endpoint or several (any one reachable is enough). The first request
//! (normally an export lookup in the NBD handshake) asks them in order for the cluster map
//! (`Cluster.GetClusterMap`), and the first answer settles the mode for the life of the
//! process; if none answers, that request fails and the next one asks again.
//!
//! - **Single node**: the map has `groups == 0`, or the node predates the `Cluster` service
//!   (`UNIMPLEMENTED`). Every request goes to that node as one call, with no retries: while
//!   the node is down requests fail (EIO), and they work again once it is back.
//! - **Cluster**: requests are routed to chunk group leaders, as below.
//!
//! # Routing in a cluster
//!
//! - A request is split at chunk boundaries (`parts`): each piece belongs to the chunk group
//!   `tern_common::chunk_group(volume, chunk, groups)`. The pieces are sent concurrently: reads
//!   are concatenated in order, writes carry slices of the one buffer, write-zeroes and trims
//!   cover sub-ranges. Block status asks only about the first chunk's piece: NBD lets a reply
//!   cover less than was asked, as long as it starts at the first byte.
//! - Each piece goes to the last known leader of its group (a table of atomics: no lock on the
//!   hot path), or to the members in turn when the leader is unknown.
//! - A node that does not lead the group answers `UNAVAILABLE` with `IoError.leader`: the
//!   cache is updated and the piece resent there at once (a few hops, then a pause, so stale
//!   nodes naming each other do not spin).
//! - `leader == 0` (an election), any other `UNAVAILABLE`, `DEADLINE_EXCEEDED` or `CANCELLED`,
//!   and broken streams or refused connections are transient: the cached leader is forgotten,
//!   the map is fetched again in the background (at most once a second), and the piece goes to
//!   another node after a pause (20 ms, doubling up to 250 ms). After 30 s in all it fails
//!   with [`BackendError::Unavailable`] (EIO). Resending a write is safe: block writes are
//!   idempotent. Every other error is final and returned at once.
//! - A flush goes to the leader of every group holding a chunk of the volume (from the size
//!   seen by `lookup`; every group if unknown), naming its group in `FlushRequest.group`,
//!   concurrently, and succeeds if all do. (A single node gets one flush without a group.)
//! - Admin calls go to the meta group's leader if known, else to any member (nodes forward
//!   them), and move to another member on `UNAVAILABLE`, within the same 30 s.
//! - Members from the map are watched by HTTP/2 keep-alive pings, so a request waiting on a
//!   node that vanished without closing its connections moves on within about 15 s.

mod cluster;
mod node;
pub use node::set_datacenter;
mod parts;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tern_proto::v1::io_request::Op;
use tern_proto::v1::{self, volume_ref};
use tokio::sync::OnceCell;
use tonic::Code;
use tracing::info;

use self::cluster::Cluster;
use self::node::Node;
use self::parts::{chunk_parts, first_part, Part};
use crate::backend::{Backend, BackendError, ExportInfo, Extent};
use crate::metrics::BackendMetrics;

/// The storage nodes, reached over gRPC. Cheap to clone: clones share the connections and
/// what is known of the cluster.
#[derive(Clone)]
pub struct GrpcBackend {
    inner: Arc<Inner>,
}

struct Inner {
    /// The configured endpoints, in order.
    seeds: Vec<Arc<Node>>,
    /// With a volume manager: exports are attached to this host before they are served.
    attacher: Option<Attacher>,
    /// The attachment of each volume attached here: its generation and the epoch its writes
    /// carry (sent with every write).
    attached: parking_lot::RwLock<std::collections::HashMap<u64, Arc<Attached>>>,
    /// The id each volume's chunks are placed by, where it is not the volume's own (clones).
    placements: parking_lot::RwLock<std::collections::HashMap<u64, u64>>,
    /// `local` volumes of a cluster: the node holding each (all its I/O goes there).
    homes: parking_lot::RwLock<std::collections::HashMap<u64, u64>>,
    /// Read-only exports of snapshots (`volume@snapshot`): export id -> (volume id, epoch).
    snapshots: parking_lot::RwLock<std::collections::HashMap<u64, (u64, u64)>>,
    next_snapshot_export: std::sync::atomic::AtomicU64,
    /// Settled by the first cluster map (or its absence), for the life of the process.
    mode: OnceCell<Mode>,
    /// Retries and redirects of a cluster's requests.
    metrics: BackendMetrics,
}

enum Mode {
    /// One node without replication: everything goes there.
    Single(Arc<Node>),
    Cluster(Arc<Cluster>),
}

/// A node's answer to one data request (possibly an `IoError`).
type Reply = v1::io_response::Result;

impl GrpcBackend {
    /// Connects lazily to `endpoints`: one gRPC endpoint (e.g. `http://127.0.0.1:7700`) or
    /// several separated by commas, asked in order for the cluster map. The frontend starts
    /// even when no storage node is up yet; requests fail with EIO until one is.
    pub fn connect_lazy(endpoints: &str) -> Result<Self, tonic::transport::Error> {
        Self::build(endpoints, None)
    }

    /// As [`Self::connect_lazy`], and attaches every export through the volume manager at
    /// `managers` (comma-separated gRPC endpoints, any replica) as host `host` before serving
    /// it, sending the attachment's generation with every write: once another host takes the
    /// volume over, the storage nodes refuse this host's writes (EPERM to the NBD client).
    pub fn connect_lazy_attaching(
        endpoints: &str,
        managers: &str,
        host: &str,
    ) -> Result<Self, tonic::transport::Error> {
        let endpoints_of_managers = managers.split(',').map(|e| e.trim().to_string()).collect();
        Self::build(
            endpoints,
            Some(Attacher { endpoints: endpoints_of_managers, host: host.into() }),
        )
    }

    fn build(endpoints: &str, attacher: Option<Attacher>) -> Result<Self, tonic::transport::Error> {
        let seeds = endpoints
            .split(',')
            .map(|e| Node::seed(e.trim()).map(Arc::new))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            inner: Arc::new(Inner {
                seeds,
                attacher,
                attached: Default::default(),
                placements: Default::default(),
                homes: Default::default(),
                snapshots: Default::default(),
                next_snapshot_export: std::sync::atomic::AtomicU64::new(SNAPSHOT_EXPORT),
                mode: OnceCell::new(),
                metrics: BackendMetrics::default(),
            }),
        })
    }

    /// Registers the backend's counters (retries, redirects) in `registry`, once.
    pub fn register_metrics(&self, registry: &prometheus::Registry) -> prometheus::Result<()> {
        self.inner.metrics.register(registry)
    }

    /// The attachment writes to `volume_id` go under (none without a manager: no lock on the
    /// data path then).
    fn attachment(&self, volume_id: u64) -> Option<Arc<Attached>> {
        self.inner.attacher.as_ref()?;
        self.inner.attached.read().get(&volume_id).cloned()
    }

    /// The id `volume_id`'s chunks are placed by (routing): a clone's parent's.
    fn placement(&self, volume_id: u64) -> u64 {
        self.inner.placements.read().get(&volume_id).copied().unwrap_or(volume_id)
    }

    /// Remembers how a volume's chunks are placed, from its record.
    fn learn_placement(&self, v: &v1::Volume) {
        if v.placement_id != 0 && v.placement_id != v.id {
            self.inner.placements.write().insert(v.id, v.placement_id);
        }
        if v.home_node != 0 {
            self.inner.homes.write().insert(v.id, v.home_node);
        }
    }

    /// The node holding `volume_id` if it is a `local` volume of a cluster.
    fn home(&self, volume_id: u64) -> Option<u64> {
        self.inner.homes.read().get(&volume_id).copied()
    }

    /// The volume and epoch an export id reads: a snapshot export's, or the volume's head.
    fn resolve(&self, export_id: u64) -> (u64, u64) {
        if export_id < SNAPSHOT_EXPORT {
            return (export_id, 0);
        }
        self.inner.snapshots.read().get(&export_id).copied().unwrap_or((export_id, 0))
    }

    /// Sends a write-like request built by `op(generation, epoch)` until no snapshot freezes
    /// its epoch: a storage node that refuses it as stale names the epoch to write at, which
    /// this volume's writes carry from then on.
    async fn write_like<F, Fut>(&self, volume_id: u64, op: F) -> Result<(), BackendError>
    where
        F: Fn(u64, u64) -> Fut,
        Fut: Future<Output = Result<(), BackendError>>,
    {
        let att = self.attachment(volume_id);
        let mut tries = 0;
        loop {
            let (generation, epoch) = att.as_ref().map_or((0, 0), |a| {
                (a.generation, a.epoch.load(std::sync::atomic::Ordering::Acquire))
            });
            match op(generation, epoch).await {
                Err(BackendError::StaleEpoch(newer)) if tries < 8 => {
                    tries += 1;
                    if let Some(a) = &att {
                        let was = a.epoch.fetch_max(newer, std::sync::atomic::Ordering::AcqRel);
                        if was < newer {
                            info!(
                                volume = volume_id,
                                epoch = newer,
                                "a snapshot was taken: writing at the next epoch"
                            );
                        }
                    }
                }
                Err(BackendError::StaleEpoch(newer)) => {
                    return Err(BackendError::Io(format!(
                    "writes of volume {volume_id} keep being refused as older than epoch {newer}"
                )))
                }
                r => return r,
            }
        }
    }

    /// Looks up a snapshot export `volume@snapshot` through the volume manager.
    async fn lookup_snapshot(&self, name: &str) -> Result<Option<ExportInfo>, BackendError> {
        let Some((volume, snapshot)) = name.split_once('@') else { return Ok(None) };
        let Some(att) = &self.inner.attacher else {
            // Snapshots are the volume manager's: without one there are none.
            return Ok(None);
        };
        let s = match att.snapshot(volume, snapshot).await {
            Ok(s) => s,
            Err(s) if matches!(s.code(), Code::NotFound | Code::InvalidArgument) => {
                return Ok(None)
            }
            Err(s) => return Err(map_status(s)),
        };
        if s.state != v1::SnapshotState::Ready as i32 {
            return Ok(None);
        }
        // The volume's record tells how its chunks are placed (a clone's snapshot).
        let mode = match self.mode() {
            Some(mode) => mode,
            None => self.discover_mode().await?,
        };
        if let Mode::Cluster(c) = mode {
            let req = v1::GetVolumeRequest {
                volume: Some(v1::VolumeRef { r#ref: Some(volume_ref::Ref::Id(s.volume_id)) }),
            };
            let v = Box::pin(c.control(|mut admin| {
                let req = req.clone();
                async move { admin.get_volume(req).await }
            }))
            .await
            .map_err(map_status)?;
            self.learn_placement(&v);
        }
        let id = {
            let mut snaps = self.inner.snapshots.write();
            match snaps.iter().find(|(_, v)| **v == (s.volume_id, s.epoch)) {
                Some((id, _)) => *id,
                None => {
                    let id = self
                        .inner
                        .next_snapshot_export
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    snaps.insert(id, (s.volume_id, s.epoch));
                    id
                }
            }
        };
        Ok(Some(ExportInfo {
            description: format!(
                "tern snapshot {name} (epoch {}, {} bytes, read-only)",
                s.epoch, s.size_bytes
            ),
            volume_id: id,
            name: name.to_string(),
            size: s.size_bytes,
            read_only: true,
        }))
    }

    /// How requests are routed, once known: the hot path's one check.
    fn mode(&self) -> Option<&Mode> {
        self.inner.mode.get()
    }

    /// Finds out how requests are routed (on the first request). Boxed, like the cluster's
    /// paths below: every NBD request runs in a task of its own, sized by the largest path
    /// inside, and the single-node path should not pay for the others.
    fn discover_mode(
        &self,
    ) -> Pin<Box<impl Future<Output = Result<&Mode, BackendError>> + Send + '_>> {
        Box::pin(self.inner.mode.get_or_try_init(|| self.discover()))
    }

    /// Asks the configured endpoints in order for the cluster map: the first answer decides.
    async fn discover(&self) -> Result<Mode, BackendError> {
        let mut failures = Vec::new();
        let mut code = Code::Unavailable;
        for seed in &self.inner.seeds {
            match seed.cluster_map().await {
                Ok(map) if map.groups == 0 => return Ok(single(seed)),
                Ok(map) => match Cluster::new(map, self.inner.seeds.clone()) {
                    Ok(c) => {
                        let c = c.with_metrics(self.inner.metrics.clone());
                        info!(
                            "storage cluster: {} members, {} chunk groups (map from {})",
                            c.members(),
                            c.groups(),
                            seed.uri
                        );
                        return Ok(Mode::Cluster(Arc::new(c)));
                    }
                    Err(why) => failures.push(format!("{}: {why}", seed.uri)),
                },
                Err(s) if s.code() == Code::Unimplemented => return Ok(single(seed)),
                Err(s) => {
                    failures.push(format!("{}: {}", seed.uri, s.message()));
                    code = s.code();
                }
            }
        }
        let why = format!("no storage node answered: {}", failures.join("; "));
        Err(map_status(tonic::Status::new(code, why)))
    }
}

/// The volume manager client of a frontend that attaches its exports.
struct Attacher {
    endpoints: Vec<String>,
    host: String,
}

/// Export ids from here up are snapshot exports (volume ids are log indexes, far below).
const SNAPSHOT_EXPORT: u64 = 1 << 62;

/// A volume attached here.
struct Attached {
    generation: u64,
    /// The epoch writes carry: the head epoch at attach, raised when a snapshot is taken.
    epoch: std::sync::atomic::AtomicU64,
}

impl Attacher {
    fn channels(
        &self,
    ) -> impl Iterator<Item = Result<tonic::transport::Channel, tonic::Status>> + '_ {
        self.endpoints.iter().map(|e| {
            let uri = if e.contains("://") { e.clone() } else { format!("http://{e}") };
            tonic::transport::Endpoint::from_shared(uri)
                .map(|ep| ep.connect_timeout(std::time::Duration::from_secs(1)).connect_lazy())
                .map_err(|err| tonic::Status::invalid_argument(err.to_string()))
        })
    }

    /// A snapshot of `volume` named `name`, from the volume manager.
    async fn snapshot(&self, volume: &str, name: &str) -> Result<v1::Snapshot, tonic::Status> {
        let mut last = tonic::Status::unavailable("no volume manager endpoint");
        for ch in self.channels() {
            let req = v1::GetSnapshotRequest {
                volume: Some(v1::VolumeRef { r#ref: Some(volume_ref::Ref::Name(volume.into())) }),
                name: name.into(),
            };
            match v1::manager_client::ManagerClient::new(ch?).get_snapshot(req).await {
                Ok(s) => return Ok(s.into_inner()),
                Err(s) if is_transient(s.code()) => last = s,
                Err(s) => return Err(s),
            }
        }
        Err(last)
    }

    /// Attaches `name` to this host (never taking it from another host: that is the
    /// operator's or the VM layer's decision, `tern volume attach --takeover`).
    async fn attach(&self, name: &str) -> Result<v1::Attachment, tonic::Status> {
        let mut last = tonic::Status::unavailable("no volume manager endpoint");
        for ch in self.channels() {
            let ch = ch?;
            let req = v1::AttachRequest {
                volume: Some(v1::VolumeRef { r#ref: Some(volume_ref::Ref::Name(name.into())) }),
                host: self.host.clone(),
                takeover: false,
            };
            match v1::manager_client::ManagerClient::new(ch).attach(req).await {
                Ok(a) => return Ok(a.into_inner()),
                Err(s) if is_transient(s.code()) => last = s,
                Err(s) => return Err(s),
            }
        }
        Err(last)
    }
}

fn single(node: &Arc<Node>) -> Mode {
    info!("single storage node at {}", node.uri);
    Mode::Single(node.clone())
}

/// One request to the single node: its `IoError` is the request's failure.
async fn call_single(node: &Node, op: Op) -> Result<Reply, BackendError> {
    match node.call(op).await? {
        Reply::Error(e) => Err(map_status(io_status(e))),
        reply => Ok(reply),
    }
}

fn io_status(e: v1::IoError) -> tonic::Status {
    tonic::Status::new(Code::from_i32(e.code), e.message)
}

/// Codes that mean "not now, or not here": worth another try elsewhere in a cluster.
fn is_transient(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled)
}

/// The one place a gRPC status becomes a [`BackendError`] (and so, later, an NBD errno).
fn map_status(s: tonic::Status) -> BackendError {
    match s.code() {
        Code::NotFound => BackendError::NotFound,
        Code::InvalidArgument | Code::OutOfRange => {
            BackendError::InvalidArgument(s.message().to_string())
        }
        Code::PermissionDenied | Code::FailedPrecondition => BackendError::ReadOnly,
        Code::ResourceExhausted => BackendError::NoSpace,
        code if is_transient(code) => BackendError::Unavailable(s.message().to_string()),
        _ => BackendError::Io(s.message().to_string()),
    }
}

fn unexpected(what: &str) -> BackendError {
    BackendError::Io(format!("storage node sent an unexpected reply to {what}"))
}

/// The header of a request; `generation` is the attachment's (0 without a manager), checked
/// by the storage nodes on everything that changes data; `epoch` is the epoch a write goes
/// to, or a read reads (0: the head).
fn header(volume_id: u64, generation: u64, epoch: u64) -> Option<v1::IoHeader> {
    Some(v1::IoHeader { volume_id, epoch, generation })
}

fn read_op(volume_id: u64, epoch: u64, offset: u64, length: u32) -> Op {
    Op::Read(v1::ReadRequest { header: header(volume_id, 0, epoch), offset, length })
}

fn write_op(volume_id: u64, tag: (u64, u64), offset: u64, data: Bytes, fua: bool) -> Op {
    Op::Write(v1::WriteRequest { header: header(volume_id, tag.0, tag.1), offset, data, fua })
}

fn write_zeroes_op(
    volume_id: u64,
    tag: (u64, u64),
    offset: u64,
    length: u64,
    punch_hole: bool,
    fua: bool,
) -> Op {
    Op::WriteZeroes(v1::WriteZeroesRequest {
        header: header(volume_id, tag.0, tag.1),
        offset,
        length,
        punch_hole,
        fua,
    })
}

fn trim_op(volume_id: u64, tag: (u64, u64), offset: u64, length: u64, fua: bool) -> Op {
    Op::Trim(v1::TrimRequest { header: header(volume_id, tag.0, tag.1), offset, length, fua })
}

/// A flush of `group` (in a cluster; `None` for a single node).
fn flush_op(volume_id: u64, group: Option<u32>) -> Op {
    Op::Flush(v1::FlushRequest { header: header(volume_id, 0, 0), group })
}

fn block_status_op(volume_id: u64, epoch: u64, offset: u64, length: u64) -> Op {
    Op::BlockStatus(v1::BlockStatusRequest { header: header(volume_id, 0, epoch), offset, length })
}

/// The data of a read reply, which must be `len` bytes long.
fn read_data(reply: Reply, len: u64) -> Result<Bytes, BackendError> {
    let Reply::Read(r) = reply else {
        return Err(unexpected("a read"));
    };
    if r.data.len() as u64 != len {
        return Err(BackendError::Io(format!(
            "storage node returned {} bytes for a {len}-byte read",
            r.data.len()
        )));
    }
    Ok(r.data)
}

/// The pieces of a read in order, as one buffer: copied only if there are several (the read
/// crossed a chunk boundary).
fn concat(mut pieces: Vec<Bytes>, len: usize) -> Bytes {
    if pieces.len() == 1 {
        return pieces.pop().unwrap_or_default();
    }
    let mut buf = BytesMut::with_capacity(len);
    for p in &pieces {
        buf.extend_from_slice(p);
    }
    buf.freeze()
}

fn extents(reply: Reply) -> Result<Vec<Extent>, BackendError> {
    let Reply::BlockStatus(r) = reply else {
        return Err(unexpected("a block status request"));
    };
    Ok(r.extents
        .into_iter()
        .map(|e| Extent { length: e.length, hole: e.hole, zero: e.zero })
        .collect())
}

fn export_info(v: v1::Volume) -> ExportInfo {
    ExportInfo {
        description: format!("tern volume {} ({} bytes, id {})", v.name, v.size_bytes, v.id),
        volume_id: v.id,
        name: v.name,
        size: v.size_bytes,
        read_only: v.read_only,
    }
}

impl Backend for GrpcBackend {
    async fn lookup(&self, name: &str) -> Result<Option<ExportInfo>, BackendError> {
        if name.contains('@') {
            return self.lookup_snapshot(name).await;
        }
        let req = v1::GetVolumeRequest {
            volume: Some(v1::VolumeRef { r#ref: Some(volume_ref::Ref::Name(name.to_string())) }),
        };
        let mode = match self.mode() {
            Some(mode) => mode,
            None => self.discover_mode().await?,
        };
        let got = match mode {
            Mode::Single(node) => {
                node.admin().get_volume(req).await.map(tonic::Response::into_inner)
            }
            Mode::Cluster(c) => {
                Box::pin(c.control(|mut admin| {
                    let req = req.clone();
                    async move { admin.get_volume(req).await }
                }))
                .await
            }
        };
        match got {
            Ok(v) => {
                if let Some(att) = &self.inner.attacher {
                    let a = att.attach(name).await.map_err(|s| match s.code() {
                        Code::FailedPrecondition => BackendError::Unavailable(format!(
                            "volume {name} is attached to another host: {}",
                            s.message()
                        )),
                        _ => map_status(s),
                    })?;
                    info!(volume = %name, host = %att.host, generation = a.generation, epoch = a.epoch, "attached");
                    let mut attached = self.inner.attached.write();
                    match attached.get(&v.id) {
                        // Already attached here (another connection): keep the epoch it
                        // learned since, unless this attach knows a newer one.
                        Some(cur) if cur.generation == a.generation => {
                            cur.epoch.fetch_max(a.epoch, std::sync::atomic::Ordering::AcqRel);
                        }
                        _ => {
                            let epoch = std::sync::atomic::AtomicU64::new(a.epoch);
                            attached.insert(
                                v.id,
                                Arc::new(Attached { generation: a.generation, epoch }),
                            );
                        }
                    }
                }
                self.learn_placement(&v);
                if let Mode::Cluster(c) = mode {
                    c.remember_size(self.placement(v.id), v.size_bytes);
                }
                Ok(Some(export_info(v)))
            }
            Err(s) if s.code() == Code::NotFound || s.code() == Code::InvalidArgument => Ok(None),
            Err(s) => Err(map_status(s)),
        }
    }

    async fn list(&self) -> Result<Vec<ExportInfo>, BackendError> {
        let req = v1::ListVolumesRequest {};
        let mode = match self.mode() {
            Some(mode) => mode,
            None => self.discover_mode().await?,
        };
        let got = match mode {
            Mode::Single(node) => {
                node.admin().list_volumes(req).await.map(tonic::Response::into_inner)
            }
            Mode::Cluster(c) => {
                Box::pin(c.control(|mut admin| async move { admin.list_volumes(req).await })).await
            }
        };
        Ok(got.map_err(map_status)?.volumes.into_iter().map(export_info).collect())
    }

    async fn read(&self, export_id: u64, offset: u64, len: u32) -> Result<Bytes, BackendError> {
        let mode = match self.mode() {
            Some(mode) => mode,
            None => self.discover_mode().await?,
        };
        let (volume_id, epoch) = self.resolve(export_id);
        match (mode, self.home(volume_id)) {
            (Mode::Single(node), _) => {
                let op = read_op(volume_id, epoch, offset, len);
                read_data(call_single(node, op).await?, len.into())
            }
            (Mode::Cluster(c), Some(home)) => {
                let reply = c.send_to(home, read_op(volume_id, epoch, offset, len)).await?;
                read_data(reply, len.into())
            }
            (Mode::Cluster(c), None) => {
                // Pieces of a `len`-byte read fit in a u32.
                let op = |p: Part| read_op(volume_id, epoch, p.offset, p.len as u32);
                let place = self.placement(volume_id);
                let replies = Box::pin(c.scatter(place, offset, len.into(), op)).await?;
                let pieces = chunk_parts(offset, len.into())
                    .zip(replies)
                    .map(|(p, reply)| read_data(reply, p.len))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(concat(pieces, len as usize))
            }
        }
    }

    async fn write(
        &self,
        volume_id: u64,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<(), BackendError> {
        let mode = match self.mode() {
            Some(mode) => mode,
            None => self.discover_mode().await?,
        };
        let home = self.home(volume_id);
        self.write_like(volume_id, |gen, epoch| {
            let data = data.clone();
            async move {
                let tag = (gen, epoch);
                match (mode, home) {
                    (Mode::Single(node), _) => {
                        call_single(node, write_op(volume_id, tag, offset, data, fua))
                            .await
                            .map(drop)
                    }
                    (Mode::Cluster(c), Some(home)) => {
                        c.send_to(home, write_op(volume_id, tag, offset, data, fua)).await.map(drop)
                    }
                    (Mode::Cluster(c), None) => {
                        let op = |p: Part| {
                            write_op(volume_id, tag, p.offset, data.slice(p.within(offset)), fua)
                        };
                        let place = self.placement(volume_id);
                        Box::pin(c.scatter(place, offset, data.len() as u64, op)).await.map(drop)
                    }
                }
            }
        })
        .await
    }

    async fn write_zeroes(
        &self,
        volume_id: u64,
        offset: u64,
        len: u64,
        punch_hole: bool,
        fua: bool,
    ) -> Result<(), BackendError> {
        let mode = match self.mode() {
            Some(mode) => mode,
            None => self.discover_mode().await?,
        };
        let home = self.home(volume_id);
        self.write_like(volume_id, |gen, epoch| async move {
            let tag = (gen, epoch);
            match (mode, home) {
                (Mode::Single(node), _) => {
                    let op = write_zeroes_op(volume_id, tag, offset, len, punch_hole, fua);
                    call_single(node, op).await.map(drop)
                }
                (Mode::Cluster(c), Some(home)) => {
                    let op = write_zeroes_op(volume_id, tag, offset, len, punch_hole, fua);
                    c.send_to(home, op).await.map(drop)
                }
                (Mode::Cluster(c), None) => {
                    let op =
                        |p: Part| write_zeroes_op(volume_id, tag, p.offset, p.len, punch_hole, fua);
                    let place = self.placement(volume_id);
                    Box::pin(c.scatter(place, offset, len, op)).await.map(drop)
                }
            }
        })
        .await
    }

    async fn trim(
        &self,
        volume_id: u64,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> Result<(), BackendError> {
        let mode = match self.mode() {
            Some(mode) => mode,
            None => self.discover_mode().await?,
        };
        let home = self.home(volume_id);
        self.write_like(volume_id, |gen, epoch| async move {
            let tag = (gen, epoch);
            match (mode, home) {
                (Mode::Single(node), _) => {
                    call_single(node, trim_op(volume_id, tag, offset, len, fua)).await.map(drop)
                }
                (Mode::Cluster(c), Some(home)) => {
                    c.send_to(home, trim_op(volume_id, tag, offset, len, fua)).await.map(drop)
                }
                (Mode::Cluster(c), None) => {
                    let op = |p: Part| trim_op(volume_id, tag, p.offset, p.len, fua);
                    let place = self.placement(volume_id);
                    Box::pin(c.scatter(place, offset, len, op)).await.map(drop)
                }
            }
        })
        .await
    }

    async fn flush(&self, volume_id: u64) -> Result<(), BackendError> {
        if volume_id >= SNAPSHOT_EXPORT {
            // A snapshot export is read-only: nothing of it to make durable.
            return Ok(());
        }
        let mode = match self.mode() {
            Some(mode) => mode,
            None => self.discover_mode().await?,
        };
        match (mode, self.home(volume_id)) {
            (Mode::Single(node), _) => call_single(node, flush_op(volume_id, None)).await.map(drop),
            (Mode::Cluster(c), Some(home)) => {
                c.send_to(home, flush_op(volume_id, None)).await.map(drop)
            }
            (Mode::Cluster(c), None) => {
                let place = self.placement(volume_id);
                Box::pin(c.flush(place, |g| flush_op(volume_id, Some(g)))).await
            }
        }
    }

    async fn block_status(
        &self,
        export_id: u64,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>, BackendError> {
        let mode = match self.mode() {
            Some(mode) => mode,
            None => self.discover_mode().await?,
        };
        let (volume_id, epoch) = self.resolve(export_id);
        let reply = match (mode, self.home(volume_id)) {
            (Mode::Single(node), _) => {
                call_single(node, block_status_op(volume_id, epoch, offset, len)).await?
            }
            (Mode::Cluster(c), Some(home)) => {
                c.send_to(home, block_status_op(volume_id, epoch, offset, len)).await?
            }
            (Mode::Cluster(c), None) => {
                // Only the first chunk's piece: NBD lets a reply cover less than was asked.
                let p = first_part(offset, len);
                let op = block_status_op(volume_id, epoch, p.offset, p.len);
                let place = self.placement(volume_id);
                Box::pin(c.send(c.group_of(place, p.chunk), op)).await?
            }
        };
        extents(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map_to_backend_errors() {
        let m = |code| map_status(tonic::Status::new(code, "m"));
        assert_eq!(m(Code::NotFound), BackendError::NotFound);
        assert_eq!(m(Code::OutOfRange), BackendError::InvalidArgument("m".into()));
        assert_eq!(m(Code::InvalidArgument), BackendError::InvalidArgument("m".into()));
        assert_eq!(m(Code::PermissionDenied), BackendError::ReadOnly);
        assert_eq!(m(Code::FailedPrecondition), BackendError::ReadOnly);
        assert_eq!(m(Code::ResourceExhausted), BackendError::NoSpace);
        for code in [Code::Unavailable, Code::DeadlineExceeded, Code::Cancelled] {
            assert_eq!(m(code), BackendError::Unavailable("m".into()));
        }
        assert_eq!(m(Code::DataLoss), BackendError::Io("m".into()));
        assert_eq!(m(Code::Internal), BackendError::Io("m".into()));
    }

    #[tokio::test]
    async fn endpoints_are_one_or_a_comma_list() {
        let one = GrpcBackend::connect_lazy("http://127.0.0.1:7700").unwrap();
        assert_eq!(one.inner.seeds.len(), 1);
        let two =
            GrpcBackend::connect_lazy("http://127.0.1.1:7700, http://127.0.2.1:7700").unwrap();
        let uris: Vec<&str> = two.inner.seeds.iter().map(|s| s.uri.as_str()).collect();
        assert_eq!(uris, ["http://127.0.1.1:7700", "http://127.0.2.1:7700"]);
        assert!(GrpcBackend::connect_lazy("http://127.0.0.1:7700,").is_err());
        assert!(GrpcBackend::connect_lazy("").is_err());
    }

    #[test]
    fn reads_must_be_as_long_as_asked() {
        let reply = |n: usize| Reply::Read(v1::ReadResponse { data: Bytes::from(vec![1u8; n]) });
        assert_eq!(read_data(reply(512), 512).unwrap().len(), 512);
        assert!(matches!(read_data(reply(511), 512), Err(BackendError::Io(_))));
        assert!(matches!(read_data(Reply::Done(true), 512), Err(BackendError::Io(_))));
    }

    #[test]
    fn read_pieces_are_joined_in_order() {
        let one = Bytes::from_static(b"abc");
        assert_eq!(concat(vec![one.clone()], 3).as_ptr(), one.as_ptr(), "one piece: no copy");
        let two = concat(vec![Bytes::from_static(b"ab"), Bytes::from_static(b"cd")], 4);
        assert_eq!(&two[..], b"abcd");
    }
}
