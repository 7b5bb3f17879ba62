//! `zest pull REF`: pull an image into containerd with lazily mounted layers (the
//! equivalent of `ctr-remote images rpull`). Afterwards `ctr images ls` lists the image
//! and `ctr run --snapshotter zest REF ID` runs it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use zest_containerd::{
    pull, ContainerdClient, LayerOutcome, LayerReport, PullOptions, PullProgress, ResolvedPull,
    DEFAULT_ADDRESS, DEFAULT_NAMESPACE,
};
use zest_oci::{Platform, Reference};

use super::registry_args::RegistryArgs;

/// Arguments of `zest pull`.
#[derive(Debug, Args)]
pub struct PullArgs {
    /// Image reference, e.g. `registry.example.com/app:1` or `app@sha256:...`.
    pub reference: String,

    /// containerd's socket.
    #[arg(long, value_name = "SOCKET", env = "CONTAINERD_ADDRESS", default_value = DEFAULT_ADDRESS)]
    pub address: PathBuf,

    /// containerd namespace (Kubernetes uses `k8s.io`).
    #[arg(long, short = 'n', env = "CONTAINERD_NAMESPACE", default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,

    /// Snapshotter to unpack into: zest's proxy plugin name in containerd's config.
    #[arg(long, default_value = "zest")]
    pub snapshotter: String,

    /// Platform to pull from a multi-platform image (default: this host's).
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    pub platform: Option<Platform>,

    /// Name of the image in containerd (default: the normalised reference).
    #[arg(long)]
    pub name: Option<String>,

    /// Layer downloads at once for layers that cannot be mounted lazily.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub max_concurrent_downloads: u16,

    /// Print no progress bars.
    #[arg(long, short)]
    pub quiet: bool,

    #[command(flatten)]
    pub registry: RegistryArgs,
}

pub async fn run(args: PullArgs) -> anyhow::Result<()> {
    let reference: Reference = args
        .reference
        .parse()
        .with_context(|| format!("image reference {:?}", args.reference))?;
    let registry = args.registry.client()?;
    let containerd = ContainerdClient::connect(&args.address, &args.namespace)
        .await
        .context("connecting to containerd")?;
    let options = PullOptions {
        snapshotter: args.snapshotter.clone(),
        platform: args.platform.clone().unwrap_or_else(Platform::host),
        image_name: args.name.clone(),
        download_concurrency: usize::from(args.max_concurrent_downloads),
        ..PullOptions::default()
    };

    let bars = Arc::new(Bars::new(args.quiet));
    let started = Instant::now();
    let report = pull(&registry, &containerd, &reference, &options, bars.clone())
        .await
        .with_context(|| {
            format!(
                "pulling {reference} into containerd ({})",
                args.address.display()
            )
        })?;
    bars.clear();
    let elapsed = started.elapsed().as_secs_f64();

    let image = &report.resolved;
    let stats = registry.stats();
    let fetched = stats.manifest_bytes + stats.blob_bytes + stats.range_bytes;
    let size = image.size();
    println!(
        "{}: {} ({} layer{}: {} lazy (remote), {} downloaded+applied, {} already present)",
        image.name,
        image.target.digest,
        image.layers.len(),
        if image.layers.len() == 1 { "" } else { "s" },
        report.remote_layers(),
        report.applied_layers(),
        report.present_layers(),
    );
    println!(
        "pulled in {elapsed:.2} s; fetched {} from the registry for a {} image ({:.1}%){}",
        HumanBytes(fetched),
        HumanBytes(size),
        if size == 0 {
            0.0
        } else {
            fetched as f64 * 100.0 / size as f64
        },
        if report.remote_layers() > 0 {
            "; lazy layers are read on demand by the snapshotter"
        } else {
            ""
        },
    );
    Ok(())
}

/// One progress bar per layer.
struct Bars {
    multi: MultiProgress,
    layers: Mutex<Vec<ProgressBar>>,
    quiet: bool,
}

impl Bars {
    fn new(quiet: bool) -> Self {
        let multi = MultiProgress::new();
        if quiet {
            multi.set_draw_target(ProgressDrawTarget::hidden());
        }
        Bars {
            multi,
            layers: Mutex::new(Vec::new()),
            quiet,
        }
    }

    fn bar(&self, index: usize) -> Option<ProgressBar> {
        self.layers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(index)
            .cloned()
    }

    fn clear(&self) {
        for bar in self.layers.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            bar.finish_and_clear();
        }
    }
}

fn short(digest: &str) -> &str {
    digest.get(..19).unwrap_or(digest)
}

impl PullProgress for Bars {
    fn resolved(&self, image: &ResolvedPull) {
        if !self.quiet {
            let _ = self.multi.println(format!(
                "{} -> {} ({} layers, {})",
                image.reference,
                image.manifest.digest,
                image.layers.len(),
                HumanBytes(image.size())
            ));
        }
        let style =
            ProgressStyle::with_template("  {prefix} {wide_msg} {bytes:>10}/{total_bytes:>10}")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
        let mut layers = self.layers.lock().unwrap_or_else(|p| p.into_inner());
        for layer in &image.layers {
            let bar = self.multi.add(ProgressBar::new(layer.size));
            bar.set_style(style.clone());
            bar.set_prefix(short(&layer.digest.to_string()).to_owned());
            bar.set_message("waiting");
            layers.push(bar);
        }
    }

    fn layer_started(&self, index: usize) {
        if let Some(bar) = self.bar(index) {
            bar.set_message("unpacking");
        }
    }

    fn layer_bytes(&self, index: usize, bytes: u64) {
        if let Some(bar) = self.bar(index) {
            if bar.position() == 0 {
                bar.set_message("downloading");
            }
            bar.inc(bytes);
        }
    }

    fn layer_done(&self, report: &LayerReport) {
        let detail = match report.outcome {
            LayerOutcome::Remote => {
                format!("{} not downloaded", HumanBytes(report.descriptor.size))
            }
            LayerOutcome::Applied { downloaded } if downloaded > 0 => format!(
                "{} in {:.1} s",
                HumanBytes(downloaded),
                report.elapsed.as_secs_f64()
            ),
            LayerOutcome::Applied { .. } => "blob already stored".to_owned(),
            LayerOutcome::Present => "chain already unpacked".to_owned(),
        };
        // The bar gives way to a permanent line.
        if let Some(bar) = self.bar(report.index) {
            bar.finish_and_clear();
        }
        if !self.quiet {
            let _ = self.multi.println(format!(
                "  {} {:<20} {detail}",
                short(&report.descriptor.digest.to_string()),
                report.outcome.describe(),
            ));
        }
    }
}
