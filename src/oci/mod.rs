//! OCI image-spec and Docker v2 image types, image references, and OCI image layouts.
//!
//! This module owns the *data model* of container images as they travel between
//! registries, disk and the converter:
//!
//! - [`media_type`]: the media-type strings of OCI and Docker v2 manifests, configs and
//!   layers, and [`LayerCompression`] derived from them;
//! - [`Descriptor`], [`ImageManifest`], [`ImageIndex`]: typed serde views of the JSON
//!   documents. They are parsed from, never trusted over, the raw bytes: whoever fetched
//!   the bytes verified them against their digest first, and a rewrite re-serialises the
//!   typed value (unknown fields of manifests are kept in `extra` maps);
//! - [`ImageConfig`]: the image configuration kept as a raw JSON value so that fields
//!   zest does not model survive a rewrite, with typed accessors for the few it needs;
//! - [`Platform`]: `os/architecture[/variant]`, matching, and the host's platform;
//! - [`Reference`] / [`Repository`]: parsing and normalising `registry/repo:tag@digest`;
//! - [`layout`]: reading and writing OCI image layout directories (`oci:DIR[:TAG]`).
//!
//! Invariants: every digest is a [`crate::digest::Digest`] (sha256 only); sizes are
//! `u64`; parsing untrusted JSON never panics and is size-bounded by the caller.

pub mod layout;
pub mod media_type;
mod platform;
mod reference;
mod types;

pub use media_type::LayerCompression;
pub use platform::{Platform, PlatformParseError};
pub use reference::{Reference, ReferenceError, Repository, DOCKER_HUB, DOCKER_HUB_ENDPOINT};
pub use types::{Descriptor, ImageConfig, ImageIndex, ImageManifest, ManifestKind, OciJsonError};
