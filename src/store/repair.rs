//! Repair of a whole layer's cache file while serving. When a read finds a block that fails
//! its checksum, the layer's blob is downloaded again through the source's own retries and
//! deadline, checked against its digest, and its tar is streamed once more. Every piece of
//! file data that differs from the cache file is written over it in place.
//!
//! All reads that find damage while a repair runs wait for that one repair. A failed repair
//! is not started again for [`REPAIR_BACKOFF`]: until then reads of damaged blocks fail with
//! its error at once.
//!
//! Writing in place is safe for concurrent readers: the bytes written are the layer's true
//! bytes, and every read from the cache file checks its blocks' crc32, so a reader that
//! sees a block half written gets a mismatch and waits for the repair, never a wrong byte.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::oneshot;

use crate::layer::LayerIndex;
use crate::tarlayer;

use super::error::ReadError;
use super::stats::Stats;
use super::whole_blob::{self, WholeDownloadError};
use super::{Inner, LayerState};

/// How long after a failed repair reads of damaged blocks fail at once instead of
/// starting another download of the layer.
pub(crate) const REPAIR_BACKOFF: Duration = Duration::from_secs(30);

type RepairFlight = Shared<BoxFuture<'static, Result<(), ReadError>>>;

/// The repair state of a whole layer's cache file.
pub(crate) struct WholeRepair {
    /// The cache file, opened for reading and writing.
    file: File,
    /// Directories tried in order for the temporary copy of the downloaded blob.
    download_dirs: Vec<PathBuf>,
    slot: Mutex<RepairSlot>,
}

#[derive(Default)]
struct RepairSlot {
    running: Option<RepairFlight>,
    /// Number of repairs that have finished, successfully or not.
    finished: u64,
    /// When the last repair failed, and its error; `None` after a successful one.
    failed: Option<(Instant, ReadError)>,
}

/// The result of a repair: the chunks and bytes that differed from the cache file.
#[derive(Default)]
struct RepairOutcome {
    /// Chunks with at least one byte rewritten, in data order.
    chunks: Vec<usize>,
    bytes_rewritten: u64,
}

impl WholeRepair {
    pub(crate) fn new(file: File, download_dirs: Vec<PathBuf>) -> WholeRepair {
        WholeRepair {
            file,
            download_dirs,
            slot: Mutex::new(RepairSlot::default()),
        }
    }

    /// Number of repairs finished so far. A read takes it before reading the cache file
    /// and hands it to [`Inner::repair_whole_layer`], so damage it saw before a repair
    /// that has finished since does not start another one.
    pub(crate) fn generation(&self) -> u64 {
        self.slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .finished
    }
}

impl Inner {
    /// Repairs the cache file of whole layer `layer` after a read found a changed block at
    /// `data_offset`: waits for the running repair, or returns at once when one finished
    /// after generation `seen` (the caller reads again), or starts one. Fails when the
    /// layer cannot be repaired or the repair failed.
    pub(crate) async fn repair_whole_layer(
        self: &Arc<Self>,
        layer: usize,
        seen: u64,
        data_offset: u64,
    ) -> Result<(), ReadError> {
        let state = &self.layers[layer];
        let Some(repair) = &state.repair else {
            return Err(ReadError::WholeLayerRepair {
                layer: state.index.digest.clone(),
                data_offset,
                chain: "the store has no blob source for the layer".into(),
                retry_after_secs: REPAIR_BACKOFF.as_secs(),
            });
        };

        let flight = {
            let mut slot = repair.slot.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(flight) = &slot.running {
                flight.clone()
            } else if slot.finished > seen {
                return match &slot.failed {
                    Some((_, error)) => Err(error.clone()),
                    None => Ok(()),
                };
            } else if let Some((_, error)) = slot
                .failed
                .as_ref()
                .filter(|(at, _)| at.elapsed() < REPAIR_BACKOFF)
            {
                return Err(error.clone());
            } else {
                let flight = self.start_repair(layer, data_offset);
                slot.running = Some(flight.clone());
                flight
            }
        };
        flight.await
    }

    /// Spawns the repair task of layer `layer` and returns the flight that every reader
    /// of a damaged block waits for.
    fn start_repair(self: &Arc<Self>, layer: usize, data_offset: u64) -> RepairFlight {
        let (sender, receiver) = oneshot::channel();
        let layer_digest = self.layers[layer].index.digest.clone();
        let flight = receiver
            .map(move |result| {
                result.unwrap_or_else(|_| {
                    Err(ReadError::TaskFailed {
                        layer: layer_digest,
                        detail: "the whole-layer repair task was dropped".into(),
                    })
                })
            })
            .boxed()
            .shared();

        let inner = Arc::clone(self);
        tokio::spawn(async move {
            let result = inner.run_repair(layer, data_offset).await;
            let state = &inner.layers[layer];
            if let Err(error) = &result {
                tracing::error!(
                    layer = %state.index.digest,
                    data_offset,
                    %error,
                    backoff_secs = REPAIR_BACKOFF.as_secs(),
                    "failed to repair the whole layer's cache file; reads of its damaged blocks fail with EIO"
                );
            }
            if let Some(repair) = &state.repair {
                let mut slot = repair.slot.lock().unwrap_or_else(PoisonError::into_inner);
                slot.running = None;
                slot.finished += 1;
                slot.failed = result
                    .as_ref()
                    .err()
                    .map(|error| (Instant::now(), error.clone()));
            }
            // Every reader may have given up; the slot above is what counts then.
            let _ = sender.send(result);
        });
        flight
    }

    /// Downloads the layer's blob again, streams its tar over the cache file and logs
    /// the outcome.
    async fn run_repair(self: &Arc<Self>, layer: usize, data_offset: u64) -> Result<(), ReadError> {
        let state = &self.layers[layer];
        let digest = &state.index.digest;
        let repair_error = |chain: String| ReadError::WholeLayerRepair {
            layer: digest.clone(),
            data_offset,
            chain,
            retry_after_secs: REPAIR_BACKOFF.as_secs(),
        };
        Stats::add(&self.stats.whole_layer_refetches, 1);
        tracing::warn!(layer = %digest, data_offset, "fetching the whole layer again to repair its cache file");

        let download = self
            .download_whole_blob(state)
            .await
            .map_err(|error| repair_error(error.to_string()))?;
        let index = Arc::clone(&state.index);
        let file = state
            .repair
            .as_ref()
            .map(|repair| repair.file.try_clone())
            .transpose()
            .map_err(|error| repair_error(format!("failed to duplicate the cache file: {error}")))?
            .ok_or_else(|| repair_error("the layer has no cache file to repair".into()))?;
        let layer_number = u32::try_from(layer).unwrap_or(u32::MAX);
        let outcome = tokio::task::spawn_blocking(move || {
            rewrite_changed(download, &file, &index, layer_number)
        })
        .await
        .map_err(|error| repair_error(format!("the repair task failed: {error}")))?
        .map_err(|error| repair_error(format!("{error:#}")))?;

        for &chunk in &outcome.chunks {
            state.reported.remove(chunk);
            let record = &state.index.chunks[chunk];
            tracing::debug!(layer = %digest, chunk, name = %record.name, data_offset = record.data_offset, "rewrote a changed chunk of the whole layer's cache file");
        }
        Stats::add(
            &self.stats.whole_layer_chunks_repaired,
            outcome.chunks.len() as u64,
        );
        let damaged = chunk_holding(&state.index, data_offset, 1);
        if damaged.is_none_or(|chunk| !outcome.chunks.contains(&chunk)) {
            // The cache file already held the blob's bytes there, so the recorded block
            // checksums or the disk's reads are wrong. Failing starts the back-off instead
            // of a download for every read of the block.
            return Err(repair_error(format!(
                "the refetched layer has the same bytes as the cache file at data offset {data_offset:#x} ({} other chunks differed and were rewritten), so the recorded block checksums do not match the layer or the disk returns changing data; delete the layer's files under the cache directory's layers/ and restart",
                outcome.chunks.len()
            )));
        }
        tracing::info!(
            layer = %digest,
            data_offset,
            chunks = outcome.chunks.len(),
            bytes = outcome.bytes_rewritten,
            "repaired the whole layer's cache file from its blob"
        );
        Ok(())
    }

    /// Downloads the layer's blob into a temporary file, trying each download directory in
    /// turn while the local file is what fails.
    async fn download_whole_blob(&self, state: &LayerState) -> anyhow::Result<File> {
        let (Some(blob), Some(repair)) = (&state.blob, &state.repair) else {
            anyhow::bail!("the store has no blob source for the layer");
        };
        let size = blob.size();
        let mut last_error = None;
        for dir in &repair.download_dirs {
            let result = whole_blob::download_verified(
                &state.index.digest,
                size,
                dir,
                |offset, len| async move {
                    self.fetch_range(state, offset, offset + len)
                        .await
                        .map_err(anyhow::Error::new)
                },
            )
            .await;
            match result {
                Ok(file) => return Ok(file),
                Err(error) if error.is_local() => {
                    tracing::debug!(layer = %state.index.digest, dir = %dir.display(), %error, "cannot hold the downloaded layer here; trying the next directory");
                    last_error = Some(error);
                }
                Err(error) => return Err(error.into()),
            }
        }
        Err(last_error.map_or_else(
            || anyhow::anyhow!("no directory was given for the downloaded layer"),
            |error: WholeDownloadError| error.into(),
        ))
    }
}

/// Streams the tar of the downloaded blob and writes each piece of file data that
/// differs from the cache file over it. Fails when the tar does not unpack to the chunk
/// table the store serves (then the blob is not the one the cache file was made from).
fn rewrite_changed(
    download: File,
    file: &File,
    index: &LayerIndex,
    layer: u32,
) -> anyhow::Result<RepairOutcome> {
    let reader = whole_blob::layer_tar_reader(download, &index.digest)?;
    let mut outcome = RepairOutcome::default();
    let mut cached = Vec::new();
    let mut sink = |data_offset: u64, bytes: &[u8]| -> io::Result<()> {
        let chunk = chunk_holding(index, data_offset, bytes.len() as u64).ok_or_else(|| {
            io::Error::other(format!(
                "the refetched tar puts {} bytes at data offset {data_offset:#x}, outside the chunk table the cache file was made from",
                bytes.len()
            ))
        })?;
        cached.resize(bytes.len(), 0);
        file.read_exact_at(&mut cached, data_offset)?;
        if cached != bytes {
            file.write_all_at(bytes, data_offset)?;
            outcome.bytes_rewritten += bytes.len() as u64;
            if outcome.chunks.last() != Some(&chunk) {
                outcome.chunks.push(chunk);
            }
        }
        Ok(())
    };
    let refetched = tarlayer::index_tar(layer, &index.digest, reader, &mut sink)?;
    if outcome.bytes_rewritten > 0 {
        file.sync_data()?;
    }

    let same_table = refetched.data_size == index.data_size
        && refetched.chunks.len() == index.chunks.len()
        && refetched
            .chunks
            .iter()
            .zip(&index.chunks)
            .all(|(new, old)| {
                new.data_offset == old.data_offset
                    && new.size == old.size
                    && new.digest() == old.digest()
            });
    if !same_table {
        anyhow::bail!(
            "the refetched layer unpacks to {} chunks and {} bytes, but the cache file was made from {} chunks and {} bytes",
            refetched.chunks.len(),
            refetched.data_size,
            index.chunks.len(),
            index.data_size
        );
    }
    Ok(outcome)
}

/// Returns the chunk that contains all of `data_offset..data_offset + len`, if one does.
fn chunk_holding(index: &LayerIndex, data_offset: u64, len: u64) -> Option<usize> {
    let position = index
        .chunks
        .partition_point(|chunk| chunk.data_offset <= data_offset)
        .checked_sub(1)?;
    let chunk = index.chunks.get(position)?;
    let end = data_offset.checked_add(len)?;
    (end <= chunk.data_offset + chunk.size).then_some(position)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_holding_ranges() {
        // Chunks at 0..5000, 5000..5100 and 5100..20000.
        let index = super::super::persist::tests::layer(&[5000, 100, 14_900]);
        // (case, data offset, length, chunk)
        let cases: &[(&str, u64, u64, Option<usize>)] = &[
            ("first byte", 0, 1, Some(0)),
            ("whole first chunk", 0, 5000, Some(0)),
            ("small chunk", 5000, 100, Some(1)),
            ("inside the last chunk", 6000, 256, Some(2)),
            ("across two chunks", 4990, 20, None),
            ("past the end", 19_990, 20, None),
            ("offset past the end", 25_000, 1, None),
            ("length overflows", 6000, u64::MAX, None),
        ];
        for (case, data_offset, len, expected) in cases {
            assert_eq!(
                chunk_holding(&index, *data_offset, *len),
                *expected,
                "case {case}"
            );
        }
    }
}
