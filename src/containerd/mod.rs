//! A client for containerd's own gRPC API, and the lazy pull built on it
//! (`zest pull`, the equivalent of stargz's `ctr-remote images rpull`).
//!
//! containerd 1.6 and 1.7's `ctr images pull` passes no layer labels to the
//! snapshotter, so it cannot pull lazily; CRI can, and so can this module: it resolves
//! the image with zest's own [`RegistryClient`](crate::registry::RegistryClient), then
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
    ContainerdClient, ContainerdError, ContentInfo, DEFAULT_ADDRESS, DEFAULT_NAMESPACE,
    LABEL_GC_EXPIRE,
};
pub use pull::{
    chain_ids, image_layers_label, pull, LayerOutcome, LayerReport, NoProgress, PullError,
    PullOptions, PullProgress, PullReport, ResolvedPull, LABEL_DISTRIBUTION_SOURCE,
    LABEL_GC_REF_CONFIG, LABEL_GC_REF_LAYER, LABEL_GC_REF_MANIFEST, LABEL_GC_REF_SNAPSHOT,
    LABEL_UNCOMPRESSED,
};

/// Code generated at build time from `proto/` for containerd's content, images,
/// leases and diff services (clients only). Messages shared with the snapshot API
/// (`Mount`, `Descriptor`) are those of [`crate::snapshotter::proto::types`].
pub mod proto {
    /// Packages under `containerd.`, nested like the proto packages.
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod containerd {
        /// `containerd.types`, shared with the snapshot API.
        pub use crate::snapshotter::proto::types;
        /// `containerd.services.*`.
        pub mod services {
            /// `containerd.services.content`.
            pub mod content {
                /// `containerd.services.content.v1`.
                pub mod v1 {
                    tonic::include_proto!("containerd.services.content.v1");
                }
            }
            /// `containerd.services.images`.
            pub mod images {
                /// `containerd.services.images.v1`.
                pub mod v1 {
                    tonic::include_proto!("containerd.services.images.v1");
                }
            }
            /// `containerd.services.leases`.
            pub mod leases {
                /// `containerd.services.leases.v1`.
                pub mod v1 {
                    tonic::include_proto!("containerd.services.leases.v1");
                }
            }
            /// `containerd.services.diff`.
            pub mod diff {
                /// `containerd.services.diff.v1`.
                pub mod v1 {
                    tonic::include_proto!("containerd.services.diff.v1");
                }
            }
        }
    }
    pub use crate::snapshotter::proto::snapshots;
    pub use containerd::services::content::v1 as content;
    pub use containerd::services::diff::v1 as diff;
    pub use containerd::services::images::v1 as images;
    pub use containerd::services::leases::v1 as leases;
    pub use containerd::types;
}
