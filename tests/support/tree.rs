//! A source tree with every kind of entry real image layers have (hard links to a
//! file, an empty file and a symlink; relative, absolute and dangling symlinks; names
//! beyond ustar's limits and non-ASCII names; user xattrs, one binary; empty and
//! zero-run files; a FIFO and device nodes; setuid, PAX-sized owners, times before
//! 1970 and far ahead), and a description of a tree with everything GNU tar
//! restores, to compare a mounted layer with GNU tar's extraction.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::containerd::{fail, run_ok, TestResult};
use zest_oci::digest::Digest;

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
pub fn user_xattrs(path: &Path) -> TestResult<BTreeMap<String, Vec<u8>>> {
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

/// GNU tar (POSIX format, for long names and xattrs; numeric owners) of the tree at
/// `src`, written to `dst`: the input layer both third-party writers are given.
pub async fn tar_tree(src: &Path, dst: &Path, limit: std::time::Duration) -> TestResult {
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
            &dst.display().to_string(),
            ".",
        ],
        limit,
    )
    .await?;
    Ok(())
}

/// Builds the source tree of the varied layer under `root`.
pub fn build_tree(root: &Path) -> TestResult {
    use std::fs;
    use std::os::unix::fs::{lchown, symlink};
    let mode = |p: &Path, m: u32| fs::set_permissions(p, fs::Permissions::from_mode(m));
    fs::create_dir_all(root)?;
    mode(root, 0o755)?;
    let tree = root.join("tree");
    fs::create_dir(&tree)?;

    // Regular files: content, an empty one, one larger than a chunk with long
    // runs of zeros between data islands (stored as `zeros` chunks), owners and modes.
    let data = super::pseudo_random(300 << 10, 7);
    fs::write(tree.join("data.bin"), &data)?;
    lchown(tree.join("data.bin"), Some(123), Some(456))?;
    mode(&tree.join("data.bin"), 0o640)?;
    fs::write(tree.join("empty"), b"")?;
    mode(&tree.join("empty"), 0o600)?;
    let sparse = fs::File::create(tree.join("sparse.img"))?;
    sparse.set_len(9 << 20)?;
    for (i, at) in [0u64, 3 << 20, (9 << 20) - 4096].into_iter().enumerate() {
        sparse.write_all_at(&super::pseudo_random(4096, 100 + i as u64), at)?;
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
pub struct Entry {
    pub kind: &'static str,
    pub rdev: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, i64),
    pub size: u64,
    pub content: Option<Digest>,
    pub link: Option<PathBuf>,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Other names of the same inode (hard links), relative to the root.
    pub links: BTreeSet<PathBuf>,
}

pub fn describe(root: &Path) -> TestResult<BTreeMap<PathBuf, Entry>> {
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
