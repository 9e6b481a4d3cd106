//! NBD listeners on a unix socket and on TCP, with a connection limit and a
//! graceful shutdown (NBD protocol specification, "Terminating the transmission phase").

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{debug, info, info_span, warn, Instrument};

use super::{run_connection, wait_for_shutdown, NbdError, ServerOptions, Shutdown};
use crate::device::BlockDevice;

/// Time the connections get after a shutdown to reply to the requests they
/// already read. Connections still open afterwards are dropped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Pause after a failed `accept` (for example `EMFILE`) before the next try.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);

/// Failures to set up a listening socket.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("another NBD server already listens on {path}; stop it or choose another socket path")]
    AlreadyServing { path: PathBuf },

    #[error("{path} exists and is not a unix socket; remove it or choose another socket path")]
    NotASocket { path: PathBuf },

    #[error("directory {directory} of socket {path} does not exist; create it or choose another socket path")]
    MissingDirectory { path: PathBuf, directory: PathBuf },

    #[error("failed to {step} for socket {path}: {source}")]
    Unix {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("failed to listen on TCP address {address}: {source}")]
    Tcp {
        address: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Serves `device` on a unix socket at `path` until `shutdown` fires.
///
/// The socket file is created with mode 0600. A stale socket file (one that
/// refuses connections) is replaced. A path where a server still accepts, or a
/// path that is not a socket, is an error. The file is removed at shutdown unless
/// another file has replaced it meanwhile.
pub async fn serve_unix<D: BlockDevice>(
    path: &Path,
    device: Arc<D>,
    options: ServerOptions,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    serve_unix_announced(path, device, options, shutdown, || {}).await
}

/// Like [`serve_unix`], and calls `bound` once the socket accepts connections, so
/// a caller can print the address only when a client can connect to it.
pub async fn serve_unix_announced<D: BlockDevice>(
    path: &Path,
    device: Arc<D>,
    options: ServerOptions,
    shutdown: Shutdown,
    bound: impl FnOnce(),
) -> anyhow::Result<()> {
    options.validate()?;
    let (listener, identity) = bind_unix(path)?;
    info!(path = %path.display(), export = options.export_name, "NBD server listening");
    bound();

    let result = accept_loop(Listener::Unix(listener), device, options, shutdown).await;

    match std::fs::symlink_metadata(path) {
        Ok(metadata) if (metadata.dev(), metadata.ino()) == identity => {
            if let Err(error) = std::fs::remove_file(path) {
                warn!(path = %path.display(), %error, "failed to remove the NBD socket file");
            }
        }
        Ok(_) => debug!(path = %path.display(), "socket path was replaced; leaving it"),
        Err(_) => {}
    }
    info!(path = %path.display(), "NBD server stopped");
    result
}

/// Serves `device` on TCP at `address` until `shutdown` fires.
pub async fn serve_tcp<D: BlockDevice>(
    address: std::net::SocketAddr,
    device: Arc<D>,
    options: ServerOptions,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    options.validate()?;
    let listener = TcpListener::bind(address)
        .await
        .map_err(|source| ListenError::Tcp { address, source })?;
    serve_tcp_listener(listener, device, options, shutdown).await
}

/// Serves `device` on an already bound TCP listener until `shutdown` fires;
/// lets callers bind port 0 and read the chosen port first.
pub async fn serve_tcp_listener<D: BlockDevice>(
    listener: TcpListener,
    device: Arc<D>,
    options: ServerOptions,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    options.validate()?;
    let address = listener.local_addr()?;
    info!(%address, export = options.export_name, "NBD server listening");
    let result = accept_loop(Listener::Tcp(listener), device, options, shutdown).await;
    info!(%address, "NBD server stopped");
    result
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// Accepts connections and serves each in its own task until `shutdown`.
async fn accept_loop<D: BlockDevice>(
    listener: Listener,
    device: Arc<D>,
    options: ServerOptions,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let options = Arc::new(options);
    let slots = Arc::new(Semaphore::new(options.connections_limit));
    let mut connections = JoinSet::new();
    let mut stop = Some(shutdown.clone());
    let mut next_id: u64 = 0;

    loop {
        while connections.try_join_next().is_some() {}

        let accepted = tokio::select! {
            _ = wait_for_shutdown(&mut stop) => break,
            accepted = accept(&listener) => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%error, "failed to accept an NBD connection; retrying");
                tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                continue;
            }
        };

        next_id += 1;
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            warn!(
                %peer,
                limit = options.connections_limit,
                "connection limit reached; closing the new connection"
            );
            continue;
        };

        let span = info_span!("nbd_connection", id = next_id, %peer);
        let device = Arc::clone(&device);
        let options = Arc::clone(&options);
        let shutdown = Some(shutdown.clone());
        let serve = async move {
            debug!("connection accepted");
            let result = match stream {
                Stream::Unix(stream) => run_connection(stream, device, options, shutdown).await,
                Stream::Tcp(stream) => run_connection(stream, device, options, shutdown).await,
            };
            log_connection_end(result);
            drop(slot);
        };
        connections.spawn(serve.instrument(span));
    }

    drop(listener);
    let open = connections.len();
    if open > 0 {
        info!(open, "waiting for NBD connections to finish their requests");
    }
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        warn!(
            open = connections.len(),
            grace_seconds = SHUTDOWN_GRACE.as_secs(),
            "NBD connections still busy after the shutdown grace period; dropping them"
        );
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
    Ok(())
}

enum Stream {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

async fn accept(listener: &Listener) -> io::Result<(Stream, String)> {
    match listener {
        Listener::Unix(listener) => {
            let (stream, _) = listener.accept().await?;
            Ok((Stream::Unix(stream), "unix".to_string()))
        }
        Listener::Tcp(listener) => {
            let (stream, peer) = listener.accept().await?;
            // Replies are whole messages flushed at once; Nagle would only delay them.
            stream.set_nodelay(true)?;
            Ok((Stream::Tcp(stream), peer.to_string()))
        }
    }
}

fn log_connection_end(result: Result<(), NbdError>) {
    match result {
        Ok(()) => debug!("connection closed"),
        Err(NbdError::Io { step, source }) if is_disconnect(&source) => {
            debug!(step, %source, "client disconnected");
        }
        Err(error) => warn!(%error, "connection ended with an error"),
    }
}

fn is_disconnect(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

/// Binds a listening unix socket at `path` with mode 0600.
///
/// The socket is bound inside a fresh private (0700) directory next to
/// `path`, made 0600 there, then renamed over `path`: no other user can
/// connect between bind and chmod, and the process umask stays untouched.
/// Returns the listener and the socket's (device, inode) identity.
fn bind_unix(path: &Path) -> Result<(UnixListener, (u64, u64)), ListenError> {
    let unix_error = |step: &'static str| {
        let path = path.to_path_buf();
        move |source| ListenError::Unix { step, path, source }
    };

    check_existing_socket(path)?;

    // NOTE: the temporary path is about 20 bytes longer than the parent
    // directory, so a socket path close to the 108-byte limit with a short
    // file name can fail to bind here although it would fit.
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(ListenError::MissingDirectory {
            path: path.to_path_buf(),
            directory: parent.to_path_buf(),
        });
    }
    let private_dir = parent.join(format!(
        ".nbd-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private_dir)
        .map_err(unix_error("create a private directory"))?;

    let temporary = private_dir.join("s");
    let bound = (|| {
        let listener = std::os::unix::net::UnixListener::bind(&temporary)
            .map_err(unix_error("bind the socket"))?;
        std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o600))
            .map_err(unix_error("set the socket mode to 0600"))?;
        std::fs::rename(&temporary, path).map_err(unix_error("move the socket into place"))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&temporary);
    let _ = std::fs::remove_dir(&private_dir);
    let listener = bound?;

    listener
        .set_nonblocking(true)
        .map_err(unix_error("make the socket non-blocking"))?;
    let metadata =
        std::fs::symlink_metadata(path).map_err(unix_error("read the socket metadata"))?;
    let listener = UnixListener::from_std(listener).map_err(unix_error("register the socket"))?;
    Ok((listener, (metadata.dev(), metadata.ino())))
}

/// Rejects a path used by a live server or by a file that is not a socket.
/// A missing path or a stale socket is accepted, because the rename replaces it.
fn check_existing_socket(path: &Path) -> Result<(), ListenError> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ListenError::Unix {
                step: "inspect the existing path",
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !metadata.file_type().is_socket() {
        return Err(ListenError::NotASocket {
            path: path.to_path_buf(),
        });
    }

    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ListenError::AlreadyServing {
            path: path.to_path_buf(),
        }),
        Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
            info!(path = %path.display(), "replacing a stale NBD socket file");
            Ok(())
        }
        Err(source) => Err(ListenError::Unix {
            step: "probe the existing socket",
            path: path.to_path_buf(),
            source,
        }),
    }
}
