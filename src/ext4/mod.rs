//! ext4 filesystem synthesizer: plans an ext4 image for a merged tree once and renders any 4 KiB block of it on demand (reference: the kernel's ext4 disk layout documentation, Documentation/filesystems/ext4).
//!
//! [`Layout::new`] assigns inode numbers and block positions; afterwards
//! every metadata block is a pure function of the layout, and file data
//! blocks are mapped back to (file, offset) through [`Layout::segments`].
//! Memory grows with the number of entries, never with the image size.
//!
//! # Format decisions
//!
//! - 4 KiB blocks, 32768 blocks per group, 256-byte inodes with 32 extra
//!   bytes (nanosecond times, crtime). atime, ctime and crtime equal mtime.
//! - compat `ext_attr`, `dir_index`, `sparse_super2` with both
//!   `s_backup_bgs` zero: only group 0 holds a superblock and descriptors,
//!   so no backup copies interrupt the data region. e2fsprogs 1.47 and the
//!   kernel's `ext4_bg_has_super` both honour `sparse_super2`.
//! - incompat `filetype`, `extent`, `flex_bg`: all bitmaps and inode tables
//!   sit at the front of the device.
//! - ro_compat `sparse_super` (set alongside `sparse_super2`, as mke2fs
//!   does), `large_file`, `huge_file`, `dir_nlink`, `extra_isize`.
//! - No journal in the read-only layout, because nothing is ever written
//!   there to replay. A writable layout ([`Layout::new_writable`]) adds
//!   compat `has_journal`: inode 8 maps a contiguous, clean jbd2 v2 journal
//!   in the metadata region, and spare inodes leave room for new files.
//!   No `metadata_csum`/`uninit_bg`: checksums would have to be
//!   computed per rendered block for no benefit to a read-only reader, and
//!   without them e2fsck checks every bitmap and inode in full. No `64bit`:
//!   images stay below 16 TiB (2^32 blocks), larger ones are rejected.
//! - Directories that fit one block are linear; larger ones are htrees
//!   with half-MD4 (unsigned) hashes and the options' hash seed.
//!
//! # Device order
//!
//! Superblock, group descriptors, block bitmaps, inode bitmaps, inode
//! tables, directory blocks, long-symlink blocks, xattr blocks, extent tree
//! blocks, then regular file data (one contiguous run per file, ordered by
//! layer and data offset), then `extra_free_blocks` free blocks.

mod bitmap;
mod directory;
mod disk;
mod extent;
mod group_desc;
mod htree;
mod inode;
mod journal;
mod layout;
mod render;
mod superblock;
mod xattr;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use crate::tree::{Metadata, NodeId, Tree};

use directory::Directory;
use inode::InodeRecord;
use layout::Geometry;

/// Filesystem block size in bytes.
pub const BLOCK_SIZE: u64 = 4096;

/// Identity and sizing choices for a layout.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayoutOptions {
    /// Filesystem UUID (`s_uuid`).
    pub uuid: [u8; 16],
    /// Seed of the directory name hash (`s_hash_seed`); all zeros selects
    /// the kernel's default seed.
    pub hash_seed: [u8; 16],
    /// Volume label, at most 16 bytes.
    pub volume_name: String,
    /// Free blocks appended after the file data.
    pub extra_free_blocks: u64,
}

pub use journal::MIN_JOURNAL_BLOCKS;

/// Room for changes in a layout served writable. The default (all zero)
/// is the read-only layout: no spare inodes and no journal.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WritableOptions {
    /// Free inodes beyond those the tree needs, for files a user creates.
    pub spare_inodes: u32,
    /// Blocks of the internal jbd2 journal (inode 8); 0 means no journal,
    /// otherwise at least [`MIN_JOURNAL_BLOCKS`].
    pub journal_blocks: u64,
}

/// Reasons a tree cannot be laid out as ext4.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("tree root (node 0) is missing or not a directory; the merged tree must start with a directory")]
    RootNotDirectory,
    #[error("directory node {parent} names node {node}, but the tree has only {count} nodes; the tree is corrupt")]
    DanglingNode {
        parent: NodeId,
        node: NodeId,
        count: usize,
    },
    #[error("directory node {node} is reachable through more than one entry; ext4 cannot hard-link directories")]
    DirectoryLinkedTwice { node: NodeId },
    #[error("directory node {parent} has an invalid entry name {name:?}; names must be 1 to 255 bytes without '/' or NUL and not '.' or '..'")]
    InvalidName { parent: NodeId, name: String },
    #[error("node {node} has {links} directory entries; ext4 allows at most {max} links to a non-directory")]
    TooManyLinks { node: NodeId, links: u64, max: u64 },
    #[error("node {node} has mode {mode:#o}; only permission bits (0o7777) are allowed")]
    InvalidMode { node: NodeId, mode: u16 },
    #[error("node {node} has mtime {seconds}.{nanoseconds:09}; ext4 stores seconds from {min} to {max} and nanoseconds below 1e9")]
    TimeOutOfRange {
        node: NodeId,
        seconds: i64,
        nanoseconds: u32,
        min: i64,
        max: i64,
    },
    #[error("symlink node {node} has an empty target; ext4 cannot store empty symlinks")]
    EmptySymlink { node: NodeId },
    #[error("symlink node {node} target is {len} bytes; ext4 allows at most {max}")]
    SymlinkTooLong {
        node: NodeId,
        len: usize,
        max: usize,
    },
    #[error("device node {node} has number {major}:{minor}; ext4 stores majors up to 4095 and minors up to 1048575")]
    DeviceNumberTooLarge {
        node: NodeId,
        major: u32,
        minor: u32,
    },
    #[error("xattr {name:?} of node {node} is invalid: {reason}")]
    InvalidXattr {
        node: NodeId,
        name: String,
        reason: String,
    },
    #[error("xattrs of node {node} need {needed} bytes, but the inode body and one xattr block hold {available}; remove or shrink xattrs")]
    XattrsTooLarge {
        node: NodeId,
        needed: usize,
        available: usize,
    },
    #[error("directory node {node} needs {leaves} htree leaf blocks; two index levels address at most {max}")]
    DirectoryTooLarge {
        node: NodeId,
        leaves: usize,
        max: usize,
    },
    #[error("image needs {blocks} blocks of 4096 bytes; ext4 without the 64bit feature holds at most {max}")]
    TooManyBlocks { blocks: u64, max: u64 },
    #[error("image needs {inodes} inodes; ext4 holds at most {max}")]
    TooManyInodes { inodes: u64, max: u64 },
    #[error("journal of {blocks} blocks is too small; jbd2 needs at least {min}")]
    JournalTooSmall { blocks: u64, min: u64 },
    #[error("volume name {name:?} is longer than 16 bytes")]
    VolumeNameTooLong { name: String },
}

/// Content of a run of device blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentKind {
    /// Rendered by [`Layout::render_metadata`].
    Metadata,
    /// Regular file data starting at byte `file_offset` of the file; the
    /// tail of the file's last block is zero.
    File { node: NodeId, file_offset: u64 },
    /// All-zero blocks.
    Zero,
}

/// A run of device blocks of one kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub start_block: u64,
    pub block_count: u64,
    pub kind: SegmentKind,
}

/// A run of metadata blocks after the inode tables.
#[derive(Clone, Copy, Debug)]
struct MetaRun {
    start: u64,
    len: u64,
    object: MetaObject,
}

#[derive(Clone, Copy, Debug)]
enum MetaObject {
    /// Blocks of `Layout::dirs[index]`.
    Directory(usize),
    /// The target block of the symlink with this inode number.
    SymlinkBlock(u32),
    /// The external xattr block of this inode.
    XattrBlock(u32),
    /// The extent tree blocks of this inode.
    ExtentTree(u32),
    /// The journal's blocks; the first holds the jbd2 superblock.
    Journal,
}

/// The data blocks of one regular file (32-bit block numbers, see
/// `extent::BlockMap`).
#[derive(Clone, Copy, Debug)]
struct FileRun {
    start: u32,
    len: u32,
    node: NodeId,
}

impl FileRun {
    fn start(&self) -> u64 {
        u64::from(self.start)
    }

    fn end(&self) -> u64 {
        u64::from(self.start) + u64::from(self.len)
    }
}

/// A planned ext4 image.
#[derive(Debug)]
pub struct Layout {
    tree: Arc<Tree>,
    options: LayoutOptions,
    writable: WritableOptions,
    geometry: Geometry,
    /// Indexed by inode number; `None` for reserved inodes (1, 3-10).
    inodes: Vec<Option<InodeRecord>>,
    /// Inode number of each tree node, 0 for unreachable nodes.
    node_inodes: Vec<u32>,
    dirs: Vec<Directory>,
    /// Sorted by `start`, non-overlapping.
    meta_runs: Vec<MetaRun>,
    /// Sorted by `start`, contiguous from `geometry.data_start`.
    file_runs: Vec<FileRun>,
    /// `bg_used_dirs_count` of each group.
    dirs_per_group: Vec<u32>,
    lost_found_meta: Metadata,
    /// The layout adds lost+found to the root (the tree has none).
    synthetic_lost_found: bool,
}

impl Layout {
    /// Device size in bytes.
    pub fn size(&self) -> u64 {
        self.geometry.block_count * BLOCK_SIZE
    }

    pub fn block_count(&self) -> u64 {
        self.geometry.block_count
    }

    pub fn options(&self) -> &LayoutOptions {
        &self.options
    }

    pub fn writable_options(&self) -> WritableOptions {
        self.writable
    }

    /// SHA-256 of the superblock and group descriptor blocks: it changes
    /// whenever the geometry, features, counts or identity of the layout do,
    /// so it names the layout that block numbers refer to.
    pub fn fingerprint(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        let mut block = vec![0u8; BLOCK_SIZE as usize];
        for index in 0..=self.geometry.gdt_blocks {
            self.render_metadata(index, &mut block);
            hasher.update(&block);
        }
        hasher.finalize().into()
    }

    /// Inode number of `node`, or 0 when no directory entry reaches it.
    pub fn inode_of(&self, node: NodeId) -> u32 {
        self.node_inodes.get(node as usize).copied().unwrap_or(0)
    }

    /// Device block where a regular file's data starts (None for empty
    /// files and for nodes that are not regular files in the image).
    pub fn file_start_block(&self, node: NodeId) -> Option<u64> {
        let record = self.inodes.get(self.inode_of(node) as usize)?.as_ref()?;
        let is_regular = record.mode & 0o170000 == inode::S_IFREG;
        match record.body {
            inode::InodeBody::Extents(map) if is_regular && map.len > 0 => Some(map.start()),
            _ => None,
        }
    }
}
