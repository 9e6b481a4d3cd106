//! Turns a parsed eStargz TOC into a [`LayerIndex`]: normalised entries and
//! the chunk table of the layer's data space (eStargz spec, TOC entries).

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine as _;
use tracing::debug;

use super::name::normalize_name;
use super::rfc3339::parse_rfc3339;
use super::toc::{parse_toc, stream_toc_json, JsonEntry, TocError, TocLimits, TOC_TAR_NAME};
use crate::layer::{ChunkName, ChunkRecord, ChunkSource, LayerIndex, Prefetch};
use crate::tree::{EntryKind, EntryPath, FileData, LayerEntry, Metadata};

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
    let mut de = serde_json::Deserializer::from_slice(toc_json);
    index_from_json(layer, blob_digest, &mut de, toc_offset, limits)
}

/// A layer index read straight from the TOC gzip member, and the digest of
/// the TOC JSON.
#[derive(Debug)]
pub struct StreamedIndex {
    /// sha256 of the whole `stargz.index.json`, to check against the
    /// layer's TOC digest annotation before the index is used.
    pub toc_digest: [u8; 32],
    /// The index, or why the TOC JSON does not describe a valid layer.
    pub index: Result<LayerIndex, TocError>,
}

/// Gunzips the TOC member `toc_bytes` and builds the index of layer `layer`
/// from its JSON as it is decompressed, like [`build_index`] on the output
/// of [`super::extract_toc_json`] but without holding the JSON in memory.
///
/// The outer error is damage of the member itself (as
/// [`super::extract_toc_json`] reports it); a TOC that decompresses but is
/// invalid gives its digest and the error in [`StreamedIndex::index`], so
/// the caller can report a digest mismatch first.
pub fn read_toc_index(
    layer: u32,
    blob_digest: &str,
    toc_bytes: &[u8],
    toc_offset: u64,
    limits: &TocLimits,
) -> Result<StreamedIndex, TocError> {
    let (index, toc_digest) = stream_toc_json(toc_bytes, limits.max_toc_bytes, |reader, _size| {
        let mut de = serde_json::Deserializer::from_reader(reader);
        index_from_json(layer, blob_digest, &mut de, toc_offset, limits)
    })?;
    Ok(StreamedIndex { toc_digest, index })
}

/// Parses the TOC document from `de` and builds the index entry by entry.
///
/// Errors come in the order a reader of the whole document would find
/// them: JSON errors, the entry count, the version, then member offsets of
/// all entries, then the first invalid entry, then the chunk layout.
fn index_from_json<'de, R: serde_json::de::Read<'de>>(
    layer: u32,
    blob_digest: &str,
    de: &mut serde_json::Deserializer<R>,
    toc_offset: u64,
    limits: &TocLimits,
) -> Result<LayerIndex, TocError> {
    let mut builder = IndexBuilder {
        layer,
        toc_offset,
        member_starts: Vec::new(),
        member_error: None,
        entry_error: None,
        entries: Vec::new(),
        files: Vec::new(),
        names: String::new(),
        chunks: Vec::new(),
        file_by_path: None,
        last_reg: None,
        data_size: 0,
        prefetch: Prefetch::Unknown,
        landmark_pending: false,
    };
    parse_toc(de, limits, &mut |index, entry| {
        builder.accept(index, &entry)
    })?;
    if let Some(error) = builder.member_error.take() {
        return Err(error);
    }
    if let Some(error) = builder.entry_error.take() {
        return Err(error);
    }
    builder.member_starts.sort_unstable();
    builder.member_starts.dedup();
    if builder.landmark_pending {
        builder.prefetch = Prefetch::Before {
            compressed_offset: toc_offset,
        };
    }

    let chunks = builder.finish_chunks()?;
    let mut entries = std::mem::take(&mut builder.entries);
    entries.shrink_to_fit();
    debug!(
        layer,
        digest = blob_digest,
        entries = entries.len(),
        chunks = chunks.len(),
        data_size = builder.data_size,
        "built eStargz layer index"
    );
    Ok(LayerIndex {
        digest: blob_digest.to_string(),
        entries,
        chunks,
        data_size: builder.data_size,
        prefetch: builder.prefetch,
    })
}

/// Returns whether an entry's `offset` names a gzip member holding file data.
fn has_data(entry: &JsonEntry) -> bool {
    (entry.kind == "reg" && entry.size > 0) || entry.kind == "chunk"
}

/// Returns the compressed offset of the member holding an entry's data,
/// checking it lies in `[0, toc_offset)`; `None` for entries without data.
/// A member ends where the next one starts, or at the TOC.
fn member_start(entry: &JsonEntry, toc_offset: u64) -> Result<Option<u64>, TocError> {
    if !has_data(entry) {
        return Ok(None);
    }
    let offset = non_negative(entry, "offset", entry.offset)?;
    if offset >= toc_offset {
        return Err(TocError::OffsetOutOfRange {
            name: entry.name.clone(),
            field: "offset",
            value: offset,
            toc_offset,
        });
    }
    Ok(Some(offset))
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
    // Tar writers put the file type bits (0o170000) next to the permissions, and
    // only the permission bits are kept. A value past 32 bits is no mode at all.
    let mode = id_field(entry, "mode", entry.mode)?;
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
        xattrs: xattrs.into(),
    })
}

/// A chunk as the TOC lists it, before its size and order are checked.
struct PendingChunk {
    /// Index of its file in `IndexBuilder::files`.
    file: u32,
    chunk_offset: u64,
    /// 0: up to the end of the file.
    chunk_size: u64,
    compressed_offset: u64,
    inner_offset: u64,
    /// `chunkDigest`, or for a file's first chunk without one, the file's
    /// `digest`, which counts only when the file has no other chunk.
    digest: Option<[u8; 32]>,
    digest_from_file: bool,
}

/// A non-empty regular file; its chunks are in `IndexBuilder::chunks`.
struct PendingFile {
    /// The file's TOC name, `IndexBuilder::names[name_start..][..name_len]`.
    name_start: u32,
    name_len: u32,
    data_offset: u64,
    size: u64,
}

struct IndexBuilder {
    layer: u32,
    toc_offset: u64,
    /// Compressed offsets of the members holding data, unsorted until the
    /// last entry was added.
    member_starts: Vec<u64>,
    /// The first entry whose member offset is invalid.
    member_error: Option<TocError>,
    /// The first invalid entry; no entry is added after it.
    entry_error: Option<TocError>,
    entries: Vec<LayerEntry>,
    files: Vec<PendingFile>,
    /// The TOC names of all files, one after the other.
    names: String,
    /// Chunks of all files in TOC order.
    chunks: Vec<PendingChunk>,
    /// The latest regular file of each path (components joined by `/`),
    /// which `chunk` entries extend; `None` until a chunk entry does not
    /// follow its file (writers put a file's chunks right after it, so most
    /// TOCs never need the map).
    file_by_path: Option<HashMap<Box<[u8]>, u32>>,
    /// The last regular file entry: its position in `entries` and its index
    /// in `files` (`None` when it is empty).
    last_reg: Option<(usize, Option<u32>)>,
    data_size: u64,
    prefetch: Prefetch,
    /// A `.prefetch.landmark` without data was seen; the next data entry's
    /// offset ends the prefetch range.
    landmark_pending: bool,
}

/// The key of a path in `IndexBuilder::file_by_path`: its components joined
/// by `/`, which no normalised component contains, so distinct paths give
/// distinct keys.
fn path_key(path: &EntryPath) -> Box<[u8]> {
    path.as_bytes().into()
}

impl IndexBuilder {
    /// Takes the next TOC entry, keeping the first error of each kind
    /// instead of stopping, so that a JSON error later in the document
    /// still wins, as it does when the document is parsed before use.
    fn accept(&mut self, index: usize, entry: &JsonEntry) {
        if self.member_error.is_some() {
            return;
        }
        match member_start(entry, self.toc_offset) {
            Ok(Some(offset)) => self.member_starts.push(offset),
            Ok(None) => {}
            Err(error) => {
                self.member_error = Some(error);
                // Offsets are checked before entries; this error wins.
                self.entries = Vec::new();
                self.files = Vec::new();
                self.names = String::new();
                self.chunks = Vec::new();
                self.file_by_path = None;
                self.last_reg = None;
                return;
            }
        }
        if self.entry_error.is_none() {
            if let Err(error) = self.add(index, entry) {
                self.entry_error = Some(error);
            }
        }
    }

    fn add(&mut self, index: usize, entry: &JsonEntry) -> Result<(), TocError> {
        let path = EntryPath::from(
            normalize_name(entry.name.as_bytes())
                .map_err(|source| TocError::Name { index, source })?,
        );

        if self.landmark_pending && has_data(entry) {
            self.prefetch = Prefetch::Before {
                compressed_offset: non_negative(entry, "offset", entry.offset)?,
            };
            self.landmark_pending = false;
        }
        if entry.kind == "chunk" {
            return self.add_chunk(entry, path);
        }
        if let Some(only) = path.single() {
            if self.take_special(entry, only)? {
                return Ok(());
            }
        }

        let meta = metadata(entry)?;
        let kind = match entry.kind.as_str() {
            "dir" => EntryKind::Dir,
            "reg" => {
                let (data, file) = self.add_file(entry, &path)?;
                self.last_reg = Some((self.entries.len(), file));
                EntryKind::Reg { data }
            }
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
                let target = EntryPath::from(
                    normalize_name(entry.link_name.as_bytes())
                        .map_err(|source| TocError::Name { index, source })?,
                );
                if target.is_root() {
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
    /// first chunk; returns its index in `files` unless it is empty.
    fn add_file(
        &mut self,
        entry: &JsonEntry,
        path: &EntryPath,
    ) -> Result<(FileData, Option<u32>), TocError> {
        let size = non_negative(entry, "size", entry.size)?;
        let data = FileData {
            layer: self.layer,
            data_offset: self.data_size,
            size,
        };
        if size == 0 {
            if let Some(map) = &mut self.file_by_path {
                map.remove(&*path_key(path));
            }
            return Ok((data, None));
        }

        self.data_size =
            self.data_size
                .checked_add(size)
                .ok_or_else(|| TocError::DataSizeOverflow {
                    name: entry.name.clone(),
                })?;
        let file_index = u32::try_from(self.files.len()).map_err(|_| TocError::TooManyEntries {
            count: self.files.len() + 1,
            limit: u32::MAX as usize,
        })?;
        let names_overflow = || TocError::NamesTooLarge {
            limit: u64::from(u32::MAX),
        };
        let name_start = u32::try_from(self.names.len()).map_err(|_| names_overflow())?;
        let name_len = u32::try_from(entry.name.len())
            .ok()
            .filter(|len| name_start.checked_add(*len).is_some())
            .ok_or_else(names_overflow)?;
        let file = PendingFile {
            name_start,
            name_len,
            data_offset: data.data_offset,
            size,
        };
        let file_digest = parse_digest(entry, "digest", &entry.digest)?;
        let mut chunk = self.pending_chunk(entry, file_index)?;
        if chunk.digest.is_none() {
            chunk.digest = file_digest;
            chunk.digest_from_file = file_digest.is_some();
        }
        self.chunks.push(chunk);
        if let Some(map) = &mut self.file_by_path {
            map.insert(path_key(path), file_index);
        }
        self.names.push_str(&entry.name);
        self.files.push(file);
        Ok((data, Some(file_index)))
    }

    /// The latest regular file at `path`, or `None` when there is none or
    /// the latest one is empty.
    fn file_at(&mut self, path: &EntryPath) -> Option<u32> {
        if self.file_by_path.is_none() {
            if let Some((position, file)) = self.last_reg {
                if self
                    .entries
                    .get(position)
                    .is_some_and(|last| last.path == *path)
                {
                    return file;
                }
            }
            self.file_by_path = Some(self.map_files());
        }
        self.file_by_path.as_ref()?.get(&*path_key(path)).copied()
    }

    /// Maps the path of every regular file added so far to the latest
    /// non-empty file there.
    fn map_files(&self) -> HashMap<Box<[u8]>, u32> {
        let mut map = HashMap::new();
        for entry in &self.entries {
            let EntryKind::Reg { data } = &entry.kind else {
                continue;
            };
            if data.size == 0 {
                map.remove(&*path_key(&entry.path));
                continue;
            }
            // Non-empty files have increasing data offsets.
            let file = self
                .files
                .partition_point(|file| file.data_offset < data.data_offset);
            if let Ok(file) = u32::try_from(file) {
                map.insert(path_key(&entry.path), file);
            }
        }
        map
    }

    fn add_chunk(&mut self, entry: &JsonEntry, path: EntryPath) -> Result<(), TocError> {
        // Check the fields first, as the error order of an entry depends on it.
        let mut chunk = self.pending_chunk(entry, 0)?;
        chunk.file = self
            .file_at(&path)
            .ok_or_else(|| TocError::ChunkWithoutFile {
                name: entry.name.clone(),
            })?;
        self.chunks.push(chunk);
        Ok(())
    }

    fn pending_chunk(&self, entry: &JsonEntry, file: u32) -> Result<PendingChunk, TocError> {
        let chunk_size = non_negative(entry, "chunkSize", entry.chunk_size)?;
        Ok(PendingChunk {
            file,
            chunk_offset: non_negative(entry, "chunkOffset", entry.chunk_offset)?,
            chunk_size,
            compressed_offset: non_negative(entry, "offset", entry.offset)?,
            inner_offset: non_negative(entry, "innerOffset", entry.inner_offset)?,
            digest: parse_digest(entry, "chunkDigest", &entry.chunk_digest)?,
            digest_from_file: false,
        })
    }

    /// Checks that each file's chunks are contiguous and cover it, and
    /// returns the chunk table sorted by data offset.
    fn finish_chunks(&mut self) -> Result<Vec<ChunkRecord>, TocError> {
        let mut chunks = std::mem::take(&mut self.chunks);
        self.file_by_path = None;
        // A TOC lists each file's chunks after it in order, so the sort,
        // which needs a buffer of half the list, is rarely needed. It is
        // stable: chunks at the same offset stay in TOC order.
        let key = |chunk: &PendingChunk| (chunk.file, chunk.chunk_offset);
        if !chunks.is_sorted_by_key(key) {
            chunks.sort_by_key(key);
        }
        let mut names = std::mem::take(&mut self.names);
        // Grown by doubling: up to half of a small layer's buffer is unused,
        // and a buffer under glibc's mmap threshold is resident in full.
        names.shrink_to_fit();
        let names = Arc::new(names);
        let mut files = std::mem::take(&mut self.files);

        // Check every file first, so the first invalid file in TOC order is
        // the one reported.
        let mut rest = chunks.as_slice();
        for (file_index, file) in files.iter().enumerate() {
            let count = rest
                .iter()
                .take_while(|chunk| chunk.file as usize == file_index)
                .count();
            let (file_chunks, after) = rest.split_at(count);
            rest = after;
            check_file_chunks(file, file_chunks, &names)?;
        }

        // Then build the records from the last file to the first, handing
        // the pending lists' memory back as they shrink, so the pending
        // lists and the table are not both held in full.
        let mut records = Vec::with_capacity(chunks.len());
        let mut released = chunks.len();
        while let Some(file) = files.pop() {
            let file_index = files.len();
            let count = chunks
                .iter()
                .rev()
                .take_while(|chunk| chunk.file as usize == file_index)
                .count();
            let first = chunks.len() - count;
            let single = count == 1;
            let name = file_name(&file, &names);
            for chunk in chunks[first..].iter().rev() {
                // `check_file_chunks` checked the sizes and offsets.
                let size = match chunk.chunk_size {
                    0 => file.size - chunk.chunk_offset,
                    size => size,
                };
                let digest = match (chunk.digest, chunk.digest_from_file) {
                    (Some(_), true) if !single => None,
                    (digest, _) => digest,
                };
                let source = ChunkSource::Member {
                    compressed_offset: chunk.compressed_offset,
                    compressed_end: self.member_end(chunk.compressed_offset),
                    inner_offset: chunk.inner_offset,
                };
                // TOC offsets are signed 64-bit numbers and the TOC ends
                // before the blob does, so every TOC source fits a record.
                let record = ChunkRecord::new(
                    file.data_offset + chunk.chunk_offset,
                    size,
                    source,
                    digest,
                    name.clone(),
                )
                .map_err(|error| TocError::ChunkLayout {
                    name: name.to_string(),
                    reason: error.to_string(),
                })?;
                records.push(record);
            }
            chunks.truncate(first);
            if released - chunks.len() >= RELEASE_STEP {
                chunks.shrink_to_fit();
                files.shrink_to_fit();
                released = chunks.len();
            }
        }
        records.reverse();
        // Files get their data in TOC order, so the table is usually sorted
        // already; the check spares the sort's buffer of half the table.
        if !records.is_sorted_by_key(|record| record.data_offset) {
            records.sort_by_key(|record| record.data_offset);
        }
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

/// Pending chunks consumed between two releases of the pending lists'
/// unused memory while the chunk table is built.
const RELEASE_STEP: usize = 1 << 16;

/// The name of a pending file, from the layer's name buffer.
fn file_name(file: &PendingFile, names: &Arc<String>) -> ChunkName {
    let name_range = file.name_start as usize..(file.name_start + file.name_len) as usize;
    // The range was cut from `names` when the file was added.
    ChunkName::in_buffer(names, name_range).unwrap_or_else(|| ChunkName::from(String::new()))
}

/// Checks that a file's chunks (sorted by offset) are contiguous and cover it.
fn check_file_chunks(
    file: &PendingFile,
    chunks: &[PendingChunk],
    names: &Arc<String>,
) -> Result<(), TocError> {
    let layout_error = |reason: String| TocError::ChunkLayout {
        name: file_name(file, names).to_string(),
        reason,
    };
    let mut expected_offset = 0u64;
    for chunk in chunks {
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
        let size = match chunk.chunk_size {
            0 => file.size - chunk.chunk_offset,
            size => size,
        };
        let end = chunk.chunk_offset.saturating_add(size);
        if end > file.size {
            return Err(layout_error(format!(
                "the chunk at {} of {} bytes ends past the file size {}",
                chunk.chunk_offset, size, file.size
            )));
        }
        expected_offset = end;
    }
    if expected_offset != file.size {
        return Err(layout_error(format!(
            "chunks cover {} of {} bytes",
            expected_offset, file.size
        )));
    }
    Ok(())
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
                target: parts(&["dir", "suid"]).into()
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
    fn read_toc_index_matches_build_index() {
        use super::super::toc::tests::toc_member;
        use sha2::{Digest, Sha256};

        let toc = json!({ "version": 1, "entries": [
            {"name": "d/", "type": "dir", "xattrs": {"user.a": "eg=="}},
            {"name": "d/big", "type": "reg", "size": 25, "offset": 100, "chunkSize": 10},
            {"name": "d/big", "type": "chunk", "offset": 200, "chunkOffset": 10},
            {"name": "d/l", "type": "symlink", "linkName": "big"},
        ]});
        let json = serde_json::to_vec(&toc).unwrap();
        let member = toc_member(&[(TOC_TAR_NAME, &json)]);
        let limits = TocLimits::default();
        let streamed = read_toc_index(1, "sha256:b", &member, TOC_OFFSET, &limits).unwrap();
        assert_eq!(streamed.toc_digest, <[u8; 32]>::from(Sha256::digest(&json)));
        let streamed = streamed.index.unwrap();
        let whole = build_index(1, "sha256:b", &json, TOC_OFFSET, &limits).unwrap();
        assert_eq!(streamed.entries, whole.entries);
        assert_eq!(streamed.chunks, whole.chunks);
        assert_eq!(streamed.data_size, whole.data_size);

        // Invalid JSON: the digest of the whole entry comes with the error.
        let bad = br#"{"version":1,"entries":[{"name":1}]}  "#;
        let member = toc_member(&[(TOC_TAR_NAME, bad)]);
        let streamed = read_toc_index(1, "sha256:b", &member, TOC_OFFSET, &limits).unwrap();
        assert_eq!(streamed.toc_digest, <[u8; 32]>::from(Sha256::digest(bad)));
        let error = streamed.index.unwrap_err();
        assert!(matches!(error, TocError::Json { .. }), "{error}");

        // Damage of the member wins over the JSON error it causes.
        let limited = TocLimits {
            max_toc_bytes: 100,
            ..limits
        };
        let error = read_toc_index(1, "sha256:b", &member, TOC_OFFSET, &limited).unwrap_err();
        assert!(
            matches!(error, TocError::TooLarge { limit: 100 }),
            "{error}"
        );
        let mut header = tar::Header::new_ustar();
        header.set_path(TOC_TAR_NAME).unwrap();
        header.set_size(4096);
        header.set_cksum();
        let mut truncated = header.as_bytes().to_vec();
        truncated.extend_from_slice(br#"{"version":1,"entries":[]}"#);
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut encoder, &truncated).unwrap();
        let member = encoder.finish().unwrap();
        let error = read_toc_index(1, "sha256:b", &member, TOC_OFFSET, &limits).unwrap_err();
        assert!(
            matches!(
                error,
                TocError::Truncated {
                    read: 26,
                    size: 4096
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn build_index_reports_offsets_before_entries() {
        // The bad name comes first, but member offsets are checked over the
        // whole TOC before any entry.
        let error = build(json!([
            {"name": "a\u{0}", "type": "dir"},
            {"name": "x", "type": "reg", "size": 1, "offset": TOC_OFFSET},
        ]))
        .unwrap_err();
        assert!(
            matches!(error, TocError::OffsetOutOfRange { .. }),
            "{error}"
        );
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
                "mode past 32 bits",
                json!([{"name": "x", "type": "dir", "mode": 1099511627776u64}]),
                "invalid mode 1099511627776",
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
                "chunk after its file was replaced by an empty one",
                json!([
                {"name": "x", "type": "reg", "size": 10, "offset": 5, "chunkSize": 5},
                {"name": "x", "type": "reg"},
                {"name": "y", "type": "reg", "size": 1, "offset": 20},
                {"name": "x", "type": "chunk", "offset": 50, "chunkOffset": 5}]),
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
                    chunk.source(),
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
        assert_eq!(index.chunks[0].digest(), Some(digest_a));
        assert_eq!(
            index.chunks[1].digest(),
            None,
            "a chunk of several has no file digest"
        );
        assert_eq!(
            index.chunks[3].digest(),
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
            index.chunks[0].source(),
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
