//! The stats file of a running server: a JSON snapshot of its counters that
//! `esgz-nbd list` and scripts read while it runs.
//!
//! The file is replaced with a rename, so a reader sees a whole snapshot. It is
//! rewritten within [`INTERVAL`] of a change and not at all while nothing
//! changes, so a reader is at most that far behind the live counters.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, info, warn};

/// How often the counters are compared with the last snapshot written.
pub const INTERVAL: Duration = Duration::from_millis(200);

/// Writes `snapshot()` to `path` when it changed, every [`INTERVAL`], until
/// `stopped` changes, and then writes it a last time.
pub async fn write_loop(
    path: PathBuf,
    snapshot: impl Fn() -> serde_json::Value,
    mut stopped: watch::Receiver<bool>,
) {
    let mut state = WriterState::default();
    loop {
        write_if_changed(&path, &snapshot(), &mut state);
        tokio::select! {
            _ = tokio::time::sleep(INTERVAL) => {}
            _ = stopped.changed() => break,
        }
    }
    write_if_changed(&path, &snapshot(), &mut state);
}

/// State the writer keeps between two rounds.
#[derive(Default)]
struct WriterState {
    /// The text written last time, to skip unchanged snapshots.
    last: Option<Vec<u8>>,
    /// Whether the previous write failed, so a repeated failure is logged once.
    failing: bool,
}

/// Writes `value` unless it equals the text written last time. A failed write is
/// tried again one [`INTERVAL`] later. The first failure in a row is a warning,
/// and the repeats are logged at debug level.
fn write_if_changed(path: &Path, value: &serde_json::Value, state: &mut WriterState) {
    let text = match serde_json::to_vec_pretty(value) {
        Ok(text) => text,
        Err(error) => {
            warn!(%error, "failed to encode the stats");
            return;
        }
    };
    if state.last.as_ref() == Some(&text) {
        return;
    }
    let staging = path.with_extension("tmp");
    let result = std::fs::write(&staging, &text).and_then(|()| std::fs::rename(&staging, path));
    match result {
        Ok(()) => {
            if state.failing {
                info!(path = %path.display(), "the stats file is written again");
            }
            state.failing = false;
            state.last = Some(text);
        }
        Err(error) if state.failing => {
            debug!(path = %path.display(), %error, "failed to write the stats file again");
        }
        Err(error) => {
            state.failing = true;
            warn!(path = %path.display(), %error, "failed to write the stats file; retrying, with further failures logged at debug level");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// Polls `path` until its "served" field is `value`, for up to ten seconds.
    async fn wait_for_served(path: &Path, value: u64) {
        for _ in 0..200 {
            let current = std::fs::read(path)
                .ok()
                .and_then(|text| serde_json::from_slice::<serde_json::Value>(&text).ok());
            if current.is_some_and(|json| json["served"] == value) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{} never showed served = {value}", path.display());
    }

    #[tokio::test]
    async fn rewrites_on_change_and_at_stop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stats.json");
        let counter = Arc::new(AtomicU64::new(1));
        let (stop, stopped) = watch::channel(false);
        let seen = counter.clone();
        let task = tokio::spawn(write_loop(
            path.clone(),
            move || serde_json::json!({ "served": seen.load(Ordering::SeqCst) }),
            stopped,
        ));

        wait_for_served(&path, 1).await;
        let first = std::fs::metadata(&path).unwrap().modified().unwrap();
        // No change: the file is left alone.
        tokio::time::sleep(INTERVAL * 3).await;
        assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), first);

        counter.store(7, Ordering::SeqCst);
        wait_for_served(&path, 7).await;

        // The last value is written at stop, whenever the loop last looked.
        counter.store(9, Ordering::SeqCst);
        stop.send(true).unwrap();
        task.await.unwrap();
        let last: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(last["served"], 9);
        assert!(!path.with_extension("tmp").exists());
    }
}
