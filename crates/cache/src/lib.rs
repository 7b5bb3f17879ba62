//! The chunk cache of the lazy read path: decompressed chunks keyed by the sha256 of
//! their uncompressed bytes, in two tiers.
//!
//! - [`MemoryCache`]: an in-process LRU bounded in bytes; a hit is a refcount bump.
//! - [`DiskCache`]: a persistent content-addressed store under one directory with a byte
//!   budget, LRU eviction, crash-safe writes, verification on every read, and a
//!   directory lock. It survives restarts and serves everything it holds with no
//!   network.
//! - [`ChunkCache`]: the facade the filesystem uses. `get` looks in memory, then on
//!   disk (promoting hits to memory); `insert` stores in memory and hands the disk
//!   write to a background writer through a bounded queue, so the caller never waits
//!   for the disk and a slow disk drops writes (counted) instead of piling up memory.
//!
//! Content addressing makes a chunk shared by layers or images stored once, and makes
//! the cache self-checking: the key is the checksum.
//!
//! ```
//! use bytes::Bytes;
//! use zest_cache::{CacheConfig, ChunkCache};
//! use zest_oci::Digest;
//!
//! let dir = tempfile::tempdir()?;
//! let cache = ChunkCache::open(&CacheConfig {
//!     disk_root: dir.path().to_path_buf(),
//!     ..CacheConfig::default()
//! })?;
//! let data = Bytes::from_static(b"decompressed chunk");
//! let digest = Digest::of(&data); // the read path verifies fetched data like this
//! cache.insert(digest, data.clone());
//! assert_eq!(cache.get(&digest), Some(data));
//! cache.flush(); // wait for the background disk write (shutdown, tests)
//! assert!(cache.disk().is_some_and(|d| d.contains(&digest)));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Precondition and trust
//!
//! Callers insert only bytes they have verified against the digest (the fetch path
//! does, before decompressed data is used at all); the memory tier trusts them. The
//! disk tier trusts nothing it reads back: disks and crashes lie, so every disk hit is
//! re-hashed, and a file that fails is deleted and reported as a miss.
//!
//! # Budgets
//!
//! Both tiers hold their byte bound after every call returns, not eventually: the
//! memory tier evicts before returning from `insert`; the disk tier reserves space
//! (evicting least recently used chunks, and waiting for their unlink) before it
//! writes. A chunk larger than a tier's whole budget is not stored in that tier.
//!
//! Values are charged by `len()`. A `Bytes` that slices a larger buffer keeps the whole
//! buffer alive, so insert chunks that own their allocation (`Bytes::from(Vec)`), not
//! views into a decompressed multi-chunk range.
//!
//! # Lifetime of cached data
//!
//! The disk cache belongs to the daemon's cache directory, not to a mount or an image:
//! unmounting a layer or removing a snapshot deletes nothing, and a restart (or a
//! crash) reuses every chunk present, with the recency order kept through file mtimes.
//! Chunks leave the disk only by LRU eviction under the budget, by failing
//! verification, or by [`DiskCache::remove`]. The budget counts chunk files (rounded up
//! to 4 KiB) and writes in progress; the 256 shard directories and the lock file add
//! about 1 MiB on top.
//!
//! On disk: `<root>/lock`, `<root>/tmp/`, and `<root>/chunks/sha256/<2 hex>/<64 hex>`
//! (see [`DiskCache`]). Deleting the whole directory while no daemon runs is always
//! safe.
//!
//! # Threads and blocking
//!
//! `MemoryCache` and the index of `DiskCache` are behind mutexes that guard only map
//! operations; hashing, file IO and freeing evicted buffers happen outside them. Disk
//! reads and writes are blocking: async callers use [`ChunkCache::get_async`] and
//! [`DiskCache::get_async`]/[`DiskCache::insert_async`], which run the IO on tokio's
//! blocking pool with a bounded number in flight
//! ([`DiskOptions::async_io_limit`]). The facade's disk writes run on one dedicated
//! thread fed by a queue bounded in bytes ([`CacheConfig::write_queue_bytes`]).
//!
//! # Metrics
//!
//! [`ChunkCache::stats`] returns a [`CacheStats`] snapshot: per tier hits, misses,
//! inserts, evictions and bytes; on disk also corruptions, vanished files, IO errors
//! and refused inserts; and the writer's queued, written, skipped, dropped and failed
//! writes. All counters are monotonic except the byte, entry and pending gauges.

mod disk;
mod hash;
mod memory;
mod size;

pub use disk::{DiskCache, DiskOptions, DiskStats, DiskUsage, InsertOutcome, MAX_ENTRY_BYTES};
pub use memory::{MemoryCache, MemoryStats, ENTRY_OVERHEAD};
pub use size::ByteSize;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;

use zest_oci::digest::Digest;

/// Errors of the chunk cache. Reads never fail (a failure is a miss); opening and
/// writing can.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A file system operation failed.
    #[error("chunk cache: cannot {op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Another process (or another cache in this one) holds the directory.
    #[error(
        "chunk cache directory {} is already in use by {} (it holds {}/lock); \
         give each zest daemon its own cache directory, or stop the other one",
        root.display(),
        holder_pid.map_or_else(|| "another process".to_string(), |p| format!("process {p}")),
        root.display()
    )]
    Locked {
        /// The cache directory.
        root: PathBuf,
        /// The pid recorded by the holder, if readable.
        holder_pid: Option<u32>,
    },
    /// A blocking task on tokio's pool failed (panicked or was cancelled).
    #[error("chunk cache: background task failed: {0}")]
    Task(String),
}

/// Settings of a [`ChunkCache`].
#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// Bytes of decompressed chunks kept in memory. Default 256 MiB.
    pub memory_bytes: u64,
    /// Disk budget for chunk files. 0 disables the disk tier. Default 10 GiB.
    pub disk_bytes: u64,
    /// Directory of the disk tier. Default `/var/lib/zest/cache`.
    pub disk_root: PathBuf,
    /// Sync each disk write before publishing it (see [`DiskOptions::sync_writes`]).
    /// Default off.
    pub sync_writes: bool,
    /// The most bytes of chunks waiting for the disk writer; an insert beyond that skips
    /// the disk write. Default 64 MiB.
    pub write_queue_bytes: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            memory_bytes: 256 << 20,
            disk_bytes: 10 << 30,
            disk_root: PathBuf::from("/var/lib/zest/cache"),
            sync_writes: false,
            write_queue_bytes: 64 << 20,
        }
    }
}

/// Counters of the background disk writer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteQueueStats {
    /// Writes accepted into the queue.
    pub queued: u64,
    /// Writes that stored a chunk.
    pub written: u64,
    /// Writes that found nothing to do (chunk already stored or being written) or that
    /// the disk tier refused (too large, no room).
    pub skipped: u64,
    /// Writes not queued because the queue was full; the chunk stays in memory only.
    pub dropped_full: u64,
    /// Writes that failed with an IO error.
    pub failed: u64,
    /// Bytes waiting in the queue now.
    pub pending_bytes: u64,
}

/// A snapshot of every counter of a [`ChunkCache`], for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// The memory tier.
    pub memory: MemoryStats,
    /// The disk tier, if enabled.
    pub disk: Option<DiskStats>,
    /// The background disk writer.
    pub writes: WriteQueueStats,
}

impl CacheStats {
    /// Lookups answered by either tier.
    pub fn hits(&self) -> u64 {
        self.memory.hits + self.disk.as_ref().map_or(0, |d| d.hits)
    }

    /// Lookups answered by neither tier (the caller had to fetch).
    pub fn misses(&self) -> u64 {
        match &self.disk {
            Some(d) => d.misses,
            None => self.memory.misses,
        }
    }
}

/// Most queued writes at once, whatever their size (empty chunks cost a slot too).
const WRITE_QUEUE_SLOTS: usize = 4096;

enum WriteJob {
    Write(Digest, Bytes),
    Flush(mpsc::Sender<()>),
}

#[derive(Default)]
struct WriterCounters {
    queued: AtomicU64,
    written: AtomicU64,
    skipped: AtomicU64,
    dropped_full: AtomicU64,
    failed: AtomicU64,
    pending_bytes: AtomicU64,
}

struct Writer {
    tx: Option<SyncSender<WriteJob>>,
    thread: Option<JoinHandle<()>>,
    counters: Arc<WriterCounters>,
    max_pending_bytes: u64,
}

/// The two-tier chunk cache used by the read path. Share it as `Arc<ChunkCache>`.
pub struct ChunkCache {
    memory: MemoryCache,
    disk: Option<Arc<DiskCache>>,
    writer: Option<Writer>,
}

impl ChunkCache {
    /// Opens the tiers `config` asks for. Opening the disk tier scans its directory
    /// (blocking; see [`DiskCache::open_with_options`]) and starts the writer thread.
    pub fn open(config: &CacheConfig) -> Result<Self, CacheError> {
        let memory = MemoryCache::new(config.memory_bytes);
        if config.disk_bytes == 0 {
            return Ok(ChunkCache {
                memory,
                disk: None,
                writer: None,
            });
        }
        let disk = Arc::new(DiskCache::open_with_options(
            &config.disk_root,
            DiskOptions {
                sync_writes: config.sync_writes,
                ..DiskOptions::new(config.disk_bytes)
            },
        )?);
        let writer = Writer::start(Arc::clone(&disk), config.write_queue_bytes)?;
        Ok(ChunkCache {
            memory,
            disk: Some(disk),
            writer: Some(writer),
        })
    }

    /// The chunk from memory, else from disk (verified, then promoted to memory).
    /// Blocking on a memory miss: async callers use [`ChunkCache::get_async`].
    pub fn get(&self, digest: &Digest) -> Option<Bytes> {
        if let Some(data) = self.memory.get(digest) {
            return Some(data);
        }
        let data = self.disk.as_ref()?.get(digest)?;
        self.memory.insert(*digest, data.clone());
        Some(data)
    }

    /// [`ChunkCache::get`] for async callers: a memory hit or an index miss answers
    /// without leaving the task; a disk read runs on tokio's blocking pool.
    pub async fn get_async(&self, digest: &Digest) -> Option<Bytes> {
        if let Some(data) = self.memory.get(digest) {
            return Some(data);
        }
        let data = self.disk.as_ref()?.get_async(*digest).await?;
        self.memory.insert(*digest, data.clone());
        Some(data)
    }

    /// Stores a chunk in memory and queues it for the disk. Never blocks on IO.
    ///
    /// Precondition: `data` is the verified content of `digest`.
    pub fn insert(&self, digest: Digest, data: Bytes) {
        self.memory.insert(digest, data.clone());
        if let (Some(disk), Some(writer)) = (&self.disk, &self.writer) {
            // Already on disk (common for chunks shared across layers): nothing to queue.
            if !disk.contains(&digest) {
                writer.enqueue(digest, data);
            }
        }
    }

    /// Waits until every disk write queued before this call has finished. For clean
    /// shutdowns and tests; blocking.
    pub fn flush(&self) {
        if let Some(writer) = &self.writer {
            writer.flush();
        }
    }

    /// The memory tier.
    pub fn memory(&self) -> &MemoryCache {
        &self.memory
    }

    /// The disk tier, if enabled.
    pub fn disk(&self) -> Option<&Arc<DiskCache>> {
        self.disk.as_ref()
    }

    /// A snapshot of all counters.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            memory: self.memory.stats(),
            disk: self.disk.as_ref().map(|d| d.stats()),
            writes: self.writer.as_ref().map(|w| w.stats()).unwrap_or_default(),
        }
    }
}

impl std::fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkCache")
            .field("stats", &self.stats())
            .finish()
    }
}

impl Writer {
    fn start(disk: Arc<DiskCache>, max_pending_bytes: u64) -> Result<Self, CacheError> {
        let (tx, rx) = mpsc::sync_channel::<WriteJob>(WRITE_QUEUE_SLOTS);
        let counters = Arc::new(WriterCounters::default());
        let thread_counters = Arc::clone(&counters);
        let root = disk.root().to_path_buf();
        let thread = std::thread::Builder::new()
            .name("zest-cache-writer".into())
            .spawn(move || write_loop(&disk, &rx, &thread_counters))
            .map_err(|source| CacheError::Io {
                op: "start the disk writer thread for",
                path: root,
                source,
            })?;
        Ok(Writer {
            tx: Some(tx),
            thread: Some(thread),
            counters,
            max_pending_bytes,
        })
    }

    fn enqueue(&self, digest: Digest, data: Bytes) {
        let Some(tx) = &self.tx else { return };
        let len = data.len() as u64;
        let c = &self.counters;
        // Reserve queue bytes first; give up rather than exceed the bound.
        let reserved = c
            .pending_bytes
            .fetch_update(Relaxed, Relaxed, |p| {
                (p + len <= self.max_pending_bytes).then_some(p + len)
            })
            .is_ok();
        if !reserved {
            c.dropped_full.fetch_add(1, Relaxed);
            return;
        }
        match tx.try_send(WriteJob::Write(digest, data)) {
            Ok(()) => {
                c.queued.fetch_add(1, Relaxed);
            }
            Err(TrySendError::Full(_)) => {
                c.pending_bytes.fetch_sub(len, Relaxed);
                c.dropped_full.fetch_add(1, Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {
                c.pending_bytes.fetch_sub(len, Relaxed);
                c.failed.fetch_add(1, Relaxed);
            }
        }
    }

    fn flush(&self) {
        let Some(tx) = &self.tx else { return };
        let (done_tx, done_rx) = mpsc::channel();
        if tx.send(WriteJob::Flush(done_tx)).is_ok() {
            // Err means the writer is gone, so nothing is pending either.
            let _ = done_rx.recv();
        }
    }

    fn stats(&self) -> WriteQueueStats {
        let c = &self.counters;
        WriteQueueStats {
            queued: c.queued.load(Relaxed),
            written: c.written.load(Relaxed),
            skipped: c.skipped.load(Relaxed),
            dropped_full: c.dropped_full.load(Relaxed),
            failed: c.failed.load(Relaxed),
            pending_bytes: c.pending_bytes.load(Relaxed),
        }
    }
}

impl Drop for Writer {
    /// Finishes the queued writes, so a cache reopened right after finds them, and
    /// releases the directory lock only after the last write.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("chunk cache: disk writer thread panicked");
            }
        }
    }
}

fn write_loop(disk: &DiskCache, rx: &mpsc::Receiver<WriteJob>, c: &WriterCounters) {
    // Log an error burst (disk full, read-only remount) once per interval, not per chunk.
    let mut last_error_log: Option<std::time::Instant> = None;
    while let Ok(job) = rx.recv() {
        match job {
            WriteJob::Write(digest, data) => {
                debug_assert!(digest.verifies(&data), "unverified chunk inserted");
                match disk.insert(&digest, &data) {
                    Ok(InsertOutcome::Stored) => {
                        c.written.fetch_add(1, Relaxed);
                    }
                    Ok(_) => {
                        c.skipped.fetch_add(1, Relaxed);
                    }
                    Err(e) => {
                        c.failed.fetch_add(1, Relaxed);
                        if last_error_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                            last_error_log = Some(std::time::Instant::now());
                            tracing::warn!(%digest, error = %e, cause = ?std::error::Error::source(&e),
                                "chunk cache: disk write failed; the chunk stays in memory only");
                        }
                    }
                }
                c.pending_bytes.fetch_sub(data.len() as u64, Relaxed);
            }
            WriteJob::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}
