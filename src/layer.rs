//! A layer's index: its entries, its chunk table and how its bytes are fetched.

use std::sync::Arc;

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
    pub name: ChunkName,
}

/// The name of the file a chunk belongs to: a range of a text buffer that
/// all chunks of a layer share, so a chunk table of a million files contains
/// one buffer instead of a million strings.
#[derive(Clone)]
pub struct ChunkName {
    names: Arc<String>,
    start: u32,
    len: u32,
}

impl ChunkName {
    /// Refers to `names[range]`; `None` when the range is past the end of
    /// `names`, not on character boundaries, or beyond 4 GiB.
    pub fn in_buffer(names: &Arc<String>, range: std::ops::Range<usize>) -> Option<ChunkName> {
        names.get(range.clone())?;
        Some(ChunkName {
            names: names.clone(),
            start: u32::try_from(range.start).ok()?,
            len: u32::try_from(range.len()).ok()?,
        })
    }

    pub fn as_str(&self) -> &str {
        let start = self.start as usize;
        // `in_buffer` checked the range; `From` covers the whole buffer.
        self.names
            .get(start..start + self.len as usize)
            .unwrap_or_default()
    }
}

impl From<String> for ChunkName {
    /// Makes a name with a buffer of its own; a name over 4 GiB reads as empty.
    fn from(name: String) -> ChunkName {
        let len = u32::try_from(name.len()).unwrap_or(0);
        ChunkName {
            names: Arc::new(name),
            start: 0,
            len,
        }
    }
}

impl From<&str> for ChunkName {
    fn from(name: &str) -> ChunkName {
        ChunkName::from(name.to_string())
    }
}

impl std::fmt::Debug for ChunkName {
    fn fmt(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), formatter)
    }
}

impl std::fmt::Display for ChunkName {
    fn fmt(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

impl PartialEq for ChunkName {
    fn eq(&self, other: &ChunkName) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for ChunkName {}

impl PartialEq<str> for ChunkName {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for ChunkName {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_name_shares_buffer() {
        let names = Arc::new("a/bc/d\u{e9}".to_string());
        let first = ChunkName::in_buffer(&names, 0..1).unwrap();
        let second = ChunkName::in_buffer(&names, 1..4).unwrap();
        assert_eq!(first.as_str(), "a");
        assert_eq!(second, "/bc");
        assert_eq!(format!("{second:?}"), format!("{:?}", "/bc"));
        assert_eq!(second.to_string(), "/bc");
        assert_eq!(second, ChunkName::from("/bc"));
        assert!(ChunkName::in_buffer(&names, 4..9).is_none(), "past the end");
        assert!(
            ChunkName::in_buffer(&names, 0..7).is_none(),
            "inside a character"
        );
        assert_eq!(Arc::strong_count(&names), 3);
    }
}
