//! Counters of the chunk store: traffic to the blobs, cache hits and misses, bytes served.

use std::sync::atomic::{AtomicU64, Ordering};

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
    /// Chunks written by an earlier run whose crc32 matched, so they were not fetched.
    pub chunks_reused: u64,
    /// Chunks written by an earlier run whose crc32 did not match (fetched again).
    pub cache_checksum_failures: u64,
    /// Read-ahead fetches started after sequential reads.
    pub readaheads: u64,
    /// Reads served from freshly decoded chunks instead of the cache file.
    pub reads_from_decoded: u64,
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
    pub(crate) chunks_reused: AtomicU64,
    pub(crate) cache_checksum_failures: AtomicU64,
    pub(crate) readaheads: AtomicU64,
    pub(crate) reads_from_decoded: AtomicU64,
}

impl Stats {
    pub(crate) fn add(counter: &AtomicU64, value: u64) {
        counter.fetch_add(value, Ordering::Relaxed);
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
            chunks_reused: load(&self.chunks_reused),
            cache_checksum_failures: load(&self.cache_checksum_failures),
            readaheads: load(&self.readaheads),
            reads_from_decoded: load(&self.reads_from_decoded),
        }
    }
}
