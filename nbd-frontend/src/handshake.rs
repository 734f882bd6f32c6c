//! The fixed-newstyle handshake: greeting, client flags, then option haggling until the
//! client picks an export (NBD_OPT_EXPORT_NAME or NBD_OPT_GO) or aborts.
//!
//! It owns what a connection negotiates: structured replies, the `base:allocation` metadata
//! context, whether the client asked for block sizes (which makes alignment binding), and the
//! transmission flags the export is served with. Options this server does not know get
//! NBD_REP_ERR_UNSUP and negotiation goes on; malformed options get NBD_REP_ERR_INVALID.
//! Only the socket's framing failing (bad magic, oversized or invalid NBD_OPT_EXPORT_NAME,
//! refused client flags) closes the connection. TLS is not offered (NOTLS mode: STARTTLS is
//! answered NBD_REP_ERR_UNSUP like any unknown option).

use std::io;

use tern_common::{BLOCK_SIZE, MAX_IO_SIZE};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use crate::backend::{Backend, BackendError, ExportInfo};
use crate::codec::*;
use crate::server::ConnectionError;

/// Largest option payload read into memory. Real options are an export name or a few
/// metadata queries (each at most 4 KiB); larger ones are skipped unread and refused.
pub(crate) const MAX_OPTION_LEN: u32 = 64 * 1024;

/// The id of `base:allocation` in NBD_REP_META_CONTEXT and block status chunks.
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;

/// NBD_INFO_BLOCK_SIZE: requests must be 512-byte aligned when the client asked for block
/// sizes; 4 KiB is the storage node's block; 32 MiB is the largest READ or WRITE.
pub(crate) const MIN_BLOCK_SIZE: u32 = 512;
const PREFERRED_BLOCK_SIZE: u32 = BLOCK_SIZE as u32;
const MAX_BLOCK_SIZE: u32 = MAX_IO_SIZE as u32;

/// What the transmission phase needs to know about the negotiation.
#[derive(Clone, Debug)]
pub(crate) struct Session {
    pub export: ExportInfo,
    /// Transmission flags sent to the client.
    pub flags: u16,
    /// NBD_OPT_STRUCTURED_REPLY was acknowledged.
    pub structured: bool,
    /// The id of `base:allocation` if it was selected for this export.
    pub base_allocation: Option<u32>,
    /// The client asked for NBD_INFO_BLOCK_SIZE, so it promised 512-byte alignment and
    /// misaligned requests get EINVAL.
    pub strict_block_size: bool,
}

/// How negotiation ended.
#[derive(Debug)]
pub(crate) enum Negotiated {
    Transmission(Session),
    /// NBD_OPT_ABORT, acknowledged: close the connection.
    Aborted,
}

/// Negotiation state carried from option to option.
#[derive(Debug, Default)]
struct State {
    /// The client set NBD_FLAG_C_NO_ZEROES.
    no_zeroes: bool,
    structured: bool,
    /// The export named by the last NBD_OPT_SET_META_CONTEXT that selected `base:allocation`.
    /// The context only applies if the client then goes to that same export.
    meta_export: Option<String>,
}

impl State {
    fn session(
        &self,
        export: ExportInfo,
        requested_name: &str,
        strict_block_size: bool,
    ) -> Session {
        let base_allocation = (self.structured
            && self.meta_export.as_deref() == Some(requested_name))
        .then_some(BASE_ALLOCATION_ID);
        Session {
            flags: transmission_flags(&export, self.structured),
            export,
            structured: self.structured,
            base_allocation,
            strict_block_size,
        }
    }
}

/// The transmission flags an export is served with.
pub(crate) fn transmission_flags(export: &ExportInfo, structured: bool) -> u16 {
    // FLUSH and FUA reach the storage node. Zeroing only touches metadata there, so it is
    // always fast (SEND_FAST_ZERO). The backend's flush covers writes of every connection,
    // hence CAN_MULTI_CONN.
    let mut flags = NBD_FLAG_HAS_FLAGS
        | NBD_FLAG_SEND_FLUSH
        | NBD_FLAG_SEND_FUA
        | NBD_FLAG_SEND_TRIM
        | NBD_FLAG_SEND_WRITE_ZEROES
        | NBD_FLAG_SEND_FAST_ZERO
        | NBD_FLAG_CAN_MULTI_CONN;
    if export.read_only {
        flags |= NBD_FLAG_READ_ONLY;
    }
    if structured {
        // A read is always answered with one data chunk, so "don't fragment" holds anyway.
        flags |= NBD_FLAG_SEND_DF;
    }
    flags
}

/// Runs the handshake on `stream` until the client enters transmission or aborts.
pub(crate) async fn negotiate<S, B>(
    stream: &mut S,
    backend: &B,
) -> Result<Negotiated, ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    B: Backend,
{
    let mut greeting = Vec::with_capacity(GREETING_LEN);
    encode_greeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES, &mut greeting);
    stream.write_all(&greeting).await?;
    stream.flush().await?;

    let mut flags = [0u8; CLIENT_FLAGS_LEN];
    stream.read_exact(&mut flags).await?;
    let flags = decode_client_flags(&flags)?;
    let known = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;
    // Plain newstyle clients cannot be told about errors; unknown flags must drop the
    // connection (spec).
    if flags & NBD_FLAG_C_FIXED_NEWSTYLE == 0 || flags & !known != 0 {
        return Err(ConnectionError::ClientFlags(flags));
    }
    let mut state = State { no_zeroes: flags & NBD_FLAG_C_NO_ZEROES != 0, ..State::default() };

    loop {
        let mut header = [0u8; OPTION_HEADER_LEN];
        stream.read_exact(&mut header).await?;
        let header = decode_option_header(&header)?;

        if header.length > MAX_OPTION_LEN {
            if header.option == NBD_OPT_EXPORT_NAME {
                // EXPORT_NAME has no error reply: closing is all that is left.
                return Err(ConnectionError::OptionTooLarge {
                    option: header.option,
                    length: header.length,
                    limit: MAX_OPTION_LEN,
                });
            }
            // Skip the payload through a small buffer rather than holding it.
            let length = u64::from(header.length);
            let skipped =
                tokio::io::copy(&mut (&mut *stream).take(length), &mut tokio::io::sink()).await?;
            if skipped < length {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
            let message = format!(
                "option payload of {} bytes is over the limit of {MAX_OPTION_LEN}",
                header.length
            );
            debug!(option = header.option, length = header.length, "NBD option too large");
            send(stream, header.option, &OptionReply::error(NBD_REP_ERR_TOO_BIG, message)).await?;
            continue;
        }

        let mut payload = vec![0u8; header.length as usize];
        stream.read_exact(&mut payload).await?;
        let option = match decode_option(header.option, &payload) {
            Ok(option) => option,
            Err(e) if header.option == NBD_OPT_EXPORT_NAME => return Err(e.into()),
            Err(e) => {
                debug!(option = header.option, error = %e, "malformed NBD option");
                send(
                    stream,
                    header.option,
                    &OptionReply::error(NBD_REP_ERR_INVALID, e.to_string()),
                )
                .await?;
                continue;
            }
        };
        debug!(?option, "NBD option");
        let (bytes, outcome) = answer(backend, &mut state, option).await?;
        stream.write_all(&bytes).await?;
        stream.flush().await?;
        if let Some(outcome) = outcome {
            return Ok(outcome);
        }
    }
}

async fn send<S: AsyncWrite + Unpin>(
    stream: &mut S,
    option: u32,
    reply: &OptionReply,
) -> io::Result<()> {
    let mut out = Vec::new();
    encode_option_reply(option, reply, &mut out);
    stream.write_all(&out).await?;
    stream.flush().await
}

/// Replies to one option, appended to a buffer in order.
struct Replies {
    option: u32,
    out: Vec<u8>,
}

impl Replies {
    fn push(&mut self, reply: OptionReply) {
        encode_option_reply(self.option, &reply, &mut self.out);
    }
}

/// The option reply for a failed backend lookup. The protocol has no "try again" error;
/// NBD_REP_ERR_POLICY with the reason is what a client shows its user.
fn backend_error(e: &BackendError) -> OptionReply {
    match e {
        BackendError::NotFound => OptionReply::error(NBD_REP_ERR_UNKNOWN, e.to_string()),
        _ => OptionReply::error(NBD_REP_ERR_POLICY, e.to_string()),
    }
}

fn unknown_export(name: &str) -> OptionReply {
    OptionReply::error(NBD_REP_ERR_UNKNOWN, format!("no export named {name:?}"))
}

/// Answers one decoded option: the bytes to send and, if negotiation ends, how.
async fn answer<B: Backend>(
    backend: &B,
    state: &mut State,
    option: ClientOption,
) -> Result<(Vec<u8>, Option<Negotiated>), ConnectionError> {
    let mut r = Replies { option: option.code(), out: Vec::new() };
    let mut outcome = None;
    match option {
        ClientOption::ExportName(name) => {
            let export = backend
                .lookup(&name)
                .await
                .map_err(ConnectionError::Lookup)?
                .ok_or_else(|| ConnectionError::UnknownExport(name.clone()))?;
            let session = state.session(export, &name, false);
            encode_export_name_reply(
                session.export.size,
                session.flags,
                state.no_zeroes,
                &mut r.out,
            );
            outcome = Some(Negotiated::Transmission(session));
        }
        ClientOption::Abort => {
            r.push(OptionReply::Ack);
            outcome = Some(Negotiated::Aborted);
        }
        ClientOption::List => match backend.list().await {
            Ok(exports) => {
                for e in exports {
                    r.push(OptionReply::Server { name: e.name, details: e.description });
                }
                r.push(OptionReply::Ack);
            }
            Err(e) => r.push(backend_error(&e)),
        },
        ClientOption::Info(req) | ClientOption::Go(req) => {
            let go = r.option == NBD_OPT_GO;
            match backend.lookup(&req.name).await {
                Err(e) => r.push(backend_error(&e)),
                Ok(None) => r.push(unknown_export(&req.name)),
                Ok(Some(export)) => {
                    let strict = req.info.contains(&NBD_INFO_BLOCK_SIZE);
                    let session = state.session(export, &req.name, strict);
                    let export = &session.export;
                    r.push(OptionReply::Info(InfoReply::Export {
                        size: export.size,
                        flags: session.flags,
                    }));
                    let mut sent = Vec::new();
                    for &info in &req.info {
                        if sent.contains(&info) {
                            continue;
                        }
                        sent.push(info);
                        // NBD_INFO_EXPORT went first; unknown types are ignored (spec).
                        let reply = match info {
                            NBD_INFO_NAME => InfoReply::Name(export.name.clone()),
                            NBD_INFO_DESCRIPTION => {
                                InfoReply::Description(export.description.clone())
                            }
                            NBD_INFO_BLOCK_SIZE => InfoReply::BlockSize {
                                min: MIN_BLOCK_SIZE,
                                preferred: PREFERRED_BLOCK_SIZE,
                                max: MAX_BLOCK_SIZE,
                            },
                            _ => continue,
                        };
                        r.push(OptionReply::Info(reply));
                    }
                    r.push(OptionReply::Ack);
                    if go {
                        outcome = Some(Negotiated::Transmission(session));
                    }
                }
            }
        }
        ClientOption::StructuredReply => {
            state.structured = true;
            r.push(OptionReply::Ack);
        }
        ClientOption::ListMetaContext(req) | ClientOption::SetMetaContext(req) => {
            let set = r.option == NBD_OPT_SET_META_CONTEXT;
            if set {
                // SET replaces the selection, even when it fails.
                state.meta_export = None;
            }
            if !state.structured {
                r.push(OptionReply::error(
                    NBD_REP_ERR_INVALID,
                    "metadata contexts need NBD_OPT_STRUCTURED_REPLY first",
                ));
            } else {
                match backend.lookup(&req.export).await {
                    Err(e) => r.push(backend_error(&e)),
                    Ok(None) => r.push(unknown_export(&req.export)),
                    Ok(Some(_)) => {
                        // LIST with no query lists everything; "base:" lists the namespace.
                        // SET selects by exact name. Other namespaces match nothing.
                        let selected = if set {
                            req.queries.iter().any(|q| q == BASE_ALLOCATION)
                        } else {
                            req.queries.is_empty()
                                || req.queries.iter().any(|q| q == BASE_ALLOCATION || q == "base:")
                        };
                        if selected {
                            // LIST replies carry id 0, as the spec recommends.
                            let id = if set { BASE_ALLOCATION_ID } else { 0 };
                            r.push(OptionReply::MetaContext { id, name: BASE_ALLOCATION.into() });
                            if set {
                                state.meta_export = Some(req.export);
                            }
                        }
                        r.push(OptionReply::Ack);
                    }
                }
            }
        }
        ClientOption::Unknown(code) => {
            r.push(OptionReply::error(
                NBD_REP_ERR_UNSUP,
                format!("option {code} is not supported"),
            ));
        }
    }
    Ok((r.out, outcome))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemBackend;
    use tokio::io::DuplexStream;

    fn backend() -> MemBackend {
        let b = MemBackend::new();
        b.add(1, "vol", 1 << 20, false);
        b.add(2, "ro", 1 << 20, true);
        b
    }

    /// Decodes a buffer of option replies.
    fn replies(mut buf: &[u8]) -> Vec<(u32, OptionReply)> {
        let mut out = Vec::new();
        while !buf.is_empty() {
            let h = decode_option_reply_header(buf).unwrap();
            let end = OPTION_REPLY_HEADER_LEN + h.length as usize;
            out.push((
                h.option,
                decode_option_reply(h.reply_type, &buf[OPTION_REPLY_HEADER_LEN..end]).unwrap(),
            ));
            buf = &buf[end..];
        }
        out
    }

    async fn ask(
        b: &MemBackend,
        s: &mut State,
        opt: ClientOption,
    ) -> (Vec<OptionReply>, Option<Negotiated>) {
        let code = opt.code();
        let (bytes, outcome) = answer(b, s, opt).await.unwrap();
        let r = replies(&bytes);
        assert!(r.iter().all(|(o, _)| *o == code), "replies must name their option");
        (r.into_iter().map(|(_, r)| r).collect(), outcome)
    }

    fn go(name: &str, info: &[u16]) -> ClientOption {
        ClientOption::Go(InfoRequest { name: name.into(), info: info.to_vec() })
    }

    fn meta(set: bool, export: &str, queries: &[&str]) -> ClientOption {
        let req = MetaContextRequest {
            export: export.into(),
            queries: queries.iter().map(|q| q.to_string()).collect(),
        };
        if set {
            ClientOption::SetMetaContext(req)
        } else {
            ClientOption::ListMetaContext(req)
        }
    }

    #[tokio::test]
    async fn go_reports_export_and_requested_info() {
        let b = backend();
        let mut s = State { structured: true, ..State::default() };
        let (r, outcome) =
            ask(&b, &mut s, go("vol", &[NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME, 999, NBD_INFO_NAME]))
                .await;
        let flags = transmission_flags(&b.lookup("vol").await.unwrap().unwrap(), true);
        assert_eq!(
            r,
            vec![
                OptionReply::Info(InfoReply::Export { size: 1 << 20, flags }),
                OptionReply::Info(InfoReply::BlockSize {
                    min: 512,
                    preferred: 4096,
                    max: 32 << 20
                }),
                OptionReply::Info(InfoReply::Name("vol".into())),
                OptionReply::Ack,
            ]
        );
        let Some(Negotiated::Transmission(session)) = outcome else {
            panic!("GO must end negotiation")
        };
        assert!(session.strict_block_size && session.structured);
        assert_eq!(session.base_allocation, None);
        assert_ne!(session.flags & NBD_FLAG_SEND_DF, 0);
    }

    #[tokio::test]
    async fn info_does_not_end_negotiation_and_unknown_export_is_err_unknown() {
        let b = backend();
        let mut s = State::default();
        let info =
            ClientOption::Info(InfoRequest { name: "ro".into(), info: vec![NBD_INFO_DESCRIPTION] });
        let (r, outcome) = ask(&b, &mut s, info).await;
        assert!(outcome.is_none());
        let OptionReply::Info(InfoReply::Export { flags, .. }) = r[0] else { panic!("{r:?}") };
        assert_ne!(flags & NBD_FLAG_READ_ONLY, 0);
        assert_eq!(flags & NBD_FLAG_SEND_DF, 0, "DF needs structured replies");
        assert_eq!(r[1], OptionReply::Info(InfoReply::Description("test volume ro".into())));
        let (r, outcome) = ask(&b, &mut s, go("nope", &[])).await;
        assert!(outcome.is_none());
        assert!(matches!(r[..], [OptionReply::Error { code: NBD_REP_ERR_UNKNOWN, .. }]));
    }

    #[tokio::test]
    async fn list_gives_one_server_reply_per_export() {
        let b = backend();
        let (r, _) = ask(&b, &mut State::default(), ClientOption::List).await;
        assert_eq!(r.len(), 3);
        assert!(matches!(&r[0], OptionReply::Server { name, .. } if name == "vol"));
        assert!(matches!(&r[1], OptionReply::Server { name, .. } if name == "ro"));
        assert_eq!(r[2], OptionReply::Ack);
    }

    #[tokio::test]
    async fn meta_context_negotiation() {
        let b = backend();
        let mut s = State::default();
        // Before STRUCTURED_REPLY: invalid.
        let (r, _) = ask(&b, &mut s, meta(true, "vol", &[BASE_ALLOCATION])).await;
        assert!(matches!(r[..], [OptionReply::Error { code: NBD_REP_ERR_INVALID, .. }]));
        let (r, _) = ask(&b, &mut s, ClientOption::StructuredReply).await;
        assert_eq!(r, vec![OptionReply::Ack]);
        // LIST: everything, the namespace, or nothing for other namespaces.
        for q in [&[][..], &["base:"], &["base:allocation", "qemu:dirty-bitmap:x"]] {
            let (r, _) = ask(&b, &mut s, meta(false, "vol", q)).await;
            let ctx = OptionReply::MetaContext { id: 0, name: BASE_ALLOCATION.into() };
            assert_eq!(r, vec![ctx, OptionReply::Ack], "query {q:?}");
        }
        let (r, _) = ask(&b, &mut s, meta(false, "vol", &["qemu:"])).await;
        assert_eq!(r, vec![OptionReply::Ack]);
        // Unknown export.
        let (r, _) = ask(&b, &mut s, meta(true, "nope", &[BASE_ALLOCATION])).await;
        assert!(matches!(r[..], [OptionReply::Error { code: NBD_REP_ERR_UNKNOWN, .. }]));
        // SET selects base:allocation only.
        let (r, _) = ask(&b, &mut s, meta(true, "vol", &["x-foo:bar", BASE_ALLOCATION])).await;
        let ctx = OptionReply::MetaContext { id: BASE_ALLOCATION_ID, name: BASE_ALLOCATION.into() };
        assert_eq!(r, vec![ctx, OptionReply::Ack]);
        // ...and applies to that export only.
        let (_, outcome) = ask(&b, &mut s, go("ro", &[])).await;
        let Some(Negotiated::Transmission(ro)) = outcome else { panic!() };
        assert_eq!(ro.base_allocation, None);
        let (_, outcome) = ask(&b, &mut s, go("vol", &[])).await;
        let Some(Negotiated::Transmission(vol)) = outcome else { panic!() };
        assert_eq!(vol.base_allocation, Some(BASE_ALLOCATION_ID));
        assert!(!vol.strict_block_size);
        // A later SET that selects nothing clears the selection.
        let (r, _) = ask(&b, &mut s, meta(true, "vol", &[])).await;
        assert_eq!(r, vec![OptionReply::Ack]);
        assert_eq!(s.meta_export, None);
    }

    #[tokio::test]
    async fn unknown_option_and_abort() {
        let b = backend();
        let mut s = State::default();
        let (r, outcome) = ask(&b, &mut s, ClientOption::Unknown(NBD_OPT_STARTTLS)).await;
        assert!(outcome.is_none());
        assert!(matches!(r[..], [OptionReply::Error { code: NBD_REP_ERR_UNSUP, .. }]));
        let (r, outcome) = ask(&b, &mut s, ClientOption::Abort).await;
        assert_eq!(r, vec![OptionReply::Ack]);
        assert!(matches!(outcome, Some(Negotiated::Aborted)));
    }

    // Whole handshakes over an in-memory pipe.

    async fn start(
        client_flags: u32,
    ) -> (DuplexStream, tokio::task::JoinHandle<Result<Negotiated, ConnectionError>>) {
        let (mut client, mut server) = tokio::io::duplex(1 << 20);
        let task = tokio::spawn(async move { negotiate(&mut server, &backend()).await });
        let mut greeting = [0u8; GREETING_LEN];
        client.read_exact(&mut greeting).await.unwrap();
        assert_eq!(decode_greeting(&greeting), Ok(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES));
        client.write_all(&client_flags.to_be_bytes()).await.unwrap();
        (client, task)
    }

    async fn read_reply(client: &mut DuplexStream) -> (u32, OptionReply) {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        client.read_exact(&mut h).await.unwrap();
        let h = decode_option_reply_header(&h).unwrap();
        let mut payload = vec![0u8; h.length as usize];
        client.read_exact(&mut payload).await.unwrap();
        (h.option, decode_option_reply(h.reply_type, &payload).unwrap())
    }

    #[tokio::test]
    async fn clients_without_fixed_newstyle_are_refused() {
        for flags in [0, NBD_FLAG_C_NO_ZEROES, NBD_FLAG_C_FIXED_NEWSTYLE | 4] {
            let (_client, task) = start(flags).await;
            assert!(
                matches!(task.await.unwrap(), Err(ConnectionError::ClientFlags(f)) if f == flags)
            );
        }
    }

    #[tokio::test]
    async fn export_name_honours_no_zeroes() {
        for no_zeroes in [false, true] {
            let flags =
                NBD_FLAG_C_FIXED_NEWSTYLE | if no_zeroes { NBD_FLAG_C_NO_ZEROES } else { 0 };
            let (mut client, task) = start(flags).await;
            let mut opt = Vec::new();
            encode_option(&ClientOption::ExportName("vol".into()), &mut opt);
            client.write_all(&opt).await.unwrap();
            let Negotiated::Transmission(session) = task.await.unwrap().unwrap() else { panic!() };
            let mut reply = Vec::new();
            // The server's half is gone with the task: read to the end.
            client.read_to_end(&mut reply).await.unwrap();
            let expected = EXPORT_NAME_REPLY_LEN + if no_zeroes { 0 } else { EXPORT_NAME_ZEROES };
            assert_eq!(reply.len(), expected);
            assert_eq!(decode_export_name_reply(&reply), Ok((1 << 20, session.flags)));
        }
    }

    #[tokio::test]
    async fn export_name_for_unknown_export_closes() {
        let (mut client, task) = start(NBD_FLAG_C_FIXED_NEWSTYLE).await;
        let mut opt = Vec::new();
        encode_option(&ClientOption::ExportName("nope".into()), &mut opt);
        client.write_all(&opt).await.unwrap();
        assert!(
            matches!(task.await.unwrap(), Err(ConnectionError::UnknownExport(n)) if n == "nope")
        );
    }

    #[tokio::test]
    async fn oversized_and_malformed_options_are_refused_and_negotiation_goes_on() {
        let (mut client, task) = start(NBD_FLAG_C_FIXED_NEWSTYLE).await;
        // 100 KiB option: skipped and refused.
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&NBD_OPT_INFO.to_be_bytes());
        opt.extend_from_slice(&(100u32 << 10).to_be_bytes());
        opt.resize(opt.len() + (100 << 10), 0xaa);
        // LIST with a payload: invalid.
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&NBD_OPT_LIST.to_be_bytes());
        opt.extend_from_slice(&1u32.to_be_bytes());
        opt.push(0);
        encode_option(&ClientOption::StructuredReply, &mut opt);
        encode_option(&go("vol", &[]), &mut opt);
        client.write_all(&opt).await.unwrap();
        let (o, r) = read_reply(&mut client).await;
        assert_eq!(o, NBD_OPT_INFO);
        assert!(matches!(r, OptionReply::Error { code: NBD_REP_ERR_TOO_BIG, .. }));
        let (o, r) = read_reply(&mut client).await;
        assert_eq!(o, NBD_OPT_LIST);
        assert!(matches!(r, OptionReply::Error { code: NBD_REP_ERR_INVALID, .. }));
        assert_eq!(read_reply(&mut client).await, (NBD_OPT_STRUCTURED_REPLY, OptionReply::Ack));
        assert!(matches!(
            read_reply(&mut client).await.1,
            OptionReply::Info(InfoReply::Export { .. })
        ));
        assert_eq!(read_reply(&mut client).await, (NBD_OPT_GO, OptionReply::Ack));
        let Negotiated::Transmission(session) = task.await.unwrap().unwrap() else { panic!() };
        assert!(session.structured);
    }

    #[tokio::test]
    async fn oversized_export_name_and_bad_option_magic_close() {
        let (mut client, task) = start(NBD_FLAG_C_FIXED_NEWSTYLE).await;
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&NBD_OPT_EXPORT_NAME.to_be_bytes());
        opt.extend_from_slice(&u32::MAX.to_be_bytes());
        client.write_all(&opt).await.unwrap();
        assert!(matches!(task.await.unwrap(), Err(ConnectionError::OptionTooLarge { .. })));

        let (mut client, task) = start(NBD_FLAG_C_FIXED_NEWSTYLE).await;
        client.write_all(&[0u8; OPTION_HEADER_LEN]).await.unwrap();
        assert!(matches!(
            task.await.unwrap(),
            Err(ConnectionError::Malformed(CodecError::BadMagic { .. }))
        ));
    }
}
