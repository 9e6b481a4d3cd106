//! OCI image-spec and Docker image manifest v2 schema 2 types: manifests,
//! indexes (manifest lists), configs, platform selection and digest checks.

use std::collections::BTreeMap;

use bytes::Bytes;
use futures::future::BoxFuture;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::reference::validate_digest;
use crate::source::{LayerDescriptor, Platform, ResolvedImage};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// The `Accept` header value for manifest requests: every type this module parses.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// Largest manifest or index read, as in the distribution registry's own limit (4 MiB).
pub const MAX_MANIFEST_SIZE: u64 = 4 << 20;
/// Largest image config read.
pub const MAX_CONFIG_SIZE: u64 = 16 << 20;
/// Maximum depth of indexes nested inside indexes.
const MAX_INDEX_DEPTH: usize = 4;

/// Annotation naming the tag of a manifest in an OCI layout's `index.json`.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// Errors of parsing or checking a manifest, index or config.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("failed to parse {what} as JSON: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{what} is a Docker schema 1 manifest ({media_type}), which is deprecated and not supported: push the image again with a current tool"
    )]
    Schema1 { what: String, media_type: String },
    #[error("{what} has the unsupported media type {media_type:?}: expected an OCI or Docker v2 schema 2 manifest or index")]
    UnsupportedMediaType { what: String, media_type: String },
    #[error("{what} has schemaVersion {version}, expected 2")]
    SchemaVersion { what: String, version: u32 },
    #[error("{what} has the digest {actual}, expected {expected}: the content is corrupt or was replaced")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("{what} is {actual} bytes, but its descriptor says {expected}")]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },
    #[error("{what} is {size} bytes, more than the limit of {limit} bytes")]
    TooLarge { what: String, size: u64, limit: u64 },
    #[error(
        "{what} lists an invalid digest {digest:?}: expected sha256: and 64 lowercase hex digits"
    )]
    InvalidDigest { what: String, digest: String },
    #[error("no manifest for platform {requested} in {what}; available platforms: {available}. Pick one with --platform")]
    NoMatchingPlatform {
        what: String,
        requested: String,
        available: String,
    },
    #[error("{what} nests indexes more than {MAX_INDEX_DEPTH} levels deep")]
    IndexTooDeep { what: String },
    #[error(
        "image {manifest_digest} has {layers} layers but its config lists {diff_ids} rootfs.diff_ids: the image is inconsistent"
    )]
    LayerCountMismatch {
        manifest_digest: String,
        layers: usize,
        diff_ids: usize,
    },
}

/// A content descriptor (OCI image-spec `descriptor.md`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub platform: Option<PlatformSpec>,
}

/// The `platform` object of an index entry.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct PlatformSpec {
    pub os: String,
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl PlatformSpec {
    /// `OS/ARCH[/VARIANT]`.
    pub fn describe(&self) -> String {
        match &self.variant {
            Some(variant) => format!("{}/{}/{variant}", self.os, self.architecture),
            None => format!("{}/{}", self.os, self.architecture),
        }
    }
}

/// An image manifest (OCI or Docker v2 schema 2).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// An image index (OCI) or manifest list (Docker).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// The part of an image config this crate reads.
#[derive(Clone, Debug, Deserialize)]
pub struct ImageConfig {
    pub rootfs: RootFs,
    /// Platform the image was built for, when the config names it.
    #[serde(default)]
    pub os: Option<String>,
    #[serde(default)]
    pub architecture: Option<String>,
    #[serde(default)]
    pub variant: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// A parsed manifest document of either kind.
#[derive(Clone, Debug)]
pub enum Manifest {
    Index(ImageIndex),
    Image(ImageManifest),
}

/// Probe for the kind of a document whose media type is not known.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct KindProbe {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    schema_version: Option<u32>,
    #[serde(default)]
    manifests: Option<serde::de::IgnoredAny>,
}

/// Returns `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Parses a manifest or index. The media type comes from the `mediaType`
/// field, else from `content_type` (the HTTP header), else from the shape.
pub fn parse_manifest(
    what: &str,
    body: &[u8],
    content_type: Option<&str>,
) -> Result<Manifest, ManifestError> {
    let json_error = |source| ManifestError::Json {
        what: what.to_string(),
        source,
    };
    let probe: KindProbe = serde_json::from_slice(body).map_err(json_error)?;

    // Content-Type may carry parameters (`; charset=utf-8`) and is often
    // `application/json` on generic servers, so it is only a fallback.
    let header_type = content_type
        .map(|value| value.split(';').next().unwrap_or("").trim())
        .filter(|value| value.starts_with("application/vnd."));
    let media_type = probe.media_type.as_deref().or(header_type);

    if probe.schema_version == Some(1)
        || matches!(media_type, Some(DOCKER_SCHEMA1 | DOCKER_SCHEMA1_SIGNED))
    {
        return Err(ManifestError::Schema1 {
            what: what.to_string(),
            media_type: media_type.unwrap_or(DOCKER_SCHEMA1).to_string(),
        });
    }

    let is_index = match media_type {
        Some(OCI_INDEX | DOCKER_MANIFEST_LIST) => true,
        Some(OCI_MANIFEST | DOCKER_MANIFEST) => false,
        Some(other) => {
            return Err(ManifestError::UnsupportedMediaType {
                what: what.to_string(),
                media_type: other.to_string(),
            })
        }
        None => probe.manifests.is_some(),
    };

    let manifest = if is_index {
        let index: ImageIndex = serde_json::from_slice(body).map_err(json_error)?;
        check_schema_version(what, index.schema_version)?;
        Manifest::Index(index)
    } else {
        let image: ImageManifest = serde_json::from_slice(body).map_err(json_error)?;
        check_schema_version(what, image.schema_version)?;
        Manifest::Image(image)
    };
    Ok(manifest)
}

fn check_schema_version(what: &str, version: u32) -> Result<(), ManifestError> {
    if version == 2 {
        Ok(())
    } else {
        Err(ManifestError::SchemaVersion {
            what: what.to_string(),
            version,
        })
    }
}

/// Checks `bytes` against a descriptor's size and digest.
pub fn verify_content(
    what: &str,
    descriptor: &Descriptor,
    bytes: &[u8],
) -> Result<(), ManifestError> {
    let actual_size = bytes.len() as u64;
    if actual_size != descriptor.size {
        return Err(ManifestError::SizeMismatch {
            what: what.to_string(),
            expected: descriptor.size,
            actual: actual_size,
        });
    }
    verify_digest(what, &descriptor.digest, bytes)
}

/// Checks that `bytes` hash to `expected`.
pub fn verify_digest(what: &str, expected: &str, bytes: &[u8]) -> Result<(), ManifestError> {
    let actual = sha256_digest(bytes);
    if actual == expected {
        Ok(())
    } else {
        Err(ManifestError::DigestMismatch {
            what: what.to_string(),
            expected: expected.to_string(),
            actual,
        })
    }
}

/// Returns whether an index entry's platform satisfies `wanted`.
///
/// OS and architecture must be equal. A wanted variant must equal the entry's,
/// except that `arm64/v8` also matches an `arm64` entry without a variant
/// (v8 is the only arm64 variant in use). Without a wanted variant any
/// variant matches, and `select_platform` prefers the entry without one.
fn platform_matches(entry: &PlatformSpec, wanted: &Platform) -> bool {
    if entry.os != wanted.os || entry.architecture != wanted.architecture {
        return false;
    }
    match (&wanted.variant, &entry.variant) {
        (None, _) => true,
        (Some(wanted), Some(have)) => wanted == have,
        (Some(wanted), None) => entry.architecture == "arm64" && wanted == "v8",
    }
}

/// Logs a warning when a single-platform image was built for another platform than
/// `platform`. Serving goes on, because the filesystem is readable on any host (a
/// VM of that architecture, or an inspection of its files).
fn warn_platform_mismatch(what: &str, config: &ImageConfig, platform: &Platform) {
    let (Some(os), Some(architecture)) = (&config.os, &config.architecture) else {
        return;
    };
    let built_for = PlatformSpec {
        os: os.clone(),
        architecture: architecture.clone(),
        variant: config.variant.clone(),
    };
    if !platform_matches(&built_for, platform) {
        tracing::warn!(
            image = %what,
            built_for = %built_for.describe(),
            requested = %platform,
            "the image has one platform and it is not the requested one; serving it anyway (pass --platform {} to silence this)",
            built_for.describe()
        );
    }
}

/// Picks the index entry for `platform`. Entries without a platform are
/// skipped, because an index lists attestations and other artifacts that way.
pub fn select_platform<'a>(
    what: &str,
    manifests: &'a [Descriptor],
    platform: &Platform,
) -> Result<&'a Descriptor, ManifestError> {
    let mut matching = manifests.iter().filter(|entry| {
        entry
            .platform
            .as_ref()
            .is_some_and(|spec| platform_matches(spec, platform))
    });
    let first = matching.next();
    let without_variant = manifests.iter().find(|entry| {
        entry
            .platform
            .as_ref()
            .is_some_and(|spec| spec.variant.is_none() && platform_matches(spec, platform))
    });

    match without_variant.or(first) {
        Some(entry) => Ok(entry),
        None => {
            let available: Vec<String> = manifests
                .iter()
                .filter_map(|entry| entry.platform.as_ref().map(PlatformSpec::describe))
                .collect();
            Err(ManifestError::NoMatchingPlatform {
                what: what.to_string(),
                requested: platform.to_string(),
                available: if available.is_empty() {
                    "none listed".to_string()
                } else {
                    available.join(", ")
                },
            })
        }
    }
}

/// Source of the manifests and configs that the resolver reads by descriptor.
pub trait ContentFetcher: Send + Sync {
    /// Reads the manifest or index that `descriptor` names. The caller
    /// verifies the bytes; the second value is the media type the transport
    /// reported, if any.
    fn fetch_manifest<'a>(
        &'a self,
        descriptor: &'a Descriptor,
    ) -> BoxFuture<'a, anyhow::Result<(Bytes, Option<String>)>>;

    /// Reads the config blob that `descriptor` names. The caller verifies the bytes.
    fn fetch_config<'a>(
        &'a self,
        descriptor: &'a Descriptor,
    ) -> BoxFuture<'a, anyhow::Result<Bytes>>;
}

/// A manifest document already read and verified, where resolution starts.
pub struct RootManifest {
    /// Name for messages, such as the reference.
    pub what: String,
    pub digest: String,
    pub manifest: Manifest,
}

/// Walks from `root` through any indexes to the image manifest for
/// `platform`, then reads and verifies its config.
pub async fn resolve_image(
    fetcher: &dyn ContentFetcher,
    root: RootManifest,
    platform: &Platform,
) -> anyhow::Result<ResolvedImage> {
    let mut what = root.what;
    let mut digest = root.digest;
    let mut manifest = root.manifest;

    for _ in 0..=MAX_INDEX_DEPTH {
        let index = match manifest {
            Manifest::Image(image) => {
                return finish_image(fetcher, &what, digest, image, platform).await
            }
            Manifest::Index(index) => index,
        };

        let entry = select_platform(&what, &index.manifests, platform)?;
        check_descriptor_digest(&what, &entry.digest)?;
        check_size(
            &format!("manifest {}", entry.digest),
            entry.size,
            MAX_MANIFEST_SIZE,
        )?;
        tracing::debug!(index = %what, manifest = %entry.digest, %platform, "selected platform manifest");

        let child_what = format!("manifest {} of {what}", entry.digest);
        let (bytes, content_type) = fetcher.fetch_manifest(entry).await?;
        verify_content(&child_what, entry, &bytes)?;
        let media_type = (!entry.media_type.is_empty()).then_some(entry.media_type.as_str());
        manifest = parse_manifest(&child_what, &bytes, media_type.or(content_type.as_deref()))?;
        what = child_what;
        digest = entry.digest.clone();
    }
    Err(ManifestError::IndexTooDeep { what }.into())
}

async fn finish_image(
    fetcher: &dyn ContentFetcher,
    what: &str,
    manifest_digest: String,
    image: ImageManifest,
    platform: &Platform,
) -> anyhow::Result<ResolvedImage> {
    let config_what = format!("config {} of {what}", image.config.digest);
    check_descriptor_digest(what, &image.config.digest)?;
    check_size(&config_what, image.config.size, MAX_CONFIG_SIZE)?;
    let config_bytes = fetcher.fetch_config(&image.config).await?;
    verify_content(&config_what, &image.config, &config_bytes)?;
    let config: ImageConfig =
        serde_json::from_slice(&config_bytes).map_err(|source| ManifestError::Json {
            what: config_what.clone(),
            source,
        })?;
    warn_platform_mismatch(what, &config, platform);

    let mut layers = Vec::with_capacity(image.layers.len());
    for layer in image.layers {
        check_descriptor_digest(what, &layer.digest)?;
        layers.push(LayerDescriptor {
            media_type: layer.media_type,
            digest: layer.digest,
            size: layer.size,
            annotations: layer.annotations,
        });
    }
    for diff_id in &config.rootfs.diff_ids {
        check_descriptor_digest(&config_what, diff_id)?;
    }
    if layers.len() != config.rootfs.diff_ids.len() {
        return Err(ManifestError::LayerCountMismatch {
            manifest_digest,
            layers: layers.len(),
            diff_ids: config.rootfs.diff_ids.len(),
        }
        .into());
    }

    Ok(ResolvedImage {
        manifest_digest,
        layers,
        diff_ids: config.rootfs.diff_ids,
    })
}

fn check_descriptor_digest(what: &str, digest: &str) -> Result<(), ManifestError> {
    validate_digest(digest).map_err(|_| ManifestError::InvalidDigest {
        what: what.to_string(),
        digest: digest.to_string(),
    })
}

/// Rejects a size above `limit` before anything is read.
pub fn check_size(what: &str, size: u64, limit: u64) -> Result<(), ManifestError> {
    if size > limit {
        Err(ManifestError::TooLarge {
            what: what.to_string(),
            size,
            limit,
        })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(digest_byte: char, platform: Option<(&str, &str, Option<&str>)>) -> Descriptor {
        Descriptor {
            media_type: OCI_MANIFEST.to_string(),
            digest: format!("sha256:{}", digest_byte.to_string().repeat(64)),
            size: 1,
            annotations: BTreeMap::new(),
            platform: platform.map(|(os, architecture, variant)| PlatformSpec {
                os: os.to_string(),
                architecture: architecture.to_string(),
                variant: variant.map(str::to_string),
            }),
        }
    }

    #[test]
    fn select_platform_table() {
        let index = vec![
            entry('0', None),
            entry('1', Some(("linux", "amd64", None))),
            entry('2', Some(("linux", "arm", Some("v6")))),
            entry('3', Some(("linux", "arm", Some("v7")))),
            entry('4', Some(("linux", "arm64", Some("v8")))),
            entry('5', Some(("windows", "amd64", None))),
            entry('6', Some(("unknown", "unknown", None))),
        ];
        let cases: &[(&str, char)] = &[
            ("linux/amd64", '1'),
            ("windows/amd64", '5'),
            ("linux/arm/v7", '3'),
            ("linux/arm/v6", '2'),
            ("linux/arm", '2'),
            ("linux/arm64", '4'),
            ("linux/arm64/v8", '4'),
        ];
        for (wanted, expected) in cases {
            let platform = Platform::parse(wanted).expect("valid platform");
            let chosen = select_platform("test index", &index, &platform).expect(wanted);
            assert_eq!(chosen.digest, entry(*expected, None).digest, "{wanted}");
        }
    }

    #[test]
    fn select_platform_prefers_no_variant() {
        let index = vec![
            entry('a', Some(("linux", "arm64", Some("v9")))),
            entry('b', Some(("linux", "arm64", None))),
        ];
        let platform = Platform::parse("linux/arm64").expect("valid");
        let chosen = select_platform("test index", &index, &platform).expect("match");
        assert_eq!(chosen.digest, entry('b', None).digest);
        let v8 = Platform::parse("linux/arm64/v8").expect("valid");
        let chosen = select_platform("test index", &index, &v8).expect("v8 matches no variant");
        assert_eq!(chosen.digest, entry('b', None).digest);
    }

    #[test]
    fn select_platform_lists_available() {
        let index = vec![
            entry('1', Some(("linux", "amd64", None))),
            entry('2', Some(("linux", "arm", Some("v7")))),
        ];
        let platform = Platform::parse("linux/s390x").expect("valid");
        let error = select_platform("index of x", &index, &platform).expect_err("no s390x");
        let message = error.to_string();
        assert!(message.contains("linux/s390x"), "{message}");
        assert!(message.contains("linux/amd64, linux/arm/v7"), "{message}");
        let v7 = Platform::parse("linux/arm/v5").expect("valid");
        assert!(
            select_platform("index of x", &index, &v7).is_err(),
            "variant must match"
        );
    }

    #[test]
    fn parse_manifest_kinds() {
        let image = br#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:00","size":1},"layers":[]}"#;
        let index = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert!(matches!(
            parse_manifest("m", image, None),
            Ok(Manifest::Image(_))
        ));
        assert!(matches!(
            parse_manifest("m", index, None),
            Ok(Manifest::Index(_))
        ));
        assert!(matches!(
            parse_manifest("m", index, Some(OCI_INDEX)),
            Ok(Manifest::Index(_))
        ));
        assert!(matches!(
            parse_manifest(
                "m",
                image,
                Some("application/vnd.docker.distribution.manifest.v2+json; charset=utf-8")
            ),
            Ok(Manifest::Image(_))
        ));
        assert!(matches!(
            parse_manifest("m", image, Some("application/json")),
            Ok(Manifest::Image(_))
        ));

        let schema1 = br#"{"schemaVersion":1,"name":"x","fsLayers":[]}"#;
        assert!(matches!(
            parse_manifest("m", schema1, None),
            Err(ManifestError::Schema1 { .. })
        ));
        let odd = br#"{"schemaVersion":2,"mediaType":"application/vnd.example+json"}"#;
        assert!(matches!(
            parse_manifest("m", odd, None),
            Err(ManifestError::UnsupportedMediaType { .. })
        ));
        let version3 = br#"{"schemaVersion":3,"manifests":[]}"#;
        assert!(matches!(
            parse_manifest("m", version3, None),
            Err(ManifestError::SchemaVersion { .. })
        ));
        assert!(matches!(
            parse_manifest("m", b"not json", None),
            Err(ManifestError::Json { .. })
        ));
        assert!(matches!(
            parse_manifest("m", b"[]", None),
            Err(ManifestError::Json { .. })
        ));
    }

    #[test]
    fn verify_content_checks() {
        let body = b"hello";
        let descriptor = Descriptor {
            media_type: String::new(),
            digest: sha256_digest(body),
            size: 5,
            annotations: BTreeMap::new(),
            platform: None,
        };
        assert!(verify_content("blob", &descriptor, body).is_ok());
        assert!(matches!(
            verify_content("blob", &descriptor, b"hellO"),
            Err(ManifestError::DigestMismatch { .. })
        ));
        assert!(matches!(
            verify_content("blob", &descriptor, b"hello!"),
            Err(ManifestError::SizeMismatch { .. })
        ));
        assert_eq!(
            sha256_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
