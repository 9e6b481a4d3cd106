//! Registry and network faults injected by a proxy in front of a local
//! docker-registry while `esgz-nbd serve` runs. Every fault is retried within
//! the deadline, and the whole disk read over NBD equals the disk exported
//! from the fixture's OCI layout. That disk's files equal the input tar.
//!
//! Needs root, loop devices, e2fsprogs, libnbd-bin (nbdcopy), docker-registry
//! and skopeo.

#[path = "support/mod.rs"]
mod support;

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{
    esgz_bin, fixture_dir, run, skopeo_push, Fault, FaultProxy, LoopMount, Plan, Registry,
    RequestInfo, Server,
};

/// Upper bound for any one copy of the disk; a copy that takes longer is a hang.
const COPY_TIMEOUT_SECS: u64 = 120;

/// Options that keep each faulty attempt short.
const FAST_RETRY_ARGS: &[&str] = &["--fetch-timeout", "2", "--retries", "6"];

/// The fixture pushed to a registry, and its disk image exported from the OCI
/// layout without a network, checked against the input tar.
struct Setup {
    registry: Registry,
    reference_path: String,
    expected_disk: Vec<u8>,
    _dir: tempfile::TempDir,
}

impl Setup {
    fn new(fixture: &str) -> Setup {
        let layout = fixture_dir(fixture).join("oci");
        let registry = Registry::start(None);
        let reference = skopeo_push(&layout, "latest", &registry, &format!("faults/{fixture}"));
        let reference_path = reference
            .strip_prefix(&format!("{}/", registry.addr()))
            .expect("the reference starts with the registry address")
            .to_string();

        let dir = tempfile::tempdir().expect("temp dir");
        let image = dir.path().join("expected.img");
        run(Command::new(esgz_bin())
            .arg("export")
            .arg(format!("oci:{}:latest", layout.display()))
            .arg("--cache-dir")
            .arg(dir.path().join("cache"))
            .arg("--output")
            .arg(&image));
        let (files, bytes) = {
            let mount = LoopMount::new(&image);
            compare_with_tar(mount.path(), &fixture_dir(fixture).join("input.tar"))
        };
        assert!(files > 0, "the fixture has no regular file");
        assert!(bytes > 0, "the fixture's files are all empty");
        let expected_disk = fs::read(&image).expect("reading the exported image");
        Setup {
            registry,
            reference_path,
            expected_disk,
            _dir: dir,
        }
    }

    fn image_at(&self, proxy: &FaultProxy) -> String {
        format!("{}/{}", proxy.addr(), self.reference_path)
    }
}

/// Compares every regular file of the input tar with the file under `root`;
/// returns the number of files and bytes compared. A later entry of the same
/// path replaces an earlier one, as when the tar is extracted.
fn compare_with_tar(root: &Path, tar_path: &Path) -> (u64, u64) {
    let file = fs::File::open(tar_path).expect("opening the input tar");
    let mut archive = tar::Archive::new(file);
    let mut last: BTreeMap<PathBuf, Option<Vec<u8>>> = BTreeMap::new();
    for entry in archive.entries().expect("reading the input tar") {
        let mut entry = entry.expect("a tar entry");
        let path = entry.path().expect("a tar path").into_owned();
        if entry.header().entry_type() != tar::EntryType::Regular {
            last.insert(path, None);
            continue;
        }
        let mut content = Vec::new();
        entry
            .read_to_end(&mut content)
            .expect("reading a tar entry");
        last.insert(path, Some(content));
    }

    let mut files = 0;
    let mut bytes = 0;
    for (path, content) in last {
        let Some(expected) = content else { continue };
        let actual = fs::read(root.join(&path))
            .unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
        assert!(
            actual == expected,
            "{} differs from the input tar ({} vs {} bytes)",
            path.display(),
            actual.len(),
            expected.len()
        );
        files += 1;
        bytes += expected.len() as u64;
    }
    (files, bytes)
}

/// Copies the whole NBD export to a file with nbdcopy, killed after
/// `COPY_TIMEOUT_SECS`; returns the copy or nbdcopy's error output.
fn copy_disk(server: &Server) -> Result<Vec<u8>, String> {
    let output = server.dir().join("copy.img");
    let _ = fs::remove_file(&output);
    let result = Command::new("timeout")
        .arg(COPY_TIMEOUT_SECS.to_string())
        .arg("nbdcopy")
        .arg(server.uri())
        .arg(&output)
        .output()
        .expect("starting nbdcopy (apt-get install libnbd-bin)");
    assert_ne!(
        result.status.code(),
        Some(124),
        "nbdcopy hung for {COPY_TIMEOUT_SECS} s; server log:\n{}",
        server.log()
    );
    if !result.status.success() {
        return Err(String::from_utf8_lossy(&result.stderr).into_owned());
    }
    Ok(fs::read(&output).expect("reading the copied disk"))
}

/// Panics at the first differing byte of two disk images.
fn assert_same_disk(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: disk size");
    if let Some(offset) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        panic!("{what}: wrong byte at disk offset {offset:#x}");
    }
}

/// Returns a plan that injects `fault` into the first attempt of every
/// distinct request it applies to, and passes everything else.
fn first_attempt_plan(fault: Fault, only_blob_ranges: bool) -> Plan {
    let seen: Mutex<HashSet<String>> = Mutex::default();
    Arc::new(move |request: &RequestInfo| {
        if only_blob_ranges && !request.is_blob_range() {
            return Fault::Pass;
        }
        let key = format!("{} {:?}", request.path, request.range);
        if seen.lock().expect("plan lock").insert(key) {
            fault
        } else {
            Fault::Pass
        }
    })
}

fn pass_plan() -> Plan {
    Arc::new(|_: &RequestInfo| Fault::Pass)
}

/// Every fault class, injected into the first attempt of every request it
/// applies to (startup reads included): the copy succeeds and equals the
/// expected disk.
#[test]
fn faults_retried_without_wrong_bytes() {
    let setup = Setup::new("basic");
    let cases: &[(&str, Fault, bool)] = &[
        ("connection dropped", Fault::Drop, false),
        ("HTTP 500", Fault::Status(500), false),
        ("HTTP 502", Fault::Status(502), false),
        ("HTTP 503", Fault::Status(503), false),
        (
            "HTTP 429 with Retry-After",
            Fault::TooManyRequests {
                retry_after_secs: 1,
            },
            false,
        ),
        ("reset mid-body", Fault::ResetMidBody, false),
        ("truncated body", Fault::Truncate, false),
        ("stalled body", Fault::Stall(Duration::from_secs(60)), true),
        ("wrong Content-Range", Fault::WrongContentRange, true),
        ("whole blob for a range", Fault::IgnoreRange, true),
    ];

    let mut total_faults = 0;
    let mut total_bytes = 0;
    for &(name, fault, only_blob_ranges) in cases {
        let proxy = FaultProxy::start(
            &setup.registry.addr(),
            first_attempt_plan(fault, only_blob_ranges),
        );
        let started = Instant::now();
        let server = Server::start(&setup.image_at(&proxy), FAST_RETRY_ARGS);
        let disk = copy_disk(&server).unwrap_or_else(|error| {
            panic!(
                "{name}: nbdcopy failed: {error}\nserver log:\n{}",
                server.log()
            )
        });
        assert_same_disk(&disk, &setup.expected_disk, name);
        assert!(proxy.faults() > 0, "{name}: no fault was injected");
        let log = server.log();
        assert!(
            log.contains("retrying"),
            "{name}: the server log has no retry:\n{log}"
        );
        eprintln!(
            "{name}: {} faults in {} requests, {} bytes checked, {:?}",
            proxy.faults(),
            proxy.requests(),
            disk.len(),
            started.elapsed()
        );
        total_faults += proxy.faults();
        total_bytes += disk.len() as u64;
    }
    eprintln!("total: {total_faults} faults injected, {total_bytes} bytes checked, 0 wrong");
}

/// A corrupted body never reaches a reader: decoding or verification fails,
/// the store fetches the bytes once more and the copy succeeds.
#[test]
fn corrupted_body_refetched() {
    let setup = Setup::new("basic");
    let proxy = FaultProxy::start(&setup.registry.addr(), pass_plan());
    let server = Server::start(&setup.image_at(&proxy), FAST_RETRY_ARGS);
    proxy.set_plan(first_attempt_plan(Fault::FlipByte, true));

    let disk = copy_disk(&server)
        .unwrap_or_else(|error| panic!("nbdcopy failed: {error}\n{}", server.log()));
    assert_same_disk(&disk, &setup.expected_disk, "copy with corrupted bodies");
    assert!(proxy.faults() > 0, "no body was corrupted");
    let log = server.log();
    assert!(
        log.contains("fetching them once more"),
        "the corruption was not detected:\n{log}"
    );
    eprintln!(
        "corrupted body: {} faults in {} requests",
        proxy.faults(),
        proxy.requests()
    );
}

/// A blob that is corrupt at the source fails every fetch: the read gets EIO
/// after one refetch, and no wrong byte is served.
#[test]
fn corrupted_source_fails_with_eio() {
    let setup = Setup::new("basic");
    let proxy = FaultProxy::start(&setup.registry.addr(), pass_plan());
    let server = Server::start(&setup.image_at(&proxy), FAST_RETRY_ARGS);
    proxy.set_plan(Arc::new(|request: &RequestInfo| {
        if request.is_blob_range() {
            Fault::FlipByte
        } else {
            Fault::Pass
        }
    }));

    let error = copy_disk(&server).expect_err("a copy of a corrupt blob fails");
    assert!(
        error.contains("Input/output error"),
        "nbdcopy did not report EIO: {error}"
    );
}

/// A registry that fails for good: each read gets EIO once the deadline
/// passes, and no read waits much longer than the deadline.
#[test]
fn persistent_faults_fail_at_deadline() {
    let setup = Setup::new("basic");
    let cases: &[(&str, Fault)] = &[
        ("HTTP 503 forever", Fault::Status(503)),
        ("stalled forever", Fault::Stall(Duration::from_secs(600))),
    ];
    for &(name, fault) in cases {
        let proxy = FaultProxy::start(&setup.registry.addr(), pass_plan());
        let server = Server::start(
            &setup.image_at(&proxy),
            &[
                "--fetch-timeout",
                "1",
                "--retries",
                "100",
                "--fetch-deadline",
                "4",
            ],
        );
        proxy.set_plan(Arc::new(move |request: &RequestInfo| {
            if request.is_blob_range() {
                fault
            } else {
                Fault::Pass
            }
        }));

        let started = Instant::now();
        let error = copy_disk(&server).expect_err("a copy from a failing registry fails");
        let elapsed = started.elapsed();
        assert!(
            error.contains("Input/output error") || error.contains("EIO"),
            "{name}: nbdcopy did not report EIO: {error}"
        );
        // nbdcopy stops at the first failed read; one deadline plus scheduling slack.
        assert!(
            elapsed < Duration::from_secs(30),
            "{name}: the failing copy took {elapsed:?}"
        );
        let log = server.log();
        assert!(
            log.contains("deadline") || log.contains("gave up after"),
            "{name}: the log does not name the deadline:\n{log}"
        );
        eprintln!("{name}: EIO after {elapsed:?}, {} faults", proxy.faults());
    }
}

/// The proxy stops listening for three seconds: connections are refused,
/// retried with backoff, and the copy succeeds once it listens again.
#[test]
fn refused_connections_retried() {
    let setup = Setup::new("basic");
    let proxy = FaultProxy::start(&setup.registry.addr(), pass_plan());
    let server = Server::start(&setup.image_at(&proxy), &["--retries", "8"]);

    proxy.refuse_connections_for(Duration::from_secs(3));
    let disk = copy_disk(&server)
        .unwrap_or_else(|error| panic!("nbdcopy failed: {error}\n{}", server.log()));
    assert_same_disk(
        &disk,
        &setup.expected_disk,
        "copy across refused connections",
    );
    let log = server.log();
    assert!(log.contains("retrying"), "no retry in the log:\n{log}");
}

/// Writes a Docker config.json with credentials for `host`.
fn write_auth_file(dir: &Path, host: &str, user: &str, password: &str) -> PathBuf {
    use base64::Engine as _;
    let path = dir.join("auth.json");
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    fs::write(
        &path,
        format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#),
    )
    .expect("writing the auth file");
    path
}

/// Bearer tokens revoked in the middle of a run: the next request gets 401,
/// the client fetches a new token and the copy succeeds. The password never
/// appears in the server log.
#[test]
fn revoked_token_refreshed() {
    const PASSWORD: &str = "s3cret-fault-proxy-password";
    let setup = Setup::new("basic");
    let proxy =
        FaultProxy::start_with_token_auth(&setup.registry.addr(), pass_plan(), "puller", PASSWORD);
    let auth_dir = tempfile::tempdir().expect("temp dir");
    let auth_file = write_auth_file(auth_dir.path(), &proxy.addr(), "puller", PASSWORD);
    let auth_arg = auth_file.display().to_string();

    let server = Server::start(&setup.image_at(&proxy), &["--auth-file", &auth_arg]);
    let issued_at_start = proxy.tokens_issued();
    assert!(issued_at_start >= 1, "no token was issued at startup");

    proxy.revoke_tokens();
    let disk = copy_disk(&server)
        .unwrap_or_else(|error| panic!("nbdcopy failed: {error}\n{}", server.log()));
    assert_same_disk(&disk, &setup.expected_disk, "copy after token revocation");
    assert!(
        proxy.tokens_issued() > issued_at_start,
        "no new token after the revocation"
    );

    let (_, log) = server.stop();
    assert!(!log.contains(PASSWORD), "the password is in the log");
    assert!(
        !log.contains("fault-proxy-token-"),
        "a bearer token is in the log"
    );

    // Wrong password: startup fails, and neither message nor log shows it.
    const WRONG: &str = "wrong-password-in-message-check";
    let wrong_file = write_auth_file(auth_dir.path(), &proxy.addr(), "puller", WRONG);
    let output = Command::new(esgz_bin())
        .arg("export")
        .arg(setup.image_at(&proxy))
        .arg("--auth-file")
        .arg(&wrong_file)
        .arg("--cache-dir")
        .arg(auth_dir.path().join("cache"))
        .arg("--output")
        .arg(auth_dir.path().join("out.img"))
        .env("RUST_LOG", "esgz_nbd=trace")
        .output()
        .expect("running esgz-nbd export");
    assert!(
        !output.status.success(),
        "export with a wrong password succeeded"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("401"),
        "the error does not name the 401: {stderr}"
    );
    assert!(
        !stderr.contains(WRONG),
        "the password is in the output: {stderr}"
    );
}
