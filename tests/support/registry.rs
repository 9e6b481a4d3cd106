//! A throwaway Debian `docker-registry` (distribution v2 API) on 127.0.0.1,
//! started through the shared `scripts/start-registry.sh`, and pushes with
//! skopeo.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use base64::Engine as _;

use super::command::{run, run_stdout, try_run};
use super::shared_dir;

/// Attempts to start the registry; another process may take the free port
/// between the probe and the registry's bind.
const START_ATTEMPTS: u32 = 5;

/// A running registry. Dropping it stops the process and removes its storage.
pub struct Registry {
    pid: u32,
    port: u16,
    credentials: Option<(String, String)>,
    // Holds the htpasswd file of `start_with_auth` for the registry's lifetime.
    auth_dir: Option<tempfile::TempDir>,
    // Dropped after the process is stopped, see `Drop`.
    storage: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry on a free loopback port. With `htpasswd` (a bcrypt
    /// file, as `htpasswd -Bbn` writes) the registry requires basic auth.
    pub fn start(htpasswd: Option<&Path>) -> Registry {
        let storage = tempfile::Builder::new()
            .prefix("esgz-registry-")
            .tempdir()
            .expect("creating the registry storage folder in the temp dir");
        let script = shared_dir().join("scripts/start-registry.sh");
        assert!(script.is_file(), "{} not found", script.display());

        let mut errors = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            let mut command = Command::new(&script);
            command
                .arg(port.to_string())
                .arg(storage.path().join("registry"));
            if let Some(file) = htpasswd {
                command.arg(file);
            }
            match try_run(&mut command) {
                Ok(output) => {
                    let stdout = String::from_utf8_lossy(&output.stdout);
                    let pid = stdout.trim().parse::<u32>().unwrap_or_else(|_| {
                        panic!("start-registry.sh printed {stdout:?}, expected the registry PID")
                    });
                    return Registry {
                        pid,
                        port,
                        credentials: None,
                        auth_dir: None,
                        storage,
                    };
                }
                Err(message) => errors.push(message),
            }
        }
        panic!(
            "the registry did not start in {START_ATTEMPTS} attempts:\n{}",
            errors.join("\n")
        );
    }

    /// Starts a registry that requires basic auth with one user.
    pub fn start_with_auth(user: &str, password: &str) -> Registry {
        let folder = tempfile::Builder::new()
            .prefix("esgz-htpasswd-")
            .tempdir()
            .expect("creating a temp folder for the htpasswd file");
        let file = folder.path().join("htpasswd");
        run(Command::new("htpasswd")
            .args(["-Bbc"])
            .arg(&file)
            .args([user, password]));
        let mut registry = Registry::start(Some(&file));
        registry.credentials = Some((user.to_string(), password.to_string()));
        registry.auth_dir = Some(folder);
        registry
    }

    /// Returns `127.0.0.1:PORT`, the host part of image references.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Returns the user and password when the registry requires auth.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.credentials
            .as_ref()
            .map(|(user, password)| (user.as_str(), password.as_str()))
    }

    /// Returns the registry's log file (access log and errors).
    pub fn log_path(&self) -> PathBuf {
        self.storage.path().join("registry/registry.log")
    }

    fn is_running(&self) -> bool {
        Command::new("kill")
            .args(["-0", &self.pid.to_string()])
            .stderr(std::process::Stdio::null())
            .status()
            .map(|status| status.success())
            .unwrap_or(false)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        // The script backgrounds the registry, so it is not our child and
        // cannot be waited for: send SIGTERM, then poll until it is gone.
        let _ = Command::new("kill").arg(self.pid.to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.is_running() && Instant::now() < deadline {
            sleep(Duration::from_millis(50));
        }
        if self.is_running() {
            let _ = Command::new("kill")
                .args(["-KILL", &self.pid.to_string()])
                .status();
            let message = format!(
                "registry PID {} on port {} ignored SIGTERM for 10 s and got SIGKILL",
                self.pid, self.port
            );
            if std::thread::panicking() {
                eprintln!("{message}");
            } else {
                panic!("{message}");
            }
        }
    }
}

/// Returns a loopback TCP port that was free a moment ago.
fn free_port() -> u16 {
    let listener =
        TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0 to find a free port");
    listener
        .local_addr()
        .expect("reading the bound address")
        .port()
}

/// Returns whether something accepts TCP connections on the loopback port.
pub fn port_is_open(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Copies the image `oci:OCI_DIR:TAG` to `REGISTRY/REPO:TAG` with skopeo and
/// returns that reference. Uses the registry's credentials when it has any.
/// skopeo keeps manifests and blobs byte-identical, so eStargz annotations
/// and digests survive the push.
pub fn skopeo_push(oci_dir: &Path, tag: &str, registry: &Registry, repo: &str) -> String {
    let reference = format!("{}/{repo}:{tag}", registry.addr());
    let mut command = Command::new("skopeo");
    command.args(["copy", "--quiet", "--dest-tls-verify=false"]);
    if let Some((user, password)) = registry.credentials() {
        command.arg(format!("--dest-creds={user}:{password}"));
    }
    command
        .arg(format!("oci:{}:{tag}", oci_dir.display()))
        .arg(format!("docker://{reference}"));
    run(&mut command);
    reference
}

/// Returns the manifest digest that the registry serves for a reference.
pub fn skopeo_manifest_digest(reference: &str, registry: &Registry) -> String {
    let mut command = Command::new("skopeo");
    command.args(["inspect", "--tls-verify=false", "--format", "{{.Digest}}"]);
    if let Some((user, password)) = registry.credentials() {
        command.arg(format!("--creds={user}:{password}"));
    }
    command.arg(format!("docker://{reference}"));
    run_stdout(&mut command)
}

/// Writes a Docker config.json holding `user:password` for `host`.
pub fn write_docker_config(dir: &Path, host: &str, user: &str, password: &str) -> PathBuf {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let config = serde_json::json!({"auths": {host: {"auth": auth}}});
    let path = dir.join("config.json");
    fs::write(
        &path,
        serde_json::to_vec(&config).expect("encoding config.json"),
    )
    .expect("writing config.json");
    path
}

/// Uploads the image `oci:OCI_DIR:latest` (one manifest, no index) to
/// `REGISTRY/REPO:latest` with plain distribution API requests and returns that
/// reference. Unlike [`skopeo_push`], which gzips uncompressed layers on the way to a
/// registry, every blob and the manifest arrive byte for byte.
pub fn push_layout_unchanged(oci_dir: &Path, registry: &Registry, repo: &str) -> String {
    let index: serde_json::Value = serde_json::from_slice(
        &fs::read(oci_dir.join("index.json")).expect("reading the layout's index.json"),
    )
    .expect("index.json is JSON");
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .expect("index.json names a manifest")
        .to_string();
    let blob = |digest: &str| {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        fs::read(oci_dir.join("blobs/sha256").join(hex))
            .unwrap_or_else(|error| panic!("reading blob {digest}: {error}"))
    };
    let manifest_bytes = blob(&manifest_digest);
    let manifest: serde_json::Value =
        serde_json::from_slice(&manifest_bytes).expect("the manifest is JSON");
    let mut digests = vec![manifest["config"]["digest"]
        .as_str()
        .expect("the manifest names a config")
        .to_string()];
    for layer in manifest["layers"]
        .as_array()
        .expect("the manifest lists layers")
    {
        digests.push(
            layer["digest"]
                .as_str()
                .expect("a layer digest")
                .to_string(),
        );
    }

    let base = format!("http://{}/v2/{repo}", registry.addr());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building a runtime for the upload");
    runtime.block_on(async {
        let http = reqwest::Client::new();
        for digest in &digests {
            let started = http
                .post(format!("{base}/blobs/uploads/"))
                .send()
                .await
                .expect("starting a blob upload");
            assert_eq!(
                started.status().as_u16(),
                202,
                "starting the upload of {digest}"
            );
            let location = started
                .headers()
                .get("location")
                .and_then(|value| value.to_str().ok())
                .expect("the upload answer has a Location")
                .to_string();
            let url = if location.starts_with('/') {
                format!("http://{}{location}", registry.addr())
            } else {
                location
            };
            let separator = if url.contains('?') { '&' } else { '?' };
            let finished = http
                .put(format!("{url}{separator}digest={digest}"))
                .header("content-type", "application/octet-stream")
                .body(blob(digest))
                .send()
                .await
                .expect("uploading a blob");
            assert_eq!(finished.status().as_u16(), 201, "uploading {digest}");
        }
        let media_type = manifest["mediaType"]
            .as_str()
            .unwrap_or("application/vnd.oci.image.manifest.v1+json");
        let put = http
            .put(format!("{base}/manifests/latest"))
            .header("content-type", media_type)
            .body(manifest_bytes)
            .send()
            .await
            .expect("uploading the manifest");
        assert_eq!(put.status().as_u16(), 201, "uploading the manifest");
    });
    format!("{}/{repo}:latest", registry.addr())
}
