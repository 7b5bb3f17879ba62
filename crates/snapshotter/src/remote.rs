//! The hook for "remote snapshots" (lazy pulling): containerd's unpacker asks the
//! snapshotter to prepare each layer; when a [`RemoteLayerProvider`] can mount the layer
//! directly from the registry, the snapshotter commits it under the layer's chain ID and
//! containerd skips downloading it.
//!
//! Owns: the provider trait, the request parsed from containerd's labels, the fallback
//! reasons and their counters. Invariant: every fallback to a normal (downloading)
//! pull is logged with its reason and counted under a stable reason code, never silent.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::path::Path;

use zest_oci::digest::Digest;

use super::types::Labels;

use zest_api::labels::{
    LABEL_IMAGE_LAYERS, LABEL_IMAGE_REF, LABEL_LAYER_DIGEST, LABEL_MANIFEST_DIGEST,
    LABEL_PARENT_CHAIN_ID, LABEL_SNAPSHOT_REF,
};

/// Upper bound on the number of digests read from [`LABEL_IMAGE_LAYERS`]; the label is
/// bounded by the 4 KiB label limit anyway, this keeps the parse bounded regardless.
const MAX_IMAGE_LAYERS: usize = 128;

/// What containerd told us about a layer it wants prepared, parsed from the labels.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RemoteLayerRequest {
    /// Chain ID of the layer (value of [`LABEL_SNAPSHOT_REF`]); the committed
    /// snapshot's name.
    pub chain_id: String,
    /// Snapshot name of the parent layer, `None` for the bottom layer.
    pub parent: Option<String>,
    /// Image reference the layer belongs to.
    pub image_ref: Option<String>,
    /// Manifest digest (trusted: the manifest can be fetched by it and verified).
    pub manifest_digest: Option<Digest>,
    /// Compressed layer blob digest.
    pub layer_digest: Option<Digest>,
    /// This layer and the following ones, as far as the label carried them.
    pub image_layers: Vec<Digest>,
    /// All labels of the prepare request.
    pub labels: Labels,
}

impl RemoteLayerRequest {
    /// Builds the request from a prepare request's labels. `Ok(None)` when the labels
    /// do not describe an image layer (no [`LABEL_SNAPSHOT_REF`]): an ordinary
    /// container snapshot. A malformed digest label is a fallback reason.
    pub fn from_labels(parent: Option<&str>, labels: &Labels) -> Result<Option<Self>, Fallback> {
        let Some(chain_id) = labels.get(LABEL_SNAPSHOT_REF) else {
            return Ok(None);
        };
        if let (None, Some(parent_chain)) = (parent, labels.get(LABEL_PARENT_CHAIN_ID)) {
            return Err(Fallback::new(
                FallbackReason::UnpackWithoutParent,
                format!(
                    "{}: layer {chain_id} on {parent_chain}",
                    unpack_without_parent()
                ),
            ));
        }
        let digest = |key: &str| -> Result<Option<Digest>, Fallback> {
            labels
                .get(key)
                .map(|value| {
                    value.parse::<Digest>().map_err(|e| {
                        Fallback::new(
                            FallbackReason::InvalidLabels,
                            format!("label {key}={value:?} is not a sha256 digest: {e}"),
                        )
                    })
                })
                .transpose()
        };
        let image_layers = match labels.get(LABEL_IMAGE_LAYERS) {
            None => Vec::new(),
            Some(list) => list
                .split(',')
                .filter(|d| !d.is_empty())
                .take(MAX_IMAGE_LAYERS)
                .map(|d| {
                    d.trim().parse::<Digest>().map_err(|e| {
                        Fallback::new(
                            FallbackReason::InvalidLabels,
                            format!("label {LABEL_IMAGE_LAYERS} has an invalid digest {d:?}: {e}"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        Ok(Some(RemoteLayerRequest {
            chain_id: chain_id.clone(),
            parent: parent.map(str::to_owned),
            image_ref: labels.get(LABEL_IMAGE_REF).cloned(),
            manifest_digest: digest(LABEL_MANIFEST_DIGEST)?,
            layer_digest: digest(LABEL_LAYER_DIGEST)?,
            image_layers,
            labels: labels.clone(),
        }))
    }
}

/// The explanation of [`FallbackReason::UnpackWithoutParent`].
pub fn unpack_without_parent() -> &'static str {
    "containerd prepared this layer without its parent (a parallel unpack, enabled by the \
     proxy plugin's \"rebase\" capability); a lazy layer must sit on its parent, so it is \
     downloaded instead; remove \"rebase\" from the proxy plugin's capabilities where lazy \
     pulls matter"
}

/// A successful remote mount.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RemoteMounted {
    /// Provider-defined state stored with the snapshot and handed back on
    /// [`RemoteLayerProvider::restore`] and [`RemoteLayerProvider::unmount`] (e.g. the
    /// TOC digest, the blob size).
    pub details: BTreeMap<String, String>,
}

/// A remote layer as stored in the snapshot metadata.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RemoteLayer {
    /// The request the layer was mounted for.
    pub request: RemoteLayerRequest,
    /// What the provider returned.
    pub mounted: RemoteMounted,
}

/// Why a layer is pulled normally instead of mounted remotely: a closed set, each
/// with a stable [`code`](FallbackReason::code) used as the metrics label and in logs.
/// The human explanation travels separately, in [`Fallback::detail`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FallbackReason {
    /// No provider is configured for lazy pulling.
    NotConfigured,
    /// The client did not pass the labels a lazy pull needs (plain `ctr pull`).
    MissingLabels,
    /// A label is present but malformed.
    InvalidLabels,
    /// The layer's format cannot be served lazily (not an image layer zest knows).
    UnsupportedLayer,
    /// Mounting failed.
    MountFailed,
    /// The chain ID exists already with another parent, or a concurrent prepare won.
    Conflict,
    /// The layer is not zstd:chunked (gzip, plain tar, or zstd without a TOC): it
    /// can only be pulled whole. Convert the image with `zest convert`.
    NotChunked,
    /// The layer's TOC is not vouched for by the manifest (found by footer only) and
    /// the configuration requires an authenticated one.
    UnauthenticatedToc,
    /// The image manifest could not be fetched or verified, or does not list the layer.
    ManifestUnavailable,
    /// The layer's TOC could not be fetched from the registry.
    TocUnavailable,
    /// The layer's TOC (or its annotations) failed validation.
    TocInvalid,
    /// The service is stopping.
    ShuttingDown,
    /// containerd prepared a layer that has a parent without it: a parallel unpack,
    /// which containerd 2.2+ does when the proxy plugin advertises the `rebase`
    /// capability. A lazy layer must be committed on its parent at once, so it is
    /// downloaded and rebased on commit instead.
    UnpackWithoutParent,
}

impl FallbackReason {
    /// The stable, low-cardinality code: the `reason` label of
    /// `zest_fallbacks_total` and the prefix of log messages. Never change one.
    pub const fn code(self) -> &'static str {
        match self {
            FallbackReason::NotConfigured => "not-configured",
            FallbackReason::MissingLabels => "missing-labels",
            FallbackReason::InvalidLabels => "invalid-labels",
            FallbackReason::UnsupportedLayer => "unsupported-layer",
            FallbackReason::MountFailed => "mount-failed",
            FallbackReason::Conflict => "conflict",
            FallbackReason::NotChunked => "not-chunked",
            FallbackReason::UnauthenticatedToc => "unauthenticated-toc",
            FallbackReason::ManifestUnavailable => "manifest-unavailable",
            FallbackReason::TocUnavailable => "toc-unavailable",
            FallbackReason::TocInvalid => "toc-invalid",
            FallbackReason::ShuttingDown => "shutting-down",
            FallbackReason::UnpackWithoutParent => "unpack-without-parent",
        }
    }
}

impl std::fmt::Display for FallbackReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

/// A layer pulled normally instead of mounted remotely: the reason, and what exactly
/// happened for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct Fallback {
    /// Why, as a stable code.
    pub reason: FallbackReason,
    /// Human explanation: what failed, on which object, what the user can do.
    pub detail: String,
}

impl Fallback {
    /// A fallback for `reason`, explained by `detail`.
    pub fn new(reason: FallbackReason, detail: impl Into<String>) -> Self {
        Fallback {
            reason,
            detail: detail.into(),
        }
    }
}

/// Error of a remote layer operation other than the initial mount.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct RemoteError(pub String);

/// How the service is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownMode {
    /// SIGINT: stop and release remote mounts (they are restored at the next start).
    Interrupt,
    /// SIGTERM (or a programmatic stop): stop serving but keep mounts and state, so
    /// running containers keep their layers across a restart of the service.
    Terminate,
}

/// Something that can mount an image layer directly from its registry.
///
/// Implementations must be cheap to call concurrently: containerd prepares the layers
/// of an image in parallel.
#[async_trait::async_trait]
pub trait RemoteLayerProvider: Send + Sync + 'static {
    /// Mounts the layer at `target_dir` (an existing empty directory). On `Err` the
    /// directory must be left unmounted; the layer is then pulled normally and the
    /// reason is logged and counted. A request without `layer_digest` comes from a
    /// client that did not pass the layer labels: answer
    /// [`FallbackReason::MissingLabels`].
    async fn try_mount(
        &self,
        request: &RemoteLayerRequest,
        target_dir: &Path,
    ) -> Result<RemoteMounted, Fallback>;

    /// Serves a stored remote layer again after a restart of the service.
    /// `target_dir` may still hold the previous run's mount: a live one whose
    /// connection the provider kept is to be taken over, a dead one (served by a
    /// process that is gone) detached before mounting again. Called in the
    /// background at startup; the default does nothing.
    async fn restore(&self, _layer: &RemoteLayer, _target_dir: &Path) -> Result<(), RemoteError> {
        Ok(())
    }

    /// Checks that a remote layer can serve reads before a container is given mounts
    /// that use it. The default reports every layer healthy.
    async fn check(&self, _layer: &RemoteLayer, _target_dir: &Path) -> Result<(), RemoteError> {
        Ok(())
    }

    /// Releases the mount of a removed snapshot. The snapshotter detaches whatever is
    /// still mounted at `target_dir` afterwards, so the default does nothing.
    async fn unmount(&self, _layer: &RemoteLayer, _target_dir: &Path) -> Result<(), RemoteError> {
        Ok(())
    }

    /// Called once when the service stops.
    async fn shutdown(&self, _mode: ShutdownMode) {}
}

/// The provider used when lazy pulling is not configured: every layer is pulled
/// normally, with the reason [`FallbackReason::NotConfigured`].
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRemoteLayers;

#[async_trait::async_trait]
impl RemoteLayerProvider for NoRemoteLayers {
    async fn try_mount(
        &self,
        _request: &RemoteLayerRequest,
        _target_dir: &Path,
    ) -> Result<RemoteMounted, Fallback> {
        Err(Fallback::new(
            FallbackReason::NotConfigured,
            "lazy pulling not configured",
        ))
    }
}

/// Counts fallbacks per reason code, for metrics.
#[derive(Debug, Default)]
pub struct FallbackCounters {
    counts: Mutex<BTreeMap<FallbackReason, u64>>,
}

impl FallbackCounters {
    /// Counts one fallback.
    pub fn record(&self, fallback: &Fallback) {
        // A poisoned lock only means another thread panicked mid-increment; the map
        // is still a valid map, so keep counting.
        let mut counts = self.counts.lock();
        *counts.entry(fallback.reason).or_insert(0) += 1;
    }

    /// A snapshot of the counters: reason -> number of fallbacks.
    pub fn snapshot(&self) -> BTreeMap<FallbackReason, u64> {
        self.counts.lock().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_from_labels() {
        let layer = zest_oci::digest::Digest::of(b"layer");
        let next = zest_oci::digest::Digest::of(b"next");
        let mut labels = Labels::new();
        assert_eq!(RemoteLayerRequest::from_labels(None, &labels), Ok(None));
        labels.insert(LABEL_SNAPSHOT_REF.into(), "sha256:chain".into());
        labels.insert(LABEL_LAYER_DIGEST.into(), layer.to_string());
        labels.insert(LABEL_IMAGE_LAYERS.into(), format!("{layer},{next}"));
        labels.insert(LABEL_IMAGE_REF.into(), "127.0.0.1:5000/app:1".into());
        let request = RemoteLayerRequest::from_labels(Some("p"), &labels)
            .ok()
            .flatten();
        let request = request.unwrap_or_else(|| panic!("request expected"));
        assert_eq!(request.chain_id, "sha256:chain");
        assert_eq!(request.parent.as_deref(), Some("p"));
        assert_eq!(request.layer_digest, Some(layer));
        assert_eq!(request.image_layers, vec![layer, next]);
        assert_eq!(request.manifest_digest, None);

        labels.insert(LABEL_MANIFEST_DIGEST.into(), "sha256:nothex".into());
        let err = RemoteLayerRequest::from_labels(None, &labels);
        assert!(matches!(
            err,
            Err(Fallback {
                reason: FallbackReason::InvalidLabels,
                ..
            })
        ));
    }

    #[test]
    fn a_parentless_prepare_of_a_layer_with_a_parent_is_a_parallel_unpack() {
        let mut labels = Labels::new();
        labels.insert(LABEL_SNAPSHOT_REF.into(), "sha256:chain".into());
        labels.insert(LABEL_PARENT_CHAIN_ID.into(), "sha256:below".into());
        let err = RemoteLayerRequest::from_labels(None, &labels);
        assert!(
            matches!(&err, Err(f) if f.reason == FallbackReason::UnpackWithoutParent
                && f.detail.contains("sha256:below")),
            "{err:?}"
        );
        // Prepared on its parent (a sequential unpack by containerd 2.3+): fine.
        let request = RemoteLayerRequest::from_labels(Some("sha256:below"), &labels);
        assert!(matches!(request, Ok(Some(_))), "{request:?}");
    }

    #[test]
    fn counters() {
        let counters = FallbackCounters::default();
        let reason = Fallback::new(FallbackReason::NotConfigured, "x");
        counters.record(&reason);
        counters.record(&reason);
        assert_eq!(
            counters.snapshot().get(&FallbackReason::NotConfigured),
            Some(&2)
        );
        assert_eq!(FallbackReason::NotConfigured.to_string(), "not-configured");
        assert_eq!(reason.to_string(), "not-configured: x");
    }
}
