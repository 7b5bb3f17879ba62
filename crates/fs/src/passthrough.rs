//! FUSE passthrough for fully cached files.
//!
//! Once every chunk of a file is in the chunk cache, the file is written out
//! whole (sparse where it has zero chunks) into a [`PassthroughStore`]; later
//! opens hand the kernel that file as the backing file (Linux 6.9+), so reads
//! and mmap go straight to it without a round trip through this process.
//!
//! Invariants:
//! - a stored file is assembled only from verified chunks (the cache tiers),
//!   and checked against the file's digest when the TOC has one;
//! - the store trusts only files it wrote in this process: files left by an
//!   earlier run are deleted when the store is opened (they are cheap to
//!   rebuild from the chunk cache, and nothing re-verifies them on reads);
//! - disk use stays within the byte budget: beyond it, files are simply not
//!   stored (reads keep working through FUSE);
//! - materialization runs on the fetcher's runtime, never on a FUSE worker.

use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use zest_fetch::Fetcher;
use zest_format::{EntryId, EntryKind};
use zest_oci::digest::{Digest, Hasher};

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("passthrough store {path}: {source}")]
pub struct PassthroughError {
    /// The store directory.
    pub path: PathBuf,
    /// Underlying error.
    #[source]
    pub source: std::io::Error,
}

/// Whole files materialized for FUSE passthrough, keyed by content.
#[derive(Debug)]
pub struct PassthroughStore {
    dir: PathBuf,
    budget: u64,
    min_size: u64,
    used: AtomicU64,
    /// One lock for both sets: a file moves from `pending` to `files` in one
    /// step, so a caller that finds it in neither cannot race a store finishing
    /// and store (and count) it a second time.
    state: Mutex<StoreState>,
}

#[derive(Debug, Default)]
struct StoreState {
    /// Files stored, by key.
    files: HashMap<Digest, PathBuf>,
    /// Files being stored.
    pending: HashSet<Digest>,
}

impl PassthroughStore {
    /// Opens (creating, mode 0700) the store at `dir`, deleting what an earlier
    /// run left. Files smaller than `min_size` are not stored (a FUSE read of a
    /// small file costs little); at most `budget` bytes are stored.
    pub fn open(
        dir: &Path,
        budget: u64,
        min_size: u64,
    ) -> Result<Arc<PassthroughStore>, PassthroughError> {
        let err = |source| PassthroughError {
            path: dir.to_path_buf(),
            source,
        };
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(err)?;
        }
        std::fs::create_dir_all(dir).map_err(err)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
        Ok(Arc::new(PassthroughStore {
            dir: dir.to_path_buf(),
            budget,
            min_size: min_size.max(1),
            used: AtomicU64::new(0),
            state: Mutex::new(StoreState::default()),
        }))
    }

    /// Bytes stored.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Files stored.
    pub fn len(&self) -> usize {
        self.state.lock().files.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The store key of file `id`: its whole-file digest, or for a file without
    /// one, a digest of (TOC digest, inode) — unique to the layer.
    fn key(fetcher: &Fetcher, id: EntryId) -> Digest {
        let e = fetcher.index().entry(id);
        e.digest().unwrap_or_else(|| {
            let mut h = Hasher::new();
            h.update(fetcher.index().toc_digest().as_bytes());
            h.update(&e.ino().to_le_bytes());
            h.finish()
        })
    }

    /// Whether a copy of file `id` is stored.
    pub(crate) fn contains(&self, fetcher: &Fetcher, id: EntryId) -> bool {
        self.state
            .lock()
            .files
            .contains_key(&Self::key(fetcher, id))
    }

    /// Opens the stored copy of file `id`, if there is one. Cheap: an `open(2)`.
    pub(crate) fn open_file(&self, fetcher: &Fetcher, id: EntryId) -> Option<std::fs::File> {
        let key = Self::key(fetcher, id);
        let path = self.state.lock().files.get(&key).cloned()?;
        std::fs::File::open(path).ok()
    }

    /// When every chunk of file `id` is cached and the file is not stored yet,
    /// stores it in the background.
    pub(crate) fn consider(self: &Arc<Self>, fetcher: &Arc<Fetcher>, id: EntryId) {
        let e = fetcher.index().entry(id);
        if e.kind() != EntryKind::Reg || e.size() < self.min_size {
            return;
        }
        let key = Self::key(fetcher, id);
        {
            let state = self.state.lock();
            if state.files.contains_key(&key) || state.pending.contains(&key) {
                return;
            }
        }
        let cache = fetcher.cache();
        let all_cached = e.chunks().iter().all(|c| {
            c.zeros
                || cache.memory().contains(&c.digest)
                || cache.disk().is_some_and(|d| d.contains(&c.digest))
        });
        if !all_cached {
            return;
        }
        {
            let mut state = self.state.lock();
            if state.files.contains_key(&key) || !state.pending.insert(key) {
                return;
            }
        }
        // Reserve the space first, so concurrent stores cannot overshoot.
        let size = e.size();
        let reserved = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                u.checked_add(size).filter(|n| *n <= self.budget)
            })
            .is_ok();
        if !reserved {
            self.state.lock().pending.remove(&key);
            return;
        }
        let store = Arc::clone(self);
        let f = Arc::clone(fetcher);
        fetcher.spawn(async move {
            if let Err(e) = store.materialize(&f, id, key).await {
                store.used.fetch_sub(size, Ordering::Relaxed);
                store.state.lock().pending.remove(&key);
                tracing::warn!(error = %e, "passthrough: file not stored");
            }
        });
    }

    async fn materialize(
        &self,
        fetcher: &Arc<Fetcher>,
        id: EntryId,
        key: Digest,
    ) -> Result<(), String> {
        let e = fetcher.index().entry(id);
        let size = e.size();
        let expected = e.digest();
        let tmp = self
            .dir
            .join(format!(".tmp-{}-{}", key.hex(), std::process::id()));
        let final_path = self.dir.join(key.hex());
        let file = std::fs::File::create(&tmp).map_err(|e| e.to_string())?;
        let mut hasher = Hasher::new();
        let mut off = 0u64;
        // Piecewise through the fetcher (cache tiers; verified bytes only).
        const PIECE: u32 = 4 << 20;
        let result: Result<(), String> = async {
            while off < size {
                let data = fetcher
                    .read(id, off, PIECE)
                    .await
                    .map_err(|e| e.to_string())?;
                if data.is_empty() {
                    return Err("short read while storing a file".into());
                }
                hasher.update(&data);
                let data_len = data.len() as u64;
                // File IO off the async workers.
                let mut f = file.try_clone().map_err(|e| e.to_string())?;
                let write_off = off;
                tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                    // Leave holes for zeros: the result is sparse like the layer.
                    if data.iter().all(|&b| b == 0) {
                        return Ok(());
                    }
                    f.seek(SeekFrom::Start(write_off))?;
                    f.write_all(&data)
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
                off += data_len;
            }
            file.set_len(size).map_err(|e| e.to_string())?;
            if let Some(want) = expected {
                if hasher.finish() != want {
                    return Err(format!("assembled file does not match its digest {want}"));
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        drop(file);
        std::fs::rename(&tmp, &final_path).map_err(|e| e.to_string())?;
        {
            let mut state = self.state.lock();
            state.files.insert(key, final_path);
            state.pending.remove(&key);
        }
        tracing::debug!(file = %e.path(), size, "passthrough: file stored");
        Ok(())
    }
}
