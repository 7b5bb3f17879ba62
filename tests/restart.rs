//! Lazily mounted layers survive `zest serve` going away: a crash (`kill -9`), a
//! clean restart (SIGTERM, then start), a binary upgrade (the next process started
//! from another copy of the binary), and the same under systemd's file descriptor
//! store (the test plays systemd). Real parts throughout: the `zest` binary, a
//! private containerd with runc, a loopback docker-registry.
//!
//! A container keeps hashing files of a lazily mounted data layer that nothing has
//! read yet while zest goes away and comes back; every hash must be right and no
//! read may fail. Afterwards a new container starts, and once the image is removed
//! no FUSE mount is left under zest's state directory and the fd holder, holding
//! nothing, exits. With the registry down across a restart, cached files read,
//! uncached ones fail with EIO within the configured read deadline, and succeed
//! once the registry is back.

mod support;

use std::collections::BTreeMap;
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use sha2::{Digest as _, Sha256};

use support::containerd::{
    child_path, fail, mounts_under, require_tools, wait_for, Containerd, TestDir, TestResult,
};
use support::image::{build_image, busybox_layer_tar, TarBuilder};
use support::Registry;
use zest_oci::{LayerCompression, Platform};

const TOOLS: &[&str] = &["containerd", "ctr", "runc", "docker-registry", "busybox"];
/// Files in the data layer, and the size of each.
const FILES: usize = 40;
const FILE_SIZE: usize = 192 << 10;

fn file_bytes(i: usize) -> Vec<u8> {
    support::pseudo_random(FILE_SIZE, 1000 + i as u64)
}

fn file_name(i: usize) -> String {
    format!("/files/f{i:02}")
}

fn expected_hashes() -> BTreeMap<String, String> {
    (0..FILES)
        .map(|i| (file_name(i), hex::encode(Sha256::digest(file_bytes(i)))))
        .collect()
}

/// How `zest serve` goes away and comes back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Restart {
    /// SIGKILL, then the same binary.
    Crash,
    /// SIGTERM, then the same binary.
    Clean,
    /// SIGTERM, then a copy of the binary at another path.
    Upgrade,
    /// Under (a test playing) systemd: SIGKILL, then the same binary with the
    /// descriptors systemd kept.
    Systemd,
}

/// systemd's part: the notification socket, and the descriptors it keeps.
struct FakeSystemd {
    socket: PathBuf,
    store: Arc<Mutex<Vec<(String, OwnedFd)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeSystemd {
    fn start(dir: &Path) -> TestResult<Self> {
        let socket = dir.join("notify.sock");
        let listener = std::os::unix::net::UnixDatagram::bind(&socket)?;
        listener.set_read_timeout(Some(Duration::from_millis(100)))?;
        let store: Arc<Mutex<Vec<(String, OwnedFd)>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let store = Arc::clone(&store);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Some((text, fds)) = receive(&listener) else {
                        continue;
                    };
                    let name = text
                        .lines()
                        .find_map(|l| l.strip_prefix("FDNAME="))
                        .unwrap_or("stored")
                        .to_owned();
                    let mut store = store.lock();
                    if text.lines().any(|l| l == "FDSTOREREMOVE=1") {
                        store.retain(|(n, _)| *n != name);
                    }
                    if text.lines().any(|l| l == "FDSTORE=1") {
                        store.extend(fds.into_iter().map(|fd| (name.clone(), fd)));
                    }
                }
            })
        };
        Ok(FakeSystemd {
            socket,
            store,
            stop,
            thread: Some(thread),
        })
    }

    fn names(&self) -> Vec<String> {
        self.store.lock().iter().map(|(n, _)| n.clone()).collect()
    }

    /// Copies of the stored descriptors, as systemd passes them to the next start.
    fn passed(&self) -> TestResult<Vec<(String, OwnedFd)>> {
        let store = self.store.lock();
        let mut out = Vec::new();
        for (name, fd) in store.iter() {
            out.push((name.clone(), fd.try_clone()?));
        }
        Ok(out)
    }
}

impl Drop for FakeSystemd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One datagram and the descriptors attached to it.
fn receive(socket: &std::os::unix::net::UnixDatagram) -> Option<(String, Vec<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut buf = vec![0u8; 4096];
    let mut cmsg = nix::cmsg_space!([RawFd; 16]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .ok()?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().ok()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: received just now; ours alone.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let len = msg.bytes;
    Some((String::from_utf8_lossy(&buf[..len]).into_owned(), fds))
}

/// Registry, containerd and `zest serve` (as a child process) for one test. Drop
/// kills zest and the fd holder it started, by their pids.
struct Env {
    containerd: Option<Containerd>,
    serve: Option<Child>,
    registry: Registry,
    config: PathBuf,
    socket: PathBuf,
    state: PathBuf,
    metrics_port: u16,
    runs: usize,
    systemd: Option<FakeSystemd>,
    dir: TestDir,
}

/// What a test changes in zest's configuration.
#[derive(Default)]
struct Tweaks {
    /// More lines of the `[registry]` section.
    registry: &'static str,
    /// More sections.
    sections: &'static str,
    /// Run zest as systemd would.
    systemd: bool,
}

impl Env {
    async fn start(tweaks: Tweaks) -> TestResult<Option<Env>> {
        if !require_tools(TOOLS) {
            return Ok(None);
        }
        let dir = TestDir::new()?;
        let registry = tokio::task::spawn_blocking(|| Registry::start(support::Auth::None)).await?;
        let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let socket = dir.path().join("zest.sock");
        let state = dir.path().join("zs");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[snapshotter]\nsocket = \"{}\"\nstate_dir = \"{}\"\nmetrics_address = \"127.0.0.1:{metrics_port}\"\n\
                 [registry]\nplain_http_hosts = [\"{}\"]\nanonymous = true\nhosts_dir = \"{}\"\n{}\n\
                 [cache]\nmemory_size = \"32MiB\"\ndisk_size = \"256MiB\"\n\
                 [lazy]\ncheck_interval_secs = 1\nrestore_max_backoff_secs = 1\n{}",
                socket.display(),
                state.display(),
                registry.host(),
                dir.path().join("certs.d").display(),
                tweaks.registry,
                tweaks.sections,
            ),
        )?;
        let systemd = if tweaks.systemd {
            Some(FakeSystemd::start(dir.path())?)
        } else {
            None
        };
        let mut env = Env {
            containerd: None,
            serve: None,
            registry,
            config,
            socket,
            state,
            metrics_port,
            runs: 0,
            systemd,
            dir,
        };
        env.start_serve(Path::new(env!("CARGO_BIN_EXE_zest")))
            .await?;
        env.containerd = Some(Containerd::start(env.dir.path(), &env.socket).await?);
        Ok(Some(env))
    }

    fn containerd(&self) -> TestResult<&Containerd> {
        self.containerd
            .as_ref()
            .ok_or_else(|| fail("containerd not running"))
    }

    fn log(&self) -> String {
        (1..=self.runs)
            .map(|i| {
                let text = std::fs::read_to_string(self.dir.path().join(format!("serve-{i}.log")))
                    .unwrap_or_default();
                format!("--- serve-{i}.log\n{text}")
            })
            .collect()
    }

    /// Starts `exe serve`; with `systemd`, as systemd would: `NOTIFY_SOCKET`,
    /// `FDSTORE`, and the stored descriptors at 3.. with `LISTEN_*`.
    async fn start_serve(&mut self, exe: &Path) -> TestResult {
        self.runs += 1;
        let log = std::fs::File::create(self.dir.path().join(format!("serve-{}.log", self.runs)))?;
        let mut command = Command::new("/bin/sh");
        // $$ is the shell's pid, which exec hands to zest: LISTEN_PID must name it.
        command
            .arg("-c")
            .arg("if [ -n \"$LISTEN_FDS\" ]; then export LISTEN_PID=$$; fi; exec \"$@\"")
            .arg("sh")
            .arg(exe)
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("ZEST_LOG", "zest=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(systemd) = &self.systemd {
            let passed = systemd.passed()?;
            command
                .env("NOTIFY_SOCKET", &systemd.socket)
                .env("FDSTORE", "1024");
            if !passed.is_empty() {
                let names: Vec<&str> = passed.iter().map(|(n, _)| n.as_str()).collect();
                command
                    .env("LISTEN_FDS", passed.len().to_string())
                    .env("LISTEN_FDNAMES", names.join(":"));
            }
            let raw: Vec<RawFd> = passed.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
            // SAFETY: only dup/dup2/fcntl between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    // Out of the way first, so that no source is overwritten.
                    let mut high = Vec::with_capacity(raw.len());
                    for fd in &raw {
                        let h = libc::fcntl(*fd, libc::F_DUPFD, 1000);
                        if h < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        high.push(h);
                    }
                    for (i, h) in high.iter().enumerate() {
                        if libc::dup2(*h, 3 + i as RawFd) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
            self.serve = Some(command.spawn()?);
            drop(passed);
        } else {
            command.env_remove("NOTIFY_SOCKET");
            self.serve = Some(command.spawn()?);
        }
        let socket = self.socket.clone();
        wait_for("zest's socket", Duration::from_secs(30), || {
            let socket = socket.clone();
            async move { tokio::net::UnixStream::connect(&socket).await.ok() }
        })
        .await
        .map_err(|e| fail(format!("{e}\n{}", self.log())))?;
        Ok(())
    }

    /// Sends `signal` to zest and waits (bounded) for it to exit.
    fn stop_serve(&mut self, signal: i32) -> TestResult {
        let mut child = self.serve.take().ok_or_else(|| fail("zest not running"))?;
        let pid = i32::try_from(child.id())?;
        // SAFETY: kill(2) on the pid of the child this test started.
        unsafe { libc::kill(pid, signal) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                if signal != libc::SIGKILL && !status.success() {
                    return Err(fail(format!(
                        "zest serve exited with {status}\n{}",
                        self.log()
                    )));
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(fail("zest serve did not stop within 30 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    async fn metrics(&self) -> Option<String> {
        support::scrape_metrics(self.metrics_port).await
    }

    /// Waits until the metric `name` reads `value`.
    async fn wait_metric(&self, name: &str, value: u64) -> TestResult {
        let line = format!("\n{name} {value}\n");
        wait_for(
            &format!("{name} = {value}"),
            Duration::from_secs(60),
            || async { self.metrics().await.filter(|t| t.contains(&line)) },
        )
        .await
        .map_err(|e| fail(format!("{e}\n{}", self.log())))?;
        Ok(())
    }

    /// The layer mounts (FUSE) under zest's state directory.
    fn layer_mounts(&self) -> Vec<PathBuf> {
        mounts_under(&self.state)
            .into_iter()
            .filter(|m| matches!(zest_mount::mount_type(m), Ok(Some(t)) if t == "fuse.zest"))
            .collect()
    }

    /// Builds the busybox + files image, converts it to zstd:chunked, pushes it and
    /// pulls it lazily with `zest pull`; returns its reference.
    async fn pull_image(&self) -> TestResult<String> {
        let Some(base) = busybox_layer_tar() else {
            return Err(fail("busybox missing"));
        };
        let mut files = TarBuilder::new();
        files.dir("files/", 0o755);
        for i in 0..FILES {
            files.file(&file_name(i)[1..], 0o644, &file_bytes(i));
        }
        let layout = self.dir.path().join("oci");
        build_image(
            &layout,
            "src",
            vec![base, files.finish()],
            LayerCompression::Gzip,
            &Platform::host(),
            &["/bin/sh"],
        );
        let reference = format!("{}/zest/restart:1", self.registry.host());
        support::convert_image(
            &self.registry.client(),
            &format!("oci:{}:src", layout.display()),
            &reference,
            self.dir.path(),
            zest_image::convert::PlatformChoice::One(Platform::host()),
        )
        .await?;
        let hosts = self.dir.path().join("certs.d");
        std::fs::create_dir_all(&hosts)?;
        let out = self
            .containerd()?
            .zest_pull(&[], &hosts, &reference)
            .await?;
        if !out.success {
            return Err(fail(format!(
                "zest pull failed: {}{}\n{}",
                out.stdout,
                out.stderr,
                self.log()
            )));
        }
        Ok(reference)
    }

    /// `ctr run --rm --snapshotter zest IMAGE ID ARGS...` in the background, its
    /// output into `<dir>/<id>.out` and `.err`.
    fn spawn_container(&self, image: &str, id: &str, args: &[&str]) -> TestResult<Child> {
        let containerd = self.containerd()?;
        let out = std::fs::File::create(self.dir.path().join(format!("{id}.out")))?;
        let err = std::fs::File::create(self.dir.path().join(format!("{id}.err")))?;
        Ok(Command::new("ctr")
            .arg("--address")
            .arg(&containerd.address)
            .args(["--namespace", &containerd.namespace])
            .args(["run", "--rm", "--snapshotter", "zest", image, id])
            .args(args)
            .env("PATH", child_path())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()?)
    }

    fn output(&self, id: &str, stream: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{id}.{stream}"))).unwrap_or_default()
    }

    /// Removes the image, waits for containerd's garbage collector to remove
    /// zest's snapshots and for their layer mounts to go, stops zest with SIGTERM
    /// and waits for the fd holder, then holding nothing, to exit.
    async fn remove_everything(&mut self, image: &str) -> TestResult {
        // containerd's connection to the previous zest broke; its first call on it
        // fails, which would make the garbage collection below fail once.
        wait_for(
            "containerd to reach zest again",
            Duration::from_secs(30),
            || async {
                let containerd = self.containerd.as_ref()?;
                let out = containerd
                    .ctr(&["snapshots", "--snapshotter", "zest", "ls"])
                    .await
                    .ok()?;
                out.success.then_some(())
            },
        )
        .await?;
        self.containerd()?.ctr_ok(&["images", "rm", image]).await?;
        wait_for(
            "zest's layer mounts to go with the image",
            Duration::from_secs(60),
            || async { self.layer_mounts().is_empty().then_some(()) },
        )
        .await
        .map_err(|e| {
            let containerd = self.containerd.as_ref().map(Containerd::log_tail);
            fail(format!(
                "{e}: {:?}\n{}\ncontainerd: {}",
                self.layer_mounts(),
                self.log(),
                containerd.unwrap_or_default()
            ))
        })?;
        self.stop_serve(libc::SIGTERM)?;
        assert!(
            mounts_under(&self.state).is_empty(),
            "{:?}",
            mounts_under(&self.state)
        );
        Ok(())
    }

    fn holder_pid(&self) -> Option<i32> {
        let pid = std::fs::read_to_string(self.state.join("fd-holder.sock.pid")).ok()?;
        pid.trim().parse().ok()
    }

    /// Waits (bounded) for the fd holder to exit by itself.
    async fn wait_holder_exit(&self) -> TestResult {
        wait_for(
            "the idle fd holder to exit",
            Duration::from_secs(30),
            || async {
                let alive = self.holder_pid().is_some_and(process_alive);
                (!alive).then_some(())
            },
        )
        .await
    }
}

fn process_alive(pid: i32) -> bool {
    // A zombie still has /proc/<pid>; its state is Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit(')').next().map(|r| r.trim_start().to_owned()))
        .is_some_and(|rest| !rest.starts_with('Z'))
}

impl Drop for Env {
    fn drop(&mut self) {
        drop(self.containerd.take());
        if let Some(mut child) = self.serve.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(pid) = self.holder_pid() {
            if process_alive(pid) {
                // SAFETY: the holder this test's zest started (its pid file is in
                // this test's state directory).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// Parses `sha256sum` lines into file → hash.
fn parse_hashes(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once("  "))
        .map(|(hash, file)| (file.trim().to_owned(), hash.to_owned()))
        .collect()
}

/// The shell loop of the reading container: every file once, slowly enough that
/// the restart falls in the middle; and one file opened before, read through that
/// descriptor (opened through the previous process) only after the loop, then
/// closed (its release carries a handle the new process never gave out).
const READ_LOOP: &str = "exec 3</files/f39; \
     for f in /files/*; do sha256sum \"$f\" || echo \"FAILED $f\"; sleep 0.15; done; \
     sha256sum <&3 || echo FAILED held; exec 3<&-; echo DONE";

async fn restart_under_a_reading_container(how: Restart) -> TestResult {
    let tweaks = Tweaks {
        systemd: how == Restart::Systemd,
        ..Tweaks::default()
    };
    let Some(mut env) = Env::start(tweaks).await? else {
        return Ok(());
    };
    let image = env.pull_image().await?;
    // runc's state is shared by every test on the machine: unique container ids.
    let reader_id = format!("reader-{:08x}", rand::random::<u32>());
    let reader_id = reader_id.as_str();
    let mut reader = env.spawn_container(&image, reader_id, &["/bin/sh", "-c", READ_LOOP])?;
    let started = wait_for(
        "the reader to hash some files",
        Duration::from_secs(60),
        || {
            let n = parse_hashes(&env.output(reader_id, "out")).len();
            async move { (n >= 8).then_some(()) }
        },
    )
    .await;
    if let Err(e) = started {
        return Err(fail(format!(
            "{e}\nstdout: {}\nstderr: {}\n{}",
            env.output(reader_id, "out"),
            env.output(reader_id, "err"),
            env.log()
        )));
    }
    let layer_mounts = env.layer_mounts();
    assert_eq!(layer_mounts.len(), 2, "{layer_mounts:?}");

    let exe = match how {
        Restart::Crash | Restart::Systemd => {
            env.stop_serve(libc::SIGKILL)?;
            PathBuf::from(env!("CARGO_BIN_EXE_zest"))
        }
        Restart::Clean => {
            env.stop_serve(libc::SIGTERM)?;
            PathBuf::from(env!("CARGO_BIN_EXE_zest"))
        }
        Restart::Upgrade => {
            let copy = env.dir.path().join("zest-next");
            std::fs::copy(env!("CARGO_BIN_EXE_zest"), &copy)?;
            env.stop_serve(libc::SIGTERM)?;
            copy
        }
    };
    // The mounts stay while no zest runs; the reader waits in the kernel.
    assert_eq!(env.layer_mounts(), layer_mounts);
    let before = parse_hashes(&env.output(reader_id, "out")).len();
    std::thread::sleep(Duration::from_millis(700));
    if let Some(systemd) = &env.systemd {
        let names = systemd.names();
        assert_eq!(names.len(), 2, "systemd's store: {names:?}");
    }
    env.start_serve(&exe).await?;
    env.wait_metric("zest_lazy_takeovers_total", 2).await?;
    env.wait_metric("zest_lazy_restores_total", 0).await?;

    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = reader.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = reader.kill();
            return Err(fail(format!(
                "the reader did not finish\nstdout: {}\nstderr: {}\n{}",
                env.output(reader_id, "out"),
                env.output(reader_id, "err"),
                env.log()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let out = env.output(reader_id, "out");
    let err = env.output(reader_id, "err");
    assert!(status.success(), "reader: {status}\n{out}\n{err}");
    assert!(
        !out.contains("FAILED") && err.trim().is_empty(),
        "{out}\n{err}"
    );
    assert!(out.trim_end().ends_with("DONE"), "{out}");
    assert!(
        before < FILES,
        "the restart came after the last read: {out}"
    );
    let mut expected = expected_hashes();
    // `-`: the file held open across the restart.
    expected.insert("-".into(), expected["/files/f39"].clone());
    assert_eq!(parse_hashes(&out), expected);

    // A new container starts on the taken-over layers.
    let after_id = format!("after-{:08x}", rand::random::<u32>());
    let out = env
        .containerd()?
        .ctr_ok(&[
            "run",
            "--rm",
            "--snapshotter",
            "zest",
            &image,
            &after_id,
            "/bin/sha256sum",
            "/files/f39",
        ])
        .await?;
    assert_eq!(
        parse_hashes(&out).get("/files/f39"),
        expected_hashes().get("/files/f39")
    );

    env.remove_everything(&image).await?;
    match &env.systemd {
        // Every kept connection was removed from the store; no holder was needed.
        Some(systemd) => {
            assert_eq!(systemd.names(), Vec::<String>::new());
            assert_eq!(env.holder_pid(), None);
        }
        None => env.wait_holder_exit().await?,
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_keeps_the_reading_container_whole() -> TestResult {
    restart_under_a_reading_container(Restart::Crash).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_restart_keeps_the_reading_container_whole() -> TestResult {
    restart_under_a_reading_container(Restart::Clean).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_upgrade_keeps_the_reading_container_whole() -> TestResult {
    restart_under_a_reading_container(Restart::Upgrade).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_fd_store_keeps_the_reading_container_whole() -> TestResult {
    restart_under_a_reading_container(Restart::Systemd).await
}

/// A read in flight (zest waiting on a frozen registry) when zest is killed is
/// resent by the kernel to the next zest and answered. Then the registry is down
/// across a crash of zest: the layers are taken over from the TOC directory without
/// it, cached files read, an uncached one fails with EIO within the read deadline,
/// and reads once the registry is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_down_across_a_restart() -> TestResult {
    let tweaks = Tweaks {
        registry: "max_attempts = 1\nconnect_timeout_secs = 2\nrange_timeout_secs = 3\nrequest_timeout_secs = 3",
        sections: "[fetch]\nread_timeout_secs = 8\nreadahead_size = \"0\"\n",
        systemd: false,
    };
    let Some(mut env) = Env::start(tweaks).await? else {
        return Ok(());
    };
    let image = env.pull_image().await?;
    let id = format!("sleeper-{:08x}", rand::random::<u32>());
    env.containerd()?
        .ctr_ok(&[
            "run",
            "-d",
            "--snapshotter",
            "zest",
            &image,
            &id,
            "/bin/sleep",
            "600",
        ])
        .await?;
    let expected = expected_hashes();
    let mut execs = 0;
    let mut exec = |args: &[&str]| {
        execs += 1;
        let mut full: Vec<String> = vec![
            "task".into(),
            "exec".into(),
            "--exec-id".into(),
            format!("e{execs}"),
            id.clone(),
        ];
        full.extend(args.iter().map(|a| a.to_string()));
        full
    };
    let ctr = |args: Vec<String>| {
        let containerd = env.containerd.as_ref();
        async move {
            let containerd = containerd.ok_or_else(|| fail("containerd not running"))?;
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            containerd.ctr(&args).await
        }
    };
    let out = ctr(exec(&["/bin/sha256sum", "/files/f00", "/files/f01"])).await?;
    assert!(out.success, "{out:?}");
    let hashes = parse_hashes(&out.stdout);
    assert_eq!(hashes.get("/files/f00"), expected.get("/files/f00"));

    // A read in flight when zest goes away, killed or stopped: zest has read the
    // request from the kernel and waits on a frozen registry. The next zest has the
    // kernel resend it (a stopping zest must not answer it with an error).
    for (signal, file) in [(libc::SIGKILL, 20), (libc::SIGTERM, 21)] {
        env.registry.freeze(true);
        let exec_id = format!("in-flight-{file}");
        let in_flight = {
            let containerd = env.containerd()?;
            let out = std::fs::File::create(env.dir.path().join(format!("{exec_id}.out")))?;
            Command::new("ctr")
                .arg("--address")
                .arg(&containerd.address)
                .args(["--namespace", &containerd.namespace])
                .args(["task", "exec", "--exec-id", &exec_id, &id])
                // O_DIRECT: a synchronous read the kernel would not retry by itself.
                .args([
                    "/bin/sh",
                    "-c",
                    &format!(
                        "/bin/busybox dd if=/files/f{file} iflag=direct bs=1M 2>/dev/null | sha256sum"
                    ),
                ])
                .env("PATH", child_path())
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(Stdio::null())
                .spawn()
        };
        let mut in_flight = in_flight?;
        // Well within the registry timeouts (3 s), after which the read would fail.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        env.stop_serve(signal)?;
        env.registry.freeze(false);
        env.start_serve(Path::new(env!("CARGO_BIN_EXE_zest")))
            .await?;
        env.wait_metric("zest_lazy_takeovers_total", 2).await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = in_flight.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = in_flight.kill();
                return Err(fail(format!(
                    "the in-flight read did not finish\n{}",
                    env.log()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let out = std::fs::read_to_string(env.dir.path().join(format!("{exec_id}.out")))?;
        assert!(
            status.success(),
            "in-flight read: {status} {out}\n{}",
            env.log()
        );
        assert_eq!(
            parse_hashes(&out).get("-"),
            expected.get(&format!("/files/f{file}")),
            "in-flight read across signal {signal}"
        );
    }

    env.registry.stop();
    env.stop_serve(libc::SIGKILL)?;
    env.start_serve(Path::new(env!("CARGO_BIN_EXE_zest")))
        .await?;
    env.wait_metric("zest_lazy_takeovers_total", 2).await?;

    let ctr = |args: Vec<String>| {
        let containerd = env.containerd.as_ref();
        async move {
            let containerd = containerd.ok_or_else(|| fail("containerd not running"))?;
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            containerd.ctr(&args).await
        }
    };
    let out = ctr(exec(&["/bin/sha256sum", "/files/f00"])).await?;
    assert!(out.success, "a cached file: {out:?}\n{}", env.log());
    assert_eq!(
        parse_hashes(&out.stdout).get("/files/f00"),
        expected.get("/files/f00")
    );
    let started = Instant::now();
    let out = ctr(exec(&["/bin/sha256sum", "/files/f30"])).await?;
    eprintln!(
        "uncached read with the registry down failed after {:?}",
        started.elapsed()
    );
    assert!(
        !out.success,
        "read an uncached file without a registry: {out:?}"
    );
    // EIO, as the C library words it.
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(
        text.contains("Input/output error") || text.contains("I/O error"),
        "{out:?}"
    );

    env.registry.restart();
    let out = ctr(exec(&["/bin/sha256sum", "/files/f30"])).await?;
    assert!(
        out.success,
        "after the registry is back: {out:?}\n{}",
        env.log()
    );
    assert_eq!(
        parse_hashes(&out.stdout).get("/files/f30"),
        expected.get("/files/f30")
    );

    let containerd = env.containerd()?;
    containerd
        .ctr_ok(&["task", "kill", "--signal", "SIGKILL", &id])
        .await?;
    wait_for("the sleeper to stop", Duration::from_secs(30), || async {
        let out = containerd.ctr(&["task", "rm", &id]).await.ok()?;
        out.success.then_some(())
    })
    .await?;
    containerd.ctr_ok(&["container", "rm", &id]).await?;
    env.remove_everything(&image).await?;
    env.wait_holder_exit().await?;
    Ok(())
}
