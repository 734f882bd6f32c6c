//! The transmission phase: requests in, backend calls, replies out. **Hot path**: no `info!`
//! per request, no global locks, no blocking calls.
//!
//! One connection is three kinds of task. The connection's own task reads requests off the
//! socket in order, checks them ([`validate`]) and spawns one task per valid request, which
//! calls the backend and hands its encoded reply to the single writer task over a channel, so
//! replies go out in completion order, each one written whole. In-flight requests are
//! bounded by request count and by payload bytes: once the limit is reached the reader stops
//! reading the socket until replies have been written (backpressure).
//!
//! This module owns the mapping of [`BackendError`] to NBD error numbers ([`errno`]) and the
//! request checks the spec asks of a server: flags valid for the command, range within the
//! export, size limits, alignment when the client asked for block sizes, read-only exports.
//! **Durability:** a WRITE, TRIM or WRITE_ZEROES is acknowledged only after the backend
//! returned, so a FLUSH (which calls `backend.flush`) always covers every write already
//! acknowledged.

use std::io;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use tern_common::MAX_IO_SIZE;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use crate::backend::{Backend, BackendError, Extent};
use crate::codec::*;
use crate::handshake::{Session, MIN_BLOCK_SIZE};
use crate::metrics::{OpKind, VolumeMetrics};
use crate::server::{ConnectionError, ServerOptions};

/// Socket buffer sizes of the reader and the writer: several small requests per syscall.
const READ_BUFFER: usize = 256 << 10;
const WRITE_BUFFER: usize = 256 << 10;
/// Replies buffered past this many bytes are written at once, even if more are queued: two
/// 4 KiB read replies. The client starts on them (and sends its next requests) while the
/// rest are still coming, instead of receiving the whole queue depth in one write and
/// answering with a burst that reaches the disk all at once. Write acknowledgements (16
/// bytes) still leave together. Measured, single node, 4 KiB randread QD32 (with the node's
/// smaller batches): 16 KiB 44.2k IOPS, one reply per write 45.7k, 8 KiB alike.
const FLUSH_AT: usize = 8 << 10;

/// A block status query asks the backend about at most this much; the spec lets the reply
/// cover less than was asked, and this bounds the reply's size.
const MAX_BLOCK_STATUS_LEN: u32 = 1 << 30;

/// The one place a backend failure becomes an NBD error number.
fn errno(e: &BackendError) -> u32 {
    match e {
        BackendError::InvalidArgument(_) => errno::EINVAL,
        BackendError::ReadOnly => errno::EPERM,
        BackendError::NoSpace => errno::ENOSPC,
        BackendError::NotFound
        | BackendError::Io(_)
        | BackendError::Unavailable(_)
        | BackendError::StaleEpoch(_) => errno::EIO,
    }
}

/// A checked request, ready for the backend.
#[derive(Debug, PartialEq, Eq)]
enum Op {
    Read { offset: u64, len: u32 },
    Write { offset: u64, data: Bytes, fua: bool },
    Flush,
    Trim { offset: u64, len: u32, fua: bool },
    WriteZeroes { offset: u64, len: u32, punch_hole: bool, fua: bool },
    BlockStatus { offset: u64, len: u32, req_one: bool, context_id: u32 },
}

impl Op {
    /// The operation and payload bytes it is counted as (metrics).
    fn counted_as(&self) -> (OpKind, u64) {
        match self {
            Op::Read { len, .. } => (OpKind::Read, u64::from(*len)),
            Op::Write { data, .. } => (OpKind::Write, data.len() as u64),
            Op::Flush => (OpKind::Flush, 0),
            Op::Trim { .. } => (OpKind::Trim, 0),
            Op::WriteZeroes { .. } => (OpKind::WriteZeroes, 0),
            Op::BlockStatus { .. } => (OpKind::BlockStatus, 0),
        }
    }
}

/// A request refused before reaching the backend.
#[derive(Debug, PartialEq, Eq)]
struct Rejection {
    errno: u32,
    message: String,
}

fn reject(errno: u32, message: impl Into<String>) -> Rejection {
    Rejection { errno, message: message.into() }
}

/// Checks a request against the spec and the session. `data` is a WRITE's payload, already
/// read off the socket (so refusing the request keeps the stream framed).
fn validate(req: &RequestHeader, data: Bytes, s: &Session) -> Result<Op, Rejection> {
    let allowed = match req.command {
        Command::Read if s.structured => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF,
        Command::Read | Command::Write | Command::Flush | Command::Trim => NBD_CMD_FLAG_FUA,
        Command::WriteZeroes => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
        Command::BlockStatus => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE,
        // DISC never gets here; CACHE was not advertised.
        Command::Disc | Command::Cache | Command::Unknown(_) => {
            return Err(reject(errno::EINVAL, format!("unsupported command {:?}", req.command)));
        }
    };
    if req.flags & !allowed != 0 {
        return Err(reject(
            errno::EINVAL,
            format!("flags {:#x} are not valid for {:?}", req.flags, req.command),
        ));
    }
    let fua = req.flags & NBD_CMD_FLAG_FUA != 0;
    if req.command == Command::Flush {
        // Offset and length are reserved; clients are known to send garbage there.
        return Ok(Op::Flush);
    }
    let writes = matches!(req.command, Command::Write | Command::Trim | Command::WriteZeroes);
    if writes && s.export.read_only {
        return Err(reject(errno::EPERM, "the export is read-only"));
    }
    if req.command == Command::BlockStatus && s.base_allocation.is_none() {
        return Err(reject(errno::EINVAL, "no metadata context was negotiated"));
    }
    let (offset, len) = (req.offset, req.length);
    if len == 0 {
        return Err(reject(errno::EINVAL, "zero-length request"));
    }
    let size = s.export.size;
    let end = offset.checked_add(u64::from(len));
    if end.is_none_or(|end| end > size) {
        // The spec asks for ENOSPC when a write goes past the end, EINVAL otherwise.
        let errno = match req.command {
            Command::Write | Command::WriteZeroes => errno::ENOSPC,
            _ => errno::EINVAL,
        };
        return Err(reject(errno, format!("{len} bytes at {offset} go past the end ({size})")));
    }
    if matches!(req.command, Command::Read | Command::Write) && u64::from(len) > MAX_IO_SIZE {
        return Err(reject(errno::EINVAL, format!("{len} bytes is over the 32 MiB limit")));
    }
    if s.strict_block_size {
        let min = u64::from(MIN_BLOCK_SIZE);
        // The tail of an export whose size is not a multiple of 512 stays reachable.
        let tail = end == Some(size);
        if offset % min != 0 || (u64::from(len) % min != 0 && !tail) {
            return Err(reject(
                errno::EINVAL,
                format!("{len} bytes at {offset} not {min}-aligned"),
            ));
        }
    }
    Ok(match req.command {
        Command::Read => Op::Read { offset, len },
        Command::Write => Op::Write { offset, data, fua },
        Command::Trim => Op::Trim { offset, len, fua },
        Command::WriteZeroes => {
            Op::WriteZeroes { offset, len, punch_hole: req.flags & NBD_CMD_FLAG_NO_HOLE == 0, fua }
        }
        _ => Op::BlockStatus {
            offset,
            len,
            req_one: req.flags & NBD_CMD_FLAG_REQ_ONE != 0,
            // Checked above.
            context_id: s.base_allocation.unwrap_or_default(),
        },
    })
}

/// What a backend call produced.
#[derive(Debug)]
enum Success {
    Done,
    Data { offset: u64, data: Bytes },
    Extents { context_id: u32, descriptors: Vec<BlockDescriptor> },
}

async fn perform<B: Backend>(backend: &B, volume: u64, op: Op) -> Result<Success, BackendError> {
    match op {
        Op::Read { offset, len } => {
            let data = backend.read(volume, offset, len).await?;
            // A simple reply's framing depends on the length: never send a wrong one.
            if data.len() != len as usize {
                return Err(BackendError::Io(format!(
                    "backend returned {} bytes for a {len}-byte read",
                    data.len()
                )));
            }
            Ok(Success::Data { offset, data })
        }
        Op::Write { offset, data, fua } => {
            backend.write(volume, offset, data, fua).await.map(|()| Success::Done)
        }
        Op::Flush => backend.flush(volume).await.map(|()| Success::Done),
        Op::Trim { offset, len, fua } => {
            backend.trim(volume, offset, len.into(), fua).await.map(|()| Success::Done)
        }
        Op::WriteZeroes { offset, len, punch_hole, fua } => backend
            .write_zeroes(volume, offset, len.into(), punch_hole, fua)
            .await
            .map(|()| Success::Done),
        Op::BlockStatus { offset, len, req_one, context_id } => {
            let len = len.min(MAX_BLOCK_STATUS_LEN);
            let extents = backend.block_status(volume, offset, len.into()).await?;
            let descriptors = descriptors(&extents, len, req_one);
            if descriptors.is_empty() {
                return Err(BackendError::Io("backend returned no extents".into()));
            }
            Ok(Success::Extents { context_id, descriptors })
        }
    }
}

/// `base:allocation` descriptors for `extents`: zero-length extents dropped, neighbours with
/// the same status merged, cut to `len` bytes in total, and only the first if REQ_ONE.
fn descriptors(extents: &[Extent], len: u32, req_one: bool) -> Vec<BlockDescriptor> {
    let mut out: Vec<BlockDescriptor> = Vec::new();
    let mut left = len;
    for e in extents {
        if left == 0 {
            break;
        }
        let n = e.length.min(u64::from(left)) as u32;
        if n == 0 {
            continue;
        }
        let flags =
            if e.hole { NBD_STATE_HOLE } else { 0 } | if e.zero { NBD_STATE_ZERO } else { 0 };
        match out.last_mut() {
            Some(d) if d.flags == flags => d.length += n,
            _ => out.push(BlockDescriptor { length: n, flags }),
        }
        left -= n;
    }
    if req_one {
        out.truncate(1);
    }
    out
}

/// Credit a request holds until its reply is written: one request slot and, for READ and
/// WRITE, its payload bytes.
struct Credit {
    requests: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
}

struct Permit {
    _request: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

impl Credit {
    fn new(opts: &ServerOptions) -> Self {
        let opts = opts.normalized();
        Self {
            requests: Arc::new(Semaphore::new(opts.max_in_flight)),
            bytes: Arc::new(Semaphore::new(opts.max_in_flight_bytes)),
        }
    }

    async fn acquire(&self, req: &RequestHeader) -> Permit {
        // The semaphores live as long as `self` and are never closed, so acquiring cannot fail.
        let request =
            self.requests.clone().acquire_owned().await.expect("request semaphore is never closed");
        let bytes = match req.command {
            // Oversized reads are refused without reading anything; oversized writes close
            // the connection before this.
            Command::Read | Command::Write if u64::from(req.length) <= MAX_IO_SIZE => Some(
                self.bytes
                    .clone()
                    .acquire_many_owned(req.length)
                    .await
                    .expect("byte semaphore is never closed"),
            ),
            _ => None,
        };
        Permit { _request: request, _bytes: bytes }
    }
}

/// One encoded reply: the header (and small payloads), then a READ's data uncopied.
struct Reply {
    head: Vec<u8>,
    data: Option<Bytes>,
    _permit: Permit,
}

fn error_reply(structured: bool, cookie: u64, rejection: Rejection, permit: Permit) -> Reply {
    let mut head = Vec::new();
    if structured {
        // Structured errors carry a message for the user; a READ's error must be one.
        let chunk = ReplyChunk::Error { error: rejection.errno, message: rejection.message };
        encode_reply_chunk(NBD_REPLY_FLAG_DONE, cookie, &chunk, &mut head);
    } else {
        encode_simple_reply(&SimpleReply { error: rejection.errno, cookie }, &mut head);
    }
    Reply { head, data: None, _permit: permit }
}

fn success_reply(structured: bool, cookie: u64, success: Success, permit: Permit) -> Reply {
    let mut head = Vec::with_capacity(STRUCTURED_REPLY_HEADER_LEN + 8);
    let mut data = None;
    match success {
        // Replies without payload are simple even when structured replies were negotiated,
        // which the spec allows.
        Success::Done => encode_simple_reply(&SimpleReply { error: 0, cookie }, &mut head),
        Success::Data { offset, data: bytes } => {
            if structured {
                // One chunk, final: the data was read in full before this was written.
                let len = bytes.len() as u32;
                encode_offset_data_header(NBD_REPLY_FLAG_DONE, cookie, offset, len, &mut head);
            } else {
                encode_simple_reply(&SimpleReply { error: 0, cookie }, &mut head);
            }
            data = Some(bytes);
        }
        Success::Extents { context_id, descriptors } => {
            let chunk = ReplyChunk::BlockStatus { context_id, descriptors };
            encode_reply_chunk(NBD_REPLY_FLAG_DONE, cookie, &chunk, &mut head);
        }
    }
    Reply { head, data, _permit: permit }
}

/// Serves requests from `reader`, replies to `writer`, until NBD_CMD_DISC or the client's
/// close (then in-flight requests are finished and their replies flushed) or a protocol
/// violation (then the connection is dropped at once).
pub(crate) async fn run<R, W, B>(
    reader: R,
    writer: W,
    backend: B,
    session: Session,
    opts: &ServerOptions,
) -> Result<(), ConnectionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
    B: Backend,
{
    let session = Arc::new(session);
    // Resolved once per connection: requests count on these handles.
    let counters = opts.metrics.volume(&session.export.name);
    let credit = Credit::new(opts);
    // Every message in the channel holds a request slot, so it never holds more than this.
    let (tx, rx) = mpsc::channel(opts.normalized().max_in_flight);
    let writer = tokio::spawn(write_replies(writer, rx));
    let result = read_requests(reader, &backend, &session, &counters, &credit, &tx).await;
    drop(tx);
    match result {
        Ok(()) => match writer.await {
            // The writer ends once every in-flight request has sent its reply.
            Ok(result) => result.map_err(ConnectionError::from),
            Err(e) => Err(io::Error::other(e).into()),
        },
        Err(e) => {
            writer.abort();
            Err(e)
        }
    }
}

/// The reading side: returns `Ok` on NBD_CMD_DISC or a close between requests.
async fn read_requests<R, B>(
    reader: R,
    backend: &B,
    session: &Arc<Session>,
    counters: &Arc<VolumeMetrics>,
    credit: &Credit,
    tx: &mpsc::Sender<Reply>,
) -> Result<(), ConnectionError>
where
    R: AsyncRead + Unpin,
    B: Backend,
{
    let mut reader = BufReader::with_capacity(READ_BUFFER, reader);
    loop {
        let mut header = [0u8; REQUEST_HEADER_LEN];
        if !read_header(&mut reader, &mut header).await? {
            debug!("NBD client closed the connection without NBD_CMD_DISC");
            return Ok(());
        }
        // A bad magic means the stream can no longer be framed: close.
        let req = decode_request_header(&header)?;
        if req.command == Command::Disc {
            debug!("NBD_CMD_DISC");
            return Ok(());
        }
        if req.command == Command::Write && u64::from(req.length) > MAX_IO_SIZE {
            // Reading 4 GiB to refuse it politely is not worth it.
            return Err(ConnectionError::WriteTooLarge(req.length));
        }
        let permit = credit.acquire(&req).await;
        let data = if req.command == Command::Write {
            let mut buf = BytesMut::zeroed(req.length as usize);
            reader.read_exact(&mut buf).await?;
            buf.freeze()
        } else {
            Bytes::new()
        };
        let arrived = Instant::now();
        match validate(&req, data, session) {
            Ok(op) => {
                tokio::spawn(execute(
                    backend.clone(),
                    session.clone(),
                    req.cookie,
                    op,
                    permit,
                    tx.clone(),
                    (counters.clone(), arrived),
                ));
            }
            Err(rejection) => {
                let (errno, reason) = (rejection.errno, &rejection.message);
                debug!(?req, errno, %reason, "NBD request refused");
                if let Some(kind) = OpKind::of(req.command) {
                    counters.done(kind, false, 0, arrived.elapsed());
                }
                if tx
                    .send(error_reply(session.structured, req.cookie, rejection, permit))
                    .await
                    .is_err()
                {
                    // The writer failed; `run` reports its error.
                    return Ok(());
                }
            }
        }
    }
}

/// Reads a request header; `Ok(false)` if the stream ended cleanly before its first byte.
async fn read_header<R: AsyncRead + Unpin>(reader: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]).await? {
            0 if filled == 0 => return Ok(false),
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => filled += n,
        }
    }
    Ok(true)
}

/// Runs one request through the backend and queues its reply. A panic in the backend
/// becomes EIO for this request only. `counters` count its outcome and its time since it
/// `arrived`.
async fn execute<B: Backend>(
    backend: B,
    session: Arc<Session>,
    cookie: u64,
    op: Op,
    permit: Permit,
    tx: mpsc::Sender<Reply>,
    (counters, arrived): (Arc<VolumeMetrics>, Instant),
) {
    let volume = session.export.volume_id;
    let (kind, bytes) = op.counted_as();
    let outcome = match AssertUnwindSafe(perform(&backend, volume, op)).catch_unwind().await {
        Ok(outcome) => outcome,
        Err(_) => {
            warn!(volume, cookie, "NBD request panicked in the backend");
            Err(BackendError::Io("internal error".into()))
        }
    };
    counters.done(kind, outcome.is_ok(), bytes, arrived.elapsed());
    let reply = match outcome {
        Ok(success) => success_reply(session.structured, cookie, success, permit),
        Err(e) => {
            let errno = errno(&e);
            if errno == errno::EIO {
                warn!(volume, cookie, error = %e, "NBD request failed");
            } else {
                debug!(volume, cookie, error = %e, "NBD request failed");
            }
            error_reply(session.structured, cookie, reject(errno, e.to_string()), permit)
        }
    };
    // If the writer is gone the connection is closing: the reply has nowhere to go.
    let _ = tx.send(reply).await;
}

/// The writing side: writes replies whole, in the order they complete, and flushes whenever
/// no other reply is waiting or [`FLUSH_AT`] bytes are buffered. Ends when every sender is
/// gone, then shuts the socket down.
async fn write_replies<W: AsyncWrite + Unpin>(
    writer: W,
    mut rx: mpsc::Receiver<Reply>,
) -> io::Result<()> {
    let mut w = BufWriter::with_capacity(WRITE_BUFFER, writer);
    while let Some(reply) = rx.recv().await {
        w.write_all(&reply.head).await?;
        if let Some(data) = &reply.data {
            w.write_all(data).await?;
        }
        // Returns the request's credit.
        drop(reply);
        if w.buffer().len() >= FLUSH_AT {
            w.flush().await?;
        } else if rx.is_empty() {
            // Let the requests whose answers are in hand queue their replies first: under
            // load they leave in one write (one wake-up of the client) instead of one each.
            tokio::task::yield_now().await;
            if rx.is_empty() {
                w.flush().await?;
            }
        }
    }
    w.flush().await?;
    w.shutdown().await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::backend::{ExportInfo, MemBackend};
    use crate::handshake::{transmission_flags, BASE_ALLOCATION_ID};

    fn session(read_only: bool, structured: bool, strict: bool) -> Session {
        let export = ExportInfo {
            volume_id: 1,
            name: "vol".into(),
            size: 1 << 20,
            read_only,
            description: String::new(),
        };
        Session {
            flags: transmission_flags(&export, structured),
            export,
            structured,
            base_allocation: structured.then_some(BASE_ALLOCATION_ID),
            strict_block_size: strict,
        }
    }

    fn req(command: Command, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader { flags, command, cookie: 9, offset, length }
    }

    fn errno_of(r: RequestHeader, s: &Session) -> u32 {
        validate(&r, Bytes::new(), s).unwrap_err().errno
    }

    /// Records the size of every write that reaches the socket.
    #[derive(Default)]
    struct Recorder {
        writes: Arc<parking_lot::Mutex<Vec<usize>>>,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            self.writes.lock().push(buf.len());
            std::task::Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// Queues `n` replies (4 KiB reads, or acknowledgements) and returns the writes the
    /// reply writer made of them.
    async fn writes_for(n: u64, read: bool) -> Vec<usize> {
        let credit = Credit::new(&ServerOptions::default());
        let (tx, rx) = mpsc::channel(n as usize);
        for cookie in 0..n {
            let permit = credit.acquire(&req(Command::Read, 0, 0, 4096)).await;
            let success = if read {
                Success::Data { offset: cookie * 4096, data: Bytes::from(vec![7u8; 4096]) }
            } else {
                Success::Done
            };
            tx.send(success_reply(true, cookie, success, permit)).await.unwrap();
        }
        drop(tx);
        let rec = Recorder::default();
        let writes = rec.writes.clone();
        write_replies(rec, rx).await.unwrap();
        let w = writes.lock().clone();
        w
    }

    #[tokio::test]
    async fn read_replies_leave_in_small_batches_and_acks_together() {
        // 16 queued read replies: written a few at a time (the client starts on the first
        // while the rest follow), never all in one write.
        let reply = STRUCTURED_REPLY_HEADER_LEN + 8 + 4096;
        let writes = writes_for(16, true).await;
        assert_eq!(writes.iter().sum::<usize>(), 16 * reply);
        assert!(writes.len() >= 16 * reply / (FLUSH_AT + reply), "{writes:?}");
        assert!(writes.iter().all(|&w| w < FLUSH_AT + reply), "{writes:?}");
        // 100 queued acknowledgements (16 bytes each): one write.
        assert_eq!(writes_for(100, false).await, vec![100 * 16]);
    }

    #[test]
    fn backend_errors_map_to_spec_errnos() {
        assert_eq!(errno(&BackendError::InvalidArgument("x".into())), 22);
        assert_eq!(errno(&BackendError::ReadOnly), 1);
        assert_eq!(errno(&BackendError::NoSpace), 28);
        assert_eq!(errno(&BackendError::NotFound), 5);
        assert_eq!(errno(&BackendError::Io("x".into())), 5);
        assert_eq!(errno(&BackendError::Unavailable("x".into())), 5);
    }

    #[test]
    fn validation() {
        let rw = session(false, true, false);
        let size = 1 << 20;
        assert_eq!(
            validate(&req(Command::Read, NBD_CMD_FLAG_DF, 1, 3), Bytes::new(), &rw),
            Ok(Op::Read { offset: 1, len: 3 })
        );
        // Range and overflow.
        assert_eq!(errno_of(req(Command::Read, 0, size - 1, 2), &rw), errno::EINVAL);
        assert_eq!(errno_of(req(Command::Read, 0, u64::MAX, 1), &rw), errno::EINVAL);
        assert_eq!(errno_of(req(Command::Trim, 0, size, 1), &rw), errno::EINVAL);
        assert_eq!(errno_of(req(Command::Write, 0, size, 1), &rw), errno::ENOSPC);
        assert_eq!(errno_of(req(Command::WriteZeroes, 0, u64::MAX, 1), &rw), errno::ENOSPC);
        // Zero length, oversized reads.
        assert_eq!(errno_of(req(Command::Read, 0, 0, 0), &rw), errno::EINVAL);
        let mut big = session(false, true, false);
        big.export.size = 1 << 40;
        assert_eq!(errno_of(req(Command::Read, 0, 0, (32 << 20) + 1), &big), errno::EINVAL);
        assert!(validate(&req(Command::Trim, 0, 0, u32::MAX), Bytes::new(), &big).is_ok());
        // Flags: unknown, or valid only for another command.
        assert_eq!(errno_of(req(Command::Read, 1 << 9, 0, 512), &rw), errno::EINVAL);
        assert_eq!(errno_of(req(Command::Write, NBD_CMD_FLAG_NO_HOLE, 0, 1), &rw), errno::EINVAL);
        assert_eq!(errno_of(req(Command::Read, NBD_CMD_FLAG_REQ_ONE, 0, 1), &rw), errno::EINVAL);
        let simple = session(false, false, false);
        assert_eq!(errno_of(req(Command::Read, NBD_CMD_FLAG_DF, 0, 1), &simple), errno::EINVAL);
        // Unknown and unadvertised commands.
        assert_eq!(errno_of(req(Command::Unknown(42), 0, 0, 1), &rw), errno::EINVAL);
        assert_eq!(errno_of(req(Command::Cache, 0, 0, 1), &rw), errno::EINVAL);
        // WRITE_ZEROES: NO_HOLE decides punching; FAST_ZERO is fine.
        let flags = NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO | NBD_CMD_FLAG_FUA;
        assert_eq!(
            validate(&req(Command::WriteZeroes, flags, 0, 4096), Bytes::new(), &rw),
            Ok(Op::WriteZeroes { offset: 0, len: 4096, punch_hole: false, fua: true })
        );
        assert_eq!(
            validate(&req(Command::WriteZeroes, 0, 0, 4096), Bytes::new(), &rw),
            Ok(Op::WriteZeroes { offset: 0, len: 4096, punch_hole: true, fua: false })
        );
        // FLUSH ignores its reserved fields.
        assert_eq!(validate(&req(Command::Flush, 0, 7, 7), Bytes::new(), &rw), Ok(Op::Flush));
    }

    #[test]
    fn read_only_exports_refuse_writes_with_eperm() {
        let ro = session(true, false, false);
        for c in [Command::Write, Command::Trim, Command::WriteZeroes] {
            assert_eq!(errno_of(req(c, 0, 0, 512), &ro), errno::EPERM);
        }
        assert!(validate(&req(Command::Read, 0, 0, 512), Bytes::new(), &ro).is_ok());
        assert!(validate(&req(Command::Flush, 0, 0, 0), Bytes::new(), &ro).is_ok());
    }

    #[test]
    fn block_status_needs_the_context() {
        let without = session(false, false, false);
        assert_eq!(errno_of(req(Command::BlockStatus, 0, 0, 512), &without), errno::EINVAL);
        let with = session(false, true, false);
        assert_eq!(
            validate(&req(Command::BlockStatus, NBD_CMD_FLAG_REQ_ONE, 0, 512), Bytes::new(), &with),
            Ok(Op::BlockStatus {
                offset: 0,
                len: 512,
                req_one: true,
                context_id: BASE_ALLOCATION_ID
            })
        );
    }

    #[test]
    fn alignment_binds_only_when_block_sizes_were_asked_for() {
        let lax = session(false, true, false);
        let strict = session(false, true, true);
        let size = lax.export.size;
        for (offset, len) in [(1, 512), (512, 100), (0, 1)] {
            assert!(validate(&req(Command::Read, 0, offset, len), Bytes::new(), &lax).is_ok());
            assert_eq!(errno_of(req(Command::Read, 0, offset, len), &strict), errno::EINVAL);
        }
        assert!(validate(&req(Command::Read, 0, size - 1024, 1024), Bytes::new(), &strict).is_ok());
    }

    #[test]
    fn descriptors_are_merged_cut_and_limited() {
        let e = |length, hole| Extent { length, hole, zero: hole };
        let d = |length, flags| BlockDescriptor { length, flags };
        let both = NBD_STATE_HOLE | NBD_STATE_ZERO;
        let extents =
            [e(4096, false), e(0, true), e(4096, false), e(8192, true), e(1 << 40, false)];
        assert_eq!(descriptors(&extents, 10_000, false), vec![d(8192, 0), d(1808, both)]);
        assert_eq!(descriptors(&extents, 10_000, true), vec![d(8192, 0)]);
        assert_eq!(
            descriptors(&extents, u32::MAX, false),
            vec![d(8192, 0), d(8192, both), d(u32::MAX - 16384, 0)]
        );
        assert!(descriptors(&[], 512, false).is_empty());
        assert!(descriptors(&[e(0, true)], 512, false).is_empty());
    }

    /// MemBackend behind a delay per offset (to reorder completions) and a panic at one
    /// offset.
    #[derive(Clone)]
    struct Slow {
        inner: MemBackend,
        slow_offset: u64,
        panic_offset: u64,
    }

    impl Slow {
        async fn pause(&self, offset: u64) {
            assert_ne!(offset, self.panic_offset, "backend panic injected by the test");
            if offset == self.slow_offset {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }

    impl Backend for Slow {
        async fn lookup(&self, name: &str) -> Result<Option<ExportInfo>, BackendError> {
            self.inner.lookup(name).await
        }
        async fn list(&self) -> Result<Vec<ExportInfo>, BackendError> {
            self.inner.list().await
        }
        async fn read(&self, v: u64, offset: u64, len: u32) -> Result<Bytes, BackendError> {
            self.pause(offset).await;
            self.inner.read(v, offset, len).await
        }
        async fn write(
            &self,
            v: u64,
            offset: u64,
            data: Bytes,
            fua: bool,
        ) -> Result<(), BackendError> {
            self.pause(offset).await;
            self.inner.write(v, offset, data, fua).await
        }
        async fn write_zeroes(
            &self,
            v: u64,
            o: u64,
            l: u64,
            p: bool,
            f: bool,
        ) -> Result<(), BackendError> {
            self.inner.write_zeroes(v, o, l, p, f).await
        }
        async fn trim(&self, v: u64, o: u64, l: u64, f: bool) -> Result<(), BackendError> {
            self.inner.trim(v, o, l, f).await
        }
        async fn flush(&self, v: u64) -> Result<(), BackendError> {
            self.inner.flush(v).await
        }
        async fn block_status(&self, v: u64, o: u64, l: u64) -> Result<Vec<Extent>, BackendError> {
            self.inner.block_status(v, o, l).await
        }
    }

    fn slow() -> Slow {
        let inner = MemBackend::new();
        inner.add(1, "vol", 1 << 20, false);
        Slow { inner, slow_offset: 0, panic_offset: 4096 * 9 }
    }

    fn request(command: Command, cookie: u64, offset: u64, length: u32, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_request_header(
            &RequestHeader { flags: 0, command, cookie, offset, length },
            &mut out,
        );
        out.extend_from_slice(data);
        out
    }

    /// Reads one simple reply (with `data_len` bytes of data if it succeeded).
    async fn simple(
        client: &mut tokio::io::DuplexStream,
        data_len: usize,
    ) -> (SimpleReply, Vec<u8>) {
        let mut h = [0u8; SIMPLE_REPLY_HEADER_LEN];
        client.read_exact(&mut h).await.unwrap();
        let h = decode_simple_reply(&h).unwrap();
        let mut data = vec![0u8; if h.error == 0 { data_len } else { 0 }];
        client.read_exact(&mut data).await.unwrap();
        (h, data)
    }

    fn spawn_run(
        backend: Slow,
        s: Session,
    ) -> (tokio::io::DuplexStream, tokio::task::JoinHandle<Result<(), ConnectionError>>) {
        let (client, server) = tokio::io::duplex(1 << 20);
        let (r, w) = tokio::io::split(server);
        let task =
            tokio::spawn(async move { run(r, w, backend, s, &ServerOptions::default()).await });
        (client, task)
    }

    #[tokio::test]
    async fn replies_go_out_in_completion_order_and_disc_waits_for_in_flight() {
        let b = slow();
        let (mut client, task) = spawn_run(b.clone(), session(false, false, false));
        let mut msgs = request(Command::Write, 1, 0, 4096, &[7u8; 4096]); // slow
        msgs.extend(request(Command::Write, 2, 4096, 4096, &[8u8; 4096])); // fast
        msgs.extend(request(Command::Disc, 3, 0, 0, &[]));
        client.write_all(&msgs).await.unwrap();
        let (first, _) = simple(&mut client, 0).await;
        let (second, _) = simple(&mut client, 0).await;
        assert_eq!((first.cookie, first.error), (2, 0), "the fast write completes first");
        assert_eq!((second.cookie, second.error), (1, 0), "DISC must not drop the slow write");
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "no reply to DISC");
        task.await.unwrap().unwrap();
        assert_eq!(b.inner.read(1, 0, 4096).await.unwrap(), vec![7u8; 4096]);
    }

    #[tokio::test]
    async fn a_backend_panic_fails_one_request_only() {
        let b = slow();
        let (mut client, task) = spawn_run(b, session(false, false, false));
        let mut msgs = request(Command::Read, 1, 4096 * 9, 512, &[]);
        msgs.extend(request(Command::Read, 2, 4096, 512, &[]));
        client.write_all(&msgs).await.unwrap();
        let mut replies = vec![simple(&mut client, 512).await.0, simple(&mut client, 512).await.0];
        replies.sort_by_key(|r| r.cookie);
        assert_eq!(
            replies,
            vec![SimpleReply { error: 5, cookie: 1 }, SimpleReply { error: 0, cookie: 2 }]
        );
        drop(client);
        assert!(task.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn oversized_write_and_bad_magic_close_the_connection() {
        let (mut client, task) = spawn_run(slow(), session(false, false, false));
        client.write_all(&request(Command::Write, 1, 0, (32 << 20) + 1, &[])).await.unwrap();
        assert!(matches!(task.await.unwrap(), Err(ConnectionError::WriteTooLarge(_))));
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());

        let (mut client, task) = spawn_run(slow(), session(false, false, false));
        let mut bad = request(Command::Read, 1, 0, 512, &[]);
        bad[0] = 0;
        client.write_all(&bad).await.unwrap();
        assert!(matches!(task.await.unwrap(), Err(ConnectionError::Malformed(_))));
    }

    #[tokio::test]
    async fn refused_write_payload_is_consumed() {
        let (mut client, task) = spawn_run(slow(), session(true, false, false));
        let mut msgs = request(Command::Write, 1, 0, 4096, &[1u8; 4096]);
        msgs.extend(request(Command::Read, 2, 0, 16, &[]));
        client.write_all(&msgs).await.unwrap();
        assert_eq!(simple(&mut client, 0).await.0, SimpleReply { error: errno::EPERM, cookie: 1 });
        assert_eq!(
            simple(&mut client, 16).await,
            (SimpleReply { error: 0, cookie: 2 }, vec![0; 16])
        );
        drop(client);
        assert!(task.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn backpressure_bounds_requests_in_flight() {
        // One slot: the second request is not even read until the first one's reply is out.
        let b = slow();
        let (client, server) = tokio::io::duplex(1 << 20);
        let (r, w) = tokio::io::split(server);
        let opts = ServerOptions { max_in_flight: 1, ..ServerOptions::default() };
        let s = session(false, false, false);
        let task = tokio::spawn(async move { run(r, w, b, s, &opts).await });
        let mut client = client;
        let mut msgs = request(Command::Read, 1, 0, 512, &[]); // slow
        msgs.extend(request(Command::Read, 2, 4096, 512, &[])); // fast, but waits its turn
        client.write_all(&msgs).await.unwrap();
        assert_eq!(simple(&mut client, 512).await.0.cookie, 1);
        assert_eq!(simple(&mut client, 512).await.0.cookie, 2);
        drop(client);
        assert!(task.await.unwrap().is_ok());
    }
}
