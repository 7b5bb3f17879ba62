//! The containerd proxy snapshotter: the snapshot service of `zest serve`.
//!
//! containerd talks to it over gRPC on a unix socket
//! (`containerd.services.snapshots.v1.Snapshots`). Snapshots behave like those of
//! containerd's built-in overlayfs snapshotter — same directory layout, same mounts,
//! same errors — with metadata in a transactional embedded database so that a crash
//! never leaves it half-written. Image layers can instead be mounted lazily by a
//! [`RemoteLayerProvider`] through containerd's remote snapshot handshake; without one
//! (or when it declines a layer) the layer is pulled normally and the
//! [`FallbackReason`] is logged and counted.
//!
//! This crate knows nothing of registries, TOCs or caches: the lazy layer provider,
//! the whole configuration file and the metrics live in `zest-daemon`.
//!
//! | file | concern |
//! |---|---|
//! | `store.rs` | [`SnapshotStore`]: snapshot semantics, directories, mounts, remote hook |
//! | `meta.rs` | the metadata database (redb) |
//! | `filter.rs` | containerd filter expressions for `List` |
//! | `remote.rs` | [`RemoteLayerProvider`], requests, fallback reasons and counters |
//! | `fsutil.rs` | disk usage, durable renames (mount-safe removal is `zest_mount`) |
//! | `grpc.rs` | the only tonic-aware file: protobuf <-> domain, error codes, the gRPC server |
//! | `server.rs` | socket, systemd readiness, signals, graceful shutdown |
//! | `config.rs` | the `[snapshotter]` section ([`SnapshotterConfig`]) |
//!
//! Wiring: initialise logging from [`SnapshotterConfig::log_level`], then
//! [`Server::bind`] with a provider and [`Server::run`] with [`shutdown_signal`].

mod config;
mod filter;
mod fsutil;
mod grpc;
mod meta;
mod remote;
mod server;
mod store;
mod types;

pub use config::{ConfigError, SnapshotterConfig, DEFAULT_SOCKET, DEFAULT_STATE_DIR};
pub use grpc::TransportError;
pub use remote::{
    unpack_without_parent, Fallback, FallbackReason, NoRemoteLayers, RemoteError, RemoteLayer,
    RemoteLayerProvider, RemoteLayerRequest, RemoteMounted, ShutdownMode,
};
pub use server::{shutdown_signal, ServeError, Server};
pub use store::{SnapshotStore, StoreOptions, UpdateInfo};
pub use types::{Info, Kind, Labels, Mount, SnapshotError, Usage};
