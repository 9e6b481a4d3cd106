//! ext4 layout planning: inode numbering, group geometry and block allocation (reference: kernel ext4 disk layout, "Block Groups" and "Flexible Block Groups").
//!
//! Device order: block 0 (superblock), the group descriptor table, all
//! block bitmaps, all inode bitmaps, all inode tables (flex_bg lets them
//! sit outside their groups), then directory blocks, long-symlink blocks,
//! xattr blocks, the journal (writable layouts only) and extent tree
//! blocks, then file data in (layer,
//! data_offset) order, then free space. Everything before the free space
//! is allocated, so the bitmaps are a prefix of set bits.

use std::sync::Arc;

use tracing::{debug, warn};

use super::directory::{
    DirEntry, DirFormat, Directory, FT_BLKDEV, FT_CHRDEV, FT_DIR, FT_FIFO, FT_REG_FILE, FT_SYMLINK,
};
use super::extent::{self, BlockMap};
use super::group_desc::DESCS_PER_BLOCK;
use super::inode::{
    self, InodeBody, InodeRecord, InodeSource, EXT4_EXTENTS_FL, EXT4_INDEX_FL, S_IFBLK, S_IFCHR,
    S_IFDIR, S_IFIFO, S_IFLNK, S_IFREG,
};
use super::journal::{JOURNAL_INO, MIN_JOURNAL_BLOCKS};
use super::superblock::{BLOCKS_PER_GROUP, FIRST_INO, ROOT_INO};
use super::xattr;
use super::{
    FileRun, Layout, LayoutError, LayoutOptions, MetaObject, MetaRun, WritableOptions, BLOCK_SIZE,
};
use crate::tree::{Children, Metadata, Node, NodeId, NodeKind, Tree, Xattrs, ROOT};

/// Inodes per inode table block.
const INODES_PER_BLOCK: u64 = BLOCK_SIZE / inode::INODE_SIZE as u64;
/// `s_inodes_per_group` may not exceed the bits of one bitmap block.
const MAX_INODES_PER_GROUP: u64 = BLOCK_SIZE * 8;
/// Without the 64bit feature block numbers are 32 bits.
const MAX_BLOCKS: u64 = u32::MAX as u64;
/// Blocks mke2fs gives lost+found.
const LOST_FOUND_BLOCKS: u64 = 4;
/// Link count limit for non-directories (`EXT4_LINK_MAX`); directories
/// above it store 1 (dir_nlink semantics).
const LINK_MAX: u64 = 65000;
/// Maximum symlink target length: the target and a terminating NUL fit one block.
const MAX_SYMLINK_LEN: usize = BLOCK_SIZE as usize - 1;
/// Symlink targets shorter than this live in `i_block` (the 60-byte area
/// must also hold the terminating NUL the kernel counts).
const FAST_SYMLINK_MAX: usize = 60;
const LOST_FOUND: &[u8] = b"lost+found";

/// Group counts and positions of the fixed metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Geometry {
    pub group_count: u32,
    pub inodes_per_group: u32,
    /// Inode table blocks per group.
    pub inode_table_blocks: u64,
    pub gdt_blocks: u64,
    pub block_count: u64,
    /// Blocks `0..used_blocks` are allocated.
    pub used_blocks: u64,
    /// Inodes `1..=max_inode` are allocated.
    pub max_inode: u32,
    /// First block of file data.
    pub data_start: u64,
}

impl Geometry {
    /// Picks the smallest group count whose groups hold all blocks, with
    /// just enough inodes per group for `inode_capacity` (at least
    /// `max_inode`, rounded to whole inode table blocks). `variable_blocks`
    /// counts everything after the inode tables.
    fn solve(
        max_inode: u32,
        inode_capacity: u64,
        variable_blocks: u64,
    ) -> Result<Geometry, LayoutError> {
        let inode_capacity = inode_capacity.max(u64::from(max_inode));
        let max_groups = MAX_BLOCKS.div_ceil(BLOCKS_PER_GROUP);
        for groups in 1..=max_groups {
            let per_group = inode_capacity
                .div_ceil(groups)
                .next_multiple_of(INODES_PER_BLOCK);
            if per_group > MAX_INODES_PER_GROUP {
                continue;
            }
            let inode_table_blocks = per_group / INODES_PER_BLOCK;
            let gdt_blocks = groups.div_ceil(DESCS_PER_BLOCK);
            let fixed = 1 + gdt_blocks + 2 * groups + groups * inode_table_blocks;
            let total = fixed + variable_blocks;
            if total > MAX_BLOCKS {
                return Err(LayoutError::TooManyBlocks {
                    blocks: total,
                    max: MAX_BLOCKS,
                });
            }
            if total.div_ceil(BLOCKS_PER_GROUP) > groups {
                continue;
            }
            // Rounding of inodes per group can leave the last group empty;
            // pad with free blocks so every group has at least one block.
            let block_count = total.max((groups - 1) * BLOCKS_PER_GROUP + 1);
            let (Ok(group_count), Ok(inodes_per_group)) =
                (u32::try_from(groups), u32::try_from(per_group))
            else {
                continue;
            };
            if groups * per_group > u64::from(u32::MAX) {
                return Err(LayoutError::TooManyInodes {
                    inodes: inode_capacity,
                    max: u64::from(u32::MAX),
                });
            }
            return Ok(Geometry {
                group_count,
                inodes_per_group,
                inode_table_blocks,
                gdt_blocks,
                block_count,
                used_blocks: 0,
                max_inode,
                data_start: 0,
            });
        }
        Err(LayoutError::TooManyBlocks {
            blocks: variable_blocks,
            max: MAX_BLOCKS,
        })
    }

    pub fn block_bitmap(&self, group: u32) -> u64 {
        1 + self.gdt_blocks + u64::from(group)
    }

    pub fn inode_bitmap(&self, group: u32) -> u64 {
        1 + self.gdt_blocks + u64::from(self.group_count) + u64::from(group)
    }

    pub fn inode_table(&self, group: u32) -> u64 {
        self.inode_tables_start() + u64::from(group) * self.inode_table_blocks
    }

    pub fn inode_tables_start(&self) -> u64 {
        1 + self.gdt_blocks + 2 * u64::from(self.group_count)
    }

    /// First block after the inode tables.
    pub fn inode_tables_end(&self) -> u64 {
        self.inode_table(self.group_count)
    }

    pub fn inodes_count(&self) -> u64 {
        u64::from(self.group_count) * u64::from(self.inodes_per_group)
    }

    pub fn used_inodes_in_group(&self, group: u32) -> u64 {
        let first = u64::from(group) * u64::from(self.inodes_per_group);
        u64::from(self.max_inode)
            .saturating_sub(first)
            .min(u64::from(self.inodes_per_group))
    }

    /// Inode table blocks of `group` that hold at least one allocated inode.
    pub fn used_table_blocks(&self, group: u32) -> u64 {
        self.used_inodes_in_group(group).div_ceil(INODES_PER_BLOCK)
    }

    pub fn free_blocks_in_group(&self, group: u32) -> u64 {
        let first = u64::from(group) * BLOCKS_PER_GROUP;
        let present = self.block_count.saturating_sub(first).min(BLOCKS_PER_GROUP);
        let used = self.used_blocks.saturating_sub(first).min(BLOCKS_PER_GROUP);
        present - used
    }

    /// `s_log_groups_per_flex`: one flex group spans all groups (at least
    /// 16, the mke2fs default), since all their metadata sits together.
    pub fn log_groups_per_flex(&self) -> u8 {
        let bits = u32::BITS - (self.group_count.max(1) - 1).leading_zeros();
        u8::try_from(bits.clamp(4, 31)).unwrap_or(31)
    }

    /// Group and index within the group of inode `ino`.
    pub fn locate_inode(&self, ino: u32) -> (u32, u32) {
        let index = ino - 1;
        (index / self.inodes_per_group, index % self.inodes_per_group)
    }
}

/// Inode numbers assigned to tree nodes.
struct Numbering {
    /// Inode of each node; 0 for nodes no directory entry reaches.
    node_inodes: Vec<u32>,
    /// Source of each inode, in inode order: the root's (inode 2) first, then
    /// those of inodes 11, 12, ... (see [`Numbering::inode_at`]).
    order: Vec<InodeSource>,
    /// Parent directory inode of each directory node.
    parents: Vec<u32>,
    /// Directory entries naming each node. Four bytes per node, as this list
    /// is live at the layout's peak; a node has fewer than 2^32 entries, as
    /// node ids are 32-bit.
    entry_counts: Vec<u32>,
    synthetic_lost_found: bool,
    max_inode: u32,
}

impl Numbering {
    /// Records the source of inode `ino`, the next one after those recorded:
    /// inodes are numbered in the order they are recorded.
    fn push(&mut self, ino: u32, source: InodeSource) {
        debug_assert_eq!(ino, Numbering::inode_at(self.order.len()));
        self.order.push(source);
    }

    /// Returns the inode whose source is `order[slot]`.
    fn inode_at(slot: usize) -> u32 {
        match slot {
            0 => ROOT_INO,
            // Inode numbers are u32, so the slots of `order` fit one.
            _ => FIRST_INO.saturating_add((slot - 1) as u32),
        }
    }
}

fn children(node: &Node) -> Option<&Children> {
    match &node.kind {
        NodeKind::Dir { children } => Some(children),
        _ => None,
    }
}

/// Numbers inodes: root 2, lost+found 11, then each directory's entries in
/// name order before descending into its subdirectories (depth first), so
/// a directory's entries get neighbouring inodes.
fn number_inodes(tree: &Tree) -> Result<Numbering, LayoutError> {
    let node_count = tree.nodes.len();
    let root = tree.nodes.first().ok_or(LayoutError::RootNotDirectory)?;
    let root_children = children(root).ok_or(LayoutError::RootNotDirectory)?;

    let mut numbering = Numbering {
        node_inodes: vec![0; node_count],
        order: vec![InodeSource::Node(ROOT)],
        parents: vec![0; node_count],
        entry_counts: vec![0; node_count],
        synthetic_lost_found: false,
        max_inode: FIRST_INO - 1,
    };
    numbering.node_inodes[ROOT as usize] = ROOT_INO;
    numbering.parents[ROOT as usize] = ROOT_INO;

    let mut next = FIRST_INO;
    match root_children.get(LOST_FOUND) {
        Some(id)
            if tree
                .nodes
                .get(id as usize)
                .is_some_and(|node| children(node).is_some()) =>
        {
            numbering.node_inodes[id as usize] = next;
            numbering.push(next, InodeSource::Node(id));
            next += 1;
        }
        Some(_) => {
            warn!("/lost+found in the image is not a directory; the filesystem gets no lost+found")
        }
        None => {
            numbering.synthetic_lost_found = true;
            numbering.push(next, InodeSource::LostFound);
            next += 1;
        }
    }

    let mut visited_dirs = vec![false; node_count];
    visited_dirs[ROOT as usize] = true;
    let mut stack = vec![ROOT];
    while let Some(dir) = stack.pop() {
        let Some(entries) = children(tree.node(dir)) else {
            continue;
        };
        let mut subdirs = Vec::new();
        for (name, child) in entries {
            let Some(node) = tree.nodes.get(child as usize) else {
                return Err(LayoutError::DanglingNode {
                    parent: dir,
                    node: child,
                    count: node_count,
                });
            };
            validate_name(dir, name)?;
            let count = &mut numbering.entry_counts[child as usize];
            *count = count.saturating_add(1);

            if children(node).is_some() {
                if visited_dirs[child as usize] {
                    return Err(LayoutError::DirectoryLinkedTwice { node: child });
                }
                visited_dirs[child as usize] = true;
                numbering.parents[child as usize] = numbering.node_inodes[dir as usize];
                subdirs.push(child);
            }
            if numbering.node_inodes[child as usize] == 0 {
                numbering.node_inodes[child as usize] = next;
                numbering.push(next, InodeSource::Node(child));
                next = next.checked_add(1).ok_or(LayoutError::TooManyInodes {
                    inodes: u64::from(u32::MAX) + 1,
                    max: u64::from(u32::MAX),
                })?;
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }

    numbering.max_inode = next - 1;
    Ok(numbering)
}

fn validate_name(parent: NodeId, name: &[u8]) -> Result<(), LayoutError> {
    let invalid = name.is_empty()
        || name.len() > 255
        || name.contains(&b'/')
        || name.contains(&0)
        || name == b"."
        || name == b"..";
    if invalid {
        return Err(LayoutError::InvalidName {
            parent,
            name: String::from_utf8_lossy(name).into_owned(),
        });
    }
    Ok(())
}

fn file_type(kind: &NodeKind) -> u8 {
    match kind {
        NodeKind::Dir { .. } => FT_DIR,
        NodeKind::Reg { .. } => FT_REG_FILE,
        NodeKind::Symlink { .. } => FT_SYMLINK,
        NodeKind::CharDev { .. } => FT_CHRDEV,
        NodeKind::BlockDev { .. } => FT_BLKDEV,
        NodeKind::Fifo => FT_FIFO,
    }
}

/// Checks the metadata fields that have a limited on-disk range.
fn validate_metadata(node: NodeId, meta: &Metadata) -> Result<(), LayoutError> {
    if meta.mode > 0o7777 {
        return Err(LayoutError::InvalidMode {
            node,
            mode: meta.mode,
        });
    }
    if inode::encode_time(meta.mtime, meta.mtime_nsec).is_none() {
        return Err(LayoutError::TimeOutOfRange {
            node,
            seconds: meta.mtime,
            nanoseconds: meta.mtime_nsec,
            min: inode::MIN_TIME,
            max: inode::MAX_TIME_EXCLUSIVE - 1,
        });
    }
    Ok(())
}

/// Encodes a node's xattrs, skipping those ext4 cannot name (with a
/// warning when `warn_skipped`, so planning reports them once and
/// rendering stays quiet).
pub(super) fn encoded_xattrs(
    node: NodeId,
    meta: &Metadata,
    warn_skipped: bool,
) -> Result<Vec<xattr::Xattr<'_>>, LayoutError> {
    let mut encoded = Vec::with_capacity(meta.xattrs.len());
    for (name, value) in &meta.xattrs {
        match xattr::encode(name, value) {
            Ok(xattr) => encoded.push(xattr),
            Err(
                problem @ (xattr::XattrProblem::UnsupportedNamespace
                | xattr::XattrProblem::InvalidNameLength(_)),
            ) => {
                if !warn_skipped {
                    continue;
                }
                warn!(node, name = %String::from_utf8_lossy(name), %problem, "skipping xattr that ext4 cannot store");
            }
            Err(problem) => {
                return Err(LayoutError::InvalidXattr {
                    node,
                    name: String::from_utf8_lossy(name).into_owned(),
                    reason: problem.to_string(),
                })
            }
        }
    }
    Ok(encoded)
}

fn needs_xattr_block(node: NodeId, meta: &Metadata) -> Result<bool, LayoutError> {
    let encoded = encoded_xattrs(node, meta, true)?;
    let placement =
        xattr::place(encoded).map_err(|(needed, available)| LayoutError::XattrsTooLarge {
            node,
            needed,
            available,
        })?;
    Ok(!placement.block.is_empty())
}

/// Metadata of the lost+found directory this layout adds: mode 0700,
/// owned by root, with the root directory's time.
fn lost_found_metadata(root: &Metadata) -> Metadata {
    Metadata {
        mode: 0o700,
        uid: 0,
        gid: 0,
        mtime: root.mtime,
        mtime_nsec: root.mtime_nsec,
        xattrs: Xattrs::default(),
    }
}

impl Layout {
    /// Plans the filesystem for `tree`: inode numbers, block positions and
    /// group geometry. Fails on trees that ext4 cannot represent.
    pub fn new(tree: Arc<Tree>, options: LayoutOptions) -> Result<Layout, LayoutError> {
        Layout::new_writable(tree, options, WritableOptions::default())
    }

    /// Plans the filesystem for `tree` like [`Layout::new`], with spare
    /// inodes and a journal for writable use. The journal is one contiguous
    /// run in the metadata region, before the extent tree blocks.
    pub fn new_writable(
        tree: Arc<Tree>,
        options: LayoutOptions,
        writable: WritableOptions,
    ) -> Result<Layout, LayoutError> {
        if writable.journal_blocks != 0 && writable.journal_blocks < MIN_JOURNAL_BLOCKS {
            return Err(LayoutError::JournalTooSmall {
                blocks: writable.journal_blocks,
                min: MIN_JOURNAL_BLOCKS,
            });
        }
        if options.volume_name.len() > 16 {
            return Err(LayoutError::VolumeNameTooLong {
                name: options.volume_name.clone(),
            });
        }
        let hash_seed: [u32; 4] = std::array::from_fn(|i| {
            let bytes = &options.hash_seed[4 * i..4 * i + 4];
            u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
        });

        let numbering = number_inodes(&tree)?;
        let lost_found_meta = lost_found_metadata(&tree.node(ROOT).meta);
        let mut inodes: Vec<Option<InodeRecord>> = vec![None; numbering.max_inode as usize + 1];
        let mut dirs = Vec::new();
        let mut dirs_per_group_inodes = Vec::new();

        for (slot, &source) in numbering.order.iter().enumerate() {
            let ino = Numbering::inode_at(slot);
            let (record, dir) = match source {
                InodeSource::LostFound => {
                    let dir =
                        Directory::plan(ino, ROOT_INO, Vec::new(), LOST_FOUND_BLOCKS, hash_seed)
                            .map_err(|too_many| LayoutError::DirectoryTooLarge {
                                node: ROOT,
                                leaves: too_many.leaves,
                                max: too_many.max,
                            })?;
                    (directory_record(source, 0o700, 2, &dir, false)?, Some(dir))
                }
                InodeSource::Node(id) => plan_node(&tree, &numbering, id, ino, hash_seed)?,
                // Numbering never yields the journal; it is added below.
                InodeSource::Journal => continue,
            };
            if let Some(dir) = dir {
                dirs_per_group_inodes.push(ino);
                dirs.push(dir);
            }
            inodes[ino as usize] = Some(record);
        }
        if writable.journal_blocks > 0 {
            inodes[JOURNAL_INO as usize] = Some(journal_record(writable.journal_blocks)?);
        }
        // What only the planning above needs goes before the blocks are placed.
        drop(numbering.order);
        drop(numbering.parents);
        drop(numbering.entry_counts);

        // Count every block after the inode tables, then size the groups.
        let mut variable_blocks = options.extra_free_blocks;
        for record in inodes.iter().flatten() {
            if let InodeBody::Extents(map) = record.body {
                variable_blocks =
                    variable_blocks.saturating_add(map.len() + extent::tree_blocks(map.len()));
            }
            if record.xattr_block.is_some() {
                variable_blocks = variable_blocks.saturating_add(1);
            }
        }
        let inode_capacity = u64::from(numbering.max_inode) + u64::from(writable.spare_inodes);
        let mut geometry = Geometry::solve(numbering.max_inode, inode_capacity, variable_blocks)?;

        let mut layout = Layout {
            tree,
            options,
            writable,
            geometry: geometry.clone(),
            inodes,
            node_inodes: numbering.node_inodes,
            dirs,
            meta_runs: Vec::new(),
            file_runs: Vec::new(),
            dirs_per_group: vec![0; geometry.group_count as usize],
            lost_found_meta,
            synthetic_lost_found: numbering.synthetic_lost_found,
        };
        for ino in dirs_per_group_inodes {
            let (group, _) = geometry.locate_inode(ino);
            layout.dirs_per_group[group as usize] += 1;
        }

        let data_start = layout.allocate_metadata(geometry.inode_tables_end())?;
        let used_blocks = layout.allocate_file_data(data_start)?;
        geometry.data_start = data_start;
        geometry.used_blocks = used_blocks;
        geometry.block_count = geometry.block_count.max(used_blocks);
        layout.geometry = geometry;

        debug!(
            blocks = layout.geometry.block_count,
            groups = layout.geometry.group_count,
            inodes = layout.geometry.max_inode,
            data_start = layout.geometry.data_start,
            "planned ext4 layout"
        );
        Ok(layout)
    }

    /// Places directory, long-symlink, xattr and extent tree blocks from
    /// `cursor` on. Returns the first block after them.
    fn allocate_metadata(&mut self, mut cursor: u64) -> Result<u64, LayoutError> {
        for (index, dir) in self.dirs.iter().enumerate() {
            let len = dir.blocks();
            self.meta_runs.push(MetaRun {
                start: cursor,
                len,
                object: MetaObject::Directory(index),
            });
            if let Some(Some(record)) = self.inodes.get_mut(dir.inode as usize) {
                record.body = InodeBody::Extents(BlockMap {
                    start: block32(cursor)?,
                    len: block32(len)?,
                    tree_start: 0,
                });
            }
            cursor += len;
        }

        for (ino, slot) in self.inodes.iter_mut().enumerate() {
            let Some(record) = slot else { continue };
            if record.mode & 0o170000 == S_IFLNK {
                if let InodeBody::Extents(map) = &mut record.body {
                    map.start = block32(cursor)?;
                    self.meta_runs.push(MetaRun {
                        start: cursor,
                        len: 1,
                        object: MetaObject::SymlinkBlock(ino as u32),
                    });
                    cursor += 1;
                }
            }
        }

        for (ino, slot) in self.inodes.iter_mut().enumerate() {
            let Some(record) = slot else { continue };
            if record.xattr_block.is_some() {
                record.xattr_block = Some(block32(cursor)?);
                self.meta_runs.push(MetaRun {
                    start: cursor,
                    len: 1,
                    object: MetaObject::XattrBlock(ino as u32),
                });
                cursor += 1;
            }
        }

        if let Some(Some(record)) = self.inodes.get_mut(JOURNAL_INO as usize) {
            if let InodeBody::Extents(map) = &mut record.body {
                map.start = block32(cursor)?;
                self.meta_runs.push(MetaRun {
                    start: cursor,
                    len: map.len(),
                    object: MetaObject::Journal,
                });
                cursor += map.len();
            }
        }

        for (ino, slot) in self.inodes.iter_mut().enumerate() {
            let Some(record) = slot else { continue };
            if let InodeBody::Extents(map) = &mut record.body {
                let len = extent::tree_blocks(map.len());
                if len > 0 {
                    map.tree_start = block32(cursor)?;
                    self.meta_runs.push(MetaRun {
                        start: cursor,
                        len,
                        object: MetaObject::ExtentTree(ino as u32),
                    });
                    cursor += len;
                }
            }
        }
        Ok(cursor)
    }

    /// Places regular file data in (layer, data_offset) order from
    /// `cursor` on. Returns the first block after it.
    fn allocate_file_data(&mut self, mut cursor: u64) -> Result<u64, LayoutError> {
        // (layer, data offset, inode): the node is found again through the inode.
        let mut files: Vec<(u32, u64, u32)> = Vec::new();
        for (ino, slot) in self.inodes.iter().enumerate() {
            let Some(record) = slot else { continue };
            let InodeSource::Node(node) = record.source else {
                continue;
            };
            if let (NodeKind::Reg { data }, InodeBody::Extents(map)) =
                (&self.tree.node(node).kind, record.body)
            {
                if map.len > 0 {
                    files.push((data.layer, data.data_offset, ino as u32));
                }
            }
        }
        // Sorted in reverse and taken from the end, so the list gives its memory
        // back as the runs grow and the two are not both held in full (16 and 12
        // bytes per file, at the layout's peak).
        files.sort_unstable_by(|a, b| b.cmp(a));
        self.file_runs.reserve_exact(files.len());
        let mut released = files.len();
        while let Some((_, _, ino)) = files.pop() {
            cursor = self.place_file(ino, cursor)?;
            if released - files.len() >= FILES_RELEASE_STEP {
                files.shrink_to_fit();
                released = files.len();
            }
        }
        Ok(cursor)
    }

    /// Gives the file of inode `ino` its blocks from `cursor` on and records
    /// its run; returns the block after it.
    fn place_file(&mut self, ino: u32, cursor: u64) -> Result<u64, LayoutError> {
        let Some(Some(record)) = self.inodes.get_mut(ino as usize) else {
            return Ok(cursor);
        };
        let InodeSource::Node(node) = record.source else {
            return Ok(cursor);
        };
        let InodeBody::Extents(map) = &mut record.body else {
            return Ok(cursor);
        };
        map.start = block32(cursor)?;
        self.file_runs.push(FileRun {
            start: map.start,
            len: map.len,
            node,
        });
        Ok(cursor + map.len())
    }
}

/// Files placed between two releases of the sorted file list's unused memory.
const FILES_RELEASE_STEP: usize = 1 << 16;

/// A block number or count as a [`BlockMap`] stores it. `Geometry::solve`
/// keeps every block the layout places below `MAX_BLOCKS`, so this fails
/// only for a count planned before that check (a file of 16 TiB or more).
fn block32(blocks: u64) -> Result<u32, LayoutError> {
    u32::try_from(blocks).map_err(|_| LayoutError::TooManyBlocks {
        blocks,
        max: MAX_BLOCKS,
    })
}

/// The journal inode: a regular file of mode 0600 owned by root, as mke2fs
/// makes it, mapping `blocks` contiguous blocks.
fn journal_record(blocks: u64) -> Result<InodeRecord, LayoutError> {
    Ok(InodeRecord {
        source: InodeSource::Journal,
        mode: S_IFREG | 0o600,
        links: 1,
        size: blocks * BLOCK_SIZE,
        flags: EXT4_EXTENTS_FL,
        body: InodeBody::Extents(BlockMap {
            start: 0,
            len: block32(blocks)?,
            tree_start: 0,
        }),
        xattr_block: None,
    })
}

fn directory_record(
    source: InodeSource,
    perm: u16,
    links: u16,
    dir: &Directory,
    htree: bool,
) -> Result<InodeRecord, LayoutError> {
    let len = dir.blocks();
    let mut flags = EXT4_EXTENTS_FL;
    if htree {
        flags |= EXT4_INDEX_FL;
    }
    Ok(InodeRecord {
        source,
        mode: S_IFDIR | perm,
        links,
        size: len * BLOCK_SIZE,
        flags,
        body: InodeBody::Extents(BlockMap {
            start: 0,
            len: block32(len)?,
            tree_start: 0,
        }),
        xattr_block: None,
    })
}

/// Returns the entries of directory node `id` in name order, with
/// lost+found in the root when the layout adds it, and how many of them are
/// directories.
pub(super) fn directory_entries(
    tree: &Tree,
    node_inodes: &[u32],
    synthetic_lost_found: bool,
    id: NodeId,
    children: &Children,
) -> (Vec<DirEntry>, u64) {
    let mut entries = Vec::with_capacity(children.len() + 1);
    let mut subdirs: u64 = 0;
    for (name, child) in children {
        let child_node = tree.node(child);
        if matches!(child_node.kind, NodeKind::Dir { .. }) {
            subdirs += 1;
        }
        entries.push(DirEntry {
            name: name.into(),
            inode: node_inodes.get(child as usize).copied().unwrap_or(0),
            file_type: file_type(&child_node.kind),
        });
    }
    if id == ROOT && synthetic_lost_found {
        subdirs += 1;
        entries.push(DirEntry {
            name: LOST_FOUND.into(),
            inode: FIRST_INO,
            file_type: FT_DIR,
        });
        entries.sort_by(|a, b| a.name.cmp(&b.name));
    }
    (entries, subdirs)
}

/// Returns the entries at `positions` of the list [`directory_entries`]
/// returns, without building the whole list.
pub(super) fn directory_entries_at(
    tree: &Tree,
    node_inodes: &[u32],
    synthetic_lost_found: bool,
    id: NodeId,
    children: &Children,
    positions: &[u32],
) -> Vec<DirEntry> {
    // Where the root's added lost+found sits among the children in name order.
    let lost_found = (id == ROOT && synthetic_lost_found).then(|| {
        let (mut low, mut high) = (0, children.len());
        while low < high {
            let middle = low + (high - low) / 2;
            match children.at(middle) {
                Some((name, _)) if name < LOST_FOUND => low = middle + 1,
                _ => high = middle,
            }
        }
        low
    });

    let mut entries = Vec::with_capacity(positions.len());
    for &position in positions {
        let position = position as usize;
        let child = match lost_found {
            Some(at) if position == at => {
                entries.push(DirEntry {
                    name: LOST_FOUND.into(),
                    inode: FIRST_INO,
                    file_type: FT_DIR,
                });
                continue;
            }
            Some(at) if position > at => position - 1,
            _ => position,
        };
        let Some((name, node)) = children.at(child) else {
            continue;
        };
        entries.push(DirEntry {
            name: name.into(),
            inode: node_inodes.get(node as usize).copied().unwrap_or(0),
            file_type: file_type(&tree.node(node).kind),
        });
    }
    entries
}

/// Plans the inode of directory node `id` and its blocks.
fn plan_directory(
    tree: &Tree,
    numbering: &Numbering,
    id: NodeId,
    ino: u32,
    children: &Children,
    hash_seed: [u32; 4],
) -> Result<(InodeRecord, Directory), LayoutError> {
    let (entries, subdirs) = directory_entries(
        tree,
        &numbering.node_inodes,
        numbering.synthetic_lost_found,
        id,
        children,
    );

    // dir_nlink: a directory with too many subdirectories stores 1.
    let count = 2 + subdirs;
    let links = if count > LINK_MAX {
        1
    } else {
        u16::try_from(count).unwrap_or(1)
    };
    let parent = numbering.parents[id as usize];
    let mut dir = Directory::plan(ino, parent, entries, 1, hash_seed).map_err(|too_many| {
        LayoutError::DirectoryTooLarge {
            node: id,
            leaves: too_many.leaves,
            max: too_many.max,
        }
    })?;
    // The directory is rendered from the tree, which contains the same names,
    // instead of from a copy of every name.
    dir.entries = Vec::new();
    dir.tree_node = Some(id);
    let htree = matches!(dir.format, DirFormat::Htree(_));
    let record = directory_record(
        InodeSource::Node(id),
        tree.node(id).meta.mode,
        links,
        &dir,
        htree,
    )?;
    Ok((record, dir))
}

/// Plans the inode of tree node `id` (and its directory, if it is one).
fn plan_node(
    tree: &Tree,
    numbering: &Numbering,
    id: NodeId,
    ino: u32,
    hash_seed: [u32; 4],
) -> Result<(InodeRecord, Option<Directory>), LayoutError> {
    let node = tree.node(id);
    let meta = &node.meta;
    validate_metadata(id, meta)?;
    let xattr_block = needs_xattr_block(id, meta)?.then_some(0);

    let (type_bits, size, flags, body) = match &node.kind {
        NodeKind::Dir { children } => {
            let (mut record, dir) = plan_directory(tree, numbering, id, ino, children, hash_seed)?;
            record.xattr_block = xattr_block;
            return Ok((record, Some(dir)));
        }
        NodeKind::Reg { data } => {
            let len = block32(data.size.div_ceil(BLOCK_SIZE))?;
            (
                S_IFREG,
                data.size,
                EXT4_EXTENTS_FL,
                InodeBody::Extents(BlockMap {
                    start: 0,
                    len,
                    tree_start: 0,
                }),
            )
        }
        NodeKind::Symlink { target } => {
            if target.is_empty() {
                return Err(LayoutError::EmptySymlink { node: id });
            }
            if target.len() > MAX_SYMLINK_LEN {
                return Err(LayoutError::SymlinkTooLong {
                    node: id,
                    len: target.len(),
                    max: MAX_SYMLINK_LEN,
                });
            }
            let size = target.len() as u64;
            if target.len() < FAST_SYMLINK_MAX {
                (S_IFLNK, size, 0, InodeBody::FastSymlink)
            } else {
                (
                    S_IFLNK,
                    size,
                    EXT4_EXTENTS_FL,
                    InodeBody::Extents(BlockMap {
                        start: 0,
                        len: 1,
                        tree_start: 0,
                    }),
                )
            }
        }
        NodeKind::CharDev { major, minor } | NodeKind::BlockDev { major, minor } => {
            let words =
                inode::encode_device(*major, *minor).ok_or(LayoutError::DeviceNumberTooLarge {
                    node: id,
                    major: *major,
                    minor: *minor,
                })?;
            let type_bits = if matches!(node.kind, NodeKind::CharDev { .. }) {
                S_IFCHR
            } else {
                S_IFBLK
            };
            (type_bits, 0, 0, InodeBody::Device(words))
        }
        NodeKind::Fifo => (S_IFIFO, 0, 0, InodeBody::Empty),
    };

    let entry_links = u64::from(numbering.entry_counts[id as usize]);
    let links = u16::try_from(entry_links)
        .ok()
        .filter(|&links| u64::from(links) <= LINK_MAX)
        .ok_or(LayoutError::TooManyLinks {
            node: id,
            links: entry_links,
            max: LINK_MAX,
        })?;
    let record = InodeRecord {
        source: InodeSource::Node(id),
        mode: type_bits | meta.mode,
        links,
        size,
        flags,
        body,
        xattr_block,
    };
    Ok((record, None))
}
