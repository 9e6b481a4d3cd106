//! Comparison of a real directory tree (a mount or an extraction) with the
//! `merged_tree` list of a fixture sidecar (`expected.json`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, Metadata};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The directory that ext4 needs at the root; a tree may have it even when the
/// image does not.
const LOST_AND_FOUND: &str = "/lost+found";

/// Compares the tree under `root` with `merged_tree` in `expected_json` and
/// returns one readable line per mismatch; an empty list means equal.
///
/// For each expected path it checks existence and type. Unless the entry is
/// `implicit` (a directory without a tar entry, whose metadata is
/// unspecified) it also checks mode & 07777, uid, gid, mtime in seconds and
/// the full set of xattrs. It checks size and sha256 of regular files, the
/// raw symlink target, device major and minor, and that the names of each
/// hard-link group share one inode whose link count is the group size. Any
/// path under `root` that the list lacks is reported, except `/lost+found`
/// when the list has no such entry. Panics when the sidecar cannot be read.
pub fn compare_tree(root: &Path, expected_json: &Path) -> Vec<String> {
    let entries = load_merged_tree(expected_json);
    let mut mismatches = Vec::new();
    let mut inodes: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();

    for entry in &entries {
        let Some(path) = entry.get("path").and_then(Value::as_str) else {
            panic!(
                "{}: merged_tree entry without a path: {entry}",
                expected_json.display()
            );
        };
        let full = join_root(root, path);
        let metadata = match fs::symlink_metadata(&full) {
            Ok(metadata) => metadata,
            Err(error) => {
                mismatches.push(format!("{path}: missing ({error})"));
                continue;
            }
        };
        let expected_type = str_field(entry, "type");
        let actual_type = file_type_name(&metadata);
        if actual_type != expected_type {
            mismatches.push(format!(
                "{path}: type {actual_type}, expected {expected_type}"
            ));
            continue;
        }
        if entry.get("implicit").and_then(Value::as_bool) == Some(true) {
            continue;
        }
        compare_metadata(path, &full, entry, &metadata, &mut mismatches);
        if expected_type == "reg" {
            inodes.insert(
                path.to_string(),
                (metadata.dev(), metadata.ino(), metadata.nlink()),
            );
        }
    }

    compare_hard_links(&entries, &inodes, &mut mismatches);
    find_extra_paths(root, &entries, &mut mismatches);
    mismatches
}

/// Panics with every mismatch that `compare_tree` finds.
pub fn assert_tree_matches(root: &Path, expected_json: &Path) {
    let mismatches = compare_tree(root, expected_json);
    assert!(
        mismatches.is_empty(),
        "{} differs from {} in {} places:\n{}",
        root.display(),
        expected_json.display(),
        mismatches.len(),
        mismatches.join("\n")
    );
}

fn load_merged_tree(expected_json: &Path) -> Vec<Value> {
    let text = fs::read_to_string(expected_json)
        .unwrap_or_else(|error| panic!("reading {}: {error}", expected_json.display()));
    let mut document: Value = serde_json::from_str(&text)
        .unwrap_or_else(|error| panic!("parsing {}: {error}", expected_json.display()));
    match document.get_mut("merged_tree").map(Value::take) {
        Some(Value::Array(entries)) => entries,
        _ => panic!("{} has no merged_tree list", expected_json.display()),
    }
}

/// Maps a sidecar path (absolute, `/` = root) to a path under `root`.
fn join_root(root: &Path, path: &str) -> PathBuf {
    let relative = path.trim_start_matches('/');
    if relative.is_empty() {
        root.to_path_buf()
    } else {
        root.join(relative)
    }
}

fn str_field<'a>(entry: &'a Value, name: &str) -> &'a str {
    entry.get(name).and_then(Value::as_str).unwrap_or("")
}

fn u64_field(entry: &Value, name: &str) -> Option<u64> {
    entry.get(name).and_then(Value::as_u64)
}

/// Returns the sidecar's name for the type of a file (`reg`, `dir`, ...).
fn file_type_name(metadata: &Metadata) -> &'static str {
    let file_type = metadata.file_type();
    if file_type.is_dir() {
        "dir"
    } else if file_type.is_file() {
        "reg"
    } else if file_type.is_symlink() {
        "symlink"
    } else if file_type.is_char_device() {
        "char"
    } else if file_type.is_block_device() {
        "block"
    } else if file_type.is_fifo() {
        "fifo"
    } else {
        "socket"
    }
}

/// Splits a Linux `dev_t` into major and minor, in the encoding glibc's
/// `major()` and `minor()` use (12-bit major and 20-bit minor, split).
fn split_device(rdev: u64) -> (u64, u64) {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    (major, minor)
}

fn compare_metadata(
    path: &str,
    full: &Path,
    entry: &Value,
    metadata: &Metadata,
    mismatches: &mut Vec<String>,
) {
    let expected_type = str_field(entry, "type");
    let mode = metadata.mode() & 0o7777;
    if let Some(expected) = u64_field(entry, "mode") {
        if u64::from(mode) != expected {
            mismatches.push(format!("{path}: mode {mode:04o}, expected {expected:04o}"));
        }
    }
    for (name, actual) in [
        ("uid", u64::from(metadata.uid())),
        ("gid", u64::from(metadata.gid())),
    ] {
        if let Some(expected) = u64_field(entry, name) {
            if actual != expected {
                mismatches.push(format!("{path}: {name} {actual}, expected {expected}"));
            }
        }
    }
    if let Some(expected) = entry.get("mtime").and_then(Value::as_i64) {
        if metadata.mtime() != expected {
            mismatches.push(format!(
                "{path}: mtime {}, expected {expected}",
                metadata.mtime()
            ));
        }
    }

    match expected_type {
        "reg" => compare_content(path, full, entry, metadata, mismatches),
        "symlink" => compare_symlink(path, full, entry, mismatches),
        "char" | "block" => {
            let (major, minor) = split_device(metadata.rdev());
            let expected = (u64_field(entry, "devmajor"), u64_field(entry, "devminor"));
            if (Some(major), Some(minor)) != expected {
                mismatches.push(format!(
                    "{path}: device {major}:{minor}, expected {}:{}",
                    expected.0.unwrap_or(0),
                    expected.1.unwrap_or(0)
                ));
            }
        }
        _ => {}
    }

    compare_xattrs(path, full, entry, mismatches);
}

fn compare_content(
    path: &str,
    full: &Path,
    entry: &Value,
    metadata: &Metadata,
    mismatches: &mut Vec<String>,
) {
    if let Some(expected) = u64_field(entry, "size") {
        if metadata.len() != expected {
            mismatches.push(format!(
                "{path}: size {}, expected {expected}",
                metadata.len()
            ));
            return;
        }
    }
    let Some(expected) = entry.get("sha256").and_then(Value::as_str) else {
        return;
    };
    match sha256_file(full) {
        Ok(actual) if actual == expected => {}
        Ok(actual) => mismatches.push(format!("{path}: content {actual}, expected {expected}")),
        Err(error) => mismatches.push(format!("{path}: reading the content failed: {error}")),
    }
}

/// Returns `sha256:<hex>` of a file's content.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

fn compare_symlink(path: &str, full: &Path, entry: &Value, mismatches: &mut Vec<String>) {
    let expected = str_field(entry, "link_target");
    match fs::read_link(full) {
        Ok(target) if target.as_os_str().as_bytes() == expected.as_bytes() => {}
        Ok(target) => mismatches.push(format!(
            "{path}: symlink target {:?}, expected {expected:?}",
            target.as_os_str()
        )),
        Err(error) => mismatches.push(format!("{path}: readlink failed: {error}")),
    }
}

fn compare_xattrs(path: &str, full: &Path, entry: &Value, mismatches: &mut Vec<String>) {
    let mut expected: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    if let Some(Value::Object(map)) = entry.get("xattrs_b64") {
        for (name, value) in map {
            let encoded = value.as_str().unwrap_or("");
            match base64::engine::general_purpose::STANDARD.decode(encoded) {
                Ok(bytes) => {
                    expected.insert(name.clone(), bytes);
                }
                Err(error) => mismatches.push(format!(
                    "{path}: sidecar xattr {name} is not valid base64 ({error})"
                )),
            }
        }
    }

    // `xattr::list` and `xattr::get` do not follow symlinks (llistxattr, lgetxattr).
    let names = match xattr::list(full) {
        Ok(names) => names,
        Err(error) => {
            mismatches.push(format!("{path}: listing xattrs failed: {error}"));
            return;
        }
    };
    let mut actual: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for name in names {
        let printable = name.to_string_lossy().into_owned();
        match xattr::get(full, &name) {
            Ok(value) => {
                actual.insert(printable, value.unwrap_or_default());
            }
            Err(error) => {
                mismatches.push(format!("{path}: reading xattr {printable} failed: {error}"))
            }
        }
    }

    for (name, value) in &expected {
        match actual.get(name) {
            None => mismatches.push(format!("{path}: xattr {name} missing")),
            Some(found) if found != value => mismatches.push(format!(
                "{path}: xattr {name} is {}, expected {}",
                show_bytes(found),
                show_bytes(value)
            )),
            Some(_) => {}
        }
    }
    for (name, value) in &actual {
        if !expected.contains_key(name) {
            mismatches.push(format!(
                "{path}: unexpected xattr {name} = {}",
                show_bytes(value)
            ));
        }
    }
}

/// Formats bytes for a message: as a string when printable, else as hex.
fn show_bytes(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) if !text.chars().any(char::is_control) => format!("{text:?}"),
        _ => format!("0x{}", hex::encode(bytes)),
    }
}

/// Checks that the names of each hard-link group share one inode, with a link
/// count equal to the number of names. A group is a file plus the entries
/// whose `hardlink_target` names it; a lone regular file is a group of one.
fn compare_hard_links(
    entries: &[Value],
    inodes: &BTreeMap<String, (u64, u64, u64)>,
    mismatches: &mut Vec<String>,
) {
    let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for entry in entries {
        if str_field(entry, "type") != "reg" {
            continue;
        }
        let path = str_field(entry, "path");
        let key = entry
            .get("hardlink_target")
            .and_then(Value::as_str)
            .unwrap_or(path);
        groups.entry(key).or_default().push(path);
    }

    for (key, names) in groups {
        let found: Vec<(&str, (u64, u64, u64))> = names
            .iter()
            .filter_map(|name| inodes.get(*name).map(|inode| (*name, *inode)))
            .collect();
        let Some((first_name, (first_dev, first_ino, _))) = found.first().copied() else {
            continue;
        };
        for (name, (dev, ino, nlink)) in &found {
            if (*dev, *ino) != (first_dev, first_ino) {
                mismatches.push(format!(
                    "{name}: inode {ino}, expected the inode {first_ino} of {first_name} (hard-link group of {key})"
                ));
            }
            if *nlink != names.len() as u64 {
                mismatches.push(format!(
                    "{name}: link count {nlink}, expected {} (hard-link group of {key})",
                    names.len()
                ));
            }
        }
    }
}

/// Reports every path under `root` that `merged_tree` does not list.
fn find_extra_paths(root: &Path, entries: &[Value], mismatches: &mut Vec<String>) {
    let expected: BTreeSet<&str> = entries
        .iter()
        .map(|entry| str_field(entry, "path"))
        .collect();
    let allow_lost_and_found = !expected.contains(LOST_AND_FOUND);
    let mut pending = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = pending.pop() {
        let listing = match fs::read_dir(&dir) {
            Ok(listing) => listing,
            Err(error) => {
                mismatches.push(format!(
                    "{}: listing the directory failed: {error}",
                    display_path(&prefix)
                ));
                continue;
            }
        };
        for item in listing {
            let item = match item {
                Ok(item) => item,
                Err(error) => {
                    mismatches.push(format!(
                        "{}: reading a directory entry failed: {error}",
                        display_path(&prefix)
                    ));
                    continue;
                }
            };
            let name = item.file_name();
            let path = format!("{prefix}/{}", name.to_string_lossy());
            let is_allowed = allow_lost_and_found && path == LOST_AND_FOUND;
            let listed =
                std::str::from_utf8(name.as_bytes()).is_ok() && expected.contains(path.as_str());
            if !listed && !is_allowed {
                mismatches.push(format!("{path}: extra path, not in merged_tree"));
            }
            let is_dir = item.file_type().map(|kind| kind.is_dir()).unwrap_or(false);
            if is_dir {
                pending.push((item.path(), path));
            }
        }
    }
}

fn display_path(prefix: &str) -> &str {
    if prefix.is_empty() {
        "/"
    } else {
        prefix
    }
}
