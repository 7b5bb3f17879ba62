//! The chunk cache on a real file system: budgets checked against what is actually on
//! disk, restarts, corruption and crash leftovers, concurrency, and the directory lock.

mod support;

use std::fs;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use bytes::Bytes;
use zest_cache::{
    CacheConfig, CacheError, ChunkCache, DiskCache, DiskOptions, InsertOutcome, ENTRY_OVERHEAD,
};
use zest_oci::digest::Digest;

/// A chunk of pseudo-random bytes determined by `seed`.
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

/// Total length and count of the files under `dir`, recursively.
fn files_under(dir: &Path) -> (u64, u64) {
    let mut total = (0, 0);
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        if meta.is_dir() {
            let (b, n) = files_under(&entry.path());
            total.0 += b;
            total.1 += n;
        } else {
            total.0 += meta.len();
            total.1 += 1;
        }
    }
    total
}

/// Bytes and files a cache keeps on disk: chunks plus writes in progress.
fn on_disk(root: &Path) -> (u64, u64) {
    let (cb, cn) = files_under(&root.join("chunks"));
    let (tb, tn) = files_under(&root.join("tmp"));
    (cb + tb, cn + tn)
}

fn options(budget: u64) -> DiskOptions {
    DiskOptions {
        // Every hit re-stamps the mtime, so restart order is observable in a test.
        touch_interval: Some(Duration::ZERO),
        ..DiskOptions::new(budget)
    }
}

/// File timestamps come from a coarse clock; space events apart so their order shows.
fn tick() {
    std::thread::sleep(Duration::from_millis(25));
}

#[test]
fn disk_budget_holds_while_inserting_far_more_than_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let budget = 1 << 20;
    let cache = DiskCache::open(dir.path(), budget).unwrap();
    let mut inserted = Vec::new();
    let mut total_inserted = 0u64;
    for i in 0..300u64 {
        // 1 byte to 40 KiB, so block rounding and many evictions per insert both occur.
        let len = 1 + (i as usize * 7_919) % 40_000;
        let (d, data) = chunk(i, len);
        assert_eq!(cache.insert(&d, &data).unwrap(), InsertOutcome::Stored);
        total_inserted += len as u64;
        inserted.push((d, data));
        let (bytes, _) = on_disk(dir.path());
        assert!(
            bytes <= budget,
            "after insert {i}: {bytes} bytes on disk > budget {budget}"
        );
        assert!(cache.usage().bytes <= budget);
    }
    assert!(
        total_inserted > 5 * budget,
        "the test must overflow the budget several times"
    );

    let stats = cache.stats();
    let (bytes, files) = on_disk(dir.path());
    assert!(stats.evictions > 0);
    assert_eq!(stats.entries, files, "index and directory disagree");
    assert_eq!(stats.inserts - stats.evictions, stats.entries);
    assert!(
        bytes <= stats.bytes,
        "charged bytes must cover the real lengths"
    );
    // The newest chunks survive and read back verified; every survivor is intact.
    let (last_d, last_data) = inserted.last().unwrap();
    assert_eq!(cache.get(last_d).as_ref(), Some(last_data));
    let mut present = 0;
    for (d, data) in &inserted {
        if let Some(got) = cache.get(d) {
            assert_eq!(&got, data);
            present += 1;
        }
    }
    assert_eq!(present, stats.entries);
    assert_eq!(cache.stats().corruptions, 0);
}

#[test]
fn restart_reuses_entries_and_keeps_lru_order() {
    let dir = tempfile::tempdir().unwrap();
    let chunks: Vec<_> = (0..8).map(|i| chunk(i, 10_000)).collect();
    {
        let cache = DiskCache::open_with_options(dir.path(), options(1 << 20)).unwrap();
        for (d, data) in &chunks {
            cache.insert(d, data).unwrap();
            tick();
        }
        // Use 0 then 1: they become the most recent.
        for (d, data) in &chunks[..2] {
            assert_eq!(cache.get(d).as_ref(), Some(data));
            tick();
        }
    }
    let expected: Vec<Digest> = [2, 3, 4, 5, 6, 7, 0, 1]
        .iter()
        .map(|&i| chunks[i].0)
        .collect();
    {
        let cache = DiskCache::open_with_options(dir.path(), options(1 << 20)).unwrap();
        assert_eq!(cache.stats().entries, 8);
        assert_eq!(
            cache.digests_lru_first(),
            expected,
            "recency lost across restart"
        );
        for (d, data) in &chunks {
            assert_eq!(cache.get(d).as_ref(), Some(data));
            tick();
        }
    }
    // Reopening with room for 4 chunks (each charged 12 KiB) evicts the 4 least recent.
    // The gets above refreshed everything in order 0..8, so 4..8 are the newest now.
    let cache = DiskCache::open_with_options(dir.path(), options(4 * 12_288)).unwrap();
    let kept: Vec<Digest> = chunks[4..].iter().map(|c| c.0).collect();
    assert_eq!(cache.digests_lru_first(), kept);
    assert_eq!(cache.stats().evictions, 4);
    assert_eq!(on_disk(dir.path()).1, 4);
    for (d, _) in &chunks[..4] {
        assert!(!cache.chunk_path(d).exists());
    }
}

#[test]
fn corrupted_file_is_detected_removed_and_reported_as_a_miss() {
    let dir = tempfile::tempdir().unwrap();
    let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
    let (flipped, flipped_data) = chunk(1, 50_000);
    let (truncated, truncated_data) = chunk(2, 50_000);
    cache.insert(&flipped, &flipped_data).unwrap();
    cache.insert(&truncated, &truncated_data).unwrap();

    let path = cache.chunk_path(&flipped);
    let mut bytes = fs::read(&path).unwrap();
    bytes[12_345] ^= 0x01;
    fs::write(&path, &bytes).unwrap();
    let tpath = cache.chunk_path(&truncated);
    fs::write(&tpath, &truncated_data[..1000]).unwrap();

    assert!(
        cache.get(&flipped).is_none(),
        "a flipped bit must never be served"
    );
    assert!(
        cache.get(&truncated).is_none(),
        "a torn file must never be served"
    );
    assert!(
        !path.exists() && !tpath.exists(),
        "corrupt files must be deleted"
    );
    let s = cache.stats();
    assert_eq!((s.corruptions, s.entries, s.bytes, s.hits), (2, 0, 0, 0));
    // A good copy can be stored again afterwards.
    assert_eq!(
        cache.insert(&flipped, &flipped_data).unwrap(),
        InsertOutcome::Stored
    );
    assert_eq!(cache.get(&flipped).as_ref(), Some(&flipped_data));
}

#[test]
fn corruption_while_closed_is_caught_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (d, data) = chunk(3, 20_000);
    let path = {
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        cache.insert(&d, &data).unwrap();
        cache.chunk_path(&d)
    };
    let mut bytes = fs::read(&path).unwrap();
    bytes[0] ^= 0x80;
    fs::write(&path, &bytes).unwrap();
    let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(cache.stats().entries, 1);
    assert!(cache.get(&d).is_none());
    assert!(!path.exists());
    assert_eq!(cache.stats().corruptions, 1);
}

#[test]
fn crash_leftovers_are_cleaned_and_never_read() {
    let dir = tempfile::tempdir().unwrap();
    drop(DiskCache::open(dir.path(), 1 << 20).unwrap());
    // A write interrupted before its rename: complete content, but only in tmp/.
    let (pending, pending_data) = chunk(10, 30_000);
    let tmp = dir.path().join("tmp");
    fs::write(tmp.join(format!("{}.4242.0", pending.hex())), &pending_data).unwrap();
    fs::write(tmp.join("garbage.1.1"), b"half a chunk").unwrap();
    // A rename that reached the disk before the data did (no sync_writes): the chunk
    // path exists but holds zeroes.
    let (torn, torn_data) = chunk(11, 30_000);
    let hex = torn.hex();
    let torn_path = dir.path().join("chunks/sha256").join(&hex[..2]).join(&hex);
    fs::write(&torn_path, vec![0u8; torn_data.len()]).unwrap();

    let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(
        fs::read_dir(&tmp).unwrap().count(),
        0,
        "tmp/ must be emptied at open"
    );
    assert_eq!(cache.stats().temp_files_removed, 2);
    assert!(
        cache.get(&pending).is_none(),
        "an unpublished write must not be served"
    );
    assert!(
        cache.get(&torn).is_none(),
        "a torn chunk must not be served"
    );
    assert!(!torn_path.exists());
    let s = cache.stats();
    assert_eq!((s.corruptions, s.entries, s.hits), (1, 0, 0));
}

#[test]
fn concurrent_inserts_of_one_chunk_store_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
    let (d, data) = chunk(5, 200_000);
    let threads = 8;
    let barrier = Barrier::new(threads);
    let outcomes: Vec<InsertOutcome> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    cache.insert(&d, &data).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let stored = outcomes
        .iter()
        .filter(|o| **o == InsertOutcome::Stored)
        .count();
    assert_eq!(stored, 1, "outcomes: {outcomes:?}");
    assert!(outcomes.iter().all(|o| matches!(
        o,
        InsertOutcome::Stored | InsertOutcome::AlreadyPresent | InsertOutcome::Busy
    )));
    assert_eq!(cache.get(&d).as_ref(), Some(&data));
    assert_eq!(on_disk(dir.path()), (data.len() as u64, 1));
}

#[test]
fn concurrent_inserts_and_gets_of_many_chunks_stay_correct() {
    let dir = tempfile::tempdir().unwrap();
    // Room for about a third of the pool, so eviction races with reads and writes.
    let budget = 400 * 1024;
    let cache = DiskCache::open_with_options(dir.path(), options(budget)).unwrap();
    let pool: Vec<_> = (0..64)
        .map(|i| chunk(100 + i, 4_000 + (i as usize * 523) % 30_000))
        .collect();
    let threads = 8;
    let served = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        let mut workers = Vec::new();
        for t in 0..threads {
            let (cache, pool, served) = (&cache, &pool, &served);
            workers.push(s.spawn(move || {
                let mut x = 0x2545_F491_4F6C_DD1Du64 ^ t;
                for _ in 0..400 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Half the threads hammer 8 shared chunks, the rest the whole pool.
                    let i = if t % 2 == 0 { x % 8 } else { x % 64 } as usize;
                    let (d, data) = &pool[i];
                    if x & 0x100 == 0 {
                        cache.insert(d, data).unwrap();
                    } else if let Some(got) = cache.get(d) {
                        assert_eq!(&got, data, "wrong bytes served for chunk {i}");
                        served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    assert!(cache.usage().bytes <= budget);
                }
            }));
        }
        for w in workers {
            w.join().unwrap();
        }
    });
    assert!(
        served.into_inner() > 0,
        "no get ever hit: the test exercised nothing"
    );
    let s = cache.stats();
    let (bytes, files) = on_disk(dir.path());
    assert!(bytes <= budget);
    assert_eq!(s.entries, files, "index and directory disagree");
    assert_eq!((s.corruptions, s.io_errors), (0, 0));
    for (d, data) in &pool {
        if let Some(got) = cache.get(d) {
            assert_eq!(&got, data);
        }
    }
}

#[test]
fn the_directory_lock_prevents_a_second_open() {
    let dir = tempfile::tempdir().unwrap();
    let first = DiskCache::open(dir.path(), 1 << 20).unwrap();
    let err = DiskCache::open(dir.path(), 1 << 20).unwrap_err();
    match &err {
        CacheError::Locked { root, holder_pid } => {
            assert_eq!(root, dir.path());
            assert_eq!(*holder_pid, Some(std::process::id()));
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    assert!(
        msg.contains(&format!("process {}", std::process::id())),
        "{msg}"
    );
    let config = CacheConfig {
        disk_root: dir.path().to_path_buf(),
        ..CacheConfig::default()
    };
    assert!(matches!(
        ChunkCache::open(&config),
        Err(CacheError::Locked { .. })
    ));
    drop(first);
    DiskCache::open(dir.path(), 1 << 20).expect("the lock is released on drop");
}

fn config(root: &Path) -> CacheConfig {
    CacheConfig {
        memory_bytes: 1 << 20,
        disk_bytes: 4 << 20,
        disk_root: root.to_path_buf(),
        ..CacheConfig::default()
    }
}

#[test]
fn chunk_cache_writes_through_and_promotes_disk_hits_to_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (d, data) = chunk(20, 64 * 1024);
    {
        let cache = ChunkCache::open(&config(dir.path())).unwrap();
        cache.insert(d, data.clone());
        assert_eq!(cache.get(&d).as_ref(), Some(&data));
        cache.flush();
        assert!(cache.disk().unwrap().contains(&d));
        let s = cache.stats();
        assert_eq!(
            (s.memory.hits, s.writes.written, s.writes.pending_bytes),
            (1, 1, 0)
        );
    }
    // A restart: memory is empty, the disk serves and memory takes the chunk.
    let cache = ChunkCache::open(&config(dir.path())).unwrap();
    assert_eq!(cache.get(&d).as_ref(), Some(&data));
    assert!(cache.memory().contains(&d));
    assert_eq!(cache.get(&d).as_ref(), Some(&data));
    let s = cache.stats();
    let disk = s.disk.as_ref().unwrap();
    assert_eq!((s.memory.hits, s.memory.misses, disk.hits), (1, 1, 1));
    assert_eq!((s.hits(), s.misses()), (2, 0));
    let (other, _) = chunk(21, 10);
    assert!(cache.get(&other).is_none());
    assert_eq!(cache.stats().misses(), 1);
}

#[test]
fn a_full_write_queue_skips_the_disk_write_and_counts_it() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(&CacheConfig {
        write_queue_bytes: 1024,
        ..config(dir.path())
    })
    .unwrap();
    let (big, big_data) = chunk(30, 2048);
    let (small, small_data) = chunk(31, 512);
    cache.insert(big, big_data.clone());
    cache.insert(small, small_data);
    cache.flush();
    let s = cache.stats();
    assert_eq!((s.writes.dropped_full, s.writes.written), (1, 1));
    let disk = cache.disk().unwrap();
    assert!(!disk.contains(&big) && disk.contains(&small));
    assert_eq!(
        cache.get(&big).as_ref(),
        Some(&big_data),
        "memory still has it"
    );
}

#[test]
fn dropping_the_cache_finishes_queued_writes() {
    let dir = tempfile::tempdir().unwrap();
    let chunks: Vec<_> = (0..50).map(|i| chunk(40 + i, 20_000)).collect();
    {
        let cache = ChunkCache::open(&config(dir.path())).unwrap();
        for (d, data) in &chunks {
            cache.insert(*d, data.clone());
        }
    }
    let disk = DiskCache::open(dir.path(), 4 << 20).unwrap();
    for (d, data) in &chunks {
        assert_eq!(disk.get(d).as_ref(), Some(data));
    }
}

#[test]
fn memory_only_configuration_needs_no_directory() {
    let cache = ChunkCache::open(&CacheConfig {
        memory_bytes: 3 * (1000 + ENTRY_OVERHEAD),
        disk_bytes: 0,
        disk_root: "/nonexistent/never-created".into(),
        ..CacheConfig::default()
    })
    .unwrap();
    assert!(cache.disk().is_none());
    let chunks: Vec<_> = (0..4).map(|i| chunk(50 + i, 1000)).collect();
    for (d, data) in &chunks {
        cache.insert(*d, data.clone());
    }
    assert!(cache.get(&chunks[0].0).is_none());
    assert_eq!(cache.get(&chunks[3].0).as_ref(), Some(&chunks[3].1));
    let s = cache.stats();
    assert_eq!((s.memory.evictions, s.hits(), s.misses()), (1, 1, 1));
    assert!(!Path::new("/nonexistent/never-created").exists());
}

#[tokio::test]
async fn async_paths_read_and_write_on_the_blocking_pool() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(DiskCache::open(dir.path(), 1 << 20).unwrap());
    let (d, data) = chunk(60, 100_000);
    assert!(disk.get_async(d).await.is_none());
    assert_eq!(
        disk.insert_async(d, data.clone()).await.unwrap(),
        InsertOutcome::Stored
    );
    assert_eq!(disk.get_async(d).await.as_ref(), Some(&data));
    drop(disk);

    let cache = ChunkCache::open(&config(dir.path())).unwrap();
    assert_eq!(cache.get_async(&d).await.as_ref(), Some(&data));
    assert!(
        cache.memory().contains(&d),
        "a disk hit is promoted to memory"
    );
    assert_eq!(cache.get_async(&d).await.as_ref(), Some(&data));
    let s = cache.stats();
    assert_eq!((s.memory.hits, s.disk.unwrap().hits), (1, 1));
}

#[test]
fn chunk_cache_under_concurrent_use_serves_only_correct_bytes() {
    let dir = tempfile::tempdir().unwrap();
    // Memory for a handful of chunks, so most gets go to the disk tier.
    let cache = ChunkCache::open(&CacheConfig {
        memory_bytes: 100 * 1024,
        disk_bytes: 600 * 1024,
        disk_root: dir.path().to_path_buf(),
        ..CacheConfig::default()
    })
    .unwrap();
    let pool: Vec<_> = (0..48)
        .map(|i| chunk(200 + i, 20_000 + (i as usize * 977) % 20_000))
        .collect();
    std::thread::scope(|s| {
        for t in 0..6u64 {
            let (cache, pool) = (&cache, &pool);
            s.spawn(move || {
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (t << 32);
                for _ in 0..300 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let i = if t < 3 { x % 6 } else { x % 48 } as usize;
                    let (d, data) = &pool[i];
                    match cache.get(d) {
                        Some(got) => assert_eq!(&got, data, "wrong bytes for chunk {i}"),
                        // The read path fetches on a miss and inserts what it verified.
                        None => cache.insert(*d, data.clone()),
                    }
                }
            });
        }
    });
    cache.flush();
    // Disk writes are queued: under load the threads above may never have
    // read one back. Once flushed, every chunk the disk tier holds that memory
    // does not is a disk hit, and must be the right bytes too.
    for (i, (d, data)) in pool.iter().enumerate() {
        if let Some(got) = cache.get(d) {
            assert_eq!(&got, data, "wrong bytes for chunk {i} after flush");
        }
    }
    let s = cache.stats();
    let disk = s.disk.as_ref().unwrap();
    assert!(s.memory.bytes <= 100 * 1024 && disk.bytes <= 600 * 1024);
    assert!(
        s.memory.hits > 0 && disk.hits > 0,
        "both tiers must have served: {s:?}"
    );
    assert_eq!(
        (disk.corruptions, disk.io_errors, s.writes.failed),
        (0, 0, 0)
    );
    assert_eq!(disk.entries, on_disk(dir.path()).1);
    assert!(on_disk(dir.path()).0 <= 600 * 1024);
}

#[test]
fn the_lock_excludes_another_process() {
    use std::io::BufRead;
    if !support::require_tool("flock") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    drop(DiskCache::open(dir.path(), 1 << 20).unwrap());
    let lock_path = dir.path().join("lock");
    // A shell that takes the lock, says so, and becomes `sleep` (same pid, still
    // holding the descriptor), so killing our child releases the lock.
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"exec 9<>"$1" && flock -x 9 && echo locked && exec sleep 30"#)
        .arg("sh")
        .arg(&lock_path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let ready = rx.recv_timeout(Duration::from_secs(10));
    let result = DiskCache::open(dir.path(), 1 << 20);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(ready.unwrap().trim(), "locked");
    let err = result.unwrap_err();
    assert!(
        matches!(
            err,
            CacheError::Locked {
                holder_pid: None,
                ..
            }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("another process"), "{msg}");
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    // The holder is gone (reaped), so its lock is too.
    let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(
        fs::read_to_string(&lock_path).unwrap().trim(),
        std::process::id().to_string()
    );
    drop(cache);
}
