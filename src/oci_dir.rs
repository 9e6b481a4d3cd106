//! OCI image layout directories (OCI image-spec `image-layout.md`) as raw
//! content stores: blobs by digest, and `index.json` entries by tag.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::reference::validate_digest;
use crate::registry::manifest::REF_NAME_ANNOTATION;

/// Content of the `oci-layout` file.
const LAYOUT_VERSION_FILE: &str = r#"{"imageLayoutVersion":"1.0.0"}"#;

#[derive(Debug, thiserror::Error)]
pub enum OciDirError {
    #[error("{path}: {action} failed: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },

    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },

    #[error("invalid digest {digest:?}: expected sha256: and 64 lowercase hex digits")]
    InvalidDigest { digest: String },

    #[error("{dir}/index.json has no manifest tagged {tag:?}; available tags: {available}")]
    TagNotFound {
        dir: PathBuf,
        tag: String,
        available: String,
    },

    #[error("{dir}/index.json lists {count} manifests; name one with oci:DIR:TAG")]
    Ambiguous { dir: PathBuf, count: usize },

    #[error("{dir}/index.json has an invalid manifest entry: {reason}")]
    InvalidEntry { dir: PathBuf, reason: String },
}

/// An OCI image layout directory.
#[derive(Clone, Debug)]
pub struct OciDir {
    dir: PathBuf,
}

/// A descriptor as `index.json` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

impl OciDir {
    /// Opens an existing layout for reading.
    pub fn open(dir: &Path) -> OciDir {
        OciDir {
            dir: dir.to_path_buf(),
        }
    }

    /// Creates the layout (the directory, `oci-layout`, `blobs/sha256` and
    /// an empty `index.json`) unless it exists.
    pub fn create(dir: &Path) -> Result<OciDir, OciDirError> {
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs)
            .map_err(|source| io_error(&blobs, "creating the directory", source))?;
        let layout = dir.join("oci-layout");
        if !layout.exists() {
            write_atomic(&layout, LAYOUT_VERSION_FILE.as_bytes())?;
        }
        let index = dir.join("index.json");
        if !index.exists() {
            let empty = json!({"schemaVersion": 2, "mediaType": crate::registry::manifest::OCI_INDEX, "manifests": []});
            write_atomic(&index, &serde_json::to_vec(&empty).unwrap_or_default())?;
        }
        Ok(OciDir {
            dir: dir.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Path of a blob; the digest is validated, so it is safe as a file name.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, OciDirError> {
        validate_digest(digest).map_err(|_| OciDirError::InvalidDigest {
            digest: digest.to_string(),
        })?;
        Ok(self
            .dir
            .join("blobs/sha256")
            .join(&digest["sha256:".len()..]))
    }

    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).is_ok_and(|path| path.is_file())
    }

    /// Reads a whole blob.
    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>, OciDirError> {
        let path = self.blob_path(digest)?;
        fs::read(&path).map_err(|source| io_error(&path, "reading the blob", source))
    }

    /// Stores the file at `source` as blob `digest`. With `move_file` the
    /// file is renamed into place when it is on the same filesystem;
    /// otherwise it is hard-linked or copied and `source` stays.
    pub fn put_blob_file(
        &self,
        digest: &str,
        source: &Path,
        move_file: bool,
    ) -> Result<(), OciDirError> {
        let path = self.blob_path(digest)?;
        if path.is_file() {
            return Ok(());
        }
        let staging = path.with_extension("partial");
        let placed = if move_file {
            fs::rename(source, &staging).is_ok()
        } else {
            fs::hard_link(source, &staging).is_ok()
        };
        if !placed {
            fs::copy(source, &staging)
                .map_err(|error| io_error(&staging, "copying the blob", error))?;
        }
        fs::rename(&staging, &path).map_err(|error| io_error(&path, "storing the blob", error))
    }

    /// Stores `bytes` as a blob; returns its digest.
    pub fn put_blob_bytes(&self, bytes: &[u8]) -> Result<String, OciDirError> {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
        let path = self.blob_path(&digest)?;
        if !path.is_file() {
            write_atomic(&path, bytes)?;
        }
        Ok(digest)
    }

    /// Finds the manifest entry tagged `tag` (`org.opencontainers.image.ref.name`),
    /// or the only entry when `tag` is `None`.
    pub fn find(&self, tag: Option<&str>) -> Result<IndexEntry, OciDirError> {
        let index = self.read_index()?;
        let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
        let chosen = match tag {
            Some(tag) => manifests
                .iter()
                .find(|entry| entry["annotations"][REF_NAME_ANNOTATION].as_str() == Some(tag))
                .ok_or_else(|| OciDirError::TagNotFound {
                    dir: self.dir.clone(),
                    tag: tag.to_string(),
                    available: manifests
                        .iter()
                        .filter_map(|entry| entry["annotations"][REF_NAME_ANNOTATION].as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                })?,
            None if manifests.len() == 1 => &manifests[0],
            None => {
                return Err(OciDirError::Ambiguous {
                    dir: self.dir.clone(),
                    count: manifests.len(),
                })
            }
        };
        let invalid = |reason: &str| OciDirError::InvalidEntry {
            dir: self.dir.clone(),
            reason: reason.to_string(),
        };
        Ok(IndexEntry {
            media_type: chosen["mediaType"].as_str().unwrap_or_default().to_string(),
            digest: chosen["digest"]
                .as_str()
                .ok_or_else(|| invalid("no digest"))?
                .to_string(),
            size: chosen["size"].as_u64().ok_or_else(|| invalid("no size"))?,
        })
    }

    /// Adds `entry` to `index.json` under `tag`, replacing the entry that had
    /// the tag before; without a tag the entry is added untagged.
    pub fn tag(&self, entry: &IndexEntry, tag: Option<&str>) -> Result<(), OciDirError> {
        let mut index = self.read_index()?;
        let mut manifests = index["manifests"].as_array().cloned().unwrap_or_default();
        if let Some(tag) = tag {
            manifests.retain(|existing| {
                existing["annotations"][REF_NAME_ANNOTATION].as_str() != Some(tag)
            });
        }
        let mut descriptor = json!({
            "mediaType": entry.media_type,
            "digest": entry.digest,
            "size": entry.size,
        });
        if let Some(tag) = tag {
            descriptor["annotations"] = json!({ REF_NAME_ANNOTATION: tag });
        }
        manifests.push(descriptor);
        index["manifests"] = Value::Array(manifests);
        let bytes = serde_json::to_vec(&index).map_err(|source| OciDirError::Json {
            path: self.dir.join("index.json"),
            source,
        })?;
        write_atomic(&self.dir.join("index.json"), &bytes)
    }

    fn read_index(&self) -> Result<Value, OciDirError> {
        let path = self.dir.join("index.json");
        let bytes =
            fs::read(&path).map_err(|source| io_error(&path, "reading the image index", source))?;
        serde_json::from_slice(&bytes).map_err(|source| OciDirError::Json { path, source })
    }
}

fn io_error(path: &Path, action: &'static str, source: io::Error) -> OciDirError {
    OciDirError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

/// Writes `bytes` to a temporary file next to `path`, then renames it.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), OciDirError> {
    let staging = path.with_extension("partial");
    fs::write(&staging, bytes).map_err(|source| io_error(&staging, "writing", source))?;
    fs::rename(&staging, path).map_err(|source| io_error(path, "renaming into place", source))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_replaces_and_find_resolves() {
        let dir = tempfile::tempdir().unwrap();
        let layout = OciDir::create(dir.path()).unwrap();
        let first = layout.put_blob_bytes(b"one").unwrap();
        let second = layout.put_blob_bytes(b"two").unwrap();
        let entry = |digest: &str| IndexEntry {
            media_type: "application/vnd.oci.image.manifest.v1+json".to_string(),
            digest: digest.to_string(),
            size: 3,
        };
        layout.tag(&entry(&first), Some("v1")).unwrap();
        assert_eq!(layout.find(None).unwrap().digest, first);
        layout.tag(&entry(&second), Some("v1")).unwrap();
        assert_eq!(layout.find(Some("v1")).unwrap().digest, second);
        layout.tag(&entry(&first), Some("v2")).unwrap();
        assert!(matches!(
            layout.find(None),
            Err(OciDirError::Ambiguous { count: 2, .. })
        ));
        assert!(matches!(
            layout.find(Some("v3")),
            Err(OciDirError::TagNotFound { .. })
        ));
        assert_eq!(layout.read_blob(&second).unwrap(), b"two");
        assert!(layout.blob_path("sha256:../../etc").is_err());
    }
}
