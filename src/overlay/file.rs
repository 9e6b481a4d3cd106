//! The overlay file: creation, identity check, exclusive lock, map log replay, block I/O and the durable flush.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use tracing::{debug, info, warn};

use super::format::{
    self, decode_entry, decode_header, encode_commit, encode_header, encode_record,
    record_sums_len, Entry, HeaderError, Identity, Record, BLOCK_SIZE, HEADER_SIZE,
    MAX_DATA_RECORD_BLOCKS, RECORD_SIZE,
};
use super::map::{BlockState, RangeMap, Run};
use super::OverlayError;

/// Bytes of map log read per step during replay.
const REPLAY_BUFFER: usize = 1 << 20;

/// Locks that serialize writes, zeroing and a flush's snapshot per block, picked by block
/// number, so a block's slot choice, data and checksum change together.
const STRIPES: u64 = 64;

/// The slots of one block: the one with its current data and the one a confirmed record names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct BlockSlots {
    /// Slot and crc32c of the block's current data; `None` unless the block is data.
    live: Option<(u8, u32)>,
    /// Slot that a confirmed map record points at; never written in place.
    durable: Option<u8>,
}

impl BlockSlots {
    /// Picks the slot for new data: the current slot unless a confirmed record points
    /// at it, else the other one.
    fn slot_for_write(&self) -> u8 {
        match (self.live, self.durable) {
            (Some((slot, _)), durable) if durable != Some(slot) => slot,
            (_, Some(durable)) => 1 - durable,
            (_, None) => 0,
        }
    }
}

/// The map as readers see it and the changes not yet confirmed by a flush.
#[derive(Default)]
struct MapState {
    /// State of every block the overlay has touched.
    current: RangeMap,
    /// Latest state of blocks changed since the last flush.
    pending: RangeMap,
    /// Slots and checksums of the blocks that hold data or that a confirmed record points at.
    slots: BTreeMap<u64, BlockSlots>,
}

/// Positions in the map log.
#[derive(Clone, Copy, Debug)]
struct LogEnd {
    /// Byte offset where the next entry goes.
    end: u64,
    /// Byte offset just past the last commit entry (or the log start).
    committed: u64,
}

/// A copy-on-write overlay file for one device.
///
/// Block N of the device has two fixed slots in the file (see [`format`](mod@format)),
/// so the data area is sparse and needs no allocation. The map records which blocks
/// hold data, in which slot and with which crc32c, and which read as zeros. It is
/// persisted as an append-only log of records after the data area.
///
/// Durability has two levels:
///
/// - A write or zeroing survives the death of this process once it returns: its data
///   is in the file and its record is appended to the log (without a sync) before the
///   call returns. A server killed with SIGKILL therefore loses nothing it completed,
///   which `attach --reattach` relies on: the kernel keeps a filesystem mounted across
///   the restart and trusts every completed write.
/// - [`Overlay::flush`] holds off writes, `fdatasync`s the file, appends a commit entry
///   and syncs again, so everything completed before it also survives a power loss.
///
/// After a power loss, records after the last commit may have reached the disk
/// without their data. Replay checks the data of those unconfirmed records against
/// their checksums and drops the ones that do not match. Their blocks read as their
/// confirmed state, because a write never overwrites that in place. Replay stops at the
/// first torn entry.
///
/// Reads check every data block against its crc32c and fail with an I/O error
/// for a block that does not match.
pub struct Overlay {
    file: File,
    path: PathBuf,
    device_size: u64,
    state: Mutex<MapState>,
    /// End of the log and end of its last commit; held while an entry is appended.
    log: Mutex<LogEnd>,
    /// Held for a whole flush, so flushes do not interleave.
    flushing: Mutex<()>,
    stripes: Vec<Mutex<()>>,
    /// Set when an append or a flush failed. Writes then fail, because the log may end
    /// with a partial entry or a commit that may or may not have reached the disk.
    failed: AtomicBool,
    /// Blocks already logged with a checksum mismatch, so each is logged once at warn level.
    reported: Mutex<HashSet<u64>>,
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
            state: Mutex::new(MapState::default()),
            log: Mutex::new(LogEnd {
                end: log_offset,
                committed: log_offset,
            }),
            flushing: Mutex::new(()),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            failed: AtomicBool::new(false),
            reported: Mutex::new(HashSet::new()),
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
        let recorded = decode_header(&header).map_err(|source| match source {
            HeaderError::OldVersion { found } => OverlayError::OldVersion {
                path: self.path.clone(),
                found,
            },
            source => OverlayError::Header {
                path: self.path.clone(),
                source,
            },
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

    /// Rebuilds the map from the log. Records up to the last commit are applied as
    /// they are; later ones only where their data matches (see [`Overlay::settle`]).
    fn replay(&mut self, file_len: u64) -> Result<(), OverlayError> {
        let log_offset = format::log_offset(self.device_size);
        let device_blocks = self.device_size / BLOCK_SIZE;
        let mut map = MapState::default();
        let mut offset = log_offset;
        let mut committed = log_offset;
        let mut records = 0u64;
        // Records after the last commit seen so far.
        let mut unconfirmed: Vec<Record> = Vec::new();

        let log_path = self.path.clone();
        let read_error = io_error("read the overlay map log", &log_path);
        let mut reader = BufReader::with_capacity(REPLAY_BUFFER, &self.file);
        if let Err(error) = reader.seek(SeekFrom::Start(log_offset)) {
            return Err(read_error(error));
        }
        let mut head = [0u8; RECORD_SIZE];
        let mut sums = Vec::new();
        while offset < file_len {
            match read_full(&mut reader, &mut head) {
                Ok(true) => {}
                Ok(false) => break,
                Err(error) => return Err(read_error(error)),
            }
            let Some(sums_len) = record_sums_len(&head) else {
                break;
            };
            sums.resize(sums_len, 0);
            match read_full(&mut reader, &mut sums) {
                Ok(true) => {}
                Ok(false) => break,
                Err(error) => return Err(read_error(error)),
            }
            let Some(entry) = decode_entry(&head, &sums) else {
                break;
            };
            offset += (RECORD_SIZE + sums_len) as u64;
            let record = match entry {
                Entry::Commit => {
                    for record in unconfirmed.drain(..) {
                        apply_durable(&mut map, &record);
                    }
                    committed = offset;
                    continue;
                }
                Entry::Change(record) => record,
            };
            let end = record.start.checked_add(record.count);
            if record.count == 0 || end.is_none_or(|end| end > device_blocks) {
                return Err(OverlayError::RecordOutOfRange {
                    path: self.path.clone(),
                    offset: offset - (RECORD_SIZE + sums_len) as u64,
                    start: record.start,
                    count: record.count,
                    device_blocks,
                });
            }
            unconfirmed.push(record);
            records += 1;
        }
        drop(reader);

        *self
            .state
            .get_mut()
            .unwrap_or_else(|poison| poison.into_inner()) = map;
        *self
            .log
            .get_mut()
            .unwrap_or_else(|poison| poison.into_inner()) = LogEnd {
            end: offset,
            committed,
        };
        if offset < file_len || !unconfirmed.is_empty() {
            if offset < file_len {
                warn!(
                    path = %self.path.display(),
                    valid_end = offset,
                    file_len,
                    "the overlay map log ends with an incomplete entry (a write interrupted by a crash); dropping it"
                );
            }
            self.settle(&unconfirmed)?;
        }
        info!(
            path = %self.path.display(),
            records,
            intervals = self.lock_state().current.len(),
            "opened an existing overlay"
        );
        Ok(())
    }

    /// Applies the records after the last commit whose data reached the disk, then
    /// rewrites the log as the confirmed part, those records and a commit, and syncs.
    ///
    /// A data block is kept when its slot matches the record's checksum. After the
    /// death of the process, every block matches. After a power loss, a block whose
    /// data did not reach the disk is dropped and reads as its confirmed state. A
    /// zeroing is always kept, because zeros are a valid new state whatever reached
    /// the disk.
    fn settle(&mut self, unconfirmed: &[Record]) -> Result<(), OverlayError> {
        // The final state of each touched block: zero ranges, and data blocks with
        // their slot and checksum.
        let mut states = RangeMap::default();
        let mut data: BTreeMap<u64, (u8, u32)> = BTreeMap::new();
        for record in unconfirmed {
            let end = record.start + record.count;
            states.set(record.start, end, record.state);
            match record.state {
                BlockState::Data => {
                    for (index, sum) in record.sums.iter().enumerate() {
                        data.insert(record.start + index as u64, (record.slot, *sum));
                    }
                }
                BlockState::Zero => {
                    let zeroed: Vec<u64> = data.range(record.start..end).map(|(&b, _)| b).collect();
                    for block in zeroed {
                        data.remove(&block);
                    }
                }
            }
        }

        let mut kept = Vec::new();
        let mut dropped = 0u64;
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        for (start, end, state) in states.iter() {
            if state == BlockState::Zero {
                kept.push(Record {
                    start,
                    count: end - start,
                    state,
                    slot: 0,
                    sums: Vec::new(),
                });
                continue;
            }
            for block in start..end {
                let Some(&(slot, sum)) = data.get(&block) else {
                    continue;
                };
                self.read_slot(slot, block, &mut buf)
                    .map_err(io_error("read overlay data to check it", &self.path))?;
                if crc32c::crc32c(&buf) != sum {
                    dropped += 1;
                    continue;
                }
                match kept.last_mut() {
                    Some(last)
                        if last.state == BlockState::Data
                            && last.slot == slot
                            && last.start + last.count == block
                            && last.count < MAX_DATA_RECORD_BLOCKS =>
                    {
                        last.count += 1;
                        last.sums.push(sum);
                    }
                    _ => kept.push(Record {
                        start: block,
                        count: 1,
                        state,
                        slot,
                        sums: vec![sum],
                    }),
                }
            }
        }
        if dropped > 0 {
            warn!(
                path = %self.path.display(),
                blocks = dropped,
                "overlay blocks written after the last flush did not reach the disk (a power loss?); they read as their state at that flush"
            );
        }

        let map = self
            .state
            .get_mut()
            .unwrap_or_else(|poison| poison.into_inner());
        for record in &kept {
            apply_durable(map, record);
        }
        let log = self
            .log
            .get_mut()
            .unwrap_or_else(|poison| poison.into_inner());
        let mut bytes = Vec::new();
        for record in &kept {
            bytes.extend_from_slice(&encode_record(record));
        }
        if !bytes.is_empty() {
            bytes.extend_from_slice(&encode_commit());
        }
        let path = &self.path;
        self.file
            .set_len(log.committed)
            .map_err(io_error("truncate the unconfirmed map log", path))?;
        self.file
            .write_all_at(&bytes, log.committed)
            .map_err(io_error("rewrite the map log", path))?;
        self.file
            .sync_all()
            .map_err(io_error("sync the rewritten map log", path))?;
        log.committed += bytes.len() as u64;
        log.end = log.committed;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn device_size(&self) -> u64 {
        self.device_size
    }

    fn lock_state(&self) -> MutexGuard<'_, MapState> {
        // No update of the map panics halfway, so a poisoned lock still guards a
        // consistent map.
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Splits blocks `start..end` into runs by overlay state.
    pub fn runs(&self, start: u64, end: u64) -> Vec<Run> {
        self.lock_state().current.runs(start, end)
    }

    /// Locks the stripes of blocks `start..end` in ascending stripe order, so two
    /// callers cannot deadlock on each other's stripes.
    fn lock_stripes(&self, start: u64, end: u64) -> Vec<MutexGuard<'_, ()>> {
        let mut indices: Vec<u64> = if end - start >= STRIPES {
            (0..STRIPES).collect()
        } else {
            (start..end).map(|block| block % STRIPES).collect()
        };
        indices.sort_unstable();
        indices.dedup();
        indices
            .into_iter()
            .map(|index| {
                self.stripes[index as usize]
                    .lock()
                    .unwrap_or_else(|poison| poison.into_inner())
            })
            .collect()
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(io::Error::other(format!(
                "overlay {} rejects writes after a failed flush; restart the server to replay the committed map",
                self.path.display()
            )));
        }
        Ok(())
    }

    /// Reads data blocks `start..end` and checks each against its crc32c; fails with
    /// an I/O error naming the first block that does not match.
    pub fn read_blocks(&self, start: u64, end: u64) -> io::Result<Vec<u8>> {
        let slots: Vec<Option<(u8, u32)>> = {
            let map = self.lock_state();
            (start..end)
                .map(|block| map.slots.get(&block).and_then(|slots| slots.live))
                .collect()
        };
        let len = usize::try_from((end - start) * BLOCK_SIZE)
            .map_err(|_| io::Error::other("overlay read does not fit in memory"))?;
        let mut buf = vec![0u8; len];

        // Consecutive blocks in the same slot are contiguous in the file.
        let mut run_start = 0usize;
        while run_start < slots.len() {
            let slot = slots[run_start].map_or(0, |(slot, _)| slot);
            let mut run_end = run_start + 1;
            while run_end < slots.len() && slots[run_end].map_or(0, |(slot, _)| slot) == slot {
                run_end += 1;
            }
            let block = start + run_start as u64;
            let bytes = &mut buf[run_start * BLOCK_SIZE as usize..run_end * BLOCK_SIZE as usize];
            self.read_slot(slot, block, bytes)?;
            run_start = run_end;
        }

        for (index, expected) in slots.iter().enumerate() {
            let block = start + index as u64;
            let bytes = &mut buf[index * BLOCK_SIZE as usize..(index + 1) * BLOCK_SIZE as usize];
            if expected.is_some_and(|(_, sum)| crc32c::crc32c(bytes) == sum) {
                continue;
            }
            self.recheck_block(block, bytes)?;
        }
        Ok(buf)
    }

    /// Reads one block again under its stripe lock after its first read did not match
    /// (or it was not data any more): a write or zeroing that ran alongside the first
    /// read is finished now. Fails when the block still does not match its crc32c.
    fn recheck_block(&self, block: u64, bytes: &mut [u8]) -> io::Result<()> {
        let _stripe = self.lock_stripes(block, block + 1);
        let live = self
            .lock_state()
            .slots
            .get(&block)
            .and_then(|slots| slots.live);
        let Some((slot, expected)) = live else {
            // Zeroed or trimmed since the read started.
            bytes.fill(0);
            return Ok(());
        };
        self.read_slot(slot, block, bytes)?;
        let actual = crc32c::crc32c(bytes);
        if actual == expected {
            return Ok(());
        }

        let file_offset = format::slot_offset(self.device_size, slot, block);
        let first = self
            .reported
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .insert(block);
        if first {
            warn!(
                path = %self.path.display(),
                block,
                slot,
                file_offset,
                expected = format_args!("{expected:#010x}"),
                actual = format_args!("{actual:#010x}"),
                "an overlay data block does not match its checksum; reads of it fail with EIO"
            );
        } else {
            debug!(
                block,
                "read of an overlay block that does not match its checksum"
            );
        }
        Err(io::Error::other(format!(
            "overlay block {block} (device offset {:#x}) does not match its checksum: crc32c {actual:#010x}, expected {expected:#010x}; the overlay file {} is damaged at byte {file_offset:#x}",
            block * BLOCK_SIZE,
            self.path.display()
        )))
    }

    fn read_slot(&self, slot: u8, block: u64, buf: &mut [u8]) -> io::Result<()> {
        let offset = format::slot_offset(self.device_size, slot, block);
        let read = read_up_to(&self.file, buf, offset)?;
        // A sparse file reads zeros in holes, so a short read can only come
        // from a file truncated behind our back.
        buf[read..].fill(0);
        Ok(())
    }

    /// Writes whole blocks starting at `first_block` and marks them as data.
    pub fn write_blocks(&self, first_block: u64, data: &[u8]) -> io::Result<()> {
        let count = data.len() as u64 / BLOCK_SIZE;
        let end = first_block + count;
        let _stripes = self.lock_stripes(first_block, end);
        self.check_writable()?;

        let targets: Vec<u8> = {
            let map = self.lock_state();
            (first_block..end)
                .map(|block| {
                    map.slots
                        .get(&block)
                        .copied()
                        .unwrap_or_default()
                        .slot_for_write()
                })
                .collect()
        };
        let mut run_start = 0usize;
        while run_start < targets.len() {
            let slot = targets[run_start];
            let mut run_end = run_start + 1;
            while run_end < targets.len() && targets[run_end] == slot {
                run_end += 1;
            }
            let bytes = &data[run_start * BLOCK_SIZE as usize..run_end * BLOCK_SIZE as usize];
            let offset =
                format::slot_offset(self.device_size, slot, first_block + run_start as u64);
            self.file.write_all_at(bytes, offset)?;
            run_start = run_end;
        }

        let sums: Vec<u32> = data
            .chunks(BLOCK_SIZE as usize)
            .map(crc32c::crc32c)
            .collect();
        // Every write needs a new record, because its checksum changed.
        let mut log = Vec::new();
        let mut run_start = 0usize;
        while run_start < targets.len() {
            let slot = targets[run_start];
            let mut run_end = run_start + 1;
            while run_end < targets.len()
                && targets[run_end] == slot
                && ((run_end - run_start) as u64) < MAX_DATA_RECORD_BLOCKS
            {
                run_end += 1;
            }
            log.extend_from_slice(&encode_record(&Record {
                start: first_block + run_start as u64,
                count: (run_end - run_start) as u64,
                state: BlockState::Data,
                slot,
                sums: sums[run_start..run_end].to_vec(),
            }));
            run_start = run_end;
        }
        self.append(&log)?;

        let mut map = self.lock_state();
        for (index, (slot, sum)) in targets.iter().zip(&sums).enumerate() {
            let entry = map.slots.entry(first_block + index as u64).or_default();
            entry.live = Some((*slot, *sum));
        }
        map.current.set(first_block, end, BlockState::Data);
        map.pending.set(first_block, end, BlockState::Data);
        Ok(())
    }

    /// Appends entries to the log. A failure leaves the log ending in an unknown
    /// state, so it also stops later writes (see `failed`).
    fn append(&self, bytes: &[u8]) -> io::Result<()> {
        let mut log = self.log.lock().unwrap_or_else(|poison| poison.into_inner());
        if let Err(error) = self.file.write_all_at(bytes, log.end) {
            self.failed.store(true, Ordering::Release);
            warn!(path = %self.path.display(), %error, "failed to append to the overlay map log; writes are rejected until the server restarts");
            return Err(error);
        }
        log.end += bytes.len() as u64;
        Ok(())
    }

    /// Marks blocks `start..end` as zero and punches holes over their slots that no
    /// confirmed record points at.
    pub fn zero_blocks(&self, start: u64, end: u64) -> io::Result<()> {
        let _stripes = self.lock_stripes(start, end);
        self.check_writable()?;

        let unchanged = self
            .lock_state()
            .current
            .runs(start, end)
            .iter()
            .all(|run| run.state == Some(BlockState::Zero));
        if unchanged {
            return Ok(());
        }
        self.append(&encode_record(&Record {
            start,
            count: end - start,
            state: BlockState::Zero,
            slot: 0,
            sums: Vec::new(),
        }))?;

        let mut durable_slots = Vec::new();
        {
            let mut map = self.lock_state();
            let touched: Vec<u64> = map
                .slots
                .range(start..end)
                .map(|(&block, _)| block)
                .collect();
            for block in touched {
                let Some(entry) = map.slots.get_mut(&block) else {
                    continue;
                };
                entry.live = None;
                match entry.durable {
                    Some(slot) => durable_slots.push((block, slot)),
                    None => {
                        map.slots.remove(&block);
                    }
                }
            }
            map.current.set(start, end, BlockState::Zero);
            map.pending.set(start, end, BlockState::Zero);
        }

        // Holes go where no confirmed record points: slot 0 of every block without a
        // confirmed slot 0, and slot 1 of the blocks with one. Slot 1 of the other blocks
        // keeps stale bytes at most, which the map never reads.
        let mut cursor = start;
        for &(block, slot) in &durable_slots {
            if slot == 0 {
                self.punch_hole(0, cursor, block);
                cursor = block + 1;
            }
        }
        self.punch_hole(0, cursor, end);
        for &(block, slot) in &durable_slots {
            if slot == 0 {
                self.punch_hole(1, block, block + 1);
            }
        }
        Ok(())
    }

    /// Frees the file space of slot `slot` of blocks `start..end`. Zero blocks read as
    /// zeros whatever the file holds, so a failure only costs disk space.
    fn punch_hole(&self, slot: u8, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (Ok(offset), Ok(len)) = (
            libc::off_t::try_from(format::slot_offset(self.device_size, slot, start)),
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
                slot,
                start,
                end,
                error = %io::Error::last_os_error(),
                "failed to punch a hole in the overlay; the blocks still read as zeros"
            );
        }
    }

    /// Makes every write and zeroing completed before the call durable across a power
    /// loss: syncs the file, appends a commit entry and syncs again. Writes wait
    /// meanwhile, because until the commit is on disk both slots of a block rewritten
    /// since the last flush may be the one a replay picks.
    ///
    /// A failure makes the overlay reject writes until it is opened again: the commit
    /// may or may not have reached the disk.
    pub fn flush(&self) -> io::Result<()> {
        let _flushing = self
            .flushing
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        self.check_writable()?;
        let _stripes = self.lock_stripes(0, STRIPES);

        let result = self.commit();
        if let Err(error) = &result {
            self.failed.store(true, Ordering::Release);
            warn!(path = %self.path.display(), %error, "overlay flush failed; writes are rejected until the server restarts");
            return result;
        }
        // The slots the commit confirmed are now the ones a replay picks.
        let mut map = self.lock_state();
        let pending = std::mem::take(&mut map.pending);
        confirm(&mut map, &pending);
        result
    }

    fn commit(&self) -> io::Result<()> {
        self.file.sync_data()?;
        let uncommitted = {
            let log = self.log.lock().unwrap_or_else(|poison| poison.into_inner());
            log.end > log.committed
        };
        if !uncommitted {
            return Ok(());
        }
        self.append(&encode_commit())?;
        self.file.sync_data()?;
        let mut log = self.log.lock().unwrap_or_else(|poison| poison.into_inner());
        log.committed = log.end;
        debug!(log_end = log.end, "overlay map log committed");
        Ok(())
    }
}

/// Marks the slots of the blocks changed since the last flush as confirmed. The
/// caller has locked every stripe, so no write picks one of those slots meanwhile.
fn confirm(map: &mut MapState, pending: &RangeMap) {
    for (start, end, state) in pending.iter() {
        match state {
            BlockState::Zero => remove_slots(&mut map.slots, start, end),
            BlockState::Data => {
                for (_, entry) in map.slots.range_mut(start..end) {
                    entry.durable = entry.live.map(|(slot, _)| slot);
                }
            }
        }
    }
}

/// Removes the entries of blocks `start..end`.
fn remove_slots(slots: &mut BTreeMap<u64, BlockSlots>, start: u64, end: u64) {
    let mut from_start = slots.split_off(&start);
    let mut from_end = from_start.split_off(&end);
    slots.append(&mut from_end);
}

/// Applies a confirmed record read back from the log.
fn apply_durable(map: &mut MapState, record: &Record) {
    let end = record.start + record.count;
    map.current.set(record.start, end, record.state);
    match record.state {
        BlockState::Zero => remove_slots(&mut map.slots, record.start, end),
        BlockState::Data => {
            for (index, sum) in record.sums.iter().enumerate() {
                map.slots.insert(
                    record.start + index as u64,
                    BlockSlots {
                        live: Some((record.slot, *sum)),
                        durable: Some(record.slot),
                    },
                );
            }
        }
    }
}

/// Fills `buf` from `reader`; returns `false` when the input ends first.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    match reader.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(error) => Err(error),
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
