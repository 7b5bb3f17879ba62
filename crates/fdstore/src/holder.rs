//! The fd holder: a small process that keeps descriptors for the daemon while the
//! daemon restarts, crashes or is replaced by another binary (`zest fd-holder`).
//!
//! It listens on a `SOCK_SEQPACKET` unix socket (mode 0600, only peers with its
//! own user id are served) and speaks the protocol of [`crate::wire`]. It is one
//! thread with one `poll(2)` loop over the socket, its clients and every held
//! descriptor: a held descriptor that reports `POLLERR`, `POLLHUP` or `POLLNVAL` is
//! dropped (for `/dev/fuse` the kernel reports `POLLERR` once the connection is
//! aborted or unmounted), so the holder never keeps a dead connection.
//!
//! Invariants: state is only in memory (the daemon stores again what it serves);
//! one holder per socket (a lock file next to it); every message is bounded, a
//! client that sends garbage or stops reading is disconnected and cannot block
//! the others for longer than [`SEND_TIMEOUT`]; the holder exits once it holds
//! nothing and no client has been connected for the idle time it was given.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    accept4, bind, getsockopt, listen, setsockopt, socket, sockopt, AddressFamily, Backlog,
    SockFlag, SockType, UnixAddr,
};

use crate::wire::{self, Record};

/// How long an answer may wait for a client's socket buffer.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// Most clients at once; more are disconnected at once.
const MAX_CLIENTS: usize = 64;
/// Most descriptors held.
pub const MAX_HELD: usize = 65_536;
/// Most bytes of names per `F` answer.
const NAMES_PER_ANSWER: usize = 32 * 1024;

/// How to run a holder.
#[derive(Debug, Clone)]
pub struct HolderOptions {
    /// The socket to listen on; the lock file (`.lock`) and the pid file (`.pid`)
    /// are kept next to it.
    pub socket: PathBuf,
    /// Exit after holding nothing with no client connected for this long.
    pub idle_exit: Duration,
}

/// The lock file of the holder serving `socket`.
pub fn lock_path(socket: &Path) -> PathBuf {
    with_suffix(socket, ".lock")
}

/// The file the holder serving `socket` writes its process id to.
pub fn pid_path(socket: &Path) -> PathBuf {
    with_suffix(socket, ".pid")
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Why the holder could not run.
#[derive(Debug, thiserror::Error)]
#[error("fd holder on {}: {what}: {source}", socket.display())]
pub struct HolderError {
    socket: PathBuf,
    what: &'static str,
    #[source]
    source: io::Error,
}

/// Serves until idle (see [`HolderOptions::idle_exit`]). Returns at once, with
/// success, when another holder already serves the socket.
pub fn run_holder(options: &HolderOptions) -> Result<(), HolderError> {
    let err = |what: &'static str| {
        let socket = options.socket.clone();
        move |source: io::Error| HolderError {
            socket,
            what,
            source,
        }
    };
    if let Some(parent) = options.socket.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(err("creating its directory"))?;
    }
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(lock_path(&options.socket))
        .map_err(err("opening the lock file"))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            tracing::info!(socket = %options.socket.display(), "another fd holder serves this socket");
            return Ok(());
        }
        return Err(err("locking")(e));
    }
    raise_fd_limit();
    match fs::remove_file(&options.socket) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err("removing the stale socket")(e)),
    }
    let listener = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|e| err("creating the socket")(e.into()))?;
    let address = UnixAddr::new(&options.socket).map_err(|e| err("socket path")(e.into()))?;
    bind(listener.as_raw_fd(), &address).map_err(|e| err("binding")(e.into()))?;
    fs::set_permissions(&options.socket, fs::Permissions::from_mode(0o600))
        .map_err(err("setting the socket's mode"))?;
    listen(&listener, Backlog::new(16).unwrap_or(Backlog::MAXCONN))
        .map_err(|e| err("listening")(e.into()))?;
    fs::write(
        pid_path(&options.socket),
        format!("{}\n", std::process::id()),
    )
    .map_err(err("writing the pid file"))?;
    tracing::info!(socket = %options.socket.display(), "fd holder serving");
    let mut holder = Holder {
        held: BTreeMap::new(),
        clients: Vec::new(),
    };
    holder.serve(&listener, options.idle_exit);
    // Still under the lock: a new holder cannot have bound the socket yet.
    let _ = fs::remove_file(&options.socket);
    let _ = fs::remove_file(pid_path(&options.socket));
    drop(lock);
    tracing::info!(socket = %options.socket.display(), "fd holder idle; exiting");
    Ok(())
}

/// Lets the holder keep as many descriptors as the hard limit allows.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

struct Holder {
    held: BTreeMap<String, OwnedFd>,
    clients: Vec<OwnedFd>,
}

impl Holder {
    fn serve(&mut self, listener: &OwnedFd, idle_exit: Duration) {
        let mut idle_since = Instant::now();
        loop {
            if !self.held.is_empty() || !self.clients.is_empty() {
                idle_since = Instant::now();
            } else if idle_since.elapsed() >= idle_exit {
                return;
            }
            let (listener_ready, ready_clients, dead) = match self.wait(listener) {
                Ok(ready) => ready,
                Err(e) => {
                    tracing::warn!(error = %e, "poll failed");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            for name in dead {
                tracing::info!(name, "dropping a descriptor whose connection is gone");
                self.held.remove(&name);
            }
            // Highest index first, so that removals keep the other indices valid.
            for i in ready_clients.into_iter().rev() {
                if !self.handle(i) {
                    self.clients.swap_remove(i);
                }
            }
            if listener_ready {
                self.accept(listener);
            }
        }
    }

    /// Polls everything once (at most a second, for the idle check). Returns
    /// whether the listener is readable, the clients with something to read, and
    /// the held descriptors that are dead.
    #[allow(clippy::type_complexity)]
    fn wait(&self, listener: &OwnedFd) -> io::Result<(bool, Vec<usize>, Vec<String>)> {
        let mut fds = Vec::with_capacity(1 + self.clients.len() + self.held.len());
        fds.push(PollFd::new(listener.as_fd(), PollFlags::POLLIN));
        fds.extend(
            self.clients
                .iter()
                .map(|c| PollFd::new(c.as_fd(), PollFlags::POLLIN)),
        );
        // No events asked: only POLLERR, POLLHUP and POLLNVAL are reported, which
        // is how a descriptor says its connection is gone. (Asking for POLLIN would
        // wake us for every request queued on a FUSE connection.)
        fds.extend(
            self.held
                .values()
                .map(|fd| PollFd::new(fd.as_fd(), PollFlags::empty())),
        );
        poll(&mut fds, PollTimeout::from(1000u16))?;
        let fired = |p: &PollFd| p.revents().is_some_and(|r| !r.is_empty());
        let listener_ready = fired(&fds[0]);
        let clients = (0..self.clients.len())
            .filter(|i| fired(&fds[1 + i]))
            .collect();
        let dead = self
            .held
            .keys()
            .enumerate()
            .filter(|(i, _)| fired(&fds[1 + self.clients.len() + i]))
            .map(|(_, name)| name.clone())
            .collect();
        Ok((listener_ready, clients, dead))
    }

    fn accept(&mut self, listener: &OwnedFd) {
        let raw = match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            Ok(fd) => fd,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => return,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                return;
            }
        };
        // SAFETY: accept4 returned a new descriptor that we own.
        let client = unsafe { OwnedFd::from_raw_fd(raw) };
        match getsockopt(&client, sockopt::PeerCredentials) {
            // SAFETY: geteuid cannot fail.
            Ok(cred) if cred.uid() == unsafe { libc::geteuid() } => {}
            Ok(cred) => {
                tracing::warn!(uid = cred.uid(), "refusing a client of another user");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read a client's credentials");
                return;
            }
        }
        if self.clients.len() >= MAX_CLIENTS {
            tracing::warn!("too many clients; refusing one");
            return;
        }
        let timeout = nix::sys::time::TimeVal::new(SEND_TIMEOUT.as_secs() as _, 0);
        if let Err(e) = setsockopt(&client, sockopt::SendTimeout, &timeout) {
            tracing::warn!(error = %e, "cannot bound a client's send time");
            return;
        }
        self.clients.push(client);
    }

    /// Serves one record from client `i`; false when the client must go.
    fn handle(&mut self, i: usize) -> bool {
        // A second descriptor of the connection, so that answering may change the
        // holder's state.
        let client = match self.clients[i].try_clone() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot serve a client");
                return false;
            }
        };
        let client = client.as_fd();
        let record = match wire::recv(client) {
            Ok(Some(r)) => r,
            Ok(None) => return false,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) => {
                tracing::warn!(error = %e, "bad record from a client; disconnecting it");
                let _ = wire::send(client, &error_answer(&e.to_string()), &[]);
                return false;
            }
        };
        let answer = self.answer(client, record);
        match answer {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "cannot answer a client; disconnecting it");
                false
            }
        }
    }

    fn answer(&mut self, client: BorrowedFd<'_>, record: Record) -> io::Result<()> {
        let Record { bytes, mut fds } = record;
        let refuse = |why: String| wire::send(client, &error_answer(&why), &[]);
        let Some((&op, name)) = bytes.split_first() else {
            return refuse("empty record".into());
        };
        match op {
            wire::STORE => {
                let name = match wire::check_name(name) {
                    Ok(n) => n.to_owned(),
                    Err(why) => return refuse(why),
                };
                if fds.len() != 1 {
                    return refuse(format!("store takes 1 descriptor, not {}", fds.len()));
                }
                if self.held.len() >= MAX_HELD && !self.held.contains_key(&name) {
                    return refuse(format!("holding {MAX_HELD} descriptors already"));
                }
                let fd = fds.remove(0);
                tracing::debug!(name, "holding a descriptor");
                self.held.insert(name, fd);
                wire::send(client, &[wire::OK], &[])
            }
            wire::DROP => {
                if !fds.is_empty() {
                    return refuse("drop takes no descriptor".into());
                }
                match wire::check_name(name) {
                    Ok(n) => {
                        if self.held.remove(n).is_some() {
                            tracing::debug!(name = n, "descriptor dropped");
                        }
                        wire::send(client, &[wire::OK], &[])
                    }
                    Err(why) => refuse(why),
                }
            }
            wire::LIST if name.is_empty() && fds.is_empty() => {
                let mut batch: Vec<(&String, &OwnedFd)> = Vec::new();
                let mut names = 0usize;
                for (n, fd) in &self.held {
                    if batch.len() == wire::MAX_FDS || names + n.len() + 1 > NAMES_PER_ANSWER {
                        send_batch(client, &batch)?;
                        batch.clear();
                        names = 0;
                    }
                    names += n.len() + 1;
                    batch.push((n, fd));
                }
                if !batch.is_empty() {
                    send_batch(client, &batch)?;
                }
                wire::send(client, &[wire::OK], &[])
            }
            wire::LIST => refuse("list takes no name and no descriptor".into()),
            other => refuse(format!("unknown request {other:#04x}")),
        }
    }
}

fn send_batch(client: BorrowedFd<'_>, batch: &[(&String, &OwnedFd)]) -> io::Result<()> {
    let mut bytes = vec![wire::FDS];
    for (i, (name, _)) in batch.iter().enumerate() {
        if i > 0 {
            bytes.push(0);
        }
        bytes.extend_from_slice(name.as_bytes());
    }
    let fds: Vec<BorrowedFd<'_>> = batch.iter().map(|(_, fd)| fd.as_fd()).collect();
    wire::send(client, &bytes, &fds)
}

fn error_answer(why: &str) -> Vec<u8> {
    let mut bytes = vec![wire::ERROR];
    bytes.extend_from_slice(why.as_bytes());
    bytes.truncate(1024);
    bytes
}

/// Whether a holder runs for `socket` (it holds the lock file).
pub fn holder_running(socket: &Path) -> bool {
    let Ok(lock) = File::open(lock_path(socket)) else {
        return false;
    };
    // SAFETY: flock on a descriptor we own.
    let free = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0;
    !free
}
