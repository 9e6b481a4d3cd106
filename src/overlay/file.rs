//! The overlay file: creation, identity check, exclusive lock, map log replay, block I/O and the two-step durable flush.

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
    self, decode_header, decode_record, encode_header, encode_record, record_sums_len, HeaderError,
    Identity, Record, BLOCK_SIZE, HEADER_SIZE, MAX_DATA_RECORD_BLOCKS, RECORD_SIZE,
};
use super::map::{BlockState, RangeMap, Run};
use super::OverlayError;

/// Bytes of map log read per step during replay.
const REPLAY_BUFFER: usize = 1 << 20;

/// Locks that serialize writes, zeroing and a flush's snapshot per block, picked by block
/// number, so a block's slot choice, data and checksum change together.
const STRIPES: u64 = 64;

/// The slots of one block: the one with its current data and the one a durable record names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct BlockSlots {
    /// Slot and crc32c of the block's current data; `None` unless the block is data.
    live: Option<(u8, u32)>,
    /// Slot that a durable map record (or one being written by a flush) points at; never
    /// written in place.
    durable: Option<u8>,
}

impl BlockSlots {
    /// Picks the slot for new data: the current slot unless a durable record points at
    /// it, else the other one.
    fn slot_for_write(&self) -> u8 {
        match (self.live, self.durable) {
            (Some((slot, _)), durable) if durable != Some(slot) => slot,
            (_, Some(durable)) => 1 - durable,
            (_, None) => 0,
        }
    }
}

/// The map as readers see it and the changes not yet in the durable log.
#[derive(Default)]
struct MapState {
    /// State of every block the overlay has touched.
    current: RangeMap,
    /// Latest state of blocks changed since the last flush.
    pending: RangeMap,
    /// Slots and checksums of the blocks that hold data or that a durable record points at.
    slots: BTreeMap<u64, BlockSlots>,
}

/// A copy-on-write overlay file for one device.
///
/// Block N of the device has two fixed slots in the file (see [`format`](mod@format)),
/// so the data area is sparse and needs no allocation. The map records which blocks
/// hold data, in which slot and with which crc32c, and which read as zeros. It is
/// persisted as an append-only log of records after the data area.
///
/// Crash safety: a map record is written only by [`Overlay::flush`], which
/// first takes the pending changes, then `fdatasync`s the file (the data of
/// those changes was written before they became pending), then appends the
/// records and `fdatasync`s again. A durable record therefore never points
/// at data that is not durable, and the slot it points at is not written
/// again until a newer record replaces it. After a crash, replay stops at the
/// first torn record and truncates the log there; blocks whose records were
/// lost read as their last durable record records them (or from the image), which is
/// their state before the unflushed writes, and match their checksums.
///
/// Reads check every data block against its crc32c and fail with an I/O error
/// for a block that does not match.
pub struct Overlay {
    file: File,
    path: PathBuf,
    device_size: u64,
    state: Mutex<MapState>,
    /// Byte offset of the end of the durable log; held for a whole flush so
    /// flushes do not interleave.
    log_end: Mutex<u64>,
    stripes: Vec<Mutex<()>>,
    /// Set when a flush failed after it marked slots durable. Writes then fail, because
    /// a record naming those slots may or may not have reached the disk.
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
            log_end: Mutex::new(log_offset),
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

    /// Rebuilds the map from the log; truncates a torn tail.
    fn replay(&mut self, file_len: u64) -> Result<(), OverlayError> {
        let log_offset = format::log_offset(self.device_size);
        let device_blocks = self.device_size / BLOCK_SIZE;
        let mut map = MapState::default();
        let mut offset = log_offset;
        let mut records = 0u64;

        let read_error = io_error("read the overlay map log", &self.path);
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
            let Some(record) = decode_record(&head, &sums) else {
                break;
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
            apply_durable(&mut map, &record);
            offset += (RECORD_SIZE + sums_len) as u64;
            records += 1;
        }
        drop(reader);

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
            intervals = map.current.len(),
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

    /// Locks the stripes of blocks `start..end` in stripe order, so two callers never
    /// wait for each other's stripes crosswise.
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
                "overlay {} rejects writes after a failed flush; restart the server to replay the durable map",
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
        let mut map = self.lock_state();
        for (index, (slot, sum)) in targets.iter().zip(&sums).enumerate() {
            let entry = map.slots.entry(first_block + index as u64).or_default();
            entry.live = Some((*slot, *sum));
        }
        // Every write needs a new record, because its checksum changed.
        map.current.set(first_block, end, BlockState::Data);
        map.pending.set(first_block, end, BlockState::Data);
        Ok(())
    }

    /// Marks blocks `start..end` as zero and punches holes over their slots that no
    /// durable record points at.
    pub fn zero_blocks(&self, start: u64, end: u64) -> io::Result<()> {
        let _stripes = self.lock_stripes(start, end);
        self.check_writable()?;

        let mut durable_slots = Vec::new();
        {
            let mut map = self.lock_state();
            let unchanged = map
                .current
                .runs(start, end)
                .iter()
                .all(|run| run.state == Some(BlockState::Zero));
            if unchanged {
                return Ok(());
            }
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

        // Holes go where no durable record points: slot 0 of every block without a
        // durable slot 0, and slot 1 of the blocks with one. Slot 1 of the other blocks
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

    /// Makes every write and zeroing completed before the call durable, map
    /// included. See the type documentation for the order of steps.
    ///
    /// A failure makes the overlay reject writes until it is opened again: the
    /// snapshot marked the new slots durable, and a record may or may not have
    /// reached the disk, so neither slot of those blocks is safe to write.
    pub fn flush(&self) -> io::Result<()> {
        let mut log_end = self
            .log_end
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        self.check_writable()?;

        let records = {
            let _stripes = self.lock_stripes(0, STRIPES);
            let mut map = self.lock_state();
            let pending = std::mem::take(&mut map.pending);
            take_records(&mut map, &pending)
        };

        let result = self.persist(&records, &mut log_end);
        if let Err(error) = &result {
            self.failed.store(true, Ordering::Release);
            warn!(path = %self.path.display(), %error, "overlay flush failed; writes are rejected until the server restarts");
        }
        result
    }

    fn persist(&self, records: &[Record], log_end: &mut u64) -> io::Result<()> {
        self.file.sync_data()?;
        if records.is_empty() {
            return Ok(());
        }

        let mut log = Vec::new();
        for record in records {
            log.extend_from_slice(&encode_record(record));
        }
        self.file.write_all_at(&log, *log_end)?;
        self.file.sync_data()?;
        *log_end += log.len() as u64;
        debug!(
            records = records.len(),
            log_end = *log_end,
            "overlay map records are durable"
        );
        Ok(())
    }
}

/// Turns the pending changes into map records and marks their slots durable (the
/// caller holds every stripe, so no write picks one of those slots meanwhile). Data
/// runs are split where the slot changes and at [`MAX_DATA_RECORD_BLOCKS`].
fn take_records(map: &mut MapState, pending: &RangeMap) -> Vec<Record> {
    let mut records = Vec::new();
    for (start, end, state) in pending.iter() {
        if state == BlockState::Zero {
            records.push(Record {
                start,
                count: end - start,
                state,
                slot: 0,
                sums: Vec::new(),
            });
            remove_slots(&mut map.slots, start, end);
            continue;
        }

        let mut current: Option<Record> = None;
        for block in start..end {
            let entry = map.slots.entry(block).or_default();
            // A pending data block always has live data. If it had none, slot 0 with sum 0
            // would make the block read as a checksum error, never as wrong data.
            let (slot, sum) = entry.live.unwrap_or((0, 0));
            entry.durable = Some(slot);
            match current.as_mut() {
                Some(record) if record.slot == slot && record.count < MAX_DATA_RECORD_BLOCKS => {
                    record.count += 1;
                    record.sums.push(sum);
                }
                _ => {
                    records.extend(current.take());
                    current = Some(Record {
                        start: block,
                        count: 1,
                        state,
                        slot,
                        sums: vec![sum],
                    });
                }
            }
        }
        records.extend(current);
    }
    records
}

/// Removes the entries of blocks `start..end`.
fn remove_slots(slots: &mut BTreeMap<u64, BlockSlots>, start: u64, end: u64) {
    let mut from_start = slots.split_off(&start);
    let mut from_end = from_start.split_off(&end);
    slots.append(&mut from_end);
}

/// Applies a durable record read back from the log.
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
