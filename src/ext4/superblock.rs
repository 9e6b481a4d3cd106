//! ext4 superblock and feature flags (reference: kernel ext4 disk layout, "Super Block").

use super::disk::{put_u16, put_u32};
use super::htree::DX_HASH_HALF_MD4;
use super::inode::{EXTRA_ISIZE, INODE_SIZE};
use super::layout::Geometry;
use super::LayoutOptions;

/// Byte offset of the superblock on the device (inside block 0).
pub(super) const SUPERBLOCK_OFFSET: usize = 1024;
const EXT4_SUPER_MAGIC: u16 = 0xef53;
/// First inode number for ordinary files (`s_first_ino`).
pub(super) const FIRST_INO: u32 = 11;
pub(super) const ROOT_INO: u32 = 2;
pub(super) const BLOCKS_PER_GROUP: u64 = 32768;

/// `s_feature_compat` flags.
pub(super) mod compat {
    pub const HAS_JOURNAL: u32 = 0x0004;
    pub const EXT_ATTR: u32 = 0x0008;
    pub const DIR_INDEX: u32 = 0x0020;
    pub const SPARSE_SUPER2: u32 = 0x0200;
    pub const SUPPORTED: u32 = EXT_ATTR | DIR_INDEX | SPARSE_SUPER2;
}

/// `s_feature_incompat` flags.
pub(super) mod incompat {
    pub const FILETYPE: u32 = 0x0002;
    pub const EXTENTS: u32 = 0x0040;
    pub const FLEX_BG: u32 = 0x0200;
    pub const SUPPORTED: u32 = FILETYPE | EXTENTS | FLEX_BG;
}

/// `s_feature_ro_compat` flags.
pub(super) mod ro_compat {
    pub const SPARSE_SUPER: u32 = 0x0001;
    pub const LARGE_FILE: u32 = 0x0002;
    pub const HUGE_FILE: u32 = 0x0008;
    pub const DIR_NLINK: u32 = 0x0020;
    pub const EXTRA_ISIZE: u32 = 0x0040;
    pub const SUPPORTED: u32 = SPARSE_SUPER | LARGE_FILE | HUGE_FILE | DIR_NLINK | EXTRA_ISIZE;
}

/// `s_flags`: directory hashes treat name bytes as unsigned chars.
const EXT2_FLAGS_UNSIGNED_HASH: u32 = 0x0002;
/// `s_default_mount_opts`: user_xattr and acl, as mke2fs sets them.
const DEFAULT_MOUNT_OPTS: u32 = 0x0004 | 0x0008;

/// `s_jnl_backup_type`: `s_jnl_blocks` holds a copy of the journal inode's blocks.
const EXT3_JNL_BACKUP_BLOCKS: u8 = 1;

/// What the superblock stores of the journal inode: `i_block` and `i_size`.
pub(super) struct JournalBackup {
    pub i_block: [u8; 60],
    pub size: u64,
}

/// Writes the superblock into block 0 (at byte 1024).
pub(super) fn write_superblock(
    block: &mut [u8],
    geometry: &Geometry,
    options: &LayoutOptions,
    journal: Option<&JournalBackup>,
) {
    let sb = &mut block[SUPERBLOCK_OFFSET..SUPERBLOCK_OFFSET + 1024];
    let inodes_count = geometry.inodes_count();
    let free_inodes = inodes_count - u64::from(geometry.max_inode);
    let free_blocks = geometry.block_count - geometry.used_blocks;
    let low32 = |value: u64| (value & 0xffff_ffff) as u32;

    put_u32(sb, 0x00, low32(inodes_count));
    put_u32(sb, 0x04, low32(geometry.block_count));
    put_u32(sb, 0x08, 0); // s_r_blocks_count_lo
    put_u32(sb, 0x0c, low32(free_blocks));
    put_u32(sb, 0x10, low32(free_inodes));
    put_u32(sb, 0x14, 0); // s_first_data_block: 0 for 4 KiB blocks
    put_u32(sb, 0x18, 2); // s_log_block_size: 1024 << 2
    put_u32(sb, 0x1c, 2); // s_log_cluster_size
    put_u32(sb, 0x20, low32(BLOCKS_PER_GROUP));
    put_u32(sb, 0x24, low32(BLOCKS_PER_GROUP));
    put_u32(sb, 0x28, geometry.inodes_per_group);
    put_u16(sb, 0x36, 0xffff); // s_max_mnt_count = -1: no mount-count checks
    put_u16(sb, 0x38, EXT4_SUPER_MAGIC);
    put_u16(sb, 0x3a, 1); // s_state: cleanly unmounted
    put_u16(sb, 0x3c, 1); // s_errors: continue
    put_u32(sb, 0x4c, 1); // s_rev_level: dynamic inode sizes
    put_u32(sb, 0x54, FIRST_INO);
    put_u16(sb, 0x58, INODE_SIZE as u16);
    let compat_flags = match journal {
        Some(_) => compat::SUPPORTED | compat::HAS_JOURNAL,
        None => compat::SUPPORTED,
    };
    put_u32(sb, 0x5c, compat_flags);
    put_u32(sb, 0x60, incompat::SUPPORTED);
    put_u32(sb, 0x64, ro_compat::SUPPORTED);
    sb[0x68..0x78].copy_from_slice(&options.uuid);
    let name = options.volume_name.as_bytes();
    let name_len = name.len().min(16);
    sb[0x78..0x78 + name_len].copy_from_slice(&name[..name_len]);
    sb[0xec..0xfc].copy_from_slice(&options.hash_seed);
    if let Some(journal) = journal {
        put_u32(sb, 0xe0, super::journal::JOURNAL_INO); // s_journal_inum
        sb[0xfd] = EXT3_JNL_BACKUP_BLOCKS; // s_jnl_backup_type
                                           // s_jnl_blocks: i_block[0..15], then i_size_high, then i_size.
        sb[0x10c..0x10c + 60].copy_from_slice(&journal.i_block);
        put_u32(sb, 0x10c + 60, (journal.size >> 32) as u32);
        put_u32(sb, 0x10c + 64, (journal.size & 0xffff_ffff) as u32);
    }
    sb[0xfc] = DX_HASH_HALF_MD4; // s_def_hash_version
    put_u32(sb, 0x100, DEFAULT_MOUNT_OPTS);
    put_u16(sb, 0x15c, EXTRA_ISIZE); // s_min_extra_isize
    put_u16(sb, 0x15e, EXTRA_ISIZE); // s_want_extra_isize
    put_u32(sb, 0x160, EXT2_FLAGS_UNSIGNED_HASH);
    sb[0x174] = geometry.log_groups_per_flex();
    // s_backup_bgs (0x24c, 0x250) stay 0: with sparse_super2 only group 0
    // carries a superblock and group descriptors.
}
