//! The fallback directory for whole (non-eStargz) layers when the cache directory cannot
//! hold them: a private temporary directory under `$TMPDIR` (or `/tmp`), shared by all
//! whole layers of one image and removed once the chunk store has opened their files.

use std::io;
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::Context;

/// The temporary directory for whole layers, created on first use.
#[derive(Default)]
pub struct WholeLayerFallback {
    dir: Mutex<Option<tempfile::TempDir>>,
}

impl WholeLayerFallback {
    /// Returns the temporary directory, creating it (mode 0700) on the first call.
    pub fn dir(&self) -> anyhow::Result<PathBuf> {
        let mut dir = self.dir.lock().unwrap_or_else(|error| error.into_inner());
        if let Some(dir) = dir.as_ref() {
            return Ok(dir.path().to_path_buf());
        }
        let parent = std::env::temp_dir();
        let created = tempfile::Builder::new()
            .prefix("esgz-nbd-whole-")
            .tempdir_in(&parent)
            .with_context(|| {
                format!(
                    "failed to create a temporary directory in {} for whole layers; set TMPDIR to a writable directory",
                    parent.display()
                )
            })?;
        let path = created.path().to_path_buf();
        *dir = Some(created);
        Ok(path)
    }

    /// Removes the temporary directory, if one was created. Files the chunk store opened
    /// in it stay readable through their open descriptors until the store is dropped.
    pub fn remove(&self) {
        let created = self
            .dir
            .lock()
            .unwrap_or_else(|error| error.into_inner())
            .take();
        if let Some(dir) = created {
            let path = dir.path().to_path_buf();
            if let Err(error) = dir.close() {
                tracing::warn!(dir = %path.display(), %error, "failed to remove the temporary directory of whole layers");
            }
        }
    }
}

/// Returns whether `error` was caused by a cache directory that is full or read-only
/// (or not writable by this user): ENOSPC, EDQUOT, EROFS, EACCES or EPERM.
pub fn is_unusable_cache(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(is_full_or_read_only)
    })
}

fn is_full_or_read_only(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::ENOSPC | libc::EDQUOT | libc::EROFS | libc::EACCES | libc::EPERM)
    ) || matches!(
        error.kind(),
        io::ErrorKind::StorageFull
            | io::ErrorKind::QuotaExceeded
            | io::ErrorKind::ReadOnlyFilesystem
            | io::ErrorKind::PermissionDenied
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_cache_errors() {
        type Case = (&'static str, fn() -> io::Error, bool);
        let cases: &[Case] = &[
            (
                "read-only",
                || io::Error::from_raw_os_error(libc::EROFS),
                true,
            ),
            ("full", || io::Error::from_raw_os_error(libc::ENOSPC), true),
            ("quota", || io::Error::from_raw_os_error(libc::EDQUOT), true),
            (
                "permission",
                || io::Error::from_raw_os_error(libc::EACCES),
                true,
            ),
            (
                "kind without errno",
                || io::Error::new(io::ErrorKind::ReadOnlyFilesystem, "/cache: read-only"),
                true,
            ),
            (
                "not found",
                || io::Error::from_raw_os_error(libc::ENOENT),
                false,
            ),
            (
                "I/O error",
                || io::Error::from_raw_os_error(libc::EIO),
                false,
            ),
        ];
        for (name, make, expected) in cases {
            let error = anyhow::Error::new(make()).context("unpacking a layer");
            assert_eq!(is_unusable_cache(&error), *expected, "case {name}");
        }
        let no_io = anyhow::anyhow!("the tar is invalid").context("unpacking a layer");
        assert!(!is_unusable_cache(&no_io), "an error without an I/O cause");
    }
}
