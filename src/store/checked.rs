//! Reads from the cache file checked against the block checksums, and what happens when a
//! block does not match: a fetched chunk is dropped from the cache so the next attempt
//! fetches and verifies it again, and a chunk of a whole layer stays present while the
//! caller repairs the layer's cache file (see `repair`).

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;

use super::blocks::{self, BlockMismatch, CHECK_BLOCK};
use super::error::ReadError;
use super::stats::Stats;
use super::{Inner, LayerState};

impl Inner {
    /// Reads `data_offset..data_offset + len` (non-empty) of layer `layer` from the cache
    /// file. `chunks` are the covering chunks, all present. The read is widened to whole
    /// 4 KiB blocks and every block is checked against its crc32. Fetched chunks with a
    /// changed block are dropped from the cache and [`ReadError::CacheChecksum`] is returned
    /// for the first one. A whole layer's chunk with a changed block stays present and
    /// [`ReadError::WholeLayerChecksum`] is returned; the caller repairs the layer.
    pub(crate) async fn read_checked(
        &self,
        layer: usize,
        chunks: Range<usize>,
        data_offset: u64,
        len: u64,
    ) -> Result<Bytes, ReadError> {
        let state = &self.layers[layer];
        let records = &state.index.chunks;
        let span = blocks::widen(records, chunks.clone(), data_offset, len);
        let cache_error = |source| ReadError::CacheIo {
            layer: state.index.digest.clone(),
            op: "read",
            offset: span.start,
            len: span.end - span.start,
            source: Arc::new(source),
        };
        let (Ok(span_len), Ok(len_usize)) =
            (usize::try_from(span.end - span.start), usize::try_from(len))
        else {
            return Err(cache_error(std::io::Error::other(
                "the length does not fit in memory",
            )));
        };
        let bytes = self
            .io
            .read(layer, span.start, span_len)
            .await
            .map_err(cache_error)?;

        let mut first_mismatch = None;
        for chunk in chunks {
            let record = &records[chunk];
            let from = record.data_offset.max(span.start);
            let to = (record.data_offset + record.size).min(span.end);
            let first_block = (from - record.data_offset) / CHECK_BLOCK;
            let part = &bytes[(from - span.start) as usize..(to - span.start) as usize];
            let Err(mismatch) = state.blocks.check(chunk, first_block, part) else {
                continue;
            };
            if record.is_local() {
                let error = self.report_changed_local_chunk(layer, chunk, mismatch);
                first_mismatch.get_or_insert(error);
            } else {
                self.drop_changed_chunk(layer, chunk, mismatch);
                first_mismatch.get_or_insert(ReadError::CacheChecksum {
                    layer: state.index.digest.clone(),
                    name: record.name.to_string(),
                    data_offset: record.data_offset + mismatch.block * CHECK_BLOCK,
                    expected: mismatch.expected,
                    actual: mismatch.actual,
                });
            }
        }
        if let Some(error) = first_mismatch {
            return Err(error);
        }

        let at = (data_offset - span.start) as usize;
        Ok(bytes.slice(at..at + len_usize))
    }

    /// Counts and logs (once per chunk until a repair rewrites it) a changed block of a
    /// whole layer's chunk, which cannot be fetched again on its own, and returns the error
    /// that sends the read to the repair. The chunk stays present.
    fn report_changed_local_chunk(
        &self,
        layer: usize,
        chunk: usize,
        mismatch: BlockMismatch,
    ) -> ReadError {
        let state = &self.layers[layer];
        let record = &state.index.chunks[chunk];
        let data_offset = record.data_offset + mismatch.block * CHECK_BLOCK;
        if state.reported.insert(chunk) {
            Stats::add(&self.stats.cache_checksum_failures, 1);
            let outcome = if state.repair.is_some() {
                "fetching the layer again to repair it"
            } else {
                "the store has no blob source to repair it from, so reads of the block fail with EIO until a restart fetches the layer again"
            };
            tracing::error!(
                layer = %state.index.digest,
                chunk,
                name = %record.name,
                data_offset,
                expected = format_args!("{:#010x}", mismatch.expected),
                actual = format_args!("{:#010x}", mismatch.actual),
                "a block of a whole layer's cache file changed on disk; {outcome}"
            );
        }
        ReadError::WholeLayerChecksum {
            layer: state.index.digest.clone(),
            name: record.name.to_string(),
            data_offset,
            expected: mismatch.expected,
            actual: mismatch.actual,
        }
    }

    /// Forgets a present chunk whose cached bytes changed: clears its presence bit and its
    /// index record, counts and logs it. A chunk another reader dropped already is left
    /// alone, so each change is logged once.
    pub(crate) fn drop_changed_chunk(&self, layer: usize, chunk: usize, mismatch: BlockMismatch) {
        let state = &self.layers[layer];
        if !state.presence.remove(chunk) {
            return;
        }
        let record = &state.index.chunks[chunk];
        Stats::add(&self.stats.cache_checksum_failures, 1);
        tracing::warn!(
            layer = %state.index.digest,
            chunk,
            name = %record.name,
            data_offset = record.data_offset,
            block = mismatch.block,
            expected = format_args!("{:#010x}", mismatch.expected),
            actual = format_args!("{:#010x}", mismatch.actual),
            "a block of a cached chunk changed on disk; dropping the chunk from the cache and fetching it again"
        );
        state.clear_index_record(chunk);
    }
}

impl LayerState {
    /// Clears a chunk's record in the layer's index file, so the next run fetches it
    /// again; a failure is logged.
    pub(crate) fn clear_index_record(&self, chunk: usize) {
        let cleared = self
            .index_file
            .as_ref()
            .map(|file| file.mark_missing(chunk));
        if let Some(Err(error)) = cleared {
            tracing::warn!(layer = %self.index.digest, chunk, %error, "failed to clear the chunk in the cache index");
        }
    }
}
