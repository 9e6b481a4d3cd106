//! On-disk format of the overlay file (version 2): a 4 KiB header, two data slots per
//! device block and an append-only map log of checksummed records.
//!
//! ```text
//! 0                   header (HEADER_SIZE bytes, crc32c in its last 4 bytes)
//! HEADER_SIZE         slot 0 of every device block: block N at HEADER_SIZE + N * 4096
//! HEADER_SIZE+size    slot 1 of every device block: block N at HEADER_SIZE + size + N * 4096
//! HEADER_SIZE+2*size  map log: records up to the end of the file
//! ```
//!
//! Both slot areas are sparse. A data record names the slot that holds each of its
//! blocks and the crc32c of each block, so a changed byte in the data area is found on
//! read. Each write appends its record before it completes, so a completed write
//! survives the death of the server process. A flush appends a commit entry: the
//! records before the last commit are confirmed, the ones after it are not.
//!
//! A block that a confirmed record points at is never written in place: a new write
//! goes to the block's other slot. On open, an unconfirmed data record whose block
//! does not match its checksum (its data did not reach the disk before a power loss)
//! is dropped, and the block reads as its confirmed state, which still matches. A
//! confirmed block that does not match is damage and reads as EIO.
//!
//! Version 1 had one slot per block and no data checksums; this program does not
//! read it (see [`HeaderError::OldVersion`]).
//!
//! All integers are little-endian.

use super::map::BlockState;

/// Magic at the start of an overlay file.
pub const MAGIC: [u8; 8] = *b"ESGZOVL1";
/// Format version this code writes and reads.
pub const VERSION: u32 = 2;
/// Size of the header, also the offset of the data area.
pub const HEADER_SIZE: u64 = 4096;
/// Size of the overlay's blocks, the granularity of copy-on-write.
pub const BLOCK_SIZE: u64 = 4096;
/// Maximum length of the manifest digest in the header.
pub const MAX_MANIFEST_LEN: usize = 256;

/// Size of a map log record without its block checksums.
pub const RECORD_SIZE: usize = 32;
/// Bytes per block checksum after a data record's fixed part.
pub const BLOCK_SUM_SIZE: usize = 4;
/// Maximum number of blocks in one data record, so a record with its checksums stays
/// within 4 KiB + 32 bytes.
pub const MAX_DATA_RECORD_BLOCKS: u64 = 1024;
/// `OVLR`: starts every map log record.
const RECORD_MAGIC: u32 = 0x524c_564f;
const STATE_DATA: u8 = 1;
const STATE_ZERO: u8 = 2;
const STATE_COMMIT: u8 = 3;

/// The image an overlay belongs to, stored in its header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Manifest digest of the image (`sha256:...`).
    pub manifest_digest: String,
    /// Device size in bytes, a multiple of [`BLOCK_SIZE`].
    pub device_size: u64,
    /// Hash of the filesystem layout (geometry, features, options), so an
    /// overlay made for another layout of the same image is rejected.
    pub layout_digest: [u8; 32],
}

/// Why a header could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("the file does not start with the overlay magic {:?}", String::from_utf8_lossy(&MAGIC))]
    Magic,
    #[error("the header checksum is {found:#010x} but the header bytes give {computed:#010x}")]
    Checksum { found: u32, computed: u32 },
    #[error("the header has format version {found}; this program reads version {VERSION}")]
    Version { found: u32 },
    #[error("the overlay has format version {found}, which has no data checksums; this program reads only version {VERSION}")]
    OldVersion { found: u32 },
    #[error("the header has block size {found}; this program uses {BLOCK_SIZE}")]
    BlockSize { found: u32 },
    #[error("the header records device size {found}, which is not a multiple of {BLOCK_SIZE}")]
    DeviceSize { found: u64 },
    #[error(
        "the header records a manifest digest of {found} bytes; at most {MAX_MANIFEST_LEN} fit"
    )]
    ManifestLength { found: usize },
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut out = [0u8; 4];
    out.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(out)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut out = [0u8; 8];
    out.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(out)
}

/// Byte offset of the map log for a device of `device_size` bytes.
pub fn log_offset(device_size: u64) -> u64 {
    HEADER_SIZE + 2 * device_size
}

/// Byte offset of slot `slot` (0 or 1) of device block `block`.
pub fn slot_offset(device_size: u64, slot: u8, block: u64) -> u64 {
    HEADER_SIZE + u64::from(slot) * device_size + block * BLOCK_SIZE
}

/// Encodes the header:
/// magic (8), version (4), block size (4), device size (8), layout digest (32),
/// manifest digest length (2) and bytes (up to 256), zero padding, crc32c of
/// every preceding byte in the last 4 bytes.
pub fn encode_header(identity: &Identity) -> Result<Vec<u8>, HeaderError> {
    let manifest = identity.manifest_digest.as_bytes();
    if manifest.len() > MAX_MANIFEST_LEN {
        return Err(HeaderError::ManifestLength {
            found: manifest.len(),
        });
    }
    let mut out = vec![0u8; HEADER_SIZE as usize];
    out[0..8].copy_from_slice(&MAGIC);
    out[8..12].copy_from_slice(&VERSION.to_le_bytes());
    out[12..16].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
    out[16..24].copy_from_slice(&identity.device_size.to_le_bytes());
    out[24..56].copy_from_slice(&identity.layout_digest);
    out[56..58].copy_from_slice(&(manifest.len() as u16).to_le_bytes());
    out[58..58 + manifest.len()].copy_from_slice(manifest);
    let end = out.len() - 4;
    let crc = crc32c::crc32c(&out[..end]);
    out[end..].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Decodes and checks a header read from the start of an overlay file.
pub fn decode_header(bytes: &[u8]) -> Result<Identity, HeaderError> {
    if bytes.len() < HEADER_SIZE as usize || bytes[0..8] != MAGIC {
        return Err(HeaderError::Magic);
    }
    let bytes = &bytes[..HEADER_SIZE as usize];
    let end = bytes.len() - 4;
    let found = u32_at(bytes, end);
    let computed = crc32c::crc32c(&bytes[..end]);
    if found != computed {
        return Err(HeaderError::Checksum { found, computed });
    }
    let version = u32_at(bytes, 8);
    if version == 1 {
        return Err(HeaderError::OldVersion { found: version });
    }
    if version != VERSION {
        return Err(HeaderError::Version { found: version });
    }
    let block_size = u32_at(bytes, 12);
    if u64::from(block_size) != BLOCK_SIZE {
        return Err(HeaderError::BlockSize { found: block_size });
    }
    let device_size = u64_at(bytes, 16);
    if device_size % BLOCK_SIZE != 0 {
        return Err(HeaderError::DeviceSize { found: device_size });
    }
    let mut layout_digest = [0u8; 32];
    layout_digest.copy_from_slice(&bytes[24..56]);
    let manifest_len = usize::from(u16::from_le_bytes([bytes[56], bytes[57]]));
    if manifest_len > MAX_MANIFEST_LEN {
        return Err(HeaderError::ManifestLength {
            found: manifest_len,
        });
    }
    let manifest_digest = String::from_utf8_lossy(&bytes[58..58 + manifest_len]).into_owned();
    Ok(Identity {
        manifest_digest,
        device_size,
        layout_digest,
    })
}

/// One map log entry: blocks `start..start + count` now have `state`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub start: u64,
    pub count: u64,
    pub state: BlockState,
    /// The slot of every block of a data record (0 for a zero record).
    pub slot: u8,
    /// crc32c of each block of a data record, in block order; empty for a zero record.
    pub sums: Vec<u32>,
}

/// Encodes a record: magic (4), state (1), slot (1), zero (2), start block (8), block
/// count (8), zero (4), crc32c (4) of the preceding 28 bytes and the block checksums,
/// then for a data record one crc32c (4) per block.
pub fn encode_record(record: &Record) -> Vec<u8> {
    let mut out = vec![0u8; RECORD_SIZE];
    out[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    out[4] = match record.state {
        BlockState::Data => STATE_DATA,
        BlockState::Zero => STATE_ZERO,
    };
    out[5] = record.slot;
    out[8..16].copy_from_slice(&record.start.to_le_bytes());
    out[16..24].copy_from_slice(&record.count.to_le_bytes());
    for sum in &record.sums {
        out.extend_from_slice(&sum.to_le_bytes());
    }
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[..28]), &out[RECORD_SIZE..]);
    out[28..32].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Returns the number of checksum bytes that follow the fixed part `head` of a record,
/// or `None` when the fixed part cannot start a record (which ends the log).
pub fn record_sums_len(head: &[u8]) -> Option<usize> {
    let head = head.get(..RECORD_SIZE)?;
    if u32_at(head, 0) != RECORD_MAGIC {
        return None;
    }
    match head[4] {
        STATE_DATA => {
            let count = u64_at(head, 16);
            if count > MAX_DATA_RECORD_BLOCKS {
                return None;
            }
            usize::try_from(count)
                .ok()
                .map(|count| count * BLOCK_SUM_SIZE)
        }
        STATE_ZERO | STATE_COMMIT => Some(0),
        _ => None,
    }
}

/// One entry of the map log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Blocks changed state.
    Change(Record),
    /// Every entry before this one was covered by a completed flush.
    Commit,
}

/// Encodes a commit entry: magic (4), state 3 (1), zero (23), crc32c of the preceding
/// 28 bytes (4).
pub fn encode_commit() -> Vec<u8> {
    let mut out = vec![0u8; RECORD_SIZE];
    out[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    out[4] = STATE_COMMIT;
    let crc = crc32c::crc32c(&out[..28]);
    out[28..32].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes a log entry from its fixed part and its block checksums. Returns `None`
/// for anything but a whole, intact entry, because that marks the end of the log (a
/// write torn by a crash, or no entry yet).
pub fn decode_entry(head: &[u8], sums: &[u8]) -> Option<Entry> {
    let head = head.get(..RECORD_SIZE)?;
    if record_sums_len(head)? != sums.len() {
        return None;
    }
    let crc = crc32c::crc32c_append(crc32c::crc32c(&head[..28]), sums);
    if u32_at(head, 28) != crc {
        return None;
    }
    let (state, slot) = match head[4] {
        STATE_DATA if head[5] <= 1 => (BlockState::Data, head[5]),
        STATE_ZERO if head[5] == 0 => (BlockState::Zero, 0),
        STATE_COMMIT if head[5..28].iter().all(|&byte| byte == 0) => return Some(Entry::Commit),
        _ => return None,
    };
    Some(Entry::Change(Record {
        start: u64_at(head, 8),
        count: u64_at(head, 16),
        state,
        slot,
        sums: sums
            .chunks_exact(BLOCK_SUM_SIZE)
            .map(|sum| u32_at(sum, 0))
            .collect(),
    }))
}

/// Decodes a change record; `None` for a commit entry or anything that is not a
/// whole, intact record.
pub fn decode_record(head: &[u8], sums: &[u8]) -> Option<Record> {
    match decode_entry(head, sums)? {
        Entry::Change(record) => Some(record),
        Entry::Commit => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            manifest_digest: "sha256:0123".to_string(),
            device_size: 1 << 30,
            layout_digest: [7; 32],
        }
    }

    #[test]
    fn header_round_trips() {
        let bytes = encode_header(&identity()).expect("encodes");
        assert_eq!(bytes.len(), HEADER_SIZE as usize);
        assert_eq!(decode_header(&bytes), Ok(identity()));
    }

    #[test]
    fn header_damage_is_detected() {
        let good = encode_header(&identity()).expect("encodes");
        // (case, flipped byte, the damage is caught by the magic check)
        let cases = [
            ("magic", 0, true),
            ("device_size", 17, false),
            ("manifest", 60, false),
            ("checksum", 4093, false),
        ];
        for (name, at, magic) in cases {
            let mut bytes = good.clone();
            bytes[at] ^= 0x40;
            let error = decode_header(&bytes).expect_err(name);
            if magic {
                assert_eq!(error, HeaderError::Magic, "case {name}");
            } else {
                assert!(
                    matches!(error, HeaderError::Checksum { .. }),
                    "case {name}: {error}"
                );
            }
        }
        assert_eq!(decode_header(&good[..100]), Err(HeaderError::Magic));
    }

    #[test]
    fn header_rejects_long_manifest() {
        let mut long = identity();
        long.manifest_digest = "x".repeat(MAX_MANIFEST_LEN + 1);
        assert!(matches!(
            encode_header(&long),
            Err(HeaderError::ManifestLength { .. })
        ));
    }

    #[test]
    fn record_round_trips_and_rejects_damage() {
        let records = [
            Record {
                start: 0x1234_5678,
                count: 42,
                state: BlockState::Zero,
                slot: 0,
                sums: Vec::new(),
            },
            Record {
                start: 7,
                count: 3,
                state: BlockState::Data,
                slot: 1,
                sums: vec![1, 0xdead_beef, 3],
            },
        ];
        for record in records {
            let bytes = encode_record(&record);
            let (head, sums) = bytes.split_at(RECORD_SIZE);
            assert_eq!(record_sums_len(head), Some(sums.len()));
            assert_eq!(decode_record(head, sums), Some(record.clone()));
            for at in (0..bytes.len()).step_by(3) {
                let mut damaged = bytes.clone();
                damaged[at] ^= 1;
                let (head, sums) = damaged.split_at(RECORD_SIZE);
                assert_eq!(decode_record(head, sums), None, "flipped byte {at}");
            }
            assert_eq!(decode_record(&bytes[..31], &[]), None);
        }
        assert_eq!(record_sums_len(&[0u8; RECORD_SIZE]), None);
    }

    #[test]
    fn first_version_is_named() {
        let mut bytes = encode_header(&identity()).expect("encodes");
        bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
        let end = bytes.len() - 4;
        let crc = crc32c::crc32c(&bytes[..end]);
        bytes[end..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            decode_header(&bytes),
            Err(HeaderError::OldVersion { found: 1 })
        );
    }

    #[test]
    fn commit_round_trips_and_rejects_damage() {
        let bytes = encode_commit();
        assert_eq!(bytes.len(), RECORD_SIZE);
        assert_eq!(decode_entry(&bytes, &[]), Some(Entry::Commit));
        assert_eq!(decode_record(&bytes, &[]), None, "not a change record");
        for at in [0, 4, 9, 28] {
            let mut damaged = bytes.clone();
            damaged[at] ^= 1;
            assert_eq!(decode_entry(&damaged, &[]), None, "flipped byte {at}");
        }
    }
}
