//! The writable disk: a [`BlockDevice`] that reads overlay blocks first, then the wrapped device, and sends every change to the overlay.

use std::io;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::future::try_join_all;
use tokio::sync::Mutex;

use super::file::Overlay;
use super::format::BLOCK_SIZE;
use super::map::{BlockState, Run};
use crate::device::BlockDevice;

/// Locks for read-modify-write of partial blocks, picked by block number,
/// so two partial writes to one block do not undo each other.
const STRIPES: usize = 64;

/// A writable device: `base` below, the overlay on top.
pub struct OverlayDisk<D> {
    base: Arc<D>,
    overlay: Arc<Overlay>,
    stripes: Vec<Mutex<()>>,
}

impl<D: BlockDevice> OverlayDisk<D> {
    /// Puts `overlay` on top of `base`; their sizes must match.
    pub fn new(base: Arc<D>, overlay: Overlay) -> io::Result<OverlayDisk<D>> {
        if base.size() != overlay.device_size() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "overlay {} is for a {}-byte device, but the device has {} bytes",
                    overlay.path().display(),
                    overlay.device_size(),
                    base.size()
                ),
            ));
        }
        Ok(OverlayDisk {
            base,
            overlay: Arc::new(overlay),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        })
    }

    /// Returns the device under the overlay.
    pub fn base(&self) -> &Arc<D> {
        &self.base
    }

    pub fn overlay(&self) -> &Arc<Overlay> {
        &self.overlay
    }

    fn check_range(&self, operation: &str, offset: u64, len: u64) -> io::Result<()> {
        let end = offset.checked_add(len);
        if end.is_none_or(|end| end > self.size()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{operation} of {len} bytes at {offset:#x} is past the end of the {}-byte disk",
                    self.size()
                ),
            ));
        }
        Ok(())
    }

    /// Reads bytes `offset..offset + len` of one run of blocks.
    async fn read_run(&self, run: Run, offset: u64, len: u64) -> io::Result<Bytes> {
        let start = (run.start * BLOCK_SIZE).max(offset);
        let end = (run.end * BLOCK_SIZE).min(offset + len);
        let Ok(run_len) = usize::try_from(end - start) else {
            return Err(io::Error::other("read run does not fit in memory"));
        };
        match run.state {
            None => {
                let run_len = u32::try_from(run_len).map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidInput, "read longer than 4 GiB")
                })?;
                self.base.read(start, run_len).await
            }
            Some(BlockState::Zero) => Ok(Bytes::from(vec![0u8; run_len])),
            Some(BlockState::Data) => {
                let overlay = self.overlay.clone();
                let first_block = start / BLOCK_SIZE;
                let end_block = end.div_ceil(BLOCK_SIZE);
                let within = (start - first_block * BLOCK_SIZE) as usize;
                let blocks = blocking(move || overlay.read_blocks(first_block, end_block)).await?;
                Ok(Bytes::from(blocks).slice(within..within + run_len))
            }
        }
    }

    /// Reads any byte range through the overlay.
    async fn read_range(&self, offset: u64, len: u64) -> io::Result<Bytes> {
        let first = offset / BLOCK_SIZE;
        let end = (offset + len).div_ceil(BLOCK_SIZE);
        let runs = self.overlay.runs(first, end);
        let parts =
            try_join_all(runs.into_iter().map(|run| self.read_run(run, offset, len))).await?;
        if parts.len() == 1 {
            return Ok(parts.into_iter().next().unwrap_or_default());
        }
        let mut out = BytesMut::with_capacity(usize::try_from(len).unwrap_or(0));
        for part in parts {
            out.extend_from_slice(&part);
        }
        Ok(out.freeze())
    }

    /// Writes `bytes` at `within` of block `block`, keeping the rest of the block.
    async fn write_partial(&self, block: u64, within: usize, bytes: &[u8]) -> io::Result<()> {
        let stripe = &self.stripes[(block % STRIPES as u64) as usize];
        let _guard = stripe.lock().await;
        let current = self.read_range(block * BLOCK_SIZE, BLOCK_SIZE).await?;
        let mut merged = current.to_vec();
        merged[within..within + bytes.len()].copy_from_slice(bytes);
        let overlay = self.overlay.clone();
        blocking(move || overlay.write_blocks(block, &merged)).await
    }

    /// Splits bytes `offset..offset + len` into runs of whole blocks and
    /// partial blocks, in order.
    fn pieces(offset: u64, len: u64) -> Vec<Piece> {
        let end = offset + len;
        let mut pieces = Vec::new();
        let mut block = offset / BLOCK_SIZE;
        let last = end.div_ceil(BLOCK_SIZE);
        while block < last {
            let block_start = block * BLOCK_SIZE;
            let low = offset.max(block_start);
            let high = end.min(block_start + BLOCK_SIZE);
            if low == block_start && high == block_start + BLOCK_SIZE {
                let mut run_end = block + 1;
                while run_end < last && (run_end + 1) * BLOCK_SIZE <= end {
                    run_end += 1;
                }
                pieces.push(Piece::Whole {
                    first: block,
                    end: run_end,
                    data_at: (block_start - offset) as usize,
                });
                block = run_end;
            } else {
                pieces.push(Piece::Partial {
                    block,
                    within: (low - block_start) as usize,
                    data_at: (low - offset) as usize,
                    len: (high - low) as usize,
                });
                block += 1;
            }
        }
        pieces
    }
}

/// One part of a byte range: whole blocks, or part of one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Piece {
    Whole {
        first: u64,
        end: u64,
        data_at: usize,
    },
    Partial {
        block: u64,
        within: usize,
        data_at: usize,
        len: usize,
    },
}

/// Runs blocking file I/O off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| io::Error::other(format!("overlay I/O task failed: {error}")))?
}

impl<D: BlockDevice> BlockDevice for OverlayDisk<D> {
    fn size(&self) -> u64 {
        self.base.size()
    }

    async fn read(&self, offset: u64, len: u32) -> io::Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        self.check_range("read", offset, u64::from(len))?;
        self.read_range(offset, u64::from(len)).await
    }

    async fn prefetch(&self, offset: u64, len: u32) -> io::Result<()> {
        self.base.prefetch(offset, len).await
    }

    fn is_writable(&self) -> bool {
        true
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> io::Result<()> {
        self.check_range("write", offset, data.len() as u64)?;
        for piece in Self::pieces(offset, data.len() as u64) {
            match piece {
                Piece::Whole {
                    first,
                    end,
                    data_at,
                } => {
                    let bytes =
                        data.slice(data_at..data_at + ((end - first) * BLOCK_SIZE) as usize);
                    let overlay = self.overlay.clone();
                    blocking(move || overlay.write_blocks(first, &bytes)).await?;
                }
                Piece::Partial {
                    block,
                    within,
                    data_at,
                    len,
                } => {
                    self.write_partial(block, within, &data[data_at..data_at + len])
                        .await?
                }
            }
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        let overlay = self.overlay.clone();
        blocking(move || overlay.flush()).await
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> io::Result<()> {
        self.check_range("trim", offset, u64::from(len))?;
        // Partial blocks are left as they are: a trim only promises that
        // whole discarded blocks may read as zeros.
        for piece in Self::pieces(offset, u64::from(len)) {
            if let Piece::Whole { first, end, .. } = piece {
                let overlay = self.overlay.clone();
                blocking(move || overlay.zero_blocks(first, end)).await?;
            }
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> io::Result<()> {
        self.check_range("write zeroes", offset, u64::from(len))?;
        for piece in Self::pieces(offset, u64::from(len)) {
            match piece {
                Piece::Whole { first, end, .. } => {
                    let overlay = self.overlay.clone();
                    blocking(move || overlay.zero_blocks(first, end)).await?;
                }
                Piece::Partial {
                    block, within, len, ..
                } => self.write_partial(block, within, &vec![0u8; len]).await?,
            }
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Disk = OverlayDisk<Never>;

    /// A device type that is never built; it only names `OverlayDisk::pieces`.
    struct Never;

    impl BlockDevice for Never {
        fn size(&self) -> u64 {
            0
        }

        async fn read(&self, _offset: u64, _len: u32) -> io::Result<Bytes> {
            Ok(Bytes::new())
        }
    }

    #[test]
    fn pieces_split_whole_and_partial_blocks() {
        let whole = |first, end, data_at| Piece::Whole {
            first,
            end,
            data_at,
        };
        let partial = |block, within, data_at, len| Piece::Partial {
            block,
            within,
            data_at,
            len,
        };
        let cases: &[(&str, u64, u64, Vec<Piece>)] = &[
            ("one_block", 4096, 4096, vec![whole(1, 2, 0)]),
            ("three_blocks", 0, 3 * 4096, vec![whole(0, 3, 0)]),
            ("inside_one_block", 100, 200, vec![partial(0, 100, 0, 200)]),
            (
                "head_whole_tail",
                4000,
                4096 + 4096 + 196,
                vec![
                    partial(0, 4000, 0, 96),
                    whole(1, 3, 96),
                    partial(3, 0, 8288, 100),
                ],
            ),
            (
                "sector_at_end_of_block",
                3584,
                512,
                vec![partial(0, 3584, 0, 512)],
            ),
            (
                "two_partials",
                2048,
                4096,
                vec![partial(0, 2048, 0, 2048), partial(1, 0, 2048, 2048)],
            ),
        ];
        for (name, offset, len, expected) in cases {
            assert_eq!(&Disk::pieces(*offset, *len), expected, "case {name}");
        }
    }
}
