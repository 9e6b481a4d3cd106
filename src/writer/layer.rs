//! Emission of one eStargz layer: tar headers and contents cut into gzip
//! members, the TOC member and the footer.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;

use flate2::Compression;
use sha2::{Digest, Sha256};
use tracing::debug;

use super::compress::{compress_member, footer, MemberSink};
use super::entry::{Content, EntryMeta, EntryType, SourceEntry};
use super::order::order_entries;
use super::tarfmt::{encode_header, padding, END_OF_ARCHIVE};
use super::toc::{TocDocument, TocEntry};
use super::{LayerSummary, WriterError, WriterOptions};
use crate::estargz::{NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME, TOC_VERSION};

/// Content of the landmark files: one byte, 0x0f, as the reference writer
/// stores it.
const LANDMARK_CONTENT: [u8; 1] = [0x0f];

/// Writes `entries` as an eStargz blob to `out`.
///
/// `tar` is the spooled input tar that [`Content::TarRange`] entries point
/// into. `progress` is called with the number of input bytes processed so far.
pub fn write_layer<W: Write>(
    entries: Vec<SourceEntry>,
    tar: Option<&Path>,
    out: W,
    options: &WriterOptions,
    progress: &dyn Fn(u64),
) -> Result<LayerSummary, WriterError> {
    options.validate()?;
    let threads = match options.threads {
        0 => std::thread::available_parallelism().map_or(1, |count| count.get()),
        count => count,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|index| format!("esgz-gzip-{index}"))
        .build()
        .map_err(|error| WriterError::ThreadPool {
            reason: error.to_string(),
        })?;
    let tar_file = match tar {
        Some(path) => Some(File::open(path).map_err(|source| WriterError::Input {
            path: path.to_path_buf(),
            source,
        })?),
        None => None,
    };

    let ordered = order_entries(entries, &options.prioritized);
    let mut emitter = Emitter {
        sink: MemberSink::new(
            out,
            Arc::new(pool),
            options.compression_level,
            threads * 2 + 1,
        ),
        options,
        current: Vec::new(),
        current_is_data: false,
        toc: Vec::new(),
        member_refs: Vec::new(),
        diff_hasher: Sha256::new(),
        uncompressed: 0,
        tar: tar_file,
        progress,
        processed: 0,
    };

    if ordered.prioritized_count == 0 {
        emitter.add_landmark(NO_PREFETCH_LANDMARK)?;
    }
    for (position, entry) in ordered.entries.iter().enumerate() {
        emitter.add_entry(entry, position < ordered.prioritized_count)?;
        if position + 1 == ordered.prioritized_count {
            emitter.add_landmark(PREFETCH_LANDMARK)?;
        }
    }
    let mut summary = emitter.finish()?;
    summary.missed_prioritized = ordered.missed;
    Ok(summary)
}

/// State while the layer's members are assembled.
struct Emitter<'a, W: Write> {
    sink: MemberSink<W>,
    options: &'a WriterOptions,
    /// Uncompressed bytes of the member being assembled.
    current: Vec<u8>,
    /// Whether `current` started with file content (and may take more small
    /// files under `min_chunk_size`).
    current_is_data: bool,
    toc: Vec<TocEntry>,
    /// For each TOC entry, the index of the member holding its data.
    member_refs: Vec<Option<usize>>,
    diff_hasher: Sha256,
    uncompressed: u64,
    tar: Option<File>,
    progress: &'a dyn Fn(u64),
    processed: u64,
}

impl<W: Write> Emitter<'_, W> {
    fn add_landmark(&mut self, name: &str) -> Result<(), WriterError> {
        let mut meta = EntryMeta::regular(name, LANDMARK_CONTENT.len() as u64);
        meta.mode = 0o644;
        let mut reader: &[u8] = &LANDMARK_CONTENT;
        self.add_with_reader(&meta, Some(&mut reader), false)
    }

    fn add_entry(&mut self, entry: &SourceEntry, prioritized: bool) -> Result<(), WriterError> {
        let meta = &entry.meta;
        if meta.kind != EntryType::Reg || meta.size == 0 {
            return self.add_with_reader(meta, None, false);
        }

        match &entry.content {
            Content::None => Err(WriterError::ContentChanged {
                name: meta.display_name(),
                read: 0,
                expected: meta.size,
            }),
            Content::TarRange { offset, len } => {
                let name = meta.display_name();
                // The handle is moved out for the read so that `self` stays borrowable.
                let mut file = self
                    .tar
                    .take()
                    .ok_or(WriterError::MissingTar { name: name.clone() })?;
                let result = match file.seek(SeekFrom::Start(*offset)) {
                    Ok(_) => {
                        let mut reader = BufReader::with_capacity(1 << 20, (&mut file).take(*len));
                        self.add_with_reader(meta, Some(&mut reader), !prioritized)
                    }
                    Err(source) => Err(WriterError::Content { name, source }),
                };
                self.tar = Some(file);
                result
            }
            Content::File(path) => {
                let file = File::open(path).map_err(|source| WriterError::Content {
                    name: meta.display_name(),
                    source,
                })?;
                let mut reader = BufReader::with_capacity(1 << 20, file.take(meta.size));
                self.add_with_reader(meta, Some(&mut reader), !prioritized)
            }
        }
    }

    /// Appends the entry's header and, for a non-empty regular file, its
    /// chunks from `reader`. `may_pack` allows sharing the current member
    /// under `min_chunk_size`.
    fn add_with_reader(
        &mut self,
        meta: &EntryMeta,
        reader: Option<&mut dyn Read>,
        may_pack: bool,
    ) -> Result<(), WriterError> {
        let header = encode_header(meta)?;
        self.current.extend_from_slice(&header);
        let mut toc_entry = TocEntry::from_meta(meta);

        let reader = match reader {
            Some(reader) if meta.kind == EntryType::Reg && meta.size > 0 => reader,
            _ => {
                if meta.kind == EntryType::Reg {
                    toc_entry.digest = digest_string(&Sha256::digest(b""));
                }
                self.toc.push(toc_entry);
                self.member_refs.push(None);
                return Ok(());
            }
        };

        let chunk_size = self.options.chunk_size;
        let mut file_hasher = Sha256::new();
        let mut chunk_offset = 0u64;
        let mut first_index = None;
        while chunk_offset < meta.size {
            let len = chunk_size.min(meta.size - chunk_offset);
            let mut chunk = Vec::with_capacity(len as usize + 1024);
            let read = (&mut *reader)
                .take(len)
                .read_to_end(&mut chunk)
                .map_err(|source| WriterError::Content {
                    name: meta.display_name(),
                    source,
                })?;
            if read as u64 != len {
                return Err(WriterError::ContentChanged {
                    name: meta.display_name(),
                    read: chunk_offset + read as u64,
                    expected: meta.size,
                });
            }
            file_hasher.update(&chunk);
            let chunk_digest = digest_string(&Sha256::digest(&chunk));
            let single_chunk = meta.size <= chunk_size;

            let pack = may_pack
                && single_chunk
                && self.options.min_chunk_size > 0
                && self.current_is_data
                && (self.current.len() as u64) < self.options.min_chunk_size;
            let inner_offset = if pack {
                let inner = self.current.len() as u64;
                self.current.extend_from_slice(&chunk);
                inner
            } else {
                self.flush_member()?;
                self.current = chunk;
                self.current_is_data = true;
                0
            };
            let member = self.sink.next_index();
            let recorded_size = if len == chunk_size { len } else { 0 };

            if chunk_offset == 0 {
                toc_entry.inner_offset = inner_offset;
                toc_entry.chunk_size = recorded_size;
                toc_entry.chunk_digest = chunk_digest;
                first_index = Some(self.toc.len());
                self.toc.push(toc_entry.clone());
                self.member_refs.push(Some(member));
            } else {
                self.toc.push(TocEntry {
                    name: toc_entry.name.clone(),
                    kind: "chunk",
                    chunk_offset,
                    chunk_size: recorded_size,
                    chunk_digest,
                    ..TocEntry::default()
                });
                self.member_refs.push(Some(member));
            }
            chunk_offset += len;
        }

        self.current
            .resize(self.current.len() + padding(meta.size) as usize, 0);
        if let Some(index) = first_index {
            self.toc[index].digest = digest_string(&file_hasher.finalize());
        }
        // A file that does not fill the minimum size is left open for the next
        // small file; anything else closes its member at the next content.
        Ok(())
    }

    /// Hands the assembled member to the compressor.
    fn flush_member(&mut self) -> Result<(), WriterError> {
        if self.current.is_empty() {
            return Ok(());
        }
        let data = std::mem::take(&mut self.current);
        self.diff_hasher.update(&data);
        self.uncompressed += data.len() as u64;
        self.processed += data.len() as u64;
        (self.progress)(self.processed);
        self.sink.submit(data)?;
        self.current_is_data = false;
        Ok(())
    }

    fn finish(mut self) -> Result<LayerSummary, WriterError> {
        self.flush_member()?;
        let offsets = self.sink.flush_members()?.to_vec();
        for (entry, member) in self.toc.iter_mut().zip(&self.member_refs) {
            if let Some(member) = member {
                entry.offset = offsets[*member];
            }
        }

        let toc_entries = self.toc.len();
        let document = TocDocument {
            version: TOC_VERSION,
            entries: std::mem::take(&mut self.toc),
        };
        let json =
            serde_json::to_vec(&document).map_err(|source| WriterError::TocJson { source })?;
        let toc_digest = digest_string(&Sha256::digest(&json));

        let mut toc_meta = EntryMeta::regular(TOC_TAR_NAME, json.len() as u64);
        toc_meta.mode = 0o644;
        let mut toc_tar = encode_header(&toc_meta)?;
        toc_tar.extend_from_slice(&json);
        toc_tar.resize(toc_tar.len() + padding(json.len() as u64) as usize, 0);
        toc_tar.extend_from_slice(&END_OF_ARCHIVE);
        self.diff_hasher.update(&toc_tar);
        self.uncompressed += toc_tar.len() as u64;

        let toc_member =
            compress_member(&toc_tar, Compression::new(self.options.compression_level))
                .map_err(|source| WriterError::Compress { source })?;
        let toc_offset = self.sink.written();
        self.sink.write_raw(&toc_member)?;
        self.sink.write_raw(&footer(toc_offset))?;
        let blob_size = self.sink.written();
        let (_, blob_hash) = self.sink.finish()?;

        debug!(
            toc_entries,
            blob_size,
            uncompressed = self.uncompressed,
            members = offsets.len(),
            "wrote eStargz layer"
        );
        Ok(LayerSummary {
            blob_digest: digest_string(&blob_hash),
            blob_size,
            toc_digest,
            diff_id: digest_string(&self.diff_hasher.finalize()),
            uncompressed_size: self.uncompressed,
            toc_offset,
            toc_entries,
            missed_prioritized: Vec::new(),
        })
    }
}

fn digest_string(hash: &[u8]) -> String {
    format!("sha256:{}", hex::encode(hash))
}
