//! Image conversion to eStargz (`convert`) and single-layer image builds
//! (`build`), reading from and writing to registries or OCI image layouts
//! (OCI image-spec manifest, index and config documents).

use std::collections::HashMap;
use std::io::{IsTerminal as _, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use serde_json::{json, Value};
use tracing::{debug, info, warn};

use crate::estargz::{parse_footer, FOOTER_SIZE};
use crate::oci_dir::{IndexEntry, OciDir};
use crate::reference::{parse_image_arg, validate_digest, ImageArg, Reference};
use crate::registry::manifest::{
    parse_manifest, select_platform, sha256_digest, verify_content, Descriptor, Manifest,
    DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, MAX_CONFIG_SIZE, MAX_MANIFEST_SIZE, OCI_INDEX,
    OCI_MANIFEST,
};
use crate::registry::{open_repository, RegistryOptions, Repository};
use crate::source::Platform;
use crate::writer::{
    format_rfc3339, read_tar_entries, rootfs::walk_tree, write_layer, LayerSummary, WriterOptions,
};

/// Layer annotation holding the sha256 of the TOC JSON.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Layer annotation holding the decompressed size of the blob.
pub const UNCOMPRESSED_SIZE_ANNOTATION: &str = "io.containers.estargz.uncompressed-size";
/// OCI gzip layer media type.
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Docker gzip layer media type.
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// OCI image config media type.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// Options of `convert`.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    pub writer: WriterOptions,
    /// Platform picked from an index unless `all_platforms`.
    pub platform: Platform,
    pub all_platforms: bool,
    /// Rewrite layers that are already eStargz.
    pub force: bool,
    pub registry: RegistryOptions,
    /// Show progress on standard error (only when it is a terminal).
    pub progress: bool,
}

/// Options of `build`.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub writer: WriterOptions,
    pub registry: RegistryOptions,
    pub progress: bool,
}

/// An image location, read from or written to.
enum Store {
    Oci {
        layout: OciDir,
        tag: Option<String>,
    },
    Registry {
        repository: Box<Repository>,
        reference: Reference,
    },
}

impl Store {
    fn open_source(text: &str, registry: &RegistryOptions) -> anyhow::Result<Store> {
        Ok(match parse_image_arg(text)? {
            ImageArg::Oci { dir, tag } => {
                if !dir.join("index.json").is_file() {
                    bail!(
                        "{} is not an OCI image layout: index.json is missing",
                        dir.display()
                    );
                }
                Store::Oci {
                    layout: OciDir::open(&dir),
                    tag,
                }
            }
            ImageArg::Registry(reference) => Store::Registry {
                repository: Box::new(open_repository(&reference, registry)?),
                reference,
            },
        })
    }

    fn open_destination(text: &str, registry: &RegistryOptions) -> anyhow::Result<Store> {
        Ok(match parse_image_arg(text)? {
            ImageArg::Oci { dir, tag } => Store::Oci {
                layout: OciDir::create(&dir)?,
                tag,
            },
            ImageArg::Registry(reference) => {
                if reference.digest.is_some() {
                    bail!("destination {text} pins a digest; name a tag instead, as the converted image gets a new digest");
                }
                Store::Registry {
                    repository: Box::new(open_repository(&reference, registry)?),
                    reference,
                }
            }
        })
    }

    fn describe(&self) -> String {
        match self {
            Store::Oci {
                layout,
                tag: Some(tag),
            } => format!("oci:{}:{tag}", layout.path().display()),
            Store::Oci { layout, tag: None } => format!("oci:{}", layout.path().display()),
            Store::Registry { reference, .. } => reference.to_string(),
        }
    }

    /// Creates a folder for temporary files. For a layout it is on the
    /// destination's filesystem, so finished blobs move in without a copy.
    fn temp_dir(&self) -> anyhow::Result<tempfile::TempDir> {
        let dir = match self {
            Store::Oci { layout, .. } => tempfile::Builder::new()
                .prefix(".esgz-tmp-")
                .tempdir_in(layout.path()),
            Store::Registry { .. } => tempfile::Builder::new()
                .prefix("esgz-nbd-convert-")
                .tempdir(),
        };
        dir.context("failed to create a temporary directory")
    }

    /// Reads the manifest or index the argument names; returns its bytes,
    /// media type (if known) and digest.
    async fn root(&self) -> anyhow::Result<(Bytes, Option<String>, String)> {
        match self {
            Store::Oci { layout, tag } => {
                let entry = layout.find(tag.as_deref())?;
                let bytes = Bytes::from(layout.read_blob(&entry.digest)?);
                check_digest(&format!("manifest {}", entry.digest), &entry.digest, &bytes)?;
                let media_type = (!entry.media_type.is_empty()).then_some(entry.media_type);
                Ok((bytes, media_type, entry.digest))
            }
            Store::Registry {
                repository,
                reference,
            } => {
                let (bytes, content_type) = repository
                    .get_manifest(reference.manifest_reference())
                    .await?;
                let digest = sha256_digest(&bytes);
                if let Some(pinned) = &reference.digest {
                    check_digest(&format!("manifest {pinned}"), pinned, &bytes)?;
                }
                Ok((bytes, content_type, digest))
            }
        }
    }

    /// Reads a manifest or config named by a descriptor and checks it.
    async fn small_blob(
        &self,
        descriptor: &Descriptor,
        what: &str,
        limit: u64,
    ) -> anyhow::Result<Bytes> {
        if descriptor.size > limit {
            bail!(
                "{what} {} is {} bytes, over the limit of {limit}",
                descriptor.digest,
                descriptor.size
            );
        }
        let bytes = match self {
            Store::Oci { layout, .. } => Bytes::from(layout.read_blob(&descriptor.digest)?),
            Store::Registry { repository, .. } if what == "manifest" => {
                repository.get_manifest(&descriptor.digest).await?.0
            }
            Store::Registry { repository, .. } => {
                repository
                    .get_blob(&descriptor.digest, descriptor.size)
                    .await?
            }
        };
        verify_content(&format!("{what} {}", descriptor.digest), descriptor, &bytes)?;
        Ok(bytes)
    }

    /// Returns a local file holding the blob: the layout's own file, or a
    /// download into `temp`.
    async fn blob_file(&self, digest: &str, size: u64, temp: &Path) -> anyhow::Result<PathBuf> {
        match self {
            Store::Oci { layout, .. } => {
                let path = layout.blob_path(digest)?;
                let length = std::fs::metadata(&path)
                    .with_context(|| {
                        format!("blob {digest} is missing from {}", layout.path().display())
                    })?
                    .len();
                if length != size {
                    bail!(
                        "blob {digest} in {} is {length} bytes, but its descriptor says {size}",
                        layout.path().display()
                    );
                }
                Ok(path)
            }
            Store::Registry { repository, .. } => {
                let path = temp.join(format!("download-{}", &digest["sha256:".len()..]));
                repository.download_blob(digest, size, &path).await?;
                Ok(path)
            }
        }
    }

    async fn has_blob(&self, digest: &str) -> anyhow::Result<bool> {
        Ok(match self {
            Store::Oci { layout, .. } => layout.has_blob(digest),
            Store::Registry { repository, .. } => repository.blob_exists(digest).await?,
        })
    }

    /// Stores a blob file; `move_file` allows taking the file (a temporary
    /// output) instead of copying it.
    async fn put_blob_file(
        &self,
        digest: &str,
        size: u64,
        path: &Path,
        move_file: bool,
    ) -> anyhow::Result<()> {
        match self {
            Store::Oci { layout, .. } => layout.put_blob_file(digest, path, move_file)?,
            Store::Registry { repository, .. } => {
                repository.push_blob_file(digest, size, path).await?;
            }
        }
        Ok(())
    }

    async fn put_blob_bytes(&self, bytes: Bytes) -> anyhow::Result<String> {
        let digest = sha256_digest(&bytes);
        match self {
            Store::Oci { layout, .. } => {
                layout.put_blob_bytes(&bytes)?;
            }
            Store::Registry { repository, .. } => {
                repository.push_blob_bytes(&digest, bytes).await?;
            }
        }
        Ok(digest)
    }

    /// Stores a manifest; `root` ones get the destination's tag.
    async fn put_manifest(
        &self,
        bytes: Bytes,
        media_type: &str,
        root: bool,
    ) -> anyhow::Result<String> {
        let digest = sha256_digest(&bytes);
        match self {
            Store::Oci { layout, tag } => {
                layout.put_blob_bytes(&bytes)?;
                if root {
                    let entry = IndexEntry {
                        media_type: media_type.to_string(),
                        digest: digest.clone(),
                        size: bytes.len() as u64,
                    };
                    layout.tag(&entry, tag.as_deref())?;
                }
            }
            Store::Registry {
                repository,
                reference,
            } => {
                let name = match (&reference.tag, root) {
                    (Some(tag), true) => tag.clone(),
                    _ => digest.clone(),
                };
                repository.put_manifest(&name, media_type, bytes).await?;
            }
        }
        Ok(digest)
    }
}

fn check_digest(what: &str, expected: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let actual = sha256_digest(bytes);
    if actual != expected {
        bail!("{what} has digest {actual}, expected {expected}: the content is corrupt");
    }
    Ok(())
}

/// A layer after conversion, reusable when several manifests share it.
#[derive(Clone, Debug)]
struct ConvertedLayer {
    digest: String,
    size: u64,
    diff_id: String,
    /// `None` when the layer was copied unchanged.
    annotations: Option<(String, u64)>,
}

/// State of one `convert` run.
struct Converter<'a> {
    source: Store,
    destination: Store,
    options: &'a ConvertOptions,
    temp: tempfile::TempDir,
    layers: HashMap<String, ConvertedLayer>,
    layer_count: usize,
    /// Prioritized paths found in at least one converted layer.
    prioritized_found: std::collections::BTreeSet<String>,
}

/// Converts every layer of the image `source` to eStargz and stores the
/// result at `destination`; returns the digest of the new root manifest.
pub async fn convert(
    source: &str,
    destination: &str,
    options: &ConvertOptions,
) -> anyhow::Result<String> {
    options.writer.validate()?;
    let source_store = Store::open_source(source, &options.registry)?;
    let destination_store = Store::open_destination(destination, &options.registry)?;
    let temp = destination_store.temp_dir()?;
    let mut converter = Converter {
        source: source_store,
        destination: destination_store,
        options,
        temp,
        layers: HashMap::new(),
        layer_count: 0,
        prioritized_found: std::collections::BTreeSet::new(),
    };

    let started = Instant::now();
    let (bytes, media_type, digest) = converter.source.root().await?;
    let what = format!("{} ({digest})", converter.source.describe());
    let manifest = parse_manifest(&what, &bytes, media_type.as_deref())?;
    let new_digest = match manifest {
        Manifest::Image(_) => converter.convert_image(&bytes, &what, true).await?.0,
        Manifest::Index(index) if options.all_platforms => {
            converter
                .convert_index(&bytes, &index.manifests, &what)
                .await?
        }
        Manifest::Index(index) => {
            let entry = select_platform(&what, &index.manifests, &options.platform)?;
            let child = converter
                .source
                .small_blob(entry, "manifest", MAX_MANIFEST_SIZE)
                .await?;
            let child_what = format!("manifest {} of {what}", entry.digest);
            converter.convert_image(&child, &child_what, true).await?.0
        }
    };
    let missed: Vec<&String> = options
        .writer
        .prioritized
        .iter()
        .filter(|path| !converter.prioritized_found.contains(*path))
        .collect();
    if !missed.is_empty() && converter.layer_count > 0 {
        warn!(
            ?missed,
            "prioritized files not found in any converted layer"
        );
    }
    info!(
        source = %converter.source.describe(),
        destination = %converter.destination.describe(),
        manifest = %new_digest,
        layers = converter.layer_count,
        seconds = started.elapsed().as_secs_f64(),
        "converted image"
    );
    Ok(new_digest)
}

impl Converter<'_> {
    async fn convert_index(
        &mut self,
        bytes: &[u8],
        entries: &[Descriptor],
        what: &str,
    ) -> anyhow::Result<String> {
        let mut index: Value =
            serde_json::from_slice(bytes).with_context(|| format!("failed to parse {what}"))?;
        let mut new_entries = Vec::new();
        for (position, entry) in entries.iter().enumerate() {
            let is_image = matches!(entry.media_type.as_str(), OCI_MANIFEST | DOCKER_MANIFEST);
            let platform = entry.platform.as_ref();
            if !is_image || platform.is_some_and(|p| p.os == "unknown") {
                // Attestations and other artifacts describe the source
                // manifests, whose digests the conversion changes.
                info!(digest = %entry.digest, media_type = %entry.media_type, "dropping an index entry that is not a platform image");
                continue;
            }
            let child = self
                .source
                .small_blob(entry, "manifest", MAX_MANIFEST_SIZE)
                .await?;
            let child_what = format!("manifest {} of {what}", entry.digest);
            let (digest, size, media_type) = self.convert_image(&child, &child_what, false).await?;
            let mut descriptor = index["manifests"][position].clone();
            descriptor["digest"] = json!(digest);
            descriptor["size"] = json!(size);
            descriptor["mediaType"] = json!(media_type);
            new_entries.push(descriptor);
        }
        if new_entries.is_empty() {
            bail!("{what} lists no platform image to convert");
        }
        index["manifests"] = Value::Array(new_entries);
        let media_type = index["mediaType"].as_str().unwrap_or(OCI_INDEX).to_string();
        let media_type = if media_type == DOCKER_MANIFEST_LIST {
            media_type
        } else {
            OCI_INDEX.to_string()
        };
        let bytes = serde_json::to_vec(&index)?;
        self.destination
            .put_manifest(Bytes::from(bytes), &media_type, true)
            .await
    }

    /// Converts one image manifest; returns its new digest, size and media type.
    async fn convert_image(
        &mut self,
        bytes: &[u8],
        what: &str,
        root: bool,
    ) -> anyhow::Result<(String, u64, String)> {
        let mut manifest: Value =
            serde_json::from_slice(bytes).with_context(|| format!("failed to parse {what}"))?;
        let parsed = match parse_manifest(what, bytes, None)? {
            Manifest::Image(image) => image,
            Manifest::Index(_) => {
                bail!("{what} is an index nested in an index, which convert does not handle")
            }
        };
        let docker = parsed.media_type.as_deref() == Some(DOCKER_MANIFEST);
        let media_type = parsed
            .media_type
            .clone()
            .unwrap_or_else(|| OCI_MANIFEST.to_string());

        let config_bytes = self
            .source
            .small_blob(&parsed.config, "config", MAX_CONFIG_SIZE)
            .await?;
        let mut config: Value = serde_json::from_slice(&config_bytes).with_context(|| {
            format!("failed to parse config {} of {what}", parsed.config.digest)
        })?;
        let old_diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
            .as_array()
            .map(|ids| {
                ids.iter()
                    .filter_map(|id| id.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if old_diff_ids.len() != parsed.layers.len() {
            bail!(
                "{what} has {} layers but its config lists {} diff_ids: the image is inconsistent",
                parsed.layers.len(),
                old_diff_ids.len()
            );
        }

        let mut diff_ids = Vec::new();
        for (position, layer) in parsed.layers.iter().enumerate() {
            validate_digest(&layer.digest)
                .with_context(|| format!("layer {} of {what}", position + 1))?;
            let converted = self
                .convert_layer(
                    layer,
                    &old_diff_ids[position],
                    position,
                    parsed.layers.len(),
                )
                .await?;
            let descriptor = &mut manifest["layers"][position];
            descriptor["digest"] = json!(converted.digest);
            descriptor["size"] = json!(converted.size);
            if let Some((toc_digest, uncompressed)) = &converted.annotations {
                descriptor["mediaType"] = json!(if docker {
                    DOCKER_LAYER_GZIP
                } else {
                    OCI_LAYER_GZIP
                });
                if !descriptor["annotations"].is_object() {
                    descriptor["annotations"] = json!({});
                }
                descriptor["annotations"][TOC_DIGEST_ANNOTATION] = json!(toc_digest);
                descriptor["annotations"][UNCOMPRESSED_SIZE_ANNOTATION] =
                    json!(uncompressed.to_string());
            }
            diff_ids.push(converted.diff_id.clone());
        }

        config["rootfs"]["diff_ids"] = json!(diff_ids);
        let config_bytes = Bytes::from(serde_json::to_vec(&config)?);
        let config_size = config_bytes.len() as u64;
        let config_digest = self.destination.put_blob_bytes(config_bytes).await?;
        manifest["config"]["digest"] = json!(config_digest);
        manifest["config"]["size"] = json!(config_size);

        let manifest_bytes = Bytes::from(serde_json::to_vec(&manifest)?);
        let size = manifest_bytes.len() as u64;
        let digest = self
            .destination
            .put_manifest(manifest_bytes, &media_type, root)
            .await?;
        debug!(%digest, what, "stored converted manifest");
        Ok((digest, size, media_type))
    }

    async fn convert_layer(
        &mut self,
        layer: &Descriptor,
        old_diff_id: &str,
        position: usize,
        count: usize,
    ) -> anyhow::Result<ConvertedLayer> {
        if let Some(done) = self.layers.get(&layer.digest) {
            return Ok(done.clone());
        }
        self.layer_count += 1;
        let label = format!(
            "layer {}/{count} {}",
            position + 1,
            short_digest(&layer.digest)
        );

        let already_estargz = layer.annotations.contains_key(TOC_DIGEST_ANNOTATION);
        if already_estargz && !self.options.force {
            let converted = ConvertedLayer {
                digest: layer.digest.clone(),
                size: layer.size,
                diff_id: old_diff_id.to_string(),
                annotations: None,
            };
            if !self.destination.has_blob(&layer.digest).await? {
                let path = self
                    .source
                    .blob_file(&layer.digest, layer.size, self.temp.path())
                    .await?;
                check_footer(&path, &layer.digest)?;
                self.destination
                    .put_blob_file(&layer.digest, layer.size, &path, false)
                    .await?;
            }
            info!(layer = %label, "layer is already eStargz, copied unchanged (pass --force to rewrite it)");
            self.layers.insert(layer.digest.clone(), converted.clone());
            return Ok(converted);
        }

        let input = self
            .source
            .blob_file(&layer.digest, layer.size, self.temp.path())
            .await?;
        let temp = self.temp.path().to_path_buf();
        let options = self.options.writer.clone();
        let media_type = layer.media_type.clone();
        let show_progress = self.options.progress;
        let progress_label = label.clone();
        let started = Instant::now();
        let (summary, output) = tokio::task::spawn_blocking(move || {
            convert_blob(
                &input,
                &media_type,
                &temp,
                &options,
                show_progress,
                &progress_label,
            )
        })
        .await
        .context("the conversion thread failed")??;
        info!(
            layer = %label,
            blob = %summary.blob_digest,
            size = summary.blob_size,
            uncompressed = summary.uncompressed_size,
            seconds = started.elapsed().as_secs_f64(),
            "converted layer to eStargz"
        );
        for path in &self.options.writer.prioritized {
            if !summary.missed_prioritized.contains(path) {
                self.prioritized_found.insert(path.clone());
            }
        }
        if !summary.missed_prioritized.is_empty() {
            debug!(layer = %label, missed = ?summary.missed_prioritized, "prioritized files not in this layer");
        }

        self.destination
            .put_blob_file(&summary.blob_digest, summary.blob_size, &output, true)
            .await?;
        let converted = ConvertedLayer {
            digest: summary.blob_digest.clone(),
            size: summary.blob_size,
            diff_id: summary.diff_id.clone(),
            annotations: Some((summary.toc_digest.clone(), summary.uncompressed_size)),
        };
        self.layers.insert(layer.digest.clone(), converted.clone());
        Ok(converted)
    }
}

fn short_digest(digest: &str) -> &str {
    &digest[..digest.len().min("sha256:".len() + 12)]
}

/// Checks that a blob marked as eStargz ends with a valid footer.
fn check_footer(path: &Path, digest: &str) -> anyhow::Result<()> {
    use std::io::{Seek, SeekFrom};
    let mut file =
        std::fs::File::open(path).with_context(|| format!("failed to open blob {digest}"))?;
    let size = file.metadata()?.len();
    let tail_len = size.min(FOOTER_SIZE);
    file.seek(SeekFrom::Start(size - tail_len))?;
    let mut tail = vec![0u8; tail_len as usize];
    file.read_exact(&mut tail)?;
    parse_footer(&tail, size).with_context(|| {
        format!("layer {digest} carries the {TOC_DIGEST_ANNOTATION} annotation but has no valid eStargz footer; pass --force to rewrite it")
    })?;
    Ok(())
}

/// Decompresses a layer blob into a tar and writes it as eStargz; returns
/// the summary and the path of the new blob.
fn convert_blob(
    input: &Path,
    media_type: &str,
    temp: &Path,
    options: &WriterOptions,
    show_progress: bool,
    label: &str,
) -> anyhow::Result<(LayerSummary, PathBuf)> {
    let tar_path = temp.join("layer.tar");
    decompress_layer(input, media_type, &tar_path)?;
    let entries = read_tar_entries(&tar_path)?;
    let total = std::fs::metadata(&tar_path)?.len();

    let output = temp.join("layer.esgz.partial");
    let file = std::fs::File::create(&output)
        .with_context(|| format!("failed to create {}", output.display()))?;
    let progress = Progress::new(label, total, show_progress);
    let summary = write_layer(
        entries,
        Some(&tar_path),
        std::io::BufWriter::with_capacity(1 << 20, file),
        options,
        &|bytes| progress.update(bytes),
    )?;
    progress.finish();
    std::fs::remove_file(&tar_path).ok();

    let final_path = temp.join(format!("blob-{}", &summary.blob_digest["sha256:".len()..]));
    std::fs::rename(&output, &final_path)?;
    Ok((summary, final_path))
}

/// Writes the uncompressed tar of a layer blob to `output`. gzip and
/// uncompressed tar layers are supported, recognised by their first bytes.
fn decompress_layer(input: &Path, media_type: &str, output: &Path) -> anyhow::Result<()> {
    let mut file = std::fs::File::open(input)
        .with_context(|| format!("failed to open {}", input.display()))?;
    let mut magic = [0u8; 4];
    let read = file.read(&mut magic)?;
    let file = std::fs::File::open(input)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(output)?);

    let result = if read >= 2 && magic[..2] == [0x1f, 0x8b] {
        let mut decoder =
            flate2::read::MultiGzDecoder::new(std::io::BufReader::with_capacity(1 << 20, file));
        std::io::copy(&mut decoder, &mut out)
    } else if read == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
        bail!(
            "layer {} ({media_type}) is zstd-compressed, which convert does not read yet",
            input.display()
        );
    } else {
        std::io::copy(&mut std::io::BufReader::new(file), &mut out)
    };
    result.with_context(|| {
        format!(
            "failed to decompress layer {} ({media_type})",
            input.display()
        )
    })?;
    out.flush()?;
    Ok(())
}

/// Progress on standard error: layer label, bytes, rate. Silent unless
/// standard error is a terminal.
struct Progress {
    label: String,
    total: u64,
    enabled: bool,
    started: Instant,
    last: std::cell::Cell<Option<Instant>>,
}

impl Progress {
    fn new(label: &str, total: u64, requested: bool) -> Progress {
        Progress {
            label: label.to_string(),
            total,
            enabled: requested && std::io::stderr().is_terminal(),
            started: Instant::now(),
            last: std::cell::Cell::new(None),
        }
    }

    fn update(&self, bytes: u64) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if self
            .last
            .get()
            .is_some_and(|last| now.duration_since(last).as_millis() < 200)
        {
            return;
        }
        self.last.set(Some(now));
        let seconds = now.duration_since(self.started).as_secs_f64().max(1e-3);
        let mib = |value: u64| value as f64 / (1 << 20) as f64;
        eprint!(
            "\r{}: {:.1} / {:.1} MiB, {:.1} MiB/s   ",
            self.label,
            mib(bytes),
            mib(self.total),
            mib(bytes) / seconds
        );
    }

    fn finish(&self) {
        if self.enabled {
            self.last.set(None);
            self.update(self.total);
            eprintln!();
        }
    }
}

/// Builds a single-layer eStargz image from a directory or a tar (plain or
/// gzip) and stores it at `destination`; returns the manifest digest.
pub async fn build(
    input: &Path,
    destination: &str,
    options: &BuildOptions,
) -> anyhow::Result<String> {
    options.writer.validate()?;
    std::fs::metadata(input).with_context(|| {
        format!(
            "failed to read the build input {}; give a root filesystem directory or a tar archive",
            input.display()
        )
    })?;
    // A layout that this build creates is removed again if the build fails, so a
    // failed build leaves nothing behind.
    let new_layout = match parse_image_arg(destination) {
        Ok(ImageArg::Oci { dir, .. }) if !dir.exists() => Some(dir),
        _ => None,
    };
    let result = build_into(input, destination, options).await;
    if let (Err(_), Some(dir)) = (&result, &new_layout) {
        if let Err(error) = std::fs::remove_dir_all(dir) {
            warn!(layout = %dir.display(), %error, "failed to remove the layout of the failed build");
        }
    }
    result
}

async fn build_into(
    input: &Path,
    destination: &str,
    options: &BuildOptions,
) -> anyhow::Result<String> {
    let store = Store::open_destination(destination, &options.registry)?;
    let temp = store.temp_dir()?;
    let input = input.to_path_buf();
    let temp_path = temp.path().to_path_buf();
    let writer_options = options.writer.clone();
    let show_progress = options.progress;

    let started = Instant::now();
    let (summary, blob) = tokio::task::spawn_blocking(move || {
        build_blob(&input, &temp_path, &writer_options, show_progress)
    })
    .await
    .context("the build thread failed")??;
    if !summary.missed_prioritized.is_empty() {
        bail!(
            "prioritized files not found in the input: {}",
            summary.missed_prioritized.join(", ")
        );
    }
    store
        .put_blob_file(&summary.blob_digest, summary.blob_size, &blob, true)
        .await?;

    let created = created_time();
    let platform = Platform::host();
    let config = json!({
        "created": created,
        "architecture": platform.architecture,
        "os": platform.os,
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [summary.diff_id]},
        "history": [{"created": created, "created_by": "esgz-nbd build"}],
    });
    let config_bytes = Bytes::from(serde_json::to_vec(&config)?);
    let config_size = config_bytes.len() as u64;
    let config_digest = store.put_blob_bytes(config_bytes).await?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [{
            "mediaType": OCI_LAYER_GZIP,
            "digest": summary.blob_digest,
            "size": summary.blob_size,
            "annotations": {
                TOC_DIGEST_ANNOTATION: summary.toc_digest,
                UNCOMPRESSED_SIZE_ANNOTATION: summary.uncompressed_size.to_string(),
            },
        }],
    });
    let digest = store
        .put_manifest(
            Bytes::from(serde_json::to_vec(&manifest)?),
            OCI_MANIFEST,
            true,
        )
        .await?;
    info!(
        destination = %store.describe(),
        manifest = %digest,
        blob_size = summary.blob_size,
        uncompressed = summary.uncompressed_size,
        seconds = started.elapsed().as_secs_f64(),
        "built image"
    );
    Ok(digest)
}

fn build_blob(
    input: &Path,
    temp: &Path,
    options: &WriterOptions,
    show_progress: bool,
) -> anyhow::Result<(LayerSummary, PathBuf)> {
    let metadata =
        std::fs::metadata(input).with_context(|| format!("failed to read {}", input.display()))?;
    let output = temp.join("layer.esgz.partial");
    let file = std::fs::File::create(&output)?;
    let sink = std::io::BufWriter::with_capacity(1 << 20, file);

    let summary = if metadata.is_dir() {
        let entries = walk_tree(input)?;
        let total = entries.iter().map(|entry| entry.meta.size).sum();
        let progress = Progress::new("build", total, show_progress);
        let summary = write_layer(entries, None, sink, options, &|bytes| {
            progress.update(bytes)
        })?;
        progress.finish();
        summary
    } else {
        let tar_path = temp.join("input.tar");
        decompress_layer(input, "input tar", &tar_path)?;
        // The spooled copy is an implementation detail: errors name the user's file.
        let entries = read_tar_entries(&tar_path).with_context(|| {
            format!(
                "{} is not a valid tar or tar.gz; give a root filesystem directory or a tar archive",
                input.display()
            )
        })?;
        let total = std::fs::metadata(&tar_path)?.len();
        let progress = Progress::new("build", total, show_progress);
        let summary = write_layer(entries, Some(&tar_path), sink, options, &|bytes| {
            progress.update(bytes)
        })?;
        progress.finish();
        summary
    };
    let final_path = temp.join("layer.esgz");
    std::fs::rename(&output, &final_path)?;
    Ok((summary, final_path))
}

/// Returns the image creation time: `SOURCE_DATE_EPOCH` when set (for
/// reproducible builds), else the current time.
fn created_time() -> String {
    let seconds = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|value| value.trim().parse::<i64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_secs() as i64)
        });
    format_rfc3339(seconds, 0)
}

/// Reads a `--prioritize` list: one path per line; blank lines and lines
/// starting with `#` are skipped.
pub fn read_prioritize_file(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "failed to read the prioritized file list {}",
            path.display()
        )
    })?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_string)
        .collect())
}
