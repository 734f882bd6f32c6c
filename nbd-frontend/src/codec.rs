//! The NBD wire format, as pure functions over byte slices: constants, the messages of the
//! fixed-newstyle handshake (greeting, client flags, options and option replies) and of the
//! transmission phase (request headers, simple replies, structured reply chunks).
//!
//! Nothing here does I/O or allocates on the word of the peer beyond the bytes it was handed,
//! so every decoder can be property-tested and fuzzed (`fuzz/fuzz_targets/nbd_decode.rs`).
//! **Invariant:** decoders return `Err(CodecError)` for every malformed input and never panic.
//! Encoders append to a `Vec<u8>`; each encoder has a decoder and a round-trip property test.
//! The reference is NetworkBlockDevice/nbd `doc/proto.md`; names follow it.

use bytes::{BufMut, Bytes};

// ---------------------------------------------------------------------------------------------
// Magic numbers and fixed sizes.

/// First 8 bytes the server sends: "NBDMAGIC".
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// Newstyle negotiation magic, sent by the server after NBDMAGIC and by the client before
/// every option: "IHAVEOPT".
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// NBDMAGIC, IHAVEOPT, 16-bit handshake flags.
pub const GREETING_LEN: usize = 18;
pub const CLIENT_FLAGS_LEN: usize = 4;
/// IHAVEOPT, 32-bit option, 32-bit payload length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Magic, 32-bit option, 32-bit reply type, 32-bit payload length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Export size and transmission flags sent after NBD_OPT_EXPORT_NAME (zero padding apart).
pub const EXPORT_NAME_REPLY_LEN: usize = 10;
/// Padding after the NBD_OPT_EXPORT_NAME reply, unless both sides agreed on NO_ZEROES.
pub const EXPORT_NAME_ZEROES: usize = 124;
/// Magic, flags, type, cookie, offset, length.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Magic, error, cookie.
pub const SIMPLE_REPLY_HEADER_LEN: usize = 16;
/// Magic, flags, type, cookie, payload length.
pub const STRUCTURED_REPLY_HEADER_LEN: usize = 20;
/// Longest export name or metadata query accepted (the spec's NBD_MAX_STRING).
pub const MAX_STRING_LEN: usize = 4096;

// ---------------------------------------------------------------------------------------------
// Handshake flags.

/// Server handshake flag: the server speaks fixed newstyle.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: the server can omit the 124 zero bytes after EXPORT_NAME.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: omit the 124 zero bytes after EXPORT_NAME.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---------------------------------------------------------------------------------------------
// Options (client to server) and option replies.

pub const NBD_OPT_EXPORT_NAME: u32 = 1;
pub const NBD_OPT_ABORT: u32 = 2;
pub const NBD_OPT_LIST: u32 = 3;
pub const NBD_OPT_STARTTLS: u32 = 5;
pub const NBD_OPT_INFO: u32 = 6;
pub const NBD_OPT_GO: u32 = 7;
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
pub const NBD_OPT_EXTENDED_HEADERS: u32 = 11;

pub const NBD_REP_ACK: u32 = 1;
pub const NBD_REP_SERVER: u32 = 2;
pub const NBD_REP_INFO: u32 = 3;
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Error reply types have bit 31 set.
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR | 2;
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_FLAG_ERROR | 4;
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR | 5;
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR | 7;
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR | 8;
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR | 9;

/// Information types of NBD_OPT_INFO / NBD_OPT_GO and NBD_REP_INFO.
pub const NBD_INFO_EXPORT: u16 = 0;
pub const NBD_INFO_NAME: u16 = 1;
pub const NBD_INFO_DESCRIPTION: u16 = 2;
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------------------------
// Transmission.

/// Transmission flags, sent with the export's size.
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const NBD_FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Command flags, per request.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flag: last chunk of the reply.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;

/// Structured reply chunk types.
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Error chunk types have bit 15 set.
pub const NBD_REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// The one metadata context this server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation` status flags.
pub const NBD_STATE_HOLE: u32 = 1 << 0;
pub const NBD_STATE_ZERO: u32 = 1 << 1;

/// Error values of replies. The spec fixes these numbers; they happen to equal Linux errnos.
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

// ---------------------------------------------------------------------------------------------
// Errors.

/// Why bytes could not be decoded. `what` names the message or field being decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("{what}: truncated, needs {need} bytes but {have} remain")]
    Truncated { what: &'static str, need: usize, have: usize },
    #[error("{what}: {extra} unexpected trailing bytes")]
    TrailingBytes { what: &'static str, extra: usize },
    #[error("{what}: bad magic {found:#x}")]
    BadMagic { what: &'static str, found: u64 },
    #[error("{what}: not valid UTF-8")]
    InvalidUtf8 { what: &'static str },
    #[error("{what}: {len} bytes, more than the limit of {max}")]
    StringTooLong { what: &'static str, len: usize, max: usize },
    #[error("unknown option reply type {0:#x}")]
    UnknownReplyType(u32),
    #[error("unknown info type {0}")]
    UnknownInfoType(u16),
    #[error("unknown structured reply chunk type {0:#x}")]
    UnknownChunkType(u16),
}

/// A cursor over a byte slice whose reads fail instead of panicking.
struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if self.buf.len() < n {
            return Err(CodecError::Truncated { what: self.what, need: n, have: self.buf.len() });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16, CodecError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, CodecError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Everything not read yet.
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    /// A UTF-8 string of `len` bytes, at most `max` long.
    fn string(&mut self, len: usize, max: usize) -> Result<String, CodecError> {
        if len > max {
            return Err(CodecError::StringTooLong { what: self.what, len, max });
        }
        utf8(self.take(len)?, self.what)
    }

    /// A 32-bit length followed by that many bytes of UTF-8, as export names and queries are.
    fn string32(&mut self) -> Result<String, CodecError> {
        let len = self.u32()? as usize;
        self.string(len, MAX_STRING_LEN)
    }

    /// Fails if bytes are left over: every length in the protocol must be exact.
    fn finish(self) -> Result<(), CodecError> {
        match self.buf.len() {
            0 => Ok(()),
            extra => Err(CodecError::TrailingBytes { what: self.what, extra }),
        }
    }
}

fn utf8(bytes: &[u8], what: &'static str) -> Result<String, CodecError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| CodecError::InvalidUtf8 { what })
}

/// Appends a 32-bit length and the string.
fn put_string32(out: &mut Vec<u8>, s: &str) {
    out.put_u32(s.len() as u32);
    out.put_slice(s.as_bytes());
}

/// `s` cut to at most `max` bytes, on a character boundary (error messages have 16-bit lengths).
fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---------------------------------------------------------------------------------------------
// Handshake: greeting and client flags.

/// The server's first message: NBDMAGIC, IHAVEOPT and the handshake flags.
pub fn encode_greeting(handshake_flags: u16, out: &mut Vec<u8>) {
    out.put_u64(NBDMAGIC);
    out.put_u64(IHAVEOPT);
    out.put_u16(handshake_flags);
}

/// The handshake flags of a server greeting (for clients and tests).
pub fn decode_greeting(buf: &[u8]) -> Result<u16, CodecError> {
    let mut r = Reader::new(buf, "greeting");
    let magic = r.u64()?;
    if magic != NBDMAGIC {
        return Err(CodecError::BadMagic { what: "greeting", found: magic });
    }
    let magic = r.u64()?;
    if magic != IHAVEOPT {
        return Err(CodecError::BadMagic { what: "greeting", found: magic });
    }
    let flags = r.u16()?;
    r.finish()?;
    Ok(flags)
}

/// The client's 32-bit flags, which answer the greeting. Which flags are acceptable is the
/// handshake's decision, not the codec's.
pub fn decode_client_flags(buf: &[u8]) -> Result<u32, CodecError> {
    let mut r = Reader::new(buf, "client flags");
    let flags = r.u32()?;
    r.finish()?;
    Ok(flags)
}

// ---------------------------------------------------------------------------------------------
// Options.

/// The fixed part of a client option; `length` bytes of payload follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

/// Decodes the 16-byte option header at the start of `buf` (trailing bytes are ignored: the
/// payload usually follows). Fails on a short buffer or a magic other than IHAVEOPT.
pub fn decode_option_header(buf: &[u8]) -> Result<OptionHeader, CodecError> {
    let mut r = Reader::new(buf, "option header");
    let magic = r.u64()?;
    if magic != IHAVEOPT {
        return Err(CodecError::BadMagic { what: "option header", found: magic });
    }
    Ok(OptionHeader { option: r.u32()?, length: r.u32()? })
}

/// NBD_OPT_INFO and NBD_OPT_GO: an export name and the information types asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub info: Vec<u16>,
}

/// NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT: an export and the queries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

/// A decoded client option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    Info(InfoRequest),
    Go(InfoRequest),
    StructuredReply,
    ListMetaContext(MetaContextRequest),
    SetMetaContext(MetaContextRequest),
    /// An option this codec does not parse (STARTTLS, EXTENDED_HEADERS, ...); the server
    /// answers NBD_REP_ERR_UNSUP. Its payload is not kept.
    Unknown(u32),
}

impl ClientOption {
    /// The option's number on the wire.
    pub fn code(&self) -> u32 {
        match self {
            ClientOption::ExportName(_) => NBD_OPT_EXPORT_NAME,
            ClientOption::Abort => NBD_OPT_ABORT,
            ClientOption::List => NBD_OPT_LIST,
            ClientOption::Info(_) => NBD_OPT_INFO,
            ClientOption::Go(_) => NBD_OPT_GO,
            ClientOption::StructuredReply => NBD_OPT_STRUCTURED_REPLY,
            ClientOption::ListMetaContext(_) => NBD_OPT_LIST_META_CONTEXT,
            ClientOption::SetMetaContext(_) => NBD_OPT_SET_META_CONTEXT,
            ClientOption::Unknown(code) => *code,
        }
    }
}

/// Decodes the payload of option `option`. Lengths must add up exactly: a short payload or
/// trailing bytes are errors (the server answers NBD_REP_ERR_INVALID).
pub fn decode_option(option: u32, payload: &[u8]) -> Result<ClientOption, CodecError> {
    match option {
        NBD_OPT_EXPORT_NAME => {
            let mut r = Reader::new(payload, "NBD_OPT_EXPORT_NAME");
            let len = r.remaining();
            Ok(ClientOption::ExportName(r.string(len, MAX_STRING_LEN)?))
        }
        NBD_OPT_ABORT => no_payload(payload, "NBD_OPT_ABORT").map(|()| ClientOption::Abort),
        NBD_OPT_LIST => no_payload(payload, "NBD_OPT_LIST").map(|()| ClientOption::List),
        NBD_OPT_STRUCTURED_REPLY => {
            no_payload(payload, "NBD_OPT_STRUCTURED_REPLY").map(|()| ClientOption::StructuredReply)
        }
        NBD_OPT_INFO => decode_info_request(payload, "NBD_OPT_INFO").map(ClientOption::Info),
        NBD_OPT_GO => decode_info_request(payload, "NBD_OPT_GO").map(ClientOption::Go),
        NBD_OPT_LIST_META_CONTEXT => {
            decode_meta_context_request(payload, "NBD_OPT_LIST_META_CONTEXT")
                .map(ClientOption::ListMetaContext)
        }
        NBD_OPT_SET_META_CONTEXT => {
            decode_meta_context_request(payload, "NBD_OPT_SET_META_CONTEXT")
                .map(ClientOption::SetMetaContext)
        }
        other => Ok(ClientOption::Unknown(other)),
    }
}

fn no_payload(payload: &[u8], what: &'static str) -> Result<(), CodecError> {
    Reader::new(payload, what).finish()
}

/// 32-bit name length, name, 16-bit count, count 16-bit information types.
fn decode_info_request(payload: &[u8], what: &'static str) -> Result<InfoRequest, CodecError> {
    let mut r = Reader::new(payload, what);
    let name = r.string32()?;
    let count = r.u16()? as usize;
    // At most 2^16 entries of 2 bytes, and only after the bytes are known to be there.
    let types = r.take(count * 2)?;
    r.finish()?;
    let info = types.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
    Ok(InfoRequest { name, info })
}

/// 32-bit export name length, name, 32-bit query count, each query as length and string.
fn decode_meta_context_request(
    payload: &[u8],
    what: &'static str,
) -> Result<MetaContextRequest, CodecError> {
    let mut r = Reader::new(payload, what);
    let export = r.string32()?;
    let count = r.u32()? as usize;
    // Each query takes at least its 4-byte length: never reserve more than the bytes allow.
    let mut queries = Vec::with_capacity(count.min(r.remaining() / 4));
    for _ in 0..count {
        queries.push(r.string32()?);
    }
    r.finish()?;
    Ok(MetaContextRequest { export, queries })
}

/// Encodes a whole option, header and payload, as a client sends it (used by tests and the
/// test client; `Unknown` options are sent without payload).
pub fn encode_option(opt: &ClientOption, out: &mut Vec<u8>) {
    let mut payload = Vec::new();
    match opt {
        ClientOption::ExportName(name) => payload.put_slice(name.as_bytes()),
        ClientOption::Abort
        | ClientOption::List
        | ClientOption::StructuredReply
        | ClientOption::Unknown(_) => {}
        ClientOption::Info(req) | ClientOption::Go(req) => {
            put_string32(&mut payload, &req.name);
            payload.put_u16(req.info.len() as u16);
            for &t in &req.info {
                payload.put_u16(t);
            }
        }
        ClientOption::ListMetaContext(req) | ClientOption::SetMetaContext(req) => {
            put_string32(&mut payload, &req.export);
            payload.put_u32(req.queries.len() as u32);
            for q in &req.queries {
                put_string32(&mut payload, q);
            }
        }
    }
    out.put_u64(IHAVEOPT);
    out.put_u32(opt.code());
    out.put_u32(payload.len() as u32);
    out.put_slice(&payload);
}

// ---------------------------------------------------------------------------------------------
// Option replies.

/// One piece of information in an NBD_REP_INFO reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InfoReply {
    /// NBD_INFO_EXPORT: size in bytes and transmission flags. Always sent.
    Export {
        size: u64,
        flags: u16,
    },
    Name(String),
    Description(String),
    /// NBD_INFO_BLOCK_SIZE: minimum, preferred and maximum block sizes.
    BlockSize {
        min: u32,
        preferred: u32,
        max: u32,
    },
}

/// An option reply's payload, by reply type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OptionReply {
    Ack,
    /// NBD_REP_SERVER: an export's name and free text for humans.
    Server {
        name: String,
        details: String,
    },
    Info(InfoReply),
    /// NBD_REP_META_CONTEXT: a context's id (for SET) and name.
    MetaContext {
        id: u32,
        name: String,
    },
    /// An NBD_REP_ERR_* code (bit 31 set) and a message for humans.
    Error {
        code: u32,
        message: String,
    },
}

impl OptionReply {
    /// The reply type on the wire.
    pub fn reply_type(&self) -> u32 {
        match self {
            OptionReply::Ack => NBD_REP_ACK,
            OptionReply::Server { .. } => NBD_REP_SERVER,
            OptionReply::Info(_) => NBD_REP_INFO,
            OptionReply::MetaContext { .. } => NBD_REP_META_CONTEXT,
            OptionReply::Error { code, .. } => *code,
        }
    }

    /// An error reply; `code` is one of the NBD_REP_ERR_* constants.
    pub fn error(code: u32, message: impl Into<String>) -> Self {
        OptionReply::Error { code, message: message.into() }
    }
}

/// The fixed part of an option reply; `length` bytes of payload follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub length: u32,
}

/// Appends the reply to option `option`: header and payload.
pub fn encode_option_reply(option: u32, reply: &OptionReply, out: &mut Vec<u8>) {
    let mut payload = Vec::new();
    match reply {
        OptionReply::Ack => {}
        OptionReply::Server { name, details } => {
            put_string32(&mut payload, name);
            payload.put_slice(details.as_bytes());
        }
        OptionReply::Info(info) => match info {
            InfoReply::Export { size, flags } => {
                payload.put_u16(NBD_INFO_EXPORT);
                payload.put_u64(*size);
                payload.put_u16(*flags);
            }
            InfoReply::Name(name) => {
                payload.put_u16(NBD_INFO_NAME);
                payload.put_slice(name.as_bytes());
            }
            InfoReply::Description(text) => {
                payload.put_u16(NBD_INFO_DESCRIPTION);
                payload.put_slice(text.as_bytes());
            }
            InfoReply::BlockSize { min, preferred, max } => {
                payload.put_u16(NBD_INFO_BLOCK_SIZE);
                payload.put_u32(*min);
                payload.put_u32(*preferred);
                payload.put_u32(*max);
            }
        },
        OptionReply::MetaContext { id, name } => {
            payload.put_u32(*id);
            payload.put_slice(name.as_bytes());
        }
        OptionReply::Error { message, .. } => payload.put_slice(message.as_bytes()),
    }
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply.reply_type());
    out.put_u32(payload.len() as u32);
    out.put_slice(&payload);
}

/// Decodes the 20-byte option reply header at the start of `buf`.
pub fn decode_option_reply_header(buf: &[u8]) -> Result<OptionReplyHeader, CodecError> {
    let mut r = Reader::new(buf, "option reply header");
    let magic = r.u64()?;
    if magic != OPTION_REPLY_MAGIC {
        return Err(CodecError::BadMagic { what: "option reply header", found: magic });
    }
    Ok(OptionReplyHeader { option: r.u32()?, reply_type: r.u32()?, length: r.u32()? })
}

/// Decodes an option reply's payload given its type (for clients and tests).
pub fn decode_option_reply(reply_type: u32, payload: &[u8]) -> Result<OptionReply, CodecError> {
    if reply_type & NBD_REP_FLAG_ERROR != 0 {
        let message = utf8(payload, "option error reply")?;
        return Ok(OptionReply::Error { code: reply_type, message });
    }
    match reply_type {
        NBD_REP_ACK => no_payload(payload, "NBD_REP_ACK").map(|()| OptionReply::Ack),
        NBD_REP_SERVER => {
            let mut r = Reader::new(payload, "NBD_REP_SERVER");
            let name = r.string32()?;
            let details = utf8(r.rest(), "NBD_REP_SERVER")?;
            Ok(OptionReply::Server { name, details })
        }
        NBD_REP_INFO => {
            let mut r = Reader::new(payload, "NBD_REP_INFO");
            let info = match r.u16()? {
                NBD_INFO_EXPORT => {
                    let (size, flags) = (r.u64()?, r.u16()?);
                    r.finish()?;
                    InfoReply::Export { size, flags }
                }
                NBD_INFO_NAME => InfoReply::Name(utf8(r.rest(), "NBD_INFO_NAME")?),
                NBD_INFO_DESCRIPTION => {
                    InfoReply::Description(utf8(r.rest(), "NBD_INFO_DESCRIPTION")?)
                }
                NBD_INFO_BLOCK_SIZE => {
                    let (min, preferred, max) = (r.u32()?, r.u32()?, r.u32()?);
                    r.finish()?;
                    InfoReply::BlockSize { min, preferred, max }
                }
                other => return Err(CodecError::UnknownInfoType(other)),
            };
            Ok(OptionReply::Info(info))
        }
        NBD_REP_META_CONTEXT => {
            let mut r = Reader::new(payload, "NBD_REP_META_CONTEXT");
            let id = r.u32()?;
            let name = utf8(r.rest(), "NBD_REP_META_CONTEXT")?;
            Ok(OptionReply::MetaContext { id, name })
        }
        other => Err(CodecError::UnknownReplyType(other)),
    }
}

/// The reply to NBD_OPT_EXPORT_NAME: size, transmission flags and, unless NO_ZEROES was
/// agreed, 124 zero bytes.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool, out: &mut Vec<u8>) {
    out.put_u64(size);
    out.put_u16(flags);
    if !no_zeroes {
        out.put_bytes(0, EXPORT_NAME_ZEROES);
    }
}

/// Size and transmission flags from the first 10 bytes of an NBD_OPT_EXPORT_NAME reply.
pub fn decode_export_name_reply(buf: &[u8]) -> Result<(u64, u16), CodecError> {
    let mut r = Reader::new(buf, "export name reply");
    Ok((r.u64()?, r.u16()?))
}

// ---------------------------------------------------------------------------------------------
// Requests.

/// Transmission commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    /// A command number this server does not know; answered with EINVAL.
    Unknown(u16),
}

impl From<u16> for Command {
    fn from(v: u16) -> Self {
        match v {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }
}

impl From<Command> for u16 {
    fn from(c: Command) -> u16 {
        match c {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disc => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::Cache => 5,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
            Command::Unknown(other) => other,
        }
    }
}

/// A transmission request header. For NBD_CMD_WRITE, `length` bytes of data follow it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: Command,
    /// Opaque to the server ("handle" in older versions of the spec); echoed in replies.
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// Decodes the 28-byte request header at the start of `buf` (a WRITE's payload may follow).
/// Fails on a short buffer or a bad magic, after which the stream can no longer be framed.
pub fn decode_request_header(buf: &[u8]) -> Result<RequestHeader, CodecError> {
    let mut r = Reader::new(buf, "request header");
    let magic = r.u32()?;
    if magic != REQUEST_MAGIC {
        return Err(CodecError::BadMagic { what: "request header", found: magic.into() });
    }
    Ok(RequestHeader {
        flags: r.u16()?,
        command: Command::from(r.u16()?),
        cookie: r.u64()?,
        offset: r.u64()?,
        length: r.u32()?,
    })
}

/// Appends a request header, as a client sends it.
pub fn encode_request_header(req: &RequestHeader, out: &mut Vec<u8>) {
    out.put_u32(REQUEST_MAGIC);
    out.put_u16(req.flags);
    out.put_u16(req.command.into());
    out.put_u64(req.cookie);
    out.put_u64(req.offset);
    out.put_u32(req.length);
}

// ---------------------------------------------------------------------------------------------
// Simple replies.

/// A simple reply's header; for a successful READ, the data follows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

/// Appends a simple reply header.
pub fn encode_simple_reply(reply: &SimpleReply, out: &mut Vec<u8>) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(reply.error);
    out.put_u64(reply.cookie);
}

/// Decodes the 16-byte simple reply header at the start of `buf`.
pub fn decode_simple_reply(buf: &[u8]) -> Result<SimpleReply, CodecError> {
    let mut r = Reader::new(buf, "simple reply");
    let magic = r.u32()?;
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(CodecError::BadMagic { what: "simple reply", found: magic.into() });
    }
    Ok(SimpleReply { error: r.u32()?, cookie: r.u64()? })
}

// ---------------------------------------------------------------------------------------------
// Structured replies.

/// One descriptor of an NBD_REPLY_TYPE_BLOCK_STATUS chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockDescriptor {
    pub length: u32,
    pub flags: u32,
}

/// A structured reply chunk's payload, by chunk type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplyChunk {
    None,
    /// Data read at `offset`; must carry at least one byte.
    OffsetData {
        offset: u64,
        data: Bytes,
    },
    /// `length` bytes at `offset` read as zeros.
    OffsetHole {
        offset: u64,
        length: u32,
    },
    /// Extents of one metadata context; at least one descriptor.
    BlockStatus {
        context_id: u32,
        descriptors: Vec<BlockDescriptor>,
    },
    Error {
        error: u32,
        message: String,
    },
    ErrorOffset {
        error: u32,
        message: String,
        offset: u64,
    },
}

impl ReplyChunk {
    /// The chunk type on the wire.
    pub fn chunk_type(&self) -> u16 {
        match self {
            ReplyChunk::None => NBD_REPLY_TYPE_NONE,
            ReplyChunk::OffsetData { .. } => NBD_REPLY_TYPE_OFFSET_DATA,
            ReplyChunk::OffsetHole { .. } => NBD_REPLY_TYPE_OFFSET_HOLE,
            ReplyChunk::BlockStatus { .. } => NBD_REPLY_TYPE_BLOCK_STATUS,
            ReplyChunk::Error { .. } => NBD_REPLY_TYPE_ERROR,
            ReplyChunk::ErrorOffset { .. } => NBD_REPLY_TYPE_ERROR_OFFSET,
        }
    }
}

/// The fixed part of a structured reply chunk; `length` bytes of payload follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StructuredReplyHeader {
    pub flags: u16,
    pub chunk_type: u16,
    pub cookie: u64,
    pub length: u32,
}

/// Appends a structured reply chunk header.
pub fn encode_structured_reply_header(h: &StructuredReplyHeader, out: &mut Vec<u8>) {
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(h.flags);
    out.put_u16(h.chunk_type);
    out.put_u64(h.cookie);
    out.put_u32(h.length);
}

/// Appends the header and offset of an NBD_REPLY_TYPE_OFFSET_DATA chunk carrying `data_len`
/// bytes, without the data: the server writes the data buffer after it, uncopied.
pub fn encode_offset_data_header(
    flags: u16,
    cookie: u64,
    offset: u64,
    data_len: u32,
    out: &mut Vec<u8>,
) {
    let h = StructuredReplyHeader {
        flags,
        chunk_type: NBD_REPLY_TYPE_OFFSET_DATA,
        cookie,
        length: data_len.saturating_add(8),
    };
    encode_structured_reply_header(&h, out);
    out.put_u64(offset);
}

/// Appends a whole structured reply chunk: header and payload (data included).
pub fn encode_reply_chunk(flags: u16, cookie: u64, chunk: &ReplyChunk, out: &mut Vec<u8>) {
    let mut payload = Vec::new();
    match chunk {
        ReplyChunk::None => {}
        ReplyChunk::OffsetData { offset, data } => {
            payload.put_u64(*offset);
            payload.put_slice(data);
        }
        ReplyChunk::OffsetHole { offset, length } => {
            payload.put_u64(*offset);
            payload.put_u32(*length);
        }
        ReplyChunk::BlockStatus { context_id, descriptors } => {
            payload.put_u32(*context_id);
            for d in descriptors {
                payload.put_u32(d.length);
                payload.put_u32(d.flags);
            }
        }
        ReplyChunk::Error { error, message } => put_error(&mut payload, *error, message),
        ReplyChunk::ErrorOffset { error, message, offset } => {
            put_error(&mut payload, *error, message);
            payload.put_u64(*offset);
        }
    }
    let h = StructuredReplyHeader {
        flags,
        chunk_type: chunk.chunk_type(),
        cookie,
        length: payload.len() as u32,
    };
    encode_structured_reply_header(&h, out);
    out.put_slice(&payload);
}

/// Error number, 16-bit message length, message (cut to fit the length field).
fn put_error(out: &mut Vec<u8>, error: u32, message: &str) {
    let message = truncate_str(message, u16::MAX as usize);
    out.put_u32(error);
    out.put_u16(message.len() as u16);
    out.put_slice(message.as_bytes());
}

/// Decodes the 20-byte structured reply chunk header at the start of `buf`.
pub fn decode_structured_reply_header(buf: &[u8]) -> Result<StructuredReplyHeader, CodecError> {
    let mut r = Reader::new(buf, "structured reply header");
    let magic = r.u32()?;
    if magic != STRUCTURED_REPLY_MAGIC {
        return Err(CodecError::BadMagic { what: "structured reply header", found: magic.into() });
    }
    Ok(StructuredReplyHeader {
        flags: r.u16()?,
        chunk_type: r.u16()?,
        cookie: r.u64()?,
        length: r.u32()?,
    })
}

/// Decodes a structured reply chunk's payload given its type, checking the lengths the spec
/// imposes on each type.
pub fn decode_reply_chunk(chunk_type: u16, payload: &[u8]) -> Result<ReplyChunk, CodecError> {
    match chunk_type {
        NBD_REPLY_TYPE_NONE => {
            no_payload(payload, "NBD_REPLY_TYPE_NONE").map(|()| ReplyChunk::None)
        }
        NBD_REPLY_TYPE_OFFSET_DATA => {
            let mut r = Reader::new(payload, "NBD_REPLY_TYPE_OFFSET_DATA");
            let offset = r.u64()?;
            if r.remaining() == 0 {
                // The spec requires at least one byte of data.
                return Err(CodecError::Truncated { what: r.what, need: 1, have: 0 });
            }
            Ok(ReplyChunk::OffsetData { offset, data: Bytes::copy_from_slice(r.rest()) })
        }
        NBD_REPLY_TYPE_OFFSET_HOLE => {
            let mut r = Reader::new(payload, "NBD_REPLY_TYPE_OFFSET_HOLE");
            let (offset, length) = (r.u64()?, r.u32()?);
            r.finish()?;
            Ok(ReplyChunk::OffsetHole { offset, length })
        }
        NBD_REPLY_TYPE_BLOCK_STATUS => {
            let mut r = Reader::new(payload, "NBD_REPLY_TYPE_BLOCK_STATUS");
            let context_id = r.u32()?;
            let mut descriptors = Vec::with_capacity(r.remaining() / 8);
            // At least one descriptor, then as many as there are whole 8-byte groups.
            loop {
                descriptors.push(BlockDescriptor { length: r.u32()?, flags: r.u32()? });
                if r.remaining() == 0 {
                    break;
                }
            }
            Ok(ReplyChunk::BlockStatus { context_id, descriptors })
        }
        NBD_REPLY_TYPE_ERROR => {
            let mut r = Reader::new(payload, "NBD_REPLY_TYPE_ERROR");
            let (error, message) = decode_error_fields(&mut r)?;
            r.finish()?;
            Ok(ReplyChunk::Error { error, message })
        }
        NBD_REPLY_TYPE_ERROR_OFFSET => {
            let mut r = Reader::new(payload, "NBD_REPLY_TYPE_ERROR_OFFSET");
            let (error, message) = decode_error_fields(&mut r)?;
            let offset = r.u64()?;
            r.finish()?;
            Ok(ReplyChunk::ErrorOffset { error, message, offset })
        }
        other => Err(CodecError::UnknownChunkType(other)),
    }
}

fn decode_error_fields(r: &mut Reader<'_>) -> Result<(u32, String), CodecError> {
    let error = r.u32()?;
    let len = r.u16()? as usize;
    let message = r.string(len, u16::MAX as usize)?;
    Ok((error, message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name() -> impl Strategy<Value = String> {
        // Any Unicode, including the empty (default) export name.
        ".{0,40}"
    }

    fn info_request() -> impl Strategy<Value = InfoRequest> {
        (name(), proptest::collection::vec(any::<u16>(), 0..8))
            .prop_map(|(name, info)| InfoRequest { name, info })
    }

    fn meta_request() -> impl Strategy<Value = MetaContextRequest> {
        (name(), proptest::collection::vec(name(), 0..6))
            .prop_map(|(export, queries)| MetaContextRequest { export, queries })
    }

    fn client_option() -> impl Strategy<Value = ClientOption> {
        prop_oneof![
            name().prop_map(ClientOption::ExportName),
            Just(ClientOption::Abort),
            Just(ClientOption::List),
            Just(ClientOption::StructuredReply),
            info_request().prop_map(ClientOption::Info),
            info_request().prop_map(ClientOption::Go),
            meta_request().prop_map(ClientOption::ListMetaContext),
            meta_request().prop_map(ClientOption::SetMetaContext),
            // Codes the codec does not parse stay Unknown.
            (11u32..).prop_map(ClientOption::Unknown),
            Just(ClientOption::Unknown(NBD_OPT_STARTTLS)),
            Just(ClientOption::Unknown(4)),
        ]
    }

    fn option_reply() -> impl Strategy<Value = OptionReply> {
        prop_oneof![
            Just(OptionReply::Ack),
            (name(), name()).prop_map(|(name, details)| OptionReply::Server { name, details }),
            (any::<u64>(), any::<u16>())
                .prop_map(|(size, flags)| OptionReply::Info(InfoReply::Export { size, flags })),
            name().prop_map(|n| OptionReply::Info(InfoReply::Name(n))),
            name().prop_map(|d| OptionReply::Info(InfoReply::Description(d))),
            (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(min, preferred, max)| {
                OptionReply::Info(InfoReply::BlockSize { min, preferred, max })
            }),
            (any::<u32>(), name()).prop_map(|(id, name)| OptionReply::MetaContext { id, name }),
            (any::<u32>(), name()).prop_map(|(c, message)| OptionReply::Error {
                code: c | NBD_REP_FLAG_ERROR,
                message
            }),
        ]
    }

    fn request() -> impl Strategy<Value = RequestHeader> {
        (any::<u16>(), any::<u16>(), any::<u64>(), any::<u64>(), any::<u32>()).prop_map(
            |(flags, command, cookie, offset, length)| RequestHeader {
                flags,
                command: Command::from(command),
                cookie,
                offset,
                length,
            },
        )
    }

    fn reply_chunk() -> impl Strategy<Value = ReplyChunk> {
        let descriptor = (any::<u32>(), any::<u32>())
            .prop_map(|(length, flags)| BlockDescriptor { length, flags });
        prop_oneof![
            Just(ReplyChunk::None),
            (any::<u64>(), proptest::collection::vec(any::<u8>(), 1..64))
                .prop_map(|(offset, data)| ReplyChunk::OffsetData { offset, data: data.into() }),
            (any::<u64>(), any::<u32>())
                .prop_map(|(offset, length)| ReplyChunk::OffsetHole { offset, length }),
            (any::<u32>(), proptest::collection::vec(descriptor, 1..10)).prop_map(
                |(context_id, descriptors)| ReplyChunk::BlockStatus { context_id, descriptors }
            ),
            (any::<u32>(), name())
                .prop_map(|(error, message)| ReplyChunk::Error { error, message }),
            (any::<u32>(), name(), any::<u64>()).prop_map(|(error, message, offset)| {
                ReplyChunk::ErrorOffset { error, message, offset }
            }),
        ]
    }

    proptest! {
        #[test]
        fn option_round_trip(opt in client_option()) {
            let mut buf = Vec::new();
            encode_option(&opt, &mut buf);
            let h = decode_option_header(&buf).unwrap();
            prop_assert_eq!(h.option, opt.code());
            prop_assert_eq!(h.length as usize, buf.len() - OPTION_HEADER_LEN);
            prop_assert_eq!(decode_option(h.option, &buf[OPTION_HEADER_LEN..]).unwrap(), opt);
        }

        #[test]
        fn option_reply_round_trip(option in any::<u32>(), reply in option_reply()) {
            let mut buf = Vec::new();
            encode_option_reply(option, &reply, &mut buf);
            let h = decode_option_reply_header(&buf).unwrap();
            prop_assert_eq!(h.option, option);
            prop_assert_eq!(h.length as usize, buf.len() - OPTION_REPLY_HEADER_LEN);
            let back = decode_option_reply(h.reply_type, &buf[OPTION_REPLY_HEADER_LEN..]).unwrap();
            prop_assert_eq!(back, reply);
        }

        #[test]
        fn request_round_trip(req in request()) {
            let mut buf = Vec::new();
            encode_request_header(&req, &mut buf);
            prop_assert_eq!(buf.len(), REQUEST_HEADER_LEN);
            prop_assert_eq!(decode_request_header(&buf).unwrap(), req);
        }

        #[test]
        fn simple_reply_round_trip(error in any::<u32>(), cookie in any::<u64>()) {
            let reply = SimpleReply { error, cookie };
            let mut buf = Vec::new();
            encode_simple_reply(&reply, &mut buf);
            prop_assert_eq!(buf.len(), SIMPLE_REPLY_HEADER_LEN);
            prop_assert_eq!(decode_simple_reply(&buf).unwrap(), reply);
        }

        #[test]
        fn reply_chunk_round_trip(
            flags in any::<u16>(),
            cookie in any::<u64>(),
            chunk in reply_chunk(),
        ) {
            let mut buf = Vec::new();
            encode_reply_chunk(flags, cookie, &chunk, &mut buf);
            let h = decode_structured_reply_header(&buf).unwrap();
            prop_assert_eq!((h.flags, h.chunk_type, h.cookie), (flags, chunk.chunk_type(), cookie));
            prop_assert_eq!(h.length as usize, buf.len() - STRUCTURED_REPLY_HEADER_LEN);
            let payload = &buf[STRUCTURED_REPLY_HEADER_LEN..];
            let back = decode_reply_chunk(h.chunk_type, payload).unwrap();
            prop_assert_eq!(back, chunk);
        }

        #[test]
        fn offset_data_header_matches_full_chunk(
            flags in any::<u16>(), cookie in any::<u64>(), offset in any::<u64>(),
            data in proptest::collection::vec(any::<u8>(), 1..64),
        ) {
            let mut whole = Vec::new();
            let chunk = ReplyChunk::OffsetData { offset, data: data.clone().into() };
            encode_reply_chunk(flags, cookie, &chunk, &mut whole);
            let mut split = Vec::new();
            encode_offset_data_header(flags, cookie, offset, data.len() as u32, &mut split);
            split.extend_from_slice(&data);
            prop_assert_eq!(whole, split);
        }

        /// The fuzz target's property, run on every `cargo test`: no input makes a decoder
        /// panic, whatever option, reply or chunk type it is decoded as.
        #[test]
        fn decoders_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..256),
            code in prop_oneof![0u32..16, any::<u32>()],
        ) {
            let _ = decode_greeting(&bytes);
            let _ = decode_client_flags(&bytes);
            let _ = decode_option_header(&bytes);
            let _ = decode_option(code, &bytes);
            let _ = decode_option_reply_header(&bytes);
            let _ = decode_option_reply(code, &bytes);
            let _ = decode_option_reply(code | NBD_REP_FLAG_ERROR, &bytes);
            let _ = decode_export_name_reply(&bytes);
            let _ = decode_request_header(&bytes);
            let _ = decode_simple_reply(&bytes);
            let _ = decode_structured_reply_header(&bytes);
            let _ = decode_reply_chunk(code as u16, &bytes);
            let _ = decode_reply_chunk(NBD_REPLY_TYPE_ERROR_OFFSET, &bytes);
        }

        /// Whatever decodes encodes back to the same bytes: one encoding per message, so the
        /// decoder cannot have skipped or invented anything.
        #[test]
        fn decoded_messages_encode_back_to_their_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
            code in 0u32..16,
        ) {
            match decode_option(code, &bytes) {
                Ok(ClientOption::Unknown(c)) => prop_assert_eq!(c, code),
                Ok(option) => {
                    let mut again = Vec::new();
                    encode_option(&option, &mut again);
                    prop_assert_eq!(&again[OPTION_HEADER_LEN..], &bytes[..]);
                }
                Err(_) => {}
            }
            let mut framed = REQUEST_MAGIC.to_be_bytes().to_vec();
            framed.extend_from_slice(&bytes);
            if let Ok(req) = decode_request_header(&framed) {
                let mut again = Vec::new();
                encode_request_header(&req, &mut again);
                prop_assert_eq!(&again[..], &framed[..REQUEST_HEADER_LEN]);
            }
        }

        /// Structured inputs reach deeper than random bytes: a valid option with its payload
        /// cut short or extended must be rejected, not misparsed.
        #[test]
        fn option_with_wrong_length_is_rejected(
            opt in client_option(),
            cut in 1usize..8,
            extra in 1usize..8,
        ) {
            let mut buf = Vec::new();
            encode_option(&opt, &mut buf);
            let payload = &buf[OPTION_HEADER_LEN..];
            let code = opt.code();
            let exact_length_matters =
                !matches!(opt, ClientOption::ExportName(_) | ClientOption::Unknown(_));
            if exact_length_matters {
                let mut longer = payload.to_vec();
                longer.extend(std::iter::repeat_n(0u8, extra));
                prop_assert!(decode_option(code, &longer).is_err());
                if payload.len() >= cut {
                    prop_assert!(decode_option(code, &payload[..payload.len() - cut]).is_err());
                }
            }
        }
    }

    /// Option numbers as NetworkBlockDevice/nbd, libnbd and qemu define them (9 was once
    /// reserved for NBD_OPT_BLOCK_SIZE in old drafts of the spec: easy to get wrong).
    #[test]
    fn option_numbers_match_the_spec() {
        let codes = [
            NBD_OPT_EXPORT_NAME,
            NBD_OPT_ABORT,
            NBD_OPT_LIST,
            NBD_OPT_STARTTLS,
            NBD_OPT_INFO,
            NBD_OPT_GO,
            NBD_OPT_STRUCTURED_REPLY,
            NBD_OPT_LIST_META_CONTEXT,
            NBD_OPT_SET_META_CONTEXT,
            NBD_OPT_EXTENDED_HEADERS,
        ];
        assert_eq!(codes, [1, 2, 3, 5, 6, 7, 8, 9, 10, 11]);
        assert_eq!(decode_option(NBD_OPT_EXTENDED_HEADERS, &[]), Ok(ClientOption::Unknown(11)));
    }

    #[test]
    fn greeting_bytes_match_the_spec() {
        let mut buf = Vec::new();
        encode_greeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES, &mut buf);
        assert_eq!(&buf[..8], b"NBDMAGIC");
        assert_eq!(&buf[8..16], b"IHAVEOPT");
        assert_eq!(&buf[16..], &[0, 3]);
        assert_eq!(decode_greeting(&buf), Ok(3));
    }

    #[test]
    fn info_request_lengths_are_exact() {
        // name "ab", 1 info request (BLOCK_SIZE).
        let ok = [0, 0, 0, 2, b'a', b'b', 0, 1, 0, 3];
        assert_eq!(
            decode_option(NBD_OPT_GO, &ok),
            Ok(ClientOption::Go(InfoRequest { name: "ab".into(), info: vec![3] }))
        );
        // Count says 2 requests, only one present.
        let short = [0, 0, 0, 2, b'a', b'b', 0, 2, 0, 3];
        assert!(matches!(decode_option(NBD_OPT_GO, &short), Err(CodecError::Truncated { .. })));
        // Name length larger than the payload.
        let huge = [0xff, 0xff, 0xff, 0xff, b'a'];
        assert!(matches!(
            decode_option(NBD_OPT_INFO, &huge),
            Err(CodecError::StringTooLong { .. })
        ));
        let past_end = [0, 0, 0, 9, b'a'];
        assert!(matches!(
            decode_option(NBD_OPT_INFO, &past_end),
            Err(CodecError::Truncated { .. })
        ));
        // A trailing byte.
        let long = [0, 0, 0, 0, 0, 0, 7];
        assert!(matches!(
            decode_option(NBD_OPT_GO, &long),
            Err(CodecError::TrailingBytes { extra: 1, .. })
        ));
    }

    #[test]
    fn meta_context_query_count_cannot_force_a_large_allocation() {
        // Empty export name, 2^32-1 queries, no query bytes.
        let p = [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            decode_option(NBD_OPT_SET_META_CONTEXT, &p),
            Err(CodecError::Truncated { .. })
        ));
    }

    #[test]
    fn options_without_payload_reject_one() {
        for code in [NBD_OPT_LIST, NBD_OPT_ABORT, NBD_OPT_STRUCTURED_REPLY] {
            assert!(matches!(decode_option(code, &[0]), Err(CodecError::TrailingBytes { .. })));
        }
        assert_eq!(decode_option(NBD_OPT_STARTTLS, &[1, 2]), Ok(ClientOption::Unknown(5)));
    }

    #[test]
    fn export_name_must_be_utf8() {
        assert!(matches!(
            decode_option(NBD_OPT_EXPORT_NAME, &[0xff]),
            Err(CodecError::InvalidUtf8 { .. })
        ));
        assert_eq!(
            decode_option(NBD_OPT_EXPORT_NAME, &[]),
            Ok(ClientOption::ExportName("".into()))
        );
    }

    #[test]
    fn bad_request_magic() {
        let mut buf = Vec::new();
        let req =
            RequestHeader { flags: 0, command: Command::Read, cookie: 1, offset: 0, length: 512 };
        encode_request_header(&req, &mut buf);
        buf[0] ^= 1;
        assert!(matches!(decode_request_header(&buf), Err(CodecError::BadMagic { .. })));
        assert!(matches!(
            decode_request_header(&buf[..27]),
            Err(CodecError::Truncated { .. } | CodecError::BadMagic { .. })
        ));
    }

    #[test]
    fn chunk_lengths_follow_the_spec() {
        // OFFSET_DATA needs at least one byte of data.
        assert!(decode_reply_chunk(NBD_REPLY_TYPE_OFFSET_DATA, &[0; 8]).is_err());
        // BLOCK_STATUS is 4 + a positive multiple of 8.
        assert!(decode_reply_chunk(NBD_REPLY_TYPE_BLOCK_STATUS, &[0; 4]).is_err());
        assert!(decode_reply_chunk(NBD_REPLY_TYPE_BLOCK_STATUS, &[0; 12]).is_ok());
        assert!(decode_reply_chunk(NBD_REPLY_TYPE_BLOCK_STATUS, &[0; 16]).is_err());
        // ERROR's message length must fit.
        assert!(decode_reply_chunk(NBD_REPLY_TYPE_ERROR, &[0, 0, 0, 22, 0, 1]).is_err());
        assert!(decode_reply_chunk(NBD_REPLY_TYPE_NONE, &[0]).is_err());
    }

    #[test]
    fn long_error_messages_are_cut_on_a_char_boundary() {
        let message = "é".repeat(40_000); // 80,000 bytes
        let mut buf = Vec::new();
        encode_reply_chunk(
            NBD_REPLY_FLAG_DONE,
            7,
            &ReplyChunk::Error { error: errno::EIO, message },
            &mut buf,
        );
        let h = decode_structured_reply_header(&buf).unwrap();
        match decode_reply_chunk(h.chunk_type, &buf[STRUCTURED_REPLY_HEADER_LEN..]).unwrap() {
            ReplyChunk::Error { error, message } => {
                assert_eq!(error, errno::EIO);
                assert_eq!(message.len(), 65534);
            }
            other => panic!("unexpected chunk {other:?}"),
        }
    }

    #[test]
    fn export_name_reply_padding() {
        let mut buf = Vec::new();
        encode_export_name_reply(1 << 30, NBD_FLAG_HAS_FLAGS, false, &mut buf);
        assert_eq!(buf.len(), EXPORT_NAME_REPLY_LEN + EXPORT_NAME_ZEROES);
        buf.clear();
        encode_export_name_reply(1 << 30, NBD_FLAG_HAS_FLAGS, true, &mut buf);
        assert_eq!(decode_export_name_reply(&buf), Ok((1 << 30, NBD_FLAG_HAS_FLAGS)));
    }
}
