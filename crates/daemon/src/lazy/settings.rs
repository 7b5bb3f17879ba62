//! What a [`LazyLayerProvider`](super::LazyLayerProvider) is built from and what it reports: its settings
//! ([`LazyConfig`], derived from the configuration file), its setup error and its
//! counters ([`LazyStats`]).
//!
//! Invariant: every setting has its key in the configuration file
//! ([`LazyConfig::from_service`] is the only mapping between them).

use std::path::PathBuf;
use std::time::Duration;

use super::profiles::{ProfileSettings, ProfileStats};
use crate::config::ServiceConfig;
use zest_cache::CacheStats;
use zest_fetch::libraries::LibraryPrefetchStats;
use zest_fetch::{FetchConfig, FetchStatsSnapshot};
use zest_fs::MountOptions;
use zest_oci::Platform;
use zest_registry::RegistryStats;

/// Settings of a [`LazyLayerProvider`](super::LazyLayerProvider).
#[derive(Debug, Clone)]
pub struct LazyConfig {
    /// Range request tuning of each layer's fetcher.
    pub fetch: FetchConfig,
    /// Concurrent on-demand range requests per registry.
    pub requests_per_registry: usize,
    /// Concurrent prefetch/background range requests per registry.
    pub background_requests_per_registry: usize,
    /// How each layer is mounted (FUSE threads, prefetch, background fetch).
    pub mount: MountOptions,
    /// Refuse layers whose TOC is found by footer only (not vouched for by the
    /// manifest).
    pub require_authenticated_toc: bool,
    /// Fetch the TOCs of an image's following layers in the background.
    pub toc_prefetch: bool,
    /// TOCs fetched at once by that background work.
    pub toc_prefetch_parallelism: usize,
    /// Compressed bytes each mounted layer's library prefetch may fetch;
    /// `None`: library prefetch off.
    pub library_prefetch: Option<u64>,
    /// Layer indexes kept for layers not mounted.
    pub max_idle_layers: usize,
    /// Time allowed for a manifest or TOC fetch while containerd waits.
    pub mount_timeout: Duration,
    /// A successful reachability check is trusted for this long (zero: always check).
    pub check_interval: Duration,
    /// Time allowed for a reachability check.
    pub check_timeout: Duration,
    /// Longest delay between two restore attempts.
    pub restore_max_backoff: Duration,
    /// containerd's content store, read for manifests and configs before the
    /// registry; `None`: registry only.
    pub containerd_content_dir: Option<PathBuf>,
    /// Directory keeping the compressed TOCs of mounted layers, for restarts.
    pub toc_dir: PathBuf,
    /// Where copies of fully cached files are kept for FUSE passthrough, and
    /// their disk budget; `None`: passthrough off.
    pub passthrough: Option<(PathBuf, u64)>,
    /// Platform picked when a manifest digest names an index.
    pub platform: Platform,
    /// Learned start-up profiles (`[profiles]`); kept next to the TOC directory,
    /// in `profiles`.
    pub profiles: ProfileSettings,
}

impl LazyConfig {
    /// Defaults, with TOCs kept in `toc_dir`.
    pub fn new(toc_dir: PathBuf) -> Self {
        LazyConfig::from_service(&ServiceConfig::default(), toc_dir)
    }

    /// The settings the configuration file describes, TOCs kept in `toc_dir`
    /// (`zest serve` uses `<state_dir>/tocs`) and passthrough copies, when on, in
    /// `passthrough` next to it.
    pub fn from_service(config: &ServiceConfig, toc_dir: PathBuf) -> Self {
        let lazy = &config.lazy;
        let passthrough = lazy.passthrough.then(|| {
            let dir = toc_dir.parent().unwrap_or(&toc_dir).join("passthrough");
            (dir, lazy.passthrough_size.0)
        });
        LazyConfig {
            fetch: config.fetch.fetch_config(),
            requests_per_registry: config.fetch.requests_per_registry,
            background_requests_per_registry: config.fetch.background_requests_per_registry,
            mount: MountOptions {
                threads: lazy.fuse_threads,
                io_uring: lazy.fuse_io_uring,
                prefetch: lazy.prefetch,
                background: lazy.background(),
                ..MountOptions::default()
            },
            require_authenticated_toc: lazy.require_authenticated_toc,
            toc_prefetch: lazy.toc_prefetch,
            toc_prefetch_parallelism: lazy.toc_prefetch_parallelism,
            library_prefetch: lazy
                .library_prefetch
                .then_some(lazy.library_prefetch_size.0),
            max_idle_layers: lazy.max_idle_layers,
            mount_timeout: Duration::from_secs(lazy.mount_timeout_secs),
            check_interval: Duration::from_secs(lazy.check_interval_secs),
            check_timeout: Duration::from_secs(lazy.check_timeout_secs),
            restore_max_backoff: Duration::from_secs(lazy.restore_max_backoff_secs),
            containerd_content_dir: (!lazy.containerd_content_dir.as_os_str().is_empty())
                .then(|| lazy.containerd_content_dir.clone()),
            profiles: ProfileSettings {
                record: config.profiles.record,
                fetch: config.profiles.fetch,
                publish: config.profiles.publish,
                prefetch: config.profiles.prefetch,
                window: Duration::from_secs(config.profiles.window_secs),
                max_files: config.profiles.max_files,
                max_prefetch_bytes: config.profiles.max_prefetch_size.0,
                max_local_profiles: config.profiles.max_local_profiles,
                dir: crate::config::ProfilesSection::dir(
                    toc_dir
                        .parent()
                        .unwrap_or_else(|| std::path::Path::new(".")),
                ),
            },
            toc_dir,
            passthrough,
            platform: Platform::host(),
        }
    }
}

/// Error setting up a [`LazyLayerProvider`](super::LazyLayerProvider).
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    /// The TOC directory cannot be created.
    #[error("cannot create the TOC directory {path}: {source} (check that the state directory is writable)")]
    TocDir {
        /// The directory.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The profile directory cannot be created.
    #[error("cannot create the start-up profile directory {path}: {source} (check that the state directory is writable)")]
    ProfileDir {
        /// The directory.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The passthrough directory cannot be emptied or created.
    #[error("cannot set up the passthrough directory: {0} (check that the state directory is writable, or set lazy.passthrough = false)")]
    Passthrough(#[from] zest_fs::passthrough::PassthroughError),
}

/// Counters and gauges of a [`LazyLayerProvider`](super::LazyLayerProvider), for metrics.
#[derive(Debug, Clone, Default)]
pub struct LazyStats {
    /// Snapshot directories with a live lazy mount.
    pub mounted: usize,
    /// Stored layers waiting to be mounted again (restore in progress or failed).
    pub restoring: usize,
    /// Layer indexes in memory (mounted or idle).
    pub layers: usize,
    /// Of those, the ones no mount uses.
    pub idle_layers: usize,
    /// Lazy mounts made (prepares and restores).
    pub mounts_total: u64,
    /// Stored layers mounted afresh after a restart (no live connection to take over).
    pub restores_total: u64,
    /// Stored layers whose live connection was taken over after a restart.
    pub takeovers_total: u64,
    /// Failed restore attempts (each retried with backoff unless permanent).
    pub restore_failures_total: u64,
    /// TOCs fetched from a registry.
    pub toc_fetches_total: u64,
    /// Compressed TOC bytes fetched from registries.
    pub toc_bytes_total: u64,
    /// TOCs read locally, no request: the TOC directory, or containerd's
    /// content store (stored there by `zest pull`).
    pub toc_local_loads_total: u64,
    /// TOCs fetched ahead of their prepare for an image's following layers.
    pub toc_prefetches_total: u64,
    /// Image manifests fetched.
    pub manifest_fetches_total: u64,
    /// Image manifests and configs read from containerd's content store instead.
    pub local_content_reads_total: u64,
    /// Library prefetch: ELF files examined, needed libraries found in the
    /// layers, compressed bytes fetched for them.
    pub library_prefetch: LibraryPrefetchStats,
    /// Reachability checks that failed.
    pub check_failures_total: u64,
    /// Learned start-up profiles.
    pub profiles: ProfileStats,
    /// Fetch counters summed over every layer, past ones included.
    pub fetch: FetchStatsSnapshot,
    /// The chunk cache.
    pub cache: CacheStats,
    /// The registry client.
    pub registry: RegistryStats,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::sync::Arc;
    use zest_cache::{ByteSize, CacheConfig, ChunkCache};
    use zest_registry::{DockerConfigSource, RegistryClient, RegistryConfig};

    #[test]
    fn passthrough_is_off_by_default_and_kept_next_to_the_tocs_when_on() {
        let state = Path::new("/state");
        let config = LazyConfig::from_service(&ServiceConfig::default(), state.join("tocs"));
        assert!(config.passthrough.is_none());
        assert!(config.mount.fs.passthrough.is_none());
        let mut service = ServiceConfig::default();
        service.lazy.passthrough = true;
        service.lazy.passthrough_size = ByteSize::mib(64);
        let config = LazyConfig::from_service(&service, state.join("tocs"));
        assert_eq!(
            config.passthrough,
            Some((state.join("passthrough"), 64 << 20))
        );
    }

    #[tokio::test]
    async fn the_provider_opens_an_empty_passthrough_store_for_its_mounts(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        // A copy left by an earlier process is not trusted: the store starts empty.
        let stale = dir.path().join("passthrough/left-over");
        std::fs::create_dir_all(stale.parent().ok_or("no parent")?)?;
        std::fs::write(&stale, b"unverified")?;
        let mut service = ServiceConfig::default();
        service.lazy.passthrough = true;
        let config = LazyConfig::from_service(&service, dir.path().join("tocs"));
        let cache = ChunkCache::open(&CacheConfig {
            disk_bytes: 0,
            ..CacheConfig::default()
        })?;
        let client = RegistryClient::new(RegistryConfig {
            hosts_dir: None,
            docker_config: DockerConfigSource::Disabled,
            ..RegistryConfig::default()
        })?;
        let provider = super::super::LazyLayerProvider::new(client, Arc::new(cache), config)?;
        let store = provider
            .inner
            .config
            .mount
            .fs
            .passthrough
            .clone()
            .ok_or("mounts get no passthrough store")?;
        assert!(store.is_empty());
        assert!(!stale.exists());
        Ok(())
    }
}
