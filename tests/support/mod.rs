//! Shared helpers for integration tests (`mod support;` in each test file).
//!
//! - [`Registry`]: a real Distribution registry (`/usr/bin/docker-registry`) on a free
//!   127.0.0.1 port, with its own storage, config and logs in a temporary directory,
//!   optionally behind htpasswd Basic auth; killed (only that process) on drop.
//! - [`require_tool`], [`require_root_and_fuse`], [`unavailable`]: a missing
//!   prerequisite (system tool, root, `/dev/fuse`, a kernel feature) fails the test
//!   under `CI=true` and skips it loudly elsewhere.
//! - [`token_issuer`]: a real token service issuing signed JWTs for a registry
//!   started with [`Auth::Token`].
//! - [`image`]: small real images built in Rust (ustar layers, gzip, OCI layout).
//! - [`fake_http`]: a loopback HTTP/1.1 server scripted per request, for registry
//!   behaviour a real registry will not show (truncation, retries, token flows).
//! - [`containerd`]: zest's snapshotter in-process, a private containerd, umoci images.
//! - [`scrape_metrics`]: the Prometheus text of a `zest serve` metrics endpoint.
#![allow(dead_code)]

pub mod containerd;
pub mod fake_http;
pub mod image;
pub mod token_issuer;
pub mod tree;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use zest_registry::{DockerConfigSource, PlainHttp, RegistryClient, RegistryConfig, RetryPolicy};

/// Path of the registry binary (Debian package `docker-registry`).
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// Whether this is a CI run (`CI=true`), where a missing prerequisite fails the
/// test instead of skipping it.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// A prerequisite of the test is missing (`what`): panics under `CI=true` (a CI
/// run must not silently skip) telling how to provide it (`remedy`), else prints a
/// loud message and returns `false` so the caller can skip.
pub fn unavailable(what: &str, remedy: &str) -> bool {
    if in_ci() {
        panic!("{what} (CI=true, so this test fails instead of skipping); {remedy}");
    }
    eprintln!("\n!!!!! SKIPPING TEST: {what} !!!!!\n");
    false
}

/// Whether `name` (a command on PATH or an absolute path) exists; see [`unavailable`].
pub fn require_tool(name: &str) -> bool {
    let found = if name.contains('/') {
        Path::new(name).is_file()
    } else {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
            .unwrap_or(false)
    };
    found
        || unavailable(
            &format!("required tool {name:?} is missing"),
            "install it (see the CI setup script)",
        )
}

/// Whether this process may mount FUSE filesystems: it runs as root and
/// `/dev/fuse` exists; see [`unavailable`].
pub fn require_root_and_fuse() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    (root && Path::new("/dev/fuse").exists())
        || unavailable(
            "this test needs root and /dev/fuse",
            "run the tests as root on a machine with FUSE",
        )
}

/// Registry authentication mode.
#[derive(Debug, Clone)]
pub enum Auth {
    /// Anonymous read and write.
    None,
    /// htpasswd (bcrypt) Basic auth with one user.
    Basic { user: String, pass: String },
    /// Bearer tokens from a token service (`auth: token`): `realm` issues them for
    /// [`token_issuer::SERVICE`], signed by the key of the certificate `cert`.
    Token { realm: String, cert: PathBuf },
}

/// A running `docker-registry` on 127.0.0.1.
pub struct Registry {
    child: Child,
    dir: tempfile::TempDir,
    /// The port it listens on.
    pub port: u16,
    /// With TLS: the PEM file of the CA that signed its certificate.
    pub ca: Option<PathBuf>,
}

/// Makes a test CA and a server certificate for 127.0.0.1 signed by it in `dir`
/// (openssl CLI); returns (CA, certificate, key) paths.
pub fn make_tls_material(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (ca_key, ca) = (dir.join("ca.key"), dir.join("ca.pem"));
    let (key, csr, cert) = (
        dir.join("server.key"),
        dir.join("server.csr"),
        dir.join("server.pem"),
    );
    let ext = dir.join("server.ext");
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write extensions file");
    let openssl = |args: &[&std::ffi::OsStr]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let s = |x: &'static str| std::ffi::OsStr::new(x);
    let ec = [
        s("-newkey"),
        s("ec"),
        s("-pkeyopt"),
        s("ec_paramgen_curve:prime256v1"),
        s("-nodes"),
    ];
    let mut ca_args = vec![
        s("req"),
        s("-x509"),
        s("-days"),
        s("2"),
        s("-subj"),
        s("/CN=zest test CA"),
    ];
    ca_args.extend(ec);
    ca_args.extend([s("-keyout"), ca_key.as_os_str(), s("-out"), ca.as_os_str()]);
    openssl(&ca_args);
    let mut csr_args = vec![s("req"), s("-subj"), s("/CN=127.0.0.1")];
    csr_args.extend(ec);
    csr_args.extend([s("-keyout"), key.as_os_str(), s("-out"), csr.as_os_str()]);
    openssl(&csr_args);
    openssl(&[
        s("x509"),
        s("-req"),
        s("-days"),
        s("2"),
        s("-set_serial"),
        s("7"),
        s("-in"),
        csr.as_os_str(),
        s("-CA"),
        ca.as_os_str(),
        s("-CAkey"),
        ca_key.as_os_str(),
        s("-extfile"),
        ext.as_os_str(),
        s("-out"),
        cert.as_os_str(),
    ]);
    (ca, cert, key)
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port on 127.0.0.1");
    l.local_addr().expect("local address").port()
}

/// Whether something answers HTTP on 127.0.0.1:port/v2/ (any status).
fn answers(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let req = format!("GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut buf = [0u8; 12];
    matches!(s.read(&mut buf), Ok(n) if n >= 9 && buf.starts_with(b"HTTP/1."))
}

impl Registry {
    /// Starts a registry, waiting (at most 10 s) until `/v2/` answers. Panics with the
    /// registry's log if it does not come up. Callers check
    /// `require_tool(REGISTRY_BIN)` first.
    pub fn start(auth: Auth) -> Registry {
        Self::start_with(auth, false)
    }

    /// Like [`Registry::start`], serving HTTPS with a certificate from a fresh test CA
    /// ([`Registry::ca`]). Callers check `require_tool("openssl")` first.
    pub fn start_tls(auth: Auth) -> Registry {
        Self::start_with(auth, true)
    }

    fn start_with(auth: Auth, tls: bool) -> Registry {
        let mut last_log = String::new();
        // The free port may be taken between probing and binding: try a few.
        for _ in 0..3 {
            let dir = tempfile::tempdir().expect("temporary directory");
            let port = free_port();
            let auth_section = match &auth {
                Auth::None => String::new(),
                Auth::Basic { user, pass } => {
                    let out = Command::new("htpasswd")
                        .args(["-Bbn", user, pass])
                        .output()
                        .expect("run htpasswd (package apache2-utils)");
                    assert!(out.status.success(), "htpasswd failed: {out:?}");
                    let path = dir.path().join("htpasswd");
                    std::fs::write(&path, &out.stdout).expect("write htpasswd file");
                    format!(
                        "auth:\n  htpasswd:\n    realm: zest-test\n    path: {}\n",
                        path.display()
                    )
                }
                Auth::Token { realm, cert } => format!(
                    "auth:\n  token:\n    realm: {realm}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                    token_issuer::SERVICE,
                    token_issuer::ISSUER,
                    cert.display()
                ),
            };
            let (tls_section, ca) = if tls {
                let (ca, cert, key) = make_tls_material(dir.path());
                (
                    format!(
                        "  tls:\n    certificate: {}\n    key: {}\n",
                        cert.display(),
                        key.display()
                    ),
                    Some(ca),
                )
            } else {
                (String::new(), None)
            };
            let config = format!(
                "version: 0.1\n\
                 log:\n  level: warn\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: true\n  \
                 maintenance:\n    uploadpurging:\n      enabled: false\n\
                 http:\n  addr: 127.0.0.1:{port}\n  secret: zest-test-secret-{port}\n\
                 {tls_section}{auth_section}",
                root = dir.path().join("data").display(),
            );
            let config_path = dir.path().join("config.yml");
            std::fs::write(&config_path, config).expect("write registry config");
            let stdout =
                std::fs::File::create(dir.path().join("access.log")).expect("create access log");
            let stderr = std::fs::File::create(dir.path().join("registry.log"))
                .expect("create registry log");
            let mut cmd = Command::new(REGISTRY_BIN);
            cmd.arg("serve")
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(stdout)
                .stderr(stderr);
            // Environment variables override the config file; make sure none leak in.
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("REGISTRY_") {
                    cmd.env_remove(k);
                }
            }
            let child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("start {REGISTRY_BIN}: {e}"));
            let mut reg = Registry {
                child,
                dir,
                port,
                ca,
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if answers(port) {
                    return reg;
                }
                if let Ok(Some(_)) = reg.child.try_wait() {
                    break; // exited: probably the port was taken
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            last_log = reg.log();
            // Drop kills it and removes its directory.
        }
        panic!("docker-registry did not answer on 127.0.0.1 within 10 s; its log:\n{last_log}");
    }

    /// Freezes (`SIGSTOP`) or thaws (`SIGCONT`) the registry process: while frozen,
    /// connections are accepted by the kernel but nothing is answered.
    #[allow(dead_code)] // not every test binary freezes the registry
    pub fn freeze(&self, frozen: bool) {
        let signal = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) on the process this value started.
            unsafe { libc::kill(pid, signal) };
        }
    }

    /// Stops the registry process, keeping its port, storage and logs for
    /// [`Registry::restart`].
    pub fn stop(&mut self) {
        // Exactly the process this value started.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the registry again (after [`Registry::stop`]) on the same port with the
    /// same storage, appending to the same logs; waits (at most 10 s) until it answers.
    pub fn restart(&mut self) {
        let dir = self.dir.path();
        let open = |name: &str| {
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(dir.join(name))
                .expect("open registry log")
        };
        let mut cmd = Command::new(REGISTRY_BIN);
        cmd.arg("serve")
            .arg(dir.join("config.yml"))
            .stdin(Stdio::null())
            .stdout(open("access.log"))
            .stderr(open("registry.log"));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("REGISTRY_") {
                cmd.env_remove(k);
            }
        }
        self.child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("restart {REGISTRY_BIN}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if answers(self.port) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "docker-registry did not answer again on 127.0.0.1:{} within 10 s; its log:\n{}",
            self.port,
            self.log()
        );
    }

    /// `127.0.0.1:<port>`, the registry part of image references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The temporary directory holding config, storage and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The registry's own log (stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// The access log (stdout), one combined-log-format line per request.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    /// Requests in the access log with `method`, a path containing `path_part`, and
    /// `status` (any status if `None`).
    pub fn count_requests(&self, method: &str, path_part: &str, status: Option<u16>) -> usize {
        // The access log is written asynchronously by the registry: give it a moment.
        std::thread::sleep(Duration::from_millis(100));
        self.access_log()
            .lines()
            .filter(|l| {
                let Some(req) = l.split('"').nth(1) else {
                    return false;
                };
                let mut parts = req.split(' ');
                let (m, p) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let st = l
                    .split('"')
                    .nth(2)
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|s| s.parse::<u16>().ok());
                m == method && p.contains(path_part) && status.is_none_or(|s| st == Some(s))
            })
            .count()
    }

    /// Range GETs (answered 206) of blob `digest`.
    pub fn range_gets(&self, digest: &str) -> usize {
        self.count_requests("GET", &format!("/blobs/{digest}"), Some(206))
    }

    /// A client for this registry over plain HTTP, without credentials or host
    /// files, with fast retries (tests must not sleep long).
    pub fn client(&self) -> RegistryClient {
        RegistryClient::new(self.client_config()).expect("registry client")
    }

    /// The configuration [`Registry::client`] uses, for tests that adjust it.
    pub fn client_config(&self) -> RegistryConfig {
        test_client_config(PlainHttp::Hosts(vec![self.host()]))
    }

    /// Writes a Docker `config.json` with `user:pass` for this registry, returning
    /// its path.
    pub fn write_docker_config(&self, user: &str, pass: &str) -> PathBuf {
        write_docker_config(self.dir.path(), &self.host(), user, pass)
    }
}

/// A client configuration for tests: plain HTTP as given, no host files, no
/// credentials, quick retries and timeouts.
pub fn test_client_config(plain_http: PlainHttp) -> RegistryConfig {
    RegistryConfig {
        hosts_dir: None,
        plain_http,
        docker_config: DockerConfigSource::Disabled,
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(20),
        range_timeout: Duration::from_secs(20),
        retry: RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(100),
            max_retry_after: Duration::from_secs(2),
            ..RetryPolicy::default()
        },
        ..RegistryConfig::default()
    }
}

/// Writes `<dir>/docker/config.json` with Basic credentials for `host`.
pub fn write_docker_config(dir: &Path, host: &str, user: &str, pass: &str) -> PathBuf {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    let d = dir.join("docker");
    std::fs::create_dir_all(&d).expect("create docker config dir");
    let path = d.join("config.json");
    let text = format!(r#"{{"auths": {{"{host}": {{"auth": "{auth}"}}}}}}"#);
    std::fs::write(&path, text).expect("write docker config.json");
    path
}

impl Drop for Registry {
    fn drop(&mut self) {
        // Exactly the process this value started.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Converts the image `src` to zstd:chunked at `dst` (each an `oci:DIR[:TAG]` or a
/// registry reference) with default writer settings, temporary files under `work`.
#[allow(dead_code)] // not every test binary converts
pub async fn convert_image(
    client: &RegistryClient,
    src: &str,
    dst: &str,
    work: &Path,
    platforms: zest_image::convert::PlatformChoice,
) -> Result<zest_image::convert::ConvertReport, zest_image::convert::ConvertError> {
    use zest_store::ImageStore;
    let open = |r: &str| {
        ImageStore::create(&r.parse().expect("image reference"), client).expect("open image store")
    };
    let options = zest_image::convert::ConvertOptions {
        platforms,
        parallelism: 2,
        write: zest_format::WriteOptions::default(),
        work_dir: work.to_path_buf(),
    };
    zest_image::convert::convert(
        &open(src),
        &open(dst),
        &options,
        std::sync::Arc::new(zest_image::convert::NoProgress),
    )
    .await
}

/// The Prometheus text `zest serve` answers on `127.0.0.1:port` at `/metrics`;
/// `None` while nothing answers there (the daemon is starting or gone).
pub async fn scrape_metrics(port: u16) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: zest\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await.ok()?;
    Some(text)
}

/// Unmounts through `unmount`, retrying while the mount is busy. Tests run on
/// threads of one process, and a child forked by another test holds copies of
/// this test's open files until it execs: a file closed just before can keep the
/// mount busy for a moment.
pub fn unmount_settled<E: MaybeBusy>(what: &str, mut unmount: impl FnMut() -> Result<(), E>) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match unmount() {
            Err(e) if e.is_busy() && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other.unwrap_or_else(|e| panic!("{what}: {e}")),
        }
    }
}

/// An unmount error that may only mean "busy for now".
pub trait MaybeBusy: std::fmt::Display {
    fn is_busy(&self) -> bool;
}

impl MaybeBusy for zest_fs::MountError {
    fn is_busy(&self) -> bool {
        matches!(self, zest_fs::MountError::Busy { .. })
    }
}

impl MaybeBusy for zest_mount::SysError {
    fn is_busy(&self) -> bool {
        zest_mount::SysError::is_busy(self)
    }
}
