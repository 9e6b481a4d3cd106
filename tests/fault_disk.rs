//! Cache directory faults while `esgz-nbd serve` runs: a full file system and
//! one remounted read-only keep serving from the image source, a flipped byte
//! in a cache file is refetched instead of served, during a run and after a
//! restart, and the cache is private. A flipped byte in the cache file of a
//! whole (plain tar.gz or tar) layer is repaired from a new download of the
//! layer's blob, or fails the reads of its block with EIO when the download
//! fails. Such a layer is unpacked into a temporary directory when the cache is
//! unusable.
//!
//! Needs root (tmpfs and ext4 mounts), loop devices, e2fsprogs, libnbd-bin,
//! docker-registry and skopeo.

#[path = "support/mod.rs"]
mod support;

use std::fs;
use std::os::unix::fs::{FileExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{
    esgz_bin, fixture_dir, gzip, gzip_layer, plain_gzip_image, plain_tar_layer,
    push_layout_unchanged, run, run_stdout, skopeo_push, write_layout, Fault, FaultProxy, Registry,
    RequestInfo, Server,
};

/// The log line that a cache write failure produces the first time.
const FALLBACK_MESSAGE: &str = "the cache cannot store chunks";

/// A small file system mounted for a test, unmounted on drop.
struct ScratchMount {
    path: PathBuf,
    /// The backing image of an ext4 scratch mount, kept until the unmount.
    _image: Option<tempfile::NamedTempFile>,
}

impl ScratchMount {
    /// Mounts a tmpfs of `size` (such as `256k`).
    fn tmpfs(path: &Path, size: &str) -> ScratchMount {
        fs::create_dir_all(path).expect("creating the tmpfs mount point");
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size},mode=0700"))
            .arg("tmpfs")
            .arg(path));
        ScratchMount {
            path: path.to_path_buf(),
            _image: None,
        }
    }

    /// Mounts a fresh 16 MiB ext4 image through a loop device with
    /// `errors=remount-ro`.
    fn ext4(path: &Path) -> ScratchMount {
        let image = tempfile::NamedTempFile::new().expect("creating the ext4 image file");
        image
            .as_file()
            .set_len(16 << 20)
            .expect("sizing the ext4 image");
        run(Command::new("mkfs.ext4").arg("-q").arg(image.path()));
        fs::create_dir_all(path).expect("creating the ext4 mount point");
        run(Command::new("mount")
            .args(["-o", "loop,errors=remount-ro"])
            .arg(image.path())
            .arg(path));
        ScratchMount {
            path: path.to_path_buf(),
            _image: Some(image),
        }
    }

    /// Makes the kernel report an ext4 error, which turns the file system
    /// read-only (findmnt then shows `emergency_ro`) even while files are open for writing (a plain `mount -o
    /// remount,ro` fails with EBUSY then).
    fn force_read_only(&self) {
        let source = run_stdout(
            Command::new("findmnt")
                .args(["-no", "SOURCE"])
                .arg(&self.path),
        );
        let device = Path::new(source.trim())
            .file_name()
            .expect("a device name")
            .to_owned();
        let trigger = Path::new("/sys/fs/ext4")
            .join(device)
            .join("trigger_fs_error");
        fs::write(&trigger, "esgz-nbd fault test\n")
            .unwrap_or_else(|error| panic!("writing {}: {error}", trigger.display()));
        let options = run_stdout(
            Command::new("findmnt")
                .args(["-no", "OPTIONS"])
                .arg(&self.path),
        );
        assert!(
            options.starts_with("ro") || options.contains("emergency_ro"),
            "the file system is still writable: {options}"
        );
    }
}

impl Drop for ScratchMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
        // The server's folder contains the mount point, and the server was dropped
        // first, so its removal of that folder failed while the mount was there.
        if let Some(parent) = self.path.parent() {
            let _ = fs::remove_dir_all(parent);
        }
    }
}

fn layout_image(fixture: &str) -> String {
    format!("oci:{}:latest", fixture_dir(fixture).join("oci").display())
}

/// Exports the fixture's disk with a roomy cache, as the expected bytes.
fn expected_disk(fixture: &str) -> Vec<u8> {
    expected_disk_of(&layout_image(fixture))
}

/// Exports `image` with a roomy cache, as the expected bytes.
fn expected_disk_of(image: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("temp dir");
    let image_path = dir.path().join("expected.img");
    run(Command::new(esgz_bin())
        .arg("export")
        .arg(image)
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .arg("--output")
        .arg(&image_path));
    fs::read(&image_path).expect("reading the exported image")
}

fn copy_disk(server: &Server) -> Vec<u8> {
    let output = server.dir().join("copy.img");
    let _ = fs::remove_file(&output);
    let result = Command::new("timeout")
        .arg("120")
        .arg("nbdcopy")
        .arg(server.uri())
        .arg(&output)
        .output()
        .expect("starting nbdcopy (apt-get install libnbd-bin)");
    assert!(
        result.status.success(),
        "nbdcopy failed: {}\nserver log:\n{}",
        String::from_utf8_lossy(&result.stderr),
        server.log()
    );
    fs::read(&output).expect("reading the copied disk")
}

fn assert_same_disk(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: disk size");
    if let Some(offset) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        panic!("{what}: wrong byte at disk offset {offset:#x}");
    }
}

/// Returns a server folder whose `cache/` is a scratch mount made by `mount`.
fn server_dir_with(mount: impl FnOnce(&Path) -> ScratchMount) -> (tempfile::TempDir, ScratchMount) {
    let dir = tempfile::Builder::new()
        .prefix("esgz-fault-disk-")
        .tempdir()
        .expect("temp dir");
    let mounted = mount(&dir.path().join("cache"));
    (dir, mounted)
}

fn count_matches(log: &str, needle: &str) -> usize {
    log.lines().filter(|line| line.contains(needle)).count()
}

/// The cache has room for 256 KiB of the 1.5 MB the basic fixture's disk needs: the
/// copy still equals the expected disk and the failure is logged once.
#[test]
fn full_cache_serves_from_source() {
    let expected = expected_disk("basic");
    let (dir, _tmpfs) = server_dir_with(|path| ScratchMount::tmpfs(path, "256k"));
    let server = Server::start_in(&layout_image("basic"), &["--io", "std"], dir);

    let first = copy_disk(&server);
    assert_same_disk(&first, &expected, "copy with a full cache");
    let second = copy_disk(&server);
    assert_same_disk(&second, &expected, "second copy with a full cache");

    let log = server.log();
    assert_eq!(
        count_matches(&log, FALLBACK_MESSAGE),
        1,
        "the full cache is not logged exactly once:\n{log}"
    );
    assert!(
        log.contains("Full"),
        "the log does not say the cache is full:\n{log}"
    );
}

/// The cache file system turns read-only while the server runs: reads go on
/// from the source and the condition is logged once.
#[test]
fn read_only_cache_serves_from_source() {
    let expected = expected_disk("basic");
    let (dir, scratch) = server_dir_with(ScratchMount::ext4);
    let server = Server::start_in(&layout_image("basic"), &[], dir);

    scratch.force_read_only();
    let disk = copy_disk(&server);
    assert_same_disk(&disk, &expected, "copy with a read-only cache");

    let log = server.log();
    assert_eq!(
        count_matches(&log, FALLBACK_MESSAGE),
        1,
        "the read-only cache is not logged exactly once:\n{log}"
    );
    assert!(
        log.contains("ReadOnly"),
        "the log does not say the cache is read-only:\n{log}"
    );
}

impl ScratchMount {
    /// Remounts the file system read-only; nothing may have a file open for writing.
    fn remount_read_only(&self) {
        run(Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(&self.path));
    }

    /// Fills the file system with one file until it has no free block left.
    fn fill(&self) {
        let fill = self.path.join("fill");
        let status = Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}", fill.display()))
            .arg("bs=4096")
            .stderr(std::process::Stdio::null())
            .status()
            .expect("starting dd");
        assert!(
            !status.success(),
            "dd ended before the file system was full"
        );
        let available = run_stdout(
            Command::new("df")
                .args(["--output=avail", "-B1"])
                .arg(&self.path),
        );
        assert_eq!(
            available.lines().last().map(str::trim),
            Some("0"),
            "free bytes left: {available}"
        );
    }
}

/// The cache file system is read-only before the server starts, once empty
/// and once holding an earlier run's cache: the server starts, serves every
/// byte from the source and logs the condition once.
#[test]
fn read_only_cache_at_start_serves_from_source() {
    let expected = expected_disk("basic");
    for earlier_run in [false, true] {
        let (dir, scratch) = server_dir_with(|path| ScratchMount::tmpfs(path, "16m"));
        let dir = if earlier_run {
            let server = Server::start_in(&layout_image("basic"), &[], dir);
            assert_same_disk(&copy_disk(&server), &expected, "run before the remount");
            server.stop().0
        } else {
            dir
        };
        scratch.remount_read_only();

        let server = Server::start_in(&layout_image("basic"), &[], dir);
        let case = if earlier_run {
            "earlier cache"
        } else {
            "empty cache"
        };
        assert_same_disk(&copy_disk(&server), &expected, case);
        assert_same_disk(&copy_disk(&server), &expected, case);
        assert_fallback_logged_once(&server.log(), "ReadOnly", case);
    }
}

/// The cache file system has no free block when the server starts: the server
/// starts, serves every byte from the source and logs the condition once.
#[test]
fn full_cache_at_start_serves_from_source() {
    let expected = expected_disk("basic");
    let (dir, scratch) = server_dir_with(|path| ScratchMount::tmpfs(path, "256k"));
    scratch.fill();
    let server = Server::start_in(&layout_image("basic"), &["--io", "std"], dir);

    assert_same_disk(&copy_disk(&server), &expected, "copy with a full cache");
    assert_same_disk(&copy_disk(&server), &expected, "second copy");
    assert_fallback_logged_once(&server.log(), "Full", "full cache at start");
}

/// Checks that the server log has the cache fallback warning exactly once and
/// names `condition` (`Full` or `ReadOnly`).
fn assert_fallback_logged_once(log: &str, condition: &str, case: &str) {
    assert_eq!(
        count_matches(log, FALLBACK_MESSAGE),
        1,
        "{case}: the fallback is not logged exactly once:\n{log}"
    );
    assert!(
        log.contains(condition),
        "{case}: the log does not name the condition {condition}:\n{log}"
    );
}

/// The log line of a cached block that no longer matches its checksum.
const CHANGED_BLOCK_MESSAGE: &str = "a block of a cached chunk changed on disk";

/// Flips the first non-zero byte of every layer data file in `layers`, in place
/// (the file keeps its length and other bytes); returns how many were flipped.
fn flip_first_data_byte(layers: &Path) -> usize {
    let mut flipped = 0;
    for entry in fs::read_dir(layers).expect("listing the cache files") {
        let path = entry.expect("a cache entry").path();
        if path.extension().is_none_or(|extension| extension != "data") {
            continue;
        }
        let bytes = fs::read(&path).expect("reading a cache file");
        let Some(offset) = bytes.iter().position(|byte| *byte != 0) else {
            continue;
        };
        let file = fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("opening a cache file for writing");
        file.write_all_at(&[bytes[offset] ^ 0xff], offset as u64)
            .expect("flipping a cache byte");
        flipped += 1;
    }
    flipped
}

/// A byte flipped in the cache file while the server runs, after every chunk
/// was cached, is caught by the block checksums: the copy after the damage
/// still equals the expected disk, the server logs the changed block, and the
/// registry sees the chunk fetched again.
#[test]
fn flipped_cache_byte_refetched_while_serving() {
    let expected = expected_disk("basic");
    let registry = Registry::start(None);
    let reference = skopeo_push(
        &fixture_dir("basic").join("oci"),
        "latest",
        &registry,
        "faults/flip",
    );
    let path = reference
        .strip_prefix(&format!("{}/", registry.addr()))
        .expect("the reference starts with the registry address")
        .to_string();
    let proxy = FaultProxy::start(&registry.addr(), Arc::new(|_| Fault::Pass));
    let server = Server::start(&format!("{}/{path}", proxy.addr()), &[]);

    assert_same_disk(&copy_disk(&server), &expected, "first copy");
    assert_same_disk(&copy_disk(&server), &expected, "warm copy");
    let requests_warm = proxy.requests();
    assert_same_disk(&copy_disk(&server), &expected, "second warm copy");
    assert_eq!(
        proxy.requests(),
        requests_warm,
        "a warm copy sent requests to the registry"
    );
    assert_eq!(
        count_matches(&server.log(), CHANGED_BLOCK_MESSAGE),
        0,
        "a block was reported changed before any damage:\n{}",
        server.log()
    );

    // Warm reads take the path that reads the page cache on the serving thread, so
    // the damage below is met by that path first.
    let stats = server.stats();
    assert!(
        stats["store"]["reads_without_wait"].as_u64() > Some(0),
        "warm copies did not read the page cache directly; stats: {stats}"
    );

    let flipped = flip_first_data_byte(&server.dir().join("cache/layers"));
    assert!(flipped > 0, "no cache file had data to damage");

    assert_same_disk(&copy_disk(&server), &expected, "copy after the damage");
    let log = server.log();
    assert_eq!(
        count_matches(&log, CHANGED_BLOCK_MESSAGE),
        flipped,
        "each flipped byte is not logged exactly once:\n{log}"
    );
    assert!(
        proxy.requests() > requests_warm,
        "the registry saw no refetch after the damage"
    );
    let stats = server.stats();
    assert_eq!(
        stats["store"]["cache_checksum_failures"].as_u64(),
        Some(flipped as u64),
        "stats: {stats}"
    );

    // The refetched chunks are good again: one more copy needs no request.
    let requests_after = proxy.requests();
    assert_same_disk(&copy_disk(&server), &expected, "copy after the refetch");
    assert_eq!(
        proxy.requests(),
        requests_after,
        "the refetched chunks were not cached again"
    );
}

/// A byte flipped in a cache file between two runs is not served: each
/// chunk's crc32 in the index file is checked on its first read after the
/// restart, and a changed chunk is fetched again.
#[test]
fn flipped_cache_byte_not_served_after_restart() {
    let expected = expected_disk("basic");
    let image = layout_image("basic");
    let server = Server::start(&image, &[]);
    assert_same_disk(&copy_disk(&server), &expected, "first run");
    let (dir, _) = server.stop();

    let layers = dir.path().join("cache/layers");
    let mut flipped = 0;
    for entry in fs::read_dir(&layers).expect("listing the cache files") {
        let path = entry.expect("a cache entry").path();
        let mut bytes = fs::read(&path).expect("reading a cache file");
        if let Some(byte) = bytes.iter_mut().find(|byte| **byte != 0) {
            *byte ^= 0xff;
            flipped += 1;
        }
        fs::write(&path, &bytes).expect("writing the damaged cache file");
    }
    assert!(flipped > 0, "no cache file had data to damage");

    let server = Server::start_in(&image, &[], dir);
    assert_same_disk(&copy_disk(&server), &expected, "run after the damage");
}

/// The log line of a changed block in a whole layer's cache file.
const WHOLE_LAYER_CHANGED_MESSAGE: &str = "a block of a whole layer's cache file changed on disk";

/// Size of each nbdsh read of [`read_blocks`].
const READ_BLOCK: usize = 4096;

/// Reads the whole disk of `server` in 4 KiB reads with nbdsh. Returns the bytes read
/// (zeros where a read failed) and the offsets of the reads that failed; any failure
/// other than EIO fails the test.
fn read_blocks(server: &Server) -> (Vec<u8>, Vec<u64>) {
    read_blocks_into(server, "blocks.img")
}

/// Does what [`read_blocks`] does, with the bytes written to `name` in the server's
/// folder, so several readers can run at once.
fn read_blocks_into(server: &Server, name: &str) -> (Vec<u8>, Vec<u64>) {
    let output = server.dir().join(name);
    let script = format!(
        "import errno, nbd\n\
         size = h.get_size()\n\
         out = open({output:?}, 'wb')\n\
         for offset in range(0, size, {READ_BLOCK}):\n\
         \x20   length = min({READ_BLOCK}, size - offset)\n\
         \x20   try:\n\
         \x20       out.write(h.pread(length, offset))\n\
         \x20   except nbd.Error as error:\n\
         \x20       if error.errnum != errno.EIO:\n\
         \x20           raise\n\
         \x20       print(offset)\n\
         \x20       out.write(bytes(length))\n\
         out.close()\n",
        output = output.display().to_string(),
    );
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let result = Command::new("timeout")
        .arg("120")
        .arg("nbdsh")
        .env("PATH", path)
        .arg("-u")
        .arg(server.uri())
        .arg("-c")
        .arg(&script)
        .output()
        .expect("starting nbdsh (apt-get install libnbd-bin python3-libnbd)");
    assert!(
        result.status.success(),
        "nbdsh failed: {}\nserver log:\n{}",
        String::from_utf8_lossy(&result.stderr),
        server.log()
    );
    let failed = String::from_utf8_lossy(&result.stdout)
        .lines()
        .map(|line| line.trim().parse().expect("nbdsh printed a read offset"))
        .collect();
    (fs::read(&output).expect("reading the nbdsh output"), failed)
}

/// Damages the whole layer's cache file under `server` and checks what a reader sees:
/// the reads of the changed block fail with EIO, every other read returns the expected
/// bytes, a whole-disk nbdcopy fails instead of copying a wrong byte, and the change is
/// logged once and counted once.
fn assert_whole_layer_damage_not_served(server: &Server, expected: &[u8], case: &str) {
    assert_eq!(
        flip_first_data_byte(&server.dir().join("cache/layers")),
        1,
        "{case}: the cache has one whole-layer data file"
    );

    let mut first_failed = None;
    for attempt in ["first", "second"] {
        let (bytes, failed) = read_blocks(server);
        assert_eq!(bytes.len(), expected.len(), "{case}: disk size");
        assert!(
            !failed.is_empty() && failed.len() <= 2,
            "{case}, {attempt} read: expected the reads of the flipped block to fail, \
             failed at {failed:x?}\nserver log:\n{}",
            server.log()
        );
        for (index, (got, want)) in bytes
            .chunks(READ_BLOCK)
            .zip(expected.chunks(READ_BLOCK))
            .enumerate()
        {
            let offset = (index * READ_BLOCK) as u64;
            if !failed.contains(&offset) {
                assert!(
                    got == want,
                    "{case}, {attempt} read: wrong bytes served at disk offset {offset:#x}"
                );
            }
        }
        match &first_failed {
            None => first_failed = Some(failed),
            Some(first) => assert_eq!(&failed, first, "{case}: the failing reads changed"),
        }
    }

    let copy = Command::new("timeout")
        .arg("120")
        .arg("nbdcopy")
        .arg(server.uri())
        .arg(server.dir().join("damaged-copy.img"))
        .output()
        .expect("starting nbdcopy (apt-get install libnbd-bin)");
    assert!(
        !copy.status.success(),
        "{case}: nbdcopy copied a disk whose cache file was damaged"
    );

    let log = server.log();
    assert_eq!(
        count_matches(&log, WHOLE_LAYER_CHANGED_MESSAGE),
        1,
        "{case}: the changed block is not logged exactly once:\n{log}"
    );
    let stats = server.stats();
    assert_eq!(
        stats["store"]["cache_checksum_failures"].as_u64(),
        Some(1),
        "{case}: stats: {stats}"
    );
}

/// Writes an OCI layout under `dir` whose only layer is the `basic` fixture's input tar
/// as a plain tar.gz, and returns its image argument.
fn plain_basic_image(dir: &Path) -> String {
    let input = fs::read(fixture_dir("basic").join("input.tar")).expect("reading input.tar");
    plain_gzip_image(&dir.join("oci"), gzip(&input))
}

/// The kinds of whole layer: the `basic` fixture's input tar as a tar.gz and as an
/// uncompressed tar.
const WHOLE_LAYER_KINDS: [&str; 2] = ["tar.gz", "tar"];

/// An image with one whole layer pushed to a local registry, served through a fault
/// proxy that counts the blob requests and can delay or damage them.
struct WholeLayerImage {
    /// The registry behind the proxy; `None` once the test stopped it.
    registry: Option<Registry>,
    /// Kept running for the image's lifetime.
    _proxy: FaultProxy,
    /// Blob requests the proxy received, with or without a fault.
    blob_requests: Arc<AtomicU64>,
    /// The fault for blob requests; `Fault::Pass` at first.
    blob_fault: Arc<Mutex<Fault>>,
    /// The image reference through the proxy.
    reference: String,
    /// The disk exported from the OCI layout the image was pushed from.
    expected: Vec<u8>,
    _layout: tempfile::TempDir,
}

impl WholeLayerImage {
    /// Writes the `basic` input tar as a one-layer image of `kind` (`tar.gz` or `tar`),
    /// exports its expected disk and pushes it to a new registry.
    fn push(kind: &str) -> WholeLayerImage {
        let layout = tempfile::tempdir().expect("temp dir");
        let oci = layout.path().join("oci");
        let input = fs::read(fixture_dir("basic").join("input.tar")).expect("reading input.tar");
        let layer = match kind {
            "tar.gz" => gzip_layer(gzip(&input)),
            "tar" => plain_tar_layer(input),
            other => panic!("unknown whole layer kind {other}"),
        };
        write_layout(&oci, &[layer]);
        let expected = expected_disk_of(&format!("oci:{}:latest", oci.display()));

        let registry = Registry::start(None);
        let repo = format!("faults/whole-{}", kind.replace('.', "-"));
        let pushed = push_layout_unchanged(&oci, &registry, &repo);
        let path = pushed
            .strip_prefix(&format!("{}/", registry.addr()))
            .expect("the reference starts with the registry address")
            .to_string();

        let blob_requests = Arc::new(AtomicU64::new(0));
        let blob_fault = Arc::new(Mutex::new(Fault::Pass));
        let plan = {
            let blob_requests = Arc::clone(&blob_requests);
            let blob_fault = Arc::clone(&blob_fault);
            Arc::new(move |request: &RequestInfo| {
                if !request.path.contains("/blobs/") || request.method != "GET" {
                    return Fault::Pass;
                }
                blob_requests.fetch_add(1, Ordering::SeqCst);
                *blob_fault.lock().expect("fault lock")
            })
        };
        let proxy = FaultProxy::start(&registry.addr(), plan);
        let reference = format!("{}/{path}", proxy.addr());
        WholeLayerImage {
            registry: Some(registry),
            _proxy: proxy,
            blob_requests,
            blob_fault,
            reference,
            expected,
            _layout: layout,
        }
    }

    fn set_blob_fault(&self, fault: Fault) {
        *self.blob_fault.lock().expect("fault lock") = fault;
    }

    fn blob_requests(&self) -> u64 {
        self.blob_requests.load(Ordering::SeqCst)
    }
}

/// Returns the only `.data` file under the server's `cache/layers` and its bytes.
fn whole_layer_data_file(server: &Server, case: &str) -> (PathBuf, Vec<u8>) {
    let layers = server.dir().join("cache/layers");
    let mut data = fs::read_dir(&layers)
        .expect("listing the cache files")
        .map(|entry| entry.expect("a cache entry").path())
        .filter(|path| {
            path.extension()
                .is_some_and(|extension| extension == "data")
        });
    let path = data
        .next()
        .unwrap_or_else(|| panic!("{case}: no data file in {}", layers.display()));
    assert!(data.next().is_none(), "{case}: more than one data file");
    let bytes = fs::read(&path).expect("reading the whole layer's data file");
    (path, bytes)
}

/// Reads the whole disk with four nbdsh readers at once and checks that every read
/// returns the expected bytes.
fn assert_concurrent_reads_correct(server: &Server, expected: &[u8], case: &str) {
    std::thread::scope(|scope| {
        let readers: Vec<_> = (0..4)
            .map(|reader| {
                scope.spawn(move || read_blocks_into(server, &format!("reader-{reader}.img")))
            })
            .collect();
        for (reader, handle) in readers.into_iter().enumerate() {
            let (bytes, failed) = handle.join().expect("a reader thread panicked");
            assert!(
                failed.is_empty(),
                "{case}, reader {reader}: reads failed at {failed:x?}\nserver log:\n{}",
                server.log()
            );
            assert_same_disk(&bytes, expected, &format!("{case}, reader {reader}"));
        }
    });
}

/// Flips the first non-zero byte of the whole layer's cache file under the running
/// server while blob requests are delayed by 2 s, then reads the disk with four
/// concurrent readers. Every read must return the expected bytes, and the change must be
/// logged once. The layer's blob must be fetched once from the registry, and the cache
/// file must get its original bytes back. Returns the blob requests the repair made.
fn assert_whole_layer_repaired(server: &Server, image: &WholeLayerImage, case: &str) -> u64 {
    let (path, original) = whole_layer_data_file(server, case);
    let stats_before = server.stats();
    let refetches_before = stats_before["store"]["whole_layer_refetches"]
        .as_u64()
        .unwrap_or_else(|| panic!("{case}: no whole_layer_refetches in {stats_before}"));
    let requests_before = image.blob_requests();

    assert_eq!(
        flip_first_data_byte(&server.dir().join("cache/layers")),
        1,
        "{case}: the cache has one whole-layer data file"
    );
    image.set_blob_fault(Fault::Delay(Duration::from_secs(2)));
    assert_concurrent_reads_correct(server, &image.expected, case);
    image.set_blob_fault(Fault::Pass);

    let log = server.log();
    assert_eq!(
        count_matches(&log, WHOLE_LAYER_CHANGED_MESSAGE),
        1,
        "{case}: the changed block is not logged exactly once:\n{log}"
    );
    assert_eq!(
        count_matches(&log, WHOLE_LAYER_REPAIRED_MESSAGE),
        usize::try_from(refetches_before).expect("a small count") + 1,
        "{case}: the repair is not logged once:\n{log}"
    );
    let stats = server.stats();
    assert_eq!(
        stats["store"]["whole_layer_refetches"].as_u64(),
        Some(refetches_before + 1),
        "{case}: the concurrent readers did not share one refetch: {stats}"
    );
    let repaired_before = stats_before["store"]["whole_layer_chunks_repaired"]
        .as_u64()
        .unwrap_or_default();
    assert_eq!(
        stats["store"]["whole_layer_chunks_repaired"].as_u64(),
        Some(repaired_before + 1),
        "{case}: stats: {stats}"
    );
    let requests = image.blob_requests() - requests_before;
    assert!(
        requests > 0,
        "{case}: the registry saw no refetch of the blob"
    );
    assert!(
        fs::read(&path).expect("reading the repaired data file") == original,
        "{case}: the cache file does not hold its original bytes after the repair"
    );

    // The repaired file serves a whole copy without another request.
    let requests_after = image.blob_requests();
    assert_same_disk(&copy_disk(server), &image.expected, case);
    assert_eq!(
        image.blob_requests(),
        requests_after,
        "{case}: a copy after the repair sent blob requests"
    );
    requests
}

/// The log line of a repair of a whole layer's cache file that failed.
const WHOLE_LAYER_REPAIR_FAILED_MESSAGE: &str = "failed to repair the whole layer's cache file";

/// The log line of a whole layer's cache file repaired from its blob.
const WHOLE_LAYER_REPAIRED_MESSAGE: &str = "repaired the whole layer's cache file from its blob";

/// A tar.gz layer and an uncompressed tar layer, served from a registry, are unpacked
/// whole into their cache file at start. A byte flipped in that file under the running
/// server is caught by the block checksums and repaired: the layer's blob is fetched
/// again once, however many readers wait, and every read returns the expected bytes.
/// After a restart, which unpacks the layer again, a second flip is repaired the same
/// way.
#[test]
fn flipped_whole_layer_byte_refetched() {
    for kind in WHOLE_LAYER_KINDS {
        let image = WholeLayerImage::push(kind);
        let server = Server::start(&image.reference, &[]);
        assert!(
            server.log().contains("not lazy"),
            "{kind}: the layer was not fetched whole:\n{}",
            server.log()
        );
        assert_same_disk(&copy_disk(&server), &image.expected, kind);
        let requests = assert_whole_layer_repaired(&server, &image, &format!("{kind}, first run"));
        let (dir, _) = server.stop();

        let server = Server::start_in(&image.reference, &[], dir);
        assert_same_disk(&copy_disk(&server), &image.expected, kind);
        assert_eq!(
            count_matches(&server.log(), WHOLE_LAYER_CHANGED_MESSAGE),
            0,
            "{kind}: the restart served the damaged cache file:\n{}",
            server.log()
        );
        let again =
            assert_whole_layer_repaired(&server, &image, &format!("{kind}, after the restart"));
        assert_eq!(
            again, requests,
            "{kind}: the second repair made a different number of blob requests"
        );
    }
}

/// The repair of a flipped byte in a whole layer's cache file cannot succeed: once with
/// the registry stopped, once with every blob response damaged by the proxy (so the
/// refetched blob fails its digest). The reads of the changed block fail with EIO, every
/// other read returns the expected bytes, and within the back-off the failing reads do
/// not fetch the layer again.
#[test]
fn whole_layer_refetch_failure_reads_eio() {
    for case in ["registry stopped", "blob damaged"] {
        let mut image = WholeLayerImage::push("tar.gz");
        let server = Server::start(
            &image.reference,
            &["--retries", "1", "--fetch-deadline", "10"],
        );
        assert_same_disk(&copy_disk(&server), &image.expected, case);
        let requests_before = image.blob_requests();

        if case == "registry stopped" {
            drop(image.registry.take());
        } else {
            image.set_blob_fault(Fault::FlipByte);
        }
        assert_whole_layer_damage_not_served(&server, &image.expected, case);

        let stats = server.stats();
        assert_eq!(
            stats["store"]["whole_layer_refetches"].as_u64(),
            Some(1),
            "{case}: the failing reads started more than one refetch: {stats}"
        );
        assert_eq!(
            stats["store"]["whole_layer_chunks_repaired"].as_u64(),
            Some(0),
            "{case}: stats: {stats}"
        );
        assert!(
            image.blob_requests() > requests_before,
            "{case}: the refetch sent no blob request"
        );
        assert_eq!(
            count_matches(&server.log(), WHOLE_LAYER_REPAIR_FAILED_MESSAGE),
            1,
            "{case}: the failed repair is not logged once:\n{}",
            server.log()
        );
    }
}

/// The log line of a whole layer unpacked outside the cache directory.
const WHOLE_LAYER_FALLBACK_MESSAGE: &str = "the cache directory cannot hold the whole layer";

/// Returns the value of `field=` in the first log line that contains `message`.
fn log_field<'a>(log: &'a str, message: &str, field: &str) -> Option<&'a str> {
    let line = log.lines().find(|line| line.contains(message))?;
    let start = line.find(&format!("{field}="))? + field.len() + 1;
    line[start..].split_whitespace().next()
}

/// A plain tar.gz layer, which is unpacked whole at start, with a cache directory that
/// is read-only or full before the server starts: the layer is unpacked into a temporary
/// directory instead, the server serves the right disk, the condition is logged once,
/// and neither a partial cache file nor the temporary directory is left behind.
#[test]
fn unusable_cache_at_start_whole_layer() {
    let layout = tempfile::tempdir().expect("temp dir");
    let image = plain_basic_image(layout.path());
    let expected = expected_disk_of(&image);

    for case in ["read-only", "full"] {
        let (dir, scratch) = if case == "full" {
            let (dir, scratch) = server_dir_with(|path| ScratchMount::tmpfs(path, "256k"));
            scratch.fill();
            (dir, scratch)
        } else {
            let (dir, scratch) = server_dir_with(|path| ScratchMount::tmpfs(path, "16m"));
            scratch.remount_read_only();
            (dir, scratch)
        };

        let server = Server::start_in(&image, &[], dir);
        assert_same_disk(&copy_disk(&server), &expected, case);
        assert_same_disk(&copy_disk(&server), &expected, case);

        let log = server.log();
        assert_eq!(
            count_matches(&log, WHOLE_LAYER_FALLBACK_MESSAGE),
            1,
            "{case}: the fallback is not logged exactly once:\n{log}"
        );
        let temporary = log_field(&log, WHOLE_LAYER_FALLBACK_MESSAGE, "temporary_dir")
            .unwrap_or_else(|| {
                panic!("{case}: the log does not name the temporary directory:\n{log}")
            });
        assert!(
            !Path::new(temporary).exists(),
            "{case}: the temporary directory {temporary} is left behind"
        );
        if let Ok(entries) = fs::read_dir(scratch.path.join("layers")) {
            for entry in entries {
                let name = entry.expect("a cache entry").file_name();
                assert!(
                    !name.to_string_lossy().ends_with(".partial"),
                    "{case}: a partial cache file is left: {name:?}"
                );
            }
        }
    }
}

/// Returns the `/proc/PID/fd` link of the deleted whole-layer data file that the server
/// process `pid` still has open.
fn deleted_data_file(pid: u32) -> PathBuf {
    let fds = PathBuf::from(format!("/proc/{pid}/fd"));
    for entry in fs::read_dir(&fds).expect("listing the server's descriptors") {
        let fd = entry.expect("a descriptor").path();
        let Ok(target) = fs::read_link(&fd) else {
            continue;
        };
        let target = target.to_string_lossy();
        if target.contains(".data") && target.ends_with("(deleted)") {
            return fd;
        }
    }
    panic!("the server has no deleted whole-layer data file open");
}

/// Flips the first non-zero byte of the file at `path`, in place.
fn flip_first_non_zero_byte(path: &Path) {
    let bytes = fs::read(path).expect("reading the data file");
    let offset = bytes
        .iter()
        .position(|byte| *byte != 0)
        .expect("the data file has a non-zero byte");
    let file = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|error| panic!("opening {}: {error}", path.display()));
    file.write_all_at(&[bytes[offset] ^ 0xff], offset as u64)
        .expect("flipping a byte of the data file");
}

/// A plain tar.gz layer unpacked into the temporary directory because the cache
/// directory is read-only at start: that directory is deleted once the store opened
/// the file, so the repair of a flipped byte downloads the blob into `$TMPDIR` instead.
/// Every read returns the expected bytes and the file gets its original bytes back.
#[test]
fn whole_layer_in_temporary_dir_repaired() {
    let layout = tempfile::tempdir().expect("temp dir");
    let image = plain_basic_image(layout.path());
    let expected = expected_disk_of(&image);
    let (dir, scratch) = server_dir_with(|path| ScratchMount::tmpfs(path, "16m"));
    scratch.remount_read_only();
    let server = Server::start_in(&image, &[], dir);
    assert_same_disk(&copy_disk(&server), &expected, "copy before the damage");

    let data_file = deleted_data_file(server.pid().expect("the server runs"));
    let original = fs::read(&data_file).expect("reading the deleted data file");
    flip_first_non_zero_byte(&data_file);
    let (bytes, failed) = read_blocks(&server);
    assert!(
        failed.is_empty(),
        "reads failed at {failed:x?}\nserver log:\n{}",
        server.log()
    );
    assert_same_disk(&bytes, &expected, "reads after the damage");

    let stats = server.stats();
    assert_eq!(
        stats["store"]["whole_layer_refetches"].as_u64(),
        Some(1),
        "stats: {stats}"
    );
    assert_eq!(
        stats["store"]["whole_layer_chunks_repaired"].as_u64(),
        Some(1),
        "stats: {stats}"
    );
    assert!(
        fs::read(&data_file).expect("reading the repaired data file") == original,
        "the deleted data file does not hold its original bytes after the repair"
    );
}

/// The cache folders are 0700 and the cache files 0600, also under a umask
/// that would allow more.
#[test]
fn cache_files_private() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = dir.path().join("new-cache");
    let output = Command::new("sh")
        .arg("-c")
        .arg("umask 000 && exec \"$@\"")
        .arg("sh")
        .arg(esgz_bin())
        .arg("export")
        .arg(layout_image("links"))
        .arg("--cache-dir")
        .arg(&cache)
        .arg("--output")
        .arg(dir.path().join("out.img"))
        .output()
        .expect("running esgz-nbd export");
    assert!(
        output.status.success(),
        "export failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    let mode = |path: &Path| {
        fs::metadata(path)
            .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(&cache), 0o700, "cache folder mode");
    assert_eq!(mode(&cache.join("layers")), 0o700, "layers folder mode");
    let mut files = 0;
    for entry in fs::read_dir(cache.join("layers")).expect("listing the cache files") {
        let path = entry.expect("a cache entry").path();
        assert_eq!(mode(&path), 0o600, "{} mode", path.display());
        files += 1;
    }
    assert!(files > 0, "the export wrote no cache file");
}
