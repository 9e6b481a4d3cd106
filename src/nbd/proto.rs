//! NBD wire constants and message layouts, from the NBD protocol specification
//! (NetworkBlockDevice/nbd, `doc/proto.md`). All integers are big-endian.

/// `NBDMAGIC`: the first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: sent by the server after `NBDMAGIC`, and by the client before each option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every fixed-newstyle option reply.
pub const NBD_REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC`: starts every transmission request.
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_SIMPLE_REPLY_MAGIC`: starts a simple reply.
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `NBD_STRUCTURED_REPLY_MAGIC`: starts a structured reply chunk.
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Maximum length of a protocol string (export name, description, error message).
pub const MAX_STRING_LEN: usize = 4096;
/// Zero padding after the `NBD_OPT_EXPORT_NAME` reply unless `NBD_FLAG_C_NO_ZEROES` was set.
pub const EXPORT_NAME_PADDING: usize = 124;

/// Handshake flags, sent by the server right after `IHAVEOPT`.
pub mod handshake_flags {
    pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
    pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
    /// The flags this server sends.
    pub const SERVER: u16 = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;
}

/// Client flags, the 32 bits the client sends after the handshake flags.
pub mod client_flags {
    pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
    pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;
    /// Every client flag this server understands; any other bit closes the connection.
    pub const SUPPORTED: u32 = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;
}

/// Transmission flags, sent with the export size.
pub mod transmission_flags {
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

    /// Returns the flags of a read-only export served by this server.
    ///
    /// `NBD_FLAG_SEND_DF` is added only when structured replies were negotiated,
    /// because the specification forbids it otherwise.
    pub fn for_export(structured_replies: bool) -> u16 {
        for_device(structured_replies, false)
    }

    /// Returns the flags of an export, writable or not. A writable export
    /// drops `NBD_FLAG_READ_ONLY` and adds FUA, TRIM and WRITE_ZEROES.
    /// `NBD_FLAG_CAN_MULTI_CONN` stays: every connection writes the same
    /// device, and a flush on one makes the writes of all durable.
    pub fn for_device(structured_replies: bool, writable: bool) -> u16 {
        let mut flags = NBD_FLAG_HAS_FLAGS
            | NBD_FLAG_SEND_FLUSH
            | NBD_FLAG_SEND_CACHE
            | NBD_FLAG_CAN_MULTI_CONN;
        if writable {
            flags |= NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES;
        } else {
            flags |= NBD_FLAG_READ_ONLY;
        }
        if structured_replies {
            flags |= NBD_FLAG_SEND_DF;
        }
        flags
    }
}

/// Option codes (`NBD_OPT_*`).
pub mod option {
    pub const NBD_OPT_EXPORT_NAME: u32 = 1;
    pub const NBD_OPT_ABORT: u32 = 2;
    pub const NBD_OPT_LIST: u32 = 3;
    pub const NBD_OPT_PEEK_EXPORT: u32 = 4;
    pub const NBD_OPT_STARTTLS: u32 = 5;
    pub const NBD_OPT_INFO: u32 = 6;
    pub const NBD_OPT_GO: u32 = 7;
    pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
    pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
    pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
    pub const NBD_OPT_EXTENDED_HEADERS: u32 = 11;

    /// Returns the specification's name of an option code, for logs.
    pub fn name(code: u32) -> &'static str {
        match code {
            NBD_OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
            NBD_OPT_ABORT => "NBD_OPT_ABORT",
            NBD_OPT_LIST => "NBD_OPT_LIST",
            NBD_OPT_PEEK_EXPORT => "NBD_OPT_PEEK_EXPORT",
            NBD_OPT_STARTTLS => "NBD_OPT_STARTTLS",
            NBD_OPT_INFO => "NBD_OPT_INFO",
            NBD_OPT_GO => "NBD_OPT_GO",
            NBD_OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
            NBD_OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
            NBD_OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
            NBD_OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
            _ => "unknown option",
        }
    }
}

/// Option reply types (`NBD_REP_*`); error types have bit 31 set.
pub mod reply {
    pub const NBD_REP_ACK: u32 = 1;
    pub const NBD_REP_SERVER: u32 = 2;
    pub const NBD_REP_INFO: u32 = 3;
    pub const NBD_REP_META_CONTEXT: u32 = 4;

    const ERROR: u32 = 1 << 31;
    pub const NBD_REP_ERR_UNSUP: u32 = ERROR | 1;
    pub const NBD_REP_ERR_POLICY: u32 = ERROR | 2;
    pub const NBD_REP_ERR_INVALID: u32 = ERROR | 3;
    pub const NBD_REP_ERR_PLATFORM: u32 = ERROR | 4;
    pub const NBD_REP_ERR_TLS_REQD: u32 = ERROR | 5;
    pub const NBD_REP_ERR_UNKNOWN: u32 = ERROR | 6;
    pub const NBD_REP_ERR_SHUTDOWN: u32 = ERROR | 7;
    pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = ERROR | 8;
    pub const NBD_REP_ERR_TOO_BIG: u32 = ERROR | 9;
}

/// Information types in `NBD_REP_INFO` replies to `NBD_OPT_INFO` and `NBD_OPT_GO`.
pub mod info {
    pub const NBD_INFO_EXPORT: u16 = 0;
    pub const NBD_INFO_NAME: u16 = 1;
    pub const NBD_INFO_DESCRIPTION: u16 = 2;
    pub const NBD_INFO_BLOCK_SIZE: u16 = 3;
}

/// Command types (`NBD_CMD_*`).
pub mod command {
    pub const NBD_CMD_READ: u16 = 0;
    pub const NBD_CMD_WRITE: u16 = 1;
    pub const NBD_CMD_DISC: u16 = 2;
    pub const NBD_CMD_FLUSH: u16 = 3;
    pub const NBD_CMD_TRIM: u16 = 4;
    pub const NBD_CMD_CACHE: u16 = 5;
    pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
    pub const NBD_CMD_BLOCK_STATUS: u16 = 7;
    pub const NBD_CMD_RESIZE: u16 = 8;

    /// Returns the specification's name of a command type, for logs and errors.
    pub fn name(kind: u16) -> &'static str {
        match kind {
            NBD_CMD_READ => "NBD_CMD_READ",
            NBD_CMD_WRITE => "NBD_CMD_WRITE",
            NBD_CMD_DISC => "NBD_CMD_DISC",
            NBD_CMD_FLUSH => "NBD_CMD_FLUSH",
            NBD_CMD_TRIM => "NBD_CMD_TRIM",
            NBD_CMD_CACHE => "NBD_CMD_CACHE",
            NBD_CMD_WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
            NBD_CMD_BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
            NBD_CMD_RESIZE => "NBD_CMD_RESIZE",
            _ => "unknown command",
        }
    }
}

/// Command flags (`NBD_CMD_FLAG_*`) in a request.
pub mod command_flags {
    pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
    pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
    pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
    pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
    pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk flags and types.
pub mod chunk {
    pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;

    pub const NBD_REPLY_TYPE_NONE: u16 = 0;
    pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
    pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
    pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
    pub const NBD_REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
    pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;
}

/// The `base:allocation` metadata context and its status flags.
pub mod meta {
    pub const BASE_ALLOCATION: &str = "base:allocation";
    /// The namespace wildcard `NBD_OPT_LIST_META_CONTEXT` must expand.
    pub const BASE_NAMESPACE: &str = "base:";
    /// The id this server gives `base:allocation`; any value is allowed.
    pub const BASE_ALLOCATION_ID: u32 = 1;

    pub const NBD_STATE_HOLE: u32 = 1 << 0;
    pub const NBD_STATE_ZERO: u32 = 1 << 1;
}

/// Error values in replies; the specification fixes these numbers on every platform.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum NbdErrno {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

impl NbdErrno {
    pub fn code(self) -> u32 {
        self as u32
    }

    pub fn name(self) -> &'static str {
        match self {
            NbdErrno::Perm => "EPERM",
            NbdErrno::Io => "EIO",
            NbdErrno::NoMem => "ENOMEM",
            NbdErrno::Inval => "EINVAL",
            NbdErrno::NoSpc => "ENOSPC",
            NbdErrno::Overflow => "EOVERFLOW",
            NbdErrno::NotSup => "ENOTSUP",
            NbdErrno::Shutdown => "ESHUTDOWN",
        }
    }
}

/// The header of a client option: `IHAVEOPT`, option code, data length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    pub magic: u64,
    pub option: u32,
    pub length: u32,
}

impl OptionHeader {
    pub const SIZE: usize = 16;

    pub fn decode(bytes: &[u8; Self::SIZE]) -> OptionHeader {
        OptionHeader {
            magic: u64::from_be_bytes(field(bytes, 0)),
            option: u32::from_be_bytes(field(bytes, 8)),
            length: u32::from_be_bytes(field(bytes, 12)),
        }
    }
}

/// Copies the `N` bytes at `at` out of a fixed-size header; callers pass constant
/// offsets inside the header, so the range is always in bounds.
fn field<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[at..at + N]);
    out
}

/// Encodes one fixed-newstyle option reply: magic, option, type, length, data.
pub fn encode_option_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&NBD_REP_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    // Every caller passes data bounded by MAX_STRING_LEN or a fixed layout.
    let length = u32::try_from(data.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// A transmission request header (`NBD_REQUEST_MAGIC`, flags, type, cookie, offset, length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub magic: u32,
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub const SIZE: usize = 28;

    pub fn decode(bytes: &[u8; Self::SIZE]) -> Request {
        Request {
            magic: u32::from_be_bytes(field(bytes, 0)),
            flags: u16::from_be_bytes(field(bytes, 4)),
            kind: u16::from_be_bytes(field(bytes, 6)),
            cookie: u64::from_be_bytes(field(bytes, 8)),
            offset: u64::from_be_bytes(field(bytes, 16)),
            length: u32::from_be_bytes(field(bytes, 24)),
        }
    }

    #[cfg(test)]
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        out[0..4].copy_from_slice(&self.magic.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.kind.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// Size of a simple reply header: magic, error, cookie.
pub const SIMPLE_REPLY_SIZE: usize = 16;
/// Size of a structured reply chunk header: magic, flags, type, cookie, length.
pub const STRUCTURED_REPLY_HEADER_SIZE: usize = 20;

/// Encodes a simple reply header; a successful read's data follows it.
pub fn encode_simple_reply(cookie: u64, error: u32) -> [u8; SIMPLE_REPLY_SIZE] {
    let mut out = [0u8; SIMPLE_REPLY_SIZE];
    out[0..4].copy_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// Encodes a structured reply chunk header; `length` bytes of payload follow it.
pub fn encode_chunk_header(
    cookie: u64,
    flags: u16,
    chunk_type: u16,
    length: u32,
) -> [u8; STRUCTURED_REPLY_HEADER_SIZE] {
    let mut out = [0u8; STRUCTURED_REPLY_HEADER_SIZE];
    out[0..4].copy_from_slice(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&chunk_type.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&length.to_be_bytes());
    out
}

/// A cursor over option data that fails instead of reading past the end.
pub struct ByteReader<'a> {
    data: &'a [u8],
}

/// The option data ended before a field, or had bytes left after the last one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Malformed;

impl<'a> ByteReader<'a> {
    pub fn new(data: &'a [u8]) -> ByteReader<'a> {
        ByteReader { data }
    }

    pub fn take(&mut self, len: usize) -> Result<&'a [u8], Malformed> {
        if len > self.data.len() {
            return Err(Malformed);
        }
        let (head, tail) = self.data.split_at(len);
        self.data = tail;
        Ok(head)
    }

    pub fn u16(&mut self) -> Result<u16, Malformed> {
        let bytes = self.take(2)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    pub fn u32(&mut self) -> Result<u32, Malformed> {
        let bytes = self.take(4)?;
        Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    /// Reads a string prefixed by its 32-bit length, at most `MAX_STRING_LEN` bytes.
    pub fn string_u32(&mut self) -> Result<&'a [u8], Malformed> {
        let len = self.u32()?;
        let len = usize::try_from(len).map_err(|_| Malformed)?;
        if len > MAX_STRING_LEN {
            return Err(Malformed);
        }
        self.take(len)
    }

    pub fn expect_empty(&self) -> Result<(), Malformed> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(Malformed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics_spell_their_ascii_names() {
        assert_eq!(&NBD_MAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }

    #[test]
    fn request_roundtrips_through_encode_decode() {
        let request = Request {
            magic: NBD_REQUEST_MAGIC,
            flags: command_flags::NBD_CMD_FLAG_DF,
            kind: command::NBD_CMD_READ,
            cookie: 0x0102_0304_0506_0708,
            offset: 0x1122_3344_5566_7788,
            length: 0x99aa_bbcc,
        };
        assert_eq!(Request::decode(&request.encode()), request);
    }

    #[test]
    fn option_reply_layout() {
        let bytes = encode_option_reply(option::NBD_OPT_GO, reply::NBD_REP_ACK, b"xy");
        assert_eq!(&bytes[0..8], &NBD_REP_MAGIC.to_be_bytes());
        assert_eq!(&bytes[8..12], &7u32.to_be_bytes());
        assert_eq!(&bytes[12..16], &1u32.to_be_bytes());
        assert_eq!(&bytes[16..20], &2u32.to_be_bytes());
        assert_eq!(&bytes[20..], b"xy");
    }

    #[test]
    fn byte_reader_rejects_short_and_trailing_data() {
        let cases: &[(&[u8], bool)] = &[
            (&[0, 0, 0, 2, b'a', b'b'], true),
            (&[0, 0, 0, 3, b'a', b'b'], false),
            (&[0, 0], false),
            (&[0, 0, 0, 0, 1], false),
        ];
        for (input, ok) in cases {
            let mut reader = ByteReader::new(input);
            let result = reader.string_u32().and_then(|_| reader.expect_empty());
            assert_eq!(result.is_ok(), *ok, "input {input:?}");
        }
    }

    #[test]
    fn byte_reader_rejects_string_over_limit() {
        let mut data = u32::try_from(MAX_STRING_LEN + 1)
            .unwrap()
            .to_be_bytes()
            .to_vec();
        data.resize(4 + MAX_STRING_LEN + 1, b'a');
        assert_eq!(ByteReader::new(&data).string_u32(), Err(Malformed));
    }

    #[test]
    fn export_flags_add_df_only_with_structured_replies() {
        use transmission_flags::*;
        assert_eq!(for_export(false) & NBD_FLAG_SEND_DF, 0);
        assert_ne!(for_export(true) & NBD_FLAG_SEND_DF, 0);
        for structured in [false, true] {
            let flags = for_export(structured);
            assert_ne!(flags & NBD_FLAG_HAS_FLAGS, 0);
            assert_ne!(flags & NBD_FLAG_READ_ONLY, 0);
        }
    }

    #[test]
    fn writable_export_flags() {
        use transmission_flags::*;
        let flags = for_device(false, true);
        assert_eq!(flags & NBD_FLAG_READ_ONLY, 0);
        for (name, flag) in [
            ("SEND_FLUSH", NBD_FLAG_SEND_FLUSH),
            ("SEND_FUA", NBD_FLAG_SEND_FUA),
            ("SEND_TRIM", NBD_FLAG_SEND_TRIM),
            ("SEND_WRITE_ZEROES", NBD_FLAG_SEND_WRITE_ZEROES),
        ] {
            assert_ne!(flags & flag, 0, "{name}");
        }
        assert_eq!(for_device(true, false), for_export(true));
    }
}
