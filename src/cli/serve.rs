//! `zest serve`: run the containerd proxy snapshotter, with lazy pulling of
//! zstd:chunked layers and optional Prometheus metrics.

use std::sync::Arc;

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use zest_cache::ChunkCache;
use zest_daemon::{
    bind_metrics, serve_metrics, ConfigOverrides, LazyConfig, LazyLayerProvider, Metrics,
};
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
            let provider = LazyLayerProvider::new(client, Arc::new(cache), lazy_config)
                .context("setting up lazy layer mounts")?;
            (provider.clone(), Some(provider))
        } else {
            tracing::info!(
                "lazy pulling is disabled (lazy.enabled = false): every layer is pulled normally"
            );
            (Arc::new(NoRemoteLayers), None)
        };

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
    result.context("serving the snapshotter")
}
