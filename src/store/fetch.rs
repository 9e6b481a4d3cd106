//! Fetching missing chunks: one flight per gzip member shared by all concurrent readers,
//! neighbouring members merged into one Range request, and decoded chunks written to the
//! cache file before anyone may read them.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError};

use bytes::{Bytes, BytesMut};
use futures::future::{self, BoxFuture, FutureExt, Shared};
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot};

use super::chunk::{self, ChunkOutcome};
use super::error::ReadError;
use super::stats::Stats;
use super::{Inner, LayerState};

/// Chunks a member fetch decoded and cached, as `(chunk index, bytes)` in chunk order.
pub(crate) type Decoded = Arc<Vec<(usize, Bytes)>>;

/// The result of one member's fetch, awaited by every reader that needs the member.
pub(crate) type Flight = Shared<BoxFuture<'static, Result<Decoded, ReadError>>>;

type FlightSender = oneshot::Sender<Result<Decoded, ReadError>>;

/// Compressed bytes of complete members decoded in one blocking task while the rest of
/// a range downloads. Smaller batches wake readers sooner but cost more task switches.
const DECODE_BATCH: u64 = 256 << 10;

/// Pieces of a streamed range waiting to be buffered; the download pauses when the
/// reader falls this far behind.
const STREAM_PIECES: usize = 64;

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
    /// reports each member's result to its waiters as soon as the member is stored,
    /// while the rest of the range still downloads.
    async fn fetch_group(self: Arc<Self>, layer: usize, group: Group) {
        let state = &self.layers[layer];
        let member_ids: Vec<usize> = group.members.iter().map(|(member, _)| *member).collect();
        let mut senders: Vec<Option<FlightSender>> = group
            .members
            .into_iter()
            .map(|(_, sender)| Some(sender))
            .collect();
        let guard = FlightGuard {
            state,
            members: std::sync::Mutex::new(member_ids.clone()),
        };
        let mut finish = |position: usize, result: Result<Decoded, ReadError>| {
            // Waiters re-check presence when woken, so the flight goes before the result.
            guard.finish(member_ids[position]);
            if let Some(sender) = senders[position].take() {
                let _ = sender.send(result);
            }
        };

        // A body corrupted on the way (a broken proxy or cache) fails decoding or
        // verification. One more fetch of those members distinguishes that from a
        // corrupt blob, and `decode_members` skips the chunks already stored.
        let start = state.member(member_ids[0]).compressed_offset;
        let end = state
            .member(member_ids[member_ids.len() - 1])
            .compressed_end;
        let mut retry = Vec::new();
        self.stream_and_load(
            layer,
            &member_ids,
            start..end,
            |position, result| match result {
                Err(ReadError::Decompress { .. } | ReadError::DigestMismatch { .. }) => {
                    retry.push(position);
                }
                result => finish(position, result),
            },
        )
        .await;
        if !retry.is_empty() {
            retry.sort_unstable();
            let retry_ids: Vec<usize> =
                retry.iter().map(|&position| member_ids[position]).collect();
            tracing::warn!(layer = %state.index.digest, members = retry_ids.len(), compressed_offset = state.member(retry_ids[0]).compressed_offset, "fetched bytes failed decoding or verification; fetching them once more");
            // The same range again: a fault that hit one request is not repeated.
            self.stream_and_load(layer, &retry_ids, start..end, |index, result| {
                finish(retry[index], result);
            })
            .await;
        }
    }

    /// Downloads the compressed range `span`, which holds `member_ids` (sorted by
    /// compressed offset), and decodes and stores the members as their bytes arrive, in batches of about [`DECODE_BATCH`] compressed bytes on the
    /// blocking pool. Calls `done` once for each member with its position in
    /// `member_ids` and its result, in the order the members are stored.
    pub(crate) async fn stream_and_load(
        &self,
        layer: usize,
        member_ids: &[usize],
        span: std::ops::Range<u64>,
        mut done: impl FnMut(usize, Result<Decoded, ReadError>),
    ) {
        let state = &self.layers[layer];
        if member_ids.is_empty() {
            return;
        }
        let (start, end) = (span.start, span.end);

        let (sink, mut pieces) = mpsc::channel::<Bytes>(STREAM_PIECES);
        let download = self.stream_range(state, start, end, sink);
        tokio::pin!(download);
        let mut download_result = None;

        // `buffer` contains the bytes from `buffered_from` on. Members before
        // `complete` have all their bytes, and those before `dispatched` are decoding.
        let mut buffer = BytesMut::new();
        let mut buffered_from = start;
        let mut complete = 0;
        let mut dispatched = 0;
        let mut loading = FuturesUnordered::new();
        loop {
            tokio::select! {
                biased;
                Some(stored) = loading.next(), if !loading.is_empty() => {
                    let (positions, results): (std::ops::Range<usize>, Vec<_>) = stored;
                    for (position, result) in positions.zip(results) {
                        done(position, result);
                    }
                }
                piece = pieces.recv() => {
                    let Some(piece) = piece else { break };
                    buffer.extend_from_slice(&piece);
                    let received_end = buffered_from + buffer.len() as u64;
                    while complete < member_ids.len()
                        && state.member(member_ids[complete]).compressed_end <= received_end
                    {
                        complete += 1;
                    }
                    let ready = complete > dispatched && {
                        let batch_start = state.member(member_ids[dispatched]).compressed_offset;
                        let batch_end = state.member(member_ids[complete - 1]).compressed_end;
                        // Decode a small batch only while the link is idle.
                        batch_end - batch_start >= DECODE_BATCH || pieces.is_empty()
                    };
                    if ready {
                        for batch in self.split_batches(state, member_ids, dispatched..complete, &mut buffer, &mut buffered_from) {
                            loading.push(self.load_batch(layer, member_ids, batch));
                        }
                        dispatched = complete;
                    }
                }
                result = &mut download, if download_result.is_none() => {
                    download_result = Some(result);
                }
            }
        }
        if complete > dispatched {
            for batch in self.split_batches(
                state,
                member_ids,
                dispatched..complete,
                &mut buffer,
                &mut buffered_from,
            ) {
                loading.push(self.load_batch(layer, member_ids, batch));
            }
        }
        while let Some((positions, results)) = loading.next().await {
            for (position, result) in positions.zip(results) {
                done(position, result);
            }
        }
        if complete < member_ids.len() {
            let outcome = match download_result {
                Some(outcome) => outcome,
                None => download.await,
            };
            let error = outcome.err().unwrap_or_else(|| ReadError::Fetch {
                layer: state.index.digest.clone(),
                compressed_offset: start,
                compressed_end: end,
                chain: "the range ended before its last gzip member".into(),
            });
            for position in complete..member_ids.len() {
                done(position, Err(error.clone()));
            }
        }
    }

    /// Takes the bytes of the complete members `positions` off the front of `buffer`
    /// and splits them into batches of about [`DECODE_BATCH`] compressed bytes, so a
    /// range that arrives at once still decodes on every core.
    fn split_batches(
        &self,
        state: &LayerState,
        member_ids: &[usize],
        positions: std::ops::Range<usize>,
        buffer: &mut BytesMut,
        buffered_from: &mut u64,
    ) -> Vec<Batch> {
        let mut batches = Vec::new();
        let mut batch_start = positions.start;
        for position in positions.clone() {
            let member = state.member(member_ids[position]);
            let first = state.member(member_ids[batch_start]);
            let last_of_all = position + 1 == positions.end;
            if member.compressed_end - first.compressed_offset < DECODE_BATCH && !last_of_all {
                continue;
            }
            // The batch's bytes start at its first member; gap bytes before it go.
            let skip = (first.compressed_offset - *buffered_from) as usize;
            let take = (member.compressed_end - first.compressed_offset) as usize;
            let _ = buffer.split_to(skip);
            let bytes = buffer.split_to(take).freeze();
            *buffered_from = member.compressed_end;
            batches.push(Batch {
                positions: batch_start..position + 1,
                base: first.compressed_offset,
                bytes,
            });
            batch_start = position + 1;
        }
        batches
    }

    /// Decodes one batch of members on the blocking pool and stores them.
    async fn load_batch(
        &self,
        layer: usize,
        member_ids: &[usize],
        batch: Batch,
    ) -> (std::ops::Range<usize>, Vec<Result<Decoded, ReadError>>) {
        let ids = &member_ids[batch.positions.clone()];
        let decoded = self
            .decode_members(layer, ids, batch.base, batch.bytes)
            .await;
        let stored = self.store_members(layer, ids, decoded).await;
        (batch.positions, stored)
    }

    /// Streams `start..end` of the layer's blob into `sink` in requests of at most
    /// `max_request_size` bytes, one after the other, each holding a permit of the
    /// fetch semaphore while it runs.
    async fn stream_range(
        &self,
        state: &LayerState,
        start: u64,
        end: u64,
        sink: mpsc::Sender<Bytes>,
    ) -> Result<(), ReadError> {
        let fetch_error = |chain: String| ReadError::Fetch {
            layer: state.index.digest.clone(),
            compressed_offset: start,
            compressed_end: end,
            chain,
        };
        let Some(blob) = state.blob.as_ref() else {
            return Err(fetch_error("the layer has no blob source".into()));
        };
        let mut offset = start;
        while offset < end {
            let len = (end - offset).min(self.max_request_size);
            let _permit = self
                .fetch_permits
                .acquire()
                .await
                .map_err(|error| fetch_error(error.to_string()))?;
            tracing::debug!(layer = %state.index.digest, offset, len, "streaming blob range");
            Stats::add(&self.stats.range_requests, 1);
            let started = std::time::Instant::now();
            let result = blob.stream_range(offset, len, &sink).await;
            self.stats.record_fetch_latency(started.elapsed());
            if let Err(error) = result {
                let chain = format!("{error:#}");
                Stats::add(&self.stats.fetch_errors, 1);
                tracing::warn!(layer = %state.index.digest, offset, len, error = %chain, "blob range fetch failed");
                return Err(fetch_error(chain));
            }
            Stats::add(&self.stats.bytes_fetched, len);
            offset += len;
        }
        Ok(())
    }

    /// Downloads `start..end` of the layer's blob into one buffer, with the requests
    /// of [`Inner::stream_range`].
    pub(crate) async fn fetch_range(
        &self,
        state: &LayerState,
        start: u64,
        end: u64,
    ) -> Result<Bytes, ReadError> {
        let (sink, mut pieces) = mpsc::channel::<Bytes>(STREAM_PIECES);
        let collect = async {
            let mut first = None;
            let mut joined: Option<BytesMut> = None;
            while let Some(piece) = pieces.recv().await {
                match (&mut joined, first.take()) {
                    (Some(joined), _) => joined.extend_from_slice(&piece),
                    (None, None) => first = Some(piece),
                    (None, Some(earlier)) => {
                        let capacity = usize::try_from(end - start).unwrap_or(0);
                        let mut buffer = BytesMut::with_capacity(capacity);
                        buffer.extend_from_slice(&earlier);
                        buffer.extend_from_slice(&piece);
                        joined = Some(buffer);
                    }
                }
            }
            // A source that sends the range in one piece needs no copy.
            match joined {
                Some(joined) => joined.freeze(),
                None => first.unwrap_or_default(),
            }
        };
        let (outcome, bytes) = tokio::join!(self.stream_range(state, start, end, sink), collect);
        outcome.map(|()| bytes)
    }

    /// Decodes the still-missing chunks of each of `member_ids`, whose compressed
    /// bytes are in `bytes` from compressed offset `base` on, in one blocking task,
    /// and checks them against their digests.
    async fn decode_members(
        &self,
        layer: usize,
        member_ids: &[usize],
        base: u64,
        bytes: Bytes,
    ) -> Vec<Result<Vec<ChunkOutcome>, ReadError>> {
        let state = &self.layers[layer];
        let work: Vec<(std::ops::Range<usize>, Vec<chunk::ChunkSlice>)> = member_ids
            .iter()
            .map(|&member| {
                let info = state.member(member);
                let mut slices = info.slices(&state.index);
                slices.retain(|slice| !state.presence.contains(slice.chunk));
                let range =
                    (info.compressed_offset - base) as usize..(info.compressed_end - base) as usize;
                (range, slices)
            })
            .collect();

        let verify = self.verify;
        let decoded = tokio::task::spawn_blocking(move || {
            work.into_iter()
                .map(|(range, slices)| {
                    if slices.is_empty() {
                        return Ok(Vec::new());
                    }
                    chunk::decode_chunks(&bytes[range], &slices, verify)
                        .map_err(|error| error.to_string())
                })
                .collect::<Vec<_>>()
        })
        .await;
        let outcomes = match decoded {
            Ok(outcomes) => outcomes,
            Err(error) => {
                let error = ReadError::TaskFailed {
                    layer: state.index.digest.clone(),
                    detail: error.to_string(),
                };
                return member_ids.iter().map(|_| Err(error.clone())).collect();
            }
        };
        member_ids
            .iter()
            .zip(outcomes)
            .map(|(&member, outcome)| {
                let info = state.member(member);
                match outcome {
                    Ok(outcomes) => {
                        if !outcomes.is_empty() {
                            Stats::add(&self.stats.members_decompressed, 1);
                        }
                        Ok(outcomes)
                    }
                    Err(chain) => {
                        let first_record = info
                            .slices(&state.index)
                            .first()
                            .map(|slice| &state.index.chunks[slice.chunk]);
                        tracing::warn!(layer = %state.index.digest, compressed_offset = info.compressed_offset, error = %chain, "gzip member decode failed");
                        Err(ReadError::Decompress {
                            layer: state.index.digest.clone(),
                            name: first_record.map(|record| record.name.to_string()).unwrap_or_default(),
                            compressed_offset: info.compressed_offset,
                            data_offset: first_record.map(|record| record.data_offset).unwrap_or_default(),
                            chain,
                        })
                    }
                }
            })
            .collect()
    }
}

/// Complete members whose bytes are decoded together: their positions in the
/// group and their compressed bytes from offset `base` on.
struct Batch {
    positions: std::ops::Range<usize>,
    base: u64,
    bytes: Bytes,
}

/// Removes a group's flights from the layer's map: each as its member finishes,
/// and the rest when the fetch ends, also when the task panics (then the dropped
/// senders wake the waiters with an error).
struct FlightGuard<'a> {
    state: &'a LayerState,
    /// Members whose flights are still in the map.
    members: std::sync::Mutex<Vec<usize>>,
}

impl FlightGuard<'_> {
    /// Removes `member`'s flight, once: a later flight of the same member started by
    /// another reader stays.
    fn finish(&self, member: usize) {
        let mut members = self.members.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(position) = members.iter().position(|&own| own == member) {
            members.swap_remove(position);
            self.state
                .flights
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&member);
        }
    }
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        let members = self
            .members
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        let mut flights = self
            .state
            .flights
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for member in members.iter() {
            flights.remove(member);
        }
    }
}
