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

    /// Time limit in seconds for one registry HTTP request, body included; a
    /// request that takes longer is cancelled and retried.
    #[arg(long, value_name = "SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub fetch_timeout: u64,

    /// Retries after the first attempt of a registry request that failed for a
    /// transient reason (timeout, reset, 5xx, 429, short or wrong body).
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub retries: u32,

    /// Time limit in seconds for one registry request with all its retries;
    /// after it a read fails with EIO.
    #[arg(long, value_name = "SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub fetch_deadline: u64,

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
