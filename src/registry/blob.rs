//! Ranged reads of one registry blob (`GET /v2/NAME/blobs/DIGEST` with
//! `Range`), as the OCI distribution spec describes them.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::sync::mpsc;

use super::error::RegistryError;
use super::hosts::{HostSet, Need};
use crate::source::BlobSource;

/// A layer blob in a registry; its size comes from the manifest's descriptor.
#[derive(Debug)]
pub struct RegistryBlob {
    /// Mirrors, then the upstream server.
    hosts: Arc<HostSet>,
    /// Validated `sha256:<hex>`, so it is safe in a URL path.
    digest: String,
    size: u64,
}

impl RegistryBlob {
    pub(crate) fn new(hosts: Arc<HostSet>, digest: String, size: u64) -> RegistryBlob {
        RegistryBlob {
            hosts,
            digest,
            size,
        }
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, RegistryError> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        self.check_bounds(offset, len)?;
        let target = self.hosts.target(&format!("blob {}", self.digest));
        let digest = self.digest.as_str();
        let size = self.size;
        self.hosts
            .run(Need::Pull, &target, |client| async move {
                client.get_blob_range(digest, offset, len, size).await
            })
            .await
    }

    /// Streams `offset..offset + len` to `sink`; when one host fails after sending
    /// part of the range, the next host's bytes continue where it stopped.
    async fn stream(
        &self,
        offset: u64,
        len: u64,
        sink: &mpsc::Sender<Bytes>,
    ) -> Result<(), RegistryError> {
        if len == 0 {
            return Ok(());
        }
        self.check_bounds(offset, len)?;
        let target = self.hosts.target(&format!("blob {}", self.digest));
        let digest = self.digest.as_str();
        let size = self.size;
        let delivered = AtomicU64::new(0);
        let delivered = &delivered;
        self.hosts
            .run(Need::Pull, &target, |client| async move {
                client
                    .stream_blob_range(digest, offset, len, size, delivered, sink)
                    .await
            })
            .await
    }

    fn check_bounds(&self, offset: u64, len: u64) -> Result<(), RegistryError> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(RegistryError::OutOfBounds {
                target: self.hosts.target(&format!("blob {}", self.digest)),
                offset,
                len,
                size: self.size,
            });
        }
        Ok(())
    }
}

impl BlobSource for RegistryBlob {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_range(&self, offset: u64, len: u64) -> BoxFuture<'_, anyhow::Result<Bytes>> {
        Box::pin(async move { Ok(self.read(offset, len).await?) })
    }

    fn stream_range<'a>(
        &'a self,
        offset: u64,
        len: u64,
        sink: &'a mpsc::Sender<Bytes>,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move { Ok(self.stream(offset, len, sink).await?) })
    }
}
