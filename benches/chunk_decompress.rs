//! Throughput of chunk decoding: gunzip of a 4 MiB eStargz chunk's gzip member plus its
//! sha256, the CPU work of one cache miss.

use std::io::Write;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use esgz_nbd::store::chunk::{decode_member, sha256};
use flate2::write::GzEncoder;
use flate2::Compression;

const CHUNK_SIZE: usize = 4 * 1024 * 1024;

/// Text lines with a running counter: compresses about like source code and logs.
fn text_chunk() -> Vec<u8> {
    let mut data = Vec::with_capacity(CHUNK_SIZE + 64);
    let mut line = 0u64;
    while data.len() < CHUNK_SIZE {
        data.extend_from_slice(
            format!("line {line:010} of a compressible benchmark chunk\n").as_bytes(),
        );
        line += 1;
    }
    data.truncate(CHUNK_SIZE);
    data
}

/// Counter-mode sha256 output: incompressible, like already compressed files.
fn random_chunk() -> Vec<u8> {
    let mut data = Vec::with_capacity(CHUNK_SIZE);
    let mut block = 0u64;
    while data.len() < CHUNK_SIZE {
        data.extend_from_slice(&sha256(&block.to_le_bytes()));
        block += 1;
    }
    data
}

fn gzip(data: &[u8], level: u32) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::new(level));
    encoder.write_all(data).expect("write to a Vec");
    // A member also contains tar padding and the next headers after the chunk.
    encoder.write_all(&[0u8; 1024]).expect("write to a Vec");
    encoder.finish().expect("finish a Vec")
}

fn bench_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("chunk_decompress");
    group.throughput(Throughput::Bytes(CHUNK_SIZE as u64));
    group.sample_size(20);

    for (name, data) in [("text", text_chunk()), ("random", random_chunk())] {
        let expected = sha256(&data);
        let member = gzip(&data, 6);
        group.bench_with_input(
            BenchmarkId::new("gunzip_sha256", name),
            &member,
            |b, member| {
                b.iter(|| {
                    let decoded = decode_member(member, CHUNK_SIZE as u64).expect("valid member");
                    assert_eq!(sha256(&decoded), expected);
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench_decode);
criterion_main!(benches);
