//! The disk an attached device serves: the read-only image, or the image's
//! writable layout under a copy-on-write overlay file.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tracing::info;

use super::AttachError;
use crate::access::AccessRecorder;
use crate::device::BlockDevice;
use crate::disk::{writable_layout, ImageDisk};
use crate::image::OpenedImage;
use crate::overlay::{Identity, Overlay, OverlayDisk};
use crate::store::ChunkStore;

/// Free space added to a writable filesystem when `--size` is not given.
pub const DEFAULT_WRITABLE_SIZE: u64 = 1 << 30;

/// Settings of a writable attach, besides the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WritableSettings {
    /// Free space added to the filesystem, in bytes [default: 1 GiB].
    pub size: Option<u64>,
    /// The overlay file, or `None` for a temporary one in the temp directory.
    pub overlay: Option<PathBuf>,
    /// Whether `overlay` is a temporary overlay that an earlier server of the
    /// same device created (a reattach reopens it and removes it at detach).
    pub overlay_temporary: bool,
}

impl WritableSettings {
    /// Returns the free space added to the filesystem, in bytes.
    pub fn added_bytes(&self) -> u64 {
        self.size.unwrap_or(DEFAULT_WRITABLE_SIZE)
    }
}

/// The device behind the NBD sockets of one attached image.
pub enum AttachDisk {
    ReadOnly(ImageDisk),
    Writable(OverlayDisk<ImageDisk>),
}

impl AttachDisk {
    /// Builds the disk of `image`: read-only without `writable`, else the
    /// writable layout under the overlay that `writable` names. Reads are
    /// reported to `recorder`, if any.
    pub fn open(
        image: &OpenedImage,
        writable: Option<&WritableSettings>,
        recorder: Option<Arc<AccessRecorder>>,
    ) -> Result<AttachDisk, AttachError> {
        let Some(writable) = writable else {
            return Ok(AttachDisk::ReadOnly(
                ImageDisk::new(image).with_recorder(recorder),
            ));
        };
        let layout = writable_layout(image, writable.added_bytes()).map_err(|error| {
            AttachError::OpenOverlay {
                message: format!("failed to lay out the writable ext4 filesystem: {error}"),
            }
        })?;
        let layout = Arc::new(layout);
        let identity = Identity {
            manifest_digest: image.manifest_digest.clone(),
            device_size: layout.size(),
            layout_digest: layout.fingerprint(),
        };
        let overlay = match &writable.overlay {
            Some(path) => Overlay::open(path, &identity),
            None => Overlay::temporary(&std::env::temp_dir(), &identity),
        }
        .map_err(|error| AttachError::OpenOverlay {
            message: error.to_string(),
        })?;
        info!(
            overlay = %overlay.path().display(),
            temporary = writable.overlay.is_none() || writable.overlay_temporary,
            device_bytes = layout.size(),
            added_bytes = writable.added_bytes(),
            "attaching writable: writes go to the overlay"
        );
        let base = Arc::new(ImageDisk::with_layout(image, layout).with_recorder(recorder));
        let disk = OverlayDisk::new(base, overlay).map_err(|error| AttachError::OpenOverlay {
            message: error.to_string(),
        })?;
        Ok(AttachDisk::Writable(disk))
    }

    pub fn store(&self) -> &Arc<ChunkStore> {
        match self {
            AttachDisk::ReadOnly(disk) => disk.store(),
            AttachDisk::Writable(disk) => disk.base().store(),
        }
    }

    /// Path of the overlay file of a writable disk.
    pub fn overlay_path(&self) -> Option<&Path> {
        match self {
            AttachDisk::ReadOnly(_) => None,
            AttachDisk::Writable(disk) => Some(disk.overlay().path()),
        }
    }
}

/// Returns the `NBD_ATTR_BACKEND_IDENTIFIER` of an image, which the kernel
/// compares on reconfigure. A writable device adds a digest of its overlay
/// path, so a reattach with another overlay is rejected by the kernel.
pub fn backend_identifier(manifest_digest: &str, overlay: Option<&Path>) -> String {
    match overlay {
        None => format!("esgz-nbd:{manifest_digest}"),
        Some(path) => {
            let digest = Sha256::digest(path.as_os_str().as_encoded_bytes());
            format!(
                "esgz-nbd:{manifest_digest}:rw:{}",
                hex::encode(&digest[..8])
            )
        }
    }
}

/// Removes a temporary overlay file and its private directory. A missing
/// file or directory counts as removed.
pub fn remove_temporary_overlay(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    let Some(dir) = path.parent() else {
        return Ok(());
    };
    let named_by_us = dir
        .file_name()
        .and_then(|name| name.to_str())
        .is_some_and(|name| name.starts_with("esgz-nbd-overlay-"));
    if !named_by_us {
        return Ok(());
    }
    match std::fs::remove_dir(dir) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

impl BlockDevice for AttachDisk {
    fn size(&self) -> u64 {
        match self {
            AttachDisk::ReadOnly(disk) => disk.size(),
            AttachDisk::Writable(disk) => disk.size(),
        }
    }

    async fn read(&self, offset: u64, len: u32) -> io::Result<Bytes> {
        match self {
            AttachDisk::ReadOnly(disk) => disk.read(offset, len).await,
            AttachDisk::Writable(disk) => disk.read(offset, len).await,
        }
    }

    async fn prefetch(&self, offset: u64, len: u32) -> io::Result<()> {
        match self {
            AttachDisk::ReadOnly(disk) => disk.prefetch(offset, len).await,
            AttachDisk::Writable(disk) => disk.prefetch(offset, len).await,
        }
    }

    fn is_writable(&self) -> bool {
        match self {
            AttachDisk::ReadOnly(disk) => disk.is_writable(),
            AttachDisk::Writable(disk) => disk.is_writable(),
        }
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> io::Result<()> {
        match self {
            AttachDisk::ReadOnly(disk) => disk.write(offset, data, fua).await,
            AttachDisk::Writable(disk) => disk.write(offset, data, fua).await,
        }
    }

    async fn flush(&self) -> io::Result<()> {
        match self {
            AttachDisk::ReadOnly(disk) => disk.flush().await,
            AttachDisk::Writable(disk) => disk.flush().await,
        }
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> io::Result<()> {
        match self {
            AttachDisk::ReadOnly(disk) => disk.trim(offset, len, fua).await,
            AttachDisk::Writable(disk) => disk.trim(offset, len, fua).await,
        }
    }

    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> io::Result<()> {
        match self {
            AttachDisk::ReadOnly(disk) => disk.write_zeroes(offset, len, fua).await,
            AttachDisk::Writable(disk) => disk.write_zeroes(offset, len, fua).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_identifier_cases() {
        let digest = "sha256:abc";
        let read_only = backend_identifier(digest, None);
        let first = backend_identifier(digest, Some(Path::new("/data/a.img")));
        let same = backend_identifier(digest, Some(Path::new("/data/a.img")));
        let other = backend_identifier(digest, Some(Path::new("/data/b.img")));
        assert_eq!(read_only, "esgz-nbd:sha256:abc");
        assert!(first.starts_with("esgz-nbd:sha256:abc:rw:"), "{first}");
        assert_eq!(first, same);
        assert_ne!(first, other);
        assert_ne!(first, read_only);
    }

    #[test]
    fn remove_temporary_overlay_cases() {
        let parent = tempfile::tempdir().expect("tempdir");
        let private = parent.path().join("esgz-nbd-overlay-x1");
        std::fs::create_dir(&private).expect("mkdir");
        let file = private.join("overlay");
        std::fs::write(&file, b"x").expect("write");
        remove_temporary_overlay(&file).expect("remove");
        assert!(!file.exists());
        assert!(!private.exists());
        // Already gone: still fine.
        remove_temporary_overlay(&file).expect("remove again");

        // A directory this program did not name stays.
        let foreign = parent.path().join("mine");
        std::fs::create_dir(&foreign).expect("mkdir");
        let file = foreign.join("overlay");
        std::fs::write(&file, b"x").expect("write");
        remove_temporary_overlay(&file).expect("remove");
        assert!(!file.exists());
        assert!(foreign.exists());
    }
}
