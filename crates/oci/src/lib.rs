//! OCI image-spec and Docker v2 image types, sha256 digests, image references, chain
//! IDs, and OCI image layouts.
//!
//! This crate owns the *data model* of container images as they travel between
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
//! - [`digest`]: [`Digest`], sha256 content digests;
//! - [`chain_ids`]: the chain IDs of a layer stack;
//! - [`layout`]: reading and writing OCI image layout directories (`oci:DIR[:TAG]`).
//!
//! Invariants: every digest is a [`Digest`] (sha256 only); sizes are
//! `u64`; parsing untrusted JSON never panics and is size-bounded by the caller.

pub mod digest;
pub mod layout;
pub mod media_type;
mod platform;
mod reference;
mod types;

pub use digest::Digest;
pub use media_type::LayerCompression;
pub use platform::{Platform, PlatformParseError};
pub use reference::{Reference, ReferenceError, Repository, DOCKER_HUB, DOCKER_HUB_ENDPOINT};
pub use types::{Descriptor, ImageConfig, ImageIndex, ImageManifest, ManifestKind, OciJsonError};

/// `PATH` of a container whose image config sets none (the one container
/// runtimes use).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Chain IDs of a layer stack: the first is the first diff ID; each next one is the
/// sha256 of `"<previous chain ID> <diff ID>"` (OCI image spec).
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut out: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match out.last() {
            None => *diff_id,
            Some(previous) => Digest::of(format!("{previous} {diff_id}").as_bytes()),
        };
        out.push(next);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        let c = Digest::of(b"c");
        let ab = Digest::of(format!("{a} {b}").as_bytes());
        let abc = Digest::of(format!("{ab} {c}").as_bytes());
        assert_eq!(chain_ids(&[]), Vec::<Digest>::new());
        assert_eq!(chain_ids(&[a]), vec![a]);
        assert_eq!(chain_ids(&[a, b, c]), vec![a, ab, abc]);
    }
}
