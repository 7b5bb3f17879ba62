//! The TOC directory: the compressed TOC of every mounted layer, kept so that a
//! restart mounts the layers again without a request (`<dir>/<layer hex>.toc`).
//!
//! Invariants: a TOC read back is trusted only after it is decoded and verified
//! again against the manifest's TOC digest ([`zest_fetch::toc::decode_index`]); a
//! copy that does not verify is deleted and the TOC fetched again. Files are
//! written to a temporary name, synced and renamed, so a crash never leaves a
//! truncated TOC under the final name. All file work runs on the blocking pool.

use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::LazyError;
use zest_fetch::toc::decode_index;
use zest_format::{LayerIndex, TocLocation};
use zest_oci::digest::Digest;
use zest_oci::Descriptor;

/// The TOC directory.
pub(super) struct TocStore {
    dir: PathBuf,
}

impl TocStore {
    /// The store in `dir`, created (mode 0700) if absent.
    pub(super) fn open(dir: PathBuf) -> Result<Self, LazyError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| LazyError::TocDir {
                path: dir.clone(),
                source,
            })?;
        Ok(TocStore { dir })
    }

    /// The directory.
    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(format!("{}.toc", digest.hex()))
    }

    /// The TOC of layer `desc` kept by an earlier mount, if present and still
    /// matching `loc` (size, and the manifest's TOC digest). A bad copy is deleted.
    pub(super) async fn load(&self, desc: &Descriptor, loc: TocLocation) -> Option<LayerIndex> {
        let path = self.path(&desc.digest);
        let expected = loc.toc.compressed_len;
        let read = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || -> Result<Option<Bytes>, String> {
                let meta = match std::fs::metadata(&path) {
                    Ok(m) => m,
                    Err(_) => return Ok(None),
                };
                if meta.len() != expected {
                    return Err(format!("{} bytes, expected {expected}", meta.len()));
                }
                std::fs::read(&path)
                    .map(|b| Some(Bytes::from(b)))
                    .map_err(|e| e.to_string())
            })
            .await
        };
        let outcome = match read {
            Ok(Ok(None)) => return None,
            Ok(Ok(Some(bytes))) => {
                let what = path.display().to_string();
                decode_index(bytes, loc, desc.size, &what)
                    .await
                    .map_err(|e| e.to_string())
            }
            Ok(Err(e)) => Err(e),
            Err(e) => Err(format!("read task failed: {e}")),
        };
        match outcome {
            Ok(index) => Some(index),
            Err(e) => {
                tracing::warn!(layer = %desc.digest, path = %path.display(), error = %e, "discarding the stored TOC; fetching it again");
                remove(path).await;
                None
            }
        }
    }

    /// Writes the TOC of `digest` unless it is there already. Best effort: a failure
    /// only means the TOC is fetched again after a restart.
    pub(super) async fn keep(&self, digest: Digest, bytes: Bytes) {
        let dir = self.dir.clone();
        let path = self.path(&digest);
        let result = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            if path.exists() {
                return Ok(());
            }
            let temp = dir.join(format!(
                ".{}.{:016x}.tmp",
                digest.hex(),
                rand::random::<u64>()
            ));
            let written = (|| {
                let mut file = std::fs::File::create(&temp)?;
                file.write_all(&bytes)?;
                file.sync_all()?;
                std::fs::rename(&temp, &path)
            })();
            if written.is_err() {
                let _ = std::fs::remove_file(&temp);
            }
            written
        })
        .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(layer = %digest, dir = %self.dir.display(), error = %e, "cannot keep the TOC for restarts; it will be fetched again")
            }
            Err(e) => tracing::warn!(layer = %digest, error = %e, "TOC write task failed"),
        }
    }

    /// Deletes the TOC of `digest` (absent is fine).
    pub(super) async fn forget(&self, digest: Digest) {
        remove(self.path(&digest)).await;
    }
}

async fn remove(path: PathBuf) {
    let _ = tokio::task::spawn_blocking(move || match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot delete stored TOC")
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use zest_format::testblob::build_one;

    #[tokio::test]
    async fn kept_tocs_are_verified_when_read_back() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = TocStore::open(dir.path().join("tocs"))?;
        let data = vec![7u8; 10_000];
        let blob = build_one("f", &data, 4096);
        let mut loc = blob.location;
        let range = loc.toc_range();
        let toc = Bytes::copy_from_slice(&blob.bytes[range.start as usize..range.end as usize]);
        loc.toc_digest = Some(Digest::of(&toc));
        let desc = Descriptor::new(
            zest_oci::media_type::OCI_LAYER_ZSTD,
            Digest::of(&blob.bytes),
            blob.bytes.len() as u64,
        );
        assert!(store.load(&desc, loc).await.is_none(), "nothing kept yet");
        store.keep(desc.digest, toc.clone()).await;
        let index = store.load(&desc, loc).await.ok_or("kept TOC not loaded")?;
        assert_eq!(index.len(), blob.index().len());

        // A copy that no longer matches the manifest's TOC digest is deleted.
        let mut other = loc;
        other.toc_digest = Some(Digest::of(b"another TOC"));
        assert!(store.load(&desc, other).await.is_none());
        assert!(!store.path(&desc.digest).exists());

        store.keep(desc.digest, toc).await;
        store.forget(desc.digest).await;
        assert!(store.load(&desc, loc).await.is_none());
        Ok(())
    }
}
