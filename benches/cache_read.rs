//! Cached read throughput of the chunk store (128 KiB reads of a 64 MiB layer held in the
//! page cache) through io_uring and pread/pwrite, through the warm path that NBD reads
//! take first (`read_cached_into`), and against `pread` on the raw file.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use esgz_nbd::layer::{ChunkRecord, LayerIndex};
use esgz_nbd::store::{ChunkStore, IoBackendChoice, StoreLayer, StoreOptions, WholeLayerWriter};

const LAYER_SIZE: u64 = 64 * 1024 * 1024;
const CHUNK_SIZE: u64 = 4 * 1024 * 1024;
const READ_SIZE: u64 = 128 * 1024;

fn layer_index(digest: &str) -> LayerIndex {
    let chunks = (0..LAYER_SIZE / CHUNK_SIZE)
        .map(|i| ChunkRecord::local(i * CHUNK_SIZE, CHUNK_SIZE, None, format!("file{i}").into()))
        .collect();
    LayerIndex {
        digest: digest.to_string(),
        chunks,
        data_size: LAYER_SIZE,
        ..LayerIndex::default()
    }
}

fn bench_cache_read(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let digest = format!("sha256:{}", "ab".repeat(32));
    let mut writer =
        WholeLayerWriter::create(dir.path(), &digest, LAYER_SIZE).expect("create layer");
    let block: Vec<u8> = (0..CHUNK_SIZE).map(|i| (i % 251) as u8).collect();
    for i in 0..LAYER_SIZE / CHUNK_SIZE {
        writer
            .write_at(i * CHUNK_SIZE, &block)
            .expect("write layer");
    }
    writer.finish().expect("finish layer");
    let index = Arc::new(layer_index(&digest));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("cache_read");
    group.throughput(Throughput::Bytes(LAYER_SIZE));
    group.sample_size(20);

    for backend in [IoBackendChoice::Uring, IoBackendChoice::Std] {
        let store = ChunkStore::open(
            vec![StoreLayer {
                index: index.clone(),
                blob: None,
            }],
            StoreOptions {
                io: backend,
                ..StoreOptions::new(dir.path())
            },
        )
        .expect("open store");
        let store = Arc::new(store);
        // Eight reads in flight, as a client with a queue depth of 8 sends them.
        group.bench_function(BenchmarkId::new("store", store.io_backend()), |b| {
            b.to_async(&runtime).iter(|| {
                let store = store.clone();
                async move {
                    let mut tasks = Vec::new();
                    for lane in 0..8u64 {
                        let store = store.clone();
                        tasks.push(tokio::spawn(async move {
                            let mut offset = lane * READ_SIZE;
                            while offset < LAYER_SIZE {
                                store.read(0, offset, READ_SIZE).await.expect("cached read");
                                offset += 8 * READ_SIZE;
                            }
                        }));
                    }
                    for task in tasks {
                        task.await.expect("read task");
                    }
                }
            })
        });
    }

    // The path warm NBD reads take: one preadv2(RWF_NOWAIT) per read into the reply
    // buffer, with the crc32 checks, and no hop to the I/O thread.
    let store = ChunkStore::open(
        vec![StoreLayer {
            index: index.clone(),
            blob: None,
        }],
        StoreOptions::new(dir.path()),
    )
    .expect("open store");
    group.bench_function("read_cached_into", |b| {
        let mut buffer = vec![0u8; READ_SIZE as usize];
        b.iter(|| {
            let mut offset = 0;
            while offset < LAYER_SIZE {
                let served = store.read_cached_into(0, offset, &mut [buffer.as_mut_slice()]);
                assert!(served, "the read at {offset} left the warm path");
                offset += READ_SIZE;
            }
        })
    });

    let path = dir
        .path()
        .join("layers")
        .join(format!("sha256-{}.data", "ab".repeat(32)));
    let file = std::fs::File::open(path).expect("open the raw cache file");
    group.bench_function("raw_pread", |b| {
        let mut buffer = vec![0u8; READ_SIZE as usize];
        b.iter(|| {
            let mut offset = 0;
            while offset < LAYER_SIZE {
                file.read_exact_at(&mut buffer, offset).expect("pread");
                offset += READ_SIZE;
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench_cache_read);
criterion_main!(benches);
