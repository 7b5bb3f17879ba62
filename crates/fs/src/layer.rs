//! [`LayerFs`]: the filesystem logic of one layer, independent of the FUSE
//! library. Metadata comes from the in-memory [`LayerIndex`]; file reads go
//! through the layer's [`Fetcher`].
//!
//! Overlay view: whiteouts are character devices 0:0 (permission bits 0, as
//! overlayfs itself creates them); opaque directories answer the overlay opaque
//! xattr with `y`. Overlay's own xattrs (`trusted.overlay.*`, `user.overlay.*`)
//! found in a layer's TOC are hidden: a layer must not be able to steer
//! overlayfs (redirects, metacopy) from inside the image.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::passthrough::PassthroughStore;
use super::{DirEntry, Errno, NodeAttr, NodeKind, OpenAnswer, ReadReply, StatFs, XattrAnswer};
use zest_fetch::libraries::LibraryStack;
use zest_fetch::Fetcher;
use zest_format::{EntryId, EntryKind, EntryRef, LayerIndex, Timestamp};

/// Which xattr marks an opaque directory for the overlay stacked on top.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OpaqueXattr {
    /// `trusted.overlay.opaque` (overlayfs mounted by root; containerd's default).
    #[default]
    Trusted,
    /// `user.overlay.opaque` (overlayfs mounted with `userxattr`).
    User,
    /// Both names.
    Both,
}

const TRUSTED_OPAQUE: &[u8] = b"trusted.overlay.opaque";
const USER_OPAQUE: &[u8] = b"user.overlay.opaque";

/// Options of a [`LayerFs`].
#[derive(Clone, Debug)]
pub struct LayerFsOptions {
    /// How long the kernel may cache name lookups (the layer never changes).
    pub entry_ttl: Duration,
    /// How long the kernel may cache attributes.
    pub attr_ttl: Duration,
    /// The opaque directory marker to present.
    pub opaque_xattr: OpaqueXattr,
    /// Serve fully cached files by FUSE passthrough from this store, where the
    /// kernel supports it (Linux 6.9+); `None` (default) = off.
    pub passthrough: Option<Arc<PassthroughStore>>,
    /// Record the first open or read of each regular file (for a startup
    /// profile); `None` (default) = off, and the read path takes no lock.
    pub recorder: Option<Arc<AccessRecorder>>,
    /// Fetch the shared libraries of programs as they start: the first read
    /// at offset 0 of each file is shown to this stack (an ELF header starts
    /// the library prefetch of [`zest_fetch::libraries`]); `None` (default) =
    /// off.
    pub libraries: Option<Arc<LibraryStack>>,
    /// When nothing needs to see file opens (passthrough not negotiated, no
    /// recorder), tell the kernel the filesystem has no OPEN (default: on). The
    /// kernel then opens files itself, keeping their page cache, and sends no
    /// OPEN, FLUSH or RELEASE for the rest of the mount's life: a warm open
    /// costs no round trip to the daemon. A passthrough mount needs the OPEN
    /// reply to hand over the backing file, so it keeps answering opens.
    pub skip_opens: bool,
}

/// The regular files of one layer in the order they were first opened or read,
/// with the time of each first access since the recorder's origin.
///
/// Hard links resolve to their target's entry, so a file is recorded once,
/// under the path of its first tar entry (the one holding the data). Cheap on
/// the read path: a file already seen costs one atomic bit test; only a first
/// access takes a short lock (no I/O under it). At most `limit` files are kept,
/// so memory stays bounded whatever the workload reads.
#[derive(Debug)]
pub struct AccessRecorder {
    origin: Instant,
    limit: usize,
    /// One bit per entry of the layer, sized at the first access.
    seen: OnceLock<Box<[AtomicU64]>>,
    order: Mutex<Vec<RecordedAccess>>,
    /// Set by [`AccessRecorder::finish`]: nothing more is recorded, and the
    /// mount no longer needs to see opens for it.
    finished: AtomicBool,
}

/// One first access noted by an [`AccessRecorder`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedAccess {
    /// Path of the file in the layer.
    pub path: String,
    /// Time of the first access since the recorder's origin.
    pub at: Duration,
}

impl Default for AccessRecorder {
    fn default() -> Self {
        AccessRecorder::with_origin(Instant::now(), usize::MAX)
    }
}

impl AccessRecorder {
    /// An empty, unbounded recorder whose origin is now.
    pub fn new() -> AccessRecorder {
        AccessRecorder::default()
    }

    /// An empty recorder timing accesses from `origin` and keeping at most
    /// `limit` files.
    pub fn with_origin(origin: Instant, limit: usize) -> AccessRecorder {
        AccessRecorder {
            origin,
            limit,
            seen: OnceLock::new(),
            order: Mutex::new(Vec::new()),
            finished: AtomicBool::new(false),
        }
    }

    /// Ends the recording: later accesses are not noted, and the mount may stop
    /// asking the kernel for opens (the warm path skips them).
    pub fn finish(&self) {
        self.finished.store(true, Ordering::Release);
    }

    /// Whether accesses are still being recorded.
    pub fn is_recording(&self) -> bool {
        !self.finished.load(Ordering::Acquire)
    }

    /// Notes an access to file `id` of `index` (only the first one counts).
    pub fn record(&self, index: &LayerIndex, id: EntryId) {
        if !self.is_recording() {
            return;
        }
        let seen = self.seen.get_or_init(|| {
            (0..index.len().div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect()
        });
        let (word, bit) = (id.index() / 64, 1u64 << (id.index() % 64));
        let Some(word) = seen.get(word) else {
            return;
        };
        if word.fetch_or(bit, Ordering::Relaxed) & bit != 0 {
            return;
        }
        let at = self.origin.elapsed();
        let mut order = self.order.lock();
        if order.len() < self.limit {
            let path = index.entry(id).path();
            order.push(RecordedAccess { path, at });
        }
    }

    /// The paths recorded so far, in first-access order.
    pub fn paths(&self) -> Vec<String> {
        self.order.lock().iter().map(|a| a.path.clone()).collect()
    }

    /// The accesses recorded so far, in first-access order.
    pub fn accesses(&self) -> Vec<RecordedAccess> {
        self.order.lock().clone()
    }

    /// How many files were recorded.
    pub fn len(&self) -> usize {
        self.order.lock().len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for LayerFsOptions {
    fn default() -> Self {
        LayerFsOptions {
            entry_ttl: Duration::from_secs(24 * 3600),
            attr_ttl: Duration::from_secs(24 * 3600),
            opaque_xattr: OpaqueXattr::Trusted,
            passthrough: None,
            recorder: None,
            libraries: None,
            skip_opens: true,
        }
    }
}

/// Counters of a [`LayerFs`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayerFsStats {
    /// Read requests that reached the filesystem.
    pub reads: u64,
    /// Opens answered with a passthrough backing file.
    pub passthrough_opens: u64,
    /// File handles open now (released by the kernel asynchronously after the
    /// last close).
    pub open_files: u64,
    /// Kernel requests received, by kind.
    pub requests: RequestCounts,
}

/// Kernel requests a mount received, by kind: what the warm path costs, since
/// every request is a round trip between the kernel and the daemon.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestCounts {
    /// LOOKUP (names the kernel had not cached).
    pub lookups: u64,
    /// GETATTR.
    pub getattrs: u64,
    /// OPEN of files (answered or refused with ENOSYS).
    pub opens: u64,
    /// FLUSH (on close).
    pub flushes: u64,
    /// RELEASE of file handles.
    pub releases: u64,
    /// OPENDIR.
    pub opendirs: u64,
    /// READDIR and READDIRPLUS.
    pub readdirs: u64,
    /// GETXATTR and LISTXATTR.
    pub xattrs: u64,
    /// Any other request (READ is counted in [`LayerFsStats::reads`]).
    pub other: u64,
}

/// The kinds of [`RequestCounts`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// LOOKUP.
    Lookup,
    /// GETATTR.
    Getattr,
    /// OPEN.
    Open,
    /// FLUSH.
    Flush,
    /// RELEASE.
    Release,
    /// OPENDIR.
    Opendir,
    /// READDIR, READDIRPLUS.
    Readdir,
    /// GETXATTR, LISTXATTR.
    Xattr,
    /// Anything else but READ.
    Other,
}

const REQUEST_KINDS: usize = 9;

/// Block size reported by `stat` and `statfs`.
const BLOCK: u64 = 4096;

/// The read-only filesystem of one layer.
pub struct LayerFs {
    fetcher: Arc<Fetcher>,
    index: Arc<LayerIndex>,
    options: LayerFsOptions,
    total_blocks: u64,
    passthrough_active: AtomicBool,
    reads: AtomicU64,
    passthrough_opens: AtomicU64,
    open_files: AtomicU64,
    requests: [AtomicU64; REQUEST_KINDS],
    /// Any xattr at all, including the opaque-directory marker.
    has_xattrs: bool,
}

impl std::fmt::Debug for LayerFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerFs")
            .field("entries", &self.index.len())
            .field("fetcher", &self.fetcher)
            .finish()
    }
}

fn system_time(t: Timestamp) -> SystemTime {
    let nanos = Duration::from_nanos(u64::from(t.nanos.min(999_999_999)));
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(t.secs.unsigned_abs()) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs()) + nanos
    }
}

/// The kernel's `new_encode_dev`: the 32-bit device number FUSE carries.
fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

fn is_overlay_xattr(name: &[u8]) -> bool {
    name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.")
}

/// Answers `value` under the size-probe protocol.
fn xattr_answer(value: &[u8], size: u32) -> Result<XattrAnswer, Errno> {
    let len = u32::try_from(value.len()).map_err(|_| Errno::ERANGE)?;
    if size == 0 {
        Ok(XattrAnswer::Size(len))
    } else if len > size {
        Err(Errno::ERANGE)
    } else {
        Ok(XattrAnswer::Data(value.to_vec()))
    }
}

impl LayerFs {
    /// The filesystem of the layer served by `fetcher`.
    pub fn new(fetcher: Arc<Fetcher>, options: LayerFsOptions) -> LayerFs {
        let index = Arc::clone(fetcher.index());
        let total_blocks = index
            .files_in_blob_order()
            .map(|id| index.entry(id).size().div_ceil(BLOCK))
            .fold(0u64, u64::saturating_add);
        let has_xattrs = index.has_xattrs()
            || (1..=index.len() as u64)
                .filter_map(|ino| index.entry_for_ino(ino))
                .any(|id| index.entry(id).is_opaque_dir());
        LayerFs {
            fetcher,
            index,
            options,
            total_blocks,
            passthrough_active: AtomicBool::new(false),
            reads: AtomicU64::new(0),
            passthrough_opens: AtomicU64::new(0),
            open_files: AtomicU64::new(0),
            requests: Default::default(),
            has_xattrs,
        }
    }

    /// Whether any entry has an xattr (or is an opaque directory). When none
    /// has, the adapter tells the kernel the mount has no xattr support, so
    /// that the xattr lookups of overlayfs and of every exec stop reaching
    /// the daemon.
    pub fn has_xattrs(&self) -> bool {
        self.has_xattrs
    }

    /// Whether passthrough is configured (the adapter then asks the kernel).
    pub fn wants_passthrough(&self) -> bool {
        self.options.passthrough.is_some()
    }

    /// Records whether the kernel accepted passthrough for this mount.
    pub fn set_passthrough_active(&self, active: bool) {
        self.passthrough_active.store(active, Ordering::Relaxed);
    }

    /// Whether opens may be answered with a backing file.
    pub fn passthrough_active(&self) -> bool {
        self.passthrough_active.load(Ordering::Relaxed)
    }

    /// The counters.
    pub fn stats(&self) -> LayerFsStats {
        LayerFsStats {
            reads: self.reads.load(Ordering::Relaxed),
            passthrough_opens: self.passthrough_opens.load(Ordering::Relaxed),
            open_files: self.open_files.load(Ordering::Relaxed),
            requests: {
                let n = |k: RequestKind| self.requests[k as usize].load(Ordering::Relaxed);
                RequestCounts {
                    lookups: n(RequestKind::Lookup),
                    getattrs: n(RequestKind::Getattr),
                    opens: n(RequestKind::Open),
                    flushes: n(RequestKind::Flush),
                    releases: n(RequestKind::Release),
                    opendirs: n(RequestKind::Opendir),
                    readdirs: n(RequestKind::Readdir),
                    xattrs: n(RequestKind::Xattr),
                    other: n(RequestKind::Other),
                }
            },
        }
    }

    /// Counts one kernel request of `kind` (called by the adapter).
    pub fn count_request(&self, kind: RequestKind) {
        self.requests[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the kernel must keep sending OPEN: to hand over backing files
    /// (passthrough negotiated) or to record opens while a recording runs.
    /// Otherwise the adapter answers OPEN with ENOSYS once, where the kernel
    /// supports that, so a mount recorded at its first start gets the warm path
    /// once its recording is finished.
    pub fn needs_opens(&self) -> bool {
        !self.options.skip_opens
            || self.passthrough_active()
            || self
                .options
                .recorder
                .as_ref()
                .is_some_and(|r| r.is_recording())
    }

    /// Counts an open answered with a backing file (called by the adapter once
    /// the kernel took it).
    pub fn count_passthrough_open(&self) {
        self.passthrough_opens.fetch_add(1, Ordering::Relaxed);
    }

    /// The layer's fetcher.
    pub fn fetcher(&self) -> &Arc<Fetcher> {
        &self.fetcher
    }

    /// The layer's index.
    pub fn index(&self) -> &Arc<LayerIndex> {
        &self.index
    }

    /// Kernel cache lifetime of lookups.
    pub fn entry_ttl(&self) -> Duration {
        self.options.entry_ttl
    }

    /// Kernel cache lifetime of attributes.
    pub fn attr_ttl(&self) -> Duration {
        self.options.attr_ttl
    }

    fn id(&self, ino: u64) -> Result<EntryId, Errno> {
        self.index.entry_for_ino(ino).ok_or(Errno::ENOENT)
    }

    fn attr_of(&self, e: &EntryRef<'_>) -> NodeAttr {
        let (kind, perm_mask, rdev) = match e.kind() {
            EntryKind::Dir => (NodeKind::Directory, 0o7777, 0),
            EntryKind::Reg => (NodeKind::RegularFile, 0o7777, 0),
            EntryKind::Symlink => (NodeKind::Symlink, 0o7777, 0),
            EntryKind::Char => {
                let (ma, mi) = e.rdev();
                (NodeKind::CharDevice, 0o7777, encode_dev(ma, mi))
            }
            EntryKind::Block => {
                let (ma, mi) = e.rdev();
                (NodeKind::BlockDevice, 0o7777, encode_dev(ma, mi))
            }
            EntryKind::Fifo => (NodeKind::NamedPipe, 0o7777, 0),
            EntryKind::Whiteout => (NodeKind::CharDevice, 0, 0),
        };
        let (size, blocks) = match kind {
            NodeKind::Directory => (BLOCK, BLOCK / 512),
            NodeKind::RegularFile => (e.size(), e.size().div_ceil(BLOCK) * (BLOCK / 512)),
            NodeKind::Symlink => (e.link_target().map_or(0, |t| t.len() as u64), 0),
            _ => (0, 0),
        };
        let mtime = system_time(e.mtime());
        NodeAttr {
            ino: e.ino(),
            size,
            blocks,
            atime: e.atime().map_or(mtime, system_time),
            mtime,
            ctime: e.ctime().map_or(mtime, system_time),
            kind,
            perm: (e.mode() & perm_mask) as u16,
            nlink: e.nlink().max(1),
            uid: e.uid(),
            gid: e.gid(),
            rdev,
            blksize: BLOCK as u32,
        }
    }

    fn kind_of(e: &EntryRef<'_>) -> NodeKind {
        match e.kind() {
            EntryKind::Dir => NodeKind::Directory,
            EntryKind::Reg => NodeKind::RegularFile,
            EntryKind::Symlink => NodeKind::Symlink,
            EntryKind::Char | EntryKind::Whiteout => NodeKind::CharDevice,
            EntryKind::Block => NodeKind::BlockDevice,
            EntryKind::Fifo => NodeKind::NamedPipe,
        }
    }

    /// `stat` of inode `ino`.
    pub fn getattr(&self, ino: u64) -> Result<NodeAttr, Errno> {
        let id = self.id(ino)?;
        Ok(self.attr_of(&self.index.entry(id)))
    }

    /// Looks `name` up in directory `parent`.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<NodeAttr, Errno> {
        let dir = self.id(parent)?;
        let d = self.index.entry(dir);
        if d.kind() != EntryKind::Dir {
            return Err(Errno::ENOTDIR);
        }
        let id = match name {
            b"." => dir,
            b".." => d.parent(),
            _ => self.index.lookup(dir, name).ok_or(Errno::ENOENT)?,
        };
        Ok(self.attr_of(&self.index.entry(id)))
    }

    /// The target of symlink `ino`.
    pub fn readlink(&self, ino: u64) -> Result<&[u8], Errno> {
        let id = self.id(ino)?;
        self.index.entry(id).link_target().ok_or(Errno::EINVAL)
    }

    /// Opens file `ino` (read-only). Every successful open must be matched by
    /// one [`release`](Self::release).
    pub fn open(&self, ino: u64, write: bool) -> Result<OpenAnswer, Errno> {
        let id = self.id(ino)?;
        if write {
            return Err(Errno::EROFS);
        }
        let kind = self.index.entry(id).kind();
        if kind == EntryKind::Dir {
            return Err(Errno::EISDIR);
        }
        if let (Some(recorder), EntryKind::Reg) = (&self.options.recorder, kind) {
            recorder.record(&self.index, id);
        }
        let stored = match (&self.options.passthrough, kind) {
            (Some(store), EntryKind::Reg) if self.passthrough_active() => {
                let stored = store.contains(&self.fetcher, id);
                if !stored {
                    // Cached by an earlier read, a prefetch or another layer:
                    // store it now, so that the next open can pass through.
                    store.consider(&self.fetcher, id);
                }
                stored
            }
            _ => false,
        };
        self.open_files.fetch_add(1, Ordering::Relaxed);
        Ok(OpenAnswer {
            fh: 0,
            keep_cache: true,
            stored,
        })
    }

    /// The stored copy of file `ino` for passthrough, opened; `None` when it has
    /// none. Cheap: an `open(2)` of a local file.
    pub fn backing_file(&self, ino: u64) -> Option<std::fs::File> {
        let store = self.options.passthrough.as_ref()?;
        store.open_file(&self.fetcher, self.id(ino).ok()?)
    }

    /// A file handle of `ino` was closed: a file now fully cached is stored for
    /// passthrough (in the background).
    pub fn release(&self, ino: u64) {
        let _ = self
            .open_files
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        if !self.passthrough_active() {
            return;
        }
        if let (Some(store), Ok(id)) = (&self.options.passthrough, self.id(ino)) {
            store.consider(&self.fetcher, id);
        }
    }

    /// Checks that `ino` is a directory that can be listed.
    pub fn opendir(&self, ino: u64) -> Result<(), Errno> {
        let id = self.id(ino)?;
        if self.index.entry(id).kind() == EntryKind::Dir {
            Ok(())
        } else {
            Err(Errno::ENOTDIR)
        }
    }

    /// Lists directory `ino` from `offset` (0 = start; then a previous entry's
    /// `next_offset`). `add` returns true when the reply buffer is full.
    /// Order: `.`, `..`, then the entries in name order.
    pub fn readdir(
        &self,
        ino: u64,
        offset: u64,
        mut add: impl FnMut(DirEntry<'_>) -> bool,
    ) -> Result<(), Errno> {
        self.readdirplus(ino, offset, |e, _| add(e))
    }

    /// Like [`readdir`](Self::readdir), with each entry's attributes.
    pub fn readdirplus(
        &self,
        ino: u64,
        offset: u64,
        mut add: impl FnMut(DirEntry<'_>, &NodeAttr) -> bool,
    ) -> Result<(), Errno> {
        let dir = self.id(ino)?;
        let d = self.index.entry(dir);
        if d.kind() != EntryKind::Dir {
            return Err(Errno::ENOTDIR);
        }
        let mut pos = offset;
        // "." and ".." come first, at offsets 0 and 1.
        for (at, id, name) in [(0, dir, &b"."[..]), (1, d.parent(), &b".."[..])] {
            if pos == at {
                let a = self.attr_of(&self.index.entry(id));
                let e = DirEntry {
                    ino: a.ino,
                    next_offset: at + 1,
                    kind: NodeKind::Directory,
                    name,
                };
                if add(e, &a) {
                    return Ok(());
                }
                pos = at + 1;
            }
        }
        let skip = usize::try_from(pos - 2).unwrap_or(usize::MAX);
        let mut children = self.index.children(dir);
        let first = if skip == 0 {
            children.next()
        } else {
            children.nth(skip)
        };
        let mut next_offset = pos + 1;
        let mut cur = first;
        while let Some(c) = cur {
            let e = self.index.entry(c.id);
            let a = self.attr_of(&e);
            let entry = DirEntry {
                ino: a.ino,
                next_offset,
                kind: Self::kind_of(&e),
                name: c.name,
            };
            if add(entry, &a) {
                break;
            }
            next_offset += 1;
            cur = children.next();
        }
        Ok(())
    }

    fn opaque_names(&self) -> &'static [&'static [u8]] {
        match self.options.opaque_xattr {
            OpaqueXattr::Trusted => &[TRUSTED_OPAQUE],
            OpaqueXattr::User => &[USER_OPAQUE],
            OpaqueXattr::Both => &[TRUSTED_OPAQUE, USER_OPAQUE],
        }
    }

    /// The value of xattr `name` of `ino` (`ENODATA` if it has none).
    pub fn getxattr(&self, ino: u64, name: &[u8], size: u32) -> Result<XattrAnswer, Errno> {
        let id = self.id(ino)?;
        let e = self.index.entry(id);
        if e.is_opaque_dir() && self.opaque_names().contains(&name) {
            return xattr_answer(b"y", size);
        }
        if is_overlay_xattr(name) {
            return Err(Errno::ENODATA);
        }
        match e.xattr(name) {
            Some(v) => xattr_answer(v, size),
            None => Err(Errno::ENODATA),
        }
    }

    /// The NUL-separated list of xattr names of `ino`.
    pub fn listxattr(&self, ino: u64, size: u32) -> Result<XattrAnswer, Errno> {
        let id = self.id(ino)?;
        let e = self.index.entry(id);
        let mut list = Vec::new();
        for (name, _) in e.xattrs() {
            if !is_overlay_xattr(name.as_bytes()) {
                list.extend_from_slice(name.as_bytes());
                list.push(0);
            }
        }
        if e.is_opaque_dir() {
            for n in self.opaque_names() {
                list.extend_from_slice(n);
                list.push(0);
            }
        }
        xattr_answer(&list, size)
    }

    /// Filesystem statistics.
    pub fn statfs(&self) -> StatFs {
        StatFs {
            blocks: self.total_blocks,
            files: self.index.len() as u64,
            bsize: BLOCK as u32,
            namelen: 255,
        }
    }

    /// A request of process `pid` came (the kernel's ID of the process, in
    /// the pid namespace of whoever mounted the layer): with library
    /// prefetch, the command a container's process runs is prefetched like
    /// the image's own start command ([`LibraryStack::process_seen`]).
    pub fn saw_process(&self, pid: u32) {
        if let Some(l) = &self.options.libraries {
            l.process_seen(pid);
        }
    }

    /// Reads `size` bytes at `offset` of file `ino` and answers `reply`: at once
    /// when every chunk is in the memory cache, otherwise from a task on the
    /// fetcher's runtime, so the calling (FUSE worker) thread never waits for
    /// the network or the disk.
    pub fn read(&self, ino: u64, offset: u64, size: u32, reply: impl ReadReply) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let id = match self.id(ino) {
            Ok(id) => id,
            Err(e) => return reply.error(e),
        };
        match self.index.entry(id).kind() {
            EntryKind::Reg => {}
            EntryKind::Dir => return reply.error(Errno::EISDIR),
            _ => return reply.error(Errno::EINVAL),
        }
        if let Some(recorder) = &self.options.recorder {
            recorder.record(&self.index, id);
        }
        // Shown the head of each file read from its start (a program or
        // library being loaded); None for other reads.
        let libraries = self.options.libraries.clone().filter(|_| offset == 0);
        if let Some(data) = self.fetcher.read_from_memory(id, offset, size) {
            reply.data(&data);
            if let Some(l) = libraries {
                l.file_start(id, &data);
            }
            return;
        }
        let fetcher = Arc::clone(&self.fetcher);
        self.fetcher.spawn(async move {
            match fetcher.read(id, offset, size).await {
                Ok(data) => {
                    reply.data(&data);
                    if let Some(l) = libraries {
                        l.file_start(id, &data);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, ino, offset, size, "read failed; answering EIO");
                    reply.error(Errno::EIO);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_numbers_use_the_kernel_encoding() {
        assert_eq!(encode_dev(0, 0), 0);
        assert_eq!(encode_dev(1, 3), 0x103);
        // Minor above 255 spills into the high bits.
        assert_eq!(encode_dev(8, 0x1234), 0x34 | (8 << 8) | (0x12 << 20));
        // libc agrees on the layout.
        let d = libc::makedev(259, 70000);
        let enc = encode_dev(259, 70000);
        let (ma, mi) = ((enc >> 8) & 0xfff, (enc & 0xff) | ((enc >> 12) & 0xfff00));
        assert_eq!((libc::major(d), libc::minor(d)), (ma, mi));
    }

    #[test]
    fn timestamps_before_the_epoch() {
        let t = system_time(Timestamp {
            secs: -2,
            nanos: 500_000_000,
        });
        assert_eq!(
            UNIX_EPOCH.duration_since(t).unwrap(),
            Duration::from_millis(1500)
        );
    }

    #[test]
    fn xattr_size_protocol() {
        assert_eq!(xattr_answer(b"abc", 0), Ok(XattrAnswer::Size(3)));
        assert_eq!(xattr_answer(b"abc", 2), Err(Errno::ERANGE));
        assert_eq!(
            xattr_answer(b"abc", 3),
            Ok(XattrAnswer::Data(b"abc".to_vec()))
        );
    }
}
