//! `zest mount REF MOUNTPOINT`: mount an image read-only without pulling it.
//!
//! Each zstd:chunked layer is mounted through FUSE from its table of contents, and
//! the layers are stacked with overlayfs on MOUNTPOINT (or one raw layer with
//! `--layer`). Files are fetched as they are read. The command stays in the
//! foreground until Ctrl-C, SIGTERM or an external unmount, then removes every
//! mount it made.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use indicatif::HumanBytes;

use zest_cache::{CacheConfig, ChunkCache};
use zest_fetch::toc::{open_image_layers, TocFetchOptions};
use zest_fetch::{FetchConfig, FetchLimits};
use zest_fs::{ImageMount, LayerMount, MountOptions};
use zest_oci::{LayerCompression, Platform};
use zest_store::{ImageRef, ImageStore};

use super::registry_args::RegistryArgs;
use zest_cache::ByteSize;

/// Arguments of `zest mount`.
#[derive(Debug, Args)]
pub struct MountArgs {
    /// Image: a registry reference or `oci:DIR[:TAG]`. Its layers must be zstd:chunked.
    pub image: String,
    /// An existing empty directory to mount the image on.
    pub mountpoint: PathBuf,

    /// Mount only this layer (0 = bottom), raw: whiteouts show as 0:0 character devices.
    #[arg(long, value_name = "N")]
    pub layer: Option<usize>,

    /// Platform when the image is a multi-platform index (default: this host's).
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    pub platform: Option<Platform>,

    /// Directory of the persistent chunk cache (shared with `zest serve` by default).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/zest/cache")]
    pub cache_dir: PathBuf,

    /// Disk budget of the chunk cache; 0 keeps chunks in memory only.
    #[arg(long, value_name = "SIZE", default_value = "10GiB")]
    pub cache_size: ByteSize,

    /// Memory budget of the chunk cache.
    #[arg(long, value_name = "SIZE", default_value = "256MiB")]
    pub memory_cache: ByteSize,

    /// Do not fetch the layers' prioritized (startup) files at mount.
    #[arg(long)]
    pub no_prefetch: bool,

    /// FUSE worker threads per layer.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,

    #[command(flatten)]
    pub registry: RegistryArgs,
}

pub async fn run(args: MountArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let client = args.registry.client()?;
    let image: ImageRef = args
        .image
        .parse()
        .with_context(|| format!("image {:?}", args.image))?;
    let store = ImageStore::open(&image, &client).with_context(|| format!("opening {image}"))?;
    let resolved = store
        .resolve(&args.platform.clone().unwrap_or_else(Platform::host))
        .await
        .with_context(|| format!("resolving {image}"))?;
    let layers: Vec<(usize, _)> = match args.layer {
        Some(n) => match resolved.manifest.layers.get(n) {
            Some(l) => vec![(n, l.clone())],
            None => bail!(
                "{image} has {} layers; there is no layer {n}",
                resolved.manifest.layers.len()
            ),
        },
        None => resolved
            .manifest
            .layers
            .iter()
            .cloned()
            .enumerate()
            .collect(),
    };
    for (i, layer) in &layers {
        if LayerCompression::from_media_type(&layer.media_type) != Some(LayerCompression::Zstd) {
            bail!(
                "layer {i} of {image} ({}) is {}: zest mounts zstd:chunked layers only; convert the image with `zest convert`",
                layer.digest,
                layer.media_type
            );
        }
    }

    let cache = Arc::new(
        ChunkCache::open(&CacheConfig {
            memory_bytes: args.memory_cache.0,
            disk_bytes: args.cache_size.0,
            disk_root: args.cache_dir.clone(),
            ..CacheConfig::default()
        })
        .with_context(|| format!("opening the chunk cache in {}", args.cache_dir.display()))?,
    );
    let limits = FetchLimits::default();

    let fetchers = open_image_layers(
        &store,
        layers.iter().map(|(i, layer)| (*i, layer)),
        &cache,
        &limits,
        &FetchConfig::default(),
        &TocFetchOptions::default(),
    )
    .await
    .with_context(|| format!("opening the layers of {image}"))?;

    let options = MountOptions {
        threads: args.threads,
        prefetch: !args.no_prefetch,
        source_name: format!("zest:{image}"),
        ..MountOptions::default()
    };
    let target = args.mountpoint.clone();
    let single = args.layer.is_some();
    // Per-layer mountpoints live in a private directory removed on exit.
    let layer_root = tempfile::Builder::new()
        .prefix("zest-mount.")
        .tempdir()
        .context("creating a directory for the layer mounts")?;
    let layer_root_path = layer_root.path().to_path_buf();
    let fetchers_for_mount = fetchers.clone();
    // Mounting blocks until the kernel's FUSE handshake completes: off the runtime.
    let mounted = tokio::task::spawn_blocking(move || -> anyhow::Result<Mounted> {
        if single {
            let fetcher = fetchers_for_mount.into_iter().next().context("no layer")?;
            let m = LayerMount::mount(fetcher, &target, &options)
                .with_context(|| format!("mounting the layer on {}", target.display()))?;
            return Ok(Mounted::Layer(m));
        }
        let image =
            ImageMount::mount_fetchers(fetchers_for_mount, &layer_root_path, &target, &options)
                .with_context(|| {
                    format!(
                        "mounting the layers and stacking them on {}",
                        target.display()
                    )
                })?;
        Ok(Mounted::Image(image))
    })
    .await
    .context("mount worker")??;

    let entries: usize = fetchers.iter().map(|f| f.index().len()).sum();
    let toc_bytes: u64 = fetchers
        .iter()
        .map(|f| f.index().location().toc.compressed_len)
        .sum();
    let total: u64 = layers.iter().map(|(_, l)| l.size).sum();
    println!(
        "mounted {image} on {} in {:.0} ms: {} layer{}, {entries} entries, {} of metadata fetched for {} of layers",
        args.mountpoint.display(),
        started.elapsed().as_secs_f64() * 1e3,
        layers.len(),
        if layers.len() == 1 { "" } else { "s" },
        HumanBytes(toc_bytes),
        HumanBytes(total),
    );
    println!("press Ctrl-C to unmount");

    wait_for_exit(&args.mountpoint).await;

    let (mut bytes, mut requests, mut misses, mut verified) = (0, 0, 0, 0);
    for s in fetchers.iter().map(|f| f.stats()) {
        bytes += s.bytes_fetched;
        requests += s.range_requests;
        misses += s.blocking_misses;
        verified += s.chunks_verified;
    }
    unmount(mounted).await;
    drop(layer_root);
    println!(
        "unmounted; fetched {} in {} range requests ({} blocking misses), {} chunks verified",
        HumanBytes(bytes),
        requests,
        misses,
        verified
    );
    Ok(())
}

enum Mounted {
    Layer(LayerMount),
    Image(ImageMount),
}

/// Waits for Ctrl-C, SIGTERM, or the mount disappearing (someone ran umount).
async fn wait_for_exit(mountpoint: &std::path::Path) {
    let mountpoint = mountpoint
        .canonicalize()
        .unwrap_or_else(|_| mountpoint.to_path_buf());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return,
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => return,
            _ = tick.tick() => {
                if !is_mountpoint(&mountpoint) {
                    eprintln!("{} was unmounted from outside; cleaning up", mountpoint.display());
                    return;
                }
            }
        }
    }
}

/// Whether `path` is still mounted; `true` when the mount table cannot be read, so
/// an unreadable table never makes us tear the mount down.
fn is_mountpoint(path: &std::path::Path) -> bool {
    zest_mount::is_mount_point(path).unwrap_or(true)
}

/// Unmounts, retrying while files are still open under the mount (bounded).
async fn unmount(mounted: Mounted) {
    let _ = tokio::task::spawn_blocking(move || match mounted {
        Mounted::Layer(mut m) => {
            if let Err(e) = m.unmount() {
                eprintln!("warning: {e}; detaching instead");
                m.unmount_or_detach();
            }
        }
        Mounted::Image(mut m) => {
            for attempt in 0..10 {
                match m.unmount() {
                    Ok(()) => return,
                    Err(e) if attempt < 9 => {
                        eprintln!("{e}; retrying (close files under the mount)");
                        std::thread::sleep(Duration::from_millis(500));
                    }
                    Err(e) => eprintln!("warning: {e}; detaching instead"),
                }
            }
            // Dropping detaches whatever is left (lazy unmount).
            drop(m);
        }
    })
    .await;
}
