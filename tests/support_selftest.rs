//! Tests of the integration-test harness in `tests/support` against real
//! tools: GNU tar, mke2fs, e2fsck, the kernel's ext4, nbdkit, qemu-nbd,
//! nbdfuse, docker-registry and skopeo. Most tests need root.

#[path = "support/mod.rs"]
mod support;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{
    assert_tree_matches, compare_tree, e2fsck_clean, fixture_dir, port_is_open, run,
    sample_expected_json, sample_oci_dir, skopeo_manifest_digest, skopeo_push, LoopMount, NbdMount,
    Registry,
};

/// Extracts a tar (plain or compressed) with GNU tar as root, keeping owners,
/// modes, mtimes and every xattr.
fn extract_tar(tar: &Path, into: &Path) {
    run(Command::new("tar")
        .args([
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "--delay-directory-restore",
            "-xpf",
        ])
        .arg(tar)
        .arg("-C")
        .arg(into));
}

/// Returns the input tar of a single-layer fixture.
fn fixture_input_tar(name: &str) -> PathBuf {
    let dir = fixture_dir(name);
    ["input.tar", "input.tar.gz"]
        .iter()
        .map(|file| dir.join(file))
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("{} has no input.tar or input.tar.gz", dir.display()))
}

fn read_json(path: &Path) -> Value {
    let text = fs::read_to_string(path)
        .unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|error| panic!("parsing {}: {error}", path.display()))
}

/// Extracts a fixture's input tar into a new temp folder.
fn extract_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("creating a temp folder");
    extract_tar(&fixture_input_tar(name), dir.path());
    dir
}

/// Checks that extracting a fixture's input tar gives exactly `merged_tree`.
/// The builder-added files (landmarks, `stargz.index.json`) are only in the
/// eStargz blob, never in the input tar, so none may appear.
fn check_tar_extraction(name: &str) {
    let extracted = extract_fixture(name);
    let expected = fixture_dir(name).join("expected.json");
    for extra in read_json(&expected)["plain_extraction_extra_paths"]
        .as_array()
        .expect("plain_extraction_extra_paths is a list")
    {
        let path = extra.as_str().unwrap_or_default().trim_start_matches('/');
        assert!(
            !extracted.path().join(path).exists(),
            "{name}: the input tar contains the builder-added {path}"
        );
    }
    assert_tree_matches(extracted.path(), &expected);
}

#[test]
fn tar_extraction_matches_basic() {
    check_tar_extraction("basic");
}

#[test]
fn tar_extraction_matches_links() {
    check_tar_extraction("links");
}

#[test]
fn tar_extraction_matches_xattrs() {
    check_tar_extraction("xattrs");
}

#[test]
fn tar_extraction_matches_large() {
    check_tar_extraction("large");
}

/// Sets a file's mtime (not following symlinks) with touch.
fn set_mtime(path: &Path, seconds: i64) {
    run(Command::new("touch")
        .arg("-h")
        .arg("-d")
        .arg(format!("@{seconds}"))
        .arg(path));
}

#[test]
fn compare_tree_reports_each_change() {
    let extracted = extract_fixture("links");
    let root = extracted.path();
    let expected = fixture_dir("links").join("expected.json");
    assert_eq!(
        compare_tree(root, &expected),
        Vec::<String>::new(),
        "before any change"
    );

    // One change per checked property, each on its own path.
    run(Command::new("chmod").arg("0700").arg(root.join("sub")));
    let content = fs::read(root.join("target/file")).expect("reading target/file");
    fs::write(root.join("target/file"), vec![b'x'; content.len()]).expect("rewriting target/file");
    xattr::set(root.join("target/file"), "user.comment", b"added").expect("setting an xattr");
    fs::remove_file(root.join("other/three_3")).expect("removing other/three_3");
    run(Command::new("cp")
        .arg("-p")
        .arg(root.join("hl/three"))
        .arg(root.join("other/three_3")));
    fs::remove_file(root.join("rel_link")).expect("removing rel_link");
    std::os::unix::fs::symlink("elsewhere", root.join("rel_link")).expect("re-creating rel_link");
    fs::remove_file(root.join("dangling")).expect("removing dangling");
    fs::write(root.join("extra"), b"not in the image").expect("adding a file");
    set_mtime(&root.join("len59"), 1);
    run(Command::new("chown")
        .arg("-h")
        .arg("1")
        .arg(root.join("dev/fifo")));
    // The edits above moved these mtimes; put them back.
    for path in ["", "other", "rel_link", "target/file"] {
        set_mtime(&root.join(path), 1700000000);
    }

    let mismatches = compare_tree(root, &expected);
    let expected_lines = [
        "/sub: mode 0700, expected 0755",
        "/target/file: content sha256:",
        "/target/file: unexpected xattr user.comment = \"added\"",
        "/other/three_3: inode ",
        "/hl/three: link count 2, expected 3",
        "/hl/three_2: link count 2, expected 3",
        "/other/three_3: link count 1, expected 3",
        "/rel_link: symlink target \"elsewhere\", expected \"target/file\"",
        "/dangling: missing",
        "/extra: extra path",
        "/len59: mtime 1, expected 1700000000",
        "/dev/fifo: uid 1, expected 0",
    ];
    for line in expected_lines {
        assert!(
            mismatches.iter().any(|found| found.starts_with(line)),
            "no mismatch starts with {line:?}; found:\n{}",
            mismatches.join("\n")
        );
    }
    assert_eq!(
        mismatches.len(),
        expected_lines.len(),
        "unexpected extra mismatches:\n{}",
        mismatches.join("\n")
    );
}

#[test]
fn compare_tree_reports_xattr_value() {
    let extracted = extract_fixture("xattrs");
    let root = extracted.path();
    xattr::set(root.join("xattr/user_text"), "user.comment", b"changed").expect("setting an xattr");
    xattr::remove(root.join("xattr/user_empty"), "user.empty").expect("removing an xattr");

    let mismatches = compare_tree(root, &fixture_dir("xattrs").join("expected.json"));
    assert_eq!(
        mismatches,
        vec![
            "/xattr/user_empty: xattr user.empty missing".to_string(),
            "/xattr/user_text: xattr user.comment is \"changed\", expected \"hello world\""
                .to_string(),
        ]
    );
}

/// The sample image's blob is a valid tar.gz: a plain extraction gives
/// `merged_tree` plus the builder-added files.
#[test]
fn sample_blob_matches_sidecar() {
    let sidecar = read_json(&sample_expected_json());
    let digest = sidecar["layers"][0]["blob_digest"]
        .as_str()
        .expect("blob_digest");
    let blob = sample_oci_dir()
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    let extracted = tempfile::tempdir().expect("creating a temp folder");
    extract_tar(&blob, extracted.path());

    for extra in sidecar["plain_extraction_extra_paths"]
        .as_array()
        .expect("a list")
    {
        let path = extracted
            .path()
            .join(extra.as_str().unwrap_or_default().trim_start_matches('/'));
        fs::remove_file(&path)
            .unwrap_or_else(|error| panic!("removing {}: {error}", path.display()));
    }
    // Removing the landmarks changed the root's mtime, and the root is
    // implicit in the sidecar, so nothing else depends on it.
    assert_tree_matches(extracted.path(), &sample_expected_json());
}

/// Sends `GET /v2/` and returns the HTTP status line.
fn get_v2_status(port: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connecting to the registry");
    stream
        .write_all(b"GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .expect("sending the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("reading the response");
    response.lines().next().unwrap_or_default().to_string()
}

fn wait_until_stopped(pid: u32, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        sleep(Duration::from_millis(50));
    }
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "registry PID {pid} still runs"
    );
    assert!(!port_is_open(port), "port {port} still accepts connections");
}

#[test]
fn registry_serves_push_and_stops() {
    let registry = Registry::start(None);
    let (pid, port) = (registry.pid(), registry.port());
    assert!(
        get_v2_status(port).contains(" 200 "),
        "GET /v2/ was not answered with 200"
    );

    let reference = skopeo_push(&sample_oci_dir(), "latest", &registry, "sample");
    assert_eq!(reference, format!("127.0.0.1:{port}/sample:latest"));
    let sidecar = read_json(&sample_expected_json());
    assert_eq!(
        skopeo_manifest_digest(&reference, &registry),
        sidecar["oci_layout"]["manifest_digest"]
            .as_str()
            .expect("manifest_digest"),
        "the registry changed the manifest"
    );

    drop(registry);
    wait_until_stopped(pid, port);
}

#[test]
fn registry_with_auth_requires_credentials() {
    let registry = Registry::start_with_auth("tester", "secret-password");
    let (pid, port) = (registry.pid(), registry.port());
    assert!(
        get_v2_status(port).contains(" 401 "),
        "GET /v2/ without credentials was not rejected with 401"
    );

    let reference = skopeo_push(&sample_oci_dir(), "latest", &registry, "private/sample");
    let sidecar = read_json(&sample_expected_json());
    assert_eq!(
        skopeo_manifest_digest(&reference, &registry),
        sidecar["oci_layout"]["manifest_digest"]
            .as_str()
            .expect("manifest_digest")
    );

    drop(registry);
    wait_until_stopped(pid, port);
}

/// Writes an ext4 image of a fixture's input tree with `mke2fs -d`, which
/// copies owners, modes, xattrs, devices and hard links. Its mtimes differ in
/// two ways, see `MKE2FS_MISMATCHES`.
fn make_ext4_image(fixture: &str, folder: &Path) -> PathBuf {
    let tree = folder.join("tree");
    fs::create_dir(&tree).expect("creating the tree folder");
    extract_tar(&fixture_input_tar(fixture), &tree);
    let image = folder.join("disk.img");
    run(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-d"])
        .arg(&tree)
        .arg(&image)
        .arg("160M"));
    image
}

fn is_mounted(path: &Path) -> bool {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").expect("reading /proc/self/mountinfo");
    let needle = path.to_string_lossy().into_owned();
    mountinfo
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(needle.as_str()))
}

/// What `mke2fs -d` (e2fsprogs 1.47.0) does not copy, per fixture: it leaves
/// the root directory's mtime at the build time, and it stores mtimes in 32
/// bits, so 2100-01-01 wraps to 4102444800 - 2^32.
const MKE2FS_MISMATCHES: &[(&str, &[&str])] = &[
    ("links", &["/: mtime "]),
    (
        "basic",
        &["/etc/mtime_2100: mtime -192522496, expected 4102444800"],
    ),
    ("xattrs", &[]),
];

/// Compares a tree made from a fixture by mke2fs and checks that exactly the
/// known mke2fs differences appear.
fn assert_mke2fs_tree_matches(root: &Path, fixture: &str) {
    let known: &[&str] = MKE2FS_MISMATCHES
        .iter()
        .find(|(name, _)| *name == fixture)
        .map(|(_, lines)| *lines)
        .unwrap_or_else(|| panic!("no MKE2FS_MISMATCHES entry for {fixture}"));
    let mismatches = compare_tree(root, &fixture_dir(fixture).join("expected.json"));
    for line in known {
        assert!(
            mismatches.iter().any(|found| found.starts_with(line)),
            "{fixture}: the known mke2fs difference {line:?} is not reported; found:\n{}",
            mismatches.join("\n")
        );
    }
    assert_eq!(
        mismatches.len(),
        known.len(),
        "{fixture}: differences beyond the known mke2fs ones:\n{}",
        mismatches.join("\n")
    );
}

fn check_loop_mount(fixture: &str) {
    let folder = tempfile::tempdir().expect("creating a temp folder");
    let image = make_ext4_image(fixture, folder.path());
    e2fsck_clean(&image);

    let mount = LoopMount::new(&image);
    let mount_point = mount.path().to_path_buf();
    assert!(
        is_mounted(&mount_point),
        "{} is not in mountinfo",
        mount_point.display()
    );
    // The image has /lost+found and the fixture does not; compare_tree allows it.
    assert!(mount_point.join("lost+found").is_dir());
    assert_mke2fs_tree_matches(&mount_point, fixture);

    drop(mount);
    assert!(
        !is_mounted(&mount_point),
        "{} is still mounted",
        mount_point.display()
    );
}

#[test]
fn loop_mount_of_mke2fs_image_links() {
    check_loop_mount("links");
}

#[test]
fn loop_mount_of_mke2fs_image_basic() {
    check_loop_mount("basic");
}

#[test]
fn loop_mount_of_mke2fs_image_xattrs() {
    check_loop_mount("xattrs");
}

#[test]
fn e2fsck_clean_rejects_corrupt_image() {
    let folder = tempfile::tempdir().expect("creating a temp folder");
    let image = make_ext4_image("links", folder.path());
    // Zero the primary superblock (1024 bytes at offset 1024). The image has
    // backups, but -n forbids e2fsck to repair from them, so it must fail.
    let mut bytes = fs::read(&image).expect("reading the image");
    bytes[1024..2048].fill(0);
    fs::write(&image, bytes).expect("writing the image");

    let result = std::panic::catch_unwind(|| e2fsck_clean(&image));
    let message = match result {
        Ok(()) => panic!("e2fsck_clean accepted an image without a superblock"),
        Err(payload) => payload
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default(),
    };
    assert!(
        message.contains("e2fsck -fn"),
        "the panic names the command: {message}"
    );
}

/// An NBD server process that the test started; dropping it kills it.
struct NbdServer {
    child: Child,
    socket: PathBuf,
}

impl NbdServer {
    fn start(mut command: Command, socket: PathBuf) -> NbdServer {
        let child = command
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("starting {command:?}: {error}"));
        let mut server = NbdServer { child, socket };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !server.socket.exists() {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("{command:?} exited with {status} before it created its socket");
            }
            assert!(
                Instant::now() < deadline,
                "{command:?} created no socket within 10 s"
            );
            sleep(Duration::from_millis(20));
        }
        server
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn check_nbd_mount(export_name: &str, server_command: impl FnOnce(&Path, &Path) -> Command) {
    let folder = tempfile::tempdir().expect("creating a temp folder");
    let image = make_ext4_image("links", folder.path());
    let socket = folder.path().join("nbd.sock");
    let _server = NbdServer::start(server_command(&socket, &image), socket.clone());

    let mount = if export_name.is_empty() {
        NbdMount::new(&socket)
    } else {
        NbdMount::with_export(&socket, export_name)
    };
    let mount_point = mount.path().to_path_buf();
    let device_file = mount.device_file();
    assert_eq!(
        fs::metadata(&device_file)
            .expect("stat of the nbdfuse file")
            .len(),
        fs::metadata(&image).expect("stat of the image").len(),
        "the nbdfuse file has the export's size"
    );
    e2fsck_clean(&device_file);
    assert_mke2fs_tree_matches(&mount_point, "links");

    drop(mount);
    assert!(
        !is_mounted(&mount_point),
        "{} is still mounted",
        mount_point.display()
    );
    let fuse_dir = device_file
        .parent()
        .expect("the nbdfuse file has a parent")
        .to_path_buf();
    assert!(
        !is_mounted(&fuse_dir),
        "nbdfuse is still mounted on {}",
        fuse_dir.display()
    );
}

#[test]
fn nbd_mount_over_nbdkit() {
    check_nbd_mount("", |socket, image| {
        let mut command = Command::new("nbdkit");
        command
            .args(["--foreground", "--readonly", "--unix"])
            .arg(socket)
            .arg("file")
            .arg(image);
        command
    });
}

#[test]
fn nbd_mount_over_qemu_nbd() {
    // qemu-nbd rejects any other export name, so this checks that the name
    // reaches the server, with its space percent-encoded in the URI.
    check_nbd_mount("links image", |socket, image| {
        let mut command = Command::new("qemu-nbd");
        // nbdfuse opens up to 4 connections when the server allows
        // multi-conn; qemu-nbd serves one client unless --shared sets more.
        command
            .args([
                "--read-only",
                "--persistent",
                "--shared=8",
                "--format=raw",
                "--export-name=links image",
                "--socket",
            ])
            .arg(socket)
            .arg(image);
        command
    });
}

#[test]
fn loop_mount_teardown_fails_loudly_when_busy() {
    let folder = tempfile::tempdir().expect("creating a temp folder");
    let image = make_ext4_image("links", folder.path());
    let mount = LoopMount::new(&image);
    let mount_point = mount.path().to_path_buf();
    let device = mount.loop_device().to_path_buf();
    // An open file keeps the mount busy, so umount fails on every retry.
    let open_file =
        fs::File::open(mount_point.join("target/file")).expect("opening a file in the mount");

    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(mount)));
    drop(open_file);
    // Clean up what the failed teardown left, before any assertion can fail.
    let cleanup_umount = Command::new("umount").arg(&mount_point).status();
    let cleanup_detach = Command::new("losetup")
        .arg("--detach")
        .arg(&device)
        .status();
    let _ = fs::remove_dir_all(mount_point.parent().expect("the mount point has a parent"));

    let message = match result {
        Ok(()) => panic!("dropping a busy LoopMount did not panic"),
        Err(payload) => payload
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default(),
    };
    assert!(
        message.contains("LoopMount teardown failed"),
        "panic message: {message}"
    );
    assert!(
        message.contains("umount"),
        "the panic names the failed step: {message}"
    );
    assert!(
        cleanup_umount
            .map(|status| status.success())
            .unwrap_or(false),
        "manual umount failed"
    );
    assert!(
        cleanup_detach
            .map(|status| status.success())
            .unwrap_or(false),
        "manual losetup --detach failed"
    );
}
