//! ext4 extent trees for contiguous runs of blocks (reference: kernel ext4 disk layout, "Extent Tree").
//!
//! Every object in this layout (file data, directory blocks, a long
//! symlink's block) occupies one contiguous run of device blocks. The run
//! is cut into extents of at most [`MAX_EXTENT_LEN`] blocks. Up to four
//! extents fit in `i_block`. More need a tree of 4 KiB blocks built
//! bottom-up: level 1 contains the leaves (extents), and each higher level
//! indexes the one below until at most four entries remain for the root in
//! `i_block`.

use super::disk::{put_u16, put_u32, split_block};

/// Extent header magic, `eh_magic`.
const EXTENT_MAGIC: u16 = 0xf30a;
/// Longest initialized extent: `ee_len` values above 32768 mark unwritten extents.
pub(super) const MAX_EXTENT_LEN: u64 = 32768;
/// Size of the extent header and of each extent or index entry.
const ENTRY_SIZE: usize = 12;
/// Entries in a 4 KiB tree block: (4096 - 12) / 12.
pub(super) const ENTRIES_PER_BLOCK: u64 = 340;
/// Entries in the root inside the 60-byte `i_block`.
const ROOT_ENTRIES: u64 = 4;

/// A contiguous run of device blocks mapped from logical block 0, with the
/// blocks of its extent tree (if any) in a separate contiguous run.
///
/// Block numbers and counts are 32 bits, as in a filesystem without the
/// `64bit` feature (the layout rejects larger images), which keeps the
/// inode records of a million-file layout small.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct BlockMap {
    /// First device block of the data.
    pub start: u32,
    /// Number of data blocks.
    pub len: u32,
    /// First device block of the extent tree blocks; meaningless when
    /// `tree_blocks(len)` is 0.
    pub tree_start: u32,
}

impl BlockMap {
    pub fn start(&self) -> u64 {
        u64::from(self.start)
    }

    pub fn len(&self) -> u64 {
        u64::from(self.len)
    }
}

/// Number of extents covering `len` blocks.
fn extent_count(len: u64) -> u64 {
    len.div_ceil(MAX_EXTENT_LEN)
}

/// Node counts per tree level, level 1 (leaves) first; empty when the
/// extents fit in `i_block`.
fn level_counts(len: u64) -> Vec<u64> {
    let mut levels = Vec::new();
    let mut entries = extent_count(len);
    while entries > ROOT_ENTRIES {
        entries = entries.div_ceil(ENTRIES_PER_BLOCK);
        levels.push(entries);
    }
    levels
}

/// Number of tree blocks needed to map `len` blocks.
pub(super) fn tree_blocks(len: u64) -> u64 {
    level_counts(len).iter().sum()
}

/// Number of extents (level 0) or nodes (level >= 1) at `level`.
fn count_at(len: u64, levels: &[u64], level: usize) -> u64 {
    if level == 0 {
        extent_count(len)
    } else {
        levels[level - 1]
    }
}

/// First device block of the tree nodes at `level` (>= 1).
fn level_base(map: &BlockMap, levels: &[u64], level: usize) -> u64 {
    u64::from(map.tree_start) + levels[..level - 1].iter().sum::<u64>()
}

/// Number of extents under one node at `level` (>= 1) when full.
fn extents_per_node(level: usize) -> u64 {
    let exponent = u32::try_from(level).unwrap_or(u32::MAX);
    ENTRIES_PER_BLOCK.saturating_pow(exponent)
}

fn write_header(buf: &mut [u8], entries: u64, max: u64, depth: usize) {
    put_u16(buf, 0, EXTENT_MAGIC);
    put_u16(buf, 2, u16::try_from(entries).unwrap_or(u16::MAX));
    put_u16(buf, 4, u16::try_from(max).unwrap_or(u16::MAX));
    put_u16(buf, 6, u16::try_from(depth).unwrap_or(u16::MAX));
    put_u32(buf, 8, 0);
}

/// Writes entries `first..end` of `level` (0 = extents, otherwise index
/// entries pointing at nodes of `level`) after a header at `buf[0..12]`.
fn write_entries(
    buf: &mut [u8],
    map: &BlockMap,
    levels: &[u64],
    level: usize,
    first: u64,
    end: u64,
) {
    for (slot, index) in (first..end).enumerate() {
        let offset = ENTRY_SIZE * (slot + 1);
        let entry = &mut buf[offset..offset + ENTRY_SIZE];
        if level == 0 {
            let logical = index * MAX_EXTENT_LEN;
            let len = (map.len() - logical).min(MAX_EXTENT_LEN);
            let (start_lo, start_hi) = split_block(map.start() + logical);
            put_u32(entry, 0, u32::try_from(logical).unwrap_or(u32::MAX));
            put_u16(entry, 4, u16::try_from(len).unwrap_or(u16::MAX));
            put_u16(entry, 6, start_hi);
            put_u32(entry, 8, start_lo);
        } else {
            let logical = index
                .saturating_mul(extents_per_node(level))
                .saturating_mul(MAX_EXTENT_LEN);
            let (leaf_lo, leaf_hi) = split_block(level_base(map, levels, level) + index);
            put_u32(entry, 0, u32::try_from(logical).unwrap_or(u32::MAX));
            put_u32(entry, 4, leaf_lo);
            put_u16(entry, 8, leaf_hi);
            put_u16(entry, 10, 0);
        }
    }
}

/// Writes the tree root into the 60-byte `i_block` area.
pub(super) fn write_root(i_block: &mut [u8], map: &BlockMap) {
    let levels = level_counts(map.len());
    let depth = levels.len();
    let entries = count_at(map.len(), &levels, depth);
    write_header(i_block, entries, ROOT_ENTRIES, depth);
    write_entries(i_block, map, &levels, depth, 0, entries);
}

/// Writes tree block number `index` (0-based within the object's tree
/// blocks) into `out`.
pub(super) fn write_tree_block(out: &mut [u8], map: &BlockMap, index: u64) {
    let levels = level_counts(map.len());
    let mut remaining = index;
    for (position, &count) in levels.iter().enumerate() {
        if remaining < count {
            let level = position + 1;
            let children = count_at(map.len(), &levels, level - 1);
            let first = remaining * ENTRIES_PER_BLOCK;
            let end = (first + ENTRIES_PER_BLOCK).min(children);
            write_header(out, end - first, ENTRIES_PER_BLOCK, level - 1);
            write_entries(out, map, &levels, level - 1, first, end);
            return;
        }
        remaining -= count;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(buf: &[u8], offset: usize) -> u16 {
        u16::from_le_bytes([buf[offset], buf[offset + 1]])
    }

    fn u32_at(buf: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes([
            buf[offset],
            buf[offset + 1],
            buf[offset + 2],
            buf[offset + 3],
        ])
    }

    #[test]
    fn tree_blocks_by_length() {
        let cases = [
            ("empty", 0, 0),
            ("one_block", 1, 0),
            ("four_full_extents", 4 * MAX_EXTENT_LEN, 0),
            ("five_extents", 4 * MAX_EXTENT_LEN + 1, 1),
            ("six_gib", 6 * 262_144, 1),
            ("four_leaves", 4 * 340 * MAX_EXTENT_LEN, 4),
            ("five_leaves", 4 * 340 * MAX_EXTENT_LEN + 1, 6),
        ];
        for (name, len, expected) in cases {
            assert_eq!(tree_blocks(len), expected, "{name}");
        }
    }

    #[test]
    fn root_inline_extents() {
        let map = BlockMap {
            start: 1000,
            len: 70000,
            tree_start: 0,
        };
        let mut i_block = [0u8; 60];
        write_root(&mut i_block, &map);
        assert_eq!(u16_at(&i_block, 0), EXTENT_MAGIC);
        assert_eq!(u16_at(&i_block, 2), 3);
        assert_eq!(u16_at(&i_block, 6), 0);
        assert_eq!(u32_at(&i_block, 24), 32768);
        assert_eq!(u16_at(&i_block, 28), 32768);
        assert_eq!(u32_at(&i_block, 32), 1000 + 32768);
        assert_eq!(u32::from(u16_at(&i_block, 40)), 70000 - 65536);
    }

    #[test]
    fn depth_one_tree_points_at_leaves() {
        let len = 6 * 262_144;
        let map = BlockMap {
            start: 5000,
            len,
            tree_start: 77,
        };
        let mut i_block = [0u8; 60];
        write_root(&mut i_block, &map);
        assert_eq!(u16_at(&i_block, 2), 1, "one index entry");
        assert_eq!(u16_at(&i_block, 6), 1, "depth");
        assert_eq!(u32_at(&i_block, 16), 77, "leaf block");

        let mut leaf = [0u8; 4096];
        write_tree_block(&mut leaf, &map, 0);
        assert_eq!(u16_at(&leaf, 2), 48, "extents in leaf");
        assert_eq!(u16_at(&leaf, 4), 340);
        assert_eq!(u16_at(&leaf, 6), 0);
        let last = 12 * 48;
        assert_eq!(u32_at(&leaf, last), 47 * 32768);
        assert_eq!(u32_at(&leaf, last + 8), 5000 + 47 * 32768);
    }
}
