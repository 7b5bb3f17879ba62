//! Unit tests of the fetcher over in-memory blobs.

use std::collections::BTreeMap as HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;

use super::toc::{fetch_layer_index, TocFetchOptions};
use super::*;
use zest_cache::{CacheConfig, ChunkCache};
use zest_format::testblob::{build, build_one, TestBlob, TestFile};

/// A blob in memory that counts requests and can corrupt or delay answers.
#[derive(Debug, Default)]
struct MemBlob {
    bytes: Vec<u8>,
    requests: AtomicU64,
    corrupt: AtomicBool,
    /// Corrupt only the first this-many answers (then answer correctly).
    corrupt_first: AtomicU64,
    delay_ms: AtomicU64,
    /// Requests starting at or after this offset take `slow_ms` instead.
    slow_from: AtomicU64,
    slow_ms: AtomicU64,
    /// Transfer rate on top of the delay (0: instant), an emulated link.
    bytes_per_ms: AtomicU64,
    ranges: Mutex<Vec<Range<u64>>>,
}

impl MemBlob {
    fn new(bytes: Vec<u8>) -> Arc<MemBlob> {
        Arc::new(MemBlob {
            bytes,
            slow_from: AtomicU64::new(u64::MAX),
            ..Default::default()
        })
    }
}

impl BlobSource for MemBlob {
    fn read_range(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        Box::pin(async move {
            let n = self.requests.fetch_add(1, Ordering::SeqCst);
            self.ranges.lock().unwrap().push(range.clone());
            let delay = if range.start >= self.slow_from.load(Ordering::SeqCst) {
                self.slow_ms.load(Ordering::SeqCst)
            } else {
                self.delay_ms.load(Ordering::SeqCst)
            };
            let rate = self.bytes_per_ms.load(Ordering::SeqCst);
            let transfer = if rate > 0 {
                Duration::from_secs_f64((range.end - range.start) as f64 / rate as f64 / 1e3)
            } else {
                Duration::ZERO
            };
            if delay > 0 || !transfer.is_zero() {
                tokio::time::sleep(Duration::from_millis(delay) + transfer).await;
            }
            let mut v = self.bytes[range.start as usize..range.end as usize].to_vec();
            let corrupt = self.corrupt.load(Ordering::SeqCst)
                || n < self.corrupt_first.load(Ordering::SeqCst);
            if corrupt {
                // Flip one bit every 97 bytes: every chunk of the answer is hit.
                for b in v.iter_mut().step_by(97) {
                    *b ^= 0x01;
                }
            }
            Ok(Bytes::from(v))
        })
    }
    fn size(&self) -> Option<u64> {
        Some(self.bytes.len() as u64)
    }
    fn describe(&self) -> String {
        "memblob".into()
    }
}

fn memory_cache() -> Arc<ChunkCache> {
    Arc::new(
        ChunkCache::open(&CacheConfig {
            memory_bytes: 64 << 20,
            disk_bytes: 0,
            ..CacheConfig::default()
        })
        .unwrap(),
    )
}

/// Incompressible pseudo-random bytes (xorshift), so compressed sizes track
/// chunk sizes.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(seed);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn fast_config() -> FetchConfig {
    FetchConfig {
        retry_backoff: Duration::from_millis(1),
        ..FetchConfig::default()
    }
}

fn fetcher_for(files: &[TestFile<'_>], config: FetchConfig) -> (Arc<Fetcher>, Arc<MemBlob>) {
    fetcher_over(build(files, vec![]), config)
}

/// A fetcher over a blob holding only the file "a".
fn fetcher_for_a(data: &[u8], chunk: usize, config: FetchConfig) -> (Arc<Fetcher>, Arc<MemBlob>) {
    fetcher_over(build_one("a", data, chunk), config)
}

fn fetcher_over(blob: TestBlob, config: FetchConfig) -> (Arc<Fetcher>, Arc<MemBlob>) {
    let index = Arc::new(blob.index());
    let src = MemBlob::new(blob.bytes);
    let f = Fetcher::new(
        index,
        src.clone(),
        memory_cache(),
        FetchLimits::default(),
        config,
        tokio::runtime::Handle::current(),
    );
    (f, src)
}

fn id_of(f: &Fetcher, path: &str) -> EntryId {
    f.index().resolve_path(path).unwrap()
}

/// Waits until `done` holds, for at most 5 s (the caller asserts after).
async fn wait_until(mut done: impl FnMut() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A config that fetches exactly what is asked for: no holes between wanted
/// chunks, no read-ahead, no guesses.
fn exact_config() -> FetchConfig {
    FetchConfig {
        max_gap_bytes: 0,
        readahead_bytes: 0,
        speculative_neighbour_bytes: 0,
        speculative_dir_bytes: 0,
        ..FetchConfig::default()
    }
}

/// A library stack over the single layer of `f`, named by `name`.
fn single_layer_stack(
    shared: &Arc<crate::libraries::LibraryPrefetch>,
    name: &[u8],
    f: &Arc<Fetcher>,
) -> Arc<crate::libraries::LibraryStack> {
    crate::libraries::LibraryStack::new(
        Arc::clone(shared),
        vec![crate::libraries::StackLayer {
            digest: Digest::of(name),
            fetcher: Arc::downgrade(f),
        }],
    )
}

/// A stack of two layers, `upper` over `lower`.
fn two_layer_stack(
    shared: &Arc<crate::libraries::LibraryPrefetch>,
    upper: &Arc<Fetcher>,
    lower: &Arc<Fetcher>,
) -> Arc<crate::libraries::LibraryStack> {
    crate::libraries::LibraryStack::new(
        Arc::clone(shared),
        [(b"upper", upper), (b"lower", lower)]
            .into_iter()
            .map(|(name, f)| crate::libraries::StackLayer {
                digest: Digest::of(name),
                fetcher: Arc::downgrade(f),
            })
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_verified_bytes_and_merges_chunks() {
    let a = pattern(10_000, 1);
    let b = pattern(3_000, 2);
    let files = [
        TestFile {
            name: "a",
            data: &a,
            chunk: 1000,
        },
        TestFile {
            name: "b",
            data: &b,
            chunk: 1000,
        },
    ];
    let (f, src) = fetcher_for(&files, fast_config());
    let ida = id_of(&f, "a");
    // Not in memory yet.
    assert!(f.read_from_memory(ida, 0, 100).is_none());
    let got = f.read(ida, 1500, 5000).await.unwrap();
    assert_eq!(&got[..], &a[1500..6500]);
    // One merged request covered the read, the rest of `a` and `b` (read-ahead).
    assert_eq!(src.requests.load(Ordering::SeqCst), 1);
    // The read returns as soon as its own chunks are published; the rest of
    // the request's chunks are counted right after.
    let mut s = f.stats();
    for _ in 0..100 {
        if s.chunks_verified >= 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        s = f.stats();
    }
    assert_eq!(s.blocking_misses, 1);
    assert_eq!(s.range_requests, 1);
    assert!(s.chunks_verified >= 10, "{s:?}");
    // Read-ahead goes forward: the rest of `a` is in memory, its first chunk not.
    assert_eq!(
        &f.read_from_memory(ida, 1000, 9000).unwrap()[..],
        &a[1000..]
    );
    assert!(f.read_from_memory(ida, 0, 1000).is_none());
    let idb = id_of(&f, "b");
    assert_eq!(&f.read(idb, 0, 4096).await.unwrap()[..], &b[..]);
    assert_eq!(src.requests.load(Ordering::SeqCst), 1);
    // Reads past the end are clamped.
    assert_eq!(f.read(idb, 2990, 100).await.unwrap().len(), 10);
    assert_eq!(f.read(idb, 5000, 100).await.unwrap().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readahead_is_bounded_and_requests_are_capped() {
    let a = pattern(64 << 10, 3);
    let config = FetchConfig {
        readahead_bytes: 0,
        max_request_bytes: 8 << 10,
        ..fast_config()
    };
    let (f, src) = fetcher_for_a(&a, 4096, config);
    let id = id_of(&f, "a");
    let got = f.read(id, 0, 100).await.unwrap();
    assert_eq!(&got[..], &a[..100]);
    // No read-ahead: only the first chunk was fetched.
    assert_eq!(f.stats().chunks_verified, 1);
    // A larger read is split into capped requests.
    let got = f.read(id, 0, 64 << 10).await.unwrap();
    assert_eq!(&got[..], &a[..]);
    for r in src.ranges.lock().unwrap().iter() {
        // The pattern compresses poorly: each 4 KiB chunk is ~4 KiB compressed.
        assert!(r.end - r.start <= 8 << 10, "request {r:?} over the cap");
    }
    assert!(src.requests.load(Ordering::SeqCst) >= 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_readers_share_one_fetch() {
    let a = pattern(50_000, 4);
    let (f, src) = fetcher_for_a(&a, 5000, fast_config());
    src.delay_ms.store(50, Ordering::SeqCst);
    let id = id_of(&f, "a");
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let f = Arc::clone(&f);
        tasks.push(tokio::spawn(async move {
            let off = (i * 1543) % 45_000;
            (off, f.read(id, off, 4000).await)
        }));
    }
    for t in tasks {
        let (off, r) = t.await.unwrap();
        let off = off as usize;
        assert_eq!(&r.unwrap()[..], &a[off..off + 4000]);
    }
    // Every chunk fetched exactly once.
    let s = f.stats();
    assert_eq!(s.chunks_verified, 10, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_bytes_are_never_served() {
    let a = pattern(20_000, 5);
    let (f, src) = fetcher_for_a(&a, 4000, fast_config());
    src.corrupt.store(true, Ordering::SeqCst);
    let id = id_of(&f, "a");
    let err = f.read(id, 0, 1000).await.unwrap_err();
    assert!(matches!(err, FetchError::Verification { .. }), "{err}");
    let s = f.stats();
    assert!(s.verification_failures >= 4, "{s:?}");
    assert_eq!(s.range_requests, u64::from(f.config().attempts));
    // Nothing was cached.
    assert!(f.read_from_memory(id, 0, 1000).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_corruption_is_retried() {
    let a = pattern(20_000, 6);
    let (f, src) = fetcher_for_a(&a, 4000, fast_config());
    src.corrupt_first.store(1, Ordering::SeqCst);
    let id = id_of(&f, "a");
    let got = f.read(id, 0, 20_000).await.unwrap();
    assert_eq!(&got[..], &a[..]);
    assert!(f.stats().retries >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_chunks_are_synthesized() {
    let mut a = pattern(4096, 7);
    a.extend(vec![0u8; 8192]);
    a.extend(pattern(4096, 8));
    let config = FetchConfig {
        readahead_bytes: 0,
        ..fast_config()
    };
    let (f, src) = fetcher_for_a(&a, 4096, config);
    let id = id_of(&f, "a");
    assert!(f.index().entry(id).chunks().iter().any(|c| c.zeros));
    let got = f.read(id, 4096, 8192).await.unwrap();
    assert!(got.iter().all(|&b| b == 0));
    assert_eq!(got.len(), 8192);
    // Zero chunks cost no request.
    assert_eq!(src.requests.load(Ordering::SeqCst), 0);
    let got = f.read(id, 0, a.len() as u32).await.unwrap();
    assert_eq!(&got[..], &a[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_fetch_fills_the_cache() {
    let a = pattern(30_000, 9);
    let b = pattern(30_000, 10);
    let files = [
        TestFile {
            name: "a",
            data: &a,
            chunk: 3000,
        },
        TestFile {
            name: "b",
            data: &b,
            chunk: 3000,
        },
    ];
    let (f, src) = fetcher_for(&files, fast_config());
    let end = f.index().location().data_end();
    let fetched = f.fetch_background(0..end, None).await;
    assert!(fetched > 0);
    let reqs = src.requests.load(Ordering::SeqCst);
    assert_eq!(reqs, 1, "one large request for a small layer");
    assert_eq!(f.stats().prefetch_bytes, f.stats().bytes_fetched);
    let id = id_of(&f, "b");
    assert_eq!(&f.read_from_memory(id, 0, 30_000).unwrap()[..], &b[..]);
    // Nothing left to fetch.
    assert_eq!(f.fetch_background(0..end, None).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_files_fetches_listed_files_within_budget_and_merges_neighbours() {
    let data: Vec<Vec<u8>> = (0..4).map(|i| pattern(20_000, 20 + i)).collect();
    let names = ["a", "b", "c", "d"];
    let files: Vec<TestFile<'_>> = names
        .iter()
        .zip(&data)
        .map(|(name, d)| TestFile {
            name,
            data: d,
            chunk: 5000,
        })
        .collect();
    let config = FetchConfig {
        max_gap_bytes: 1000,
        ..fast_config()
    };
    let (f, src) = fetcher_for(&files, config);
    let (a, b, c, d) = (
        id_of(&f, "a"),
        id_of(&f, "b"),
        id_of(&f, "c"),
        id_of(&f, "d"),
    );
    let compressed = |id| -> u64 {
        f.index()
            .entry(id)
            .chunks()
            .iter()
            .map(|c| u64::from(c.compressed_len))
            .sum()
    };
    // A budget for "c" alone: "a" listed after it stays unfetched.
    let fetched = f.fetch_files(&[c, a], compressed(c)).await;
    assert_eq!(fetched, compressed(c));
    assert_eq!(&f.read_from_memory(c, 0, 20_000).unwrap()[..], &data[2][..]);
    assert!(f.read_from_memory(a, 0, 1).is_none());
    assert_eq!(f.stats().prefetch_bytes, f.stats().bytes_fetched);
    // "b" and "d" are not neighbours ("c" between them is cached): two
    // requests; "a" and "b" are, so "a" joins "b"'s request.
    let before = src.requests.load(Ordering::SeqCst);
    let fetched = f.fetch_files(&[a, b, d, c], u64::MAX).await;
    assert_eq!(fetched, compressed(a) + compressed(b) + compressed(d));
    assert_eq!(src.requests.load(Ordering::SeqCst) - before, 2);
    for (id, want) in [(a, &data[0]), (b, &data[1]), (d, &data[3])] {
        assert_eq!(&f.read_from_memory(id, 0, 20_000).unwrap()[..], &want[..]);
    }
    // Everything is cached: nothing more is fetched.
    assert_eq!(f.fetch_files(&[a, b, c, d], u64::MAX).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn toc_from_annotations_takes_one_request_and_footer_two_at_most() {
    let a = pattern(5000, 11);
    let blob = build_one("a", &a, 1000);
    let src = MemBlob::new(blob.bytes.clone());
    let size = blob.bytes.len() as u64;
    let loc = blob.location;
    let mut ann = HashMap::new();
    ann.insert(
        zest_format::annotations::OLD_MANIFEST_CHECKSUM.to_string(),
        Digest::of(&blob.bytes[loc.toc_range().start as usize..loc.toc_range().end as usize])
            .to_string(),
    );
    ann.insert(
        zest_format::annotations::OLD_MANIFEST_POSITION.to_string(),
        format!(
            "{}:{}:{}:1",
            loc.toc.offset, loc.toc.compressed_len, loc.toc.uncompressed_len
        ),
    );
    let got = fetch_layer_index(src.as_ref(), size, &ann, &TocFetchOptions::default())
        .await
        .unwrap();
    assert_eq!(got.requests, 1);
    assert!(got.authenticated);
    assert_eq!(got.index.len(), blob.index().len());

    // Footer path, small tail: footer then TOC.
    let opts = TocFetchOptions {
        tail_bytes: 64,
        ..TocFetchOptions::default()
    };
    let got = fetch_layer_index(src.as_ref(), size, &HashMap::new(), &opts)
        .await
        .unwrap();
    assert_eq!(got.requests, 2);
    assert!(!got.authenticated);
    // Generous tail: one request.
    let got = fetch_layer_index(
        src.as_ref(),
        size,
        &HashMap::new(),
        &TocFetchOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(got.requests, 1);
    // Required authentication without annotations fails clearly.
    let strict = TocFetchOptions {
        require_digest: true,
        ..TocFetchOptions::default()
    };
    assert!(
        fetch_layer_index(src.as_ref(), size, &HashMap::new(), &strict)
            .await
            .is_err()
    );
    // A wrong checksum annotation is refused.
    ann.insert(
        zest_format::annotations::OLD_MANIFEST_CHECKSUM.to_string(),
        Digest::of(b"other").to_string(),
    );
    assert!(
        fetch_layer_index(src.as_ref(), size, &ann, &TocFetchOptions::default())
            .await
            .is_err()
    );
    // Malformed annotations are refused, not bypassed through the footer.
    let mut malformed = HashMap::new();
    malformed.insert(
        zest_format::annotations::OLD_MANIFEST_POSITION.to_string(),
        "not:a:position".to_string(),
    );
    assert!(matches!(
        fetch_layer_index(src.as_ref(), size, &malformed, &TocFetchOptions::default()).await,
        Err(super::FetchError::Toc { .. })
    ));
}

#[test]
fn runs_split_at_gaps_and_size() {
    let e = |a: u64, b: u64| a..b;
    assert_eq!(
        split_runs(&[e(0, 10), e(10, 20), e(25, 30)], 5, 100),
        vec![0, 0, 0]
    );
    assert_eq!(
        split_runs(&[e(0, 10), e(10, 20), e(26, 30)], 5, 100),
        vec![0, 0, 1]
    );
    assert_eq!(
        split_runs(&[e(0, 60), e(60, 120), e(120, 130)], 5, 100),
        vec![0, 1, 1]
    );
    // An extent larger than the cap is a run of its own.
    assert_eq!(split_runs(&[e(0, 500), e(500, 510)], 5, 100), vec![0, 1]);
    assert!(split_runs(&[], 5, 100).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_demand_reads_overtake_background_fetch() {
    let files: Vec<Vec<u8>> = (0..24).map(|i| pattern(40_000, 20 + i as u8)).collect();
    let names: Vec<String> = (0..24).map(|i| format!("f{i:02}")).collect();
    let tf: Vec<TestFile<'_>> = files
        .iter()
        .zip(&names)
        .map(|(d, n)| TestFile {
            name: n,
            data: d,
            chunk: 10_000,
        })
        .collect();
    let config = FetchConfig {
        prefetch_request_bytes: 40_000,
        readahead_bytes: 0,
        ..fast_config()
    };
    let (f, src) = fetcher_for(&tf, config);
    src.delay_ms.store(20, Ordering::SeqCst);
    let end = f.index().location().data_end();
    let bg = {
        let f = Arc::clone(&f);
        tokio::spawn(async move { f.fetch_background(0..end, None).await })
    };
    tokio::time::sleep(Duration::from_millis(70)).await;
    let before = src.requests.load(Ordering::SeqCst) as usize;
    assert!(before < 20, "background fetch should still be running");
    let last = id_of(&f, "f23");
    let want = f.index().entry(last).chunks()[0].compressed_offset;
    // The read's request is slow (200 ms): an unpaused background fetch would
    // issue several requests meanwhile.
    src.slow_from.store(want, Ordering::SeqCst);
    src.slow_ms.store(200, Ordering::SeqCst);
    let got = f.read(last, 0, 40_000).await.unwrap();
    assert_eq!(&got[..], &files[23][..]);
    let after = src.requests.load(Ordering::SeqCst) as usize;
    src.slow_from.store(u64::MAX, Ordering::SeqCst);
    // The read's request went out at once (its own permit pool), and at most
    // the background request already past its pause point ran alongside.
    let ranges = src.ranges.lock().unwrap().clone();
    let pos = ranges
        .iter()
        .position(|r| r.start <= want && want < r.end)
        .unwrap();
    assert!(
        pos <= before + 1,
        "read request at position {pos}, {before} requests before it started"
    );
    assert!(
        after <= before + 2,
        "background fetch kept going while a read waited: {before} -> {after}"
    );
    bg.await.unwrap();
    // Background fetch completes and skips what the read fetched.
    for (i, d) in files.iter().enumerate() {
        let id = id_of(&f, &names[i]);
        assert_eq!(&f.read_from_memory(id, 0, 40_000).unwrap()[..], &d[..]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readahead_window_grows_for_sequential_misses_and_resets_on_jumps() {
    let a = pattern(1000, 30);
    let (f, _src) = fetcher_for_a(&a, 500, fast_config());
    let id = id_of(&f, "a");
    let base = f.config().readahead_bytes;
    let max = f.config().max_readahead_bytes;
    let window = |offset| {
        let w = f.readahead_window(id, offset);
        assert!(!w.backward, "{offset}: {w:?}");
        w.bytes
    };
    assert_eq!(window(0), base);
    assert_eq!(window(base), 2 * base);
    assert_eq!(window(3 * base), 4 * base);
    let mut off = 3 * base;
    for _ in 0..10 {
        off += 4 * base;
        assert!(window(off) <= max);
    }
    assert_eq!(window(off + base), max);
    // A jump backwards resets the window.
    assert_eq!(window(0), base);
    // Another file has its own window.
    let other = f.index().root();
    assert_eq!(f.readahead_window(other, 5 * base).bytes, base);
    // Misses moving backward, close together, read behind, growing too.
    let at = 100 * base;
    assert_eq!(window(at), base);
    let behind = f.readahead_window(id, at - base / 2);
    assert_eq!((behind.bytes, behind.backward), (2 * base, true));
    let behind = f.readahead_window(id, at - base);
    assert_eq!((behind.bytes, behind.backward), (4 * base, true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_moving_backward_reads_behind_in_a_request_of_its_own() {
    // 64 chunks of 4 KiB; read-ahead of 8 chunks.
    let chunk = 4096usize;
    let a = pattern(64 * chunk, 31);
    let config = FetchConfig {
        readahead_bytes: 8 * chunk as u64,
        max_readahead_bytes: 8 * chunk as u64,
        speculative_neighbour_bytes: 0,
        ..fast_config()
    };
    let (f, src) = fetcher_for_a(&a, chunk, config);
    let id = id_of(&f, "a");
    let at = |c: usize| (c * chunk) as u64;
    // A fault at chunk 40 reads ahead (41..=48), then one just before it
    // (chunk 38) starts a backward run: it reads behind, 30..=37.
    assert_eq!(
        &f.read(id, at(40), 100).await.unwrap()[..],
        &a[at(40) as usize..][..100]
    );
    let before = src.requests.load(Ordering::SeqCst);
    assert_eq!(
        &f.read(id, at(38), 100).await.unwrap()[..],
        &a[at(38) as usize..][..100]
    );
    // The read-behind is fetched (its own request, settled by now or soon),
    // and so is the first read's read-ahead (a task of its own too: on a busy
    // machine it may still be on its way).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while f.read_from_memory(id, at(30), 100).is_none()
        || f.read_from_memory(id, at(48), 100).is_none()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "read-behind never arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The read's chunk came in a request of its own: behind it, the
    // read-behind would have come first.
    let wanted = f.index().entry(id).chunks()[38].compressed_range();
    let ranges = src.ranges.lock().unwrap().clone();
    let new: Vec<_> = ranges[before as usize..].to_vec();
    assert!(new.len() >= 2, "{new:?}");
    let carrying: Vec<_> = new.iter().filter(|r| r.contains(&wanted.start)).collect();
    assert_eq!(carrying.len(), 1, "{new:?}");
    assert!(
        carrying[0].start >= wanted.start,
        "read waited behind: {new:?}"
    );
    // Nothing before the window, nothing twice.
    assert!(f.read_from_memory(id, at(29), 100).is_none());
    assert_eq!(f.stats().chunks_verified, 1 + 8 + 1 + 8);
    // Every byte served matches.
    let got = f.read(id, at(30), (10 * chunk) as u32).await.unwrap();
    assert_eq!(&got[..], &a[at(30) as usize..at(40) as usize]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_reclaims_chunks_of_an_abandoned_fetch() {
    let a = pattern(20_000, 40);
    let (f, src) = fetcher_for_a(&a, 5000, fast_config());
    src.delay_ms.store(300, Ordering::SeqCst);
    let end = f.index().location().data_end();
    // A background fetch claims everything, then is stopped mid-request.
    let bg = {
        let f = Arc::clone(&f);
        tokio::spawn(async move { f.fetch_background(0..end, None).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let reader = {
        let f = Arc::clone(&f);
        let id = id_of(&f, "a");
        tokio::spawn(async move { f.read(id, 0, 20_000).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    bg.abort();
    src.delay_ms.store(0, Ordering::SeqCst);
    let got = reader
        .await
        .unwrap()
        .expect("the reader fetches again instead of failing");
    assert_eq!(&got[..], &a[..]);
}

/// A blob whose reads always fail with a registry error of `status`.
#[derive(Debug)]
struct FailingBlob {
    status: u16,
    requests: AtomicU64,
    size: u64,
}

impl BlobSource for FailingBlob {
    fn read_range(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        Box::pin(async move {
            self.requests.fetch_add(1, Ordering::SeqCst);
            let source = match self.status {
                404 => zest_registry::RegistryError::NotFound {
                    host: "registry.test".into(),
                    repository: "app".into(),
                    what: "blob sha256:x".into(),
                    errors: Default::default(),
                },
                status => zest_registry::RegistryError::Status {
                    host: "registry.test".into(),
                    repository: "app".into(),
                    what: "range read of blob sha256:x".into(),
                    status,
                    errors: Default::default(),
                },
            };
            Err(SourceError::Registry {
                blob: "app@sha256:x".into(),
                range,
                source,
            })
        })
    }
    fn size(&self) -> Option<u64> {
        Some(self.size)
    }
    fn describe(&self) -> String {
        "app@sha256:x".into()
    }
    fn read_deadline(&self) -> Option<Duration> {
        Some(Duration::from_secs(1))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_failures_are_not_retried_and_keep_their_kind() {
    let a = pattern(20_000, 50);
    let blob = build_one("a", &a, 4000);
    for (status, kind) in [
        (503, FetchErrorKind::Source(ErrorKind::Server)),
        (429, FetchErrorKind::Source(ErrorKind::RateLimited)),
        (404, FetchErrorKind::Source(ErrorKind::NotFound)),
    ] {
        let src = Arc::new(FailingBlob {
            status,
            requests: AtomicU64::new(0),
            size: blob.bytes.len() as u64,
        });
        let f = Fetcher::new(
            Arc::new(blob.index()),
            src.clone(),
            memory_cache(),
            FetchLimits::default(),
            fast_config(),
            tokio::runtime::Handle::current(),
        );
        let id = id_of(&f, "a");
        let err = f.read(id, 0, 1000).await.unwrap_err();
        assert_eq!(err.kind(), kind, "{status}: {err}");
        // The source retried under its policy already: one request here.
        assert_eq!(src.requests.load(Ordering::SeqCst), 1, "{status}");
        let s = f.stats();
        assert_eq!(s.retries, 0, "{s:?}");
        assert_eq!(s.failures.get(kind), 1, "{s:?}");
        assert_eq!(s.failures.total(), 1, "{s:?}");
        assert!(err.to_string().contains(&format!("HTTP {status}")) || status == 404);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_chunks_count_one_digest_mismatch_failure() {
    let a = pattern(20_000, 51);
    let (f, src) = fetcher_for_a(&a, 4000, fast_config());
    src.corrupt.store(true, Ordering::SeqCst);
    let err = f.read(id_of(&f, "a"), 0, 1000).await.unwrap_err();
    assert_eq!(
        err.kind(),
        FetchErrorKind::Source(ErrorKind::DigestMismatch),
        "{err}"
    );
    let s = f.stats();
    assert_eq!(
        s.failures
            .get(FetchErrorKind::Source(ErrorKind::DigestMismatch)),
        1,
        "{s:?}"
    );
    assert_eq!(s.retries, u64::from(f.config().attempts) - 1, "{s:?}");
}

#[test]
fn kinds_index_their_counters_and_have_distinct_labels() {
    let mut labels = std::collections::BTreeSet::new();
    for (i, k) in FetchErrorKind::ALL.iter().enumerate() {
        assert_eq!(k.index(), i);
        assert!(labels.insert(k.label()), "duplicate label {}", k.label());
    }
    for k in zest_registry::ErrorKind::ALL {
        assert_eq!(FetchErrorKind::from(k).label(), k.label());
    }
    let stats = FetchStats::default();
    stats.add_failure(FetchErrorKind::Source(ErrorKind::Timeout));
    stats.add_failure(FetchErrorKind::Source(ErrorKind::Timeout));
    let snap = stats.snapshot();
    assert_eq!(
        snap.failures
            .get(FetchErrorKind::Source(ErrorKind::Timeout)),
        2
    );
    assert_eq!((snap.failures + snap.failures).total(), 4);
}

/// Waits (bounded) until the chunks fetched along with a read are counted.
async fn settle(f: &Fetcher, chunks: u64) -> FetchStatsSnapshot {
    let mut s = f.stats();
    for _ in 0..200 {
        if s.chunks_verified >= chunks {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        s = f.stats();
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_fetches_the_small_files_after_it_and_stops_at_a_large_one() {
    let data: Vec<Vec<u8>> = (0..6).map(|i| pattern(3_000, 10 + i)).collect();
    let big = pattern(40_000, 30);
    let files = [
        TestFile {
            name: "etc/a",
            data: &data[0],
            chunk: 4096,
        },
        TestFile {
            name: "etc/b",
            data: &data[1],
            chunk: 4096,
        },
        TestFile {
            name: "etc/c",
            data: &data[2],
            chunk: 4096,
        },
        TestFile {
            name: "etc/big",
            data: &big,
            chunk: 4096,
        },
        TestFile {
            name: "etc/d",
            data: &data[3],
            chunk: 4096,
        },
    ];
    let config = FetchConfig {
        speculative_file_bytes: 16 << 10,
        ..fast_config()
    };
    let (f, src) = fetcher_for(&files, config);
    let got = f.read(id_of(&f, "etc/a"), 0, 4096).await.unwrap();
    assert_eq!(&got[..], &data[0][..]);
    let s = settle(&f, 3).await;
    assert_eq!(s.range_requests, 1, "one request for a and its neighbours");
    assert_eq!(s.chunks_verified, 3, "a, b and c; not big, nor d after it");
    // b and c are the speculative part: ~3000 incompressible bytes each.
    assert!(
        (6_000..6_200).contains(&s.speculative_bytes),
        "{}",
        s.speculative_bytes
    );
    assert_eq!(s.speculative_used_bytes, 0);
    // The request covered a..c only.
    let r = src.ranges.lock().unwrap()[0].clone();
    let big_first = f.index().entry(id_of(&f, "etc/big")).chunks()[0].compressed_offset;
    assert!(r.end <= big_first, "{r:?} reaches into the large file");

    // Reading b and c costs nothing more and turns the guess into used bytes.
    assert_eq!(
        &f.read(id_of(&f, "etc/b"), 0, 4096).await.unwrap()[..],
        &data[1][..]
    );
    assert_eq!(
        &f.read_from_memory(id_of(&f, "etc/c"), 0, 4096).unwrap()[..],
        &data[2][..]
    );
    let s = f.stats();
    assert_eq!(s.range_requests, 1);
    assert_eq!(s.blocking_misses, 1);
    assert_eq!(s.speculative_used_bytes, s.speculative_bytes);
    // A second read of a used chunk is not counted twice.
    let _ = f.read(id_of(&f, "etc/b"), 0, 4096).await.unwrap();
    assert_eq!(f.stats().speculative_used_bytes, s.speculative_bytes);

    // d lies after the large file: a miss of its own.
    assert_eq!(
        &f.read(id_of(&f, "etc/d"), 0, 4096).await.unwrap()[..],
        &data[3][..]
    );
    assert_eq!(f.stats().range_requests, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_in_a_library_directory_fetches_its_small_files_within_budget() {
    // Library files interleaved in blob order with large unrelated files, so
    // only the directory rule can find them.
    let libs: Vec<Vec<u8>> = (0..8).map(|i| pattern(5_000, 40 + i)).collect();
    let fill: Vec<Vec<u8>> = (0..8).map(|i| pattern(30_000, 60 + i)).collect();
    let names: Vec<(String, String)> = (0..8)
        .map(|i| {
            (
                format!("usr/lib/x86_64-linux-gnu/lib{i}.so.1"),
                format!("usr/share/doc/f{i}"),
            )
        })
        .collect();
    let mut files = Vec::new();
    for (i, (lib, other)) in names.iter().enumerate() {
        files.push(TestFile {
            name: lib,
            data: &libs[i],
            chunk: 8192,
        });
        files.push(TestFile {
            name: other,
            data: &fill[i],
            chunk: 8192,
        });
    }
    let config = FetchConfig {
        readahead_bytes: 0,
        speculative_file_bytes: 16 << 10,
        // Room for four of the seven other libraries (~5000 bytes each).
        speculative_dir_bytes: 21_000,
        // Separate requests rather than one over the holes between libraries.
        max_gap_bytes: 1024,
        ..fast_config()
    };
    let (f, src) = fetcher_for(&files, config);
    let lib = |i: usize| id_of(&f, &names[i].0);
    let got = f.read(lib(3), 0, 8192).await.unwrap();
    assert_eq!(&got[..], &libs[3][..]);
    let s = settle(&f, 5).await;
    assert_eq!(s.chunks_verified, 5, "lib3 and four more libraries: {s:?}");
    assert!(s.speculative_bytes <= 21_000, "{s:?}");
    let fetched_before = s.range_requests;
    // The batched libraries are served without a request.
    let batched: Vec<usize> = (0..8)
        .filter(|&i| i != 3 && f.read_from_memory(lib(i), 0, 8192).is_some())
        .collect();
    assert_eq!(batched.len(), 4);
    assert_eq!(f.stats().range_requests, fetched_before);
    // A miss of a library the batch left out fetches the rest of the
    // directory (a second batch, with twice the budget).
    let left_out = (0..8).find(|i| *i != 3 && !batched.contains(i)).unwrap();
    let got = f.read(lib(left_out), 0, 8192).await.unwrap();
    assert_eq!(&got[..], &libs[left_out][..]);
    let s = settle(&f, 8).await;
    assert_eq!(s.chunks_verified, 8, "every library: {s:?}");
    assert!(s.speculative_bytes <= 21_000 * 3, "{s:?}");
    let requests = f.stats().range_requests;
    for (i, data) in libs.iter().enumerate() {
        assert_eq!(&f.read(lib(i), 0, 8192).await.unwrap()[..], &data[..]);
    }
    assert_eq!(f.stats().range_requests, requests);
    // Nothing outside the directory was guessed.
    for (_, other) in &names {
        let other = id_of(&f, other);
        assert!(f.read_from_memory(other, 0, 100).is_none());
    }
    for r in src.ranges.lock().unwrap().iter() {
        assert!(r.end - r.start < 30_000, "{r:?} covers a large file");
    }
    let s = f.stats();
    assert_eq!(s.speculative_used_bytes, s.speculative_bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speculation_can_be_turned_off_and_never_serves_corrupt_bytes() {
    let a = pattern(3_000, 1);
    let b = pattern(3_000, 2);
    let files = [
        TestFile {
            name: "lib/liba.so",
            data: &a,
            chunk: 4096,
        },
        TestFile {
            name: "lib/libb.so",
            data: &b,
            chunk: 4096,
        },
    ];
    let off = FetchConfig {
        speculative_neighbour_bytes: 0,
        speculative_dir_bytes: 0,
        ..fast_config()
    };
    let (f, _) = fetcher_for(&files, off);
    let _ = f.read(id_of(&f, "lib/liba.so"), 0, 4096).await.unwrap();
    let s = settle(&f, 1).await;
    assert_eq!((s.chunks_verified, s.speculative_bytes), (1, 0));
    assert!(f
        .read_from_memory(id_of(&f, "lib/libb.so"), 0, 10)
        .is_none());

    // Every answer corrupt: neither the wanted nor the guessed chunk is served
    // or cached.
    let (f, src) = fetcher_for(&files, fast_config());
    src.corrupt.store(true, Ordering::SeqCst);
    assert!(matches!(
        f.read(id_of(&f, "lib/liba.so"), 0, 4096).await,
        Err(FetchError::Verification { .. })
    ));
    for _ in 0..200 {
        if f.stats().failures.total() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(f
        .read_from_memory(id_of(&f, "lib/libb.so"), 0, 10)
        .is_none());
    assert_eq!(f.stats().speculative_bytes, 0);
    src.corrupt.store(false, Ordering::SeqCst);
    assert_eq!(
        &f.read(id_of(&f, "lib/libb.so"), 0, 4096).await.unwrap()[..],
        &b[..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_requests_follow_the_measured_bandwidth_delay_product() {
    let a = pattern(3 << 20, 21);
    let small = pattern(2000, 22);
    let files = [
        TestFile {
            name: "small",
            data: &small,
            chunk: 4096,
        },
        TestFile {
            name: "a",
            data: &a,
            chunk: 64 << 10,
        },
    ];
    let (f, src) = fetcher_for(&files, fast_config());
    // An emulated 10 ms, 10 MB/s link: the product is ~100 KB.
    src.delay_ms.store(10, Ordering::SeqCst);
    src.bytes_per_ms.store(10_000, Ordering::SeqCst);
    // A small read measures the round trip, a read with its 1 MiB read-ahead
    // the throughput.
    assert_eq!(
        &f.read(id_of(&f, "small"), 0, 4096).await.unwrap()[..],
        &small[..]
    );
    assert!(f.limits.estimate().is_none());
    let id = id_of(&f, "a");
    assert_eq!(&f.read(id, 0, 4096).await.unwrap()[..], &a[..4096]);
    // The read returns with its first chunk; the request is measured when its
    // last byte is in.
    let mut est = f.limits.estimate();
    for _ in 0..200 {
        if est.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        est = f.limits.estimate();
    }
    let est = est.expect("measured by the read");
    assert!(
        (50_000..200_000).contains(&est.bdp()),
        "BDP {} from {est:?}",
        est.bdp()
    );
    let first = src.ranges.lock().unwrap().len();
    // Unlimited background fetch: requests of about four products (at least
    // 512 KiB), not the 8 MiB a rate-limited one would use.
    let end = f.index().location().data_end();
    assert!(f.fetch_background(0..end, None).await > 0);
    let ranges = src.ranges.lock().unwrap().clone();
    assert!(ranges.len() > first + 2, "{ranges:?}");
    for r in &ranges[first..] {
        assert!(r.end - r.start <= (512 << 10) + (70 << 10), "{r:?}");
    }
    assert_eq!(&f.read_from_memory(id, 0, 3 << 20).unwrap()[..], &a[..]);

    // Rate-limited: full-size requests (the whole rest in one here).
    let (f, src) = fetcher_for_a(&a, 64 << 10, fast_config());
    let end = f.index().location().data_end();
    assert!(f.fetch_background(0..end, Some(1 << 40)).await > 0);
    assert_eq!(src.requests.load(Ordering::SeqCst), 1);
}

#[test]
fn prefetch_pipeline_covers_the_bandwidth_delay_product() {
    assert_eq!(pipeline_depth(None, 512 << 10), PREFETCH_PIPELINE);
    // 500 KB BDP, 512 KiB requests: one transferring, one waiting.
    assert_eq!(pipeline_depth(Some(500_000), 512 << 10), 2);
    // 4 MB BDP (wan-like, fast): more requests to fill the pipe, capped.
    assert_eq!(
        pipeline_depth(Some(4_000_000), 512 << 10),
        MAX_PREFETCH_PIPELINE
    );
    assert_eq!(pipeline_depth(Some(2_000_000), 1 << 20), 3);
    assert_eq!(pipeline_depth(Some(0), 0), PREFETCH_PIPELINE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_guesses_pause_speculation_to_bound_the_bytes_fetched() {
    // 40 library directories of 8 files; the workload reads one file of each,
    // so every directory batch is wasted.
    // Distinct contents (chunks are keyed by digest).
    let data: Vec<Vec<u8>> = (0..320).map(|i| pattern(10_000, i as u8)).collect();
    let data: Vec<Vec<u8>> = data
        .into_iter()
        .enumerate()
        .map(|(i, mut v)| {
            v[..8].copy_from_slice(&(i as u64).to_le_bytes());
            v
        })
        .collect();
    let names: Vec<String> = (0..40)
        .flat_map(|d| (0..8).map(move |i| format!("usr/lib/d{d:02}/lib{i}.so")))
        .collect();
    let files: Vec<TestFile<'_>> = names
        .iter()
        .enumerate()
        .map(|(n, name)| TestFile {
            name,
            data: &data[n],
            chunk: 16 << 10,
        })
        .collect();
    let config = FetchConfig {
        speculative_neighbour_bytes: 0,
        max_gap_bytes: 0,
        ..fast_config()
    };
    let (f, _) = fetcher_for(&files, config);
    for d in 0..40 {
        let id = id_of(&f, &format!("usr/lib/d{d:02}/lib0.so"));
        assert_eq!(
            &f.read(id, 0, 16 << 10).await.unwrap()[..],
            &data[d * 8][..]
        );
        // Let this miss's batch land before the next miss decides.
        settle(&f, f.stats().chunks_verified.max(1)).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = f.stats();
    let demand = s.bytes_fetched - s.speculative_bytes;
    assert_eq!(s.speculative_used_bytes, 0, "{s:?}");
    // Without the bound: 40 batches of ~70 KB = 2.8 MB of guesses.
    assert!(
        s.speculative_bytes <= (1 << 20) + 80_000,
        "guessed {} bytes for {demand} read: {s:?}",
        s.speculative_bytes
    );
    assert!(s.bytes_fetched <= 2 * demand + (1 << 20) + 80_000, "{s:?}");
    // The last directory was not batched.
    let other = id_of(&f, "usr/lib/d39/lib1.so");
    assert!(f.read_from_memory(other, 0, 100).is_none());
}

/// How [`StreamingBlob`] answers `read_range_with`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stream {
    /// The answer's bytes up to `at` (blob offset), then nothing until the gate
    /// opens, then the rest.
    StallAt(u64),
    /// Half the answer, then the whole answer again from its start, as a source
    /// retrying after a broken connection does.
    Restart,
    /// The answer with the bytes from `at` to `at + 100` left out.
    GapAt(u64),
    /// The answer's bytes up to `at`, then a server error.
    FailAt(u64),
}

/// A blob handing answers over in 1 KiB pieces, in the ways of [`Stream`].
#[derive(Debug)]
struct StreamingBlob {
    bytes: Vec<u8>,
    mode: Stream,
    gate: tokio::sync::Notify,
    requests: AtomicU64,
}

impl StreamingBlob {
    fn deliver(&self, from: u64, to: u64, on_data: &(dyn Fn(u64, Bytes) + Send + Sync)) {
        let mut pos = from;
        while pos < to {
            let end = (pos + 1024).min(to);
            on_data(
                pos,
                Bytes::copy_from_slice(&self.bytes[pos as usize..end as usize]),
            );
            pos = end;
        }
    }
}

impl BlobSource for StreamingBlob {
    fn read_range(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        Box::pin(async move {
            Ok(Bytes::copy_from_slice(
                &self.bytes[range.start as usize..range.end as usize],
            ))
        })
    }
    fn read_range_with<'a>(
        &'a self,
        range: Range<u64>,
        on_data: &'a (dyn Fn(u64, Bytes) + Send + Sync),
    ) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            self.requests.fetch_add(1, Ordering::SeqCst);
            let (start, end) = (range.start, range.end);
            match self.mode {
                Stream::StallAt(at) => {
                    let at = at.clamp(start, end);
                    self.deliver(start, at, on_data);
                    self.gate.notified().await;
                    self.deliver(at, end, on_data);
                }
                Stream::Restart => {
                    self.deliver(start, start + (end - start) / 2, on_data);
                    self.deliver(start, end, on_data);
                }
                Stream::GapAt(at) => {
                    let at = at.clamp(start, end);
                    self.deliver(start, at, on_data);
                    self.deliver((at + 100).min(end), end, on_data);
                }
                Stream::FailAt(at) => {
                    self.deliver(start, at.clamp(start, end), on_data);
                    return Err(SourceError::Registry {
                        blob: self.describe(),
                        range,
                        source: zest_registry::RegistryError::Status {
                            host: "registry.test".into(),
                            repository: "app".into(),
                            what: "range read of blob sha256:x".into(),
                            status: 503,
                            errors: Default::default(),
                        },
                    });
                }
            }
            Ok(())
        })
    }
    fn size(&self) -> Option<u64> {
        Some(self.bytes.len() as u64)
    }
    fn describe(&self) -> String {
        "streamingblob".into()
    }
}

/// A fetcher over file "a" (16 chunks of 16 KiB) read through a [`StreamingBlob`]
/// with read-ahead covering the whole file, so one request fetches every chunk.
fn streaming_fetcher(mode: Stream, data: &[u8]) -> (Arc<Fetcher>, Arc<StreamingBlob>, TestBlob) {
    let blob = build_one("a", data, 16 << 10);
    let src = Arc::new(StreamingBlob {
        bytes: blob.bytes.clone(),
        mode,
        gate: tokio::sync::Notify::new(),
        requests: AtomicU64::new(0),
    });
    let config = FetchConfig {
        readahead_bytes: 1 << 20,
        speculative_neighbour_bytes: 0,
        speculative_dir_bytes: 0,
        ..fast_config()
    };
    let f = Fetcher::new(
        Arc::new(blob.index()),
        src.clone(),
        memory_cache(),
        FetchLimits::default(),
        config,
        tokio::runtime::Handle::current(),
    );
    (f, src, blob)
}

/// Where the `n`th chunk of file "a" ends in the blob.
fn chunk_end(f: &Fetcher, n: usize) -> u64 {
    let id = id_of(f, "a");
    f.index().entry(id).chunks()[n].compressed_range().end
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_is_answered_when_its_chunks_arrive_not_when_the_request_ends() {
    let a = pattern(256 << 10, 60);
    let (probe, _, _) = streaming_fetcher(Stream::Restart, &a);
    let stall = chunk_end(&probe, 1);
    let (f, src, _) = streaming_fetcher(Stream::StallAt(stall), &a);
    let id = id_of(&f, "a");
    // The first chunk's bytes are in, the rest of the request is held back:
    // the read of the first chunk completes anyway.
    let first = tokio::time::timeout(Duration::from_secs(10), f.read(id, 0, 1000))
        .await
        .expect("the read waited for the whole request")
        .unwrap();
    assert_eq!(&first[..], &a[..1000]);
    assert_eq!(src.requests.load(Ordering::SeqCst), 1);
    // A read further on waits for its bytes, then gets them from the same request.
    let later = {
        let f = f.clone();
        tokio::spawn(async move { f.read(id, 200 << 10, 4096).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!later.is_finished(), "served bytes that had not arrived");
    src.gate.notify_one();
    let later = tokio::time::timeout(Duration::from_secs(10), later)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(&later[..], &a[200 << 10..(200 << 10) + 4096]);
    assert_eq!(src.requests.load(Ordering::SeqCst), 1);
    let all = f.read(id, 0, a.len() as u32).await.unwrap();
    assert_eq!(&all[..], &a[..]);
    assert_eq!(src.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_restarts_its_answer_gives_the_right_bytes() {
    let a = pattern(256 << 10, 61);
    let (f, src, _) = streaming_fetcher(Stream::Restart, &a);
    let id = id_of(&f, "a");
    let got = f.read(id, 0, a.len() as u32).await.unwrap();
    assert_eq!(&got[..], &a[..]);
    assert_eq!(src.requests.load(Ordering::SeqCst), 1);
    assert_eq!(f.stats().failures.total(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_with_a_hole_or_an_error_serves_only_what_arrived_whole() {
    let a = pattern(256 << 10, 62);
    let (probe, _, _) = streaming_fetcher(Stream::Restart, &a);
    let cut = chunk_end(&probe, 3) + 10;
    for mode in [Stream::GapAt(cut), Stream::FailAt(cut)] {
        let (f, _, _) = streaming_fetcher(mode, &a);
        let id = id_of(&f, "a");
        // One request for the whole file; chunks 0..=3 arrive whole and are
        // served, the rest never does.
        let first = tokio::time::timeout(Duration::from_secs(10), f.read(id, 0, 100))
            .await
            .expect("a read hung on a broken answer")
            .unwrap();
        assert_eq!(&first[..], &a[..100], "{mode:?}");
        // Chunk 5 fails with an error, neither hanging nor returning wrong bytes.
        let late = tokio::time::timeout(Duration::from_secs(10), f.read(id, 5 * (16 << 10), 100))
            .await
            .expect("a read hung on a broken answer");
        assert!(late.is_err(), "{mode:?}: {late:?}");
        let early = f.read_from_memory(id, 0, 4 * (16 << 10));
        assert_eq!(early.as_deref(), Some(&a[..4 * (16 << 10)]), "{mode:?}");
        assert!(
            f.read_from_memory(id, 4 * (16 << 10), 100).is_none(),
            "{mode:?}"
        );
    }
}

/// A shared object this test process has mapped whose file name starts with
/// `prefix` (the host's C library, found without assuming a path).
fn mapped_library(prefix: &str) -> Option<std::path::PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(std::path::PathBuf::from)
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        })
}

/// A real dynamically linked program (this test binary), the C library it
/// maps, its interpreter path and the host's multiarch triplet.
struct HostProgram {
    prog: Vec<u8>,
    libc: Vec<u8>,
    interp: String,
    triplet: &'static str,
}

fn host_program() -> HostProgram {
    use zest_format::elf::{multiarch_triplet, string_at, ElfFile};
    let prog = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    let libc_path = mapped_library("libc.so").expect("the test process maps a C library");
    let libc = std::fs::read(&libc_path).unwrap();
    let elf = ElfFile::parse(&prog[..ElfFile::headers_end(&prog).unwrap() as usize]).unwrap();
    let interp = elf
        .interp
        .clone()
        .expect("a dynamically linked test binary");
    let interp = String::from_utf8(
        string_at(&prog[interp.start as usize..interp.end as usize], 0)
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    let triplet = multiarch_triplet(elf.machine, elf.is_64).expect("a Linux host");
    HostProgram {
        prog,
        libc,
        interp,
        triplet,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_read_from_its_start_fetches_its_libraries_from_the_layers_below() {
    use crate::libraries::LibraryPrefetch;
    use zest_format::elf::ElfFile;

    let HostProgram {
        prog,
        libc,
        interp,
        triplet,
    } = host_program();
    let libc_name = format!("usr/lib/{triplet}/libc.so.6");
    let loader_name = format!("usr/lib/{triplet}/ld-real.so");
    let decoy_name = format!("usr/lib/{triplet}/libunused.so.1");
    let (loader, decoy) = (pattern(10_000, 3), pattern(300_000, 4));
    // The lower layer: the C library (reached through the `lib` -> `usr/lib`
    // directory link), the loader behind the program's interpreter path (a
    // link into another directory), and a library nobody needs.
    let lower = build(
        &[
            TestFile {
                name: &libc_name,
                data: &libc,
                chunk: 64 << 10,
            },
            TestFile {
                name: &loader_name,
                data: &loader,
                chunk: 4096,
            },
            TestFile {
                name: &decoy_name,
                data: &decoy,
                chunk: 64 << 10,
            },
        ],
        vec![
            serde_json::json!({"type": "symlink", "name": "lib", "linkName": "usr/lib", "mode": 0o777}),
            serde_json::json!({"type": "symlink", "name": interp.trim_start_matches('/'),
                "linkName": format!("/{loader_name}"), "mode": 0o777}),
        ],
    );
    let (lower, _) = fetcher_over(lower, FetchConfig::default());
    let (upper, _) = fetcher_for(
        &[TestFile {
            name: "usr/bin/prog",
            data: &prog,
            chunk: 64 << 10,
        }],
        FetchConfig::default(),
    );
    let shared = LibraryPrefetch::new(64 << 20);
    let stack = two_layer_stack(&shared, &upper, &lower);
    let prog_id = id_of(&upper, "usr/bin/prog");
    let head = upper.read(prog_id, 0, 4096).await.unwrap();
    stack.file_start(prog_id, &head);

    let (libc_id, loader_id, decoy_id) = (
        id_of(&lower, &libc_name),
        id_of(&lower, &loader_name),
        id_of(&lower, &decoy_name),
    );
    let libc_elf = ElfFile::parse(&libc[..ElfFile::headers_end(&libc).unwrap() as usize]).unwrap();
    let data = libc_elf
        .segments
        .iter()
        .find(|s| s.writable)
        .unwrap()
        .file
        .start;
    let fetched = |id, at: u64| lower.read_from_memory(id, at, 64);
    for _ in 0..500 {
        if fetched(libc_id, 0).is_some()
            && fetched(libc_id, data).is_some()
            && fetched(loader_id, 0).is_some()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        fetched(libc_id, 0).unwrap(),
        &libc[..64],
        "the C library's header"
    );
    assert_eq!(
        fetched(libc_id, data).unwrap(),
        &libc[data as usize..data as usize + 64],
        "its writable segment, relocated at load"
    );
    assert_eq!(
        fetched(loader_id, 0).unwrap(),
        &loader[..64],
        "the interpreter"
    );
    assert!(
        fetched(decoy_id, 0).is_none(),
        "a library nobody needs stays remote"
    );
    assert_eq!(
        lower.stats().blocking_misses,
        0,
        "prefetch is not a blocking miss"
    );
    let s = shared.stats();
    assert!(s.elf_files >= 2 && s.libraries >= 2 && s.bytes > 0, "{s:?}");

    // Shown the same program again, nothing is examined twice.
    stack.file_start(prog_id, &head);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(shared.stats().elf_files, s.elf_files);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_programs_libraries_are_examined_before_its_dynamic_section_arrives() {
    use crate::libraries::LibraryPrefetch;
    use zest_format::elf::ElfFile;

    let HostProgram {
        prog,
        libc,
        triplet,
        ..
    } = host_program();
    let libc_name = format!("usr/lib/{triplet}/libc.so.6");
    let (lower, _) = fetcher_for(
        &[TestFile {
            name: &libc_name,
            data: &libc,
            chunk: 64 << 10,
        }],
        FetchConfig::default(),
    );
    let (upper, upper_src) = fetcher_for(
        &[TestFile {
            name: "usr/bin/prog",
            data: &prog,
            chunk: 16 << 10,
        }],
        FetchConfig::default(),
    );
    // Everything of the program from its dynamic section on takes seconds.
    let elf = ElfFile::parse(&prog[..ElfFile::headers_end(&prog).unwrap() as usize]).unwrap();
    let dynamic = elf
        .dynamic
        .clone()
        .expect("a dynamically linked test binary");
    let prog_id = id_of(&upper, "usr/bin/prog");
    let slow_from = upper.index().chunk_range_for(prog_id, dynamic.start, 1)[0]
        .compressed_range()
        .start;
    assert!(slow_from > 0);
    upper_src.slow_from.store(slow_from, Ordering::SeqCst);
    upper_src.slow_ms.store(3000, Ordering::SeqCst);
    let shared = LibraryPrefetch::new(64 << 20);
    let stack = two_layer_stack(&shared, &upper, &lower);
    let head = upper.read(prog_id, 0, 4096).await.unwrap();
    // The start of the program (its read-ahead) is in.
    wait_until(|| upper.has_cached(prog_id, 0, 128 << 10)).await;
    assert!(upper.has_cached(prog_id, 0, 128 << 10));
    let started = std::time::Instant::now();
    stack.file_start(prog_id, &head);
    let libc_id = id_of(&lower, &libc_name);
    wait_until(|| lower.has_cached(libc_id, 0, 64)).await;
    assert!(
        lower.has_cached(libc_id, 0, 64) && started.elapsed() < Duration::from_secs(2),
        "the C library examined from the program's string table, not after its \
         dynamic section ({:?})",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_prefetch_stays_within_its_budget() {
    use crate::libraries::LibraryPrefetch;
    let prog = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    let (f, src) = fetcher_for(
        &[TestFile {
            name: "usr/bin/prog",
            data: &prog,
            chunk: 64 << 10,
        }],
        FetchConfig::default(),
    );
    let stack = single_layer_stack(&LibraryPrefetch::new(1), b"l", &f);
    let id = id_of(&f, "usr/bin/prog");
    let head = f.read(id, 0, 4096).await.unwrap();
    let before = src.requests.load(Ordering::SeqCst);
    stack.file_start(id, &head);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        src.requests.load(Ordering::SeqCst),
        before,
        "a 1-byte budget fetches nothing"
    );
    // Non-ELF heads are ignored outright.
    stack.file_start(id, b"#!/bin/sh\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_command_is_prefetched_through_its_script_before_it_runs() {
    use crate::libraries::{LibraryPrefetch, StartCommand};

    let HostProgram {
        prog,
        libc,
        interp,
        triplet,
    } = host_program();
    let libc_name = format!("usr/lib/{triplet}/libc.so.6");
    let loader = pattern(10_000, 3);
    let group = b"root:x:0:\n".to_vec();
    let other = pattern(5_000, 9);
    let lower = build(
        &[
            TestFile {
                name: &libc_name,
                data: &libc,
                chunk: 64 << 10,
            },
            TestFile {
                name: "etc/group",
                data: &group,
                chunk: 4096,
            },
            TestFile {
                name: "usr/lib/ld-real.so",
                data: &loader,
                chunk: 4096,
            },
        ],
        vec![
            serde_json::json!({"type": "symlink", "name": interp.trim_start_matches('/'),
            "linkName": "/usr/lib/ld-real.so", "mode": 0o777}),
        ],
    );
    let (lower, _) = fetcher_over(lower, FetchConfig::default());
    // The command is a script whose `#!` line runs the program through env.
    let script = b"#!/usr/bin/env -S LANG=C prog --flag\nexec prog\n".to_vec();
    let (upper, _) = fetcher_for(
        &[
            TestFile {
                name: "app/start.sh",
                data: &script,
                chunk: 4096,
            },
            TestFile {
                name: "usr/bin/prog",
                data: &prog,
                chunk: 64 << 10,
            },
            TestFile {
                name: "usr/bin/other",
                data: &other,
                chunk: 4096,
            },
        ],
        FetchConfig::default(),
    );
    let shared = LibraryPrefetch::new(64 << 20);
    let stack = two_layer_stack(&shared, &upper, &lower);
    stack.prefetch_start(StartCommand {
        argv: vec!["./start.sh".into(), "serve".into()],
        path: "/nowhere:/usr/bin".into(),
        working_dir: "/app".into(),
        env: Vec::new(),
    });
    let (libc_id, group_id, loader_id) = (
        id_of(&lower, &libc_name),
        id_of(&lower, "etc/group"),
        id_of(&lower, "usr/lib/ld-real.so"),
    );
    let prog_id = id_of(&upper, "usr/bin/prog");
    let ready = || {
        lower.read_from_memory(libc_id, 0, 64).is_some()
            && lower.read_from_memory(loader_id, 0, 64).is_some()
            && lower.read_from_memory(group_id, 0, 10).is_some()
            && upper.read_from_memory(prog_id, 0, 64).is_some()
    };
    for _ in 0..500 {
        if ready() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        lower.read_from_memory(group_id, 0, 10).unwrap(),
        &group[..],
        "a file every start reads"
    );
    assert_eq!(
        upper.read_from_memory(prog_id, 0, 64).unwrap(),
        &prog[..64],
        "the program the script runs"
    );
    assert_eq!(lower.read_from_memory(libc_id, 0, 64).unwrap(), &libc[..64]);
    assert_eq!(
        lower.read_from_memory(loader_id, 0, 64).unwrap(),
        &loader[..64]
    );
    let other_id = id_of(&upper, "usr/bin/other");
    assert!(
        upper.read_from_memory(other_id, 0, 64).is_none(),
        "another program stays remote"
    );
    assert_eq!(
        upper.stats().blocking_misses + lower.stats().blocking_misses,
        0
    );

    // A command the image does not have fetches nothing more.
    let before = shared.stats();
    stack.prefetch_start(StartCommand {
        argv: vec!["missing".into()],
        path: "/usr/bin".into(),
        working_dir: "/".into(),
        env: Vec::new(),
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(shared.stats().elf_files, before.elf_files);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn programs_a_start_script_runs_from_a_computed_directory_are_found_by_name() {
    use crate::libraries::{LibraryPrefetch, StartCommand};
    use zest_format::testblob::build_with_modes;

    let HostProgram { prog, libc, .. } = host_program();
    let elf = |i: u8| elf_copy(&libc, i);
    let script = b"#!/bin/sh\nbin=$(ls -d /opt/db/*/bin)\n\
        $as_user \"$bin/initdb\" -D \"$data\"\nexec $as_user \"${bin}/server\" -D x\n"
        .to_vec();
    let files: Vec<(String, Vec<u8>)> = vec![
        ("app/start.sh".into(), script),
        ("bin/sh".into(), prog),
        ("opt/db/15/bin/initdb".into(), elf(1)),
        ("opt/db/15/bin/server".into(), elf(2)),
        ("opt/db/15/bin/other".into(), elf(3)),
        // Not a program: no execute permission.
        ("opt/db/15/share/server".into(), elf(4)),
    ];
    let blob = build_with_modes(&test_files(&files), vec![], |name| {
        if name.contains("bin/") || name.ends_with(".sh") {
            0o755
        } else {
            0o644
        }
    });
    let (f, _) = fetcher_over(blob, exact_config());
    let shared = LibraryPrefetch::new(64 << 20);
    let stack = single_layer_stack(&shared, b"db", &f);
    stack.prefetch_start(StartCommand {
        argv: vec!["/app/start.sh".into()],
        path: "/bin".into(),
        working_dir: "/".into(),
        env: Vec::new(),
    });
    let cached = |path: &str| f.has_cached(id_of(&f, path), 0, 1);
    for path in ["opt/db/15/bin/initdb", "opt/db/15/bin/server"] {
        wait_until(|| cached(path)).await;
        assert!(cached(path), "{path} fetched");
    }
    for path in ["opt/db/15/bin/other", "opt/db/15/share/server"] {
        assert!(!cached(path), "{path} not fetched");
    }
}

#[test]
fn profile_pieces_group_blob_neighbours_and_go_in_read_order() {
    // Chunks of 100 compressed bytes, back to back from offset 0, except the
    // fourth, 10 000 bytes further on.
    let chunk = |offset: u64| zest_format::Chunk {
        compressed_offset: offset,
        file_offset: 0,
        len: 1000,
        compressed_len: 100,
        zeros: false,
        gzip: false,
        digest: Digest::of(&offset.to_le_bytes()),
    };
    let all: Vec<_> = [0, 100, 200, 10_300, 400, 500]
        .into_iter()
        .map(chunk)
        .collect();
    // Read order: the far chunk first, then the last in the blob, ...
    let wanted = [3, 5, 0, 2, 1, 4];
    // Pieces of up to 300 bytes, holes up to 100: [0, 1, 2] and [4, 5] sit
    // together, [3] alone. [3] is read first; [4, 5] serves the second read,
    // [0, 1, 2] the third. Each piece is in blob order.
    assert_eq!(
        schedule_pieces(&wanted, &all, 100, 300),
        vec![vec![3], vec![4, 5], vec![0, 1, 2]]
    );
    // Smaller pieces split a run; each part goes by its own earliest read.
    assert_eq!(
        schedule_pieces(&wanted, &all, 100, 200),
        vec![vec![3], vec![4, 5], vec![0, 1], vec![2]]
    );
    // Larger pieces take the hole between the two runs.
    assert_eq!(
        schedule_pieces(&wanted, &all, 100, 1 << 20),
        vec![vec![3], vec![0, 1, 2, 4, 5]]
    );
    // No hole allowed: chunks must touch.
    assert_eq!(
        schedule_pieces(&wanted, &all, 0, 1 << 20),
        vec![vec![3], vec![4, 5], vec![0, 1, 2]]
    );
    // Indexes outside the layer are ignored.
    assert_eq!(schedule_pieces(&[9, 3], &all, 0, 1 << 20), vec![vec![3]]);
}

/// A CPython 3.11 code object as `marshal` writes it: its code imports
/// `imports` by name (`IMPORT_NAME`) and uses `attributes` (names that are
/// not imported); `nested` (another code object) is among its constants.
fn code_object(
    function: bool,
    imports: &[&str],
    attributes: &[&str],
    nested: Option<Vec<u8>>,
) -> Vec<u8> {
    const IMPORT_NAME: u8 = 108;
    const LOAD_ATTR: u8 = 106;
    let mut v = vec![b'c'];
    // argcount, posonlyargcount, kwonlyargcount, stacksize, flags.
    v.extend([0u8; 16]);
    v.extend(if function { 3u32 } else { 0 }.to_le_bytes());
    let code: Vec<u8> = (0..imports.len())
        .map(|i| [IMPORT_NAME, i as u8])
        .chain((0..attributes.len()).map(|i| [LOAD_ATTR, (imports.len() + i) as u8]))
        .flatten()
        .collect();
    v.push(b's');
    v.extend((code.len() as u32).to_le_bytes());
    v.extend(code);
    v.extend([b')', 1 + u8::from(nested.is_some()), b'N']);
    v.extend(nested.unwrap_or_default());
    v.extend([b')', (imports.len() + attributes.len()) as u8]);
    for name in imports.iter().chain(attributes) {
        v.extend([b'Z' | 0x80, name.len() as u8]);
        v.extend(name.as_bytes());
    }
    // localsplusnames, localspluskinds, filename, name, qualname, first
    // line, linetable, exceptiontable.
    v.extend([
        b')', 0, b')', 0, b')', 0, b')', 0, b')', 0, 1, 0, 0, 0, b'N', b'N',
    ]);
    v
}

/// A compiled Python 3.11 module importing `imports` at module level, and
/// using `attributes` that are not imports.
fn pyc(imports: &[&str], attributes: &[&str]) -> Vec<u8> {
    pyc_with_function(imports, attributes, &[])
}

/// [`pyc`] with a function importing `function_imports` when called.
fn pyc_with_function(imports: &[&str], attributes: &[&str], function_imports: &[&str]) -> Vec<u8> {
    let function = code_object(true, function_imports, &[], None);
    let mut v = vec![0xa7, 0x0d, 0x0d, 0x0a];
    v.extend([0u8; 12]);
    v.extend(code_object(false, imports, attributes, Some(function)));
    v.extend(pattern(2000, imports.len() as u8));
    v
}

/// Test files from (name, contents) pairs, each made distinct (the chunk
/// cache is content-addressed).
fn distinct_files(files: Vec<(String, Vec<u8>)>) -> Vec<(String, Vec<u8>)> {
    files
        .into_iter()
        .enumerate()
        .map(|(i, (name, mut data))| {
            data.extend(format!("# {i}").as_bytes());
            (name, data)
        })
        .collect()
}

fn test_files(files: &[(String, Vec<u8>)]) -> Vec<TestFile<'_>> {
    files
        .iter()
        .map(|(name, data)| TestFile {
            name,
            data,
            chunk: 64 << 10,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_imports_are_fetched_ahead_of_the_interpreter() {
    use crate::libraries::LibraryPrefetch;

    let lib = "usr/lib/python3.11";
    let script = b"import pkg\nfrom json import decoder\n".to_vec();
    // Every file's content differs (the chunk cache is content-addressed).
    let files: Vec<(String, Vec<u8>)> = [
        ("app/main.py", script),
        ("os.py", b"import sys\n".to_vec()),
        ("pkg/__init__.py", b"from . import helper\n".to_vec()),
        (
            "pkg/__pycache__/__init__.cpython-311.pyc",
            pyc(&["helper"], &["print"]),
        ),
        ("pkg/helper.py", b"import deep\n".to_vec()),
        (
            "pkg/__pycache__/helper.cpython-311.pyc",
            pyc(&["deep"], &[]),
        ),
        ("unrelated.py", b"x = 1\n".to_vec()),
        ("__pycache__/unrelated.cpython-311.pyc", pyc(&[], &[])),
        ("deep.py", b"y = 2\n".to_vec()),
        ("__pycache__/deep.cpython-311.pyc", pyc(&["z"], &[])),
        ("json/__init__.py", b"\n".to_vec()),
        ("json/__pycache__/__init__.cpython-311.pyc", pyc(&[], &[])),
        ("json/decoder.py", b"\n\n".to_vec()),
        ("json/__pycache__/decoder.cpython-311.pyc", pyc(&[], &[])),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (name, mut data))| {
        data.extend(format!("# {i}").as_bytes());
        let name = if name.starts_with("app/") {
            name.to_owned()
        } else {
            format!("{lib}/{name}")
        };
        (name, data)
    })
    .collect();
    let test_files: Vec<TestFile<'_>> = files
        .iter()
        .map(|(name, data)| TestFile {
            name,
            data,
            chunk: 64 << 10,
        })
        .collect();
    // No holes fetched between wanted files: what is fetched was asked for.
    let config = exact_config();
    let shared = LibraryPrefetch::new(64 << 20);
    let stack_over = |f: &Arc<Fetcher>| single_layer_stack(&shared, b"python", f);
    let cached = |f: &Fetcher, path: &str| f.read_from_memory(id_of(f, path), 0, 1).is_some();

    let (f, _) = fetcher_for(&test_files, config.clone());
    let stack = stack_over(&f);
    let main = id_of(&f, "app/main.py");
    let head = f.read(main, 0, 4096).await.unwrap();
    stack.file_start(main, &head);
    let deep = format!("{lib}/__pycache__/deep.cpython-311.pyc");
    wait_until(|| cached(&f, &deep)).await;
    // Three levels: the script's imports, the package's relative import,
    // and that module's own; compiled files, not sources.
    for path in [
        format!("{lib}/pkg/__pycache__/__init__.cpython-311.pyc"),
        format!("{lib}/pkg/__pycache__/helper.cpython-311.pyc"),
        deep,
        format!("{lib}/json/__pycache__/__init__.cpython-311.pyc"),
        format!("{lib}/json/__pycache__/decoder.cpython-311.pyc"),
    ] {
        assert!(cached(&f, &path), "{path} fetched");
    }
    for path in [
        format!("{lib}/pkg/__init__.py"),
        format!("{lib}/pkg/helper.py"),
        format!("{lib}/__pycache__/unrelated.cpython-311.pyc"),
        format!("{lib}/json/decoder.py"),
    ] {
        assert!(!cached(&f, &path), "{path} not fetched");
    }
    assert_eq!(shared.stats().python_modules, 5);

    // A layer a start-up profile guides: no guessing.
    let (f, _) = fetcher_for(&test_files, config);
    f.set_profile_guided();
    let stack = stack_over(&f);
    let main = id_of(&f, "app/main.py");
    let head = f.read(main, 0, 4096).await.unwrap();
    stack.file_start(main, &head);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!cached(
        &f,
        &format!("{lib}/pkg/__pycache__/__init__.cpython-311.pyc")
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compiled_module_has_what_its_code_imports_fetched_not_its_attributes() {
    use crate::libraries::LibraryPrefetch;

    let lib = "usr/lib/python3.11";
    let compiled = |name: &str| format!("{lib}/__pycache__/{name}.cpython-311.pyc");
    // `top` imports `a` at module level and `c` in a function, and uses an
    // attribute named `b`; `a` imports `a2`, `c` imports `c2`.
    // Each with its source beside it, as the interpreter wants.
    let mut files = vec![(format!("{lib}/os.py"), b"import sys\n".to_vec())];
    for (name, module) in [
        ("top", pyc_with_function(&["a"], &["b"], &["c"])),
        ("a", pyc(&["a2"], &[])),
        ("a2", pyc(&[], &[])),
        ("b", pyc(&[], &[])),
        ("c", pyc(&["c2"], &[])),
        ("c2", pyc(&[], &[])),
    ] {
        files.push((format!("{lib}/{name}.py"), name.as_bytes().to_vec()));
        files.push((compiled(name), module));
    }
    let files = distinct_files(files);
    let cached = |f: &Fetcher, path: &str| f.has_cached(id_of(f, path), 0, 1);
    let shared = LibraryPrefetch::new(64 << 20);
    let (f, _) = fetcher_for(&test_files(&files), exact_config());
    let stack = single_layer_stack(&shared, b"python", &f);
    let top = id_of(&f, &compiled("top"));
    let head = f.read(top, 0, 4096).await.unwrap();
    stack.file_start(top, &head);
    wait_until(|| cached(&f, &compiled("a2")) && cached(&f, &compiled("c"))).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The module's import and what it imports; the function's import
    // fetched, not scanned; the attribute not at all.
    assert!(cached(&f, &compiled("a2")), "a2 fetched");
    assert!(cached(&f, &compiled("c")), "c fetched");
    assert!(!cached(&f, &compiled("c2")), "c2 left to c's own read");
    assert!(!cached(&f, &compiled("b")), "an attribute is not an import");
    // When the function runs and `c` is read, its own imports follow.
    let c = id_of(&f, &compiled("c"));
    let head = f.read(c, 0, 4096).await.unwrap();
    stack.file_start(c, &head);
    wait_until(|| cached(&f, &compiled("c2"))).await;
    assert!(cached(&f, &compiled("c2")), "c2 fetched once c is read");

    // A start script's functions are its program: `main()` runs, and what
    // its imports import is fetched too.
    let mut files = files;
    files.push((
        "app/main.py".to_string(),
        b"def main():\n    import c\n\n\nmain()\n".to_vec(),
    ));
    let (f, _) = fetcher_for(&test_files(&files), exact_config());
    let stack = single_layer_stack(&shared, b"python script", &f);
    let main = id_of(&f, "app/main.py");
    let head = f.read(main, 0, 4096).await.unwrap();
    stack.file_start(main, &head);
    wait_until(|| cached(&f, &compiled("c2"))).await;
    assert!(
        cached(&f, &compiled("c2")),
        "c2 fetched from the script's main()"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_module_is_scanned_as_it_arrives_not_with_the_slowest_of_its_level() {
    use crate::libraries::LibraryPrefetch;

    let lib = "usr/lib/python3.11";
    // The script imports `first` and `slow`; `first` imports `second`, which
    // imports `third`. `slow` lies last in the blob, and its request takes
    // seconds.
    let files = distinct_files(
        [
            (
                "app/main.py".to_string(),
                b"import first\nimport slow\n".to_vec(),
            ),
            (format!("{lib}/os.py"), b"import sys\n".to_vec()),
            (format!("{lib}/first.py"), b"import second\n".to_vec()),
            (format!("{lib}/second.py"), b"import third\n".to_vec()),
            (format!("{lib}/third.py"), b"x = 3\n".to_vec()),
            (format!("{lib}/slow.py"), b"y = 4\n".to_vec()),
        ]
        .into(),
    );
    let (f, src) = fetcher_for(&test_files(&files), exact_config());
    let slow = id_of(&f, &format!("{lib}/slow.py"));
    let slow_at = f.index().entry(slow).chunks()[0].compressed_range().start;
    src.slow_from.store(slow_at, Ordering::SeqCst);
    src.slow_ms.store(3000, Ordering::SeqCst);
    let shared = LibraryPrefetch::new(64 << 20);
    let stack = single_layer_stack(&shared, b"python", &f);
    let main = id_of(&f, "app/main.py");
    let head = f.read(main, 0, 4096).await.unwrap();
    stack.file_start(main, &head);
    let third = id_of(&f, &format!("{lib}/third.py"));
    wait_until(|| f.has_cached(third, 0, 1)).await;
    // Two levels below `first` arrived while `slow`, of the first level,
    // was still on its way.
    assert!(f.has_cached(third, 0, 1), "third.py fetched");
    assert!(!f.has_cached(slow, 0, 1), "slow.py still on its way");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_importing_many_modules_of_a_directory_has_the_rest_of_it_fetched() {
    use crate::libraries::LibraryPrefetch;

    let lib = "usr/lib/python3.11";
    let compiled = |name: &str| format!("{lib}/__pycache__/{name}.cpython-311.pyc");
    let script = |imports: &[&str]| {
        let mut s: String = imports.iter().map(|m| format!("import {m}\n")).collect();
        s.push_str("import small\n");
        ("app/main.py".to_string(), s.into_bytes())
    };
    let modules = ["m0", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "x1", "x2"];
    let mut files = vec![(format!("{lib}/os.py"), b"import sys\n".to_vec())];
    for name in modules {
        files.push((format!("{lib}/{name}.py"), name.as_bytes().to_vec()));
        files.push((compiled(name), pyc(&[], &[])));
    }
    // Another interpreter's compiled module, and a package of two modules
    // whose `__init__` imports nothing.
    files.push((
        format!("{lib}/__pycache__/x3.cpython-312.pyc"),
        pyc(&[], &[]),
    ));
    for (name, data) in [
        ("small/__init__.py", b"\n".to_vec()),
        ("small/__pycache__/__init__.cpython-311.pyc", pyc(&[], &[])),
        ("small/sub.py", b"\n\n".to_vec()),
        ("small/__pycache__/sub.cpython-311.pyc", pyc(&[], &[])),
        ("other/__init__.py", b"\n\n\n".to_vec()),
        ("other/__pycache__/__init__.cpython-311.pyc", pyc(&[], &[])),
        ("other/__pycache__/sub.cpython-311.pyc", pyc(&[], &[])),
    ] {
        files.push((format!("{lib}/{name}"), data));
    }
    let cached = |f: &Fetcher, path: &str| f.has_cached(id_of(f, path), 0, 1);
    // A node of its own each time (what it examined is remembered).
    let start = |files: Vec<(String, Vec<u8>)>| {
        let files = distinct_files(files);
        async move {
            let (f, _) = fetcher_for(&test_files(&files), exact_config());
            let shared = LibraryPrefetch::new(64 << 20);
            let stack = single_layer_stack(&shared, b"python script", &f);
            let main = id_of(&f, "app/main.py");
            let head = f.read(main, 0, 4096).await.unwrap();
            stack.file_start(main, &head);
            f
        }
    };

    // Eight modules of the standard library's top directory: the other
    // compiled modules there come too, and the small package's.
    let mut all = files.clone();
    all.push(script(&modules[..8]));
    let f = start(all).await;
    wait_until(|| cached(&f, &compiled("x1")) && cached(&f, &compiled("x2"))).await;
    wait_until(|| cached(&f, &format!("{lib}/small/__pycache__/sub.cpython-311.pyc"))).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    for name in modules {
        assert!(cached(&f, &compiled(name)), "{name} fetched");
    }
    assert!(cached(
        &f,
        &format!("{lib}/small/__pycache__/sub.cpython-311.pyc")
    ));
    // Not another interpreter's modules, not the sources, not a package
    // nothing imports.
    for path in [
        format!("{lib}/__pycache__/x3.cpython-312.pyc"),
        format!("{lib}/x1.py"),
        format!("{lib}/other/__pycache__/sub.cpython-311.pyc"),
    ] {
        assert!(!cached(&f, &path), "{path} not fetched");
    }

    // Seven: only what the script imports.
    let mut fewer = files;
    fewer.push(script(&modules[..7]));
    let f = start(fewer).await;
    wait_until(|| cached(&f, &compiled("m6"))).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for name in ["m7", "x1", "x2"] {
        assert!(!cached(&f, &compiled(name)), "{name} not fetched");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_interpreter_read_from_its_start_fetches_its_start_up_modules() {
    use crate::libraries::LibraryPrefetch;

    let HostProgram { libc, .. } = host_program();
    let lib = "usr/local/lib/python3.11";
    let cached_in =
        |dir: &str, name: &str| format!("{lib}/{dir}__pycache__/{name}.cpython-311.pyc");
    let files = distinct_files(vec![
        ("usr/local/bin/python3.11".to_string(), libc),
        (format!("{lib}/os.py"), b"import sys\n".to_vec()),
        (
            format!("{lib}/encodings/__init__.py"),
            b"import codecs\n".to_vec(),
        ),
        (
            cached_in("encodings/", "__init__"),
            pyc(&["codecs", "aliases"], &[]),
        ),
        (cached_in("encodings/", "aliases"), pyc(&[], &[])),
        (cached_in("encodings/", "utf_8"), pyc(&["codecs"], &[])),
        (cached_in("encodings/", "cp1252"), pyc(&[], &[])),
        (format!("{lib}/sitecustomize.py"), b"\n".to_vec()),
        (cached_in("", "sitecustomize"), pyc(&[], &[])),
        (format!("{lib}/site.py"), b"\n\n".to_vec()),
        // Frozen into the interpreter since 3.11: never read from a file.
        (cached_in("", "site"), pyc(&[], &[])),
        (cached_in("", "unrelated"), pyc(&[], &[])),
    ]);
    let cached = |f: &Fetcher, path: &str| f.has_cached(id_of(f, path), 0, 1);
    let shared = LibraryPrefetch::new(64 << 20);
    let f = read_from_its_start(&files, &shared, "usr/local/bin/python3.11", false).await;
    wait_until(|| cached(&f, &cached_in("", "sitecustomize"))).await;
    wait_until(|| cached(&f, &cached_in("encodings/", "utf_8"))).await;
    for path in [
        cached_in("encodings/", "__init__"),
        cached_in("encodings/", "aliases"),
        cached_in("encodings/", "utf_8"),
        cached_in("", "sitecustomize"),
    ] {
        assert!(cached(&f, &path), "{path} fetched");
    }
    for path in [
        cached_in("encodings/", "cp1252"),
        cached_in("", "site"),
        cached_in("", "unrelated"),
        format!("{lib}/encodings/__init__.py"),
    ] {
        assert!(!cached(&f, &path), "{path} not fetched");
    }

    // Under a start-up profile: no guessing.
    let f = read_from_its_start(&files, &shared, "usr/local/bin/python3.11", true).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!cached(&f, &cached_in("encodings/", "__init__")));
}

/// A one-layer stack of `files` (its layer guided by a start-up profile when
/// `profiled`) whose file at `path` has been read from its start.
async fn read_from_its_start(
    files: &[(String, Vec<u8>)],
    shared: &Arc<crate::libraries::LibraryPrefetch>,
    path: &str,
    profiled: bool,
) -> Arc<Fetcher> {
    let (f, _) = fetcher_for(&test_files(files), exact_config());
    if profiled {
        f.set_profile_guided();
    }
    let name = format!("{path} {profiled}");
    let stack = single_layer_stack(shared, name.as_bytes(), &f);
    let id = id_of(&f, path);
    let head = f.read(id, 0, 4096).await.unwrap();
    stack.file_start(id, &head);
    f
}

/// A copy of ELF file `elf` whose first chunk is its own (byte `i` in the
/// header's padding, which nothing reads), so each copy is fetched apart.
fn elf_copy(elf: &[u8], i: u8) -> Vec<u8> {
    let mut data = elf.to_vec();
    data[9] = i;
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compiler_driver_read_from_its_start_fetches_the_programs_it_runs() {
    use crate::libraries::LibraryPrefetch;

    let HostProgram { libc, .. } = host_program();
    let elf = |i: u8| elf_copy(&libc, i);
    let gcc = "usr/lib/gcc/x86_64-linux-gnu/12";
    let files: Vec<(String, Vec<u8>)> = vec![
        ("usr/bin/x86_64-linux-gnu-gcc-12".into(), elf(1)),
        (format!("{gcc}/cc1"), elf(2)),
        (format!("{gcc}/cc1plus"), elf(3)),
        (format!("{gcc}/collect2"), elf(4)),
        (format!("{gcc}/liblto_plugin.so"), elf(5)),
        ("usr/bin/x86_64-linux-gnu-as".into(), elf(6)),
        ("usr/bin/ld".into(), elf(7)),
        ("usr/lib/x86_64-linux-gnu/libgcc_s.so.1".into(), elf(8)),
        ("usr/lib/gcc/x86_64-linux-gnu/11/cc1".into(), elf(9)),
        ("usr/bin/unrelated".into(), elf(10)),
        (format!("{gcc}/crtbeginS.o"), b"start file".to_vec()),
        (
            "usr/lib/x86_64-linux-gnu/libc.so".into(),
            b"GROUP ( libc.so.6 )".to_vec(),
        ),
        (format!("{gcc}/libgcc.a"), pattern(1 << 20, 32)),
    ];
    let cached = |f: &Fetcher, path: &str| f.has_cached(id_of(f, path), 0, 1);
    let shared = LibraryPrefetch::new(64 << 20);
    let f = read_from_its_start(&files, &shared, "usr/bin/x86_64-linux-gnu-gcc-12", false).await;
    let run = [
        format!("{gcc}/cc1"),
        format!("{gcc}/collect2"),
        format!("{gcc}/liblto_plugin.so"),
        "usr/bin/x86_64-linux-gnu-as".into(),
        "usr/bin/ld".into(),
        "usr/lib/x86_64-linux-gnu/libgcc_s.so.1".into(),
    ];
    for path in &run {
        wait_until(|| cached(&f, path)).await;
        assert!(cached(&f, path), "{path} fetched");
    }
    // What the linker reads: small files whole, the archive's head only.
    for path in [
        format!("{gcc}/crtbeginS.o"),
        "usr/lib/x86_64-linux-gnu/libc.so".into(),
        format!("{gcc}/libgcc.a"),
    ] {
        wait_until(|| cached(&f, &path)).await;
        assert!(cached(&f, &path), "{path} fetched");
    }
    let archive = id_of(&f, &format!("{gcc}/libgcc.a"));
    assert!(
        !f.has_cached(archive, 512 << 10, 1),
        "past the archive's head"
    );
    // Not the C++ compiler, not another version's, nothing else.
    for path in [
        format!("{gcc}/cc1plus"),
        "usr/lib/gcc/x86_64-linux-gnu/11/cc1".into(),
        "usr/bin/unrelated".into(),
    ] {
        assert!(!cached(&f, &path), "{path} not fetched");
    }

    // Under a start-up profile: no guessing.
    let f = read_from_its_start(&files, &shared, "usr/bin/x86_64-linux-gnu-gcc-12", true).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!cached(&f, &format!("{gcc}/cc1")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_read_from_its_start_fetches_the_data_files_it_names() {
    use crate::libraries::LibraryPrefetch;

    let HostProgram { libc, .. } = host_program();
    // The C library as a program: its read-only data names `/etc/hosts`;
    // one of its names is replaced by a name the image has elsewhere.
    let mut prog = libc.clone();
    let at = prog
        .windows(13)
        .position(|w| w == b"\0/etc/passwd\0")
        .expect("the C library names /etc/passwd");
    prog[at + 1..at + 13].copy_from_slice(b"mydata.bki\0\0");
    let files: Vec<(String, Vec<u8>)> = vec![
        ("usr/bin/prog".into(), prog),
        ("etc/hosts".into(), b"127.0.0.1 localhost\n".to_vec()),
        ("opt/app/share/mydata.bki".into(), b"data".to_vec()),
        ("etc/unrelated.conf".into(), b"x = 1\n".to_vec()),
    ];
    let shared = LibraryPrefetch::new(64 << 20);
    let f = read_from_its_start(&files, &shared, "usr/bin/prog", false).await;
    let cached = |f: &Fetcher, path: &str| f.has_cached(id_of(f, path), 0, 1);
    for path in ["etc/hosts", "opt/app/share/mydata.bki"] {
        wait_until(|| cached(&f, path)).await;
        assert!(cached(&f, path), "{path} fetched");
    }
    assert!(!cached(&f, "etc/unrelated.conf"));

    // Under a start-up profile: no guessing.
    let f = read_from_its_start(&files, &shared, "usr/bin/prog", true).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!cached(&f, "etc/hosts"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_fetched_ahead_of_the_compiler_along_its_search_path() {
    use crate::libraries::LibraryPrefetch;

    let gcc = "usr/lib/gcc/x86_64-linux-gnu/12/include";
    let multiarch = "usr/include/x86_64-linux-gnu";
    let files: Vec<(String, String)> = [
        (
            "app/hello.c".to_string(),
            "#include <stdio.h>\n#include \"util.h\"\n#include <limits.h>\n#include MACRO\n",
        ),
        ("app/util.h".into(), "#include <stddef.h>\n"),
        ("usr/include/stdc-predef.h".into(), "/* predefined */\n"),
        (
            "usr/include/stdio.h".into(),
            "#include <bits/start.h>\n#include <stddef.h>\n",
        ),
        (
            format!("{multiarch}/bits/start.h"),
            "#include <features.h>\n",
        ),
        ("usr/include/features.h".into(), "#include <sys/cdefs.h>\n"),
        (
            format!("{multiarch}/sys/cdefs.h"),
            "#include <bits/wordsize.h>\n",
        ),
        (
            format!("{multiarch}/bits/wordsize.h"),
            "#include <bits/deeper.h>\n",
        ),
        (
            format!("{multiarch}/bits/deeper.h"),
            "#include <bits/deepest.h>\n",
        ),
        (
            format!("{multiarch}/bits/deepest.h"),
            "/* past the walk */\n",
        ),
        (format!("{gcc}/stddef.h"), "/* the compiler's own */\n"),
        ("usr/include/stddef.h".into(), "/* shadowed by GCC's */\n"),
        (format!("{gcc}/limits.h"), "#include_next <limits.h>\n"),
        ("usr/include/limits.h".into(), "/* the C library's */\n"),
        ("usr/include/unrelated.h".into(), "/* never named */\n"),
    ]
    .into_iter()
    // More directories in usr/include than the search path's listing keeps
    // (the multiarch one must still be found among them).
    .chain((0..100).map(|i| (format!("usr/include/a{i:03}/x.h"), "/* a library's */\n")))
    .enumerate()
    // Every file's content differs (the chunk cache is content-addressed).
    .map(|(i, (name, text))| (name, format!("{text}/* {i} */\n")))
    .collect();
    let test_files: Vec<TestFile<'_>> = files
        .iter()
        .map(|(name, data)| TestFile {
            name,
            data: data.as_bytes(),
            chunk: 64 << 10,
        })
        .collect();
    // No holes fetched between wanted files: what is fetched was asked for.
    let config = exact_config();
    let shared = LibraryPrefetch::new(64 << 20);
    let stack_over = |f: &Arc<Fetcher>| single_layer_stack(&shared, b"gcc", f);
    let cached = |f: &Fetcher, path: &str| f.read_from_memory(id_of(f, path), 0, 1).is_some();

    let (f, _) = fetcher_for(&test_files, config.clone());
    let stack = stack_over(&f);
    let source = id_of(&f, "app/hello.c");
    let head = f.read(source, 0, 4096).await.unwrap();
    stack.file_start(source, &head);
    let deeper = format!("{multiarch}/bits/deeper.h");
    wait_until(|| cached(&f, &deeper)).await;
    // Six levels, the first with the header GCC includes before the file;
    // quoted names next to the file; GCC's directory before the C library's;
    // `#include_next` goes on past the including file's directory.
    for path in [
        "usr/include/stdc-predef.h".to_string(),
        "usr/include/stdio.h".into(),
        "app/util.h".into(),
        format!("{gcc}/limits.h"),
        format!("{multiarch}/bits/start.h"),
        format!("{gcc}/stddef.h"),
        "usr/include/limits.h".into(),
        "usr/include/features.h".into(),
        format!("{multiarch}/sys/cdefs.h"),
        format!("{multiarch}/bits/wordsize.h"),
        deeper,
    ] {
        assert!(cached(&f, &path), "{path} fetched");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    for path in [
        format!("{multiarch}/bits/deepest.h"),
        "usr/include/stddef.h".into(),
        "usr/include/unrelated.h".into(),
    ] {
        assert!(!cached(&f, &path), "{path} not fetched");
    }
    assert_eq!(shared.stats().headers, 11);

    // The compiler's read of the last level fetched walks on.
    let last = id_of(&f, &format!("{multiarch}/bits/deeper.h"));
    let head = f.read(last, 0, 4096).await.unwrap();
    stack.file_start(last, &head);
    let deepest = format!("{multiarch}/bits/deepest.h");
    wait_until(|| cached(&f, &deepest)).await;
    assert!(cached(&f, &deepest));

    // A start command naming the source: its headers are fetched before the
    // compiler reads it (no read of it here at all). A new daemon: the
    // files examined above are remembered per daemon.
    let (f, _) = fetcher_for(&test_files, config.clone());
    let stack = single_layer_stack(&LibraryPrefetch::new(64 << 20), b"gcc", &f);
    stack.prefetch_start(crate::libraries::StartCommand {
        argv: ["sh", "-c", "cc -o /tmp/hello hello.c && /tmp/hello"]
            .map(String::from)
            .to_vec(),
        path: "/usr/bin".into(),
        working_dir: "/app".into(),
        env: Vec::new(),
    });
    let features = "usr/include/features.h";
    wait_until(|| cached(&f, features)).await;
    for path in ["app/hello.c", "usr/include/stdio.h", features] {
        assert!(cached(&f, path), "{path} fetched at start");
    }

    // A layer a start-up profile guides: no guessing.
    let (f, _) = fetcher_for(&test_files, config);
    f.set_profile_guided();
    let stack = stack_over(&f);
    let source = id_of(&f, "app/hello.c");
    let head = f.read(source, 0, 4096).await.unwrap();
    stack.file_start(source, &head);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!cached(&f, "usr/include/stdio.h"));
}
