//! Label keys (and the few label values) that containerd, CRI and zest agree on.
//!
//! Snapshot labels travel from the pulling client (CRI, `zest pull`) through
//! containerd to the snapshotter; content labels are read by containerd's garbage
//! collector. Both gRPC sides use these constants, so a key is spelled once.

/// Maximum size of one label, key plus value, in bytes (containerd's limit).
pub const MAX_LABEL_SIZE: usize = 4096;

/// Label containerd's unpacker puts on every layer it prepares: the layer's chain ID,
/// which is also the name the snapshot must be committed under.
pub const LABEL_SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
/// Image reference (e.g. `registry:5000/app:tag`), added by CRI and lazy-pull clients.
pub const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// Digest of the image manifest.
pub const LABEL_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// Digest of the compressed layer blob.
pub const LABEL_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
/// Comma-separated digests of this layer and the following ones (may be truncated).
pub const LABEL_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
/// Chain ID of the layer's parent, which containerd 2.3+ adds to every layer but the
/// first. It tells a parentless prepare from a parallel unpack (see the `rebase`
/// capability) apart from one of a bottom layer.
pub const LABEL_PARENT_CHAIN_ID: &str = "containerd.io/snapshot/parent-chain-id";
/// Marker label zest puts on snapshots it mounted remotely. Under the
/// `containerd.io/snapshot/` prefix so that containerd keeps passing it through on
/// label updates.
pub const LABEL_REMOTE: &str = "containerd.io/snapshot/zest.remote";

/// Lease label: the time (RFC 3339) after which containerd may delete the lease, so
/// that a client that crashed never leaks what it leased.
pub const LABEL_GC_EXPIRE: &str = "containerd.io/gc.expire";
/// Label on a manifest naming its config, for containerd's garbage collector.
pub const LABEL_GC_REF_CONFIG: &str = "containerd.io/gc.ref.content.config";
/// Prefix of the labels on a manifest naming its layers (`...l.<index>`).
pub const LABEL_GC_REF_LAYER: &str = "containerd.io/gc.ref.content.l.";
/// Prefix of the labels on an index naming its manifests (`...m.<index>`).
pub const LABEL_GC_REF_MANIFEST: &str = "containerd.io/gc.ref.content.m.";
/// Prefix of the labels on a manifest naming the zstd:chunked TOC of its layer
/// `<index>` that `zest pull` stored in the content store (`...zest.toc.<index>`),
/// so that the TOC lives as long as the manifest.
pub const LABEL_GC_REF_TOC: &str = "containerd.io/gc.ref.content.zest.toc.";
/// Prefix of the label on a config naming the image's top snapshot
/// (`...snapshot.<snapshotter>`): it keeps the unpacked layers alive with the image.
pub const LABEL_GC_REF_SNAPSHOT: &str = "containerd.io/gc.ref.snapshot.";
/// Label on a compressed layer blob: the digest of its uncompressed tar.
pub const LABEL_UNCOMPRESSED: &str = "containerd.io/uncompressed";
/// Prefix of the label recording where a blob came from
/// (`...source.<registry>=<repository>`).
pub const LABEL_DISTRIBUTION_SOURCE: &str = "containerd.io/distribution.source.";

/// Value of the [`LABEL_IMAGE_LAYERS`] label for the layer at `from` of `layers`
/// (layer digests, as strings): its digest and those of the following layers,
/// comma-separated, cut at a whole digest so that the label's key plus value stay
/// under [`MAX_LABEL_SIZE`].
pub fn image_layers_label<D: std::fmt::Display>(layers: &[D], from: usize) -> String {
    let budget = MAX_LABEL_SIZE - 1 - LABEL_IMAGE_LAYERS.len();
    let mut value = String::new();
    for digest in layers.iter().skip(from) {
        let item = digest.to_string();
        let needed = if value.is_empty() {
            item.len()
        } else {
            item.len() + 1
        };
        if value.len() + needed > budget {
            break;
        }
        if !value.is_empty() {
            value.push(',');
        }
        value.push_str(&item);
    }
    value
}

/// Whether a label fits containerd's limit on key plus value.
pub fn label_fits(key: &str, value: &str) -> bool {
    key.len() + value.len() < MAX_LABEL_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_layers_label_is_cut_at_whole_digests_within_the_limit() {
        let layers: Vec<String> = (0..200u32)
            .map(|i| format!("sha256:{:064x}", u64::from(i) * 0x9e37_79b9))
            .collect();
        let full = image_layers_label(&layers[..3], 1);
        assert_eq!(full, format!("{},{}", layers[1], layers[2]));
        assert_eq!(image_layers_label(&layers[..3], 3), "");

        let cut = image_layers_label(&layers, 5);
        assert!(LABEL_IMAGE_LAYERS.len() + cut.len() < MAX_LABEL_SIZE);
        let items: Vec<&str> = cut.split(',').collect();
        // 71 bytes per digest plus a comma: as many as fit, in order from layer 5.
        let per_item = layers[0].to_string().len() + 1;
        assert_eq!(
            items.len(),
            (MAX_LABEL_SIZE - 1 - LABEL_IMAGE_LAYERS.len() + 1) / per_item
        );
        for (item, layer) in items.iter().zip(&layers[5..]) {
            assert_eq!(*item, layer.to_string());
        }
    }
}
