//! `esgz-nbd build` and `esgz-nbd convert` against the reference eStargz
//! reader (`estargz-ref verify`), a local docker-registry, and the kernel's
//! view of the exported ext4 tree.
//!
//! Needs Go and Debian's stargz-snapshotter library package to build the
//! reference checker, docker-registry, and for the tree checks root, loop
//! devices and e2fsprogs.

#[path = "support/mod.rs"]
mod support;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use support::{
    assert_tree_matches, e2fsck_clean, esgz_bin, fixture_dir, run, run_stdout, shared_dir,
    verify_layout, LoopMount, Registry,
};

fn sha256_hex(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).expect("read JSON")).expect("valid JSON")
}

fn blob(dir: &Path, digest: &str) -> PathBuf {
    dir.join("blobs/sha256").join(&digest["sha256:".len()..])
}

/// Returns the manifest the layout tags `tag`.
fn manifest_of(dir: &Path, tag: &str) -> Value {
    let index = read_json(&dir.join("index.json"));
    let entry = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .find(|entry| entry["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .expect("tagged manifest");
    read_json(&blob(dir, entry["digest"].as_str().expect("digest")))
}

fn put_blob(dir: &Path, bytes: &[u8]) -> (String, u64) {
    let digest = sha256_hex(bytes);
    fs::write(blob(dir, &digest), bytes).expect("write blob");
    (digest, bytes.len() as u64)
}

/// Writes an OCI layout whose single layer is `tar_gz` as a plain gzip
/// layer (no eStargz annotations), tagged `latest`.
fn plain_layout(dir: &Path, tar_gz: &Path) {
    fs::create_dir_all(dir.join("blobs/sha256")).expect("create layout");
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("oci-layout");
    let layer = fs::read(tar_gz).expect("read the layer");
    let mut tar = Vec::new();
    flate2::read::MultiGzDecoder::new(&layer[..])
        .read_to_end(&mut tar)
        .expect("gunzip the layer");
    let (layer_digest, layer_size) = put_blob(dir, &layer);

    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [sha256_hex(&tar)]},
        "history": [{"created_by": "test"}],
    });
    let (config_digest, config_size) = put_blob(dir, &serde_json::to_vec(&config).expect("config"));
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer_size}],
        "annotations": {"org.example.kept": "yes"},
    });
    let (manifest_digest, manifest_size) =
        put_blob(dir, &serde_json::to_vec(&manifest).expect("manifest"));
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": "latest"},
        }],
    });
    fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&index).expect("index"),
    )
    .expect("index.json");
}

/// Exports `image` to an ext4 file, checks it with e2fsck, mounts it and
/// compares the tree with the sidecar's `merged_tree`.
fn assert_export_matches(image: &str, expected: &Path, work: &Path) {
    let disk = work.join("disk.img");
    run(Command::new(esgz_bin())
        .arg("-q")
        .arg("export")
        .arg(image)
        .arg("-o")
        .arg(&disk)
        .arg("--cache-dir")
        .arg(work.join("cache")));
    e2fsck_clean(&disk);
    let mount = LoopMount::new(&disk);
    assert_tree_matches(mount.path(), expected);
}

fn esgz(args: &[&str]) -> String {
    let mut command = Command::new(esgz_bin());
    command.arg("-q").args(args);
    run_stdout(&mut command).trim().to_string()
}

#[test]
fn build_from_fixture_tars_passes_reference() {
    let work = tempfile::tempdir().expect("temp dir");
    let inputs = [
        ("basic", "input.tar"),
        ("links", "input.tar"),
        ("xattrs", "input.tar"),
        ("multilayer", "input-layer1.tar"),
        ("multilayer", "input-layer2.tar"),
    ];
    for (index, (fixture, tar)) in inputs.iter().enumerate() {
        let input = fixture_dir(fixture).join(tar);
        let layout = work.path().join(format!("out{index}"));
        let image = format!("oci:{}:v1", layout.display());
        esgz(&[
            "build",
            input.to_str().expect("utf-8 path"),
            &image,
            "--chunk-size",
            "65536",
            "--compression-level",
            "6",
        ]);
        let layers = verify_layout(&layout, "v1");
        assert_eq!(layers.len(), 1, "{fixture}/{tar}");
        assert_eq!(
            layers[0]["status"], "passed",
            "{fixture}/{tar}: {}",
            layers[0]
        );

        let manifest = manifest_of(&layout, "v1");
        let annotations = &manifest["layers"][0]["annotations"];
        assert_eq!(
            annotations["containerd.io/snapshot/stargz/toc.digest"], layers[0]["toc_digest"],
            "{fixture}/{tar}"
        );
        assert_eq!(
            annotations["io.containers.estargz.uncompressed-size"],
            layers[0]["uncompressed_size"].to_string(),
            "{fixture}/{tar}"
        );
    }
}

#[test]
fn build_exports_fixture_trees() {
    let work = tempfile::tempdir().expect("temp dir");
    for fixture in ["basic", "links", "xattrs"] {
        let dir = fixture_dir(fixture);
        let layout = work.path().join(fixture);
        let image = format!("oci:{}:latest", layout.display());
        esgz(&[
            "build",
            dir.join("input.tar").to_str().expect("utf-8 path"),
            &image,
        ]);
        let export_dir = work.path().join(format!("{fixture}-export"));
        fs::create_dir_all(&export_dir).expect("export dir");
        assert_export_matches(&image, &dir.join("expected.json"), &export_dir);
    }
}

#[test]
fn prioritize_puts_files_first() {
    let work = tempfile::tempdir().expect("temp dir");
    let list = work.path().join("prioritize.txt");
    fs::write(&list, "# start-up files\nbin/tool\n\ndata/f4097\n").expect("write list");
    let layout = work.path().join("out");
    let image = format!("oci:{}:latest", layout.display());
    let input = fixture_dir("basic").join("input.tar");
    esgz(&[
        "build",
        input.to_str().expect("utf-8 path"),
        &image,
        "--prioritize",
        list.to_str().expect("utf-8 path"),
    ]);
    verify_layout(&layout, "latest");

    let manifest = manifest_of(&layout, "latest");
    let digest = manifest["layers"][0]["digest"]
        .as_str()
        .expect("layer digest");
    let blob_bytes = fs::read(blob(&layout, digest)).expect("blob");
    let mut tar = Vec::new();
    flate2::read::MultiGzDecoder::new(&blob_bytes[..])
        .read_to_end(&mut tar)
        .expect("gunzip");
    let names: Vec<String> = tar::Archive::new(&tar[..])
        .entries()
        .expect("tar")
        .map(|entry| {
            entry
                .expect("entry")
                .path()
                .expect("path")
                .display()
                .to_string()
        })
        .collect();
    let landmark = names
        .iter()
        .position(|name| name == ".prefetch.landmark")
        .expect("landmark");
    let tool = names
        .iter()
        .position(|name| name == "bin/tool")
        .expect("bin/tool");
    let data = names
        .iter()
        .position(|name| name == "data/f4097")
        .expect("data/f4097");
    assert!(tool < data && data < landmark, "order: {names:?}");
    assert_eq!(names.last().map(String::as_str), Some("stargz.index.json"));
}

#[test]
fn convert_plain_layout_to_layout() {
    let work = tempfile::tempdir().expect("temp dir");
    let source = work.path().join("plain");
    plain_layout(&source, &fixture_dir("large").join("input.tar.gz"));
    let destination = work.path().join("esgz");
    let digest = esgz(&[
        "convert",
        &format!("oci:{}:latest", source.display()),
        &format!("oci:{}:converted", destination.display()),
        "--compression-level",
        "6",
    ]);
    assert!(digest.starts_with("sha256:"), "convert printed {digest:?}");

    let layers = verify_layout(&destination, "converted");
    assert_eq!(layers.len(), 1);
    let manifest = manifest_of(&destination, "converted");
    assert_eq!(manifest["annotations"]["org.example.kept"], "yes");
    let config = read_json(&blob(
        &destination,
        manifest["config"]["digest"].as_str().expect("config"),
    ));
    assert_eq!(config["rootfs"]["diff_ids"][0], layers[0]["diff_id"]);
    assert_eq!(config["config"]["Env"][0], "PATH=/usr/bin");

    // Converting the converted image again copies the layer unchanged.
    let again = work.path().join("again");
    esgz(&[
        "convert",
        &format!("oci:{}:converted", destination.display()),
        &format!("oci:{}:latest", again.display()),
    ]);
    let again_manifest = manifest_of(&again, "latest");
    assert_eq!(
        again_manifest["layers"][0]["digest"],
        manifest["layers"][0]["digest"]
    );

    let export_dir = work.path().join("export");
    fs::create_dir_all(&export_dir).expect("export dir");
    assert_export_matches(
        &format!("oci:{}:converted", destination.display()),
        &fixture_dir("large").join("expected.json"),
        &export_dir,
    );
}

#[test]
fn convert_pushes_to_registry() {
    let work = tempfile::tempdir().expect("temp dir");
    let source = work.path().join("plain");
    plain_layout(&source, &fixture_dir("large").join("input.tar.gz"));
    let registry = Registry::start(None);
    let remote = format!("{}/converted/large:v1", registry.addr());
    esgz(&[
        "convert",
        &format!("oci:{}:latest", source.display()),
        &remote,
        "--compression-level",
        "1",
    ]);

    // A second push finds every blob in place and only rewrites the manifest.
    esgz(&[
        "convert",
        &format!("oci:{}:latest", source.display()),
        &remote,
        "--compression-level",
        "1",
    ]);

    // Read back from the registry into a layout (the eStargz layer is
    // copied unchanged) and check it with the reference reader.
    let back = work.path().join("back");
    esgz(&[
        "convert",
        &remote,
        &format!("oci:{}:latest", back.display()),
    ]);
    let layers = verify_layout(&back, "latest");
    assert_eq!(layers[0]["status"], "passed");

    let export_dir = work.path().join("export");
    fs::create_dir_all(&export_dir).expect("export dir");
    assert_export_matches(
        &remote,
        &fixture_dir("large").join("expected.json"),
        &export_dir,
    );
}

#[test]
fn convert_force_rewrites_debian_image() {
    let image_dir = shared_dir().join("images/debian-bookworm-minbase");
    let work = tempfile::tempdir().expect("temp dir");
    let destination = work.path().join("debian");
    esgz(&[
        "convert",
        &format!("oci:{}", image_dir.join("oci").display()),
        &format!("oci:{}:latest", destination.display()),
        "--force",
        "--compression-level",
        "1",
    ]);
    verify_layout(&destination, "latest");
    let export_dir = work.path().join("export");
    fs::create_dir_all(&export_dir).expect("export dir");
    assert_export_matches(
        &format!("oci:{}:latest", destination.display()),
        &image_dir.join("expected.json"),
        &export_dir,
    );
}
