//! Image source for OCI distribution-spec registries (Docker Registry HTTP
//! API v2): manifests, configs and ranged blob reads.
//!
//! Requests go over HTTPS unless the registry host is loopback (127.0.0.0/8,
//! `::1`, `localhost`) or `plain_http` is set. Access starts anonymous; a 401
//! answer's `WWW-Authenticate` challenge selects Basic or Bearer
//! authentication with credentials from the Docker config file.
//!
//! With a hosts directory (containerd's `certs.d` layout, see [`hosts`]),
//! requests try the registry's mirrors in order before its upstream server.

pub mod auth;
mod blob;
mod client;
pub mod error;
pub mod hosts;
pub mod manifest;
pub mod push;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;

pub use blob::RegistryBlob;
pub use client::is_loopback_host;
pub use error::RegistryError;
pub use push::{open_repository, PushError, Repository};

use crate::reference::{validate_digest, Reference};
use crate::source::{BlobSource, ImageSource, LayerDescriptor, Platform, ResolvedImage};
use client::Client;
use hosts::{HostSet, Need};
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
    pub user_agent: String,
    /// Directory of `HOST[:PORT]/hosts.toml` files (containerd's `certs.d`
    /// layout) naming mirrors and TLS settings; `None` reads none.
    pub hosts_dir: Option<PathBuf>,
    /// Maximum number of requests to the registry's hosts in flight at
    /// once; 0 means no limit beyond the chunk store's own.
    pub max_concurrent_requests: usize,
}

impl Default for RegistryOptions {
    fn default() -> RegistryOptions {
        RegistryOptions {
            plain_http: false,
            insecure_skip_tls_verify: false,
            auth_file: None,
            retries: 4,
            request_timeout: Duration::from_secs(60),
            user_agent: concat!("esgz-nbd/", env!("CARGO_PKG_VERSION")).to_string(),
            hosts_dir: None,
            max_concurrent_requests: 0,
        }
    }
}

/// Opens an image in a registry. The hosts file and credentials are read
/// here; no request is sent before `resolve`.
pub fn open_registry(
    reference: &Reference,
    options: &RegistryOptions,
) -> anyhow::Result<Arc<dyn ImageSource>> {
    Ok(Arc::new(RegistryImage {
        hosts: Arc::new(open_hosts(reference, options)?),
        reference: reference.clone(),
    }))
}

/// Builds the clients for the registry's mirrors and upstream server, each
/// with the credentials stored for its own host.
fn open_hosts(reference: &Reference, options: &RegistryOptions) -> anyhow::Result<HostSet> {
    let server = client::default_server(reference, options)?;
    let endpoints =
        hosts::load_endpoints(options.hosts_dir.as_deref(), &reference.registry, &server)?;
    let mut clients = Vec::with_capacity(endpoints.len());
    for endpoint in &endpoints {
        let credentials = if endpoint.is_mirror {
            // A mirror usually needs no credentials; a broken helper for
            // its host must not stop the fallback to the upstream server.
            auth::load_credentials(&endpoint.host(), options.auth_file.as_deref())
                .unwrap_or_else(|error| {
                    tracing::warn!(host = %endpoint.host(), %error, "failed to read credentials for a mirror; trying it anonymously");
                    None
                })
        } else {
            auth::load_credentials(&reference.registry, options.auth_file.as_deref())?
        };
        let client = Client::for_endpoint(reference, options, credentials, endpoint)?;
        clients.push((Arc::new(client), endpoint));
    }
    Ok(HostSet::new(
        &reference.registry,
        clients,
        options.max_concurrent_requests,
    ))
}

/// Fetches the manifest or index that `reference` names, unparsed, and
/// returns its body and Content-Type; the caller verifies the digest.
pub async fn fetch_root_manifest(
    reference: &Reference,
    options: &RegistryOptions,
) -> anyhow::Result<(Bytes, Option<String>)> {
    let hosts = open_hosts(reference, options)?;
    let manifest_reference = reference.manifest_reference();
    let (body, content_type, _) = get_manifest(&hosts, manifest_reference).await?;
    Ok((body, content_type))
}

/// Fetches a manifest by tag (from hosts that may resolve) or by digest
/// (from hosts that may pull).
async fn get_manifest(
    hosts: &HostSet,
    manifest_reference: &str,
) -> Result<(Bytes, Option<String>, Option<String>), RegistryError> {
    let need = if manifest_reference.starts_with("sha256:") {
        Need::Pull
    } else {
        Need::Resolve
    };
    let target = hosts.target(&format!("manifest {manifest_reference}"));
    hosts
        .run(need, &target, |client| async move {
            client.get_manifest(manifest_reference).await
        })
        .await
}

/// An image in a registry, named by a reference.
#[derive(Debug)]
struct RegistryImage {
    hosts: Arc<HostSet>,
    reference: Reference,
}

impl RegistryImage {
    async fn resolve_inner(&self, platform: &Platform) -> anyhow::Result<ResolvedImage> {
        let what = self.reference.to_string();
        let target = self
            .hosts
            .target(&format!("manifest {}", self.reference.manifest_reference()));
        let (body, content_type, header_digest) =
            get_manifest(&self.hosts, self.reference.manifest_reference()).await?;
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
            let (body, content_type, _) = get_manifest(&self.hosts, &descriptor.digest).await?;
            Ok((body, content_type))
        })
    }

    fn fetch_config<'a>(
        &'a self,
        descriptor: &'a Descriptor,
    ) -> BoxFuture<'a, anyhow::Result<Bytes>> {
        Box::pin(async move {
            let target = self.hosts.target(&format!("blob {}", descriptor.digest));
            let config = self
                .hosts
                .run(Need::Pull, &target, |client| async move {
                    client.get_blob(&descriptor.digest, descriptor.size).await
                })
                .await?;
            Ok(config)
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
            Arc::clone(&self.hosts),
            layer.digest.clone(),
            layer.size,
        )))
    }

    fn describe(&self) -> String {
        self.reference.to_string()
    }
}
