//! Writing the decoded chunks of one fetch to the cache file: chunks that are contiguous
//! in the layer's data space go out in one write, then each is marked present and
//! recorded in the index file.
//!
//! Large writes matter for later warm reads. The page cache keeps a file in folios
//! whose size follows the writes that created them, and eStargz layers contain mostly
//! small files. In one measurement (Linux 6.18, ext4), 100 MiB written with `pwrite`s
//! of 0.5 to 30 KB was read back from the page cache with 1 MiB `preadv`s about 2.6
//! times slower than the same data written in 1 MiB pieces.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::future;

use super::blocks;
use super::chunk::ChunkOutcome;
use super::error::ReadError;
use super::fetch::Decoded;
use super::stats::Stats;
use super::Inner;

/// Maximum bytes of one cache write that joins several chunks.
const MAX_JOINED_WRITE: u64 = 4 * 1024 * 1024;

/// Chunks written to the cache file with one write.
struct Run {
    data_offset: u64,
    /// `(member position in the fetch, chunk index, bytes)` in data order.
    chunks: Vec<(usize, usize, Bytes)>,
    len: u64,
}

impl Inner {
    /// Writes the good chunks of the decoded members of one fetch to the cache, marks
    /// them present and returns each member's result: its chunks, or its first error
    /// (a decode failure, a digest mismatch or a failed cache write).
    pub(crate) async fn store_members(
        &self,
        layer: usize,
        member_ids: &[usize],
        decoded: Vec<Result<Vec<ChunkOutcome>, ReadError>>,
    ) -> Vec<Result<Decoded, ReadError>> {
        let state = &self.layers[layer];
        let mut first_errors: Vec<Option<ReadError>> = vec![None; member_ids.len()];
        let mut ready: Vec<Vec<(usize, Bytes)>> = vec![Vec::new(); member_ids.len()];
        let mut to_write = Vec::new();
        for (position, result) in decoded.into_iter().enumerate() {
            let outcomes = match result {
                Ok(outcomes) => outcomes,
                Err(error) => {
                    first_errors[position] = Some(error);
                    continue;
                }
            };
            for outcome in outcomes {
                match outcome {
                    ChunkOutcome::Ready { chunk, bytes } => {
                        ready[position].push((chunk, bytes.clone()));
                        to_write.push((position, chunk, bytes));
                    }
                    ChunkOutcome::Mismatch {
                        chunk,
                        expected,
                        actual,
                    } => {
                        let info = state.member(member_ids[position]);
                        let error = self.digest_mismatch(
                            layer,
                            info.compressed_offset,
                            chunk,
                            &expected,
                            &actual,
                        );
                        tracing::error!(%error, "chunk verification failed, the chunk is not cached");
                        first_errors[position].get_or_insert(error);
                    }
                }
            }
        }

        let runs = self.contiguous_runs(layer, to_write);
        let writes = runs.iter().map(|run| self.write_run(layer, run));
        for (run, result) in runs.iter().zip(future::join_all(writes).await) {
            match result {
                Ok(()) => {
                    for (_, chunk, bytes) in &run.chunks {
                        self.mark_stored(layer, *chunk, bytes);
                    }
                }
                Err(error) => {
                    for (position, _, _) in &run.chunks {
                        first_errors[*position].get_or_insert_with(|| error.clone());
                    }
                }
            }
        }

        first_errors
            .into_iter()
            .zip(ready)
            .map(|(error, ready)| error.map_or_else(|| Ok(Arc::new(ready)), Err))
            .collect()
    }

    /// Counts a chunk whose sha256 differs from its TOC digest and returns the error for
    /// it; `compressed_offset` is where its gzip member starts in the blob.
    pub(crate) fn digest_mismatch(
        &self,
        layer: usize,
        compressed_offset: u64,
        chunk: usize,
        expected: &[u8; 32],
        actual: &[u8; 32],
    ) -> ReadError {
        let state = &self.layers[layer];
        let record = &state.index.chunks[chunk];
        Stats::add(&self.stats.verify_failures, 1);
        ReadError::DigestMismatch {
            layer: state.index.digest.clone(),
            name: record.name.to_string(),
            compressed_offset,
            data_offset: record.data_offset,
            expected: hex::encode(expected),
            actual: hex::encode(actual),
        }
    }

    /// Groups chunks into runs that are contiguous in the data space, each at most
    /// [`MAX_JOINED_WRITE`] bytes unless a single chunk is larger.
    fn contiguous_runs(&self, layer: usize, mut chunks: Vec<(usize, usize, Bytes)>) -> Vec<Run> {
        let records = &self.layers[layer].index.chunks;
        chunks.sort_by_key(|(_, chunk, _)| *chunk);
        let mut runs: Vec<Run> = Vec::new();
        for (position, chunk, bytes) in chunks {
            let data_offset = records[chunk].data_offset;
            let len = bytes.len() as u64;
            match runs.last_mut() {
                Some(run)
                    if run.data_offset + run.len == data_offset
                        && run.len + len <= MAX_JOINED_WRITE =>
                {
                    run.len += len;
                    run.chunks.push((position, chunk, bytes));
                }
                _ => runs.push(Run {
                    data_offset,
                    chunks: vec![(position, chunk, bytes)],
                    len,
                }),
            }
        }
        runs
    }

    async fn write_run(&self, layer: usize, run: &Run) -> Result<(), ReadError> {
        let state = &self.layers[layer];
        let bytes = match run.chunks.as_slice() {
            [(_, _, bytes)] => bytes.clone(),
            chunks => {
                let mut joined = BytesMut::with_capacity(run.len as usize);
                for (_, _, bytes) in chunks {
                    joined.extend_from_slice(bytes);
                }
                joined.freeze()
            }
        };
        self.io
            .write(layer, run.data_offset, bytes)
            .await
            .map_err(|source| {
                tracing::debug!(layer = %state.index.digest, data_offset = run.data_offset, len = run.len, error = %source, "cache write failed");
                ReadError::CacheIo {
                    layer: state.index.digest.clone(),
                    op: "write",
                    offset: run.data_offset,
                    len: run.len,
                    source: Arc::new(source),
                }
            })
    }

    /// Marks a chunk whose bytes are in the cache file present, then records it with its
    /// crc32 in the index file.
    fn mark_stored(&self, layer: usize, chunk: usize, bytes: &Bytes) {
        let state = &self.layers[layer];
        let crc = crc32fast::hash(bytes);
        let block_sums = blocks::compute(bytes);
        // Readers check blocks only of present chunks, so the sums go in first.
        state.blocks.store(chunk, &block_sums);
        state.presence.insert(chunk);
        Stats::add(&self.stats.chunks_fetched, 1);

        // The record comes after the data write, and readers check the crc32 of every
        // recorded chunk, so a record never leads to serving bytes that were not written.
        let first_block = state.blocks.first_block(chunk);
        let recorded = state
            .index_file
            .as_ref()
            .map(|file| file.mark_present(chunk, crc, first_block, &block_sums));
        if let Some(Err(error)) = recorded {
            tracing::warn!(layer = %state.index.digest, chunk, %error, "failed to record the chunk in the cache index; the next run fetches it again");
        }
    }
}
