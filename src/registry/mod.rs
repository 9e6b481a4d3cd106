//! Image source for OCI distribution-spec registries (Docker Registry HTTP
//! API v2): manifests, configs and ranged blob reads.
//!
//! Requests go over HTTPS unless the registry host is loopback (127.0.0.0/8,
//! `::1`, `localhost`) or `plain_http` is set. Access starts anonymous; a 401
//! answer's `WWW-Authenticate` challenge selects Basic or Bearer
//! authentication with credentials from the Docker config file.

pub mod auth;
mod blob;
mod client;
pub mod error;
pub mod manifest;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;

pub use blob::RegistryBlob;
pub use client::is_loopback_host;
pub use error::RegistryError;

use crate::reference::{validate_digest, Reference};
use crate::source::{BlobSource, ImageSource, LayerDescriptor, Platform, ResolvedImage};
use client::Client;
use manifest::{
    parse_manifest, resolve_image, sha256_digest, ContentFetcher, Descriptor, RootManifest,
};

/// How to reach a registry.
#[derive(Clone, Debug)]
pub struct RegistryOptions {
    /// Use plain HTTP even for a host that is not loopback.
    pub plain_http: bool,
    /// Accept any TLS certificate.
    pub insecure_skip_tls_verify: bool,
    /// Credentials file (Docker `config.json` format); when `None`,
    /// `REGISTRY_AUTH_FILE`, then `$DOCKER_CONFIG/config.json`, then
    /// `~/.docker/config.json`.
    pub auth_file: Option<PathBuf>,
    /// Retries after the first attempt for transient failures.
    pub retries: u32,
    /// Limit for one HTTP request, body included.
    pub request_timeout: Duration,
    /// Limit for one request with all its retries and backoff delays: no retry
    /// starts that could not finish before it.
    pub deadline: Duration,
    pub user_agent: String,
}

impl Default for RegistryOptions {
    fn default() -> RegistryOptions {
        RegistryOptions {
            plain_http: false,
            insecure_skip_tls_verify: false,
            auth_file: None,
            retries: 4,
            request_timeout: Duration::from_secs(60),
            deadline: Duration::from_secs(300),
            user_agent: concat!("esgz-nbd/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

/// Opens an image in a registry. Credentials are read here; no request is
/// sent before `resolve`.
pub fn open_registry(
    reference: &Reference,
    options: &RegistryOptions,
) -> anyhow::Result<Arc<dyn ImageSource>> {
    let credentials = auth::load_credentials(&reference.registry, options.auth_file.as_deref())?;
    let client = Client::new(reference, options, credentials)?;
    Ok(Arc::new(RegistryImage {
        client: Arc::new(client),
        reference: reference.clone(),
    }))
}

/// An image in a registry, named by a reference.
#[derive(Debug)]
struct RegistryImage {
    client: Arc<Client>,
    reference: Reference,
}

impl RegistryImage {
    async fn resolve_inner(&self, platform: &Platform) -> anyhow::Result<ResolvedImage> {
        let what = self.reference.to_string();
        let target = self
            .client
            .target(&format!("manifest {}", self.reference.manifest_reference()));
        let (body, content_type, header_digest) = self
            .client
            .get_manifest(self.reference.manifest_reference())
            .await?;
        let digest = sha256_digest(&body);

        if let Some(pinned) = &self.reference.digest {
            if &digest != pinned {
                return Err(RegistryError::ManifestDigestMismatch {
                    target,
                    expected: pinned.clone(),
                    actual: digest,
                    source_of_expected: "the reference",
                }
                .into());
            }
        }
        // A registry may compute Docker-Content-Digest with another algorithm;
        // only a sha256 value can be compared.
        if let Some(header) = header_digest.filter(|value| value.starts_with("sha256:")) {
            if header != digest {
                return Err(RegistryError::ManifestDigestMismatch {
                    target,
                    expected: header,
                    actual: digest,
                    source_of_expected: "the Docker-Content-Digest header",
                }
                .into());
            }
        }

        let manifest = parse_manifest(&what, &body, content_type.as_deref())?;
        tracing::debug!(reference = %what, manifest = %digest, "fetched the manifest");
        let root = RootManifest {
            what,
            digest,
            manifest,
        };
        resolve_image(self, root, platform).await
    }
}

impl ContentFetcher for RegistryImage {
    fn fetch_manifest<'a>(
        &'a self,
        descriptor: &'a Descriptor,
    ) -> BoxFuture<'a, anyhow::Result<(Bytes, Option<String>)>> {
        Box::pin(async move {
            let (body, content_type, _) = self.client.get_manifest(&descriptor.digest).await?;
            Ok((body, content_type))
        })
    }

    fn fetch_config<'a>(
        &'a self,
        descriptor: &'a Descriptor,
    ) -> BoxFuture<'a, anyhow::Result<Bytes>> {
        Box::pin(async move {
            Ok(self
                .client
                .get_blob(&descriptor.digest, descriptor.size)
                .await?)
        })
    }
}

impl ImageSource for RegistryImage {
    fn resolve<'a>(
        &'a self,
        platform: &'a Platform,
    ) -> BoxFuture<'a, anyhow::Result<ResolvedImage>> {
        Box::pin(self.resolve_inner(platform))
    }

    fn blob(&self, layer: &LayerDescriptor) -> anyhow::Result<Arc<dyn BlobSource>> {
        validate_digest(&layer.digest)?;
        Ok(Arc::new(RegistryBlob::new(
            Arc::clone(&self.client),
            layer.digest.clone(),
            layer.size,
        )))
    }

    fn describe(&self) -> String {
        self.reference.to_string()
    }
}
