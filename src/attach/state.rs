//! Per-device state files of attached images: one JSON file per NBD device
//! in the runtime directory, mode 0600 in a 0700 directory.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Default runtime directory when running as root.
pub const DEFAULT_RUNTIME_DIR: &str = "/run/esgz-nbd";

/// How the kernel was handed the sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interface {
    Netlink,
    Ioctl,
}

/// What the state file of one attached device records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// Device path, `/dev/nbdN`.
    pub device: String,
    pub index: u32,
    /// The image argument as given, without credentials.
    pub image: String,
    pub manifest_digest: String,
    /// `NBD_ATTR_BACKEND_IDENTIFIER`, which the kernel compares on reconfigure.
    pub backend: String,
    /// Process id of the server.
    pub pid: u32,
    /// `ro` (read-only), or `rw` for a writable device with an overlay.
    pub mode: String,
    /// The overlay file of a writable device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<PathBuf>,
    /// Whether the overlay is temporary: removed when the device is detached.
    #[serde(default)]
    pub overlay_temporary: bool,
    /// Free space added to a writable filesystem, in bytes; a reattach needs
    /// it to rebuild the same layout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub added_bytes: Option<u64>,
    pub interface: Interface,
    pub connections: u32,
    pub cache_dir: PathBuf,
    /// How the server reaches the kernel: `socketpair` (one per connection).
    pub socket: String,
    pub size_bytes: u64,
    pub timeout_secs: u64,
    pub dead_conn_timeout_secs: u64,
    pub stats_file: PathBuf,
    pub log_file: Option<PathBuf>,
    /// Unix time in seconds when the server attached (or reattached).
    pub attached_at: u64,
    /// Milliseconds from the start of `attach` to the first read of the device.
    pub attach_ms: u64,
    /// Bound address of the server's Prometheus endpoint (`--metrics-addr`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<String>,
}

/// Paths of one runtime directory.
#[derive(Clone, Debug)]
pub struct RuntimeDir {
    pub dir: PathBuf,
}

impl RuntimeDir {
    pub fn new(dir: impl Into<PathBuf>) -> RuntimeDir {
        RuntimeDir { dir: dir.into() }
    }

    /// Creates the directory with mode 0700 (and tightens an existing one).
    pub fn create(&self) -> io::Result<()> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))
    }

    pub fn state_path(&self, index: u32) -> PathBuf {
        self.dir.join(format!("nbd{index}.json"))
    }

    pub fn stats_path(&self, index: u32) -> PathBuf {
        self.dir.join(format!("nbd{index}.stats.json"))
    }

    pub fn log_path(&self, index: u32) -> PathBuf {
        self.dir.join(format!("nbd{index}.log"))
    }

    /// Writes the state file atomically with mode 0600.
    pub fn write(&self, state: &DeviceState) -> io::Result<()> {
        let path = self.state_path(state.index);
        let staging = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(state).map_err(io::Error::other)?;
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&staging)?;
        file.write_all(&text)?;
        file.sync_all()?;
        fs::rename(&staging, &path)
    }

    /// Reads the state of device `index`; `Ok(None)` when it has no state file.
    pub fn read(&self, index: u32) -> Result<Option<DeviceState>, StateError> {
        let path = self.state_path(index);
        let text = match fs::read(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Read { path, source }),
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|source| StateError::Parse { path, source })
    }

    /// Lists the state files in the directory, sorted by device index.
    pub fn list(&self) -> Result<Vec<Result<DeviceState, StateError>>, StateError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(StateError::Read {
                    path: self.dir.clone(),
                    source,
                })
            }
        };
        let mut indexes: Vec<u32> = entries
            .filter_map(|entry| entry.ok())
            .filter_map(|entry| parse_state_name(&entry.file_name().to_string_lossy()))
            .collect();
        indexes.sort_unstable();
        Ok(indexes
            .into_iter()
            .filter_map(|index| self.read(index).transpose())
            .collect())
    }

    /// Removes the state and stats files of device `index`, if they belong to
    /// `pid` (or unconditionally when `pid` is `None`).
    pub fn remove(&self, index: u32, pid: Option<u32>) -> io::Result<bool> {
        if let Some(pid) = pid {
            match self.read(index) {
                Ok(Some(state)) if state.pid != pid => return Ok(false),
                Ok(None) => return Ok(false),
                _ => {}
            }
        }
        for path in [self.state_path(index), self.stats_path(index)] {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => return Err(error),
            }
        }
        Ok(true)
    }
}

/// Returns N for a file named `nbdN.json`.
fn parse_state_name(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("nbd")?.strip_suffix(".json")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A state file that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("failed to read state {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid state file {}: {source}; remove it if no server is running for that device", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Returns N for a device path `/dev/nbdN` (or a bare `nbdN`).
pub fn parse_device(path: &Path) -> Option<u32> {
    let text = path.to_str()?;
    let name = text.strip_prefix("/dev/").unwrap_or(text);
    let digits = name.strip_prefix("nbd")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.len() > 9 {
        return None;
    }
    digits.parse().ok()
}

/// A read-only device state for tests of the modules that read state files.
#[cfg(test)]
pub(crate) fn sample_state(index: u32, pid: u32) -> DeviceState {
    DeviceState {
        device: format!("/dev/nbd{index}"),
        index,
        image: "oci:/images/app".into(),
        manifest_digest: "sha256:00".into(),
        backend: "esgz-nbd:sha256:00".into(),
        pid,
        mode: "ro".into(),
        overlay: None,
        overlay_temporary: false,
        added_bytes: None,
        interface: Interface::Netlink,
        connections: 2,
        cache_dir: "/var/cache/esgz-nbd".into(),
        socket: "socketpair".into(),
        size_bytes: 1 << 20,
        timeout_secs: 30,
        dead_conn_timeout_secs: 60,
        stats_file: "/run/esgz-nbd/nbd0.stats.json".into(),
        log_file: None,
        attached_at: 1,
        attach_ms: 2,
        metrics_addr: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names() {
        let cases = [
            ("/dev/nbd0", Some(0)),
            ("/dev/nbd15", Some(15)),
            ("nbd3", Some(3)),
            ("/dev/nbd", None),
            ("/dev/nbd1p1", None),
            ("/dev/sda", None),
            ("/dev/nbd-1", None),
            ("/dev/nbd99999999999", None),
        ];
        for (path, expected) in cases {
            assert_eq!(parse_device(Path::new(path)), expected, "{path}");
        }
    }

    #[test]
    fn state_file_names() {
        let cases = [
            ("nbd0.json", Some(0)),
            ("nbd12.json", Some(12)),
            ("nbd0.stats.json", None),
            ("nbd0.json.tmp", None),
            ("nbd.json", None),
        ];
        for (name, expected) in cases {
            assert_eq!(parse_state_name(name), expected, "{name}");
        }
    }

    #[test]
    fn write_read_list_remove() {
        let temp = tempfile::tempdir().unwrap();
        let runtime = RuntimeDir::new(temp.path().join("run"));
        runtime.create().unwrap();
        let mode = fs::metadata(&runtime.dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);

        runtime.write(&sample_state(2, 10)).unwrap();
        runtime.write(&sample_state(0, 11)).unwrap();
        let file_mode = fs::metadata(runtime.state_path(2))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(file_mode, 0o600);
        assert_eq!(runtime.read(2).unwrap(), Some(sample_state(2, 10)));

        let listed: Vec<u32> = runtime
            .list()
            .unwrap()
            .into_iter()
            .map(|s| s.unwrap().index)
            .collect();
        assert_eq!(listed, [0, 2]);

        assert!(
            !runtime.remove(2, Some(99)).unwrap(),
            "another pid's state stays"
        );
        assert!(runtime.read(2).unwrap().is_some());
        assert!(runtime.remove(2, Some(10)).unwrap());
        assert_eq!(runtime.read(2).unwrap(), None);
    }

    #[test]
    fn writable_state_round_trip() {
        let temp = tempfile::tempdir().unwrap();
        let runtime = RuntimeDir::new(temp.path());
        let state = DeviceState {
            mode: "rw".into(),
            overlay: Some("/data/overlay.img".into()),
            overlay_temporary: true,
            added_bytes: Some(1 << 30),
            ..sample_state(4, 12)
        };
        runtime.write(&state).unwrap();
        assert_eq!(runtime.read(4).unwrap(), Some(state));
    }

    #[test]
    fn state_without_overlay_fields_parses() {
        let mut json = serde_json::to_value(sample_state(1, 5)).unwrap();
        let object = json.as_object_mut().unwrap();
        object.remove("overlay_temporary");
        assert!(!object.contains_key("overlay"));
        let state: DeviceState = serde_json::from_value(json).unwrap();
        assert_eq!(state, sample_state(1, 5));
    }
}
