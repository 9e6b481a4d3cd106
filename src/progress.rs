//! Progress of long work (whole-layer downloads, export, the start-up prefetch): indicatif bars when standard error is a terminal, log lines otherwise.
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
    Bar(ProgressBar, Option<FileCount>),
    Log(Arc<LogTask>),
}

/// The file count of a task started with [`file_task`].
struct FileCount {
    label: String,
    total: u64,
    done: AtomicU64,
}

struct LogTask {
    label: String,
    total: u64,
    done: AtomicU64,
    started: Instant,
    last_line: Mutex<Instant>,
    /// Set for a [`file_task`], which logs only its start and its end.
    files: Option<FileCount>,
}

impl FileCount {
    fn new(label: &str, total: u64) -> FileCount {
        FileCount {
            label: label.to_string(),
            total,
            done: AtomicU64::new(0),
        }
    }

    /// Formats the bar's message: `LABEL DONE/TOTAL files`.
    fn message(&self) -> String {
        format!(
            "{} {}/{} files",
            self.label,
            self.done.load(Ordering::Relaxed),
            self.total
        )
    }
}

/// Starts a task of `total` bytes named `label`.
pub fn task(label: &str, total: u64) -> Task {
    let inner = match REPORTER.get() {
        None => TaskInner::None,
        Some(Reporter::Bars(bars)) => {
            let bar = new_bar(
                bars,
                total,
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            );
            bar.set_message(label.to_string());
            TaskInner::Bar(bar, None)
        }
        Some(Reporter::Log) => {
            tracing::info!(task = label, total_bytes = total, "started");
            TaskInner::Log(Arc::new(LogTask::new(label, total, None)))
        }
    };
    Task { inner }
}

/// Starts a task of `total_bytes` bytes in `total_files` files named
/// `label`, whose progress the caller sets with [`Task::set_done`]. The bar
/// shows files and bytes done with a rate and stays on screen when done.
/// Without a terminal only a start and an end line with the totals are logged.
pub fn file_task(label: &str, total_files: u64, total_bytes: u64) -> Task {
    let inner = match REPORTER.get() {
        None => TaskInner::None,
        Some(Reporter::Bars(bars)) => {
            let bar = new_bar(
                bars,
                total_bytes,
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            );
            let files = FileCount::new(label, total_files);
            bar.set_message(files.message());
            TaskInner::Bar(bar, Some(files))
        }
        Some(Reporter::Log) => {
            tracing::info!(task = label, total_files, total_bytes, "started");
            let files = FileCount::new(label, total_files);
            TaskInner::Log(Arc::new(LogTask::new(label, total_bytes, Some(files))))
        }
    };
    Task { inner }
}

fn new_bar(bars: &MultiProgress, total: u64, template: &str) -> ProgressBar {
    let bar = bars.add(ProgressBar::new(total));
    let style = ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar
}

impl LogTask {
    fn new(label: &str, total: u64, files: Option<FileCount>) -> LogTask {
        let now = Instant::now();
        LogTask {
            label: label.to_string(),
            total,
            done: AtomicU64::new(0),
            started: now,
            last_line: Mutex::new(now),
            files,
        }
    }
}

impl Task {
    /// Records `bytes` more of the work as done.
    pub fn advance(&self, bytes: u64) {
        match &self.inner {
            TaskInner::None => {}
            TaskInner::Bar(bar, _) => bar.inc(bytes),
            TaskInner::Log(task) => {
                let done = task.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
                if task.files.is_some() {
                    return;
                }
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

    /// Sets the files and bytes done so far, for work measured by looking
    /// at its result rather than counted as it goes.
    pub fn set_done(&self, files: u64, bytes: u64) {
        match &self.inner {
            TaskInner::None => {}
            TaskInner::Bar(bar, count) => {
                if let Some(count) = count {
                    count.done.store(files, Ordering::Relaxed);
                    bar.set_message(count.message());
                }
                bar.set_position(bytes);
            }
            TaskInner::Log(task) => {
                task.done.store(bytes, Ordering::Relaxed);
                if let Some(count) = &task.files {
                    count.done.store(files, Ordering::Relaxed);
                }
            }
        }
    }

    /// Whether the progress is drawn live, so polling for [`Task::set_done`]
    /// is worth it before the end.
    pub fn is_live(&self) -> bool {
        matches!(self.inner, TaskInner::Bar(..))
    }

    /// Ends the task: a byte task's bar disappears and a file task's bar stays
    /// in its final state; without a terminal a last log line is written.
    pub fn finish(&self) {
        match &self.inner {
            TaskInner::None => {}
            TaskInner::Bar(bar, None) => bar.finish_and_clear(),
            TaskInner::Bar(bar, Some(_)) => bar.finish(),
            TaskInner::Log(task) => {
                let done = task.done.load(Ordering::Relaxed);
                let elapsed = task.started.elapsed();
                let elapsed_ms = elapsed.as_millis() as u64;
                match &task.files {
                    None => {
                        tracing::info!(task = %task.label, done_bytes = done, elapsed_ms, "finished")
                    }
                    Some(count) => {
                        let bytes_per_sec = (done as f64 / elapsed.as_secs_f64().max(1e-3)) as u64;
                        tracing::info!(
                            task = %task.label,
                            done_files = count.done.load(Ordering::Relaxed),
                            total_files = count.total,
                            done_bytes = done,
                            total_bytes = task.total,
                            elapsed_ms,
                            bytes_per_sec,
                            "finished"
                        )
                    }
                }
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
