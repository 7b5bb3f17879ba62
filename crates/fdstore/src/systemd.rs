//! systemd's file descriptor store, for a service started by systemd
//! (`$NOTIFY_SOCKET` set): descriptors are sent with `FDSTORE=1` and `FDNAME=` on
//! the notification socket, dropped with `FDSTOREREMOVE=1`, and come back at the
//! next start as `$LISTEN_FDS` descriptors from 3 on, named by `$LISTEN_FDNAMES`,
//! for the process `$LISTEN_PID`. systemd itself drops a stored descriptor that
//! reports `POLLERR`/`POLLHUP` (a FUSE connection that ended).
//!
//! The unit needs `FileDescriptorStoreMax=` above zero (else systemd ignores the
//! messages) and `FileDescriptorStorePreserve=yes` to keep the descriptors across
//! a stop and start, not only a restart.

use std::ffi::OsString;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::sys::socket::{
    sendmsg, socket, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};
use parking_lot::Mutex;

use crate::{FdStoreError, KeptFd};

/// The first descriptor systemd passes.
const LISTEN_FDS_START: RawFd = 3;
/// systemd's limit on a descriptor name.
const MAX_FDNAME: usize = 255;

/// The file descriptor store of the systemd unit running this process.
#[derive(Debug)]
pub struct SystemdFdStore {
    notify_socket: OsString,
    inherited: Mutex<Vec<KeptFd>>,
}

impl SystemdFdStore {
    /// The store of the unit, when run by systemd (`$NOTIFY_SOCKET` set); takes
    /// the descriptors systemd passed to this process (`$LISTEN_FDS` for our pid),
    /// marking them close-on-exec. Call it once, early.
    pub fn from_env() -> Option<Self> {
        let notify_socket = std::env::var_os("NOTIFY_SOCKET")?;
        Some(SystemdFdStore {
            notify_socket,
            inherited: Mutex::new(inherited_fds()),
        })
    }

    /// The notification socket's address, as systemd gave it.
    pub fn notify_socket(&self) -> &Path {
        Path::new(&self.notify_socket)
    }

    /// Stores a copy of `fd` under `name` (systemd keeps every descriptor sent with
    /// a name; [`SystemdFdStore::remove`] first replaces rather than adds).
    pub fn store(&self, name: &str, fd: BorrowedFd<'_>) -> Result<(), FdStoreError> {
        check_fdname(name)?;
        self.send(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), None)?;
        self.send(&format!("FDSTORE=1\nFDNAME={name}"), Some(fd))
    }

    /// Drops every descriptor stored under `name`.
    pub fn remove(&self, name: &str) -> Result<(), FdStoreError> {
        check_fdname(name)?;
        self.send(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), None)
    }

    /// The descriptors passed at start (once; later calls return none). systemd
    /// keeps its own copies until they are removed.
    pub fn take_inherited(&self) -> Vec<KeptFd> {
        std::mem::take(&mut *self.inherited.lock())
    }

    fn send(&self, message: &str, fd: Option<BorrowedFd<'_>>) -> Result<(), FdStoreError> {
        let error = |source: io::Error| FdStoreError::Systemd {
            socket: self.notify_socket.to_string_lossy().into_owned(),
            source,
        };
        let bytes = self.notify_socket.as_bytes();
        let address = match bytes.strip_prefix(b"@") {
            Some(name) => UnixAddr::new_abstract(name),
            None => UnixAddr::new(bytes),
        }
        .map_err(|e| error(e.into()))?;
        let sock = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| error(e.into()))?;
        let raw: Vec<RawFd> = fd.iter().map(AsRawFd::as_raw_fd).collect();
        let rights = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
        let iov = [IoSlice::new(message.as_bytes())];
        sendmsg(
            sock.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            Some(&address),
        )
        .map_err(|e| error(e.into()))?;
        Ok(())
    }
}

/// systemd accepts names of printable ASCII without `:`, at most 255 bytes.
fn check_fdname(name: &str) -> Result<(), FdStoreError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_FDNAME
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
    if valid {
        Ok(())
    } else {
        Err(FdStoreError::InvalidName {
            name: name.to_owned(),
            why: format!(
                "systemd takes 1 to {MAX_FDNAME} printable ASCII characters without ':' or spaces"
            ),
        })
    }
}

/// The descriptors systemd passed to this process, with their names.
fn inherited_fds() -> Vec<KeptFd> {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|pid| pid == std::process::id());
    if !ours {
        return Vec::new();
    }
    let Some(count) = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<RawFd>().ok())
        .filter(|n| (0..=65_536).contains(n))
    else {
        return Vec::new();
    };
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let mut names = names.split(':');
    let mut kept = Vec::new();
    for fd in LISTEN_FDS_START..LISTEN_FDS_START + count {
        let name = names.next().unwrap_or("unknown").to_owned();
        // SAFETY: fcntl on a descriptor number; fails harmlessly if it is not open.
        let open = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } == 0;
        if !open {
            tracing::warn!(fd, name, "systemd announced a descriptor that is not open");
            continue;
        }
        // SAFETY: systemd passed this descriptor to this process (LISTEN_PID is
        // ours) and nothing else in the process claims it.
        kept.push(KeptFd {
            name,
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        });
    }
    kept
}
