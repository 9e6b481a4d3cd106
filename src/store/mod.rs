//! The chunk store: serves ranges of each layer's data space from a local cache file,
//! fetching, decompressing and verifying missing eStargz chunks first (eStargz spec:
//! containerd/stargz-snapshotter `docs/estargz.md`).
//!
//! Every layer has a sparse cache file `layers/sha256-<hex>.data` under the cache
//! directory, indexed by data offset. A read finds the chunks covering its range. Chunks
//! not yet cached are fetched with HTTP Range requests, with neighbouring gzip members
//! merged into one request. They are gunzipped on the blocking thread pool, checked
//! against their TOC digests and written to the cache file, and only then is the range
//! read back from the file. Cache file I/O goes through io_uring when the kernel allows
//! it, else through `pread`/`pwrite`.

mod cache;
pub mod chunk;
mod direct;
mod error;
mod fallback;
mod fetch;
mod io;
mod stats;
mod table;
mod uring;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::Semaphore;

use crate::layer::{ChunkSource, LayerIndex};
use crate::source::BlobSource;

pub use cache::WholeLayerWriter;
pub use error::{ReadError, StoreError};
pub use stats::{LatencyHistogram, StatsSnapshot, FETCH_LATENCY_BOUNDS};

use cache::Presence;
use fetch::Flight;
use io::CacheIo;
use stats::Stats;
use table::MemberTable;

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
}

impl StoreOptions {
    /// Options with verification on, the Auto backend, 256 KiB coalescing gap, 16 MiB
    /// requests and 16 concurrent fetches.
    pub fn new(cache_dir: impl Into<PathBuf>) -> StoreOptions {
        StoreOptions {
            cache_dir: cache_dir.into(),
            verify: true,
            io: IoBackendChoice::Auto,
            max_coalesce_gap: 256 * 1024,
            max_request_size: 16 * 1024 * 1024,
            max_concurrent_fetches: 16,
        }
    }
}

/// One layer given to [`ChunkStore::open`].
#[derive(Clone)]
pub struct StoreLayer {
    pub index: Arc<LayerIndex>,
    /// The layer blob; `None` for a layer written whole at start-up, whose chunks are
    /// all [`ChunkSource::Local`].
    pub blob: Option<Arc<dyn BlobSource>>,
}

/// Lazily filled chunk cache of an image's layers, shared by all readers.
pub struct ChunkStore {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    layers: Vec<LayerState>,
    io: CacheIo,
    verify: bool,
    max_coalesce_gap: u64,
    max_request_size: u64,
    fetch_permits: Semaphore,
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
}

impl ChunkStore {
    /// Checks the layers' chunk tables, creates or opens their cache files and starts the
    /// cache I/O backend.
    pub fn open(layers: Vec<StoreLayer>, options: StoreOptions) -> Result<ChunkStore, StoreError> {
        cache::layers_dir(&options.cache_dir)?;

        let mut states = Vec::with_capacity(layers.len());
        let mut files = Vec::with_capacity(layers.len());
        for layer in layers {
            let index = layer.index;
            let path = cache::layer_path(&options.cache_dir, &index.digest)?;
            let table = table::build(&index, layer.blob.as_ref().map(|blob| blob.size()))?;

            let presence = Presence::new(index.chunks.len());
            let mut has_local = false;
            for (position, chunk) in index.chunks.iter().enumerate() {
                if chunk.source == ChunkSource::Local {
                    presence.insert(position);
                    has_local = true;
                }
            }
            let file = if has_local {
                cache::open_whole(&path, &index.digest, index.data_size)?
            } else {
                cache::open_lazy(&path, index.data_size)?
            };

            files.push(file);
            states.push(LayerState {
                index,
                blob: layer.blob,
                table,
                presence,
                flights: Mutex::new(HashMap::new()),
            });
        }

        let io = CacheIo::start(options.io, files)?;
        tracing::debug!(layers = states.len(), backend = io.name(), cache_dir = %options.cache_dir.display(), "chunk store opened");

        let inner = Inner {
            layers: states,
            io,
            verify: options.verify,
            max_coalesce_gap: options.max_coalesce_gap,
            max_request_size: options.max_request_size.max(1),
            fetch_permits: Semaphore::new(options.max_concurrent_fetches.max(1)),
            stats: Stats::default(),
        };
        Ok(ChunkStore {
            inner: Arc::new(inner),
        })
    }

    /// Reads `len` bytes of layer `layer`'s data space at `data_offset`; fetches,
    /// decompresses and verifies missing chunks first.
    ///
    /// Must run inside a tokio runtime: fetches run as spawned tasks, so they finish and
    /// fill the cache even if this future is dropped.
    pub async fn read(&self, layer: u32, data_offset: u64, len: u64) -> Result<Bytes, ReadError> {
        let (state, chunks) = self.inner.locate(layer, data_offset, len)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        if let Err(error) = self.inner.ensure_present(layer as usize, chunks).await {
            if !direct::is_cache_write_failure(&error) {
                return Err(error);
            }
            direct::log_cache_write_failure(&error);
            return self
                .inner
                .read_direct(layer as usize, data_offset, len)
                .await;
        }

        let cache_error = |source| ReadError::CacheIo {
            layer: state.index.digest.clone(),
            op: "read",
            offset: data_offset,
            len,
            source: Arc::new(source),
        };
        let len_usize = usize::try_from(len)
            .map_err(|_| cache_error(std::io::Error::other("the length does not fit in memory")))?;
        let bytes = self
            .inner
            .io
            .read(layer as usize, data_offset, len_usize)
            .await
            .map_err(cache_error)?;

        Stats::add(&self.inner.stats.bytes_served, len);
        Ok(bytes)
    }

    /// Fetches the chunks covering the range into the cache without returning data
    /// (prefetch, `NBD_CMD_CACHE`).
    pub async fn prefetch(&self, layer: u32, data_offset: u64, len: u64) -> Result<(), ReadError> {
        let (_, chunks) = self.inner.locate(layer, data_offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.inner.ensure_present(layer as usize, chunks).await
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.inner.stats.snapshot()
    }

    /// Name of the cache I/O backend: `"io_uring"` or `"pread/pwrite"`.
    pub fn io_backend(&self) -> &'static str {
        self.inner.io.name()
    }
}

impl Inner {
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
