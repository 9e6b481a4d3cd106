//! ext4 linear directory blocks and directory entries (reference: kernel ext4 disk layout, "Directory Entries").

use super::disk::{align4, put_u16, put_u32};
use super::htree::{self, HtreeIndex};
use super::BLOCK_SIZE;
use crate::tree::NodeId;

/// `file_type` values of `ext4_dir_entry_2` (feature `filetype`).
pub(super) const FT_REG_FILE: u8 = 1;
pub(super) const FT_DIR: u8 = 2;
pub(super) const FT_CHRDEV: u8 = 3;
pub(super) const FT_BLKDEV: u8 = 4;
pub(super) const FT_FIFO: u8 = 5;
pub(super) const FT_SYMLINK: u8 = 7;

const BLOCK: usize = BLOCK_SIZE as usize;
/// Size of the "." and ".." entries at the start of a directory's first block.
const DOT_ENTRY_LEN: usize = 12;

/// One named entry of a directory (neither "." nor "..").
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct DirEntry {
    pub name: Box<[u8]>,
    pub inode: u32,
    pub file_type: u8,
}

impl DirEntry {
    /// Minimal `rec_len` of this entry: 8 header bytes plus the name, 4-aligned.
    pub fn rec_len(&self) -> usize {
        align4(8 + self.name.len())
    }
}

/// Placement of a directory's entries in its blocks.
#[derive(Debug)]
pub(super) enum DirFormat {
    /// All entries in block 0; further blocks (lost+found) are empty.
    Linear { blocks: u64 },
    /// Hash-indexed (dir_index): block 0 is the dx_root.
    Htree(HtreeIndex),
}

#[derive(Debug)]
pub(super) struct Directory {
    pub inode: u32,
    pub parent: u32,
    /// Entries in name order; empty when `tree_node` is set.
    pub entries: Vec<DirEntry>,
    pub format: DirFormat,
    /// The tree directory whose entries are rebuilt when a block is
    /// rendered, instead of being kept here.
    pub tree_node: Option<NodeId>,
}

impl Directory {
    /// Plans a directory from its entries in name order; `min_blocks` gives
    /// lost+found its preallocated blocks.
    pub fn plan(
        inode: u32,
        parent: u32,
        entries: Vec<DirEntry>,
        min_blocks: u64,
        hash_seed: [u32; 4],
    ) -> Result<Directory, htree::TooManyLeaves> {
        let needed: usize =
            2 * DOT_ENTRY_LEN + entries.iter().map(DirEntry::rec_len).sum::<usize>();
        let format = if needed <= BLOCK {
            DirFormat::Linear {
                blocks: min_blocks.max(1),
            }
        } else {
            DirFormat::Htree(htree::plan(&entries, hash_seed)?)
        };
        Ok(Directory {
            inode,
            parent,
            entries,
            format,
            tree_node: None,
        })
    }

    /// Number of blocks the directory occupies.
    pub fn blocks(&self) -> u64 {
        match &self.format {
            DirFormat::Linear { blocks } => *blocks,
            DirFormat::Htree(index) => index.blocks(),
        }
    }

    /// Renders logical block `logical` of the directory into `out`, from the
    /// entries kept in `entries`.
    pub fn write_block(&self, logical: u64, out: &mut [u8]) {
        match &self.format {
            DirFormat::Linear { .. } => self.write_linear_block(logical, &self.entries, out),
            DirFormat::Htree(index) => index.write_block(self, logical, out, |positions| {
                positions
                    .iter()
                    .filter_map(|&position| self.entries.get(position as usize).cloned())
                    .collect()
            }),
        }
    }

    /// Renders logical block `logical` of a linear directory holding
    /// `entries` (in name order) into `out`.
    pub fn write_linear_block(&self, logical: u64, entries: &[DirEntry], out: &mut [u8]) {
        if logical == 0 {
            let offset = write_dot_entries(out, self.inode, self.parent, false);
            write_entries(out, offset, entries);
        } else {
            write_empty_block(out);
        }
    }
}

/// Writes one entry header and name at `offset`.
fn write_entry(
    out: &mut [u8],
    offset: usize,
    inode: u32,
    rec_len: usize,
    name: &[u8],
    file_type: u8,
) {
    put_u32(out, offset, inode);
    put_u16(out, offset + 4, u16::try_from(rec_len).unwrap_or(u16::MAX));
    out[offset + 6] = u8::try_from(name.len()).unwrap_or(u8::MAX);
    out[offset + 7] = file_type;
    out[offset + 8..offset + 8 + name.len()].copy_from_slice(name);
}

/// Writes "." and ".."; for an htree root, ".." spans the rest of the block
/// so the dx_root data hides inside it. Returns the offset after them.
pub(super) fn write_dot_entries(
    out: &mut [u8],
    inode: u32,
    parent: u32,
    htree_root: bool,
) -> usize {
    write_entry(out, 0, inode, DOT_ENTRY_LEN, b".", FT_DIR);
    let dotdot_len = if htree_root {
        BLOCK - DOT_ENTRY_LEN
    } else {
        DOT_ENTRY_LEN
    };
    write_entry(out, DOT_ENTRY_LEN, parent, dotdot_len, b"..", FT_DIR);
    2 * DOT_ENTRY_LEN
}

/// Writes `entries` from `offset` on; the last entry (or the ".." entry
/// before an empty list) is stretched to the end of the block.
pub(super) fn write_entries(out: &mut [u8], offset: usize, entries: &[DirEntry]) {
    let mut offset = offset;
    if entries.is_empty() {
        // Stretch ".." (the entry just before `offset`) to the block end.
        let dotdot = offset - DOT_ENTRY_LEN;
        put_u16(
            out,
            dotdot + 4,
            u16::try_from(BLOCK - dotdot).unwrap_or(u16::MAX),
        );
        return;
    }
    for (position, entry) in entries.iter().enumerate() {
        let rec_len = if position + 1 == entries.len() {
            BLOCK - offset
        } else {
            entry.rec_len()
        };
        write_entry(
            out,
            offset,
            entry.inode,
            rec_len,
            &entry.name,
            entry.file_type,
        );
        offset += rec_len;
    }
}

/// Writes a block holding no entries: one unused entry spanning the block.
pub(super) fn write_empty_block(out: &mut [u8]) {
    write_entry(out, 0, 0, BLOCK, b"", 0);
}

/// Writes `entries` as a leaf block that starts at offset 0.
pub(super) fn write_leaf(out: &mut [u8], entries: &[DirEntry]) {
    if entries.is_empty() {
        write_empty_block(out);
    } else {
        write_entries(out, 0, entries);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, inode: u32) -> DirEntry {
        DirEntry {
            name: name.as_bytes().into(),
            inode,
            file_type: FT_REG_FILE,
        }
    }

    #[test]
    fn rec_len_alignment() {
        let cases = [("a", 12), ("abcd", 12), ("abcde", 16), ("abcdefgh", 16)];
        for (name, expected) in cases {
            assert_eq!(entry(name, 1).rec_len(), expected, "{name}");
        }
    }

    #[test]
    fn linear_block_last_entry_spans_block() {
        let dir = Directory::plan(2, 2, vec![entry("a", 12), entry("bb", 13)], 1, [0; 4]).unwrap();
        let mut out = vec![0u8; BLOCK];
        dir.write_block(0, &mut out);
        assert_eq!(
            u16::from_le_bytes([out[28], out[29]]),
            12,
            "first entry rec_len"
        );
        assert_eq!(
            u16::from_le_bytes([out[40], out[41]]),
            (BLOCK - 36) as u16,
            "last entry rec_len"
        );
        assert_eq!(&out[44..46], b"bb");
    }

    #[test]
    fn empty_directory_dotdot_spans_block() {
        let dir = Directory::plan(11, 2, Vec::new(), 4, [0; 4]).unwrap();
        assert_eq!(dir.blocks(), 4);
        let mut out = vec![0u8; BLOCK];
        dir.write_block(0, &mut out);
        assert_eq!(u16::from_le_bytes([out[16], out[17]]), (BLOCK - 12) as u16);
        let mut second = vec![0u8; BLOCK];
        dir.write_block(3, &mut second);
        assert_eq!(u16::from_le_bytes([second[4], second[5]]), BLOCK as u16);
    }
}
