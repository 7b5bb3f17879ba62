//! Filesystem helpers of the snapshotter: disk usage of an upper directory, removal of
//! a snapshot directory that never descends into a mounted filesystem, and the mount
//! table.
//!
//! Invariant: [`remove_tree`] deletes nothing while any mount is left at or below the
//! directory, so a removal racing with a live (FUSE or overlay) mount cannot delete a
//! layer's or a container's files through it.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::types::{SnapshotError, Usage};

/// Computes the disk usage of a directory tree like containerd does: the sum of
/// `st_blocks * 512` over distinct inodes (hard links counted once), and the number of
/// distinct inodes, the root included. Symbolic links are not followed and other
/// filesystems mounted below `root` are not entered.
pub fn disk_usage(root: &Path) -> Result<Usage, SnapshotError> {
    let root_meta = fs::symlink_metadata(root).map_err(|e| SnapshotError::io("stat", root, e))?;
    let device = root_meta.dev();
    let mut seen: HashSet<u64> = HashSet::new();
    let mut usage = Usage::default();
    let mut account = |meta: &fs::Metadata, usage: &mut Usage| {
        if seen.insert(meta.ino()) {
            usage.size = usage.size.saturating_add(
                i64::try_from(meta.blocks().saturating_mul(512)).unwrap_or(i64::MAX),
            );
            usage.inodes = usage.inodes.saturating_add(1);
        }
    };
    account(&root_meta, &mut usage);
    // Iterative walk: directory depth is controlled by image content, so no recursion.
    let mut pending: Vec<PathBuf> = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            // Removed while we walk (an active container deleting files): not an error.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(SnapshotError::io("read directory", dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| SnapshotError::io("read directory", &dir, e))?;
            let path = entry.path();
            let meta = match fs::symlink_metadata(&path) {
                Ok(meta) => meta,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(SnapshotError::io("stat", path, e)),
            };
            if meta.dev() != device {
                continue;
            }
            account(&meta, &mut usage);
            if meta.is_dir() {
                pending.push(path);
            }
        }
    }
    Ok(usage)
}

/// Mount points at or below `root`, deepest first, from `/proc/self/mountinfo`.
pub fn mounts_under(root: &Path) -> Result<Vec<PathBuf>, SnapshotError> {
    let table = fs::read("/proc/self/mountinfo")
        .map_err(|e| SnapshotError::io("read mount table", "/proc/self/mountinfo", e))?;
    let mut found: Vec<PathBuf> = table
        .split(|&b| b == b'\n')
        .filter_map(|line| line.split(|&b| b == b' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|mount_point| mount_point.starts_with(root))
        .collect();
    // Deepest first so that nested mounts are detached before their parents.
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    Ok(found)
}

/// Decodes the octal escapes (`\040` for a space, ...) of a mountinfo path field.
fn unescape_mountinfo(field: &[u8]) -> PathBuf {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let byte = field[i];
        if let (b'\\', Some(digits)) = (byte, field.get(i + 1..i + 4)) {
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(value) = u8::try_from(value) {
                    out.push(value);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(byte);
        i += 1;
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

/// Lazily detaches every mount at or below `root` (deepest first).
pub fn unmount_all_under(root: &Path) -> Result<(), SnapshotError> {
    for mount_point in mounts_under(root)? {
        tracing::info!(path = %mount_point.display(), "detaching leftover mount");
        let c_path = CString::new(mount_point.as_os_str().as_bytes()).map_err(|_| {
            SnapshotError::Internal(format!("mount point {mount_point:?} contains NUL"))
        })?;
        // SAFETY: c_path is a valid NUL-terminated string that outlives the call.
        let rc = unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            // EINVAL: no longer a mount point (someone else unmounted it first).
            if err.raw_os_error() != Some(libc::EINVAL) {
                return Err(SnapshotError::io("unmount", mount_point, err));
            }
        }
    }
    Ok(())
}

/// Removes a snapshot directory: first detaches any mount left below it, then checks
/// that none remains, then deletes. A missing directory is not an error.
pub fn remove_tree(dir: &Path) -> Result<(), SnapshotError> {
    if fs::symlink_metadata(dir).is_err() {
        return Ok(());
    }
    unmount_all_under(dir)?;
    if let Some(still) = mounts_under(dir)?.into_iter().next() {
        return Err(SnapshotError::FailedPrecondition(format!(
            "refusing to remove {}: {} is still mounted",
            dir.display(),
            still.display()
        )));
    }
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SnapshotError::io("remove", dir, e)),
    }
}

/// Flushes a directory's entries to disk, so that a rename into it is durable before
/// the metadata that refers to it is committed.
pub fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| SnapshotError::io("sync directory", dir, e))
}

/// Whether the kernel's overlayfs has the `index` feature, in which case containerd's
/// own overlay snapshotter mounts with `index=off`; zest does the same so that layers
/// can be shared between mounts.
pub fn overlay_supports_index() -> bool {
    Path::new("/sys/module/overlay/parameters/index").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(
            unescape_mountinfo(br"/a\040b\011c\134d"),
            PathBuf::from("/a b\tc\\d")
        );
        assert_eq!(
            unescape_mountinfo(br"/trailing\04"),
            PathBuf::from(r"/trailing\04")
        );
        assert_eq!(unescape_mountinfo(br"\"), PathBuf::from("\\"));
    }

    #[test]
    fn usage_counts_hard_links_once() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let root = dir.path().join("fs");
        fs::create_dir_all(root.join("sub"))?;
        fs::write(root.join("sub/file"), vec![7u8; 64 * 1024])?;
        fs::hard_link(root.join("sub/file"), root.join("link"))?;
        std::os::unix::fs::symlink("sub/file", root.join("symlink"))?;
        let usage = disk_usage(&root)?;
        // root, sub, file (2 names, 1 inode), symlink
        assert_eq!(usage.inodes, 4);
        let file_blocks = fs::metadata(root.join("sub/file"))?.blocks() as i64 * 512;
        assert!(usage.size >= file_blocks, "{usage:?} < {file_blocks}");
        assert!(
            usage.size < 2 * file_blocks,
            "hard link counted twice: {usage:?}"
        );
        Ok(())
    }

    #[test]
    fn remove_tree_tolerates_missing() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        remove_tree(&dir.path().join("absent"))?;
        let tree = dir.path().join("t");
        fs::create_dir_all(tree.join("a/b"))?;
        fs::write(tree.join("a/b/c"), b"x")?;
        remove_tree(&tree)?;
        assert!(!tree.exists());
        Ok(())
    }
}
