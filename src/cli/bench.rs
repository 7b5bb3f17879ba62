//! `zest bench`: the cold-start benchmark.
//!
//! - `zest bench prepare` makes the images the lazy modes need from the
//!   benchmark's gzip images: `:chunked` by conversion, `:skopeo` by skopeo
//!   (zstd:chunked as the containers tools write it, never touched by zest),
//!   `:profile-<workload>` by `zest optimize` with the workload's command.
//! - `zest bench run` measures every workload × link profile × mode (see
//!   `zest_bench::runner`) and writes `results.json`, `results.md` and
//!   `results.svg`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};

use zest_bench::link::{parse_bandwidth, parse_rtt, LinkProfile};
use zest_bench::report;
use zest_bench::results::{BenchRun, ModeChoice, Sample};
use zest_bench::runner::{self, BenchPlan, NamedProfile, Progress};
use zest_bench::workload::{self, Workload};
use zest_daemon::ServiceConfig;
use zest_format::WriteOptions;
use zest_image::convert::{convert, ConvertOptions, NoProgress, PlatformChoice};
use zest_image::optimize::{optimize, OptimizeOptions};
use zest_oci::Platform;
use zest_registry::{PlainHttp, RegistryClient, RegistryConfig};
use zest_store::{ImageRef, ImageStore};

/// Arguments of `zest bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

/// `zest bench` subcommands.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Convert and optimize the benchmark's gzip images for the lazy modes.
    Prepare(PrepareArgs),
    /// Measure cold starts and write a markdown table and an SVG chart.
    Run(RunArgs),
}

/// Options shared by `prepare` and `run`.
#[derive(Debug, Args)]
pub struct Images {
    /// The registry holding the images (`host:port`, plain HTTP, loopback).
    #[arg(long, value_name = "HOST:PORT")]
    pub registry: String,

    /// Repository prefix of the images.
    #[arg(long, default_value = "zest-bench")]
    pub prefix: String,

    /// A TOML file of `[[workload]]` tables replacing the built-in workloads
    /// (python-print, python-imports, gcc, node, postgres).
    #[arg(long, value_name = "FILE")]
    pub workloads: Option<PathBuf>,

    /// Only these workloads (comma-separated names).
    #[arg(long, value_delimiter = ',', value_name = "NAME,...")]
    pub only: Vec<String>,
}

impl Images {
    fn workloads(&self) -> anyhow::Result<Vec<Workload>> {
        let all = match &self.workloads {
            Some(path) => workload::load(path)?,
            None => workload::builtin(),
        };
        if self.only.is_empty() {
            return Ok(all);
        }
        for name in &self.only {
            if !all.iter().any(|w| &w.name == name) {
                let known: Vec<&str> = all.iter().map(|w| w.name.as_str()).collect();
                bail!("no workload named {name:?}; known: {}", known.join(", "));
            }
        }
        Ok(all
            .into_iter()
            .filter(|w| self.only.contains(&w.name))
            .collect())
    }

    fn client(&self) -> anyhow::Result<RegistryClient> {
        RegistryClient::new(RegistryConfig {
            plain_http: PlainHttp::Hosts(vec![self.registry.clone()]),
            ..RegistryConfig::default()
        })
        .context("setting up the registry client")
    }
}

/// Arguments of `zest bench prepare`.
#[derive(Debug, Args)]
pub struct PrepareArgs {
    #[command(flatten)]
    pub images: Images,

    /// Rebuild images whose tags already exist.
    #[arg(long)]
    pub force: bool,

    /// Directory for temporary layer files (default: the system temp dir).
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,

    /// The skopeo that writes the third-party `:skopeo` images (zstd:chunked
    /// from the gzip ones); it must know `--dest-force-compress-format`
    /// (skopeo 1.14 and later).
    #[arg(long, value_name = "PATH", default_value = "skopeo")]
    pub skopeo: PathBuf,

    /// Do not make the third-party `:skopeo` images.
    #[arg(long)]
    pub no_skopeo: bool,
}

/// Arguments of `zest bench run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub images: Images,

    /// Link profiles (comma-separated): lan, region, wan.
    #[arg(long, value_delimiter = ',', default_value = "lan,region,wan")]
    pub profiles: Vec<String>,

    /// A custom link's round-trip time (with --bandwidth), measured instead of
    /// the named profiles.
    #[arg(long, value_parser = parse_rtt, requires = "bandwidth")]
    pub rtt: Option<Duration>,

    /// A custom link's bandwidth (e.g. 100mbit).
    #[arg(long, value_parser = parse_bandwidth, requires = "rtt")]
    pub bandwidth: Option<u64>,

    /// Modes (comma-separated): full, lazy, skopeo (the third-party image
    /// `prepare` wrote with skopeo, unprofiled), lazy+profile, learned (the
    /// skopeo image with the profile another fresh node learned and published
    /// beside it; the registry must accept pushes), warm.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "full,lazy,skopeo,lazy+profile,learned,warm"
    )]
    pub modes: Vec<ModeChoice>,

    /// Samples per workload, profile and mode.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub samples: u32,

    /// zest's configuration file for the measured daemon (default: defaults).
    #[arg(long, value_name = "FILE")]
    pub zest_config: Option<PathBuf>,

    /// Directory for the nodes' state (containerd and zest roots).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/zest-bench")]
    pub work_dir: PathBuf,

    /// Where to write results.json, results.md and results.svg.
    #[arg(long, value_name = "DIR", default_value = "bench-results")]
    pub out: PathBuf,

    /// Keep every sample's node logs (zest.log, containerd.log, and pull.log:
    /// the steps of a lazy sample's `zest pull` with their times) under
    /// `<work dir>/logs/<sample>/`, not only those of failed samples; with
    /// `--log` or `RUST_LOG` (e.g. `zest_fetch=debug`: every blocking miss) they
    /// show where a start waits.
    #[arg(long)]
    pub keep_logs: bool,

    /// Longest wait for a workload's ready line, in seconds.
    #[arg(long, default_value_t = 300)]
    pub run_timeout: u64,

    /// The command recorded in the results as the way to rerun them (default:
    /// this command line; wrapper scripts pass their own).
    #[arg(long, value_name = "TEXT")]
    pub command_line: Option<String>,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.command {
        BenchCommand::Prepare(args) => prepare(args).await,
        BenchCommand::Run(args) => run_bench(args).await,
    }
}

async fn tag_exists(client: &RegistryClient, image: &str) -> anyhow::Result<bool> {
    let reference: ImageRef = image.parse().with_context(|| format!("image {image:?}"))?;
    let store = ImageStore::open(&reference, client)?;
    Ok(store.root().await.is_ok())
}

async fn prepare(args: PrepareArgs) -> anyhow::Result<()> {
    let workloads = args.images.workloads()?;
    let client = args.images.client()?;
    let (registry, prefix) = (&args.images.registry, &args.images.prefix);
    let work_root = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let mut converted = Vec::new();
    for w in &workloads {
        let (src, dst) = (
            w.gzip_ref(registry, prefix),
            w.chunked_ref(registry, prefix),
        );
        if converted.contains(&dst) {
            continue;
        }
        converted.push(dst.clone());
        if !args.force && tag_exists(&client, &dst).await? {
            println!("{dst}: exists");
            continue;
        }
        let started = Instant::now();
        let work = tempfile::Builder::new()
            .prefix("zest-bench.")
            .tempdir_in(&work_root)
            .context("creating a temporary directory (see --work-dir)")?;
        let opts = ConvertOptions {
            platforms: PlatformChoice::One(Platform::host()),
            parallelism: std::thread::available_parallelism().map_or(2, |n| n.get()),
            write: WriteOptions::default(),
            work_dir: work.path().to_path_buf(),
        };
        let src_store = ImageStore::open(&src.parse()?, &client)?;
        let dst_store = ImageStore::create(&dst.parse()?, &client)?;
        let report = convert(&src_store, &dst_store, &opts, Arc::new(NoProgress))
            .await
            .with_context(|| format!("converting {src} to {dst}"))?;
        println!(
            "{dst}: converted from {src} ({} -> {}) in {:.1} s",
            HumanBytes(report.source_bytes()),
            HumanBytes(report.output_bytes()),
            started.elapsed().as_secs_f64()
        );
    }
    if !args.no_skopeo {
        let mut written = Vec::new();
        for w in &workloads {
            let (src, dst) = (
                w.gzip_ref(registry, prefix),
                w.third_party_ref(registry, prefix),
            );
            if written.contains(&dst) {
                continue;
            }
            written.push(dst.clone());
            if !args.force && tag_exists(&client, &dst).await? {
                println!("{dst}: exists");
                continue;
            }
            let started = Instant::now();
            skopeo_chunked(&args.skopeo, &src, &dst).await?;
            println!(
                "{dst}: written by {} from {src} in {:.1} s",
                args.skopeo.display(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    for w in &workloads {
        let (src, dst) = (
            w.chunked_ref(registry, prefix),
            w.profile_ref(registry, prefix),
        );
        if !args.force && tag_exists(&client, &dst).await? {
            println!("{dst}: exists");
            continue;
        }
        let started = Instant::now();
        let mut opts = OptimizeOptions::new(Platform::host(), work_root.clone());
        opts.command = Some(w.command.clone());
        opts.timeout = Duration::from_secs(w.profile_timeout_secs);
        opts.ready = Some(w.ready.clone());
        let src_store = ImageStore::open(&src.parse()?, &client)?;
        let dst_store = ImageStore::create(&dst.parse()?, &client)?;
        let report = optimize(&src_store, &dst_store, &opts)
            .await
            .with_context(|| format!("optimizing {src} for {} into {dst}", w.name))?;
        let files: usize = report.layers.iter().map(|l| l.recorded.len()).sum();
        let bytes: u64 = report.layers.iter().map(|l| l.prioritized_bytes).sum();
        println!(
            "{dst}: {files} files ({}) recorded for {:?} ({}), in {:.1} s",
            HumanBytes(bytes),
            w.command.join(" "),
            report.outcome,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Copies `src` to `dst` with skopeo, recompressing every layer as
/// zstd:chunked (both plain-HTTP references on the benchmark's registry).
async fn skopeo_chunked(skopeo: &std::path::Path, src: &str, dst: &str) -> anyhow::Result<()> {
    let output = tokio::process::Command::new(skopeo)
        .args([
            "--insecure-policy",
            "copy",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            "--dest-compress-format",
            "zstd:chunked",
            "--dest-force-compress-format",
        ])
        .arg(format!("docker://{src}"))
        .arg(format!("docker://{dst}"))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(900), output)
        .await
        .with_context(|| format!("skopeo copy of {src} to {dst} took over 15 minutes"))?
        .with_context(|| {
            format!(
                "running {} (install skopeo 1.14 or later, or pass --skopeo or --no-skopeo)",
                skopeo.display()
            )
        })?;
    if !output.status.success() {
        bail!(
            "skopeo copy of {src} to {dst} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// The command line as typed, shell-quoted where needed, for rerunning.
fn command_line() -> String {
    let quote = |s: &str| {
        if !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
        {
            s.to_string()
        } else {
            format!("'{}'", s.replace('\'', r"'\''"))
        }
    };
    std::iter::once("zest".to_string())
        .chain(std::env::args().skip(1).map(|a| quote(&a)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn profiles(args: &RunArgs) -> anyhow::Result<Vec<NamedProfile>> {
    if let (Some(rtt), Some(bw)) = (args.rtt, args.bandwidth) {
        return Ok(vec![NamedProfile {
            name: "custom".into(),
            link: LinkProfile {
                rtt,
                bandwidth_bps: Some(bw),
            },
        }]);
    }
    args.profiles
        .iter()
        .map(|name| {
            let link: LinkProfile = name
                .parse()
                .map_err(|e| anyhow::anyhow!("profile {name:?}: {e}"))?;
            Ok(NamedProfile {
                name: name.clone(),
                link,
            })
        })
        .collect()
}

struct Bar(ProgressBar);

impl Progress for Bar {
    fn start(&self, samples: u64) {
        self.0.set_length(samples);
        self.0.set_position(0);
    }
    fn status(&self, what: &str) {
        self.0.set_message(what.to_string());
    }
    fn sample(&self, s: &Sample) {
        self.0.inc(1);
        let line = format!(
            "{:<16} {:<7} {:<17} #{}: pull {:>6.2} s  run {:>6.2} s  total {:>6.2} s  {:>10}  {:>5} requests  {:>4} misses",
            s.workload,
            s.profile,
            s.mode.label(),
            s.index,
            s.pull.as_secs_f64(),
            s.run.as_secs_f64(),
            s.total().as_secs_f64(),
            HumanBytes(s.fetched_bytes).to_string(),
            s.requests,
            s.blocking_misses,
        );
        // A hidden bar (output not a terminal) drops println: logs still get a line.
        if self.0.is_hidden() {
            eprintln!("{line}");
        } else {
            self.0.println(line);
        }
    }
}

fn write_results(out: &std::path::Path, run: &BenchRun) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let write = |name: &str, text: String| {
        let path = out.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write("results.json", serde_json::to_string_pretty(run)?)?;
    write("results.md", report::markdown(run))?;
    write("results.svg", report::svg(run))?;
    Ok(())
}

async fn run_bench(args: RunArgs) -> anyhow::Result<()> {
    let workloads = args.images.workloads()?;
    let client = args.images.client()?;
    let zest_config = match &args.zest_config {
        Some(path) => ServiceConfig::load(path)?,
        None => ServiceConfig::default(),
    };
    let plan = BenchPlan {
        registry: args.images.registry.clone(),
        prefix: args.images.prefix.clone(),
        workloads,
        profiles: profiles(&args)?,
        modes: args.modes.clone(),
        samples: args.samples,
        work_dir: args.work_dir.clone(),
        keep_logs: args.keep_logs,
        zest_binary: std::env::current_exe().context("finding zest's own binary")?,
        zest_config,
        run_timeout: Duration::from_secs(args.run_timeout.max(1)),
        command_line: args.command_line.clone().unwrap_or_else(command_line),
    };
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} samples, {elapsed} elapsed, ~{eta} left  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let progress = Bar(bar);
    let result = runner::run(&plan, &client, &progress).await;
    progress.0.finish_and_clear();
    let (run, error) = match result {
        Ok(run) => (run, None),
        Err((run, e)) => (run, Some(e)),
    };
    write_results(&args.out, &run)?;
    println!("{}", report::markdown(&run));
    println!(
        "results: {0}/results.md, {0}/results.svg, {0}/results.json",
        args.out.display()
    );
    println!("rerun: {}", run.info.command);
    if let Some(e) = error {
        return Err(anyhow::Error::new(e).context(format!(
            "the benchmark stopped after {} samples (kept in {})",
            run.samples.len(),
            args.out.display()
        )));
    }
    Ok(())
}
