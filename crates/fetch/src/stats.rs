//! Fetch counters, for metrics, logs and benchmarks. Lock-free, updated with
//! relaxed atomics (they are statistics, not synchronisation).

use std::sync::atomic::{AtomicU64, Ordering};

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
        }
    }
}
