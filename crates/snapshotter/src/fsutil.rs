//! Filesystem helpers of the snapshotter: disk usage of an upper directory, durable
//! renames, the overlay feature probe. Removing a snapshot directory that may have
//! mounts below it is [`zest_mount::remove_tree`].

use std::collections::HashSet;
use std::fs;
use std::io;
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
}
