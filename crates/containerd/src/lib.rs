//! A client for containerd's own gRPC API, and the lazy pull built on it
//! (`zest pull`, the equivalent of stargz's `ctr-remote images rpull`).
//!
//! containerd 1.6 and 1.7's `ctr images pull` passes no layer labels to the
//! snapshotter, so it cannot pull lazily; CRI can, and so can this module: it resolves
//! the image with zest's own [`RegistryClient`](zest_registry::RegistryClient), then
//! drives containerd step by step the way containerd's own unpacker does, adding the
//! `containerd.io/snapshot/cri.*` labels that let the snapshotter mount each layer
//! from the registry instead of downloading it.
//!
//! | file | concern |
//! |---|---|
//! | `client.rs` | [`ContainerdClient`]: unix-socket channel, namespace and lease metadata, typed calls to the content, images, leases, diff and snapshots services, [`ContainerdError`] |
//! | `pull.rs` | [`pull`]: resolve, store manifests and config with GC labels, unpack layers (remote or download + apply), image record, lease |
//!
//! Invariants: everything a pull creates in containerd is created under a lease that
//! is deleted when the pull ends (successfully or not), so garbage collection never
//! sees a half-pulled image and never keeps one alive; only bytes verified against
//! their digest reach containerd's content store (containerd verifies again at
//! commit); a layer is committed only when its applied diff ID matches the image
//! config.

mod client;
mod pull;

pub use client::ContentWriter;
pub use client::{
    ContainerdClient, ContainerdError, ContentInfo, RpcErrorKind, DEFAULT_ADDRESS,
    DEFAULT_NAMESPACE,
};
pub use pull::{
    pull, LayerOutcome, LayerReport, NoProgress, PullError, PullOptions, PullProgress, PullReport,
    ResolvedPull,
};
