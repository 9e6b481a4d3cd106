//! Tree manifests: one text line per file with its type, mode, owner, mtime,
//! size, link count, sha256, symlink target, device number and xattrs, made
//! from a mounted directory or from a fixture's `expected.json` sidecar, so
//! that a mounted image can be checked where no test harness runs.
//!
//! Line format, fields separated by tabs: `path type mode uid gid mtime size
//! nlink sha256 target rdev xattrs`. `-` means "not applicable" and, in an
//! expected manifest only, `*` means "any value". Bytes outside printable
//! ASCII, and `\`, `,` and `=`, are written as `\xHH`.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use base64::Engine;
use sha2::{Digest, Sha256};

/// Names of the fields after the path, in line order.
pub const FIELDS: [&str; 11] = [
    "type", "mode", "uid", "gid", "mtime", "size", "nlink", "sha256", "target", "rdev", "xattrs",
];

const NONE: &str = "-";
const ANY: &str = "*";

/// One line of a manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestEntry {
    /// Absolute path inside the tree, escaped; the root is `/`.
    pub path: String,
    pub fields: [String; FIELDS.len()],
}

impl ManifestEntry {
    pub fn to_line(&self) -> String {
        format!("{}\t{}", self.path, self.fields.join("\t"))
    }
}

/// An expected manifest that could not be built or read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("invalid expected.json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid expected.json entry {path:?}: {reason}")]
    Entry { path: String, reason: String },
    #[error("invalid manifest line {line}: expected {} tab-separated fields, found {found}", FIELDS.len() + 1)]
    Line { line: usize, found: usize },
}

/// Escapes bytes so that a field never holds a tab, newline or separator.
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &byte in bytes {
        if (0x21..=0x7e).contains(&byte) && !matches!(byte, b'\\' | b',' | b'=') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("\\x{byte:02x}"));
        }
    }
    out
}

fn octal_mode(mode: u32) -> String {
    format!("{:04o}", mode & 0o7777)
}

fn xattr_field(mut pairs: Vec<(Vec<u8>, Vec<u8>)>) -> String {
    if pairs.is_empty() {
        return NONE.to_string();
    }
    pairs.sort();
    let engine = base64::engine::general_purpose::STANDARD;
    pairs
        .iter()
        .map(|(name, value)| format!("{}={}", escape(name), engine.encode(value)))
        .collect::<Vec<_>>()
        .join(",")
}

/// Builds the manifest of the tree under `root`, sorted by path. Symlinks
/// are not followed.
pub fn manifest_of_dir(root: &Path) -> io::Result<Vec<ManifestEntry>> {
    let mut entries = Vec::new();
    let mut pending = vec![(root.to_path_buf(), b"/".to_vec())];
    while let Some((path, name)) = pending.pop() {
        let metadata = fs::symlink_metadata(&path).map_err(|error| {
            io::Error::new(error.kind(), format!("{}: {error}", path.display()))
        })?;
        entries.push(entry_of(&path, &name, &metadata)?);
        if metadata.is_dir() {
            for child in fs::read_dir(&path)? {
                let child = child?;
                let mut child_name = name.clone();
                if child_name != b"/" {
                    child_name.push(b'/');
                }
                child_name.extend_from_slice(child.file_name().as_bytes());
                pending.push((child.path(), child_name));
            }
        }
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(entries)
}

fn entry_of(path: &Path, name: &[u8], metadata: &fs::Metadata) -> io::Result<ManifestEntry> {
    let file_type = metadata.file_type();
    let none = || NONE.to_string();
    let (kind, size, nlink, sha256, target, rdev) = if file_type.is_file() {
        (
            "reg",
            metadata.len().to_string(),
            metadata.nlink().to_string(),
            sha256_file(path)?,
            none(),
            none(),
        )
    } else if file_type.is_dir() {
        ("dir", none(), none(), none(), none(), none())
    } else if file_type.is_symlink() {
        let target = fs::read_link(path)?;
        (
            "symlink",
            none(),
            none(),
            none(),
            escape(target.as_os_str().as_bytes()),
            none(),
        )
    } else {
        let device = format!(
            "{}:{}",
            libc::major(metadata.rdev()),
            libc::minor(metadata.rdev())
        );
        if file_type.is_char_device() {
            ("char", none(), none(), none(), none(), device)
        } else if file_type.is_block_device() {
            ("block", none(), none(), none(), none(), device)
        } else if file_type.is_fifo() {
            ("fifo", none(), none(), none(), none(), none())
        } else {
            ("socket", none(), none(), none(), none(), none())
        }
    };

    let mut xattrs = Vec::new();
    for xattr_name in xattr::list(path)? {
        let value = xattr::get(path, &xattr_name)?.unwrap_or_default();
        xattrs.push((xattr_name.as_bytes().to_vec(), value));
    }

    Ok(ManifestEntry {
        path: escape(name),
        fields: [
            kind.to_string(),
            octal_mode(metadata.mode()),
            metadata.uid().to_string(),
            metadata.gid().to_string(),
            metadata.mtime().to_string(),
            size,
            nlink,
            sha256,
            target,
            rdev,
            xattr_field(xattrs),
        ],
    })
}

fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = fs::File::open(path)
        .map_err(|error| io::Error::new(error.kind(), format!("{}: {error}", path.display())))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(|error| {
            io::Error::new(error.kind(), format!("read {}: {error}", path.display()))
        })?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[derive(serde::Deserialize)]
struct Sidecar {
    merged_tree: Vec<SidecarEntry>,
}

#[derive(serde::Deserialize)]
struct SidecarEntry {
    path: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    mode: u32,
    #[serde(default)]
    uid: u64,
    #[serde(default)]
    gid: u64,
    #[serde(default)]
    mtime: i64,
    size: Option<u64>,
    sha256: Option<String>,
    link_target: Option<String>,
    devmajor: Option<u64>,
    devminor: Option<u64>,
    #[serde(default)]
    xattrs_b64: BTreeMap<String, String>,
    #[serde(default)]
    implicit: bool,
    hardlink_target: Option<String>,
}

/// Builds the expected manifest from the `merged_tree` of an `expected.json`
/// sidecar. Implicit directories match any metadata, and symlink permission
/// bits match anything because Linux ignores them.
pub fn manifest_of_expected(json: &[u8]) -> Result<Vec<ManifestEntry>, ManifestError> {
    let sidecar: Sidecar = serde_json::from_slice(json)?;

    // Names sharing one inode: a hard link counts with its target's group.
    let mut link_groups: HashMap<&str, u32> = HashMap::new();
    for entry in &sidecar.merged_tree {
        if entry.kind == "reg" {
            let group = entry.hardlink_target.as_deref().unwrap_or(&entry.path);
            *link_groups.entry(group).or_default() += 1;
        }
    }

    let engine = base64::engine::general_purpose::STANDARD;
    let mut entries = Vec::with_capacity(sidecar.merged_tree.len());
    for entry in &sidecar.merged_tree {
        let invalid = |reason: String| ManifestError::Entry {
            path: entry.path.clone(),
            reason,
        };
        let none = || NONE.to_string();
        let mut fields: [String; FIELDS.len()] = std::array::from_fn(|_| none());
        fields[0] = entry.kind.clone();
        fields[1] = octal_mode(entry.mode);
        fields[2] = entry.uid.to_string();
        fields[3] = entry.gid.to_string();
        fields[4] = entry.mtime.to_string();
        match entry.kind.as_str() {
            "reg" => {
                fields[5] = entry.size.unwrap_or(0).to_string();
                let group = entry.hardlink_target.as_deref().unwrap_or(&entry.path);
                fields[6] = link_groups.get(group).copied().unwrap_or(1).to_string();
                let digest = entry
                    .sha256
                    .as_deref()
                    .ok_or_else(|| invalid("a regular file without sha256".into()))?;
                fields[7] = digest.strip_prefix("sha256:").unwrap_or(digest).to_string();
            }
            "symlink" => {
                fields[1] = ANY.to_string();
                let target = entry
                    .link_target
                    .as_deref()
                    .ok_or_else(|| invalid("a symlink without link_target".into()))?;
                fields[8] = escape(target.as_bytes());
            }
            "char" | "block" => {
                fields[9] = format!(
                    "{}:{}",
                    entry.devmajor.unwrap_or(0),
                    entry.devminor.unwrap_or(0)
                );
            }
            "dir" | "fifo" => {}
            other => return Err(invalid(format!("unknown type {other:?}"))),
        }
        let mut xattrs = Vec::with_capacity(entry.xattrs_b64.len());
        for (name, value) in &entry.xattrs_b64 {
            let value = engine
                .decode(value)
                .map_err(|error| invalid(format!("xattr {name}: invalid base64: {error}")))?;
            xattrs.push((name.as_bytes().to_vec(), value));
        }
        fields[10] = xattr_field(xattrs);
        if entry.implicit {
            for field in &mut fields[1..] {
                *field = ANY.to_string();
            }
        }
        entries.push(ManifestEntry {
            path: escape(entry.path.as_bytes()),
            fields,
        });
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(entries)
}

/// Parses a manifest written by [`ManifestEntry::to_line`].
pub fn parse_manifest(text: &str) -> Result<Vec<ManifestEntry>, ManifestError> {
    let mut entries = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        let parts: Vec<&str> = line.split('\t').collect();
        if parts.len() != FIELDS.len() + 1 {
            return Err(ManifestError::Line {
                line: number + 1,
                found: parts.len(),
            });
        }
        entries.push(ManifestEntry {
            path: parts[0].to_string(),
            fields: std::array::from_fn(|i| parts[i + 1].to_string()),
        });
    }
    Ok(entries)
}

/// Compares an actual manifest with an expected one and returns one line per
/// difference. Paths in `ignore`, and everything below them, are skipped.
pub fn compare(
    expected: &[ManifestEntry],
    actual: &[ManifestEntry],
    ignore: &[String],
) -> Vec<String> {
    let ignored = |path: &str| {
        ignore.iter().any(|prefix| {
            path == prefix
                || path
                    .strip_prefix(prefix.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
        })
    };
    let actual_by_path: HashMap<&str, &ManifestEntry> = actual
        .iter()
        .map(|entry| (entry.path.as_str(), entry))
        .collect();
    let expected_paths: HashMap<&str, ()> = expected
        .iter()
        .map(|entry| (entry.path.as_str(), ()))
        .collect();

    let mut differences = Vec::new();
    for entry in expected.iter().filter(|entry| !ignored(&entry.path)) {
        let Some(found) = actual_by_path.get(entry.path.as_str()) else {
            differences.push(format!("missing {}", entry.path));
            continue;
        };
        for (i, name) in FIELDS.iter().enumerate() {
            let want = &entry.fields[i];
            let got = &found.fields[i];
            if want != ANY && want != got {
                differences.push(format!(
                    "{}: {name} expected {want}, found {got}",
                    entry.path
                ));
            }
        }
    }
    for entry in actual.iter().filter(|entry| !ignored(&entry.path)) {
        if !expected_paths.contains_key(entry.path.as_str()) {
            differences.push(format!("unexpected {}", entry.path));
        }
    }
    differences
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn escape_keeps_fields_separable() {
        let cases: [(&[u8], &str); 5] = [
            (b"/etc/passwd", "/etc/passwd"),
            (b"a b\tc\n", "a\\x20b\\x09c\\x0a"),
            (b"x=y,z\\", "x\\x3dy\\x2cz\\x5c"),
            ("é".as_bytes(), "\\xc3\\xa9"),
            (&[0xff], "\\xff"),
        ];
        for (input, expected) in cases {
            assert_eq!(escape(input), expected, "{input:?}");
        }
    }

    #[test]
    fn dir_manifest_matches_expected() {
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path();
        fs::create_dir(root.join("d")).unwrap();
        fs::write(root.join("d/f"), b"hello").unwrap();
        fs::hard_link(root.join("d/f"), root.join("g")).unwrap();
        std::os::unix::fs::symlink("d/f", root.join("s")).unwrap();
        for path in ["", "d"] {
            fs::set_permissions(root.join(path), fs::Permissions::from_mode(0o755)).unwrap();
        }
        fs::set_permissions(root.join("d/f"), fs::Permissions::from_mode(0o640)).unwrap();
        let actual = manifest_of_dir(root).unwrap();
        let paths: Vec<&str> = actual.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["/", "/d", "/d/f", "/g", "/s"]);

        let metadata = fs::metadata(root.join("d/f")).unwrap();
        let (uid, gid, mtime) = (metadata.uid(), metadata.gid(), metadata.mtime());
        let hello = hex::encode(Sha256::digest(b"hello"));
        let json = serde_json::json!({ "merged_tree": [
            { "path": "/", "type": "dir", "implicit": true },
            { "path": "/d", "type": "dir", "mode": 0o755, "uid": uid, "gid": gid,
              "mtime": fs::metadata(root.join("d")).unwrap().mtime() },
            { "path": "/d/f", "type": "reg", "mode": 0o640, "uid": uid, "gid": gid, "mtime": mtime,
              "size": 5, "sha256": hello },
            { "path": "/g", "type": "reg", "mode": 0o640, "uid": uid, "gid": gid, "mtime": mtime,
              "size": 5, "sha256": hello, "hardlink_target": "/d/f" },
            { "path": "/s", "type": "symlink", "mode": 0o777, "uid": uid, "gid": gid,
              "mtime": fs::symlink_metadata(root.join("s")).unwrap().mtime(), "link_target": "d/f" },
        ]});
        let expected = manifest_of_expected(json.to_string().as_bytes()).unwrap();
        assert_eq!(
            expected[2].fields[6], "2",
            "hard link group counts both names"
        );

        let text: String = expected.iter().map(|e| e.to_line() + "\n").collect();
        let reparsed = parse_manifest(&text).unwrap();
        assert_eq!(reparsed, expected);
        assert_eq!(compare(&reparsed, &actual, &[]), Vec::<String>::new());
    }

    #[test]
    fn compare_reports_each_difference() {
        let entry = |path: &str, mode: &str| ManifestEntry {
            path: path.to_string(),
            fields: std::array::from_fn(|i| {
                if i == 1 {
                    mode.to_string()
                } else {
                    NONE.to_string()
                }
            }),
        };
        let expected = [entry("/", ANY), entry("/a", "0644"), entry("/b", "0644")];
        let actual = [
            entry("/", "0700"),
            entry("/a", "0600"),
            entry("/lost+found", "0700"),
            entry("/lost+found/x", "0"),
        ];
        let differences = compare(&expected, &actual, &["/lost+found".to_string()]);
        assert_eq!(
            differences,
            ["/a: mode expected 0644, found 0600", "missing /b"]
        );

        let differences = compare(&expected, &actual, &[]);
        assert!(differences.contains(&"unexpected /lost+found".to_string()));
    }

    #[test]
    fn short_manifest_line_is_rejected() {
        assert!(matches!(
            parse_manifest("/a\treg\n"),
            Err(ManifestError::Line { line: 1, found: 2 })
        ));
    }
}
