//! The memory tier: an LRU of decompressed chunks bounded in bytes.
//!
//! Invariants:
//! - `charged <= capacity` after every call returns; `charged` is the sum over entries
//!   of `len + ENTRY_OVERHEAD` (the overhead keeps a flood of tiny chunks bounded too).
//! - The mutex guards only pointer-sized work: a map lookup or a splice. Values are
//!   `Bytes`, so a hit clones a refcount; evicted values are dropped after the lock is
//!   released, because freeing a multi-MiB buffer can take an `munmap`.

use parking_lot::Mutex;

use bytes::Bytes;
use lru::LruCache;

use super::hash::DigestHashBuilder;
use zest_oci::digest::Digest;

/// What one entry costs beyond its bytes: the map slot, the list node, the `Bytes`
/// header and allocator rounding, roughly.
pub const ENTRY_OVERHEAD: u64 = 128;

/// A thread-safe LRU of chunks, bounded by the bytes it holds.
///
/// A value's cost is its `len()`, so a `Bytes` that is a slice of a larger buffer
/// keeps the whole buffer alive uncounted: insert owned buffers (see
/// [`ChunkCache`](super::ChunkCache)).
pub struct MemoryCache {
    capacity: u64,
    inner: Mutex<Inner>,
}

struct Inner {
    lru: LruCache<Digest, Bytes, DigestHashBuilder>,
    charged: u64,
    hits: u64,
    misses: u64,
    inserts: u64,
    evictions: u64,
    rejected: u64,
}

/// Counters and usage of a [`MemoryCache`] at one instant.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// `get` calls that found the chunk.
    pub hits: u64,
    /// `get` calls that did not.
    pub misses: u64,
    /// Chunks stored (a re-insert of a present chunk only refreshes it and is not counted).
    pub inserts: u64,
    /// Chunks dropped to make room.
    pub evictions: u64,
    /// Chunks not stored because they alone exceed the capacity.
    pub rejected: u64,
    /// Bytes charged for the entries held: data plus a fixed per-entry overhead.
    pub bytes: u64,
    /// Entries held.
    pub entries: u64,
    /// The byte bound.
    pub capacity_bytes: u64,
}

impl MemoryCache {
    /// An empty cache that holds at most `capacity_bytes` (0 disables it: nothing is stored).
    pub fn new(capacity_bytes: u64) -> Self {
        MemoryCache {
            capacity: capacity_bytes,
            inner: Mutex::new(Inner {
                lru: LruCache::unbounded_with_hasher(DigestHashBuilder::new()),
                charged: 0,
                hits: 0,
                misses: 0,
                inserts: 0,
                evictions: 0,
                rejected: 0,
            }),
        }
    }

    /// The chunk, if held; marks it most recently used. The clone is a refcount bump.
    pub fn get(&self, digest: &Digest) -> Option<Bytes> {
        let mut inner = self.inner.lock();
        let found = inner.lru.get(digest).cloned();
        if found.is_some() {
            inner.hits += 1;
        } else {
            inner.misses += 1;
        }
        found
    }

    /// Whether the chunk is held, without touching recency or counters.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.inner.lock().lru.contains(digest)
    }

    /// Stores a chunk as most recently used, evicting least recently used ones until the
    /// byte bound holds. A chunk larger than the whole capacity is not stored. Returns
    /// whether the chunk is held afterwards.
    ///
    /// The caller guarantees `data` hashes to `digest`; this tier does not re-hash.
    pub fn insert(&self, digest: Digest, data: Bytes) -> bool {
        let cost = data.len() as u64 + ENTRY_OVERHEAD;
        if cost > self.capacity {
            self.inner.lock().rejected += 1;
            return false;
        }
        // Values displaced or evicted here are dropped after the guard, outside the lock.
        let mut dropped: Vec<Bytes> = Vec::new();
        {
            let mut inner = self.inner.lock();
            if let Some(old) = inner.lru.put(digest, data) {
                // Same digest, so normally the same length; account exactly regardless.
                inner.charged -= old.len() as u64 + ENTRY_OVERHEAD;
                dropped.push(old);
            } else {
                inner.inserts += 1;
            }
            inner.charged += cost;
            while inner.charged > self.capacity {
                // The new entry is most recent and fits alone, so this stops before it.
                let Some((_, victim)) = inner.lru.pop_lru() else {
                    break;
                };
                inner.charged -= victim.len() as u64 + ENTRY_OVERHEAD;
                inner.evictions += 1;
                dropped.push(victim);
            }
        }
        drop(dropped);
        true
    }

    /// Removes a chunk; returns whether it was held.
    pub fn remove(&self, digest: &Digest) -> bool {
        let removed = {
            let mut inner = self.inner.lock();
            let removed = inner.lru.pop(digest);
            if let Some(v) = &removed {
                inner.charged -= v.len() as u64 + ENTRY_OVERHEAD;
            }
            removed
        };
        removed.is_some()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> MemoryStats {
        let inner = self.inner.lock();
        MemoryStats {
            hits: inner.hits,
            misses: inner.misses,
            inserts: inner.inserts,
            evictions: inner.evictions,
            rejected: inner.rejected,
            bytes: inner.charged,
            entries: inner.lru.len() as u64,
            capacity_bytes: self.capacity,
        }
    }
}

impl std::fmt::Debug for MemoryCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryCache")
            .field("stats", &self.stats())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(tag: u32, len: usize) -> (Digest, Bytes) {
        let mut v = vec![0u8; len];
        for (i, b) in v.iter_mut().enumerate() {
            *b = (i as u32).wrapping_mul(31).wrapping_add(tag) as u8;
        }
        v[..4].copy_from_slice(&tag.to_le_bytes());
        let data = Bytes::from(v);
        (Digest::of(&data), data)
    }

    #[test]
    fn evicts_least_recently_used_first_and_respects_byte_bound() {
        let per = 1000u64 + ENTRY_OVERHEAD;
        let cache = MemoryCache::new(3 * per);
        let (a, da) = chunk(1, 1000);
        let (b, db) = chunk(2, 1000);
        let (c, dc) = chunk(3, 1000);
        let (d, dd) = chunk(4, 1000);
        assert!(cache.insert(a, da.clone()));
        assert!(cache.insert(b, db));
        assert!(cache.insert(c, dc));
        // Touch `a` so `b` becomes the least recently used.
        assert_eq!(cache.get(&a).as_deref(), Some(&da[..]));
        assert!(cache.insert(d, dd));
        assert!(cache.contains(&a));
        assert!(
            !cache.contains(&b),
            "b was least recently used and must go first"
        );
        assert!(cache.contains(&c) && cache.contains(&d));
        let s = cache.stats();
        assert_eq!(s.entries, 3);
        assert_eq!(s.bytes, 3 * per);
        assert_eq!((s.hits, s.misses, s.evictions, s.inserts), (1, 0, 1, 4));
        assert!(cache.get(&b).is_none());
        assert_eq!(cache.stats().misses, 1);
    }

    #[test]
    fn byte_bound_holds_with_mixed_sizes() {
        let cap = 100_000u64;
        let cache = MemoryCache::new(cap);
        for i in 0..500u32 {
            let (d, data) = chunk(i, 100 + (i as usize * 7919) % 20_000);
            cache.insert(d, data);
            let s = cache.stats();
            assert!(s.bytes <= cap, "charged {} > capacity {cap}", s.bytes);
        }
        let s = cache.stats();
        assert!(s.evictions > 0);
        assert_eq!(s.inserts - s.evictions, s.entries);
    }

    #[test]
    fn oversized_chunk_is_not_stored_and_does_not_flush_the_cache() {
        let cache = MemoryCache::new(10_000);
        let (a, da) = chunk(1, 1000);
        cache.insert(a, da);
        let (big, dbig) = chunk(2, 10_000);
        assert!(!cache.insert(big, dbig));
        assert!(
            cache.contains(&a),
            "a rejected insert must not evict anything"
        );
        assert!(!cache.contains(&big));
        assert_eq!(cache.stats().rejected, 1);
    }

    #[test]
    fn reinsert_refreshes_without_double_counting() {
        let cache = MemoryCache::new(1_000_000);
        let (a, da) = chunk(1, 5000);
        cache.insert(a, da.clone());
        cache.insert(a, da);
        let s = cache.stats();
        assert_eq!((s.entries, s.inserts), (1, 1));
        assert_eq!(s.bytes, 5000 + ENTRY_OVERHEAD);
        assert!(cache.remove(&a));
        assert_eq!(cache.stats().bytes, 0);
    }

    #[test]
    fn zero_capacity_stores_nothing() {
        let cache = MemoryCache::new(0);
        let (a, da) = chunk(1, 10);
        assert!(!cache.insert(a, da));
        assert!(cache.get(&a).is_none());
    }
}
