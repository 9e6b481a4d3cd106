//! `esgz-nbd export`: writes the image disk to a sparse raw file.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use futures::stream::{self, StreamExt, TryStreamExt};

use crate::device::BlockDevice;

/// Bytes read from the disk per step.
const EXPORT_STEP: u64 = 4 << 20;

/// Steps in flight at once, so fetches of different files overlap.
const EXPORT_PARALLELISM: usize = 8;

/// Copies every byte of `disk` to `path`; all-zero steps are left as holes.
pub async fn export_to_file<D: BlockDevice>(disk: Arc<D>, path: &Path) -> anyhow::Result<u64> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("failed to create {}", path.display()))?;
    let size = disk.size();
    file.set_len(size)
        .with_context(|| format!("failed to size {} to {size} bytes", path.display()))?;
    let file = Arc::new(file);

    let steps = (0..size.div_ceil(EXPORT_STEP)).map(|step| step * EXPORT_STEP);
    stream::iter(steps)
        .map(|offset| {
            let disk = disk.clone();
            let file = file.clone();
            async move {
                let len = (size - offset).min(EXPORT_STEP) as u32;
                let bytes = disk
                    .read(offset, len)
                    .await
                    .with_context(|| format!("failed to read the disk at {offset:#x}"))?;
                if bytes.iter().any(|&byte| byte != 0) {
                    let path_file = file.clone();
                    tokio::task::spawn_blocking(move || path_file.write_all_at(&bytes, offset))
                        .await
                        .context("the write task failed")?
                        .with_context(|| format!("failed to write at {offset:#x}"))?;
                }
                anyhow::Ok(())
            }
        })
        .buffer_unordered(EXPORT_PARALLELISM)
        .try_collect::<()>()
        .await?;

    file.sync_all()
        .with_context(|| format!("failed to sync {}", path.display()))?;
    Ok(size)
}
