//! Layers without an eStargz footer (plain tar.gz and uncompressed tar) are
//! fetched whole at start, checked against their digest, and served from the
//! cache; images may mix them with eStargz layers.

#[path = "support/mod.rs"]
mod support;

use std::fs;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

use support::{
    assert_tree_matches, e2fsck_clean, esgz_bin, fixture_dir, gzip, gzip_layer, plain_tar_layer,
    read_layer_blob, run, write_layout, ImageLayer, LoopMount, NbdMount, Server, GZIP_LAYER,
};

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
    let estargz = ImageLayer {
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
