//! `zest serve`: run the containerd proxy snapshotter, with lazy pulling of
//! zstd:chunked layers and optional Prometheus metrics.

use std::sync::Arc;

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use zest_cache::ChunkCache;
use zest_daemon::{
    bind_metrics, serve_metrics, ConfigOverrides, Handover, LazyConfig, LazyLayerProvider, Metrics,
};
use zest_fdstore::{FdStore, HolderClient, SystemdFdStore};
use zest_snapshotter::{shutdown_signal, NoRemoteLayers, RemoteLayerProvider, Server};

/// Arguments of `zest serve`.
#[derive(Debug, Args)]
pub struct ServeCommand {
    /// Configuration file [default: /etc/zest/config.toml, if it exists]
    #[arg(long, value_name = "FILE", env = "ZEST_CONFIG")]
    pub config: Option<PathBuf>,
    /// Unix socket to listen on (overrides `snapshotter.socket`)
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// State directory (overrides `snapshotter.state_dir`)
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

/// Runs the service until SIGINT or SIGTERM. `log_override` is the `--log`/`ZEST_LOG`
/// filter, which wins over `RUST_LOG`, which wins over the file's `log_level`.
pub async fn run(args: ServeCommand, log_override: Option<String>) -> anyhow::Result<()> {
    let overrides = ConfigOverrides {
        config: args.config,
        socket: args.socket,
        state_dir: args.state_dir,
    };
    let config = overrides
        .service_config()
        .context("reading the configuration")?;
    let filter = log_override
        .or_else(|| std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| config.snapshotter.log_level.clone());
    super::init_logging(&filter);

    // Handlers first, so that a signal right after READY=1 is not lost.
    let shutdown = shutdown_signal().context("installing signal handlers")?;
    let state_dir = config.snapshotter.state_dir.clone();
    let cri = super::serve_cri::CriSetup::open(&config, &state_dir).await?;
    let (provider, lazy): (Arc<dyn RemoteLayerProvider>, Option<Arc<LazyLayerProvider>>) =
        if config.lazy.enabled {
            let client = super::serve_cri::CriSetup::registry_client(
                cri.as_ref(),
                config.registry.registry_config(),
            )?;
            let cache_config = config.cache.cache_config(&state_dir);
            let cache = tokio::task::spawn_blocking(move || ChunkCache::open(&cache_config))
                .await
                .context("opening the chunk cache")?
                .context("opening the chunk cache")?;
            let lazy_config = LazyConfig::from_service(&config, state_dir.join("tocs"));
            let dir = state_dir.clone();
            let handover = tokio::task::spawn_blocking(move || open_handover(&dir))
                .await
                .context("opening the layer connection store")?;
            let provider =
                LazyLayerProvider::with_handover(client, Arc::new(cache), lazy_config, handover)
                    .context("setting up lazy layer mounts")?;
            (provider.clone(), Some(provider))
        } else {
            tracing::info!(
                "lazy pulling is disabled (lazy.enabled = false): every layer is pulled normally"
            );
            (Arc::new(NoRemoteLayers), None)
        };

    let lazy_provider = lazy.clone();
    let server = Server::bind(&config.snapshotter, provider)
        .await
        .context("starting the snapshotter")?;
    let metrics_task = match config.snapshotter.metrics_address {
        Some(address) => {
            let listener = bind_metrics(address)
                .await
                .with_context(|| format!("listening for metrics on {address}"))?;
            tracing::info!(%address, "serving Prometheus metrics on /metrics");
            let metrics = Metrics::new(server.store().clone(), lazy);
            Some(tokio::spawn(serve_metrics(listener, metrics)))
        }
        None => None,
    };
    let cri_task = match cri {
        Some(cri) => Some(cri.start().await?),
        None => None,
    };
    let result = server.run(shutdown).await;
    if let Some(task) = metrics_task {
        task.abort();
    }
    if let Some(task) = cri_task {
        task.stop().await;
    }
    if lazy_provider.is_some_and(|l| l.left_mounted()) {
        // Returning would drop the async runtime and with it every read still
        // waiting for data, whose FUSE replies would then go out as errors. Exiting
        // here leaves them unanswered in the kernel, which resends them to the next
        // process taking the layers over.
        tracing::info!("exiting; lazily mounted layers stay for the next start");
        if let Err(e) = &result {
            eprintln!("error: serving the snapshotter: {e}");
        }
        std::process::exit(if result.is_ok() { 0 } else { 1 });
    }
    result.context("serving the snapshotter")
}

/// Where the FUSE connections of lazy mounts are kept across restarts: systemd's
/// file descriptor store under systemd (when the unit allows one), else the fd
/// holder on `<state dir>/fd-holder.sock`, started when none answers. `None` (mounts
/// are released at stop, as without this) when neither can be had.
fn open_handover(state_dir: &std::path::Path) -> Option<Handover> {
    let store = match SystemdFdStore::from_env() {
        Some(systemd) => {
            // systemd sets $FDSTORE to FileDescriptorStoreMax= when it is not zero.
            let allowed = std::env::var("FDSTORE")
                .ok()
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| n > 0);
            if !allowed {
                tracing::warn!("run by systemd without FileDescriptorStoreMax= in the unit: lazily mounted layers will not survive a restart of zest (see packaging/zest.service)");
                return None;
            }
            FdStore::Systemd(systemd)
        }
        None => {
            let socket = state_dir.join("fd-holder.sock");
            match HolderClient::connect_or_start(&socket, Box::new(super::fd_holder::start)) {
                Ok(client) => FdStore::Holder(client),
                Err(e) => {
                    tracing::warn!(error = %e, "no fd holder: lazily mounted layers will not survive a restart of zest");
                    return None;
                }
            }
        }
    };
    match Handover::open(store) {
        Ok(handover) => {
            tracing::info!(
                store = handover.describe(),
                "lazy layer connections are kept across restarts"
            );
            Some(handover)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the kept layer connections back: lazily mounted layers will not survive a restart of zest");
            None
        }
    }
}
