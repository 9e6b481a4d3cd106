//! ext4 layout of the Debian bookworm minbase tree (`Layout::new`), and rendering of every
//! metadata block of that layout (`Layout::render_metadata`).

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use esgz_nbd::estargz::{build_index, TocLimits};
use esgz_nbd::ext4::{Layout, LayoutOptions, SegmentKind, BLOCK_SIZE};
use esgz_nbd::tree::{merge, Tree};

const DEBIAN_TOC: &str = "/work/shared/images/debian-bookworm-minbase/layer.toc.json";

fn debian_tree() -> Arc<Tree> {
    let toc = std::fs::read(DEBIAN_TOC).expect("read the Debian TOC");
    let index =
        build_index(0, "sha256:bench", &toc, 1 << 40, &TocLimits::default()).expect("valid TOC");
    Arc::new(merge(&[index.entries]).expect("merge one layer"))
}

fn options() -> LayoutOptions {
    LayoutOptions {
        uuid: [7; 16],
        hash_seed: [9; 16],
        volume_name: "bench".to_string(),
        extra_free_blocks: 0,
    }
}

fn bench_layout(c: &mut Criterion) {
    let tree = debian_tree();
    let mut group = c.benchmark_group("ext4");
    group.sample_size(20);
    group.bench_function("layout_debian", |b| {
        b.iter(|| Layout::new(tree.clone(), options()).expect("layout"))
    });

    let layout = Layout::new(tree.clone(), options()).expect("layout");
    let metadata_blocks: Vec<u64> = layout
        .segments(0, layout.block_count())
        .into_iter()
        .filter(|segment| segment.kind == SegmentKind::Metadata)
        .flat_map(|segment| segment.start_block..segment.start_block + segment.block_count)
        .collect();
    group.throughput(Throughput::Bytes(metadata_blocks.len() as u64 * BLOCK_SIZE));
    group.bench_function("render_all_metadata_debian", |b| {
        let mut block = vec![0u8; BLOCK_SIZE as usize];
        b.iter(|| {
            for &number in &metadata_blocks {
                layout.render_metadata(number, &mut block);
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench_layout);
criterion_main!(benches);
