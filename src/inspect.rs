//! `esgz-nbd inspect`: an image's platforms and, per layer, whether it is eStargz, its TOC digest check, entry count and prefetch size, read from footers and TOCs only (eStargz spec, containerd/stargz-snapshotter docs/estargz.md).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use futures::future::try_join_all;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::estargz::{self, TocLimits, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK};
use crate::image::{open_source, TOC_DIGEST_ANNOTATION};
use crate::layer::Prefetch;
use crate::reference::{parse_image_arg, validate_digest, ImageArg};
use crate::registry::manifest::{parse_manifest, Manifest, MAX_MANIFEST_SIZE};
use crate::registry::{fetch_root_manifest, RegistryOptions};
use crate::source::{BlobSource, LayerDescriptor, Platform};

/// Annotation with the size of the decompressed layer.
pub const UNCOMPRESSED_SIZE_ANNOTATION: &str = "io.containers.estargz.uncompressed-size";

/// Inspection report of an image.
#[derive(Clone, Debug, Serialize)]
pub struct ImageReport {
    pub image: String,
    /// Platforms of the image index; empty for a single-platform image.
    pub platforms: Vec<PlatformEntry>,
    /// The platform requested (or the host's).
    pub platform: String,
    pub manifest_digest: String,
    pub layers: Vec<LayerReport>,
}

/// One manifest of an image index.
#[derive(Clone, Debug, Serialize)]
pub struct PlatformEntry {
    pub platform: String,
    pub digest: String,
    /// The manifest the requested platform resolved to.
    pub selected: bool,
}

/// Outcome of comparing the TOC with the layer's TOC digest annotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TocVerification {
    /// The TOC's sha256 equals the annotation.
    Verified,
    /// The TOC's sha256 differs from the annotation: the blob or manifest is corrupt.
    Mismatch,
    /// The layer has no annotation, so the TOC cannot be checked.
    NoAnnotation,
}

/// The prefetch hint of a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PrefetchReport {
    /// `.prefetch.landmark`: the blob's first `bytes` hold the files to prefetch.
    Landmark { bytes: u64 },
    /// `.no.prefetch.landmark`: prefetch nothing.
    Nothing,
    /// No landmark.
    Unknown,
}

/// Inspection report of one layer.
#[derive(Clone, Debug, Serialize)]
pub struct LayerReport {
    pub digest: String,
    pub media_type: String,
    /// Compressed size from the descriptor.
    pub size: u64,
    /// Value of `io.containers.estargz.uncompressed-size`, if present.
    pub uncompressed_size: Option<u64>,
    /// Whether the blob has a valid eStargz footer and TOC.
    pub estargz: bool,
    /// Reason the layer is not read lazily, when it is not.
    pub not_estargz_reason: Option<String>,
    /// The `containerd.io/snapshot/stargz/toc.digest` annotation.
    pub toc_digest: Option<String>,
    /// sha256 of the TOC JSON found in the blob.
    pub toc_digest_actual: Option<String>,
    pub toc_verification: Option<TocVerification>,
    pub toc_offset: Option<u64>,
    /// Entries in the TOC JSON as written, chunk entries and landmarks included.
    pub toc_entries: Option<usize>,
    pub prefetch: Option<PrefetchReport>,
}

impl LayerReport {
    /// Returns why `serve` and `export` reject this layer, or `None` when they read it.
    pub fn rejection(&self) -> Option<String> {
        if !self.estargz && self.toc_digest.is_some() {
            return Some(format!(
                "layer {} has a TOC digest annotation but no valid eStargz footer",
                self.digest
            ));
        }
        if self.toc_verification == Some(TocVerification::Mismatch) {
            return Some(format!(
                "the TOC of layer {} hashes to {}, not to its annotation {}",
                self.digest,
                self.toc_digest_actual.as_deref().unwrap_or("?"),
                self.toc_digest.as_deref().unwrap_or("?")
            ));
        }
        None
    }
}

/// A TOC entry, only the fields inspection needs.
#[derive(Deserialize)]
struct RawEntry {
    #[serde(default)]
    name: String,
}

#[derive(Deserialize)]
struct RawToc {
    #[serde(default)]
    entries: Vec<RawEntry>,
}

/// Inspects `image` for `platform`, fetching only manifests, configs,
/// footers and TOCs.
pub async fn inspect_image(
    image: &str,
    platform: &Platform,
    registry: &RegistryOptions,
    limits: &TocLimits,
) -> anyhow::Result<ImageReport> {
    let source = open_source(image, registry)?;
    let resolved = source
        .resolve(platform)
        .await
        .with_context(|| format!("failed to resolve image {}", source.describe()))?;
    let mut platforms = list_platforms(image, registry).await?;
    for entry in &mut platforms {
        entry.selected = entry.digest == resolved.manifest_digest;
    }

    let layers = try_join_all(resolved.layers.iter().map(|descriptor| {
        let source = &source;
        async move {
            let blob = source.blob(descriptor)?;
            inspect_layer(&*blob, descriptor, limits).await
        }
    }))
    .await?;
    Ok(ImageReport {
        image: source.describe(),
        platforms,
        platform: platform.to_string(),
        manifest_digest: resolved.manifest_digest,
        layers,
    })
}

/// Lists the platforms of the image index `image` names; a single manifest
/// gives an empty list.
async fn list_platforms(
    image: &str,
    registry: &RegistryOptions,
) -> anyhow::Result<Vec<PlatformEntry>> {
    let manifest = match parse_image_arg(image)? {
        ImageArg::Registry(reference) => {
            let (body, content_type) = fetch_root_manifest(&reference, registry).await?;
            parse_manifest(&reference.to_string(), &body, content_type.as_deref())?
        }
        ImageArg::Oci { dir, tag } => layout_root_manifest(&dir, tag.as_deref())?,
    };
    let Manifest::Index(index) = manifest else {
        return Ok(Vec::new());
    };
    Ok(index
        .manifests
        .iter()
        .filter_map(|entry| {
            let spec = entry.platform.as_ref()?;
            Some(PlatformEntry {
                platform: spec.describe(),
                digest: entry.digest.clone(),
                selected: false,
            })
        })
        .collect())
}

/// Returns the index that lists an OCI layout's platforms: the manifest
/// `index.json` names for `tag` when that is an index, else `index.json`
/// itself narrowed to the tag's entries.
fn layout_root_manifest(dir: &Path, tag: Option<&str>) -> anyhow::Result<Manifest> {
    let index_path = dir.join("index.json");
    let text = std::fs::read(&index_path)
        .with_context(|| format!("failed to read {}", index_path.display()))?;
    let what = index_path.display().to_string();
    let Manifest::Index(mut index) = parse_manifest(&what, &text, None)? else {
        anyhow::bail!("{what} is an image manifest, expected an image index");
    };
    if let Some(tag) = tag {
        index.manifests.retain(|entry| {
            entry
                .annotations
                .get(crate::registry::manifest::REF_NAME_ANNOTATION)
                .is_some_and(|name| name == tag)
        });
    }
    if let [only] = index.manifests.as_slice() {
        if only.media_type.contains("index") || only.media_type.contains("manifest.list") {
            validate_digest(&only.digest)?;
            anyhow::ensure!(
                only.size <= MAX_MANIFEST_SIZE,
                "index {} is {} bytes, over the limit of {MAX_MANIFEST_SIZE}",
                only.digest,
                only.size
            );
            let hex = only.digest.trim_start_matches("sha256:");
            let path = dir.join("blobs/sha256").join(hex);
            let body = std::fs::read(&path)
                .with_context(|| format!("failed to read {}", path.display()))?;
            return Ok(parse_manifest(
                &path.display().to_string(),
                &body,
                Some(&only.media_type),
            )?);
        }
    }
    Ok(Manifest::Index(index))
}

/// Reads one layer's footer and TOC and reports on them. A layer without a
/// valid footer is reported as not eStargz; a TOC that cannot be read is an error.
pub async fn inspect_layer(
    blob: &dyn BlobSource,
    descriptor: &LayerDescriptor,
    limits: &TocLimits,
) -> anyhow::Result<LayerReport> {
    let annotation = descriptor.annotations.get(TOC_DIGEST_ANNOTATION).cloned();
    let mut report = LayerReport {
        digest: descriptor.digest.clone(),
        media_type: descriptor.media_type.clone(),
        size: descriptor.size,
        uncompressed_size: descriptor
            .annotations
            .get(UNCOMPRESSED_SIZE_ANNOTATION)
            .and_then(|value| value.parse().ok()),
        estargz: false,
        not_estargz_reason: None,
        toc_digest: annotation.clone(),
        toc_digest_actual: None,
        toc_verification: None,
        toc_offset: None,
        toc_entries: None,
        prefetch: None,
    };

    let size = descriptor.size;
    if size < estargz::LEGACY_FOOTER_SIZE {
        report.not_estargz_reason = Some(format!(
            "the blob is {size} bytes, shorter than an eStargz footer"
        ));
        return Ok(report);
    }
    let tail_len = size.min(estargz::FOOTER_SIZE);
    let tail = blob
        .read_range(size - tail_len, tail_len)
        .await
        .with_context(|| format!("failed to read the footer of layer {}", descriptor.digest))?;
    let footer = match estargz::parse_footer(&tail, size) {
        Ok(footer) => footer,
        Err(error) => {
            report.not_estargz_reason = Some(format!("no eStargz footer: {error}"));
            return Ok(report);
        }
    };
    report.toc_offset = Some(footer.toc_offset);

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
    let toc_json = estargz::extract_toc_json(&toc_member, limits.max_toc_bytes)
        .with_context(|| format!("invalid TOC in layer {}", descriptor.digest))?;
    let actual = format!("sha256:{}", hex::encode(Sha256::digest(&toc_json)));
    report.toc_verification = Some(match &annotation {
        None => TocVerification::NoAnnotation,
        Some(expected) if *expected == actual => TocVerification::Verified,
        Some(_) => TocVerification::Mismatch,
    });
    report.toc_digest_actual = Some(actual);

    let raw: RawToc = serde_json::from_slice(&toc_json)
        .with_context(|| format!("invalid TOC JSON in layer {}", descriptor.digest))?;
    report.toc_entries = Some(raw.entries.len());
    report.prefetch = Some(prefetch_report(
        &raw,
        &toc_json,
        footer.toc_offset,
        descriptor,
        limits,
    )?);
    report.estargz = true;
    Ok(report)
}

/// Finds the prefetch hint; the landmark's member offset (worked out by the
/// index builder, which also handles a landmark without data) is the size.
fn prefetch_report(
    raw: &RawToc,
    toc_json: &[u8],
    toc_offset: u64,
    descriptor: &LayerDescriptor,
    limits: &TocLimits,
) -> anyhow::Result<PrefetchReport> {
    let has = |landmark: &str| {
        raw.entries
            .iter()
            .any(|entry| entry.name.trim_start_matches("./") == landmark)
    };
    if !has(PREFETCH_LANDMARK) && !has(NO_PREFETCH_LANDMARK) {
        return Ok(PrefetchReport::Unknown);
    }
    let index = estargz::build_index(0, &descriptor.digest, toc_json, toc_offset, limits)
        .with_context(|| format!("invalid TOC in layer {}", descriptor.digest))?;
    Ok(match index.prefetch {
        Prefetch::Before { compressed_offset } => PrefetchReport::Landmark {
            bytes: compressed_offset,
        },
        Prefetch::Nothing => PrefetchReport::Nothing,
        Prefetch::Unknown => PrefetchReport::Unknown,
    })
}

/// Formats a report as aligned text for a terminal.
pub fn render_text(report: &ImageReport) -> String {
    let mut text = String::new();
    let _ = writeln!(text, "image:      {}", report.image);
    let _ = writeln!(text, "manifest:   {}", report.manifest_digest);
    if report.platforms.is_empty() {
        let _ = writeln!(text, "platforms:  single-platform image");
    } else {
        let _ = writeln!(text, "platforms:");
        for entry in &report.platforms {
            let mark = if entry.selected { " (selected)" } else { "" };
            let _ = writeln!(text, "  {:<16} {}{mark}", entry.platform, entry.digest);
        }
    }
    let count = report.layers.len();
    for (position, layer) in report.layers.iter().enumerate() {
        let _ = writeln!(text, "layer {}/{count}: {}", position + 1, layer.digest);
        let _ = writeln!(text, "  media type:   {}", layer.media_type);
        let _ = writeln!(text, "  size:         {} bytes", layer.size);
        if let Some(size) = layer.uncompressed_size {
            let _ = writeln!(text, "  uncompressed: {size} bytes");
        }
        if !layer.estargz {
            let reason = layer.not_estargz_reason.as_deref().unwrap_or("unknown");
            // serve and export fall back to a whole fetch only for a layer that
            // does not claim to be eStargz.
            let outcome = if layer.toc_digest.is_some() {
                "rejected when served: the descriptor has a TOC digest annotation, so the blob is corrupt"
            } else {
                "fetched whole when served"
            };
            let _ = writeln!(text, "  eStargz:      no ({reason}); {outcome}");
            continue;
        }
        let offset = layer.toc_offset.unwrap_or(0);
        let _ = writeln!(text, "  eStargz:      yes, TOC at offset {offset:#x}");
        let verification = match layer.toc_verification {
            Some(TocVerification::Verified) => "verified",
            Some(TocVerification::Mismatch) => "MISMATCH",
            Some(TocVerification::NoAnnotation) | None => "not checked (no annotation)",
        };
        let shown = layer
            .toc_digest
            .as_deref()
            .or(layer.toc_digest_actual.as_deref())
            .unwrap_or("");
        let _ = writeln!(text, "  TOC digest:   {shown} {verification}");
        if layer.toc_verification == Some(TocVerification::Mismatch) {
            let actual = layer.toc_digest_actual.as_deref().unwrap_or("");
            let _ = writeln!(text, "  TOC hashes to {actual}");
        }
        if let Some(entries) = layer.toc_entries {
            let _ = writeln!(text, "  TOC entries:  {entries}");
        }
        let prefetch = match layer.prefetch {
            Some(PrefetchReport::Landmark { bytes }) => {
                format!("{bytes} bytes before {PREFETCH_LANDMARK}")
            }
            Some(PrefetchReport::Nothing) => format!("nothing ({NO_PREFETCH_LANDMARK})"),
            Some(PrefetchReport::Unknown) | None => "no landmark".to_string(),
        };
        let _ = writeln!(text, "  prefetch:     {prefetch}");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use futures::future::BoxFuture;
    use std::collections::BTreeMap;

    /// A blob in memory.
    struct MemoryBlob(Vec<u8>);

    impl BlobSource for MemoryBlob {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }

        fn read_range(&self, offset: u64, len: u64) -> BoxFuture<'_, anyhow::Result<Bytes>> {
            let start = offset as usize;
            let end = start + len as usize;
            let bytes = Bytes::copy_from_slice(&self.0[start..end]);
            Box::pin(async move { Ok(bytes) })
        }
    }

    fn descriptor(blob: &[u8], annotation: Option<&str>) -> LayerDescriptor {
        let mut annotations = BTreeMap::new();
        if let Some(value) = annotation {
            annotations.insert(TOC_DIGEST_ANNOTATION.to_string(), value.to_string());
        }
        LayerDescriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            digest: format!("sha256:{}", hex::encode(Sha256::digest(blob))),
            size: blob.len() as u64,
            annotations,
        }
    }

    #[tokio::test]
    async fn plain_gzip_is_not_estargz() {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut encoder, &[7u8; 4096]).expect("gzip");
        let blob = encoder.finish().expect("gzip");
        let report = inspect_layer(
            &MemoryBlob(blob.clone()),
            &descriptor(&blob, None),
            &TocLimits::default(),
        )
        .await
        .expect("inspects");
        assert!(!report.estargz);
        assert!(report.not_estargz_reason.is_some());
        assert_eq!(report.toc_entries, None);
    }

    #[tokio::test]
    async fn tiny_blob_is_not_estargz() {
        let blob = vec![1u8; 10];
        let report = inspect_layer(
            &MemoryBlob(blob.clone()),
            &descriptor(&blob, None),
            &TocLimits::default(),
        )
        .await
        .expect("inspects");
        assert!(!report.estargz);
        let reason = report.not_estargz_reason.expect("a reason");
        assert!(reason.contains("shorter"), "{reason}");
    }
}
