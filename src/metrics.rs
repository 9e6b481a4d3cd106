//! Prometheus metrics of a served image at `/metrics`, in the Prometheus text exposition format 0.0.4 (prometheus.io/docs/instrumenting/exposition_formats).
//!
//! The HTTP side is a minimal HTTP/1.1 responder on tokio: one request per
//! connection, `GET /metrics` only, so no web framework is needed.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::image::StartupFetch;
use crate::store::{StatsSnapshot, FETCH_LATENCY_BOUNDS};

/// Largest request head read before the connection is dropped.
const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// Time a client gets to send its request head.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Content type of the text exposition format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Errors of the metrics endpoint's address.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("invalid --metrics-addr value {value:?}: expected PORT, ADDR:PORT or [IPV6]:PORT")]
    InvalidAddress { value: String },
    #[error(
        "failed to listen for metrics on {addr}: {source}; pick another port with --metrics-addr"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Parses `--metrics-addr`: a bare port binds loopback; an address other
/// than loopback is taken only as written out, and the caller warns.
pub fn parse_metrics_addr(text: &str) -> Result<SocketAddr, MetricsError> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    text.parse::<SocketAddr>()
        .map_err(|_| MetricsError::InvalidAddress {
            value: text.to_string(),
        })
}

/// Labels attached to every series, naming what is served: the export and
/// image of `serve`, or the kernel device and image of `attach`.
#[derive(Clone, Debug, Default)]
pub struct MetricsLabels {
    /// Label names and values, in the order they are written.
    pairs: Vec<(&'static str, String)>,
}

impl MetricsLabels {
    /// Labels of `serve`: the NBD export name and the image (without credentials).
    pub fn for_export(export: &str, image: &str) -> MetricsLabels {
        MetricsLabels {
            pairs: vec![("export", export.to_string()), ("image", image.to_string())],
        }
    }

    /// Labels of `attach`: the kernel device (`/dev/nbdN`) and the image.
    pub fn for_device(device: &str, image: &str) -> MetricsLabels {
        MetricsLabels {
            pairs: vec![("device", device.to_string()), ("image", image.to_string())],
        }
    }

    fn render(&self) -> String {
        self.pairs
            .iter()
            .map(|(name, value)| format!("{name}=\"{}\"", escape_label(value)))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Escapes a label value: backslash, double quote and line feed.
fn escape_label(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for character in value.chars() {
        match character {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            other => escaped.push(other),
        }
    }
    escaped
}

/// Everything one scrape reports.
#[derive(Clone, Copy, Debug, Default)]
pub struct MetricsSnapshot {
    pub store: StatsSnapshot,
    pub startup: StartupFetch,
    pub device_bytes: u64,
}

/// Renders a snapshot in the text exposition format.
pub fn render(snapshot: &MetricsSnapshot, labels: &MetricsLabels) -> String {
    let labels = labels.render();
    let store = &snapshot.store;
    let mut text = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(text, "# HELP {name} {help}");
        let _ = writeln!(text, "# TYPE {name} {kind}");
        let _ = writeln!(text, "{name}{{{labels}}} {value}");
    };

    metric(
        "esgz_nbd_bytes_fetched_total",
        "counter",
        "Compressed bytes received from blob sources for reads.",
        store.bytes_fetched,
    );
    metric(
        "esgz_nbd_bytes_served_total",
        "counter",
        "Bytes returned to readers of the device.",
        store.bytes_served,
    );
    metric(
        "esgz_nbd_range_requests_total",
        "counter",
        "Range requests sent to blob sources for reads.",
        store.range_requests,
    );
    metric(
        "esgz_nbd_cache_hits_total",
        "counter",
        "Reads whose chunks were all in the cache.",
        store.cache_hits,
    );
    metric(
        "esgz_nbd_cache_misses_total",
        "counter",
        "Reads that waited for at least one chunk to be fetched.",
        store.cache_misses,
    );
    metric(
        "esgz_nbd_chunks_fetched_total",
        "counter",
        "Chunks fetched, verified and written to the cache.",
        store.chunks_fetched,
    );
    metric(
        "esgz_nbd_members_decompressed_total",
        "counter",
        "Gzip members decompressed.",
        store.members_decompressed,
    );
    metric(
        "esgz_nbd_cache_checksum_failures_total",
        "counter",
        "Cached chunks or blocks whose crc32 no longer matched; fetched or repaired again, never served.",
        store.cache_checksum_failures,
    );
    metric(
        "esgz_nbd_whole_layer_refetches_total",
        "counter",
        "Downloads of a whole layer's blob to repair its cache file after a checksum failure.",
        store.whole_layer_refetches,
    );
    metric(
        "esgz_nbd_whole_layer_chunks_repaired_total",
        "counter",
        "Chunks of whole layers rewritten in the cache file from a refetched blob.",
        store.whole_layer_chunks_repaired,
    );
    metric(
        "esgz_nbd_readaheads_total",
        "counter",
        "Read-ahead fetches started after sequential reads.",
        store.readaheads,
    );
    metric(
        "esgz_nbd_startup_bytes_fetched",
        "gauge",
        "Bytes fetched while the image was opened (footers, TOCs, whole layers).",
        snapshot.startup.bytes_fetched,
    );
    metric(
        "esgz_nbd_startup_range_requests",
        "gauge",
        "Range requests sent while the image was opened.",
        snapshot.startup.range_requests,
    );
    metric(
        "esgz_nbd_device_size_bytes",
        "gauge",
        "Size of the exported ext4 device.",
        snapshot.device_bytes,
    );

    let _ = writeln!(
        text,
        "# HELP esgz_nbd_errors_total Errors by kind: fetch (a Range request failed after retries), verify (a chunk digest mismatch)."
    );
    let _ = writeln!(text, "# TYPE esgz_nbd_errors_total counter");
    for (kind, value) in [
        ("fetch", store.fetch_errors),
        ("verify", store.verify_failures),
    ] {
        let _ = writeln!(
            text,
            "esgz_nbd_errors_total{{{labels},kind=\"{kind}\"}} {value}"
        );
    }

    let histogram = &store.fetch_latency;
    let name = "esgz_nbd_fetch_duration_seconds";
    let _ = writeln!(
        text,
        "# HELP {name} Duration of Range requests to blob sources."
    );
    let _ = writeln!(text, "# TYPE {name} histogram");
    let mut cumulative = 0;
    for (bound, count) in FETCH_LATENCY_BOUNDS.iter().zip(histogram.buckets) {
        cumulative += count;
        let _ = writeln!(
            text,
            "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}"
        );
    }
    let total = histogram.count();
    let _ = writeln!(text, "{name}_bucket{{{labels},le=\"+Inf\"}} {total}");
    let sum = histogram.sum_micros as f64 / 1e6;
    let _ = writeln!(text, "{name}_sum{{{labels}}} {sum}");
    let _ = writeln!(text, "{name}_count{{{labels}}} {total}");
    text
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

/// Parses a `--metrics-addr` value and binds it, warning when the address is
/// reachable from other hosts; returns the listener and its bound address.
pub async fn listen(text: &str) -> Result<(TcpListener, SocketAddr), MetricsError> {
    let addr = parse_metrics_addr(text)?;
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "serving metrics on a non-loopback address: anyone who can reach it can read them");
    }
    let listener = bind(addr).await?;
    let bound = listener.local_addr().unwrap_or(addr);
    tracing::info!(addr = %bound, "serving Prometheus metrics at /metrics");
    Ok((listener, bound))
}

/// Serves `GET /metrics` on `listener` until `shutdown` turns true; each
/// scrape calls `scrape` for fresh text.
pub async fn serve(
    listener: TcpListener,
    scrape: Arc<dyn Fn() -> String + Send + Sync>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let scrape = Arc::clone(&scrape);
                tokio::spawn(async move {
                    if let Err(error) = answer(stream, &*scrape).await {
                        tracing::debug!(%peer, %error, "metrics request failed");
                    }
                });
            }
            Err(error) => {
                tracing::warn!(%error, "failed to accept a metrics connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads one request head and writes one response, then closes.
async fn answer(
    mut stream: TcpStream,
    scrape: &(dyn Fn() -> String + Send + Sync),
) -> std::io::Result<()> {
    let head = tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "request head timed out")
        })??;
    let response = respond(&head, scrape);
    stream.write_all(&response).await?;
    stream.shutdown().await
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buffer = [0u8; 1024];
    loop {
        let read = stream.read(&mut buffer).await?;
        if read == 0 {
            return Ok(head);
        }
        head.extend_from_slice(&buffer[..read]);
        if head.windows(4).any(|window| window == b"\r\n\r\n") {
            return Ok(head);
        }
        if head.len() > MAX_REQUEST_HEAD {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
    }
}

/// Builds the full HTTP response for a request head.
fn respond(head: &[u8], scrape: &(dyn Fn() -> String + Send + Sync)) -> Vec<u8> {
    let line = head.split(|&byte| byte == b'\n').next().unwrap_or(b"");
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let target = parts.next().unwrap_or("");
    let path = target.split('?').next().unwrap_or("");

    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => ("200 OK", CONTENT_TYPE, scrape()),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found: metrics are at /metrics\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET is supported\n".to_string(),
        ),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        response.extend_from_slice(body.as_bytes());
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_addr_table() {
        let cases = [
            ("9100", Some("127.0.0.1:9100")),
            ("0", Some("127.0.0.1:0")),
            ("0.0.0.0:9100", Some("0.0.0.0:9100")),
            ("[::1]:9100", Some("[::1]:9100")),
            ("localhost:9100", None),
            ("70000", None),
            ("", None),
        ];
        for (text, expected) in cases {
            let parsed = parse_metrics_addr(text).ok().map(|addr| addr.to_string());
            assert_eq!(parsed.as_deref(), expected, "{text}");
        }
    }

    #[test]
    fn render_counters_and_histogram() {
        let mut snapshot = MetricsSnapshot::default();
        snapshot.store.bytes_fetched = 1234;
        snapshot.store.fetch_errors = 2;
        snapshot.store.fetch_latency.buckets[0] = 3;
        snapshot.store.fetch_latency.buckets[2] = 1;
        snapshot.store.fetch_latency.sum_micros = 1_500_000;
        snapshot.store.cache_checksum_failures = 5;
        snapshot.store.whole_layer_refetches = 6;
        snapshot.store.whole_layer_chunks_repaired = 7;
        snapshot.store.readaheads = 8;
        let labels = MetricsLabels::for_export("ex", "a\"b\\c\nd");
        let text = render(&snapshot, &labels);
        let labels = "export=\"ex\",image=\"a\\\"b\\\\c\\nd\"";
        let expected_lines = [
            format!("esgz_nbd_bytes_fetched_total{{{labels}}} 1234"),
            format!("esgz_nbd_errors_total{{{labels},kind=\"fetch\"}} 2"),
            format!("esgz_nbd_errors_total{{{labels},kind=\"verify\"}} 0"),
            format!("esgz_nbd_fetch_duration_seconds_bucket{{{labels},le=\"0.001\"}} 3"),
            format!("esgz_nbd_fetch_duration_seconds_bucket{{{labels},le=\"0.005\"}} 3"),
            format!("esgz_nbd_fetch_duration_seconds_bucket{{{labels},le=\"0.01\"}} 4"),
            format!("esgz_nbd_fetch_duration_seconds_bucket{{{labels},le=\"+Inf\"}} 4"),
            format!("esgz_nbd_fetch_duration_seconds_sum{{{labels}}} 1.5"),
            format!("esgz_nbd_fetch_duration_seconds_count{{{labels}}} 4"),
            format!("esgz_nbd_cache_checksum_failures_total{{{labels}}} 5"),
            format!("esgz_nbd_whole_layer_refetches_total{{{labels}}} 6"),
            format!("esgz_nbd_whole_layer_chunks_repaired_total{{{labels}}} 7"),
            format!("esgz_nbd_readaheads_total{{{labels}}} 8"),
        ];
        for line in expected_lines {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
    }

    #[test]
    fn render_device_labels() {
        let mut snapshot = MetricsSnapshot::default();
        snapshot.store.bytes_served = 8192;
        snapshot.store.verify_failures = 1;
        let labels = MetricsLabels::for_device("/dev/nbd3", "oci:/images/app");
        let text = render(&snapshot, &labels);
        let labels = "device=\"/dev/nbd3\",image=\"oci:/images/app\"";
        let expected_lines = [
            format!("esgz_nbd_bytes_served_total{{{labels}}} 8192"),
            format!("esgz_nbd_errors_total{{{labels},kind=\"verify\"}} 1"),
            format!("esgz_nbd_fetch_duration_seconds_count{{{labels}}} 0"),
        ];
        for line in expected_lines {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
        assert!(!text.contains("export="), "{text}");
        // Every sample line carries the device label.
        for line in text.lines().filter(|line| !line.starts_with('#')) {
            assert!(line.contains("device=\"/dev/nbd3\""), "{line}");
        }
    }

    #[test]
    fn respond_by_path_and_method() {
        let scrape = || "m 1\n".to_string();
        let cases: [(&[u8], &str, bool); 5] = [
            (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", "200 OK", true),
            (b"GET /metrics?x=1 HTTP/1.1\r\n\r\n", "200 OK", true),
            (b"HEAD /metrics HTTP/1.1\r\n\r\n", "200 OK", false),
            (b"GET / HTTP/1.1\r\n\r\n", "404 Not Found", false),
            (
                b"POST /metrics HTTP/1.1\r\n\r\n",
                "405 Method Not Allowed",
                false,
            ),
        ];
        for (head, status, has_metrics) in cases {
            let response = String::from_utf8(respond(head, &scrape)).expect("UTF-8");
            let request = String::from_utf8_lossy(head);
            assert!(
                response.starts_with(&format!("HTTP/1.1 {status}\r\n")),
                "{request}: {response}"
            );
            assert_eq!(
                response.ends_with("\r\n\r\nm 1\n"),
                has_metrics,
                "{request}: {response}"
            );
        }
        let garbage = String::from_utf8(respond(b"\xff\xfe", &scrape)).expect("UTF-8");
        assert!(garbage.starts_with("HTTP/1.1 405"), "{garbage}");
    }
}
