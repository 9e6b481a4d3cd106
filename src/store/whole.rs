//! Block checksums of whole layers, the layers that were not eStargz and were unpacked
//! into their cache file at start-up ([`ChunkSource::Local`](crate::layer::ChunkSource::Local) chunks). Their chunks get the
//! same crc32 per 4 KiB block as fetched chunks, so a byte changed in the file is never
//! served.
//!
//! A whole layer cannot be fetched again one chunk at a time, so a block that fails its
//! checksum makes the read wait while the whole blob is fetched again and the changed
//! bytes rewritten (see `repair`); the read fails with EIO only when that fails.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::layer::LayerIndex;

use super::blocks::{self, BlockSums, CHECK_BLOCK};
use super::error::StoreError;
use super::persist::{IndexFile, Loaded};

/// Bytes read at a time while the checksums of a chunk are computed (a multiple of the
/// check block).
const READ_SIZE: usize = 256 * CHECK_BLOCK as usize;

/// Fills `blocks` for every local chunk of a whole layer: from the layer's index file
/// when an earlier open recorded them, else computed from the cache file and recorded.
/// Returns the number of chunks whose checksums were computed.
///
/// The recorded checksums describe the same bytes: the data file is named by the blob's
/// digest, the index is only reused for the same chunk table, and the blob was checked
/// against its digest before it was unpacked.
///
/// NOTE: this reads the cache file on the caller's thread, and the store is opened from an
/// async task, so computing the checksums of a large whole layer blocks that worker. For a
/// 167 MB layer in the page cache, measured once, it was lost in the 0.2 s of the merge and
/// layout steps around it.
pub(crate) fn load_block_sums(
    file: &File,
    path: &Path,
    index: &LayerIndex,
    blocks: &BlockSums,
    index_file: &IndexFile,
    loaded: &Loaded,
) -> Result<usize, StoreError> {
    let mut computed = 0;
    let mut buffer = vec![0u8; READ_SIZE];
    for (position, chunk) in index.chunks.iter().enumerate() {
        if !chunk.is_local() {
            continue;
        }
        let first = blocks.first_block(position);
        // The sums of a recorded chunk were loaded into `blocks` with the index.
        if loaded.record(position).is_some() {
            continue;
        }

        let (crc, sums) = chunk_sums(
            file,
            path,
            index,
            chunk.data_offset,
            chunk.size,
            &mut buffer,
        )?;
        blocks.store(position, &sums);
        index_file
            .mark_present(position, crc, first, &sums)
            .map_err(|source| StoreError::WriteIndexFile {
                path: super::persist::index_path(path),
                source,
            })?;
        computed += 1;
    }
    Ok(computed)
}

/// Reads one chunk from the cache file and returns its crc32 and the crc32 of each of its
/// 4 KiB blocks.
fn chunk_sums(
    file: &File,
    path: &Path,
    index: &LayerIndex,
    data_offset: u64,
    size: u64,
    buffer: &mut [u8],
) -> Result<(u32, Vec<u32>), StoreError> {
    let mut whole = crc32fast::Hasher::new();
    let mut sums = Vec::with_capacity(usize::try_from(blocks::blocks_in(size)).unwrap_or(0));
    let mut done = 0u64;
    while done < size {
        let want = (size - done).min(buffer.len() as u64) as usize;
        let part = &mut buffer[..want];
        file.read_exact_at(part, data_offset + done)
            .map_err(|source| StoreError::ReadWholeLayer {
                layer: index.digest.clone(),
                path: path.to_path_buf(),
                offset: data_offset + done,
                source,
            })?;
        whole.update(part);
        sums.extend(blocks::compute(part));
        done += want as u64;
    }
    Ok((whole.finalize(), sums))
}
