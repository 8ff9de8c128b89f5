#![forbid(unsafe_code)]

use clap::{CommandFactory, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use claimcheck::bench::BenchArgs;
use claimcheck::config::{LogFormat, Overridden, ServeArgs};
use claimcheck::consume::{self, ResolveArgs, TailArgs};
use claimcheck::Sidecar;

/// Fluentd forward target: chunks to S3, pointers to Kinesis.
#[derive(Parser)]
#[command(name = "claimcheck", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar: forward in, chunks to S3, pointers to Kinesis.
    Serve(Box<ServeArgs>),
    /// Follow a pointer stream and print its events as JSON lines.
    Tail(TailArgs),
    /// Print the events of one pointer (argument) or of pointers on stdin.
    Resolve(ResolveArgs),
    /// Load a forward receiver with acknowledged requests and report throughput and latency.
    Bench(BenchArgs),
    /// A bare forward receiver that only writes, fsyncs and acks each request: the floor
    /// under any durable receiver's cost, for side-by-side benchmarks.
    BenchFloor(claimcheck::bench::floor::FloorArgs),
    /// Move dead-lettered chunks back into the buffer for delivery.
    Replay(ReplayArgs),
    /// Ask a running sidecar whether it is alive (or ready); for container health checks.
    Health(HealthArgs),
    /// Print the configuration reference (docs/configuration.md).
    #[command(hide = true)]
    ConfigReference,
}

#[derive(clap::Args)]
struct HealthArgs {
    /// Address of the sidecar's metrics endpoint (its --metrics-listen; 0.0.0.0 means this host).
    #[arg(
        long,
        env = "CLAIMCHECK_METRICS_LISTEN",
        default_value = "127.0.0.1:24231"
    )]
    metrics_listen: String,
    /// Ask /readyz (can accept and buffer events) instead of /healthz (the process is alive).
    #[arg(long)]
    ready: bool,
}

#[derive(clap::Args)]
struct ReplayArgs {
    /// The sidecar's buffer directory.
    #[arg(
        long,
        env = "CLAIMCHECK_BUFFER_DIR",
        default_value = "./claimcheck-buffer"
    )]
    buffer_dir: std::path::PathBuf,
    /// Only these chunk ids (default: every dead-lettered chunk).
    chunk_ids: Vec<String>,
    /// List the dead-lettered chunks instead of replaying them.
    #[arg(long)]
    list: bool,
}

fn init_tracing(format: LogFormat) {
    // Without RUST_LOG: info, but not the SDK's repeated IMDS warnings when no region is set,
    // nor its credential chain's at every call when no credentials are found (the sidecar
    // says so itself, once, and in its outage summaries).
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,aws_config::imds=error,aws_config::meta::credentials::chain=error")
    });
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("cannot install the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

/// Raises the soft limit of open files (up to the hard limit) so that `max_connections`, the
/// chunk files the buffer holds open and about 256 other files fit under it, as servers with
/// many connections must. The buffer holds `max_open_chunk_files`, or by default half the
/// limit, hence as much again as the rest.
fn raise_open_files_limit(max_connections: usize, max_open_chunk_files: Option<usize>) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let others = max_connections as u64 + 256;
    let want = others + max_open_chunk_files.map_or(others, |n| n as u64);
    let mut limit = getrlimit(Resource::Nofile);
    let current = limit.current.unwrap_or(u64::MAX);
    if current >= want {
        return;
    }
    let target = limit.maximum.map_or(want, |max| max.min(want.max(current)));
    limit.current = Some(target);
    if let Err(e) = setrlimit(Resource::Nofile, limit) {
        tracing::warn!(cause = %e, current, "cannot raise the open files limit");
    }
    if target < want {
        tracing::warn!(
            open_files_limit = target,
            max_connections,
            max_open_chunk_files,
            "the open files limit is below what max_connections and max_open_chunk_files need; raise it (ulimit -n, LimitNOFILE)"
        );
    }
}

fn main() -> std::process::ExitCode {
    let (argv, overridden) =
        match claimcheck::config::with_config_file(std::env::args_os().collect()) {
            Ok(with_file) => with_file,
            Err(e) => {
                eprintln!("error: {e}");
                return std::process::ExitCode::from(2);
            }
        };
    let cli = Cli::parse_from(&argv);
    if let Command::Serve(args) = &cli.command {
        if args.print_config {
            // What `serve` would refuse is refused here too, rather than printed as a file
            // that does not start.
            if let Err(e) = args.clone().into_config() {
                eprintln!("error: {e}");
                return std::process::ExitCode::from(2);
            }
            for o in &overridden {
                eprintln!(
                    "warning: the configuration file's {} = {:?} is overridden by {} = {:?}",
                    o.key, o.in_file, o.by, o.value
                );
            }
            let at = argv
                .iter()
                .position(|a| a == "serve")
                .map_or(argv.len(), |i| i + 1);
            return match claimcheck::config::effective_toml(&argv[at..]) {
                Ok(toml) => {
                    print!("{toml}");
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::ExitCode::from(2)
                }
            };
        }
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    match &cli.command {
        Command::Serve(args) => {
            runtime.worker_threads(args.runtime_workers());
        }
        // One thread, which reads, writes and syncs in turn.
        Command::BenchFloor(_) => {
            runtime.worker_threads(1);
        }
        _ => {}
    }
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, overridden)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs each `CLAIMCHECK_*` variable that nothing reads (a typo leaves its setting at the
/// default).
fn warn_unknown_env() {
    let vars = std::env::vars_os().map(|(name, _)| name);
    for (name, nearest) in claimcheck::config::unknown_env(&Cli::command(), vars) {
        match nearest {
            Some(nearest) => tracing::warn!(
                variable = %name,
                "unknown environment variable, ignored; did you mean {nearest}?"
            ),
            None => tracing::warn!(variable = %name, "unknown environment variable, ignored"),
        }
    }
}

async fn run(cli: Cli, overridden: Vec<Overridden>) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            init_tracing(args.log_format);
            warn_unknown_env();
            for o in overridden {
                tracing::warn!(setting = %o.key, in_file = %o.in_file, by = %o.by, value = %o.value,
                               "the configuration file's setting is overridden");
            }
            let config = args.into_config().map_err(anyhow::Error::msg)?;
            raise_open_files_limit(
                config.listener.max_connections,
                config.buffer.max_open_files,
            );
            let sidecar = Sidecar::open(config.clone())?;
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
            sidecar.run(listener, shutdown_signal()).await
        }
        Command::Tail(args) => {
            init_tracing(LogFormat::Human);
            warn_unknown_env();
            consume::tail(args).await
        }
        Command::Resolve(args) => {
            init_tracing(LogFormat::Human);
            warn_unknown_env();
            consume::resolve(args).await
        }
        Command::ConfigReference => {
            print!("{}", claimcheck::config::reference_markdown());
            Ok(())
        }
        Command::Health(args) => {
            let addr = args.metrics_listen.replace("0.0.0.0", "127.0.0.1");
            let path = if args.ready { "/readyz" } else { "/healthz" };
            let (status, body) = claimcheck::admin::get(&format!("http://{addr}{path}"))
                .await
                .map_err(|e| {
                    e.context(format!(
                        "no answer from {addr}: is the sidecar running with --metrics-listen {addr}?"
                    ))
                })?;
            print!("{body}");
            anyhow::ensure!(status.is_success(), "{path} answered {status}");
            Ok(())
        }
        Command::Replay(args) => {
            init_tracing(LogFormat::Human);
            use claimcheck::buffer::dead_letter;
            if args.list {
                for id in dead_letter::list_dead(&args.buffer_dir)? {
                    println!("{id}");
                }
                return Ok(());
            }
            let moved = dead_letter::replay(&args.buffer_dir, &args.chunk_ids)?;
            for id in &moved {
                println!("{id}");
            }
            eprintln!(
                "{} chunk(s) moved back to {}; a running sidecar delivers them within seconds, otherwise the next start does",
                moved.len(),
                claimcheck::buffer::chunks_dir(&args.buffer_dir).display()
            );
            Ok(())
        }
        Command::BenchFloor(args) => {
            init_tracing(LogFormat::Human);
            claimcheck::bench::floor::run(args).await
        }
        Command::Bench(args) => {
            init_tracing(LogFormat::Human);
            let json = args.json;
            let report = claimcheck::bench::run(args).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{report}");
            }
            // A run with failures is not a figure to quote: say so in the exit status too.
            anyhow::ensure!(
                report.errors == 0,
                "{} error(s) during the run (see above)",
                report.errors
            );
            Ok(())
        }
    }
}
