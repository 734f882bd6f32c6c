//! The storage node's gRPC services: `VolumeAdmin` and `BlockIo`, thin adapters from wire
//! types to [`ChunkStore`] calls. Errors become gRPC statuses through
//! `From<Error> for tonic::Status` only.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tern_proto::v1::{
    self, block_io_server::BlockIo, cluster_server, volume_admin_client::VolumeAdminClient,
    volume_admin_server::VolumeAdmin, volume_ref,
};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::error::{Error, EPOCH_HINT, LEADER_HINT};
use crate::meta::Entry;
use crate::metrics::{IoMetrics, IoOp};
use crate::replication::{Cluster, Cmd, Reply};
use crate::store::{ChunkStore, NewVolume, Volume};

/// Metadata marking an admin request another node forwarded to its meta group leader: it is
/// not forwarded again (no loops while leadership moves).
const FORWARDED: &str = "x-tern-forwarded";

#[derive(Clone)]
pub struct Service {
    store: Arc<ChunkStore>,
    node_id: u64,
    datacenter: String,
    /// Set when this node is part of a replicated cluster.
    cluster: Option<Arc<Cluster>>,
    admin_peers: Arc<Mutex<HashMap<u64, VolumeAdminClient<Channel>>>>,
    /// Block I/O served (metrics).
    io: Arc<IoMetrics>,
}

impl Service {
    pub fn new(
        store: Arc<ChunkStore>,
        node_id: u64,
        datacenter: String,
        cluster: Option<Arc<Cluster>>,
        io: Arc<IoMetrics>,
    ) -> Self {
        Self { store, node_id, datacenter, cluster, admin_peers: Arc::default(), io }
    }

    /// Runs one data request and counts it: `bytes` are those it reads or writes.
    async fn counted<T>(
        &self,
        op: IoOp,
        bytes: u64,
        request: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let r = request.await;
        self.io.done(op, r.is_ok(), bytes);
        r
    }

    /// The admin client of another node (the meta group's leader), for forwarding.
    fn peer_admin(&self, node: u64) -> Result<VolumeAdminClient<Channel>, Status> {
        let c = self.cluster.as_ref().ok_or_else(|| Status::internal("not a cluster"))?;
        let mut peers = self.admin_peers.lock();
        if let Some(p) = peers.get(&node) {
            return Ok(p.clone());
        }
        let addr = c
            .address_of(node)
            .ok_or_else(|| Status::unavailable(format!("meta leader {node} is not a member")))?;
        let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Status::internal(e.to_string()))?
            .connect_timeout(std::time::Duration::from_secs(2));
        let client = VolumeAdminClient::new(ep.connect_lazy());
        peers.insert(node, client.clone());
        Ok(client)
    }

    /// Whether an admin call failed only because another node leads the meta group, and may
    /// be forwarded there: returns that node.
    fn forward_to<T>(&self, r: &Result<T, Error>, forwarded: bool) -> Option<u64> {
        match r {
            Err(Error::NotLeader { leader: Some(l), .. }) if !forwarded && *l != self.node_id => {
                Some(*l)
            }
            _ => None,
        }
    }

    /// Proposes a meta command; returns the volume it created or changed, if any.
    async fn propose_meta(&self, c: &Cluster, cmd: Cmd) -> Result<Option<u64>, Error> {
        match c.propose(tern_common::META_GROUP, cmd).await? {
            Reply::Volume(id) => Ok(Some(id)),
            r => Cluster::done(r).map(|()| None),
        }
    }

    /// A volume record read linearizably from the meta group (cluster) or locally.
    async fn linear_volume(&self, r: Option<v1::VolumeRef>) -> Result<Arc<Volume>, Error> {
        if let Some(c) = &self.cluster {
            c.linearize(tern_common::META_GROUP).await?;
        }
        match r.and_then(|r| r.r#ref) {
            Some(volume_ref::Ref::Id(id)) => self.store.get(id),
            Some(volume_ref::Ref::Name(name)) => self.store.get_by_name(&name),
            None => Err(Error::Unsupported("a request without a volume (id or name)")),
        }
    }

    fn volume_by_header(&self, h: Option<v1::IoHeader>) -> Result<Arc<Volume>, Status> {
        let h = h.ok_or_else(|| Status::invalid_argument("missing I/O header"))?;
        if h.epoch != 0 && self.cluster.is_none() {
            return Err(Error::LocalSnapshot(h.volume_id).into());
        }
        Ok(self.store.get(h.volume_id)?)
    }
}

/// The attachment generation a data request carries (0 when absent).
fn generation_of(h: &Option<v1::IoHeader>) -> u64 {
    h.as_ref().map_or(0, |h| h.generation)
}

/// The epoch a data request carries (0 when absent: the head).
fn epoch_of(h: &Option<v1::IoHeader>) -> u64 {
    h.as_ref().map_or(0, |h| h.epoch)
}

/// The one conversion of a volume to its wire form.
fn to_wire(v: &Volume) -> v1::Volume {
    let r = v.record();
    let placement = r.placement();
    v1::Volume {
        id: r.id,
        name: r.name,
        size_bytes: r.size,
        block_size: tern_common::BLOCK_SIZE as u32,
        chunk_size: tern_common::CHUNK_SIZE,
        storage_class: if r.storage_class == "replicated" {
            v1::StorageClass::Replicated as i32
        } else {
            v1::StorageClass::Local as i32
        },
        read_only: r.read_only,
        created_at: r.created_at,
        allocated_bytes: v.allocated_bytes(),
        placement_id: placement,
        home_node: r.home,
        parent_volume_id: r.parent.map_or(0, |p| p.volume),
        parent_epoch: r.parent.map_or(0, |p| p.epoch),
        tenant: r.tenant,
        labels: r.labels.into_iter().collect(),
    }
}

fn is_forwarded<T>(req: &Request<T>) -> bool {
    req.metadata().get(FORWARDED).is_some()
}

fn forwarded<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    r
}

impl Service {
    async fn create_here(&self, r: v1::CreateVolumeRequest) -> Result<Arc<Volume>, Error> {
        let class = v1::StorageClass::try_from(r.storage_class)
            .map_err(|_| Error::Unsupported("unknown storage class"))?;
        let labels = r.labels.into_iter().collect();
        let Some(c) = &self.cluster else {
            if class == v1::StorageClass::Replicated {
                return Err(Error::Unsupported(
                    "storage class 'replicated' needs a cluster; this node serves 'local' only",
                ));
            }
            let new = NewVolume {
                name: r.name,
                size: r.size_bytes,
                read_only: r.read_only,
                tenant: r.tenant,
                labels,
                ..Default::default()
            };
            return self.store.create_volume(new).await;
        };
        tern_common::validate_volume_name(&r.name)?;
        tern_common::validate_volume_size(r.size_bytes)?;
        let created_at = crate::store::now_secs();
        let cmd = if class == v1::StorageClass::Local {
            if r.home_node == 0 || !c.members().contains_key(&r.home_node) {
                return Err(Error::Unsupported(
                    "storage class 'local' on a cluster needs a home node that is a member \
                     (the volume manager chooses one)",
                ));
            }
            if r.parent_volume_id != 0 {
                return Err(Error::Unsupported("clones are of replicated volumes only"));
            }
            let (name, size, read_only, tenant) = (r.name, r.size_bytes, r.read_only, r.tenant);
            Cmd::CreateLocalVolume {
                name,
                size,
                read_only,
                tenant,
                labels,
                created_at,
                home: r.home_node,
            }
        } else {
            let parent = (r.parent_volume_id != 0).then_some(crate::meta::Parent {
                volume: r.parent_volume_id,
                epoch: r.parent_epoch,
            });
            let (name, size, read_only, tenant) = (r.name, r.size_bytes, r.read_only, r.tenant);
            Cmd::CreateVolume { name, size, read_only, tenant, labels, created_at, parent }
        };
        let id =
            self.propose_meta(c, cmd).await?.ok_or(Error::Unavailable("no volume id".into()))?;
        self.store.get(id)
    }

    async fn resize_here(&self, r: v1::ResizeVolumeRequest) -> Result<Arc<Volume>, Error> {
        let v = self.linear_volume(r.volume).await?;
        let Some(c) = &self.cluster else {
            self.store.resize_volume(&v, r.size_bytes, r.allow_shrink).await?;
            return Ok(v);
        };
        tern_common::validate_volume_size(r.size_bytes)?;
        let from = v.record().size;
        if r.size_bytes < from {
            if !r.allow_shrink {
                return Err(Error::ShrinkRefused { volume: v.id, from, to: r.size_bytes });
            }
            // The blocks past the new end go first, through each group's log (after every
            // write before), each replica discarding up to the size the shrink began from
            // (it may have applied the meta group's shrink first). (The volume manager detached and fenced the
            // volume, so no write comes meanwhile.) A local volume's are discarded on its
            // home node when the record shrinks.
            if v.is_replicated() {
                c.truncate_volume(v.id.0, r.size_bytes, from).await?;
            }
        }
        self.propose_meta(c, Cmd::ResizeVolume { id: v.id.0, size: r.size_bytes }).await?;
        Ok(v)
    }

    async fn update_here(&self, r: v1::UpdateVolumeRequest) -> Result<Arc<Volume>, Error> {
        let v = self.linear_volume(r.volume).await?;
        if r.clear_parent && v.parent().is_some() {
            let c = self.cluster.as_ref().ok_or(Error::Unsupported("clones need a cluster"))?;
            self.propose_meta(c, Cmd::ClearParent { id: v.id.0 }).await?;
        }
        if let Some(ro) = r.read_only {
            match &self.cluster {
                None => self.store.set_read_only(&v, ro).await?,
                Some(c) => {
                    self.propose_meta(c, Cmd::SetReadOnly { id: v.id.0, read_only: ro }).await?;
                }
            }
        }
        Ok(v)
    }

    async fn delete_here(&self, r: v1::DeleteVolumeRequest) -> Result<(), Error> {
        let v = self.linear_volume(r.volume).await?;
        match &self.cluster {
            None => self.store.delete_volume(&v).await,
            Some(c) => self.propose_meta(c, Cmd::DeleteVolume { id: v.id.0 }).await.map(|_| ()),
        }
    }

    async fn get_here(&self, r: v1::GetVolumeRequest) -> Result<Arc<Volume>, Error> {
        self.linear_volume(r.volume).await
    }

    async fn list_here(&self, _r: v1::ListVolumesRequest) -> Result<Vec<v1::Volume>, Error> {
        if let Some(c) = &self.cluster {
            c.linearize(tern_common::META_GROUP).await?;
        }
        Ok(self.store.list().iter().map(|v| to_wire(v)).collect())
    }
}

/// How long an admin call waits out a meta group election (its leader died) before failing.
const ADMIN_FAILOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(8);

/// Runs an admin call here, or forwards it once to the meta group's leader; while the meta
/// group has no reachable leader (an election after a failure), retries for a few seconds.
macro_rules! admin_call {
    ($self:ident, $req:ident, $here:ident, $remote:ident, $ok:expr) => {{
        let fwd = is_forwarded(&$req);
        let msg = $req.into_inner();
        let deadline = tokio::time::Instant::now() + ADMIN_FAILOVER_WAIT;
        loop {
            let r = $self.$here(msg.clone()).await;
            let out = match $self.forward_to(&r, fwd) {
                Some(leader) => $self.peer_admin(leader)?.$remote(forwarded(msg.clone())).await,
                None => r.map(|x| Response::new($ok(x))).map_err(Status::from),
            };
            match out {
                Err(s)
                    if !fwd
                        && s.code() == tonic::Code::Unavailable
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                out => break out,
            }
        }
    }};
}

#[tonic::async_trait]
impl VolumeAdmin for Service {
    async fn create_volume(
        &self,
        req: Request<v1::CreateVolumeRequest>,
    ) -> Result<Response<v1::Volume>, Status> {
        admin_call!(self, req, create_here, create_volume, |v: Arc<Volume>| to_wire(&v))
    }

    async fn get_volume(
        &self,
        req: Request<v1::GetVolumeRequest>,
    ) -> Result<Response<v1::Volume>, Status> {
        admin_call!(self, req, get_here, get_volume, |v: Arc<Volume>| to_wire(&v))
    }

    async fn list_volumes(
        &self,
        req: Request<v1::ListVolumesRequest>,
    ) -> Result<Response<v1::ListVolumesResponse>, Status> {
        admin_call!(self, req, list_here, list_volumes, |volumes| v1::ListVolumesResponse {
            volumes
        })
    }

    async fn resize_volume(
        &self,
        req: Request<v1::ResizeVolumeRequest>,
    ) -> Result<Response<v1::Volume>, Status> {
        admin_call!(self, req, resize_here, resize_volume, |v: Arc<Volume>| to_wire(&v))
    }

    async fn update_volume(
        &self,
        req: Request<v1::UpdateVolumeRequest>,
    ) -> Result<Response<v1::Volume>, Status> {
        admin_call!(self, req, update_here, update_volume, |v: Arc<Volume>| to_wire(&v))
    }

    async fn delete_volume(
        &self,
        req: Request<v1::DeleteVolumeRequest>,
    ) -> Result<Response<v1::DeleteVolumeResponse>, Status> {
        admin_call!(self, req, delete_here, delete_volume, |()| v1::DeleteVolumeResponse {})
    }

    async fn node_status(
        &self,
        _req: Request<v1::NodeStatusRequest>,
    ) -> Result<Response<v1::NodeStatusResponse>, Status> {
        let vols = self.store.list();
        Ok(Response::new(v1::NodeStatusResponse {
            node_id: self.node_id,
            version: env!("CARGO_PKG_VERSION").to_string(),
            io_engine: self.store.engine_name().to_string(),
            direct_io: self.store.direct_io(),
            volumes: vols.len() as u64,
            allocated_bytes: vols.iter().map(|v| v.allocated_bytes()).sum(),
            checksum_errors: self.store.checksum_errors(),
            repairs: self.store.repairs(),
            scrubbed_bytes: self
                .cluster
                .as_ref()
                .map_or(0, |c| c.scrubbed.load(std::sync::atomic::Ordering::Relaxed)),
            datacenter: self.datacenter.clone(),
        }))
    }
}

/// The data operations, shared by the unary calls and the `Io` stream.
impl Service {
    /// The volume of a data request. On a cluster, a volume this node has not learned of yet
    /// (its creation is committed but not applied here) is UNAVAILABLE, so clients retry.
    fn data_volume(&self, h: Option<v1::IoHeader>) -> Result<Arc<Volume>, Status> {
        match self.volume_by_header(h) {
            Err(s) if s.code() == tonic::Code::NotFound && self.cluster.is_some() => {
                Err(Status::unavailable(format!("{} (not yet known to this node)", s.message())))
            }
            r => r,
        }
    }

    async fn do_read(
        &self,
        r: v1::ReadRequest,
        origin: Option<usize>,
    ) -> Result<v1::ReadResponse, Status> {
        let epoch = epoch_of(&r.header);
        let v = self.data_volume(r.header)?;
        self.note_origin(&v, r.offset, origin);
        let len = u64::from(r.length);
        let data = match &self.cluster {
            Some(c) => c.read(&v, r.offset, len, epoch).await?,
            None => self.store.read(&v, r.offset, len).await?,
        };
        Ok(v1::ReadResponse { data })
    }

    async fn do_write(&self, r: v1::WriteRequest, origin: Option<usize>) -> Result<(), Status> {
        let (generation, epoch) = (generation_of(&r.header), epoch_of(&r.header));
        let v = self.data_volume(r.header)?;
        self.note_origin(&v, r.offset, origin);
        // New data only: trims, zeroing and deletes go on, so space can be freed.
        self.store.fullness.check_write()?;
        match &self.cluster {
            Some(c) => c.write(&v, r.offset, r.data, r.fua, generation, epoch).await?,
            None => self.store.write(&v, r.offset, r.data, r.fua).await?,
        }
        Ok(())
    }

    async fn do_write_zeroes(
        &self,
        r: v1::WriteZeroesRequest,
        origin: Option<usize>,
    ) -> Result<(), Status> {
        let (generation, epoch) = (generation_of(&r.header), epoch_of(&r.header));
        let v = self.data_volume(r.header)?;
        self.note_origin(&v, r.offset, origin);
        match &self.cluster {
            Some(c) => {
                let (off, len, punch, fua) = (r.offset, r.length, r.punch_hole, r.fua);
                c.write_zeroes(&v, off, len, punch, fua, generation, epoch).await?
            }
            None => self.store.write_zeroes(&v, r.offset, r.length, r.punch_hole, r.fua).await?,
        }
        Ok(())
    }

    async fn do_trim(&self, r: v1::TrimRequest, origin: Option<usize>) -> Result<(), Status> {
        let (generation, epoch) = (generation_of(&r.header), epoch_of(&r.header));
        let v = self.data_volume(r.header)?;
        self.note_origin(&v, r.offset, origin);
        match &self.cluster {
            Some(c) => c.trim(&v, r.offset, r.length, r.fua, generation, epoch).await?,
            None => self.store.trim(&v, r.offset, r.length, r.fua).await?,
        }
        Ok(())
    }

    async fn do_flush(&self, r: v1::FlushRequest) -> Result<(), Status> {
        let v = self.data_volume(r.header)?;
        match (&self.cluster, r.group) {
            // One chunk group per request: the frontend sends one to each group's leader.
            (Some(c), Some(g)) => Ok(c.flush(&v, g).await?),
            // A local volume: its home node's barrier.
            (Some(c), None) if !v.is_replicated() => Ok(c.flush_local(&v).await?),
            (Some(_), None) => Err(Status::invalid_argument(
                "a flush on a replicated cluster names its chunk group",
            )),
            // The barrier covers every volume of the node: a flush on one connection covers
            // the writes completed on all of them (NBD multi-conn).
            (None, _) => Ok(self.store.barrier().await?),
        }
    }

    async fn do_block_status(
        &self,
        r: v1::BlockStatusRequest,
    ) -> Result<v1::BlockStatusResponse, Status> {
        let epoch = epoch_of(&r.header);
        let v = self.data_volume(r.header)?;
        let extents = match &self.cluster {
            Some(c) => c.block_status(&v, r.offset, r.length, epoch).await?,
            None => self.store.block_status(&v, r.offset, r.length).await?,
        }
        .into_iter()
        .map(|(length, e)| v1::Extent {
            length,
            hole: e == Entry::Hole,
            zero: matches!(e, Entry::Hole | Entry::Zero),
        })
        .collect();
        Ok(v1::BlockStatusResponse { extents })
    }

    pub(crate) async fn do_io_owned(
        self,
        req: v1::IoRequest,
        origin: Option<usize>,
    ) -> v1::IoResponse {
        self.do_io(req, origin).await
    }

    /// The index of the datacenter named by a frontend (`None` without a cluster, or for a
    /// name the cluster does not know): where the leaders of the groups it uses move.
    pub(crate) fn origin(&self, datacenter: &str) -> Option<usize> {
        let c = self.cluster.as_ref()?;
        Some(datacenter).filter(|d| !d.is_empty()).and_then(|d| c.origin(d))
    }

    /// This node's id in its cluster (0 without one).
    pub(crate) fn node_id(&self) -> u64 {
        self.node_id
    }

    /// Counts a request for `v` at `offset` from the frontend's datacenter `origin`, where the
    /// leaders of its chunk groups then move (replicated volumes only: a local volume's I/O
    /// goes to its home).
    fn note_origin(&self, v: &Volume, offset: u64, origin: Option<usize>) {
        if let (Some(c), Some(origin)) = (&self.cluster, origin) {
            if v.is_replicated() {
                c.note_origin(v.id.0, offset, origin);
            }
        }
    }

    /// One request of the `Io` stream (opened by a frontend in datacenter `origin`),
    /// answered with the same id.
    async fn do_io(&self, req: v1::IoRequest, origin: Option<usize>) -> v1::IoResponse {
        use v1::io_request::Op;
        use v1::io_response::Result as R;
        let done = |r: Result<(), Status>| r.map(|()| R::Done(true));
        let result = match req.op {
            Some(Op::Read(r)) => {
                let n = u64::from(r.length);
                self.counted(IoOp::Read, n, self.do_read(r, origin)).await.map(R::Read)
            }
            Some(Op::Write(r)) => {
                let n = r.data.len() as u64;
                done(self.counted(IoOp::Write, n, self.do_write(r, origin)).await)
            }
            Some(Op::WriteZeroes(r)) => {
                done(self.counted(IoOp::WriteZeroes, 0, self.do_write_zeroes(r, origin)).await)
            }
            Some(Op::Trim(r)) => done(self.counted(IoOp::Trim, 0, self.do_trim(r, origin)).await),
            Some(Op::Flush(r)) => done(self.counted(IoOp::Flush, 0, self.do_flush(r)).await),
            Some(Op::BlockStatus(r)) => {
                let status = self.do_block_status(r);
                self.counted(IoOp::BlockStatus, 0, status).await.map(R::BlockStatus)
            }
            Some(Op::Ping(_)) => Ok(R::Pong(true)),
            None => Err(Status::invalid_argument("I/O request without an operation")),
        };
        let result = result.unwrap_or_else(|s| {
            let leader = s
                .metadata()
                .get(LEADER_HINT)
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .unwrap_or(0);
            let epoch = s
                .metadata()
                .get(EPOCH_HINT)
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .unwrap_or(0);
            R::Error(v1::IoError {
                code: s.code() as i32,
                message: s.message().to_string(),
                leader,
                epoch,
            })
        });
        v1::IoResponse { id: req.id, result: Some(result) }
    }
}

/// Responses of one `Io` stream.
pub type IoStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::IoResponse, Status>> + Send>>;

/// Requests in flight on one `Io` stream before the node stops reading more from it.
pub(crate) const IO_STREAM_DEPTH: usize = 256;

#[tonic::async_trait]
impl BlockIo for Service {
    type IoStream = IoStream;

    async fn io(
        &self,
        req: Request<tonic::Streaming<v1::IoRequest>>,
    ) -> Result<Response<Self::IoStream>, Status> {
        // Where the frontend runs: leaders follow their requests there (see `leadership`).
        let origin = req
            .metadata()
            .get(tern_common::DATACENTER_HEADER)
            .and_then(|dc| self.origin(dc.to_str().ok()?));
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(IO_STREAM_DEPTH);
        let svc = self.clone();
        // One task per stream runs its requests concurrently (FuturesUnordered) and sends each
        // response as it completes: no task spawn or cross-task wake-up per request.
        tokio::spawn(async move {
            use futures::stream::{FuturesUnordered, StreamExt};
            let mut running = FuturesUnordered::new();
            let mut open = true;
            loop {
                tokio::select! {
                    biased;
                    Some(resp) = running.next(), if !running.is_empty() => {
                        if tx.send(Ok(resp)).await.is_err() {
                            return;
                        }
                    }
                    msg = inbound.message(), if open && running.len() < IO_STREAM_DEPTH => {
                        match msg {
                            Ok(Some(r)) => running.push(svc.clone().do_io_owned(r, origin)),
                            Ok(None) => open = false,
                            Err(e) => {
                                tracing::debug!(%e, "I/O stream ended");
                                open = false;
                            }
                        }
                    }
                    else => return,
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn read(
        &self,
        req: Request<v1::ReadRequest>,
    ) -> Result<Response<v1::ReadResponse>, Status> {
        let r = req.into_inner();
        let n = u64::from(r.length);
        Ok(Response::new(self.counted(IoOp::Read, n, self.do_read(r, None)).await?))
    }

    async fn write(
        &self,
        req: Request<v1::WriteRequest>,
    ) -> Result<Response<v1::WriteResponse>, Status> {
        let r = req.into_inner();
        let n = r.data.len() as u64;
        self.counted(IoOp::Write, n, self.do_write(r, None)).await?;
        Ok(Response::new(v1::WriteResponse {}))
    }

    async fn write_zeroes(
        &self,
        req: Request<v1::WriteZeroesRequest>,
    ) -> Result<Response<v1::WriteZeroesResponse>, Status> {
        self.counted(IoOp::WriteZeroes, 0, self.do_write_zeroes(req.into_inner(), None)).await?;
        Ok(Response::new(v1::WriteZeroesResponse {}))
    }

    async fn trim(
        &self,
        req: Request<v1::TrimRequest>,
    ) -> Result<Response<v1::TrimResponse>, Status> {
        self.counted(IoOp::Trim, 0, self.do_trim(req.into_inner(), None)).await?;
        Ok(Response::new(v1::TrimResponse {}))
    }

    async fn flush(
        &self,
        req: Request<v1::FlushRequest>,
    ) -> Result<Response<v1::FlushResponse>, Status> {
        self.counted(IoOp::Flush, 0, self.do_flush(req.into_inner())).await?;
        Ok(Response::new(v1::FlushResponse {}))
    }

    async fn block_status(
        &self,
        req: Request<v1::BlockStatusRequest>,
    ) -> Result<Response<v1::BlockStatusResponse>, Status> {
        let status = self.do_block_status(req.into_inner());
        Ok(Response::new(self.counted(IoOp::BlockStatus, 0, status).await?))
    }
}

#[tonic::async_trait]
impl cluster_server::Cluster for Service {
    async fn get_cluster_map(
        &self,
        _req: Request<v1::GetClusterMapRequest>,
    ) -> Result<Response<v1::ClusterMap>, Status> {
        let Some(c) = &self.cluster else {
            return Ok(Response::new(v1::ClusterMap {
                self_id: self.node_id,
                nodes: Vec::new(),
                groups: 0,
                group_state: Vec::new(),
            }));
        };
        let cfg = c.config();
        let nodes = c
            .members()
            .into_iter()
            .map(|(id, m)| v1::NodeInfo { id, address: m.address, datacenter: m.datacenter })
            .collect();
        let group_state = c
            .group_states()
            .into_iter()
            .map(|g| v1::GroupInfo {
                group: g.group,
                leader: g.leader.unwrap_or(0),
                term: g.term,
                voters: g.voters,
                voters_committed: g.voters_committed,
                membership_index: g.membership_index,
                nodes: g.nodes,
            })
            .collect();
        Ok(Response::new(v1::ClusterMap {
            self_id: self.node_id,
            nodes,
            groups: cfg.groups,
            group_state,
        }))
    }

    async fn replace_node(
        &self,
        req: Request<v1::ReplaceNodeRequest>,
    ) -> Result<Response<v1::ReplacementStatus>, Status> {
        let c = self.cluster_or_refuse()?;
        let r = req.into_inner();
        let (new, member) = member_of(r.new)?;
        c.start_replacement(r.old, new, member, r.groups)?;
        Ok(Response::new(replacement_status(c.replacement())))
    }

    async fn get_replacement(
        &self,
        _req: Request<v1::GetReplacementRequest>,
    ) -> Result<Response<v1::ReplacementStatus>, Status> {
        let c = self.cluster_or_refuse()?;
        Ok(Response::new(replacement_status(c.replacement())))
    }

    async fn change_replica(
        &self,
        req: Request<v1::ChangeReplicaRequest>,
    ) -> Result<Response<v1::ChangeReplicaReply>, Status> {
        let c = self.cluster_or_refuse()?;
        let r = req.into_inner();
        let (new, member) = member_of(r.new)?;
        c.change_replica(r.group, r.old, new, member).await?;
        Ok(Response::new(v1::ChangeReplicaReply {}))
    }

    async fn fence_volume(
        &self,
        req: Request<v1::FenceVolumeRequest>,
    ) -> Result<Response<v1::FenceVolumeReply>, Status> {
        let c = self.cluster_or_refuse()?;
        let r = req.into_inner();
        if r.generation == 0 {
            return Err(Status::invalid_argument("fencing generations start at 1"));
        }
        // A volume this node has not learned of yet (its creation is committed but not
        // applied here) is UNAVAILABLE, so the manager asks another node or again.
        self.data_volume(Some(v1::IoHeader { volume_id: r.volume_id, epoch: 0, generation: 0 }))?;
        c.fence_volume(r.volume_id, r.generation).await?;
        Ok(Response::new(v1::FenceVolumeReply {}))
    }

    async fn fence_group(
        &self,
        req: Request<v1::FenceGroupRequest>,
    ) -> Result<Response<v1::FenceVolumeReply>, Status> {
        let c = self.cluster_or_refuse()?;
        let r = req.into_inner();
        c.fence_group(r.group, r.volume_id, r.generation).await?;
        Ok(Response::new(v1::FenceVolumeReply {}))
    }

    async fn snapshot_volume(
        &self,
        req: Request<v1::SnapshotVolumeRequest>,
    ) -> Result<Response<v1::SnapshotVolumeReply>, Status> {
        let c = self.cluster_or_refuse()?;
        let r = req.into_inner();
        if r.epoch == 0 || r.more_epochs.contains(&0) {
            return Err(Status::invalid_argument("snapshot epochs start at 1"));
        }
        let op = crate::replication::cluster::SnapOp::of(r.delete, r.rollback, r.flatten)?;
        let mut epochs = r.more_epochs;
        epochs.insert(0, r.epoch);
        match r.group {
            Some(g) => c.snapshot_group(g, r.volume_id, &epochs, op).await?,
            None => {
                // As for fences: a volume not learned here yet is UNAVAILABLE.
                let h = v1::IoHeader { volume_id: r.volume_id, epoch: 0, generation: 0 };
                self.data_volume(Some(h))?;
                c.snapshot_volume(r.volume_id, &epochs, op).await?
            }
        }
        Ok(Response::new(v1::SnapshotVolumeReply {}))
    }

    async fn volume_changes(
        &self,
        req: Request<v1::VolumeChangesRequest>,
    ) -> Result<Response<v1::VolumeChangesReply>, Status> {
        let c = self.cluster_or_refuse()?;
        let r = req.into_inner();
        let (v, from, to) = (r.volume_id, r.from_epoch, r.to_epoch);
        if from != 0 && to != 0 && from >= to {
            return Err(Status::invalid_argument(format!(
                "changes go from an older epoch to a newer one (got {from} to {to})"
            )));
        }
        let changes = match r.group {
            Some(g) => c.group_changes(g, v, from, to).await?,
            None => c.volume_changes(v, from, to).await?,
        };
        let extents = changes
            .into_iter()
            .map(|(offset, length, zero)| v1::ChangedExtent { offset, length, zero })
            .collect();
        Ok(Response::new(v1::VolumeChangesReply { extents }))
    }

    async fn truncate_volume(
        &self,
        req: Request<v1::TruncateVolumeRequest>,
    ) -> Result<Response<v1::TruncateVolumeReply>, Status> {
        let c = self.cluster_or_refuse()?;
        let r = req.into_inner();
        match r.group {
            Some(g) => c.truncate_group(g, r.volume_id, r.size_bytes, r.from_size).await?,
            None => c.truncate_volume(r.volume_id, r.size_bytes, r.from_size).await?,
        }
        Ok(Response::new(v1::TruncateVolumeReply {}))
    }

    async fn volume_usage(
        &self,
        req: Request<v1::VolumeUsageRequest>,
    ) -> Result<Response<v1::VolumeUsageReply>, Status> {
        let c = self.cluster_or_refuse()?;
        let r = req.into_inner();
        let u = match r.group {
            Some(g) => c.group_usage(g, r.volume_id).await?,
            None => c.volume_usage(r.volume_id).await?,
        };
        const BS: u64 = tern_common::BLOCK_SIZE;
        Ok(Response::new(v1::VolumeUsageReply {
            total_bytes: u.total * BS,
            head_only_bytes: u.head_only * BS,
            exclusive: u
                .exclusive
                .into_iter()
                .map(|(epoch, n)| v1::EpochBytes { epoch, bytes: n * BS })
                .collect(),
        }))
    }
}

fn replacement_status(
    r: Option<crate::replication::cluster::Replacement>,
) -> v1::ReplacementStatus {
    match r {
        None => v1::ReplacementStatus::default(),
        Some(r) => v1::ReplacementStatus {
            active: r.finished.is_none(),
            old: r.old,
            new: r.new,
            groups_total: r.total,
            groups_done: r.done,
            seconds: r.finished.unwrap_or_else(|| r.started.elapsed()).as_secs_f64(),
            finished: r.finished.is_some(),
            last_error: r.last_error,
            groups: r.requested,
        },
    }
}

impl Service {
    fn cluster_or_refuse(&self) -> Result<&Arc<Cluster>, Status> {
        self.cluster.as_ref().ok_or_else(|| {
            Status::failed_precondition("this node runs alone (no --cluster): nothing to replace")
        })
    }
}

fn member_of(n: Option<v1::NodeInfo>) -> Result<(u64, crate::replication::Member), Status> {
    let n = n.ok_or_else(|| Status::invalid_argument("the new node is missing"))?;
    if n.id == 0 || n.address.is_empty() || n.datacenter.is_empty() || !n.address.contains(':') {
        return Err(Status::invalid_argument(
            "the new node needs an id, a host:port and a datacenter",
        ));
    }
    Ok((n.id, crate::replication::Member { address: n.address, datacenter: n.datacenter }))
}
