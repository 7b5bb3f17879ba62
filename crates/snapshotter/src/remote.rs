//! The hook for "remote snapshots" (lazy pulling): containerd's unpacker asks the
//! snapshotter to prepare each layer; when a [`RemoteLayerProvider`] can mount the layer
//! directly from the registry, the snapshotter commits it under the layer's chain ID and
//! containerd skips downloading it.
//!
//! Owns: the provider trait, the request parsed from containerd's labels, the fallback
//! reasons and their counters. Invariant: every fallback to a normal (downloading)
//! pull is logged with its reason and counted under a stable reason code, never silent.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use zest_oci::digest::Digest;

use super::types::Labels;

use zest_api::labels::{
    LABEL_IMAGE_LAYERS, LABEL_IMAGE_REF, LABEL_LAYER_DIGEST, LABEL_MANIFEST_DIGEST,
    LABEL_SNAPSHOT_REF,
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
    pub fn from_labels(
        parent: Option<&str>,
        labels: &Labels,
    ) -> Result<Option<Self>, FallbackReason> {
        let Some(chain_id) = labels.get(LABEL_SNAPSHOT_REF) else {
            return Ok(None);
        };
        let digest = |key: &str| -> Result<Option<Digest>, FallbackReason> {
            labels
                .get(key)
                .map(|value| {
                    value.parse::<Digest>().map_err(|e| {
                        FallbackReason::new(
                            FallbackReason::INVALID_LABELS,
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
                        FallbackReason::new(
                            FallbackReason::INVALID_LABELS,
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

/// Why a layer is pulled normally instead of mounted remotely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {detail}")]
pub struct FallbackReason {
    /// Stable, low-cardinality reason code: the metrics key.
    pub code: &'static str,
    /// Human explanation for the log.
    pub detail: String,
}

impl FallbackReason {
    /// No provider is configured for lazy pulling.
    pub const NOT_CONFIGURED: &'static str = "not-configured";
    /// The client did not pass the labels a lazy pull needs (plain `ctr pull`).
    pub const MISSING_LABELS: &'static str = "missing-labels";
    /// A label is present but malformed.
    pub const INVALID_LABELS: &'static str = "invalid-labels";
    /// The layer's format cannot be served lazily (e.g. not zstd:chunked).
    pub const UNSUPPORTED_LAYER: &'static str = "unsupported-layer";
    /// The registry could not be reached or refused the request.
    pub const REGISTRY: &'static str = "registry-error";
    /// Mounting failed.
    pub const MOUNT_FAILED: &'static str = "mount-failed";
    /// The chain ID exists already with another parent, or a concurrent prepare won.
    pub const CONFLICT: &'static str = "conflict";
    /// The layer is not zstd:chunked (gzip, plain tar, or zstd without a TOC): it
    /// can only be pulled whole. Convert the image with `zest convert`.
    pub const NOT_CHUNKED: &'static str = "not-chunked";
    /// The layer's TOC is not vouched for by the manifest (found by footer only) and
    /// the configuration requires an authenticated one.
    pub const UNAUTHENTICATED_TOC: &'static str = "unauthenticated-toc";
    /// The image manifest could not be fetched or verified, or does not list the layer.
    pub const MANIFEST_UNAVAILABLE: &'static str = "manifest-unavailable";
    /// The layer's TOC could not be fetched from the registry.
    pub const TOC_UNAVAILABLE: &'static str = "toc-unavailable";
    /// The layer's TOC (or its annotations) failed validation.
    pub const TOC_INVALID: &'static str = "toc-invalid";
    /// The service is stopping.
    pub const SHUTTING_DOWN: &'static str = "shutting-down";

    /// Builds a reason.
    pub fn new(code: &'static str, detail: impl Into<String>) -> Self {
        FallbackReason {
            code,
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
    /// [`FallbackReason::MISSING_LABELS`].
    async fn try_mount(
        &self,
        request: &RemoteLayerRequest,
        target_dir: &Path,
    ) -> Result<RemoteMounted, FallbackReason>;

    /// Re-establishes the mount of a stored remote layer after a restart of the
    /// service, if it is not mounted any more. `target_dir` may still hold a dead
    /// mount of the previous run (served by a process that is gone): detach it before
    /// mounting again. Called in the background at startup; the default does nothing.
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
/// normally, with the reason [`FallbackReason::NOT_CONFIGURED`].
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRemoteLayers;

#[async_trait::async_trait]
impl RemoteLayerProvider for NoRemoteLayers {
    async fn try_mount(
        &self,
        _request: &RemoteLayerRequest,
        _target_dir: &Path,
    ) -> Result<RemoteMounted, FallbackReason> {
        Err(FallbackReason::new(
            FallbackReason::NOT_CONFIGURED,
            "lazy pulling not configured",
        ))
    }
}

/// Counts fallbacks per reason code, for metrics.
#[derive(Debug, Default)]
pub struct FallbackCounters {
    counts: Mutex<BTreeMap<&'static str, u64>>,
}

impl FallbackCounters {
    /// Counts one fallback.
    pub fn record(&self, reason: &FallbackReason) {
        // A poisoned lock only means another thread panicked mid-increment; the map
        // is still a valid map, so keep counting.
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        *counts.entry(reason.code).or_insert(0) += 1;
    }

    /// A snapshot of the counters: reason code -> number of fallbacks.
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        self.counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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
            Err(FallbackReason {
                code: FallbackReason::INVALID_LABELS,
                ..
            })
        ));
    }

    #[test]
    fn counters() {
        let counters = FallbackCounters::default();
        let reason = FallbackReason::new(FallbackReason::NOT_CONFIGURED, "x");
        counters.record(&reason);
        counters.record(&reason);
        assert_eq!(
            counters.snapshot().get(FallbackReason::NOT_CONFIGURED),
            Some(&2)
        );
    }
}
