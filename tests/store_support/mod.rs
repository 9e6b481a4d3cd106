//! Test doubles and blob builders shared by the chunk store tests.

#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use esgz_nbd::layer::{ChunkRecord, ChunkSource, LayerIndex};
use esgz_nbd::source::BlobSource;
use flate2::write::GzEncoder;
use flate2::Compression;
use futures::future::BoxFuture;
use futures::FutureExt;
use sha2::{Digest, Sha256};

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Stand-in for a registry: serves a blob from memory and records every Range request.
pub struct CountingRegistryDouble {
    data: Mutex<Vec<u8>>,
    requests: AtomicU64,
    bytes: AtomicU64,
    ranges: Mutex<Vec<(u64, u64)>>,
    delay: Duration,
    failing: AtomicBool,
}

impl CountingRegistryDouble {
    pub fn new(data: Vec<u8>) -> Arc<Self> {
        Self::with_delay(data, Duration::ZERO)
    }

    /// Delays each response by `delay`, so concurrent readers overlap.
    pub fn with_delay(data: Vec<u8>, delay: Duration) -> Arc<Self> {
        Arc::new(CountingRegistryDouble {
            data: Mutex::new(data),
            requests: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            ranges: Mutex::new(Vec::new()),
            delay,
            failing: AtomicBool::new(false),
        })
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }

    /// Requested `(offset, len)` pairs in arrival order.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.ranges.lock().expect("ranges lock").clone()
    }

    /// Makes every following request fail (as after exhausted retries) or succeed again.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Flips one byte of the blob.
    pub fn corrupt(&self, offset: usize) {
        self.data.lock().expect("data lock")[offset] ^= 0xff;
    }
}

impl BlobSource for CountingRegistryDouble {
    fn size(&self) -> u64 {
        self.data.lock().expect("data lock").len() as u64
    }

    fn read_range(&self, offset: u64, len: u64) -> BoxFuture<'_, anyhow::Result<Bytes>> {
        async move {
            self.requests.fetch_add(1, Ordering::SeqCst);
            self.ranges.lock().expect("ranges lock").push((offset, len));
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            if self.failing.load(Ordering::SeqCst) {
                return Err(anyhow::anyhow!("connection reset by peer")
                    .context("GET blob failed after 3 attempts"));
            }
            let data = self.data.lock().expect("data lock");
            let start = usize::try_from(offset)?;
            let end = start + usize::try_from(len)?;
            anyhow::ensure!(
                end <= data.len(),
                "range {start}..{end} past the blob end {}",
                data.len()
            );
            self.bytes.fetch_add(len, Ordering::SeqCst);
            Ok(Bytes::copy_from_slice(&data[start..end]))
        }
        .boxed()
    }
}

/// Stand-in for a registry link that stalls: a streamed range sends its bytes up to
/// `gate_at`, then waits until [`GatedRegistryDouble::open_gate`] before sending the
/// rest. A real link cannot hold a body at a chosen byte on demand, so this is a fake.
pub struct GatedRegistryDouble {
    data: Vec<u8>,
    gate_at: u64,
    gate: tokio::sync::Semaphore,
    pub requests: AtomicU64,
}

impl GatedRegistryDouble {
    pub fn new(data: Vec<u8>, gate_at: u64) -> Arc<Self> {
        Arc::new(GatedRegistryDouble {
            data,
            gate_at,
            gate: tokio::sync::Semaphore::new(0),
            requests: AtomicU64::new(0),
        })
    }

    /// Lets every stalled and later range send its remaining bytes.
    pub fn open_gate(&self) {
        self.gate.add_permits(1 << 20);
    }

    fn slice(&self, start: u64, end: u64) -> anyhow::Result<Bytes> {
        let (start, end) = (usize::try_from(start)?, usize::try_from(end)?);
        anyhow::ensure!(
            end <= self.data.len(),
            "range {start}..{end} past the blob end"
        );
        Ok(Bytes::copy_from_slice(&self.data[start..end]))
    }
}

impl BlobSource for GatedRegistryDouble {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_range(&self, offset: u64, len: u64) -> BoxFuture<'_, anyhow::Result<Bytes>> {
        async move {
            self.requests.fetch_add(1, Ordering::SeqCst);
            self.slice(offset, offset + len)
        }
        .boxed()
    }

    fn stream_range<'a>(
        &'a self,
        offset: u64,
        len: u64,
        sink: &'a tokio::sync::mpsc::Sender<Bytes>,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        async move {
            self.requests.fetch_add(1, Ordering::SeqCst);
            let end = offset + len;
            let split = self.gate_at.clamp(offset, end);
            if split > offset {
                sink.send(self.slice(offset, split)?).await?;
            }
            if end > split {
                let _permit = self.gate.acquire().await?;
                sink.send(self.slice(split, end)?).await?;
            }
            Ok(())
        }
        .boxed()
    }
}

/// Stand-in for a registry that serves a blob file from disk and counts requests.
pub struct FileRegistryDouble {
    file: File,
    size: u64,
    pub requests: AtomicU64,
}

impl FileRegistryDouble {
    pub fn open(path: &std::path::Path) -> Arc<Self> {
        let file = File::open(path).expect("open blob file");
        let size = file.metadata().expect("stat blob file").len();
        Arc::new(FileRegistryDouble {
            file,
            size,
            requests: AtomicU64::new(0),
        })
    }
}

impl BlobSource for FileRegistryDouble {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_range(&self, offset: u64, len: u64) -> BoxFuture<'_, anyhow::Result<Bytes>> {
        async move {
            self.requests.fetch_add(1, Ordering::SeqCst);
            let mut buffer = vec![0u8; usize::try_from(len)?];
            self.file.read_exact_at(&mut buffer, offset)?;
            Ok(Bytes::from(buffer))
        }
        .boxed()
    }
}

/// One gzip member of a test blob: its chunks, each followed by filler in place of
/// tar padding and the next entry's headers.
pub struct MemberSpec {
    pub chunks: Vec<Vec<u8>>,
    /// gzip level; 0 stores the bytes, so a flipped byte changes data, not the deflate stream.
    pub level: u32,
}

/// A blob built like an eStargz layer and the chunk table describing it.
pub struct TestBlob {
    pub blob: Vec<u8>,
    pub index: LayerIndex,
    /// The layer's whole data space.
    pub data: Vec<u8>,
    /// Compressed start of each member.
    pub member_offsets: Vec<u64>,
}

pub const FILLER: usize = 700;

pub fn build_blob(digest: &str, members: &[MemberSpec]) -> TestBlob {
    let mut blob = Vec::new();
    let mut data = Vec::new();
    let mut pending: Vec<(Vec<u8>, u64, String)> = Vec::new();
    let mut member_offsets = Vec::new();
    let mut chunks = Vec::new();

    for (m, member) in members.iter().enumerate() {
        let offset = blob.len() as u64;
        member_offsets.push(offset);
        let mut plain = Vec::new();
        for (c, chunk) in member.chunks.iter().enumerate() {
            pending.push((
                chunk.clone(),
                plain.len() as u64,
                format!("dir/file{m}_{c}"),
            ));
            plain.extend_from_slice(chunk);
            plain.extend(std::iter::repeat_n(b'#', FILLER));
        }
        blob.extend(gzip(&plain, member.level));

        let end = blob.len() as u64;
        for (chunk, inner_offset, name) in pending.drain(..) {
            let source = ChunkSource::Member {
                compressed_offset: offset,
                compressed_end: end,
                inner_offset,
            };
            let record = ChunkRecord::new(
                data.len() as u64,
                chunk.len() as u64,
                source,
                Some(sha256(&chunk)),
                name.into(),
            )
            .expect("chunk record");
            chunks.push(record);
            data.extend_from_slice(&chunk);
        }
    }
    // A trailing member represents the TOC and footer.
    blob.extend(gzip(b"stargz.index.json would be here", 6));

    let index = LayerIndex {
        digest: digest.to_string(),
        chunks,
        data_size: data.len() as u64,
        ..LayerIndex::default()
    };
    TestBlob {
        blob,
        index,
        data,
        member_offsets,
    }
}

pub fn gzip(data: &[u8], level: u32) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::new(level));
    encoder.write_all(data).expect("write to a Vec");
    encoder.finish().expect("finish a Vec")
}

/// Deterministic distinct bytes: a running counter in text, `len` bytes long.
pub fn content(seed: u32, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(format!("{seed}:{i};").as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

pub fn layer_digest(n: u8) -> String {
    format!("sha256:{}", hex::encode([n; 32]))
}
