//! Choice of the cache I/O backend (io_uring or pread/pwrite), probed and logged once
//! per process.

use std::fs::File;
use std::io;
use std::sync::OnceLock;

use bytes::Bytes;

use super::error::StoreError;
use super::fallback::StdBackend;
use super::uring::{self, UringBackend};
use super::IoBackendChoice;

pub(crate) const URING_NAME: &str = "io_uring";
pub(crate) const STD_NAME: &str = "pread/pwrite";

pub(crate) enum CacheIo {
    Uring(UringBackend),
    Std(StdBackend),
}

/// Returns the io_uring probe result, computed on first use, with the failure reason as `Err`.
fn probe_once() -> &'static Result<(), String> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE.get_or_init(|| {
        let result = uring::probe().map_err(|error| format!("io_uring_setup failed: {error}"));
        match &result {
            Ok(()) => tracing::debug!("io_uring is available for the chunk cache"),
            Err(reason) => tracing::info!(%reason, "io_uring is unavailable, the chunk cache uses pread/pwrite"),
        }
        result
    })
}

impl CacheIo {
    /// Starts the backend for `choice` over `files` (indexed by layer).
    pub(crate) fn start(choice: IoBackendChoice, files: Vec<File>) -> Result<CacheIo, StoreError> {
        match choice {
            IoBackendChoice::Std => Ok(CacheIo::Std(StdBackend::new(files))),
            IoBackendChoice::Uring => {
                probe_once()
                    .clone()
                    .map_err(|reason| StoreError::UringUnavailable { reason })?;
                Ok(CacheIo::Uring(UringBackend::start(files)?))
            }
            IoBackendChoice::Auto => {
                if probe_once().is_err() {
                    return Ok(CacheIo::Std(StdBackend::new(files)));
                }
                let clones = files
                    .iter()
                    .map(File::try_clone)
                    .collect::<io::Result<Vec<_>>>();
                let started = clones
                    .map_err(|error| StoreError::StartUring {
                        reason: format!("failed to duplicate a cache file: {error}"),
                    })
                    .and_then(UringBackend::start);
                match started {
                    Ok(backend) => Ok(CacheIo::Uring(backend)),
                    Err(error) => {
                        tracing::info!(%error, "io_uring passed the probe but failed to start, the chunk cache uses pread/pwrite");
                        Ok(CacheIo::Std(StdBackend::new(files)))
                    }
                }
            }
        }
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            CacheIo::Uring(_) => URING_NAME,
            CacheIo::Std(_) => STD_NAME,
        }
    }

    pub(crate) async fn read(&self, file: usize, offset: u64, len: usize) -> io::Result<Bytes> {
        match self {
            CacheIo::Uring(backend) => backend.read(file, offset, len).await,
            CacheIo::Std(backend) => backend.read(file, offset, len).await,
        }
    }

    pub(crate) async fn write(&self, file: usize, offset: u64, data: Bytes) -> io::Result<()> {
        match self {
            CacheIo::Uring(backend) => backend.write(file, offset, data).await,
            CacheIo::Std(backend) => backend.write(file, offset, data).await,
        }
    }
}
