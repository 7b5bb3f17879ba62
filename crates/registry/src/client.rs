//! The client core: endpoints per registry, HTTP clients per TLS setting, one request
//! with authentication, and the retry loop.
//!
//! Each request goes through [`RegistryClient::execute`], which authenticates (and
//! re-authenticates once on 401) and classifies failures as transient (connection
//! errors, timeouts, 429, 5xx, truncated bodies) or final; [`RegistryClient::retrying`]
//! repeats transient failures with backoff. Operations that span several endpoints
//! (mirrors, then the server) go through [`RegistryClient::on_endpoints`].

use parking_lot::Mutex;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, Url};

use super::auth::{self, AuthState, HostScheme, IssuedToken};
use super::config::{Capabilities, EndpointOptions, HostConfig, RegistryConfig};
use super::credentials::{Credential, CredentialSource, DockerCredentials};
use super::error::{ApiErrors, ErrorKind, RegistryError};
use super::stats::{Counters, RegistryStats, RequestKind};
use zest_oci::Repository;

/// Largest error or token body read into memory.
const MAX_SMALL_BODY: u64 = 1 << 20;
/// How much of an error body is kept for the registry's error JSON.
const MAX_ERROR_BODY: u64 = 64 << 10;

/// What an operation needs an endpoint to allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cap {
    Pull,
    Resolve,
    Push,
}

impl Cap {
    fn allowed_by(self, c: &Capabilities) -> bool {
        match self {
            Cap::Pull => c.pull,
            Cap::Resolve => c.resolve,
            Cap::Push => c.push,
        }
    }
}

/// One place to send requests for a registry: a mirror or the upstream server.
#[derive(Debug)]
pub(crate) struct Endpoint {
    /// `host[:port]` of the endpoint (auth state and credential key).
    pub host: String,
    /// The registry this endpoint serves (`docker.io`, `localhost:5000`).
    pub registry: String,
    /// API root without trailing slash, e.g. `https://host:5000/v2`.
    pub api_root: String,
    pub client: reqwest::Client,
    pub caps: Capabilities,
    pub headers: HeaderMap,
    pub mirror: bool,
    pub plain_http: bool,
}

impl Endpoint {
    /// `<api_root>/<name>/<rest>`.
    pub fn url(&self, repo: &Repository, rest: &str) -> String {
        format!("{}/{}/{rest}", self.api_root, repo.name)
    }

    /// Resolves a `Location` header (absolute or relative) against this endpoint.
    pub fn resolve_location(&self, location: &str) -> Option<Url> {
        let base = Url::parse(&self.api_root).ok()?;
        base.join(location).ok()
    }
}

/// Error context: which endpoint, repository and operation.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    pub host: String,
    pub repository: String,
    pub what: String,
}

impl Ctx {
    pub fn new(ep: &Endpoint, repo: &Repository, what: impl Into<String>) -> Self {
        Ctx {
            host: ep.host.clone(),
            repository: repo.name.clone(),
            what: what.into(),
        }
    }

    pub fn not_found(&self, errors: ApiErrors) -> RegistryError {
        RegistryError::NotFound {
            host: self.host.clone(),
            repository: self.repository.clone(),
            what: self.what.clone(),
            errors,
        }
    }

    pub fn status(&self, status: u16, errors: ApiErrors) -> RegistryError {
        RegistryError::Status {
            host: self.host.clone(),
            repository: self.repository.clone(),
            what: self.what.clone(),
            status,
            errors,
        }
    }

    pub fn protocol(&self, detail: impl Into<String>) -> RegistryError {
        RegistryError::Protocol {
            host: self.host.clone(),
            repository: self.repository.clone(),
            what: self.what.clone(),
            detail: detail.into(),
        }
    }

    pub fn interrupted(&self, detail: impl Into<String>) -> RegistryError {
        RegistryError::Interrupted {
            host: self.host.clone(),
            repository: self.repository.clone(),
            what: self.what.clone(),
            detail: detail.into(),
        }
    }

    pub fn too_large(&self, limit: u64) -> RegistryError {
        RegistryError::TooLarge {
            host: self.host.clone(),
            repository: self.repository.clone(),
            what: self.what.clone(),
            limit,
        }
    }

    pub fn timeout(&self, timeout: Duration) -> RegistryError {
        RegistryError::Timeout {
            host: self.host.clone(),
            repository: self.repository.clone(),
            what: self.what.clone(),
            timeout,
        }
    }

    /// The error for an unexpected final status with its body.
    pub fn status_error(&self, status: u16, body: &[u8]) -> RegistryError {
        let errors = ApiErrors::parse(body);
        match status {
            404 => self.not_found(errors),
            _ => self.status(status, errors),
        }
    }
}

/// The outcome of one attempt.
pub(crate) enum Failure {
    /// Worth another attempt (after the delay the server asked for, if any).
    Transient(RegistryError, Option<Duration>),
    /// Final.
    Fatal(RegistryError),
}

impl From<RegistryError> for Failure {
    fn from(e: RegistryError) -> Self {
        Failure::Fatal(e)
    }
}

/// A request body that can be rebuilt for every attempt.
#[derive(Debug, Clone)]
pub(crate) enum ReqBody {
    Empty,
    Bytes(Bytes),
    /// `len` bytes of `path` from `offset`, streamed.
    File {
        path: PathBuf,
        offset: u64,
        len: u64,
    },
}

impl ReqBody {
    pub fn len(&self) -> u64 {
        match self {
            ReqBody::Empty => 0,
            ReqBody::Bytes(b) => b.len() as u64,
            ReqBody::File { len, .. } => *len,
        }
    }
}

/// One request to an endpoint.
pub(crate) struct Req<'a> {
    pub kind: RequestKind,
    pub method: Method,
    pub url: String,
    pub headers: HeaderMap,
    pub body: ReqBody,
    /// Space-separated token scopes.
    pub scope: &'a str,
    pub ctx: &'a Ctx,
    /// Time allowed until response headers.
    pub timeout: Duration,
    /// Whether [`RegistryClient::exchange`] may repeat it.
    pub retry: bool,
}

impl<'a> Req<'a> {
    pub fn new(
        kind: RequestKind,
        method: Method,
        url: String,
        scope: &'a str,
        ctx: &'a Ctx,
        timeout: Duration,
    ) -> Self {
        Req {
            kind,
            method,
            url,
            headers: HeaderMap::new(),
            body: ReqBody::Empty,
            scope,
            ctx,
            timeout,
            retry: true,
        }
    }

    pub fn header(mut self, name: HeaderName, value: &str) -> Self {
        if let Ok(v) = HeaderValue::from_str(value) {
            self.headers.insert(name, v);
        }
        self
    }
}

/// A complete small response.
#[derive(Debug)]
pub(crate) struct Exchange {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Exchange {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Reads a header as text.
pub(crate) fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// `Content-Length` from the headers (a HEAD response's body is empty, so the header,
/// not the body's size, is what counts).
pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    header_str(headers, "content-length").and_then(|v| v.parse().ok())
}

/// `Retry-After` as seconds or an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = header_str(headers, "retry-after")?;
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let delta = when.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(delta.to_std().unwrap_or(Duration::ZERO))
}

/// The error chain of a transport error, one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    let mut depth = 0;
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
        depth += 1;
        if depth > 8 {
            break;
        }
    }
    s
}

fn connect_error(ep: &Endpoint, url: &str, e: &reqwest::Error) -> RegistryError {
    let detail = chain(e);
    let lower = detail.to_ascii_lowercase();
    let hint = if !ep.plain_http
        && (lower.contains("invalidcontenttype")
            || lower.contains("corrupt message")
            || lower.contains("wrong version number")
            || lower.contains("http/1.1 400"))
    {
        "; the registry seems to speak plain HTTP: use --plain-http for it (or an http:// server in its hosts.toml)"
    } else if lower.contains("certificate") || lower.contains("unknownissuer") {
        "; its TLS certificate is not trusted: add its CA (`ca` in hosts.toml or the extra CA file), or for a test registry only set skip_verify"
    } else if lower.contains("refused") {
        "; nothing listens there: check the registry address and that it is running"
    } else {
        "; check the registry address, DNS and network"
    };
    RegistryError::Connect {
        host: ep.host.clone(),
        url: url.split('?').next().unwrap_or(url).to_string(),
        detail,
        hint,
    }
}

/// Streams `len` bytes of a file from `offset`, counting them as uploaded.
fn file_body(path: PathBuf, offset: u64, len: u64, stats: Arc<Inner>) -> reqwest::Body {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    struct St {
        file: Option<tokio::fs::File>,
        path: PathBuf,
        offset: u64,
        left: u64,
        inner: Arc<Inner>,
    }
    let st = St {
        file: None,
        path,
        offset,
        left: len,
        inner: stats,
    };
    let stream = futures::stream::try_unfold(st, |mut st| async move {
        if st.left == 0 {
            return Ok(None);
        }
        if st.file.is_none() {
            let mut f = tokio::fs::File::open(&st.path).await?;
            f.seek(std::io::SeekFrom::Start(st.offset)).await?;
            st.file = Some(f);
        }
        let want = st.left.min(256 * 1024) as usize;
        let mut buf = vec![0u8; want];
        let n = match st.file.as_mut() {
            Some(f) => f.read(&mut buf).await?,
            None => 0,
        };
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "{} ended {} bytes early (changed while uploading?)",
                    st.path.display(),
                    st.left
                ),
            ));
        }
        buf.truncate(n);
        st.left -= n as u64;
        st.inner.stats.bytes(RequestKind::Upload, n as u64);
        Ok::<_, std::io::Error>(Some((Bytes::from(buf), st)))
    });
    reqwest::Body::wrap_stream(stream)
}

type TlsKey = (bool, Vec<PathBuf>);

pub(crate) struct Inner {
    pub config: RegistryConfig,
    default_client: reqwest::Client,
    extra_roots: Vec<reqwest::Certificate>,
    tls_clients: Mutex<HashMap<TlsKey, reqwest::Client>>,
    plans: Mutex<HashMap<String, Arc<[Arc<Endpoint>]>>>,
    pub auth: AuthState,
    pub stats: Counters,
}

/// An OCI distribution (registry v2) client. Cheap to clone; clones share
/// connections, tokens and counters.
#[derive(Clone)]
pub struct RegistryClient {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient").finish_non_exhaustive()
    }
}

fn read_certs(path: &PathBuf) -> Result<Vec<reqwest::Certificate>, RegistryError> {
    let pem = std::fs::read(path).map_err(|source| RegistryError::Io {
        op: "read CA file",
        path: path.clone(),
        source,
    })?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| RegistryError::Config {
        path: path.clone(),
        detail: format!("not a PEM certificate bundle: {e}"),
    })?;
    if certs.is_empty() {
        return Err(RegistryError::Config {
            path: path.clone(),
            detail: "no PEM certificate in file".into(),
        });
    }
    Ok(certs)
}

impl RegistryClient {
    /// A client with `config`; reads the Docker config and CA files now, so that
    /// configuration mistakes surface at start, not at the first pull.
    pub fn new(config: RegistryConfig) -> Result<Self, RegistryError> {
        let creds = DockerCredentials::load(&config.docker_config)?;
        Self::with_credentials(config, creds)
    }

    /// A client that asks `source` for credentials before the Docker config file
    /// (which is read now, as [`RegistryClient::new`] does).
    pub fn with_credential_source(
        config: RegistryConfig,
        source: Arc<dyn CredentialSource>,
    ) -> Result<Self, RegistryError> {
        let creds = DockerCredentials::load(&config.docker_config)?;
        Self::build(config, creds, Some(source))
    }

    /// A client with explicit credentials instead of a Docker config file.
    pub fn with_credentials(
        config: RegistryConfig,
        creds: DockerCredentials,
    ) -> Result<Self, RegistryError> {
        Self::build(config, creds, None)
    }

    fn build(
        config: RegistryConfig,
        creds: DockerCredentials,
        source: Option<Arc<dyn CredentialSource>>,
    ) -> Result<Self, RegistryError> {
        let extra_roots = match &config.extra_ca_file {
            Some(p) => read_certs(p)?,
            None => Vec::new(),
        };
        let default_client = build_http_client(&config, &extra_roots, false)?;
        let helper_timeout = config.credential_helper_timeout;
        Ok(RegistryClient {
            inner: Arc::new(Inner {
                config,
                default_client,
                extra_roots,
                tls_clients: Mutex::new(HashMap::new()),
                plans: Mutex::new(HashMap::new()),
                auth: AuthState::new(creds, source, helper_timeout),
                stats: Counters::default(),
            }),
        })
    }

    /// The client's configuration.
    pub fn config(&self) -> &RegistryConfig {
        &self.inner.config
    }

    /// Request and byte counters since the client was made.
    pub fn stats(&self) -> RegistryStats {
        self.inner.stats.snapshot()
    }

    fn http_client_for(&self, opts: &EndpointOptions) -> Result<reqwest::Client, RegistryError> {
        if !opts.skip_verify && opts.ca.is_empty() {
            return Ok(self.inner.default_client.clone());
        }
        let key: TlsKey = (opts.skip_verify, opts.ca.clone());
        if let Some(c) = self.inner.tls_clients.lock().get(&key) {
            return Ok(c.clone());
        }
        let mut roots = self.inner.extra_roots.clone();
        for p in &opts.ca {
            roots.extend(read_certs(p)?);
        }
        let client = build_http_client(&self.inner.config, &roots, opts.skip_verify)?;
        self.inner.tls_clients.lock().insert(key, client.clone());
        Ok(client)
    }

    fn make_endpoint(
        &self,
        registry: &str,
        url: &str,
        opts: &EndpointOptions,
        mirror: bool,
        source: &str,
    ) -> Result<Arc<Endpoint>, RegistryError> {
        let cfg_err = |detail: String| RegistryError::Config {
            path: PathBuf::from(source),
            detail,
        };
        let parsed =
            Url::parse(url).map_err(|e| cfg_err(format!("bad endpoint URL {url:?}: {e}")))?;
        let plain_http = match parsed.scheme() {
            "http" => true,
            "https" => false,
            other => {
                return Err(cfg_err(format!(
                    "endpoint {url:?}: unsupported scheme {other:?}"
                )))
            }
        };
        let host_name = parsed
            .host_str()
            .ok_or_else(|| cfg_err(format!("endpoint {url:?} has no host")))?;
        let host = match parsed.port() {
            Some(p) => format!("{host_name}:{p}"),
            None => host_name.to_string(),
        };
        let path = parsed.path().trim_end_matches('/');
        let path = if opts.override_path || path.ends_with("/v2") {
            path.to_string()
        } else {
            format!("{path}/v2")
        };
        let mut origin = format!("{}://{}", parsed.scheme(), host_name);
        if let Some(p) = parsed.port() {
            origin.push_str(&format!(":{p}"));
        }
        let mut headers = HeaderMap::new();
        for (k, v) in &opts.headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| cfg_err(format!("bad header name {k:?}")))?;
            let value = HeaderValue::from_str(v)
                .map_err(|_| cfg_err(format!("bad value for header {k:?}")))?;
            headers.append(name, value);
        }
        Ok(Arc::new(Endpoint {
            host,
            registry: registry.to_string(),
            api_root: format!("{origin}{path}"),
            client: self.http_client_for(opts)?,
            caps: opts.capabilities,
            headers,
            mirror,
            plain_http,
        }))
    }

    /// The endpoints of `repo`'s registry, mirrors first (cached per registry).
    pub(crate) fn endpoints(
        &self,
        repo: &Repository,
    ) -> Result<Arc<[Arc<Endpoint>]>, RegistryError> {
        let registry = repo.registry.as_str();
        if let Some(p) = self.inner.plans.lock().get(registry) {
            return Ok(p.clone());
        }
        let cfg = &self.inner.config;
        let (host_cfg, source) = match cfg.hosts.get(registry) {
            Some(h) => (Some(h.clone()), "registry configuration".to_string()),
            None => match &cfg.hosts_dir {
                Some(dir) => (
                    HostConfig::load(dir, registry)?,
                    dir.join(registry).join("hosts.toml").display().to_string(),
                ),
                None => (None, String::new()),
            },
        };
        let host_cfg = host_cfg.unwrap_or_default();
        let mut eps = Vec::new();
        for m in &host_cfg.mirrors {
            eps.push(self.make_endpoint(registry, &m.url, &m.options, true, &source)?);
        }
        let server = match &host_cfg.server {
            Some(s) => s.clone(),
            None => {
                let endpoint_host = repo.endpoint_host();
                let plain =
                    cfg.plain_http.applies_to(registry) || cfg.plain_http.applies_to(endpoint_host);
                format!("{}://{endpoint_host}", if plain { "http" } else { "https" })
            }
        };
        eps.push(self.make_endpoint(
            registry,
            &server,
            &host_cfg.server_options,
            false,
            &source,
        )?);
        let plan: Arc<[Arc<Endpoint>]> = eps.into();
        self.inner
            .plans
            .lock()
            .insert(registry.to_string(), plan.clone());
        Ok(plan)
    }

    /// Runs `op` on each endpoint allowing `cap`, in order, until one succeeds or fails
    /// in a way another endpoint cannot fix.
    pub(crate) async fn on_endpoints<T, F, Fut>(
        &self,
        repo: &Repository,
        cap: Cap,
        op: F,
    ) -> Result<T, RegistryError>
    where
        F: Fn(Arc<Endpoint>) -> Fut,
        Fut: Future<Output = Result<T, RegistryError>>,
    {
        let eps: Vec<Arc<Endpoint>> = self
            .endpoints(repo)?
            .iter()
            .filter(|e| cap.allowed_by(&e.caps))
            .cloned()
            .collect();
        let n = eps.len();
        let mut last = RegistryError::InvalidArgument(format!(
            "no configured endpoint of registry {} allows {cap:?} (check capabilities in its hosts.toml)",
            repo.registry
        ));
        for (i, ep) in eps.into_iter().enumerate() {
            let host = ep.host.clone();
            match op(ep).await {
                Err(e) if i + 1 < n && e.allows_fallback() => {
                    tracing::warn!(endpoint = %host, kind = e.kind().label(), error = %e, "registry endpoint failed, trying the next one");
                    last = e;
                }
                r => return r,
            }
        }
        Err(last)
    }

    /// Opens up to `connections` connections (at most 16) to the endpoint that
    /// serves reads of `repo`, ahead of the reads: each new connection costs a
    /// round trip (more with TLS) that a read waiting on it would pay. One
    /// `GET /v2/` per connection, at once (the API check every registry
    /// answers, 200 or 401, without a token); answers are read to their end so
    /// that the connections stay pooled, failures are ignored: the reads that
    /// follow open what they need as before. Bounded by [`WARM_UP_TIMEOUT`].
    pub async fn warm_up(&self, repo: &Repository, connections: usize) {
        let Ok(endpoints) = self.endpoints(repo) else {
            return;
        };
        let Some(ep) = endpoints.iter().find(|e| Cap::Pull.allowed_by(&e.caps)) else {
            return;
        };
        let url = format!("{}/", ep.api_root);
        let requests = (0..connections.clamp(1, 16)).map(|_| {
            let request = ep.client.get(&url).headers(ep.headers.clone());
            async move {
                if let Ok(resp) = request.send().await {
                    read_capped(resp, 64 << 10, WARM_UP_TIMEOUT).await;
                }
            }
        });
        let _ = tokio::time::timeout(WARM_UP_TIMEOUT, futures::future::join_all(requests)).await;
    }

    /// Repeats `attempt` while it fails transiently, up to `max_attempts` and, when
    /// given, until `deadline`: a retry whose wait would end past the deadline is not
    /// made (the last failure is returned at once). This is the only retry loop of a
    /// request; nothing above it retries transport failures again.
    pub(crate) async fn retrying<T, F, Fut>(
        &self,
        max_attempts: u32,
        deadline: Option<tokio::time::Instant>,
        mut attempt: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let policy = &self.inner.config.retry;
        let max = max_attempts.max(1);
        let mut n = 0;
        loop {
            n += 1;
            match attempt().await {
                Ok(v) => return Ok(v),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Transient(e, after)) => {
                    if n >= max {
                        return Err(e);
                    }
                    let delay = policy.delay(n, after);
                    if deadline.is_some_and(|d| tokio::time::Instant::now() + delay >= d) {
                        tracing::debug!(kind = e.kind().label(), error = %e, attempt = n, ?delay, "transient registry failure, no time left to retry");
                        return Err(e);
                    }
                    tracing::debug!(kind = e.kind().label(), error = %e, attempt = n, ?delay, "transient registry failure, retrying");
                    self.inner.stats.retry();
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// See [`RegistryConfig::range_read_deadline`].
    pub fn range_read_deadline(&self) -> Duration {
        self.inner.config.range_read_deadline()
    }

    pub(crate) fn max_attempts(&self) -> u32 {
        self.inner.config.retry.max_attempts.max(1)
    }

    fn build_body(&self, body: &ReqBody) -> reqwest::Body {
        match body {
            ReqBody::Empty => reqwest::Body::from(Bytes::new()),
            ReqBody::Bytes(b) => {
                self.inner.stats.bytes(RequestKind::Upload, b.len() as u64);
                reqwest::Body::from(b.clone())
            }
            ReqBody::File { path, offset, len } => {
                file_body(path.clone(), *offset, *len, self.inner.clone())
            }
        }
    }

    /// Sends one request: authenticates, re-authenticates once on 401, and turns
    /// transport failures, 429 and 5xx into transient failures. Other statuses are
    /// returned for the caller to interpret.
    pub(crate) async fn execute(
        &self,
        ep: &Endpoint,
        req: &Req<'_>,
    ) -> Result<reqwest::Response, Failure> {
        let mut reauthenticated = false;
        loop {
            let authz = self.authorization(ep, req.scope, req.ctx).await?;
            let mut rb = ep
                .client
                .request(req.method.clone(), &req.url)
                .headers(ep.headers.clone())
                .headers(req.headers.clone());
            if ep.mirror && (req.method == Method::GET || req.method == Method::HEAD) {
                // Tells a mirror which upstream is meant (as containerd does).
                rb = rb.query(&[("ns", ep.registry.as_str())]);
            }
            if let Some(a) = &authz {
                rb = rb.header(reqwest::header::AUTHORIZATION, a.as_str());
            }
            if !matches!(req.body, ReqBody::Empty)
                || req.method == Method::PUT
                || req.method == Method::PATCH
            {
                rb = rb
                    .header(reqwest::header::CONTENT_LENGTH, req.body.len())
                    .body(self.build_body(&req.body));
            }
            self.inner.stats.request(req.kind);
            // Sending a body takes time of its own: allow it at least 1 MiB/s.
            let timeout = req.timeout + Duration::from_secs(req.body.len() >> 20);
            let sent = std::time::Instant::now();
            let resp = match tokio::time::timeout(timeout, rb.send()).await {
                Err(_) => return Err(Failure::Transient(req.ctx.timeout(timeout), None)),
                Ok(Err(e)) if e.is_timeout() => {
                    return Err(Failure::Transient(req.ctx.timeout(timeout), None))
                }
                Ok(Err(e)) => {
                    let e = e.without_url();
                    return Err(Failure::Transient(connect_error(ep, &req.url, &e), None));
                }
                Ok(Ok(r)) => r,
            };
            let status = resp.status().as_u16();
            tracing::trace!(method = %req.method, kind = ?req.kind, status, ms = sent.elapsed().as_millis() as u64, "registry answered");
            if status == 401 && !reauthenticated {
                reauthenticated = true;
                if self
                    .on_challenge(ep, resp.headers(), req.scope, authz.as_deref(), req.ctx)
                    .await?
                {
                    continue;
                }
            }
            if status == 401 || status == 403 {
                let body = read_capped(resp, MAX_ERROR_BODY, req.timeout).await;
                let has_cred = self
                    .inner
                    .auth
                    .credential(&ep.host, &ep.registry, &req.ctx.repository)
                    .await
                    .ok()
                    .flatten()
                    .is_some();
                return Err(Failure::Fatal(
                    self.unauthorized(ep, req, status, &body, has_cred),
                ));
            }
            if status == 429 || (500..600).contains(&status) {
                let after = retry_after(resp.headers());
                let body = read_capped(resp, MAX_ERROR_BODY, req.timeout).await;
                return Err(Failure::Transient(
                    req.ctx.status(status, ApiErrors::parse(&body)),
                    after,
                ));
            }
            return Ok(resp);
        }
    }

    /// Sends a request and reads its whole body (at most `limit` bytes for success
    /// statuses), repeating transient failures when the request allows it.
    pub(crate) async fn exchange(
        &self,
        ep: &Endpoint,
        req: &Req<'_>,
        limit: u64,
    ) -> Result<Exchange, RegistryError> {
        let attempts = if req.retry { self.max_attempts() } else { 1 };
        let deadline =
            tokio::time::Instant::now() + self.inner.config.retry.deadline_for(req.timeout);
        self.retrying(attempts, Some(deadline), || async {
            let resp = self.execute(ep, req).await?;
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let success = (200..300).contains(&status);
            // A HEAD answer's Content-Length describes the object, not this body.
            let announced = if req.method == Method::HEAD {
                None
            } else {
                content_length(&headers)
            };
            if success && announced.is_some_and(|n| n > limit) {
                return Err(Failure::Fatal(req.ctx.too_large(limit)));
            }
            if !success {
                let body = read_capped(resp, MAX_ERROR_BODY, req.timeout).await;
                return Ok(Exchange {
                    status,
                    headers,
                    body,
                });
            }
            let body = read_body(
                resp,
                limit,
                req.timeout,
                req.kind,
                &self.inner.stats,
                req.ctx,
            )
            .await;
            let body = match body {
                Ok(b) => b,
                Err(BodyError::TooLong) => return Err(Failure::Fatal(req.ctx.too_large(limit))),
                Err(BodyError::Failed(e)) => return Err(Failure::Transient(e, None)),
            };
            Ok(Exchange {
                status,
                headers,
                body,
            })
        })
        .await
    }

    fn unauthorized(
        &self,
        ep: &Endpoint,
        req: &Req<'_>,
        status: u16,
        body: &[u8],
        has_cred: bool,
    ) -> RegistryError {
        let cfg = self
            .inner
            .auth
            .creds
            .path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "the Docker config.json".to_string());
        let hint = match (has_cred, status) {
            (true, 403) => format!(
                "the credentials for {} in {cfg} lack the access needed ({}); check the user's permissions",
                ep.host, req.scope
            ),
            (true, _) => format!(
                "the credentials for {} in {cfg} were rejected: check them (docker login {})",
                ep.host, ep.registry
            ),
            (false, _) => format!(
                "the registry requires credentials: add them for {} to {cfg} (auths.\"{}\".auth = base64 of user:password, e.g. via docker login)",
                ep.registry, ep.registry
            ),
        };
        RegistryError::Unauthorized {
            host: req.ctx.host.clone(),
            repository: req.ctx.repository.clone(),
            what: req.ctx.what.clone(),
            status,
            errors: ApiErrors::parse(body),
            hint,
        }
    }

    /// The `Authorization` header for a request, fetching a token first when the
    /// host is known to want one.
    async fn authorization(
        &self,
        ep: &Endpoint,
        scope: &str,
        ctx: &Ctx,
    ) -> Result<Option<String>, Failure> {
        let auth = &self.inner.auth;
        let cred = auth
            .credential(&ep.host, &ep.registry, &ctx.repository)
            .await
            .map_err(Failure::Fatal)?;
        let cred = cred.as_ref();
        if let Some(Credential::RegistryToken(t)) = cred {
            return Ok(Some(format!("Bearer {t}")));
        }
        match auth.scheme(&ep.host) {
            None => Ok(None),
            Some(HostScheme::Basic) => Ok(match cred {
                Some(Credential::Basic { username, password }) => {
                    Some(auth::basic_header(username, password))
                }
                _ => None,
            }),
            Some(HostScheme::Bearer { realm, service }) => {
                if let Some(t) = auth.cached_token(&ep.host, scope) {
                    return Ok(Some(format!("Bearer {t}")));
                }
                // One token request per (host, scope) at a time: parallel reads
                // wait for it instead of each asking the token service.
                let lock = auth.fetch_lock(&ep.host, scope);
                let _guard = lock.lock().await;
                if let Some(t) = auth.cached_token(&ep.host, scope) {
                    return Ok(Some(format!("Bearer {t}")));
                }
                let token = self
                    .fetch_token(ep, &realm, service.as_deref(), scope, ctx)
                    .await?;
                auth.store_token(&ep.host, scope, &token);
                Ok(Some(format!("Bearer {}", token.value)))
            }
        }
    }

    /// Learns from a 401 how to authenticate, and prepares a fresh token if Bearer.
    /// Returns whether repeating the request can succeed.
    async fn on_challenge(
        &self,
        ep: &Endpoint,
        headers: &HeaderMap,
        scope: &str,
        sent: Option<&str>,
        ctx: &Ctx,
    ) -> Result<bool, Failure> {
        let challenges: Vec<auth::Challenge> = headers
            .get_all(reqwest::header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(auth::parse_www_authenticate)
            .collect();
        let auth = &self.inner.auth;
        let bearer = challenges
            .iter()
            .find(|c| c.scheme == "bearer" && c.param("realm").is_some_and(|r| !r.is_empty()));
        if let Some(c) = bearer {
            let realm = c.param("realm").unwrap_or_default().to_string();
            let service = c.param("service").map(str::to_string);
            auth.set_scheme(
                &ep.host,
                HostScheme::Bearer {
                    realm: realm.clone(),
                    service: service.clone(),
                },
            );
            let lock = auth.fetch_lock(&ep.host, scope);
            let _guard = lock.lock().await;
            if let Some(t) = auth.cached_token(&ep.host, scope) {
                if sent != Some(format!("Bearer {t}").as_str()) {
                    // Another request already replaced the token this one carried.
                    return Ok(true);
                }
            }
            auth.drop_token(&ep.host, scope);
            // The challenge may name a scope we did not ask for (e.g. for a mount).
            let mut scopes = scope.to_string();
            if let Some(extra) = c.param("scope") {
                for s in extra.split(' ').filter(|s| !s.is_empty()) {
                    if !scopes.split(' ').any(|x| x == s) {
                        scopes.push(' ');
                        scopes.push_str(s);
                    }
                }
            }
            let token = self
                .fetch_token(ep, &realm, service.as_deref(), &scopes, ctx)
                .await?;
            auth.store_token(&ep.host, scope, &token);
            return Ok(true);
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            auth.set_scheme(&ep.host, HostScheme::Basic);
            let cred = auth
                .credential(&ep.host, &ep.registry, &ctx.repository)
                .await
                .map_err(Failure::Fatal)?;
            let already_sent_basic = sent.is_some_and(|s| s.starts_with("Basic "));
            // Without a credential, or with one just rejected, the caller reports 401.
            return Ok(matches!(cred, Some(Credential::Basic { .. })) && !already_sent_basic);
        }
        Err(Failure::Fatal(RegistryError::Auth {
            kind: ErrorKind::Protocol,
            host: ep.host.clone(),
            detail: format!(
                "{}: HTTP 401 without a Bearer or Basic challenge (WWW-Authenticate: {:?})",
                ctx.what,
                header_str(headers, "www-authenticate").unwrap_or("")
            ),
            hint: "this registry's authentication scheme is not supported",
        }))
    }

    /// Gets a token from `realm` for the space-separated `scopes`.
    async fn fetch_token(
        &self,
        ep: &Endpoint,
        realm: &str,
        service: Option<&str>,
        scopes: &str,
        ctx: &Ctx,
    ) -> Result<IssuedToken, Failure> {
        let auth_err = |kind: ErrorKind, detail: String, hint: &'static str| RegistryError::Auth {
            kind,
            host: ep.host.clone(),
            detail,
            hint,
        };
        let url = Url::parse(realm).map_err(|e| {
            auth_err(
                ErrorKind::Protocol,
                format!("token realm {realm:?} is not a URL: {e}"),
                "the registry's WWW-Authenticate header is broken",
            )
        })?;
        let cred = self
            .inner
            .auth
            .credential(&ep.host, &ep.registry, &ctx.repository)
            .await
            .map_err(Failure::Fatal)?;
        let has_cred = cred.is_some();
        match url.scheme() {
            "https" => {}
            "http" if ep.plain_http || !has_cred => {}
            "http" => {
                return Err(Failure::Fatal(auth_err(
                    ErrorKind::Protocol,
                    format!("token realm {realm} is plain HTTP while the registry is HTTPS"),
                    "refusing to send credentials unencrypted; fix the registry's token realm",
                )))
            }
            other => {
                return Err(Failure::Fatal(auth_err(
                    ErrorKind::Protocol,
                    format!("token realm {realm:?} has unsupported scheme {other:?}"),
                    "the registry's WWW-Authenticate header is broken",
                )))
            }
        }
        let timeout = self.inner.config.request_timeout;
        let inner = &self.inner;
        let deadline = tokio::time::Instant::now() + inner.config.retry.deadline_for(timeout);
        self.retrying(self.max_attempts(), Some(deadline), || {
            let mut rb = match &cred {
                Some(Credential::IdentityToken { token, .. }) => {
                    let mut form = vec![
                        ("grant_type", "refresh_token"),
                        ("refresh_token", token.as_str()),
                        ("client_id", "zest"),
                        ("scope", scopes),
                    ];
                    if let Some(s) = service {
                        form.push(("service", s));
                    }
                    ep.client.post(url.clone()).form(&form)
                }
                other => {
                    let mut u = url.clone();
                    {
                        let mut q = u.query_pairs_mut();
                        if let Some(s) = service {
                            q.append_pair("service", s);
                        }
                        for s in scopes.split(' ').filter(|s| !s.is_empty()) {
                            q.append_pair("scope", s);
                        }
                    }
                    let rb = ep.client.get(u);
                    match other {
                        Some(Credential::Basic { username, password }) => rb.basic_auth(username, Some(password)),
                        _ => rb,
                    }
                }
            };
            rb = rb.header(reqwest::header::ACCEPT, "application/json");
            let realm_host = url.host_str().unwrap_or("").to_string();
            async move {
                inner.stats.request(RequestKind::Auth);
                let resp = match tokio::time::timeout(timeout, rb.send()).await {
                    Err(_) => return Err(Failure::Transient(ctx.timeout(timeout), None)),
                    Ok(Err(e)) => {
                        return Err(Failure::Transient(
                            auth_err(
                                ErrorKind::Transport,
                                format!("token service {realm_host} unreachable: {}", chain(&e)),
                                "check the network path to the registry's token service",
                            ),
                            None,
                        ))
                    }
                    Ok(Ok(r)) => r,
                };
                let status = resp.status().as_u16();
                let after = retry_after(resp.headers());
                let body = read_capped(resp, MAX_SMALL_BODY, timeout).await;
                match status {
                    200 => auth::parse_token_response(&body, &ep.host).map_err(Failure::Fatal),
                    401 | 403 => Err(Failure::Fatal(auth_err(
                        ErrorKind::Denied,
                        format!(
                            "token service {realm_host} refused {} for {scopes} (HTTP {status}){}",
                            if has_cred { "the credentials" } else { "anonymous access" },
                            ApiErrors::parse(&body)
                        ),
                        if has_cred {
                            "check the credentials for this registry in config.json"
                        } else {
                            "the registry requires credentials: add them to config.json (docker login)"
                        },
                    ))),
                    429 | 500..=599 => Err(Failure::Transient(
                        auth_err(
                            if status == 429 { ErrorKind::RateLimited } else { ErrorKind::Server },
                            format!("token service {realm_host} answered HTTP {status}"),
                            "retry later",
                        ),
                        after,
                    )),
                    _ => Err(Failure::Fatal(auth_err(
                        ErrorKind::Protocol,
                        format!("token service {realm_host} answered HTTP {status}"),
                        "check the registry's token service",
                    ))),
                }
            }
        })
        .await
        .map_err(Failure::Fatal)
    }
}

fn build_http_client(
    config: &RegistryConfig,
    roots: &[reqwest::Certificate],
    skip_verify: bool,
) -> Result<reqwest::Client, RegistryError> {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .connect_timeout(config.connect_timeout)
        .user_agent(config.user_agent.clone())
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true);
    for c in roots {
        b = b.add_root_certificate(c.clone());
    }
    if skip_verify {
        b = b.danger_accept_invalid_certs(true);
    }
    b.build().map_err(|e| RegistryError::Config {
        path: PathBuf::from("(TLS settings)"),
        detail: format!("cannot build the HTTP client: {}", chain(&e)),
    })
}

/// Why reading a body stopped.
pub(crate) enum BodyError {
    /// More than the limit.
    TooLong,
    /// Transport failure or idle timeout (worth a retry).
    Failed(RegistryError),
}

/// Reads a whole body of at most `limit` bytes, each read within `idle`.
pub(crate) async fn read_body(
    mut resp: reqwest::Response,
    limit: u64,
    idle: Duration,
    kind: RequestKind,
    stats: &Counters,
    ctx: &Ctx,
) -> Result<Bytes, BodyError> {
    let mut buf = BytesMut::new();
    loop {
        let chunk = match tokio::time::timeout(idle, resp.chunk()).await {
            Err(_) => return Err(BodyError::Failed(ctx.timeout(idle))),
            Ok(Err(e)) => {
                return Err(BodyError::Failed(ctx.interrupted(format!(
                    "response body broke off after {} bytes: {}",
                    buf.len(),
                    chain(&e)
                ))))
            }
            Ok(Ok(None)) => return Ok(buf.freeze()),
            Ok(Ok(Some(c))) => c,
        };
        stats.bytes(kind, chunk.len() as u64);
        if buf.len() as u64 + chunk.len() as u64 > limit {
            return Err(BodyError::TooLong);
        }
        buf.extend_from_slice(&chunk);
    }
}

/// Longest [`RegistryClient::warm_up`] waits for its connections.
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads at most `limit` bytes of an error or token body; failures give what arrived.
/// Not counted in the statistics, which count payload.
pub(crate) async fn read_capped(mut resp: reqwest::Response, limit: u64, idle: Duration) -> Bytes {
    let mut buf = BytesMut::new();
    while let Ok(Ok(Some(chunk))) = tokio::time::timeout(idle, resp.chunk()).await {
        let room = limit.saturating_sub(buf.len() as u64) as usize;
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if buf.len() as u64 >= limit {
            break;
        }
    }
    buf.freeze()
}

/// Registry operations take this scope string for pulls of `repo`.
pub(crate) fn pull_scope(repo: &Repository) -> String {
    format!("repository:{}:pull", repo.name)
}

/// ... and this one for pushes.
pub(crate) fn push_scope(repo: &Repository) -> String {
    format!("repository:{}:pull,push", repo.name)
}
