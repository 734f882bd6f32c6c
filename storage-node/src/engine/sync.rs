//! The synchronous engine: positional read/write syscalls on tokio's blocking pool. The twin
//! of the io_uring engine for hosts (and tests) without io_uring.

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::{punch_hole_blocking, DataFile, IoEngine, IoFuture};
use crate::aligned::AlignedBuf;

pub struct SyncEngine;

fn blocking<T: Send + 'static>(f: impl FnOnce() -> io::Result<T> + Send + 'static) -> IoFuture<T> {
    Box::pin(async move {
        tokio::task::spawn_blocking(f).await.map_err(|e| io::Error::other(e.to_string()))?
    })
}

impl IoEngine for SyncEngine {
    fn name(&self) -> &'static str {
        "sync"
    }

    fn read_at(
        &self,
        file: Arc<DataFile>,
        mut buf: AlignedBuf,
        offset: u64,
    ) -> IoFuture<AlignedBuf> {
        blocking(move || {
            let mut done = 0;
            while done < buf.len() {
                let n = file.file.read_at(&mut buf[done..], offset + done as u64)?;
                if n == 0 {
                    buf[done..].fill(0);
                    break;
                }
                done += n;
            }
            Ok(buf)
        })
    }

    fn write_at(&self, file: Arc<DataFile>, buf: AlignedBuf, offset: u64) -> IoFuture<AlignedBuf> {
        blocking(move || {
            file.file.write_all_at(&buf, offset)?;
            Ok(buf)
        })
    }

    fn sync(&self, file: Arc<DataFile>) -> IoFuture<()> {
        blocking(move || file.file.sync_data())
    }

    fn punch_hole(&self, file: Arc<DataFile>, offset: u64, len: u64) -> IoFuture<()> {
        blocking(move || punch_hole_blocking(&file.file, offset, len))
    }
}
