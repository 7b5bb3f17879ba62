//! The credentials kubelet passed with CRI pulls, by registry host and repository,
//! kept in memory for the registry client and in a root-only file so that a restart
//! of `zest serve` can still mount (and read) layers of private images.
//!
//! The file (`credentials.json` in a 0700 directory, itself 0600) is rewritten whole
//! on every change: written to a temporary file, fsynced, renamed over the old one,
//! and the directory fsynced, so a crash leaves the old or the new file, never a
//! torn one. Entries expire `ttl` after the last pull that sent them (kubelet sends
//! the secret with every pull, so images in use keep theirs fresh); at most
//! `max_entries` are kept, the least recently updated dropped first. Secrets never
//! reach a log: [`std::fmt::Debug`] of these types shows counts only.

use std::collections::HashMap;
use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use zest_registry::{normalize_host, Credential, CredentialSource};

use crate::error::CriError;

/// The file's name inside its directory.
pub const CREDENTIALS_FILE: &str = "credentials.json";
/// The largest credentials file read back (a bound on what a corrupt file costs).
const MAX_FILE_SIZE: u64 = 8 << 20;
const FORMAT_VERSION: u32 = 1;

/// Where and how long credentials are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialStoreConfig {
    /// Directory of the credentials file; created with mode 0700.
    pub dir: PathBuf,
    /// Time after the last pull that sent a credential until it is forgotten.
    pub ttl: Duration,
    /// Most (host, repository) entries kept.
    pub max_entries: usize,
}

/// `(normalised host, repository)`; an empty repository is the host-wide entry.
type Key = (String, String);

#[derive(Clone)]
struct Entry {
    cred: Credential,
    /// Seconds since the epoch of the last pull that sent it.
    updated: u64,
}

/// One entry of the file.
#[derive(Serialize, Deserialize)]
struct StoredEntry {
    host: String,
    #[serde(default)]
    repository: String,
    updated: u64,
    kind: StoredKind,
    #[serde(default)]
    username: String,
    secret: String,
}

#[derive(Serialize, Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum StoredKind {
    Basic,
    IdentityToken,
    RegistryToken,
}

#[derive(Serialize, Deserialize)]
struct StoredFile {
    version: u32,
    entries: Vec<StoredEntry>,
}

/// Credentials from CRI pulls, most specific first: repository, then host.
pub struct CriCredentials {
    config: CredentialStoreConfig,
    entries: Mutex<HashMap<Key, Entry>>,
    /// Serialises file writes, so the last change is the one on disk.
    writing: Mutex<()>,
}

impl std::fmt::Debug for CriCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CriCredentials")
            .field("file", &self.path())
            .field("entries", &self.entries.lock().len())
            .finish()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl CriCredentials {
    /// Opens the store: creates its directory (0700), reads the file if present
    /// and drops expired entries. A file that cannot be parsed is an error naming
    /// it (it is never silently replaced: an operator may want it).
    pub fn open(config: CredentialStoreConfig) -> Result<Self, CriError> {
        let io = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| CriError::Io { op, path, source }
        };
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.dir)
            .map_err(io("create the credentials directory", &config.dir))?;
        // An existing directory keeps its mode through create(): enforce it.
        std::fs::set_permissions(&config.dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io("restrict the credentials directory", &config.dir))?;
        let store = CriCredentials {
            config,
            entries: Mutex::new(HashMap::new()),
            writing: Mutex::new(()),
        };
        let path = store.path();
        let text = match std::fs::metadata(&path) {
            Ok(meta) if meta.len() > MAX_FILE_SIZE => {
                return Err(CriError::Corrupt {
                    path,
                    detail: format!(
                        "{} bytes, more than the {MAX_FILE_SIZE} allowed",
                        meta.len()
                    ),
                })
            }
            Ok(_) => Some(std::fs::read_to_string(&path).map_err(io("read", &path))?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io("read", &path)(e)),
        };
        if let Some(text) = text {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(io("restrict", &path))?;
            let file: StoredFile = serde_json::from_str(&text).map_err(|e| CriError::Corrupt {
                path: path.clone(),
                detail: format!("not a zest credentials file: {e}"),
            })?;
            if file.version != FORMAT_VERSION {
                return Err(CriError::Corrupt {
                    path,
                    detail: format!("format version {} is not {FORMAT_VERSION}", file.version),
                });
            }
            let mut entries = store.entries.lock();
            for e in file.entries {
                let cred = match e.kind {
                    StoredKind::Basic => Credential::Basic {
                        username: e.username,
                        password: e.secret,
                    },
                    StoredKind::IdentityToken => Credential::IdentityToken {
                        username: e.username,
                        token: e.secret,
                    },
                    StoredKind::RegistryToken => Credential::RegistryToken(e.secret),
                };
                entries.insert(
                    (normalize_host(&e.host), e.repository),
                    Entry {
                        cred,
                        updated: e.updated,
                    },
                );
            }
            drop(entries);
            store.prune();
            tracing::info!(
                file = %store.path().display(),
                entries = store.entries.lock().len(),
                "loaded credentials from earlier CRI pulls"
            );
        }
        Ok(store)
    }

    /// The credentials file.
    pub fn path(&self) -> PathBuf {
        self.config.dir.join(CREDENTIALS_FILE)
    }

    /// Number of entries (a repository and its host count separately).
    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    /// Whether there is no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn expired(&self, e: &Entry, now: u64) -> bool {
        now.saturating_sub(e.updated) >= self.config.ttl.as_secs()
    }

    /// Drops expired entries, then the least recently updated beyond the bound.
    fn prune(&self) {
        let now = now_secs();
        let mut entries = self.entries.lock();
        entries.retain(|_, e| now.saturating_sub(e.updated) < self.config.ttl.as_secs());
        if entries.len() > self.config.max_entries {
            let mut by_age: Vec<(Key, u64)> = entries
                .iter()
                .map(|(k, e)| (k.clone(), e.updated))
                .collect();
            // Ties (entries recorded in the same second) break by key, so which
            // entry goes does not depend on the map's iteration order.
            by_age.sort_by(|(ka, a), (kb, b)| a.cmp(b).then_with(|| ka.cmp(kb)));
            let excess = entries.len() - self.config.max_entries;
            for (k, _) in by_age.into_iter().take(excess) {
                entries.remove(&k);
            }
        }
    }

    /// Records `cred` for `repository` on `host` and for the host as a whole, and
    /// writes the file. Blocking (file I/O): call it off the async workers.
    pub fn record(&self, host: &str, repository: &str, cred: Credential) -> Result<(), CriError> {
        let host = normalize_host(host);
        let updated = now_secs();
        {
            let mut entries = self.entries.lock();
            for repo in [repository, ""] {
                entries.insert(
                    (host.clone(), repo.to_string()),
                    Entry {
                        cred: cred.clone(),
                        updated,
                    },
                );
            }
        }
        self.prune();
        self.persist()
    }

    /// Writes every entry to the file atomically.
    fn persist(&self) -> Result<(), CriError> {
        let _writing = self.writing.lock();
        let file = {
            let entries = self.entries.lock();
            StoredFile {
                version: FORMAT_VERSION,
                entries: entries
                    .iter()
                    .map(|((host, repository), e)| {
                        let (kind, username, secret) = match &e.cred {
                            Credential::Basic { username, password } => {
                                (StoredKind::Basic, username.clone(), password.clone())
                            }
                            Credential::IdentityToken { username, token } => {
                                (StoredKind::IdentityToken, username.clone(), token.clone())
                            }
                            Credential::RegistryToken(t) => {
                                (StoredKind::RegistryToken, String::new(), t.clone())
                            }
                        };
                        StoredEntry {
                            host: host.clone(),
                            repository: repository.clone(),
                            updated: e.updated,
                            kind,
                            username,
                            secret,
                        }
                    })
                    .collect(),
            }
        };
        let bytes = serde_json::to_vec(&file).map_err(|e| CriError::Corrupt {
            path: self.path(),
            detail: format!("cannot encode credentials: {e}"),
        })?;
        let path = self.path();
        let tmp = self.config.dir.join(format!(".{CREDENTIALS_FILE}.tmp"));
        let io = |op: &'static str, p: &Path| {
            let path = p.to_path_buf();
            move |source| CriError::Io { op, path, source }
        };
        let _ = std::fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        f.write_all(&bytes).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("fsync", &tmp))?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(io("rename into place", &path))?;
        std::fs::File::open(&self.config.dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync", &self.config.dir))?;
        Ok(())
    }
}

impl CredentialSource for CriCredentials {
    fn credential(&self, host: &str, repository: &str) -> Option<Credential> {
        let now = now_secs();
        let entries = self.entries.lock();
        let host = normalize_host(host);
        [repository, ""]
            .into_iter()
            .filter_map(|repo| entries.get(&(host.clone(), repo.to_string())))
            .find(|e| !self.expired(e, now))
            .map(|e| e.cred.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn config(dir: &Path) -> CredentialStoreConfig {
        CredentialStoreConfig {
            dir: dir.join("creds"),
            ttl: Duration::from_secs(3600),
            max_entries: 4,
        }
    }

    fn basic(u: &str) -> Credential {
        Credential::Basic {
            username: u.into(),
            password: format!("{u}-secret"),
        }
    }

    #[test]
    fn most_specific_first_and_persisted_root_only() {
        let tmp = tempfile::tempdir().unwrap();
        // Room for all five entries this test records (two per pull, the host's
        // shared): the bound is `bounded_and_expiring`'s subject, not this one's.
        let roomy = |dir: &Path| CredentialStoreConfig {
            max_entries: 16,
            ..config(dir)
        };
        let store = CriCredentials::open(roomy(tmp.path())).unwrap();
        store
            .record("LOCALHOST:5000", "team/a", basic("a"))
            .unwrap();
        store
            .record("localhost:5000", "team/b", basic("b"))
            .unwrap();
        // The repository's own entry wins; other repositories get the host's latest.
        assert_eq!(
            store.credential("localhost:5000", "team/a"),
            Some(basic("a"))
        );
        assert_eq!(
            store.credential("localhost:5000", "team/c"),
            Some(basic("b"))
        );
        assert_eq!(store.credential("other:5000", "team/a"), None);
        assert_eq!(
            std::fs::metadata(tmp.path().join("creds")).unwrap().mode() & 0o777,
            0o700
        );
        assert_eq!(
            std::fs::metadata(store.path()).unwrap().mode() & 0o777,
            0o600
        );
        let dbg = format!("{store:?}");
        assert!(!dbg.contains("secret"), "{dbg}");

        // Back after a restart, every kind.
        store
            .record("tok.example", "x", Credential::RegistryToken("rt".into()))
            .unwrap();
        let reopened = CriCredentials::open(roomy(tmp.path())).unwrap();
        assert_eq!(
            reopened.credential("localhost:5000", "team/a"),
            Some(basic("a"))
        );
        assert_eq!(
            reopened.credential("tok.example", "x"),
            Some(Credential::RegistryToken("rt".into()))
        );
    }

    #[test]
    fn bounded_and_expiring() {
        let tmp = tempfile::tempdir().unwrap();
        let store = CriCredentials::open(config(tmp.path())).unwrap();
        for i in 0..10 {
            store.record(&format!("h{i}"), "r", basic("u")).unwrap();
        }
        assert!(store.len() <= 4, "{}", store.len());
        let mut c = config(tmp.path());
        c.ttl = Duration::ZERO;
        let expired = CriCredentials::open(c).unwrap();
        assert!(expired.is_empty());
        assert_eq!(expired.credential("h9", "r"), None);
    }

    #[test]
    fn corrupt_file_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let c = config(tmp.path());
        std::fs::create_dir_all(&c.dir).unwrap();
        std::fs::write(c.dir.join(CREDENTIALS_FILE), "{not json").unwrap();
        let e = CriCredentials::open(c).unwrap_err().to_string();
        assert!(e.contains(CREDENTIALS_FILE), "{e}");
    }
}
