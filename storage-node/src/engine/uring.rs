//! The io_uring engine: one ring owned by a dedicated thread beside tokio.
//!
//! Callers send operations over a channel and kick an eventfd; the ring thread keeps a read of
//! that eventfd armed in the ring, so one `submit_and_wait` sleeps until either an I/O or a new
//! request completes (no polling: idle costs nothing). Each operation's buffer and file are
//! owned by the in-flight table until its completion is reaped, then handed back through a
//! oneshot channel.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc;
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use tokio::sync::oneshot;

use super::{DataFile, IoEngine, IoFuture};
use crate::aligned::AlignedBuf;

enum Kind {
    Read,
    Write,
    Sync,
    Punch { offset: u64, len: u64 },
}

struct Op {
    kind: Kind,
    file: Arc<DataFile>,
    buf: Option<AlignedBuf>,
    offset: u64,
    done: oneshot::Sender<io::Result<Option<AlignedBuf>>>,
}

enum Msg {
    Op(Op),
    Shutdown,
}

pub struct UringEngine {
    tx: mpsc::Sender<Msg>,
    kick: Arc<OwnedFd>,
}

const KICK_TAG: u64 = u64::MAX;

fn kick(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
    let _ = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

impl UringEngine {
    /// Sets up a ring of `entries` and starts its thread.
    pub fn start(entries: u32) -> io::Result<Self> {
        let ring = IoUring::new(entries)?;
        // SAFETY: eventfd returns a new fd or -1, checked below.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a freshly created fd that nothing else owns.
        let kick_fd = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
        let (tx, rx) = mpsc::channel();
        let thread_kick = kick_fd.clone();
        std::thread::Builder::new()
            .name("tern-uring".into())
            .spawn(move || run(ring, rx, thread_kick, entries as usize))?;
        Ok(Self { tx, kick: kick_fd })
    }

    fn submit(&self, op: Op) {
        // A send can only fail after shutdown; the dropped `done` then reports the error.
        let _ = self.tx.send(Msg::Op(op));
        kick(&self.kick);
    }

    fn call(
        &self,
        kind: Kind,
        file: Arc<DataFile>,
        buf: Option<AlignedBuf>,
        offset: u64,
    ) -> IoFuture<Option<AlignedBuf>> {
        let (done, rx) = oneshot::channel();
        self.submit(Op { kind, file, buf, offset, done });
        Box::pin(async move { rx.await.map_err(|_| io::Error::other("io_uring engine stopped"))? })
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Shutdown);
        kick(&self.kick);
    }
}

impl IoEngine for UringEngine {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn read_at(&self, file: Arc<DataFile>, buf: AlignedBuf, offset: u64) -> IoFuture<AlignedBuf> {
        let f = self.call(Kind::Read, file, Some(buf), offset);
        Box::pin(async move { Ok(f.await?.expect("read returns its buffer")) })
    }

    fn write_at(&self, file: Arc<DataFile>, buf: AlignedBuf, offset: u64) -> IoFuture<AlignedBuf> {
        let f = self.call(Kind::Write, file, Some(buf), offset);
        Box::pin(async move { Ok(f.await?.expect("write returns its buffer")) })
    }

    fn sync(&self, file: Arc<DataFile>) -> IoFuture<()> {
        let f = self.call(Kind::Sync, file, None, 0);
        Box::pin(async move { f.await.map(|_| ()) })
    }

    fn punch_hole(&self, file: Arc<DataFile>, offset: u64, len: u64) -> IoFuture<()> {
        let f = self.call(Kind::Punch { offset, len }, file, None, 0);
        Box::pin(async move { f.await.map(|_| ()) })
    }
}

/// The ring thread: owns the ring and the in-flight table.
fn run(mut ring: IoUring, rx: mpsc::Receiver<Msg>, kick_fd: Arc<OwnedFd>, cap: usize) {
    let mut inflight: Vec<Option<Op>> = Vec::new();
    let mut free_slots: Vec<usize> = Vec::new();
    let mut waiting: VecDeque<Op> = VecDeque::new();
    let mut count = 0usize;
    let mut kick_buf = [0u8; 8];
    let mut kick_armed = false;
    let mut shutting_down = false;

    loop {
        if !kick_armed && !shutting_down {
            let sqe = opcode::Read::new(types::Fd(kick_fd.as_raw_fd()), kick_buf.as_mut_ptr(), 8)
                .build()
                .user_data(KICK_TAG);
            // SAFETY: kick_buf lives on this thread's stack for the life of the loop, and the
            // read completes (or the ring is dropped) before the function returns.
            if unsafe { ring.submission().push(&sqe) }.is_ok() {
                kick_armed = true;
            }
        }
        loop {
            match rx.try_recv() {
                Ok(Msg::Op(op)) => waiting.push_back(op),
                Ok(Msg::Shutdown) | Err(mpsc::TryRecvError::Disconnected) => shutting_down = true,
                Err(mpsc::TryRecvError::Empty) => break,
            }
            if shutting_down {
                break;
            }
        }
        while count < cap {
            let Some(mut op) = waiting.pop_front() else { break };
            let fd = types::Fd(op.file.file.as_raw_fd());
            let slot = free_slots.pop().unwrap_or_else(|| {
                inflight.push(None);
                inflight.len() - 1
            });
            let sqe = match op.kind {
                Kind::Read => {
                    let b = op.buf.as_mut().expect("read buffer");
                    opcode::Read::new(fd, b.as_mut_ptr(), b.len() as u32).offset(op.offset).build()
                }
                Kind::Write => {
                    let b = op.buf.as_ref().expect("write buffer");
                    opcode::Write::new(fd, b.as_ptr(), b.len() as u32).offset(op.offset).build()
                }
                Kind::Sync => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
                Kind::Punch { offset, len } => opcode::Fallocate::new(fd, len)
                    .offset(offset)
                    .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                    .build(),
            }
            .user_data(slot as u64);
            // SAFETY: the buffer and file the SQE points into are owned by `inflight[slot]`
            // (a heap allocation that does not move when the table grows) until the matching
            // completion is reaped below.
            if unsafe { ring.submission().push(&sqe) }.is_err() {
                // Submission queue full: submit what is there and try again next round.
                free_slots.push(slot);
                waiting.push_front(op);
                break;
            }
            inflight[slot] = Some(op);
            count += 1;
        }
        if shutting_down && count == 0 {
            return;
        }
        let want = if waiting.is_empty() || count >= cap { 1 } else { 0 };
        match ring.submit_and_wait(want) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => {
                tracing::error!(%e, "io_uring submit failed; failing in-flight I/O");
                for op in inflight.iter_mut().filter_map(Option::take) {
                    let _ = op.done.send(Err(io::Error::other(format!("io_uring: {e}"))));
                }
                return;
            }
        }
        let cqes: Vec<(u64, i32)> =
            ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (tag, res) in cqes {
            if tag == KICK_TAG {
                kick_armed = false;
                continue;
            }
            let slot = tag as usize;
            let Some(op) = inflight[slot].take() else { continue };
            free_slots.push(slot);
            count -= 1;
            let out = complete(op.kind, op.buf, res);
            let _ = op.done.send(out);
        }
    }
}

fn complete(kind: Kind, buf: Option<AlignedBuf>, res: i32) -> io::Result<Option<AlignedBuf>> {
    if res < 0 {
        return Err(io::Error::from_raw_os_error(-res));
    }
    let n = res as usize;
    match kind {
        Kind::Read => {
            let mut b = buf.expect("read buffer");
            // A short read of a regular file means end of file: the rest reads as zeros.
            if n < b.len() {
                b[n..].fill(0);
            }
            Ok(Some(b))
        }
        Kind::Write => {
            let b = buf.expect("write buffer");
            if n != b.len() {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("short write: {n} of {} bytes", b.len()),
                ));
            }
            Ok(Some(b))
        }
        Kind::Sync | Kind::Punch { .. } => Ok(None),
    }
}
