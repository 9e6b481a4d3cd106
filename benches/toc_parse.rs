//! TOC parsing and index building: the Debian bookworm minbase TOC and a synthetic TOC
//! of one million small files, through `estargz::build_index`.

#[path = "../tests/synthetic/mod.rs"]
mod synthetic;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use esgz_nbd::estargz::{build_index, TocLimits};

const DEBIAN_TOC: &str = "/work/shared/images/debian-bookworm-minbase/layer.toc.json";
/// A TOC offset past every member offset in the TOCs below.
const TOC_OFFSET: u64 = 1 << 40;

fn bench_toc(c: &mut Criterion) {
    let mut group = c.benchmark_group("toc_parse");
    group.sample_size(10);

    let debian = std::fs::read(DEBIAN_TOC).expect("read the Debian TOC");
    group.throughput(Throughput::Bytes(debian.len() as u64));
    group.bench_function("debian_bookworm_minbase", |b| {
        b.iter(|| {
            build_index(
                0,
                "sha256:bench",
                &debian,
                TOC_OFFSET,
                &TocLimits::default(),
            )
            .expect("valid TOC")
        })
    });

    let million = synthetic::synthetic_toc_json(1_000_000, 8);
    group.throughput(Throughput::Bytes(million.len() as u64));
    group.bench_function("synthetic_1m_entries", |b| {
        b.iter(|| {
            build_index(
                0,
                "sha256:bench",
                &million,
                TOC_OFFSET,
                &TocLimits::default(),
            )
            .expect("valid TOC")
        })
    });
    group.finish();
}

criterion_group!(benches, bench_toc);
criterion_main!(benches);
