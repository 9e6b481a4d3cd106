//! Registry host configuration in containerd's `hosts.toml` format (containerd docs/hosts.md): mirrors tried in order, then the upstream server, each with its own TLS roots, client certificate and headers.
//!
//! For a registry `HOST[:PORT]` the file is `DIR/HOST[:PORT]/hosts.toml`, or
//! `DIR/_default/hosts.toml` when that does not exist. A file looks like this:
//!
//! ```toml
//! server = "https://registry.example.com"   # upstream; default https://HOST
//!
//! [host."http://127.0.0.1:5001"]
//!   capabilities = ["pull", "resolve"]
//!   skip_verify = true
//!   ca = "/etc/certs/mirror.pem"          # or a list; relative to this file
//!   override_path = false
//!   [host."http://127.0.0.1:5001".header]
//!     x-mirror-token = "abc"
//! ```
//!
//! The `[host.*]` tables are mirrors in file order. The keys at the top level
//! (`ca`, `skip_verify`, `header`, ...) configure the `server` itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use url::Url;

use super::client::Client;
use super::error::RegistryError;

/// File name looked up in each host directory.
pub const HOSTS_FILE: &str = "hosts.toml";

/// Directory consulted when a registry has no directory of its own.
pub const DEFAULT_HOST_DIR: &str = "_default";

/// containerd's own host configuration directory, the default `--hosts-dir`.
pub const CONTAINERD_HOSTS_DIR: &str = "/etc/containerd/certs.d";

/// Errors of reading a `hosts.toml` file.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error("failed to read the registry hosts file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid registry hosts file {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("invalid registry hosts file {path}: {what} {value:?}: {reason}")]
    InvalidValue {
        path: PathBuf,
        what: &'static str,
        value: String,
        reason: String,
    },
    #[error("failed to read the certificate file {file} named in {path}: {source}")]
    ReadCertificate {
        path: PathBuf,
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid certificate in {file} named in {path}: {source}")]
    InvalidCertificate {
        path: PathBuf,
        file: PathBuf,
        #[source]
        source: reqwest::Error,
    },
}

/// What a host may be used for, as in containerd's `capabilities`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Fetching manifests by digest and blobs.
    pub pull: bool,
    /// Turning a tag into a manifest.
    pub resolve: bool,
}

impl Capabilities {
    /// Pull and resolve; containerd's default also includes push, which
    /// esgz-nbd never does.
    pub const ALL: Capabilities = Capabilities {
        pull: true,
        resolve: true,
    };
}

/// One registry host to send requests to: a mirror or the upstream server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostEndpoint {
    /// API root with a trailing slash, such as `https://mirror.example/v2/`;
    /// request paths (`NAME/blobs/DIGEST`) are joined to it.
    pub api_root: Url,
    pub capabilities: Capabilities,
    /// Accept any TLS certificate from this host.
    pub skip_verify: bool,
    /// PEM files whose certificates are added to the TLS roots.
    pub ca: Vec<PathBuf>,
    /// PEM files, each with a client certificate and its private key
    /// (joined from a certificate and key pair when given as two files).
    pub client_identity: Vec<Vec<PathBuf>>,
    /// Headers sent with every request to this host.
    pub headers: Vec<(String, String)>,
    /// A mirror rather than the upstream server; mirrors get the `ns` query
    /// parameter naming the upstream registry, as containerd sends it.
    pub is_mirror: bool,
    /// The `hosts.toml` this endpoint comes from, for messages.
    pub file: Option<PathBuf>,
}

impl HostEndpoint {
    /// The upstream endpoint with no configuration: `URL/v2/`.
    pub fn upstream(server: &Url) -> HostEndpoint {
        HostEndpoint {
            api_root: api_root(server, false),
            capabilities: Capabilities::ALL,
            skip_verify: false,
            ca: Vec::new(),
            client_identity: Vec::new(),
            headers: Vec::new(),
            is_mirror: false,
            file: None,
        }
    }

    /// `scheme://host[:port]` of the endpoint, for logs and credential lookup.
    pub fn host(&self) -> String {
        let host = self.api_root.host_str().unwrap_or("");
        match self.api_root.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        }
    }
}

/// A string or a list of strings, as containerd accepts for `ca` and headers.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(value) => vec![value],
            OneOrMany::Many(values) => values,
        }
    }
}

/// A client certificate: one combined PEM file, or a certificate and key pair.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ClientEntry {
    One(String),
    Many(Vec<ClientPair>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ClientPair {
    Combined(String),
    Pair(Vec<String>),
}

/// The fields a host table (or the top level, for the server) may set.
#[derive(Debug, Default, Deserialize)]
struct HostFields {
    #[serde(default)]
    capabilities: Option<Vec<String>>,
    #[serde(default)]
    ca: Option<OneOrMany>,
    #[serde(default)]
    client: Option<ClientEntry>,
    #[serde(default)]
    skip_verify: Option<bool>,
    #[serde(default)]
    header: Option<BTreeMap<String, OneOrMany>>,
    #[serde(default)]
    override_path: Option<bool>,
}

/// Returns the `hosts.toml` path for `registry` in `dir`, or `None` when
/// neither the registry's directory nor `_default` has one.
pub fn hosts_file(dir: &Path, registry: &str) -> Option<PathBuf> {
    [registry, DEFAULT_HOST_DIR]
        .iter()
        .map(|name| dir.join(name).join(HOSTS_FILE))
        .find(|path| path.is_file())
}

/// Reads the endpoints for `registry` from `dir`: its mirrors in file order,
/// then its server. Without a hosts file the result is the upstream server
/// alone, `default_server` (`https://HOST` or the plain HTTP equivalent).
pub fn load_endpoints(
    dir: Option<&Path>,
    registry: &str,
    default_server: &Url,
) -> Result<Vec<HostEndpoint>, HostsError> {
    let Some(path) = dir.and_then(|dir| hosts_file(dir, registry)) else {
        return Ok(vec![HostEndpoint::upstream(default_server)]);
    };
    let text = std::fs::read_to_string(&path).map_err(|source| HostsError::Read {
        path: path.clone(),
        source,
    })?;
    let endpoints = parse_hosts(&text, &path, default_server)?;
    tracing::debug!(registry, path = %path.display(), hosts = ?endpoints.iter().map(|e| e.api_root.as_str()).collect::<Vec<_>>(), "read the registry hosts file");
    Ok(endpoints)
}

/// Parses the text of a `hosts.toml`; `path` locates relative certificate
/// paths and names the file in messages.
pub fn parse_hosts(
    text: &str,
    path: &Path,
    default_server: &Url,
) -> Result<Vec<HostEndpoint>, HostsError> {
    let mut table: toml::Table = toml::from_str(text).map_err(|source| HostsError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    let invalid = |what: &'static str, value: &str, reason: &str| HostsError::InvalidValue {
        path: path.to_path_buf(),
        what,
        value: value.to_string(),
        reason: reason.to_string(),
    };

    let server = match table.remove("server") {
        None => default_server.clone(),
        Some(toml::Value::String(text)) => {
            parse_host_url(&text).map_err(|reason| invalid("server", &text, &reason))?
        }
        Some(other) => {
            return Err(invalid(
                "server",
                &other.to_string(),
                "expected a URL string",
            ))
        }
    };
    let mirrors = match table.remove("host") {
        None => toml::Table::new(),
        Some(toml::Value::Table(mirrors)) => mirrors,
        Some(other) => {
            return Err(invalid(
                "host",
                &other.to_string(),
                "expected tables such as [host.\"https://mirror.example\"]",
            ))
        }
    };

    let mut endpoints = Vec::with_capacity(mirrors.len() + 1);
    // `preserve_order` keeps the tables in file order, which is the order
    // mirrors are tried in.
    for (key, value) in mirrors {
        let url = parse_host_url(&key).map_err(|reason| invalid("host", &key, &reason))?;
        let fields: HostFields = value.try_into().map_err(|source| HostsError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        endpoints.push(build_endpoint(&url, fields, true, path, &invalid)?);
    }
    let server_fields: HostFields =
        toml::Value::Table(table)
            .try_into()
            .map_err(|source| HostsError::Parse {
                path: path.to_path_buf(),
                source,
            })?;
    endpoints.push(build_endpoint(
        &server,
        server_fields,
        false,
        path,
        &invalid,
    )?);
    Ok(endpoints)
}

/// Parses a host key or `server` value; a value without a scheme means HTTPS.
fn parse_host_url(text: &str) -> Result<Url, String> {
    let with_scheme = if text.contains("://") {
        text.to_string()
    } else {
        format!("https://{text}")
    };
    let url = Url::parse(&with_scheme).map_err(|error| error.to_string())?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "the scheme {:?} is not http or https",
            url.scheme()
        ));
    }
    if url.host_str().is_none() {
        return Err("the URL has no host".to_string());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("the URL must not have a query or fragment".to_string());
    }
    Ok(url)
}

/// Returns the API root of a host URL: its path plus `/v2/`, unless the path
/// ends in `/v2` already or `override_path` says the path is the API root.
fn api_root(url: &Url, override_path: bool) -> Url {
    let mut root = url.clone();
    let trimmed = url.path().trim_end_matches('/').to_string();
    let path = if override_path || trimmed.ends_with("/v2") {
        format!("{trimmed}/")
    } else {
        format!("{trimmed}/v2/")
    };
    root.set_path(&path);
    root
}

fn build_endpoint(
    url: &Url,
    fields: HostFields,
    is_mirror: bool,
    file: &Path,
    invalid: &dyn Fn(&'static str, &str, &str) -> HostsError,
) -> Result<HostEndpoint, HostsError> {
    let capabilities = match &fields.capabilities {
        None => Capabilities::ALL,
        Some(names) => {
            let mut capabilities = Capabilities {
                pull: false,
                resolve: false,
            };
            for name in names {
                match name.as_str() {
                    "pull" => capabilities.pull = true,
                    "resolve" => capabilities.resolve = true,
                    "push" => {}
                    other => {
                        return Err(invalid(
                            "capability",
                            other,
                            "expected \"pull\", \"resolve\" or \"push\"",
                        ))
                    }
                }
            }
            capabilities
        }
    };
    let resolve_path = |text: String| {
        let path = PathBuf::from(text);
        if path.is_absolute() {
            path
        } else {
            file.parent().unwrap_or(Path::new(".")).join(path)
        }
    };

    let ca = fields
        .ca
        .map(OneOrMany::into_vec)
        .unwrap_or_default()
        .into_iter()
        .map(resolve_path)
        .collect();
    let client_identity = match fields.client {
        None => Vec::new(),
        Some(ClientEntry::One(file)) => vec![vec![resolve_path(file)]],
        Some(ClientEntry::Many(entries)) => {
            let mut identities = Vec::with_capacity(entries.len());
            for entry in entries {
                let files = match entry {
                    ClientPair::Combined(file) => vec![file],
                    ClientPair::Pair(files) if (1..=2).contains(&files.len()) => files,
                    ClientPair::Pair(files) => {
                        return Err(invalid(
                            "client",
                            &files.join(", "),
                            "expected a PEM file or a [certificate, key] pair",
                        ))
                    }
                };
                identities.push(files.into_iter().map(resolve_path).collect());
            }
            identities
        }
    };

    let mut headers = Vec::new();
    for (name, values) in fields.header.unwrap_or_default() {
        reqwest::header::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| invalid("header name", &name, "not a valid HTTP header name"))?;
        for value in values.into_vec() {
            reqwest::header::HeaderValue::from_str(&value)
                .map_err(|_| invalid("header value", &value, "not a valid HTTP header value"))?;
            headers.push((name.clone(), value));
        }
    }

    Ok(HostEndpoint {
        api_root: api_root(url, fields.override_path.unwrap_or(false)),
        capabilities,
        skip_verify: fields.skip_verify.unwrap_or(false),
        ca,
        client_identity,
        headers,
        is_mirror,
        file: Some(file.to_path_buf()),
    })
}

/// Reads the certificates of `endpoint.ca` for a reqwest client builder.
pub fn load_ca_certificates(
    endpoint: &HostEndpoint,
) -> Result<Vec<reqwest::Certificate>, HostsError> {
    let hosts_path = endpoint.file.as_deref().unwrap_or(Path::new(HOSTS_FILE));
    let mut certificates = Vec::new();
    for file in &endpoint.ca {
        let pem = std::fs::read(file).map_err(|source| HostsError::ReadCertificate {
            path: hosts_path.to_path_buf(),
            file: file.clone(),
            source,
        })?;
        let parsed = reqwest::Certificate::from_pem_bundle(&pem).map_err(|source| {
            HostsError::InvalidCertificate {
                path: hosts_path.to_path_buf(),
                file: file.clone(),
                source,
            }
        })?;
        certificates.extend(parsed);
    }
    Ok(certificates)
}

/// Reads the first client identity of `endpoint`, joining a certificate and
/// key pair into one PEM.
pub fn load_client_identity(
    endpoint: &HostEndpoint,
) -> Result<Option<reqwest::Identity>, HostsError> {
    let hosts_path = endpoint.file.as_deref().unwrap_or(Path::new(HOSTS_FILE));
    let Some(files) = endpoint.client_identity.first() else {
        return Ok(None);
    };
    if endpoint.client_identity.len() > 1 {
        tracing::warn!(host = %endpoint.host(), "several client certificates are configured; only the first is used");
    }
    let mut pem = Vec::new();
    for file in files {
        let bytes = std::fs::read(file).map_err(|source| HostsError::ReadCertificate {
            path: hosts_path.to_path_buf(),
            file: file.clone(),
            source,
        })?;
        pem.extend_from_slice(&bytes);
        pem.push(b'\n');
    }
    let identity =
        reqwest::Identity::from_pem(&pem).map_err(|source| HostsError::InvalidCertificate {
            path: hosts_path.to_path_buf(),
            file: files.first().cloned().unwrap_or_default(),
            source,
        })?;
    Ok(Some(identity))
}

/// How long a mirror that failed at the transport level (refused, timed
/// out) is skipped before it is tried again.
const MIRROR_DOWN_TIME: Duration = Duration::from_secs(30);

/// The operation a request performs, which decides the hosts it may go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Need {
    /// A manifest by tag.
    Resolve,
    /// A manifest by digest, a config or a layer blob.
    Pull,
}

/// One endpoint with its own client (TLS settings, credentials, auth state).
struct HostClient {
    client: Arc<Client>,
    capabilities: Capabilities,
    is_mirror: bool,
    /// Until when a mirror is skipped after a transport failure.
    down_until: Mutex<Option<Instant>>,
}

impl HostClient {
    fn is_down(&self, now: Instant) -> bool {
        let down = self.down_until.lock().unwrap_or_else(|p| p.into_inner());
        down.is_some_and(|until| now < until)
    }

    fn mark_down(&self, now: Instant) {
        *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(now + MIRROR_DOWN_TIME);
    }
}

/// The hosts of one registry in the order requests try them: mirrors, then
/// the upstream server.
pub(crate) struct HostSet {
    hosts: Vec<HostClient>,
    registry: String,
    /// Limit on operations in flight, when one is configured.
    permits: Option<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for HostSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hosts: Vec<&Client> = self.hosts.iter().map(|host| &*host.client).collect();
        f.debug_struct("HostSet")
            .field("registry", &self.registry)
            .field("hosts", &hosts)
            .finish()
    }
}

impl HostSet {
    /// Builds one client per endpoint; the last endpoint is the upstream server.
    pub(crate) fn new(
        registry: &str,
        clients: Vec<(Arc<Client>, &HostEndpoint)>,
        max_concurrent: usize,
    ) -> HostSet {
        let hosts = clients
            .into_iter()
            .map(|(client, endpoint)| HostClient {
                client,
                capabilities: endpoint.capabilities,
                is_mirror: endpoint.is_mirror,
                down_until: Mutex::new(None),
            })
            .collect();
        HostSet {
            hosts,
            registry: registry.to_string(),
            permits: (max_concurrent > 0).then(|| tokio::sync::Semaphore::new(max_concurrent)),
        }
    }

    /// The upstream server's client, used to name objects in messages.
    pub(crate) fn upstream(&self) -> Option<&Client> {
        self.hosts.last().map(|host| &*host.client)
    }

    /// Describes an object of the repository for messages.
    pub(crate) fn target(&self, object: &str) -> String {
        match self.upstream() {
            Some(client) => client.target(object),
            None => format!("registry {}, {object}", self.registry),
        }
    }

    /// Runs `operation` against each host that may serve `need`, in order,
    /// until one succeeds. A mirror's failure is logged and the next host is
    /// tried; the last host's error is returned.
    pub(crate) async fn run<T, F, Fut>(
        &self,
        need: Need,
        target: &str,
        mut operation: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut(Arc<Client>) -> Fut,
        Fut: std::future::Future<Output = Result<T, RegistryError>>,
    {
        let capable: Vec<&HostClient> = self
            .hosts
            .iter()
            .filter(|host| match need {
                Need::Resolve => host.capabilities.resolve,
                Need::Pull => host.capabilities.pull,
            })
            .collect();
        let count = capable.len();
        // The semaphore is never closed, so acquiring fails only if it were.
        let _permit = match &self.permits {
            Some(permits) => permits.acquire().await.ok(),
            None => None,
        };
        let mut last_error = None;
        for (position, host) in capable.into_iter().enumerate() {
            let is_last = position + 1 == count;
            let now = Instant::now();
            if host.is_mirror && !is_last && host.is_down(now) {
                tracing::trace!(target, host = %host.client.host(), "skipping a mirror that failed recently");
                continue;
            }
            match operation(Arc::clone(&host.client)).await {
                Ok(value) => return Ok(value),
                Err(error) if !is_last => {
                    let transport = matches!(error, RegistryError::Transport { .. });
                    if transport && host.is_mirror {
                        host.mark_down(now);
                    }
                    tracing::warn!(target, host = %host.client.host(), %error, "registry host failed, trying the next one");
                    last_error = Some(error);
                }
                Err(error) => return Err(error),
            }
        }
        Err(last_error.unwrap_or_else(|| RegistryError::NoCapableHost {
            target: target.to_string(),
            registry: self.registry.clone(),
            capability: match need {
                Need::Resolve => "resolve",
                Need::Pull => "pull",
            },
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream() -> Url {
        Url::parse("https://registry.example").expect("valid URL")
    }

    fn parse(text: &str) -> Result<Vec<HostEndpoint>, HostsError> {
        parse_hosts(
            text,
            Path::new("/etc/hosts.d/r.example/hosts.toml"),
            &upstream(),
        )
    }

    #[test]
    fn api_root_table() {
        let cases = [
            ("https://m.example", false, "https://m.example/v2/"),
            ("https://m.example/", false, "https://m.example/v2/"),
            ("https://m.example/v2", false, "https://m.example/v2/"),
            (
                "https://m.example/proxy",
                false,
                "https://m.example/proxy/v2/",
            ),
            ("https://m.example/proxy/", true, "https://m.example/proxy/"),
            ("http://127.0.0.1:5001", false, "http://127.0.0.1:5001/v2/"),
        ];
        for (url, override_path, expected) in cases {
            let url = Url::parse(url).expect("valid URL");
            assert_eq!(api_root(&url, override_path).as_str(), expected, "{url}");
        }
    }

    #[test]
    fn no_file_gives_upstream() {
        let dir = tempfile::tempdir().expect("temp dir");
        let endpoints =
            load_endpoints(Some(dir.path()), "r.example", &upstream()).expect("no file is fine");
        assert_eq!(endpoints, vec![HostEndpoint::upstream(&upstream())]);
        let endpoints = load_endpoints(None, "r.example", &upstream()).expect("no dir");
        assert_eq!(endpoints.len(), 1);
    }

    #[test]
    fn mirrors_in_file_order_then_server() {
        let text = r#"
            server = "https://upstream.example"
            ca = "upstream-ca.pem"

            [host."http://zeta.example:5000"]
              capabilities = ["pull"]
              skip_verify = true
            [host."https://alpha.example/cache"]
              override_path = true
              ca = ["/abs/a.pem", "rel/b.pem"]
              client = [["c.pem", "c.key"], "combined.pem"]
              [host."https://alpha.example/cache".header]
                x-one = "1"
                x-many = ["a", "b"]
            [host."mirror.example"]
        "#;
        let endpoints = parse(text).expect("valid file");
        let roots: Vec<&str> = endpoints.iter().map(|e| e.api_root.as_str()).collect();
        assert_eq!(
            roots,
            [
                "http://zeta.example:5000/v2/",
                "https://alpha.example/cache/",
                "https://mirror.example/v2/",
                "https://upstream.example/v2/",
            ]
        );

        let zeta = &endpoints[0];
        assert!(zeta.is_mirror);
        assert!(zeta.skip_verify);
        assert_eq!(
            zeta.capabilities,
            Capabilities {
                pull: true,
                resolve: false
            }
        );

        let alpha = &endpoints[1];
        assert_eq!(alpha.capabilities, Capabilities::ALL);
        assert_eq!(
            alpha.ca,
            [
                PathBuf::from("/abs/a.pem"),
                PathBuf::from("/etc/hosts.d/r.example/rel/b.pem")
            ]
        );
        assert_eq!(
            alpha.client_identity,
            [
                vec![
                    PathBuf::from("/etc/hosts.d/r.example/c.pem"),
                    PathBuf::from("/etc/hosts.d/r.example/c.key")
                ],
                vec![PathBuf::from("/etc/hosts.d/r.example/combined.pem")],
            ]
        );
        assert_eq!(
            alpha.headers,
            [
                ("x-many".to_string(), "a".to_string()),
                ("x-many".to_string(), "b".to_string()),
                ("x-one".to_string(), "1".to_string()),
            ]
        );

        let server = &endpoints[3];
        assert!(!server.is_mirror);
        assert_eq!(
            server.ca,
            [PathBuf::from("/etc/hosts.d/r.example/upstream-ca.pem")]
        );
        assert_eq!(server.host(), "upstream.example");
        assert_eq!(zeta.host(), "zeta.example:5000");
    }

    #[test]
    fn default_server_when_absent() {
        let endpoints = parse("[host.\"https://m.example\"]\n").expect("valid file");
        assert_eq!(endpoints.len(), 2);
        assert_eq!(
            endpoints[1].api_root.as_str(),
            "https://registry.example/v2/"
        );
    }

    #[test]
    fn invalid_files_rejected() {
        let cases = [
            ("server = 5", "server"),
            ("server = \"ftp://x\"", "scheme"),
            ("host = 1", "host"),
            ("[host.\"https://m\"]\ncapabilities = [\"fly\"]", "fly"),
            ("[host.\"https://m\"]\nskip_verify = \"yes\"", "skip_verify"),
            (
                "[host.\"https://m\"]\nclient = [[\"a\", \"b\", \"c\"]]",
                "client",
            ),
            (
                "[host.\"https://m\".header]\n\"bad name\" = \"v\"",
                "header name",
            ),
            (
                "[host.\"https://m\".header]\nx = \"line\\nbreak\"",
                "header value",
            ),
            ("[host.\"https://m?q=1\"]", "query"),
            ("not toml [", "invalid registry hosts file"),
        ];
        for (text, expected) in cases {
            let error = parse(text).expect_err(text);
            let message = error.to_string();
            assert!(message.contains(expected), "{text}: {message}");
            assert!(message.contains("hosts.toml"), "{text}: {message}");
        }
    }

    #[test]
    fn default_dir_fallback() {
        let dir = tempfile::tempdir().expect("temp dir");
        let default = dir.path().join(DEFAULT_HOST_DIR);
        std::fs::create_dir(&default).expect("mkdir");
        std::fs::write(default.join(HOSTS_FILE), "[host.\"http://127.0.0.1:1\"]\n").expect("write");
        let endpoints =
            load_endpoints(Some(dir.path()), "r.example:5000", &upstream()).expect("valid");
        assert_eq!(endpoints.len(), 2);

        let own = dir.path().join("r.example:5000");
        std::fs::create_dir(&own).expect("mkdir");
        std::fs::write(own.join(HOSTS_FILE), "server = \"http://127.0.0.1:2\"\n").expect("write");
        let endpoints =
            load_endpoints(Some(dir.path()), "r.example:5000", &upstream()).expect("valid");
        assert_eq!(endpoints.len(), 1);
        assert_eq!(endpoints[0].api_root.as_str(), "http://127.0.0.1:2/v2/");
    }
}
