//! Referrers: artifacts that point at a manifest through their `subject` (OCI
//! distribution 1.1), found through the referrers API
//! (`GET /v2/<name>/referrers/<digest>`) or, on registries without it, through the
//! referrers tag schema: an image index under the tag `sha256-<hex>` that lists the
//! referrers' descriptors, kept up to date by whoever pushes one.
//!
//! A registry without the API answers 404 to the referrers path (Distribution 2.8
//! does); an API answer is always an index, empty when nothing refers to the
//! subject. The tag-schema index is read, extended and written back with every
//! other entry kept; two writers racing may lose one entry (the schema has no
//! compare-and-swap), which only makes that referrer invisible until pushed again.

use reqwest::Method;

use super::client::{pull_scope, Cap, Ctx, Endpoint, RegistryClient, Req};
use super::error::RegistryError;
use super::stats::RequestKind;
use zest_oci::digest::Digest;
use zest_oci::{media_type, Descriptor, ImageIndex, ImageManifest, Reference, Repository};

/// Where a registry keeps the referrers of a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReferrersSource {
    /// The referrers API: the registry indexes manifests by their `subject`.
    Api,
    /// The tag schema: an index under [`referrers_tag`].
    TagSchema,
}

/// The tag of the referrers-tag-schema index of `subject`: `sha256-<hex>`.
pub fn referrers_tag(subject: &Digest) -> String {
    subject.to_string().replacen(':', "-", 1)
}

/// Percent-encodes a query value (media types hold `/` and `+`).
fn query_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len() * 2);
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl RegistryClient {
    /// The referrers API's index of `subject` in `repo` (filtered by
    /// `artifact_type` when the registry honours the filter; callers filter
    /// again), or `None` when the registry has no referrers API.
    pub async fn referrers_api(
        &self,
        repo: &Repository,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Option<ImageIndex>, RegistryError> {
        self.on_endpoints(repo, Cap::Resolve, |ep| async move {
            self.referrers_on(&ep, repo, subject, artifact_type).await
        })
        .await
    }

    async fn referrers_on(
        &self,
        ep: &Endpoint,
        repo: &Repository,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Option<ImageIndex>, RegistryError> {
        let ctx = Ctx::new(ep, repo, format!("referrers of {subject}"));
        let scope = pull_scope(repo);
        let cfg = &self.inner.config;
        let mut path = format!("referrers/{subject}");
        if let Some(t) = artifact_type {
            path.push_str("?artifactType=");
            path.push_str(&query_value(t));
        }
        let req = Req::new(
            RequestKind::Manifest,
            Method::GET,
            ep.url(repo, &path),
            &scope,
            &ctx,
            cfg.request_timeout,
        )
        .header(reqwest::header::ACCEPT, media_type::OCI_INDEX);
        let ex = self.exchange(ep, &req, cfg.max_manifest_size).await?;
        match ex.status {
            200 => ImageIndex::from_json(&ex.body)
                .map(Some)
                .map_err(|e| ctx.protocol(format!("referrers answer is not an image index: {e}"))),
            404 => Ok(None),
            s => Err(ctx.status_error(s, &ex.body)),
        }
    }

    /// The referrers of `subject` in `repo` whose artifact type is
    /// `artifact_type`: from the referrers API, else from the tag schema (no tag:
    /// none). Says where they were found. Both are asked at once: a registry
    /// without the API (docker-registry 2.8, most mirrors) would otherwise cost
    /// a round trip more, and this lookup sits on the way of a container's start
    /// (learned profiles); the tag schema's answer is dropped where the API
    /// answered.
    pub async fn list_referrers(
        &self,
        repo: &Repository,
        subject: &Digest,
        artifact_type: &str,
    ) -> Result<(Vec<Descriptor>, ReferrersSource), RegistryError> {
        let (api, tag) = futures::future::join(
            self.referrers_api(repo, subject, Some(artifact_type)),
            self.referrers_tag_index(repo, subject),
        )
        .await;
        let (index, source) = match api? {
            Some(index) => (Some(index), ReferrersSource::Api),
            None => (tag?, ReferrersSource::TagSchema),
        };
        let found = index
            .map(|i| i.manifests)
            .unwrap_or_default()
            .into_iter()
            .filter(|d| d.artifact_type.as_deref() == Some(artifact_type))
            .collect();
        Ok((found, source))
    }

    /// The tag-schema index of `subject`, `None` when the tag does not exist. A
    /// tag holding anything but an image index is an error (it is not ours to
    /// overwrite).
    pub async fn referrers_tag_index(
        &self,
        repo: &Repository,
        subject: &Digest,
    ) -> Result<Option<ImageIndex>, RegistryError> {
        let tag = referrers_tag(subject);
        let reference = Reference {
            repository: repo.clone(),
            tag: Some(tag),
            digest: None,
        };
        let fetched = match self.get_manifest(&reference).await {
            Ok(m) => m,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        if !media_type::is_index(&fetched.media_type) {
            return Err(RegistryError::InvalidArgument(format!(
                "{reference} holds a {} where the referrers tag schema expects an image index; remove or retag it",
                fetched.media_type
            )));
        }
        ImageIndex::from_json(&fetched.bytes)
            .map(Some)
            .map_err(|source| RegistryError::Manifest {
                reference: reference.to_string(),
                source,
            })
    }

    /// Pushes `manifest`, an artifact manifest whose `subject` is set (its blobs
    /// must be pushed already), and makes it discoverable as a referrer: a
    /// registry with the referrers API indexes it itself; otherwise it is added to
    /// the tag-schema index of the subject, keeping every other entry. Returns the
    /// manifest's descriptor and where the referrers live.
    pub async fn push_referrer(
        &self,
        repo: &Repository,
        manifest: &ImageManifest,
    ) -> Result<(Descriptor, ReferrersSource), RegistryError> {
        let Some(subject) = manifest.subject.as_ref() else {
            return Err(RegistryError::InvalidArgument(
                "a referrer manifest needs a subject".into(),
            ));
        };
        let bytes = bytes::Bytes::from(manifest.to_json());
        let mut desc = Descriptor::for_bytes(media_type::OCI_MANIFEST, &bytes);
        desc.artifact_type = manifest
            .artifact_type
            .clone()
            .or_else(|| Some(manifest.config.media_type.clone()));
        desc.annotations = manifest.annotations.clone();
        self.push_manifest(
            repo,
            &desc.digest.to_string(),
            media_type::OCI_MANIFEST,
            bytes,
        )
        .await?;
        if self
            .referrers_api(repo, &subject.digest, None)
            .await?
            .is_some()
        {
            return Ok((desc, ReferrersSource::Api));
        }
        let mut index = self
            .referrers_tag_index(repo, &subject.digest)
            .await?
            .unwrap_or_else(ImageIndex::new);
        if !index.manifests.iter().any(|d| d.digest == desc.digest) {
            index.manifests.push(desc.clone());
        }
        index.media_type = Some(media_type::OCI_INDEX.to_owned());
        self.push_manifest(
            repo,
            &referrers_tag(&subject.digest),
            media_type::OCI_INDEX,
            bytes::Bytes::from(index.to_json()),
        )
        .await?;
        Ok((desc, ReferrersSource::TagSchema))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_and_query_forms() {
        let d = Digest::of(b"x");
        let tag = referrers_tag(&d);
        assert!(tag.starts_with("sha256-") && tag.len() == 7 + 64);
        assert_eq!(
            query_value("application/vnd.zest.x+json"),
            "application%2Fvnd.zest.x%2Bjson"
        );
    }
}
