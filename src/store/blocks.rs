//! crc32 (IEEE, `crc32fast`) of every 4 KiB block of every cached chunk, checked on each
//! read from the cache file, so a byte changed in the file while the server runs is
//! refetched instead of served.
//!
//! Blocks are counted from each chunk's start: block `b` of a chunk covers chunk bytes
//! `b * 4096 .. min((b + 1) * 4096, size)`, so the last block of a chunk may be short and
//! no block spans two chunks. A read is widened to the blocks it touches, so it reads
//! less than 4 KiB more on each side.

use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::layer::ChunkRecord;

/// Size of one checksummed block in bytes.
pub(crate) const CHECK_BLOCK: u64 = 4096;

/// A block whose bytes did not match their crc32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BlockMismatch {
    /// Block number within its chunk.
    pub(crate) block: u64,
    pub(crate) expected: u32,
    pub(crate) actual: u32,
}

/// The block checksums of one layer's chunks, in chunk order.
pub(crate) struct BlockSums {
    /// Index in `sums` of each chunk's first block; one more entry is the total.
    first: BlockStarts,
    /// Valid for a chunk once the chunk is present; written before its presence bit.
    sums: Vec<AtomicU32>,
}

/// Block numbers, 4 bytes each while they fit, which saves 4 bytes per chunk
/// for layers of fewer than 2^32 blocks (16 TiB), and none at all when every
/// chunk is one block, as small files are.
enum BlockStarts {
    /// `0..len`: chunk `i` starts at block `i`.
    Identity {
        len: usize,
    },
    Narrow(Vec<u32>),
    Wide(Vec<u64>),
}

impl BlockStarts {
    /// Stores `starts`, which are in increasing order.
    #[cfg(test)]
    fn new(starts: Vec<u64>) -> BlockStarts {
        let mut stored = BlockStarts::Identity { len: 0 };
        for start in starts {
            stored.push(start);
        }
        stored
    }

    /// Appends the next start, not below the last one; switches to a wider
    /// form only when `start` needs it.
    fn push(&mut self, start: u64) {
        match self {
            BlockStarts::Identity { len } if start == *len as u64 => *len += 1,
            BlockStarts::Identity { len } => {
                // The starts so far are `0..len`, all below `start`.
                let before = 0..*len as u64;
                *self = match u32::try_from(start) {
                    Ok(_) => BlockStarts::Narrow(before.map(|start| start as u32).collect()),
                    Err(_) => BlockStarts::Wide(before.collect()),
                };
                self.push(start);
            }
            BlockStarts::Narrow(starts) => match u32::try_from(start) {
                Ok(narrow) => starts.push(narrow),
                Err(_) => {
                    let mut wide: Vec<u64> = starts.iter().map(|&start| u64::from(start)).collect();
                    wide.push(start);
                    *self = BlockStarts::Wide(wide);
                }
            },
            BlockStarts::Wide(starts) => starts.push(start),
        }
    }

    fn get(&self, position: usize) -> Option<u64> {
        match self {
            BlockStarts::Identity { len } => (position < *len).then_some(position as u64),
            BlockStarts::Narrow(starts) => starts.get(position).map(|&start| u64::from(start)),
            BlockStarts::Wide(starts) => starts.get(position).copied(),
        }
    }

    fn last(&self) -> u64 {
        let len = match self {
            BlockStarts::Identity { len } => *len,
            BlockStarts::Narrow(starts) => starts.len(),
            BlockStarts::Wide(starts) => starts.len(),
        };
        len.checked_sub(1)
            .and_then(|last| self.get(last))
            .unwrap_or(0)
    }
}

/// Number of check blocks in a chunk of `size` bytes.
pub(crate) fn blocks_in(size: u64) -> u64 {
    size.div_ceil(CHECK_BLOCK)
}

/// Returns the crc32 of each 4 KiB block of `bytes` (the last one may be short).
pub(crate) fn compute(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks(CHECK_BLOCK as usize)
        .map(crc32fast::hash)
        .collect()
}

impl BlockSums {
    /// Allocates zeroed checksums for every block of `chunks`.
    pub(crate) fn new(chunks: &[ChunkRecord]) -> BlockSums {
        let mut first = BlockStarts::Identity { len: 0 };
        let mut total = 0u64;
        for chunk in chunks {
            first.push(total);
            total += blocks_in(chunk.size);
        }
        first.push(total);
        let sums = (0..total).map(|_| AtomicU32::new(0)).collect();
        BlockSums { first, sums }
    }

    /// Number of blocks in all chunks.
    pub(crate) fn total(&self) -> u64 {
        self.first.last()
    }

    /// Index of the chunk's first block among all blocks of the layer.
    pub(crate) fn first_block(&self, chunk: usize) -> u64 {
        self.first.get(chunk).unwrap_or(0)
    }

    fn range(&self, chunk: usize) -> Range<usize> {
        let start = self.first.get(chunk).unwrap_or(0) as usize;
        let end = self.first.get(chunk + 1).unwrap_or(0) as usize;
        start..end.max(start)
    }

    /// Stores the checksum of block `block` (numbered across all chunks); a block
    /// past the table is ignored.
    pub(crate) fn set(&self, block: usize, value: u32) {
        if let Some(slot) = self.sums.get(block) {
            slot.store(value, Ordering::Release);
        }
    }

    /// Stores the checksums of a chunk's blocks; extra or missing entries are ignored.
    pub(crate) fn store(&self, chunk: usize, values: &[u32]) {
        for (slot, value) in self.sums[self.range(chunk)].iter().zip(values) {
            slot.store(*value, Ordering::Release);
        }
    }

    /// Checks `bytes` against the stored checksums and returns the first block that does
    /// not match. The bytes start at block `first_block` of `chunk` and end at a block
    /// boundary or at the chunk's end.
    pub(crate) fn check(
        &self,
        chunk: usize,
        first_block: u64,
        bytes: &[u8],
    ) -> Result<(), BlockMismatch> {
        let range = self.range(chunk);
        for (offset, block_bytes) in bytes.chunks(CHECK_BLOCK as usize).enumerate() {
            let block = first_block + offset as u64;
            let expected = usize::try_from(block)
                .ok()
                .and_then(|block| self.sums[range.clone()].get(block))
                .map_or(0, |slot| slot.load(Ordering::Acquire));
            let actual = crc32fast::hash(block_bytes);
            if actual != expected {
                return Err(BlockMismatch {
                    block,
                    expected,
                    actual,
                });
            }
        }
        Ok(())
    }
}

/// Returns the part of a layer's data space that covers `data_offset..data_offset + len`
/// (non-empty, inside the `covering` chunks) with whole check blocks.
pub(crate) fn widen(
    chunks: &[ChunkRecord],
    covering: Range<usize>,
    data_offset: u64,
    len: u64,
) -> Range<u64> {
    let end = data_offset + len;
    let Some(first) = chunks.get(covering.start) else {
        return data_offset..end;
    };
    let Some(last) = covering
        .end
        .checked_sub(1)
        .and_then(|index| chunks.get(index))
    else {
        return data_offset..end;
    };
    let start = first.data_offset + (data_offset - first.data_offset) / CHECK_BLOCK * CHECK_BLOCK;
    let last_end = last.data_offset + last.size;
    let widened_end =
        last.data_offset + (end - last.data_offset).div_ceil(CHECK_BLOCK) * CHECK_BLOCK;
    start..widened_end.min(last_end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(sizes: &[u64]) -> Vec<ChunkRecord> {
        super::super::persist::tests::layer(sizes).chunks
    }

    #[test]
    fn block_counts_per_chunk() {
        let table = chunks(&[1, 4096, 4097, 10_000]);
        let sums = BlockSums::new(&table);
        assert_eq!(sums.total(), 1 + 1 + 2 + 3);
        assert_eq!(sums.first_block(0), 0);
        assert_eq!(sums.first_block(2), 2);
        assert_eq!(sums.first_block(3), 4);
        assert_eq!(compute(&[7u8; 10_000]).len(), 3);
    }

    #[test]
    fn block_starts_kinds() {
        let identity = BlockStarts::new(vec![0, 1, 2]);
        assert!(matches!(identity, BlockStarts::Identity { len: 3 }));
        assert_eq!(identity.get(1), Some(1));
        assert_eq!(identity.get(3), None);
        assert_eq!(identity.last(), 2);

        let narrow = BlockStarts::new(vec![0, 7, u64::from(u32::MAX)]);
        assert!(matches!(narrow, BlockStarts::Narrow(_)));
        assert_eq!(narrow.get(2), Some(u64::from(u32::MAX)));
        assert_eq!(narrow.last(), u64::from(u32::MAX));

        let wide = BlockStarts::new(vec![0, 7, 1 << 32]);
        assert!(matches!(wide, BlockStarts::Wide(_)));
        assert_eq!(wide.get(1), Some(7));
        assert_eq!(wide.last(), 1 << 32);
        assert_eq!(wide.get(3), None);
        assert_eq!(BlockStarts::new(Vec::new()).last(), 0);
    }

    #[test]
    fn check_finds_changed_block() {
        let table = chunks(&[10_000]);
        let sums = BlockSums::new(&table);
        let mut bytes: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        sums.store(0, &compute(&bytes));
        assert_eq!(sums.check(0, 0, &bytes), Ok(()));
        assert_eq!(sums.check(0, 1, &bytes[4096..]), Ok(()));
        assert_eq!(sums.check(0, 2, &bytes[8192..]), Ok(()));

        bytes[9000] ^= 1;
        let mismatch = sums
            .check(0, 0, &bytes)
            .expect_err("the flipped byte is found");
        assert_eq!(mismatch.block, 2);
        assert_eq!(mismatch.actual, crc32fast::hash(&bytes[8192..]));
        assert!(
            sums.check(0, 0, &bytes[..8192]).is_ok(),
            "blocks 0 and 1 are unchanged"
        );
    }

    #[test]
    fn widen_to_block_edges() {
        // Chunks at 0..5000, 5000..5100 and 5100..20000.
        let table = chunks(&[5000, 100, 14_900]);
        // (case, covering chunks, offset, length, widened range)
        type Case = (&'static str, Range<usize>, u64, u64, Range<u64>);
        let cases: &[Case] = &[
            ("first byte", 0..1, 0, 1, 0..4096),
            ("short last block", 0..1, 4500, 10, 4096..5000),
            ("small chunk", 1..2, 5010, 5, 5000..5100),
            ("across chunks", 0..3, 4000, 2000, 0..9196),
            ("chunk end", 2..3, 19_000, 1000, 17_388..20_000),
        ];
        for (name, covering, offset, len, expected) in cases {
            assert_eq!(
                widen(&table, covering.clone(), *offset, *len),
                expected.clone(),
                "case {name}"
            );
        }
    }
}
