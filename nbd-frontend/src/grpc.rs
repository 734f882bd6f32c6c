//! [`Backend`] over gRPC: the frontend as a network client of a storage node.
//!
//! **Invariant:** the frontend never opens the storage node's files or RocksDB; everything goes
//! through the `BlockIo` and `VolumeAdmin` services. gRPC status codes are mapped to
//! [`BackendError`] here, in one place.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tern_proto::v1::io_request::Op;
use tern_proto::v1::{
    self, block_io_client::BlockIoClient, volume_admin_client::VolumeAdminClient, volume_ref,
};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use crate::backend::{Backend, BackendError, ExportInfo, Extent};

/// A storage node reached over gRPC. Cheap to clone: clones share the HTTP/2 connections.
///
/// Data requests travel on [`Lane`]s: long-lived `BlockIo.Io` streams, each on its own HTTP/2
/// connection, carrying many requests matched to their responses by id.
#[derive(Clone)]
pub struct GrpcBackend {
    lanes: Arc<Vec<Lane>>,
    admin: VolumeAdminClient<Channel>,
    next: Arc<AtomicUsize>,
}

/// `Io` streams (and HTTP/2 connections) to the storage node for data.
const DATA_LANES: usize = 2;
/// Requests a lane queues before senders wait.
const LANE_DEPTH: usize = 1024;

type Pending =
    Arc<Mutex<HashMap<u64, oneshot::Sender<Result<v1::io_response::Result, BackendError>>>>>;

/// One `Io` stream, established on first use and again after it breaks.
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
        let mut inbound = self
            .client
            .clone()
            .io(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(map_status)?
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
            // Everything still waiting on this stream fails (EIO); the next request opens a
            // new stream.
            for (_, w) in p.lock().drain() {
                let _ = w.send(Err(BackendError::Unavailable(why.clone())));
            }
        });
        let s = Stream { tx, pending };
        *cur = Some(s.clone());
        Ok(s)
    }

    async fn call(&self, op: v1::io_request::Op) -> Result<v1::io_response::Result, BackendError> {
        let s = self.stream().await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (w, r) = oneshot::channel();
        s.pending.lock().insert(id, w);
        if s.tx.send(v1::IoRequest { id, op: Some(op) }).await.is_err() {
            s.pending.lock().remove(&id);
            return Err(BackendError::Unavailable("I/O stream closed".into()));
        }
        match r.await {
            Ok(Ok(v1::io_response::Result::Error(e))) => {
                Err(map_status(tonic::Status::new(Code::from_i32(e.code), e.message)))
            }
            Ok(result) => result,
            Err(_) => Err(BackendError::Unavailable("I/O stream dropped the request".into())),
        }
    }
}

impl GrpcBackend {
    /// Connects lazily to `endpoint` (e.g. `http://127.0.0.1:7700`): the frontend starts even
    /// when the storage node is not up yet, and requests fail with EIO until it is.
    pub fn connect_lazy(endpoint: &str) -> Result<Self, tonic::transport::Error> {
        let ep = Endpoint::from_shared(endpoint.to_string())?
            .tcp_nodelay(true)
            .connect_timeout(std::time::Duration::from_secs(3))
            .initial_stream_window_size(8 << 20)
            .initial_connection_window_size(32 << 20)
            // Large frames: a 1 MiB read comes back in a few frames instead of 64 of 16 KiB.
            .max_frame_size(1 << 20);
        let lanes = (0..DATA_LANES)
            .map(|_| Lane {
                client: BlockIoClient::new(ep.connect_lazy())
                    .max_decoding_message_size(64 << 20)
                    .max_encoding_message_size(64 << 20),
                current: tokio::sync::Mutex::new(None),
                next_id: AtomicU64::new(0),
            })
            .collect();
        let admin = VolumeAdminClient::new(ep.connect_lazy());
        Ok(Self { lanes: Arc::new(lanes), admin, next: Default::default() })
    }

    async fn call(&self, op: v1::io_request::Op) -> Result<v1::io_response::Result, BackendError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.lanes[i % self.lanes.len()].call(op).await
    }
}

fn unexpected(what: &str) -> BackendError {
    BackendError::Io(format!("storage node sent an unexpected reply to {what}"))
}

fn header(volume_id: u64) -> Option<v1::IoHeader> {
    Some(v1::IoHeader { volume_id, epoch: 0, generation: 0 })
}

fn map_status(s: tonic::Status) -> BackendError {
    match s.code() {
        Code::NotFound => BackendError::NotFound,
        Code::InvalidArgument | Code::OutOfRange => {
            BackendError::InvalidArgument(s.message().to_string())
        }
        Code::PermissionDenied | Code::FailedPrecondition => BackendError::ReadOnly,
        Code::ResourceExhausted => BackendError::NoSpace,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
            BackendError::Unavailable(s.message().to_string())
        }
        _ => BackendError::Io(s.message().to_string()),
    }
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
        let req = v1::GetVolumeRequest {
            volume: Some(v1::VolumeRef { r#ref: Some(volume_ref::Ref::Name(name.to_string())) }),
        };
        match self.admin.clone().get_volume(req).await {
            Ok(r) => Ok(Some(export_info(r.into_inner()))),
            Err(s) if s.code() == Code::NotFound || s.code() == Code::InvalidArgument => Ok(None),
            Err(s) => Err(map_status(s)),
        }
    }

    async fn list(&self) -> Result<Vec<ExportInfo>, BackendError> {
        let r = self.admin.clone().list_volumes(v1::ListVolumesRequest {}).await;
        Ok(r.map_err(map_status)?.into_inner().volumes.into_iter().map(export_info).collect())
    }

    async fn read(&self, volume_id: u64, offset: u64, len: u32) -> Result<Bytes, BackendError> {
        let req = v1::ReadRequest { header: header(volume_id), offset, length: len };
        let v1::io_response::Result::Read(r) = self.call(Op::Read(req)).await? else {
            return Err(unexpected("a read"));
        };
        if r.data.len() != len as usize {
            return Err(BackendError::Io(format!(
                "storage node returned {} bytes for a {len}-byte read",
                r.data.len()
            )));
        }
        Ok(r.data)
    }

    async fn write(
        &self,
        volume_id: u64,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<(), BackendError> {
        let req = v1::WriteRequest { header: header(volume_id), offset, data, fua };
        self.call(Op::Write(req)).await.map(|_| ())
    }

    async fn write_zeroes(
        &self,
        volume_id: u64,
        offset: u64,
        len: u64,
        punch_hole: bool,
        fua: bool,
    ) -> Result<(), BackendError> {
        let req = v1::WriteZeroesRequest {
            header: header(volume_id),
            offset,
            length: len,
            punch_hole,
            fua,
        };
        self.call(Op::WriteZeroes(req)).await.map(|_| ())
    }

    async fn trim(
        &self,
        volume_id: u64,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> Result<(), BackendError> {
        let req = v1::TrimRequest { header: header(volume_id), offset, length: len, fua };
        self.call(Op::Trim(req)).await.map(|_| ())
    }

    async fn flush(&self, volume_id: u64) -> Result<(), BackendError> {
        self.call(Op::Flush(v1::FlushRequest { header: header(volume_id) })).await.map(|_| ())
    }

    async fn block_status(
        &self,
        volume_id: u64,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>, BackendError> {
        let req = v1::BlockStatusRequest { header: header(volume_id), offset, length: len };
        let v1::io_response::Result::BlockStatus(r) = self.call(Op::BlockStatus(req)).await? else {
            return Err(unexpected("a block status request"));
        };
        Ok(r.extents
            .into_iter()
            .map(|e| Extent { length: e.length, hole: e.hole, zero: e.zero })
            .collect())
    }
}
