//! NBD transmission phase: pipelined requests, writes included, replied to out of order, with simple
//! or structured replies (NBD protocol specification, section "Transmission").
//!
//! One reader (the calling task) decodes requests and spawns a task per
//! command; each task sends its finished reply through [`ReplySender`], so
//! replies leave in completion order, each message whole.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, BufReader};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, error, warn};

use super::handshake::Negotiated;
use super::proto::{
    self, chunk, command, command_flags, encode_chunk_header, encode_simple_reply, meta, NbdErrno,
    Request,
};
use super::replies::{Outgoing, Permits, ReplySender};
use super::{read_exact_or_eof, wait_for_shutdown, NbdError, ServerOptions, Shutdown};
use crate::device::BlockDevice;

/// Maximum number of requests of one connection served at once. At this count
/// the reader stops reading the socket, so the client is pushed back.
pub(crate) const MAX_IN_FLIGHT_REQUESTS: usize = 64;

/// Maximum read data one connection keeps in memory at once, in
/// [`BUDGET_UNIT`]s (128 MiB). It is raised to `max_block` when that is larger.
const MAX_IN_FLIGHT_UNITS: u32 = 32 * 1024;
/// Granularity of the in-flight byte budget.
const BUDGET_UNIT: u32 = 4096;

/// The per-connection state every command task reads.
struct Context<D> {
    device: Arc<D>,
    options: Arc<ServerOptions>,
    size: u64,
    /// The device accepts writes; the export was announced without `NBD_FLAG_READ_ONLY`.
    writable: bool,
    negotiated: Negotiated,
}

/// The result of one command, before it is encoded for the negotiated reply style.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Success without payload.
    Done,
    /// A successful read.
    Data { offset: u64, data: Bytes },
    /// A successful `NBD_CMD_BLOCK_STATUS` with one extent for `base:allocation`.
    BlockStatus { length: u32, flags: u32 },
    /// A failed command; `message` goes to the client in structured replies.
    Error { errno: NbdErrno, message: String },
}

impl Outcome {
    fn error(errno: NbdErrno, message: impl Into<String>) -> Outcome {
        Outcome::Error {
            errno,
            message: message.into(),
        }
    }
}

/// Serves requests until the client disconnects, breaks the protocol, or
/// `shutdown` fires. Every request already read gets its reply before the return.
pub(crate) async fn transmit<D, S>(
    stream: S,
    device: Arc<D>,
    options: Arc<ServerOptions>,
    negotiated: Negotiated,
    mut shutdown: Option<Shutdown>,
) -> Result<(), NbdError>
where
    D: BlockDevice,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let size = device.size();
    let writable = device.is_writable();
    let context = Arc::new(Context {
        device,
        options,
        size,
        writable,
        negotiated,
    });
    let (read_half, write_half) = tokio::io::split(stream);
    let mut reader = BufReader::new(read_half);

    let (writer_failed_tx, mut writer_failed) = watch::channel(false);
    let replies = Arc::new(ReplySender::new(write_half, writer_failed_tx));

    let requests = Arc::new(Semaphore::new(MAX_IN_FLIGHT_REQUESTS));
    let budget_units = MAX_IN_FLIGHT_UNITS.max(context.options.max_block.div_ceil(BUDGET_UNIT));
    let budget = Arc::new(Semaphore::new(budget_units as usize));
    let mut tasks = JoinSet::new();

    let result = loop {
        while tasks.try_join_next().is_some() {}

        // Take a request slot before reading, so a full pipeline stops the reads.
        let request_permit = tokio::select! {
            permit = requests.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_closed) => break Ok(()),
            },
            _ = writer_failed.wait_for(|failed| *failed) => break Ok(()),
            _ = wait_for_shutdown(&mut shutdown) => {
                debug!("server shutdown: no more requests read");
                break Ok(());
            }
        };

        let mut header = [0u8; Request::SIZE];
        let got_header = tokio::select! {
            read = read_exact_or_eof(&mut reader, &mut header) => read,
            _ = writer_failed.wait_for(|failed| *failed) => break Ok(()),
            _ = wait_for_shutdown(&mut shutdown) => {
                debug!("server shutdown: no more requests read");
                break Ok(());
            }
        };
        match got_header {
            Ok(true) => {}
            Ok(false) => {
                debug!("client closed the connection");
                break Ok(());
            }
            Err(source) => {
                break Err(NbdError::Io {
                    step: "read a request header",
                    source,
                })
            }
        }

        let request = Request::decode(&header);
        if request.magic != proto::NBD_REQUEST_MAGIC {
            warn!(
                magic = format_args!("{:#010x}", request.magic),
                "transmission: bad request magic"
            );
            tasks.abort_all();
            return Err(NbdError::RequestMagic {
                found: request.magic,
            });
        }

        match request.kind {
            command::NBD_CMD_DISC => {
                debug!("client sent NBD_CMD_DISC");
                break Ok(());
            }
            command::NBD_CMD_WRITE
                if !context.writable || request.length > context.options.max_block =>
            {
                // The payload follows the header whatever the reply, so read it
                // out of the stream before replying.
                if let Err(error) = drain_payload(&mut reader, request.length).await {
                    break Err(error);
                }
                let outcome = if context.writable {
                    Outcome::error(
                        NbdErrno::Inval,
                        format!(
                            "NBD_CMD_WRITE length {} exceeds the maximum block size {}",
                            request.length, context.options.max_block
                        ),
                    )
                } else {
                    debug!(
                        offset = request.offset,
                        length = request.length,
                        "NBD_CMD_WRITE on the read-only export"
                    );
                    Outcome::error(NbdErrno::Perm, "the export is read-only")
                };
                let permits = Permits {
                    _request: request_permit,
                    _bytes: None,
                };
                let reply = encode_outgoing(&context, request, outcome, permits);
                let replies = Arc::clone(&replies);
                tasks.spawn(async move { replies.send(reply).await });
                continue;
            }
            _ => {}
        }

        // Reads and writes reserve their data size, so the data held in
        // memory stays bounded.
        let carries_data = matches!(request.kind, command::NBD_CMD_READ | command::NBD_CMD_WRITE);
        let bytes_permit = if carries_data && request.length <= context.options.max_block {
            let units = request.length.div_ceil(BUDGET_UNIT).max(1);
            match budget.clone().acquire_many_owned(units).await {
                Ok(permit) => Some(permit),
                Err(_closed) => break Ok(()),
            }
        } else {
            None
        };
        let permits = Permits {
            _request: request_permit,
            _bytes: bytes_permit,
        };

        let payload = if request.kind == command::NBD_CMD_WRITE {
            let mut payload = BytesMut::zeroed(request.length as usize);
            if let Err(source) = reader.read_exact(&mut payload).await {
                break Err(NbdError::Io {
                    step: "read NBD_CMD_WRITE payload",
                    source,
                });
            }
            payload.freeze()
        } else {
            Bytes::new()
        };

        let context = Arc::clone(&context);
        let replies = Arc::clone(&replies);
        tasks.spawn(async move {
            let command = AssertUnwindSafe(run_command(&context, request, payload));
            let outcome = match command.catch_unwind().await {
                Ok(outcome) => outcome,
                Err(_panic) => {
                    error!(
                        command = command::name(request.kind),
                        offset = request.offset,
                        length = request.length,
                        "request handler panicked; replying EIO"
                    );
                    Outcome::error(NbdErrno::Io, "internal server error")
                }
            };
            let reply = encode_outgoing(&context, request, outcome, permits);
            replies.send(reply).await;
        });
    };

    // Reply to what was already read, then close the write half.
    if result.is_ok() {
        while tasks.join_next().await.is_some() {}
    } else {
        tasks.abort_all();
    }
    match replies.close().await {
        Ok(()) => result,
        Err(source) => result.and(Err(NbdError::Io {
            step: "send a reply",
            source,
        })),
    }
}

/// Encodes `outcome` for the negotiated reply style, with the permits its
/// sending releases; failures are logged here.
fn encode_outgoing<D>(
    context: &Context<D>,
    request: Request,
    outcome: Outcome,
    permits: Permits,
) -> Outgoing {
    if let Outcome::Error { errno, message } = &outcome {
        debug!(
            command = command::name(request.kind),
            offset = request.offset,
            length = request.length,
            error = errno.name(),
            message = message.as_str(),
            "request failed"
        );
    }
    let (header, payload) = encode_reply(
        context.negotiated.structured_replies,
        request.cookie,
        outcome,
    );
    Outgoing {
        header,
        payload,
        _permits: permits,
    }
}

/// Runs one command other than DISC, which the reader handles itself;
/// `payload` is the data of a WRITE and empty otherwise.
async fn run_command<D: BlockDevice>(
    context: &Context<D>,
    request: Request,
    payload: Bytes,
) -> Outcome {
    // Writes of any shape get EPERM, as the specification requires of read-only exports.
    let changes_data = matches!(
        request.kind,
        command::NBD_CMD_WRITE | command::NBD_CMD_TRIM | command::NBD_CMD_WRITE_ZEROES
    );
    if changes_data && !context.writable {
        return Outcome::error(NbdErrno::Perm, "the export is read-only");
    }
    if let Err(outcome) = check_request(context, &request) {
        return outcome;
    }

    let fua = request.flags & command_flags::NBD_CMD_FLAG_FUA != 0;
    let (offset, length) = (request.offset, request.length);
    match request.kind {
        command::NBD_CMD_READ => read(context, request).await,
        command::NBD_CMD_WRITE => {
            device_outcome(request, context.device.write(offset, payload, fua).await)
        }
        command::NBD_CMD_FLUSH => device_outcome(request, context.device.flush().await),
        command::NBD_CMD_TRIM => {
            device_outcome(request, context.device.trim(offset, length, fua).await)
        }
        command::NBD_CMD_WRITE_ZEROES => device_outcome(
            request,
            context.device.write_zeroes(offset, length, fua).await,
        ),
        command::NBD_CMD_CACHE => {
            let prefetch = context.device.prefetch(request.offset, request.length);
            match prefetch.await {
                Ok(()) => Outcome::Done,
                Err(error) => {
                    warn!(
                        offset = request.offset,
                        length = request.length,
                        %error,
                        "NBD_CMD_CACHE: prefetch failed"
                    );
                    Outcome::error(NbdErrno::Io, format!("prefetch failed: {error}"))
                }
            }
        }
        // The device has no hole information yet, so the whole range is
        // reported as allocated data, the status every server may send.
        command::NBD_CMD_BLOCK_STATUS => Outcome::BlockStatus {
            length: request.length,
            flags: 0,
        },
        other => {
            warn!(
                command = command::name(other),
                kind = other,
                "transmission: unsupported command"
            );
            Outcome::error(
                NbdErrno::Inval,
                format!("command {other} is not supported by this server"),
            )
        }
    }
}

/// Reads and discards a WRITE payload that will not be used.
async fn drain_payload<R: AsyncRead + Unpin>(reader: &mut R, length: u32) -> Result<(), NbdError> {
    let mut payload = reader.take(u64::from(length));
    match tokio::io::copy(&mut payload, &mut tokio::io::sink()).await {
        Ok(n) if n == u64::from(length) => Ok(()),
        Ok(_) => Err(NbdError::Io {
            step: "read NBD_CMD_WRITE payload",
            source: std::io::ErrorKind::UnexpectedEof.into(),
        }),
        Err(source) => Err(NbdError::Io {
            step: "read NBD_CMD_WRITE payload",
            source,
        }),
    }
}

/// Turns the result of a write, flush, trim or zeroing into a reply; the
/// error kind picks the NBD error number.
fn device_outcome(request: Request, result: std::io::Result<()>) -> Outcome {
    let Err(error) = result else {
        return Outcome::Done;
    };
    let name = command::name(request.kind);
    let errno = match error.kind() {
        std::io::ErrorKind::ReadOnlyFilesystem | std::io::ErrorKind::PermissionDenied => {
            NbdErrno::Perm
        }
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => NbdErrno::NoSpc,
        std::io::ErrorKind::InvalidInput => NbdErrno::Inval,
        _ => NbdErrno::Io,
    };
    warn!(
        command = name,
        offset = request.offset,
        length = request.length,
        error = %error,
        errno = errno.name(),
        "device write operation failed"
    );
    Outcome::error(errno, format!("{name} failed: {error}"))
}

async fn read<D: BlockDevice>(context: &Context<D>, request: Request) -> Outcome {
    if request.length == 0 {
        return Outcome::Data {
            offset: request.offset,
            data: Bytes::new(),
        };
    }

    match context.device.read(request.offset, request.length).await {
        Ok(data) if data.len() == request.length as usize => Outcome::Data {
            offset: request.offset,
            data,
        },
        Ok(data) => {
            error!(
                offset = request.offset,
                length = request.length,
                returned = data.len(),
                "device returned a read of the wrong length; replying EIO"
            );
            Outcome::error(NbdErrno::Io, "internal server error: short read")
        }
        Err(error) => {
            warn!(
                offset = request.offset,
                length = request.length,
                %error,
                "device read failed; replying EIO"
            );
            Outcome::error(NbdErrno::Io, format!("read failed: {error}"))
        }
    }
}

/// Checks flags, range, alignment and size limits; the error is the reply.
fn check_request<D>(context: &Context<D>, request: &Request) -> Result<(), Outcome> {
    let structured = context.negotiated.structured_replies;
    let name = command::name(request.kind);

    // FUA is accepted on every command, also on read-only exports that do
    // not advertise it, because clients are known to set it anyway.
    let mut allowed = command_flags::NBD_CMD_FLAG_FUA;
    match request.kind {
        command::NBD_CMD_READ if structured => allowed |= command_flags::NBD_CMD_FLAG_DF,
        command::NBD_CMD_BLOCK_STATUS => allowed |= command_flags::NBD_CMD_FLAG_REQ_ONE,
        // NO_HOLE asks for allocated zeros; zeroed blocks read the same either way.
        command::NBD_CMD_WRITE_ZEROES => allowed |= command_flags::NBD_CMD_FLAG_NO_HOLE,
        _ => {}
    }
    if request.flags & !allowed != 0 {
        warn!(
            command = name,
            flags = format_args!("{:#x}", request.flags),
            "transmission: unsupported command flags"
        );
        return Err(Outcome::error(
            NbdErrno::Inval,
            format!("unsupported flags {:#x} for {name}", request.flags),
        ));
    }

    let ranged = matches!(
        request.kind,
        command::NBD_CMD_READ
            | command::NBD_CMD_CACHE
            | command::NBD_CMD_BLOCK_STATUS
            | command::NBD_CMD_WRITE
            | command::NBD_CMD_TRIM
            | command::NBD_CMD_WRITE_ZEROES
    );
    if !ranged {
        return Ok(());
    }

    let end = request.offset.checked_add(u64::from(request.length));
    if end.is_none_or(|end| end > context.size) {
        // The specification asks for ENOSPC when a write runs past the end.
        let errno = match request.kind {
            command::NBD_CMD_WRITE | command::NBD_CMD_WRITE_ZEROES => NbdErrno::NoSpc,
            _ => NbdErrno::Inval,
        };
        return Err(Outcome::error(
            errno,
            format!(
                "{name} range {:#x}+{:#x} ends past the export size {:#x}",
                request.offset, request.length, context.size
            ),
        ));
    }
    let min_block = u64::from(context.options.min_block);
    if request.offset % min_block != 0 || u64::from(request.length) % min_block != 0 {
        return Err(Outcome::error(
            NbdErrno::Inval,
            format!(
                "{name} range {:#x}+{:#x} is not aligned to the minimum block size {min_block}",
                request.offset, request.length
            ),
        ));
    }
    let sized = matches!(
        request.kind,
        command::NBD_CMD_READ | command::NBD_CMD_CACHE | command::NBD_CMD_WRITE
    );
    if sized && request.length > context.options.max_block {
        return Err(Outcome::error(
            NbdErrno::Inval,
            format!(
                "{name} length {} exceeds the maximum block size {}",
                request.length, context.options.max_block
            ),
        ));
    }

    if request.kind == command::NBD_CMD_BLOCK_STATUS {
        if !structured || !context.negotiated.base_allocation {
            warn!("transmission: NBD_CMD_BLOCK_STATUS without a negotiated metadata context");
            return Err(Outcome::error(
                NbdErrno::Inval,
                "NBD_CMD_BLOCK_STATUS needs base:allocation selected with NBD_OPT_SET_META_CONTEXT",
            ));
        }
        if request.length == 0 {
            return Err(Outcome::error(
                NbdErrno::Inval,
                "NBD_CMD_BLOCK_STATUS length must not be zero",
            ));
        }
    }
    Ok(())
}

/// Encodes an outcome as a simple reply, or as one structured chunk flagged
/// `NBD_REPLY_FLAG_DONE`; returns the header and the payload sent after it.
fn encode_reply(structured: bool, cookie: u64, outcome: Outcome) -> (Vec<u8>, Option<Bytes>) {
    if !structured {
        return match outcome {
            Outcome::Done => (encode_simple_reply(cookie, 0).to_vec(), None),
            Outcome::Data { data, .. } => (encode_simple_reply(cookie, 0).to_vec(), Some(data)),
            Outcome::Error { errno, .. } => {
                (encode_simple_reply(cookie, errno.code()).to_vec(), None)
            }
            // check_request answers BLOCK_STATUS with EINVAL unless structured
            // replies were negotiated, so this arm only guards against misuse.
            Outcome::BlockStatus { .. } => (
                encode_simple_reply(cookie, NbdErrno::Inval.code()).to_vec(),
                None,
            ),
        };
    }

    let done = chunk::NBD_REPLY_FLAG_DONE;
    match outcome {
        Outcome::Done => (
            encode_chunk_header(cookie, done, chunk::NBD_REPLY_TYPE_NONE, 0).to_vec(),
            None,
        ),
        // OFFSET_DATA must carry at least one byte, so an empty read is a NONE chunk.
        Outcome::Data { data, .. } if data.is_empty() => (
            encode_chunk_header(cookie, done, chunk::NBD_REPLY_TYPE_NONE, 0).to_vec(),
            None,
        ),
        Outcome::Data { offset, data } => {
            // Reads are at most MAX_BLOCK_LIMIT (1 GiB), so the length fits.
            let length = u32::try_from(data.len() + 8).unwrap_or(u32::MAX);
            let mut header =
                encode_chunk_header(cookie, done, chunk::NBD_REPLY_TYPE_OFFSET_DATA, length)
                    .to_vec();
            header.extend_from_slice(&offset.to_be_bytes());
            (header, Some(data))
        }
        Outcome::BlockStatus { length, flags } => {
            let mut header =
                encode_chunk_header(cookie, done, chunk::NBD_REPLY_TYPE_BLOCK_STATUS, 12).to_vec();
            header.extend_from_slice(&meta::BASE_ALLOCATION_ID.to_be_bytes());
            header.extend_from_slice(&length.to_be_bytes());
            header.extend_from_slice(&flags.to_be_bytes());
            (header, None)
        }
        Outcome::Error { errno, message } => {
            let mut message = message.into_bytes();
            message.truncate(proto::MAX_STRING_LEN);
            let message_len = message.len() as u16;
            let length = 6 + u32::from(message_len);
            let mut header =
                encode_chunk_header(cookie, done, chunk::NBD_REPLY_TYPE_ERROR, length).to_vec();
            header.extend_from_slice(&errno.code().to_be_bytes());
            header.extend_from_slice(&message_len.to_be_bytes());
            header.extend_from_slice(&message);
            (header, None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_reply_encodings() {
        let cases = [
            ("done", Outcome::Done, 0u32, None),
            (
                "data",
                Outcome::Data {
                    offset: 0,
                    data: Bytes::from_static(b"abc"),
                },
                0,
                Some(Bytes::from_static(b"abc")),
            ),
            ("eio", Outcome::error(NbdErrno::Io, "x"), 5, None),
        ];
        for (case, outcome, errno, payload) in cases {
            let (header, body) = encode_reply(false, 0xabcd, outcome);
            assert_eq!(header.len(), proto::SIMPLE_REPLY_SIZE, "case {case}");
            assert_eq!(
                &header[0..4],
                &proto::NBD_SIMPLE_REPLY_MAGIC.to_be_bytes(),
                "case {case}"
            );
            assert_eq!(&header[4..8], &errno.to_be_bytes(), "case {case}");
            assert_eq!(&header[8..16], &0xabcdu64.to_be_bytes(), "case {case}");
            assert_eq!(body, payload, "case {case}");
        }
    }

    #[test]
    fn structured_offset_data_chunk() {
        let outcome = Outcome::Data {
            offset: 0x1000,
            data: Bytes::from_static(b"hello"),
        };
        let (header, body) = encode_reply(true, 7, outcome);
        assert_eq!(
            &header[0..4],
            &proto::NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes()
        );
        assert_eq!(&header[4..6], &chunk::NBD_REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(
            &header[6..8],
            &chunk::NBD_REPLY_TYPE_OFFSET_DATA.to_be_bytes()
        );
        assert_eq!(&header[8..16], &7u64.to_be_bytes());
        assert_eq!(&header[16..20], &13u32.to_be_bytes());
        assert_eq!(&header[20..28], &0x1000u64.to_be_bytes());
        assert_eq!(body, Some(Bytes::from_static(b"hello")));
    }

    #[test]
    fn structured_empty_read_is_none_chunk() {
        let outcome = Outcome::Data {
            offset: 0,
            data: Bytes::new(),
        };
        let (header, body) = encode_reply(true, 1, outcome);
        assert_eq!(&header[6..8], &chunk::NBD_REPLY_TYPE_NONE.to_be_bytes());
        assert_eq!(&header[16..20], &0u32.to_be_bytes());
        assert_eq!(body, None);
    }

    #[test]
    fn structured_error_chunk_carries_message() {
        let (header, body) = encode_reply(true, 1, Outcome::error(NbdErrno::Inval, "bad"));
        assert_eq!(&header[6..8], &chunk::NBD_REPLY_TYPE_ERROR.to_be_bytes());
        assert_eq!(&header[16..20], &9u32.to_be_bytes());
        assert_eq!(&header[20..24], &22u32.to_be_bytes());
        assert_eq!(&header[24..26], &3u16.to_be_bytes());
        assert_eq!(&header[26..], b"bad");
        assert_eq!(body, None);
    }

    #[test]
    fn structured_block_status_chunk() {
        let outcome = Outcome::BlockStatus {
            length: 65536,
            flags: 0,
        };
        let (header, _) = encode_reply(true, 1, outcome);
        assert_eq!(
            &header[6..8],
            &chunk::NBD_REPLY_TYPE_BLOCK_STATUS.to_be_bytes()
        );
        assert_eq!(&header[16..20], &12u32.to_be_bytes());
        assert_eq!(&header[20..24], &meta::BASE_ALLOCATION_ID.to_be_bytes());
        assert_eq!(&header[24..28], &65536u32.to_be_bytes());
        assert_eq!(&header[28..32], &0u32.to_be_bytes());
    }
}
