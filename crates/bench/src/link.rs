//! A userspace network link emulator: a loopback TCP proxy in front of an HTTP/1.1
//! registry that adds round-trip latency and a shared bandwidth limit, so cold-start
//! benchmarks see the cost of each request the way a remote registry would make them
//! pay it (the kernel we run on has no `netem`).
//!
//! What it models, per [`LinkProfile`]:
//! - a new connection pays one RTT before its first byte reaches the upstream (the
//!   TCP handshake);
//! - every HTTP request pays one RTT: its first bytes are held RTT/2 before they are
//!   forwarded, and the first bytes of the answer that follows are held RTT/2;
//! - bytes in each direction pass a token bucket shared by all connections (a
//!   full-duplex link of the given rate), in slices of at most [`SLICE`] bytes so
//!   connections share it fairly.
//!
//! Invariants: bytes are forwarded unmodified and in order (headers, `Range` and all);
//! bodies are streamed, never buffered whole; memory per connection is bounded (one
//! read buffer per direction plus at most [`MAX_HEAD`] bytes of request head kept to
//! find the body's framing); connections are bounded by `max_connections` and closed
//! after `idle_timeout` without traffic in either direction.
//!
//! Request boundaries are found by [`RequestFramer`], which follows HTTP/1.1 request
//! framing (request line and headers, then a `Content-Length` or chunked body). Input
//! it cannot frame (an oversized head, a bad length, `CONNECT` or `Upgrade`) is still
//! forwarded untouched; only further per-request delays on that connection stop.
//! Answers are not parsed: the first bytes the upstream sends after a request was
//! forwarded are held once, which is exact for a client that waits for each answer
//! (every registry client) and approximate for pipelining or `100 Continue`.

use parking_lot::Mutex;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Largest slice of bytes forwarded per token-bucket grant (and the read buffer size).
pub const SLICE: usize = 16 * 1024;

/// Largest request head (request line and headers) the framer keeps to find the body
/// length; a longer head switches the connection to opaque forwarding.
pub const MAX_HEAD: usize = 64 * 1024;

/// Largest chunk-size or trailer line of a chunked body the framer accepts.
const MAX_LINE: usize = 4096;

/// Errors of the link emulator.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A profile, RTT or bandwidth string could not be parsed.
    #[error("invalid {what} {input:?}: {reason}")]
    Parse {
        /// What was being parsed (`profile`, `RTT`, `bandwidth`).
        what: &'static str,
        /// The text given.
        input: String,
        /// Why it was rejected and what is accepted.
        reason: String,
    },
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}: {source}; choose a free address and port")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// Accepting connections failed.
    #[error("accepting connections on {addr} failed: {source}")]
    Accept {
        /// The listening address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// Latency and bandwidth of the emulated link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkProfile {
    /// Round-trip time added per connection and per request.
    pub rtt: Duration,
    /// Bandwidth in bits per second in each direction, shared by all connections;
    /// `None` is unlimited.
    pub bandwidth_bps: Option<u64>,
}

impl LinkProfile {
    /// Same data centre: 1 ms, 1 Gbit/s.
    pub const LAN: LinkProfile = LinkProfile {
        rtt: Duration::from_millis(1),
        bandwidth_bps: Some(1_000_000_000),
    };
    /// Same region, another zone: 20 ms, 200 Mbit/s.
    pub const REGION: LinkProfile = LinkProfile {
        rtt: Duration::from_millis(20),
        bandwidth_bps: Some(200_000_000),
    };
    /// Across a continent: 80 ms, 50 Mbit/s.
    pub const WAN: LinkProfile = LinkProfile {
        rtt: Duration::from_millis(80),
        bandwidth_bps: Some(50_000_000),
    };
    /// The named profiles, for help texts and parsing.
    pub const NAMED: [(&'static str, LinkProfile); 3] = [
        ("lan", Self::LAN),
        ("region", Self::REGION),
        ("wan", Self::WAN),
    ];
}

impl FromStr for LinkProfile {
    type Err = LinkError;

    /// A profile name: `lan`, `region` or `wan` (case-insensitive).
    fn from_str(s: &str) -> Result<Self, LinkError> {
        let name = s.trim().to_ascii_lowercase();
        Self::NAMED
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, p)| *p)
            .ok_or_else(|| LinkError::Parse {
                what: "profile",
                input: s.to_owned(),
                reason: "known profiles are lan (1ms, 1gbit), region (20ms, 200mbit), wan (80ms, 50mbit)".into(),
            })
    }
}

impl fmt::Display for LinkProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rtt {} ms, ", self.rtt.as_secs_f64() * 1e3)?;
        match self.bandwidth_bps {
            Some(b) => write!(f, "{} Mbit/s", b as f64 / 1e6),
            None => write!(f, "unlimited bandwidth"),
        }
    }
}

/// Splits `s` into a non-negative decimal number and its (lower-cased) unit suffix.
fn number_and_unit(s: &str) -> Option<(f64, String)> {
    let s = s.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(end);
    let value: f64 = num.parse().ok()?;
    (value.is_finite() && value >= 0.0).then(|| (value, unit.trim().to_ascii_lowercase()))
}

/// Parses a round-trip time: a number with an `ms` or `s` suffix (`20ms`, `0.5s`).
pub fn parse_rtt(s: &str) -> Result<Duration, LinkError> {
    let err = |reason: &str| LinkError::Parse {
        what: "RTT",
        input: s.to_owned(),
        reason: reason.to_owned(),
    };
    let (value, unit) = number_and_unit(s).ok_or_else(|| err("expected e.g. 20ms or 0.5s"))?;
    let secs = match unit.as_str() {
        "ms" => value / 1e3,
        "s" => value,
        _ => return Err(err("the unit must be ms or s (e.g. 20ms or 0.5s)")),
    };
    if secs > 60.0 {
        return Err(err("at most 60 s"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a connection idle timeout: a number with an `ms` or `s` suffix, more
/// than zero and at most an hour (`120s`).
pub fn parse_idle_timeout(s: &str) -> Result<Duration, LinkError> {
    let err = |reason: &str| LinkError::Parse {
        what: "idle timeout",
        input: s.to_owned(),
        reason: reason.to_owned(),
    };
    let (value, unit) = number_and_unit(s).ok_or_else(|| err("expected e.g. 120s"))?;
    let secs = match unit.as_str() {
        "ms" => value / 1e3,
        "s" => value,
        _ => return Err(err("the unit must be ms or s (e.g. 120s)")),
    };
    if secs <= 0.0 {
        return Err(err("must be more than zero"));
    }
    if secs > 3600.0 {
        return Err(err("at most 3600 s"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a bandwidth in bits per second: a number with a `kbit`, `mbit` or `gbit`
/// suffix (decimal multiples, as `tc` uses them): `200mbit`, `1.5gbit`.
pub fn parse_bandwidth(s: &str) -> Result<u64, LinkError> {
    let err = |reason: &str| LinkError::Parse {
        what: "bandwidth",
        input: s.to_owned(),
        reason: reason.to_owned(),
    };
    let (value, unit) =
        number_and_unit(s).ok_or_else(|| err("expected e.g. 200mbit, 1gbit or 500kbit"))?;
    let scale = match unit.as_str() {
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        _ => return Err(err("the unit must be kbit, mbit or gbit (e.g. 200mbit)")),
    };
    let bps = value * scale;
    if bps < 8.0 {
        return Err(err("at least 8 bit/s (one byte per second)"));
    }
    if bps > 1e12 {
        return Err(err("at most 1000gbit"));
    }
    Ok(bps as u64)
}

/// A bandwidth limit shared by many connections: a token bucket kept as the
/// theoretical time the link is next free (GCRA), which needs no refill task.
#[derive(Debug)]
pub struct TokenBucket {
    /// Seconds per byte.
    secs_per_byte: f64,
    /// How far ahead of the link's schedule a sender may run (the bucket depth).
    burst: Duration,
    next_free: Mutex<Option<Instant>>,
}

impl TokenBucket {
    /// A bucket of `bits_per_second`, `burst` bytes deep.
    pub fn new(bits_per_second: u64, burst: usize) -> TokenBucket {
        let bytes_per_second = (bits_per_second.max(8) as f64) / 8.0;
        TokenBucket {
            secs_per_byte: 1.0 / bytes_per_second,
            burst: Duration::from_secs_f64(burst as f64 / bytes_per_second),
            next_free: Mutex::new(None),
        }
    }

    /// Waits until `n` bytes may be sent. Grants are reserved in call order, so
    /// concurrent senders share the rate.
    pub async fn take(&self, n: usize) {
        let ready = {
            let now = Instant::now();
            // A poisoned lock only means another sender panicked mid-update; the
            // schedule in it is still a valid instant.
            let mut next = self.next_free.lock();
            let start = match *next {
                Some(t) if t > now => t,
                _ => now,
            };
            let end = start + Duration::from_secs_f64(n as f64 * self.secs_per_byte);
            *next = Some(end);
            end.checked_sub(self.burst).unwrap_or(now)
        };
        if ready > Instant::now() {
            tokio::time::sleep_until(ready.into()).await;
        }
    }
}

/// What [`RequestFramer::feed`] found in one buffer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Framing {
    /// Offsets in the buffer where a new request's first byte is.
    pub request_starts: Vec<usize>,
}

#[derive(Debug)]
enum FrameState {
    /// Between requests (tolerating blank lines, as servers do).
    Idle,
    /// Inside a request head; the bytes so far.
    Head(Vec<u8>),
    /// Inside a body of known length; bytes left.
    Body(u64),
    /// Reading a chunk-size line.
    ChunkSize(Vec<u8>),
    /// Inside chunk data; bytes left.
    ChunkData(u64),
    /// Expecting the CRLF after chunk data; how many of its bytes were seen.
    ChunkEnd(u8),
    /// Reading trailer lines after the last chunk; the current line.
    Trailer(Vec<u8>),
    /// Framing lost or given up (tunnel, bad input): bytes pass, no more boundaries.
    Opaque,
}

/// Finds request boundaries in the client-to-server byte stream of an HTTP/1.1
/// connection, incrementally, without holding bytes back.
#[derive(Debug)]
pub struct RequestFramer {
    state: FrameState,
}

impl Default for RequestFramer {
    fn default() -> Self {
        RequestFramer {
            state: FrameState::Idle,
        }
    }
}

/// How a request's body is framed, from its head.
#[derive(Debug, PartialEq, Eq)]
enum BodyKind {
    None,
    Length(u64),
    Chunked,
    /// Not HTTP framing we follow.
    Opaque,
}

fn parse_head(head: &[u8]) -> BodyKind {
    let Ok(text) = std::str::from_utf8(head) else {
        return BodyKind::Opaque;
    };
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let Some(request_line) = lines.next() else {
        return BodyKind::Opaque;
    };
    let mut parts = request_line.split(' ');
    let (Some(method), Some(_target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return BodyKind::Opaque;
    };
    if !version.starts_with("HTTP/1.") || method.eq_ignore_ascii_case("CONNECT") {
        return BodyKind::Opaque;
    }
    let mut length: Option<u64> = None;
    let mut chunked = false;
    for line in lines {
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            return BodyKind::Opaque;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            match value.parse::<u64>() {
                // Differing repeated lengths are a framing attack; stop framing.
                Ok(n) if length.is_none_or(|l| l == n) => length = Some(n),
                _ => return BodyKind::Opaque,
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked framing applies when chunked is the last coding.
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"));
            if !chunked {
                return BodyKind::Opaque;
            }
        } else if name.eq_ignore_ascii_case("upgrade") {
            return BodyKind::Opaque;
        }
    }
    match (chunked, length) {
        // Transfer-Encoding wins over Content-Length (RFC 9112 §6.3).
        (true, _) => BodyKind::Chunked,
        (false, Some(0)) | (false, None) => BodyKind::None,
        (false, Some(n)) => BodyKind::Length(n),
    }
}

/// Parses a chunk-size line (hex size, optional `;extensions`).
fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(line).ok()?;
    let size = text.split(';').next()?.trim();
    if size.is_empty() || size.len() > 15 {
        return None;
    }
    u64::from_str_radix(size, 16).ok()
}

/// Appends `b` to `line`; returns the line without its terminator once complete, or
/// `Err` when it grew past `max`.
fn push_line(line: &mut Vec<u8>, b: u8, max: usize) -> Result<Option<Vec<u8>>, ()> {
    if b == b'\n' {
        let mut done = std::mem::take(line);
        if done.last() == Some(&b'\r') {
            done.pop();
        }
        return Ok(Some(done));
    }
    if line.len() >= max {
        return Err(());
    }
    line.push(b);
    Ok(None)
}

impl RequestFramer {
    /// A framer at the start of a connection.
    pub fn new() -> RequestFramer {
        RequestFramer::default()
    }

    /// Whether framing was given up on this connection.
    pub fn is_opaque(&self) -> bool {
        matches!(self.state, FrameState::Opaque)
    }

    /// Consumes the next bytes of the stream and reports where requests begin.
    pub fn feed(&mut self, buf: &[u8]) -> Framing {
        let mut out = Framing::default();
        let mut i = 0;
        while i < buf.len() {
            match &mut self.state {
                FrameState::Opaque => break,
                FrameState::Idle => {
                    let b = buf[i];
                    if b != b'\r' && b != b'\n' {
                        out.request_starts.push(i);
                        self.state = FrameState::Head(Vec::with_capacity(512));
                        continue;
                    }
                    i += 1;
                }
                FrameState::Head(head) => {
                    head.push(buf[i]);
                    i += 1;
                    if head.ends_with(b"\r\n\r\n") || head.ends_with(b"\n\n") {
                        self.state = match parse_head(head) {
                            BodyKind::None => FrameState::Idle,
                            BodyKind::Length(n) => FrameState::Body(n),
                            BodyKind::Chunked => FrameState::ChunkSize(Vec::new()),
                            BodyKind::Opaque => FrameState::Opaque,
                        };
                    } else if head.len() >= MAX_HEAD {
                        self.state = FrameState::Opaque;
                    }
                }
                FrameState::Body(left) => {
                    let take = (*left).min((buf.len() - i) as u64);
                    *left -= take;
                    i += take as usize;
                    if *left == 0 {
                        self.state = FrameState::Idle;
                    }
                }
                FrameState::ChunkSize(line) => {
                    let b = buf[i];
                    i += 1;
                    self.state = match push_line(line, b, MAX_LINE) {
                        Ok(None) => continue,
                        Ok(Some(done)) => match parse_chunk_size(&done) {
                            Some(0) => FrameState::Trailer(Vec::new()),
                            Some(n) => FrameState::ChunkData(n),
                            None => FrameState::Opaque,
                        },
                        Err(()) => FrameState::Opaque,
                    };
                }
                FrameState::ChunkData(left) => {
                    let take = (*left).min((buf.len() - i) as u64);
                    *left -= take;
                    i += take as usize;
                    if *left == 0 {
                        self.state = FrameState::ChunkEnd(0);
                    }
                }
                FrameState::ChunkEnd(seen) => {
                    let b = buf[i];
                    i += 1;
                    self.state = match (*seen, b) {
                        (0, b'\r') => FrameState::ChunkEnd(1),
                        (0, b'\n') | (1, b'\n') => FrameState::ChunkSize(Vec::new()),
                        _ => FrameState::Opaque,
                    };
                }
                FrameState::Trailer(line) => {
                    let b = buf[i];
                    i += 1;
                    match push_line(line, b, MAX_LINE) {
                        Ok(None) => {}
                        Ok(Some(done)) if done.is_empty() => self.state = FrameState::Idle,
                        Ok(Some(_)) => {} // a trailer field; the next line continues
                        Err(()) => self.state = FrameState::Opaque,
                    }
                }
            }
        }
        out
    }
}

/// Configuration of a [`LinkEmulator`].
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Where to listen (loopback for benchmarks).
    pub listen: SocketAddr,
    /// The registry to forward to, as `host:port`.
    pub upstream: String,
    /// Latency and bandwidth.
    pub profile: LinkProfile,
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// A connection with no traffic in either direction for this long is closed.
    pub idle_timeout: Duration,
}

impl LinkConfig {
    /// A configuration with default limits (256 connections, 120 s idle timeout).
    pub fn new(listen: SocketAddr, upstream: impl Into<String>, profile: LinkProfile) -> Self {
        LinkConfig {
            listen,
            upstream: upstream.into(),
            profile,
            max_connections: 256,
            idle_timeout: Duration::from_secs(120),
        }
    }
}

/// A snapshot of the emulator's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkCounters {
    /// Client connections accepted.
    pub connections: u64,
    /// HTTP requests seen (framed) from clients.
    pub requests: u64,
    /// Bytes forwarded client → registry.
    pub bytes_up: u64,
    /// Bytes forwarded registry → client.
    pub bytes_down: u64,
    /// Connections that failed to reach the upstream.
    pub upstream_failures: u64,
    /// Connections closed for idleness.
    pub idle_closes: u64,
}

impl fmt::Display for LinkCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} connections, {} requests, {} bytes up, {} bytes down, {} upstream failures, {} idle closes",
            self.connections,
            self.requests,
            self.bytes_up,
            self.bytes_down,
            self.upstream_failures,
            self.idle_closes
        )
    }
}

/// Live counters, shared by the accept loop and the connections.
#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    requests: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    upstream_failures: AtomicU64,
    idle_closes: AtomicU64,
}

/// A handle to read an emulator's counters while it runs.
#[derive(Debug, Clone)]
pub struct CountersHandle(Arc<Counters>);

impl CountersHandle {
    /// The counters now.
    pub fn snapshot(&self) -> LinkCounters {
        let c = &self.0;
        LinkCounters {
            connections: c.connections.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
            bytes_up: c.bytes_up.load(Ordering::Relaxed),
            bytes_down: c.bytes_down.load(Ordering::Relaxed),
            upstream_failures: c.upstream_failures.load(Ordering::Relaxed),
            idle_closes: c.idle_closes.load(Ordering::Relaxed),
        }
    }
}

/// State shared by all connections of one emulator.
#[derive(Debug)]
struct Shared {
    config: LinkConfig,
    counters: Arc<Counters>,
    /// One bucket per direction: the link is full duplex.
    up: Option<TokenBucket>,
    down: Option<TokenBucket>,
}

/// The link emulator: a bound listener, ready to [`run`](LinkEmulator::run).
#[derive(Debug)]
pub struct LinkEmulator {
    listener: TcpListener,
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl LinkEmulator {
    /// Binds the listening socket.
    pub async fn bind(config: LinkConfig) -> Result<LinkEmulator, LinkError> {
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| LinkError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| LinkError::Bind {
            addr: config.listen,
            source,
        })?;
        // Depth: a few slices, so bursts stay short against the rate.
        let bucket = |bps| TokenBucket::new(bps, 2 * SLICE);
        let shared = Arc::new(Shared {
            up: config.profile.bandwidth_bps.map(bucket),
            down: config.profile.bandwidth_bps.map(bucket),
            counters: Arc::new(Counters::default()),
            config,
        });
        Ok(LinkEmulator {
            listener,
            addr,
            shared,
        })
    }

    /// The address it listens on (useful when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// A handle on the live counters.
    pub fn counters(&self) -> CountersHandle {
        CountersHandle(self.shared.counters.clone())
    }

    /// Serves connections until `shutdown` completes, then closes every connection
    /// and returns the final counters.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<LinkCounters, LinkError> {
        let permits = Arc::new(Semaphore::new(self.shared.config.max_connections.max(1)));
        let mut tasks = JoinSet::new();
        tokio::pin!(shutdown);
        let result = loop {
            // Reap finished connections so the set stays bounded.
            while tasks.try_join_next().is_some() {}
            let permit = tokio::select! {
                () = &mut shutdown => break Ok(()),
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break Ok(()),
                },
            };
            let accepted = tokio::select! {
                () = &mut shutdown => break Ok(()),
                a = self.listener.accept() => a,
            };
            match accepted {
                Ok((client, peer)) => {
                    self.shared
                        .counters
                        .connections
                        .fetch_add(1, Ordering::Relaxed);
                    let shared = self.shared.clone();
                    tasks.spawn(async move {
                        let _permit = permit;
                        serve_connection(shared, client, peer).await;
                    });
                }
                Err(e) if is_transient_accept_error(&e) => {
                    tracing::warn!(error = %e, "link emulator: accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(source) => {
                    break Err(LinkError::Accept {
                        addr: self.addr,
                        source,
                    })
                }
            }
        };
        tasks.shutdown().await;
        result.map(|()| self.counters().snapshot())
    }
}

fn is_transient_accept_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Why a direction of a connection stopped early.
#[derive(Debug)]
enum PumpError {
    Io(std::io::Error),
    Idle,
}

async fn serve_connection(shared: Arc<Shared>, client: TcpStream, peer: SocketAddr) {
    let rtt = shared.config.profile.rtt;
    // The TCP handshake to a remote registry costs one round trip.
    tokio::time::sleep(rtt).await;
    let upstream = match tokio::time::timeout(
        Duration::from_secs(10),
        TcpStream::connect(&shared.config.upstream),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            shared
                .counters
                .upstream_failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(upstream = %shared.config.upstream, error = %e, "link emulator: cannot connect to the upstream; closing the client connection");
            return;
        }
        Err(_) => {
            shared
                .counters
                .upstream_failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(upstream = %shared.config.upstream, "link emulator: connecting to the upstream timed out; closing the client connection");
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_r, client_w) = client.into_split();
    let (up_r, up_w) = upstream.into_split();
    let conn = Conn {
        shared: shared.clone(),
        forwarded_requests: AtomicU64::new(0),
        last_activity_ms: AtomicU64::new(0),
        opened: Instant::now(),
    };
    let result = tokio::try_join!(
        conn.requests(client_r, up_w),
        conn.responses(up_r, client_w)
    );
    match result {
        Ok(_) => tracing::debug!(%peer, "link emulator: connection closed"),
        Err(PumpError::Idle) => {
            shared.counters.idle_closes.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "link emulator: idle connection closed");
        }
        Err(PumpError::Io(e)) => {
            tracing::debug!(%peer, error = %e, "link emulator: connection ended")
        }
    }
}

/// One proxied connection's shared state between its two directions.
struct Conn {
    shared: Arc<Shared>,
    /// Requests whose first bytes were forwarded upstream.
    forwarded_requests: AtomicU64,
    /// Milliseconds since `opened` of the last byte in either direction.
    last_activity_ms: AtomicU64,
    opened: Instant,
}

impl Conn {
    fn touch(&self) {
        let ms = self.opened.elapsed().as_millis() as u64;
        self.last_activity_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Reads the next bytes, closing the connection once neither direction has moved
    /// for the idle timeout.
    async fn read<R: AsyncRead + Unpin>(
        &self,
        r: &mut R,
        buf: &mut [u8],
    ) -> Result<usize, PumpError> {
        let idle = self.shared.config.idle_timeout;
        loop {
            match tokio::time::timeout(idle, r.read(buf)).await {
                Ok(Ok(n)) => {
                    self.touch();
                    return Ok(n);
                }
                Ok(Err(e)) => return Err(PumpError::Io(e)),
                Err(_) => {
                    let last = Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed));
                    if self.opened.elapsed().saturating_sub(last) >= idle {
                        return Err(PumpError::Idle);
                    }
                }
            }
        }
    }

    /// Writes `data` through the direction's bandwidth limit, in slices.
    async fn send<W: AsyncWrite + Unpin>(
        &self,
        w: &mut W,
        data: &[u8],
        bucket: Option<&TokenBucket>,
        counter: &AtomicU64,
    ) -> Result<(), PumpError> {
        for slice in data.chunks(SLICE) {
            if let Some(b) = bucket {
                b.take(slice.len()).await;
            }
            w.write_all(slice).await.map_err(PumpError::Io)?;
            counter.fetch_add(slice.len() as u64, Ordering::Relaxed);
            self.touch();
        }
        Ok(())
    }

    /// Client → registry: holds each request's first bytes for RTT/2.
    async fn requests<R, W>(&self, mut r: R, mut w: W) -> Result<(), PumpError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let half = self.shared.config.profile.rtt / 2;
        let counters = &self.shared.counters;
        let mut framer = RequestFramer::new();
        let mut buf = vec![0u8; SLICE];
        loop {
            let n = self.read(&mut r, &mut buf).await?;
            if n == 0 {
                // The client finished sending; let the registry see it too.
                let _ = w.shutdown().await;
                return Ok(());
            }
            let data = &buf[..n];
            let framing = framer.feed(data);
            let mut from = 0;
            for &start in &framing.request_starts {
                self.send(
                    &mut w,
                    &data[from..start],
                    self.shared.up.as_ref(),
                    &counters.bytes_up,
                )
                .await?;
                tokio::time::sleep(half).await;
                counters.requests.fetch_add(1, Ordering::Relaxed);
                self.forwarded_requests.fetch_add(1, Ordering::Release);
                from = start;
            }
            self.send(
                &mut w,
                &data[from..],
                self.shared.up.as_ref(),
                &counters.bytes_up,
            )
            .await?;
        }
    }

    /// Registry → client: holds the first bytes answering each request for RTT/2.
    async fn responses<R, W>(&self, mut r: R, mut w: W) -> Result<(), PumpError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let half = self.shared.config.profile.rtt / 2;
        let counters = &self.shared.counters;
        let mut answered = 0u64;
        let mut buf = vec![0u8; SLICE];
        loop {
            let n = self.read(&mut r, &mut buf).await?;
            if n == 0 {
                let _ = w.shutdown().await;
                return Ok(());
            }
            let forwarded = self.forwarded_requests.load(Ordering::Acquire);
            if forwarded > answered {
                tokio::time::sleep(half).await;
                answered = forwarded;
            }
            self.send(
                &mut w,
                &buf[..n],
                self.shared.down.as_ref(),
                &counters.bytes_down,
            )
            .await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_parse_by_name() {
        assert_eq!("lan".parse::<LinkProfile>().unwrap(), LinkProfile::LAN);
        assert_eq!(
            "Region".parse::<LinkProfile>().unwrap(),
            LinkProfile::REGION
        );
        let wan: LinkProfile = "wan".parse().unwrap();
        assert_eq!(wan.rtt, Duration::from_millis(80));
        assert_eq!(wan.bandwidth_bps, Some(50_000_000));
        assert_eq!(LinkProfile::REGION.rtt, Duration::from_millis(20));
        assert_eq!(LinkProfile::LAN.bandwidth_bps, Some(1_000_000_000));
        let err = "moon".parse::<LinkProfile>().unwrap_err().to_string();
        assert!(err.contains("moon") && err.contains("region"), "{err}");
    }

    #[test]
    fn rtt_strings() {
        assert_eq!(parse_rtt("20ms").unwrap(), Duration::from_millis(20));
        assert_eq!(parse_rtt("0.5s").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_rtt(" 1 s ").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_rtt("0ms").unwrap(), Duration::ZERO);
        assert_eq!(parse_rtt("2.5ms").unwrap(), Duration::from_micros(2500));
        for bad in ["20", "ms", "20us", "-1ms", "1.2.3ms", "", "61s", "1e3ms"] {
            assert!(parse_rtt(bad).is_err(), "{bad:?} should be rejected");
        }
        assert_eq!(
            parse_idle_timeout("120s").unwrap(),
            Duration::from_secs(120)
        );
        for bad in ["0s", "0ms", "2h", "3601s", "x"] {
            assert!(
                parse_idle_timeout(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn bandwidth_strings() {
        assert_eq!(parse_bandwidth("200mbit").unwrap(), 200_000_000);
        assert_eq!(parse_bandwidth("1gbit").unwrap(), 1_000_000_000);
        assert_eq!(parse_bandwidth("500kbit").unwrap(), 500_000);
        assert_eq!(parse_bandwidth("1.5Gbit").unwrap(), 1_500_000_000);
        assert_eq!(parse_bandwidth("16mbit").unwrap(), 16_000_000);
        for bad in ["200", "200mb", "mbit", "0mbit", "-5mbit", "2000gbit", ""] {
            assert!(parse_bandwidth(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    /// Feeds `stream` in pieces of `step` bytes; returns request starts as absolute
    /// offsets.
    fn starts(stream: &[u8], step: usize) -> (Vec<usize>, bool) {
        let mut f = RequestFramer::new();
        let mut out = Vec::new();
        for (k, piece) in stream.chunks(step).enumerate() {
            out.extend(f.feed(piece).request_starts.iter().map(|s| s + k * step));
        }
        (out, f.is_opaque())
    }

    fn check_all_steps(stream: &[u8], expected: &[usize]) {
        for step in [1, 2, 3, 7, 64, stream.len()] {
            let (got, opaque) = starts(stream, step);
            assert_eq!(got, expected, "step {step}");
            assert!(!opaque, "step {step}");
        }
    }

    #[test]
    fn framer_finds_gets_and_heads_without_bodies() {
        let a = b"GET /v2/r/blobs/sha256:aa HTTP/1.1\r\nHost: x\r\nRange: bytes=0-99\r\n\r\n";
        let b = b"HEAD /v2/r/manifests/t HTTP/1.1\r\nHost: x\r\n\r\n";
        let stream = [&a[..], &b[..], &a[..]].concat();
        check_all_steps(&stream, &[0, a.len(), a.len() + b.len()]);
    }

    #[test]
    fn framer_skips_content_length_bodies_that_look_like_requests() {
        let body = b"GET /fake HTTP/1.1\r\n\r\n";
        let a = format!(
            "PUT /v2/r/blobs/uploads/u?digest=x HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let b = b"GET /v2/ HTTP/1.1\r\n\r\n";
        let stream = [a.as_bytes(), &body[..], &b[..]].concat();
        check_all_steps(&stream, &[0, a.len() + body.len()]);
    }

    #[test]
    fn framer_follows_chunked_bodies_with_extensions_and_trailers() {
        let head = b"PATCH /v2/r/blobs/uploads/u HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let body =
            b"5;ext=1\r\nGET /\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Trailer: y\r\n\r\n";
        let next = b"POST /v2/r/blobs/uploads/ HTTP/1.1\r\nContent-Length: 0\r\n\r\n";
        let stream = [&head[..], &body[..], &next[..], &next[..]].concat();
        let second = head.len() + body.len();
        check_all_steps(&stream, &[0, second, second + next.len()]);
    }

    #[test]
    fn framer_tolerates_blank_lines_between_requests() {
        let a = b"GET / HTTP/1.1\r\n\r\n";
        let stream = [&a[..], b"\r\n", &a[..]].concat();
        check_all_steps(&stream, &[0, a.len() + 2]);
    }

    #[test]
    fn framer_gives_up_on_input_it_cannot_frame() {
        let cases: [&[u8]; 6] = [
            b"CONNECT host:443 HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            b"PUT / HTTP/1.1\r\nContent-Length: nope\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx",
            b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\naXX",
        ];
        for case in cases {
            let (got, opaque) = starts(case, 1);
            assert_eq!(got, vec![0], "{}", String::from_utf8_lossy(case));
            assert!(opaque, "{}", String::from_utf8_lossy(case));
        }
        // An endless head is bounded.
        let mut f = RequestFramer::new();
        let line = b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
        f.feed(b"GET / HTTP/1.1\r\n");
        for _ in 0..(MAX_HEAD / line.len() + 1) {
            f.feed(line);
        }
        assert!(f.is_opaque());
    }

    #[tokio::test]
    async fn token_bucket_paces_to_the_rate() {
        // 800 kbit/s = 100 kB/s; 30 kB past the burst takes >= 0.3 s.
        let bucket = TokenBucket::new(800_000, 1000);
        let t = Instant::now();
        for _ in 0..31 {
            bucket.take(1000).await;
        }
        assert!(
            t.elapsed() >= Duration::from_millis(290),
            "{:?}",
            t.elapsed()
        );
    }
}
