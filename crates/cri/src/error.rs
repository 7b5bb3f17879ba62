//! The errors of the CRI proxy and its credential store.

use std::path::PathBuf;

/// What went wrong, on which file or socket, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    /// A file or directory operation failed.
    #[error("cannot {op} {path}: {source}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The system error.
        source: std::io::Error,
    },
    /// The credentials file cannot be used.
    #[error("credentials file {path} is unusable: {detail}; remove it (kubelet sends the credentials again with its next pull)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// The proxy's socket cannot be set up.
    #[error("cannot listen on CRI socket {path}: {detail}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// Why, and what to do.
        detail: String,
    },
    /// The CRI service failed while serving.
    #[error("CRI image service proxy failed: {0}")]
    Serve(String),
}
