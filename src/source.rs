//! Image sources: where manifests and layer blobs are read from (a registry
//! or an OCI image layout directory), behind one interface.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::sync::mpsc;

/// Random access to one blob.
pub trait BlobSource: Send + Sync {
    /// Size of the blob in bytes.
    fn size(&self) -> u64;

    /// Reads exactly `len` bytes at `offset`, or fails; the caller keeps the
    /// range within `size()`. Implementations retry transient errors.
    fn read_range(&self, offset: u64, len: u64) -> BoxFuture<'_, anyhow::Result<Bytes>>;

    /// Reads exactly `len` bytes at `offset` and sends them to `sink` in order, in
    /// pieces as they arrive, so the caller can work on the start of a range while
    /// the rest downloads. A retry continues after the bytes already sent, so no
    /// byte is sent twice. Fails when the range cannot be read or `sink` is closed.
    ///
    /// The default reads the whole range with [`BlobSource::read_range`] and sends it
    /// as one piece.
    fn stream_range<'a>(
        &'a self,
        offset: u64,
        len: u64,
        sink: &'a mpsc::Sender<Bytes>,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let bytes = self.read_range(offset, len).await?;
            sink.send(bytes)
                .await
                .map_err(|_| anyhow::anyhow!("the reader of the blob range went away"))
        })
    }
}

/// An OS/architecture pair, as in an image index's `platform`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// The platform of the running host (`linux/amd64` on x86_64).
    pub fn host() -> Platform {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platform {
            os: std::env::consts::OS.to_string(),
            architecture: architecture.to_string(),
            variant: None,
        }
    }

    /// Parses `OS/ARCH[/VARIANT]`.
    pub fn parse(text: &str) -> anyhow::Result<Platform> {
        let parts: Vec<&str> = text.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, variant] if !os.is_empty() && !arch.is_empty() && !variant.is_empty() => {
                Ok(Platform {
                    os: os.to_string(),
                    architecture: arch.to_string(),
                    variant: Some(variant.to_string()),
                })
            }
            _ => anyhow::bail!(
                "invalid platform {text:?}: expected OS/ARCH or OS/ARCH/VARIANT, such as linux/amd64"
            ),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

/// A layer descriptor from an image manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerDescriptor {
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    pub size: u64,
    pub annotations: BTreeMap<String, String>,
}

/// An image manifest resolved for one platform.
#[derive(Clone, Debug)]
pub struct ResolvedImage {
    /// Digest of the platform manifest (not of the index), `sha256:<hex>`.
    pub manifest_digest: String,
    /// Layers, lowest first.
    pub layers: Vec<LayerDescriptor>,
    /// `rootfs.diff_ids` of the config, lowest first.
    pub diff_ids: Vec<String>,
}

/// A place images are read from.
pub trait ImageSource: Send + Sync {
    /// Resolves the reference (through an index if there is one) to the
    /// manifest for `platform`, and reads that manifest and its config.
    fn resolve<'a>(
        &'a self,
        platform: &'a Platform,
    ) -> BoxFuture<'a, anyhow::Result<ResolvedImage>>;

    /// Opens a layer blob for ranged reads.
    fn blob(&self, layer: &LayerDescriptor) -> anyhow::Result<Arc<dyn BlobSource>>;

    /// A human-readable name of the image, without credentials.
    fn describe(&self) -> String;
}
