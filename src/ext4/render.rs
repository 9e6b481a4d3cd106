//! ext4 block rendering: maps device blocks to metadata, file data or zeros and renders metadata blocks (reference: kernel ext4 disk layout, "Layout").

use tracing::error;

use super::directory::DirFormat;
use super::inode::{write_inode, InodeBody, InodeSource, INODE_SIZE};
use super::journal::{self, JOURNAL_INO};
use super::layout::{directory_entries, directory_entries_at, encoded_xattrs};
use super::superblock::{write_superblock, JournalBackup};
use super::{bitmap, extent, group_desc, xattr};
use super::{Layout, MetaObject, Segment, SegmentKind, BLOCK_SIZE};
use crate::tree::{Metadata, Node, NodeKind};

const BLOCK: usize = BLOCK_SIZE as usize;

impl Layout {
    /// Kind of `block` and the end of the run of that kind it belongs to.
    fn run_at(&self, block: u64) -> (SegmentKind, u64) {
        let geometry = &self.geometry;
        let tables_start = geometry.inode_tables_start();
        if block < tables_start {
            return (SegmentKind::Metadata, tables_start);
        }
        if block < geometry.inode_tables_end() {
            // Inode table blocks past the last allocated inode are zero.
            let offset = block - tables_start;
            let group = offset / geometry.inode_table_blocks;
            let group_start = tables_start + group * geometry.inode_table_blocks;
            let used = u32::try_from(group).map_or(0, |group| geometry.used_table_blocks(group));
            return if block < group_start + used {
                (SegmentKind::Metadata, group_start + used)
            } else {
                (SegmentKind::Zero, group_start + geometry.inode_table_blocks)
            };
        }
        if block < geometry.data_start {
            return (SegmentKind::Metadata, geometry.data_start);
        }
        if block < geometry.used_blocks {
            let index = self.file_runs.partition_point(|run| run.end() <= block);
            if let Some(run) = self.file_runs.get(index) {
                let file_offset = (block - run.start()) * BLOCK_SIZE;
                return (
                    SegmentKind::File {
                        node: run.node,
                        file_offset,
                    },
                    run.end(),
                );
            }
        }
        (SegmentKind::Zero, u64::MAX)
    }

    /// Splits device blocks `start_block..start_block + block_count` into
    /// runs of one kind, in order, covering the range exactly. Blocks past
    /// the end of the device are reported as [`SegmentKind::Zero`].
    pub fn segments(&self, start_block: u64, block_count: u64) -> Vec<Segment> {
        let end = start_block.saturating_add(block_count);
        let mut segments: Vec<Segment> = Vec::new();
        let mut block = start_block;
        while block < end {
            let (kind, run_end) = self.run_at(block);
            let run_end = run_end.min(end).max(block + 1);
            let len = run_end - block;
            match segments.last_mut() {
                Some(last)
                    if last.kind == kind
                        && matches!(kind, SegmentKind::Metadata | SegmentKind::Zero)
                        && last.start_block + last.block_count == block =>
                {
                    last.block_count += len;
                }
                _ => segments.push(Segment {
                    start_block: block,
                    block_count: len,
                    kind,
                }),
            }
            block = run_end;
        }
        segments
    }

    /// Renders one metadata block into `out` (4096 bytes). Blocks that hold
    /// no metadata render as zeros; a wrong `out` length is logged and only
    /// the overlapping bytes are written.
    pub fn render_metadata(&self, block: u64, out: &mut [u8]) {
        let mut buf = [0u8; BLOCK];
        self.render_into(block, &mut buf);
        if out.len() != BLOCK {
            error!(
                block,
                len = out.len(),
                "render_metadata called with a buffer that is not 4096 bytes"
            );
        }
        let len = out.len().min(BLOCK);
        out[..len].copy_from_slice(&buf[..len]);
        out[len..].fill(0);
    }

    fn render_into(&self, block: u64, out: &mut [u8]) {
        let geometry = &self.geometry;
        let groups = u64::from(geometry.group_count);
        let group_of = |first: u64| u32::try_from(block - first).unwrap_or(u32::MAX);

        if block == 0 {
            write_superblock(out, geometry, &self.options, self.journal_backup().as_ref());
        } else if block <= geometry.gdt_blocks {
            group_desc::write_gdt_block(out, geometry, &self.dirs_per_group, block - 1);
        } else if block < geometry.block_bitmap(0) + groups {
            bitmap::write_block_bitmap(out, geometry, group_of(geometry.block_bitmap(0)));
        } else if block < geometry.inode_bitmap(0) + groups {
            bitmap::write_inode_bitmap(out, geometry, group_of(geometry.inode_bitmap(0)));
        } else if block < geometry.inode_tables_end() {
            self.render_inode_table_block(block - geometry.inode_tables_start(), out);
        } else if block < geometry.data_start {
            self.render_meta_run(block, out);
        }
    }

    /// The journal inode's `i_block` and size, which the superblock keeps a
    /// copy of (`s_jnl_blocks`); `None` without a journal.
    fn journal_backup(&self) -> Option<JournalBackup> {
        let record = self.inodes.get(JOURNAL_INO as usize)?.as_ref()?;
        let InodeBody::Extents(map) = record.body else {
            return None;
        };
        let mut i_block = [0u8; 60];
        extent::write_root(&mut i_block, &map);
        Some(JournalBackup {
            i_block,
            size: record.size,
        })
    }

    fn metadata_of(&self, source: InodeSource) -> &Metadata {
        match source {
            InodeSource::Node(node) => &self.tree.node(node).meta,
            // Both are owned by root with the root directory's time; the
            // mode comes from the inode record.
            InodeSource::LostFound | InodeSource::Journal => &self.lost_found_meta,
        }
    }

    fn symlink_target(&self, source: InodeSource) -> &[u8] {
        match source {
            InodeSource::Node(node) => match &self.tree.node(node).kind {
                NodeKind::Symlink { target } => target,
                _ => &[],
            },
            InodeSource::LostFound | InodeSource::Journal => &[],
        }
    }

    /// Renders block `index` of the concatenated inode tables.
    fn render_inode_table_block(&self, index: u64, out: &mut [u8]) {
        let per_block = (BLOCK / INODE_SIZE) as u64;
        let geometry = &self.geometry;
        let group = index / geometry.inode_table_blocks;
        let first_index = (index % geometry.inode_table_blocks) * per_block;
        let first_ino = group * u64::from(geometry.inodes_per_group) + first_index + 1;

        for slot in 0..per_block {
            let Ok(ino) = usize::try_from(first_ino + slot) else {
                return;
            };
            let Some(Some(record)) = self.inodes.get(ino) else {
                continue;
            };
            let meta = self.metadata_of(record.source);
            let node = match record.source {
                InodeSource::Node(node) => node,
                InodeSource::LostFound | InodeSource::Journal => 0,
            };
            let xattrs = encoded_xattrs(node, meta, false).unwrap_or_default();
            let placement = xattr::place(xattrs).unwrap_or_default();
            let offset = slot as usize * INODE_SIZE;
            let target = self.symlink_target(record.source);
            write_inode(
                &mut out[offset..offset + INODE_SIZE],
                record,
                meta,
                target,
                &placement.ibody,
            );
        }
    }

    /// Renders a block of the directory / symlink / xattr / extent tree area.
    fn render_meta_run(&self, block: u64, out: &mut [u8]) {
        let index = self
            .meta_runs
            .partition_point(|run| run.start + run.len <= block);
        let Some(run) = self.meta_runs.get(index).filter(|run| run.start <= block) else {
            return;
        };
        let logical = block - run.start;
        match run.object {
            MetaObject::Directory(dir) => {
                if let Some(dir) = self.dirs.get(dir) {
                    match dir.tree_node.map(|node| (node, self.tree.node(node))) {
                        Some((
                            node,
                            Node {
                                kind: NodeKind::Dir { children },
                                ..
                            },
                        )) => match &dir.format {
                            DirFormat::Linear { .. } => {
                                let (entries, _) = directory_entries(
                                    &self.tree,
                                    &self.node_inodes,
                                    self.synthetic_lost_found,
                                    node,
                                    children,
                                );
                                dir.write_linear_block(logical, &entries, out);
                            }
                            DirFormat::Htree(index) => {
                                index.write_block(dir, logical, out, |positions| {
                                    directory_entries_at(
                                        &self.tree,
                                        &self.node_inodes,
                                        self.synthetic_lost_found,
                                        node,
                                        children,
                                        positions,
                                    )
                                })
                            }
                        },
                        _ => dir.write_block(logical, out),
                    }
                }
            }
            MetaObject::SymlinkBlock(ino) => {
                if let Some(Some(record)) = self.inodes.get(ino as usize) {
                    let target = self.symlink_target(record.source);
                    out[..target.len()].copy_from_slice(target);
                }
            }
            MetaObject::XattrBlock(ino) => {
                if let Some(Some(record)) = self.inodes.get(ino as usize) {
                    let InodeSource::Node(node) = record.source else {
                        return;
                    };
                    let meta = self.metadata_of(record.source);
                    let xattrs = encoded_xattrs(node, meta, false).unwrap_or_default();
                    let placement = xattr::place(xattrs).unwrap_or_default();
                    xattr::write_block(out, &placement.block);
                }
            }
            MetaObject::Journal => {
                if logical == 0 {
                    journal::write_superblock(out, run.len, &self.options.uuid);
                }
            }
            MetaObject::ExtentTree(ino) => {
                if let Some(Some(record)) = self.inodes.get(ino as usize) {
                    if let InodeBody::Extents(map) = record.body {
                        extent::write_tree_block(out, &map, logical);
                    }
                }
            }
        }
    }
}
