//! A layer's index: its entries, its chunk table and how its bytes are fetched.

use std::sync::Arc;

use crate::tree::LayerEntry;

/// One piece of a layer's data space and where its bytes come from.
///
/// A layer of a million small files has about as many records, so the
/// record packs its source and digest into 56 bytes (88 in all, not 104).
/// The top bit of `inner_offset` records whether `digest` is set, and a
/// [`ChunkSource::Local`] chunk has [`LOCAL_MEMBER`] as member offsets.
/// [`ChunkRecord::new`] takes the plain values, and [`ChunkRecord::source`]
/// and [`ChunkRecord::digest`] return them.
#[derive(Clone, PartialEq, Eq)]
pub struct ChunkRecord {
    /// Start of the chunk in the layer's data space.
    pub data_offset: u64,
    /// Uncompressed length in bytes (at least 1).
    pub size: u64,
    /// The TOC entry name the chunk belongs to, for error messages.
    pub name: ChunkName,
    compressed_offset: u64,
    compressed_end: u64,
    /// `ChunkSource::Member::inner_offset`, with [`DIGEST_BIT`] set when
    /// `digest` is set.
    inner_offset: u64,
    digest: [u8; 32],
}

/// Marks `ChunkRecord::inner_offset` of a record with a digest.
const DIGEST_BIT: u64 = 1 << 63;
/// `compressed_offset` and `compressed_end` of a local chunk. No gzip
/// member spans it: a member ends after it starts.
const LOCAL_MEMBER: u64 = u64::MAX;

/// A chunk source that [`ChunkRecord`] cannot store.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkSourceError {
    #[error("inner offset {inner_offset} is 2^63 or more")]
    InnerOffsetTooLarge { inner_offset: u64 },
    #[error(
        "gzip member {compressed_offset:#x}..{compressed_end:#x} ends at 2^64-1, \
         past any blob"
    )]
    MemberEndTooLarge {
        compressed_offset: u64,
        compressed_end: u64,
    },
}

impl ChunkRecord {
    /// Makes a record. `digest` is the sha256 of the chunk's bytes
    /// (`chunkDigest`, or the file `digest` for a file stored as one chunk
    /// without `chunkDigest`), `None` when the TOC carries neither.
    ///
    /// Fails for an inner offset of 2^63 or more (TOC fields are signed
    /// 64-bit numbers, so a TOC cannot give one) and for a member ending at
    /// 2^64-1.
    pub fn new(
        data_offset: u64,
        size: u64,
        source: ChunkSource,
        digest: Option<[u8; 32]>,
        name: ChunkName,
    ) -> Result<ChunkRecord, ChunkSourceError> {
        let (compressed_offset, compressed_end, inner_offset) = match source {
            ChunkSource::Member {
                compressed_offset,
                compressed_end,
                inner_offset,
            } => {
                if inner_offset & DIGEST_BIT != 0 {
                    return Err(ChunkSourceError::InnerOffsetTooLarge { inner_offset });
                }
                if compressed_end == LOCAL_MEMBER {
                    return Err(ChunkSourceError::MemberEndTooLarge {
                        compressed_offset,
                        compressed_end,
                    });
                }
                (compressed_offset, compressed_end, inner_offset)
            }
            ChunkSource::Local => return Ok(ChunkRecord::local(data_offset, size, digest, name)),
        };
        let (inner_offset, digest) = match digest {
            Some(digest) => (inner_offset | DIGEST_BIT, digest),
            None => (inner_offset, [0; 32]),
        };
        Ok(ChunkRecord {
            data_offset,
            size,
            name,
            compressed_offset,
            compressed_end,
            inner_offset,
            digest,
        })
    }

    /// Makes the record of a [`ChunkSource::Local`] chunk, which always fits.
    pub fn local(
        data_offset: u64,
        size: u64,
        digest: Option<[u8; 32]>,
        name: ChunkName,
    ) -> ChunkRecord {
        let (inner_offset, digest) = match digest {
            Some(digest) => (DIGEST_BIT, digest),
            None => (0, [0; 32]),
        };
        ChunkRecord {
            data_offset,
            size,
            name,
            compressed_offset: LOCAL_MEMBER,
            compressed_end: LOCAL_MEMBER,
            inner_offset,
            digest,
        }
    }

    /// Returns where the chunk's bytes come from.
    pub fn source(&self) -> ChunkSource {
        if self.compressed_end == LOCAL_MEMBER {
            return ChunkSource::Local;
        }
        ChunkSource::Member {
            compressed_offset: self.compressed_offset,
            compressed_end: self.compressed_end,
            inner_offset: self.inner_offset & !DIGEST_BIT,
        }
    }

    /// Returns whether the chunk was in the cache from the start
    /// ([`ChunkSource::Local`]).
    pub fn is_local(&self) -> bool {
        self.compressed_end == LOCAL_MEMBER
    }

    /// Returns the sha256 of the chunk's bytes, or `None` when the TOC has
    /// none.
    pub fn digest(&self) -> Option<[u8; 32]> {
        (self.inner_offset & DIGEST_BIT != 0).then_some(self.digest)
    }
}

impl std::fmt::Debug for ChunkRecord {
    fn fmt(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter
            .debug_struct("ChunkRecord")
            .field("data_offset", &self.data_offset)
            .field("size", &self.size)
            .field("source", &self.source())
            .field("digest", &self.digest().map(hex::encode))
            .field("name", &self.name)
            .finish()
    }
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

    #[test]
    fn chunk_record_round_trips() {
        let digest = [7u8; 32];
        let cases = [
            (ChunkSource::Local, None),
            (ChunkSource::Local, Some(digest)),
            (
                ChunkSource::Member {
                    compressed_offset: 0,
                    compressed_end: 1,
                    inner_offset: 0,
                },
                None,
            ),
            (
                ChunkSource::Member {
                    compressed_offset: u64::MAX - 1,
                    compressed_end: u64::MAX - 1,
                    inner_offset: DIGEST_BIT - 1,
                },
                Some(digest),
            ),
        ];
        for (source, digest) in cases {
            let record = ChunkRecord::new(5, 6, source, digest, ChunkName::from("f")).unwrap();
            assert_eq!(record.source(), source);
            assert_eq!(record.digest(), digest, "{source:?}");
            assert_eq!(record.is_local(), source == ChunkSource::Local);
            assert_eq!((record.data_offset, record.size), (5, 6));
        }
        assert_eq!(std::mem::size_of::<ChunkRecord>(), 88);
    }

    #[test]
    fn chunk_record_rejects_unstorable_sources() {
        let member = |compressed_end, inner_offset| ChunkSource::Member {
            compressed_offset: 0,
            compressed_end,
            inner_offset,
        };
        assert_eq!(
            ChunkRecord::new(0, 1, member(9, DIGEST_BIT), None, "f".into()),
            Err(ChunkSourceError::InnerOffsetTooLarge {
                inner_offset: DIGEST_BIT
            })
        );
        assert!(matches!(
            ChunkRecord::new(0, 1, member(u64::MAX, 0), None, "f".into()),
            Err(ChunkSourceError::MemberEndTooLarge { .. })
        ));
    }
}
