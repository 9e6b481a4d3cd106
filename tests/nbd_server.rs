//! End-to-end tests of the NBD server with real clients: nbdinfo, nbdcopy and
//! nbdsh (libnbd-bin, python3-libnbd) and qemu-img (qemu-utils).

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use esgz_nbd::device::BlockDevice;
use esgz_nbd::nbd::{serve_tcp_listener, serve_unix, ListenError, ServerOptions};
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const SIZE: u64 = 64 << 20;
/// Reads touching these 64 KiB fail with an I/O error.
const BAD_OFFSET: u64 = 8 << 20;
const BAD_LEN: u64 = 64 << 10;
/// Reads touching this 4 KiB block take `SLOW_DELAY`.
const SLOW_OFFSET: u64 = 16 << 20;
const SLOW_DELAY: Duration = Duration::from_millis(1500);

/// Computes the byte at `offset` of the test device, as `PY_CONTENT` does in Python.
fn content_byte(offset: u64) -> u8 {
    (offset.wrapping_mul(0x9e37_79b9) >> 24) as u8
}

/// Python version of [`content_byte`] over a range, for `nbdsh` scripts.
const PY_CONTENT: &str =
    "def content(off, n):\n    return bytes((((o * 0x9e3779b9) % (1 << 64)) >> 24) & 0xff for o in range(off, off + n))\n";

/// A 64 MiB pseudo-random device with an optional failing and slow range.
struct TestDevice {
    data: Bytes,
    faults: bool,
}

impl TestDevice {
    fn new(faults: bool) -> Arc<TestDevice> {
        // Built once: 64 MiB byte by byte is slow in a debug build.
        static DATA: OnceLock<Bytes> = OnceLock::new();
        let data = DATA.get_or_init(|| (0..SIZE).map(content_byte).collect::<Vec<u8>>().into());
        Arc::new(TestDevice {
            data: data.clone(),
            faults,
        })
    }
}

impl BlockDevice for TestDevice {
    fn size(&self) -> u64 {
        SIZE
    }

    async fn read(&self, offset: u64, len: u32) -> io::Result<Bytes> {
        let end = offset + u64::from(len);
        if self.faults && offset < BAD_OFFSET + BAD_LEN && end > BAD_OFFSET {
            return Err(io::Error::other("injected failure in the bad range"));
        }
        if self.faults && offset < SLOW_OFFSET + 4096 && end > SLOW_OFFSET {
            tokio::time::sleep(SLOW_DELAY).await;
        }
        Ok(self.data.slice(offset as usize..end as usize))
    }
}

fn options() -> ServerOptions {
    ServerOptions {
        export_name: "disk".into(),
        description: "esgz-nbd test device".into(),
        ..ServerOptions::default()
    }
}

/// A running server and the means to stop it.
struct Server {
    uri: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<anyhow::Result<()>>,
    _dir: Option<tempfile::TempDir>,
    socket: Option<PathBuf>,
}

impl Server {
    async fn unix(device: Arc<TestDevice>, options: ServerOptions) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let (stop, shutdown) = watch::channel(false);
        let path = socket.clone();
        let task = tokio::spawn(async move { serve_unix(&path, device, options, shutdown).await });
        wait_for_socket(&socket).await;
        Server {
            uri: format!("nbd+unix:///disk?socket={}", socket.display()),
            stop,
            task,
            _dir: Some(dir),
            socket: Some(socket),
        }
    }

    async fn tcp(device: Arc<TestDevice>, options: ServerOptions) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(serve_tcp_listener(listener, device, options, shutdown));
        Server {
            uri: format!("nbd://{address}/disk"),
            stop,
            task,
            _dir: None,
            socket: None,
        }
    }

    async fn shutdown(self) {
        self.stop.send(true).unwrap();
        let result = tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("server did not stop within 15 s")
            .expect("server task panicked");
        result.unwrap();
        if let Some(socket) = &self.socket {
            assert!(
                !socket.exists(),
                "socket file left behind at {}",
                socket.display()
            );
        }
    }
}

async fn wait_for_socket(path: &Path) {
    for _ in 0..200 {
        if path.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("server did not create {}", path.display());
}

/// Fails the test, naming the tool and its package, when a client is missing.
fn require_tool(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "required tool `{tool}` not found in PATH; install the Debian package {package}"
    );
}

/// Runs a client command with a 60 s timeout and returns its output.
async fn run(program: &str, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(program);
    command.args(args).kill_on_drop(true);
    // nbdsh runs `python3 -m nbd`; the distribution's python3 has the module.
    command.env(
        "PATH",
        format!(
            "/usr/bin:/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        ),
    );
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish within 60 s"))
        .unwrap_or_else(|error| panic!("failed to run {program}: {error}"));
    output
}

async fn run_ok(program: &str, args: &[&str]) -> String {
    let output = run(program, args).await;
    assert!(
        output.status.success(),
        "{program} {args:?} failed with {}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs a Python script in nbdsh with an unconnected handle `h`.
async fn nbdsh(script: &str) -> String {
    require_tool("nbdsh", "libnbd-bin and python3-libnbd");
    let script = format!("import errno, nbd, time\n{PY_CONTENT}{script}");
    run_ok("nbdsh", &["-c", &script]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_lists_and_describes_export() {
    require_tool("nbdinfo", "libnbd-bin");
    let server = Server::unix(TestDevice::new(true), options()).await;
    let socket = server.socket.clone().unwrap();

    let list = run_ok(
        "nbdinfo",
        &[
            "--list",
            "--json",
            &format!("nbd+unix:///?socket={}", socket.display()),
        ],
    )
    .await;
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let exports = list["exports"].as_array().unwrap();
    assert_eq!(exports.len(), 1, "{list}");
    assert_eq!(exports[0]["export-name"], "disk", "{list}");
    assert_eq!(exports[0]["description"], "esgz-nbd test device", "{list}");

    let info = run_ok("nbdinfo", &["--json", &server.uri]).await;
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], SIZE, "{info}");
    assert_eq!(export["is_read_only"], true, "{info}");
    assert_eq!(export["can_flush"], true, "{info}");
    assert_eq!(export["can_cache"], true, "{info}");
    assert_eq!(export["can_multi_conn"], true, "{info}");
    assert_eq!(export["can_df"], true, "{info}");
    assert_eq!(export["can_trim"], false, "{info}");
    assert_eq!(export["block_size_minimum"], 1, "{info}");
    assert_eq!(export["block_size_preferred"], 4096, "{info}");
    assert_eq!(export["block_size_maximum"], 32 << 20, "{info}");
    let contexts = export["contexts"].as_array().unwrap();
    assert!(
        contexts.iter().any(|context| context == "base:allocation"),
        "{info}"
    );
    assert_eq!(info["protocol"], "newstyle-fixed", "{info}");

    // The empty name selects the same export.
    let default = run_ok(
        "nbdinfo",
        &[
            "--size",
            &format!("nbd+unix:///?socket={}", socket.display()),
        ],
    )
    .await;
    assert_eq!(default.trim(), SIZE.to_string());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_info_over_unix_and_tcp() {
    require_tool("qemu-img", "qemu-utils");
    for server in [
        Server::unix(TestDevice::new(true), options()).await,
        Server::tcp(TestDevice::new(true), options()).await,
    ] {
        let info = run_ok("qemu-img", &["info", "--output=json", &server.uri]).await;
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(info["virtual-size"], SIZE, "{} {info}", server.uri);
        assert_eq!(info["format"], "raw", "{info}");
        server.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_and_qemu_img_compare_whole_export() {
    require_tool("nbdcopy", "libnbd-bin");
    require_tool("qemu-img", "qemu-utils");
    let device = TestDevice::new(false);
    let server = Server::unix(Arc::clone(&device), options()).await;
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.img");
    let copy_arg = copy.to_str().unwrap();

    run_ok("nbdcopy", &[&server.uri, copy_arg]).await;
    let bytes = std::fs::read(&copy).unwrap();
    assert_eq!(bytes.len() as u64, SIZE);
    let first_mismatch = bytes
        .iter()
        .zip(device.data.iter())
        .position(|(a, b)| a != b);
    assert_eq!(
        first_mismatch, None,
        "nbdcopy output differs from the device"
    );

    // qemu reads through its own client (structured replies, block status).
    run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", copy_arg, &server.uri],
    )
    .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_over_tcp_matches_device() {
    require_tool("nbdcopy", "libnbd-bin");
    let device = TestDevice::new(false);
    let server = Server::tcp(Arc::clone(&device), options()).await;
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.img");

    run_ok(
        "nbdcopy",
        &["--connections=2", &server.uri, copy.to_str().unwrap()],
    )
    .await;
    let bytes = std::fs::read(&copy).unwrap();
    assert!(
        bytes == device.data,
        "nbdcopy over TCP differs from the device"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_range_gives_eio_and_connection_keeps_serving() {
    let server = Server::unix(TestDevice::new(true), options()).await;
    for structured in ["True", "False"] {
        let script = format!(
            r#"
h.set_request_structured_replies({structured})
h.connect_uri({uri:?})
assert h.get_structured_replies_negotiated() == {structured}
for offset in ({bad}, {bad} + 4096, {bad} - 512):
    try:
        h.pread(4096, offset)
        raise SystemExit("read at %d succeeded; expected EIO" % offset)
    except nbd.Error as e:
        assert e.errnum == errno.EIO, "read at %d: %r" % (offset, e)
assert h.pread(65536, 0) == content(0, 65536)
assert h.pread(4096, {after}) == content({after}, 4096)
assert h.pread(1000, 12345) == content(12345, 1000)
try:
    h.pread(4096, {size} - 2048)
    raise SystemExit("read past the end succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, repr(e)
h.cache(1 << 20, 0)
h.flush()
try:
    h.pwrite(b"x" * 4096, 0)
    raise SystemExit("write succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EPERM, repr(e)
assert h.pread(4096, 4096) == content(4096, 4096)
h.shutdown()
print("ok")
"#,
            uri = server.uri,
            bad = BAD_OFFSET,
            after = BAD_OFFSET + BAD_LEN,
            size = SIZE,
        );
        let output = nbdsh(&script).await;
        assert_eq!(output.trim(), "ok", "structured replies {structured}");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_read_overtakes_slow_read() {
    let server = Server::unix(TestDevice::new(true), options()).await;
    let script = format!(
        r#"
h.connect_uri({uri:?})
slow_buf = nbd.Buffer(4096)
fast_buf = nbd.Buffer(4096)
start = time.monotonic()
slow = h.aio_pread(slow_buf, {slow})
fast = h.aio_pread(fast_buf, 0)
order = []
while len(order) < 2:
    cookie = h.aio_peek_command_completed()
    if cookie == 0:
        h.poll(-1)
        continue
    h.aio_command_completed(cookie)
    order.append((cookie, time.monotonic() - start))
assert [c for c, _ in order] == [fast, slow], "completion order %r, fast=%d slow=%d" % (order, fast, slow)
assert order[0][1] < 1.0, "fast read took %.2f s" % order[0][1]
assert fast_buf.to_bytearray() == content(0, 4096)
assert slow_buf.to_bytearray() == content({slow}, 4096)
h.shutdown()
print("ok")
"#,
        uri = server.uri,
        slow = SLOW_OFFSET,
    );
    assert_eq!(nbdsh(&script).await.trim(), "ok");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_status_reports_allocated_data() {
    let server = Server::tcp(TestDevice::new(true), options()).await;
    let script = format!(
        r#"
h.add_meta_context("base:allocation")
h.connect_uri({uri:?})
assert h.can_meta_context("base:allocation")
seen = []
def extent(context, offset, entries, err):
    seen.append((context, offset, list(entries)))
    return 0
h.block_status(1 << 20, 4096, extent)
assert seen == [("base:allocation", 4096, [1 << 20, 0])], repr(seen)
h.shutdown()
print("ok")
"#,
        uri = server.uri,
    );
    assert_eq!(nbdsh(&script).await.trim(), "ok");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_mode_conflicts_and_stale_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");

    // A socket file without a listener is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(std::fs::symlink_metadata(&path)
        .unwrap()
        .file_type()
        .is_socket());

    let (stop, shutdown) = watch::channel(false);
    let server_path = path.clone();
    let task = tokio::spawn(async move {
        serve_unix(&server_path, TestDevice::new(true), options(), shutdown).await
    });
    // The stale socket refuses connections, and the new one sends NBDMAGIC.
    let mut stream = loop {
        match tokio::net::UnixStream::connect(&path).await {
            Ok(stream) => break stream,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    let mut greeting = [0u8; 8];
    stream.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"NBDMAGIC");
    drop(stream);

    // A second server on the same path is rejected while the first listens.
    let (_stop2, shutdown2) = watch::channel(false);
    let second = serve_unix(&path, TestDevice::new(true), options(), shutdown2).await;
    let error = second.expect_err("second server started on a live socket");
    assert!(
        matches!(
            error.downcast_ref::<ListenError>(),
            Some(ListenError::AlreadyServing { .. })
        ),
        "{error:#}"
    );
    assert!(path.exists(), "the rejected server removed the live socket");

    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!path.exists(), "socket file left behind");
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "temporary files left in the socket directory"
    );

    // A regular file is never replaced.
    std::fs::write(&path, b"data").unwrap();
    let (_stop3, shutdown3) = watch::channel(false);
    let error = serve_unix(&path, TestDevice::new(true), options(), shutdown3)
        .await
        .expect_err("server replaced a regular file");
    assert!(
        matches!(
            error.downcast_ref::<ListenError>(),
            Some(ListenError::NotASocket { .. })
        ),
        "{error:#}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_closes_extra_connections() {
    let options = ServerOptions {
        connections_limit: 1,
        ..options()
    };
    let server = Server::unix(TestDevice::new(true), options).await;
    let socket = server.socket.clone().unwrap();

    let mut first = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let mut greeting = [0u8; 18];
    first.read_exact(&mut greeting).await.unwrap();

    let mut second = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), second.read_to_end(&mut rest))
        .await
        .expect("extra connection was not closed")
        .unwrap();
    assert!(rest.is_empty(), "extra connection got {} bytes", rest.len());

    // Once the first client leaves, a new one is served.
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = tokio::net::UnixStream::connect(&socket).await.unwrap();
    third.read_exact(&mut greeting).await.unwrap();
    drop(third);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_in_flight_read_before_closing() {
    let server = Server::unix(TestDevice::new(true), options()).await;
    let script = format!(
        r#"
h.connect_uri({uri:?})
buf = nbd.Buffer(4096)
cookie = h.aio_pread(buf, {slow})
print("sent", flush=True)
while not h.aio_command_completed(cookie):
    h.poll(-1)
assert buf.to_bytearray() == content({slow}, 4096)
print("ok")
"#,
        uri = server.uri,
        slow = SLOW_OFFSET,
    );
    require_tool("nbdsh", "libnbd-bin and python3-libnbd");
    let script = format!("import nbd\n{PY_CONTENT}{script}");
    let mut client = tokio::process::Command::new("nbdsh")
        .args(["-c", &script])
        .env(
            "PATH",
            format!(
                "/usr/bin:/bin:{}",
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = tokio::io::BufReader::new(client.stdout.take().unwrap());

    // Stop the server once the client has sent its slow read.
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(30), stdout.read_line(&mut line))
        .await
        .expect("nbdsh did not send its read")
        .unwrap();
    assert_eq!(line, "sent\n");
    server.shutdown().await;

    let mut rest = String::new();
    stdout.read_to_string(&mut rest).await.unwrap();
    let status = client.wait().await.unwrap();
    assert!(status.success(), "nbdsh failed: {status}, output {rest:?}");
    assert_eq!(rest, "ok\n");
}
