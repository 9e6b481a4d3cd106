//! The persistent chunk index of a layer's cache file, `layers/sha256-<hex>.index`: which
//! chunks a previous run wrote, each with the crc32 (IEEE, `crc32fast`) of its bytes and
//! of each of its 4 KiB blocks, and when the layer was last used.
//!
//! Layout, all integers little-endian:
//!
//! ```text
//! 0   8  magic "ESGZIDX2" (version 1, "ESGZIDX1", had no block checksums)
//! 8   8  chunk count
//! 16  8  data size of the layer
//! 24  8  fingerprint of the chunk table (first 8 bytes of a sha256 of every chunk's
//!        data offset and size), so a table computed differently is never trusted
//! 32  8  last use, seconds since the Unix epoch
//! 40  8  flags: bit 0 means the data file is complete (a whole, non-lazy layer)
//! 48  8  block count: the sum over all chunks of ceil(chunk size / 4096)
//! 56  8  reserved, zero
//! 64     one 8-byte record per chunk: crc32 (4), present flag (1), reserved (3)
//! 64 + 8 * chunk count
//!        one crc32 (4) per block, chunk by chunk, each chunk's blocks counted from its
//!        start (see `blocks`)
//! ```
//!
//! A record is written only after the chunk's bytes and its block checksums were written.
//! Neither file is synced, so after a crash a record may describe bytes that never reached
//! the disk: readers therefore check every persisted chunk against its crc32 and its block
//! checksums before serving it, and refetch it on a mismatch.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::layer::LayerIndex;

use super::error::StoreError;

pub(crate) const MAGIC: &[u8; 8] = b"ESGZIDX2";
/// Magic of the first index format, which had no block checksums.
const MAGIC_V1: &[u8; 8] = b"ESGZIDX1";
pub(crate) const HEADER_LEN: u64 = 64;
pub(crate) const RECORD_LEN: u64 = 8;
/// Bytes per block checksum.
pub(crate) const BLOCK_SUM_LEN: u64 = 4;
const LAST_USE_OFFSET: u64 = 32;
const FLAGS_OFFSET: u64 = 40;
pub(crate) const FLAG_COMPLETE: u64 = 1;
const FILE_MODE: u32 = 0o600;

/// The header fields of an index file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) chunk_count: u64,
    pub(crate) data_size: u64,
    pub(crate) fingerprint: u64,
    pub(crate) last_use: u64,
    pub(crate) flags: u64,
    pub(crate) block_count: u64,
}

impl Header {
    pub(crate) fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut bytes = [0u8; HEADER_LEN as usize];
        bytes[0..8].copy_from_slice(MAGIC);
        bytes[8..16].copy_from_slice(&self.chunk_count.to_le_bytes());
        bytes[16..24].copy_from_slice(&self.data_size.to_le_bytes());
        bytes[24..32].copy_from_slice(&self.fingerprint.to_le_bytes());
        bytes[32..40].copy_from_slice(&self.last_use.to_le_bytes());
        bytes[40..48].copy_from_slice(&self.flags.to_le_bytes());
        bytes[48..56].copy_from_slice(&self.block_count.to_le_bytes());
        bytes
    }

    /// Decodes a header; `None` when the magic is wrong or the bytes are too short.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Header> {
        let field = |at: usize| -> Option<u64> {
            let raw: [u8; 8] = bytes.get(at..at + 8)?.try_into().ok()?;
            Some(u64::from_le_bytes(raw))
        };
        if bytes.get(0..8)? != MAGIC {
            return None;
        }
        Some(Header {
            chunk_count: field(8)?,
            data_size: field(16)?,
            fingerprint: field(24)?,
            last_use: field(32)?,
            flags: field(40)?,
            block_count: field(48)?,
        })
    }

    /// Length of an index file with this header: header, chunk records, block checksums.
    pub(crate) fn file_len(&self) -> Option<u64> {
        self.chunk_count
            .checked_mul(RECORD_LEN)?
            .checked_add(HEADER_LEN)?
            .checked_add(self.block_count.checked_mul(BLOCK_SUM_LEN)?)
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Path of a layer's index file, beside its data file.
pub(crate) fn index_path(data_path: &Path) -> PathBuf {
    data_path.with_extension("index")
}

/// Fingerprint of the chunk table: the index is only reused for the same table.
pub(crate) fn fingerprint(index: &LayerIndex) -> u64 {
    let mut hasher = Sha256::new();
    for chunk in &index.chunks {
        hasher.update(chunk.data_offset.to_le_bytes());
        hasher.update(chunk.size.to_le_bytes());
    }
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// What an earlier run left in the index: the crc32 of each chunk it marked present.
pub(crate) struct Loaded {
    /// Whether each chunk is marked present, by chunk index; empty when no
    /// chunk is present, so a new index costs no memory per chunk.
    pub(crate) present: Vec<bool>,
    /// The crc32 of each chunk, by chunk index (meaningful for present chunks);
    /// empty when `present` is. The block checksums stay in the file until
    /// [`IndexFile::load_block_sums`] reads them.
    pub(crate) crcs: Vec<u32>,
}

impl Loaded {
    /// Nothing present: the state of a new or reset index file.
    pub(crate) fn empty() -> Loaded {
        Loaded {
            present: Vec::new(),
            crcs: Vec::new(),
        }
    }

    /// Returns the crc32 of chunk `chunk` when it is marked present.
    pub(crate) fn record(&self, chunk: usize) -> Option<u32> {
        match self.present.get(chunk) {
            Some(true) => self.crcs.get(chunk).copied(),
            _ => None,
        }
    }
}

/// An open index file, locked shared while the store uses the layer so that pruning
/// (which takes an exclusive lock) skips it.
pub(crate) struct IndexFile {
    file: File,
    path: PathBuf,
    /// Offset of the block checksums: after the header and the chunk records.
    block_sums_offset: u64,
}

/// Bytes read per step by [`read_in_pieces`].
const READ_PIECE: u64 = 1 << 20;

/// Reads `len` bytes at `offset` in pieces of about [`READ_PIECE`] bytes, each a
/// whole number of `unit`-byte items, and hands each piece to `take`.
fn read_in_pieces(
    file: &std::fs::File,
    offset: u64,
    len: u64,
    unit: u64,
    mut take: impl FnMut(&[u8]),
) -> io::Result<()> {
    let step = (READ_PIECE / unit).max(1) * unit;
    let mut buffer = vec![0u8; usize::try_from(step.min(len)).unwrap_or(0)];
    let mut done = 0;
    while done < len {
        let piece = (len - done).min(step) as usize;
        file.read_exact_at(&mut buffer[..piece], offset + done)?;
        take(&buffer[..piece]);
        done += piece as u64;
    }
    Ok(())
}

impl IndexFile {
    /// Opens or creates the index of a layer and returns what a previous run recorded.
    ///
    /// An index with a different chunk count, data size, block count or chunk table
    /// fingerprint, or of the first format, is reset to empty, because its records
    /// describe other chunks or lack block checksums.
    pub(crate) fn open(
        path: &Path,
        index: &LayerIndex,
        block_count: u64,
    ) -> Result<(IndexFile, Loaded), StoreError> {
        let open_error = |source| StoreError::OpenIndexFile {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .open(path)
            .map_err(open_error)?;
        lock(&file, libc::LOCK_SH).map_err(open_error)?;

        let chunk_count = index.chunks.len() as u64;
        let expected = Header {
            chunk_count,
            data_size: index.data_size,
            fingerprint: fingerprint(index),
            last_use: now_seconds(),
            flags: 0,
            block_count,
        };
        let records_len = expected
            .file_len()
            .ok_or_else(|| open_error(io::Error::other("the chunk count is too large")))?;

        let mut header_bytes = [0u8; HEADER_LEN as usize];
        let previous = match file.read_exact_at(&mut header_bytes, 0) {
            Ok(()) => Header::decode(&header_bytes),
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => None,
            Err(error) => return Err(open_error(error)),
        };
        let first_format = header_bytes.starts_with(MAGIC_V1);
        let file_len = file.metadata().map_err(open_error)?.len();
        let reusable = previous.is_some_and(|header| {
            header.chunk_count == expected.chunk_count
                && header.data_size == expected.data_size
                && header.fingerprint == expected.fingerprint
                && header.block_count == expected.block_count
                && file_len == records_len
        });

        let index_file = IndexFile {
            file,
            path: path.to_path_buf(),
            block_sums_offset: HEADER_LEN + chunk_count * RECORD_LEN,
        };
        if !reusable {
            if first_format {
                tracing::info!(index = %path.display(), "cache index has the first format, without block checksums; starting the layer's cache empty");
            } else if previous.is_some() {
                tracing::info!(index = %path.display(), "cache index does not match the layer's chunk table, starting empty");
            }
            index_file.reset(&expected, records_len)?;
            return Ok((index_file, Loaded::empty()));
        }

        let loaded = index_file.load_records(index.chunks.len())?;
        index_file.touch()?;
        Ok((index_file, loaded))
    }

    fn reset(&self, header: &Header, records_len: u64) -> Result<(), StoreError> {
        let write_error = |source| StoreError::WriteIndexFile {
            path: self.path.clone(),
            source,
        };
        // Truncating to the header first zeroes every old record.
        self.file.set_len(0).map_err(write_error)?;
        self.file.set_len(records_len).map_err(write_error)?;
        self.file
            .write_all_at(&header.encode(), 0)
            .map_err(write_error)
    }

    fn load_records(&self, chunks: usize) -> Result<Loaded, StoreError> {
        let read_error = |source| StoreError::OpenIndexFile {
            path: self.path.clone(),
            source,
        };
        // Read in pieces, so a table of a million chunks needs no second copy.
        let mut present = Vec::with_capacity(chunks);
        let mut crcs = Vec::with_capacity(chunks);
        read_in_pieces(
            &self.file,
            HEADER_LEN,
            chunks as u64 * RECORD_LEN,
            RECORD_LEN,
            |piece| {
                for record in piece.chunks_exact(RECORD_LEN as usize) {
                    crcs.push(u32::from_le_bytes([
                        record[0], record[1], record[2], record[3],
                    ]));
                    present.push(record[4] == 1);
                }
            },
        )
        .map_err(read_error)?;

        Ok(Loaded { present, crcs })
    }

    /// Reads the block checksums of all `block_count` blocks, in block order, and
    /// hands each to `set` with its block number. Only the sums of chunks marked
    /// present are meaningful.
    pub(crate) fn load_block_sums(
        &self,
        block_count: u64,
        mut set: impl FnMut(usize, u32),
    ) -> Result<(), StoreError> {
        let read_error = |source| StoreError::OpenIndexFile {
            path: self.path.clone(),
            source,
        };
        let sums_len = block_count
            .checked_mul(BLOCK_SUM_LEN)
            .ok_or_else(|| read_error(io::Error::other("the block count is too large")))?;
        let mut block = 0;
        read_in_pieces(
            &self.file,
            self.block_sums_offset,
            sums_len,
            BLOCK_SUM_LEN,
            |piece| {
                for sum in piece.chunks_exact(BLOCK_SUM_LEN as usize) {
                    set(block, u32::from_le_bytes([sum[0], sum[1], sum[2], sum[3]]));
                    block += 1;
                }
            },
        )
        .map_err(read_error)
    }

    /// Records that chunk `chunk`, whose blocks start at block `first_block`, is in the
    /// data file with checksum `crc` and block checksums `block_sums`. The block
    /// checksums are written before the record that makes them count.
    pub(crate) fn mark_present(
        &self,
        chunk: usize,
        crc: u32,
        first_block: u64,
        block_sums: &[u32],
    ) -> io::Result<()> {
        let sums: Vec<u8> = block_sums
            .iter()
            .flat_map(|sum| sum.to_le_bytes())
            .collect();
        self.file
            .write_all_at(&sums, self.block_sums_offset + first_block * BLOCK_SUM_LEN)?;

        let mut record = [0u8; RECORD_LEN as usize];
        record[0..4].copy_from_slice(&crc.to_le_bytes());
        record[4] = 1;
        self.file
            .write_all_at(&record, HEADER_LEN + chunk as u64 * RECORD_LEN)
    }

    /// Clears a chunk's record after its bytes failed their checksum.
    pub(crate) fn mark_missing(&self, chunk: usize) -> io::Result<()> {
        self.file.write_all_at(
            &[0u8; RECORD_LEN as usize],
            HEADER_LEN + chunk as u64 * RECORD_LEN,
        )
    }

    /// Sets or clears the complete flag.
    pub(crate) fn set_complete(&self, complete: bool) -> io::Result<()> {
        let flags = if complete { FLAG_COMPLETE } else { 0 };
        self.file.write_all_at(&flags.to_le_bytes(), FLAGS_OFFSET)
    }

    /// Stores the current time as the layer's last use.
    pub(crate) fn touch(&self) -> Result<(), StoreError> {
        self.file
            .write_all_at(&now_seconds().to_le_bytes(), LAST_USE_OFFSET)
            .map_err(|source| StoreError::WriteIndexFile {
                path: self.path.clone(),
                source,
            })
    }
}

/// `flock(2)` on `file` with `operation` (`LOCK_SH`, `LOCK_EX`, optionally `| LOCK_NB`).
pub(crate) fn lock(file: &File, operation: libc::c_int) -> io::Result<()> {
    // SAFETY: the descriptor belongs to `file`, which is open for the whole call, and
    // flock takes no pointers.
    let result = unsafe { libc::flock(file.as_raw_fd(), operation) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::layer::ChunkRecord;

    /// A layer of whole-layer chunks with the given sizes, back to back.
    pub(crate) fn layer(sizes: &[u64]) -> LayerIndex {
        let mut chunks = Vec::new();
        let mut offset = 0;
        for &size in sizes {
            chunks.push(ChunkRecord::local(offset, size, None, "f".into()));
            offset += size;
        }
        LayerIndex {
            digest: "sha256:test".into(),
            chunks,
            data_size: offset,
            ..LayerIndex::default()
        }
    }

    #[test]
    fn header_round_trip() {
        let header = Header {
            chunk_count: 3,
            data_size: 99,
            fingerprint: 0xdead_beef,
            last_use: 1_700_000_000,
            flags: FLAG_COMPLETE,
            block_count: 5,
        };
        assert_eq!(Header::decode(&header.encode()), Some(header));
        assert_eq!(Header::decode(b"ESGZIDX1short"), None);
        assert_eq!(Header::decode(&[0u8; 64]), None);
    }

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.index");
        let index = layer(&[10, 20, 30]);

        // One block per chunk.
        let (file, loaded) = IndexFile::open(&path, &index, 3).expect("create");
        assert!(loaded.present.iter().all(|present| !present));
        file.mark_present(1, 0x1234_5678, 1, &[0xabcd])
            .expect("mark");
        file.mark_present(2, 7, 2, &[9]).expect("mark");
        file.mark_missing(2).expect("clear");
        file.set_complete(true).expect("flag");
        drop(file);

        let header = Header::decode(&std::fs::read(&path).expect("read index")).expect("header");
        assert_eq!(header.flags, FLAG_COMPLETE);
        let (file, loaded) = IndexFile::open(&path, &index, 3).expect("reopen");
        assert_eq!(
            (0..3).map(|chunk| loaded.record(chunk)).collect::<Vec<_>>(),
            vec![None, Some(0x1234_5678), None]
        );
        let mut sums = vec![u32::MAX; 3];
        file.load_block_sums(3, |block, sum| sums[block] = sum)
            .expect("block sums");
        assert_eq!(sums, vec![0, 0xabcd, 9]);
    }

    #[test]
    fn other_table_resets_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.index");
        let (file, _) = IndexFile::open(&path, &layer(&[10, 20]), 2).expect("create");
        file.mark_present(0, 1, 0, &[1]).expect("mark");
        drop(file);

        let cases = [
            ("same count, other sizes", layer(&[15, 15])),
            ("more chunks", layer(&[10, 20, 1])),
        ];
        for (name, index) in cases {
            let blocks = index.chunks.len() as u64;
            let (_, loaded) = IndexFile::open(&path, &index, blocks).expect("reopen");
            assert!(loaded.present.iter().all(|present| !present), "case {name}");
        }
    }

    #[test]
    fn first_format_index_starts_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.index");
        let index = layer(&[10, 20]);
        let (file, _) = IndexFile::open(&path, &index, 2).expect("create");
        file.mark_present(0, 1, 0, &[1]).expect("mark");
        drop(file);

        // The same index with the first format's magic and no block checksums.
        let mut bytes = std::fs::read(&path).expect("read index");
        bytes[0..8].copy_from_slice(MAGIC_V1);
        bytes.truncate((HEADER_LEN + 2 * RECORD_LEN) as usize);
        bytes[48..56].fill(0);
        std::fs::write(&path, &bytes).expect("write first-format index");

        let (_, loaded) = IndexFile::open(&path, &index, 2).expect("reopen");
        assert!(loaded.present.iter().all(|present| !present));
        let header = Header::decode(&std::fs::read(&path).expect("read")).expect("header");
        assert_eq!(
            header.block_count, 2,
            "the index was rewritten in the new format"
        );
    }
}
