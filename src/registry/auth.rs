//! Registry credentials and challenges: `WWW-Authenticate` parsing (RFC 9110
//! section 11.6.1), Docker `config.json` auths, and bearer tokens as in the
//! Docker registry token authentication specification.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Deserialize;

/// Token lifetime assumed when the token response carries no `expires_in`,
/// as the Docker token specification prescribes.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// A cached token is replaced once less than this much of its lifetime is
/// left (or a quarter of its lifetime, whichever is smaller).
const TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(10);

/// Errors of reading registry credentials.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("failed to read the registry auth file {path}: {source}. Fix the file or pass another with --auth-file")]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to parse the registry auth file {path}: {source}")]
    ParseConfig {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "invalid \"auth\" entry for {key:?} in {path}: expected base64 of USER:PASSWORD; run `docker login` again"
    )]
    InvalidAuthEntry { path: PathBuf, key: String },
    #[error("credential helper docker-credential-{helper} failed for {registry}: {detail}")]
    CredentialHelper {
        helper: String,
        registry: String,
        detail: String,
    },
}

/// A user name and password (or identity token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// Returns the `Authorization` header value for HTTP Basic.
    pub fn basic_header(&self) -> String {
        let pair = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        )
    }
}

/// One challenge of a `WWW-Authenticate` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// Scheme in lowercase (`bearer`, `basic`).
    pub scheme: String,
    /// Parameters with lowercase names.
    pub params: BTreeMap<String, String>,
}

/// Parses a `WWW-Authenticate` value into its challenges.
///
/// Parameter values may be tokens or quoted strings with backslash escapes,
/// so commas inside quotes (as in `scope="repository:a:pull,push"`) stay in
/// the value. Malformed input ends the parse and returns what was read.
pub fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut parser = HeaderParser {
        bytes: header.as_bytes(),
        position: 0,
    };
    let mut challenges: Vec<Challenge> = Vec::new();

    loop {
        parser.skip_separators();
        let Some(token) = parser.token() else { break };

        parser.skip_spaces();
        if parser.peek() == Some(b'=') {
            // A parameter of the current challenge.
            parser.position += 1;
            parser.skip_spaces();
            let value = if parser.peek() == Some(b'"') {
                parser.quoted_string()
            } else {
                parser.token().map(str::to_string)
            };
            let (Some(current), Some(value)) = (challenges.last_mut(), value) else {
                break;
            };
            current.params.insert(token.to_ascii_lowercase(), value);
        } else {
            challenges.push(Challenge {
                scheme: token.to_ascii_lowercase(),
                params: BTreeMap::new(),
            });
        }
    }
    challenges
}

struct HeaderParser<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> HeaderParser<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.position).copied()
    }

    fn skip_spaces(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.position += 1;
        }
    }

    fn skip_separators(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b',')) {
            self.position += 1;
        }
    }

    /// Reads an RFC 9110 `token` (which also covers token68 apart from its trailing '=').
    fn token(&mut self) -> Option<&'a str> {
        let start = self.position;
        while let Some(b) = self.peek() {
            let is_tchar = b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/:".contains(&b);
            if !is_tchar {
                break;
            }
            self.position += 1;
        }
        let token = std::str::from_utf8(&self.bytes[start..self.position]).ok()?;
        (!token.is_empty()).then_some(token)
    }

    /// Reads a quoted string starting at '"'; `None` when it is not closed.
    fn quoted_string(&mut self) -> Option<String> {
        self.position += 1;
        let mut value = Vec::new();
        while let Some(b) = self.peek() {
            self.position += 1;
            match b {
                b'"' => return String::from_utf8(value).ok(),
                b'\\' => {
                    let escaped = self.peek()?;
                    self.position += 1;
                    value.push(escaped);
                }
                _ => value.push(b),
            }
        }
        None
    }
}

/// The subset of a Docker `config.json` (or containers `auth.json`) read here.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DockerConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default)]
    creds_store: Option<String>,
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

// Written by hand so that the secrets never reach a log.
impl fmt::Debug for AuthEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthEntry")
            .field("auth", &self.auth.as_ref().map(|_| "<redacted>"))
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field(
                "identitytoken",
                &self.identitytoken.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// A parsed credentials file.
#[derive(Debug)]
pub struct DockerConfig {
    path: PathBuf,
    file: DockerConfigFile,
}

/// Normalises a registry name or an `auths` key to `host[:port]`: the scheme
/// and any path are dropped, and Docker Hub's names become `docker.io`.
pub fn normalize_registry_key(key: &str) -> String {
    let without_scheme = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = without_scheme.split('/').next().unwrap_or("");
    match host {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => "docker.io".to_string(),
        other => other.to_ascii_lowercase(),
    }
}

impl DockerConfig {
    /// Parses the JSON text of a config file; `path` is used in messages.
    pub fn parse(path: &Path, text: &[u8]) -> Result<DockerConfig, AuthError> {
        let file = serde_json::from_slice(text).map_err(|source| AuthError::ParseConfig {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(DockerConfig {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<DockerConfig, AuthError> {
        let text = std::fs::read(path).map_err(|source| AuthError::ReadConfig {
            path: path.to_path_buf(),
            source,
        })?;
        DockerConfig::parse(path, &text)
    }

    /// Path the config was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns the credentials stored for `registry` (as in a reference,
    /// `host[:port]`), running a credential helper when the file names one.
    pub fn credentials_for(&self, registry: &str) -> Result<Option<Credentials>, AuthError> {
        let wanted = normalize_registry_key(registry);

        let helper = self
            .file
            .cred_helpers
            .iter()
            .find(|(key, _)| normalize_registry_key(key) == wanted)
            .map(|(_, helper)| helper)
            .or(self.file.creds_store.as_ref());

        // An inline entry wins over a helper: `docker login` with a helper
        // leaves an empty entry, which this skips.
        for (key, entry) in &self.file.auths {
            if normalize_registry_key(key) != wanted {
                continue;
            }
            if let Some(credentials) = self.entry_credentials(key, entry)? {
                return Ok(Some(credentials));
            }
        }

        match helper {
            Some(helper) => run_credential_helper(helper, &wanted),
            None => Ok(None),
        }
    }

    fn entry_credentials(
        &self,
        key: &str,
        entry: &AuthEntry,
    ) -> Result<Option<Credentials>, AuthError> {
        let invalid = || AuthError::InvalidAuthEntry {
            path: self.path.clone(),
            key: key.to_string(),
        };

        if let Some(encoded) = entry.auth.as_deref().filter(|value| !value.is_empty()) {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .map_err(|_| invalid())?;
            let text = String::from_utf8(decoded).map_err(|_| invalid())?;
            let (username, password) = text.split_once(':').ok_or_else(invalid)?;
            return Ok(Some(Credentials {
                username: username.to_string(),
                password: password.to_string(),
            }));
        }
        if let (Some(username), Some(password)) = (&entry.username, &entry.password) {
            return Ok(Some(Credentials {
                username: username.clone(),
                password: password.clone(),
            }));
        }
        if let Some(token) = &entry.identitytoken {
            // NOTE: an identity token is an OAuth2 refresh token; sending it
            // as the Basic password works for registries that accept it there
            // (such as Azure's), but the OAuth2 POST flow is not implemented.
            return Ok(Some(Credentials {
                username: "<token>".to_string(),
                password: token.clone(),
            }));
        }
        Ok(None)
    }
}

/// Output of `docker-credential-* get`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HelperOutput {
    username: String,
    secret: String,
}

/// Runs `docker-credential-HELPER get` with the registry on stdin.
fn run_credential_helper(helper: &str, registry: &str) -> Result<Option<Credentials>, AuthError> {
    use std::io::Write as _;
    use std::process::{Command, Stdio};

    let failed = |detail: String| AuthError::CredentialHelper {
        helper: helper.to_string(),
        registry: registry.to_string(),
        detail,
    };
    // Docker stores Docker Hub under its legacy index URL.
    let server = if registry == "docker.io" {
        "https://index.docker.io/v1/"
    } else {
        registry
    };

    let mut child = Command::new(format!("docker-credential-{helper}"))
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            failed(format!(
                "failed to start it: {e}; install the helper or remove it from the config"
            ))
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(server.as_bytes())
            .map_err(|e| failed(format!("failed to write to its stdin: {e}")))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|e| failed(format!("failed to read its output: {e}")))?;

    if !output.status.success() {
        let stdout = String::from_utf8_lossy(&output.stdout);
        // Helpers report a missing entry this way; that means no credentials.
        if stdout.contains("credentials not found") {
            return Ok(None);
        }
        return Err(failed(format!("it exited with {}", output.status)));
    }
    let parsed: HelperOutput = serde_json::from_slice(&output.stdout)
        .map_err(|e| failed(format!("invalid JSON output: {e}")))?;
    Ok(Some(Credentials {
        username: parsed.username,
        password: parsed.secret,
    }))
}

/// Finds the credentials file: `explicit` (from the options), else
/// `REGISTRY_AUTH_FILE`, else `$DOCKER_CONFIG/config.json`, else
/// `~/.docker/config.json`. Returns the path and whether it was named
/// explicitly (a missing explicit file is an error, a missing default is not).
pub fn auth_file_path(explicit: Option<&Path>) -> Option<(PathBuf, bool)> {
    if let Some(path) = explicit {
        return Some((path.to_path_buf(), true));
    }
    if let Some(path) = std::env::var_os("REGISTRY_AUTH_FILE").filter(|v| !v.is_empty()) {
        return Some((PathBuf::from(path), true));
    }
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|v| !v.is_empty()) {
        return Some((PathBuf::from(dir).join("config.json"), false));
    }
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(|home| {
            (
                PathBuf::from(home).join(".docker").join("config.json"),
                false,
            )
        })
}

/// Loads the credentials for `registry` from the file `auth_file_path` picks.
pub fn load_credentials(
    registry: &str,
    explicit: Option<&Path>,
) -> Result<Option<Credentials>, AuthError> {
    let Some((path, required)) = auth_file_path(explicit) else {
        return Ok(None);
    };
    if !required && !path.exists() {
        tracing::debug!(path = %path.display(), "no registry auth file");
        return Ok(None);
    }
    let config = DockerConfig::load(&path)?;
    let credentials = config.credentials_for(registry)?;
    tracing::debug!(
        registry,
        path = %path.display(),
        found = credentials.is_some(),
        "looked up registry credentials"
    );
    Ok(credentials)
}

/// A bearer token and when it stops being used.
#[derive(Clone)]
pub struct BearerToken {
    pub value: String,
    pub refresh_at: Instant,
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BearerToken")
            .field("value", &"<redacted>")
            .field("refresh_at", &self.refresh_at)
            .finish()
    }
}

impl BearerToken {
    /// A token received at `received` that lives `lifetime`; it is replaced
    /// shortly before it expires.
    pub fn new(value: String, received: Instant, lifetime: Duration) -> BearerToken {
        let margin = TOKEN_REFRESH_MARGIN.min(lifetime / 4);
        BearerToken {
            value,
            refresh_at: received + lifetime - margin,
        }
    }

    pub fn is_fresh(&self, now: Instant) -> bool {
        now < self.refresh_at
    }
}

/// A token endpoint response; registries send `token`, OAuth2-style ones `access_token`.
#[derive(Deserialize)]
pub struct TokenResponse {
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub access_token: Option<String>,
    #[serde(default)]
    pub expires_in: Option<u64>,
}

impl TokenResponse {
    /// Returns the token and its lifetime, or `None` when the response has no token.
    pub fn into_token(self) -> Option<(String, Duration)> {
        let value = self
            .token
            .filter(|t| !t.is_empty())
            .or(self.access_token.filter(|t| !t.is_empty()))?;
        let lifetime = match self.expires_in {
            Some(seconds) if seconds > 0 => Duration::from_secs(seconds),
            _ => DEFAULT_TOKEN_LIFETIME,
        };
        Some((value, lifetime))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parse_challenges_table() {
        let cases: Vec<(&str, Vec<Challenge>)> = vec![
            (
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
                vec![Challenge {
                    scheme: "bearer".into(),
                    params: params(&[
                        ("realm", "https://auth.docker.io/token"),
                        ("service", "registry.docker.io"),
                        ("scope", "repository:library/alpine:pull"),
                    ]),
                }],
            ),
            (
                r#"Bearer realm="http://127.0.0.1:1/t", scope="repository:a/b:pull,push""#,
                vec![Challenge {
                    scheme: "bearer".into(),
                    params: params(&[
                        ("realm", "http://127.0.0.1:1/t"),
                        ("scope", "repository:a/b:pull,push"),
                    ]),
                }],
            ),
            (
                r#"Basic realm="esgz-test""#,
                vec![Challenge {
                    scheme: "basic".into(),
                    params: params(&[("realm", "esgz-test")]),
                }],
            ),
            (
                r#"BASIC Realm=plain, Bearer realm="x\"y\\z",error="invalid_token""#,
                vec![
                    Challenge {
                        scheme: "basic".into(),
                        params: params(&[("realm", "plain")]),
                    },
                    Challenge {
                        scheme: "bearer".into(),
                        params: params(&[("realm", "x\"y\\z"), ("error", "invalid_token")]),
                    },
                ],
            ),
            (
                "Basic",
                vec![Challenge {
                    scheme: "basic".into(),
                    params: BTreeMap::new(),
                }],
            ),
            ("", vec![]),
            (
                r#"Bearer realm="unterminated"#,
                vec![Challenge {
                    scheme: "bearer".into(),
                    params: BTreeMap::new(),
                }],
            ),
            (r#"realm="orphan""#, vec![]),
        ];
        for (header, expected) in cases {
            assert_eq!(parse_challenges(header), expected, "{header}");
        }
    }

    #[test]
    fn parse_challenges_never_panics() {
        for header in [
            "\"",
            "=",
            "Bearer =",
            "Bearer a=\"\\",
            ",,,",
            "Bearer a=b=c",
            "\u{e9}\u{e9}=\"\u{e9}\"",
        ] {
            let _ = parse_challenges(header);
        }
    }

    const AUTH_B64: &str = "dXNlcjpwYXNzOndpdGg6Y29sb25z"; // user:pass:with:colons

    #[test]
    fn config_credentials_by_key() {
        let text = format!(
            r#"{{"auths": {{
                "https://index.docker.io/v1/": {{"auth": "{AUTH_B64}"}},
                "http://127.0.0.1:5000": {{"username": "u2", "password": "p2"}},
                "Registry.Example.com/some/path": {{"auth": "{AUTH_B64}"}},
                "helper.example": {{}}
            }}}}"#
        );
        let config =
            DockerConfig::parse(Path::new("test.json"), text.as_bytes()).expect("valid config");
        let cases: &[(&str, Option<(&str, &str)>)] = &[
            ("docker.io", Some(("user", "pass:with:colons"))),
            ("127.0.0.1:5000", Some(("u2", "p2"))),
            ("127.0.0.1:5001", None),
            ("registry.example.com", Some(("user", "pass:with:colons"))),
            ("helper.example", None),
            ("quay.io", None),
        ];
        for (registry, expected) in cases {
            let found = config.credentials_for(registry).expect(registry);
            let found = found
                .as_ref()
                .map(|c| (c.username.as_str(), c.password.as_str()));
            assert_eq!(found, *expected, "{registry}");
        }
    }

    #[test]
    fn config_invalid_entries() {
        for auth in ["not base64!", "bm9jb2xvbg=="] {
            let text = format!(r#"{{"auths": {{"r.example": {{"auth": "{auth}"}}}}}}"#);
            let config =
                DockerConfig::parse(Path::new("c.json"), text.as_bytes()).expect("valid JSON");
            let error = config.credentials_for("r.example").expect_err(auth);
            assert!(
                matches!(error, AuthError::InvalidAuthEntry { .. }),
                "{auth}: {error:?}"
            );
            assert!(error.to_string().contains("r.example"), "{error}");
        }
        assert!(DockerConfig::parse(Path::new("c.json"), b"{").is_err());
        let empty = DockerConfig::parse(Path::new("c.json"), b"{}").expect("empty config");
        assert_eq!(empty.credentials_for("docker.io").expect("no error"), None);
    }

    #[test]
    fn credentials_debug_redacts() {
        let credentials = Credentials {
            username: "user".into(),
            password: "hunter2".into(),
        };
        let debug = format!("{credentials:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert_eq!(credentials.basic_header(), "Basic dXNlcjpodW50ZXIy");
        let token = BearerToken::new(
            "secret-token".into(),
            Instant::now(),
            Duration::from_secs(60),
        );
        assert!(!format!("{token:?}").contains("secret-token"));
    }

    #[test]
    fn token_lifetime_rules() {
        let now = Instant::now();
        let response: TokenResponse =
            serde_json::from_str(r#"{"access_token":"a","expires_in":300}"#).expect("json");
        let (value, lifetime) = response.into_token().expect("token");
        assert_eq!((value.as_str(), lifetime), ("a", Duration::from_secs(300)));

        let response: TokenResponse =
            serde_json::from_str(r#"{"token":"t","access_token":"a"}"#).expect("json");
        assert_eq!(
            response.into_token().expect("token"),
            ("t".to_string(), DEFAULT_TOKEN_LIFETIME)
        );

        let response: TokenResponse = serde_json::from_str(r#"{"token":""}"#).expect("json");
        assert!(response.into_token().is_none());

        let token = BearerToken::new("t".into(), now, Duration::from_secs(300));
        assert!(token.is_fresh(now + Duration::from_secs(289)));
        assert!(!token.is_fresh(now + Duration::from_secs(290)));
        let short = BearerToken::new("t".into(), now, Duration::from_secs(4));
        assert!(short.is_fresh(now + Duration::from_millis(2900)));
        assert!(!short.is_fresh(now + Duration::from_secs(3)));
    }

    #[test]
    fn registry_key_normalization() {
        let cases = [
            ("https://index.docker.io/v1/", "docker.io"),
            ("registry-1.docker.io", "docker.io"),
            ("http://LocalHost:5000/", "localhost:5000"),
            ("quay.io", "quay.io"),
        ];
        for (key, expected) in cases {
            assert_eq!(normalize_registry_key(key), expected, "{key}");
        }
    }
}
