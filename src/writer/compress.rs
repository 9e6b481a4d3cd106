//! Parallel gzip member compression with in-order output, and the eStargz
//! footer (eStargz spec, containerd/stargz-snapshotter docs/estargz.md).

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::mpsc;
use std::sync::Arc;

use flate2::write::GzEncoder;
use flate2::Compression;
use sha2::{Digest, Sha256};

use super::WriterError;

/// Compresses members on a thread pool and writes them in submission order.
///
/// At most `max_in_flight` members are queued or compressing at once, so
/// memory stays near `max_in_flight` times the largest member.
pub struct MemberSink<W: Write> {
    out: W,
    pool: Arc<rayon::ThreadPool>,
    level: Compression,
    max_in_flight: usize,
    submitted: usize,
    /// Compressed members that finished out of order, by index.
    ready: BTreeMap<usize, Vec<u8>>,
    sender: mpsc::Sender<(usize, io::Result<Vec<u8>>)>,
    receiver: mpsc::Receiver<(usize, io::Result<Vec<u8>>)>,
    /// Blob offset of each member written so far; its length is the index
    /// of the next member to write.
    offsets: Vec<u64>,
    written: u64,
    blob_hasher: Sha256,
}

impl<W: Write> MemberSink<W> {
    pub fn new(out: W, pool: Arc<rayon::ThreadPool>, level: u32, max_in_flight: usize) -> Self {
        let (sender, receiver) = mpsc::channel();
        MemberSink {
            out,
            pool,
            level: Compression::new(level),
            max_in_flight: max_in_flight.max(1),
            submitted: 0,
            ready: BTreeMap::new(),
            sender,
            receiver,
            offsets: Vec::new(),
            written: 0,
            blob_hasher: Sha256::new(),
        }
    }

    /// Index the next submitted member gets.
    pub fn next_index(&self) -> usize {
        self.submitted
    }

    /// Queues `data` as one gzip member; returns its index.
    pub fn submit(&mut self, data: Vec<u8>) -> Result<usize, WriterError> {
        let index = self.submitted;
        self.submitted += 1;
        let sender = self.sender.clone();
        let level = self.level;
        self.pool.spawn(move || {
            let result = compress_member(&data, level);
            // The receiver lives as long as the sink; a send error means the
            // sink was dropped after a failure and the result is not needed.
            let _ = sender.send((index, result));
        });
        while self.submitted - self.offsets.len() > self.max_in_flight {
            self.wait_one()?;
        }
        Ok(index)
    }

    /// Waits for every queued member and returns the blob offset of each.
    pub fn flush_members(&mut self) -> Result<&[u64], WriterError> {
        while self.offsets.len() < self.submitted {
            self.wait_one()?;
        }
        Ok(&self.offsets)
    }

    /// Compressed bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Writes bytes that are already compressed (the TOC member, the
    /// footer) after all queued members.
    pub fn write_raw(&mut self, bytes: &[u8]) -> Result<(), WriterError> {
        self.flush_members()?;
        self.write_out(bytes)
    }

    /// Flushes the output and returns it with the blob's sha256.
    pub fn finish(mut self) -> Result<(W, [u8; 32]), WriterError> {
        self.flush_members()?;
        self.out
            .flush()
            .map_err(|source| WriterError::Output { source })?;
        Ok((self.out, self.blob_hasher.finalize().into()))
    }

    fn wait_one(&mut self) -> Result<(), WriterError> {
        let (index, result) = self
            .receiver
            .recv()
            .map_err(|_| WriterError::CompressionWorker)?;
        let compressed = result.map_err(|source| WriterError::Compress { source })?;
        self.ready.insert(index, compressed);
        while let Some(member) = self.ready.remove(&self.offsets.len()) {
            self.offsets.push(self.written);
            self.write_out(&member)?;
        }
        Ok(())
    }

    fn write_out(&mut self, bytes: &[u8]) -> Result<(), WriterError> {
        self.out
            .write_all(bytes)
            .map_err(|source| WriterError::Output { source })?;
        self.blob_hasher.update(bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }
}

/// Compresses `data` into one gzip member.
pub fn compress_member(data: &[u8], level: Compression) -> io::Result<Vec<u8>> {
    let mut encoder = GzEncoder::new(Vec::with_capacity(data.len() / 2 + 64), level);
    encoder.write_all(data)?;
    encoder.finish()
}

/// gzip header bytes of the footer: magic 1f 8b, method 8 (deflate), flags
/// FEXTRA (0x04), mtime 0, extra flags 0, OS 255 (unknown).
const FOOTER_GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff];
/// An empty final stored deflate block (BFINAL=1, BTYPE=00, LEN 0, NLEN 0xffff).
const EMPTY_STORED_BLOCK: [u8; 5] = [0x01, 0x00, 0x00, 0xff, 0xff];

/// Returns the 51-byte eStargz footer naming `toc_offset`: an empty gzip
/// member whose extra field holds subfield `SG` with the payload
/// `%016x` TOC offset followed by `STARGZ`.
pub fn footer(toc_offset: u64) -> [u8; 51] {
    let payload = format!("{toc_offset:016x}STARGZ");
    let mut bytes = [0u8; 51];
    bytes[..10].copy_from_slice(&FOOTER_GZIP_HEADER);
    // XLEN: the 4-byte subfield header plus the 22-byte payload.
    bytes[10..12].copy_from_slice(&26u16.to_le_bytes());
    bytes[12..14].copy_from_slice(b"SG");
    bytes[14..16].copy_from_slice(&22u16.to_le_bytes());
    bytes[16..38].copy_from_slice(payload.as_bytes());
    bytes[38..43].copy_from_slice(&EMPTY_STORED_BLOCK);
    // CRC32 and ISIZE of the empty output are both 0 (bytes 43..51).
    bytes
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;
    use crate::estargz::{parse_footer, FOOTER_SIZE};

    #[test]
    fn footer_parses_back() {
        for offset in [10u64, 131, 0x1234_5678_9abc] {
            let bytes = footer(offset);
            let parsed = parse_footer(&bytes, offset + 100 + FOOTER_SIZE).unwrap();
            assert_eq!(parsed.toc_offset, offset);
            assert_eq!(parsed.footer_size, FOOTER_SIZE);
        }
    }

    #[test]
    fn members_come_out_in_order() {
        let pool = Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(2)
                .build()
                .unwrap(),
        );
        let mut sink = MemberSink::new(Vec::new(), pool, 6, 2);
        let inputs: Vec<Vec<u8>> = (0..20u8)
            .map(|index| vec![index; 1000 + 5000 * usize::from(index % 3)])
            .collect();
        for input in &inputs {
            sink.submit(input.clone()).unwrap();
        }
        let offsets = sink.flush_members().unwrap().to_vec();
        let (blob, _) = sink.finish().unwrap();
        assert_eq!(offsets.len(), inputs.len());

        for (index, input) in inputs.iter().enumerate() {
            let end = offsets.get(index + 1).copied().unwrap_or(blob.len() as u64);
            let member = &blob[offsets[index] as usize..end as usize];
            let mut output = Vec::new();
            flate2::read::GzDecoder::new(member)
                .read_to_end(&mut output)
                .unwrap();
            assert_eq!(&output, input, "member {index}");
        }
    }
}
