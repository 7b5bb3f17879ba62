//! `zest serve`: run the containerd proxy snapshotter, with lazy pulling of
//! zstd:chunked layers and optional Prometheus metrics.

use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use zest::cache::ChunkCache;
use zest::registry::RegistryClient;
use zest::snapshotter::metrics::{bind_metrics, serve_metrics, Metrics};
use zest::snapshotter::{
    shutdown_signal, LazyConfig, LazyLayerProvider, NoRemoteLayers, RemoteLayerProvider, ServeArgs,
    Server,
};

/// Arguments of `zest serve`.
#[derive(Debug, Args)]
pub struct ServeCommand {
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Runs the service until SIGINT or SIGTERM. `log_override` is the `--log`/`ZEST_LOG`
/// filter, which wins over `RUST_LOG`, which wins over the file's `log_level`.
pub async fn run(args: ServeCommand, log_override: Option<String>) -> anyhow::Result<()> {
    let config = args
        .serve
        .service_config()
        .context("reading the configuration")?;
    let filter = log_override
        .or_else(|| std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| config.snapshotter.log_level.clone());
    super::init_logging(&filter);

    // Handlers first, so that a signal right after READY=1 is not lost.
    let shutdown = shutdown_signal().context("installing signal handlers")?;
    let state_dir = config.snapshotter.state_dir.clone();
    let (provider, lazy): (Arc<dyn RemoteLayerProvider>, Option<Arc<LazyLayerProvider>>) =
        if config.lazy.enabled {
            let client = RegistryClient::new(config.registry.registry_config())
                .context("setting up the registry client")?;
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
    let result = server.run(shutdown).await;
    if let Some(task) = metrics_task {
        task.abort();
    }
    result.context("serving the snapshotter")
}
