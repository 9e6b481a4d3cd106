//! Block-granular (4 KiB) copy-on-write overlay that makes an image disk writable without touching the shared chunk cache.
//!
//! [`OverlayDisk`] wraps any [`BlockDevice`](crate::device::BlockDevice):
//! reads take overlay blocks first, then the wrapped device; writes, trims
//! and zeroing go to an [`Overlay`] file only. The file layout and its
//! crash-safety rules are described in [`format`](mod@format) and on [`Overlay`].

mod disk;
pub mod file;
pub mod format;
pub mod map;

use std::io;
use std::path::PathBuf;

pub use disk::OverlayDisk;
pub use file::Overlay;
pub use format::{HeaderError, Identity};
pub use map::BlockState;

/// Failures to open an overlay.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("failed to {step} {path}: {source}")]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("overlay {path} is not a regular file; give a file path for --overlay")]
    NotAFile { path: PathBuf },

    #[error("overlay {path} is in use by another process (it holds the file lock); stop that server or use another --overlay path")]
    InUse { path: PathBuf },

    #[error("{path} is not a valid esgz-nbd overlay: {source}; give a new path for --overlay or remove the file")]
    Header {
        path: PathBuf,
        #[source]
        source: HeaderError,
    },

    #[error("overlay {path} has format version {found}, written by an earlier esgz-nbd without data checksums; this version reads only format version 2. Serve it with the earlier esgz-nbd and copy the data out, or give a new path for --overlay")]
    OldVersion { path: PathBuf, found: u32 },

    #[error(
        "overlay {path} does not match this image: {reason}. The overlay records image \
         {recorded_manifest} with a {recorded_size}-byte disk, but this serve has image \
         {expected_manifest} with a {expected_size}-byte disk; use another --overlay path, \
         or serve the image and --size the overlay was made with"
    )]
    IdentityMismatch {
        path: PathBuf,
        reason: &'static str,
        recorded_manifest: String,
        recorded_size: u64,
        expected_manifest: String,
        expected_size: u64,
    },

    #[error("overlay {path} has a map record at byte {offset} for blocks {start}+{count}, past the {device_blocks}-block device; the overlay is corrupt")]
    RecordOutOfRange {
        path: PathBuf,
        offset: u64,
        start: u64,
        count: u64,
        device_blocks: u64,
    },
}

#[cfg(test)]
mod tests;
