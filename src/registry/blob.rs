//! Ranged reads of one registry blob (`GET /v2/NAME/blobs/DIGEST` with
//! `Range`), as the OCI distribution spec describes them.

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;

use super::client::Client;
use super::error::RegistryError;
use crate::source::BlobSource;

/// A layer blob in a registry; its size comes from the manifest's descriptor.
#[derive(Debug)]
pub struct RegistryBlob {
    client: Arc<Client>,
    /// Validated `sha256:<hex>`, so it is safe in a URL path.
    digest: String,
    size: u64,
}

impl RegistryBlob {
    pub(crate) fn new(client: Arc<Client>, digest: String, size: u64) -> RegistryBlob {
        RegistryBlob {
            client,
            digest,
            size,
        }
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, RegistryError> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(RegistryError::OutOfBounds {
                target: self.client.target(&format!("blob {}", self.digest)),
                offset,
                len,
                size: self.size,
            });
        }
        self.client
            .get_blob_range(&self.digest, offset, len, self.size)
            .await
    }
}

impl BlobSource for RegistryBlob {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_range(&self, offset: u64, len: u64) -> BoxFuture<'_, anyhow::Result<Bytes>> {
        Box::pin(async move { Ok(self.read(offset, len).await?) })
    }
}
