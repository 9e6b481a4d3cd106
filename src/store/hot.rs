//! Cached reads that the page cache can answer, done on the calling thread with
//! `preadv2(2)` and `RWF_NOWAIT`, so a warm read costs one system call and no hop to
//! the io_uring thread.
//!
//! io_uring itself first tries a buffered read inline with the same no-wait flag and
//! only hands it to a kernel worker when the pages are not cached; this path makes that
//! first attempt without the ring and its two thread wake-ups. Whatever it cannot do
//! (a chunk not yet present, a range not made of whole check blocks, pages not in the
//! page cache, a block whose crc32 differs) goes to [`ChunkStore::read`], which handles
//! each of those cases.

use std::fs::File;
use std::io::IoSliceMut;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::io::{Errno, ReadWriteFlags};

use super::blocks::{self, CHECK_BLOCK};
use super::stats::Stats;
use super::{table, ChunkStore};

/// Duplicated descriptors of the layers' cache files for reads on the calling thread.
pub(crate) struct HotFiles {
    /// By layer; `None` for a layer without a cache file.
    files: Vec<Option<File>>,
    /// Cleared when the kernel or the filesystem rejects `RWF_NOWAIT`; every read then
    /// takes the general path.
    enabled: AtomicBool,
}

impl HotFiles {
    pub(crate) fn new(files: Vec<Option<File>>) -> HotFiles {
        HotFiles {
            files,
            enabled: AtomicBool::new(true),
        }
    }

    /// Fills `out` from layer `layer`'s cache file at `offset` if the page cache holds
    /// every byte; `false` means nothing useful was read.
    fn read_now(&self, layer: usize, offset: u64, out: &mut [u8]) -> bool {
        if !self.enabled.load(Ordering::Relaxed) {
            return false;
        }
        let Some(Some(file)) = self.files.get(layer) else {
            return false;
        };
        let mut filled = 0;
        while filled < out.len() {
            let mut slices = [IoSliceMut::new(&mut out[filled..])];
            match rustix::io::preadv2(
                file,
                &mut slices,
                offset + filled as u64,
                ReadWriteFlags::NOWAIT,
            ) {
                // End of file, or part of the range is not in the page cache.
                Ok(0) | Err(Errno::AGAIN) => return false,
                Ok(n) => filled += n,
                Err(Errno::INTR) => {}
                Err(error @ (Errno::OPNOTSUPP | Errno::INVAL | Errno::NOSYS)) => {
                    if self.enabled.swap(false, Ordering::Relaxed) {
                        tracing::debug!(%error, "preadv2 with RWF_NOWAIT is unavailable; cached reads go through the cache I/O backend");
                    }
                    return false;
                }
                Err(error) => {
                    tracing::debug!(layer, offset, len = out.len(), %error, "reading the page cache failed; retrying through the cache I/O backend");
                    return false;
                }
            }
        }
        true
    }
}

impl ChunkStore {
    /// Fills `out` with the bytes of layer `layer`'s data space at `data_offset` when
    /// they can be served at once: every covering chunk is present in the cache, the
    /// range is made of whole check blocks, the page cache holds the bytes, and every
    /// block matches its crc32. Returns `false` otherwise, with `out` in an unspecified
    /// state; the caller then reads the range with [`ChunkStore::read`], which also
    /// handles a changed block (the chunk is dropped and fetched again).
    ///
    /// Never waits for I/O, so it may run on an async worker thread.
    pub fn read_cached_into(&self, layer: u32, data_offset: u64, out: &mut [u8]) -> bool {
        let inner = &self.inner;
        let Some(state) = inner.layers.get(layer as usize) else {
            return false;
        };
        let len = out.len() as u64;
        let Some(end) = data_offset.checked_add(len) else {
            return false;
        };
        if state.uncached || len == 0 || end > state.index.data_size {
            return false;
        }
        let chunks = table::chunks_covering(&state.index, data_offset, len);
        if chunks.is_empty() || !chunks.clone().all(|chunk| state.presence.contains(chunk)) {
            return false;
        }
        let records = &state.index.chunks;
        if blocks::widen(records, chunks.clone(), data_offset, len) != (data_offset..end) {
            return false;
        }

        if !inner.hot.read_now(layer as usize, data_offset, out) {
            return false;
        }
        for chunk in chunks {
            let record = &records[chunk];
            let from = record.data_offset.max(data_offset);
            let to = (record.data_offset + record.size).min(end);
            let first_block = (from - record.data_offset) / CHECK_BLOCK;
            let part = &out[(from - data_offset) as usize..(to - data_offset) as usize];
            if state.blocks.check(chunk, first_block, part).is_err() {
                return false;
            }
        }

        inner.read_ahead(layer as usize, data_offset, len);
        Stats::add(&inner.stats.cache_hits, 1);
        Stats::add(&inner.stats.reads_without_wait, 1);
        Stats::add(&inner.stats.bytes_served, len);
        true
    }
}
