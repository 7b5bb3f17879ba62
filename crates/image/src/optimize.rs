//! Startup-profile optimization: `zest optimize SRC DST [-- CMD...]`.
//!
//! The image (zstd:chunked) is mounted lazily with an [`AccessRecorder`] on every
//! layer, the workload runs in a [`sandbox`](crate::sandbox) (a private mount
//! namespace chrooted into a writable overlay of the layers), and the regular files it opens or reads are
//! recorded per layer in first-access order. Each layer with recorded files is
//! then rewritten: its tar is reordered so that the recorded files (and the
//! directories above them) come first, in access order, and it is written as
//! zstd:chunked with those files prioritized, so that the TOC's prefetch extent
//! covers them and a mount fetches them in a few large requests.
//!
//! Invariants:
//! - A rewritten layer holds exactly the same tar entries, byte for byte, only in
//!   another order; its new diff_id is the sha256 of the reordered tar and
//!   replaces the old one in the config (history is unchanged).
//! - A hard link always stays after its target: only regular-file entries (which
//!   are link targets, never links) and directories move, and only earlier.
//! - The source layer's tar is checked against its diff_id before it is used.
//! - Layers without recorded files are published unchanged.
//! - Every mount made for the run is removed before the layers are rewritten,
//!   and the workload's process group is killed when it exits or times out.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use zest_cache::{CacheConfig, CacheError, ChunkCache};
use zest_fetch::toc::{open_image_layers, LayerOpenError, TocFetchOptions};
use zest_fetch::{FetchConfig, FetchLimits, Fetcher};
use zest_format::reorder::reorder_tar;
use zest_format::{write_chunked, FormatError, TocLocation, WriteOptions, WriteSummary};
use zest_fs::{AccessRecorder, LayerFsOptions, LayerMount, MountError, MountOptions};
use zest_oci::digest::{Digest, Hasher};
use zest_oci::{media_type, Descriptor, ImageConfig, ImageManifest, OciJsonError, Platform};
use zest_store::{ImageStore, StoreError};

pub use crate::sandbox::RunOutcome;
use crate::sandbox::{self, Limits, SandboxError, Workload, DEFAULT_PATH};

/// Settings of an optimization.
#[derive(Debug, Clone)]
pub struct OptimizeOptions {
    /// Platform to optimize when the source is an index.
    pub platform: Platform,
    /// The workload; `None` = the image config's Entrypoint followed by its Cmd.
    pub command: Option<Vec<String>>,
    /// How long the workload may run; its process group is killed after that.
    pub timeout: Duration,
    /// A substring of a stdout or stderr line after which the start-up is
    /// over: the workload is stopped there (servers never exit by themselves).
    pub ready: Option<String>,
    /// zstd:chunked writer settings (`prioritized` is set per layer).
    pub write: WriteOptions,
    /// Directory for temporary files and mountpoints.
    pub work_dir: PathBuf,
    /// Memory budget of the chunk cache used while the workload runs.
    pub memory_cache_bytes: u64,
}

impl OptimizeOptions {
    /// Defaults: 60 s timeout, the image's own command, default writer settings.
    pub fn new(platform: Platform, work_dir: PathBuf) -> OptimizeOptions {
        OptimizeOptions {
            platform,
            command: None,
            timeout: Duration::from_secs(60),
            ready: None,
            write: WriteOptions::default(),
            work_dir,
            memory_cache_bytes: 256 << 20,
        }
    }
}

/// One layer's result.
#[derive(Debug, Clone)]
pub struct OptimizedLayer {
    /// Source descriptor.
    pub source: Descriptor,
    /// Destination descriptor.
    pub output: Descriptor,
    /// The layer's diff_id in the new config.
    pub diff_id: Digest,
    /// Files recorded during the run, in first-access order.
    pub recorded: Vec<String>,
    /// Uncompressed bytes of the recorded files.
    pub prioritized_bytes: u64,
    /// The blob range a mount prefetches (`None` when nothing was recorded or
    /// the recorded files are all empty).
    pub prefetch_extent: Option<Range<u64>>,
}

/// The result of an optimization.
#[derive(Debug, Clone)]
pub struct OptimizeReport {
    /// The descriptor of the manifest the destination's tag now points to.
    pub root: Descriptor,
    /// The command that ran (argv).
    pub command: Vec<String>,
    /// How it ended.
    pub outcome: RunOutcome,
    /// How long it ran.
    pub run_time: Duration,
    /// Per-layer results, bottom layer first.
    pub layers: Vec<OptimizedLayer>,
}

/// An optimization failure.
#[derive(Debug, thiserror::Error)]
pub enum OptimizeError {
    /// Reading the source or writing the destination failed.
    #[error(transparent)]
    Store(Box<StoreError>),
    /// A manifest or config is not valid JSON of its type.
    #[error("{what} of {image}: {source}")]
    Json {
        /// Which document.
        what: String,
        /// Image.
        image: String,
        /// Cause.
        source: OciJsonError,
    },
    /// A layer is not zstd:chunked, so it cannot be mounted lazily to profile it.
    #[error("layer {index} of {image} ({digest}, {media_type}) is not zstd:chunked; convert the image first with `zest convert` and optimize the result")]
    NotChunked {
        /// Image.
        image: String,
        /// Layer position.
        index: usize,
        /// Layer digest.
        digest: Digest,
        /// Its media type.
        media_type: String,
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
    /// Neither `-- CMD` nor the image config gives a command.
    #[error("{image} has no Entrypoint or Cmd; give the command to profile after `--`")]
    NoCommand {
        /// Image.
        image: String,
    },
    /// The workload could not be run (its program is missing, or a sandbox
    /// mount failed).
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// A layer could not be opened for the lazy mount.
    #[error(transparent)]
    Layer(#[from] Box<LayerOpenError>),
    /// The chunk cache could not be set up.
    #[error("chunk cache: {0}")]
    Cache(#[from] CacheError),
    /// Mounting a layer failed.
    #[error(transparent)]
    Mount(#[from] MountError),
    /// A layer could not be rewritten.
    #[error("rewriting layer {digest}: {source}")]
    Format {
        /// Source layer digest.
        digest: Digest,
        /// Cause.
        source: FormatError,
    },
    /// A layer's tar does not hash to its diff_id.
    #[error("layer {digest}: its tar hashes to {actual}, but the image config says {expected}; the source image is inconsistent")]
    DiffIdMismatch {
        /// Layer digest.
        digest: Digest,
        /// From the config.
        expected: Digest,
        /// Computed.
        actual: Digest,
    },
    /// Local file work failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A worker thread failed.
    #[error("optimize worker failed: {0}")]
    Worker(String),
}

impl From<StoreError> for OptimizeError {
    fn from(e: StoreError) -> Self {
        OptimizeError::Store(Box::new(e))
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> OptimizeError {
    let path = path.to_path_buf();
    move |source| OptimizeError::Io { op, path, source }
}

/// Profiles the image in `src` by running its startup command, and writes the
/// image with each layer's startup files first and prioritized to `dst`.
pub async fn optimize(
    src: &ImageStore,
    dst: &ImageStore,
    opts: &OptimizeOptions,
) -> Result<OptimizeReport, OptimizeError> {
    let image = src.to_string();
    let resolved = src.resolve(&opts.platform).await?;
    let manifest = resolved.manifest;
    for (index, layer) in manifest.layers.iter().enumerate() {
        let chunked = layer.media_type == media_type::OCI_LAYER_ZSTD
            && matches!(
                TocLocation::from_annotations(&layer.annotations),
                Ok(Some(_))
            );
        if !chunked {
            return Err(OptimizeError::NotChunked {
                image,
                index,
                digest: layer.digest,
                media_type: layer.media_type.clone(),
            });
        }
    }
    let config_bytes = src.blob_bytes(&manifest.config).await?;
    let json_err = |source| OptimizeError::Json {
        what: format!("config {}", manifest.config.digest),
        image: image.clone(),
        source,
    };
    let mut config = ImageConfig::from_json(&config_bytes).map_err(json_err)?;
    let diff_ids = config.diff_ids().map_err(json_err)?;
    if diff_ids.len() != manifest.layers.len() {
        return Err(OptimizeError::LayerCount {
            image,
            layers: manifest.layers.len(),
            diff_ids: diff_ids.len(),
        });
    }
    let workload = workload_from_config(&config, opts.command.clone(), &image)?;

    std::fs::create_dir_all(&opts.work_dir).map_err(io_err("create", &opts.work_dir))?;
    let scratch = tempfile::Builder::new()
        .prefix("zest-optimize.")
        .tempdir_in(&opts.work_dir)
        .map_err(io_err("create a directory in", &opts.work_dir))?;

    // 1. Mount lazily with recorders and run the workload.
    let cache = Arc::new(ChunkCache::open(&CacheConfig {
        memory_bytes: opts.memory_cache_bytes,
        disk_bytes: 0,
        disk_root: scratch.path().join("cache"),
        ..CacheConfig::default()
    })?);
    let limits = FetchLimits::default();
    let fetchers = open_image_layers(
        src,
        manifest.layers.iter().enumerate(),
        &cache,
        &limits,
        &FetchConfig::default(),
        &TocFetchOptions::default(),
    )
    .await
    .map_err(Box::new)?;
    let recorders: Vec<Arc<AccessRecorder>> = fetchers
        .iter()
        .map(|_| Arc::new(AccessRecorder::new()))
        .collect();
    let run_dir = scratch.path().join("run");
    let limits = Limits {
        timeout: opts.timeout,
        ready: opts.ready.clone(),
    };
    let recs = recorders.clone();
    let spec = workload.clone();
    let (outcome, run_time) =
        tokio::task::spawn_blocking(move || profile_run(fetchers, recs, &run_dir, &spec, &limits))
            .await
            .map_err(|e| OptimizeError::Worker(e.to_string()))??;
    tracing::info!(%outcome, ms = run_time.as_millis() as u64, "profile run done");

    // 2. Rewrite every layer with recorded files.
    let mut layers = Vec::with_capacity(manifest.layers.len());
    for ((layer, recorder), expected) in manifest.layers.iter().zip(&recorders).zip(&diff_ids) {
        let recorded = recorder.paths();
        let report = if recorded.is_empty() {
            keep_layer(src, dst, layer, *expected, scratch.path()).await?
        } else {
            rewrite_layer(src, dst, layer, *expected, recorded, opts, scratch.path()).await?
        };
        layers.push(report);
    }

    // 3. Config and manifest.
    let new_ids: Vec<Digest> = layers.iter().map(|l| l.diff_id).collect();
    config.set_diff_ids(&new_ids);
    let config_json = Bytes::from(config.to_json());
    let config_digest = dst.put_blob_bytes(config_json.clone()).await?;
    let new_manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(media_type::OCI_MANIFEST.to_string()),
        artifact_type: None,
        config: Descriptor::new(
            media_type::OCI_CONFIG,
            config_digest,
            config_json.len() as u64,
        ),
        layers: layers.iter().map(|l| l.output.clone()).collect(),
        subject: None,
        annotations: manifest.annotations.clone(),
        extra: Default::default(),
    };
    let platform = resolved
        .descriptor
        .platform
        .clone()
        .or_else(|| config.platform());
    let root = dst
        .put_manifest(
            media_type::OCI_MANIFEST,
            Bytes::from(new_manifest.to_json()),
            true,
            platform,
        )
        .await?;
    Ok(OptimizeReport {
        root,
        command: workload.argv,
        outcome,
        run_time,
        layers,
    })
}

/// Publishes a layer without recorded files unchanged.
async fn keep_layer(
    src: &ImageStore,
    dst: &ImageStore,
    layer: &Descriptor,
    diff_id: Digest,
    scratch: &Path,
) -> Result<OptimizedLayer, OptimizeError> {
    if !dst.has_blob(&layer.digest).await? {
        let path = match src.local_blob_path(&layer.digest) {
            Some(p) => p,
            None => {
                let p = scratch.join(format!("{}.keep", layer.digest.hex()));
                src.blob_to_file(layer, &p).await?;
                p
            }
        };
        dst.put_blob_file(&layer.digest, &path, Some(src)).await?;
    }
    Ok(OptimizedLayer {
        source: layer.clone(),
        output: layer.clone(),
        diff_id,
        recorded: Vec::new(),
        prioritized_bytes: 0,
        prefetch_extent: None,
    })
}

/// Reorders one layer's tar so the recorded files come first and publishes it.
async fn rewrite_layer(
    src: &ImageStore,
    dst: &ImageStore,
    layer: &Descriptor,
    diff_id: Digest,
    recorded: Vec<String>,
    opts: &OptimizeOptions,
    scratch: &Path,
) -> Result<OptimizedLayer, OptimizeError> {
    let stem = scratch.join(layer.digest.hex());
    let blob_path = match src.local_blob_path(&layer.digest) {
        Some(p) => p,
        None => {
            let p = stem.with_extension("src");
            src.blob_to_file(layer, &p).await?;
            p
        }
    };
    let tar_path = stem.with_extension("tar");
    let out_path = stem.with_extension("zst");
    let write = opts.write.clone();
    let digest = layer.digest;
    let out = out_path.clone();
    let rec = recorded.clone();
    let (summary, prioritized_bytes) = tokio::task::spawn_blocking(move || {
        let result = reorder_layer(&blob_path, digest, diff_id, &rec, &tar_path, &out, &write);
        let _ = std::fs::remove_file(&tar_path);
        result
    })
    .await
    .map_err(|e| OptimizeError::Worker(e.to_string()))??;
    dst.put_blob_file(&summary.blob_digest, &out_path, Some(src))
        .await?;
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(stem.with_extension("src"));

    let output = crate::convert::chunked_layer_descriptor(layer, &summary);
    Ok(OptimizedLayer {
        source: layer.clone(),
        output,
        diff_id: summary.diff_id,
        recorded,
        prioritized_bytes,
        prefetch_extent: summary.prefetch_end.map(|end| 0..end),
    })
}

/// Decodes the zstd:chunked blob at `blob` to `tar_path` (checking its
/// diff_id), reorders it and writes the prioritized zstd:chunked blob to `out`.
fn reorder_layer(
    blob: &Path,
    digest: Digest,
    diff_id: Digest,
    recorded: &[String],
    tar_path: &Path,
    out: &Path,
    write: &WriteOptions,
) -> Result<(WriteSummary, u64), OptimizeError> {
    let format_err = |source| OptimizeError::Format { digest, source };
    // The blob's metadata sits in skippable frames: plain zstd yields the tar.
    let input = File::open(blob).map_err(io_err("open", blob))?;
    let mut decoder = zstd::stream::read::Decoder::new(input).map_err(io_err("decode", blob))?;
    let tar_file = File::create(tar_path).map_err(io_err("create", tar_path))?;
    let mut tar_out = BufWriter::with_capacity(1 << 20, tar_file);
    let mut hasher = Hasher::new();
    let mut len = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match decoder.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("decompress", blob)(e)),
        };
        let chunk = buf.get(..n).unwrap_or_default();
        hasher.update(chunk);
        tar_out
            .write_all(chunk)
            .map_err(io_err("write", tar_path))?;
        len += n as u64;
    }
    tar_out.flush().map_err(io_err("write", tar_path))?;
    drop(tar_out);
    let actual = hasher.finish();
    if actual != diff_id {
        return Err(OptimizeError::DiffIdMismatch {
            digest,
            expected: diff_id,
            actual,
        });
    }

    let reordered = reorder_tar(tar_path, len, recorded).map_err(format_err)?;
    let (moved, bytes) = (reordered.first.clone(), reordered.first_bytes);
    let out_file = File::create(out).map_err(io_err("create", out))?;
    let mut writer = BufWriter::with_capacity(1 << 20, out_file);
    let options = WriteOptions {
        prioritized: moved,
        ..write.clone()
    };
    let summary = write_chunked(reordered, &mut writer, &options).map_err(format_err)?;
    let file = writer
        .into_inner()
        .map_err(|e| io_err("write", out)(e.into_error()))?;
    file.sync_all().map_err(io_err("sync", out))?;
    Ok((summary, bytes))
}

// ---------------------------------------------------------------------------
// Running the workload

/// The workload from `command` or, without one, the image config's Entrypoint
/// and Cmd, with the config's environment (PATH defaulted) and working directory.
fn workload_from_config(
    config: &ImageConfig,
    command: Option<Vec<String>>,
    image: &str,
) -> Result<Workload, OptimizeError> {
    let json_err = |source| OptimizeError::Json {
        what: "config".into(),
        image: image.to_string(),
        source,
    };
    let argv = match command.filter(|c| !c.is_empty()) {
        Some(c) => c,
        None => {
            let mut argv = config.entrypoint().map_err(json_err)?.unwrap_or_default();
            argv.extend(config.cmd().map_err(json_err)?.unwrap_or_default());
            argv
        }
    };
    if argv.is_empty() {
        return Err(OptimizeError::NoCommand {
            image: image.to_string(),
        });
    }
    let mut env = config.env();
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), DEFAULT_PATH.into()));
    }
    let cwd = config.working_dir().unwrap_or("/").to_string();
    Ok(Workload { argv, env, cwd })
}

/// Mounts the layers with recorders and runs the workload in a sandbox on top
/// of them; every layer is unmounted again before this returns.
fn profile_run(
    fetchers: Vec<Arc<Fetcher>>,
    recorders: Vec<Arc<AccessRecorder>>,
    dir: &Path,
    workload: &Workload,
    limits: &Limits,
) -> Result<(RunOutcome, Duration), OptimizeError> {
    let mut layers = LayerMounts(Vec::new());
    for (i, (fetcher, recorder)) in fetchers.into_iter().zip(recorders).enumerate() {
        let mp = dir.join("l").join(i.to_string());
        std::fs::create_dir_all(&mp).map_err(io_err("create", &mp))?;
        let options = MountOptions {
            fs: LayerFsOptions {
                recorder: Some(recorder),
                ..LayerFsOptions::default()
            },
            // The run must read what it needs, not what a profile already says.
            prefetch: false,
            source_name: "zest-optimize".into(),
            ..MountOptions::default()
        };
        layers.0.push(LayerMount::mount(fetcher, &mp, &options)?);
    }
    let lower: Vec<&Path> = layers.0.iter().rev().map(LayerMount::mountpoint).collect();
    Ok(sandbox::run(&lower, dir, workload, limits)?)
}

/// The layer mounts of a profile run, unmounted top layer first when dropped.
struct LayerMounts(Vec<LayerMount>);

impl Drop for LayerMounts {
    fn drop(&mut self) {
        for mut l in self.0.drain(..).rev() {
            if l.unmount().is_err() {
                l.unmount_or_detach();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_defaults_to_entrypoint_and_cmd_with_the_image_env() {
        let config = ImageConfig::from_json(
            br#"{"config":{"Entrypoint":["/bin/sh","-c"],"Cmd":["echo hi"],"Env":["A=1=2"],"WorkingDir":"/srv"}}"#,
        )
        .unwrap();
        let spec = workload_from_config(&config, None, "img").unwrap();
        assert_eq!(spec.argv, vec!["/bin/sh", "-c", "echo hi"]);
        assert_eq!(spec.cwd, "/srv");
        assert!(spec.env.contains(&("A".into(), "1=2".into())));
        assert_eq!(spec.path_var(), DEFAULT_PATH);
        let given = workload_from_config(&config, Some(vec!["true".into()]), "img").unwrap();
        assert_eq!(given.argv, vec!["true"]);
        let empty = ImageConfig::from_json(br#"{"config":{}}"#).unwrap();
        assert!(matches!(
            workload_from_config(&empty, None, "img"),
            Err(OptimizeError::NoCommand { .. })
        ));
    }
}
