//! The on-demand chunk fetcher: turns a file byte range of one layer into
//! verified bytes, from the chunk cache when possible and from the layer blob
//! (by HTTP range request, or file read) otherwise.
//!
//! One [`Fetcher`] serves one layer blob. What it guarantees:
//! - every chunk is decompressed and checked against its `chunkDigest`
//!   ([`ChunkDecoder`]) before it is cached or returned; a chunk that fails is
//!   never served: the read fails with an error after bounded retries;
//! - one fetch per chunk however many readers wait for it ([`inflight`]);
//! - missing chunks that sit close together in the blob (the same file, and
//!   the next files in blob order) are merged into one range request of at most
//!   [`FetchConfig::max_request_bytes`]; a read also fetches up to
//!   [`FetchConfig::readahead_bytes`] of the following chunks that are cached
//!   nowhere, a window that doubles (up to [`FetchConfig::max_readahead_bytes`])
//!   while a file is read sequentially (of the preceding chunks, in a request
//!   of its own, while its misses move backward: [`ReadAhead`]); past the end
//!   of the file being read, a miss also fetches likely next files
//!   speculatively, bounded in bytes
//!   ([`speculate`]: the small files that follow in blob order, and the small
//!   files of a library or module directory), and counts how much of that was
//!   used;
//! - merging costs a waiting read nothing: a request's chunks are decoded,
//!   verified and published one by one as their bytes stream in
//!   ([`BlobSource::read_range_with`]), so a read waits for its own chunk, not
//!   for the read-ahead or the guesses behind it;
//! - every request is one single byte range (`Range: bytes=a-b`), never a
//!   multi-range request: registries backed by object stores and cluster
//!   mirrors reject those, and merging adjacent chunks into one range gets the
//!   same saving;
//! - at most [`FetchLimits`] requests per registry run at once; prefetch and
//!   background fetch use a separate, lower-priority pool and pause while
//!   on-demand reads wait;
//! - nothing hangs: every request has a timeout and every read a deadline.
//!
//! Layout: [`inflight`] (single flight), [`estimate`] (RTT and throughput
//! per registry),
//! [`speculate`] (speculative batching of misses),
//! [`stats`] (counters), [`toc`] (finding and fetching a layer's TOC),
//! [`prefetch`] (mount-time prefetch and background fetch),
//! [`libraries`] (fetching the shared libraries a program that starts needs).

pub mod estimate;
mod inflight;
pub mod libraries;
pub mod prefetch;
pub mod speculate;
pub mod stats;
pub mod toc;

use parking_lot::Mutex;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::runtime::Handle;
use tokio::sync::{Notify, Semaphore};

use inflight::{Claim, ClaimGuard, InFlight, Waiter};
pub use stats::{FailureCounts, FetchStats, FetchStatsSnapshot};
use zest_cache::ChunkCache;
use zest_format::{Chunk, ChunkDecoder, EntryId, EntryKind, FormatError, LayerIndex};
use zest_oci::digest::Digest;
use zest_registry::ErrorKind;
use zest_store::{BlobSource, SourceError};

/// Why a read could not be served. Cloned to every reader waiting on a chunk.
#[derive(Clone, Debug, thiserror::Error)]
pub enum FetchError {
    /// The blob source failed (after the source's own retries of transient
    /// failures; the fetcher does not retry them again).
    #[error("{0}")]
    Source(Arc<SourceError>),
    /// Fetched bytes did not decompress to the chunk's digest, every time they
    /// were fetched ([`FetchConfig::attempts`]); never served.
    #[error("{blob}: {source}")]
    Verification {
        /// The blob.
        blob: String,
        /// Blob offset of the chunk.
        offset: u64,
        /// What did not match.
        #[source]
        source: Arc<FormatError>,
    },
    /// The read did not complete within its deadline.
    #[error("read of {blob} timed out after {secs} s; the registry or network is slow or down: retry later")]
    Timeout {
        /// The blob.
        blob: String,
        /// The deadline.
        secs: u64,
    },
    /// The task fetching a chunk ended without an outcome (shutdown).
    #[error("chunk fetch was cancelled")]
    Cancelled,
    /// The layer's TOC could not be used.
    #[error("layer TOC of {blob}: {source}")]
    Toc {
        /// The blob.
        blob: String,
        /// What was wrong.
        #[source]
        source: Arc<FormatError>,
    },
    /// The entry is not a regular file.
    #[error("entry is not a regular file")]
    NotAFile,
    /// Internal failure (e.g. the decoder could not be created).
    #[error("{0}")]
    Internal(String),
}

/// What kind of failure a [`FetchError`] is: the source's kind
/// ([`zest_registry::ErrorKind`]) carried through, plus the fetcher's own. The
/// labels are stable (logs and metric labels).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FetchErrorKind {
    /// A kind the registry client and blob sources share (not found, denied, rate
    /// limited, ...); a chunk or TOC that does not match its digest is
    /// `Source(ErrorKind::DigestMismatch)` too.
    Source(ErrorKind),
    /// The layer's TOC is unusable (not a digest mismatch).
    TocInvalid,
    /// The fetch was abandoned (shutdown).
    Cancelled,
    /// A read of something that is not a regular file.
    NotAFile,
    /// A bug or resource failure inside zest.
    Internal,
}

impl FetchErrorKind {
    /// The fetcher's own kinds, after the source's in [`FetchErrorKind::ALL`].
    const OWN: [FetchErrorKind; 4] = [
        FetchErrorKind::TocInvalid,
        FetchErrorKind::Cancelled,
        FetchErrorKind::NotAFile,
        FetchErrorKind::Internal,
    ];

    /// Number of kinds.
    pub const COUNT: usize = ErrorKind::ALL.len() + Self::OWN.len();

    /// Every kind, in a fixed order: the source's kinds in
    /// [`zest_registry::ErrorKind::ALL`] order, then the fetcher's own.
    pub const ALL: [FetchErrorKind; Self::COUNT] = {
        let mut all = [FetchErrorKind::Internal; Self::COUNT];
        let mut i = 0;
        while i < ErrorKind::ALL.len() {
            all[i] = FetchErrorKind::Source(ErrorKind::ALL[i]);
            i += 1;
        }
        let mut j = 0;
        while j < Self::OWN.len() {
            all[i + j] = Self::OWN[j];
            j += 1;
        }
        all
    };

    /// A stable snake_case label; the source's kinds keep the registry's labels.
    pub fn label(self) -> &'static str {
        match self {
            FetchErrorKind::Source(k) => k.label(),
            FetchErrorKind::TocInvalid => "toc_invalid",
            FetchErrorKind::Cancelled => "cancelled",
            FetchErrorKind::NotAFile => "not_a_file",
            FetchErrorKind::Internal => "internal",
        }
    }

    /// Position in [`FetchErrorKind::ALL`].
    pub fn index(self) -> usize {
        let own = ErrorKind::ALL.len();
        match self {
            // `ErrorKind::ALL` lists the kinds in declaration order.
            FetchErrorKind::Source(k) => k as usize,
            FetchErrorKind::TocInvalid => own,
            FetchErrorKind::Cancelled => own + 1,
            FetchErrorKind::NotAFile => own + 2,
            FetchErrorKind::Internal => own + 3,
        }
    }
}

impl From<ErrorKind> for FetchErrorKind {
    fn from(k: ErrorKind) -> Self {
        FetchErrorKind::Source(k)
    }
}

impl std::fmt::Display for FetchErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

impl FetchError {
    /// What kind of failure this is.
    pub fn kind(&self) -> FetchErrorKind {
        match self {
            FetchError::Source(e) => e.kind().into(),
            FetchError::Verification { .. } => ErrorKind::DigestMismatch.into(),
            FetchError::Timeout { .. } => ErrorKind::Timeout.into(),
            FetchError::Cancelled => FetchErrorKind::Cancelled,
            FetchError::Toc { source, .. } => match source.as_ref() {
                FormatError::TocDigestMismatch { .. } => ErrorKind::DigestMismatch.into(),
                _ => FetchErrorKind::TocInvalid,
            },
            FetchError::NotAFile => FetchErrorKind::NotAFile,
            FetchError::Internal(_) => FetchErrorKind::Internal,
        }
    }
}

/// Tuning of a [`Fetcher`].
#[derive(Clone, Debug)]
pub struct FetchConfig {
    /// Largest merged range request (compressed bytes).
    pub max_request_bytes: u64,
    /// Largest hole between two wanted chunks that is fetched anyway to merge
    /// them into one request (tar headers sit between files).
    pub max_gap_bytes: u64,
    /// Compressed bytes of following, uncached chunks fetched with a read.
    pub readahead_bytes: u64,
    /// Largest read-ahead window, reached by doubling while a file's misses
    /// move forward sequentially.
    pub max_readahead_bytes: u64,
    /// Largest request of prefetch and background fetch.
    pub prefetch_request_bytes: u64,
    /// Compressed bytes of the small files following a missed file in blob
    /// order fetched along with the miss (0 = off; [`speculate`]).
    pub speculative_neighbour_bytes: u64,
    /// Compressed bytes of a library or module directory's small files fetched
    /// on its first miss (0 = off; [`speculate`]).
    pub speculative_dir_bytes: u64,
    /// Largest file (compressed bytes) fetched speculatively; a larger one ends
    /// the neighbour walk.
    pub speculative_file_bytes: u64,
    /// Fetches of a run of chunks while some fail digest verification (first
    /// included). Transport failures are not retried here: the source (the
    /// registry client's [`zest_registry::RetryPolicy`]) already did.
    pub attempts: u32,
    /// Deadline of one range read from a source that does not bound its reads
    /// itself (local blob files). A registry source's deadline is derived from
    /// its retry policy instead ([`BlobSource::read_deadline`] plus a margin).
    pub request_timeout: Duration,
    /// Delay before the first re-fetch of a chunk that failed verification;
    /// doubles each time.
    pub retry_backoff: Duration,
    /// Deadline of a whole read (waits included); then the reader gets EIO.
    pub read_timeout: Duration,
}

/// Added to a source's own read deadline when guarding a read with a timeout:
/// the source's typed error, not this guard, ends a slow read.
const SOURCE_DEADLINE_MARGIN: Duration = Duration::from_secs(5);

/// How long the fetcher lets one `read_range` of `source` run: the source's own
/// bound plus a margin, else `fallback`.
pub(crate) fn source_deadline(source: &dyn BlobSource, fallback: Duration) -> Duration {
    match source.read_deadline() {
        Some(d) => d.saturating_add(SOURCE_DEADLINE_MARGIN),
        None => fallback,
    }
}

/// Size of the first request of a prefetch; later ones double.
const PREFETCH_FIRST_REQUEST: u64 = 512 << 10;

/// Prefetch requests in flight at once, at least (see [`pipeline_depth`]).
const PREFETCH_PIPELINE: usize = 2;

/// Prefetch requests in flight at once, at most: they take on-demand permits
/// (`FetchLimits`), half of the default eight leaves room for reads.
const MAX_PREFETCH_PIPELINE: usize = 4;

/// Requests of `size` bytes to keep in flight so the link stays busy: one
/// transferring plus enough to cover a round trip (`bdp` bytes) of waiting,
/// within [`PREFETCH_PIPELINE`]..=[`MAX_PREFETCH_PIPELINE`].
fn pipeline_depth(bdp: Option<u64>, size: u64) -> usize {
    match bdp {
        Some(bdp) => (1 + bdp.div_ceil(size.max(1)))
            .clamp(PREFETCH_PIPELINE as u64, MAX_PREFETCH_PIPELINE as u64)
            as usize,
        None => PREFETCH_PIPELINE,
    }
}

/// Largest piece of a learned profile's files fetched as one request (see
/// [`schedule_pieces`]): about two bandwidth-delay products of a 200 Mbit/s,
/// 20 ms link, so two in flight keep such a link busy, yet a piece the start
/// reads later never holds up, for long, one it reads sooner.
const PROFILE_PIECE_BYTES: u64 = 1 << 20;

/// Smallest adaptive background request.
const BACKGROUND_MIN_REQUEST: u64 = 512 << 10;

/// Smallest neighbour budget a fast link's estimate cuts speculation to.
const SPECULATIVE_MIN: u64 = 64 << 10;

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            max_request_bytes: 4 << 20,
            max_gap_bytes: 64 << 10,
            readahead_bytes: 1 << 20,
            max_readahead_bytes: 8 << 20,
            prefetch_request_bytes: 8 << 20,
            // About one bandwidth-delay product of a 200 Mbit/s, 20 ms link:
            // the extra bytes cost about as long as the round trip they save.
            speculative_neighbour_bytes: 256 << 10,
            speculative_dir_bytes: 512 << 10,
            speculative_file_bytes: 256 << 10,
            attempts: 4,
            request_timeout: Duration::from_secs(30),
            retry_backoff: Duration::from_millis(100),
            read_timeout: Duration::from_secs(180),
        }
    }
}

/// Request concurrency limits shared by every layer of one registry: clone it
/// into each [`Fetcher`] of that registry.
#[derive(Clone, Debug)]
pub struct FetchLimits {
    inner: Arc<LimitsInner>,
}

#[derive(Debug)]
struct LimitsInner {
    ondemand: Semaphore,
    background: Semaphore,
    /// On-demand reads currently waiting for the network.
    waiting: AtomicUsize,
    /// Signalled when `waiting` drops to zero.
    idle: Notify,
    /// When an on-demand wait last ended, milliseconds since `epoch`.
    last_ondemand_ms: AtomicU64,
    epoch: Instant,
    /// RTT and throughput of this registry, from completed requests.
    estimator: estimate::Estimator,
}

impl FetchLimits {
    /// At most `ondemand` concurrent requests for reads and `background`
    /// concurrent requests for prefetch/background fetch.
    pub fn new(ondemand: usize, background: usize) -> FetchLimits {
        FetchLimits {
            inner: Arc::new(LimitsInner {
                ondemand: Semaphore::new(ondemand.max(1)),
                background: Semaphore::new(background.max(1)),
                waiting: AtomicUsize::new(0),
                idle: Notify::new(),
                last_ondemand_ms: AtomicU64::new(0),
                epoch: Instant::now(),
                estimator: estimate::Estimator::default(),
            }),
        }
    }

    fn waiting_guard(&self) -> WaitingGuard {
        self.inner.waiting.fetch_add(1, Ordering::Relaxed);
        WaitingGuard {
            limits: self.clone(),
        }
    }

    /// The registry's round-trip time and throughput as measured so far.
    pub fn estimate(&self) -> Option<estimate::LinkEstimate> {
        self.inner.estimator.get()
    }

    /// Waits until no on-demand read has waited for `quiet` (background work
    /// yields to bursts of reads, not only to single ones). Bounded: gives up
    /// waiting after a minute of continuous on-demand traffic.
    async fn until_quiet(&self, quiet: Duration) {
        let give_up = Instant::now() + Duration::from_secs(60);
        loop {
            self.until_idle().await;
            let last = self.inner.last_ondemand_ms.load(Ordering::Relaxed);
            let now = self.inner.epoch.elapsed().as_millis() as u64;
            let since = Duration::from_millis(now.saturating_sub(last));
            if last == 0 || since >= quiet || Instant::now() >= give_up {
                return;
            }
            tokio::time::sleep(quiet - since).await;
        }
    }

    /// Waits until no on-demand read is waiting (low-priority work yields).
    async fn until_idle(&self) {
        // Bounded polling on top of the notification: a lost wake-up costs at
        // most one period, never a hang.
        while self.inner.waiting.load(Ordering::Relaxed) > 0 {
            let _ =
                tokio::time::timeout(Duration::from_millis(20), self.inner.idle.notified()).await;
        }
    }
}

impl Default for FetchLimits {
    /// The daemon's defaults (`fetch.requests_per_registry`,
    /// `fetch.background_requests_per_registry`).
    fn default() -> Self {
        FetchLimits::new(16, 2)
    }
}

struct WaitingGuard {
    limits: FetchLimits,
}

impl Drop for WaitingGuard {
    fn drop(&mut self) {
        let inner = &self.limits.inner;
        inner.last_ondemand_ms.store(
            (inner.epoch.elapsed().as_millis() as u64).max(1),
            Ordering::Relaxed,
        );
        if self.limits.inner.waiting.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.limits.inner.idle.notify_waiters();
        }
    }
}

/// Priority of a fetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Priority {
    /// A reader waits: take an on-demand permit per request.
    OnDemand,
    /// The start-up set: readers are about to wait; on-demand permits, but
    /// counted as prefetch.
    Prefetch,
    /// Background fetch: the caller holds a background permit.
    Background,
}

/// How chunks are ordered in the blob, for merging and read-ahead.
#[derive(Debug)]
enum BlobOrder {
    /// `all_chunks()` is already sorted by blob offset (every real producer).
    Identity,
    /// `order[pos]` = chunk index at blob position `pos`; `pos_of[idx]` the inverse.
    Sorted { order: Vec<u32>, pos_of: Vec<u32> },
}

/// Fetches, verifies and caches the chunks of one layer blob.
pub struct Fetcher {
    index: Arc<LayerIndex>,
    source: Arc<dyn BlobSource>,
    cache: Arc<ChunkCache>,
    limits: FetchLimits,
    config: FetchConfig,
    runtime: Handle,
    inflight: Arc<InFlight>,
    stats: FetchStats,
    order: BlobOrder,
    /// Digests of zero chunks already checked (zeros are synthesized, never fetched).
    zeros_checked: Mutex<HashSet<(Digest, u64)>>,
    /// Per file: offset of the last miss and the current read-ahead window.
    sequential: Mutex<HashMap<EntryId, (u64, u64)>>,
    /// Regular files with data in blob order, and each entry's position in it
    /// (`u32::MAX`: none), for the neighbour walk.
    files: Vec<EntryId>,
    file_pos: Vec<u32>,
    /// Speculative chunks not yet used, directories already batched.
    ledger: speculate::Ledger,
    /// A learned start-up profile drives this layer's prefetch
    /// ([`Fetcher::set_profile_guided`]).
    profile_guided: std::sync::atomic::AtomicBool,
}

/// Files tracked for sequential detection before the table is reset (bounds memory).
const MAX_TRACKED_FILES: usize = 4096;

/// What a miss fetches beyond the chunks it reads: up to `bytes` of
/// compressed chunks of the same file that are cached nowhere, after the
/// read, or before it for a reader moving backward. Backward readers are
/// real: a start faults in a big program's code in descending runs
/// (measured: `cc1`'s, runs of three to five faults 40-950 KiB apart).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ReadAhead {
    pub bytes: u64,
    pub backward: bool,
}

impl ReadAhead {
    fn after(bytes: u64) -> Self {
        ReadAhead {
            bytes,
            backward: false,
        }
    }

    fn before(bytes: u64) -> Self {
        ReadAhead {
            bytes,
            backward: true,
        }
    }
}

/// Times a read claims a chunk whose fetch was abandoned before giving up.
const MAX_CLAIM_ROUNDS: u32 = 3;

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("source", &self.source)
            .field("stats", &self.stats.snapshot())
            .finish()
    }
}

/// One piece of a read: zeros or verified chunk bytes.
enum Piece {
    Zeros,
    Data(Bytes),
}

thread_local! {
    /// One zstd context per blocking-pool thread: creating one per chunk is slow.
    static DECODER: RefCell<Option<ChunkDecoder>> = const { RefCell::new(None) };
}

fn with_decoder<T>(f: impl FnOnce(&mut ChunkDecoder) -> T) -> Result<T, FetchError> {
    DECODER.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(
                ChunkDecoder::new()
                    .map_err(|e| FetchError::Internal(format!("zstd decoder: {e}")))?,
            );
        }
        match slot.as_mut() {
            Some(d) => Ok(f(d)),
            None => Err(FetchError::Internal("zstd decoder unavailable".into())),
        }
    })
}

/// Compressed bytes of the chunks of `run` (indices into `all`).
/// Orders the fetch of `wanted` (indexes into `all`, in the order they will be
/// read): chunks close together in the blob (holes up to `max_gap`) are grouped
/// into pieces of at most `piece_bytes` compressed bytes, each piece in blob
/// order, and pieces go in the order of the earliest read each serves. Files a
/// start reads scattered in time but that sit together in the blob (a package's
/// modules, a directory of libraries) thus share requests, while what is read
/// first is fetched first (the start waits on those bytes, not on a neighbour
/// read a second later).
fn schedule_pieces(
    wanted: &[usize],
    all: &[zest_format::Chunk],
    max_gap: u64,
    piece_bytes: u64,
) -> Vec<Vec<usize>> {
    let mut by_offset: Vec<(usize, usize)> = wanted
        .iter()
        .enumerate()
        .filter(|(_, &idx)| idx < all.len())
        .map(|(rank, &idx)| (rank, idx))
        .collect();
    by_offset.sort_by_key(|&(rank, idx)| (all[idx].compressed_range().start, rank));
    // (earliest read, chunks) per piece.
    let mut pieces: Vec<(usize, Vec<usize>)> = Vec::new();
    let (mut start, mut end) = (0u64, 0u64);
    for (rank, idx) in by_offset {
        let r = all[idx].compressed_range();
        match pieces.last_mut() {
            Some((first, piece))
                if r.start >= end && r.start - end <= max_gap && r.end - start <= piece_bytes =>
            {
                *first = (*first).min(rank);
                piece.push(idx);
                end = r.end;
            }
            _ => {
                pieces.push((rank, vec![idx]));
                (start, end) = (r.start, r.end);
            }
        }
    }
    pieces.sort_by_key(|(first, _)| *first);
    pieces.into_iter().map(|(_, piece)| piece).collect()
}

fn compressed_bytes(run: &[Owned], all: &[zest_format::Chunk]) -> u64 {
    run.iter()
        .filter_map(|o| all.get(o.idx))
        .map(|c| u64::from(c.compressed_len))
        .sum()
}

/// A chunk this task has claimed and must fetch.
struct Owned {
    /// Index into `all_chunks()`.
    idx: usize,
    guard: ClaimGuard,
    /// Why it is fetched.
    why: Why,
}

/// Why a chunk is fetched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Why {
    /// A reader (or prefetch) wants it.
    Wanted,
    /// Read-ahead in the file being read.
    ReadAhead,
    /// A guess about another file ([`speculate`]).
    Guess,
}

impl Fetcher {
    /// A fetcher for the blob behind `source`, whose TOC is `index`. Tasks run on
    /// `runtime`; requests are limited by `limits` (share one per registry).
    pub fn new(
        index: Arc<LayerIndex>,
        source: Arc<dyn BlobSource>,
        cache: Arc<ChunkCache>,
        limits: FetchLimits,
        config: FetchConfig,
        runtime: Handle,
    ) -> Arc<Fetcher> {
        let order = blob_order(index.all_chunks());
        let files: Vec<EntryId> = index.files_in_blob_order().collect();
        let mut file_pos = vec![u32::MAX; index.len()];
        for (pos, f) in files.iter().enumerate() {
            if let Some(p) = file_pos.get_mut(f.index()) {
                *p = pos as u32;
            }
        }
        Arc::new(Fetcher {
            index,
            source,
            cache,
            limits,
            config,
            runtime,
            inflight: Arc::new(InFlight::default()),
            stats: FetchStats::default(),
            order,
            zeros_checked: Mutex::new(HashSet::new()),
            sequential: Mutex::new(HashMap::new()),
            files,
            file_pos,
            ledger: speculate::Ledger::default(),
            profile_guided: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Marks this layer's start as known from a learned start-up profile:
    /// guesses made without one ([`libraries`]' Python import prefetch) stand
    /// down, the profile fetches what the start reads.
    pub fn set_profile_guided(&self) {
        self.profile_guided
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a start-up profile says what this layer's start reads: a
    /// learned one ([`Fetcher::set_profile_guided`]), or the one an optimized
    /// layer carries (its prefetch extent).
    pub fn profile_guided(&self) -> bool {
        self.profile_guided
            .load(std::sync::atomic::Ordering::Relaxed)
            || self.index.prefetch_extent().is_some()
    }

    /// The layer's index.
    pub fn index(&self) -> &Arc<LayerIndex> {
        &self.index
    }

    /// The chunk cache.
    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    /// The runtime the fetcher's tasks run on.
    pub fn runtime(&self) -> &Handle {
        &self.runtime
    }

    /// The counters.
    pub fn stats(&self) -> FetchStatsSnapshot {
        self.stats.snapshot()
    }

    /// The configuration.
    pub fn config(&self) -> &FetchConfig {
        &self.config
    }

    /// The blob, for messages.
    pub fn describe(&self) -> String {
        self.source.describe()
    }

    /// Reads `offset..offset + len` of file `id` from the memory cache only,
    /// without blocking: `None` when any chunk is not in memory (use
    /// [`Fetcher::read`]). The result is clamped to the file size.
    pub fn read_from_memory(&self, id: EntryId, offset: u64, len: u32) -> Option<Bytes> {
        let (range, chunks) = self.plan(id, offset, len).ok()?;
        let mut pieces = Vec::with_capacity(chunks.len());
        for c in chunks {
            if c.zeros {
                if !self.zeros_known(c) {
                    return None;
                }
                pieces.push(Piece::Zeros);
            } else {
                pieces.push(Piece::Data(self.cache.memory().get(&c.digest)?));
            }
        }
        self.stats
            .add_memory_hits(chunks.iter().filter(|c| !c.zeros).count() as u64);
        self.note_used(chunks);
        assemble(range, chunks, &pieces).ok()
    }

    /// Whether every chunk of `offset..offset + len` of file `id` is cached
    /// (memory or disk; runs of zeros need none). Never blocks.
    pub fn has_cached(&self, id: EntryId, offset: u64, len: u32) -> bool {
        self.plan(id, offset, len).is_ok_and(|(_, chunks)| {
            chunks
                .iter()
                .all(|c| c.zeros || c.compressed_len == 0 || self.is_cached(&c.digest))
        })
    }

    /// Reads `offset..offset + len` of file `id` from the cache tiers only
    /// (memory, then disk), never from the blob: `None` when a chunk is in
    /// neither. Runs of zeros need no fetch (their digest is checked here,
    /// once). The result is clamped to the file size.
    pub async fn read_cached(&self, id: EntryId, offset: u64, len: u32) -> Option<Bytes> {
        let (range, chunks) = self.plan(id, offset, len).ok()?;
        let mut pieces = Vec::with_capacity(chunks.len());
        for c in chunks {
            if c.zeros {
                self.check_zeros(c).await.ok()?;
                pieces.push(Piece::Zeros);
            } else if let Some(b) = self.cache.memory().get(&c.digest) {
                self.stats.add_memory_hits(1);
                pieces.push(Piece::Data(b));
            } else {
                pieces.push(Piece::Data(self.cache.get_async(&c.digest).await?));
                self.stats.add_disk_hits(1);
            }
        }
        self.note_used(chunks);
        assemble(range, chunks, &pieces).ok()
    }

    /// Reads `offset..offset + len` of file `id` (clamped to the file size) from
    /// the cache tiers or the blob. Fails rather than return unverified bytes.
    pub async fn read(
        self: &Arc<Self>,
        id: EntryId,
        offset: u64,
        len: u32,
    ) -> Result<Bytes, FetchError> {
        let deadline = self.config.read_timeout;
        match tokio::time::timeout(deadline, self.read_inner(id, offset, len)).await {
            Ok(r) => r,
            Err(_) => {
                let err = FetchError::Timeout {
                    blob: self.describe(),
                    secs: deadline.as_secs(),
                };
                tracing::warn!(kind = err.kind().label(), error = %err, "read deadline passed");
                Err(err)
            }
        }
    }

    /// Runs `fut` on the fetcher's runtime (used by the filesystem to answer a
    /// read from a task instead of a FUSE worker).
    pub fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.runtime.spawn(fut);
    }

    fn plan(
        &self,
        id: EntryId,
        offset: u64,
        len: u32,
    ) -> Result<(Range<u64>, &[Chunk]), FetchError> {
        let e = self.index.entry(id);
        if e.kind() != EntryKind::Reg {
            return Err(FetchError::NotAFile);
        }
        let size = e.size();
        let start = offset.min(size);
        let end = offset.saturating_add(u64::from(len)).min(size);
        let chunks = self.index.chunk_range_for(id, start, end - start);
        Ok((start..end, chunks))
    }

    async fn read_inner(
        self: &Arc<Self>,
        id: EntryId,
        offset: u64,
        len: u32,
    ) -> Result<Bytes, FetchError> {
        let (range, chunks) = self.plan(id, offset, len)?;
        let mut pieces: Vec<Option<Piece>> = Vec::with_capacity(chunks.len());
        let mut lookups = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            if c.zeros {
                self.check_zeros(c).await?;
                pieces.push(Some(Piece::Zeros));
            } else if let Some(b) = self.cache.memory().get(&c.digest) {
                self.stats.add_memory_hits(1);
                pieces.push(Some(Piece::Data(b)));
            } else {
                pieces.push(None);
                lookups.push(i);
            }
        }
        // The disk tier, all chunks of the read at once (reads and hashing run
        // on the blocking pool).
        let found = futures::future::join_all(
            lookups
                .iter()
                .filter_map(|&i| chunks.get(i))
                .map(|c| self.cache.get_async(&c.digest)),
        )
        .await;
        let mut missing = Vec::new();
        for (&i, f) in lookups.iter().zip(found) {
            match f {
                Some(b) => {
                    self.stats.add_disk_hits(1);
                    if let Some(slot) = pieces.get_mut(i) {
                        *slot = Some(Piece::Data(b));
                    }
                }
                None => missing.push(i),
            }
        }
        if !missing.is_empty() {
            self.stats.add_blocking_misses(1);
            tracing::debug!(
                blob = %self.describe(),
                file = %self.index.entry(id).path(),
                offset,
                len,
                chunks = missing.len(),
                "blocking miss"
            );
            // Blob positions of the file's first and last chunks: read-ahead
            // stays within the file (what follows it is `speculate`'s).
            let file_chunks = self.index.entry(id).chunks();
            let position = |c: Option<&Chunk>| {
                c.and_then(|c| self.chunk_index(c))
                    .and_then(|i| self.blob_pos(i))
            };
            let file_span = position(file_chunks.first()).zip(position(file_chunks.last()));
            let _waiting = self.limits.waiting_guard();
            let window = self.readahead_window(id, offset);
            // A fetch we waited on may be abandoned (its task stopped, e.g. a
            // prefetch at unmount): claim those chunks again, a bounded number
            // of times.
            let mut round = 0;
            while !missing.is_empty() {
                round += 1;
                let mut wanted = Vec::with_capacity(missing.len());
                for &i in &missing {
                    let idx = chunks.get(i).and_then(|c| self.chunk_index(c));
                    wanted.push(idx.ok_or_else(|| {
                        FetchError::Internal("chunk not in the layer index".into())
                    })?);
                }
                let readahead = if round == 1 {
                    window
                } else {
                    ReadAhead::default()
                };
                let speculate = (round == 1).then_some((id, offset));
                let waiters = self.fetch_chunks(&wanted, readahead, file_span, speculate);
                let mut again = Vec::new();
                for (&i, w) in missing.iter().zip(waiters) {
                    match w.wait().await {
                        Ok(data) => {
                            if let Some(slot) = pieces.get_mut(i) {
                                *slot = Some(Piece::Data(data));
                            }
                        }
                        Err(FetchError::Cancelled) if round < MAX_CLAIM_ROUNDS => again.push(i),
                        Err(e) => return Err(e),
                    }
                }
                missing = again;
            }
        }
        self.note_used(chunks);
        // Every piece is filled by now; a gap would be a bug, and is an error,
        // never zeros.
        let pieces: Vec<Piece> = pieces
            .into_iter()
            .map(|p| p.ok_or_else(|| FetchError::Internal("chunk missing after fetch".into())))
            .collect::<Result<_, _>>()?;
        assemble(range, chunks, &pieces)
    }

    /// The read-ahead of a miss at `offset` of file `id`: the base window,
    /// doubled for each miss close to the previous one (a sequential
    /// reader), reset by a jump; behind the read when the previous miss was
    /// just after it (a reader moving backward).
    pub(crate) fn readahead_window(&self, id: EntryId, offset: u64) -> ReadAhead {
        let base = self.config.readahead_bytes;
        if base == 0 {
            return ReadAhead::default();
        }
        let max = self.config.max_readahead_bytes.max(base);
        let mut seq = self.sequential.lock();
        if seq.len() >= MAX_TRACKED_FILES {
            seq.clear();
        }
        let (last, window) = seq.get(&id).copied().unwrap_or((u64::MAX, base));
        let near = window.saturating_mul(2).saturating_add(base);
        let grown = window.saturating_mul(2).min(max);
        let ahead = if offset > last && offset - last <= near {
            ReadAhead::after(grown)
        } else if offset < last && last - offset <= near {
            ReadAhead::before(grown)
        } else if offset == last {
            ReadAhead::after(window)
        } else {
            ReadAhead::after(base)
        };
        seq.insert(id, (offset, ahead.bytes));
        ahead
    }

    /// Counts the speculatively fetched chunks among `chunks` as used.
    fn note_used(&self, chunks: &[Chunk]) {
        for c in chunks.iter().filter(|c| !c.zeros) {
            if let Some(len) = self.ledger.used(&c.digest) {
                self.stats.add_speculative_used_bytes(u64::from(len));
            }
        }
    }

    /// Starts fetching the chunks `wanted` (indices into `all_chunks()`, in read
    /// order), plus the `readahead` of the file (whose chunks span blob
    /// positions `file_span`) and, when `speculate` names the file read (and
    /// the offset of the read), the speculative batch of its miss
    /// ([`speculate`]); returns one waiter per wanted chunk, in the same
    /// order.
    fn fetch_chunks(
        self: &Arc<Self>,
        wanted: &[usize],
        readahead: ReadAhead,
        file_span: Option<(usize, usize)>,
        speculate: Option<(EntryId, u64)>,
    ) -> Vec<Waiter> {
        let all = self.index.all_chunks();
        let mut owned: Vec<Owned> = Vec::new();
        let mut waiters = Vec::with_capacity(wanted.len());
        for &idx in wanted {
            let Some(c) = all.get(idx) else {
                waiters.push(Waiter::failed(FetchError::Internal(
                    "chunk index out of range".into(),
                )));
                continue;
            };
            // Two wanted chunks may share a digest (repeated content): the second
            // one waits on the first one's claim.
            match self.inflight.claim(c.digest) {
                Claim::Owner(guard) => {
                    waiters.push(guard.subscribe());
                    // A fetch may have completed between the cache lookup and
                    // the claim: no need to fetch again.
                    match self.cache.memory().get(&c.digest) {
                        Some(b) => guard.complete(Ok(b)),
                        None => owned.push(Owned {
                            idx,
                            guard,
                            why: Why::Wanted,
                        }),
                    }
                }
                Claim::Waiter(w) => {
                    self.stats.add_deduplicated_waits(1);
                    waiters.push(w);
                }
            }
        }
        // Read-behind goes in requests of its own: merged with the wanted
        // chunks it would come first, and the read would wait for it.
        let mut behind = Vec::new();
        if readahead.bytes > 0 && !owned.is_empty() {
            let positions = wanted.iter().filter_map(|&i| self.blob_pos(i));
            if readahead.backward {
                let first = positions.min().unwrap_or(0);
                let start = file_span.map(|(start, _)| start);
                self.claim_readahead(first, -1, readahead.bytes, start, &mut behind);
            } else {
                let last = positions.max().unwrap_or(0);
                let end = file_span.map(|(_, end)| end);
                self.claim_readahead(last, 1, readahead.bytes, end, &mut owned);
            }
        }
        if let Some((id, offset)) = speculate.filter(|_| !owned.is_empty() && self.may_speculate())
        {
            // The neighbour walk starts where this request ends, so the
            // neighbours ride in it (no hole wider than the gap limit).
            let end = owned
                .iter()
                .filter_map(|o| all.get(o.idx))
                .map(|c| c.compressed_range().end)
                .max()
                .unwrap_or(0);
            self.claim_neighbours(id, end, &mut owned);
            self.claim_directory(id, &mut owned);
            if offset == 0 {
                self.claim_program_tail(id, &mut owned);
            }
        }
        for claimed in [owned, behind] {
            for run in group_runs(
                all,
                claimed,
                self.config.max_gap_bytes,
                self.config.max_request_bytes,
            ) {
                let this = Arc::clone(self);
                self.runtime.spawn(async move {
                    this.fetch_run(run, Priority::OnDemand).await;
                });
            }
        }
        waiters
    }

    /// Claims chunks of the file being read that are cached nowhere, from
    /// blob position `from` on in `direction` (1: after it, -1: before it),
    /// up to `budget` bytes of compressed data, and not past `limit` (the
    /// file's last chunk going forward, its first going backward; unknown:
    /// none). Files after it are the business of [`speculate`].
    fn claim_readahead(
        &self,
        from: usize,
        direction: isize,
        budget: u64,
        limit: Option<usize>,
        owned: &mut Vec<Owned>,
    ) {
        let Some(limit) = limit else {
            return;
        };
        let all = self.index.all_chunks();
        let mut taken = 0u64;
        // Bounded walk: at most this many positions are examined.
        let max_steps = 4096usize;
        let mut pos = from;
        for _ in 0..max_steps {
            if taken >= budget {
                break;
            }
            pos = match pos.checked_add_signed(direction) {
                Some(p) if (direction > 0 && p <= limit) || (direction < 0 && p >= limit) => p,
                _ => break,
            };
            let Some(idx) = self.chunk_at(pos) else { break };
            let Some(c) = all.get(idx) else { break };
            if c.zeros || c.compressed_len == 0 || self.is_cached(&c.digest) {
                continue;
            }
            if let Claim::Owner(guard) = self.inflight.claim(c.digest) {
                // Re-check after claiming (a fetch may just have finished);
                // complete rather than drop: dropping reports a failure.
                match self.cache.memory().get(&c.digest) {
                    Some(b) => guard.complete(Ok(b)),
                    None => {
                        taken += u64::from(c.compressed_len);
                        owned.push(Owned {
                            idx,
                            guard,
                            why: Why::ReadAhead,
                        });
                    }
                }
            }
        }
    }

    fn is_cached(&self, d: &Digest) -> bool {
        self.cache.memory().contains(d) || self.cache.disk().is_some_and(|disk| disk.contains(d))
    }

    /// Whether a chunk needs fetching: not cached, not in flight, has bytes.
    fn needs_fetch(&self, c: &Chunk) -> bool {
        !c.zeros
            && c.compressed_len > 0
            && !self.is_cached(&c.digest)
            && !self.inflight.contains(&c.digest)
    }

    /// Fetches one run of claimed chunks (one range request per attempt),
    /// verifies and caches each chunk and publishes the outcome to its waiters.
    ///
    /// Chunks are decoded and published as their bytes arrive, not when the
    /// whole request is in: a reader waiting for the first chunk of a long
    /// read-ahead, prefetch or speculative request gets it after its own bytes,
    /// not after everything merged behind it.
    ///
    /// Only chunks that fail verification are fetched again (at most
    /// [`FetchConfig::attempts`] fetches in all): the source has already retried
    /// transport failures under its policy, so its errors end the run at once.
    async fn fetch_run(&self, run: Vec<Owned>, priority: Priority) {
        use futures::stream::{FuturesUnordered, StreamExt};
        let all = self.index.all_chunks();
        let mut remaining = run;
        let mut last_err: Option<FetchError> = None;
        let attempts = self.config.attempts.max(1);
        let deadline = source_deadline(self.source.as_ref(), self.config.request_timeout);
        for attempt in 0..attempts {
            if remaining.is_empty() {
                return;
            }
            if attempt > 0 {
                self.stats.add_retries(1);
                let backoff = self
                    .config
                    .retry_backoff
                    .saturating_mul(1 << (attempt - 1).min(6));
                tokio::time::sleep(backoff).await;
            }
            let chunks: Vec<Chunk> = remaining
                .iter()
                .filter_map(|o| all.get(o.idx).copied())
                .collect();
            if chunks.len() != remaining.len() {
                last_err = Some(FetchError::Internal("chunk index out of range".into()));
                break;
            }
            let Some(range) = covering(&chunks) else {
                break;
            };
            // Background callers hold their (lower-priority) permit already.
            let _permit = match priority {
                Priority::OnDemand | Priority::Prefetch => {
                    match self.limits.inner.ondemand.acquire().await {
                        Ok(p) => Some(p),
                        Err(_) => {
                            last_err = Some(FetchError::Cancelled);
                            break;
                        }
                    }
                }
                Priority::Background => None,
            };
            self.stats.add_range_requests(1);
            let expected = range.end - range.start;
            let sent = Instant::now();
            tracing::trace!(blob = %self.describe(), start = range.start, len = expected, chunks = chunks.len(), ?priority, "range request sent");

            // The source hands pieces over as they arrive; this task assembles
            // them and decodes each chunk (off the async workers) once its last
            // byte is in, while the rest of the answer streams.
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Bytes)>();
            let on_data = move |offset: u64, data: Bytes| {
                let _ = tx.send((offset, data));
            };
            let read = tokio::time::timeout(
                deadline,
                self.source.read_range_with(range.clone(), &on_data),
            );
            tokio::pin!(read);
            // Positions in `remaining`, by where their bytes end.
            let mut order: Vec<usize> = (0..chunks.len()).collect();
            order.sort_by_key(|&i| chunks[i].compressed_range().end);
            let mut next = 0usize;
            let mut buf = BytesMut::with_capacity(usize::try_from(expected).unwrap_or(0));
            let mut decoding = FuturesUnordered::new();
            let mut slots: Vec<Option<Owned>> = remaining.into_iter().map(Some).collect();
            let mut failed: Vec<Owned> = Vec::new();
            let mut read_result = None;
            let blob = self.describe();
            loop {
                tokio::select! {
                    biased;
                    Some(done) = decoding.next(), if !decoding.is_empty() => {
                        self.publish_decoded(done, &mut slots, &mut failed, &mut last_err, attempt);
                        continue;
                    }
                    piece = rx.recv(), if read_result.is_none() || !rx.is_empty() => {
                        if let Some((offset, data)) = piece {
                            append_piece(&mut buf, range.start, offset, &data);
                        }
                    }
                    r = &mut read, if read_result.is_none() => {
                        read_result = Some(r);
                    }
                    else => break,
                }
                // Every chunk whose bytes are all in goes to a decoder.
                let have = range.start + buf.len() as u64;
                let mut batch = Vec::new();
                while let Some(&pos) = order.get(next) {
                    let c = chunks[pos];
                    if c.compressed_range().end > have {
                        break;
                    }
                    let lo = (c.compressed_offset - range.start) as usize;
                    let hi = lo + c.compressed_len as usize;
                    batch.push((pos, c, Bytes::copy_from_slice(&buf[lo..hi])));
                    next += 1;
                }
                if !batch.is_empty() {
                    let blob = blob.clone();
                    decoding.push(tokio::task::spawn_blocking(move || {
                        batch
                            .into_iter()
                            .map(|(pos, c, bytes)| {
                                let r = with_decoder(|d| d.decode(&c, &bytes))
                                    .and_then(|r| r.map_err(|e| verification_error(&blob, &c, e)));
                                (pos, r)
                            })
                            .collect::<Vec<_>>()
                    }));
                }
                if read_result.is_some() && rx.is_empty() && decoding.is_empty() {
                    break;
                }
            }
            let source_err = match read_result {
                Some(Ok(Ok(()))) if buf.len() as u64 == expected => {
                    self.limits.inner.estimator.record(expected, sent.elapsed());
                    None
                }
                Some(Ok(Ok(()))) => Some(SourceError::WrongLength {
                    blob: blob.clone(),
                    range: range.clone(),
                    got: buf.len() as u64,
                }),
                Some(Ok(Err(e))) => Some(e),
                Some(Err(_)) | None => Some(SourceError::Timeout {
                    blob: blob.clone(),
                    range: range.clone(),
                    after: deadline,
                }),
            };
            tracing::trace!(blob = %blob, start = range.start, len = buf.len(), ms = sent.elapsed().as_millis() as u64, ok = source_err.is_none(), "range request done");
            self.stats.add_bytes_fetched(buf.len() as u64);
            if priority != Priority::OnDemand {
                self.stats.add_prefetch_bytes(buf.len() as u64);
            }
            // Chunks whose bytes never came keep their claims for the error below.
            let undelivered: Vec<Owned> = slots.into_iter().flatten().collect();
            if let Some(e) = source_err {
                last_err = Some(FetchError::Source(Arc::new(e)));
                failed.extend(undelivered);
                remaining = failed;
                break;
            }
            failed.extend(undelivered);
            remaining = failed;
            // Only verification failures are worth another fetch.
            if !matches!(last_err, Some(FetchError::Verification { .. }) | None) {
                break;
            }
        }
        if remaining.is_empty() {
            return;
        }
        let err = last_err.unwrap_or(FetchError::Cancelled);
        let kind = err.kind();
        self.stats.add_failure(kind);
        tracing::error!(kind = kind.label(), error = %err, chunks = remaining.len(), blob = %self.describe(), "giving up on chunks");
        for owned in remaining {
            owned.guard.complete(Err(err.clone()));
        }
    }

    /// Publishes one decoder batch of [`Fetcher::fetch_run`]: verified chunks go
    /// to the cache, then to their waiters; failed ones are kept for another
    /// attempt with the error.
    fn publish_decoded(
        &self,
        done: Result<DecodedBatch, tokio::task::JoinError>,
        slots: &mut [Option<Owned>],
        failed: &mut Vec<Owned>,
        last_err: &mut Option<FetchError>,
        attempt: u32,
    ) {
        let results = match done {
            Ok(r) => r,
            Err(e) => {
                // The batch's chunks stay in `slots` and fail with this error.
                *last_err = Some(FetchError::Internal(format!("decode task failed: {e}")));
                return;
            }
        };
        let all = self.index.all_chunks();
        for (pos, result) in results {
            let Some(owned) = slots.get_mut(pos).and_then(Option::take) else {
                continue;
            };
            match result {
                Ok(data) => {
                    self.stats.add_chunks_verified(1);
                    let data = Bytes::from(data);
                    // Cache first, then publish: a reader arriving after the
                    // claim is released finds the chunk in memory.
                    self.cache.insert(owned.guard.digest(), data.clone());
                    if owned.why != Why::Wanted {
                        if let Some(c) = all.get(owned.idx) {
                            self.stats
                                .add_speculative_bytes(u64::from(c.compressed_len));
                            // Before publishing: a reader waiting on this
                            // claim counts it as used after the wait.
                            self.ledger.fetched(
                                c.digest,
                                c.compressed_len,
                                owned.why == Why::Guess,
                            );
                        }
                    }
                    owned.guard.complete(Ok(data));
                }
                Err(e) => {
                    if matches!(e, FetchError::Verification { .. }) {
                        self.stats.add_verification_failures(1);
                        tracing::warn!(kind = e.kind().label(), error = %e, attempt, "chunk failed verification; fetching it again");
                    }
                    *last_err = Some(e);
                    failed.push(owned);
                }
            }
        }
    }

    /// Claims the next run of uncached chunks inside `extent`, in blob order
    /// from position `*pos`: at most `size` bytes from its first chunk, no hole
    /// wider than `max_gap_bytes`. Advances `*pos` past what it looked at; at
    /// the extent's end `*pos` is the chunk count.
    fn claim_run(&self, extent: &Range<u64>, pos: &mut usize, size: u64) -> Vec<Owned> {
        let all = self.index.all_chunks();
        let mut run: Vec<Owned> = Vec::new();
        let mut run_start = None;
        let mut run_end = 0u64;
        while *pos < all.len() {
            let Some(c) = self
                .chunk_at(*pos)
                .and_then(|idx| all.get(idx).map(|c| (idx, c)))
            else {
                *pos = all.len();
                break;
            };
            let (idx, c) = c;
            let r = c.compressed_range();
            if r.start < extent.start || !self.needs_fetch(c) {
                *pos += 1;
                continue;
            }
            if r.end > extent.end {
                *pos = all.len();
                break;
            }
            let start = *run_start.get_or_insert(r.start);
            if !run.is_empty()
                && (r.end - start > size
                    || r.start.saturating_sub(run_end) > self.config.max_gap_bytes)
            {
                break;
            }
            *pos += 1;
            if let Claim::Owner(guard) = self.inflight.claim(c.digest) {
                // Re-check after claiming; complete rather than drop (dropping
                // reports a failure to waiters).
                match self.cache.memory().get(&c.digest) {
                    Some(b) => guard.complete(Ok(b)),
                    None => {
                        run_end = r.end;
                        run.push(Owned {
                            idx,
                            guard,
                            why: Why::Wanted,
                        });
                    }
                }
            }
        }
        run
    }

    /// Fetches the prefetch extent: the start-up set a profile put first in
    /// the blob, which the workload is about to read in that order. Unlike
    /// background fetch it runs at on-demand priority and never pauses for
    /// on-demand reads (they are waiting for these very chunks). Requests start
    /// small, so the first files arrive after one round trip, and double up to
    /// `prefetch_request_bytes`; enough are in flight at once that round trips
    /// overlap transfers ([`pipeline_depth`] of the measured link, at least
    /// [`PREFETCH_PIPELINE`]). Returns the compressed bytes fetched.
    pub async fn fetch_prefetch(&self, extent: Range<u64>) -> u64 {
        use futures::stream::{FuturesUnordered, StreamExt};
        let all = self.index.all_chunks();
        let max = self.config.prefetch_request_bytes.max(1);
        let mut size = PREFETCH_FIRST_REQUEST.min(max);
        let mut fetched = 0u64;
        let mut pos = 0usize;
        let mut in_flight = FuturesUnordered::new();
        loop {
            let run = self.claim_run(&extent, &mut pos, size);
            if !run.is_empty() {
                fetched += compressed_bytes(&run, all);
                in_flight.push(self.fetch_run(run, Priority::Prefetch));
                size = size.saturating_mul(2).min(max);
            }
            let done = pos >= all.len();
            let depth = pipeline_depth(self.limits.estimate().map(|e| e.bdp()), size);
            if in_flight.len() >= depth || (done && !in_flight.is_empty()) {
                in_flight.next().await;
            }
            if done && in_flight.is_empty() {
                break;
            }
        }
        fetched
    }

    /// Fetches the not-yet-cached chunks of `files`, in that order (a learned
    /// start-up profile: the workload is about to read them), at on-demand
    /// priority like [`Fetcher::fetch_prefetch`]. Chunks close together in the
    /// blob share a request (holes up to `max_gap_bytes`), in pieces of up to
    /// [`PROFILE_PIECE_BYTES`] that go in the order of their earliest read
    /// ([`schedule_pieces`]); at most [`pipeline_depth`] requests are in
    /// flight. Stops adding files once `max_bytes` compressed bytes are wanted.
    /// Chunks being fetched already (a reader, another prefetch) are left to
    /// that fetch. Returns the compressed bytes fetched.
    pub async fn fetch_files(&self, files: &[EntryId], max_bytes: u64) -> u64 {
        let whole = 0..u64::MAX;
        let parts: Vec<(EntryId, Range<u64>)> =
            files.iter().map(|&id| (id, whole.clone())).collect();
        self.fetch_file_parts(&parts, max_bytes, false, None).await
    }

    /// Like [`Fetcher::fetch_files`], for parts of files: the chunks of each
    /// file that overlap its uncompressed byte range (the segments of a shared
    /// library the loader is about to map). With `for_reader` (the parts are
    /// about to be read: library prefetch), also waits until the chunks
    /// another fetch had claimed have arrived, and counts the bytes as fetched
    /// for reads, not as prefetch (so they widen, like reads do, what
    /// speculative guesses may spend). `progress`, when given, is notified
    /// each time one of the requests completes (its chunks are cached), so a
    /// caller can use files as they arrive ([`Fetcher::has_cached`]) instead
    /// of when the last one has. Returns the compressed bytes fetched.
    pub async fn fetch_file_parts(
        &self,
        parts: &[(EntryId, Range<u64>)],
        max_bytes: u64,
        for_reader: bool,
        progress: Option<&Notify>,
    ) -> u64 {
        let priority = if for_reader {
            Priority::OnDemand
        } else {
            Priority::Prefetch
        };
        use futures::stream::{FuturesUnordered, StreamExt};
        let all = self.index.all_chunks();
        let max_request = self.config.prefetch_request_bytes.max(1);
        let max_gap = self.config.max_gap_bytes;
        // A library's parts are all read at once (the loader maps them
        // together): whole runs. A profile's files are read over the start:
        // smaller pieces, in read order.
        let piece_bytes = if for_reader {
            max_request
        } else {
            PROFILE_PIECE_BYTES.min(max_request)
        };
        let mut wanted: Vec<usize> = Vec::new();
        let mut taken: HashSet<usize> = HashSet::new();
        let mut budget = 0u64;
        'files: for (id, range) in parts {
            if id.index() >= self.index.len() {
                continue;
            }
            let len = range.end.saturating_sub(range.start);
            for c in self.index.chunk_range_for(*id, range.start, len) {
                let Some(idx) = self.chunk_index(c) else {
                    continue;
                };
                if !taken.insert(idx) || c.zeros || c.compressed_len == 0 {
                    continue;
                }
                budget = budget.saturating_add(u64::from(c.compressed_len));
                if budget > max_bytes {
                    break 'files;
                }
                wanted.push(idx);
            }
        }
        let pieces = schedule_pieces(&wanted, all, max_gap, piece_bytes);
        let mut fetched = 0u64;
        let mut in_flight = FuturesUnordered::new();
        let mut run: Vec<Owned> = Vec::new();
        let mut others: Vec<Waiter> = Vec::new();
        let (mut run_start, mut run_end, mut run_piece) = (0u64, 0u64, 0usize);
        let mut ordered: Vec<(usize, usize)> = Vec::with_capacity(wanted.len());
        for (n, piece) in pieces.into_iter().enumerate() {
            ordered.extend(piece.into_iter().map(|idx| (n, idx)));
        }
        let mut wanted = ordered.into_iter();
        loop {
            let next = wanted.next();
            let chunk = next.and_then(|(n, idx)| all.get(idx).map(|c| (n, idx, c)));
            // Whether the chunk extends the run being built (same piece, it
            // follows the run in the blob, close enough, and the request
            // stays within bounds).
            let joins = !run.is_empty()
                && chunk.is_some_and(|(n, _, c)| {
                    let r = c.compressed_range();
                    n == run_piece
                        && r.start >= run_end
                        && r.start - run_end <= max_gap
                        && r.end - run_start <= max_request
                });
            if !run.is_empty() && !joins {
                let bytes = compressed_bytes(&run, all);
                fetched += bytes;
                let run = std::mem::take(&mut run);
                in_flight.push(async move {
                    self.fetch_run(run, priority).await;
                    if let Some(progress) = progress {
                        progress.notify_one();
                    }
                });
                // Sized by the request just made: small scattered files need
                // more requests in flight to fill the link than big runs do.
                let depth = pipeline_depth(self.limits.estimate().map(|e| e.bdp()), bytes);
                if in_flight.len() >= depth {
                    in_flight.next().await;
                }
            }
            let Some((piece, idx, c)) = chunk else {
                if next.is_none() {
                    break;
                }
                continue;
            };
            // Chunks in flight are claimed too when the caller waits for
            // them (the claim is then a waiter).
            let skip = if for_reader {
                c.zeros || c.compressed_len == 0 || self.is_cached(&c.digest)
            } else {
                !self.needs_fetch(c)
            };
            if skip {
                continue;
            }
            match self.inflight.claim(c.digest) {
                Claim::Owner(guard) => {
                    // Re-check after claiming; complete rather than drop
                    // (dropping reports a failure to waiters).
                    match self.cache.memory().get(&c.digest) {
                        Some(b) => guard.complete(Ok(b)),
                        None => {
                            let r = c.compressed_range();
                            if run.is_empty() {
                                run_start = r.start;
                                run_piece = piece;
                            }
                            run_end = r.end;
                            run.push(Owned {
                                idx,
                                guard,
                                why: Why::Wanted,
                            });
                        }
                    }
                }
                Claim::Waiter(w) if for_reader => others.push(w),
                Claim::Waiter(_) => {}
            }
        }
        while in_flight.next().await.is_some() {}
        for w in others {
            // A failure is the other fetch's to report; the caller finds the
            // chunk missing.
            let _ = w.wait().await;
        }
        fetched
    }

    /// Fetches the not-yet-cached chunks whose compressed extents lie inside
    /// `extent` with background priority, pausing while on-demand reads wait.
    /// When `rate` is set (non-zero), limits throughput to about that many
    /// bytes per second, in requests of `prefetch_request_bytes`. Otherwise it
    /// uses the link's spare bandwidth: requests of about four
    /// bandwidth-delay products ([`FetchLimits::estimate`]; at most
    /// `prefetch_request_bytes`), so an on-demand request never queues behind
    /// a long transfer, and each one waits until on-demand reads have been
    /// quiet for two round trips. Returns the compressed bytes fetched.
    pub async fn fetch_background(&self, extent: Range<u64>, rate: Option<u64>) -> u64 {
        let all = self.index.all_chunks();
        let rate = rate.filter(|r| *r > 0);
        let mut fetched = 0u64;
        let mut pos = 0usize;
        let started = tokio::time::Instant::now();
        while pos < all.len() {
            let (size, quiet) = self.background_step(rate.is_some());
            self.limits.until_quiet(quiet).await;
            // Take the permit before claiming: a claimed chunk must not wait for
            // a permit while an on-demand reader waits on the claim.
            let Ok(_permit) = self.limits.inner.background.acquire().await else {
                break;
            };
            let run = self.claim_run(&extent, &mut pos, size);
            if run.is_empty() {
                continue;
            }
            let bytes: u64 = run
                .iter()
                .filter_map(|o| all.get(o.idx))
                .map(|c| u64::from(c.compressed_len))
                .sum();
            self.fetch_run(run, Priority::Background).await;
            fetched += bytes;
            if let Some(rate) = rate {
                // Sleep until the average rate is back under the limit.
                let due = Duration::from_secs_f64(fetched as f64 / rate as f64);
                let elapsed = started.elapsed();
                if due > elapsed {
                    tokio::time::sleep(due - elapsed).await;
                }
            }
        }
        fetched
    }

    /// Request size and quiet period of the next background request (see
    /// [`Fetcher::fetch_background`]).
    fn background_step(&self, rate_limited: bool) -> (u64, Duration) {
        let max = self.config.prefetch_request_bytes.max(1);
        if rate_limited {
            return (max, Duration::ZERO);
        }
        match self.limits.estimate() {
            Some(e) => (
                e.bdp()
                    .saturating_mul(4)
                    .clamp(BACKGROUND_MIN_REQUEST, max.max(BACKGROUND_MIN_REQUEST))
                    .min(max),
                (e.rtt * 2).clamp(Duration::from_millis(5), Duration::from_millis(500)),
            ),
            // Nothing measured yet: modest requests until something is.
            None => (BACKGROUND_MIN_REQUEST.min(max), Duration::from_millis(50)),
        }
    }

    /// The neighbour budget of a miss: the configured one, cut to one
    /// bandwidth-delay product (at least [`SPECULATIVE_MIN`]) once the link is
    /// measured, since beyond that a guess costs more time than the round trip
    /// it may save.
    pub(crate) fn neighbour_budget(&self) -> u64 {
        let configured = self.config.speculative_neighbour_bytes;
        match self.limits.estimate() {
            Some(e) => configured.min(e.bdp().max(SPECULATIVE_MIN)),
            None => configured,
        }
    }

    /// Index into `all_chunks()` of a chunk borrowed from it (the index hands
    /// out sub-slices of that table); `None` for any other reference.
    fn chunk_index(&self, c: &Chunk) -> Option<usize> {
        let all = self.index.all_chunks();
        let offset = (c as *const Chunk as usize).checked_sub(all.as_ptr() as usize)?;
        let idx = offset / std::mem::size_of::<Chunk>();
        all.get(idx).filter(|x| std::ptr::eq(*x, c)).map(|_| idx)
    }

    /// Blob position of chunk `idx`.
    fn blob_pos(&self, idx: usize) -> Option<usize> {
        match &self.order {
            BlobOrder::Identity => Some(idx),
            BlobOrder::Sorted { pos_of, .. } => pos_of.get(idx).map(|&p| p as usize),
        }
    }

    /// Chunk index at blob position `pos`.
    fn chunk_at(&self, pos: usize) -> Option<usize> {
        match &self.order {
            BlobOrder::Identity => (pos < self.index.all_chunks().len()).then_some(pos),
            BlobOrder::Sorted { order, .. } => order.get(pos).map(|&i| i as usize),
        }
    }

    fn zeros_known(&self, c: &Chunk) -> bool {
        self.zeros_checked.lock().contains(&(c.digest, c.len))
    }

    /// Checks once that a zero chunk's digest is the digest of `len` zeros: the
    /// zeros are then synthesized for every read.
    async fn check_zeros(&self, c: &Chunk) -> Result<(), FetchError> {
        if self.zeros_known(c) {
            return Ok(());
        }
        let (digest, len) = (c.digest, c.len);
        let ok = tokio::task::spawn_blocking(move || zeros_digest(len) == digest)
            .await
            .map_err(|e| FetchError::Internal(format!("hash task failed: {e}")))?;
        if !ok {
            self.stats.add_verification_failures(1);
            let err = FetchError::Verification {
                blob: self.describe(),
                offset: c.compressed_offset,
                source: Arc::new(FormatError::ChunkDigestMismatch {
                    offset: c.compressed_offset,
                    file_offset: c.file_offset,
                    expected: digest,
                    actual: zeros_digest(len),
                }),
            };
            self.stats.add_failure(err.kind());
            tracing::error!(kind = err.kind().label(), error = %err, "zero chunk failed verification");
            return Err(err);
        }
        self.zeros_checked.lock().insert((digest, len));
        Ok(())
    }
}

/// sha256 of `len` zero bytes, hashed in pieces (zero chunks may be huge).
fn zeros_digest(len: u64) -> Digest {
    let block = [0u8; 64 << 10];
    let mut h = zest_oci::digest::Hasher::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        h.update(&block[..n]);
        left -= n as u64;
    }
    h.finish()
}

fn verification_error(blob: &str, c: &Chunk, e: FormatError) -> FetchError {
    FetchError::Verification {
        blob: blob.to_string(),
        offset: c.compressed_offset,
        source: Arc::new(e),
    }
}

/// One decoder task's results in [`Fetcher::fetch_run`]: positions in the run
/// with each chunk's decoded bytes or why they are not served.
type DecodedBatch = Vec<(usize, Result<Vec<u8>, FetchError>)>;

/// Appends the part of a piece of a range answer that `buf` (the answer's
/// bytes from `start` on) does not hold yet. A source that retried sends its
/// answer again from the beginning: bytes already held are skipped.
fn append_piece(buf: &mut BytesMut, start: u64, offset: u64, data: &[u8]) {
    let have = start + buf.len() as u64;
    if offset > have {
        // A gap cannot be filled later: leave the buffer short, so the chunks
        // past it are never decoded and the read reports the wrong length.
        return;
    }
    let skip = (have - offset) as usize;
    if let Some(rest) = data.get(skip..) {
        buf.extend_from_slice(rest);
    }
}

fn covering(chunks: &[Chunk]) -> Option<Range<u64>> {
    let start = chunks.iter().map(|c| c.compressed_offset).min()?;
    let end = chunks.iter().map(|c| c.compressed_range().end).max()?;
    Some(start..end)
}

fn blob_order(all: &[Chunk]) -> BlobOrder {
    if all
        .windows(2)
        .all(|w| w[0].compressed_offset <= w[1].compressed_offset)
    {
        return BlobOrder::Identity;
    }
    let mut order: Vec<u32> = (0..all.len() as u32).collect();
    order.sort_by_key(|&i| all.get(i as usize).map_or(0, |c| c.compressed_offset));
    let mut pos_of = vec![0u32; all.len()];
    for (pos, &idx) in order.iter().enumerate() {
        if let Some(p) = pos_of.get_mut(idx as usize) {
            *p = pos as u32;
        }
    }
    BlobOrder::Sorted { order, pos_of }
}

/// Groups claimed chunks into runs: sorted by blob offset, a new run starts
/// when the hole to the previous chunk exceeds `max_gap` or the run would
/// exceed `max_request` bytes.
fn group_runs(
    all: &[Chunk],
    mut owned: Vec<Owned>,
    max_gap: u64,
    max_request: u64,
) -> Vec<Vec<Owned>> {
    owned.sort_by_key(|o| all.get(o.idx).map_or(0, |c| c.compressed_offset));
    let extents: Vec<Range<u64>> = owned
        .iter()
        .map(|o| all.get(o.idx).map_or(0..0, Chunk::compressed_range))
        .collect();
    let mut runs: Vec<Vec<Owned>> = Vec::new();
    for (o, r) in owned
        .into_iter()
        .zip(split_runs(&extents, max_gap, max_request))
    {
        if r >= runs.len() {
            runs.push(Vec::new());
        }
        if let Some(run) = runs.last_mut() {
            run.push(o);
        }
    }
    runs
}

/// For extents sorted by start, the run number of each: a new run starts when
/// the hole to the previous extent exceeds `max_gap` or the run would span more
/// than `max_request` bytes (a single larger extent is a run of its own).
fn split_runs(extents: &[Range<u64>], max_gap: u64, max_request: u64) -> Vec<usize> {
    let mut out = Vec::with_capacity(extents.len());
    let mut run = 0usize;
    let mut span: Option<Range<u64>> = None;
    for r in extents {
        span = match span {
            Some(s)
                if r.start.saturating_sub(s.end) <= max_gap
                    && r.end.max(s.end) - s.start <= max_request =>
            {
                Some(s.start..r.end.max(s.end))
            }
            Some(_) => {
                run += 1;
                Some(r.clone())
            }
            None => Some(r.clone()),
        };
        out.push(run);
    }
    out
}

/// Copies the pieces of `chunks` that overlap `range` into one buffer (a single
/// chunk is sliced without copying).
fn assemble(range: Range<u64>, chunks: &[Chunk], pieces: &[Piece]) -> Result<Bytes, FetchError> {
    let len = usize::try_from(range.end - range.start)
        .map_err(|_| FetchError::Internal("read too large".into()))?;
    if len == 0 {
        return Ok(Bytes::new());
    }
    if let ([c], [Piece::Data(d)]) = (chunks, pieces) {
        let lo = (range.start - c.file_offset) as usize;
        let hi = (range.end - c.file_offset) as usize;
        return d
            .get(lo..hi)
            .map(|_| d.slice(lo..hi))
            .ok_or_else(|| FetchError::Internal("chunk shorter than declared".into()));
    }
    let mut out = BytesMut::zeroed(len);
    for (c, p) in chunks.iter().zip(pieces) {
        let Piece::Data(d) = p else { continue };
        let lo = range.start.max(c.file_offset);
        let hi = range.end.min(c.file_offset + c.len);
        if lo >= hi {
            continue;
        }
        let src = d
            .get((lo - c.file_offset) as usize..(hi - c.file_offset) as usize)
            .ok_or_else(|| FetchError::Internal("chunk shorter than declared".into()))?;
        let dst = out
            .get_mut((lo - range.start) as usize..(hi - range.start) as usize)
            .ok_or_else(|| FetchError::Internal("read buffer overrun".into()))?;
        dst.copy_from_slice(src);
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests;
