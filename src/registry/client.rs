//! HTTP client for one repository of an OCI distribution-spec registry:
//! authentication, redirects, retries and bounded body reads.

use std::collections::HashMap;
use std::hash::{BuildHasher as _, Hasher as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use reqwest::header::{
    HeaderMap, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, LOCATION, RANGE, RETRY_AFTER,
    WWW_AUTHENTICATE,
};
use reqwest::{Response, StatusCode};
use tokio::sync::mpsc;
use url::Url;

use super::auth::{parse_challenges, BearerToken, Credentials, TokenResponse};
use super::error::RegistryError;
use super::hosts::{load_ca_certificates, load_client_identity, HostEndpoint};
use super::manifest::MAX_MANIFEST_SIZE;
use super::RegistryOptions;
use crate::reference::Reference;

/// Maximum number of redirects followed for one request.
const MAX_REDIRECTS: u32 = 5;
/// First retry delay; each further attempt doubles it.
const BACKOFF_BASE: Duration = Duration::from_millis(200);
/// Maximum delay between two attempts, also the cap on `Retry-After`.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Largest token response read.
const MAX_TOKEN_RESPONSE: u64 = 1 << 20;
/// How much of an error response body goes into the message.
const ERROR_DETAIL_LIMIT: u64 = 4096;

const HINT_TRANSPORT_HTTPS: &str = "Check that the registry is reachable; if it serves plain HTTP, pass --plain-http, and if its certificate is self-signed, pass --insecure-skip-tls-verify";
const HINT_TRANSPORT_HTTP: &str = "Check that the registry is reachable at this address and port";

/// How requests are authorised, learnt from the registry's challenges.
#[derive(Clone, Debug, Default)]
enum AuthMode {
    #[default]
    Anonymous,
    Basic,
    Bearer {
        realm: Url,
        service: Option<String>,
        scope: String,
    },
}

#[derive(Debug, Default)]
struct AuthState {
    mode: AuthMode,
    /// Bearer tokens by scope.
    tokens: HashMap<String, BearerToken>,
}

/// One GET request to the registry.
pub(crate) struct RequestSpec<'a> {
    /// Path below the host's API root (`.../v2/`), such as `NAME/blobs/DIGEST`.
    pub path: String,
    pub accept: Option<&'static str>,
    /// Inclusive byte range.
    pub range: Option<(u64, u64)>,
    /// Registry, repository and object, for messages.
    pub target: &'a str,
}

/// A client for one repository; shared by the image source and its blobs.
pub(crate) struct Client {
    http: reqwest::Client,
    registry: String,
    repository: String,
    /// API root of this host, such as `https://registry.example/v2/`.
    base: Url,
    /// Headers from the host's `hosts.toml`, sent to this host only.
    headers: HeaderMap,
    /// Upstream registry name sent as the `ns` query parameter to a mirror.
    namespace: Option<String>,
    credentials: Option<Credentials>,
    plain_http: bool,
    retries: u32,
    request_timeout: Duration,
    deadline: Duration,
    auth: Mutex<AuthState>,
    /// Serialises token requests, so concurrent 401s fetch one token.
    token_fetch: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base.as_str())
            .field("repository", &self.repository)
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

/// Returns whether `host[:port]` names a loopback address or `localhost`.
pub fn is_loopback_host(host_and_port: &str) -> bool {
    let host = if let Some(rest) = host_and_port.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host_and_port.split(':').next().unwrap_or("")
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

impl Client {
    /// A client for one host of the reference's registry: a mirror or the
    /// upstream server, with the TLS settings and headers of its `hosts.toml`.
    /// A mirror gets no retries, because the next host is the fallback.
    pub fn for_endpoint(
        reference: &Reference,
        options: &RegistryOptions,
        credentials: Option<Credentials>,
        endpoint: &HostEndpoint,
    ) -> anyhow::Result<Client> {
        let base = endpoint.api_root.clone();
        let plain_http = base.scheme() == "http";

        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(options.user_agent.clone())
            .danger_accept_invalid_certs(options.insecure_skip_tls_verify || endpoint.skip_verify)
            .connect_timeout(options.request_timeout.min(Duration::from_secs(30)));
        for certificate in load_ca_certificates(endpoint)? {
            builder = builder.add_root_certificate(certificate);
        }
        if let Some(identity) = load_client_identity(endpoint)? {
            builder = builder.identity(identity);
        }
        let http = builder
            .build()
            .map_err(|e| anyhow::anyhow!("failed to build the HTTP client for {base}: {e}"))?;

        let mut headers = HeaderMap::new();
        for (name, value) in &endpoint.headers {
            // hosts.rs checked both when it read the file.
            if let (Ok(name), Ok(value)) = (
                reqwest::header::HeaderName::from_bytes(name.as_bytes()),
                reqwest::header::HeaderValue::from_str(value),
            ) {
                headers.append(name, value);
            }
        }

        Ok(Client {
            http,
            registry: reference.registry.clone(),
            repository: reference.repository.clone(),
            base,
            headers,
            namespace: endpoint.is_mirror.then(|| reference.registry.clone()),
            credentials,
            plain_http,
            retries: if endpoint.is_mirror {
                0
            } else {
                options.retries
            },
            request_timeout: options.request_timeout,
            deadline: options.deadline,
            auth: Mutex::new(AuthState::default()),
            token_fetch: tokio::sync::Mutex::new(()),
        })
    }

    /// `host[:port]` of this client's endpoint.
    pub fn host(&self) -> String {
        let host = self.base.host_str().unwrap_or("");
        match self.base.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        }
    }

    /// Describes an object of this repository for messages.
    pub fn target(&self, object: &str) -> String {
        format!(
            "registry {}, repository {}, {object}",
            self.registry, self.repository
        )
    }

    /// Runs `operation` until it succeeds, fails for good, the retries are
    /// used up or the deadline passes, sleeping with exponential backoff and
    /// jitter in between. Each attempt is also cut off at the deadline, so the
    /// call returns within `deadline` plus a few milliseconds.
    pub async fn with_retries<T, F, Fut>(
        &self,
        target: &str,
        mut operation: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, RegistryError>>,
    {
        let started = Instant::now();
        let mut attempt: u32 = 0;
        loop {
            let remaining = self.deadline.saturating_sub(started.elapsed());
            let error = match tokio::time::timeout(remaining, operation()).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(error)) => error,
                Err(_) => RegistryError::DeadlineExceeded {
                    target: target.to_string(),
                    deadline: self.deadline,
                    attempts: attempt + 1,
                },
            };
            let Some(retry_after) = error.retry_hint() else {
                return Err(error);
            };
            let delay = backoff_delay(attempt, retry_after);
            let out_of_time = started.elapsed() + delay >= self.deadline;
            if attempt >= self.retries || out_of_time {
                if attempt == 0 {
                    return Err(error);
                }
                return Err(RegistryError::RetriesExhausted {
                    attempts: attempt + 1,
                    last: Box::new(error),
                });
            }

            tracing::warn!(
                target,
                attempt = attempt + 1,
                retries = self.retries,
                delay_ms = delay.as_millis() as u64,
                %error,
                "registry request failed, retrying"
            );
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    /// Sends one GET, answering authentication challenges and following
    /// redirects. Returns any final response that is not a redirect or 401;
    /// the caller checks its status.
    pub async fn send(&self, spec: &RequestSpec<'_>) -> Result<Response, RegistryError> {
        let mut start = self
            .base
            .join(spec.path.trim_start_matches('/'))
            .map_err(|_| RegistryError::BadRedirect {
                target: spec.target.to_string(),
                url: spec.path.clone(),
                status: 0,
            })?;
        if let Some(namespace) = &self.namespace {
            start.query_pairs_mut().append_pair("ns", namespace);
        }
        let mut url = start.clone();
        let mut redirects = 0;
        let mut challenged = false;

        loop {
            // Credentials go only to the registry itself: a redirect to
            // another host (blob storage, a CDN) gets none.
            let same_origin = url.origin() == self.base.origin();
            let authorization = if same_origin {
                self.authorization(spec.target).await?
            } else {
                None
            };

            let mut request = self.http.get(url.clone()).timeout(self.request_timeout);
            if same_origin {
                request = request.headers(self.headers.clone());
            }
            if let Some(accept) = spec.accept {
                request = request.header(ACCEPT, accept);
            }
            if let Some((first, last)) = spec.range {
                request = request.header(RANGE, format!("bytes={first}-{last}"));
            }
            if let Some(value) = &authorization {
                request = request.header(AUTHORIZATION, value);
            }
            let response = request
                .send()
                .await
                .map_err(|source| self.transport_error(spec.target, &url, source))?;
            let status = response.status();

            if status.is_redirection() && status != StatusCode::NOT_MODIFIED {
                redirects += 1;
                if redirects > MAX_REDIRECTS {
                    return Err(RegistryError::TooManyRedirects {
                        target: spec.target.to_string(),
                        url: redact_url(&url),
                        max: MAX_REDIRECTS,
                    });
                }
                let next = response
                    .headers()
                    .get(LOCATION)
                    .and_then(|value| value.to_str().ok())
                    .and_then(|location| url.join(location).ok())
                    .filter(|next| matches!(next.scheme(), "http" | "https"))
                    .ok_or_else(|| RegistryError::BadRedirect {
                        target: spec.target.to_string(),
                        url: redact_url(&url),
                        status: status.as_u16(),
                    })?;
                tracing::debug!(target = spec.target, from = %redact_url(&url), to = %redact_url(&next), status = status.as_u16(), "following redirect");
                url = next;
                continue;
            }

            if status == StatusCode::UNAUTHORIZED && same_origin && !challenged {
                challenged = true;
                self.answer_challenge(spec.target, response.headers(), authorization.as_deref())
                    .await?;
                url = start.clone();
                redirects = 0;
                continue;
            }
            if status == StatusCode::UNAUTHORIZED {
                let reason = match (&authorization, &self.credentials) {
                    (Some(value), _) if value.starts_with("Basic ") => {
                        format!(
                            "the registry rejected the credentials for {}",
                            self.registry
                        )
                    }
                    (Some(_), Some(_)) => {
                        "the registry rejected the bearer token issued for the stored credentials"
                            .to_string()
                    }
                    (Some(_), None) => {
                        "anonymous access is not allowed and no credentials were found".to_string()
                    }
                    (None, _) => "the server requires credentials that were not sent".to_string(),
                };
                return Err(RegistryError::Unauthorized {
                    target: spec.target.to_string(),
                    url: redact_url(&url),
                    registry: self.registry.clone(),
                    reason,
                });
            }
            return Ok(response);
        }
    }

    /// Returns the `Authorization` value for the registry, fetching a new
    /// bearer token when the cached one is about to expire.
    async fn authorization(&self, target: &str) -> Result<Option<String>, RegistryError> {
        let (mode, cached) = {
            let state = lock(&self.auth);
            let cached = match &state.mode {
                AuthMode::Bearer { scope, .. } => state
                    .tokens
                    .get(scope)
                    .filter(|token| token.is_fresh(Instant::now()))
                    .map(|token| token.value.clone()),
                _ => None,
            };
            (state.mode.clone(), cached)
        };

        match mode {
            AuthMode::Anonymous => Ok(None),
            AuthMode::Basic => Ok(self.credentials.as_ref().map(Credentials::basic_header)),
            AuthMode::Bearer { .. } if cached.is_some() => {
                Ok(cached.map(|token| format!("Bearer {token}")))
            }
            AuthMode::Bearer {
                realm,
                service,
                scope,
            } => {
                let token = self
                    .refresh_token(target, &realm, service.as_deref(), &scope, None)
                    .await?;
                Ok(Some(format!("Bearer {token}")))
            }
        }
    }

    /// Reacts to a 401: switches to Basic or fetches a bearer token, or
    /// fails when nothing more can be tried.
    async fn answer_challenge(
        &self,
        target: &str,
        headers: &HeaderMap,
        sent: Option<&str>,
    ) -> Result<(), RegistryError> {
        let header_text: Vec<&str> = headers
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .collect();
        let challenges: Vec<_> = header_text
            .iter()
            .flat_map(|text| parse_challenges(text))
            .collect();
        let header_joined = header_text.join(", ");
        let invalid = |reason| RegistryError::InvalidChallenge {
            target: target.to_string(),
            header: header_joined.clone(),
            reason,
        };

        if let Some(bearer) = challenges.iter().find(|c| c.scheme == "bearer") {
            let realm = bearer
                .params
                .get("realm")
                .ok_or_else(|| invalid("the Bearer challenge has no realm"))?;
            let realm = Url::parse(realm)
                .map_err(|_| invalid("the Bearer realm is not an absolute URL"))?;
            if !matches!(realm.scheme(), "http" | "https") {
                return Err(invalid("the Bearer realm is not an HTTP URL"));
            }
            let service = bearer.params.get("service").cloned();
            let scope = bearer
                .params
                .get("scope")
                .cloned()
                .unwrap_or_else(|| format!("repository:{}:pull", self.repository));
            let stale = sent.and_then(|value| value.strip_prefix("Bearer "));

            self.refresh_token(target, &realm, service.as_deref(), &scope, stale)
                .await?;
            lock(&self.auth).mode = AuthMode::Bearer {
                realm,
                service,
                scope,
            };
            return Ok(());
        }

        let basic_offered = challenges.is_empty() || challenges.iter().any(|c| c.scheme == "basic");
        if !basic_offered {
            return Err(invalid(
                "none of the offered schemes (Basic, Bearer) is supported",
            ));
        }
        if self.credentials.is_none() {
            return Err(RegistryError::Unauthorized {
                target: target.to_string(),
                url: redact_url(&self.base),
                registry: self.registry.clone(),
                reason: format!(
                    "the registry requires credentials and none were found for {}",
                    self.registry
                ),
            });
        }
        if sent.is_some_and(|value| value.starts_with("Basic ")) {
            return Err(RegistryError::Unauthorized {
                target: target.to_string(),
                url: redact_url(&self.base),
                registry: self.registry.clone(),
                reason: format!(
                    "the registry rejected the credentials for {}",
                    self.registry
                ),
            });
        }
        lock(&self.auth).mode = AuthMode::Basic;
        Ok(())
    }

    /// Returns a fresh token for `scope`, fetching one unless another task
    /// already replaced `stale` (the token the registry just rejected).
    async fn refresh_token(
        &self,
        target: &str,
        realm: &Url,
        service: Option<&str>,
        scope: &str,
        stale: Option<&str>,
    ) -> Result<String, RegistryError> {
        let _guard = self.token_fetch.lock().await;
        {
            let state = lock(&self.auth);
            if let Some(token) = state.tokens.get(scope) {
                if token.is_fresh(Instant::now()) && Some(token.value.as_str()) != stale {
                    return Ok(token.value.clone());
                }
            }
        }

        let token = self.fetch_token(target, realm, service, scope).await?;
        let value = token.value.clone();
        lock(&self.auth).tokens.insert(scope.to_string(), token);
        Ok(value)
    }

    async fn fetch_token(
        &self,
        target: &str,
        realm: &Url,
        service: Option<&str>,
        scope: &str,
    ) -> Result<BearerToken, RegistryError> {
        let mut url = realm.clone();
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = service {
                query.append_pair("service", service);
            }
            query.append_pair("scope", scope);
        }
        let token_error =
            |detail: String, hint: &'static str, transient: bool| RegistryError::Token {
                target: target.to_string(),
                realm: redact_url(realm),
                detail,
                hint,
                transient,
            };

        let mut request = self.http.get(url.clone()).timeout(self.request_timeout);
        // Credentials travel to the token server only over HTTPS, or over
        // plain HTTP where the registry itself is plain HTTP by choice or on loopback.
        let protected = realm.scheme() == "https"
            || self.plain_http
            || realm.host_str().is_some_and(|host| {
                is_loopback_host(host.trim_start_matches('[').trim_end_matches(']'))
            });
        if let (Some(credentials), true) = (&self.credentials, protected) {
            request = request.header(AUTHORIZATION, credentials.basic_header());
        }
        let received = Instant::now();
        let response = request.send().await.map_err(|e| {
            token_error(
                e.to_string(),
                "",
                e.is_connect() || e.is_timeout() || e.is_request(),
            )
        })?;

        let status = response.status();
        if !status.is_success() {
            let hint = match status.as_u16() {
                401 | 403 => {
                    ". Log in with `docker login` or pass the credentials file with --auth-file"
                }
                _ => "",
            };
            let transient = status.as_u16() == 429 || status.is_server_error();
            return Err(token_error(format!("HTTP {status}"), hint, transient));
        }
        let body = read_limited(response, MAX_TOKEN_RESPONSE, target).await?;
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| token_error(format!("invalid JSON: {e}"), "", false))?;
        let (value, lifetime) = parsed.into_token().ok_or_else(|| {
            token_error(
                "the response has neither token nor access_token".to_string(),
                "",
                false,
            )
        })?;

        tracing::debug!(target, realm = %redact_url(realm), scope, lifetime_secs = lifetime.as_secs(), "fetched a bearer token");
        Ok(BearerToken::new(value, received, lifetime))
    }

    fn transport_error(&self, target: &str, url: &Url, source: reqwest::Error) -> RegistryError {
        let hint = if url.scheme() == "https" {
            HINT_TRANSPORT_HTTPS
        } else {
            HINT_TRANSPORT_HTTP
        };
        RegistryError::Transport {
            target: target.to_string(),
            url: redact_url(url),
            source: source.without_url(),
            hint,
        }
    }

    /// Turns an unexpected status into an error, with the registry's error
    /// codes from the body and advice that fits the status.
    pub async fn status_error(&self, target: &str, response: Response) -> RegistryError {
        let status = response.status().as_u16();
        let url = redact_url(response.url());
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = read_limited(response, ERROR_DETAIL_LIMIT, target)
            .await
            .unwrap_or_default();
        let detail = registry_error_detail(&body);

        let hint = match status {
            404 => "Check the reference: registry, repository, tag or digest",
            403 => "The credentials lack pull access to this repository; check them with `docker login`",
            400 if !self.plain_http => "If the registry serves plain HTTP, pass --plain-http",
            429 => "The registry limits the request rate; try again later",
            500..=599 => "The registry failed; try again later",
            _ => "Check the reference and the registry",
        };
        RegistryError::Status {
            target: target.to_string(),
            url,
            status,
            detail,
            hint,
            retry_after,
        }
    }

    /// Fails when the response announces a Content-Length other than `expected`.
    fn check_length(
        &self,
        response: &Response,
        expected: u64,
        target: &str,
    ) -> Result<(), RegistryError> {
        match content_length(response.headers()) {
            Some(length) if length != expected => Err(RegistryError::LengthMismatch {
                target: target.to_string(),
                expected,
                actual: length,
            }),
            _ => Ok(()),
        }
    }

    /// Reads a response body of exactly `expected` bytes.
    pub async fn read_exact(
        &self,
        response: Response,
        expected: u64,
        target: &str,
    ) -> Result<Bytes, RegistryError> {
        self.check_length(&response, expected, target)?;

        let mut body =
            BytesMut::with_capacity(usize::try_from(expected.min(64 << 20)).unwrap_or(0));
        let mut response = response;
        loop {
            let chunk = response
                .chunk()
                .await
                .map_err(|source| self.transport_error(target, &self.base, source))?;
            let Some(chunk) = chunk else { break };
            if body.len() as u64 + chunk.len() as u64 > expected {
                return Err(RegistryError::LengthMismatch {
                    target: target.to_string(),
                    expected,
                    actual: body.len() as u64 + chunk.len() as u64,
                });
            }
            body.extend_from_slice(&chunk);
        }
        if (body.len() as u64) < expected {
            return Err(RegistryError::Truncated {
                target: target.to_string(),
                received: body.len() as u64,
                expected,
            });
        }
        Ok(body.freeze())
    }

    /// Fetches a manifest by tag or digest. Returns the body, the
    /// Content-Type and the Docker-Content-Digest header.
    pub async fn get_manifest(
        &self,
        reference: &str,
    ) -> Result<(Bytes, Option<String>, Option<String>), RegistryError> {
        let target = self.target(&format!("manifest {reference}"));
        let spec = RequestSpec {
            path: format!("{}/manifests/{reference}", self.repository),
            accept: Some(super::manifest::MANIFEST_ACCEPT),
            range: None,
            target: &target,
        };
        let spec = &spec;
        let target = target.as_str();
        self.with_retries(target, move || async move {
            let response = self.send(spec).await?;
            if response.status() != StatusCode::OK {
                return Err(self.status_error(target, response).await);
            }
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|value| value.to_str().ok())
                    .map(str::to_string)
            };
            let content_type = header("content-type");
            let docker_digest = header("docker-content-digest");
            let body = read_limited(response, MAX_MANIFEST_SIZE, target).await?;
            Ok((body, content_type, docker_digest))
        })
        .await
    }

    /// Fetches a whole blob of `size` bytes (used for configs; the caller verifies the digest).
    pub async fn get_blob(&self, digest: &str, size: u64) -> Result<Bytes, RegistryError> {
        let target = self.target(&format!("blob {digest}"));
        let spec = RequestSpec {
            path: format!("{}/blobs/{digest}", self.repository),
            accept: None,
            range: None,
            target: &target,
        };
        let spec = &spec;
        let target = target.as_str();
        self.with_retries(target, move || async move {
            let response = self.send(spec).await?;
            if response.status() != StatusCode::OK {
                return Err(self.status_error(target, response).await);
            }
            self.read_exact(response, size, target).await
        })
        .await
    }

    /// Reads `len` bytes at `offset` of a blob of `size` bytes with a Range request.
    ///
    /// A 206 must carry a Content-Range naming exactly the requested bytes. A
    /// 200 (the server ignored Range) is accepted only when the request covers
    /// the whole blob; otherwise it fails with `RangeIgnored` before the body
    /// is read. Both failures are retried, because a proxy in between can
    /// cause them once, and the last one is returned when the retries run out.
    pub async fn get_blob_range(
        &self,
        digest: &str,
        offset: u64,
        len: u64,
        size: u64,
    ) -> Result<Bytes, RegistryError> {
        let last = offset + len - 1;
        let target = self.target(&format!("blob {digest} bytes {offset}-{last}"));
        let target = target.as_str();
        self.with_retries(target, move || async move {
            let response = self
                .open_blob_range(digest, offset, len, size, target)
                .await?;
            self.read_exact(response, len, target).await
        })
        .await
    }

    /// Streams `len` bytes at `offset` of a blob of `size` bytes to `sink` as they
    /// arrive, with the checks and retries of [`Client::get_blob_range`]. Each retry
    /// requests the same range, so a fault tied to one request is not met again,
    /// and skips the bytes a failed attempt already sent, as counted in
    /// `delivered`: no byte reaches `sink` twice.
    pub async fn stream_blob_range(
        &self,
        digest: &str,
        offset: u64,
        len: u64,
        size: u64,
        delivered: &AtomicU64,
        sink: &mpsc::Sender<Bytes>,
    ) -> Result<(), RegistryError> {
        let last = offset + len - 1;
        let target = self.target(&format!("blob {digest} bytes {offset}-{last}"));
        let target = target.as_str();
        self.with_retries(target, move || async move {
            let mut response = self
                .open_blob_range(digest, offset, len, size, target)
                .await?;
            self.check_length(&response, len, target)?;
            let mut received = 0u64;
            loop {
                let chunk = response
                    .chunk()
                    .await
                    .map_err(|source| self.transport_error(target, &self.base, source))?;
                let Some(mut chunk) = chunk else { break };
                if received + chunk.len() as u64 > len {
                    return Err(RegistryError::LengthMismatch {
                        target: target.to_string(),
                        expected: len,
                        actual: received + chunk.len() as u64,
                    });
                }
                let chunk_start = received;
                received += chunk.len() as u64;
                // Bytes an earlier attempt sent are skipped.
                let sent = delivered.load(Ordering::SeqCst);
                if received <= sent {
                    continue;
                }
                if chunk_start < sent {
                    let _ = chunk.split_to((sent - chunk_start) as usize);
                }
                let piece = chunk.len() as u64;
                if sink.send(chunk).await.is_err() {
                    return Err(RegistryError::ReaderGone {
                        target: target.to_string(),
                    });
                }
                delivered.fetch_add(piece, Ordering::SeqCst);
            }
            if received < len {
                return Err(RegistryError::Truncated {
                    target: target.to_string(),
                    received,
                    expected: len,
                });
            }
            Ok(())
        })
        .await
    }

    /// Sends a Range request for `len` bytes at `offset` and checks the status and
    /// Content-Range of the response. The caller reads the body.
    async fn open_blob_range(
        &self,
        digest: &str,
        offset: u64,
        len: u64,
        size: u64,
        target: &str,
    ) -> Result<Response, RegistryError> {
        let last = offset + len - 1;
        let spec = RequestSpec {
            path: format!("{}/blobs/{digest}", self.repository),
            accept: None,
            range: Some((offset, last)),
            target,
        };
        let response = self.send(&spec).await?;
        match response.status() {
            StatusCode::PARTIAL_CONTENT => {
                let content_range = response
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|value| value.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                if !content_range_matches(&content_range, offset, last, size) {
                    return Err(RegistryError::ContentRangeMismatch {
                        target: target.to_string(),
                        content_range,
                        start: offset,
                        end: last,
                        size,
                    });
                }
                Ok(response)
            }
            StatusCode::OK if offset == 0 && len == size => Ok(response),
            StatusCode::OK => Err(RegistryError::RangeIgnored {
                target: target.to_string(),
                url: redact_url(response.url()),
            }),
            _ => Err(self.status_error(target, response).await),
        }
    }
}

/// The upstream server of `reference` when no `hosts.toml` names one:
/// `https://HOST`, or `http://HOST` for loopback hosts and with `plain_http`.
pub(crate) fn default_server(
    reference: &Reference,
    options: &RegistryOptions,
) -> anyhow::Result<Url> {
    let host = reference.api_host();
    let plain_http = options.plain_http || is_loopback_host(host);
    let scheme = if plain_http { "http" } else { "https" };
    Url::parse(&format!("{scheme}://{host}/"))
        .map_err(|e| anyhow::anyhow!("invalid registry host {host:?}: {e}"))
}

fn lock(state: &Mutex<AuthState>) -> std::sync::MutexGuard<'_, AuthState> {
    // A panic while holding the lock leaves a consistent state (plain
    // assignments), so a poisoned lock is still usable.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Returns `base · 2^attempt` capped at `BACKOFF_MAX`, plus up to 50 % jitter,
/// or the server's `Retry-After` (capped) when it sent one.
fn backoff_delay(attempt: u32, retry_after: Option<Duration>) -> Duration {
    if let Some(delay) = retry_after {
        return delay.min(BACKOFF_MAX);
    }
    let exponential = BACKOFF_BASE
        .saturating_mul(1u32 << attempt.min(16))
        .min(BACKOFF_MAX);
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let jitter_ms = random % (exponential.as_millis() as u64 / 2 + 1);
    exponential + Duration::from_millis(jitter_ms)
}

/// Checks `bytes FIRST-LAST/TOTAL` (TOTAL may be `*`) against the request.
fn content_range_matches(value: &str, first: u64, last: u64, size: u64) -> bool {
    let Some(rest) = value.trim().strip_prefix("bytes ") else {
        return false;
    };
    let Some((range, total)) = rest.split_once('/') else {
        return false;
    };
    let Some((start, end)) = range.split_once('-') else {
        return false;
    };
    let total_ok = total == "*" || total.parse::<u64>() == Ok(size);
    start.parse::<u64>() == Ok(first) && end.parse::<u64>() == Ok(last) && total_ok
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// Reads a body of at most `limit` bytes.
async fn read_limited(
    mut response: Response,
    limit: u64,
    target: &str,
) -> Result<Bytes, RegistryError> {
    if content_length(response.headers()).is_some_and(|length| length > limit) {
        return Err(RegistryError::TooLarge {
            target: target.to_string(),
            limit,
        });
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|source| RegistryError::Transport {
            target: target.to_string(),
            url: String::new(),
            source: source.without_url(),
            hint: HINT_TRANSPORT_HTTP,
        })?
    {
        if body.len() as u64 + chunk.len() as u64 > limit {
            return Err(RegistryError::TooLarge {
                target: target.to_string(),
                limit,
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Extracts `code: message` pairs from a distribution-spec error body.
fn registry_error_detail(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorEntry>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorEntry {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    match serde_json::from_slice::<Errors>(body) {
        Ok(parsed) if !parsed.errors.is_empty() => {
            let parts: Vec<String> = parsed
                .errors
                .iter()
                .map(|entry| format!("{} ({})", entry.code, entry.message))
                .collect();
            format!(": {}", parts.join(", "))
        }
        _ => String::new(),
    }
}

/// Drops the query and fragment, which can carry signed credentials (as in
/// pre-signed blob storage URLs).
fn redact_url(url: &Url) -> String {
    let mut shown = url.clone();
    shown.set_query(None);
    shown.set_fragment(None);
    let _ = shown.set_password(None);
    shown.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        let cases = [
            ("localhost", true),
            ("localhost:5000", true),
            ("127.0.0.1:5000", true),
            ("127.1.2.3", true),
            ("[::1]:5000", true),
            ("[::1]", true),
            ("10.0.0.1:5000", false),
            ("registry.example.com", false),
            ("[2001:db8::1]:443", false),
        ];
        for (host, expected) in cases {
            assert_eq!(is_loopback_host(host), expected, "{host}");
        }
    }

    #[test]
    fn content_range_checks() {
        let cases = [
            ("bytes 0-50/100", 0, 50, 100, true),
            ("bytes 49-99/100", 49, 99, 100, true),
            ("bytes 49-99/*", 49, 99, 100, true),
            ("bytes 49-99/101", 49, 99, 100, false),
            ("bytes 48-99/100", 49, 99, 100, false),
            ("bytes 49-98/100", 49, 99, 100, false),
            ("49-99/100", 49, 99, 100, false),
            ("", 0, 0, 1, false),
            ("bytes x-y/z", 0, 0, 1, false),
        ];
        for (value, first, last, size, expected) in cases {
            assert_eq!(
                content_range_matches(value, first, last, size),
                expected,
                "{value}"
            );
        }
    }

    #[test]
    fn backoff_grows_and_caps() {
        for attempt in 0..20 {
            let delay = backoff_delay(attempt, None);
            let floor = BACKOFF_BASE
                .saturating_mul(1u32 << attempt.min(16))
                .min(BACKOFF_MAX);
            assert!(delay >= floor, "attempt {attempt}: {delay:?}");
            assert!(delay <= floor + floor / 2, "attempt {attempt}: {delay:?}");
        }
        assert_eq!(
            backoff_delay(0, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
        assert_eq!(
            backoff_delay(0, Some(Duration::from_secs(3600))),
            BACKOFF_MAX
        );
    }

    #[test]
    fn error_detail_from_body() {
        let body =
            br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{}}]}"#;
        assert_eq!(
            registry_error_detail(body),
            ": MANIFEST_UNKNOWN (manifest unknown)"
        );
        assert_eq!(registry_error_detail(b"<html>"), "");
    }

    #[test]
    fn redact_url_drops_query() {
        let url =
            Url::parse("https://user:pw@blobs.example/x?X-Amz-Signature=secret#f").expect("valid");
        let shown = redact_url(&url);
        assert!(!shown.contains("secret"), "{shown}");
        assert!(!shown.contains("pw"), "{shown}");
    }
}
