//! Layers without an eStargz footer (plain tar.gz and uncompressed tar) are
//! fetched whole at start, checked against their digest, and served from the
//! cache; images may mix them with eStargz layers.

#[path = "support/mod.rs"]
mod support;

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use support::{
    assert_tree_matches, e2fsck_clean, esgz_bin, fixture_dir, read_layer_blob, run, LoopMount,
    NbdMount, Server,
};

const GZIP_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const TAR_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

/// One layer of a test image: media type, blob bytes, annotations and the
/// digest of its uncompressed tar.
struct Layer {
    media_type: &'static str,
    blob: Vec<u8>,
    annotations: Value,
    diff_id: String,
}

fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn write_blob(layout: &Path, bytes: &[u8]) -> String {
    let digest = digest_of(bytes);
    let dir = layout.join("blobs/sha256");
    fs::create_dir_all(&dir).expect("creating blobs/sha256");
    fs::write(dir.join(&digest["sha256:".len()..]), bytes).expect("writing a blob");
    digest
}

/// Writes an OCI image layout with one manifest tagged `latest`.
fn write_layout(layout: &Path, layers: &[Layer]) {
    fs::create_dir_all(layout).expect("creating the layout folder");
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("writing oci-layout");
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|layer| layer.diff_id.clone()).collect::<Vec<_>>(),
        },
    });
    let config_bytes = serde_json::to_vec(&config).expect("encoding the config");
    let config_digest = write_blob(layout, &config_bytes);
    let descriptors: Vec<Value> = layers
        .iter()
        .map(|layer| {
            json!({
                "mediaType": layer.media_type,
                "digest": write_blob(layout, &layer.blob),
                "size": layer.blob.len(),
                "annotations": layer.annotations,
            })
        })
        .collect();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_bytes.len(),
        },
        "layers": descriptors,
    });
    let manifest_bytes = serde_json::to_vec(&manifest).expect("encoding the manifest");
    let manifest_digest = write_blob(layout, &manifest_bytes);
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_bytes.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"org.opencontainers.image.ref.name": "latest"},
        }],
    });
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).expect("encoding index.json"),
    )
    .expect("writing index.json");
}

fn plain_tar_layer(tar: Vec<u8>) -> Layer {
    Layer {
        media_type: TAR_LAYER,
        diff_id: digest_of(&tar),
        blob: tar,
        annotations: json!({}),
    }
}

fn gzip_layer(gzipped: Vec<u8>) -> Layer {
    let mut tar = Vec::new();
    flate2::read::MultiGzDecoder::new(&gzipped[..])
        .read_to_end(&mut tar)
        .expect("gunzipping a test layer");
    Layer {
        media_type: GZIP_LAYER,
        diff_id: digest_of(&tar),
        blob: gzipped,
        annotations: json!({}),
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut encoder, bytes).expect("gzipping");
    encoder.finish().expect("finishing gzip")
}

/// Exports and serves the layout, checking both against `expected` and that
/// the log names every non-lazy layer.
fn check_layout(layout: &Path, expected: &Path, non_lazy_layers: usize) {
    let image = format!("oci:{}:latest", layout.display());
    let dir = tempfile::tempdir().expect("temp dir");
    let disk = dir.path().join("disk.img");
    let output = run(Command::new(esgz_bin())
        .arg("export")
        .arg(&image)
        .arg("-o")
        .arg(&disk)
        .arg("--cache-dir")
        .arg(dir.path().join("cache")));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let warnings = stderr
        .lines()
        .filter(|line| line.contains("not lazy"))
        .count();
    assert_eq!(
        warnings, non_lazy_layers,
        "expected one 'not lazy' line per plain layer; stderr:\n{stderr}"
    );
    e2fsck_clean(&disk);
    {
        let mount = LoopMount::new(&disk);
        assert_tree_matches(mount.path(), expected);
    }

    let server = Server::start(&image, &[]);
    let mount = NbdMount::new(server.socket());
    assert_tree_matches(mount.path(), expected);
}

#[test]
fn gzip_layer_served_from_cache() {
    let fixture = fixture_dir("large");
    let gzipped = fs::read(fixture.join("input.tar.gz")).expect("reading input.tar.gz");
    let dir = tempfile::tempdir().expect("temp dir");
    let layout = dir.path().join("oci");
    write_layout(&layout, &[gzip_layer(gzipped)]);
    check_layout(&layout, &fixture.join("expected.json"), 1);
}

#[test]
fn uncompressed_tar_layer_served_from_cache() {
    let fixture = fixture_dir("links");
    let tar = fs::read(fixture.join("input.tar")).expect("reading input.tar");
    let dir = tempfile::tempdir().expect("temp dir");
    let layout = dir.path().join("oci");
    write_layout(&layout, &[plain_tar_layer(tar)]);
    check_layout(&layout, &fixture.join("expected.json"), 1);
}

/// Layer 1 as an uncompressed tar, layer 2 as the reference eStargz blob and
/// layer 3 as a plain tar.gz must merge like the all-eStargz image.
#[test]
fn mixed_layers_merge_like_estargz() {
    let fixture = fixture_dir("multilayer");
    let layer1 = fs::read(fixture.join("input-layer1.tar")).expect("reading layer 1 tar");
    let layer3 = fs::read(fixture.join("input-layer3.tar")).expect("reading layer 3 tar");

    let original = fixture.join("oci");
    let manifest_layers = support::read_manifest(&original)["layers"].clone();
    let estargz = Layer {
        media_type: GZIP_LAYER,
        blob: read_layer_blob(&original, 1),
        annotations: manifest_layers[1]["annotations"].clone(),
        diff_id: {
            let expected: Value = serde_json::from_slice(
                &fs::read(fixture.join("expected.json")).expect("reading expected.json"),
            )
            .expect("expected.json is JSON");
            expected["layers"][1]["diff_id"]
                .as_str()
                .expect("layer 2 diff_id")
                .to_string()
        },
    };

    let dir = tempfile::tempdir().expect("temp dir");
    let layout = dir.path().join("oci");
    write_layout(
        &layout,
        &[plain_tar_layer(layer1), estargz, gzip_layer(gzip(&layer3))],
    );
    check_layout(&layout, &fixture.join("expected.json"), 2);
}

/// A plain layer whose bytes do not match its digest is rejected at start.
#[test]
fn plain_layer_digest_mismatch_is_rejected() {
    let fixture = fixture_dir("links");
    let tar = fs::read(fixture.join("input.tar")).expect("reading input.tar");
    let dir = tempfile::tempdir().expect("temp dir");
    let layout = dir.path().join("oci");
    write_layout(&layout, &[plain_tar_layer(tar)]);

    // Flip one byte of the stored blob without renaming it.
    let manifest = support::read_manifest(&layout);
    let digest = manifest["layers"][0]["digest"]
        .as_str()
        .expect("layer digest");
    let blob_path = support::blob_path(&layout, digest);
    let mut blob = fs::read(&blob_path).expect("reading the blob");
    blob[600] ^= 0x01;
    fs::write(&blob_path, &blob).expect("writing the blob");

    let output = Command::new(esgz_bin())
        .arg("export")
        .arg(format!("oci:{}:latest", layout.display()))
        .arg("-o")
        .arg(dir.path().join("disk.img"))
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .output()
        .expect("starting esgz-nbd export");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "export accepted a corrupt layer");
    assert!(!stderr.contains("panicked"), "export panicked:\n{stderr}");
    assert!(
        stderr.contains(digest),
        "error does not name the layer:\n{stderr}"
    );
    assert!(
        stderr.contains("does not match its digest"),
        "error does not say what is wrong:\n{stderr}"
    );
}
