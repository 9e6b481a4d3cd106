//! `convert --all-platforms` on a two-platform index, and `convert` and
//! `build` pushing to a docker-registry that requires basic auth.
//!
//! Needs root (loop mounts), docker-registry, htpasswd (apache2-utils) and
//! e2fsprogs.

#[path = "support/mod.rs"]
mod support;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use support::{
    assert_tree_matches, blob_path, e2fsck_clean, esgz_bin, fixture_dir, run, two_platform_layout,
    write_docker_config, LoopMount, Registry,
};

const TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";

fn read_json(path: &Path) -> Value {
    let bytes =
        fs::read(path).unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

/// Returns the descriptor that `index.json` of `layout` tags `tag`.
fn tagged(layout: &Path, tag: &str) -> Value {
    let index = read_json(&layout.join("index.json"));
    index["manifests"]
        .as_array()
        .expect("index.json manifests")
        .iter()
        .find(|entry| entry["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no manifest tagged {tag} in {index}"))
        .clone()
}

fn blob_json(layout: &Path, descriptor: &Value) -> Value {
    let digest = descriptor["digest"].as_str().expect("descriptor digest");
    read_json(&blob_path(layout, digest))
}

/// Exports `image` (with `extra` options) to a raw file, checks it with
/// e2fsck, mounts it and compares the tree with `expected`.
fn assert_export_matches(image: &str, extra: &[&str], expected: &Path, work: &Path) {
    let disk = work.join("disk.img");
    run(Command::new(esgz_bin())
        .args(["-q", "export", image, "-o"])
        .arg(&disk)
        .arg("--cache-dir")
        .arg(work.join("cache"))
        .args(extra));
    e2fsck_clean(&disk);
    let mount = LoopMount::new(&disk);
    assert_tree_matches(mount.path(), expected);
}

#[test]
fn convert_all_platforms_keeps_index() {
    let source = two_platform_layout();
    let source_index = blob_json(source.path(), &tagged(source.path(), "latest"));
    let work = tempfile::tempdir().expect("temp dir");
    let out = work.path().join("out");
    let image = format!("oci:{}:converted", out.display());
    run(Command::new(esgz_bin()).args([
        "-q",
        "convert",
        &format!("oci:{}:latest", source.path().display()),
        &image,
        "--all-platforms",
        "--force",
        "--compression-level",
        "1",
    ]));

    let top = tagged(&out, "converted");
    assert_eq!(
        top["mediaType"], "application/vnd.oci.image.index.v1+json",
        "the tag names an index: {top}"
    );
    let index = blob_json(&out, &top);
    let entries = index["manifests"].as_array().expect("index manifests");
    assert_eq!(entries.len(), 2, "platform entries: {index}");

    let cases = [("amd64", "basic"), ("arm64", "links")];
    for (position, (architecture, fixture)) in cases.iter().enumerate() {
        let entry = &entries[position];
        let before = &source_index["manifests"][position];
        assert_eq!(
            entry["platform"], before["platform"],
            "{architecture}: the platform of the index entry"
        );
        assert_ne!(
            entry["digest"], before["digest"],
            "{architecture}: --force rewrites the manifest"
        );
        let manifest = blob_json(&out, entry);
        let layers = manifest["layers"].as_array().expect("layers");
        assert!(!layers.is_empty(), "{architecture}: no layers");
        for layer in layers {
            assert!(
                layer["annotations"][TOC_DIGEST].is_string(),
                "{architecture}: a layer without {TOC_DIGEST}: {layer}"
            );
        }
        let config = blob_json(&out, &manifest["config"]);
        assert_eq!(config["architecture"], *architecture);

        let export_dir = work.path().join(architecture);
        fs::create_dir(&export_dir).expect("export dir");
        assert_export_matches(
            &image,
            &["--platform", &format!("linux/{architecture}")],
            &fixture_dir(fixture).join("expected.json"),
            &export_dir,
        );
    }
}

/// Runs `esgz-nbd ARGS` with no credentials in the environment: `HOME` is
/// an empty folder and neither `REGISTRY_AUTH_FILE` nor `DOCKER_CONFIG` is set.
fn esgz_without_credentials(args: &[&str], home: &Path) -> Output {
    Command::new(esgz_bin())
        .args(args)
        .env("HOME", home)
        .env_remove("DOCKER_CONFIG")
        .env_remove("REGISTRY_AUTH_FILE")
        .output()
        .expect("starting esgz-nbd")
}

#[test]
fn push_with_basic_auth() {
    let (user, password) = ("esgz", "pa55-push-secret");
    let registry = Registry::start_with_auth(user, password);
    let work = tempfile::tempdir().expect("temp dir");
    let home = work.path().join("home");
    fs::create_dir(&home).expect("create HOME");
    let config = write_docker_config(work.path(), &registry.addr(), user, password);
    let config_arg = config.to_str().expect("utf-8 path");
    let wrong_dir = work.path().join("wrong");
    fs::create_dir(&wrong_dir).expect("create a folder");
    let wrong = write_docker_config(&wrong_dir, &registry.addr(), user, "not-the-password");
    let wrong_arg = wrong.to_str().expect("utf-8 path");

    let basic_tar = fixture_dir("basic").join("input.tar");
    let basic_source = format!("oci:{}", fixture_dir("basic").join("oci").display());
    let built = format!("{}/private/built:v1", registry.addr());
    let converted = format!("{}/private/converted:v1", registry.addr());
    let commands: [(&str, Vec<&str>, &str); 2] = [
        (
            "build",
            vec!["build", basic_tar.to_str().expect("utf-8 path"), &built],
            &built,
        ),
        (
            "convert",
            vec!["convert", &basic_source, &converted, "--force"],
            &converted,
        ),
    ];
    for (name, args, destination) in commands {
        // Without credentials, and with a wrong password: a clear error.
        let empty: [&str; 0] = [];
        let failures: [(&str, &[&str]); 2] = [
            ("no credentials", &empty),
            ("wrong password", &["--auth-file", wrong_arg]),
        ];
        for (case, extra) in failures {
            let mut full = args.clone();
            full.extend_from_slice(extra);
            let output = esgz_without_credentials(&full, &home);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(
                !output.status.success(),
                "{name}, {case}: the push succeeded; stderr:\n{stderr}"
            );
            assert!(
                !stderr.contains("panicked"),
                "{name}, {case}: panicked; stderr:\n{stderr}"
            );
            assert!(
                stderr.contains("401") || stderr.contains("login") || stderr.contains("credentials"),
                "{name}, {case}: the error does not say that credentials were rejected or missing; stderr:\n{stderr}"
            );
            assert!(
                stderr.contains(&registry.addr()),
                "{name}, {case}: the error does not name the registry; stderr:\n{stderr}"
            );
            assert!(
                !stderr.contains(password),
                "{name}, {case}: the password leaked; stderr:\n{stderr}"
            );
        }

        // With the auth file, the push succeeds and reads back.
        let mut full = args.clone();
        full.extend_from_slice(&["--auth-file", config_arg]);
        let output = esgz_without_credentials(&full, &home);
        assert!(
            output.status.success(),
            "{name} with --auth-file failed with {}; stderr:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let export_dir = work.path().join(name);
        fs::create_dir(&export_dir).expect("export dir");
        assert_export_matches(
            destination,
            &["--auth-file", config_arg],
            &fixture_dir("basic").join("expected.json"),
            &export_dir,
        );
    }
}

/// A build that fails names the user's input first (before the spooled copy that
/// the cause names), and leaves no layout behind where it created one.
#[test]
fn failed_build_leaves_no_layout() {
    let work = tempfile::tempdir().expect("temp dir");
    let not_tar = work.path().join("notes.json");
    fs::write(&not_tar, b"{\"this\": \"is not a tar\"}\n").expect("writing the input");

    for (input, expected) in [
        (not_tar.clone(), "is not a valid tar or tar.gz"),
        (
            work.path().join("missing"),
            "failed to read the build input",
        ),
    ] {
        let layout = work.path().join("out");
        let output = Command::new(esgz_bin())
            .arg("build")
            .arg(&input)
            .arg(format!("oci:{}", layout.display()))
            .output()
            .expect("running esgz-nbd build");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success(),
            "build of {} succeeded",
            input.display()
        );
        assert!(stderr.contains(expected), "{stderr}");
        assert!(
            stderr.contains(&input.display().to_string()),
            "the error does not name {}: {stderr}",
            input.display()
        );
        let named_at = stderr.find(&input.display().to_string());
        let spooled_at = stderr.find("input.tar").unwrap_or(usize::MAX);
        assert!(
            named_at.is_some_and(|at| at < spooled_at),
            "the error names the spooled copy first: {stderr}"
        );
        assert!(!layout.exists(), "a failed build left {}", layout.display());
    }
}
