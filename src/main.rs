//! The esgz-nbd command.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches};
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

use esgz_nbd::access::AccessRecorder;
use esgz_nbd::attach::disk::WritableSettings;
use esgz_nbd::attach::{self, state::RuntimeDir, AttachSettings, InterfaceChoice};
use esgz_nbd::cli::{
    AttachArgs, BuildArgs, CacheArgs, CacheCommand, Cli, Command, ConvertArgs, DetachArgs,
    ExportArgs, ImageArgs, InspectArgs, IoChoice, LayerWriterArgs, ListArgs, LogFormat,
    NbdInterface, PrefetchArgs, ServeArgs, TreeManifestArgs, WriterRegistryArgs,
};
use esgz_nbd::config::{self, FileConfig, IoSetting};
use esgz_nbd::convert::{self, BuildOptions, ConvertOptions};
use esgz_nbd::device::BlockDevice;
use esgz_nbd::disk::{writable_layout, ImageDisk};
use esgz_nbd::estargz::TocLimits;
use esgz_nbd::export::export_to_file;
use esgz_nbd::image::{open_image, OpenOptions, OpenedImage};
use esgz_nbd::inspect::{inspect_image, render_text};
use esgz_nbd::metrics::{self, MetricsLabels, MetricsSnapshot};
use esgz_nbd::nbd::{self, ServerOptions};
use esgz_nbd::overlay::{Identity, Overlay, OverlayDisk};
use esgz_nbd::prefetch::{self, PrefetchOptions};
use esgz_nbd::progress::{self, BarWriter, ProgressDevice};
use esgz_nbd::registry::hosts::CONTAINERD_HOSTS_DIR;
use esgz_nbd::registry::RegistryOptions;
use esgz_nbd::source::Platform;
use esgz_nbd::store::{self as chunk_store, ChunkStore, IoBackendChoice, PruneOptions};
use esgz_nbd::writer::WriterOptions;

/// Settings that come from outside the command's own arguments.
struct Settings {
    /// The configuration file's values.
    file: FileConfig,
    /// `--io` was given on the command line, so it beats the file.
    io_given: bool,
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    let reporter = progress::reporter_for_stderr();
    init_logging(&cli, BarWriter::new(&reporter));
    progress::install(reporter);
    esgz_nbd::heap::fix_mmap_threshold();

    match &cli.command {
        Command::Completions(args) => {
            // Generated into memory: clap_complete panics on a failed write,
            // such as a closed pipe.
            let mut script = Vec::new();
            clap_complete::generate(args.shell, &mut Cli::command(), "esgz-nbd", &mut script);
            return write_stdout(&script, "the completion script");
        }
        Command::Man(args) => return man_command(args),
        _ => {}
    }
    let settings = match config::load(cli.config.as_deref()) {
        Ok((file, path)) => {
            if let Some(path) = path {
                tracing::debug!(path = %path.display(), "read the configuration file");
            }
            Settings {
                file,
                io_given: io_given(&matches),
            }
        }
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };

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
            Command::Serve(args) => serve(args, &settings).await,
            Command::Export(args) => export(args, &settings).await,
            Command::Inspect(args) => inspect(args, &settings).await,
            Command::Completions(_) | Command::Man(_) => Ok(()),
            Command::Attach(args) => attach_command(args, &settings).await,
            Command::Detach(args) => detach_command(args).await,
            Command::List(args) => list_command(args),
            Command::TreeManifest(args) => tree_manifest_command(args),
            Command::Convert(args) => convert_command(args, !cli.quiet, &settings).await,
            Command::Build(args) => build_command(args, !cli.quiet, &settings).await,
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

/// Returns whether `--io` was given on the command line of the subcommand.
fn io_given(matches: &ArgMatches) -> bool {
    matches.subcommand().is_some_and(|(_, sub)| {
        sub.try_get_raw("io").is_ok_and(|value| value.is_some())
            && sub.value_source("io") == Some(ValueSource::CommandLine)
    })
}

fn man_command(args: &esgz_nbd::cli::ManArgs) -> ExitCode {
    match &args.out_dir {
        Some(dir) => match esgz_nbd::man::write_pages(Cli::command(), dir) {
            Ok(count) => {
                eprintln!("wrote {count} manual pages to {}", dir.display());
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: {error:#}");
                ExitCode::FAILURE
            }
        },
        None => match esgz_nbd::man::render_page(Cli::command(), &args.command) {
            Ok(page) => write_stdout(&page, "the manual page"),
            Err(error) => {
                eprintln!("error: {error:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn write_stdout(bytes: &[u8], what: &str) -> ExitCode {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: failed to write {what} to standard output: {error}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(cli: &Cli, writer: BarWriter) {
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
        .with_writer(writer)
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

/// Command-line registry settings, before the configuration file fills gaps.
struct RegistryArgs<'a> {
    plain_http: bool,
    insecure_skip_tls_verify: bool,
    auth_file: Option<&'a Path>,
    hosts_dir: Option<&'a Path>,
}

/// Registry options: the command line, then the configuration file, then
/// the built-in defaults. An empty hosts directory path turns mirrors off.
fn registry_options(args: RegistryArgs<'_>, file: &FileConfig) -> RegistryOptions {
    let defaults = RegistryOptions::default();
    let hosts_dir = args
        .hosts_dir
        .map(Path::to_path_buf)
        .or_else(|| file.hosts_dir.clone())
        .unwrap_or_else(|| PathBuf::from(CONTAINERD_HOSTS_DIR));
    RegistryOptions {
        plain_http: args.plain_http || file.plain_http.unwrap_or(false),
        insecure_skip_tls_verify: args.insecure_skip_tls_verify
            || file.insecure_skip_tls_verify.unwrap_or(false),
        auth_file: args
            .auth_file
            .map(Path::to_path_buf)
            .or_else(|| file.auth_file.clone()),
        retries: file.retries.unwrap_or(defaults.retries),
        request_timeout: file
            .request_timeout_secs
            .map(Duration::from_secs)
            .unwrap_or(defaults.request_timeout),
        hosts_dir: (!hosts_dir.as_os_str().is_empty()).then_some(hosts_dir),
        max_concurrent_requests: file
            .max_concurrent_requests
            .unwrap_or(defaults.max_concurrent_requests),
        ..defaults
    }
}

fn parse_platform(text: Option<&str>) -> anyhow::Result<Platform> {
    match text {
        Some(text) => Platform::parse(text),
        None => Ok(Platform::host()),
    }
}

fn open_options(args: &ImageArgs, settings: &Settings) -> anyhow::Result<OpenOptions> {
    let file = &settings.file;
    let platform = parse_platform(args.platform.as_deref())?;
    let verify = !args.insecure_skip_verify && file.verify.unwrap_or(true);
    if !verify {
        warn!("--insecure-skip-verify: TOC and chunk digests are not checked; corrupted or tampered data will be served");
    }
    let cache_dir = args
        .cache_dir
        .clone()
        .or_else(|| file.cache_dir.clone())
        .unwrap_or_else(default_cache_dir);
    create_private_dir(&cache_dir)?;
    let mut registry = registry_options(
        RegistryArgs {
            plain_http: args.plain_http,
            insecure_skip_tls_verify: args.insecure_skip_tls_verify,
            auth_file: args.auth_file.as_deref(),
            hosts_dir: args.hosts_dir.as_deref(),
        },
        file,
    );
    if let Some(retries) = args.retries {
        registry.retries = retries;
    }
    if let Some(seconds) = args.fetch_timeout {
        registry.request_timeout = Duration::from_secs(seconds);
    }
    if let Some(seconds) = args.fetch_deadline {
        registry.deadline = Duration::from_secs(seconds);
    }
    let io = match (settings.io_given, file.io) {
        (false, Some(IoSetting::Auto)) => IoChoice::Auto,
        (false, Some(IoSetting::IoUring)) => IoChoice::IoUring,
        (false, Some(IoSetting::Std)) => IoChoice::Std,
        _ => args.io,
    };
    Ok(OpenOptions {
        platform,
        verify,
        cache_dir,
        registry,
        io: match io {
            IoChoice::Auto => IoBackendChoice::Auto,
            IoChoice::IoUring => IoBackendChoice::Uring,
            IoChoice::Std => IoBackendChoice::Std,
        },
        toc_limits: TocLimits::default(),
    })
}

/// Prefetch settings from the command line.
fn prefetch_options(args: &PrefetchArgs) -> PrefetchOptions {
    PrefetchOptions {
        landmark: !args.no_prefetch,
        background: args.background_fetch,
        background_rate: (args.background_rate > 0).then_some(args.background_rate),
    }
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

async fn serve(args: ServeArgs, settings: &Settings) -> anyhow::Result<()> {
    let options = open_options(&args.image, settings)?;
    let image = open_image(&args.image.image, &options).await?;
    if args.cache_max_size > 0 {
        enforce_cache_limit(&options.cache_dir, args.cache_max_size).await;
    }
    let prefetch_task = prefetch::spawn(
        image.store.clone(),
        image.layers.clone(),
        prefetch_options(&args.prefetch),
    );
    let result = serve_disk(&args, settings, &image).await;
    prefetch_task.abort();
    result
}

/// Serves the image read-only, or writable through an overlay.
async fn serve_disk(
    args: &ServeArgs,
    settings: &Settings,
    image: &OpenedImage,
) -> anyhow::Result<()> {
    let recorder = args
        .record_access
        .as_deref()
        .map(|path| AccessRecorder::create(&image.tree, path))
        .transpose()?;
    if let Some(path) = &args.record_access {
        info!(record = %path.display(), "recording the files that clients read");
    }
    if !args.writable {
        let disk = Arc::new(ImageDisk::new(image).with_recorder(recorder));
        let store = disk.store().clone();
        return run_server(args, settings, image, disk, store).await;
    }

    let disk = Arc::new(open_writable_disk(args, image, recorder)?);
    let store = disk.base().store().clone();
    let result = run_server(args, settings, image, disk.clone(), store).await;
    let flushed = disk.flush().await.with_context(|| {
        format!(
            "failed to flush the overlay {}",
            disk.overlay().path().display()
        )
    });
    result.and(flushed)
}

/// Default free space of a writable filesystem, when --size is not given.
const DEFAULT_WRITABLE_SIZE: u64 = 1 << 30;

/// Builds the writable disk: the writable layout of the image under an
/// overlay at --overlay, or a temporary one.
fn open_writable_disk(
    args: &ServeArgs,
    image: &OpenedImage,
    recorder: Option<Arc<AccessRecorder>>,
) -> anyhow::Result<OverlayDisk<ImageDisk>> {
    let extra = args.size.unwrap_or(DEFAULT_WRITABLE_SIZE);
    let layout = Arc::new(
        writable_layout(image, extra).context("failed to lay out the writable ext4 filesystem")?,
    );
    let identity = Identity {
        manifest_digest: image.manifest_digest.clone(),
        device_size: layout.size(),
        layout_digest: layout.fingerprint(),
    };
    let overlay = match &args.overlay {
        Some(path) => Overlay::open(path, &identity)?,
        None => Overlay::temporary(&std::env::temp_dir(), &identity)?,
    };
    info!(
        overlay = %overlay.path().display(),
        kept = args.overlay.is_some(),
        device_bytes = layout.size(),
        added_bytes = extra,
        "serving writable: writes go to the overlay"
    );
    let base = Arc::new(ImageDisk::with_layout(image, layout).with_recorder(recorder));
    Ok(OverlayDisk::new(base, overlay)?)
}

/// Serves `disk` on the socket or TCP address of `args` until a signal.
async fn run_server<D: BlockDevice>(
    args: &ServeArgs,
    settings: &Settings,
    image: &OpenedImage,
    disk: Arc<D>,
    store: Arc<ChunkStore>,
) -> anyhow::Result<()> {
    let server_options = ServerOptions {
        export_name: args.export_name.clone(),
        description: format!("{} ({})", image.description, image.manifest_digest),
        ..ServerOptions::default()
    };

    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let signal_tx = shutdown_tx.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        let _ = signal_tx.send(true);
    });
    let trim_store = store.clone();
    let trim_task = tokio::spawn(esgz_nbd::heap::trim_when_idle(move || {
        let stats = trim_store.stats();
        stats.bytes_served + stats.bytes_fetched + stats.chunks_fetched
    }));
    let stats_task = args.stats_file.clone().map(|path| {
        let store = store.clone();
        let startup = image.startup;
        let snapshot = move || {
            serde_json::json!({
                "startup": startup,
                "store": store.stats(),
            })
        };
        tokio::spawn(esgz_nbd::stats_file::write_loop(
            path,
            snapshot,
            shutdown_rx.clone(),
        ))
    });

    let metrics_addr = args
        .metrics_addr
        .clone()
        .or_else(|| settings.file.metrics_addr.clone());
    if let Some(text) = metrics_addr {
        let (listener, _) = metrics::listen(&text).await?;
        let labels = MetricsLabels::for_export(&args.export_name, &image.description);
        let scrape_disk = disk.clone();
        let scrape_store = store.clone();
        let startup = image.startup;
        let scrape = Arc::new(move || {
            let snapshot = MetricsSnapshot {
                store: scrape_store.stats(),
                startup,
                device_bytes: scrape_disk.size(),
            };
            metrics::render(&snapshot, &labels)
        });
        tokio::spawn(metrics::serve(listener, scrape, shutdown_rx.clone()));
    }

    let result = match &args.listen {
        Some(listen) => {
            let addr = parse_listen(listen)?;
            if !addr.ip().is_loopback() {
                warn!(%addr, "listening on a non-loopback address: anyone who can reach it can read the image (and change it with --writable)");
            }
            // Bind before printing the URI, so a client that reads it can connect.
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|error| {
                let hint = if error.kind() == std::io::ErrorKind::AddrInUse {
                    "; stop the program that uses the port, or choose another port with --listen"
                } else {
                    ""
                };
                anyhow::anyhow!("failed to listen on TCP address {addr}: {error}{hint}")
            })?;
            let addr = listener.local_addr().unwrap_or(addr);
            info!(%addr, export = %args.export_name, "serving NBD on TCP");
            println!("nbd://{addr}/{}", args.export_name);
            nbd::serve_tcp_listener(listener, disk.clone(), server_options, shutdown_rx).await
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
            let uri = format!(
                "nbd+unix:///{}?socket={}",
                args.export_name,
                socket.display()
            );
            // Printed once the socket is bound, so a client that reads it can connect.
            let announce = move || println!("{uri}");
            nbd::serve_unix_announced(&socket, disk.clone(), server_options, shutdown_rx, announce)
                .await
        }
    };
    // A server that failed to bind got no signal. Stop the stats writer anyway,
    // so that it writes its last snapshot and the error reaches the caller.
    let _ = shutdown_tx.send(true);
    trim_task.abort();
    if let Some(task) = stats_task {
        let _ = task.await;
    }
    let stats = store.stats();
    info!(?stats, "server stopped");
    result
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

async fn export(args: ExportArgs, settings: &Settings) -> anyhow::Result<()> {
    let options = open_options(&args.image, settings)?;
    let image = open_image(&args.image.image, &options).await?;
    let disk = Arc::new(ImageDisk::new(&image));
    if args.output.exists() && args.output.is_dir() {
        bail!(
            "output {} is a directory; give a file path",
            args.output.display()
        );
    }
    let device = Arc::new(ProgressDevice::new(disk.clone(), "export"));
    let exported = export_to_file(device.clone(), &args.output).await;
    device.finish();
    let size = exported?;
    let stats = disk.store().stats();
    info!(
        output = %args.output.display(),
        bytes = size,
        ?stats,
        "export finished"
    );
    Ok(())
}

fn runtime_dir_arg(dir: &Option<PathBuf>) -> RuntimeDir {
    RuntimeDir::new(
        dir.clone()
            .unwrap_or_else(|| PathBuf::from(attach::state::DEFAULT_RUNTIME_DIR)),
    )
}

async fn attach_command(args: AttachArgs, settings: &Settings) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let runtime = runtime_dir_arg(&args.runtime_dir);
    let interface = match args.interface {
        NbdInterface::Auto => InterfaceChoice::Auto,
        NbdInterface::Netlink => InterfaceChoice::Netlink,
        NbdInterface::Ioctl => InterfaceChoice::Ioctl,
    };
    if !args.foreground {
        attach::preflight(interface)?;
        let argv: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        let (device, attach_ms) =
            tokio::task::spawn_blocking(move || attach::daemon::spawn_background(&runtime, &argv))
                .await??;
        info!(%device, attach_ms, "attached");
        println!("{device}");
        return Ok(());
    }

    let ready = args
        .ready_fd
        .map(attach::daemon::ReadyPipe::from_fd)
        .transpose()?;
    let (device, reattach) = match &args.reattach {
        Some(device) => (Some(attach::parse_device_arg(device)?), true),
        None => (
            args.device
                .as_deref()
                .map(attach::parse_device_arg)
                .transpose()?,
            false,
        ),
    };
    let connections = args.connections.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1)
    });
    let settings = AttachSettings {
        open: open_options(&args.image, settings)?,
        image: args.image.image.clone(),
        writable: args.writable.then(|| WritableSettings {
            size: args.size,
            overlay: args.overlay.clone(),
            overlay_temporary: false,
        }),
        record_access: args.record_access.clone(),
        prefetch: prefetch_options(&args.prefetch),
        device,
        reattach,
        connections,
        timeout_secs: args.timeout,
        dead_conn_timeout_secs: args.dead_conn_timeout,
        interface,
        runtime,
        log_file: args.log_file.clone(),
        ready,
        started,
        metrics_addr: args.metrics_addr.clone(),
    };
    attach::run_server(settings).await?;
    Ok(())
}

async fn detach_command(args: DetachArgs) -> anyhow::Result<()> {
    let runtime = runtime_dir_arg(&args.runtime_dir);
    let wait = Duration::from_secs(args.wait);
    tokio::task::spawn_blocking(move || attach::detach(&runtime, &args.device, args.force, wait))
        .await??;
    Ok(())
}

fn list_command(args: ListArgs) -> anyhow::Result<()> {
    let devices = attach::list(&runtime_dir_arg(&args.runtime_dir))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&devices)?);
        return Ok(());
    }
    print!("{}", attach::list::render_table(&devices));
    Ok(())
}

fn tree_manifest_command(args: TreeManifestArgs) -> anyhow::Result<()> {
    use attach::manifest;
    use std::io::Write;

    let entries = match (&args.from_expected, &args.dir) {
        (Some(sidecar), _) => {
            let json = std::fs::read(sidecar)
                .with_context(|| format!("failed to read {}", sidecar.display()))?;
            manifest::manifest_of_expected(&json)?
        }
        (None, Some(dir)) => manifest::manifest_of_dir(dir)
            .with_context(|| format!("failed to list {}", dir.display()))?,
        (None, None) => bail!("give a directory or --from-expected FILE"),
    };
    let Some(check) = &args.check else {
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        for entry in &entries {
            writeln!(out, "{}", entry.to_line())?;
        }
        out.flush()?;
        return Ok(());
    };

    let text = std::fs::read_to_string(check)
        .with_context(|| format!("failed to read manifest {}", check.display()))?;
    let expected = manifest::parse_manifest(&text)?;
    let differences = manifest::compare(&expected, &entries, &args.ignore);
    for line in differences.iter().take(50) {
        println!("{line}");
    }
    if differences.len() > 50 {
        println!("... and {} more", differences.len() - 50);
    }
    println!(
        "tree-manifest: {} expected entries, {} found, {} differences",
        expected.len(),
        entries.len(),
        differences.len()
    );
    if !differences.is_empty() {
        bail!("the tree differs from {}", check.display());
    }
    Ok(())
}

async fn inspect(args: InspectArgs, settings: &Settings) -> anyhow::Result<()> {
    let platform = parse_platform(args.platform.as_deref())?;
    let registry = registry_options(
        RegistryArgs {
            plain_http: args.plain_http,
            insecure_skip_tls_verify: args.insecure_skip_tls_verify,
            auth_file: args.auth_file.as_deref(),
            hosts_dir: args.hosts_dir.as_deref(),
        },
        &settings.file,
    );
    let report = inspect_image(&args.image, &platform, &registry, &TocLimits::default()).await?;
    if args.json {
        let text = serde_json::to_string_pretty(&report).context("failed to encode the report")?;
        println!("{text}");
    } else {
        print!("{}", render_text(&report));
    }
    // The report is printed either way. The exit status shows scripts whether the
    // image can be served.
    let rejected: Vec<String> = report
        .layers
        .iter()
        .filter_map(|layer| layer.rejection())
        .collect();
    if !rejected.is_empty() {
        bail!(
            "serve and export would reject this image: {}; push the image again, or convert it from its source",
            rejected.join("; ")
        );
    }
    Ok(())
}

fn writer_options(args: &LayerWriterArgs) -> anyhow::Result<WriterOptions> {
    let prioritized = match &args.prioritize {
        Some(path) => convert::read_prioritize_file(path)?,
        None => Vec::new(),
    };
    let options = WriterOptions {
        chunk_size: args.chunk_size,
        compression_level: args.compression_level,
        min_chunk_size: args.min_chunk_size,
        prioritized,
        threads: args.threads,
    };
    options.validate()?;
    Ok(options)
}

fn writer_registry_options(args: &WriterRegistryArgs, file: &FileConfig) -> RegistryOptions {
    registry_options(
        RegistryArgs {
            plain_http: args.plain_http,
            insecure_skip_tls_verify: args.insecure_skip_tls_verify,
            auth_file: args.auth_file.as_deref(),
            hosts_dir: None,
        },
        file,
    )
}

async fn convert_command(
    args: ConvertArgs,
    progress: bool,
    settings: &Settings,
) -> anyhow::Result<()> {
    let platform = match &args.platform {
        Some(text) => Platform::parse(text)?,
        None => Platform::host(),
    };
    let options = ConvertOptions {
        writer: writer_options(&args.layer)?,
        platform,
        all_platforms: args.all_platforms,
        force: args.force,
        registry: writer_registry_options(&args.registry, &settings.file),
        progress,
    };
    let digest = convert::convert(&args.source, &args.destination, &options).await?;
    println!("{digest}");
    Ok(())
}

async fn build_command(args: BuildArgs, progress: bool, settings: &Settings) -> anyhow::Result<()> {
    let options = BuildOptions {
        writer: writer_options(&args.layer)?,
        registry: writer_registry_options(&args.registry, &settings.file),
        progress,
    };
    let digest = convert::build(&args.input, &args.destination, &options).await?;
    println!("{digest}");
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
