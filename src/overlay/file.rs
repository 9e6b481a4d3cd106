//! The overlay file: creation, identity check, exclusive lock, map log replay, block I/O and the two-step durable flush.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tracing::{debug, info, warn};

use super::format::{
    self, decode_header, decode_record, encode_header, encode_record, Identity, Record, BLOCK_SIZE,
    HEADER_SIZE, RECORD_SIZE,
};
use super::map::{BlockState, RangeMap, Run};
use super::OverlayError;

/// Bytes of map log read per step during replay.
const REPLAY_CHUNK: usize = 1 << 20;

/// A copy-on-write overlay file for one device.
///
/// Block N of the device lives at byte `HEADER_SIZE + N * 4096` of the file,
/// so the data area is sparse and needs no slot allocation. The map records
/// which blocks hold data and which read as zeros. It is persisted as an
/// append-only log of records after the data area.
///
/// Durability has two levels:
///
/// - A write or zeroing survives the death of this process as soon as it
///   returns: its data is in the file, and a block whose state changes gets
///   its map record appended to the log (without a sync) before the call
///   returns. A server killed with SIGKILL therefore loses nothing it
///   acknowledged, which `attach --reattach` relies on: the kernel keeps a
///   filesystem mounted across the restart and trusts every completed write.
/// - [`Overlay::flush`] `fdatasync`s the file, so everything completed before
///   it also survives a power loss or a kernel crash.
///
/// After a power loss, records appended since the last flush may or may not
/// be on disk, and their data may be missing while the record is there, so
/// those blocks read as their old state, their new data or zeros. That is the
/// contract of a volatile write cache: only flushed writes are promised.
/// Replay stops at the first torn record and truncates the log there.
pub struct Overlay {
    file: File,
    path: PathBuf,
    device_size: u64,
    /// State of every block the overlay has touched.
    state: Mutex<RangeMap>,
    /// Byte offset of the end of the log. Held while a record is appended,
    /// and taken before `state`, so records reach the log in the order their
    /// changes reach the map.
    log_end: Mutex<u64>,
    /// The private directory of a temporary overlay, removed on drop.
    _temporary: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay")
            .field("path", &self.path)
            .field("device_size", &self.device_size)
            .finish_non_exhaustive()
    }
}

fn io_error<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> OverlayError + 'a {
    move |source| OverlayError::Io {
        step,
        path: path.to_path_buf(),
        source,
    }
}

impl Overlay {
    /// Opens the overlay at `path` for the image `identity`, creating it when
    /// missing or empty. The parent directory is created with mode 0700 when
    /// missing; the file gets mode 0600. An existing overlay of another image
    /// or layout is rejected.
    pub fn open(path: &Path, identity: &Identity) -> Result<Overlay, OverlayError> {
        if let Some(parent) = path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
        {
            if !parent.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(parent)
                    .map_err(io_error("create the overlay directory", parent))?;
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(io_error("open the overlay file", path))?;
        Self::from_file(file, path.to_path_buf(), identity, None)
    }

    /// Creates a temporary overlay in a fresh 0700 directory under `parent`;
    /// the directory and the file are removed when the overlay is dropped.
    pub fn temporary(parent: &Path, identity: &Identity) -> Result<Overlay, OverlayError> {
        let dir = tempfile::Builder::new()
            .prefix("esgz-nbd-overlay-")
            .tempdir_in(parent)
            .map_err(io_error("create a temporary overlay directory", parent))?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).map_err(
            io_error("set the overlay directory mode to 0700", dir.path()),
        )?;
        let path = dir.path().join("overlay");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_error("create the overlay file", &path))?;
        Self::from_file(file, path, identity, Some(dir))
    }

    fn from_file(
        file: File,
        path: PathBuf,
        identity: &Identity,
        temporary: Option<tempfile::TempDir>,
    ) -> Result<Overlay, OverlayError> {
        lock_exclusive(&file, &path)?;
        let metadata = file
            .metadata()
            .map_err(io_error("read the overlay file metadata", &path))?;
        if !metadata.is_file() {
            return Err(OverlayError::NotAFile { path });
        }
        if metadata.permissions().mode() & 0o077 != 0 {
            warn!(
                path = %path.display(),
                mode = format_args!("{:o}", metadata.permissions().mode() & 0o7777),
                "the overlay file is readable by other users; setting mode 0600"
            );
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(io_error("set the overlay file mode to 0600", &path))?;
        }

        let log_offset = format::log_offset(identity.device_size);
        let mut overlay = Overlay {
            file,
            path,
            device_size: identity.device_size,
            state: Mutex::new(RangeMap::default()),
            log_end: Mutex::new(log_offset),
            _temporary: temporary,
        };
        if metadata.len() == 0 {
            overlay.initialize(identity)?;
            info!(path = %overlay.path.display(), device_size = identity.device_size, "created a new overlay");
        } else {
            overlay.check_identity(identity)?;
            overlay.replay(metadata.len())?;
        }
        Ok(overlay)
    }

    fn initialize(&self, identity: &Identity) -> Result<(), OverlayError> {
        let header = encode_header(identity).map_err(|source| OverlayError::Header {
            path: self.path.clone(),
            source,
        })?;
        let path = &self.path;
        self.file
            .write_all_at(&header, 0)
            .map_err(io_error("write the overlay header", path))?;
        self.file
            .set_len(format::log_offset(identity.device_size))
            .map_err(io_error("size the overlay file", path))?;
        self.file
            .sync_all()
            .map_err(io_error("sync the new overlay file", path))?;
        if let Some(parent) = path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
        {
            // The new directory entry must survive a crash too.
            File::open(parent)
                .and_then(|dir| dir.sync_all())
                .map_err(io_error("sync the overlay directory", parent))?;
        }
        Ok(())
    }

    fn check_identity(&self, expected: &Identity) -> Result<(), OverlayError> {
        let mut header = vec![0u8; HEADER_SIZE as usize];
        let read = read_up_to(&self.file, &mut header, 0)
            .map_err(io_error("read the overlay header", &self.path))?;
        header.truncate(read);
        let recorded = decode_header(&header).map_err(|source| OverlayError::Header {
            path: self.path.clone(),
            source,
        })?;
        if recorded != *expected {
            let reason = if recorded.manifest_digest != expected.manifest_digest {
                "it was made for another image"
            } else if recorded.device_size != expected.device_size {
                "it was made for another disk size (another --size?)"
            } else {
                "it was made for another filesystem layout of this image (another --size or program version?)"
            };
            return Err(OverlayError::IdentityMismatch {
                path: self.path.clone(),
                reason,
                recorded_manifest: recorded.manifest_digest,
                recorded_size: recorded.device_size,
                expected_manifest: expected.manifest_digest.clone(),
                expected_size: expected.device_size,
            });
        }
        Ok(())
    }

    /// Rebuilds the map from the log; truncates a torn tail.
    fn replay(&mut self, file_len: u64) -> Result<(), OverlayError> {
        let log_offset = format::log_offset(self.device_size);
        let device_blocks = self.device_size / BLOCK_SIZE;
        let mut map = RangeMap::default();
        let mut offset = log_offset;
        let mut records = 0u64;
        let mut buffer = vec![0u8; REPLAY_CHUNK];

        'chunks: while offset < file_len {
            let want = usize::try_from((file_len - offset).min(REPLAY_CHUNK as u64))
                .unwrap_or(REPLAY_CHUNK);
            let read = read_up_to(&self.file, &mut buffer[..want], offset)
                .map_err(io_error("read the overlay map log", &self.path))?;
            if read < RECORD_SIZE {
                break;
            }
            for bytes in buffer[..read].chunks_exact(RECORD_SIZE) {
                let Some(record) = decode_record(bytes) else {
                    break 'chunks;
                };
                let end = record.start.checked_add(record.count);
                if record.count == 0 || end.is_none_or(|end| end > device_blocks) {
                    return Err(OverlayError::RecordOutOfRange {
                        path: self.path.clone(),
                        offset,
                        start: record.start,
                        count: record.count,
                        device_blocks,
                    });
                }
                map.set(record.start, record.start + record.count, record.state);
                offset += RECORD_SIZE as u64;
                records += 1;
            }
        }

        if offset < file_len {
            warn!(
                path = %self.path.display(),
                valid_end = offset,
                file_len,
                "the overlay map log ends with an incomplete record (a flush interrupted by a crash); dropping it"
            );
            self.file
                .set_len(offset)
                .map_err(io_error("truncate the torn map log", &self.path))?;
            self.file
                .sync_all()
                .map_err(io_error("sync the truncated map log", &self.path))?;
        }
        info!(
            path = %self.path.display(),
            records,
            intervals = map.len(),
            "opened an existing overlay"
        );
        *self
            .log_end
            .get_mut()
            .unwrap_or_else(|poison| poison.into_inner()) = offset;
        *self
            .state
            .get_mut()
            .unwrap_or_else(|poison| poison.into_inner()) = map;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn device_size(&self) -> u64 {
        self.device_size
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, RangeMap> {
        // The map stays consistent even if a holder panicked: every update
        // is a single `set` call.
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Splits blocks `start..end` into runs by overlay state.
    pub fn runs(&self, start: u64, end: u64) -> Vec<Run> {
        self.lock_state().runs(start, end)
    }

    /// Reads `buf.len()` bytes of overlay data at device byte `offset`.
    pub fn read_data(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let read = read_up_to(&self.file, buf, HEADER_SIZE + offset)?;
        // A sparse file reads zeros in holes, so a short read can only come
        // from a file truncated behind our back.
        buf[read..].fill(0);
        Ok(())
    }

    /// Writes whole blocks starting at `first_block` and marks them as data.
    pub fn write_blocks(&self, first_block: u64, data: &[u8]) -> io::Result<()> {
        let count = data.len() as u64 / BLOCK_SIZE;
        self.file
            .write_all_at(data, HEADER_SIZE + first_block * BLOCK_SIZE)?;
        self.mark(first_block, first_block + count, BlockState::Data)
    }

    /// Marks blocks `start..end` as zero and punches a hole over their data.
    pub fn zero_blocks(&self, start: u64, end: u64) -> io::Result<()> {
        self.mark(start, end, BlockState::Zero)?;
        self.punch_hole(start, end);
        Ok(())
    }

    /// Gives blocks `start..end` the state `state`: appends a map record to
    /// the log, then updates the map. A failed append leaves the map as it
    /// was, so readers never see a state the log does not hold.
    fn mark(&self, start: u64, end: u64, state: BlockState) -> io::Result<()> {
        let mut log_end = self
            .log_end
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        // Blocks already in this state need no new record: an overwrite of
        // data in place is covered by the fdatasync of the next flush.
        let unchanged = self
            .lock_state()
            .runs(start, end)
            .iter()
            .all(|run| run.state == Some(state));
        if unchanged {
            return Ok(());
        }
        let record = encode_record(&Record {
            start,
            count: end - start,
            state,
        });
        self.file.write_all_at(&record, *log_end)?;
        *log_end += RECORD_SIZE as u64;
        self.lock_state().set(start, end, state);
        Ok(())
    }

    /// Frees the file space of blocks `start..end`. Zero blocks read as
    /// zeros whatever the file holds, so a failure only costs disk space.
    fn punch_hole(&self, start: u64, end: u64) {
        let (Ok(offset), Ok(len)) = (
            libc::off_t::try_from(HEADER_SIZE + start * BLOCK_SIZE),
            libc::off_t::try_from((end - start) * BLOCK_SIZE),
        ) else {
            return;
        };
        // SAFETY: the descriptor belongs to `self.file`, which is open for
        // writing for the lifetime of `self`; fallocate takes no pointers.
        let result = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        };
        if result != 0 {
            debug!(
                path = %self.path.display(),
                start,
                end,
                error = %io::Error::last_os_error(),
                "failed to punch a hole in the overlay; the blocks still read as zeros"
            );
        }
    }

    /// Makes every write and zeroing completed before the call durable
    /// across a power loss, map records included.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// Reads into `buf` at `offset` until it is full or the file ends; returns
/// the bytes read.
fn read_up_to(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}

/// Takes an exclusive `flock` on the overlay, so two servers cannot write
/// the same overlay; the lock ends when the file is closed.
fn lock_exclusive(file: &File, path: &Path) -> Result<(), OverlayError> {
    // SAFETY: the descriptor belongs to `file`, which outlives this call;
    // flock takes no pointers.
    let result = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if result == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    if error.kind() == io::ErrorKind::WouldBlock {
        return Err(OverlayError::InUse {
            path: path.to_path_buf(),
        });
    }
    Err(OverlayError::Io {
        step: "lock the overlay file",
        path: path.to_path_buf(),
        source: error,
    })
}
