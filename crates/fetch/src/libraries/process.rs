//! What a process in a container runs, read from `/proc` when it first asks
//! a layer for something: the start command prefetch for the command that
//! actually runs, not only the one the image's config names.
//!
//! A container often runs another command than its image's Entrypoint and
//! Cmd (a Kubernetes pod's `command` and `args`, `ctr run IMAGE ID CMD...`),
//! and a start script's programs run commands of their own. The filesystem
//! passes the process ID of each request ([`LibraryStack::process_seen`]);
//! the first request of a process (throttled per stack) has its command
//! line, environment and working directory read in a blocking task and
//! handed to [`LibraryStack::prefetch_start`]. The interpreter's script (the
//! `app.py` of `python3 app.py`) is then fetched and its imports walked while
//! the interpreter itself still loads, instead of when it opens the script.
//!
//! The layer that sees a process first is seldom its image's top one
//! (overlayfs asks the top layer only for the directories it has: the
//! interpreter and its libraries live below), and a lower layer's stack does
//! not see the files above it (the script). So the command goes to the stack
//! of the mount that is the first lower directory of the process's root
//! (read from its mount table), when that is a mount of this daemon
//! ([`MountStacks`]); else to the stack that saw the process.
//!
//! Only processes whose root directory is not the daemon's own are looked at:
//! those inside a container (`pivot_root`), not the host's tools that read
//! a layer's directory. Everything read is untrusted input and bounded;
//! reading `/proc/PID/cmdline` can wait for the process's memory map lock,
//! which a page fault this filesystem is serving may hold, so it never runs
//! on the fetch runtime's threads or the filesystem's.

use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::{LibraryStack, StartCommand};
use zest_oci::DEFAULT_PATH;

/// Bytes of a process's command line read.
const MAX_CMDLINE_BYTES: u64 = 64 << 10;

/// Bytes of a process's environment read.
const MAX_ENVIRON_BYTES: u64 = 64 << 10;

/// Arguments and environment variables taken from a process, each.
const MAX_WORDS: usize = 256;

/// Commands remembered per stack as handled.
const MAX_HANDLED: usize = 64;

/// Mounts whose stacks are remembered, at most (dropped ones are pruned
/// first).
const MAX_MOUNTS: usize = 4096;

/// A process is looked at again no sooner than this after its last look: a
/// start makes hundreds of requests, and its command changes only at an
/// `exec` (`runc init` becoming the container's program), which the next
/// request past this time finds. Short against a cold start's first
/// fetches; long enough that busy processes cost a few looks a second.
const RECHECK_AFTER: Duration = Duration::from_millis(10);

/// Processes whose last look is remembered, at most.
const MAX_WATCHED: usize = 1024;

/// Looks at processes in flight at once, at most; a request that would
/// start another is not looked at (advice).
const MAX_LOOKS: usize = 4;

/// Per daemon: when each process was last looked at, and how many looks
/// are in flight.
#[derive(Debug, Default)]
pub(super) struct ProcessWatch {
    looked: Mutex<HashMap<u32, Instant>>,
    in_flight: std::sync::atomic::AtomicUsize,
}

impl ProcessWatch {
    /// Whether a request of `pid` at `now` should have the process looked
    /// at: the first one of the process, or the first past
    /// [`RECHECK_AFTER`], while fewer than [`MAX_LOOKS`] looks are in
    /// flight. A lock and a map lookup on the request path.
    fn due(&self, pid: u32, now: Instant) -> bool {
        use std::sync::atomic::Ordering;
        let mut looked = self.looked.lock();
        if looked
            .get(&pid)
            .is_some_and(|at| now.saturating_duration_since(*at) < RECHECK_AFTER)
        {
            return false;
        }
        if self.in_flight.load(Ordering::Relaxed) >= MAX_LOOKS {
            return false;
        }
        if looked.len() >= MAX_WATCHED {
            looked.retain(|_, at| now.saturating_duration_since(*at) < RECHECK_AFTER);
            if looked.len() >= MAX_WATCHED {
                looked.clear();
            }
        }
        looked.insert(pid, now);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// A look [`due`](Self::due) started has ended.
    fn done(&self) {
        self.in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A look at a process in flight, counted by [`ProcessWatch::due`] until
/// dropped.
struct LookSlot(Arc<super::LibraryPrefetch>);

impl Drop for LookSlot {
    fn drop(&mut self) {
        self.0.processes.done();
    }
}

/// Per stack: the commands prefetched (by a hash of the command line): a
/// stack is one image's layers, where one command reads the same files
/// whichever process runs it.
#[derive(Debug, Default)]
pub(super) struct Handled {
    keys: Mutex<VecDeque<u64>>,
}

impl Handled {
    /// Records command line `argv` as handled; false when it was.
    pub(super) fn first_time(&self, argv: &[String]) -> bool {
        let key = command_key(argv);
        let mut keys = self.keys.lock();
        if keys.contains(&key) {
            return false;
        }
        if keys.len() >= MAX_HANDLED {
            keys.pop_front();
        }
        keys.push_back(key);
        true
    }
}

/// The stacks of a daemon's mounted layers by mount directory: where the
/// command of a process whose root has that directory as its first lower
/// directory goes. Weak: a stack lives as long as its mount.
#[derive(Debug, Default)]
pub struct MountStacks {
    stacks: Mutex<HashMap<PathBuf, Weak<LibraryStack>>>,
}

impl MountStacks {
    /// Remembers that `stack` serves the layer mounted on `dir`.
    pub fn insert(&self, dir: &Path, stack: &Arc<LibraryStack>) {
        let mut stacks = self.stacks.lock();
        if stacks.len() >= MAX_MOUNTS {
            stacks.retain(|_, s| s.strong_count() > 0);
            if stacks.len() >= MAX_MOUNTS {
                stacks.clear();
            }
        }
        stacks.insert(dir.to_path_buf(), Arc::downgrade(stack));
    }

    /// The stack of the layer mounted on `dir`: an absolute path, or one
    /// relative to a directory (containerd shortens long overlay options so)
    /// that names exactly one mount.
    fn get(&self, dir: &Path) -> Option<Arc<LibraryStack>> {
        let stacks = self.stacks.lock();
        if dir.is_absolute() {
            return stacks.get(dir)?.upgrade();
        }
        let mut found = stacks
            .iter()
            .filter(|(d, _)| d.ends_with(dir))
            .filter_map(|(_, s)| s.upgrade());
        let first = found.next()?;
        found.next().is_none().then_some(first)
    }
}

/// A hash of a command line, to tell whether a process's was handled.
fn command_key(argv: &[String]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    argv.hash(&mut h);
    h.finish()
}

impl LibraryStack {
    /// A request of process `pid` reached the stack's layer. The first one of
    /// a process (and the first after [`RECHECK_AFTER`], to see an `exec`)
    /// has the process looked at in the background: when it runs in a
    /// container a command not prefetched yet, that command is, like the
    /// image's own start command, with the stack of the container's top
    /// layer. Cheap on the request path; advice only.
    pub fn process_seen(self: &Arc<Self>, pid: u32) {
        if pid == 0 || !self.shared.processes.due(pid, Instant::now()) {
            return;
        }
        // Ends the look however its task ends (or never runs).
        let slot = LookSlot(Arc::clone(&self.shared));
        let Some(top) = self.fetcher(0) else {
            return;
        };
        let this = Arc::clone(self);
        top.spawn(async move {
            let look = {
                let this = Arc::clone(&this);
                tokio::task::spawn_blocking(move || {
                    this.look_at(Path::new("/proc"), pid, zest_mount::root_overlay_top_layer)
                })
            };
            let found = look.await;
            drop(slot);
            if let Ok(Some((stack, command))) = found {
                stack
                    .shared
                    .process_commands
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(pid, argv = ?command.argv, "prefetching what a container's process starts");
                stack.prefetch_start(command);
            }
        });
    }

    /// Looks at process `pid` in `proc` (a procfs; blocking): the stack its
    /// command goes to (that of the mount `top_layer` names as the first
    /// lower directory of the process's root, else this one) and the
    /// command, when it runs in a container (a root of its own) a command
    /// that stack has not prefetched yet.
    fn look_at(
        self: &Arc<Self>,
        proc: &Path,
        pid: u32,
        top_layer: impl FnOnce(u32) -> Option<PathBuf>,
    ) -> Option<(Arc<LibraryStack>, StartCommand)> {
        let dir = proc.join(pid.to_string());
        let argv = read_argv(&dir)?;
        // The image's top layer's stack sees every layer of the image.
        let stack = top_layer(pid)
            .and_then(|top| self.shared.mounts.get(&top))
            .unwrap_or_else(|| Arc::clone(self));
        if !stack.handled.first_time(&argv) {
            return None;
        }
        Some((stack, read_context(&dir, argv)))
    }
}

/// The arguments of the process whose procfs directory is `dir`; `None`
/// when the process is gone, has none (a kernel thread, a zombie), or shares
/// this process's root directory (it is not in a container).
fn read_argv(dir: &Path) -> Option<Vec<String>> {
    // The daemon's own root, looked at once.
    static OWN_ROOT: std::sync::OnceLock<Option<(u64, u64)>> = std::sync::OnceLock::new();
    let own = (*OWN_ROOT.get_or_init(|| std::fs::metadata("/").ok().map(|m| (m.dev(), m.ino()))))?;
    let root = std::fs::metadata(dir.join("root")).ok()?;
    if (root.dev(), root.ino()) == own {
        return None;
    }
    let argv = nul_separated(&read_bounded(&dir.join("cmdline"), MAX_CMDLINE_BYTES)?);
    (!argv.is_empty()).then_some(argv)
}

/// The command `argv` of the process whose procfs directory is `dir`, with
/// its `PATH`, working directory and environment (defaults where they
/// cannot be read).
fn read_context(dir: &Path, argv: Vec<String>) -> StartCommand {
    let env: Vec<(String, String)> =
        nul_separated(&read_bounded(&dir.join("environ"), MAX_ENVIRON_BYTES).unwrap_or_default())
            .into_iter()
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.to_owned(), v.to_owned()))
            })
            .collect();
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map_or_else(|| DEFAULT_PATH.to_owned(), |(_, v)| v.clone());
    // The link reads as the directory inside the process's own root.
    let working_dir = std::fs::read_link(dir.join("cwd"))
        .ok()
        .and_then(|p| p.to_str().map(str::to_owned))
        .filter(|p| p.starts_with('/') && !p.ends_with(" (deleted)"))
        .unwrap_or_else(|| "/".to_owned());
    StartCommand {
        argv,
        path,
        working_dir,
        env,
    }
}

/// At most `max` bytes of file `path`.
fn read_bounded(path: &Path, max: u64) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(max)
        .read_to_end(&mut out)
        .ok()?;
    Some(out)
}

/// The NUL-separated words of `bytes` that are UTF-8, at most
/// [`MAX_WORDS`]; a cut-off last word is dropped.
fn nul_separated(bytes: &[u8]) -> Vec<String> {
    let mut words: Vec<&[u8]> = bytes.split(|&b| b == 0).collect();
    // A complete list ends with a NUL: the last piece is empty or cut off.
    words.pop();
    words
        .into_iter()
        .take(MAX_WORDS)
        .filter_map(|w| std::str::from_utf8(w).ok())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_nul_terminated_and_bounded() {
        assert_eq!(
            nul_separated(b"python3\0/app/main.py\0"),
            vec!["python3", "/app/main.py"]
        );
        // A command line read short: the cut-off word is not taken.
        assert_eq!(nul_separated(b"python3\0/app/ma"), vec!["python3"]);
        assert!(nul_separated(b"").is_empty());
        // Not UTF-8: skipped, the others kept.
        assert_eq!(nul_separated(b"a\0\xff\xfe\0b\0"), vec!["a", "b"]);
        let many = "x\0".repeat(MAX_WORDS * 2);
        assert_eq!(nul_separated(many.as_bytes()).len(), MAX_WORDS);
    }

    #[test]
    fn a_process_is_looked_at_again_only_after_a_pause_and_looks_are_bounded() {
        let w = ProcessWatch::default();
        let t = Instant::now();
        assert!(w.due(7, t));
        w.done();
        assert!(!w.due(7, t + RECHECK_AFTER / 2), "looked at just now");
        assert!(w.due(8, t + RECHECK_AFTER / 2), "another process");
        w.done();
        assert!(w.due(7, t + RECHECK_AFTER * 2), "after the pause: an exec?");
        w.done();
        // Looks in flight are bounded: a request past them is not looked at.
        let later = t + RECHECK_AFTER * 4;
        for pid in 0..MAX_LOOKS as u32 {
            assert!(w.due(100 + pid, later));
        }
        assert!(!w.due(200, later));
        w.done();
        assert!(w.due(200, later));
        // The remembered processes are bounded.
        for pid in 1000..1000 + MAX_WATCHED as u32 * 2 {
            w.done();
            w.due(pid, later);
        }
        assert!(w.looked.lock().len() <= MAX_WATCHED);
    }

    #[test]
    fn a_command_is_prefetched_once_per_stack() {
        let h = Handled::default();
        let argv = |s: &str| s.split(' ').map(str::to_owned).collect::<Vec<_>>();
        assert!(h.first_time(&argv("runc init")));
        assert!(h.first_time(&argv("python3 /app/main.py")));
        assert!(!h.first_time(&argv("python3 /app/main.py")));
        assert!(h.first_time(&argv("python3 /app/other.py")));
        for i in 0..MAX_HANDLED * 2 {
            h.first_time(&argv(&format!("sh -c {i}")));
        }
        assert_eq!(h.keys.lock().len(), MAX_HANDLED);
    }

    #[test]
    fn a_mount_directory_names_its_stack() {
        let shared = super::super::LibraryPrefetch::new(1 << 20);
        let a = LibraryStack::new(Arc::clone(&shared), Vec::new());
        let b = LibraryStack::new(Arc::clone(&shared), Vec::new());
        let m = MountStacks::default();
        m.insert(Path::new("/s/12/fs"), &a);
        m.insert(Path::new("/s/112/fs"), &b);
        let get = |d: &str| m.get(Path::new(d));
        assert!(Arc::ptr_eq(&get("/s/12/fs").unwrap(), &a));
        assert!(get("/s/13/fs").is_none());
        // Relative: only a whole-component suffix that names one mount.
        assert!(Arc::ptr_eq(&get("12/fs").unwrap(), &a));
        assert!(get("fs").is_none());
        // A stack lives as long as its mount.
        drop(a);
        assert!(get("/s/12/fs").is_none());
    }

    #[test]
    fn a_process_outside_a_container_is_not_read() {
        // This test's own process shares the root directory it compares with.
        let own = Path::new("/proc").join(std::process::id().to_string());
        assert!(read_argv(&own).is_none());
        // A process that does not exist.
        assert!(read_argv(&Path::new("/proc").join(u32::MAX.to_string())).is_none());
    }

    /// A fake procfs entry 42 under `proc`: a root that is not "/", command
    /// line `cmdline`, an environment and a working directory.
    fn fake_process(proc: &Path, rootfs: &Path, cmdline: &[u8]) -> PathBuf {
        let dir = proc.join("42");
        std::fs::create_dir_all(&dir).unwrap();
        let _ = std::fs::remove_file(dir.join("root"));
        std::os::unix::fs::symlink(rootfs, dir.join("root")).unwrap();
        std::fs::write(dir.join("cmdline"), cmdline).unwrap();
        std::fs::write(
            dir.join("environ"),
            b"HOME=/root\0PATH=/opt/py/bin:/usr/bin\0LANG=C.UTF-8\0",
        )
        .unwrap();
        let _ = std::fs::remove_file(dir.join("cwd"));
        std::os::unix::fs::symlink("/srv/app", dir.join("cwd")).unwrap();
        dir
    }

    #[test]
    fn a_process_in_another_root_is_read_from_its_proc_entry() {
        let proc = tempfile::tempdir().unwrap();
        let rootfs = tempfile::tempdir().unwrap();
        let dir = fake_process(proc.path(), rootfs.path(), b"python3\0app.py\0");
        let argv = read_argv(&dir).expect("read");
        assert_eq!(argv, vec!["python3", "app.py"]);
        let c = read_context(&dir, argv.clone());
        assert_eq!(c.path, "/opt/py/bin:/usr/bin");
        assert_eq!(c.working_dir, "/srv/app");
        assert!(c.env.contains(&("LANG".into(), "C.UTF-8".into())));
        // No environment and a working directory that is gone: defaults.
        std::fs::remove_file(dir.join("environ")).unwrap();
        std::fs::remove_file(dir.join("cwd")).unwrap();
        std::os::unix::fs::symlink("/srv/app (deleted)", dir.join("cwd")).unwrap();
        let c = read_context(&dir, argv);
        assert_eq!(c.path, DEFAULT_PATH);
        assert_eq!(c.working_dir, "/");
        // No arguments (a kernel thread, a zombie): nothing to prefetch.
        std::fs::write(dir.join("cmdline"), b"").unwrap();
        assert!(read_argv(&dir).is_none());
    }

    #[test]
    fn a_process_command_goes_to_its_roots_top_layer_stack_once() {
        let shared = super::super::LibraryPrefetch::new(1 << 20);
        let lower = LibraryStack::new(Arc::clone(&shared), Vec::new());
        let top = LibraryStack::new(Arc::clone(&shared), Vec::new());
        shared.mounts.insert(Path::new("/s/2/fs"), &top);
        let proc = tempfile::tempdir().unwrap();
        let rootfs = tempfile::tempdir().unwrap();
        let root_on = |dir: &'static str| move |pid: u32| (pid == 42).then(|| PathBuf::from(dir));
        fake_process(proc.path(), rootfs.path(), b"python3\0app.py\0");
        // Seen by a lower layer's stack, prefetched with the top one's.
        let (stack, command) = lower
            .look_at(proc.path(), 42, root_on("/s/2/fs"))
            .expect("a command");
        assert!(Arc::ptr_eq(&stack, &top));
        assert_eq!(command.argv, vec!["python3", "app.py"]);
        assert!(
            lower.look_at(proc.path(), 42, root_on("/s/2/fs")).is_none(),
            "prefetched already"
        );
        // After an exec, the new command.
        fake_process(proc.path(), rootfs.path(), b"node\0server.js\0");
        let (stack, command) = top
            .look_at(proc.path(), 42, root_on("/s/2/fs"))
            .expect("a command");
        assert!(Arc::ptr_eq(&stack, &top));
        assert_eq!(command.argv, vec!["node", "server.js"]);
        // A root whose top layer is not a mount of this daemon: the stack
        // that saw the process.
        fake_process(proc.path(), rootfs.path(), b"sh\0run.sh\0");
        let (stack, _) = lower
            .look_at(proc.path(), 42, root_on("/elsewhere/fs"))
            .expect("a command");
        assert!(Arc::ptr_eq(&stack, &lower));
        // A process of the host (this test's): not looked at.
        let own = std::process::id();
        assert!(lower.look_at(Path::new("/proc"), own, |_| None).is_none());
    }
}
