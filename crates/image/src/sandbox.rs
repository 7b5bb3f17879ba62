//! A throw-away Linux sandbox for one workload: [`run`] stacks read-only layer
//! directories under a tmpfs upper layer, starts the program chrooted there in a
//! private mount namespace and its own process group, stops it at a timeout or
//! when it prints a ready line, and removes every mount it made.
//!
//! It isolates the filesystem view only (no user, network or pid namespace): it
//! exists to watch which files a start-up reads, not to contain hostile code.
//!
//! Invariants:
//! - Nothing the workload writes survives: writes land in the tmpfs upper layer,
//!   which is unmounted with the overlay when [`run`] returns (even on error).
//! - The workload's mounts (`/proc`, `/dev`) live in its own private namespace and
//!   never show up in the caller's.
//! - When [`run`] returns, the workload's whole process group has been killed.

use std::ffi::CString;
use std::io::{BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use zest_mount::{self, ChildMount, Overlay, SysError};

pub use zest_oci::DEFAULT_PATH;

/// How long unmounting waits for the files of a killed workload to close.
const UNMOUNT_PATIENCE: Duration = Duration::from_secs(1);

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// The program and its arguments; a program without `/` is searched in the
    /// root's directories named by `PATH` (from `env`, else [`DEFAULT_PATH`]).
    pub argv: Vec<String>,
    /// The whole environment (nothing is inherited).
    pub env: Vec<(String, String)>,
    /// Working directory inside the root (`/` when it does not exist there).
    pub cwd: String,
}

impl Workload {
    /// The `PATH` the program is searched in.
    pub fn path_var(&self) -> &str {
        self.env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map_or(DEFAULT_PATH, |(_, v)| v.as_str())
    }

    /// The program's path inside `root`: searched in the workload's PATH there
    /// (std would search the host's filesystem before the chroot takes effect).
    fn program(&self, root: &Path) -> Result<String, SandboxError> {
        let program = self.argv.first().map(String::as_str).unwrap_or_default();
        if program.contains('/') {
            return Ok(program.to_string());
        }
        for dir in self.path_var().split(':').filter(|d| d.starts_with('/')) {
            let inside = format!("{}/{program}", dir.trim_end_matches('/'));
            if root
                .join(inside.trim_start_matches('/'))
                .symlink_metadata()
                .is_ok()
            {
                return Ok(inside);
            }
        }
        Err(SandboxError::CommandNotFound {
            program: program.to_string(),
            path: self.path_var().to_string(),
        })
    }
}

/// When to stop the workload.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// How long it may run; its process group is killed after that.
    pub timeout: Duration,
    /// A substring of a stdout or stderr line after which it is stopped (servers
    /// never exit by themselves). Its output is copied to our stderr meanwhile.
    pub ready: Option<String>,
}

/// How the workload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    /// It exited with this status code.
    Exited(i32),
    /// It was killed by this signal (not by zest).
    Signaled(i32),
    /// It was still running at the timeout and was killed (normal for servers).
    TimedOut,
    /// It printed its ready line and was stopped there.
    Ready,
}

impl std::fmt::Display for RunOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunOutcome::Exited(c) => write!(f, "exited with status {c}"),
            RunOutcome::Signaled(s) => write!(f, "killed by signal {s}"),
            RunOutcome::TimedOut => f.write_str("still running at the timeout; killed"),
            RunOutcome::Ready => f.write_str("printed its ready line; stopped there"),
        }
    }
}

/// Why the sandbox could not run the workload.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Setting up or removing a mount failed.
    #[error("sandbox: {0}")]
    Mount(#[from] SysError),
    /// The program is not in the root.
    #[error("{program:?} is not in the image (searched PATH {path})")]
    CommandNotFound {
        /// The program.
        program: String,
        /// The PATH searched.
        path: String,
    },
    /// A local file or process operation failed.
    #[error("sandbox: {op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file, directory or program.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SandboxError {
    let path = path.to_path_buf();
    move |source| SandboxError::Io { op, path, source }
}

/// Runs `workload` on a writable, throw-away view of `lower` (read-only
/// directories, top layer first), with `dir` (an empty directory, on a short
/// path without `,` or `:`) for the sandbox's own mounts. Blocking; returns how
/// the workload ended and how long it ran. Needs root.
pub fn run(
    lower: &[&Path],
    dir: &Path,
    workload: &Workload,
    limits: &Limits,
) -> Result<(RunOutcome, Duration), SandboxError> {
    let mut mounts = Mounts::default();
    // A tmpfs upper layer: the workload may write (logs, pid files) and every
    // write is discarded.
    let rw = dir.join("rw");
    std::fs::create_dir_all(&rw).map_err(io_err("create", &rw))?;
    zest_mount::tmpfs(&rw, 0o755)?;
    mounts.0.push(rw.clone());
    let (upper, work, root) = (rw.join("upper"), rw.join("work"), dir.join("root"));
    for d in [&upper, &work, &root] {
        std::fs::create_dir_all(d).map_err(io_err("create", d))?;
    }
    let layers = Overlay {
        lower: lower.to_vec(),
        upper: Some((&upper, &work)),
    };
    zest_mount::overlay(&root, &layers)?;
    mounts.0.push(root.clone());

    let program = workload.program(&root)?;
    let mut cmd = Command::new(&program);
    cmd.args(workload.argv.iter().skip(1))
        .env_clear()
        .envs(workload.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .process_group(0);
    if limits.ready.is_some() {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    }
    enter_root_before_exec(&mut cmd, &root, &workload.cwd)?;

    let started = Instant::now();
    let mut child = cmd.spawn().map_err(io_err("start", Path::new(&program)))?;
    let group = ProcessGroup(child.id() as libc::pid_t);
    let seen_ready = Arc::new(AtomicBool::new(false));
    if let Some(marker) = &limits.ready {
        let streams: [Option<Box<dyn Read + Send>>; 2] = [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ];
        for stream in streams.into_iter().flatten() {
            watch_for_ready(stream, marker.clone(), seen_ready.clone());
        }
    }
    let deadline = started + limits.timeout;
    let outcome = loop {
        if seen_ready.load(Ordering::Acquire) {
            group.kill();
            let _ = child.wait();
            break RunOutcome::Ready;
        }
        match child.try_wait() {
            Ok(Some(status)) => {
                break match (status.code(), status.signal()) {
                    (Some(c), _) => RunOutcome::Exited(c),
                    (None, Some(s)) => RunOutcome::Signaled(s),
                    (None, None) => RunOutcome::Exited(-1),
                };
            }
            Ok(None) if Instant::now() >= deadline => {
                group.kill();
                let _ = child.wait();
                break RunOutcome::TimedOut;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(io_err("wait for", Path::new(&program))(e)),
        }
    };
    let run_time = started.elapsed();
    // Whatever the workload left running in its group goes too (`group` is
    // dropped before `mounts`, so nothing of it holds the overlay any more).
    drop(group);
    drop(mounts);
    Ok((outcome, run_time))
}

/// Makes `cmd`'s child enter a private mount namespace, mount `/proc` and `/dev`
/// there, chroot into `root` and change to `cwd`, between fork and exec.
fn enter_root_before_exec(cmd: &mut Command, root: &Path, cwd: &str) -> Result<(), SandboxError> {
    // Mountpoints for /proc and /dev, in the discarded upper layer.
    let proc_dir = root.join("proc");
    let dev_dir = root.join("dev");
    let _ = std::fs::create_dir_all(&proc_dir);
    let _ = std::fs::create_dir_all(&dev_dir);
    let private = ChildMount::make_private();
    let proc_mount = ChildMount::proc(&proc_dir)?;
    let dev_mount = ChildMount::rbind(Path::new("/dev"), &dev_dir)?;
    let c_root = CString::new(root.as_os_str().as_encoded_bytes())
        .map_err(|e| io_err("use", root)(e.into()))?;
    let c_cwd = CString::new(cwd).unwrap_or_else(|_| c"/".to_owned());
    // SAFETY: the closure runs in the forked child before exec and makes only
    // async-signal-safe system calls on strings prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            private.apply()?;
            // /proc and /dev are best effort: most startups work without them.
            let _ = proc_mount.apply();
            let _ = dev_mount.apply();
            if libc::chroot(c_root.as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::chdir(c_cwd.as_ptr()) != 0 && libc::chdir(c"/".as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// The workload's process group, killed (SIGKILL) when dropped.
struct ProcessGroup(libc::pid_t);

impl ProcessGroup {
    fn kill(&self) {
        // SAFETY: kill(2) has no memory effects; a negative pid names the
        // workload's own process group (it was started with process_group(0)).
        unsafe { libc::kill(-self.0, libc::SIGKILL) };
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The sandbox's mounts, removed in reverse order when dropped.
#[derive(Default)]
struct Mounts(Vec<PathBuf>);

impl Drop for Mounts {
    fn drop(&mut self) {
        while let Some(p) = self.0.pop() {
            if let Err(e) = zest_mount::umount_patiently(&p, UNMOUNT_PATIENCE) {
                tracing::warn!(error = %e, "unmount failed; detaching");
                let _ = zest_mount::detach(&p);
            }
        }
    }
}

/// Copies the workload's output to our stderr line by line and raises `seen`
/// when a line contains `marker`. The thread ends with the stream (when the
/// workload's process group is gone).
fn watch_for_ready(stream: Box<dyn Read + Send>, marker: String, seen: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        // Lines are bounded so a workload printing without newlines cannot grow memory.
        while let Ok(n) = std::io::Read::by_ref(&mut reader)
            .take(64 << 10)
            .read_until(b'\n', &mut line)
        {
            if n == 0 {
                break;
            }
            let _ = std::io::stderr().write_all(&line);
            if String::from_utf8_lossy(&line).contains(&marker) {
                seen.store(true, Ordering::Release);
            }
            line.clear();
        }
    });
}
