//! The eStargz TOC: the gzip member holding a tar with one entry,
//! `stargz.index.json`, and the JSON it contains (eStargz spec,
//! containerd/stargz-snapshotter docs/estargz.md).

use std::collections::BTreeMap;
use std::io::Read;

use serde::Deserialize;

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

/// The TOC JSON document.
#[derive(Debug, Deserialize)]
pub(crate) struct JsonToc {
    pub version: i64,
    #[serde(default)]
    pub entries: Vec<JsonEntry>,
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
    let decoder = flate2::read::MultiGzDecoder::new(toc_bytes);
    let mut limited = decoder.take(max_toc_size);

    let result = read_toc_entry(&mut limited, max_toc_size);
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

fn read_toc_entry(reader: &mut impl Read, max_toc_size: u64) -> Result<Vec<u8>, TocError> {
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

    // `size` is at most `max_toc_size`, which the caller chose to allow in memory.
    let mut json = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    entry
        .read_to_end(&mut json)
        .map_err(|source| TocError::Read { source })?;
    if json.len() as u64 != size {
        return Err(TocError::Truncated {
            read: json.len() as u64,
            size,
        });
    }
    Ok(json)
}

/// Parses the TOC JSON document.
///
/// The entries are counted in a first pass that keeps none of them, so a TOC
/// with more than `limits.max_entries` entries fails before any memory is
/// spent on them. Without it, a few hundred megabytes of `{},` would expand
/// to tens of gigabytes of entries. NOTE: a TOC near the 4 million entry limit
/// still needs an estimated 2 GiB (about 500 bytes per entry with its strings)
/// while it is parsed.
pub(crate) fn parse_toc_json(toc_json: &[u8], limits: &TocLimits) -> Result<JsonToc, TocError> {
    let counted: EntryCount =
        serde_json::from_slice(toc_json).map_err(|source| TocError::Json { source })?;
    if counted.entries.0 > limits.max_entries {
        return Err(TocError::TooManyEntries {
            count: counted.entries.0,
            limit: limits.max_entries,
        });
    }

    let toc: JsonToc =
        serde_json::from_slice(toc_json).map_err(|source| TocError::Json { source })?;
    if toc.version != TOC_VERSION {
        return Err(TocError::UnsupportedVersion {
            version: toc.version,
        });
    }
    Ok(toc)
}

/// The TOC document with its entries counted, not kept.
#[derive(Deserialize)]
struct EntryCount {
    #[serde(default)]
    entries: CountedSeq,
}

/// The length of a JSON array whose elements are skipped.
#[derive(Default)]
struct CountedSeq(usize);

impl<'de> Deserialize<'de> for CountedSeq {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Counter;

        impl<'de> serde::de::Visitor<'de> for Counter {
            type Value = CountedSeq;

            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("an array of TOC entries")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<CountedSeq, A::Error> {
                let mut count = 0usize;
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    count += 1;
                }
                Ok(CountedSeq(count))
            }
        }

        deserializer.deserialize_seq(Counter)
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

    #[test]
    fn parse_toc_json_checks_version_and_count() {
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

        let error = parse_toc_json(b"{not json", &limits).unwrap_err();
        assert!(matches!(error, TocError::Json { .. }), "{error}");
    }
}
