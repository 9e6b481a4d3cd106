//! `esgz-nbd cache list` and `cache prune` against a cache directory filled by chunk
//! stores.

mod store_support;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use esgz_nbd::store::{ChunkStore, IoBackendChoice, StoreLayer, StoreOptions};
use store_support::{build_blob, content, layer_digest, CountingRegistryDouble, MemberSpec};

async fn fill_cache(dir: &Path, n: u8, read_chunks: usize) -> ChunkStore {
    let test_blob = build_blob(
        &layer_digest(n),
        &[
            MemberSpec {
                chunks: vec![content(u32::from(n), 70_000)],
                level: 1,
            },
            MemberSpec {
                chunks: vec![content(1000 + u32::from(n), 9000)],
                level: 6,
            },
        ],
    );
    let registry = CountingRegistryDouble::new(test_blob.blob.clone());
    let store = ChunkStore::open(
        vec![StoreLayer {
            index: Arc::new(test_blob.index.clone()),
            blob: Some(registry),
        }],
        StoreOptions {
            io: IoBackendChoice::Std,
            max_readahead: 0,
            ..StoreOptions::new(dir)
        },
    )
    .expect("open store");
    for chunk in test_blob.index.chunks.iter().take(read_chunks) {
        store
            .read(0, chunk.data_offset, chunk.size)
            .await
            .expect("read");
    }
    store
}

fn run(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_esgz-nbd"))
        .args(args)
        .env_remove("ESGZ_NBD_CACHE_DIR")
        .output()
        .expect("run esgz-nbd");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "esgz-nbd {args:?} failed: {}{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test]
async fn cache_list_and_prune_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir_arg = dir.path().to_str().expect("utf-8 path");
    drop(fill_cache(dir.path(), 21, 2).await);
    let held = fill_cache(dir.path(), 22, 1).await;

    let listing = run(&["cache", "list", "--cache-dir", dir_arg]);
    let lines: Vec<&str> = listing.lines().collect();
    assert!(lines[0].starts_with("LAYER"), "header line: {listing}");
    let idle = lines
        .iter()
        .find(|line| line.starts_with(&layer_digest(21)))
        .expect("layer 21 listed");
    assert!(idle.contains(" 2/2 "), "all chunks of layer 21: {idle}");
    assert!(idle.ends_with("idle"), "{idle}");
    let busy = lines
        .iter()
        .find(|line| line.starts_with(&layer_digest(22)))
        .expect("layer 22 listed");
    assert!(busy.contains(" 1/2 "), "one chunk of layer 22: {busy}");
    assert!(busy.ends_with("in use"), "{busy}");
    assert!(listing.contains("2 layers,"), "{listing}");

    let json = run(&["cache", "list", "--json", "--cache-dir", dir_arg]);
    let parsed: serde_json::Value = serde_json::from_str(&json).expect("JSON listing");
    assert_eq!(parsed.as_array().map(Vec::len), Some(2));

    let pruned = run(&["cache", "prune", "--cache-dir", dir_arg]);
    assert!(
        pruned.contains(&format!("removed {}", layer_digest(21))),
        "{pruned}"
    );
    assert!(
        !pruned.contains(&layer_digest(22)),
        "the layer in use stays: {pruned}"
    );

    drop(held);
    let pruned = run(&["cache", "prune", "--max-size", "1G", "--cache-dir", dir_arg]);
    assert!(
        !pruned.contains("removed"),
        "the cache fits in 1 GiB: {pruned}"
    );
    let pruned = run(&["cache", "prune", "--max-size", "0", "--cache-dir", dir_arg]);
    assert!(
        pruned.contains(&format!("removed {}", layer_digest(22))),
        "{pruned}"
    );
    let listing = run(&["cache", "list", "--cache-dir", dir_arg]);
    assert!(listing.contains("0 layers,"), "{listing}");
}
