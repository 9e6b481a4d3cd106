//! Registry ecosystem: containerd `hosts.toml` mirrors with fallback to the
//! upstream server, Docker credential helpers, and `inspect` of a
//! multi-platform image, against real docker-registry instances.

#[path = "support/mod.rs"]
mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use support::{esgz_bin, fixture_dir, skopeo_push, Registry};

/// Runs esgz-nbd with `args`, a private cache and no default hosts dir.
fn esgz(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(esgz_bin());
    command.args(args).env("RUST_LOG", "esgz_nbd=debug");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("running esgz-nbd")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Returns the access-log lines of requests esgz-nbd sent (by user agent),
/// leaving out skopeo's pushes.
fn registry_log(registry: &Registry) -> String {
    let log = fs::read_to_string(registry.log_path()).unwrap_or_default();
    log.lines()
        .filter(|line| line.contains("\"esgz-nbd/"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Counts access-log lines of blob GETs in a registry's log.
fn blob_requests(registry: &Registry) -> usize {
    registry_log(registry)
        .lines()
        .filter(|line| line.contains("GET /v2/") && line.contains("/blobs/sha256:"))
        .count()
}

/// Writes `DIR/HOST/hosts.toml` and returns DIR.
fn write_hosts(dir: &Path, host: &str, text: &str) -> PathBuf {
    let host_dir = dir.join("certs.d").join(host);
    fs::create_dir_all(&host_dir).expect("creating the host directory");
    fs::write(host_dir.join("hosts.toml"), text).expect("writing hosts.toml");
    dir.join("certs.d")
}

fn export_image(reference: &str, dir: &Path, hosts_dir: &Path) -> (PathBuf, Output) {
    let output_file = dir.join("disk.img");
    let output = esgz(
        &[
            "export",
            reference,
            "-o",
            output_file.to_str().expect("UTF-8 path"),
            "--cache-dir",
            dir.join("cache").to_str().expect("UTF-8 path"),
            "--hosts-dir",
            hosts_dir.to_str().expect("UTF-8 path"),
        ],
        &[],
    );
    (output_file, output)
}

/// Exports the fixture from its OCI layout, the bytes a registry export must match.
fn reference_export(fixture: &str, dir: &Path) -> Vec<u8> {
    let output_file = dir.join("reference.img");
    let image = format!("oci:{}:latest", fixture_dir(fixture).join("oci").display());
    let output = esgz(
        &[
            "export",
            &image,
            "-o",
            output_file.to_str().expect("UTF-8 path"),
            "--cache-dir",
            dir.join("reference-cache").to_str().expect("UTF-8 path"),
        ],
        &[],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    fs::read(output_file).expect("reading the reference export")
}

#[test]
fn mirror_down_falls_back_to_next_mirror() {
    let upstream = Registry::start(None);
    let mirror = Registry::start(None);
    let down = Registry::start(None);
    let down_addr = down.addr();
    drop(down);

    let oci = fixture_dir("links").join("oci");
    let reference = skopeo_push(&oci, "latest", &upstream, "esgz/links");
    skopeo_push(&oci, "latest", &mirror, "esgz/links");
    let upstream_blobs_before = blob_requests(&upstream);

    let dir = tempfile::tempdir().expect("temp dir");
    let hosts = write_hosts(
        dir.path(),
        &upstream.addr(),
        &format!(
            "server = \"http://{}\"\n\n[host.\"http://{down_addr}\"]\n  capabilities = [\"pull\", \"resolve\"]\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  [host.\"http://{}\".header]\n    x-esgz-test = \"mirror\"\n",
            upstream.addr(),
            mirror.addr(),
            mirror.addr()
        ),
    );
    let (disk, output) = export_image(&reference, dir.path(), &hosts);
    let log = stderr(&output);
    assert!(output.status.success(), "{log}");
    assert_eq!(
        fs::read(&disk).expect("reading the export"),
        reference_export("links", dir.path()),
        "the export through the mirror differs from the layout's"
    );

    assert!(
        log.contains("registry host failed, trying the next one") && log.contains(&down_addr),
        "no fallback logged for {down_addr}:\n{log}"
    );
    let mirror_log = registry_log(&mirror);
    let ns = format!("ns={}", upstream.addr().replace(':', "%3A"));
    assert!(
        mirror_log.contains("/blobs/sha256:") && mirror_log.contains(&ns),
        "the mirror got no blob request with {ns}:\n{mirror_log}"
    );
    assert_eq!(
        blob_requests(&upstream),
        upstream_blobs_before,
        "the upstream served blobs although a mirror worked"
    );
}

#[test]
fn all_mirrors_failing_falls_back_to_upstream() {
    let upstream = Registry::start(None);
    let empty_mirror = Registry::start(None);
    let down = Registry::start(None);
    let down_addr = down.addr();
    drop(down);

    let oci = fixture_dir("links").join("oci");
    let reference = skopeo_push(&oci, "latest", &upstream, "esgz/links");

    let dir = tempfile::tempdir().expect("temp dir");
    let hosts = write_hosts(
        dir.path(),
        &upstream.addr(),
        &format!(
            "[host.\"http://{down_addr}\"]\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            empty_mirror.addr()
        ),
    );
    let (disk, output) = export_image(&reference, dir.path(), &hosts);
    let log = stderr(&output);
    assert!(output.status.success(), "{log}");
    assert_eq!(
        fs::read(&disk).expect("reading the export"),
        reference_export("links", dir.path())
    );
    assert!(blob_requests(&upstream) > 0, "the upstream served no blobs");
    let mirror_log = registry_log(&empty_mirror);
    assert!(
        mirror_log.contains("GET /v2/esgz/links/manifests/latest"),
        "the empty mirror was not asked first:\n{mirror_log}"
    );
}

#[test]
fn pull_only_mirror_skips_resolve() {
    let upstream = Registry::start(None);
    let mirror = Registry::start(None);
    let oci = fixture_dir("links").join("oci");
    let reference = skopeo_push(&oci, "latest", &upstream, "esgz/links");
    skopeo_push(&oci, "latest", &mirror, "esgz/links");

    let dir = tempfile::tempdir().expect("temp dir");
    let hosts = write_hosts(
        dir.path(),
        &upstream.addr(),
        &format!(
            "[host.\"http://{}\"]\n  capabilities = [\"pull\"]\n",
            mirror.addr()
        ),
    );
    let (_, output) = export_image(&reference, dir.path(), &hosts);
    assert!(output.status.success(), "{}", stderr(&output));
    let mirror_log = registry_log(&mirror);
    assert!(
        !mirror_log.contains("/manifests/latest"),
        "a pull-only mirror got a tag request:\n{mirror_log}"
    );
    assert!(blob_requests(&mirror) > 0, "the mirror served no blobs");
    assert!(
        registry_log(&upstream).contains("/manifests/latest"),
        "the upstream did not resolve the tag"
    );
}

/// Writes `docker-credential-NAME` into `bin`; it records its stdin in
/// `bin/NAME.calls` and prints the given user and secret.
fn write_helper(bin: &Path, name: &str, user: &str, secret: &str) {
    let script = bin.join(format!("docker-credential-{name}"));
    let calls = bin.join(format!("{name}.calls"));
    let text = format!(
        "#!/bin/sh\nset -e\n[ \"$1\" = get ] || exit 2\nserver=$(cat)\necho \"$server\" >> '{}'\nprintf '{{\"ServerURL\":\"%s\",\"Username\":\"{user}\",\"Secret\":\"{secret}\"}}' \"$server\"\n",
        calls.display()
    );
    fs::write(&script, text).expect("writing the helper");
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).expect("chmod the helper");
}

fn path_with(bin: &Path) -> String {
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

#[test]
fn credential_helpers_supply_basic_auth() {
    let registry = Registry::start_with_auth("helper-user", "helper-secret");
    let oci = fixture_dir("links").join("oci");
    let reference = skopeo_push(&oci, "latest", &registry, "esgz/private");

    let dir = tempfile::tempdir().expect("temp dir");
    let bin = dir.path().join("bin");
    fs::create_dir(&bin).expect("mkdir bin");
    write_helper(&bin, "esgztest", "helper-user", "helper-secret");
    write_helper(&bin, "wrong", "helper-user", "not-the-secret");

    let cases = [
        (
            "credHelpers",
            format!(
                r#"{{"credHelpers": {{"{}": "esgztest"}}}}"#,
                registry.addr()
            ),
            true,
        ),
        (
            "credsStore",
            r#"{"credsStore": "esgztest"}"#.to_string(),
            true,
        ),
        (
            "helper beats credsStore",
            format!(
                r#"{{"credsStore": "wrong", "credHelpers": {{"{}": "esgztest"}}}}"#,
                registry.addr()
            ),
            true,
        ),
        (
            "wrong secret",
            r#"{"credsStore": "wrong"}"#.to_string(),
            false,
        ),
        (
            "missing helper",
            r#"{"credsStore": "absent"}"#.to_string(),
            false,
        ),
    ];
    for (case, config, succeeds) in cases {
        let config_path = dir.path().join("config.json");
        fs::write(&config_path, &config).expect("writing config.json");
        let output = esgz(
            &[
                "inspect",
                &reference,
                "--json",
                "--auth-file",
                config_path.to_str().expect("UTF-8 path"),
            ],
            &[("PATH", &path_with(&bin))],
        );
        let log = stderr(&output);
        assert_eq!(output.status.success(), succeeds, "{case}:\n{log}");
        assert!(
            !log.contains("helper-secret"),
            "{case}: the secret leaked:\n{log}"
        );
        if succeeds {
            let report: Value = serde_json::from_slice(&output.stdout).expect("JSON report");
            assert_eq!(
                report["layers"][0]["toc_verification"], "verified",
                "{case}"
            );
        }
    }
    let calls = fs::read_to_string(bin.join("esgztest.calls")).expect("the helper ran");
    assert!(
        calls.lines().all(|line| line == registry.addr()),
        "the helper got another server name: {calls}"
    );
    let wrong = fs::read_to_string(bin.join("wrong.calls")).unwrap_or_default();
    assert_eq!(
        wrong.lines().count(),
        1,
        "credHelpers did not win over credsStore"
    );
}

#[test]
fn inspect_lists_index_platforms() {
    let layout = support::two_platform_layout();
    let registry = Registry::start(None);
    // Without --all skopeo would copy the host's platform only.
    let reference = format!("{}/esgz/multi:latest", registry.addr());
    support::run(
        Command::new("skopeo")
            .args(["copy", "--quiet", "--all", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:latest", layout.path().display()))
            .arg(format!("docker://{reference}")),
    );
    let layout_image = format!("oci:{}:latest", layout.path().display());

    for image in [reference.as_str(), layout_image.as_str()] {
        let output = esgz(
            &["inspect", image, "--platform", "linux/arm64", "--json"],
            &[],
        );
        assert!(output.status.success(), "{image}: {}", stderr(&output));
        let report: Value = serde_json::from_slice(&output.stdout).expect("JSON report");
        let platforms = report["platforms"].as_array().expect("platforms");
        let names: Vec<&str> = platforms
            .iter()
            .map(|entry| entry["platform"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(names, ["linux/amd64", "linux/arm64"], "{image}");
        assert_eq!(platforms[0]["selected"], false, "{image}");
        assert_eq!(platforms[1]["selected"], true, "{image}");
        // The arm64 manifest is the links fixture: 33 TOC entries.
        assert_eq!(report["layers"][0]["toc_entries"], 33, "{image}");
    }
}
