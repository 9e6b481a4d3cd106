//! A layer's chunk table checked and grouped by gzip member, so one fetch of a member
//! serves every chunk in it.

use std::ops::Range;

use crate::layer::{ChunkSource, LayerIndex};

use super::chunk::ChunkSlice;
use super::error::StoreError;

/// One gzip member of the blob and the chunks whose bytes it holds, as a view
/// into a [`MemberTable`] and its layer's chunk table.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Member<'a> {
    pub(crate) compressed_offset: u64,
    pub(crate) compressed_end: u64,
    /// Indexes of the chunks in this member, in chunk-table order.
    pub(crate) chunks: MemberChunks<'a>,
}

/// Indexes of the chunks of one member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MemberChunks<'a> {
    Listed(&'a [u32]),
    /// The chunks `start..end`, where the table lists no indexes.
    Span {
        start: u32,
        end: u32,
    },
}

impl MemberChunks<'_> {
    pub(crate) fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        let (listed, span) = match *self {
            MemberChunks::Listed(chunks) => (chunks, 0..0),
            MemberChunks::Span { start, end } => (&[][..], start..end),
        };
        listed.iter().copied().chain(span)
    }

    fn first(&self) -> Option<u32> {
        self.iter().next()
    }
}

/// A list of `u32` positions that is kept only when it differs from
/// `0, 1, 2, ...`: a layer whose members have one chunk each, in chunk-table
/// order, needs neither of a [`MemberTable`]'s lists.
#[derive(Debug)]
enum Positions {
    Listed(Vec<u32>),
    /// `0..len`.
    Identity {
        len: usize,
    },
}

impl Default for Positions {
    fn default() -> Positions {
        Positions::Identity { len: 0 }
    }
}

/// Collects a [`Positions`] list, storing nothing while it is `0, 1, 2, ...`,
/// so a table that needs no list never keeps one, not even while it is built.
#[derive(Default)]
struct PositionsBuilder {
    listed: Option<Vec<u32>>,
    len: usize,
}

impl PositionsBuilder {
    fn push(&mut self, position: u32) {
        match &mut self.listed {
            Some(list) => list.push(position),
            None if position as usize == self.len => self.len += 1,
            None => {
                // `len` positions were pushed, each equal to its slot, so they
                // are below `position` and fit a u32.
                let mut list: Vec<u32> = (0..self.len).map(|slot| slot as u32).collect();
                list.push(position);
                self.listed = Some(list);
            }
        }
    }

    fn finish(self) -> Positions {
        match self.listed {
            Some(mut list) => {
                list.shrink_to_fit();
                Positions::Listed(list)
            }
            None => Positions::Identity { len: self.len },
        }
    }
}

impl Positions {
    fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len()).filter_map(|slot| self.get(slot))
    }

    fn len(&self) -> usize {
        match self {
            Positions::Listed(list) => list.len(),
            Positions::Identity { len } => *len,
        }
    }

    fn get(&self, slot: usize) -> Option<u32> {
        match self {
            Positions::Listed(list) => list.get(slot).copied(),
            Positions::Identity { len } => (slot < *len).then(|| u32::try_from(slot).ok())?,
        }
    }

    /// Returns the positions in slots `start..end`.
    fn range(&self, start: usize, end: usize) -> Option<MemberChunks<'_>> {
        match self {
            Positions::Listed(list) => list.get(start..end).map(MemberChunks::Listed),
            Positions::Identity { len } => {
                if start > end || end > *len {
                    return None;
                }
                let start = u32::try_from(start).ok()?;
                let end = u32::try_from(end).ok()?;
                Some(MemberChunks::Span { start, end })
            }
        }
    }
}

impl Member<'_> {
    /// What [`super::chunk::decode_chunks`] needs of each chunk of the member.
    pub(crate) fn slices(&self, index: &LayerIndex) -> Vec<ChunkSlice> {
        self.chunks
            .iter()
            .filter_map(|chunk| slice(index, chunk as usize))
            .collect()
    }
}

/// The slice of chunk `position`, or `None` for a chunk outside the table or
/// not in a member.
pub(crate) fn slice(index: &LayerIndex, position: usize) -> Option<ChunkSlice> {
    let record = index.chunks.get(position)?;
    let ChunkSource::Member { inner_offset, .. } = record.source() else {
        return None;
    };
    Some(ChunkSlice {
        chunk: position,
        inner_offset,
        size: record.size,
        digest: record.digest(),
    })
}

/// The members of a layer sorted by compressed offset (they do not overlap).
///
/// The table holds chunk indexes only: offsets, sizes and digests stay in the
/// layer's chunk table. It costs up to 8 bytes per chunk, and nothing for a
/// layer whose members have one chunk each in chunk-table order, as eStargz
/// writers lay out small files.
#[derive(Debug, Default)]
pub(crate) struct MemberTable {
    /// Chunk indexes grouped by member, members in compressed order, the chunks
    /// of a member in chunk-table order. Chunks in the cache from the start
    /// ([`ChunkSource::Local`]) are not listed.
    order: Positions,
    /// Where each member's chunks start in `order`, and `order.len()` last.
    starts: Positions,
}

/// Compressed range of a chunk's member; `None` for a chunk that is not in one.
fn member_range(index: &LayerIndex, position: usize) -> Option<(u64, u64)> {
    match index.chunks.get(position)?.source() {
        ChunkSource::Member {
            compressed_offset,
            compressed_end,
            ..
        } => Some((compressed_offset, compressed_end)),
        ChunkSource::Local => None,
    }
}

impl MemberTable {
    /// Number of members.
    pub(crate) fn len(&self) -> usize {
        self.starts.len().saturating_sub(1)
    }

    /// Member `member` of the layer whose chunk table is `index`; `None` past
    /// the last member.
    pub(crate) fn get<'a>(&'a self, index: &LayerIndex, member: usize) -> Option<Member<'a>> {
        let start = self.starts.get(member)? as usize;
        let end = self.starts.get(member + 1)? as usize;
        let chunks = self.order.range(start, end)?;
        let (compressed_offset, compressed_end) = member_range(index, chunks.first()? as usize)?;
        Some(Member {
            compressed_offset,
            compressed_end,
            chunks,
        })
    }

    /// Compressed offset of member `member`'s start (`u64::MAX` past the end).
    fn start_of(&self, index: &LayerIndex, member: usize) -> u64 {
        self.get(index, member)
            .map_or(u64::MAX, |member| member.compressed_offset)
    }

    /// The members starting below `compressed_offset`: a prefix, as members are
    /// sorted by offset.
    pub(crate) fn count_before(&self, index: &LayerIndex, compressed_offset: u64) -> usize {
        let (mut low, mut high) = (0, self.len());
        while low < high {
            let middle = low + (high - low) / 2;
            if self.start_of(index, middle) < compressed_offset {
                low = middle + 1;
            } else {
                high = middle;
            }
        }
        low
    }

    /// The member holding chunk `position`; `None` for a chunk in the cache from
    /// the start or outside the table.
    pub(crate) fn member_of(&self, index: &LayerIndex, position: usize) -> Option<usize> {
        let (offset, _) = member_range(index, position)?;
        let member = self.count_before(index, offset);
        (self.start_of(index, member) == offset).then_some(member)
    }
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
    if u32::try_from(index.chunks.len()).is_err() {
        return Err(invalid(format!(
            "{} chunks are more than the {} a member table holds",
            index.chunks.len(),
            u32::MAX
        )));
    }

    let mut order = PositionsBuilder::default();
    for (position, chunk) in index.chunks.iter().enumerate() {
        let Some((compressed_offset, compressed_end)) = member_range(index, position) else {
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
        // The count was checked against u32::MAX above.
        order.push(position as u32);
    }
    // Chunks of an eStargz blob usually come in member order already; the sort
    // is stable, so the chunks of one member stay in chunk-table order.
    let offset_of =
        |position: &u32| member_range(index, *position as usize).map(|(start, _)| start);
    let mut order = order.finish();
    if !order
        .iter()
        .is_sorted_by_key(|position| offset_of(&position))
    {
        let mut list: Vec<u32> = order.iter().collect();
        list.sort_by_key(offset_of);
        order = Positions::Listed(list);
    }

    let mut starts = PositionsBuilder::default();
    let mut previous: Option<(u64, u64)> = None;
    for (slot, position) in order.iter().enumerate() {
        let Some((compressed_offset, compressed_end)) = member_range(index, position as usize)
        else {
            continue;
        };
        match previous {
            Some((offset, end)) if offset == compressed_offset => {
                if end != compressed_end {
                    return Err(invalid(format!(
                        "chunk {position} ({:?}) gives member {compressed_offset:#x} the end {compressed_end:#x}, another chunk gives {end:#x}",
                        index.chunks[position as usize].name
                    )));
                }
                continue;
            }
            Some((offset, end)) if end > compressed_offset => {
                return Err(invalid(format!(
                    "member {offset:#x}..{end:#x} overlaps member {compressed_offset:#x}..{compressed_end:#x}"
                )));
            }
            _ => {}
        }
        // `order` is no longer than the chunk table, whose length fits a u32.
        starts.push(slot as u32);
        previous = Some((compressed_offset, compressed_end));
    }
    starts.push(order.len() as u32);
    Ok(MemberTable {
        order,
        starts: starts.finish(),
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
        let source = ChunkSource::Member {
            compressed_offset: offset,
            compressed_end: end,
            inner_offset: inner,
        };
        ChunkRecord::new(
            data_offset,
            size,
            source,
            None,
            format!("file{data_offset}").into(),
        )
        .unwrap()
    }

    fn local_chunk(data_offset: u64, size: u64) -> ChunkRecord {
        ChunkRecord::local(data_offset, size, None, format!("file{data_offset}").into())
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
        assert_eq!(table.len(), 2);
        let first = table.get(&layer, 0).expect("member 0");
        assert_eq!((first.compressed_offset, first.compressed_end), (0, 50));
        assert_eq!(first.chunks.iter().collect::<Vec<_>>(), [0, 1]);
        assert_eq!(first.slices(&layer)[1].inner_offset, 600);
        let second = table.get(&layer, 1).expect("member 1");
        assert_eq!((second.compressed_offset, second.compressed_end), (50, 90));
        assert!(table.get(&layer, 2).is_none());
        let members: Vec<_> = (0..4).map(|chunk| table.member_of(&layer, chunk)).collect();
        assert_eq!(members, vec![Some(0), Some(0), Some(1), None]);
        assert_eq!(table.count_before(&layer, 0), 0);
        assert_eq!(table.count_before(&layer, 1), 1);
        assert_eq!(table.count_before(&layer, 50), 1);
        assert_eq!(table.count_before(&layer, 51), 2);
    }

    #[test]
    fn build_keeps_no_lists_for_one_chunk_members() {
        let layer = index(
            vec![
                member_chunk(0, 10, 0, 40, 0),
                member_chunk(10, 5, 40, 70, 0),
                member_chunk(15, 5, 70, 90, 0),
            ],
            20,
        );
        let table = build(&layer, Some(100)).expect("valid table");
        assert!(matches!(table.order, Positions::Identity { len: 3 }));
        assert!(matches!(table.starts, Positions::Identity { len: 4 }));
        assert_eq!(table.len(), 3);
        let second = table.get(&layer, 1).expect("member 1");
        assert_eq!((second.compressed_offset, second.compressed_end), (40, 70));
        assert_eq!(second.chunks, MemberChunks::Span { start: 1, end: 2 });
        assert!(table.get(&layer, 3).is_none());
        let members: Vec<_> = (0..3).map(|chunk| table.member_of(&layer, chunk)).collect();
        assert_eq!(members, vec![Some(0), Some(1), Some(2)]);
    }

    #[test]
    fn positions_list_once_out_of_sequence() {
        let mut builder = PositionsBuilder::default();
        for position in [0, 1, 5, 6] {
            builder.push(position);
        }
        let positions = builder.finish();
        assert!(matches!(positions, Positions::Listed(_)));
        assert_eq!(positions.iter().collect::<Vec<_>>(), [0, 1, 5, 6]);
        assert_eq!(positions.get(4), None);
    }

    #[test]
    fn build_groups_members_out_of_chunk_order() {
        // The second file's member comes first in the blob, and a member holds
        // chunks that are not neighbours in the chunk table.
        let layer = index(
            vec![
                member_chunk(0, 10, 100, 150, 0),
                member_chunk(10, 5, 0, 100, 0),
                member_chunk(15, 5, 100, 150, 10),
                local_chunk(20, 5),
            ],
            25,
        );
        let table = build(&layer, Some(200)).expect("valid table");
        assert_eq!(table.len(), 2);
        let first = table.get(&layer, 0).expect("member 0");
        assert_eq!(first.chunks.iter().collect::<Vec<_>>(), [1]);
        let second = table.get(&layer, 1).expect("member 1");
        assert_eq!(second.chunks, MemberChunks::Listed(&[0, 2]));
        let inner: Vec<u64> = second
            .slices(&layer)
            .iter()
            .map(|s| s.inner_offset)
            .collect();
        assert_eq!(inner, vec![0, 10]);
        let members: Vec<_> = (0..4).map(|chunk| table.member_of(&layer, chunk)).collect();
        assert_eq!(members, vec![Some(1), Some(0), Some(1), None]);
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
