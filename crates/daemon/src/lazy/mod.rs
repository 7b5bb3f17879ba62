//! Lazy layer mounts: [`LazyLayerProvider`], the [`RemoteLayerProvider`] that serves
//! zstd:chunked image layers straight from their registry through FUSE.
//!
//! On a remote prepare it resolves the image manifest by its digest (verified; an
//! index resolves to this host's platform; from containerd's content store when it
//! holds it, else from the registry), finds the layer, reads the layer's TOC (from
//! the TOC directory, else from containerd's content store where `zest pull` puts
//! it, else with one authenticated range request), and mounts a [`LayerMount`] on
//! the snapshot directory. Anything else — gzip or plain layers, a TOC the manifest does not vouch
//! for, an unreachable registry — is a [`Fallback`] with a stable reason code, and
//! containerd pulls the layer normally.
//!
//! This file only orchestrates; each concern has its module:
//!
//! | module | owns |
//! |---|---|
//! | `classify` | which layers can be mounted lazily, and why not |
//! | `manifests` | image manifests by digest (content store, else the registry client), cached |
//! | `local_content` | containerd's content store, read-only: blobs by digest, verified (manifests, configs, TOCs) |
//! | `layers` | one fetcher per layer digest, leases, idle LRU |
//! | `tocs` | the TOC directory: TOCs kept for restarts, re-verified when read back |
//! | `restore` | details stored with a mount, taking a layer over or remounting it after a restart |
//! | `handover` | each mount's FUSE connection kept outside the process, for the next one |
//! | `settings` | [`LazyConfig`], [`LazyError`], [`LazyStats`] |
//! | `cancel` | the cancellation flag of background tasks |
//! | `profiles` | learned start-up profiles: recording, fetching from and publishing to the image's repository, prefetch at mount |
//! | `profile_store` | the profile directory: one profile per image manifest |
//!
//! Sharing: one fetcher per layer digest, so a layer used by two chains is fetched
//! and indexed once. Each snapshot directory still gets its own FUSE mount of that
//! fetcher rather than a bind mount of the first one: mounts then have independent
//! lifetimes (removing one chain never touches another's mount), and the cost of a
//! second mount is a few idle threads, the data coming from the shared chunk cache.
//!
//! Restarts: with a [`Handover`], every mount's `/dev/fuse` connection is kept
//! outside the process (the fd holder or systemd's store). A crash, SIGTERM or
//! binary upgrade then leaves the mounts in place; requests wait in the kernel
//! until the next process takes each connection over (`restore`), and running
//! containers never see an error. SIGINT, removing a snapshot, or running without
//! a handover release mounts instead (state, TOCs and the chunk cache are kept,
//! and stored layers are mounted afresh at the next start).
//!
//! Invariants: every byte served is verified through the chain manifest digest →
//! TOC digest → chunk digest; no lock is held across an await; every network wait is
//! bounded by a timeout; TOCs are decoded on the blocking pool; background tasks end
//! when the service stops.

mod cancel;
mod classify;
mod handover;
mod layers;
mod local_content;
mod manifests;
mod profile_store;
mod profiles;
mod restore;
mod settings;
mod tocs;

pub use handover::Handover;
pub use profiles::{fetch_profile, push_profile, ProfileFetchError, ProfileSettings, ProfileStats};
pub use settings::{LazyConfig, LazyError, LazyStats};

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::Semaphore;

use cancel::Cancel;
use classify::{classify, TocSource};
use layers::{LayerLease, LayerTable, OpenedLayer};
use local_content::LocalContent;
use manifests::Manifests;
use restore::{mount_details, stored_descriptor};
use tocs::TocStore;
use zest_cache::ChunkCache;
use zest_fetch::libraries::{LibraryPrefetch, LibraryStack, StackLayer, StartCommand};
use zest_fetch::toc::{decode_index, fetch_layer_index, FetchedIndex, TocFetchOptions};
use zest_fetch::{FetchError, FetchLimits, Fetcher};
use zest_format::{LayerIndex, TocLocation};
use zest_fs::{LayerMount, PassthroughStore};
use zest_oci::digest::Digest;
use zest_oci::{Descriptor, ImageConfig, ImageManifest, Reference, Repository, DEFAULT_PATH};
use zest_registry::RegistryClient;
use zest_snapshotter::{
    Fallback, FallbackReason, RemoteError, RemoteLayer, RemoteLayerProvider, RemoteLayerRequest,
    RemoteMounted, ShutdownMode,
};
use zest_store::RegistryBlob;

/// How long connections kept by the previous process wait to be claimed by a
/// restore before they are dropped as orphans.
const UNCLAIMED_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// Connections [`Inner::warm_up`] opens: about as many as a container's first
/// reads use at once.
const WARM_UP_CONNECTIONS: usize = 4;
/// Connections opened ahead are pooled for a while (idle ones close after 90 s);
/// more warm-ups within this interval would only reuse them.
const WARM_UP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
/// Registries whose last warm-up is remembered; past this the memory starts over.
const MAX_WARMED_REGISTRIES: usize = 1024;

/// Mounts zstd:chunked layers lazily. Cheap to share (`Arc`); see the module docs.
pub struct LazyLayerProvider {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LazyLayerProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyLayerProvider")
            .field("toc_dir", &self.inner.tocs.dir())
            .finish()
    }
}

struct Inner {
    client: RegistryClient,
    cache: Arc<ChunkCache>,
    config: LazyConfig,
    limits: Mutex<HashMap<String, FetchLimits>>,
    manifests: Manifests,
    local_content: Arc<LocalContent>,
    layers: Arc<LayerTable>,
    tocs: TocStore,
    mounts: Mutex<HashMap<PathBuf, Slot>>,
    counters: Counters,
    stop: Arc<Cancel>,
    /// Bounds background TOC work: prefetch of following layers, and restores.
    toc_work: Arc<Semaphore>,
    /// Where mounts' connections are kept for the next process, if anywhere.
    handover: Option<Arc<Handover>>,
    /// Set when the service stopped leaving mounts for the next process.
    left_mounted: AtomicBool,
    /// Learned start-up profiles.
    profiles: Arc<profiles::Profiles>,
    /// Library prefetch (files examined, counters); `None` when off.
    libraries: Option<Arc<LibraryPrefetch>>,
    /// When connections to each registry were last opened ahead of reads.
    warmed: Mutex<HashMap<String, Instant>>,
}

#[derive(Default)]
struct Counters {
    mounts: AtomicU64,
    restores: AtomicU64,
    takeovers: AtomicU64,
    restore_failures: AtomicU64,
    toc_fetches: AtomicU64,
    toc_bytes: AtomicU64,
    toc_local: AtomicU64,
    toc_prefetches: AtomicU64,
    check_failures: AtomicU64,
}

impl Counters {
    fn bump(&self, counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
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
    /// Its connection is kept outside the process: the mount may outlive it.
    kept: bool,
    /// The image manifest it was mounted for (fresh prepares only), for the
    /// image's start-up profile.
    image: Option<Digest>,
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
        Self::with_handover(client, cache, config, None)
    }

    /// Like [`LazyLayerProvider::new`], keeping every mount's connection in
    /// `handover` so that mounts survive a restart of the process, and taking over
    /// the connections the previous process kept there.
    pub fn with_handover(
        client: RegistryClient,
        cache: Arc<ChunkCache>,
        config: LazyConfig,
        handover: Option<Handover>,
    ) -> Result<Arc<Self>, LazyError> {
        let tocs = TocStore::open(config.toc_dir.clone())?;
        let mut config = config;
        if let Some((dir, budget)) = &config.passthrough {
            // Every non-empty file: a small file costs one local file, and a
            // passthrough open spares every later read a round trip.
            let store = PassthroughStore::open(dir, *budget, 1)?;
            config.mount.fs.passthrough = Some(store);
        }
        let stop = Arc::new(Cancel::default());
        let profiles =
            profiles::Profiles::new(config.profiles.clone(), client.clone(), Arc::clone(&stop))?;
        let local_content = Arc::new(LocalContent::new(config.containerd_content_dir.clone()));
        let provider = Arc::new(LazyLayerProvider {
            inner: Arc::new(Inner {
                manifests: Manifests::new(
                    client.clone(),
                    Arc::clone(&local_content),
                    config.platform.clone(),
                    config.mount_timeout,
                ),
                local_content,
                client,
                cache,
                limits: Mutex::new(HashMap::new()),
                layers: LayerTable::new(config.max_idle_layers),
                tocs,
                mounts: Mutex::new(HashMap::new()),
                counters: Counters::default(),
                stop,
                profiles,
                libraries: config.library_prefetch.map(LibraryPrefetch::new),
                toc_work: Arc::new(Semaphore::new(config.toc_prefetch_parallelism.max(1))),
                handover: handover.map(Arc::new),
                left_mounted: AtomicBool::new(false),
                warmed: Mutex::new(HashMap::new()),
                config,
            }),
        });
        if let Some(handover) = provider.inner.handover.clone() {
            // Restores claim their connections as soon as the snapshotter starts
            // them, right after this; what is left after a grace period has no
            // snapshot.
            let stop = Arc::clone(&provider.inner.stop);
            tokio::spawn(async move {
                tokio::select! {
                    () = tokio::time::sleep(UNCLAIMED_GRACE) => {}
                    () = stop.cancelled() => return,
                }
                let _ = tokio::task::spawn_blocking(move || handover.drop_unclaimed()).await;
            });
        }
        Ok(provider)
    }

    /// Whether the service stopped leaving layer mounts in place for the next
    /// process. The process must then exit without dropping its async runtime:
    /// dropping a read that still waits for data answers it with an error, while a
    /// read left unanswered is resent by the kernel to the next process.
    pub fn left_mounted(&self) -> bool {
        self.inner.left_mounted.load(Ordering::Relaxed)
    }

    /// Counters and gauges.
    pub fn stats(&self) -> LazyStats {
        let inner = &self.inner;
        let (mounted, restoring) = {
            let mounts = inner.mounts.lock();
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
            takeovers_total: g(&c.takeovers),
            restore_failures_total: g(&c.restore_failures),
            toc_fetches_total: g(&c.toc_fetches),
            toc_bytes_total: g(&c.toc_bytes),
            toc_local_loads_total: g(&c.toc_local),
            toc_prefetches_total: g(&c.toc_prefetches),
            manifest_fetches_total: inner.manifests.fetches(),
            local_content_reads_total: inner.local_content.reads(),
            library_prefetch: inner
                .libraries
                .as_ref()
                .map(|l| l.stats())
                .unwrap_or_default(),
            check_failures_total: g(&c.check_failures),
            profiles: inner.profiles.stats(),
            fetch,
            cache: inner.cache.stats(),
            registry: inner.client.stats(),
        }
    }
}

/// Largest image config read for the start command prefetch (configs are a
/// few KiB; the cap bounds memory).
const MAX_CONFIG_BYTES: u64 = 4 << 20;

impl Inner {
    /// The layers the programs of layer `layer` (of image `manifest`) load
    /// libraries from, for its library prefetch: that layer, then the layers
    /// below it in the image, top to bottom (those already opened: containerd
    /// mounts an image's layers bottom-up). `None` when library prefetch is
    /// off.
    fn library_stack(
        &self,
        manifest: &ImageManifest,
        layer: Digest,
        lease: &LayerLease,
    ) -> Option<Arc<LibraryStack>> {
        let shared = self.libraries.as_ref()?;
        let own = lease.opened()?;
        let below = manifest.layers.iter().position(|l| l.digest == layer)?;
        let mut stack = vec![StackLayer {
            digest: layer,
            fetcher: Arc::downgrade(&own.fetcher),
        }];
        for l in manifest.layers[..below].iter().rev() {
            if let Some(fetcher) = self.layers.fetcher(&l.digest) {
                stack.push(StackLayer {
                    digest: l.digest,
                    fetcher: Arc::downgrade(&fetcher),
                });
            }
        }
        Some(LibraryStack::new(Arc::clone(shared), stack))
    }

    /// Reads the image config `config` in the background and prefetches what
    /// starting its Entrypoint and Cmd reads first
    /// ([`LibraryStack::prefetch_start`]). Advice: failures are logged.
    fn prefetch_start(
        &self,
        repository: &Repository,
        config: &Descriptor,
        stack: &Arc<LibraryStack>,
    ) {
        let client = self.client.clone();
        let local = Arc::clone(&self.local_content);
        let (repository, config) = (repository.clone(), config.clone());
        let stack = Arc::clone(stack);
        tokio::spawn(async move {
            let bytes = match local.read(&config.digest, MAX_CONFIG_BYTES).await {
                Some(bytes) => Ok(bytes),
                None => client
                    .get_blob_bytes(&repository, &config.digest, MAX_CONFIG_BYTES)
                    .await
                    .map_err(|e| e.to_string()),
            };
            let image_config = match bytes
                .and_then(|b| ImageConfig::from_json(&b).map_err(|e| e.to_string()))
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(%repository, config = %config.digest, error = %e, "image config not read: no start command prefetch");
                    return;
                }
            };
            let mut argv = image_config.entrypoint().ok().flatten().unwrap_or_default();
            argv.extend(image_config.cmd().ok().flatten().unwrap_or_default());
            let env = image_config.env();
            let path = env
                .iter()
                .find(|(k, _)| k == "PATH")
                .map_or_else(|| DEFAULT_PATH.to_owned(), |(_, v)| v.clone());
            let working_dir = image_config.working_dir().unwrap_or("/").to_owned();
            tracing::debug!(%repository, ?argv, "prefetching the image's start command");
            stack.prefetch_start(StartCommand {
                argv,
                path,
                working_dir,
                env,
            });
        });
    }

    fn limits(&self, registry: &str) -> FetchLimits {
        self.limits
            .lock()
            .entry(registry.to_owned())
            .or_insert_with(|| {
                FetchLimits::new(
                    self.config.requests_per_registry,
                    self.config.background_requests_per_registry,
                )
            })
            .clone()
    }

    /// Holds the shared layer for `desc`, opening it (TOC from the local store, else
    /// from the registry) unless it is open or being opened already.
    async fn open_shared(
        &self,
        repository: &Repository,
        desc: &Descriptor,
    ) -> Result<LayerLease, Fallback> {
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
    ) -> Result<Arc<OpenedLayer>, Fallback> {
        let source = classify(desc, self.config.require_authenticated_toc)?;
        let blob = Arc::new(RegistryBlob::for_layer(
            self.client.clone(),
            repository.clone(),
            desc,
        ));
        let local = match &source {
            TocSource::Annotated(loc) => match self.tocs.load(desc, *loc).await {
                Some(index) => Some((index, None)),
                None => self.toc_from_content_store(desc, *loc).await,
            },
            TocSource::Footer | TocSource::Estargz => None,
        };
        let (index, toc, authenticated) = match local {
            Some((index, toc)) => {
                self.counters.bump(&self.counters.toc_local, 1);
                self.warm_up(repository);
                (index, toc, true)
            }
            None => {
                let fetched = self.fetch_toc(&blob, desc, &source).await?;
                self.counters.bump(&self.counters.toc_fetches, 1);
                // Only a TOC the manifest vouches for is kept: it is re-verified
                // against that digest when read back. The TOC directory holds
                // zstd:chunked TOCs only: an eStargz TOC is fetched again after a
                // restart.
                let keep = fetched.authenticated && !matches!(source, TocSource::Estargz);
                let toc = keep.then_some(fetched.toc);
                if let Some(toc) = &toc {
                    self.counters
                        .bump(&self.counters.toc_bytes, toc.len() as u64);
                }
                (fetched.index, toc, fetched.authenticated)
            }
        };
        let fetcher = Fetcher::new(
            Arc::new(index),
            Arc::clone(&blob) as _,
            Arc::clone(&self.cache),
            self.limits(&repository.registry),
            self.config.fetch.clone(),
            tokio::runtime::Handle::current(),
        );
        tracing::debug!(layer = %desc.digest, repository = %repository, authenticated, "layer index loaded");
        Ok(Arc::new(OpenedLayer {
            fetcher,
            blob,
            repository: repository.clone(),
            descriptor: stored_descriptor(desc),
            authenticated,
            toc: Mutex::new(toc),
        }))
    }

    /// Opens connections to `repository`'s registry in the background, at
    /// most once per [`WARM_UP_INTERVAL`] per registry: a layer whose TOC was
    /// read locally made no request, and the container's first reads would
    /// otherwise each wait for a handshake.
    fn warm_up(&self, repository: &Repository) {
        let now = Instant::now();
        {
            let mut warmed = self.warmed.lock();
            if warmed
                .get(&repository.registry)
                .is_some_and(|t| now.duration_since(*t) < WARM_UP_INTERVAL)
            {
                return;
            }
            if warmed.len() >= MAX_WARMED_REGISTRIES {
                warmed.clear();
            }
            warmed.insert(repository.registry.clone(), now);
        }
        let client = self.client.clone();
        let repository = repository.clone();
        tokio::spawn(async move {
            client.warm_up(&repository, WARM_UP_CONNECTIONS).await;
        });
    }

    /// The TOC of layer `desc` from containerd's content store, where `zest
    /// pull` stores it (fetched while the image config was), when present and
    /// matching the manifest's TOC digest; with its bytes, to keep for restarts.
    async fn toc_from_content_store(
        &self,
        desc: &Descriptor,
        loc: TocLocation,
    ) -> Option<(LayerIndex, Option<Bytes>)> {
        let digest = loc.toc_digest?;
        let bytes = self
            .local_content
            .read(&digest, loc.toc.compressed_len)
            .await?;
        let blob = format!("TOC {digest} of layer {}", desc.digest);
        match decode_index(bytes.clone(), loc, desc.size, &blob).await {
            Ok(index) => {
                tracing::debug!(layer = %desc.digest, "TOC read from containerd's content store");
                Some((index, Some(bytes)))
            }
            Err(e) => {
                tracing::warn!(layer = %desc.digest, error = %e, "TOC in containerd's content store is not usable; fetching it from the registry");
                None
            }
        }
    }

    /// The TOC from the registry through [`fetch_layer_index`]: one range request
    /// when annotated (verified against the manifest's TOC digest), else through
    /// the footer; the whole bounded by the mount timeout.
    async fn fetch_toc(
        &self,
        blob: &RegistryBlob,
        desc: &Descriptor,
        source: &TocSource,
    ) -> Result<FetchedIndex, Fallback> {
        let timeout = self.config.mount_timeout;
        let options = TocFetchOptions {
            deadline: Some(timeout),
            require_digest: self.config.require_authenticated_toc,
            ..TocFetchOptions::default()
        };
        // A footer-located TOC ignores a position annotation that has no digest:
        // neither is authenticated, and the footer is what the blob itself says.
        let no_annotations = BTreeMap::new();
        let annotations = match source {
            TocSource::Annotated(_) | TocSource::Estargz => &desc.annotations,
            TocSource::Footer => &no_annotations,
        };
        let what = format!("TOC of layer {}", desc.digest);
        let fetched = tokio::time::timeout(
            timeout,
            fetch_layer_index(blob, desc.size, annotations, &options),
        )
        .await
        .map_err(|_| {
            Fallback::new(
                FallbackReason::TocUnavailable,
                format!("{what}: no answer within {timeout:?} (lazy.mount_timeout_secs)"),
            )
        })?;
        fetched.map_err(|e| match (e, source) {
            (e @ FetchError::Toc { .. }, TocSource::Annotated(_) | TocSource::Estargz) => {
                Fallback::new(FallbackReason::TocInvalid, format!("{what}: {e}"))
            }
            (e @ FetchError::Toc { .. }, TocSource::Footer) => Fallback::new(
                FallbackReason::NotChunked,
                format!(
                    "layer {} has no readable zstd:chunked footer: {e}",
                    desc.digest
                ),
            ),
            (e, _) => Fallback::new(FallbackReason::TocUnavailable, format!("{what}: {e}")),
        })
    }

    /// Mounts the held layer on `target` (blocking work off the async workers), then
    /// keeps its TOC for restarts.
    async fn mount(
        &self,
        lease: LayerLease,
        target: &Path,
        recorder: Option<Arc<zest_fs::AccessRecorder>>,
        libraries: Option<Arc<LibraryStack>>,
    ) -> Result<MountedLayer, Fallback> {
        let Some(opened) = lease.opened().cloned() else {
            return Err(Fallback::new(
                FallbackReason::MountFailed,
                format!(
                    "layer {}: index missing after open (internal error)",
                    lease.entry.digest
                ),
            ));
        };
        let fetcher = Arc::clone(&opened.fetcher);
        let mut options = self.config.mount.clone();
        options.fs.recorder = recorder;
        options.fs.libraries = libraries;
        let dir = target.to_path_buf();
        let failed = |e: String| {
            Fallback::new(
                FallbackReason::MountFailed,
                format!(
                    "cannot mount layer {} on {}: {e}",
                    opened.descriptor.digest,
                    target.display()
                ),
            )
        };
        let handover = self.handover.clone();
        let (mounted, kept) = tokio::task::spawn_blocking(move || {
            let mounted = LayerMount::mount(fetcher, &dir, &options)?;
            let kept = handover.is_some_and(|h| h.keep(&mounted));
            Ok::<_, zest_fs::MountError>((mounted, kept))
        })
        .await
        .map_err(|e| failed(format!("mount task failed: {e}")))?
        .map_err(|e| failed(e.to_string()))?;
        self.counters.bump(&self.counters.mounts, 1);
        let toc = opened.toc.lock().take();
        if let Some(toc) = toc {
            self.tocs.keep(opened.descriptor.digest, toc).await;
        }
        Ok(MountedLayer {
            mount: mounted,
            lease,
            kept,
            image: None,
        })
    }

    /// Serves the held layer through `kept`, the connection of the mount the
    /// previous process left on `target`, without mounting anything.
    async fn resume(
        &self,
        lease: LayerLease,
        target: &Path,
        kept: handover::Kept,
    ) -> Result<MountedLayer, Fallback> {
        let Some(opened) = lease.opened().cloned() else {
            return Err(Fallback::new(
                FallbackReason::MountFailed,
                format!(
                    "layer {}: index missing after open (internal error)",
                    lease.entry.digest
                ),
            ));
        };
        let fetcher = Arc::clone(&opened.fetcher);
        let options = self.config.mount.clone();
        let dir = target.to_path_buf();
        let mounted = tokio::task::spawn_blocking(move || {
            LayerMount::resume(fetcher, &dir, kept.fd, kept.negotiated, &options)
        })
        .await
        .map_err(|e| format!("takeover task failed: {e}"))
        .and_then(|r| r.map_err(|e| e.to_string()))
        .map_err(|e| {
            Fallback::new(
                FallbackReason::MountFailed,
                format!(
                    "cannot take over layer {} on {}: {e}",
                    opened.descriptor.digest,
                    target.display()
                ),
            )
        })?;
        Ok(MountedLayer {
            mount: mounted,
            lease,
            kept: true,
            image: None,
        })
    }

    /// Deletes the stored TOC of `digest` unless a snapshot directory still uses it.
    async fn forget_toc_if_unused(&self, digest: Digest) {
        let used = self.mounts.lock().values().any(|slot| match slot {
            Slot::Mounted(m) => m.lease.entry.digest == digest,
            Slot::Restoring { digest: d, .. } => *d == digest,
        });
        if !used {
            self.tocs.forget(digest).await;
        }
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
                    let Ok(_permit) = inner.toc_work.acquire().await else {
                        return;
                    };
                    if inner.layers.is_open(&desc.digest) {
                        return;
                    }
                    match inner.open_shared(&repository, &desc).await {
                        Ok(_lease) => {
                            inner.counters.bump(&inner.counters.toc_prefetches, 1);
                            tracing::debug!(layer = %desc.digest, "TOC prefetched");
                        }
                        Err(fallback) => {
                            tracing::debug!(layer = %desc.digest, %fallback, "TOC prefetch failed")
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

/// The labels a lazy prepare needs, or the fallback naming those missing.
fn required_labels(request: &RemoteLayerRequest) -> Result<(&str, Digest, Digest), Fallback> {
    if let (Some(image_ref), Some(manifest_digest), Some(layer_digest)) = (
        request.image_ref.as_deref(),
        request.manifest_digest,
        request.layer_digest,
    ) {
        return Ok((image_ref, manifest_digest, layer_digest));
    }
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
    Err(Fallback::new(
        FallbackReason::MissingLabels,
        format!(
            "no {} label; lazy pulling needs a client that passes the image's layer labels (CRI, or zest pull)",
            missing.join(", ")
        ),
    ))
}

#[async_trait::async_trait]
impl RemoteLayerProvider for LazyLayerProvider {
    async fn try_mount(
        &self,
        request: &RemoteLayerRequest,
        target_dir: &Path,
    ) -> Result<RemoteMounted, Fallback> {
        let inner = &self.inner;
        if inner.stop.is_cancelled() {
            return Err(Fallback::new(
                FallbackReason::ShuttingDown,
                "the snapshotter is stopping",
            ));
        }
        let (image_ref, manifest_digest, layer_digest) = required_labels(request)?;
        let reference: Reference = image_ref.parse().map_err(|e| {
            Fallback::new(
                FallbackReason::InvalidLabels,
                format!("image reference label {image_ref:?}: {e}"),
            )
        })?;
        let resolved = inner.manifests.get(&reference, manifest_digest).await?;
        let manifest = &resolved.image;
        let desc = manifest
            .layers
            .iter()
            .find(|l| l.digest == layer_digest)
            .cloned()
            .ok_or_else(|| {
                Fallback::new(
                    FallbackReason::ManifestUnavailable,
                    format!(
                        "manifest {manifest_digest} of {image_ref} does not list layer {layer_digest}"
                    ),
                )
            })?;
        // containerd 2.2 does not say that a parentless prepare is a parallel unpack
        // (2.3+ does, see RemoteLayerRequest::from_labels): only the manifest tells
        // that this layer has layers below it.
        if request.parent.is_none()
            && manifest.layers.first().map(|l| l.digest) != Some(layer_digest)
        {
            return Err(Fallback::new(
                FallbackReason::UnpackWithoutParent,
                format!(
                    "{}: layer {layer_digest} is not the first layer of {image_ref}",
                    zest_snapshotter::unpack_without_parent()
                ),
            ));
        }
        classify(&desc, inner.config.require_authenticated_toc)?;
        if inner.config.toc_prefetch {
            inner.prefetch_following(&reference.repository, manifest, request, layer_digest);
        }
        inner
            .profiles
            .on_image(&reference.repository, &resolved.descriptor)
            .await;
        let lease = inner.open_shared(&reference.repository, &desc).await?;
        let authenticated = lease.opened().is_some_and(|o| o.authenticated);
        let details = mount_details(&reference.repository, &desc, authenticated)?;
        let recorder = match lease.opened() {
            Some(opened) => {
                inner
                    .profiles
                    .on_mount(
                        &reference.repository,
                        &resolved.descriptor,
                        layer_digest,
                        &opened.fetcher,
                    )
                    .await
            }
            None => None,
        };
        let libraries = inner.library_stack(manifest, layer_digest, &lease);
        if let (Some(stack), Some(shared)) = (&libraries, &inner.libraries) {
            // A container's process is prefetched with the stack of its
            // root's top layer, found by this directory.
            shared.mounts.insert(target_dir, stack);
            // The image's top layer: its rootfs is complete, the container
            // (usually running the image's own command) comes next.
            if manifest.layers.last().map(|l| l.digest) == Some(layer_digest) {
                inner.prefetch_start(&reference.repository, &manifest.config, stack);
            }
        }
        let mut mounted = inner.mount(lease, target_dir, recorder, libraries).await?;
        mounted.image = Some(resolved.descriptor.digest);
        {
            let mut mounts = inner.mounts.lock();
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
        Ok(details)
    }

    async fn restore(&self, layer: &RemoteLayer, target_dir: &Path) -> Result<(), RemoteError> {
        restore::restore(&self.inner, layer, target_dir).await
    }

    async fn check(&self, _layer: &RemoteLayer, target_dir: &Path) -> Result<(), RemoteError> {
        let inner = &self.inner;
        let (entry, repository, desc, last_answer) = {
            let mounts = inner.mounts.lock();
            match mounts.get(target_dir) {
                Some(Slot::Mounted(m)) => {
                    let Some(opened) = m.lease.opened() else {
                        return Err(RemoteError(format!(
                            "layer {}: index missing (internal error)",
                            m.lease.entry.digest
                        )));
                    };
                    (
                        Arc::clone(&m.lease.entry),
                        opened.repository.clone(),
                        opened.descriptor.clone(),
                        opened.blob.last_answer(),
                    )
                }
                Some(Slot::Restoring { last_error, .. }) => {
                    inner.counters.bump(&inner.counters.check_failures, 1);
                    return Err(RemoteError(format!(
                        "the lazy layer is not mounted yet (being restored in the background; last attempt: {})",
                        last_error.lock()
                    )));
                }
                None => {
                    inner.counters.bump(&inner.counters.check_failures, 1);
                    return Err(RemoteError(
                        "the lazy layer is not mounted by this service".into(),
                    ));
                }
            }
        };
        // A range the registry served (the TOC at mount, a read since) proves as
        // much as a HEAD: a container started right after its pull pays no round
        // trip per layer here.
        let interval = inner.config.check_interval;
        let last_check = *entry.last_check.lock();
        if !interval.is_zero()
            && last_check
                .max(last_answer)
                .is_some_and(|t| t.elapsed() < interval)
        {
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
                *entry.last_check.lock() = Some(Instant::now());
                Ok(())
            }
            Some(message) => {
                inner.counters.bump(&inner.counters.check_failures, 1);
                Err(RemoteError(message))
            }
        }
    }

    async fn unmount(&self, _layer: &RemoteLayer, target_dir: &Path) -> Result<(), RemoteError> {
        let inner = &self.inner;
        let slot = inner.mounts.lock().remove(target_dir);
        match slot {
            Some(Slot::Mounted(mounted)) => {
                let digest = mounted.lease.entry.digest;
                if let Some(image) = mounted.image {
                    let image_still_mounted = inner
                        .mounts
                        .lock()
                        .values()
                        .any(|s| matches!(s, Slot::Mounted(m) if m.image == Some(image)));
                    if !image_still_mounted {
                        inner.profiles.on_last_unmount(image);
                    }
                }
                let handover = inner.handover.clone();
                let dir = target_dir.to_path_buf();
                let joined = tokio::task::spawn_blocking(move || {
                    let mut mounted = mounted;
                    mounted.mount.unmount_or_detach();
                    // After the unmount, so that the connection is never without a
                    // holder while it is mounted.
                    if let Some(h) = handover {
                        h.forget(&dir);
                    }
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
                if let Some(h) = inner.handover.clone() {
                    let dir = target_dir.to_path_buf();
                    let _ = tokio::task::spawn_blocking(move || h.forget(&dir)).await;
                }
                inner.forget_toc_if_unused(digest).await;
            }
            None => {}
        }
        Ok(())
    }

    async fn shutdown(&self, mode: ShutdownMode) {
        let inner = &self.inner;
        inner.stop.cancel();
        let slots: Vec<(PathBuf, Slot)> = inner.mounts.lock().drain().collect();
        let count = slots
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Mounted(_)))
            .count();
        let cache = Arc::clone(&inner.cache);
        // SIGTERM leaves the mounts whose connection is kept outside the process:
        // the next process takes them over. SIGINT releases everything (and drops
        // the kept connections), as does a mount nobody keeps, which would die
        // with this process anyway.
        let release_all = mode == ShutdownMode::Interrupt;
        let handover = inner.handover.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let (mut left, mut released) = (0usize, 0usize);
            for (dir, slot) in slots {
                match slot {
                    Slot::Mounted(mounted) if mounted.kept && !release_all => {
                        mounted.mount.leave_mounted();
                        left += 1;
                    }
                    Slot::Mounted(mut mounted) => {
                        mounted.mount.unmount_or_detach();
                        released += 1;
                        if let Some(h) = &handover {
                            h.forget(&dir);
                        }
                    }
                    Slot::Restoring { .. } => {
                        if let (Some(h), true) = (&handover, release_all) {
                            if handover::is_layer_mount(&dir) {
                                let _ = zest_mount::detach(&dir);
                            }
                            h.forget(&dir);
                        }
                    }
                }
            }
            cache.flush();
            (left, released)
        })
        .await;
        if let Ok((left, _)) = &joined {
            inner.left_mounted.store(*left > 0, Ordering::Relaxed);
        }
        match joined {
            Ok((left, released)) => tracing::info!(
                ?mode,
                mounted = count,
                left_for_next_start = left,
                released,
                "lazy layers: mounts with a kept connection are taken over at the next start; released ones are mounted again"
            ),
            Err(e) => tracing::error!(error = %e, "releasing lazy mounts failed"),
        }
    }
}
