//! The esgz-nbd command.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

use esgz_nbd::cli::{
    CacheArgs, CacheCommand, Cli, Command, ExportArgs, ImageArgs, IoChoice, LogFormat, ServeArgs,
};
use esgz_nbd::disk::ImageDisk;
use esgz_nbd::estargz::TocLimits;
use esgz_nbd::export::export_to_file;
use esgz_nbd::image::{open_image, OpenOptions, StartupFetch};
use esgz_nbd::nbd::{self, ServerOptions};
use esgz_nbd::prefetch::{self, PrefetchOptions};
use esgz_nbd::registry::RegistryOptions;
use esgz_nbd::source::Platform;
use esgz_nbd::store::{self as chunk_store, IoBackendChoice, PruneOptions};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: failed to start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Export(args) => export(args).await,
            Command::Cache(args) => cache(args),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", format_error_chain(&error));
            ExitCode::FAILURE
        }
    }
}

/// Joins an error and its causes with ": ", leaving out a cause whose text an
/// earlier message already contains (many errors print their source inline).
fn format_error_chain(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let message = cause.to_string();
        if text.contains(&message) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&message);
    }
    text
}

fn init_logging(cli: &Cli) {
    let default_level = match (cli.quiet, cli.verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("esgz_nbd={default_level},warn")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn default_cache_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/cache/esgz-nbd");
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("esgz-nbd");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".cache/esgz-nbd"),
        None => std::env::temp_dir().join("esgz-nbd-cache"),
    }
}

fn default_runtime_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/run/esgz-nbd");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => PathBuf::from(dir).join("esgz-nbd"),
        None => std::env::temp_dir().join(format!("esgz-nbd-{}", unsafe_uid())),
    }
}

fn unsafe_uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// Creates `dir` (and parents) with mode 0700 for the last component.
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("failed to create directory {}", dir.display()))
}

fn open_options(args: &ImageArgs) -> anyhow::Result<OpenOptions> {
    let platform = match &args.platform {
        Some(text) => Platform::parse(text)?,
        None => Platform::host(),
    };
    if args.insecure_skip_verify {
        warn!("--insecure-skip-verify: TOC and chunk digests are not checked; corrupted or tampered data will be served");
    }
    let cache_dir = args.cache_dir.clone().unwrap_or_else(default_cache_dir);
    create_private_dir(&cache_dir)?;
    let registry = RegistryOptions {
        plain_http: args.plain_http,
        insecure_skip_tls_verify: args.insecure_skip_tls_verify,
        auth_file: args.auth_file.clone(),
        ..RegistryOptions::default()
    };
    Ok(OpenOptions {
        platform,
        verify: !args.insecure_skip_verify,
        cache_dir,
        registry,
        io: match args.io {
            IoChoice::Auto => IoBackendChoice::Auto,
            IoChoice::IoUring => IoBackendChoice::Uring,
            IoChoice::Std => IoBackendChoice::Std,
        },
        toc_limits: TocLimits::default(),
    })
}

/// Parses `--listen`: a bare port binds loopback, anything else is taken as given.
fn parse_listen(text: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    text.parse::<SocketAddr>().with_context(|| {
        format!("invalid --listen value {text:?}: expected PORT, ADDR:PORT or [IPV6]:PORT")
    })
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let options = open_options(&args.image)?;
    let image = open_image(&args.image.image, &options).await?;
    let disk = Arc::new(ImageDisk::new(&image));
    if args.cache_max_size > 0 {
        enforce_cache_limit(&options.cache_dir, args.cache_max_size).await;
    }
    let prefetch_options = PrefetchOptions {
        landmark: !args.no_prefetch,
        background: args.background_fetch,
        background_rate: (args.background_rate > 0).then_some(args.background_rate),
    };
    let prefetch_task =
        prefetch::spawn(image.store.clone(), image.layers.clone(), prefetch_options);
    let server_options = ServerOptions {
        export_name: args.export_name.clone(),
        description: format!("{} ({})", image.description, image.manifest_digest),
        ..ServerOptions::default()
    };

    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        let _ = shutdown_tx.send(true);
    });
    let stats_task = args.stats_file.clone().map(|path| {
        let disk = disk.clone();
        let startup = image.startup;
        let mut shutdown = shutdown_rx.clone();
        tokio::spawn(async move {
            loop {
                write_stats(&disk, &startup, &path);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.changed() => break,
                }
            }
            write_stats(&disk, &startup, &path);
        })
    });

    let result = match &args.listen {
        Some(listen) => {
            let addr = parse_listen(listen)?;
            if !addr.ip().is_loopback() {
                warn!(%addr, "listening on a non-loopback address: anyone who can reach it can read the image");
            }
            info!(%addr, export = %args.export_name, "serving NBD on TCP");
            println!("nbd://{addr}/{}", args.export_name);
            nbd::serve_tcp(addr, disk.clone(), server_options, shutdown_rx).await
        }
        None => {
            let socket = match &args.socket {
                Some(path) => path.clone(),
                None => {
                    let dir = default_runtime_dir();
                    create_private_dir(&dir)?;
                    dir.join("serve.sock")
                }
            };
            info!(socket = %socket.display(), export = %args.export_name, "serving NBD on a unix socket");
            println!(
                "nbd+unix:///{}?socket={}",
                args.export_name,
                socket.display()
            );
            nbd::serve_unix(&socket, disk.clone(), server_options, shutdown_rx).await
        }
    };
    if let Some(task) = stats_task {
        let _ = task.await;
    }
    prefetch_task.abort();
    let stats = disk.store().stats();
    info!(?stats, "server stopped");
    result
}

fn write_stats(disk: &ImageDisk, startup: &StartupFetch, path: &Path) {
    let stats = serde_json::json!({
        "startup": startup,
        "store": disk.store().stats(),
    });
    let text = match serde_json::to_string_pretty(&stats) {
        Ok(text) => text,
        Err(error) => {
            warn!(%error, "failed to encode the stats");
            return;
        }
    };
    let staging = path.with_extension("tmp");
    let result = std::fs::write(&staging, text).and_then(|()| std::fs::rename(&staging, path));
    if let Err(error) = result {
        warn!(path = %path.display(), %error, "failed to write the stats file");
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(stream) => stream,
        Err(error) => {
            warn!(%error, "failed to watch SIGTERM; only Ctrl-C stops the server");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("interrupted: shutting down"),
        _ = terminate.recv() => info!("terminated: shutting down"),
    }
}

async fn export(args: ExportArgs) -> anyhow::Result<()> {
    let options = open_options(&args.image)?;
    let image = open_image(&args.image.image, &options).await?;
    let disk = Arc::new(ImageDisk::new(&image));
    if args.output.exists() && args.output.is_dir() {
        bail!(
            "output {} is a directory; give a file path",
            args.output.display()
        );
    }
    let size = export_to_file(disk.clone(), &args.output).await?;
    let stats = disk.store().stats();
    info!(
        output = %args.output.display(),
        bytes = size,
        ?stats,
        "export finished"
    );
    Ok(())
}

/// Removes least recently used layers that no server uses until the cache fits in
/// `max_size` bytes; the image just opened holds its layers, so they stay.
async fn enforce_cache_limit(cache_dir: &Path, max_size: u64) {
    let dir = cache_dir.to_path_buf();
    let options = PruneOptions {
        max_size: Some(max_size),
        remove_unused: false,
    };
    let result = tokio::task::spawn_blocking(move || chunk_store::prune(&dir, &options)).await;
    match result {
        Ok(Ok(report)) => {
            if !report.removed.is_empty() {
                info!(
                    removed = report.removed.len(),
                    freed_bytes = report.freed_bytes,
                    remaining_bytes = report.remaining_bytes,
                    "pruned the chunk cache to its size limit"
                );
            }
            if report.remaining_bytes > max_size {
                warn!(
                    remaining_bytes = report.remaining_bytes,
                    max_size, "the chunk cache is over its size limit, but the rest is in use"
                );
            }
        }
        Ok(Err(error)) => warn!(%error, "failed to prune the chunk cache"),
        Err(error) => warn!(%error, "the cache pruning task failed"),
    }
}

fn cache(args: CacheArgs) -> anyhow::Result<()> {
    match args.command {
        CacheCommand::List(list) => {
            let dir = list.cache_dir.unwrap_or_else(default_cache_dir);
            let layers = chunk_store::list_layers(&dir)?;
            if list.json {
                println!("{}", serde_json::to_string_pretty(&layers)?);
                return Ok(());
            }
            println!(
                "{:<71}  {:>10}  {:>15}  {:<20}  STATE",
                "LAYER", "DISK", "CHUNKS", "LAST USE"
            );
            let mut total = 0;
            for layer in &layers {
                total += layer.disk_bytes;
                let chunks = match (layer.chunks_cached, layer.chunk_count, layer.complete) {
                    (_, _, true) => "whole".to_string(),
                    (Some(cached), Some(count), false) => format!("{cached}/{count}"),
                    _ => "-".to_string(),
                };
                let state = if layer.in_use { "in use" } else { "idle" };
                println!(
                    "{:<71}  {:>10}  {:>15}  {:<20}  {state}",
                    layer.digest,
                    format_bytes(layer.disk_bytes),
                    chunks,
                    format_utc(layer.last_use),
                );
            }
            println!(
                "{} layers, {} on disk in {}",
                layers.len(),
                format_bytes(total),
                dir.display()
            );
            Ok(())
        }
        CacheCommand::Prune(prune) => {
            let dir = prune.cache_dir.unwrap_or_else(default_cache_dir);
            let options = PruneOptions {
                max_size: prune.max_size,
                remove_unused: prune.max_size.is_none(),
            };
            let report = chunk_store::prune(&dir, &options)?;
            for layer in &report.removed {
                println!(
                    "removed {} ({})",
                    layer.digest,
                    format_bytes(layer.disk_bytes)
                );
            }
            println!(
                "freed {}, {} remain in {}",
                format_bytes(report.freed_bytes),
                format_bytes(report.remaining_bytes),
                dir.display()
            );
            Ok(())
        }
    }
}

/// Formats a byte count with a binary unit, such as `12.5 MiB`.
fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Formats seconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ` (proleptic Gregorian
/// calendar, days to civil date as in Howard Hinnant's `civil_from_days`).
fn format_utc(seconds: u64) -> String {
    let days = (seconds / 86_400) as i64;
    let time = seconds % 86_400;
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        time / 3600,
        time / 60 % 60,
        time % 60
    )
}
