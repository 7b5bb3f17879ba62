//! Lazy layer mounts: [`LazyLayerProvider`], the [`RemoteLayerProvider`] that serves
//! zstd:chunked image layers straight from their registry through FUSE.
//!
//! On a remote prepare it fetches the image manifest by its digest (verified; an
//! index resolves to this host's platform), finds the layer, reads the layer's TOC
//! with one authenticated range request, and mounts a [`LayerMount`] on the snapshot
//! directory. Anything else — gzip or plain layers, a TOC the manifest does not vouch
//! for, an unreachable registry — is a [`FallbackReason`] with a stable code, and
//! containerd pulls the layer normally.
//!
//! Sharing: one [`Fetcher`] (layer index, single-flight table, counters) per layer
//! digest, refcounted by the mounts using it, so a layer used by two chains is
//! fetched and indexed once. Each snapshot directory still gets its own FUSE mount of
//! that fetcher rather than a bind mount of the first one: mounts then have
//! independent lifetimes (removing one chain never touches another's mount), and the
//! cost of a second mount is a few idle threads, the data coming from the shared
//! chunk cache. Indexes of layers not mounted (prefetched TOCs of an image's
//! following layers, recently unmounted layers) are kept up to
//! [`LazyConfig::max_idle_layers`], least recently used dropped first.
//!
//! Restarts: each mount's details (repository and layer descriptor) are stored with
//! the snapshot, and the compressed TOC is kept under [`LazyConfig::toc_dir`] (it is
//! re-verified against the manifest's TOC digest when read back). At start every
//! stored layer is mounted again in the background without touching the network;
//! when a TOC must come from a registry that is down, the layer retries with
//! exponential backoff while the socket keeps answering, and [`check`] reports it
//! unavailable until it is mounted.
//!
//! FUSE mounts are served by this process and cannot outlive it: when it exits, the
//! kernel aborts their connections and running containers get `ENOTCONN` on lazy
//! layers. So both shutdown modes release the mounts (state, TOCs and the chunk cache
//! are kept, and the layers are mounted again at the next start).
//!
//! Invariants: every byte served is verified through the chain manifest digest →
//! TOC digest → chunk digest; no lock is held across an await; every network wait is
//! bounded by a timeout; background tasks end when the service stops.
//!
//! [`check`]: RemoteLayerProvider::check

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Notify, OnceCell, Semaphore};

use super::config::ServiceConfig;
use super::remote::{
    FallbackReason, RemoteError, RemoteLayer, RemoteLayerProvider, RemoteLayerRequest,
    RemoteMounted, ShutdownMode,
};
use zest_cache::{CacheStats, ChunkCache};
use zest_fetch::toc::{fetch_layer_index, TocFetchOptions};
use zest_fetch::{FetchConfig, FetchError, FetchLimits, FetchStatsSnapshot, Fetcher};
use zest_format::{LayerIndex, TocLocation, MAX_TOC_UNCOMPRESSED};
use zest_fs::{LayerMount, MountOptions};
use zest_oci::digest::Digest;
use zest_oci::{
    Descriptor, ImageManifest, LayerCompression, ManifestKind, Platform, Reference, Repository,
};
use zest_registry::{RegistryClient, RegistryError, RegistryStats};
use zest_store::RegistryBlob;

/// Key of [`RemoteMounted::details`]: the repository the layer is read from.
pub const DETAIL_REPOSITORY: &str = "repository";
/// Key of [`RemoteMounted::details`]: the layer descriptor (JSON; annotations limited
/// to the zstd:chunked ones).
pub const DETAIL_DESCRIPTOR: &str = "descriptor";
/// Key of [`RemoteMounted::details`]: whether the manifest vouches for the TOC.
pub const DETAIL_AUTHENTICATED: &str = "toc-authenticated";

/// Manifests kept in memory (an image's layers are prepared one after the other, each
/// needing the manifest).
const MANIFEST_CACHE_ENTRIES: usize = 32;
/// First delay between two attempts to restore a layer.
const RESTORE_INITIAL_BACKOFF: Duration = Duration::from_millis(500);

/// Settings of a [`LazyLayerProvider`].
#[derive(Debug, Clone)]
pub struct LazyConfig {
    /// Range request tuning of each layer's fetcher.
    pub fetch: FetchConfig,
    /// Concurrent on-demand range requests per registry.
    pub requests_per_registry: usize,
    /// Concurrent prefetch/background range requests per registry.
    pub background_requests_per_registry: usize,
    /// How each layer is mounted (FUSE threads, prefetch, background fetch).
    pub mount: MountOptions,
    /// Refuse layers whose TOC is found by footer only (not vouched for by the
    /// manifest).
    pub require_authenticated_toc: bool,
    /// Fetch the TOCs of an image's following layers in the background.
    pub toc_prefetch: bool,
    /// TOCs fetched at once by that background work.
    pub toc_prefetch_parallelism: usize,
    /// Layer indexes kept for layers not mounted.
    pub max_idle_layers: usize,
    /// Time allowed for a manifest or TOC fetch while containerd waits.
    pub mount_timeout: Duration,
    /// A successful reachability check is trusted for this long (zero: always check).
    pub check_interval: Duration,
    /// Time allowed for a reachability check.
    pub check_timeout: Duration,
    /// Longest delay between two restore attempts.
    pub restore_max_backoff: Duration,
    /// Directory keeping the compressed TOCs of mounted layers, for restarts.
    pub toc_dir: PathBuf,
    /// Platform picked when a manifest digest names an index.
    pub platform: Platform,
}

impl LazyConfig {
    /// Defaults, with TOCs kept in `toc_dir`.
    pub fn new(toc_dir: PathBuf) -> Self {
        LazyConfig::from_service(&ServiceConfig::default(), toc_dir)
    }

    /// The settings the configuration file describes, TOCs kept in `toc_dir`
    /// (`zest serve` uses `<state_dir>/tocs`).
    pub fn from_service(config: &ServiceConfig, toc_dir: PathBuf) -> Self {
        let lazy = &config.lazy;
        LazyConfig {
            fetch: config.fetch.fetch_config(),
            requests_per_registry: config.fetch.requests_per_registry,
            background_requests_per_registry: config.fetch.background_requests_per_registry,
            mount: MountOptions {
                threads: lazy.fuse_threads,
                prefetch: lazy.prefetch,
                background: lazy.background(),
                ..MountOptions::default()
            },
            require_authenticated_toc: lazy.require_authenticated_toc,
            toc_prefetch: lazy.toc_prefetch,
            toc_prefetch_parallelism: lazy.toc_prefetch_parallelism,
            max_idle_layers: lazy.max_idle_layers,
            mount_timeout: Duration::from_secs(lazy.mount_timeout_secs),
            check_interval: Duration::from_secs(lazy.check_interval_secs),
            check_timeout: Duration::from_secs(lazy.check_timeout_secs),
            restore_max_backoff: Duration::from_secs(lazy.restore_max_backoff_secs),
            toc_dir,
            platform: Platform::host(),
        }
    }
}

/// Error setting up a [`LazyLayerProvider`].
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    /// The TOC directory cannot be created.
    #[error("cannot create the TOC directory {path}: {source}")]
    TocDir {
        /// The directory.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Counters and gauges of a [`LazyLayerProvider`], for metrics.
#[derive(Debug, Clone, Default)]
pub struct LazyStats {
    /// Snapshot directories with a live lazy mount.
    pub mounted: usize,
    /// Stored layers waiting to be mounted again (restore in progress or failed).
    pub restoring: usize,
    /// Layer indexes in memory (mounted or idle).
    pub layers: usize,
    /// Of those, the ones no mount uses.
    pub idle_layers: usize,
    /// Lazy mounts made (prepares and restores).
    pub mounts_total: u64,
    /// Stored layers mounted again after a restart.
    pub restores_total: u64,
    /// Failed restore attempts (each retried with backoff unless permanent).
    pub restore_failures_total: u64,
    /// TOCs fetched from a registry.
    pub toc_fetches_total: u64,
    /// Compressed TOC bytes fetched from registries.
    pub toc_bytes_total: u64,
    /// TOCs read back from the local TOC store (no request).
    pub toc_local_loads_total: u64,
    /// TOCs fetched ahead of their prepare for an image's following layers.
    pub toc_prefetches_total: u64,
    /// Image manifests fetched.
    pub manifest_fetches_total: u64,
    /// Reachability checks that failed.
    pub check_failures_total: u64,
    /// Fetch counters summed over every layer, past ones included.
    pub fetch: FetchStatsSnapshot,
    /// The chunk cache.
    pub cache: CacheStats,
    /// The registry client.
    pub registry: RegistryStats,
}

/// Mounts zstd:chunked layers lazily. Cheap to share (`Arc`); see the module docs.
pub struct LazyLayerProvider {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LazyLayerProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyLayerProvider")
            .field("toc_dir", &self.inner.config.toc_dir)
            .finish()
    }
}

/// A manifest fetched once for every layer of an image that asks.
type ManifestCell = Arc<OnceCell<Arc<ImageManifest>>>;

struct Inner {
    client: RegistryClient,
    cache: Arc<ChunkCache>,
    config: LazyConfig,
    limits: Mutex<HashMap<String, FetchLimits>>,
    manifests: Mutex<lru::LruCache<(Repository, Digest), ManifestCell>>,
    layers: Arc<LayerTable>,
    mounts: Mutex<HashMap<PathBuf, Slot>>,
    counters: Counters,
    stop: Arc<Cancel>,
    /// Bounds background TOC work: prefetch of following layers, and restores.
    toc_prefetch: Arc<Semaphore>,
}

#[derive(Default)]
struct Counters {
    mounts: AtomicU64,
    restores: AtomicU64,
    restore_failures: AtomicU64,
    toc_fetches: AtomicU64,
    toc_bytes: AtomicU64,
    toc_local: AtomicU64,
    toc_prefetches: AtomicU64,
    manifest_fetches: AtomicU64,
    check_failures: AtomicU64,
}

fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// What is at a snapshot directory.
enum Slot {
    /// A live FUSE mount.
    Mounted(Box<MountedLayer>),
    /// A stored layer not mounted yet (restore in progress, or given up).
    Restoring {
        digest: Digest,
        cancel: Arc<Cancel>,
        last_error: Arc<Mutex<String>>,
    },
}

struct MountedLayer {
    mount: LayerMount,
    lease: LayerLease,
}

/// Locks a mutex, ignoring poisoning: every critical section here leaves the data
/// consistent at each step.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A cancellation flag that async waits can select on.
#[derive(Default)]
struct Cancel {
    flag: AtomicBool,
    notify: Notify,
}

impl Cancel {
    fn cancel(&self) {
        self.flag.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Resolves once cancelled.
    async fn cancelled(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Register before checking the flag, so a cancel in between is not lost.
            notified.as_mut().enable();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }
}

/// A layer opened for reading: its fetcher and what is needed to open it again.
struct OpenedLayer {
    fetcher: Arc<Fetcher>,
    repository: Repository,
    descriptor: Descriptor,
    authenticated: bool,
    /// The compressed TOC as fetched, until it is written to the TOC store.
    toc: Mutex<Option<Bytes>>,
}

/// One layer digest's shared state.
struct LayerEntry {
    digest: Digest,
    opened: OnceCell<Arc<OpenedLayer>>,
    /// Leases held (mounts, and opens in progress); changed under the table lock.
    users: AtomicUsize,
    idle_since: Mutex<Instant>,
    last_check: Mutex<Option<Instant>>,
}

/// Layer digest -> shared layer, refcounted by leases.
struct LayerTable {
    entries: Mutex<HashMap<Digest, Arc<LayerEntry>>>,
    max_idle: usize,
    /// Fetch counters of layers dropped from the table, so totals never go down.
    retired: Mutex<FetchStatsSnapshot>,
}

/// A counted use of a [`LayerEntry`]; released on drop.
struct LayerLease {
    table: Arc<LayerTable>,
    entry: Arc<LayerEntry>,
}

impl LayerTable {
    fn hold(self: &Arc<Self>, digest: Digest) -> LayerLease {
        let mut entries = lock(&self.entries);
        let entry = Arc::clone(entries.entry(digest).or_insert_with(|| {
            Arc::new(LayerEntry {
                digest,
                opened: OnceCell::new(),
                users: AtomicUsize::new(0),
                idle_since: Mutex::new(Instant::now()),
                last_check: Mutex::new(None),
            })
        }));
        entry.users.fetch_add(1, Ordering::Relaxed);
        LayerLease {
            table: Arc::clone(self),
            entry,
        }
    }

    /// Whether the layer's index is in memory already.
    fn is_open(&self, digest: &Digest) -> bool {
        lock(&self.entries)
            .get(digest)
            .is_some_and(|e| e.opened.initialized())
    }

    fn release(&self, entry: &Arc<LayerEntry>) {
        let mut entries = lock(&self.entries);
        if entry.users.fetch_sub(1, Ordering::Relaxed) != 1 {
            return;
        }
        *lock(&entry.idle_since) = Instant::now();
        let same = entries
            .get(&entry.digest)
            .is_some_and(|e| Arc::ptr_eq(e, entry));
        if !entry.opened.initialized() {
            // A failed open: forget it so that the next attempt starts afresh.
            if same {
                entries.remove(&entry.digest);
            }
            return;
        }
        self.evict_idle(&mut entries);
    }

    /// Drops the least recently used idle indexes beyond the bound.
    fn evict_idle(&self, entries: &mut HashMap<Digest, Arc<LayerEntry>>) {
        let mut idle: Vec<(Instant, Digest)> = entries
            .values()
            .filter(|e| e.users.load(Ordering::Relaxed) == 0 && e.opened.initialized())
            .map(|e| (*lock(&e.idle_since), e.digest))
            .collect();
        if idle.len() <= self.max_idle {
            return;
        }
        idle.sort();
        let excess = idle.len() - self.max_idle;
        for (_, digest) in idle.into_iter().take(excess) {
            if let Some(entry) = entries.remove(&digest) {
                if let Some(opened) = entry.opened.get() {
                    let mut retired = lock(&self.retired);
                    *retired = add_stats(&retired, &opened.fetcher.stats());
                }
                tracing::debug!(layer = %digest, "dropping idle layer index");
            }
        }
    }

    /// (layers, idle layers, fetch counters of all layers ever held).
    fn stats(&self) -> (usize, usize, FetchStatsSnapshot) {
        let entries = lock(&self.entries);
        let mut total = *lock(&self.retired);
        let (mut layers, mut idle) = (0, 0);
        for entry in entries.values() {
            if let Some(opened) = entry.opened.get() {
                layers += 1;
                if entry.users.load(Ordering::Relaxed) == 0 {
                    idle += 1;
                }
                total = add_stats(&total, &opened.fetcher.stats());
            }
        }
        (layers, idle, total)
    }
}

impl LayerLease {
    fn opened(&self) -> Option<&Arc<OpenedLayer>> {
        self.entry.opened.get()
    }
}

impl Drop for LayerLease {
    fn drop(&mut self) {
        self.table.release(&self.entry);
    }
}

fn add_stats(a: &FetchStatsSnapshot, b: &FetchStatsSnapshot) -> FetchStatsSnapshot {
    FetchStatsSnapshot {
        range_requests: a.range_requests + b.range_requests,
        bytes_fetched: a.bytes_fetched + b.bytes_fetched,
        blocking_misses: a.blocking_misses + b.blocking_misses,
        chunks_verified: a.chunks_verified + b.chunks_verified,
        verification_failures: a.verification_failures + b.verification_failures,
        retries: a.retries + b.retries,
        prefetch_bytes: a.prefetch_bytes + b.prefetch_bytes,
        memory_hits: a.memory_hits + b.memory_hits,
        disk_hits: a.disk_hits + b.disk_hits,
        deduplicated_waits: a.deduplicated_waits + b.deduplicated_waits,
        failures: a.failures + b.failures,
    }
}

/// How a layer's TOC is found.
#[derive(Debug)]
enum TocSource {
    /// Annotations give its position and digest: one request, authenticated.
    Annotated(TocLocation),
    /// Through the blob's footer (unauthenticated; only when allowed).
    Footer,
}

/// Decides whether a layer can be served lazily, from its descriptor alone.
fn classify(desc: &Descriptor, require_authenticated: bool) -> Result<TocSource, FallbackReason> {
    match LayerCompression::from_media_type(&desc.media_type) {
        Some(LayerCompression::Zstd) => {}
        Some(other) => {
            return Err(FallbackReason::new(
                FallbackReason::NOT_CHUNKED,
                format!(
                    "layer {} is {other:?}-compressed ({}); only zstd:chunked layers are mounted lazily (convert the image with `zest convert`)",
                    desc.digest, desc.media_type
                ),
            ))
        }
        None => {
            return Err(FallbackReason::new(
                FallbackReason::UNSUPPORTED_LAYER,
                format!(
                    "layer {} has media type {:?}, which is not an image layer zest can mount",
                    desc.digest, desc.media_type
                ),
            ))
        }
    }
    let unauthenticated = |why: &str| {
        if require_authenticated {
            Err(FallbackReason::new(
                FallbackReason::UNAUTHENTICATED_TOC,
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
                return Err(FallbackReason::new(
                    FallbackReason::TOC_INVALID,
                    format!(
                        "layer {}: its TOC is {} bytes compressed, more than the {MAX_TOC_UNCOMPRESSED}-byte limit",
                        desc.digest, loc.toc.compressed_len
                    ),
                ));
            }
            Ok(TocSource::Annotated(loc))
        }
        Ok(Some(_)) => unauthenticated("its zstd:chunked annotations carry no TOC digest"),
        Ok(None) if require_authenticated => Err(FallbackReason::new(
            FallbackReason::NOT_CHUNKED,
            format!(
                "layer {} is tar+zstd without zstd:chunked annotations (a plain zstd layer, or its manifest lost them)",
                desc.digest
            ),
        )),
        Ok(None) => Ok(TocSource::Footer),
        Err(e) => Err(FallbackReason::new(
            FallbackReason::TOC_INVALID,
            format!("layer {}: malformed zstd:chunked annotations: {e}", desc.digest),
        )),
    }
}

/// The descriptor stored for a restart: the zstd:chunked annotations only.
fn stored_descriptor(desc: &Descriptor) -> Descriptor {
    let mut stored = Descriptor::new(desc.media_type.clone(), desc.digest, desc.size);
    stored.annotations = desc
        .annotations
        .iter()
        .filter(|(k, _)| k.contains(".zstd-chunked."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    stored
}

fn toc_path(dir: &Path, digest: &Digest) -> PathBuf {
    dir.join(format!("{}.toc", digest.hex()))
}

fn registry_reason(code: &'static str, what: &str, e: &RegistryError) -> FallbackReason {
    FallbackReason::new(code, format!("{what}: {e}"))
}

/// Whether a restore failing with this reason can succeed later.
fn is_permanent(code: &str) -> bool {
    matches!(
        code,
        FallbackReason::NOT_CHUNKED
            | FallbackReason::UNAUTHENTICATED_TOC
            | FallbackReason::UNSUPPORTED_LAYER
            | FallbackReason::TOC_INVALID
    )
}

impl LazyLayerProvider {
    /// A provider reading through `client`, caching chunks in `cache`. Creates
    /// [`LazyConfig::toc_dir`]. Must be called inside a tokio runtime (mounts run their
    /// fetches on it).
    pub fn new(
        client: RegistryClient,
        cache: Arc<ChunkCache>,
        config: LazyConfig,
    ) -> Result<Arc<Self>, LazyError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.toc_dir)
            .map_err(|source| LazyError::TocDir {
                path: config.toc_dir.clone(),
                source,
            })?;
        let manifests = lru::LruCache::new(
            NonZeroUsize::new(MANIFEST_CACHE_ENTRIES).unwrap_or(NonZeroUsize::MIN),
        );
        Ok(Arc::new(LazyLayerProvider {
            inner: Arc::new(Inner {
                client,
                cache,
                limits: Mutex::new(HashMap::new()),
                manifests: Mutex::new(manifests),
                layers: Arc::new(LayerTable {
                    entries: Mutex::new(HashMap::new()),
                    max_idle: config.max_idle_layers,
                    retired: Mutex::new(FetchStatsSnapshot::default()),
                }),
                mounts: Mutex::new(HashMap::new()),
                counters: Counters::default(),
                stop: Arc::new(Cancel::default()),
                toc_prefetch: Arc::new(Semaphore::new(config.toc_prefetch_parallelism.max(1))),
                config,
            }),
        }))
    }

    /// The chunk cache.
    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.inner.cache
    }

    /// The registry client.
    pub fn client(&self) -> &RegistryClient {
        &self.inner.client
    }

    /// Counters and gauges.
    pub fn stats(&self) -> LazyStats {
        let inner = &self.inner;
        let (mounted, restoring) = {
            let mounts = lock(&inner.mounts);
            let mounted = mounts
                .values()
                .filter(|s| matches!(s, Slot::Mounted(_)))
                .count();
            (mounted, mounts.len() - mounted)
        };
        let (layers, idle_layers, fetch) = inner.layers.stats();
        let c = &inner.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        LazyStats {
            mounted,
            restoring,
            layers,
            idle_layers,
            mounts_total: g(&c.mounts),
            restores_total: g(&c.restores),
            restore_failures_total: g(&c.restore_failures),
            toc_fetches_total: g(&c.toc_fetches),
            toc_bytes_total: g(&c.toc_bytes),
            toc_local_loads_total: g(&c.toc_local),
            toc_prefetches_total: g(&c.toc_prefetches),
            manifest_fetches_total: g(&c.manifest_fetches),
            check_failures_total: g(&c.check_failures),
            fetch,
            cache: inner.cache.stats(),
            registry: inner.client.stats(),
        }
    }

    /// Whether a live lazy mount is at `target_dir`.
    pub fn is_mounted(&self, target_dir: &Path) -> bool {
        matches!(
            lock(&self.inner.mounts).get(target_dir),
            Some(Slot::Mounted(_))
        )
    }

    /// Fetch counters of the layer `digest`, if its index is in memory.
    pub fn layer_stats(&self, digest: &Digest) -> Option<FetchStatsSnapshot> {
        lock(&self.inner.layers.entries)
            .get(digest)
            .and_then(|e| e.opened.get().map(|o| o.fetcher.stats()))
    }
}

impl Inner {
    fn limits(&self, registry: &str) -> FetchLimits {
        lock(&self.limits)
            .entry(registry.to_owned())
            .or_insert_with(|| {
                FetchLimits::new(
                    self.config.requests_per_registry,
                    self.config.background_requests_per_registry,
                )
            })
            .clone()
    }

    /// The image manifest `digest` of `reference`'s repository (an index resolves
    /// to the configured platform), fetched once however many layers ask.
    async fn image_manifest(
        &self,
        reference: &Reference,
        digest: Digest,
    ) -> Result<Arc<ImageManifest>, FallbackReason> {
        let key = (reference.repository.clone(), digest);
        let cell = {
            let mut manifests = lock(&self.manifests);
            Arc::clone(manifests.get_or_insert(key.clone(), || Arc::new(OnceCell::new())))
        };
        let result = cell
            .get_or_try_init(|| self.fetch_manifest(reference, digest))
            .await
            .cloned();
        if result.is_err() {
            let mut manifests = lock(&self.manifests);
            if manifests
                .peek(&key)
                .is_some_and(|c| Arc::ptr_eq(c, &cell) && !c.initialized())
            {
                manifests.pop(&key);
            }
        }
        result
    }

    async fn fetch_manifest(
        &self,
        reference: &Reference,
        digest: Digest,
    ) -> Result<Arc<ImageManifest>, FallbackReason> {
        let pinned = reference.with_digest(digest);
        let unavailable =
            |detail: String| FallbackReason::new(FallbackReason::MANIFEST_UNAVAILABLE, detail);
        let timeout = self.config.mount_timeout;
        let fetched = tokio::time::timeout(timeout, self.client.get_manifest(&pinned))
            .await
            .map_err(|_| unavailable(format!("manifest {pinned}: no answer within {timeout:?}")))?
            .map_err(|e| {
                registry_reason(
                    FallbackReason::MANIFEST_UNAVAILABLE,
                    &format!("manifest {pinned}"),
                    &e,
                )
            })?;
        bump(&self.counters.manifest_fetches, 1);
        let parsed = fetched
            .parse()
            .map_err(|e| unavailable(format!("manifest {pinned}: {e}")))?;
        let index = match parsed {
            ManifestKind::Image(image) => return Ok(Arc::new(image)),
            ManifestKind::Index(index) => index,
        };
        let platform = &self.config.platform;
        let desc = index.select(platform).ok_or_else(|| {
            unavailable(format!(
                "{pinned} is an index without a manifest for platform {platform}"
            ))
        })?;
        let child = tokio::time::timeout(
            timeout,
            self.client
                .get_manifest_by_descriptor(&reference.repository, desc),
        )
        .await
        .map_err(|_| {
            unavailable(format!(
                "manifest {} of {pinned}: no answer within {timeout:?}",
                desc.digest
            ))
        })?
        .map_err(|e| {
            registry_reason(
                FallbackReason::MANIFEST_UNAVAILABLE,
                &format!("manifest {} of {pinned}", desc.digest),
                &e,
            )
        })?;
        bump(&self.counters.manifest_fetches, 1);
        match child.parse() {
            Ok(ManifestKind::Image(image)) => Ok(Arc::new(image)),
            Ok(ManifestKind::Index(_)) => Err(unavailable(format!(
                "{pinned}: an index inside an index is not supported"
            ))),
            Err(e) => Err(unavailable(format!(
                "manifest {} of {pinned}: {e}",
                desc.digest
            ))),
        }
    }

    /// Holds the shared layer for `desc`, opening it (TOC from the local store, else
    /// from the registry) unless it is open or being opened already.
    async fn open_shared(
        &self,
        repository: &Repository,
        desc: &Descriptor,
    ) -> Result<LayerLease, FallbackReason> {
        let lease = self.layers.hold(desc.digest);
        lease
            .entry
            .opened
            .get_or_try_init(|| self.open_layer(repository, desc))
            .await?;
        Ok(lease)
    }

    async fn open_layer(
        &self,
        repository: &Repository,
        desc: &Descriptor,
    ) -> Result<Arc<OpenedLayer>, FallbackReason> {
        let source = classify(desc, self.config.require_authenticated_toc)?;
        let blob = Arc::new(RegistryBlob::for_layer(
            self.client.clone(),
            repository.clone(),
            desc,
        ));
        let (index, toc, authenticated) = match source {
            TocSource::Annotated(loc) => match self.load_local_toc(desc, &loc).await {
                Some(index) => {
                    bump(&self.counters.toc_local, 1);
                    (index, None, true)
                }
                None => {
                    let (index, bytes) = self.fetch_toc(repository, desc, loc).await?;
                    (index, Some(bytes), true)
                }
            },
            TocSource::Footer => {
                let options = TocFetchOptions {
                    deadline: Some(self.config.mount_timeout),
                    ..TocFetchOptions::default()
                };
                let fetched =
                    fetch_layer_index(blob.as_ref(), desc.size, &BTreeMap::new(), &options)
                        .await
                        .map_err(|e| match e {
                            FetchError::Toc { .. } => FallbackReason::new(
                                FallbackReason::NOT_CHUNKED,
                                format!(
                                    "layer {} has no readable zstd:chunked footer: {e}",
                                    desc.digest
                                ),
                            ),
                            other => FallbackReason::new(
                                FallbackReason::TOC_UNAVAILABLE,
                                format!("TOC of layer {}: {other}", desc.digest),
                            ),
                        })?;
                bump(&self.counters.toc_fetches, 1);
                (fetched.index, None, false)
            }
        };
        let fetcher = Fetcher::new(
            Arc::new(index),
            blob,
            Arc::clone(&self.cache),
            self.limits(&repository.registry),
            self.config.fetch.clone(),
            tokio::runtime::Handle::current(),
        );
        tracing::debug!(layer = %desc.digest, repository = %repository, authenticated, "layer index loaded");
        Ok(Arc::new(OpenedLayer {
            fetcher,
            repository: repository.clone(),
            descriptor: stored_descriptor(desc),
            authenticated,
            toc: Mutex::new(toc),
        }))
    }

    /// The TOC from the registry: one range request, verified against the
    /// manifest's TOC digest while decoding.
    async fn fetch_toc(
        &self,
        repository: &Repository,
        desc: &Descriptor,
        loc: TocLocation,
    ) -> Result<(LayerIndex, Bytes), FallbackReason> {
        let timeout = self.config.mount_timeout;
        let what = format!("TOC of layer {} in {repository}", desc.digest);
        let bytes = tokio::time::timeout(
            timeout,
            self.client
                .get_range(repository, &desc.digest, loc.toc_range()),
        )
        .await
        .map_err(|_| {
            FallbackReason::new(
                FallbackReason::TOC_UNAVAILABLE,
                format!("{what}: no answer within {timeout:?}"),
            )
        })?
        .map_err(|e| registry_reason(FallbackReason::TOC_UNAVAILABLE, &what, &e))?;
        bump(&self.counters.toc_fetches, 1);
        bump(&self.counters.toc_bytes, bytes.len() as u64);
        let size = desc.size;
        let decoded = {
            let bytes = bytes.clone();
            tokio::task::spawn_blocking(move || LayerIndex::decode(&bytes, &loc, size)).await
        };
        match decoded {
            Ok(Ok(index)) => Ok((index, bytes)),
            Ok(Err(e)) => Err(FallbackReason::new(
                FallbackReason::TOC_INVALID,
                format!("{what}: {e}"),
            )),
            Err(e) => Err(FallbackReason::new(
                FallbackReason::TOC_INVALID,
                format!("{what}: decoding task failed: {e}"),
            )),
        }
    }

    /// The TOC kept by an earlier mount, if present and still matching the
    /// manifest's TOC digest (a bad copy is deleted).
    async fn load_local_toc(&self, desc: &Descriptor, loc: &TocLocation) -> Option<LayerIndex> {
        let path = toc_path(&self.config.toc_dir, &desc.digest);
        let loc = *loc;
        let size = desc.size;
        let digest = desc.digest;
        let result = tokio::task::spawn_blocking(move || {
            let meta = match std::fs::metadata(&path) {
                Ok(m) => m,
                Err(_) => return None,
            };
            let outcome = if meta.len() != loc.toc.compressed_len {
                Err(format!(
                    "{} bytes, expected {}",
                    meta.len(),
                    loc.toc.compressed_len
                ))
            } else {
                std::fs::read(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|bytes| {
                        LayerIndex::decode(&bytes, &loc, size).map_err(|e| e.to_string())
                    })
            };
            match outcome {
                Ok(index) => Some(index),
                Err(e) => {
                    tracing::warn!(layer = %digest, path = %path.display(), error = %e, "discarding the stored TOC; fetching it again");
                    let _ = std::fs::remove_file(&path);
                    None
                }
            }
        })
        .await;
        result.ok().flatten()
    }

    /// Writes the layer's TOC to the TOC store (once), for restarts. Best effort.
    async fn persist_toc(&self, opened: &Arc<OpenedLayer>) {
        let Some(bytes) = lock(&opened.toc).take() else {
            return;
        };
        let dir = self.config.toc_dir.clone();
        let digest = opened.descriptor.digest;
        let result = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            let path = toc_path(&dir, &digest);
            if path.exists() {
                return Ok(());
            }
            let temp = dir.join(format!(
                ".{}.{:016x}.tmp",
                digest.hex(),
                rand::random::<u64>()
            ));
            let written = (|| {
                let mut file = std::fs::File::create(&temp)?;
                file.write_all(&bytes)?;
                file.sync_all()?;
                std::fs::rename(&temp, &path)
            })();
            if written.is_err() {
                let _ = std::fs::remove_file(&temp);
            }
            written
        })
        .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(layer = %digest, error = %e, "cannot keep the TOC for restarts; it will be fetched again")
            }
            Err(e) => tracing::warn!(layer = %digest, error = %e, "TOC write task failed"),
        }
    }

    /// Deletes the stored TOC of `digest` unless a snapshot directory still uses it.
    async fn forget_toc_if_unused(&self, digest: Digest) {
        let used = lock(&self.mounts).values().any(|slot| match slot {
            Slot::Mounted(m) => m.lease.entry.digest == digest,
            Slot::Restoring { digest: d, .. } => *d == digest,
        });
        if used {
            return;
        }
        let path = toc_path(&self.config.toc_dir, &digest);
        let _ = tokio::task::spawn_blocking(move || match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot delete stored TOC")
            }
        })
        .await;
    }

    /// Mounts the held layer on `target` (blocking work off the async workers).
    async fn mount(
        &self,
        lease: LayerLease,
        target: &Path,
    ) -> Result<MountedLayer, FallbackReason> {
        let Some(opened) = lease.opened().cloned() else {
            return Err(FallbackReason::new(
                FallbackReason::MOUNT_FAILED,
                "layer index missing after open",
            ));
        };
        let fetcher = Arc::clone(&opened.fetcher);
        let options = self.config.mount.clone();
        let dir = target.to_path_buf();
        let mounted =
            tokio::task::spawn_blocking(move || LayerMount::mount(fetcher, &dir, &options))
                .await
                .map_err(|e| {
                    FallbackReason::new(
                        FallbackReason::MOUNT_FAILED,
                        format!("mount task failed: {e}"),
                    )
                })?
                .map_err(|e| FallbackReason::new(FallbackReason::MOUNT_FAILED, e.to_string()))?;
        bump(&self.counters.mounts, 1);
        self.persist_toc(&opened).await;
        Ok(MountedLayer {
            mount: mounted,
            lease,
        })
    }

    /// Starts fetching, in the background, the TOCs of the layers listed after
    /// `current` in the request, so that their prepares need no request.
    fn prefetch_following(
        self: &Arc<Self>,
        repository: &Repository,
        manifest: &ImageManifest,
        request: &RemoteLayerRequest,
        current: Digest,
    ) {
        for digest in request.image_layers.iter().filter(|d| **d != current) {
            let Some(desc) = manifest.layers.iter().find(|l| l.digest == *digest) else {
                continue;
            };
            if classify(desc, self.config.require_authenticated_toc).is_err()
                || self.layers.is_open(digest)
            {
                continue;
            }
            let inner = Arc::clone(self);
            let repository = repository.clone();
            let desc = desc.clone();
            tokio::spawn(async move {
                let work = async {
                    let Ok(_permit) = inner.toc_prefetch.acquire().await else {
                        return;
                    };
                    if inner.layers.is_open(&desc.digest) {
                        return;
                    }
                    match inner.open_shared(&repository, &desc).await {
                        Ok(_lease) => {
                            bump(&inner.counters.toc_prefetches, 1);
                            tracing::debug!(layer = %desc.digest, "TOC prefetched");
                        }
                        Err(reason) => {
                            tracing::debug!(layer = %desc.digest, %reason, "TOC prefetch failed")
                        }
                    }
                };
                tokio::select! {
                    () = work => {}
                    () = inner.stop.cancelled() => {}
                }
            });
        }
    }
}

/// Reads the repository and descriptor a mount stored in its details.
fn stored_details(
    details: &BTreeMap<String, String>,
) -> Result<(Repository, Descriptor), RemoteError> {
    let repository = details
        .get(DETAIL_REPOSITORY)
        .ok_or_else(|| RemoteError(format!("stored layer has no {DETAIL_REPOSITORY:?} detail")))?;
    let (registry, name) = repository
        .split_once('/')
        .ok_or_else(|| RemoteError(format!("stored repository {repository:?} is malformed")))?;
    let repository = Repository::new(registry, name)
        .map_err(|e| RemoteError(format!("stored repository {repository:?}: {e}")))?;
    let descriptor = details
        .get(DETAIL_DESCRIPTOR)
        .ok_or_else(|| RemoteError(format!("stored layer has no {DETAIL_DESCRIPTOR:?} detail")))?;
    let descriptor: Descriptor = serde_json::from_str(descriptor)
        .map_err(|e| RemoteError(format!("stored layer descriptor: {e}")))?;
    Ok((repository, descriptor))
}

/// Detaches whatever is mounted on `dir` (a dead mount of a previous run).
fn detach_stale(dir: &Path) {
    match zest_fs::sys::detach(dir) {
        Ok(()) => {
            tracing::info!(dir = %dir.display(), "detached a stale mount left by a previous run")
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) => {}
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot detach the previous mount")
        }
    }
}

#[async_trait::async_trait]
impl RemoteLayerProvider for LazyLayerProvider {
    async fn try_mount(
        &self,
        request: &RemoteLayerRequest,
        target_dir: &Path,
    ) -> Result<RemoteMounted, FallbackReason> {
        let inner = &self.inner;
        if inner.stop.is_cancelled() {
            return Err(FallbackReason::new(
                FallbackReason::SHUTTING_DOWN,
                "the snapshotter is stopping",
            ));
        }
        let (Some(image_ref), Some(manifest_digest), Some(layer_digest)) = (
            request.image_ref.as_deref(),
            request.manifest_digest,
            request.layer_digest,
        ) else {
            let missing: Vec<&str> = [
                (
                    request.image_ref.is_none(),
                    zest_api::labels::LABEL_IMAGE_REF,
                ),
                (
                    request.manifest_digest.is_none(),
                    zest_api::labels::LABEL_MANIFEST_DIGEST,
                ),
                (
                    request.layer_digest.is_none(),
                    zest_api::labels::LABEL_LAYER_DIGEST,
                ),
            ]
            .into_iter()
            .filter_map(|(missing, label)| missing.then_some(label))
            .collect();
            return Err(FallbackReason::new(
                FallbackReason::MISSING_LABELS,
                format!(
                    "no {} label; lazy pulling needs a client that passes the image's layer labels (CRI, or zest pull)",
                    missing.join(", ")
                ),
            ));
        };
        let reference: Reference = image_ref.parse().map_err(|e| {
            FallbackReason::new(
                FallbackReason::INVALID_LABELS,
                format!("image reference label {image_ref:?}: {e}"),
            )
        })?;
        let manifest = inner.image_manifest(&reference, manifest_digest).await?;
        let desc = manifest
            .layers
            .iter()
            .find(|l| l.digest == layer_digest)
            .cloned()
            .ok_or_else(|| {
                FallbackReason::new(
                    FallbackReason::MANIFEST_UNAVAILABLE,
                    format!(
                        "manifest {manifest_digest} of {image_ref} does not list layer {layer_digest}"
                    ),
                )
            })?;
        classify(&desc, inner.config.require_authenticated_toc)?;
        if inner.config.toc_prefetch {
            inner.prefetch_following(&reference.repository, &manifest, request, layer_digest);
        }
        let descriptor = serde_json::to_string(&stored_descriptor(&desc)).map_err(|e| {
            FallbackReason::new(FallbackReason::MOUNT_FAILED, format!("descriptor: {e}"))
        })?;
        let lease = inner.open_shared(&reference.repository, &desc).await?;
        let authenticated = lease.opened().is_some_and(|o| o.authenticated);
        let mounted = inner.mount(lease, target_dir).await?;
        {
            let mut mounts = lock(&inner.mounts);
            if let Some(Slot::Mounted(old)) =
                mounts.insert(target_dir.to_path_buf(), Slot::Mounted(Box::new(mounted)))
            {
                // The snapshotter hands out fresh directories; never expected.
                tracing::error!(dir = %target_dir.display(), "a lazy mount replaced another on the same directory");
                drop(old);
            }
        }
        tracing::info!(
            chain_id = %request.chain_id,
            layer = %layer_digest,
            image = %image_ref,
            dir = %target_dir.display(),
            "layer mounted lazily"
        );
        let details = BTreeMap::from([
            (
                DETAIL_REPOSITORY.to_owned(),
                reference.repository.to_string(),
            ),
            (DETAIL_DESCRIPTOR.to_owned(), descriptor),
            (DETAIL_AUTHENTICATED.to_owned(), authenticated.to_string()),
        ]);
        Ok(RemoteMounted { details })
    }

    async fn restore(&self, layer: &RemoteLayer, target_dir: &Path) -> Result<(), RemoteError> {
        let inner = &self.inner;
        let (repository, desc) = stored_details(&layer.mounted.details)?;
        let cancel = Arc::new(Cancel::default());
        let last_error = Arc::new(Mutex::new(String::from("not attempted yet")));
        {
            let mut mounts = lock(&inner.mounts);
            if mounts.contains_key(target_dir) {
                return Ok(());
            }
            mounts.insert(
                target_dir.to_path_buf(),
                Slot::Restoring {
                    digest: desc.digest,
                    cancel: Arc::clone(&cancel),
                    last_error: Arc::clone(&last_error),
                },
            );
        }
        let dir = target_dir.to_path_buf();
        let _ = tokio::task::spawn_blocking(move || detach_stale(&dir)).await;
        let mut delay = RESTORE_INITIAL_BACKOFF;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let result = if target_dir.is_dir() {
                // Bounded like TOC prefetch: a start with many layers whose TOCs must
                // come from the registry does not open them all at once.
                let Ok(_permit) = inner.toc_prefetch.acquire().await else {
                    return Err(RemoteError("the service is stopping".into()));
                };
                match inner.open_shared(&repository, &desc).await {
                    Ok(lease) => inner.mount(lease, target_dir).await,
                    Err(reason) => Err(reason),
                }
            } else {
                Err(FallbackReason::new(
                    FallbackReason::MOUNT_FAILED,
                    format!("{} does not exist any more", target_dir.display()),
                ))
            };
            match result {
                Ok(mounted) => {
                    // Install the mount unless the snapshot was removed (or the
                    // service began stopping) meanwhile; then undo it instead.
                    let unwanted = {
                        let mut mounts = lock(&inner.mounts);
                        let ours = matches!(mounts.get(target_dir), Some(Slot::Restoring { cancel: c, .. }) if Arc::ptr_eq(c, &cancel));
                        if !ours || cancel.is_cancelled() || inner.stop.is_cancelled() {
                            Some(mounted)
                        } else {
                            mounts
                                .insert(target_dir.to_path_buf(), Slot::Mounted(Box::new(mounted)));
                            None
                        }
                    };
                    if let Some(mut mounted) = unwanted {
                        let _ =
                            tokio::task::spawn_blocking(move || mounted.mount.unmount_or_detach())
                                .await;
                        return Err(RemoteError("restore cancelled: the snapshot was removed or the service is stopping".into()));
                    }
                    bump(&inner.counters.restores, 1);
                    tracing::info!(layer = %desc.digest, dir = %target_dir.display(), attempt, "lazy layer mounted again");
                    return Ok(());
                }
                Err(reason) => {
                    bump(&inner.counters.restore_failures, 1);
                    *lock(&last_error) = reason.to_string();
                    if is_permanent(reason.code) || !target_dir.is_dir() {
                        return Err(RemoteError(format!(
                            "cannot mount layer {} again: {reason}",
                            desc.digest
                        )));
                    }
                    tracing::warn!(layer = %desc.digest, attempt, retry_in = ?delay, %reason, "cannot mount a stored layer yet; retrying");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = cancel.cancelled() => {}
                () = inner.stop.cancelled() => {}
            }
            if cancel.is_cancelled() || inner.stop.is_cancelled() {
                return Err(RemoteError(
                    "restore cancelled: the snapshot was removed or the service is stopping".into(),
                ));
            }
            delay = (delay * 2).min(inner.config.restore_max_backoff);
        }
    }

    async fn check(&self, _layer: &RemoteLayer, target_dir: &Path) -> Result<(), RemoteError> {
        let inner = &self.inner;
        let (entry, repository, desc) = {
            let mounts = lock(&inner.mounts);
            match mounts.get(target_dir) {
                Some(Slot::Mounted(m)) => {
                    let Some(opened) = m.lease.opened() else {
                        return Err(RemoteError("layer index missing".into()));
                    };
                    (
                        Arc::clone(&m.lease.entry),
                        opened.repository.clone(),
                        opened.descriptor.clone(),
                    )
                }
                Some(Slot::Restoring { last_error, .. }) => {
                    bump(&inner.counters.check_failures, 1);
                    return Err(RemoteError(format!(
                        "the lazy layer is not mounted yet (being restored in the background; last attempt: {})",
                        lock(last_error)
                    )));
                }
                None => {
                    bump(&inner.counters.check_failures, 1);
                    return Err(RemoteError(
                        "the lazy layer is not mounted by this service".into(),
                    ));
                }
            }
        };
        let interval = inner.config.check_interval;
        if !interval.is_zero() && lock(&entry.last_check).is_some_and(|t| t.elapsed() < interval) {
            return Ok(());
        }
        let timeout = inner.config.check_timeout;
        let answer =
            tokio::time::timeout(timeout, inner.client.blob_exists(&repository, &desc.digest))
                .await;
        let failure = match answer {
            Ok(Ok(Some(size))) if size == desc.size => None,
            Ok(Ok(Some(size))) => Some(format!(
                "{repository} serves blob {} with {size} bytes, the manifest says {}",
                desc.digest, desc.size
            )),
            Ok(Ok(None)) => Some(format!("{repository} no longer has blob {}", desc.digest)),
            Ok(Err(e)) => Some(format!(
                "registry unreachable for blob {}: {e}",
                desc.digest
            )),
            Err(_) => Some(format!(
                "registry did not answer for blob {} within {timeout:?}",
                desc.digest
            )),
        };
        match failure {
            None => {
                *lock(&entry.last_check) = Some(Instant::now());
                Ok(())
            }
            Some(message) => {
                bump(&inner.counters.check_failures, 1);
                Err(RemoteError(message))
            }
        }
    }

    async fn unmount(&self, _layer: &RemoteLayer, target_dir: &Path) -> Result<(), RemoteError> {
        let inner = &self.inner;
        let slot = lock(&inner.mounts).remove(target_dir);
        match slot {
            Some(Slot::Mounted(mounted)) => {
                let digest = mounted.lease.entry.digest;
                let joined = tokio::task::spawn_blocking(move || {
                    let mut mounted = mounted;
                    mounted.mount.unmount_or_detach();
                })
                .await;
                if let Err(e) = joined {
                    tracing::error!(error = %e, "unmount task failed");
                }
                inner.forget_toc_if_unused(digest).await;
                tracing::debug!(dir = %target_dir.display(), layer = %digest, "lazy layer unmounted");
            }
            Some(Slot::Restoring { cancel, digest, .. }) => {
                cancel.cancel();
                inner.forget_toc_if_unused(digest).await;
            }
            None => {}
        }
        Ok(())
    }

    async fn shutdown(&self, mode: ShutdownMode) {
        let inner = &self.inner;
        inner.stop.cancel();
        let slots: Vec<(PathBuf, Slot)> = lock(&inner.mounts).drain().collect();
        let count = slots
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Mounted(_)))
            .count();
        let cache = Arc::clone(&inner.cache);
        // FUSE sessions live in this process and end with it whatever the mode, so
        // release them cleanly now; stored state, TOCs and the cache stay.
        let joined = tokio::task::spawn_blocking(move || {
            for (_, slot) in slots {
                if let Slot::Mounted(mut mounted) = slot {
                    mounted.mount.unmount_or_detach();
                }
            }
            cache.flush();
        })
        .await;
        if let Err(e) = joined {
            tracing::error!(error = %e, "releasing lazy mounts failed");
        }
        tracing::info!(
            ?mode,
            released = count,
            "lazy layer mounts released; they are mounted again at the next start"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zest_format::annotations as ann;
    use zest_format::testblob::{build, TestFile};

    fn zstd_layer(annotations: &[(&str, &str)]) -> Descriptor {
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

    fn code(result: Result<TocSource, FallbackReason>) -> &'static str {
        match result {
            Ok(TocSource::Annotated(_)) => "annotated",
            Ok(TocSource::Footer) => "footer",
            Err(reason) => reason.code,
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
        assert_eq!(code(classify(&gzip, true)), FallbackReason::NOT_CHUNKED);
        let docker = Descriptor::new(
            zest_oci::media_type::DOCKER_LAYER_GZIP,
            Digest::of(b"g"),
            10,
        );
        assert_eq!(code(classify(&docker, false)), FallbackReason::NOT_CHUNKED);
        let odd = Descriptor::new("application/x-whatever", Digest::of(b"o"), 10);
        assert_eq!(
            code(classify(&odd, true)),
            FallbackReason::UNSUPPORTED_LAYER
        );
        // Plain zstd: not chunked, unless footers may be tried.
        assert_eq!(
            code(classify(&zstd_layer(&[]), true)),
            FallbackReason::NOT_CHUNKED
        );
        assert_eq!(code(classify(&zstd_layer(&[]), false)), "footer");
        // A position without a checksum: the TOC is not authenticated.
        let unauthenticated = zstd_layer(&[(ann::MANIFEST_POSITION, "1000:200:800:1")]);
        assert_eq!(
            code(classify(&unauthenticated, true)),
            FallbackReason::UNAUTHENTICATED_TOC
        );
        assert_eq!(code(classify(&unauthenticated, false)), "footer");
        let malformed = zstd_layer(&[(ann::MANIFEST_POSITION, "not:a:position")]);
        assert_eq!(
            code(classify(&malformed, true)),
            FallbackReason::TOC_INVALID
        );
        // A TOC claimed larger than any valid one is refused before any request.
        let huge = format!("1000:{}:800:1", MAX_TOC_UNCOMPRESSED + 1);
        let huge = zstd_layer(&[
            (ann::MANIFEST_CHECKSUM, checksum.as_str()),
            (ann::MANIFEST_POSITION, huge.as_str()),
        ]);
        assert_eq!(code(classify(&huge, true)), FallbackReason::TOC_INVALID);
    }

    #[test]
    fn stored_details_round_trip() -> Result<(), Box<dyn std::error::Error>> {
        let checksum = Digest::of(b"toc").to_string();
        let desc = zstd_layer(&[
            (ann::MANIFEST_CHECKSUM, checksum.as_str()),
            (ann::MANIFEST_POSITION, "1000:200:800:1"),
            ("org.example.other", "dropped"),
        ]);
        let stored = stored_descriptor(&desc);
        assert_eq!(stored.annotations.len(), 2);
        assert!(matches!(
            classify(&stored, true),
            Ok(TocSource::Annotated(_))
        ));
        let details = BTreeMap::from([
            (
                DETAIL_REPOSITORY.to_owned(),
                "127.0.0.1:5000/team/app".to_owned(),
            ),
            (
                DETAIL_DESCRIPTOR.to_owned(),
                serde_json::to_string(&stored)?,
            ),
        ]);
        let (repository, back) = stored_details(&details)?;
        assert_eq!(repository.registry, "127.0.0.1:5000");
        assert_eq!(repository.name, "team/app");
        assert_eq!(back, stored);
        let mut broken = details.clone();
        broken.insert(DETAIL_DESCRIPTOR.to_owned(), "{".to_owned());
        assert!(stored_details(&broken).is_err());
        broken.remove(DETAIL_DESCRIPTOR);
        assert!(stored_details(&broken).is_err());
        assert!(stored_details(&BTreeMap::new()).is_err());
        Ok(())
    }

    /// An opened layer backed by a small blob file.
    fn opened(dir: &Path, seed: u8) -> Arc<OpenedLayer> {
        let data = vec![seed; 10_000];
        let blob = build(
            &[TestFile {
                name: "f",
                data: &data,
                chunk: 4096,
            }],
            Vec::new(),
        );
        let path = dir.join(format!("blob-{seed}"));
        std::fs::write(&path, &blob.bytes).unwrap_or_else(|e| panic!("{e}"));
        let source = zest_store::FileBlob::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let cache = ChunkCache::open(&zest_cache::CacheConfig {
            disk_bytes: 0,
            ..zest_cache::CacheConfig::default()
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let fetcher = Fetcher::new(
            Arc::new(blob.index()),
            Arc::new(source),
            Arc::new(cache),
            FetchLimits::default(),
            FetchConfig::default(),
            tokio::runtime::Handle::current(),
        );
        Arc::new(OpenedLayer {
            fetcher,
            repository: Repository {
                registry: "r".into(),
                name: "n".into(),
            },
            descriptor: zstd_layer(&[]),
            authenticated: true,
            toc: Mutex::new(None),
        })
    }

    #[tokio::test]
    async fn layer_table_shares_counts_and_evicts() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let table = Arc::new(LayerTable {
            entries: Mutex::new(HashMap::new()),
            max_idle: 1,
            retired: Mutex::new(FetchStatsSnapshot::default()),
        });
        let (d1, d2, d3) = (Digest::of(b"1"), Digest::of(b"2"), Digest::of(b"3"));

        // A failed open leaves nothing behind; the next attempt starts afresh.
        let lease = table.hold(d1);
        let failed: Result<&Arc<OpenedLayer>, &str> = lease
            .entry
            .opened
            .get_or_try_init(|| async { Err("down") })
            .await;
        assert!(failed.is_err());
        drop(lease);
        assert!(lock(&table.entries).is_empty());

        // Two leases of one digest share one entry, opened once.
        let first = table.hold(d1);
        let second = table.hold(d1);
        assert!(Arc::ptr_eq(&first.entry, &second.entry));
        let layer = opened(dir.path(), 1);
        first
            .entry
            .opened
            .get_or_init(|| async { Arc::clone(&layer) })
            .await;
        assert!(second.opened().is_some_and(|o| Arc::ptr_eq(o, &layer)));
        assert!(table.is_open(&d1));
        let file = layer.fetcher.index().resolve_path("f").ok_or("no file f")?;
        let data = layer.fetcher.read(file, 0, 100).await?;
        assert_eq!(data.len(), 100);
        drop(first);
        assert_eq!(table.stats().1, 0, "still used by the second lease");
        drop(second);
        assert_eq!(table.stats().0, 1);
        assert_eq!(table.stats().1, 1);

        // Idle entries beyond the bound go, least recently used first, and their
        // counters are kept.
        for (digest, seed) in [(d2, 2u8), (d3, 3u8)] {
            tokio::time::sleep(Duration::from_millis(2)).await;
            let lease = table.hold(digest);
            let layer = opened(dir.path(), seed);
            lease.entry.opened.get_or_init(|| async { layer }).await;
        }
        let (layers, idle, totals) = table.stats();
        assert_eq!((layers, idle), (1, 1));
        assert!(table.is_open(&d3));
        assert!(!table.is_open(&d1));
        assert!(totals.range_requests >= 1, "{totals:?}");
        Ok(())
    }

    #[tokio::test]
    async fn cancel_wakes_waiters() {
        let cancel = Arc::new(Cancel::default());
        let waiter = {
            let cancel = Arc::clone(&cancel);
            tokio::spawn(async move { cancel.cancelled().await })
        };
        tokio::task::yield_now().await;
        cancel.cancel();
        assert!(tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .is_ok());
        // Already cancelled: returns at once.
        assert!(
            tokio::time::timeout(Duration::from_secs(5), cancel.cancelled())
                .await
                .is_ok()
        );
    }
}
