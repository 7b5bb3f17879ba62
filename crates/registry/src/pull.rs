//! Reading from a registry: manifests, whole blobs, and byte ranges of blobs.
//!
//! Verification rules: a manifest fetched by digest must hash to it; one fetched by
//! tag is hashed and checked against `Docker-Content-Digest` when the registry sends
//! one; a whole blob must hash to its digest before it is returned or renamed into
//! place. Range reads cannot be checked against the blob digest (the caller checks
//! the chunk digests of its table of contents) but are checked for exact position and
//! length: a wrong, short or over-long answer is an error, never data.

use std::ops::Range;
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use reqwest::Method;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::client::{
    content_length, header_str, pull_scope, Cap, Ctx, Endpoint, Failure, RegistryClient, Req,
};
use super::error::{ApiErrors, RegistryError};
use super::stats::RequestKind;
use zest_oci::digest::{Digest, Hasher};
use zest_oci::{
    media_type, Descriptor, ImageManifest, ManifestKind, Platform, Reference, Repository,
};

/// A manifest as fetched: raw bytes (verified), their digest and media type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedManifest {
    /// The manifest's media type (from the response, else from the document).
    pub media_type: String,
    /// The exact bytes served; their digest is `digest`.
    pub bytes: Bytes,
    /// sha256 of `bytes`.
    pub digest: Digest,
}

impl FetchedManifest {
    /// Parses the manifest according to its media type.
    pub fn parse(&self) -> Result<ManifestKind, RegistryError> {
        ManifestKind::parse(&self.media_type, &self.bytes).map_err(|source| {
            RegistryError::Manifest {
                reference: self.digest.to_string(),
                source,
            }
        })
    }

    /// A descriptor of this manifest.
    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(
            self.media_type.clone(),
            self.digest,
            self.bytes.len() as u64,
        )
    }
}

/// An image resolved for one platform.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// The index the reference pointed to, if it was multi-platform.
    pub index: Option<FetchedManifest>,
    /// The index entry picked for the platform (with its platform and annotations),
    /// when there was an index.
    pub entry: Option<Descriptor>,
    /// The platform's image manifest (verified bytes).
    pub manifest: FetchedManifest,
    /// `manifest`, parsed.
    pub image: ImageManifest,
}

/// The media type to record for a manifest: a known type from `Content-Type`, else
/// the document's own `mediaType`, else the header as sent.
fn effective_media_type(content_type: Option<&str>, bytes: &[u8]) -> String {
    let ct = content_type.map(media_type::essence).unwrap_or("");
    if media_type::MANIFEST_TYPES.contains(&ct) {
        return ct.to_string();
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        media_type: Option<String>,
    }
    match serde_json::from_slice::<Probe>(bytes) {
        Ok(Probe {
            media_type: Some(t),
        }) if media_type::MANIFEST_TYPES.contains(&t.as_str()) => t,
        _ => ct.to_string(),
    }
}

/// Parses `Content-Range: bytes a-b/total` (total may be `*`).
pub(crate) fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (span, total) = rest.split_once('/')?;
    let (a, b) = span.trim().split_once('-')?;
    let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    if b < a {
        return None;
    }
    Some((a, b, total))
}

/// State of a whole-blob download, kept across retries and endpoints so a broken
/// transfer resumes where it stopped.
struct Download {
    hasher: Hasher,
    written: u64,
}

impl RegistryClient {
    /// Fetches the manifest `reference` points to (digest if it has one, else tag),
    /// accepting every OCI and Docker manifest type. Verified against the digest when
    /// fetched by digest; hashed and checked against `Docker-Content-Digest` by tag.
    pub async fn get_manifest(
        &self,
        reference: &Reference,
    ) -> Result<FetchedManifest, RegistryError> {
        let repo = &reference.repository;
        let mref = reference.manifest_ref();
        let cap = if reference.digest.is_some() {
            Cap::Pull
        } else {
            Cap::Resolve
        };
        let (mref, digest) = (&mref, reference.digest);
        self.on_endpoints(repo, cap, |ep| async move {
            self.manifest_on(&ep, repo, mref, digest).await
        })
        .await
    }

    /// Fetches the manifest `desc` describes from `repo`, verifying digest and size.
    pub async fn get_manifest_by_descriptor(
        &self,
        repo: &Repository,
        desc: &Descriptor,
    ) -> Result<FetchedManifest, RegistryError> {
        if desc.size > self.inner.config.max_manifest_size {
            return Err(RegistryError::InvalidArgument(format!(
                "manifest {} is {} bytes, more than the {}-byte limit",
                desc.digest, desc.size, self.inner.config.max_manifest_size
            )));
        }
        let mref = desc.digest.to_string();
        let mref = &mref;
        let m = self
            .on_endpoints(repo, Cap::Pull, |ep| async move {
                self.manifest_on(&ep, repo, mref, Some(desc.digest)).await
            })
            .await?;
        if m.bytes.len() as u64 != desc.size {
            return Err(RegistryError::InvalidArgument(format!(
                "manifest {} is {} bytes but its descriptor says {}",
                desc.digest,
                m.bytes.len(),
                desc.size
            )));
        }
        Ok(m)
    }

    async fn manifest_on(
        &self,
        ep: &Endpoint,
        repo: &Repository,
        mref: &str,
        digest: Option<Digest>,
    ) -> Result<FetchedManifest, RegistryError> {
        let ctx = Ctx::new(ep, repo, format!("manifest {mref}"));
        let scope = pull_scope(repo);
        let cfg = &self.inner.config;
        let req = Req::new(
            RequestKind::Manifest,
            Method::GET,
            ep.url(repo, &format!("manifests/{mref}")),
            &scope,
            &ctx,
            cfg.request_timeout,
        )
        .header(
            reqwest::header::ACCEPT,
            &media_type::MANIFEST_TYPES.join(", "),
        );
        let ex = self.exchange(ep, &req, cfg.max_manifest_size).await?;
        if ex.status != 200 {
            return Err(ctx.status_error(ex.status, &ex.body));
        }
        let actual = Digest::of(&ex.body);
        let announced = ex
            .header("docker-content-digest")
            .and_then(|d| d.trim().parse::<Digest>().ok());
        let expected = digest.or(announced);
        if let Some(expected) = expected {
            if expected != actual {
                return Err(RegistryError::DigestMismatch {
                    host: ctx.host,
                    repository: ctx.repository,
                    expected,
                    actual,
                });
            }
        }
        let media_type = effective_media_type(ex.header("content-type"), &ex.body);
        Ok(FetchedManifest {
            media_type,
            bytes: ex.body,
            digest: actual,
        })
    }

    /// Resolves `reference` to the image manifest for `platform`: fetches it, and if
    /// it is an index, picks the closest platform and fetches that manifest by digest.
    pub async fn resolve_image(
        &self,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<ResolvedImage, RegistryError> {
        let top = self.get_manifest(reference).await?;
        let parsed = ManifestKind::parse(&top.media_type, &top.bytes).map_err(|source| {
            RegistryError::Manifest {
                reference: reference.to_string(),
                source,
            }
        })?;
        let index = match parsed {
            ManifestKind::Image(image) => {
                return Ok(ResolvedImage {
                    index: None,
                    entry: None,
                    manifest: top,
                    image,
                })
            }
            ManifestKind::Index(index) => index,
        };
        let Some(desc) = index.select(platform) else {
            let available: Vec<String> = index
                .manifests
                .iter()
                .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
                .collect();
            return Err(RegistryError::PlatformNotFound {
                reference: reference.to_string(),
                platform: platform.to_string(),
                available: if available.is_empty() {
                    "none".into()
                } else {
                    available.join(", ")
                },
            });
        };
        let manifest = self
            .get_manifest_by_descriptor(&reference.repository, desc)
            .await?;
        let child_ref = reference.with_digest(manifest.digest).to_string();
        match ManifestKind::parse(&manifest.media_type, &manifest.bytes) {
            Ok(ManifestKind::Image(image)) => Ok(ResolvedImage {
                index: Some(top),
                entry: Some(desc.clone()),
                manifest,
                image,
            }),
            Ok(ManifestKind::Index(_)) => Err(RegistryError::InvalidArgument(format!(
                "{child_ref}: an index inside an index is not supported"
            ))),
            Err(source) => Err(RegistryError::Manifest {
                reference: child_ref,
                source,
            }),
        }
    }

    /// The size of blob `digest` in `repo` if it exists (HEAD), `None` if not.
    pub async fn blob_exists(
        &self,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<Option<u64>, RegistryError> {
        self.on_endpoints(repo, Cap::Pull, |ep| async move {
            self.blob_head_on(&ep, repo, digest).await
        })
        .await
    }

    /// The size of blob `digest` in `repo` (HEAD); a missing blob is an error.
    pub async fn blob_size(
        &self,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<u64, RegistryError> {
        self.on_endpoints(repo, Cap::Pull, |ep| async move {
            match self.blob_head_on(&ep, repo, digest).await? {
                Some(n) => Ok(n),
                None => {
                    Err(Ctx::new(&ep, repo, format!("blob {digest}"))
                        .not_found(ApiErrors::default()))
                }
            }
        })
        .await
    }

    pub(crate) async fn blob_head_on(
        &self,
        ep: &Endpoint,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<Option<u64>, RegistryError> {
        let ctx = Ctx::new(ep, repo, format!("blob {digest}"));
        let scope = pull_scope(repo);
        let req = Req::new(
            RequestKind::Blob,
            Method::HEAD,
            ep.url(repo, &format!("blobs/{digest}")),
            &scope,
            &ctx,
            self.inner.config.request_timeout,
        );
        let ex = self.exchange(ep, &req, 0).await?;
        match ex.status {
            200 => content_length(&ex.headers)
                .map(Some)
                .ok_or_else(|| ctx.protocol("HEAD answer without Content-Length")),
            404 => Ok(None),
            s => Err(ctx.status_error(s, &ex.body)),
        }
    }

    /// A whole blob of at most `max_size` bytes in memory (configs, small files),
    /// verified against `digest`.
    pub async fn get_blob_bytes(
        &self,
        repo: &Repository,
        digest: &Digest,
        max_size: u64,
    ) -> Result<Bytes, RegistryError> {
        let mut out: Vec<u8> = Vec::new();
        self.download(repo, digest, &mut out, Some(max_size))
            .await?;
        Ok(Bytes::from(out))
    }

    /// Streams a whole blob into `writer` with bounded memory, resuming broken
    /// transfers with range requests, and returns its size. The digest is checked at
    /// the end: on error the writer holds unverified bytes and must be discarded (use
    /// [`RegistryClient::get_blob_to_file`] to never expose them).
    pub async fn get_blob_to_writer<W>(
        &self,
        repo: &Repository,
        digest: &Digest,
        writer: &mut W,
    ) -> Result<u64, RegistryError>
    where
        W: AsyncWrite + Unpin + Send,
    {
        self.download(repo, digest, writer, None).await
    }

    /// Downloads a whole blob to `path`: written to a temporary file beside it,
    /// verified, synced, then renamed, so `path` only ever holds the verified blob.
    pub async fn get_blob_to_file(
        &self,
        repo: &Repository,
        digest: &Digest,
        path: &Path,
    ) -> Result<u64, RegistryError> {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp: PathBuf = dir.join(format!(".{name}.part-{:08x}", rand::random::<u32>()));
        let io = |op: &'static str, p: &Path| {
            let p = p.to_path_buf();
            move |source| RegistryError::Io {
                op,
                path: p,
                source,
            }
        };
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .map_err(io("create", &tmp))?;
        let result = async {
            let n = self.download(repo, digest, &mut file, None).await?;
            file.sync_all().await.map_err(io("sync", &tmp))?;
            tokio::fs::rename(&tmp, path)
                .await
                .map_err(io("rename into place", path))?;
            Ok(n)
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }

    async fn download<W>(
        &self,
        repo: &Repository,
        digest: &Digest,
        w: &mut W,
        limit: Option<u64>,
    ) -> Result<u64, RegistryError>
    where
        W: AsyncWrite + Unpin + Send,
    {
        let eps: Vec<_> = self
            .endpoints(repo)?
            .iter()
            .filter(|e| e.caps.pull)
            .cloned()
            .collect();
        let mut st = Download {
            hasher: Hasher::new(),
            written: 0,
        };
        let mut last = RegistryError::InvalidArgument(format!(
            "no configured endpoint of registry {} allows pulls",
            repo.registry
        ));
        let n = eps.len();
        for (i, ep) in eps.iter().enumerate() {
            let ctx = Ctx::new(ep, repo, format!("blob {digest}"));
            let mut attempt = 0;
            let res = loop {
                attempt += 1;
                match self
                    .download_attempt(ep, &ctx, repo, digest, w, &mut st, limit)
                    .await
                {
                    Ok(()) => break Ok(()),
                    Err(Failure::Fatal(e)) => break Err(e),
                    Err(Failure::Transient(e, after)) => {
                        if attempt >= self.max_attempts() {
                            break Err(e);
                        }
                        let delay = self.inner.config.retry.delay(attempt, after);
                        tracing::debug!(kind = e.kind().label(), error = %e, attempt, resume_at = st.written, "blob download interrupted, resuming");
                        self.inner.stats.retry();
                        tokio::time::sleep(delay).await;
                    }
                }
            };
            match res {
                Ok(()) => {
                    let actual = std::mem::take(&mut st.hasher).finish();
                    if actual != *digest {
                        return Err(RegistryError::DigestMismatch {
                            host: ctx.host,
                            repository: ctx.repository,
                            expected: *digest,
                            actual,
                        });
                    }
                    w.flush().await.map_err(|source| RegistryError::Io {
                        op: "write blob",
                        path: PathBuf::from(digest.to_string()),
                        source,
                    })?;
                    return Ok(st.written);
                }
                Err(e) if i + 1 < n && e.allows_fallback() => {
                    tracing::warn!(endpoint = %ep.host, kind = e.kind().label(), error = %e, "registry endpoint failed, trying the next one");
                    last = e;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    #[allow(clippy::too_many_arguments)]
    async fn download_attempt<W>(
        &self,
        ep: &Endpoint,
        ctx: &Ctx,
        repo: &Repository,
        digest: &Digest,
        w: &mut W,
        st: &mut Download,
        limit: Option<u64>,
    ) -> Result<(), Failure>
    where
        W: AsyncWrite + Unpin + Send,
    {
        let scope = pull_scope(repo);
        let idle = self.inner.config.request_timeout;
        let mut req = Req::new(
            RequestKind::Blob,
            Method::GET,
            ep.url(repo, &format!("blobs/{digest}")),
            &scope,
            ctx,
            idle,
        );
        if st.written > 0 {
            req = req.header(reqwest::header::RANGE, &format!("bytes={}-", st.written));
        }
        let mut resp = self.execute(ep, &req).await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        // Bytes of this answer to drop before new data (a 200 to a resume restarts at 0).
        let (mut skip, total) = match status {
            200 => (st.written, content_length(&headers)),
            206 if st.written > 0 => {
                let cr = header_str(&headers, "content-range").and_then(parse_content_range);
                match cr {
                    Some((a, _, total)) if a == st.written => (0, total),
                    _ => {
                        return Err(Failure::Fatal(ctx.protocol(format!(
                            "asked to resume at byte {}, got Content-Range {:?}",
                            st.written,
                            header_str(&headers, "content-range")
                        ))))
                    }
                }
            }
            _ => {
                let body = super::client::read_capped(resp, 64 << 10, idle).await;
                return Err(Failure::Fatal(ctx.status_error(status, &body)));
            }
        };
        if let (Some(limit), Some(total)) = (limit, total) {
            if total > limit {
                return Err(Failure::Fatal(ctx.too_large(limit)));
            }
        }
        loop {
            let chunk = match tokio::time::timeout(idle, resp.chunk()).await {
                Err(_) => return Err(Failure::Transient(ctx.timeout(idle), None)),
                Ok(Err(_)) | Ok(Ok(None)) if total.is_some_and(|t| st.written < t) => {
                    return Err(Failure::Transient(
                        RegistryError::Truncated {
                            host: ctx.host.clone(),
                            repository: ctx.repository.clone(),
                            digest: *digest,
                            range: 0..total.unwrap_or(0),
                            got: st.written,
                            expected: total.unwrap_or(0),
                        },
                        None,
                    ))
                }
                Ok(Err(e)) => {
                    return Err(Failure::Transient(
                        ctx.interrupted(format!("body broke off after {} bytes: {e}", st.written)),
                        None,
                    ))
                }
                Ok(Ok(None)) => return Ok(()),
                Ok(Ok(Some(c))) => c,
            };
            self.inner
                .stats
                .bytes(RequestKind::Blob, chunk.len() as u64);
            let mut data: &[u8] = &chunk;
            if skip > 0 {
                let k = skip.min(data.len() as u64) as usize;
                data = &data[k..];
                skip -= k as u64;
            }
            if data.is_empty() {
                continue;
            }
            if let Some(limit) = limit {
                if st.written + data.len() as u64 > limit {
                    return Err(Failure::Fatal(ctx.too_large(limit)));
                }
            }
            st.hasher.update(data);
            w.write_all(data).await.map_err(|source| {
                Failure::Fatal(RegistryError::Io {
                    op: "write blob",
                    path: PathBuf::from(digest.to_string()),
                    source,
                })
            })?;
            st.written += data.len() as u64;
        }
    }

    /// Bytes `range` (end exclusive) of blob `digest` in `repo`, by an HTTP range
    /// request. A registry that answers 200 with the whole blob is handled by reading
    /// only up to the end of the range. The answer is checked for position and length;
    /// the caller verifies content against its own chunk digests.
    pub async fn get_range(
        &self,
        repo: &Repository,
        digest: &Digest,
        range: Range<u64>,
    ) -> Result<Bytes, RegistryError> {
        let len = usize::try_from(range.end.saturating_sub(range.start)).unwrap_or(0);
        let out = std::sync::Mutex::new(BytesMut::with_capacity(len));
        let start = range.start;
        self.get_range_with(repo, digest, range, &|offset, data| {
            let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
            // A retried attempt starts again from its first byte.
            out.truncate((offset - start) as usize);
            out.extend_from_slice(&data);
        })
        .await?;
        Ok(out.into_inner().unwrap_or_else(|p| p.into_inner()).freeze())
    }

    /// [`RegistryClient::get_range`], handing the body to `on_data` as it arrives
    /// instead of collecting it: `on_data(offset, bytes)` with `offset` the blob
    /// offset of `bytes[0]`. Within one attempt pieces come in order and without
    /// gaps; a retried attempt starts again at `range.start`, so a caller keeps
    /// what it has and skips bytes it has seen. `Ok` means exactly the range's bytes
    /// were delivered by the last attempt; callers may use earlier pieces before
    /// that (after checking them against their own digests), which is the point:
    /// the first chunks of a long request are usable while the rest is in flight.
    pub async fn get_range_with(
        &self,
        repo: &Repository,
        digest: &Digest,
        range: Range<u64>,
        on_data: &(dyn Fn(u64, Bytes) + Send + Sync),
    ) -> Result<(), RegistryError> {
        if range.start >= range.end {
            return Err(RegistryError::InvalidArgument(format!(
                "empty byte range {}..{} of blob {digest}",
                range.start, range.end
            )));
        }
        let max = self.inner.config.max_range_size;
        if range.end - range.start > max {
            return Err(RegistryError::InvalidArgument(format!(
                "byte range {}..{} of blob {digest} is larger than the {max}-byte limit per read",
                range.start, range.end
            )));
        }
        let range = &range;
        // One deadline for every attempt on every endpoint: callers rely on
        // `range_read_deadline` bounding the whole call.
        let total = self.inner.config.range_read_deadline();
        let deadline = tokio::time::Instant::now() + total;
        let per_attempt = self.inner.config.range_timeout;
        self.on_endpoints(repo, Cap::Pull, |ep| async move {
            let ctx = Ctx::new(&ep, repo, format!("range read of blob {digest}"));
            let ctx = &ctx;
            let ep = &ep;
            self.retrying(self.max_attempts(), Some(deadline), || async move {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    return Err(Failure::Fatal(ctx.timeout(total)));
                }
                let timeout = per_attempt.min(left);
                match tokio::time::timeout(
                    timeout,
                    self.range_attempt(ep, ctx, repo, digest, range, on_data),
                )
                .await
                {
                    Err(_) => Err(Failure::Transient(ctx.timeout(timeout), None)),
                    Ok(r) => r,
                }
            })
            .await
        })
        .await
    }

    async fn range_attempt(
        &self,
        ep: &Endpoint,
        ctx: &Ctx,
        repo: &Repository,
        digest: &Digest,
        range: &Range<u64>,
        on_data: &(dyn Fn(u64, Bytes) + Send + Sync),
    ) -> Result<(), Failure> {
        let scope = pull_scope(repo);
        let timeout = self.inner.config.range_timeout;
        let len = range.end - range.start;
        let req = Req::new(
            RequestKind::Range,
            Method::GET,
            ep.url(repo, &format!("blobs/{digest}")),
            &scope,
            ctx,
            timeout,
        )
        .header(
            reqwest::header::RANGE,
            &format!("bytes={}-{}", range.start, range.end - 1),
        );
        let mut resp = self.execute(ep, &req).await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let truncated = |got: u64| {
            Failure::Transient(
                RegistryError::Truncated {
                    host: ctx.host.clone(),
                    repository: ctx.repository.clone(),
                    digest: *digest,
                    range: range.clone(),
                    got,
                    expected: len,
                },
                None,
            )
        };
        let past_end = |size: Option<u64>| {
            Failure::Fatal(RegistryError::RangeNotSatisfiable {
                host: ctx.host.clone(),
                repository: ctx.repository.clone(),
                digest: *digest,
                range: range.clone(),
                blob_size: size,
            })
        };
        let mut skip = match status {
            206 => {
                if header_str(&headers, "content-type").is_some_and(|t| t.starts_with("multipart/"))
                {
                    return Err(Failure::Fatal(
                        ctx.protocol("multipart answer to a single-range request"),
                    ));
                }
                let cr = header_str(&headers, "content-range");
                match cr.and_then(parse_content_range) {
                    Some((a, b, _)) if a == range.start && b + 1 == range.end => {}
                    // Servers clip a range running past the end to the blob's end.
                    Some((a, b, Some(total)))
                        if a == range.start && b + 1 == total && range.end > total =>
                    {
                        return Err(past_end(Some(total)));
                    }
                    _ => {
                        return Err(Failure::Fatal(ctx.protocol(format!(
                            "asked for bytes {}-{}, got Content-Range {cr:?}",
                            range.start,
                            range.end - 1
                        ))))
                    }
                }
                if let Some(n) = content_length(&headers) {
                    if n != len {
                        return Err(Failure::Fatal(ctx.protocol(format!(
                            "asked for {len} bytes, Content-Length says {n}"
                        ))));
                    }
                }
                0
            }
            200 => {
                if let Some(n) = content_length(&headers) {
                    if n < range.end {
                        return Err(past_end(Some(n)));
                    }
                }
                range.start
            }
            416 => {
                let size = header_str(&headers, "content-range")
                    .and_then(|v| v.trim().strip_prefix("bytes */"))
                    .and_then(|n| n.trim().parse().ok());
                return Err(past_end(size));
            }
            _ => {
                let body = super::client::read_capped(resp, 64 << 10, timeout).await;
                return Err(Failure::Fatal(ctx.status_error(status, &body)));
            }
        };
        let whole_blob = status == 200;
        let mut seen = 0u64; // bytes of the body read so far
        let mut delivered = 0u64; // bytes of the range handed to `on_data`
        loop {
            if whole_blob && delivered == len {
                // Everything needed is here: stop reading the rest of the blob.
                return Ok(());
            }
            let chunk = match resp.chunk().await {
                Err(_) => return Err(truncated(delivered)),
                Ok(None) => {
                    if delivered == len {
                        return Ok(());
                    }
                    if whole_blob && content_length(&headers).is_none() {
                        // A complete answer that is simply shorter than the range.
                        return Err(past_end(Some(seen)));
                    }
                    return Err(truncated(delivered));
                }
                Ok(Some(c)) => c,
            };
            self.inner
                .stats
                .bytes(RequestKind::Range, chunk.len() as u64);
            seen += chunk.len() as u64;
            let mut data = chunk;
            if skip > 0 {
                let k = skip.min(data.len() as u64) as usize;
                data = data.slice(k..);
                skip -= k as u64;
            }
            let room = (len - delivered) as usize;
            if data.len() > room {
                if !whole_blob {
                    return Err(Failure::Fatal(ctx.protocol(format!(
                        "answer to a {len}-byte range request is longer than {len} bytes"
                    ))));
                }
                data.truncate(room);
            }
            if !data.is_empty() {
                let n = data.len() as u64;
                on_data(range.start + delivered, data);
                delivered += n;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parsing() {
        assert_eq!(
            parse_content_range("bytes 0-9/100"),
            Some((0, 9, Some(100)))
        );
        assert_eq!(parse_content_range("bytes 5-5/*"), Some((5, 5, None)));
        assert_eq!(
            parse_content_range(" bytes  1-2 / 3 "),
            Some((1, 2, Some(3)))
        );
        for bad in [
            "",
            "bytes */100",
            "bytes 9-0/100",
            "items 0-1/2",
            "bytes 0-x/1",
            "bytes 0-1",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad}");
        }
    }

    #[test]
    fn media_type_detection() {
        let doc = br#"{"mediaType":"application/vnd.oci.image.index.v1+json"}"#;
        assert_eq!(
            effective_media_type(Some("application/json"), doc),
            media_type::OCI_INDEX
        );
        assert_eq!(
            effective_media_type(
                Some("application/vnd.docker.distribution.manifest.v2+json; charset=x"),
                b"{}"
            ),
            media_type::DOCKER_MANIFEST
        );
        assert_eq!(effective_media_type(None, b"{}"), "");
    }
}
