//! TOC parsing and index building: the Debian bookworm minbase TOC and a synthetic TOC
//! of one million small files, through `estargz::build_index`, and the Debian TOC from
//! its gzip member, as `serve` reads it, through `estargz::read_toc_index` and through
//! `extract_toc_json` followed by `build_index`.

#[path = "../tests/synthetic/mod.rs"]
mod synthetic;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::io::Write;

use esgz_nbd::estargz::{build_index, extract_toc_json, read_toc_index, TocLimits, TOC_TAR_NAME};

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

    let member = toc_member(&debian);
    group.throughput(Throughput::Bytes(debian.len() as u64));
    group.bench_function("debian_member_extract_then_build", |b| {
        b.iter(|| {
            let limits = TocLimits::default();
            let json = extract_toc_json(&member, limits.max_toc_bytes).expect("valid member");
            build_index(0, "sha256:bench", &json, TOC_OFFSET, &limits).expect("valid TOC")
        })
    });
    group.bench_function("debian_member_streamed", |b| {
        b.iter(|| {
            read_toc_index(
                0,
                "sha256:bench",
                &member,
                TOC_OFFSET,
                &TocLimits::default(),
            )
            .expect("valid member")
            .index
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

/// Wraps `json` as an eStargz TOC member: a tar holding `stargz.index.json`, gzipped.
fn toc_member(json: &[u8]) -> Vec<u8> {
    let mut header = tar::Header::new_ustar();
    header.set_size(json.len() as u64);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    let mut builder = tar::Builder::new(Vec::new());
    builder
        .append_data(&mut header, TOC_TAR_NAME, json)
        .expect("build the TOC tar");
    let tar = builder.into_inner().expect("finish the TOC tar");
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(&tar).expect("gzip the TOC tar");
    encoder.finish().expect("finish the TOC gzip member")
}

criterion_group!(benches, bench_toc);
criterion_main!(benches);
