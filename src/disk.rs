//! The image disk: a [`BlockDevice`] whose metadata blocks are rendered from
//! the ext4 layout and whose file blocks are read through the chunk store.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::try_join_all;
use tracing::warn;

use crate::access::AccessRecorder;
use crate::buffers::BufferPool;
use crate::device::BlockDevice;
use crate::ext4::{
    Layout, LayoutError, LayoutOptions, Segment, SegmentKind, WritableOptions, BLOCK_SIZE,
};
use crate::image::OpenedImage;
use crate::store::ChunkStore;
use crate::tree::{NodeKind, Tree};

/// A read-only disk holding the ext4 filesystem of one image; an
/// [`OverlayDisk`](crate::overlay::OverlayDisk) on top makes it writable.
pub struct ImageDisk {
    tree: Arc<Tree>,
    layout: Arc<Layout>,
    store: Arc<ChunkStore>,
    /// Buffers that reads are assembled in.
    buffers: Arc<BufferPool>,
    /// Receives the files of every read when access recording is on.
    recorder: Option<Arc<AccessRecorder>>,
}

impl ImageDisk {
    pub fn new(image: &OpenedImage) -> ImageDisk {
        ImageDisk {
            tree: image.tree.clone(),
            layout: image.layout.clone(),
            store: image.store.clone(),
            buffers: BufferPool::new(),
            recorder: None,
        }
    }

    /// A disk of `image` with another layout of the same tree, such as the
    /// writable layout from [`writable_layout`].
    pub fn with_layout(image: &OpenedImage, layout: Arc<Layout>) -> ImageDisk {
        ImageDisk {
            tree: image.tree.clone(),
            layout,
            store: image.store.clone(),
            buffers: BufferPool::new(),
            recorder: None,
        }
    }

    /// Reports the files of every later [`BlockDevice::read`] to `recorder`;
    /// [`BlockDevice::prefetch`] is not reported.
    pub fn with_recorder(mut self, recorder: Option<Arc<AccessRecorder>>) -> ImageDisk {
        self.recorder = recorder;
        self
    }

    pub fn layout(&self) -> &Arc<Layout> {
        &self.layout
    }

    pub fn store(&self) -> &Arc<ChunkStore> {
        &self.store
    }

    /// Reads the whole blocks `start_block..start_block + block_count` into one buffer.
    ///
    /// Each segment fills its own part of the buffer. Metadata is rendered in place. File
    /// data that the page cache contains is read straight into the buffer, with one
    /// system call for files that follow each other in a layer
    /// ([`ChunkStore::read_cached_into`]). The other file segments are read through the
    /// store concurrently and copied in.
    async fn read_blocks(&self, start_block: u64, block_count: u64) -> io::Result<Bytes> {
        let segments = self.layout.segments(start_block, block_count);
        if let Some(recorder) = &self.recorder {
            recorder.record_read(&segments);
        }
        let total = usize::try_from(block_count * BLOCK_SIZE).map_err(|_| {
            io::Error::other(format!(
                "a read of {block_count} blocks does not fit in memory"
            ))
        })?;
        // Every byte of the buffer is written below: pooled buffers hold old data.
        let mut out = self.buffers.take(total);

        let mut file_reads = Vec::new();
        let mut rest: &mut [u8] = &mut out;
        for segment in &segments {
            let len = ((segment.block_count * BLOCK_SIZE) as usize).min(rest.len());
            let (part, tail) = std::mem::take(&mut rest).split_at_mut(len);
            rest = tail;
            if let Some(file_read) = self.fill_segment(segment, part)? {
                file_reads.push(file_read);
            }
        }

        let mut waiting = Vec::new();
        let mut file_reads = file_reads.into_iter().peekable();
        while let Some(first) = file_reads.next() {
            let (layer, data_offset) = (first.layer, first.data_offset);
            let mut end = data_offset + first.out.len() as u64;
            let mut run = vec![first];
            while let Some(next) =
                file_reads.next_if(|next| next.layer == layer && next.data_offset == end)
            {
                end += next.out.len() as u64;
                run.push(next);
            }
            let mut parts: Vec<&mut [u8]> = run.iter_mut().map(|read| &mut *read.out).collect();
            if !self.store.read_cached_into(layer, data_offset, &mut parts) {
                waiting.extend(run.into_iter().map(|read| self.read_file_part(read)));
            }
        }
        try_join_all(waiting).await?;
        Ok(self.buffers.freeze(out))
    }

    /// Fills `part`, the buffer of one segment, unless the segment is file data. For
    /// file data it returns the file read that fills `part`.
    fn fill_segment<'a>(
        &self,
        segment: &Segment,
        part: &'a mut [u8],
    ) -> io::Result<Option<FileRead<'a>>> {
        match segment.kind {
            SegmentKind::Zero => {
                part.fill(0);
                Ok(None)
            }
            SegmentKind::Metadata => {
                for (i, block) in part.chunks_exact_mut(BLOCK_SIZE as usize).enumerate() {
                    self.layout
                        .render_metadata(segment.start_block + i as u64, block);
                }
                Ok(None)
            }
            SegmentKind::File { node, file_offset } => {
                let data = match &self.tree.node(node).kind {
                    NodeKind::Reg { data } => *data,
                    other => {
                        return Err(io::Error::other(format!(
                            "layout error: block {} maps to node {node}, which is not a regular file ({other:?})",
                            segment.start_block
                        )))
                    }
                };
                let available = data.size.saturating_sub(file_offset).min(part.len() as u64);
                let (out, tail) = part.split_at_mut(available as usize);
                // The tail of the file's last block reads as zeros.
                tail.fill(0);
                if out.is_empty() {
                    return Ok(None);
                }
                Ok(Some(FileRead {
                    layer: data.layer,
                    data_offset: data.data_offset + file_offset,
                    out,
                }))
            }
        }
    }

    /// Reads a file segment through the store, fetching what is missing, into its part
    /// of the buffer.
    async fn read_file_part(&self, read: FileRead<'_>) -> io::Result<()> {
        let FileRead {
            layer,
            data_offset,
            out,
        } = read;
        let len = out.len() as u64;
        let bytes = self
            .store
            .read(layer, data_offset, len)
            .await
            .map_err(|error| {
                warn!(
                    layer,
                    data_offset,
                    len,
                    error = %error,
                    "read failed: returning EIO for this range"
                );
                io::Error::other(error.to_string())
            })?;
        if bytes.len() != out.len() {
            return Err(io::Error::other(format!(
                "the store returned {} bytes for a read of {len} bytes at {data_offset:#x} of layer {layer}",
                bytes.len()
            )));
        }
        out.copy_from_slice(&bytes);
        Ok(())
    }

    async fn prefetch_blocks(&self, start_block: u64, block_count: u64) -> io::Result<()> {
        for segment in self.layout.segments(start_block, block_count) {
            let SegmentKind::File { node, file_offset } = segment.kind else {
                continue;
            };
            let NodeKind::Reg { data } = &self.tree.node(node).kind else {
                continue;
            };
            let len = data
                .size
                .saturating_sub(file_offset)
                .min(segment.block_count * BLOCK_SIZE);
            if len > 0 {
                self.store
                    .prefetch(data.layer, data.data_offset + file_offset, len)
                    .await
                    .map_err(|error| io::Error::other(error.to_string()))?;
            }
        }
        Ok(())
    }
}

/// The read of a file segment: `out.len()` bytes of layer `layer`'s data space at
/// `data_offset`.
struct FileRead<'a> {
    layer: u32,
    data_offset: u64,
    out: &'a mut [u8],
}

/// Bytes of added free space per spare inode, the mke2fs default inode ratio.
const BYTES_PER_SPARE_INODE: u64 = 16384;
/// Spare inodes a writable layout gets at least, so small `--size` values still allow new files.
const MIN_SPARE_INODES: u64 = 4096;
/// Spare inodes a writable layout gets at most; each costs 256 bytes of inode
/// table that e2fsck scans.
const MAX_SPARE_INODES: u64 = 1 << 22;

/// Journal blocks for a filesystem of `blocks` blocks: 16 MiB below 1 GiB,
/// 32 MiB below 16 GiB, 64 MiB above, close to what mke2fs 1.47 picks.
fn journal_blocks_for(blocks: u64) -> u64 {
    match blocks {
        0..262_144 => 4096,
        262_144..4_194_304 => 8192,
        _ => 16_384,
    }
}

/// Plans the writable layout of `image`: the read-only layout's tree and
/// identity, plus `extra_bytes` of free space (rounded up to whole blocks),
/// spare inodes and a jbd2 journal.
pub fn writable_layout(image: &OpenedImage, extra_bytes: u64) -> Result<Layout, LayoutError> {
    let extra_free_blocks = extra_bytes.div_ceil(BLOCK_SIZE);
    let spare_inodes =
        (extra_bytes / BYTES_PER_SPARE_INODE).clamp(MIN_SPARE_INODES, MAX_SPARE_INODES);
    let options = LayoutOptions {
        extra_free_blocks,
        ..image.layout.options().clone()
    };
    let writable = WritableOptions {
        spare_inodes: u32::try_from(spare_inodes).unwrap_or(u32::MAX),
        journal_blocks: journal_blocks_for(
            image.layout.block_count().saturating_add(extra_free_blocks),
        ),
    };
    Layout::new_writable(image.tree.clone(), options, writable)
}

/// Converts a byte range into the whole blocks that cover it.
fn covering_blocks(offset: u64, len: u32) -> (u64, u64) {
    let start_block = offset / BLOCK_SIZE;
    let end = offset + u64::from(len);
    let end_block = end.div_ceil(BLOCK_SIZE);
    (start_block, end_block - start_block)
}

impl BlockDevice for ImageDisk {
    fn size(&self) -> u64 {
        self.layout.size()
    }

    async fn read(&self, offset: u64, len: u32) -> io::Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let end = offset.checked_add(u64::from(len));
        if end.is_none_or(|end| end > self.size()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("read of {len} bytes at {offset:#x} is past the end of the disk"),
            ));
        }
        let (start_block, block_count) = covering_blocks(offset, len);
        let blocks = self.read_blocks(start_block, block_count).await?;
        let skip = (offset - start_block * BLOCK_SIZE) as usize;
        Ok(blocks.slice(skip..skip + len as usize))
    }

    async fn prefetch(&self, offset: u64, len: u32) -> io::Result<()> {
        if len == 0 || offset >= self.size() {
            return Ok(());
        }
        let len = u64::from(len).min(self.size() - offset) as u32;
        let (start_block, block_count) = covering_blocks(offset, len);
        self.prefetch_blocks(start_block, block_count).await
    }
}

#[cfg(test)]
mod tests {
    use super::covering_blocks;

    #[test]
    fn covering_blocks_rounds_outward() {
        let cases = [
            (0, 1, (0, 1)),
            (0, 4096, (0, 1)),
            (4095, 2, (0, 2)),
            (4096, 4096, (1, 1)),
            (8191, 8194, (1, 4)),
        ];
        for (offset, len, expected) in cases {
            assert_eq!(
                covering_blocks(offset, len),
                expected,
                "offset {offset} len {len}"
            );
        }
    }
}
