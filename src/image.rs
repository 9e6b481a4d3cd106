//! Opening an image: resolve the manifest, read each layer's footer and TOC
//! (or fetch a non-eStargz layer whole), merge the layers and decide the ext4
//! layout.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use futures::future::try_join_all;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::estargz::{self, TocLimits};
use crate::ext4::{Layout, LayoutOptions};
use crate::layer::LayerIndex;
use crate::oci_layout::open_oci_layout;
use crate::reference::{parse_image_arg, ImageArg};
use crate::registry::{open_registry, RegistryOptions};
use crate::source::{BlobSource, ImageSource, LayerDescriptor, Platform};
use crate::store::{
    download_verified, layer_tar_reader, ChunkStore, IoBackendChoice, StoreLayer, StoreOptions,
    WholeLayerWriter,
};
use crate::tarlayer;
use crate::tree::{merge_owned, Tree};
use crate::whole_dir::{is_unusable_cache, WholeLayerFallback};

/// Layer annotation holding the sha256 of the TOC JSON.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";

/// Everything that decides how an image is opened.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    pub platform: Platform,
    /// Check the TOC digest and every chunk digest.
    pub verify: bool,
    pub cache_dir: PathBuf,
    pub registry: RegistryOptions,
    pub io: IoBackendChoice,
    pub toc_limits: TocLimits,
}

/// An image ready to serve: its merged tree, ext4 layout and chunk store.
pub struct OpenedImage {
    /// The image argument as given, without credentials.
    pub description: String,
    pub manifest_digest: String,
    pub layers: Vec<Arc<LayerIndex>>,
    pub tree: Arc<Tree>,
    pub layout: Arc<Layout>,
    pub store: Arc<ChunkStore>,
    /// Blob traffic of opening the image: footers, TOCs and whole layers.
    pub startup: StartupFetch,
}

/// Blob traffic while the image was opened, before any read of the device.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct StartupFetch {
    pub bytes_fetched: u64,
    pub range_requests: u64,
}

/// A blob source that counts the requests and bytes going through it.
struct CountingBlob<'a> {
    inner: &'a dyn BlobSource,
    bytes: &'a AtomicU64,
    requests: &'a AtomicU64,
}

impl CountingBlob<'_> {
    async fn read_range(&self, offset: u64, len: u64) -> anyhow::Result<bytes::Bytes> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let bytes = self.inner.read_range(offset, len).await?;
        self.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(bytes)
    }
}

/// Opens `image` (`oci:DIR[:TAG]` or a registry reference) for serving.
pub async fn open_image(image: &str, options: &OpenOptions) -> anyhow::Result<OpenedImage> {
    let started = Instant::now();
    let source = open_source(image, &options.registry)?;
    let resolved = source
        .resolve(&options.platform)
        .await
        .with_context(|| format!("failed to resolve image {}", source.describe()))?;
    info!(
        image = %source.describe(),
        manifest = %resolved.manifest_digest,
        layers = resolved.layers.len(),
        "resolved image manifest"
    );
    if resolved.layers.is_empty() {
        bail!("image {} has no layers", source.describe());
    }

    let startup_bytes = AtomicU64::new(0);
    let startup_requests = AtomicU64::new(0);
    let fallback = WholeLayerFallback::default();
    let opened = try_join_all(
        resolved
            .layers
            .iter()
            .enumerate()
            .map(|(position, descriptor)| {
                open_layer(
                    &*source,
                    position,
                    descriptor,
                    options,
                    (&startup_bytes, &startup_requests),
                    &fallback,
                )
            }),
    )
    .await?;

    let mut entries = Vec::with_capacity(opened.len());
    let mut layers = Vec::with_capacity(opened.len());
    let mut store_layers = Vec::with_capacity(opened.len());
    let mut whole_layer_dirs = HashMap::new();
    for (mut index, blob, whole_dir) in opened {
        entries.push(std::mem::take(&mut index.entries));
        if let Some(dir) = whole_dir {
            whole_layer_dirs.insert(index.digest.clone(), dir);
        }
        let index = Arc::new(index);
        layers.push(index.clone());
        store_layers.push(StoreLayer { index, blob });
    }

    // The merge runs on a blocking thread, so the tree's small blocks come from
    // that thread's malloc arena. On the main heap they would sit between the
    // entries' freed blocks, and each would keep its page resident after the
    // trim below (7 MiB of the one-layer 1M-entry peak in scripts/bench/attach.sh).
    let tree = tokio::task::spawn_blocking(move || merge_owned(entries))
        .await
        .context("the merge task failed")?
        .context("failed to merge the image layers")?;
    let tree = Arc::new(tree);
    // The layers' entries are gone now; their memory is not needed for the
    // layout and the store that come next.
    crate::heap::release_free_memory();
    let layout_options = layout_options_for(&resolved.manifest_digest);
    let layout = Arc::new(
        Layout::new(tree.clone(), layout_options)
            .context("failed to lay out the ext4 filesystem")?,
    );
    let store = Arc::new(
        ChunkStore::open(
            store_layers,
            StoreOptions {
                cache_dir: options.cache_dir.clone(),
                verify: options.verify,
                io: options.io,
                whole_layer_dirs,
                ..StoreOptions::new(options.cache_dir.clone())
            },
        )
        .context("failed to open the chunk cache")?,
    );
    fallback.remove();
    // The layout's and the store's planning lists are gone too.
    crate::heap::release_free_memory();
    info!(
        image = %source.describe(),
        nodes = tree.nodes.len(),
        device_bytes = layout.size(),
        io = store.io_backend(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "image ready"
    );
    Ok(OpenedImage {
        description: source.describe(),
        manifest_digest: resolved.manifest_digest,
        layers,
        tree,
        layout,
        store,
        startup: StartupFetch {
            bytes_fetched: startup_bytes.load(Ordering::Relaxed),
            range_requests: startup_requests.load(Ordering::Relaxed),
        },
    })
}

/// Opens the image source named by `image`.
pub fn open_source(
    image: &str,
    registry: &RegistryOptions,
) -> anyhow::Result<Arc<dyn ImageSource>> {
    match parse_image_arg(image)? {
        ImageArg::Oci { dir, tag } => open_oci_layout(&dir, tag.as_deref()),
        ImageArg::Registry(reference) => open_registry(&reference, registry),
    }
}

/// Derives the filesystem UUID and directory hash seed from the manifest
/// digest, so the same image always gives the same bytes.
fn layout_options_for(manifest_digest: &str) -> LayoutOptions {
    let uuid_hash = Sha256::digest(format!("esgz-nbd uuid {manifest_digest}"));
    let seed_hash = Sha256::digest(format!("esgz-nbd hash seed {manifest_digest}"));
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&uuid_hash[..16]);
    // RFC 4122 version 4 and variant bits, so tools print a well-formed UUID.
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    let mut hash_seed = [0u8; 16];
    hash_seed.copy_from_slice(&seed_hash[..16]);
    LayoutOptions {
        uuid,
        hash_seed,
        volume_name: "esgz-nbd".to_string(),
        extra_free_blocks: 0,
    }
}

/// Reads one layer's index: lazily from its footer and TOC when it is
/// eStargz, otherwise by fetching it whole into the cache.
async fn open_layer(
    source: &dyn ImageSource,
    position: usize,
    descriptor: &LayerDescriptor,
    options: &OpenOptions,
    (bytes, requests): (&AtomicU64, &AtomicU64),
    fallback: &WholeLayerFallback,
) -> anyhow::Result<(LayerIndex, Option<Arc<dyn BlobSource>>, Option<PathBuf>)> {
    let layer = u32::try_from(position).context("too many layers")?;
    let blob = source.blob(descriptor)?;
    let counted = CountingBlob {
        inner: &*blob,
        bytes,
        requests,
    };
    let annotation = descriptor.annotations.get(TOC_DIGEST_ANNOTATION);

    let reason = match (annotation, options.verify) {
        (None, true) => Some(format!(
            "the layer descriptor has no {TOC_DIGEST_ANNOTATION} annotation, so its TOC cannot be verified"
        )),
        _ => match read_lazy_index(&counted, layer, descriptor, annotation, options).await? {
            LazyOutcome::Index(index) => {
                info!(layer = %descriptor.digest, chunks = index.chunks.len(), "layer is eStargz, read lazily");
                if !is_gzip_layer_type(&descriptor.media_type) {
                    warn!(layer = %descriptor.digest, media_type = %descriptor.media_type, "the layer's media type is not a gzip tar type, but its blob is eStargz (gzip): serving the blob as eStargz; other runtimes that follow the media type fail on this layer, so fix the manifest");
                }
                if index.entries.is_empty() {
                    warn!(layer = %descriptor.digest, "the layer's TOC lists no entries, so the layer adds nothing to the filesystem; check that the TOC was written by an eStargz tool");
                }
                return Ok((index, Some(blob), None));
            }
            LazyOutcome::NotEstargz(reason) => Some(reason),
        },
    };
    let reason = reason.unwrap_or_default();
    warn!(layer = %descriptor.digest, size = descriptor.size, %reason, "layer is not lazy: fetching it whole");
    match fetch_whole_layer(&counted, layer, descriptor, &options.cache_dir).await {
        Ok(index) => Ok((index, Some(blob), None)),
        Err(error) if is_unusable_cache(&error) => {
            let dir = fallback.dir()?;
            warn!(
                layer = %descriptor.digest,
                cache_dir = %options.cache_dir.display(),
                temporary_dir = %dir.display(),
                error = format!("{error:#}"),
                "the cache directory cannot hold the whole layer (full or read-only); fetching it again into a temporary directory, whose files are deleted at once but take disk space until the server stops"
            );
            let index = fetch_whole_layer(&counted, layer, descriptor, &dir)
                .await
                .with_context(|| {
                    format!(
                        "failed to unpack whole layer {} into {} after the cache directory {} could not hold it; free space in the cache directory or make it writable, or set TMPDIR to a directory with room for the layer",
                        descriptor.digest,
                        dir.display(),
                        options.cache_dir.display()
                    )
                })?;
            Ok((index, Some(blob), Some(dir)))
        }
        Err(error) => Err(error),
    }
}

/// Returns whether `media_type` names a gzip-compressed tar layer (OCI or Docker),
/// or is empty, as in a descriptor that did not state one.
fn is_gzip_layer_type(media_type: &str) -> bool {
    media_type.is_empty() || media_type.ends_with("tar+gzip") || media_type.ends_with("tar.gzip")
}

enum LazyOutcome {
    Index(LayerIndex),
    /// The blob has no valid eStargz footer. The reason describes what was found.
    NotEstargz(String),
}

async fn read_lazy_index(
    blob: &CountingBlob<'_>,
    layer: u32,
    descriptor: &LayerDescriptor,
    annotation: Option<&String>,
    options: &OpenOptions,
) -> anyhow::Result<LazyOutcome> {
    let size = descriptor.size;
    if size < estargz::LEGACY_FOOTER_SIZE {
        return Ok(LazyOutcome::NotEstargz(format!(
            "the blob is {size} bytes, shorter than an eStargz footer"
        )));
    }
    let tail_len = size.min(estargz::FOOTER_SIZE);
    let tail = blob
        .read_range(size - tail_len, tail_len)
        .await
        .with_context(|| format!("failed to read the footer of layer {}", descriptor.digest))?;
    let footer = match estargz::parse_footer(&tail, size) {
        Ok(footer) => footer,
        // The annotation marks the layer as eStargz, so a bad footer means a
        // corrupt blob, not a plain tar.gz.
        Err(error) if annotation.is_some() => bail!(
            "layer {} has a {TOC_DIGEST_ANNOTATION} annotation but its eStargz footer is invalid: {error}; the blob is corrupt, push the image again",
            descriptor.digest
        ),
        Err(error) => return Ok(LazyOutcome::NotEstargz(format!("no eStargz footer: {error}"))),
    };

    let toc_len = size - footer.footer_size - footer.toc_offset;
    let toc_member = blob
        .read_range(footer.toc_offset, toc_len)
        .await
        .with_context(|| {
            format!(
                "failed to read the TOC of layer {} at offset {:#x}",
                descriptor.digest, footer.toc_offset
            )
        })?;
    // The TOC JSON is parsed as it is decompressed; the digest covers all of it.
    let streamed = estargz::read_toc_index(
        layer,
        &descriptor.digest,
        &toc_member,
        footer.toc_offset,
        &options.toc_limits,
    )
    .with_context(|| format!("invalid TOC in layer {}", descriptor.digest))?;
    drop(toc_member);

    let actual = format!("sha256:{}", hex::encode(streamed.toc_digest));
    match annotation {
        Some(expected) if options.verify && *expected != actual => bail!(
            "TOC digest mismatch in layer {}: the {TOC_DIGEST_ANNOTATION} annotation is {expected} but the TOC hashes to {actual}; the blob or the manifest is corrupt (use --insecure-skip-verify only to debug)",
            descriptor.digest
        ),
        _ => {}
    }
    let index = streamed
        .index
        .with_context(|| format!("invalid TOC in layer {}", descriptor.digest))?;
    Ok(LazyOutcome::Index(index))
}

/// Downloads a whole layer into a temporary file (checking the blob digest),
/// then unpacks its tar into the layer's cache file.
async fn fetch_whole_layer(
    blob: &CountingBlob<'_>,
    layer: u32,
    descriptor: &LayerDescriptor,
    cache_dir: &Path,
) -> anyhow::Result<LayerIndex> {
    let progress = crate::progress::task(
        &format!("fetching layer {}", descriptor.digest),
        descriptor.size,
    );
    let download = download_verified(
        &descriptor.digest,
        descriptor.size,
        cache_dir,
        |offset, len| {
            let progress = &progress;
            async move {
                let bytes = blob.read_range(offset, len).await?;
                progress.advance(len);
                Ok(bytes)
            }
        },
    )
    .await?;
    progress.finish();

    let digest = descriptor.digest.clone();
    let cache_dir = cache_dir.to_path_buf();
    tokio::task::spawn_blocking(move || unpack_whole_layer(download, layer, &digest, &cache_dir))
        .await
        .context("the layer unpacking task failed")?
}

fn unpack_whole_layer(
    download: std::fs::File,
    layer: u32,
    digest: &str,
    cache_dir: &Path,
) -> anyhow::Result<LayerIndex> {
    let reader = layer_tar_reader(download, digest)?;

    // The tar is unpacked straight into the layer's cache file. Its data space
    // size is known only at the end, when `finish_with_size` sets the length.
    let mut writer = WholeLayerWriter::create_growable(cache_dir, digest)?;
    let mut sink = |data_offset: u64, bytes: &[u8]| writer.write_at(data_offset, bytes);
    let index = tarlayer::index_tar(layer, digest, reader, &mut sink)
        .with_context(|| format!("failed to read the tar of layer {digest}"))?;
    writer.finish_with_size(index.data_size)?;
    Ok(index)
}
