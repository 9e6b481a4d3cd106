//! Progress of long work (whole-layer downloads, export): indicatif bars when standard error is a terminal, occasional log lines otherwise.
//!
//! The binary picks a reporter once with [`install`]; library code calls
//! [`task`] and gets a no-op handle when nothing is installed, as in tests.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::device::BlockDevice;

/// Minimum time between two log lines of one task without a terminal.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How progress is shown.
#[derive(Clone)]
pub enum Reporter {
    /// Bars on standard error; log lines go through [`BarWriter`] so they do
    /// not tear the bars.
    Bars(MultiProgress),
    /// `info` log lines at the start, every [`LOG_INTERVAL`] and at the end.
    Log,
}

static REPORTER: OnceLock<Reporter> = OnceLock::new();

/// Sets the process-wide reporter; a second call is ignored.
pub fn install(reporter: Reporter) {
    let _ = REPORTER.set(reporter);
}

/// Bars when standard error is a terminal, log lines otherwise.
pub fn reporter_for_stderr() -> Reporter {
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        Reporter::Bars(MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
    } else {
        Reporter::Log
    }
}

/// A `tracing` writer that hides the bars while a log line is written.
#[derive(Clone)]
pub struct BarWriter {
    bars: Option<MultiProgress>,
}

impl BarWriter {
    pub fn new(reporter: &Reporter) -> BarWriter {
        BarWriter {
            bars: match reporter {
                Reporter::Bars(bars) => Some(bars.clone()),
                Reporter::Log => None,
            },
        }
    }
}

impl Write for BarWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &self.bars {
            Some(bars) => bars.suspend(|| std::io::stderr().write_all(buf))?,
            None => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BarWriter {
    type Writer = BarWriter;

    fn make_writer(&'a self) -> BarWriter {
        self.clone()
    }
}

/// One unit of long work of a known number of bytes.
pub struct Task {
    inner: TaskInner,
}

enum TaskInner {
    None,
    Bar(ProgressBar),
    Log(Arc<LogTask>),
}

struct LogTask {
    label: String,
    total: u64,
    done: AtomicU64,
    started: Instant,
    last_line: Mutex<Instant>,
}

/// Starts a task of `total` bytes named `label`.
pub fn task(label: &str, total: u64) -> Task {
    let inner = match REPORTER.get() {
        None => TaskInner::None,
        Some(Reporter::Bars(bars)) => {
            let bar = bars.add(ProgressBar::new(total));
            let style = ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(label.to_string());
            TaskInner::Bar(bar)
        }
        Some(Reporter::Log) => {
            tracing::info!(task = label, total_bytes = total, "started");
            let now = Instant::now();
            TaskInner::Log(Arc::new(LogTask {
                label: label.to_string(),
                total,
                done: AtomicU64::new(0),
                started: now,
                last_line: Mutex::new(now),
            }))
        }
    };
    Task { inner }
}

impl Task {
    /// Records `bytes` more of the work as done.
    pub fn advance(&self, bytes: u64) {
        match &self.inner {
            TaskInner::None => {}
            TaskInner::Bar(bar) => bar.inc(bytes),
            TaskInner::Log(task) => {
                let done = task.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
                let now = Instant::now();
                let mut last = task.last_line.lock().unwrap_or_else(|p| p.into_inner());
                if now.duration_since(*last) >= LOG_INTERVAL {
                    *last = now;
                    let percent = done.saturating_mul(100) / task.total.max(1);
                    tracing::info!(task = %task.label, done_bytes = done, total_bytes = task.total, percent, "in progress");
                }
            }
        }
    }

    /// Ends the task; the bar disappears, or a last log line is written.
    pub fn finish(&self) {
        match &self.inner {
            TaskInner::None => {}
            TaskInner::Bar(bar) => bar.finish_and_clear(),
            TaskInner::Log(task) => {
                let done = task.done.load(Ordering::Relaxed);
                let elapsed_ms = task.started.elapsed().as_millis() as u64;
                tracing::info!(task = %task.label, done_bytes = done, elapsed_ms, "finished");
            }
        }
    }
}

/// A block device whose reads advance a progress task, for `export`.
pub struct ProgressDevice<D> {
    inner: Arc<D>,
    task: Task,
}

impl<D: BlockDevice> ProgressDevice<D> {
    pub fn new(inner: Arc<D>, label: &str) -> ProgressDevice<D> {
        let task = task(label, inner.size());
        ProgressDevice { inner, task }
    }

    /// Ends the progress display.
    pub fn finish(&self) {
        self.task.finish();
    }
}

impl<D: BlockDevice> BlockDevice for ProgressDevice<D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    async fn read(&self, offset: u64, len: u32) -> std::io::Result<bytes::Bytes> {
        let bytes = self.inner.read(offset, len).await?;
        self.task.advance(u64::from(len));
        Ok(bytes)
    }
}
