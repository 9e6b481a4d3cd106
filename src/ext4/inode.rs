//! ext4 inodes: 256-byte records with extra fields, time and device number encodings (reference: kernel ext4 disk layout, "Index Nodes", and fs/ext4/ext4.h).

use super::disk::{put_u16, put_u32};
use super::extent::{self, BlockMap};
use super::xattr;
use crate::tree::{Metadata, NodeId};

/// On-disk inode size (`s_inode_size`).
pub(super) const INODE_SIZE: usize = 256;
/// `i_extra_isize`: the extra fields up to and including `i_projid`.
pub(super) const EXTRA_ISIZE: u16 = 32;

pub(super) const S_IFIFO: u16 = 0o010000;
pub(super) const S_IFCHR: u16 = 0o020000;
pub(super) const S_IFDIR: u16 = 0o040000;
pub(super) const S_IFBLK: u16 = 0o060000;
pub(super) const S_IFREG: u16 = 0o100000;
pub(super) const S_IFLNK: u16 = 0o120000;

/// `i_flags`: directory is hash-indexed.
pub(super) const EXT4_INDEX_FL: u32 = 0x1000;
/// `i_flags`: `i_block` contains an extent tree root.
pub(super) const EXT4_EXTENTS_FL: u32 = 0x8_0000;

/// Smallest second count the 32-bit base plus 2 epoch bits encode.
pub(super) const MIN_TIME: i64 = -(1 << 31);
/// One past the largest second count encoded without setting both epoch
/// bits together with the base's sign bit, a pattern e2fsck 1.47 reports
/// as a pre-1970 time written by old kernels (year 2378).
pub(super) const MAX_TIME_EXCLUSIVE: i64 = 3 * (1 << 32) - (1 << 31);

/// Encodes seconds and nanoseconds as the base field and the `_extra`
/// field (bits 0-1: epoch added as multiples of 2^32, bits 2-31: nanoseconds).
pub(super) fn encode_time(seconds: i64, nsec: u32) -> Option<(u32, u32)> {
    if !(MIN_TIME..MAX_TIME_EXCLUSIVE).contains(&seconds) || nsec >= 1_000_000_000 {
        return None;
    }
    let base = (seconds & 0xffff_ffff) as u32;
    let epoch = (seconds - i64::from(base as i32)) >> 32;
    let epoch = u32::try_from(epoch).ok()?;
    Some((base, (nsec << 2) | (epoch & 3)))
}

/// Largest major and minor numbers of the kernel's 32-bit `new_encode_dev`.
pub(super) const MAX_MAJOR: u32 = 0xfff;
pub(super) const MAX_MINOR: u32 = 0xf_ffff;

/// Encodes a device number the way ext4 stores it in `i_block`: the old
/// 16-bit form in word 0 when both parts fit in 8 bits, otherwise the new
/// 32-bit form in word 1.
pub(super) fn encode_device(major: u32, minor: u32) -> Option<[u32; 2]> {
    if major > MAX_MAJOR || minor > MAX_MINOR {
        return None;
    }
    if major < 256 && minor < 256 {
        return Some([(major << 8) | minor, 0]);
    }
    let new = (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12);
    Some([0, new])
}

/// Source of an inode's metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum InodeSource {
    Node(NodeId),
    /// The lost+found directory this layout adds.
    LostFound,
    /// The journal inode of a writable layout.
    Journal,
}

/// Content of `i_block`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum InodeBody {
    /// An extent tree root mapping one contiguous run.
    Extents(BlockMap),
    /// A symlink target shorter than 60 bytes, stored in `i_block`.
    FastSymlink,
    Device([u32; 2]),
    /// FIFOs: nothing.
    Empty,
}

/// Everything about an inode except what is read from the tree at render time.
#[derive(Clone, Debug)]
pub(super) struct InodeRecord {
    pub source: InodeSource,
    /// File type and permission bits (`i_mode`).
    pub mode: u16,
    pub links: u16,
    pub size: u64,
    pub flags: u32,
    pub body: InodeBody,
    /// The external xattr block (32 bits, see [`BlockMap`]).
    pub xattr_block: Option<u32>,
}

impl InodeRecord {
    /// `i_blocks` in 512-byte units: data, extent tree and xattr blocks.
    pub fn sectors(&self) -> u64 {
        let mut blocks = match self.body {
            InodeBody::Extents(map) => map.len() + extent::tree_blocks(map.len()),
            _ => 0,
        };
        if self.xattr_block.is_some() {
            blocks += 1;
        }
        blocks * (super::BLOCK_SIZE / 512)
    }
}

/// Writes one 256-byte inode. `symlink_target` is used for fast symlinks.
pub(super) fn write_inode(
    out: &mut [u8],
    record: &InodeRecord,
    meta: &Metadata,
    symlink_target: &[u8],
    ibody_xattrs: &[xattr::Xattr<'_>],
) {
    let (time, time_extra) = encode_time(meta.mtime, meta.mtime_nsec).unwrap_or((0, 0));
    let sectors = record.sectors();

    put_u16(out, 0, record.mode);
    put_u16(out, 2, (meta.uid & 0xffff) as u16);
    put_u32(out, 4, (record.size & 0xffff_ffff) as u32);
    put_u32(out, 8, time); // i_atime
    put_u32(out, 12, time); // i_ctime
    put_u32(out, 16, time); // i_mtime
    put_u16(out, 24, (meta.gid & 0xffff) as u16);
    put_u16(out, 26, record.links);
    put_u32(out, 28, (sectors & 0xffff_ffff) as u32);
    put_u32(out, 32, record.flags);

    let i_block = &mut out[40..100];
    match record.body {
        InodeBody::Extents(map) => extent::write_root(i_block, &map),
        InodeBody::FastSymlink => i_block[..symlink_target.len()].copy_from_slice(symlink_target),
        InodeBody::Device(words) => {
            put_u32(i_block, 0, words[0]);
            put_u32(i_block, 4, words[1]);
        }
        InodeBody::Empty => {}
    }

    let (acl_lo, acl_hi) = super::disk::split_block(record.xattr_block.map_or(0, u64::from));
    put_u32(out, 104, acl_lo);
    put_u32(out, 108, (record.size >> 32) as u32);
    // osd2 (Linux): l_i_blocks_high, l_i_file_acl_high, l_i_uid_high, l_i_gid_high.
    put_u16(out, 116, ((sectors >> 32) & 0xffff) as u16);
    put_u16(out, 118, acl_hi);
    put_u16(out, 120, (meta.uid >> 16) as u16);
    put_u16(out, 122, (meta.gid >> 16) as u16);

    put_u16(out, 128, EXTRA_ISIZE);
    put_u32(out, 132, time_extra); // i_ctime_extra
    put_u32(out, 136, time_extra); // i_mtime_extra
    put_u32(out, 140, time_extra); // i_atime_extra
    put_u32(out, 144, time); // i_crtime
    put_u32(out, 148, time_extra); // i_crtime_extra

    xattr::write_ibody(out, ibody_xattrs);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes the way the kernel's `ext4_decode_extra_time` does.
    fn decode_time(base: u32, extra: u32) -> (i64, u32) {
        let seconds = i64::from(base as i32) + (i64::from(extra & 3) << 32);
        (seconds, extra >> 2)
    }

    #[test]
    fn time_round_trips() {
        let cases = [
            ("minus_one", -1i64, 0u32),
            ("epoch", 0, 0),
            ("y2038_edge", i64::from(i32::MAX), 999_999_999),
            ("after_2038", 2_147_483_648, 5),
            ("year_2100", 4_102_444_800, 123_456_789),
            ("min", MIN_TIME, 1),
            ("max", MAX_TIME_EXCLUSIVE - 1, 0),
        ];
        for (name, seconds, nsec) in cases {
            let (base, extra) =
                encode_time(seconds, nsec).unwrap_or_else(|| panic!("{name} not encodable"));
            assert_eq!(decode_time(base, extra), (seconds, nsec), "{name}");
        }
    }

    #[test]
    fn time_out_of_range_rejected() {
        assert_eq!(encode_time(MIN_TIME - 1, 0), None);
        assert_eq!(encode_time(MAX_TIME_EXCLUSIVE, 0), None);
        assert_eq!(encode_time(0, 1_000_000_000), None);
    }

    #[test]
    fn device_encodings() {
        let cases = [
            ("null", 1, 3, Some([0x0103, 0])),
            ("sda", 8, 0, Some([0x0800, 0])),
            (
                "nvme_partition",
                259,
                70000,
                Some([0, (70000 & 0xff) | (259 << 8) | ((70000 & !0xff) << 12)]),
            ),
            ("major_too_large", 4096, 0, None),
            ("minor_too_large", 1, 1 << 20, None),
        ];
        for (name, major, minor, expected) in cases {
            assert_eq!(encode_device(major, minor), expected, "{name}");
        }
    }
}
