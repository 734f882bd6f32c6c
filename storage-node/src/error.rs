//! The storage node's errors, and their one mapping to gRPC status codes.

use std::path::PathBuf;

use tern_common::{InputError, VolumeId};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("volume {0} not found")]
    VolumeNotFound(String),
    #[error("a volume named {0:?} already exists")]
    VolumeExists(String),
    #[error(transparent)]
    Input(#[from] InputError),
    #[error("volume {volume} is read-only")]
    ReadOnly { volume: VolumeId },
    #[error("range [{offset}, {offset}+{len}) is outside volume {volume} of {size} bytes")]
    OutOfRange { volume: VolumeId, offset: u64, len: u64, size: u64 },
    #[error("request of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: u64, max: u64 },
    #[error(
        "shrinking volume {volume} from {from} to {to} bytes discards data; pass allow_shrink"
    )]
    ShrinkRefused { volume: VolumeId, from: u64, to: u64 },
    #[error("unsupported request: {0}")]
    Unsupported(&'static str),
    #[error(
        "checksum mismatch in volume {volume} at offset {offset}: stored {stored:#010x}, \
         computed {computed:#010x}"
    )]
    ChecksumMismatch { volume: VolumeId, offset: u64, stored: u32, computed: u32 },
    #[error("opening data file {path}: {source}")]
    OpenDataFile { path: PathBuf, source: std::io::Error },
    #[error("data file I/O on volume {volume}: {source}")]
    DataIo { volume: VolumeId, source: std::io::Error },
    #[error("syncing data files: {0}")]
    Sync(std::io::Error),
    #[error("metadata store: {0}")]
    Meta(#[from] rocksdb::Error),
    #[error("corrupt metadata at key {key}: {what}")]
    CorruptMeta { key: String, what: String },
    #[error("creating directory {path}: {source}")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("binding {addr}: {source}")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("serving gRPC: {0}")]
    Serve(tonic::transport::Error),
    #[error("volume {0} was deleted")]
    VolumeDeleted(VolumeId),
    #[error("this node does not lead chunk group {group} (leader: {leader:?})")]
    NotLeader { group: u32, leader: Option<u64> },
    #[error("replication unavailable: {0}")]
    Unavailable(String),
    #[error("no chunk group {0}")]
    NoSuchGroup(u32),
    #[error("request [{offset}, {offset}+{len}) crosses a chunk boundary; split it per chunk")]
    CrossesChunk { offset: u64, len: u64 },
    #[error("{message}")]
    Refused { code: i32, message: String },
    #[error("internal error: {0}")]
    Internal(String),
    #[error(
        "volume {volume} has a snapshot newer than epoch {epoch}: write again at epoch {floor}"
    )]
    StaleEpoch { volume: u64, epoch: u64, floor: u64 },
    #[error("volume {volume} has no epoch {epoch} yet (its writes are at epoch {floor})")]
    UnknownEpoch { volume: u64, epoch: u64, floor: u64 },
    #[error("volume {volume} has no snapshot at epoch {epoch}")]
    NoSnapshot { volume: u64, epoch: u64 },
    #[error("snapshots need the replicated storage class: volume {0} is local")]
    LocalSnapshot(u64),
    #[error("{0}")]
    Full(String),
}

/// gRPC metadata key of the epoch to write at, on a `StaleEpoch` status.
pub const EPOCH_HINT: &str = "x-tern-epoch";

/// gRPC metadata key of the leader hint on a `NotLeader` status.
pub const LEADER_HINT: &str = "x-tern-leader";

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Code;
        let code = match &e {
            Error::VolumeNotFound(_) | Error::VolumeDeleted(_) | Error::NoSnapshot { .. } => {
                Code::NotFound
            }
            Error::StaleEpoch { .. } => Code::Aborted,
            Error::UnknownEpoch { .. } | Error::LocalSnapshot(_) => Code::InvalidArgument,
            Error::VolumeExists(_) => Code::AlreadyExists,
            Error::Input(_)
            | Error::TooLarge { .. }
            | Error::Unsupported(_)
            | Error::NoSuchGroup(_)
            | Error::CrossesChunk { .. } => Code::InvalidArgument,
            Error::NotLeader { .. } | Error::Unavailable(_) => Code::Unavailable,
            Error::Full(_) => Code::ResourceExhausted,
            Error::Refused { code, .. } => Code::from_i32(*code),
            Error::OutOfRange { .. } => Code::OutOfRange,
            Error::ReadOnly { .. } => Code::PermissionDenied,
            Error::ShrinkRefused { .. } => Code::FailedPrecondition,
            Error::ChecksumMismatch { .. } | Error::CorruptMeta { .. } => Code::DataLoss,
            Error::DataIo { source, .. } | Error::OpenDataFile { source, .. }
                if source.raw_os_error() == Some(libc::ENOSPC) =>
            {
                Code::ResourceExhausted
            }
            Error::OpenDataFile { .. }
            | Error::DataIo { .. }
            | Error::Sync(_)
            | Error::Meta(_)
            | Error::CreateDir { .. }
            | Error::Bind { .. }
            | Error::Serve(_)
            | Error::Internal(_) => Code::Internal,
        };
        let mut s = tonic::Status::new(code, e.to_string());
        if let Error::NotLeader { leader: Some(l), .. } = e {
            if let Ok(v) = l.to_string().parse() {
                s.metadata_mut().insert(LEADER_HINT, v);
            }
        }
        if let Error::StaleEpoch { floor, .. } = e {
            if let Ok(v) = floor.to_string().parse() {
                s.metadata_mut().insert(EPOCH_HINT, v);
            }
        }
        s
    }
}
