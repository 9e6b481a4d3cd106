//! Sending encoded replies on a connection. The command task that finished a reply
//! writes it itself when the socket is free, so the data leaves from the thread (and
//! CPU cache) that read it. Replies finished meanwhile are queued, and the task that is
//! writing sends them in one vectored write.

use std::io::{self, IoSlice};
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, OwnedSemaphorePermit};
use tracing::debug;

/// Maximum buffers passed to one `writev`, below the kernel's `IOV_MAX` of 1024.
const MAX_IOVECS: usize = 512;

/// One encoded reply with the budget it releases once written.
pub(super) struct Outgoing {
    pub(super) header: Vec<u8>,
    pub(super) payload: Option<Bytes>,
    pub(super) _permits: Permits,
}

/// The request slot and read-data budget a command keeps until its reply is written.
pub(super) struct Permits {
    pub(super) _request: OwnedSemaphorePermit,
    pub(super) _bytes: Option<OwnedSemaphorePermit>,
}

/// The write half of a connection shared by the command tasks.
pub(super) struct ReplySender<W> {
    /// Replies waiting for the task that has locked `writer`.
    queue: Mutex<Vec<Outgoing>>,
    writer: tokio::sync::Mutex<W>,
    /// The first write error. Replies queued after it are dropped.
    failure: Mutex<Option<io::Error>>,
    failed: watch::Sender<bool>,
}

impl<W: AsyncWrite + Unpin> ReplySender<W> {
    /// Creates a sender writing to `writer` that sets `failed` when a write fails.
    pub(super) fn new(writer: W, failed: watch::Sender<bool>) -> ReplySender<W> {
        ReplySender {
            queue: Mutex::new(Vec::new()),
            writer: tokio::sync::Mutex::new(writer),
            failure: Mutex::new(None),
            failed,
        }
    }

    /// Queues `reply` and, unless another task is writing (which then sends it),
    /// writes every queued reply.
    ///
    /// No reply is left behind: a task that finds the writer busy has queued its reply
    /// before it looked, and the writing task looks at the queue again after it lets
    /// go of the writer.
    pub(super) async fn send(&self, reply: Outgoing) {
        self.lock_queue().push(reply);
        loop {
            let Ok(mut writer) = self.writer.try_lock() else {
                return;
            };
            loop {
                let batch = std::mem::take(&mut *self.lock_queue());
                if batch.is_empty() {
                    break;
                }
                if *self.failed.borrow() {
                    continue;
                }
                if let Err(error) = write_batch(&mut *writer, &batch).await {
                    debug!(%error, "failed to send a reply; closing the connection");
                    self.failure
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .get_or_insert(error);
                    let _ = self.failed.send(true);
                }
                // Dropping the batch releases the replies' request slots and budget.
            }
            drop(writer);
            if self.lock_queue().is_empty() {
                return;
            }
        }
    }

    /// Shuts the write half down after the last reply; returns the first write error.
    pub(super) async fn close(&self) -> io::Result<()> {
        if let Some(error) = self
            .failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            return Err(error);
        }
        self.writer.lock().await.shutdown().await
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, Vec<Outgoing>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Writes the headers and payloads of `batch` in order, straight from their
/// buffers, with as few `writev` calls as the socket accepts.
async fn write_batch<W: AsyncWrite + Unpin>(writer: &mut W, batch: &[Outgoing]) -> io::Result<()> {
    let mut parts: Vec<&[u8]> = batch
        .iter()
        .flat_map(|reply| {
            [
                &reply.header[..],
                reply.payload.as_deref().unwrap_or_default(),
            ]
        })
        .filter(|part| !part.is_empty())
        .collect();
    let mut first = 0;
    while first < parts.len() {
        let slices: Vec<IoSlice<'_>> = parts[first..]
            .iter()
            .take(MAX_IOVECS)
            .map(|part| IoSlice::new(part))
            .collect();
        let mut written = writer.write_vectored(&slices).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        // Skip the parts sent whole, then cut the sent front off a partial one.
        while let Some(part) = parts.get_mut(first) {
            if written < part.len() {
                *part = &part[written..];
                break;
            }
            written -= part.len();
            first += 1;
        }
    }
    writer.flush().await
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::io::AsyncReadExt;
    use tokio::sync::Semaphore;

    use super::*;

    fn reply(header: &[u8], payload: &[u8], slots: &Arc<Semaphore>) -> Outgoing {
        Outgoing {
            header: header.to_vec(),
            payload: (!payload.is_empty()).then(|| Bytes::copy_from_slice(payload)),
            _permits: Permits {
                _request: Arc::clone(slots).try_acquire_owned().expect("a free slot"),
                _bytes: None,
            },
        }
    }

    /// Replies sent by many tasks at once arrive whole and each exactly once, even
    /// through a pipe small enough that writes stay partial, and their slots are
    /// released after the write.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_replies_arrive_whole() {
        const TASKS: usize = 64;
        const PAYLOAD: usize = 5000;
        let (client, server) = tokio::io::duplex(1024);
        let (failed, _) = watch::channel(false);
        let sender = Arc::new(ReplySender::new(server, failed));
        let slots = Arc::new(Semaphore::new(TASKS));

        let reader = tokio::spawn(async move {
            let mut client = client;
            let mut received = vec![0u8; TASKS * (8 + PAYLOAD)];
            client
                .read_exact(&mut received)
                .await
                .expect("reading replies");
            received
        });
        let mut tasks = tokio::task::JoinSet::new();
        for task in 0..TASKS {
            let sender = Arc::clone(&sender);
            let header = (task as u64).to_be_bytes();
            let outgoing = reply(&header, &[task as u8; PAYLOAD], &slots);
            tasks.spawn(async move { sender.send(outgoing).await });
        }
        while tasks.join_next().await.is_some() {}
        let received = reader.await.expect("reader task");
        sender.close().await.expect("close");

        let mut seen = [false; TASKS];
        for message in received.chunks_exact(8 + PAYLOAD) {
            let task = u64::from_be_bytes(message[..8].try_into().expect("8 bytes")) as usize;
            assert!(
                task < TASKS && !seen[task],
                "reply {task} repeated or unknown"
            );
            seen[task] = true;
            assert!(
                message[8..].iter().all(|byte| *byte == task as u8),
                "reply {task} is interleaved with another"
            );
        }
        assert!(seen.iter().all(|seen| *seen));
        assert_eq!(slots.available_permits(), TASKS, "a request slot was kept");
    }

    /// A write error is reported by `close` and sets the failure flag.
    #[tokio::test]
    async fn write_error_is_reported() {
        let (client, server) = tokio::io::duplex(64);
        drop(client);
        let (failed, mut watch) = watch::channel(false);
        let sender = ReplySender::new(server, failed);
        let slots = Arc::new(Semaphore::new(1));
        sender.send(reply(b"header", b"payload", &slots)).await;
        assert!(*watch.borrow_and_update(), "the failure flag was not set");
        assert!(sender.close().await.is_err());
        assert_eq!(slots.available_permits(), 1);
    }
}
