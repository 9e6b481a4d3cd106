//! The eStargz TOC: the gzip member holding a tar with one entry,
//! `stargz.index.json`, and the JSON it contains (eStargz spec,
//! containerd/stargz-snapshotter docs/estargz.md).

use std::collections::BTreeMap;
use std::io::Read;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::name::NameError;
use super::rfc3339::TimestampError;

/// Default limit on the decompressed size of the TOC tar, 512 MiB. A TOC of
/// about 4 million entries fits; a gzip bomb stops here instead of
/// exhausting memory.
pub const DEFAULT_MAX_TOC_SIZE: u64 = 512 << 20;

/// Name of the TOC entry in the TOC tar.
pub const TOC_TAR_NAME: &str = "stargz.index.json";

/// The only TOC version the eStargz spec defines.
pub const TOC_VERSION: i64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum TocError {
    #[error("reading the TOC gzip member or the tar inside it failed: {source}")]
    Read { source: std::io::Error },

    #[error(
        "the TOC decompresses to more than {limit} bytes; the blob is corrupt or hostile, \
         or raise the TOC size limit"
    )]
    TooLarge { limit: u64 },

    #[error(
        "the TOC tar starts with {found:?} instead of \"stargz.index.json\"; \
         the TOC offset in the footer is wrong or the blob is not eStargz"
    )]
    MissingEntry { found: Option<String> },

    #[error("the TOC entry stargz.index.json is truncated: {read} of {size} bytes")]
    Truncated { read: u64, size: u64 },

    #[error("the TOC JSON is invalid: {source}")]
    Json { source: serde_json::Error },

    #[error("the TOC has version {version}; only version 1 is supported")]
    UnsupportedVersion { version: i64 },

    #[error("the TOC has {count} entries, over the limit of {limit}")]
    TooManyEntries { count: usize, limit: usize },

    #[error("TOC entry {index} has an invalid name: {source}")]
    Name { index: usize, source: NameError },

    #[error("TOC entry {name:?} has unknown type {kind:?}")]
    UnknownType { name: String, kind: String },

    #[error("TOC entry {name:?} has invalid {field} {value}: {reason}")]
    InvalidField {
        name: String,
        field: &'static str,
        value: i64,
        reason: &'static str,
    },

    #[error("TOC entry {name:?} has an invalid modtime: {source}")]
    InvalidModtime {
        name: String,
        source: TimestampError,
    },

    #[error("TOC entry {name:?} has xattr {key:?} with invalid base64: {source}")]
    InvalidXattr {
        name: String,
        key: String,
        source: base64::DecodeError,
    },

    #[error("TOC entry {name:?} has {field} {value:?}, expected \"sha256:\" and 64 hex digits")]
    InvalidDigest {
        name: String,
        field: &'static str,
        value: String,
    },

    #[error(
        "TOC entry {name:?} has {field} {value:#x}, outside the blob's data before the TOC \
         at {toc_offset:#x}"
    )]
    OffsetOutOfRange {
        name: String,
        field: &'static str,
        value: u64,
        toc_offset: u64,
    },

    #[error("TOC entry {name:?} of type {kind} has no linkName")]
    MissingLinkName { name: String, kind: &'static str },

    #[error("TOC chunk entry {name:?} follows no regular file of that name")]
    ChunkWithoutFile { name: String },

    #[error("TOC entry {name:?} has an invalid chunk layout: {reason}")]
    ChunkLayout { name: String, reason: String },

    #[error(
        "the names of the TOC's regular files add up to more than {limit} bytes; \
         split the layer"
    )]
    NamesTooLarge { limit: u64 },

    #[error("TOC entry {name:?} makes the layer's data larger than 2^64 bytes")]
    DataSizeOverflow { name: String },
}

/// Limits on what a TOC may contain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TocLimits {
    /// Maximum number of TOC entries, chunks included.
    pub max_entries: usize,
    /// Maximum decompressed size of the TOC member in bytes.
    pub max_toc_bytes: u64,
}

impl Default for TocLimits {
    fn default() -> Self {
        TocLimits {
            max_entries: 4_000_000,
            max_toc_bytes: DEFAULT_MAX_TOC_SIZE,
        }
    }
}

/// One TOC entry, fields as the reference writer names them. Fields the
/// writer omits when empty default to zero or empty. Owner names
/// (`userName`, `groupName`) are ignored because ext4 stores numeric ids.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct JsonEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub size: i64,
    pub modtime: Option<String>,
    pub link_name: String,
    pub mode: i64,
    pub uid: i64,
    pub gid: i64,
    pub dev_major: i64,
    pub dev_minor: i64,
    pub xattrs: Option<BTreeMap<String, Option<String>>>,
    pub digest: String,
    pub offset: i64,
    pub chunk_offset: i64,
    pub chunk_size: i64,
    pub chunk_digest: String,
    pub inner_offset: i64,
}

/// Gunzips the TOC member and returns the content of its `stargz.index.json`
/// entry.
///
/// `toc_bytes` is `blob[toc_offset .. blob_size - footer_size]`. At most
/// `max_toc_size` decompressed bytes are read ([`DEFAULT_MAX_TOC_SIZE`] is a
/// sensible value); past that the call fails with [`TocError::TooLarge`].
pub fn extract_toc_json(toc_bytes: &[u8], max_toc_size: u64) -> Result<Vec<u8>, TocError> {
    let (json, _digest) = stream_toc_json(toc_bytes, max_toc_size, |reader, size| {
        // `size` is at most `max_toc_size`, which the caller chose to allow in memory.
        let mut json = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        reader.read_to_end(&mut json).map(|_| json)
    })?;
    // A read error is reported by `stream_toc_json` itself.
    Ok(json.unwrap_or_default())
}

/// Gunzips the TOC member and hands its `stargz.index.json` entry to
/// `consume` as a buffered reader, with the entry's size from the tar
/// header. Returns what `consume` returned and the sha256 of the whole
/// entry, which is read to its end even when `consume` stops early.
///
/// Errors of the member itself (gzip or tar damage, a missing or truncated
/// entry, more than `max_toc_size` decompressed bytes) take precedence over
/// whatever `consume` returned, since they explain it.
pub(crate) fn stream_toc_json<T>(
    toc_bytes: &[u8],
    max_toc_size: u64,
    consume: impl FnOnce(&mut dyn std::io::BufRead, u64) -> T,
) -> Result<(T, [u8; 32]), TocError> {
    let decoder = flate2::read::MultiGzDecoder::new(toc_bytes);
    let mut limited = decoder.take(max_toc_size);

    let result = read_toc_entry(&mut limited, max_toc_size, consume);
    match result {
        // Hitting the limit shows up as a short read inside the tar reader;
        // report the limit, which is the cause.
        Err(TocError::Read { .. } | TocError::Truncated { .. }) if limited.limit() == 0 => {
            Err(TocError::TooLarge {
                limit: max_toc_size,
            })
        }
        other => other,
    }
}

/// Buffer size between the tar entry and the JSON parser.
const TOC_READ_BUFFER: usize = 256 << 10;

fn read_toc_entry<T>(
    reader: &mut impl Read,
    max_toc_size: u64,
    consume: impl FnOnce(&mut dyn std::io::BufRead, u64) -> T,
) -> Result<(T, [u8; 32]), TocError> {
    let mut archive = tar::Archive::new(reader);
    let mut entries = archive
        .entries()
        .map_err(|source| TocError::Read { source })?;
    let mut entry = match entries.next() {
        None => return Err(TocError::MissingEntry { found: None }),
        Some(entry) => entry.map_err(|source| TocError::Read { source })?,
    };

    let name = entry.path_bytes();
    if name.as_ref() != TOC_TAR_NAME.as_bytes() {
        return Err(TocError::MissingEntry {
            found: Some(String::from_utf8_lossy(&name).into_owned()),
        });
    }
    let size = entry.size();
    if size > max_toc_size {
        return Err(TocError::TooLarge {
            limit: max_toc_size,
        });
    }

    let mut hashing = HashingReader {
        inner: &mut entry,
        hasher: Sha256::new(),
        read: 0,
        error: None,
    };
    let value = consume(
        &mut std::io::BufReader::with_capacity(TOC_READ_BUFFER, &mut hashing),
        size,
    );
    // The buffered bytes `consume` left were hashed already; hash the rest.
    if hashing.error.is_none() {
        // An error here is kept in `hashing.error`.
        let _ = std::io::copy(&mut hashing, &mut std::io::sink());
    }
    if let Some(source) = hashing.error {
        return Err(TocError::Read { source });
    }
    if hashing.read != size {
        return Err(TocError::Truncated {
            read: hashing.read,
            size,
        });
    }
    Ok((value, hashing.hasher.finalize().into()))
}

/// A reader that hashes and counts what passes through it and keeps the
/// first error, so the entry's own damage can be told apart from a parse
/// error of its content.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    read: u64,
    error: Option<std::io::Error>,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(error) = &self.error {
            return Err(std::io::Error::new(error.kind(), error.to_string()));
        }
        loop {
            match self.inner.read(buf) {
                Ok(count) => {
                    self.hasher.update(&buf[..count]);
                    self.read += count as u64;
                    return Ok(count);
                }
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => {
                    let copy = std::io::Error::new(error.kind(), error.to_string());
                    self.error = Some(error);
                    return Err(copy);
                }
            }
        }
    }
}

/// What the TOC document holds besides its entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TocSummary {
    pub version: i64,
    /// Entries in the document, including those past the limit that were
    /// counted but not parsed.
    pub count: usize,
}

/// Parses the TOC JSON document from `de`, handing each entry to `sink`
/// with its position as soon as it is parsed, so no more than one entry is
/// held at a time.
///
/// Entries past `limits.max_entries` are only counted, and the count is
/// checked after the whole document parsed, so a JSON error anywhere takes
/// precedence, as does the count over the version. Without the limit, a few
/// hundred megabytes of `{},` would expand to tens of gigabytes of entries.
pub(crate) fn parse_toc<'de, R: serde_json::de::Read<'de>>(
    de: &mut serde_json::Deserializer<R>,
    limits: &TocLimits,
    sink: &mut dyn FnMut(usize, JsonEntry),
) -> Result<TocSummary, TocError> {
    let summary = serde::de::DeserializeSeed::deserialize(
        TocSeed {
            max_entries: limits.max_entries,
            sink,
        },
        &mut *de,
    )
    .and_then(|summary| de.end().map(|()| summary))
    .map_err(|source| TocError::Json { source })?;

    if summary.count > limits.max_entries {
        return Err(TocError::TooManyEntries {
            count: summary.count,
            limit: limits.max_entries,
        });
    }
    if summary.version != TOC_VERSION {
        return Err(TocError::UnsupportedVersion {
            version: summary.version,
        });
    }
    Ok(summary)
}

/// Fields of the TOC document; others are ignored.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum TocField {
    Version,
    Entries,
    #[serde(other)]
    Other,
}

/// The TOC document (`{"version": 1, "entries": [...]}`), with its entries
/// passed on one at a time.
struct TocSeed<'a> {
    max_entries: usize,
    sink: &'a mut dyn FnMut(usize, JsonEntry),
}

impl<'de> serde::de::DeserializeSeed<'de> for TocSeed<'_> {
    type Value = TocSummary;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<TocSummary, D::Error> {
        deserializer.deserialize_struct("JsonToc", &["version", "entries"], self)
    }
}

impl<'de> serde::de::Visitor<'de> for TocSeed<'_> {
    type Value = TocSummary;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("struct JsonToc")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<TocSummary, A::Error> {
        use serde::de::Error as _;

        let mut version = None;
        let mut count = None;
        while let Some(field) = map.next_key::<TocField>()? {
            match field {
                TocField::Version => {
                    if version.is_some() {
                        return Err(A::Error::duplicate_field("version"));
                    }
                    version = Some(map.next_value::<i64>()?);
                }
                TocField::Entries => {
                    if count.is_some() {
                        return Err(A::Error::duplicate_field("entries"));
                    }
                    count = Some(map.next_value_seed(EntriesSeed {
                        max_entries: self.max_entries,
                        sink: &mut *self.sink,
                    })?);
                }
                TocField::Other => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(TocSummary {
            version: version.ok_or_else(|| A::Error::missing_field("version"))?,
            count: count.unwrap_or(0),
        })
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<TocSummary, A::Error> {
        use serde::de::Error as _;

        let version = seq
            .next_element::<i64>()?
            .ok_or_else(|| A::Error::invalid_length(0, &"struct JsonToc with 2 elements"))?;
        let count = seq.next_element_seed(EntriesSeed {
            max_entries: self.max_entries,
            sink: self.sink,
        })?;
        Ok(TocSummary {
            version,
            count: count.unwrap_or(0),
        })
    }
}

/// The `entries` array: each entry up to the limit is parsed and passed on,
/// the rest are skipped and counted.
struct EntriesSeed<'a> {
    max_entries: usize,
    sink: &'a mut dyn FnMut(usize, JsonEntry),
}

impl<'de> serde::de::DeserializeSeed<'de> for EntriesSeed<'_> {
    type Value = usize;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<usize, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for EntriesSeed<'_> {
    type Value = usize;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("a sequence")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
        let mut count = 0usize;
        while count < self.max_entries {
            let Some(entry) = seq.next_element::<JsonEntry>()? else {
                return Ok(count);
            };
            (self.sink)(count, entry);
            count += 1;
        }
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
            count = count.saturating_add(1);
        }
        Ok(count)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Write;

    use super::*;

    /// Builds a TOC gzip member: a tar with the given entries, gzipped.
    pub(crate) fn toc_member(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut header = tar::Header::new_ustar();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_entry_type(tar::EntryType::Regular);
            builder.append_data(&mut header, name, *data).unwrap();
        }
        let tar = builder.into_inner().unwrap();
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(&tar).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn extract_toc_json_returns_entry() {
        let json = br#"{"version":1,"entries":[]}"#;
        let member = toc_member(&[(TOC_TAR_NAME, json)]);
        let extracted = extract_toc_json(&member, DEFAULT_MAX_TOC_SIZE).unwrap();
        assert_eq!(extracted, json);
    }

    #[test]
    fn extract_toc_json_rejects_other_entry() {
        let member = toc_member(&[("other.json", b"{}")]);
        let error = extract_toc_json(&member, DEFAULT_MAX_TOC_SIZE).unwrap_err();
        assert!(
            matches!(&error, TocError::MissingEntry { found: Some(name) } if name == "other.json"),
            "{error}"
        );
    }

    #[test]
    fn extract_toc_json_rejects_garbage() {
        let cases: [(&str, &[u8]); 3] = [
            ("empty", b""),
            ("not gzip", b"this is not a gzip member at all"),
            (
                "truncated gzip",
                &toc_member(&[(TOC_TAR_NAME, b"{}")])[..20],
            ),
        ];
        for (case, bytes) in cases {
            assert!(
                extract_toc_json(bytes, DEFAULT_MAX_TOC_SIZE).is_err(),
                "case {case}"
            );
        }
    }

    #[test]
    fn extract_toc_json_limits_entry_size() {
        let json = vec![b' '; 4096];
        let member = toc_member(&[(TOC_TAR_NAME, &json)]);
        let error = extract_toc_json(&member, 2048).unwrap_err();
        assert!(
            matches!(error, TocError::TooLarge { limit: 2048 }),
            "{error}"
        );
    }

    #[test]
    fn extract_toc_json_stops_gzip_bomb() {
        // A tar header claiming a 64 MiB TOC followed by 16 MiB of zeros
        // (a test-sized bomb); only 1 MiB may be decompressed.
        let mut header = tar::Header::new_ustar();
        header.set_path(TOC_TAR_NAME).unwrap();
        header.set_size(64 << 20);
        header.set_mode(0o644);
        header.set_cksum();
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(header.as_bytes()).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..16 {
            encoder.write_all(&zeros).unwrap();
        }
        let bomb = encoder.finish().unwrap();
        assert!(bomb.len() < 1 << 20, "bomb is {} bytes", bomb.len());

        let error = extract_toc_json(&bomb, 1 << 20).unwrap_err();
        assert!(
            matches!(error, TocError::TooLarge { limit: 1048576 }),
            "{error}"
        );

        // Zeros alone read as an empty tar: no TOC entry, and the limit holds.
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        for _ in 0..16 {
            encoder.write_all(&zeros).unwrap();
        }
        let zeros_bomb = encoder.finish().unwrap();
        let error = extract_toc_json(&zeros_bomb, 1 << 20).unwrap_err();
        assert!(
            matches!(error, TocError::MissingEntry { found: None }),
            "{error}"
        );
    }

    fn parse_toc_json(json: &[u8], limits: &TocLimits) -> Result<TocSummary, TocError> {
        let mut de = serde_json::Deserializer::from_slice(json);
        parse_toc(&mut de, limits, &mut |_, _| {})
    }

    #[test]
    fn parse_toc_checks_version_and_count() {
        let limits = TocLimits {
            max_entries: 1,
            ..TocLimits::default()
        };
        let error = parse_toc_json(br#"{"version":2,"entries":[]}"#, &limits).unwrap_err();
        assert!(
            matches!(error, TocError::UnsupportedVersion { version: 2 }),
            "{error}"
        );

        let two =
            br#"{"version":1,"entries":[{"name":"a","type":"dir"},{"name":"b","type":"dir"}]}"#;
        let error = parse_toc_json(two, &limits).unwrap_err();
        assert!(
            matches!(error, TocError::TooManyEntries { count: 2, limit: 1 }),
            "{error}"
        );

        let three = br#"{"entries":[{},{"name":"b"},{"x":[1,{}]}],"version":1}"#;
        let error = parse_toc_json(three, &limits).unwrap_err();
        assert!(
            matches!(error, TocError::TooManyEntries { count: 3, limit: 1 }),
            "entries past the limit are counted: {error}"
        );

        let cases: [(&str, &[u8], &str); 5] = [
            ("syntax", b"{not json", "key must be a string"),
            (
                "missing version",
                br#"{"entries":[]}"#,
                "missing field `version`",
            ),
            (
                "duplicate entries",
                br#"{"version":1,"entries":[],"entries":[]}"#,
                "duplicate field `entries`",
            ),
            (
                "entries not an array",
                br#"{"version":1,"entries":{}}"#,
                "expected a sequence",
            ),
            (
                "trailing bytes",
                br#"{"version":1,"entries":[]} x"#,
                "trailing characters",
            ),
        ];
        for (case, json, message) in cases {
            let error = parse_toc_json(json, &limits).unwrap_err();
            assert!(
                matches!(&error, TocError::Json { .. }) && error.to_string().contains(message),
                "case {case}: {error}"
            );
        }
    }

    #[test]
    fn parse_toc_passes_entries_in_order() {
        let json = br#"{"other":{"a":[1]},"entries":[{"name":"a","type":"dir"},
            {"name":"b","type":"reg","size":3}],"version":1}"#;
        let mut seen = Vec::new();
        let mut de = serde_json::Deserializer::from_slice(json);
        let summary = parse_toc(&mut de, &TocLimits::default(), &mut |index, entry| {
            seen.push((index, entry.name, entry.kind, entry.size))
        })
        .unwrap();
        assert_eq!(
            summary,
            TocSummary {
                version: 1,
                count: 2
            }
        );
        assert_eq!(
            seen,
            vec![
                (0, "a".to_string(), "dir".to_string(), 0),
                (1, "b".to_string(), "reg".to_string(), 3)
            ]
        );
    }

    #[test]
    fn stream_toc_json_hashes_the_whole_entry() {
        let json = br#"{"version":1,"entries":[]}   "#;
        let member = toc_member(&[(TOC_TAR_NAME, json)]);
        // The consumer reads only 3 bytes; the digest still covers all of them.
        let (first, digest) = stream_toc_json(&member, DEFAULT_MAX_TOC_SIZE, |reader, size| {
            let mut start = [0u8; 3];
            reader.read_exact(&mut start).map(|()| (start, size))
        })
        .unwrap();
        assert_eq!(first.unwrap(), (*b"{\"v", json.len() as u64));
        assert_eq!(digest, <[u8; 32]>::from(Sha256::digest(json)));
    }
}
