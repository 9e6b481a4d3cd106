//! Reads that bypass the cache file: when the cache cannot store a chunk (disk full,
//! read-only file system), the verified decoded bytes go straight to the reader.

use std::io;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::chunk::{self, ChunkOutcome};
use super::error::{ReadError, StoreError};
use super::stats::Stats;
use super::{table, Inner};

/// Cache write failures already logged at warn level, one bit per [`WriteFailure`].
/// Process-wide, so a process with several stores logs each condition once in all.
static LOGGED_FAILURES: AtomicU8 = AtomicU8::new(0);

/// Why a cache write failed, as far as the operator needs to know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WriteFailure {
    /// ENOSPC or EDQUOT.
    Full = 1,
    /// EROFS, EACCES, EPERM or EBADF.
    ReadOnly = 2,
    Other = 4,
}

impl WriteFailure {
    fn classify(error: &io::Error) -> WriteFailure {
        match error.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT) => WriteFailure::Full,
            Some(libc::EROFS | libc::EACCES | libc::EPERM | libc::EBADF) => WriteFailure::ReadOnly,
            _ => WriteFailure::Other,
        }
    }
}

/// Returns whether `error` is a failed cache write, which a direct read can work around.
pub(crate) fn is_cache_write_failure(error: &ReadError) -> bool {
    matches!(error, ReadError::CacheIo { op: "write", .. })
}

/// Returns whether an I/O error means a full or read-only file system (or no write
/// permission), the conditions under which the store serves without its cache.
pub(crate) fn is_full_or_read_only(error: &io::Error) -> bool {
    WriteFailure::classify(error) != WriteFailure::Other
}

/// Returns the I/O error behind a failure to open a layer's cache when it means the
/// cache directory is full or read-only.
pub(crate) fn unusable_cache_source(error: &StoreError) -> Option<&io::Error> {
    let source = match error {
        StoreError::CreateCacheDir { source, .. }
        | StoreError::OpenCacheFile { source, .. }
        | StoreError::ResizeCacheFile { source, .. }
        | StoreError::OpenIndexFile { source, .. }
        | StoreError::WriteIndexFile { source, .. } => source,
        _ => return None,
    };
    is_full_or_read_only(source).then_some(source)
}

/// Logs a layer that is served without its cache because the cache directory was full
/// or read-only at start, once per condition like [`log_cache_write_failure`].
pub(crate) fn log_uncached_layer(layer: &str, source: &io::Error) {
    log_failure(layer, source);
}

/// Logs a cache write failure at warn level the first time its condition occurs, and
/// at debug level afterwards.
pub(crate) fn log_cache_write_failure(error: &ReadError) {
    let ReadError::CacheIo { layer, source, .. } = error else {
        return;
    };
    log_failure(layer, source);
}

fn log_failure(layer: &str, source: &io::Error) {
    let failure = WriteFailure::classify(source);
    let bit = failure as u8;
    let first = LOGGED_FAILURES.fetch_or(bit, Ordering::Relaxed) & bit == 0;
    if first {
        tracing::warn!(%layer, ?failure, error = %source, "the cache cannot store chunks; serving them from the network without caching (logged once per condition)");
    } else {
        tracing::debug!(%layer, ?failure, error = %source, "cache write failed, serving from the network");
    }
}

impl Inner {
    /// Reads `len` (> 0) bytes of layer `layer` at `data_offset`: chunks in the cache
    /// come from the cache file, the others are fetched, decoded and verified, and not
    /// cached. The range must have passed `locate`.
    pub(crate) async fn read_direct(
        self: &Arc<Self>,
        layer: usize,
        data_offset: u64,
        len: u64,
    ) -> Result<Bytes, ReadError> {
        let state = &self.layers[layer];
        let end = data_offset + len;
        let too_large = |source: io::Error| ReadError::CacheIo {
            layer: state.index.digest.clone(),
            op: "read",
            offset: data_offset,
            len,
            source: Arc::new(source),
        };
        let capacity = usize::try_from(len)
            .map_err(|_| too_large(io::Error::other("the length does not fit in memory")))?;
        let mut output = BytesMut::zeroed(capacity);

        let chunks = table::chunks_covering(&state.index, data_offset, len);
        let mut members = Vec::new();
        for position in chunks {
            let record = &state.index.chunks[position];
            let from = record.data_offset.max(data_offset);
            let to = (record.data_offset + record.size).min(end);
            if state.presence.contains(position) {
                // A chunk with a changed block is dropped by the check and fetched below.
                match self
                    .read_checked(layer, position..position + 1, from, to - from)
                    .await
                {
                    Ok(bytes) => {
                        let at = (from - data_offset) as usize;
                        output[at..at + bytes.len()].copy_from_slice(&bytes);
                        continue;
                    }
                    Err(ReadError::CacheChecksum { .. }) => {}
                    Err(error) => return Err(error),
                }
            }
            if let Some(member) = state.table.member_of(&state.index, position) {
                if members.last() != Some(&member) {
                    members.push(member);
                }
            }
        }

        for member in members {
            let info = state.member(member);
            let compressed = self
                .fetch_range(state, info.compressed_offset, info.compressed_end)
                .await?;
            let slices = info.slices(&state.index);
            let first_chunk = slices.first().map_or(0, |slice| slice.chunk);
            let verify = self.verify;
            let outcomes = tokio::task::spawn_blocking(move || {
                chunk::decode_chunks(&compressed, &slices, verify)
            })
            .await
            .map_err(|error| ReadError::TaskFailed {
                layer: state.index.digest.clone(),
                detail: error.to_string(),
            })?
            .map_err(|error| {
                let first = &state.index.chunks[first_chunk];
                ReadError::Decompress {
                    layer: state.index.digest.clone(),
                    name: first.name.to_string(),
                    compressed_offset: info.compressed_offset,
                    data_offset: first.data_offset,
                    chain: error.to_string(),
                }
            })?;
            Stats::add(&self.stats.members_decompressed, 1);

            for outcome in outcomes {
                let (position, bytes) = match outcome {
                    ChunkOutcome::Ready { chunk, bytes } => (chunk, bytes),
                    ChunkOutcome::Mismatch {
                        chunk,
                        expected,
                        actual,
                    } => {
                        return Err(self.digest_mismatch(
                            layer,
                            info.compressed_offset,
                            chunk,
                            &expected,
                            &actual,
                        ));
                    }
                };
                let record = &state.index.chunks[position];
                let from = record.data_offset.max(data_offset);
                let to = (record.data_offset + record.size).min(end);
                if from >= to {
                    continue;
                }
                let inner = (from - record.data_offset) as usize;
                let at = (from - data_offset) as usize;
                let count = (to - from) as usize;
                output[at..at + count].copy_from_slice(&bytes[inner..inner + count]);
            }
        }

        Stats::add(&self.stats.bytes_served, len);
        Ok(output.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_failures_classified() {
        let cases = [
            (libc::ENOSPC, WriteFailure::Full),
            (libc::EDQUOT, WriteFailure::Full),
            (libc::EROFS, WriteFailure::ReadOnly),
            (libc::EACCES, WriteFailure::ReadOnly),
            (libc::EBADF, WriteFailure::ReadOnly),
            (libc::EIO, WriteFailure::Other),
        ];
        for (errno, expected) in cases {
            let error = io::Error::from_raw_os_error(errno);
            assert_eq!(WriteFailure::classify(&error), expected, "errno {errno}");
        }
    }

    #[test]
    fn only_cache_writes_fall_back() {
        let write = ReadError::CacheIo {
            layer: "sha256:00".into(),
            op: "write",
            offset: 0,
            len: 1,
            source: Arc::new(io::Error::from_raw_os_error(libc::ENOSPC)),
        };
        let read = ReadError::CacheIo {
            layer: "sha256:00".into(),
            op: "read",
            offset: 0,
            len: 1,
            source: Arc::new(io::Error::from_raw_os_error(libc::EIO)),
        };
        assert!(is_cache_write_failure(&write));
        assert!(!is_cache_write_failure(&read));
    }
}
