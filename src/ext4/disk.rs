//! Little-endian field writers for ext4 on-disk structures (all ext4 fields are little-endian).

/// Writes `value` as a little-endian u16 at `offset`.
pub(super) fn put_u16(buf: &mut [u8], offset: usize, value: u16) {
    buf[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
}

/// Writes `value` as a little-endian u32 at `offset`.
pub(super) fn put_u32(buf: &mut [u8], offset: usize, value: u32) {
    buf[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
}

/// Splits a block number into the low 32 bits and the high 16 bits that
/// ext4 stores in separate fields.
///
/// Block numbers in this layout stay below 2^32 (the layout rejects larger
/// images), so the high part is zero in practice.
pub(super) fn split_block(block: u64) -> (u32, u16) {
    let low = (block & 0xffff_ffff) as u32;
    let high = ((block >> 32) & 0xffff) as u16;
    (low, high)
}

/// Rounds `value` up to a multiple of 4, the alignment of directory
/// entries and xattr entries.
pub(super) fn align4(value: usize) -> usize {
    (value + 3) & !3
}
