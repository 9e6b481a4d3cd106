//! Repair of a whole layer's cache file through the chunk store: a tar.gz layer unpacked
//! the way `serve` unpacks it at start, a byte flipped in its cache file, and a blob source
//! that responds slowly, fails or sends damaged bytes.

mod store_support;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use esgz_nbd::store::{layer_tar_reader, WholeLayerWriter};
use esgz_nbd::store::{ChunkStore, IoBackendChoice, ReadError, StoreLayer, StoreOptions};
use esgz_nbd::tarlayer::index_tar;
use store_support::{content, gzip, sha256, CountingRegistryDouble};

const BACKENDS: [IoBackendChoice; 2] = [IoBackendChoice::Std, IoBackendChoice::Uring];

/// Sizes of the layer's two files, `a` and `b`.
const SIZE_A: usize = 10_000;
const SIZE_B: usize = 20_000;

/// A tar.gz layer of two files unpacked into a cache directory.
struct UnpackedLayer {
    dir: tempfile::TempDir,
    digest: String,
    blob: Vec<u8>,
    /// The layer's data space: `a` then `b`.
    data: Vec<u8>,
}

impl UnpackedLayer {
    fn new() -> UnpackedLayer {
        let data_a = content(1, SIZE_A);
        let data_b = content(2, SIZE_B);
        let mut builder = tar::Builder::new(Vec::new());
        for (name, data) in [("a", &data_a), ("b", &data_b)] {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder
                .append_data(&mut header, name, data.as_slice())
                .expect("appending a tar entry");
        }
        let tar = builder.into_inner().expect("finishing the tar");
        let blob = gzip(&tar, 6);
        let digest = format!("sha256:{}", hex::encode(sha256(&blob)));
        UnpackedLayer {
            dir: tempfile::tempdir().expect("tempdir"),
            digest,
            blob,
            data: [data_a, data_b].concat(),
        }
    }

    /// Unpacks the blob into the cache directory and opens a store that reads the blob
    /// from `source` to repair the cache file.
    fn open(&self, source: Arc<CountingRegistryDouble>, io: IoBackendChoice) -> Arc<ChunkStore> {
        let download = tempfile::tempfile().expect("temp file");
        download
            .write_all_at(&self.blob, 0)
            .expect("writing the blob");
        let reader = layer_tar_reader(download, &self.digest).expect("opening the tar");
        let mut writer =
            WholeLayerWriter::create_growable(self.dir.path(), &self.digest).expect("create");
        let mut sink = |offset: u64, bytes: &[u8]| writer.write_at(offset, bytes);
        let index = index_tar(0, &self.digest, reader, &mut sink).expect("indexing the tar");
        writer
            .finish_with_size(index.data_size)
            .expect("finishing the cache file");
        assert_eq!(index.chunks.len(), 2, "one chunk per file");

        let layer = StoreLayer {
            index: Arc::new(index),
            blob: Some(source),
        };
        let options = StoreOptions {
            io,
            max_readahead: 0,
            ..StoreOptions::new(self.dir.path())
        };
        Arc::new(ChunkStore::open(vec![layer], options).expect("opening the store"))
    }

    fn cache_file(&self) -> PathBuf {
        cache_file(self.dir.path(), &self.digest)
    }

    /// Flips the byte at `data_offset` in the cache file.
    fn flip(&self, data_offset: usize) {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(self.cache_file())
            .expect("opening the cache file");
        file.write_all_at(&[self.data[data_offset] ^ 0x40], data_offset as u64)
            .expect("flipping a byte");
    }

    fn source(&self, delay: Duration) -> Arc<CountingRegistryDouble> {
        CountingRegistryDouble::with_delay(self.blob.clone(), delay)
    }
}

fn cache_file(dir: &Path, digest: &str) -> PathBuf {
    dir.join("layers")
        .join(format!("sha256-{}.data", &digest["sha256:".len()..]))
}

/// Eight concurrent reads of a block changed in the cache file all return the layer's
/// bytes and share one download of the blob. A read of the other file goes on meanwhile.
/// Afterwards the cache file contains its original bytes, and a later change in the other
/// file is found, counted and repaired in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_layer_flip_repaired_once() {
    for backend in BACKENDS {
        let layer = UnpackedLayer::new();
        let source = layer.source(Duration::from_millis(300));
        let store = layer.open(Arc::clone(&source), backend);
        let damaged = SIZE_A + 12_345;
        layer.flip(damaged);

        let readers: Vec<_> = (0..8)
            .map(|_| {
                let store = Arc::clone(&store);
                tokio::spawn(async move { store.read(0, (damaged - 100) as u64, 1000).await })
            })
            .collect();
        let other = store.read(0, 100, 5000).await.expect("reading file a");
        assert_eq!(
            other.as_ref(),
            &layer.data[100..5100],
            "{backend:?}: file a"
        );
        for reader in readers {
            let bytes = reader
                .await
                .expect("a reader task panicked")
                .unwrap_or_else(|error| panic!("{backend:?}: read of the damaged block: {error}"));
            assert_eq!(
                bytes.as_ref(),
                &layer.data[damaged - 100..damaged + 900],
                "{backend:?}: damaged block"
            );
        }
        let stats = store.stats();
        assert_eq!(stats.whole_layer_refetches, 1, "{backend:?}: {stats:?}");
        assert_eq!(
            stats.whole_layer_chunks_repaired, 1,
            "{backend:?}: {stats:?}"
        );
        assert_eq!(stats.cache_checksum_failures, 1, "{backend:?}: {stats:?}");
        assert_eq!(source.requests(), 1, "{backend:?}: blob requests");
        assert_eq!(
            std::fs::read(layer.cache_file()).expect("reading the cache file"),
            layer.data,
            "{backend:?}: cache file after the repair"
        );

        layer.flip(7);
        let bytes = store.read(0, 0, 4096).await.expect("reading file a again");
        assert_eq!(bytes.as_ref(), &layer.data[..4096], "{backend:?}: file a");
        let stats = store.stats();
        assert_eq!(stats.whole_layer_refetches, 2, "{backend:?}: {stats:?}");
        assert_eq!(stats.cache_checksum_failures, 2, "{backend:?}: {stats:?}");
        assert_eq!(source.requests(), 2, "{backend:?}: blob requests");
    }
}

/// A repair cannot succeed because the source fails or sends a blob that does not match
/// its digest. The read of the damaged block fails with the repair's error and the other
/// file is still served. A second read within the back-off fails without another download.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_layer_repair_failures() {
    for case in ["source fails", "blob damaged"] {
        let layer = UnpackedLayer::new();
        let source = layer.source(Duration::ZERO);
        let store = layer.open(Arc::clone(&source), IoBackendChoice::Std);
        if case == "source fails" {
            source.set_failing(true);
        } else {
            source.corrupt(layer.blob.len() / 2);
        }
        let damaged = SIZE_A + 500;
        layer.flip(damaged);

        for attempt in ["first", "second"] {
            let error = store
                .read(0, damaged as u64, 1)
                .await
                .expect_err("the damaged block is not served");
            let ReadError::WholeLayerRepair {
                data_offset, chain, ..
            } = &error
            else {
                panic!("{case}, {attempt} read: unexpected error {error}");
            };
            // The error names the start of the 4 KiB check block, counted from file b's
            // start, that holds the flipped byte.
            let block_start = SIZE_A + (damaged - SIZE_A) / 4096 * 4096;
            assert_eq!(*data_offset, block_start as u64, "{case}: {error}");
            let expected = if case == "source fails" {
                "connection reset by peer"
            } else {
                "does not match its digest"
            };
            assert!(chain.contains(expected), "{case}: {error}");
        }
        let other = store
            .read(0, 0, SIZE_A as u64)
            .await
            .expect("reading file a");
        assert_eq!(other.as_ref(), &layer.data[..SIZE_A], "{case}: file a");

        let stats = store.stats();
        assert_eq!(stats.whole_layer_refetches, 1, "{case}: {stats:?}");
        assert_eq!(stats.whole_layer_chunks_repaired, 0, "{case}: {stats:?}");
        assert_eq!(stats.cache_checksum_failures, 1, "{case}: {stats:?}");
        assert_eq!(source.requests(), 1, "{case}: blob requests");
    }
}
