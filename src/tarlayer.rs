//! Plain tar layers (not eStargz): the layer index and the file contents
//! from one pass over the uncompressed tar stream (POSIX.1-2001 pax, GNU and
//! ustar formats).
//!
//! The tar crate decodes header fields, but the archive walk is done here.
//! Pax records are parsed by their length prefix because xattr values may
//! contain newlines and other raw bytes, and a pax `size` must move the
//! stream on by the right amount.

use std::collections::BTreeMap;
use std::io::{self, BufReader, Read};

use sha2::{Digest, Sha256};
use tracing::debug;

use crate::estargz::name::{normalize_name, NameError};
use crate::estargz::{NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME};
use crate::layer::{ChunkRecord, LayerIndex, Prefetch};
use crate::pax;
use crate::tree::{EntryKind, EntryPath, FileData, LayerEntry, Metadata};

/// Tar block size; headers and data are padded to it.
const BLOCK_SIZE: u64 = 512;
/// Offset of the typeflag byte in a tar header.
const TYPEFLAG_OFFSET: usize = 156;
/// Offset and length of the checksum field in a tar header.
const CHKSUM_RANGE: std::ops::Range<usize> = 148..156;
/// Largest pax extended header or GNU long name accepted, 1 MiB. Real ones
/// are a few KiB; ext4 xattr values are at most one 4 KiB block here.
const MAX_EXTENSION_SIZE: u64 = 1 << 20;
/// Read buffer for file contents.
const COPY_BUFFER_SIZE: usize = 256 << 10;
/// Header field ranges of the numeric fields (POSIX ustar layout).
const MODE_RANGE: std::ops::Range<usize> = 100..108;
const UID_RANGE: std::ops::Range<usize> = 108..116;
const GID_RANGE: std::ops::Range<usize> = 116..124;
const SIZE_RANGE: std::ops::Range<usize> = 124..136;
const MTIME_RANGE: std::ops::Range<usize> = 136..148;
const DEVMAJOR_RANGE: std::ops::Range<usize> = 329..337;
const DEVMINOR_RANGE: std::ops::Range<usize> = 337..345;
/// Prefix of pax records holding extended attributes.
const PAX_XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";
/// Prefix of pax records describing GNU sparse files.
const PAX_GNU_SPARSE_PREFIX: &[u8] = b"GNU.sparse.";

#[derive(Debug, thiserror::Error)]
pub enum TarLayerError {
    #[error("reading the tar stream at byte {offset} failed: {source}")]
    Read { offset: u64, source: io::Error },

    #[error("the tar stream ends at byte {offset} inside entry {name:?}; the layer is truncated")]
    Truncated { offset: u64, name: String },

    #[error(
        "tar header at byte {offset} has checksum {stored:?} but its bytes sum to {computed}; \
         the layer is corrupt or not a tar"
    )]
    Checksum {
        offset: u64,
        stored: String,
        computed: u32,
    },

    #[error("tar header at byte {offset} has an invalid {field}: {source}")]
    HeaderField {
        offset: u64,
        field: &'static str,
        source: io::Error,
    },

    #[error("tar entry {name:?} at byte {offset} has {field} {value}, out of range")]
    OutOfRange {
        offset: u64,
        name: String,
        field: &'static str,
        value: String,
    },

    #[error("pax header at byte {offset} is malformed: {reason}")]
    Pax { offset: u64, reason: String },

    #[error("pax record {key:?} at byte {offset} has invalid value {value:?}")]
    PaxValue {
        offset: u64,
        key: String,
        value: String,
    },

    #[error(
        "{kind} at byte {offset} is {size} bytes, over the limit of {limit}; \
         the layer is corrupt or hostile"
    )]
    ExtensionTooLarge {
        offset: u64,
        kind: &'static str,
        size: u64,
        limit: u64,
    },

    #[error("tar entry at byte {offset} has an invalid name: {source}")]
    Name { offset: u64, source: NameError },

    #[error("tar entry {name:?} at byte {offset} is a {kind} without a link target")]
    MissingLinkName {
        offset: u64,
        name: String,
        kind: &'static str,
    },

    #[error("tar entry {name:?} at byte {offset} is a {kind}, which is not supported")]
    Unsupported {
        offset: u64,
        name: String,
        kind: String,
    },

    #[error("storing the content of {name:?} at data offset {data_offset} failed: {source}")]
    Sink {
        name: String,
        data_offset: u64,
        source: io::Error,
    },

    #[error("tar entry {name:?} makes the layer's data larger than 2^64 bytes")]
    DataSizeOverflow { name: String },
}

/// Reads the uncompressed tar stream of a non-eStargz layer and returns its
/// index, with one [`ChunkSource::Local`] chunk per non-empty regular file.
///
/// Each regular file's bytes go to `sink(data_offset, bytes)` in data-space
/// order, in pieces of at most 256 KiB; the chunk digest is the sha256 of
/// what was streamed. Landmark files and `stargz.index.json` at the root
/// (present when an eStargz blob is read as a plain tar.gz) are left out.
/// Duplicate paths are all listed; [`crate::tree::merge`] keeps the last.
pub fn index_tar<R: Read>(
    layer: u32,
    blob_digest: &str,
    reader: R,
    sink: &mut dyn FnMut(u64, &[u8]) -> io::Result<()>,
) -> Result<LayerIndex, TarLayerError> {
    let mut stream = TarStream {
        inner: BufReader::with_capacity(COPY_BUFFER_SIZE, reader),
        offset: 0,
    };
    let mut builder = TarIndexBuilder {
        layer,
        entries: Vec::new(),
        chunks: Vec::new(),
        data_size: 0,
        buffer: vec![0u8; COPY_BUFFER_SIZE],
    };
    let mut extensions = Extensions::default();

    loop {
        let header_offset = stream.offset;
        let mut block = [0u8; BLOCK_SIZE as usize];
        if !stream.read_block(&mut block)? {
            debug!(
                offset = header_offset,
                "tar stream ends without an end-of-archive marker"
            );
            break;
        }
        if block.iter().all(|&byte| byte == 0) {
            break;
        }
        verify_checksum(&block, header_offset)?;
        let header = tar::Header::from_byte_slice(&block);
        let typeflag = block[TYPEFLAG_OFFSET];

        if extensions.take_extension_header(&mut stream, header, typeflag, header_offset)? {
            continue;
        }
        let raw = extensions.apply(header, header_offset)?;
        builder.add(&mut stream, raw, sink)?;
    }

    debug!(
        layer,
        digest = blob_digest,
        entries = builder.entries.len(),
        data_size = builder.data_size,
        "indexed plain tar layer"
    );
    Ok(LayerIndex {
        digest: blob_digest.to_string(),
        entries: builder.entries,
        chunks: builder.chunks,
        data_size: builder.data_size,
        // Every byte is local once the stream is read: there is nothing to prefetch.
        prefetch: Prefetch::Nothing,
    })
}

/// The tar stream and the number of bytes consumed from it.
struct TarStream<R> {
    inner: R,
    offset: u64,
}

impl<R: Read> TarStream<R> {
    /// Reads one block; returns `false` at a clean end of stream.
    fn read_block(&mut self, block: &mut [u8; BLOCK_SIZE as usize]) -> Result<bool, TarLayerError> {
        let mut filled = 0;
        while filled < block.len() {
            match self.inner.read(&mut block[filled..]) {
                Ok(0) if filled == 0 => return Ok(false),
                Ok(0) => {
                    return Err(TarLayerError::Truncated {
                        offset: self.offset + filled as u64,
                        name: "(tar header)".to_string(),
                    })
                }
                Ok(read) => filled += read,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(TarLayerError::Read {
                        offset: self.offset + filled as u64,
                        source,
                    })
                }
            }
        }
        self.offset += BLOCK_SIZE;
        Ok(true)
    }

    /// Reads up to `buffer.len()` bytes; returns 0 only at end of stream.
    fn read_some(&mut self, buffer: &mut [u8]) -> Result<usize, TarLayerError> {
        loop {
            match self.inner.read(buffer) {
                Ok(read) => {
                    self.offset += read as u64;
                    return Ok(read);
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(TarLayerError::Read {
                        offset: self.offset,
                        source,
                    })
                }
            }
        }
    }

    /// Skips `len` bytes of entry data or padding.
    fn skip(&mut self, len: u64, name: &str) -> Result<(), TarLayerError> {
        let start = self.offset;
        let copied =
            io::copy(&mut (&mut self.inner).take(len), &mut io::sink()).map_err(|source| {
                TarLayerError::Read {
                    offset: start,
                    source,
                }
            })?;
        self.offset += copied;
        if copied != len {
            return Err(TarLayerError::Truncated {
                offset: self.offset,
                name: name.to_string(),
            });
        }
        Ok(())
    }

    /// Reads a whole pax header or GNU long name of `size` bytes, then its padding.
    fn read_extension(
        &mut self,
        size: u64,
        kind: &'static str,
        header_offset: u64,
    ) -> Result<Vec<u8>, TarLayerError> {
        if size > MAX_EXTENSION_SIZE {
            return Err(TarLayerError::ExtensionTooLarge {
                offset: header_offset,
                kind,
                size,
                limit: MAX_EXTENSION_SIZE,
            });
        }
        let mut data = Vec::with_capacity(size as usize);
        let read = (&mut self.inner)
            .take(size)
            .read_to_end(&mut data)
            .map_err(|source| TarLayerError::Read {
                offset: self.offset,
                source,
            })?;
        self.offset += read as u64;
        if read as u64 != size {
            return Err(TarLayerError::Truncated {
                offset: self.offset,
                name: kind.to_string(),
            });
        }
        self.skip(padding(size), kind)?;
        Ok(data)
    }
}

/// Bytes of padding after `size` bytes of data.
fn padding(size: u64) -> u64 {
    (BLOCK_SIZE - size % BLOCK_SIZE) % BLOCK_SIZE
}

/// Checks the header checksum: the sum of all header bytes with the checksum
/// field counted as spaces, unsigned or (as some old writers did) signed.
fn verify_checksum(block: &[u8; BLOCK_SIZE as usize], offset: u64) -> Result<(), TarLayerError> {
    let field = &block[CHKSUM_RANGE];
    let stored = field
        .iter()
        .copied()
        .skip_while(|&byte| byte == b' ')
        .take_while(|byte| (b'0'..=b'7').contains(byte))
        .try_fold(0u32, |total, digit| {
            total.checked_mul(8)?.checked_add(u32::from(digit - b'0'))
        });

    let mut unsigned: u32 = 0;
    let mut signed: i64 = 0;
    for (index, &byte) in block.iter().enumerate() {
        let byte = if CHKSUM_RANGE.contains(&index) {
            b' '
        } else {
            byte
        };
        unsigned += u32::from(byte);
        signed += i64::from(byte as i8);
    }

    match stored {
        Some(value) if value == unsigned || i64::from(value) == signed => Ok(()),
        _ => Err(TarLayerError::Checksum {
            offset,
            stored: String::from_utf8_lossy(field).into_owned(),
            computed: unsigned,
        }),
    }
}

/// Pax records and GNU long names waiting for the entry they describe.
#[derive(Default)]
struct Extensions {
    /// Records of global pax headers (`g`), applying to every later entry.
    global: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Records of the pax header (`x`) for the next entry.
    local: Option<BTreeMap<Vec<u8>, Vec<u8>>>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
}

/// One tar entry with its extensions applied.
struct RawEntry {
    offset: u64,
    typeflag: u8,
    name: Vec<u8>,
    link_name: Vec<u8>,
    size: u64,
    meta: Metadata,
    device: (u32, u32),
}

impl Extensions {
    /// Consumes an extension header (`x`, `g`, `L`, `K`); returns whether
    /// the header was one.
    fn take_extension_header<R: Read>(
        &mut self,
        stream: &mut TarStream<R>,
        header: &tar::Header,
        typeflag: u8,
        offset: u64,
    ) -> Result<bool, TarLayerError> {
        let kind = match typeflag {
            b'x' => "pax header",
            b'g' => "global pax header",
            b'L' => "GNU long name",
            b'K' => "GNU long link name",
            _ => return Ok(false),
        };
        let size = numeric_field(header, SIZE_RANGE, "size", offset, tar::Header::entry_size)?;
        let data = stream.read_extension(size, kind, offset)?;

        match typeflag {
            b'x' => {
                self.local = Some(
                    pax::parse_records(&data)
                        .map_err(|reason| TarLayerError::Pax { offset, reason })?,
                )
            }
            b'g' => self.global.extend(
                pax::parse_records(&data)
                    .map_err(|reason| TarLayerError::Pax { offset, reason })?,
            ),
            b'L' => self.long_name = Some(pax::until_nul(&data).to_vec()),
            _ => self.long_link = Some(pax::until_nul(&data).to_vec()),
        }
        Ok(true)
    }

    /// Combines the header fields with pending pax records and long names;
    /// pax records win over long names, which win over header fields.
    fn apply(&mut self, header: &tar::Header, offset: u64) -> Result<RawEntry, TarLayerError> {
        let mut records: BTreeMap<Vec<u8>, Vec<u8>> = self
            .global
            .iter()
            .filter(|(key, _)| !matches!(key.as_slice(), b"path" | b"linkpath" | b"size"))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        records.extend(self.local.take().unwrap_or_default());
        let long_name = self.long_name.take();
        let long_link = self.long_link.take();

        let text_record = |key: &[u8]| records.get(key).filter(|value| !value.is_empty());

        let name = match (text_record(b"path"), long_name) {
            (Some(path), _) => path.clone(),
            (None, Some(long)) => long,
            (None, None) => header.path_bytes().into_owned(),
        };
        let display_name = String::from_utf8_lossy(&name).into_owned();
        let out_of_range = |field: &'static str, value: String| TarLayerError::OutOfRange {
            offset,
            name: display_name.clone(),
            field,
            value,
        };

        let link_name = match (text_record(b"linkpath"), long_link) {
            (Some(path), _) => path.clone(),
            (None, Some(long)) => long,
            (None, None) => header
                .link_name_bytes()
                .map(|link| link.into_owned())
                .unwrap_or_default(),
        };

        let size = match text_record(b"size") {
            Some(value) => parse_pax_u64(b"size", value, offset)?,
            None => numeric_field(header, SIZE_RANGE, "size", offset, tar::Header::entry_size)?,
        };
        let uid = match text_record(b"uid") {
            Some(value) => parse_pax_u64(b"uid", value, offset)?,
            None => numeric_field(header, UID_RANGE, "uid", offset, tar::Header::uid)?,
        };
        let gid = match text_record(b"gid") {
            Some(value) => parse_pax_u64(b"gid", value, offset)?,
            None => numeric_field(header, GID_RANGE, "gid", offset, tar::Header::gid)?,
        };
        let (mtime, mtime_nsec) = match text_record(b"mtime") {
            Some(value) => pax::parse_time(value).ok_or_else(|| TarLayerError::PaxValue {
                offset,
                key: "mtime".to_string(),
                value: String::from_utf8_lossy(value).into_owned(),
            })?,
            None => {
                let seconds =
                    numeric_field(header, MTIME_RANGE, "mtime", offset, tar::Header::mtime)?;
                let seconds = i64::try_from(seconds)
                    .map_err(|_| out_of_range("mtime", seconds.to_string()))?;
                (seconds, 0)
            }
        };
        let mode = numeric_field(header, MODE_RANGE, "mode", offset, tar::Header::mode)?;

        if let Some(key) = records
            .keys()
            .find(|key| key.starts_with(PAX_GNU_SPARSE_PREFIX))
        {
            return Err(TarLayerError::Unsupported {
                offset,
                name: display_name,
                kind: format!(
                    "GNU sparse file (pax record {})",
                    String::from_utf8_lossy(key)
                ),
            });
        }
        // BTreeMap order is byte order of the full record key, so the names
        // (after one common prefix) come out sorted.
        let xattrs: Vec<(Vec<u8>, Vec<u8>)> = records
            .iter()
            .filter_map(|(key, value)| {
                key.strip_prefix(PAX_XATTR_PREFIX)
                    .map(|name| (name.to_vec(), value.clone()))
            })
            .collect();

        let typeflag = header.as_bytes()[TYPEFLAG_OFFSET];
        let device = if matches!(typeflag, b'3' | b'4') {
            let major = numeric_field(
                header,
                DEVMAJOR_RANGE,
                "devmajor",
                offset,
                tar::Header::device_major,
            )?;
            let minor = numeric_field(
                header,
                DEVMINOR_RANGE,
                "devminor",
                offset,
                tar::Header::device_minor,
            )?;
            (major.unwrap_or(0), minor.unwrap_or(0))
        } else {
            (0, 0)
        };

        Ok(RawEntry {
            offset,
            typeflag,
            name,
            link_name,
            size,
            meta: Metadata {
                mode: (mode & 0o7777) as u16,
                uid: u32::try_from(uid).map_err(|_| out_of_range("uid", uid.to_string()))?,
                gid: u32::try_from(gid).map_err(|_| out_of_range("gid", gid.to_string()))?,
                mtime,
                mtime_nsec,
                xattrs: xattrs.into(),
            },
            device,
        })
    }
}

/// Decodes a numeric header field with the tar crate, reading a field of
/// only NULs and spaces as 0, as GNU tar and Go's archive/tar do.
fn numeric_field<T: Default>(
    header: &tar::Header,
    range: std::ops::Range<usize>,
    field: &'static str,
    offset: u64,
    decode: impl FnOnce(&tar::Header) -> io::Result<T>,
) -> Result<T, TarLayerError> {
    if header.as_bytes()[range]
        .iter()
        .all(|&byte| byte == 0 || byte == b' ')
    {
        return Ok(T::default());
    }
    decode(header).map_err(|source| TarLayerError::HeaderField {
        offset,
        field,
        source,
    })
}

fn parse_pax_u64(key: &[u8], value: &[u8], offset: u64) -> Result<u64, TarLayerError> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| TarLayerError::PaxValue {
            offset,
            key: String::from_utf8_lossy(key).into_owned(),
            value: String::from_utf8_lossy(value).into_owned(),
        })
}

struct TarIndexBuilder {
    layer: u32,
    entries: Vec<LayerEntry>,
    chunks: Vec<ChunkRecord>,
    data_size: u64,
    buffer: Vec<u8>,
}

impl TarIndexBuilder {
    fn add<R: Read>(
        &mut self,
        stream: &mut TarStream<R>,
        raw: RawEntry,
        sink: &mut dyn FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> Result<(), TarLayerError> {
        let display_name = String::from_utf8_lossy(&raw.name).into_owned();
        let path =
            EntryPath::from(
                normalize_name(&raw.name).map_err(|source| TarLayerError::Name {
                    offset: raw.offset,
                    source,
                })?,
            );
        let is_regular = matches!(raw.typeflag, b'0' | b'\0' | b'7');
        // Pre-POSIX tars mark directories as regular files whose name ends in '/'.
        let old_style_dir = raw.typeflag == b'\0' && raw.name.ends_with(b"/");

        let skipped_root_file = matches!(path.single(), Some(only)
            if only == PREFETCH_LANDMARK.as_bytes()
                || only == NO_PREFETCH_LANDMARK.as_bytes()
                || only == TOC_TAR_NAME.as_bytes());
        if skipped_root_file || raw.typeflag == b'V' {
            debug!(name = %display_name, "skipping builder-added file or volume label in tar layer");
            return stream.skip(raw.size + padding(raw.size), &display_name);
        }

        let kind = match raw.typeflag {
            _ if old_style_dir => EntryKind::Dir,
            _ if is_regular => {
                let data = self.stream_file(stream, &raw, &display_name, sink)?;
                self.entries.push(LayerEntry {
                    path,
                    kind: EntryKind::Reg { data },
                    meta: raw.meta,
                });
                return Ok(());
            }
            b'5' => EntryKind::Dir,
            b'1' => {
                let target = EntryPath::from(normalize_name(&raw.link_name).map_err(|source| {
                    TarLayerError::Name {
                        offset: raw.offset,
                        source,
                    }
                })?);
                if target.is_root() {
                    return Err(TarLayerError::MissingLinkName {
                        offset: raw.offset,
                        name: display_name,
                        kind: "hard link",
                    });
                }
                EntryKind::Hardlink { target }
            }
            b'2' => {
                if raw.link_name.is_empty() {
                    return Err(TarLayerError::MissingLinkName {
                        offset: raw.offset,
                        name: display_name,
                        kind: "symlink",
                    });
                }
                EntryKind::Symlink {
                    target: raw.link_name.clone(),
                }
            }
            b'3' => EntryKind::CharDev {
                major: raw.device.0,
                minor: raw.device.1,
            },
            b'4' => EntryKind::BlockDev {
                major: raw.device.0,
                minor: raw.device.1,
            },
            b'6' => EntryKind::Fifo,
            b'S' => {
                return Err(TarLayerError::Unsupported {
                    offset: raw.offset,
                    name: display_name,
                    kind: "GNU sparse file".to_string(),
                })
            }
            other => {
                return Err(TarLayerError::Unsupported {
                    offset: raw.offset,
                    name: display_name,
                    kind: format!("entry of type {:?}", char::from(other)),
                })
            }
        };

        // Non-regular entries may still carry data (a hard link written with
        // its content); it is not part of the file system.
        stream.skip(raw.size + padding(raw.size), &display_name)?;
        self.entries.push(LayerEntry {
            path,
            kind,
            meta: raw.meta,
        });
        Ok(())
    }

    /// Streams a regular file's content to the sink while hashing it, and
    /// records its chunk.
    fn stream_file<R: Read>(
        &mut self,
        stream: &mut TarStream<R>,
        raw: &RawEntry,
        display_name: &str,
        sink: &mut dyn FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> Result<FileData, TarLayerError> {
        let data = FileData {
            layer: self.layer,
            data_offset: self.data_size,
            size: raw.size,
        };
        if raw.size == 0 {
            return Ok(data);
        }
        self.data_size = self.data_size.checked_add(raw.size).ok_or_else(|| {
            TarLayerError::DataSizeOverflow {
                name: display_name.to_string(),
            }
        })?;

        let mut hasher = Sha256::new();
        let mut done = 0u64;
        while done < raw.size {
            let want = (raw.size - done).min(self.buffer.len() as u64) as usize;
            let read = stream.read_some(&mut self.buffer[..want])?;
            if read == 0 {
                return Err(TarLayerError::Truncated {
                    offset: stream.offset,
                    name: display_name.to_string(),
                });
            }
            let piece = &self.buffer[..read];
            hasher.update(piece);
            sink(data.data_offset + done, piece).map_err(|source| TarLayerError::Sink {
                name: display_name.to_string(),
                data_offset: data.data_offset + done,
                source,
            })?;
            done += read as u64;
        }
        stream.skip(padding(raw.size), display_name)?;

        self.chunks.push(ChunkRecord::local(
            data.data_offset,
            raw.size,
            Some(hasher.finalize().into()),
            display_name.into(),
        ));
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::ChunkSource;

    fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_size(size);
        header.set_mode(mode);
        header.set_mtime(1_700_000_000);
        header
    }

    fn add_file(builder: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
        let mut file = header(tar::EntryType::Regular, data.len() as u64, 0o644);
        builder.append_data(&mut file, name, data).unwrap();
    }

    fn index(tar_bytes: &[u8]) -> (LayerIndex, Vec<(u64, Vec<u8>)>) {
        let mut pieces = Vec::new();
        let mut sink = |offset: u64, bytes: &[u8]| {
            pieces.push((offset, bytes.to_vec()));
            Ok(())
        };
        let index = index_tar(2, "sha256:tar", tar_bytes, &mut sink).unwrap();
        (index, pieces)
    }

    fn parts(items: &[&str]) -> Vec<Vec<u8>> {
        items.iter().map(|item| item.as_bytes().to_vec()).collect()
    }

    #[test]
    fn index_tar_entry_kinds() {
        let mut builder = tar::Builder::new(Vec::new());
        let mut dir = header(tar::EntryType::Directory, 0, 0o1777);
        builder.append_data(&mut dir, "./tmp/", &[][..]).unwrap();
        add_file(&mut builder, "./tmp/a", b"hello");
        add_file(&mut builder, "tmp/empty", b"");
        let mut link = header(tar::EntryType::Link, 0, 0o644);
        builder.append_link(&mut link, "tmp/b", "./tmp/a").unwrap();
        let mut symlink = header(tar::EntryType::Symlink, 0, 0o777);
        builder
            .append_link(&mut symlink, "tmp/s", "../etc")
            .unwrap();
        let mut char_dev = header(tar::EntryType::Char, 0, 0o666);
        char_dev.set_device_major(1).unwrap();
        char_dev.set_device_minor(3).unwrap();
        builder
            .append_data(&mut char_dev, "dev/null", &[][..])
            .unwrap();
        let mut block_dev = header(tar::EntryType::Block, 0, 0o660);
        block_dev.set_device_major(8).unwrap();
        builder
            .append_data(&mut block_dev, "dev/sda", &[][..])
            .unwrap();
        let mut fifo = header(tar::EntryType::Fifo, 0, 0o644);
        builder.append_data(&mut fifo, "dev/fifo", &[][..]).unwrap();
        add_file(&mut builder, "tmp/c", b"world!");
        let tar_bytes = builder.into_inner().unwrap();

        let (index, pieces) = index(&tar_bytes);
        let kinds: Vec<(Vec<Vec<u8>>, EntryKind)> = index
            .entries
            .iter()
            .map(|entry| {
                let components = entry.path.components().map(<[u8]>::to_vec).collect();
                (components, entry.kind.clone())
            })
            .collect();
        let reg = |data_offset, size| EntryKind::Reg {
            data: FileData {
                layer: 2,
                data_offset,
                size,
            },
        };
        assert_eq!(
            kinds,
            vec![
                (parts(&["tmp"]), EntryKind::Dir),
                (parts(&["tmp", "a"]), reg(0, 5)),
                (parts(&["tmp", "empty"]), reg(5, 0)),
                (
                    parts(&["tmp", "b"]),
                    EntryKind::Hardlink {
                        target: parts(&["tmp", "a"]).into()
                    }
                ),
                (
                    parts(&["tmp", "s"]),
                    EntryKind::Symlink {
                        target: b"../etc".to_vec()
                    }
                ),
                (
                    parts(&["dev", "null"]),
                    EntryKind::CharDev { major: 1, minor: 3 }
                ),
                (
                    parts(&["dev", "sda"]),
                    EntryKind::BlockDev { major: 8, minor: 0 }
                ),
                (parts(&["dev", "fifo"]), EntryKind::Fifo),
                (parts(&["tmp", "c"]), reg(5, 6)),
            ]
        );
        assert_eq!(index.entries[0].meta.mode, 0o1777);
        assert_eq!(index.entries[0].meta.mtime, 1_700_000_000);
        assert_eq!(index.data_size, 11);
        assert_eq!(
            pieces,
            vec![(0, b"hello".to_vec()), (5, b"world!".to_vec())]
        );

        assert_eq!(index.chunks.len(), 2);
        assert_eq!(index.chunks[1].data_offset, 5);
        assert_eq!(index.chunks[1].size, 6);
        assert_eq!(index.chunks[1].source(), ChunkSource::Local);
        let expected: [u8; 32] = Sha256::digest(b"world!").into();
        assert_eq!(index.chunks[1].digest(), Some(expected));
        assert_eq!(index.prefetch, Prefetch::Nothing);
    }

    #[test]
    fn index_tar_pax_records() {
        let mut builder = tar::Builder::new(Vec::new());
        let binary: Vec<u8> = (0u8..=255).collect();
        let long_name = format!("deep/{}/file", "d".repeat(200));
        builder
            .append_pax_extensions([
                ("SCHILY.xattr.user.binary", binary.as_slice()),
                ("SCHILY.xattr.security.capability", b"\x01\x00\n".as_slice()),
                ("SCHILY.xattr.user.empty", b"".as_slice()),
                ("uid", b"3000000".as_slice()),
                ("gid", b"3000001".as_slice()),
                ("mtime", b"-1.25".as_slice()),
                ("path", long_name.as_bytes()),
            ])
            .unwrap();
        add_file(&mut builder, "short", b"data");
        let tar_bytes = builder.into_inner().unwrap();

        let (index, _) = index(&tar_bytes);
        let entry = &index.entries[0];
        assert_eq!(entry.path.component_count(), 3);
        assert_eq!(
            entry.path.components().nth(1),
            Some("d".repeat(200).as_bytes())
        );
        assert_eq!((entry.meta.uid, entry.meta.gid), (3_000_000, 3_000_001));
        assert_eq!((entry.meta.mtime, entry.meta.mtime_nsec), (-2, 750_000_000));
        assert_eq!(
            entry.meta.xattrs,
            vec![
                (b"security.capability".to_vec(), b"\x01\x00\n".to_vec()),
                (b"user.binary".to_vec(), binary),
                (b"user.empty".to_vec(), Vec::new()),
            ]
        );
    }

    #[test]
    fn index_tar_gnu_long_names() {
        let mut builder = tar::Builder::new(Vec::new());
        let long_name = format!("{}/file", "n".repeat(150));
        add_file(&mut builder, &long_name, b"x");
        let mut link = header(tar::EntryType::Link, 0, 0o644);
        let long_link_name = format!("{}/link", "l".repeat(150));
        builder
            .append_link(&mut link, &long_link_name, &long_name)
            .unwrap();
        let tar_bytes = builder.into_inner().unwrap();

        let (index, _) = index(&tar_bytes);
        assert_eq!(index.entries[0].path, parts(&[&"n".repeat(150), "file"]));
        assert_eq!(index.entries[1].path, parts(&[&"l".repeat(150), "link"]));
        assert_eq!(
            index.entries[1].kind,
            EntryKind::Hardlink {
                target: parts(&[&"n".repeat(150), "file"]).into()
            }
        );
    }

    #[test]
    fn index_tar_skips_landmarks() {
        let mut builder = tar::Builder::new(Vec::new());
        add_file(&mut builder, ".prefetch.landmark", b"v");
        add_file(&mut builder, "a", b"abc");
        add_file(&mut builder, "./.no.prefetch.landmark", b"v");
        add_file(&mut builder, "stargz.index.json", b"{}");
        add_file(&mut builder, "dir/stargz.index.json", b"{}");
        let tar_bytes = builder.into_inner().unwrap();

        let (index, pieces) = index(&tar_bytes);
        let paths: Vec<_> = index
            .entries
            .iter()
            .map(|entry| entry.path.clone())
            .collect();
        assert_eq!(
            paths,
            vec![parts(&["a"]), parts(&["dir", "stargz.index.json"])]
        );
        assert_eq!(pieces, vec![(0, b"abc".to_vec()), (3, b"{}".to_vec())]);
    }

    #[test]
    fn index_tar_rejects_bad_streams() {
        let mut builder = tar::Builder::new(Vec::new());
        add_file(&mut builder, "a", &[7u8; 1000]);
        let good = builder.into_inner().unwrap();

        let mut bad_checksum = good.clone();
        bad_checksum[0] = b'b';
        let truncated_data = good[..700].to_vec();
        let truncated_header = good[..100].to_vec();
        let mut unknown_type = good.clone();
        unknown_type[TYPEFLAG_OFFSET] = b'Z';
        let mut fixed = tar::Header::from_byte_slice(&unknown_type[..512]).clone();
        fixed.set_cksum();
        unknown_type[..512].copy_from_slice(fixed.as_bytes());

        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("bad checksum", bad_checksum, "checksum"),
            ("truncated data", truncated_data, "truncated"),
            ("truncated header", truncated_header, "truncated"),
            ("unknown type", unknown_type, "not supported"),
        ];
        for (case, bytes, message) in cases {
            let mut sink = |_: u64, _: &[u8]| Ok(());
            let error = index_tar(0, "sha256:x", bytes.as_slice(), &mut sink).expect_err(case);
            assert!(
                error.to_string().contains(message),
                "case {case}: {error} lacks {message:?}"
            );
        }

        let mut failing_sink = |_: u64, _: &[u8]| Err(io::Error::other("disk full"));
        let error = index_tar(0, "sha256:x", good.as_slice(), &mut failing_sink).unwrap_err();
        assert!(matches!(error, TarLayerError::Sink { .. }), "{error}");
    }
}
