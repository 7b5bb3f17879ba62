//! zest sends only single-range requests (`Range: bytes=a-b`): registries
//! backed by object stores and cluster mirrors such as Spegel reject or ignore
//! multi-range requests, so nothing depends on them. A scripted loopback
//! server that, like those, refuses any multi-range request (416) serves a
//! real zstd:chunked layer to a real [`RegistryClient`], [`RegistryBlob`] and
//! [`Fetcher`]; adjacent chunks must still be merged into one range, and the
//! speculative batches of misses (neighbour files, a library directory) must
//! arrive as single ranges too.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::fake_http::{FakeServer, Request, Response};
use support::image::TarBuilder;
use support::{pseudo_random, test_client_config};
use zest_cache::{CacheConfig, ChunkCache};
use zest_fetch::toc::{open_layer, TocFetchOptions};
use zest_fetch::{FetchConfig, FetchLimits, Fetcher};
use zest_format::{write_chunked, WriteOptions};
use zest_oci::Repository;
use zest_registry::{PlainHttp, RegistryClient};
use zest_store::{BlobSource, RegistryBlob};

/// `Some((first, last))` for a single range, `None` for anything else.
fn single_range(req: &Request) -> Option<(u64, u64)> {
    let v = req.header("range")?.strip_prefix("bytes=")?;
    let (a, b) = v.split_once('-')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

/// Answers single ranges with 206, and any other Range header with 416 (what
/// an object store or a mirror without multi-range support does).
fn answer(blob: &[u8], req: &Request) -> Response {
    match (req.header("range"), single_range(req)) {
        (None, _) => Response::new(200).body(blob.to_vec()),
        (Some(_), Some((a, b))) if a <= b && (b as usize) < blob.len() => Response::new(206)
            .header("Content-Range", &format!("bytes {a}-{b}/{}", blob.len()))
            .body(blob[a as usize..=b as usize].to_vec()),
        (Some(_), _) => Response::error(416, "RANGE_NOT_SATISFIABLE", "single ranges only"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_one_range_and_adjacent_chunks_share_it() {
    let big = pseudo_random(1 << 20, 5);
    let libs: Vec<Vec<u8>> = (0..12).map(|i| pseudo_random(6_000, 100 + i)).collect();
    let mut tar = TarBuilder::new();
    tar.dir("usr/", 0o755)
        .dir("usr/bin/", 0o755)
        .file("usr/bin/app", 0o755, &big)
        // Large, unread: the libraries are not the app's neighbours.
        .file("usr/bin/tool", 0o755, &pseudo_random(400_000, 6))
        .dir("usr/lib/", 0o755);
    for (i, data) in libs.iter().enumerate() {
        tar.file(&format!("usr/lib/lib{i:02}.so.1"), 0o644, data);
    }
    let tar = tar.finish();
    let mut blob = Vec::new();
    let summary = write_chunked(&tar[..], &mut blob, &WriteOptions::default()).expect("convert");
    let served = blob.clone();
    let server = FakeServer::start(move |req| answer(&served, req)).await;
    let client = RegistryClient::new(test_client_config(PlainHttp::Hosts(vec![server.host()])))
        .expect("client");
    let repo = Repository::new(&server.host(), "single/range").expect("repository");
    let source: Arc<dyn BlobSource> = Arc::new(RegistryBlob::new(
        client,
        repo,
        summary.blob_digest,
        Some(blob.len() as u64),
    ));
    let cache = Arc::new(
        ChunkCache::open(&CacheConfig {
            memory_bytes: 64 << 20,
            disk_bytes: 0,
            ..CacheConfig::default()
        })
        .expect("cache"),
    );
    let fetcher: Arc<Fetcher> = open_layer(
        source,
        blob.len() as u64,
        &summary.annotations,
        cache,
        FetchLimits::default(),
        FetchConfig {
            retry_backoff: Duration::from_millis(5),
            ..FetchConfig::default()
        },
        &TocFetchOptions::default(),
    )
    .await
    .expect("open layer");
    let id = |p: &str| fetcher.index().resolve_path(p).expect(p);
    let app = id("usr/bin/app");
    assert!(
        fetcher.index().entry(app).chunks().len() > 1,
        "the large file must span several chunks"
    );

    // One read of the whole multi-chunk file: its chunks are adjacent in the
    // blob, so they are fetched by one single-range request.
    let before = fetcher.stats().range_requests;
    let got = fetcher.read(app, 0, 1 << 20).await.expect("read app");
    assert_eq!(&got[..], &big[..]);
    assert_eq!(fetcher.stats().range_requests - before, 1);

    // Libraries: the first miss batches the directory; every byte verified.
    // That read is answered as soon as its own chunk arrives, while the rest
    // of the batch still streams in: the others are read once it has landed
    // (on a busy machine a read could otherwise wait on a chunk in flight,
    // which is a wait on the network, not another request).
    let app_chunks = fetcher.index().entry(app).chunks().len() as u64;
    for (i, data) in libs.iter().enumerate() {
        let got = fetcher
            .read(id(&format!("usr/lib/lib{i:02}.so.1")), 0, 8192)
            .await
            .expect("read lib");
        assert_eq!(&got[..], &data[..], "lib{i:02}");
        if i == 0 {
            let all = app_chunks + libs.len() as u64;
            for _ in 0..500 {
                if fetcher.stats().chunks_verified >= all {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    let s = fetcher.stats();
    assert_eq!(
        s.blocking_misses, 2,
        "app, then one miss for all libraries: {s:?}"
    );
    assert_eq!(s.speculative_used_bytes, s.speculative_bytes, "{s:?}");

    let requests = server.requests();
    let ranged: Vec<&Request> = requests
        .iter()
        .filter(|r| r.header("range").is_some())
        .collect();
    assert!(
        ranged.len() >= 3,
        "TOC, app, libraries: {} requests",
        ranged.len()
    );
    for r in &ranged {
        assert!(
            single_range(r).is_some(),
            "not a single range: {:?}",
            r.header("range")
        );
    }
}
