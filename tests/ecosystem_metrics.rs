//! `serve --metrics-addr`: Prometheus counters scraped before and after a
//! read through NBD with nbdcopy, and the same counters in `list`.

#[path = "support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use esgz_nbd::attach::state::{DeviceState, RuntimeDir};
use support::{fixture_dir, run, Server};

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    listener.local_addr().expect("local address").port()
}

/// GETs `path` from the metrics port and returns the status line and body.
fn http_get(port: u16, path: &str) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut stream = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(stream) => break stream,
            Err(error) if Instant::now() < deadline => {
                let _ = error;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(error) => panic!("connecting to the metrics port {port}: {error}"),
        }
    };
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("sending the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("reading the response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("a complete response");
    let status = head.lines().next().unwrap_or("").to_string();
    (status, body.to_string())
}

/// Returns the value of the series `name{...labels}` whose labels contain `label`.
fn sample(body: &str, name: &str, label: &str) -> u64 {
    body.lines()
        .find(|line| line.starts_with(&format!("{name}{{")) && line.contains(label))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse::<f64>().ok())
        .map(|value| value as u64)
        .unwrap_or_else(|| panic!("no sample {name} with {label} in\n{body}"))
}

#[test]
fn metrics_move_during_a_read() {
    let port = free_port();
    let image = format!("oci:{}:latest", fixture_dir("basic").join("oci").display());
    let server = Server::start(
        &image,
        &[
            "--metrics-addr",
            &port.to_string(),
            "--export-name",
            "basic",
            // The landmark prefetch would move the counters before the read.
            "--no-prefetch",
        ],
    );
    let labels = "export=\"basic\"";

    let (status, before) = http_get(port, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK", "{before}");
    assert!(
        before.contains("# TYPE esgz_nbd_fetch_duration_seconds histogram"),
        "{before}"
    );
    assert_eq!(sample(&before, "esgz_nbd_bytes_served_total", labels), 0);
    assert_eq!(sample(&before, "esgz_nbd_bytes_fetched_total", labels), 0);
    assert!(sample(&before, "esgz_nbd_device_size_bytes", labels) > 0);

    let copy = tempfile::tempdir().expect("temp dir");
    let target = copy.path().join("disk.img");
    run(Command::new("nbdcopy")
        .arg(format!(
            "nbd+unix:///basic?socket={}",
            server.socket().display()
        ))
        .arg(&target));

    let (status, after) = http_get(port, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let size = sample(&after, "esgz_nbd_device_size_bytes", labels);
    let served = sample(&after, "esgz_nbd_bytes_served_total", labels);
    // Served bytes count file data read from the cache; metadata and holes
    // are not counted.
    assert!(
        served > 0 && served <= size,
        "served {served} of a {size}-byte device\n{after}"
    );
    assert!(
        sample(&after, "esgz_nbd_bytes_fetched_total", labels) > 0,
        "{after}"
    );
    let requests = sample(&after, "esgz_nbd_range_requests_total", labels);
    assert!(requests > 0, "{after}");
    assert!(
        sample(&after, "esgz_nbd_cache_misses_total", labels) > 0,
        "{after}"
    );
    assert_eq!(
        sample(&after, "esgz_nbd_fetch_duration_seconds_count", labels),
        requests,
        "every range request is timed\n{after}"
    );
    assert_eq!(sample(&after, "esgz_nbd_errors_total", "kind=\"fetch\""), 0);

    let (status, _) = http_get(port, "/other");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    drop(server);
}

#[test]
fn metrics_reject_bad_address() {
    let image = format!("oci:{}:latest", fixture_dir("links").join("oci").display());
    let dir = tempfile::tempdir().expect("temp dir");
    let output = Command::new(support::esgz_bin())
        .args(["serve", &image, "--metrics-addr", "localhost:x", "--socket"])
        .arg(dir.path().join("s.sock"))
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .output()
        .expect("running serve");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("invalid --metrics-addr value \"localhost:x\""),
        "{stderr}"
    );
}

/// Sums the samples of `name` over all its series (all error kinds).
fn sample_sum(body: &str, name: &str) -> u64 {
    body.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// `list` reads a device's counters from the stats file its server writes;
/// here a `serve --stats-file` replaces the attach server (which needs
/// the kernel driver), and `list` must show the numbers the metrics endpoint
/// serves at the same time.
#[test]
fn list_shows_the_counters_of_the_metrics_endpoint() {
    let port = free_port();
    let image = format!("oci:{}:latest", fixture_dir("basic").join("oci").display());
    let server = Server::start(
        &image,
        &["--metrics-addr", &port.to_string(), "--no-prefetch"],
    );
    let copy = tempfile::tempdir().expect("temp dir");
    run(Command::new("nbdcopy")
        .arg(server.uri())
        .arg(copy.path().join("disk.img")));

    // The server is idle now; wait until its stats file has the scraped numbers.
    let stats_file = server.dir().join("stats.json");
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        let (_, body) = http_get(port, "/metrics");
        let stats: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&stats_file).unwrap_or_default())
                .unwrap_or_default();
        let written = stats
            .pointer("/store/bytes_served")
            .and_then(|v| v.as_u64());
        if written == Some(sample_sum(&body, "esgz_nbd_bytes_served_total")) {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "the stats file never caught up with the metrics\n{body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };

    let runtime_dir = tempfile::tempdir().expect("temp dir");
    let runtime = RuntimeDir::new(runtime_dir.path());
    // The state file as an attach server writes it, for a device /dev/nbd9
    // whose server is the running `serve`.
    let state: DeviceState = serde_json::from_value(serde_json::json!({
        "device": "/dev/nbd9", "index": 9, "image": image,
        "manifest_digest": "sha256:00", "backend": "esgz-nbd:sha256:00",
        "pid": server.pid().expect("server pid"), "mode": "ro",
        "interface": "netlink", "connections": 1,
        "cache_dir": server.dir().join("cache"), "socket": "socketpair",
        "size_bytes": 0, "timeout_secs": 30, "dead_conn_timeout_secs": 60,
        "stats_file": stats_file, "log_file": null, "attached_at": 0, "attach_ms": 0,
        "metrics_addr": format!("127.0.0.1:{port}"),
    }))
    .expect("a valid state");
    runtime.write(&state).expect("writing the state file");

    let output = Command::new(support::esgz_bin())
        .args(["list", "--runtime-dir"])
        .arg(runtime_dir.path())
        .output()
        .expect("running list");
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{table}");
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|line| line.split_whitespace().collect())
        .collect();
    let header = &rows[0];
    let row = rows
        .iter()
        .find(|row| row.first() == Some(&"/dev/nbd9"))
        .unwrap_or_else(|| panic!("no /dev/nbd9 row in\n{table}"));
    let cell = |column: &str| -> u64 {
        let position = header
            .iter()
            .position(|name| *name == column)
            .unwrap_or_else(|| panic!("no column {column} in\n{table}"));
        row[position]
            .parse()
            .unwrap_or_else(|_| panic!("{column} is not a number in\n{table}"))
    };
    assert_eq!(row[1], "running", "{table}");
    let label = "export=\"esgz-nbd\"";
    let expected = [
        (
            "FETCHED",
            sample(&body, "esgz_nbd_bytes_fetched_total", label),
        ),
        (
            "SERVED",
            sample(&body, "esgz_nbd_bytes_served_total", label),
        ),
        (
            "REQUESTS",
            sample(&body, "esgz_nbd_range_requests_total", label),
        ),
        ("HITS", sample(&body, "esgz_nbd_cache_hits_total", label)),
        (
            "MISSES",
            sample(&body, "esgz_nbd_cache_misses_total", label),
        ),
        ("ERRORS", sample_sum(&body, "esgz_nbd_errors_total")),
    ];
    for (column, value) in expected {
        assert_eq!(cell(column), value, "{column}\n{table}\n{body}");
    }
    assert!(cell("SERVED") > 0, "{table}");
    assert!(cell("REQUESTS") > 0, "{table}");

    let output = Command::new(support::esgz_bin())
        .args(["status", "--json", "--runtime-dir"])
        .arg(runtime_dir.path())
        .output()
        .expect("running status --json");
    assert!(output.status.success());
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let device = &json[0];
    assert_eq!(device["device"], "/dev/nbd9");
    assert_eq!(device["metrics_addr"], format!("127.0.0.1:{port}"));
    assert_eq!(device["counters"]["bytes_served"], cell("SERVED"));
    assert_eq!(device["counters"]["range_requests"], cell("REQUESTS"));
    drop(server);
}

/// A serve whose socket cannot be bound must exit with the bind error, also
/// while its stats writer runs.
#[test]
fn stats_file_serve_exits_on_bind_failure() {
    let image = format!("oci:{}:latest", fixture_dir("links").join("oci").display());
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("missing").join("s.sock");
    let mut child = Command::new(support::esgz_bin())
        .args(["serve", &image, "--socket"])
        .arg(&socket)
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .arg("--stats-file")
        .arg(dir.path().join("stats.json"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting serve");

    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("polling serve") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "serve with socket {} kept running after its bind failed",
                socket.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("piped stderr")
        .read_to_string(&mut stderr)
        .expect("reading stderr");

    assert!(
        !status.success(),
        "serve exited with {status}; stderr:\n{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "directory {} of socket {} does not exist",
            dir.path().join("missing").display(),
            socket.display()
        )),
        "{stderr}"
    );
    let stats: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("stats.json")).expect("reading the stats file"),
    )
    .expect("parsing the stats file");
    assert!(stats["store"].is_object(), "{stats}");
}
