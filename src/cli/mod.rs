//! The `zest` command line: argument parsing (clap), logging set-up, and one module
//! per subcommand. This is the binary's edge: library errors are turned into
//! `anyhow` reports with context here, and nowhere else.

mod bench;
mod convert;
mod fd_holder;
mod inspect;
mod link;
mod mount;
mod optimize;
mod pull;
mod registry_args;
mod serve;
mod serve_cri;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Lazy-pulling containerd snapshotter for zstd:chunked images.
#[derive(Debug, Parser)]
#[command(name = "zest", version, about, long_about = None)]
struct Cli {
    /// Log filter, in `tracing` env-filter syntax (e.g. `info`, `zest=debug`)
    /// [default: warn; for `serve`, RUST_LOG, else the configuration's log_level]
    #[arg(long, global = true, env = "ZEST_LOG")]
    log: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure cold starts (full pull vs lazy pull) and prepare the images for it.
    Bench(bench::BenchArgs),
    /// Convert an image to zstd:chunked and push it.
    Convert(convert::ConvertArgs),
    /// Show an image's layers and, for zstd:chunked layers, their table of contents.
    Inspect(inspect::InspectArgs),
    /// Emulate a network link (latency, bandwidth) in front of a registry, for benchmarks.
    Link(link::LinkArgs),
    /// Mount an image read-only, fetching files as they are read.
    Mount(mount::MountArgs),
    /// Record an image's startup reads and republish it with them first and prefetched.
    Optimize(optimize::OptimizeArgs),
    /// Pull an image into containerd, mounting zstd:chunked layers lazily.
    Pull(pull::PullArgs),
    /// Run the containerd snapshotter service (lazy pulling of zstd:chunked layers).
    Serve(serve::ServeCommand),
    /// Keep lazily mounted layers' FUSE connections across restarts of `zest serve`
    /// (started by `zest serve` itself).
    #[command(hide = true)]
    FdHolder(fd_holder::FdHolderArgs),
}

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The holder is one thread with a poll loop: no async runtime.
    if let Command::FdHolder(args) = cli.command {
        init_logging(cli.log.as_deref().unwrap_or("info"));
        return match fd_holder::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    // `serve` sets up logging once its configuration is read.
    if !matches!(cli.command, Command::Serve(_)) {
        init_logging(cli.log.as_deref().unwrap_or("warn"));
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("zest")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Bench(args) => bench::run(args).await,
            Command::Convert(args) => convert::run(args).await,
            Command::Inspect(args) => inspect::run(args).await,
            Command::Link(args) => link::run(args).await,
            Command::Mount(args) => mount::run(args).await,
            Command::Optimize(args) => optimize::run(args).await,
            Command::Pull(args) => pull::run(args).await,
            Command::Serve(args) => serve::run(args, cli.log).await,
            Command::FdHolder(_) => unreachable!("handled before the runtime starts"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("warning: invalid log filter {filter:?} ({e}); using \"warn\"");
        tracing_subscriber::EnvFilter::new("warn")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // No colour codes in files and the journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
