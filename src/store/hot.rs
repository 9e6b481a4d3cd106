//! Cached reads that the page cache can serve, done on the calling thread with
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

/// Maximum buffers passed to one `preadv2`, below the kernel's `IOV_MAX` of 1024.
const MAX_IOVECS: usize = 512;

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

    /// Fills `parts`, in order, from layer `layer`'s cache file at `offset` when the page
    /// cache contains every byte. Returns `false` when it does not, or on any error.
    fn read_now(&self, layer: usize, offset: u64, parts: &mut [&mut [u8]]) -> bool {
        if !self.enabled.load(Ordering::Relaxed) {
            return false;
        }
        let Some(Some(file)) = self.files.get(layer) else {
            return false;
        };
        let mut slices: Vec<IoSliceMut<'_>> =
            parts.iter_mut().map(|part| IoSliceMut::new(part)).collect();
        let mut slices = &mut slices[..];
        let mut position = offset;
        while !slices.is_empty() {
            let count = slices.len().min(MAX_IOVECS);
            match rustix::io::preadv2(file, &mut slices[..count], position, ReadWriteFlags::NOWAIT)
            {
                // End of file, or part of the range is not in the page cache.
                Ok(0) | Err(Errno::AGAIN) => return false,
                Ok(n) => {
                    position += n as u64;
                    IoSliceMut::advance_slices(&mut slices, n);
                }
                Err(Errno::INTR) => {}
                Err(error @ (Errno::OPNOTSUPP | Errno::NOSYS)) => {
                    if self.enabled.swap(false, Ordering::Relaxed) {
                        tracing::debug!(%error, "preadv2 with RWF_NOWAIT is unavailable; cached reads go through the cache I/O backend");
                    }
                    return false;
                }
                Err(error) => {
                    tracing::debug!(layer, offset = position, %error, "reading the page cache failed; retrying through the cache I/O backend");
                    return false;
                }
            }
        }
        true
    }
}

impl ChunkStore {
    /// Fills `parts` with consecutive bytes of layer `layer`'s data space starting at
    /// `data_offset`, with one system call, when they can be served at once. That needs
    /// each part to cover present chunks in whole check blocks, the page cache to contain
    /// the bytes, and every block to match its crc32.
    ///
    /// Returns `false` otherwise, with the parts in an unspecified state; the caller then
    /// reads them with [`ChunkStore::read`], which also handles a changed block (the
    /// chunk is dropped and fetched again).
    ///
    /// Never waits for I/O, so it may run on an async worker thread.
    pub fn read_cached_into(&self, layer: u32, data_offset: u64, parts: &mut [&mut [u8]]) -> bool {
        let inner = &self.inner;
        let Some(state) = inner.layers.get(layer as usize) else {
            return false;
        };
        let len: u64 = parts.iter().map(|part| part.len() as u64).sum();
        let Some(end) = data_offset.checked_add(len) else {
            return false;
        };
        if state.uncached || end > state.index.data_size {
            return false;
        }
        let records = &state.index.chunks;
        let servable = |offset: u64, part_len: u64| {
            let chunks = table::chunks_covering(&state.index, offset, part_len);
            !chunks.is_empty()
                && chunks.clone().all(|chunk| state.presence.contains(chunk))
                && blocks::widen(records, chunks, offset, part_len) == (offset..offset + part_len)
        };
        if !each_part(parts, data_offset, servable) {
            return false;
        }

        if !inner.hot.read_now(layer as usize, data_offset, parts) {
            return false;
        }
        let mut offset = data_offset;
        for part in parts.iter() {
            let part_end = offset + part.len() as u64;
            for chunk in table::chunks_covering(&state.index, offset, part.len() as u64) {
                let record = &records[chunk];
                let from = record.data_offset.max(offset);
                let to = (record.data_offset + record.size).min(part_end);
                let first_block = (from - record.data_offset) / CHECK_BLOCK;
                let bytes = &part[(from - offset) as usize..(to - offset) as usize];
                if state.blocks.check(chunk, first_block, bytes).is_err() {
                    return false;
                }
            }
            offset = part_end;
        }

        inner.read_ahead(layer as usize, data_offset, len);
        Stats::add(&inner.stats.cache_hits, 1);
        Stats::add(&inner.stats.reads_without_wait, 1);
        Stats::add(&inner.stats.bytes_served, len);
        true
    }
}

/// Checks that `test(offset, len)` is true for every part, each part starting where
/// the one before it ends. Returns `false` for no parts or an empty one.
fn each_part(
    parts: &[&mut [u8]],
    data_offset: u64,
    mut test: impl FnMut(u64, u64) -> bool,
) -> bool {
    let mut offset = data_offset;
    !parts.is_empty()
        && parts.iter().all(|part| {
            let len = part.len() as u64;
            let ok = len > 0 && test(offset, len);
            offset += len;
            ok
        })
}
