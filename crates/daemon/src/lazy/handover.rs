//! Handing layer connections to the next `zest serve`: each lazy mount's
//! `/dev/fuse` descriptor is kept in an [`FdStore`] (systemd's store or the fd
//! holder) under a name that says where the layer is mounted and what its
//! FUSE_INIT negotiated; at start, the descriptors kept by the previous process
//! are read back and each restore claims the one of its directory.
//!
//! Invariants: a directory has at most one kept descriptor; a descriptor is taken
//! over only when its connection is alive and its directory is still a `fuse.zest`
//! mount; a removed snapshot's descriptor is dropped from the store; the store is
//! only called from blocking threads (each call is a bounded local round trip).

use parking_lot::Mutex;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use zest_fdstore::{FdStore, FdStoreError};
use zest_fs::{LayerMount, Negotiated};

/// Start of every name this module stores.
const PREFIX: &str = "zest-layer;passthrough=";

/// The name a layer mounted on `dir` is kept under.
fn name_for(dir: &Path, negotiated: Negotiated) -> String {
    format!(
        "{PREFIX}{};{}",
        u8::from(negotiated.passthrough),
        dir.display()
    )
}

/// The directory and negotiated state a name says, if it is one of ours.
fn parse_name(name: &str) -> Option<(PathBuf, Negotiated)> {
    let rest = name.strip_prefix(PREFIX)?;
    let (flag, dir) = rest.split_once(';')?;
    let passthrough = match flag {
        "0" => false,
        "1" => true,
        _ => return None,
    };
    let dir = PathBuf::from(dir);
    dir.is_absolute().then_some((
        dir,
        Negotiated {
            passthrough,
            // Connections served over io_uring are never kept (see `keep`).
            io_uring: false,
        },
    ))
}

/// A connection the previous process kept, waiting for its restore.
#[derive(Debug)]
pub(super) struct Kept {
    pub fd: OwnedFd,
    pub negotiated: Negotiated,
}

/// The layer connections kept across restarts.
pub struct Handover {
    store: FdStore,
    /// Connections found at start, by directory, until a restore claims them.
    found: Mutex<HashMap<PathBuf, Kept>>,
    /// The name each directory's connection is kept under.
    names: Mutex<HashMap<PathBuf, String>>,
}

impl std::fmt::Debug for Handover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handover")
            .field("store", &self.store.describe())
            .finish()
    }
}

impl Handover {
    /// Reads back what `store` keeps (blocking). Descriptors under names this
    /// version does not know are dropped from the store.
    pub fn open(store: FdStore) -> Result<Self, FdStoreError> {
        let mut found = HashMap::new();
        let mut names = HashMap::new();
        for kept in store.take_all()? {
            match parse_name(&kept.name) {
                Some((dir, negotiated)) => {
                    names.insert(dir.clone(), kept.name);
                    found.insert(
                        dir,
                        Kept {
                            fd: kept.fd,
                            negotiated,
                        },
                    );
                }
                None => {
                    tracing::warn!(
                        name = kept.name,
                        "dropping a kept descriptor of unknown name"
                    );
                    if let Err(e) = store.remove(&kept.name) {
                        tracing::warn!(name = kept.name, error = %e, "cannot drop it");
                    }
                }
            }
        }
        tracing::info!(
            store = store.describe(),
            connections = found.len(),
            "layer connections kept by the previous process"
        );
        Ok(Handover {
            store,
            found: Mutex::new(found),
            names: Mutex::new(names),
        })
    }

    /// Where connections are kept, for logs.
    pub fn describe(&self) -> String {
        self.store.describe()
    }

    /// The connection kept for `dir` by the previous process, if any (once).
    pub(super) fn claim(&self, dir: &Path) -> Option<Kept> {
        self.found.lock().remove(dir)
    }

    /// Keeps `mount`'s connection (blocking). Returns whether it is kept, i.e.
    /// whether the mount may be left in place when the service stops.
    pub(super) fn keep(&self, mount: &LayerMount) -> bool {
        let Some(fd) = mount.device() else {
            return false;
        };
        let dir = mount.mountpoint();
        if mount.negotiated().io_uring {
            // The kernel hands this connection's requests to ring entries of this
            // process; after its exit they would wait for entries no one serves.
            tracing::info!(dir = %dir.display(), "layer served over io_uring: its connection is not kept, it will not survive a restart of zest");
            return false;
        }
        let name = name_for(dir, mount.negotiated());
        // A fresh mount on a directory whose old connection was kept under another
        // name (other negotiated state) replaces it.
        let old = self.names.lock().insert(dir.to_path_buf(), name.clone());
        if let Some(old) = old.filter(|o| *o != name) {
            self.drop_name(&old);
        }
        match self.store.store(&name, fd) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot keep the layer's connection; it will not survive a restart of zest");
                false
            }
        }
    }

    /// Drops the connection kept for `dir`, if any (blocking).
    pub(super) fn forget(&self, dir: &Path) {
        self.found.lock().remove(dir);
        let name = self.names.lock().remove(dir);
        if let Some(name) = name {
            self.drop_name(&name);
        }
    }

    /// Drops the connections found at start that no restore claimed (their
    /// snapshot is gone): nothing would ever serve them, so their readers would
    /// wait forever. Their mounts are detached. Blocking.
    pub(super) fn drop_unclaimed(&self) {
        let unclaimed: Vec<PathBuf> = self.found.lock().drain().map(|(dir, _)| dir).collect();
        for dir in unclaimed {
            tracing::warn!(dir = %dir.display(), "dropping a kept layer connection no stored snapshot claims");
            if is_layer_mount(&dir) {
                if let Err(e) = zest_mount::detach(&dir) {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot detach its mount");
                }
            }
            self.forget(&dir);
        }
    }

    fn drop_name(&self, name: &str) {
        if let Err(e) = self.store.remove(name) {
            tracing::warn!(name, error = %e, "cannot drop a kept layer connection");
        }
    }
}

/// Whether the FUSE connection behind `fd` is still up (the kernel reports
/// `POLLERR` once it is aborted or its mount is gone).
pub(super) fn connection_alive(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 0
}

/// Whether `dir` is still a lazy layer mount of ours.
pub(super) fn is_layer_mount(dir: &Path) -> bool {
    matches!(zest_mount::mount_type(dir), Ok(Some(t)) if t == "fuse.zest")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let dir = Path::new("/var/lib/zest/snapshots/12/fs");
        for passthrough in [false, true] {
            let n = Negotiated {
                passthrough,
                io_uring: false,
            };
            let name = name_for(dir, n);
            assert!(!name.contains(':'));
            assert_eq!(parse_name(&name), Some((dir.to_path_buf(), n)));
        }
        assert_eq!(parse_name("other"), None);
        assert_eq!(parse_name("zest-layer;passthrough=2;/x"), None);
        assert_eq!(parse_name("zest-layer;passthrough=1;relative"), None);
    }

    /// Where real mounts are impossible: `None`, loudly (a failure under CI).
    fn can_mount() -> bool {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } == 0 && Path::new("/dev/fuse").exists() {
            return true;
        }
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "this test needs root and /dev/fuse"
        );
        eprintln!("SKIPPING: needs root and /dev/fuse");
        false
    }

    /// A connection served over io_uring is not kept (no other process could
    /// serve its ring entries); one served through /dev/fuse is.
    #[test]
    fn connections_served_over_io_uring_are_not_kept() {
        const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";
        if !can_mount() {
            return;
        }
        let Ok(before) = std::fs::read_to_string(ENABLE_URING) else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "this test needs FUSE over io_uring (Linux 6.14+)"
            );
            eprintln!("SKIPPING: no FUSE over io_uring on this kernel");
            return;
        };
        std::fs::write(ENABLE_URING, "Y").unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let blob = zest_format::testblob::build_one("f", b"kept or not\n", 1 << 20);
        std::fs::write(dir.path().join("blob"), &blob.bytes).unwrap();
        let cache = std::sync::Arc::new(
            zest_cache::ChunkCache::open(&zest_cache::CacheConfig {
                memory_bytes: 1 << 20,
                disk_bytes: 0,
                ..zest_cache::CacheConfig::default()
            })
            .unwrap(),
        );
        let fetcher = zest_fetch::Fetcher::new(
            std::sync::Arc::new(blob.index()),
            std::sync::Arc::new(zest_store::FileBlob::open(&dir.path().join("blob")).unwrap()),
            cache,
            zest_fetch::FetchLimits::default(),
            zest_fetch::FetchConfig::default(),
            rt.handle().clone(),
        );
        let socket = dir.path().join("holder.sock");
        let holder = zest_fdstore::HolderClient::connect_or_start(
            &socket,
            Box::new(|s: &Path| {
                let options = zest_fdstore::HolderOptions {
                    socket: s.to_path_buf(),
                    idle_exit: std::time::Duration::from_secs(30),
                };
                std::thread::spawn(move || zest_fdstore::run_holder(&options));
                Ok(())
            }),
        )
        .unwrap();
        let handover = Handover::open(FdStore::Holder(holder)).unwrap();
        let mut kept = Vec::new();
        for io_uring in [true, false] {
            let mnt = dir.path().join(format!("mnt-{io_uring}"));
            std::fs::create_dir(&mnt).unwrap();
            let options = zest_fs::MountOptions {
                io_uring,
                ..zest_fs::MountOptions::default()
            };
            let mut m = LayerMount::mount(std::sync::Arc::clone(&fetcher), &mnt, &options).unwrap();
            assert_eq!(m.negotiated().io_uring, io_uring);
            assert_eq!(
                std::fs::read(m.mountpoint().join("f")).unwrap(),
                b"kept or not\n"
            );
            kept.push(handover.keep(&m));
            handover.forget(m.mountpoint());
            m.unmount().unwrap();
        }
        let _ = std::fs::write(ENABLE_URING, before.trim());
        assert_eq!(kept, [false, true]);
    }
}
