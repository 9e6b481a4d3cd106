//! Attaching images to kernel NBD devices (`/dev/nbdN`): socket pairs handed
//! to the kernel through the `nbd` generic netlink family (Linux
//! `nbd-netlink.h`) or the older ioctls, a server for the other ends, and the
//! state files that `detach` and `list` read.
//!
//! The kernel client does no handshake, so the server speaks only the
//! transmission phase on each socket ([`crate::nbd::serve_transmission`]).
//! After a server dies, `NBD_CMD_RECONFIGURE` hands the kernel new sockets for
//! the same device; the kernel holds new requests for the dead-connection
//! timeout and requeues in-flight ones after the request timeout, so readers
//! see a delay rather than an error.

pub mod daemon;
pub mod disk;
pub mod ioctl;
pub mod manifest;
pub mod netlink;
mod server;
pub mod state;

use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::nbd::proto::transmission_flags as tf;
use netlink::{NbdNetlink, NetlinkError};
use state::{DeviceState, Interface, RuntimeDir};

pub use server::{run_server, AttachSettings};

/// Block size announced to the kernel: the ext4 block size of the image.
pub const BLOCK_SIZE: u64 = 4096;

/// Transmission flags announced to the kernel for a read-only image.
pub const READ_ONLY_FLAGS: u64 = (tf::NBD_FLAG_HAS_FLAGS
    | tf::NBD_FLAG_READ_ONLY
    | tf::NBD_FLAG_SEND_FLUSH
    | tf::NBD_FLAG_CAN_MULTI_CONN) as u64;

/// Transmission flags announced to the kernel for a writable image: no
/// `READ_ONLY`, and FUA, TRIM and WRITE_ZEROES as the server's overlay
/// supports them. Kernels without WRITE_ZEROES support ignore that flag.
pub const WRITABLE_FLAGS: u64 = (tf::NBD_FLAG_HAS_FLAGS
    | tf::NBD_FLAG_SEND_FLUSH
    | tf::NBD_FLAG_SEND_FUA
    | tf::NBD_FLAG_SEND_TRIM
    | tf::NBD_FLAG_SEND_WRITE_ZEROES
    | tf::NBD_FLAG_CAN_MULTI_CONN) as u64;

/// Returns the transmission flags announced to the kernel.
pub fn server_flags(writable: bool) -> u64 {
    if writable {
        WRITABLE_FLAGS
    } else {
        READ_ONLY_FLAGS
    }
}

/// Which kernel interface `attach` uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterfaceChoice {
    /// Generic netlink, or the ioctls when the kernel has no `nbd` family.
    Auto,
    Netlink,
    Ioctl,
}

/// A failure of `attach`, `detach` or `list`.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("{command} needs root (CAP_SYS_ADMIN) to configure NBD devices; run it with sudo")]
    NotRoot { command: &'static str },

    #[error(
        "the nbd kernel module is not loaded: run `modprobe nbd` (or `modprobe nbd nbds_max=N`)"
    )]
    ModuleNotLoaded,

    #[error("invalid device {value:?}: expected /dev/nbdN")]
    InvalidDevice { value: String },

    #[error("{device} is in use: it is already connected (pick another device, or omit it to let the kernel choose)")]
    DeviceInUse { device: String },

    #[error(
        "{device} does not exist: load the nbd module (`modprobe nbd`) or pick an existing device"
    )]
    DeviceNotFound { device: String },

    #[error(
        "{device} is open or mounted: unmount it first, or pass --force to disconnect it anyway"
    )]
    DeviceBusy { device: String },

    #[error(
        "no free NBD device found among {count} devices; load the module with a larger nbds_max"
    )]
    NoFreeDevice { count: usize },

    #[error("failed to open image {image}: {message}")]
    OpenImage { image: String, message: String },

    #[error("failed to start access recording: {message}")]
    RecordAccess { message: String },

    #[error(
        "the image is {size} bytes, which is not a multiple of the {BLOCK_SIZE}-byte block size"
    )]
    UnalignedSize { size: u64 },

    #[error(transparent)]
    Netlink(#[from] NetlinkError),

    #[error(transparent)]
    Ioctl(#[from] ioctl::IoctlError),

    #[error(transparent)]
    State(#[from] state::StateError),

    #[error("failed to {step} {}: {source}", path.display())]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("{device} did not become readable: {source}")]
    NotReadable {
        device: String,
        #[source]
        source: io::Error,
    },

    #[error("the server of {device} (pid {pid}) is still running; detach it, or stop that process, before --reattach")]
    ServerRunning { device: String, pid: u32 },

    #[error("{device} is not connected, so there is nothing to reattach; attach the image anew")]
    NotConnected { device: String },

    #[error("{device} serves backend {attached:?}, but image {image} is {requested:?}; reattach needs the same image")]
    BackendMismatch {
        device: String,
        image: String,
        attached: String,
        requested: String,
    },

    #[error(
        "--reattach needs the generic netlink interface ({device} was attached with {interface:?})"
    )]
    ReattachNeedsNetlink {
        device: String,
        interface: Interface,
    },

    #[error("the server of {device} (pid {pid}) did not exit within {} s after the disconnect", waited.as_secs())]
    ServerStuck {
        device: String,
        pid: u32,
        waited: Duration,
    },

    #[error("failed to open the writable overlay: {message}")]
    OpenOverlay { message: String },

    #[error("{device} was attached {attached}, but this --reattach asks for {requested}; {hint}")]
    ReattachMismatch {
        device: String,
        attached: String,
        requested: String,
        hint: &'static str,
    },

    #[error("the background server failed: {message}")]
    Background { message: String },
}

/// Returns whether the process runs with an effective uid of 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn require_root(command: &'static str) -> Result<(), AttachError> {
    if is_root() {
        Ok(())
    } else {
        Err(AttachError::NotRoot { command })
    }
}

/// Returns whether the nbd driver is present (loaded or built in).
fn nbd_driver_present() -> bool {
    Path::new("/sys/module/nbd").exists() || Path::new("/dev/nbd0").exists()
}

/// Opens the netlink family, mapping a missing family to the clearest error:
/// `Ok(None)` means "use the ioctls" (driver present, family missing).
fn open_netlink(choice: InterfaceChoice) -> Result<Option<NbdNetlink>, AttachError> {
    if choice == InterfaceChoice::Ioctl {
        if !nbd_driver_present() {
            return Err(AttachError::ModuleNotLoaded);
        }
        return Ok(None);
    }
    match NbdNetlink::open() {
        Ok(socket) => Ok(Some(socket)),
        Err(NetlinkError::FamilyNotFound) if !nbd_driver_present() => {
            Err(AttachError::ModuleNotLoaded)
        }
        Err(error) if choice == InterfaceChoice::Auto && nbd_driver_present() => {
            info!(%error, "generic netlink is unavailable: using the NBD ioctls");
            Ok(None)
        }
        Err(error) => Err(error.into()),
    }
}

/// Checks what `attach` needs before it opens the image: root and the nbd driver.
pub fn preflight(choice: InterfaceChoice) -> Result<(), AttachError> {
    require_root("attach")?;
    open_netlink(choice).map(drop)
}

/// Returns `/dev/nbdN` for index N.
pub fn device_path(index: u32) -> String {
    format!("/dev/nbd{index}")
}

/// Parses a device argument into its index.
pub fn parse_device_arg(path: &Path) -> Result<u32, AttachError> {
    state::parse_device(path).ok_or_else(|| AttachError::InvalidDevice {
        value: path.display().to_string(),
    })
}

/// Returns whether process `pid` exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesized command name, which may contain spaces.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z') | Some('X') | None)
}

/// Size of device `index` in bytes from sysfs; 0 when disconnected.
pub fn device_size(index: u32) -> io::Result<u64> {
    let text = std::fs::read_to_string(format!("/sys/block/nbd{index}/size"))?;
    let sectors: u64 = text.trim().parse().map_err(|error| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("sysfs size {text:?}: {error}"),
        )
    })?;
    Ok(sectors * 512)
}

/// Disconnects `device`, waits for its server to exit and removes its state.
pub fn detach(
    runtime: &RuntimeDir,
    device: &Path,
    force: bool,
    wait: Duration,
) -> Result<(), AttachError> {
    require_root("detach")?;
    let index = parse_device_arg(device)?;
    if !nbd_driver_present() {
        return Err(AttachError::ModuleNotLoaded);
    }
    let path = device_path(index);
    let state = runtime.read(index)?;

    if !force {
        match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(&path)
        {
            Err(error) if error.raw_os_error() == Some(libc::EBUSY) => {
                return Err(AttachError::DeviceBusy { device: path });
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                return Err(AttachError::DeviceNotFound { device: path });
            }
            _ => {}
        }
    }

    let interface = state
        .as_ref()
        .map(|s| s.interface)
        .unwrap_or(Interface::Netlink);
    disconnect(index, interface)?;
    info!(device = %path, "disconnect requested");

    let started = Instant::now();
    if let Some(state) = &state {
        if !wait_for(wait, || !process_alive(state.pid)) {
            warn!(
                pid = state.pid,
                "server still running after the disconnect: sending SIGTERM"
            );
            // SAFETY: kill takes no pointers; a stale pid only makes it fail.
            unsafe { libc::kill(state.pid as libc::pid_t, libc::SIGTERM) };
            if !wait_for(Duration::from_secs(5), || !process_alive(state.pid)) {
                return Err(AttachError::ServerStuck {
                    device: path,
                    pid: state.pid,
                    waited: started.elapsed(),
                });
            }
        }
    }
    runtime
        .remove(index, None)
        .map_err(|source| AttachError::Io {
            step: "remove the state of",
            path: runtime.state_path(index),
            source,
        })?;
    // The server removes its temporary overlay when it exits normally; this
    // covers a server that was killed and never reattached.
    if let Some(overlay) = state
        .as_ref()
        .filter(|state| state.overlay_temporary)
        .and_then(|state| state.overlay.as_deref())
    {
        if let Err(error) = disk::remove_temporary_overlay(overlay) {
            warn!(overlay = %overlay.display(), %error, "failed to remove the temporary overlay");
        }
    }
    if !wait_for(wait, || {
        device_size(index).map(|size| size == 0).unwrap_or(true)
    }) {
        warn!(device = %path, "the device still reports a size after the disconnect");
    }
    Ok(())
}

/// Sends the disconnect request for device `index` through `interface`.
pub(crate) fn disconnect(index: u32, interface: Interface) -> Result<(), AttachError> {
    let path = device_path(index);
    if interface == Interface::Netlink {
        match NbdNetlink::open() {
            Ok(mut socket) => return Ok(socket.disconnect(index)?),
            Err(NetlinkError::FamilyNotFound) if !nbd_driver_present() => {
                return Err(AttachError::ModuleNotLoaded)
            }
            Err(error) => debug!(%error, "netlink unavailable: disconnecting with the ioctl"),
        }
    }
    let file = File::open(&path).map_err(|source| AttachError::Io {
        step: "open",
        path: PathBuf::from(&path),
        source,
    })?;
    ioctl::disconnect(&file, &path)?;
    Ok(())
}

/// Polls `done` every 50 ms until it holds or `timeout` passes.
fn wait_for(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One attached device as `list` shows it.
#[derive(Debug, serde::Serialize)]
pub struct ListedDevice {
    #[serde(flatten)]
    pub state: DeviceState,
    pub server_running: bool,
    /// Whether the kernel reports the device connected (`NBD_CMD_STATUS`).
    pub connected: Option<bool>,
    /// The server's last stats file.
    pub stats: Option<serde_json::Value>,
}

/// Lists the devices that have state files, with their server and kernel status.
pub fn list(runtime: &RuntimeDir) -> Result<Vec<ListedDevice>, AttachError> {
    let statuses = NbdNetlink::open()
        .and_then(|mut socket| socket.status(None))
        .ok();
    let mut devices = Vec::new();
    for state in runtime.list()? {
        let state = match state {
            Ok(state) => state,
            Err(error) => {
                warn!(%error, "skipping an unreadable state file");
                continue;
            }
        };
        let connected = match &statuses {
            Some(statuses) => Some(
                statuses
                    .iter()
                    .any(|s| s.index == state.index && s.connected),
            ),
            None => device_size(state.index).ok().map(|size| size > 0),
        };
        let stats = std::fs::read(&state.stats_file)
            .ok()
            .and_then(|text| serde_json::from_slice(&text).ok());
        devices.push(ListedDevice {
            server_running: process_alive(state.pid),
            connected,
            stats,
            state,
        });
    }
    Ok(devices)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive() {
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(u32::MAX));
    }

    #[test]
    fn read_only_flags_value() {
        // HAS_FLAGS | READ_ONLY | SEND_FLUSH | CAN_MULTI_CONN
        assert_eq!(READ_ONLY_FLAGS, 0x1 | 0x2 | 0x4 | 0x100);
    }

    #[test]
    fn writable_flags_value() {
        // HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES | CAN_MULTI_CONN
        assert_eq!(WRITABLE_FLAGS, 0x1 | 0x4 | 0x8 | 0x20 | 0x40 | 0x100);
        assert_eq!(WRITABLE_FLAGS & tf::NBD_FLAG_READ_ONLY as u64, 0);
        assert_eq!(server_flags(true), WRITABLE_FLAGS);
        assert_eq!(server_flags(false), READ_ONLY_FLAGS);
    }

    #[test]
    fn wait_for_times_out() {
        let started = Instant::now();
        assert!(!wait_for(Duration::from_millis(120), || false));
        assert!(started.elapsed() >= Duration::from_millis(120));
        assert!(wait_for(Duration::from_secs(5), || true));
    }
}
