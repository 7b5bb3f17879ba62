//! The disk tier: a persistent, content-addressed chunk store with a byte budget.
//!
//! Layout under the root directory:
//!
//! ```text
//! <root>/lock                          flock(2)ed by the owning process; holds its pid
//! <root>/tmp/                          writes in progress; emptied at open
//! <root>/chunks/sha256/<2 hex>/<64 hex>  one file per chunk, named by its digest
//! ```
//!
//! Invariants:
//! - **Never serve unverified bytes.** Every read hashes the file and compares it with
//!   the name; a mismatch (torn write after a crash, bit rot, tampering) deletes the
//!   file, counts a corruption and is reported as a miss.
//! - **Atomic publication.** A chunk is written to a uniquely named file in `tmp/` and
//!   renamed into place, so a chunk path only ever names a complete write (or, after a
//!   crash without `sync_writes`, a file the read check rejects).
//! - **The budget holds at all times**, not only eventually: `charged` covers indexed
//!   chunks, writes in progress and evicted files not yet unlinked, space is reserved
//!   (evicting as needed) before a write starts, and released only after an unlink
//!   finishes. So the bytes under `chunks/` and `tmp/` never exceed the budget. A
//!   file's charge is its length rounded up to a 4 KiB block, which tracks what `du`
//!   shows when chunks are small.
//! - **One owner.** The root is locked with `flock` for the lifetime of the
//!   [`DiskCache`]; a second open (another daemon, or the same one twice) fails with
//!   [`CacheError::Locked`] instead of two processes evicting each other's files.
//! - The index mutex guards only map operations; all file IO and hashing happen outside
//!   it. A digest that is being written or deleted is "busy": lookups miss and other
//!   writers skip it, so no two threads ever touch the same chunk path at once.
//!
//! Recency lives in memory (an LRU). It survives a restart through file mtimes: the
//! scan at open orders chunks by mtime, and a hit re-stamps the mtime when it is older
//! than [`DiskOptions::touch_interval`], so a restart keeps an approximate LRU order at
//! the cost of one `futimens` per chunk per interval. (atime is not used: `noatime`
//! mounts never update it and backup scans update all of it.)

use parking_lot::Mutex;
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use lru::LruCache;

use super::hash::DigestHashBuilder;
use super::CacheError;
use zest_oci::digest::Digest;

/// The allocation unit a chunk file is charged in.
const BLOCK: u64 = 4096;

/// The largest chunk the disk tier stores or reads back. Chunks are at most a few MiB;
/// the bound keeps a stray huge file in the cache directory from being read into memory.
pub const MAX_ENTRY_BYTES: u64 = 64 << 20;

/// How often one insert evicts and finds the freed space taken by other writers
/// before it gives up with [`InsertOutcome::NoRoom`].
const MAX_EVICTION_ROUNDS: u32 = 8;

/// What a chunk file of `len` bytes is charged against the budget.
fn footprint(len: u64) -> u64 {
    len.max(1).div_ceil(BLOCK) * BLOCK
}

/// Settings of a [`DiskCache`].
#[derive(Clone, Debug)]
pub struct DiskOptions {
    /// The most bytes the chunk files may take (see the module docs for how a file is
    /// charged). 0 stores nothing.
    pub budget_bytes: u64,
    /// `fdatasync` each chunk (and its directory) before and after publishing it. Off by
    /// default: the rename is atomic either way, and a chunk torn by a power loss is
    /// caught by the read check and refetched.
    pub sync_writes: bool,
    /// A hit re-stamps the file's mtime when it is older than this, so that a restart
    /// restores the recency order; `None` never touches files.
    pub touch_interval: Option<Duration>,
    /// The most `*_async` reads and writes running on tokio's blocking pool at once;
    /// more wait their turn, so a burst of misses cannot spawn hundreds of threads.
    pub async_io_limit: usize,
}

impl DiskOptions {
    /// Defaults for a budget: no syncing, mtime refreshed at most once a minute per chunk.
    pub fn new(budget_bytes: u64) -> Self {
        DiskOptions {
            budget_bytes,
            sync_writes: false,
            touch_interval: Some(Duration::from_secs(60)),
            async_io_limit: 16,
        }
    }
}

/// What [`DiskCache::insert`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InsertOutcome {
    /// The chunk was written and indexed.
    Stored,
    /// The chunk was already stored; it is now the most recently used.
    AlreadyPresent,
    /// Another thread is writing or deleting this chunk right now; nothing was done.
    Busy,
    /// The chunk is larger than the whole budget (or [`MAX_ENTRY_BYTES`]); not stored.
    TooLarge,
    /// Everything evictable is already gone and writes in progress hold the rest of
    /// the budget; not stored.
    NoRoom,
}

/// How much a [`DiskCache`] holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskUsage {
    /// Bytes charged against the budget: indexed chunks (length rounded up to 4 KiB)
    /// plus writes and deletions in progress.
    pub bytes: u64,
    /// Chunks indexed.
    pub entries: u64,
    /// The budget.
    pub budget_bytes: u64,
}

/// Counters and usage of a [`DiskCache`] at one instant.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskStats {
    /// Reads that returned verified data.
    pub hits: u64,
    /// Reads that returned nothing (absent, busy, corrupt, or unreadable).
    pub misses: u64,
    /// Chunks written.
    pub inserts: u64,
    /// Chunks deleted to stay within the budget (at open and on insert).
    pub evictions: u64,
    /// Files whose length or content did not match their digest; each was deleted.
    pub corruptions: u64,
    /// Indexed files that had vanished from disk when read.
    pub vanished: u64,
    /// Failed reads, writes or unlinks other than the above.
    pub io_errors: u64,
    /// Inserts refused as [`InsertOutcome::TooLarge`] or [`InsertOutcome::NoRoom`].
    pub rejected: u64,
    /// Leftover temporary files removed at open (writes interrupted by a crash).
    pub temp_files_removed: u64,
    /// Bytes charged: indexed chunks plus writes and deletions in progress.
    pub bytes: u64,
    /// Chunks indexed.
    pub entries: u64,
    /// The budget.
    pub budget_bytes: u64,
}

/// A persistent content-addressed chunk store under one directory, with LRU eviction.
///
/// All methods are blocking file IO except the `*_async` ones, which run the IO on
/// tokio's blocking pool. Share it as `Arc<DiskCache>`.
pub struct DiskCache {
    root: PathBuf,
    chunks_dir: PathBuf,
    tmp_dir: PathBuf,
    options: DiskOptions,
    index: Mutex<Index>,
    counters: Counters,
    tmp_seq: AtomicU64,
    temp_files_removed: u64,
    async_io: tokio::sync::Semaphore,
    /// Holds the flock on `<root>/lock` until the cache is dropped.
    lock_file: File,
}

#[derive(Clone, Copy)]
struct Entry {
    len: u64,
    /// Distinguishes this file from an earlier one of the same digest, so a reader that
    /// found a bad file does not delete a newer good one written meanwhile.
    generation: u64,
}

struct Index {
    lru: LruCache<Digest, Entry, DigestHashBuilder>,
    /// Chunks being written or deleted, with their charge (still counted in `charged`).
    busy: HashMap<Digest, u64, DigestHashBuilder>,
    busy_bytes: u64,
    charged: u64,
    next_generation: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    inserts: AtomicU64,
    evictions: AtomicU64,
    corruptions: AtomicU64,
    vanished: AtomicU64,
    io_errors: AtomicU64,
    rejected: AtomicU64,
}

/// Why a read of an indexed chunk produced no data.
enum ReadFailure {
    Vanished,
    Corrupt(String),
    Io(io::Error),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CacheError + 'a {
    move |source| CacheError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl DiskCache {
    /// Opens (creating if needed) the cache at `root` with a byte budget and default
    /// options. See [`DiskCache::open_with_options`].
    pub fn open(root: impl AsRef<Path>, budget_bytes: u64) -> Result<Self, CacheError> {
        Self::open_with_options(root, DiskOptions::new(budget_bytes))
    }

    /// Opens (creating if needed) the cache at `root`: takes the directory lock, removes
    /// temporary files left by a crash, indexes every chunk present (oldest mtime least
    /// recent), and evicts down to the budget if it shrank. Needs no network: everything
    /// present is served again. Blocking; scanning a large cache takes a while, so call
    /// it from a blocking context.
    pub fn open_with_options(
        root: impl AsRef<Path>,
        options: DiskOptions,
    ) -> Result<Self, CacheError> {
        let root = root.as_ref().to_path_buf();
        fs::create_dir_all(&root).map_err(io_err("create cache directory", &root))?;
        let lock_file = acquire_lock(&root)?;

        let chunks_dir = root.join("chunks").join("sha256");
        let tmp_dir = root.join("tmp");
        for dir in [&chunks_dir, &tmp_dir] {
            fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        }
        // All 256 shards up front, so a write never needs a mkdir.
        for shard in 0..=255u8 {
            let dir = chunks_dir.join(hex::encode([shard]));
            fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        }
        let temp_files_removed = clean_tmp(&tmp_dir)?;
        let mut found = scan_chunks(&chunks_dir)?;
        // Oldest first, so the most recently used ends up at the LRU's head.
        found.sort_by_key(|f| f.mtime);

        let mut index = Index {
            lru: LruCache::unbounded_with_hasher(DigestHashBuilder::new()),
            busy: HashMap::with_hasher(DigestHashBuilder::new()),
            busy_bytes: 0,
            charged: 0,
            next_generation: 0,
        };
        for f in &found {
            index.next_generation += 1;
            index.lru.put(
                f.digest,
                Entry {
                    len: f.len,
                    generation: index.next_generation,
                },
            );
            index.charged += footprint(f.len);
        }
        let counters = Counters::default();
        // The budget may have shrunk since the last run.
        while index.charged > options.budget_bytes {
            let Some((digest, entry)) = index.lru.pop_lru() else {
                break;
            };
            let path = chunk_path(&chunks_dir, &digest);
            if let Err(e) = fs::remove_file(&path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "chunk cache: cannot evict chunk");
                    counters.io_errors.fetch_add(1, Relaxed);
                }
            }
            index.charged -= footprint(entry.len);
            counters.evictions.fetch_add(1, Relaxed);
        }
        tracing::info!(
            root = %root.display(),
            entries = index.lru.len(),
            bytes = index.charged,
            budget = options.budget_bytes,
            temp_files_removed,
            "chunk cache opened"
        );
        let async_io = tokio::sync::Semaphore::new(options.async_io_limit.max(1));
        Ok(DiskCache {
            root,
            chunks_dir,
            tmp_dir,
            options,
            index: Mutex::new(index),
            counters,
            tmp_seq: AtomicU64::new(0),
            temp_files_removed,
            async_io,
            lock_file,
        })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The options it was opened with.
    pub fn options(&self) -> &DiskOptions {
        &self.options
    }

    /// Where the chunk `digest` lives (whether or not it is stored).
    pub fn chunk_path(&self, digest: &Digest) -> PathBuf {
        chunk_path(&self.chunks_dir, digest)
    }

    /// Whether the chunk is indexed (no IO, no recency update).
    pub fn contains(&self, digest: &Digest) -> bool {
        self.index.lock().lru.contains(digest)
    }

    /// The chunk's verified bytes, or `None`. Marks it most recently used. A file that
    /// fails verification is deleted and counted as a corruption. Blocking.
    pub fn get(&self, digest: &Digest) -> Option<Bytes> {
        let entry = self.lookup(digest)?;
        self.read_entry(digest, entry)
    }

    /// [`DiskCache::get`] with the file IO and hashing on tokio's blocking pool. A miss
    /// in the index returns at once without leaving the calling task.
    pub async fn get_async(self: &Arc<Self>, digest: Digest) -> Option<Bytes> {
        let entry = self.lookup(&digest)?;
        // The semaphore is never closed, so acquiring only fails if it were.
        let _permit = self.async_io.acquire().await.ok()?;
        let this = Arc::clone(self);
        match tokio::task::spawn_blocking(move || this.read_entry(&digest, entry)).await {
            Ok(found) => found,
            Err(e) => {
                tracing::error!(%digest, error = %e, "chunk cache: read task failed");
                self.counters.io_errors.fetch_add(1, Relaxed);
                None
            }
        }
    }

    /// Finds the index entry and promotes it; counts a miss if absent or busy.
    fn lookup(&self, digest: &Digest) -> Option<Entry> {
        let entry = self.index.lock().lru.get(digest).copied();
        if entry.is_none() {
            self.counters.misses.fetch_add(1, Relaxed);
        }
        entry
    }

    fn read_entry(&self, digest: &Digest, entry: Entry) -> Option<Bytes> {
        let path = self.chunk_path(digest);
        match self.read_verified(&path, digest, entry.len) {
            Ok(data) => {
                self.counters.hits.fetch_add(1, Relaxed);
                Some(data)
            }
            Err(failure) => {
                self.counters.misses.fetch_add(1, Relaxed);
                match failure {
                    ReadFailure::Vanished => {
                        tracing::warn!(path = %path.display(), "chunk cache: indexed chunk vanished from disk");
                        self.counters.vanished.fetch_add(1, Relaxed);
                    }
                    ReadFailure::Corrupt(why) => {
                        tracing::warn!(path = %path.display(), %why, "chunk cache: corrupt chunk deleted");
                        self.counters.corruptions.fetch_add(1, Relaxed);
                    }
                    ReadFailure::Io(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "chunk cache: unreadable chunk deleted");
                        self.counters.io_errors.fetch_add(1, Relaxed);
                    }
                }
                self.discard(digest, entry.generation);
                None
            }
        }
    }

    fn read_verified(&self, path: &Path, digest: &Digest, len: u64) -> Result<Bytes, ReadFailure> {
        // No symlinks, and a FIFO planted in the directory must not block the open.
        let file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ReadFailure::Vanished),
            Err(e) => return Err(ReadFailure::Io(e)),
        };
        let meta = file.metadata().map_err(ReadFailure::Io)?;
        if !meta.is_file() {
            return Err(ReadFailure::Corrupt("not a regular file".into()));
        }
        if meta.len() != len {
            return Err(ReadFailure::Corrupt(format!(
                "{} bytes on disk, {len} expected",
                meta.len()
            )));
        }
        // `len` came from the index, which holds nothing above MAX_ENTRY_BYTES.
        let mut buf = Vec::with_capacity(len as usize);
        (&file)
            .take(len)
            .read_to_end(&mut buf)
            .map_err(ReadFailure::Io)?;
        if buf.len() as u64 != len {
            return Err(ReadFailure::Corrupt(format!(
                "{} bytes read, {len} expected",
                buf.len()
            )));
        }
        if !digest.verifies(&buf) {
            return Err(ReadFailure::Corrupt(
                "content does not hash to its digest".into(),
            ));
        }
        self.maybe_touch(&file, &meta, path);
        Ok(Bytes::from(buf))
    }

    /// Re-stamps the mtime of a hit chunk if it is older than the touch interval.
    fn maybe_touch(&self, file: &File, meta: &fs::Metadata, path: &Path) {
        let Some(interval) = self.options.touch_interval else {
            return;
        };
        let now = SystemTime::now();
        let stale = match meta.modified() {
            Ok(mtime) => now.duration_since(mtime).is_ok_and(|age| age >= interval),
            Err(_) => false,
        };
        if stale {
            if let Err(e) = file.set_modified(now) {
                tracing::debug!(path = %path.display(), error = %e, "chunk cache: cannot refresh mtime");
            }
        }
    }

    /// Drops the entry (if it is still the same file) and deletes its file.
    fn discard(&self, digest: &Digest, generation: u64) {
        let charge = {
            let mut index = self.index.lock();
            match index.lru.peek(digest) {
                Some(e) if e.generation == generation => {
                    let charge = footprint(e.len);
                    index.lru.pop(digest);
                    index.busy.insert(*digest, charge);
                    index.busy_bytes += charge;
                    charge
                }
                // Evicted or replaced meanwhile: whoever did that owns the file now.
                _ => return,
            }
        };
        self.unlink_busy(&[(*digest, charge)]);
    }

    /// Removes the chunk if stored; returns whether it was. Blocking.
    pub fn remove(&self, digest: &Digest) -> bool {
        let generation = match self.index.lock().lru.peek(digest) {
            Some(e) => e.generation,
            None => return false,
        };
        self.discard(digest, generation);
        true
    }

    /// Stores a chunk as most recently used, evicting least recently used chunks first
    /// so the budget holds throughout. Blocking.
    ///
    /// Precondition: `data` hashes to `digest` (the caller verified it). It is not
    /// re-hashed here; reads verify.
    pub fn insert(&self, digest: &Digest, data: &[u8]) -> Result<InsertOutcome, CacheError> {
        let len = data.len() as u64;
        let charge = footprint(len);
        // Space is reserved only once it is free on disk: victims are unlinked first and
        // stay charged until then, so the budget holds at every instant. Another writer
        // may take freed space before we come back; each round evicts more, and the
        // bound turns pathological contention into a counted refusal, not a spin.
        let mut rounds = 0;
        loop {
            let victims = {
                let mut index = self.index.lock();
                if index.lru.get(digest).is_some() {
                    return Ok(InsertOutcome::AlreadyPresent);
                }
                if index.busy.contains_key(digest) {
                    return Ok(InsertOutcome::Busy);
                }
                if len > MAX_ENTRY_BYTES || charge > self.options.budget_bytes {
                    drop(index);
                    self.counters.rejected.fetch_add(1, Relaxed);
                    return Ok(InsertOutcome::TooLarge);
                }
                // Busy bytes cannot be evicted; if they leave no room, evicting would
                // only throw chunks away for nothing.
                if index.busy_bytes + charge > self.options.budget_bytes
                    || rounds >= MAX_EVICTION_ROUNDS
                {
                    drop(index);
                    self.counters.rejected.fetch_add(1, Relaxed);
                    return Ok(InsertOutcome::NoRoom);
                }
                if index.charged + charge <= self.options.budget_bytes {
                    index.busy.insert(*digest, charge);
                    index.busy_bytes += charge;
                    index.charged += charge;
                    break;
                }
                let mut victims = Vec::new();
                let mut freeing = 0;
                while index.charged - freeing + charge > self.options.budget_bytes {
                    let Some((victim, e)) = index.lru.pop_lru() else {
                        break;
                    };
                    let c = footprint(e.len);
                    index.busy.insert(victim, c);
                    index.busy_bytes += c;
                    freeing += c;
                    victims.push((victim, c));
                }
                victims
            };
            self.counters
                .evictions
                .fetch_add(victims.len() as u64, Relaxed);
            self.unlink_busy(&victims);
            rounds += 1;
        }
        let written = self.write_chunk(digest, data);
        let mut index = self.index.lock();
        index.busy.remove(digest);
        index.busy_bytes -= charge;
        match written {
            Ok(()) => {
                index.next_generation += 1;
                let generation = index.next_generation;
                index.lru.put(*digest, Entry { len, generation });
                drop(index);
                self.counters.inserts.fetch_add(1, Relaxed);
                Ok(InsertOutcome::Stored)
            }
            Err(e) => {
                index.charged -= charge;
                drop(index);
                self.counters.io_errors.fetch_add(1, Relaxed);
                Err(e)
            }
        }
    }

    /// [`DiskCache::insert`] on tokio's blocking pool.
    pub async fn insert_async(
        self: &Arc<Self>,
        digest: Digest,
        data: Bytes,
    ) -> Result<InsertOutcome, CacheError> {
        let _permit = self
            .async_io
            .acquire()
            .await
            .map_err(|e| CacheError::Task(e.to_string()))?;
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || this.insert(&digest, &data))
            .await
            .map_err(|e| CacheError::Task(e.to_string()))?
    }

    /// Unlinks files of busy entries, then releases their charge and busy mark.
    fn unlink_busy(&self, victims: &[(Digest, u64)]) {
        for (digest, _) in victims {
            let path = self.chunk_path(digest);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    // The file stays; the next open's scan indexes it again.
                    tracing::warn!(path = %path.display(), error = %e, "chunk cache: cannot delete chunk");
                    self.counters.io_errors.fetch_add(1, Relaxed);
                }
            }
        }
        let mut index = self.index.lock();
        for (digest, charge) in victims {
            index.busy.remove(digest);
            index.busy_bytes -= charge;
            index.charged -= charge;
        }
    }

    /// Writes `data` to a fresh temp file and renames it to the chunk's path.
    fn write_chunk(&self, digest: &Digest, data: &[u8]) -> Result<(), CacheError> {
        let seq = self.tmp_seq.fetch_add(1, Relaxed);
        let tmp = self
            .tmp_dir
            .join(format!("{}.{}.{seq}", digest.hex(), std::process::id()));
        let dest = self.chunk_path(digest);
        let result = self.write_and_rename(&tmp, &dest, data);
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn write_and_rename(&self, tmp: &Path, dest: &Path, data: &[u8]) -> Result<(), CacheError> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tmp)
            .map_err(io_err("create temporary file", tmp))?;
        file.write_all(data)
            .map_err(io_err("write temporary file", tmp))?;
        if self.options.sync_writes {
            file.sync_data()
                .map_err(io_err("sync temporary file", tmp))?;
        }
        drop(file);
        if let Err(e) = fs::rename(tmp, dest) {
            if e.kind() != io::ErrorKind::NotFound {
                return Err(io_err("publish chunk", dest)(e));
            }
            // Someone removed the shard directory: recreate it and retry once.
            if let Some(shard) = dest.parent() {
                fs::create_dir_all(shard).map_err(io_err("create directory", shard))?;
            }
            fs::rename(tmp, dest).map_err(io_err("publish chunk", dest))?;
        }
        if self.options.sync_writes {
            if let Some(shard) = dest.parent() {
                File::open(shard)
                    .and_then(|d| d.sync_all())
                    .map_err(io_err("sync directory", shard))?;
            }
        }
        Ok(())
    }

    /// What the cache holds now.
    pub fn usage(&self) -> DiskUsage {
        let index = self.index.lock();
        DiskUsage {
            bytes: index.charged,
            entries: index.lru.len() as u64,
            budget_bytes: self.options.budget_bytes,
        }
    }

    /// A snapshot of the counters and usage.
    pub fn stats(&self) -> DiskStats {
        let DiskUsage { bytes, entries, .. } = self.usage();
        let c = &self.counters;
        DiskStats {
            hits: c.hits.load(Relaxed),
            misses: c.misses.load(Relaxed),
            inserts: c.inserts.load(Relaxed),
            evictions: c.evictions.load(Relaxed),
            corruptions: c.corruptions.load(Relaxed),
            vanished: c.vanished.load(Relaxed),
            io_errors: c.io_errors.load(Relaxed),
            rejected: c.rejected.load(Relaxed),
            temp_files_removed: self.temp_files_removed,
            bytes,
            entries,
            budget_bytes: self.options.budget_bytes,
        }
    }

    /// Digests from least to most recently used (for inspection and tests; O(n)).
    pub fn digests_lru_first(&self) -> Vec<Digest> {
        let index = self.index.lock();
        index.lru.iter().rev().map(|(d, _)| *d).collect()
    }
}

impl Drop for DiskCache {
    /// Clears our pid from the lock file (the flock itself goes with the descriptor), so
    /// a later holder that records nothing is not reported under our stale pid.
    fn drop(&mut self) {
        let _ = self.lock_file.set_len(0);
    }
}

impl std::fmt::Debug for DiskCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskCache")
            .field("root", &self.root)
            .field("stats", &self.stats())
            .finish()
    }
}

fn chunk_path(chunks_dir: &Path, digest: &Digest) -> PathBuf {
    let hex = digest.hex();
    chunks_dir.join(&hex[..2]).join(&hex)
}

/// Takes an exclusive, non-blocking flock on `<root>/lock` and records our pid in it.
fn acquire_lock(root: &Path) -> Result<File, CacheError> {
    let path = root.join("lock");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false) // the holder's pid is in there
        .open(&path)
        .map_err(io_err("open lock file", &path))?;
    // SAFETY: flock on a file descriptor we own; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut text = String::new();
            // The pid is a short decimal; bound the read anyway.
            let _ = (&file).take(32).read_to_string(&mut text);
            return Err(CacheError::Locked {
                root: root.to_path_buf(),
                holder_pid: text.trim().parse().ok(),
            });
        }
        return Err(io_err("lock", &path)(err));
    }
    file.set_len(0)
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .map_err(io_err("write lock file", &path))?;
    Ok(file)
}

/// Removes everything in `tmp/`: writes a crash interrupted, never published.
fn clean_tmp(tmp_dir: &Path) -> Result<u64, CacheError> {
    let mut removed = 0;
    for entry in fs::read_dir(tmp_dir).map_err(io_err("read directory", tmp_dir))? {
        let entry = entry.map_err(io_err("read directory", tmp_dir))?;
        let path = entry.path();
        let result = match entry.file_type() {
            Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
            _ => fs::remove_file(&path),
        };
        match result {
            Ok(()) => removed += 1,
            Err(e) => return Err(io_err("remove leftover temporary file", &path)(e)),
        }
    }
    if removed > 0 {
        tracing::info!(removed, dir = %tmp_dir.display(), "chunk cache: removed leftover temporary files");
    }
    Ok(removed)
}

struct Found {
    digest: Digest,
    len: u64,
    mtime: SystemTime,
}

/// Indexes `chunks/sha256/<2 hex>/<64 hex>`. Files that cannot be chunks (bad names,
/// wrong shard, not regular files, oversized) are deleted so they cannot eat the disk
/// uncounted; unexpected directories are left alone with a warning.
fn scan_chunks(chunks_dir: &Path) -> Result<Vec<Found>, CacheError> {
    let mut found = Vec::new();
    for shard in fs::read_dir(chunks_dir).map_err(io_err("read directory", chunks_dir))? {
        let shard = shard.map_err(io_err("read directory", chunks_dir))?;
        let shard_path = shard.path();
        let shard_name = shard.file_name();
        let is_dir = shard.file_type().is_ok_and(|t| t.is_dir());
        let shard_ok = is_dir
            && shard_name
                .to_str()
                .is_some_and(|n| n.len() == 2 && is_lower_hex(n));
        if !shard_ok {
            remove_stray(&shard_path, is_dir);
            continue;
        }
        for file in fs::read_dir(&shard_path).map_err(io_err("read directory", &shard_path))? {
            let file = file.map_err(io_err("read directory", &shard_path))?;
            let path = file.path();
            let meta = match fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("inspect", &path)(e)),
            };
            let digest = file
                .file_name()
                .to_str()
                .filter(|n| {
                    n.len() == 64
                        && is_lower_hex(n)
                        && n.as_bytes()[..2] == *shard_name.as_encoded_bytes()
                })
                .and_then(|n| format!("sha256:{n}").parse::<Digest>().ok());
            match digest {
                Some(digest) if meta.is_file() && meta.len() <= MAX_ENTRY_BYTES => {
                    found.push(Found {
                        digest,
                        len: meta.len(),
                        mtime: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    });
                }
                _ => remove_stray(&path, meta.is_dir()),
            }
        }
    }
    Ok(found)
}

fn remove_stray(path: &Path, is_dir: bool) {
    if is_dir {
        tracing::warn!(path = %path.display(), "chunk cache: unexpected directory left alone");
        return;
    }
    tracing::warn!(path = %path.display(), "chunk cache: removing a file that is not a chunk");
    if let Err(e) = fs::remove_file(path) {
        tracing::warn!(path = %path.display(), error = %e, "chunk cache: cannot remove stray file");
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn footprint_rounds_to_blocks() {
        assert_eq!(footprint(0), 4096);
        assert_eq!(footprint(1), 4096);
        assert_eq!(footprint(4096), 4096);
        assert_eq!(footprint(4097), 8192);
    }

    #[test]
    fn insert_get_remove_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        let data = b"chunk data".to_vec();
        let d = Digest::of(&data);
        assert!(cache.get(&d).is_none());
        assert_eq!(cache.insert(&d, &data).unwrap(), InsertOutcome::Stored);
        assert_eq!(
            cache.insert(&d, &data).unwrap(),
            InsertOutcome::AlreadyPresent
        );
        assert_eq!(cache.get(&d).as_deref(), Some(&data[..]));
        let hex = d.hex();
        let path = dir.path().join("chunks/sha256").join(&hex[..2]).join(&hex);
        assert_eq!(fs::read(&path).unwrap(), data);
        assert_eq!((cache.usage().bytes, cache.usage().entries), (4096, 1));
        assert!(cache.remove(&d));
        assert!(!path.exists());
        assert_eq!((cache.usage().bytes, cache.usage().entries), (0, 0));
        let s = cache.stats();
        assert_eq!((s.hits, s.misses, s.inserts), (1, 1, 1));
    }

    #[test]
    fn stray_files_are_removed_at_open_and_not_counted() {
        let dir = tempfile::tempdir().unwrap();
        drop(DiskCache::open(dir.path(), 1 << 20).unwrap());
        let d = Digest::of(b"x");
        let wrong = if d.hex().starts_with("00") {
            "01"
        } else {
            "00"
        };
        let shard = dir.path().join("chunks/sha256").join(wrong);
        fs::write(shard.join("not-a-digest"), b"junk").unwrap();
        // A valid digest name in the wrong shard.
        fs::write(shard.join(d.hex()), b"x").unwrap();
        fs::write(dir.path().join("chunks/sha256/zz"), b"junk").unwrap();
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        assert_eq!((cache.usage().bytes, cache.usage().entries), (0, 0));
        assert!(!shard.join("not-a-digest").exists());
        assert!(!shard.join(d.hex()).exists());
        assert!(!dir.path().join("chunks/sha256/zz").exists());
        assert!(cache.get(&d).is_none());
    }

    #[test]
    fn missing_file_is_a_miss_and_releases_its_charge() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        let data = vec![7u8; 10_000];
        let d = Digest::of(&data);
        cache.insert(&d, &data).unwrap();
        fs::remove_file(cache.chunk_path(&d)).unwrap();
        assert!(cache.get(&d).is_none());
        assert_eq!((cache.usage().bytes, cache.usage().entries), (0, 0));
        assert_eq!(cache.stats().vanished, 1);
        // And it can be stored again.
        assert_eq!(cache.insert(&d, &data).unwrap(), InsertOutcome::Stored);
        assert_eq!(cache.get(&d).as_deref(), Some(&data[..]));
    }

    #[test]
    fn a_fifo_or_symlink_in_place_of_a_chunk_is_rejected_without_blocking() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        let (a, b) = (b"fifo chunk".to_vec(), b"link chunk".to_vec());
        let (da, db) = (Digest::of(&a), Digest::of(&b));
        cache.insert(&da, &a).unwrap();
        cache.insert(&db, &b).unwrap();
        // Same length as the chunk, so only the file type gives it away.
        let target = dir.path().join("elsewhere");
        fs::write(&target, &b).unwrap();
        fs::remove_file(cache.chunk_path(&db)).unwrap();
        std::os::unix::fs::symlink(&target, cache.chunk_path(&db)).unwrap();
        let fifo = cache.chunk_path(&da);
        fs::remove_file(&fifo).unwrap();
        let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // An open without O_NONBLOCK would hang here forever.
        assert!(cache.get(&da).is_none());
        assert!(cache.get(&db).is_none());
        assert!(!fifo.exists() && fs::symlink_metadata(cache.chunk_path(&db)).is_err());
        assert_eq!(cache.stats().entries, 0);
    }

    #[test]
    fn too_large_is_rejected_without_evicting() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 16 * 1024).unwrap();
        let small = vec![1u8; 100];
        let ds = Digest::of(&small);
        cache.insert(&ds, &small).unwrap();
        let big = vec![2u8; 16 * 1024 + 1];
        let db = Digest::of(&big);
        assert_eq!(cache.insert(&db, &big).unwrap(), InsertOutcome::TooLarge);
        assert!(cache.contains(&ds));
        assert!(!cache.chunk_path(&db).exists());
    }
}
