//! The thin adapter between the kernel's FUSE protocol (through the `fuser`
//! crate) and [`LayerFs`]. This is the only file that names `fuser`: changing
//! the FUSE library means rewriting this file and nothing else.
//!
//! It mounts with `mount(2)` itself through `zest_mount` (we run as root,
//! so no setuid helper is involved) and then runs a `fuser` session on the
//! already-mounted `/dev/fuse` descriptor, on a few worker threads that all read
//! that one descriptor. Unmounting is done by the caller (with
//! [`zest_mount::umount`]); the workers end when the kernel tears the connection
//! down.
//!
//! A layer never changes, so the kernel is asked to cache all it can and to send
//! as few requests as possible: OPENDIR, FLUSH and (unless passthrough or an
//! access recorder needs them) OPEN are answered with ENOSYS once, after which the
//! kernel opens files and directories itself for the rest of the connection's life
//! (see "Warm path" in docs/ARCHITECTURE.md).
//!
//! A connection can outlive the process: [`FuseSession::device`] is the descriptor
//! to hand to another process, and [`resume`] serves such a descriptor again
//! without a new FUSE_INIT (the kernel sends it once per connection), restoring
//! what the first INIT negotiated ([`Negotiated`]) and asking the kernel to resend
//! the requests the previous process had read but not answered. Workers share one
//! descriptor rather than one cloned descriptor each because the kernel fails the
//! unanswered requests of a cloned descriptor when it is closed; the requests read
//! from the shared one survive as long as the kept descriptor does.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    BackingId, Config, Errno as FuseErrno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyXattr, Request, SessionACL,
};

use super::{Errno, LayerFs, NodeAttr, NodeKind, ReadReply, RequestKind, XattrAnswer};
use zest_mount::{self, MountFlags};

/// Kernel-side options of one FUSE mount.
#[derive(Clone, Debug)]
pub(crate) struct FuseMountConfig {
    /// Worker threads serving kernel requests.
    pub threads: usize,
    /// Honour device nodes (off: `nodev`).
    pub dev: bool,
    /// Honour setuid/setgid bits (off: `nosuid`).
    pub suid: bool,
    /// Name shown as the mount source in `/proc/self/mountinfo`.
    pub source: String,
    /// Offer FUSE over io_uring to the kernel (see [`IoUring`]).
    pub io_uring: bool,
}

/// Ring entries per kernel queue when io_uring is on. An entry stays with its
/// request until the reply, so reads waiting for the network hold entries: a
/// queue (one per CPU) serves this many requests of its CPU at once.
const IO_URING_QUEUE_DEPTH: u16 = 16;

/// How the kernel delivers a mount's FUSE requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoUring {
    /// Through `/dev/fuse` reads, as configured.
    Off,
    /// Negotiated at FUSE_INIT; ring entries being registered.
    Starting,
    /// Through io_uring ring entries (forgets and interrupts still come through
    /// `/dev/fuse`).
    Active,
    /// Asked for, but served through `/dev/fuse`: the kernel does not offer it
    /// (before 6.14, or the fuse module's `enable_uring` is off), the ring
    /// could not be set up, or the kernel refused its entries.
    Fallback,
}

/// io_uring transport of one mount: state and requests received through it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoUringStats {
    /// How requests are delivered.
    pub state: IoUring,
    /// Requests received through the ring.
    pub requests: u64,
}

/// Every live session's transport counters, and what ended sessions counted,
/// for process-wide metrics.
static RING_SESSIONS: Mutex<Vec<Arc<fuser::UringStats>>> = Mutex::new(Vec::new());
static RING_REQUESTS_RETIRED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Requests received through io_uring by every session of this process, ended
/// ones included, and the number of live sessions served through io_uring.
pub fn io_uring_totals() -> (u64, usize) {
    let live = RING_SESSIONS.lock();
    let requests = live.iter().map(|s| s.requests()).sum::<u64>()
        + RING_REQUESTS_RETIRED.load(std::sync::atomic::Ordering::Relaxed);
    let active = live
        .iter()
        .filter(|s| s.state() == fuser::UringState::Active)
        .count();
    (requests, active)
}

fn io_uring_stats(stats: &fuser::UringStats) -> IoUringStats {
    use fuser::UringState as S;
    let state = match stats.state() {
        S::Off | S::Inherited => IoUring::Off,
        S::Starting => IoUring::Starting,
        S::Active => IoUring::Active,
        S::NotOffered | S::SetupFailed | S::RegisterFailed => IoUring::Fallback,
    };
    IoUringStats {
        state,
        requests: stats.requests(),
    }
}

/// What the kernel and the filesystem agreed at FUSE_INIT that a later process
/// serving the same connection must honour.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Negotiated {
    /// Opens may be answered with a backing file (FUSE_PASSTHROUGH accepted).
    pub passthrough: bool,
    /// FUSE_OVER_IO_URING accepted: the kernel routes requests to ring entries
    /// this process registered, which no other process can take over.
    pub io_uring: bool,
}

/// A running FUSE session: the worker threads of one mounted layer.
pub(crate) struct FuseSession {
    thread: Option<JoinHandle<io::Result<()>>>,
    /// A duplicate of the descriptor the workers read, to hand the connection over.
    device: OwnedFd,
    negotiated: Negotiated,
    ring: Arc<fuser::UringStats>,
}

impl Drop for FuseSession {
    fn drop(&mut self) {
        let mut live = RING_SESSIONS.lock();
        if let Some(i) = live.iter().position(|s| Arc::ptr_eq(s, &self.ring)) {
            let ended = live.swap_remove(i);
            RING_REQUESTS_RETIRED.fetch_add(ended.requests(), std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl FuseSession {
    /// The io_uring transport's state and counter.
    pub(crate) fn io_uring(&self) -> IoUringStats {
        io_uring_stats(&self.ring)
    }

    /// The connection's `/dev/fuse` descriptor.
    pub(crate) fn device(&self) -> BorrowedFd<'_> {
        self.device.as_fd()
    }

    /// What the connection's FUSE_INIT negotiated.
    pub(crate) fn negotiated(&self) -> Negotiated {
        self.negotiated
    }

    /// Forgets the workers without waiting for them: they keep serving until the
    /// process exits or the connection ends.
    pub(crate) fn abandon(mut self) {
        drop(self.thread.take());
    }

    /// Waits for the workers to stop (they stop once the kernel connection is
    /// gone, i.e. after a successful unmount), at most `timeout`. Returns
    /// whether they stopped; if not, the thread is left detached.
    pub(crate) fn join(&mut self, timeout: Duration) -> bool {
        let Some(thread) = self.thread.take() else {
            return true;
        };
        let deadline = std::time::Instant::now() + timeout;
        while !thread.is_finished() {
            if std::time::Instant::now() >= deadline {
                tracing::warn!("FUSE workers still running after unmount; leaving them detached");
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        match thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "FUSE session ended with an error"),
            Err(_) => tracing::error!("FUSE session thread panicked"),
        }
        true
    }
}

/// Mounts `fs` on `mountpoint` and starts serving it. On return the kernel has
/// completed the FUSE handshake, so the mount is ready for use.
pub(crate) fn start(
    fs: Arc<LayerFs>,
    mountpoint: &Path,
    config: &FuseMountConfig,
) -> io::Result<FuseSession> {
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?;
    let fd: OwnedFd = dev.into();

    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut opts = format!(
        "fd={},rootmode=40000,user_id={uid},group_id={gid},default_permissions,allow_other",
        fd.as_raw_fd()
    );
    // Largest read the kernel may send us in one request; matches max_pages.
    opts.push_str(",max_read=1048576");
    let mut flags = MountFlags::RDONLY | MountFlags::NOATIME;
    if !config.dev {
        flags |= MountFlags::NODEV;
    }
    if !config.suid {
        flags |= MountFlags::NOSUID;
    }
    zest_mount::mount(&config.source, mountpoint, "fuse.zest", flags, &opts)?;

    let device = match fd.try_clone() {
        Ok(d) => d,
        Err(e) => {
            let _ = zest_mount::detach(mountpoint);
            return Err(e);
        }
    };
    let adapter = FuseLayer::new(Arc::clone(&fs));
    // The kernel queued FUSE_INIT at mount time; `from_fd` answers it.
    let session =
        match fuser::Session::from_fd(adapter, fd, SessionACL::All, session_config(config)) {
            Ok(s) => s,
            Err(e) => {
                let _ = zest_mount::detach(mountpoint);
                return Err(e);
            }
        };
    let ring = session.io_uring_stats();
    let io_uring = io_uring_stats(&ring);
    if config.io_uring && io_uring.state == IoUring::Fallback {
        tracing::info!(mountpoint = %mountpoint.display(), "FUSE over io_uring unavailable (the kernel does not offer it or the ring cannot be set up); serving /dev/fuse");
    }
    let negotiated = Negotiated {
        passthrough: fs.passthrough_active(),
        io_uring: io_uring.state == IoUring::Starting,
    };
    spawn(session, device, negotiated).inspect_err(|_| {
        let _ = zest_mount::detach(mountpoint);
    })
}

/// Serves `device`, the descriptor of a connection another process initialised
/// and served (its mount stays where it is), with `fs`. `negotiated` is what that
/// connection's FUSE_INIT agreed. Requests the previous process had read but not
/// answered are resent by the kernel (Linux 6.9 and later; before, they stay
/// unanswered).
pub(crate) fn resume(
    fs: Arc<LayerFs>,
    device: OwnedFd,
    negotiated: Negotiated,
    config: &FuseMountConfig,
) -> io::Result<FuseSession> {
    fs.set_passthrough_active(negotiated.passthrough);
    let kept = device.try_clone()?;
    let adapter = FuseLayer::new(fs);
    let session = fuser::Session::from_fd_initialized(
        adapter,
        device,
        SessionACL::All,
        session_config(config),
    );
    request_resend(kept.as_fd());
    spawn(session, kept, negotiated)
}

/// Asks the kernel to queue again every request of this connection that was read
/// but not answered (FUSE_NOTIFY_RESEND; the resent requests carry bit 63 in their
/// `unique`, which fuser echoes back unchanged in the reply).
fn request_resend(device: BorrowedFd<'_>) {
    const FUSE_NOTIFY_RESEND: i32 = 7;
    // struct fuse_out_header { u32 len; i32 error; u64 unique; }, with `error`
    // carrying the notification code and `unique` 0.
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&16u32.to_ne_bytes());
    header[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    // SAFETY: writes 16 bytes from a live buffer to a valid descriptor.
    let n = unsafe { libc::write(device.as_raw_fd(), header.as_ptr().cast(), header.len()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        // EINVAL: a kernel older than 6.9, which does not know the notification.
        tracing::info!(error = %e, "the kernel cannot resend requests the previous process had read; those stay unanswered");
    }
}

fn session_config(config: &FuseMountConfig) -> Config {
    let mut fuse_config = Config::default();
    fuse_config.acl = SessionACL::All;
    fuse_config.n_threads = Some(config.threads.max(1));
    // One descriptor for all workers: see the module docs.
    fuse_config.clone_fd = false;
    if config.io_uring {
        fuse_config.io_uring_queue_depth = IO_URING_QUEUE_DEPTH;
    }
    fuse_config
}

fn spawn(
    session: fuser::Session<FuseLayer>,
    device: OwnedFd,
    negotiated: Negotiated,
) -> io::Result<FuseSession> {
    let ring = session.io_uring_stats();
    let thread = std::thread::Builder::new()
        .name("zest-fuse".into())
        .spawn(move || session.run())?;
    RING_SESSIONS.lock().push(Arc::clone(&ring));
    Ok(FuseSession {
        thread: Some(thread),
        device,
        negotiated,
        ring,
    })
}

/// The `fuser::Filesystem` face of a [`LayerFs`].
struct FuseLayer {
    fs: Arc<LayerFs>,
    /// The file handle of every open answered by this session. After a takeover,
    /// files opened through the previous process carry its handles: their reads
    /// are served by inode like any other, and their releases are answered
    /// without touching this session's accounting (`opens`).
    handle: u64,
    /// Open handles per inode and how they are served, and backing ids.
    opens: Mutex<Opens>,
    /// The kernel understands ENOSYS to OPEN and OPENDIR (see `init`).
    kernel_skips_opens: bool,
}

/// The open handles of this session. The kernel refuses (EIO to the user) an
/// inode opened both through the page cache and by passthrough at once, and
/// wants one backing id per inode for all handles.
#[derive(Default)]
struct Opens {
    /// How the open handles of each inode are served.
    modes: HashMap<u64, OpenMode>,
    /// The backing id of each inode opened by passthrough so far. Kept after its
    /// last close, so that a later open costs neither an `open(2)` of the copy
    /// nor two ioctls; at most one per stored file (the store's budget bounds
    /// them), closed in the kernel when the session ends.
    backing: HashMap<u64, BackingId>,
}

/// How the open handles of one inode are served.
enum OpenMode {
    /// Through FUSE reads and the page cache; this many handles.
    Cached(usize),
    /// By passthrough to the inode's backing file; this many handles.
    Passthrough(usize),
}

impl FuseLayer {
    fn new(fs: Arc<LayerFs>) -> Self {
        // Distinct from the handles of the process this session may take over
        // from: the pid differs, and so, almost surely, does the time.
        let nanos = std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let handle = (u64::from(std::process::id()) << 32) | u64::from(nanos) | 1;
        FuseLayer {
            fs,
            handle,
            opens: Mutex::new(Opens::default()),
            // A connection taken over had its FUSE_INIT long ago; every kernel
            // zest supports (Debian 12's 6.1 and later) has both.
            kernel_skips_opens: true,
        }
    }
}

fn errno(e: Errno) -> FuseErrno {
    FuseErrno::from_i32(e.0)
}

fn file_type(kind: NodeKind) -> FileType {
    match kind {
        NodeKind::Directory => FileType::Directory,
        NodeKind::RegularFile => FileType::RegularFile,
        NodeKind::Symlink => FileType::Symlink,
        NodeKind::CharDevice => FileType::CharDevice,
        NodeKind::BlockDevice => FileType::BlockDevice,
        NodeKind::NamedPipe => FileType::NamedPipe,
    }
}

fn file_attr(a: &NodeAttr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.mtime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

impl ReadReply for ReplyData {
    fn data(self, data: &[u8]) {
        ReplyData::data(self, data);
    }
    fn error(self, err: Errno) {
        ReplyData::error(self, errno(err));
    }
}

fn reply_xattr(reply: ReplyXattr, answer: Result<XattrAnswer, Errno>) {
    match answer {
        Ok(XattrAnswer::Size(n)) => reply.size(n),
        Ok(XattrAnswer::Data(v)) => reply.data(&v),
        Err(e) => reply.error(errno(e)),
    }
}

impl Filesystem for FuseLayer {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Metadata never changes: let the kernel batch lookups with readdir and
        // cache symlink targets; parallel lookups in one directory are safe.
        let wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_CACHE_SYMLINKS;
        let _ = config.add_capabilities(wanted & config.capabilities());
        // The kernel announces that it takes ENOSYS to OPEN and OPENDIR as "open
        // it yourself, keep its cache, never ask again" (Linux 4.19 and 5.1);
        // before, ENOSYS would fail the user's open.
        self.kernel_skips_opens = config
            .capabilities()
            .contains(InitFlags::FUSE_NO_OPEN_SUPPORT | InitFlags::FUSE_NO_OPENDIR_SUPPORT);
        // Ask for the largest readahead the kernel allows: sequential readers then
        // send big requests, which map to fewer, larger chunk fetches.
        if let Err(max) = config.set_max_readahead(u32::MAX) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(64);
        if self.fs.wants_passthrough()
            && config.capabilities().contains(InitFlags::FUSE_PASSTHROUGH)
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
        {
            // Depth 1: the backing files live on a plain filesystem, and an
            // overlay can still be stacked on this mount (containerd does).
            if config.set_max_stack_depth(1).is_ok() {
                self.fs.set_passthrough_active(true);
            }
        }
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.fs.count_request(RequestKind::Lookup);
        self.fs.saw_process(req.pid());
        match self.fs.lookup(parent.0, name.as_bytes()) {
            Ok(a) => reply.entry(&self.fs.entry_ttl(), &file_attr(&a), Generation(0)),
            // A layer never changes: a name that is absent stays absent, so the
            // kernel may cache the miss (node id 0 = negative entry). overlayfs
            // looks every name up in each lower layer until it is found, and
            // path searches (PATH, sys.path, library paths) probe absent names.
            Err(e) if e == Errno::ENOENT => {
                let negative = FileAttr {
                    ino: INodeNo(0),
                    size: 0,
                    blocks: 0,
                    atime: UNIX_EPOCH,
                    mtime: UNIX_EPOCH,
                    ctime: UNIX_EPOCH,
                    crtime: UNIX_EPOCH,
                    kind: FileType::RegularFile,
                    perm: 0,
                    nlink: 0,
                    uid: 0,
                    gid: 0,
                    rdev: 0,
                    blksize: 0,
                    flags: 0,
                };
                reply.entry(&self.fs.entry_ttl(), &negative, Generation(0))
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.fs.count_request(RequestKind::Getattr);
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&self.fs.attr_ttl(), &file_attr(&a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.fs.count_request(RequestKind::Other);
        match self.fs.readlink(ino.0) {
            Ok(target) => reply.data(target),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.fs.count_request(RequestKind::Open);
        let write = !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY);
        if self.kernel_skips_opens && !write && !self.fs.needs_opens() {
            // The kernel opens this and every later file itself, with its page
            // cache kept, and sends neither OPEN nor RELEASE again (the mount is
            // read-only, so a write open never gets here).
            return reply.error(errno(Errno::ENOSYS));
        }
        let o = match self.fs.open(ino.0, write) {
            Ok(o) => o,
            Err(e) => return reply.error(errno(e)),
        };
        // Nothing to flush on a read-only layer: no FLUSH round trip at close.
        let mut f = FopenFlags::FOPEN_NOFLUSH;
        if o.keep_cache {
            f |= FopenFlags::FOPEN_KEEP_CACHE;
        }
        let mut guard = self.opens.lock();
        let opens = &mut *guard;
        match opens.modes.get_mut(&ino.0) {
            Some(OpenMode::Passthrough(n)) => {
                if let Some(id) = opens.backing.get(&ino.0) {
                    *n += 1;
                    self.fs.count_passthrough_open();
                    return reply.opened_passthrough(
                        FileHandle(self.handle),
                        FopenFlags::FOPEN_NOFLUSH,
                        id,
                    );
                }
            }
            Some(OpenMode::Cached(n)) => {
                *n += 1;
                return reply.opened(FileHandle(self.handle), f);
            }
            None => {}
        }
        if o.stored && !opens.backing.contains_key(&ino.0) {
            match self
                .fs
                .backing_file(ino.0)
                .map(|file| reply.open_backing(&file))
            {
                Some(Ok(id)) => {
                    opens.backing.insert(ino.0, id);
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "passthrough refused; serving through FUSE")
                }
                None => {}
            }
        }
        if let Some(id) = opens.backing.get(&ino.0) {
            self.fs.count_passthrough_open();
            reply.opened_passthrough(FileHandle(self.handle), FopenFlags::FOPEN_NOFLUSH, id);
            opens.modes.insert(ino.0, OpenMode::Passthrough(1));
            return;
        }
        opens.modes.insert(ino.0, OpenMode::Cached(1));
        reply.opened(FileHandle(self.handle), f);
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.fs.saw_process(req.pid());
        self.fs.read(ino.0, offset, size, reply);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.fs.count_request(RequestKind::Release);
        reply.ok();
        if fh.0 != self.handle {
            // Opened through the previous process: nothing of ours to undo (a
            // backing id it registered stays with the connection).
            return;
        }
        {
            let mut opens = self.opens.lock();
            let last = match opens.modes.get_mut(&ino.0) {
                Some(OpenMode::Cached(n)) | Some(OpenMode::Passthrough(n)) => {
                    *n = n.saturating_sub(1);
                    *n == 0
                }
                None => false,
            };
            if last {
                // The backing id stays for the next open (see `Opens::backing`).
                opens.modes.remove(&ino.0);
            }
        }
        self.fs.release(ino.0);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Only handles opened before FOPEN_NOFLUSH (by an older process) get
        // here; ENOSYS makes the kernel stop sending FLUSH on this connection.
        self.fs.count_request(RequestKind::Flush);
        reply.error(errno(Errno::ENOSYS));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.fs.count_request(RequestKind::Opendir);
        if self.kernel_skips_opens {
            // Directories never change: the kernel then opens every directory
            // itself with its listing cached (FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR
            // is its default then) and sends neither OPENDIR nor RELEASEDIR again.
            return reply.error(errno(Errno::ENOSYS));
        }
        match self.fs.opendir(ino.0) {
            Ok(()) => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.fs.count_request(RequestKind::Readdir);
        let res = self.fs.readdir(ino.0, offset, |e| {
            reply.add(
                INodeNo(e.ino),
                e.next_offset,
                file_type(e.kind),
                OsStr::from_bytes(e.name),
            )
        });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        self.fs.count_request(RequestKind::Readdir);
        let ttl = self.fs.entry_ttl();
        let res = self.fs.readdirplus(ino.0, offset, |e, attr| {
            reply.add(
                INodeNo(e.ino),
                e.next_offset,
                OsStr::from_bytes(e.name),
                &ttl,
                &file_attr(attr),
                Generation(0),
            )
        });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.count_request(RequestKind::Other);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.fs.count_request(RequestKind::Other);
        let s = self.fs.statfs();
        reply.statfs(s.blocks, 0, 0, s.files, 0, s.bsize, s.namelen, s.bsize);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.fs.count_request(RequestKind::Xattr);
        // ENOSYS makes the kernel stop asking for the rest of the mount's life
        // (callers then see EOPNOTSUPP, as on a filesystem without xattrs).
        if !self.fs.has_xattrs() {
            return reply.error(errno(Errno::ENOSYS));
        }
        reply_xattr(reply, self.fs.getxattr(ino.0, name.as_bytes(), size));
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.fs.count_request(RequestKind::Xattr);
        // Listing stays answered (an empty list): it is rare, and tools expect
        // it to work.
        reply_xattr(reply, self.fs.listxattr(ino.0, size));
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        self.fs.count_request(RequestKind::Other);
        // Permission checks are done by the kernel (default_permissions); this is
        // only reached for existence checks.
        match self.fs.getattr(ino.0) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(errno(Errno::EROFS));
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(errno(Errno::EROFS));
    }
}
