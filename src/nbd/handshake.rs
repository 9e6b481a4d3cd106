//! NBD fixed newstyle handshake and option haggling (NBD protocol specification,
//! sections "Handshake" and "Option types").

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, warn};

use super::proto::{
    self, client_flags, encode_option_reply, handshake_flags, info, meta, option, reply,
    transmission_flags, ByteReader, Malformed, OptionHeader,
};
use super::{read_exact_or_eof, NbdError, ServerOptions};

/// Maximum option data length the server reads. Longer options get `NBD_REP_ERR_TOO_BIG`.
///
/// The largest valid option is a metadata-context request with a few
/// 4096-byte strings, far below this.
pub(crate) const MAX_OPTION_DATA: u32 = 64 * 1024;

/// Features the client negotiated before the transmission phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Negotiated {
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
    pub structured_replies: bool,
    /// `base:allocation` was selected with `NBD_OPT_SET_META_CONTEXT`.
    pub base_allocation: bool,
}

/// The result of a handshake.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The client entered the transmission phase.
    Transmission(Negotiated),
    /// The client aborted (`NBD_OPT_ABORT`) or closed the connection between options.
    Closed,
}

/// Option haggling state of one connection.
struct Handshake<'a, S> {
    stream: &'a mut S,
    options: &'a ServerOptions,
    size: u64,
    writable: bool,
    no_zeroes: bool,
    negotiated: Negotiated,
}

/// Runs the handshake on a fresh connection to the start of transmission.
pub(crate) async fn negotiate<S>(
    stream: &mut S,
    size: u64,
    writable: bool,
    options: &ServerOptions,
) -> Result<Outcome, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = [0u8; 18];
    greeting[0..8].copy_from_slice(&proto::NBD_MAGIC.to_be_bytes());
    greeting[8..16].copy_from_slice(&proto::IHAVEOPT.to_be_bytes());
    greeting[16..18].copy_from_slice(&handshake_flags::SERVER.to_be_bytes());
    stream
        .write_all(&greeting)
        .await
        .map_err(NbdError::io("send the handshake greeting"))?;
    stream
        .flush()
        .await
        .map_err(NbdError::io("send the handshake greeting"))?;

    let mut flags = [0u8; 4];
    let got_flags = read_exact_or_eof(stream, &mut flags)
        .await
        .map_err(NbdError::io("read the client flags"))?;
    if !got_flags {
        debug!("client closed the connection before sending its flags");
        return Ok(Outcome::Closed);
    }
    let flags = u32::from_be_bytes(flags);
    if flags & !client_flags::SUPPORTED != 0 {
        warn!(
            flags = format_args!("{flags:#x}"),
            "handshake: unknown client flags"
        );
        return Err(NbdError::UnknownClientFlags { flags });
    }

    let mut handshake = Handshake {
        stream,
        options,
        size,
        writable,
        no_zeroes: flags & client_flags::NBD_FLAG_C_NO_ZEROES != 0,
        negotiated: Negotiated {
            structured_replies: false,
            base_allocation: false,
        },
    };
    handshake.haggle().await
}

impl<S> Handshake<'_, S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Replies to options until one of them ends the handshake.
    async fn haggle(&mut self) -> Result<Outcome, NbdError> {
        loop {
            let mut header = [0u8; OptionHeader::SIZE];
            let got_header = read_exact_or_eof(self.stream, &mut header)
                .await
                .map_err(NbdError::io("read an option header"))?;
            if !got_header {
                debug!("client closed the connection during option haggling");
                return Ok(Outcome::Closed);
            }
            let header = OptionHeader::decode(&header);
            if header.magic != proto::IHAVEOPT {
                warn!(
                    magic = format_args!("{:#018x}", header.magic),
                    "handshake: bad option magic"
                );
                return Err(NbdError::OptionMagic {
                    found: header.magic,
                });
            }

            let name = option::name(header.option);
            if header.length > MAX_OPTION_DATA {
                self.reject_oversized(header).await?;
                continue;
            }
            let mut data = vec![0u8; header.length as usize];
            self.stream
                .read_exact(&mut data)
                .await
                .map_err(NbdError::io("read option data"))?;
            debug!(option = name, length = header.length, "handshake: option");

            if let Some(outcome) = self.answer(header.option, &data).await? {
                self.stream
                    .flush()
                    .await
                    .map_err(NbdError::io("send an option reply"))?;
                return Ok(outcome);
            }
            self.stream
                .flush()
                .await
                .map_err(NbdError::io("send an option reply"))?;
        }
    }

    /// Discards the data of an option over [`MAX_OPTION_DATA`] and replies
    /// `NBD_REP_ERR_TOO_BIG`. For `NBD_OPT_EXPORT_NAME`, which has no error reply,
    /// it closes the connection instead.
    async fn reject_oversized(&mut self, header: OptionHeader) -> Result<(), NbdError> {
        let name = option::name(header.option);
        warn!(
            option = name,
            length = header.length,
            limit = MAX_OPTION_DATA,
            "handshake: option data too long"
        );
        if header.option == option::NBD_OPT_EXPORT_NAME {
            return Err(NbdError::OptionTooLong {
                option: name,
                length: header.length,
                limit: MAX_OPTION_DATA,
            });
        }

        let mut data = (&mut *self.stream).take(u64::from(header.length));
        let discarded = tokio::io::copy(&mut data, &mut tokio::io::sink())
            .await
            .map_err(NbdError::io("discard oversized option data"))?;
        if discarded < u64::from(header.length) {
            return Err(NbdError::Io {
                step: "discard oversized option data",
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        }
        let message = format!(
            "option data of {} bytes exceeds the server limit of {MAX_OPTION_DATA} bytes",
            header.length
        );
        self.send_reply(
            header.option,
            reply::NBD_REP_ERR_TOO_BIG,
            message.as_bytes(),
        )
        .await
    }

    /// Replies to one option and returns the outcome when the option ends the handshake.
    async fn answer(&mut self, code: u32, data: &[u8]) -> Result<Option<Outcome>, NbdError> {
        match code {
            option::NBD_OPT_EXPORT_NAME => self.export_name(data).await.map(Some),
            option::NBD_OPT_ABORT => {
                // The specification requires an ACK, though the client may already be gone.
                let _ = self.send_reply(code, reply::NBD_REP_ACK, &[]).await;
                let _ = self.stream.flush().await;
                debug!("client sent NBD_OPT_ABORT");
                Ok(Some(Outcome::Closed))
            }
            option::NBD_OPT_LIST => self.list(data).await.map(|()| None),
            option::NBD_OPT_INFO | option::NBD_OPT_GO => self.info_or_go(code, data).await,
            option::NBD_OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    return self
                        .invalid(code, "NBD_OPT_STRUCTURED_REPLY takes no data")
                        .await
                        .map(|()| None);
                }
                self.negotiated.structured_replies = true;
                self.send_reply(code, reply::NBD_REP_ACK, &[]).await?;
                Ok(None)
            }
            option::NBD_OPT_LIST_META_CONTEXT | option::NBD_OPT_SET_META_CONTEXT => {
                self.meta_context(code, data).await.map(|()| None)
            }
            _ => {
                debug!(
                    option = option::name(code),
                    code, "handshake: unsupported option"
                );
                let message = format!("option {code} is not supported by this server");
                self.send_reply(code, reply::NBD_REP_ERR_UNSUP, message.as_bytes())
                    .await?;
                Ok(None)
            }
        }
    }

    /// `NBD_OPT_EXPORT_NAME`: sends size and flags and enters transmission, or
    /// closes the connection for an unknown name, since this option cannot fail.
    async fn export_name(&mut self, name: &[u8]) -> Result<Outcome, NbdError> {
        if !self.options.selects_export(name) {
            warn!(
                option = "NBD_OPT_EXPORT_NAME",
                name = %String::from_utf8_lossy(name),
                "handshake: unknown export"
            );
            return Err(NbdError::UnknownExport {
                name: String::from_utf8_lossy(name).into_owned(),
                export: self.options.export_name.clone(),
            });
        }

        let flags =
            transmission_flags::for_device(self.negotiated.structured_replies, self.writable);
        let mut out = Vec::with_capacity(10 + proto::EXPORT_NAME_PADDING);
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        if !self.no_zeroes {
            out.resize(out.len() + proto::EXPORT_NAME_PADDING, 0);
        }
        self.stream
            .write_all(&out)
            .await
            .map_err(NbdError::io("send the NBD_OPT_EXPORT_NAME reply"))?;
        Ok(Outcome::Transmission(self.negotiated))
    }

    /// `NBD_OPT_LIST`: one `NBD_REP_SERVER` with the name and description, then ACK.
    async fn list(&mut self, data: &[u8]) -> Result<(), NbdError> {
        let code = option::NBD_OPT_LIST;
        if !data.is_empty() {
            return self.invalid(code, "NBD_OPT_LIST takes no data").await;
        }

        let name = self.options.export_name.as_bytes();
        let description = self.options.description.as_bytes();
        let mut server = Vec::with_capacity(4 + name.len() + description.len());
        server.extend_from_slice(&len_u32(name).to_be_bytes());
        server.extend_from_slice(name);
        server.extend_from_slice(description);
        self.send_reply(code, reply::NBD_REP_SERVER, &server)
            .await?;
        self.send_reply(code, reply::NBD_REP_ACK, &[]).await
    }

    /// `NBD_OPT_INFO` and `NBD_OPT_GO`: export information, then ACK; GO then
    /// enters transmission.
    async fn info_or_go(&mut self, code: u32, data: &[u8]) -> Result<Option<Outcome>, NbdError> {
        let Ok((name, requests)) = parse_info_request(data) else {
            warn!(
                option = option::name(code),
                "handshake: malformed option data"
            );
            let message = "malformed data: expected name length, name, request count, requests";
            self.invalid(code, message).await?;
            return Ok(None);
        };
        if !self.options.selects_export(name) {
            debug!(
                option = option::name(code),
                name = %String::from_utf8_lossy(name),
                "handshake: unknown export"
            );
            let message = format!(
                "unknown export {:?}; this server exports {:?}",
                String::from_utf8_lossy(name),
                self.options.export_name
            );
            self.send_reply(code, reply::NBD_REP_ERR_UNKNOWN, message.as_bytes())
                .await?;
            return Ok(None);
        }

        let flags =
            transmission_flags::for_device(self.negotiated.structured_replies, self.writable);
        let mut export = Vec::with_capacity(12);
        export.extend_from_slice(&info::NBD_INFO_EXPORT.to_be_bytes());
        export.extend_from_slice(&self.size.to_be_bytes());
        export.extend_from_slice(&flags.to_be_bytes());
        self.send_reply(code, reply::NBD_REP_INFO, &export).await?;

        if requests.contains(&info::NBD_INFO_NAME) {
            let text = self.options.export_name.clone();
            self.send_info_string(code, info::NBD_INFO_NAME, &text)
                .await?;
        }
        if requests.contains(&info::NBD_INFO_DESCRIPTION) && !self.options.description.is_empty() {
            let text = self.options.description.clone();
            self.send_info_string(code, info::NBD_INFO_DESCRIPTION, &text)
                .await?;
        }

        // Sent whether or not requested: the specification allows unrequested
        // information, and clients that ignore it still get the defaults right.
        let mut block_size = Vec::with_capacity(14);
        block_size.extend_from_slice(&info::NBD_INFO_BLOCK_SIZE.to_be_bytes());
        block_size.extend_from_slice(&self.options.min_block.to_be_bytes());
        block_size.extend_from_slice(&self.options.preferred_block.to_be_bytes());
        block_size.extend_from_slice(&self.options.max_block.to_be_bytes());
        self.send_reply(code, reply::NBD_REP_INFO, &block_size)
            .await?;

        self.send_reply(code, reply::NBD_REP_ACK, &[]).await?;
        if code == option::NBD_OPT_GO {
            return Ok(Some(Outcome::Transmission(self.negotiated)));
        }
        Ok(None)
    }

    async fn send_info_string(&mut self, code: u32, kind: u16, text: &str) -> Result<(), NbdError> {
        let mut data = Vec::with_capacity(2 + text.len());
        data.extend_from_slice(&kind.to_be_bytes());
        data.extend_from_slice(text.as_bytes());
        self.send_reply(code, reply::NBD_REP_INFO, &data).await
    }

    /// Handles `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT` for the
    /// one context this server supports, `base:allocation`.
    async fn meta_context(&mut self, code: u32, data: &[u8]) -> Result<(), NbdError> {
        let set = code == option::NBD_OPT_SET_META_CONTEXT;
        if set {
            // A SET replaces the previous selection even when it fails.
            self.negotiated.base_allocation = false;
        }

        if !self.negotiated.structured_replies {
            warn!(
                option = option::name(code),
                "handshake: metadata context requested before NBD_OPT_STRUCTURED_REPLY"
            );
            let message = "negotiate NBD_OPT_STRUCTURED_REPLY before metadata contexts";
            return self.invalid(code, message).await;
        }
        let Ok((name, queries)) = parse_meta_context_request(data) else {
            warn!(
                option = option::name(code),
                "handshake: malformed option data"
            );
            let message = "malformed data: expected export name, query count, queries";
            return self.invalid(code, message).await;
        };
        if !self.options.selects_export(name) {
            let message = format!("unknown export {:?}", String::from_utf8_lossy(name));
            return self
                .send_reply(code, reply::NBD_REP_ERR_UNKNOWN, message.as_bytes())
                .await;
        }

        let matches = if set {
            queries
                .iter()
                .any(|query| *query == meta::BASE_ALLOCATION.as_bytes())
        } else {
            // With no query, LIST returns every context; "base:" is the
            // namespace wildcard that LIST must expand.
            queries.is_empty()
                || queries.iter().any(|query| {
                    *query == meta::BASE_ALLOCATION.as_bytes()
                        || *query == meta::BASE_NAMESPACE.as_bytes()
                })
        };
        if matches {
            // LIST replies carry the reserved id 0; SET assigns the real one.
            let id = if set { meta::BASE_ALLOCATION_ID } else { 0 };
            let mut context = Vec::with_capacity(4 + meta::BASE_ALLOCATION.len());
            context.extend_from_slice(&id.to_be_bytes());
            context.extend_from_slice(meta::BASE_ALLOCATION.as_bytes());
            self.send_reply(code, reply::NBD_REP_META_CONTEXT, &context)
                .await?;
        }
        if set {
            self.negotiated.base_allocation = matches;
        }
        self.send_reply(code, reply::NBD_REP_ACK, &[]).await
    }

    async fn invalid(&mut self, code: u32, message: &str) -> Result<(), NbdError> {
        self.send_reply(code, reply::NBD_REP_ERR_INVALID, message.as_bytes())
            .await
    }

    async fn send_reply(
        &mut self,
        code: u32,
        reply_type: u32,
        data: &[u8],
    ) -> Result<(), NbdError> {
        let bytes = encode_option_reply(code, reply_type, data);
        self.stream
            .write_all(&bytes)
            .await
            .map_err(NbdError::io("send an option reply"))
    }
}

/// Length of a string the server sends; its own strings are validated to at
/// most `MAX_STRING_LEN` bytes.
fn len_u32(bytes: &[u8]) -> u32 {
    u32::try_from(bytes.len()).unwrap_or(u32::MAX)
}

/// Parses `NBD_OPT_INFO`/`NBD_OPT_GO` data: name, request count, requests.
fn parse_info_request(data: &[u8]) -> Result<(&[u8], Vec<u16>), Malformed> {
    let mut reader = ByteReader::new(data);
    let name = reader.string_u32()?;
    let count = reader.u16()?;
    let mut requests = Vec::new();
    for _ in 0..count {
        requests.push(reader.u16()?);
    }
    reader.expect_empty()?;
    Ok((name, requests))
}

/// Parses metadata-context option data: export name, query count, queries.
fn parse_meta_context_request(data: &[u8]) -> Result<(&[u8], Vec<&[u8]>), Malformed> {
    let mut reader = ByteReader::new(data);
    let name = reader.string_u32()?;
    let count = reader.u32()?;
    let mut queries = Vec::new();
    for _ in 0..count {
        queries.push(reader.string_u32()?);
    }
    reader.expect_empty()?;
    Ok((name, queries))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info_data(name: &[u8], requests: &[u16]) -> Vec<u8> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name);
        data.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for request in requests {
            data.extend_from_slice(&request.to_be_bytes());
        }
        data
    }

    #[test]
    fn info_request_parses_name_and_requests() {
        let data = info_data(b"disk", &[info::NBD_INFO_NAME, info::NBD_INFO_BLOCK_SIZE]);
        let (name, requests) = parse_info_request(&data).unwrap();
        assert_eq!(name, b"disk");
        assert_eq!(
            requests,
            vec![info::NBD_INFO_NAME, info::NBD_INFO_BLOCK_SIZE]
        );
    }

    #[test]
    fn info_request_rejects_malformed_data() {
        let good = info_data(b"disk", &[1]);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", Vec::new()),
            ("truncated_request_list", good[..good.len() - 1].to_vec()),
            ("trailing_byte", [good.clone(), vec![0]].concat()),
            ("name_longer_than_data", {
                let mut data = good.clone();
                data[3] = 200;
                data
            }),
        ];
        for (case, data) in cases {
            assert_eq!(parse_info_request(&data), Err(Malformed), "case {case}");
        }
    }

    #[test]
    fn meta_context_request_parses_queries() {
        let mut data = 0u32.to_be_bytes().to_vec();
        data.extend_from_slice(&2u32.to_be_bytes());
        for query in [&b"base:allocation"[..], b"qemu:dirty-bitmap:x"] {
            data.extend_from_slice(&(query.len() as u32).to_be_bytes());
            data.extend_from_slice(query);
        }
        let (name, queries) = parse_meta_context_request(&data).unwrap();
        assert_eq!(name, b"");
        assert_eq!(
            queries,
            vec![&b"base:allocation"[..], b"qemu:dirty-bitmap:x"]
        );
    }

    #[test]
    fn meta_context_request_rejects_count_beyond_data() {
        let mut data = 0u32.to_be_bytes().to_vec();
        data.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_meta_context_request(&data), Err(Malformed));
    }
}
