//! Writable serving end to end: `serve --writable` mounted read-write by the
//! kernel's ext4 through nbdfuse and a loop device, writes kept in the
//! overlay across restarts, the chunk cache untouched, TRIM and
//! WRITE_ZEROES through nbdsh, FLUSH durability across `kill -9`, and EIO
//! for an overlay data block whose bytes changed on disk.
//!
//! Needs root, loop devices, FUSE, e2fsprogs, libnbd-bin and python3-libnbd.

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use support::{e2fsck_clean, esgz_bin, run, run_stdout, try_run, Server};

fn image(name: &str) -> String {
    let dir = match name {
        "sample" => support::sample_oci_dir(),
        fixture => support::fixture_dir(fixture).join("oci"),
    };
    format!("oci:{}:latest", dir.display())
}

/// An NBD export shown as a file by nbdfuse (read-write), attached to a loop
/// device and mounted read-write as ext4, journal included. Drop unmounts,
/// detaches and stops nbdfuse.
struct RwMount {
    work: tempfile::TempDir,
    nbdfuse: Option<Child>,
    loop_device: Option<String>,
    mounted: bool,
}

impl RwMount {
    fn new(socket: &Path) -> RwMount {
        let work = tempfile::Builder::new()
            .prefix("esgz-rw-mount-")
            .tempdir()
            .expect("temp dir");
        let fuse_dir = work.path().join("fuse");
        let mount_point = work.path().join("mnt");
        fs::create_dir(&fuse_dir).expect("fuse dir");
        fs::create_dir(&mount_point).expect("mount point");
        let pid_file = work.path().join("nbdfuse.pid");
        let log = fs::File::create(work.path().join("nbdfuse.log")).expect("log");
        let child = Command::new("nbdfuse")
            .arg("--pidfile")
            .arg(&pid_file)
            .arg(fuse_dir.join("disk"))
            .arg(format!("nbd+unix:///?socket={}", socket.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("nbdfuse starts (apt-get install libnbd-bin fuse3)");
        let mut mount = RwMount {
            work,
            nbdfuse: Some(child),
            loop_device: None,
            mounted: false,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while fs::read_to_string(&pid_file)
            .unwrap_or_default()
            .trim()
            .is_empty()
        {
            assert!(Instant::now() < deadline, "nbdfuse did not start");
            sleep(Duration::from_millis(20));
        }
        let device = run_stdout(
            Command::new("losetup")
                .args(["--find", "--show"])
                .arg(fuse_dir.join("disk")),
        );
        mount.loop_device = Some(device.trim().to_string());
        run(Command::new("mount")
            .args(["-t", "ext4"])
            .arg(device.trim())
            .arg(&mount_point));
        mount.mounted = true;
        let options = fs::read_to_string("/proc/mounts").expect("mounts");
        let line = options
            .lines()
            .find(|line| line.contains(mount_point.to_str().unwrap_or("")))
            .unwrap_or("")
            .to_string();
        assert!(line.contains(" rw,"), "the mount is read-write: {line}");
        mount
    }

    fn path(&self) -> PathBuf {
        self.work.path().join("mnt")
    }
}

/// Retries a command that can fail with "busy" right after the last user goes.
fn retry(command: impl Fn() -> Command) {
    let mut last = String::new();
    for _ in 0..50 {
        match try_run(&mut command()) {
            Ok(_) => return,
            Err(error) => last = error,
        }
        sleep(Duration::from_millis(100));
    }
    panic!("teardown step failed: {last}");
}

impl Drop for RwMount {
    fn drop(&mut self) {
        if self.mounted {
            let mount_point = self.path();
            retry(|| {
                let mut command = Command::new("umount");
                command.arg(&mount_point);
                command
            });
        }
        if let Some(device) = self.loop_device.take() {
            retry(|| {
                let mut command = Command::new("losetup");
                command.arg("--detach").arg(&device);
                command
            });
        }
        if let Some(mut child) = self.nbdfuse.take() {
            let fuse_dir = self.work.path().join("fuse");
            retry(|| {
                let mut command = Command::new("fusermount3");
                command.arg("-u").arg(&fuse_dir);
                command
            });
            let _ = child.wait();
        }
    }
}

/// SHA-256 of every file under `dir`, by relative path.
fn hash_tree(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        for entry in fs::read_dir(&current).expect("read dir") {
            let entry = entry.expect("dir entry");
            let path = entry.path();
            if entry.file_type().expect("file type").is_dir() {
                stack.push(path);
            } else {
                let bytes = fs::read(&path).expect("read cache file");
                let relative = path.strip_prefix(dir).expect("under dir").to_path_buf();
                out.insert(relative, support::sha256_digest(&bytes));
            }
        }
    }
    out
}

/// First regular file (by sorted path) under `root`, skipping lost+found.
fn first_regular_file(root: &Path) -> Option<PathBuf> {
    let mut entries: Vec<PathBuf> = fs::read_dir(root)
        .ok()?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .collect();
    entries.sort();
    for path in entries {
        let metadata = fs::symlink_metadata(&path).ok()?;
        if metadata.is_file() && metadata.len() > 0 {
            return Some(path);
        }
        if metadata.is_dir() && !path.ends_with("lost+found") {
            if let Some(found) = first_regular_file(&path) {
                return Some(found);
            }
        }
    }
    None
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).expect("metadata").permissions().mode() & 0o777
}

/// Runs `esgz-nbd serve` expecting it to fail at start; returns its stderr.
fn serve_expecting_failure(image: &str, dir: &Path, extra: &[&str]) -> String {
    let output = Command::new("timeout")
        .arg("120")
        .arg(esgz_bin())
        .arg("serve")
        .arg(image)
        .arg("--socket")
        .arg(dir.join("refused.sock"))
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .args(extra)
        .output()
        .expect("esgz-nbd runs");
    assert!(
        !output.status.success() && output.status.code() != Some(124),
        "serve should fail at start, got {}",
        output.status
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The full writable cycle on one image.
fn check_writable_cycle(name: &str) {
    let image = image(name);
    let keep = tempfile::tempdir().expect("temp dir");
    let overlay = keep.path().join("private/overlay");
    let overlay_arg = overlay.to_str().expect("utf-8 path");
    let args = ["--writable", "--size", "64M", "--overlay", overlay_arg];

    let server = Server::start(&image, &args);
    let scratch = tempfile::tempdir().expect("temp dir");
    // Read everything once, so the cache holds all the data before any write.
    run(Command::new("nbdcopy")
        .arg(server.uri())
        .arg(scratch.path().join("before.img")));
    let cache_before = hash_tree(&server.dir().join("cache"));
    assert!(!cache_before.is_empty(), "the cache has files");

    let modified;
    let deleted;
    {
        let mount = RwMount::new(server.socket());
        let root = mount.path();
        fs::write(root.join("created.txt"), b"written through the overlay\n").expect("create");
        fs::create_dir(root.join("created-dir")).expect("mkdir");
        fs::write(root.join("created-dir/big.bin"), vec![0x5au8; 3 << 20]).expect("big file");
        let target = first_regular_file(&root).expect("the image has a regular file");
        fs::write(&target, b"modified\n").expect("modify an image file");
        modified = target
            .strip_prefix(&root)
            .expect("under root")
            .to_path_buf();
        let victim = root.join("created-dir/victim");
        fs::write(&victim, b"short-lived").expect("create victim");
        run(&mut Command::new("sync"));
        fs::remove_file(&victim).expect("delete");
        deleted = PathBuf::from("created-dir/victim");
        run(&mut Command::new("sync"));
    }

    let copied = scratch.path().join("after.img");
    run(Command::new("nbdcopy").arg(server.uri()).arg(&copied));
    e2fsck_clean(&copied);
    let logdump = run_stdout(Command::new("debugfs").args(["-R", "logdump"]).arg(&copied));
    assert!(
        logdump.contains("Journal starts at block"),
        "logdump: {logdump}"
    );

    assert_eq!(
        hash_tree(&server.dir().join("cache")),
        cache_before,
        "writes changed the chunk cache"
    );
    assert_eq!(mode(&overlay), 0o600, "overlay file mode");
    assert_eq!(
        mode(overlay.parent().expect("parent")),
        0o700,
        "overlay dir mode"
    );

    let (dir, log) = server.stop();
    assert!(log.contains("serving writable"), "log: {log}");

    // The same image and overlay again: the writes are there.
    let server = Server::start_in(&image, &args, dir);
    {
        let mount = RwMount::new(server.socket());
        let root = mount.path();
        assert_eq!(
            fs::read(root.join("created.txt")).expect("created file"),
            b"written through the overlay\n"
        );
        assert_eq!(
            fs::read(root.join(&modified)).expect("modified file"),
            b"modified\n"
        );
        let big = fs::read(root.join("created-dir/big.bin")).expect("big file");
        assert!(big.len() == 3 << 20 && big.iter().all(|&byte| byte == 0x5a));
        assert!(!root.join(&deleted).exists(), "deleted file came back");
    }
    let (_dir, _log) = server.stop();

    // Another image, or the same image with another --size, is rejected.
    let other = if name == "basic" { "links" } else { "basic" };
    let refused = tempfile::tempdir().expect("temp dir");
    let stderr = serve_expecting_failure(&self::image(other), refused.path(), &args);
    assert!(
        stderr.contains("does not match this image"),
        "stderr: {stderr}"
    );
    assert!(stderr.contains("another image"), "stderr: {stderr}");
    let stderr = serve_expecting_failure(
        &image,
        refused.path(),
        &["--writable", "--size", "128M", "--overlay", overlay_arg],
    );
    assert!(
        stderr.contains("does not match this image"),
        "stderr: {stderr}"
    );
}

#[test]
fn writable_cycle_sample() {
    check_writable_cycle("sample");
}

#[test]
fn writable_cycle_basic() {
    check_writable_cycle("basic");
}

#[test]
fn temporary_overlay_is_removed_at_exit() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tmp = dir.path().join("tmp");
    fs::create_dir(&tmp).expect("tmp dir");
    // The temporary overlay goes to TMPDIR; point it at a folder we can list.
    let server = Killable::start_with(&image("basic"), dir.path(), &["--writable"], Some(&tmp));
    nbdsh(&server.uri(), "h.pwrite(b'x' * 4096, 0); h.flush()");
    let entries: Vec<_> = fs::read_dir(&tmp).expect("list").collect();
    assert_eq!(
        entries.len(),
        1,
        "one temporary overlay folder while serving"
    );
    let folder = entries[0].as_ref().expect("entry").path();
    assert_eq!(mode(&folder), 0o700, "temporary overlay folder mode");
    assert_eq!(
        mode(&folder.join("overlay")),
        0o600,
        "temporary overlay mode"
    );
    server.terminate();
    assert_eq!(
        fs::read_dir(&tmp).expect("list").count(),
        0,
        "the temporary overlay stays after exit; log:\n{}",
        fs::read_to_string(dir.path().join("crash.log")).unwrap_or_default()
    );
}

/// Runs a Python snippet in nbdsh connected to `uri`; `h` is the handle.
fn nbdsh(uri: &str, script: &str) -> String {
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    run_stdout(
        Command::new("nbdsh")
            .env("PATH", path)
            .args(["-u", uri, "-c", script]),
    )
}

#[test]
fn trim_and_write_zeroes_read_back_zeros() {
    let server = Server::start(&image("basic"), &["--writable", "--size", "16M"]);
    let script = r#"
import nbd
assert not h.is_read_only()
assert h.can_trim() and h.can_zero() and h.can_fua() and h.can_flush()
size = h.get_size()
base = size - (8 << 20)
pattern = bytes(range(256)) * 256
h.pwrite(pattern * 4, base)
h.flush()
assert h.pread(len(pattern) * 4, base) == pattern * 4

# WRITE_ZEROES over whole and partial blocks.
h.zero(10000, base + 100)
got = h.pread(len(pattern) * 4, base)
assert got[:100] == pattern[:100], "bytes before the zeroed range"
assert got[100:10100] == bytes(10000), "zeroed range"
assert got[10100:] == (pattern * 4)[10100:], "bytes after the zeroed range"

# TRIM of whole blocks reads back zeros.
h.pwrite(pattern * 4, base + 65536, nbd.CMD_FLAG_FUA)
h.trim(65536, base + 65536)
assert h.pread(65536, base + 65536) == bytes(65536), "trimmed range"

# Zeroing image blocks (not yet in the overlay) reads back zeros too.
h.zero(8192, 0, nbd.CMD_FLAG_FUA)
assert h.pread(8192, 0) == bytes(8192)
# Unaligned write over an image block keeps its neighbours.
before = h.pread(4096, 8192)
h.pwrite(b"abc", 8192 + 10)
after = h.pread(4096, 8192)
assert after == before[:10] + b"abc" + before[13:]
print("ok")
"#;
    assert_eq!(nbdsh(&server.uri(), script).trim(), "ok");
}

/// A server process that the test can kill with SIGKILL.
struct Killable {
    child: Child,
    socket: PathBuf,
}

impl Killable {
    fn start(image: &str, dir: &Path, overlay: &Path) -> Killable {
        let overlay = overlay.to_str().expect("utf-8 path");
        let args = ["--writable", "--size", "256M", "--overlay", overlay];
        Killable::start_with(image, dir, &args, None)
    }

    fn start_with(image: &str, dir: &Path, args: &[&str], tmpdir: Option<&Path>) -> Killable {
        let socket = dir.join("crash.sock");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("crash.log"))
            .expect("log");
        let mut command = Command::new(esgz_bin());
        command
            .arg("serve")
            .arg(image)
            .arg("--socket")
            .arg(&socket)
            .arg("--cache-dir")
            .arg(dir.join("cache"))
            .args(args)
            .env("RUST_LOG", "esgz_nbd=debug");
        if let Some(tmpdir) = tmpdir {
            command.env("TMPDIR", tmpdir);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("serve starts");
        let deadline = Instant::now() + Duration::from_secs(120);
        while UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "server did not start");
            sleep(Duration::from_millis(20));
        }
        Killable { child, socket }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the server with SIGTERM, the way an operator does, and waits.
    fn terminate(mut self) {
        // SAFETY: kill with a valid signal number on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let status = self.child.wait().expect("wait for the server");
        assert!(status.success(), "server exit status {status}");
    }
}

impl Drop for Killable {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn flushed_writes_survive_kill_9() {
    let image = image("basic");
    let dir = tempfile::tempdir().expect("temp dir");
    let overlay = dir.path().join("overlay");
    // (offset, length, byte) of every write whose FLUSH completed.
    let mut flushed: Vec<(u64, u64, u8)> = Vec::new();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };

    for round in 0..4u64 {
        let server = Killable::start(&image, dir.path(), &overlay);
        for &(offset, length, byte) in &flushed {
            let script = format!(
                "assert h.pread({length}, {offset}) == bytes([{byte}]) * {length}, 'flushed write at {offset} lost'"
            );
            nbdsh(&server.uri(), &script);
        }

        // Flushed writes in the first 64 MiB, unaligned and of varied length.
        let offset = round * (8 << 20) + next() % (4 << 20);
        let length = 1 + next() % (256 << 10);
        let byte = (round + 1) as u8 * 37;
        let script = format!("h.pwrite(bytes([{byte}]) * {length}, {offset}); h.flush()");
        nbdsh(&server.uri(), &script);
        flushed.push((offset, length, byte));

        // The rewritten area of the previous round: every block as flushed (0xdd)
        // or as rewritten without a flush (0xee), and none fails its checksum.
        if round > 0 {
            check_rewritten_area(&server.uri());
        }
        let script = format!("h.pwrite(b'\\xdd' * {REWRITTEN_LEN}, {REWRITTEN_AT}); h.flush()");
        nbdsh(&server.uri(), &script);

        // Unflushed writes over the 0xdd area, far from the checked writes,
        // interrupted by SIGKILL at a random point.
        let noise = format!("import itertools\nfor i in itertools.count():\n    h.pwrite(b'\\xee' * 65536, {REWRITTEN_AT} + (i % 512) * 65536)\n");
        let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
        let mut writer = Command::new("nbdsh")
            .env("PATH", path)
            .args(["-u", &server.uri(), "-c", &noise])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nbdsh starts");
        sleep(Duration::from_millis(50 + next() % 400));
        server.kill();
        let _ = writer.kill();
        let _ = writer.wait();
    }

    let server = Killable::start(&image, dir.path(), &overlay);
    for &(offset, length, byte) in &flushed {
        let script = format!(
            "assert h.pread({length}, {offset}) == bytes([{byte}]) * {length}, 'flushed write at {offset} lost'"
        );
        nbdsh(&server.uri(), &script);
    }
    check_rewritten_area(&server.uri());
    server.kill();
}

/// Start and length of the area that the crash test flushes as 0xdd and then
/// rewrites as 0xee without a flush.
const REWRITTEN_AT: u64 = 128 << 20;
const REWRITTEN_LEN: u64 = 32 << 20;

/// Checks that every 4 KiB block of the rewritten area reads as all 0xdd or all 0xee.
fn check_rewritten_area(uri: &str) {
    let script = format!(
        "data = h.pread({REWRITTEN_LEN}, {REWRITTEN_AT})\n\
         for i in range(0, len(data), 4096):\n\
         \x20   block = data[i:i + 4096]\n\
         \x20   assert block in (b'\\xdd' * 4096, b'\\xee' * 4096), f'block at {{i}} is mixed'\n\
         print('ok')"
    );
    assert_eq!(nbdsh(uri, &script).trim(), "ok");
}

/// A byte flipped in the overlay data area under a running server: the read of
/// that block fails with EIO, its neighbours read as written, and the server
/// keeps serving, also after a restart.
#[test]
fn damaged_overlay_block_reads_eio() {
    let image = image("basic");
    let dir = tempfile::tempdir().expect("temp dir");
    let overlay = dir.path().join("overlay");
    let server = Killable::start(&image, dir.path(), &overlay);

    // Blocks 16384..16387 (64 MiB on), written once and flushed, so they are in slot 0.
    let first_block: u64 = 16384;
    let write = format!(
        "h.pwrite(bytes(range(256)) * 48, {}); h.flush()",
        first_block * 4096
    );
    nbdsh(&server.uri(), &write);

    // Slot 0 of block N is at byte 4096 + N * 4096 of the overlay file.
    let damaged = first_block + 1;
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&overlay)
        .expect("open the overlay file");
    let at = 4096 + damaged * 4096 + 77;
    let mut byte = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut byte, at).expect("read a byte");
    byte[0] ^= 0x01;
    std::os::unix::fs::FileExt::write_all_at(&file, &byte, at).expect("flip the byte");
    drop(file);

    let check = format!(
        r#"
import errno
import nbd
pattern = bytes(range(256)) * 16
assert h.pread(4096, {before}) == pattern, "block before the damaged one"
assert h.pread(4096, {after}) == pattern, "block after the damaged one"
for offset, length in (({damaged}, 4096), ({damaged} + 100, 1), ({before}, 12288)):
    try:
        h.pread(length, offset)
    except nbd.Error as error:
        # libnbd's Python binding gives the errno as a number or as its name.
        name = errno.errorcode.get(error.errno, error.errno)
        assert name == "EIO", f"errno {{error.errno}}: {{error}}"
    else:
        raise AssertionError(f"read of {{length}} bytes at {{offset}} succeeded")
assert len(h.pread(1 << 20, 0)) == 1 << 20, "the server still serves image blocks"
print("ok")
"#,
        before = first_block * 4096,
        damaged = damaged * 4096,
        after = (first_block + 2) * 4096,
    );
    assert_eq!(nbdsh(&server.uri(), &check).trim(), "ok");
    assert_eq!(
        nbdsh(&server.uri(), &check).trim(),
        "ok",
        "the server serves a second connection"
    );
    server.terminate();

    let log = fs::read_to_string(dir.path().join("crash.log")).expect("server log");
    assert_eq!(
        log.matches("an overlay data block does not match its checksum")
            .count(),
        1,
        "the damaged block is not logged once at warn level:\n{log}"
    );

    let server = Killable::start(&image, dir.path(), &overlay);
    assert_eq!(nbdsh(&server.uri(), &check).trim(), "ok", "after a restart");
    server.terminate();
}

/// A completed write survives a SIGKILL of the server even without a FLUSH:
/// `attach --reattach` gives a new server to a kernel that keeps its
/// filesystem mounted and trusts every write the killed server completed.
#[test]
fn completed_writes_survive_kill_9_without_flush() {
    let image = image("basic");
    let dir = tempfile::tempdir().expect("temp dir");
    let overlay = dir.path().join("overlay");

    let server = Killable::start(&image, dir.path(), &overlay);
    let script = "h.pwrite(b'\\x5a' * 12288, 40960)\n\
                  h.zero(8192, 4096)\n\
                  h.pwrite(b'\\xa5' * 100, 200000)\n\
                  print('written')";
    assert_eq!(nbdsh(&server.uri(), script).trim(), "written");
    server.kill();

    let server = Killable::start(&image, dir.path(), &overlay);
    let script = "assert h.pread(12288, 40960) == b'\\x5a' * 12288, 'write lost'\n\
                  assert h.pread(4096, 8192) == bytes(4096), 'zeroing lost'\n\
                  assert h.pread(100, 200000) == b'\\xa5' * 100, 'partial-block write lost'\n\
                  print('ok')";
    assert_eq!(nbdsh(&server.uri(), script).trim(), "ok");
    server.kill();
}
