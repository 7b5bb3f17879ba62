//! `zest convert SRC DST`: rewrite an image's layers as zstd:chunked and push it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

use zest_format::WriteOptions;
use zest_image::convert::{
    convert, ConvertOptions, ConvertProgress, LayerAction, LayerReport, PlatformChoice,
};
use zest_oci::Platform;
use zest_store::{ImageRef, ImageStore};

use super::registry_args::RegistryArgs;

/// Arguments of `zest convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Source image: a registry reference or `oci:DIR[:TAG]`.
    pub source: String,
    /// Destination: a registry reference or `oci:DIR[:TAG]`.
    pub destination: String,

    /// Platform to convert when the source is a multi-platform index (default: this host's).
    #[arg(
        long,
        value_name = "OS/ARCH[/VARIANT]",
        conflicts_with = "all_platforms"
    )]
    pub platform: Option<Platform>,

    /// Convert every platform of an index and push a new index.
    #[arg(long)]
    pub all_platforms: bool,

    /// Layers converted in parallel (default: the number of CPUs).
    #[arg(long, short = 'j')]
    pub jobs: Option<usize>,

    /// zstd compression level.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub level: i32,

    /// Average content-defined chunk size in KiB (min is a quarter, max four times).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(4..=4096))]
    pub chunk_kib: u32,

    /// Directory for temporary layer files (default: the system temp dir).
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,

    /// Print no progress bar.
    #[arg(long, short)]
    pub quiet: bool,

    #[command(flatten)]
    pub registry: RegistryArgs,
}

pub async fn run(args: ConvertArgs) -> anyhow::Result<()> {
    let client = args.registry.client()?;
    let src_ref: ImageRef = args
        .source
        .parse()
        .with_context(|| format!("source {:?}", args.source))?;
    let dst_ref: ImageRef = args
        .destination
        .parse()
        .with_context(|| format!("destination {:?}", args.destination))?;
    let src = ImageStore::open(&src_ref, &client).with_context(|| format!("opening {src_ref}"))?;
    let dst =
        ImageStore::create(&dst_ref, &client).with_context(|| format!("opening {dst_ref}"))?;

    let work = tempfile::Builder::new()
        .prefix("zest-convert.")
        .tempdir_in(args.work_dir.clone().unwrap_or_else(std::env::temp_dir))
        .context("creating a temporary directory for layer files (see --work-dir)")?;
    let avg = args.chunk_kib << 10;
    let opts = ConvertOptions {
        platforms: if args.all_platforms {
            PlatformChoice::All
        } else {
            PlatformChoice::One(args.platform.clone().unwrap_or_else(Platform::host))
        },
        parallelism: args
            .jobs
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
        write: WriteOptions {
            level: args.level,
            min_chunk: (avg / 4).max(1024),
            avg_chunk: avg,
            max_chunk: avg * 4,
            ..WriteOptions::default()
        },
        work_dir: work.path().to_path_buf(),
    };

    let bar = Bar::new(args.quiet);
    let started = Instant::now();
    let report = convert(&src, &dst, &opts, bar.clone())
        .await
        .with_context(|| format!("converting {src_ref} to {dst_ref}"))?;
    bar.0.finish_and_clear();

    let secs = started.elapsed().as_secs_f64();
    let converted = report
        .layers
        .iter()
        .filter(|l| l.action == LayerAction::Converted)
        .count();
    println!(
        "{dst_ref}: {} ({} manifest{}, {} layer{}: {converted} converted, {} kept)",
        report.root.digest,
        report.manifests,
        plural(report.manifests),
        report.layers.len(),
        plural(report.layers.len()),
        report.layers.len() - converted,
    );
    println!(
        "size: {} -> {} ({:+.1}%), {:.1} s, {}/s",
        HumanBytes(report.source_bytes()),
        HumanBytes(report.output_bytes()),
        percent_change(report.source_bytes(), report.output_bytes()),
        secs,
        HumanBytes((report.source_bytes() as f64 / secs.max(1e-3)) as u64),
    );
    Ok(())
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn percent_change(before: u64, after: u64) -> f64 {
    if before == 0 {
        0.0
    } else {
        (after as f64 - before as f64) * 100.0 / before as f64
    }
}

/// A progress bar over the source bytes consumed, with a line per finished layer.
#[derive(Clone)]
struct Bar(ProgressBar);

impl Bar {
    fn new(quiet: bool) -> Arc<Self> {
        let bar = if quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(0)
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} converting [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        Arc::new(Bar(bar))
    }
}

impl ConvertProgress for Bar {
    fn set_total(&self, bytes: u64) {
        self.0.set_length(bytes);
    }
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
    fn layer_done(&self, layer: &LayerReport) {
        let what = match layer.action {
            LayerAction::Converted => format!(
                "converted: {} entries, {} chunks",
                layer.entries, layer.chunks
            ),
            LayerAction::Kept => "already zstd:chunked, kept".to_string(),
        };
        self.0.println(format!(
            "  {} {} -> {} {} ({what})",
            short(&layer.source.digest.to_string()),
            HumanBytes(layer.source.size),
            short(&layer.output.digest.to_string()),
            HumanBytes(layer.output.size),
        ));
    }
}

fn short(digest: &str) -> &str {
    digest.get(..19).unwrap_or(digest)
}
