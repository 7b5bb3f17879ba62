//! `zest serve` beyond the snapshot API: the configuration file, the lazy layer
//! provider, Prometheus metrics.
//!
//! `zest-snapshotter` serves containerd's snapshot API and knows layers only through
//! its `RemoteLayerProvider` trait; this crate supplies the provider that mounts
//! zstd:chunked layers from their registry, reads the whole configuration file, and
//! exports the metrics of both.
//!
//! | module | concern |
//! |---|---|
//! | `config` | the configuration file ([`ServiceConfig`]) and `zest serve` overrides |
//! | `lazy` | [`LazyLayerProvider`]: zstd:chunked layers mounted from the registry (FUSE), and learned start-up profiles ([`fetch_profile`], [`push_profile`]) |
//! | `metrics` | Prometheus text exposition and its tiny HTTP listener |
//!
//! Wiring `zest serve`: read [`ConfigOverrides::service_config`], initialise logging
//! from its `snapshotter.log_level`, build a [`LazyLayerProvider`] (registry client,
//! chunk cache, [`LazyConfig::from_service`], and a [`Handover`] keeping the
//! mounts' FUSE connections across restarts), then `zest_snapshotter::Server::bind`
//! and `run`; serve [`Metrics`] with [`bind_metrics`] and [`serve_metrics`] when
//! `snapshotter.metrics_address` is set.

mod config;
mod lazy;
mod metrics;

pub use config::{
    CacheSection, ConfigOverrides, CriSection, FetchSection, LazySection, ProfilesSection,
    RegistrySection, ServiceConfig, DEFAULT_CONFIG_PATH,
};
pub use lazy::{
    fetch_profile, push_profile, Handover, LazyConfig, LazyError, LazyLayerProvider, LazyStats,
    ProfileFetchError, ProfileSettings, ProfileStats,
};
pub use metrics::{bind_metrics, serve_metrics, Metrics};
