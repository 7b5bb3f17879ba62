//! The holder protocol against a real holder (on a thread) and real descriptors
//! (pipes): round trips, bad records, disconnects, dead descriptors, many
//! descriptors, idle exit.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};

use super::*;
use crate::wire;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn start_holder(socket: &Path, idle: Duration) -> JoinHandle<Result<(), HolderError>> {
    let options = HolderOptions {
        socket: socket.to_path_buf(),
        idle_exit: idle,
    };
    std::thread::spawn(move || run_holder(&options))
}

/// A client whose "start" runs a holder thread (idle exit `idle`).
fn client(socket: &Path, idle: Duration) -> Result<HolderClient, FdStoreError> {
    HolderClient::connect_or_start(
        socket,
        Box::new(move |s: &Path| {
            start_holder(s, idle);
            Ok(())
        }),
    )
}

fn pipe() -> std::io::Result<(std::fs::File, std::fs::File)> {
    let (r, w) = nix::unistd::pipe()?;
    Ok((std::fs::File::from(r), std::fs::File::from(w)))
}

fn raw_conn(socket: &Path) -> Result<OwnedFd, Box<dyn std::error::Error>> {
    let sock = socket_seqpacket()?;
    connect(sock.as_raw_fd(), &UnixAddr::new(socket)?)?;
    Ok(sock)
}

fn socket_seqpacket() -> nix::Result<OwnedFd> {
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

fn answer(conn: &OwnedFd) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    Ok(wire::recv(conn.as_fd())?.ok_or("closed")?.bytes)
}

/// Waits (bounded) until `list` has `n` entries.
fn wait_for_count(c: &HolderClient, n: usize) -> Result<Vec<KeptFd>, Box<dyn std::error::Error>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let kept = c.list()?;
        if kept.len() == n || Instant::now() > deadline {
            return Ok(kept);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sock_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("holder").join("fd-holder.sock")
}

#[test]
fn store_list_drop_round_trip() -> TestResult {
    let dir = tempfile::tempdir()?;
    let socket = sock_path(&dir);
    let c = client(&socket, Duration::from_secs(30))?;
    let (mut r, w) = pipe()?;
    c.store("layer-a", w.as_fd())?;
    drop(w);
    let kept = c.list()?;
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].name, "layer-a");
    // The listed descriptor is the same pipe: what we write through it arrives.
    let mut back = std::fs::File::from(kept.into_iter().next().ok_or("none")?.fd);
    back.write_all(b"hi")?;
    drop(back);
    let mut buf = [0u8; 2];
    r.read_exact(&mut buf)?;
    assert_eq!(&buf, b"hi");
    // Replacing keeps one entry; dropping removes it, and dropping again is fine.
    let (_r2, w2) = pipe()?;
    c.store("layer-a", w2.as_fd())?;
    assert_eq!(c.list()?.len(), 1);
    c.remove("layer-a")?;
    c.remove("layer-a")?;
    assert!(c.list()?.is_empty());
    assert!(matches!(
        c.store("", w2.as_fd()),
        Err(FdStoreError::InvalidName { .. })
    ));
    assert!(holder::holder_running(&socket));
    let pid = std::fs::read_to_string(holder::pid_path(&socket))?;
    assert_eq!(pid.trim(), std::process::id().to_string());
    Ok(())
}

#[test]
fn bad_records_are_refused_and_their_descriptors_closed() -> TestResult {
    let dir = tempfile::tempdir()?;
    let socket = sock_path(&dir);
    let c = client(&socket, Duration::from_secs(30))?;
    let conn = raw_conn(&socket)?;
    // Unknown request, store without a descriptor, list with a name.
    for bad in [&b"Zx"[..], b"Sname", b"Lname"] {
        wire::send(conn.as_fd(), bad, &[])?;
        assert_eq!(answer(&conn)?.first(), Some(&wire::ERROR), "{bad:?}");
    }
    // A store with two descriptors is refused and neither is kept: once our own
    // write ends are closed, the read ends see end of file.
    let (mut r1, w1) = pipe()?;
    let (mut r2, w2) = pipe()?;
    wire::send(conn.as_fd(), b"Stwo", &[w1.as_fd(), w2.as_fd()])?;
    assert_eq!(answer(&conn)?.first(), Some(&wire::ERROR));
    drop((w1, w2));
    let mut buf = Vec::new();
    r1.read_to_end(&mut buf)?;
    r2.read_to_end(&mut buf)?;
    // A name with NUL, and one too long.
    let (_r, w) = pipe()?;
    wire::send(conn.as_fd(), b"Sa\0b", &[w.as_fd()])?;
    assert_eq!(answer(&conn)?.first(), Some(&wire::ERROR));
    let mut long = vec![b'S'];
    long.extend(std::iter::repeat_n(b'x', wire::MAX_NAME + 1));
    wire::send(conn.as_fd(), &long, &[w.as_fd()])?;
    assert_eq!(answer(&conn)?.first(), Some(&wire::ERROR));
    // A record longer than the holder reads is refused and the client dropped.
    let huge = vec![b'S'; wire::MAX_MESSAGE + 10];
    wire::send(conn.as_fd(), &huge, &[])?;
    assert_eq!(answer(&conn)?.first(), Some(&wire::ERROR));
    assert!(
        wire::recv(conn.as_fd())?.is_none(),
        "client not disconnected"
    );
    // The holder still serves others and holds nothing from all that.
    assert!(c.list()?.is_empty());
    Ok(())
}

#[test]
fn clients_that_vanish_do_not_disturb_the_holder() -> TestResult {
    let dir = tempfile::tempdir()?;
    let socket = sock_path(&dir);
    let c = client(&socket, Duration::from_secs(30))?;
    // Connects and leaves without a word.
    drop(raw_conn(&socket)?);
    // Stores and leaves without reading the answer: the store still counts.
    let (_r, w) = pipe()?;
    let conn = raw_conn(&socket)?;
    wire::send(conn.as_fd(), b"Sleft", &[w.as_fd()])?;
    drop(conn);
    let kept = wait_for_count(&c, 1)?;
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].name, "left");
    Ok(())
}

#[test]
fn descriptors_whose_other_end_is_gone_are_dropped() -> TestResult {
    let dir = tempfile::tempdir()?;
    let socket = sock_path(&dir);
    let c = client(&socket, Duration::from_secs(30))?;
    let (r, w) = pipe()?;
    let (r_live, _w_live) = pipe()?;
    c.store("dead", r.as_fd())?;
    c.store("live", r_live.as_fd())?;
    drop(r);
    drop(r_live);
    // The holder's read end reports POLLHUP once every write end is closed.
    drop(w);
    let kept = wait_for_count(&c, 1)?;
    let names: Vec<&str> = kept.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["live"]);
    Ok(())
}

#[test]
fn many_descriptors_come_back_in_batches() -> TestResult {
    let dir = tempfile::tempdir()?;
    let socket = sock_path(&dir);
    let c = client(&socket, Duration::from_secs(30))?;
    let mut pipes = Vec::new();
    for i in 0..300 {
        let (r, w) = pipe()?;
        c.store(&format!("layer-{i:03}-{}", "n".repeat(200)), w.as_fd())?;
        pipes.push(r);
    }
    let kept = c.list()?;
    assert_eq!(kept.len(), 300);
    for (i, k) in kept.iter().enumerate() {
        assert!(k.name.starts_with(&format!("layer-{i:03}-")));
    }
    Ok(())
}

#[test]
fn holder_is_unique_and_exits_when_idle() -> TestResult {
    let dir = tempfile::tempdir()?;
    let socket = sock_path(&dir);
    let first = start_holder(&socket, Duration::from_millis(300));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "holder did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    // A second holder on the same socket leaves at once.
    let second = start_holder(&socket, Duration::from_secs(30));
    second.join().map_err(|_| "panicked")??;
    {
        let c = client(&socket, Duration::from_millis(300))?;
        let (_r, w) = pipe()?;
        c.store("x", w.as_fd())?;
        c.remove("x")?;
    }
    // Empty and no client: it exits and removes its socket and pid file.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !first.is_finished() {
        assert!(Instant::now() < deadline, "idle holder did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    first.join().map_err(|_| "panicked")??;
    assert!(!socket.exists());
    assert!(!holder::pid_path(&socket).exists());
    assert!(!holder::holder_running(&socket));
    Ok(())
}
