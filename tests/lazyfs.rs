//! End-to-end tests of the lazy layer filesystem: real layers (made by GNU tar
//! from real directories, busybox included), converted with the zstd:chunked
//! writer, pushed to a real registry on 127.0.0.1, mounted through FUSE (and
//! overlayfs), and compared with what GNU tar extracts. Laziness is counted at
//! the registry (its access log) and in the fetcher's counters. One layer is
//! written by skopeo instead (old-generation zstd:chunked, from a real root
//! filesystem packed by umoci) and compared the same way.
//!
//! Needs root, /dev/fuse, GNU tar and docker-registry (and skopeo, umoci, zstd
//! for the skopeo test); without them the tests skip loudly (and fail under
//! `CI=true`).

mod support;

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use zest_cache::{CacheConfig, ChunkCache};
use zest_fetch::toc::{open_image_layers, open_layer, TocFetchOptions};
use zest_fetch::{FetchConfig, FetchLimits, Fetcher};
use zest_format::{write_chunked, WriteOptions};
use zest_fs::{
    AccessRecorder, ImageMount, LayerFsOptions, LayerMount, MountOptions, PassthroughStore,
};
use zest_oci::digest::Digest;
use zest_oci::{media_type, Descriptor, ImageManifest, Reference, Repository};
use zest_registry::{PlainHttp, RegistryClient};
use zest_store::{BlobSource, ImageStore, RegistryBlob};

use support::{
    pseudo_random, require_root_and_fuse, require_tool, unmount_settled, Auth, Registry,
    REGISTRY_BIN,
};

// ---------------------------------------------------------------------------
// Environment

struct Env {
    rt: tokio::runtime::Runtime,
    registry: Registry,
    client: RegistryClient,
    dir: tempfile::TempDir,
}

/// Mount options serving fully cached files by passthrough from `store`.
fn passthrough_options(store: &Arc<PassthroughStore>) -> MountOptions {
    MountOptions {
        fs: LayerFsOptions {
            passthrough: Some(Arc::clone(store)),
            ..LayerFsOptions::default()
        },
        ..MountOptions::default()
    }
}

fn env() -> Option<Env> {
    if !require_root_and_fuse() || !require_tool(REGISTRY_BIN) || !require_tool("tar") {
        return None;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let registry = Registry::start(Auth::None);
    let client = registry.client();
    Some(Env {
        rt,
        registry,
        client,
        dir: tempfile::tempdir().expect("temp dir"),
    })
}

impl Env {
    fn path(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p).expect("create test dir");
        p
    }

    fn repo(&self, name: &str) -> Repository {
        Repository::new(&self.registry.host(), name).expect("repository")
    }

    /// Converts a tar to zstd:chunked, pushes it, returns its descriptor.
    fn push_layer(&self, repo: &Repository, tar: &Path, opts: &WriteOptions) -> Descriptor {
        let mut blob = Vec::new();
        let summary = write_chunked(
            std::io::BufReader::new(std::fs::File::open(tar).expect("open tar")),
            &mut blob,
            opts,
        )
        .expect("convert layer to zstd:chunked");
        assert_eq!(summary.blob_digest, Digest::of(&blob));
        let mut desc = Descriptor::new(
            media_type::OCI_LAYER_ZSTD,
            summary.blob_digest,
            summary.blob_size,
        );
        desc.annotations = summary.annotations.clone();
        self.rt
            .block_on(self.client.push_blob(
                repo,
                &desc.digest,
                zest_registry::UploadBody::Bytes(Bytes::from(blob)),
                None,
            ))
            .expect("push layer blob");
        desc
    }

    /// The layer `desc` of `repo` mounted at `mnt` with a passthrough store of
    /// 64 MiB under the environment's directory; `None` (reported as
    /// unavailable) when the kernel does not accept passthrough.
    fn mount_with_passthrough(
        &self,
        repo: &Repository,
        desc: &Descriptor,
        cache: &Arc<ChunkCache>,
    ) -> Option<(LayerMount, Arc<Fetcher>, Arc<PassthroughStore>)> {
        let store = PassthroughStore::open(&self.dir.path().join("passthrough"), 64 << 20, 1)
            .expect("store");
        let fetcher = self.fetcher(self.registry_source(repo, desc), desc, cache);
        let m = LayerMount::mount(
            Arc::clone(&fetcher),
            &self.path("mnt"),
            &passthrough_options(&store),
        )
        .expect("mount");
        if !m.fs().passthrough_active() {
            support::unavailable(
                "the kernel did not accept FUSE passthrough",
                "run on Linux 6.9 or later",
            );
            return None;
        }
        Some((m, fetcher, store))
    }

    fn fetcher(
        &self,
        source: Arc<dyn BlobSource>,
        desc: &Descriptor,
        cache: &Arc<ChunkCache>,
    ) -> Arc<Fetcher> {
        self.fetcher_with(source, desc, cache, fast_fetch())
    }

    fn fetcher_with(
        &self,
        source: Arc<dyn BlobSource>,
        desc: &Descriptor,
        cache: &Arc<ChunkCache>,
        config: FetchConfig,
    ) -> Arc<Fetcher> {
        self.rt
            .block_on(open_layer(
                source,
                desc.size,
                &desc.annotations,
                Arc::clone(cache),
                FetchLimits::default(),
                config,
                &TocFetchOptions::default(),
            ))
            .expect("open layer")
    }

    fn registry_source(&self, repo: &Repository, desc: &Descriptor) -> Arc<dyn BlobSource> {
        Arc::new(RegistryBlob::for_layer(
            self.client.clone(),
            repo.clone(),
            desc,
        ))
    }

    fn mount(&self, fetcher: Arc<Fetcher>, name: &str) -> LayerMount {
        let mnt = self.path(name);
        LayerMount::mount(fetcher, &mnt, &MountOptions::default()).expect("mount layer")
    }

    /// Mount points under this test's directory.
    fn leftover_mounts(&self) -> Vec<PathBuf> {
        zest_mount::mount_points_under(self.dir.path()).expect("mount table")
    }
}

fn fast_fetch() -> FetchConfig {
    FetchConfig {
        retry_backoff: Duration::from_millis(5),
        read_timeout: Duration::from_secs(60),
        ..FetchConfig::default()
    }
}

fn cache_at(dir: &Path, memory: u64, disk: u64) -> Arc<ChunkCache> {
    Arc::new(
        ChunkCache::open(&CacheConfig {
            memory_bytes: memory,
            disk_bytes: disk,
            disk_root: dir.to_path_buf(),
            ..CacheConfig::default()
        })
        .expect("open chunk cache"),
    )
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn gnu_tar_create(src: &Path, tar: &Path) {
    run(Command::new("tar")
        .args([
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "--format=posix",
        ])
        .arg("-cpf")
        .arg(tar)
        .arg("-C")
        .arg(src)
        .arg("."));
}

fn gnu_tar_extract(tar: &Path, dest: &Path) {
    std::fs::create_dir_all(dest).expect("create extraction dir");
    run(Command::new("tar")
        .arg("-xpf")
        .arg(tar)
        .args(["--xattrs", "--xattrs-include=*", "--numeric-owner"])
        .arg("-C")
        .arg(dest));
}

// ---------------------------------------------------------------------------
// Building trees

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

fn mknod(p: &Path, kind: libc::mode_t, perm: libc::mode_t, dev: libc::dev_t) {
    // SAFETY: valid C string.
    let r = unsafe { libc::mknod(cstr(p).as_ptr(), kind | perm, dev) };
    assert_eq!(
        r,
        0,
        "mknod {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let n = CString::new(name).expect("xattr name");
    // SAFETY: valid C strings and buffer.
    let r = unsafe {
        libc::lsetxattr(
            cstr(p).as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setxattr {name} on {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).expect("chown");
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Sets mtime (and atime) without following symlinks.
fn set_mtime(p: &Path, secs: i64, nanos: i64) {
    let ts = [
        libc::timespec {
            tv_sec: secs,
            tv_nsec: nanos,
        },
        libc::timespec {
            tv_sec: secs,
            tv_nsec: nanos,
        },
    ];
    // SAFETY: valid C string and timespec array.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            cstr(p).as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0, "utimensat {}", p.display());
}

fn write(p: &Path, data: &[u8]) {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).expect("mkdir -p");
    }
    std::fs::write(p, data).expect("write file");
}

/// A tree with every entry type and attribute a layer can carry, plus busybox
/// and its applet links.
fn build_all_types_tree(root: &Path) {
    let p = |s: &str| root.join(s);
    for d in [
        "etc",
        "usr/bin",
        "usr/share/many",
        "var/tmp",
        "dev",
        "srv/setgid",
        "opaque/sub",
        "bin",
    ] {
        std::fs::create_dir_all(p(d)).expect("mkdir");
    }
    chmod(&p("var/tmp"), 0o1777);
    chmod(&p("srv/setgid"), 0o2775);
    chown(&p("srv/setgid"), 0, 50);
    chmod(&p("etc"), 0o750);

    write(&p("etc/hostname"), b"zest-test\n");
    write(&p("etc/empty"), b"");
    write(&p("usr/bin/random.bin"), &pseudo_random(1 << 20, 1));
    // Zero runs become zero chunks.
    let mut sparse = pseudo_random(70_000, 2);
    sparse.extend(vec![0u8; 300_000]);
    sparse.extend(pseudo_random(50_000, 3));
    write(&p("usr/bin/holes.bin"), &sparse);
    write(&p("usr/bin/suid"), b"#!/bin/sh\necho suid\n");
    chmod(&p("usr/bin/suid"), 0o4755);
    write(&p("usr/bin/sgid"), b"#!/bin/sh\necho sgid\n");
    chmod(&p("usr/bin/sgid"), 0o2711);
    write(&p("srv/owned"), b"owned by 1234:5678\n");
    chown(&p("srv/owned"), 1234, 5678);
    chmod(&p("srv/owned"), 0o640);
    write(&p("srv/with space and ünïcödé"), b"names\n");
    let long = "l".repeat(255);
    write(&p(&format!("srv/{long}")), b"long name\n");
    for i in 0..600 {
        write(
            &p(&format!("usr/share/many/file-{i:04}")),
            format!("file {i}\n").as_bytes(),
        );
    }
    // Hard links: three names, two directories.
    write(&p("usr/bin/tool"), &pseudo_random(200_000, 4));
    std::fs::hard_link(p("usr/bin/tool"), p("usr/bin/tool-alias")).expect("link");
    std::fs::hard_link(p("usr/bin/tool"), p("srv/tool-copy")).expect("link");
    // Symlinks: relative, absolute, dangling, to a directory.
    std::os::unix::fs::symlink("../etc/hostname", p("usr/hostname-link")).expect("symlink");
    std::os::unix::fs::symlink("/etc/passwd", p("srv/abs-link")).expect("symlink");
    std::os::unix::fs::symlink("does/not/exist", p("srv/dangling")).expect("symlink");
    std::os::unix::fs::symlink("usr/bin", p("sbin")).expect("symlink");
    // Devices and a fifo.
    mknod(&p("dev/null"), libc::S_IFCHR, 0o666, libc::makedev(1, 3));
    mknod(&p("dev/sda1"), libc::S_IFBLK, 0o660, libc::makedev(8, 1));
    mknod(
        &p("dev/bigminor"),
        libc::S_IFCHR,
        0o600,
        libc::makedev(259, 70000),
    );
    mknod(&p("var/fifo"), libc::S_IFIFO, 0o644, 0);
    // xattrs: user, trusted, and a real file capability (cap_net_raw, v2).
    set_xattr(&p("etc/hostname"), "user.comment", b"hello xattr");
    set_xattr(&p("etc"), "trusted.zest", b"dir xattr");
    let cap: [u8; 20] = [
        0, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    set_xattr(&p("usr/bin/suid"), "security.capability", &cap);
    set_xattr(&p("usr/bin/tool"), "user.big", &pseudo_random(3000, 5));
    // Overlay markers as a layer carries them.
    write(&p("etc/.wh.removed"), b"");
    write(&p("opaque/.wh..wh..opq"), b"");
    write(&p("opaque/sub/kept"), b"kept\n");
    // busybox, if installed, with applet links.
    if let Ok(bb) = std::fs::read("/bin/busybox") {
        write(&p("bin/busybox"), &bb);
        chmod(&p("bin/busybox"), 0o755);
        for applet in ["sh", "ls", "cat", "echo", "true"] {
            std::os::unix::fs::symlink("busybox", p(&format!("bin/{applet}"))).expect("symlink");
        }
    }
    // Times, nanoseconds and before the epoch included (set last: writing
    // children changes directory times).
    set_mtime(&p("etc/hostname"), 1_600_000_000, 123_456_789);
    set_mtime(&p("srv/owned"), -86_400, 0);
    set_mtime(&p("usr/hostname-link"), 1_500_000_000, 0);
    set_mtime(&p("var/tmp"), 1_400_000_000, 0);
    set_mtime(root, 1_300_000_000, 0);
}

// ---------------------------------------------------------------------------
// Comparing trees

#[derive(Debug, Clone, PartialEq)]
struct Node {
    kind: &'static str,
    perm: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, i64),
    size: Option<u64>,
    rdev: Option<(u32, u32)>,
    link: Option<PathBuf>,
    xattrs: BTreeMap<String, Vec<u8>>,
    nlink: Option<u64>,
}

fn list_xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let c = cstr(p);
    let mut out = BTreeMap::new();
    // SAFETY: size probe with a null buffer.
    let n = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
    assert!(
        n >= 0,
        "listxattr {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
    let mut buf = vec![0u8; n as usize];
    // SAFETY: buffer of the probed size.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n >= 0);
    buf.truncate(n as usize);
    for name in buf.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = CString::new(name).expect("name");
        // SAFETY: size probe.
        let len = unsafe { libc::lgetxattr(c.as_ptr(), cname.as_ptr(), std::ptr::null_mut(), 0) };
        assert!(len >= 0, "getxattr size {}", String::from_utf8_lossy(name));
        let mut v = vec![0u8; len as usize];
        // SAFETY: buffer of the probed size.
        let len =
            unsafe { libc::lgetxattr(c.as_ptr(), cname.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        assert!(len >= 0);
        v.truncate(len as usize);
        out.insert(String::from_utf8_lossy(name).into_owned(), v);
    }
    out
}

/// The inode numbers of `paths` under `root`, in order.
fn inodes_of(root: &Path, paths: &[PathBuf]) -> Vec<u64> {
    paths
        .iter()
        .map(|p| std::fs::symlink_metadata(root.join(p)).expect("stat").ino())
        .collect()
}

fn node(p: &Path, with_nlink: bool) -> Node {
    let md = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        "dir"
    } else if ft.is_file() {
        "file"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_char_device() {
        "char"
    } else if ft.is_block_device() {
        "block"
    } else if ft.is_fifo() {
        "fifo"
    } else {
        "socket"
    };
    Node {
        kind,
        perm: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime: (md.mtime(), md.mtime_nsec()),
        size: (ft.is_file() || ft.is_symlink()).then_some(md.size()),
        rdev: (ft.is_char_device() || ft.is_block_device())
            .then(|| (libc::major(md.rdev()), libc::minor(md.rdev()))),
        link: ft
            .is_symlink()
            .then(|| std::fs::read_link(p).expect("readlink")),
        xattrs: list_xattrs(p),
        nlink: with_nlink.then_some(md.nlink()),
    }
}

/// Every path under `root` (relative, root itself as ""), sorted.
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![PathBuf::new()];
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut names: Vec<_> = std::fs::read_dir(root.join(&rel))
            .unwrap_or_else(|e| panic!("read_dir {}: {e}", root.join(&rel).display()))
            .map(|e| e.expect("dir entry").file_name())
            .collect();
        names.sort();
        for n in names {
            let r = rel.join(&n);
            if std::fs::symlink_metadata(root.join(&r))
                .expect("stat")
                .is_dir()
            {
                stack.push(r.clone());
            }
            out.push(r);
        }
    }
    out.sort();
    out
}

/// Groups of paths sharing an inode (regular files with more than one name).
fn link_groups(root: &Path, paths: &[PathBuf]) -> Vec<Vec<PathBuf>> {
    let mut by_ino: HashMap<(u64, u64), Vec<PathBuf>> = HashMap::new();
    for r in paths {
        let md = std::fs::symlink_metadata(root.join(r)).expect("stat");
        if md.is_file() {
            by_ino
                .entry((md.dev(), md.ino()))
                .or_default()
                .push(r.clone());
        }
    }
    let mut groups: Vec<Vec<PathBuf>> = by_ino.into_values().filter(|g| g.len() > 1).collect();
    for g in &mut groups {
        g.sort();
    }
    groups.sort();
    groups
}

fn same_content(a: &Path, b: &Path) {
    let x = std::fs::read(a).unwrap_or_else(|e| panic!("read {}: {e}", a.display()));
    let y = std::fs::read(b).unwrap_or_else(|e| panic!("read {}: {e}", b.display()));
    assert!(
        x == y,
        "content of {} differs from {}",
        a.display(),
        b.display()
    );
}

/// Compares a mounted layer with the GNU tar extraction of the same layer,
/// translating overlay markers: `.wh.NAME` must appear as a 0:0 character
/// device `NAME`, `.wh..wh..opq` as the opaque xattr on its directory.
fn compare_layer(mounted: &Path, extracted: &Path) -> usize {
    let got_paths = walk(mounted);
    let mut want: BTreeMap<PathBuf, Node> = BTreeMap::new();
    let mut whiteouts = Vec::new();
    let mut opaque = Vec::new();
    let ext_paths = walk(extracted);
    for r in &ext_paths {
        let name = r
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name == ".wh..wh..opq" {
            opaque.push(r.parent().unwrap_or(Path::new("")).to_path_buf());
        } else if let Some(hidden) = name.strip_prefix(".wh.") {
            whiteouts.push(r.with_file_name(hidden));
        } else {
            want.insert(r.clone(), node(&extracted.join(r), true));
        }
    }
    for d in &opaque {
        let n = want.get_mut(d).expect("opaque dir exists");
        n.xattrs
            .insert("trusted.overlay.opaque".into(), b"y".to_vec());
    }
    let mut want_paths: Vec<PathBuf> = want
        .keys()
        .cloned()
        .chain(whiteouts.iter().cloned())
        .collect();
    want_paths.sort();
    assert_eq!(
        got_paths, want_paths,
        "the mounted tree lists different names"
    );
    for w in &whiteouts {
        let n = node(&mounted.join(w), false);
        assert_eq!(
            (n.kind, n.rdev),
            ("char", Some((0, 0))),
            "whiteout {}",
            w.display()
        );
    }
    for (r, want_node) in &want {
        let mut got = node(&mounted.join(r), true);
        let mut want_node = want_node.clone();
        if want_node.kind == "dir" {
            // Directory sizes are filesystem-specific.
            got.size = None;
            want_node.size = None;
        }
        assert_eq!(got, want_node, "attributes of {:?}", r);
        if want_node.kind == "file" {
            same_content(&mounted.join(r), &extracted.join(r));
        }
    }
    let got_groups = link_groups(mounted, &got_paths);
    let want_groups = link_groups(extracted, &ext_paths);
    assert_eq!(got_groups, want_groups, "hard-link groups differ");
    assert!(!want_groups.is_empty(), "the test tree has hard links");
    want.len()
}

// ---------------------------------------------------------------------------
// Registry request counting

fn range_gets(env: &Env, desc: &Descriptor) -> usize {
    env.registry.range_gets(&desc.digest.to_string())
}

/// Drops the file's pages from the kernel page cache, so the next read reaches
/// the filesystem.
fn drop_page_cache(p: &Path) {
    let f = std::fs::File::open(p).expect("open");
    use std::os::fd::AsRawFd;
    // SAFETY: valid fd.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0);
}

// ---------------------------------------------------------------------------
// Tests

#[test]
fn mounted_layer_matches_gnu_tar_extraction() {
    let Some(env) = env() else { return };
    let src = env.path("src");
    build_all_types_tree(&src);
    let tar = env.dir.path().join("layer.tar");
    gnu_tar_create(&src, &tar);
    let extracted = env.path("extracted");
    gnu_tar_extract(&tar, &extracted);

    let repo = env.repo("lazyfs/alltypes");
    let desc = env.push_layer(&repo, &tar, &WriteOptions::default());
    let cache = cache_at(&env.path("cache"), 64 << 20, 256 << 20);
    let fetcher = env.fetcher(env.registry_source(&repo, &desc), &desc, &cache);
    let mut m = env.mount(Arc::clone(&fetcher), "mnt");
    let compared = compare_layer(m.mountpoint(), &extracted);
    assert!(compared > 600, "compared only {compared} entries");
    let s = fetcher.stats();
    assert_eq!(s.verification_failures, 0);
    assert!(s.chunks_verified > 0);
    // busybox from the lazily fetched layer runs.
    let bb = m.mountpoint().join("bin/busybox");
    if bb.exists() {
        let out = Command::new(&bb)
            .args(["echo", "lazy"])
            .output()
            .expect("run busybox");
        assert_eq!(out.stdout, b"lazy\n");
    }
    unmount_settled("unmount", || m.unmount());
    assert!(
        env.leftover_mounts().is_empty(),
        "{:?}",
        env.leftover_mounts()
    );
}

/// The fuse module's `enable_uring` parameter, turned on for a test and put back
/// as it was on drop.
struct EnableUring(String);

impl EnableUring {
    const PATH: &'static str = "/sys/module/fuse/parameters/enable_uring";

    /// `None` (loudly; a failure under CI) on a kernel without FUSE over io_uring.
    fn on() -> Option<EnableUring> {
        let before = match std::fs::read_to_string(Self::PATH) {
            Ok(before) => before.trim().to_string(),
            Err(e) => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "FUSE over io_uring needs Linux 6.14+ with CONFIG_FUSE_IO_URING: {}: {e}",
                    Self::PATH
                );
                eprintln!("SKIPPING: no FUSE over io_uring here: {}: {e}", Self::PATH);
                return None;
            }
        };
        std::fs::write(Self::PATH, "Y").expect("turn enable_uring on");
        Some(EnableUring(before))
    }
}

impl Drop for EnableUring {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, &self.0);
    }
}

/// A layer served over io_uring from a real registry: every entry matches GNU
/// tar's extraction, and 16 threads reading cold files at once (replies sent
/// later from the fetcher's runtime, many requests waiting in ring entries at
/// once) get the right bytes.
#[test]
fn layer_served_over_io_uring_matches_gnu_tar_and_concurrent_cold_reads() {
    let Some(env) = env() else { return };
    let Some(_uring) = EnableUring::on() else {
        return;
    };
    let options = MountOptions {
        io_uring: true,
        ..MountOptions::default()
    };
    let src = env.path("src");
    build_all_types_tree(&src);
    let tar = env.dir.path().join("layer.tar");
    gnu_tar_create(&src, &tar);
    let extracted = env.path("extracted");
    gnu_tar_extract(&tar, &extracted);
    let repo = env.repo("lazyfs/uring");
    let desc = env.push_layer(&repo, &tar, &WriteOptions::default());
    let cache = cache_at(&env.path("cache"), 64 << 20, 0);
    let fetcher = env.fetcher(env.registry_source(&repo, &desc), &desc, &cache);
    let mut m = LayerMount::mount(fetcher, &env.path("mnt"), &options).expect("mount");
    let compared = compare_layer(m.mountpoint(), &extracted);
    assert!(compared > 600, "compared only {compared} entries");
    let ring = m.io_uring().expect("mounted");
    assert_eq!(ring.state, zest_fs::IoUring::Active);
    assert!(ring.requests as usize > compared, "{ring:?}");
    unmount_settled("unmount", || m.unmount());

    let (n, size) = (12, 700_000);
    let tar = data_layer(&env, "uring-conc", n, size);
    let desc = env.push_layer(&repo, &tar, &WriteOptions::default());
    let cache = cache_at(&env.path("cache-conc"), 256 << 20, 0);
    let fetcher = env.fetcher(env.registry_source(&repo, &desc), &desc, &cache);
    let mut m =
        LayerMount::mount(Arc::clone(&fetcher), &env.path("mnt-conc"), &options).expect("mount");
    let root = m.mountpoint().to_path_buf();
    let errors = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..16usize {
            let (root, errors) = (&root, &errors);
            s.spawn(move || {
                for k in 0..n {
                    let i = (k + t) % n;
                    let got = std::fs::read(root.join(format!("data/f{i:03}"))).expect("read");
                    if got != pseudo_random(size, 100 + i as u64) {
                        errors.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    assert_eq!(errors.load(Ordering::SeqCst), 0, "a reader got wrong bytes");
    let s = fetcher.stats();
    assert_eq!(s.verification_failures, 0);
    assert!(s.blocking_misses > 0, "the reads were not cold: {s:?}");
    assert_eq!(
        m.io_uring().expect("mounted").state,
        zest_fs::IoUring::Active
    );
    unmount_settled("unmount", || m.unmount());
    assert!(
        env.leftover_mounts().is_empty(),
        "{:?}",
        env.leftover_mounts()
    );
}

/// Applies a layer's extracted tree onto `dest` the way overlayfs stacks it:
/// whiteouts delete, opaque directories drop what lower layers had, the rest
/// replaces or merges.
fn apply_layer(tar: &Path, dest: &Path, scratch: &Path) {
    gnu_tar_extract(tar, scratch);
    for r in walk(scratch) {
        let name = r
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name == ".wh..wh..opq" {
            let dir = dest.join(r.parent().unwrap_or(Path::new("")));
            if dir.is_dir() {
                for e in std::fs::read_dir(&dir).expect("read_dir") {
                    let p = e.expect("entry").path();
                    if std::fs::symlink_metadata(&p).expect("stat").is_dir() {
                        std::fs::remove_dir_all(&p).expect("rm -r");
                    } else {
                        std::fs::remove_file(&p).expect("rm");
                    }
                }
            }
        } else if let Some(hidden) = name.strip_prefix(".wh.") {
            let victim = dest.join(r.with_file_name(hidden));
            if let Ok(md) = std::fs::symlink_metadata(&victim) {
                if md.is_dir() {
                    std::fs::remove_dir_all(&victim).expect("rm -r");
                } else {
                    std::fs::remove_file(&victim).expect("rm");
                }
            }
        }
    }
    // Extract without the markers (removing them afterwards would change
    // directory times); tar sets each directory's time from the layer.
    std::fs::create_dir_all(dest).expect("create dest");
    run(Command::new("tar")
        .arg("-xpf")
        .arg(tar)
        .args([
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "--exclude=.wh.*",
        ])
        .arg("-C")
        .arg(dest));
}

#[test]
fn overlay_of_layers_matches_layers_applied_in_order() {
    let Some(env) = env() else { return };
    // Three layers: a base, one that deletes and hides, one that re-adds.
    let l1 = env.path("l1");
    write(&l1.join("etc/passwd"), b"root:x:0:0\n");
    write(&l1.join("etc/gone"), b"deleted by layer 2\n");
    write(&l1.join("app/lib/a.so"), &pseudo_random(100_000, 10));
    write(&l1.join("app/lib/b.so"), &pseudo_random(50_000, 11));
    write(&l1.join("app/conf/x"), b"x\n");
    write(&l1.join("data/keep"), b"keep\n");
    write(
        &l1.join("tree/sub/deep"),
        b"whole tree deleted by layer 2\n",
    );
    let l2 = env.path("l2");
    write(&l2.join("etc/.wh.gone"), b"");
    write(&l2.join("app/lib/.wh..wh..opq"), b"");
    write(&l2.join("app/lib/c.so"), &pseudo_random(70_000, 12));
    write(&l2.join(".wh.tree"), b"");
    write(&l2.join("data/new"), b"new in layer 2\n");
    let l3 = env.path("l3");
    write(&l3.join("etc/gone"), b"re-added by layer 3\n");
    write(&l3.join("etc/passwd"), b"root:x:0:0\nuser:x:1000:1000\n");
    write(&l3.join("app/conf/.wh.x"), b"");
    write(&l3.join("tree/fresh"), b"a new tree\n");
    for l in [&l1, &l2, &l3] {
        set_mtime(l, 1_700_000_000, 0);
    }

    let mut tars = Vec::new();
    for (i, l) in [&l1, &l2, &l3].iter().enumerate() {
        let t = env.dir.path().join(format!("l{i}.tar"));
        gnu_tar_create(l, &t);
        tars.push(t);
    }
    let reference = env.path("reference");
    for (i, t) in tars.iter().enumerate() {
        apply_layer(t, &reference, &env.path(&format!("scratch{i}")));
    }

    let repo = env.repo("lazyfs/overlay");
    let cache = cache_at(&env.path("cache"), 64 << 20, 256 << 20);
    let descs: Vec<Descriptor> = tars
        .iter()
        .map(|t| env.push_layer(&repo, t, &WriteOptions::default()))
        .collect();
    let fetchers = env
        .rt
        .block_on(open_image_layers(
            &ImageStore::Registry {
                client: env.client.clone(),
                reference: Reference {
                    repository: repo.clone(),
                    tag: Some("latest".into()),
                    digest: None,
                },
            },
            descs.iter().enumerate(),
            &cache,
            &FetchLimits::default(),
            &fast_fetch(),
            &TocFetchOptions::default(),
        ))
        .expect("open image layers");
    let target = env.path("rootfs");
    let mut image = ImageMount::mount_fetchers(
        fetchers,
        &env.path("layers"),
        &target,
        &MountOptions::default(),
    )
    .expect("overlay mount");
    assert_eq!(image.layers().len(), 3);
    let root = image.target().to_path_buf();

    let got = walk(&root);
    let want = walk(&reference);
    assert_eq!(
        got, want,
        "the overlay lists different names than the applied layers"
    );
    for r in &want {
        let g = node(&root.join(r), false);
        let w = node(&reference.join(r), false);
        let strip = |mut n: Node| {
            if n.kind == "dir" {
                n.size = None;
            }
            n
        };
        assert_eq!(strip(g), strip(w), "attributes of {:?}", r);
        if w_is_file(&reference.join(r)) {
            same_content(&root.join(r), &reference.join(r));
        }
    }
    assert_eq!(
        std::fs::read(root.join("etc/gone")).expect("read"),
        b"re-added by layer 3\n"
    );
    assert!(!root.join("app/lib/a.so").exists());
    assert!(!root.join("tree/sub").exists());

    unmount_settled("unmount image", || image.unmount());
    assert!(
        env.leftover_mounts().is_empty(),
        "{:?}",
        env.leftover_mounts()
    );
}

fn w_is_file(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file())
}

/// A layer of `n` files of `size` pseudo-random bytes each, plus one small file.
fn data_layer(env: &Env, name: &str, n: usize, size: usize) -> PathBuf {
    let src = env.path(&format!("{name}-src"));
    write(&src.join("small.txt"), b"a small file\n");
    for i in 0..n {
        write(
            &src.join(format!("data/f{i:03}")),
            &pseudo_random(size, 100 + i as u64),
        );
    }
    let tar = env.dir.path().join(format!("{name}.tar"));
    gnu_tar_create(&src, &tar);
    tar
}

#[test]
fn reads_are_lazy_cached_and_survive_a_restart() {
    let Some(env) = env() else { return };
    let tar = data_layer(&env, "lazy", 8, 1 << 20);
    let repo = env.repo("lazyfs/lazy");
    let desc = env.push_layer(&repo, &tar, &WriteOptions::default());
    let cache_dir = env.path("cache");
    let before = range_gets(&env, &desc);
    assert_eq!(before, 0);

    let cache = cache_at(&cache_dir, 64 << 20, 256 << 20);
    let fetcher = env.fetcher(env.registry_source(&repo, &desc), &desc, &cache);
    // The TOC, located by annotation: one range request.
    assert_eq!(range_gets(&env, &desc), 1, "mounting fetches the TOC only");
    let mut m = env.mount(Arc::clone(&fetcher), "mnt");
    // Listing and stat-ing everything is metadata only.
    let paths = walk(m.mountpoint());
    for p in &paths {
        let _ = node(&m.mountpoint().join(p), true);
    }
    assert_eq!(range_gets(&env, &desc), 1, "metadata must not fetch data");
    assert_eq!(fetcher.stats().range_requests, 0);

    // One small file: one request, a small one (read-ahead is bounded).
    let small = m.mountpoint().join("small.txt");
    let inodes = inodes_of(m.mountpoint(), &paths);
    assert_eq!(std::fs::read(&small).expect("read"), b"a small file\n");
    assert_eq!(
        range_gets(&env, &desc),
        2,
        "reading one small file is one request"
    );
    let s = fetcher.stats();
    assert_eq!(s.range_requests, 1);
    assert!(
        s.bytes_fetched <= fetcher.config().readahead_bytes + (512 << 10),
        "fetched {} bytes for a 13-byte file",
        s.bytes_fetched
    );
    // Again, with the page cache dropped: served from the chunk cache.
    drop_page_cache(&small);
    assert_eq!(std::fs::read(&small).expect("read"), b"a small file\n");
    assert_eq!(range_gets(&env, &desc), 2, "a second read fetches nothing");

    // Read one big file completely, then "restart": new cache and fetcher
    // objects on the same cache directory.
    let big = m.mountpoint().join("data/f003");
    let want = pseudo_random(1 << 20, 103);
    assert!(std::fs::read(&big).expect("read") == want);
    let after_read = range_gets(&env, &desc);
    unmount_settled("unmount", || m.unmount());
    drop(m);
    drop(fetcher);
    cache.flush();
    drop(cache);

    let cache = cache_at(&cache_dir, 64 << 20, 256 << 20);
    let fetcher = env.fetcher(env.registry_source(&repo, &desc), &desc, &cache);
    let mut m = env.mount(Arc::clone(&fetcher), "mnt2");
    // Inode numbers are a function of the layer: the same after a remount.
    let again = inodes_of(m.mountpoint(), &paths);
    assert_eq!(again, inodes);
    let toc_requests = 1;
    assert!(std::fs::read(m.mountpoint().join("data/f003")).expect("read") == want);
    assert_eq!(
        std::fs::read(m.mountpoint().join("small.txt")).expect("read"),
        b"a small file\n"
    );
    assert_eq!(
        range_gets(&env, &desc),
        after_read + toc_requests,
        "with a warm disk cache, reading fetches nothing"
    );
    assert_eq!(fetcher.stats().range_requests, 0);
    unmount_settled("unmount", || m.unmount());
    assert!(env.leftover_mounts().is_empty());
}

#[test]
fn concurrent_readers_get_correct_bytes_and_each_chunk_is_fetched_once() {
    let Some(env) = env() else { return };
    let n = 12;
    let size = 700_000;
    let tar = data_layer(&env, "conc", n, size);
    let repo = env.repo("lazyfs/concurrent");
    let desc = env.push_layer(&repo, &tar, &WriteOptions::default());
    let cache = cache_at(&env.path("cache"), 256 << 20, 256 << 20);
    let fetcher = env.fetcher(env.registry_source(&repo, &desc), &desc, &cache);
    let mut m = env.mount(Arc::clone(&fetcher), "mnt");
    let root = m.mountpoint().to_path_buf();
    let expected: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..n)
            .map(|i| pseudo_random(size, 100 + i as u64))
            .collect(),
    );
    let errors = Arc::new(AtomicUsize::new(0));
    std::thread::scope(|s| {
        for t in 0..16usize {
            let root = root.clone();
            let expected = Arc::clone(&expected);
            let errors = Arc::clone(&errors);
            s.spawn(move || {
                for k in 0..n {
                    // Threads start on different files and overlap.
                    let i = (k + t) % n;
                    let p = root.join(format!("data/f{i:03}"));
                    let mut f = std::fs::File::open(&p).expect("open");
                    // A random-ish slice first, then the whole file.
                    let off = (t * 7919 + k * 104_729) % (size - 5000);
                    let mut buf = vec![0u8; 5000];
                    use std::os::unix::fs::FileExt;
                    f.read_exact_at(&mut buf, off as u64).expect("pread");
                    if buf[..] != expected[i][off..off + 5000] {
                        errors.fetch_add(1, Ordering::SeqCst);
                    }
                    let mut all = Vec::new();
                    f.read_to_end(&mut all).expect("read");
                    if all != expected[i] {
                        errors.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    assert_eq!(
        errors.load(Ordering::SeqCst),
        0,
        "some reader got wrong bytes"
    );
    // Every chunk of the data files was needed; the small file's chunk only if
    // read-ahead took it. Each fetched exactly once.
    let index = fetcher.index();
    let chunks_of = |path: &str| {
        let id = index.resolve_path(path).expect("path in layer");
        index
            .entry(id)
            .chunks()
            .iter()
            .filter(|c| !c.zeros)
            .map(|c| c.digest)
            .collect::<Vec<_>>()
    };
    let mut distinct = std::collections::HashSet::new();
    for i in 0..n {
        distinct.extend(chunks_of(&format!("data/f{i:03}")));
    }
    let small_fetched = chunks_of("small.txt")
        .iter()
        .filter(|d| cache.memory().contains(d))
        .count();
    let s = fetcher.stats();
    assert_eq!(
        s.chunks_verified as usize,
        distinct.len() + small_fetched,
        "each chunk fetched and verified once: {s:?}"
    );
    assert_eq!(s.verification_failures, 0);
    assert_eq!(
        range_gets(&env, &desc) as u64,
        s.range_requests + 1,
        "registry saw the fetcher's requests + TOC"
    );
    unmount_settled("unmount", || m.unmount());
}

#[test]
fn disk_cache_stays_under_budget_while_reading_more() {
    let Some(env) = env() else { return };
    let tar = data_layer(&env, "budget", 8, 1 << 20);
    let repo = env.repo("lazyfs/budget");
    let desc = env.push_layer(&repo, &tar, &WriteOptions::default());
    let cache_dir = env.path("cache");
    let budget = 2 << 20;
    let cache = cache_at(&cache_dir, 512 << 10, budget);
    let fetcher = env.fetcher(env.registry_source(&repo, &desc), &desc, &cache);
    let mut m = env.mount(Arc::clone(&fetcher), "mnt");
    for i in 0..8 {
        let got = std::fs::read(m.mountpoint().join(format!("data/f{i:03}"))).expect("read");
        assert!(got == pseudo_random(1 << 20, 100 + i), "file {i} content");
        cache.flush();
        let u = cache.disk().expect("disk tier").usage();
        assert_eq!(u.budget_bytes, budget);
        assert!(
            u.bytes <= budget,
            "disk cache holds {} bytes ({} chunks), over the {budget}-byte budget",
            u.bytes,
            u.entries
        );
        assert!(u.entries > 0);
    }
    // What is really on disk, too.
    let on_disk: u64 = walk(&cache_dir)
        .iter()
        .filter_map(|r| std::fs::symlink_metadata(cache_dir.join(r)).ok())
        .filter(|md| md.is_file())
        .map(|md| md.len())
        .sum();
    assert!(
        on_disk <= budget + (64 << 10),
        "{on_disk} bytes of files in the cache dir"
    );
    unmount_settled("unmount", || m.unmount());
}

// ---------------------------------------------------------------------------
// Corruption: a loopback proxy that flips bytes of range responses.

struct FlipProxy {
    port: u16,
    flip: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FlipProxy {
    fn start(upstream: u16) -> FlipProxy {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        l.set_nonblocking(true).expect("nonblocking");
        let port = l.local_addr().expect("addr").port();
        let flip = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, st) = (Arc::clone(&flip), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((c, _)) => {
                        let f = Arc::clone(&f);
                        std::thread::spawn(move || proxy_one(c, upstream, &f));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FlipProxy {
            port,
            flip,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for FlipProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One request per connection: forward with `Connection: close`, read the whole
/// answer, flip one byte of a 206 body when asked.
fn proxy_one(mut client: TcpStream, upstream: u16, flip: &AtomicBool) {
    let _ = client.set_nonblocking(false);
    let _ = client.set_read_timeout(Some(Duration::from_secs(10)));
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 64 << 10 {
        match client.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => return,
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut out = String::new();
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        if !line.to_ascii_lowercase().starts_with("connection:") {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out.push_str("Connection: close\r\n\r\n");
    let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)) else {
        return;
    };
    let _ = up.set_read_timeout(Some(Duration::from_secs(10)));
    if up.write_all(out.as_bytes()).is_err() {
        return;
    }
    let mut resp = Vec::new();
    let _ = up.read_to_end(&mut resp);
    if flip.load(Ordering::SeqCst) && resp.starts_with(b"HTTP/1.1 206") {
        if let Some(p) = resp.windows(4).position(|w| w == b"\r\n\r\n") {
            let body = p + 4;
            if resp.len() > body {
                let mid = body + (resp.len() - body) / 2;
                resp[mid] ^= 0x40;
            }
        }
    }
    let _ = client.write_all(&resp);
}

#[test]
fn corrupted_range_responses_never_reach_the_reader() {
    let Some(env) = env() else { return };
    let tar = data_layer(&env, "corrupt", 2, 300_000);
    let repo = env.repo("lazyfs/corrupt");
    let desc = env.push_layer(&repo, &tar, &WriteOptions::default());
    let cache = cache_at(&env.path("cache"), 64 << 20, 0);
    // The TOC comes straight from the registry; data through the proxy.
    let proxy = FlipProxy::start(env.registry.port);
    let proxy_host = format!("127.0.0.1:{}", proxy.port);
    let mut cfg = support::test_client_config(PlainHttp::Hosts(vec![proxy_host.clone()]));
    cfg.retry.max_attempts = 1;
    let proxy_client = RegistryClient::new(cfg).expect("client");
    let proxy_repo = Repository::new(&proxy_host, &repo.name).expect("repo");
    let source: Arc<dyn BlobSource> =
        Arc::new(RegistryBlob::for_layer(proxy_client, proxy_repo, &desc));
    let fetcher = env.fetcher(source, &desc, &cache);
    let mut m = env.mount(Arc::clone(&fetcher), "mnt");
    proxy.flip.store(true, Ordering::SeqCst);

    let p = m.mountpoint().join("data/f000");
    let started = Instant::now();
    let err = std::fs::read(&p).expect_err("a corrupted chunk must fail the read");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the failure must come quickly"
    );
    let s = fetcher.stats();
    assert!(s.verification_failures >= 1, "{s:?}");
    // Retries are bounded per fetch (the kernel may send several reads, each
    // of which fails after its own bounded attempts).
    assert!(
        s.range_requests <= u64::from(fetcher.config().attempts) * s.blocking_misses,
        "bounded retries: {s:?}"
    );

    // Once the proxy behaves, the same read succeeds with the right bytes.
    proxy.flip.store(false, Ordering::SeqCst);
    drop_page_cache(&p);
    let got = std::fs::read(&p).expect("read after the proxy heals");
    assert!(got == pseudo_random(300_000, 100), "healed read content");
    unmount_settled("unmount", || m.unmount());
    drop(proxy);
    assert!(env.leftover_mounts().is_empty());
}

#[test]
fn prefetch_fetches_the_startup_files_in_few_requests_at_mount() {
    let Some(env) = env() else { return };
    let src = env.path("prefetch-src");
    let startup: Vec<String> = (0..4).map(|i| format!("app/start{i}")).collect();
    for (i, p) in startup.iter().enumerate() {
        write(&src.join(p), &pseudo_random(1 << 20, 200 + i as u64));
    }
    for i in 0..8 {
        write(
            &src.join(format!("other/f{i}")),
            &pseudo_random(1 << 20, 300 + i),
        );
    }
    // The startup files go first in the tar, as a profiled conversion writes them.
    let mut list = vec![".".to_string(), "./app".into()];
    list.extend(startup.iter().map(|p| format!("./{p}")));
    list.push("./other".into());
    list.extend((0..8).map(|i| format!("./other/f{i}")));
    let list_file = env.dir.path().join("order.txt");
    std::fs::write(&list_file, list.join("\n") + "\n").expect("write list");
    let tar = env.dir.path().join("prefetch.tar");
    run(Command::new("tar")
        .args(["--numeric-owner", "--format=posix", "--no-recursion"])
        .arg("-cpf")
        .arg(&tar)
        .arg("-C")
        .arg(&src)
        .arg("-T")
        .arg(&list_file));
    let repo = env.repo("lazyfs/prefetch");
    let opts = WriteOptions {
        prioritized: startup.clone(),
        ..WriteOptions::default()
    };
    let desc = env.push_layer(&repo, &tar, &opts);
    let cache = cache_at(&env.path("cache"), 128 << 20, 256 << 20);
    let fetcher = env.fetcher(env.registry_source(&repo, &desc), &desc, &cache);
    let extent = fetcher
        .index()
        .prefetch_extent()
        .expect("the layer has a prefetch extent");
    assert!(
        extent.end >= 4 << 20,
        "extent {extent:?} covers the startup files"
    );
    let mut m = env.mount(Arc::clone(&fetcher), "mnt");
    assert!(
        m.wait_prefetch(Duration::from_secs(60)),
        "prefetch did not finish"
    );
    let s = fetcher.stats();
    assert!(s.prefetch_bytes >= 4 << 20, "{s:?}");
    // Requests start at 512 KiB and double up to `prefetch_request_bytes`
    // (the first files arrive after one round trip); one more for slack.
    let (mut max_requests, mut size, mut covered) = (1u64, 512u64 << 10, 0u64);
    while covered < extent.end - extent.start {
        covered += size;
        size = (size * 2).min(fetcher.config().prefetch_request_bytes);
        max_requests += 1;
    }
    assert!(
        s.range_requests <= max_requests,
        "prefetch took {} requests: {s:?}",
        s.range_requests
    );
    let after_prefetch = range_gets(&env, &desc);
    // The startup files are served without any request or wait.
    for (i, p) in startup.iter().enumerate() {
        let got = std::fs::read(m.mountpoint().join(p)).expect("read");
        assert!(got == pseudo_random(1 << 20, 200 + i as u64), "{p}");
    }
    assert_eq!(range_gets(&env, &desc), after_prefetch);
    assert_eq!(fetcher.stats().blocking_misses, 0);
    // Other files are still lazy.
    let got = std::fs::read(m.mountpoint().join("other/f5")).expect("read");
    assert!(got == pseudo_random(1 << 20, 305));
    assert!(fetcher.stats().blocking_misses > 0);
    assert!(range_gets(&env, &desc) > after_prefetch);
    unmount_settled("unmount", || m.unmount());
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn fully_cached_files_are_served_by_passthrough_also_under_overlay() {
    let Some(env) = env() else { return };
    let tar = data_layer(&env, "pt", 2, 600_000);
    let tar2 = data_layer(&env, "pt-top", 0, 0);
    let repo = env.repo("lazyfs/passthrough");
    let desc = env.push_layer(&repo, &tar, &WriteOptions::default());
    let desc2 = env.push_layer(&repo, &tar2, &WriteOptions::default());
    let cache = cache_at(&env.path("cache"), 64 << 20, 256 << 20);
    let Some((m, _fetcher, store)) = env.mount_with_passthrough(&repo, &desc, &cache) else {
        return;
    };
    let p = m.mountpoint().join("data/f000");
    let want = pseudo_random(600_000, 100);
    // First open: not cached, served through FUSE reads. Keep it open.
    let mut h1 = std::fs::File::open(&p).expect("open");
    let mut got = Vec::new();
    h1.read_to_end(&mut got).expect("read");
    assert!(got == want);
    assert!(m.fs().stats().reads > 0);
    // Closing a handle of the now fully cached file stores it for passthrough.
    let h2 = std::fs::File::open(&p).expect("second open");
    drop(h2);
    wait_for("the file to be stored", Duration::from_secs(20), || {
        store.len() == 1
    });
    assert_eq!(store.used(), 600_000);
    // h1 is still open in page-cache mode: the kernel refuses (EIO) a
    // passthrough open of the same inode now, so this one must stay cached.
    let mut h3 = std::fs::File::open(&p).expect("open while a cached handle is open");
    let mut got = Vec::new();
    h3.read_to_end(&mut got)
        .expect("read while a cached handle is open");
    assert!(got == want);
    assert_eq!(m.fs().stats().passthrough_opens, 0);
    drop(h3);
    drop(h1);
    // The kernel releases handles asynchronously after close.
    wait_for(
        "the handles to be released",
        Duration::from_secs(10),
        || m.fs().stats().open_files == 0,
    );

    drop_page_cache(&p);
    let reads_before = m.fs().stats().reads;
    let got = std::fs::read(&p).expect("read by passthrough");
    assert!(got == want, "passthrough content");
    let st = m.fs().stats();
    assert!(st.passthrough_opens >= 1, "{st:?}");
    assert_eq!(
        st.reads, reads_before,
        "passthrough reads must not reach the daemon"
    );
    // mmap works too.
    {
        let f = std::fs::File::open(&p).expect("open");
        use std::os::fd::AsRawFd;
        // SAFETY: read-only private mapping of an open file of that length.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                600_000,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        // SAFETY: the mapping is 600_000 readable bytes.
        let mapped = unsafe { std::slice::from_raw_parts(ptr as *const u8, 600_000) };
        assert!(mapped == &want[..]);
        // SAFETY: unmapping what was mapped.
        unsafe { libc::munmap(ptr, 600_000) };
    }

    // An overlay stacked on passthrough-enabled layers mounts and reads.
    let fetcher2 = env.fetcher(env.registry_source(&repo, &desc2), &desc2, &cache);
    let m2 = LayerMount::mount(fetcher2, &env.path("mnt2"), &passthrough_options(&store))
        .expect("mount top");
    let fs1 = Arc::clone(m.fs());
    let mut image = ImageMount::mount(vec![m, m2], &env.path("rootfs"))
        .expect("overlay over passthrough layers");
    let before = fs1.stats();
    let got = std::fs::read(image.target().join("data/f000")).expect("read through overlay");
    assert!(got == want);
    let after = fs1.stats();
    assert!(
        after.passthrough_opens > before.passthrough_opens,
        "{after:?}"
    );
    assert_eq!(after.reads, before.reads);
    unmount_settled("unmount", || image.unmount());
    assert!(
        env.leftover_mounts().is_empty(),
        "{:?}",
        env.leftover_mounts()
    );
}

/// A layer of `dirs` × `per_dir` small files `m{d}/f{nn}.py` (40 B to 9 KiB),
/// with their contents by relative path.
fn small_files_layer(
    env: &Env,
    name: &str,
    dirs: usize,
    per_dir: usize,
) -> (PathBuf, Vec<(String, Vec<u8>)>) {
    let src = env.path(&format!("{name}-src"));
    let mut files = Vec::new();
    for d in 0..dirs {
        for f in 0..per_dir {
            let rel = format!("m{d}/f{f:02}.py");
            let len = 40 + (d * 7919 + f * 3571) % 9000;
            let data = pseudo_random(len, (d * 1000 + f) as u64);
            write(&src.join(&rel), &data);
            files.push((rel, data));
        }
    }
    let tar = env.dir.path().join(format!("{name}.tar"));
    gnu_tar_create(&src, &tar);
    (tar, files)
}

/// A fresh writable overlay over `lower` in `scratch`, as containerd stacks a
/// container's root filesystem; returns its root. Unmount with `zest_mount::umount`.
fn container_overlay(lower: &Path, scratch: &Path) -> PathBuf {
    let (upper, work, target) = (
        scratch.join("upper"),
        scratch.join("work"),
        scratch.join("rootfs"),
    );
    for d in [&upper, &work, &target] {
        std::fs::create_dir_all(d).expect("create overlay dir");
    }
    let stack = zest_mount::Overlay {
        lower: vec![lower],
        upper: Some((&upper, &work)),
    };
    zest_mount::overlay(&target, &stack).expect("overlay over the layer");
    target
}

/// Lists every directory and reads every file under `root`, checking the bytes.
fn read_all(root: &Path, files: &[(String, Vec<u8>)]) {
    let mut dirs: Vec<&str> = files
        .iter()
        .filter_map(|(rel, _)| rel.split_once('/').map(|(d, _)| d))
        .collect();
    dirs.dedup();
    for d in dirs {
        let listed = std::fs::read_dir(root.join(d)).expect("list").count();
        assert_eq!(
            listed,
            files.iter().filter(|(r, _)| r.starts_with(d)).count()
        );
    }
    for (rel, want) in files {
        let got = std::fs::read(root.join(rel)).expect("read");
        assert!(&got == want, "{rel}: wrong bytes");
    }
}

#[test]
fn warm_opens_and_listings_never_reach_the_daemon() {
    let Some(env) = env() else { return };
    let (tar, files) = small_files_layer(&env, "noopen", 4, 10);
    let repo = env.repo("lazyfs/noopen");
    let desc = env.push_layer(&repo, &tar, &WriteOptions::default());
    let cache = cache_at(&env.path("cache"), 64 << 20, 0);
    let fetcher = env.fetcher(env.registry_source(&repo, &desc), &desc, &cache);
    // Defaults: no passthrough, so the kernel is told the layer has no OPEN.
    let m = env.mount(fetcher, "mnt");
    assert!(!m.fs().needs_opens());

    // First container: everything is fetched and read through FUSE. The first
    // OPEN, OPENDIR and FLUSH (at the first close) are refused with ENOSYS; the
    // kernel sends none after, and no RELEASE at all.
    let rootfs = container_overlay(m.mountpoint(), &env.path("c1"));
    read_all(&rootfs, &files);
    unmount_settled("unmount overlay", || zest_mount::umount(&rootfs));
    let first = m.fs().stats();
    assert!(first.reads > 0, "{first:?}");
    let r = first.requests;
    assert_eq!(
        (r.opens, r.opendirs, r.flushes, r.releases),
        (1, 1, 1, 0),
        "{r:?}"
    );

    // Second container on the same layer: the same bytes, and no open, flush,
    // release or directory open reaches the daemon.
    let rootfs = container_overlay(m.mountpoint(), &env.path("c2"));
    read_all(&rootfs, &files);
    let second = m.fs().stats().requests;
    assert_eq!(
        (
            second.opens,
            second.opendirs,
            second.flushes,
            second.releases
        ),
        (1, 1, 1, 0),
        "{second:?}"
    );
    // Pages dropped from the kernel's cache are read again through FUSE, still
    // without an open, and right.
    let (rel, want) = &files[7];
    drop_page_cache(&rootfs.join(rel));
    let reads = m.fs().stats().reads;
    assert!(&std::fs::read(rootfs.join(rel)).expect("read again") == want);
    assert!(m.fs().stats().reads > reads, "the read did not reach FUSE");
    assert_eq!(m.fs().stats().requests.opens, 1);
    unmount_settled("unmount overlay", || zest_mount::umount(&rootfs));
    drop(m);
    assert!(
        env.leftover_mounts().is_empty(),
        "{:?}",
        env.leftover_mounts()
    );
}

#[test]
fn a_finished_recording_gives_the_mount_the_warm_path() {
    let Some(env) = env() else { return };
    let (tar, files) = small_files_layer(&env, "recorded", 2, 10);
    let repo = env.repo("lazyfs/recorded");
    let desc = env.push_layer(&repo, &tar, &WriteOptions::default());
    let cache = cache_at(&env.path("cache"), 64 << 20, 0);
    let fetcher = env.fetcher(env.registry_source(&repo, &desc), &desc, &cache);
    let recorder = Arc::new(AccessRecorder::new());
    let options = MountOptions {
        fs: LayerFsOptions {
            recorder: Some(Arc::clone(&recorder)),
            ..LayerFsOptions::default()
        },
        ..MountOptions::default()
    };
    let m = LayerMount::mount(fetcher, &env.path("mnt"), &options).expect("mount");
    // While recording, every open reaches the daemon and is noted.
    assert!(m.fs().needs_opens());
    let rootfs = container_overlay(m.mountpoint(), &env.path("c1"));
    read_all(&rootfs, &files);
    unmount_settled("unmount overlay", || zest_mount::umount(&rootfs));
    let recorded = m.fs().stats().requests.opens;
    assert!(recorded >= files.len() as u64, "{recorded}");
    assert_eq!(recorder.len(), files.len());

    // Once the recording is finished, the next open is refused and no other
    // follows: the same mount now has the warm path.
    recorder.finish();
    assert!(!m.fs().needs_opens());
    let rootfs = container_overlay(m.mountpoint(), &env.path("c2"));
    read_all(&rootfs, &files);
    assert_eq!(m.fs().stats().requests.opens, recorded + 1);
    assert_eq!(recorder.len(), files.len());
    unmount_settled("unmount overlay", || zest_mount::umount(&rootfs));
}

#[test]
fn every_cached_file_small_ones_included_is_served_by_passthrough() {
    let Some(env) = env() else { return };
    let (tar, files) = small_files_layer(&env, "ptsmall", 3, 10);
    let repo = env.repo("lazyfs/passthrough-small");
    let desc = env.push_layer(&repo, &tar, &WriteOptions::default());
    let cache = cache_at(&env.path("cache"), 64 << 20, 0);
    let Some((m, fetcher, store)) = env.mount_with_passthrough(&repo, &desc, &cache) else {
        return;
    };
    assert!(m.fs().needs_opens());

    // A file cached without being opened (as a prefetch or another layer
    // sharing its chunks does) is stored at its first open, while still open.
    let (rel, want) = &files[3];
    let id = fetcher.index().resolve_path(rel).expect("file in index");
    let got = env
        .rt
        .block_on(fetcher.read(id, 0, want.len() as u32))
        .expect("read through the fetcher");
    assert!(got[..] == want[..]);
    let held = std::fs::File::open(m.mountpoint().join(rel)).expect("first open");
    wait_for(
        "the file to be stored at open",
        Duration::from_secs(20),
        || store.len() == 1,
    );
    drop(held);

    // First container: every file is fetched, read through FUSE, and stored once
    // closed.
    let rootfs = container_overlay(m.mountpoint(), &env.path("c1"));
    read_all(&rootfs, &files);
    unmount_settled("unmount overlay", || zest_mount::umount(&rootfs));
    wait_for("every file to be stored", Duration::from_secs(30), || {
        store.len() == files.len()
    });
    let stored: usize = files.iter().map(|(_, d)| d.len()).sum();
    assert_eq!(store.used(), stored as u64);
    wait_for(
        "the handles to be released",
        Duration::from_secs(10),
        || m.fs().stats().open_files == 0,
    );

    // Second container: every open is answered with the stored copy; no read and
    // no flush reaches the daemon, and the bytes are right.
    let before = m.fs().stats();
    let rootfs = container_overlay(m.mountpoint(), &env.path("c2"));
    read_all(&rootfs, &files);
    unmount_settled("unmount overlay", || zest_mount::umount(&rootfs));
    let after = m.fs().stats();
    assert_eq!(
        after.passthrough_opens - before.passthrough_opens,
        files.len() as u64,
        "{after:?}"
    );
    assert_eq!(
        after.reads, before.reads,
        "passthrough reads reached the daemon"
    );
    assert_eq!(after.requests.flushes, 0, "{after:?}");
    drop(m);
    assert!(
        env.leftover_mounts().is_empty(),
        "{:?}",
        env.leftover_mounts()
    );
}

/// Builds a root filesystem from real files in a umoci bundle: static busybox
/// with applet symlinks, a few packages' documentation, a hard link, setuid and
/// setgid files, other owners, an xattr, and an empty directory.
fn build_real_rootfs(rootfs: &Path) {
    let bin = rootfs.join("bin");
    std::fs::create_dir_all(&bin).expect("create bin");
    std::fs::copy("/usr/bin/busybox", bin.join("busybox")).expect("copy busybox");
    chmod(&bin.join("busybox"), 0o755);
    for applet in ["sh", "ls", "cat", "echo", "true", "sleep"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("applet symlink");
    }
    let doc = rootfs.join("usr/share/doc");
    std::fs::create_dir_all(&doc).expect("create doc dir");
    let mut copied = 0;
    for pkg in [
        "busybox-static",
        "zstd",
        "tar",
        "skopeo",
        "umoci",
        "libc6",
        "bash",
    ] {
        let from = Path::new("/usr/share/doc").join(pkg);
        if from.is_dir() {
            run(Command::new("cp").arg("-a").arg(&from).arg(&doc));
            copied += 1;
        }
    }
    assert!(copied >= 2, "too few /usr/share/doc packages to copy");
    let etc = rootfs.join("etc");
    std::fs::create_dir_all(&etc).expect("create etc");
    write(&etc.join("hosts"), b"127.0.0.1 localhost\n");
    std::fs::hard_link(etc.join("hosts"), etc.join("hosts.hard")).expect("hard link");
    std::os::unix::fs::symlink("/bin/busybox", rootfs.join("init")).expect("absolute symlink");
    std::os::unix::fs::symlink("../../bin/busybox", rootfs.join("usr/share/bb"))
        .expect("relative symlink");
    let suid = rootfs.join("bin/suid-tool");
    write(&suid, &pseudo_random(300_000, 42));
    chmod(&suid, 0o4755);
    let sgid = rootfs.join("bin/sgid-tool");
    write(&sgid, b"#!/bin/sh\necho sgid\n");
    chown(&sgid, 0, 50);
    chmod(&sgid, 0o2755);
    let home = rootfs.join("home/user");
    std::fs::create_dir_all(&home).expect("create home");
    write(&home.join("notes.txt"), &b"lazily pulled\n".repeat(10_000));
    chown(&home.join("notes.txt"), 1000, 1000);
    chown(&home, 1000, 1000);
    chmod(&home, 0o700);
    set_xattr(&home.join("notes.txt"), "user.origin", b"skopeo test");
    std::fs::create_dir_all(rootfs.join("var/empty")).expect("create empty dir");
}

/// The layer skopeo (old-generation zstd:chunked writer) makes of a real root
/// filesystem, mounted through zest's FUSE layer, equals GNU tar's extraction
/// of the decompressed blob.
#[test]
fn skopeo_zstd_chunked_layer_of_a_real_rootfs_matches_gnu_tar_extraction() {
    let Some(env) = env() else { return };
    if !require_tool("skopeo")
        || !require_tool("umoci")
        || !require_tool("zstd")
        || !require_tool("/usr/bin/busybox")
    {
        return;
    }
    let layout = env.dir.path().join("layout");
    let bundle = env.dir.path().join("bundle");
    let image = format!("{}:rootfs", layout.display());
    run(Command::new("umoci")
        .args(["init", "--layout"])
        .arg(&layout));
    run(Command::new("umoci").args(["new", "--image", &image]));
    run(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle));
    build_real_rootfs(&bundle.join("rootfs"));
    run(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle));

    // skopeo reuses a blob it has seen before in another compression unless its
    // blob-info cache is gone.
    let _ = std::fs::remove_file("/var/lib/containers/cache/blob-info-cache-v1.boltdb");
    let reference = format!("{}/lazyfs/skopeo:chunked", env.registry.host());
    run(Command::new("skopeo").args([
        "--insecure-policy",
        "copy",
        "--dest-compress-format",
        "zstd:chunked",
        "--dest-compress",
        "--dest-tls-verify=false",
        &format!("oci:{image}"),
        &format!("docker://{reference}"),
    ]));

    let parsed: Reference = reference.parse().expect("image reference");
    let fetched = env
        .rt
        .block_on(env.client.get_manifest(&parsed))
        .expect("fetch the manifest skopeo pushed");
    let manifest = ImageManifest::from_json(&fetched.bytes).expect("parse manifest");
    let desc = manifest.layers.last().expect("a layer").clone();
    assert!(
        desc.annotations
            .contains_key("io.containers.zstd-chunked.manifest-checksum"),
        "skopeo did not write a zstd:chunked layer: {desc:?}"
    );

    // Reference tree: the whole blob, decompressed by zstd, extracted by GNU tar.
    let blob = env
        .rt
        .block_on(
            env.client
                .get_blob_bytes(&parsed.repository, &desc.digest, 1 << 30),
        )
        .expect("download the layer blob");
    let blob_path = env.dir.path().join("layer.tar.zst");
    std::fs::write(&blob_path, &blob).expect("write blob");
    let tar = env.dir.path().join("layer.tar");
    run(Command::new("zstd")
        .args(["-d", "-q", "-f"])
        .arg(&blob_path)
        .arg("-o")
        .arg(&tar));
    let extracted = env.path("extracted");
    gnu_tar_extract(&tar, &extracted);

    let cache = cache_at(&env.path("cache"), 64 << 20, 256 << 20);
    let fetcher = env.fetcher(
        env.registry_source(&parsed.repository, &desc),
        &desc,
        &cache,
    );
    let mut m = env.mount(Arc::clone(&fetcher), "mnt");
    let compared = compare_layer(m.mountpoint(), &extracted);
    assert!(compared > 20, "compared only {compared} entries");
    let mnt = m.mountpoint();
    let suid = std::fs::symlink_metadata(mnt.join("bin/suid-tool")).expect("stat suid file");
    assert_eq!(suid.mode() & 0o7777, 0o4755, "setuid bit");
    assert_eq!(
        std::fs::read_link(mnt.join("bin/sh")).expect("readlink"),
        Path::new("busybox")
    );
    let out = Command::new(mnt.join("bin/busybox"))
        .args(["echo", "lazy"])
        .output()
        .expect("run busybox from the mount");
    assert_eq!(out.stdout, b"lazy\n");
    let s = fetcher.stats();
    assert_eq!(s.verification_failures, 0);
    assert!(s.chunks_verified > 0);
    unmount_settled("unmount", || m.unmount());
    assert!(
        env.leftover_mounts().is_empty(),
        "{:?}",
        env.leftover_mounts()
    );
}

/// The fd holder keeps a real layer's FUSE connection while it is mounted and
/// drops it by itself once the layer is unmounted (the kernel then reports the
/// connection's descriptor as failed).
#[test]
fn fd_holder_drops_the_connection_of_an_unmounted_layer() {
    let Some(env) = env() else { return };
    let tar = data_layer(&env, "held", 2, 64 << 10);
    let repo = env.repo("lazyfs/held");
    let desc = env.push_layer(&repo, &tar, &WriteOptions::default());
    let cache = cache_at(&env.path("cache"), 16 << 20, 0);
    let fetcher = env.fetcher(env.registry_source(&repo, &desc), &desc, &cache);
    let mut m = env.mount(fetcher, "mnt");
    let socket = env.dir.path().join("holder/fd-holder.sock");
    let holder = zest_fdstore::HolderClient::connect_or_start(
        &socket,
        Box::new(|s: &Path| {
            let options = zest_fdstore::HolderOptions {
                socket: s.to_path_buf(),
                idle_exit: Duration::from_secs(30),
            };
            std::thread::spawn(move || zest_fdstore::run_holder(&options));
            Ok(())
        }),
    )
    .expect("start an fd holder");
    holder
        .store(
            "layer",
            m.device().expect("a mounted layer has a connection"),
        )
        .expect("store the connection");
    assert_eq!(holder.list().expect("list").len(), 1);
    // Still served while a copy is held elsewhere.
    assert_eq!(
        std::fs::read(m.mountpoint().join("small.txt")).expect("read"),
        b"a small file\n"
    );
    unmount_settled("unmount", || m.unmount());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let held = holder.list().expect("list").len();
        if held == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the holder kept a dead connection"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(env.leftover_mounts().is_empty());
}
