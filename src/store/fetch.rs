//! Fetching missing chunks: one flight per gzip member shared by all concurrent readers,
//! neighbouring members merged into one Range request, and decoded chunks written to the
//! cache file before anyone may read them.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError};

use bytes::{Bytes, BytesMut};
use futures::future::{self, BoxFuture, FutureExt, Shared};
use tokio::sync::oneshot;

use super::chunk::{self, ChunkOutcome};
use super::error::ReadError;
use super::stats::Stats;
use super::{Inner, LayerState};

/// Chunks a member fetch decoded and cached, as `(chunk index, bytes)` in chunk order.
pub(crate) type Decoded = Arc<Vec<(usize, Bytes)>>;

/// The result of one member's fetch, awaited by every reader that needs the member.
pub(crate) type Flight = Shared<BoxFuture<'static, Result<Decoded, ReadError>>>;

type FlightSender = oneshot::Sender<Result<Decoded, ReadError>>;

/// Rounds of joining or starting member fetches in one [`Inner::ensure_present`] call.
const FETCH_ROUNDS: u32 = 3;

/// Members fetched with one Range request, in compressed order.
struct Group {
    members: Vec<(usize, FlightSender)>,
}

/// Whether a reader is waiting for a fetch. Background fetching pauses while any
/// [`Priority::High`] fetch waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// A read, or the landmark prefetch at start-up.
    High,
    /// Read-ahead and background fetching.
    Low,
}

/// Counts a high-priority wait for as long as it lives.
struct WaitingGuard<'a>(&'a AtomicUsize);

impl<'a> WaitingGuard<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        WaitingGuard(counter)
    }
}

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Inner {
    /// Makes sure every chunk in `chunks` of layer `layer` is in the cache, and returns
    /// what the fetches this call waited for decoded (so a reader can serve from memory).
    ///
    /// Chunks an earlier run recorded are checked against their crc32 first. Each missing
    /// chunk's member is either joined (another reader fetches it already) or fetched by a
    /// task spawned here. Afterwards the chunks are checked again: a chunk still missing
    /// means its member's fetch failed, and that error is returned. A chunk dropped for a
    /// changed block while a fetch of its member was running is still missing after a
    /// successful fetch; it gets up to [`FETCH_ROUNDS`] rounds in all.
    pub(crate) async fn ensure_present(
        self: &Arc<Self>,
        layer: usize,
        chunks: impl Iterator<Item = usize> + Clone,
        priority: Priority,
    ) -> Result<Vec<Decoded>, ReadError> {
        let state = &self.layers[layer];
        if state.uncached {
            // Nothing is ever stored for the layer; its reads go to `read_direct`.
            return Ok(Vec::new());
        }
        self.check_persisted(layer, chunks.clone()).await;

        let counted = priority == Priority::High;
        let mut decoded = Vec::new();
        for round in 1..=FETCH_ROUNDS {
            let (waits, owned) = self.join_or_start_flights(state, chunks.clone());
            if waits.is_empty() {
                if counted && round == 1 {
                    Stats::add(&self.stats.cache_hits, 1);
                }
                return Ok(decoded);
            }
            if counted && round == 1 {
                Stats::add(&self.stats.cache_misses, 1);
            }
            let _waiting = counted.then(|| WaitingGuard::new(&self.high_waiting));

            for group in self.coalesce(state, owned) {
                tokio::spawn(Arc::clone(self).fetch_group(layer, group));
            }
            let results = future::join_all(waits).await;

            let mut first_error = None;
            for result in results {
                match result {
                    Ok(member) => decoded.push(member),
                    Err(error) => {
                        first_error.get_or_insert(error);
                    }
                }
            }
            if chunks.clone().all(|chunk| state.presence.contains(chunk)) {
                return Ok(decoded);
            }
            if let Some(error) = first_error {
                return Err(error);
            }
        }
        Err(ReadError::TaskFailed {
            layer: state.index.digest.clone(),
            detail: format!(
                "member fetches succeeded {FETCH_ROUNDS} times without caching all chunks"
            ),
        })
    }

    /// Returns the flights to wait for so that every chunk of `chunks` is present: the
    /// running flights of their members, and new ones for members nobody fetches yet,
    /// whose senders are returned for the caller to start.
    fn join_or_start_flights(
        &self,
        state: &LayerState,
        chunks: impl Iterator<Item = usize>,
    ) -> (Vec<Flight>, Vec<(usize, FlightSender)>) {
        let mut waits = Vec::new();
        let mut owned = Vec::new();
        // Presence is read under the lock: a finished fetch sets its chunks' bits
        // before it removes its flight, so a chunk seen missing here either has a
        // flight or needs a new one.
        let mut flights = state.flights.lock().unwrap_or_else(PoisonError::into_inner);
        let missing: BTreeSet<usize> = chunks
            .filter(|&chunk| !state.presence.contains(chunk))
            .filter_map(|chunk| state.table.member_of(&state.index, chunk))
            .collect();
        for member in missing {
            if let Some(flight) = flights.get(&member) {
                waits.push(flight.clone());
                continue;
            }
            let (sender, receiver) = oneshot::channel();
            let layer_digest = state.index.digest.clone();
            let flight: Flight = receiver
                .map(move |result| {
                    result.unwrap_or_else(|_| {
                        Err(ReadError::TaskFailed {
                            layer: layer_digest,
                            detail: "the fetch task was dropped".into(),
                        })
                    })
                })
                .boxed()
                .shared();
            flights.insert(member, flight.clone());
            waits.push(flight);
            owned.push((member, sender));
        }
        (waits, owned)
    }

    /// Checks the chunks an earlier run recorded against their crc32: a good chunk becomes
    /// present, a bad one is forgotten so it is fetched again.
    async fn check_persisted(&self, layer: usize, chunks: impl Iterator<Item = usize>) {
        let state = &self.layers[layer];
        let candidates: Vec<usize> = chunks
            .filter(|&chunk| !state.presence.contains(chunk) && state.persisted.contains(chunk))
            .collect();
        if candidates.is_empty() {
            return;
        }
        let checks = candidates
            .into_iter()
            .map(|chunk| self.check_persisted_chunk(layer, chunk));
        future::join_all(checks).await;
    }

    async fn check_persisted_chunk(&self, layer: usize, chunk: usize) {
        let state = &self.layers[layer];
        let record = &state.index.chunks[chunk];
        let Ok(len) = usize::try_from(record.size) else {
            state.persisted.remove(chunk);
            return;
        };
        let expected = state.persisted_crc.get(chunk).copied().unwrap_or_default();
        let outcome = self.io.read(layer, record.data_offset, len).await;
        let failure = match outcome {
            Ok(bytes) => {
                let crc = crc32fast::hash(&bytes);
                let block_check = state.blocks.check(chunk, 0, &bytes);
                if crc != expected {
                    format!("crc32 {crc:#010x}, expected {expected:#010x}")
                } else if let Err(mismatch) = block_check {
                    format!(
                        "block {} has crc32 {:#010x}, expected {:#010x}",
                        mismatch.block, mismatch.actual, mismatch.expected
                    )
                } else {
                    // Present before no longer persisted, so a concurrent reader never sees
                    // neither bit and fetches a good chunk again.
                    state.presence.insert(chunk);
                    state.persisted.remove(chunk);
                    Stats::add(&self.stats.chunks_reused, 1);
                    return;
                }
            }
            Err(error) => error.to_string(),
        };

        state.persisted.remove(chunk);
        Stats::add(&self.stats.cache_checksum_failures, 1);
        tracing::warn!(layer = %state.index.digest, chunk, data_offset = record.data_offset, len = record.size, %failure, "cached chunk failed its check, fetching it again");
        state.clear_index_record(chunk);
    }

    /// Splits members (sorted by compressed offset) into Range requests: a member joins
    /// the previous request when the gap to it is at most `max_coalesce_gap` and the
    /// request stays within `max_request_size`.
    fn coalesce(&self, state: &LayerState, owned: Vec<(usize, FlightSender)>) -> Vec<Group> {
        let mut groups: Vec<Group> = Vec::new();
        for (member, sender) in owned {
            let current = state.member(member);
            let joins_last = groups.last().is_some_and(|group| {
                let first = state.member(group.members[0].0);
                let last = state.member(group.members[group.members.len() - 1].0);
                let gap = current.compressed_offset - last.compressed_end;
                let size = current.compressed_end - first.compressed_offset;
                gap <= self.max_coalesce_gap && size <= self.max_request_size
            });
            match groups.last_mut() {
                Some(group) if joins_last => group.members.push((member, sender)),
                _ => groups.push(Group {
                    members: vec![(member, sender)],
                }),
            }
        }
        groups
    }

    /// Fetches one group's compressed range, loads each member into the cache, and
    /// reports each member's result to its waiters.
    async fn fetch_group(self: Arc<Self>, layer: usize, group: Group) {
        let state = &self.layers[layer];
        let member_ids: Vec<usize> = group.members.iter().map(|(member, _)| *member).collect();
        let guard = FlightGuard {
            state,
            members: member_ids.clone(),
        };

        let start = state.member(member_ids[0]).compressed_offset;
        let end = state
            .member(member_ids[member_ids.len() - 1])
            .compressed_end;
        let mut results = self.fetch_and_load(layer, &member_ids, start, end).await;
        // A body corrupted on the way (a broken proxy or cache) fails decoding or
        // verification; one more fetch distinguishes that from a corrupt blob. Chunks
        // loaded by the first fetch are skipped by `decode_member`.
        if results.iter().any(|result| {
            matches!(
                result,
                Err(ReadError::Decompress { .. } | ReadError::DigestMismatch { .. })
            )
        }) {
            tracing::warn!(layer = %state.index.digest, compressed_offset = start, compressed_end = end, "fetched bytes failed decoding or verification; fetching them once more");
            results = self.fetch_and_load(layer, &member_ids, start, end).await;
        }

        // Waiters re-check presence when woken, so the entries go before the results.
        drop(guard);
        for ((_, sender), result) in group.members.into_iter().zip(results) {
            let _ = sender.send(result);
        }
    }

    /// Downloads `start..end`, decodes each member of it and writes the good chunks to
    /// the cache; returns each member's result.
    async fn fetch_and_load(
        &self,
        layer: usize,
        member_ids: &[usize],
        start: u64,
        end: u64,
    ) -> Vec<Result<Decoded, ReadError>> {
        let state = &self.layers[layer];
        match self.fetch_range(state, start, end).await {
            Ok(bytes) => {
                let decodes = member_ids.iter().map(|&member| {
                    let info = state.member(member);
                    let range = (info.compressed_offset - start) as usize
                        ..(info.compressed_end - start) as usize;
                    self.decode_member(layer, member, bytes.slice(range))
                });
                let decoded = future::join_all(decodes).await;
                self.store_members(layer, member_ids, decoded).await
            }
            Err(error) => vec![Err(error); member_ids.len()],
        }
    }

    /// Downloads `start..end` of the layer's blob in requests of at most
    /// `max_request_size` bytes, each holding a permit of the fetch semaphore.
    pub(crate) async fn fetch_range(
        &self,
        state: &LayerState,
        start: u64,
        end: u64,
    ) -> Result<Bytes, ReadError> {
        let fetch_error = |chain: String| ReadError::Fetch {
            layer: state.index.digest.clone(),
            compressed_offset: start,
            compressed_end: end,
            chain,
        };
        let Some(blob) = state.blob.as_ref() else {
            return Err(fetch_error("the layer has no blob source".into()));
        };

        let mut pieces = Vec::new();
        let mut offset = start;
        while offset < end {
            let len = (end - offset).min(self.max_request_size);
            pieces.push((offset, len));
            offset += len;
        }

        let requests = pieces.into_iter().map(|(offset, len)| async move {
            let _permit = self.fetch_permits.acquire().await.map_err(|error| fetch_error(error.to_string()))?;
            tracing::debug!(layer = %state.index.digest, offset, len, "fetching blob range");
            Stats::add(&self.stats.range_requests, 1);

            let started = std::time::Instant::now();
            let result = blob.read_range(offset, len).await;
            self.stats.record_fetch_latency(started.elapsed());
            let result = match result {
                Ok(bytes) if bytes.len() as u64 == len => Ok(bytes),
                Ok(bytes) => Err(format!("the source returned {} bytes for a {len}-byte range at {offset:#x}", bytes.len())),
                Err(error) => Err(format!("{error:#}")),
            };
            match result {
                Ok(bytes) => {
                    Stats::add(&self.stats.bytes_fetched, len);
                    Ok(bytes)
                }
                Err(chain) => {
                    Stats::add(&self.stats.fetch_errors, 1);
                    tracing::warn!(layer = %state.index.digest, offset, len, error = %chain, "blob range fetch failed");
                    Err(fetch_error(chain))
                }
            }
        });
        let mut parts = future::try_join_all(requests).await?;

        if parts.len() == 1 {
            return Ok(parts.remove(0));
        }
        let mut joined = BytesMut::with_capacity((end - start) as usize);
        for part in parts {
            joined.extend_from_slice(&part);
        }
        Ok(joined.freeze())
    }

    /// Decodes one member's still-missing chunks and checks them against their digests.
    async fn decode_member(
        &self,
        layer: usize,
        member: usize,
        bytes: Bytes,
    ) -> Result<Vec<ChunkOutcome>, ReadError> {
        let state = &self.layers[layer];
        let info = state.member(member);
        let mut slices = info.slices(&state.index);
        slices.retain(|slice| !state.presence.contains(slice.chunk));
        let Some(first) = slices.first() else {
            return Ok(Vec::new());
        };
        let first_record = &state.index.chunks[first.chunk];

        let verify = self.verify;
        let decoded =
            tokio::task::spawn_blocking(move || chunk::decode_chunks(&bytes, &slices, verify))
                .await;
        let outcomes = match decoded {
            Ok(Ok(outcomes)) => outcomes,
            Ok(Err(error)) => {
                tracing::warn!(layer = %state.index.digest, compressed_offset = info.compressed_offset, %error, "gzip member decode failed");
                return Err(ReadError::Decompress {
                    layer: state.index.digest.clone(),
                    name: first_record.name.to_string(),
                    compressed_offset: info.compressed_offset,
                    data_offset: first_record.data_offset,
                    chain: error.to_string(),
                });
            }
            Err(error) => {
                return Err(ReadError::TaskFailed {
                    layer: state.index.digest.clone(),
                    detail: error.to_string(),
                });
            }
        };
        Stats::add(&self.stats.members_decompressed, 1);
        Ok(outcomes)
    }
}

/// Removes a group's flights from the layer's map when the fetch ends, also when the
/// task panics (then the dropped senders wake the waiters with an error).
struct FlightGuard<'a> {
    state: &'a LayerState,
    members: Vec<usize>,
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        let mut flights = self
            .state
            .flights
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for member in &self.members {
            flights.remove(member);
        }
    }
}
