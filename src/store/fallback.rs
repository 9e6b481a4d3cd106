//! Cache file I/O with `pread(2)`/`pwrite(2)` on tokio's blocking thread pool, used where
//! io_uring is unavailable or not chosen.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;

pub(crate) struct StdBackend {
    files: Arc<Vec<File>>,
}

impl StdBackend {
    pub(crate) fn new(files: Vec<File>) -> StdBackend {
        StdBackend {
            files: Arc::new(files),
        }
    }

    /// Reads exactly `len` bytes of file `file` at `offset`.
    pub(crate) async fn read(&self, file: usize, offset: u64, len: usize) -> io::Result<Bytes> {
        let files = Arc::clone(&self.files);
        run_blocking(move || {
            let handle = files.get(file).ok_or_else(|| unknown_file(file))?;
            let mut buffer = vec![0u8; len];
            handle.read_exact_at(&mut buffer, offset)?;
            Ok(Bytes::from(buffer))
        })
        .await
    }

    /// Writes all of `data` to file `file` at `offset`.
    pub(crate) async fn write(&self, file: usize, offset: u64, data: Bytes) -> io::Result<()> {
        let files = Arc::clone(&self.files);
        run_blocking(move || {
            let handle = files.get(file).ok_or_else(|| unknown_file(file))?;
            handle.write_all_at(&data, offset)
        })
        .await
    }
}

async fn run_blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| io::Error::other(format!("cache I/O task failed: {error}")))?
}

fn unknown_file(file: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("no cache file with index {file}"),
    )
}
