//! Overlay behaviour against an in-memory model: reads, writes, trims, zeroing, flush, reopen and damaged files.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use super::*;
use crate::device::BlockDevice;

const BLOCKS: u64 = 64;
const SIZE: u64 = BLOCKS * 4096;

/// A read-only device whose byte i is `pattern(i)`.
struct PatternDisk;

fn pattern(index: u64) -> u8 {
    (index % 251) as u8 ^ 0x5a
}

impl BlockDevice for PatternDisk {
    fn size(&self) -> u64 {
        SIZE
    }

    async fn read(&self, offset: u64, len: u32) -> std::io::Result<Bytes> {
        Ok((offset..offset + u64::from(len)).map(pattern).collect())
    }
}

fn identity(manifest: &str, device_size: u64) -> Identity {
    Identity {
        manifest_digest: manifest.to_string(),
        device_size,
        layout_digest: [3; 32],
    }
}

fn open_disk(path: &Path) -> OverlayDisk<PatternDisk> {
    let overlay = Overlay::open(path, &identity("sha256:aa", SIZE)).expect("overlay opens");
    OverlayDisk::new(Arc::new(PatternDisk), overlay).expect("sizes match")
}

fn base_model() -> Vec<u8> {
    (0..SIZE).map(pattern).collect()
}

async fn read_all(disk: &OverlayDisk<PatternDisk>) -> Vec<u8> {
    disk.read(0, SIZE as u32).await.expect("read").to_vec()
}

/// A small deterministic generator, so failures reproduce.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    fn below(&mut self, limit: u64) -> u64 {
        self.next() % limit
    }
}

#[tokio::test]
async fn reads_pass_through_without_writes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let disk = open_disk(&dir.path().join("overlay"));
    assert_eq!(read_all(&disk).await, base_model());
    assert!(disk.is_writable());
}

#[tokio::test]
async fn random_operations_match_model_and_survive_reopen() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("overlay");
    let mut model = base_model();
    let mut random = Lcg(7);
    {
        let disk = open_disk(&path);
        for step in 0..300 {
            let offset = random.below(SIZE - 1);
            let len = (random.below(3 * 4096) + 1).min(SIZE - offset);
            match random.below(4) {
                0 | 1 => {
                    let byte = (step % 255 + 1) as u8;
                    let data = vec![byte; len as usize];
                    disk.write(offset, Bytes::from(data), step % 17 == 0)
                        .await
                        .expect("write");
                    model[offset as usize..(offset + len) as usize].fill(byte);
                }
                2 => {
                    disk.write_zeroes(offset, len as u32, false)
                        .await
                        .expect("write zeroes");
                    model[offset as usize..(offset + len) as usize].fill(0);
                }
                _ => {
                    disk.trim(offset, len as u32, false).await.expect("trim");
                    let first = offset.div_ceil(4096);
                    let end = (offset + len) / 4096;
                    if end > first {
                        model[(first * 4096) as usize..(end * 4096) as usize].fill(0);
                    }
                }
            }
            if step % 50 == 0 {
                let at = random.below(SIZE - 8192);
                let got = disk.read(at, 8192).await.expect("read");
                assert_eq!(
                    &got[..],
                    &model[at as usize..at as usize + 8192],
                    "step {step}"
                );
            }
        }
        assert_eq!(read_all(&disk).await, model);
        disk.flush().await.expect("flush");
    }
    let disk = open_disk(&path);
    assert_eq!(read_all(&disk).await, model, "after reopen");
}

#[tokio::test]
async fn completed_writes_survive_reopen_without_flush() {
    // A process that dies after a write completes, without a flush, must
    // not lose it: `attach --reattach` hands the kernel's mounted filesystem
    // to a new server, and the kernel trusts every completed write.
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("overlay");
    {
        let disk = open_disk(&path);
        disk.write(0, Bytes::from(vec![1u8; 4096]), false)
            .await
            .expect("write");
        disk.flush().await.expect("flush");
        disk.write(8192, Bytes::from(vec![2u8; 4096]), false)
            .await
            .expect("write");
        disk.write_zeroes(16384, 8192, false)
            .await
            .expect("write zeroes");
        // Dropped without a flush, as a killed process would be.
    }
    let disk = open_disk(&path);
    let data = read_all(&disk).await;
    assert_eq!(&data[..4096], &[1u8; 4096][..], "flushed block");
    assert_eq!(&data[8192..12288], &[2u8; 4096][..], "unflushed write");
    assert_eq!(&data[16384..24576], &[0u8; 8192][..], "unflushed zeroing");
    assert_eq!(
        &data[12288..16384],
        &base_model()[12288..16384],
        "untouched block"
    );
}

#[tokio::test]
async fn torn_log_tail_is_dropped() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("overlay");
    {
        let disk = open_disk(&path);
        disk.write(4096, Bytes::from(vec![9u8; 4096]), true)
            .await
            .expect("write");
    }
    let intact_len = std::fs::metadata(&path).expect("metadata").len();
    {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open for append");
        file.write_all(&[0xab; 20]).expect("append garbage");
    }
    let disk = open_disk(&path);
    assert_eq!(&read_all(&disk).await[4096..8192], &[9u8; 4096][..]);
    drop(disk);
    assert_eq!(
        std::fs::metadata(&path).expect("metadata").len(),
        intact_len
    );
}

#[test]
fn new_overlay_file_has_mode_0600() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("sub/overlay");
    let _overlay = Overlay::open(&path, &identity("sha256:aa", SIZE)).expect("opens");
    let mode = |path: &Path| {
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(&dir.path().join("sub")), 0o700);
}

#[test]
fn temporary_overlay_is_removed_on_drop() {
    let dir = tempfile::tempdir().expect("temp dir");
    let overlay = Overlay::temporary(dir.path(), &identity("sha256:aa", SIZE)).expect("creates");
    let path = overlay.path().to_path_buf();
    assert!(path.exists());
    drop(overlay);
    assert!(!path.exists());
    assert_eq!(std::fs::read_dir(dir.path()).expect("read dir").count(), 0);
}

#[test]
fn mismatched_overlay_is_rejected() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("overlay");
    drop(Overlay::open(&path, &identity("sha256:aa", SIZE)).expect("creates"));
    let mut other_layout = identity("sha256:aa", SIZE);
    other_layout.layout_digest = [4; 32];
    let cases = [
        ("other_image", identity("sha256:bb", SIZE), "another image"),
        (
            "other_size",
            identity("sha256:aa", SIZE * 2),
            "another disk size",
        ),
        ("other_layout", other_layout, "another filesystem layout"),
    ];
    for (name, expected, reason) in cases {
        match Overlay::open(&path, &expected) {
            Err(error @ OverlayError::IdentityMismatch { .. }) => {
                assert!(error.to_string().contains(reason), "case {name}: {error}")
            }
            other => panic!("case {name}: expected a mismatch, got {other:?}"),
        }
    }
}

#[test]
fn overlay_in_use_is_rejected() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("overlay");
    let _first = Overlay::open(&path, &identity("sha256:aa", SIZE)).expect("creates");
    assert!(matches!(
        Overlay::open(&path, &identity("sha256:aa", SIZE)),
        Err(OverlayError::InUse { .. })
    ));
}

#[test]
fn file_that_is_not_an_overlay_is_rejected() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("overlay");
    std::fs::write(&path, b"not an overlay").expect("write");
    assert!(matches!(
        Overlay::open(&path, &identity("sha256:aa", SIZE)),
        Err(OverlayError::Header { .. })
    ));
}

/// Flips one byte of the overlay file at `offset`, in place.
fn flip_byte(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open the overlay file");
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, offset).expect("read a byte");
    byte[0] ^= 0x20;
    file.write_all_at(&byte, offset)
        .expect("write the flipped byte");
}

#[tokio::test]
async fn damaged_data_block_reads_eio() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("overlay");
    let disk = open_disk(&path);
    let data: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 253) as u8).collect();
    disk.write(3 * 4096, Bytes::from(data.clone()), false)
        .await
        .expect("write blocks 3..6");
    disk.flush().await.expect("flush");

    // Block 4 of a new overlay lives in slot 0.
    flip_byte(&path, format::slot_offset(SIZE, 0, 4) + 100);

    let error = disk
        .read(4 * 4096, 4096)
        .await
        .expect_err("block 4 is damaged");
    assert!(
        error.to_string().contains("overlay block 4"),
        "the error names the block: {error}"
    );
    let error = disk
        .read(3 * 4096 + 10, 8192)
        .await
        .expect_err("a read across block 4 fails");
    assert!(error.to_string().contains("checksum"), "{error}");
    assert_eq!(
        &disk.read(3 * 4096, 4096).await.expect("block 3")[..],
        &data[..4096]
    );
    assert_eq!(
        &disk.read(5 * 4096, 4096).await.expect("block 5")[..],
        &data[8192..]
    );
    assert_eq!(
        &disk
            .read(6 * 4096, 4096)
            .await
            .expect("block 6, from the image")[..],
        &base_model()[6 * 4096..7 * 4096]
    );

    // The damage is found again after a restart, and overwriting the block heals it.
    drop(disk);
    let disk = open_disk(&path);
    assert!(disk.read(4 * 4096, 4096).await.is_err(), "after reopen");
    disk.write(4 * 4096, Bytes::from(vec![7u8; 4096]), true)
        .await
        .expect("overwrite block 4");
    assert_eq!(
        &disk.read(4 * 4096, 4096).await.expect("rewritten block")[..],
        &[7u8; 4096][..]
    );
}

/// Random writes, zeroing and trims with flushes in between; the overlay is then
/// dropped without a flush, as by a crash. After reopening, every block reads as its
/// flushed state or its latest state, and no read fails its checksum.
#[tokio::test]
async fn unflushed_changes_read_old_or_new_after_crash() {
    for seed in 1..6 {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("overlay");
        let mut model = base_model();
        let mut flushed = model.clone();
        let mut random = Lcg(seed);
        {
            let disk = open_disk(&path);
            for step in 0..200u64 {
                let offset = random.below(SIZE - 1);
                let len = (random.below(3 * 4096) + 1).min(SIZE - offset);
                let range = offset as usize..(offset + len) as usize;
                match random.below(5) {
                    0..=2 => {
                        let byte = (step % 255 + 1) as u8;
                        disk.write(offset, Bytes::from(vec![byte; len as usize]), false)
                            .await
                            .expect("write");
                        model[range].fill(byte);
                    }
                    3 => {
                        disk.write_zeroes(offset, len as u32, false)
                            .await
                            .expect("write zeroes");
                        model[range].fill(0);
                    }
                    _ => {
                        disk.flush().await.expect("flush");
                        flushed.clone_from(&model);
                    }
                }
            }
        }

        let disk = open_disk(&path);
        let data = disk
            .read(0, SIZE as u32)
            .await
            .expect("no block fails its checksum");
        for block in 0..BLOCKS as usize {
            let span = block * 4096..(block + 1) * 4096;
            assert!(
                data[span.clone()] == flushed[span.clone()] || data[span.clone()] == model[span],
                "seed {seed}: block {block} is neither its flushed nor its latest state"
            );
        }
    }
}

#[test]
fn first_version_overlay_is_rejected() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("overlay");
    drop(Overlay::open(&path, &identity("sha256:aa", SIZE)).expect("creates"));

    // Rewrite the header as version 1 with a valid checksum.
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
    let end = format::HEADER_SIZE as usize - 4;
    let crc = crc32c::crc32c(&bytes[..end]);
    bytes[end..end + 4].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, &bytes).expect("write");

    match Overlay::open(&path, &identity("sha256:aa", SIZE)) {
        Err(error @ OverlayError::OldVersion { found: 1, .. }) => {
            assert!(error.to_string().contains("format version 1"), "{error}");
        }
        other => panic!("expected the old version error, got {other:?}"),
    }
}

/// A power loss can leave records written after the last flush on disk without
/// their data. Reopening drops those blocks: they read as their state at the
/// last flush, never as a checksum error, and later flushes keep that state.
#[tokio::test]
async fn unconfirmed_blocks_without_data_read_as_flushed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("overlay");
    {
        let disk = open_disk(&path);
        disk.write(0, Bytes::from(vec![1u8; 4096]), false)
            .await
            .expect("write block 0");
        disk.flush().await.expect("flush");
        // Block 0 again (into slot 1, since slot 0 is confirmed), block 2 for the
        // first time (slot 0), and a zeroing of block 5, none of them flushed.
        disk.write(0, Bytes::from(vec![2u8; 4096]), false)
            .await
            .expect("rewrite block 0");
        disk.write(2 * 4096, Bytes::from(vec![3u8; 4096]), false)
            .await
            .expect("write block 2");
        disk.write_zeroes(5 * 4096, 4096, false)
            .await
            .expect("zero block 5");
    }
    // The data of the two unflushed writes never reached the disk.
    flip_byte(&path, format::slot_offset(SIZE, 1, 0) + 10);
    flip_byte(&path, format::slot_offset(SIZE, 0, 2) + 10);

    let disk = open_disk(&path);
    let data = disk
        .read(0, 6 * 4096)
        .await
        .expect("no block fails its checksum");
    assert_eq!(&data[..4096], &[1u8; 4096][..], "block 0 as flushed");
    assert_eq!(
        &data[2 * 4096..3 * 4096],
        &base_model()[2 * 4096..3 * 4096],
        "block 2 from the image"
    );
    assert_eq!(&data[5 * 4096..], &[0u8; 4096][..], "zeroing kept");

    // The settled log holds: new writes and a flush, then another reopen.
    disk.write(4096, Bytes::from(vec![4u8; 4096]), false)
        .await
        .expect("write block 1");
    disk.flush().await.expect("flush");
    drop(disk);
    let disk = open_disk(&path);
    let data = disk.read(0, 6 * 4096).await.expect("reads after reopen");
    assert_eq!(&data[..4096], &[1u8; 4096][..], "block 0 still as flushed");
    assert_eq!(&data[4096..2 * 4096], &[4u8; 4096][..], "block 1 written");
    assert_eq!(&data[5 * 4096..], &[0u8; 4096][..], "block 5 still zero");
}
