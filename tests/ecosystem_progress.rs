//! Progress of the start-up prefetch of `serve`: a bar with files, bytes and a
//! rate when standard error is a terminal (run under `script`, which gives the
//! server a pseudo-terminal), and a start and an end log line otherwise. The
//! basic fixture prioritizes two files, `bin/tool` and `data/f4097`.

#[path = "support/mod.rs"]
mod support;

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{fixture_dir, Server};

/// How long a test waits for the prefetch to show its end.
const PREFETCH_TIMEOUT: Duration = Duration::from_secs(60);

fn basic_image() -> String {
    format!("oci:{}:latest", fixture_dir("basic").join("oci").display())
}

/// Quotes `text` for `sh -c`.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// Polls `read` until `done` holds for its text; panics with the text after
/// [`PREFETCH_TIMEOUT`].
fn wait_for_text(what: &str, read: impl Fn() -> String, done: impl Fn(&str) -> bool) -> String {
    let started = Instant::now();
    loop {
        let text = read();
        if done(&text) {
            return text;
        }
        assert!(
            started.elapsed() < PREFETCH_TIMEOUT,
            "{what} did not appear within {PREFETCH_TIMEOUT:?}; output:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last drawing of a bar with both files done, as the terminal shows it:
/// `prefetch 2/2 files [=====] DONE/TOTAL RATE`.
#[derive(Debug)]
struct Bar {
    done: String,
    total: String,
    rate: String,
}

fn last_bar(text: &str) -> Option<Bar> {
    let drawing = text
        .rsplit("prefetch 2/2 files")
        .next()?
        .split(['\r', '\n', '\u{1b}'])
        .next()?;
    let (_, numbers) = drawing.split_once("] ")?;
    let (done, rest) = numbers.split_once('/')?;
    let words: Vec<&str> = rest.split_whitespace().collect();
    let [total_value, total_unit, rate_value, rate_unit, ..] = words[..] else {
        return None;
    };
    Some(Bar {
        done: done.trim().to_string(),
        total: format!("{total_value} {total_unit}"),
        rate: format!("{rate_value} {rate_unit}"),
    })
}

/// `script` running `esgz-nbd serve`; Drop ends it with SIGTERM, which
/// `script` passes on to the server.
struct TerminalServer {
    child: Child,
}

impl Drop for TerminalServer {
    fn drop(&mut self) {
        // SAFETY: kill with a valid signal number on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `serve` on the basic fixture under `script`, writing what the
/// terminal shows to `output`.
fn serve_on_terminal(dir: &Path, output: &Path) -> TerminalServer {
    let script_lookup = Command::new("sh")
        .args(["-c", "command -v script"])
        .output()
        .expect("running sh");
    assert!(
        script_lookup.status.success(),
        "the tool `script` (util-linux) is missing; install util-linux"
    );
    let serve = [
        support::esgz_bin().display().to_string(),
        "serve".to_string(),
        basic_image(),
        "--socket".to_string(),
        dir.join("nbd.sock").display().to_string(),
        "--cache-dir".to_string(),
        dir.join("cache").display().to_string(),
    ]
    .iter()
    .map(|word| shell_quote(word))
    .collect::<Vec<_>>()
    .join(" ");
    let log = fs::File::create(output).expect("creating the terminal log");
    let child = Command::new("script")
        .args(["-qec", &serve, "/dev/null"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(Stdio::null())
        .spawn()
        .expect("starting script");
    TerminalServer { child }
}

#[test]
fn prefetch_bar_on_a_terminal() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = dir.path().join("terminal.out");
    let server = serve_on_terminal(dir.path(), &output);
    let read = || String::from_utf8_lossy(&fs::read(&output).unwrap_or_default()).into_owned();

    // The bar stays on screen in its final state: all files and bytes, and a rate.
    let text = wait_for_text("the finished prefetch bar", read, |text| {
        last_bar(text).is_some_and(|bar| bar.done == bar.total)
    });
    let bar = last_bar(&text).expect("a bar");
    assert!(bar.total.ends_with("KiB"), "{bar:?}");
    assert!(bar.rate.ends_with("/s"), "the bar shows a rate: {bar:?}");
    assert!(
        text.contains("nbd+unix:///esgz-nbd?socket="),
        "the server printed its URI; output:\n{text}"
    );
    assert!(
        text.contains('\r') || text.contains("\u{1b}["),
        "the bar is drawn with terminal controls; output:\n{text}"
    );
    assert!(
        !text.contains("task=\"prefetch\""),
        "no plain progress lines on a terminal; output:\n{text}"
    );
    drop(server);
}

#[test]
fn prefetch_log_lines_without_a_terminal() {
    let server = Server::start(&basic_image(), &[]);
    let log = wait_for_text(
        "the prefetch end line",
        || server.log(),
        |log| log.contains("finished task=prefetch"),
    );
    let started: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("started task=\"prefetch\""))
        .collect();
    let finished: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("finished task=prefetch"))
        .collect();
    assert_eq!(started.len(), 1, "one start line; log:\n{log}");
    assert_eq!(finished.len(), 1, "one end line; log:\n{log}");
    assert!(
        started[0].contains("total_files=2 total_bytes="),
        "{}",
        started[0]
    );
    assert!(
        finished[0].contains("done_files=2 total_files=2"),
        "{}",
        finished[0]
    );
    let field = |line: &str, name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(&format!("{name}=")))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line}"))
    };
    let total = field(started[0], "total_bytes");
    assert!(total > 0, "{}", started[0]);
    assert_eq!(field(finished[0], "done_bytes"), total, "{}", finished[0]);
    assert_eq!(field(finished[0], "total_bytes"), total, "{}", finished[0]);
    assert!(field(finished[0], "bytes_per_sec") > 0, "{}", finished[0]);
    assert!(
        !log.contains('\r') && !log.contains('\u{1b}'),
        "no bar control characters without a terminal; log:\n{log:?}"
    );
}
