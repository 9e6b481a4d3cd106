//! `serve --record-access`: the files that NBD clients read, recorded in
//! first-read order through a real kernel ext4 mount (nbdfuse and a loop
//! device), and fed back to `convert --prioritize`.
//!
//! Needs root (losetup, mount), nbdfuse, and Go with Debian's
//! stargz-snapshotter library package for the reference checker.

#[path = "support/mod.rs"]
mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::{esgz_bin, read_toc, run_stdout, verify_layout, NbdMount, Server};

/// Files of the test root filesystem: name and size. Each is larger than
/// the kernel's read-ahead window, so reading one file never reaches the
/// blocks of the next.
const FILES: [(&str, usize); 5] = [
    ("bin/first", 300 * 1024),
    ("bin/other", 300 * 1024),
    ("etc/config", 300 * 1024),
    ("lib/second", 300 * 1024),
    ("lib/unread", 300 * 1024),
];

fn esgz(args: &[&str]) -> String {
    let mut command = Command::new(esgz_bin());
    command.arg("-q").args(args);
    run_stdout(&mut command).trim().to_string()
}

/// Returns the content of test file `index`: a pattern that differs per
/// file, so a read of the wrong blocks shows.
fn content(index: usize, size: usize) -> Vec<u8> {
    (0..size)
        .map(|position| ((position * 31 + index * 7) % 251) as u8)
        .collect()
}

/// Writes the test root filesystem and builds it into `oci:LAYOUT:v1`.
fn build_image(work: &Path) -> String {
    let root = work.join("rootfs");
    for (index, (name, size)) in FILES.iter().enumerate() {
        let path = root.join(name);
        fs::create_dir_all(path.parent().expect("parent")).expect("create folders");
        fs::write(&path, content(index, *size)).expect("write a test file");
    }
    let image = format!("oci:{}:v1", work.join("layout").display());
    esgz(&[
        "build",
        root.to_str().expect("utf-8 path"),
        &image,
        "--compression-level",
        "1",
    ]);
    image
}

/// Reads `name` from the mounted tree and checks its content.
fn read_and_check(mount: &NbdMount, name: &str) {
    let index = FILES
        .iter()
        .position(|(file, _)| *file == name)
        .unwrap_or_else(|| panic!("{name} is not a test file"));
    let bytes = fs::read(mount.path().join(name)).expect("reading through the mount");
    assert!(
        bytes == content(index, FILES[index].1),
        "{name} read through the mount differs from the file built"
    );
}

fn record_lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_else(|error| panic!("reading {}: {error}", path.display()))
        .lines()
        .map(str::to_string)
        .collect()
}

/// Returns the names of the regular files before `.prefetch.landmark` in
/// the TOC of layer 0, panicking if the landmark is missing.
fn prioritized_files(layout: &Path) -> Vec<String> {
    let (toc, _) = read_toc(layout, 0);
    let entries = toc["entries"].as_array().expect("TOC entries");
    let landmark = entries
        .iter()
        .position(|entry| entry["name"] == ".prefetch.landmark")
        .unwrap_or_else(|| panic!("no .prefetch.landmark in the TOC: {toc}"));
    entries[..landmark]
        .iter()
        .filter(|entry| entry["type"] == "reg")
        .map(|entry| entry["name"].as_str().expect("entry name").to_string())
        .collect()
}

#[test]
fn record_access_then_prioritize() {
    let work = tempfile::tempdir().expect("temp dir");
    let image = build_image(work.path());
    let record = work.path().join("access.txt");
    let record_arg = record.to_str().expect("utf-8 path");

    // Read two files, the later name first; read the first one again.
    let server = Server::start(&image, &["--record-access", record_arg]);
    {
        let mount = NbdMount::unbuffered(server.socket());
        read_and_check(&mount, "lib/second");
        read_and_check(&mount, "bin/first");
        read_and_check(&mount, "lib/second");
    }
    // The lines are on disk while the server still runs.
    assert_eq!(record_lines(&record), ["/lib/second", "/bin/first"]);
    let mode = fs::metadata(&record).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "record file mode {mode:o}");
    let (_, log) = server.stop();
    assert_eq!(
        record_lines(&record),
        ["/lib/second", "/bin/first"],
        "server log:\n{log}"
    );

    // The recorded files lead the converted layer, before the landmark.
    let converted = work.path().join("prioritized");
    esgz(&[
        "convert",
        &image,
        &format!("oci:{}:v2", converted.display()),
        "--force",
        "--compression-level",
        "1",
        "--prioritize",
        record_arg,
    ]);
    assert_eq!(
        prioritized_files(&converted),
        ["lib/second", "bin/first"],
        "regular files before .prefetch.landmark"
    );
    let layers = verify_layout(&converted, "v2");
    assert_eq!(layers[0]["status"], "passed", "{}", layers[0]);
}

/// Waits until the server has fetched `bytes` compressed bytes.
fn wait_for_fetched(server: &Server, bytes: u64) {
    let started = Instant::now();
    loop {
        let stats = server.stats();
        let fetched = stats["store"]["bytes_fetched"].as_u64().unwrap_or(0);
        if fetched >= bytes {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the background fetch got {fetched} of {bytes} bytes within 60 s; log:\n{}",
            server.log()
        );
    }
}

#[test]
fn record_access_skips_prefetch() {
    let work = tempfile::tempdir().expect("temp dir");
    let image = build_image(work.path());
    let list = work.path().join("prioritize.txt");
    fs::write(&list, "/bin/other\n/etc/config\n").expect("write the list");
    let prioritized = work.path().join("prioritized");
    let prioritized_image = format!("oci:{}:v2", prioritized.display());
    esgz(&[
        "convert",
        &image,
        &prioritized_image,
        "--force",
        "--compression-level",
        "1",
        "--prioritize",
        list.to_str().expect("utf-8 path"),
    ]);
    let blob_size: u64 = fs::read_dir(prioritized.join("blobs/sha256"))
        .expect("blobs")
        .map(|entry| entry.expect("blob entry").metadata().expect("stat").len())
        .max()
        .unwrap_or(0);

    // The landmark prefetch and the background fetch read every file;
    // only the client's read appears in the record.
    let record = work.path().join("access.txt");
    let server = Server::start(
        &prioritized_image,
        &[
            "--record-access",
            record.to_str().expect("utf-8 path"),
            "--background-fetch",
        ],
    );
    // All file data, which is most of the layer blob, is fetched.
    wait_for_fetched(&server, blob_size / 2);
    let mount = NbdMount::unbuffered(server.socket());
    read_and_check(&mount, "lib/unread");
    drop(mount);
    assert_eq!(
        record_lines(&record),
        ["/lib/unread"],
        "log:\n{}",
        server.log()
    );
}
