//! The seam between the NBD protocol and where the blocks live.
//!
//! The NBD server is generic over [`Backend`]; production uses [`crate::grpc::GrpcBackend`]
//! (a network client of the storage nodes), unit tests use [`MemBackend`] (feature
//! `test-utils`). Offsets and lengths reaching a backend were already checked against the
//! export's size by the transmission layer.

use std::future::Future;

use bytes::Bytes;

/// What the frontend knows of an export (one volume).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub volume_id: u64,
    pub name: String,
    pub size: u64,
    pub read_only: bool,
    pub description: String,
}

/// A run of blocks with the same allocation state, as `base:allocation` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// No data blocks back the range (NBD_STATE_HOLE).
    pub hole: bool,
    /// The range reads as zeros (NBD_STATE_ZERO).
    pub zero: bool,
}

/// Why a backend call failed. The transmission layer maps these to NBD errnos in one place.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum BackendError {
    #[error("export not found")]
    NotFound,
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    #[error("export is read-only")]
    ReadOnly,
    #[error("no space left on the storage node")]
    NoSpace,
    #[error("I/O error on the storage node: {0}")]
    Io(String),
    #[error("storage node unavailable: {0}")]
    Unavailable(String),
    /// A snapshot froze the write's epoch: write again at this one (handled by the backend,
    /// never an NBD client's error).
    #[error("a snapshot was taken: write again at epoch {0}")]
    StaleEpoch(u64),
}

/// Where an export's blocks live.
pub trait Backend: Clone + Send + Sync + 'static {
    /// The export called `name`, if there is one.
    fn lookup(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<ExportInfo>, BackendError>> + Send;
    /// Every export, for NBD_OPT_LIST.
    fn list(&self) -> impl Future<Output = Result<Vec<ExportInfo>, BackendError>> + Send;
    fn read(
        &self,
        volume_id: u64,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Bytes, BackendError>> + Send;
    fn write(
        &self,
        volume_id: u64,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
    /// Zeroes a range; `punch_hole` deallocates it (NBD_CMD_WRITE_ZEROES without NO_HOLE).
    fn write_zeroes(
        &self,
        volume_id: u64,
        offset: u64,
        len: u64,
        punch_hole: bool,
        fua: bool,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
    fn trim(
        &self,
        volume_id: u64,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
    /// Makes every write that completed before this call, on any connection, durable.
    fn flush(&self, volume_id: u64) -> impl Future<Output = Result<(), BackendError>> + Send;
    /// Allocation state of `[offset, offset + len)`, extents in order, covering at least
    /// the first byte of the range.
    fn block_status(
        &self,
        volume_id: u64,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Vec<Extent>, BackendError>> + Send;
}

#[cfg(any(test, feature = "test-utils"))]
pub use mem::MemBackend;

#[cfg(any(test, feature = "test-utils"))]
mod mem {
    //! An in-memory twin of the storage node, for unit tests only: 4 KiB blocks in a map.
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use parking_lot::Mutex;

    use super::*;

    const BS: u64 = 4096;

    #[derive(Default)]
    struct Vol {
        info: Option<ExportInfo>,
        blocks: BTreeMap<u64, Vec<u8>>,
        flushes: u64,
    }

    /// Volumes held in memory; `flushes` counts flush calls for tests.
    #[derive(Clone, Default)]
    pub struct MemBackend {
        vols: Arc<Mutex<BTreeMap<u64, Vol>>>,
    }

    impl MemBackend {
        pub fn new() -> Self {
            Self::default()
        }

        pub fn add(&self, volume_id: u64, name: &str, size: u64, read_only: bool) {
            let info = ExportInfo {
                volume_id,
                name: name.to_string(),
                size,
                read_only,
                description: format!("test volume {name}"),
            };
            self.vols.lock().insert(volume_id, Vol { info: Some(info), ..Default::default() });
        }

        pub fn flushes(&self, volume_id: u64) -> u64 {
            self.vols.lock().get(&volume_id).map_or(0, |v| v.flushes)
        }

        fn with<T>(
            &self,
            volume_id: u64,
            f: impl FnOnce(&mut Vol) -> Result<T, BackendError>,
        ) -> Result<T, BackendError> {
            let mut vols = self.vols.lock();
            let v = vols.get_mut(&volume_id).ok_or(BackendError::NotFound)?;
            f(v)
        }

        fn zero_range(v: &mut Vol, offset: u64, len: u64) {
            let mut pos = offset;
            let end = offset + len;
            while pos < end {
                let b = pos / BS;
                let within = (pos % BS) as usize;
                let n = ((BS - pos % BS).min(end - pos)) as usize;
                if within == 0 && n == BS as usize {
                    v.blocks.remove(&b);
                } else if let Some(blk) = v.blocks.get_mut(&b) {
                    blk[within..within + n].fill(0);
                }
                pos += n as u64;
            }
        }
    }

    impl Backend for MemBackend {
        async fn lookup(&self, name: &str) -> Result<Option<ExportInfo>, BackendError> {
            Ok(self.vols.lock().values().filter_map(|v| v.info.clone()).find(|i| i.name == name))
        }

        async fn list(&self) -> Result<Vec<ExportInfo>, BackendError> {
            Ok(self.vols.lock().values().filter_map(|v| v.info.clone()).collect())
        }

        async fn read(&self, volume_id: u64, offset: u64, len: u32) -> Result<Bytes, BackendError> {
            self.with(volume_id, |v| {
                let mut out = vec![0u8; len as usize];
                let mut pos = offset;
                let end = offset + u64::from(len);
                while pos < end {
                    let b = pos / BS;
                    let within = (pos % BS) as usize;
                    let n = ((BS - pos % BS).min(end - pos)) as usize;
                    if let Some(blk) = v.blocks.get(&b) {
                        let o = (pos - offset) as usize;
                        out[o..o + n].copy_from_slice(&blk[within..within + n]);
                    }
                    pos += n as u64;
                }
                Ok(Bytes::from(out))
            })
        }

        async fn write(
            &self,
            volume_id: u64,
            offset: u64,
            data: Bytes,
            _fua: bool,
        ) -> Result<(), BackendError> {
            self.with(volume_id, |v| {
                if v.info.as_ref().is_some_and(|i| i.read_only) {
                    return Err(BackendError::ReadOnly);
                }
                let mut pos = offset;
                let end = offset + data.len() as u64;
                while pos < end {
                    let b = pos / BS;
                    let within = (pos % BS) as usize;
                    let n = ((BS - pos % BS).min(end - pos)) as usize;
                    let blk = v.blocks.entry(b).or_insert_with(|| vec![0u8; BS as usize]);
                    let o = (pos - offset) as usize;
                    blk[within..within + n].copy_from_slice(&data[o..o + n]);
                    pos += n as u64;
                }
                Ok(())
            })
        }

        async fn write_zeroes(
            &self,
            volume_id: u64,
            offset: u64,
            len: u64,
            _punch_hole: bool,
            _fua: bool,
        ) -> Result<(), BackendError> {
            self.with(volume_id, |v| {
                Self::zero_range(v, offset, len);
                Ok(())
            })
        }

        async fn trim(
            &self,
            volume_id: u64,
            offset: u64,
            len: u64,
            _fua: bool,
        ) -> Result<(), BackendError> {
            self.with(volume_id, |v| {
                Self::zero_range(v, offset, len);
                Ok(())
            })
        }

        async fn flush(&self, volume_id: u64) -> Result<(), BackendError> {
            self.with(volume_id, |v| {
                v.flushes += 1;
                Ok(())
            })
        }

        async fn block_status(
            &self,
            volume_id: u64,
            offset: u64,
            len: u64,
        ) -> Result<Vec<Extent>, BackendError> {
            self.with(volume_id, |v| {
                let mut out: Vec<Extent> = Vec::new();
                let mut pos = offset;
                let end = offset + len;
                while pos < end {
                    let n = (BS - pos % BS).min(end - pos);
                    let hole = !v.blocks.contains_key(&(pos / BS));
                    match out.last_mut() {
                        Some(e) if e.hole == hole => e.length += n,
                        _ => out.push(Extent { length: n, hole, zero: hole }),
                    }
                    pos += n;
                }
                Ok(out)
            })
        }
    }
}
