//! Running the snapshotter service: the unix socket, systemd readiness, signals and
//! graceful shutdown.
//!
//! Invariants: the socket is only replaced when it is stale (nobody answers on it),
//! never when another service is alive on it or when the path is not a socket;
//! `READY=1` is sent only once the socket accepts connections; on SIGTERM all state
//! and mounts are kept (containers keep running across a restart), on SIGINT the
//! remote layer provider is told to release its mounts.

use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixListener;

use super::config::SnapshotterConfig;
use super::grpc::{self, TransportError};
use super::remote::{RemoteLayerProvider, ShutdownMode};
use super::store::{SnapshotStore, StoreOptions};
use super::types::SnapshotError;

/// Error starting or running the service.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The snapshot store cannot be opened.
    #[error("cannot open the snapshot store: {0}")]
    Store(#[from] SnapshotError),
    /// The socket cannot be set up.
    #[error("cannot listen on {path}: {source}")]
    Socket {
        /// Socket path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// Another process serves on the socket.
    #[error("{0} is in use: another snapshotter is serving on it")]
    SocketInUse(PathBuf),
    /// Signal handlers cannot be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] io::Error),
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] TransportError),
}

/// A bound, not yet serving snapshotter: the store is open and the socket accepts
/// connections (they wait until [`Server::run`]).
pub struct Server {
    store: SnapshotStore,
    listener: UnixListener,
    socket: PathBuf,
}

impl Server {
    /// Opens the store in `config.state_dir`, removes orphan directories if
    /// configured, starts restoring remote layers in the background and binds the
    /// socket.
    pub async fn bind(
        config: &SnapshotterConfig,
        provider: Arc<dyn RemoteLayerProvider>,
    ) -> Result<Self, ServeError> {
        let state_dir = config.state_dir.clone();
        let options = StoreOptions {
            overlay_options: config.overlay_mount_options.clone(),
            provider,
        };
        let store = tokio::task::spawn_blocking(move || SnapshotStore::open(&state_dir, options))
            .await
            .map_err(|e| SnapshotError::Internal(format!("open task failed: {e}")))??;
        if config.cleanup_on_start {
            store.cleanup().await?;
        }
        let remote = store.restore_remote_layers().await?;
        if remote > 0 {
            tracing::info!(remote, "restoring remote layers in the background");
        }
        let listener = bind_socket(&config.socket, config.socket_mode).await?;
        tracing::info!(socket = %config.socket.display(), state_dir = %config.state_dir.display(), "snapshotter listening");
        Ok(Server {
            store,
            listener,
            socket: config.socket.clone(),
        })
    }

    /// The store, e.g. to read the fallback counters for metrics.
    pub fn store(&self) -> &SnapshotStore {
        &self.store
    }

    /// Serves until `shutdown` completes, then stops gracefully: in-flight requests
    /// finish, the provider is told how the service stops, the socket is removed.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ShutdownMode> + Send,
    ) -> Result<(), ServeError> {
        let Server {
            store,
            listener,
            socket,
        } = self;
        notify_systemd("READY=1");
        let (mode_tx, mode_rx) = tokio::sync::oneshot::channel();
        let signal = async move {
            let mode = shutdown.await;
            tracing::info!(?mode, "snapshotter stopping");
            notify_systemd("STOPPING=1");
            let _ = mode_tx.send(mode);
        };
        let result = grpc::serve(store.clone(), listener, signal).await;
        let mode = mode_rx.await.unwrap_or(ShutdownMode::Terminate);
        store.provider().shutdown(mode).await;
        if let Err(e) = std::fs::remove_file(&socket) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(socket = %socket.display(), error = %e, "cannot remove socket");
            }
        }
        result?;
        tracing::info!("snapshotter stopped");
        Ok(())
    }
}

/// Resolves on the first SIGINT or SIGTERM with the matching [`ShutdownMode`].
pub fn shutdown_signal() -> io::Result<impl Future<Output = ShutdownMode> + Send> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => ShutdownMode::Interrupt,
            _ = terminate.recv() => ShutdownMode::Terminate,
        }
    })
}

async fn bind_socket(path: &Path, mode: u32) -> Result<UnixListener, ServeError> {
    let socket_error = |source| ServeError::Socket {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(parent)
            .map_err(socket_error)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(ServeError::SocketInUse(path.to_owned()));
            }
            tracing::info!(socket = %path.display(), "removing stale socket");
            std::fs::remove_file(path).map_err(socket_error)?;
        }
        Ok(_) => {
            return Err(socket_error(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket; remove it or choose another socket path",
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(socket_error(e)),
    }
    let listener = UnixListener::bind(path).map_err(socket_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(socket_error)?;
    Ok(listener)
}

/// Sends a state line to systemd's notification socket (`$NOTIFY_SOCKET`), if any.
/// Failures are logged, never fatal: the service works without systemd.
pub fn notify_systemd(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send_notification(&target, state) {
        tracing::warn!(error = %e, state, "cannot notify systemd");
    }
}

fn send_notification(target: &std::ffi::OsStr, state: &str) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let bytes = target.as_bytes();
    let socket = UnixDatagram::unbound()?;
    let address = match bytes.strip_prefix(b"@") {
        // Abstract socket namespace.
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)?
        }
        None => SocketAddr::from_pathname(Path::new(target))?,
    };
    socket.send_to_addr(state.as_bytes(), &address)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notification_reaches_a_datagram_socket() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("notify");
        let receiver = std::os::unix::net::UnixDatagram::bind(&path)?;
        receiver.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        send_notification(path.as_os_str(), "READY=1")?;
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf)?;
        assert_eq!(buf.get(..n), Some(&b"READY=1"[..]));
        Ok(())
    }
}
