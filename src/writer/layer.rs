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
        // The member stays open. The next file's content joins it only when
        // packing applies, and otherwise starts a new member.
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

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;
    use crate::estargz::{build_index, extract_toc_json, parse_footer, TocLimits, FOOTER_SIZE};
    use crate::layer::ChunkSource;

    fn file(name: &str, content: &[u8]) -> (SourceEntry, Vec<u8>) {
        let mut meta = EntryMeta::regular(name, content.len() as u64);
        meta.mtime = 1_700_000_000;
        meta.mtime_nsec = 250_000_000;
        let entry = SourceEntry {
            meta,
            content: Content::None,
        };
        (entry, content.to_vec())
    }

    /// Writes the files through a spooled tar and returns the blob.
    fn write(files: &[(SourceEntry, Vec<u8>)], options: &WriterOptions) -> (Vec<u8>, LayerSummary) {
        let dir = tempfile::tempdir().unwrap();
        let tar_path = dir.path().join("in.tar");
        let mut tar = Vec::new();
        let mut entries = Vec::new();
        for (entry, content) in files {
            tar.extend_from_slice(&encode_header(&entry.meta).unwrap());
            let mut entry = entry.clone();
            if !content.is_empty() {
                entry.content = Content::TarRange {
                    offset: tar.len() as u64,
                    len: content.len() as u64,
                };
            }
            tar.extend_from_slice(content);
            tar.resize(tar.len() + padding(content.len() as u64) as usize, 0);
            entries.push(entry);
        }
        std::fs::write(&tar_path, &tar).unwrap();
        let mut blob = Vec::new();
        let summary = write_layer(entries, Some(&tar_path), &mut blob, options, &|_| {}).unwrap();
        (blob, summary)
    }

    /// Decompresses the member at `offset` and returns `len` bytes after `inner`.
    fn member_bytes(blob: &[u8], offset: u64, inner: u64, len: u64) -> Vec<u8> {
        let mut decoder = flate2::read::GzDecoder::new(&blob[offset as usize..]);
        let mut output = vec![0u8; (inner + len) as usize];
        decoder.read_exact(&mut output).unwrap();
        output.split_off(inner as usize)
    }

    #[test]
    fn chunks_and_packing_read_back() {
        let big: Vec<u8> = (0..10_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let files = vec![
            file("big.bin", &big),
            file("a.txt", b"alpha"),
            file("b.txt", b"bravo!"),
            file("empty", b""),
            file("c.txt", b"charlie"),
        ];
        struct Case {
            name: &'static str,
            min_chunk_size: u64,
            packed: bool,
        }
        let cases = [
            Case {
                name: "one_member_per_file",
                min_chunk_size: 0,
                packed: false,
            },
            Case {
                name: "small_files_packed",
                min_chunk_size: 4096,
                packed: true,
            },
        ];
        for case in cases {
            let options = WriterOptions {
                chunk_size: 16_384,
                compression_level: 6,
                min_chunk_size: case.min_chunk_size,
                threads: 2,
                ..WriterOptions::default()
            };
            let (blob, summary) = write(&files, &options);
            assert_eq!(blob.len() as u64, summary.blob_size, "case {}", case.name);

            let tail = &blob[blob.len() - FOOTER_SIZE as usize..];
            let footer = parse_footer(tail, blob.len() as u64).unwrap();
            assert_eq!(footer.toc_offset, summary.toc_offset, "case {}", case.name);
            let toc_json = extract_toc_json(
                &blob[footer.toc_offset as usize..blob.len() - FOOTER_SIZE as usize],
                1 << 20,
            )
            .unwrap();
            assert_eq!(
                format!("sha256:{}", hex::encode(Sha256::digest(&toc_json))),
                summary.toc_digest,
                "case {}",
                case.name
            );

            let index = build_index(
                1,
                &summary.blob_digest,
                &toc_json,
                footer.toc_offset,
                &TocLimits::default(),
            )
            .unwrap();
            let names: Vec<String> = index
                .entries
                .iter()
                .map(|entry| String::from_utf8_lossy(entry.path.as_bytes()).into_owned())
                .collect();
            assert_eq!(
                names,
                ["big.bin", "a.txt", "b.txt", "empty", "c.txt"],
                "case {}",
                case.name
            );
            assert_eq!(
                index.entries[0].meta.mtime_nsec, 250_000_000,
                "case {}",
                case.name
            );

            // Every chunk decompresses to the input bytes at its data offset.
            let data: Vec<u8> = [&big[..], b"alpha", b"bravo!", b"charlie"].concat();
            assert_eq!(index.data_size, data.len() as u64, "case {}", case.name);
            let mut inner_offsets = Vec::new();
            for chunk in &index.chunks {
                let ChunkSource::Member {
                    compressed_offset,
                    inner_offset,
                    ..
                } = chunk.source()
                else {
                    panic!("case {}: chunk without a member", case.name);
                };
                inner_offsets.push(inner_offset);
                let expected =
                    &data[chunk.data_offset as usize..(chunk.data_offset + chunk.size) as usize];
                assert_eq!(
                    member_bytes(&blob, compressed_offset, inner_offset, chunk.size),
                    expected,
                    "case {}: chunk at {}",
                    case.name,
                    chunk.data_offset
                );
            }
            assert_eq!(index.chunks.len(), 3 + 3, "case {}", case.name);
            let packed = inner_offsets.iter().any(|&inner| inner > 0);
            assert_eq!(
                packed, case.packed,
                "case {}: inner offsets {inner_offsets:?}",
                case.name
            );

            // The whole blob is one tar.gz whose digest is the diff ID.
            let mut tar = Vec::new();
            flate2::read::MultiGzDecoder::new(&blob[..])
                .read_to_end(&mut tar)
                .unwrap();
            assert_eq!(
                tar.len() as u64,
                summary.uncompressed_size,
                "case {}",
                case.name
            );
            assert_eq!(
                format!("sha256:{}", hex::encode(Sha256::digest(&tar))),
                summary.diff_id,
                "case {}",
                case.name
            );
        }
    }

    #[test]
    fn file_shorter_than_header_is_rejected() {
        let (mut entry, _) = file("short", b"abc");
        entry.meta.size = 10;
        let dir = tempfile::tempdir().unwrap();
        let tar_path = dir.path().join("in.tar");
        std::fs::write(&tar_path, b"abc").unwrap();
        entry.content = Content::TarRange { offset: 0, len: 10 };
        let error = write_layer(
            vec![entry],
            Some(&tar_path),
            Vec::new(),
            &WriterOptions::default(),
            &|_| {},
        )
        .unwrap_err();
        assert!(
            matches!(
                error,
                WriterError::ContentChanged {
                    read: 3,
                    expected: 10,
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn invalid_options_are_rejected() {
        for options in [
            WriterOptions {
                chunk_size: 0,
                ..WriterOptions::default()
            },
            WriterOptions {
                compression_level: 10,
                ..WriterOptions::default()
            },
        ] {
            let error = write_layer(Vec::new(), None, Vec::new(), &options, &|_| {}).unwrap_err();
            assert!(
                matches!(error, WriterError::InvalidOption { .. }),
                "{error}"
            );
        }
    }
}
