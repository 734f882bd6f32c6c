//! Data lanes: the `BlockIo.Io` stream's messages on a plain TCP connection, without HTTP/2.
//!
//! Frontends send every data request on a lane; gRPC stays for administration, the cluster
//! map and the Raft transport. A lane is opened to the node's gRPC port: the node tells the
//! two apart by the first bytes (HTTP/2 starts with `PRI * HTTP/2.0`, a lane with [`MAGIC`]).
//!
//! # Wire format
//!
//! ```text
//! client: MAGIC (8 bytes), frame(LaneHello), frame(IoRequest), frame(IoRequest), ...
//! node:   frame(LaneWelcome), frame(IoResponse), ...   (responses in any order, by id)
//! frame:  u32 big-endian length n (at most MAX_FRAME), then n bytes of one protobuf message
//! ```
//!
//! The messages are the protobuf ones of `tern/v1/blockio.proto`, so a lane carries what the
//! schema carries (epochs, fencing generations; fields yet to come) and evolves with it.
//! `LaneHello.version` leaves room for a different framing later.
//!
//! Why not HTTP/2: measured on the 2-core VM, tonic's client flushed every request in its own
//! `writev` (one syscall and one wake-up of the node per 4 KiB read at queue depth 32), and
//! the HTTP/2 layers took a tenth of both daemons' CPU. A lane writes whatever is queued in one
//! write and reads many frames per read.
//!
//! # Errors
//!
//! A frame over [`MAX_FRAME`], a message that does not decode, or a handshake that does not
//! arrive within [`HANDSHAKE_TIMEOUT`] ends the connection (with a log line on the node); it
//! never affects another lane.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::v1;

/// The first bytes a lane's client sends.
pub const MAGIC: [u8; 8] = *b"TERNLANE";
/// The lane protocol this code speaks.
pub const VERSION: u32 = 1;
/// The largest frame either side accepts: a 64 MiB request's data and its other fields.
pub const MAX_FRAME: usize = (64 << 20) + 4096;
/// Bytes either side asks the kernel for per read: many frames at once.
pub const READ_CHUNK: usize = 256 << 10;
/// The largest handshake message.
const MAX_HANDSHAKE: usize = 4096;
/// How long either side waits for the other's handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A frame that cannot be taken from the stream: the connection must be closed.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix is over the limit.
    TooLarge(usize),
    /// The frame is not the message expected.
    Decode(String),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge(n) => write!(f, "lane frame of {n} bytes is over the {MAX_FRAME} limit"),
            Self::Decode(e) => write!(f, "bad lane message: {e}"),
        }
    }
}

impl std::error::Error for FrameError {}

impl From<FrameError> for io::Error {
    fn from(e: FrameError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// Appends `m` as one frame.
pub fn put_frame<M: Message>(m: &M, out: &mut BytesMut) {
    let n = m.encoded_len();
    out.reserve(4 + n);
    // Our messages are far below 4 GiB (a request's data is at most 64 MiB).
    out.put_u32(u32::try_from(n).unwrap_or(u32::MAX));
    m.encode(out).expect("a BytesMut grows as needed");
}

/// Takes the next whole frame's message bytes from `buf`, if it holds one. When it holds only
/// part of one, room for the rest is reserved, so the next read can complete it.
pub fn take_frame(buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let n = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if n > MAX_FRAME {
        return Err(FrameError::TooLarge(n));
    }
    if buf.len() < 4 + n {
        buf.reserve(4 + n - buf.len());
        return Ok(None);
    }
    buf.advance(4);
    Ok(Some(buf.split_to(n).freeze()))
}

/// Makes room in a lane's read buffer for the next read (at least a quarter of
/// [`READ_CHUNK`]), so that one read takes whatever arrived.
pub fn make_room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
}

/// Decodes one message of a frame (zero-copy for `bytes` fields: they share `frame`).
pub fn decode<M: Message + Default>(frame: Bytes) -> Result<M, FrameError> {
    M::decode(frame).map_err(|e| FrameError::Decode(e.to_string()))
}

/// Reads one handshake frame (at most [`MAX_HANDSHAKE`] bytes).
async fn read_small<M: Message + Default, R: AsyncRead + Unpin>(r: &mut R) -> io::Result<M> {
    let n = r.read_u32().await? as usize;
    if n > MAX_HANDSHAKE {
        return Err(FrameError::TooLarge(n).into());
    }
    let mut b = vec![0; n];
    r.read_exact(&mut b).await?;
    Ok(decode(Bytes::from(b))?)
}

async fn write_small<M: Message, W: AsyncWrite + Unpin>(
    w: &mut W,
    prefix: &[u8],
    m: &M,
) -> io::Result<()> {
    let mut out = BytesMut::from(prefix);
    put_frame(m, &mut out);
    w.write_all(&out).await?;
    w.flush().await
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("no lane {what} within {HANDSHAKE_TIMEOUT:?}"))
}

/// The client's side of the handshake: sends the magic and `hello`, returns the node's
/// welcome (an error if the node refused the lane or does not speak lanes).
pub async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    hello: &v1::LaneHello,
) -> io::Result<v1::LaneWelcome> {
    let exchange = async {
        write_small(s, &MAGIC, hello).await?;
        read_small::<v1::LaneWelcome, _>(s).await
    };
    let welcome = match tokio::time::timeout(HANDSHAKE_TIMEOUT, exchange).await {
        Ok(Ok(w)) => w,
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "the node closed the lane during the handshake (a node without data lanes?)",
            ))
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(timed_out("welcome")),
    };
    if !welcome.error.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("the node refused the lane: {}", welcome.error),
        ));
    }
    Ok(welcome)
}

/// The node's side, after the first byte was seen to be `MAGIC[0]`: reads the magic and the
/// hello. The caller answers with [`send_welcome`].
pub async fn accept_hello<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<v1::LaneHello> {
    let exchange = async {
        let mut magic = [0; MAGIC.len()];
        s.read_exact(&mut magic).await?;
        if magic != MAGIC {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "not a lane (bad magic)"));
        }
        read_small::<v1::LaneHello, _>(s).await
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, exchange).await.map_err(|_| timed_out("hello"))?
}

/// Answers a hello.
pub async fn send_welcome<S: AsyncWrite + Unpin>(
    s: &mut S,
    welcome: &v1::LaneWelcome,
) -> io::Result<()> {
    write_small(s, &[], welcome).await
}

/// The connections accepted on one port, told apart by their first byte.
pub struct Incoming {
    /// Data lanes (not yet past their handshake: see [`accept_hello`]).
    pub lanes: mpsc::Receiver<(TcpStream, SocketAddr)>,
    /// Everything else, for `tonic::transport::Server::serve_with_incoming` (through
    /// `tokio_stream::wrappers::ReceiverStream`).
    pub grpc: mpsc::Receiver<io::Result<TcpStream>>,
}

/// Accepts connections on `listener` until `grpc` is dropped, with `TCP_NODELAY` set (small
/// replies must not wait for the peer's delayed ACK), and sorts them by their first byte. A
/// connection that sends nothing within [`HANDSHAKE_TIMEOUT`] is closed; so is a lane whose
/// receiver is gone.
pub fn split(listener: TcpListener) -> Incoming {
    let (lanes_tx, lanes) = mpsc::channel(64);
    let (grpc_tx, grpc) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: pause rather than spin.
                        tracing::warn!(%e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = grpc_tx.closed() => return,
            };
            let _ = stream.set_nodelay(true);
            let (lanes_tx, grpc_tx) = (lanes_tx.clone(), grpc_tx.clone());
            tokio::spawn(async move {
                let mut first = [0u8; 1];
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await {
                    Ok(Ok(1)) if first[0] == MAGIC[0] => {
                        let _ = lanes_tx.send((stream, peer)).await;
                    }
                    Ok(Ok(1)) => {
                        let _ = grpc_tx.send(Ok(stream)).await;
                    }
                    // Closed before a byte, a socket error, or silence: nothing to serve.
                    _ => {}
                }
            });
        }
    });
    Incoming { lanes, grpc }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(id: u64, data: &[u8]) -> v1::IoRequest {
        v1::IoRequest {
            id,
            op: Some(v1::io_request::Op::Write(v1::WriteRequest {
                header: Some(v1::IoHeader { volume_id: 7, epoch: 1, generation: 3 }),
                offset: 4096 * id,
                data: Bytes::copy_from_slice(data),
                fua: id.is_multiple_of(2),
            })),
        }
    }

    /// Frames cut at every byte boundary come out whole, in order, and equal to what went in.
    #[test]
    fn frames_survive_any_split() {
        let reqs: Vec<_> = (0..5).map(|i| request(i, &vec![i as u8; 100 * i as usize])).collect();
        let mut wire = BytesMut::new();
        for r in &reqs {
            put_frame(r, &mut wire);
        }
        let wire = wire.freeze();
        for cut in 0..wire.len() {
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for piece in [&wire[..cut], &wire[cut..]] {
                buf.extend_from_slice(piece);
                while let Some(f) = take_frame(&mut buf).unwrap() {
                    got.push(decode::<v1::IoRequest>(f).unwrap());
                }
            }
            assert_eq!(got, reqs, "cut at {cut}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn oversized_and_garbage_frames_are_errors() {
        let mut buf = BytesMut::new();
        buf.put_u32(MAX_FRAME as u32 + 1);
        assert_eq!(take_frame(&mut buf), Err(FrameError::TooLarge(MAX_FRAME + 1)));
        let mut buf = BytesMut::new();
        buf.put_u32(3);
        buf.extend_from_slice(&[0xff, 0xff, 0xff]);
        let f = take_frame(&mut buf).unwrap().unwrap();
        assert!(matches!(decode::<v1::IoRequest>(f), Err(FrameError::Decode(_))));
    }

    #[tokio::test]
    async fn handshake_round_trip_and_refusals() {
        let (mut c, mut s) = tokio::io::duplex(1 << 16);
        let node = tokio::spawn(async move {
            let hello = accept_hello(&mut s).await.unwrap();
            assert_eq!(hello.datacenter, "dc2");
            send_welcome(
                &mut s,
                &v1::LaneWelcome { version: VERSION, node_id: 9, error: String::new() },
            )
            .await
            .unwrap();
        });
        let hello = v1::LaneHello { version: VERSION, datacenter: "dc2".into() };
        let w = client_handshake(&mut c, &hello).await.unwrap();
        assert_eq!(w.node_id, 9);
        node.await.unwrap();

        // A refusal names its reason.
        let (mut c, mut s) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            accept_hello(&mut s).await.unwrap();
            let no = v1::LaneWelcome { error: "version 9 unknown".into(), ..Default::default() };
            send_welcome(&mut s, &no).await.unwrap();
        });
        let e = client_handshake(&mut c, &hello).await.unwrap_err();
        assert!(e.to_string().contains("version 9 unknown"), "{e}");

        // A peer that is not a lane client is turned away by its magic.
        let (mut c, mut s) = tokio::io::duplex(1 << 16);
        c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        let e = accept_hello(&mut s).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
