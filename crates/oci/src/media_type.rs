//! Media-type strings of OCI and Docker v2 image objects, and what they imply.
//!
//! Media types are compared exactly (they are case-sensitive identifiers in both
//! specs), except that parameters after `;` sent by some registries in
//! `Content-Type` are ignored by [`essence`].

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index (multi-platform).
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image configuration.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI uncompressed tar layer.
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// OCI gzip-compressed tar layer.
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI zstd-compressed tar layer (zstd:chunked layers use this type too).
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// OCI non-distributable uncompressed layer (deprecated, still seen).
pub const OCI_LAYER_NONDIST_TAR: &str = "application/vnd.oci.image.layer.nondistributable.v1.tar";
/// OCI non-distributable gzip layer (deprecated, still seen).
pub const OCI_LAYER_NONDIST_GZIP: &str =
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip";
/// OCI non-distributable zstd layer (deprecated, still seen).
pub const OCI_LAYER_NONDIST_ZSTD: &str =
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd";

/// Docker v2 schema 2 image manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker v2 manifest list (multi-platform).
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker container (image) configuration.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Docker gzip-compressed layer.
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Docker foreign (non-distributable) gzip layer.
pub const DOCKER_LAYER_FOREIGN_GZIP: &str =
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
/// Docker uncompressed layer (rare, but accepted by Docker's own tools).
pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";

/// Every manifest media type zest can read, in preference order, for `Accept`.
pub const MANIFEST_TYPES: [&str; 4] = [
    OCI_INDEX,
    OCI_MANIFEST,
    DOCKER_MANIFEST_LIST,
    DOCKER_MANIFEST,
];

/// The media type without parameters or surrounding blanks
/// (`application/json; charset=utf-8` → `application/json`).
pub fn essence(media_type: &str) -> &str {
    media_type.split(';').next().unwrap_or("").trim()
}

/// Whether `media_type` is a single-platform image manifest (OCI or Docker).
pub fn is_image_manifest(media_type: &str) -> bool {
    matches!(essence(media_type), OCI_MANIFEST | DOCKER_MANIFEST)
}

/// Whether `media_type` is a multi-platform index (OCI index or Docker manifest list).
pub fn is_index(media_type: &str) -> bool {
    matches!(essence(media_type), OCI_INDEX | DOCKER_MANIFEST_LIST)
}

/// Whether `media_type` is an image configuration (OCI or Docker).
pub fn is_config(media_type: &str) -> bool {
    matches!(essence(media_type), OCI_CONFIG | DOCKER_CONFIG)
}

/// How a layer blob is compressed, derived from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerCompression {
    /// A plain tar stream.
    Uncompressed,
    /// A gzip-compressed tar stream (possibly eStargz).
    Gzip,
    /// A zstd-compressed tar stream (possibly zstd:chunked).
    Zstd,
}

impl LayerCompression {
    /// The compression of a layer media type, or `None` when the type is not a known
    /// layer type (an artifact, a config, an unknown vendor type).
    pub fn from_media_type(media_type: &str) -> Option<Self> {
        match essence(media_type) {
            OCI_LAYER_TAR | OCI_LAYER_NONDIST_TAR | DOCKER_LAYER_TAR => Some(Self::Uncompressed),
            OCI_LAYER_GZIP
            | OCI_LAYER_NONDIST_GZIP
            | DOCKER_LAYER_GZIP
            | DOCKER_LAYER_FOREIGN_GZIP => Some(Self::Gzip),
            OCI_LAYER_ZSTD | OCI_LAYER_NONDIST_ZSTD => Some(Self::Zstd),
            _ => None,
        }
    }

    /// The OCI layer media type for this compression.
    pub fn oci_media_type(self) -> &'static str {
        match self {
            Self::Uncompressed => OCI_LAYER_TAR,
            Self::Gzip => OCI_LAYER_GZIP,
            Self::Zstd => OCI_LAYER_ZSTD,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_from_media_types() {
        assert_eq!(
            LayerCompression::from_media_type(OCI_LAYER_ZSTD),
            Some(LayerCompression::Zstd)
        );
        assert_eq!(
            LayerCompression::from_media_type(DOCKER_LAYER_GZIP),
            Some(LayerCompression::Gzip)
        );
        assert_eq!(
            LayerCompression::from_media_type(OCI_LAYER_TAR),
            Some(LayerCompression::Uncompressed)
        );
        assert_eq!(
            LayerCompression::from_media_type("application/vnd.oci.image.layer.v1.tar+gzip; x=y"),
            Some(LayerCompression::Gzip)
        );
        assert_eq!(LayerCompression::from_media_type(OCI_CONFIG), None);
        assert_eq!(
            LayerCompression::from_media_type("application/octet-stream"),
            None
        );
        for c in [
            LayerCompression::Uncompressed,
            LayerCompression::Gzip,
            LayerCompression::Zstd,
        ] {
            assert_eq!(
                LayerCompression::from_media_type(c.oci_media_type()),
                Some(c)
            );
        }
    }

    #[test]
    fn manifest_kinds() {
        assert!(is_index(DOCKER_MANIFEST_LIST));
        assert!(is_index(
            "application/vnd.oci.image.index.v1+json; charset=utf-8"
        ));
        assert!(!is_index(OCI_MANIFEST));
        assert!(is_image_manifest(DOCKER_MANIFEST));
        assert!(is_config(DOCKER_CONFIG));
        assert!(!is_config(OCI_LAYER_TAR));
    }
}
