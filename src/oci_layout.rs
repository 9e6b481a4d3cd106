//! Image source for OCI image layout directories (OCI image-spec
//! `image-layout.md`): `oci-layout`, `index.json` and `blobs/sha256/<hex>`.

use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use serde::Deserialize;

use crate::reference::validate_digest;
use crate::registry::manifest::{
    check_size, parse_manifest, resolve_image, select_platform, verify_content, ContentFetcher,
    Descriptor, ImageIndex, Manifest, RootManifest, MAX_CONFIG_SIZE, MAX_MANIFEST_SIZE,
    REF_NAME_ANNOTATION,
};
use crate::source::{BlobSource, ImageSource, LayerDescriptor, Platform, ResolvedImage};

/// The layout version this reader understands.
const LAYOUT_VERSION: &str = "1.0.0";

/// Errors of reading an OCI layout or one of its blobs.
#[derive(Debug, thiserror::Error)]
pub enum OciLayoutError {
    #[error("{dir} is not an OCI image layout: failed to read {file}: {source}")]
    NotALayout {
        dir: PathBuf,
        file: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to parse {path}: {source}")]
    InvalidJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} has imageLayoutVersion {version:?}; this reader supports {LAYOUT_VERSION}")]
    UnsupportedVersion { path: PathBuf, version: String },
    #[error("{dir}/index.json lists no manifests")]
    EmptyIndex { dir: PathBuf },
    #[error("tag {tag:?} not found in {dir}/index.json; tags present: {available}")]
    TagNotFound {
        dir: PathBuf,
        tag: String,
        available: String,
    },
    #[error("{dir}/index.json lists several images ({available}): name one with oci:DIR:TAG")]
    AmbiguousImage { dir: PathBuf, available: String },
    #[error("blob {digest} missing from the layout: failed to open {path}: {source}")]
    BlobMissing {
        digest: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "blob {path} is {actual} bytes, but its descriptor says {expected}: the layout is corrupt"
    )]
    BlobSize {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("failed to read {len} bytes at offset {offset} of {path}: {source}")]
    ReadBlob {
        path: PathBuf,
        offset: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("read of {len} bytes at offset {offset} is beyond the size {size} of {path}")]
    OutOfBounds {
        path: PathBuf,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("blob read task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LayoutFile {
    image_layout_version: String,
}

/// Opens the OCI image layout at `dir`, reading `oci-layout` and
/// `index.json` now. `tag` selects the `index.json` entry whose
/// `org.opencontainers.image.ref.name` equals it; without a tag the layout
/// must hold one image (or one multi-platform set of manifests).
pub fn open_oci_layout(dir: &Path, tag: Option<&str>) -> anyhow::Result<Arc<dyn ImageSource>> {
    let layout_path = dir.join("oci-layout");
    let layout_text = std::fs::read(&layout_path).map_err(|source| OciLayoutError::NotALayout {
        dir: dir.to_path_buf(),
        file: "oci-layout",
        source,
    })?;
    let layout: LayoutFile =
        serde_json::from_slice(&layout_text).map_err(|source| OciLayoutError::InvalidJson {
            path: layout_path.clone(),
            source,
        })?;
    if layout.image_layout_version != LAYOUT_VERSION {
        return Err(OciLayoutError::UnsupportedVersion {
            path: layout_path,
            version: layout.image_layout_version,
        }
        .into());
    }

    let index_path = dir.join("index.json");
    let index_text = std::fs::read(&index_path).map_err(|source| OciLayoutError::NotALayout {
        dir: dir.to_path_buf(),
        file: "index.json",
        source,
    })?;
    let index = match parse_manifest(&index_path.display().to_string(), &index_text, None)? {
        Manifest::Index(index) => index,
        Manifest::Image(_) => anyhow::bail!(
            "{} is an image manifest, expected an image index",
            index_path.display()
        ),
    };
    if index.manifests.is_empty() {
        return Err(OciLayoutError::EmptyIndex {
            dir: dir.to_path_buf(),
        }
        .into());
    }

    Ok(Arc::new(OciLayout {
        dir: dir.to_path_buf(),
        tag: tag.map(str::to_string),
        index,
    }))
}

/// An image in an OCI layout.
#[derive(Debug)]
struct OciLayout {
    dir: PathBuf,
    tag: Option<String>,
    /// The parsed `index.json`.
    index: ImageIndex,
}

impl OciLayout {
    /// Returns the path of a blob; the digest is validated first, so it
    /// cannot name anything outside `blobs/sha256/`.
    fn blob_path(&self, digest: &str) -> anyhow::Result<PathBuf> {
        validate_digest(digest)?;
        let hex = digest.trim_start_matches("sha256:");
        Ok(self.dir.join("blobs").join("sha256").join(hex))
    }

    /// Opens a blob and checks its size against the descriptor's.
    fn open_blob(&self, digest: &str, size: u64) -> anyhow::Result<LayoutBlob> {
        let path = self.blob_path(digest)?;
        let file = std::fs::File::open(&path).map_err(|source| OciLayoutError::BlobMissing {
            digest: digest.to_string(),
            path: path.clone(),
            source,
        })?;
        let actual = file
            .metadata()
            .map_err(|source| OciLayoutError::ReadBlob {
                path: path.clone(),
                offset: 0,
                len: 0,
                source,
            })?
            .len();
        if actual != size {
            return Err(OciLayoutError::BlobSize {
                path,
                expected: size,
                actual,
            }
            .into());
        }
        Ok(LayoutBlob {
            file: Arc::new(file),
            path,
            size,
        })
    }

    /// Reads a whole small blob (manifest or config) of at most `limit` bytes.
    async fn read_small_blob(&self, descriptor: &Descriptor, limit: u64) -> anyhow::Result<Bytes> {
        check_size(
            &format!("blob {}", descriptor.digest),
            descriptor.size,
            limit,
        )?;
        let blob = self.open_blob(&descriptor.digest, descriptor.size)?;
        Ok(blob.read(0, descriptor.size).await?)
    }

    /// Picks the `index.json` entries for the requested tag.
    fn candidates(&self) -> Result<Vec<&Descriptor>, OciLayoutError> {
        let entries = &self.index.manifests;
        let ref_name = |entry: &Descriptor| entry.annotations.get(REF_NAME_ANNOTATION).cloned();
        let available = || {
            let mut names: Vec<String> = entries.iter().filter_map(ref_name).collect();
            names.sort();
            names.dedup();
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        };

        match &self.tag {
            Some(tag) => {
                let found: Vec<&Descriptor> = entries
                    .iter()
                    .filter(|entry| ref_name(entry).as_deref() == Some(tag.as_str()))
                    .collect();
                if found.is_empty() {
                    return Err(OciLayoutError::TagNotFound {
                        dir: self.dir.clone(),
                        tag: tag.clone(),
                        available: available(),
                    });
                }
                Ok(found)
            }
            None => {
                // One entry, or entries that differ only by platform.
                let mut names: Vec<Option<String>> = entries.iter().map(ref_name).collect();
                names.dedup();
                if entries.len() == 1 || names.len() == 1 {
                    Ok(entries.iter().collect())
                } else {
                    Err(OciLayoutError::AmbiguousImage {
                        dir: self.dir.clone(),
                        available: available(),
                    })
                }
            }
        }
    }

    async fn resolve_inner(&self, platform: &Platform) -> anyhow::Result<ResolvedImage> {
        let candidates = self.candidates()?;
        let index_what = format!("{}/index.json", self.dir.display());
        let chosen: Descriptor = match candidates.as_slice() {
            [only] => (*only).clone(),
            several => {
                let owned: Vec<Descriptor> = several.iter().map(|entry| (*entry).clone()).collect();
                select_platform(&index_what, &owned, platform)?.clone()
            }
        };
        let chosen = &chosen;

        let what = format!("{} manifest {}", self.describe(), chosen.digest);
        let body = self.read_small_blob(chosen, MAX_MANIFEST_SIZE).await?;
        verify_content(&what, chosen, &body)?;
        let media_type = (!chosen.media_type.is_empty()).then_some(chosen.media_type.as_str());
        let manifest = parse_manifest(&what, &body, media_type)?;
        tracing::debug!(layout = %self.dir.display(), manifest = %chosen.digest, "read the layout's manifest");

        let root = RootManifest {
            what,
            digest: chosen.digest.clone(),
            manifest,
        };
        resolve_image(self, root, platform).await
    }
}

impl ContentFetcher for OciLayout {
    fn fetch_manifest<'a>(
        &'a self,
        descriptor: &'a Descriptor,
    ) -> BoxFuture<'a, anyhow::Result<(Bytes, Option<String>)>> {
        Box::pin(async move {
            Ok((
                self.read_small_blob(descriptor, MAX_MANIFEST_SIZE).await?,
                None,
            ))
        })
    }

    fn fetch_config<'a>(
        &'a self,
        descriptor: &'a Descriptor,
    ) -> BoxFuture<'a, anyhow::Result<Bytes>> {
        Box::pin(self.read_small_blob(descriptor, MAX_CONFIG_SIZE))
    }
}

impl ImageSource for OciLayout {
    fn resolve<'a>(
        &'a self,
        platform: &'a Platform,
    ) -> BoxFuture<'a, anyhow::Result<ResolvedImage>> {
        Box::pin(self.resolve_inner(platform))
    }

    fn blob(&self, layer: &LayerDescriptor) -> anyhow::Result<Arc<dyn BlobSource>> {
        Ok(Arc::new(self.open_blob(&layer.digest, layer.size)?))
    }

    fn describe(&self) -> String {
        match &self.tag {
            Some(tag) => format!("oci:{}:{tag}", self.dir.display()),
            None => format!("oci:{}", self.dir.display()),
        }
    }
}

/// A blob file of a layout, read with positional reads on a blocking thread.
#[derive(Debug)]
pub struct LayoutBlob {
    file: Arc<std::fs::File>,
    path: PathBuf,
    /// Size from the descriptor, checked against the file when opened.
    size: u64,
}

impl LayoutBlob {
    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, OciLayoutError> {
        let out_of_bounds = || OciLayoutError::OutOfBounds {
            path: self.path.clone(),
            offset,
            len,
            size: self.size,
        };
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(out_of_bounds());
        }
        let buffer_len = usize::try_from(len).map_err(|_| out_of_bounds())?;
        if buffer_len == 0 {
            return Ok(Bytes::new());
        }

        let file = Arc::clone(&self.file);
        let result = tokio::task::spawn_blocking(move || {
            let mut buffer = vec![0u8; buffer_len];
            file.read_exact_at(&mut buffer, offset).map(|()| buffer)
        })
        .await?;
        let buffer = result.map_err(|source| OciLayoutError::ReadBlob {
            path: self.path.clone(),
            offset,
            len,
            source,
        })?;
        Ok(Bytes::from(buffer))
    }
}

impl BlobSource for LayoutBlob {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_range(&self, offset: u64, len: u64) -> BoxFuture<'_, anyhow::Result<Bytes>> {
        Box::pin(async move { Ok(self.read(offset, len).await?) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_layout() -> Option<PathBuf> {
        let shared = std::env::var_os("ESGZ_SHARED")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"));
        let candidates = [shared, PathBuf::from("/work/shared")];
        candidates
            .iter()
            .map(|base| base.join("fixtures/basic/oci"))
            .find(|path| path.join("index.json").exists())
    }

    /// Writes a minimal layout with one manifest whose config is `config`.
    fn write_layout(
        dir: &Path,
        config: &[u8],
        manifest_tweak: impl Fn(String) -> String,
    ) -> String {
        use crate::registry::manifest::sha256_digest;
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).expect("mkdir");
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
            .expect("write");
        let layer = b"layer bytes";
        let layer_digest = sha256_digest(layer);
        std::fs::write(blobs.join(&layer_digest[7..]), layer).expect("write");
        let config_digest = sha256_digest(config);
        std::fs::write(blobs.join(&config_digest[7..]), config).expect("write");
        let manifest = manifest_tweak(format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer_digest}","size":{}}}]}}"#,
            config.len(),
            layer.len()
        ));
        let manifest_digest = sha256_digest(manifest.as_bytes());
        std::fs::write(blobs.join(&manifest_digest[7..]), &manifest).expect("write");
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{manifest_digest}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"v1"}}}}]}}"#,
            manifest.len()
        );
        std::fs::write(dir.join("index.json"), index).expect("write");
        manifest_digest
    }

    #[tokio::test]
    async fn fixture_layout_resolves() {
        let Some(dir) = fixture_layout() else {
            panic!("fixture layout fixtures/basic/oci not found: set ESGZ_SHARED");
        };
        let platform = Platform::parse("linux/amd64").expect("valid");
        for tag in [Some("latest"), None] {
            let source = open_oci_layout(&dir, tag).expect("open");
            let image = source.resolve(&platform).await.expect("resolve");
            assert_eq!(
                image.manifest_digest,
                "sha256:7e0054c8296bba7704025ea37e47dba2e072cb45d5354a377fdb8a34a8bdde81"
            );
            assert_eq!(image.layers.len(), 1);
            assert_eq!(
                image.diff_ids,
                vec![
                    "sha256:e29bef179b5382bea07dc72cace4d2ae7143c1c61b4d326924148dc1178eea7b"
                        .to_string()
                ]
            );
            let layer = &image.layers[0];
            assert_eq!(layer.size, 1330345);
            let blob = source.blob(layer).expect("blob");
            let footer = blob.read_range(layer.size - 51, 51).await.expect("footer");
            let file =
                std::fs::read(dir.join("blobs/sha256").join(&layer.digest[7..])).expect("read");
            assert_eq!(&footer[..], &file[file.len() - 51..]);
            assert!(
                blob.read_range(layer.size - 50, 51).await.is_err(),
                "read past the end"
            );
            assert!(
                blob.read_range(u64::MAX, 2).await.is_err(),
                "offset overflow"
            );
            assert_eq!(blob.read_range(3, 0).await.expect("empty read").len(), 0);
        }
        let missing = open_oci_layout(&dir, Some("nope")).expect("open");
        let error = missing.resolve(&platform).await.expect_err("unknown tag");
        assert!(
            error.to_string().contains("tags present: latest"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn layout_config_digest_verified() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = br#"{"rootfs":{"type":"layers","diff_ids":["sha256:0000000000000000000000000000000000000000000000000000000000000000"]}}"#;
        write_layout(dir.path(), config, |m| m);
        let platform = Platform::host();
        let source = open_oci_layout(dir.path(), Some("v1")).expect("open");
        let image = source
            .resolve(&platform)
            .await
            .expect("valid layout resolves");
        assert_eq!(image.diff_ids.len(), 1);

        // Corrupt the config in place, keeping its size.
        let config_digest = crate::registry::manifest::sha256_digest(config);
        let config_path = dir.path().join("blobs/sha256").join(&config_digest[7..]);
        let mut corrupt = config.to_vec();
        corrupt[3] = b'R';
        std::fs::write(&config_path, corrupt).expect("write");
        let error = source.resolve(&platform).await.expect_err("corrupt config");
        assert!(format!("{error:#}").contains("digest"), "{error:#}");
    }

    #[tokio::test]
    async fn layout_rejects_traversal_digest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = br#"{"rootfs":{"type":"layers","diff_ids":[]}}"#;
        write_layout(dir.path(), config, |m| m);
        let source = open_oci_layout(dir.path(), None).expect("open");
        let layer = LayerDescriptor {
            media_type: String::new(),
            digest: "sha256:../../../../etc/passwd".to_string(),
            size: 1,
            annotations: Default::default(),
        };
        assert!(source.blob(&layer).is_err());
        let uppercase = LayerDescriptor {
            digest: format!("sha256:{}", "A".repeat(64)),
            ..layer
        };
        assert!(source.blob(&uppercase).is_err());
    }

    #[tokio::test]
    async fn layout_layer_count_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = br#"{"rootfs":{"type":"layers","diff_ids":[]}}"#;
        write_layout(dir.path(), config, |m| m);
        let source = open_oci_layout(dir.path(), None).expect("open");
        let error = source
            .resolve(&Platform::host())
            .await
            .expect_err("1 layer, 0 diff_ids");
        assert!(error.to_string().contains("diff_ids"), "{error}");
    }

    #[test]
    fn open_rejects_non_layouts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let Err(error) = open_oci_layout(dir.path(), None) else {
            panic!("an empty directory opened as a layout");
        };
        assert!(error.to_string().contains("oci-layout"), "{error}");
        std::fs::write(
            dir.path().join("oci-layout"),
            br#"{"imageLayoutVersion":"2.0.0"}"#,
        )
        .expect("write");
        let Err(error) = open_oci_layout(dir.path(), None) else {
            panic!("layout version 2.0.0 accepted");
        };
        assert!(error.to_string().contains("2.0.0"), "{error}");
    }
}
