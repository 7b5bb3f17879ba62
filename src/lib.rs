//! zest: lazy pulling of zstd:chunked container images.
//!
//! The crate is layered; dependencies point downwards only:
//!
//! | module | concern |
//! |---|---|
//! | `cli` (binary) | the `zest` command line (clap); the only place `anyhow` is used |
//! | [`containerd`] | a client for containerd's API; `zest pull`, the lazy pull that drives containerd like its own unpacker with the lazy-pull labels |
//! | [`snapshotter`] | the containerd proxy snapshotter service: snapshot metadata, mounts, gRPC on a unix socket |
//! | [`fs`] | the lazy layer filesystem (FUSE), layer and image mounts (overlayfs) |
//! | [`fetch`] | on-demand chunk fetcher: range requests, single flight, verification, prefetch |
//! | [`cache`] | chunk cache of the read path: memory LRU + persistent disk store with a byte budget |
//! | [`store`] | one interface over a registry repository and an OCI layout |
//! | [`optimize`] | startup profiles: run an image's command on a lazy mount, record what it reads, rewrite layers with those files first and prefetched |
//! | [`convert`] | turning an image's layers into zstd:chunked and publishing it |
//! | [`registry`] | OCI distribution client: auth, manifests, blobs, range reads, push |
//! | [`oci`] | OCI image-spec types and OCI image layouts on disk |
//! | [`format`] | the zstd:chunked layer format: footer, TOC, validated layer model, writer |
//! | [`digest`] | sha256 content digests |
//! | [`bench`] | benchmark tooling: the network link emulator (RTT, shared bandwidth) in front of a registry |
//!
//! See `docs/ARCHITECTURE.md` for the map and the invariants.

pub mod bench;
pub mod cache;
pub mod containerd;
pub mod convert;
pub mod digest;
pub mod fetch;
pub mod format;
pub mod fs;
pub mod oci;
pub mod optimize;
pub mod registry;
pub mod snapshotter;
pub mod store;
