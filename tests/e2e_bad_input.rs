//! End-to-end checks that `esgz-nbd export` and `esgz-nbd serve` reject
//! damaged or hostile eStargz layers with a message that names the problem,
//! a non-zero exit status and no panic. A damaged chunk must fail only the
//! reads that need it (EIO), while the rest of the image still reads.
//!
//! Each case edits a copy of a fixture layout with the helpers in
//! `support/layout.rs`, which keep every digest consistent so that the
//! targeted defect is the only one. Needs root, loop devices, FUSE,
//! e2fsprogs, libnbd-bin, docker-registry and skopeo.

#[path = "support/mod.rs"]
mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use support::{
    copy_layout, e2fsck_clean, edit_manifest, esgz_bin, fixture_dir, layer_descriptor,
    layer_digest, member_range, read_toc, registry_blob_data, replace_toc_member, rewrite_toc,
    set_footer_toc_offset, set_toc_digest_annotation, skopeo_push, toc_member, LoopMount, NbdMount,
    Registry, Server,
};

/// How long a `serve` that is expected to fail may run before the test
/// declares that it accepted the image.
const SERVE_FAILURE_TIMEOUT: Duration = Duration::from_secs(120);
/// errno EIO, which a read of a damaged chunk must return.
const EIO: i32 = 5;

/// Panics naming the tool and its package when `name` is not on PATH.
fn require_tool(name: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()))
        .unwrap_or(false);
    assert!(found, "{name} not found on PATH: apt-get install {package}");
}

fn oci_image(layout: &Path) -> String {
    format!("oci:{}:latest", layout.display())
}

/// Exit status and standard error of a failed command.
struct Failure {
    command: String,
    code: Option<i32>,
    stderr: String,
}

impl Failure {
    /// Asserts a clean failure: a non-zero exit code, no panic, and every
    /// one of `needles` in standard error.
    fn assert_names(&self, needles: &[&str]) {
        assert!(
            self.code.is_some_and(|code| code != 0),
            "`{}` should exit with a non-zero code, got {:?}; stderr:\n{}",
            self.command,
            self.code,
            self.stderr
        );
        assert!(
            !self.stderr.contains("panicked"),
            "`{}` panicked; stderr:\n{}",
            self.command,
            self.stderr
        );
        for needle in needles {
            assert!(
                self.stderr.contains(needle),
                "`{}` stderr does not mention {needle:?}:\n{}",
                self.command,
                self.stderr
            );
        }
    }
}

fn export_command(image: &str, dir: &Path) -> Command {
    let mut command = Command::new(esgz_bin());
    command
        .arg("export")
        .arg(image)
        .arg("-o")
        .arg(dir.join("disk.img"))
        .arg("--cache-dir")
        .arg(dir.join("cache"));
    command
}

/// Runs `esgz-nbd export IMAGE` and returns its output, whatever the status.
fn run_export(image: &str, dir: &Path, extra: &[&str]) -> Output {
    export_command(image, dir)
        .args(extra)
        .output()
        .expect("starting esgz-nbd export")
}

/// Runs `esgz-nbd export` on an image it must reject.
fn export_failure(image: &str) -> Failure {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = run_export(image, dir.path(), &[]);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !output.status.success(),
        "esgz-nbd export {image} succeeded on a damaged image; stderr:\n{stderr}"
    );
    Failure {
        command: format!("esgz-nbd export {image}"),
        code: output.status.code(),
        stderr,
    }
}

/// Exports `image` and returns the disk image, panicking with stderr on failure.
fn export_ok(image: &str, dir: &Path, extra: &[&str]) -> PathBuf {
    let output = run_export(image, dir, extra);
    assert!(
        output.status.success(),
        "esgz-nbd export {image} {extra:?} failed with {}; stderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    dir.join("disk.img")
}

/// Runs `esgz-nbd serve` on an image it must reject at start-up: it has to
/// exit before it opens its socket.
fn serve_failure(image: &str) -> Failure {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("nbd.sock");
    let log = dir.path().join("serve.log");
    let mut child: Child = Command::new(esgz_bin())
        .arg("serve")
        .arg(image)
        .arg("--socket")
        .arg(&socket)
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .arg("--stats-file")
        .arg(dir.path().join("stats.json"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).expect("creating the serve log"))
        .spawn()
        .expect("starting esgz-nbd serve");

    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("polling esgz-nbd serve") {
            break status;
        }
        if socket.exists() || started.elapsed() > SERVE_FAILURE_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "esgz-nbd serve {image} kept running (socket exists: {}) instead of rejecting the image; log:\n{}",
                socket.exists(),
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Failure {
        command: format!("esgz-nbd serve {image}"),
        code: status.code(),
        stderr: fs::read_to_string(&log).unwrap_or_default(),
    }
}

/// Checks that both commands reject `image` and name every one of `needles`.
fn assert_both_reject(image: &str, needles: &[&str]) {
    export_failure(image).assert_names(needles);
    serve_failure(image).assert_names(needles);
}

fn basic_copy() -> tempfile::TempDir {
    copy_layout(&fixture_dir("basic").join("oci"))
}

/// Returns the sha256 hex of `bytes`.
fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Returns the content of `name` (as the TOC spells it) from the basic
/// fixture's input tar, the ground truth.
fn basic_input_file(name: &str) -> Vec<u8> {
    let tar_path = fixture_dir("basic").join("input.tar");
    let file = fs::File::open(&tar_path)
        .unwrap_or_else(|error| panic!("opening {}: {error}", tar_path.display()));
    let mut archive = tar::Archive::new(file);
    let mut found = None;
    for entry in archive.entries().expect("reading input.tar") {
        let mut entry = entry.expect("reading an input.tar entry");
        let path = entry.path().expect("entry path").into_owned();
        if path.to_string_lossy().trim_start_matches("./") == name {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut bytes).expect("reading the entry");
            // A duplicated name keeps its last copy, as in the layer.
            found = Some(bytes);
        }
    }
    found.unwrap_or_else(|| panic!("{name} not in {}", tar_path.display()))
}

/// Renames the TOC entries named `from` (the file and its chunks) to `to`.
fn rename_entry(toc: &mut Value, from: &str, to: &str) {
    let mut renamed = 0;
    for entry in toc["entries"].as_array_mut().expect("TOC entries") {
        if entry["name"] == from {
            entry["name"] = to.into();
            renamed += 1;
        }
    }
    assert!(renamed > 0, "the TOC has no entry {from:?}");
}

/// Sets `field` of the first entry named `name` of type `kind`.
fn set_entry_field(toc: &mut Value, name: &str, kind: &str, field: &str, value: Value) {
    let entry = toc["entries"]
        .as_array_mut()
        .expect("TOC entries")
        .iter_mut()
        .find(|entry| entry["name"] == name && entry["type"] == kind)
        .unwrap_or_else(|| panic!("the TOC has no {kind} entry {name:?}"));
    entry[field] = value;
}

/// Asserts that reading `path` fails with EIO.
fn assert_read_eio(path: &Path) {
    match fs::read(path) {
        Ok(bytes) => panic!(
            "reading {} returned {} bytes, expected EIO",
            path.display(),
            bytes.len()
        ),
        Err(error) => assert_eq!(
            error.raw_os_error(),
            Some(EIO),
            "reading {} failed with {error} ({:?}), expected EIO",
            path.display(),
            error.kind()
        ),
    }
}

/// Reads every regular file of the basic fixture's merged tree under `root`,
/// except `skip`, and compares its sha256 with the sidecar.
fn assert_other_files_read(root: &Path, skip: &str) {
    let sidecar: Value = serde_json::from_slice(
        &fs::read(fixture_dir("basic").join("expected.json")).expect("reading expected.json"),
    )
    .expect("expected.json is JSON");
    let mut checked = 0;
    for entry in sidecar["merged_tree"].as_array().expect("merged_tree") {
        let path = entry["path"].as_str().expect("path");
        if entry["type"] != "reg" || path == skip {
            continue;
        }
        let full = root.join(path.trim_start_matches('/'));
        let bytes = fs::read(&full)
            .unwrap_or_else(|error| panic!("reading {} failed: {error}", full.display()));
        let expected = entry["sha256"].as_str().expect("sha256");
        assert_eq!(
            format!("sha256:{}", sha256_hex(&bytes)),
            expected,
            "content of {path}"
        );
        checked += 1;
    }
    assert!(checked > 10, "only {checked} files compared");
}

#[test]
fn truncated_blob_rejected() {
    let layout = basic_copy();
    let digest = layer_digest(layout.path(), 0);
    let size = layer_descriptor(layout.path(), 0)["size"]
        .as_u64()
        .expect("layer size");
    let path = support::blob_path(layout.path(), &digest);
    let file = fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("opening the blob");
    file.set_len(size - 1000).expect("truncating the blob");

    let hex = digest.trim_start_matches("sha256:");
    assert_both_reject(
        &oci_image(layout.path()),
        &[hex, &(size - 1000).to_string(), &size.to_string()],
    );
}

/// A footer whose TOC offset lies past the end of an annotated eStargz layer
/// is corruption: opening fails and names the layer, the offset and the rule.
#[test]
fn footer_offset_past_end_is_rejected() {
    let layout = basic_copy();
    let size = layer_descriptor(layout.path(), 0)["size"]
        .as_u64()
        .expect("layer size");
    let bad_offset = size + 4096;
    let digest = set_footer_toc_offset(layout.path(), 0, bad_offset);
    let image = oci_image(layout.path());

    let failure = export_failure(&image);
    failure.assert_names(&[
        digest.as_str(),
        "footer offset past the end",
        &format!("{bad_offset:#x}"),
    ]);
}

/// Without the toc.digest annotation the same blob is just a tar.gz with
/// odd trailing bytes: it is fetched whole, with a warning, and served exactly.
#[test]
fn footer_offset_past_end_without_annotation_falls_back_whole() {
    let layout = basic_copy();
    let size = layer_descriptor(layout.path(), 0)["size"]
        .as_u64()
        .expect("layer size");
    let bad_offset = size + 4096;
    let digest = set_footer_toc_offset(layout.path(), 0, bad_offset);
    edit_manifest(layout.path(), |manifest| {
        let annotations = manifest["layers"][0]["annotations"]
            .as_object_mut()
            .expect("layer annotations");
        annotations.remove("containerd.io/snapshot/stargz/toc.digest");
    });
    let image = oci_image(layout.path());
    let expected = fixture_dir("basic").join("expected.json");

    let dir = tempfile::tempdir().expect("temp dir");
    let output = run_export(&image, dir.path(), &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "export failed; stderr:\n{stderr}");
    let warning = stderr
        .lines()
        .find(|line| line.contains("not lazy"))
        .unwrap_or_else(|| panic!("no warning says the layer is not lazy; stderr:\n{stderr}"));
    assert!(
        warning.contains(&digest),
        "warning lacks the layer digest: {warning}"
    );
    let disk = dir.path().join("disk.img");
    e2fsck_clean(&disk);
    {
        let mount = LoopMount::new(&disk);
        support::assert_tree_matches(mount.path(), &expected);
    }

    let server = Server::start(&image, &[]);
    let startup = &server.stats()["startup"];
    assert!(
        startup["bytes_fetched"].as_u64().unwrap_or(0) >= size,
        "start-up should fetch the whole {size}-byte blob: {startup}"
    );
    let mount = NbdMount::new(server.socket());
    support::assert_tree_matches(mount.path(), &expected);
}

#[test]
fn toc_member_not_gzip_rejected() {
    let layout = basic_copy();
    let digest = replace_toc_member(
        layout.path(),
        0,
        b"this is plain text where the TOC gzip member should be",
    );
    assert_both_reject(&oci_image(layout.path()), &[&digest, "TOC", "gzip"]);
}

/// A TOC member that is gzip but contains no JSON. The annotation is set to
/// the digest of those bytes, so the JSON parser, not the digest check,
/// has to reject them.
#[test]
fn toc_gzip_but_not_json_rejected() {
    let layout = basic_copy();
    let not_json = b"{\"version\": 1, \"entries\": [ this is not JSON";
    let digest = replace_toc_member(layout.path(), 0, &toc_member(not_json));
    set_toc_digest_annotation(layout.path(), 0, &support::sha256_digest(not_json));
    assert_both_reject(&oci_image(layout.path()), &[&digest, "TOC JSON is invalid"]);
}

#[test]
fn toc_digest_mismatch_rejected_unless_skipped() {
    let layout = basic_copy();
    let wrong = format!("sha256:{}", "0".repeat(64));
    set_toc_digest_annotation(layout.path(), 0, &wrong);
    let digest = layer_digest(layout.path(), 0);
    let image = oci_image(layout.path());
    assert_both_reject(&image, &["TOC digest mismatch", &digest, &wrong]);

    let expected = fixture_dir("basic").join("expected.json");
    let dir = tempfile::tempdir().expect("temp dir");
    let disk = export_ok(&image, dir.path(), &["--insecure-skip-verify"]);
    e2fsck_clean(&disk);
    {
        let mount = LoopMount::new(&disk);
        support::assert_tree_matches(mount.path(), &expected);
    }

    let server = Server::start(&image, &["--insecure-skip-verify"]);
    let mount = NbdMount::new(server.socket());
    support::assert_tree_matches(mount.path(), &expected);
}

/// Flips one byte in the middle of `data/f4095`'s gzip member in the
/// registry's storage. Reading that file through the mount must fail with
/// EIO, every other file must still read correctly, and the server log must
/// name the layer and the entry.
#[test]
fn corrupt_chunk_in_registry_fails_only_its_file() {
    require_tool("docker-registry", "docker-registry");
    require_tool("skopeo", "skopeo");
    let fixture = fixture_dir("basic").join("oci");
    let registry = Registry::start(None);
    let reference = skopeo_push(&fixture, "latest", &registry, "corrupt/basic");

    let digest = layer_digest(&fixture, 0);
    let (toc, toc_offset) = read_toc(&fixture, 0);
    let target = "data/f4095";
    let (start, end) = member_range(&toc, toc_offset, target);
    let storage = registry
        .log_path()
        .parent()
        .expect("registry folder")
        .join("data");
    let data = registry_blob_data(&storage, &digest);
    let mut blob =
        fs::read(&data).unwrap_or_else(|error| panic!("reading {}: {error}", data.display()));
    let flip = ((start + end) / 2) as usize;
    blob[flip] ^= 0xff;
    fs::write(&data, &blob).unwrap_or_else(|error| panic!("writing {}: {error}", data.display()));

    let server = Server::start(&reference, &[]);
    {
        let mount = NbdMount::new(server.socket());
        assert_read_eio(&mount.path().join(target));
        assert_other_files_read(mount.path(), &format!("/{target}"));
        // A second attempt must fail the same way: a bad chunk is never cached.
        assert_read_eio(&mount.path().join(target));
    }

    let log = server.log();
    assert!(!log.contains("panicked"), "server panicked; log:\n{log}");
    assert!(
        !log.contains('\u{1b}'),
        "the server log file contains terminal escape codes:\n{log}"
    );
    let failure_lines: Vec<&str> = log
        .lines()
        .filter(|line| line.contains(&digest) && line.contains(target))
        .collect();
    assert!(
        !failure_lines.is_empty(),
        "no server log line names both layer {digest} and entry {target}; log:\n{log}"
    );
    export_failure(&reference).assert_names(&[&digest, target]);

    let stats = server.stats();
    assert!(
        stats["store"]["verify_failures"].as_u64().unwrap_or(0) > 0
            || log.contains("decompress"),
        "neither a verify failure nor a decompression failure was recorded; stats {stats}; log:\n{log}"
    );
}

/// Renames one file of the basic layer to `toc_name` and checks where it
/// lands, in the export and through the NBD mount.
fn check_renamed_file_lands(toc_name: &str, expected_path: &str, absent: &[&str]) {
    let layout = basic_copy();
    let source = "data/one";
    rewrite_toc(layout.path(), 0, |toc| rename_entry(toc, source, toc_name));
    let image = oci_image(layout.path());
    let content = basic_input_file(source);

    let check = |root: &Path, how: &str| {
        let landed = root.join(expected_path.trim_start_matches('/'));
        let bytes = fs::read(&landed).unwrap_or_else(|error| {
            panic!("{how}: TOC name {toc_name:?} should land at {expected_path}: {error}")
        });
        assert_eq!(bytes, content, "{how}: content of {expected_path}");
        assert!(
            !root.join(source).exists(),
            "{how}: /{source} still exists after the rename"
        );
        for path in absent {
            assert!(
                fs::symlink_metadata(root.join(path.trim_start_matches('/'))).is_err(),
                "{how}: {path} exists; TOC name {toc_name:?} escaped normalisation"
            );
        }
    };

    let dir = tempfile::tempdir().expect("temp dir");
    let disk = export_ok(&image, dir.path(), &[]);
    e2fsck_clean(&disk);
    {
        let mount = LoopMount::new(&disk);
        check(mount.path(), "export");
    }

    let server = Server::start(&image, &[]);
    let mount = NbdMount::new(server.socket());
    check(mount.path(), "serve");
}

#[test]
fn dot_dot_names_stay_under_root() {
    // Go's path.Clean("/" + name), as the reference reader applies it.
    let cases = [
        ("a/../../etc/x", "/etc/x", vec!["/a"]),
        ("../../../escaped", "/escaped", vec![]),
        ("data/../../../data/x", "/data/x", vec![]),
    ];
    for (toc_name, expected, absent) in cases {
        check_renamed_file_lands(toc_name, expected, &absent);
    }
}

#[test]
fn absolute_names_land_under_root() {
    check_renamed_file_lands("/abs/file", "/abs/file", &[]);
    check_renamed_file_lands("//etc//y", "/etc/y", &[]);
}

#[test]
fn name_component_over_255_bytes_rejected() {
    let layout = basic_copy();
    let long = "n".repeat(256);
    let name = format!("data/{long}");
    rewrite_toc(layout.path(), 0, |toc| rename_entry(toc, "data/one", &name));
    assert_both_reject(&oci_image(layout.path()), &[&long, "256 bytes", "255"]);
}

#[test]
fn hard_link_to_missing_target_rejected() {
    let layout = basic_copy();
    rewrite_toc(layout.path(), 0, |toc| {
        toc["entries"]
            .as_array_mut()
            .expect("TOC entries")
            .push(json!({
                "name": "data/dangling_link",
                "type": "hardlink",
                "linkName": "data/no_such_file",
                "mode": 420,
            }));
    });
    assert_both_reject(
        &oci_image(layout.path()),
        &["data/dangling_link", "data/no_such_file", "missing"],
    );
}

#[test]
fn chunk_offset_beyond_blob_rejected() {
    let cases = [("data/f4095", "reg"), ("data/random_1MiB_plus_3", "chunk")];
    for (name, kind) in cases {
        let layout = basic_copy();
        let size = layer_descriptor(layout.path(), 0)["size"]
            .as_u64()
            .expect("layer size");
        let offset = size + 100;
        rewrite_toc(layout.path(), 0, |toc| {
            set_entry_field(toc, name, kind, "offset", offset.into())
        });
        assert_both_reject(&oci_image(layout.path()), &[name, &format!("{offset:#x}")]);
    }
}

#[test]
fn chunk_size_past_file_rejected() {
    let layout = basic_copy();
    let name = "data/random_1MiB_plus_3";
    // The last chunk starts at 1 MiB of a 1 MiB + 3 byte file.
    rewrite_toc(layout.path(), 0, |toc| {
        let last = toc["entries"]
            .as_array_mut()
            .expect("TOC entries")
            .iter_mut()
            .rfind(|entry| entry["name"] == name)
            .expect("last chunk");
        last["chunkSize"] = 65536.into();
    });
    assert_both_reject(&oci_image(layout.path()), &[name, "past the file size"]);
}

/// A file whose TOC size is larger than its gzip member decompresses to:
/// opening works, but reading it fails with EIO and export fails naming it.
#[test]
fn chunk_size_beyond_member_fails_read() {
    let layout = basic_copy();
    let name = "data/f4095";
    rewrite_toc(layout.path(), 0, |toc| {
        set_entry_field(toc, name, "reg", "size", (1u64 << 20).into())
    });
    let image = oci_image(layout.path());
    let digest = layer_digest(layout.path(), 0);

    export_failure(&image).assert_names(&[name, &digest]);

    let server = Server::start(&image, &[]);
    {
        let mount = NbdMount::new(server.socket());
        assert_read_eio(&mount.path().join(name));
        let other = mount.path().join("data/f4096");
        let bytes = fs::read(&other).unwrap_or_else(|error| {
            panic!(
                "reading {} next to the damaged file failed: {error}",
                other.display()
            )
        });
        assert_eq!(
            bytes,
            basic_input_file("data/f4096"),
            "content of data/f4096"
        );
    }
    let log = server.log();
    assert!(!log.contains("panicked"), "server panicked; log:\n{log}");
    assert!(
        log.lines()
            .any(|line| line.contains(&digest) && line.contains(name)),
        "no server log line names both layer {digest} and entry {name}; log:\n{log}"
    );
}
