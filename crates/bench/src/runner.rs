//! The cold-start benchmark runner behind `zest bench run`.
//!
//! For each link profile a [`LinkEmulator`] is put in front of the registry;
//! for each workload and sample, each cold mode starts from a clean node: a
//! private containerd and a private `zest serve`, with empty roots, started for
//! that sample and removed after it. The sample pulls the image through the
//! link (containerd's own `ctr images pull` for `full`, `zest pull` for the lazy
//! modes), then times `ctr run` until the workload prints its ready line. A warm
//! run of the same container image follows when asked for.
//!
//! Invariants:
//! - Every mode goes through the same link, and bytes and requests are counted
//!   there, so modes are comparable.
//! - Modes are interleaved within each sample number (full, lazy, lazy+profile,
//!   full, ...), so drift of a shared machine spreads over all of them.
//! - Every process started for a node is stopped, every mount below the node's
//!   directory is detached and the directory removed, also on errors.
//! - Every wait is bounded.

use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::link::{CountersHandle, LinkConfig, LinkEmulator, LinkError, LinkProfile};
use crate::results::{BenchRun, Mode, ModeChoice, ProfileInfo, RunInfo, Sample, WorkloadInfo};
use crate::workload::Workload;
use zest_daemon::ServiceConfig;
use zest_fetch::toc::{fetch_layer_index, TocFetchOptions};
use zest_mount::remove_tree;
use zest_oci::Platform;
use zest_registry::RegistryClient;
use zest_store::{ImageRef, ImageStore, StoreError};

/// containerd namespace the benchmark's images and containers live in.
pub const NAMESPACE: &str = "zest-bench";

/// Round trips before data flows in a lazy start: connection, manifest,
/// config, the tables of contents (all layers at once).
pub const SETUP_ROUND_TRIPS: u32 = 4;

/// A link profile with its name.
#[derive(Clone, Debug)]
pub struct NamedProfile {
    /// Name shown in reports (`lan`, `region`, `wan`, or `custom`).
    pub name: String,
    /// Latency and bandwidth.
    pub link: LinkProfile,
}

/// What to measure and with which programs.
#[derive(Clone, Debug)]
pub struct BenchPlan {
    /// The registry holding the images, `host:port`, plain HTTP.
    pub registry: String,
    /// Repository prefix of the images (see [`Workload`]).
    pub prefix: String,
    /// Workloads, measured in this order.
    pub workloads: Vec<Workload>,
    /// Link profiles, measured in this order.
    pub profiles: Vec<NamedProfile>,
    /// Modes to measure.
    pub modes: Vec<ModeChoice>,
    /// Samples per (workload, profile, mode).
    pub samples: u32,
    /// Directory for the nodes' state (emptied per sample).
    pub work_dir: PathBuf,
    /// Keep every sample's node logs under `<work_dir>/logs/`.
    pub keep_logs: bool,
    /// The `zest` binary (`zest serve`, `zest pull`).
    pub zest_binary: PathBuf,
    /// zest's configuration; socket, state dir, metrics and registry access are
    /// set per node.
    pub zest_config: ServiceConfig,
    /// Longest wait for a workload's ready line.
    pub run_timeout: Duration,
    /// The command line that started the run (recorded in the results).
    pub command_line: String,
}

/// A benchmark failure.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A program could not be started.
    #[error("cannot start {program}: {source} (is it installed? scripts/install-deps installs containerd, runc and ctr)")]
    Spawn {
        /// The program.
        program: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A command exited with an error.
    #[error("{what} failed ({status}); its last output:\n{output}")]
    Command {
        /// What was run.
        what: String,
        /// Exit status.
        status: String,
        /// The end of its output.
        output: String,
    },
    /// The workload ended, or timed out, without printing its ready line.
    #[error(
        "workload {workload} ({mode}) {how} without printing {ready:?}; its last output:\n{output}"
    )]
    NotReady {
        /// Workload name.
        workload: String,
        /// Mode.
        mode: Mode,
        /// "exited" or "timed out after ...".
        how: String,
        /// The ready line looked for.
        ready: String,
        /// The end of its output.
        output: String,
    },
    /// Something did not come up in time.
    #[error("timed out after {after:?} waiting for {what}; see the logs in {dir}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long.
        after: Duration,
        /// The node directory with the logs.
        dir: String,
    },
    /// A benchmark image cannot be read.
    #[error("benchmark image {image}: {source}; build and push the images first (scripts/bench does both)")]
    Image {
        /// The image reference.
        image: String,
        /// The cause.
        source: Box<StoreError>,
    },
    /// A benchmark image's table of contents cannot be read.
    #[error("benchmark image {image}: {detail}")]
    ImageContent {
        /// The image reference.
        image: String,
        /// What is wrong.
        detail: String,
    },
    /// The link emulator failed.
    #[error("link emulator: {0}")]
    Link(#[from] LinkError),
    /// Local file work failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Io { what, source }
}

/// Hears about the run's progress (the CLI draws a progress bar).
pub trait Progress: Send + Sync {
    /// The run will take `samples` measured starts.
    fn start(&self, _samples: u64) {}
    /// What is happening now.
    fn status(&self, _what: &str) {}
    /// A sample was measured.
    fn sample(&self, _sample: &Sample) {}
}

/// No progress reporting.
#[derive(Debug, Default)]
pub struct Quiet;
impl Progress for Quiet {}

impl BenchPlan {
    fn cold_modes(&self) -> Vec<Mode> {
        let mut modes = Vec::new();
        let has = |c| self.modes.contains(&c);
        if has(ModeChoice::Full) {
            modes.push(Mode::Full);
        }
        if has(ModeChoice::Lazy) {
            modes.push(Mode::Lazy);
        }
        if has(ModeChoice::LazyProfile) {
            modes.push(Mode::LazyProfile);
        }
        if has(ModeChoice::ThirdParty) {
            modes.push(Mode::ThirdParty);
        }
        if has(ModeChoice::Learned) {
            modes.push(Mode::Learned);
        }
        modes
    }

    /// The warm mode measured right after a cold sample of `mode`, if any: the
    /// zest warm run follows the first zest mode measured, in the order `lazy`,
    /// `lazy (skopeo)`, `lazy+profile`.
    fn warm_after(&self, mode: Mode) -> Option<Mode> {
        if !self.modes.contains(&ModeChoice::Warm) {
            return None;
        }
        if mode == Mode::Full {
            return Some(Mode::WarmFull);
        }
        let cold = self.cold_modes();
        let first_zest = [Mode::Lazy, Mode::ThirdParty, Mode::LazyProfile]
            .into_iter()
            .find(|m| cold.contains(m));
        (first_zest == Some(mode)).then_some(Mode::WarmLazy)
    }

    /// Measured starts in the whole run.
    pub fn sample_count(&self) -> u64 {
        let cold = self.cold_modes();
        let per = cold.len()
            + cold
                .iter()
                .filter(|m| self.warm_after(**m).is_some())
                .count();
        per as u64
            * u64::from(self.samples)
            * self.workloads.len() as u64
            * self.profiles.len() as u64
    }

    fn image_for(&self, w: &Workload, mode: Mode, registry: &str) -> String {
        match mode {
            Mode::Full | Mode::WarmFull => w.gzip_ref(registry, &self.prefix),
            Mode::Lazy | Mode::WarmLazy => w.chunked_ref(registry, &self.prefix),
            Mode::LazyProfile => w.profile_ref(registry, &self.prefix),
            Mode::ThirdParty | Mode::Learned => w.third_party_ref(registry, &self.prefix),
        }
    }
}

/// Runs the whole plan. Samples measured before an error are returned with it
/// so that a long run is not lost to one failure.
pub async fn run(
    plan: &BenchPlan,
    client: &RegistryClient,
    progress: &dyn Progress,
) -> Result<BenchRun, (BenchRun, BenchError)> {
    let node_filesystem = filesystem_description(&plan.work_dir);
    if node_filesystem == JOURNAL_LESS_EXT4 {
        tracing::warn!(
            work_dir = %plan.work_dir.display(),
            "the nodes' state is on ext4 without a journal: file creation there slows \
             after the previous sample's node is removed, unevenly between modes; use a \
             work directory on a journaled filesystem (scripts/bench mounts one)"
        );
    }
    let mut out = BenchRun {
        info: RunInfo {
            command: plan.command_line.clone(),
            machine: machine_description(),
            zest_version: env!("CARGO_PKG_VERSION").to_string(),
            build: build_description(),
            load_start: load_average(),
            load_end: String::new(),
            node_filesystem,
            started: chrono::Local::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            profiles: plan
                .profiles
                .iter()
                .map(|p| ProfileInfo {
                    name: p.name.clone(),
                    rtt: p.link.rtt,
                    bandwidth_bps: p.link.bandwidth_bps,
                })
                .collect(),
            workloads: Vec::new(),
        },
        samples: Vec::new(),
    };
    progress.status("reading the benchmark images");
    let result = run_plan(plan, client, progress, &mut out).await;
    out.info.load_end = load_average();
    match result {
        Ok(()) => Ok(out),
        Err(e) => Err((out, e)),
    }
}

async fn run_plan(
    plan: &BenchPlan,
    client: &RegistryClient,
    progress: &dyn Progress,
    out: &mut BenchRun,
) -> Result<(), BenchError> {
    for w in &plan.workloads {
        let info = describe_workload(plan, client, w).await?;
        out.info.workloads.push(info);
    }
    progress.start(plan.sample_count());
    for profile in &plan.profiles {
        run_profile(plan, profile, progress, out).await?;
    }
    Ok(())
}

async fn run_profile(
    plan: &BenchPlan,
    profile: &NamedProfile,
    progress: &dyn Progress,
    out: &mut BenchRun,
) -> Result<(), BenchError> {
    let listen: SocketAddr = ([127, 0, 0, 1], 0).into();
    let link =
        LinkEmulator::bind(LinkConfig::new(listen, plan.registry.clone(), profile.link)).await?;
    let link_addr = link.local_addr();
    let counters = link.counters();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let link_task = tokio::spawn(link.run(async {
        let _ = stop_rx.await;
    }));
    let result = async {
        for w in &plan.workloads {
            for index in 0..plan.samples {
                for mode in plan.cold_modes() {
                    progress.status(&format!(
                        "{} at {}: {mode}, sample {}/{}",
                        w.name,
                        profile.name,
                        index + 1,
                        plan.samples
                    ));
                    let samples =
                        measure(plan, w, profile, mode, index, link_addr, &counters).await?;
                    for s in samples {
                        progress.sample(&s);
                        out.samples.push(s);
                    }
                }
            }
        }
        Ok(())
    }
    .await;
    let _ = stop_tx.send(());
    match tokio::time::timeout(Duration::from_secs(10), link_task).await {
        Ok(Ok(Err(e))) if result.is_ok() => return Err(e.into()),
        _ => {}
    }
    result
}

/// One cold sample (and the warm one after it) on a fresh node.
async fn measure(
    plan: &BenchPlan,
    w: &Workload,
    profile: &NamedProfile,
    mode: Mode,
    index: u32,
    link: SocketAddr,
    counters: &CountersHandle,
) -> Result<Vec<Sample>, BenchError> {
    let registry = link.to_string();
    let image = plan.image_for(w, mode, &registry);
    if mode == Mode::Learned {
        teach(plan, w, index, link, &image).await?;
    }
    let node = Node::start(
        plan,
        &plan.work_dir.join("node"),
        link,
        Role::for_mode(mode),
    )
    .await?;
    let result = async {
        let mut samples = Vec::new();

        let before = Reading::take(&node, counters, mode).await;
        let started = Instant::now();
        node.pull(mode, &image, &registry, plan.keep_logs).await?;
        let pull = started.elapsed();
        let run = node
            .run_to_ready(plan, w, mode, &image, &format!("{}-{index}", w.name))
            .await?;
        let after = Reading::take(&node, counters, mode).await;
        samples.push(after.sample_since(&before, w, profile, mode, index, pull, run));

        if let Some(warm) = plan.warm_after(mode) {
            let before = after;
            let run = node
                .run_to_ready(plan, w, warm, &image, &format!("{}-{index}-warm", w.name))
                .await?;
            let after = Reading::take(&node, counters, warm).await;
            samples.push(after.sample_since(&before, w, profile, warm, index, Duration::ZERO, run));
        }
        Ok(samples)
    }
    .await;
    let label = format!("{}-{}-{mode}-{index}", w.name, profile.name);
    if result.is_err() {
        node.keep_logs(plan, "failed", &label);
    } else if plan.keep_logs {
        node.keep_logs(plan, "logs", &label);
    }
    node.stop().await;
    result
}

/// How long a teaching node records first reads after the image's first mount.
const TEACH_WINDOW: Duration = Duration::from_secs(10);

/// What a node does with learned start-up profiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Neither looks for profiles nor publishes one: every measured mode but
    /// [`Mode::Learned`] starts as a node that has never heard of the image.
    Unaware,
    /// Looks for a published profile and prefetches it ([`Mode::Learned`]).
    Learner,
    /// Records its own first start and publishes the profile (unmeasured).
    Teacher,
}

impl Role {
    fn for_mode(mode: Mode) -> Role {
        if mode == Mode::Learned {
            Role::Learner
        } else {
            Role::Unaware
        }
    }

    fn configure(self, profiles: &mut zest_daemon::ProfilesSection) {
        profiles.fetch = self == Role::Learner;
        profiles.record = self == Role::Teacher;
        profiles.publish = self == Role::Teacher;
        if self == Role::Teacher {
            profiles.window_secs = TEACH_WINDOW.as_secs();
        }
    }
}

/// The unmeasured first start of [`Mode::Learned`]: a fresh node starts the
/// workload once and publishes the profile of that start beside `image`.
async fn teach(
    plan: &BenchPlan,
    w: &Workload,
    index: u32,
    link: SocketAddr,
    image: &str,
) -> Result<(), BenchError> {
    let node = Node::start(plan, &plan.work_dir.join("teacher"), link, Role::Teacher).await?;
    let result = async {
        let before = node.metric("zest_profiles_published_total").await;
        node.pull(Mode::ThirdParty, image, &link.to_string(), plan.keep_logs)
            .await?;
        node.run_to_ready(
            plan,
            w,
            Mode::ThirdParty,
            image,
            &format!("{}-{index}-teach", w.name),
        )
        .await?;
        // Published when the recording window closes.
        let deadline = Instant::now() + TEACH_WINDOW + Duration::from_secs(60);
        while node.metric("zest_profiles_published_total").await <= before {
            if Instant::now() >= deadline {
                return Err(BenchError::ImageContent {
                    image: image.to_string(),
                    detail: format!(
                        "no start-up profile was published within {} s of the teaching \
                         start (see {})",
                        (TEACH_WINDOW + Duration::from_secs(60)).as_secs(),
                        node.dir.join("zest.log").display()
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }
    .await;
    if result.is_err() {
        node.keep_logs(plan, "failed", &format!("{}-teach-{index}", w.name));
    }
    node.stop().await;
    result
}

/// Counters read before and after a sample.
struct Reading {
    link_bytes: u64,
    link_requests: u64,
    blocking_misses: u64,
    cpu: Duration,
}

impl Reading {
    async fn take(node: &Node, counters: &CountersHandle, mode: Mode) -> Reading {
        let link = counters.snapshot();
        let zest_mode = !matches!(mode, Mode::Full | Mode::WarmFull);
        let blocking_misses = if zest_mode {
            node.metric("zest_fetch_blocking_misses_total").await
        } else {
            0
        };
        let pid = if zest_mode {
            node.zest.id()
        } else {
            node.containerd.id()
        };
        Reading {
            link_bytes: link.bytes_down,
            link_requests: link.requests,
            blocking_misses,
            cpu: pid.map(process_cpu).unwrap_or_default(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn sample_since(
        &self,
        before: &Reading,
        w: &Workload,
        profile: &NamedProfile,
        mode: Mode,
        index: u32,
        pull: Duration,
        run: Duration,
    ) -> Sample {
        Sample {
            workload: w.name.clone(),
            profile: profile.name.clone(),
            mode,
            index,
            pull,
            run,
            fetched_bytes: self.link_bytes.saturating_sub(before.link_bytes),
            requests: self.link_requests.saturating_sub(before.link_requests),
            blocking_misses: self.blocking_misses.saturating_sub(before.blocking_misses),
            snapshotter_cpu: self.cpu.saturating_sub(before.cpu),
        }
    }
}

/// Sizes and working set of a workload's images, read from the registry
/// directly (not through the link).
async fn describe_workload(
    plan: &BenchPlan,
    client: &RegistryClient,
    w: &Workload,
) -> Result<WorkloadInfo, BenchError> {
    let modes = plan.cold_modes();
    let gzip_bytes = if modes.contains(&Mode::Full) {
        image_size(client, &w.gzip_ref(&plan.registry, &plan.prefix)).await?
    } else {
        0
    };
    let chunked_bytes = image_size(client, &w.chunked_ref(&plan.registry, &plan.prefix)).await?;
    let working_set_bytes = if modes.contains(&Mode::LazyProfile) {
        Some(working_set(client, &w.profile_ref(&plan.registry, &plan.prefix)).await?)
    } else {
        None
    };
    let (third_party_bytes, third_party_format) = if modes.contains(&Mode::ThirdParty) {
        let image = w.third_party_ref(&plan.registry, &plan.prefix);
        let (_, resolved) = open_image(client, &image).await?;
        let layers = &resolved.manifest.layers;
        let format = layers_format(layers.iter().map(|l| &l.annotations));
        (layers.iter().map(|l| l.size).sum(), Some(format))
    } else {
        (0, None)
    };
    Ok(WorkloadInfo {
        name: w.name.clone(),
        command: w.command.clone(),
        ready: w.ready.clone(),
        gzip_bytes,
        chunked_bytes,
        third_party_bytes,
        third_party_format,
        working_set_bytes,
        setup_round_trips: SETUP_ROUND_TRIPS,
    })
}

/// What a third-party image's layers are, from their annotations: which
/// zstd:chunked generation its writer produced (one phrase per distinct kind).
fn layers_format<'a>(
    layers: impl Iterator<Item = &'a std::collections::BTreeMap<String, String>>,
) -> String {
    use zest_format::annotations::{MANIFEST_POSITION, OLD_MANIFEST_POSITION, TARSPLIT_POSITION};
    let mut kinds: Vec<&str> = Vec::new();
    for a in layers {
        let kind = if a.contains_key(MANIFEST_POSITION) && a.contains_key(TARSPLIT_POSITION) {
            "zstd:chunked, new generation (tar-split)"
        } else if a.contains_key(MANIFEST_POSITION) || a.contains_key(OLD_MANIFEST_POSITION) {
            "zstd:chunked, old generation"
        } else {
            "not zstd:chunked"
        };
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    kinds.join("; ")
}

async fn open_image(
    client: &RegistryClient,
    image: &str,
) -> Result<(ImageStore, zest_store::ResolvedManifest), BenchError> {
    let image_err = |source| BenchError::Image {
        image: image.to_string(),
        source: Box::new(source),
    };
    let reference: ImageRef = image.parse().map_err(|e| BenchError::ImageContent {
        image: image.to_string(),
        detail: format!("not a valid reference: {e}"),
    })?;
    let store = ImageStore::open(&reference, client).map_err(image_err)?;
    let resolved = store.resolve(&Platform::host()).await.map_err(image_err)?;
    Ok((store, resolved))
}

async fn image_size(client: &RegistryClient, image: &str) -> Result<u64, BenchError> {
    let (_, resolved) = open_image(client, image).await?;
    Ok(resolved.manifest.layers.iter().map(|l| l.size).sum())
}

/// The compressed start-up working set of an optimized image: the sum of its
/// layers' prefetch extents.
async fn working_set(client: &RegistryClient, image: &str) -> Result<u64, BenchError> {
    let (store, resolved) = open_image(client, image).await?;
    let mut total = 0;
    for layer in &resolved.manifest.layers {
        let source = store
            .layer_source(layer)
            .map_err(|source| BenchError::Image {
                image: image.to_string(),
                source: Box::new(source),
            })?;
        let fetched = fetch_layer_index(
            source.as_ref(),
            layer.size,
            &layer.annotations,
            &TocFetchOptions::default(),
        )
        .await
        .map_err(|e| BenchError::ImageContent {
            image: image.to_string(),
            detail: format!("layer {}: {e}", layer.digest),
        })?;
        total += fetched
            .index
            .prefetch_extent()
            .map_or(0, |r| r.end.saturating_sub(r.start));
    }
    Ok(total)
}

/// A private containerd and `zest serve`, with their state under one directory.
struct Node {
    dir: PathBuf,
    containerd_socket: PathBuf,
    metrics: SocketAddr,
    containerd: Child,
    zest: Child,
}

/// How long daemons get to come up and to stop.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

impl Node {
    async fn start(
        plan: &BenchPlan,
        dir: &Path,
        link: SocketAddr,
        role: Role,
    ) -> Result<Node, BenchError> {
        clean_dir(dir);
        std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let metrics = free_port()?;

        let mut config = plan.zest_config.clone();
        config.snapshotter.socket = dir.join("zest.sock");
        config.snapshotter.state_dir = dir.join("zest");
        config.snapshotter.metrics_address = Some(metrics);
        config.cache.dir = None;
        let cd = dir.join("containerd");
        config.lazy.containerd_content_dir = cd.join("root/io.containerd.content.v1.content");
        role.configure(&mut config.profiles);
        let link_host = link.to_string();
        if !config.registry.plain_http_hosts.contains(&link_host) {
            config.registry.plain_http_hosts.push(link_host.clone());
        }
        let zest_toml = dir.join("zest.toml");
        let text = toml::to_string(&config).map_err(|e| BenchError::Io {
            what: "writing zest's configuration".into(),
            source: std::io::Error::other(e),
        })?;
        std::fs::write(&zest_toml, text).map_err(io_err("writing zest's configuration"))?;
        let zest = spawn_logged(
            Command::new(&plan.zest_binary)
                .arg("serve")
                .arg("--config")
                .arg(&zest_toml),
            &dir.join("zest.log"),
        )?;
        // containerd connects to its proxy snapshotter when it starts, and a
        // refused connection makes it fail requests for a second or so (gRPC
        // backoff): start it once zest accepts connections, as systemd's
        // ordering of the two services does on a node.
        let deadline = Instant::now() + START_TIMEOUT;
        while tokio::net::UnixStream::connect(&config.snapshotter.socket)
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                // Dropping the child kills it.
                return Err(BenchError::Timeout {
                    what: "zest serve's socket".into(),
                    after: START_TIMEOUT,
                    dir: dir.display().to_string(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let containerd_socket = dir.join("containerd.sock");
        let containerd_toml = dir.join("containerd.toml");
        let text = format!(
            "version = 2\nroot = {root:?}\nstate = {state:?}\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = {sock:?}\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = {opt:?}\n\
             [proxy_plugins]\n  [proxy_plugins.zest]\n    type = \"snapshot\"\n    address = {zsock:?}\n",
            root = cd.join("root"),
            state = cd.join("state"),
            sock = containerd_socket,
            opt = cd.join("opt"),
            zsock = config.snapshotter.socket,
        );
        std::fs::write(&containerd_toml, text)
            .map_err(io_err("writing containerd's configuration"))?;
        let containerd = spawn_logged(
            Command::new("containerd")
                .arg("--config")
                .arg(&containerd_toml),
            &dir.join("containerd.log"),
        )?;
        let node = Node {
            dir: dir.to_path_buf(),
            containerd_socket,
            metrics,
            containerd,
            zest,
        };
        if let Err(e) = node.wait_ready().await {
            node.stop().await;
            return Err(e);
        }
        Ok(node)
    }

    /// Waits until containerd answers (zest already does).
    async fn wait_ready(&self) -> Result<(), BenchError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let ok = self
                .ctr()
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(BenchError::Timeout {
                    what: "containerd".into(),
                    after: START_TIMEOUT,
                    dir: self.dir.display().to_string(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.containerd_socket)
            .arg("--namespace")
            .arg(NAMESPACE)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Pulls `image` the way `mode` does. With `log`, a `zest pull` logs its
    /// steps with their times to `pull.log` in the node's directory (kept with
    /// the node's other logs).
    async fn pull(
        &self,
        mode: Mode,
        image: &str,
        registry: &str,
        log: bool,
    ) -> Result<(), BenchError> {
        let mut cmd = if mode == Mode::Full {
            let mut cmd = self.ctr();
            cmd.args(["images", "pull", "--plain-http", image]);
            cmd
        } else {
            let mut cmd = Command::new(self.zest_binary());
            cmd.arg("pull")
                .arg("--quiet")
                .arg("--address")
                .arg(&self.containerd_socket)
                .arg("--namespace")
                .arg(NAMESPACE)
                .arg("--plain-http-host")
                .arg(registry)
                .arg(image)
                .stdin(Stdio::null())
                .kill_on_drop(true);
            if log {
                cmd.arg("--log")
                    .arg("info,zest_containerd=debug,zest_registry=trace");
            }
            cmd
        };
        let output =
            run_checked(&mut cmd, &format!("pulling {image} ({mode})"), PULL_TIMEOUT).await?;
        if log && mode != Mode::Full {
            let path = self.dir.join("pull.log");
            if let Err(e) = std::fs::write(&path, &output.stderr) {
                tracing::warn!(file = %path.display(), error = %e, "cannot keep the pull's log");
            }
        }
        Ok(())
    }

    fn zest_binary(&self) -> PathBuf {
        // The daemon's own binary: the same build pulls.
        std::fs::read_link(format!("/proc/{}/exe", self.zest.id().unwrap_or(0)))
            .unwrap_or_else(|_| PathBuf::from("zest"))
    }

    /// Runs the workload in a new container and returns the time until its
    /// ready line; the container is then killed and removed.
    async fn run_to_ready(
        &self,
        plan: &BenchPlan,
        w: &Workload,
        mode: Mode,
        image: &str,
        id: &str,
    ) -> Result<Duration, BenchError> {
        let snapshotter = if matches!(mode, Mode::Full | Mode::WarmFull) {
            "overlayfs"
        } else {
            "zest"
        };
        let mut cmd = self.ctr();
        cmd.args(["run", "--rm", "--snapshotter", snapshotter, image, id])
            .args(&w.command)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(|source| BenchError::Spawn {
            program: "ctr".into(),
            source,
        })?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(64);
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if tx.send(line).await.is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);

        let mut tail = Tail::default();
        let deadline = tokio::time::Instant::now() + plan.run_timeout;
        let ready = loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(line)) => {
                    let hit = line.contains(&w.ready);
                    tail.push(line);
                    if hit {
                        break Ok(started.elapsed());
                    }
                }
                Ok(None) => {
                    let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                    break Err(BenchError::NotReady {
                        workload: w.name.clone(),
                        mode,
                        how: match status {
                            Ok(Ok(s)) => format!("exited ({s})"),
                            _ => "closed its output".into(),
                        },
                        ready: w.ready.clone(),
                        output: tail.text(),
                    });
                }
                Err(_) => {
                    break Err(BenchError::NotReady {
                        workload: w.name.clone(),
                        mode,
                        how: format!("timed out after {:?}", plan.run_timeout),
                        ready: w.ready.clone(),
                        output: tail.text(),
                    })
                }
            }
        };
        // Servers never exit by themselves: stop the task, let `ctr run --rm`
        // remove the container, and keep draining its output meanwhile.
        let mut kill = self.ctr();
        kill.args(["tasks", "kill", "--signal", "SIGKILL", id])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = tokio::time::timeout(STOP_TIMEOUT, kill.status()).await;
        let drained = tokio::time::timeout(STOP_TIMEOUT, async {
            while rx.recv().await.is_some() {}
            child.wait().await
        })
        .await;
        if drained.is_err() {
            let _ = child.start_kill();
            let mut rm = self.ctr();
            rm.args(["containers", "delete", id])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let _ = tokio::time::timeout(STOP_TIMEOUT, rm.status()).await;
        }
        ready
    }

    /// The sum of a Prometheus counter over its labels (0 when unavailable:
    /// a missing figure must not abort a long run).
    async fn metric(&self, name: &str) -> u64 {
        match tokio::time::timeout(Duration::from_secs(5), scrape(self.metrics)).await {
            Ok(Ok(text)) => sum_metric(&text, name),
            Ok(Err(e)) => {
                tracing::warn!(address = %self.metrics, error = %e, "cannot read zest's metrics");
                0
            }
            Err(_) => {
                tracing::warn!(address = %self.metrics, "reading zest's metrics timed out");
                0
            }
        }
    }

    /// Copies the node's logs to `<work dir>/<kind>/<label>/` before the node
    /// directory goes, so that a sample can be looked into (`kind`: `failed`,
    /// or `logs` for `--keep-logs`).
    fn keep_logs(&self, plan: &BenchPlan, kind: &str, label: &str) {
        let dest = plan.work_dir.join(kind).join(label);
        if let Err(e) = std::fs::create_dir_all(&dest) {
            tracing::warn!(dir = %dest.display(), error = %e, "cannot keep the node's logs");
            return;
        }
        for log in ["zest.log", "containerd.log", "pull.log"] {
            let _ = std::fs::copy(self.dir.join(log), dest.join(log));
        }
        if kind == "failed" {
            tracing::warn!(dir = %dest.display(), "the failed sample's node logs are kept");
        }
    }

    /// Stops containerd (and its shims) and zest, detaches leftover mounts and
    /// removes the directory.
    async fn stop(mut self) {
        terminate(&mut self.containerd, libc::SIGTERM).await;
        kill_processes_mentioning(&self.containerd_socket);
        // SIGINT: zest unmounts its FUSE layers before exiting.
        terminate(&mut self.zest, libc::SIGINT).await;
        clean_dir(&self.dir);
    }
}

const PULL_TIMEOUT: Duration = Duration::from_secs(600);

/// Largest metrics page read (zest's is a few KiB).
const MAX_METRICS_PAGE: u64 = 4 << 20;

/// `GET /metrics` from zest's metrics listener: one HTTP/1.0 request, the body read
/// to the end of the connection (bounded).
async fn scrape(address: SocketAddr) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: zest\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = Vec::new();
    stream
        .take(MAX_METRICS_PAGE)
        .read_to_end(&mut response)
        .await?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "no end of HTTP headers")
    })?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(std::io::Error::other(format!("answered {status:?}")));
    }
    Ok(body.to_owned())
}

/// The last lines of a command's output, for error messages.
#[derive(Default)]
struct Tail(VecDeque<String>);

impl Tail {
    const LINES: usize = 20;
    fn push(&mut self, line: String) {
        if self.0.len() == Self::LINES {
            self.0.pop_front();
        }
        self.0.push_back(line);
    }
    fn text(&self) -> String {
        self.0.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

fn spawn_logged(cmd: &mut Command, log: &Path) -> Result<Child, BenchError> {
    let file = std::fs::File::create(log).map_err(io_err(format!("creating {}", log.display())))?;
    let err = file
        .try_clone()
        .map_err(io_err(format!("opening {}", log.display())))?;
    let program = cmd.as_std().get_program().to_string_lossy().into_owned();
    cmd.stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| BenchError::Spawn { program, source })
}

/// Runs `cmd` to its end within `limit`; its output on success, an error with
/// the tail of its output otherwise.
async fn run_checked(
    cmd: &mut Command,
    what: &str,
    limit: Duration,
) -> Result<std::process::Output, BenchError> {
    let program = cmd.as_std().get_program().to_string_lossy().into_owned();
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .map_err(|source| BenchError::Spawn { program, source })?;
    let output = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .map_err(|_| BenchError::Timeout {
            what: what.to_string(),
            after: limit,
            dir: "its output".into(),
        })?
        .map_err(io_err(what.to_string()))?;
    if output.status.success() {
        return Ok(output);
    }
    let mut tail = Tail::default();
    for line in String::from_utf8_lossy(&output.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&output.stderr).lines())
    {
        tail.push(line.to_string());
    }
    Err(BenchError::Command {
        what: what.to_string(),
        status: output.status.to_string(),
        output: tail.text(),
    })
}

/// Sends `signal`, waits, then kills.
async fn terminate(child: &mut Child, signal: i32) {
    if let Some(pid) = child.id() {
        // SAFETY: signalling our own child, which has not been reaped yet.
        unsafe { libc::kill(pid as i32, signal) };
        if tokio::time::timeout(STOP_TIMEOUT, child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.start_kill();
    let _ = tokio::time::timeout(STOP_TIMEOUT, child.wait()).await;
}

/// Kills processes whose command line mentions `path` (containerd's shims
/// carry its socket path and outlive it).
fn kill_processes_mentioning(path: &Path) {
    let needle = path.as_os_str().as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline.windows(needle.len()).any(|w| w == needle) && pid != std::process::id() as i32 {
            // SAFETY: plain signal to a process we identified by its command line.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Detaches every mount at or below `dir` and removes it (the snapshotter's own
/// clean-up of a directory that may hold mounts).
fn clean_dir(dir: &Path) {
    if let Err(e) = remove_tree(dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a node directory");
    }
}

fn free_port() -> Result<SocketAddr, BenchError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(io_err("finding a free loopback port"))?;
    l.local_addr()
        .map_err(io_err("finding a free loopback port"))
}

/// User + system CPU time of a process (zero when it cannot be read).
pub fn process_cpu(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // The command name (field 2) may contain spaces: fields count from its ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after ')'.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    Duration::from_secs_f64((ticks(11) + ticks(12)) as f64 / hz as f64)
}

/// The sum of the samples of a counter in Prometheus text format.
fn sum_metric(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let metric = key.split('{').next()?;
            (metric == name).then(|| value.parse::<f64>().ok())?
        })
        .sum::<f64>() as u64
}

/// The git commit and cargo profile this code was built from (recorded by the
/// crate's build script), as one line.
pub fn build_description() -> String {
    format!(
        "commit {}, {} build",
        env!("ZEST_BUILD_COMMIT"),
        env!("ZEST_BUILD_PROFILE")
    )
}

/// `/proc/loadavg` as it reads now ("unknown" where it cannot be read).
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

/// How [`filesystem_description`] names ext4 without a journal.
const JOURNAL_LESS_EXT4: &str = "ext4 without a journal";

/// The filesystem `dir` lives on, e.g. `ext4 with a journal`. For ext4 the
/// journal matters: without one, every file creation skips (one inode-table
/// lookup each) the inodes freed in its block group in the last minute or more,
/// which slows a sample that follows the removal of the previous sample's node.
pub fn filesystem_description(dir: &Path) -> String {
    let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let Ok(Some(mount)) = zest_mount::mount_of(&dir) else {
        return "unknown".to_string();
    };
    if mount.fstype != "ext4" {
        return mount.fstype;
    }
    // /sys/fs/ext4/<device>/journal_task: the journal thread's pid, or `<none>`.
    let device = Path::new(&mount.source)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match std::fs::read_to_string(format!("/sys/fs/ext4/{device}/journal_task")) {
        Ok(task) if task.trim() == "<none>" => JOURNAL_LESS_EXT4.to_string(),
        Ok(_) => "ext4 with a journal".to_string(),
        Err(_) => "ext4".to_string(),
    }
}

/// CPU model and count, memory, kernel and OS, as one line.
pub fn machine_description() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim())
        .to_string();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let os: HashMap<String, String> = std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect();
    format!(
        "{cpus} × {model}, {:.0} GiB, Linux {kernel}, {}",
        mem_kib as f64 / (1 << 20) as f64,
        os.get("PRETTY_NAME").map_or("unknown OS", String::as_str)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_filesystem_is_named() {
        assert_eq!(filesystem_description(Path::new("/proc/self")), "proc");
        let root = filesystem_description(Path::new("/"));
        assert!(!root.is_empty() && root != "unknown", "{root}");
    }

    #[test]
    fn prometheus_counters_are_summed_over_labels() {
        let text = "# HELP x y\n# TYPE zest_a counter\nzest_a{layer=\"1\"} 3\nzest_a{layer=\"2\"} 4\nzest_ab 100\nzest_a 1\n";
        assert_eq!(sum_metric(text, "zest_a"), 8);
        assert_eq!(sum_metric(text, "zest_missing"), 0);
    }

    #[test]
    fn own_cpu_time_is_read() {
        // Burn a little CPU so the figure is not zero on a coarse clock.
        let mut x = 0u64;
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        assert!(process_cpu(std::process::id()) > Duration::ZERO);
        assert_eq!(process_cpu(u32::MAX), Duration::ZERO);
    }

    fn plan(modes: Vec<ModeChoice>) -> BenchPlan {
        BenchPlan {
            registry: "r:1".into(),
            prefix: "p".into(),
            workloads: crate::workload::builtin(),
            profiles: vec![NamedProfile {
                name: "lan".into(),
                link: LinkProfile {
                    rtt: Duration::from_millis(1),
                    bandwidth_bps: None,
                },
            }],
            modes,
            samples: 5,
            work_dir: PathBuf::from("/nonexistent"),
            keep_logs: false,
            zest_binary: PathBuf::from("zest"),
            zest_config: ServiceConfig::default(),
            run_timeout: Duration::from_secs(1),
            command_line: String::new(),
        }
    }

    #[test]
    fn warm_runs_follow_the_cold_run_of_their_snapshotter() {
        let all = plan(vec![
            ModeChoice::Full,
            ModeChoice::Lazy,
            ModeChoice::LazyProfile,
            ModeChoice::Warm,
        ]);
        assert_eq!(all.warm_after(Mode::Full), Some(Mode::WarmFull));
        assert_eq!(all.warm_after(Mode::Lazy), Some(Mode::WarmLazy));
        assert_eq!(all.warm_after(Mode::LazyProfile), None);
        // 3 cold + 2 warm per sample, 5 samples, 5 workloads, 1 profile.
        assert_eq!(all.sample_count(), 5 * 5 * 5);

        let profile_only = plan(vec![ModeChoice::LazyProfile, ModeChoice::Warm]);
        assert_eq!(
            profile_only.warm_after(Mode::LazyProfile),
            Some(Mode::WarmLazy)
        );
        let skopeo = plan(vec![
            ModeChoice::Full,
            ModeChoice::ThirdParty,
            ModeChoice::LazyProfile,
            ModeChoice::Warm,
        ]);
        assert_eq!(skopeo.warm_after(Mode::ThirdParty), Some(Mode::WarmLazy));
        assert_eq!(skopeo.warm_after(Mode::LazyProfile), None);
        assert_eq!(
            skopeo.image_for(&skopeo.workloads[0], Mode::ThirdParty, "l:2"),
            "l:2/p/python:skopeo"
        );
        let cold = plan(vec![ModeChoice::Full]);
        assert_eq!(cold.warm_after(Mode::Full), None);
        assert_eq!(
            cold.image_for(&cold.workloads[0], Mode::Full, "l:2"),
            "l:2/p/python:gzip"
        );
    }
}
