//! The I/O seam of the chunk store: every access to data files goes through [`IoEngine`].
//!
//! Two engines sit behind the trait, selected by config: [`uring::UringEngine`] (io_uring on a
//! dedicated thread) and [`sync::SyncEngine`] (positional syscalls on tokio's blocking pool),
//! its synchronous twin for hosts without io_uring. The same conformance tests run against
//! both. This is also the place where faults get injected in tests.

pub mod sync;
pub mod uring;

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use crate::aligned::AlignedBuf;

pub type IoFuture<T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send + 'static>>;

/// An open data file. O_DIRECT when the filesystem allows it.
#[derive(Debug)]
pub struct DataFile {
    pub file: File,
    pub path: PathBuf,
    pub direct: bool,
}

impl DataFile {
    /// Opens (creating) a data file, with O_DIRECT unless `direct` is false or the filesystem
    /// refuses it (tmpfs), in which case buffered I/O plus fdatasync gives the same durability.
    pub fn open(path: &Path, direct: bool) -> io::Result<Self> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(true).create(true);
        if direct {
            let mut d = opts.clone();
            d.custom_flags(libc::O_DIRECT);
            match d.open(path) {
                Ok(file) => return Ok(Self { file, path: path.to_path_buf(), direct: true }),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Self { file: opts.open(path)?, path: path.to_path_buf(), direct: false })
    }
}

/// Asynchronous positional I/O on data files. Buffers are moved into the engine and handed
/// back on completion, so no I/O ever targets memory its caller could free.
pub trait IoEngine: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Reads `buf.len()` bytes at `offset`; bytes past the end of the file read as zeros.
    fn read_at(&self, file: Arc<DataFile>, buf: AlignedBuf, offset: u64) -> IoFuture<AlignedBuf>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, file: Arc<DataFile>, buf: AlignedBuf, offset: u64) -> IoFuture<AlignedBuf>;
    /// fdatasync: every completed write to the file is on stable storage when this returns.
    fn sync(&self, file: Arc<DataFile>) -> IoFuture<()>;
    /// Deallocates `[offset, offset + len)` (reads back as zeros; the file size is kept).
    fn punch_hole(&self, file: Arc<DataFile>, offset: u64, len: u64) -> IoFuture<()>;
}

/// Which engine to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    Uring,
    Sync,
}

/// Builds the engine asked for. io_uring set-up failing (old kernel, seccomp) falls back to the
/// synchronous engine with a warning rather than refusing to start.
pub fn build(kind: EngineKind) -> Arc<dyn IoEngine> {
    match kind {
        EngineKind::Sync => Arc::new(sync::SyncEngine),
        EngineKind::Uring => match uring::UringEngine::start(256) {
            Ok(e) => Arc::new(e),
            Err(err) => {
                tracing::warn!(%err, "io_uring unavailable, using the synchronous engine");
                Arc::new(sync::SyncEngine)
            }
        },
    }
}

fn punch_hole_blocking(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on a valid open fd with plain integer arguments.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    //! One conformance suite, run against both engines.
    use super::*;

    async fn conformance(engine: Arc<dyn IoEngine>) {
        let dir = tempfile::tempdir().unwrap();
        let f = Arc::new(DataFile::open(&dir.path().join("d"), true).unwrap());
        let mut b = AlignedBuf::zeroed(8192);
        b[..4096].fill(0xab);
        b[4096..].fill(0xcd);
        let b = engine.write_at(f.clone(), b, 4096).await.unwrap();
        assert_eq!(b.len(), 8192);
        engine.sync(f.clone()).await.unwrap();
        let r = engine.read_at(f.clone(), AlignedBuf::zeroed(12288), 0).await.unwrap();
        assert!(r[..4096].iter().all(|&x| x == 0));
        assert!(r[4096..8192].iter().all(|&x| x == 0xab));
        assert!(r[8192..].iter().all(|&x| x == 0xcd));
        // Past the end of the file: zeros.
        let r = engine.read_at(f.clone(), AlignedBuf::zeroed(4096), 1 << 20).await.unwrap();
        assert!(r.iter().all(|&x| x == 0));
        engine.punch_hole(f.clone(), 4096, 4096).await.unwrap();
        let r = engine.read_at(f.clone(), AlignedBuf::zeroed(8192), 4096).await.unwrap();
        assert!(r[..4096].iter().all(|&x| x == 0));
        assert!(r[4096..].iter().all(|&x| x == 0xcd));
        // Many concurrent operations complete, each with its own buffer.
        let mut handles = Vec::new();
        for i in 0..64u64 {
            let e = engine.clone();
            let f = f.clone();
            handles.push(tokio::spawn(async move {
                let mut b = AlignedBuf::zeroed(4096);
                b.fill(i as u8);
                e.write_at(f.clone(), b, (16 + i) * 4096).await.unwrap();
                let r = e.read_at(f, AlignedBuf::zeroed(4096), (16 + i) * 4096).await.unwrap();
                assert!(r.iter().all(|&x| x == i as u8));
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uring_engine_conforms() {
        conformance(Arc::new(uring::UringEngine::start(64).unwrap())).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sync_engine_conforms() {
        conformance(Arc::new(sync::SyncEngine)).await;
    }
}
