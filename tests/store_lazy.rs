//! Chunk store behaviour against a hand-built eStargz-like blob: exact bytes, caching,
//! coalescing, single-flight fetches, verification and both cache I/O backends.

mod store_support;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use esgz_nbd::layer::{ChunkRecord, ChunkSource, LayerIndex};
use esgz_nbd::store::{
    ChunkStore, IoBackendChoice, ReadError, StoreError, StoreLayer, StoreOptions, WholeLayerWriter,
};
use store_support::{
    build_blob, content, layer_digest, sha256, CountingRegistryDouble, GatedRegistryDouble,
    MemberSpec, TestBlob,
};

const BACKENDS: [IoBackendChoice; 2] = [IoBackendChoice::Std, IoBackendChoice::Uring];

/// Five members: small single-chunk ones, one holding two chunks (second at an inner
/// offset), and a 200 KiB one.
fn sample_blob() -> TestBlob {
    build_blob(
        &layer_digest(1),
        &[
            MemberSpec {
                chunks: vec![content(0, 5000)],
                level: 6,
            },
            MemberSpec {
                chunks: vec![content(1, 1), content(2, 3000)],
                level: 6,
            },
            MemberSpec {
                chunks: vec![content(3, 4096)],
                level: 9,
            },
            MemberSpec {
                chunks: vec![content(4, 200 * 1024)],
                level: 1,
            },
            MemberSpec {
                chunks: vec![content(5, 777)],
                level: 6,
            },
        ],
    )
}

/// Options with read-ahead off: these tests count the requests each read sends, and
/// read-ahead after sequential reads is tested on its own.
fn options(dir: &std::path::Path, io: IoBackendChoice) -> StoreOptions {
    StoreOptions {
        io,
        max_readahead: 0,
        ..StoreOptions::new(dir)
    }
}

fn open_store(
    test_blob: &TestBlob,
    registry: &Arc<CountingRegistryDouble>,
    options: StoreOptions,
) -> ChunkStore {
    let layer = StoreLayer {
        index: Arc::new(test_blob.index.clone()),
        blob: Some(registry.clone()),
    };
    ChunkStore::open(vec![layer], options).expect("open store")
}

/// The sample blob behind a store with its own cache folder.
struct Sample {
    test_blob: TestBlob,
    registry: Arc<CountingRegistryDouble>,
    store: ChunkStore,
    /// The cache folder, removed on drop.
    _dir: tempfile::TempDir,
}

fn sample_store(io: IoBackendChoice) -> Sample {
    let test_blob = sample_blob();
    let registry = CountingRegistryDouble::new(test_blob.blob.clone());
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_store(&test_blob, &registry, options(dir.path(), io));
    Sample {
        test_blob,
        registry,
        store,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_returns_exact_bytes_on_both_backends() {
    for backend in BACKENDS {
        let test_blob = sample_blob();
        let registry = CountingRegistryDouble::new(test_blob.blob.clone());
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(&test_blob, &registry, options(dir.path(), backend));
        let expected_name = if backend == IoBackendChoice::Uring {
            "io_uring"
        } else {
            "pread/pwrite"
        };
        assert_eq!(store.io_backend(), expected_name);

        let size = test_blob.data.len() as u64;
        let boundary = test_blob.index.chunks[1].data_offset;
        let ranges: &[(u64, u64)] = &[
            (0, 1),
            (boundary - 3, 6),
            (boundary, 1),
            (4000, 5000),
            (10_000, 150_000),
            (size - 777, 777),
            (size - 1, 1),
            (0, size),
            (123, 0),
        ];
        for &(offset, len) in ranges {
            let bytes = store.read(0, offset, len).await.expect("read");
            let want = &test_blob.data[offset as usize..(offset + len) as usize];
            assert!(
                bytes.as_ref() == want,
                "backend {backend:?} range {offset}+{len}"
            );
        }
        assert_eq!(store.stats().verify_failures, 0);
    }
}

#[tokio::test]
async fn second_read_is_cache_hit() {
    let sample = sample_store(IoBackendChoice::Std);

    let first = sample.store.read(0, 100, 6000).await.expect("first read");
    let requests = sample.registry.requests();
    assert!(requests >= 1);
    let misses = sample.store.stats().cache_misses;

    let second = sample.store.read(0, 100, 6000).await.expect("second read");
    assert_eq!(first, second);
    assert_eq!(
        sample.registry.requests(),
        requests,
        "a cached range sends no request"
    );
    assert_eq!(sample.store.stats().cache_hits, 1);
    assert_eq!(sample.store.stats().cache_misses, misses);
    assert_eq!(sample.store.stats().bytes_served, 12_000);
}

#[tokio::test]
async fn shared_member_fetched_once() {
    let sample = sample_store(IoBackendChoice::Std);

    // Chunks 1 and 2 share member 1; chunk 2 starts after chunk 1 and its filler.
    let first = &sample.test_blob.index.chunks[1];
    let second = &sample.test_blob.index.chunks[2];
    assert!(
        matches!(second.source(), ChunkSource::Member { inner_offset, .. } if inner_offset > 0)
    );

    let bytes = sample
        .store
        .read(0, first.data_offset, first.size)
        .await
        .expect("first chunk");
    assert_eq!(
        bytes.as_ref(),
        &sample.test_blob.data[first.data_offset as usize..][..first.size as usize]
    );
    assert_eq!(sample.registry.requests(), 1);

    let bytes = sample
        .store
        .read(0, second.data_offset, second.size)
        .await
        .expect("second chunk");
    assert_eq!(sha256(&bytes), second.digest().expect("digest"));
    assert_eq!(
        sample.registry.requests(),
        1,
        "the second chunk came with the first one's member"
    );
    assert_eq!(sample.store.stats().members_decompressed, 1);
    assert_eq!(sample.store.stats().chunks_fetched, 2);
}

#[tokio::test]
async fn coalescing_merges_neighbour_members() {
    let sample = sample_store(IoBackendChoice::Std);

    sample
        .store
        .read(0, 0, sample.test_blob.data.len() as u64)
        .await
        .expect("read all");
    assert_eq!(
        sample.registry.requests(),
        1,
        "five adjacent members in one request"
    );
    let ranges = sample.registry.ranges();
    let last_end = sample.test_blob.member_offsets[4] + 1;
    assert_eq!(ranges[0].0, 0);
    assert!(ranges[0].0 + ranges[0].1 > last_end);
    assert_eq!(sample.store.stats().members_decompressed, 5);
}

/// A reader of the first member of a coalesced range gets its bytes once that member
/// has arrived, while the rest of the range is still on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_served_before_its_range_ends() {
    let test_blob = sample_blob();
    // The gate stops the stream after member 1, so members 0 and 1 arrive first.
    let gate_at = test_blob.member_offsets[2];
    let registry = GatedRegistryDouble::new(test_blob.blob.clone(), gate_at);
    let dir = tempfile::tempdir().expect("tempdir");
    let layer = StoreLayer {
        index: Arc::new(test_blob.index.clone()),
        blob: Some(registry.clone()),
    };
    let store = ChunkStore::open(vec![layer], options(dir.path(), IoBackendChoice::Std))
        .expect("open store");
    let size = test_blob.data.len() as u64;

    let whole = store.prefetch(0, 0, size);
    tokio::pin!(whole);
    let first_len = test_blob.index.chunks[0].size;
    let early =
        async { tokio::time::timeout(Duration::from_secs(20), store.read(0, 0, first_len)).await };
    let bytes = tokio::select! {
        biased;
        outcome = &mut whole => panic!("the whole range finished with the gate closed: {outcome:?}"),
        read = early => read
            .expect("the first member was not served while the range stalled")
            .expect("read of the first member"),
    };
    assert_eq!(bytes.as_ref(), &test_blob.data[..first_len as usize]);

    registry.open_gate();
    whole.await.expect("the rest of the range");
    assert_eq!(
        registry.requests.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    let all = store.read(0, 0, size).await.expect("read all");
    assert!(all.as_ref() == test_blob.data.as_slice(), "whole data");
    assert_eq!(store.stats().members_decompressed, 5);
}

#[tokio::test]
async fn coalescing_respects_gap_and_size_limits() {
    let test_blob = sample_blob();
    let chunk1 = test_blob.index.chunks[1].clone();
    let chunk3 = test_blob.index.chunks[3].clone();
    let gap = test_blob.member_offsets[2] - test_blob.member_offsets[1];

    // (name, max_coalesce_gap, max_request_size, expected requests for members 0 and 2)
    let cases: &[(&str, u64, u64, u64)] = &[
        ("gap allowed", gap, 16 << 20, 1),
        ("gap too large", gap - 1, 16 << 20, 2),
        ("request too large", gap, test_blob.member_offsets[2], 2),
    ];
    for &(name, max_coalesce_gap, max_request_size, expected) in cases {
        let registry = CountingRegistryDouble::new(test_blob.blob.clone());
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(
            &test_blob,
            &registry,
            StoreOptions {
                max_coalesce_gap,
                max_request_size,
                ..options(dir.path(), IoBackendChoice::Std)
            },
        );

        // Cache member 1, so reading chunks 0..=3 misses members 0 and 2 with member 1 between.
        store
            .read(0, chunk1.data_offset, 1)
            .await
            .expect("cache member 1");
        let before = registry.requests();
        let end = chunk3.data_offset + 1;
        let bytes = store
            .read(0, 0, end)
            .await
            .expect("read across the cached member");
        assert!(
            bytes.as_ref() == &test_blob.data[..end as usize],
            "case {name}"
        );
        assert_eq!(registry.requests() - before, expected, "case {name}");
    }
}

#[tokio::test]
async fn large_member_split_into_requests() {
    let test_blob = build_blob(
        &layer_digest(2),
        &[MemberSpec {
            chunks: vec![content(9, 300_000)],
            level: 0,
        }],
    );
    let registry = CountingRegistryDouble::new(test_blob.blob.clone());
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_store(
        &test_blob,
        &registry,
        StoreOptions {
            max_request_size: 64 * 1024,
            ..options(dir.path(), IoBackendChoice::Std)
        },
    );

    let bytes = store.read(0, 0, 300_000).await.expect("read");
    assert!(bytes.as_ref() == test_blob.data.as_slice());
    assert!(
        registry.requests() >= 5,
        "got {} requests",
        registry.requests()
    );
    assert!(registry.ranges().iter().all(|&(_, len)| len <= 64 * 1024));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_fetch_once() {
    for backend in BACKENDS {
        let test_blob = sample_blob();
        let registry =
            CountingRegistryDouble::with_delay(test_blob.blob.clone(), Duration::from_millis(50));
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(open_store(
            &test_blob,
            &registry,
            options(dir.path(), backend),
        ));
        let chunk = test_blob.index.chunks[3].clone();

        let mut tasks = Vec::new();
        for i in 0..32u64 {
            let store = Arc::clone(&store);
            let offset = chunk.data_offset + i;
            tasks.push(tokio::spawn(
                async move { store.read(0, offset, 100).await },
            ));
        }
        for (i, task) in tasks.into_iter().enumerate() {
            let bytes = task.await.expect("task").expect("read");
            let start = chunk.data_offset as usize + i;
            assert!(
                bytes.as_ref() == &test_blob.data[start..start + 100],
                "reader {i}"
            );
        }
        assert_eq!(registry.requests(), 1, "backend {backend:?}");
        assert_eq!(store.stats().members_decompressed, 1, "backend {backend:?}");
    }
}

#[tokio::test]
async fn dropped_read_still_fills_cache() {
    let test_blob = sample_blob();
    let registry =
        CountingRegistryDouble::with_delay(test_blob.blob.clone(), Duration::from_millis(100));
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_store(
        &test_blob,
        &registry,
        options(dir.path(), IoBackendChoice::Std),
    );

    let timed_out = tokio::time::timeout(Duration::from_millis(10), store.read(0, 0, 10)).await;
    assert!(timed_out.is_err(), "the first read must still be fetching");

    let bytes = store
        .read(0, 0, 10)
        .await
        .expect("read after the dropped one");
    assert_eq!(bytes.as_ref(), &test_blob.data[..10]);
    assert_eq!(
        registry.requests(),
        1,
        "the dropped read's fetch was joined, not repeated"
    );
}

/// Builds a blob whose member 1 is stored (level 0), so flipping a byte changes the data.
fn blob_with_stored_member() -> TestBlob {
    build_blob(
        &layer_digest(3),
        &[
            MemberSpec {
                chunks: vec![content(0, 2000)],
                level: 6,
            },
            MemberSpec {
                chunks: vec![content(1, 3000)],
                level: 0,
            },
            MemberSpec {
                chunks: vec![content(2, 1000)],
                level: 6,
            },
        ],
    )
}

#[tokio::test]
async fn corrupt_member_fails_verification() {
    for backend in BACKENDS {
        let test_blob = blob_with_stored_member();
        let registry = CountingRegistryDouble::new(test_blob.blob.clone());
        // gzip header (10 bytes) + stored block header (5 bytes) + 100 bytes into the chunk.
        let flipped = test_blob.member_offsets[1] as usize + 10 + 5 + 100;
        registry.corrupt(flipped);
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(&test_blob, &registry, options(dir.path(), backend));
        let bad = test_blob.index.chunks[1].clone();

        for attempt in 0..2 {
            let error = store
                .read(0, bad.data_offset, 10)
                .await
                .expect_err("corrupt chunk");
            let ReadError::DigestMismatch {
                layer,
                name,
                compressed_offset,
                data_offset,
                expected,
                actual,
            } = &error
            else {
                panic!("attempt {attempt}: expected DigestMismatch, got {error:?}");
            };
            assert_eq!(layer, &layer_digest(3));
            assert_eq!(name, "dir/file1_0");
            assert_eq!(*compressed_offset, test_blob.member_offsets[1]);
            assert_eq!(*data_offset, bad.data_offset);
            assert_eq!(expected, &hex::encode(bad.digest().expect("digest")));
            assert_ne!(expected, actual);
            let message = error.to_string();
            assert!(
                message.contains("dir/file1_0") && message.contains(&layer_digest(3)),
                "{message}"
            );
        }
        assert_eq!(
            store.stats().verify_failures,
            4,
            "each read fetches the corrupt member twice (one refetch), and nothing was cached"
        );
        assert_eq!(store.stats().chunks_fetched, 0);

        for good in [0usize, 2] {
            let chunk = &test_blob.index.chunks[good];
            let bytes = store
                .read(0, chunk.data_offset, chunk.size)
                .await
                .expect("good chunk");
            assert_eq!(
                sha256(&bytes),
                chunk.digest().expect("digest"),
                "chunk {good}"
            );
        }
    }
}

#[tokio::test]
async fn verify_off_serves_corrupt_member() {
    let test_blob = blob_with_stored_member();
    let registry = CountingRegistryDouble::new(test_blob.blob.clone());
    registry.corrupt(test_blob.member_offsets[1] as usize + 10 + 5 + 100);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_store(
        &test_blob,
        &registry,
        StoreOptions {
            verify: false,
            ..options(dir.path(), IoBackendChoice::Std)
        },
    );

    let chunk = &test_blob.index.chunks[1];
    let bytes = store
        .read(0, chunk.data_offset, chunk.size)
        .await
        .expect("unverified read");
    let original = &test_blob.data[chunk.data_offset as usize..][..chunk.size as usize];
    let differing: Vec<usize> = (0..bytes.len())
        .filter(|&i| bytes[i] != original[i])
        .collect();
    assert_eq!(differing, vec![100]);
    assert_eq!(store.stats().verify_failures, 0);
}

#[tokio::test]
async fn fetch_error_names_range_and_recovers() {
    let sample = sample_store(IoBackendChoice::Std);
    // Chunk 3 is the only chunk of member 2.
    let chunk = sample.test_blob.index.chunks[3].clone();

    sample.registry.set_failing(true);
    let error = sample
        .store
        .read(0, chunk.data_offset, 10)
        .await
        .expect_err("failing registry");
    let ReadError::Fetch {
        layer,
        compressed_offset,
        compressed_end,
        chain,
    } = &error
    else {
        panic!("expected Fetch, got {error:?}");
    };
    assert_eq!(layer, &layer_digest(1));
    assert_eq!(*compressed_offset, sample.test_blob.member_offsets[2]);
    assert_eq!(*compressed_end, sample.test_blob.member_offsets[3]);
    assert!(
        chain.contains("after 3 attempts") && chain.contains("connection reset"),
        "{chain}"
    );
    assert_eq!(sample.store.stats().fetch_errors, 1);

    sample.registry.set_failing(false);
    let bytes = sample
        .store
        .read(0, chunk.data_offset, 10)
        .await
        .expect("read after recovery");
    assert_eq!(
        bytes.as_ref(),
        &sample.test_blob.data[chunk.data_offset as usize..][..10]
    );
}

#[tokio::test]
async fn out_of_range_and_unknown_layer_rejected() {
    let sample = sample_store(IoBackendChoice::Std);
    let size = sample.test_blob.data.len() as u64;

    let cases: &[(u32, u64, u64)] = &[(0, size, 1), (0, size - 1, 2), (0, u64::MAX, 2), (1, 0, 1)];
    for &(layer, offset, len) in cases {
        let error = sample
            .store
            .read(layer, offset, len)
            .await
            .expect_err("invalid range");
        assert!(
            matches!(
                error,
                ReadError::OutOfRange { .. } | ReadError::UnknownLayer { .. }
            ),
            "layer {layer} range {offset}+{len}: {error:?}"
        );
        assert_eq!(
            error.into_io_error().kind(),
            std::io::ErrorKind::InvalidInput
        );
    }
    assert_eq!(sample.registry.requests(), 0);
}

#[tokio::test]
async fn prefetch_fills_cache() {
    let sample = sample_store(IoBackendChoice::Uring);
    let size = sample.test_blob.data.len() as u64;

    sample.store.prefetch(0, 0, size).await.expect("prefetch");
    let requests = sample.registry.requests();
    assert_eq!(sample.store.stats().bytes_served, 0);

    let bytes = sample.store.read(0, 0, size).await.expect("read");
    assert!(bytes.as_ref() == sample.test_blob.data.as_slice());
    assert_eq!(sample.registry.requests(), requests);
    assert_eq!(
        sample.store.stats().chunks_fetched,
        sample.test_blob.index.chunks.len() as u64
    );
}

#[tokio::test]
async fn cache_file_and_dir_modes() {
    let test_blob = sample_blob();
    let registry = CountingRegistryDouble::new(test_blob.blob.clone());
    let root = tempfile::tempdir().expect("tempdir");
    let cache_dir = root.path().join("cache");
    let store = open_store(
        &test_blob,
        &registry,
        options(&cache_dir, IoBackendChoice::Std),
    );
    store.read(0, 0, 10).await.expect("read");

    let mode = |path: &std::path::Path| {
        std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
    };
    assert_eq!(mode(&cache_dir), 0o700);
    assert_eq!(mode(&cache_dir.join("layers")), 0o700);
    let hex = hex::encode([1u8; 32]);
    let file = cache_dir.join("layers").join(format!("sha256-{hex}.data"));
    assert_eq!(mode(&file), 0o600);
    assert_eq!(
        std::fs::metadata(&file).expect("stat").len(),
        test_blob.data.len() as u64
    );
}

#[test]
fn open_rejects_bad_digest_and_missing_blob() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut test_blob = sample_blob();
    test_blob.index.digest = "sha256:../../etc".to_string();
    let registry = CountingRegistryDouble::new(test_blob.blob.clone());
    let layer = StoreLayer {
        index: Arc::new(test_blob.index.clone()),
        blob: Some(registry),
    };
    let result = ChunkStore::open(vec![layer], options(dir.path(), IoBackendChoice::Std));
    assert!(matches!(result, Err(StoreError::InvalidDigest { .. })));

    let test_blob = sample_blob();
    let layer = StoreLayer {
        index: Arc::new(test_blob.index.clone()),
        blob: None,
    };
    let result = ChunkStore::open(vec![layer], options(dir.path(), IoBackendChoice::Std));
    assert!(matches!(result, Err(StoreError::MissingBlob { .. })));
}

#[tokio::test]
async fn whole_layer_served_without_blob() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().expect("tempdir");
        let digest = layer_digest(7);
        let data = content(7, 20_000);
        let mut writer =
            WholeLayerWriter::create(dir.path(), &digest, data.len() as u64).expect("create");
        writer
            .write_at(0, &data[..12_345])
            .expect("write first part");
        writer
            .write_at(12_345, &data[12_345..])
            .expect("write second part");
        writer.finish().expect("finish");

        let chunks = vec![
            ChunkRecord::local(0, 12_345, None, "a".into()),
            ChunkRecord::local(12_345, 20_000 - 12_345, None, "b".into()),
        ];
        let index = LayerIndex {
            digest: digest.clone(),
            chunks,
            data_size: 20_000,
            ..LayerIndex::default()
        };
        let layer = StoreLayer {
            index: Arc::new(index),
            blob: None,
        };
        let store = ChunkStore::open(vec![layer], options(dir.path(), backend)).expect("open");

        let bytes = store.read(0, 12_000, 1_000).await.expect("read");
        assert_eq!(bytes.as_ref(), &data[12_000..13_000], "backend {backend:?}");
        assert_eq!(store.stats().cache_hits, 1);
        assert_eq!(store.stats().range_requests, 0);

        // A byte changed in chunk "b" fails every read of its first block, once logged
        // and counted; chunk "a" is still served.
        let path = dir
            .path()
            .join("layers")
            .join(format!("sha256-{}.data", &digest["sha256:".len()..]));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open the cache file");
        std::os::unix::fs::FileExt::write_all_at(&file, &[data[12_500] ^ 0x40], 12_500)
            .expect("flip a byte");
        for attempt in 0..2 {
            match store.read(0, 12_000, 1_000).await {
                Err(ReadError::WholeLayerChecksum {
                    data_offset, name, ..
                }) => {
                    assert_eq!(
                        (data_offset, name.as_str()),
                        (12_345, "b"),
                        "attempt {attempt}"
                    );
                }
                other => panic!("backend {backend:?}, attempt {attempt}: {other:?}"),
            }
        }
        let bytes = store.read(0, 0, 12_345).await.expect("read chunk a");
        assert_eq!(bytes.as_ref(), &data[..12_345], "backend {backend:?}");
        assert_eq!(store.stats().cache_checksum_failures, 1);
    }
}

#[test]
fn whole_layer_missing_file_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let chunk = ChunkRecord::local(0, 10, None, "a".into());
    let index = LayerIndex {
        digest: layer_digest(8),
        chunks: vec![chunk],
        data_size: 10,
        ..LayerIndex::default()
    };
    let layer = StoreLayer {
        index: Arc::new(index),
        blob: None,
    };
    let result = ChunkStore::open(vec![layer], options(dir.path(), IoBackendChoice::Std));
    assert!(matches!(result, Err(StoreError::OpenCacheFile { .. })));
}

#[tokio::test]
async fn auto_backend_probes_io_uring() {
    let sample = sample_store(IoBackendChoice::Auto);

    // This machine allows io_uring (the Uring tests above depend on it), so Auto picks it.
    assert_eq!(sample.store.io_backend(), "io_uring");
    let bytes = sample.store.read(0, 0, 100).await.expect("read");
    assert_eq!(bytes.as_ref(), &sample.test_blob.data[..100]);
}

/// A store over the sample blob with the io_uring backend and an empty cache.
fn fresh_store() -> (
    TestBlob,
    Arc<CountingRegistryDouble>,
    tempfile::TempDir,
    ChunkStore,
) {
    let test_blob = sample_blob();
    let registry = CountingRegistryDouble::new(test_blob.blob.clone());
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_store(
        &test_blob,
        &registry,
        options(dir.path(), IoBackendChoice::Uring),
    );
    (test_blob, registry, dir, store)
}

/// The `.data` cache file of the only layer under `cache_dir`.
fn cache_data_file(cache_dir: &std::path::Path) -> std::path::PathBuf {
    std::fs::read_dir(cache_dir.join("layers"))
        .expect("list the cache")
        .map(|entry| entry.expect("cache entry").path())
        .find(|path| {
            path.extension()
                .is_some_and(|extension| extension == "data")
        })
        .expect("a cache data file")
}

/// `read_cached_into` serves only ranges whose chunks are present and made of whole
/// check blocks, and refuses a block whose bytes changed in the cache file, which the
/// following `read` then fetches again.
#[tokio::test]
async fn cached_reads_without_wait() {
    let (test_blob, registry, dir, store) = fresh_store();
    let size = test_blob.data.len() as u64;
    let chunk = |index: usize| &test_blob.index.chunks[index];
    let read_now = |offset: u64, len: u64| {
        let mut out = vec![0u8; len as usize];
        store
            .read_cached_into(0, offset, &mut [&mut out[..]])
            .then_some(out)
    };

    assert!(read_now(0, 4096).is_none(), "a chunk not yet fetched");
    let whole = store.read(0, 0, size).await.expect("first read");
    assert_eq!(whole.as_ref(), &test_blob.data[..]);

    // (case, offset, length, served without waiting)
    let cases: &[(&str, u64, u64, bool)] = &[
        ("first block", 0, 4096, true),
        ("short last block of a chunk", 4096, 904, true),
        ("whole chunks across members", 0, chunk(3).data_offset, true),
        ("large chunk", chunk(4).data_offset, chunk(4).size, true),
        ("inside a block", 100, 200, false),
        ("ends inside a block", 0, 4000, false),
        ("past the end", size - 777, 778, false),
        ("empty", 0, 0, false),
    ];
    for &(case, offset, len, served) in cases {
        match read_now(offset, len) {
            Some(bytes) => {
                assert!(served, "case {case} was served");
                assert!(
                    bytes == test_blob.data[offset as usize..(offset + len) as usize],
                    "case {case}: wrong bytes"
                );
            }
            None => assert!(!served, "case {case} was not served"),
        }
    }
    let mut out = [0u8; 4096];
    assert!(
        !store.read_cached_into(3, 0, &mut [&mut out[..]]),
        "unknown layer"
    );

    // Several parts, each starting where the one before ends, in one call.
    let mut first = vec![0u8; chunk(0).size as usize];
    let mut second = vec![0u8; (chunk(1).size + chunk(2).size) as usize];
    assert!(store.read_cached_into(0, 0, &mut [&mut first[..], &mut second[..]]));
    assert!(first == test_blob.data[..first.len()]);
    assert!(second == test_blob.data[first.len()..first.len() + second.len()]);
    let mut partial = [0u8; 100];
    assert!(
        !store.read_cached_into(0, 0, &mut [&mut first[..], &mut partial[..]]),
        "a part that ends inside a block was served"
    );
    assert!(
        !store.read_cached_into(0, 0, &mut [&mut first[..], &mut []]),
        "an empty part was served"
    );

    let served = cases.iter().filter(|case| case.3).count() as u64 + 1;
    assert_eq!(store.stats().reads_without_wait, served);

    // Flip a byte of chunk 3 in the cache file.
    let target = chunk(3);
    let data_file = cache_data_file(dir.path());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&data_file)
        .expect("open the cache file");
    let offset = target.data_offset + 7;
    let mut byte = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut byte, offset).expect("read byte");
    std::os::unix::fs::FileExt::write_all_at(&file, &[byte[0] ^ 0x20], offset).expect("flip byte");
    drop(file);

    assert!(
        read_now(target.data_offset, target.size).is_none(),
        "a changed block was served"
    );
    assert_eq!(store.stats().cache_checksum_failures, 0);
    let requests = registry.requests();
    let bytes = store
        .read(0, target.data_offset, target.size)
        .await
        .expect("read after the damage");
    assert_eq!(
        bytes.as_ref(),
        &test_blob.data[target.data_offset as usize..(target.data_offset + target.size) as usize]
    );
    assert_eq!(store.stats().cache_checksum_failures, 1);
    assert!(
        registry.requests() > requests,
        "the chunk was not fetched again"
    );
    assert!(
        read_now(target.data_offset, target.size).is_some(),
        "the refetched chunk is served without waiting again"
    );
}

/// Chunks fetched together are written to the cache file in joined runs: the file then
/// holds exactly the layer's data, and a new store over it serves every range from
/// the cache without a request.
#[tokio::test]
async fn joined_cache_writes_exact() {
    let (test_blob, registry, dir, store) = fresh_store();
    let size = test_blob.data.len() as u64;
    store.read(0, 0, size).await.expect("read everything");
    assert_eq!(
        registry.requests(),
        1,
        "the members were not fetched together"
    );
    drop(store);

    let data_file = cache_data_file(dir.path());
    let cached = std::fs::read(&data_file).expect("read the cache file");
    assert!(
        cached == test_blob.data,
        "the cache file differs from the layer data"
    );

    let registry = CountingRegistryDouble::new(test_blob.blob.clone());
    let reopened = open_store(
        &test_blob,
        &registry,
        options(dir.path(), IoBackendChoice::Std),
    );
    let bytes = reopened
        .read(0, 0, size)
        .await
        .expect("read from the cache");
    assert!(bytes == test_blob.data);
    assert_eq!(registry.requests(), 0);
    assert_eq!(reopened.stats().cache_checksum_failures, 0);
}
