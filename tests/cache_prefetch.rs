//! Start-up prefetch against the basic reference fixture, whose prioritized files are
//! `bin/tool` and `data/f4097`, and background fetching of the rest.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use esgz_nbd::estargz::TocLimits;
use esgz_nbd::image::{open_image, OpenOptions, OpenedImage};
use esgz_nbd::layer::{ChunkSource, Prefetch};
use esgz_nbd::prefetch::{self, PrefetchOptions};
use esgz_nbd::registry::RegistryOptions;
use esgz_nbd::source::Platform;
use esgz_nbd::store::IoBackendChoice;
use sha2::{Digest, Sha256};

const BASIC: &str = "oci:/work/shared/fixtures/basic/oci";

async fn open_basic(cache_dir: &Path) -> OpenedImage {
    let options = OpenOptions {
        platform: Platform::parse("linux/amd64").expect("platform"),
        verify: true,
        cache_dir: cache_dir.to_path_buf(),
        registry: RegistryOptions::default(),
        io: IoBackendChoice::Auto,
        toc_limits: TocLimits::default(),
    };
    open_image(BASIC, &options)
        .await
        .expect("open the basic fixture")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn landmark_prefetch_fetches_prioritized_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = open_basic(dir.path()).await;
    let layer = &image.layers[0];
    let Prefetch::Before {
        compressed_offset: landmark,
    } = layer.prefetch
    else {
        panic!(
            "the basic fixture has a .prefetch.landmark, got {:?}",
            layer.prefetch
        );
    };
    let prioritized: Vec<_> = layer
        .chunks
        .iter()
        .filter(|chunk| matches!(chunk.source(), ChunkSource::Member { compressed_offset, .. } if compressed_offset < landmark))
        .collect();
    let names: BTreeSet<&str> = prioritized
        .iter()
        .map(|chunk| chunk.name.as_str())
        .collect();
    assert_eq!(names, BTreeSet::from(["bin/tool", "data/f4097"]));

    let options = PrefetchOptions {
        landmark: true,
        background: false,
        background_rate: None,
    };
    let report = prefetch::run(image.store.clone(), image.layers.clone(), options).await;
    let stats = image.store.stats();
    assert_eq!(report.failures, 0);
    assert_eq!(
        stats.range_requests, 1,
        "neighbouring prioritized members share one request"
    );
    assert_eq!(
        stats.chunks_fetched,
        prioritized.len() as u64,
        "exactly the prioritized chunks"
    );
    assert_eq!(report.background_members, 0);
    assert_eq!(image.store.cached_chunks(0), prioritized.len());

    // Reading the prioritized files is now a cache hit. (Read-ahead may fetch what follows
    // them, so the misses are counted, not the requests.)
    let misses = image.store.stats().cache_misses;
    for chunk in &prioritized {
        let bytes = image
            .store
            .read(0, chunk.data_offset, chunk.size)
            .await
            .expect("read");
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        assert_eq!(Some(digest), chunk.digest(), "chunk of {}", chunk.name);
    }
    assert_eq!(image.store.stats().cache_misses, misses);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_prefetch_fetches_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = open_basic(dir.path()).await;
    let options = PrefetchOptions {
        landmark: false,
        background: false,
        background_rate: None,
    };
    let report = prefetch::run(image.store.clone(), image.layers.clone(), options).await;
    assert_eq!(report, prefetch::PrefetchReport::default());
    assert_eq!(image.store.stats().range_requests, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_fetch_completes_cache_during_reads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = open_basic(dir.path()).await;
    let layer = image.layers[0].clone();
    let total_chunks = layer.chunks.len();

    // About 1.3 MB of blob at 1 MiB/s: the reads below run while the background works.
    let options = PrefetchOptions {
        landmark: true,
        background: true,
        background_rate: Some(1024 * 1024),
    };
    let task = prefetch::spawn(image.store.clone(), image.layers.clone(), options);

    let store = Arc::clone(&image.store);
    for chunk in layer.chunks.iter().rev() {
        let bytes = store
            .read(0, chunk.data_offset, chunk.size)
            .await
            .expect("on-demand read");
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        assert_eq!(Some(digest), chunk.digest(), "chunk of {}", chunk.name);
    }
    let report = task.await.expect("prefetch task");
    assert_eq!(report.failures, 0);
    assert!(report.landmark_members > 0);
    assert_eq!(
        store.cached_chunks(0),
        total_chunks,
        "every chunk is cached"
    );
    assert_eq!(store.stats().verify_failures, 0);

    let requests = store.stats().range_requests;
    for chunk in &layer.chunks {
        store
            .read(0, chunk.data_offset, chunk.size)
            .await
            .expect("cached read");
    }
    assert_eq!(
        store.stats().range_requests,
        requests,
        "a complete cache sends no request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_fetch_alone_fills_cache() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = open_basic(dir.path()).await;
    let options = PrefetchOptions {
        landmark: false,
        background: true,
        background_rate: None,
    };
    let report = prefetch::run(image.store.clone(), image.layers.clone(), options).await;
    assert_eq!(report.failures, 0);
    assert_eq!(report.background_members, image.store.member_count(0));
    assert_eq!(image.store.cached_chunks(0), image.layers[0].chunks.len());
    // Unlimited, batches are at most 4 MiB: the 1.3 MB blob takes one request.
    assert_eq!(image.store.stats().range_requests, 1);
}
