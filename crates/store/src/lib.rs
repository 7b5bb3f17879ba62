//! Where images live: a repository in a registry, or an OCI image layout on disk.
//!
//! Conversion and inspection read and write images the same way whatever holds them,
//! so this module gives both one small interface. Every manifest and blob read through
//! it is verified against its digest (the registry client and the layout reader each
//! check; this crate adds no unverified path).
//!
//! [`source`] answers byte-range reads of one layer blob, whatever holds it
//! ([`BlobSource`]: [`RegistryBlob`], [`FileBlob`]); the fetcher reads through it.

pub mod source;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;

pub use source::{BlobSource, FileBlob, RegistryBlob, SourceError};

use zest_oci::digest::Digest;
use zest_oci::layout::{LayoutError, LayoutRef, OciLayout};
use zest_oci::{
    Descriptor, ImageManifest, ManifestKind, OciJsonError, Platform, Reference, ReferenceError,
};
use zest_registry::{FetchedManifest, RegistryClient, RegistryError, UploadBody};

/// Largest manifest, index or config read into memory.
pub const MAX_JSON_BLOB: u64 = 16 << 20;

/// An image location as a user writes it: `oci:DIR[:TAG]` or a registry reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// An image in a registry.
    Registry(Reference),
    /// An image in an OCI layout directory.
    Layout(LayoutRef),
}

/// A reference that is neither a valid `oci:` layout reference nor a registry reference.
#[derive(Debug, thiserror::Error)]
pub enum ImageRefError {
    /// Bad `oci:` reference.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// Bad registry reference.
    #[error(transparent)]
    Registry(#[from] ReferenceError),
}

impl FromStr for ImageRef {
    type Err = ImageRefError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.starts_with("oci:") {
            Ok(ImageRef::Layout(LayoutRef::parse(s)?))
        } else {
            Ok(ImageRef::Registry(s.parse()?))
        }
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageRef::Registry(r) => r.fmt(f),
            ImageRef::Layout(l) => l.fmt(f),
        }
    }
}

/// Failure to read or write an image.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A registry operation failed (boxed: registry errors carry a lot of context).
    #[error(transparent)]
    Registry(Box<RegistryError>),
    /// An OCI layout operation failed.
    #[error(transparent)]
    Layout(Box<LayoutError>),
    /// A manifest or index is not valid JSON of its type.
    #[error("manifest {digest} of {image}: {source}")]
    Json {
        /// The manifest.
        digest: Digest,
        /// Image.
        image: String,
        /// Cause.
        source: OciJsonError,
    },
    /// An index has no manifest for the platform asked for.
    #[error("{image} has no manifest for platform {platform}; it has: {available}")]
    NoPlatform {
        /// Image.
        image: String,
        /// Requested platform (`os/arch[/variant]`).
        platform: String,
        /// What the index offers.
        available: String,
    },
    /// A blob of the layout could not be copied.
    #[error("copying blob {digest} of {image}: {source}")]
    Io {
        /// Blob.
        digest: Digest,
        /// Image.
        image: String,
        /// Cause.
        source: std::io::Error,
    },
}

impl From<RegistryError> for StoreError {
    fn from(e: RegistryError) -> Self {
        StoreError::Registry(Box::new(e))
    }
}

impl From<LayoutError> for StoreError {
    fn from(e: LayoutError) -> Self {
        StoreError::Layout(Box::new(e))
    }
}

/// An opened image location: where to read the top manifest and blobs from, or
/// where to write them to.
#[derive(Debug, Clone)]
pub enum ImageStore {
    /// A registry repository, with the tag or digest the user named.
    Registry {
        /// Shared client (connections, tokens, counters).
        client: RegistryClient,
        /// The reference.
        reference: Reference,
    },
    /// An OCI layout directory and the tag to read or write.
    Layout {
        /// The layout.
        layout: OciLayout,
        /// Tag (`org.opencontainers.image.ref.name`).
        tag: Option<String>,
        /// The reference as the user wrote it.
        reference: LayoutRef,
    },
}

impl ImageStore {
    /// Opens `image` for reading: a layout must already exist.
    pub fn open(image: &ImageRef, client: &RegistryClient) -> Result<Self, StoreError> {
        Ok(match image {
            ImageRef::Registry(r) => ImageStore::Registry {
                client: client.clone(),
                reference: r.clone(),
            },
            ImageRef::Layout(l) => ImageStore::Layout {
                layout: OciLayout::open(&l.dir)?,
                tag: l.tag.clone(),
                reference: l.clone(),
            },
        })
    }

    /// Opens `image` for writing: a layout is created if missing.
    pub fn create(image: &ImageRef, client: &RegistryClient) -> Result<Self, StoreError> {
        match image {
            ImageRef::Layout(l) if !l.dir.join(zest_oci::layout::OCI_LAYOUT_FILE).exists() => {
                Ok(ImageStore::Layout {
                    layout: OciLayout::create(&l.dir)?,
                    tag: l.tag.clone(),
                    reference: l.clone(),
                })
            }
            _ => Self::open(image, client),
        }
    }

    /// The top-level manifest or index the reference names, verified.
    pub async fn root(&self) -> Result<FetchedManifest, StoreError> {
        match self {
            ImageStore::Registry { client, reference } => {
                Ok(client.get_manifest(reference).await?)
            }
            ImageStore::Layout { layout, tag, .. } => {
                let desc = layout.resolve(tag.as_deref())?;
                self.manifest(&desc).await
            }
        }
    }

    /// The manifest `desc` points at, verified.
    pub async fn manifest(&self, desc: &Descriptor) -> Result<FetchedManifest, StoreError> {
        match self {
            ImageStore::Registry { client, reference } => Ok(client
                .get_manifest_by_descriptor(&reference.repository, desc)
                .await?),
            ImageStore::Layout { layout, .. } => {
                let bytes = layout.read_blob(&desc.digest, MAX_JSON_BLOB.min(desc.size))?;
                Ok(FetchedManifest {
                    media_type: desc.media_type.clone(),
                    bytes: Bytes::from(bytes),
                    digest: desc.digest,
                })
            }
        }
    }

    /// A small blob (config) in memory, verified.
    pub async fn blob_bytes(&self, desc: &Descriptor) -> Result<Bytes, StoreError> {
        let limit = MAX_JSON_BLOB.min(desc.size);
        match self {
            ImageStore::Registry { client, reference } => Ok(client
                .get_blob_bytes(&reference.repository, &desc.digest, limit)
                .await?),
            ImageStore::Layout { layout, .. } => {
                Ok(Bytes::from(layout.read_blob(&desc.digest, limit)?))
            }
        }
    }

    /// Copies blob `desc` into `path`, verified, without holding it in memory.
    pub async fn blob_to_file(&self, desc: &Descriptor, path: &Path) -> Result<(), StoreError> {
        match self {
            ImageStore::Registry { client, reference } => {
                client
                    .get_blob_to_file(&reference.repository, &desc.digest, path)
                    .await?;
                Ok(())
            }
            ImageStore::Layout { layout, .. } => {
                // The layout reader verifies the digest as the copy streams through it.
                let mut reader = layout.open_blob(&desc.digest)?;
                let path = path.to_path_buf();
                let copied = tokio::task::spawn_blocking(move || {
                    let mut out = std::fs::File::create(&path)?;
                    std::io::copy(&mut reader, &mut out)?;
                    out.sync_all()
                })
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                copied.map_err(|source| StoreError::Io {
                    digest: desc.digest,
                    image: self.to_string(),
                    source,
                })
            }
        }
    }

    /// The path of a blob when the store is a layout (no copy needed to read it).
    pub fn local_blob_path(&self, digest: &Digest) -> Option<PathBuf> {
        match self {
            ImageStore::Layout { layout, .. } if layout.has_blob(digest) => {
                Some(layout.blob_path(digest))
            }
            _ => None,
        }
    }

    /// Whether the store already has blob `digest`.
    pub async fn has_blob(&self, digest: &Digest) -> Result<bool, StoreError> {
        match self {
            ImageStore::Registry { client, reference } => Ok(client
                .blob_exists(&reference.repository, digest)
                .await?
                .is_some()),
            ImageStore::Layout { layout, .. } => Ok(layout.has_blob(digest)),
        }
    }

    /// Stores the blob in `path` (whose digest is `digest`). `mount_from` lets a
    /// registry link a blob another repository of the same registry already has.
    pub async fn put_blob_file(
        &self,
        digest: &Digest,
        path: &Path,
        mount_from: Option<&ImageStore>,
    ) -> Result<(), StoreError> {
        match self {
            ImageStore::Registry { client, reference } => {
                let from = match mount_from {
                    Some(ImageStore::Registry { reference: src, .. })
                        if src.repository.registry == reference.repository.registry
                            && src.repository != reference.repository =>
                    {
                        Some(&src.repository)
                    }
                    _ => None,
                };
                client
                    .push_blob(
                        &reference.repository,
                        digest,
                        UploadBody::File(path.to_path_buf()),
                        from,
                    )
                    .await?;
                Ok(())
            }
            ImageStore::Layout { layout, .. } => {
                if layout.has_blob(digest) {
                    return Ok(());
                }
                let path = path.to_path_buf();
                let layout = layout.clone();
                let image = self.to_string();
                let want = *digest;
                let (written, _) = tokio::task::spawn_blocking(move || {
                    let file = std::fs::File::open(&path).map_err(|source| StoreError::Io {
                        digest: want,
                        image,
                        source,
                    })?;
                    Ok::<_, StoreError>(layout.write_blob_from_reader(file)?)
                })
                .await
                .unwrap_or_else(|e| {
                    Err(StoreError::Io {
                        digest: *digest,
                        image: self.to_string(),
                        source: std::io::Error::other(e),
                    })
                })?;
                if written != *digest {
                    return Err(StoreError::Io {
                        digest: *digest,
                        image: self.to_string(),
                        source: std::io::Error::other(format!(
                            "the file's content hashes to {written}: it changed while being stored"
                        )),
                    });
                }
                Ok(())
            }
        }
    }

    /// Stores a small blob (config) from memory; returns its digest.
    pub async fn put_blob_bytes(&self, data: Bytes) -> Result<Digest, StoreError> {
        match self {
            ImageStore::Registry { client, reference } => {
                Ok(client.push_blob_bytes(&reference.repository, data).await?)
            }
            ImageStore::Layout { layout, .. } => Ok(layout.write_blob(&data)?),
        }
    }

    /// Stores a manifest or index. With `tag_it`, the store's tag (registry tag, or the
    /// layout's ref name) points at it; otherwise it is stored by digest only.
    pub async fn put_manifest(
        &self,
        media_type: &str,
        bytes: Bytes,
        tag_it: bool,
        platform: Option<zest_oci::Platform>,
    ) -> Result<Descriptor, StoreError> {
        let mut desc = Descriptor::for_bytes(media_type, &bytes);
        desc.platform = platform;
        match self {
            ImageStore::Registry { client, reference } => {
                let target = match (&reference.tag, tag_it) {
                    (Some(tag), true) => tag.clone(),
                    _ => desc.digest.to_string(),
                };
                client
                    .push_manifest(&reference.repository, &target, media_type, bytes)
                    .await?;
            }
            ImageStore::Layout { layout, tag, .. } => {
                layout.write_blob(&bytes)?;
                if tag_it {
                    layout.add_manifest(desc.clone(), tag.as_deref())?;
                }
            }
        }
        Ok(desc)
    }
}

/// One platform's image manifest, resolved from a reference.
#[derive(Debug, Clone)]
pub struct ResolvedManifest {
    /// Descriptor of the image manifest (digest verified).
    pub descriptor: Descriptor,
    /// The manifest, parsed.
    pub manifest: ImageManifest,
    /// The index the reference named, when it named one.
    pub index: Option<Descriptor>,
}

impl ImageStore {
    /// The image manifest for `platform`: the reference's own manifest, or the
    /// index entry that best matches the platform. From a registry this is
    /// [`RegistryClient::resolve_image`], the one resolver of registry manifests.
    pub async fn resolve(&self, platform: &Platform) -> Result<ResolvedManifest, StoreError> {
        if let ImageStore::Registry { client, reference } = self {
            let resolved = client.resolve_image(reference, platform).await?;
            return Ok(ResolvedManifest {
                descriptor: resolved
                    .entry
                    .unwrap_or_else(|| resolved.manifest.descriptor()),
                manifest: resolved.image,
                index: resolved.index.map(|index| index.descriptor()),
            });
        }
        let root = self.root().await?;
        let json_err = |digest, source| StoreError::Json {
            digest,
            image: self.to_string(),
            source,
        };
        match ManifestKind::parse(&root.media_type, &root.bytes)
            .map_err(|e| json_err(root.digest, e))?
        {
            ManifestKind::Image(manifest) => Ok(ResolvedManifest {
                descriptor: root.descriptor(),
                manifest,
                index: None,
            }),
            ManifestKind::Index(index) => {
                let Some(desc) = index.select(platform).cloned() else {
                    let available = index
                        .manifests
                        .iter()
                        .filter_map(|d| d.platform.as_ref().map(ToString::to_string))
                        .collect::<Vec<_>>()
                        .join(", ");
                    return Err(StoreError::NoPlatform {
                        image: self.to_string(),
                        platform: platform.to_string(),
                        available,
                    });
                };
                let fetched = self.manifest(&desc).await?;
                let manifest = ImageManifest::from_json(&fetched.bytes)
                    .map_err(|e| json_err(fetched.digest, e))?;
                Ok(ResolvedManifest {
                    descriptor: desc,
                    manifest,
                    index: Some(root.descriptor()),
                })
            }
        }
    }

    /// Range reads of layer `layer`'s blob, for the lazy read path.
    pub fn layer_source(&self, layer: &Descriptor) -> Result<Arc<dyn BlobSource>, StoreError> {
        match self {
            ImageStore::Registry { client, reference } => Ok(Arc::new(RegistryBlob::for_layer(
                client.clone(),
                reference.repository.clone(),
                layer,
            ))),
            ImageStore::Layout { layout, .. } => {
                let path = layout.blob_path(&layer.digest);
                let blob = FileBlob::open(&path).map_err(|source| StoreError::Io {
                    digest: layer.digest,
                    image: self.to_string(),
                    source,
                })?;
                Ok(Arc::new(blob))
            }
        }
    }
}

impl std::fmt::Display for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageStore::Registry { reference, .. } => reference.fmt(f),
            ImageStore::Layout { reference, .. } => reference.fmt(f),
        }
    }
}
