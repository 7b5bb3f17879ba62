//! Errors of the registry client: what failed, on which registry, repository and
//! object, the registry's own error codes, and what the user can do about it.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use zest_oci::digest::Digest;
use zest_oci::OciJsonError;

/// One entry of a registry's error body (`{"errors":[{"code","message","detail"}]}`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct ApiError {
    /// Machine-readable code (`BLOB_UNKNOWN`, `UNAUTHORIZED`, `DENIED`, ...).
    #[serde(default)]
    pub code: String,
    /// Human-readable message.
    #[serde(default)]
    pub message: String,
}

/// The registry's error entries; displays as `: CODE: message; CODE: message`, or
/// nothing when the body had none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApiErrors(pub Vec<ApiError>);

impl ApiErrors {
    /// Parses an error body; anything that is not the standard JSON shape gives an
    /// empty list (the HTTP status still tells what happened).
    pub fn parse(body: &[u8]) -> Self {
        #[derive(serde::Deserialize)]
        struct Body {
            #[serde(default)]
            errors: Vec<ApiError>,
        }
        match serde_json::from_slice::<Body>(body) {
            Ok(b) => ApiErrors(b.errors.into_iter().take(8).collect()),
            Err(_) => ApiErrors(Vec::new()),
        }
    }

    /// Whether any entry has `code`.
    pub fn has_code(&self, code: &str) -> bool {
        self.0.iter().any(|e| e.code == code)
    }
}

impl fmt::Display for ApiErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            let sep = if i == 0 { ": " } else { "; " };
            let msg: String = e.message.chars().take(300).collect();
            write!(f, "{sep}{}: {msg}", e.code)?;
        }
        Ok(())
    }
}

/// What kind of failure an error is: small, stable, and the same through the
/// registry client, the blob sources and the fetcher, so that logs and metrics can
/// tell a missing blob from a denied one, a rate limit, a slow network or corrupt
/// data without parsing messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorKind {
    /// 404: the manifest, tag, blob or repository is unknown.
    NotFound,
    /// 401/403 or a token service refusal: missing, wrong or insufficient credentials.
    Denied,
    /// 429: the registry asks to slow down.
    RateLimited,
    /// 5xx: the registry failed.
    Server,
    /// No answer (or no complete answer) in time.
    Timeout,
    /// No connection, or it broke off mid-answer.
    Transport,
    /// Content that does not hash to its digest.
    DigestMismatch,
    /// An answer that breaks the protocol (wrong range, unexpected status, bad JSON).
    Protocol,
    /// A request that cannot be satisfied as asked (bad range, too large, bad argument).
    Invalid,
    /// Local configuration or file trouble (hosts.toml, CA, config.json, disk).
    Local,
}

impl ErrorKind {
    /// Every kind, in a fixed order (for counters indexed by kind).
    pub const ALL: [ErrorKind; 10] = [
        ErrorKind::NotFound,
        ErrorKind::Denied,
        ErrorKind::RateLimited,
        ErrorKind::Server,
        ErrorKind::Timeout,
        ErrorKind::Transport,
        ErrorKind::DigestMismatch,
        ErrorKind::Protocol,
        ErrorKind::Invalid,
        ErrorKind::Local,
    ];

    /// A stable snake_case label for logs and metric labels.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::Denied => "denied",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::Server => "server_error",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Transport => "transport",
            ErrorKind::DigestMismatch => "digest_mismatch",
            ErrorKind::Protocol => "protocol",
            ErrorKind::Invalid => "invalid",
            ErrorKind::Local => "local",
        }
    }

    /// Whether the same request may succeed later (the client retries these).
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ErrorKind::RateLimited | ErrorKind::Server | ErrorKind::Timeout | ErrorKind::Transport
        )
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// What to do about an unexpected status, with a leading separator.
fn status_hint(status: &u16) -> &'static str {
    match status {
        429 => "; the registry is rate-limiting requests: retry later, or configure credentials for a higher limit",
        500..=599 => "; the registry failed: retry later, or check the registry's health",
        _ => "",
    }
}

/// Errors of [`super::RegistryClient`].
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No connection could be made (after retries).
    #[error("cannot talk to registry {host} at {url}: {detail}{hint}")]
    Connect {
        /// Registry host.
        host: String,
        /// The URL being requested.
        url: String,
        /// The transport's error chain.
        detail: String,
        /// What to try, with a leading separator (may be empty).
        hint: &'static str,
    },
    /// The connection broke off in the middle of an answer (after retries).
    #[error("{what} on {host}/{repository}: the connection broke off: {detail}; the network or the registry is unreliable: retry later")]
    Interrupted {
        /// Registry host.
        host: String,
        /// Repository.
        repository: String,
        /// The operation.
        what: String,
        /// The transport's error chain.
        detail: String,
    },
    /// No answer in time (after retries).
    #[error("{what} on {host}/{repository}: no answer within {timeout:?}; the registry or network is slow or down: retry later or raise the timeout")]
    Timeout {
        /// Registry host.
        host: String,
        /// Repository.
        repository: String,
        /// The operation.
        what: String,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// 401/403: missing, wrong or insufficient credentials.
    #[error("{what} on {host}/{repository}: access denied (HTTP {status}){errors}; {hint}")]
    Unauthorized {
        /// Registry host.
        host: String,
        /// Repository.
        repository: String,
        /// The operation.
        what: String,
        /// 401 or 403.
        status: u16,
        /// The registry's error entries.
        errors: ApiErrors,
        /// What to do.
        hint: String,
    },
    /// Token service or challenge problems.
    #[error("authentication with {host} failed: {detail}; {hint}")]
    Auth {
        /// What kind of failure (denied, unreachable, rate limited, broken answer).
        kind: ErrorKind,
        /// Registry (or token service) host.
        host: String,
        /// What went wrong.
        detail: String,
        /// What to do.
        hint: &'static str,
    },
    /// 404 (manifest, tag, blob or repository unknown).
    #[error("{what} not found in {host}/{repository}{errors}; check the image reference (a blob may have been deleted from the registry since the image was pulled: pull it again)")]
    NotFound {
        /// Registry host.
        host: String,
        /// Repository.
        repository: String,
        /// The object.
        what: String,
        /// The registry's error entries.
        errors: ApiErrors,
    },
    /// Any other unexpected HTTP status (after retries for 5xx/429).
    #[error(
        "{what} on {host}/{repository} failed: HTTP {status}{errors}{}",
        status_hint(status)
    )]
    Status {
        /// Registry host.
        host: String,
        /// Repository.
        repository: String,
        /// The operation.
        what: String,
        /// HTTP status code.
        status: u16,
        /// The registry's error entries.
        errors: ApiErrors,
    },
    /// Content that does not hash to the digest it was requested by (or that the
    /// registry announced for it).
    #[error("content from {host}/{repository} does not match digest {expected} (it hashes to {actual}); the registry, a mirror or a proxy served wrong data")]
    DigestMismatch {
        /// Registry host.
        host: String,
        /// Repository.
        repository: String,
        /// The digest asked for (or announced by the registry).
        expected: Digest,
        /// The digest of what arrived.
        actual: Digest,
    },
    /// A body shorter than announced or requested (after retries).
    #[error("truncated response for {digest} bytes {}..{} from {host}/{repository}: got {got} of {expected} bytes", range.start, range.end)]
    Truncated {
        /// Registry host.
        host: String,
        /// Repository.
        repository: String,
        /// The blob.
        digest: Digest,
        /// The byte range requested (whole blob: `0..size`).
        range: Range<u64>,
        /// Bytes received.
        got: u64,
        /// Bytes expected.
        expected: u64,
    },
    /// A range that is not inside the blob.
    #[error("bytes {}..{} are outside blob {digest} in {host}/{repository}{}", range.start, range.end, blob_size.map(|s| format!(" ({s} bytes)")).unwrap_or_default())]
    RangeNotSatisfiable {
        /// Registry host.
        host: String,
        /// Repository.
        repository: String,
        /// The blob.
        digest: Digest,
        /// The requested range.
        range: Range<u64>,
        /// The blob's size, when the registry said.
        blob_size: Option<u64>,
    },
    /// A response that breaks the distribution protocol.
    #[error("invalid response to {what} from {host}/{repository}: {detail}")]
    Protocol {
        /// Registry host.
        host: String,
        /// Repository.
        repository: String,
        /// The operation.
        what: String,
        /// What was wrong.
        detail: String,
    },
    /// An object larger than the limit zest keeps in memory for it.
    #[error("{what} from {host}/{repository} is larger than the {limit}-byte limit")]
    TooLarge {
        /// Registry host.
        host: String,
        /// Repository.
        repository: String,
        /// The object.
        what: String,
        /// The limit in bytes.
        limit: u64,
    },
    /// A manifest that does not parse, or has no entry for the platform.
    #[error("manifest {reference}: {source}")]
    Manifest {
        /// The manifest's reference.
        reference: String,
        /// The parse error.
        #[source]
        source: OciJsonError,
    },
    /// An index without a manifest for the wanted platform.
    #[error("{reference} has no image for platform {platform} (available: {available}); choose one with --platform")]
    PlatformNotFound {
        /// The index's reference.
        reference: String,
        /// The wanted platform.
        platform: String,
        /// The platforms the index offers.
        available: String,
    },
    /// A registry configuration file (hosts.toml, config.json, CA) is unusable.
    #[error("registry configuration {path}: {detail}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        detail: String,
    },
    /// A local file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A caller error (empty range, mount across registries, ...).
    #[error("invalid request: {0}")]
    InvalidArgument(String),
}

impl RegistryError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RegistryError::Connect { .. }
            | RegistryError::Interrupted { .. }
            | RegistryError::Truncated { .. } => ErrorKind::Transport,
            RegistryError::Timeout { .. } => ErrorKind::Timeout,
            RegistryError::Unauthorized { .. } => ErrorKind::Denied,
            RegistryError::Auth { kind, .. } => *kind,
            RegistryError::NotFound { .. } | RegistryError::PlatformNotFound { .. } => {
                ErrorKind::NotFound
            }
            RegistryError::Status { status: 429, .. } => ErrorKind::RateLimited,
            RegistryError::Status { status, .. } if (500..600).contains(status) => {
                ErrorKind::Server
            }
            RegistryError::Status { .. } | RegistryError::Protocol { .. } => ErrorKind::Protocol,
            RegistryError::DigestMismatch { .. } => ErrorKind::DigestMismatch,
            RegistryError::RangeNotSatisfiable { .. }
            | RegistryError::TooLarge { .. }
            | RegistryError::Manifest { .. }
            | RegistryError::InvalidArgument(_) => ErrorKind::Invalid,
            RegistryError::Config { .. } | RegistryError::Io { .. } => ErrorKind::Local,
        }
    }

    /// Whether another endpoint (a mirror, then the upstream server) might succeed
    /// where this one failed.
    pub(crate) fn allows_fallback(&self) -> bool {
        matches!(
            self,
            RegistryError::Connect { .. }
                | RegistryError::Interrupted { .. }
                | RegistryError::Timeout { .. }
                | RegistryError::NotFound { .. }
                | RegistryError::Unauthorized { .. }
                | RegistryError::Status { .. }
                | RegistryError::Truncated { .. }
                | RegistryError::Protocol { .. }
        )
    }

    /// Whether this is a 404 (unknown manifest, tag or blob).
    pub fn is_not_found(&self) -> bool {
        matches!(self, RegistryError::NotFound { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies() {
        let e = ApiErrors::parse(
            br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry","detail":"sha256:x"}]}"#,
        );
        assert!(e.has_code("BLOB_UNKNOWN"));
        assert_eq!(e.to_string(), ": BLOB_UNKNOWN: blob unknown to registry");
        assert_eq!(ApiErrors::parse(b"<html>").to_string(), "");
        assert_eq!(ApiErrors::parse(br#"{"errors":null}"#).0.len(), 0);
    }

    #[test]
    fn kinds_have_distinct_stable_labels() {
        let labels: std::collections::BTreeSet<_> =
            ErrorKind::ALL.iter().map(|k| k.label()).collect();
        assert_eq!(labels.len(), ErrorKind::ALL.len());
        let status = |status| RegistryError::Status {
            host: "h".into(),
            repository: "r".into(),
            what: "blob x".into(),
            status,
            errors: ApiErrors::default(),
        };
        assert_eq!(status(429).kind(), ErrorKind::RateLimited);
        assert_eq!(status(503).kind(), ErrorKind::Server);
        assert_eq!(status(418).kind(), ErrorKind::Protocol);
        assert!(status(429).to_string().contains("retry later"));
        assert!(status(429).kind().is_transient() && !ErrorKind::NotFound.is_transient());
    }

    #[test]
    fn error_size_is_reasonable() {
        // Errors travel through every async call; keep them small.
        assert!(std::mem::size_of::<RegistryError>() <= 128);
    }
}
