//! A layer's chunk table checked and grouped by gzip member, so one fetch of a member
//! serves every chunk in it.

use std::collections::BTreeMap;
use std::ops::Range;

use crate::layer::{ChunkSource, LayerIndex};

use super::chunk::ChunkSlice;
use super::error::StoreError;

/// One gzip member of the blob and the chunks whose bytes it holds.
#[derive(Debug)]
pub(crate) struct Member {
    pub(crate) compressed_offset: u64,
    pub(crate) compressed_end: u64,
    /// Chunks in this member, in chunk-table order.
    pub(crate) slices: Vec<ChunkSlice>,
}

/// The members of a layer sorted by compressed offset (they do not overlap), and the
/// member of each chunk (`None` for a chunk that is in the cache from the start).
#[derive(Debug, Default)]
pub(crate) struct MemberTable {
    pub(crate) members: Vec<Member>,
    pub(crate) chunk_member: Vec<Option<usize>>,
}

/// Checks that `index.chunks` covers `0..data_size` without gaps and that every member
/// lies inside the blob, then groups the chunks by member.
pub(crate) fn build(index: &LayerIndex, blob_size: Option<u64>) -> Result<MemberTable, StoreError> {
    let invalid = |reason: String| StoreError::InvalidIndex {
        layer: index.digest.clone(),
        reason,
    };

    let mut expected_offset = 0u64;
    for (position, chunk) in index.chunks.iter().enumerate() {
        if chunk.data_offset != expected_offset {
            return Err(invalid(format!(
                "chunk {position} ({:?}) starts at data offset {:#x}, expected {expected_offset:#x}",
                chunk.name, chunk.data_offset
            )));
        }
        if chunk.size == 0 {
            return Err(invalid(format!(
                "chunk {position} ({:?}) is empty",
                chunk.name
            )));
        }
        expected_offset = chunk.data_offset.checked_add(chunk.size).ok_or_else(|| {
            invalid(format!(
                "chunk {position} ({:?}) ends past 2^64",
                chunk.name
            ))
        })?;
    }
    if expected_offset != index.data_size {
        return Err(invalid(format!(
            "the chunks cover {expected_offset} bytes but the data size is {}",
            index.data_size
        )));
    }

    let mut by_offset: BTreeMap<u64, (u64, Vec<ChunkSlice>)> = BTreeMap::new();
    let mut chunk_member_offset = Vec::with_capacity(index.chunks.len());
    for (position, chunk) in index.chunks.iter().enumerate() {
        let ChunkSource::Member {
            compressed_offset,
            compressed_end,
            inner_offset,
        } = chunk.source
        else {
            chunk_member_offset.push(None);
            continue;
        };
        let Some(blob_size) = blob_size else {
            return Err(StoreError::MissingBlob {
                layer: index.digest.clone(),
            });
        };
        if compressed_end <= compressed_offset || compressed_end > blob_size {
            return Err(invalid(format!(
                "chunk {position} ({:?}) has member {compressed_offset:#x}..{compressed_end:#x} outside the blob of {blob_size} bytes",
                chunk.name
            )));
        }

        let slice = ChunkSlice {
            chunk: position,
            inner_offset,
            size: chunk.size,
            digest: chunk.digest,
        };
        let (end, slices) = by_offset
            .entry(compressed_offset)
            .or_insert_with(|| (compressed_end, Vec::with_capacity(1)));
        if *end != compressed_end {
            return Err(invalid(format!(
                "chunk {position} ({:?}) gives member {compressed_offset:#x} the end {compressed_end:#x}, another chunk gives {end:#x}",
                chunk.name
            )));
        }
        slices.push(slice);
        chunk_member_offset.push(Some(compressed_offset));
    }

    let mut members: Vec<Member> = Vec::with_capacity(by_offset.len());
    for (compressed_offset, (compressed_end, mut slices)) in by_offset {
        // Most members hold one chunk; a vector grown by push keeps room
        // for four, which adds up over a million members.
        slices.shrink_to_fit();
        if let Some(previous) = members.last() {
            if previous.compressed_end > compressed_offset {
                return Err(invalid(format!(
                    "member {:#x}..{:#x} overlaps member {compressed_offset:#x}..{compressed_end:#x}",
                    previous.compressed_offset, previous.compressed_end
                )));
            }
        }
        members.push(Member {
            compressed_offset,
            compressed_end,
            slices,
        });
    }

    let chunk_member = chunk_member_offset
        .into_iter()
        .map(|offset| {
            offset.and_then(|offset| {
                members
                    .binary_search_by_key(&offset, |m| m.compressed_offset)
                    .ok()
            })
        })
        .collect();
    Ok(MemberTable {
        members,
        chunk_member,
    })
}

/// Indexes of the chunks that overlap `data_offset..data_offset + len` (`len` > 0).
pub(crate) fn chunks_covering(index: &LayerIndex, data_offset: u64, len: u64) -> Range<usize> {
    let end = data_offset.saturating_add(len);
    let first = index
        .chunks
        .partition_point(|chunk| chunk.data_offset + chunk.size <= data_offset);
    let last = index
        .chunks
        .partition_point(|chunk| chunk.data_offset < end);
    first..last.max(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::ChunkRecord;

    fn member_chunk(data_offset: u64, size: u64, offset: u64, end: u64, inner: u64) -> ChunkRecord {
        ChunkRecord {
            data_offset,
            size,
            source: ChunkSource::Member {
                compressed_offset: offset,
                compressed_end: end,
                inner_offset: inner,
            },
            digest: None,
            name: format!("file{data_offset}").into(),
        }
    }

    fn index(chunks: Vec<ChunkRecord>, data_size: u64) -> LayerIndex {
        LayerIndex {
            digest: "sha256:test".to_string(),
            chunks,
            data_size,
            ..LayerIndex::default()
        }
    }

    #[test]
    fn build_groups_chunks_by_member() {
        let layer = index(
            vec![
                member_chunk(0, 10, 0, 50, 0),
                member_chunk(10, 5, 0, 50, 600),
                member_chunk(15, 20, 50, 90, 0),
            ],
            35,
        );
        let table = build(&layer, Some(100)).expect("valid table");
        assert_eq!(table.members.len(), 2);
        assert_eq!(table.members[0].slices.len(), 2);
        assert_eq!(table.members[0].slices[1].inner_offset, 600);
        assert_eq!(table.chunk_member, vec![Some(0), Some(0), Some(1)]);
    }

    #[test]
    fn build_rejects_invalid_tables() {
        let cases: Vec<(&str, LayerIndex, Option<u64>)> = vec![
            (
                "gap",
                index(
                    vec![
                        member_chunk(0, 10, 0, 50, 0),
                        member_chunk(11, 5, 50, 60, 0),
                    ],
                    16,
                ),
                Some(100),
            ),
            (
                "short",
                index(vec![member_chunk(0, 10, 0, 50, 0)], 11),
                Some(100),
            ),
            (
                "empty chunk",
                index(vec![member_chunk(0, 0, 0, 50, 0)], 0),
                Some(100),
            ),
            (
                "past blob",
                index(vec![member_chunk(0, 10, 0, 101, 0)], 10),
                Some(100),
            ),
            (
                "empty member",
                index(vec![member_chunk(0, 10, 50, 50, 0)], 10),
                Some(100),
            ),
            (
                "no blob",
                index(vec![member_chunk(0, 10, 0, 50, 0)], 10),
                None,
            ),
            (
                "two ends",
                index(
                    vec![
                        member_chunk(0, 10, 0, 50, 0),
                        member_chunk(10, 5, 0, 60, 20),
                    ],
                    15,
                ),
                Some(100),
            ),
            (
                "overlap",
                index(
                    vec![
                        member_chunk(0, 10, 0, 50, 0),
                        member_chunk(10, 5, 40, 60, 0),
                    ],
                    15,
                ),
                Some(100),
            ),
            (
                "overflow",
                index(vec![member_chunk(u64::MAX, 2, 0, 50, 0)], 0),
                Some(100),
            ),
        ];
        for (name, layer, blob_size) in cases {
            assert!(
                build(&layer, blob_size).is_err(),
                "case {name} must be rejected"
            );
        }
    }

    #[test]
    fn chunks_covering_ranges() {
        let layer = index(
            vec![
                member_chunk(0, 10, 0, 10, 0),
                member_chunk(10, 10, 10, 20, 0),
                member_chunk(20, 10, 20, 30, 0),
            ],
            30,
        );
        let cases: &[(u64, u64, Range<usize>)] = &[
            (0, 1, 0..1),
            (9, 2, 0..2),
            (10, 10, 1..2),
            (5, 25, 0..3),
            (29, 1, 2..3),
            (0, 30, 0..3),
        ];
        for (offset, len, expected) in cases {
            assert_eq!(
                chunks_covering(&layer, *offset, *len),
                *expected,
                "offset {offset} len {len}"
            );
        }
    }
}
