//! Start-up prefetch: the files an eStargz layer places before its `.prefetch.landmark`
//! (eStargz spec, "Prioritized Files and Landmark Files"), then optionally the rest of
//! every layer in the background, rate-limited and pausing while reads wait.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use tracing::{debug, info, warn};

use crate::layer::{LayerIndex, Prefetch};
use crate::store::{ChunkStore, Priority};

/// How long background fetching sleeps before it checks again for waiting reads.
const IDLE_POLL: Duration = Duration::from_millis(5);

/// Largest compressed span of one background request when no rate limit is set.
const MAX_BACKGROUND_BATCH: u64 = 4 * 1024 * 1024;

/// Smallest background batch, so a low rate still makes requests of a useful size.
const MIN_BACKGROUND_BATCH: u64 = 64 * 1024;

/// What to fetch without a read asking for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefetchOptions {
    /// Fetch the files before each layer's `.prefetch.landmark` at start.
    pub landmark: bool,
    /// Then fetch every remaining member of every layer.
    pub background: bool,
    /// Compressed bytes per second the background fetch may download; `None` is unlimited.
    pub background_rate: Option<u64>,
}

impl Default for PrefetchOptions {
    /// Landmark prefetch on, background fetching off.
    fn default() -> Self {
        PrefetchOptions {
            landmark: true,
            background: false,
            background_rate: None,
        }
    }
}

/// Counts of what the prefetch fetched, in gzip members and compressed bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PrefetchReport {
    pub landmark_members: usize,
    pub landmark_bytes: u64,
    pub background_members: usize,
    pub background_bytes: u64,
    /// Fetches that failed; the reads that need those chunks fetch them again.
    pub failures: usize,
}

/// Runs [`run`] as a task; start it once the device is ready, so it never delays serving.
pub fn spawn(
    store: Arc<ChunkStore>,
    layers: Vec<Arc<LayerIndex>>,
    options: PrefetchOptions,
) -> tokio::task::JoinHandle<PrefetchReport> {
    tokio::spawn(run(store, layers, options))
}

/// Fetches the landmark files of all layers in parallel at high priority, then, with
/// `background`, the remaining members layer by layer at low priority.
pub async fn run(
    store: Arc<ChunkStore>,
    layers: Vec<Arc<LayerIndex>>,
    options: PrefetchOptions,
) -> PrefetchReport {
    let started = Instant::now();
    let mut report = PrefetchReport::default();

    if options.landmark {
        let fetches = layers
            .iter()
            .enumerate()
            .map(|(position, index)| prefetch_landmark(&store, position, index));
        for (members, bytes, failed) in join_all(fetches).await {
            report.landmark_members += members;
            report.landmark_bytes += bytes;
            report.failures += usize::from(failed);
        }
        if report.landmark_members > 0 {
            info!(
                members = report.landmark_members,
                bytes = report.landmark_bytes,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "prefetched the prioritized files"
            );
        }
    }

    if options.background {
        let background_started = Instant::now();
        for position in 0..layers.len() {
            let Ok(layer) = u32::try_from(position) else {
                break;
            };
            fetch_layer_background(&store, layer, options.background_rate, &mut report).await;
        }
        info!(
            members = report.background_members,
            bytes = report.background_bytes,
            failures = report.failures,
            elapsed_ms = background_started.elapsed().as_millis() as u64,
            "background fetch finished"
        );
    }
    report
}

/// Fetches one layer's members before its landmark; returns the member count, their
/// compressed bytes and whether the fetch failed.
async fn prefetch_landmark(
    store: &ChunkStore,
    position: usize,
    index: &LayerIndex,
) -> (usize, u64, bool) {
    let Prefetch::Before { compressed_offset } = index.prefetch else {
        return (0, 0, false);
    };
    let Ok(layer) = u32::try_from(position) else {
        return (0, 0, false);
    };
    let members = store.members_before(layer, compressed_offset);
    let bytes = span_bytes(store, layer, members.clone());
    let count = members.len();
    if count == 0 {
        return (0, 0, false);
    }

    debug!(layer = %index.digest, members = count, bytes, "prefetching the files before the landmark");
    match store.fetch_members(layer, members, Priority::High).await {
        Ok(()) => (count, bytes, false),
        Err(error) => {
            warn!(layer = %index.digest, %error, "landmark prefetch failed; reads fetch the files on demand");
            (count, bytes, true)
        }
    }
}

fn span_bytes(store: &ChunkStore, layer: u32, members: std::ops::Range<usize>) -> u64 {
    members
        .filter_map(|member| store.member_span(layer, member))
        .map(|span| span.end - span.start)
        .sum()
}

/// Fetches a layer's uncached members in batches of neighbouring members, waiting before
/// each batch until no high-priority fetch waits and pacing the batches to `rate`.
async fn fetch_layer_background(
    store: &ChunkStore,
    layer: u32,
    rate: Option<u64>,
    report: &mut PrefetchReport,
) {
    let batch_limit = rate.map_or(MAX_BACKGROUND_BATCH, |rate| {
        rate.clamp(MIN_BACKGROUND_BATCH, MAX_BACKGROUND_BATCH)
    });
    let member_count = store.member_count(layer);
    let started = Instant::now();
    let mut fetched_bytes = 0u64;
    let mut member = 0;

    while member < member_count {
        if store.member_cached(layer, member) {
            member += 1;
            continue;
        }
        let batch = next_batch(store, layer, member, batch_limit);
        let bytes = span_bytes(store, layer, batch.clone());
        member = batch.end;

        while store.high_priority_waiting() > 0 {
            tokio::time::sleep(IDLE_POLL).await;
        }
        let count = batch.len();
        match store.fetch_members(layer, batch, Priority::Low).await {
            Ok(()) => {
                report.background_members += count;
                report.background_bytes += bytes;
            }
            Err(error) => {
                report.failures += 1;
                warn!(layer, %error, "background fetch of a batch failed; reads fetch it on demand");
            }
        }

        fetched_bytes += bytes;
        if let Some(rate) = rate.filter(|rate| *rate > 0) {
            let due = Duration::from_secs_f64(fetched_bytes as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Uncached members from `first` on whose compressed span stays within `limit` bytes
/// (at least one member).
fn next_batch(store: &ChunkStore, layer: u32, first: usize, limit: u64) -> std::ops::Range<usize> {
    let Some(start) = store.member_span(layer, first).map(|span| span.start) else {
        return first..first + 1;
    };
    let mut end = first + 1;
    while let Some(span) = store.member_span(layer, end) {
        if span.end - start > limit || store.member_cached(layer, end) {
            break;
        }
        end += 1;
    }
    first..end
}
