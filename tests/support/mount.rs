//! Read-only ext4 mounts through the host kernel (an NBD export via nbdfuse and
//! a loop device, or an image file via a loop device) and e2fsck checks.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use super::command::{describe, run, run_stdout, try_run};

/// How long nbdfuse may take to connect and write its PID file.
const NBDFUSE_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How often teardown retries a step that fails with "busy". The kernel may
/// keep a mount or loop device busy for a moment after the last reader closes it.
const TEARDOWN_ATTEMPTS: u32 = 50;
const TEARDOWN_RETRY_DELAY: Duration = Duration::from_millis(100);

/// Runs `e2fsck -fn` on an image and panics with its output unless it exits 0
/// (no errors found, nothing changed).
pub fn e2fsck_clean(image: &Path) {
    let output = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .unwrap_or_else(|error| {
            panic!("e2fsck could not start (apt-get install e2fsprogs): {error}")
        });
    assert!(
        output.status.success(),
        "e2fsck -fn {} exited with {}\nstdout:\n{}\nstderr:\n{}",
        image.display(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// An ext4 image file mounted read-only through a loop device. Dropping it
/// unmounts and detaches, and panics if either step fails.
pub struct LoopMount {
    mounted: Mounted,
}

impl LoopMount {
    /// Attaches `image` read-only to a free loop device and mounts it.
    pub fn new(image: &Path) -> LoopMount {
        let mut mounted = Mounted::new("loop");
        mounted.attach_and_mount(image, ReadAhead::Kernel);
        LoopMount { mounted }
    }

    /// Returns the mount point, the root of the image's tree.
    pub fn path(&self) -> &Path {
        self.mounted.mount_point()
    }

    /// Returns the loop device, such as `/dev/loop3`.
    pub fn loop_device(&self) -> &Path {
        self.mounted.loop_device()
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let errors = self.mounted.tear_down();
        report_teardown("LoopMount", &errors);
    }
}

/// An NBD export on a unix socket, shown as a file by nbdfuse, attached to a
/// loop device and mounted read-only as ext4. The host kernel has no NBD
/// driver, so this is how tests put the kernel's ext4 on top of an NBD
/// server. Dropping it unmounts, detaches, stops nbdfuse, and panics if any
/// step fails.
pub struct NbdMount {
    // Torn down before nbdfuse, because the loop device reads through it.
    mounted: Mounted,
    nbdfuse: Option<Child>,
    fuse_dir: PathBuf,
    log: PathBuf,
}

impl NbdMount {
    /// Connects to the default export (the empty name) of the NBD server on
    /// `socket_path`.
    pub fn new(socket_path: &Path) -> NbdMount {
        NbdMount::with_export(socket_path, "")
    }

    /// Like [`NbdMount::new`], but without read-ahead: the loop device reads
    /// the nbdfuse file with direct I/O and its own read-ahead is 0, so the
    /// server sees the blocks the filesystem asks for and no neighbours.
    pub fn unbuffered(socket_path: &Path) -> NbdMount {
        NbdMount::start(socket_path, "", ReadAhead::Off)
    }

    /// Connects to the export `export_name` of the NBD server on `socket_path`.
    pub fn with_export(socket_path: &Path, export_name: &str) -> NbdMount {
        NbdMount::start(socket_path, export_name, ReadAhead::Kernel)
    }

    fn start(socket_path: &Path, export_name: &str, read_ahead: ReadAhead) -> NbdMount {
        let mounted = Mounted::new("nbd");
        let fuse_dir = mounted.work_dir().join("fuse");
        let log = mounted.work_dir().join("nbdfuse.log");
        let pid_file = mounted.work_dir().join("nbdfuse.pid");
        fs::create_dir(&fuse_dir).expect("creating the nbdfuse mount point");
        let disk = fuse_dir.join("disk");

        let log_file = fs::File::create(&log).expect("creating the nbdfuse log");
        let mut command = Command::new("nbdfuse");
        command
            .arg("--readonly")
            .arg("--pidfile")
            .arg(&pid_file)
            .arg(&disk)
            .arg(format!(
                "nbd+unix:///{}?socket={}",
                percent_encode(export_name.as_bytes()),
                percent_encode(socket_path.as_os_str().as_encoded_bytes())
            ))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("duplicating the log handle"))
            .stderr(log_file);
        let line = describe(&command);
        let child = command.spawn().unwrap_or_else(|error| {
            panic!("`{line}` could not start (apt-get install libnbd-bin fuse3): {error}")
        });
        let mut mount = NbdMount {
            mounted,
            nbdfuse: Some(child),
            fuse_dir,
            log,
        };

        mount.wait_until_ready(&pid_file, &line);
        mount.mounted.attach_and_mount(&disk, read_ahead);
        mount
    }

    /// Returns the mount point, the root of the export's tree.
    pub fn path(&self) -> &Path {
        self.mounted.mount_point()
    }

    /// Returns the file through which nbdfuse shows the export.
    pub fn device_file(&self) -> PathBuf {
        self.fuse_dir.join("disk")
    }

    /// Returns the loop device, such as `/dev/loop3`.
    pub fn loop_device(&self) -> &Path {
        self.mounted.loop_device()
    }

    fn wait_until_ready(&mut self, pid_file: &Path, line: &str) {
        let deadline = Instant::now() + NBDFUSE_READY_TIMEOUT;
        loop {
            let pid = fs::read_to_string(pid_file).unwrap_or_default();
            if !pid.trim().is_empty() {
                return;
            }
            if let Some(child) = self.nbdfuse.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.nbdfuse = None;
                    panic!(
                        "`{line}` exited with {status} before it was ready; its output:\n{}",
                        self.log_text()
                    );
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "`{line}` did not write its PID file within {NBDFUSE_READY_TIMEOUT:?}; its output:\n{}",
                    self.log_text()
                );
            }
            sleep(Duration::from_millis(20));
        }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_else(|error| format!("(log unreadable: {error})"))
    }

    fn stop_nbdfuse(&mut self) -> Result<(), String> {
        let Some(mut child) = self.nbdfuse.take() else {
            return Ok(());
        };
        // nbdfuse exits once its mount point is unmounted; killing it instead
        // would leave a dead FUSE mount behind.
        let unmounted =
            retry_while_busy(|| try_run(Command::new("fusermount3").arg("-u").arg(&self.fuse_dir)));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => sleep(Duration::from_millis(20)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let _ = Command::new("umount")
                        .arg("-l")
                        .arg(&self.fuse_dir)
                        .status();
                    return Err(format!(
                        "nbdfuse did not exit within 10 s after fusermount3 -u {} and was killed; unmount: {unmounted:?}; its output:\n{}",
                        self.fuse_dir.display(),
                        self.log_text()
                    ));
                }
            }
        }
        unmounted.map(|_| ())
    }
}

impl Drop for NbdMount {
    fn drop(&mut self) {
        let mut errors = self.mounted.tear_down();
        if let Err(error) = self.stop_nbdfuse() {
            errors.push(error);
        }
        report_teardown("NbdMount", &errors);
    }
}

/// The loop device and ext4 mount that both mount kinds share. A private temp
/// folder contains the mount point.
/// Read-ahead of the loop device under a mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadAhead {
    /// The kernel's defaults: buffered reads of the backing file.
    Kernel,
    /// Direct I/O on the backing file and no device read-ahead.
    Off,
}

struct Mounted {
    work: Option<tempfile::TempDir>,
    mount_point: PathBuf,
    loop_device: Option<PathBuf>,
    is_mounted: bool,
    is_torn_down: bool,
}

impl Mounted {
    fn new(kind: &str) -> Mounted {
        let work = tempfile::Builder::new()
            .prefix(&format!("esgz-{kind}-mount-"))
            .tempdir()
            .expect("creating a temp folder for the mount");
        let mount_point = work.path().join("mnt");
        fs::create_dir(&mount_point).expect("creating the mount point");
        Mounted {
            work: Some(work),
            mount_point,
            loop_device: None,
            is_mounted: false,
            is_torn_down: false,
        }
    }

    fn work_dir(&self) -> &Path {
        self.work
            .as_ref()
            .map(tempfile::TempDir::path)
            .unwrap_or(Path::new("/nonexistent"))
    }

    fn mount_point(&self) -> &Path {
        &self.mount_point
    }

    fn loop_device(&self) -> &Path {
        self.loop_device
            .as_deref()
            .unwrap_or(Path::new("/dev/null"))
    }

    /// Attaches `file` read-only to a free loop device and mounts that device
    /// as ext4. `noload` skips journal replay, which a read-only device cannot
    /// take.
    fn attach_and_mount(&mut self, file: &Path, read_ahead: ReadAhead) {
        let mut losetup = Command::new("losetup");
        losetup.args(["--find", "--show", "--read-only"]);
        if read_ahead == ReadAhead::Off {
            losetup.arg("--direct-io=on");
        }
        let device = run_stdout(losetup.arg(file));
        self.loop_device = Some(PathBuf::from(device));
        if read_ahead == ReadAhead::Off {
            run(Command::new("blockdev")
                .args(["--setra", "0"])
                .arg(self.loop_device()));
        }
        run(Command::new("mount")
            .args(["-t", "ext4", "-o", "ro,noload"])
            .arg(self.loop_device())
            .arg(&self.mount_point));
        self.is_mounted = true;
    }

    /// Unmounts and detaches, in reverse order of setup, and returns what
    /// failed. Keeps the temp folder when a step failed, so that removing it
    /// cannot descend into a mount that is still there.
    fn tear_down(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.is_torn_down {
            return errors;
        }
        self.is_torn_down = true;
        if self.is_mounted {
            match retry_while_busy(|| try_run(Command::new("umount").arg(&self.mount_point))) {
                Ok(_) => self.is_mounted = false,
                Err(error) => errors.push(error),
            }
        }
        if let Some(device) = self.loop_device.take() {
            if self.is_mounted {
                errors.push(format!(
                    "{} left attached because its mount remains",
                    device.display()
                ));
            } else if let Err(error) =
                retry_while_busy(|| try_run(Command::new("losetup").arg("--detach").arg(&device)))
            {
                errors.push(error);
            }
        }
        if !errors.is_empty() {
            if let Some(work) = self.work.take() {
                let kept_dir = work.keep();
                errors.push(format!("kept {} for inspection", kept_dir.display()));
            }
        }
        errors
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // The owner calls `tear_down` first, so this does work only when
        // setup panicked before the owner existed.
        let errors = self.tear_down();
        report_teardown("mount", &errors);
    }
}

/// Percent-encodes every byte except RFC 3986 unreserved characters and `/`,
/// for the export name and socket path in an NBD URI.
fn percent_encode(bytes: &[u8]) -> String {
    let mut encoded = String::with_capacity(bytes.len());
    for &byte in bytes {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// Retries a command while its error message reports the target as busy.
fn retry_while_busy<T>(mut step: impl FnMut() -> Result<T, String>) -> Result<T, String> {
    let mut attempt = 1;
    loop {
        match step() {
            Ok(value) => return Ok(value),
            Err(error) if attempt < TEARDOWN_ATTEMPTS && error.to_lowercase().contains("busy") => {
                attempt += 1;
                sleep(TEARDOWN_RETRY_DELAY);
            }
            Err(error) => return Err(error),
        }
    }
}

/// Panics with the teardown errors, or prints them when the thread is already
/// panicking (a second panic would abort the test binary and hide the first).
fn report_teardown(owner: &str, errors: &[String]) {
    if errors.is_empty() {
        return;
    }
    let message = format!("{owner} teardown failed:\n{}", errors.join("\n"));
    if std::thread::panicking() {
        eprintln!("{message}");
    } else {
        panic!("{message}");
    }
}
