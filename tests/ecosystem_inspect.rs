//! `esgz-nbd inspect` on the reference fixtures: TOC entry counts, digest
//! checks and prefetch hints against the fixtures' sidecars.

#[path = "support/mod.rs"]
mod support;

use std::process::Command;

use serde_json::Value;

use support::{esgz_bin, fixture_dir, run};

const FIXTURES: [&str; 5] = ["basic", "links", "xattrs", "large", "multilayer"];

fn expected_layers(fixture: &str) -> Vec<Value> {
    let path = fixture_dir(fixture).join("expected.json");
    let text = std::fs::read_to_string(&path).expect("reading expected.json");
    let sidecar: Value = serde_json::from_str(&text).expect("expected.json is JSON");
    sidecar["layers"].as_array().expect("layers array").clone()
}

fn inspect(fixture: &str, extra: &[&str]) -> String {
    let image = format!("oci:{}:latest", fixture_dir(fixture).join("oci").display());
    let output = run(Command::new(esgz_bin())
        .arg("inspect")
        .arg(&image)
        .args(extra)
        .env("RUST_LOG", "warn"));
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

#[test]
fn inspect_json_matches_sidecars() {
    for fixture in FIXTURES {
        let report: Value =
            serde_json::from_str(&inspect(fixture, &["--json"])).expect("--json prints JSON");
        let layers = report["layers"].as_array().expect("layers array");
        let expected = expected_layers(fixture);
        assert_eq!(layers.len(), expected.len(), "{fixture}: layer count");

        for (position, (layer, want)) in layers.iter().zip(&expected).enumerate() {
            let what = format!("{fixture} layer {}", position + 1);
            assert_eq!(layer["estargz"], true, "{what}");
            assert_eq!(layer["digest"], want["blob_digest"], "{what}");
            assert_eq!(layer["size"], want["blob_size"], "{what}");
            assert_eq!(layer["toc_entries"], want["toc_entries"], "{what}");
            assert_eq!(layer["toc_digest"], want["toc_digest"], "{what}");
            assert_eq!(layer["toc_digest_actual"], want["toc_digest"], "{what}");
            assert_eq!(layer["toc_verification"], "verified", "{what}");
            assert_eq!(
                layer["uncompressed_size"], want["uncompressed_size"],
                "{what}"
            );

            let prioritized = want["build"]["prioritized_files"]
                .as_array()
                .is_some_and(|files| !files.is_empty());
            let prefetch = &layer["prefetch"];
            if prioritized {
                assert_eq!(prefetch["kind"], "landmark", "{what}: {prefetch}");
                let bytes = prefetch["bytes"].as_u64().expect("prefetch bytes");
                let size = layer["size"].as_u64().expect("size");
                assert!(
                    bytes > 0 && bytes < size,
                    "{what}: prefetch {bytes} of {size}"
                );
            } else {
                assert_eq!(prefetch["kind"], "nothing", "{what}: {prefetch}");
            }
        }

        let platforms = report["platforms"].as_array().expect("platforms array");
        assert_eq!(platforms.len(), 1, "{fixture}: {platforms:?}");
        assert_eq!(platforms[0]["platform"], "linux/amd64", "{fixture}");
        assert_eq!(platforms[0]["selected"], true, "{fixture}");
    }
}

#[test]
fn inspect_text_lists_each_layer() {
    for fixture in FIXTURES {
        let text = inspect(fixture, &[]);
        let expected = expected_layers(fixture);
        for want in &expected {
            let digest = want["blob_digest"].as_str().expect("blob digest");
            assert!(text.contains(digest), "{fixture}: no {digest} in\n{text}");
            let toc_digest = want["toc_digest"].as_str().expect("TOC digest");
            assert!(
                text.contains(&format!("{toc_digest} verified")),
                "{fixture}: {toc_digest} not verified in\n{text}"
            );
            let entries = format!("TOC entries:  {}", want["toc_entries"]);
            assert!(
                text.contains(&entries),
                "{fixture}: no {entries:?} in\n{text}"
            );
        }
        assert_eq!(
            text.matches("eStargz:      yes").count(),
            expected.len(),
            "{fixture}:\n{text}"
        );
    }
}

#[test]
fn inspect_reports_toc_digest_mismatch() {
    let copy = support::copy_layout(&fixture_dir("links").join("oci"));
    let wrong = format!("sha256:{}", "0".repeat(64));
    support::set_toc_digest_annotation(copy.path(), 0, &wrong);
    let image = format!("oci:{}:latest", copy.path().display());
    let output = rejected_inspect(&image, &["--json"]);
    let report: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let layer = &report["layers"][0];
    assert_eq!(layer["toc_verification"], "mismatch", "{layer}");
    assert_eq!(layer["toc_digest"], wrong.as_str(), "{layer}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&wrong),
        "the error does not name the annotation: {stderr}"
    );

    let text = rejected_inspect(&image, &[]).stdout;
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains("MISMATCH"), "{text}");
}

/// Runs `inspect IMAGE EXTRA` and asserts that it printed its report and then
/// failed, because serve would reject the image.
fn rejected_inspect(image: &str, extra: &[&str]) -> std::process::Output {
    let output = Command::new(esgz_bin())
        .arg("inspect")
        .arg(image)
        .args(extra)
        .output()
        .expect("running esgz-nbd inspect");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "inspect succeeded: {stderr}");
    assert!(!output.stdout.is_empty(), "no report printed: {stderr}");
    assert!(
        stderr.contains("serve and export would reject this image"),
        "{stderr}"
    );
    output
}

/// A layer without a valid footer is served whole only when its descriptor
/// has no TOC digest annotation. With one, serve rejects it, and inspect reports that.
#[test]
fn inspect_broken_footer_names_outcome() {
    let copy = support::copy_layout(&fixture_dir("links").join("oci"));
    support::patch_layer_blob(copy.path(), 0, |blob| {
        let footer_start = blob.len() - 51;
        blob[footer_start..].fill(0);
    });
    let image = format!("oci:{}:latest", copy.path().display());

    let text = rejected_inspect(&image, &[]).stdout;
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.contains("eStargz:      no (no eStargz footer"),
        "{text}"
    );
    assert!(text.contains("rejected when served"), "{text}");
    assert!(!text.contains("read it as a plain tar.gz"), "{text}");

    support::edit_manifest(copy.path(), |manifest| {
        manifest["layers"][0]
            .as_object_mut()
            .expect("layer descriptor object")
            .remove("annotations");
    });
    let text = run(Command::new(esgz_bin()).args(["inspect", &image])).stdout;
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains("fetched whole when served"), "{text}");
}

/// A single-platform image requested for another platform is served with a
/// warning that names both platforms; its own platform gives no warning.
#[test]
fn export_warns_on_other_platform() {
    let image = format!("oci:{}:latest", fixture_dir("basic").join("oci").display());
    let work = tempfile::tempdir().expect("temp dir");
    let export = |platform: &str| {
        let output = run(Command::new(esgz_bin())
            .arg("export")
            .args(["--platform", platform])
            .arg(&image)
            .arg("-o")
            .arg(work.path().join("disk.img"))
            .args(["--cache-dir"])
            .arg(work.path().join("cache"))
            .env("RUST_LOG", "warn"));
        String::from_utf8_lossy(&output.stderr).into_owned()
    };

    let other = export("linux/arm64");
    assert!(
        other.contains("not the requested one") && other.contains("built_for=linux/amd64"),
        "no platform warning:\n{other}"
    );
    assert!(other.contains("requested=linux/arm64"), "{other}");
    let own = export("linux/amd64");
    assert!(
        !own.contains("not the requested one"),
        "warning for the image's own platform:\n{own}"
    );
}

/// Exports `image` to a temporary disk with a fresh cache and returns the
/// warnings the export logged.
fn export_warnings(image: &str) -> String {
    let work = tempfile::tempdir().expect("temp dir");
    let output = run(Command::new(esgz_bin())
        .arg("export")
        .arg(image)
        .arg("-o")
        .arg(work.path().join("disk.img"))
        .args(["--cache-dir"])
        .arg(work.path().join("cache"))
        .env("RUST_LOG", "warn"));
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A layer whose media type names zstd but whose blob is eStargz is served from its
/// bytes, with a warning that names the media type.
#[test]
fn export_warns_on_wrong_media_type() {
    let layout = support::copy_layout(&fixture_dir("basic").join("oci"));
    let zstd = "application/vnd.oci.image.layer.v1.tar+zstd";
    support::edit_manifest(layout.path(), |manifest| {
        manifest["layers"][0]["mediaType"] = zstd.into();
    });
    let edited = export_warnings(&format!("oci:{}:latest", layout.path().display()));
    assert!(
        edited.contains("media type is not a gzip tar type"),
        "no media type warning:\n{edited}"
    );
    assert!(
        edited.contains(zstd),
        "the warning does not name the type:\n{edited}"
    );
    let original = export_warnings(&format!(
        "oci:{}:latest",
        fixture_dir("basic").join("oci").display()
    ));
    assert!(
        !original.contains("media type is not a gzip tar type"),
        "warning for a tar+gzip layer:\n{original}"
    );
}

/// A TOC without entries gives an empty layer and a warning, not a silent empty disk.
#[test]
fn export_warns_on_empty_toc() {
    let layout = support::copy_layout(&fixture_dir("basic").join("oci"));
    support::rewrite_toc(layout.path(), 0, |toc| {
        toc["entries"] = Value::Array(Vec::new());
    });
    let stderr = export_warnings(&format!("oci:{}:latest", layout.path().display()));
    assert!(
        stderr.contains("TOC lists no entries"),
        "no empty TOC warning:\n{stderr}"
    );
}
