//! Cache directory faults while `esgz-nbd serve` runs: a full file system and
//! one remounted read-only keep serving from the image source, a flipped byte
//! in a cache file is refetched instead of served, during a run and after a
//! restart, and the cache is private. A flipped byte in the cache file of a
//! whole (plain tar.gz) layer fails the reads of its block with EIO, and such a
//! layer is unpacked into a temporary directory when the cache is unusable.
//!
//! Needs root (tmpfs and ext4 mounts), loop devices, e2fsprogs, libnbd-bin,
//! docker-registry and skopeo.

#[path = "support/mod.rs"]
mod support;

use std::fs;
use std::os::unix::fs::{FileExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use support::{
    esgz_bin, fixture_dir, gzip, plain_gzip_image, run, run_stdout, skopeo_push, Fault, FaultProxy,
    Registry, Server,
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
    let output = server.dir().join("blocks.img");
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

/// A plain tar.gz layer is unpacked whole into its cache file at start. A byte flipped
/// in that file under the running server is caught by the block checksums: the reads
/// of that block fail with EIO and all others return the right bytes. A restart fetches
/// the layer again and serves the whole disk correctly; the block checksums the first
/// run recorded in the index catch a byte flipped under the second run too.
#[test]
fn flipped_whole_layer_byte_not_served() {
    let layout = tempfile::tempdir().expect("temp dir");
    let image = plain_basic_image(layout.path());
    let expected = expected_disk_of(&image);

    let server = Server::start(&image, &[]);
    assert!(
        server.log().contains("not lazy"),
        "the layer was not fetched whole:\n{}",
        server.log()
    );
    assert_same_disk(&copy_disk(&server), &expected, "copy before the damage");
    assert_whole_layer_damage_not_served(&server, &expected, "first run");
    let (dir, _) = server.stop();

    let server = Server::start_in(&image, &[], dir);
    assert_same_disk(&copy_disk(&server), &expected, "copy after the restart");
    assert_eq!(
        count_matches(&server.log(), WHOLE_LAYER_CHANGED_MESSAGE),
        0,
        "the restart served the damaged cache file:\n{}",
        server.log()
    );
    assert_whole_layer_damage_not_served(&server, &expected, "after the restart");
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
