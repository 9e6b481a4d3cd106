//! The esgz-nbd configuration file (TOML, format described in docs/usage.md): defaults for options that the command line overrides.
//!
//! The file is `--config PATH` (or `ESGZ_NBD_CONFIG`) when given, else the
//! first that exists of `$XDG_CONFIG_HOME/esgz-nbd/config.toml` (or
//! `~/.config/esgz-nbd/config.toml`) and `/etc/esgz-nbd/config.toml`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// System-wide configuration file.
pub const SYSTEM_CONFIG: &str = "/etc/esgz-nbd/config.toml";

/// Errors of reading the configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "failed to read the configuration file {path}: {source}; fix the path given with --config or ESGZ_NBD_CONFIG"
    )]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration file {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
}

/// How the cache file is read and written, as in `--io`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoSetting {
    Auto,
    IoUring,
    Std,
}

/// Settings from the file; `None` means "not set", so the built-in default
/// applies unless the command line gives a value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Chunk cache directory.
    pub cache_dir: Option<PathBuf>,
    /// `false` turns TOC and chunk digest checks off, as
    /// `--insecure-skip-verify` does.
    pub verify: Option<bool>,
    pub io: Option<IoSetting>,
    /// Directory of containerd-style `HOST/hosts.toml` files.
    pub hosts_dir: Option<PathBuf>,
    /// Docker-style credentials file.
    pub auth_file: Option<PathBuf>,
    pub plain_http: Option<bool>,
    pub insecure_skip_tls_verify: Option<bool>,
    /// Limit for one registry request, body included, in seconds.
    pub request_timeout_secs: Option<u64>,
    /// Retries of a failed registry request after the first attempt.
    pub retries: Option<u32>,
    /// Maximum number of registry requests in flight at once.
    pub max_concurrent_requests: Option<usize>,
    /// `serve --metrics-addr`.
    pub metrics_addr: Option<String>,
}

/// Paths tried, in order, when no `--config` is given.
pub fn default_paths() -> Vec<PathBuf> {
    let mut paths = Vec::new();
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME").filter(|dir| !dir.is_empty()) {
        paths.push(PathBuf::from(dir).join("esgz-nbd/config.toml"));
    } else if let Some(home) = std::env::var_os("HOME").filter(|home| !home.is_empty()) {
        paths.push(PathBuf::from(home).join(".config/esgz-nbd/config.toml"));
    }
    paths.push(PathBuf::from(SYSTEM_CONFIG));
    paths
}

/// Parses the text of a configuration file; `path` names it in messages.
pub fn parse(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// Loads the configuration: `explicit` must exist; otherwise the first
/// default path that exists is read, and none is an empty configuration.
/// Returns the settings and the file they came from.
pub fn load(explicit: Option<&Path>) -> Result<(FileConfig, Option<PathBuf>), ConfigError> {
    let path = match explicit {
        Some(path) => path.to_path_buf(),
        None => match default_paths().into_iter().find(|path| path.is_file()) {
            Some(path) => path,
            None => return Ok((FileConfig::default(), None)),
        },
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    let config = parse(&text, &path)?;
    Ok((config, Some(path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_full_file() {
        let text = r#"
            cache_dir = "/var/cache/x"
            verify = false
            io = "io-uring"
            hosts_dir = "/etc/containerd/certs.d"
            auth_file = "/root/auth.json"
            plain_http = true
            insecure_skip_tls_verify = false
            request_timeout_secs = 30
            retries = 2
            max_concurrent_requests = 8
            metrics_addr = "9100"
        "#;
        let config = parse(text, Path::new("c.toml")).expect("valid file");
        assert_eq!(
            config,
            FileConfig {
                cache_dir: Some("/var/cache/x".into()),
                verify: Some(false),
                io: Some(IoSetting::IoUring),
                hosts_dir: Some("/etc/containerd/certs.d".into()),
                auth_file: Some("/root/auth.json".into()),
                plain_http: Some(true),
                insecure_skip_tls_verify: Some(false),
                request_timeout_secs: Some(30),
                retries: Some(2),
                max_concurrent_requests: Some(8),
                metrics_addr: Some("9100".into()),
            }
        );
        assert_eq!(
            parse("", Path::new("c.toml")).expect("empty"),
            FileConfig::default()
        );
    }

    #[test]
    fn parse_rejects_mistakes() {
        let cases = [
            ("cache_directory = \"/x\"", "cache_directory"),
            ("verify = \"no\"", "verify"),
            ("io = \"mmap\"", "mmap"),
            ("retries = -1", "retries"),
        ];
        for (text, expected) in cases {
            let message = parse(text, Path::new("/etc/c.toml"))
                .expect_err(text)
                .to_string();
            assert!(message.contains(expected), "{text}: {message}");
            assert!(message.contains("/etc/c.toml"), "{text}: {message}");
        }
    }

    #[test]
    fn load_explicit_and_missing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "retries = 7\n").expect("write");
        let (config, from) = load(Some(&path)).expect("readable");
        assert_eq!(config.retries, Some(7));
        assert_eq!(from.as_deref(), Some(path.as_path()));

        let missing = dir.path().join("absent.toml");
        let error = load(Some(&missing)).expect_err("missing explicit file");
        assert!(matches!(error, ConfigError::Read { .. }), "{error}");
    }
}
