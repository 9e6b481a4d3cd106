//! Running `esgz-nbd serve` as a child process for a test.

use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::esgz_bin;

/// How long a test waits for the server to open its socket.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// A running `esgz-nbd serve` on a unix socket in a temporary folder; Drop
/// stops it with SIGTERM (SIGKILL after 10 s).
pub struct Server {
    child: Option<Child>,
    dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Server {
    /// Starts `esgz-nbd serve IMAGE` with its own cache folder and `extra` arguments.
    pub fn start(image: &str, extra: &[&str]) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("esgz-serve-")
            .tempdir()
            .expect("creating the server's temp folder");
        Self::start_in(image, extra, dir)
    }

    /// Like [`Server::start`] but reusing a prepared folder (for example, one
    /// whose `cache/` holds an earlier run's cache).
    pub fn start_in(image: &str, extra: &[&str], dir: tempfile::TempDir) -> Server {
        let socket = dir.path().join("nbd.sock");
        let log = fs::File::create(dir.path().join("serve.log")).expect("creating the server log");
        let mut command = Command::new(esgz_bin());
        command
            .arg("serve")
            .arg(image)
            .arg("--socket")
            .arg(&socket)
            .arg("--cache-dir")
            .arg(dir.path().join("cache"))
            .arg("--stats-file")
            .arg(dir.path().join("stats.json"))
            .args(extra)
            .env("RUST_LOG", "esgz_nbd=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = command.spawn().expect("starting esgz-nbd serve");
        let mut server = Server {
            child: Some(child),
            dir,
            socket,
        };
        server.wait_until_ready();
        server
    }

    fn wait_until_ready(&mut self) {
        let started = Instant::now();
        loop {
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "esgz-nbd serve exited with {status} before it was ready; log:\n{}",
                        self.log()
                    );
                }
            }
            assert!(
                started.elapsed() < READY_TIMEOUT,
                "esgz-nbd serve did not open {} within {READY_TIMEOUT:?}; log:\n{}",
                self.socket.display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Process id of the running server; `None` once it was stopped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    /// Returns the server's counters, as last written to its stats file.
    pub fn stats(&self) -> Value {
        // The file is rewritten every second; wait for a fresh copy.
        std::thread::sleep(Duration::from_millis(1200));
        let text = fs::read_to_string(self.dir.path().join("stats.json"))
            .unwrap_or_else(|error| panic!("reading stats.json: {error}; log:\n{}", self.log()));
        serde_json::from_str(&text).expect("stats.json is JSON")
    }

    /// Stops the server and returns its folder and log.
    pub fn stop(mut self) -> (tempfile::TempDir, String) {
        self.terminate();
        let log = self.log();
        let dir = tempfile::Builder::new().tempdir().expect("temp dir");
        let kept = std::mem::replace(&mut self.dir, dir);
        (kept, log)
    }

    fn terminate(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: kill with a valid signal number on our own child's pid.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.terminate();
    }
}
