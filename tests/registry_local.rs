//! Registry source against Debian's docker-registry on loopback, with
//! images pushed by skopeo, plus small in-test HTTP servers for redirects
//! and the bearer token flow.

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use esgz_nbd::oci_layout::open_oci_layout;
use esgz_nbd::reference::Reference;
use esgz_nbd::registry::manifest::sha256_digest;
use esgz_nbd::registry::{open_registry, RegistryOptions};
use esgz_nbd::source::{ImageSource, Platform, ResolvedImage};
use futures::future::BoxFuture;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

const FOOTER_SIZE: u64 = 51;

fn basic_layout() -> PathBuf {
    let dir = support::shared_dir().join("fixtures/basic/oci");
    assert!(
        dir.join("index.json").exists(),
        "fixture layout {} not found: set ESGZ_SHARED to the shared directory",
        dir.display()
    );
    dir
}

fn require_tool(name: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|output| output.status.success());
    assert!(
        found,
        "required tool {name} not found in PATH: install it to run these tests"
    );
}

fn free_port(ip: &str) -> u16 {
    let listener = std::net::TcpListener::bind((ip, 0)).expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

fn amd64() -> Platform {
    Platform::parse("linux/amd64").expect("valid platform")
}

/// A docker-registry process on 127.0.0.1, stopped on drop.
struct LocalRegistry {
    pid: u32,
    port: u16,
    _storage: tempfile::TempDir,
}

impl LocalRegistry {
    fn start(htpasswd: Option<&Path>) -> LocalRegistry {
        for tool in ["docker-registry", "skopeo", "curl", "bash"] {
            require_tool(tool);
        }
        let script = support::shared_dir().join("scripts/start-registry.sh");
        assert!(script.exists(), "{} not found", script.display());
        let storage = tempfile::tempdir().expect("tempdir");
        let port = free_port("127.0.0.1");

        let mut command = Command::new("bash");
        command
            .arg(&script)
            .arg(port.to_string())
            .arg(storage.path());
        if let Some(path) = htpasswd {
            command.arg(path);
        }
        let output = command.output().expect("run start-registry.sh");
        assert!(
            output.status.success(),
            "start-registry.sh failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let pid = String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .expect("start-registry.sh prints the PID");
        LocalRegistry {
            pid,
            port,
            _storage: storage,
        }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Pushes `layout:latest` to `repository:latest` with skopeo.
    fn push(&self, layout: &Path, repository: &str, credentials: Option<&str>, all: bool) {
        let mut command = Command::new("skopeo");
        command.args(["copy", "--quiet", "--dest-tls-verify=false"]);
        if all {
            command.arg("--all");
        }
        if let Some(credentials) = credentials {
            command.args(["--dest-creds", credentials]);
        }
        command
            .arg(format!("oci:{}:latest", layout.display()))
            .arg(format!("docker://{}/{repository}:latest", self.host()));
        let output = command.output().expect("run skopeo");
        assert!(
            output.status.success(),
            "skopeo copy to {repository} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.pid.to_string()).status();
    }
}

fn options(auth_file: &Path) -> RegistryOptions {
    RegistryOptions {
        auth_file: Some(auth_file.to_path_buf()),
        retries: 1,
        request_timeout: Duration::from_secs(30),
        ..RegistryOptions::default()
    }
}

/// Writes a Docker config.json with `user:password` for `host`.
fn write_auth_file(dir: &Path, host: &str, user: &str, password: &str) -> PathBuf {
    let path = dir.join("config.json");
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let text = format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#);
    std::fs::write(&path, text).expect("write config.json");
    path
}

fn empty_auth_file(dir: &Path) -> PathBuf {
    let path = dir.join("empty-config.json");
    std::fs::write(&path, "{}").expect("write config.json");
    path
}

fn open(reference: &str, options: &RegistryOptions) -> Arc<dyn ImageSource> {
    let reference = Reference::parse(reference).expect("valid reference");
    open_registry(&reference, options).expect("open registry")
}

/// Checks that `image` equals the layout's image and that the footer read
/// through `source` equals the blob file's last bytes.
async fn check_against_layout(source: &dyn ImageSource, image: &ResolvedImage, layout: &Path) {
    let expected = open_oci_layout(layout, Some("latest"))
        .expect("open layout")
        .resolve(&amd64())
        .await
        .expect("resolve layout");
    assert_eq!(
        image.manifest_digest, expected.manifest_digest,
        "manifest digest"
    );
    assert_eq!(image.layers, expected.layers, "layers and annotations");
    assert_eq!(image.diff_ids, expected.diff_ids, "diff_ids");

    let layer = &image.layers[0];
    let blob = source.blob(layer).expect("blob");
    assert_eq!(blob.size(), layer.size);
    let footer = blob
        .read_range(layer.size - FOOTER_SIZE, FOOTER_SIZE)
        .await
        .expect("footer read");
    let file = std::fs::read(layout.join("blobs/sha256").join(&layer.digest[7..]))
        .expect("read blob file");
    assert_eq!(
        &footer[..],
        &file[file.len() - FOOTER_SIZE as usize..],
        "footer bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_resolve_matches_layout() {
    let registry = LocalRegistry::start(None);
    let layout = basic_layout();
    registry.push(&layout, "basic", None, false);
    let temp = tempfile::tempdir().expect("tempdir");
    let options = options(&empty_auth_file(temp.path()));

    let source = open(&format!("{}/basic:latest", registry.host()), &options);
    let image = source.resolve(&amd64()).await.expect("resolve");
    check_against_layout(source.as_ref(), &image, &layout).await;

    // The whole blob in one read (offset 0, full length).
    let layer = &image.layers[0];
    let blob = source.blob(layer).expect("blob");
    let whole = blob.read_range(0, layer.size).await.expect("whole read");
    assert_eq!(sha256_digest(&whole), layer.digest, "whole blob digest");
    assert!(
        blob.read_range(layer.size, 1).await.is_err(),
        "read past the end"
    );

    // A reference pinned to the right digest resolves; a wrong pin fails.
    let pinned = open(
        &format!("{}/basic@{}", registry.host(), image.manifest_digest),
        &options,
    );
    let pinned_image = pinned.resolve(&amd64()).await.expect("resolve by digest");
    assert_eq!(pinned_image.manifest_digest, image.manifest_digest);

    let wrong = format!("sha256:{}", "0".repeat(64));
    let error = open(&format!("{}/basic@{wrong}", registry.host()), &options)
        .resolve(&amd64())
        .await
        .expect_err("unknown digest");
    let message = format!("{error:#}");
    assert!(message.contains("404"), "{message}");
    assert!(message.contains("Check the reference"), "{message}");

    let error = open(&format!("{}/missing:latest", registry.host()), &options)
        .resolve(&amd64())
        .await
        .expect_err("unknown repository");
    let message = format!("{error:#}");
    assert!(message.contains("repository missing"), "{message}");
    assert!(
        message.contains("MANIFEST_UNKNOWN") || message.contains("NAME_UNKNOWN"),
        "{message}"
    );
}

fn write_htpasswd(dir: &Path, user: &str, password: &str) -> PathBuf {
    require_tool("htpasswd");
    let output = Command::new("htpasswd")
        .args(["-Bbn", user, password])
        .output()
        .expect("run htpasswd");
    assert!(output.status.success(), "htpasswd failed");
    let path = dir.join("htpasswd");
    std::fs::write(&path, output.stdout).expect("write htpasswd");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_basic_auth() {
    let temp = tempfile::tempdir().expect("tempdir");
    let htpasswd = write_htpasswd(temp.path(), "tester", "s3cret");
    let registry = LocalRegistry::start(Some(&htpasswd));
    let layout = basic_layout();
    registry.push(&layout, "private/basic", Some("tester:s3cret"), false);
    let reference = format!("{}/private/basic:latest", registry.host());

    let good_dir = tempfile::tempdir().expect("tempdir");
    let good = options(&write_auth_file(
        good_dir.path(),
        &registry.host(),
        "tester",
        "s3cret",
    ));
    let source = open(&reference, &good);
    let image = source
        .resolve(&amd64())
        .await
        .expect("resolve with credentials");
    check_against_layout(source.as_ref(), &image, &layout).await;

    let bad_dir = tempfile::tempdir().expect("tempdir");
    let bad = options(&write_auth_file(
        bad_dir.path(),
        &format!("http://{}", registry.host()),
        "tester",
        "wrong",
    ));
    let error = open(&reference, &bad)
        .resolve(&amd64())
        .await
        .expect_err("wrong password");
    let message = format!("{error:#}");
    assert!(message.contains("rejected the credentials"), "{message}");
    assert!(message.contains("docker login"), "{message}");
    assert!(
        !message.contains("wrong"),
        "the password leaked into the message: {message}"
    );

    let none = options(&empty_auth_file(temp.path()));
    let error = open(&reference, &none)
        .resolve(&amd64())
        .await
        .expect_err("no credentials");
    let message = format!("{error:#}");
    assert!(message.contains("none were found"), "{message}");
    assert!(message.contains("docker login"), "{message}");
}

/// Copies the basic layout and turns it into a two-platform index:
/// linux/amd64 (the fixture's manifest) and linux/arm64 (same layers, a
/// config with another architecture). Returns the two manifest digests.
fn build_two_platform_layout(dir: &Path) -> (String, String) {
    let status = Command::new("cp")
        .arg("-r")
        .arg(basic_layout())
        .arg(dir)
        .status()
        .expect("run cp");
    assert!(status.success(), "cp -r of the fixture layout failed");
    let blobs = dir.join("blobs/sha256");
    let write_blob = |bytes: &[u8]| {
        let digest = sha256_digest(bytes);
        std::fs::write(blobs.join(&digest[7..]), bytes).expect("write blob");
        digest
    };

    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).expect("read index.json"))
            .expect("parse");
    let amd64_entry = &index["manifests"][0];
    let amd64_digest = amd64_entry["digest"].as_str().expect("digest").to_string();
    let amd64_size = amd64_entry["size"].as_u64().expect("size");
    let manifest_bytes = std::fs::read(blobs.join(&amd64_digest[7..])).expect("read manifest");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&manifest_bytes).expect("parse manifest");
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .expect("config digest")
        .to_string();
    let mut config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(blobs.join(&config_digest[7..])).expect("read config"),
    )
    .expect("parse");

    config["architecture"] = "arm64".into();
    config["variant"] = "v8".into();
    let config_bytes = serde_json::to_vec(&config).expect("serialize");
    let arm_config_digest = write_blob(&config_bytes);
    manifest["config"]["digest"] = arm_config_digest.into();
    manifest["config"]["size"] = config_bytes.len().into();
    let arm_manifest = serde_json::to_vec(&manifest).expect("serialize");
    let arm_digest = write_blob(&arm_manifest);

    let image_index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": amd64_digest, "size": amd64_size,
             "platform": {"os": "linux", "architecture": "amd64"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": arm_digest, "size": arm_manifest.len(),
             "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        ],
    });
    let index_bytes = serde_json::to_vec(&image_index).expect("serialize");
    let index_digest = write_blob(&index_bytes);
    let top = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json", "digest": index_digest, "size": index_bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": "latest"},
        }],
    });
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&top).expect("serialize"),
    )
    .expect("write index.json");
    (amd64_digest, arm_digest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_index_selects_platform() {
    let temp = tempfile::tempdir().expect("tempdir");
    let layout = temp.path().join("multi");
    let (amd64_digest, arm_digest) = build_two_platform_layout(&layout);
    let registry = LocalRegistry::start(None);
    registry.push(&layout, "multi", None, true);
    let options = options(&empty_auth_file(temp.path()));
    let reference = format!("{}/multi:latest", registry.host());

    let cases = [
        ("linux/amd64", &amd64_digest),
        ("linux/arm64", &arm_digest),
        ("linux/arm64/v8", &arm_digest),
    ];
    for (platform, expected) in cases {
        let platform = Platform::parse(platform).expect("valid platform");
        let from_registry = open(&reference, &options)
            .resolve(&platform)
            .await
            .expect("registry resolve");
        assert_eq!(
            &from_registry.manifest_digest, expected,
            "registry, {platform}"
        );
        let from_layout = open_oci_layout(&layout, Some("latest"))
            .expect("open layout")
            .resolve(&platform)
            .await
            .expect("layout resolve");
        assert_eq!(&from_layout.manifest_digest, expected, "layout, {platform}");
        assert_eq!(
            from_registry.layers, from_layout.layers,
            "layers, {platform}"
        );
    }

    let s390x = Platform::parse("linux/s390x").expect("valid platform");
    let error = open(&reference, &options)
        .resolve(&s390x)
        .await
        .expect_err("no s390x");
    let message = format!("{error:#}");
    assert!(message.contains("linux/amd64, linux/arm64/v8"), "{message}");
}

// A minimal HTTP/1.1 server: one request per connection, GET only.

#[derive(Clone, Debug)]
struct HttpRequest {
    target: String,
    headers: BTreeMap<String, String>,
}

struct HttpResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpResponse {
    fn new(status: u16) -> HttpResponse {
        HttpResponse {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    fn header(mut self, name: &str, value: &str) -> HttpResponse {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
}

type Handler = Arc<dyn Fn(HttpRequest) -> BoxFuture<'static, HttpResponse> + Send + Sync>;

async fn serve(address: &str, handler: Handler) -> SocketAddr {
    let listener = TcpListener::bind(address).await.expect("bind test server");
    let local = listener.local_addr().expect("local address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let handler = Arc::clone(&handler);
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buffer.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&buffer).to_string();
                let mut lines = text.split("\r\n");
                let request_line = lines.next().unwrap_or("");
                let target = request_line.split(' ').nth(1).unwrap_or("/").to_string();
                let headers = lines
                    .take_while(|line| !line.is_empty())
                    .filter_map(|line| line.split_once(':'))
                    .map(|(name, value)| {
                        (name.trim().to_ascii_lowercase(), value.trim().to_string())
                    })
                    .collect();
                let response = handler(HttpRequest { target, headers }).await;

                let mut head = format!("HTTP/1.1 {} X\r\n", response.status);
                for (name, value) in &response.headers {
                    head.push_str(&format!("{name}: {value}\r\n"));
                }
                head.push_str(&format!(
                    "Content-Length: {}\r\nConnection: close\r\n\r\n",
                    response.body.len()
                ));
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(&response.body).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    local
}

/// Forwards a GET (with Range and Accept) to the registry and copies back
/// the status, the headers a registry client reads and the body.
async fn proxy(upstream: &str, request: &HttpRequest) -> HttpResponse {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let mut outgoing = client.get(format!("http://{upstream}{}", request.target));
    for name in ["range", "accept"] {
        if let Some(value) = request.headers.get(name) {
            outgoing = outgoing.header(name, value);
        }
    }
    let Ok(answer) = outgoing.send().await else {
        return HttpResponse::new(502);
    };
    let mut response = HttpResponse::new(answer.status().as_u16());
    for name in [
        "content-type",
        "content-range",
        "docker-content-digest",
        "location",
    ] {
        if let Some(value) = answer.headers().get(name).and_then(|v| v.to_str().ok()) {
            response = response.header(name, value);
        }
    }
    response.body = answer.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_redirect_drops_authorization() {
    let registry = LocalRegistry::start(None);
    let layout = basic_layout();
    registry.push(&layout, "basic", None, false);
    let upstream = registry.host();

    // The blob host records what it receives and serves from the registry.
    let seen_by_blob_host: Arc<Mutex<Vec<HttpRequest>>> = Arc::default();
    let blob_host = {
        let seen = Arc::clone(&seen_by_blob_host);
        let upstream = upstream.clone();
        serve(
            "127.0.0.1:0",
            Arc::new(move |request: HttpRequest| {
                seen.lock().expect("lock").push(request.clone());
                let upstream = upstream.clone();
                Box::pin(async move { proxy(&upstream, &request).await })
            }),
        )
        .await
    };

    // The front registry requires Basic auth and redirects blob GETs to the
    // blob host, which is another host (127.0.0.1 against 127.0.0.2).
    let expected_auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("front-user:front-pass")
    );
    let seen_by_front: Arc<Mutex<Vec<HttpRequest>>> = Arc::default();
    let front = {
        let seen = Arc::clone(&seen_by_front);
        let upstream = upstream.clone();
        let expected_auth = expected_auth.clone();
        serve(
            "127.0.0.2:0",
            Arc::new(move |request: HttpRequest| {
                seen.lock().expect("lock").push(request.clone());
                let upstream = upstream.clone();
                let authorised = request.headers.get("authorization") == Some(&expected_auth);
                Box::pin(async move {
                    if !authorised {
                        return HttpResponse::new(401)
                            .header("WWW-Authenticate", r#"Basic realm="front""#);
                    }
                    if request.target.contains("/blobs/") {
                        let location = format!("http://{blob_host}{}", request.target);
                        return HttpResponse::new(307).header("Location", &location);
                    }
                    proxy(&upstream, &request).await
                })
            }),
        )
        .await
    };

    let temp = tempfile::tempdir().expect("tempdir");
    let options = options(&write_auth_file(
        temp.path(),
        &front.to_string(),
        "front-user",
        "front-pass",
    ));
    let source = open(&format!("{front}/basic:latest"), &options);
    let image = source
        .resolve(&amd64())
        .await
        .expect("resolve through the front");
    check_against_layout(source.as_ref(), &image, &layout).await;

    let blob_requests = seen_by_blob_host.lock().expect("lock").clone();
    assert!(
        blob_requests.len() >= 2,
        "config and footer reach the blob host: {blob_requests:?}"
    );
    for request in &blob_requests {
        assert!(
            !request.headers.contains_key("authorization"),
            "Authorization forwarded across hosts to {}",
            request.target
        );
    }
    let layer = &image.layers[0];
    let footer_range = format!("bytes={}-{}", layer.size - FOOTER_SIZE, layer.size - 1);
    assert!(
        blob_requests
            .iter()
            .any(|request| request.headers.get("range") == Some(&footer_range)),
        "Range kept across the redirect: {blob_requests:?}"
    );
    let front_requests = seen_by_front.lock().expect("lock").clone();
    assert!(
        front_requests
            .iter()
            .any(|request| request.headers.get("authorization") == Some(&expected_auth)),
        "the front saw the credentials"
    );
}

/// State of the in-test token server.
#[derive(Default)]
struct TokenState {
    /// Tokens issued so far; token N is `token-N`.
    issued: u32,
    /// Tokens below this number are rejected.
    first_valid: u32,
    /// `expires_in` of the next token.
    expires_in: u64,
    unauthorised: u32,
    scopes: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_bearer_token_flow() {
    let registry = LocalRegistry::start(None);
    let layout = basic_layout();
    registry.push(&layout, "basic", None, false);
    let upstream = registry.host();

    let state = Arc::new(Mutex::new(TokenState {
        expires_in: 300,
        ..TokenState::default()
    }));
    let port = free_port("127.0.0.1");
    let realm = format!("http://127.0.0.1:{port}/token");
    let token_credentials = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("bearer-user:bearer-pass")
    );
    let front = {
        let state = Arc::clone(&state);
        serve(
            &format!("127.0.0.1:{port}"),
            Arc::new(move |request: HttpRequest| {
                let state = Arc::clone(&state);
                let upstream = upstream.clone();
                let realm = realm.clone();
                let token_credentials = token_credentials.clone();
                Box::pin(async move {
                    if request.target.starts_with("/token") {
                        if request.headers.get("authorization") != Some(&token_credentials) {
                            return HttpResponse::new(401);
                        }
                        let mut state = state.lock().expect("lock");
                        state.issued += 1;
                        state.scopes.push(request.target.clone());
                        let mut response = HttpResponse::new(200).header("Content-Type", "application/json");
                        response.body = format!(
                            r#"{{"token":"token-{}","expires_in":{}}}"#,
                            state.issued, state.expires_in
                        )
                        .into_bytes();
                        return response;
                    }

                    let valid = {
                        let mut state = state.lock().expect("lock");
                        let number = request
                            .headers
                            .get("authorization")
                            .and_then(|value| value.strip_prefix("Bearer token-"))
                            .and_then(|n| n.parse::<u32>().ok());
                        let valid = number.is_some_and(|n| n >= state.first_valid && n <= state.issued);
                        if !valid {
                            state.unauthorised += 1;
                        }
                        valid
                    };
                    if !valid {
                        let challenge = format!(
                            r#"Bearer realm="{realm}",service="esgz-test",scope="repository:basic:pull""#
                        );
                        return HttpResponse::new(401).header("WWW-Authenticate", &challenge);
                    }
                    proxy(&upstream, &request).await
                })
            }),
        )
        .await
    };

    let temp = tempfile::tempdir().expect("tempdir");
    let good = options(&write_auth_file(
        temp.path(),
        &front.to_string(),
        "bearer-user",
        "bearer-pass",
    ));
    let source = open(&format!("{front}/basic:latest"), &good);
    let image = source
        .resolve(&amd64())
        .await
        .expect("resolve with a bearer token");
    check_against_layout(source.as_ref(), &image, &layout).await;
    let layer = &image.layers[0];
    let blob = source.blob(layer).expect("blob");
    for offset in [0, 1000, 5000] {
        blob.read_range(offset, 100)
            .await
            .expect("read with the cached token");
    }
    {
        let state = state.lock().expect("lock");
        assert_eq!(state.issued, 1, "one token reused for every request");
        assert_eq!(
            state.unauthorised, 1,
            "only the first, anonymous request got 401"
        );
        assert!(
            state.scopes[0].contains("service=esgz-test"),
            "{:?}",
            state.scopes
        );
        assert!(
            state.scopes[0].contains("scope=repository%3Abasic%3Apull"),
            "{:?}",
            state.scopes
        );
    }

    // The server revokes the token: one 401, one new token, then success.
    {
        let mut state = state.lock().expect("lock");
        state.first_valid = state.issued + 1;
        state.expires_in = 1;
    }
    blob.read_range(0, 100)
        .await
        .expect("read after revocation");
    {
        let state = state.lock().expect("lock");
        assert_eq!(state.issued, 2, "a new token after the 401");
        assert_eq!(state.unauthorised, 2, "one more 401");
    }

    // Token 2 lives 1 s: after it expires the client fetches a new one
    // before sending the request, so no 401 happens.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    blob.read_range(0, 100).await.expect("read after expiry");
    {
        let state = state.lock().expect("lock");
        assert_eq!(state.issued, 3, "a fresh token after expiry");
        assert_eq!(state.unauthorised, 2, "no 401 for the expired token");
    }

    // Wrong credentials: the token server returns 401.
    let bad_dir = tempfile::tempdir().expect("tempdir");
    let bad = options(&write_auth_file(
        bad_dir.path(),
        &front.to_string(),
        "bearer-user",
        "nope",
    ));
    let error = open(&format!("{front}/basic:latest"), &bad)
        .resolve(&amd64())
        .await
        .expect_err("token server rejects the credentials");
    let message = format!("{error:#}");
    assert!(message.contains("token request"), "{message}");
    assert!(message.contains("docker login"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_retries_transient_errors() {
    let registry = LocalRegistry::start(None);
    let layout = basic_layout();
    registry.push(&layout, "basic", None, false);
    let upstream = registry.host();

    // The front fails each distinct request once with 503, then proxies.
    let failed_once: Arc<Mutex<Vec<String>>> = Arc::default();
    let front = {
        let failed_once = Arc::clone(&failed_once);
        serve(
            "127.0.0.1:0",
            Arc::new(move |request: HttpRequest| {
                let upstream = upstream.clone();
                let key = format!("{} {:?}", request.target, request.headers.get("range"));
                let first_time = {
                    let mut failed = failed_once.lock().expect("lock");
                    let first_time = !failed.contains(&key);
                    if first_time {
                        failed.push(key);
                    }
                    first_time
                };
                Box::pin(async move {
                    if first_time {
                        return HttpResponse::new(503).header("Retry-After", "0");
                    }
                    proxy(&upstream, &request).await
                })
            }),
        )
        .await
    };

    let temp = tempfile::tempdir().expect("tempdir");
    let flaky = options(&empty_auth_file(temp.path()));
    let source = open(&format!("{front}/basic:latest"), &flaky);
    let image = source
        .resolve(&amd64())
        .await
        .expect("resolve despite 503s");
    check_against_layout(source.as_ref(), &image, &layout).await;
    assert!(
        failed_once.lock().expect("lock").len() >= 3,
        "manifest, config and footer each failed once"
    );

    // Without retries the first 503 is final, and the message names the status.
    let no_retries = RegistryOptions {
        retries: 0,
        ..flaky.clone()
    };
    let layer = &image.layers[0];
    let blob = open(&format!("{front}/basic:latest"), &no_retries)
        .blob(layer)
        .expect("blob");
    let error = blob
        .read_range(10, 20)
        .await
        .expect_err("503 without retries");
    let message = format!("{error:#}");
    assert!(message.contains("HTTP 503"), "{message}");
    assert!(message.contains("bytes 10-29"), "{message}");
    assert!(message.contains(&layer.digest), "{message}");
}
