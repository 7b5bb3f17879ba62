//! The link emulator (`zest_bench::link`) in front of a real Distribution registry on
//! 127.0.0.1: the added round trips per connection and per request, the bandwidth
//! limit, bytes passing unmodified (whole blobs and ranges), and zest's registry
//! client working through it. Only lower bounds of time are asserted: delays are the
//! emulator's function, speed is not.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use support::{pseudo_random, require_tool, test_client_config, Auth, Registry, REGISTRY_BIN};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use zest_bench::link::{CountersHandle, LinkConfig, LinkCounters, LinkEmulator, LinkProfile};
use zest_oci::digest::Digest;
use zest_oci::Repository;
use zest_registry::{PlainHttp, RegistryClient};

/// Every wait in these tests is bounded by this.
const LIMIT: Duration = Duration::from_secs(30);

struct Link {
    addr: String,
    counters: CountersHandle,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<LinkCounters>,
}

impl Link {
    async fn start(upstream: &str, profile: LinkProfile) -> Link {
        let config = LinkConfig::new("127.0.0.1:0".parse().unwrap(), upstream, profile);
        let link = LinkEmulator::bind(config)
            .await
            .expect("bind link emulator");
        let addr = link.local_addr().to_string();
        let counters = link.counters();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            link.run(async {
                let _ = rx.await;
            })
            .await
            .expect("link emulator runs")
        });
        Link {
            addr,
            counters,
            stop: Some(tx),
            task,
        }
    }

    /// zest's registry client speaking to the registry through the link, and
    /// `repo` as seen through it.
    fn client(&self, repo: &Repository) -> (RegistryClient, Repository) {
        let client = RegistryClient::new(test_client_config(PlainHttp::Hosts(vec![self
            .addr
            .clone()])))
        .unwrap();
        (client, Repository::new(&self.addr, &repo.name).unwrap())
    }

    async fn stop(mut self) -> LinkCounters {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(LIMIT, &mut self.task)
            .await
            .expect("link emulator stops in time")
            .expect("link task")
    }
}

fn rtt(ms: u64) -> LinkProfile {
    LinkProfile {
        rtt: Duration::from_millis(ms),
        bandwidth_bps: None,
    }
}

/// A registry with one blob pushed; `None` when the registry is missing outside CI.
async fn registry_with_blob(len: usize) -> Option<(Registry, Repository, Bytes, Digest)> {
    if !require_tool(REGISTRY_BIN) {
        return None;
    }
    let reg = Registry::start(Auth::None);
    let repo = Repository::new(&reg.host(), "bench/link").unwrap();
    let blob = Bytes::from(pseudo_random(len, 7));
    let digest = reg
        .client()
        .push_blob_bytes(&repo, blob.clone())
        .await
        .expect("push blob");
    assert_eq!(digest, Digest::of(&blob));
    Some((reg, repo, blob, digest))
}

/// Reads one HTTP/1.1 response with a Content-Length body; returns (status, body).
async fn read_response<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> (u16, Vec<u8>) {
    let mut status_line = String::new();
    r.read_line(&mut status_line).await.expect("status line");
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).await.expect("header line");
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                len = value.trim().parse().expect("content-length");
            }
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.expect("body");
    (status, body)
}

fn range_get(repo: &Repository, digest: &Digest, range: &str) -> String {
    format!(
        "GET /v2/{}/blobs/{digest} HTTP/1.1\r\nHost: registry\r\nRange: bytes={range}\r\n\r\n",
        repo.name
    )
}

#[tokio::test]
async fn a_range_get_pays_the_connection_and_request_round_trips_and_returns_exact_bytes() {
    let Some((reg, repo, blob, digest)) = registry_with_blob(300_000).await else {
        return;
    };
    let link = Link::start(&reg.host(), rtt(40)).await;
    tokio::time::timeout(LIMIT, async {
        let t = Instant::now();
        let stream = TcpStream::connect(&link.addr).await.unwrap();
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        w.write_all(range_get(&repo, &digest, "1000-65535").as_bytes())
            .await
            .unwrap();
        let (status, body) = read_response(&mut r).await;
        let elapsed = t.elapsed();
        assert_eq!(status, 206);
        assert_eq!(&body[..], &blob[1000..65536]);
        // One RTT for the handshake, one for the request.
        assert!(elapsed >= Duration::from_millis(80), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");

        // On the warm connection, one request costs one RTT.
        let t = Instant::now();
        w.write_all(range_get(&repo, &digest, "299990-299999").as_bytes())
            .await
            .unwrap();
        let (status, body) = read_response(&mut r).await;
        let elapsed = t.elapsed();
        assert_eq!(status, 206);
        assert_eq!(&body[..], &blob[299_990..]);
        assert!(elapsed >= Duration::from_millis(40), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    })
    .await
    .expect("bounded");
    let counters = link.stop().await;
    assert_eq!(counters.connections, 1);
    assert_eq!(counters.requests, 2);
    assert!(counters.bytes_down > 64_536 + 10, "{counters:?}");
    assert!(counters.bytes_up > 0, "{counters:?}");
}

#[tokio::test]
async fn sequential_requests_on_one_connection_each_pay_a_round_trip() {
    let Some((reg, repo, blob, digest)) = registry_with_blob(10_000).await else {
        return;
    };
    let link = Link::start(&reg.host(), rtt(40)).await;
    const N: u32 = 5;
    tokio::time::timeout(LIMIT, async {
        let stream = TcpStream::connect(&link.addr).await.unwrap();
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        let t = Instant::now();
        for i in 0..N as usize {
            let (a, b) = (i * 100, i * 100 + 99);
            w.write_all(range_get(&repo, &digest, &format!("{a}-{b}")).as_bytes())
                .await
                .unwrap();
            let (status, body) = read_response(&mut r).await;
            assert_eq!(status, 206);
            assert_eq!(&body[..], &blob[a..=b]);
        }
        let elapsed = t.elapsed();
        assert!(elapsed >= Duration::from_millis(40) * N, "{elapsed:?}");
    })
    .await
    .expect("bounded");
    let counters = link.stop().await;
    assert_eq!(counters.connections, 1);
    assert_eq!(counters.requests, u64::from(N));
}

#[tokio::test]
async fn bandwidth_limits_a_blob_download_and_keeps_its_bytes() {
    let Some((reg, repo, blob, digest)) = registry_with_blob(4 << 20).await else {
        return;
    };
    let link = Link::start(
        &reg.host(),
        LinkProfile {
            rtt: Duration::from_millis(1),
            bandwidth_bps: Some(16_000_000),
        },
    )
    .await;
    let (client, via) = link.client(&repo);
    let t = Instant::now();
    let got = tokio::time::timeout(LIMIT, client.get_blob_bytes(&via, &digest, 8 << 20))
        .await
        .expect("bounded")
        .expect("blob through the link");
    let elapsed = t.elapsed();
    // 4 MiB at 16 Mbit/s is 2.1 s.
    assert!(elapsed >= Duration::from_millis(1800), "{elapsed:?}");
    assert_eq!(Digest::of(&got), digest);
    assert_eq!(got, blob);
    let counters = link.stop().await;
    assert!(counters.bytes_down >= 4 << 20, "{counters:?}");
}

#[tokio::test]
async fn registry_client_works_through_the_link() {
    let Some((reg, repo, blob, digest)) = registry_with_blob(200_000).await else {
        return;
    };
    let link = Link::start(&reg.host(), rtt(10)).await;
    let (client, via) = link.client(&repo);
    tokio::time::timeout(LIMIT, async {
        // Reads: size, a range, the whole blob.
        assert_eq!(
            client.blob_size(&via, &digest).await.unwrap(),
            blob.len() as u64
        );
        let part = client.get_range(&via, &digest, 5000..9000).await.unwrap();
        assert_eq!(&part[..], &blob[5000..9000]);
        let whole = client.get_blob_bytes(&via, &digest, 1 << 20).await.unwrap();
        assert_eq!(whole, blob);
        // An upload through the link lands intact in the registry.
        let up = Bytes::from(pseudo_random(150_000, 99));
        let d = client.push_blob_bytes(&via, up.clone()).await.unwrap();
        assert_eq!(d, Digest::of(&up));
        let back = reg
            .client()
            .get_blob_bytes(&repo, &d, 1 << 20)
            .await
            .unwrap();
        assert_eq!(back, up);
    })
    .await
    .expect("bounded");
    let counters = link.stop().await;
    assert!(counters.requests >= 4, "{counters:?}");
    assert!(counters.bytes_up >= 150_000, "{counters:?}");
    assert!(counters.connections >= 1, "{counters:?}");
}

#[tokio::test]
async fn warmed_up_connections_carry_the_reads_that_follow() {
    let Some((reg, repo, blob, digest)) = registry_with_blob(100_000).await else {
        return;
    };
    let link = Link::start(&reg.host(), rtt(10)).await;
    let (client, via) = link.client(&repo);
    tokio::time::timeout(LIMIT, async {
        client.warm_up(&via, 3).await;
        let warmed = link.counters.snapshot();
        assert_eq!(warmed.connections, 3, "{warmed:?}");
        assert_eq!(warmed.requests, 3, "{warmed:?}");
        // Three reads at once find three connections open: no handshake.
        let reads = (0..3u64).map(|i| {
            let (client, via, blob) = (&client, &via, &blob);
            async move {
                let range = i * 1000..i * 1000 + 500;
                let got = client.get_range(via, &digest, range.clone()).await.unwrap();
                assert_eq!(&got[..], &blob[range.start as usize..range.end as usize]);
            }
        });
        futures::future::join_all(reads).await;
    })
    .await
    .expect("bounded");
    let counters = link.stop().await;
    assert_eq!(counters.connections, 3, "{counters:?}");
    assert_eq!(counters.requests, 6, "{counters:?}");
}

#[tokio::test]
async fn shared_counters_are_readable_while_running() {
    let Some((reg, repo, _blob, digest)) = registry_with_blob(1000).await else {
        return;
    };
    let link = Link::start(&reg.host(), rtt(0)).await;
    tokio::time::timeout(LIMIT, async {
        let stream = TcpStream::connect(&link.addr).await.unwrap();
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        w.write_all(range_get(&repo, &digest, "0-9").as_bytes())
            .await
            .unwrap();
        let (status, _) = read_response(&mut r).await;
        assert_eq!(status, 206);
    })
    .await
    .expect("bounded");
    let live = link.counters.snapshot();
    assert_eq!(live.requests, 1);
    assert_eq!(live.connections, 1);
    link.stop().await;
}
