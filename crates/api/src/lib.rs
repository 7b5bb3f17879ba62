//! The wire contracts zest speaks, shared by both gRPC sides: the snapshotter
//! (server of containerd's snapshots API) and the containerd client (`zest pull`).
//!
//! - [`snapshots`] and [`types`]: containerd's snapshots API and its `Mount` and
//!   `Descriptor` types (server and client code);
//! - [`content`], [`images`], [`leases`], [`diff`]: containerd's other services that
//!   a pull drives (client code);
//! - [`cri`]: Kubernetes CRI's runtime and image services (client code);
//! - [`labels`]: the label keys and values containerd, CRI and zest agree on.
//!
//! The message and service code is generated from `proto/` by `build.rs`, written from
//! the upstream wire contracts. Nothing here does I/O; the tonic transports live in the
//! crates that serve or dial.

pub mod labels;

#[allow(missing_docs, clippy::all, clippy::pedantic)]
mod generated {
    pub mod containerd {
        pub mod types {
            tonic::include_proto!("containerd.types");
        }
        pub mod services {
            pub mod snapshots {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.snapshots.v1");
                }
            }
            pub mod content {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.content.v1");
                }
            }
            pub mod images {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.images.v1");
                }
            }
            pub mod leases {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.leases.v1");
                }
            }
            pub mod diff {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.diff.v1");
                }
            }
        }
    }
    pub mod runtime {
        pub mod v1 {
            tonic::include_proto!("runtime.v1");
        }
    }
}

pub use generated::containerd::services::content::v1 as content;
pub use generated::containerd::services::diff::v1 as diff;
pub use generated::containerd::services::images::v1 as images;
pub use generated::containerd::services::leases::v1 as leases;
pub use generated::containerd::services::snapshots::v1 as snapshots;
pub use generated::containerd::types;
pub use generated::runtime::v1 as cri;

impl std::fmt::Debug for cri::AuthConfig {
    // Pull secrets never reach logs: only which fields are set, and the user name.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |s: &str| if s.is_empty() { "" } else { "***" };
        f.debug_struct("AuthConfig")
            .field("username", &self.username)
            .field("password", &set(&self.password))
            .field("auth", &set(&self.auth))
            .field("server_address", &self.server_address)
            .field("identity_token", &set(&self.identity_token))
            .field("registry_token", &set(&self.registry_token))
            .finish()
    }
}

/// A message that is not valid protobuf for the type it was read as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError(pub String);

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WireError {}

/// Reads a CRI `PullImageRequest` from its wire bytes, for a proxy that forwards
/// the bytes untouched (fields not modelled here are skipped, not lost).
pub fn decode_pull_image_request(bytes: &[u8]) -> Result<cri::PullImageRequest, WireError> {
    <cri::PullImageRequest as prost::Message>::decode(bytes).map_err(|e| WireError(e.to_string()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn auth_config_debug_is_redacted() {
        let a = super::cri::AuthConfig {
            username: "u".into(),
            password: "pw-secret".into(),
            auth: "YTpi".into(),
            identity_token: "id-secret".into(),
            registry_token: "rt-secret".into(),
            ..Default::default()
        };
        let req = super::cri::PullImageRequest {
            image: None,
            auth: Some(a),
        };
        let text = format!("{req:?}");
        for secret in ["pw-secret", "YTpi", "id-secret", "rt-secret"] {
            assert!(!text.contains(secret), "{text}");
        }
        assert!(text.contains("\"u\""), "{text}");
    }
}
