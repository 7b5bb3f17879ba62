//! zest's TOML configuration file (`/etc/zest/config.toml` by default) and what the
//! command line of `zest serve` overrides.
//!
//! [`ServiceConfig`] is the whole file as `zest serve` reads it: `[snapshotter]`
//! (the snapshot service, [`SnapshotterConfig`] of `zest-snapshotter`),
//! `[cache]` (chunk cache), `[registry]` (registry access), `[fetch]` (range requests)
//! `[lazy]` (lazy layer mounts), `[cri]` (the CRI image-service proxy that
//! records the kubelet's pull credentials) and `[profiles]` (learned start-up
//! profiles). Unknown sections and keys are rejected so that
//! typos are reported. `packaging/config.toml` documents every key with its default,
//! and a test checks that it parses to exactly the defaults.

use std::path::{Path, PathBuf};
use std::time::Duration;

use zest_cache::{ByteSize, CacheConfig};
use zest_fetch::prefetch::BackgroundFetch;
use zest_fetch::FetchConfig;
use zest_registry::{DockerConfigSource, PlainHttp, RegistryConfig, RetryPolicy};
use zest_snapshotter::{ConfigError, SnapshotterConfig};

/// Default configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/zest/config.toml";

/// The whole configuration file as `zest serve` reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    /// `[snapshotter]`: the snapshot service.
    pub snapshotter: SnapshotterConfig,
    /// `[cache]`: the chunk cache.
    pub cache: CacheSection,
    /// `[registry]`: how registries are reached.
    pub registry: RegistrySection,
    /// `[fetch]`: range requests of the lazy read path.
    pub fetch: FetchSection,
    /// `[lazy]`: lazy layer mounts.
    pub lazy: LazySection,
    /// `[cri]`: the CRI image-service proxy.
    pub cri: CriSection,
    /// `[profiles]`: learned start-up profiles.
    pub profiles: ProfilesSection,
}

/// `[profiles]`: learned start-up profiles. The first lazy start of an image
/// records which files it reads first; later cold starts fetch those files at
/// mount time. Profiles are kept in `<state_dir>/profiles` and, when `publish`
/// is on, pushed beside the image as an OCI referrer of its manifest (the image
/// itself is never changed).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProfilesSection {
    /// Record a profile of an image that has none yet, from its first lazy start.
    pub record: bool,
    /// Look for a profile in the image's repository when none is kept locally.
    pub fetch: bool,
    /// Push recorded profiles to the image's repository (needs push rights).
    pub publish: bool,
    /// Fetch the profile's files of each layer when it is mounted.
    pub prefetch: bool,
    /// Seconds of recording after an image's first lazy mount (recording also
    /// ends when the image's last lazy mount goes away).
    pub window_secs: u64,
    /// Most files a recorded profile lists.
    pub max_files: usize,
    /// Most compressed bytes fetched for one image's profile.
    pub max_prefetch_size: ByteSize,
    /// Most profiles kept in the state directory (oldest dropped first).
    pub max_local_profiles: usize,
}

impl Default for ProfilesSection {
    fn default() -> Self {
        ProfilesSection {
            record: true,
            fetch: true,
            publish: false,
            prefetch: true,
            window_secs: 30,
            max_files: 4096,
            max_prefetch_size: ByteSize::mib(256),
            max_local_profiles: 1024,
        }
    }
}

impl ProfilesSection {
    /// The directory of local profiles under the state directory.
    pub fn dir(state_dir: &Path) -> PathBuf {
        state_dir.join("profiles")
    }
}

/// `[cri]`: a proxy of CRI's image service in front of containerd's, so that lazy
/// mounts use the pull credentials the kubelet passes (imagePullSecrets). Off by
/// default; the kubelet's `--image-service-endpoint` must name `socket`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CriSection {
    /// Serve the proxy.
    pub enabled: bool,
    /// The socket the kubelet's `--image-service-endpoint` names.
    pub socket: PathBuf,
    /// Permission bits of that socket.
    pub socket_mode: u32,
    /// containerd's CRI socket, where every call is forwarded.
    pub containerd_socket: PathBuf,
    /// Seconds after the last pull that sent a credential until it is forgotten.
    pub credential_ttl_secs: u64,
    /// Most (registry, repository) credential entries kept.
    pub max_credentials: usize,
}

impl Default for CriSection {
    fn default() -> Self {
        CriSection {
            enabled: false,
            socket: PathBuf::from("/run/zest/cri.sock"),
            socket_mode: 0o660,
            containerd_socket: PathBuf::from("/run/containerd/containerd.sock"),
            credential_ttl_secs: 7 * 24 * 3600,
            max_credentials: 1024,
        }
    }
}

impl CriSection {
    /// The directory of the credentials file under the state directory.
    pub fn credentials_dir(state_dir: &Path) -> PathBuf {
        state_dir.join("credentials")
    }
}

/// `[cache]`: the chunk cache shared by every lazily mounted layer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheSection {
    /// Directory of the disk tier; `None`: `<state_dir>/cache`.
    pub dir: Option<PathBuf>,
    /// Decompressed chunks kept in memory.
    pub memory_size: ByteSize,
    /// Disk budget of the persistent tier; 0 disables it.
    pub disk_size: ByteSize,
    /// fsync every chunk file before it is published.
    pub sync_writes: bool,
    /// Most chunk bytes waiting for the disk writer; beyond, chunks stay in memory only.
    pub write_queue_size: ByteSize,
}

impl Default for CacheSection {
    fn default() -> Self {
        CacheSection {
            dir: None,
            memory_size: ByteSize::mib(256),
            disk_size: ByteSize::gib(10),
            sync_writes: false,
            write_queue_size: ByteSize::mib(64),
        }
    }
}

impl CacheSection {
    /// The chunk cache settings, with the disk tier under `state_dir` unless `dir`
    /// names another directory.
    pub fn cache_config(&self, state_dir: &Path) -> CacheConfig {
        CacheConfig {
            memory_bytes: self.memory_size.0,
            disk_bytes: self.disk_size.0,
            disk_root: self.dir.clone().unwrap_or_else(|| state_dir.join("cache")),
            sync_writes: self.sync_writes,
            write_queue_bytes: self.write_queue_size.0,
        }
    }
}

/// `[registry]`: how registries are reached (same meaning as the registry options of
/// `zest convert` and `zest inspect`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistrySection {
    /// Speak plain HTTP to every registry (test setups only).
    pub plain_http: bool,
    /// Registries (`host:port` as in image references) spoken to over plain HTTP.
    pub plain_http_hosts: Vec<String>,
    /// Directory of containerd-style `<host>/hosts.toml` files (mirrors, CAs, ...).
    pub hosts_dir: PathBuf,
    /// Docker `config.json` with credentials; `None`: `$DOCKER_CONFIG/config.json`,
    /// else `~/.docker/config.json` (absent is fine).
    pub docker_config: Option<PathBuf>,
    /// Never send credentials.
    pub anonymous: bool,
    /// Extra PEM CA bundle trusted for every registry, besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// TCP and TLS connection timeout, seconds.
    pub connect_timeout_secs: u64,
    /// Time allowed for response headers of a request, seconds.
    pub request_timeout_secs: u64,
    /// Time allowed for one attempt of a range read, seconds.
    pub range_timeout_secs: u64,
    /// Attempts per request on transient failures (network errors, 5xx, 429).
    pub max_attempts: u32,
}

impl Default for RegistrySection {
    fn default() -> Self {
        let defaults = RegistryConfig::default();
        RegistrySection {
            plain_http: false,
            plain_http_hosts: Vec::new(),
            hosts_dir: PathBuf::from(zest_registry::DEFAULT_HOSTS_DIR),
            docker_config: None,
            anonymous: false,
            ca_file: None,
            connect_timeout_secs: defaults.connect_timeout.as_secs(),
            request_timeout_secs: defaults.request_timeout.as_secs(),
            range_timeout_secs: defaults.range_timeout.as_secs(),
            max_attempts: defaults.retry.max_attempts,
        }
    }
}

impl RegistrySection {
    /// The registry client settings.
    pub fn registry_config(&self) -> RegistryConfig {
        let plain_http = if self.plain_http {
            PlainHttp::Always
        } else if self.plain_http_hosts.is_empty() {
            PlainHttp::Never
        } else {
            PlainHttp::Hosts(self.plain_http_hosts.clone())
        };
        let docker_config = match (&self.docker_config, self.anonymous) {
            (_, true) => DockerConfigSource::Disabled,
            (Some(path), false) => DockerConfigSource::Path(path.clone()),
            (None, false) => DockerConfigSource::Default,
        };
        RegistryConfig {
            hosts_dir: Some(self.hosts_dir.clone()),
            plain_http,
            extra_ca_file: self.ca_file.clone(),
            docker_config,
            connect_timeout: Duration::from_secs(self.connect_timeout_secs),
            request_timeout: Duration::from_secs(self.request_timeout_secs),
            range_timeout: Duration::from_secs(self.range_timeout_secs),
            retry: RetryPolicy {
                max_attempts: self.max_attempts,
                ..RetryPolicy::default()
            },
            ..RegistryConfig::default()
        }
    }
}

/// `[fetch]`: range requests of the lazy read path.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FetchSection {
    /// Largest merged range request.
    pub max_request_size: ByteSize,
    /// Largest hole between two wanted chunks fetched anyway to merge their requests.
    pub max_gap_size: ByteSize,
    /// Compressed bytes of following, uncached chunks fetched along with a read.
    pub readahead_size: ByteSize,
    /// Largest read-ahead window, reached by doubling while a file is read sequentially.
    pub max_readahead_size: ByteSize,
    /// Largest request of prefetch and background fetch.
    pub prefetch_request_size: ByteSize,
    /// Small files following a missed file in blob order fetched with the miss (0 = off).
    pub speculative_neighbour_size: ByteSize,
    /// Small files of a library/module directory fetched on its first miss, and
    /// with twice the budget on each later miss of a small file there, 4 batches at
    /// most (0 = off).
    pub speculative_directory_size: ByteSize,
    /// Largest file fetched speculatively (compressed).
    pub speculative_max_file_size: ByteSize,
    /// Fetches of a chunk failing verification (network failures: `registry.max_attempts`).
    pub attempts: u32,
    /// Timeout of one range read from a local blob file, seconds (registry reads
    /// follow the registry's retry policy).
    pub request_timeout_secs: u64,
    /// Delay before re-fetching a chunk that failed verification, milliseconds; doubles.
    pub retry_backoff_ms: u64,
    /// Deadline of one read from a container, seconds; then it fails with EIO.
    pub read_timeout_secs: u64,
    /// Concurrent range requests per registry for reads that a container waits on.
    pub requests_per_registry: usize,
    /// Concurrent range requests per registry for prefetch and background fetch.
    pub background_requests_per_registry: usize,
}

impl Default for FetchSection {
    fn default() -> Self {
        let d = FetchConfig::default();
        FetchSection {
            max_request_size: ByteSize(d.max_request_bytes),
            max_gap_size: ByteSize(d.max_gap_bytes),
            readahead_size: ByteSize(d.readahead_bytes),
            max_readahead_size: ByteSize(d.max_readahead_bytes),
            prefetch_request_size: ByteSize(d.prefetch_request_bytes),
            speculative_neighbour_size: ByteSize(d.speculative_neighbour_bytes),
            speculative_directory_size: ByteSize(d.speculative_dir_bytes),
            speculative_max_file_size: ByteSize(d.speculative_file_bytes),
            attempts: d.attempts,
            request_timeout_secs: d.request_timeout.as_secs(),
            retry_backoff_ms: d.retry_backoff.as_millis() as u64,
            read_timeout_secs: d.read_timeout.as_secs(),
            requests_per_registry: 16,
            background_requests_per_registry: 2,
        }
    }
}

impl FetchSection {
    /// The fetcher settings.
    pub(crate) fn fetch_config(&self) -> FetchConfig {
        FetchConfig {
            max_request_bytes: self.max_request_size.0,
            max_gap_bytes: self.max_gap_size.0,
            readahead_bytes: self.readahead_size.0,
            max_readahead_bytes: self.max_readahead_size.0,
            prefetch_request_bytes: self.prefetch_request_size.0,
            speculative_neighbour_bytes: self.speculative_neighbour_size.0,
            speculative_dir_bytes: self.speculative_directory_size.0,
            speculative_file_bytes: self.speculative_max_file_size.0,
            attempts: self.attempts,
            request_timeout: Duration::from_secs(self.request_timeout_secs),
            retry_backoff: Duration::from_millis(self.retry_backoff_ms),
            read_timeout: Duration::from_secs(self.read_timeout_secs),
        }
    }
}

/// `[lazy]`: lazy layer mounts.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LazySection {
    /// Mount zstd:chunked layers lazily. Off: every layer is pulled normally.
    pub enabled: bool,
    /// Fetch each layer's prefetch extent (files a startup profile put first) at mount.
    pub prefetch: bool,
    /// Fetch every layer completely in the background after mounting it.
    pub background_fetch: bool,
    /// Rate limit of the background fetch per layer, bytes per second (0: none).
    pub background_fetch_rate: ByteSize,
    /// FUSE worker threads per mounted layer.
    pub fuse_threads: usize,
    /// Serve files whose chunks are all cached by FUSE passthrough (Linux 6.9+):
    /// a verified copy of each is kept in `<state_dir>/passthrough` and handed to
    /// the kernel at open. Off: the kernel opens files without asking the daemon
    /// and reads them through its page cache.
    pub passthrough: bool,
    /// Disk budget of those copies; files beyond it are read through FUSE.
    pub passthrough_size: ByteSize,
    /// Offer FUSE over io_uring to the kernel (Linux 6.14+, fuse module parameter
    /// `enable_uring`); `/dev/fuse` when unavailable. Layers served over io_uring
    /// are released, not kept, when zest stops.
    pub fuse_io_uring: bool,
    /// Refuse layers whose TOC the manifest does not vouch for (no zstd:chunked
    /// `manifest-checksum` annotation; TOC found through the blob's footer only).
    pub require_authenticated_toc: bool,
    /// Fetch the TOCs of an image's following layers in the background while the
    /// first one is being mounted.
    pub toc_prefetch: bool,
    /// TOCs fetched at the same time by that background work.
    pub toc_prefetch_parallelism: usize,
    /// When a program is read from its start (an ELF header), fetch the shared
    /// libraries it needs, found in the image's layers, all at once, instead
    /// of one by one as the dynamic loader misses them; and when an image's
    /// top layer is mounted, do the same for the program its config starts.
    pub library_prefetch: bool,
    /// Most compressed bytes that library prefetch fetches per mounted layer.
    pub library_prefetch_size: ByteSize,
    /// Layer indexes kept in memory for layers that are not mounted (prefetched or
    /// recently unmounted), least recently used dropped first.
    pub max_idle_layers: usize,
    /// Time allowed to fetch a manifest or a TOC while containerd waits, seconds.
    pub mount_timeout_secs: u64,
    /// Before a container gets a lazy layer, check that its registry answers for the
    /// blob, unless it did within this many seconds (0: check every time).
    pub check_interval_secs: u64,
    /// Time allowed for that check, seconds.
    pub check_timeout_secs: u64,
    /// Longest wait between two attempts to mount a stored layer again after a
    /// restart (the registry may be down), seconds.
    pub restore_max_backoff_secs: u64,
    /// containerd's content store (`io.containerd.content.v1.content` under its
    /// root), where an image's manifest and config are read (verified) instead of
    /// fetched again; empty: always fetch them.
    pub containerd_content_dir: PathBuf,
}

impl Default for LazySection {
    fn default() -> Self {
        LazySection {
            enabled: true,
            prefetch: true,
            background_fetch: false,
            background_fetch_rate: ByteSize(0),
            fuse_threads: 4,
            passthrough: false,
            passthrough_size: ByteSize::gib(4),
            fuse_io_uring: false,
            require_authenticated_toc: true,
            toc_prefetch: true,
            toc_prefetch_parallelism: 4,
            library_prefetch: true,
            library_prefetch_size: ByteSize::mib(64),
            max_idle_layers: 64,
            mount_timeout_secs: 60,
            check_interval_secs: 60,
            check_timeout_secs: 10,
            restore_max_backoff_secs: 60,
            containerd_content_dir: PathBuf::from(
                "/var/lib/containerd/io.containerd.content.v1.content",
            ),
        }
    }
}

impl LazySection {
    /// The background fetch setting of a mount.
    pub(crate) fn background(&self) -> Option<BackgroundFetch> {
        self.background_fetch.then_some(BackgroundFetch {
            bytes_per_sec: self.background_fetch_rate.0,
        })
    }
}

impl ServiceConfig {
    /// Reads the whole file from TOML text.
    pub(crate) fn from_toml(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let config: ServiceConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            source: Box::new(e),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_owned(),
            source: e,
        })?;
        Self::from_toml(&text, path)
    }

    /// Checks values that TOML types cannot express.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        self.snapshotter.validate()?;
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.cache.dir.as_ref().is_some_and(|d| !d.is_absolute()) {
            return invalid("cache.dir must be an absolute path");
        }
        if self.registry.max_attempts == 0 || self.fetch.attempts == 0 {
            return invalid("registry.max_attempts and fetch.attempts must be at least 1");
        }
        if self.fetch.requests_per_registry == 0 || self.fetch.background_requests_per_registry == 0
        {
            return invalid(
                "fetch.requests_per_registry and fetch.background_requests_per_registry must be at least 1",
            );
        }
        if self.fetch.max_request_size.0 == 0 || self.fetch.prefetch_request_size.0 == 0 {
            return invalid("fetch.max_request_size and fetch.prefetch_request_size must not be 0");
        }
        let secs = [
            (
                "registry.connect_timeout_secs",
                self.registry.connect_timeout_secs,
            ),
            (
                "registry.request_timeout_secs",
                self.registry.request_timeout_secs,
            ),
            (
                "registry.range_timeout_secs",
                self.registry.range_timeout_secs,
            ),
            (
                "fetch.request_timeout_secs",
                self.fetch.request_timeout_secs,
            ),
            ("fetch.read_timeout_secs", self.fetch.read_timeout_secs),
            ("lazy.mount_timeout_secs", self.lazy.mount_timeout_secs),
            ("lazy.check_timeout_secs", self.lazy.check_timeout_secs),
            (
                "lazy.restore_max_backoff_secs",
                self.lazy.restore_max_backoff_secs,
            ),
        ];
        for (key, value) in secs {
            if value == 0 {
                return Err(ConfigError::Invalid(format!("{key} must be at least 1")));
            }
        }
        if self.lazy.fuse_threads == 0 || self.lazy.fuse_threads > 256 {
            return invalid("lazy.fuse_threads must be between 1 and 256");
        }
        if self.lazy.toc_prefetch_parallelism == 0 {
            return invalid("lazy.toc_prefetch_parallelism must be at least 1");
        }
        if self.cri.socket_mode > 0o777 {
            return invalid("cri.socket_mode is not a permission mode (at most 0o777)");
        }
        if !self.cri.socket.is_absolute() || !self.cri.containerd_socket.is_absolute() {
            return invalid("cri.socket and cri.containerd_socket must be absolute paths");
        }
        if self.cri.enabled && self.cri.socket == self.cri.containerd_socket {
            return invalid(
                "cri.socket must not be containerd's own socket (cri.containerd_socket)",
            );
        }
        if self.profiles.window_secs == 0 || self.profiles.max_local_profiles == 0 {
            return invalid(
                "profiles.window_secs and profiles.max_local_profiles must be at least 1",
            );
        }
        if self.profiles.max_files == 0
            || self.profiles.max_files > zest_format::profile::MAX_PROFILE_ENTRIES
        {
            return Err(ConfigError::Invalid(format!(
                "profiles.max_files must be between 1 and {}",
                zest_format::profile::MAX_PROFILE_ENTRIES
            )));
        }
        if self.cri.credential_ttl_secs == 0 || self.cri.max_credentials == 0 {
            return invalid("cri.credential_ttl_secs and cri.max_credentials must be at least 1");
        }
        Ok(())
    }
}

/// What the command line of `zest serve` may override in the configuration file.
#[derive(Debug, Clone, Default)]
pub struct ConfigOverrides {
    /// Configuration file (must exist); `None` reads [`DEFAULT_CONFIG_PATH`] if it
    /// exists, else takes the defaults.
    pub config: Option<PathBuf>,
    /// Overrides `snapshotter.socket`.
    pub socket: Option<PathBuf>,
    /// Overrides `snapshotter.state_dir`.
    pub state_dir: Option<PathBuf>,
}

impl ConfigOverrides {
    /// The effective configuration of the whole service: the file named by `config`
    /// (which must exist), else the default file if it exists, else the defaults;
    /// then the overrides, then validation.
    pub fn service_config(&self) -> Result<ServiceConfig, ConfigError> {
        let mut config = match &self.config {
            Some(path) => ServiceConfig::load(path)?,
            None => {
                let default = Path::new(DEFAULT_CONFIG_PATH);
                if default.exists() {
                    ServiceConfig::load(default)?
                } else {
                    ServiceConfig::default()
                }
            }
        };
        if let Some(socket) = &self.socket {
            config.snapshotter.socket = socket.clone();
        }
        if let Some(state_dir) = &self.state_dir {
            config.snapshotter.state_dir = state_dir.clone();
        }
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    #[test]
    fn sizes_in_the_file() {
        let text = "[cache]\nmemory_size = \"1GiB\"\ndisk_size = 0\n";
        let config = ServiceConfig::from_toml(text, Path::new("t.toml"));
        let config = config.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.cache.memory_size, ByteSize::gib(1));
        assert_eq!(config.cache.disk_size, ByteSize(0));
    }

    #[test]
    fn packaged_config_is_the_default() -> Result<(), ConfigError> {
        let text = include_str!("../../../packaging/config.toml");
        let service = ServiceConfig::from_toml(text, Path::new("packaging/config.toml"))?;
        assert_eq!(service, ServiceConfig::default());
        Ok(())
    }

    /// Every key of every section appears in the packaged file (commented out when
    /// its default is "unset"), so that the file documents all of them.
    #[test]
    fn packaged_config_documents_every_key() -> Result<(), Box<dyn std::error::Error>> {
        let text = include_str!("../../../packaging/config.toml");
        let value = toml::Value::try_from(ServiceConfig::default())?;
        let sections = value.as_table().ok_or("not a table")?;
        for (section, keys) in sections {
            assert!(
                text.contains(&format!("[{section}]")),
                "[{section}] missing"
            );
            for key in keys.as_table().ok_or("not a table")?.keys() {
                assert!(
                    text.contains(&format!("\n{key} = ")),
                    "{section}.{key} is not documented in packaging/config.toml"
                );
            }
        }
        for optional in ["metrics_address", "dir", "docker_config", "ca_file"] {
            assert!(
                text.contains(&format!("\n# {optional} = ")),
                "optional key {optional} is not documented in packaging/config.toml"
            );
        }
        Ok(())
    }

    #[test]
    fn service_sections_are_strict() {
        let parse = |t: &str| ServiceConfig::from_toml(t, Path::new("t.toml"));
        assert!(parse("[registri]\nplain_http = true\n").is_err());
        assert!(parse("[fetch]\nattempt = 3\n").is_err());
        assert!(parse("[fetch]\nattempts = 0\n").is_err());
        assert!(parse("[lazy]\nfuse_threads = 0\n").is_err());
        assert!(parse("[cache]\ndir = \"relative\"\n").is_err());
        let ok = parse(
            "[snapshotter]\nmetrics_address = \"127.0.0.1:9464\"\n[registry]\nplain_http_hosts = [\"127.0.0.1:5000\"]\n",
        );
        let ok = ok.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            ok.snapshotter.metrics_address,
            Some(SocketAddr::from(([127, 0, 0, 1], 9464)))
        );
        assert_eq!(
            ok.registry.registry_config().plain_http,
            PlainHttp::Hosts(vec!["127.0.0.1:5000".to_owned()])
        );
    }

    #[test]
    fn command_line_overrides_the_file() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("config.toml");
        std::fs::write(
            &file,
            "[snapshotter]\nsocket = \"/a.sock\"\nstate_dir = \"/s\"\n",
        )?;
        let overrides = ConfigOverrides {
            config: Some(file),
            socket: None,
            state_dir: Some(PathBuf::from("/override")),
        };
        let config = overrides.service_config()?.snapshotter;
        assert_eq!(config.socket, PathBuf::from("/a.sock"));
        assert_eq!(config.state_dir, PathBuf::from("/override"));
        let missing = ConfigOverrides {
            config: Some(dir.path().join("absent.toml")),
            ..ConfigOverrides::default()
        };
        assert!(matches!(
            missing.service_config(),
            Err(ConfigError::Read { .. })
        ));
        Ok(())
    }
}
