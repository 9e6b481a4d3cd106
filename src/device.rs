//! The block device abstraction the NBD server exports.

use std::future::Future;
use std::io;

use bytes::Bytes;

/// A block device of fixed size, read-only unless it overrides the write
/// methods and [`BlockDevice::is_writable`].
///
/// Reads may run concurrently; a failed read returns an error for that range
/// only and the device keeps serving other ranges.
pub trait BlockDevice: Send + Sync + 'static {
    /// Size of the device in bytes, a multiple of 4096.
    fn size(&self) -> u64;

    /// Reads `len` bytes at `offset`; the range lies within `size()`.
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = io::Result<Bytes>> + Send;

    /// Hints that the range will be read soon (`NBD_CMD_CACHE`).
    fn prefetch(&self, offset: u64, len: u32) -> impl Future<Output = io::Result<()>> + Send {
        let _ = (offset, len);
        async { Ok(()) }
    }

    /// Whether [`write`](BlockDevice::write), [`trim`](BlockDevice::trim) and
    /// [`write_zeroes`](BlockDevice::write_zeroes) can succeed.
    fn is_writable(&self) -> bool {
        false
    }

    /// Writes `data` at `offset`; the range lies within `size()`. With `fua`
    /// the data is durable when the future completes.
    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send {
        let _ = (offset, data, fua);
        async { Err(read_only_error("write")) }
    }

    /// Makes every write completed before this call durable.
    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send {
        async { Ok(()) }
    }

    /// Discards `len` bytes at `offset`: later reads of whole discarded blocks
    /// return zeros. Partial blocks at the edges may keep their content.
    fn trim(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send {
        let _ = (offset, len, fua);
        async { Err(read_only_error("trim")) }
    }

    /// Sets `len` bytes at `offset` to zero.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send {
        let _ = (offset, len, fua);
        async { Err(read_only_error("write zeroes")) }
    }
}

/// The error the default write methods return.
pub fn read_only_error(operation: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::ReadOnlyFilesystem,
        format!(
            "{operation} failed: the device is read-only (serve with --writable to accept writes)"
        ),
    )
}
