//! The snapshot logic, with the semantics of containerd's overlayfs snapshotter:
//! directory layout, mounts, the snapshot life cycle, and the remote-layer hook.
//!
//! Layout under the state directory:
//!
//! ```text
//! metadata.redb            snapshot metadata (see meta.rs)
//! snapshots/<id>/fs        the snapshot's upper directory, or a remote layer's mount
//! snapshots/<id>/work      overlayfs work directory (active snapshots)
//! snapshots/new-<random>   a directory being prepared (renamed to <id> on success)
//! empty                    an empty directory, the lower directory of parentless
//!                          layers being unpacked (see `mounts_for`)
//! ```
//!
//! Crash ordering: a directory is created and renamed into place (and the rename
//! synced) inside the metadata transaction, before it commits; a removal commits the
//! metadata first and deletes the directory after. So a crash can leave at worst an
//! orphan directory, which [`SnapshotStore::cleanup`] deletes, and never a record
//! whose directory is missing. Directories claimed by an operation in flight are
//! never treated as orphans.
//!
//! This module knows nothing about gRPC; the error enum says which code to send.

use parking_lot::Mutex;
use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::filter::{Filter, FilterTarget};
use super::fsutil;
use super::meta::{Ancestor, MetaStore, NewSnapshot, Record};
use super::remote::{
    Fallback, FallbackCounters, FallbackReason, RemoteLayer, RemoteLayerProvider,
    RemoteLayerRequest,
};
use super::types::{normalize_labels, Info, Kind, Labels, Mount, SnapshotError, Usage};
use zest_api::labels::{LABEL_REMOTE, LABEL_SNAPSHOT_REF};

/// Options of a [`SnapshotStore`].
#[derive(Clone)]
pub struct StoreOptions {
    /// Extra overlayfs mount options appended to every overlay mount. `index=off` is
    /// added automatically when the kernel supports the option and no `index` option
    /// is given, as containerd's overlay snapshotter does.
    pub overlay_options: Vec<String>,
    /// Mounts image layers remotely (lazy pulling).
    pub provider: Arc<dyn RemoteLayerProvider>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            overlay_options: Vec::new(),
            provider: Arc::new(super::remote::NoRemoteLayers),
        }
    }
}

/// The snapshot store: metadata plus directories plus the remote-layer provider.
/// Cheap to clone; all clones share one store.
#[derive(Clone)]
pub struct SnapshotStore {
    inner: Arc<Inner>,
}

struct Inner {
    snapshots_dir: PathBuf,
    empty_dir: PathBuf,
    meta: MetaStore,
    provider: Arc<dyn RemoteLayerProvider>,
    overlay_options: Vec<String>,
    fallbacks: FallbackCounters,
    busy: Busy,
}

/// Names of entries of `snapshots/` that an operation in flight owns.
#[derive(Clone, Default)]
struct Busy(Arc<Mutex<HashSet<String>>>);

/// Releases a [`Busy`] claim when dropped.
struct BusyGuard {
    busy: Busy,
    name: String,
}

impl Busy {
    fn claim(&self, name: String) -> BusyGuard {
        self.0.lock().insert(name.clone());
        BusyGuard {
            busy: self.clone(),
            name,
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.0.lock().contains(name)
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.busy.0.lock().remove(&self.name);
    }
}

/// Outcome of the remote-layer attempt of a prepare.
enum RemoteOutcome {
    /// The layer is committed under its chain ID: answer ALREADY_EXISTS.
    Committed(String),
    /// Pull normally.
    Fallback(Fallback),
    /// The request is invalid (parent missing or not committed): the normal path
    /// reports the precise error; nothing to count.
    Invalid,
}

impl SnapshotStore {
    /// Opens the store in `state_dir`, creating it if needed.
    pub fn open(state_dir: &Path, options: StoreOptions) -> Result<Self, SnapshotError> {
        let mut builder = fs::DirBuilder::new();
        builder.recursive(true).mode(0o700);
        builder
            .create(state_dir)
            .map_err(|e| SnapshotError::io("create state directory", state_dir, e))?;
        let snapshots_dir = state_dir.join("snapshots");
        builder
            .create(&snapshots_dir)
            .map_err(|e| SnapshotError::io("create directory", &snapshots_dir, e))?;
        let empty_dir = state_dir.join("empty");
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&empty_dir)
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => Ok(()),
                _ => Err(e),
            })
            .map_err(|e| SnapshotError::io("create directory", &empty_dir, e))?;
        let meta = MetaStore::open(&state_dir.join("metadata.redb"))?;
        let mut overlay_options = options.overlay_options;
        let has_index = overlay_options
            .iter()
            .any(|o| o == "index" || o.starts_with("index="));
        if !has_index && fsutil::overlay_supports_index() {
            overlay_options.push("index=off".to_owned());
        }
        Ok(SnapshotStore {
            inner: Arc::new(Inner {
                snapshots_dir,
                empty_dir,
                meta,
                provider: options.provider,
                overlay_options,
                fallbacks: FallbackCounters::default(),
                busy: Busy::default(),
            }),
        })
    }

    /// Number of layers pulled normally instead of remotely, per reason code.
    pub fn fallback_counts(&self) -> std::collections::BTreeMap<FallbackReason, u64> {
        self.inner.fallbacks.snapshot()
    }

    /// The remote layer provider.
    pub fn provider(&self) -> &Arc<dyn RemoteLayerProvider> {
        &self.inner.provider
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, SnapshotError> + Send + 'static,
    ) -> Result<T, SnapshotError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| SnapshotError::Internal(format!("snapshot task failed: {e}")))?
    }

    /// Creates an active snapshot `key` on top of committed `parent` and returns its
    /// mounts. When the labels describe an image layer that the remote layer provider
    /// can mount, the layer is committed under its chain ID instead and the answer is
    /// [`SnapshotError::AlreadyExists`] (containerd's remote snapshot handshake).
    pub async fn prepare(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> Result<Vec<Mount>, SnapshotError> {
        check_key(key)?;
        let labels = normalize_labels(labels)?;
        match RemoteLayerRequest::from_labels(parent, &labels) {
            // An image layer being unpacked by a client that sends no labels at all
            // (containerd 1.6's `ctr images pull`): say so, it cannot be lazy.
            Ok(None) if is_unpack_key(key) => self.record_fallback(
                key,
                &Fallback::new(
                    FallbackReason::MissingLabels,
                    format!("the client sent no {LABEL_SNAPSHOT_REF} label for this layer; lazy pulling needs a client that passes the layer labels (CRI, or zest's own pull)"),
                ),
            ),
            Ok(None) => {}
            Ok(Some(request)) => match self.try_remote(key, request).await? {
                RemoteOutcome::Committed(chain_id) => {
                    return Err(SnapshotError::AlreadyExists(format!(
                        "target snapshot {chain_id}"
                    )))
                }
                RemoteOutcome::Fallback(reason) => self.record_fallback(key, &reason),
                RemoteOutcome::Invalid => {}
            },
            Err(reason) => self.record_fallback(key, &reason),
        }
        self.create(Kind::Active, key, parent, labels).await
    }

    /// Creates a read-only view `key` of committed `parent` and returns its mounts.
    pub async fn view(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> Result<Vec<Mount>, SnapshotError> {
        check_key(key)?;
        let labels = normalize_labels(labels)?;
        self.create(Kind::View, key, parent, labels).await
    }

    fn record_fallback(&self, key: &str, fallback: &Fallback) {
        self.inner.fallbacks.record(fallback);
        let reason = fallback.reason.code();
        if fallback.reason == FallbackReason::NotConfigured {
            tracing::info!(key, reason, detail = %fallback.detail, "layer is pulled normally");
        } else {
            tracing::warn!(key, reason, detail = %fallback.detail, "layer is pulled normally instead of lazily");
        }
    }

    async fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> Result<Vec<Mount>, SnapshotError> {
        if let Some(parent) = parent {
            // Remote layers below must be able to serve reads before a container
            // gets them as its lower directories.
            let parent = parent.to_owned();
            let chain = self
                .blocking(move |inner| {
                    Ok(inner
                        .meta
                        .get_with_ancestors(&parent)?
                        .map(|(record, mut chain)| {
                            chain.insert(
                                0,
                                Ancestor {
                                    id: record.id,
                                    name: parent,
                                    remote: record.remote,
                                },
                            );
                            chain
                        })
                        .unwrap_or_default())
                })
                .await?;
            self.check_remote(&chain).await?;
        }
        let new = NewSnapshot {
            key: key.to_owned(),
            kind,
            parent: parent.map(str::to_owned),
            labels,
            remote: None,
            id: None,
        };
        self.blocking(move |inner| inner.create_local(new)).await
    }

    /// Checks every remote layer of `chain` at once (each check may be a round
    /// trip to a registry); the first failure is the answer.
    async fn check_remote(&self, chain: &[Ancestor]) -> Result<(), SnapshotError> {
        let checks = chain.iter().filter_map(|ancestor| {
            let layer = ancestor.remote.as_ref()?;
            Some(async move {
                let dir = self.inner.fs_dir(ancestor.id);
                self.inner.provider.check(layer, &dir).await.map_err(|e| {
                    SnapshotError::Unavailable(format!(
                        "remote layer {} ({}) is unavailable: {e}",
                        ancestor.name,
                        dir.display()
                    ))
                })
            })
        });
        futures::future::try_join_all(checks).await?;
        Ok(())
    }

    async fn try_remote(
        &self,
        key: &str,
        request: RemoteLayerRequest,
    ) -> Result<RemoteOutcome, SnapshotError> {
        let chain_id = request.chain_id.clone();
        // Already here (another namespace pulled the same image, or containerd retries)?
        let (existing, parent_ok) = {
            let chain_id = chain_id.clone();
            let parent = request.parent.clone();
            self.blocking(move |inner| {
                let existing = inner.meta.get(&chain_id)?;
                let parent_ok = match &parent {
                    None => true,
                    Some(p) => inner
                        .meta
                        .get(p)?
                        .is_some_and(|r| r.kind == Kind::Committed),
                };
                Ok((existing, parent_ok))
            })
            .await?
        };
        if let Some(existing) = existing {
            return Ok(if same_layer(&existing, &request) {
                RemoteOutcome::Committed(chain_id)
            } else {
                RemoteOutcome::Fallback(Fallback::new(
                    FallbackReason::Conflict,
                    format!("snapshot {chain_id} exists with another parent or origin"),
                ))
            });
        }
        if !parent_ok {
            return Ok(RemoteOutcome::Invalid);
        }

        let id = self.blocking(|inner| inner.meta.reserve_id()).await?;
        let guard = self.inner.busy.claim(id.to_string());
        let dir = self.inner.snapshot_dir(id);
        let fs_dir = self.inner.fs_dir(id);
        {
            let (dir, fs_dir) = (dir.clone(), fs_dir.clone());
            self.blocking(move |_| {
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&dir)
                    .map_err(|e| SnapshotError::io("create directory", &dir, e))?;
                fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&fs_dir)
                    .map_err(|e| SnapshotError::io("create directory", &fs_dir, e))
            })
            .await?;
        }
        let mounted = match self.inner.provider.try_mount(&request, &fs_dir).await {
            Ok(mounted) => mounted,
            Err(reason) => {
                self.discard_dir(dir, None).await;
                drop(guard);
                return Ok(RemoteOutcome::Fallback(reason));
            }
        };
        let layer = RemoteLayer {
            request: request.clone(),
            mounted,
        };
        let mut labels: Labels = request
            .labels
            .iter()
            .filter(|(k, _)| k.starts_with("containerd.io/snapshot/") || *k == LABEL_SNAPSHOT_REF)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.insert(LABEL_SNAPSHOT_REF.to_owned(), chain_id.clone());
        labels.insert(LABEL_REMOTE.to_owned(), "true".to_owned());
        let new = NewSnapshot {
            key: chain_id.clone(),
            kind: Kind::Committed,
            parent: request.parent.clone(),
            labels,
            remote: Some(layer.clone()),
            id: Some(id),
        };
        let created = self
            .blocking(move |inner| {
                inner
                    .meta
                    .create(new, |_, _| fsutil::sync_dir(&inner.snapshots_dir))
            })
            .await;
        match created {
            Ok(_) => {
                tracing::info!(key, chain_id = %chain_id, id, "layer mounted remotely");
                drop(guard);
                Ok(RemoteOutcome::Committed(chain_id))
            }
            Err(e) => {
                self.discard_dir(dir, Some(&layer)).await;
                drop(guard);
                match e {
                    // A concurrent prepare of the same layer won the race.
                    SnapshotError::AlreadyExists(_) => {
                        let chain = chain_id.clone();
                        let winner = self.blocking(move |inner| inner.meta.get(&chain)).await?;
                        Ok(match winner {
                            Some(w) if same_layer(&w, &request) => {
                                RemoteOutcome::Committed(chain_id)
                            }
                            _ => RemoteOutcome::Fallback(Fallback::new(
                                FallbackReason::Conflict,
                                format!("snapshot {key} or {chain_id} exists already"),
                            )),
                        })
                    }
                    other => Err(other),
                }
            }
        }
    }

    /// Unmounts (through the provider, if remote) and deletes a snapshot directory
    /// whose record does not exist (any more). Failures are logged: the directory is
    /// an orphan that cleanup will retry.
    async fn discard_dir(&self, dir: PathBuf, remote: Option<&RemoteLayer>) {
        if let Some(layer) = remote {
            if let Err(e) = self.inner.provider.unmount(layer, &dir.join("fs")).await {
                tracing::warn!(path = %dir.display(), error = %e, "remote layer unmount failed");
            }
        }
        let path = dir.clone();
        if let Err(e) = self
            .blocking(move |_| Ok(zest_mount::remove_tree(&path)?))
            .await
        {
            tracing::warn!(path = %dir.display(), error = %e, "cannot remove snapshot directory; cleanup will retry");
        }
    }

    /// The mounts of active or view snapshot `key`.
    pub async fn mounts(&self, key: &str) -> Result<Vec<Mount>, SnapshotError> {
        let unpack = is_unpack_key(key);
        let key = key.to_owned();
        let (record, chain) = self
            .blocking(move |inner| {
                inner
                    .meta
                    .get_with_ancestors(&key)?
                    .ok_or_else(|| SnapshotError::NotFound(format!("snapshot {key}")))
                    .and_then(|(record, chain)| {
                        if record.kind == Kind::Committed {
                            Err(SnapshotError::FailedPrecondition(format!(
                                "snapshot {key:?} is not active or view"
                            )))
                        } else {
                            Ok((record, chain))
                        }
                    })
            })
            .await?;
        self.check_remote(&chain).await?;
        Ok(self
            .inner
            .mounts_for(record.kind, record.id, &chain, unpack))
    }

    /// Commits active snapshot `key` as `name`. `labels` replace the snapshot's labels;
    /// `parent` may give a parentless snapshot a parent.
    pub async fn commit(
        &self,
        name: &str,
        key: &str,
        labels: Labels,
        parent: Option<&str>,
    ) -> Result<(), SnapshotError> {
        check_key(name)?;
        let labels = normalize_labels(labels)?;
        let (name, key, parent) = (name.to_owned(), key.to_owned(), parent.map(str::to_owned));
        self.blocking(move |inner| {
            let record = inner
                .meta
                .get(&key)?
                .ok_or_else(|| SnapshotError::NotFound(format!("snapshot {key}")))?;
            // Usage is recorded at commit time, as containerd does: the upper
            // directory is immutable from now on.
            let usage = if record.kind == Kind::Active {
                fsutil::disk_usage(&inner.fs_dir(record.id))?
            } else {
                Usage::default()
            };
            inner
                .meta
                .commit(&key, &name, labels, parent.as_deref(), usage)
                .map(|_| ())
        })
        .await
    }

    /// Removes snapshot `key` (it must have no children) and deletes its directory.
    pub async fn remove(&self, key: &str) -> Result<(), SnapshotError> {
        let key_owned = key.to_owned();
        let (record, guard) = self
            .blocking(move |inner| {
                let mut guard = None;
                let record = inner.meta.remove(&key_owned, |record| {
                    guard = Some(inner.busy.claim(record.id.to_string()));
                })?;
                Ok((record, guard))
            })
            .await?;
        tracing::debug!(key, id = record.id, "snapshot removed");
        self.discard_dir(self.inner.snapshot_dir(record.id), record.remote.as_ref())
            .await;
        drop(guard);
        Ok(())
    }

    /// Info of snapshot `key`.
    pub async fn stat(&self, key: &str) -> Result<Info, SnapshotError> {
        let key = key.to_owned();
        self.blocking(move |inner| {
            inner
                .meta
                .get(&key)?
                .map(|record| record.info(&key))
                .ok_or_else(|| SnapshotError::NotFound(format!("snapshot {key}")))
        })
        .await
    }

    /// Updates the labels of `info.name` as selected by `field_paths`: `labels`
    /// replaces all labels, `labels.<key>` sets (or, with an empty or absent value,
    /// deletes) one. No paths means `labels`. Name, parent and kind are immutable.
    pub async fn update(
        &self,
        info: UpdateInfo,
        field_paths: &[String],
    ) -> Result<Info, SnapshotError> {
        let paths: Vec<String> = if field_paths.is_empty() {
            vec!["labels".to_owned()]
        } else {
            field_paths.to_vec()
        };
        for path in &paths {
            if path != "labels" && !path.starts_with("labels.") {
                return Err(SnapshotError::InvalidArgument(format!(
                    "cannot update {path:?} field on snapshot {:?}: only labels are mutable",
                    info.name
                )));
            }
        }
        let new_labels = normalize_labels(info.labels)?;
        let name = info.name;
        self.blocking(move |inner| {
            let record = inner.meta.update_labels(&name, |labels| {
                for path in &paths {
                    match path.strip_prefix("labels.") {
                        Some(key) => match new_labels.get(key) {
                            Some(value) => {
                                labels.insert(key.to_owned(), value.clone());
                            }
                            None => {
                                labels.remove(key);
                            }
                        },
                        None => *labels = new_labels.clone(),
                    }
                }
                Ok(())
            })?;
            Ok(record.info(&name))
        })
        .await
    }

    /// Snapshots matching any of `filters` (containerd filter syntax), by name.
    pub async fn list(&self, filters: &[String]) -> Result<Vec<Info>, SnapshotError> {
        let filter = Filter::parse_all(filters)
            .map_err(|e| SnapshotError::InvalidArgument(e.to_string()))?;
        self.blocking(move |inner| {
            Ok(inner
                .meta
                .list()?
                .into_iter()
                .filter(|(name, record)| {
                    filter.matches(&FilterTarget {
                        name,
                        parent: record.parent.as_deref(),
                        kind: record.kind,
                        labels: &record.labels,
                    })
                })
                .map(|(name, record)| record.info(&name))
                .collect())
        })
        .await
    }

    /// Disk usage of `key`: measured on disk for an active snapshot, as recorded at
    /// commit time otherwise.
    pub async fn usage(&self, key: &str) -> Result<Usage, SnapshotError> {
        let key = key.to_owned();
        self.blocking(move |inner| {
            let record = inner
                .meta
                .get(&key)?
                .ok_or_else(|| SnapshotError::NotFound(format!("snapshot {key}")))?;
            match record.kind {
                Kind::Active => fsutil::disk_usage(&inner.fs_dir(record.id)),
                Kind::View | Kind::Committed => Ok(record.usage),
            }
        })
        .await
    }

    /// Deletes directories under `snapshots/` that no snapshot refers to (left by
    /// removals or by a crash) and returns how many were removed.
    pub async fn cleanup(&self) -> Result<usize, SnapshotError> {
        let candidates = self
            .blocking(|inner| {
                let entries = fs::read_dir(&inner.snapshots_dir)
                    .map_err(|e| SnapshotError::io("read directory", &inner.snapshots_dir, e))?
                    .map(|entry| entry.map(|e| e.file_name()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| SnapshotError::io("read directory", &inner.snapshots_dir, e))?;
                inner.meta.with_ids_locked(|ids, _next| {
                    entries
                        .into_iter()
                        .filter_map(|name| name.into_string().ok())
                        .filter(|name| {
                            let referenced = name.parse::<u64>().is_ok_and(|id| ids.contains(&id));
                            !referenced && !inner.busy.contains(name)
                        })
                        .collect::<Vec<String>>()
                })
            })
            .await?;
        let mut removed = 0;
        for name in candidates {
            let path = self.inner.snapshots_dir.join(&name);
            let result = self
                .blocking(move |inner| {
                    if inner.busy.contains(&name) {
                        return Ok(false);
                    }
                    zest_mount::remove_tree(&path)?;
                    Ok(true)
                })
                .await;
            match result {
                Ok(true) => removed += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "cleanup could not remove a directory"),
            }
        }
        if removed > 0 {
            tracing::info!(removed, "cleanup removed unreferenced snapshot directories");
        }
        Ok(removed)
    }

    /// Asks the provider to re-establish every stored remote layer (after a restart).
    /// Each layer is restored in its own task so that one unreachable registry does
    /// not hold up the others or the service's start. Returns the number of layers.
    pub async fn restore_remote_layers(&self) -> Result<usize, SnapshotError> {
        let remote: Vec<(String, Record)> = self
            .blocking(|inner| {
                Ok(inner
                    .meta
                    .list()?
                    .into_iter()
                    .filter(|(_, r)| r.remote.is_some())
                    .collect())
            })
            .await?;
        let count = remote.len();
        for (name, record) in remote {
            let Some(layer) = record.remote else { continue };
            let provider = self.inner.provider.clone();
            let dir = self.inner.fs_dir(record.id);
            tokio::spawn(async move {
                match provider.restore(&layer, &dir).await {
                    Ok(()) => tracing::info!(snapshot = %name, "remote layer restored"),
                    Err(e) => {
                        tracing::warn!(snapshot = %name, error = %e, "cannot restore remote layer")
                    }
                }
            });
        }
        Ok(count)
    }
}

/// The fields of an update request.
#[derive(Debug, Clone)]
pub struct UpdateInfo {
    /// Snapshot to update.
    pub name: String,
    /// New labels (which of them apply depends on the field paths).
    pub labels: Labels,
}

fn check_key(key: &str) -> Result<(), SnapshotError> {
    if key.is_empty() {
        return Err(SnapshotError::InvalidArgument(
            "snapshot key must not be empty".to_owned(),
        ));
    }
    Ok(())
}

/// Whether `key` has the shape of containerd's unpack keys,
/// `[<namespace>/<n>/]extract-<random> <chain ID>`.
fn is_unpack_key(key: &str) -> bool {
    key.rsplit_once(' ').is_some_and(|(head, chain_id)| {
        chain_id.parse::<zest_oci::digest::Digest>().is_ok()
            && head
                .rsplit('/')
                .next()
                .is_some_and(|last| last.starts_with("extract-"))
    })
}

/// Whether an existing committed snapshot is the layer a remote request asks for:
/// containerd then finds it by label and parent.
fn same_layer(existing: &Record, request: &RemoteLayerRequest) -> bool {
    existing.kind == Kind::Committed
        && existing.parent == request.parent
        && existing.labels.get(LABEL_SNAPSHOT_REF) == Some(&request.chain_id)
}

impl Inner {
    fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.snapshots_dir.join(id.to_string())
    }

    fn fs_dir(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("fs")
    }

    fn work_dir(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("work")
    }

    /// Creates an active or view snapshot with a local directory.
    fn create_local(&self, new: NewSnapshot) -> Result<Vec<Mount>, SnapshotError> {
        let kind = new.kind;
        let unpack = is_unpack_key(&new.key);
        let temp_name = format!("new-{:016x}", rand::random::<u64>());
        let _claim = self.busy.claim(temp_name.clone());
        let temp = self.snapshots_dir.join(&temp_name);
        let result = self.prepare_temp_dir(&temp, kind).and_then(|()| {
            self.meta.create(new, |id, chain| {
                let fs_dir = temp.join("fs");
                // Like containerd: the new upper directory belongs to whoever owns
                // the parent's root, so that images with a non-root root work.
                if let Some(parent) = chain.first() {
                    let parent_fs = self.fs_dir(parent.id);
                    let meta = fs::metadata(&parent_fs)
                        .map_err(|e| SnapshotError::io("stat parent", &parent_fs, e))?;
                    std::os::unix::fs::lchown(&fs_dir, Some(meta.uid()), Some(meta.gid()))
                        .map_err(|e| SnapshotError::io("chown", &fs_dir, e))?;
                }
                let target = self.snapshot_dir(id);
                // Only a crash between a rename and its metadata commit leaves a
                // directory with a never-committed id: an orphan, safe to delete.
                if fs::symlink_metadata(&target).is_ok() {
                    zest_mount::remove_tree(&target)?;
                }
                fs::rename(&temp, &target)
                    .map_err(|e| SnapshotError::io("rename into place", &target, e))?;
                fsutil::sync_dir(&self.snapshots_dir)
            })
        });
        match result {
            Ok((record, chain)) => Ok(self.mounts_for(kind, record.id, &chain, unpack)),
            Err(e) => {
                if let Err(cleanup) = zest_mount::remove_tree(&temp) {
                    tracing::warn!(path = %temp.display(), error = %cleanup, "cannot remove temporary directory");
                }
                Err(e)
            }
        }
    }

    fn prepare_temp_dir(&self, temp: &Path, kind: Kind) -> Result<(), SnapshotError> {
        let mkdir = |path: &Path, mode: u32| {
            fs::DirBuilder::new()
                .mode(mode)
                .create(path)
                .map_err(|e| SnapshotError::io("create directory", path, e))
        };
        mkdir(temp, 0o700)?;
        mkdir(&temp.join("fs"), 0o755)?;
        if kind == Kind::Active {
            mkdir(&temp.join("work"), 0o711)?;
        }
        Ok(())
    }

    /// The mounts of a snapshot, as containerd's overlay snapshotter builds them,
    /// except for a layer being unpacked without a parent (`unpack`: the key is
    /// containerd's unpack key): an overlay mount of its upper directory on the empty
    /// directory rather than a bind mount. containerd's applier writes a layer given
    /// as an overlay mount straight into the upper directory and keeps its whiteouts
    /// and opaque directories in overlay form; through a bind mount it would apply
    /// them to an empty tree, losing them. That matters when the layer is rebased on
    /// a parent at commit (a parallel unpack, the `rebase` capability); for a bottom
    /// layer the result is the same either way.
    fn mounts_for(&self, kind: Kind, id: u64, chain: &[Ancestor], unpack: bool) -> Vec<Mount> {
        let path = |p: PathBuf| p.to_string_lossy().into_owned();
        if chain.is_empty() && kind == Kind::Active && unpack {
            let mut options = vec![
                format!("workdir={}", path(self.work_dir(id))),
                format!("upperdir={}", path(self.fs_dir(id))),
                format!("lowerdir={}", path(self.empty_dir.clone())),
            ];
            options.extend(self.overlay_options.iter().cloned());
            return vec![Mount {
                fs_type: "overlay".to_owned(),
                source: "overlay".to_owned(),
                options,
            }];
        }
        if chain.is_empty() {
            // No parent: a bind mount, overlay needs at least one lower directory.
            let mode = if kind == Kind::View { "ro" } else { "rw" };
            return vec![Mount {
                fs_type: "bind".to_owned(),
                source: path(self.fs_dir(id)),
                options: vec![mode.to_owned(), "rbind".to_owned()],
            }];
        }
        let mut options = Vec::new();
        if kind == Kind::Active {
            options.push(format!("workdir={}", path(self.work_dir(id))));
            options.push(format!("upperdir={}", path(self.fs_dir(id))));
        } else if let [only] = chain {
            return vec![Mount {
                fs_type: "bind".to_owned(),
                source: path(self.fs_dir(only.id)),
                options: vec!["ro".to_owned(), "rbind".to_owned()],
            }];
        }
        let lower: Vec<String> = chain.iter().map(|a| path(self.fs_dir(a.id))).collect();
        options.push(format!("lowerdir={}", lower.join(":")));
        options.extend(self.overlay_options.iter().cloned());
        vec![Mount {
            fs_type: "overlay".to_owned(),
            source: "overlay".to_owned(),
            options,
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn unpack_key(n: u8) -> String {
        format!(
            "ns/{n}/extract-{n} sha256:{}",
            format!("{n:02x}").repeat(32)
        )
    }

    fn option<'a>(mount: &'a Mount, name: &str) -> Option<&'a str> {
        mount
            .options
            .iter()
            .find_map(|o| o.strip_prefix(name)?.strip_prefix('='))
    }

    fn only(mounts: &[Mount]) -> Result<&Mount, String> {
        match mounts {
            [m] => Ok(m),
            other => Err(format!("expected one mount, got {other:?}")),
        }
    }

    #[tokio::test]
    async fn a_parentless_layer_being_unpacked_is_an_overlay_on_the_empty_directory() -> TestResult
    {
        let dir = tempfile::tempdir()?;
        let store = SnapshotStore::open(dir.path(), StoreOptions::default())?;
        let mounts = store.prepare(&unpack_key(1), None, Labels::new()).await?;
        let m = only(&mounts)?;
        assert_eq!(m.fs_type, "overlay", "{m:?}");
        let empty = dir.path().join("empty");
        assert_eq!(
            option(m, "lowerdir"),
            Some(empty.to_str().unwrap_or_default())
        );
        assert!(option(m, "upperdir").is_some() && option(m, "workdir").is_some());
        assert_eq!(store.mounts(&unpack_key(1)).await?, mounts);
        assert_eq!(fs::read_dir(&empty)?.count(), 0);
        // Any other parentless snapshot is a bind mount, as with containerd's overlayfs.
        let mounts = store.prepare("ns/2/rootfs", None, Labels::new()).await?;
        assert_eq!(only(&mounts)?.fs_type, "bind");
        Ok(())
    }

    /// containerd 2.2's parallel unpack with the `rebase` capability: every layer is
    /// prepared without a parent and applied at once, then committed bottom up, each
    /// on the one below.
    #[tokio::test]
    async fn commit_rebases_a_parentless_snapshot_onto_its_parent() -> TestResult {
        let dir = tempfile::tempdir()?;
        let store = SnapshotStore::open(dir.path(), StoreOptions::default())?;
        let mut uppers = Vec::new();
        for n in 1..=3 {
            let mounts = store.prepare(&unpack_key(n), None, Labels::new()).await?;
            let upper = PathBuf::from(option(only(&mounts)?, "upperdir").unwrap_or_default());
            fs::write(upper.join(format!("layer{n}")), [n])?;
            uppers.push(upper);
        }
        store
            .commit("c1", &unpack_key(1), Labels::new(), None)
            .await?;
        store
            .commit("c2", &unpack_key(2), Labels::new(), Some("c1"))
            .await?;
        store
            .commit("c3", &unpack_key(3), Labels::new(), Some("c2"))
            .await?;
        assert_eq!(store.stat("c1").await?.parent, None);
        assert_eq!(store.stat("c2").await?.parent.as_deref(), Some("c1"));
        assert_eq!(store.stat("c3").await?.parent.as_deref(), Some("c2"));

        // A container on the top layer sees the whole chain, top first.
        let mounts = store
            .prepare("ns/9/container", Some("c3"), Labels::new())
            .await?;
        let lower: Vec<String> = uppers
            .iter()
            .rev()
            .map(|p| p.display().to_string())
            .collect();
        assert_eq!(
            option(only(&mounts)?, "lowerdir"),
            Some(lower.join(":").as_str())
        );
        // The rebased parent links hold: nothing below a child can be removed.
        store.remove("ns/9/container").await?;
        for parent in ["c1", "c2"] {
            let err = store.remove(parent).await;
            assert!(
                matches!(err, Err(SnapshotError::FailedPrecondition(_))),
                "{parent}: {err:?}"
            );
        }
        for name in ["c3", "c2", "c1"] {
            store.remove(name).await?;
        }
        Ok(())
    }

    #[tokio::test]
    async fn commit_does_not_move_a_snapshot_that_has_a_parent() -> TestResult {
        let dir = tempfile::tempdir()?;
        let store = SnapshotStore::open(dir.path(), StoreOptions::default())?;
        for (name, parent) in [("a", None), ("b", None)] {
            store
                .prepare(&format!("k{name}"), parent, Labels::new())
                .await?;
            store
                .commit(name, &format!("k{name}"), Labels::new(), None)
                .await?;
        }
        store.prepare("c", Some("a"), Labels::new()).await?;
        let err = store.commit("c1", "c", Labels::new(), Some("b")).await;
        assert!(
            matches!(err, Err(SnapshotError::InvalidArgument(_))),
            "{err:?}"
        );
        // Naming the parent it already has is fine.
        store.commit("c1", "c", Labels::new(), Some("a")).await?;
        assert_eq!(store.stat("c1").await?.parent.as_deref(), Some("a"));
        Ok(())
    }

    #[tokio::test]
    async fn commit_rebases_only_onto_a_committed_snapshot() -> TestResult {
        let dir = tempfile::tempdir()?;
        let store = SnapshotStore::open(dir.path(), StoreOptions::default())?;
        store.prepare(&unpack_key(1), None, Labels::new()).await?;
        store.prepare("kactive", None, Labels::new()).await?;
        let err = store
            .commit("c1", &unpack_key(1), Labels::new(), Some("missing"))
            .await;
        assert!(matches!(err, Err(SnapshotError::NotFound(_))), "{err:?}");
        let err = store
            .commit("c1", &unpack_key(1), Labels::new(), Some("kactive"))
            .await;
        assert!(
            matches!(err, Err(SnapshotError::FailedPrecondition(_))),
            "{err:?}"
        );
        // A failed commit changes nothing: the snapshot is still active and parentless.
        let info = store.stat(&unpack_key(1)).await?;
        assert_eq!((info.kind, info.parent), (Kind::Active, None));
        store
            .commit("active", "kactive", Labels::new(), None)
            .await?;
        store
            .commit("c1", &unpack_key(1), Labels::new(), Some("active"))
            .await?;
        assert_eq!(store.stat("c1").await?.parent.as_deref(), Some("active"));
        Ok(())
    }

    #[test]
    fn unpack_keys() {
        let chain = format!("sha256:{}", "ab".repeat(32));
        assert!(is_unpack_key(&format!(
            "default/12/extract-123-abc {chain}"
        )));
        assert!(is_unpack_key(&format!("extract-1 {chain}")));
        assert!(!is_unpack_key(&format!("default/12/container {chain}")));
        assert!(!is_unpack_key("default/12/extract-1 sha256:short"));
        assert!(!is_unpack_key("default/12/extract-1"));
    }
}
