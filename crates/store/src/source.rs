//! Where a layer blob's bytes come from: a [`BlobSource`] answers byte-range
//! reads of one blob. Implemented for a blob in a registry ([`RegistryBlob`]:
//! repository and digest bound in) and for a local blob file ([`FileBlob`]: OCI
//! layouts, benchmarks).

use std::fmt;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;

use zest_oci::digest::Digest;
use zest_oci::Repository;
use zest_registry::RegistryClient;

/// Why a range read failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A transient failure (network, timeout, server error): worth retrying.
    #[error("reading bytes {start}..{end} of {blob}: {reason}")]
    Transient {
        /// The blob (source description).
        blob: String,
        /// First byte asked for.
        start: u64,
        /// End (exclusive) of the range asked for.
        end: u64,
        /// What went wrong.
        reason: String,
    },
    /// A failure that retrying will not fix (not found, denied, bad range).
    #[error("reading bytes {start}..{end} of {blob}: {reason}")]
    Permanent {
        /// The blob (source description).
        blob: String,
        /// First byte asked for.
        start: u64,
        /// End (exclusive) of the range asked for.
        end: u64,
        /// What went wrong.
        reason: String,
    },
}

impl SourceError {
    /// Whether a retry may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, SourceError::Transient { .. })
    }
}

/// Byte-range reads of one layer blob.
///
/// An implementation must return exactly the bytes asked for (`range.end -
/// range.start` of them) or an error; it must never return a short or long
/// answer as success. Verification of content is the fetcher's job.
pub trait BlobSource: Send + Sync + fmt::Debug + 'static {
    /// Reads `range` (end exclusive) of the blob.
    fn read_range(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, SourceError>>;

    /// The blob's total size, when known without a round trip.
    fn size(&self) -> Option<u64>;

    /// A short description for logs and errors (e.g. `repo@sha256:...`).
    fn describe(&self) -> String;
}

/// A blob stored in a local file (for example in an OCI image layout).
#[derive(Debug)]
pub struct FileBlob {
    path: PathBuf,
    file: Arc<std::fs::File>,
    size: u64,
}

impl FileBlob {
    /// Opens the blob file at `path`.
    pub fn open(path: &Path) -> std::io::Result<FileBlob> {
        let file = std::fs::File::open(path)?;
        let size = file.metadata()?.len();
        Ok(FileBlob {
            path: path.to_path_buf(),
            file: Arc::new(file),
            size,
        })
    }
}

impl BlobSource for FileBlob {
    fn read_range(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        let file = Arc::clone(&self.file);
        let size = self.size;
        let blob = self.path.display().to_string();
        Box::pin(async move {
            let permanent = |reason: String| SourceError::Permanent {
                blob: blob.clone(),
                start: range.start,
                end: range.end,
                reason,
            };
            if range.start > range.end || range.end > size {
                return Err(permanent(format!("outside the blob of {size} bytes")));
            }
            let len = usize::try_from(range.end - range.start)
                .map_err(|_| permanent("range too large".into()))?;
            let start = range.start;
            // File reads block: keep them off the async workers.
            let res = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; len];
                file.read_exact_at(&mut buf, start).map(|()| buf)
            })
            .await;
            match res {
                Ok(Ok(buf)) => Ok(Bytes::from(buf)),
                Ok(Err(e)) => Err(SourceError::Transient {
                    blob: blob.clone(),
                    start: range.start,
                    end: range.end,
                    reason: e.to_string(),
                }),
                Err(e) => Err(permanent(format!("read task failed: {e}"))),
            }
        })
    }

    fn size(&self) -> Option<u64> {
        Some(self.size)
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// A layer blob in a registry, read with HTTP range requests.
///
/// The client already retries transport failures (with its own backoff and
/// token refresh), so its errors are reported as permanent: the fetcher's own
/// retries are kept for content that fails verification.
#[derive(Debug, Clone)]
pub struct RegistryBlob {
    client: RegistryClient,
    repo: Repository,
    digest: Digest,
    size: Option<u64>,
}

impl RegistryBlob {
    /// The blob `digest` of `repo`; `size` from the layer descriptor, if known.
    pub fn new(
        client: RegistryClient,
        repo: Repository,
        digest: Digest,
        size: Option<u64>,
    ) -> Self {
        RegistryBlob {
            client,
            repo,
            digest,
            size,
        }
    }

    /// The blob of layer `layer` (digest and size from its descriptor).
    pub fn for_layer(
        client: RegistryClient,
        repo: Repository,
        layer: &zest_oci::Descriptor,
    ) -> Self {
        RegistryBlob::new(client, repo, layer.digest, Some(layer.size))
    }

    /// The blob's digest.
    pub fn digest(&self) -> Digest {
        self.digest
    }
}

impl BlobSource for RegistryBlob {
    fn read_range(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        Box::pin(async move {
            self.client
                .get_range(&self.repo, &self.digest, range.clone())
                .await
                .map_err(|e| SourceError::Permanent {
                    blob: self.describe(),
                    start: range.start,
                    end: range.end,
                    reason: e.to_string(),
                })
        })
    }

    fn size(&self) -> Option<u64> {
        self.size
    }

    fn describe(&self) -> String {
        format!("{}@{}", self.repo, self.digest)
    }
}
