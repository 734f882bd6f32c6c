//! End-to-end tests of the NBD server: `serve` on a real loopback socket over `MemBackend`,
//! driven by a minimal NBD client written here on top of the crate's codec (so both sides of
//! the wire are checked against each other, and the server against the spec's framing).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tern_nbd_frontend::backend::MemBackend;
use tern_nbd_frontend::codec::*;
use tern_nbd_frontend::{serve, ServerOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const VOL_SIZE: u64 = 16 << 20;

/// Every test runs under a deadline: a server that stops answering fails, never hangs.
async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f).await.expect("test timed out")
}

/// Starts a server with a writable "vol" (16 MiB) and a read-only "ro" (1 MiB).
async fn start() -> (SocketAddr, MemBackend) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let backend = MemBackend::new();
    backend.add(1, "vol", VOL_SIZE, false);
    backend.add(2, "ro", 1 << 20, true);
    tokio::spawn(serve(listener, backend.clone(), ServerOptions::default()));
    (addr, backend)
}

/// One reply message as the client sees it.
#[derive(Debug)]
enum Reply {
    /// `data` is `Some` for a successful read.
    Simple {
        cookie: u64,
        error: u32,
        data: Option<Vec<u8>>,
    },
    Chunk {
        cookie: u64,
        flags: u16,
        chunk: ReplyChunk,
    },
}

impl Reply {
    fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } | Reply::Chunk { cookie, .. } => *cookie,
        }
    }
}

/// The outcome of one request once all its reply messages arrived.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    Data(Vec<u8>),
    Extents(Vec<BlockDescriptor>),
    Err(u32),
}

struct Client {
    stream: TcpStream,
    structured: bool,
    /// Lengths of reads in flight, needed to frame simple replies.
    reads: HashMap<u64, u32>,
    next_cookie: u64,
}

impl Client {
    /// Connects and completes the greeting; options come next.
    async fn connect(addr: SocketAddr) -> Client {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut greeting = [0u8; GREETING_LEN];
        stream.read_exact(&mut greeting).await.unwrap();
        let flags = decode_greeting(&greeting).unwrap();
        assert_eq!(flags, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
        let client_flags = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;
        stream.write_all(&client_flags.to_be_bytes()).await.unwrap();
        Client { stream, structured: false, reads: HashMap::new(), next_cookie: 1 }
    }

    async fn option_reply(&mut self) -> (u32, OptionReply) {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        self.stream.read_exact(&mut h).await.unwrap();
        let h = decode_option_reply_header(&h).unwrap();
        let mut payload = vec![0u8; h.length as usize];
        self.stream.read_exact(&mut payload).await.unwrap();
        (h.option, decode_option_reply(h.reply_type, &payload).unwrap())
    }

    /// Sends an option and collects its replies up to the final ACK or error.
    async fn option(&mut self, opt: ClientOption) -> Vec<OptionReply> {
        let code = opt.code();
        let mut buf = Vec::new();
        encode_option(&opt, &mut buf);
        self.stream.write_all(&buf).await.unwrap();
        let mut replies = Vec::new();
        loop {
            let (option, reply) = self.option_reply().await;
            assert_eq!(option, code, "reply to the wrong option");
            let last = matches!(reply, OptionReply::Ack | OptionReply::Error { .. });
            replies.push(reply);
            if last {
                return replies;
            }
        }
    }

    /// The usual modern negotiation: structured replies, base:allocation, GO.
    async fn open(addr: SocketAddr, export: &str) -> (Client, Vec<OptionReply>) {
        let mut c = Client::connect(addr).await;
        assert_eq!(c.option(ClientOption::StructuredReply).await, vec![OptionReply::Ack]);
        c.structured = true;
        let set = ClientOption::SetMetaContext(MetaContextRequest {
            export: export.into(),
            queries: vec![BASE_ALLOCATION.into()],
        });
        let replies = c.option(set).await;
        let selected = OptionReply::MetaContext { id: 1, name: BASE_ALLOCATION.into() };
        assert_eq!(replies, vec![selected, OptionReply::Ack]);
        let go = ClientOption::Go(InfoRequest {
            name: export.into(),
            info: vec![NBD_INFO_BLOCK_SIZE, NBD_INFO_DESCRIPTION],
        });
        let info = c.option(go).await;
        assert_eq!(info.last(), Some(&OptionReply::Ack), "{info:?}");
        (c, info)
    }

    async fn send(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        data: &[u8],
    ) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut buf = Vec::new();
        encode_request_header(&RequestHeader { flags, command, cookie, offset, length }, &mut buf);
        buf.extend_from_slice(data);
        self.stream.write_all(&buf).await.unwrap();
        if command == Command::Read {
            self.reads.insert(cookie, length);
        }
        cookie
    }

    async fn reply(&mut self) -> Reply {
        let mut magic = [0u8; 4];
        self.stream.read_exact(&mut magic).await.unwrap();
        match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; SIMPLE_REPLY_HEADER_LEN];
                h[..4].copy_from_slice(&magic);
                self.stream.read_exact(&mut h[4..]).await.unwrap();
                let h = decode_simple_reply(&h).unwrap();
                let data = match self.reads.remove(&h.cookie) {
                    Some(len) if h.error == 0 => {
                        let mut data = vec![0u8; len as usize];
                        self.stream.read_exact(&mut data).await.unwrap();
                        Some(data)
                    }
                    _ => None,
                };
                Reply::Simple { cookie: h.cookie, error: h.error, data }
            }
            STRUCTURED_REPLY_MAGIC => {
                assert!(self.structured, "structured reply that was not negotiated");
                let mut h = [0u8; STRUCTURED_REPLY_HEADER_LEN];
                h[..4].copy_from_slice(&magic);
                self.stream.read_exact(&mut h[4..]).await.unwrap();
                let h = decode_structured_reply_header(&h).unwrap();
                let mut payload = vec![0u8; h.length as usize];
                self.stream.read_exact(&mut payload).await.unwrap();
                let chunk = decode_reply_chunk(h.chunk_type, &payload).unwrap();
                Reply::Chunk { cookie: h.cookie, flags: h.flags, chunk }
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    /// Reads messages until every request in `cookies` is complete; outcomes by cookie, and
    /// the order in which requests completed.
    async fn collect(&mut self, cookies: &[u64]) -> (HashMap<u64, Outcome>, Vec<u64>) {
        let mut done = HashMap::new();
        let mut order = Vec::new();
        let mut partial: HashMap<u64, Outcome> = HashMap::new();
        while done.len() < cookies.len() {
            let reply = self.reply().await;
            let cookie = reply.cookie();
            assert!(
                cookies.contains(&cookie) && !done.contains_key(&cookie),
                "stray reply {reply:?}"
            );
            let finished = match reply {
                Reply::Simple { error: 0, data: Some(data), .. } => Some(Outcome::Data(data)),
                Reply::Simple { error: 0, data: None, .. } => Some(Outcome::Ok),
                Reply::Simple { error, .. } => Some(Outcome::Err(error)),
                Reply::Chunk { flags, chunk, .. } => {
                    self.reads.remove(&cookie);
                    let outcome = match chunk {
                        ReplyChunk::None => partial.remove(&cookie).unwrap_or(Outcome::Ok),
                        ReplyChunk::OffsetData { data, .. } => Outcome::Data(data.to_vec()),
                        ReplyChunk::BlockStatus { context_id, descriptors } => {
                            assert_ne!(context_id, 0, "the context id from SET_META_CONTEXT");
                            Outcome::Extents(descriptors)
                        }
                        ReplyChunk::Error { error, .. } | ReplyChunk::ErrorOffset { error, .. } => {
                            Outcome::Err(error)
                        }
                        ReplyChunk::OffsetHole { .. } => panic!("this server sends no holes"),
                    };
                    if flags & NBD_REPLY_FLAG_DONE != 0 {
                        Some(outcome)
                    } else {
                        partial.insert(cookie, outcome);
                        None
                    }
                }
            };
            if let Some(outcome) = finished {
                done.insert(cookie, outcome);
                order.push(cookie);
            }
        }
        (done, order)
    }

    async fn call(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        data: &[u8],
    ) -> Outcome {
        let cookie = self.send(command, flags, offset, length, data).await;
        self.collect(&[cookie]).await.0.remove(&cookie).unwrap()
    }

    async fn read(&mut self, offset: u64, length: u32) -> Outcome {
        self.call(Command::Read, 0, offset, length, &[]).await
    }

    async fn write(&mut self, offset: u64, data: &[u8]) -> Outcome {
        self.call(Command::Write, 0, offset, data.len() as u32, data).await
    }

    /// True once the server has closed the connection (EOF or reset, no bytes).
    async fn closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        !matches!(self.stream.read(&mut byte).await, Ok(n) if n > 0)
    }
}

#[tokio::test]
async fn go_negotiation_reports_export_info() {
    within(async {
        let (addr, _) = start().await;
        let (_c, info) = Client::open(addr, "vol").await;
        let OptionReply::Info(InfoReply::Export { size, flags }) = info[0] else {
            panic!("NBD_INFO_EXPORT must come first: {info:?}")
        };
        assert_eq!(size, VOL_SIZE);
        for f in [
            NBD_FLAG_HAS_FLAGS,
            NBD_FLAG_SEND_FLUSH,
            NBD_FLAG_SEND_FUA,
            NBD_FLAG_SEND_TRIM,
            NBD_FLAG_SEND_WRITE_ZEROES,
            NBD_FLAG_SEND_FAST_ZERO,
            NBD_FLAG_CAN_MULTI_CONN,
        ] {
            assert_ne!(flags & f, 0, "flag {f:#x} missing from {flags:#x}");
        }
        assert_eq!(flags & NBD_FLAG_READ_ONLY, 0);
        assert!(info.contains(&OptionReply::Info(InfoReply::BlockSize {
            min: 512,
            preferred: 4096,
            max: 32 << 20
        })));
        let description = InfoReply::Description("test volume vol".into());
        assert!(info.contains(&OptionReply::Info(description)));
    })
    .await;
}

#[tokio::test]
async fn write_read_trim_zero_block_status_flush() {
    within(async {
        let (addr, backend) = start().await;
        let (mut c, _) = Client::open(addr, "vol").await;
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(c.write(4096, &data).await, Outcome::Ok);
        assert_eq!(c.read(4096, 8192).await, Outcome::Data(data.clone()));
        // FUA passes through and is accepted.
        assert_eq!(c.call(Command::Write, NBD_CMD_FLAG_FUA, 0, 512, &[1; 512]).await, Outcome::Ok);

        // [0, 12 KiB) holds data, the rest of the first 64 KiB is a hole.
        let d = |length, flags| BlockDescriptor { length, flags };
        let hole = NBD_STATE_HOLE | NBD_STATE_ZERO;
        assert_eq!(
            c.call(Command::BlockStatus, 0, 0, 65536, &[]).await,
            Outcome::Extents(vec![d(12288, 0), d(53248, hole)])
        );
        assert_eq!(
            c.call(Command::BlockStatus, NBD_CMD_FLAG_REQ_ONE, 0, 65536, &[]).await,
            Outcome::Extents(vec![d(12288, 0)])
        );
        // Within the request: never more than asked.
        assert_eq!(
            c.call(Command::BlockStatus, 0, 8192, 5120, &[]).await,
            Outcome::Extents(vec![d(4096, 0), d(1024, hole)])
        );

        assert_eq!(c.call(Command::Trim, 0, 4096, 4096, &[]).await, Outcome::Ok);
        let zeroes = NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO;
        assert_eq!(c.call(Command::WriteZeroes, zeroes, 8192, 4096, &[]).await, Outcome::Ok);
        let mut expected = vec![0u8; 8192];
        expected[..512].fill(1);
        assert_eq!(c.read(0, 8192).await, Outcome::Data(expected));
        assert_eq!(c.read(8192, 4096).await, Outcome::Data(vec![0; 4096]));

        assert_eq!(backend.flushes(1), 0);
        assert_eq!(c.call(Command::Flush, 0, 0, 0, &[]).await, Outcome::Ok);
        assert_eq!(backend.flushes(1), 1);
    })
    .await;
}

#[tokio::test]
async fn pipelined_requests_all_complete() {
    within(async {
        let (addr, _) = start().await;
        let (mut c, _) = Client::open(addr, "vol").await;
        // 200 writes then 200 reads, sent without waiting: more than the 128 in flight, so
        // backpressure is exercised too.
        let block = |i: u64| vec![(i % 255) as u8 + 1; 4096];
        let mut writes = Vec::new();
        for i in 0..200u64 {
            writes.push(c.send(Command::Write, 0, i * 4096, 4096, &block(i)).await);
        }
        let (done, _) = c.collect(&writes).await;
        assert!(done.values().all(|o| *o == Outcome::Ok), "{done:?}");
        let mut reads = Vec::new();
        for i in 0..200u64 {
            reads.push(c.send(Command::Read, 0, i * 4096, 4096, &[]).await);
        }
        let (done, _) = c.collect(&reads).await;
        for (i, cookie) in reads.iter().enumerate() {
            assert_eq!(done[cookie], Outcome::Data(block(i as u64)), "block {i}");
        }
    })
    .await;
}

#[tokio::test]
async fn simple_replies_without_structured_negotiation() {
    within(async {
        let (addr, _) = start().await;
        let mut c = Client::connect(addr).await;
        let info =
            c.option(ClientOption::Go(InfoRequest { name: "vol".into(), info: vec![] })).await;
        let OptionReply::Info(InfoReply::Export { flags, .. }) = info[0] else {
            panic!("{info:?}")
        };
        assert_eq!(flags & NBD_FLAG_SEND_DF, 0, "DF needs structured replies");
        assert_eq!(c.write(0, &[9; 1000]).await, Outcome::Ok);
        // No NBD_INFO_BLOCK_SIZE asked: byte granularity is fine.
        assert_eq!(c.read(1, 10).await, Outcome::Data(vec![9; 10]));
        assert_eq!(c.read(VOL_SIZE, 512).await, Outcome::Err(errno::EINVAL));
        // Without a metadata context there is no block status.
        assert_eq!(c.call(Command::BlockStatus, 0, 0, 512, &[]).await, Outcome::Err(errno::EINVAL));
        // The connection survives errors.
        assert_eq!(c.read(0, 2).await, Outcome::Data(vec![9; 2]));
    })
    .await;
}

#[tokio::test]
async fn export_name_then_disc() {
    within(async {
        let (addr, backend) = start().await;
        let mut c = Client::connect(addr).await;
        let mut opt = Vec::new();
        encode_option(&ClientOption::ExportName("vol".into()), &mut opt);
        c.stream.write_all(&opt).await.unwrap();
        let mut reply = [0u8; EXPORT_NAME_REPLY_LEN];
        c.stream.read_exact(&mut reply).await.unwrap();
        let (size, flags) = decode_export_name_reply(&reply).unwrap();
        assert_eq!(size, VOL_SIZE);
        assert_ne!(flags & NBD_FLAG_HAS_FLAGS, 0);
        // A write immediately followed by DISC: the write completes before the close.
        c.send(Command::Write, 0, 0, 4, b"tern").await;
        c.send(Command::Disc, 0, 0, 0, &[]).await;
        assert!(matches!(c.reply().await, Reply::Simple { error: 0, .. }));
        assert!(c.closed().await);
        use tern_nbd_frontend::backend::Backend;
        assert_eq!(&backend.read(1, 0, 4).await.unwrap()[..], b"tern");
    })
    .await;
}

#[tokio::test]
async fn read_only_export_refuses_writes_with_eperm() {
    within(async {
        let (addr, _) = start().await;
        let (mut c, info) = Client::open(addr, "ro").await;
        let OptionReply::Info(InfoReply::Export { flags, .. }) = info[0] else {
            panic!("{info:?}")
        };
        assert_ne!(flags & NBD_FLAG_READ_ONLY, 0);
        assert_eq!(c.write(0, &[1; 4096]).await, Outcome::Err(errno::EPERM));
        assert_eq!(c.call(Command::Trim, 0, 0, 4096, &[]).await, Outcome::Err(errno::EPERM));
        assert_eq!(c.call(Command::WriteZeroes, 0, 0, 4096, &[]).await, Outcome::Err(errno::EPERM));
        // The refused write's payload was consumed: the stream is still framed.
        assert_eq!(c.read(0, 4096).await, Outcome::Data(vec![0; 4096]));
    })
    .await;
}

#[tokio::test]
async fn out_of_range_and_misaligned_requests_fail() {
    within(async {
        let (addr, _) = start().await;
        let (mut c, _) = Client::open(addr, "vol").await;
        assert_eq!(c.read(VOL_SIZE - 512, 1024).await, Outcome::Err(errno::EINVAL));
        assert_eq!(c.read(u64::MAX - 511, 512).await, Outcome::Err(errno::EINVAL));
        assert_eq!(c.call(Command::Trim, 0, VOL_SIZE, 512, &[]).await, Outcome::Err(errno::EINVAL));
        assert_eq!(
            c.call(Command::BlockStatus, 0, VOL_SIZE, 512, &[]).await,
            Outcome::Err(errno::EINVAL)
        );
        // Writes past the end: ENOSPC, as the spec asks; the payload is still consumed.
        assert_eq!(c.write(VOL_SIZE - 512, &[1; 1024]).await, Outcome::Err(errno::ENOSPC));
        // NBD_INFO_BLOCK_SIZE was requested, so 512-byte alignment binds.
        assert_eq!(c.read(1, 512).await, Outcome::Err(errno::EINVAL));
        assert_eq!(c.write(512, &[1; 100]).await, Outcome::Err(errno::EINVAL));
        // Oversized reads, zero-length requests, unknown commands and flags.
        assert_eq!(c.read(0, (32 << 20) + 512).await, Outcome::Err(errno::EINVAL));
        assert_eq!(c.read(0, 0).await, Outcome::Err(errno::EINVAL));
        assert_eq!(c.call(Command::Unknown(99), 0, 0, 512, &[]).await, Outcome::Err(errno::EINVAL));
        assert_eq!(c.call(Command::Read, 1 << 12, 0, 512, &[]).await, Outcome::Err(errno::EINVAL));
        // Still usable.
        assert_eq!(c.read(0, 512).await, Outcome::Data(vec![0; 512]));
    })
    .await;
}

#[tokio::test]
async fn option_haggling_errors_keep_negotiating() {
    within(async {
        let (addr, _) = start().await;
        let mut c = Client::connect(addr).await;
        // Unknown option (and STARTTLS): unsupported, go on.
        for code in [NBD_OPT_STARTTLS, 77] {
            let r = c.option(ClientOption::Unknown(code)).await;
            assert!(matches!(r[..], [OptionReply::Error { code: NBD_REP_ERR_UNSUP, .. }]), "{r:?}");
        }
        // SET_META_CONTEXT before STRUCTURED_REPLY: invalid.
        let set = ClientOption::SetMetaContext(MetaContextRequest {
            export: "vol".into(),
            queries: vec![BASE_ALLOCATION.into()],
        });
        let r = c.option(set).await;
        assert!(matches!(r[..], [OptionReply::Error { code: NBD_REP_ERR_INVALID, .. }]), "{r:?}");
        // LIST: one NBD_REP_SERVER per export.
        let r = c.option(ClientOption::List).await;
        let names: Vec<_> = r
            .iter()
            .filter_map(|r| match r {
                OptionReply::Server { name, .. } => Some(name.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(names, ["vol", "ro"]);
        assert_eq!(r.last(), Some(&OptionReply::Ack));
        // Unknown export.
        let r =
            c.option(ClientOption::Info(InfoRequest { name: "nope".into(), info: vec![] })).await;
        assert!(matches!(r[..], [OptionReply::Error { code: NBD_REP_ERR_UNKNOWN, .. }]), "{r:?}");
        // LIST_META_CONTEXT other namespaces: nothing.
        c.option(ClientOption::StructuredReply).await;
        let list = ClientOption::ListMetaContext(MetaContextRequest {
            export: "vol".into(),
            queries: vec!["qemu:dirty-bitmap:x".into()],
        });
        assert_eq!(c.option(list).await, vec![OptionReply::Ack]);
        // And negotiation still ends normally.
        let r = c.option(ClientOption::Go(InfoRequest { name: "vol".into(), info: vec![] })).await;
        assert_eq!(r.last(), Some(&OptionReply::Ack));
        c.structured = true;
        assert_eq!(c.read(0, 16).await, Outcome::Data(vec![0; 16]));
    })
    .await;
}

#[tokio::test]
async fn abort_is_acknowledged_then_closed() {
    within(async {
        let (addr, _) = start().await;
        let mut c = Client::connect(addr).await;
        assert_eq!(c.option(ClientOption::Abort).await, vec![OptionReply::Ack]);
        assert!(c.closed().await);
    })
    .await;
}

#[tokio::test]
async fn bad_magic_closes_only_that_connection() {
    within(async {
        let (addr, _) = start().await;
        let (mut good, _) = Client::open(addr, "vol").await;
        let (mut bad, _) = Client::open(addr, "vol").await;
        assert_eq!(good.write(0, &[5; 512]).await, Outcome::Ok);
        let mut garbage = Vec::new();
        encode_request_header(
            &RequestHeader { flags: 0, command: Command::Read, cookie: 1, offset: 0, length: 512 },
            &mut garbage,
        );
        garbage[..4].copy_from_slice(&0xdead_beef_u32.to_be_bytes());
        bad.stream.write_all(&garbage).await.unwrap();
        assert!(bad.closed().await, "a bad request magic must close the connection");
        assert_eq!(good.read(0, 512).await, Outcome::Data(vec![5; 512]));
        // New connections are still accepted.
        let (mut third, _) = Client::open(addr, "vol").await;
        assert_eq!(third.read(0, 512).await, Outcome::Data(vec![5; 512]));
    })
    .await;
}

#[tokio::test]
async fn clients_without_fixed_newstyle_are_dropped() {
    within(async {
        let (addr, _) = start().await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut greeting = [0u8; GREETING_LEN];
        stream.read_exact(&mut greeting).await.unwrap();
        stream.write_all(&0u32.to_be_bytes()).await.unwrap();
        let mut rest = Vec::new();
        // EOF (or a reset), and nothing sent after the greeting.
        let _ = stream.read_to_end(&mut rest).await;
        assert!(rest.is_empty());
    })
    .await;
}
