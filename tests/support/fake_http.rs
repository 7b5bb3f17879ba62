//! A scripted HTTP/1.1 server on 127.0.0.1 for behaviour real registries do not show
//! on demand: short bodies, wrong ranges, 5xx then success, token challenges.
//!
//! It is a real HTTP peer over TCP (the client's whole stack runs), answering each
//! request with whatever the test's handler returns. Bounded: headers up to 64 KiB,
//! request bodies up to 64 MiB; the accept loop ends when the server is dropped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A request as received.
#[derive(Debug, Clone)]
pub struct Request {
    /// `GET`, `HEAD`, ...
    pub method: String,
    /// Path with query string.
    pub path: String,
    /// Headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Request {
    /// The first header called `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The path without query.
    pub fn path_only(&self) -> &str {
        self.path.split('?').next().unwrap_or("")
    }

    /// The values of query parameter `name`.
    pub fn query(&self, name: &str) -> Vec<String> {
        let q = self.path.split_once('?').map(|(_, q)| q).unwrap_or("");
        url_params(q, name)
    }

    /// The values of field `name` of a form-encoded body.
    pub fn form(&self, name: &str) -> Vec<String> {
        url_params(&String::from_utf8_lossy(&self.body), name)
    }
}

fn url_params(q: &str, name: &str) -> Vec<String> {
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| *k == name)
        .map(|(_, v)| percent_decode(v))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A response body.
#[derive(Debug, Clone)]
pub enum Body {
    /// These bytes.
    Bytes(Vec<u8>),
    /// `chunk` repeated until `total` bytes (large bodies without the memory).
    Repeat { chunk: Vec<u8>, total: u64 },
}

impl Body {
    fn len(&self) -> u64 {
        match self {
            Body::Bytes(b) => b.len() as u64,
            Body::Repeat { total, .. } => *total,
        }
    }
}

/// A scripted response.
#[derive(Debug, Clone)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// Headers (Content-Length is added unless `content_length` is set).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Body,
    /// Announce this Content-Length instead of the body's length.
    pub content_length: Option<u64>,
    /// Send only this many body bytes, then close the connection.
    pub truncate_at: Option<u64>,
    /// Wait this long before answering.
    pub delay: Option<Duration>,
}

impl Response {
    /// An empty response with `status`.
    pub fn new(status: u16) -> Self {
        Response {
            status,
            headers: Vec::new(),
            body: Body::Bytes(Vec::new()),
            content_length: None,
            truncate_at: None,
            delay: None,
        }
    }

    /// Adds a header.
    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, b: impl Into<Vec<u8>>) -> Self {
        self.body = Body::Bytes(b.into());
        self
    }

    /// A registry-style JSON error.
    pub fn error(status: u16, code: &str, message: &str) -> Self {
        Response::new(status)
            .header("Content-Type", "application/json")
            .body(format!(
                r#"{{"errors":[{{"code":"{code}","message":"{message}"}}]}}"#
            ))
    }
}

type Handler = dyn Fn(&Request) -> Response + Send + Sync;

/// The running server.
pub struct FakeServer {
    /// Its address on 127.0.0.1.
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Request>>>,
    /// Body bytes successfully written to sockets so far.
    pub body_bytes_written: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeServer {
    /// Starts serving with `handler` (called once per request, in arrival order).
    pub async fn start<H>(handler: H) -> FakeServer
    where
        H: Fn(&Request) -> Response + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let written = Arc::new(AtomicU64::new(0));
        let handler: Arc<Handler> = Arc::new(handler);
        let (reqs, wr) = (requests.clone(), written.clone());
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let (h, r, w) = (handler.clone(), reqs.clone(), wr.clone());
                tokio::spawn(async move {
                    let _ = serve_conn(sock, h, r, w).await;
                });
            }
        });
        FakeServer {
            addr,
            requests,
            body_bytes_written: written,
            task,
        }
    }

    /// `127.0.0.1:<port>`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_request(sock: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Option<Request>> {
    let end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        if buf.len() > 64 << 10 {
            return Err(std::io::Error::other("request headers too long"));
        }
        let mut tmp = [0u8; 8192];
        let n = tokio::time::timeout(Duration::from_secs(30), sock.read(&mut tmp))
            .await
            .map_err(|_| std::io::Error::other("idle connection"))??;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end + 4);
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let method = first.next().unwrap_or("").to_string();
    let path = first.next().unwrap_or("").to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    if len > 64 << 20 {
        return Err(std::io::Error::other("request body too long"));
    }
    while buf.len() < len {
        let mut tmp = vec![0u8; 64 << 10];
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    let body: Vec<u8> = buf.drain(..len).collect();
    Ok(Some(Request {
        method,
        path,
        headers,
        body,
    }))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        206 => "Partial Content",
        401 => "Unauthorized",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

async fn serve_conn(
    mut sock: TcpStream,
    handler: Arc<Handler>,
    requests: Arc<Mutex<Vec<Request>>>,
    written: Arc<AtomicU64>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    while let Some(req) = read_request(&mut sock, &mut buf).await? {
        let resp = handler(&req);
        if let Some(d) = resp.delay {
            tokio::time::sleep(d).await;
        }
        let is_head = req.method == "HEAD";
        if let Ok(mut r) = requests.lock() {
            r.push(req);
        }
        let mut head = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
        for (k, v) in &resp.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        let announced = resp.content_length.unwrap_or(resp.body.len());
        head.push_str(&format!("Content-Length: {announced}\r\n\r\n"));
        sock.write_all(head.as_bytes()).await?;
        if !is_head {
            let limit = resp.truncate_at.unwrap_or(u64::MAX).min(resp.body.len());
            let mut sent = 0u64;
            match &resp.body {
                Body::Bytes(b) => {
                    sock.write_all(&b[..limit as usize]).await?;
                    sent = limit;
                }
                Body::Repeat { chunk, .. } => {
                    while sent < limit {
                        let n = (limit - sent).min(chunk.len() as u64) as usize;
                        sock.write_all(&chunk[..n]).await?;
                        sent += n as u64;
                        written.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            }
            if matches!(resp.body, Body::Bytes(_)) {
                written.fetch_add(sent, Ordering::Relaxed);
            }
        }
        sock.flush().await?;
        if resp.truncate_at.is_some() || (!is_head && announced != resp.body.len()) {
            // The body does not match what was announced: the connection is unusable.
            sock.shutdown().await?;
            return Ok(());
        }
    }
    Ok(())
}
