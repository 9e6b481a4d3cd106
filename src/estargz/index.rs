//! Turns a parsed eStargz TOC into a [`LayerIndex`]: normalised entries and
//! the chunk table of the layer's data space (eStargz spec, TOC entries).

use std::collections::HashMap;

use base64::Engine as _;
use tracing::debug;

use super::name::normalize_name;
use super::rfc3339::parse_rfc3339;
use super::toc::{parse_toc_json, JsonEntry, TocError, TocLimits, TOC_TAR_NAME};
use crate::layer::{ChunkRecord, ChunkSource, LayerIndex, Prefetch};
use crate::tree::{EntryKind, FileData, LayerEntry, Metadata};

/// Root file marking the end of the files to prefetch.
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
/// Root file meaning "prefetch nothing".
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";

/// Parses the TOC JSON of layer `layer` and builds its index.
///
/// Each non-empty regular file gets `size` bytes of the layer's data space,
/// in TOC order. Its chunks map that range to gzip members of the blob,
/// which must all lie before `toc_offset`. Landmark files and a
/// `stargz.index.json` entry are dropped from the entries.
pub fn build_index(
    layer: u32,
    blob_digest: &str,
    toc_json: &[u8],
    toc_offset: u64,
    limits: &TocLimits,
) -> Result<LayerIndex, TocError> {
    let toc = parse_toc_json(toc_json, limits)?;
    let member_starts = member_starts(&toc.entries, toc_offset)?;

    let mut builder = IndexBuilder {
        layer,
        toc_offset,
        member_starts,
        entries: Vec::with_capacity(toc.entries.len()),
        files: Vec::new(),
        file_by_path: HashMap::new(),
        data_size: 0,
        prefetch: Prefetch::Unknown,
        landmark_pending: false,
    };
    for (index, entry) in toc.entries.iter().enumerate() {
        builder.add(index, entry)?;
    }
    if builder.landmark_pending {
        builder.prefetch = Prefetch::Before {
            compressed_offset: toc_offset,
        };
    }

    let chunks = builder.finish_chunks()?;
    debug!(
        layer,
        digest = blob_digest,
        entries = builder.entries.len(),
        chunks = chunks.len(),
        data_size = builder.data_size,
        "built eStargz layer index"
    );
    Ok(LayerIndex {
        digest: blob_digest.to_string(),
        entries: builder.entries,
        chunks,
        data_size: builder.data_size,
        prefetch: builder.prefetch,
    })
}

/// Returns whether an entry's `offset` names a gzip member holding file data.
fn has_data(entry: &JsonEntry) -> bool {
    (entry.kind == "reg" && entry.size > 0) || entry.kind == "chunk"
}

/// Collects the sorted, distinct compressed offsets of every member holding
/// data, checking each lies in `[0, toc_offset)`. A member ends where the
/// next one starts, or at the TOC.
fn member_starts(entries: &[JsonEntry], toc_offset: u64) -> Result<Vec<u64>, TocError> {
    let mut starts = Vec::new();
    for entry in entries.iter().filter(|entry| has_data(entry)) {
        let offset = non_negative(entry, "offset", entry.offset)?;
        if offset >= toc_offset {
            return Err(TocError::OffsetOutOfRange {
                name: entry.name.clone(),
                field: "offset",
                value: offset,
                toc_offset,
            });
        }
        starts.push(offset);
    }
    starts.sort_unstable();
    starts.dedup();
    Ok(starts)
}

fn non_negative(entry: &JsonEntry, field: &'static str, value: i64) -> Result<u64, TocError> {
    u64::try_from(value).map_err(|_| TocError::InvalidField {
        name: entry.name.clone(),
        field,
        value,
        reason: "must not be negative",
    })
}

fn id_field(entry: &JsonEntry, field: &'static str, value: i64) -> Result<u32, TocError> {
    u32::try_from(value).map_err(|_| TocError::InvalidField {
        name: entry.name.clone(),
        field,
        value,
        reason: "must be between 0 and 4294967295",
    })
}

/// Parses `sha256:<64 hex digits>`; an empty string is "no digest".
fn parse_digest(
    entry: &JsonEntry,
    field: &'static str,
    value: &str,
) -> Result<Option<[u8; 32]>, TocError> {
    if value.is_empty() {
        return Ok(None);
    }
    let invalid = || TocError::InvalidDigest {
        name: entry.name.clone(),
        field,
        value: value.to_string(),
    };
    let hex_digits = value.strip_prefix("sha256:").ok_or_else(invalid)?;
    let mut digest = [0u8; 32];
    hex::decode_to_slice(hex_digits, &mut digest).map_err(|_| invalid())?;
    Ok(Some(digest))
}

fn metadata(entry: &JsonEntry) -> Result<Metadata, TocError> {
    let mode = non_negative(entry, "mode", entry.mode)?;
    let (mtime, mtime_nsec) = match entry.modtime.as_deref() {
        // The reference writer omits the field for the Unix epoch.
        None | Some("") => (0, 0),
        Some(text) => parse_rfc3339(text).map_err(|source| TocError::InvalidModtime {
            name: entry.name.clone(),
            source,
        })?,
    };

    let mut xattrs = Vec::new();
    for (key, value) in entry.xattrs.iter().flatten() {
        let bytes = match value {
            None => Vec::new(),
            Some(text) => base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|source| TocError::InvalidXattr {
                    name: entry.name.clone(),
                    key: key.clone(),
                    source,
                })?,
        };
        xattrs.push((key.as_bytes().to_vec(), bytes));
    }
    xattrs.sort();

    Ok(Metadata {
        mode: (mode & 0o7777) as u16,
        uid: id_field(entry, "uid", entry.uid)?,
        gid: id_field(entry, "gid", entry.gid)?,
        mtime,
        mtime_nsec,
        xattrs,
    })
}

/// A chunk as the TOC lists it, before its size and order are checked.
struct PendingChunk {
    chunk_offset: u64,
    /// `None`: up to the end of the file.
    chunk_size: Option<u64>,
    compressed_offset: u64,
    inner_offset: u64,
    digest: Option<[u8; 32]>,
}

/// A non-empty regular file and the chunks listed for it so far.
struct PendingFile {
    name: String,
    data_offset: u64,
    size: u64,
    digest: Option<[u8; 32]>,
    chunks: Vec<PendingChunk>,
}

struct IndexBuilder {
    layer: u32,
    toc_offset: u64,
    member_starts: Vec<u64>,
    entries: Vec<LayerEntry>,
    files: Vec<PendingFile>,
    /// The latest regular file of each path, which `chunk` entries extend.
    file_by_path: HashMap<Vec<Vec<u8>>, usize>,
    data_size: u64,
    prefetch: Prefetch,
    /// A `.prefetch.landmark` without data was seen; the next data entry's
    /// offset ends the prefetch range.
    landmark_pending: bool,
}

impl IndexBuilder {
    fn add(&mut self, index: usize, entry: &JsonEntry) -> Result<(), TocError> {
        let path = normalize_name(entry.name.as_bytes())
            .map_err(|source| TocError::Name { index, source })?;

        if self.landmark_pending && has_data(entry) {
            self.prefetch = Prefetch::Before {
                compressed_offset: non_negative(entry, "offset", entry.offset)?,
            };
            self.landmark_pending = false;
        }
        if entry.kind == "chunk" {
            return self.add_chunk(entry, path);
        }
        if let [only] = path.as_slice() {
            if self.take_special(entry, only)? {
                return Ok(());
            }
        }

        let meta = metadata(entry)?;
        let kind = match entry.kind.as_str() {
            "dir" => EntryKind::Dir,
            "reg" => EntryKind::Reg {
                data: self.add_file(entry, &path)?,
            },
            "symlink" => {
                if entry.link_name.is_empty() {
                    return Err(TocError::MissingLinkName {
                        name: entry.name.clone(),
                        kind: "symlink",
                    });
                }
                EntryKind::Symlink {
                    target: entry.link_name.as_bytes().to_vec(),
                }
            }
            "hardlink" => {
                let target = normalize_name(entry.link_name.as_bytes())
                    .map_err(|source| TocError::Name { index, source })?;
                if target.is_empty() {
                    return Err(TocError::MissingLinkName {
                        name: entry.name.clone(),
                        kind: "hardlink",
                    });
                }
                EntryKind::Hardlink { target }
            }
            "char" => EntryKind::CharDev {
                major: id_field(entry, "devMajor", entry.dev_major)?,
                minor: id_field(entry, "devMinor", entry.dev_minor)?,
            },
            "block" => EntryKind::BlockDev {
                major: id_field(entry, "devMajor", entry.dev_major)?,
                minor: id_field(entry, "devMinor", entry.dev_minor)?,
            },
            "fifo" => EntryKind::Fifo,
            other => {
                return Err(TocError::UnknownType {
                    name: entry.name.clone(),
                    kind: other.to_string(),
                })
            }
        };
        self.entries.push(LayerEntry { path, kind, meta });
        Ok(())
    }

    /// Handles the root files the builder adds (landmarks, the TOC itself);
    /// returns whether the entry was one of them.
    fn take_special(&mut self, entry: &JsonEntry, name: &[u8]) -> Result<bool, TocError> {
        if name == PREFETCH_LANDMARK.as_bytes() {
            if has_data(entry) {
                self.prefetch = Prefetch::Before {
                    compressed_offset: non_negative(entry, "offset", entry.offset)?,
                };
            } else {
                self.landmark_pending = true;
            }
            return Ok(true);
        }
        if name == NO_PREFETCH_LANDMARK.as_bytes() {
            self.prefetch = Prefetch::Nothing;
            return Ok(true);
        }
        Ok(name == TOC_TAR_NAME.as_bytes())
    }

    /// Gives a regular file its range of the data space and records its
    /// first chunk.
    fn add_file(&mut self, entry: &JsonEntry, path: &[Vec<u8>]) -> Result<FileData, TocError> {
        let size = non_negative(entry, "size", entry.size)?;
        let data = FileData {
            layer: self.layer,
            data_offset: self.data_size,
            size,
        };
        if size == 0 {
            self.file_by_path.remove(path);
            return Ok(data);
        }

        self.data_size =
            self.data_size
                .checked_add(size)
                .ok_or_else(|| TocError::DataSizeOverflow {
                    name: entry.name.clone(),
                })?;
        let mut file = PendingFile {
            name: entry.name.clone(),
            data_offset: data.data_offset,
            size,
            digest: parse_digest(entry, "digest", &entry.digest)?,
            chunks: Vec::new(),
        };
        file.chunks.push(self.pending_chunk(entry)?);
        self.file_by_path.insert(path.to_vec(), self.files.len());
        self.files.push(file);
        Ok(data)
    }

    fn add_chunk(&mut self, entry: &JsonEntry, path: Vec<Vec<u8>>) -> Result<(), TocError> {
        let chunk = self.pending_chunk(entry)?;
        let file_index =
            *self
                .file_by_path
                .get(&path)
                .ok_or_else(|| TocError::ChunkWithoutFile {
                    name: entry.name.clone(),
                })?;
        self.files[file_index].chunks.push(chunk);
        Ok(())
    }

    fn pending_chunk(&self, entry: &JsonEntry) -> Result<PendingChunk, TocError> {
        let chunk_size = non_negative(entry, "chunkSize", entry.chunk_size)?;
        Ok(PendingChunk {
            chunk_offset: non_negative(entry, "chunkOffset", entry.chunk_offset)?,
            chunk_size: (chunk_size > 0).then_some(chunk_size),
            compressed_offset: non_negative(entry, "offset", entry.offset)?,
            inner_offset: non_negative(entry, "innerOffset", entry.inner_offset)?,
            digest: parse_digest(entry, "chunkDigest", &entry.chunk_digest)?,
        })
    }

    /// Checks that each file's chunks are contiguous and cover it, and
    /// returns the chunk table sorted by data offset.
    fn finish_chunks(&mut self) -> Result<Vec<ChunkRecord>, TocError> {
        let mut records = Vec::new();
        for mut file in std::mem::take(&mut self.files) {
            file.chunks.sort_by_key(|chunk| chunk.chunk_offset);
            let single = file.chunks.len() == 1;
            let layout_error = |reason: String| TocError::ChunkLayout {
                name: file.name.clone(),
                reason,
            };

            let mut expected_offset = 0u64;
            for chunk in &file.chunks {
                if chunk.chunk_offset != expected_offset {
                    return Err(layout_error(format!(
                        "a chunk starts at {} but the previous one ends at {} \
                         (chunks overlap or leave a gap)",
                        chunk.chunk_offset, expected_offset
                    )));
                }
                if chunk.chunk_offset >= file.size {
                    return Err(layout_error(format!(
                        "a chunk starts at {}, not below the file size {}",
                        chunk.chunk_offset, file.size
                    )));
                }
                let size = chunk.chunk_size.unwrap_or(file.size - chunk.chunk_offset);
                let end = chunk.chunk_offset.saturating_add(size);
                if end > file.size {
                    return Err(layout_error(format!(
                        "the chunk at {} of {} bytes ends past the file size {}",
                        chunk.chunk_offset, size, file.size
                    )));
                }

                let compressed_end = self.member_end(chunk.compressed_offset);
                let digest = match (chunk.digest, single) {
                    (Some(digest), _) => Some(digest),
                    (None, true) => file.digest,
                    (None, false) => None,
                };
                records.push(ChunkRecord {
                    data_offset: file.data_offset + chunk.chunk_offset,
                    size,
                    source: ChunkSource::Member {
                        compressed_offset: chunk.compressed_offset,
                        compressed_end,
                        inner_offset: chunk.inner_offset,
                    },
                    digest,
                    name: file.name.clone(),
                });
                expected_offset = end;
            }
            if expected_offset != file.size {
                return Err(layout_error(format!(
                    "chunks cover {} of {} bytes",
                    expected_offset, file.size
                )));
            }
        }
        records.sort_by_key(|record| record.data_offset);
        Ok(records)
    }

    /// Returns the compressed end of the member starting at `offset`: the next larger
    /// member start, or the TOC offset.
    fn member_end(&self, offset: u64) -> u64 {
        let next = self.member_starts.partition_point(|&start| start <= offset);
        self.member_starts
            .get(next)
            .copied()
            .unwrap_or(self.toc_offset)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    const TOC_OFFSET: u64 = 10_000;
    const DIGEST_A: &str =
        "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const DIGEST_B: &str =
        "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn build(entries: Value) -> Result<LayerIndex, TocError> {
        let toc = json!({ "version": 1, "entries": entries });
        let bytes = serde_json::to_vec(&toc).unwrap();
        build_index(3, "sha256:blob", &bytes, TOC_OFFSET, &TocLimits::default())
    }

    fn parts(items: &[&str]) -> Vec<Vec<u8>> {
        items.iter().map(|item| item.as_bytes().to_vec()).collect()
    }

    #[test]
    fn build_index_entry_fields() {
        let index = build(json!([
            {"name": "dir/", "type": "dir", "modtime": "2023-11-14T22:13:20Z", "mode": 1023,
             "uid": 1000, "gid": 50, "userName": "user", "groupName": "staff",
             "xattrs": {"user.z": "eg==", "security.capability": "AQID", "user.empty": ""}},
            {"name": "dir/suid", "type": "reg", "size": 5, "mode": 2541, "offset": 100,
             "digest": DIGEST_A, "modtime": "1969-12-31T23:59:59.25Z"},
            {"name": "dir/link", "type": "symlink", "linkName": "../target", "mode": 511},
            {"name": "dir/hard", "type": "hardlink", "linkName": "./dir/suid"},
            {"name": "dev/null", "type": "char", "devMajor": 1, "devMinor": 3, "mode": 438},
            {"name": "dev/sda", "type": "block", "devMajor": 8},
            {"name": "dev/fifo", "type": "fifo", "mode": 420},
        ]))
        .unwrap();

        assert_eq!(index.digest, "sha256:blob");
        assert_eq!(index.entries.len(), 7);
        let dir = &index.entries[0];
        assert_eq!(dir.path, parts(&["dir"]));
        assert_eq!(dir.kind, EntryKind::Dir);
        assert_eq!(dir.meta.mode, 0o1777);
        assert_eq!((dir.meta.uid, dir.meta.gid), (1000, 50));
        assert_eq!((dir.meta.mtime, dir.meta.mtime_nsec), (1_700_000_000, 0));
        assert_eq!(
            dir.meta.xattrs,
            vec![
                (b"security.capability".to_vec(), vec![1, 2, 3]),
                (b"user.empty".to_vec(), vec![]),
                (b"user.z".to_vec(), b"z".to_vec()),
            ]
        );

        let file = &index.entries[1];
        assert_eq!(file.meta.mode, 0o4755);
        assert_eq!((file.meta.mtime, file.meta.mtime_nsec), (-1, 250_000_000));
        assert_eq!(
            file.kind,
            EntryKind::Reg {
                data: FileData {
                    layer: 3,
                    data_offset: 0,
                    size: 5
                }
            }
        );
        assert_eq!(
            index.entries[2].kind,
            EntryKind::Symlink {
                target: b"../target".to_vec()
            }
        );
        assert_eq!(
            index.entries[3].kind,
            EntryKind::Hardlink {
                target: parts(&["dir", "suid"])
            }
        );
        assert_eq!(
            index.entries[4].kind,
            EntryKind::CharDev { major: 1, minor: 3 }
        );
        assert_eq!(
            index.entries[5].kind,
            EntryKind::BlockDev { major: 8, minor: 0 }
        );
        assert_eq!(index.entries[6].kind, EntryKind::Fifo);
        assert_eq!(index.entries[6].meta.mode, 0o644);

        assert_eq!(index.data_size, 5);
        assert_eq!(index.chunks.len(), 1, "hard links get no data");
        assert_eq!(index.prefetch, Prefetch::Unknown);
    }

    #[test]
    fn build_index_missing_modtime_is_epoch() {
        let index = build(json!([{"name": "a", "type": "dir"}])).unwrap();
        assert_eq!(
            (
                index.entries[0].meta.mtime,
                index.entries[0].meta.mtime_nsec
            ),
            (0, 0)
        );
        assert_eq!(index.entries[0].meta.mode, 0);
    }

    #[test]
    fn build_index_normalises_names() {
        let cases = [
            ("dot slash", "./etc/passwd", parts(&["etc", "passwd"])),
            ("absolute", "/etc/passwd", parts(&["etc", "passwd"])),
            (
                "dot dot above root",
                "../../etc/passwd",
                parts(&["etc", "passwd"]),
            ),
            (
                "dot dot inside",
                "etc/x/../passwd",
                parts(&["etc", "passwd"]),
            ),
            ("root", "./", parts(&[])),
        ];
        for (case, name, expected) in cases {
            let index = build(json!([{"name": name, "type": "dir"}])).unwrap();
            assert_eq!(index.entries[0].path, expected, "case {case}");
        }
    }

    #[test]
    fn build_index_rejects_invalid_entries() {
        let long = format!("dir/{}", "x".repeat(256));
        let cases: Vec<(&str, Value, &str)> = vec![
            (
                "256 byte component",
                json!([{"name": long, "type": "dir"}]),
                "over the limit of 255",
            ),
            (
                "nul in name",
                json!([{"name": "a\u{0}b", "type": "dir"}]),
                "NUL",
            ),
            (
                "unknown type",
                json!([{"name": "x", "type": "socket"}]),
                "unknown type \"socket\"",
            ),
            (
                "bad modtime",
                json!([{"name": "x", "type": "dir", "modtime": "yesterday"}]),
                "invalid modtime",
            ),
            (
                "negative uid",
                json!([{"name": "x", "type": "dir", "uid": -1}]),
                "invalid uid -1",
            ),
            (
                "huge gid",
                json!([{"name": "x", "type": "dir", "gid": 4294967296u64}]),
                "invalid gid",
            ),
            (
                "negative mode",
                json!([{"name": "x", "type": "dir", "mode": -5}]),
                "invalid mode",
            ),
            (
                "bad xattr",
                json!([{"name": "x", "type": "dir", "xattrs": {"user.a": "!!"}}]),
                "invalid base64",
            ),
            (
                "empty symlink",
                json!([{"name": "x", "type": "symlink"}]),
                "no linkName",
            ),
            (
                "empty hardlink",
                json!([{"name": "x", "type": "hardlink", "linkName": "./"}]),
                "no linkName",
            ),
            (
                "negative size",
                json!([{"name": "x", "type": "reg", "size": -1}]),
                "invalid size -1",
            ),
            (
                "bad digest",
                json!([{"name": "x", "type": "reg", "size": 1, "offset": 5, "digest": "md5:00"}]),
                "expected \"sha256:\"",
            ),
            (
                "offset past toc",
                json!([{"name": "x", "type": "reg", "size": 1, "offset": 10_000}]),
                "outside the blob's data",
            ),
            (
                "negative offset",
                json!([{"name": "x", "type": "reg", "size": 1, "offset": -1}]),
                "invalid offset -1",
            ),
            (
                "chunk without file",
                json!([{"name": "x", "type": "chunk", "offset": 5, "chunkOffset": 1}]),
                "follows no regular file",
            ),
            (
                "chunk of empty file",
                json!([
                {"name": "x", "type": "reg"},
                {"name": "x", "type": "chunk", "offset": 5, "chunkOffset": 0}]),
                "follows no regular file",
            ),
            (
                "overlapping chunks",
                json!([
                {"name": "x", "type": "reg", "size": 10, "offset": 5, "chunkSize": 6},
                {"name": "x", "type": "chunk", "offset": 50, "chunkOffset": 5}]),
                "overlap or leave a gap",
            ),
            (
                "gap between chunks",
                json!([
                {"name": "x", "type": "reg", "size": 10, "offset": 5, "chunkSize": 4},
                {"name": "x", "type": "chunk", "offset": 50, "chunkOffset": 5}]),
                "overlap or leave a gap",
            ),
            (
                "first chunk to end then more",
                json!([
                {"name": "x", "type": "reg", "size": 10, "offset": 5},
                {"name": "x", "type": "chunk", "offset": 50, "chunkOffset": 5}]),
                "overlap or leave a gap",
            ),
            (
                "chunk past file end",
                json!([
                {"name": "x", "type": "reg", "size": 10, "offset": 5, "chunkSize": 5},
                {"name": "x", "type": "chunk", "offset": 50, "chunkOffset": 5, "chunkSize": 6}]),
                "ends past the file size",
            ),
            (
                "chunks short of size",
                json!([
                {"name": "x", "type": "reg", "size": 10, "offset": 5, "chunkSize": 5}]),
                "cover 5 of 10",
            ),
            (
                "chunk at file end",
                json!([
                {"name": "x", "type": "reg", "size": 10, "offset": 5, "chunkSize": 10},
                {"name": "x", "type": "chunk", "offset": 50, "chunkOffset": 10}]),
                "not below the file size",
            ),
        ];
        for (case, entries, message) in cases {
            let error = build(entries).expect_err(case);
            assert!(
                error.to_string().contains(message),
                "case {case}: {error} lacks {message:?}"
            );
        }
    }

    #[test]
    fn build_index_chunk_table() {
        let index = build(json!([
            {"name": "empty", "type": "reg", "digest": DIGEST_B},
            {"name": "big", "type": "reg", "size": 25, "offset": 100, "chunkSize": 10,
             "digest": DIGEST_B, "chunkDigest": DIGEST_A},
            {"name": "small", "type": "reg", "size": 3, "offset": 150, "digest": DIGEST_B},
            {"name": "big", "type": "chunk", "offset": 200, "chunkOffset": 10, "chunkSize": 10},
            {"name": "big", "type": "chunk", "offset": 300, "chunkOffset": 20, "innerOffset": 7},
            {"name": "packed", "type": "reg", "size": 4, "offset": 300, "innerOffset": 40},
        ]))
        .unwrap();

        assert_eq!(index.data_size, 32);
        let summary: Vec<(u64, u64, ChunkSource, &str)> = index
            .chunks
            .iter()
            .map(|chunk| {
                (
                    chunk.data_offset,
                    chunk.size,
                    chunk.source,
                    chunk.name.as_str(),
                )
            })
            .collect();
        let member = |compressed_offset, compressed_end, inner_offset| ChunkSource::Member {
            compressed_offset,
            compressed_end,
            inner_offset,
        };
        assert_eq!(
            summary,
            vec![
                (0, 10, member(100, 150, 0), "big"),
                (10, 10, member(200, 300, 0), "big"),
                (20, 5, member(300, TOC_OFFSET, 7), "big"),
                (25, 3, member(150, 200, 0), "small"),
                (28, 4, member(300, TOC_OFFSET, 40), "packed"),
            ]
        );

        let digest_a = [0xaa; 32];
        let digest_b = [0xbb; 32];
        assert_eq!(index.chunks[0].digest, Some(digest_a));
        assert_eq!(
            index.chunks[1].digest, None,
            "a chunk of several has no file digest"
        );
        assert_eq!(
            index.chunks[3].digest,
            Some(digest_b),
            "single chunk falls back to digest"
        );

        assert_eq!(
            index.entries[0].kind,
            EntryKind::Reg {
                data: FileData {
                    layer: 3,
                    data_offset: 0,
                    size: 0
                }
            }
        );
    }

    #[test]
    fn build_index_landmarks() {
        let index = build(json!([
            {"name": "a", "type": "reg", "size": 1, "offset": 100},
            {"name": ".prefetch.landmark", "type": "reg", "size": 1, "offset": 200},
            {"name": "b", "type": "reg", "size": 1, "offset": 300},
        ]))
        .unwrap();
        assert_eq!(
            index.prefetch,
            Prefetch::Before {
                compressed_offset: 200
            }
        );
        assert_eq!(index.entries.len(), 2);
        assert_eq!(index.data_size, 2, "landmarks get no data");
        assert_eq!(
            index.chunks[0].source,
            ChunkSource::Member {
                compressed_offset: 100,
                compressed_end: 200,
                inner_offset: 0
            },
            "the landmark's member still ends the previous one"
        );

        let index = build(json!([
            {"name": "./.no.prefetch.landmark", "type": "reg", "size": 1, "offset": 100},
            {"name": "stargz.index.json", "type": "reg", "size": 1, "offset": 200},
            {"name": "dir/.prefetch.landmark", "type": "reg"},
        ]))
        .unwrap();
        assert_eq!(index.prefetch, Prefetch::Nothing);
        assert_eq!(index.entries.len(), 1, "only root landmarks are special");
        assert_eq!(index.entries[0].path, parts(&["dir", ".prefetch.landmark"]));

        let index = build(json!([
            {"name": ".prefetch.landmark", "type": "reg"},
            {"name": "d", "type": "dir"},
            {"name": "b", "type": "reg", "size": 1, "offset": 300},
        ]))
        .unwrap();
        assert_eq!(
            index.prefetch,
            Prefetch::Before {
                compressed_offset: 300
            }
        );

        let index = build(json!([{"name": ".prefetch.landmark", "type": "reg"}])).unwrap();
        assert_eq!(
            index.prefetch,
            Prefetch::Before {
                compressed_offset: TOC_OFFSET
            }
        );
    }
}
