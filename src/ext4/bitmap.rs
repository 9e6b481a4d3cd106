//! ext4 block and inode bitmaps (reference: kernel ext4 disk layout, "Block and inode Bitmaps").
//!
//! Allocation in this layout is a prefix: blocks `0..used_blocks` and
//! inodes `1..=max_inode` are in use, everything after is free. Bits past
//! the end of the filesystem (last group) and past `s_inodes_per_group` in
//! the inode bitmap block are set, as e2fsck expects.

use super::layout::Geometry;
use super::BLOCK_SIZE;

/// Bits in one bitmap block.
pub(super) const BITS_PER_BLOCK: u64 = BLOCK_SIZE * 8;

/// Sets bits `start..end` of `out`.
fn set_bits(out: &mut [u8], start: u64, end: u64) {
    let mut bit = start;
    while bit < end {
        let Ok(byte) = usize::try_from(bit / 8) else {
            return;
        };
        if bit % 8 == 0 && end - bit >= 8 {
            out[byte] = 0xff;
            bit += 8;
        } else {
            out[byte] |= 1 << (bit % 8);
            bit += 1;
        }
    }
}

/// Writes the block bitmap of `group`.
pub(super) fn write_block_bitmap(out: &mut [u8], geometry: &Geometry, group: u32) {
    let first = u64::from(group) * BITS_PER_BLOCK;
    let used = geometry
        .used_blocks
        .saturating_sub(first)
        .min(BITS_PER_BLOCK);
    let present = geometry
        .block_count
        .saturating_sub(first)
        .min(BITS_PER_BLOCK);
    set_bits(out, 0, used);
    set_bits(out, present, BITS_PER_BLOCK);
}

/// Writes the inode bitmap of `group`.
pub(super) fn write_inode_bitmap(out: &mut [u8], geometry: &Geometry, group: u32) {
    let per_group = u64::from(geometry.inodes_per_group);
    let used = geometry.used_inodes_in_group(group);
    set_bits(out, 0, used);
    set_bits(out, per_group, BITS_PER_BLOCK);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_bits_ranges() {
        let cases: &[(&str, u64, u64, &[u8])] = &[
            ("empty", 3, 3, &[0, 0, 0]),
            ("within_byte", 1, 3, &[0b0000_0110, 0, 0]),
            ("across_bytes", 6, 17, &[0b1100_0000, 0xff, 0b0000_0001]),
            ("full", 0, 24, &[0xff, 0xff, 0xff]),
        ];
        for (name, start, end, expected) in cases {
            let mut out = [0u8; 3];
            set_bits(&mut out, *start, *end);
            assert_eq!(&out[..], *expected, "{name}");
        }
    }
}
