//! containerd's content store on this node, read-only.
//!
//! containerd (CRI's unpacker, `ctr`, `zest pull`) stores an image's manifest and
//! config before it asks the snapshotter for the first layer, so reading them here
//! saves a prepare the round trips of fetching them again (a new connection and a
//! GET). Only committed blobs are read (`blobs/sha256/<hex>`: containerd writes
//! into its ingest directory and renames on commit).
//!
//! Invariants: a blob is handed out only if its bytes hash to the digest asked for
//! and fit the size bound; anything else (absent, unreadable, too large, not
//! matching) is `None`, and the caller asks the registry as before.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use zest_oci::digest::Digest;

/// containerd's content store directory (`io.containerd.content.v1.content`
/// under its root), when configured.
#[derive(Debug)]
pub(super) struct LocalContent {
    dir: Option<PathBuf>,
    /// Blobs handed out.
    reads: AtomicU64,
}

impl LocalContent {
    /// The store in `dir`; `None`: always ask the registry.
    pub(super) fn new(dir: Option<PathBuf>) -> Self {
        LocalContent {
            dir,
            reads: AtomicU64::new(0),
        }
    }

    /// Blobs handed out so far.
    pub(super) fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Blob `digest`, if the store holds it with at most `max` bytes and it hashes
    /// to `digest`.
    pub(super) async fn read(&self, digest: &Digest, max: u64) -> Option<Bytes> {
        let path = self.dir.as_ref()?.join("blobs/sha256").join(digest.hex());
        let read = tokio::task::spawn_blocking(move || read_bounded(&path, max)).await;
        let bytes = match read {
            Ok(Ok(Some(bytes))) => bytes,
            Ok(Ok(None)) => {
                tracing::debug!(%digest, max, "blob in containerd's content store is too large");
                return None;
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Ok(Err(e)) => {
                tracing::debug!(%digest, error = %e, "cannot read containerd's content store");
                return None;
            }
            Err(e) => {
                tracing::debug!(%digest, error = %e, "content store read task failed");
                return None;
            }
        };
        if !digest.verifies(&bytes) {
            tracing::warn!(%digest, "blob in containerd's content store does not match its digest; using the registry");
            return None;
        }
        self.reads.fetch_add(1, Ordering::Relaxed);
        Some(Bytes::from(bytes))
    }
}

/// The file's bytes, or `None` when it holds more than `max`.
fn read_bounded(path: &Path, max: u64) -> std::io::Result<Option<Vec<u8>>> {
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
    Ok((bytes.len() as u64 <= max).then_some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with(blobs: &[&[u8]]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        let sha = dir.path().join("blobs/sha256");
        std::fs::create_dir_all(&sha).expect("blobs dir");
        for blob in blobs {
            std::fs::write(sha.join(Digest::of(blob).hex()), blob).expect("write blob");
        }
        dir
    }

    #[tokio::test]
    async fn reads_verified_blobs_within_the_bound_only() {
        let dir = store_with(&[b"{\"schemaVersion\":2}", b"twelve bytes"]);
        let store = LocalContent::new(Some(dir.path().to_path_buf()));
        let small = Digest::of(b"{\"schemaVersion\":2}");
        assert_eq!(
            store.read(&small, 1024).await.as_deref(),
            Some(&b"{\"schemaVersion\":2}"[..])
        );
        let twelve = Digest::of(b"twelve bytes");
        assert!(store.read(&twelve, 12).await.is_some());
        assert!(store.read(&twelve, 11).await.is_none(), "over the bound");
        assert!(store.read(&Digest::of(b"absent"), 1024).await.is_none());

        // A blob whose bytes changed on disk is not handed out.
        std::fs::write(
            dir.path().join("blobs/sha256").join(twelve.hex()),
            b"tampered",
        )
        .unwrap();
        assert!(store.read(&twelve, 1024).await.is_none());

        assert_eq!(store.reads(), 2);
        assert!(LocalContent::new(None).read(&small, 1024).await.is_none());
    }
}
