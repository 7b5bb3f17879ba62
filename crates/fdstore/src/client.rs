//! The daemon's side of the holder protocol ([`HolderClient`]): one connection,
//! kept open while the daemon runs (the holder stays up while a client is
//! connected), every call bounded by [`CALL_TIMEOUT`], and one reconnection
//! (starting a new holder if none answers) when the holder went away.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::UnixAddr;
use nix::sys::socket::{connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType};
use parking_lot::Mutex;

use crate::wire::{self, Record};
use crate::{FdStoreError, KeptFd};

/// Longest wait for one answer of the holder.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a freshly started holder to answer.
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts a holder process for a socket (see [`HolderClient::connect_or_start`]).
pub type StartHolder = Box<dyn Fn(&Path) -> io::Result<()> + Send + Sync>;

/// A connection to the fd holder.
pub struct HolderClient {
    socket: PathBuf,
    start: StartHolder,
    conn: Mutex<Option<OwnedFd>>,
}

impl std::fmt::Debug for HolderClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HolderClient")
            .field("socket", &self.socket)
            .finish()
    }
}

fn dial(path: &Path) -> io::Result<OwnedFd> {
    let sock = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let address = UnixAddr::new(path)?;
    connect(sock.as_raw_fd(), &address)?;
    let timeout = nix::sys::time::TimeVal::new(CALL_TIMEOUT.as_secs() as _, 0);
    setsockopt(&sock, sockopt::ReceiveTimeout, &timeout)?;
    setsockopt(&sock, sockopt::SendTimeout, &timeout)?;
    Ok(sock)
}

impl HolderClient {
    /// Connects to the holder on `socket`, calling `start` to start one when none
    /// answers and waiting (bounded) for it to listen.
    pub fn connect_or_start(socket: &Path, start: StartHolder) -> Result<Self, FdStoreError> {
        let client = HolderClient {
            socket: socket.to_path_buf(),
            start,
            conn: Mutex::new(None),
        };
        let conn = client.connect()?;
        *client.conn.lock() = Some(conn);
        Ok(client)
    }

    /// The holder's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn connect(&self) -> Result<OwnedFd, FdStoreError> {
        if let Ok(conn) = dial(&self.socket) {
            return Ok(conn);
        }
        (self.start)(&self.socket).map_err(|source| FdStoreError::HolderStart {
            socket: self.socket.clone(),
            source,
        })?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match dial(&self.socket) {
                Ok(conn) => return Ok(conn),
                Err(e) if Instant::now() >= deadline => {
                    return Err(FdStoreError::HolderStart {
                        socket: self.socket.clone(),
                        source: io::Error::new(
                            e.kind(),
                            format!("no answer within {START_TIMEOUT:?} of starting it: {e}"),
                        ),
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Runs `call` on the connection; if the holder went away, reconnects (starting
    /// a holder) and runs it once more.
    fn with_conn<T>(
        &self,
        call: impl Fn(BorrowedFd<'_>) -> Result<T, FdStoreError>,
    ) -> Result<T, FdStoreError> {
        let mut conn = self.conn.lock();
        if let Some(c) = conn.as_ref() {
            match call(c.as_fd()) {
                Err(FdStoreError::Holder { .. }) => {
                    tracing::warn!(socket = %self.socket.display(), "lost the fd holder; reconnecting");
                }
                other => return other,
            }
        }
        *conn = None;
        let fresh = self.connect()?;
        let result = call(fresh.as_fd());
        *conn = Some(fresh);
        result
    }

    fn io_error(&self, source: io::Error) -> FdStoreError {
        FdStoreError::Holder {
            socket: self.socket.clone(),
            source,
        }
    }

    fn expect_ok(&self, conn: BorrowedFd<'_>) -> Result<(), FdStoreError> {
        let record = self.receive(conn)?;
        match record.bytes.split_first() {
            Some((&wire::OK, [])) => Ok(()),
            Some((&wire::ERROR, why)) => Err(FdStoreError::Refused(
                String::from_utf8_lossy(why).into_owned(),
            )),
            _ => Err(FdStoreError::Protocol("unexpected answer".into())),
        }
    }

    fn receive(&self, conn: BorrowedFd<'_>) -> Result<Record, FdStoreError> {
        match wire::recv(conn) {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(self.io_error(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the holder closed the connection",
            ))),
            Err(e) => Err(self.io_error(e)),
        }
    }

    /// Keeps a copy of `fd` under `name`, replacing what had that name.
    pub fn store(&self, name: &str, fd: BorrowedFd<'_>) -> Result<(), FdStoreError> {
        wire::check_name(name.as_bytes()).map_err(|why| FdStoreError::InvalidName {
            name: name.to_owned(),
            why,
        })?;
        let mut request = vec![wire::STORE];
        request.extend_from_slice(name.as_bytes());
        self.with_conn(|conn| {
            wire::send(conn, &request, &[fd]).map_err(|e| self.io_error(e))?;
            self.expect_ok(conn)
        })
    }

    /// Forgets (closes) what is kept under `name`; fine if nothing is.
    pub fn remove(&self, name: &str) -> Result<(), FdStoreError> {
        let mut request = vec![wire::DROP];
        request.extend_from_slice(name.as_bytes());
        self.with_conn(|conn| {
            wire::send(conn, &request, &[]).map_err(|e| self.io_error(e))?;
            self.expect_ok(conn)
        })
    }

    /// Copies of every kept descriptor (the holder keeps its own).
    pub fn list(&self) -> Result<Vec<KeptFd>, FdStoreError> {
        self.with_conn(|conn| {
            wire::send(conn, &[wire::LIST], &[]).map_err(|e| self.io_error(e))?;
            let mut kept = Vec::new();
            loop {
                let record = self.receive(conn)?;
                match record.bytes.split_first() {
                    Some((&wire::OK, [])) => return Ok(kept),
                    Some((&wire::ERROR, why)) => {
                        return Err(FdStoreError::Refused(
                            String::from_utf8_lossy(why).into_owned(),
                        ))
                    }
                    Some((&wire::FDS, names)) => {
                        let names: Vec<&[u8]> = names.split(|b| *b == 0).collect();
                        if names.len() != record.fds.len() {
                            return Err(FdStoreError::Protocol(format!(
                                "{} names for {} descriptors",
                                names.len(),
                                record.fds.len()
                            )));
                        }
                        for (name, fd) in names.into_iter().zip(record.fds) {
                            let name = wire::check_name(name)
                                .map_err(FdStoreError::Protocol)?
                                .to_owned();
                            kept.push(KeptFd { name, fd });
                        }
                    }
                    _ => return Err(FdStoreError::Protocol("unexpected answer".into())),
                }
            }
        })
    }
}
