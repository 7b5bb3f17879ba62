//! Which layers can be mounted lazily, and why not: decided from the layer
//! descriptor alone, before any request is made.
//!
//! Invariants: only zstd:chunked layers and eStargz layers (gzip with the
//! `containerd.io/snapshot/stargz/toc.digest` annotation) are candidates; a layer
//! whose TOC the manifest does not vouch for is refused when authenticated TOCs are
//! required; malformed zstd:chunked annotations and TOCs larger than any valid one
//! are refused outright (never bypassed through the footer).

use zest_format::{estargz, TocLocation, MAX_TOC_UNCOMPRESSED};
use zest_oci::{Descriptor, LayerCompression};
use zest_snapshotter::{Fallback, FallbackReason};

/// How a layer's TOC is found.
#[derive(Debug)]
pub(super) enum TocSource {
    /// Annotations give its position and digest: one request, authenticated.
    Annotated(TocLocation),
    /// Through the blob's footer (unauthenticated; only when allowed).
    Footer,
    /// eStargz: the position through the footer, the TOC digest from the annotation
    /// (authenticated).
    Estargz,
}

/// Decides whether a layer can be served lazily, from its descriptor alone.
pub(super) fn classify(
    desc: &Descriptor,
    require_authenticated: bool,
) -> Result<TocSource, Fallback> {
    match LayerCompression::from_media_type(&desc.media_type) {
        Some(LayerCompression::Zstd) => {}
        Some(LayerCompression::Gzip)
            if desc.annotations.contains_key(estargz::TOC_DIGEST_ANNOTATION) =>
        {
            let value = &desc.annotations[estargz::TOC_DIGEST_ANNOTATION];
            return match value.parse::<zest_oci::digest::Digest>() {
                Ok(_) => Ok(TocSource::Estargz),
                Err(e) => Err(Fallback::new(
                    FallbackReason::TocInvalid,
                    format!(
                        "layer {}: malformed {} annotation {value:?}: {e}",
                        desc.digest,
                        estargz::TOC_DIGEST_ANNOTATION
                    ),
                )),
            };
        }
        Some(other) => {
            return Err(Fallback::new(
                FallbackReason::NotChunked,
                format!(
                    "layer {} is {other:?}-compressed ({}); only zstd:chunked and eStargz layers are mounted lazily (convert the image with `zest convert`)",
                    desc.digest, desc.media_type
                ),
            ))
        }
        None => {
            return Err(Fallback::new(
                FallbackReason::UnsupportedLayer,
                format!(
                    "layer {} has media type {:?}, which is not an image layer zest can mount",
                    desc.digest, desc.media_type
                ),
            ))
        }
    }
    let unauthenticated = |why: &str| {
        if require_authenticated {
            Err(Fallback::new(
                FallbackReason::UnauthenticatedToc,
                format!(
                    "layer {}: {why}; lazy.require_authenticated_toc is set",
                    desc.digest
                ),
            ))
        } else {
            Ok(TocSource::Footer)
        }
    };
    match TocLocation::from_annotations(&desc.annotations) {
        Ok(Some(loc)) if loc.toc_digest.is_some() => {
            if loc.toc.compressed_len > MAX_TOC_UNCOMPRESSED {
                return Err(Fallback::new(
                    FallbackReason::TocInvalid,
                    format!(
                        "layer {}: its TOC is {} bytes compressed, more than the {MAX_TOC_UNCOMPRESSED}-byte limit",
                        desc.digest, loc.toc.compressed_len
                    ),
                ));
            }
            Ok(TocSource::Annotated(loc))
        }
        Ok(Some(_)) => unauthenticated("its zstd:chunked annotations carry no TOC digest"),
        Ok(None) if require_authenticated => Err(Fallback::new(
            FallbackReason::NotChunked,
            format!(
                "layer {} is tar+zstd without zstd:chunked annotations (a plain zstd layer, or its manifest lost them)",
                desc.digest
            ),
        )),
        Ok(None) => Ok(TocSource::Footer),
        Err(e) => Err(Fallback::new(
            FallbackReason::TocInvalid,
            format!("layer {}: malformed zstd:chunked annotations: {e}", desc.digest),
        )),
    }
}

/// Whether a failure for this reason is a property of the layer itself, so that
/// retrying (a restore after restart) cannot succeed.
pub(super) fn is_permanent(reason: FallbackReason) -> bool {
    matches!(
        reason,
        FallbackReason::NotChunked
            | FallbackReason::UnauthenticatedToc
            | FallbackReason::UnsupportedLayer
            | FallbackReason::TocInvalid
    )
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use zest_format::annotations as ann;
    use zest_oci::digest::Digest;

    pub(crate) fn zstd_layer(annotations: &[(&str, &str)]) -> Descriptor {
        let mut d = Descriptor::new(
            zest_oci::media_type::OCI_LAYER_ZSTD,
            Digest::of(b"layer"),
            1 << 20,
        );
        d.annotations = annotations
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        d
    }

    fn code(result: Result<TocSource, Fallback>) -> &'static str {
        match result {
            Ok(TocSource::Annotated(_)) => "annotated",
            Ok(TocSource::Footer) => "footer",
            Ok(TocSource::Estargz) => "estargz",
            Err(fallback) => fallback.reason.code(),
        }
    }

    #[test]
    fn classify_layers() {
        let checksum = Digest::of(b"toc").to_string();
        let good = [
            (ann::MANIFEST_CHECKSUM, checksum.as_str()),
            (ann::MANIFEST_POSITION, "1000:200:800:1"),
            ("org.example.other", "kept out of the stored descriptor"),
        ];
        assert_eq!(code(classify(&zstd_layer(&good), true)), "annotated");
        let gzip = Descriptor::new(zest_oci::media_type::OCI_LAYER_GZIP, Digest::of(b"g"), 10);
        assert_eq!(
            code(classify(&gzip, true)),
            FallbackReason::NotChunked.code()
        );
        let docker = Descriptor::new(
            zest_oci::media_type::DOCKER_LAYER_GZIP,
            Digest::of(b"g"),
            10,
        );
        assert_eq!(
            code(classify(&docker, false)),
            FallbackReason::NotChunked.code()
        );
        // eStargz: gzip with its TOC digest annotation, authenticated by it.
        let mut estargz = gzip.clone();
        estargz.annotations.insert(
            estargz::TOC_DIGEST_ANNOTATION.to_owned(),
            Digest::of(b"toc json").to_string(),
        );
        assert_eq!(code(classify(&estargz, true)), "estargz");
        // What a mount stores for a restart still classifies the same way.
        let stored = crate::lazy::restore::stored_descriptor(&estargz);
        assert_eq!(code(classify(&stored, true)), "estargz");
        estargz.annotations.insert(
            estargz::TOC_DIGEST_ANNOTATION.to_owned(),
            "sha256:short".to_owned(),
        );
        assert_eq!(
            code(classify(&estargz, true)),
            FallbackReason::TocInvalid.code()
        );
        let odd = Descriptor::new("application/x-whatever", Digest::of(b"o"), 10);
        assert_eq!(
            code(classify(&odd, true)),
            FallbackReason::UnsupportedLayer.code()
        );
        // Plain zstd: not chunked, unless footers may be tried.
        assert_eq!(
            code(classify(&zstd_layer(&[]), true)),
            FallbackReason::NotChunked.code()
        );
        assert_eq!(code(classify(&zstd_layer(&[]), false)), "footer");
        // A position without a checksum: the TOC is not authenticated.
        let unauthenticated = zstd_layer(&[(ann::MANIFEST_POSITION, "1000:200:800:1")]);
        assert_eq!(
            code(classify(&unauthenticated, true)),
            FallbackReason::UnauthenticatedToc.code()
        );
        assert_eq!(code(classify(&unauthenticated, false)), "footer");
        let malformed = zstd_layer(&[(ann::MANIFEST_POSITION, "not:a:position")]);
        assert_eq!(
            code(classify(&malformed, true)),
            FallbackReason::TocInvalid.code()
        );
        // A TOC claimed larger than any valid one is refused before any request.
        let huge = format!("1000:{}:800:1", MAX_TOC_UNCOMPRESSED + 1);
        let huge = zstd_layer(&[
            (ann::MANIFEST_CHECKSUM, checksum.as_str()),
            (ann::MANIFEST_POSITION, huge.as_str()),
        ]);
        assert_eq!(
            code(classify(&huge, true)),
            FallbackReason::TocInvalid.code()
        );
    }
}
