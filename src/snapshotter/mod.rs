//! containerd proxy snapshotter (work in progress).

/// Code generated at build time from `proto/` (containerd's snapshot API).
pub mod proto {
    /// Packages under `containerd.`; nested like the proto packages so that the
    /// generated cross-package paths resolve.
    #[allow(missing_docs, clippy::all)]
    pub mod containerd {
        /// `containerd.types`.
        pub mod types {
            tonic::include_proto!("containerd.types");
        }
        /// `containerd.services.*`.
        pub mod services {
            /// `containerd.services.snapshots`.
            pub mod snapshots {
                /// `containerd.services.snapshots.v1`.
                pub mod v1 {
                    tonic::include_proto!("containerd.services.snapshots.v1");
                }
            }
        }
    }
    pub use containerd::services::snapshots::v1 as snapshots;
    pub use containerd::types;
}
