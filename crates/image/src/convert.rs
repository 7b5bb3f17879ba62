//! Converting an image to zstd:chunked and publishing it.
//!
//! `convert` reads an image (one platform, or every platform of an index) from an
//! [`ImageStore`], rewrites each gzip, zstd or uncompressed layer as a zstd:chunked
//! blob, and writes blobs, config, manifests and (for an index) a new index to the
//! destination store.
//!
//! Invariants:
//! - A converted layer decompresses to the byte-identical tar, so its diff_id is
//!   unchanged; the new config's `rootfs.diff_ids` are taken from the writer and must
//!   equal the source's, or the conversion fails (the source image is inconsistent).
//! - Layers already in zstd:chunked form are copied as they are, never re-encoded.
//! - A layer appearing in several manifests (platforms sharing a base) is converted once.
//! - Nothing unverified is published: source blobs are verified before they are read
//!   into the writer's output, which is only pushed once complete.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufReader, BufWriter, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use tokio::sync::OnceCell;

use zest_format::{write_chunked, FormatError, TocLocation, WriteOptions};
use zest_oci::digest::Digest;
use zest_oci::{
    media_type, Descriptor, ImageConfig, ImageIndex, ImageManifest, LayerCompression, ManifestKind,
    OciJsonError, Platform,
};
use zest_store::{ImageStore, StoreError};

/// Which manifests of an index to convert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlatformChoice {
    /// Every platform: the result is an index with one converted manifest per platform.
    All,
    /// One platform: the result is a single image manifest.
    One(Platform),
}

/// Settings of a conversion.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Platforms to convert when the source is an index.
    pub platforms: PlatformChoice,
    /// Layers converted at the same time (each uses one core while it compresses).
    pub parallelism: usize,
    /// zstd:chunked writer settings.
    pub write: WriteOptions,
    /// Directory for temporary layer files (downloaded sources, written blobs).
    pub work_dir: PathBuf,
}

/// Receives progress of a conversion (the CLI draws bars from it).
pub trait ConvertProgress: Send + Sync {
    /// The total compressed size of the layers to convert is now known.
    fn set_total(&self, _bytes: u64) {}
    /// `bytes` more of source layer data were consumed.
    fn advance(&self, _bytes: u64) {}
    /// A layer is done.
    fn layer_done(&self, _layer: &LayerReport) {}
}

/// No progress reporting.
#[derive(Debug, Default)]
pub struct NoProgress;
impl ConvertProgress for NoProgress {}

/// What happened to one layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerAction {
    /// Rewritten as zstd:chunked.
    Converted,
    /// Already zstd:chunked: copied unchanged.
    Kept,
}

/// One layer's result.
#[derive(Debug, Clone)]
pub struct LayerReport {
    /// Source descriptor.
    pub source: Descriptor,
    /// Destination descriptor (with the zstd:chunked annotations).
    pub output: Descriptor,
    /// The layer's diff_id (sha256 of its tar).
    pub diff_id: Option<Digest>,
    /// What was done.
    pub action: LayerAction,
    /// Files, directories and links in the layer (when converted).
    pub entries: u64,
    /// Payload chunks written (when converted).
    pub chunks: u64,
}

/// The result of a conversion.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    /// The descriptor of what the destination's tag now points to.
    pub root: Descriptor,
    /// Per-layer results, once per distinct source layer, in first-seen order.
    pub layers: Vec<LayerReport>,
    /// Image manifests written.
    pub manifests: usize,
}

impl ConvertReport {
    /// Total compressed bytes of the distinct source layers.
    pub fn source_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.source.size).sum()
    }
    /// Total bytes of the distinct output layers.
    pub fn output_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.output.size).sum()
    }
}

/// A conversion failure.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// Reading the source or writing the destination failed.
    #[error(transparent)]
    Store(Box<StoreError>),
    /// A manifest, index or config is not valid JSON of its type.
    #[error("{what} of {image}: {source}")]
    Json {
        /// Which document.
        what: String,
        /// Image.
        image: String,
        /// Cause.
        source: OciJsonError,
    },
    /// The layer could not be written as zstd:chunked.
    #[error("converting layer {layer}: {source}")]
    Format {
        /// Source layer digest.
        layer: Digest,
        /// Cause.
        source: FormatError,
    },
    /// A layer's media type is not one zest can convert.
    #[error("layer {layer} has media type {media_type:?}, which zest cannot convert (supported: tar, tar+gzip, tar+zstd)")]
    UnsupportedLayer {
        /// Layer digest.
        layer: Digest,
        /// Its media type.
        media_type: String,
    },
    /// No manifest in the index matches the requested platform.
    #[error("{image} has no manifest for platform {platform}; available: {available}. Use --platform or --all-platforms")]
    NoPlatform {
        /// Image.
        image: String,
        /// Requested platform (`os/arch[/variant]`).
        platform: String,
        /// What the index offers.
        available: String,
    },
    /// The source config's diff_ids disagree with the layers' actual content.
    #[error("layer {index} of {image}: its tar hashes to {actual}, but the image config says {expected}; the source image is inconsistent and cannot be converted faithfully")]
    DiffIdMismatch {
        /// Image.
        image: String,
        /// Layer position.
        index: usize,
        /// From the source config.
        expected: Digest,
        /// Computed.
        actual: Digest,
    },
    /// The manifest lists a different number of layers than the config's diff_ids.
    #[error("{image}: the manifest has {layers} layers but the config lists {diff_ids} diff_ids")]
    LayerCount {
        /// Image.
        image: String,
        /// Layers in the manifest.
        layers: usize,
        /// diff_ids in the config.
        diff_ids: usize,
    },
    /// Local file work (temporary files) failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A worker thread failed.
    #[error("conversion worker failed: {0}")]
    Worker(String),
}

impl From<StoreError> for ConvertError {
    fn from(e: StoreError) -> Self {
        ConvertError::Store(Box::new(e))
    }
}

/// Converts the image in `src` and writes it to `dst`.
pub async fn convert(
    src: &ImageStore,
    dst: &ImageStore,
    opts: &ConvertOptions,
    progress: Arc<dyn ConvertProgress>,
) -> Result<ConvertReport, ConvertError> {
    let root = src.root().await?;
    let parsed = ManifestKind::parse(&root.media_type, &root.bytes).map_err(|source| {
        ConvertError::Json {
            what: "top-level manifest".into(),
            image: src.to_string(),
            source,
        }
    })?;
    let job = Job {
        src,
        dst,
        opts,
        progress,
        layers: Mutex::new(HashMap::new()),
        order: Mutex::new(Vec::new()),
    };

    let (root_desc, manifests) = match parsed {
        ManifestKind::Image(manifest) => {
            job.announce(std::slice::from_ref(&manifest));
            let desc = job.convert_manifest(manifest, true, None).await?;
            (desc, 1)
        }
        ManifestKind::Index(index) => job.convert_index(index).await?,
    };

    let layers = job.finished_layers();
    Ok(ConvertReport {
        root: root_desc,
        layers,
        manifests,
    })
}

struct Job<'a> {
    src: &'a ImageStore,
    dst: &'a ImageStore,
    opts: &'a ConvertOptions,
    progress: Arc<dyn ConvertProgress>,
    /// One conversion per distinct source layer, shared by every manifest using it.
    layers: Mutex<HashMap<Digest, Arc<OnceCell<LayerReport>>>>,
    order: Mutex<Vec<Digest>>,
}

impl Job<'_> {
    fn announce(&self, manifests: &[ImageManifest]) {
        let mut seen = std::collections::HashSet::new();
        let total = manifests
            .iter()
            .flat_map(|m| m.layers.iter())
            .filter(|l| seen.insert(l.digest))
            .map(|l| l.size)
            .sum();
        self.progress.set_total(total);
    }

    async fn convert_index(&self, index: ImageIndex) -> Result<(Descriptor, usize), ConvertError> {
        let wanted: Vec<Descriptor> = match &self.opts.platforms {
            PlatformChoice::All => index
                .manifests
                .iter()
                .filter(|d| media_type::is_image_manifest(&d.media_type))
                .cloned()
                .collect(),
            PlatformChoice::One(p) => match index.select(p) {
                Some(d) => vec![d.clone()],
                None => {
                    let available = index
                        .manifests
                        .iter()
                        .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
                        .collect::<Vec<_>>()
                        .join(", ");
                    return Err(ConvertError::NoPlatform {
                        image: self.src.to_string(),
                        platform: p.to_string(),
                        available,
                    });
                }
            },
        };

        let mut manifests = Vec::with_capacity(wanted.len());
        for desc in &wanted {
            let fetched = self.src.manifest(desc).await?;
            let manifest =
                ImageManifest::from_json(&fetched.bytes).map_err(|source| ConvertError::Json {
                    what: format!("manifest {}", desc.digest),
                    image: self.src.to_string(),
                    source,
                })?;
            manifests.push(manifest);
        }
        self.announce(&manifests);

        if let PlatformChoice::One(_) = self.opts.platforms {
            // A single platform becomes a plain image manifest under the tag.
            let manifest = manifests
                .pop()
                .ok_or_else(|| ConvertError::Worker("no manifest".into()))?;
            let platform = wanted.first().and_then(|d| d.platform.clone());
            let desc = self.convert_manifest(manifest, true, platform).await?;
            return Ok((desc, 1));
        }

        let mut out = ImageIndex::new();
        out.annotations = index.annotations.clone();
        out.media_type = Some(media_type::OCI_INDEX.to_string());
        for (desc, manifest) in wanted.iter().zip(manifests) {
            let mut new_desc = self
                .convert_manifest(manifest, false, desc.platform.clone())
                .await?;
            new_desc.annotations = desc.annotations.clone();
            out.manifests.push(new_desc);
        }
        let count = out.manifests.len();
        let desc = self
            .dst
            .put_manifest(
                media_type::OCI_INDEX,
                Bytes::from(out.to_json()),
                true,
                None,
            )
            .await?;
        Ok((desc, count))
    }

    /// Converts one image manifest's layers and config and stores the new manifest.
    async fn convert_manifest(
        &self,
        manifest: ImageManifest,
        tag_it: bool,
        platform: Option<Platform>,
    ) -> Result<Descriptor, ConvertError> {
        let image = self.src.to_string();
        let config_bytes = self.src.blob_bytes(&manifest.config).await?;
        let mut config =
            ImageConfig::from_json(&config_bytes).map_err(|source| ConvertError::Json {
                what: format!("config {}", manifest.config.digest),
                image: image.clone(),
                source,
            })?;
        let source_diff_ids = config.diff_ids().map_err(|source| ConvertError::Json {
            what: format!("config {}", manifest.config.digest),
            image: image.clone(),
            source,
        })?;
        if source_diff_ids.len() != manifest.layers.len() {
            return Err(ConvertError::LayerCount {
                image,
                layers: manifest.layers.len(),
                diff_ids: source_diff_ids.len(),
            });
        }

        let reports: Vec<LayerReport> = stream::iter(manifest.layers.iter().cloned())
            .map(|layer| self.layer(layer))
            .buffered(self.opts.parallelism.max(1))
            .try_collect()
            .await?;

        let mut diff_ids = Vec::with_capacity(reports.len());
        for (index, (report, expected)) in reports.iter().zip(&source_diff_ids).enumerate() {
            let actual = report.diff_id.unwrap_or(*expected);
            if actual != *expected {
                return Err(ConvertError::DiffIdMismatch {
                    image,
                    index,
                    expected: *expected,
                    actual,
                });
            }
            diff_ids.push(actual);
        }
        config.set_diff_ids(&diff_ids);

        let config_json = Bytes::from(config.to_json());
        let config_digest = self.dst.put_blob_bytes(config_json.clone()).await?;
        let new_manifest = ImageManifest {
            schema_version: 2,
            media_type: Some(media_type::OCI_MANIFEST.to_string()),
            artifact_type: None,
            config: Descriptor::new(
                media_type::OCI_CONFIG,
                config_digest,
                config_json.len() as u64,
            ),
            layers: reports.into_iter().map(|r| r.output).collect(),
            subject: None,
            annotations: manifest.annotations.clone(),
            extra: Default::default(),
        };
        let desc = self
            .dst
            .put_manifest(
                media_type::OCI_MANIFEST,
                Bytes::from(new_manifest.to_json()),
                tag_it,
                platform,
            )
            .await?;
        Ok(desc)
    }

    /// The converted form of `layer`, converting it on first use.
    async fn layer(&self, layer: Descriptor) -> Result<LayerReport, ConvertError> {
        let cell = {
            let mut map = self.layers.lock();
            map.entry(layer.digest)
                .or_insert_with(|| {
                    self.order.lock().push(layer.digest);
                    Arc::new(OnceCell::new())
                })
                .clone()
        };
        cell.get_or_try_init(|| self.convert_layer(layer))
            .await
            .cloned()
    }

    fn finished_layers(&self) -> Vec<LayerReport> {
        let map = self.layers.lock();
        let order = self.order.lock();
        order
            .iter()
            .filter_map(|d| map.get(d).and_then(|c| c.get().cloned()))
            .collect()
    }

    async fn convert_layer(&self, layer: Descriptor) -> Result<LayerReport, ConvertError> {
        let compression =
            LayerCompression::from_media_type(&layer.media_type).ok_or_else(|| {
                ConvertError::UnsupportedLayer {
                    layer: layer.digest,
                    media_type: layer.media_type.clone(),
                }
            })?;

        let already_chunked = compression == LayerCompression::Zstd
            && matches!(
                TocLocation::from_annotations(&layer.annotations),
                Ok(Some(_))
            );
        if already_chunked {
            return self.keep_layer(layer).await;
        }

        let scratch = Scratch::new(&self.opts.work_dir, &layer.digest)?;
        // Read a layout's blob in place; download a registry's blob (verified) first.
        let source_path = match self.src.local_blob_path(&layer.digest) {
            Some(p) => p,
            None => {
                self.src.blob_to_file(&layer, &scratch.input).await?;
                scratch.input.clone()
            }
        };
        let out_path = scratch.output.clone();
        let write = self.opts.write.clone();
        let progress = self.progress.clone();
        let digest = layer.digest;
        let summary = tokio::task::spawn_blocking(move || {
            convert_file(
                &source_path,
                &digest,
                compression,
                &out_path,
                &write,
                progress,
            )
        })
        .await
        .map_err(|e| ConvertError::Worker(e.to_string()))??;

        self.dst
            .put_blob_file(&summary.blob_digest, &scratch.output, Some(self.src))
            .await?;

        let output = chunked_layer_descriptor(&layer, &summary);
        let report = LayerReport {
            source: layer,
            output,
            diff_id: Some(summary.diff_id),
            action: LayerAction::Converted,
            entries: summary.entries,
            chunks: summary.chunks,
        };
        self.progress.layer_done(&report);
        Ok(report)
    }

    /// Copies an already zstd:chunked layer unchanged.
    async fn keep_layer(&self, layer: Descriptor) -> Result<LayerReport, ConvertError> {
        if !self.dst.has_blob(&layer.digest).await? {
            let scratch = Scratch::new(&self.opts.work_dir, &layer.digest)?;
            let path = match self.src.local_blob_path(&layer.digest) {
                Some(p) => p,
                None => {
                    self.src.blob_to_file(&layer, &scratch.input).await?;
                    scratch.input.clone()
                }
            };
            self.dst
                .put_blob_file(&layer.digest, &path, Some(self.src))
                .await?;
        }
        self.progress.advance(layer.size);
        let mut output = layer.clone();
        output.media_type = media_type::OCI_LAYER_ZSTD.to_string();
        let report = LayerReport {
            source: layer,
            output,
            diff_id: None,
            action: LayerAction::Kept,
            entries: 0,
            chunks: 0,
        };
        self.progress.layer_done(&report);
        Ok(report)
    }
}

/// The descriptor of the zstd:chunked blob `summary` describes, written from layer
/// `source`: the source's own annotations (minus stale zstd:chunked ones) plus the
/// writer's TOC annotations.
pub fn chunked_layer_descriptor(
    source: &Descriptor,
    summary: &zest_format::WriteSummary,
) -> Descriptor {
    let mut annotations: BTreeMap<String, String> = source
        .annotations
        .iter()
        .filter(|(k, _)| !k.contains("zstd-chunked."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    annotations.extend(summary.annotations.clone());
    let mut output = Descriptor::new(
        media_type::OCI_LAYER_ZSTD,
        summary.blob_digest,
        summary.blob_size,
    );
    output.annotations = annotations;
    output
}

/// Decompresses `source` and writes it as zstd:chunked to `out`.
fn convert_file(
    source: &Path,
    digest: &Digest,
    compression: LayerCompression,
    out: &Path,
    write: &WriteOptions,
    progress: Arc<dyn ConvertProgress>,
) -> Result<zest_format::WriteSummary, ConvertError> {
    let io = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| ConvertError::Io { op, path, source }
    };
    let file = std::fs::File::open(source).map_err(io("open", source))?;
    let counted = Counting {
        inner: BufReader::with_capacity(1 << 20, file),
        progress: progress.as_ref(),
    };
    let tar: Box<dyn Read + '_> = match compression {
        LayerCompression::Uncompressed => Box::new(counted),
        LayerCompression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(counted)),
        LayerCompression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(BufReader::new(counted))
                .map_err(io("start zstd decoder for", source))?,
        ),
    };
    let out_file = std::fs::File::create(out).map_err(io("create", out))?;
    let mut writer = BufWriter::with_capacity(1 << 20, out_file);
    let summary =
        write_chunked(tar, &mut writer, write).map_err(|source| ConvertError::Format {
            layer: *digest,
            source,
        })?;
    let file = writer
        .into_inner()
        .map_err(|e| io("write", out)(e.into_error()))?;
    file.sync_all().map_err(io("sync", out))?;
    Ok(summary)
}

/// Counts compressed bytes consumed, for progress.
struct Counting<'a, R> {
    inner: R,
    progress: &'a dyn ConvertProgress,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.advance(n as u64);
        Ok(n)
    }
}

/// Temporary files of one layer, removed when dropped.
struct Scratch {
    input: PathBuf,
    output: PathBuf,
}

impl Scratch {
    fn new(dir: &Path, digest: &Digest) -> Result<Self, ConvertError> {
        std::fs::create_dir_all(dir).map_err(|source| ConvertError::Io {
            op: "create work directory",
            path: dir.to_path_buf(),
            source,
        })?;
        let stem = format!("{}.{}", digest.hex(), std::process::id());
        Ok(Scratch {
            input: dir.join(format!("{stem}.src")),
            output: dir.join(format!("{stem}.zst")),
        })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.input);
        let _ = std::fs::remove_file(&self.output);
    }
}
