//! Downloading the blob of a whole (non-eStargz) layer into a temporary file with its
//! sha256 checked, and opening the tar inside it (gzip or uncompressed). Used at start-up
//! to unpack the layer and while serving to repair its cache file.

use std::fs::File;
use std::future::Future;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use sha2::{Digest, Sha256};

/// Size of each ranged read while a whole layer's blob is downloaded.
pub(crate) const WHOLE_LAYER_READ_SIZE: u64 = 8 << 20;

/// A failed download of a whole layer's blob.
#[derive(Debug, thiserror::Error)]
pub enum WholeDownloadError {
    #[error("unsupported digest algorithm in {digest}: expected sha256:<hex>")]
    UnsupportedDigest { digest: String },

    #[error("failed to create a temporary file in {}: {source}", dir.display())]
    CreateTemporary { dir: PathBuf, source: io::Error },

    #[error("failed to write the downloaded layer {digest} to a temporary file: {source}")]
    WriteTemporary { digest: String, source: io::Error },

    #[error("failed to fetch layer {digest} at offset {offset:#x}: {error:#}")]
    Fetch {
        digest: String,
        offset: u64,
        error: anyhow::Error,
    },

    #[error("the source returned {actual} bytes for the {expected}-byte range at offset {offset:#x} of layer {digest}")]
    ShortRange {
        digest: String,
        offset: u64,
        expected: u64,
        actual: u64,
    },

    #[error(
        "layer {digest} does not match its digest: the fetched blob hashes to sha256:{actual}"
    )]
    DigestMismatch { digest: String, actual: String },
}

impl WholeDownloadError {
    /// Returns whether the download failed on the local file (creating or writing the
    /// temporary file), so another directory may succeed.
    pub(crate) fn is_local(&self) -> bool {
        matches!(
            self,
            WholeDownloadError::CreateTemporary { .. } | WholeDownloadError::WriteTemporary { .. }
        )
    }
}

/// Downloads the `size`-byte blob `digest` into an unnamed temporary file in `dir`, in
/// reads of [`WHOLE_LAYER_READ_SIZE`] made by `read_range(offset, len)`, and checks its
/// sha256. The returned file is positioned at its start.
pub async fn download_verified<F, Fut>(
    digest: &str,
    size: u64,
    dir: &Path,
    mut read_range: F,
) -> Result<File, WholeDownloadError>
where
    F: FnMut(u64, u64) -> Fut,
    Fut: Future<Output = anyhow::Result<Bytes>>,
{
    let expected =
        digest
            .strip_prefix("sha256:")
            .ok_or_else(|| WholeDownloadError::UnsupportedDigest {
                digest: digest.to_string(),
            })?;
    let write_error = |source| WholeDownloadError::WriteTemporary {
        digest: digest.to_string(),
        source,
    };
    let mut download =
        tempfile::tempfile_in(dir).map_err(|source| WholeDownloadError::CreateTemporary {
            dir: dir.to_path_buf(),
            source,
        })?;

    let mut hasher = Sha256::new();
    let mut offset = 0;
    while offset < size {
        let len = (size - offset).min(WHOLE_LAYER_READ_SIZE);
        let bytes = read_range(offset, len)
            .await
            .map_err(|error| WholeDownloadError::Fetch {
                digest: digest.to_string(),
                offset,
                error,
            })?;
        if bytes.len() as u64 != len {
            return Err(WholeDownloadError::ShortRange {
                digest: digest.to_string(),
                offset,
                expected: len,
                actual: bytes.len() as u64,
            });
        }
        hasher.update(&bytes);
        download.write_all(&bytes).map_err(write_error)?;
        offset += len;
    }

    let actual = hex::encode(hasher.finalize());
    if actual != expected {
        return Err(WholeDownloadError::DigestMismatch {
            digest: digest.to_string(),
            actual,
        });
    }
    download.seek(SeekFrom::Start(0)).map_err(write_error)?;
    Ok(download)
}

/// Returns a reader of the tar in a downloaded layer blob: gunzipped when the blob starts
/// with the gzip magic, as is otherwise. A zstd blob is rejected.
pub fn layer_tar_reader(mut download: File, digest: &str) -> anyhow::Result<Box<dyn Read + Send>> {
    download.seek(SeekFrom::Start(0))?;
    let mut magic = [0u8; 4];
    let magic_len = read_up_to(&mut download, &mut magic)?;
    download.seek(SeekFrom::Start(0))?;
    let buffered = io::BufReader::new(download);
    match &magic[..magic_len] {
        [0x1f, 0x8b, ..] => Ok(Box::new(flate2::read::MultiGzDecoder::new(buffered))),
        [0x28, 0xb5, 0x2f, 0xfd] => anyhow::bail!(
            "layer {digest} is zstd-compressed, which esgz-nbd does not read yet; convert the image to eStargz"
        ),
        _ => Ok(Box::new(buffered)),
    }
}

fn read_up_to(file: &mut File, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match file.read(&mut buffer[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}
