//! The block device abstraction the NBD server exports.

use std::future::Future;
use std::io;

use bytes::Bytes;

/// A read-only block device of fixed size.
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
}
