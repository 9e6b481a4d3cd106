//! Command-line interface definitions.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "esgz-nbd",
    version,
    about = "Serve container images with eStargz layers as lazily fetched ext4 disks over NBD"
)]
pub struct Cli {
    /// More log output (-v debug, -vv trace); RUST_LOG overrides it.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Only warnings and errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,

    /// Log line format on standard error.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the image's ext4 filesystem as an NBD export; file data is
    /// fetched on first read.
    Serve(ServeArgs),
    /// Write the image's ext4 filesystem to a raw disk image file.
    Export(ExportArgs),
    /// List or prune the chunk cache.
    Cache(CacheArgs),
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub image: ImageArgs,

    /// Unix socket to listen on [default: $XDG_RUNTIME_DIR/esgz-nbd/serve.sock,
    /// or /run/esgz-nbd/serve.sock as root].
    #[arg(long, conflicts_with = "listen")]
    pub socket: Option<PathBuf>,

    /// Listen on TCP instead: PORT (on 127.0.0.1) or ADDR:PORT. An address other
    /// than loopback exposes the image to the network without authentication.
    #[arg(long, value_name = "[ADDR:]PORT")]
    pub listen: Option<String>,

    /// Export name announced to clients; clients may also ask for the empty name.
    #[arg(long, default_value = "esgz-nbd")]
    pub export_name: String,

    /// Write fetch and cache counters as JSON to this file every second and at exit.
    #[arg(long, value_name = "PATH")]
    pub stats_file: Option<PathBuf>,

    /// Do not fetch the files before each layer's .prefetch.landmark at start.
    #[arg(long)]
    pub no_prefetch: bool,

    /// After the start-up prefetch, fetch the rest of every layer in the background,
    /// pausing while reads wait for data.
    #[arg(long)]
    pub background_fetch: bool,

    /// Rate limit of --background-fetch in compressed bytes per second (suffix K, M or G
    /// for powers of 1024); 0 means unlimited.
    #[arg(long, value_name = "BYTES/s", value_parser = parse_size, default_value = "0")]
    pub background_rate: u64,

    /// Size limit of the chunk cache on disk (suffix K, M, G or T for powers of 1024).
    /// At start, least recently used layers that no server uses are removed to fit;
    /// 0 turns the limit off.
    #[arg(long, value_name = "BYTES", value_parser = parse_size, default_value = "10G")]
    pub cache_max_size: u64,
}

#[derive(Args, Debug)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub command: CacheCommand,
}

#[derive(Subcommand, Debug)]
pub enum CacheCommand {
    /// List cached layers with their size on disk and last use, least recently used first.
    List(CacheListArgs),
    /// Remove cached layers that no running server uses: all of them, or with
    /// --max-size the least recently used until the cache fits.
    Prune(CachePruneArgs),
}

#[derive(Args, Debug)]
pub struct CacheListArgs {
    /// Directory of the chunk cache [default: as for serve].
    #[arg(long, env = "ESGZ_NBD_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CachePruneArgs {
    /// Directory of the chunk cache [default: as for serve].
    #[arg(long, env = "ESGZ_NBD_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Remove least recently used layers until the cache takes at most this many bytes
    /// on disk (suffix K, M, G or T for powers of 1024).
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub max_size: Option<u64>,
}

/// Parses a byte count with an optional binary suffix: `512`, `64K`, `10G`, `1.5M`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, suffix) = trimmed.split_at(split);
    let shift = match suffix
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => {
            return Err(format!(
                "invalid size {text:?}: expected a number with an optional K, M, G or T suffix"
            ))
        }
    };
    let value: f64 = number.parse().map_err(|_| {
        format!("invalid size {text:?}: expected a number with an optional K, M, G or T suffix")
    })?;
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes >= u64::MAX as f64 {
        return Err(format!("size {text:?} is out of range"));
    }
    Ok(bytes as u64)
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    pub image: ImageArgs,

    /// Output file for the raw ext4 image (sparse).
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
}

/// Options shared by every command that opens an image.
#[derive(Args, Debug)]
pub struct ImageArgs {
    /// Image: a registry reference (`alpine`, `HOST[:PORT]/REPO[:TAG|@DIGEST]`) or
    /// an OCI image layout directory (`oci:DIR[:TAG]`).
    pub image: String,

    /// Platform to pick from a multi-platform image, OS/ARCH[/VARIANT]
    /// [default: the host's].
    #[arg(long, value_name = "OS/ARCH")]
    pub platform: Option<String>,

    /// Directory of the chunk cache [default: $XDG_CACHE_HOME/esgz-nbd, or
    /// /var/cache/esgz-nbd as root].
    #[arg(long, env = "ESGZ_NBD_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Do not check the TOC digest and chunk digests (debugging only).
    #[arg(long)]
    pub insecure_skip_verify: bool,

    /// Use plain HTTP for the registry (always used for loopback hosts).
    #[arg(long)]
    pub plain_http: bool,

    /// Do not verify the registry's TLS certificate.
    #[arg(long)]
    pub insecure_skip_tls_verify: bool,

    /// Docker-style credentials file [default: $REGISTRY_AUTH_FILE, else
    /// $DOCKER_CONFIG/config.json or ~/.docker/config.json].
    #[arg(long, value_name = "PATH")]
    pub auth_file: Option<PathBuf>,

    /// How the cache file is read and written.
    #[arg(long, value_enum, default_value_t = IoChoice::Auto)]
    pub io: IoChoice,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum IoChoice {
    /// io_uring when the kernel allows it, otherwise pread/pwrite.
    Auto,
    /// io_uring only; fails when it is unavailable.
    IoUring,
    /// pread/pwrite in a thread pool.
    Std,
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn parse_size_cases() {
        let cases: &[(&str, Option<u64>)] = &[
            ("0", Some(0)),
            ("512", Some(512)),
            ("64K", Some(64 << 10)),
            ("10G", Some(10 << 30)),
            ("10GiB", Some(10 << 30)),
            ("1.5M", Some(3 << 19)),
            ("2t", Some(2 << 40)),
            ("", None),
            ("G", None),
            ("12X", None),
            ("-1", None),
            ("99999999999999T", None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_size(text).ok(), *expected, "size {text:?}");
        }
    }
}
