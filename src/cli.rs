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

    /// Configuration file (TOML) with defaults for options; the command line
    /// overrides it [default: $XDG_CONFIG_HOME/esgz-nbd/config.toml, else
    /// /etc/esgz-nbd/config.toml].
    #[arg(long, global = true, env = "ESGZ_NBD_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,

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
    /// Attach the image to a kernel NBD device (/dev/nbdN) and serve it in the
    /// background; prints the device path once it is readable. Needs root.
    Attach(AttachArgs),
    /// Disconnect a device attached with `attach` and stop its server.
    Detach(DetachArgs),
    /// List the devices attached with `attach` (alias: status).
    #[command(alias = "status")]
    List(ListArgs),
    /// Print a manifest of a directory tree, or check one against a manifest
    /// (used by the kernel tests).
    #[command(hide = true)]
    TreeManifest(TreeManifestArgs),
    /// Show an image's platforms and, per layer, whether it is eStargz, its
    /// TOC digest check, TOC entry count and prefetch size. Reads only
    /// manifests, footers and TOCs.
    Inspect(InspectArgs),
    /// Print a shell completion script to standard output.
    Completions(CompletionsArgs),
    /// Print the manual page (roff) of esgz-nbd or of one of its commands to
    /// standard output, or write every page to a folder.
    Man(ManArgs),
    /// Convert every layer of an image to eStargz and store the result in a
    /// registry or an OCI image layout.
    Convert(ConvertArgs),
    /// Build a single-layer eStargz image from a directory tree or a tar.
    Build(BuildArgs),
    /// List or prune the chunk cache.
    Cache(CacheArgs),
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// Source image: a registry reference or oci:DIR[:TAG].
    pub source: String,

    /// Destination image: a registry reference or oci:DIR[:TAG].
    pub destination: String,

    /// Platform to convert from a multi-platform image, OS/ARCH[/VARIANT]
    /// [default: the host's].
    #[arg(long, value_name = "OS/ARCH", conflicts_with = "all_platforms")]
    pub platform: Option<String>,

    /// Convert every platform of a multi-platform image and write an index.
    #[arg(long)]
    pub all_platforms: bool,

    /// Rewrite layers that are already eStargz instead of copying them.
    #[arg(long)]
    pub force: bool,

    #[command(flatten)]
    pub layer: LayerWriterArgs,

    #[command(flatten)]
    pub registry: WriterRegistryArgs,
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// Root filesystem directory, or a tar file (plain or gzip).
    pub input: PathBuf,

    /// Destination image: a registry reference or oci:DIR[:TAG].
    pub destination: String,

    #[command(flatten)]
    pub layer: LayerWriterArgs,

    #[command(flatten)]
    pub registry: WriterRegistryArgs,
}

/// Options of the eStargz layer writer.
#[derive(Args, Debug)]
pub struct LayerWriterArgs {
    /// Bytes per chunk: larger files are split into chunks of this size,
    /// each fetched on its own.
    #[arg(long, value_name = "BYTES", default_value_t = 4 << 20)]
    pub chunk_size: u64,

    /// gzip compression level, 0 (none) to 9 (smallest, slowest).
    #[arg(long, value_name = "LEVEL", default_value_t = 9)]
    pub compression_level: u32,

    /// File listing paths (one per line) to put first in each layer and
    /// prefetch; without it, layers are marked to prefetch nothing.
    #[arg(long, value_name = "FILE")]
    pub prioritize: Option<PathBuf>,

    /// Pack small files into shared gzip members of at least this many
    /// uncompressed bytes (TOC innerOffset; older readers do not support it).
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    pub min_chunk_size: u64,

    /// Compression threads [default: one per core].
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub threads: usize,
}

/// Registry access options for writing images.
#[derive(Args, Debug)]
pub struct WriterRegistryArgs {
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
}

#[derive(Args, Debug)]
pub struct AttachArgs {
    #[command(flatten)]
    pub image: ImageArgs,

    #[command(flatten)]
    pub prefetch: PrefetchArgs,

    /// Device to attach to, /dev/nbdN [default: a free device the kernel picks].
    #[arg(conflicts_with = "reattach")]
    pub device: Option<PathBuf>,

    /// Restart the server of DEVICE, whose server died, with new sockets; the
    /// image must be the same, and reads waiting in the kernel complete.
    #[arg(long, value_name = "DEVICE")]
    pub reattach: Option<PathBuf>,

    /// Sockets (connections) between the kernel and the server [default: one per CPU].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub connections: Option<u32>,

    /// Seconds a request may take before the kernel requeues it; a requeue
    /// after a timeout also drops that connection.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub timeout: u64,

    /// Seconds the kernel queues requests while every connection is dead
    /// (a server restart with --reattach must happen within it).
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub dead_conn_timeout: u64,

    /// Keep the server in the foreground instead of detaching from the terminal.
    #[arg(long)]
    pub foreground: bool,

    /// Kernel interface used to configure the device.
    #[arg(long, value_enum, default_value_t = NbdInterface::Auto)]
    pub interface: NbdInterface,

    /// Serve Prometheus metrics of this device at http://ADDR:PORT/metrics,
    /// labelled with the device and image. A bare PORT binds 127.0.0.1.
    /// --reattach without it serves on the address the device had.
    #[arg(long, value_name = "[ADDR:]PORT")]
    pub metrics_addr: Option<String>,

    /// Directory of the state files [default: /run/esgz-nbd].
    #[arg(long, env = "ESGZ_NBD_RUNTIME_DIR", value_name = "DIR", hide = true)]
    pub runtime_dir: Option<PathBuf>,

    /// Descriptor on which a background server reports readiness (internal).
    #[arg(long, hide = true, requires = "foreground")]
    pub ready_fd: Option<i32>,

    /// Log file of a background server, renamed after the device (internal).
    #[arg(long, hide = true)]
    pub log_file: Option<PathBuf>,

    /// Accept writes. They go to a copy-on-write overlay file, never to the
    /// chunk cache; the filesystem gets a journal and room for new files.
    /// With --reattach, the recorded mode is used and this may be omitted.
    #[arg(long)]
    pub writable: bool,

    /// Free space added to the filesystem for new data, in bytes or with a
    /// K, M, G or T suffix (powers of 1024) [default: 1G].
    #[arg(long, value_name = "SIZE", requires = "writable", value_parser = parse_size)]
    pub size: Option<u64>,

    /// Overlay file that keeps the writes across detach and attach; a later
    /// attach of the same image with the same --size sees them [default: a
    /// temporary file, removed at detach].
    #[arg(long, value_name = "PATH", requires = "writable")]
    pub overlay: Option<PathBuf>,

    /// Write the image path of each regular file whose data an NBD client
    /// reads to this file (mode 0600), one per line in first-read order, as
    /// `convert --prioritize` reads it. Prefetch and background fetches are
    /// not recorded. A reattach starts a new
    /// record.
    #[arg(long, value_name = "PATH")]
    pub record_access: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum NbdInterface {
    /// Generic netlink, or the ioctls when the kernel lacks the nbd netlink family.
    Auto,
    /// Generic netlink only.
    Netlink,
    /// The older ioctls only (no --reattach).
    Ioctl,
}

#[derive(Args, Debug)]
pub struct DetachArgs {
    /// Device to detach, /dev/nbdN.
    pub device: PathBuf,

    /// Disconnect even if the device is mounted or open.
    #[arg(long)]
    pub force: bool,

    /// Seconds to wait for the server to exit.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub wait: u64,

    /// Directory of the state files [default: /run/esgz-nbd].
    #[arg(long, env = "ESGZ_NBD_RUNTIME_DIR", value_name = "DIR", hide = true)]
    pub runtime_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Directory of the state files [default: /run/esgz-nbd].
    #[arg(long, env = "ESGZ_NBD_RUNTIME_DIR", value_name = "DIR", hide = true)]
    pub runtime_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct TreeManifestArgs {
    /// Directory to list.
    #[arg(required_unless_present = "from_expected")]
    pub dir: Option<PathBuf>,

    /// Print the manifest of an expected.json sidecar's merged tree instead.
    #[arg(long, value_name = "FILE", conflicts_with = "dir")]
    pub from_expected: Option<PathBuf>,

    /// Compare DIR with this manifest; print the differences and fail on any.
    #[arg(long, value_name = "FILE", requires = "dir")]
    pub check: Option<PathBuf>,

    /// Path (inside the tree) left out of the comparison, with its subtree.
    #[arg(long, value_name = "PATH")]
    pub ignore: Vec<String>,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Image: a registry reference or an OCI image layout (`oci:DIR[:TAG]`).
    pub image: String,

    /// Platform whose manifest is inspected, OS/ARCH[/VARIANT] [default: the host's].
    #[arg(long, value_name = "OS/ARCH")]
    pub platform: Option<String>,

    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,

    /// Use plain HTTP for the registry (always used for loopback hosts).
    #[arg(long)]
    pub plain_http: bool,

    /// Do not verify the registry's TLS certificate.
    #[arg(long)]
    pub insecure_skip_tls_verify: bool,

    /// Docker-style credentials file.
    #[arg(long, value_name = "PATH")]
    pub auth_file: Option<PathBuf>,

    /// Directory of containerd-style HOST[:PORT]/hosts.toml files naming
    /// registry mirrors [default: /etc/containerd/certs.d].
    #[arg(long, value_name = "DIR")]
    pub hosts_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ManArgs {
    /// Command whose page to print, such as `serve` or `cache prune`; the top-level
    /// page when empty.
    pub command: Vec<String>,
    /// Write the pages of esgz-nbd and of every command (esgz-nbd.1,
    /// esgz-nbd-serve.1, ...) to this folder instead of printing one.
    #[arg(long, value_name = "DIR", conflicts_with = "command")]
    pub out_dir: Option<std::path::PathBuf>,
}

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// Shell to generate completions for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// Start-up prefetch and background fetch, shared by `serve` and `attach`.
#[derive(Args, Debug, Clone)]
pub struct PrefetchArgs {
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

    /// Write fetch and cache counters as JSON to this file within 0.2 s of a change, and at exit.
    #[arg(long, value_name = "PATH")]
    pub stats_file: Option<PathBuf>,

    /// Serve Prometheus metrics at http://ADDR:PORT/metrics. A bare PORT
    /// binds 127.0.0.1; any other address must be written out.
    #[arg(long, value_name = "[ADDR:]PORT")]
    pub metrics_addr: Option<String>,

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

    #[command(flatten)]
    pub prefetch: PrefetchArgs,

    /// Write the image path of each regular file whose data an NBD client
    /// reads to this file (mode 0600), one per line in first-read order, as
    /// `convert --prioritize` reads it. Prefetch and background fetches are
    /// not recorded.
    #[arg(long, value_name = "PATH")]
    pub record_access: Option<PathBuf>,

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

    /// Time limit in seconds for one registry HTTP request, body included; a
    /// request that takes longer is cancelled and retried [default: 60, or
    /// request_timeout_secs from the configuration file].
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    pub fetch_timeout: Option<u64>,

    /// Retries after the first attempt of a registry request that failed for a
    /// transient reason (timeout, reset, 5xx, 429, short or wrong body)
    /// [default: 4, or retries from the configuration file].
    #[arg(long, value_name = "N")]
    pub retries: Option<u32>,

    /// Time limit in seconds for one registry request with all its retries;
    /// after it a read fails with EIO [default: 300].
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    pub fetch_deadline: Option<u64>,

    /// I/O backend of the cache file.
    #[arg(long, value_enum, default_value_t = IoChoice::Auto)]
    pub io: IoChoice,

    /// Directory of containerd-style HOST[:PORT]/hosts.toml files naming
    /// registry mirrors [default: /etc/containerd/certs.d].
    #[arg(long, value_name = "DIR")]
    pub hosts_dir: Option<PathBuf>,
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
