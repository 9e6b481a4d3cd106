//! `serve --metrics-addr`: Prometheus counters scraped before and after a
//! read through NBD with nbdcopy.

#[path = "support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

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
