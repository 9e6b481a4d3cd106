//! Reads the reference eStargz fixtures (written by the Go estargz library)
//! and the Debian image end to end: footer, TOC, every chunk, the merged
//! tree, and the same trees from the plain input tars.
//!
//! The fixtures are found through `ESGZ_SHARED`, else `../shared` next to
//! the crate, else `/work/shared`.

#[path = "support/mod.rs"]
mod support;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Read;
use std::path::Path;

use base64::Engine as _;
use esgz_nbd::estargz::{
    build_index, extract_toc_json, parse_footer, TocLimits, DEFAULT_MAX_TOC_SIZE, FOOTER_SIZE,
};
use esgz_nbd::layer::{ChunkSource, LayerIndex, Prefetch};
use esgz_nbd::tarlayer::index_tar;
use esgz_nbd::tree::{merge, NodeId, NodeKind, Tree, ROOT};
use serde_json::Value;
use sha2::{Digest, Sha256};

const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";

fn read_json(path: &Path) -> Value {
    let bytes =
        fs::read(path).unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|error| panic!("parsing {}: {error}", path.display()))
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// One layer descriptor of the image manifest.
struct LayerBlob {
    digest: String,
    toc_digest: String,
    blob: Vec<u8>,
}

fn image_layers(fixture: &Path) -> Vec<LayerBlob> {
    let oci = fixture.join("oci");
    let blob_path = |digest: &str| {
        oci.join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let index = read_json(&oci.join("index.json"));
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .expect("manifest digest");
    let manifest = read_json(&blob_path(manifest_digest));
    manifest["layers"]
        .as_array()
        .expect("manifest layers")
        .iter()
        .map(|layer| {
            let digest = layer["digest"].as_str().expect("layer digest").to_string();
            let toc_digest = layer["annotations"][TOC_DIGEST_ANNOTATION]
                .as_str()
                .expect("toc digest annotation")
                .to_string();
            let blob = fs::read(blob_path(&digest)).expect("layer blob");
            LayerBlob {
                digest,
                toc_digest,
                blob,
            }
        })
        .collect()
}

/// Reads one eStargz layer lazily as the product does, verifies every chunk
/// and returns the index and the layer's data space.
fn read_estargz_layer(
    number: u32,
    layer: &LayerBlob,
    expected_layer: &Value,
    dir: &Path,
) -> (LayerIndex, Vec<u8>) {
    let blob = &layer.blob;
    let blob_size = blob.len() as u64;
    let tail_len = blob_size.min(FOOTER_SIZE) as usize;
    let footer = parse_footer(&blob[blob.len() - tail_len..], blob_size).expect("footer");
    assert_eq!(footer.footer_size, FOOTER_SIZE, "layer {number}");

    let toc_end = (blob_size - footer.footer_size) as usize;
    let toc_bytes = &blob[footer.toc_offset as usize..toc_end];
    let toc_json = extract_toc_json(toc_bytes, DEFAULT_MAX_TOC_SIZE).expect("TOC");
    assert_eq!(
        sha256_hex(&toc_json),
        layer.toc_digest,
        "layer {number} TOC digest"
    );
    let toc_file = expected_layer["toc"].as_str().expect("toc file name");
    assert_eq!(
        toc_json,
        fs::read(dir.join(toc_file)).expect("raw TOC file"),
        "layer {number} TOC bytes"
    );

    let index = build_index(
        number,
        &layer.digest,
        &toc_json,
        footer.toc_offset,
        &TocLimits::default(),
    )
    .expect("layer index");
    let prioritized = expected_layer["build"]["prioritized_files"]
        .as_array()
        .map(|files| !files.is_empty())
        .unwrap_or(false);
    if prioritized {
        assert!(
            matches!(index.prefetch, Prefetch::Before { .. }),
            "layer {number}: {:?}",
            index.prefetch
        );
    } else {
        assert_eq!(index.prefetch, Prefetch::Nothing, "layer {number}");
    }

    let mut data = Vec::with_capacity(index.data_size as usize);
    for chunk in &index.chunks {
        assert_eq!(
            chunk.data_offset,
            data.len() as u64,
            "chunk table has a gap at {}",
            chunk.name
        );
        let ChunkSource::Member {
            compressed_offset,
            compressed_end,
            inner_offset,
        } = chunk.source()
        else {
            panic!("eStargz chunk {} is not a member", chunk.name);
        };
        assert!(compressed_offset < compressed_end);
        assert!(compressed_end <= footer.toc_offset);
        let member = &blob[compressed_offset as usize..compressed_end as usize];
        let mut decoder = flate2::read::GzDecoder::new(member);
        std::io::copy(&mut (&mut decoder).take(inner_offset), &mut std::io::sink())
            .expect("skip inner offset");
        let mut bytes = Vec::with_capacity(chunk.size as usize);
        decoder
            .take(chunk.size)
            .read_to_end(&mut bytes)
            .expect("decompress chunk");
        assert_eq!(
            bytes.len() as u64,
            chunk.size,
            "chunk of {} at {}",
            chunk.name,
            chunk.data_offset
        );
        let digest = chunk
            .digest()
            .unwrap_or_else(|| panic!("chunk of {} has no digest", chunk.name));
        assert_eq!(
            <[u8; 32]>::from(Sha256::digest(&bytes)),
            digest,
            "chunk of {} at {}",
            chunk.name,
            chunk.data_offset
        );
        data.extend_from_slice(&bytes);
    }
    assert_eq!(data.len() as u64, index.data_size);
    (index, data)
}

/// Reads a plain input tar with `index_tar`, collecting the streamed bytes.
fn read_tar_layer(number: u32, reader: impl Read) -> (LayerIndex, Vec<u8>) {
    let mut data = Vec::new();
    let mut sink = |offset: u64, bytes: &[u8]| {
        assert_eq!(offset, data.len() as u64, "sink writes out of order");
        data.extend_from_slice(bytes);
        Ok(())
    };
    let index = index_tar(number, "sha256:input", reader, &mut sink).expect("index input tar");
    assert_eq!(data.len() as u64, index.data_size);
    let mut next = 0;
    for chunk in &index.chunks {
        assert_eq!(chunk.data_offset, next);
        assert_eq!(chunk.source(), ChunkSource::Local);
        let range = chunk.data_offset as usize..(chunk.data_offset + chunk.size) as usize;
        assert_eq!(chunk.digest(), Some(Sha256::digest(&data[range]).into()));
        next += chunk.size;
    }
    (index, data)
}

/// Lists every path of the tree with its node id.
fn tree_paths(tree: &Tree) -> BTreeMap<String, NodeId> {
    let mut paths = BTreeMap::new();
    let mut stack = vec![(String::from("/"), ROOT)];
    while let Some((path, id)) = stack.pop() {
        if let NodeKind::Dir { children } = &tree.node(id).kind {
            for (name, child) in children {
                let name = String::from_utf8(name.to_vec()).expect("fixture names are UTF-8");
                let child_path = if path == "/" {
                    format!("/{name}")
                } else {
                    format!("{path}/{name}")
                };
                stack.push((child_path, child));
            }
        }
        paths.insert(path, id);
    }
    paths
}

/// Compares the merged tree with `merged_tree` of the sidecar; `data` contains
/// each layer's data space for content checks.
fn compare_tree(label: &str, tree: &Tree, data: &[Vec<u8>], expected: &Value) {
    let paths = tree_paths(tree);
    let expected_entries = expected["merged_tree"].as_array().expect("merged_tree");
    let expected_paths: Vec<&str> = expected_entries
        .iter()
        .map(|entry| entry["path"].as_str().unwrap())
        .collect();
    let actual_paths: Vec<&str> = paths.keys().map(String::as_str).collect();
    let mut sorted_expected = expected_paths.clone();
    sorted_expected.sort_unstable();
    assert_eq!(actual_paths, sorted_expected, "{label}: path sets differ");

    let mut group_of_node: HashMap<NodeId, String> = HashMap::new();
    let mut node_of_group: HashMap<String, NodeId> = HashMap::new();
    for entry in expected_entries {
        let path = entry["path"].as_str().unwrap();
        let id = paths[path];
        let node = tree.node(id);
        let kind = entry["type"].as_str().unwrap();
        let context = format!("{label}: {path}");

        match (&node.kind, kind) {
            (NodeKind::Dir { .. }, "dir") | (NodeKind::Fifo, "fifo") => {}
            (NodeKind::Reg { data: file }, "reg") => {
                assert_eq!(file.size, entry["size"].as_u64().unwrap(), "{context} size");
                let layer_data = &data[file.layer as usize];
                let start = file.data_offset as usize;
                let content = &layer_data[start..start + file.size as usize];
                assert_eq!(
                    sha256_hex(content),
                    entry["sha256"].as_str().unwrap(),
                    "{context} content"
                );

                let group = entry["hardlink_target"]
                    .as_str()
                    .unwrap_or(path)
                    .to_string();
                let previous_group = group_of_node.insert(id, group.clone());
                assert!(
                    previous_group.is_none() || previous_group.as_ref() == Some(&group),
                    "{context}: node shared across hard link groups"
                );
                let previous_node = node_of_group.insert(group, id);
                assert!(
                    previous_node.is_none() || previous_node == Some(id),
                    "{context}: hard link group split over nodes"
                );
            }
            (NodeKind::Symlink { target }, "symlink") => {
                assert_eq!(
                    target.as_slice(),
                    entry["link_target"].as_str().unwrap().as_bytes(),
                    "{context} target"
                );
            }
            (NodeKind::CharDev { major, minor }, "char")
            | (NodeKind::BlockDev { major, minor }, "block") => {
                assert_eq!(
                    u64::from(*major),
                    entry["devmajor"].as_u64().unwrap(),
                    "{context} major"
                );
                assert_eq!(
                    u64::from(*minor),
                    entry["devminor"].as_u64().unwrap(),
                    "{context} minor"
                );
            }
            (actual, expected_kind) => {
                panic!("{context}: expected {expected_kind}, found {actual:?}")
            }
        }

        if entry["implicit"].as_bool() == Some(true) {
            continue;
        }
        assert_eq!(
            u64::from(node.meta.mode),
            entry["mode"].as_u64().unwrap(),
            "{context} mode"
        );
        assert_eq!(
            u64::from(node.meta.uid),
            entry["uid"].as_u64().unwrap(),
            "{context} uid"
        );
        assert_eq!(
            u64::from(node.meta.gid),
            entry["gid"].as_u64().unwrap(),
            "{context} gid"
        );
        assert_eq!(
            node.meta.mtime,
            entry["mtime"].as_i64().unwrap(),
            "{context} mtime"
        );
        let expected_xattrs: Vec<(Vec<u8>, Vec<u8>)> = entry["xattrs_b64"]
            .as_object()
            .map(|map| {
                map.iter()
                    .map(|(name, value)| {
                        let bytes = base64::engine::general_purpose::STANDARD
                            .decode(value.as_str().unwrap())
                            .unwrap();
                        (name.as_bytes().to_vec(), bytes)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut expected_xattrs = expected_xattrs;
        expected_xattrs.sort();
        assert_eq!(node.meta.xattrs, expected_xattrs, "{context} xattrs");
    }
}

fn check_image(dir: &Path, with_input_tars: bool) {
    let label = dir.file_name().unwrap().to_string_lossy().into_owned();
    let expected = read_json(&dir.join("expected.json"));
    let expected_layers = expected["layers"].as_array().expect("layers");
    let blobs = image_layers(dir);
    assert_eq!(blobs.len(), expected_layers.len(), "{label}: layer count");

    let mut entries = Vec::new();
    let mut data = Vec::new();
    for (number, (blob, expected_layer)) in blobs.iter().zip(expected_layers).enumerate() {
        let (index, layer_data) = read_estargz_layer(number as u32, blob, expected_layer, dir);
        entries.push(index.entries);
        data.push(layer_data);
    }
    let tree = merge(&entries).expect("merge eStargz layers");
    compare_tree(&format!("{label} (eStargz)"), &tree, &data, &expected);

    if !with_input_tars {
        return;
    }
    let mut entries = Vec::new();
    let mut data = Vec::new();
    for (number, expected_layer) in expected_layers.iter().enumerate() {
        let input = dir.join(
            expected_layer["input_tar"]
                .as_str()
                .expect("input tar name"),
        );
        let file =
            fs::File::open(&input).unwrap_or_else(|error| panic!("{}: {error}", input.display()));
        let (index, layer_data) = if expected_layer["input_tar_gzipped"].as_bool() == Some(true) {
            read_tar_layer(
                number as u32,
                flate2::read::GzDecoder::new(std::io::BufReader::new(file)),
            )
        } else {
            read_tar_layer(number as u32, file)
        };
        entries.push(index.entries);
        data.push(layer_data);
    }
    let tree = merge(&entries).expect("merge input tars");
    compare_tree(&format!("{label} (input tar)"), &tree, &data, &expected);
}

#[test]
fn fixture_basic() {
    check_image(&support::shared_dir().join("fixtures/basic"), true);
}

#[test]
fn fixture_links() {
    check_image(&support::shared_dir().join("fixtures/links"), true);
}

#[test]
fn fixture_xattrs() {
    check_image(&support::shared_dir().join("fixtures/xattrs"), true);
}

#[test]
fn fixture_large() {
    check_image(&support::shared_dir().join("fixtures/large"), true);
}

#[test]
fn fixture_multilayer() {
    check_image(&support::shared_dir().join("fixtures/multilayer"), true);
}

#[test]
fn image_debian_bookworm() {
    // The Debian input tar is not stored, so only the eStargz blob is read.
    check_image(
        &support::shared_dir().join("images/debian-bookworm-minbase"),
        false,
    );
}
