//! Finding and fetching a layer's TOC, the only data a mount needs up front.
//!
//! With the layer descriptor's zstd:chunked annotations the TOC position and
//! digest are known: ONE range request, and the TOC is authenticated by the
//! manifest. Without them, the blob's tail is fetched (footer, and often the
//! whole TOC of a small layer with it), then the TOC if the tail did not cover
//! it: two requests at most. A TOC found by footer alone is not authenticated
//! by the manifest; callers that require it set
//! [`TocFetchOptions::require_digest`].
//!
//! eStargz layers carry only their TOC digest as an annotation
//! (`containerd.io/snapshot/stargz/toc.digest`): the footer in the tail gives the
//! position (one or two requests), and the annotation authenticates the TOC.
//!
//! Policy: malformed zstd:chunked annotations are an error (a manifest that names a
//! TOC wrongly is not second-guessed through the footer), and TOCs are decoded on
//! the blocking pool ([`decode_index`]), never on an async worker.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{FetchConfig, FetchError, FetchLimits, Fetcher};
use zest_cache::ChunkCache;
use zest_format::{estargz, parse_footer, FormatError, LayerIndex, TocLocation, FOOTER_FETCH_LEN};
use zest_oci::{Descriptor, Digest};
use zest_store::{BlobSource, ImageStore, SourceError, StoreError};

/// Options of [`fetch_layer_index`].
#[derive(Clone, Debug)]
pub struct TocFetchOptions {
    /// Bytes fetched from the end of the blob when there are no annotations
    /// (at least the footer; more often catches the whole TOC in one request).
    pub tail_bytes: u64,
    /// Refuse a TOC whose digest is not vouched for by an annotation.
    pub require_digest: bool,
    /// The caller's own deadline for the whole TOC fetch (e.g. while containerd
    /// waits for a mount); `None`: only the source's bound. Requests are retried
    /// by the source under its policy (the registry's [`zest_registry::RetryPolicy`]),
    /// not again here.
    pub deadline: Option<Duration>,
}

impl Default for TocFetchOptions {
    fn default() -> Self {
        TocFetchOptions {
            tail_bytes: 64 << 10,
            require_digest: false,
            deadline: None,
        }
    }
}

/// Deadline of one TOC read from a source that does not bound its reads itself
/// (local blob files).
const UNBOUNDED_SOURCE_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the TOC was found and how many requests it took.
#[derive(Debug)]
pub struct FetchedIndex {
    /// The validated layer model.
    pub index: LayerIndex,
    /// Range requests made.
    pub requests: u32,
    /// Whether the TOC digest came from the manifest (authenticated).
    pub authenticated: bool,
    /// The compressed TOC as fetched (e.g. to keep it for a restart).
    pub toc: Bytes,
}

/// Locates, fetches and validates the TOC of the blob behind `source`.
///
/// `blob_size` is the layer descriptor's size; `annotations` the descriptor's
/// annotations (empty if unknown).
pub async fn fetch_layer_index(
    source: &dyn BlobSource,
    blob_size: u64,
    annotations: &BTreeMap<String, String>,
    options: &TocFetchOptions,
) -> Result<FetchedIndex, FetchError> {
    let fetch = locate_and_fetch(source, blob_size, annotations, options);
    let result = match options.deadline {
        Some(d) => tokio::time::timeout(d, fetch).await.unwrap_or_else(|_| {
            Err(FetchError::Timeout {
                blob: source.describe(),
                secs: d.as_secs(),
            })
        }),
        None => fetch.await,
    };
    if let Err(e) = &result {
        tracing::debug!(kind = e.kind().label(), error = %e, blob = %source.describe(), "TOC fetch failed");
    }
    result
}

async fn locate_and_fetch(
    source: &dyn BlobSource,
    blob_size: u64,
    annotations: &BTreeMap<String, String>,
    options: &TocFetchOptions,
) -> Result<FetchedIndex, FetchError> {
    let blob = source.describe();
    let toc_err = |e: FormatError| FetchError::Toc {
        blob: blob.clone(),
        source: Arc::new(e),
    };
    let mut requests = 0u32;
    // Malformed annotations are refused rather than bypassed through the footer:
    // the manifest vouches for them, so a bad value means a bad manifest.
    let location = TocLocation::from_annotations(annotations).map_err(toc_err)?;
    if let Some(loc) = location {
        let bytes = read(source, loc.toc_range(), &mut requests).await?;
        let index = decode_index(bytes.clone(), loc, blob_size, &blob).await?;
        return Ok(FetchedIndex {
            index,
            requests,
            authenticated: loc.toc_digest.is_some(),
            toc: bytes,
        });
    }
    // An eStargz layer: its TOC digest is vouched for, its position is in the footer.
    let estargz_digest = match annotations.get(estargz::TOC_DIGEST_ANNOTATION) {
        Some(value) => Some(value.parse::<Digest>().map_err(|e| {
            toc_err(FormatError::BadAnnotation {
                key: estargz::TOC_DIGEST_ANNOTATION.to_owned(),
                value: value.chars().take(100).collect(),
                reason: e.to_string(),
            })
        })?),
        None => None,
    };
    if options.require_digest && estargz_digest.is_none() {
        return Err(FetchError::Toc {
            blob,
            source: Arc::new(FormatError::BadFooter {
                reason: "the layer descriptor has no zstd:chunked manifest-checksum annotation and an authenticated TOC is required".into(),
            }),
        });
    }
    let tail_len = options.tail_bytes.max(FOOTER_FETCH_LEN).min(blob_size);
    let tail_start = blob_size - tail_len;
    let tail = read(source, tail_start..blob_size, &mut requests).await?;
    let loc = match estargz_digest {
        Some(digest) => TocLocation {
            toc_digest: Some(digest),
            ..estargz::parse_footer(&tail, blob_size).map_err(toc_err)?
        },
        None => match parse_footer(&tail, blob_size) {
            Ok(footer) => footer.location(),
            // Not zstd:chunked: perhaps eStargz without its annotation.
            Err(e @ FormatError::BadFooterMagic { .. }) => {
                estargz::parse_footer(&tail, blob_size).map_err(|_| toc_err(e))?
            }
            Err(e) => return Err(toc_err(e)),
        },
    };
    let authenticated = loc.toc_digest.is_some();
    let toc_bytes = match loc.toc_in_tail(&tail, tail_start) {
        Some(b) => Bytes::copy_from_slice(b),
        None => read(source, loc.toc_range(), &mut requests).await?,
    };
    if !authenticated {
        tracing::debug!(blob = %blob, requests, "TOC located by footer (not authenticated by the manifest)");
    }
    let index = decode_index(toc_bytes.clone(), loc, blob_size, &blob).await?;
    Ok(FetchedIndex {
        index,
        requests,
        authenticated,
        toc: toc_bytes,
    })
}

/// Decodes and validates the compressed TOC `bytes` of the blob `blob` (of
/// `blob_size` bytes) found at `location`, verifying it against the TOC digest when
/// the location has one. Runs on the blocking pool: decompressing and parsing a
/// large TOC takes milliseconds that an async worker must not spend.
pub async fn decode_index(
    bytes: Bytes,
    location: TocLocation,
    blob_size: u64,
    blob: &str,
) -> Result<LayerIndex, FetchError> {
    let decoded =
        tokio::task::spawn_blocking(move || LayerIndex::decode(&bytes, &location, blob_size)).await;
    match decoded {
        Ok(result) => result.map_err(|e| FetchError::Toc {
            blob: blob.to_owned(),
            source: Arc::new(e),
        }),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(FetchError::Cancelled),
    }
}

/// One range read. The source retries transient failures under its own policy;
/// the timeout here is only a guard longer than the source's bound.
async fn read(
    source: &dyn BlobSource,
    range: std::ops::Range<u64>,
    requests: &mut u32,
) -> Result<Bytes, FetchError> {
    *requests += 1;
    let expected = range.end - range.start;
    let deadline = super::source_deadline(source, UNBOUNDED_SOURCE_TIMEOUT);
    let err = match tokio::time::timeout(deadline, source.read_range(range.clone())).await {
        Ok(Ok(b)) if b.len() as u64 == expected => return Ok(b),
        Ok(Ok(b)) => SourceError::WrongLength {
            blob: source.describe(),
            range,
            got: b.len() as u64,
        },
        Ok(Err(e)) => e,
        Err(_) => SourceError::Timeout {
            blob: source.describe(),
            range,
            after: deadline,
        },
    };
    Err(FetchError::Source(Arc::new(err)))
}

/// Fetches the TOC of the blob behind `source` and returns a [`Fetcher`] ready
/// to serve the layer (tasks on the current tokio runtime).
#[allow(clippy::too_many_arguments)]
pub async fn open_layer(
    source: Arc<dyn BlobSource>,
    blob_size: u64,
    annotations: &BTreeMap<String, String>,
    cache: Arc<ChunkCache>,
    limits: FetchLimits,
    config: FetchConfig,
    toc_options: &TocFetchOptions,
) -> Result<Arc<Fetcher>, FetchError> {
    let fetched = fetch_layer_index(source.as_ref(), blob_size, annotations, toc_options).await?;
    tracing::debug!(
        blob = %source.describe(),
        entries = fetched.index.len(),
        requests = fetched.requests,
        authenticated = fetched.authenticated,
        "layer index loaded"
    );
    Ok(Fetcher::new(
        Arc::new(fetched.index),
        source,
        cache,
        limits,
        config,
        tokio::runtime::Handle::current(),
    ))
}

/// Why one layer of an image could not be opened by [`open_image_layers`].
#[derive(Debug, thiserror::Error)]
#[error("layer {index} ({digest}): {source}")]
pub struct LayerOpenError {
    /// The layer's position in the image (bottom layer 0).
    pub index: usize,
    /// The layer blob's digest.
    pub digest: Digest,
    /// What failed.
    #[source]
    pub source: LayerOpenFailure,
}

/// What failed in opening one layer.
#[derive(Debug, thiserror::Error)]
pub enum LayerOpenFailure {
    /// The store cannot read the layer's blob.
    #[error("opening its blob: {0}")]
    Source(#[from] StoreError),
    /// Its table of contents could not be fetched or validated.
    #[error("reading its table of contents: {0}")]
    Toc(#[from] FetchError),
}

/// Opens the given layers of an image held by `store` (each with its position in the
/// image): the TOCs are fetched concurrently, so mounting costs one round trip, not
/// one per layer (one request per layer when the descriptors carry zstd:chunked
/// annotations). Fetchers share `limits` and `cache`; they come back in the order
/// of `layers`.
pub async fn open_image_layers<'a>(
    store: &ImageStore,
    layers: impl IntoIterator<Item = (usize, &'a Descriptor)>,
    cache: &Arc<ChunkCache>,
    limits: &FetchLimits,
    config: &FetchConfig,
    toc_options: &TocFetchOptions,
) -> Result<Vec<Arc<Fetcher>>, LayerOpenError> {
    let opens = layers.into_iter().map(|(index, layer)| async move {
        let failed = |source: LayerOpenFailure| LayerOpenError {
            index,
            digest: layer.digest,
            source,
        };
        let source = store.layer_source(layer).map_err(|e| failed(e.into()))?;
        open_layer(
            source,
            layer.size,
            &layer.annotations,
            Arc::clone(cache),
            limits.clone(),
            config.clone(),
            toc_options,
        )
        .await
        .map_err(|e| failed(e.into()))
    });
    futures::future::try_join_all(opens).await
}
