//! The holder protocol's messages and their transport: one message per
//! `SOCK_SEQPACKET` record, descriptors attached as `SCM_RIGHTS`.
//!
//! A record arrives whole or not at all, so a client that disconnects cannot leave
//! half a message behind; a record longer than [`MAX_MESSAGE`] or carrying more
//! than [`MAX_FDS`] descriptors is rejected, and every descriptor received with a
//! rejected record is closed.
//!
//! | request | descriptors | answer |
//! |---|---|---|
//! | `S` name | exactly 1 | `K`, or `E` reason |
//! | `D` name | 0 | `K` (also when nothing had that name) |
//! | `L` | 0 | `F` name NUL name … with those descriptors, any number of times, then `K` |
//!
//! Names are UTF-8, 1 to [`MAX_NAME`] bytes, without NUL.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// Largest record either side accepts.
pub(crate) const MAX_MESSAGE: usize = 64 * 1024;
/// Most descriptors in one record (the kernel's own limit is 253).
pub(crate) const MAX_FDS: usize = 64;
/// Longest name.
pub const MAX_NAME: usize = 1024;

/// Store a descriptor under a name.
pub(crate) const STORE: u8 = b'S';
/// Forget a name.
pub(crate) const DROP: u8 = b'D';
/// List every held descriptor.
pub(crate) const LIST: u8 = b'L';
/// Answer: done.
pub(crate) const OK: u8 = b'K';
/// Answer: refused, with a reason.
pub(crate) const ERROR: u8 = b'E';
/// Answer: some held descriptors, names separated by NUL.
pub(crate) const FDS: u8 = b'F';

/// One received record.
pub(crate) struct Record {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// Sends one record.
pub(crate) fn send(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
    let iov = [IoSlice::new(bytes)];
    let sent = sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    if sent != bytes.len() {
        return Err(io::Error::other(format!(
            "sent {sent} of {} bytes of a record",
            bytes.len()
        )));
    }
    Ok(())
}

/// Receives one record; `None` when the peer closed the connection. The
/// descriptors of a rejected record are closed before the error is returned.
pub(crate) fn recv(sock: BorrowedFd<'_>) -> io::Result<Option<Record>> {
    let mut bytes = vec![0u8; MAX_MESSAGE];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (len, flags, fds) = {
        let mut iov = [IoSliceMut::new(&mut bytes)];
        let msg = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fds = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these descriptors for us; we
                // own them and nothing else refers to them.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        (msg.bytes, msg.flags, fds)
    };
    if flags.contains(MsgFlags::MSG_TRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("record longer than {MAX_MESSAGE} bytes"),
        ));
    }
    if flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("record with more than {MAX_FDS} descriptors"),
        ));
    }
    if len == 0 && fds.is_empty() {
        return Ok(None);
    }
    bytes.truncate(len);
    Ok(Some(Record { bytes, fds }))
}

/// Checks a name: UTF-8, 1 to [`MAX_NAME`] bytes, no NUL.
pub(crate) fn check_name(name: &[u8]) -> Result<&str, String> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(format!(
            "a name has 1 to {MAX_NAME} bytes, not {}",
            name.len()
        ));
    }
    if name.contains(&0) {
        return Err("a name contains no NUL byte".into());
    }
    std::str::from_utf8(name).map_err(|_| "a name is UTF-8".into())
}
