//! Whole-object reads and uploads for one repository of an OCI
//! distribution-spec registry: blob download to a file, blob upload (POST
//! then PUT with `?digest=`), existence checks with HEAD, manifest PUT.

use std::io::Write as _;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use sha2::{Digest as _, Sha256};
use url::Url;

use super::auth::{self, parse_challenges, Credentials, TokenResponse};
use super::client::{is_loopback_host, Client, RequestSpec};
use super::error::RegistryError;
use super::manifest::MAX_MANIFEST_SIZE;
use super::RegistryOptions;
use crate::reference::Reference;

/// Attempts for an upload or an existence check that fails transiently.
const PUSH_ATTEMPTS: u32 = 4;
/// Delay before the second attempt; it doubles each time.
const PUSH_BACKOFF: Duration = Duration::from_millis(500);
/// How much of an error body goes into a message.
const ERROR_BODY_LIMIT: usize = 2048;

/// Failure of an upload or a whole-blob download.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(
        "{target}: request {method} {url} failed: {source}. Check that the registry is reachable"
    )]
    Transport {
        target: String,
        method: Method,
        url: String,
        #[source]
        source: reqwest::Error,
    },

    #[error("{target}: {method} {url} returned HTTP {status}: {detail}. {hint}")]
    Status {
        target: String,
        method: Method,
        url: String,
        status: u16,
        detail: String,
        hint: &'static str,
    },

    #[error("{target}: the upload session answer has no valid Location header")]
    MissingLocation { target: String },

    #[error(
        "{target}: authentication failed: {reason}. Log in with `docker login` or pass --auth-file"
    )]
    Unauthorized { target: String, reason: String },

    #[error("{target}: the downloaded blob has digest {actual}, expected {expected}; the registry sent other content")]
    DigestMismatch {
        target: String,
        expected: String,
        actual: String,
    },

    #[error("{target}: local file {path}: {source}")]
    LocalFile {
        target: String,
        path: String,
        source: std::io::Error,
    },

    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl PushError {
    fn is_transient(&self) -> bool {
        match self {
            PushError::Transport { source, .. } => {
                source.is_timeout()
                    || source.is_connect()
                    || source.is_request()
                    || source.is_body()
            }
            PushError::Status { status, .. } => *status == 408 || *status == 429 || *status >= 500,
            _ => false,
        }
    }
}

/// One repository, read and written whole.
pub struct Repository {
    reader: Client,
    http: reqwest::Client,
    base: Url,
    registry: String,
    repository: String,
    credentials: Option<Credentials>,
    /// `Authorization` value learnt from the last challenge, for pull and push.
    authorization: Mutex<Option<String>>,
    request_timeout: Duration,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("base", &self.base.as_str())
            .field("repository", &self.repository)
            .finish_non_exhaustive()
    }
}

/// Opens `reference`'s repository for whole reads and uploads; credentials
/// come from the Docker config as for reads.
pub fn open_repository(
    reference: &Reference,
    options: &RegistryOptions,
) -> anyhow::Result<Repository> {
    let credentials = auth::load_credentials(&reference.registry, options.auth_file.as_deref())?;
    let server = super::client::default_server(reference, options)?;
    let reader = Client::for_endpoint(
        reference,
        options,
        credentials.clone(),
        &super::hosts::HostEndpoint::upstream(&server),
    )?;
    let host = reference.api_host();
    let scheme = if options.plain_http || is_loopback_host(host) {
        "http"
    } else {
        "https"
    };
    let base = Url::parse(&format!("{scheme}://{host}/"))
        .map_err(|error| anyhow::anyhow!("invalid registry host {host:?}: {error}"))?;
    let http = reqwest::Client::builder()
        .user_agent(options.user_agent.clone())
        .danger_accept_invalid_certs(options.insecure_skip_tls_verify)
        .connect_timeout(options.request_timeout.min(Duration::from_secs(30)))
        .build()
        .map_err(|error| anyhow::anyhow!("failed to build the HTTP client: {error}"))?;
    Ok(Repository {
        reader,
        http,
        base,
        registry: reference.registry.clone(),
        repository: reference.repository.clone(),
        credentials,
        authorization: Mutex::new(None),
        request_timeout: options.request_timeout,
    })
}

impl Repository {
    /// Describes an object of this repository for messages.
    pub fn target(&self, object: &str) -> String {
        format!(
            "registry {}, repository {}, {object}",
            self.registry, self.repository
        )
    }

    /// Fetches a manifest by tag or digest; returns the body and its Content-Type.
    pub async fn get_manifest(
        &self,
        reference: &str,
    ) -> Result<(Bytes, Option<String>), RegistryError> {
        let (body, content_type, _) = self.reader.get_manifest(reference).await?;
        Ok((body, content_type))
    }

    /// Fetches a small blob (a config) whole; the caller checks the digest.
    pub async fn get_blob(&self, digest: &str, size: u64) -> Result<Bytes, RegistryError> {
        self.reader.get_blob(digest, size).await
    }

    /// Downloads a blob into `path` and checks its digest and size.
    pub async fn download_blob(
        &self,
        digest: &str,
        size: u64,
        path: &Path,
    ) -> Result<(), PushError> {
        let target = self.target(&format!("blob {digest}"));
        let spec = RequestSpec {
            path: format!("/v2/{}/blobs/{digest}", self.repository),
            accept: None,
            range: None,
            target: &target,
        };
        let local = |source| PushError::LocalFile {
            target: target.clone(),
            path: path.display().to_string(),
            source,
        };
        let mut attempt = 0;
        loop {
            let result = self.download_once(&spec, size, path).await;
            match result {
                Ok(actual) if actual == digest => return Ok(()),
                Ok(actual) => {
                    return Err(PushError::DigestMismatch {
                        target: target.clone(),
                        expected: digest.to_string(),
                        actual,
                    })
                }
                Err(DownloadError::Local(source)) => return Err(local(source)),
                Err(DownloadError::Registry(error)) => {
                    attempt += 1;
                    if error.retry_hint().is_none() || attempt >= PUSH_ATTEMPTS {
                        return Err(error.into());
                    }
                    tracing::warn!(target = %target, attempt, %error, "blob download failed, retrying");
                    tokio::time::sleep(PUSH_BACKOFF * 2u32.pow(attempt - 1)).await;
                }
            }
        }
    }

    async fn download_once(
        &self,
        spec: &RequestSpec<'_>,
        size: u64,
        path: &Path,
    ) -> Result<String, DownloadError> {
        let mut response = self.reader.send(spec).await?;
        if response.status() != StatusCode::OK {
            return Err(self.reader.status_error(spec.target, response).await.into());
        }
        let mut file = std::fs::File::create(path).map_err(DownloadError::Local)?;
        let mut hasher = Sha256::new();
        let mut received = 0u64;
        loop {
            let chunk = response
                .chunk()
                .await
                .map_err(|source| RegistryError::Transport {
                    target: spec.target.to_string(),
                    url: spec.path.clone(),
                    source: source.without_url(),
                    hint: "Check that the registry is reachable",
                })?;
            let Some(chunk) = chunk else { break };
            received += chunk.len() as u64;
            if received > size {
                return Err(RegistryError::LengthMismatch {
                    target: spec.target.to_string(),
                    expected: size,
                    actual: received,
                }
                .into());
            }
            hasher.update(&chunk);
            file.write_all(&chunk).map_err(DownloadError::Local)?;
        }
        if received < size {
            return Err(RegistryError::Truncated {
                target: spec.target.to_string(),
                received,
                expected: size,
            }
            .into());
        }
        file.sync_all().map_err(DownloadError::Local)?;
        Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
    }

    /// Returns whether the repository already has the blob (HEAD).
    pub async fn blob_exists(&self, digest: &str) -> Result<bool, PushError> {
        let target = self.target(&format!("blob {digest}"));
        let url = self.url(&format!("v2/{}/blobs/{digest}", self.repository))?;
        let response = self
            .with_retries(&target, || {
                self.send(&target, Method::HEAD, &url, |request| request)
            })
            .await?;
        match response.status() {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self
                .status_error(&target, Method::HEAD, &url, response)
                .await),
        }
    }

    /// Uploads the blob stored in `path` unless the repository has it;
    /// returns whether bytes were sent.
    pub async fn push_blob_file(
        &self,
        digest: &str,
        size: u64,
        path: &Path,
    ) -> Result<bool, PushError> {
        if self.blob_exists(digest).await? {
            tracing::debug!(digest, "blob already in the registry, skipping the upload");
            return Ok(false);
        }
        let target = self.target(&format!("blob {digest}"));
        self.with_retries(&target, || async {
            let file =
                tokio::fs::File::open(path)
                    .await
                    .map_err(|source| PushError::LocalFile {
                        target: target.clone(),
                        path: path.display().to_string(),
                        source,
                    })?;
            self.upload(&target, digest, size, reqwest::Body::from(file))
                .await
        })
        .await?;
        Ok(true)
    }

    /// Uploads a blob held in memory unless the repository has it.
    pub async fn push_blob_bytes(&self, digest: &str, bytes: Bytes) -> Result<bool, PushError> {
        if self.blob_exists(digest).await? {
            return Ok(false);
        }
        let target = self.target(&format!("blob {digest}"));
        self.with_retries(&target, || {
            self.upload(
                &target,
                digest,
                bytes.len() as u64,
                reqwest::Body::from(bytes.clone()),
            )
        })
        .await?;
        Ok(true)
    }

    /// Stores a manifest under `reference` (a tag or its digest).
    pub async fn put_manifest(
        &self,
        reference: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<(), PushError> {
        let target = self.target(&format!("manifest {reference}"));
        let url = self.url(&format!("v2/{}/manifests/{reference}", self.repository))?;
        let response = self
            .with_retries(&target, || {
                self.send(&target, Method::PUT, &url, |request| {
                    request.header(CONTENT_TYPE, media_type).body(bytes.clone())
                })
            })
            .await?;
        if response.status() != StatusCode::CREATED && response.status() != StatusCode::OK {
            return Err(self
                .status_error(&target, Method::PUT, &url, response)
                .await);
        }
        Ok(())
    }

    /// Starts an upload session (POST) and completes it with one PUT.
    async fn upload(
        &self,
        target: &str,
        digest: &str,
        size: u64,
        body: reqwest::Body,
    ) -> Result<(), PushError> {
        let start = self.url(&format!("v2/{}/blobs/uploads/", self.repository))?;
        let response = self
            .send(target, Method::POST, &start, |request| {
                request.header(CONTENT_LENGTH, 0)
            })
            .await?;
        if response.status() != StatusCode::ACCEPTED {
            return Err(self
                .status_error(target, Method::POST, &start, response)
                .await);
        }
        let mut location = response
            .headers()
            .get(LOCATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| start.join(value).ok())
            .ok_or_else(|| PushError::MissingLocation {
                target: target.to_string(),
            })?;
        location.query_pairs_mut().append_pair("digest", digest);

        let mut body = Some(body);
        let response = self
            .send(target, Method::PUT, &location, |request| {
                let request = request
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .header(CONTENT_LENGTH, size);
                match body.take() {
                    Some(body) => request.body(body),
                    None => request,
                }
            })
            .await?;
        if response.status() != StatusCode::CREATED {
            return Err(self
                .status_error(target, Method::PUT, &location, response)
                .await);
        }
        tracing::debug!(target, size, "uploaded blob");
        Ok(())
    }

    fn url(&self, path: &str) -> Result<Url, PushError> {
        self.base
            .join(path)
            .map_err(|_| PushError::MissingLocation {
                target: self.target(path),
            })
    }

    /// Sends one request, answering one authentication challenge. `build`
    /// may be called twice (before and after the challenge).
    async fn send(
        &self,
        target: &str,
        method: Method,
        url: &Url,
        mut build: impl FnMut(RequestBuilder) -> RequestBuilder,
    ) -> Result<Response, PushError> {
        let mut challenged = false;
        loop {
            let authorization = lock(&self.authorization).clone();
            let mut request = self
                .http
                .request(method.clone(), url.clone())
                .timeout(self.request_timeout.max(Duration::from_secs(600)));
            if let Some(value) = &authorization {
                request = request.header(AUTHORIZATION, value);
            }
            let response = build(request)
                .send()
                .await
                .map_err(|source| PushError::Transport {
                    target: target.to_string(),
                    method: method.clone(),
                    url: url.as_str().to_string(),
                    source: source.without_url(),
                })?;
            if response.status() != StatusCode::UNAUTHORIZED || challenged {
                if response.status() == StatusCode::UNAUTHORIZED {
                    return Err(PushError::Unauthorized {
                        target: target.to_string(),
                        reason: "the registry rejected the credentials for push".to_string(),
                    });
                }
                return Ok(response);
            }
            challenged = true;
            let value = self.answer_challenge(target, &response).await?;
            *lock(&self.authorization) = Some(value);
        }
    }

    /// Returns the `Authorization` value for a 401 answer: Basic with the
    /// stored credentials, or a bearer token for `pull,push` on this repository.
    async fn answer_challenge(
        &self,
        target: &str,
        response: &Response,
    ) -> Result<String, PushError> {
        let header: Vec<&str> = response
            .headers()
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .collect();
        let challenges: Vec<_> = header
            .iter()
            .flat_map(|text| parse_challenges(text))
            .collect();
        let unauthorized = |reason: String| PushError::Unauthorized {
            target: target.to_string(),
            reason,
        };

        if let Some(bearer) = challenges.iter().find(|c| c.scheme == "bearer") {
            let realm = bearer
                .params
                .get("realm")
                .and_then(|realm| Url::parse(realm).ok())
                .ok_or_else(|| {
                    unauthorized("the Bearer challenge has no valid realm".to_string())
                })?;
            let mut token_url = realm.clone();
            {
                let mut query = token_url.query_pairs_mut();
                if let Some(service) = bearer.params.get("service") {
                    query.append_pair("service", service);
                }
                query.append_pair(
                    "scope",
                    &format!("repository:{}:pull,push", self.repository),
                );
            }
            let mut request = self.http.get(token_url).timeout(self.request_timeout);
            let protected = realm.scheme() == "https"
                || realm.host_str().is_some_and(|host| {
                    is_loopback_host(host.trim_start_matches('[').trim_end_matches(']'))
                });
            if let (Some(credentials), true) = (&self.credentials, protected) {
                request = request.header(AUTHORIZATION, credentials.basic_header());
            }
            let answer = request.send().await.map_err(|error| {
                unauthorized(format!("the token request failed: {}", error.without_url()))
            })?;
            if !answer.status().is_success() {
                return Err(unauthorized(format!(
                    "the token server returned HTTP {}",
                    answer.status()
                )));
            }
            let body = answer.bytes().await.map_err(|error| {
                unauthorized(format!("reading the token failed: {}", error.without_url()))
            })?;
            let token: TokenResponse = serde_json::from_slice(&body).map_err(|error| {
                unauthorized(format!("the token response is invalid JSON: {error}"))
            })?;
            let (value, _) = token
                .into_token()
                .ok_or_else(|| unauthorized("the token response has no token".to_string()))?;
            return Ok(format!("Bearer {value}"));
        }

        match &self.credentials {
            Some(credentials) => Ok(credentials.basic_header()),
            None => Err(unauthorized(format!(
                "the registry requires credentials and none were found for {}",
                self.registry
            ))),
        }
    }

    async fn with_retries<T, F, Fut>(&self, target: &str, mut operation: F) -> Result<T, PushError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, PushError>>,
    {
        let mut attempt = 0;
        loop {
            match operation().await {
                Ok(value) => return Ok(value),
                Err(error) if error.is_transient() && attempt + 1 < PUSH_ATTEMPTS => {
                    attempt += 1;
                    tracing::warn!(target, attempt, %error, "registry upload request failed, retrying");
                    tokio::time::sleep(PUSH_BACKOFF * 2u32.pow(attempt - 1)).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    async fn status_error(
        &self,
        target: &str,
        method: Method,
        url: &Url,
        response: Response,
    ) -> PushError {
        let status = response.status().as_u16();
        let body = response.bytes().await.unwrap_or_default();
        let mut detail = String::from_utf8_lossy(&body[..body.len().min(ERROR_BODY_LIMIT)])
            .trim()
            .to_string();
        if detail.is_empty() {
            detail = "no details".to_string();
        }
        let hint = match status {
            401 | 403 => "The credentials lack push access to this repository",
            404 => "Check the repository name",
            413 => "The registry rejects objects this large",
            _ if status >= 500 => "The registry failed; try again later",
            _ => "Check the registry's log",
        };
        let mut url = url.clone();
        url.set_query(None);
        PushError::Status {
            target: target.to_string(),
            method,
            url: url.to_string(),
            status,
            detail,
            hint,
        }
    }
}

/// A download failure: the registry's fault (retried when transient) or the local file's.
enum DownloadError {
    Registry(RegistryError),
    Local(std::io::Error),
}

impl From<RegistryError> for DownloadError {
    fn from(error: RegistryError) -> Self {
        DownloadError::Registry(error)
    }
}

fn lock(state: &Mutex<Option<String>>) -> std::sync::MutexGuard<'_, Option<String>> {
    // The value is a plain string, consistent even after a panic elsewhere.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Largest manifest uploaded; registries reject larger ones.
pub const MAX_PUSHED_MANIFEST_SIZE: u64 = MAX_MANIFEST_SIZE;
