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

    /// Accept writes. They go to a copy-on-write overlay file, never to the
    /// chunk cache; the filesystem gets a journal and room for new files.
    #[arg(long)]
    pub writable: bool,

    /// Free space added to the filesystem for new data, in bytes or with a
    /// K, M, G or T suffix (powers of 1024) [default: 1G].
    #[arg(long, value_name = "SIZE", requires = "writable", value_parser = parse_size)]
    pub size: Option<u64>,

    /// Overlay file that keeps the writes across restarts; a later serve of
    /// the same image with the same --size sees them [default: a temporary
    /// file, removed at exit].
    #[arg(long, value_name = "PATH", requires = "writable")]
    pub overlay: Option<PathBuf>,
}

/// Parses a byte count such as `4096`, `512M`, `1G` or `2TiB` (binary units).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let number: u64 = digits.parse().map_err(|_| {
        format!("invalid size {text:?}: expected a number with an optional K, M, G or T suffix")
    })?;
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => {
            return Err(format!(
                "invalid size {text:?}: unknown unit {unit:?}; use K, M, G or T"
            ))
        }
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("invalid size {text:?}: larger than 2^64 bytes"))
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
    fn sizes_parse_with_binary_units() {
        let cases: &[(&str, Option<u64>)] = &[
            ("0", Some(0)),
            ("4096", Some(4096)),
            ("512M", Some(512 << 20)),
            ("1G", Some(1 << 30)),
            ("2GiB", Some(2 << 30)),
            ("3t", Some(3 << 40)),
            ("10k", Some(10 << 10)),
            ("", None),
            ("G", None),
            ("1.5G", None),
            ("1X", None),
            ("99999999999T", None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_size(text).ok(), *expected, "size {text:?}");
        }
    }
}
