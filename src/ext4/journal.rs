//! Internal jbd2 journal of a writable layout: the journal superblock of an empty, clean journal (reference: kernel ext4 disk layout, "Journal (jbd2)", and include/linux/jbd2.h).
//!
//! The journal is inode 8 with one contiguous run of blocks. Its first block
//! holds the superblock; every other block is zero. `s_start` = 0 tells the
//! kernel and e2fsck that there is nothing to replay.

/// Inode number of the journal (`EXT4_JOURNAL_INO`).
pub(super) const JOURNAL_INO: u32 = 8;
/// Smallest journal jbd2 accepts (`JBD2_MIN_JOURNAL_BLOCKS`).
pub const MIN_JOURNAL_BLOCKS: u64 = 1024;
/// `JBD2_MAGIC_NUMBER`, the first word of every journal metadata block.
const JBD2_MAGIC_NUMBER: u32 = 0xc03b_3998;
/// `JBD2_SUPERBLOCK_V2`: block type of a version 2 journal superblock.
const JBD2_SUPERBLOCK_V2: u32 = 4;

fn put_be32(out: &mut [u8], at: usize, value: u32) {
    out[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

/// Writes the superblock of an empty journal of `blocks` 4 KiB blocks,
/// tagged with the filesystem UUID as mke2fs does for an internal journal.
/// All jbd2 fields are big-endian.
pub(super) fn write_superblock(out: &mut [u8], blocks: u64, uuid: &[u8; 16]) {
    put_be32(out, 0x00, JBD2_MAGIC_NUMBER); // h_magic
    put_be32(out, 0x04, JBD2_SUPERBLOCK_V2); // h_blocktype
    put_be32(out, 0x08, 0); // h_sequence
    put_be32(out, 0x0c, super::BLOCK_SIZE as u32); // s_blocksize
    put_be32(out, 0x10, u32::try_from(blocks).unwrap_or(u32::MAX)); // s_maxlen
    put_be32(out, 0x14, 1); // s_first: first log block after the superblock
    put_be32(out, 0x18, 1); // s_sequence: first expected commit ID
    put_be32(out, 0x1c, 0); // s_start: 0 means the journal is clean
                            // s_errno and the compat/incompat/ro_compat feature words stay 0.
    out[0x30..0x40].copy_from_slice(uuid); // s_uuid
    put_be32(out, 0x40, 1); // s_nr_users: one filesystem uses this journal
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_fields_are_big_endian() {
        let mut block = vec![0u8; 4096];
        write_superblock(&mut block, 4096, &[9; 16]);
        let word = |at: usize| {
            u32::from_be_bytes([block[at], block[at + 1], block[at + 2], block[at + 3]])
        };
        let cases = [
            ("h_magic", 0x00, JBD2_MAGIC_NUMBER),
            ("h_blocktype", 0x04, 4),
            ("s_blocksize", 0x0c, 4096),
            ("s_maxlen", 0x10, 4096),
            ("s_first", 0x14, 1),
            ("s_sequence", 0x18, 1),
            ("s_start", 0x1c, 0),
            ("s_nr_users", 0x40, 1),
        ];
        for (name, at, expected) in cases {
            assert_eq!(word(at), expected, "{name}");
        }
        assert_eq!(&block[0x30..0x40], &[9; 16]);
    }
}
