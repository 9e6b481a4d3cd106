//! Counters of the chunk store: traffic to the blobs, cache hits and misses, bytes served.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds, in seconds, of the fetch latency histogram's buckets; one
/// more bucket counts the fetches slower than the last bound.
pub const FETCH_LATENCY_BOUNDS: [f64; 11] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Number of histogram buckets, the overflow bucket included.
const LATENCY_BUCKETS: usize = FETCH_LATENCY_BOUNDS.len() + 1;

/// Durations of blob Range requests, bucketed by [`FETCH_LATENCY_BOUNDS`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LatencyHistogram {
    /// Requests per bucket (not cumulative); the last entry counts requests
    /// slower than the last bound.
    pub buckets: [u64; LATENCY_BUCKETS],
    /// Sum of all durations in microseconds.
    pub sum_micros: u64,
}

impl LatencyHistogram {
    /// Number of requests recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

/// A point-in-time copy of the store's counters, all since the store was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatsSnapshot {
    /// Compressed bytes received from blob sources.
    pub bytes_fetched: u64,
    /// Range requests sent to blob sources.
    pub range_requests: u64,
    /// Range requests that failed (after the source's own retries).
    pub fetch_errors: u64,
    /// Gzip members decompressed.
    pub members_decompressed: u64,
    /// Chunks verified (or accepted without a digest) and written to the cache.
    pub chunks_fetched: u64,
    /// Reads and high-priority prefetches whose chunks were all in the cache already.
    pub cache_hits: u64,
    /// Reads and high-priority prefetches that waited for at least one chunk to be fetched.
    pub cache_misses: u64,
    /// Bytes returned by reads.
    pub bytes_served: u64,
    /// Chunks whose sha256 differed from the TOC's digest.
    pub verify_failures: u64,
    /// Durations of Range requests to blob sources, failed ones included.
    pub fetch_latency: LatencyHistogram,
    /// Chunks written by an earlier run whose crc32 matched, so they were not fetched.
    pub chunks_reused: u64,
    /// Cached chunks whose bytes no longer matched their crc32 or a block's crc32,
    /// found after a restart or on a read (dropped and fetched again, or for a whole
    /// layer, repaired from its blob).
    pub cache_checksum_failures: u64,
    /// Read-ahead fetches started after sequential reads.
    pub readaheads: u64,
    /// Reads served from freshly decoded chunks instead of the cache file.
    pub reads_from_decoded: u64,
    /// Downloads of a whole layer's blob started to repair its cache file after a block
    /// failed its checksum.
    pub whole_layer_refetches: u64,
    /// Chunks of whole layers whose bytes in the cache file differed from the refetched
    /// blob and were rewritten.
    pub whole_layer_chunks_repaired: u64,
    /// Reads served from the page cache on the calling thread, without waiting for I/O.
    pub reads_without_wait: u64,
}

#[derive(Default)]
pub(crate) struct Stats {
    pub(crate) bytes_fetched: AtomicU64,
    pub(crate) range_requests: AtomicU64,
    pub(crate) fetch_errors: AtomicU64,
    pub(crate) members_decompressed: AtomicU64,
    pub(crate) chunks_fetched: AtomicU64,
    pub(crate) cache_hits: AtomicU64,
    pub(crate) cache_misses: AtomicU64,
    pub(crate) bytes_served: AtomicU64,
    pub(crate) verify_failures: AtomicU64,
    fetch_latency_buckets: [AtomicU64; LATENCY_BUCKETS],
    fetch_latency_sum_micros: AtomicU64,
    pub(crate) chunks_reused: AtomicU64,
    pub(crate) cache_checksum_failures: AtomicU64,
    pub(crate) readaheads: AtomicU64,
    pub(crate) reads_from_decoded: AtomicU64,
    pub(crate) whole_layer_refetches: AtomicU64,
    pub(crate) whole_layer_chunks_repaired: AtomicU64,
    pub(crate) reads_without_wait: AtomicU64,
}

impl Stats {
    pub(crate) fn add(counter: &AtomicU64, value: u64) {
        counter.fetch_add(value, Ordering::Relaxed);
    }

    /// Adds one blob Range request's duration to the latency histogram.
    pub(crate) fn record_fetch_latency(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket = FETCH_LATENCY_BOUNDS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(FETCH_LATENCY_BOUNDS.len());
        Stats::add(&self.fetch_latency_buckets[bucket], 1);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        Stats::add(&self.fetch_latency_sum_micros, micros);
    }

    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        StatsSnapshot {
            bytes_fetched: load(&self.bytes_fetched),
            range_requests: load(&self.range_requests),
            fetch_errors: load(&self.fetch_errors),
            members_decompressed: load(&self.members_decompressed),
            chunks_fetched: load(&self.chunks_fetched),
            cache_hits: load(&self.cache_hits),
            cache_misses: load(&self.cache_misses),
            bytes_served: load(&self.bytes_served),
            verify_failures: load(&self.verify_failures),
            fetch_latency: LatencyHistogram {
                buckets: std::array::from_fn(|bucket| load(&self.fetch_latency_buckets[bucket])),
                sum_micros: load(&self.fetch_latency_sum_micros),
            },
            chunks_reused: load(&self.chunks_reused),
            cache_checksum_failures: load(&self.cache_checksum_failures),
            readaheads: load(&self.readaheads),
            reads_from_decoded: load(&self.reads_from_decoded),
            whole_layer_refetches: load(&self.whole_layer_refetches),
            whole_layer_chunks_repaired: load(&self.whole_layer_chunks_repaired),
            reads_without_wait: load(&self.reads_without_wait),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetch_latency_buckets_table() {
        let cases = [
            (Duration::ZERO, 0),
            (Duration::from_micros(1000), 0),
            (Duration::from_micros(1001), 1),
            (Duration::from_millis(30), 4),
            (Duration::from_secs(10), 10),
            (Duration::from_secs(11), 11),
            (Duration::from_secs(u64::MAX), 11),
        ];
        for (elapsed, bucket) in cases {
            let stats = Stats::default();
            stats.record_fetch_latency(elapsed);
            let histogram = stats.snapshot().fetch_latency;
            assert_eq!(histogram.count(), 1, "{elapsed:?}");
            assert_eq!(histogram.buckets[bucket], 1, "{elapsed:?}");
        }
    }

    #[test]
    fn fetch_latency_sum_in_micros() {
        let stats = Stats::default();
        stats.record_fetch_latency(Duration::from_millis(3));
        stats.record_fetch_latency(Duration::from_micros(250));
        assert_eq!(stats.snapshot().fetch_latency.sum_micros, 3250);
    }
}
