//! [`pull`]: pull an image into containerd with lazily mounted layers.
//!
//! The steps mirror what containerd's own pull-and-unpack does, so that the result is
//! indistinguishable from a `ctr images pull` (same content, labels, snapshots and
//! image record) except that layers the snapshotter can serve remotely are never
//! downloaded:
//!
//! 1. create a lease (everything below is made under it) while the reference is
//!    resolved for the platform with zest's registry client, then fetch the config
//!    (all verified against their digests);
//! 2. meanwhile, fetch the zstd:chunked TOC of every layer whose manifest
//!    annotations locate and authenticate it, and store it in the content store:
//!    the snapshotter reads it there at the first prepare instead of asking the
//!    registry for it then, on a connection of its own;
//! 3. store config, manifest (and index) in the content store with the garbage
//!    collector's reference labels (the manifest's labels name the TOCs too);
//! 4. for each layer in order, unless its chain is already unpacked: prepare the
//!    snapshot `extract-<unique> <chainID>` on the previous chain ID with the
//!    `containerd.io/snapshot/cri.*` labels. ALREADY_EXISTS means the snapshotter
//!    mounted the layer from the registry and committed it itself: nothing to
//!    download. Otherwise the layer falls back to the normal path: its blob is
//!    downloaded into the content store, applied onto the prepared mounts by
//!    containerd's diff service, checked against the config's diff ID and committed
//!    under the chain ID;
//! 5. label the config with the top snapshot (`containerd.io/gc.ref.snapshot.<name>`),
//!    create or update the image record, and delete the lease.
//!
//! Once a layer has fallen back, the following layers that cannot be lazy by format
//! (gzip, uncompressed) are downloaded in the background, a few at a time, while
//! earlier layers are applied.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::client::{ContainerdClient, ContainerdError};
use zest_api::labels::{
    image_layers_label, label_fits, LABEL_DISTRIBUTION_SOURCE, LABEL_GC_REF_CONFIG,
    LABEL_GC_REF_LAYER, LABEL_GC_REF_MANIFEST, LABEL_GC_REF_SNAPSHOT, LABEL_GC_REF_TOC,
    LABEL_IMAGE_LAYERS, LABEL_IMAGE_REF, LABEL_LAYER_DIGEST, LABEL_MANIFEST_DIGEST, LABEL_REMOTE,
    LABEL_SNAPSHOT_REF, LABEL_UNCOMPRESSED,
};
use zest_oci::chain_ids;
use zest_oci::digest::Digest;
use zest_oci::{
    Descriptor, ImageConfig, LayerCompression, OciJsonError, Platform, Reference, Repository,
};
use zest_registry::{RegistryClient, RegistryError, ResolvedImage};

/// Label prefix whose layer annotations containerd passes on to the snapshotter.
const SNAPSHOT_LABEL_PREFIX: &str = "containerd.io/snapshot/";

/// Largest image config accepted.
const MAX_CONFIG_SIZE: u64 = 32 << 20;
/// Largest compressed TOC `zest pull` fetches for the snapshotter; a larger one
/// is left to the snapshotter's own bounds.
const MAX_TOC_SIZE: u64 = 64 << 20;
/// Connections to the registry opened ahead while the manifest comes: the
/// config and a few layers' TOCs are requested at once right after it.
const WARM_UP_CONNECTIONS: usize = 4;
/// Attempts at preparing a layer when its snapshot vanishes between ALREADY_EXISTS
/// and the check that follows (a concurrent removal).
const PREPARE_ATTEMPTS: usize = 3;
/// Buffer between the registry download and the content store write.
const PIPE_BUFFER: usize = 256 << 10;
/// Bytes per content store write while downloading.
const DOWNLOAD_CHUNK: usize = 1 << 20;

/// What to pull and where to.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// containerd snapshotter to unpack into (zest's proxy plugin name).
    pub snapshotter: String,
    /// Platform to pick from a multi-platform index.
    pub platform: Platform,
    /// Name of the image record; default: the reference in its normalised form
    /// (`registry/repository:tag`), as containerd names pulled images.
    pub image_name: Option<String>,
    /// Layer downloads running at once on the fallback path.
    pub download_concurrency: usize,
    /// containerd deletes the pull's lease after this long if the pull never does
    /// (crashed client).
    pub lease_expiry: Duration,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            snapshotter: "zest".to_owned(),
            platform: Platform::host(),
            image_name: None,
            download_concurrency: 3,
            lease_expiry: Duration::from_secs(24 * 3600),
        }
    }
}

/// The image a pull resolved to.
#[derive(Debug, Clone)]
pub struct ResolvedPull {
    /// Name of the image record.
    pub name: String,
    /// The reference pulled, normalised.
    pub reference: String,
    /// The image record's target: the index if the reference named one, else the
    /// manifest.
    pub target: Descriptor,
    /// The platform's image manifest.
    pub manifest: Descriptor,
    /// The image config.
    pub config: Descriptor,
    /// Layers, base first.
    pub layers: Vec<Descriptor>,
    /// Their diff IDs, from the config.
    pub diff_ids: Vec<Digest>,
    /// Their chain IDs: the committed snapshots' names.
    pub chain_ids: Vec<Digest>,
}

impl ResolvedPull {
    /// The image's size as a registry stores it: manifest, config and layer blobs
    /// (and the index, if any).
    pub fn size(&self) -> u64 {
        let index = if self.target.digest == self.manifest.digest {
            0
        } else {
            self.target.size
        };
        index
            + self.manifest.size
            + self.config.size
            + self.layers.iter().map(|l| l.size).sum::<u64>()
    }
}

/// How a layer got into the snapshotter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerOutcome {
    /// Its chain was already unpacked (e.g. a base layer shared with another image,
    /// or unpacked by a concurrent pull).
    Present,
    /// The snapshotter mounted it from the registry: nothing downloaded (lazy). The
    /// snapshot carries zest's remote label.
    Remote,
    /// Downloaded into the content store and applied by containerd (the normal
    /// path). `downloaded` is 0 if the blob was already in the content store.
    Applied {
        /// Bytes downloaded from the registry.
        downloaded: u64,
    },
}

impl LayerOutcome {
    /// Short description for progress output.
    pub fn describe(&self) -> &'static str {
        match self {
            LayerOutcome::Present => "already present",
            LayerOutcome::Remote => "lazy (remote)",
            LayerOutcome::Applied { .. } => "downloaded+applied",
        }
    }
}

/// One layer of a finished pull.
#[derive(Debug, Clone)]
pub struct LayerReport {
    /// Position in the manifest (0 = base).
    pub index: usize,
    /// The layer's descriptor.
    pub descriptor: Descriptor,
    /// Its chain ID (snapshot name).
    pub chain_id: Digest,
    /// How it was unpacked.
    pub outcome: LayerOutcome,
    /// Time spent on it, from the start of its unpacking (background downloads
    /// started earlier are not counted).
    pub elapsed: Duration,
}

/// A finished pull.
#[derive(Debug, Clone)]
pub struct PullReport {
    /// What was pulled.
    pub resolved: ResolvedPull,
    /// Each layer, base first.
    pub layers: Vec<LayerReport>,
}

impl PullReport {
    /// Layers the snapshotter mounted from the registry.
    pub fn remote_layers(&self) -> usize {
        self.count(|o| matches!(o, LayerOutcome::Remote))
    }

    /// Layers downloaded and applied.
    pub fn applied_layers(&self) -> usize {
        self.count(|o| matches!(o, LayerOutcome::Applied { .. }))
    }

    /// Layers that were already unpacked.
    pub fn present_layers(&self) -> usize {
        self.count(|o| matches!(o, LayerOutcome::Present))
    }

    fn count(&self, f: impl Fn(&LayerOutcome) -> bool) -> usize {
        self.layers.iter().filter(|l| f(&l.outcome)).count()
    }
}

/// Receives progress events of a pull. Called from several tasks; every method has an
/// empty default.
pub trait PullProgress: Send + Sync {
    /// The image was resolved; layers are about to be unpacked.
    fn resolved(&self, _image: &ResolvedPull) {}
    /// Layer `index` is being unpacked.
    fn layer_started(&self, _index: usize) {}
    /// `bytes` more of layer `index` were downloaded (fallback path only).
    fn layer_bytes(&self, _index: usize, _bytes: u64) {}
    /// Layer `index` is unpacked.
    fn layer_done(&self, _report: &LayerReport) {}
}

/// A [`PullProgress`] that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl PullProgress for NoProgress {}

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The registry could not deliver (verified) manifests, config or a layer.
    #[error("{what}: {source}")]
    Registry {
        /// What was being fetched.
        what: String,
        /// The registry error.
        #[source]
        source: RegistryError,
    },
    /// The image config is not valid JSON of the expected shape.
    #[error("image config {digest}: {source}")]
    Config {
        /// The config's digest.
        digest: Digest,
        /// The parse error.
        #[source]
        source: OciJsonError,
    },
    /// The image is inconsistent (e.g. layer and diff ID counts differ).
    #[error("{reference}: {detail}")]
    InvalidImage {
        /// The image reference.
        reference: String,
        /// What is wrong.
        detail: String,
    },
    /// A call to containerd failed.
    #[error(transparent)]
    Containerd(#[from] ContainerdError),
    /// A layer applied to a tar whose digest is not the config's diff ID.
    #[error("layer {index} ({digest}) unpacked to diff ID {actual}, but the image config says {expected}: the image is corrupt")]
    DiffIdMismatch {
        /// Layer position.
        index: usize,
        /// Layer blob digest.
        digest: Digest,
        /// Diff ID in the config.
        expected: Digest,
        /// Digest containerd computed.
        actual: Digest,
    },
    /// A layer's unpacking did not converge (its snapshot kept vanishing).
    #[error("layer {index} ({digest}): {detail}")]
    Layer {
        /// Layer position.
        index: usize,
        /// Layer blob digest.
        digest: Digest,
        /// What happened.
        detail: String,
    },
}

/// Pulls `reference` into containerd through `containerd`'s namespace, fetching
/// manifests, config and (only on the fallback path) layers with `registry`.
pub async fn pull(
    registry: &RegistryClient,
    containerd: &ContainerdClient,
    reference: &Reference,
    options: &PullOptions,
    progress: Arc<dyn PullProgress>,
) -> Result<PullReport, PullError> {
    tracing::debug!(reference = %reference, "pull started");
    // Connections for the config and TOC requests that follow the manifest,
    // opened while it comes (each would otherwise wait for a handshake then).
    {
        let registry = registry.clone();
        let repository = reference.repository.clone();
        tokio::spawn(async move { registry.warm_up(&repository, WARM_UP_CONNECTIONS).await });
    }
    // The lease first (everything below is made under it), while the manifest
    // comes.
    let (lease, image) = tokio::join!(
        containerd.create_lease(options.lease_expiry),
        resolve_manifest(registry, reference, options)
    );
    let lease = lease?;
    tracing::debug!(lease = %lease, "lease created");
    let image = match image {
        Ok(image) => image,
        Err(e) => {
            // Nothing was stored under the lease: no collection to wait for.
            if let Err(e) = containerd.delete_lease(&lease, false).await {
                tracing::warn!(lease = %lease, error = %e, "could not delete the pull's lease; containerd will expire it");
            }
            return Err(e);
        }
    };
    let result = async {
        let downloader = Downloader {
            registry: registry.clone(),
            containerd: containerd.with_lease(&lease)?,
            repository: reference.repository.clone(),
            lease: lease.clone(),
            progress: progress.clone(),
        };
        // While the config comes: the layers' TOCs, which the snapshotter needs
        // at the first prepare.
        let tocs = TocFetches::start(&downloader, &image.image.layers);
        let (resolved, blobs) = fetch_config(registry, reference, options, image).await?;
        progress.resolved(&resolved);
        let puller = Puller {
            downloader,
            options: options.clone(),
            resolved,
        };
        puller.run(blobs, tocs).await
    }
    .await;
    // Deleting the lease hands what it protected over to the garbage collector:
    // after a success the image record keeps everything alive; after a failure the
    // partial pull is garbage, collected right away (containerd would otherwise
    // collect it only at its next collection, whenever something else is deleted).
    if let Err(e) = containerd.delete_lease(&lease, result.is_err()).await {
        tracing::warn!(lease = %lease, error = %e, "could not delete the pull's lease; containerd will expire it");
    }
    result
}

/// The verified bytes of the image's metadata blobs, to store in containerd.
struct MetadataBlobs {
    index: Option<bytes::Bytes>,
    manifest: bytes::Bytes,
    config: bytes::Bytes,
}

/// Resolves the reference to the platform's image manifest.
async fn resolve_manifest(
    registry: &RegistryClient,
    reference: &Reference,
    options: &PullOptions,
) -> Result<ResolvedImage, PullError> {
    let image = registry
        .resolve_image(reference, &options.platform)
        .await
        .map_err(|source| PullError::Registry {
            what: format!("resolving {reference} for {}", options.platform),
            source,
        })?;
    tracing::debug!(manifest = %image.manifest.digest, "manifest resolved");
    Ok(image)
}

/// Fetches and checks the config of the resolved `image`.
async fn fetch_config(
    registry: &RegistryClient,
    reference: &Reference,
    options: &PullOptions,
    image: ResolvedImage,
) -> Result<(ResolvedPull, MetadataBlobs), PullError> {
    let reference_text = reference.to_string();
    let invalid = |detail: String| PullError::InvalidImage {
        reference: reference_text.clone(),
        detail,
    };
    let config_desc = image.image.config.clone();
    if config_desc.size > MAX_CONFIG_SIZE {
        return Err(invalid(format!(
            "its config is {} bytes, more than the {MAX_CONFIG_SIZE}-byte limit",
            config_desc.size
        )));
    }
    let config_bytes = registry
        .get_blob_bytes(&reference.repository, &config_desc.digest, config_desc.size)
        .await
        .map_err(|source| PullError::Registry {
            what: format!("fetching the config of {reference_text}"),
            source,
        })?;
    if config_bytes.len() as u64 != config_desc.size {
        return Err(invalid(format!(
            "its config is {} bytes but the manifest says {}",
            config_bytes.len(),
            config_desc.size
        )));
    }
    tracing::debug!(config = %config_desc.digest, "config fetched");
    let config_error = |source| PullError::Config {
        digest: config_desc.digest,
        source,
    };
    let diff_ids = ImageConfig::from_json(&config_bytes)
        .and_then(|config| config.diff_ids())
        .map_err(config_error)?;
    let layers = image.image.layers.clone();
    if diff_ids.len() != layers.len() {
        return Err(invalid(format!(
            "the manifest has {} layers but the config lists {} diff IDs",
            layers.len(),
            diff_ids.len()
        )));
    }
    let manifest = image.manifest.descriptor();
    let target = image
        .index
        .as_ref()
        .map_or_else(|| manifest.clone(), |index| index.descriptor());
    let resolved = ResolvedPull {
        name: options
            .image_name
            .clone()
            .unwrap_or_else(|| reference_text.clone()),
        reference: reference_text.clone(),
        target,
        manifest,
        config: config_desc,
        chain_ids: chain_ids(&diff_ids),
        diff_ids,
        layers,
    };
    let blobs = MetadataBlobs {
        index: image.index.map(|index| index.bytes),
        manifest: image.manifest.bytes,
        config: config_bytes,
    };
    Ok((resolved, blobs))
}

/// Fetches layer blobs from the registry into containerd's content store. Cheap to
/// clone into background tasks.
#[derive(Clone)]
struct Downloader {
    registry: RegistryClient,
    /// containerd, with every request under the pull's lease.
    containerd: ContainerdClient,
    repository: Repository,
    lease: String,
    progress: Arc<dyn PullProgress>,
}

impl Downloader {
    /// Name of an ingest (an unfinished blob write) of this pull.
    fn ingest_ref(&self, kind: &str, digest: &Digest) -> String {
        format!("{}-{kind}-{digest}", self.lease)
    }

    /// The label recording which registry repository a blob came from.
    fn source_labels(&self) -> BTreeMap<String, String> {
        let key = format!("{LABEL_DISTRIBUTION_SOURCE}{}", self.repository.registry);
        let value = self.repository.name.clone();
        if label_fits(&key, &value) {
            BTreeMap::from([(key, value)])
        } else {
            BTreeMap::new()
        }
    }

    /// Stores verified bytes as blob `digest`, with `labels`.
    async fn store(
        &self,
        kind: &str,
        digest: &Digest,
        data: &[u8],
        mut labels: BTreeMap<String, String>,
    ) -> Result<(), PullError> {
        labels.extend(self.source_labels());
        self.containerd
            .write_blob(&self.ingest_ref(kind, digest), digest, data, &labels)
            .await?;
        Ok(())
    }

    /// Streams layer `index` from the registry into the content store; returns the
    /// bytes downloaded (0 if the blob was already stored).
    async fn download(&self, index: usize, layer: &Descriptor) -> Result<u64, PullError> {
        let digest = layer.digest;
        if self.containerd.content_info(&digest).await?.is_some() {
            return Ok(0);
        }
        let Some(mut writer) = self
            .containerd
            .open_writer(&self.ingest_ref("layer", &digest), &digest, layer.size)
            .await?
        else {
            return Ok(0);
        };
        let layer_error = |detail: String| PullError::Layer {
            index,
            digest,
            detail,
        };
        let (mut pipe_in, mut pipe_out) = tokio::io::duplex(PIPE_BUFFER);
        let fetch = async move {
            let fetched = self
                .registry
                .get_blob_to_writer(&self.repository, &digest, &mut pipe_in)
                .await
                .map_err(|source| PullError::Registry {
                    what: format!("downloading layer {index} ({digest})"),
                    source,
                })?;
            // End of stream for the reader.
            drop(pipe_in);
            Ok::<u64, PullError>(fetched)
        };
        let writer_ref = &mut writer;
        let store = async move {
            let mut buffer = vec![0u8; DOWNLOAD_CHUNK];
            let mut stored = 0u64;
            loop {
                let mut filled = 0;
                while filled < buffer.len() {
                    let n = pipe_out
                        .read(&mut buffer[filled..])
                        .await
                        .map_err(|e| layer_error(format!("reading the download: {e}")))?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                if filled == 0 {
                    return Ok::<u64, PullError>(stored);
                }
                writer_ref.write(&buffer[..filled]).await?;
                stored += filled as u64;
                self.progress.layer_bytes(index, filled as u64);
            }
        };
        match tokio::try_join!(fetch, store) {
            Ok((fetched, stored)) if fetched == stored && stored == layer.size => {
                // containerd verifies size and digest once more at commit.
                writer.commit(&self.source_labels()).await?;
                Ok(stored)
            }
            Ok((fetched, stored)) => {
                writer.abort().await;
                Err(layer_error(format!(
                    "the registry sent {fetched} bytes and {stored} were stored, but the layer has {} bytes",
                    layer.size
                )))
            }
            Err(e) => {
                writer.abort().await;
                Err(e)
            }
        }
    }
}

/// The zstd:chunked TOCs `zest pull` fetches for the snapshotter while the
/// config comes and stores in the content store (step 3 of [`pull`]): each
/// layer's whose annotations locate it and give its digest. Best effort: a TOC
/// not fetched, not matching its digest or not stored is left to the
/// snapshotter, which fetches it as it would without this; one already stored
/// (an earlier pull of an image sharing the layer) is not fetched again.
struct TocFetches {
    /// Layer index, TOC digest and the task fetching and storing it.
    tasks: Vec<(usize, Digest, JoinHandle<()>)>,
}

impl TocFetches {
    fn start(downloader: &Downloader, layers: &[Descriptor]) -> Self {
        let mut tasks = Vec::new();
        for (index, layer) in layers.iter().enumerate() {
            let Ok(Some(location)) = zest_format::TocLocation::from_annotations(&layer.annotations)
            else {
                continue;
            };
            let Some(digest) = location.toc_digest else {
                continue;
            };
            // Where the snapshotter's decoder would refuse it, it is not fetched.
            let range = location.toc_range();
            if location.check_bounds(layer.size).is_err()
                || range.is_empty()
                || range.end - range.start > MAX_TOC_SIZE
            {
                continue;
            }
            let downloader = downloader.clone();
            let blob = layer.digest;
            let task = tokio::spawn(async move {
                match downloader.containerd.content_info(&digest).await {
                    Ok(None) => {}
                    Ok(Some(_)) => return,
                    Err(e) => {
                        tracing::debug!(layer = index, error = %e, "cannot look up the layer's TOC in the content store");
                        return;
                    }
                }
                let fetched = downloader
                    .registry
                    .get_range(&downloader.repository, &blob, range)
                    .await;
                let bytes = match fetched {
                    Ok(bytes) if digest.verifies(&bytes) => bytes,
                    Ok(_) => {
                        tracing::warn!(layer = index, blob = %blob, toc = %digest, "the layer's TOC does not match the digest in its annotations; leaving it to the snapshotter");
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(layer = index, error = %e, "could not fetch the layer's TOC; leaving it to the snapshotter");
                        return;
                    }
                };
                match downloader
                    .store("toc", &digest, &bytes, BTreeMap::new())
                    .await
                {
                    Ok(()) => {
                        tracing::debug!(layer = index, toc = %digest, bytes = bytes.len(), "layer TOC stored")
                    }
                    Err(e) => {
                        tracing::debug!(layer = index, error = %e, "could not store the layer's TOC; leaving it to the snapshotter")
                    }
                }
            });
            tasks.push((index, digest, task));
        }
        TocFetches { tasks }
    }

    /// The manifest's garbage collection labels naming the TOCs.
    fn labels(&self) -> impl Iterator<Item = (String, String)> + '_ {
        self.tasks
            .iter()
            .map(|(index, digest, _)| (format!("{LABEL_GC_REF_TOC}{index}"), digest.to_string()))
    }

    /// Waits until every TOC is stored (or given up): the snapshotter looks at
    /// the first prepare, and would otherwise fetch them too.
    async fn finish(mut self) {
        for (_, _, task) in &mut self.tasks {
            let _ = task.await;
        }
        self.tasks.clear();
    }
}

impl Drop for TocFetches {
    fn drop(&mut self) {
        for (_, _, task) in &self.tasks {
            task.abort();
        }
    }
}

/// A layer's download in [`Downloads`].
enum Slot {
    /// Not started.
    Idle,
    /// Running in the background.
    Running(JoinHandle<Result<u64, PullError>>),
    /// Finished and collected (or run in the foreground).
    Taken,
}

/// Background layer downloads, aborted if the pull ends first.
struct Downloads {
    slots: Vec<Slot>,
    limit: Arc<Semaphore>,
}

impl Downloads {
    fn new(layers: usize, concurrency: usize) -> Self {
        Downloads {
            slots: (0..layers).map(|_| Slot::Idle).collect(),
            limit: Arc::new(Semaphore::new(concurrency.max(1))),
        }
    }

    /// Starts, in the background, the downloads of the layers after `index` that can
    /// only be pulled normally. Called once a layer has fallen back: until then the
    /// snapshotter may still provide layers by chain ID (e.g. from another namespace
    /// or a converted image with the same content), and a download would be waste.
    fn start_following(&mut self, index: usize, downloader: &Downloader, layers: &[Descriptor]) {
        for (i, layer) in layers.iter().enumerate().skip(index + 1) {
            let Some(slot) = self.slots.get_mut(i) else {
                break;
            };
            if !matches!(slot, Slot::Idle) || !never_lazy(layer) {
                continue;
            }
            let (downloader, layer, limit) =
                (downloader.clone(), layer.clone(), self.limit.clone());
            *slot = Slot::Running(tokio::spawn(async move {
                // The semaphore is never closed, so acquiring only waits.
                let _permit = limit.acquire_owned().await.ok();
                downloader.download(i, &layer).await
            }));
        }
    }

    /// Waits for layer `index`'s download, running it now if it was not started.
    async fn finish(
        &mut self,
        index: usize,
        downloader: &Downloader,
        layer: &Descriptor,
    ) -> Result<u64, PullError> {
        let slot = self
            .slots
            .get_mut(index)
            .map_or(Slot::Taken, |s| std::mem::replace(s, Slot::Taken));
        match slot {
            Slot::Running(task) => task.await.map_err(|e| PullError::Layer {
                index,
                digest: layer.digest,
                detail: format!("the download task failed: {e}"),
            })?,
            Slot::Idle | Slot::Taken => downloader.download(index, layer).await,
        }
    }
}

impl Drop for Downloads {
    fn drop(&mut self) {
        for slot in &self.slots {
            if let Slot::Running(task) = slot {
                task.abort();
            }
        }
    }
}

/// Whether the layer's format rules out mounting it lazily from its own blob (only
/// zstd layers can be zstd:chunked).
fn never_lazy(layer: &Descriptor) -> bool {
    matches!(
        LayerCompression::from_media_type(&layer.media_type),
        Some(LayerCompression::Gzip | LayerCompression::Uncompressed)
    )
}

/// A unique key for the active snapshot a layer is unpacked into, in the format
/// containerd's unpacker uses (`extract-<unique> <chainID>`).
fn unpack_key(chain_id: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "extract-{nanos}-{:06x} {chain_id}",
        rand::random::<u32>() & 0xff_ffff
    )
}

struct Puller {
    downloader: Downloader,
    options: PullOptions,
    resolved: ResolvedPull,
}

impl Puller {
    fn containerd(&self) -> &ContainerdClient {
        &self.downloader.containerd
    }

    fn snapshotter(&self) -> &str {
        &self.options.snapshotter
    }

    async fn run(self, blobs: MetadataBlobs, tocs: TocFetches) -> Result<PullReport, PullError> {
        self.store_metadata(&blobs, &tocs).await?;
        tracing::debug!("manifest and config stored in the content store");
        tocs.finish().await;
        let layers = self.unpack_layers().await?;
        if let Some(top) = self.resolved.chain_ids.last() {
            // What containerd's unpacker does: the image's config keeps its
            // snapshots alive.
            let labels = BTreeMap::from([(
                format!("{LABEL_GC_REF_SNAPSHOT}{}", self.snapshotter()),
                top.to_string(),
            )]);
            self.containerd()
                .set_content_labels(&self.resolved.config.digest, &labels)
                .await?;
        }
        self.containerd()
            .create_or_update_image(&self.resolved.name, &self.resolved.target)
            .await?;
        tracing::debug!(image = %self.resolved.name, "image record written");
        Ok(PullReport {
            resolved: self.resolved,
            layers,
        })
    }

    /// Stores config, manifest and index, each with labels naming what it refers to
    /// (the manifest also the TOCs `tocs` stores).
    async fn store_metadata(
        &self,
        blobs: &MetadataBlobs,
        tocs: &TocFetches,
    ) -> Result<(), PullError> {
        let r = &self.resolved;
        self.downloader
            .store("config", &r.config.digest, &blobs.config, BTreeMap::new())
            .await?;
        let mut labels =
            BTreeMap::from([(LABEL_GC_REF_CONFIG.to_owned(), r.config.digest.to_string())]);
        for (i, layer) in r.layers.iter().enumerate() {
            labels.insert(format!("{LABEL_GC_REF_LAYER}{i}"), layer.digest.to_string());
        }
        labels.extend(tocs.labels());
        self.downloader
            .store("manifest", &r.manifest.digest, &blobs.manifest, labels)
            .await?;
        if let Some(index) = &blobs.index {
            let labels = BTreeMap::from([(
                format!("{LABEL_GC_REF_MANIFEST}0"),
                r.manifest.digest.to_string(),
            )]);
            self.downloader
                .store("index", &r.target.digest, index, labels)
                .await?;
        }
        Ok(())
    }

    /// The labels of layer `index`'s snapshot: the chain ID containerd looks for, the
    /// layer annotations containerd passes on, and the lazy-pull labels.
    fn snapshot_labels(&self, index: usize) -> BTreeMap<String, String> {
        let r = &self.resolved;
        let mut labels = BTreeMap::new();
        if let Some(layer) = r.layers.get(index) {
            for (key, value) in &layer.annotations {
                if key.starts_with(SNAPSHOT_LABEL_PREFIX)
                    && key != LABEL_REMOTE
                    && label_fits(key, value)
                {
                    labels.insert(key.clone(), value.clone());
                }
            }
            labels.insert(LABEL_LAYER_DIGEST.to_owned(), layer.digest.to_string());
        }
        if let Some(chain_id) = r.chain_ids.get(index) {
            labels.insert(LABEL_SNAPSHOT_REF.to_owned(), chain_id.to_string());
        }
        if label_fits(LABEL_IMAGE_REF, &r.reference) {
            labels.insert(LABEL_IMAGE_REF.to_owned(), r.reference.clone());
        }
        labels.insert(
            LABEL_MANIFEST_DIGEST.to_owned(),
            r.manifest.digest.to_string(),
        );
        let digests: Vec<Digest> = r.layers.iter().map(|l| l.digest).collect();
        labels.insert(
            LABEL_IMAGE_LAYERS.to_owned(),
            image_layers_label(&digests, index),
        );
        labels
    }

    async fn unpack_layers(&self) -> Result<Vec<LayerReport>, PullError> {
        let r = &self.resolved;
        let count = r.layers.len();
        // A committed chain implies all chains below it: find the highest one.
        let mut first_missing = 0;
        for index in (0..count).rev() {
            let chain_id = r.chain_ids[index].to_string();
            if self
                .containerd()
                .stat_snapshot(self.snapshotter(), &chain_id)
                .await?
                .is_some()
            {
                first_missing = index + 1;
                break;
            }
        }
        let mut downloads = Downloads::new(count, self.options.download_concurrency);
        let mut reports = Vec::with_capacity(count);
        for (index, layer) in r.layers.iter().enumerate() {
            self.downloader.progress.layer_started(index);
            let started = Instant::now();
            let outcome = if index < first_missing {
                LayerOutcome::Present
            } else {
                self.unpack_layer(index, &mut downloads).await?
            };
            let report = LayerReport {
                index,
                descriptor: layer.clone(),
                chain_id: r.chain_ids[index],
                outcome,
                elapsed: started.elapsed(),
            };
            tracing::info!(
                layer = index,
                digest = %layer.digest,
                chain_id = %report.chain_id,
                outcome = outcome.describe(),
                "layer unpacked"
            );
            self.downloader.progress.layer_done(&report);
            reports.push(report);
        }
        Ok(reports)
    }

    async fn unpack_layer(
        &self,
        index: usize,
        downloads: &mut Downloads,
    ) -> Result<LayerOutcome, PullError> {
        let r = &self.resolved;
        let layer = &r.layers[index];
        let chain_id = r.chain_ids[index].to_string();
        let parent = match index.checked_sub(1) {
            Some(below) => r.chain_ids[below].to_string(),
            None => String::new(),
        };
        let labels = self.snapshot_labels(index);
        for _ in 0..PREPARE_ATTEMPTS {
            let key = unpack_key(&chain_id);
            match self
                .containerd()
                .prepare_snapshot(self.snapshotter(), &key, &parent, &labels)
                .await
            {
                Ok(mounts) => {
                    return self.apply(index, &key, mounts, &labels, downloads).await;
                }
                Err(e) if e.is_already_exists() => {
                    // The snapshotter committed the chain itself (a remote layer),
                    // or a concurrent pull did; either way it must now exist. zest
                    // marks the snapshots it mounts from the registry.
                    if let Some(info) = self
                        .containerd()
                        .stat_snapshot(self.snapshotter(), &chain_id)
                        .await?
                    {
                        return Ok(if info.labels.contains_key(LABEL_REMOTE) {
                            LayerOutcome::Remote
                        } else {
                            LayerOutcome::Present
                        });
                    }
                    tracing::debug!(layer = index, chain_id = %chain_id, "snapshot reported as existing is gone; preparing again");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(PullError::Layer {
            index,
            digest: layer.digest,
            detail: format!(
                "the snapshotter reported chain {chain_id} as existing {PREPARE_ATTEMPTS} times, but it was not there"
            ),
        })
    }

    /// The fallback path: download the blob, apply it onto the prepared snapshot,
    /// check the diff ID, commit under the chain ID.
    async fn apply(
        &self,
        index: usize,
        key: &str,
        mounts: Vec<zest_api::types::Mount>,
        labels: &BTreeMap<String, String>,
        downloads: &mut Downloads,
    ) -> Result<LayerOutcome, PullError> {
        let r = &self.resolved;
        let layer = &r.layers[index];
        let expected = r.diff_ids[index];
        let chain_id = r.chain_ids[index].to_string();
        downloads.start_following(index, &self.downloader, &r.layers);
        let applied = async {
            let downloaded = downloads.finish(index, &self.downloader, layer).await?;
            let actual = self.containerd().apply_layer(layer, mounts).await?;
            if actual != expected {
                return Err(PullError::DiffIdMismatch {
                    index,
                    digest: layer.digest,
                    expected,
                    actual,
                });
            }
            Ok(downloaded)
        }
        .await;
        let downloaded = match applied {
            Ok(downloaded) => downloaded,
            Err(e) => {
                self.remove_quietly(key).await;
                return Err(e);
            }
        };
        match self
            .containerd()
            .commit_snapshot(self.snapshotter(), &chain_id, key, labels)
            .await
        {
            Ok(()) => {}
            // A concurrent pull committed the same chain first.
            Err(e) if e.is_already_exists() => self.remove_quietly(key).await,
            Err(e) => {
                self.remove_quietly(key).await;
                return Err(e.into());
            }
        }
        let uncompressed = BTreeMap::from([(LABEL_UNCOMPRESSED.to_owned(), expected.to_string())]);
        self.containerd()
            .set_content_labels(&layer.digest, &uncompressed)
            .await?;
        Ok(LayerOutcome::Applied { downloaded })
    }

    /// Removes an active snapshot left by a failed unpack (best effort: the lease
    /// would have it collected anyway).
    async fn remove_quietly(&self, key: &str) {
        if let Err(e) = self
            .containerd()
            .remove_snapshot(self.snapshotter(), key)
            .await
        {
            tracing::debug!(key, error = %e, "could not remove the unfinished snapshot");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpack_keys_are_unique_and_name_the_chain() {
        let a = unpack_key("sha256:x");
        let b = unpack_key("sha256:x");
        assert_ne!(a, b);
        assert!(a.starts_with("extract-") && a.ends_with(" sha256:x"), "{a}");
    }

    #[test]
    fn only_gzip_and_plain_layers_are_never_lazy() {
        let d = |media_type: &str| Descriptor::new(media_type, Digest::of(b"x"), 1);
        assert!(never_lazy(&d(zest_oci::media_type::OCI_LAYER_GZIP)));
        assert!(never_lazy(&d(zest_oci::media_type::DOCKER_LAYER_GZIP)));
        assert!(never_lazy(&d(zest_oci::media_type::OCI_LAYER_TAR)));
        assert!(!never_lazy(&d(zest_oci::media_type::OCI_LAYER_ZSTD)));
        assert!(!never_lazy(&d("application/x-unknown")));
    }
}
