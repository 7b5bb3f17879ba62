//! Serving stored layers again after a restart: what a mount stores with its
//! snapshot ([`RemoteMounted::details`]) and the background loop that brings it
//! back, with exponential backoff while its TOC cannot be had.
//!
//! A layer whose FUSE connection the previous process kept (see `handover`) and
//! whose directory is still its mount is *taken over*: the layer index is rebuilt
//! from the TOC directory (inode numbers follow from it) and the same connection
//! is served again, so processes reading the layer only waited. Otherwise the
//! dead mount is detached and the layer mounted afresh.
//!
//! Invariants: a restore never touches the network when the TOC directory has the
//! layer's TOC; a live kept connection is never detached (readers would fail);
//! it gives up at once on a permanent reason (the layer itself cannot be served) or
//! when the snapshot directory is gone; it is cancelled when the snapshot is
//! removed or the service stops, and then undoes a mount it made meanwhile;
//! concurrent restores are bounded by the TOC work semaphore.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::cancel::Cancel;
use super::classify::is_permanent;
use super::handover::{self, Kept};
use super::{Inner, Slot};
use zest_oci::{Descriptor, Repository};
use zest_snapshotter::{Fallback, FallbackReason, RemoteError, RemoteLayer, RemoteMounted};

/// Key of [`RemoteMounted::details`]: the repository the layer is read from.
const DETAIL_REPOSITORY: &str = "repository";
/// Key of [`RemoteMounted::details`]: the layer descriptor (JSON; annotations limited
/// to the zstd:chunked ones).
const DETAIL_DESCRIPTOR: &str = "descriptor";
/// Key of [`RemoteMounted::details`]: whether the manifest vouches for the TOC.
const DETAIL_AUTHENTICATED: &str = "toc-authenticated";

/// First delay between two attempts to restore a layer.
const INITIAL_BACKOFF: Duration = Duration::from_millis(500);

/// The descriptor stored for a restart: the zstd:chunked and eStargz annotations only.
pub(super) fn stored_descriptor(desc: &Descriptor) -> Descriptor {
    let mut stored = Descriptor::new(desc.media_type.clone(), desc.digest, desc.size);
    stored.annotations = desc
        .annotations
        .iter()
        .filter(|(k, _)| {
            k.contains(".zstd-chunked.") || *k == zest_format::estargz::TOC_DIGEST_ANNOTATION
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    stored
}

/// What a mount stores with its snapshot, for [`stored_details`] after a restart.
pub(super) fn mount_details(
    repository: &Repository,
    desc: &Descriptor,
    authenticated: bool,
) -> Result<RemoteMounted, Fallback> {
    let descriptor = serde_json::to_string(&stored_descriptor(desc)).map_err(|e| {
        Fallback::new(
            FallbackReason::MountFailed,
            format!("cannot encode the descriptor of layer {}: {e}", desc.digest),
        )
    })?;
    Ok(RemoteMounted {
        details: BTreeMap::from([
            (DETAIL_REPOSITORY.to_owned(), repository.to_string()),
            (DETAIL_DESCRIPTOR.to_owned(), descriptor),
            (DETAIL_AUTHENTICATED.to_owned(), authenticated.to_string()),
        ]),
    })
}

/// Reads the repository and descriptor a mount stored in its details.
fn stored_details(
    details: &BTreeMap<String, String>,
) -> Result<(Repository, Descriptor), RemoteError> {
    let repository = details
        .get(DETAIL_REPOSITORY)
        .ok_or_else(|| RemoteError(format!("stored layer has no {DETAIL_REPOSITORY:?} detail")))?;
    let (registry, name) = repository
        .split_once('/')
        .ok_or_else(|| RemoteError(format!("stored repository {repository:?} is malformed")))?;
    let repository = Repository::new(registry, name)
        .map_err(|e| RemoteError(format!("stored repository {repository:?}: {e}")))?;
    let descriptor = details
        .get(DETAIL_DESCRIPTOR)
        .ok_or_else(|| RemoteError(format!("stored layer has no {DETAIL_DESCRIPTOR:?} detail")))?;
    let descriptor: Descriptor = serde_json::from_str(descriptor)
        .map_err(|e| RemoteError(format!("stored layer descriptor: {e}")))?;
    Ok((repository, descriptor))
}

/// Detaches whatever is mounted on `dir` (a dead mount of a previous run).
fn detach_stale(dir: &Path) {
    match zest_mount::detach(dir) {
        Ok(()) => {
            tracing::info!(dir = %dir.display(), "detached a stale mount left by a previous run")
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) => {}
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot detach the previous mount")
        }
    }
}

/// Whether `dir` is a directory, asked off the async workers (a stat can wait on a
/// mount).
async fn is_dir(dir: &Path) -> bool {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || dir.is_dir())
        .await
        .unwrap_or(false)
}

/// The connection the previous process kept for `dir`, if it is alive and `dir` is
/// still its mount; a dead or misplaced one is dropped from the store.
async fn live_connection(
    inner: &Inner,
    dir: &Path,
    layer: &zest_oci::digest::Digest,
) -> Option<Kept> {
    let handover = inner.handover.clone()?;
    let kept = handover.claim(dir)?;
    let dir = dir.to_path_buf();
    let layer = *layer;
    tokio::task::spawn_blocking(move || {
        let alive = handover::connection_alive(&kept.fd);
        let mounted = handover::is_layer_mount(&dir);
        if alive && mounted {
            return Some(kept);
        }
        tracing::info!(%layer, dir = %dir.display(), alive, mounted, "the kept connection cannot be taken over; mounting afresh");
        drop(kept);
        handover.forget(&dir);
        None
    })
    .await
    .ok()
    .flatten()
}

fn cancelled() -> RemoteError {
    RemoteError("restore cancelled: the snapshot was removed or the service is stopping".into())
}

/// Mounts the stored `layer` on `target_dir` again, retrying with backoff until it
/// works, fails permanently, or is cancelled.
pub(super) async fn restore(
    inner: &Inner,
    layer: &RemoteLayer,
    target_dir: &Path,
) -> Result<(), RemoteError> {
    let (repository, desc) = stored_details(&layer.mounted.details)?;
    let cancel = Arc::new(Cancel::default());
    let last_error = Arc::new(Mutex::new(String::from("not attempted yet")));
    {
        let mut mounts = inner.mounts.lock();
        if mounts.contains_key(target_dir) {
            return Ok(());
        }
        mounts.insert(
            target_dir.to_path_buf(),
            Slot::Restoring {
                digest: desc.digest,
                cancel: Arc::clone(&cancel),
                last_error: Arc::clone(&last_error),
            },
        );
    }
    let mut live = live_connection(inner, target_dir, &desc.digest).await;
    if live.is_none() {
        let dir = target_dir.to_path_buf();
        let _ = tokio::task::spawn_blocking(move || detach_stale(&dir)).await;
    }
    let mut delay = INITIAL_BACKOFF;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        // Never stat a live kept mount: that waits on the connection this task is
        // about to serve. The mount table vouched for it.
        let result = if live.is_some() || is_dir(target_dir).await {
            // Bounded like TOC prefetch: a start with many layers whose TOCs must
            // come from the registry does not open them all at once.
            let Ok(_permit) = inner.toc_work.acquire().await else {
                return Err(RemoteError("the service is stopping".into()));
            };
            match (inner.open_shared(&repository, &desc).await, live.take()) {
                (Ok(lease), Some(kept)) => {
                    let resumed = inner.resume(lease, target_dir, kept).await;
                    if resumed.is_err() {
                        // The connection is gone with the failed attempt: the next
                        // one mounts afresh, after the mount nobody serves.
                        let dir = target_dir.to_path_buf();
                        let handover = inner.handover.clone();
                        let _ = tokio::task::spawn_blocking(move || {
                            detach_stale(&dir);
                            if let Some(h) = handover {
                                h.forget(&dir);
                            }
                        })
                        .await;
                    }
                    resumed.map(|m| (m, true))
                }
                // Without the image manifest at hand, a restored mount does
                // not know the layers below it: no library prefetch.
                (Ok(lease), None) => inner
                    .mount(lease, target_dir, None, None)
                    .await
                    .map(|m| (m, false)),
                (Err(fallback), kept) => {
                    live = kept;
                    Err(fallback)
                }
            }
        } else {
            Err(Fallback::new(
                FallbackReason::MountFailed,
                format!("{} does not exist any more", target_dir.display()),
            ))
        };
        match result {
            Ok((mounted, taken_over)) => {
                // Install the mount unless the snapshot was removed (or the
                // service began stopping) meanwhile; then undo it instead.
                let unwanted = {
                    let mut mounts = inner.mounts.lock();
                    let ours = matches!(mounts.get(target_dir), Some(Slot::Restoring { cancel: c, .. }) if Arc::ptr_eq(c, &cancel));
                    if !ours || cancel.is_cancelled() || inner.stop.is_cancelled() {
                        Some(mounted)
                    } else {
                        mounts.insert(target_dir.to_path_buf(), Slot::Mounted(Box::new(mounted)));
                        None
                    }
                };
                if let Some(mut mounted) = unwanted {
                    let _ = tokio::task::spawn_blocking(move || mounted.mount.unmount_or_detach())
                        .await;
                    return Err(cancelled());
                }
                if taken_over {
                    inner.counters.bump(&inner.counters.takeovers, 1);
                    tracing::info!(layer = %desc.digest, dir = %target_dir.display(), attempt, "lazy layer taken over: its mount stayed in place");
                } else {
                    inner.counters.bump(&inner.counters.restores, 1);
                    tracing::info!(layer = %desc.digest, dir = %target_dir.display(), attempt, "lazy layer mounted afresh");
                }
                return Ok(());
            }
            Err(fallback) => {
                inner.counters.bump(&inner.counters.restore_failures, 1);
                *last_error.lock() = fallback.to_string();
                if is_permanent(fallback.reason) || (live.is_none() && !is_dir(target_dir).await) {
                    if live.take().is_some() {
                        // Nothing will serve the kept connection: end it rather than
                        // leave its readers waiting forever.
                        let dir = target_dir.to_path_buf();
                        let handover = inner.handover.clone();
                        let _ = tokio::task::spawn_blocking(move || {
                            detach_stale(&dir);
                            if let Some(h) = handover {
                                h.forget(&dir);
                            }
                        })
                        .await;
                    }
                    return Err(RemoteError(format!(
                        "cannot mount layer {} again: {fallback}",
                        desc.digest
                    )));
                }
                tracing::warn!(layer = %desc.digest, attempt, retry_in = ?delay, %fallback, "cannot mount a stored layer yet; retrying");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = cancel.cancelled() => {}
            () = inner.stop.cancelled() => {}
        }
        if cancel.is_cancelled() || inner.stop.is_cancelled() {
            return Err(cancelled());
        }
        delay = (delay * 2).min(inner.config.restore_max_backoff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lazy::classify::tests::zstd_layer;
    use crate::lazy::classify::{classify, TocSource};
    use zest_format::annotations as ann;
    use zest_oci::digest::Digest;

    #[test]
    fn stored_details_round_trip() -> Result<(), Box<dyn std::error::Error>> {
        let checksum = Digest::of(b"toc").to_string();
        let desc = zstd_layer(&[
            (ann::MANIFEST_CHECKSUM, checksum.as_str()),
            (ann::MANIFEST_POSITION, "1000:200:800:1"),
            ("org.example.other", "dropped"),
        ]);
        let stored = stored_descriptor(&desc);
        assert_eq!(stored.annotations.len(), 2);
        assert!(matches!(
            classify(&stored, true),
            Ok(TocSource::Annotated(_))
        ));
        let details = BTreeMap::from([
            (
                DETAIL_REPOSITORY.to_owned(),
                "127.0.0.1:5000/team/app".to_owned(),
            ),
            (
                DETAIL_DESCRIPTOR.to_owned(),
                serde_json::to_string(&stored)?,
            ),
        ]);
        let (repository, back) = stored_details(&details)?;
        assert_eq!(repository.registry, "127.0.0.1:5000");
        assert_eq!(repository.name, "team/app");
        assert_eq!(back, stored);
        let mut broken = details.clone();
        broken.insert(DETAIL_DESCRIPTOR.to_owned(), "{".to_owned());
        assert!(stored_details(&broken).is_err());
        broken.remove(DETAIL_DESCRIPTOR);
        assert!(stored_details(&broken).is_err());
        assert!(stored_details(&BTreeMap::new()).is_err());
        Ok(())
    }
}
