//! Layer entries as the eStargz writer sees them: metadata from a tar header
//! (POSIX.1-2001 pax, GNU, ustar) or a directory walk, plus where the file
//! content is.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use super::WriterError;
use crate::estargz::{NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME};
use crate::pax;

/// Prefix of pax records holding extended attributes.
const PAX_XATTR_PREFIX: &str = "SCHILY.xattr.";
/// Prefix of pax records describing GNU sparse files.
const PAX_GNU_SPARSE_PREFIX: &str = "GNU.sparse.";
/// Largest pax header or GNU long name read, 1 MiB; real ones are a few KiB.
const MAX_EXTENSION_SIZE: u64 = 1 << 20;

/// The entry types an eStargz TOC names (`reg`, `dir`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryType {
    Dir,
    Reg,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
}

impl EntryType {
    /// The TOC `type` value.
    pub fn toc_name(self) -> &'static str {
        match self {
            EntryType::Dir => "dir",
            EntryType::Reg => "reg",
            EntryType::Symlink => "symlink",
            EntryType::Hardlink => "hardlink",
            EntryType::Char => "char",
            EntryType::Block => "block",
            EntryType::Fifo => "fifo",
        }
    }

    /// The tar typeflag byte.
    pub fn typeflag(self) -> u8 {
        match self {
            EntryType::Reg => b'0',
            EntryType::Hardlink => b'1',
            EntryType::Symlink => b'2',
            EntryType::Char => b'3',
            EntryType::Block => b'4',
            EntryType::Dir => b'5',
            EntryType::Fifo => b'6',
        }
    }
}

/// Metadata of one entry, as written to the tar header and the TOC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryMeta {
    /// Name as stored in the tar stream: raw bytes, `./` prefix and the
    /// trailing `/` of directories kept as the source had them.
    pub name: Vec<u8>,
    pub kind: EntryType,
    /// Content size; 0 for everything but regular files.
    pub size: u64,
    /// Permission bits including setuid, setgid and sticky.
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub user_name: String,
    pub group_name: String,
    /// Seconds since the Unix epoch; may be negative.
    pub mtime: i64,
    /// Nanoseconds within `mtime`, below 1e9.
    pub mtime_nsec: u32,
    /// Symlink target, or the hard link target's name as stored in the tar.
    pub link_name: Vec<u8>,
    pub dev_major: u32,
    pub dev_minor: u32,
    /// Extended attributes by full name, values as raw bytes.
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

impl EntryMeta {
    /// A regular file entry with root ownership, mode 0644 and mtime 0.
    pub fn regular(name: &str, size: u64) -> EntryMeta {
        EntryMeta {
            name: name.as_bytes().to_vec(),
            kind: EntryType::Reg,
            size,
            mode: 0o644,
            uid: 0,
            gid: 0,
            user_name: String::new(),
            group_name: String::new(),
            mtime: 0,
            mtime_nsec: 0,
            link_name: Vec::new(),
            dev_major: 0,
            dev_minor: 0,
            xattrs: BTreeMap::new(),
        }
    }

    /// The name for messages, lossily decoded.
    pub fn display_name(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
}

/// Where an entry's content comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// No content (anything but a non-empty regular file).
    None,
    /// `len` bytes at `offset` of the spooled input tar.
    TarRange { offset: u64, len: u64 },
    /// The whole file at this path (a directory walk).
    File(PathBuf),
}

/// One entry of the layer and its content.
#[derive(Clone, Debug)]
pub struct SourceEntry {
    pub meta: EntryMeta,
    pub content: Content,
}

/// Returns the name without `./` prefixes and surrounding slashes, which
/// identifies an entry for de-duplication and prioritisation (`./a/b/` and
/// `a/b` are the same path; the root is the empty name).
pub fn clean_name(name: &[u8]) -> Vec<u8> {
    let mut parts: Vec<&[u8]> = Vec::new();
    for part in name.split(|&byte| byte == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    parts.join(&b'/')
}

/// Returns whether the entry is one the eStargz writer adds itself and so
/// drops from its input: the landmarks and the TOC entry at the root.
pub fn is_builder_entry(clean: &[u8]) -> bool {
    [PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK, TOC_TAR_NAME]
        .iter()
        .any(|name| clean == name.as_bytes())
}

/// Reads the entry list of the uncompressed tar at `path`; contents stay in
/// the file and are named by [`Content::TarRange`].
///
/// Only the last entry of a duplicated path is kept, at its own position, as
/// a tar extraction would leave it. Landmark files and `stargz.index.json` at
/// the root are dropped, because the writer adds its own.
pub fn read_tar_entries(path: &Path) -> Result<Vec<SourceEntry>, WriterError> {
    let file = File::open(path).map_err(|source| WriterError::Input {
        path: path.to_path_buf(),
        source,
    })?;
    let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, file));
    let tar_error = |source: std::io::Error| WriterError::Tar {
        path: path.to_path_buf(),
        source,
    };

    let mut globals: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut local: Option<BTreeMap<String, Vec<u8>>> = None;
    let mut long_name: Option<Vec<u8>> = None;
    let mut long_link: Option<Vec<u8>> = None;
    let mut entries = Vec::new();
    // Raw mode: the tar crate splits pax records at newlines, but xattr
    // values may contain newlines, so extension headers are parsed here by
    // their length prefix.
    // NOTE: the stream advances by the header's size field, so a pax `size`
    // record (files of 8 GiB and more from ustar-only writers) is not honoured.
    for entry in archive.entries().map_err(tar_error)?.raw(true) {
        let mut entry = entry.map_err(tar_error)?;
        let header_type = entry.header().entry_type();
        let extension = match header_type {
            tar::EntryType::XGlobalHeader
            | tar::EntryType::XHeader
            | tar::EntryType::GNULongName
            | tar::EntryType::GNULongLink => {
                let mut data = Vec::new();
                (&mut entry)
                    .take(MAX_EXTENSION_SIZE + 1)
                    .read_to_end(&mut data)
                    .map_err(tar_error)?;
                if data.len() as u64 > MAX_EXTENSION_SIZE {
                    return Err(WriterError::InvalidEntry {
                        name: String::from_utf8_lossy(&entry.path_bytes()).into_owned(),
                        field: "extension header",
                        reason: format!("larger than {MAX_EXTENSION_SIZE} bytes"),
                    });
                }
                Some(data)
            }
            _ => None,
        };
        if let Some(data) = extension {
            match header_type {
                tar::EntryType::XGlobalHeader => globals.extend(parse_pax_records(&data)?),
                tar::EntryType::XHeader => local = Some(parse_pax_records(&data)?),
                tar::EntryType::GNULongName => long_name = Some(pax::until_nul(&data).to_vec()),
                _ => long_link = Some(pax::until_nul(&data).to_vec()),
            }
            continue;
        }

        let mut records = globals.clone();
        records.remove("path");
        records.remove("linkpath");
        records.extend(local.take().unwrap_or_default());
        let names = (long_name.take(), long_link.take());
        let meta = entry_meta(&entry, header_type, &records, names)?;
        let content = if meta.kind == EntryType::Reg && meta.size > 0 {
            Content::TarRange {
                offset: entry.raw_file_position(),
                len: meta.size,
            }
        } else {
            Content::None
        };
        entries.push(SourceEntry { meta, content });
    }

    Ok(deduplicate(entries))
}

/// Keeps the last entry of each path and drops builder-added entries.
pub fn deduplicate(entries: Vec<SourceEntry>) -> Vec<SourceEntry> {
    let mut last: BTreeMap<Vec<u8>, usize> = BTreeMap::new();
    for (index, entry) in entries.iter().enumerate() {
        last.insert(clean_name(&entry.meta.name), index);
    }
    entries
        .into_iter()
        .enumerate()
        .filter(|(index, entry)| {
            let clean = clean_name(&entry.meta.name);
            last.get(&clean) == Some(index) && !is_builder_entry(&clean)
        })
        .map(|(_, entry)| entry)
        .collect()
}

fn entry_meta<R: Read>(
    entry: &tar::Entry<'_, R>,
    header_type: tar::EntryType,
    records: &BTreeMap<String, Vec<u8>>,
    (long_name, long_link): (Option<Vec<u8>>, Option<Vec<u8>>),
) -> Result<EntryMeta, WriterError> {
    let header = entry.header();
    let name = match (records.get("path"), long_name) {
        (Some(path), _) if !path.is_empty() => path.clone(),
        (_, Some(long)) => long,
        _ => header.path_bytes().into_owned(),
    };
    let display = String::from_utf8_lossy(&name).into_owned();
    let invalid = |field: &'static str, reason: String| WriterError::InvalidEntry {
        name: display.clone(),
        field,
        reason,
    };

    let kind = match header_type {
        tar::EntryType::Regular | tar::EntryType::Continuous => EntryType::Reg,
        tar::EntryType::Link => EntryType::Hardlink,
        tar::EntryType::Symlink => EntryType::Symlink,
        tar::EntryType::Char => EntryType::Char,
        tar::EntryType::Block => EntryType::Block,
        tar::EntryType::Directory => EntryType::Dir,
        tar::EntryType::Fifo => EntryType::Fifo,
        other => {
            return Err(invalid(
                "type",
                format!(
                    "tar type {:?} is not supported in a layer",
                    other.as_byte() as char
                ),
            ))
        }
    };
    if let Some(key) = records
        .keys()
        .find(|key| key.starts_with(PAX_GNU_SPARSE_PREFIX))
    {
        return Err(invalid(
            "type",
            format!("GNU sparse files (pax record {key}) are not supported; repack the tar without --sparse"),
        ));
    }

    let text = |key: &str| -> Option<String> {
        records
            .get(key)
            .map(|value| String::from_utf8_lossy(value).into_owned())
    };
    let number = |key: &str, from_header: std::io::Result<u64>| -> Result<u64, WriterError> {
        match text(key) {
            Some(value) => value
                .trim()
                .parse::<u64>()
                .map_err(|_| invalid("pax record", format!("{key}={value:?} is not a number"))),
            None => from_header.map_err(|error| invalid(field_name(key), error.to_string())),
        }
    };

    let uid = number("uid", header.uid())?;
    let gid = number("gid", header.gid())?;
    let (mtime, mtime_nsec) = match text("mtime") {
        Some(value) => parse_pax_time(&value)
            .ok_or_else(|| invalid("mtime", format!("pax mtime {value:?} is not a time")))?,
        None => {
            let seconds = header
                .mtime()
                .map_err(|e| invalid("mtime", e.to_string()))?;
            let seconds = i64::try_from(seconds)
                .map_err(|_| invalid("mtime", format!("{seconds} is out of range")))?;
            (seconds, 0)
        }
    };
    let mode = header.mode().map_err(|e| invalid("mode", e.to_string()))? & 0o7777;
    let user_name = match text("uname") {
        Some(value) => value,
        None => String::from_utf8_lossy(header.username_bytes().unwrap_or_default()).into_owned(),
    };
    let group_name = match text("gname") {
        Some(value) => value,
        None => String::from_utf8_lossy(header.groupname_bytes().unwrap_or_default()).into_owned(),
    };
    let (dev_major, dev_minor) = if matches!(kind, EntryType::Char | EntryType::Block) {
        let major = header
            .device_major()
            .map_err(|e| invalid("devmajor", e.to_string()))?
            .unwrap_or(0);
        let minor = header
            .device_minor()
            .map_err(|e| invalid("devminor", e.to_string()))?
            .unwrap_or(0);
        (major, minor)
    } else {
        (0, 0)
    };
    let link_name = match kind {
        EntryType::Symlink | EntryType::Hardlink => {
            let link = match (records.get("linkpath"), long_link) {
                (Some(path), _) if !path.is_empty() => path.clone(),
                (_, Some(long)) => long,
                _ => header
                    .link_name_bytes()
                    .map(|link| link.into_owned())
                    .unwrap_or_default(),
            };
            if link.is_empty() {
                return Err(invalid("linkname", "a link without a target".to_string()));
            }
            link
        }
        _ => Vec::new(),
    };
    let xattrs = records
        .iter()
        .filter_map(|(key, value)| {
            key.strip_prefix(PAX_XATTR_PREFIX)
                .map(|name| (name.to_string(), value.clone()))
        })
        .collect();

    Ok(EntryMeta {
        name,
        kind,
        size: if kind == EntryType::Reg {
            header
                .entry_size()
                .map_err(|e| invalid("size", e.to_string()))?
        } else {
            0
        },
        mode,
        uid,
        gid,
        user_name,
        group_name,
        mtime,
        mtime_nsec,
        link_name,
        dev_major,
        dev_minor,
        xattrs,
    })
}

/// Parses pax records (see [`pax::parse_records`]) with keys as text.
fn parse_pax_records(data: &[u8]) -> Result<BTreeMap<String, Vec<u8>>, WriterError> {
    let records = pax::parse_records(data).map_err(|reason| WriterError::InvalidEntry {
        name: "(pax header)".to_string(),
        field: "pax record",
        reason,
    })?;
    Ok(records
        .into_iter()
        .map(|(key, value)| (String::from_utf8_lossy(&key).into_owned(), value))
        .collect())
}

fn field_name(key: &str) -> &'static str {
    match key {
        "uid" => "uid",
        "gid" => "gid",
        _ => "header field",
    }
}

/// Parses a pax time, `[-]SECONDS[.FRACTION]` with surrounding white space,
/// into seconds and nanoseconds, as the layer reader does.
pub fn parse_pax_time(value: &str) -> Option<(i64, u32)> {
    pax::parse_time(value.trim().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_name_table() {
        let cases: [(&str, &str); 7] = [
            ("./", ""),
            ("./a/b/", "a/b"),
            ("a//b", "a/b"),
            ("/abs/x", "abs/x"),
            ("a/../b", "b"),
            (".prefetch.landmark", ".prefetch.landmark"),
            ("./stargz.index.json", "stargz.index.json"),
        ];
        for (input, expected) in cases {
            assert_eq!(
                clean_name(input.as_bytes()),
                expected.as_bytes(),
                "input {input:?}"
            );
        }
    }

    #[test]
    fn builder_entries_detected() {
        assert!(is_builder_entry(b".prefetch.landmark"));
        assert!(is_builder_entry(b".no.prefetch.landmark"));
        assert!(is_builder_entry(b"stargz.index.json"));
        assert!(!is_builder_entry(b"dir/stargz.index.json"));
    }

    #[test]
    fn pax_records_keep_newlines() {
        let records = parse_pax_records(b"22 SCHILY.xattr.a=x\ny\n9 path=p\n").unwrap();
        assert_eq!(records["SCHILY.xattr.a"], b"x\ny");
        assert_eq!(records["path"], b"p");
        for bad in [&b"5 a=b"[..], b"x a=b\n", b"99 a=b\n", b"6 ab\n\n"] {
            assert!(parse_pax_records(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parse_pax_time_table() {
        let cases: [(&str, Option<(i64, u32)>); 8] = [
            ("1700000000", Some((1700000000, 0))),
            ("1700000000.5", Some((1700000000, 500_000_000))),
            ("1.123456789123", Some((1, 123_456_789))),
            ("-1", Some((-1, 0))),
            ("-1.5", Some((-2, 500_000_000))),
            ("", None),
            ("abc", None),
            ("1.x", None),
        ];
        for (input, expected) in cases {
            assert_eq!(parse_pax_time(input), expected, "input {input:?}");
        }
    }

    fn source(name: &str) -> SourceEntry {
        SourceEntry {
            meta: EntryMeta::regular(name, 0),
            content: Content::None,
        }
    }

    #[test]
    fn deduplicate_keeps_last() {
        let entries = vec![
            source("a"),
            source("./b"),
            source(".no.prefetch.landmark"),
            source("b"),
            source("stargz.index.json"),
            source("c"),
        ];
        let names: Vec<String> = deduplicate(entries)
            .iter()
            .map(|entry| entry.meta.display_name())
            .collect();
        assert_eq!(names, ["a", "b", "c"]);
    }
}
