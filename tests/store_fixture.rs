//! Chunk store reads of real eStargz blobs written by the reference implementation
//! (stargz-snapshotter estargz v0.12.0), checked against the TOC chunk digests and the
//! input tar's file digests.

mod store_support;
#[path = "support/mod.rs"]
mod support;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use esgz_nbd::layer::{ChunkRecord, ChunkSource, LayerIndex};
use esgz_nbd::store::{ChunkStore, IoBackendChoice, StoreLayer, StoreOptions};
use serde_json::Value;
use store_support::{sha256, FileRegistryDouble};

/// A regular file's place in the layer's data space.
struct FileSpan {
    name: String,
    data_offset: u64,
    size: u64,
    digest: String,
}

struct Fixture {
    blob_path: PathBuf,
    index: LayerIndex,
    files: Vec<FileSpan>,
    /// sha256 of each regular file by tar name, from the sidecar (the input tar).
    truth: HashMap<String, String>,
}

fn parse_digest(text: &str) -> [u8; 32] {
    let hex = text.strip_prefix("sha256:").expect("sha256 digest");
    hex::decode(hex)
        .expect("hex digest")
        .try_into()
        .expect("32-byte digest")
}

/// Reads the TOC offset from the 51-byte eStargz footer: `%016x` before `STARGZ`.
fn toc_offset(blob: &Path) -> u64 {
    let bytes = std::fs::read(blob).expect("read blob");
    let footer = &bytes[bytes.len() - 51..];
    let magic = footer
        .windows(6)
        .position(|window| window == b"STARGZ")
        .expect("STARGZ in footer");
    let hex = std::str::from_utf8(&footer[magic - 16..magic]).expect("ascii offset");
    u64::from_str_radix(hex, 16).expect("hex offset")
}

/// Builds the chunk table from the TOC JSON with just the fields the store needs: the
/// data space is the regular files' contents in TOC order, landmarks excluded.
fn load_fixture(name: &str) -> Fixture {
    let dir = support::shared_dir().join("fixtures").join(name);
    let expected: Value =
        serde_json::from_slice(&std::fs::read(dir.join("expected.json")).expect("sidecar"))
            .expect("json");
    let layer = &expected["layers"][0];
    let blob_digest = layer["blob_digest"]
        .as_str()
        .expect("blob_digest")
        .to_string();
    let blob_path = dir
        .join("oci/blobs/sha256")
        .join(blob_digest.trim_start_matches("sha256:"));
    let toc: Value = serde_json::from_slice(
        &std::fs::read(dir.join(layer["toc"].as_str().expect("toc"))).expect("toc"),
    )
    .expect("toc json");
    let entries = toc["entries"].as_array().expect("entries");

    let toc_start = toc_offset(&blob_path);
    let mut offsets: BTreeSet<u64> = entries
        .iter()
        .filter_map(|entry| entry["offset"].as_u64())
        .collect();
    offsets.insert(toc_start);
    let member_end = |offset: u64| {
        *offsets
            .range(offset + 1..)
            .next()
            .expect("a later offset or the TOC")
    };

    let mut chunks = Vec::new();
    let mut files = Vec::new();
    let mut data_offset = 0u64;
    let mut file_start = 0u64;
    let mut file_size = 0u64;
    for entry in entries {
        let kind = entry["type"].as_str().expect("type");
        let entry_name = entry["name"].as_str().expect("name");
        if kind == "reg" {
            if entry_name.ends_with("prefetch.landmark") {
                continue;
            }
            file_size = entry["size"].as_u64().unwrap_or(0);
            file_start = data_offset;
            files.push(FileSpan {
                name: entry_name.into(),
                data_offset,
                size: file_size,
                digest: entry["digest"].as_str().expect("file digest").to_string(),
            });
            if file_size == 0 {
                continue;
            }
        } else if kind != "chunk" {
            continue;
        }

        let chunk_offset = entry["chunkOffset"].as_u64().unwrap_or(0);
        let size = entry["chunkSize"]
            .as_u64()
            .unwrap_or(file_size - chunk_offset);
        let compressed_offset = entry["offset"].as_u64().expect("chunk offset");
        assert_eq!(
            file_start + chunk_offset,
            data_offset,
            "chunks of {entry_name} are contiguous"
        );
        let source = ChunkSource::Member {
            compressed_offset,
            compressed_end: member_end(compressed_offset),
            inner_offset: entry["innerOffset"].as_u64().unwrap_or(0),
        };
        let digest = entry["chunkDigest"].as_str().map(parse_digest);
        let record = ChunkRecord::new(data_offset, size, source, digest, entry_name.into())
            .expect("chunk record");
        chunks.push(record);
        data_offset += size;
    }

    let truth = layer["entries"]
        .as_array()
        .expect("sidecar entries")
        .iter()
        .filter(|entry| entry["type"] == "reg")
        .map(|entry| {
            let name = entry["tar_name"].as_str().expect("tar_name").to_string();
            (name, entry["sha256"].as_str().expect("sha256").to_string())
        })
        .collect();

    let index = LayerIndex {
        digest: blob_digest,
        chunks,
        data_size: data_offset,
        ..LayerIndex::default()
    };
    Fixture {
        blob_path,
        index,
        files,
        truth,
    }
}

fn open(
    fixture: &Fixture,
    registry: &Arc<FileRegistryDouble>,
    dir: &Path,
    io: IoBackendChoice,
) -> ChunkStore {
    let layer = StoreLayer {
        index: Arc::new(fixture.index.clone()),
        blob: Some(registry.clone()),
    };
    ChunkStore::open(
        vec![layer],
        StoreOptions {
            io,
            ..StoreOptions::new(dir)
        },
    )
    .expect("open store")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_fixture_every_chunk_verifies() {
    let fixture = load_fixture("basic");
    // 22 non-empty regular files (landmark excluded) and 21 further chunk entries.
    assert_eq!(
        fixture.index.chunks.len(),
        43,
        "chunk count of the basic fixture"
    );

    for backend in [IoBackendChoice::Std, IoBackendChoice::Uring] {
        let registry = FileRegistryDouble::open(&fixture.blob_path);
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&fixture, &registry, dir.path(), backend);

        // One chunk at a time, in reverse, so no read finds its chunk cached by a neighbour.
        for chunk in fixture.index.chunks.iter().rev() {
            let bytes = store
                .read(0, chunk.data_offset, chunk.size)
                .await
                .expect("read chunk");
            assert_eq!(
                Some(sha256(&bytes)),
                chunk.digest(),
                "backend {backend:?} chunk of {}",
                chunk.name
            );
        }
        let stats = store.stats();
        assert_eq!(stats.verify_failures, 0);
        assert_eq!(stats.chunks_fetched, fixture.index.chunks.len() as u64);
        assert_eq!(
            stats.range_requests,
            registry.requests.load(Ordering::SeqCst)
        );
    }
}

#[tokio::test]
async fn basic_fixture_files_match_input_tar() {
    let fixture = load_fixture("basic");
    let registry = FileRegistryDouble::open(&fixture.blob_path);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&fixture, &registry, dir.path(), IoBackendChoice::Auto);

    let mut checked = 0;
    for file in &fixture.files {
        let bytes = store
            .read(0, file.data_offset, file.size)
            .await
            .expect("read file");
        let actual = format!("sha256:{}", hex::encode(sha256(&bytes)));
        assert_eq!(actual, file.digest, "TOC digest of {}", file.name);
        if let Some(truth) = fixture.truth.get(&file.name) {
            assert_eq!(&actual, truth, "input tar digest of {}", file.name);
            checked += 1;
        }
    }
    assert_eq!(
        checked,
        fixture.files.len(),
        "every TOC file is in the input tar"
    );
}

#[tokio::test]
async fn basic_fixture_whole_read_coalesces() {
    let fixture = load_fixture("basic");
    let registry = FileRegistryDouble::open(&fixture.blob_path);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&fixture, &registry, dir.path(), IoBackendChoice::Auto);

    store
        .read(0, 0, fixture.index.data_size)
        .await
        .expect("read all");
    // 1.3 MB of members with no gaps between them fit in one 16 MiB request.
    assert_eq!(registry.requests.load(Ordering::SeqCst), 1);
}
