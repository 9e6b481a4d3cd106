//! Errors of the chunk store: opening the cache ([`StoreError`]) and serving reads ([`ReadError`]).

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

/// A failure while opening the cache or writing a whole layer into it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("failed to create cache directory {path}: {source}; check that the parent exists and is writable")]
    CreateCacheDir { path: PathBuf, source: io::Error },

    #[error("invalid layer digest {digest:?}: expected sha256:<64 lowercase hex digits>")]
    InvalidDigest { digest: String },

    #[error("failed to open cache file {path}: {source}")]
    OpenCacheFile { path: PathBuf, source: io::Error },

    #[error("failed to resize cache file {path} to {size} bytes: {source}; check free disk space")]
    ResizeCacheFile {
        path: PathBuf,
        size: u64,
        source: io::Error,
    },

    #[error("cache file {path} of whole layer {layer} is {actual} bytes, expected {expected}; write the layer with WholeLayerWriter before opening the store")]
    WholeLayerNotCached {
        layer: String,
        path: PathBuf,
        expected: u64,
        actual: u64,
    },

    #[error("write of {len} bytes at data offset {offset:#x} exceeds the data size {data_size} of layer {layer}")]
    WholeLayerOutOfRange {
        layer: String,
        offset: u64,
        len: u64,
        data_size: u64,
    },

    #[error(
        "failed to open cache index {path}: {source}; delete it to start the layer's cache afresh"
    )]
    OpenIndexFile { path: PathBuf, source: io::Error },

    #[error("failed to write cache index {path}: {source}; check free disk space")]
    WriteIndexFile { path: PathBuf, source: io::Error },

    #[error("failed to list the chunk cache in {path}: {source}")]
    ListCache { path: PathBuf, source: io::Error },

    #[error("failed to remove cache file {path}: {source}")]
    RemoveCacheFile { path: PathBuf, source: io::Error },

    #[error("failed to finish cache file {path}: {source}")]
    FinishCacheFile { path: PathBuf, source: io::Error },

    #[error("failed to read cache file {path} of whole layer {layer} at data offset {offset:#x} to compute its block checksums: {source}")]
    ReadWholeLayer {
        layer: String,
        path: PathBuf,
        offset: u64,
        source: io::Error,
    },

    #[error("invalid chunk table of layer {layer}: {reason}")]
    InvalidIndex { layer: String, reason: String },

    #[error("layer {layer} has chunks stored in blob members but no blob source was given")]
    MissingBlob { layer: String },

    #[error("io_uring was requested but is unavailable: {reason}; use the pread/pwrite backend (IoBackendChoice::Std or Auto)")]
    UringUnavailable { reason: String },

    #[error("failed to start the io_uring thread: {reason}")]
    StartUring { reason: String },
}

/// A failed read or prefetch of a layer's data space.
///
/// The error is `Clone` because one fetch may fail for many concurrent readers.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ReadError {
    #[error("layer {layer} does not exist: the store has {count} layers")]
    UnknownLayer { layer: u32, count: usize },

    #[error("read of {len} bytes at data offset {offset:#x} exceeds the data size {data_size} of layer {layer}")]
    OutOfRange {
        layer: String,
        offset: u64,
        len: u64,
        data_size: u64,
    },

    #[error("failed to fetch blob range {compressed_offset:#x}..{compressed_end:#x} of layer {layer}: {chain}")]
    Fetch {
        layer: String,
        compressed_offset: u64,
        compressed_end: u64,
        chain: String,
    },

    #[error("failed to decompress the gzip member at {compressed_offset:#x} of layer {layer} (entry {name:?}, data offset {data_offset:#x}): {chain}")]
    Decompress {
        layer: String,
        name: String,
        compressed_offset: u64,
        data_offset: u64,
        chain: String,
    },

    #[error("digest mismatch in layer {layer}, entry {name:?}, member at compressed offset {compressed_offset:#x}, data offset {data_offset:#x}: expected sha256:{expected}, got sha256:{actual}; the blob or its TOC is corrupt")]
    DigestMismatch {
        layer: String,
        name: String,
        compressed_offset: u64,
        data_offset: u64,
        expected: String,
        actual: String,
    },

    #[error(
        "cache {op} of {len} bytes at data offset {offset:#x} of layer {layer} failed: {source}"
    )]
    CacheIo {
        layer: String,
        op: &'static str,
        offset: u64,
        len: u64,
        source: Arc<io::Error>,
    },

    #[error("the cache file of layer {layer} still fails its block checksum at data offset {data_offset:#x} (entry {name:?}) after the chunk was fetched again: crc32 {actual:#010x}, expected {expected:#010x}; check the disk under the cache directory")]
    CacheChecksum {
        layer: String,
        name: String,
        data_offset: u64,
        expected: u32,
        actual: u32,
    },

    #[error("the cache file of whole layer {layer} fails its block checksum at data offset {data_offset:#x} (entry {name:?}): crc32 {actual:#010x}, expected {expected:#010x}, and fetching the layer again did not repair it (or no blob source was given to repair it from); check the disk under the cache directory")]
    WholeLayerChecksum {
        layer: String,
        name: String,
        data_offset: u64,
        expected: u32,
        actual: u32,
    },

    #[error("the cache file of whole layer {layer} changed on disk at data offset {data_offset:#x} and fetching the layer again to repair it failed: {chain}; check the connection to the registry and the disk under the cache directory; reads of damaged blocks fail at once for {retry_after_secs} s, then the next one tries again")]
    WholeLayerRepair {
        layer: String,
        data_offset: u64,
        chain: String,
        retry_after_secs: u64,
    },

    #[error("fetch task for layer {layer} stopped before finishing ({detail}); this is a bug")]
    TaskFailed { layer: String, detail: String },
}

impl ReadError {
    /// Converts the error into an `io::Error` for the block device (`EIO` for
    /// every kind except an out-of-range request, which is `EINVAL`).
    pub fn into_io_error(self) -> io::Error {
        let kind = match self {
            ReadError::UnknownLayer { .. } | ReadError::OutOfRange { .. } => {
                io::ErrorKind::InvalidInput
            }
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, self)
    }
}
