//! ext4 block group descriptors, 32-byte form without the 64bit feature (reference: kernel ext4 disk layout, "Block Group Descriptors").

use super::disk::put_u16;
use super::disk::put_u32;
use super::layout::Geometry;
use super::BLOCK_SIZE;

/// Size of a group descriptor (`s_desc_size` is 0, meaning 32).
pub(super) const DESC_SIZE: u64 = 32;
pub(super) const DESCS_PER_BLOCK: u64 = BLOCK_SIZE / DESC_SIZE;

/// Writes GDT block `index` (0-based) into `out`; `dirs_per_group` holds
/// `bg_used_dirs_count` for each group.
pub(super) fn write_gdt_block(
    out: &mut [u8],
    geometry: &Geometry,
    dirs_per_group: &[u32],
    index: u64,
) {
    let first = index * DESCS_PER_BLOCK;
    let end = (first + DESCS_PER_BLOCK).min(u64::from(geometry.group_count));
    for group in first..end {
        let Ok(group) = u32::try_from(group) else {
            return;
        };
        let Ok(offset) = usize::try_from((u64::from(group) - first) * DESC_SIZE) else {
            return;
        };
        let desc = &mut out[offset..offset + DESC_SIZE as usize];
        let low32 = |block: u64| (block & 0xffff_ffff) as u32;
        let low16 = |count: u64| u16::try_from(count).unwrap_or(u16::MAX);

        put_u32(desc, 0x00, low32(geometry.block_bitmap(group)));
        put_u32(desc, 0x04, low32(geometry.inode_bitmap(group)));
        put_u32(desc, 0x08, low32(geometry.inode_table(group)));
        put_u16(desc, 0x0c, low16(geometry.free_blocks_in_group(group)));
        let free_inodes =
            u64::from(geometry.inodes_per_group) - geometry.used_inodes_in_group(group);
        put_u16(desc, 0x0e, low16(free_inodes));
        let dirs = dirs_per_group.get(group as usize).copied().unwrap_or(0);
        put_u16(desc, 0x10, low16(u64::from(dirs)));
        // bg_flags, exclude bitmap, bitmap checksums, bg_itable_unused and
        // bg_checksum stay 0: they only apply with uninit_bg or metadata_csum.
    }
}
