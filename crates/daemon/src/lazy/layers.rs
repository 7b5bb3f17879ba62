//! The table of opened layers: one [`Fetcher`] (layer index, single-flight table,
//! counters) per layer digest, shared by every mount of that layer and refcounted by
//! [`LayerLease`]s.
//!
//! Invariants: a digest has at most one entry, opened at most once at a time (a
//! failed open leaves nothing behind, so the next attempt starts afresh); lease
//! counts change under the table lock; entries no lease holds are kept up to
//! `max_idle`, least recently used dropped first; fetch counters of dropped entries
//! are kept, so totals never go down.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::OnceCell;

use zest_fetch::{FetchStatsSnapshot, Fetcher};
use zest_oci::digest::Digest;
use zest_oci::{Descriptor, Repository};
use zest_store::RegistryBlob;

/// A layer opened for reading: its fetcher and what is needed to open it again.
pub(super) struct OpenedLayer {
    pub(super) fetcher: Arc<Fetcher>,
    /// The blob the fetcher reads (for when the registry last answered).
    pub(super) blob: Arc<RegistryBlob>,
    pub(super) repository: Repository,
    /// The descriptor as stored for restarts (zstd:chunked annotations only).
    pub(super) descriptor: Descriptor,
    pub(super) authenticated: bool,
    /// The compressed TOC as fetched, until it is written to the TOC directory.
    pub(super) toc: Mutex<Option<Bytes>>,
}

/// One layer digest's shared state.
pub(super) struct LayerEntry {
    pub(super) digest: Digest,
    pub(super) opened: OnceCell<Arc<OpenedLayer>>,
    /// Leases held (mounts, and opens in progress); changed under the table lock.
    users: AtomicUsize,
    idle_since: Mutex<Instant>,
    /// When the registry last answered a reachability check for this layer.
    pub(super) last_check: Mutex<Option<Instant>>,
}

/// Layer digest -> shared layer, refcounted by leases.
pub(super) struct LayerTable {
    entries: Mutex<HashMap<Digest, Arc<LayerEntry>>>,
    max_idle: usize,
    /// Fetch counters of layers dropped from the table, so totals never go down.
    retired: Mutex<FetchStatsSnapshot>,
}

/// A counted use of a [`LayerEntry`]; released on drop.
pub(super) struct LayerLease {
    table: Arc<LayerTable>,
    pub(super) entry: Arc<LayerEntry>,
}

impl LayerTable {
    /// An empty table keeping at most `max_idle` layers no lease holds.
    pub(super) fn new(max_idle: usize) -> Arc<Self> {
        Arc::new(LayerTable {
            entries: Mutex::new(HashMap::new()),
            max_idle,
            retired: Mutex::new(FetchStatsSnapshot::default()),
        })
    }

    /// A lease on the entry of `digest`, created (not opened) if absent.
    pub(super) fn hold(self: &Arc<Self>, digest: Digest) -> LayerLease {
        let mut entries = self.entries.lock();
        let entry = Arc::clone(entries.entry(digest).or_insert_with(|| {
            Arc::new(LayerEntry {
                digest,
                opened: OnceCell::new(),
                users: AtomicUsize::new(0),
                idle_since: Mutex::new(Instant::now()),
                last_check: Mutex::new(None),
            })
        }));
        entry.users.fetch_add(1, Ordering::Relaxed);
        LayerLease {
            table: Arc::clone(self),
            entry,
        }
    }

    /// The fetcher of layer `digest`, when its index is in memory.
    pub(super) fn fetcher(&self, digest: &Digest) -> Option<Arc<Fetcher>> {
        let entries = self.entries.lock();
        let opened = entries.get(digest)?.opened.get()?;
        Some(Arc::clone(&opened.fetcher))
    }

    /// Whether the layer's index is in memory already.
    pub(super) fn is_open(&self, digest: &Digest) -> bool {
        self.entries
            .lock()
            .get(digest)
            .is_some_and(|e| e.opened.initialized())
    }

    fn release(&self, entry: &Arc<LayerEntry>) {
        let mut entries = self.entries.lock();
        if entry.users.fetch_sub(1, Ordering::Relaxed) != 1 {
            return;
        }
        *entry.idle_since.lock() = Instant::now();
        let same = entries
            .get(&entry.digest)
            .is_some_and(|e| Arc::ptr_eq(e, entry));
        if !entry.opened.initialized() {
            // A failed open: forget it so that the next attempt starts afresh.
            if same {
                entries.remove(&entry.digest);
            }
            return;
        }
        self.evict_idle(&mut entries);
    }

    /// Drops the least recently used idle indexes beyond the bound.
    fn evict_idle(&self, entries: &mut HashMap<Digest, Arc<LayerEntry>>) {
        let mut idle: Vec<(Instant, Digest)> = entries
            .values()
            .filter(|e| e.users.load(Ordering::Relaxed) == 0 && e.opened.initialized())
            .map(|e| (*e.idle_since.lock(), e.digest))
            .collect();
        if idle.len() <= self.max_idle {
            return;
        }
        idle.sort();
        let excess = idle.len() - self.max_idle;
        for (_, digest) in idle.into_iter().take(excess) {
            if let Some(entry) = entries.remove(&digest) {
                if let Some(opened) = entry.opened.get() {
                    let mut retired = self.retired.lock();
                    *retired = add_stats(&retired, &opened.fetcher.stats());
                }
                tracing::debug!(layer = %digest, "dropping idle layer index");
            }
        }
    }

    /// (layers, idle layers, fetch counters of all layers ever held).
    pub(super) fn stats(&self) -> (usize, usize, FetchStatsSnapshot) {
        let entries = self.entries.lock();
        let mut total = *self.retired.lock();
        let (mut layers, mut idle) = (0, 0);
        for entry in entries.values() {
            if let Some(opened) = entry.opened.get() {
                layers += 1;
                if entry.users.load(Ordering::Relaxed) == 0 {
                    idle += 1;
                }
                total = add_stats(&total, &opened.fetcher.stats());
            }
        }
        (layers, idle, total)
    }
}

impl LayerLease {
    /// The opened layer, once its open succeeded.
    pub(super) fn opened(&self) -> Option<&Arc<OpenedLayer>> {
        self.entry.opened.get()
    }
}

impl Drop for LayerLease {
    fn drop(&mut self) {
        self.table.release(&self.entry);
    }
}

fn add_stats(a: &FetchStatsSnapshot, b: &FetchStatsSnapshot) -> FetchStatsSnapshot {
    FetchStatsSnapshot {
        range_requests: a.range_requests + b.range_requests,
        bytes_fetched: a.bytes_fetched + b.bytes_fetched,
        blocking_misses: a.blocking_misses + b.blocking_misses,
        chunks_verified: a.chunks_verified + b.chunks_verified,
        verification_failures: a.verification_failures + b.verification_failures,
        retries: a.retries + b.retries,
        prefetch_bytes: a.prefetch_bytes + b.prefetch_bytes,
        memory_hits: a.memory_hits + b.memory_hits,
        disk_hits: a.disk_hits + b.disk_hits,
        deduplicated_waits: a.deduplicated_waits + b.deduplicated_waits,
        speculative_bytes: a.speculative_bytes + b.speculative_bytes,
        speculative_used_bytes: a.speculative_used_bytes + b.speculative_used_bytes,
        failures: a.failures + b.failures,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::Duration;
    use zest_cache::ChunkCache;
    use zest_fetch::{FetchConfig, FetchLimits};
    use zest_format::testblob::build_one;

    /// An opened layer backed by a small blob file.
    fn opened(dir: &Path, seed: u8) -> Arc<OpenedLayer> {
        let data = vec![seed; 10_000];
        let blob = build_one("f", &data, 4096);
        let path = dir.join(format!("blob-{seed}"));
        std::fs::write(&path, &blob.bytes).unwrap_or_else(|e| panic!("{e}"));
        let source = zest_store::FileBlob::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let cache = ChunkCache::open(&zest_cache::CacheConfig {
            disk_bytes: 0,
            ..zest_cache::CacheConfig::default()
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let fetcher = Fetcher::new(
            Arc::new(blob.index()),
            Arc::new(source),
            Arc::new(cache),
            FetchLimits::default(),
            FetchConfig::default(),
            tokio::runtime::Handle::current(),
        );
        let repository = Repository {
            registry: "r".into(),
            name: "n".into(),
        };
        let descriptor = super::super::classify::tests::zstd_layer(&[]);
        let client = zest_registry::RegistryClient::new(zest_registry::RegistryConfig::default())
            .unwrap_or_else(|e| panic!("{e}"));
        Arc::new(OpenedLayer {
            fetcher,
            // Not the fetcher's source: these tests never check reachability.
            blob: Arc::new(RegistryBlob::for_layer(
                client,
                repository.clone(),
                &descriptor,
            )),
            repository,
            descriptor,
            authenticated: true,
            toc: Mutex::new(None),
        })
    }

    #[tokio::test]
    async fn layer_table_shares_counts_and_evicts() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let table = LayerTable::new(1);
        let (d1, d2, d3) = (Digest::of(b"1"), Digest::of(b"2"), Digest::of(b"3"));

        // A failed open leaves nothing behind; the next attempt starts afresh.
        let lease = table.hold(d1);
        let failed: Result<&Arc<OpenedLayer>, &str> = lease
            .entry
            .opened
            .get_or_try_init(|| async { Err("down") })
            .await;
        assert!(failed.is_err());
        drop(lease);
        assert!(table.entries.lock().is_empty());

        // Two leases of one digest share one entry, opened once.
        let first = table.hold(d1);
        let second = table.hold(d1);
        assert!(Arc::ptr_eq(&first.entry, &second.entry));
        let layer = opened(dir.path(), 1);
        first
            .entry
            .opened
            .get_or_init(|| async { Arc::clone(&layer) })
            .await;
        assert!(second.opened().is_some_and(|o| Arc::ptr_eq(o, &layer)));
        assert!(table.is_open(&d1));
        let file = layer.fetcher.index().resolve_path("f").ok_or("no file f")?;
        let data = layer.fetcher.read(file, 0, 100).await?;
        assert_eq!(data.len(), 100);
        drop(first);
        assert_eq!(table.stats().1, 0, "still used by the second lease");
        drop(second);
        assert_eq!(table.stats().0, 1);
        assert_eq!(table.stats().1, 1);

        // Idle entries beyond the bound go, least recently used first, and their
        // counters are kept.
        for (digest, seed) in [(d2, 2u8), (d3, 3u8)] {
            tokio::time::sleep(Duration::from_millis(2)).await;
            let lease = table.hold(digest);
            let layer = opened(dir.path(), seed);
            lease.entry.opened.get_or_init(|| async { layer }).await;
        }
        let (layers, idle, totals) = table.stats();
        assert_eq!((layers, idle), (1, 1));
        assert!(table.is_open(&d3));
        assert!(!table.is_open(&d1));
        assert!(totals.range_requests >= 1, "{totals:?}");
        Ok(())
    }
}
