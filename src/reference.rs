//! Image references (`[HOST[:PORT]/]NAME[:TAG][@DIGEST]`) and image arguments,
//! following the Docker distribution reference grammar.
//!
//! Normalisation follows Docker: a reference without a registry host is on
//! `docker.io`, a one-component name there gets the `library/` prefix, and a
//! reference with neither tag nor digest gets the tag `latest`. The first
//! component is the registry host when it contains `.` or `:` or is
//! `localhost`, as Docker decides.

use std::fmt;
use std::path::PathBuf;

/// The registry name of Docker Hub as written in references.
pub const DOCKER_HUB: &str = "docker.io";
/// The host that serves Docker Hub's registry API.
pub const DOCKER_HUB_API_HOST: &str = "registry-1.docker.io";

/// Maximum length of a repository name, from the distribution reference grammar.
const MAX_REPOSITORY_LEN: usize = 255;
/// Maximum length of a tag, from the distribution reference grammar.
const MAX_TAG_LEN: usize = 128;

/// Errors of parsing a reference or an image argument.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    #[error("empty image reference: pass NAME[:TAG][@sha256:DIGEST] or oci:DIR[:TAG]")]
    Empty,
    #[error("invalid registry host {host:?} in reference {reference:?}: expected HOST[:PORT]")]
    InvalidHost { reference: String, host: String },
    #[error(
        "invalid repository name {name:?} in reference {reference:?}: use lowercase letters, digits and the separators '.', '_', '__', '-' between them, components joined by '/'"
    )]
    InvalidRepository { reference: String, name: String },
    #[error(
        "invalid tag {tag:?} in reference {reference:?}: a tag is 1 to 128 characters of [A-Za-z0-9_.-] and does not start with '.' or '-'"
    )]
    InvalidTag { reference: String, tag: String },
    #[error("invalid digest {digest:?}: expected sha256: followed by 64 lowercase hex digits")]
    InvalidDigest { digest: String },
    #[error("empty directory in image argument {argument:?}: use oci:DIR[:TAG]")]
    EmptyLayoutDir { argument: String },
}

/// A parsed, normalised image reference.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry host with an optional port, as written (`docker.io` for Docker Hub).
    pub registry: String,
    /// Repository path inside the registry, such as `library/alpine`.
    pub repository: String,
    /// Tag; `None` only when a digest is given without a tag.
    pub tag: Option<String>,
    /// Manifest digest (`sha256:<64 hex>`) when the reference pins one.
    pub digest: Option<String>,
}

impl Reference {
    /// Parses a reference and normalises it as Docker does.
    pub fn parse(text: &str) -> Result<Reference, ReferenceError> {
        if text.is_empty() {
            return Err(ReferenceError::Empty);
        }

        let (name_and_tag, digest) = match text.split_once('@') {
            Some((name, digest)) => {
                validate_digest(digest)?;
                (name, Some(digest.to_string()))
            }
            None => (text, None),
        };

        // The registry host is split off first, because a port's ':' would
        // otherwise look like a tag separator.
        let (registry, remainder) = match name_and_tag.split_once('/') {
            Some((first, rest)) if is_registry_host(first) => (first.to_string(), rest),
            _ => (DOCKER_HUB.to_string(), name_and_tag),
        };
        validate_host(text, &registry)?;

        let (repository, tag) = match remainder.rsplit_once(':') {
            Some((repository, tag)) => (repository, Some(tag.to_string())),
            None => (remainder, None),
        };
        if let Some(tag) = &tag {
            validate_tag(text, tag)?;
        }
        validate_repository(text, repository)?;

        let registry = if registry == "index.docker.io" {
            DOCKER_HUB.to_string()
        } else {
            registry
        };
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository.to_string()
        };
        let tag = match (&tag, &digest) {
            (None, None) => Some("latest".to_string()),
            _ => tag,
        };

        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// Host (and port) that serves the registry API for this reference.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API_HOST
        } else {
            &self.registry
        }
    }

    /// Returns the manifest reference for `/v2/<name>/manifests/<reference>`:
    /// the digest when pinned, otherwise the tag.
    pub fn manifest_reference(&self) -> &str {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => digest,
            (None, Some(tag)) => tag,
            (None, None) => "latest",
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(text: &str) -> Result<Reference, ReferenceError> {
        Reference::parse(text)
    }
}

/// An image given on the command line: an OCI layout directory or a registry reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageArg {
    /// `oci:DIR[:TAG]`.
    Oci { dir: PathBuf, tag: Option<String> },
    /// Anything else, optionally prefixed with `docker://`.
    Registry(Reference),
}

/// Parses an image argument.
///
/// `oci:DIR[:TAG]` names an OCI image layout. The text after the last ':' is
/// the tag only when it is not empty and contains no '/', so `oci:/a:b/dir`
/// is the directory `/a:b/dir` without a tag, and `oci:/a:b/dir:v1` is that
/// directory with the tag `v1`. A directory whose last component contains ':'
/// must therefore be followed by an explicit tag (or a trailing ':' for none).
/// Everything else is a registry reference; a `docker://` prefix is accepted.
pub fn parse_image_arg(text: &str) -> Result<ImageArg, ReferenceError> {
    if let Some(rest) = text.strip_prefix("oci:") {
        let (dir, tag) = match rest.rsplit_once(':') {
            Some((dir, tag)) if !tag.contains('/') => {
                let tag = (!tag.is_empty()).then(|| tag.to_string());
                (dir, tag)
            }
            _ => (rest, None),
        };
        if dir.is_empty() {
            return Err(ReferenceError::EmptyLayoutDir {
                argument: text.to_string(),
            });
        }
        return Ok(ImageArg::Oci {
            dir: PathBuf::from(dir),
            tag,
        });
    }

    let reference = text.strip_prefix("docker://").unwrap_or(text);
    Reference::parse(reference).map(ImageArg::Registry)
}

/// Checks that `digest` is `sha256:` followed by 64 lowercase hex digits, the
/// only digest form this crate reads. The check also makes the digest safe to
/// use as a file name.
pub fn validate_digest(digest: &str) -> Result<(), ReferenceError> {
    let valid = digest.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    });
    if valid {
        Ok(())
    } else {
        Err(ReferenceError::InvalidDigest {
            digest: digest.to_string(),
        })
    }
}

fn is_registry_host(component: &str) -> bool {
    component.contains('.') || component.contains(':') || component == "localhost"
}

/// Accepts `host`, `host:port`, `[v6]` and `[v6]:port`.
fn validate_host(reference: &str, host: &str) -> Result<(), ReferenceError> {
    let invalid = || ReferenceError::InvalidHost {
        reference: reference.to_string(),
        host: host.to_string(),
    };

    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let (address, after) = rest.split_once(']').ok_or_else(invalid)?;
        if address.is_empty()
            || !address
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return Err(invalid());
        }
        match after {
            "" => ("x", None),
            _ => ("x", Some(after.strip_prefix(':').ok_or_else(invalid)?)),
        }
    } else {
        match host.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        }
    };

    let name_valid = !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    let port_valid = port.is_none_or(|port| !port.is_empty() && port.parse::<u16>().is_ok());
    if name_valid && port_valid {
        Ok(())
    } else {
        Err(invalid())
    }
}

/// Checks the repository path: components of lowercase alphanumerics joined
/// by one '.', one or two '_', or any number of '-'.
fn validate_repository(reference: &str, name: &str) -> Result<(), ReferenceError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_REPOSITORY_LEN
        && name.split('/').all(valid_path_component);
    if valid {
        Ok(())
    } else {
        Err(ReferenceError::InvalidRepository {
            reference: reference.to_string(),
            name: name.to_string(),
        })
    }
}

fn valid_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let is_alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    if !is_alnum(first) || !is_alnum(last) {
        return false;
    }

    // Walk separator runs between alphanumeric runs.
    let mut i = 0;
    while i < bytes.len() {
        if is_alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !is_alnum(bytes[i]) {
            i += 1;
        }
        let separator = &component[start..i];
        let valid_separator = separator == "."
            || separator == "_"
            || separator == "__"
            || separator.bytes().all(|b| b == b'-');
        if !valid_separator {
            return false;
        }
    }
    true
}

fn validate_tag(reference: &str, tag: &str) -> Result<(), ReferenceError> {
    let valid = !tag.is_empty()
        && tag.len() <= MAX_TAG_LEN
        && !tag.starts_with('.')
        && !tag.starts_with('-')
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(ReferenceError::InvalidTag {
            reference: reference.to_string(),
            tag: tag.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:7e0054c8296bba7704025ea37e47dba2e072cb45d5354a377fdb8a34a8bdde81";

    #[test]
    fn parse_valid_references() {
        let with_digest = format!("alpine@{DIGEST}");
        let with_tag_and_digest = format!("quay.io/org/app:v1@{DIGEST}");
        /// Input, registry, repository, tag, digest and Display output.
        type Case<'a> = (
            &'a str,
            &'a str,
            &'a str,
            Option<&'a str>,
            Option<&'a str>,
            &'a str,
        );
        let cases: &[Case] = &[
            ("alpine", "docker.io", "library/alpine", Some("latest"), None, "docker.io/library/alpine:latest"),
            ("alpine:3.19", "docker.io", "library/alpine", Some("3.19"), None, "docker.io/library/alpine:3.19"),
            ("user/repo", "docker.io", "user/repo", Some("latest"), None, "docker.io/user/repo:latest"),
            ("docker.io/alpine", "docker.io", "library/alpine", Some("latest"), None, "docker.io/library/alpine:latest"),
            ("index.docker.io/user/x:t", "docker.io", "user/x", Some("t"), None, "docker.io/user/x:t"),
            ("localhost/repo", "localhost", "repo", Some("latest"), None, "localhost/repo:latest"),
            ("localhost:5000/a/b:c", "localhost:5000", "a/b", Some("c"), None, "localhost:5000/a/b:c"),
            ("127.0.0.1:5000/basic:latest", "127.0.0.1:5000", "basic", Some("latest"), None, "127.0.0.1:5000/basic:latest"),
            ("[::1]:5000/basic", "[::1]:5000", "basic", Some("latest"), None, "[::1]:5000/basic:latest"),
            ("ghcr.io/a/b/c", "ghcr.io", "a/b/c", Some("latest"), None, "ghcr.io/a/b/c:latest"),
            ("my-host:443/x.y__z--w", "my-host:443", "x.y__z--w", Some("latest"), None, "my-host:443/x.y__z--w:latest"),
            (&with_digest, "docker.io", "library/alpine", None, Some(DIGEST), "docker.io/library/alpine@sha256:7e0054c8296bba7704025ea37e47dba2e072cb45d5354a377fdb8a34a8bdde81"),
            (&with_tag_and_digest, "quay.io", "org/app", Some("v1"), Some(DIGEST), "quay.io/org/app:v1@sha256:7e0054c8296bba7704025ea37e47dba2e072cb45d5354a377fdb8a34a8bdde81"),
        ];
        for (input, registry, repository, tag, digest, display) in cases {
            let reference = Reference::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(reference.registry, *registry, "registry of {input}");
            assert_eq!(reference.repository, *repository, "repository of {input}");
            assert_eq!(reference.tag.as_deref(), *tag, "tag of {input}");
            assert_eq!(reference.digest.as_deref(), *digest, "digest of {input}");
            assert_eq!(reference.to_string(), *display, "Display of {input}");
            let reparsed = Reference::parse(&reference.to_string()).expect("Display output parses");
            assert_eq!(reparsed, reference, "round trip of {input}");
        }
    }

    #[test]
    fn parse_invalid_references() {
        let cases: &[(&str, &str)] = &[
            ("", "Empty"),
            ("Alpine", "InvalidRepository"),
            ("alpine:", "InvalidTag"),
            ("alpine:-x", "InvalidTag"),
            ("alpine:a/b", "InvalidHost"),
            ("a//b", "InvalidRepository"),
            ("a/b/", "InvalidRepository"),
            ("a_-b", "InvalidRepository"),
            ("a...b", "InvalidRepository"),
            ("host:99999/x", "InvalidHost"),
            ("host:/x", "InvalidHost"),
            ("-bad.example/x", "InvalidHost"),
            ("[zz]:5000/x", "InvalidHost"),
            ("alpine@sha256:abc", "InvalidDigest"),
            (
                "alpine@sha512:7e0054c8296bba7704025ea37e47dba2e072cb45d5354a377fdb8a34a8bdde81",
                "InvalidDigest",
            ),
            (
                "alpine@sha256:7E0054C8296BBA7704025EA37E47DBA2E072CB45D5354A377FDB8A34A8BDDE81",
                "InvalidDigest",
            ),
            (
                "alpine@sha256:../../../../../../../../../../../../../../../../../../../etc/pas",
                "InvalidDigest",
            ),
        ];
        for (input, variant) in cases {
            let error = Reference::parse(input).expect_err(input);
            let debug = format!("{error:?}");
            assert!(
                debug.starts_with(variant),
                "{input}: expected {variant}, got {debug}"
            );
        }
        let long_tag = format!("alpine:{}", "a".repeat(129));
        assert!(Reference::parse(&long_tag).is_err(), "129-character tag");
        let long_name = "a".repeat(256);
        assert!(
            Reference::parse(&long_name).is_err(),
            "256-character repository"
        );
    }

    #[test]
    fn api_host_of_docker_hub() {
        let hub = Reference::parse("alpine").expect("valid");
        assert_eq!(hub.api_host(), DOCKER_HUB_API_HOST);
        let local = Reference::parse("localhost:5000/x").expect("valid");
        assert_eq!(local.api_host(), "localhost:5000");
    }

    #[test]
    fn manifest_reference_prefers_digest() {
        let pinned = Reference::parse(&format!("x/y:t@{DIGEST}")).expect("valid");
        assert_eq!(pinned.manifest_reference(), DIGEST);
        let tagged = Reference::parse("x/y:t").expect("valid");
        assert_eq!(tagged.manifest_reference(), "t");
    }

    #[test]
    fn image_arg_forms() {
        let cases: &[(&str, ImageArg)] = &[
            (
                "oci:dir",
                ImageArg::Oci {
                    dir: "dir".into(),
                    tag: None,
                },
            ),
            (
                "oci:dir:v1",
                ImageArg::Oci {
                    dir: "dir".into(),
                    tag: Some("v1".into()),
                },
            ),
            (
                "oci:/a:b/dir",
                ImageArg::Oci {
                    dir: "/a:b/dir".into(),
                    tag: None,
                },
            ),
            (
                "oci:/a:b/dir:v1",
                ImageArg::Oci {
                    dir: "/a:b/dir".into(),
                    tag: Some("v1".into()),
                },
            ),
            (
                "oci:/x/d:",
                ImageArg::Oci {
                    dir: "/x/d".into(),
                    tag: None,
                },
            ),
            (
                "alpine",
                ImageArg::Registry(Reference::parse("alpine").expect("valid")),
            ),
            (
                "docker://127.0.0.1:5000/x:y",
                ImageArg::Registry(Reference::parse("127.0.0.1:5000/x:y").expect("valid")),
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(&parse_image_arg(input).expect(input), expected, "{input}");
        }
        assert!(matches!(
            parse_image_arg("oci:"),
            Err(ReferenceError::EmptyLayoutDir { .. })
        ));
        assert!(matches!(
            parse_image_arg("oci::v1"),
            Err(ReferenceError::EmptyLayoutDir { .. })
        ));
    }

    #[test]
    fn digest_validation() {
        assert_eq!(validate_digest(DIGEST), Ok(()));
        for bad in ["", "sha256:", "sha256:/", "md5:abc", &DIGEST[..70]] {
            assert!(validate_digest(bad).is_err(), "{bad:?}");
        }
    }
}
