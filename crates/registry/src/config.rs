//! Registry client configuration, and per-host settings in containerd's `hosts.toml`
//! format (`<hosts_dir>/<host[:port]>/hosts.toml`).
//!
//! The subset of `hosts.toml` understood: `server`, top-level `ca`, `skip_verify`,
//! `capabilities`, `override_path`, `header`, and `[host."<url>"]` mirror sections
//! with the same keys, tried in file order before the server. Relative CA paths are
//! relative to the file's directory. Unknown keys are ignored (other tools' settings
//! may share the file), wrong types are errors.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::error::RegistryError;

/// Default directory of per-host `hosts.toml` files.
pub const DEFAULT_HOSTS_DIR: &str = "/etc/zest/certs.d";

/// What an endpoint may be used for (containerd's host capabilities).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Fetch manifests by digest and blobs.
    pub pull: bool,
    /// Resolve tags to manifests.
    pub resolve: bool,
    /// Upload blobs and manifests.
    pub push: bool,
}

impl Capabilities {
    /// Every capability (the default for configured hosts and for the server).
    pub const ALL: Capabilities = Capabilities {
        pull: true,
        resolve: true,
        push: true,
    };
}

impl Default for Capabilities {
    fn default() -> Self {
        Self::ALL
    }
}

/// Connection settings of one endpoint (the server or a mirror).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointOptions {
    /// Allowed operations.
    pub capabilities: Capabilities,
    /// Accept any TLS certificate (test registries only).
    pub skip_verify: bool,
    /// Extra PEM CA files trusted for this endpoint.
    pub ca: Vec<PathBuf>,
    /// Use the URL's path as the API root as is, instead of appending `/v2`.
    pub override_path: bool,
    /// Extra request headers.
    pub headers: Vec<(String, String)>,
}

/// One mirror (a `[host."<url>"]` section).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorConfig {
    /// `scheme://host[:port][/path]`.
    pub url: String,
    /// Its settings.
    pub options: EndpointOptions,
}

/// The settings of one registry, as in its `hosts.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostConfig {
    /// Upstream URL replacing `https://<registry>` (e.g. `http://...` for plain HTTP).
    pub server: Option<String>,
    /// Settings of the upstream server.
    pub server_options: EndpointOptions,
    /// Mirrors, tried in this order before the server.
    pub mirrors: Vec<MirrorConfig>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Deserialize, Default)]
struct RawOptions {
    capabilities: Option<Vec<String>>,
    skip_verify: Option<bool>,
    ca: Option<OneOrMany>,
    override_path: Option<bool>,
    header: Option<BTreeMap<String, OneOrMany>>,
}

#[derive(Deserialize)]
struct RawHosts {
    server: Option<String>,
    #[serde(flatten)]
    options: RawOptions,
    // A table, not a map type, so that file order is kept.
    host: Option<toml::Table>,
}

impl RawOptions {
    fn resolve(self, base: &Path, path: &Path) -> Result<EndpointOptions, RegistryError> {
        let capabilities = match self.capabilities {
            None => Capabilities::ALL,
            Some(list) => {
                let mut c = Capabilities {
                    pull: false,
                    resolve: false,
                    push: false,
                };
                for cap in list {
                    match cap.as_str() {
                        "pull" => c.pull = true,
                        "resolve" => c.resolve = true,
                        "push" => c.push = true,
                        other => {
                            return Err(RegistryError::Config {
                                path: path.to_path_buf(),
                                detail: format!(
                                    "unknown capability {other:?} (expected pull, resolve or push)"
                                ),
                            })
                        }
                    }
                }
                c
            }
        };
        let ca = self
            .ca
            .map(OneOrMany::into_vec)
            .unwrap_or_default()
            .into_iter()
            .map(|p| {
                let p = PathBuf::from(p);
                if p.is_absolute() {
                    p
                } else {
                    base.join(p)
                }
            })
            .collect();
        let headers = self
            .header
            .unwrap_or_default()
            .into_iter()
            .flat_map(|(k, v)| v.into_vec().into_iter().map(move |v| (k.clone(), v)))
            .collect();
        Ok(EndpointOptions {
            capabilities,
            skip_verify: self.skip_verify.unwrap_or(false),
            ca,
            override_path: self.override_path.unwrap_or(false),
            headers,
        })
    }
}

fn check_url(url: &str, path: &Path) -> Result<(), RegistryError> {
    let ok = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::Config {
            path: path.to_path_buf(),
            detail: format!("bad URL {url:?}: expected http://host[:port][/path] or https://..."),
        })
    }
}

impl HostConfig {
    /// Parses the text of a `hosts.toml`; `path` names it in errors and its directory
    /// anchors relative CA paths.
    pub fn parse(text: &str, path: &Path) -> Result<Self, RegistryError> {
        let raw: RawHosts = toml::from_str(text).map_err(|e| RegistryError::Config {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        if let Some(s) = &raw.server {
            check_url(s, path)?;
        }
        let mut mirrors = Vec::new();
        for (url, value) in raw.host.unwrap_or_default() {
            check_url(&url, path)?;
            let opts = RawOptions::deserialize(value).map_err(|e| RegistryError::Config {
                path: path.to_path_buf(),
                detail: format!("[host.{url:?}]: {e}"),
            })?;
            mirrors.push(MirrorConfig {
                url,
                options: opts.resolve(base, path)?,
            });
        }
        Ok(HostConfig {
            server: raw.server,
            server_options: raw.options.resolve(base, path)?,
            mirrors,
        })
    }

    /// Reads `<dir>/<host>/hosts.toml`, falling back to `<dir>/_default/hosts.toml`;
    /// `Ok(None)` if neither exists.
    pub fn load(dir: &Path, host: &str) -> Result<Option<Self>, RegistryError> {
        for name in [host, "_default"] {
            // A host name never contains a path separator; refuse one rather than escape
            // the directory.
            if name.contains('/') || name.contains("..") {
                continue;
            }
            let path = dir.join(name).join("hosts.toml");
            match std::fs::read_to_string(&path) {
                Ok(text) => return HostConfig::parse(&text, &path).map(Some),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(RegistryError::Io {
                        op: "read",
                        path,
                        source,
                    })
                }
            }
        }
        Ok(None)
    }
}

/// Which registries are spoken to over plain HTTP (never unless asked).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PlainHttp {
    /// HTTPS everywhere (unless a hosts.toml names an `http://` URL).
    #[default]
    Never,
    /// Plain HTTP for these registries (`host[:port]`, as in image references).
    Hosts(Vec<String>),
    /// Plain HTTP for every registry without an explicit scheme.
    Always,
}

impl PlainHttp {
    /// Whether `host` (registry name or endpoint host) is to use plain HTTP.
    pub fn applies_to(&self, host: &str) -> bool {
        match self {
            PlainHttp::Never => false,
            PlainHttp::Always => true,
            PlainHttp::Hosts(list) => list.iter().any(|h| h.eq_ignore_ascii_case(host)),
        }
    }
}

/// Where Docker-style credentials come from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum DockerConfigSource {
    /// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`; absent is fine.
    #[default]
    Default,
    /// This file, which must exist.
    Path(PathBuf),
    /// No credentials at all (anonymous access only).
    Disabled,
}

/// The one retry and timeout policy of zest's network reads. It is applied at
/// exactly one layer, the registry client: callers (blob sources, the fetcher, TOC
/// loading) do not retry transport failures again, and derive their own deadlines
/// from [`RegistryConfig::range_read_deadline`] so they never cut an attempt short.
///
/// Transient failures are retried: connection errors, timeouts, broken or
/// truncated bodies, HTTP 5xx and 429. The delay doubles from `initial_backoff` up
/// to `max_backoff`, with random jitter; a `Retry-After` header is honoured up to
/// `max_retry_after`. A 401 refreshes the token once within an attempt. Final
/// failures (404, 401/403 after the refresh, bad ranges, protocol violations) are
/// never retried. Per-attempt timeouts are [`RegistryConfig::request_timeout`] and
/// [`RegistryConfig::range_timeout`]; `deadline` bounds all attempts of one
/// request and the waits between them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per request, first included (1 disables retries).
    pub max_attempts: u32,
    /// First delay.
    pub initial_backoff: Duration,
    /// Largest delay from backoff.
    pub max_backoff: Duration,
    /// Largest delay honoured from a `Retry-After` header.
    pub max_retry_after: Duration,
    /// Longest one request may take, every attempt and wait included; no retry is
    /// started that would end past it. Never shorter than one attempt's timeout.
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(30),
            // Below the fetcher's default read deadline (180 s), so that a reader
            // gets the registry's own error, not a bare timeout.
            deadline: Duration::from_secs(120),
        }
    }
}

impl RetryPolicy {
    /// The delay before attempt `attempt + 1` (attempt counts from 1).
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(16);
        let base = self
            .initial_backoff
            .saturating_mul(1u32 << exp)
            .min(self.max_backoff);
        // Equal jitter: half fixed, half random, so parallel clients spread out.
        let half = base / 2;
        let jitter_ms = rand::random::<u64>() % (half.as_millis() as u64 + 1);
        half + Duration::from_millis(jitter_ms)
    }

    /// The delay before attempt `attempt + 1`: backoff, or the server's
    /// `Retry-After` when longer, capped at `max_retry_after`.
    pub(crate) fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let backoff = self.backoff(attempt);
        match retry_after {
            Some(a) => backoff.max(a.min(self.max_retry_after)),
            None => backoff,
        }
    }

    /// The overall deadline of a request whose attempts each may take
    /// `attempt_timeout`: `deadline`, but at least one whole attempt.
    pub fn deadline_for(&self, attempt_timeout: Duration) -> Duration {
        self.deadline.max(attempt_timeout)
    }
}

/// Configuration of a [`super::RegistryClient`].
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Directory of `<host>/hosts.toml` files; `None` to use none.
    pub hosts_dir: Option<PathBuf>,
    /// Per-registry settings given directly; they take precedence over `hosts_dir`.
    pub hosts: HashMap<String, HostConfig>,
    /// Registries spoken to over plain HTTP.
    pub plain_http: PlainHttp,
    /// An extra PEM CA bundle trusted for every registry (besides the system roots).
    pub extra_ca_file: Option<PathBuf>,
    /// Where credentials come from.
    pub docker_config: DockerConfigSource,
    /// Time a Docker credential helper may take to answer before it is killed.
    pub credential_helper_timeout: Duration,
    /// TCP + TLS connection timeout.
    pub connect_timeout: Duration,
    /// Time allowed for response headers, and between two body reads of a download.
    pub request_timeout: Duration,
    /// Time allowed for a whole range read (headers and body).
    pub range_timeout: Duration,
    /// Retry policy.
    pub retry: RetryPolicy,
    /// Blobs larger than this are uploaded in chunks.
    pub chunked_upload_threshold: u64,
    /// Chunk size of chunked uploads.
    pub upload_chunk_size: u64,
    /// Largest manifest accepted.
    pub max_manifest_size: u64,
    /// Largest range read accepted in one call.
    pub max_range_size: u64,
    /// `User-Agent` header.
    pub user_agent: String,
}

impl RegistryConfig {
    /// The longest [`super::RegistryClient::get_range`] takes before it returns,
    /// every attempt, wait and endpoint included. Callers that guard a range read
    /// with a timeout of their own use this (plus a margin) so that they never cut
    /// an attempt short and always get the client's typed error.
    pub fn range_read_deadline(&self) -> Duration {
        self.retry.deadline_for(self.range_timeout)
    }
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            hosts_dir: Some(PathBuf::from(DEFAULT_HOSTS_DIR)),
            hosts: HashMap::new(),
            plain_http: PlainHttp::Never,
            extra_ca_file: None,
            docker_config: DockerConfigSource::Default,
            credential_helper_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            range_timeout: Duration::from_secs(60),
            retry: RetryPolicy::default(),
            chunked_upload_threshold: 64 << 20,
            upload_chunk_size: 16 << 20,
            max_manifest_size: 4 << 20,
            max_range_size: 256 << 20,
            user_agent: concat!("zest/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_toml_subset_in_order() {
        let text = r#"
server = "https://registry.example.com"
ca = "ca.pem"
future_key = "ignored"

[host."https://mirror-b.local:5000"]
  capabilities = ["pull", "resolve"]
  skip_verify = true

[host."http://mirror-a.local/custom/v2"]
  capabilities = ["pull"]
  ca = ["/abs/ca1.pem", "rel/ca2.pem"]
  override_path = true
  [host."http://mirror-a.local/custom/v2".header]
    x-custom = "1"
    x-multi = ["a", "b"]
"#;
        let path = Path::new("/etc/zest/certs.d/registry.example.com/hosts.toml");
        let h = HostConfig::parse(text, path).unwrap();
        assert_eq!(h.server.as_deref(), Some("https://registry.example.com"));
        assert_eq!(
            h.server_options.ca,
            vec![PathBuf::from(
                "/etc/zest/certs.d/registry.example.com/ca.pem"
            )]
        );
        assert_eq!(h.server_options.capabilities, Capabilities::ALL);
        // File order, not alphabetical order.
        assert_eq!(h.mirrors[0].url, "https://mirror-b.local:5000");
        assert_eq!(h.mirrors[1].url, "http://mirror-a.local/custom/v2");
        let b = &h.mirrors[0].options;
        assert!(
            b.skip_verify && b.capabilities.pull && b.capabilities.resolve && !b.capabilities.push
        );
        let a = &h.mirrors[1].options;
        assert!(a.override_path && !a.capabilities.resolve);
        assert_eq!(
            a.ca,
            vec![
                PathBuf::from("/abs/ca1.pem"),
                PathBuf::from("/etc/zest/certs.d/registry.example.com/rel/ca2.pem")
            ]
        );
        assert_eq!(a.headers.len(), 3);
    }

    #[test]
    fn rejects_bad_hosts_toml() {
        let p = Path::new("hosts.toml");
        for bad in [
            "server = 5",
            "server = \"ftp://x\"",
            "[host.\"mirror.local\"]\ncapabilities=[\"pull\"]",
            "[host.\"https://m\"]\ncapabilities=[\"fly\"]",
            "[host.\"https://m\"]\nskip_verify=\"yes\"",
            "not toml at all [",
        ] {
            let err = HostConfig::parse(bad, p).unwrap_err();
            assert!(err.to_string().contains("hosts.toml"), "{bad}: {err}");
        }
    }

    #[test]
    fn load_falls_back_to_default_dir() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(
            HostConfig::load(tmp.path(), "localhost:5000").unwrap(),
            None
        );
        std::fs::create_dir_all(tmp.path().join("_default")).unwrap();
        std::fs::write(
            tmp.path().join("_default/hosts.toml"),
            "server = \"http://fallback:1\"",
        )
        .unwrap();
        let h = HostConfig::load(tmp.path(), "localhost:5000")
            .unwrap()
            .unwrap();
        assert_eq!(h.server.as_deref(), Some("http://fallback:1"));
        std::fs::create_dir_all(tmp.path().join("localhost:5000")).unwrap();
        std::fs::write(
            tmp.path().join("localhost:5000/hosts.toml"),
            "server = \"http://localhost:5000\"",
        )
        .unwrap();
        let h = HostConfig::load(tmp.path(), "localhost:5000")
            .unwrap()
            .unwrap();
        assert_eq!(h.server.as_deref(), Some("http://localhost:5000"));
    }

    #[test]
    fn plain_http_and_backoff() {
        assert!(!PlainHttp::Never.applies_to("localhost:5000"));
        assert!(PlainHttp::Always.applies_to("x"));
        let p = PlainHttp::Hosts(vec!["127.0.0.1:5000".into()]);
        assert!(p.applies_to("127.0.0.1:5000") && !p.applies_to("127.0.0.1:5001"));
        let r = RetryPolicy::default();
        for attempt in 1..40 {
            let d = r.backoff(attempt);
            assert!(d <= r.max_backoff, "{d:?}");
        }
        assert!(r.backoff(1) >= r.initial_backoff / 2);
        // Retry-After is honoured within bounds.
        assert_eq!(
            r.delay(1, Some(Duration::from_secs(3600))),
            r.max_retry_after
        );
        assert!(r.delay(1, Some(Duration::from_secs(2))) >= Duration::from_secs(2));
        // The deadline always allows one whole attempt.
        assert_eq!(r.deadline_for(Duration::from_secs(1)), r.deadline);
        assert_eq!(
            r.deadline_for(Duration::from_secs(900)),
            Duration::from_secs(900)
        );
        let c = RegistryConfig::default();
        assert!(c.range_read_deadline() >= c.range_timeout);
    }
}
