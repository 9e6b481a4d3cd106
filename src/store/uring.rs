//! Cache file I/O through io_uring: a probe with `io_uring_setup(2)` and a dedicated
//! thread that runs a tokio-uring 0.5 runtime and serves read and write requests.

use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::mpsc as std_mpsc;
use std::thread;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio_uring::buf::BoundedBuf;

use super::error::StoreError;

/// Submission queue size of the runtime. tokio-uring 0.5 submits the queue to the kernel
/// when it is full, so this bounds one batch, not the operations in flight.
const RING_ENTRIES: u32 = 256;

/// Size of `struct io_uring_params` in the Linux UAPI (`include/uapi/linux/io_uring.h`):
/// ten `u32` fields, then `io_sqring_offsets` and `io_cqring_offsets` (40 bytes each).
const IO_URING_PARAMS_WORDS: usize = 30;

/// Checks whether this process may create an io_uring instance.
///
/// tokio-uring panics in `start` when `io_uring_setup` fails (ENOSYS on old kernels, EPERM
/// from `kernel.io_uring_disabled` or a seccomp filter), so the store probes with a tiny
/// ring first and closes it again.
pub(crate) fn probe() -> io::Result<()> {
    let mut params = [0u32; IO_URING_PARAMS_WORDS];

    // SAFETY: `params` is a writable, zeroed buffer of exactly the size of
    // `struct io_uring_params` (120 bytes), and it outlives the call. The kernel reads the
    // zeroed flags from it and writes the ring offsets back into it.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 2u32, params.as_mut_ptr()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }

    let fd = libc::c_int::try_from(fd).map_err(|_| {
        io::Error::other(format!(
            "io_uring_setup returned an invalid descriptor {fd}"
        ))
    })?;
    // SAFETY: `fd` was just returned by io_uring_setup and is not stored anywhere else, so
    // this close cannot affect another owner of the descriptor.
    unsafe { libc::close(fd) };
    Ok(())
}

enum Request {
    Read {
        file: usize,
        offset: u64,
        len: usize,
        reply: oneshot::Sender<io::Result<Bytes>>,
    },
    Write {
        file: usize,
        offset: u64,
        data: Bytes,
        reply: oneshot::Sender<io::Result<()>>,
    },
}

/// Handle to the io_uring thread; dropping the last handle stops the thread once the
/// requests in flight are done.
pub(crate) struct UringBackend {
    requests: mpsc::UnboundedSender<Request>,
}

impl UringBackend {
    /// Starts the io_uring thread, which owns `files` (indexed by position).
    pub(crate) fn start(files: Vec<std::fs::File>) -> Result<UringBackend, StoreError> {
        let (requests, receiver) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std_mpsc::channel::<Result<(), String>>();

        thread::Builder::new()
            .name("esgz-cache-uring".to_string())
            .spawn(move || run_thread(files, receiver, ready_tx))
            .map_err(|error| StoreError::StartUring {
                reason: format!("failed to spawn the thread: {error}"),
            })?;

        match ready_rx.recv() {
            Ok(Ok(())) => Ok(UringBackend { requests }),
            Ok(Err(reason)) => Err(StoreError::StartUring { reason }),
            Err(_) => Err(StoreError::StartUring {
                reason: "the thread exited before it was ready".to_string(),
            }),
        }
    }

    /// Reads exactly `len` bytes of file `file` at `offset`.
    pub(crate) async fn read(&self, file: usize, offset: u64, len: usize) -> io::Result<Bytes> {
        let (reply, response) = oneshot::channel();
        self.requests
            .send(Request::Read {
                file,
                offset,
                len,
                reply,
            })
            .map_err(|_| thread_stopped())?;
        response.await.map_err(|_| thread_stopped())?
    }

    /// Writes all of `data` to file `file` at `offset`.
    pub(crate) async fn write(&self, file: usize, offset: u64, data: Bytes) -> io::Result<()> {
        let (reply, response) = oneshot::channel();
        self.requests
            .send(Request::Write {
                file,
                offset,
                data,
                reply,
            })
            .map_err(|_| thread_stopped())?;
        response.await.map_err(|_| thread_stopped())?
    }
}

fn thread_stopped() -> io::Error {
    io::Error::other("the io_uring thread stopped")
}

fn run_thread(
    files: Vec<std::fs::File>,
    mut receiver: mpsc::UnboundedReceiver<Request>,
    ready: std_mpsc::Sender<Result<(), String>>,
) {
    let ready_inside = ready.clone();
    let outcome = panic::catch_unwind(AssertUnwindSafe(move || {
        tokio_uring::builder()
            .entries(RING_ENTRIES)
            .start(async move {
                let files: Rc<Vec<tokio_uring::fs::File>> = Rc::new(
                    files
                        .into_iter()
                        .map(tokio_uring::fs::File::from_std)
                        .collect(),
                );
                // The receiver may be gone if start() gave up waiting; nothing to do then.
                let _ = ready_inside.send(Ok(()));

                while let Some(request) = receiver.recv().await {
                    tokio_uring::spawn(serve(Rc::clone(&files), request));
                }
            })
    }));

    if let Err(payload) = outcome {
        let reason = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|text| text.to_string()))
            .unwrap_or_else(|| "tokio-uring panicked".to_string());
        tracing::error!(%reason, "io_uring cache thread stopped");
        let _ = ready.send(Err(reason));
    }
}

async fn serve(files: Rc<Vec<tokio_uring::fs::File>>, request: Request) {
    match request {
        Request::Read {
            file,
            offset,
            len,
            reply,
        } => {
            let result = match files.get(file) {
                Some(handle) => read_exact(handle, offset, len).await,
                None => Err(unknown_file(file)),
            };
            let _ = reply.send(result);
        }
        Request::Write {
            file,
            offset,
            data,
            reply,
        } => {
            let result = match files.get(file) {
                Some(handle) => handle.write_all_at(data, offset).await.0,
                None => Err(unknown_file(file)),
            };
            let _ = reply.send(result);
        }
    }
}

async fn read_exact(file: &tokio_uring::fs::File, offset: u64, len: usize) -> io::Result<Bytes> {
    if len == 0 {
        return Ok(Bytes::new());
    }
    // A slice bounds the read to `len` even if the allocator gave more capacity.
    let buffer = Vec::with_capacity(len).slice(..len);
    let (result, buffer) = file.read_exact_at(buffer, offset).await;
    result?;
    Ok(Bytes::from(buffer.into_inner()))
}

fn unknown_file(file: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("no cache file with index {file}"),
    )
}
