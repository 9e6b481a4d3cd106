//! `esgz-nbd list` (alias `status`): the attached devices from their state
//! files, each with the counters its server last wrote to its stats file.

use std::fmt::Write as _;

use serde::Serialize;
use tracing::warn;

use super::netlink::NbdNetlink;
use super::state::{DeviceState, RuntimeDir};
use super::{device_size, process_alive, AttachError};

/// One attached device as `list` shows it.
#[derive(Debug, Serialize)]
pub struct ListedDevice {
    #[serde(flatten)]
    pub state: DeviceState,
    pub server_running: bool,
    /// Whether the kernel reports the device connected (`NBD_CMD_STATUS`).
    pub connected: Option<bool>,
    /// The server's last stats file, as written.
    pub stats: Option<serde_json::Value>,
    /// The counters of `stats` that the table and the metrics endpoint show.
    pub counters: Option<DeviceCounters>,
}

/// Counters of one device, named as the metrics they match (`esgz_nbd_*_total`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DeviceCounters {
    /// `esgz_nbd_bytes_fetched_total`.
    pub bytes_fetched: u64,
    /// `esgz_nbd_bytes_served_total`.
    pub bytes_served: u64,
    /// `esgz_nbd_range_requests_total`.
    pub range_requests: u64,
    /// `esgz_nbd_cache_hits_total`.
    pub cache_hits: u64,
    /// `esgz_nbd_cache_misses_total`.
    pub cache_misses: u64,
    /// `esgz_nbd_errors_total` summed over its kinds (fetch and verify).
    pub errors: u64,
    /// Bytes the device's layers take in the cache directory; `None` when the
    /// stats file does not say (a `serve --stats-file` file).
    pub cache_bytes: Option<u64>,
}

impl DeviceCounters {
    /// Reads the counters from a stats file's JSON (`{"store": {...}, "cache_bytes": N}`);
    /// `None` when a store counter is missing.
    pub fn from_stats(stats: &serde_json::Value) -> Option<DeviceCounters> {
        let store = |name: &str| stats.pointer(&format!("/store/{name}"))?.as_u64();
        Some(DeviceCounters {
            bytes_fetched: store("bytes_fetched")?,
            bytes_served: store("bytes_served")?,
            range_requests: store("range_requests")?,
            cache_hits: store("cache_hits")?,
            cache_misses: store("cache_misses")?,
            errors: store("fetch_errors")?.saturating_add(store("verify_failures")?),
            cache_bytes: stats.get("cache_bytes").and_then(|value| value.as_u64()),
        })
    }
}

/// Lists the devices that have state files, with their server and kernel status.
pub fn list(runtime: &RuntimeDir) -> Result<Vec<ListedDevice>, AttachError> {
    let statuses = NbdNetlink::open()
        .and_then(|mut socket| socket.status(None))
        .ok();
    let mut devices = Vec::new();
    for state in runtime.list()? {
        let state = match state {
            Ok(state) => state,
            Err(error) => {
                warn!(%error, "skipping an unreadable state file");
                continue;
            }
        };
        let connected = match &statuses {
            Some(statuses) => Some(
                statuses
                    .iter()
                    .any(|s| s.index == state.index && s.connected),
            ),
            None => device_size(state.index).ok().map(|size| size > 0),
        };
        let stats: Option<serde_json::Value> = std::fs::read(&state.stats_file)
            .ok()
            .and_then(|text| serde_json::from_slice(&text).ok());
        devices.push(ListedDevice {
            server_running: process_alive(state.pid),
            connected,
            counters: stats.as_ref().and_then(DeviceCounters::from_stats),
            stats,
            state,
        });
    }
    Ok(devices)
}

/// Names of the table's columns, in order.
const COLUMNS: [&str; 12] = [
    "DEVICE", "STATE", "MODE", "PID", "FETCHED", "SERVED", "REQUESTS", "HITS", "MISSES", "ERRORS",
    "CACHE", "IMAGE",
];

/// Renders the devices as the `list` table: one header line, one line per device.
/// Counters a device's stats file lacks show as `-`.
pub fn render_table(devices: &[ListedDevice]) -> String {
    let mut text = String::new();
    write_row(&mut text, &COLUMNS.map(str::to_string));
    for device in devices {
        let counters = device.counters;
        let number = |value: Option<u64>| value.map_or_else(|| "-".to_string(), |v| v.to_string());
        let counter = |pick: fn(&DeviceCounters) -> u64| number(counters.as_ref().map(pick));
        write_row(
            &mut text,
            &[
                device.state.device.clone(),
                server_state(device).to_string(),
                device.state.mode.clone(),
                device.state.pid.to_string(),
                counter(|c| c.bytes_fetched),
                counter(|c| c.bytes_served),
                counter(|c| c.range_requests),
                counter(|c| c.cache_hits),
                counter(|c| c.cache_misses),
                counter(|c| c.errors),
                number(counters.and_then(|c| c.cache_bytes)),
                device.state.image.clone(),
            ],
        );
    }
    text
}

/// Returns the STATE column from whether the server runs and the kernel has the device.
fn server_state(device: &ListedDevice) -> &'static str {
    match (device.server_running, device.connected) {
        (true, Some(false)) => "stale",
        (true, _) => "running",
        (false, Some(true)) => "orphaned",
        (false, _) => "dead",
    }
}

fn write_row(text: &mut String, cells: &[String; 12]) {
    let [device, state, mode, pid, fetched, served, requests, hits, misses, errors, cache, image] =
        cells;
    let _ = writeln!(
        text,
        "{device:<11} {state:<8} {mode:<4} {pid:>7} {fetched:>12} {served:>12} {requests:>8} {hits:>8} {misses:>8} {errors:>6} {cache:>12}  {image}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attach::state::sample_state;

    fn state(index: u32) -> DeviceState {
        DeviceState {
            metrics_addr: Some("127.0.0.1:9100".into()),
            ..sample_state(index, 42)
        }
    }

    fn stats_json() -> serde_json::Value {
        serde_json::json!({
            "startup": {"bytes_fetched": 10, "range_requests": 1},
            "store": {
                "bytes_fetched": 5000, "bytes_served": 12288, "range_requests": 7,
                "cache_hits": 3, "cache_misses": 4, "fetch_errors": 1, "verify_failures": 2
            },
            "cache_bytes": 8192
        })
    }

    #[test]
    fn counters_from_stats_table() {
        let expected = DeviceCounters {
            bytes_fetched: 5000,
            bytes_served: 12288,
            range_requests: 7,
            cache_hits: 3,
            cache_misses: 4,
            errors: 3,
            cache_bytes: Some(8192),
        };
        let mut without_cache = stats_json();
        without_cache.as_object_mut().unwrap().remove("cache_bytes");
        let mut without_hits = stats_json();
        without_hits["store"]
            .as_object_mut()
            .unwrap()
            .remove("cache_hits");
        let cases = [
            ("attach stats file", stats_json(), Some(expected)),
            (
                "serve stats file",
                without_cache,
                Some(DeviceCounters {
                    cache_bytes: None,
                    ..expected
                }),
            ),
            ("missing counter", without_hits, None),
            ("not an object", serde_json::json!([1, 2]), None),
        ];
        for (name, stats, expected) in cases {
            assert_eq!(DeviceCounters::from_stats(&stats), expected, "{name}");
        }
    }

    #[test]
    fn table_rows() {
        let stats = stats_json();
        let devices = [
            ListedDevice {
                state: state(3),
                server_running: true,
                connected: Some(true),
                counters: DeviceCounters::from_stats(&stats),
                stats: Some(stats),
            },
            ListedDevice {
                state: state(7),
                server_running: false,
                connected: None,
                stats: None,
                counters: None,
            },
        ];
        let text = render_table(&devices);
        let rows: Vec<Vec<&str>> = text
            .lines()
            .map(|line| line.split_whitespace().collect())
            .collect();
        assert_eq!(rows.len(), 3, "{text}");
        assert_eq!(rows[0], COLUMNS, "{text}");
        assert_eq!(
            rows[1],
            [
                "/dev/nbd3",
                "running",
                "ro",
                "42",
                "5000",
                "12288",
                "7",
                "3",
                "4",
                "3",
                "8192",
                "oci:/images/app"
            ],
            "{text}"
        );
        assert_eq!(
            rows[2],
            [
                "/dev/nbd7",
                "dead",
                "ro",
                "42",
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                "oci:/images/app"
            ],
            "{text}"
        );
    }

    #[test]
    fn json_has_counters_and_metrics_address() {
        let stats = stats_json();
        let device = ListedDevice {
            state: state(3),
            server_running: true,
            connected: Some(true),
            counters: DeviceCounters::from_stats(&stats),
            stats: Some(stats),
        };
        let json = serde_json::to_value(&device).unwrap();
        assert_eq!(json["device"], "/dev/nbd3");
        assert_eq!(json["metrics_addr"], "127.0.0.1:9100");
        assert_eq!(json["counters"]["bytes_served"], 12288);
        assert_eq!(json["counters"]["errors"], 3);
    }
}
