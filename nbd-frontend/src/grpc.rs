//! [`Backend`] over gRPC: the frontend as a network client of a storage node.
//!
//! **Invariant:** the frontend never opens the storage node's files or RocksDB; everything goes
//! through the `BlockIo` and `VolumeAdmin` services. gRPC status codes are mapped to
//! [`BackendError`] here, in one place.

use bytes::Bytes;
use tern_proto::v1::{
    self, block_io_client::BlockIoClient, volume_admin_client::VolumeAdminClient, volume_ref,
};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use crate::backend::{Backend, BackendError, ExportInfo, Extent};

/// A storage node reached over gRPC. Cheap to clone: clones share the HTTP/2 connections.
#[derive(Clone)]
pub struct GrpcBackend {
    io: Vec<BlockIoClient<Channel>>,
    admin: VolumeAdminClient<Channel>,
    next: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// HTTP/2 connections to the storage node for data. One connection serializes its frames
/// through one task on each side; a few spread the load over both cores.
const DATA_CONNECTIONS: usize = 4;

impl GrpcBackend {
    /// Connects lazily to `endpoint` (e.g. `http://127.0.0.1:7700`): the frontend starts even
    /// when the storage node is not up yet, and requests fail with EIO until it is.
    pub fn connect_lazy(endpoint: &str) -> Result<Self, tonic::transport::Error> {
        let ep = Endpoint::from_shared(endpoint.to_string())?
            .tcp_nodelay(true)
            .connect_timeout(std::time::Duration::from_secs(3))
            .initial_stream_window_size(8 << 20)
            .initial_connection_window_size(32 << 20);
        let io = (0..DATA_CONNECTIONS)
            .map(|_| {
                BlockIoClient::new(ep.connect_lazy())
                    .max_decoding_message_size(64 << 20)
                    .max_encoding_message_size(64 << 20)
            })
            .collect();
        let admin = VolumeAdminClient::new(ep.connect_lazy());
        Ok(Self { io, admin, next: Default::default() })
    }

    fn io(&self) -> BlockIoClient<Channel> {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.io[i % self.io.len()].clone()
    }
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
        let r = self.io().read(req).await.map_err(map_status)?;
        let data = r.into_inner().data;
        if data.len() != len as usize {
            return Err(BackendError::Io(format!(
                "storage node returned {} bytes for a {len}-byte read",
                data.len()
            )));
        }
        Ok(data)
    }

    async fn write(
        &self,
        volume_id: u64,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<(), BackendError> {
        let req = v1::WriteRequest { header: header(volume_id), offset, data, fua };
        self.io().write(req).await.map_err(map_status)?;
        Ok(())
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
        self.io().write_zeroes(req).await.map_err(map_status)?;
        Ok(())
    }

    async fn trim(
        &self,
        volume_id: u64,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> Result<(), BackendError> {
        let req = v1::TrimRequest { header: header(volume_id), offset, length: len, fua };
        self.io().trim(req).await.map_err(map_status)?;
        Ok(())
    }

    async fn flush(&self, volume_id: u64) -> Result<(), BackendError> {
        self.io()
            .flush(v1::FlushRequest { header: header(volume_id) })
            .await
            .map_err(map_status)?;
        Ok(())
    }

    async fn block_status(
        &self,
        volume_id: u64,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>, BackendError> {
        let req = v1::BlockStatusRequest { header: header(volume_id), offset, length: len };
        let r = self.io().block_status(req).await.map_err(map_status)?;
        Ok(r.into_inner()
            .extents
            .into_iter()
            .map(|e| Extent { length: e.length, hole: e.hole, zero: e.zero })
            .collect())
    }
}
