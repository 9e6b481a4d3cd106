//! Copies of OCI image layouts and targeted edits of their eStargz layers
//! (TOC, footer, raw blob bytes, annotations) for negative tests. Every edit
//! rewrites the blob, manifest and `index.json` digests, so the only defect
//! left in the layout is the one a test put there.
//!
//! The eStargz facts used here: a blob ends with a 51-byte footer, an empty
//! gzip member whose extra field contains subfield `SG` with 22 bytes, the
//! `%016x` TOC offset and `STARGZ`. The TOC is a gzip member at that offset
//! holding a tar with one entry, `stargz.index.json`, and the layer
//! descriptor's `containerd.io/snapshot/stargz/toc.digest` annotation is the
//! sha256 of that JSON.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::fixture_dir;

/// Layer annotation with the sha256 of the TOC JSON.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Layer annotation with the decimal size of the decompressed blob.
pub const UNCOMPRESSED_SIZE_ANNOTATION: &str = "io.containers.estargz.uncompressed-size";
/// Size of the eStargz footer in bytes.
pub const FOOTER_SIZE: usize = 51;
/// Name of the TOC entry in the TOC tar.
pub const TOC_TAR_NAME: &str = "stargz.index.json";
/// Tag of the fixture manifests in their `index.json`.
const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// Copies the OCI image layout `src` into a new temp folder, which becomes
/// the root of the copy (`oci-layout`, `index.json`, `blobs/`).
pub fn copy_layout(src: &Path) -> tempfile::TempDir {
    assert!(
        src.join("index.json").is_file(),
        "{} is not an OCI image layout (no index.json)",
        src.display()
    );
    let copy = tempfile::Builder::new()
        .prefix("esgz-layout-")
        .tempdir()
        .expect("creating a temp folder for the layout copy");
    copy_dir(src, copy.path());
    copy
}

fn copy_dir(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap_or_else(|error| panic!("creating {}: {error}", dst.display()));
    let entries =
        fs::read_dir(src).unwrap_or_else(|error| panic!("listing {}: {error}", src.display()));
    for entry in entries {
        let entry = entry.unwrap_or_else(|error| panic!("listing {}: {error}", src.display()));
        let from = entry.path();
        let to = dst.join(entry.file_name());
        if from.is_dir() {
            copy_dir(&from, &to);
        } else {
            fs::copy(&from, &to).unwrap_or_else(|error| {
                panic!("copying {} to {}: {error}", from.display(), to.display())
            });
        }
    }
}

/// Returns `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Returns the path of the blob with `digest` (`sha256:<hex>`) in `layout`.
pub fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    let hex = digest
        .strip_prefix("sha256:")
        .unwrap_or_else(|| panic!("digest {digest:?} is not sha256:<hex>"));
    layout.join("blobs/sha256").join(hex)
}

/// Writes `bytes` as a blob of `layout` and returns its digest.
pub fn write_blob(layout: &Path, bytes: &[u8]) -> String {
    let digest = sha256_digest(bytes);
    let path = blob_path(layout, &digest);
    fs::write(&path, bytes).unwrap_or_else(|error| panic!("writing {}: {error}", path.display()));
    digest
}

fn read_json(path: &Path) -> Value {
    let bytes =
        fs::read(path).unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|error| panic!("{} is not JSON: {error}", path.display()))
}

/// Returns the position in `index.json` of the manifest tagged `latest`, or
/// of the only manifest when none is tagged.
fn manifest_position(index: &Value) -> usize {
    let manifests = index["manifests"]
        .as_array()
        .expect("index.json has a manifests array");
    let tagged = manifests
        .iter()
        .position(|entry| entry["annotations"][REF_NAME_ANNOTATION] == "latest");
    match tagged {
        Some(position) => position,
        None if manifests.len() == 1 => 0,
        None => panic!(
            "index.json has {} manifests and none is tagged latest",
            manifests.len()
        ),
    }
}

/// Returns the image manifest of `layout` (tagged `latest`). Panics when
/// the tag names an image index: the edits here handle one manifest.
pub fn read_manifest(layout: &Path) -> Value {
    let index = read_json(&layout.join("index.json"));
    let entry = &index["manifests"][manifest_position(&index)];
    let digest = entry["digest"].as_str().expect("manifest digest");
    let manifest = read_json(&blob_path(layout, digest));
    assert!(
        manifest["layers"].is_array(),
        "{digest} in {} is not an image manifest (an image index?)",
        layout.display()
    );
    manifest
}

/// Rewrites the image manifest with `edit` and points `index.json` at the
/// new manifest blob (digest and size).
pub fn edit_manifest(layout: &Path, edit: impl FnOnce(&mut Value)) {
    let index_path = layout.join("index.json");
    let mut index = read_json(&index_path);
    let position = manifest_position(&index);
    let mut manifest = read_manifest(layout);
    edit(&mut manifest);

    let bytes = serde_json::to_vec(&manifest).expect("encoding the manifest");
    let digest = write_blob(layout, &bytes);
    index["manifests"][position]["digest"] = digest.into();
    index["manifests"][position]["size"] = bytes.len().into();
    fs::write(
        &index_path,
        serde_json::to_vec(&index).expect("encoding index.json"),
    )
    .unwrap_or_else(|error| panic!("writing {}: {error}", index_path.display()));
}

/// Returns the descriptor of layer `layer` (0 = lowest) of the manifest.
pub fn layer_descriptor(layout: &Path, layer: usize) -> Value {
    let manifest = read_manifest(layout);
    let descriptor = &manifest["layers"][layer];
    assert!(
        descriptor.is_object(),
        "the manifest of {} has no layer {layer}",
        layout.display()
    );
    descriptor.clone()
}

/// Returns the digest of layer `layer`.
pub fn layer_digest(layout: &Path, layer: usize) -> String {
    layer_descriptor(layout, layer)["digest"]
        .as_str()
        .expect("layer digest")
        .to_string()
}

/// Returns the blob bytes of layer `layer`.
pub fn read_layer_blob(layout: &Path, layer: usize) -> Vec<u8> {
    let path = blob_path(layout, &layer_digest(layout, layer));
    fs::read(&path).unwrap_or_else(|error| panic!("reading {}: {error}", path.display()))
}

/// Builds the 51-byte eStargz footer naming `toc_offset`: a gzip header
/// with FLG.FEXTRA, XLEN 26, subfield `SG` of 22 bytes, an empty final
/// stored deflate block, and a zero CRC32 and ISIZE.
pub fn footer(toc_offset: u64) -> Vec<u8> {
    let mut bytes = vec![0x1f, 0x8b, 8, 0x04, 0, 0, 0, 0, 0, 0xff];
    bytes.extend_from_slice(&26u16.to_le_bytes());
    bytes.extend_from_slice(b"SG");
    bytes.extend_from_slice(&22u16.to_le_bytes());
    bytes.extend_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    bytes.extend_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff]);
    bytes.extend_from_slice(&[0; 8]);
    assert_eq!(bytes.len(), FOOTER_SIZE);
    bytes
}

/// Reads the TOC offset from the footer of `blob`. Panics unless the blob
/// ends with a 51-byte eStargz footer.
pub fn footer_toc_offset(blob: &[u8]) -> u64 {
    assert!(
        blob.len() >= FOOTER_SIZE,
        "blob of {} bytes has no footer",
        blob.len()
    );
    let tail = &blob[blob.len() - FOOTER_SIZE..];
    assert_eq!(&tail[..4], &[0x1f, 0x8b, 8, 0x04], "footer gzip header");
    assert_eq!(&tail[12..14], b"SG", "footer extra subfield id");
    assert_eq!(&tail[32..38], b"STARGZ", "footer payload magic");
    let digits = std::str::from_utf8(&tail[16..32]).expect("footer offset is ASCII");
    u64::from_str_radix(digits, 16).expect("footer offset is hexadecimal")
}

/// Builds a TOC gzip member: a tar with the one entry `stargz.index.json`
/// holding `toc_json`, followed by the end-of-archive blocks.
pub fn toc_member(toc_json: &[u8]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(toc_json.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(&mut header, TOC_TAR_NAME, toc_json)
        .expect("writing the TOC tar entry");
    let tar = tar.into_inner().expect("finishing the TOC tar");
    gzip(&tar)
}

/// Compresses `bytes` as one gzip member.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).expect("compressing into memory");
    encoder.finish().expect("finishing the gzip member")
}

/// Returns the TOC JSON of layer `layer` and the TOC offset from its footer.
pub fn read_toc(layout: &Path, layer: usize) -> (Value, u64) {
    let blob = read_layer_blob(layout, layer);
    let toc_offset = footer_toc_offset(&blob);
    let member = &blob[toc_offset as usize..blob.len() - FOOTER_SIZE];
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(member));
    let mut entries = archive.entries().expect("reading the TOC tar");
    let mut entry = entries
        .next()
        .expect("the TOC tar has an entry")
        .expect("reading the TOC tar entry");
    let name = entry.path().expect("TOC tar entry name").into_owned();
    assert_eq!(name, Path::new(TOC_TAR_NAME), "TOC tar entry name");
    let mut json = Vec::new();
    entry
        .read_to_end(&mut json)
        .expect("reading stargz.index.json");
    let toc = serde_json::from_slice(&json).expect("stargz.index.json is JSON");
    (toc, toc_offset)
}

/// Returns the regular or chunk entries of `toc` named `name` (as the TOC
/// spells it), in TOC order.
pub fn toc_entries<'a>(toc: &'a Value, name: &str) -> Vec<&'a Value> {
    toc["entries"]
        .as_array()
        .expect("TOC entries")
        .iter()
        .filter(|entry| entry["name"] == name)
        .collect()
}

/// Returns the compressed range `start..end` of the gzip member that contains
/// the first chunk of `name`: it ends at the next larger distinct `offset`
/// in the TOC, or at the TOC offset.
pub fn member_range(toc: &Value, toc_offset: u64, name: &str) -> (u64, u64) {
    let entries = toc_entries(toc, name);
    let first = entries
        .iter()
        .find(|entry| entry["type"] == "reg")
        .unwrap_or_else(|| panic!("the TOC has no regular file {name:?}"));
    let start = first["offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("TOC entry {name:?} has no offset"));
    let end = toc["entries"]
        .as_array()
        .expect("TOC entries")
        .iter()
        .filter_map(|entry| entry["offset"].as_u64())
        .filter(|&offset| offset > start)
        .min()
        .unwrap_or(toc_offset);
    (start, end)
}

/// Replaces the blob of layer `layer` with `blob`: writes it, then points
/// the manifest's layer descriptor (digest and size) and `index.json` at it.
/// Annotations and the config's diff_ids stay as they were. Returns the new
/// layer digest.
pub fn replace_layer_blob(layout: &Path, layer: usize, blob: &[u8]) -> String {
    let digest = write_blob(layout, blob);
    let size = blob.len();
    let new_digest = digest.clone();
    edit_manifest(layout, |manifest| {
        let descriptor = &mut manifest["layers"][layer];
        descriptor["digest"] = new_digest.into();
        descriptor["size"] = size.into();
    });
    digest
}

/// Applies `edit` to the bytes of layer `layer`'s blob and fixes the blob,
/// manifest and `index.json` digests, so only the edit remains as damage.
/// Returns the new layer digest.
pub fn patch_layer_blob(layout: &Path, layer: usize, edit: impl FnOnce(&mut Vec<u8>)) -> String {
    let mut blob = read_layer_blob(layout, layer);
    edit(&mut blob);
    replace_layer_blob(layout, layer, &blob)
}

/// Replaces the TOC member of layer `layer` with `member` (any bytes),
/// keeping the data before it and writing a footer that points at it. The
/// toc.digest annotation stays unchanged. Returns the new layer digest.
pub fn replace_toc_member(layout: &Path, layer: usize, member: &[u8]) -> String {
    patch_layer_blob(layout, layer, |blob| {
        let toc_offset = footer_toc_offset(blob);
        blob.truncate(toc_offset as usize);
        blob.extend_from_slice(member);
        blob.extend_from_slice(&footer(toc_offset));
    })
}

/// Rewrites the footer of layer `layer` so that it names `toc_offset`.
/// Returns the new layer digest.
pub fn set_footer_toc_offset(layout: &Path, layer: usize, toc_offset: u64) -> String {
    patch_layer_blob(layout, layer, |blob| {
        let start = blob.len() - FOOTER_SIZE;
        blob.truncate(start);
        blob.extend_from_slice(&footer(toc_offset));
    })
}

/// Sets the toc.digest annotation of layer `layer` to `value`.
pub fn set_toc_digest_annotation(layout: &Path, layer: usize, value: &str) {
    edit_manifest(layout, |manifest| {
        manifest["layers"][layer]["annotations"][TOC_DIGEST_ANNOTATION] = value.into();
    });
}

/// Rewrites the TOC JSON of layer `layer` with `edit` and keeps the layout
/// consistent: the TOC member and footer are rebuilt, and the blob digest
/// and size, the toc.digest and uncompressed-size annotations, the config's
/// diff_id, the manifest and `index.json` are recomputed. Returns the new
/// layer digest.
pub fn rewrite_toc(layout: &Path, layer: usize, mut edit: impl FnMut(&mut Value)) -> String {
    let (mut toc, toc_offset) = read_toc(layout, layer);
    edit(&mut toc);
    let toc_json = serde_json::to_vec(&toc).expect("encoding the TOC");
    let toc_digest = sha256_digest(&toc_json);

    let mut blob = read_layer_blob(layout, layer);
    blob.truncate(toc_offset as usize);
    blob.extend_from_slice(&toc_member(&toc_json));
    blob.extend_from_slice(&footer(toc_offset));
    let blob_digest = write_blob(layout, &blob);

    // The diff_id is the digest of the whole decompressed stream, which now
    // ends with the new TOC tar.
    let mut tar = Vec::new();
    flate2::read::MultiGzDecoder::new(blob.as_slice())
        .read_to_end(&mut tar)
        .expect("the rewritten blob decompresses");
    let diff_id = sha256_digest(&tar);

    let manifest = read_manifest(layout);
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .expect("config digest")
        .to_string();
    let mut config = read_json(&blob_path(layout, &config_digest));
    config["rootfs"]["diff_ids"][layer] = diff_id.into();
    let config_bytes = serde_json::to_vec(&config).expect("encoding the config");
    let new_config_digest = write_blob(layout, &config_bytes);

    let new_blob_digest = blob_digest.clone();
    edit_manifest(layout, |manifest| {
        manifest["config"]["digest"] = new_config_digest.into();
        manifest["config"]["size"] = config_bytes.len().into();
        let descriptor = &mut manifest["layers"][layer];
        descriptor["digest"] = new_blob_digest.into();
        descriptor["size"] = blob.len().into();
        descriptor["annotations"][TOC_DIGEST_ANNOTATION] = toc_digest.into();
        descriptor["annotations"][UNCOMPRESSED_SIZE_ANNOTATION] = tar.len().to_string().into();
    });
    blob_digest
}

/// Returns the path of a blob's bytes in a distribution registry's
/// filesystem storage rooted at `root`
/// (`docker/registry/v2/blobs/sha256/<2 hex>/<hex>/data`).
pub fn registry_blob_data(root: &Path, digest: &str) -> PathBuf {
    let hex = digest
        .strip_prefix("sha256:")
        .unwrap_or_else(|| panic!("digest {digest:?} is not sha256:<hex>"));
    root.join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data")
}

/// Builds a layout whose `latest` is an image index: linux/amd64 is the
/// basic fixture, linux/arm64 is the links fixture with its config's
/// architecture set to arm64.
pub fn two_platform_layout() -> tempfile::TempDir {
    let basic = fixture_dir("basic").join("oci");
    let links = fixture_dir("links").join("oci");
    let layout = copy_layout(&basic);
    for entry in fs::read_dir(links.join("blobs/sha256")).expect("listing links blobs") {
        let entry = entry.expect("listing links blobs");
        fs::copy(
            entry.path(),
            layout.path().join("blobs/sha256").join(entry.file_name()),
        )
        .expect("copying a links blob");
    }

    let index_of = |dir: &Path| -> Value {
        serde_json::from_slice(&fs::read(dir.join("index.json")).expect("reading index.json"))
            .expect("index.json is JSON")
    };
    let amd64 = index_of(&basic)["manifests"][0].clone();

    let mut links_manifest = read_manifest(&links);
    let config_digest = links_manifest["config"]["digest"]
        .as_str()
        .expect("config digest")
        .to_string();
    let mut config: Value = serde_json::from_slice(
        &fs::read(blob_path(&links, &config_digest)).expect("reading the links config"),
    )
    .expect("config is JSON");
    config["architecture"] = "arm64".into();
    let config_bytes = serde_json::to_vec(&config).expect("encoding the config");
    links_manifest["config"]["digest"] = write_blob(layout.path(), &config_bytes).into();
    links_manifest["config"]["size"] = config_bytes.len().into();
    let manifest_bytes = serde_json::to_vec(&links_manifest).expect("encoding the manifest");
    let arm64_digest = write_blob(layout.path(), &manifest_bytes);

    let image_index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": amd64["digest"],
                "size": amd64["size"],
                "platform": {"os": "linux", "architecture": "amd64"},
            },
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": arm64_digest,
                "size": manifest_bytes.len(),
                "platform": {"os": "linux", "architecture": "arm64"},
            },
        ],
    });
    let index_bytes = serde_json::to_vec(&image_index).expect("encoding the image index");
    let index_digest = write_blob(layout.path(), &index_bytes);
    let top = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": index_digest,
            "size": index_bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": "latest"},
        }],
    });
    fs::write(
        layout.path().join("index.json"),
        serde_json::to_vec(&top).expect("encoding index.json"),
    )
    .expect("writing index.json");
    layout
}
