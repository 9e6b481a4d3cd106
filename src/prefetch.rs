//! Start-up prefetch: the files an eStargz layer places before its `.prefetch.landmark`
//! (eStargz spec, "Prioritized Files and Landmark Files"), then optionally the rest of
//! every layer in the background, rate-limited and pausing while reads wait.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use tracing::{debug, info, warn};

use crate::layer::{ChunkSource, LayerIndex, Prefetch};
use crate::progress;
use crate::store::{ChunkStore, Priority};

/// How often a progress bar of the landmark prefetch is brought up to date.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

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
        let plans: Vec<LandmarkPlan> = layers
            .iter()
            .enumerate()
            .filter_map(|(position, index)| LandmarkPlan::new(&store, position, index))
            .collect();
        let (members, bytes, failures) = prefetch_landmarks(&store, &layers, &plans).await;
        report.landmark_members = members;
        report.landmark_bytes = bytes;
        report.failures += failures;
        if report.landmark_members > 0 {
            debug!(
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

/// The landmark prefetch of one layer: the members before the landmark and
/// the files whose chunks they contain.
struct LandmarkPlan {
    /// Position of the layer in the image.
    layer: u32,
    members: Range<usize>,
    /// Compressed bytes of `members`.
    bytes: u64,
    /// For each file, the members that hold its chunks.
    files: Vec<Vec<usize>>,
}

impl LandmarkPlan {
    /// Plans the prefetch of a layer with a landmark and members before it;
    /// `None` for any other layer.
    fn new(store: &ChunkStore, position: usize, index: &LayerIndex) -> Option<LandmarkPlan> {
        let Prefetch::Before { compressed_offset } = index.prefetch else {
            return None;
        };
        let layer = u32::try_from(position).ok()?;
        let members = store.members_before(layer, compressed_offset);
        if members.is_empty() {
            return None;
        }

        // A chunk's member is the one starting at the chunk's compressed offset,
        // so its index is the number of members that start before it.
        let mut files: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for chunk in &index.chunks {
            let ChunkSource::Member {
                compressed_offset: start,
                ..
            } = chunk.source()
            else {
                continue;
            };
            if start < compressed_offset {
                let member = store.members_before(layer, start).end;
                files.entry(chunk.name.as_str()).or_default().push(member);
            }
        }
        Some(LandmarkPlan {
            layer,
            bytes: span_bytes(store, layer, members.clone()),
            members,
            files: files.into_values().collect(),
        })
    }

    /// Counts the files whose members are all in the cache, and the compressed
    /// bytes of the members in the cache.
    fn done(&self, store: &ChunkStore) -> (u64, u64) {
        let cached: Vec<bool> = self
            .members
            .clone()
            .map(|member| store.member_cached(self.layer, member))
            .collect();
        let is_cached = |member: usize| {
            member
                .checked_sub(self.members.start)
                .and_then(|position| cached.get(position).copied())
                .unwrap_or(false)
        };
        let files = self
            .files
            .iter()
            .filter(|members| members.iter().all(|&member| is_cached(member)))
            .count() as u64;
        let bytes = span_bytes(
            store,
            self.layer,
            self.members.clone().filter(|&member| is_cached(member)),
        );
        (files, bytes)
    }
}

/// Fetches the planned members of all layers in parallel and shows their
/// progress. Returns the member count, their compressed bytes and the number
/// of layers whose fetch failed.
async fn prefetch_landmarks(
    store: &ChunkStore,
    layers: &[Arc<LayerIndex>],
    plans: &[LandmarkPlan],
) -> (usize, u64, usize) {
    if plans.is_empty() {
        return (0, 0, 0);
    }
    let total_files = plans.iter().map(|plan| plan.files.len() as u64).sum();
    let total_bytes = plans.iter().map(|plan| plan.bytes).sum();
    let task = progress::file_task("prefetch", total_files, total_bytes);
    let done = || {
        plans
            .iter()
            .map(|plan| plan.done(store))
            .fold((0, 0), |(files, bytes), (f, b)| (files + f, bytes + b))
    };

    let fetches = plans.iter().map(|plan| async move {
        let digest = layers
            .get(plan.layer as usize)
            .map_or("", |index| index.digest.as_str());
        debug!(layer = %digest, members = plan.members.len(), bytes = plan.bytes, "prefetching the files before the landmark");
        let result = store
            .fetch_members(plan.layer, plan.members.clone(), Priority::High)
            .await;
        if let Err(error) = &result {
            warn!(layer = %digest, %error, "landmark prefetch failed; reads fetch the files on demand");
        }
        result.is_err()
    });
    let mut fetches = std::pin::pin!(join_all(fetches));
    let failed = if task.is_live() {
        let mut ticks = tokio::time::interval(PROGRESS_INTERVAL);
        loop {
            tokio::select! {
                failed = &mut fetches => break failed,
                _ = ticks.tick() => {
                    let (files, bytes) = done();
                    task.set_done(files, bytes);
                }
            }
        }
    } else {
        fetches.await
    };
    let (files, bytes) = done();
    task.set_done(files, bytes);
    task.finish();

    let members = plans.iter().map(|plan| plan.members.len()).sum();
    let failures = failed.into_iter().filter(|&failed| failed).count();
    (members, total_bytes, failures)
}

fn span_bytes(store: &ChunkStore, layer: u32, members: impl Iterator<Item = usize>) -> u64 {
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
