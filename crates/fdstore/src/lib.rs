//! Keeping file descriptors outside the zest daemon, so that what they hold open
//! (the `/dev/fuse` connections of lazily mounted layers) survives a restart, a
//! crash or a binary upgrade of `zest serve`.
//!
//! Two keepers, one interface ([`FdStore`]):
//!
//! - [`SystemdFdStore`]: systemd's file descriptor store, when systemd runs the
//!   service (`$NOTIFY_SOCKET` set).
//! - [`HolderClient`]: otherwise, the fd holder ([`holder`]), a small process of
//!   its own (`zest fd-holder`) in its own session, which the daemon starts when
//!   none answers on its socket. It holds descriptors in memory only, drops those
//!   whose connection ended, and exits once idle.
//!
//! Both keep their copy when the daemon reads the descriptors back at start
//! ([`FdStore::take_all`]); a descriptor goes only when the daemon removes it
//! ([`FdStore::remove`]) or its connection ends.

pub mod client;
pub mod holder;
pub mod systemd;
mod wire;

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::PathBuf;

pub use client::{HolderClient, StartHolder};
pub use holder::{run_holder, HolderError, HolderOptions};
pub use systemd::SystemdFdStore;
pub use wire::MAX_NAME;

/// A kept descriptor and the name it was stored under.
#[derive(Debug)]
pub struct KeptFd {
    /// The name given when it was stored.
    pub name: String,
    /// A copy of the descriptor.
    pub fd: OwnedFd,
}

/// Why keeping, dropping or reading back descriptors failed.
#[derive(Debug, thiserror::Error)]
pub enum FdStoreError {
    /// The holder's socket failed (it may have exited).
    #[error("fd holder on {}: {source}", socket.display())]
    Holder {
        /// The holder's socket.
        socket: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// No holder answered and starting one failed.
    #[error("cannot start an fd holder on {}: {source}; lazily mounted layers will not survive a restart of zest", socket.display())]
    HolderStart {
        /// The holder's socket.
        socket: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// The holder refused the request.
    #[error("the fd holder refused: {0}")]
    Refused(String),
    /// The holder answered something this version does not understand.
    #[error("the fd holder answered an invalid message ({0}); stop it (its pid is in the .pid file next to its socket) and start zest again")]
    Protocol(String),
    /// Sending to systemd's notification socket failed.
    #[error("systemd fd store (notification socket {socket}): {source}")]
    Systemd {
        /// `$NOTIFY_SOCKET`.
        socket: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The name cannot be used.
    #[error("descriptor name {name:?}: {why}")]
    InvalidName {
        /// The name.
        name: String,
        /// Why not.
        why: String,
    },
}

/// Where descriptors are kept: systemd's store or the fd holder.
#[derive(Debug)]
pub enum FdStore {
    /// systemd's file descriptor store.
    Systemd(SystemdFdStore),
    /// The fd holder process.
    Holder(HolderClient),
}

impl FdStore {
    /// Keeps a copy of `fd` under `name`, replacing what had that name.
    pub fn store(&self, name: &str, fd: BorrowedFd<'_>) -> Result<(), FdStoreError> {
        match self {
            FdStore::Systemd(s) => s.store(name, fd),
            FdStore::Holder(h) => h.store(name, fd),
        }
    }

    /// Drops what is kept under `name` (fine if nothing is).
    pub fn remove(&self, name: &str) -> Result<(), FdStoreError> {
        match self {
            FdStore::Systemd(s) => s.remove(name),
            FdStore::Holder(h) => h.remove(name),
        }
    }

    /// Copies of the kept descriptors, for taking connections over at start. For
    /// systemd, these are the descriptors passed at start, returned once.
    pub fn take_all(&self) -> Result<Vec<KeptFd>, FdStoreError> {
        match self {
            FdStore::Systemd(s) => Ok(s.take_inherited()),
            FdStore::Holder(h) => h.list(),
        }
    }

    /// Which keeper this is, for logs.
    pub fn describe(&self) -> String {
        match self {
            FdStore::Systemd(_) => "systemd's file descriptor store".into(),
            FdStore::Holder(h) => format!("the fd holder on {}", h.socket().display()),
        }
    }
}

#[cfg(test)]
mod tests;
