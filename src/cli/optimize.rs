//! `zest optimize SRC DST [-- CMD...]`: record which files an image's startup
//! reads and republish it with those files first in each layer, prefetched at mount.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use indicatif::HumanBytes;

use zest_format::WriteOptions;
use zest_image::optimize::{optimize, OptimizeOptions};
use zest_oci::Platform;
use zest_store::{ImageRef, ImageStore};

use super::registry_args::RegistryArgs;

/// Arguments of `zest optimize`.
#[derive(Debug, Args)]
pub struct OptimizeArgs {
    /// Source image (zstd:chunked): a registry reference or `oci:DIR[:TAG]`.
    pub source: String,
    /// Destination: a registry reference or `oci:DIR[:TAG]`.
    pub destination: String,

    /// The startup command to profile (default: the image's Entrypoint and Cmd).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,

    /// Seconds the command may run before its process group is killed (a server
    /// that never exits is profiled up to this point).
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub timeout: u64,

    /// Stop the command once a line of its output contains this text (the
    /// start-up is over: a server printed that it is ready).
    #[arg(long, value_name = "TEXT")]
    pub ready: Option<String>,

    /// Platform when the source is a multi-platform index (default: this host's).
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    pub platform: Option<Platform>,

    /// zstd compression level of the rewritten layers.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub level: i32,

    /// Directory for temporary layer files and mountpoints (default: the system temp dir).
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,

    #[command(flatten)]
    pub registry: RegistryArgs,
}

pub async fn run(args: OptimizeArgs) -> anyhow::Result<()> {
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
    let work_dir = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let mut opts = OptimizeOptions::new(
        args.platform.clone().unwrap_or_else(Platform::host),
        work_dir,
    );
    opts.timeout = Duration::from_secs(args.timeout.max(1));
    opts.ready = args.ready.clone().filter(|r| !r.is_empty());
    opts.command = (!args.command.is_empty()).then(|| args.command.clone());
    opts.write = WriteOptions {
        level: args.level,
        ..WriteOptions::default()
    };

    let started = Instant::now();
    let report = optimize(&src, &dst, &opts)
        .await
        .with_context(|| format!("optimizing {src_ref} into {dst_ref}"))?;
    println!(
        "profiled {:?}: {} after {:.1} s",
        report.command.join(" "),
        report.outcome,
        report.run_time.as_secs_f64()
    );
    for (i, l) in report.layers.iter().enumerate() {
        match &l.prefetch_extent {
            _ if l.recorded.is_empty() => println!("  layer {i}: no files read; kept as is"),
            Some(extent) => println!(
                "  layer {i}: {} files recorded ({}), prefetch extent {} of {} blob",
                l.recorded.len(),
                HumanBytes(l.prioritized_bytes),
                HumanBytes(extent.end - extent.start),
                HumanBytes(l.output.size),
            ),
            None => println!(
                "  layer {i}: {} files recorded (all empty), no prefetch extent",
                l.recorded.len()
            ),
        }
    }
    println!(
        "{dst_ref}: {} in {:.1} s",
        report.root.digest,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
