//! A synthetic eStargz layer with many small files, for memory and parsing measurements:
//! `files` regular files of 8 bytes each in directories of 1000, their contents packed
//! into a few gzip members (several files share a member through `innerOffset`), the TOC
//! member and the 51-byte footer, written into an OCI image layout.

#![allow(dead_code)]

use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;

use flate2::write::GzEncoder;
use flate2::Compression;
use sha2::{Digest, Sha256};

/// Files per directory.
const FILES_PER_DIR: usize = 1000;
/// Bytes of each file.
const FILE_SIZE: usize = 8;

pub struct SyntheticLayer {
    pub blob: Vec<u8>,
    pub toc_json: Vec<u8>,
    pub toc_offset: u64,
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    encoder.write_all(data).expect("write to a Vec");
    encoder.finish().expect("finish a Vec")
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The TOC JSON alone (member offsets are those [`synthetic_layer`] uses).
pub fn synthetic_toc_json(files: usize, members: usize) -> Vec<u8> {
    synthetic_layer(files, members).toc_json
}

/// Builds the blob and TOC of a layer with `files` files spread over `members` members.
pub fn synthetic_layer(files: usize, members: usize) -> SyntheticLayer {
    let members = members.max(1);
    let per_member = files.div_ceil(members).max(1);
    let mut blob = Vec::new();
    let mut member_offsets = Vec::new();
    for member in 0..members {
        let first = member * per_member;
        let last = ((member + 1) * per_member).min(files);
        let mut plain = Vec::with_capacity((last.saturating_sub(first)) * FILE_SIZE);
        for file in first..last {
            plain.extend_from_slice(format!("{file:08x}").as_bytes());
        }
        member_offsets.push(blob.len() as u64);
        blob.extend(gzip(&plain));
    }

    let mut json = String::with_capacity(files * 190 + 64);
    json.push_str(r#"{"version":1,"entries":["#);
    for file in 0..files {
        if file % FILES_PER_DIR == 0 {
            if file > 0 {
                json.push(',');
            }
            let _ = write!(
                json,
                r#"{{"name":"d{:04}/","type":"dir","modtime":"2023-11-14T22:13:20Z","mode":493}}"#,
                file / FILES_PER_DIR
            );
        }
        let member = file / per_member;
        let inner = (file % per_member) * FILE_SIZE;
        let digest = sha256_hex(format!("{file:08x}").as_bytes());
        let _ = write!(
            json,
            r#",{{"name":"d{:04}/f{:06}","type":"reg","size":{FILE_SIZE},"modtime":"2023-11-14T22:13:20Z","mode":420,"offset":{},"innerOffset":{inner},"digest":"sha256:{digest}"}}"#,
            file / FILES_PER_DIR,
            file,
            member_offsets[member],
        );
    }
    json.push_str("]}");
    let toc_json = json.into_bytes();

    let toc_offset = blob.len() as u64;
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.set_size(toc_json.len() as u64);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut header, "stargz.index.json", toc_json.as_slice())
        .expect("append the TOC to a tar in memory");
    blob.extend(gzip(&tar.into_inner().expect("finish the TOC tar")));
    blob.extend(footer(toc_offset));
    SyntheticLayer {
        blob,
        toc_json,
        toc_offset,
    }
}

/// The 51-byte eStargz footer: an empty gzip member whose extra field holds subfield
/// `SG` with the `%016x` TOC offset and `STARGZ`.
fn footer(toc_offset: u64) -> Vec<u8> {
    let mut bytes = vec![0x1f, 0x8b, 8, 0x04, 0, 0, 0, 0, 0, 0xff];
    bytes.extend_from_slice(&26u16.to_le_bytes());
    bytes.extend_from_slice(b"SG");
    bytes.extend_from_slice(&22u16.to_le_bytes());
    bytes.extend_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    bytes.extend_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff]);
    bytes.extend_from_slice(&[0; 8]);
    bytes
}

fn write_blob(dir: &Path, bytes: &[u8]) -> String {
    let hex = sha256_hex(bytes);
    std::fs::write(dir.join("blobs/sha256").join(&hex), bytes).expect("write blob");
    format!("sha256:{hex}")
}

/// Writes an OCI image layout (tag `latest`, linux/amd64) holding `layer` as its only layer.
pub fn write_oci_layout(dir: &Path, layer: &SyntheticLayer) {
    std::fs::create_dir_all(dir.join("blobs/sha256")).expect("create blobs dir");
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
        .expect("write oci-layout");

    let layer_digest = write_blob(dir, &layer.blob);
    let toc_digest = format!("sha256:{}", sha256_hex(&layer.toc_json));
    // The diff_id is not checked when the layer is read lazily.
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", "0".repeat(64))]},
    })
    .to_string();
    let config_digest = write_blob(dir, config.as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": layer_digest,
            "size": layer.blob.len(),
            "annotations": {"containerd.io/snapshot/stargz/toc.digest": toc_digest},
        }],
    })
    .to_string();
    let manifest_digest = write_blob(dir, manifest.as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"org.opencontainers.image.ref.name": "latest"},
        }],
    })
    .to_string();
    std::fs::write(dir.join("index.json"), index).expect("write index.json");
}
