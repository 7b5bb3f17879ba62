//! Mounting layers and images.
//!
//! - [`LayerMount`]: one layer's FUSE filesystem mounted on a directory, with its
//!   prefetch started; unmounted on [`LayerMount::unmount`] or drop, or left
//!   mounted for another process ([`LayerMount::leave_mounted`], which serves it
//!   again with [`LayerMount::resume`]).
//! - [`ImageMount`]: a read-only overlayfs stacking several [`LayerMount`]s (a
//!   read-only bind mount for a single layer: overlayfs needs two lower layers
//!   when it has no upper one). Dropping it unmounts the overlay, then every layer.
//!
//! Unmounting never hangs: a busy mount is detached (`MNT_DETACH`) on drop and its
//! FUSE workers keep serving the remaining open files, then end with the
//! connection.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::fuse_adapter::{self, FuseMountConfig, FuseSession, IoUringStats, Negotiated};
use super::layer::{LayerFs, LayerFsOptions};
use zest_fetch::prefetch::{BackgroundFetch, PrefetchTask};
use zest_fetch::Fetcher;
use zest_mount::{BindOptions, Overlay, SysError};

/// How long unmount waits for the FUSE workers to end after the kernel
/// released the mount.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a mount or unmount failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The FUSE mount itself failed.
    #[error("mounting layer filesystem on {path}: {source} (zest must run as root with /dev/fuse available)")]
    Fuse {
        /// Mountpoint.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The overlay's target directory cannot be used.
    #[error("mounting overlay on {path}: {source}")]
    Overlay {
        /// Target directory.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The overlay (or bind) mount itself failed, or a layer path cannot be
    /// used in overlay options.
    #[error(transparent)]
    Stack(SysError),
    /// The mount is in use; close the files under it (or stop the container) first.
    #[error("{path} is busy: files under it are still open")]
    Busy {
        /// The busy mountpoint.
        path: PathBuf,
    },
    /// Unmounting failed for another reason.
    #[error("unmounting {path}: {source}")]
    Unmount {
        /// Mountpoint.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// No layers were given.
    #[error("an image mount needs at least one layer")]
    NoLayers,
}

/// Options of a layer mount.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// FUSE worker threads (kernel requests served in parallel).
    pub threads: usize,
    /// Filesystem behaviour (timeouts, opaque xattr name).
    pub fs: LayerFsOptions,
    /// Honour device nodes on the raw layer mount (`nodev` otherwise). An overlay
    /// stacked on top applies its own flags; the default is off.
    pub dev: bool,
    /// Honour setuid/setgid on the raw layer mount (`nosuid` otherwise).
    pub suid: bool,
    /// Fetch the layer's prefetch extent (if it has one) right after mounting.
    pub prefetch: bool,
    /// Background fetch of the whole layer, rate limited; `None` (default) = off.
    pub background: Option<BackgroundFetch>,
    /// Mount source shown in the mount table.
    pub source_name: String,
    /// Offer FUSE over io_uring to the kernel (Linux 6.14+ with the fuse
    /// module's `enable_uring` on); served through `/dev/fuse` when it is not
    /// available. A connection served over io_uring cannot be taken over by
    /// another process ([`Negotiated::io_uring`]).
    pub io_uring: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            threads: 4,
            fs: LayerFsOptions::default(),
            dev: false,
            suid: false,
            prefetch: true,
            background: None,
            source_name: "zest".to_string(),
            io_uring: false,
        }
    }
}

/// One layer mounted through FUSE. Unmounted when dropped.
pub struct LayerMount {
    mountpoint: PathBuf,
    fs: Arc<LayerFs>,
    session: Option<FuseSession>,
    prefetch: Option<PrefetchTask>,
}

impl std::fmt::Debug for LayerMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerMount")
            .field("mountpoint", &self.mountpoint)
            .field("mounted", &self.session.is_some())
            .finish()
    }
}

impl LayerMount {
    /// Mounts the layer served by `fetcher` on `mountpoint` (an existing empty
    /// directory) and starts its prefetch. Blocking: returns once the kernel
    /// finished the FUSE handshake. Must be called with the fetcher's runtime
    /// able to make progress (from a blocking thread when called from async code).
    pub fn mount(
        fetcher: Arc<Fetcher>,
        mountpoint: &Path,
        options: &MountOptions,
    ) -> Result<LayerMount, MountError> {
        let mountpoint = mountpoint
            .canonicalize()
            .map_err(|source| MountError::Fuse {
                path: mountpoint.to_path_buf(),
                source,
            })?;
        let fs = Arc::new(LayerFs::new(Arc::clone(&fetcher), options.fs.clone()));
        let config = fuse_config(options);
        let session =
            fuse_adapter::start(Arc::clone(&fs), &mountpoint, &config).map_err(|source| {
                MountError::Fuse {
                    path: mountpoint.clone(),
                    source,
                }
            })?;
        let prefetch = PrefetchTask::start(&fetcher, options.prefetch, options.background);
        tracing::debug!(mountpoint = %mountpoint.display(), blob = %fetcher.describe(), "layer mounted");
        Ok(LayerMount {
            mountpoint,
            fs,
            session: Some(session),
            prefetch,
        })
    }

    /// Serves the layer mounted on `mountpoint` by an earlier process through
    /// `device`, that mount's `/dev/fuse` connection (see
    /// [`LayerMount::device`]), without mounting anything; `negotiated` is what the
    /// connection's FUSE_INIT agreed. The index behind `fetcher` must be the one the
    /// earlier process served (inode numbers are derived from it). Starts the
    /// prefetch like [`LayerMount::mount`]. Blocking.
    pub fn resume(
        fetcher: Arc<Fetcher>,
        mountpoint: &Path,
        device: OwnedFd,
        negotiated: Negotiated,
        options: &MountOptions,
    ) -> Result<LayerMount, MountError> {
        let fs = Arc::new(LayerFs::new(Arc::clone(&fetcher), options.fs.clone()));
        let session =
            fuse_adapter::resume(Arc::clone(&fs), device, negotiated, &fuse_config(options))
                .map_err(|source| MountError::Fuse {
                    path: mountpoint.to_path_buf(),
                    source,
                })?;
        let prefetch = PrefetchTask::start(&fetcher, options.prefetch, options.background);
        tracing::debug!(mountpoint = %mountpoint.display(), blob = %fetcher.describe(), "layer connection taken over");
        Ok(LayerMount {
            mountpoint: mountpoint.to_path_buf(),
            fs,
            session: Some(session),
            prefetch,
        })
    }

    /// The mount's `/dev/fuse` connection, to keep it for a later process; `None`
    /// once unmounted.
    pub fn device(&self) -> Option<BorrowedFd<'_>> {
        self.session.as_ref().map(FuseSession::device)
    }

    /// What the connection's FUSE_INIT negotiated, to give to [`LayerMount::resume`].
    pub fn negotiated(&self) -> Negotiated {
        self.session
            .as_ref()
            .map(FuseSession::negotiated)
            .unwrap_or_default()
    }

    /// Stops the prefetch and leaves the layer mounted, its workers serving until
    /// the process exits. Use it only when another process will serve the
    /// connection (it must hold a copy of [`LayerMount::device`]): otherwise the
    /// mount dies with this process.
    pub fn leave_mounted(mut self) {
        if let Some(p) = self.prefetch.take() {
            p.stop();
        }
        if let Some(session) = self.session.take() {
            session.abandon();
        }
    }

    /// How the kernel delivers this mount's requests, and how many came
    /// through io_uring; `None` once unmounted.
    pub fn io_uring(&self) -> Option<IoUringStats> {
        self.session.as_ref().map(FuseSession::io_uring)
    }

    /// The directory the layer is mounted on.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The filesystem behind the mount.
    pub fn fs(&self) -> &Arc<LayerFs> {
        &self.fs
    }

    /// The layer's fetcher (counters, cache).
    pub fn fetcher(&self) -> &Arc<Fetcher> {
        self.fs.fetcher()
    }

    /// Whether the prefetch started at mount has finished (true if there was none).
    pub fn prefetch_done(&self) -> bool {
        self.prefetch.as_ref().is_none_or(PrefetchTask::is_finished)
    }

    /// Waits (at most `timeout`) for the mount-time prefetch to finish; returns
    /// whether it did. Blocking.
    pub fn wait_prefetch(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while !self.prefetch_done() {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Unmounts the layer. Fails with [`MountError::Busy`] (and stays mounted)
    /// while files under it are open or an overlay uses it. Blocking.
    pub fn unmount(&mut self) -> Result<(), MountError> {
        if let Some(p) = self.prefetch.take() {
            p.stop();
        }
        let Some(mut session) = self.session.take() else {
            return Ok(());
        };
        match unmount_path(&self.mountpoint) {
            Ok(Unmounted::Now) => {
                session.join(JOIN_TIMEOUT);
                Ok(())
            }
            // Someone unmounted it behind our back: the workers are ending already.
            Ok(Unmounted::Already) => {
                session.join(Duration::from_millis(100));
                Ok(())
            }
            Err(e) => {
                self.session = Some(session);
                Err(e)
            }
        }
    }

    /// Unmounts, detaching the mount if it is busy (it disappears from the
    /// namespace at once; the kernel ends it when the last open file closes).
    pub fn unmount_or_detach(&mut self) {
        match self.unmount() {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(error = %e, "detaching layer mount");
                if let Err(e) = zest_mount::detach(&self.mountpoint) {
                    tracing::error!(error = %e, path = %self.mountpoint.display(), "detach failed");
                }
                // The workers keep serving open files; do not wait for them.
                self.session = None;
            }
        }
    }
}

impl Drop for LayerMount {
    fn drop(&mut self) {
        self.unmount_or_detach();
    }
}

/// A whole image mounted read-only: overlayfs over per-layer FUSE mounts.
#[derive(Debug)]
pub struct ImageMount {
    target: PathBuf,
    mounted: bool,
    /// Bottom layer first.
    layers: Vec<LayerMount>,
}

impl ImageMount {
    /// Stacks `layers` (bottom layer first) read-only on `target` (an existing
    /// directory). On failure the given layer mounts are unmounted (dropped).
    pub fn mount(layers: Vec<LayerMount>, target: &Path) -> Result<ImageMount, MountError> {
        if layers.is_empty() {
            return Err(MountError::NoLayers);
        }
        let target = target
            .canonicalize()
            .map_err(|source| MountError::Overlay {
                path: target.to_path_buf(),
                source,
            })?;
        if let [only] = layers.as_slice() {
            let readonly = BindOptions {
                recursive: false,
                readonly: true,
            };
            zest_mount::bind(only.mountpoint(), &target, readonly).map_err(MountError::Stack)?;
        } else {
            let stack = Overlay {
                lower: layers.iter().rev().map(LayerMount::mountpoint).collect(),
                upper: None,
            };
            zest_mount::overlay(&target, &stack).map_err(MountError::Stack)?;
        }
        Ok(ImageMount {
            target,
            mounted: true,
            layers,
        })
    }

    /// Mounts each layer served by `fetchers` (bottom layer first) on a
    /// directory `layers_dir/<n>` (created if needed) and stacks them on
    /// `target`. Blocking, like [`LayerMount::mount`].
    pub fn mount_fetchers(
        fetchers: Vec<Arc<Fetcher>>,
        layers_dir: &Path,
        target: &Path,
        options: &MountOptions,
    ) -> Result<ImageMount, MountError> {
        let mut layers = Vec::with_capacity(fetchers.len());
        for (i, f) in fetchers.into_iter().enumerate() {
            let dir = layers_dir.join(i.to_string());
            std::fs::create_dir_all(&dir).map_err(|source| MountError::Fuse {
                path: dir.clone(),
                source,
            })?;
            // On failure the layers mounted so far are dropped: unmounted.
            layers.push(LayerMount::mount(f, &dir, options)?);
        }
        ImageMount::mount(layers, target)
    }

    /// Where the image is mounted.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The layer mounts, bottom layer first.
    pub fn layers(&self) -> &[LayerMount] {
        &self.layers
    }

    /// Unmounts the overlay and then every layer. Fails with
    /// [`MountError::Busy`] (and stays mounted) while files under it are open.
    pub fn unmount(&mut self) -> Result<(), MountError> {
        if self.mounted {
            unmount_path(&self.target)?;
            self.mounted = false;
        }
        // Top layer first (the reverse of mounting order).
        while let Some(mut layer) = self.layers.pop() {
            if let Err(e) = layer.unmount() {
                self.layers.push(layer);
                return Err(e);
            }
        }
        Ok(())
    }
}

impl Drop for ImageMount {
    fn drop(&mut self) {
        if self.mounted {
            if let Err(e) = unmount_path(&self.target) {
                tracing::warn!(error = %e, "detaching image mount");
                if let Err(e) = zest_mount::detach(&self.target) {
                    tracing::error!(error = %e, "detach failed");
                }
            }
            self.mounted = false;
        }
        while let Some(mut layer) = self.layers.pop() {
            layer.unmount_or_detach();
        }
    }
}

fn fuse_config(options: &MountOptions) -> FuseMountConfig {
    FuseMountConfig {
        threads: options.threads.max(1),
        dev: options.dev,
        suid: options.suid,
        source: options.source_name.clone(),
        io_uring: options.io_uring,
    }
}

/// What [`unmount_path`] found.
enum Unmounted {
    /// It was mounted and is unmounted now.
    Now,
    /// It was not mounted any more.
    Already,
}

/// Unmounts `path`: [`MountError::Busy`] (still mounted) while files under it
/// are open, success if it was unmounted already.
fn unmount_path(path: &Path) -> Result<Unmounted, MountError> {
    match zest_mount::umount(path) {
        Ok(()) => Ok(Unmounted::Now),
        Err(e) if e.is_not_mounted() => Ok(Unmounted::Already),
        Err(e) if e.is_busy() => Err(MountError::Busy {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(MountError::Unmount {
            path: path.to_path_buf(),
            source: e.into(),
        }),
    }
}
