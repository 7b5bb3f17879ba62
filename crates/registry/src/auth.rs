//! Registry authentication: `WWW-Authenticate` parsing, the bearer token flow, and
//! the per-host scheme and per-(host, scope) token caches.
//!
//! Flow: a request goes out anonymously until a host answers 401; the challenge tells
//! the scheme (Basic, or Bearer with realm/service) and is remembered per host, so
//! later requests, including new scopes, authenticate up front without a wasted round
//! trip. Bearer tokens are cached per (host, scope set) until shortly before they
//! expire, and dropped when the registry rejects them (one re-authentication per
//! request). Credentials never go to a token realm over plain HTTP unless the
//! registry itself is plain HTTP.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;

use super::cred_helper::HelperCache;
use super::credentials::{normalize_host, Credential, CredentialSource, DockerCredentials};
use super::error::{ErrorKind, RegistryError};

/// One challenge of a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Lowercased scheme (`bearer`, `basic`).
    pub scheme: String,
    /// Parameters in order, names lowercased, values unquoted.
    pub params: Vec<(String, String)>,
}

impl Challenge {
    /// The value of parameter `name` (lowercase).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

/// Parses a `WWW-Authenticate` value into its challenges (RFC 9110 syntax): several
/// challenges may share one header, quoted values may contain commas, spaces and
/// backslash escapes. Malformed parts are skipped, never a panic; the loop always
/// advances, so any input terminates.
pub fn parse_www_authenticate(value: &str) -> Vec<Challenge> {
    let b = value.as_bytes();
    let mut i = 0;
    let mut out: Vec<Challenge> = Vec::new();
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && (b[*i] == b' ' || b[*i] == b'\t') {
            *i += 1;
        }
    };
    let skip_ws_commas = |i: &mut usize| {
        while *i < b.len() && matches!(b[*i], b' ' | b'\t' | b',') {
            *i += 1;
        }
    };
    let token = |i: &mut usize| -> String {
        let start = *i;
        while *i < b.len() && is_tchar(b[*i]) {
            *i += 1;
        }
        String::from_utf8_lossy(&b[start..*i]).into_owned()
    };
    while i < b.len() {
        skip_ws_commas(&mut i);
        if i >= b.len() {
            break;
        }
        let scheme = token(&mut i);
        if scheme.is_empty() {
            i += 1; // not a token character: skip it
            continue;
        }
        let mut ch = Challenge {
            scheme: scheme.to_ascii_lowercase(),
            params: Vec::new(),
        };
        loop {
            let save = i;
            skip_ws_commas(&mut i);
            let name = token(&mut i);
            skip_ws(&mut i);
            if name.is_empty() || i >= b.len() || b[i] != b'=' {
                // Either the end, or the next challenge's scheme.
                if name.is_empty() && i < b.len() && !matches!(b[i], b' ' | b'\t' | b',') {
                    // Junk (e.g. a token68 tail): skip to the next comma.
                    while i < b.len() && b[i] != b',' {
                        i += 1;
                    }
                    continue;
                }
                i = save;
                break;
            }
            i += 1; // '='
            skip_ws(&mut i);
            let mut value = Vec::new();
            if i < b.len() && b[i] == b'"' {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' && i + 1 < b.len() {
                        i += 1;
                    }
                    value.push(b[i]);
                    i += 1;
                }
                if i < b.len() {
                    i += 1; // closing quote (absent if unterminated)
                }
            } else {
                while i < b.len() && b[i] != b',' && b[i] != b' ' && b[i] != b'\t' {
                    value.push(b[i]);
                    i += 1;
                }
            }
            ch.params.push((
                name.to_ascii_lowercase(),
                String::from_utf8_lossy(&value).into_owned(),
            ));
        }
        out.push(ch);
    }
    out
}

/// How a host wants to be authenticated, learnt from its 401.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostScheme {
    /// HTTP Basic with the configured credential.
    Basic,
    /// Bearer tokens from `realm` for `service`.
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

#[derive(Clone)]
struct CachedToken {
    value: String,
    refresh_at: Instant,
}

impl std::fmt::Debug for CachedToken {
    // Tokens are secrets: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedToken")
            .field("value", &"***")
            .field("refresh_at", &self.refresh_at)
            .finish()
    }
}

/// A token as issued by a token service.
#[derive(Clone)]
pub(crate) struct IssuedToken {
    pub value: String,
    pub lifetime: Duration,
}

impl std::fmt::Debug for IssuedToken {
    // Tokens are secrets: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedToken")
            .field("value", &"***")
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

/// Serialises token requests for one (host, scope).
type FetchLock = Arc<tokio::sync::Mutex<()>>;

/// Shared authentication state of a client.
#[derive(Default)]
pub(crate) struct AuthState {
    pub creds: DockerCredentials,
    /// Consulted before `creds` (e.g. credentials from CRI pulls).
    source: Option<Arc<dyn CredentialSource>>,
    helpers: HelperCache,
    helper_timeout: Duration,
    schemes: Mutex<HashMap<String, HostScheme>>,
    tokens: Mutex<HashMap<(String, String), CachedToken>>,
    fetching: Mutex<HashMap<(String, String), FetchLock>>,
}

/// The header value for HTTP Basic.
pub(crate) fn basic_header(username: &str, password: &str) -> String {
    let raw = format!("{username}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

impl std::fmt::Debug for AuthState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthState")
            .field("creds", &self.creds)
            .field("source", &self.source.is_some())
            .field("helpers", &self.helpers)
            .finish_non_exhaustive()
    }
}

impl AuthState {
    pub fn new(
        creds: DockerCredentials,
        source: Option<Arc<dyn CredentialSource>>,
        helper_timeout: Duration,
    ) -> Self {
        AuthState {
            creds,
            source,
            helper_timeout,
            ..Default::default()
        }
    }

    pub fn scheme(&self, host: &str) -> Option<HostScheme> {
        self.schemes.lock().get(host).cloned()
    }

    pub fn set_scheme(&self, host: &str, scheme: HostScheme) {
        self.schemes.lock().insert(host.to_string(), scheme);
    }

    pub fn cached_token(&self, host: &str, scope: &str) -> Option<String> {
        let tokens = self.tokens.lock();
        tokens
            .get(&(host.to_string(), scope.to_string()))
            .filter(|t| Instant::now() < t.refresh_at)
            .map(|t| t.value.clone())
    }

    pub fn store_token(&self, host: &str, scope: &str, token: &IssuedToken) {
        // Refresh a little early so a token never expires in flight.
        let margin = (token.lifetime / 5).min(Duration::from_secs(30));
        let refresh_at = Instant::now() + token.lifetime.saturating_sub(margin);
        let mut tokens = self.tokens.lock();
        // Bound the cache: scopes are per repository, so a long-lived client that
        // touches many repositories must not grow without limit.
        if tokens.len() >= 1024 {
            let now = Instant::now();
            tokens.retain(|_, t| t.refresh_at > now);
            if tokens.len() >= 1024 {
                tokens.clear();
            }
        }
        tokens.insert(
            (host.to_string(), scope.to_string()),
            CachedToken {
                value: token.value.clone(),
                refresh_at,
            },
        );
    }

    /// The lock serialising token requests for (host, scope).
    pub fn fetch_lock(&self, host: &str, scope: &str) -> FetchLock {
        let mut locks = self.fetching.lock();
        if locks.len() >= 1024 {
            // Forget locks nobody is holding or waiting for.
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks
            .entry((host.to_string(), scope.to_string()))
            .or_default()
            .clone()
    }

    pub fn drop_token(&self, host: &str, scope: &str) {
        self.tokens
            .lock()
            .remove(&(host.to_string(), scope.to_string()));
    }

    /// The credential for `repository` reached through an endpoint, most specific
    /// first: the extra source (repository, then host: it decides), then the Docker
    /// config's `auths` for the endpoint host, then for the registry it serves, then
    /// the credential helper for the registry (`credHelpers`, then `credsStore`).
    pub async fn credential(
        &self,
        endpoint_host: &str,
        registry: &str,
        repository: &str,
    ) -> Result<Option<Credential>, RegistryError> {
        if let Some(source) = &self.source {
            let from_source = source
                .credential(&normalize_host(endpoint_host), repository)
                .or_else(|| source.credential(&normalize_host(registry), repository));
            if from_source.is_some() {
                return Ok(from_source);
            }
        }
        if let Some(c) = self
            .creds
            .get(endpoint_host)
            .or_else(|| self.creds.get(registry))
        {
            return Ok(Some(c.clone()));
        }
        let host = normalize_host(registry);
        match self.creds.helper_for(&host) {
            Some(helper) => self.helpers.get(helper, &host, self.helper_timeout).await,
            None => Ok(None),
        }
    }
}

/// Parses a token service response: `token` or `access_token`, `expires_in`.
pub(crate) fn parse_token_response(body: &[u8], host: &str) -> Result<IssuedToken, RegistryError> {
    #[derive(serde::Deserialize)]
    struct Resp {
        #[serde(default)]
        token: Option<String>,
        #[serde(default)]
        access_token: Option<String>,
        #[serde(default)]
        expires_in: Option<u64>,
    }
    let r: Resp = serde_json::from_slice(body).map_err(|e| RegistryError::Auth {
        kind: ErrorKind::Protocol,
        host: host.to_string(),
        detail: format!("token service answered with invalid JSON: {e}"),
        hint: "check the registry's token service; a proxy may be intercepting the request",
    })?;
    let value = r
        .token
        .filter(|t| !t.is_empty())
        .or(r.access_token.filter(|t| !t.is_empty()))
        .ok_or_else(|| RegistryError::Auth {
            kind: ErrorKind::Protocol,
            host: host.to_string(),
            detail: "token service response has neither token nor access_token".into(),
            hint: "check the registry's token service",
        })?;
    if value.bytes().any(|c| c.is_ascii_control() || c == b' ') {
        return Err(RegistryError::Auth {
            kind: ErrorKind::Protocol,
            host: host.to_string(),
            detail: "token service returned a token with invalid characters".into(),
            hint: "check the registry's token service",
        });
    }
    // The token specification's default lifetime is 60 s; bound absurd values.
    let secs = r.expires_in.unwrap_or(60).clamp(1, 24 * 3600);
    Ok(IssuedToken {
        value,
        lifetime: Duration::from_secs(secs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_with_commas_in_quotes() {
        let h = r#"Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:a/b:pull,push""#;
        let c = parse_www_authenticate(h);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].param("realm"), Some("https://auth.example.com/token"));
        assert_eq!(c[0].param("service"), Some("registry.example.com"));
        assert_eq!(c[0].param("scope"), Some("repository:a/b:pull,push"));
    }

    #[test]
    fn parses_multiple_challenges_and_odd_spacing() {
        let h = r#"Basic realm="Registry Realm", BEARER  Realm = "https://x/t?a=1" , service=svc,error="insufficient_scope""#;
        let c = parse_www_authenticate(h);
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(c[0].param("realm"), Some("Registry Realm"));
        assert_eq!(c[1].scheme, "bearer");
        assert_eq!(c[1].param("realm"), Some("https://x/t?a=1"));
        assert_eq!(c[1].param("service"), Some("svc"));
        assert_eq!(c[1].param("error"), Some("insufficient_scope"));
    }

    #[test]
    fn parses_escapes_and_survives_garbage() {
        let c = parse_www_authenticate(r#"Bearer realm="a\"b\\c""#);
        assert_eq!(c[0].param("realm"), Some(r#"a"b\c"#));
        assert_eq!(parse_www_authenticate("Basic")[0].scheme, "basic");
        assert!(parse_www_authenticate("").is_empty());
        // Nothing here may panic or loop.
        for junk in [
            "\"",
            "=",
            "Bearer realm=\"unterminated",
            "Bearer ,,,,",
            "Negotiate abc==, Basic realm=x",
            "Bearer realm",
            "Bearer realm=",
            "((((",
            "Bearer a=b c=d",
            "\u{e9}\u{e9} x=y",
        ] {
            let _ = parse_www_authenticate(junk);
        }
        let c = parse_www_authenticate("Negotiate abc==, Basic realm=x");
        assert_eq!(c.last().unwrap().scheme, "basic");
        assert_eq!(c.last().unwrap().param("realm"), Some("x"));
    }

    #[test]
    fn token_responses() {
        let t = parse_token_response(br#"{"token":"abc","expires_in":300}"#, "h").unwrap();
        assert_eq!((t.value.as_str(), t.lifetime.as_secs()), ("abc", 300));
        let t = parse_token_response(br#"{"access_token":"xyz"}"#, "h").unwrap();
        assert_eq!((t.value.as_str(), t.lifetime.as_secs()), ("xyz", 60));
        assert!(parse_token_response(br#"{"token":""}"#, "h").is_err());
        assert!(parse_token_response(b"<html>", "h").is_err());
        assert!(parse_token_response(br#"{"token":"a\nb"}"#, "h").is_err());
    }

    struct Source;

    impl CredentialSource for Source {
        fn credential(&self, host: &str, repository: &str) -> Option<Credential> {
            (host == "cri.example" && repository == "team/app")
                .then(|| Credential::RegistryToken("from-cri".into()))
        }
    }

    #[tokio::test]
    async fn credential_order() {
        let mut creds = DockerCredentials::empty();
        let basic = Credential::Basic {
            username: "u".into(),
            password: "p".into(),
        };
        creds.insert("cri.example", basic.clone());
        creds.insert("mirror.example", Credential::RegistryToken("mirror".into()));
        // A helper that does not exist: only reached when nothing else answers.
        creds.set_helper(None, "zest-test-absent-helper");
        let s = AuthState::new(creds, Some(Arc::new(Source)), Duration::from_secs(1));
        let get = |ep: &'static str, reg: &'static str, repo: &'static str| {
            let s = &s;
            async move { s.credential(ep, reg, repo).await }
        };
        // The source first, for its repository.
        assert_eq!(
            get("CRI.example", "cri.example", "team/app").await.unwrap(),
            Some(Credential::RegistryToken("from-cri".into()))
        );
        // Then config.json, for the endpoint host before the registry.
        assert_eq!(
            get("cri.example", "cri.example", "team/other")
                .await
                .unwrap(),
            Some(basic.clone())
        );
        assert_eq!(
            get("mirror.example", "cri.example", "team/other")
                .await
                .unwrap(),
            Some(Credential::RegistryToken("mirror".into()))
        );
        // Then the helper, whose absence is an error naming it.
        let e = get("other.example", "other.example", "x")
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("docker-credential-zest-test-absent-helper"),
            "{e}"
        );
        let dbg = format!("{s:?}");
        assert!(
            !dbg.contains("from-cri") && !dbg.contains("mirror\""),
            "{dbg}"
        );
    }

    #[test]
    fn token_cache_expiry() {
        let s = AuthState::default();
        s.store_token(
            "h",
            "scope",
            &IssuedToken {
                value: "t".into(),
                lifetime: Duration::from_secs(300),
            },
        );
        assert_eq!(s.cached_token("h", "scope").as_deref(), Some("t"));
        assert_eq!(s.cached_token("h", "other"), None);
        s.store_token(
            "h",
            "short",
            &IssuedToken {
                value: "t".into(),
                lifetime: Duration::from_secs(0),
            },
        );
        assert_eq!(s.cached_token("h", "short"), None);
        s.drop_token("h", "scope");
        assert_eq!(s.cached_token("h", "scope"), None);
        assert_eq!(basic_header("a", "b"), "Basic YTpi");
    }
}
