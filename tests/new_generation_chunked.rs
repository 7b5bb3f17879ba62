//! zstd:chunked as the current containers toolchain writes it (skopeo 1.22 from
//! Debian's newer suite, see `scripts/newer-debian`): the new generation, with the
//! 64-byte footer, the tar-split frame and the `io.github.containers.zstd-chunked.*`
//! annotations. A layer with every kind of entry a real image has (hard links,
//! symlinks, names longer than ustar allows, xattrs, empty and zero-filled files, a
//! FIFO, setuid and unusual owners and modes), archived by GNU tar and compressed by
//! skopeo, must mount through zest as exactly the tree GNU tar extracts from the same
//! blob; and the image must pull lazily and run.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::containerd::{
    fail, lazy_provider, require_containerd, require_tools, run_ok, Containerd, ContainerdVersion,
    TestCache, TestDir, TestResult, ZestService,
};
use support::image::{build_image, busybox_layer_tar};
use support::{Auth, Registry};
use zest_api::labels::{LABEL_LAYER_DIGEST, LABEL_REMOTE};
use zest_format::{parse_footer, Generation, TocLocation};
use zest_oci::digest::Digest;
use zest_oci::{ImageManifest, LayerCompression, Platform, Reference};

/// The newer skopeo `scripts/newer-debian` extracts.
fn newer_skopeo() -> PathBuf {
    std::env::var_os("ZEST_NEWER_DEBIAN_DIR")
        .map_or_else(
            || PathBuf::from("/var/cache/zest/newer-debian"),
            PathBuf::from,
        )
        .join("skopeo/bin/skopeo")
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap_or_default()
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> TestResult {
    let (p, n) = (c_path(path), CString::new(name)?);
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let rc = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc != 0 {
        return Err(fail(format!(
            "setxattr {name} on {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// The `user.*` extended attributes of `path` (not following symlinks).
fn user_xattrs(path: &Path) -> TestResult<BTreeMap<String, Vec<u8>>> {
    let p = c_path(path);
    let mut names = vec![0u8; 64 << 10];
    // SAFETY: the buffer is valid for its length.
    let n = unsafe { libc::llistxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        return Err(fail(format!(
            "listxattr {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        )));
    }
    let mut out = BTreeMap::new();
    for name in names[..n as usize]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
    {
        let name = String::from_utf8_lossy(name).into_owned();
        if !name.starts_with("user.") {
            continue;
        }
        let n_c = CString::new(name.clone())?;
        let mut value = vec![0u8; 64 << 10];
        // SAFETY: as above.
        let len = unsafe {
            libc::lgetxattr(
                p.as_ptr(),
                n_c.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if len < 0 {
            return Err(fail(format!(
                "getxattr {name} on {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            )));
        }
        value.truncate(len as usize);
        out.insert(name, value);
    }
    Ok(out)
}

/// Builds the source tree of the varied layer under `root`.
fn build_tree(root: &Path) -> TestResult {
    use std::fs;
    use std::os::unix::fs::{lchown, symlink};
    let mode = |p: &Path, m: u32| fs::set_permissions(p, fs::Permissions::from_mode(m));
    fs::create_dir_all(root)?;
    mode(root, 0o755)?;
    let tree = root.join("tree");
    fs::create_dir(&tree)?;

    // Regular files: content, an empty one, one larger than a chunk with long
    // runs of zeros between data islands (stored as `zeros` chunks), owners and modes.
    let data = support::pseudo_random(300 << 10, 7);
    fs::write(tree.join("data.bin"), &data)?;
    lchown(tree.join("data.bin"), Some(123), Some(456))?;
    mode(&tree.join("data.bin"), 0o640)?;
    fs::write(tree.join("empty"), b"")?;
    mode(&tree.join("empty"), 0o600)?;
    let sparse = fs::File::create(tree.join("sparse.img"))?;
    sparse.set_len(9 << 20)?;
    for (i, at) in [0u64, 3 << 20, (9 << 20) - 4096].into_iter().enumerate() {
        sparse.write_all_at(&support::pseudo_random(4096, 100 + i as u64), at)?;
    }
    drop(sparse);
    fs::write(tree.join("setuid"), b"#!/bin/sh\n")?;
    lchown(tree.join("setuid"), Some(0), Some(0))?;
    mode(&tree.join("setuid"), 0o4755)?;

    // Links: a hard link pair, relative, absolute and dangling symlinks.
    fs::hard_link(tree.join("data.bin"), tree.join("data.hardlink"))?;
    symlink("data.bin", tree.join("rel-link"))?;
    symlink("/tree/data.bin", tree.join("abs-link"))?;
    symlink("does/not/exist", tree.join("dangling"))?;

    // Names beyond ustar's 100 bytes: a deep path and a 200-byte file name.
    let deep = tree
        .join("a".repeat(60))
        .join("b".repeat(60))
        .join("c".repeat(60));
    fs::create_dir_all(&deep)?;
    let long_name = deep.join(format!("{}.txt", "n".repeat(196)));
    fs::write(&long_name, b"a long way down\n")?;
    symlink(
        format!("{}.txt", "n".repeat(196)),
        deep.join("link-to-long"),
    )?;

    // Extended attributes on a file, a directory and with a binary value.
    set_xattr(&tree.join("data.bin"), "user.zest.origin", b"third party")?;
    set_xattr(
        &tree.join("data.bin"),
        "user.zest.binary",
        &[0, 1, 2, 255, 0],
    )?;
    set_xattr(&deep, "user.zest.dir", b"deep")?;

    // A directory with unusual mode and owner, an empty directory, a FIFO.
    let private = tree.join("private");
    fs::create_dir(&private)?;
    fs::write(private.join("secret"), b"s3cret\n")?;
    lchown(&private, Some(1000), Some(1001))?;
    mode(&private, 0o750)?;
    fs::create_dir(tree.join("empty-dir"))?;

    // Special files, as base images have them: a FIFO and device nodes.
    for (name, kind, dev) in [
        ("fifo", libc::S_IFIFO, 0),
        ("null", libc::S_IFCHR, libc::makedev(1, 3)),
        ("loop0", libc::S_IFBLK, libc::makedev(7, 0)),
    ] {
        let path = c_path(&tree.join(name));
        // SAFETY: a valid path; we run as root (checked by the caller).
        if unsafe { libc::mknod(path.as_ptr(), kind | 0o640, dev) } != 0 {
            return Err(fail(format!(
                "mknod {name}: {}",
                std::io::Error::last_os_error()
            )));
        }
    }

    // Unusual names and numbers: non-ASCII UTF-8 and spaces, an owner beyond ustar's
    // octal fields (a PAX record), times before 1970 and far ahead, hard links to an
    // empty file and to a symlink.
    let odd = tree.join("h\u{e9}llo w\u{f6}rld \u{2713}.txt");
    fs::write(&odd, b"unicode\n")?;
    lchown(&odd, Some(3_000_000), Some(3_000_001))?;
    fs::write(tree.join("old"), b"1960\n")?;
    fs::write(tree.join("future"), b"2200\n")?;
    for (name, secs) in [("old", -300_000_000i64), ("future", 7_258_118_400)] {
        let path = c_path(&tree.join(name));
        let times = [libc::timespec {
            tv_sec: secs,
            tv_nsec: 0,
        }; 2];
        // SAFETY: a valid path and two timespecs.
        if unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), times.as_ptr(), 0) } != 0 {
            return Err(fail(format!(
                "utimensat {name}: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    fs::hard_link(tree.join("empty"), tree.join("empty.hardlink"))?;
    fs::hard_link(tree.join("rel-link"), tree.join("rel-link.hardlink"))?;
    Ok(())
}

/// What a file system entry looks like, everything GNU tar restores.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    kind: &'static str,
    rdev: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, i64),
    size: u64,
    content: Option<Digest>,
    link: Option<PathBuf>,
    xattrs: BTreeMap<String, Vec<u8>>,
    /// Other names of the same inode (hard links), relative to the root.
    links: BTreeSet<PathBuf>,
}

fn describe(root: &Path) -> TestResult<BTreeMap<PathBuf, Entry>> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, BTreeSet<PathBuf>> = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    let mut visited = 0usize;
    while let Some(rel) = stack.pop() {
        visited += 1;
        if visited > 10_000 {
            return Err(fail("tree walk exceeded 10 000 entries"));
        }
        let path = root.join(&rel);
        let meta = std::fs::symlink_metadata(&path)?;
        let ft = meta.file_type();
        use std::os::unix::fs::FileTypeExt;
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_file() {
            "reg"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_fifo() {
            "fifo"
        } else if ft.is_char_device() {
            "char"
        } else if ft.is_block_device() {
            "block"
        } else {
            "other"
        };
        if ft.is_dir() {
            for child in std::fs::read_dir(&path)? {
                stack.push(rel.join(child?.file_name()));
            }
        }
        if !ft.is_dir() && meta.nlink() > 1 {
            inodes.entry(meta.ino()).or_default().insert(rel.clone());
        }
        out.insert(
            rel.clone(),
            Entry {
                kind,
                rdev: meta.rdev(),
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
                mtime: if ft.is_symlink() {
                    (0, 0)
                } else {
                    (meta.mtime(), meta.mtime_nsec())
                },
                size: if ft.is_dir() { 0 } else { meta.size() },
                content: if ft.is_file() {
                    Some(Digest::of(&std::fs::read(&path)?))
                } else {
                    None
                },
                link: if ft.is_symlink() {
                    Some(std::fs::read_link(&path)?)
                } else {
                    None
                },
                xattrs: if ft.is_symlink() {
                    BTreeMap::new()
                } else {
                    user_xattrs(&path)?
                },
                links: BTreeSet::new(),
            },
        );
    }
    for names in inodes.into_values() {
        for name in &names {
            if let Some(entry) = out.get_mut(name) {
                entry.links = names.iter().filter(|n| *n != name).cloned().collect();
            }
        }
    }
    Ok(out)
}

/// `zest mount --layer` as a process, killed (by pid) if the test ends early.
struct MountProcess(Option<Child>);

impl Drop for MountProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_new_generation_layer_mounts_as_gnu_tar_extracts_it() -> TestResult {
    let skopeo = newer_skopeo();
    if !support::require_root_and_fuse()
        || !require_tools(&["docker-registry", "tar", "busybox"])
        || !(skopeo.is_file()
            || support::unavailable(
                &format!("the newer skopeo is missing ({})", skopeo.display()),
                "run scripts/install-deps (scripts/newer-debian extracts it)",
            ))
    {
        return Ok(());
    }
    let version = ContainerdVersion::V2;
    let run_containers = require_containerd(version);
    let Some(base) = busybox_layer_tar() else {
        return Ok(());
    };
    let dir = TestDir::new()?;
    let registry = tokio::task::spawn_blocking(|| Registry::start(Auth::None)).await?;
    let limit = Duration::from_secs(180);

    // The layer: GNU tar (POSIX format, for long names and xattrs) of the tree.
    let src = dir.path().join("src");
    build_tree(&src)?;
    let layer_tar = dir.path().join("layer.tar");
    run_ok(
        "tar",
        &[
            "--format=posix",
            "--xattrs",
            "--xattrs-include=user.*",
            "--numeric-owner",
            "-C",
            &src.display().to_string(),
            "-cf",
            &layer_tar.display().to_string(),
            ".",
        ],
        limit,
    )
    .await?;
    let layout = dir.path().join("oci");
    build_image(
        &layout,
        "src",
        vec![base, std::fs::read(&layer_tar)?],
        LayerCompression::Gzip,
        &Platform::host(),
        &["/bin/sh"],
    );

    // skopeo recompresses it to zstd:chunked on the way to the registry.
    let image = format!("{}/third-party/skopeo122:chunked", registry.host());
    run_ok(
        &skopeo.display().to_string(),
        &[
            "--insecure-policy",
            "copy",
            "--dest-compress-format",
            "zstd:chunked",
            "--dest-force-compress-format",
            "--dest-tls-verify=false",
            &format!("oci:{}:src", layout.display()),
            &format!("docker://{image}"),
        ],
        limit,
    )
    .await?;
    let client = registry.client();
    let reference: Reference = image.parse()?;
    let manifest = ImageManifest::from_json(&client.get_manifest(&reference).await?.bytes)?;
    assert_eq!(manifest.layers.len(), 2);

    // What the writer wrote agrees with what zest-format reads: new-generation
    // annotations with a TOC digest and a tar-split, a 64-byte footer at the same
    // positions, and the annotation's digest is the TOC's.
    for layer in &manifest.layers {
        let annotations = layer
            .annotations
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>();
        assert!(
            layer
                .annotations
                .keys()
                .any(|k| k.starts_with("io.github.containers.zstd-chunked.")),
            "{annotations:?}"
        );
        let location = TocLocation::from_annotations(&layer.annotations)?
            .ok_or_else(|| fail(format!("no zstd:chunked annotations: {annotations:?}")))?;
        assert_eq!(location.generation, Generation::New);
        assert!(location.tar_split.is_some(), "{annotations:?}");
        let blob = client
            .get_blob_bytes(&reference.repository, &layer.digest, 64 << 20)
            .await?;
        let footer = parse_footer(&blob[blob.len() - 64..], blob.len() as u64)?;
        assert_eq!(footer.generation, Generation::New);
        assert_eq!(footer.toc, location.toc);
        assert_eq!(footer.tar_split, location.tar_split);
        assert_eq!(
            location.toc_digest,
            Some(Digest::of(
                &blob[location.toc.range().start as usize..location.toc.range().end as usize]
            ))
        );
        let index = zest_format::LayerIndex::decode(
            &blob[location.toc.range().start as usize..location.toc.range().end as usize],
            &location,
            blob.len() as u64,
        )?;
        assert!(index.tar_split_digest().is_some());
    }

    // GNU tar's extraction of the pushed layer blob (a plain zstd decode).
    let data_layer = &manifest.layers[1];
    let blob = client
        .get_blob_bytes(&reference.repository, &data_layer.digest, 64 << 20)
        .await?;
    let plain = zstd::decode_all(&blob[..])?;
    let pushed_tar = dir.path().join("pushed.tar");
    std::fs::write(&pushed_tar, &plain)?;
    let extracted = dir.path().join("extracted");
    std::fs::create_dir(&extracted)?;
    run_ok(
        "tar",
        &[
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "--same-owner",
            "-xpf",
            &pushed_tar.display().to_string(),
            "-C",
            &extracted.display().to_string(),
        ],
        limit,
    )
    .await?;

    // Its tar-split (the digest the TOC names) rebuilds the exact tar from the files'
    // contents, as containers-storage would: zest-format reads the writer's tar-split.
    let location = TocLocation::from_annotations(&data_layer.annotations)?
        .ok_or_else(|| fail("no zstd:chunked annotations"))?;
    let toc = &blob[location.toc.range().start as usize..location.toc.range().end as usize];
    let index = zest_format::LayerIndex::decode(toc, &location, blob.len() as u64)?;
    let split_extent = location
        .tar_split
        .ok_or_else(|| fail("no tar-split position"))?;
    let split_range = split_extent.range();
    let split_compressed = &blob[split_range.start as usize..split_range.end as usize];
    assert_eq!(index.tar_split_digest(), Some(Digest::of(split_compressed)));
    let split = zest_format::tarsplit::decompress(split_compressed, &split_extent)?;
    let mut rebuilt = Vec::new();
    zest_format::tarsplit::reassemble(
        &split,
        |name, _size, out| {
            let path = extracted.join(String::from_utf8_lossy(name).as_ref());
            let bytes = std::fs::read(&path).map_err(|e| zest_format::FormatError::Io {
                context: "reading an extracted file",
                source: e,
            })?;
            out.write_all(&bytes)
                .map_err(|e| zest_format::FormatError::Io {
                    context: "rebuilding the tar",
                    source: e,
                })
        },
        &mut rebuilt,
    )?;
    assert!(
        rebuilt == plain,
        "the tar rebuilt from the tar-split differs"
    );

    // The same layer mounted by zest (one raw layer, no overlay).
    let target = dir.path().join("mnt");
    std::fs::create_dir(&target)?;
    let mut mount = MountProcess(Some(
        Command::new(env!("CARGO_BIN_EXE_zest"))
            .args(["mount", "--plain-http-host", &registry.host()])
            .args(["--hosts-dir", "/nonexistent", "--layer", "1", "--cache-dir"])
            .arg(dir.path().join("cache"))
            .arg(&image)
            .arg(&target)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?,
    ));
    let started = Instant::now();
    while !zest_mount::is_mount_point(&target).unwrap_or(false) {
        if let Some(child) = mount.0.as_mut() {
            if let Some(status) = child.try_wait()? {
                let out = mount.0.take().map(Child::wait_with_output).transpose()?;
                return Err(fail(format!(
                    "zest mount exited with {status}: {}",
                    out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                        .unwrap_or_default()
                )));
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            return Err(fail("zest mount did not mount within 30 s"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let want = describe(&extracted)?;
    let got = tokio::task::spawn_blocking({
        let target = target.clone();
        move || describe(&target).map_err(|e| e.to_string())
    })
    .await?
    .map_err(fail)?;
    let tree = Path::new("tree");
    assert!(want.contains_key(&tree.join("fifo")), "{:?}", want.keys());
    assert!(!want[&tree.join("data.bin")].links.is_empty());
    assert_eq!(want[&tree.join("data.bin")].xattrs.len(), 2);
    eprintln!(
        "comparing {} entries of the mounted layer with GNU tar's extraction",
        want.len()
    );
    for (path, entry) in &want {
        assert_eq!(got.get(path), Some(entry), "{}", path.display());
    }
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    // SAFETY: plain kill(2) of the child we started.
    if let Some(child) = mount.0.as_ref() {
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    }
    if let Some(child) = mount.0.take() {
        let out = child.wait_with_output()?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // A lazy pull through containerd 2.x's own pull, and a container from it. The
    // test itself downloaded the blobs above: count only what comes after.
    if !run_containers {
        return Ok(());
    }
    let full_gets =
        |digest: &Digest| registry.count_requests("GET", &format!("/blobs/{digest}"), Some(200));
    let before: Vec<usize> = manifest
        .layers
        .iter()
        .map(|l| full_gets(&l.digest))
        .collect();
    let service = ZestService::start(
        dir.path(),
        lazy_provider(&registry, &dir.path().join("lazy"), TestCache::Memory).await?,
    )
    .await?;
    let containerd = Containerd::start_version(dir.path(), &service.socket, version).await?;
    containerd
        .ctr_ok(&[
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            "zest",
            &image,
        ])
        .await?;
    let snapshots = service.snapshots().await?;
    for layer in &manifest.layers {
        let digest = layer.digest.to_string();
        assert!(
            snapshots.iter().any(|s| s.labels.contains_key(LABEL_REMOTE)
                && s.labels.get(LABEL_LAYER_DIGEST) == Some(&digest)),
            "layer {digest} was not mounted lazily: {snapshots:#?}"
        );
    }
    let script = format!(
        "sha256sum /tree/data.bin /tree/sparse.img && stat -c '%a %u %g' /tree/private /tree/setuid && cat /tree/{}/{}/{}/link-to-long",
        "a".repeat(60),
        "b".repeat(60),
        "c".repeat(60)
    );
    let out = containerd
        .run_on_zest(
            &image,
            "new-generation-check",
            &["/bin/busybox", "sh", "-c", &script],
        )
        .await?;
    let data = std::fs::read(src.join("tree/data.bin"))?;
    let sparse = std::fs::read(src.join("tree/sparse.img"))?;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            format!("{}  /tree/data.bin", Digest::of(&data).hex()),
            format!("{}  /tree/sparse.img", Digest::of(&sparse).hex()),
            "750 1000 1001".to_owned(),
            "4755 0 0".to_owned(),
            "a long way down".to_owned(),
        ],
        "{out}"
    );
    for (layer, before) in manifest.layers.iter().zip(before) {
        assert_eq!(
            full_gets(&layer.digest),
            before,
            "layer {} was downloaded in full",
            layer.digest
        );
    }
    drop(containerd);
    service.stop().await
}
