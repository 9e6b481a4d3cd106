//! The chunk cache across runs: reuse by a second store, a corrupted cache byte caught by
//! its crc32, eviction to a size limit, and read-ahead on sequential reads.

mod store_support;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use esgz_nbd::estargz::TocLimits;
use esgz_nbd::image::{open_image, OpenOptions};
use esgz_nbd::registry::RegistryOptions;
use esgz_nbd::source::Platform;
use esgz_nbd::store::{
    list_layers, prune, ChunkStore, IoBackendChoice, PruneOptions, StoreLayer, StoreOptions,
};
use store_support::{
    build_blob, content, layer_digest, CountingRegistryDouble, MemberSpec, TestBlob,
};

fn sample_blob(n: u8) -> TestBlob {
    build_blob(
        &layer_digest(n),
        &[
            MemberSpec {
                chunks: vec![content(u32::from(n), 5000)],
                level: 6,
            },
            MemberSpec {
                chunks: vec![content(100 + u32::from(n), 1), content(200, 3000)],
                level: 0,
            },
            MemberSpec {
                chunks: vec![content(300 + u32::from(n), 64 * 1024)],
                level: 1,
            },
        ],
    )
}

fn open_store(
    test_blob: &TestBlob,
    registry: &Arc<CountingRegistryDouble>,
    dir: &Path,
) -> ChunkStore {
    let layer = StoreLayer {
        index: Arc::new(test_blob.index.clone()),
        blob: Some(registry.clone()),
    };
    let options = StoreOptions {
        io: IoBackendChoice::Std,
        max_readahead: 0,
        ..StoreOptions::new(dir)
    };
    ChunkStore::open(vec![layer], options).expect("open store")
}

async fn read_all(store: &ChunkStore, test_blob: &TestBlob) {
    for chunk in &test_blob.index.chunks {
        let bytes = store
            .read(0, chunk.data_offset, chunk.size)
            .await
            .expect("read chunk");
        let want = &test_blob.data[chunk.data_offset as usize..][..chunk.size as usize];
        assert!(bytes.as_ref() == want, "chunk {} bytes", chunk.name);
    }
}

fn data_path(dir: &Path, n: u8) -> PathBuf {
    dir.join("layers")
        .join(format!("sha256-{}.data", hex::encode([n; 32])))
}

#[tokio::test]
async fn second_store_reuses_cache() {
    let dir = tempfile::tempdir().expect("tempdir");
    let test_blob = sample_blob(1);

    let first_registry = CountingRegistryDouble::new(test_blob.blob.clone());
    let first = open_store(&test_blob, &first_registry, dir.path());
    read_all(&first, &test_blob).await;
    assert!(first_registry.requests() > 0);
    drop(first);

    let second_registry = CountingRegistryDouble::new(test_blob.blob.clone());
    let second = open_store(&test_blob, &second_registry, dir.path());
    read_all(&second, &test_blob).await;
    assert_eq!(
        second_registry.requests(),
        0,
        "the second store sends no request"
    );
    let stats = second.stats();
    assert_eq!(stats.chunks_reused, test_blob.index.chunks.len() as u64);
    assert_eq!(stats.chunks_fetched, 0);
    assert_eq!(stats.cache_checksum_failures, 0);
}

#[tokio::test]
async fn flipped_cache_byte_is_refetched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let test_blob = sample_blob(2);
    let registry = CountingRegistryDouble::new(test_blob.blob.clone());
    let first = open_store(&test_blob, &registry, dir.path());
    read_all(&first, &test_blob).await;
    drop(first);

    // Flip one byte inside chunk 2 (the 3000-byte chunk of the shared member).
    let target = &test_blob.index.chunks[2];
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(data_path(dir.path(), 2))
        .expect("open cache file");
    let mut byte = [0u8; 1];
    let offset = target.data_offset + 10;
    file.read_exact_at(&mut byte, offset).expect("read byte");
    file.write_all_at(&[byte[0] ^ 0x40], offset)
        .expect("flip byte");
    drop(file);

    let registry = CountingRegistryDouble::new(test_blob.blob.clone());
    let second = open_store(&test_blob, &registry, dir.path());
    read_all(&second, &test_blob).await;
    let stats = second.stats();
    assert_eq!(
        stats.cache_checksum_failures, 1,
        "the flipped chunk fails its crc32"
    );
    assert_eq!(
        registry.requests(),
        1,
        "only the flipped chunk's member is fetched"
    );
    assert_eq!(stats.chunks_fetched, 1);
    assert_eq!(stats.chunks_reused, test_blob.index.chunks.len() as u64 - 1);
    drop(second);

    // The refetched chunk is recorded again, so a third run fetches nothing.
    let registry = CountingRegistryDouble::new(test_blob.blob.clone());
    let third = open_store(&test_blob, &registry, dir.path());
    read_all(&third, &test_blob).await;
    assert_eq!(registry.requests(), 0);
    assert_eq!(third.stats().cache_checksum_failures, 0);
}

/// Sets the last-use field of a layer's index (bytes 32..40, little-endian seconds).
fn set_last_use(dir: &Path, n: u8, seconds: u64) {
    let path = data_path(dir, n).with_extension("index");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open index");
    file.write_all_at(&seconds.to_le_bytes(), 32)
        .expect("write last use");
}

#[tokio::test]
async fn prune_evicts_least_recently_used() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blobs: Vec<TestBlob> = (10..13).map(sample_blob).collect();
    for test_blob in &blobs {
        let registry = CountingRegistryDouble::new(test_blob.blob.clone());
        let store = open_store(test_blob, &registry, dir.path());
        read_all(&store, test_blob).await;
    }
    // Layer 11 is the oldest, then 10, then 12.
    set_last_use(dir.path(), 11, 1_000);
    set_last_use(dir.path(), 10, 2_000);
    set_last_use(dir.path(), 12, 3_000);

    let listed = list_layers(dir.path()).expect("list");
    let order: Vec<&str> = listed.iter().map(|layer| layer.digest.as_str()).collect();
    assert_eq!(
        order,
        [layer_digest(11), layer_digest(10), layer_digest(12)]
    );
    assert!(listed.iter().all(|layer| !layer.in_use));
    assert!(listed
        .iter()
        .all(|layer| layer.chunks_cached == Some(4) && layer.chunk_count == Some(4)));
    let per_layer = listed[0].disk_bytes;
    assert!(per_layer > 0);

    // A store holding layer 11 keeps it, so the limit evicts layer 10 instead.
    let held_registry = CountingRegistryDouble::new(blobs[1].blob.clone());
    let held = open_store(&blobs[1], &held_registry, dir.path());
    let total: u64 = listed.iter().map(|layer| layer.disk_bytes).sum();
    let options = PruneOptions {
        max_size: Some(total - per_layer / 2),
        remove_unused: false,
    };
    let report = prune(dir.path(), &options).expect("prune");
    let removed: Vec<&str> = report
        .removed
        .iter()
        .map(|layer| layer.digest.as_str())
        .collect();
    assert_eq!(removed, [layer_digest(10)]);
    assert!(!data_path(dir.path(), 10).exists());
    assert!(data_path(dir.path(), 11).exists(), "the layer in use stays");

    let remaining = list_layers(dir.path()).expect("list");
    assert_eq!(remaining.len(), 2);
    assert!(remaining
        .iter()
        .any(|layer| layer.digest == layer_digest(11) && layer.in_use));

    // Removing every unused layer leaves only the held one.
    let report = prune(
        dir.path(),
        &PruneOptions {
            max_size: None,
            remove_unused: true,
        },
    )
    .expect("prune unused");
    assert_eq!(report.removed.len(), 1);
    assert_eq!(report.removed[0].digest, layer_digest(12));
    drop(held);
    let left = list_layers(dir.path()).expect("list");
    assert_eq!(left.len(), 1);
    assert!(!left[0].in_use, "the lock goes with the store");
}

fn image_options(cache_dir: &Path) -> OpenOptions {
    OpenOptions {
        platform: Platform::parse("linux/amd64").expect("platform"),
        verify: true,
        cache_dir: cache_dir.to_path_buf(),
        registry: RegistryOptions::default(),
        io: IoBackendChoice::Auto,
        toc_limits: TocLimits::default(),
    }
}

/// Reads `name` of the large fixture from start to end in 128 KiB reads and returns the
/// Range requests sent.
async fn sequential_read_requests(store: &ChunkStore, data_offset: u64, size: u64) -> u64 {
    let before = store.stats().range_requests;
    let mut offset = 0;
    while offset < size {
        let len = (size - offset).min(128 * 1024);
        store
            .read(0, data_offset + offset, len)
            .await
            .expect("sequential read");
        offset += len;
    }
    store.stats().range_requests - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readahead_cuts_range_requests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = open_image(
        "oci:/work/shared/fixtures/large/oci",
        &image_options(dir.path()),
    )
    .await
    .expect("open the large fixture");
    let layer = &image.layers[0];
    let chunks: Vec<_> = layer
        .chunks
        .iter()
        .filter(|chunk| chunk.name == "big/compressible.bin")
        .collect();
    assert!(chunks.len() >= 8, "the file has {} chunks", chunks.len());
    let start = chunks[0].data_offset;
    let size: u64 = chunks.iter().map(|chunk| chunk.size).sum();

    // The opened store has read-ahead on; a second store on a fresh cache has it off.
    let with_readahead = sequential_read_requests(&image.store, start, size).await;

    let plain_dir = tempfile::tempdir().expect("tempdir");
    let blob = esgz_nbd::image::open_source(
        "oci:/work/shared/fixtures/large/oci",
        &RegistryOptions::default(),
    )
    .expect("source");
    let resolved = blob
        .resolve(&Platform::parse("linux/amd64").expect("platform"))
        .await
        .expect("resolve");
    let plain = ChunkStore::open(
        vec![StoreLayer {
            index: layer.clone(),
            blob: Some(blob.blob(&resolved.layers[0]).expect("blob")),
        }],
        StoreOptions {
            max_readahead: 0,
            ..StoreOptions::new(plain_dir.path())
        },
    )
    .expect("open store");
    let without_readahead = sequential_read_requests(&plain, start, size).await;

    assert_eq!(
        without_readahead,
        chunks.len() as u64,
        "one request per chunk without read-ahead"
    );
    // How many requests read-ahead saves depends on how fetches and reads
    // interleave on a loaded machine (about half in most runs). So only the
    // direction is checked here, and docs/benchmarks.md has the counts.
    assert!(
        with_readahead < without_readahead,
        "read-ahead sent {with_readahead} requests, without it {without_readahead}"
    );
    assert!(image.store.stats().readaheads > 0);
}
