//! The chunk store: serves ranges of each layer's data space from a local cache file,
//! fetching, decompressing and verifying missing eStargz chunks first (eStargz spec:
//! containerd/stargz-snapshotter `docs/estargz.md`).
//!
//! Every layer has a sparse cache file `layers/sha256-<hex>.data` under the cache
//! directory, indexed by data offset. A read finds the chunks covering its range. Chunks
//! not yet cached are fetched with HTTP Range requests, with neighbouring gzip members
//! merged into one request. They are gunzipped on the blocking thread pool, checked
//! against their TOC digests and written to the cache file; the read that waited is
//! served from the decoded bytes. Cache file I/O goes through io_uring when the kernel
//! allows it, else through `pread`/`pwrite`.
//!
//! Beside each data file, `layers/sha256-<hex>.index` records the chunks written, their
//! crc32 and the crc32 of each of their 4 KiB blocks, so a later run (of this image or
//! another sharing the layer) reuses them after checking each one's checksum. Every read
//! from the cache file checks the blocks it touches; a chunk with a changed block is
//! dropped and fetched again, and a whole layer's cache file is repaired from its blob.
//! Sequential reads of a layer trigger read-ahead.

mod blocks;
mod cache;
mod checked;
pub mod chunk;
mod direct;
mod error;
mod evict;
mod fallback;
mod fetch;
mod fill;
mod hot;
mod io;
mod persist;
mod readahead;
mod repair;
mod stats;
mod table;
mod uring;
mod whole;
mod whole_blob;

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::BytesMut;

use bytes::Bytes;
use tokio::sync::Semaphore;

use crate::layer::LayerIndex;
use crate::source::BlobSource;

pub use cache::WholeLayerWriter;
pub use error::{ReadError, StoreError};
pub use evict::{list_layers, prune, CachedLayer, PruneOptions, PruneReport};
pub use fetch::Priority;
pub use stats::{LatencyHistogram, StatsSnapshot, FETCH_LATENCY_BOUNDS};
pub use whole_blob::{download_verified, layer_tar_reader, WholeDownloadError};

use blocks::BlockSums;
use cache::Presence;
use fetch::{Decoded, Flight};
use io::CacheIo;
use persist::IndexFile;
use readahead::ReadAhead;
use repair::WholeRepair;
use stats::Stats;
use table::MemberTable;

/// How many times one read fetches chunks (or repairs a whole layer) again whose cached
/// blocks failed their checksum, before it fails with [`ReadError::CacheChecksum`] (or
/// [`ReadError::WholeLayerChecksum`]).
pub const CHECKSUM_REFETCHES: u32 = 2;

/// The backend for cache file I/O.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoBackendChoice {
    /// io_uring if the `io_uring_setup` probe succeeds, else pread/pwrite.
    #[default]
    Auto,
    /// io_uring, or fail to open the store.
    Uring,
    /// pread/pwrite on tokio's blocking thread pool.
    Std,
}

/// Settings of a [`ChunkStore`].
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Directory holding `layers/`; created with mode 0700 if missing.
    pub cache_dir: PathBuf,
    /// Check each fetched chunk's sha256 against its TOC digest before caching it.
    pub verify: bool,
    pub io: IoBackendChoice,
    /// Largest gap in bytes between two missing gzip members that one Range request
    /// still spans (the gap bytes are downloaded and dropped).
    pub max_coalesce_gap: u64,
    /// Largest Range request in bytes; a larger member is fetched in several requests.
    pub max_request_size: u64,
    /// Maximum number of Range requests in flight across all layers (0 counts as 1).
    pub max_concurrent_fetches: usize,
    /// Largest read-ahead window in bytes of a layer's data space; 0 turns read-ahead off.
    pub max_readahead: u64,
    /// Directories other than `cache_dir` holding the `layers/` cache file of a whole
    /// layer, by layer digest: used when the cache directory could not hold the layer.
    pub whole_layer_dirs: HashMap<String, PathBuf>,
}

impl StoreOptions {
    /// Options with verification on, the Auto backend, 256 KiB coalescing gap, 16 MiB
    /// requests, 16 concurrent fetches and a 32 MiB read-ahead window.
    pub fn new(cache_dir: impl Into<PathBuf>) -> StoreOptions {
        StoreOptions {
            cache_dir: cache_dir.into(),
            verify: true,
            io: IoBackendChoice::Auto,
            max_coalesce_gap: 256 * 1024,
            max_request_size: 16 * 1024 * 1024,
            max_concurrent_fetches: 16,
            max_readahead: 32 * 1024 * 1024,
            whole_layer_dirs: HashMap::new(),
        }
    }
}

/// One layer given to [`ChunkStore::open`].
#[derive(Clone)]
pub struct StoreLayer {
    pub index: Arc<LayerIndex>,
    /// The layer blob. A layer written whole at start-up has only
    /// [`ChunkSource::Local`](crate::layer::ChunkSource::Local) chunks and reads its blob only to repair its cache file
    /// after a block failed its checksum. Without a blob, such a block fails its reads
    /// with EIO.
    pub blob: Option<Arc<dyn BlobSource>>,
}

/// Lazily filled chunk cache of an image's layers, shared by all readers.
pub struct ChunkStore {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    layers: Vec<LayerState>,
    io: CacheIo,
    /// Cache files for reads that the page cache serves on the calling thread.
    hot: hot::HotFiles,
    verify: bool,
    max_coalesce_gap: u64,
    max_request_size: u64,
    fetch_permits: Semaphore,
    max_readahead: u64,
    /// High-priority fetches being waited for; background fetching pauses while it is
    /// above zero.
    high_waiting: AtomicUsize,
    stats: Stats,
}

pub(crate) struct LayerState {
    index: Arc<LayerIndex>,
    blob: Option<Arc<dyn BlobSource>>,
    table: MemberTable,
    presence: Presence,
    /// Member fetches in progress, by member index. An entry is removed only after its
    /// chunks were marked present (or the fetch failed), so no member is fetched twice at
    /// the same time.
    flights: Mutex<HashMap<usize, Flight>>,
    /// Chunks an earlier run recorded in the index file, not yet checked in this run.
    persisted: Presence,
    /// crc32 of each chunk recorded in the index file (0 where none is); empty when
    /// the index file recorded no chunk.
    persisted_crc: Vec<u32>,
    /// crc32 of each 4 KiB block of the fetched chunks and of the chunks of a whole layer
    /// ([`ChunkSource::Local`](crate::layer::ChunkSource::Local), see `whole`), checked on every cache read.
    blocks: BlockSums,
    /// Local chunks whose failed block checksum was logged, so each is logged once until
    /// a repair rewrites it.
    reported: Presence,
    /// Set for a whole layer with a blob source: repairs its cache file (see `repair`).
    repair: Option<WholeRepair>,
    /// `None` for an uncached layer.
    index_file: Option<IndexFile>,
    /// Set when the cache directory was full or read-only at open: the layer's chunks are
    /// always fetched and served without touching the cache (see `direct`).
    uncached: bool,
    readahead: Mutex<ReadAhead>,
}

impl LayerState {
    /// Member `member` of the layer. Member numbers come from the layer's own table
    /// ([`MemberTable::member_of`] or a range below [`MemberTable::len`]), so they are
    /// in range; an out-of-range number is a bug and panics like a slice index.
    fn member(&self, member: usize) -> table::Member<'_> {
        match self.table.get(&self.index, member) {
            Some(info) => info,
            None => panic!(
                "member {member} of layer {} is past the {} members of its table",
                self.index.digest,
                self.table.len()
            ),
        }
    }
}

impl ChunkStore {
    /// Checks the layers' chunk tables, creates or opens their cache files and starts the
    /// cache I/O backend.
    ///
    /// A cache directory that is full or read-only does not fail the open: the layers
    /// whose cache files cannot be created or opened for writing are served from their
    /// blobs without caching, and the condition is logged once. Whole layers still need
    /// their cache file, which [`StoreOptions::whole_layer_dirs`] may place elsewhere.
    pub fn open(layers: Vec<StoreLayer>, options: StoreOptions) -> Result<ChunkStore, StoreError> {
        let unusable_dir = match cache::layers_dir(&options.cache_dir) {
            Ok(_) => None,
            Err(StoreError::CreateCacheDir { path, source })
                if direct::is_full_or_read_only(&source) =>
            {
                tracing::debug!(path = %path.display(), error = %source, "cannot create the cache's layers directory");
                Some(source)
            }
            Err(error) => return Err(error),
        };

        let mut states = Vec::with_capacity(layers.len());
        let mut files = Vec::with_capacity(layers.len());
        let mut hot_files = Vec::with_capacity(layers.len());
        for layer in layers {
            let index = layer.index;
            let table = table::build(&index, layer.blob.as_ref().map(|blob| blob.size()))?;

            let presence = Presence::new(index.chunks.len());
            let mut has_local = false;
            for (position, chunk) in index.chunks.iter().enumerate() {
                if chunk.is_local() {
                    presence.insert(position);
                    has_local = true;
                }
            }
            let layer_dir = match options.whole_layer_dirs.get(&index.digest) {
                Some(dir) if has_local => dir,
                _ => &options.cache_dir,
            };
            let path = cache::layer_path(layer_dir, &index.digest)?;
            let blocks = BlockSums::new(&index.chunks);
            let opened = if has_local {
                let file = cache::open_whole(&path, &index.digest, index.data_size)?;
                let (index_file, loaded) =
                    IndexFile::open(&persist::index_path(&path), &index, blocks.total())?;
                Some((file, index_file, loaded))
            } else if let Some(source) = &unusable_dir {
                direct::log_uncached_layer(&index.digest, source);
                None
            } else {
                open_lazy_cache(&path, &index, blocks.total())?
            };
            let (file, index_file, mut loaded) = match opened {
                Some((file, index_file, loaded)) => (file, Some(index_file), loaded),
                None => {
                    // NOTE: io_uring needs a file for every layer; an uncached layer gets
                    // /dev/null, which is never read or written (see `LayerState::uncached`).
                    let placeholder =
                        File::open("/dev/null").map_err(|source| StoreError::OpenCacheFile {
                            path: "/dev/null".into(),
                            source,
                        })?;
                    (placeholder, None, persist::Loaded::empty())
                }
            };
            let uncached = index_file.is_none();
            if let (false, Some(index_file)) = (loaded.present.is_empty(), &index_file) {
                // The file's block order is the table's, so the sums go straight in.
                index_file.load_block_sums(blocks.total(), |block, sum| blocks.set(block, sum))?;
            }
            let persisted = Presence::new(index.chunks.len());
            if let (true, Some(index_file)) = (has_local, &index_file) {
                let computed =
                    whole::load_block_sums(&file, &path, &index, &blocks, index_file, &loaded)?;
                tracing::debug!(layer = %index.digest, computed, "block checksums of the whole layer ready");
                index_file
                    .set_complete(true)
                    .map_err(|source| StoreError::WriteIndexFile {
                        path: persist::index_path(&path),
                        source,
                    })?;
            } else {
                for (position, &present) in loaded.present.iter().enumerate() {
                    if present {
                        persisted.insert(position);
                    }
                }
            }
            // The loaded crc list becomes the table, so no second copy is made. It is
            // empty unless an earlier run left chunks in the cache, and a chunk is
            // looked up only when `persisted` has it (a whole layer has none).
            let persisted_crc = if has_local {
                Vec::new()
            } else {
                std::mem::take(&mut loaded.crcs)
            };
            let reusable = persisted.count();
            if reusable > 0 {
                tracing::info!(layer = %index.digest, chunks = reusable, "reusing chunks cached by an earlier run");
            }

            let repair = match (has_local, &layer.blob) {
                (true, Some(_)) => Some(whole_repair(&file, &path)?),
                _ => None,
            };
            let hot_file = if uncached {
                None
            } else {
                file.try_clone()
                    .map_err(|error| tracing::debug!(layer = %index.digest, %error, "failed to duplicate the cache file; its cached reads go through the cache I/O backend"))
                    .ok()
            };
            hot_files.push(hot_file);
            files.push(file);
            let reported = Presence::new(index.chunks.len());
            states.push(LayerState {
                index,
                blob: layer.blob,
                table,
                presence,
                flights: Mutex::new(HashMap::new()),
                persisted,
                persisted_crc,
                blocks,
                reported,
                repair,
                index_file,
                uncached,
                readahead: Mutex::new(ReadAhead::default()),
            });
        }

        let io = CacheIo::start(options.io, files)?;
        tracing::debug!(layers = states.len(), backend = io.name(), cache_dir = %options.cache_dir.display(), "chunk store opened");

        let inner = Inner {
            layers: states,
            io,
            hot: hot::HotFiles::new(hot_files),
            verify: options.verify,
            max_coalesce_gap: options.max_coalesce_gap,
            max_request_size: options.max_request_size.max(1),
            fetch_permits: Semaphore::new(options.max_concurrent_fetches.max(1)),
            max_readahead: options.max_readahead,
            high_waiting: AtomicUsize::new(0),
            stats: Stats::default(),
        };
        Ok(ChunkStore {
            inner: Arc::new(inner),
        })
    }

    /// Reads `len` bytes of layer `layer`'s data space at `data_offset`; fetches,
    /// decompresses and verifies missing chunks first.
    ///
    /// Bytes read from the cache file are checked against their block checksums. A chunk
    /// with a changed block is dropped and fetched again. For a whole layer, the layer's
    /// blob is fetched again and its cache file repaired instead. A read does this up to
    /// [`CHECKSUM_REFETCHES`] times, then fails.
    ///
    /// Must run inside a tokio runtime: fetches run as spawned tasks, so they finish and
    /// fill the cache even if this future is dropped.
    pub async fn read(&self, layer: u32, data_offset: u64, len: u64) -> Result<Bytes, ReadError> {
        let (state, chunks) = self.inner.locate(layer, data_offset, len)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        if state.uncached {
            return self
                .inner
                .read_direct(layer as usize, data_offset, len)
                .await;
        }
        self.inner.read_ahead(layer as usize, data_offset, len);

        let mut refetches = 0;
        loop {
            let repair_generation = state.repair.as_ref().map(WholeRepair::generation);
            let decoded = match self
                .inner
                .ensure_present(layer as usize, chunks.clone(), Priority::High)
                .await
            {
                Ok(decoded) => decoded,
                Err(error) if direct::is_cache_write_failure(&error) => {
                    direct::log_cache_write_failure(&error);
                    return self
                        .inner
                        .read_direct(layer as usize, data_offset, len)
                        .await;
                }
                Err(error) => return Err(error),
            };

            if let Some(bytes) = assemble(
                &state.index.chunks,
                &decoded,
                chunks.clone(),
                data_offset,
                len,
            ) {
                Stats::add(&self.inner.stats.reads_from_decoded, 1);
                Stats::add(&self.inner.stats.bytes_served, len);
                return Ok(bytes);
            }

            match self
                .inner
                .read_checked(layer as usize, chunks.clone(), data_offset, len)
                .await
            {
                Ok(bytes) => {
                    Stats::add(&self.inner.stats.bytes_served, len);
                    return Ok(bytes);
                }
                Err(ReadError::CacheChecksum { .. }) if refetches < CHECKSUM_REFETCHES => {
                    refetches += 1;
                }
                Err(error @ ReadError::WholeLayerChecksum { data_offset, .. })
                    if refetches < CHECKSUM_REFETCHES =>
                {
                    let Some(seen) = repair_generation else {
                        return Err(error);
                    };
                    self.inner
                        .repair_whole_layer(layer as usize, seen, data_offset)
                        .await?;
                    refetches += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Fetches the chunks covering the range into the cache without returning data
    /// (prefetch, `NBD_CMD_CACHE`).
    pub async fn prefetch(&self, layer: u32, data_offset: u64, len: u64) -> Result<(), ReadError> {
        let (_, chunks) = self.inner.locate(layer, data_offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.inner
            .ensure_present(layer as usize, chunks, Priority::High)
            .await
            .map(drop)
    }

    /// Number of layers in the store.
    pub fn layer_count(&self) -> usize {
        self.inner.layers.len()
    }

    /// Number of gzip members of a layer's blob (0 for an unknown or whole layer).
    pub fn member_count(&self, layer: u32) -> usize {
        self.inner
            .layers
            .get(layer as usize)
            .map_or(0, |state| state.table.len())
    }

    /// The members whose compressed offset is below `compressed_offset`: the files before
    /// a `.prefetch.landmark`. Members are sorted by offset, so this is a prefix.
    pub fn members_before(&self, layer: u32, compressed_offset: u64) -> Range<usize> {
        let Some(state) = self.inner.layers.get(layer as usize) else {
            return 0..0;
        };
        0..state.table.count_before(&state.index, compressed_offset)
    }

    /// Compressed byte range of a member in the blob.
    pub fn member_span(&self, layer: u32, member: usize) -> Option<Range<u64>> {
        let state = self.inner.layers.get(layer as usize)?;
        let info = state.table.get(&state.index, member)?;
        Some(info.compressed_offset..info.compressed_end)
    }

    /// Whether every chunk of a member is present (an unknown member counts as present).
    pub fn member_cached(&self, layer: u32, member: usize) -> bool {
        let Some(state) = self.inner.layers.get(layer as usize) else {
            return true;
        };
        if state.uncached {
            return true;
        }
        state.table.get(&state.index, member).is_none_or(|info| {
            info.chunks.iter().all(|chunk| {
                state.presence.contains(chunk as usize) || state.persisted.contains(chunk as usize)
            })
        })
    }

    /// Fetches the given members of a layer into the cache (coalesced into as few Range
    /// requests as their layout allows). Chunks recorded by an earlier run are checked
    /// instead of fetched.
    pub async fn fetch_members(
        &self,
        layer: u32,
        members: Range<usize>,
        priority: Priority,
    ) -> Result<(), ReadError> {
        let state = self
            .inner
            .layers
            .get(layer as usize)
            .ok_or(ReadError::UnknownLayer {
                layer,
                count: self.inner.layers.len(),
            })?;
        let end = members.end.min(state.table.len());
        let chunks: Vec<usize> = (members.start.min(end)..end)
            .filter_map(|member| state.table.get(&state.index, member))
            .flat_map(|member| {
                member
                    .chunks
                    .iter()
                    .map(|chunk| chunk as usize)
                    .collect::<Vec<_>>()
            })
            .collect();
        self.inner
            .ensure_present(layer as usize, chunks.iter().copied(), priority)
            .await
            .map(drop)
    }

    /// Number of high-priority fetches (reads, landmark prefetch) being waited for now.
    pub fn high_priority_waiting(&self) -> usize {
        self.inner.high_waiting.load(Ordering::SeqCst)
    }

    /// Number of chunks of a layer that are known good in the cache in this run.
    pub fn cached_chunks(&self, layer: u32) -> usize {
        self.inner
            .layers
            .get(layer as usize)
            .map_or(0, |state| state.presence.count())
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.inner.stats.snapshot()
    }

    /// Name of the cache I/O backend: `"io_uring"` or `"pread/pwrite"`.
    pub fn io_backend(&self) -> &'static str {
        self.inner.io.name()
    }
}

/// Cuts `data_offset..data_offset + len` out of decoded chunks, when they hold all of
/// `chunks`; `None` sends the caller to the cache file.
fn assemble(
    records: &[crate::layer::ChunkRecord],
    decoded: &[Decoded],
    chunks: Range<usize>,
    data_offset: u64,
    len: u64,
) -> Option<Bytes> {
    if decoded.is_empty() {
        return None;
    }
    let find = |chunk: usize| {
        decoded.iter().find_map(|member| {
            let position = member
                .binary_search_by_key(&chunk, |(index, _)| *index)
                .ok()?;
            member.get(position).map(|(_, bytes)| bytes)
        })
    };

    let end = data_offset.checked_add(len)?;
    let mut parts = Vec::with_capacity(chunks.len());
    for chunk in chunks {
        let bytes = find(chunk)?;
        let record = records.get(chunk)?;
        let from =
            usize::try_from(data_offset.max(record.data_offset) - record.data_offset).ok()?;
        let to =
            usize::try_from(end.min(record.data_offset + record.size) - record.data_offset).ok()?;
        if from > to || to > bytes.len() {
            return None;
        }
        parts.push(bytes.slice(from..to));
    }
    if parts.len() == 1 {
        return parts.pop();
    }
    let mut joined = BytesMut::with_capacity(usize::try_from(len).ok()?);
    for part in parts {
        joined.extend_from_slice(&part);
    }
    Some(joined.freeze())
}

impl Inner {
    /// Starts read-ahead when this read continues the layer's previous one.
    fn read_ahead(self: &Arc<Self>, layer: usize, data_offset: u64, len: u64) {
        if self.max_readahead == 0 {
            return;
        }
        let state = &self.layers[layer];
        if state.uncached {
            return;
        }
        let planned = state
            .readahead
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .next(data_offset, len, state.index.data_size, self.max_readahead);
        let Some((start, ahead)) = planned else {
            return;
        };
        let chunks = table::chunks_covering(&state.index, start, ahead);
        if chunks.clone().all(|chunk| state.presence.contains(chunk)) {
            return;
        }

        Stats::add(&self.stats.readaheads, 1);
        tracing::trace!(layer = %state.index.digest, start, len = ahead, "read-ahead");
        let inner = Arc::clone(self);
        tokio::spawn(async move {
            if let Err(error) = inner.ensure_present(layer, chunks, Priority::Low).await {
                tracing::debug!(%error, "read-ahead failed; the read that needs the data fetches it again");
            }
        });
    }

    /// Checks the layer number and range and returns the layer and its covering chunks.
    fn locate(
        &self,
        layer: u32,
        data_offset: u64,
        len: u64,
    ) -> Result<(&LayerState, std::ops::Range<usize>), ReadError> {
        let state = self
            .layers
            .get(layer as usize)
            .ok_or(ReadError::UnknownLayer {
                layer,
                count: self.layers.len(),
            })?;
        let data_size = state.index.data_size;
        let end = data_offset.checked_add(len);
        if end.is_none_or(|end| end > data_size) {
            return Err(ReadError::OutOfRange {
                layer: state.index.digest.clone(),
                offset: data_offset,
                len,
                data_size,
            });
        }
        let chunks = if len == 0 {
            0..0
        } else {
            table::chunks_covering(&state.index, data_offset, len)
        };
        Ok((state, chunks))
    }
}

/// Prepares the repair of a whole layer's cache file at `path`: a second descriptor of
/// the file, and the directories for a downloaded copy of the blob (the cache file's own,
/// then the system's temporary directory).
fn whole_repair(file: &File, path: &std::path::Path) -> Result<WholeRepair, StoreError> {
    let duplicate = file
        .try_clone()
        .map_err(|source| StoreError::OpenCacheFile {
            path: path.to_path_buf(),
            source,
        })?;
    let mut download_dirs = Vec::new();
    if let Some(parent) = path.parent() {
        download_dirs.push(parent.to_path_buf());
    }
    download_dirs.push(std::env::temp_dir());
    Ok(WholeRepair::new(duplicate, download_dirs))
}

/// Opens a lazy layer's cache file and index; `None` when the cache directory is full or
/// read-only, which is logged once per condition.
fn open_lazy_cache(
    path: &std::path::Path,
    index: &LayerIndex,
    block_count: u64,
) -> Result<Option<(File, IndexFile, persist::Loaded)>, StoreError> {
    let opened = cache::open_lazy(path, index.data_size).and_then(|file| {
        let (index_file, loaded) = IndexFile::open(&persist::index_path(path), index, block_count)?;
        Ok((file, index_file, loaded))
    });
    match opened {
        Ok(opened) => Ok(Some(opened)),
        Err(error) => match direct::unusable_cache_source(&error) {
            Some(source) => {
                tracing::debug!(layer = %index.digest, %error, "cannot open the layer's cache");
                direct::log_uncached_layer(&index.digest, source);
                Ok(None)
            }
            None => Err(error),
        },
    }
}

impl Drop for Inner {
    /// Records the last use of every layer, which eviction orders by.
    fn drop(&mut self) {
        for state in &self.layers {
            let Some(index_file) = &state.index_file else {
                continue;
            };
            if let Err(error) = index_file.touch() {
                tracing::debug!(layer = %state.index.digest, %error, "failed to record the layer's last use");
            }
        }
    }
}
