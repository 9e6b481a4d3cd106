//! A layer's index: its entries, its chunk table and how its bytes are fetched.

use crate::tree::LayerEntry;

/// One piece of a layer's data space and where its bytes come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkRecord {
    /// Start of the chunk in the layer's data space.
    pub data_offset: u64,
    /// Uncompressed length in bytes (at least 1).
    pub size: u64,
    pub source: ChunkSource,
    /// sha256 of the chunk's bytes (`chunkDigest`, or the file `digest` for a
    /// file stored as one chunk without `chunkDigest`); `None` when the TOC
    /// carries neither.
    pub digest: Option<[u8; 32]>,
    /// The TOC entry name the chunk belongs to, for error messages.
    pub name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkSource {
    /// A gzip member of the blob at `compressed_offset..compressed_end`; the
    /// chunk starts `inner_offset` bytes into the member's decompressed output.
    Member {
        compressed_offset: u64,
        compressed_end: u64,
        inner_offset: u64,
    },
    /// Already in the cache: the layer was not lazy and was fetched whole at start.
    Local,
}

/// Whether a layer is read lazily, and why not when it is not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerMode {
    /// eStargz: footer and TOC read, chunks fetched on demand.
    Lazy {
        toc_offset: u64,
        toc_digest: [u8; 32],
    },
    /// Fetched whole at start; the reason is logged.
    Whole { reason: String },
}

/// Prefetch hints from the layer's landmark files.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Prefetch {
    /// No landmark: nothing is known.
    #[default]
    Unknown,
    /// `.no.prefetch.landmark`: prefetch nothing.
    Nothing,
    /// `.prefetch.landmark`: the blob bytes before this compressed offset
    /// hold the files to prefetch.
    Before { compressed_offset: u64 },
}

/// Everything known about one layer after its TOC (or whole tar) was read.
#[derive(Clone, Debug, Default)]
pub struct LayerIndex {
    /// Layer blob digest, `sha256:<hex>`.
    pub digest: String,
    /// Entries in layer order, names normalised, landmarks and
    /// `stargz.index.json` removed.
    pub entries: Vec<LayerEntry>,
    /// Chunks sorted by `data_offset`, covering `0..data_size` without gaps.
    pub chunks: Vec<ChunkRecord>,
    /// Total size of the layer's data space.
    pub data_size: u64,
    pub prefetch: Prefetch,
}
