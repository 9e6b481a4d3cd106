//! The on-disk chunk cache: one sparse file per layer, `layers/sha256-<hex>.data`, and
//! the in-memory bitmap of the chunks that are present in it.

use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::error::StoreError;

const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;

/// Checks that `digest` is `sha256:<64 lowercase hex>` and returns the hex part.
pub(crate) fn digest_hex(digest: &str) -> Result<&str, StoreError> {
    let invalid = || StoreError::InvalidDigest {
        digest: digest.to_string(),
    };
    let hex = digest.strip_prefix("sha256:").ok_or_else(invalid)?;
    let valid = hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !valid {
        return Err(invalid());
    }
    Ok(hex)
}

/// Creates `cache_dir/layers` (mode 0700 for each directory it creates) and returns it.
pub(crate) fn layers_dir(cache_dir: &Path) -> Result<PathBuf, StoreError> {
    let dir = cache_dir.join("layers");
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(&dir)
        .map_err(|source| StoreError::CreateCacheDir {
            path: dir.clone(),
            source,
        })?;
    Ok(dir)
}

/// Path of a layer's cache file; the digest is validated so it cannot escape the directory.
pub(crate) fn layer_path(cache_dir: &Path, layer_digest: &str) -> Result<PathBuf, StoreError> {
    let hex = digest_hex(layer_digest)?;
    Ok(cache_dir.join("layers").join(format!("sha256-{hex}.data")))
}

/// Opens (creating if missing) the cache file of a lazily fetched layer, mode 0600, sized to
/// `data_size`. Holes read as zeros, but the presence bitmap keeps them from being served.
pub(crate) fn open_lazy(path: &Path, data_size: u64) -> Result<File, StoreError> {
    let open_error = |source| StoreError::OpenCacheFile {
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
    file.set_permissions(Permissions::from_mode(FILE_MODE))
        .map_err(open_error)?;

    let len = file.metadata().map_err(open_error)?.len();
    if len != data_size {
        file.set_len(data_size)
            .map_err(|source| StoreError::ResizeCacheFile {
                path: path.to_path_buf(),
                size: data_size,
                source,
            })?;
    }
    Ok(file)
}

/// Opens the cache file of a layer that [`WholeLayerWriter`] wrote completely.
pub(crate) fn open_whole(path: &Path, layer: &str, data_size: u64) -> Result<File, StoreError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| StoreError::OpenCacheFile {
            path: path.to_path_buf(),
            source,
        })?;
    let actual = file
        .metadata()
        .map_err(|source| StoreError::OpenCacheFile {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    if actual != data_size {
        return Err(StoreError::WholeLayerNotCached {
            layer: layer.to_string(),
            path: path.to_path_buf(),
            expected: data_size,
            actual,
        });
    }
    Ok(file)
}

/// One bit per chunk of a layer.
///
/// The store keeps two: chunks whose bytes in the cache file were written or checked in
/// this process (cleared only when a read finds a changed block), and chunks an earlier
/// run recorded in the index file whose checksum was not checked yet (cleared when
/// checked).
pub(crate) struct Presence {
    words: Vec<AtomicU64>,
}

impl Presence {
    pub(crate) fn new(chunks: usize) -> Presence {
        Presence {
            words: (0..chunks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    pub(crate) fn contains(&self, chunk: usize) -> bool {
        self.words
            .get(chunk / 64)
            .is_some_and(|word| word.load(Ordering::Acquire) & (1 << (chunk % 64)) != 0)
    }

    /// Sets a chunk's bit; returns whether it was clear before.
    pub(crate) fn insert(&self, chunk: usize) -> bool {
        let bit = 1 << (chunk % 64);
        self.words
            .get(chunk / 64)
            .is_some_and(|word| word.fetch_or(bit, Ordering::AcqRel) & bit == 0)
    }

    /// Clears a chunk's bit; returns whether it was set.
    pub(crate) fn remove(&self, chunk: usize) -> bool {
        let bit = 1 << (chunk % 64);
        self.words
            .get(chunk / 64)
            .is_some_and(|word| word.fetch_and(!bit, Ordering::AcqRel) & bit != 0)
    }

    /// Number of chunks set.
    pub(crate) fn count(&self) -> usize {
        self.words
            .iter()
            .map(|word| word.load(Ordering::Acquire).count_ones() as usize)
            .sum()
    }
}

/// Writes a whole (non-lazy) layer's data space into its cache file at start-up.
///
/// The data goes to `<name>.partial` first and is renamed into place by [`finish`], so a
/// crash never leaves a cache file that looks complete.
///
/// [`finish`]: WholeLayerWriter::finish
pub struct WholeLayerWriter {
    file: File,
    partial_path: PathBuf,
    final_path: PathBuf,
    layer: String,
    data_size: u64,
    /// Set once the file was renamed into place; until then dropping the writer removes
    /// the partial file.
    finished: bool,
}

impl Drop for WholeLayerWriter {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let Err(error) = fs::remove_file(&self.partial_path) {
            tracing::debug!(path = %self.partial_path.display(), %error, "failed to remove an unfinished whole-layer cache file");
        }
    }
}

impl WholeLayerWriter {
    /// Creates the partial cache file of `layer_digest`, sized to `data_size`.
    pub fn create(
        cache_dir: &Path,
        layer_digest: &str,
        data_size: u64,
    ) -> Result<Self, StoreError> {
        layers_dir(cache_dir)?;
        let final_path = layer_path(cache_dir, layer_digest)?;
        let mut partial_path = final_path.clone().into_os_string();
        partial_path.push(".partial");
        let partial_path = PathBuf::from(partial_path);

        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(FILE_MODE)
            .open(&partial_path)
            .map_err(|source| StoreError::OpenCacheFile {
                path: partial_path.clone(),
                source,
            })?;
        file.set_permissions(Permissions::from_mode(FILE_MODE))
            .map_err(|source| StoreError::OpenCacheFile {
                path: partial_path.clone(),
                source,
            })?;
        file.set_len(data_size)
            .map_err(|source| StoreError::ResizeCacheFile {
                path: partial_path.clone(),
                size: data_size,
                source,
            })?;

        Ok(WholeLayerWriter {
            file,
            partial_path,
            final_path,
            layer: layer_digest.to_string(),
            data_size,
            finished: false,
        })
    }

    /// Creates the partial cache file of `layer_digest` when its data size is
    /// only known after the whole tar was read; [`finish_with_size`] sets it.
    ///
    /// [`finish_with_size`]: WholeLayerWriter::finish_with_size
    pub fn create_growable(cache_dir: &Path, layer_digest: &str) -> Result<Self, StoreError> {
        let mut writer = Self::create(cache_dir, layer_digest, 0)?;
        writer.data_size = u64::MAX;
        Ok(writer)
    }

    /// Sets the file length to `data_size`, then does what [`finish`] does.
    ///
    /// [`finish`]: WholeLayerWriter::finish
    pub fn finish_with_size(self, data_size: u64) -> Result<(), StoreError> {
        self.file
            .set_len(data_size)
            .map_err(|source| StoreError::ResizeCacheFile {
                path: self.partial_path.clone(),
                size: data_size,
                source,
            })?;
        self.finish()
    }

    /// Writes `bytes` at `data_offset`; the range must lie within the data size.
    pub fn write_at(&mut self, data_offset: u64, bytes: &[u8]) -> io::Result<()> {
        let end = data_offset.checked_add(bytes.len() as u64);
        if end.is_none_or(|end| end > self.data_size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                StoreError::WholeLayerOutOfRange {
                    layer: self.layer.clone(),
                    offset: data_offset,
                    len: bytes.len() as u64,
                    data_size: self.data_size,
                },
            ));
        }
        self.file.write_all_at(bytes, data_offset)
    }

    /// Flushes the file to disk and renames it to the layer's cache file.
    pub fn finish(mut self) -> Result<(), StoreError> {
        let finish_error = |source| StoreError::FinishCacheFile {
            path: self.partial_path.clone(),
            source,
        };
        self.file.sync_all().map_err(finish_error)?;
        fs::rename(&self.partial_path, &self.final_path).map_err(finish_error)?;
        self.finished = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_validation() {
        let good = format!("sha256:{}", "ab".repeat(32));
        let cases: &[(&str, bool)] = &[
            (&good, true),
            ("sha256:", false),
            ("sha512:abcd", false),
            (&good[..good.len() - 1], false),
            (
                "sha256:../../../../../../../../../../../../../../../../etc/passwd0123456789",
                false,
            ),
            (&format!("sha256:{}", "AB".repeat(32)), false),
            (&format!("{good}/x"), false),
        ];
        for (digest, valid) in cases {
            assert_eq!(digest_hex(digest).is_ok(), *valid, "digest {digest:?}");
        }
    }

    #[test]
    fn presence_bits() {
        let presence = Presence::new(130);
        for chunk in [0, 63, 64, 129] {
            assert!(!presence.contains(chunk));
            presence.insert(chunk);
            assert!(presence.contains(chunk), "chunk {chunk}");
        }
        assert!(!presence.contains(1));
        assert!(!presence.contains(128));
        assert!(
            !presence.contains(130),
            "a chunk past the end is never present"
        );
        presence.insert(500);
    }

    #[test]
    fn whole_layer_writer_bounds_and_rename() {
        let dir = tempfile::tempdir().expect("tempdir");
        let digest = format!("sha256:{}", "0f".repeat(32));
        let mut writer = WholeLayerWriter::create(dir.path(), &digest, 10).expect("create");
        writer.write_at(0, b"hello").expect("write inside");
        writer.write_at(5, b"world").expect("write to the end");
        assert!(writer.write_at(6, b"toolong").is_err());
        assert!(writer.write_at(u64::MAX, b"x").is_err());
        writer.finish().expect("finish");

        let path = layer_path(dir.path(), &digest).expect("path");
        assert_eq!(fs::read(&path).expect("read"), b"helloworld");
        assert_eq!(
            fs::metadata(&path).expect("stat").permissions().mode() & 0o777,
            0o600
        );
        assert!(open_whole(&path, &digest, 10).is_ok());
        assert!(matches!(
            open_whole(&path, &digest, 11),
            Err(StoreError::WholeLayerNotCached { .. })
        ));
    }
}
