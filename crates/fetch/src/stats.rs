//! Fetch counters, for metrics, logs and benchmarks. Lock-free, updated with
//! relaxed atomics (they are statistics, not synchronisation).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::FetchErrorKind;

/// Live counters of one fetcher (one layer blob).
#[derive(Debug, Default)]
pub struct FetchStats {
    range_requests: AtomicU64,
    bytes_fetched: AtomicU64,
    blocking_misses: AtomicU64,
    chunks_verified: AtomicU64,
    verification_failures: AtomicU64,
    retries: AtomicU64,
    prefetch_bytes: AtomicU64,
    memory_hits: AtomicU64,
    disk_hits: AtomicU64,
    deduplicated_waits: AtomicU64,
    speculative_bytes: AtomicU64,
    speculative_used_bytes: AtomicU64,
    failures: [AtomicU64; FetchErrorKind::COUNT],
}

/// Failed fetches per [`FetchErrorKind`]: a fetch is one run of chunks (one
/// range request, and its re-fetches while chunks fail verification) that ended
/// in an error every waiting reader got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FailureCounts([u64; FetchErrorKind::COUNT]);

impl FailureCounts {
    /// Failed fetches of `kind`.
    pub fn get(&self, kind: FetchErrorKind) -> u64 {
        self.0.get(kind.index()).copied().unwrap_or(0)
    }

    /// Every kind with its count (zeros included), in [`FetchErrorKind::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (FetchErrorKind, u64)> + '_ {
        FetchErrorKind::ALL.iter().map(|&k| (k, self.get(k)))
    }

    /// Failed fetches of every kind.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

impl std::ops::Add for FailureCounts {
    type Output = FailureCounts;
    fn add(self, other: FailureCounts) -> FailureCounts {
        let mut out = self;
        for (a, b) in out.0.iter_mut().zip(other.0) {
            *a += b;
        }
        out
    }
}

/// A point-in-time copy of [`FetchStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FetchStatsSnapshot {
    /// HTTP range requests (or file range reads) issued, retries included.
    pub range_requests: u64,
    /// Compressed bytes received from the source.
    pub bytes_fetched: u64,
    /// Reads that had to wait for the source (a chunk was in no cache tier).
    pub blocking_misses: u64,
    /// Fetched chunks decompressed and checked against their digest (zero
    /// chunks, synthesized locally, are not counted).
    pub chunks_verified: u64,
    /// Chunks whose content did not match their digest (never served).
    pub verification_failures: u64,
    /// Range requests retried after a failure.
    pub retries: u64,
    /// Compressed bytes fetched by prefetch or background fetch.
    pub prefetch_bytes: u64,
    /// Chunk lookups answered by the memory cache on a read.
    pub memory_hits: u64,
    /// Chunk lookups answered by the disk cache on a read.
    pub disk_hits: u64,
    /// Chunk waits that joined a fetch already in flight instead of fetching.
    pub deduplicated_waits: u64,
    /// Compressed bytes fetched on a guess along with a miss (read-ahead in
    /// the file, neighbour files, directory batches), not for a waiting reader.
    pub speculative_bytes: u64,
    /// Of `speculative_bytes`, those a read has used since. The difference is
    /// the cost of guessing (or bytes not read yet).
    pub speculative_used_bytes: u64,
    /// Failed fetches per kind of failure.
    pub failures: FailureCounts,
}

macro_rules! counter {
    ($name:ident, $add:ident) => {
        #[doc = concat!("Adds `n` to `", stringify!($name), "`.")]
        pub fn $add(&self, n: u64) {
            self.$name.fetch_add(n, Ordering::Relaxed);
        }
    };
}

impl FetchStats {
    counter!(range_requests, add_range_requests);
    counter!(bytes_fetched, add_bytes_fetched);
    counter!(blocking_misses, add_blocking_misses);
    counter!(chunks_verified, add_chunks_verified);
    counter!(verification_failures, add_verification_failures);
    counter!(retries, add_retries);
    counter!(prefetch_bytes, add_prefetch_bytes);
    counter!(memory_hits, add_memory_hits);
    counter!(disk_hits, add_disk_hits);
    counter!(deduplicated_waits, add_deduplicated_waits);
    counter!(speculative_bytes, add_speculative_bytes);
    counter!(speculative_used_bytes, add_speculative_used_bytes);

    /// Counts one failed fetch of `kind`.
    pub fn add_failure(&self, kind: FetchErrorKind) {
        if let Some(c) = self.failures.get(kind.index()) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A consistent-enough copy of every counter.
    pub fn snapshot(&self) -> FetchStatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FetchStatsSnapshot {
            range_requests: g(&self.range_requests),
            bytes_fetched: g(&self.bytes_fetched),
            blocking_misses: g(&self.blocking_misses),
            chunks_verified: g(&self.chunks_verified),
            verification_failures: g(&self.verification_failures),
            retries: g(&self.retries),
            prefetch_bytes: g(&self.prefetch_bytes),
            memory_hits: g(&self.memory_hits),
            disk_hits: g(&self.disk_hits),
            deduplicated_waits: g(&self.deduplicated_waits),
            speculative_bytes: g(&self.speculative_bytes),
            speculative_used_bytes: g(&self.speculative_used_bytes),
            failures: FailureCounts(std::array::from_fn(|i| self.failures.get(i).map_or(0, g))),
        }
    }
}
