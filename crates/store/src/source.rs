//! Where a layer blob's bytes come from: a [`BlobSource`] answers byte-range
//! reads of one blob. Implemented for a blob in a registry ([`RegistryBlob`]:
//! repository and digest bound in) and for a local blob file ([`FileBlob`]: OCI
//! layouts, benchmarks).

use std::fmt;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;

use zest_oci::digest::Digest;
use zest_oci::Repository;
use zest_registry::{ErrorKind, RegistryClient, RegistryError};

/// Why a range read failed: which blob and bytes, what kind of failure
/// ([`SourceError::kind`]), and the underlying error as its source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The registry client failed (after its own retries of transient failures).
    #[error("reading bytes {}..{} of {blob}: {source}", range.start, range.end)]
    Registry {
        /// The blob (source description).
        blob: String,
        /// The bytes asked for (end exclusive).
        range: Range<u64>,
        /// The registry's error.
        #[source]
        source: RegistryError,
    },
    /// A local blob file could not be read.
    #[error("reading bytes {}..{} of {blob}: {source}; check the file and the disk", range.start, range.end)]
    Io {
        /// The blob (file path).
        blob: String,
        /// The bytes asked for (end exclusive).
        range: Range<u64>,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The range is not inside the blob.
    #[error("reading bytes {}..{} of {blob}: outside the blob of {size} bytes; the layer's table of contents does not match the blob", range.start, range.end)]
    OutOfRange {
        /// The blob.
        blob: String,
        /// The bytes asked for (end exclusive).
        range: Range<u64>,
        /// The blob's size.
        size: u64,
    },
    /// The source answered with a different number of bytes than asked for.
    #[error("reading bytes {}..{} of {blob}: got {got} bytes, expected {}; the source misbehaves", range.start, range.end, range.end - range.start)]
    WrongLength {
        /// The blob.
        blob: String,
        /// The bytes asked for (end exclusive).
        range: Range<u64>,
        /// Bytes received.
        got: u64,
    },
    /// The read did not finish within the caller's deadline (which is longer than
    /// the source's own bound, so this means the source hung).
    #[error("reading bytes {}..{} of {blob}: no answer within {after:?}; the registry or network is slow or down: retry later", range.start, range.end)]
    Timeout {
        /// The blob.
        blob: String,
        /// The bytes asked for (end exclusive).
        range: Range<u64>,
        /// The deadline that expired.
        after: Duration,
    },
}

impl SourceError {
    /// What kind of failure this is (the registry's kind for registry errors).
    pub fn kind(&self) -> ErrorKind {
        match self {
            SourceError::Registry { source, .. } => source.kind(),
            SourceError::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::NotFound => ErrorKind::NotFound,
                std::io::ErrorKind::PermissionDenied => ErrorKind::Denied,
                _ => ErrorKind::Local,
            },
            SourceError::OutOfRange { .. } => ErrorKind::Invalid,
            SourceError::WrongLength { .. } => ErrorKind::Protocol,
            SourceError::Timeout { .. } => ErrorKind::Timeout,
        }
    }

    /// Whether the same read may succeed later. Informational: sources retry
    /// transient failures themselves, callers do not retry them again.
    pub fn is_transient(&self) -> bool {
        self.kind().is_transient()
    }

    /// The registry's error, when the registry failed.
    pub fn registry_error(&self) -> Option<&RegistryError> {
        match self {
            SourceError::Registry { source, .. } => Some(source),
            _ => None,
        }
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

    /// Reads `range` and hands its bytes to `on_data(offset, bytes)` as they
    /// arrive (`offset` is the blob offset of `bytes[0]`), so that a caller can use
    /// the start of a long read before its end is in. Within one attempt pieces
    /// come in order without gaps; a source that retries starts again at
    /// `range.start`, so callers skip bytes they have seen. `Ok` means the whole
    /// range was delivered. The default reads the range whole, then delivers it.
    fn read_range_with<'a>(
        &'a self,
        range: Range<u64>,
        on_data: &'a (dyn Fn(u64, Bytes) + Send + Sync),
    ) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            let start = range.start;
            let bytes = self.read_range(range).await?;
            on_data(start, bytes);
            Ok(())
        })
    }

    /// The blob's total size, when known without a round trip.
    fn size(&self) -> Option<u64>;

    /// A short description for logs and errors (e.g. `repo@sha256:...`).
    fn describe(&self) -> String;

    /// The longest one [`BlobSource::read_range`] takes before it returns, its own
    /// retries included, when the source bounds it (a registry's retry policy).
    /// A caller guarding a read with a timeout uses a longer one, so that it
    /// never cuts the source's attempts short and gets its typed error.
    fn read_deadline(&self) -> Option<Duration> {
        None
    }
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
            if range.start > range.end || range.end > size {
                return Err(SourceError::OutOfRange { blob, range, size });
            }
            let len =
                usize::try_from(range.end - range.start).map_err(|_| SourceError::OutOfRange {
                    blob: blob.clone(),
                    range: range.clone(),
                    size,
                })?;
            let start = range.start;
            // File reads block: keep them off the async workers.
            let res = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; len];
                file.read_exact_at(&mut buf, start).map(|()| buf)
            })
            .await;
            match res {
                Ok(Ok(buf)) => Ok(Bytes::from(buf)),
                Ok(Err(source)) => Err(SourceError::Io {
                    blob,
                    range,
                    source,
                }),
                Err(e) => Err(SourceError::Io {
                    blob,
                    range,
                    source: std::io::Error::other(format!("read task failed: {e}")),
                }),
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
/// The client retries transient failures itself (its [`zest_registry::RetryPolicy`]:
/// backoff, `Retry-After`, token refresh, one overall deadline); its errors are
/// passed on typed, and callers do not retry them again.
///
/// Clones share [`RegistryBlob::last_answer`].
#[derive(Debug, Clone)]
pub struct RegistryBlob {
    client: RegistryClient,
    repo: Repository,
    digest: Digest,
    size: Option<u64>,
    last_answer: Arc<Mutex<Option<Instant>>>,
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
            last_answer: Arc::new(Mutex::new(None)),
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

    /// When the registry last served a range of this blob: proof, as good as a
    /// HEAD, that it still serves the blob, so a reachability check can skip its
    /// round trip after one.
    pub fn last_answer(&self) -> Option<Instant> {
        *self.last_answer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn answered(&self) {
        *self.last_answer.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }
}

impl BlobSource for RegistryBlob {
    fn read_range(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        Box::pin(async move {
            let bytes = self
                .client
                .get_range(&self.repo, &self.digest, range.clone())
                .await
                .map_err(|source| SourceError::Registry {
                    blob: self.describe(),
                    range,
                    source,
                })?;
            self.answered();
            Ok(bytes)
        })
    }

    fn read_range_with<'a>(
        &'a self,
        range: Range<u64>,
        on_data: &'a (dyn Fn(u64, Bytes) + Send + Sync),
    ) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            self.client
                .get_range_with(&self.repo, &self.digest, range.clone(), on_data)
                .await
                .map_err(|source| SourceError::Registry {
                    blob: self.describe(),
                    range,
                    source,
                })?;
            self.answered();
            Ok(())
        })
    }

    fn size(&self) -> Option<u64> {
        self.size
    }

    fn describe(&self) -> String {
        format!("{}@{}", self.repo, self.digest)
    }

    fn read_deadline(&self) -> Option<Duration> {
        Some(self.client.range_read_deadline())
    }
}
