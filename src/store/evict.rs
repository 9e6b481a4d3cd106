//! Listing and pruning the chunk cache directory: layers ordered by last use, skipping
//! layers a running store holds (it keeps a shared `flock(2)` on each index file).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::error::StoreError;
use super::persist::{self, Header, HEADER_LEN, RECORD_LEN};

/// One layer in the cache directory.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CachedLayer {
    /// Layer digest, `sha256:<hex>`.
    pub digest: String,
    pub data_path: PathBuf,
    /// Bytes allocated on disk by the data and index files (holes excluded).
    pub disk_bytes: u64,
    /// Size of the layer's data space (the data file's apparent size).
    pub data_size: u64,
    /// Chunks recorded in the index, and the layer's chunk count; `None` without a
    /// readable index.
    pub chunks_cached: Option<u64>,
    pub chunk_count: Option<u64>,
    /// The data file holds the whole layer (a non-lazy layer).
    pub complete: bool,
    /// Last use in seconds since the Unix epoch: from the index, else the data file's
    /// modification time.
    pub last_use: u64,
    /// A running store holds the layer.
    pub in_use: bool,
}

/// Limits of a prune.
#[derive(Clone, Debug, Default)]
pub struct PruneOptions {
    /// Remove least recently used layers until the cache takes at most this many bytes.
    pub max_size: Option<u64>,
    /// Remove every layer that is not in use.
    pub remove_unused: bool,
}

/// Result of a prune: the layers removed and the bytes freed.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PruneReport {
    pub removed: Vec<CachedLayer>,
    pub freed_bytes: u64,
    /// Bytes the cache takes on disk afterwards.
    pub remaining_bytes: u64,
}

/// Lists the layers of `cache_dir/layers`, least recently used first.
pub fn list_layers(cache_dir: &Path) -> Result<Vec<CachedLayer>, StoreError> {
    let dir = cache_dir.join("layers");
    let list_error = |source| StoreError::ListCache {
        path: dir.clone(),
        source,
    };
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(list_error(error)),
    };

    let mut layers = Vec::new();
    for entry in entries {
        let entry = entry.map_err(list_error)?;
        let name = entry.file_name();
        let Some(hex) = name
            .to_str()
            .and_then(|name| name.strip_prefix("sha256-"))
            .and_then(|name| name.strip_suffix(".data"))
        else {
            continue;
        };
        let digest = format!("sha256:{hex}");
        if super::cache::digest_hex(&digest).is_err() {
            continue;
        }
        match describe_layer(&entry.path(), digest) {
            Ok(layer) => layers.push(layer),
            // The file went away between listing and reading: another prune removed it.
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => return Err(list_error(error)),
        }
    }
    layers.sort_by(|a, b| a.last_use.cmp(&b.last_use).then(a.digest.cmp(&b.digest)));
    Ok(layers)
}

fn describe_layer(data_path: &Path, digest: String) -> io::Result<CachedLayer> {
    let data = fs::metadata(data_path)?;
    let mut layer = CachedLayer {
        digest,
        data_path: data_path.to_path_buf(),
        disk_bytes: data.blocks() * 512,
        data_size: data.len(),
        chunks_cached: None,
        chunk_count: None,
        complete: false,
        last_use: u64::try_from(data.mtime()).unwrap_or(0),
        in_use: false,
    };

    let index_path = persist::index_path(data_path);
    let index = match OpenOptions::new().read(true).open(&index_path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(layer),
        Err(error) => return Err(error),
    };
    let metadata = index.metadata()?;
    layer.disk_bytes += metadata.blocks() * 512;
    layer.in_use = is_locked(&index)?;

    let mut header_bytes = [0u8; HEADER_LEN as usize];
    if index.read_exact_at(&mut header_bytes, 0).is_err() {
        return Ok(layer);
    }
    let Some(header) = Header::decode(&header_bytes) else {
        return Ok(layer);
    };
    layer.last_use = header.last_use;
    layer.complete = header.flags & persist::FLAG_COMPLETE != 0;
    layer.chunk_count = Some(header.chunk_count);
    layer.chunks_cached = count_present(&index, &header, metadata.len());
    Ok(layer)
}

/// Counts the present records; `None` when the file length differs from what its header says.
fn count_present(index: &File, header: &Header, file_len: u64) -> Option<u64> {
    let records_len = header.chunk_count.checked_mul(RECORD_LEN)?;
    if file_len != header.file_len()? {
        return None;
    }
    let mut present = 0u64;
    let mut buffer = vec![0u8; 64 * 1024 * RECORD_LEN as usize];
    let mut offset = 0u64;
    while offset < records_len {
        let len = (records_len - offset).min(buffer.len() as u64) as usize;
        index
            .read_exact_at(&mut buffer[..len], HEADER_LEN + offset)
            .ok()?;
        present += buffer[..len]
            .chunks_exact(RECORD_LEN as usize)
            .filter(|record| record[4] == 1)
            .count() as u64;
        offset += len as u64;
    }
    Some(present)
}

/// Whether another open file description holds a lock on the index.
fn is_locked(index: &File) -> io::Result<bool> {
    match persist::lock(index, libc::LOCK_EX | libc::LOCK_NB) {
        Ok(()) => {
            persist::lock(index, libc::LOCK_UN)?;
            Ok(false)
        }
        Err(error) if error.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(true),
        Err(error) => Err(error),
    }
}

/// Removes layers not in use: all of them with `remove_unused`, else the least recently
/// used ones until the cache fits in `max_size`.
pub fn prune(cache_dir: &Path, options: &PruneOptions) -> Result<PruneReport, StoreError> {
    let layers = list_layers(cache_dir)?;
    let mut total: u64 = layers.iter().map(|layer| layer.disk_bytes).sum();
    let mut report = PruneReport::default();

    for layer in layers {
        let over_limit = options.max_size.is_some_and(|max| total > max);
        if !(options.remove_unused || over_limit) {
            continue;
        }
        if layer.in_use {
            tracing::debug!(layer = %layer.digest, "layer is in use, not pruning it");
            continue;
        }
        if !remove_layer(&layer)? {
            continue;
        }
        tracing::info!(layer = %layer.digest, bytes = layer.disk_bytes, last_use = layer.last_use, "removed layer from the cache");
        total = total.saturating_sub(layer.disk_bytes);
        report.freed_bytes += layer.disk_bytes;
        report.removed.push(layer);
    }
    report.remaining_bytes = total;
    Ok(report)
}

/// Deletes a layer's data and index files under an exclusive lock on the index, so a
/// store that opened the layer meanwhile keeps it. Returns false when it was in use.
fn remove_layer(layer: &CachedLayer) -> Result<bool, StoreError> {
    let index_path = persist::index_path(&layer.data_path);
    let remove_error = |path: &Path, source| StoreError::RemoveCacheFile {
        path: path.to_path_buf(),
        source,
    };
    let lock = match OpenOptions::new().read(true).open(&index_path) {
        Ok(file) => match persist::lock(&file, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => Some(file),
            Err(error) if error.raw_os_error() == Some(libc::EWOULDBLOCK) => return Ok(false),
            Err(error) => return Err(remove_error(&index_path, error)),
        },
        Err(error) if error.kind() == io::ErrorKind::NotFound => None,
        Err(error) => return Err(remove_error(&index_path, error)),
    };

    // The data file goes first: an index without data file is rebuilt on the next open,
    // while a data file without index is never reused.
    for path in [&layer.data_path, &index_path] {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(remove_error(path, error)),
        }
    }
    drop(lock);
    Ok(true)
}
