//! OCI image layouts built from plain (non-eStargz) layers: an uncompressed tar or a
//! tar.gz, which esgz-nbd fetches whole at start.

use std::fs;
use std::io::Read;
use std::path::Path;

use serde_json::{json, Value};

use super::layout::{sha256_digest, write_blob};

pub const GZIP_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const TAR_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

/// One layer of a test image: media type, blob bytes, annotations and the
/// digest of its uncompressed tar.
pub struct ImageLayer {
    pub media_type: &'static str,
    pub blob: Vec<u8>,
    pub annotations: Value,
    pub diff_id: String,
}

/// Writes an OCI image layout with one manifest tagged `latest`.
pub fn write_layout(layout: &Path, layers: &[ImageLayer]) {
    fs::create_dir_all(layout.join("blobs/sha256")).expect("creating the layout folder");
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

/// Returns an uncompressed tar layer of `tar`.
pub fn plain_tar_layer(tar: Vec<u8>) -> ImageLayer {
    ImageLayer {
        media_type: TAR_LAYER,
        diff_id: sha256_digest(&tar),
        blob: tar,
        annotations: json!({}),
    }
}

/// Returns a tar.gz layer of `gzipped`, with the digest of its tar as the diff id.
pub fn gzip_layer(gzipped: Vec<u8>) -> ImageLayer {
    let mut tar = Vec::new();
    flate2::read::MultiGzDecoder::new(&gzipped[..])
        .read_to_end(&mut tar)
        .expect("gunzipping a test layer");
    ImageLayer {
        media_type: GZIP_LAYER,
        diff_id: sha256_digest(&tar),
        blob: gzipped,
        annotations: json!({}),
    }
}

/// Writes an OCI layout in `layout` whose only layer is the plain tar.gz `gzipped`
/// and returns its image argument (`oci:<dir>:latest`).
pub fn plain_gzip_image(layout: &Path, gzipped: Vec<u8>) -> String {
    write_layout(layout, &[gzip_layer(gzipped)]);
    format!("oci:{}:latest", layout.display())
}
