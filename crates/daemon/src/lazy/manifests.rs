//! Image manifests by digest, for the layers of an image being prepared one after
//! the other: read from containerd's content store when it holds them (verified;
//! an index resolved to the configured platform there too), else resolved by
//! [`RegistryClient::resolve_image`] (the one owner of manifest resolution over the
//! network: fetched by digest and verified, an index resolved to the configured
//! platform); resolved once however many layers ask.
//!
//! Invariants: a resolution that failed is not cached (the next prepare tries
//! again); the cache is bounded; every resolution is bounded by a timeout.

use parking_lot::Mutex;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OnceCell;

use super::local_content::LocalContent;
use zest_oci::digest::Digest;
use zest_oci::{
    media_type, Descriptor, ImageManifest, ManifestKind, Platform, Reference, Repository,
};
use zest_registry::RegistryClient;
use zest_snapshotter::{Fallback, FallbackReason};

/// Manifests kept in memory.
const ENTRIES: usize = 32;

/// Largest manifest or index read from the content store (the registry client's
/// default bound).
const MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// An image manifest as resolved: parsed, and its descriptor (what a referrer
/// names as its subject).
pub(super) struct ResolvedManifest {
    pub(super) image: ImageManifest,
    pub(super) descriptor: Descriptor,
}

/// A manifest fetched once for every layer of an image that asks.
type Cell = Arc<OnceCell<Arc<ResolvedManifest>>>;

/// Recently used image manifests.
pub(super) struct Manifests {
    client: RegistryClient,
    local: Arc<LocalContent>,
    platform: Platform,
    timeout: Duration,
    cache: Mutex<lru::LruCache<(Repository, Digest), Cell>>,
    /// Manifest documents fetched (an index and its platform's manifest count two).
    fetches: AtomicU64,
}

impl Manifests {
    pub(super) fn new(
        client: RegistryClient,
        local: Arc<LocalContent>,
        platform: Platform,
        timeout: Duration,
    ) -> Self {
        Manifests {
            client,
            local,
            platform,
            timeout,
            cache: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(ENTRIES).unwrap_or(NonZeroUsize::MIN),
            )),
            fetches: AtomicU64::new(0),
        }
    }

    /// Manifest documents fetched so far.
    pub(super) fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// The image manifest `digest` of `reference`'s repository (an index resolves
    /// to the configured platform).
    pub(super) async fn get(
        &self,
        reference: &Reference,
        digest: Digest,
    ) -> Result<Arc<ResolvedManifest>, Fallback> {
        let key = (reference.repository.clone(), digest);
        let cell = {
            let mut cache = self.cache.lock();
            Arc::clone(cache.get_or_insert(key.clone(), || Arc::new(OnceCell::new())))
        };
        let result = cell
            .get_or_try_init(|| self.resolve(reference, digest))
            .await
            .cloned();
        if result.is_err() {
            let mut cache = self.cache.lock();
            if cache
                .peek(&key)
                .is_some_and(|c| Arc::ptr_eq(c, &cell) && !c.initialized())
            {
                cache.pop(&key);
            }
        }
        result
    }

    async fn resolve(
        &self,
        reference: &Reference,
        digest: Digest,
    ) -> Result<Arc<ResolvedManifest>, Fallback> {
        if let Some(local) = self.resolve_locally(digest).await {
            return Ok(Arc::new(local));
        }
        let pinned = reference.with_digest(digest);
        let timeout = self.timeout;
        let unavailable =
            |detail: String| Fallback::new(FallbackReason::ManifestUnavailable, detail);
        let resolved =
            tokio::time::timeout(timeout, self.client.resolve_image(&pinned, &self.platform))
                .await
                .map_err(|_| {
                    unavailable(format!(
                        "manifest {pinned}: no answer within {timeout:?} (lazy.mount_timeout_secs)"
                    ))
                })?
                .map_err(|e| unavailable(format!("manifest {pinned}: {e}")))?;
        let documents = if resolved.index.is_some() { 2 } else { 1 };
        self.fetches.fetch_add(documents, Ordering::Relaxed);
        Ok(Arc::new(ResolvedManifest {
            descriptor: resolved.manifest.descriptor(),
            image: resolved.image,
        }))
    }

    /// The image manifest `digest` from containerd's content store: the manifest
    /// itself, or the configured platform's entry of the index it is; `None` when
    /// the store lacks either.
    async fn resolve_locally(&self, digest: Digest) -> Option<ResolvedManifest> {
        let bytes = self.local.read(&digest, MAX_MANIFEST_BYTES).await?;
        let parsed = ManifestKind::parse("", &bytes).ok()?;
        let (image, descriptor) = match parsed {
            ManifestKind::Image(image) => {
                let media_type = image
                    .media_type
                    .clone()
                    .filter(|t| media_type::is_image_manifest(t))
                    .unwrap_or_else(|| media_type::OCI_MANIFEST.to_owned());
                let descriptor = Descriptor::new(media_type, digest, bytes.len() as u64);
                (image, descriptor)
            }
            ManifestKind::Index(index) => {
                let entry = index.select(&self.platform)?;
                let bytes = self.local.read(&entry.digest, MAX_MANIFEST_BYTES).await?;
                if bytes.len() as u64 != entry.size {
                    return None;
                }
                let ManifestKind::Image(image) =
                    ManifestKind::parse(&entry.media_type, &bytes).ok()?
                else {
                    return None;
                };
                let descriptor =
                    Descriptor::new(entry.media_type.clone(), entry.digest, entry.size);
                (image, descriptor)
            }
        };
        tracing::debug!(manifest = %descriptor.digest, "image manifest read from containerd's content store");
        Some(ResolvedManifest { image, descriptor })
    }
}
