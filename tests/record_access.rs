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

use serde_json::Value;
use support::{
    esgz_bin, read_toc, run, run_stdout, shared_dir, verify_layout, NbdMount, Registry, Server,
};

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

/// The workload of the Debian loop, run in a chroot of the mounted tree.
const DEBIAN_WORKLOAD: &str = "dpkg --version";

/// Mounts the export of `server` and runs [`DEBIAN_WORKLOAD`] in a chroot
/// of it; panics unless the output names dpkg.
fn run_debian_workload(mount: NbdMount) {
    let output =
        run(Command::new("chroot")
            .arg(mount.path())
            .args(["/bin/sh", "-c", DEBIAN_WORKLOAD]));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("dpkg"),
        "`{DEBIAN_WORKLOAD}` printed {stdout:?}"
    );
}

/// Serves `image` with a fresh cache, runs the workload and returns the
/// counters the server wrote at exit.
fn cold_run(image: &str) -> Value {
    let server = Server::start(image, &[]);
    run_debian_workload(NbdMount::new(server.socket()));
    let (dir, log) = server.stop();
    let text = fs::read_to_string(dir.path().join("stats.json"))
        .unwrap_or_else(|error| panic!("reading the stats of {image}: {error}; log:\n{log}"));
    serde_json::from_str(&text).expect("stats.json is JSON")
}

/// Returns the entries of `toc` before `.prefetch.landmark` that carry a
/// file's name (regular files and hard links).
fn file_entries_before_landmark(toc: &Value) -> Vec<&Value> {
    let entries = toc["entries"].as_array().expect("TOC entries");
    let landmark = entries
        .iter()
        .position(|entry| entry["name"] == ".prefetch.landmark")
        .expect("the prioritized layer has a .prefetch.landmark");
    entries[..landmark]
        .iter()
        .filter(|entry| entry["type"] == "reg" || entry["type"] == "hardlink")
        .collect()
}

#[test]
fn debian_loop_cuts_range_requests() {
    let debian = shared_dir().join("images/debian-bookworm-minbase/oci");
    let work = tempfile::tempdir().expect("temp dir");
    let registry = Registry::start(None);
    let plain = format!("{}/debian:plain", registry.addr());
    let prioritized = format!("{}/debian:prioritized", registry.addr());
    esgz(&[
        "convert",
        &format!("oci:{}", debian.display()),
        &plain,
        "--force",
        "--compression-level",
        "1",
    ]);

    // Record what the workload reads from the unprioritized image.
    let record = work.path().join("access.txt");
    let record_arg = record.to_str().expect("utf-8 path");
    // Without read-ahead, so the neighbours of each file read stay out of the list.
    let server = Server::start(&plain, &["--record-access", record_arg]);
    run_debian_workload(NbdMount::unbuffered(server.socket()));
    drop(server);
    let recorded: Vec<String> = record_lines(&record)
        .into_iter()
        .map(|line| line.trim_start_matches('/').to_string())
        .collect();
    for expected in ["usr/bin/dpkg", "usr/lib/x86_64-linux-gnu/libc.so.6"] {
        assert!(
            recorded.iter().any(|path| path == expected),
            "{expected} is not in the record: {recorded:?}"
        );
    }

    esgz(&[
        "convert",
        &plain,
        &prioritized,
        "--force",
        "--compression-level",
        "1",
        "--prioritize",
        record_arg,
    ]);

    // The recorded files lead the rebuilt layer in the recorded order; any
    // other file before the landmark is the target of a recorded hard link.
    let layout = work.path().join("prioritized");
    esgz(&[
        "convert",
        &prioritized,
        &format!("oci:{}:latest", layout.display()),
    ]);
    let (toc, _) = read_toc(&layout, 0);
    let leading = file_entries_before_landmark(&toc);
    let leading_recorded: Vec<&str> = leading
        .iter()
        .filter_map(|entry| entry["name"].as_str())
        .filter(|name| recorded.iter().any(|path| path == name))
        .collect();
    assert_eq!(
        leading_recorded, recorded,
        "recorded files before .prefetch.landmark, in order"
    );
    for entry in &leading {
        let name = entry["name"].as_str().unwrap_or_default();
        let is_link_target = leading
            .iter()
            .any(|other| other["type"] == "hardlink" && other["linkName"] == name);
        assert!(
            recorded.iter().any(|path| path == name) || is_link_target,
            "{name} is before .prefetch.landmark but was not recorded"
        );
    }
    let layers = verify_layout(&layout, "latest");
    assert_eq!(layers[0]["status"], "passed", "{}", layers[0]);

    // A cold run of the prioritized image fetches the recorded files in a
    // few large prefetch requests instead of one request per read.
    let plain_stats = cold_run(&plain);
    let prioritized_stats = cold_run(&prioritized);
    let plain_requests = plain_stats["store"]["range_requests"]
        .as_u64()
        .expect("range_requests");
    let prioritized_requests = prioritized_stats["store"]["range_requests"]
        .as_u64()
        .expect("range_requests");
    eprintln!(
        "range requests of a cold `{DEBIAN_WORKLOAD}`: {plain_requests} unprioritized, {prioritized_requests} prioritized"
    );
    assert!(
        prioritized_requests < plain_requests,
        "the prioritized image made {prioritized_requests} range requests, the unprioritized one {plain_requests}"
    );
}
