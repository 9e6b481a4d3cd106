//! Protocol tests of the NBD server with a raw client over an in-memory pipe.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;

use super::proto::{
    chunk, client_flags, command, command_flags, info, option, reply, NbdErrno, Request, IHAVEOPT,
    NBD_MAGIC, NBD_REP_MAGIC, NBD_REQUEST_MAGIC, NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
};
use super::{serve_connection, serve_transmission, NbdError, ServerOptions};
use crate::device::BlockDevice;

const SIZE: u64 = 1 << 20;
const BAD_OFFSET: u64 = 512 * 1024;
const SLOW_OFFSET: u64 = 256 * 1024;

/// 1 MiB whose byte at `offset` is `offset % 251`; reads touching the 4 KiB
/// at `BAD_OFFSET` fail, reads starting at `SLOW_OFFSET` take 300 ms.
struct TestDevice;

impl BlockDevice for TestDevice {
    fn size(&self) -> u64 {
        SIZE
    }

    async fn read(&self, offset: u64, len: u32) -> io::Result<Bytes> {
        let end = offset + u64::from(len);
        if offset < BAD_OFFSET + 4096 && end > BAD_OFFSET {
            return Err(io::Error::other("injected failure"));
        }
        if offset == SLOW_OFFSET {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Ok((offset..end).map(|at| (at % 251) as u8).collect())
    }
}

fn expected(offset: u64, len: u32) -> Vec<u8> {
    (offset..offset + u64::from(len))
        .map(|at| (at % 251) as u8)
        .collect()
}

struct Client {
    stream: DuplexStream,
    server: JoinHandle<Result<(), NbdError>>,
}

impl Client {
    /// Connects and reads the greeting; sends `flags` as the client flags.
    async fn connect_with_flags(flags: u32) -> Client {
        let (mut stream, server_side) = tokio::io::duplex(4 << 20);
        let options = Arc::new(ServerOptions {
            export_name: "disk".into(),
            description: "test disk".into(),
            max_block: 64 * 1024,
            ..ServerOptions::default()
        });
        let server = tokio::spawn(serve_connection(server_side, Arc::new(TestDevice), options));

        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting).await.unwrap();
        assert_eq!(&greeting[0..8], &NBD_MAGIC.to_be_bytes());
        assert_eq!(&greeting[8..16], &IHAVEOPT.to_be_bytes());
        assert_eq!(&greeting[16..18], &3u16.to_be_bytes());
        stream.write_all(&flags.to_be_bytes()).await.unwrap();
        Client { stream, server }
    }

    async fn connect() -> Client {
        let flags = client_flags::NBD_FLAG_C_FIXED_NEWSTYLE | client_flags::NBD_FLAG_C_NO_ZEROES;
        Client::connect_with_flags(flags).await
    }

    async fn send_option(&mut self, code: u32, data: &[u8]) {
        let mut out = IHAVEOPT.to_be_bytes().to_vec();
        out.extend_from_slice(&code.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        self.stream.write_all(&out).await.unwrap();
    }

    /// Reads one option reply; returns (option, reply type, data).
    async fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut header = [0u8; 20];
        self.stream.read_exact(&mut header).await.unwrap();
        assert_eq!(&header[0..8], &NBD_REP_MAGIC.to_be_bytes());
        let code = u32::from_be_bytes(header[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(header[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(header[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        self.stream.read_exact(&mut data).await.unwrap();
        (code, kind, data)
    }

    /// Sends `NBD_OPT_INFO` or `NBD_OPT_GO`; returns the replies up to the final one.
    async fn info_or_go(
        &mut self,
        code: u32,
        name: &[u8],
        requests: &[u16],
    ) -> Vec<(u32, Vec<u8>)> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name);
        data.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for request in requests {
            data.extend_from_slice(&request.to_be_bytes());
        }
        self.send_option(code, &data).await;
        let mut replies = Vec::new();
        loop {
            let (reply_option, kind, data) = self.option_reply().await;
            assert_eq!(reply_option, code);
            replies.push((kind, data));
            if kind != reply::NBD_REP_INFO {
                return replies;
            }
        }
    }

    async fn enable_structured_replies(&mut self) {
        self.send_option(option::NBD_OPT_STRUCTURED_REPLY, &[])
            .await;
        assert_eq!(self.option_reply().await.1, reply::NBD_REP_ACK);
    }

    async fn set_base_allocation(&mut self) {
        let query = b"base:allocation";
        let mut data = 0u32.to_be_bytes().to_vec();
        data.extend_from_slice(&1u32.to_be_bytes());
        data.extend_from_slice(&(query.len() as u32).to_be_bytes());
        data.extend_from_slice(query);
        self.send_option(option::NBD_OPT_SET_META_CONTEXT, &data)
            .await;
        let (_, kind, context) = self.option_reply().await;
        assert_eq!(kind, reply::NBD_REP_META_CONTEXT);
        assert_eq!(&context[4..], query);
        assert_eq!(self.option_reply().await.1, reply::NBD_REP_ACK);
    }

    async fn go(&mut self) {
        let replies = self.info_or_go(option::NBD_OPT_GO, b"", &[]).await;
        assert_eq!(replies.last().unwrap().0, reply::NBD_REP_ACK);
    }

    async fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, length: u32) {
        let request = Request {
            magic: NBD_REQUEST_MAGIC,
            flags,
            kind,
            cookie,
            offset,
            length,
        };
        self.stream.write_all(&request.encode()).await.unwrap();
    }

    /// Reads a simple reply header; returns (error, cookie).
    async fn simple_reply(&mut self) -> (u32, u64) {
        let mut header = [0u8; 16];
        self.stream.read_exact(&mut header).await.unwrap();
        assert_eq!(&header[0..4], &NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
        let error = u32::from_be_bytes(header[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(header[8..16].try_into().unwrap());
        (error, cookie)
    }

    async fn read_data(&mut self, len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        self.stream.read_exact(&mut data).await.unwrap();
        data
    }

    /// Reads a structured reply chunk; returns (flags, type, cookie, payload).
    async fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let mut header = [0u8; 20];
        self.stream.read_exact(&mut header).await.unwrap();
        assert_eq!(&header[0..4], &NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
        let flags = u16::from_be_bytes(header[4..6].try_into().unwrap());
        let kind = u16::from_be_bytes(header[6..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(header[8..16].try_into().unwrap());
        let len = u32::from_be_bytes(header[16..20].try_into().unwrap());
        let payload = self.read_data(len as usize).await;
        (flags, kind, cookie, payload)
    }

    /// Sends `NBD_CMD_DISC` and waits for the server to end the connection.
    async fn disconnect(mut self) -> Result<(), NbdError> {
        self.request(command::NBD_CMD_DISC, 0, 0, 0, 0).await;
        let mut rest = Vec::new();
        self.stream.read_to_end(&mut rest).await.unwrap();
        assert!(
            rest.is_empty(),
            "unexpected bytes after NBD_CMD_DISC: {rest:?}"
        );
        self.finish().await
    }

    async fn finish(self) -> Result<(), NbdError> {
        tokio::time::timeout(Duration::from_secs(5), self.server)
            .await
            .expect("server task did not end")
            .expect("server task panicked")
    }
}

fn be_u32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes.try_into().unwrap())
}

#[tokio::test]
async fn go_then_simple_read() {
    let mut client = Client::connect().await;
    let replies = client
        .info_or_go(
            option::NBD_OPT_GO,
            b"disk",
            &[info::NBD_INFO_NAME, info::NBD_INFO_DESCRIPTION],
        )
        .await;

    let export = &replies
        .iter()
        .find(|(_, data)| data[0..2] == [0, 0])
        .unwrap()
        .1;
    assert_eq!(export.len(), 12);
    assert_eq!(u64::from_be_bytes(export[2..10].try_into().unwrap()), SIZE);
    let name = &replies
        .iter()
        .find(|(_, data)| data[0..2] == [0, 1])
        .unwrap()
        .1;
    assert_eq!(&name[2..], b"disk");
    let description = &replies
        .iter()
        .find(|(_, data)| data[0..2] == [0, 2])
        .unwrap()
        .1;
    assert_eq!(&description[2..], b"test disk");
    let block = &replies
        .iter()
        .find(|(_, data)| data[0..2] == [0, 3])
        .unwrap()
        .1;
    assert_eq!(be_u32(&block[2..6]), 1);
    assert_eq!(be_u32(&block[6..10]), 4096);
    assert_eq!(be_u32(&block[10..14]), 64 * 1024);
    assert_eq!(replies.last().unwrap().0, reply::NBD_REP_ACK);

    client
        .request(command::NBD_CMD_READ, 0, 42, 4096, 8192)
        .await;
    assert_eq!(client.simple_reply().await, (0, 42));
    assert_eq!(client.read_data(8192).await, expected(4096, 8192));
    client.disconnect().await.unwrap();
}

#[tokio::test]
async fn export_name_with_no_zeroes_sends_ten_bytes() {
    let mut client = Client::connect().await;
    client
        .send_option(option::NBD_OPT_EXPORT_NAME, b"disk")
        .await;
    let mut reply = [0u8; 10];
    client.stream.read_exact(&mut reply).await.unwrap();
    assert_eq!(u64::from_be_bytes(reply[0..8].try_into().unwrap()), SIZE);
    let flags = u16::from_be_bytes([reply[8], reply[9]]);
    assert_eq!(flags & 0b11, 0b11, "HAS_FLAGS and READ_ONLY");

    // The next bytes are transmission replies, not padding.
    client.request(command::NBD_CMD_FLUSH, 0, 9, 0, 0).await;
    assert_eq!(client.simple_reply().await, (0, 9));
    client.disconnect().await.unwrap();
}

#[tokio::test]
async fn export_name_without_no_zeroes_sends_padding() {
    let mut client = Client::connect_with_flags(client_flags::NBD_FLAG_C_FIXED_NEWSTYLE).await;
    client.send_option(option::NBD_OPT_EXPORT_NAME, b"").await;
    let reply = client.read_data(10 + 124).await;
    assert!(reply[10..].iter().all(|byte| *byte == 0));
    client.disconnect().await.unwrap();
}

#[tokio::test]
async fn export_name_unknown_closes_connection() {
    let mut client = Client::connect().await;
    client
        .send_option(option::NBD_OPT_EXPORT_NAME, b"other")
        .await;
    let mut rest = Vec::new();
    client.stream.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    let result = client.finish().await;
    assert!(
        matches!(result, Err(NbdError::UnknownExport { .. })),
        "{result:?}"
    );
}

#[tokio::test]
async fn go_unknown_export_answers_err_unknown() {
    let mut client = Client::connect().await;
    let replies = client.info_or_go(option::NBD_OPT_GO, b"other", &[]).await;
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].0, reply::NBD_REP_ERR_UNKNOWN);

    // The client may try again after an error.
    client.go().await;
    client.disconnect().await.unwrap();
}

#[tokio::test]
async fn info_does_not_enter_transmission() {
    let mut client = Client::connect().await;
    let replies = client.info_or_go(option::NBD_OPT_INFO, b"disk", &[]).await;
    assert_eq!(replies.last().unwrap().0, reply::NBD_REP_ACK);
    client.send_option(option::NBD_OPT_LIST, &[]).await;
    let (_, kind, server) = client.option_reply().await;
    assert_eq!(kind, reply::NBD_REP_SERVER);
    assert_eq!(be_u32(&server[0..4]), 4);
    assert_eq!(&server[4..8], b"disk");
    assert_eq!(&server[8..], b"test disk");
    assert_eq!(client.option_reply().await.1, reply::NBD_REP_ACK);
    client.send_option(option::NBD_OPT_ABORT, &[]).await;
    assert_eq!(client.option_reply().await.1, reply::NBD_REP_ACK);
    client.finish().await.unwrap();
}

#[tokio::test]
async fn bad_option_magic_closes_connection() {
    let mut client = Client::connect().await;
    client.stream.write_all(&[0x55; 16]).await.unwrap();
    let result = client.finish().await;
    assert!(
        matches!(result, Err(NbdError::OptionMagic { .. })),
        "{result:?}"
    );
}

#[tokio::test]
async fn unknown_client_flags_close_connection() {
    let client = Client::connect_with_flags(1 << 7).await;
    let result = client.finish().await;
    assert!(
        matches!(result, Err(NbdError::UnknownClientFlags { flags: 0x80 })),
        "{result:?}"
    );
}

#[tokio::test]
async fn unknown_option_answers_unsup_and_continues() {
    let mut client = Client::connect().await;
    client.send_option(0x1234, b"ignored data").await;
    let (code, kind, _) = client.option_reply().await;
    assert_eq!(code, 0x1234);
    assert_eq!(kind, reply::NBD_REP_ERR_UNSUP);
    client.go().await;
    client.disconnect().await.unwrap();
}

#[tokio::test]
async fn oversized_option_answers_too_big_and_continues() {
    let mut client = Client::connect().await;
    client
        .send_option(option::NBD_OPT_INFO, &vec![0u8; 100 * 1024])
        .await;
    let (code, kind, _) = client.option_reply().await;
    assert_eq!(code, option::NBD_OPT_INFO);
    assert_eq!(kind, reply::NBD_REP_ERR_TOO_BIG);
    client.go().await;
    client.disconnect().await.unwrap();
}

#[tokio::test]
async fn malformed_options_answer_invalid() {
    let mut client = Client::connect().await;
    let cases: [(&str, u32, &[u8]); 3] = [
        ("list_with_data", option::NBD_OPT_LIST, b"x"),
        (
            "structured_reply_with_data",
            option::NBD_OPT_STRUCTURED_REPLY,
            b"x",
        ),
        ("go_truncated", option::NBD_OPT_GO, &[0, 0, 0, 9, b'd']),
    ];
    for (case, code, data) in cases {
        client.send_option(code, data).await;
        let (reply_code, kind, _) = client.option_reply().await;
        assert_eq!(reply_code, code, "case {case}");
        assert_eq!(kind, reply::NBD_REP_ERR_INVALID, "case {case}");
    }
    client.go().await;
    client.disconnect().await.unwrap();
}

#[tokio::test]
async fn meta_context_requires_structured_replies() {
    let mut client = Client::connect().await;
    let data = [0u8; 8];
    client
        .send_option(option::NBD_OPT_SET_META_CONTEXT, &data)
        .await;
    assert_eq!(client.option_reply().await.1, reply::NBD_REP_ERR_INVALID);
    client.go().await;

    client
        .request(command::NBD_CMD_BLOCK_STATUS, 0, 3, 0, 4096)
        .await;
    assert_eq!(client.simple_reply().await, (NbdErrno::Inval.code(), 3));
    client.disconnect().await.unwrap();
}

#[tokio::test]
async fn list_meta_context_without_queries_returns_base_allocation() {
    let mut client = Client::connect().await;
    client.enable_structured_replies().await;
    client
        .send_option(option::NBD_OPT_LIST_META_CONTEXT, &[0u8; 8])
        .await;
    let (_, kind, context) = client.option_reply().await;
    assert_eq!(kind, reply::NBD_REP_META_CONTEXT);
    assert_eq!(be_u32(&context[0..4]), 0);
    assert_eq!(&context[4..], b"base:allocation");
    assert_eq!(client.option_reply().await.1, reply::NBD_REP_ACK);
    client.send_option(option::NBD_OPT_ABORT, &[]).await;
    assert_eq!(client.option_reply().await.1, reply::NBD_REP_ACK);
    client.finish().await.unwrap();
}

#[tokio::test]
async fn structured_read_block_status_and_errors() {
    let mut client = Client::connect().await;
    client.enable_structured_replies().await;
    client.set_base_allocation().await;
    client.go().await;

    client
        .request(
            command::NBD_CMD_READ,
            command_flags::NBD_CMD_FLAG_DF,
            1,
            8192,
            4096,
        )
        .await;
    let (flags, kind, cookie, payload) = client.chunk().await;
    assert_eq!(
        (flags, kind, cookie),
        (
            chunk::NBD_REPLY_FLAG_DONE,
            chunk::NBD_REPLY_TYPE_OFFSET_DATA,
            1
        )
    );
    assert_eq!(u64::from_be_bytes(payload[0..8].try_into().unwrap()), 8192);
    assert_eq!(&payload[8..], &expected(8192, 4096)[..]);

    client
        .request(command::NBD_CMD_BLOCK_STATUS, 0, 2, 0, 65536)
        .await;
    let (flags, kind, cookie, payload) = client.chunk().await;
    assert_eq!(
        (flags, kind, cookie),
        (
            chunk::NBD_REPLY_FLAG_DONE,
            chunk::NBD_REPLY_TYPE_BLOCK_STATUS,
            2
        )
    );
    assert_eq!(payload.len(), 12);
    assert_eq!(be_u32(&payload[4..8]), 65536);
    assert_eq!(be_u32(&payload[8..12]), 0);

    client
        .request(command::NBD_CMD_READ, 0, 3, BAD_OFFSET, 4096)
        .await;
    let (flags, kind, cookie, payload) = client.chunk().await;
    assert_eq!(
        (flags, kind, cookie),
        (chunk::NBD_REPLY_FLAG_DONE, chunk::NBD_REPLY_TYPE_ERROR, 3)
    );
    assert_eq!(be_u32(&payload[0..4]), NbdErrno::Io.code());
    let message_len = u16::from_be_bytes([payload[4], payload[5]]) as usize;
    assert_eq!(payload.len(), 6 + message_len);

    client.request(command::NBD_CMD_READ, 0, 4, 0, 0).await;
    let (flags, kind, cookie, payload) = client.chunk().await;
    assert_eq!(
        (flags, kind, cookie),
        (chunk::NBD_REPLY_FLAG_DONE, chunk::NBD_REPLY_TYPE_NONE, 4)
    );
    assert!(payload.is_empty());
    client.disconnect().await.unwrap();
}

#[tokio::test]
async fn simple_request_errors_keep_connection() {
    let mut client = Client::connect().await;
    client.go().await;

    let cases: [(&str, u16, u16, u64, u32, NbdErrno); 7] = [
        (
            "read_past_end",
            command::NBD_CMD_READ,
            0,
            SIZE - 4096,
            8192,
            NbdErrno::Inval,
        ),
        (
            "read_offset_overflow",
            command::NBD_CMD_READ,
            0,
            u64::MAX,
            1,
            NbdErrno::Inval,
        ),
        (
            "read_over_max_block",
            command::NBD_CMD_READ,
            0,
            0,
            128 * 1024,
            NbdErrno::Inval,
        ),
        (
            "read_device_error",
            command::NBD_CMD_READ,
            0,
            BAD_OFFSET,
            4096,
            NbdErrno::Io,
        ),
        (
            "read_df_without_structured",
            command::NBD_CMD_READ,
            command_flags::NBD_CMD_FLAG_DF,
            0,
            512,
            NbdErrno::Inval,
        ),
        (
            "trim_read_only",
            command::NBD_CMD_TRIM,
            0,
            0,
            4096,
            NbdErrno::Perm,
        ),
        ("unknown_command", 99, 0, 0, 0, NbdErrno::Inval),
    ];
    for (cookie, (case, kind, flags, offset, length, errno)) in cases.into_iter().enumerate() {
        client
            .request(kind, flags, cookie as u64, offset, length)
            .await;
        assert_eq!(
            client.simple_reply().await,
            (errno.code(), cookie as u64),
            "case {case}"
        );
    }

    // Reads around the failing range still work.
    client
        .request(command::NBD_CMD_READ, 0, 100, BAD_OFFSET + 4096, 4096)
        .await;
    assert_eq!(client.simple_reply().await, (0, 100));
    assert_eq!(
        client.read_data(4096).await,
        expected(BAD_OFFSET + 4096, 4096)
    );
    client.disconnect().await.unwrap();
}

#[tokio::test]
async fn write_payload_drained_then_eperm() {
    let mut client = Client::connect().await;
    client.go().await;

    client.request(command::NBD_CMD_WRITE, 0, 7, 0, 4096).await;
    client.stream.write_all(&[0xaa; 4096]).await.unwrap();
    assert_eq!(client.simple_reply().await, (NbdErrno::Perm.code(), 7));

    // The payload bytes were not taken for a request header.
    client.request(command::NBD_CMD_READ, 0, 8, 0, 512).await;
    assert_eq!(client.simple_reply().await, (0, 8));
    assert_eq!(client.read_data(512).await, expected(0, 512));
    client.disconnect().await.unwrap();
}

#[tokio::test]
async fn zero_length_simple_read_succeeds_without_data() {
    let mut client = Client::connect().await;
    client.go().await;
    client.request(command::NBD_CMD_READ, 0, 5, 4096, 0).await;
    assert_eq!(client.simple_reply().await, (0, 5));
    client.request(command::NBD_CMD_FLUSH, 0, 6, 0, 0).await;
    assert_eq!(client.simple_reply().await, (0, 6));
    client.disconnect().await.unwrap();
}

#[tokio::test]
async fn cache_prefetches_and_checks_range() {
    let mut client = Client::connect().await;
    client.go().await;
    client.request(command::NBD_CMD_CACHE, 0, 1, 0, 65536).await;
    assert_eq!(client.simple_reply().await, (0, 1));
    client
        .request(command::NBD_CMD_CACHE, 0, 2, SIZE, 4096)
        .await;
    assert_eq!(client.simple_reply().await, (NbdErrno::Inval.code(), 2));
    client.disconnect().await.unwrap();
}

#[tokio::test]
async fn replies_leave_out_of_order() {
    let mut client = Client::connect().await;
    client.go().await;
    client
        .request(command::NBD_CMD_READ, 0, 1, SLOW_OFFSET, 4096)
        .await;
    client.request(command::NBD_CMD_READ, 0, 2, 0, 4096).await;

    assert_eq!(client.simple_reply().await, (0, 2), "fast read first");
    assert_eq!(client.read_data(4096).await, expected(0, 4096));
    assert_eq!(client.simple_reply().await, (0, 1));
    assert_eq!(client.read_data(4096).await, expected(SLOW_OFFSET, 4096));
    client.disconnect().await.unwrap();
}

#[tokio::test]
async fn disc_waits_for_in_flight_reads() {
    let mut client = Client::connect().await;
    client.go().await;
    client
        .request(command::NBD_CMD_READ, 0, 1, SLOW_OFFSET, 4096)
        .await;
    client.request(command::NBD_CMD_DISC, 0, 2, 0, 0).await;

    let mut rest = Vec::new();
    client.stream.read_to_end(&mut rest).await.unwrap();
    assert_eq!(
        rest.len(),
        16 + 4096,
        "the slow read's reply arrives before the close"
    );
    assert_eq!(&rest[16..], &expected(SLOW_OFFSET, 4096)[..]);
    client.finish().await.unwrap();
}

#[tokio::test]
async fn disconnect_mid_handshake_ends_task() {
    let mut client = Client::connect().await;
    client
        .stream
        .write_all(&IHAVEOPT.to_be_bytes())
        .await
        .unwrap();
    client.stream.shutdown().await.unwrap();
    let result = client.finish().await;
    assert!(matches!(result, Err(NbdError::Io { .. })), "{result:?}");
}

#[tokio::test]
async fn disconnect_between_options_is_clean() {
    let mut client = Client::connect().await;
    client.stream.shutdown().await.unwrap();
    client.finish().await.unwrap();
}

#[tokio::test]
async fn disconnect_mid_request_ends_task() {
    let mut client = Client::connect().await;
    client.go().await;
    client
        .request(command::NBD_CMD_READ, 0, 1, SLOW_OFFSET, 4096)
        .await;
    client
        .stream
        .write_all(&NBD_REQUEST_MAGIC.to_be_bytes())
        .await
        .unwrap();
    client.stream.shutdown().await.unwrap();
    let result = client.finish().await;
    assert!(matches!(result, Err(NbdError::Io { .. })), "{result:?}");
}

#[tokio::test]
async fn client_gone_with_reads_in_flight_ends_task() {
    let mut client = Client::connect().await;
    client.go().await;
    for cookie in 0..8 {
        client
            .request(command::NBD_CMD_READ, 0, cookie, SLOW_OFFSET, 4096)
            .await;
    }
    let Client { stream, server } = client;
    drop(stream);
    let result = tokio::time::timeout(Duration::from_secs(5), server).await;
    assert!(result.expect("server task did not end").is_ok(), "no panic");
}

#[tokio::test]
async fn bad_request_magic_closes_connection() {
    let mut client = Client::connect().await;
    client.go().await;
    client.stream.write_all(&[0x11; 28]).await.unwrap();
    let result = client.finish().await;
    assert!(
        matches!(result, Err(NbdError::RequestMagic { .. })),
        "{result:?}"
    );
}

#[test]
fn server_options_validation() {
    let valid = ServerOptions::default();
    assert!(valid.validate().is_ok());

    let cases: Vec<(&str, ServerOptions, &str)> = vec![
        (
            "min_block_not_power_of_two",
            ServerOptions {
                min_block: 3,
                ..valid.clone()
            },
            "min_block",
        ),
        (
            "min_block_too_large",
            ServerOptions {
                min_block: 1 << 17,
                ..valid.clone()
            },
            "min_block",
        ),
        (
            "preferred_below_512",
            ServerOptions {
                preferred_block: 256,
                ..valid.clone()
            },
            "preferred_block",
        ),
        (
            "preferred_below_min",
            ServerOptions {
                min_block: 8192,
                ..valid.clone()
            },
            "preferred_block",
        ),
        (
            "max_below_preferred",
            ServerOptions {
                max_block: 1024,
                ..valid.clone()
            },
            "max_block",
        ),
        (
            "max_over_limit",
            ServerOptions {
                max_block: u32::MAX,
                ..valid.clone()
            },
            "max_block",
        ),
        (
            "no_connections",
            ServerOptions {
                connections_limit: 0,
                ..valid.clone()
            },
            "connections_limit",
        ),
        (
            "long_name",
            ServerOptions {
                export_name: "x".repeat(4097),
                ..valid.clone()
            },
            "export_name",
        ),
    ];
    for (case, options, expected_field) in cases {
        match options.validate() {
            Err(NbdError::InvalidOptions { field, .. }) => {
                assert_eq!(field, expected_field, "case {case}")
            }
            other => panic!("case {case}: expected InvalidOptions, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn transmission_without_handshake_uses_simple_replies() {
    let (stream, server_side) = tokio::io::duplex(1 << 20);
    let options = Arc::new(ServerOptions::default());
    let server = tokio::spawn(serve_transmission(
        server_side,
        Arc::new(TestDevice),
        options,
    ));
    let mut client = Client { stream, server };

    client
        .request(command::NBD_CMD_READ, 0, 1, 8192, 4096)
        .await;
    assert_eq!(client.simple_reply().await, (0, 1));
    assert_eq!(client.read_data(4096).await, expected(8192, 4096));
    client
        .request(command::NBD_CMD_READ, 0, 2, BAD_OFFSET, 4096)
        .await;
    assert_eq!(client.simple_reply().await, (NbdErrno::Io.code(), 2));
    client.disconnect().await.unwrap();
}
