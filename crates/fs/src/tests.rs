//! Unit tests of the layer filesystem: the logic directly, and a real FUSE
//! mount of a small test blob.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use super::*;
use zest_cache::{CacheConfig, ChunkCache};
use zest_fetch::{FetchConfig, FetchLimits, Fetcher};
use zest_format::testblob::{build, TestFile};
use zest_store::FileBlob;

fn sample_fetcher(rt: &tokio::runtime::Runtime, dir: &std::path::Path) -> Arc<Fetcher> {
    let big: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let files = [
        TestFile {
            name: "etc/hosts",
            data: b"127.0.0.1 localhost\n",
            chunk: 1 << 20,
        },
        TestFile {
            name: "usr/bin/big",
            data: &big,
            chunk: 30_000,
        },
    ];
    let extra = vec![
        json!({"type": "dir", "name": "etc/", "mode": 0o755, "uid": 0, "gid": 0}),
        json!({"type": "dir", "name": "usr/", "mode": 0o755}),
        json!({"type": "dir", "name": "usr/bin/", "mode": 0o755}),
        json!({"type": "dir", "name": "tmp/", "mode": 0o1777, "modtime": "2001-02-03T04:05:06Z"}),
        json!({"type": "symlink", "name": "bin", "linkName": "usr/bin", "mode": 0o777}),
        json!({"type": "char", "name": "dev/null", "mode": 0o666, "devMajor": 1, "devMinor": 3}),
        json!({"type": "block", "name": "dev/disk", "mode": 0o660, "devMajor": 259, "devMinor": 70000}),
        json!({"type": "fifo", "name": "run/fifo", "mode": 0o600, "uid": 7, "gid": 8}),
        json!({"type": "reg", "name": "etc/.wh.shadow", "mode": 0o600}),
        json!({"type": "dir", "name": "opt/", "mode": 0o700}),
        json!({"type": "reg", "name": "opt/.wh..wh..opq", "mode": 0o600}),
        json!({"type": "reg", "name": "opt/keep", "mode": 0o4755, "uid": 1000, "gid": 1001, "size": 0,
               "xattrs": {"user.note": "aGVsbG8=", "security.capability": "AQIDBA==",
                          "trusted.overlay.redirect": "L2V0Yw=="}}),
        json!({"type": "hardlink", "name": "usr/bin/big2", "linkName": "usr/bin/big"}),
    ];
    let blob = build(&files, extra);
    let index = Arc::new(blob.index());
    let path = dir.join("blob");
    std::fs::write(&path, &blob.bytes).unwrap();
    let src = Arc::new(FileBlob::open(&path).unwrap());
    let cache = Arc::new(
        ChunkCache::open(&CacheConfig {
            memory_bytes: 16 << 20,
            disk_bytes: 0,
            ..CacheConfig::default()
        })
        .unwrap(),
    );
    Fetcher::new(
        index,
        src,
        cache,
        FetchLimits::default(),
        FetchConfig::default(),
        rt.handle().clone(),
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn logic_presents_an_overlay_lower_dir() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let fs = LayerFs::new(sample_fetcher(&rt, dir.path()), LayerFsOptions::default());
    let etc = fs.lookup(1, b"etc").unwrap();
    // Whiteout: a char device 0:0 under the hidden name.
    let wh = fs.lookup(etc.ino, b"shadow").unwrap();
    assert_eq!((wh.kind, wh.rdev, wh.perm), (NodeKind::CharDevice, 0, 0));
    assert_eq!(fs.lookup(etc.ino, b".wh.shadow"), Err(Errno::ENOENT));
    // Opaque dir: marker hidden, xattr present, ENODATA for others.
    let opt = fs.lookup(1, b"opt").unwrap();
    assert_eq!(fs.lookup(opt.ino, b".wh..wh..opq"), Err(Errno::ENOENT));
    assert_eq!(
        fs.getxattr(opt.ino, b"trusted.overlay.opaque", 10),
        Ok(XattrAnswer::Data(b"y".to_vec()))
    );
    assert_eq!(fs.getxattr(opt.ino, b"user.x", 10), Err(Errno::ENODATA));
    assert_eq!(
        fs.getxattr(etc.ino, b"trusted.overlay.opaque", 10),
        Err(Errno::ENODATA)
    );
    // Overlay xattrs from the TOC are hidden.
    let keep = fs.lookup(opt.ino, b"keep").unwrap();
    assert_eq!(
        fs.getxattr(keep.ino, b"trusted.overlay.redirect", 100),
        Err(Errno::ENODATA)
    );
    assert_eq!(
        fs.getxattr(keep.ino, b"user.note", 0),
        Ok(XattrAnswer::Size(5))
    );
    assert_eq!(fs.getxattr(keep.ino, b"user.note", 4), Err(Errno::ERANGE));
    let XattrAnswer::Data(list) = fs.listxattr(keep.ino, 1000).unwrap() else {
        panic!("list expected")
    };
    assert_eq!(list, b"security.capability\0user.note\0".to_vec());
    assert_eq!(keep.perm, 0o4755);
    // Hard links share the inode; nlink counts names.
    let bin = fs
        .lookup(fs.lookup(1, b"usr").unwrap().ino, b"bin")
        .unwrap();
    let big = fs.lookup(bin.ino, b"big").unwrap();
    let big2 = fs.lookup(bin.ino, b"big2").unwrap();
    assert_eq!(big.ino, big2.ino);
    assert_eq!(big.nlink, 2);
    // readdir: ".", "..", then names; offsets resume exactly.
    let mut names = Vec::new();
    fs.readdir(1, 0, |e| {
        names.push((String::from_utf8_lossy(e.name).into_owned(), e.next_offset));
        false
    })
    .unwrap();
    let just: Vec<&str> = names.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        just,
        [".", "..", "bin", "dev", "etc", "opt", "run", "tmp", "usr"]
    );
    for (i, (_, off)) in names.iter().enumerate() {
        let mut rest = Vec::new();
        fs.readdir(1, *off, |e| {
            rest.push(String::from_utf8_lossy(e.name).into_owned());
            false
        })
        .unwrap();
        assert_eq!(rest.len(), names.len() - i - 1);
    }
    // A full buffer stops the listing.
    let mut n = 0;
    fs.readdir(1, 0, |_| {
        n += 1;
        n == 3
    })
    .unwrap();
    assert_eq!(n, 3);
    assert_eq!(fs.readdir(etc.ino + 1000, 0, |_| false), Err(Errno::ENOENT));
    assert!(matches!(fs.open(big.ino, true), Err(Errno::EROFS)));
    assert_eq!(fs.readlink(big.ino), Err(Errno::EINVAL));
}

type ReadSlot = Arc<Mutex<Option<Result<Vec<u8>, Errno>>>>;

struct Collect(ReadSlot);
impl ReadReply for Collect {
    fn data(self, data: &[u8]) {
        *self.0.lock().unwrap() = Some(Ok(data.to_vec()));
    }
    fn error(self, err: Errno) {
        *self.0.lock().unwrap() = Some(Err(err));
    }
}

#[test]
fn read_answers_from_a_task_then_from_memory() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let fs = LayerFs::new(sample_fetcher(&rt, dir.path()), LayerFsOptions::default());
    let id = fs.index().resolve_path("usr/bin/big").unwrap();
    let slot = Arc::new(Mutex::new(None));
    fs.read(id.ino(), 10, 100_000, Collect(Arc::clone(&slot)));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while slot.lock().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "read never answered");
        std::thread::sleep(Duration::from_millis(2));
    }
    let got = slot.lock().unwrap().take().unwrap().unwrap();
    assert_eq!(got.len(), 100_000);
    // Now cached: answered synchronously, before `read` returns.
    fs.read(id.ino(), 10, 1000, Collect(Arc::clone(&slot)));
    assert_eq!(
        slot.lock().unwrap().take().unwrap().unwrap(),
        got[..1000].to_vec()
    );
    fs.read(1, 0, 10, Collect(Arc::clone(&slot)));
    assert_eq!(slot.lock().unwrap().take().unwrap(), Err(Errno::EISDIR));
}

fn is_mounted(path: &std::path::Path) -> bool {
    zest_mount::is_mount_point(path).unwrap()
}

fn can_mount() -> bool {
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if root && std::path::Path::new("/dev/fuse").exists() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "FUSE tests need root and /dev/fuse"
    );
    eprintln!("SKIPPING FUSE mount test: needs root and /dev/fuse");
    false
}

/// The sample layer mounted in a fresh directory, with its mountpoint, and the
/// runtime and directory it needs (drop them after the mount); `None` where FUSE
/// mounts are impossible.
fn mount_sample() -> Option<(
    tokio::runtime::Runtime,
    tempfile::TempDir,
    LayerMount,
    std::path::PathBuf,
)> {
    if !can_mount() {
        return None;
    }
    Some(mount_sample_with(&MountOptions::default()))
}

fn mount_sample_with(
    options: &MountOptions,
) -> (
    tokio::runtime::Runtime,
    tempfile::TempDir,
    LayerMount,
    std::path::PathBuf,
) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let m = LayerMount::mount(sample_fetcher(&rt, dir.path()), &mnt, options).unwrap();
    let mnt = m.mountpoint().to_path_buf();
    (rt, dir, m, mnt)
}

#[test]
fn fuse_mount_serves_the_layer_and_unmounts_cleanly() {
    let Some((_rt, _dir, mut m, mnt)) = mount_sample() else {
        return;
    };
    assert!(is_mounted(&mnt));

    let md = std::fs::symlink_metadata(mnt.join("etc/shadow")).unwrap();
    assert!(md.file_type().is_char_device());
    assert_eq!(md.rdev(), 0);
    let md = std::fs::symlink_metadata(mnt.join("dev/disk")).unwrap();
    assert!(md.file_type().is_block_device());
    assert_eq!(md.rdev(), libc::makedev(259, 70000));
    let md = std::fs::symlink_metadata(mnt.join("run/fifo")).unwrap();
    assert!(md.file_type().is_fifo());
    assert_eq!((md.uid(), md.gid()), (7, 8));
    let md = std::fs::symlink_metadata(mnt.join("tmp")).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o1777);
    assert_eq!(md.mtime(), 981173106);
    let md = std::fs::symlink_metadata(mnt.join("opt/keep")).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o4755);
    assert_eq!(
        std::fs::read_link(mnt.join("bin")).unwrap(),
        std::path::Path::new("usr/bin")
    );
    assert_eq!(
        std::fs::read(mnt.join("etc/hosts")).unwrap(),
        b"127.0.0.1 localhost\n"
    );
    let a = std::fs::symlink_metadata(mnt.join("usr/bin/big")).unwrap();
    let b = std::fs::symlink_metadata(mnt.join("usr/bin/big2")).unwrap();
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    let big = std::fs::read(mnt.join("bin/big")).unwrap();
    assert_eq!(big.len(), 200_000);
    let expect: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    assert_eq!(big, expect);

    // xattrs through the kernel: ENODATA for missing names, opaque marker.
    let opaque = getxattr(&mnt.join("opt"), "trusted.overlay.opaque");
    assert_eq!(opaque, Ok(b"y".to_vec()));
    assert_eq!(
        getxattr(&mnt.join("etc"), "trusted.overlay.opaque"),
        Err(libc::ENODATA)
    );
    assert_eq!(
        getxattr(&mnt.join("opt/keep"), "user.note"),
        Ok(b"hello".to_vec())
    );
    let mut names: Vec<String> = std::fs::read_dir(mnt.join("opt"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["keep"]);
    // Read-only.
    assert!(std::fs::write(mnt.join("etc/new"), b"x").is_err());

    m.unmount().unwrap();
    assert!(!is_mounted(&mnt));
}

#[test]
fn busy_mount_refuses_unmount_and_drop_detaches() {
    let Some((_rt, _dir, mut m, mnt)) = mount_sample() else {
        return;
    };
    let f = std::fs::File::open(mnt.join("etc/hosts")).unwrap();
    assert!(matches!(m.unmount(), Err(MountError::Busy { .. })));
    assert!(is_mounted(&mnt));
    drop(m);
    assert!(!is_mounted(&mnt));
    drop(f);
}

fn getxattr(path: &std::path::Path, name: &str) -> Result<Vec<u8>, i32> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and a buffer of the given length.
    let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    buf.truncate(r as usize);
    Ok(buf)
}

#[test]
fn recorder_keeps_first_accesses_in_order_once_each_and_bounded() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let fetcher = sample_fetcher(&rt, dir.path());
    let index = Arc::clone(fetcher.index());
    let id = |p: &str| index.resolve_path(p).unwrap();
    let recorder = AccessRecorder::with_origin(std::time::Instant::now(), 2);
    for p in ["usr/bin/big", "etc/hosts", "usr/bin/big", "opt/keep"] {
        recorder.record(&index, id(p));
    }
    let accesses = recorder.accesses();
    let paths: Vec<&str> = accesses.iter().map(|a| a.path.as_str()).collect();
    // Once each, in first-access order, at most two.
    assert_eq!(paths, ["usr/bin/big", "etc/hosts"]);
    assert!(accesses[0].at <= accesses[1].at);

    // A finished recording notes nothing more.
    let recorder = AccessRecorder::with_origin(std::time::Instant::now(), 10);
    recorder.record(&index, id("etc/hosts"));
    assert!(recorder.is_recording());
    recorder.finish();
    assert!(!recorder.is_recording());
    recorder.record(&index, id("opt/keep"));
    assert_eq!(recorder.paths(), ["etc/hosts"]);
}

/// The fuse module's `enable_uring` parameter, put back as it was on drop.
struct EnableUring {
    before: String,
}

impl EnableUring {
    const PATH: &'static str = "/sys/module/fuse/parameters/enable_uring";

    /// `None` (with a loud message; a failure under CI) where the kernel has no
    /// FUSE over io_uring.
    fn take() -> Option<EnableUring> {
        match std::fs::read_to_string(Self::PATH) {
            Ok(before) => Some(EnableUring {
                before: before.trim().to_string(),
            }),
            Err(e) => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "FUSE over io_uring tests need a kernel with it (6.14+): {}: {e}",
                    Self::PATH
                );
                eprintln!("SKIPPING FUSE over io_uring test: {}: {e}", Self::PATH);
                None
            }
        }
    }

    fn set(&self, on: bool) {
        std::fs::write(Self::PATH, if on { "Y" } else { "N" }).unwrap();
    }
}

impl Drop for EnableUring {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, &self.before);
    }
}

/// Threads of this process serving FUSE rings.
fn ring_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.starts_with("fuser-uring"))
        .count()
}

/// Reads the sample layer through the kernel and checks every byte, names and
/// attributes: cold reads are answered later from the runtime, warm ones inline.
fn check_sample_bytes(mnt: &std::path::Path) {
    let expect: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    for _ in 0..2 {
        assert_eq!(
            std::fs::read(mnt.join("etc/hosts")).unwrap(),
            b"127.0.0.1 localhost\n"
        );
        assert_eq!(std::fs::read(mnt.join("usr/bin/big")).unwrap(), expect);
    }
    // Reads at odd offsets, without the page cache in between.
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(mnt.join("usr/bin/big2")).unwrap();
    for off in [0usize, 4095, 29_999, 123_457, 199_990] {
        let mut buf = vec![0u8; 4096];
        let n = f.read_at(&mut buf, off as u64).unwrap();
        let end = (off + 4096).min(expect.len());
        assert_eq!(&buf[..n], &expect[off..end]);
    }
    let mut names: Vec<String> = std::fs::read_dir(mnt.join("usr/bin"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["big", "big2"]);
    let md = std::fs::symlink_metadata(mnt.join("opt/keep")).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o4755);
    assert_eq!(
        getxattr(&mnt.join("opt/keep"), "user.note"),
        Ok(b"hello".to_vec())
    );
    assert_eq!(
        std::fs::metadata(mnt.join("absent")).unwrap_err().kind(),
        std::io::ErrorKind::NotFound
    );
}

#[test]
fn fuse_over_io_uring_serves_the_layer_and_falls_back_when_disabled() {
    if !can_mount() {
        return;
    }
    let Some(param) = EnableUring::take() else {
        return;
    };
    let options = MountOptions {
        io_uring: true,
        ..MountOptions::default()
    };

    param.set(true);
    let (_rt, _dir, mut m, mnt) = mount_sample_with(&options);
    assert!(m.negotiated().io_uring);
    check_sample_bytes(&mnt);
    let ring = m.io_uring().unwrap();
    assert_eq!(ring.state, IoUring::Active);
    // Every request above went through the ring: lookups, getattrs, opens,
    // reads (cold ones answered from the runtime's threads), readdirs, xattrs.
    assert!(ring.requests >= 20, "{ring:?}");
    assert!(io_uring_totals().0 >= ring.requests);
    m.unmount().unwrap();
    assert!(!is_mounted(&mnt));
    // The ring workers end with the connection.
    assert_eq!(ring_threads(), 0);

    // Off in the kernel: not offered at FUSE_INIT, served through /dev/fuse.
    param.set(false);
    let (_rt, _dir, mut m, mnt) = mount_sample_with(&options);
    assert!(!m.negotiated().io_uring);
    check_sample_bytes(&mnt);
    assert_eq!(
        m.io_uring().unwrap(),
        IoUringStats {
            state: IoUring::Fallback,
            requests: 0
        }
    );
    assert_eq!(ring_threads(), 0);
    m.unmount().unwrap();
}
