//! Errors of registry requests (OCI distribution-spec HTTP API), with the
//! registry, repository, object and what to do in each message.

use std::time::Duration;

/// Failure of a registry request. `target` names the registry, the
/// repository and the object (manifest, blob digest and byte range).
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{target}: request to {url} failed: {source}. {hint}")]
    Transport {
        target: String,
        url: String,
        #[source]
        source: reqwest::Error,
        hint: &'static str,
    },
    #[error("{target}: HTTP {status} from {url}{detail}. {hint}")]
    Status {
        target: String,
        url: String,
        status: u16,
        detail: String,
        hint: &'static str,
        retry_after: Option<Duration>,
    },
    #[error("{target}: authentication failed at {url} (HTTP 401): {reason}. Log in with `docker login {registry}` or pass the credentials file with --auth-file")]
    Unauthorized {
        target: String,
        url: String,
        registry: String,
        reason: String,
    },
    #[error("{target}: the registry's challenge {header:?} is not usable: {reason}")]
    InvalidChallenge {
        target: String,
        header: String,
        reason: &'static str,
    },
    #[error("{target}: token request to {realm} failed: {detail}{hint}")]
    Token {
        target: String,
        realm: String,
        detail: String,
        hint: &'static str,
        transient: bool,
    },
    #[error("{target}: more than {max} redirects, the last one to {url}")]
    TooManyRedirects {
        target: String,
        url: String,
        max: u32,
    },
    #[error("{target}: redirect (HTTP {status}) from {url} has no valid Location header")]
    BadRedirect {
        target: String,
        url: String,
        status: u16,
    },
    #[error("{target}: the response body ended after {received} of {expected} bytes")]
    Truncated {
        target: String,
        received: u64,
        expected: u64,
    },
    #[error("{target}: the reader of the range stopped before the body ended")]
    ReaderGone { target: String },
    #[error("{target}: the response has {actual} bytes, but {expected} were requested")]
    LengthMismatch {
        target: String,
        expected: u64,
        actual: u64,
    },
    #[error("{target}: the response is larger than the limit of {limit} bytes")]
    TooLarge { target: String, limit: u64 },
    #[error(
        "{target}: the server ignored the Range header and sent the whole blob (HTTP 200 from {url}). Lazy reads need HTTP range requests: use a registry or blob store that supports them"
    )]
    RangeIgnored { target: String, url: String },
    #[error("{target}: Content-Range {content_range:?} does not match the requested bytes {start}-{end} of {size}")]
    ContentRangeMismatch {
        target: String,
        content_range: String,
        start: u64,
        end: u64,
        size: u64,
    },
    #[error("{target}: read of {len} bytes at offset {offset} is beyond the blob size {size}")]
    OutOfBounds {
        target: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("{target}: the manifest digest is {actual}, but {source_of_expected} says {expected}: the registry sent other content")]
    ManifestDigestMismatch {
        target: String,
        expected: String,
        actual: String,
        source_of_expected: &'static str,
    },
    #[error("{target}: no host configured for {registry} may {capability}; add \"{capability}\" to the capabilities of a host in its hosts.toml")]
    NoCapableHost {
        target: String,
        registry: String,
        capability: &'static str,
    },
    #[error("{target}: no response within the deadline of {deadline:?} ({attempts} attempts). Check the registry, or raise --fetch-deadline")]
    DeadlineExceeded {
        target: String,
        deadline: Duration,
        attempts: u32,
    },
    #[error("{last} (gave up after {attempts} attempts)")]
    RetriesExhausted {
        attempts: u32,
        #[source]
        last: Box<RegistryError>,
    },
}

impl RegistryError {
    /// Returns `Some(delay hint)` when the failure is worth retrying; the
    /// hint is the server's `Retry-After` when it sent one.
    pub fn retry_hint(&self) -> Option<Option<Duration>> {
        match self {
            RegistryError::Transport { source, .. } => {
                // reqwest reports a connection reset while a body is read in
                // chunks as a decode error.
                let transient = source.is_timeout()
                    || source.is_connect()
                    || source.is_request()
                    || source.is_body()
                    || source.is_decode();
                transient.then_some(None)
            }
            RegistryError::Status {
                status,
                retry_after,
                ..
            } => (*status == 408 || *status == 429 || *status >= 500).then_some(*retry_after),
            RegistryError::Token { transient, .. } => transient.then_some(None),
            // A proxy or cache in between can send a short body, a wrong
            // range or the whole blob once and be right on the next request.
            RegistryError::Truncated { .. }
            | RegistryError::LengthMismatch { .. }
            | RegistryError::ContentRangeMismatch { .. }
            | RegistryError::RangeIgnored { .. } => Some(None),
            _ => None,
        }
    }
}
