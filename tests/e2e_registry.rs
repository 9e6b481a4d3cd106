//! End-to-end checks of `esgz-nbd serve` against a real local registry
//! (Debian's docker-registry, pushed to with skopeo). They cover fixture and
//! Debian trees through the kernel's ext4, basic auth through a Docker
//! config file, platform selection in an image index, and laziness measured
//! in the product's stats and the registry's access log.
//!
//! Needs root, loop devices, FUSE, e2fsprogs, libnbd-bin (nbdfuse, nbdsh),
//! docker-registry, skopeo and apache2-utils (htpasswd).

#[path = "support/mod.rs"]
mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use support::{
    assert_tree_matches, e2fsck_clean, esgz_bin, fixture_dir, layer_descriptor, layer_digest,
    member_range, read_toc, run, run_stdout, shared_dir, skopeo_push, NbdMount, Registry, Server,
};

/// How long the test waits for the registry to write its access log lines.
const ACCESS_LOG_TIMEOUT: Duration = Duration::from_secs(10);

/// Panics naming the tool and its package when `name` is not on PATH.
fn require_tool(name: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()))
        .unwrap_or(false);
    assert!(found, "{name} not found on PATH: apt-get install {package}");
}

fn require_registry_tools() {
    require_tool("docker-registry", "docker-registry");
    require_tool("skopeo", "skopeo");
    require_tool("nbdfuse", "libnbd-bin");
}

/// Returns the OCI layout and sidecar of a fixture or of the Debian image.
fn image_dirs(name: &str) -> (PathBuf, PathBuf) {
    let dir = match name {
        "debian" => shared_dir().join("images/debian-bookworm-minbase"),
        fixture => fixture_dir(fixture),
    };
    (dir.join("oci"), dir.join("expected.json"))
}

/// Pushes an image to a fresh registry, serves it from there and compares
/// the mounted tree with the sidecar.
fn check_served_from_registry(name: &str) {
    require_registry_tools();
    let (layout, expected) = image_dirs(name);
    let registry = Registry::start(None);
    let reference = skopeo_push(&layout, "latest", &registry, &format!("e2e/{name}"));

    let server = Server::start(&reference, &[]);
    let mount = NbdMount::new(server.socket());
    assert_tree_matches(mount.path(), &expected);
}

#[test]
fn registry_serves_basic() {
    check_served_from_registry("basic");
}

#[test]
fn registry_serves_multilayer() {
    check_served_from_registry("multilayer");
}

#[test]
fn registry_serves_links() {
    check_served_from_registry("links");
}

#[test]
fn registry_serves_debian() {
    check_served_from_registry("debian");
}

/// Runs `esgz-nbd export` with a clean credential environment: `HOME` is an
/// empty folder and neither `REGISTRY_AUTH_FILE` nor `DOCKER_CONFIG` is set,
/// unless `auth_env` gives `REGISTRY_AUTH_FILE`.
fn export_with_env(image: &str, dir: &Path, auth_env: Option<&Path>, extra: &[&str]) -> Output {
    let home = dir.join("home");
    fs::create_dir_all(&home).expect("creating an empty HOME");
    let mut command = Command::new(esgz_bin());
    command
        .arg("export")
        .arg(image)
        .arg("-o")
        .arg(dir.join("disk.img"))
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .args(extra)
        .env("HOME", &home)
        .env_remove("DOCKER_CONFIG")
        .env_remove("REGISTRY_AUTH_FILE")
        .env_remove("XDG_RUNTIME_DIR");
    if let Some(path) = auth_env {
        command.env("REGISTRY_AUTH_FILE", path);
    }
    command.output().expect("starting esgz-nbd export")
}

#[test]
fn registry_basic_auth_with_auth_file() {
    require_registry_tools();
    require_tool("htpasswd", "apache2-utils");
    let (user, password) = ("esgz", "pa55-e2e-secret");
    let (layout, expected) = image_dirs("basic");
    let registry = Registry::start_with_auth(user, password);
    let reference = skopeo_push(&layout, "latest", &registry, "private/basic");
    let temp = tempfile::tempdir().expect("temp dir");
    let config = support::write_docker_config(temp.path(), &registry.addr(), user, password);

    // --auth-file on serve.
    {
        let auth_file = config.to_str().expect("UTF-8 temp path");
        let server = Server::start(&reference, &["--auth-file", auth_file]);
        let mount = NbdMount::new(server.socket());
        assert_tree_matches(mount.path(), &expected);
    }

    // REGISTRY_AUTH_FILE on export.
    let with_env = tempfile::tempdir().expect("temp dir");
    let output = export_with_env(&reference, with_env.path(), Some(&config), &[]);
    assert!(
        output.status.success(),
        "export with REGISTRY_AUTH_FILE failed with {}; stderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    e2fsck_clean(&with_env.path().join("disk.img"));

    // No credentials at all, then an auth file without an entry for the host.
    let empty = temp.path().join("empty.json");
    fs::write(&empty, "{}").expect("writing an empty config.json");
    let empty_arg = empty.to_str().expect("UTF-8 temp path").to_string();
    let cases: [(&str, Vec<&str>); 2] = [
        ("no credentials anywhere", vec![]),
        ("empty --auth-file", vec!["--auth-file", &empty_arg]),
    ];
    for (case, extra) in cases {
        let dir = tempfile::tempdir().expect("temp dir");
        let output = export_with_env(&reference, dir.path(), None, &extra);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success(),
            "{case}: export succeeded without credentials; stderr:\n{stderr}"
        );
        assert!(
            !stderr.contains("panicked"),
            "{case}: panicked; stderr:\n{stderr}"
        );
        assert!(
            stderr.contains("login"),
            "{case}: the error does not mention login; stderr:\n{stderr}"
        );
        assert!(
            !stderr.contains(password),
            "{case}: the password leaked into stderr:\n{stderr}"
        );
    }
}

#[test]
fn registry_index_selects_platform() {
    require_registry_tools();
    let layout = support::two_platform_layout();
    let registry = Registry::start(None);
    let reference = format!("{}/e2e/multiarch:latest", registry.addr());
    run(Command::new("skopeo")
        .args(["copy", "--all", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:latest", layout.path().display()))
        .arg(format!("docker://{reference}")));

    let cases: [(&[&str], &str); 3] = [
        (&["--platform", "linux/arm64"], "links"),
        (&["--platform", "linux/amd64"], "basic"),
        (&[], "basic"),
    ];
    for (extra, fixture) in cases {
        let server = Server::start(&reference, extra);
        let mount = NbdMount::new(server.socket());
        let mismatches =
            support::compare_tree(mount.path(), &fixture_dir(fixture).join("expected.json"));
        assert!(
            mismatches.is_empty(),
            "serve {extra:?} should give the {fixture} tree; {} mismatches:\n{}",
            mismatches.len(),
            mismatches.join("\n")
        );
    }
}

/// Byte count and request count of the GETs of one blob in the registry's
/// access log.
#[derive(Debug, PartialEq, Eq)]
struct BlobGets {
    bytes: u64,
    requests: u64,
}

/// Sums the successful GETs of `digest` in a distribution access log, whose
/// lines end in the combined log format:
/// `"GET /v2/REPO/blobs/DIGEST HTTP/1.1" STATUS SIZE "REFERER" "AGENT"`.
fn blob_gets(log: &str, digest: &str) -> BlobGets {
    let mut gets = BlobGets {
        bytes: 0,
        requests: 0,
    };
    for line in log.lines() {
        let parts: Vec<&str> = line.split('"').collect();
        let Some(request) = parts.get(1) else {
            continue;
        };
        if !request.starts_with("GET ") || !request.contains(&format!("/blobs/{digest}")) {
            continue;
        }
        let fields: Vec<&str> = parts.get(2).unwrap_or(&"").split_whitespace().collect();
        let (Some(status), Some(size)) = (fields.first(), fields.get(1)) else {
            panic!("access log line without status and size: {line}");
        };
        assert!(
            *status == "200" || *status == "206",
            "blob GET answered {status}: {line}"
        );
        gets.bytes += size
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("size {size:?} is not a number: {line}"));
        gets.requests += 1;
    }
    gets
}

/// Waits until the access log shows `expected` for `digest`, and returns
/// what it shows at the end.
fn wait_for_blob_gets(registry: &Registry, digest: &str, expected: &BlobGets) -> BlobGets {
    let started = Instant::now();
    loop {
        let log = fs::read_to_string(registry.log_path()).unwrap_or_default();
        let gets = blob_gets(&log, digest);
        if gets == *expected || started.elapsed() > ACCESS_LOG_TIMEOUT {
            return gets;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn stat(stats: &Value, section: &str, counter: &str) -> u64 {
    stats[section][counter]
        .as_u64()
        .unwrap_or_else(|| panic!("stats have no {section}.{counter}: {stats}"))
}

/// Start-up fetches only the footer and the TOC; reading one block of a
/// small file fetches exactly that file's gzip member, and the registry's
/// access log shows the same bytes.
#[test]
fn registry_serve_is_lazy() {
    require_registry_tools();
    require_tool("nbdsh", "libnbd-bin");
    require_tool("debugfs", "e2fsprogs");
    let (layout, _) = image_dirs("basic");
    let registry = Registry::start(None);
    let reference = skopeo_push(&layout, "latest", &registry, "lazy/basic");
    let digest = layer_digest(&layout, 0);
    let blob_size = layer_descriptor(&layout, 0)["size"]
        .as_u64()
        .expect("layer size");
    let (toc, toc_offset) = read_toc(&layout, 0);

    // The basic fixture has a .prefetch.landmark: without --no-prefetch the server
    // fetches its prioritized files right after start.
    let server = Server::start(&reference, &["--no-prefetch"]);
    let stats = server.stats();
    let startup_bytes = stat(&stats, "startup", "bytes_fetched");
    let startup_requests = stat(&stats, "startup", "range_requests");
    assert_eq!(
        startup_bytes,
        51 + (blob_size - 51 - toc_offset),
        "start-up should fetch the footer and the TOC member only; stats {stats}"
    );
    assert_eq!(
        startup_requests, 2,
        "footer and TOC requests; stats {stats}"
    );
    assert_eq!(stat(&stats, "store", "bytes_fetched"), 0, "stats {stats}");
    assert_eq!(stat(&stats, "store", "range_requests"), 0, "stats {stats}");
    let after_startup = wait_for_blob_gets(
        &registry,
        &digest,
        &BlobGets {
            bytes: startup_bytes,
            requests: startup_requests,
        },
    );
    assert_eq!(
        after_startup,
        BlobGets {
            bytes: startup_bytes,
            requests: startup_requests
        },
        "registry access log after start-up"
    );

    // The file's first block, from an export of the same image (same
    // manifest digest, so the same layout).
    let file = "data/f4095";
    let dir = tempfile::tempdir().expect("temp dir");
    let disk = dir.path().join("disk.img");
    run(Command::new(esgz_bin())
        .arg("export")
        .arg(format!("oci:{}:latest", layout.display()))
        .arg("-o")
        .arg(&disk)
        .arg("--cache-dir")
        .arg(dir.path().join("cache")));
    let block_text = run_stdout(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("bmap /{file} 0"))
            .arg(&disk),
    );
    let block: u64 = block_text
        .parse()
        .unwrap_or_else(|_| panic!("debugfs bmap printed {block_text:?}, expected a block number"));
    assert!(block > 0, "{file} has no first block");

    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let read = run(Command::new("nbdsh")
        .env("PATH", path)
        .arg("-u")
        .arg(server.uri())
        .arg("-c")
        .arg(format!(
            "import sys; sys.stdout.buffer.write(h.pread(4096, {}))",
            block * 4096
        )));
    let expected_content = input_file("basic", file);
    assert_eq!(read.stdout.len(), 4096, "nbdsh pread length");
    assert_eq!(
        &read.stdout[..expected_content.len()],
        expected_content.as_slice(),
        "block {block} holds the start of {file}"
    );
    assert!(
        read.stdout[expected_content.len()..]
            .iter()
            .all(|&byte| byte == 0),
        "the block tail after {file} is zero"
    );

    let (member_start, member_end) = member_range(&toc, toc_offset, file);
    let member_size = member_end - member_start;
    let stats = server.stats();
    assert_eq!(
        stat(&stats, "store", "bytes_fetched"),
        member_size,
        "reading one block of {file} should fetch its gzip member {member_start}..{member_end}; stats {stats}"
    );
    assert_eq!(stat(&stats, "store", "range_requests"), 1, "stats {stats}");
    assert_eq!(stat(&stats, "store", "verify_failures"), 0, "stats {stats}");

    let expected_total = BlobGets {
        bytes: startup_bytes + member_size,
        requests: startup_requests + 1,
    };
    let total = wait_for_blob_gets(&registry, &digest, &expected_total);
    assert_eq!(
        total, expected_total,
        "registry access log: blob GETs of {digest} after one read"
    );
}

/// Returns the content of `name` from a fixture's input tar, the ground
/// truth; the last copy wins when a name repeats, as in the layer.
fn input_file(fixture: &str, name: &str) -> Vec<u8> {
    let tar_path = fixture_dir(fixture).join("input.tar");
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
            found = Some(bytes);
        }
    }
    found.unwrap_or_else(|| panic!("{name} not in {}", tar_path.display()))
}
