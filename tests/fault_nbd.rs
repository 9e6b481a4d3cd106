//! Hostile NBD clients against the real `esgz-nbd serve` binary, over raw
//! unix sockets: malformed, oversized and unknown options, bad requests,
//! writes to the read-only export, clients that vanish mid-handshake or
//! mid-request, and hundreds of idle connections. After each case the server
//! still serves correct bytes, and its descriptor count returns to where it was.
//!
//! Needs libnbd-bin (nbdcopy) for the reference copy of the export.

#[path = "support/mod.rs"]
mod support;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::{fixture_dir, Server};

const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const NBD_REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1;
const NBD_FLAG_C_NO_ZEROES: u32 = 2;

const NBD_OPT_ABORT: u32 = 2;
const NBD_OPT_LIST: u32 = 3;
const NBD_OPT_GO: u32 = 7;

const NBD_REP_ACK: u32 = 1;
const NBD_REP_INFO: u32 = 3;
const NBD_REP_ERR_UNSUP: u32 = (1 << 31) | 1;
const NBD_REP_ERR_INVALID: u32 = (1 << 31) | 3;
const NBD_REP_ERR_TOO_BIG: u32 = (1 << 31) | 9;

const NBD_CMD_READ: u16 = 0;
const NBD_CMD_WRITE: u16 = 1;
const NBD_CMD_DISC: u16 = 2;
const NBD_CMD_TRIM: u16 = 4;
const NBD_CMD_WRITE_ZEROES: u16 = 6;

const EPERM: u32 = 1;
const EINVAL: u32 = 22;

/// Maximum wait for one reply; a longer wait counts as a hang.
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

/// A raw NBD connection with blocking I/O and timeouts.
struct RawClient {
    stream: UnixStream,
}

impl RawClient {
    fn connect(socket: &Path) -> RawClient {
        let stream = UnixStream::connect(socket).expect("connecting to the server socket");
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .expect("setting a read timeout");
        stream
            .set_write_timeout(Some(REPLY_TIMEOUT))
            .expect("setting a write timeout");
        RawClient { stream }
    }

    /// Reads the server greeting and sends the client flags.
    fn greet(socket: &Path) -> RawClient {
        let mut client = Self::connect(socket);
        assert_eq!(client.read_u64(), NBD_MAGIC, "greeting: NBDMAGIC");
        assert_eq!(client.read_u64(), IHAVEOPT, "greeting: IHAVEOPT");
        let _handshake_flags = client.read_u16();
        client.write(&(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).to_be_bytes());
        client
    }

    /// Completes the handshake with NBD_OPT_GO on the default export.
    fn open(socket: &Path) -> (RawClient, u64) {
        let mut client = Self::greet(socket);
        let size = client.go();
        (client, size)
    }

    fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("writing to the server");
    }

    fn read_exact(&mut self, len: usize) -> Vec<u8> {
        let mut buffer = vec![0u8; len];
        self.stream
            .read_exact(&mut buffer)
            .expect("reading from the server");
        buffer
    }

    fn read_u16(&mut self) -> u16 {
        u16::from_be_bytes(self.read_exact(2).try_into().expect("2 bytes"))
    }

    fn read_u32(&mut self) -> u32 {
        u32::from_be_bytes(self.read_exact(4).try_into().expect("4 bytes"))
    }

    fn read_u64(&mut self) -> u64 {
        u64::from_be_bytes(self.read_exact(8).try_into().expect("8 bytes"))
    }

    fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut message = Vec::new();
        message.extend_from_slice(&IHAVEOPT.to_be_bytes());
        message.extend_from_slice(&option.to_be_bytes());
        message.extend_from_slice(&(data.len() as u32).to_be_bytes());
        message.extend_from_slice(data);
        self.write(&message);
    }

    /// Reads one option reply; returns its type and data.
    fn read_option_reply(&mut self, option: u32) -> (u32, Vec<u8>) {
        assert_eq!(self.read_u64(), NBD_REP_MAGIC, "option reply magic");
        assert_eq!(self.read_u32(), option, "option reply names the option");
        let kind = self.read_u32();
        let length = self.read_u32() as usize;
        (kind, self.read_exact(length))
    }

    /// Sends NBD_OPT_GO for the empty export name; returns the export size.
    fn go(&mut self) -> u64 {
        self.send_option(NBD_OPT_GO, &[0, 0, 0, 0, 0, 0]);
        let mut size = None;
        loop {
            let (kind, data) = self.read_option_reply(NBD_OPT_GO);
            match kind {
                NBD_REP_INFO if data.len() >= 12 && data[0..2] == [0, 0] => {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().expect("8 bytes")));
                }
                NBD_REP_INFO => {}
                NBD_REP_ACK => break,
                other => panic!("NBD_OPT_GO failed with reply {other:#x}"),
            }
        }
        size.expect("NBD_OPT_GO sent NBD_INFO_EXPORT")
    }

    fn send_request(&mut self, kind: u16, cookie: u64, offset: u64, length: u32) {
        let mut message = Vec::new();
        message.extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        message.extend_from_slice(&0u16.to_be_bytes());
        message.extend_from_slice(&kind.to_be_bytes());
        message.extend_from_slice(&cookie.to_be_bytes());
        message.extend_from_slice(&offset.to_be_bytes());
        message.extend_from_slice(&length.to_be_bytes());
        self.write(&message);
    }

    /// Reads a simple reply; returns the error and, for a successful read of
    /// `read_len` bytes, the data.
    fn read_reply(&mut self, cookie: u64, read_len: usize) -> (u32, Vec<u8>) {
        assert_eq!(
            self.read_u32(),
            NBD_SIMPLE_REPLY_MAGIC,
            "simple reply magic"
        );
        let error = self.read_u32();
        assert_eq!(self.read_u64(), cookie, "reply cookie");
        let data = if error == 0 {
            self.read_exact(read_len)
        } else {
            Vec::new()
        };
        (error, data)
    }

    fn pread(&mut self, cookie: u64, offset: u64, length: u32) -> (u32, Vec<u8>) {
        self.send_request(NBD_CMD_READ, cookie, offset, length);
        self.read_reply(cookie, length as usize)
    }

    /// Returns whether the server closed the connection (EOF or reset).
    fn closed_by_server(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.stream.read(&mut byte), Ok(0) | Err(_))
    }
}

/// A served fixture and its whole export as nbdcopy read it.
struct Fixture {
    server: Server,
    disk: Vec<u8>,
    pid: u32,
}

impl Fixture {
    fn start() -> Fixture {
        let image = format!("oci:{}:latest", fixture_dir("links").join("oci").display());
        let server = Server::start(&image, &[]);
        let copy = server.dir().join("reference.img");
        let status = Command::new("timeout")
            .arg("120")
            .arg("nbdcopy")
            .arg(server.uri())
            .arg(&copy)
            .status()
            .expect("starting nbdcopy (apt-get install libnbd-bin)");
        assert!(status.success(), "nbdcopy failed; log:\n{}", server.log());
        let disk = fs::read(&copy).expect("reading the reference copy");
        let pid = server_pid(server.socket());
        Fixture { server, disk, pid }
    }

    fn socket(&self) -> &Path {
        self.server.socket()
    }

    fn open_fds(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.pid))
            .expect("listing the server's descriptors")
            .count()
    }

    /// Waits until the descriptor count is back at `baseline` (connections are
    /// closed by tasks that may still be running).
    fn assert_fds_back_to(&self, baseline: usize, case: &str) {
        let started = Instant::now();
        let mut now = self.open_fds();
        while now > baseline && started.elapsed() < Duration::from_secs(15) {
            std::thread::sleep(Duration::from_millis(100));
            now = self.open_fds();
        }
        assert!(
            now <= baseline,
            "{case}: {now} descriptors open, {baseline} before"
        );
    }

    /// Reads a few ranges on a fresh connection and compares them with the
    /// reference copy.
    fn assert_still_serves(&self, case: &str) {
        let (mut client, size) = RawClient::open(self.socket());
        assert_eq!(size, self.disk.len() as u64, "{case}: export size");
        for (cookie, offset) in [(1u64, 0u64), (2, 1024), (3, size - 4096)] {
            let (error, data) = client.pread(cookie, offset, 4096);
            assert_eq!(error, 0, "{case}: read at {offset:#x}");
            assert!(
                data == self.disk[offset as usize..offset as usize + 4096],
                "{case}: wrong bytes at {offset:#x}"
            );
        }
        client.send_request(NBD_CMD_DISC, 9, 0, 0);
    }
}

/// Finds the PID of the `esgz-nbd serve` process listening on `socket`.
fn server_pid(socket: &Path) -> u32 {
    let needle = socket.to_string_lossy().into_owned();
    for entry in fs::read_dir("/proc").expect("listing /proc") {
        let entry = entry.expect("a /proc entry");
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline);
        if text.contains("serve") && text.contains(&needle) {
            return pid;
        }
    }
    panic!("no process serves {}", socket.display());
}

/// Malformed, oversized and unknown options get the specified error reply,
/// and the same connection can still select the export afterwards.
#[test]
fn bad_options_rejected() {
    let fixture = Fixture::start();
    let baseline = fixture.open_fds();

    let mut client = RawClient::greet(fixture.socket());
    let cases: &[(&str, u32, Vec<u8>, &[u32])] = &[
        (
            "unknown option",
            0x00ab_cdef,
            vec![1, 2, 3],
            &[NBD_REP_ERR_UNSUP],
        ),
        (
            "option data over the limit",
            0x00ab_cdef,
            vec![0; 1 << 20],
            &[NBD_REP_ERR_TOO_BIG, NBD_REP_ERR_INVALID, NBD_REP_ERR_UNSUP],
        ),
        (
            "NBD_OPT_GO name longer than its data",
            NBD_OPT_GO,
            vec![0, 0, 0x10, 0, b'x', 0, 0],
            &[NBD_REP_ERR_INVALID],
        ),
        (
            "NBD_OPT_GO without data",
            NBD_OPT_GO,
            Vec::new(),
            &[NBD_REP_ERR_INVALID],
        ),
        (
            "NBD_OPT_LIST with data",
            NBD_OPT_LIST,
            vec![1],
            &[NBD_REP_ERR_INVALID],
        ),
    ];
    for (case, option, data, expected) in cases {
        client.send_option(*option, data);
        let (kind, _) = client.read_option_reply(*option);
        assert!(
            expected.contains(&kind),
            "{case}: reply {kind:#x}, expected one of {expected:x?}"
        );
    }
    let size = client.go();
    assert_eq!(
        size,
        fixture.disk.len() as u64,
        "export size after bad options"
    );
    let (error, data) = client.pread(1, 0, 512);
    assert_eq!(error, 0, "read after bad options");
    assert!(data == fixture.disk[..512], "bytes after bad options");
    drop(client);

    // A wrong option magic ends the handshake: the server closes.
    let mut client = RawClient::greet(fixture.socket());
    let mut message = 0x1122_3344_5566_7788u64.to_be_bytes().to_vec();
    message.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
    message.extend_from_slice(&0u32.to_be_bytes());
    client.write(&message);
    assert!(
        client.closed_by_server(),
        "bad option magic: connection stays open"
    );

    // NBD_OPT_ABORT gets an ACK and ends the connection.
    let mut client = RawClient::greet(fixture.socket());
    client.send_option(NBD_OPT_ABORT, &[]);
    let (kind, _) = client.read_option_reply(NBD_OPT_ABORT);
    assert_eq!(kind, NBD_REP_ACK, "NBD_OPT_ABORT reply");
    assert!(
        client.closed_by_server(),
        "NBD_OPT_ABORT: connection stays open"
    );

    fixture.assert_still_serves("bad options");
    fixture.assert_fds_back_to(baseline, "bad options");
}

/// Bad requests in transmission get the specified errors and the connection
/// keeps serving correct bytes.
#[test]
fn bad_requests_rejected() {
    let fixture = Fixture::start();
    let baseline = fixture.open_fds();
    let (mut client, size) = RawClient::open(fixture.socket());

    // (case, command, offset, length, expected errors)
    let cases: &[(&str, u16, u64, u32, &[u32])] = &[
        ("read past the end", NBD_CMD_READ, size, 4096, &[EINVAL]),
        (
            "read across the end",
            NBD_CMD_READ,
            size - 512,
            4096,
            &[EINVAL],
        ),
        (
            "read at u64 max",
            NBD_CMD_READ,
            u64::MAX - 10,
            4096,
            &[EINVAL],
        ),
        (
            "read over the block limit",
            NBD_CMD_READ,
            0,
            u32::MAX,
            &[EINVAL],
        ),
        (
            "trim on the read-only export",
            NBD_CMD_TRIM,
            0,
            4096,
            &[EPERM],
        ),
        (
            "write zeroes on the read-only export",
            NBD_CMD_WRITE_ZEROES,
            0,
            4096,
            &[EPERM],
        ),
        ("unknown command", 99, 0, 4096, &[EINVAL]),
    ];
    for (number, (case, kind, offset, length, expected)) in cases.iter().enumerate() {
        let cookie = 100 + number as u64;
        client.send_request(*kind, cookie, *offset, *length);
        let (error, _) = client.read_reply(cookie, 0);
        assert!(
            expected.contains(&error),
            "{case}: error {error}, expected one of {expected:?}"
        );
    }

    // A write carries a payload that the server must drain before EPERM.
    client.send_request(NBD_CMD_WRITE, 200, 0, 4096);
    client.write(&[0xaa; 4096]);
    let (error, _) = client.read_reply(200, 0);
    assert_eq!(error, EPERM, "write on the read-only export");

    // A zero-length read gets a reply without data, or EINVAL.
    client.send_request(NBD_CMD_READ, 201, 0, 0);
    let (error, data) = client.read_reply(201, 0);
    assert!(
        error == 0 || error == EINVAL,
        "zero-length read: error {error}"
    );
    assert!(data.is_empty(), "zero-length read returned data");

    // Unaligned reads return the same bytes as the reference copy.
    for (cookie, offset, length) in [(300u64, 1u64, 1u32), (301, 4095, 3), (302, 511, 70_001)] {
        let (error, data) = client.pread(cookie, offset, length);
        assert_eq!(error, 0, "unaligned read at {offset}");
        let start = offset as usize;
        assert!(
            data == fixture.disk[start..start + length as usize],
            "unaligned read at {offset}: wrong bytes"
        );
    }

    // A bad request magic ends the connection.
    client.write(&[0u8; 28]);
    assert!(
        client.closed_by_server(),
        "bad request magic: connection stays open"
    );

    fixture.assert_still_serves("bad requests");
    fixture.assert_fds_back_to(baseline, "bad requests");
}

/// Clients that vanish mid-handshake or mid-request leave no task or
/// descriptor behind.
#[test]
fn vanishing_clients_cleaned_up() {
    let fixture = Fixture::start();
    let baseline = fixture.open_fds();

    for round in 0..20u64 {
        // Connect and close at once.
        drop(RawClient::connect(fixture.socket()));
        // Close after the greeting, before the client flags.
        let mut client = RawClient::connect(fixture.socket());
        let _ = client.read_exact(18);
        drop(client);
        // Close inside an option header.
        let mut client = RawClient::greet(fixture.socket());
        client.write(&IHAVEOPT.to_be_bytes()[..5]);
        drop(client);
        // Close inside an option's data.
        let mut client = RawClient::greet(fixture.socket());
        let mut message = IHAVEOPT.to_be_bytes().to_vec();
        message.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
        message.extend_from_slice(&100u32.to_be_bytes());
        message.extend_from_slice(&[0; 10]);
        client.write(&message);
        drop(client);
        // Close inside a request header.
        let (mut client, _) = RawClient::open(fixture.socket());
        client.write(&NBD_REQUEST_MAGIC.to_be_bytes());
        drop(client);
        // Close inside a write payload.
        let (mut client, _) = RawClient::open(fixture.socket());
        client.send_request(NBD_CMD_WRITE, round, 0, 65536);
        client.write(&[0; 100]);
        drop(client);
        // Close with a large read in flight, before reading its reply.
        let (mut client, size) = RawClient::open(fixture.socket());
        let length = size.min(4 << 20) as u32;
        client.send_request(NBD_CMD_READ, round, 0, length);
        drop(client);
    }

    fixture.assert_fds_back_to(baseline, "vanishing clients");
    fixture.assert_still_serves("vanishing clients");
}

/// 300 connections that never finish the handshake: the server keeps at most
/// its limit open, closes idle handshakes after its timeout, keeps serving,
/// and its descriptor count returns to the baseline.
#[test]
fn idle_connections_bounded() {
    let fixture = Fixture::start();
    let baseline = fixture.open_fds();

    let idle: Vec<UnixStream> = (0..300)
        .map(|_| UnixStream::connect(fixture.socket()).expect("connecting an idle client"))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let during = fixture.open_fds();
    assert!(
        during < baseline + 300,
        "all 300 idle connections are held open ({during} descriptors, {baseline} before)"
    );

    // The handshake timeout (10 s) frees the slots without any client action.
    let started = Instant::now();
    loop {
        if fixture.open_fds() <= baseline {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "idle handshakes still open after 30 s: {} descriptors, {baseline} before",
            fixture.open_fds()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    fixture.assert_still_serves("after 300 idle connections");
    drop(idle);
    fixture.assert_fds_back_to(baseline, "after closing the idle clients");
}
