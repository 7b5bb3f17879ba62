//! FUSE over io_uring (Linux 6.14+), added for zest (see PATCHES.md).
//!
//! With FUSE_OVER_IO_URING negotiated at FUSE_INIT, the kernel delivers requests
//! through ring entries instead of `read(2)` on `/dev/fuse`: the server registers
//! entries (FUSE_IO_URING_CMD_REGISTER, an `IORING_OP_URING_CMD` on the `/dev/fuse`
//! descriptor, each with a header buffer and a payload buffer) on one queue per
//! possible CPU; a completion means a request was copied into an entry's buffers;
//! the reply is written into the same buffers and handed back with
//! FUSE_IO_URING_CMD_COMMIT_AND_FETCH, which also arms the entry for the next
//! request. The kernel routes requests to the ring only once every queue has an
//! entry; forgets, interrupts and notifications keep using `/dev/fuse`, so the
//! classic workers always run as well.
//!
//! A few workers (each with its own io_uring instance and thread) serve the
//! queues between them. Only a worker ever submits to its ring: the kernel runs
//! the delivery of a request in the context of the task that armed the entry and
//! cancels what a task submitted when it exits, so a reply produced on another
//! thread is written into its entry's buffers and queued for the worker, which
//! is woken through an eventfd read pending on its ring.
//!
//! Bounds: `queues x depth` entries per connection, each with a 288-byte header
//! and a payload buffer of the negotiated maximum (anonymous memory the kernel
//! only touches as far as a request or reply reaches); the rings hold exactly
//! what the entries can have in flight.

use std::io;
use std::io::IoSlice;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::os::fd::BorrowedFd;
use std::os::fd::FromRawFd;
use std::os::fd::OwnedFd;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU8;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

use log::error;
use log::info;
use log::warn;
use parking_lot::Mutex;

use crate::Filesystem;
use crate::ReplyEmpty;
use crate::channel::Channel;
use crate::channel::ChannelSender;
use crate::ll::Operation;
use crate::passthrough::BackingId;
use crate::request::RequestWithSender;
use crate::session::SessionEventLoop;

/// Most CPUs (hence kernel queues) served; beyond, io_uring is not negotiated.
const MAX_QUEUES: usize = 1024;
/// Most entries per queue a caller may ask for.
pub(crate) const MAX_DEPTH: u16 = 64;
/// Largest write the kernel may send when io_uring is on: the payload buffer of
/// every entry must hold the largest request or reply (fuser's default is 16 MiB).
pub(crate) const MAX_WRITE: u32 = 1024 * 1024;

// include/uapi/linux/fuse.h
const FUSE_IO_URING_CMD_REGISTER: u32 = 1;
const FUSE_IO_URING_CMD_COMMIT_AND_FETCH: u32 = 2;
/// `struct fuse_uring_req_header`: in/out header area, op-specific area, then
/// `struct fuse_uring_ent_in_out`.
const HEADER_AREA: usize = 128;
const OP_AREA: usize = 128;
const ENT_IN_OUT: usize = HEADER_AREA + OP_AREA;
const REQ_HEADER_SIZE: usize = ENT_IN_OUT + 32;
const IN_HEADER_SIZE: usize = 40;
const OUT_HEADER_SIZE: usize = 16;
/// The kernel's FUSE_MIN_READ_BUFFER: no payload buffer may be smaller.
const MIN_PAYLOAD: usize = 8192;

// include/uapi/linux/io_uring.h
const IORING_SETUP_CQSIZE: u32 = 1 << 3;
const IORING_SETUP_SQE128: u32 = 1 << 10;
const IORING_FEAT_SINGLE_MMAP: u32 = 1 << 0;
const IORING_OFF_SQ_RING: libc::off_t = 0;
const IORING_OFF_CQ_RING: libc::off_t = 0x0800_0000;
const IORING_OFF_SQES: libc::off_t = 0x1000_0000;
const IORING_ENTER_GETEVENTS: u32 = 1;
const IORING_OP_READ: u8 = 22;
const IORING_OP_URING_CMD: u8 = 46;
const SQE_SIZE: usize = 128;
const CQE_SIZE: usize = 16;

/// `user_data` of the eventfd read that wakes a worker.
const WAKE: u64 = u64::MAX;

#[repr(C)]
#[derive(Default)]
struct SqringOffsets {
    head: u32,
    tail: u32,
    ring_mask: u32,
    ring_entries: u32,
    flags: u32,
    dropped: u32,
    array: u32,
    resv1: u32,
    user_addr: u64,
}

#[repr(C)]
#[derive(Default)]
struct CqringOffsets {
    head: u32,
    tail: u32,
    ring_mask: u32,
    ring_entries: u32,
    overflow: u32,
    cqes: u32,
    flags: u32,
    resv1: u32,
    user_addr: u64,
}

#[repr(C)]
#[derive(Default)]
struct Params {
    sq_entries: u32,
    cq_entries: u32,
    flags: u32,
    sq_thread_cpu: u32,
    sq_thread_idle: u32,
    features: u32,
    wq_fd: u32,
    resv: [u32; 3],
    sq_off: SqringOffsets,
    cq_off: CqringOffsets,
}

/// Whether io_uring serves a connection, and if not why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum UringState {
    /// Not asked for.
    Off = 0,
    /// Negotiated; the entries are being registered.
    Starting = 1,
    /// Every queue has entries: the kernel sends requests through the ring.
    Active = 2,
    /// The kernel did not offer FUSE_OVER_IO_URING (older than 6.14, or the fuse
    /// module's `enable_uring` parameter is off): `/dev/fuse` only.
    NotOffered = 3,
    /// The ring could not be set up (io_uring disabled, limits): `/dev/fuse` only.
    SetupFailed = 4,
    /// The kernel refused an entry; it then serves the connection through
    /// `/dev/fuse` only.
    RegisterFailed = 5,
    /// A connection taken over from another process: its transport was fixed then.
    Inherited = 6,
}

/// Counters of the io_uring transport of one session, shared with the caller.
#[derive(Debug)]
pub struct UringStats {
    state: AtomicU8,
    requests: AtomicU64,
}

impl UringStats {
    pub(crate) fn new(state: UringState) -> Arc<Self> {
        Arc::new(UringStats {
            state: AtomicU8::new(state as u8),
            requests: AtomicU64::new(0),
        })
    }

    pub(crate) fn set_state(&self, state: UringState) {
        self.state.store(state as u8, Ordering::Release);
    }

    /// The transport's state.
    pub fn state(&self) -> UringState {
        match self.state.load(Ordering::Acquire) {
            1 => UringState::Starting,
            2 => UringState::Active,
            3 => UringState::NotOffered,
            4 => UringState::SetupFailed,
            5 => UringState::RegisterFailed,
            6 => UringState::Inherited,
            _ => UringState::Off,
        }
    }

    /// Requests received through the ring so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

/// The CPU ids the kernel may run a task on: one queue per id.
pub(crate) fn possible_cpus() -> io::Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut highest = None;
    for range in text.trim().split(',') {
        let last = range.rsplit('-').next().unwrap_or(range);
        let id: usize = last.trim().parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected /sys/devices/system/cpu/possible: {text:?}"),
            )
        })?;
        highest = Some(highest.map_or(id, |h: usize| h.max(id)));
    }
    let count = highest.map_or(0, |h| h + 1);
    if count == 0 || count > MAX_QUEUES {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("{count} possible CPUs (at most {MAX_QUEUES} queues are served)"),
        ));
    }
    Ok(count)
}

/// An io_uring instance with 128-byte submission entries.
struct Ring {
    fd: OwnedFd,
    sq_ring: Mapping,
    cq_ring: Option<Mapping>,
    sqes: Mapping,
    sq_head: *const AtomicU32,
    sq_tail: *const AtomicU32,
    sq_mask: u32,
    sq_entries: u32,
    cq_head: *const AtomicU32,
    cq_tail: *const AtomicU32,
    cq_mask: u32,
    cqes: *const u8,
    /// Our copy of the submission tail.
    tail: u32,
}

// SAFETY: the pointers point into mappings the ring owns; one thread uses it.
unsafe impl Send for Ring {}

struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn map(fd: BorrowedFd<'_>, len: usize, offset: libc::off_t) -> io::Result<Self> {
        // SAFETY: maps a region of the io_uring descriptor as the ABI describes.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?,
            len,
        })
    }

    fn anonymous(len: usize) -> io::Result<Self> {
        // SAFETY: a private anonymous mapping; pages are only backed once touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?,
            len,
        })
    }

    fn at<T>(&self, offset: u32) -> *const T {
        // SAFETY: offsets come from the kernel and lie inside the mapping.
        unsafe { self.ptr.as_ptr().add(offset as usize).cast() }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `map`/`anonymous` mapped.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

impl Ring {
    fn new(sq_entries: u32, cq_entries: u32) -> io::Result<Ring> {
        let mut params = Params {
            flags: IORING_SETUP_SQE128 | IORING_SETUP_CQSIZE,
            cq_entries,
            ..Params::default()
        };
        // SAFETY: io_uring_setup with a valid parameter block.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_io_uring_setup,
                sq_entries,
                &mut params as *mut Params,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let sq_len = params.sq_off.array as usize + params.sq_entries as usize * 4;
        let cq_len = params.cq_off.cqes as usize + params.cq_entries as usize * CQE_SIZE;
        let single = params.features & IORING_FEAT_SINGLE_MMAP != 0;
        let sq_ring = Mapping::map(
            fd.as_fd(),
            if single { sq_len.max(cq_len) } else { sq_len },
            IORING_OFF_SQ_RING,
        )?;
        let cq_ring = if single {
            None
        } else {
            Some(Mapping::map(fd.as_fd(), cq_len, IORING_OFF_CQ_RING)?)
        };
        let sqes = Mapping::map(
            fd.as_fd(),
            params.sq_entries as usize * SQE_SIZE,
            IORING_OFF_SQES,
        )?;
        let cq = cq_ring.as_ref().unwrap_or(&sq_ring);
        let ring = Ring {
            sq_head: sq_ring.at(params.sq_off.head),
            sq_tail: sq_ring.at(params.sq_off.tail),
            // SAFETY: the kernel initialised these fields before setup returned.
            sq_mask: unsafe { *sq_ring.at::<u32>(params.sq_off.ring_mask) },
            sq_entries: params.sq_entries,
            cq_head: cq.at(params.cq_off.head),
            cq_tail: cq.at(params.cq_off.tail),
            // SAFETY: as above.
            cq_mask: unsafe { *cq.at::<u32>(params.cq_off.ring_mask) },
            cqes: cq.at(params.cq_off.cqes),
            // SAFETY: as above.
            tail: unsafe { (*sq_ring.at::<AtomicU32>(params.sq_off.tail)).load(Ordering::Acquire) },
            fd,
            sq_ring,
            cq_ring,
            sqes,
        };
        // The index array maps submission slots one to one.
        let array: *mut u32 = ring.sq_ring.at::<u32>(params.sq_off.array).cast_mut();
        for i in 0..params.sq_entries {
            // SAFETY: `array` has `sq_entries` slots.
            unsafe { array.add(i as usize).write(i) };
        }
        Ok(ring)
    }

    /// Fills the next submission entry; fails when the submission ring is full
    /// (the caller sizes it so that it never is).
    fn push(&mut self, sqe: &[u8; SQE_SIZE]) -> io::Result<()> {
        // SAFETY: the head is a kernel-updated u32 inside the mapping.
        let head = unsafe { (*self.sq_head).load(Ordering::Acquire) };
        if self.tail.wrapping_sub(head) >= self.sq_entries {
            return Err(io::Error::other("io_uring submission ring full"));
        }
        let slot = (self.tail & self.sq_mask) as usize;
        // SAFETY: `slot` < sq_entries; the slot is ours until the tail is published.
        unsafe {
            std::ptr::copy_nonoverlapping(
                sqe.as_ptr(),
                self.sqes.ptr.as_ptr().add(slot * SQE_SIZE),
                SQE_SIZE,
            );
        }
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: publishes the entry to the kernel.
        unsafe { (*self.sq_tail).store(self.tail, Ordering::Release) };
        Ok(())
    }

    /// Submits everything pushed and, if `wait`, waits for one completion.
    fn enter(&self, wait: bool) -> io::Result<()> {
        loop {
            // SAFETY: as in `push`.
            let head = unsafe { (*self.sq_head).load(Ordering::Acquire) };
            let to_submit = self.tail.wrapping_sub(head);
            let (min_complete, flags) = if wait {
                (1, IORING_ENTER_GETEVENTS)
            } else {
                (0, 0)
            };
            if to_submit == 0 && !wait {
                return Ok(());
            }
            // SAFETY: io_uring_enter on our ring, no signal mask.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_io_uring_enter,
                    self.fd.as_raw_fd(),
                    to_submit,
                    min_complete,
                    flags,
                    std::ptr::null::<libc::c_void>(),
                    0usize,
                )
            };
            if rc >= 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                // Completions must be reaped first; the caller does and comes back.
                Some(libc::EBUSY | libc::EAGAIN) => return Ok(()),
                _ => return Err(err),
            }
        }
    }

    /// Takes the next completion: (user_data, res).
    fn pop(&mut self) -> Option<(u64, i32)> {
        // SAFETY: kernel-shared u32 counters inside the mapping.
        let head = unsafe { (*self.cq_head).load(Ordering::Relaxed) };
        let tail = unsafe { (*self.cq_tail).load(Ordering::Acquire) };
        if head == tail {
            return None;
        }
        let offset = (head & self.cq_mask) as usize * CQE_SIZE;
        // SAFETY: the entry at `head` is complete (tail read with Acquire).
        let (user_data, res) = unsafe {
            let cqe = self.cqes.add(offset);
            (
                cqe.cast::<u64>().read_unaligned(),
                cqe.add(8).cast::<i32>().read_unaligned(),
            )
        };
        // SAFETY: hands the slot back to the kernel.
        unsafe { (*self.cq_head).store(head.wrapping_add(1), Ordering::Release) };
        Some((user_data, res))
    }
}

/// One ring entry's buffers, shared by the worker and the reply of the request
/// it holds. Between the completion delivering a request and the commit, only
/// that request's reply touches them; otherwise only the kernel does.
struct Entry {
    qid: u16,
    header: Mapping,
    payload: Mapping,
    /// `iovec`s of the two buffers, read by the kernel at registration.
    iov: [libc::iovec; 2],
}

// SAFETY: see the ownership rule on `Entry`.
unsafe impl Send for Entry {}
// SAFETY: as above.
unsafe impl Sync for Entry {}

/// What a worker shares with the replies to its requests.
pub(crate) struct WorkerShared {
    entries: Vec<Entry>,
    /// Entries whose reply is written, with their commit id, waiting for the
    /// worker to commit them.
    committed: Mutex<Vec<(u32, u64)>>,
    /// An eventfd write is already on its way to the worker.
    wake_pending: AtomicBool,
    eventfd: OwnedFd,
    /// The worker's thread, to commit without waking it when it replies itself.
    worker: std::sync::OnceLock<std::thread::ThreadId>,
}

impl std::fmt::Debug for WorkerShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerShared")
            .field("entries", &self.entries.len())
            .finish()
    }
}

impl WorkerShared {
    fn queue_commit(&self, entry: u32, commit_id: u64) {
        self.committed.lock().push((entry, commit_id));
        if self.worker.get() == Some(&std::thread::current().id()) {
            return;
        }
        if !self.wake_pending.swap(true, Ordering::SeqCst) {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes to our eventfd.
            let rc = unsafe { libc::write(self.eventfd.as_raw_fd(), one.as_ptr().cast(), 8) };
            if rc < 0 {
                error!(
                    "cannot wake the FUSE io_uring worker: {}",
                    io::Error::last_os_error()
                );
            }
        }
    }
}

/// The reply target of a request received through a ring entry.
#[derive(Debug)]
pub(crate) struct UringReply {
    shared: Arc<WorkerShared>,
    entry: u32,
    commit_id: u64,
    /// For passthrough backing ids, which are ioctls on `/dev/fuse`.
    ch: ChannelSender,
    sent: AtomicBool,
}

impl UringReply {
    /// Writes the reply (`data`: the out header, then the arguments) into the
    /// entry and queues its commit.
    pub(crate) fn send(&self, data: &[IoSlice<'_>]) -> io::Result<()> {
        if self.sent.swap(true, Ordering::SeqCst) {
            return Err(io::Error::other("FUSE reply sent twice"));
        }
        let entry = &self.shared.entries[self.entry as usize];
        let total: usize = data.iter().map(|s| s.len()).sum();
        let mut result = Ok(());
        let header = entry.header.ptr.as_ptr();
        let payload = entry.payload.ptr.as_ptr();
        let payload_len = total.saturating_sub(OUT_HEADER_SIZE);
        if total < OUT_HEADER_SIZE || payload_len > entry.payload.len {
            result = Err(io::Error::other(format!(
                "FUSE reply of {total} bytes does not fit the io_uring entry (payload buffer {} bytes)",
                entry.payload.len
            )));
            let mut out = [0u8; OUT_HEADER_SIZE];
            out[0..4].copy_from_slice(&(OUT_HEADER_SIZE as u32).to_ne_bytes());
            out[4..8].copy_from_slice(&(-libc::EIO).to_ne_bytes());
            out[8..16].copy_from_slice(&self.commit_id.to_ne_bytes());
            // SAFETY: the entry's buffers are this reply's until committed.
            unsafe {
                std::ptr::copy_nonoverlapping(out.as_ptr(), header, OUT_HEADER_SIZE);
                write_payload_size(header, 0);
            }
        } else {
            let mut written = 0usize;
            for slice in data {
                let mut bytes: &[u8] = slice;
                if written < OUT_HEADER_SIZE {
                    let n = bytes.len().min(OUT_HEADER_SIZE - written);
                    // SAFETY: within the 128-byte header area.
                    unsafe {
                        std::ptr::copy_nonoverlapping(bytes.as_ptr(), header.add(written), n)
                    };
                    written += n;
                    bytes = &bytes[n..];
                }
                if !bytes.is_empty() {
                    let at = written - OUT_HEADER_SIZE;
                    // SAFETY: at + len <= payload_len <= the payload buffer's length.
                    unsafe {
                        std::ptr::copy_nonoverlapping(bytes.as_ptr(), payload.add(at), bytes.len())
                    };
                    written += bytes.len();
                }
            }
            // SAFETY: as above.
            unsafe { write_payload_size(header, payload_len as u32) };
        }
        self.shared.queue_commit(self.entry, self.commit_id);
        result
    }

    pub(crate) fn open_backing(&self, fd: BorrowedFd<'_>) -> io::Result<BackingId> {
        self.ch.open_backing(fd)
    }

    pub(crate) unsafe fn wrap_backing(&self, id: u32) -> BackingId {
        unsafe { self.ch.wrap_backing(id) }
    }
}

impl Drop for UringReply {
    fn drop(&mut self) {
        // An entry must always go back to the kernel, or its queue shrinks.
        if !self.sent.load(Ordering::SeqCst) {
            let mut out = [0u8; OUT_HEADER_SIZE];
            out[0..4].copy_from_slice(&(OUT_HEADER_SIZE as u32).to_ne_bytes());
            out[4..8].copy_from_slice(&(-libc::EIO).to_ne_bytes());
            out[8..16].copy_from_slice(&self.commit_id.to_ne_bytes());
            let _ = self.send(&[IoSlice::new(&out)]);
        }
    }
}

/// Writes `fuse_uring_ent_in_out.payload_sz`.
///
/// # Safety
/// `header` is an entry's header buffer owned by the caller.
unsafe fn write_payload_size(header: *mut u8, size: u32) {
    unsafe {
        header
            .add(ENT_IN_OUT + 16)
            .cast::<u32>()
            .write_unaligned(size)
    };
}

/// Rings and entries set up before FUSE_INIT is answered, so that io_uring is
/// offered to the kernel only when it can be served (once negotiated, the kernel
/// holds every request until all queues have entries).
pub(crate) struct Prepared {
    workers: Vec<(Ring, Arc<WorkerShared>)>,
    stats: Arc<UringStats>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("workers", &self.workers.len())
            .finish()
    }
}

impl Prepared {
    /// One ring per worker (at most `max_workers`), serving `queues` queues of
    /// `depth` entries between them, with payload buffers of `payload_size` bytes.
    pub(crate) fn new(
        queues: usize,
        depth: u16,
        max_workers: usize,
        payload_size: usize,
        stats: Arc<UringStats>,
    ) -> io::Result<Prepared> {
        let depth = depth.clamp(1, MAX_DEPTH);
        let payload_size = payload_size.max(MIN_PAYLOAD);
        let n_workers = max_workers.clamp(1, queues);
        let mut workers = Vec::with_capacity(n_workers);
        for w in 0..n_workers {
            let qids: Vec<u16> = (0..queues)
                .filter(|q| q % n_workers == w)
                .map(|q| q as u16)
                .collect();
            // Every entry and the wake-up read may be in flight at once.
            let in_flight = (qids.len() * usize::from(depth) + 1) as u32;
            let sq = in_flight.next_power_of_two();
            let ring = Ring::new(sq, sq * 2)?;
            let mut entries = Vec::with_capacity(qids.len() * usize::from(depth));
            for &qid in &qids {
                for _ in 0..depth {
                    let header = Mapping::anonymous(REQ_HEADER_SIZE)?;
                    let payload = Mapping::anonymous(payload_size)?;
                    let iov = [
                        libc::iovec {
                            iov_base: header.ptr.as_ptr().cast(),
                            iov_len: REQ_HEADER_SIZE,
                        },
                        libc::iovec {
                            iov_base: payload.ptr.as_ptr().cast(),
                            iov_len: payload_size,
                        },
                    ];
                    entries.push(Entry {
                        qid,
                        header,
                        payload,
                        iov,
                    });
                }
            }
            // SAFETY: eventfd with valid flags.
            let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
            if efd < 0 {
                return Err(io::Error::last_os_error());
            }
            let shared = Arc::new(WorkerShared {
                entries,
                committed: Mutex::new(Vec::new()),
                wake_pending: AtomicBool::new(false),
                // SAFETY: a new descriptor we own.
                eventfd: unsafe { OwnedFd::from_raw_fd(efd) },
                worker: std::sync::OnceLock::new(),
            });
            workers.push((ring, shared));
        }
        Ok(Prepared { workers, stats })
    }

    /// Starts the workers: each registers its entries and serves them until the
    /// connection ends.
    pub(crate) fn spawn<FS: Filesystem>(
        self,
        ch: &Channel,
        template: &SessionEventLoop<FS>,
    ) -> io::Result<Vec<std::thread::JoinHandle<io::Result<()>>>> {
        let registered = Arc::new(AtomicU32::new(self.workers.len() as u32));
        let mut threads = Vec::with_capacity(self.workers.len());
        for (i, (ring, shared)) in self.workers.into_iter().enumerate() {
            let worker = Worker {
                ring,
                shared,
                ch: ch.clone(),
                stats: Arc::clone(&self.stats),
                registered: Arc::clone(&registered),
                wake_buf: Box::leak(Box::new(0u64)),
                event_loop: SessionEventLoop {
                    thread_name: format!("fuser-uring-{i}"),
                    ch: ch.clone(),
                    filesystem: Arc::clone(&template.filesystem),
                    allowed: template.allowed,
                    session_owner: template.session_owner,
                },
            };
            threads.push(
                std::thread::Builder::new()
                    .name(format!("fuser-uring-{i}"))
                    .spawn(move || worker.run())?,
            );
        }
        Ok(threads)
    }
}

struct Worker<FS: Filesystem> {
    ring: Ring,
    shared: Arc<WorkerShared>,
    ch: Channel,
    stats: Arc<UringStats>,
    /// Workers still registering; the last one to finish marks the ring active.
    registered: Arc<AtomicU32>,
    /// Where the wake-up read lands; leaked, as the kernel may complete that
    /// read while the ring is being torn down.
    wake_buf: *mut u64,
    event_loop: SessionEventLoop<FS>,
}

// SAFETY: `wake_buf` is only handed to the kernel; the rest is `Send`.
unsafe impl<FS: Filesystem> Send for Worker<FS> {}

impl<FS: Filesystem> Worker<FS> {
    fn cmd_sqe(&self, entry: u32, cmd_op: u32, commit_id: u64) -> [u8; SQE_SIZE] {
        let e = &self.shared.entries[entry as usize];
        let mut sqe = [0u8; SQE_SIZE];
        sqe[0] = IORING_OP_URING_CMD;
        sqe[4..8].copy_from_slice(&self.ch.as_fd().as_raw_fd().to_ne_bytes());
        sqe[8..12].copy_from_slice(&cmd_op.to_ne_bytes());
        if cmd_op == FUSE_IO_URING_CMD_REGISTER {
            sqe[16..24].copy_from_slice(&(e.iov.as_ptr() as u64).to_ne_bytes());
            sqe[24..28].copy_from_slice(&2u32.to_ne_bytes());
        }
        sqe[32..40].copy_from_slice(&u64::from(entry).to_ne_bytes());
        // struct fuse_uring_cmd_req { u64 flags; u64 commit_id; u16 qid; u8 padding[6]; }
        sqe[56..64].copy_from_slice(&commit_id.to_ne_bytes());
        sqe[64..66].copy_from_slice(&e.qid.to_ne_bytes());
        sqe
    }

    fn wake_sqe(&self) -> [u8; SQE_SIZE] {
        let mut sqe = [0u8; SQE_SIZE];
        sqe[0] = IORING_OP_READ;
        sqe[4..8].copy_from_slice(&self.shared.eventfd.as_raw_fd().to_ne_bytes());
        sqe[8..16].copy_from_slice(&u64::MAX.to_ne_bytes());
        sqe[16..24].copy_from_slice(&(self.wake_buf as u64).to_ne_bytes());
        sqe[24..28].copy_from_slice(&8u32.to_ne_bytes());
        sqe[32..40].copy_from_slice(&WAKE.to_ne_bytes());
        sqe
    }

    fn run(mut self) -> io::Result<()> {
        let _ = self.shared.worker.set(std::thread::current().id());
        let result = self.serve();
        if let Err(e) = &result {
            error!("FUSE io_uring worker stopped: {e}");
            // The kernel may still hold entries; their buffers must outlive it.
            std::mem::forget(Arc::clone(&self.shared));
        }
        result
    }

    fn serve(&mut self) -> io::Result<()> {
        let n = self.shared.entries.len() as u32;
        // Entries the kernel holds (registered or committed, not yet completed).
        let mut armed = 0u32;
        let wake = self.wake_sqe();
        self.ring.push(&wake)?;
        for entry in 0..n {
            let sqe = self.cmd_sqe(entry, FUSE_IO_URING_CMD_REGISTER, 0);
            self.ring.push(&sqe)?;
            armed += 1;
        }
        self.ring.enter(false)?;
        // A refused registration completes at once; an accepted one only when a
        // request arrives.
        let mut refused = false;
        let mut pending = Vec::new();
        while let Some(cqe) = self.ring.pop() {
            pending.push(cqe);
        }
        for &(user_data, res) in &pending {
            if user_data != WAKE && res < 0 {
                refused = true;
                warn!(
                    "the kernel refused a FUSE io_uring entry ({}); it serves this connection through /dev/fuse",
                    io::Error::from_raw_os_error(-res)
                );
                break;
            }
        }
        if refused {
            self.stats.set_state(UringState::RegisterFailed);
        } else if self.registered.fetch_sub(1, Ordering::AcqRel) == 1
            && self.stats.state() == UringState::Starting
        {
            info!("FUSE requests are served through io_uring");
            self.stats.set_state(UringState::Active);
        }

        let mut stopping = false;
        let mut scratch = vec![0u8; IN_HEADER_SIZE + OP_AREA + self.payload_len()];
        loop {
            for (user_data, res) in pending.drain(..) {
                if user_data == WAKE {
                    self.shared.wake_pending.store(false, Ordering::SeqCst);
                    if res < 0 && res != -libc::EINTR && res != -libc::EAGAIN {
                        if !stopping {
                            error!(
                                "FUSE io_uring wake-up read failed: {}; replies from other threads wait for the next request",
                                io::Error::from_raw_os_error(-res)
                            );
                        }
                        continue;
                    }
                    if !stopping {
                        let wake = self.wake_sqe();
                        self.ring.push(&wake)?;
                    }
                    continue;
                }
                armed = armed.saturating_sub(1);
                if res < 0 {
                    match -res {
                        libc::ENOTCONN | libc::ECONNABORTED | libc::ENODEV => stopping = true,
                        _ if refused => {}
                        e => warn!(
                            "FUSE io_uring entry {user_data} completed with {}",
                            io::Error::from_raw_os_error(e)
                        ),
                    }
                    continue;
                }
                if let Some(entry) = u32::try_from(user_data).ok().filter(|e| *e < n) {
                    self.dispatch(entry, &mut scratch);
                }
            }
            let committed = std::mem::take(&mut *self.shared.committed.lock());
            for (entry, commit_id) in committed {
                let sqe = self.cmd_sqe(entry, FUSE_IO_URING_CMD_COMMIT_AND_FETCH, commit_id);
                self.ring.push(&sqe)?;
                armed += 1;
            }
            // Done once the kernel holds none of our entries and will deliver
            // nothing more: the connection ended, or it never used the ring.
            if armed == 0 && (stopping || refused) {
                return Ok(());
            }
            self.ring.enter(true)?;
            while let Some(cqe) = self.ring.pop() {
                pending.push(cqe);
            }
        }
    }

    fn payload_len(&self) -> usize {
        self.shared.entries.first().map_or(0, |e| e.payload.len)
    }

    /// Rebuilds the request in `/dev/fuse` form (in header, op header,
    /// arguments) and dispatches it; the reply goes back through the entry.
    fn dispatch(&self, entry: u32, scratch: &mut [u8]) {
        let e = &self.shared.entries[entry as usize];
        let header = e.header.ptr.as_ptr();
        // SAFETY: the kernel filled the entry before completing it; it is ours
        // until committed.
        let (len, unique, commit_id, payload_sz) = unsafe {
            (
                header.cast::<u32>().read_unaligned() as usize,
                header.add(8).cast::<u64>().read_unaligned(),
                header.add(ENT_IN_OUT + 8).cast::<u64>().read_unaligned(),
                header.add(ENT_IN_OUT + 16).cast::<u32>().read_unaligned() as usize,
            )
        };
        let reply = UringReply {
            shared: Arc::clone(&self.shared),
            entry,
            commit_id,
            ch: self.ch.sender(),
            sent: AtomicBool::new(false),
        };
        let op_len = len
            .checked_sub(IN_HEADER_SIZE + payload_sz)
            .filter(|&op| op <= OP_AREA && payload_sz <= e.payload.len);
        let Some(op_len) = op_len else {
            error!("malformed FUSE io_uring request {unique}: length {len}, payload {payload_sz}");
            drop(reply); // answers EIO
            return;
        };
        // SAFETY: all three ranges lie inside their buffers (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(header, scratch.as_mut_ptr(), IN_HEADER_SIZE);
            std::ptr::copy_nonoverlapping(
                header.add(HEADER_AREA),
                scratch.as_mut_ptr().add(IN_HEADER_SIZE),
                op_len,
            );
            std::ptr::copy_nonoverlapping(
                e.payload.ptr.as_ptr(),
                scratch.as_mut_ptr().add(IN_HEADER_SIZE + op_len),
                payload_sz,
            );
        }
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let Some(req) = RequestWithSender::new_uring(self.ch.sender(), &scratch[..len], reply)
        else {
            return; // the reply was dropped inside: EIO
        };
        if let Ok(Operation::Destroy(_)) = req.request.operation() {
            req.reply::<ReplyEmpty>().ok();
            return;
        }
        req.dispatch(&self.event_loop);
    }
}
