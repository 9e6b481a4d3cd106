//! Layer entries from a directory tree: owners, modes, nanosecond times,
//! xattrs, hard links and device nodes as `lstat` and `llistxattr` report them.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use tracing::warn;

use super::entry::{Content, EntryMeta, EntryType, SourceEntry};
use super::WriterError;

/// Lists the tree under `root` in tar order: the root as `./`, then each
/// directory before its children, children sorted by name bytes so the same
/// tree gives the same layer.
///
/// A file with several names becomes one regular entry (the first name in
/// that order) and hard link entries for the others. Sockets are skipped,
/// because tar cannot hold them.
pub fn walk_tree(root: &Path) -> Result<Vec<SourceEntry>, WriterError> {
    let metadata = fs::symlink_metadata(root).map_err(|source| WriterError::Walk {
        path: root.to_path_buf(),
        source,
    })?;
    if !metadata.is_dir() {
        return Err(WriterError::Walk {
            path: root.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        });
    }
    let mut walker = Walker {
        entries: Vec::new(),
        inodes: HashMap::new(),
    };
    walker.push(root, b"./".to_vec(), &metadata)?;
    walker.walk_dir(root, &[])?;
    Ok(walker.entries)
}

struct Walker {
    entries: Vec<SourceEntry>,
    /// First name of each multiply linked inode, by (device, inode).
    inodes: HashMap<(u64, u64), Vec<u8>>,
}

impl Walker {
    fn walk_dir(&mut self, dir: &Path, prefix: &[u8]) -> Result<(), WriterError> {
        let walk_error = |path: &Path, source| WriterError::Walk {
            path: path.to_path_buf(),
            source,
        };
        let mut children: Vec<_> = fs::read_dir(dir)
            .map_err(|source| walk_error(dir, source))?
            .collect::<Result<_, _>>()
            .map_err(|source| walk_error(dir, source))?;
        children.sort_by(|a, b| a.file_name().as_bytes().cmp(b.file_name().as_bytes()));

        for child in children {
            let path = child.path();
            let metadata =
                fs::symlink_metadata(&path).map_err(|source| walk_error(&path, source))?;
            let mut name = prefix.to_vec();
            name.extend_from_slice(child.file_name().as_bytes());
            if metadata.is_dir() {
                let mut dir_name = name.clone();
                dir_name.push(b'/');
                self.push(&path, dir_name.clone(), &metadata)?;
                self.walk_dir(&path, &dir_name)?;
            } else {
                self.push(&path, name, &metadata)?;
            }
        }
        Ok(())
    }

    fn push(
        &mut self,
        path: &Path,
        name: Vec<u8>,
        metadata: &fs::Metadata,
    ) -> Result<(), WriterError> {
        let file_type = metadata.file_type();
        let kind = if file_type.is_dir() {
            EntryType::Dir
        } else if file_type.is_file() {
            EntryType::Reg
        } else if file_type.is_symlink() {
            EntryType::Symlink
        } else if file_type.is_char_device() {
            EntryType::Char
        } else if file_type.is_block_device() {
            EntryType::Block
        } else if file_type.is_fifo() {
            EntryType::Fifo
        } else {
            warn!(path = %path.display(), "skipping a socket: tar cannot hold sockets");
            return Ok(());
        };

        let mut meta = EntryMeta {
            name,
            kind,
            size: 0,
            mode: metadata.mode() & 0o7777,
            uid: u64::from(metadata.uid()),
            gid: u64::from(metadata.gid()),
            // NOTE: owner names are left empty; layers carry numeric ids, and
            // the names of the host's user database would be wrong for the image.
            user_name: String::new(),
            group_name: String::new(),
            mtime: metadata.mtime(),
            mtime_nsec: u32::try_from(metadata.mtime_nsec()).unwrap_or(0),
            link_name: Vec::new(),
            dev_major: 0,
            dev_minor: 0,
            xattrs: read_xattrs(path)?,
        };
        let mut content = Content::None;

        match kind {
            EntryType::Reg => {
                let key = (metadata.dev(), metadata.ino());
                let first_name = (metadata.nlink() > 1)
                    .then(|| self.inodes.get(&key).cloned())
                    .flatten();
                if let Some(target) = first_name {
                    meta.kind = EntryType::Hardlink;
                    meta.link_name = target;
                } else {
                    if metadata.nlink() > 1 {
                        self.inodes.insert(key, meta.name.clone());
                    }
                    meta.size = metadata.len();
                    if meta.size > 0 {
                        content = Content::File(path.to_path_buf());
                    }
                }
            }
            EntryType::Symlink => {
                let target = fs::read_link(path).map_err(|source| WriterError::Walk {
                    path: path.to_path_buf(),
                    source,
                })?;
                meta.link_name = target.as_os_str().as_bytes().to_vec();
            }
            EntryType::Char | EntryType::Block => {
                let (major, minor) = split_device(metadata.rdev());
                meta.dev_major = major;
                meta.dev_minor = minor;
            }
            _ => {}
        }
        self.entries.push(SourceEntry { meta, content });
        Ok(())
    }
}

/// Splits a Linux `dev_t` into major and minor numbers (the glibc
/// encoding: major in bits 8..20 and 32..44, minor in bits 0..8 and 20..32).
fn split_device(rdev: u64) -> (u32, u32) {
    let major = ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0x0000_0fff);
    let minor = ((rdev >> 12) & 0xffff_ff00) | (rdev & 0x0000_00ff);
    (major as u32, minor as u32)
}

/// Reads the extended attributes of `path` without following a symlink.
/// A filesystem without xattr support yields none.
fn read_xattrs(path: &Path) -> Result<BTreeMap<String, Vec<u8>>, WriterError> {
    let walk_error = |source| WriterError::Walk {
        path: path.to_path_buf(),
        source,
    };
    let names = match xattr::list(path) {
        Ok(names) => names,
        Err(error) if error.raw_os_error() == Some(libc::ENOTSUP) => return Ok(BTreeMap::new()),
        Err(error) => return Err(walk_error(error)),
    };
    let mut xattrs = BTreeMap::new();
    for name in names {
        let Some(value) = xattr::get(path, &name).map_err(walk_error)? else {
            continue;
        };
        match name.to_str() {
            Some(text) => {
                xattrs.insert(text.to_string(), value);
            }
            None => {
                warn!(path = %path.display(), name = ?name, "skipping an xattr whose name is not UTF-8")
            }
        }
    }
    Ok(xattrs)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn split_device_table() {
        let cases: [(u64, (u32, u32)); 3] = [
            (0x0103, (1, 3)),
            (0x0800, (8, 0)),
            // major 259, minor 65536 (a large NVMe partition number).
            ((259 << 8) | (0x100 << 12), (259, 256)),
        ];
        for (rdev, expected) in cases {
            assert_eq!(split_device(rdev), expected, "rdev {rdev:#x}");
        }
    }

    #[test]
    fn walk_lists_tree_with_links() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir(root.join("b")).unwrap();
        fs::write(root.join("b/file"), b"hello").unwrap();
        fs::hard_link(root.join("b/file"), root.join("a_link")).unwrap();
        std::os::unix::fs::symlink("b/file", root.join("c_sym")).unwrap();
        fs::write(root.join("empty"), b"").unwrap();
        fs::set_permissions(root.join("empty"), fs::Permissions::from_mode(0o4755)).unwrap();

        let entries = walk_tree(root).unwrap();
        let summary: Vec<(String, EntryType, String, u64)> = entries
            .iter()
            .map(|entry| {
                (
                    entry.meta.display_name(),
                    entry.meta.kind,
                    String::from_utf8_lossy(&entry.meta.link_name).into_owned(),
                    entry.meta.size,
                )
            })
            .collect();
        let expected = vec![
            ("./".to_string(), EntryType::Dir, String::new(), 0),
            ("a_link".to_string(), EntryType::Reg, String::new(), 5),
            ("b/".to_string(), EntryType::Dir, String::new(), 0),
            (
                "b/file".to_string(),
                EntryType::Hardlink,
                "a_link".to_string(),
                0,
            ),
            (
                "c_sym".to_string(),
                EntryType::Symlink,
                "b/file".to_string(),
                0,
            ),
            ("empty".to_string(), EntryType::Reg, String::new(), 0),
        ];
        assert_eq!(summary, expected);
        assert_eq!(entries[5].meta.mode, 0o4755);
    }
}
