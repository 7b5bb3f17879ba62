//! The containerd proxy snapshotter: zest's long-running service (`zest serve`).
//!
//! containerd talks to it over gRPC on a unix socket
//! (`containerd.services.snapshots.v1.Snapshots`). Snapshots behave like those of
//! containerd's built-in overlayfs snapshotter — same directory layout, same mounts,
//! same errors — with metadata in a transactional embedded database so that a crash
//! never leaves it half-written. Image layers can instead be mounted lazily by a
//! [`RemoteLayerProvider`] through containerd's remote snapshot handshake; without one
//! (or when it declines a layer) the layer is pulled normally and the reason is logged
//! and counted.
//!
//! | file | concern |
//! |---|---|
//! | `store.rs` | [`SnapshotStore`]: snapshot semantics, directories, mounts, remote hook |
//! | `meta.rs` | the metadata database (redb) |
//! | `filter.rs` | containerd filter expressions for `List` |
//! | `remote.rs` | [`RemoteLayerProvider`], requests, fallback reasons and counters |
//! | `lazy.rs` | [`LazyLayerProvider`]: zstd:chunked layers mounted from the registry (FUSE) |
//! | `metrics.rs` | Prometheus text exposition and its tiny HTTP listener |
//! | `fsutil.rs` | disk usage, durable renames (mount-safe removal is `zest_fs::sys`) |
//! | `grpc.rs` | the only tonic-aware file: protobuf <-> domain, error codes, the gRPC server |
//! | `server.rs` | socket, systemd readiness, signals, graceful shutdown |
//! | `config.rs` | the configuration file ([`ServiceConfig`]) and `zest serve` arguments |
//!
//! Wiring `zest serve`: read [`ConfigOverrides::service_config`], build a [`LazyLayerProvider`] (registry client,
//! chunk cache, [`LazyConfig::from_service`]), then [`Server::bind`] and
//! [`Server::run`] with [`shutdown_signal`];
//! initialise logging from [`SnapshotterConfig::log_level`] first.

mod config;
pub mod filter;
mod fsutil;
mod grpc;
mod lazy;
mod meta;
pub mod metrics;
mod remote;
mod server;
mod store;
mod types;

pub use config::{
    CacheSection, ConfigError, ConfigOverrides, FetchSection, LazySection, RegistrySection,
    ServiceConfig, SnapshotterConfig, DEFAULT_CONFIG_PATH, DEFAULT_SOCKET, DEFAULT_STATE_DIR,
};
pub use grpc::{SnapshotService, TransportError};
pub use lazy::{
    LazyConfig, LazyError, LazyLayerProvider, LazyStats, DETAIL_AUTHENTICATED, DETAIL_DESCRIPTOR,
    DETAIL_REPOSITORY,
};
pub use remote::{
    FallbackCounters, FallbackReason, NoRemoteLayers, RemoteError, RemoteLayer,
    RemoteLayerProvider, RemoteLayerRequest, RemoteMounted, ShutdownMode,
};
pub use server::{notify_systemd, shutdown_signal, ServeError, Server};
pub use store::{SnapshotStore, StoreOptions, UpdateInfo};
pub use types::{Info, Kind, Labels, Mount, SnapshotError, Usage};
