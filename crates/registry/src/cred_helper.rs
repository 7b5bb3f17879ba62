//! Docker credential helpers: `docker-credential-<name> get`, as `credHelpers` and
//! `credsStore` in `config.json` name them.
//!
//! The helper gets the server URL on stdin and prints `{"Username", "Secret"}` on
//! stdout; a `Username` of `<token>` means the secret is an identity (refresh)
//! token. It runs as a child process driven by the async runtime (never blocking a
//! worker thread), with a timeout after which it is killed, and its answer is
//! cached per host for a bounded time so that a busy lazy mount does not start a
//! process per request. Its output is never logged: it holds the secret.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::credentials::Credential;
use super::error::{ErrorKind, RegistryError};
use zest_oci::DOCKER_HUB;

/// How long a helper's answer (or its "no credentials") is reused for a host.
pub(crate) const HELPER_CACHE_TTL: Duration = Duration::from_secs(300);
/// Hosts whose helper answers are kept at once.
const HELPER_CACHE_ENTRIES: usize = 256;
/// The largest helper answer read.
const MAX_OUTPUT: u64 = 64 << 10;

/// `(helper name, host)`.
type HelperKey = (String, String);
/// A helper's answer and when it was given.
type Answered = (Instant, Option<Credential>);

/// Helper answers by (helper, host), with the time they were fetched.
#[derive(Default)]
pub(crate) struct HelperCache {
    entries: Mutex<HashMap<HelperKey, Answered>>,
    /// One helper run per (helper, host) at a time.
    running: Mutex<HashMap<HelperKey, std::sync::Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for HelperCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Entries hold secrets; only their number is shown.
        f.debug_struct("HelperCache")
            .field("entries", &self.entries.lock().len())
            .finish()
    }
}

impl HelperCache {
    fn cached(&self, key: &HelperKey) -> Option<Option<Credential>> {
        self.entries
            .lock()
            .get(key)
            .filter(|(at, _)| at.elapsed() < HELPER_CACHE_TTL)
            .map(|(_, c)| c.clone())
    }

    /// The credential `helper` gives for `host`, from the cache or by running it.
    pub async fn get(
        &self,
        helper: &str,
        host: &str,
        timeout: Duration,
    ) -> Result<Option<Credential>, RegistryError> {
        let key = (helper.to_string(), host.to_string());
        if let Some(c) = self.cached(&key) {
            return Ok(c);
        }
        let lock = {
            let mut running = self.running.lock();
            if running.len() >= HELPER_CACHE_ENTRIES {
                running.retain(|_, l| std::sync::Arc::strong_count(l) > 1);
            }
            running.entry(key.clone()).or_default().clone()
        };
        let _guard = lock.lock().await;
        if let Some(c) = self.cached(&key) {
            return Ok(c);
        }
        let cred = run_helper(helper, host, timeout).await?;
        let mut entries = self.entries.lock();
        if entries.len() >= HELPER_CACHE_ENTRIES {
            entries.retain(|_, (at, _)| at.elapsed() < HELPER_CACHE_TTL);
            if entries.len() >= HELPER_CACHE_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(key, (Instant::now(), cred.clone()));
        Ok(cred)
    }
}

/// The server URL a helper is asked about: what `docker login` stored it under.
fn server_url(host: &str) -> String {
    if host == DOCKER_HUB {
        "https://index.docker.io/v1/".to_string()
    } else {
        host.to_string()
    }
}

/// Runs `docker-credential-<helper> get` for `host`. `Ok(None)`: the helper has no
/// credentials for it.
pub(crate) async fn run_helper(
    helper: &str,
    host: &str,
    timeout: Duration,
) -> Result<Option<Credential>, RegistryError> {
    let program = format!("docker-credential-{helper}");
    let err = |detail: String, hint: &'static str| RegistryError::Auth {
        kind: ErrorKind::Local,
        host: host.to_string(),
        detail,
        hint,
    };
    let mut child = tokio::process::Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                err(
                    format!("credential helper {program} (named in config.json) is not on PATH"),
                    "install the helper, or remove it from credHelpers/credsStore in config.json",
                )
            } else {
                err(
                    format!("cannot run credential helper {program}: {e}"),
                    "check that the helper is executable",
                )
            }
        })?;
    let mut stdin = child.stdin.take();
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let talk = async {
        if let Some(mut i) = stdin.take() {
            // A helper that exits without reading stdin is judged by its output.
            let _ = i.write_all(server_url(host).as_bytes()).await;
            let _ = i.shutdown().await;
        }
        let mut out = Vec::new();
        let mut errs = Vec::new();
        let read_out = async {
            if let Some(o) = stdout.as_mut() {
                let _ = o.take(MAX_OUTPUT).read_to_end(&mut out).await;
            }
        };
        let read_err = async {
            if let Some(e) = stderr.as_mut() {
                let _ = e.take(MAX_OUTPUT).read_to_end(&mut errs).await;
            }
        };
        tokio::join!(read_out, read_err);
        let status = child.wait().await;
        (status, out, errs)
    };
    let (status, out, errs) = match tokio::time::timeout(timeout, talk).await {
        Ok(r) => r,
        Err(_) => {
            // kill_on_drop ends the helper; say so rather than leave it running.
            return Err(RegistryError::Auth {
                kind: ErrorKind::Timeout,
                host: host.to_string(),
                detail: format!("credential helper {program} did not answer within {timeout:?}"),
                hint: "check the helper (it may be waiting for user input or a locked keyring)",
            });
        }
    };
    let status = status.map_err(|e| {
        err(
            format!("waiting for credential helper {program}: {e}"),
            "check the helper",
        )
    })?;
    let out_text = String::from_utf8_lossy(&out);
    if !status.success() {
        // The protocol's answer for an unknown server, on stdout or stderr.
        let errs_text = String::from_utf8_lossy(&errs);
        if out_text.contains("credentials not found") || errs_text.contains("credentials not found")
        {
            return Ok(None);
        }
        // The helper's own message says why; it is not the secret (that comes only
        // on success), but keep it short.
        let why: String = errs_text
            .trim()
            .chars()
            .chain(out_text.trim().chars())
            .take(200)
            .collect();
        return Err(err(
            format!("credential helper {program} failed ({status}): {why}"),
            "run the helper by hand (echo <host> | docker-credential-<name> get) to see why",
        ));
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        #[serde(rename = "Username", default)]
        username: String,
        #[serde(rename = "Secret", default)]
        secret: String,
    }
    let a: Answer = serde_json::from_slice(&out).map_err(|e| {
        // Never quote the output: it may hold the secret.
        err(
            format!("credential helper {program} printed no valid JSON answer: {e}"),
            "check the helper; it must print {\"Username\": ..., \"Secret\": ...}",
        )
    })?;
    if a.secret.is_empty() && a.username.is_empty() {
        return Ok(None);
    }
    Ok(Some(if a.username == "<token>" {
        Credential::IdentityToken {
            username: a.username,
            token: a.secret,
        }
    } else {
        Credential::Basic {
            username: a.username,
            password: a.secret,
        }
    }))
}
