//! Chunk cache hot paths: a memory hit (the common FUSE read) and a disk hit (read +
//! sha256 verification, page cache warm), plus a disk write.
//!
//! `cargo bench --bench cache`

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use zest_cache::{CacheConfig, ChunkCache, DiskCache, MemoryCache};
use zest_oci::digest::Digest;

fn chunk(seed: u64, len: usize) -> (Digest, Bytes) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let data = Bytes::from(data);
    (Digest::of(&data), data)
}

fn memory(c: &mut Criterion) {
    let cache = MemoryCache::new(256 << 20);
    let chunks: Vec<_> = (0..4096).map(|i| chunk(i, 16 * 1024)).collect();
    for (d, data) in &chunks {
        cache.insert(*d, data.clone());
    }
    let keys: Vec<Digest> = chunks.iter().map(|c| c.0).collect();
    let mut i = 0;
    c.bench_function("memory_hit (4096 entries)", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            black_box(cache.get(&keys[i]))
        })
    });
    let (missing, _) = chunk(1 << 40, 16);
    c.bench_function("memory_miss", |b| b.iter(|| black_box(cache.get(&missing))));

    let dir = tempfile::tempdir().expect("tempdir");
    let facade = ChunkCache::open(&CacheConfig {
        disk_root: dir.path().to_path_buf(),
        disk_bytes: 64 << 20,
        ..CacheConfig::default()
    })
    .expect("open cache");
    for (d, data) in &chunks[..256] {
        facade.insert(*d, data.clone());
    }
    facade.flush();
    let mut j = 0;
    c.bench_function("chunk_cache_memory_hit", |b| {
        b.iter(|| {
            j = (j + 1) % 256;
            black_box(facade.get(&keys[j]))
        })
    });
}

fn disk(c: &mut Criterion) {
    const LEN: usize = 256 * 1024;
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = DiskCache::open(dir.path(), 1 << 30).expect("open disk cache");
    let chunks: Vec<_> = (0..64).map(|i| chunk(i, LEN)).collect();
    for (d, data) in &chunks {
        cache.insert(d, data).expect("insert");
    }
    let mut group = c.benchmark_group("disk");
    group.throughput(Throughput::Bytes(LEN as u64));
    let mut i = 0;
    group.bench_function("hit_256KiB (read + verify)", |b| {
        b.iter(|| {
            i = (i + 1) % chunks.len();
            black_box(cache.get(&chunks[i].0))
        })
    });
    let mut k = 0;
    group.bench_function("insert_256KiB (write + rename)", |b| {
        b.iter_batched(
            || {
                k = (k + 1) % chunks.len();
                cache.remove(&chunks[k].0);
                &chunks[k]
            },
            |(d, data)| black_box(cache.insert(d, data).expect("insert")),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = memory, disk
}
criterion_main!(benches);
