//! Helpers for tests that run zest's snapshotter against real components: the service
//! in-process on a socket in a temporary directory, a gRPC client for it, a private
//! containerd, and a small busybox image built with umoci and pushed with skopeo to
//! the loopback [`Registry`](super::Registry).
//!
//! Every process started here is owned by a guard that kills it (by pid) when dropped;
//! every wait is bounded; every mount left below a test directory is detached before
//! the directory is deleted.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use zest_api::snapshots::snapshots_client::SnapshotsClient;
use zest_api::types::Mount as PbMount;
use zest_cache::{CacheConfig, ChunkCache};
use zest_daemon::{LazyConfig, LazyLayerProvider};
use zest_snapshotter::{
    RemoteLayerProvider, ServeError, Server, ShutdownMode, SnapshotStore, SnapshotterConfig,
};

pub type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Builds an error for a test failure with a message.
pub fn fail(message: impl Into<String>) -> Box<dyn std::error::Error + Send + Sync> {
    message.into().into()
}

/// Whether every tool in `tools` is installed (see [`super::require_tool`]: a
/// missing tool fails under `CI=true` and skips loudly elsewhere). Tools are also
/// looked for in the sbin directories, which a non-login PATH may lack.
pub fn require_tools(tools: &[&str]) -> bool {
    tools.iter().all(|tool| match which(tool) {
        Some(path) => super::require_tool(&path.display().to_string()),
        None => super::require_tool(tool),
    })
}

/// Finds a program in PATH or the usual sbin directories.
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}

/// PATH for the processes we start, including sbin (runc lives in /usr/sbin).
pub fn child_path() -> String {
    let current = std::env::var("PATH").unwrap_or_default();
    format!("{current}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
}

/// Polls `check` until it returns `Some`, at most for `limit`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> TestResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(fail(format!(
                "timed out after {limit:?} waiting for {what}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Mount points at or below `root`, deepest first, from this process's mount table.
pub fn mounts_under(root: &Path) -> Vec<PathBuf> {
    zest_mount::mount_points_under(root).unwrap_or_default()
}

/// Detaches every mount below `root` (deepest first).
pub fn unmount_under(root: &Path) {
    if let Err(e) = zest_mount::detach_all_under(root) {
        eprintln!("detaching the mounts under {}: {e}", root.display());
    }
}

/// The one mount of `mounts` (zest answers every snapshot with exactly one).
pub fn only(mounts: &[PbMount]) -> TestResult<&PbMount> {
    match mounts {
        [m] => Ok(m),
        other => Err(fail(format!("expected one mount, got {other:?}"))),
    }
}

/// Mounts `m` at `target` with mount(2), as containerd would: a bind mount (recursive
/// with option `rbind`), or a filesystem of `m`'s type with its options as data.
pub fn mount_at(m: &PbMount, target: &Path) -> TestResult {
    let result = if m.r#type == "bind" {
        let options = zest_mount::BindOptions {
            recursive: m.options.iter().any(|o| o == "rbind"),
            readonly: false,
        };
        zest_mount::bind(Path::new(&m.source), target, options)
    } else {
        let data = m.options.join(",");
        zest_mount::mount(
            &m.source,
            target,
            &m.r#type,
            zest_mount::MountFlags::NONE,
            &data,
        )
    };
    result.map_err(|e| fail(format!("mount {m:?}: {e}")))
}

/// Unmounts `target`. Retries while it is busy for a moment: a process forked by a
/// concurrent test briefly holds copies of our open files until it execs.
pub fn unmount(target: &Path) -> TestResult {
    Ok(zest_mount::umount_patiently(
        target,
        Duration::from_secs(5),
    )?)
}

/// A temporary directory whose mounts are detached before it is deleted, so that a
/// failing test never deletes files through a leftover mount.
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
}

impl TestDir {
    pub fn new() -> TestResult<Self> {
        // Short paths: unix socket paths are limited to 108 bytes.
        let dir = tempfile::Builder::new().prefix("zt").tempdir_in("/tmp")?;
        Ok(TestDir { dir: Some(dir) })
    }

    pub fn path(&self) -> &Path {
        self.dir
            .as_ref()
            .map_or(Path::new("/nonexistent"), |d| d.path())
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        unmount_under(self.path());
        if let Some(dir) = self.dir.take() {
            if !mounts_under(dir.path()).is_empty() {
                // Never delete through a mount: leak the directory instead.
                eprintln!(
                    "leaving {} in place: mounts remain below it",
                    dir.path().display()
                );
                let _ = dir.keep();
            }
        }
    }
}

/// A child process killed (by its pid) when the guard is dropped.
pub struct ProcessGuard {
    name: String,
    child: Child,
}

impl ProcessGuard {
    pub fn spawn(name: &str, command: &mut Command) -> TestResult<Self> {
        let child = command
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| fail(format!("cannot start {name}: {e}")))?;
        Ok(ProcessGuard {
            name: name.to_owned(),
            child,
        })
    }

    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }

    /// Fails if the process has exited.
    pub fn check_running(&mut self) -> TestResult {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => Err(fail(format!("{} exited early: {status}", self.name))),
        }
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Kills, when dropped, the processes whose command line contains its marker (see
/// [`kill_processes_mentioning`]): what a test started outside a guard of its own
/// (a daemon and the helpers it spawned) does not outlive a failed assertion.
pub struct KillMentioningOnDrop(pub String);

impl Drop for KillMentioningOnDrop {
    fn drop(&mut self) {
        kill_processes_mentioning(&self.0);
    }
}

/// Kills processes whose command line contains `marker` (a path unique to one test,
/// e.g. its containerd socket): the shims containerd started for that test.
pub fn kill_processes_mentioning(marker: &str) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    let me = std::process::id();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid as u32 == me {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(marker) {
            // SAFETY: plain kill(2) on a pid read from /proc.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Output of a command run to completion.
#[derive(Debug)]
pub struct Output {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a command with a time limit.
pub async fn run(program: &str, args: &[&str], limit: Duration) -> TestResult<Output> {
    let mut command = Command::new(program);
    command
        .args(args)
        .env("PATH", child_path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let output = tokio::time::timeout(limit, command.output())
        .await
        .map_err(|_| {
            fail(format!(
                "{program} {args:?} did not finish within {limit:?}"
            ))
        })?
        .map_err(|e| fail(format!("cannot run {program}: {e}")))?;
    Ok(Output {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// Runs a command that must succeed; returns its stdout.
pub async fn run_ok(program: &str, args: &[&str], limit: Duration) -> TestResult<String> {
    let out = run(program, args, limit).await?;
    if !out.success {
        return Err(fail(format!(
            "{program} {args:?} failed:\nstdout: {}\nstderr: {}",
            out.stdout, out.stderr
        )));
    }
    Ok(out.stdout)
}

/// zest's snapshotter running in this process on `<dir>/zest.sock` with its state in
/// `<dir>/state`.
pub struct ZestService {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub store: SnapshotStore,
    stop: Option<tokio::sync::oneshot::Sender<ShutdownMode>>,
    task: Option<tokio::task::JoinHandle<Result<(), ServeError>>>,
}

impl ZestService {
    pub fn config(dir: &Path) -> SnapshotterConfig {
        SnapshotterConfig {
            socket: dir.join("zest.sock"),
            state_dir: dir.join("state"),
            ..SnapshotterConfig::default()
        }
    }

    pub async fn start(dir: &Path, provider: Arc<dyn RemoteLayerProvider>) -> TestResult<Self> {
        Self::start_with(Self::config(dir), provider).await
    }

    pub async fn start_with(
        config: SnapshotterConfig,
        provider: Arc<dyn RemoteLayerProvider>,
    ) -> TestResult<Self> {
        // The service's log goes to the test's captured output (shown on failure).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("zest=debug")),
            )
            .with_test_writer()
            .try_init();
        let server = Server::bind(&config, provider).await?;
        let store = server.store().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(
            server.run(async move { stopped.await.unwrap_or(ShutdownMode::Terminate) }),
        );
        Ok(ZestService {
            socket: config.socket,
            state_dir: config.state_dir,
            store,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// A gRPC client connected to the service.
    pub async fn client(&self) -> TestResult<SnapshotsClient<tonic::transport::Channel>> {
        connect(&self.socket).await
    }

    /// Every snapshot in the service's store (all namespaces), as `List` returns it.
    pub async fn snapshots(&self) -> TestResult<Vec<zest_api::snapshots::Info>> {
        let mut client = self.client().await?;
        let mut stream = client
            .list(zest_api::snapshots::ListSnapshotsRequest {
                snapshotter: "zest".into(),
                filters: Vec::new(),
            })
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(batch) = stream.message().await? {
            out.extend(batch.info);
        }
        Ok(out)
    }

    /// Stops the service gracefully (as on SIGTERM) and waits for it.
    pub async fn stop(mut self) -> TestResult {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(ShutdownMode::Terminate);
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .map_err(|_| fail("snapshotter did not stop within 20s"))???;
        }
        Ok(())
    }
}

impl Drop for ZestService {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Connects a snapshot API client to a unix socket.
pub async fn connect(socket: &Path) -> TestResult<SnapshotsClient<tonic::transport::Channel>> {
    Ok(SnapshotsClient::new(unix_channel(socket).await?))
}

/// A gRPC channel to a unix socket (for any generated client).
pub async fn unix_channel(socket: &Path) -> TestResult<tonic::transport::Channel> {
    let socket = socket.to_path_buf();
    // The URI is required by the API but unused: the connector dials the socket.
    let channel = tonic::transport::Endpoint::try_from("http://localhost")?
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await?;
    Ok(channel)
}

/// Which containerd a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContainerdVersion {
    /// The system's containerd (Debian 12: 1.6), configuration format version 2.
    V1,
    /// containerd 2.x, extracted by `scripts/newer-debian` into its private cache
    /// (`$ZEST_NEWER_DEBIAN_DIR`, default `/var/cache/zest/newer-debian`),
    /// configuration format version 3.
    V2,
}

impl ContainerdVersion {
    /// The directory holding this version's `containerd`, `ctr` and shim, or `None`
    /// for the system's (found in PATH).
    pub fn bin_dir(self) -> Option<PathBuf> {
        match self {
            ContainerdVersion::V1 => None,
            ContainerdVersion::V2 => {
                let cache = std::env::var_os("ZEST_NEWER_DEBIAN_DIR").map_or_else(
                    || PathBuf::from("/var/cache/zest/newer-debian"),
                    PathBuf::from,
                );
                Some(cache.join("containerd2/bin"))
            }
        }
    }

    /// The path of one of this version's programs (`containerd`, `ctr`).
    pub fn program(self, name: &str) -> PathBuf {
        match self.bin_dir() {
            Some(dir) => dir.join(name),
            None => which(name).unwrap_or_else(|| PathBuf::from(name)),
        }
    }
}

/// Whether this containerd version and runc are installed (see
/// [`super::require_tool`]: missing parts fail under `CI=true`, skip loudly
/// elsewhere).
pub fn require_containerd(version: ContainerdVersion) -> bool {
    match version {
        ContainerdVersion::V1 => require_tools(&["containerd", "ctr", "runc"]),
        ContainerdVersion::V2 => {
            let containerd = version.program("containerd");
            let found = containerd.is_file() && version.program("ctr").is_file();
            (found
                || super::unavailable(
                    &format!("containerd 2.x is missing ({})", containerd.display()),
                    "run scripts/install-deps (scripts/newer-debian extracts it)",
                ))
                && require_tools(&["runc"])
        }
    }
}

/// A private containerd with zest as proxy snapshotter `zest`, its root, state and
/// sockets inside `dir`, no CRI (unless started with [`Containerd::start_with_cri`]),
/// and garbage collection after every deletion (unless started with
/// [`Containerd::start_without_auto_gc`]); the system's 1.6/1.7 or 2.x
/// ([`ContainerdVersion`]), configured with the matching packaged snippet.
pub struct Containerd {
    pub address: PathBuf,
    pub namespace: String,
    pub version: ContainerdVersion,
    process: Option<ProcessGuard>,
    log: PathBuf,
}

impl Containerd {
    /// Runs `zest pull` (the built binary, with `global` options before the
    /// subcommand) of `reference` into this containerd over plain HTTP, with
    /// the registry hosts configuration in `hosts_dir`.
    pub async fn zest_pull(
        &self,
        global: &[&str],
        hosts_dir: &Path,
        reference: &str,
    ) -> TestResult<Output> {
        let address = self.address.display().to_string();
        let hosts = hosts_dir.display().to_string();
        let mut args = global.to_vec();
        args.extend([
            "pull",
            "--address",
            &address,
            "--namespace",
            &self.namespace,
            "--plain-http",
            "--hosts-dir",
            &hosts,
            "--quiet",
            reference,
        ]);
        run(env!("CARGO_BIN_EXE_zest"), &args, Duration::from_secs(180)).await
    }

    pub async fn start(dir: &Path, zest_socket: &Path) -> TestResult<Self> {
        Self::launch(
            dir,
            zest_socket,
            None,
            ContainerdVersion::V1,
            Gc::AfterEveryDeletion,
        )
        .await
    }

    /// [`Containerd::start`] without automatic garbage collection (none at start,
    /// none after deletions): for a test that holds unreferenced snapshots for a
    /// while, such as a view `ctr` creates without a GC-root label, which a
    /// collection triggered by an earlier deletion could otherwise take.
    pub async fn start_without_auto_gc(dir: &Path, zest_socket: &Path) -> TestResult<Self> {
        Self::launch(dir, zest_socket, None, ContainerdVersion::V1, Gc::OnRequest).await
    }

    /// [`Containerd::start`] with the given version.
    pub async fn start_version(
        dir: &Path,
        zest_socket: &Path,
        version: ContainerdVersion,
    ) -> TestResult<Self> {
        Self::launch(dir, zest_socket, None, version, Gc::AfterEveryDeletion).await
    }

    /// Starts containerd with its CRI plugin enabled (the packaged snippet makes zest
    /// CRI's snapshotter), plus `cri_config`: more TOML for the test, e.g. a registry
    /// `config_path`. CRI's streaming server listens on a random loopback port.
    pub async fn start_with_cri(
        dir: &Path,
        zest_socket: &Path,
        cri_config: &str,
    ) -> TestResult<Self> {
        Self::launch(
            dir,
            zest_socket,
            Some((cri_config, "")),
            ContainerdVersion::V1,
            Gc::AfterEveryDeletion,
        )
        .await
    }

    /// [`Containerd::start_with_cri`] with the given version. For 2.x,
    /// `images_keys` are more keys for the packaged `[plugins."io.containerd.cri.v1.images"]`
    /// table (TOML allows a table once), e.g. `disable_snapshot_annotations = false`.
    pub async fn start_with_cri_version(
        dir: &Path,
        zest_socket: &Path,
        cri_config: &str,
        images_keys: &str,
        version: ContainerdVersion,
    ) -> TestResult<Self> {
        Self::launch(
            dir,
            zest_socket,
            Some((cri_config, images_keys)),
            version,
            Gc::AfterEveryDeletion,
        )
        .await
    }

    async fn launch(
        dir: &Path,
        zest_socket: &Path,
        cri: Option<(&str, &str)>,
        version: ContainerdVersion,
        gc: Gc,
    ) -> TestResult<Self> {
        let address = dir.join("containerd.sock");
        let config = dir.join("containerd.toml");
        let log = dir.join("containerd.log");
        let text = match version {
            ContainerdVersion::V1 => config_v2(dir, &address, zest_socket, cri.map(|c| c.0), gc)?,
            ContainerdVersion::V2 => config_v3(dir, &address, zest_socket, cri, gc)?,
        };
        std::fs::write(&config, text)?;
        let log_file = std::fs::File::create(&log)?;
        let mut command = Command::new(version.program("containerd"));
        // The version's own shim must come first in PATH: containerd finds it there.
        let path = match version.bin_dir() {
            Some(bin) => format!("{}:{}", bin.display(), child_path()),
            None => child_path(),
        };
        command
            .arg("--config")
            .arg(&config)
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let process = ProcessGuard::spawn("containerd", &mut command)?;
        let mut containerd = Containerd {
            address,
            namespace: "zest-test".to_owned(),
            version,
            process: Some(process),
            log,
        };
        let address = containerd.address.display().to_string();
        let ctr = version.program("ctr").display().to_string();
        let ready = wait_for("containerd to answer", Duration::from_secs(30), || {
            let (address, ctr) = (address.clone(), ctr.clone());
            async move {
                let out = run(
                    &ctr,
                    &["--address", &address, "version"],
                    Duration::from_secs(10),
                )
                .await
                .ok()?;
                out.success.then_some(())
            }
        })
        .await;
        if let Err(e) = ready {
            if let Some(p) = containerd.process.as_mut() {
                p.check_running()?;
            }
            return Err(fail(format!(
                "{e}\ncontainerd log:\n{}",
                containerd.log_tail()
            )));
        }
        Ok(containerd)
    }

    /// The last lines of containerd's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Runs `ctr --address .. -n <namespace> <args>`.
    pub async fn ctr(&self, args: &[&str]) -> TestResult<Output> {
        let address = self.address.display().to_string();
        let mut full = vec!["--address", &address, "--namespace", &self.namespace];
        full.extend_from_slice(args);
        let ctr = self.version.program("ctr").display().to_string();
        run(&ctr, &full, Duration::from_secs(120)).await
    }

    /// Runs a ctr command that must succeed; returns stdout.
    pub async fn ctr_ok(&self, args: &[&str]) -> TestResult<String> {
        let out = self.ctr(args).await?;
        if !out.success {
            return Err(fail(format!(
                "ctr {args:?} failed:\nstdout: {}\nstderr: {}\ncontainerd log:\n{}",
                out.stdout,
                out.stderr,
                self.log_tail()
            )));
        }
        Ok(out.stdout)
    }

    /// Runs `command` in a throw-away container `name` of `image` on the zest
    /// snapshotter; it must succeed. Returns stdout.
    pub async fn run_on_zest(
        &self,
        image: &str,
        name: &str,
        command: &[&str],
    ) -> TestResult<String> {
        let mut args = vec!["run", "--rm", "--snapshotter", "zest", image, name];
        args.extend_from_slice(command);
        self.ctr_ok(&args).await
    }
}

/// When a test's containerd collects garbage.
#[derive(Clone, Copy, Debug)]
enum Gc {
    /// Right after every deletion, so tests see what containerd would remove.
    AfterEveryDeletion,
    /// Only when asked (`--sync` deletions) or after 100 mutations: no startup
    /// collection, none triggered by a deletion.
    OnRequest,
}

impl Gc {
    /// The keys of `[plugins."io.containerd.gc.v1.scheduler"]` (the same in
    /// config versions 2 and 3).
    fn scheduler_keys(self) -> &'static str {
        match self {
            Gc::AfterEveryDeletion => "  deletion_threshold = 1\n  schedule_delay = \"0ms\"",
            Gc::OnRequest => "  deletion_threshold = 0\n  startup_delay = \"1h\"",
        }
    }
}

/// containerd 1.6/1.7's configuration (format version 2) for a test in `dir`.
fn config_v2(
    dir: &Path,
    address: &Path,
    zest_socket: &Path,
    cri: Option<&str>,
    gc: Gc,
) -> TestResult<String> {
    let (disabled_cri, cri_config) = match cri {
        None => ("\n  \"io.containerd.grpc.v1.cri\",", String::new()),
        Some(extra) => (
            "",
            format!(
                "[plugins.\"io.containerd.grpc.v1.cri\"]\n  stream_server_address = \"127.0.0.1\"\n  stream_server_port = \"0\"\n{extra}\n"
            ),
        ),
    };
    Ok(format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [{disabled_cri}
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs",
]
[grpc]
  address = "{address}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
[plugins."io.containerd.gc.v1.scheduler"]
{gc}
{cri_config}{packaged}"#,
        root = dir.join("root").display(),
        state = dir.join("state").display(),
        address = address.display(),
        opt = dir.join("opt").display(),
        gc = gc.scheduler_keys(),
        packaged = packaged_containerd_config(
            include_str!("../../packaging/containerd-config.toml"),
            zest_socket
        )?,
    ))
}

/// containerd 2.x's configuration (format version 3) for a test in `dir`. NRI is
/// off: its socket is one fixed path shared by every containerd on the machine.
fn config_v3(
    dir: &Path,
    address: &Path,
    zest_socket: &Path,
    cri: Option<(&str, &str)>,
    gc: Gc,
) -> TestResult<String> {
    const IMAGES_TABLE: &str =
        "[plugins.\"io.containerd.cri.v1.images\"]\n  snapshotter = \"zest\"";
    let packaged = include_str!("../../packaging/containerd2-config.toml");
    if !packaged.contains(IMAGES_TABLE) {
        return Err(fail(format!(
            "packaging/containerd2-config.toml lacks {IMAGES_TABLE:?}"
        )));
    }
    let images_keys = cri.map_or("", |c| c.1);
    let packaged = packaged.replace(IMAGES_TABLE, &format!("{IMAGES_TABLE}\n  {images_keys}"));
    let (disabled_cri, cri_config) = match cri.map(|c| c.0) {
        None => (
            "\n  \"io.containerd.grpc.v1.cri\",\n  \"io.containerd.cri.v1.images\",\n  \"io.containerd.cri.v1.runtime\",",
            String::new(),
        ),
        Some(extra) => (
            "",
            format!(
                "[plugins.\"io.containerd.grpc.v1.cri\"]\n  stream_server_address = \"127.0.0.1\"\n  stream_server_port = \"0\"\n{extra}\n"
            ),
        ),
    };
    Ok(format!(
        r#"version = 3
root = "{root}"
state = "{state}"
disabled_plugins = [{disabled_cri}
  "io.containerd.nri.v1.nri",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.blockfile",
  "io.containerd.snapshotter.v1.erofs",
]
[grpc]
  address = "{address}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
[plugins."io.containerd.gc.v1.scheduler"]
{gc}
{cri_config}{packaged}"#,
        root = dir.join("root").display(),
        state = dir.join("state").display(),
        address = address.display(),
        opt = dir.join("opt").display(),
        gc = gc.scheduler_keys(),
        packaged = packaged_containerd_config(&packaged, zest_socket)?,
    ))
}

/// A snippet shipped in `packaging/` (so the tests prove it works), pointed at
/// `zest_socket`, without its `version` line.
fn packaged_containerd_config(packaged: &str, zest_socket: &Path) -> TestResult<String> {
    let default_socket = zest_snapshotter::DEFAULT_SOCKET;
    if !packaged.contains(default_socket) {
        return Err(fail(format!(
            "a packaged containerd snippet does not use the default socket {default_socket}"
        )));
    }
    Ok(packaged
        .lines()
        .filter(|line| !line.trim().starts_with("version = "))
        .collect::<Vec<_>>()
        .join("\n")
        .replace(default_socket, &zest_socket.display().to_string()))
}

impl Drop for Containerd {
    fn drop(&mut self) {
        drop(self.process.take());
        // Shims of this containerd carry its socket path on their command line.
        kill_processes_mentioning(&self.address.display().to_string());
    }
}

/// Builds a two-layer OCI image with umoci: busybox (static) with `echo`, `sh` and
/// `cat`, then a second layer adding `/etc/zest-hello`. Returns the layout directory;
/// the image's tag is `latest`.
pub async fn build_busybox_image(dir: &Path) -> TestResult<PathBuf> {
    let layout = dir.join("oci");
    let bundle = dir.join("bundle");
    let image = format!("{}:latest", layout.display());
    let busybox = which("busybox").ok_or_else(|| fail("busybox not found"))?;
    let limit = Duration::from_secs(120);
    run_ok(
        "umoci",
        &["init", "--layout", &layout.display().to_string()],
        limit,
    )
    .await?;
    run_ok("umoci", &["new", "--image", &image], limit).await?;
    run_ok(
        "umoci",
        &["unpack", "--image", &image, &bundle.display().to_string()],
        limit,
    )
    .await?;
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin"))?;
    std::fs::copy(&busybox, rootfs.join("bin/busybox"))?;
    for applet in ["echo", "sh", "cat", "ls"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))?;
    }
    run_ok(
        "umoci",
        &["repack", "--image", &image, &bundle.display().to_string()],
        limit,
    )
    .await?;
    // A repack diffs against the bundle's original unpack, so unpack again for a
    // second, separate layer.
    let bundle2 = dir.join("bundle2");
    run_ok(
        "umoci",
        &["unpack", "--image", &image, &bundle2.display().to_string()],
        limit,
    )
    .await?;
    let rootfs2 = bundle2.join("rootfs");
    std::fs::create_dir_all(rootfs2.join("etc"))?;
    std::fs::write(
        rootfs2.join("etc/zest-hello"),
        "hello from the second layer\n",
    )?;
    run_ok(
        "umoci",
        &["repack", "--image", &image, &bundle2.display().to_string()],
        limit,
    )
    .await?;
    run_ok(
        "umoci",
        &["config", "--image", &image, "--config.cmd", "/bin/sh"],
        limit,
    )
    .await?;
    Ok(layout)
}

/// Pushes `layout:latest` to `registry` as `repo:tag` over plain HTTP; returns the
/// image reference.
pub async fn push_image(
    layout: &Path,
    registry: &super::Registry,
    repo_tag: &str,
) -> TestResult<String> {
    let reference = format!("127.0.0.1:{}/{repo_tag}", registry.port);
    run_ok(
        "skopeo",
        &[
            "--insecure-policy",
            "copy",
            "--dest-tls-verify=false",
            &format!("oci:{}:latest", layout.display()),
            &format!("docker://{reference}"),
        ],
        Duration::from_secs(120),
    )
    .await?;
    Ok(reference)
}

/// Where the chunk cache of a test's lazy provider keeps chunks.
#[derive(Clone, Copy, Debug)]
pub enum TestCache {
    /// 64 MiB in memory only.
    Memory,
    /// 64 MiB in memory and 1 GiB on disk under `<state>/cache`, which outlives the
    /// provider: a provider made again on the same state directory finds it warm.
    Disk,
}

/// zest's lazy layer provider reading from `registry` (plain HTTP), with its TOCs
/// under `state/tocs`, timeouts and restore backoff short enough for tests, and the
/// chunk cache `cache` says.
pub async fn lazy_provider(
    registry: &super::Registry,
    state: &Path,
    cache: TestCache,
) -> TestResult<Arc<LazyLayerProvider>> {
    lazy_provider_with(registry, state, cache, |_| {}).await
}

/// The content store of the containerd a test starts in `dir`.
pub fn containerd_content_dir(dir: &Path) -> PathBuf {
    dir.join("root/io.containerd.content.v1.content")
}

/// [`lazy_provider`] with `adjust` applied to its configuration last.
pub async fn lazy_provider_with(
    registry: &super::Registry,
    state: &Path,
    cache: TestCache,
    adjust: impl FnOnce(&mut LazyConfig),
) -> TestResult<Arc<LazyLayerProvider>> {
    let cache = match cache {
        TestCache::Memory => Arc::new(ChunkCache::open(&CacheConfig {
            memory_bytes: 64 << 20,
            disk_bytes: 0,
            ..CacheConfig::default()
        })?),
        TestCache::Disk => open_disk_cache(state).await?,
    };
    let mut config = LazyConfig::new(state.join("tocs"));
    config.mount_timeout = Duration::from_secs(20);
    config.check_timeout = Duration::from_secs(5);
    config.restore_max_backoff = Duration::from_secs(1);
    // Not the machine's containerd: a test that wants its own containerd's
    // content store read sets it (see `content_dir`).
    config.containerd_content_dir = None;
    adjust(&mut config);
    Ok(LazyLayerProvider::new(registry.client(), cache, config)?)
}

/// Opens the [`TestCache::Disk`] chunk cache of `state`, waiting for a previous
/// provider of this process to let go of its lock (its last references drop
/// asynchronously).
async fn open_disk_cache(state: &Path) -> TestResult<Arc<ChunkCache>> {
    let config = CacheConfig {
        memory_bytes: 64 << 20,
        disk_bytes: 1 << 30,
        disk_root: state.join("cache"),
        ..CacheConfig::default()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let c = config.clone();
        match tokio::task::spawn_blocking(move || ChunkCache::open(&c)).await? {
            Ok(cache) => return Ok(Arc::new(cache)),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "chunk cache still locked; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}
