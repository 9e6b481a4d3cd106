//! The eStargz layer writer: turns a tar or a directory tree into an
//! eStargz blob (eStargz spec, containerd/stargz-snapshotter docs/estargz.md).
//!
//! The blob is one gzip stream of many members, so it is still a valid
//! tar.gz. Each regular file's content, or each chunk of it, starts a new
//! member; the tar headers of an entry sit at the end of the previous member.
//! After the entries come the TOC member (a tar holding `stargz.index.json`)
//! and the 51-byte footer that names the TOC offset.
//!
//! Members compress independently on a thread pool and are written in order,
//! so memory stays bounded by a few chunks per thread.
//!
//! ```no_run
//! use esgz_nbd::writer::{read_tar_entries, write_layer, WriterOptions};
//! # fn main() -> Result<(), esgz_nbd::writer::WriterError> {
//! let tar = std::path::Path::new("layer.tar");
//! let entries = read_tar_entries(tar)?;
//! let out = std::fs::File::create("layer.esgz").unwrap();
//! let summary = write_layer(entries, Some(tar), out, &WriterOptions::default(), &|_| {})?;
//! println!("{} {}", summary.blob_digest, summary.toc_digest);
//! # Ok(())
//! # }
//! ```

mod compress;
mod entry;
mod layer;
mod order;
pub mod rootfs;
mod tarfmt;
mod toc;

use std::path::PathBuf;

pub use compress::footer;
pub use entry::{
    clean_name, deduplicate, parse_pax_time, read_tar_entries, Content, EntryMeta, EntryType,
    SourceEntry,
};
pub use layer::write_layer;
pub use toc::format_rfc3339;

/// Default chunk size: files larger than this are split into chunks of
/// this size, each in its own gzip member (4 MiB, as the reference writer).
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;
/// Default gzip level, 9, the reference writer's default.
pub const DEFAULT_COMPRESSION_LEVEL: u32 = 9;
/// Largest chunk size accepted, 1 GiB: a chunk is held in memory while it compresses.
pub const MAX_CHUNK_SIZE: u64 = 1 << 30;

/// How a layer is written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriterOptions {
    /// Bytes per chunk of a large file.
    pub chunk_size: u64,
    /// gzip level, 0 (stored) to 9 (smallest).
    pub compression_level: u32,
    /// When not 0, a small file may share the current gzip member with the
    /// files before it as long as that member holds fewer than this many
    /// uncompressed bytes; its TOC entry then carries `innerOffset`.
    pub min_chunk_size: u64,
    /// Paths to put first, in this order, followed by `.prefetch.landmark`.
    pub prioritized: Vec<String>,
    /// Compression threads; 0 means one per available core.
    pub threads: usize,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            compression_level: DEFAULT_COMPRESSION_LEVEL,
            min_chunk_size: 0,
            prioritized: Vec::new(),
            threads: 0,
        }
    }
}

impl WriterOptions {
    /// Checks the option values.
    pub fn validate(&self) -> Result<(), WriterError> {
        if self.chunk_size == 0 || self.chunk_size > MAX_CHUNK_SIZE {
            return Err(WriterError::InvalidOption {
                option: "chunk size",
                value: self.chunk_size.to_string(),
                expected: "1 byte to 1 GiB",
            });
        }
        if self.compression_level > 9 {
            return Err(WriterError::InvalidOption {
                option: "compression level",
                value: self.compression_level.to_string(),
                expected: "0 to 9",
            });
        }
        if self.min_chunk_size > MAX_CHUNK_SIZE {
            return Err(WriterError::InvalidOption {
                option: "minimum chunk size",
                value: self.min_chunk_size.to_string(),
                expected: "0 to 1 GiB",
            });
        }
        Ok(())
    }
}

/// What was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerSummary {
    /// sha256 of the blob, `sha256:<hex>`.
    pub blob_digest: String,
    pub blob_size: u64,
    /// sha256 of the TOC JSON, the `containerd.io/snapshot/stargz/toc.digest` annotation.
    pub toc_digest: String,
    /// sha256 of the uncompressed tar stream, the config's `rootfs.diff_ids` entry.
    pub diff_id: String,
    /// Size of the uncompressed tar stream, the
    /// `io.containers.estargz.uncompressed-size` annotation.
    pub uncompressed_size: u64,
    /// Blob offset of the TOC member.
    pub toc_offset: u64,
    /// Number of TOC entries, chunks and the landmark included.
    pub toc_entries: usize,
    /// Prioritized paths that are not in the layer.
    pub missed_prioritized: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error("invalid {option} {value}: expected {expected}")]
    InvalidOption {
        option: &'static str,
        value: String,
        expected: &'static str,
    },

    #[error("failed to open the input {path}: {source}")]
    Input {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("failed to read the tar {path}: {source}; the input is not a valid tar")]
    Tar {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("entry {name:?} has an invalid {field}: {reason}")]
    InvalidEntry {
        name: String,
        field: &'static str,
        reason: String,
    },

    #[error("reading the content of {name:?} failed: {source}")]
    Content {
        name: String,
        source: std::io::Error,
    },

    #[error(
        "the content of {name:?} ended after {read} of {expected} bytes; the file changed \
         while the layer was written"
    )]
    ContentChanged {
        name: String,
        read: u64,
        expected: u64,
    },

    #[error("entry {name:?} has content in the spooled tar, but no tar file was given")]
    MissingTar { name: String },

    #[error("walking the directory tree failed at {path}: {source}")]
    Walk {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("gzip compression failed: {source}")]
    Compress { source: std::io::Error },

    #[error("a compression thread stopped without a result")]
    CompressionWorker,

    #[error("starting the compression thread pool failed: {reason}")]
    ThreadPool { reason: String },

    #[error("writing the blob failed: {source}")]
    Output { source: std::io::Error },

    #[error("encoding the TOC JSON failed: {source}")]
    TocJson { source: serde_json::Error },
}
