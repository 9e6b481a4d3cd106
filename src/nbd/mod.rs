//! NBD server for a [`BlockDevice`], read-only or writable, following the NBD protocol
//! specification (NetworkBlockDevice/nbd, `doc/proto.md`).
//!
//! The server speaks the fixed newstyle handshake (`NBD_OPT_GO`, `NBD_OPT_INFO`,
//! `NBD_OPT_LIST`, `NBD_OPT_EXPORT_NAME`, structured replies and the
//! `base:allocation` metadata context) and replies to pipelined requests out of
//! order: each request runs as its own task, so one slow read does not stall
//! the others on the same connection. It serves one export, reachable under
//! its configured name and under the empty (default) name.
//!
//! Phases live in their own files: [`proto`] contains the wire constants and
//! layouts, `handshake` the option haggling, `transmission` the request loop
//! and `server` the unix and TCP listeners.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # async fn example<D: esgz_nbd::device::BlockDevice>(device: Arc<D>) -> anyhow::Result<()> {
//! use esgz_nbd::nbd::{serve_unix, ServerOptions};
//!
//! let (stop, shutdown) = tokio::sync::watch::channel(false);
//! let options = ServerOptions { export_name: "debian".into(), ..ServerOptions::default() };
//! let server = tokio::spawn(async move {
//!     serve_unix(std::path::Path::new("/run/esgz.sock"), device, options, shutdown).await
//! });
//! // ... later:
//! stop.send(true)?;
//! server.await??;
//! # Ok(())
//! # }
//! ```

mod handshake;
pub mod proto;
mod replies;
mod server;
mod transmission;

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::watch;

use crate::device::BlockDevice;

pub use server::{serve_tcp, serve_tcp_listener, serve_unix, serve_unix_announced, ListenError};

/// The shutdown signal of [`serve_unix`] and [`serve_tcp`].
///
/// The server shuts down when the value becomes `true` or when every sender is
/// dropped: it stops accepting, lets each connection finish the requests it has
/// already read, closes the connections and removes the unix socket file.
pub type Shutdown = watch::Receiver<bool>;

/// Maximum time a connection may take from accept to the end of the handshake,
/// so that idle clients cannot hold connection slots.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Largest block size a [`ServerOptions`] may set: reads are held in memory
/// whole, and a structured reply chunk must fit its 32-bit length field.
pub const MAX_BLOCK_LIMIT: u32 = 1 << 30;

/// Export description and limits the server announces to clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerOptions {
    /// Name of the export in `NBD_OPT_LIST`; the empty name also selects it.
    pub export_name: String,
    /// Human-readable text sent in `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: String,
    /// Minimum block size in bytes: a power of two up to 65536.
    pub min_block: u32,
    /// Preferred block size in bytes: a power of two, at least 512 and `min_block`.
    pub preferred_block: u32,
    /// Maximum length of one read or cache request in bytes.
    pub max_block: u32,
    /// Maximum number of simultaneous connections; more are closed at accept.
    pub connections_limit: usize,
}

impl Default for ServerOptions {
    fn default() -> ServerOptions {
        ServerOptions {
            export_name: "esgz-nbd".to_string(),
            description: String::new(),
            min_block: 1,
            preferred_block: 4096,
            max_block: 32 << 20,
            connections_limit: 16,
        }
    }
}

impl ServerOptions {
    /// Checks the constraints the NBD specification puts on block sizes and strings.
    pub fn validate(&self) -> Result<(), NbdError> {
        let invalid = |field: &'static str, value: String, reason: &'static str| {
            Err(NbdError::InvalidOptions {
                field,
                value,
                reason,
            })
        };

        if self.export_name.len() > proto::MAX_STRING_LEN {
            return invalid(
                "export_name",
                format!("{} bytes", self.export_name.len()),
                "must be at most 4096 bytes",
            );
        }
        if self.description.len() > proto::MAX_STRING_LEN {
            return invalid(
                "description",
                format!("{} bytes", self.description.len()),
                "must be at most 4096 bytes",
            );
        }
        if !self.min_block.is_power_of_two() || self.min_block > 65536 {
            return invalid(
                "min_block",
                self.min_block.to_string(),
                "must be a power of two between 1 and 65536",
            );
        }
        if !self.preferred_block.is_power_of_two() || self.preferred_block < self.min_block.max(512)
        {
            return invalid(
                "preferred_block",
                self.preferred_block.to_string(),
                "must be a power of two, at least 512 and at least min_block",
            );
        }
        if self.max_block < self.preferred_block
            || self.max_block % self.min_block != 0
            || self.max_block > MAX_BLOCK_LIMIT
        {
            return invalid(
                "max_block",
                self.max_block.to_string(),
                "must be a multiple of min_block, at least preferred_block and at most 1 GiB",
            );
        }
        if self.connections_limit == 0 {
            return invalid("connections_limit", "0".to_string(), "must be at least 1");
        }
        Ok(())
    }

    /// Checks whether `name` selects this server's export (its name or the default, empty name).
    fn selects_export(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.export_name.as_bytes()
    }
}

/// A failure that ends one NBD connection; the server keeps serving others.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("invalid NBD server option {field} = {value}: {reason}")]
    InvalidOptions {
        field: &'static str,
        value: String,
        reason: &'static str,
    },

    #[error("NBD connection failed to {step}: {source}")]
    Io {
        step: &'static str,
        #[source]
        source: io::Error,
    },

    #[error(
        "NBD client sent unknown client flags {flags:#x} (this server supports {:#x}); \
         closing the connection",
        proto::client_flags::SUPPORTED
    )]
    UnknownClientFlags { flags: u32 },

    #[error(
        "NBD client sent option magic {found:#018x} instead of IHAVEOPT ({:#018x}); \
         closing the connection",
        proto::IHAVEOPT
    )]
    OptionMagic { found: u64 },

    #[error(
        "NBD client sent {option} with {length} bytes of data, over the limit of {limit} \
         bytes; closing the connection"
    )]
    OptionTooLong {
        option: &'static str,
        length: u32,
        limit: u32,
    },

    #[error(
        "NBD client requested export {name:?} with NBD_OPT_EXPORT_NAME, but this server \
         exports only {export:?} (or the default name \"\"); closing the connection"
    )]
    UnknownExport { name: String, export: String },

    #[error(
        "NBD client sent request magic {found:#010x} instead of {:#010x}; closing the connection",
        proto::NBD_REQUEST_MAGIC
    )]
    RequestMagic { found: u32 },

    #[error("NBD client did not finish the handshake within {} s", HANDSHAKE_TIMEOUT.as_secs())]
    HandshakeTimeout,
}

impl NbdError {
    fn io(step: &'static str) -> impl FnOnce(io::Error) -> NbdError {
        move |source| NbdError::Io { step, source }
    }
}

/// Serves one client connection until it disconnects or breaks the protocol.
///
/// Runs the handshake, then the transmission phase. A client that closes the
/// connection between two messages ends the call with `Ok(())`.
pub async fn serve_connection<D, S>(
    stream: S,
    device: Arc<D>,
    options: Arc<ServerOptions>,
) -> Result<(), NbdError>
where
    D: BlockDevice,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    run_connection(stream, device, options, None).await
}

/// Serves the transmission phase on a connection whose handshake happened
/// elsewhere, with simple replies only.
///
/// This is the server side of a socket handed to the kernel NBD client, which
/// does no handshake and reads simple replies only.
pub async fn serve_transmission<D, S>(
    stream: S,
    device: Arc<D>,
    options: Arc<ServerOptions>,
) -> Result<(), NbdError>
where
    D: BlockDevice,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    options.validate()?;
    let negotiated = handshake::Negotiated {
        structured_replies: false,
        base_allocation: false,
    };
    transmission::transmit(stream, device, options, negotiated, None).await
}

/// Serves one connection. When `shutdown` fires, the connection ends after
/// the replies to the requests already read are sent.
async fn run_connection<D, S>(
    mut stream: S,
    device: Arc<D>,
    options: Arc<ServerOptions>,
    shutdown: Option<Shutdown>,
) -> Result<(), NbdError>
where
    D: BlockDevice,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    options.validate()?;

    let size = device.size();
    let handshake = handshake::negotiate(&mut stream, size, device.is_writable(), &options);
    let outcome = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(outcome) => outcome?,
        Err(_elapsed) => return Err(NbdError::HandshakeTimeout),
    };

    match outcome {
        handshake::Outcome::Closed => Ok(()),
        handshake::Outcome::Transmission(negotiated) => {
            transmission::transmit(stream, device, options, negotiated, shutdown).await
        }
    }
}

/// Fills `buf` from `stream`; returns `Ok(false)` when the stream ends before
/// the first byte, which is how a client closes a connection between messages.
async fn read_exact_or_eof<R: AsyncRead + Unpin>(
    stream: &mut R,
    buf: &mut [u8],
) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = stream.read(&mut buf[filled..]).await?;
        if n == 0 {
            if filled == 0 {
                return Ok(false);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("connection closed after {filled} of {} bytes", buf.len()),
            ));
        }
        filled += n;
    }
    Ok(true)
}

/// Waits until `shutdown` signals a stop, or forever when there is no signal.
async fn wait_for_shutdown(shutdown: &mut Option<Shutdown>) {
    match shutdown {
        // A closed channel also means stop, because no sender is left to signal.
        Some(receiver) => {
            let _ = receiver.wait_for(|stop| *stop).await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
