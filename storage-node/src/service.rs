//! The storage node's gRPC services: `VolumeAdmin` and `BlockIo`, thin adapters from wire
//! types to [`ChunkStore`] calls. Errors become gRPC statuses through
//! `From<Error> for tonic::Status` only.

use std::sync::Arc;

use tern_proto::v1::{
    self, block_io_server::BlockIo, volume_admin_server::VolumeAdmin, volume_ref,
};
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::meta::Entry;
use crate::store::{ChunkStore, NewVolume, Volume};

#[derive(Clone)]
pub struct Service {
    store: Arc<ChunkStore>,
    node_id: u64,
    datacenter: String,
}

impl Service {
    pub fn new(store: Arc<ChunkStore>, node_id: u64, datacenter: String) -> Self {
        Self { store, node_id, datacenter }
    }

    fn volume_ref(&self, r: Option<v1::VolumeRef>) -> Result<Arc<Volume>, Status> {
        match r.and_then(|r| r.r#ref) {
            Some(volume_ref::Ref::Id(id)) => Ok(self.store.get(id)?),
            Some(volume_ref::Ref::Name(name)) => Ok(self.store.get_by_name(&name)?),
            None => Err(Status::invalid_argument("no volume given (id or name)")),
        }
    }

    fn volume_by_header(&self, h: Option<v1::IoHeader>) -> Result<Arc<Volume>, Status> {
        let h = h.ok_or_else(|| Status::invalid_argument("missing I/O header"))?;
        if h.epoch != 0 {
            return Err(Error::Unsupported("reads at an epoch other than the head").into());
        }
        Ok(self.store.get(h.volume_id)?)
    }
}

/// The one conversion of a volume to its wire form.
fn to_wire(v: &Volume) -> v1::Volume {
    let r = v.record();
    v1::Volume {
        id: r.id,
        name: r.name,
        size_bytes: r.size,
        block_size: tern_common::BLOCK_SIZE as u32,
        chunk_size: tern_common::CHUNK_SIZE,
        storage_class: v1::StorageClass::Local as i32,
        read_only: r.read_only,
        created_at: r.created_at,
        allocated_bytes: v.allocated_bytes(),
        tenant: r.tenant,
        labels: r.labels.into_iter().collect(),
    }
}

#[tonic::async_trait]
impl VolumeAdmin for Service {
    async fn create_volume(
        &self,
        req: Request<v1::CreateVolumeRequest>,
    ) -> Result<Response<v1::Volume>, Status> {
        let r = req.into_inner();
        match v1::StorageClass::try_from(r.storage_class) {
            Ok(v1::StorageClass::Unspecified | v1::StorageClass::Local) => {}
            Ok(v1::StorageClass::Replicated) => {
                return Err(Status::invalid_argument(
                    "storage class 'replicated' needs a cluster; this node serves 'local' only",
                ))
            }
            Err(_) => return Err(Status::invalid_argument("unknown storage class")),
        }
        let v = self
            .store
            .create_volume(NewVolume {
                name: r.name,
                size: r.size_bytes,
                read_only: r.read_only,
                tenant: r.tenant,
                labels: r.labels.into_iter().collect(),
            })
            .await?;
        Ok(Response::new(to_wire(&v)))
    }

    async fn get_volume(
        &self,
        req: Request<v1::GetVolumeRequest>,
    ) -> Result<Response<v1::Volume>, Status> {
        let v = self.volume_ref(req.into_inner().volume)?;
        Ok(Response::new(to_wire(&v)))
    }

    async fn list_volumes(
        &self,
        _req: Request<v1::ListVolumesRequest>,
    ) -> Result<Response<v1::ListVolumesResponse>, Status> {
        let volumes = self.store.list().iter().map(|v| to_wire(v)).collect();
        Ok(Response::new(v1::ListVolumesResponse { volumes }))
    }

    async fn resize_volume(
        &self,
        req: Request<v1::ResizeVolumeRequest>,
    ) -> Result<Response<v1::Volume>, Status> {
        let r = req.into_inner();
        let v = self.volume_ref(r.volume)?;
        self.store.resize_volume(&v, r.size_bytes, r.allow_shrink).await?;
        Ok(Response::new(to_wire(&v)))
    }

    async fn update_volume(
        &self,
        req: Request<v1::UpdateVolumeRequest>,
    ) -> Result<Response<v1::Volume>, Status> {
        let r = req.into_inner();
        let v = self.volume_ref(r.volume)?;
        if let Some(ro) = r.read_only {
            self.store.set_read_only(&v, ro).await?;
        }
        Ok(Response::new(to_wire(&v)))
    }

    async fn delete_volume(
        &self,
        req: Request<v1::DeleteVolumeRequest>,
    ) -> Result<Response<v1::DeleteVolumeResponse>, Status> {
        let v = self.volume_ref(req.into_inner().volume)?;
        self.store.delete_volume(&v).await?;
        Ok(Response::new(v1::DeleteVolumeResponse {}))
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
            datacenter: self.datacenter.clone(),
        }))
    }
}

/// The data operations, shared by the unary calls and the `Io` stream.
impl Service {
    async fn do_read(&self, r: v1::ReadRequest) -> Result<v1::ReadResponse, Status> {
        let v = self.volume_by_header(r.header)?;
        let data = self.store.read(&v, r.offset, u64::from(r.length)).await?;
        Ok(v1::ReadResponse { data })
    }

    async fn do_write(&self, r: v1::WriteRequest) -> Result<(), Status> {
        let v = self.volume_by_header(r.header)?;
        Ok(self.store.write(&v, r.offset, r.data, r.fua).await?)
    }

    async fn do_write_zeroes(&self, r: v1::WriteZeroesRequest) -> Result<(), Status> {
        let v = self.volume_by_header(r.header)?;
        Ok(self.store.write_zeroes(&v, r.offset, r.length, r.punch_hole, r.fua).await?)
    }

    async fn do_trim(&self, r: v1::TrimRequest) -> Result<(), Status> {
        let v = self.volume_by_header(r.header)?;
        Ok(self.store.trim(&v, r.offset, r.length, r.fua).await?)
    }

    async fn do_flush(&self, r: v1::FlushRequest) -> Result<(), Status> {
        // The barrier covers every volume of the node: a flush on one connection covers the
        // writes completed on all of them (NBD multi-conn).
        let _ = self.volume_by_header(r.header)?;
        Ok(self.store.barrier().await?)
    }

    async fn do_block_status(
        &self,
        r: v1::BlockStatusRequest,
    ) -> Result<v1::BlockStatusResponse, Status> {
        let v = self.volume_by_header(r.header)?;
        let extents = self
            .store
            .block_status(&v, r.offset, r.length)
            .await?
            .into_iter()
            .map(|(length, e)| v1::Extent {
                length,
                hole: e == Entry::Hole,
                zero: matches!(e, Entry::Hole | Entry::Zero),
            })
            .collect();
        Ok(v1::BlockStatusResponse { extents })
    }

    async fn do_io_owned(self, req: v1::IoRequest) -> v1::IoResponse {
        self.do_io(req).await
    }

    /// One request of the `Io` stream, answered with the same id.
    async fn do_io(&self, req: v1::IoRequest) -> v1::IoResponse {
        use v1::io_request::Op;
        use v1::io_response::Result as R;
        let done = |r: Result<(), Status>| r.map(|()| R::Done(true));
        let result = match req.op {
            Some(Op::Read(r)) => self.do_read(r).await.map(R::Read),
            Some(Op::Write(r)) => done(self.do_write(r).await),
            Some(Op::WriteZeroes(r)) => done(self.do_write_zeroes(r).await),
            Some(Op::Trim(r)) => done(self.do_trim(r).await),
            Some(Op::Flush(r)) => done(self.do_flush(r).await),
            Some(Op::BlockStatus(r)) => self.do_block_status(r).await.map(R::BlockStatus),
            None => Err(Status::invalid_argument("I/O request without an operation")),
        };
        let result = result.unwrap_or_else(|s| {
            R::Error(v1::IoError { code: s.code() as i32, message: s.message().to_string() })
        });
        v1::IoResponse { id: req.id, result: Some(result) }
    }
}

/// Responses of one `Io` stream.
pub type IoStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::IoResponse, Status>> + Send>>;

/// Requests in flight on one `Io` stream before the node stops reading more from it.
const IO_STREAM_DEPTH: usize = 256;

#[tonic::async_trait]
impl BlockIo for Service {
    type IoStream = IoStream;

    async fn io(
        &self,
        req: Request<tonic::Streaming<v1::IoRequest>>,
    ) -> Result<Response<Self::IoStream>, Status> {
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
                            Ok(Some(r)) => running.push(svc.clone().do_io_owned(r)),
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
        Ok(Response::new(self.do_read(req.into_inner()).await?))
    }

    async fn write(
        &self,
        req: Request<v1::WriteRequest>,
    ) -> Result<Response<v1::WriteResponse>, Status> {
        self.do_write(req.into_inner()).await?;
        Ok(Response::new(v1::WriteResponse {}))
    }

    async fn write_zeroes(
        &self,
        req: Request<v1::WriteZeroesRequest>,
    ) -> Result<Response<v1::WriteZeroesResponse>, Status> {
        self.do_write_zeroes(req.into_inner()).await?;
        Ok(Response::new(v1::WriteZeroesResponse {}))
    }

    async fn trim(
        &self,
        req: Request<v1::TrimRequest>,
    ) -> Result<Response<v1::TrimResponse>, Status> {
        self.do_trim(req.into_inner()).await?;
        Ok(Response::new(v1::TrimResponse {}))
    }

    async fn flush(
        &self,
        req: Request<v1::FlushRequest>,
    ) -> Result<Response<v1::FlushResponse>, Status> {
        self.do_flush(req.into_inner()).await?;
        Ok(Response::new(v1::FlushResponse {}))
    }

    async fn block_status(
        &self,
        req: Request<v1::BlockStatusRequest>,
    ) -> Result<Response<v1::BlockStatusResponse>, Status> {
        Ok(Response::new(self.do_block_status(req.into_inner()).await?))
    }
}
