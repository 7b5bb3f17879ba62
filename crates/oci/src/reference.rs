//! Image references: `[registry[:port]/]repository[:tag][@sha256:<hex>]`.
//!
//! Parsing follows the distribution reference grammar and Docker's normalisation: a
//! first path component is a registry only if it contains `.` or `:`, is `localhost`,
//! or is a bracketed IPv6 address; otherwise the registry is Docker Hub (`docker.io`),
//! where one-component names get the `library/` prefix. A reference with neither tag
//! nor digest gets the tag `latest`. `Display` prints the normalised form, and parsing
//! it again gives an equal value.

use std::fmt;
use std::str::FromStr;

use crate::digest::{Digest, DigestParseError};

/// The canonical name of Docker Hub in references.
pub const DOCKER_HUB: &str = "docker.io";
/// The host that actually serves Docker Hub's distribution API.
pub const DOCKER_HUB_ENDPOINT: &str = "registry-1.docker.io";

const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

/// Why an image reference was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    /// Nothing to parse.
    #[error("empty image reference")]
    Empty,
    /// The repository name is longer than the spec allows.
    #[error(
        "invalid image reference {input:?}: repository name longer than {MAX_NAME_LEN} characters"
    )]
    NameTooLong {
        /// The rejected input (truncated).
        input: String,
    },
    /// Bad registry host or port.
    #[error("invalid image reference {input:?}: bad registry {registry:?} (expected host[:port], e.g. registry.example.com:5000, localhost:5000 or [::1]:5000)")]
    InvalidRegistry {
        /// The rejected input (truncated).
        input: String,
        /// The registry part.
        registry: String,
    },
    /// Uppercase letters in the repository path.
    #[error("invalid image reference {input:?}: repository names must be lowercase")]
    Uppercase {
        /// The rejected input (truncated).
        input: String,
    },
    /// Bad repository path component.
    #[error("invalid image reference {input:?}: bad repository path {path:?} (components are lowercase letters and digits separated by '.', '_', '__' or '-', joined by '/')")]
    InvalidRepository {
        /// The rejected input (truncated).
        input: String,
        /// The repository part.
        path: String,
    },
    /// Bad tag.
    #[error("invalid image reference {input:?}: bad tag {tag:?} (letters, digits, '_', '.', '-', at most 128, not starting with '.' or '-')")]
    InvalidTag {
        /// The rejected input (truncated).
        input: String,
        /// The tag part.
        tag: String,
    },
    /// Bad digest.
    #[error("invalid image reference {input:?}: {source}")]
    InvalidDigest {
        /// The rejected input (truncated).
        input: String,
        /// Why the digest was rejected.
        #[source]
        source: DigestParseError,
    },
}

/// A repository in a registry: where blobs and manifests live.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Repository {
    /// Normalised registry host (`docker.io`, `localhost:5000`, `[::1]:5000`), lowercase.
    pub registry: String,
    /// Repository path (`library/busybox`, `team/app`).
    pub name: String,
}

impl Repository {
    /// A repository from already normalised parts; validates both.
    pub fn new(registry: &str, name: &str) -> Result<Self, ReferenceError> {
        let input = format!("{registry}/{name}");
        let registry = normalize_registry(registry, &input)?;
        validate_path(name, &input)?;
        let name = if registry == DOCKER_HUB && !name.contains('/') {
            format!("library/{name}")
        } else {
            name.to_string()
        };
        Ok(Repository { registry, name })
    }

    /// The host (and port) to connect to for this registry by default: Docker Hub's
    /// API lives at `registry-1.docker.io`, every other registry at its own name.
    pub fn endpoint_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_ENDPOINT
        } else {
            &self.registry
        }
    }
}

impl fmt::Display for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.name)
    }
}

/// A parsed, normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry and repository.
    pub repository: Repository,
    /// Tag; `latest` when the input had neither tag nor digest.
    pub tag: Option<String>,
    /// Digest, which takes precedence over the tag when resolving.
    pub digest: Option<Digest>,
}

impl Reference {
    /// What to put after `/manifests/` when resolving: the digest if any, else the tag.
    pub fn manifest_ref(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        }
    }

    /// The same repository pinned to `digest` (the tag is kept for display).
    pub fn with_digest(&self, digest: Digest) -> Reference {
        Reference {
            repository: self.repository.clone(),
            tag: self.tag.clone(),
            digest: Some(digest),
        }
    }

    /// The same repository at `tag`, without digest.
    pub fn with_tag(&self, tag: &str) -> Result<Reference, ReferenceError> {
        validate_tag(tag, tag)?;
        Ok(Reference {
            repository: self.repository.clone(),
            tag: Some(tag.to_string()),
            digest: None,
        })
    }
}

fn clip(s: &str) -> String {
    s.chars().take(300).collect()
}

fn validate_host_port(domain: &str) -> bool {
    let (host, port) = if let Some(rest) = domain.strip_prefix('[') {
        // Bracketed IPv6 literal.
        let Some((addr, after)) = rest.split_once(']') else {
            return false;
        };
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match after {
            "" => return true,
            p => match p.strip_prefix(':') {
                Some(port) => ("", Some(port)),
                None => return false,
            },
        }
    } else {
        match domain.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (domain, None),
        }
    };
    if let Some(port) = port {
        if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
        if port.parse::<u32>().map_or(true, |p| p > 65535) {
            return false;
        }
    }
    if host.is_empty() {
        return domain.starts_with('[');
    }
    host.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    })
}

fn normalize_registry(domain: &str, input: &str) -> Result<String, ReferenceError> {
    if !validate_host_port(domain) {
        return Err(ReferenceError::InvalidRegistry {
            input: clip(input),
            registry: clip(domain),
        });
    }
    let lower = domain.to_ascii_lowercase();
    Ok(match lower.as_str() {
        "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
        _ => lower,
    })
}

fn validate_component(c: &str) -> bool {
    // alnum+ (separator alnum+)*, separator = '.' | '_' | '__' | '-'+
    let b = c.as_bytes();
    if b.is_empty() || !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        let ch = b[i];
        if ch.is_ascii_lowercase() || ch.is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        match ch {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if b.get(i) == Some(&b'_') {
                    i += 1;
                }
            }
            b'-' => {
                while b.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return false,
        }
        // A separator must be followed by an alphanumeric character.
        match b.get(i) {
            Some(n) if n.is_ascii_lowercase() || n.is_ascii_digit() => {}
            _ => return false,
        }
        debug_assert!(i > start);
    }
    true
}

fn validate_path(path: &str, input: &str) -> Result<(), ReferenceError> {
    if path.len() > MAX_NAME_LEN {
        return Err(ReferenceError::NameTooLong { input: clip(input) });
    }
    if path.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(ReferenceError::Uppercase { input: clip(input) });
    }
    if path.is_empty() || !path.split('/').all(validate_component) {
        return Err(ReferenceError::InvalidRepository {
            input: clip(input),
            path: clip(path),
        });
    }
    Ok(())
}

fn validate_tag(tag: &str, input: &str) -> Result<(), ReferenceError> {
    let b = tag.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let ok = !b.is_empty()
        && b.len() <= MAX_TAG_LEN
        && word(b[0])
        && b.iter().all(|&c| word(c) || c == b'.' || c == b'-');
    if ok {
        Ok(())
    } else {
        Err(ReferenceError::InvalidTag {
            input: clip(input),
            tag: clip(tag),
        })
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        if input.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let (rest, digest) = match input.rsplit_once('@') {
            Some((rest, d)) => {
                let digest =
                    d.parse::<Digest>()
                        .map_err(|source| ReferenceError::InvalidDigest {
                            input: clip(input),
                            source,
                        })?;
                (rest, Some(digest))
            }
            None => (input, None),
        };
        // A tag is a ':' after the last '/', so a registry port is never taken for one.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(t) = tag {
            validate_tag(t, input)?;
        }
        let (domain, path) = match name.split_once('/') {
            Some((first, path))
                if first.contains('.')
                    || first.contains(':')
                    || first.starts_with('[')
                    || first == "localhost" =>
            {
                (first, path)
            }
            _ => (DOCKER_HUB, name),
        };
        let registry = normalize_registry(domain, input)?;
        validate_path(path, input)?;
        let name = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_string()
        };
        if name.len() > MAX_NAME_LEN {
            return Err(ReferenceError::NameTooLong { input: clip(input) });
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some("latest".to_string()),
        };
        Ok(Reference {
            repository: Repository { registry, name },
            tag,
            digest,
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    fn r(s: &str) -> Reference {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn docker_hub_normalisation() {
        let x = r("busybox");
        assert_eq!(x.repository.registry, "docker.io");
        assert_eq!(x.repository.name, "library/busybox");
        assert_eq!(x.tag.as_deref(), Some("latest"));
        assert_eq!(x.repository.endpoint_host(), "registry-1.docker.io");
        assert_eq!(x.to_string(), "docker.io/library/busybox:latest");
        assert_eq!(r("team/app:1.0").repository.name, "team/app");
        assert_eq!(
            r("index.docker.io/busybox").repository.registry,
            "docker.io"
        );
        assert_eq!(
            r("docker.io/library/busybox:1").to_string(),
            "docker.io/library/busybox:1"
        );
    }

    #[test]
    fn registries_with_ports_and_ips() {
        let x = r("localhost:5000/app");
        assert_eq!(x.repository.registry, "localhost:5000");
        assert_eq!(x.tag.as_deref(), Some("latest"));
        let x = r("127.0.0.1:5000/a/b/c:v1.2-rc_3");
        assert_eq!(x.repository.registry, "127.0.0.1:5000");
        assert_eq!(x.repository.name, "a/b/c");
        assert_eq!(x.tag.as_deref(), Some("v1.2-rc_3"));
        let x = r("[::1]:5000/app:t");
        assert_eq!(x.repository.registry, "[::1]:5000");
        assert_eq!(x.repository.endpoint_host(), "[::1]:5000");
        let x = r("localhost/app");
        assert_eq!(x.repository.registry, "localhost");
        let x = r("Registry.Example.COM/app");
        assert_eq!(x.repository.registry, "registry.example.com");
    }

    #[test]
    fn digests_and_tags() {
        let x = r(&format!("reg.io/app@{D}"));
        assert_eq!(x.tag, None);
        assert_eq!(x.digest.unwrap().to_string(), D);
        assert_eq!(x.manifest_ref(), D);
        let x = r(&format!("reg.io:443/app:v1@{D}"));
        assert_eq!(x.tag.as_deref(), Some("v1"));
        assert_eq!(x.manifest_ref(), D);
        assert_eq!(r("reg.io/app:v1").manifest_ref(), "v1");
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "busybox",
            "localhost:5000/x/y:z",
            "[::1]/a",
            "quay.io/org/app__x.y-z---w:TAG_1",
            &format!("ghcr.io/a/b:c@{D}"),
            &format!("a@{D}"),
        ] {
            let x = r(s);
            assert_eq!(r(&x.to_string()), x, "{s}");
        }
    }

    #[test]
    fn rejects_invalid() {
        let cases = [
            "",
            "UPPER/case",
            "reg.io/App",
            "reg.io/app:",
            "reg.io/app:-tag",
            "reg.io/app:.tag",
            "reg.io/app@sha256:abc",
            "reg.io/app@md5:00",
            "reg.io//app",
            "reg.io/app/",
            "reg.io/-app",
            "reg.io/app-",
            "reg.io/a___b",
            "reg.io/a..b",
            "reg.io:99999/app",
            "reg.io:/app",
            "-reg.io/app",
            "[zz]:5000/app",
            "reg.io/a b",
            "/app",
        ];
        for s in cases {
            assert!(s.parse::<Reference>().is_err(), "accepted {s:?}");
        }
        let long = format!("reg.io/{}", "a".repeat(300));
        assert!(matches!(
            long.parse::<Reference>(),
            Err(ReferenceError::NameTooLong { .. })
        ));
        let long_tag = format!("reg.io/a:{}", "t".repeat(129));
        assert!(long_tag.parse::<Reference>().is_err());
        let msg = "reg.io/App".parse::<Reference>().unwrap_err().to_string();
        assert!(msg.contains("lowercase"), "{msg}");
    }

    #[test]
    fn repository_new_validates() {
        assert_eq!(
            Repository::new("docker.io", "alpine").unwrap().name,
            "library/alpine"
        );
        assert!(Repository::new("bad host", "x").is_err());
        assert!(Repository::new("localhost:5000", "X").is_err());
        assert_eq!(
            Repository::new("localhost:5000", "a/b")
                .unwrap()
                .to_string(),
            "localhost:5000/a/b"
        );
    }
}
