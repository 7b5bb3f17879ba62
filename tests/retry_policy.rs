//! One retry policy, applied once, and typed errors from the registry to the
//! fetcher: a scripted loopback registry serves a real zstd:chunked layer to a
//! real [`RegistryClient`], [`RegistryBlob`] and [`Fetcher`], then misbehaves in
//! one way per test. Requests are counted at the server.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::fake_http::{FakeServer, Request, Response};
use support::image::TarBuilder;
use support::{pseudo_random, test_client_config};
use zest_cache::{CacheConfig, ChunkCache};
use zest_fetch::toc::{open_layer, TocFetchOptions};
use zest_fetch::{FetchConfig, FetchError, FetchErrorKind, FetchLimits, Fetcher};
use zest_format::{write_chunked, WriteOptions};
use zest_oci::digest::Digest;
use zest_oci::Repository;
use zest_registry::{ErrorKind, PlainHttp, RegistryClient, RegistryConfig};
use zest_store::{BlobSource, RegistryBlob, SourceError};

/// How the scripted registry answers range requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    Ok,
    NotFound,
    Forbidden,
    Unavailable,
    RateLimited,
    RateLimitedLong,
    Slow,
    Truncated,
    Corrupt,
}

const MODES: [Mode; 9] = [
    Mode::Ok,
    Mode::NotFound,
    Mode::Forbidden,
    Mode::Unavailable,
    Mode::RateLimited,
    Mode::RateLimitedLong,
    Mode::Slow,
    Mode::Truncated,
    Mode::Corrupt,
];

fn requested_range(req: &Request) -> Option<(u64, u64)> {
    let v = req.header("range")?.strip_prefix("bytes=")?;
    let (a, b) = v.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

fn answer(mode: Mode, blob: &[u8], req: &Request) -> Response {
    let Some((a, b)) = requested_range(req) else {
        return Response::error(400, "UNSUPPORTED", "range requests only");
    };
    let total = blob.len();
    let ok = |data: Vec<u8>| {
        Response::new(206)
            .header("Content-Range", &format!("bytes {a}-{b}/{total}"))
            .body(data)
    };
    let data = blob[a as usize..=b as usize].to_vec();
    match mode {
        Mode::Ok => ok(data),
        Mode::NotFound => Response::error(404, "BLOB_UNKNOWN", "blob unknown to registry"),
        Mode::Forbidden => Response::error(403, "DENIED", "requested access is denied"),
        Mode::Unavailable => Response::error(503, "UNAVAILABLE", "maintenance"),
        Mode::RateLimited => {
            Response::error(429, "TOOMANYREQUESTS", "slow down").header("Retry-After", "1")
        }
        Mode::RateLimitedLong => {
            Response::error(429, "TOOMANYREQUESTS", "slow down").header("Retry-After", "60")
        }
        Mode::Slow => {
            let mut r = ok(data);
            r.delay = Some(Duration::from_secs(4));
            r
        }
        Mode::Truncated => {
            let n = data.len() as u64;
            let mut r = ok(data);
            r.truncate_at = Some(n / 2);
            r
        }
        Mode::Corrupt => {
            let mut data = data;
            for b in data.iter_mut().step_by(101) {
                *b ^= 0x01;
            }
            ok(data)
        }
    }
}

/// A zstd:chunked layer served by a scripted registry, opened by a fetcher.
struct Env {
    server: FakeServer,
    mode: Arc<AtomicU8>,
    fetcher: Arc<Fetcher>,
    client: RegistryClient,
    data: Vec<u8>,
}

impl Env {
    /// Requests the server has answered so far.
    fn requests(&self) -> usize {
        self.server.requests().len()
    }

    fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    /// Reads the first page of `data/f0`.
    async fn read(&self) -> Result<bytes::Bytes, FetchError> {
        self.read_f0(0, 4096).await
    }

    /// Reads `len` bytes of `data/f0` from `offset`.
    async fn read_f0(&self, offset: u64, len: u32) -> Result<bytes::Bytes, FetchError> {
        let id = self
            .fetcher
            .index()
            .resolve_path("data/f0")
            .expect("data/f0");
        self.fetcher.read(id, offset, len).await
    }
}

struct Layer {
    blob: Vec<u8>,
    digest: Digest,
    annotations: BTreeMap<String, String>,
    data: Vec<u8>,
}

fn layer() -> Layer {
    let data = pseudo_random(300_000, 71);
    let tar = TarBuilder::new()
        .dir("data/", 0o755)
        .file("data/f0", 0o644, &data)
        .file("data/f1", 0o644, &pseudo_random(100_000, 72))
        .finish();
    let mut blob = Vec::new();
    let summary =
        write_chunked(&tar[..], &mut blob, &WriteOptions::default()).expect("convert layer");
    Layer {
        digest: summary.blob_digest,
        annotations: summary.annotations,
        blob,
        data,
    }
}

async fn serve(layer: &Layer) -> (FakeServer, Arc<AtomicU8>) {
    let mode = Arc::new(AtomicU8::new(Mode::Ok as u8));
    let (m, blob) = (mode.clone(), layer.blob.clone());
    let server = FakeServer::start(move |req| {
        let mode = MODES[m.load(Ordering::SeqCst) as usize];
        answer(mode, &blob, req)
    })
    .await;
    (server, mode)
}

fn fetch_config() -> FetchConfig {
    FetchConfig {
        attempts: 3,
        retry_backoff: Duration::from_millis(5),
        ..FetchConfig::default()
    }
}

fn memory_cache() -> Arc<ChunkCache> {
    Arc::new(
        ChunkCache::open(&CacheConfig {
            memory_bytes: 64 << 20,
            disk_bytes: 0,
            ..CacheConfig::default()
        })
        .expect("cache"),
    )
}

fn source(client: &RegistryClient, server: &FakeServer, layer: &Layer) -> Arc<dyn BlobSource> {
    let repo = Repository::new(&server.host(), "retry/app").expect("repository");
    Arc::new(RegistryBlob::new(
        client.clone(),
        repo,
        layer.digest,
        Some(layer.blob.len() as u64),
    ))
}

/// Opens `layer` (its TOC over HTTP) through `client`.
async fn open(
    client: &RegistryClient,
    server: &FakeServer,
    layer: &Layer,
) -> Result<Arc<Fetcher>, FetchError> {
    open_layer(
        source(client, server, layer),
        layer.blob.len() as u64,
        &layer.annotations,
        memory_cache(),
        FetchLimits::default(),
        fetch_config(),
        &TocFetchOptions::default(),
    )
    .await
}

/// Serves a layer, opens it (TOC over HTTP), and returns with the server answering
/// correctly; `adjust` tunes the registry client's configuration.
async fn env_with(adjust: impl FnOnce(&mut RegistryConfig)) -> Env {
    let layer = layer();
    let (server, mode) = serve(&layer).await;
    let mut cfg = test_client_config(PlainHttp::Hosts(vec![server.host()]));
    adjust(&mut cfg);
    let client = RegistryClient::new(cfg).expect("client");
    let fetcher = open(&client, &server, &layer).await.expect("open layer");
    Env {
        server,
        mode,
        fetcher,
        client,
        data: layer.data,
    }
}

async fn env() -> Env {
    env_with(|_| {}).await
}

/// The registry error inside a fetch error, if the registry failed.
fn registry_kind(e: &FetchError) -> Option<ErrorKind> {
    match e {
        FetchError::Source(s) => s.registry_error().map(|r| r.kind()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_found_is_not_retried_and_stays_not_found() {
    let env = env().await;
    env.set(Mode::NotFound);
    let before = env.requests();
    let err = env.read().await.expect_err("a missing blob fails the read");
    assert_eq!(env.requests() - before, 1, "a 404 is final: one request");
    assert_eq!(
        err.kind(),
        FetchErrorKind::Source(ErrorKind::NotFound),
        "{err}"
    );
    assert_eq!(registry_kind(&err), Some(ErrorKind::NotFound), "{err}");
    assert_eq!(err.kind().label(), "not_found");
    let msg = err.to_string();
    assert!(
        msg.contains("not found") && msg.contains("retry/app"),
        "{msg}"
    );
    let s = env.fetcher.stats();
    assert_eq!(
        s.failures.get(FetchErrorKind::Source(ErrorKind::NotFound)),
        1,
        "{s:?}"
    );
    assert_eq!(s.failures.total(), 1, "{s:?}");
    assert_eq!((s.range_requests, s.retries), (1, 0), "{s:?}");
    assert_eq!(env.client.stats().retries, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_is_not_retried_and_says_to_configure_credentials() {
    let env = env().await;
    env.set(Mode::Forbidden);
    let before = env.requests();
    let err = env.read().await.expect_err("denied");
    assert_eq!(env.requests() - before, 1, "a 403 is final: one request");
    assert_eq!(
        err.kind(),
        FetchErrorKind::Source(ErrorKind::Denied),
        "{err}"
    );
    assert!(err.to_string().contains("credentials"), "{err}");
    assert_eq!(
        env.fetcher
            .stats()
            .failures
            .get(FetchErrorKind::Source(ErrorKind::Denied)),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_by_the_policy_once_not_again_by_the_fetcher() {
    let env = env().await;
    let attempts = env.client.config().retry.max_attempts as usize;
    env.set(Mode::Unavailable);
    let before = env.requests();
    let err = env.read().await.expect_err("always 503");
    assert_eq!(
        env.requests() - before,
        attempts,
        "exactly the policy's attempts, not attempts x fetcher attempts"
    );
    assert_eq!(
        err.kind(),
        FetchErrorKind::Source(ErrorKind::Server),
        "{err}"
    );
    assert!(err.to_string().contains("HTTP 503"), "{err}");
    let s = env.fetcher.stats();
    assert_eq!((s.range_requests, s.retries), (1, 0), "{s:?}");
    assert_eq!(
        s.failures.get(FetchErrorKind::Source(ErrorKind::Server)),
        1,
        "{s:?}"
    );
    assert_eq!(env.client.stats().retries, attempts as u64 - 1);
    // The registry recovers: the same read succeeds.
    env.set(Mode::Ok);
    assert_eq!(&env.read().await.expect("read")[..], &env.data[..4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_honour_retry_after_and_stay_rate_limited() {
    let env = env().await;
    let attempts = env.client.config().retry.max_attempts;
    env.set(Mode::RateLimited);
    let before = env.requests();
    let t0 = Instant::now();
    let err = env.read().await.expect_err("always 429");
    assert_eq!(env.requests() - before, attempts as usize);
    assert!(
        t0.elapsed() >= Duration::from_secs(u64::from(attempts - 1)),
        "Retry-After: 1 honoured between attempts: {:?}",
        t0.elapsed()
    );
    assert_eq!(
        err.kind(),
        FetchErrorKind::Source(ErrorKind::RateLimited),
        "{err}"
    );
    assert_eq!(
        env.fetcher
            .stats()
            .failures
            .get(FetchErrorKind::Source(ErrorKind::RateLimited)),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_past_the_deadline_is_not_waited_for() {
    let env = env_with(|cfg| {
        cfg.retry.max_retry_after = Duration::from_secs(120);
        cfg.retry.deadline = Duration::from_secs(3);
        cfg.range_timeout = Duration::from_secs(2);
    })
    .await;
    env.set(Mode::RateLimitedLong);
    let before = env.requests();
    let t0 = Instant::now();
    let err = env.read().await.expect_err("429, retry after 60 s");
    assert_eq!(
        env.requests() - before,
        1,
        "waiting 60 s would pass the deadline"
    );
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(
        err.kind(),
        FetchErrorKind::Source(ErrorKind::RateLimited),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_registry_is_a_timeout_within_the_policy_deadline() {
    let deadline = Duration::from_millis(1200);
    let env = env_with(|cfg| {
        cfg.range_timeout = Duration::from_millis(300);
        cfg.retry.deadline = deadline;
        cfg.retry.max_attempts = 20;
    })
    .await;
    env.set(Mode::Slow);
    let t0 = Instant::now();
    let err = env.read().await.expect_err("no answer in time");
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(
        took < deadline + Duration::from_millis(500),
        "the overall deadline bounds every attempt: {took:?}"
    );
    assert_eq!(
        err.kind(),
        FetchErrorKind::Source(ErrorKind::Timeout),
        "{err}"
    );
    // The registry's own timeout, not the fetcher's guard, ended the read.
    assert_eq!(registry_kind(&err), Some(ErrorKind::Timeout), "{err}");
    let s = env.fetcher.stats();
    assert_eq!((s.range_requests, s.retries), (1, 0), "{s:?}");
    assert_eq!(
        s.failures.get(FetchErrorKind::Source(ErrorKind::Timeout)),
        1,
        "{s:?}"
    );
    assert!(env.client.stats().retries >= 2, "{:?}", env.client.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_connection_is_a_transport_failure_after_the_policy_attempts() {
    let env = env().await;
    let attempts = env.client.config().retry.max_attempts as usize;
    env.set(Mode::Truncated);
    let before = env.requests();
    // The whole file: its last chunks are in the half every answer loses.
    let whole = env.data.len() as u32;
    let err = env.read_f0(0, whole).await.expect_err("truncated answers");
    assert_eq!(env.requests() - before, attempts);
    assert_eq!(
        err.kind(),
        FetchErrorKind::Source(ErrorKind::Transport),
        "{err}"
    );
    assert_eq!(
        env.fetcher
            .stats()
            .failures
            .get(FetchErrorKind::Source(ErrorKind::Transport)),
        1
    );
}

/// Chunks are verified and served as their bytes arrive, so a read whose
/// chunks came whole before the connection broke is answered, with the
/// right bytes, while the rest of the range fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_that_arrived_before_a_broken_connection_are_served() {
    let env = env().await;
    env.set(Mode::Truncated);
    let page = env.read().await.expect("the first chunk arrived whole");
    assert_eq!(&page[..], &env.data[..4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_chunks_are_fetched_again_a_bounded_number_of_times_then_a_digest_mismatch() {
    let env = env().await;
    env.set(Mode::Corrupt);
    let before = env.requests();
    let err = env
        .read()
        .await
        .expect_err("corrupt bytes are never served");
    let attempts = env.fetcher.config().attempts as usize;
    assert_eq!(
        env.requests() - before,
        attempts,
        "the registry cannot see corruption: only the fetcher's re-fetches"
    );
    assert_eq!(
        err.kind(),
        FetchErrorKind::Source(ErrorKind::DigestMismatch),
        "{err}"
    );
    assert_eq!(err.kind().label(), "digest_mismatch");
    assert!(matches!(err, FetchError::Verification { .. }), "{err}");
    let s = env.fetcher.stats();
    assert!(s.verification_failures >= attempts as u64, "{s:?}");
    assert_eq!(s.retries, attempts as u64 - 1, "{s:?}");
    assert_eq!(
        s.failures
            .get(FetchErrorKind::Source(ErrorKind::DigestMismatch)),
        1,
        "{s:?}"
    );
    let id = env
        .fetcher
        .index()
        .resolve_path("data/f0")
        .expect("data/f0");
    assert!(env.fetcher.read_from_memory(id, 0, 4096).is_none());
    env.set(Mode::Ok);
    assert_eq!(&env.read().await.expect("read")[..], &env.data[..4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn toc_fetching_uses_the_same_single_retry_layer() {
    let layer = layer();
    let (server, mode) = serve(&layer).await;
    mode.store(Mode::Unavailable as u8, Ordering::SeqCst);
    let client = RegistryClient::new(test_client_config(PlainHttp::Hosts(vec![server.host()])))
        .expect("client");
    let err = open(&client, &server, &layer)
        .await
        .expect_err("TOC unavailable");
    assert_eq!(
        server.requests().len(),
        client.config().retry.max_attempts as usize
    );
    assert_eq!(
        err.kind(),
        FetchErrorKind::Source(ErrorKind::Server),
        "{err}"
    );
    match &err {
        FetchError::Source(e) => {
            assert!(matches!(e.as_ref(), SourceError::Registry { .. }), "{e:?}")
        }
        other => panic!("expected a source error, got {other}"),
    }
}
