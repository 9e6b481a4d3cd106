//! The attach server: opens the image, hands one socket pair end per
//! connection to the kernel, serves the other ends until the device is
//! disconnected, and keeps the device's state and stats files.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::daemon::{Readiness, ReadyPipe};
use super::disk::{backend_identifier, remove_temporary_overlay, AttachDisk, WritableSettings};
use super::ioctl::{self, IoctlConfig};
use super::netlink::{ConnectRequest, NbdNetlink};
use super::state::{DeviceState, Interface, RuntimeDir};
use super::{
    device_path, device_size, open_netlink, process_alive, require_root, server_flags, AttachError,
    InterfaceChoice, BLOCK_SIZE,
};
use crate::access::AccessRecorder;
use crate::device::BlockDevice;
use crate::image::{open_image, OpenOptions, OpenedImage};
use crate::metrics::{self, MetricsLabels, MetricsSnapshot};
use crate::nbd::{serve_transmission, ServerOptions};
use crate::prefetch::{self, PrefetchOptions};

/// How long `attach` waits for a connected device to report its size.
const IOCTL_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after `NBD_CMD_RECONFIGURE` a socket the kernel did not adopt shows up closed.
const ADOPTION_CHECK_DELAY: Duration = Duration::from_millis(300);
/// Attempts to hand the kernel replacement sockets on reattach.
const REATTACH_ATTEMPTS: usize = 5;

/// Everything one `attach` (or `attach --reattach`) run needs.
pub struct AttachSettings {
    /// The image argument: `oci:DIR[:TAG]` or a registry reference.
    pub image: String,
    pub open: OpenOptions,
    /// Overlay settings of a writable attach. A reattach uses the state
    /// file's overlay and size instead, and rejects settings that differ.
    pub writable: Option<WritableSettings>,
    /// File that receives the paths of the files clients read (`--record-access`).
    pub record_access: Option<PathBuf>,
    /// Start-up prefetch and background fetch, started once the device is readable.
    pub prefetch: PrefetchOptions,
    /// Device index to use, or `None` to let the kernel choose.
    pub device: Option<u32>,
    /// Hand new sockets to `device`, whose server died, instead of connecting it.
    pub reattach: bool,
    /// Sockets per device, at least 1.
    pub connections: u32,
    /// Request timeout in seconds: after it, in-flight requests are requeued.
    pub timeout_secs: u64,
    /// Seconds the kernel holds requests while every connection is dead.
    pub dead_conn_timeout_secs: u64,
    pub interface: InterfaceChoice,
    pub runtime: RuntimeDir,
    /// The server's log file when it runs in the background.
    pub log_file: Option<PathBuf>,
    /// Where to report readiness in the background; `None` prints the device path.
    pub ready: Option<ReadyPipe>,
    /// When the command started, for the attach time.
    pub started: Instant,
    /// `--metrics-addr`: where to serve Prometheus metrics of the device.
    pub metrics_addr: Option<String>,
}

/// A connected device and the tasks serving it.
struct Attached {
    index: u32,
    interface: Interface,
    connections: Vec<JoinHandle<()>>,
    do_it: Option<std::thread::JoinHandle<Result<(), ioctl::IoctlError>>>,
    disk: Arc<AttachDisk>,
    image: OpenedImage,
    state: DeviceState,
    /// The bound metrics listener, served once the device is readable.
    metrics: Option<TcpListener>,
}

/// Attaches the image and serves the device until it is disconnected (by
/// `detach`, SIGTERM or SIGINT). Reports readiness once the device is readable.
pub async fn run_server(mut settings: AttachSettings) -> Result<(), AttachError> {
    let ready = settings.ready.take();
    let attached = match attach(&settings).await {
        Ok(attached) => attached,
        Err(error) => {
            if let Some(ready) = ready {
                ready.report(&Readiness::Failed {
                    message: error.to_string(),
                });
            }
            return Err(error);
        }
    };
    let device = attached.state.device.clone();
    info!(device = %device, attach_ms = attached.state.attach_ms, "device readable");
    match ready {
        Some(ready) => ready.report(&Readiness::Ready {
            device,
            attach_ms: attached.state.attach_ms,
        }),
        None => println!("{device}"),
    }
    serve(attached, &settings).await
}

async fn attach(settings: &AttachSettings) -> Result<Attached, AttachError> {
    require_root("attach")?;
    settings
        .runtime
        .create()
        .map_err(|source| AttachError::Io {
            step: "create the runtime directory",
            path: settings.runtime.dir.clone(),
            source,
        })?;

    let netlink = open_netlink(settings.interface)?;
    let old_state = match (settings.reattach, settings.device) {
        (true, Some(index)) => Some(check_reattach(settings, index, netlink.is_some())?),
        _ => None,
    };
    // Bound before the image opens, so a port in use fails the attach early.
    // A reattach without --metrics-addr serves on the address the device had.
    let metrics_addr = settings.metrics_addr.clone().or_else(|| {
        old_state
            .as_ref()
            .and_then(|state| state.metrics_addr.clone())
    });
    let metrics = match &metrics_addr {
        Some(text) => Some(metrics::listen(text).await?),
        None => None,
    };

    let image = open_image(&settings.image, &settings.open)
        .await
        .map_err(|error| AttachError::OpenImage {
            image: settings.image.clone(),
            message: format!("{error:#}"),
        })?;
    let writable = resolve_writable(settings.writable.as_ref(), old_state.as_ref())?;
    let recorder = settings
        .record_access
        .as_deref()
        .map(|path| AccessRecorder::create(&image.tree, path))
        .transpose()
        .map_err(|error| AttachError::RecordAccess {
            message: format!("{error:#}"),
        })?;
    let disk = Arc::new(AttachDisk::open(&image, writable.as_ref(), recorder)?);
    let size = disk.size();
    if size % BLOCK_SIZE != 0 {
        return Err(AttachError::UnalignedSize { size });
    }
    let overlay = disk.overlay_path().map(|path| {
        std::fs::canonicalize(path).unwrap_or_else(|error| {
            warn!(overlay = %path.display(), %error, "failed to resolve the overlay path");
            path.to_path_buf()
        })
    });
    let backend = backend_identifier(&image.manifest_digest, overlay.as_deref());
    if let Some(old) = &old_state {
        if old.backend != backend {
            return Err(AttachError::BackendMismatch {
                device: old.device.clone(),
                image: settings.image.clone(),
                attached: old.backend.clone(),
                requested: backend,
            });
        }
    }

    let options = Arc::new(ServerOptions {
        description: format!("{} ({})", image.description, image.manifest_digest),
        ..ServerOptions::default()
    });
    let pairs = Connections {
        disk: disk.clone(),
        options,
    };

    let (index, interface, connections, do_it) = match netlink {
        Some(netlink) if settings.reattach => {
            let index = settings.device.unwrap_or_default();
            let connections = reattach_sockets(netlink, &pairs, settings, index, &backend).await?;
            (index, Interface::Netlink, connections, None)
        }
        Some(netlink) => {
            let (kernel_ends, connections) = pairs.create(settings.connections)?;
            let request = ConnectRequest {
                index: settings.device,
                size_bytes: size,
                block_size: BLOCK_SIZE,
                server_flags: server_flags(writable.is_some()),
                timeout_secs: settings.timeout_secs,
                dead_conn_timeout_secs: settings.dead_conn_timeout_secs,
                sockets: raw_fds(&kernel_ends),
                backend: backend.clone(),
            };
            let index = connect_netlink(netlink, request).await?;
            drop(kernel_ends);
            (index, Interface::Netlink, connections, None)
        }
        None => {
            let (kernel_ends, connections) = pairs.create(settings.connections)?;
            let config = IoctlConfig {
                block_size: BLOCK_SIZE,
                size_bytes: size,
                server_flags: server_flags(writable.is_some()),
                timeout_secs: settings.timeout_secs,
            };
            let requested = settings.device;
            let (index, device) = tokio::task::spawn_blocking(move || {
                let result = configure_ioctl(requested, &config, &raw_fds(&kernel_ends));
                drop(kernel_ends);
                result
            })
            .await
            .map_err(join_error)??;
            let path = device_path(index);
            let do_it = std::thread::Builder::new()
                .name(format!("nbd{index}-do-it"))
                .spawn(move || ioctl::do_it(&device, &path))
                .map_err(|source| AttachError::Io {
                    step: "start the NBD_DO_IT thread for",
                    path: PathBuf::from(device_path(index)),
                    source,
                })?;
            (index, Interface::Ioctl, connections, Some(do_it))
        }
    };
    info!(device = %device_path(index), ?interface, connections = connections.len(), size, "device connected");

    wait_readable(index).await?;
    let attach_ms = settings.started.elapsed().as_millis() as u64;

    let log_file = settings.log_file.as_ref().map(|log| {
        let target = settings.runtime.log_path(index);
        match std::fs::rename(log, &target) {
            Ok(()) => target,
            Err(error) => {
                warn!(%error, log = %log.display(), "failed to rename the server log");
                log.clone()
            }
        }
    });
    let state = DeviceState {
        device: device_path(index),
        index,
        image: image.description.clone(),
        manifest_digest: image.manifest_digest.clone(),
        backend,
        pid: std::process::id(),
        mode: if writable.is_some() { "rw" } else { "ro" }.to_string(),
        overlay_temporary: writable
            .as_ref()
            .is_some_and(|w| w.overlay.is_none() || w.overlay_temporary),
        added_bytes: writable.as_ref().map(WritableSettings::added_bytes),
        overlay,
        interface,
        connections: connections.len() as u32,
        cache_dir: settings.open.cache_dir.clone(),
        socket: "socketpair".to_string(),
        size_bytes: size,
        timeout_secs: settings.timeout_secs,
        dead_conn_timeout_secs: settings.dead_conn_timeout_secs,
        stats_file: settings.runtime.stats_path(index),
        log_file,
        attached_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default(),
        attach_ms,
        metrics_addr: metrics.as_ref().map(|(_, bound)| bound.to_string()),
    };
    settings
        .runtime
        .write(&state)
        .map_err(|source| AttachError::Io {
            step: "write the state file",
            path: settings.runtime.state_path(index),
            source,
        })?;

    Ok(Attached {
        index,
        interface,
        connections,
        do_it,
        disk,
        image,
        state,
        metrics: metrics.map(|(listener, _)| listener),
    })
}

/// Returns the writable settings of this run. A first attach uses the
/// requested ones. A reattach takes the mode, overlay and size from the
/// state file, and rejects a request that contradicts them.
fn resolve_writable(
    requested: Option<&WritableSettings>,
    old: Option<&DeviceState>,
) -> Result<Option<WritableSettings>, AttachError> {
    let Some(old) = old else {
        return Ok(requested.cloned());
    };
    let mismatch = |attached: String, requested: String, hint| AttachError::ReattachMismatch {
        device: old.device.clone(),
        attached,
        requested,
        hint,
    };
    if old.mode != "rw" {
        return match requested {
            Some(_) => Err(mismatch(
                "read-only".to_string(),
                "--writable".to_string(),
                "reattach it without --writable",
            )),
            None => Ok(None),
        };
    }
    let Some(overlay) = old.overlay.clone() else {
        return Err(mismatch(
            "writable without a recorded overlay".to_string(),
            "a reattach".to_string(),
            "the state file is damaged: detach the device and attach it anew",
        ));
    };
    if let Some(asked) = requested.and_then(|r| r.overlay.as_deref()) {
        let same = std::fs::canonicalize(asked).is_ok_and(|asked| asked == overlay);
        if !same {
            return Err(mismatch(
                format!("with overlay {}", overlay.display()),
                format!("overlay {}", asked.display()),
                "omit --overlay, or give the recorded path",
            ));
        }
    }
    if let (Some(asked), Some(recorded)) = (requested.and_then(|r| r.size), old.added_bytes) {
        if asked != recorded {
            return Err(mismatch(
                format!("with --size {recorded}"),
                format!("--size {asked}"),
                "omit --size, or give the recorded size",
            ));
        }
    }
    Ok(Some(WritableSettings {
        size: old.added_bytes,
        overlay: Some(overlay),
        overlay_temporary: old.overlay_temporary,
    }))
}

/// Checks that device `index` can be reattached and returns its recorded state.
fn check_reattach(
    settings: &AttachSettings,
    index: u32,
    netlink: bool,
) -> Result<DeviceState, AttachError> {
    let device = device_path(index);
    let state = settings
        .runtime
        .read(index)?
        .ok_or_else(|| AttachError::NotConnected {
            device: device.clone(),
        })?;
    if state.interface != Interface::Netlink || !netlink {
        return Err(AttachError::ReattachNeedsNetlink {
            device,
            interface: state.interface,
        });
    }
    if state.pid != std::process::id() && process_alive(state.pid) {
        return Err(AttachError::ServerRunning {
            device,
            pid: state.pid,
        });
    }
    let connected = NbdNetlink::open()
        .and_then(|mut socket| socket.status(Some(index)))?
        .iter()
        .any(|status| status.index == index && status.connected);
    if !connected {
        return Err(AttachError::NotConnected { device });
    }
    Ok(state)
}

/// Creates socket pairs and the tasks serving their server ends.
struct Connections {
    disk: Arc<AttachDisk>,
    options: Arc<ServerOptions>,
}

impl Connections {
    fn create(&self, count: u32) -> Result<(Vec<StdUnixStream>, Vec<JoinHandle<()>>), AttachError> {
        let io_error = |step| {
            move |source| AttachError::Io {
                step,
                path: PathBuf::from("socketpair"),
                source,
            }
        };
        let mut kernel_ends = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..count.max(1) {
            let (ours, theirs) = StdUnixStream::pair().map_err(io_error("create a socket pair"))?;
            ours.set_nonblocking(true)
                .map_err(io_error("configure a socket"))?;
            let stream =
                tokio::net::UnixStream::from_std(ours).map_err(io_error("register a socket"))?;
            let disk = self.disk.clone();
            let options = self.options.clone();
            let connection = theirs.as_raw_fd();
            tasks.push(tokio::spawn(async move {
                match serve_transmission(stream, disk, options).await {
                    Ok(()) => debug!(connection, "NBD connection closed"),
                    Err(error) => warn!(connection, %error, "NBD connection failed"),
                }
            }));
            kernel_ends.push(theirs);
        }
        Ok((kernel_ends, tasks))
    }
}

fn raw_fds(streams: &[StdUnixStream]) -> Vec<RawFd> {
    streams.iter().map(|stream| stream.as_raw_fd()).collect()
}

fn join_error(error: tokio::task::JoinError) -> AttachError {
    AttachError::Io {
        step: "run a blocking step of",
        path: PathBuf::from("attach"),
        source: std::io::Error::other(error.to_string()),
    }
}

/// Sends `NBD_CMD_CONNECT` off the async threads: the kernel may read the
/// device before it replies, and our own tasks serve those reads.
async fn connect_netlink(
    mut netlink: NbdNetlink,
    request: ConnectRequest,
) -> Result<u32, AttachError> {
    let requested = request.index;
    let result = tokio::task::spawn_blocking(move || netlink.connect(&request))
        .await
        .map_err(join_error)?;
    match result {
        Ok(index) => Ok(index),
        Err(error) if error.kernel_errno() == Some(libc::EBUSY) => Err(AttachError::DeviceInUse {
            device: requested
                .map(device_path)
                .unwrap_or_else(|| "the chosen device".to_string()),
        }),
        Err(error) => Err(error.into()),
    }
}

/// Hands the kernel new sockets for a device whose connections died. The
/// kernel silently closes sockets for which it finds no dead connection (for
/// instance when it has not yet noticed the old server's exit), so sockets
/// that close right away are replaced and sent again.
async fn reattach_sockets(
    netlink: NbdNetlink,
    pairs: &Connections,
    settings: &AttachSettings,
    index: u32,
    backend: &str,
) -> Result<Vec<JoinHandle<()>>, AttachError> {
    let old = settings.runtime.read(index)?;
    let wanted = old
        .map(|state| state.connections)
        .unwrap_or(settings.connections)
        .max(1);
    let netlink = Arc::new(std::sync::Mutex::new(netlink));
    let mut adopted = Vec::new();
    let mut pending = wanted;
    for attempt in 1..=REATTACH_ATTEMPTS {
        let (kernel_ends, tasks) = pairs.create(pending)?;
        let netlink = netlink.clone();
        let backend = backend.to_string();
        let (timeout, dead) = (settings.timeout_secs, settings.dead_conn_timeout_secs);
        tokio::task::spawn_blocking(move || {
            let fds = raw_fds(&kernel_ends);
            let mut socket = netlink
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let result = socket.reconfigure(index, &backend, &fds, timeout, dead);
            drop(kernel_ends);
            result
        })
        .await
        .map_err(join_error)??;

        tokio::time::sleep(ADOPTION_CHECK_DELAY).await;
        let (closed, open): (Vec<_>, Vec<_>) =
            tasks.into_iter().partition(|task| task.is_finished());
        adopted.extend(open);
        pending = closed.len() as u32;
        info!(device = %device_path(index), attempt, adopted = adopted.len(), rejected = pending, "sent replacement sockets");
        if pending == 0 {
            break;
        }
    }
    if adopted.is_empty() {
        return Err(AttachError::NotConnected {
            device: device_path(index),
        });
    }
    Ok(adopted)
}

/// Configures a device through the ioctls: the requested one, or the first
/// device that is not in use.
fn configure_ioctl(
    requested: Option<u32>,
    config: &IoctlConfig,
    sockets: &[RawFd],
) -> Result<(u32, File), AttachError> {
    let candidates: Vec<u32> = match requested {
        Some(index) => vec![index],
        None => list_nbd_devices(),
    };
    for &index in &candidates {
        let path = device_path(index);
        if requested.is_none() && Path::new(&format!("/sys/block/nbd{index}/pid")).exists() {
            continue;
        }
        let device = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|source| AttachError::Io {
                step: "open",
                path: PathBuf::from(&path),
                source,
            })?;
        match ioctl::configure(&device, &path, config, sockets) {
            Ok(()) => return Ok((index, device)),
            Err(error) if error.errno() == Some(libc::EBUSY) => {
                if requested.is_some() {
                    return Err(AttachError::DeviceInUse { device: path });
                }
            }
            Err(error) => return Err(error.into()),
        }
    }
    Err(AttachError::NoFreeDevice {
        count: candidates.len(),
    })
}

/// Indexes of the nbd devices in sysfs, sorted.
fn list_nbd_devices() -> Vec<u32> {
    let mut indexes: Vec<u32> = std::fs::read_dir("/sys/block")
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok())
                .filter_map(|entry| super::state::parse_device(Path::new(&entry.file_name())))
                .collect()
        })
        .unwrap_or_default();
    indexes.sort_unstable();
    indexes
}

/// Waits until the device has its size and its first block can be read
/// from the server (with `O_DIRECT`, so the page cache cannot answer).
/// `BLKFLSBUF` from `<linux/fs.h>`: `_IO(0x12, 97)`.
const BLKFLSBUF: libc::c_ulong = 0x1261;

/// Drops the kernel's cached blocks of a freshly connected device. A device
/// that served another disk of the same size before keeps that disk's pages
/// across a disconnect, and a mount would read them instead of this image.
fn drop_stale_buffers(device: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new().read(true).open(device)?;
    // SAFETY: BLKFLSBUF takes no argument, and `file` keeps the descriptor
    // open for the duration of the call.
    let result = unsafe { libc::ioctl(file.as_raw_fd(), BLKFLSBUF as _) };
    if result != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

async fn wait_readable(index: u32) -> Result<(), AttachError> {
    let device = device_path(index);
    let task_device = device.clone();
    let result = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let deadline = Instant::now() + IOCTL_START_TIMEOUT;
        while device_size(index).unwrap_or(0) == 0 {
            if Instant::now() >= deadline {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the kernel still reports size 0 {} s after the connect",
                        IOCTL_START_TIMEOUT.as_secs()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        drop_stale_buffers(&task_device)?;
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&task_device)?;
        let mut buffer = vec![0u8; 2 * BLOCK_SIZE as usize];
        let start = buffer.as_ptr().align_offset(BLOCK_SIZE as usize);
        let block = &mut buffer[start..start + BLOCK_SIZE as usize];
        file.read_exact_at(block, 0)
    })
    .await
    .map_err(join_error)?;
    result.map_err(|source| AttachError::NotReadable { device, source })
}

/// Serves until every connection has closed, or until SIGTERM/SIGINT, which
/// disconnects the device first. Removes the state files at the end.
async fn serve(attached: Attached, settings: &AttachSettings) -> Result<(), AttachError> {
    let Attached {
        index,
        interface,
        connections,
        do_it,
        disk,
        image,
        state,
        metrics,
    } = attached;

    let trim_disk = disk.clone();
    let trim_task = tokio::spawn(crate::heap::trim_when_idle(move || {
        let stats = trim_disk.store().stats();
        stats.bytes_served + stats.bytes_fetched + stats.chunks_fetched
    }));
    let (stop_stats, stats_stopped) = tokio::sync::watch::channel(false);
    let stats_disk = disk.clone();
    let startup = image.startup;
    let cache_files = layer_cache_paths(&settings.open.cache_dir, &image);
    let stats_task = tokio::spawn(crate::stats_file::write_loop(
        state.stats_file.clone(),
        move || {
            serde_json::json!({
                "startup": startup,
                "store": stats_disk.store().stats(),
                "cache_bytes": allocated_bytes(&cache_files),
            })
        },
        stats_stopped.clone(),
    ));
    if let Some(listener) = metrics {
        let labels = MetricsLabels::for_device(&state.device, &state.image);
        let scrape_disk = disk.clone();
        let startup = image.startup;
        let scrape = Arc::new(move || {
            let snapshot = MetricsSnapshot {
                store: scrape_disk.store().stats(),
                startup,
                device_bytes: scrape_disk.size(),
            };
            metrics::render(&snapshot, &labels)
        });
        tokio::spawn(metrics::serve(listener, scrape, stats_stopped));
    }

    // The device is readable by now, so the prefetch never delays the attach.
    let prefetch_task = prefetch::spawn(
        disk.store().clone(),
        image.layers.clone(),
        settings.prefetch,
    );

    let mut all_closed = Box::pin(futures::future::join_all(connections));
    tokio::select! {
        _ = &mut all_closed => info!(device = %state.device, "the kernel closed every connection"),
        _ = wait_for_signal() => {
            info!(device = %state.device, "disconnecting the device");
            let result = tokio::task::spawn_blocking(move || super::disconnect(index, interface))
                .await
                .map_err(join_error)?;
            if let Err(error) = result {
                warn!(%error, "disconnect failed");
            }
            if tokio::time::timeout(Duration::from_secs(10), &mut all_closed).await.is_err() {
                warn!(device = %state.device, "connections still open 10 s after the disconnect");
            }
        }
    }

    if let Some(do_it) = do_it {
        match tokio::task::spawn_blocking(move || do_it.join()).await {
            Ok(Ok(Err(error))) => warn!(%error, "NBD_DO_IT ended with an error"),
            Ok(Err(_)) => warn!("the NBD_DO_IT thread panicked"),
            _ => {}
        }
    }
    prefetch_task.abort();
    trim_task.abort();
    let _ = stop_stats.send(true);
    let _ = stats_task.await;

    // The kernel sends FLUSH for every sync, but writes it completed without
    // one (such as a dirty page cache written back at disconnect) become
    // durable only here.
    let flushed = disk.flush().await;
    if let (Err(error), Some(overlay)) = (&flushed, &state.overlay) {
        warn!(overlay = %overlay.display(), %error, "failed to flush the overlay");
    }
    let stats = disk.store().stats();
    info!(device = %state.device, ?stats, "server stopped");
    drop(disk);
    if let Some(overlay) = state.overlay.as_ref().filter(|_| state.overlay_temporary) {
        match remove_temporary_overlay(overlay) {
            Ok(()) => info!(overlay = %overlay.display(), "removed the temporary overlay"),
            Err(error) => {
                warn!(overlay = %overlay.display(), %error, "failed to remove the temporary overlay")
            }
        }
    }
    settings
        .runtime
        .remove(index, Some(std::process::id()))
        .map_err(|source| AttachError::Io {
            step: "remove the state of",
            path: settings.runtime.state_path(index),
            source,
        })?;
    if let Some(log) = &state.log_file {
        let _ = std::fs::remove_file(log);
    }
    flushed.map_err(|source| AttachError::Io {
        step: "flush the overlay",
        path: state.overlay.clone().unwrap_or_default(),
        source,
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut terminate), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("failed to watch SIGTERM and SIGINT; only `detach` stops the server");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = terminate.recv() => info!("terminated"),
        _ = interrupt.recv() => info!("interrupted"),
    }
}

/// Cache files of the image's layers.
// NOTE: this repeats the chunk store's file naming (`layers/sha256-HEX.data`);
// if the store renames its files, `list` reports 0 cache bytes.
fn layer_cache_paths(cache_dir: &Path, image: &OpenedImage) -> Vec<PathBuf> {
    image
        .layers
        .iter()
        .filter_map(|layer| layer.digest.strip_prefix("sha256:"))
        .map(|hex| cache_dir.join("layers").join(format!("sha256-{hex}.data")))
        .collect()
}

/// Bytes allocated on disk by `paths` (sparse cache files count what they hold).
fn allocated_bytes(paths: &[PathBuf]) -> u64 {
    use std::os::unix::fs::MetadataExt;
    paths
        .iter()
        .filter_map(|path| std::fs::metadata(path).ok())
        .map(|metadata| metadata.blocks() * 512)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attach::state::sample_state;

    fn state(mode: &str, overlay: Option<&Path>, added_bytes: Option<u64>) -> DeviceState {
        DeviceState {
            mode: mode.into(),
            overlay: overlay.map(Path::to_path_buf),
            added_bytes,
            ..sample_state(6, 1)
        }
    }

    fn request(overlay: Option<&Path>, size: Option<u64>) -> WritableSettings {
        WritableSettings {
            size,
            overlay: overlay.map(Path::to_path_buf),
            overlay_temporary: false,
        }
    }

    #[test]
    fn resolve_writable_first_attach() {
        let asked = request(None, Some(4096));
        assert_eq!(resolve_writable(Some(&asked), None).unwrap(), Some(asked));
        assert_eq!(resolve_writable(None, None).unwrap(), None);
    }

    #[test]
    fn resolve_writable_reattach_cases() {
        let temp = tempfile::tempdir().unwrap();
        let recorded = temp.path().join("recorded.ovl");
        std::fs::write(&recorded, b"").unwrap();
        let recorded = std::fs::canonicalize(&recorded).unwrap();
        let other = temp.path().join("other.ovl");
        std::fs::write(&other, b"").unwrap();

        let writable = state("rw", Some(&recorded), Some(1 << 20));
        let expected = Some(WritableSettings {
            size: Some(1 << 20),
            overlay: Some(recorded.clone()),
            overlay_temporary: false,
        });
        let cases: [(&str, Option<WritableSettings>, bool); 5] = [
            ("no flags", None, true),
            ("same overlay", Some(request(Some(&recorded), None)), true),
            ("same size", Some(request(None, Some(1 << 20))), true),
            ("other overlay", Some(request(Some(&other), None)), false),
            ("other size", Some(request(None, Some(4096))), false),
        ];
        for (name, asked, accepted) in cases {
            let result = resolve_writable(asked.as_ref(), Some(&writable));
            if accepted {
                assert_eq!(result.unwrap(), expected, "{name}");
            } else {
                assert!(
                    matches!(result, Err(AttachError::ReattachMismatch { .. })),
                    "{name}: {result:?}"
                );
            }
        }
    }

    #[test]
    fn resolve_writable_read_only_device() {
        let read_only = state("ro", None, None);
        assert_eq!(resolve_writable(None, Some(&read_only)).unwrap(), None);
        let result = resolve_writable(Some(&request(None, None)), Some(&read_only));
        assert!(matches!(result, Err(AttachError::ReattachMismatch { .. })));
        let damaged = state("rw", None, None);
        assert!(resolve_writable(None, Some(&damaged)).is_err());
    }
}
