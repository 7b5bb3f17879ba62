//! Writing to a registry: blobs (existence check, cross-repository mount, monolithic
//! or chunked upload) and manifests.
//!
//! An upload is one session (POST, then PUT, with PATCHes between for chunked
//! uploads). Individual requests of a session are not repeated, because the session's
//! state on the server is unknown after a failure; instead a failed upload is started
//! over, after checking whether the blob arrived anyway, up to the retry policy's
//! attempts. The registry verifies the digest on the final PUT.

use std::path::PathBuf;

use bytes::Bytes;
use reqwest::{Method, Url};

use super::client::{push_scope, Cap, Ctx, Endpoint, Failure, RegistryClient, Req, ReqBody};
use super::error::RegistryError;
use super::stats::RequestKind;
use zest_oci::digest::Digest;
use zest_oci::Repository;

/// Where the bytes of a blob to push come from.
#[derive(Debug, Clone)]
pub enum UploadBody {
    /// In memory.
    Bytes(Bytes),
    /// A file, streamed (never read into memory whole).
    File(PathBuf),
}

/// What [`RegistryClient::push_blob`] had to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// The repository already had the blob.
    AlreadyPresent,
    /// Linked from another repository of the same registry, without upload.
    Mounted,
    /// Uploaded.
    Uploaded,
}

const MAX_UPLOAD_RESPONSE: u64 = 64 << 10;

impl RegistryClient {
    /// Pushes `data` to `repo` unless present, returning its digest.
    pub async fn push_blob_bytes(
        &self,
        repo: &Repository,
        data: Bytes,
    ) -> Result<Digest, RegistryError> {
        let digest = Digest::of(&data);
        self.push_blob(repo, &digest, UploadBody::Bytes(data), None)
            .await?;
        Ok(digest)
    }

    /// Pushes blob `digest` to `repo`: nothing if it is there (HEAD), a mount from
    /// `mount_from` if given (same registry), else an upload: monolithic up to the
    /// configured threshold, chunked above it.
    pub async fn push_blob(
        &self,
        repo: &Repository,
        digest: &Digest,
        source: UploadBody,
        mount_from: Option<&Repository>,
    ) -> Result<PushOutcome, RegistryError> {
        if let Some(from) = mount_from {
            if from.registry != repo.registry {
                return Err(RegistryError::InvalidArgument(format!(
                    "cannot mount blob {digest} from {from} into {repo}: mounts work only within one registry"
                )));
            }
        }
        let size = match &source {
            UploadBody::Bytes(b) => b.len() as u64,
            UploadBody::File(p) => tokio::fs::metadata(p)
                .await
                .map_err(|source| RegistryError::Io {
                    op: "stat blob file",
                    path: p.clone(),
                    source,
                })?
                .len(),
        };
        let mount_from = mount_from.filter(|f| *f != repo);
        let source = &source;
        self.on_endpoints(repo, Cap::Push, |ep| async move {
            if self.blob_head_on(&ep, repo, digest).await?.is_some() {
                return Ok(PushOutcome::AlreadyPresent);
            }
            let ctx = Ctx::new(&ep, repo, format!("upload of blob {digest}"));
            let ctx = &ctx;
            let ep = &ep;
            let mut first = true;
            // Uploads of large blobs take long: bounded by attempts, not a deadline.
            self.retrying(self.max_attempts(), None, || {
                let again = !first;
                first = false;
                async move {
                    if again && self.blob_head_on(ep, repo, digest).await?.is_some() {
                        // The failed attempt completed after all.
                        return Ok(PushOutcome::Uploaded);
                    }
                    self.upload_attempt(ep, ctx, repo, digest, source, size, mount_from)
                        .await
                }
            })
            .await
        })
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn upload_attempt(
        &self,
        ep: &Endpoint,
        ctx: &Ctx,
        repo: &Repository,
        digest: &Digest,
        source: &UploadBody,
        size: u64,
        mount_from: Option<&Repository>,
    ) -> Result<PushOutcome, Failure> {
        let cfg = &self.inner.config;
        let mut scope = push_scope(repo);
        let mut url = ep.url(repo, "blobs/uploads/");
        if let Some(from) = mount_from {
            scope.push_str(&format!(" repository:{}:pull", from.name));
            url.push_str(&format!("?mount={digest}&from={}", from.name));
        }
        let mut req = Req::new(
            RequestKind::Upload,
            Method::POST,
            url,
            &scope,
            ctx,
            cfg.request_timeout,
        );
        req.retry = false;
        let ex = self
            .exchange(ep, &req, MAX_UPLOAD_RESPONSE)
            .await
            .map_err(transient_if_possible)?;
        match ex.status {
            201 if mount_from.is_some() => {
                check_digest_header(ctx, ex.header("docker-content-digest"), digest)
                    .map_err(Failure::Fatal)?;
                return Ok(PushOutcome::Mounted);
            }
            202 => {}
            s => return Err(Failure::Fatal(ctx.status_error(s, &ex.body))),
        }
        let mut location = self
            .location(ep, ctx, ex.header("location"))
            .map_err(Failure::Fatal)?;

        let body_of = |offset: u64, len: u64| match source {
            UploadBody::Bytes(b) => {
                ReqBody::Bytes(b.slice(offset as usize..(offset + len) as usize))
            }
            UploadBody::File(p) => ReqBody::File {
                path: p.clone(),
                offset,
                len,
            },
        };
        let final_body = if size > cfg.chunked_upload_threshold {
            let chunk = cfg.upload_chunk_size.max(1);
            let mut offset = 0u64;
            while offset < size {
                let n = chunk.min(size - offset);
                let mut req = Req::new(
                    RequestKind::Upload,
                    Method::PATCH,
                    location.to_string(),
                    &scope,
                    ctx,
                    cfg.request_timeout,
                )
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .header(
                    reqwest::header::CONTENT_RANGE,
                    &format!("{}-{}", offset, offset + n - 1),
                );
                req.body = body_of(offset, n);
                req.retry = false;
                let ex = self
                    .exchange(ep, &req, MAX_UPLOAD_RESPONSE)
                    .await
                    .map_err(transient_if_possible)?;
                if ex.status != 202 {
                    return Err(Failure::Fatal(ctx.status_error(ex.status, &ex.body)));
                }
                if let Some(r) = ex.header("range") {
                    // The server states what it holds: "0-<last byte>".
                    let end = r
                        .rsplit('-')
                        .next()
                        .and_then(|e| e.trim().parse::<u64>().ok());
                    if end != Some(offset + n - 1) {
                        return Err(Failure::Transient(
                            ctx.protocol(format!(
                                "after uploading bytes {}-{}, the registry reports range {r:?}",
                                offset,
                                offset + n - 1
                            )),
                            None,
                        ));
                    }
                }
                location = self
                    .location(ep, ctx, ex.header("location"))
                    .map_err(Failure::Fatal)?;
                offset += n;
            }
            ReqBody::Empty
        } else {
            body_of(0, size)
        };
        location
            .query_pairs_mut()
            .append_pair("digest", &digest.to_string());
        let mut req = Req::new(
            RequestKind::Upload,
            Method::PUT,
            location.to_string(),
            &scope,
            ctx,
            cfg.request_timeout,
        )
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream");
        req.body = final_body;
        req.retry = false;
        let ex = self
            .exchange(ep, &req, MAX_UPLOAD_RESPONSE)
            .await
            .map_err(transient_if_possible)?;
        if ex.status != 201 {
            return Err(Failure::Fatal(ctx.status_error(ex.status, &ex.body)));
        }
        check_digest_header(ctx, ex.header("docker-content-digest"), digest)
            .map_err(Failure::Fatal)?;
        Ok(PushOutcome::Uploaded)
    }

    fn location(
        &self,
        ep: &Endpoint,
        ctx: &Ctx,
        header: Option<&str>,
    ) -> Result<Url, RegistryError> {
        let loc = header.ok_or_else(|| ctx.protocol("upload answer without Location header"))?;
        ep.resolve_location(loc)
            .ok_or_else(|| ctx.protocol(format!("unusable upload Location {loc:?}")))
    }

    /// Pushes a manifest under `reference` (a tag, or the manifest's own digest) with
    /// `media_type`; returns its digest.
    pub async fn push_manifest(
        &self,
        repo: &Repository,
        reference: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<Digest, RegistryError> {
        let digest = Digest::of(&bytes);
        if reference.starts_with("sha256:") {
            let want: Digest = reference
                .parse()
                .map_err(|e| RegistryError::InvalidArgument(format!("manifest reference: {e}")))?;
            if want != digest {
                return Err(RegistryError::InvalidArgument(format!(
                    "manifest pushed by digest {want} hashes to {digest}"
                )));
            }
        } else {
            // Validate the tag with the reference grammar.
            let probe = format!("{}/{}:{reference}", repo.registry, repo.name);
            if probe.parse::<zest_oci::Reference>().is_err() || reference.contains('/') {
                return Err(RegistryError::InvalidArgument(format!(
                    "invalid tag {reference:?}"
                )));
            }
        }
        let max = self.inner.config.max_manifest_size;
        if bytes.len() as u64 > max {
            return Err(RegistryError::InvalidArgument(format!(
                "manifest is {} bytes, more than the {max}-byte limit",
                bytes.len()
            )));
        }
        let (bytes, digest_ref) = (&bytes, &digest);
        self.on_endpoints(repo, Cap::Push, |ep| async move {
            let ctx = Ctx::new(&ep, repo, format!("push of manifest {reference}"));
            let scope = push_scope(repo);
            let mut req = Req::new(
                RequestKind::Manifest,
                Method::PUT,
                ep.url(repo, &format!("manifests/{reference}")),
                &scope,
                &ctx,
                self.inner.config.request_timeout,
            )
            .header(reqwest::header::CONTENT_TYPE, media_type);
            req.body = ReqBody::Bytes(bytes.clone());
            let ex = self.exchange(&ep, &req, MAX_UPLOAD_RESPONSE).await?;
            if ex.status != 201 {
                return Err(ctx.status_error(ex.status, &ex.body));
            }
            check_digest_header(&ctx, ex.header("docker-content-digest"), digest_ref)?;
            Ok(*digest_ref)
        })
        .await
    }
}

/// Errors of one upload request that restarting the upload may fix.
fn transient_if_possible(e: RegistryError) -> Failure {
    match e {
        RegistryError::Connect { .. }
        | RegistryError::Timeout { .. }
        | RegistryError::Protocol { .. }
        | RegistryError::Truncated { .. } => Failure::Transient(e, None),
        RegistryError::Status { status, .. } if status == 429 || status >= 500 => {
            Failure::Transient(e, None)
        }
        other => Failure::Fatal(other),
    }
}

fn check_digest_header(
    ctx: &Ctx,
    header: Option<&str>,
    digest: &Digest,
) -> Result<(), RegistryError> {
    if let Some(d) = header.and_then(|h| h.trim().parse::<Digest>().ok()) {
        if d != *digest {
            return Err(RegistryError::DigestMismatch {
                host: ctx.host.clone(),
                repository: ctx.repository.clone(),
                expected: *digest,
                actual: d,
            });
        }
    }
    Ok(())
}
