//! Credentials from a Docker `config.json` (`auths.<host>`).
//!
//! Understood per-host fields: `auth` (base64 `user:password`), `username` +
//! `password`, `identitytoken` (an OAuth2 refresh token, exchanged at the token
//! service) and `registrytoken` (a bearer token used as is). Host keys are normalised
//! (`https://index.docker.io/v1/` → `docker.io`), so keys written by `docker login`,
//! `podman login` and by hand all match. Credential helpers are recorded here
//! (`credHelpers.<host>`, and `credsStore` for every other host) and run by
//! `cred_helper` when a host has no `auths` entry.
//!
//! Also the [`CredentialSource`] abstraction: credentials the client consults before
//! the Docker config (e.g. those the kubelet passes with a CRI pull).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

use super::config::DockerConfigSource;
use super::error::RegistryError;
use zest_oci::DOCKER_HUB;

/// A credential for one registry host.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// User name and password (or personal access token), sent as Basic auth or to
    /// the token service.
    Basic {
        /// User name.
        username: String,
        /// Password.
        password: String,
    },
    /// An OAuth2 refresh token from `docker login` against an identity provider.
    IdentityToken {
        /// User name (often `<token>`), sent with the refresh grant.
        username: String,
        /// The refresh token.
        token: String,
    },
    /// A bearer token used directly for registry requests.
    RegistryToken(String),
}

impl fmt::Debug for Credential {
    // Secrets never reach logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Basic { username, .. } => write!(f, "Basic({username}, ***)"),
            Credential::IdentityToken { username, .. } => {
                write!(f, "IdentityToken({username}, ***)")
            }
            Credential::RegistryToken(_) => write!(f, "RegistryToken(***)"),
        }
    }
}

/// Credentials the client consults before the Docker config, most specific first.
///
/// Implementations answer from memory: they are asked on every request that needs
/// authentication, from async tasks.
pub trait CredentialSource: Send + Sync {
    /// The credential for `repository` (e.g. `library/busybox`) on registry `host`
    /// (normalised, e.g. `localhost:5000`), if this source has one.
    fn credential(&self, host: &str, repository: &str) -> Option<Credential>;
}

/// Credentials by normalised registry host, and where they came from.
#[derive(Debug, Clone, Default)]
pub struct DockerCredentials {
    by_host: HashMap<String, Credential>,
    /// `credHelpers`: helper name (`docker-credential-<name>`) by normalised host.
    helpers: HashMap<String, String>,
    /// `credsStore`: the helper for hosts with neither `auths` nor `credHelpers`.
    store: Option<String>,
    /// The file read, if any (named in error hints).
    pub path: Option<PathBuf>,
}

/// `https://index.docker.io/v1/` → `docker.io`; `HTTP://Host:5000/x` → `host:5000`.
pub fn normalize_host(key: &str) -> String {
    let k = key.trim();
    let k = k
        .strip_prefix("https://")
        .or_else(|| k.strip_prefix("http://"))
        .unwrap_or(k);
    let k = k.split('/').next().unwrap_or("").to_ascii_lowercase();
    match k.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.docker.io" => DOCKER_HUB.to_string(),
        _ => k,
    }
}

#[derive(Deserialize, Default)]
struct RawAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
    #[serde(default)]
    registrytoken: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawConfig {
    #[serde(default)]
    auths: Option<HashMap<String, RawAuth>>,
    #[serde(default)]
    creds_store: Option<String>,
    #[serde(default)]
    cred_helpers: Option<HashMap<String, String>>,
}

impl DockerCredentials {
    /// No credentials.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Parses a `config.json` text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, RegistryError> {
        let cfg_err = |detail: String| RegistryError::Config {
            path: path.to_path_buf(),
            detail,
        };
        let raw: RawConfig = serde_json::from_str(text)
            .map_err(|e| cfg_err(format!("not a valid Docker config.json: {e}")))?;
        let mut by_host = HashMap::new();
        for (key, a) in raw.auths.unwrap_or_default() {
            let host = normalize_host(&key);
            let (mut user, mut pass) = (
                a.username.unwrap_or_default(),
                a.password.unwrap_or_default(),
            );
            if let Some(auth) = a.auth.as_deref().filter(|s| !s.is_empty()) {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|e| cfg_err(format!("auths.{key:?}.auth is not valid base64: {e}")))?;
                let text = String::from_utf8(decoded)
                    .map_err(|_| cfg_err(format!("auths.{key:?}.auth is not UTF-8 text")))?;
                let (u, p) = text.split_once(':').ok_or_else(|| {
                    cfg_err(format!(
                        "auths.{key:?}.auth must encode \"user:password\" (no ':' found)"
                    ))
                })?;
                user = u.to_string();
                pass = p.to_string();
            }
            let cred = if let Some(tok) = a.identitytoken.filter(|t| !t.is_empty()) {
                Credential::IdentityToken {
                    username: user,
                    token: tok,
                }
            } else if let Some(tok) = a.registrytoken.filter(|t| !t.is_empty()) {
                Credential::RegistryToken(tok)
            } else if !user.is_empty() || !pass.is_empty() {
                Credential::Basic {
                    username: user,
                    password: pass,
                }
            } else {
                continue;
            };
            by_host.insert(host, cred);
        }
        let valid_helper = |name: &str| {
            !name.is_empty()
                && name
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c))
        };
        let mut helpers = HashMap::new();
        for (key, name) in raw.cred_helpers.unwrap_or_default() {
            if !valid_helper(&name) {
                return Err(cfg_err(format!(
                    "credHelpers.{key:?} = {name:?} is not a credential helper name (letters, digits, '-', '_', '.')"
                )));
            }
            helpers.insert(normalize_host(&key), name);
        }
        let store = match raw.creds_store.filter(|s| !s.is_empty()) {
            Some(name) if !valid_helper(&name) => {
                return Err(cfg_err(format!(
                    "credsStore = {name:?} is not a credential helper name (letters, digits, '-', '_', '.')"
                )))
            }
            other => other,
        };
        Ok(DockerCredentials {
            by_host,
            helpers,
            store,
            path: Some(path.to_path_buf()),
        })
    }

    /// The default `config.json` location: `$DOCKER_CONFIG/config.json`, else
    /// `$HOME/.docker/config.json`.
    pub fn default_path() -> Option<PathBuf> {
        if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
            return Some(PathBuf::from(dir).join("config.json"));
        }
        std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(|h| PathBuf::from(h).join(".docker").join("config.json"))
    }

    /// Loads credentials as `source` says. A missing default file means no
    /// credentials; a missing explicit file is an error.
    pub fn load(source: &DockerConfigSource) -> Result<Self, RegistryError> {
        let (path, required) = match source {
            DockerConfigSource::Disabled => return Ok(Self::empty()),
            DockerConfigSource::Path(p) => (p.clone(), true),
            DockerConfigSource::Default => match Self::default_path() {
                Some(p) => (p, false),
                None => return Ok(Self::empty()),
            },
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text, &path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(Self::empty()),
            Err(source) => Err(RegistryError::Io {
                op: "read Docker config",
                path,
                source,
            }),
        }
    }

    /// The credential for `host` (any spelling [`normalize_host`] accepts).
    pub fn get(&self, host: &str) -> Option<&Credential> {
        self.by_host.get(&normalize_host(host))
    }

    /// The credential helper to ask for `host` when it has no `auths` entry:
    /// `credHelpers.<host>`, else `credsStore`.
    pub fn helper_for(&self, host: &str) -> Option<&str> {
        self.helpers
            .get(&normalize_host(host))
            .or(self.store.as_ref())
            .map(String::as_str)
    }

    /// Sets the credential helper for `host`, or the default (`credsStore`) when
    /// `host` is `None` (programmatic configuration).
    pub fn set_helper(&mut self, host: Option<&str>, name: &str) {
        match host {
            Some(h) => {
                self.helpers.insert(normalize_host(h), name.to_string());
            }
            None => self.store = Some(name.to_string()),
        }
    }

    /// Adds or replaces a credential (programmatic configuration).
    pub fn insert(&mut self, host: &str, cred: Credential) {
        self.by_host.insert(normalize_host(host), cred);
    }

    /// Whether no credential and no helper is configured.
    pub fn is_empty(&self) -> bool {
        self.by_host.is_empty() && self.helpers.is_empty() && self.store.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_config() {
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice:s3cr:et");
        let text = format!(
            r#"{{"auths": {{
                "https://index.docker.io/v1/": {{"auth": "{b64}"}},
                "LOCALHOST:5000": {{"username": "bob", "password": "pw"}},
                "idp.example.com": {{"auth": "{b64}", "identitytoken": "refresh-me"}},
                "tok.example.com": {{"registrytoken": "bearer-tok"}},
                "empty.example.com": {{}}
            }}, "credHelpers": {{"gcr.io": "gcloud"}}, "HttpHeaders": {{"X": "y"}}}}"#
        );
        let c = DockerCredentials::parse(&text, Path::new("config.json")).unwrap();
        assert_eq!(
            c.get("registry-1.docker.io"),
            Some(&Credential::Basic {
                username: "alice".into(),
                password: "s3cr:et".into()
            })
        );
        assert_eq!(c.get("docker.io"), c.get("index.docker.io"));
        assert_eq!(
            c.get("localhost:5000"),
            Some(&Credential::Basic {
                username: "bob".into(),
                password: "pw".into()
            })
        );
        assert_eq!(
            c.get("idp.example.com"),
            Some(&Credential::IdentityToken {
                username: "alice".into(),
                token: "refresh-me".into()
            })
        );
        assert_eq!(
            c.get("tok.example.com"),
            Some(&Credential::RegistryToken("bearer-tok".into()))
        );
        assert_eq!(c.get("empty.example.com"), None);
        assert_eq!(c.get("gcr.io"), None);
        assert_eq!(c.helper_for("gcr.io"), Some("gcloud"));
        assert_eq!(c.helper_for("other.example"), None);
        // Secrets are not printed.
        let dbg = format!("{:?}", c.get("docker.io").unwrap());
        assert!(!dbg.contains("s3cr"), "{dbg}");
    }

    #[test]
    fn rejects_malformed_config() {
        let p = Path::new("/x/config.json");
        for bad in [
            "{",
            r#"{"auths": {"h": {"auth": "!!!"}}}"#,
            r#"{"auths": {"h": {"auth": "bm9jb2xvbg=="}}}"#,
            r#"{"auths": []}"#,
            r#"{"credsStore": "../evil"}"#,
            r#"{"credHelpers": {"h": "a b"}}"#,
        ] {
            let e = DockerCredentials::parse(bad, p).unwrap_err().to_string();
            assert!(e.contains("/x/config.json"), "{bad}: {e}");
        }
        assert!(DockerCredentials::parse("{}", p).unwrap().is_empty());
    }

    #[test]
    fn load_rules() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("nope.json");
        assert!(DockerCredentials::load(&DockerConfigSource::Path(missing)).is_err());
        assert!(DockerCredentials::load(&DockerConfigSource::Disabled)
            .unwrap()
            .is_empty());
        assert_eq!(
            normalize_host("http://Reg.Example:443/v2/"),
            "reg.example:443"
        );
    }
}
