//! OCI distribution (registry v2) client: authentication, manifests, verified blob
//! downloads, byte-range reads, and pushes.
//!
//! What it owns:
//! - [`RegistryClient`]: one HTTP connection pool (plus one per distinct TLS setting),
//!   shared token caches and counters; cheap to clone and safe to share across tasks;
//! - configuration ([`RegistryConfig`]): per-host settings in containerd's
//!   `hosts.toml` format (mirrors in order, plain HTTP, CA files, skip_verify), plain
//!   HTTP only when asked, Docker `config.json` credentials and credential helpers,
//!   extra [`CredentialSource`]s consulted first, timeouts, retries;
//! - authentication: anonymous, Basic, and Bearer tokens cached per (host, scope);
//! - [`RegistryError`]: every failure names the registry, repository and object, the
//!   registry's error codes, and what the user can do;
//! - referrers (OCI 1.1 `subject`): listing through the referrers API or the
//!   referrers tag schema, and pushing an artifact that refers to a manifest.
//!
//! Invariants:
//! - nothing returned as content is unverified: manifests and whole blobs are checked
//!   against their digests; a range read returns exactly the requested bytes or an
//!   error (the caller checks its chunk digests);
//! - every loop is bounded (retry attempts, body size limits, timeouts), and every
//!   body read into memory has a size limit;
//! - the HTTP library stays inside this module: callers see [`bytes::Bytes`], this
//!   module's types and the [`crate::oci`] types.

mod auth;
mod client;
mod config;
mod cred_helper;
mod credentials;
mod error;
mod pull;
mod push;
mod referrers;
mod stats;

pub use auth::{parse_www_authenticate, Challenge};
pub use client::RegistryClient;
pub use config::{
    Capabilities, DockerConfigSource, EndpointOptions, HostConfig, MirrorConfig, PlainHttp,
    RegistryConfig, RetryPolicy, DEFAULT_HOSTS_DIR,
};
pub use credentials::{normalize_host, Credential, CredentialSource, DockerCredentials};
pub use error::{ApiError, ApiErrors, ErrorKind, RegistryError};
pub use pull::{FetchedManifest, ResolvedImage};
pub use push::{PushOutcome, UploadBody};
pub use referrers::{referrers_tag, ReferrersSource};
pub use stats::{RegistryStats, RequestKind};
