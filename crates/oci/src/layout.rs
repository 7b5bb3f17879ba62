//! OCI image layouts on disk: `oci-layout`, `index.json`, `blobs/sha256/<hex>`.
//!
//! References to a layout are written `oci:DIR[:TAG]`; the tag is the
//! `org.opencontainers.image.ref.name` annotation of an `index.json` entry.
//!
//! Invariants: a blob file appears under its digest name only complete and verified
//! (written to a temporary file in the same directory, hashed while written, synced,
//! then renamed); `index.json` is replaced atomically the same way; every read of a
//! blob is checked against its digest ([`OciLayout::read_blob`] before returning,
//! [`BlobReader`] by failing at end of stream), so a corrupted layout yields an error,
//! never wrong data.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::types::{Descriptor, ImageIndex, OciJsonError};
use crate::digest::{Digest, Hasher};

/// Name of the layout marker file.
pub const OCI_LAYOUT_FILE: &str = "oci-layout";
/// Content written to the marker file.
pub const OCI_LAYOUT_CONTENT: &str = r#"{"imageLayoutVersion":"1.0.0"}"#;
/// The annotation naming an index entry (the TAG of `oci:DIR:TAG`).
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// Largest `index.json` or blob read wholesale into memory by [`OciLayout::read_blob`]
/// callers that pass no explicit limit (manifests and configs are far smaller).
pub const DEFAULT_MAX_JSON: u64 = 16 << 20;

/// Errors reading or writing an OCI image layout.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The directory has no `oci-layout` marker.
    #[error("{dir} is not an OCI image layout (no oci-layout file); create one with an image build tool or `zest` conversion output")]
    NotALayout {
        /// The directory.
        dir: PathBuf,
    },
    /// The marker names an unsupported layout version.
    #[error("{dir}: unsupported OCI layout version {version:?} (expected 1.x)")]
    BadVersion {
        /// The directory.
        dir: PathBuf,
        /// The version found.
        version: String,
    },
    /// A JSON document of the layout is malformed.
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: OciJsonError,
    },
    /// A blob's content does not hash to its name.
    #[error("blob {path} is corrupt: expected {expected}, content hashes to {actual}; remove it and copy the image again")]
    DigestMismatch {
        /// The blob file.
        path: PathBuf,
        /// The digest it is stored under.
        expected: Digest,
        /// The digest of its content.
        actual: Digest,
    },
    /// A blob is missing.
    #[error("blob {digest} not found in layout {dir}")]
    BlobNotFound {
        /// The layout directory.
        dir: PathBuf,
        /// The missing digest.
        digest: Digest,
    },
    /// A file is larger than the caller's limit (a bound on memory use).
    #[error("{path} is larger than the {limit} bytes allowed for it")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit.
        limit: u64,
    },
    /// No `index.json` entry carries the requested tag.
    #[error("no image tagged {tag:?} in layout {dir} (tags present: {available})")]
    TagNotFound {
        /// The layout directory.
        dir: PathBuf,
        /// The requested tag.
        tag: String,
        /// Tags that exist, comma-separated.
        available: String,
    },
    /// No tag given and the index does not hold exactly one manifest.
    #[error("layout {dir} holds {count} images; name one as oci:{dir}:TAG")]
    Ambiguous {
        /// The layout directory.
        dir: PathBuf,
        /// How many entries `index.json` has.
        count: usize,
    },
    /// A string that is not `oci:DIR[:TAG]`.
    #[error("invalid OCI layout reference {input:?}: expected oci:DIR[:TAG]")]
    InvalidRef {
        /// The rejected input.
        input: String,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LayoutError + 'a {
    move |source| LayoutError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// A reference to an image in a layout: `oci:DIR[:TAG]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutRef {
    /// The layout directory.
    pub dir: PathBuf,
    /// The `org.opencontainers.image.ref.name` of the entry, if given.
    pub tag: Option<String>,
}

impl LayoutRef {
    /// Parses `oci:DIR[:TAG]`; the first `:` after the prefix separates the tag, as
    /// in other tools that use this syntax.
    pub fn parse(input: &str) -> Result<Self, LayoutError> {
        let err = || LayoutError::InvalidRef {
            input: input.chars().take(300).collect(),
        };
        let rest = input.strip_prefix("oci:").ok_or_else(err)?;
        let (dir, tag) = match rest.split_once(':') {
            Some((d, t)) => (d, Some(t)),
            None => (rest, None),
        };
        if dir.is_empty() || tag.is_some_and(|t| t.is_empty() || t.contains('\0')) {
            return Err(err());
        }
        Ok(LayoutRef {
            dir: PathBuf::from(dir),
            tag: tag.map(str::to_string),
        })
    }
}

impl std::fmt::Display for LayoutRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "oci:{}", self.dir.display())?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        Ok(())
    }
}

/// An OCI image layout directory.
#[derive(Debug, Clone)]
pub struct OciLayout {
    dir: PathBuf,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh temporary file name in `dir` (unique per process and call).
fn temp_path(dir: &Path) -> PathBuf {
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(
        ".tmp-{}-{n}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ))
}

/// Writes `data` to `path` atomically: temp file in the same directory, fsync, rename.
fn atomic_write(path: &Path, data: &[u8]) -> Result<(), LayoutError> {
    let parent = path.parent().unwrap_or(Path::new("."));
    let tmp = temp_path(parent);
    let result = (|| {
        let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
        f.write_all(data).map_err(io_err("write", &tmp))?;
        f.sync_data().map_err(io_err("sync", &tmp))?;
        fs::rename(&tmp, path).map_err(io_err("rename into place", path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

impl OciLayout {
    /// Opens an existing layout, checking its marker file.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, LayoutError> {
        let dir = dir.into();
        let marker = dir.join(OCI_LAYOUT_FILE);
        let text = match fs::read(&marker) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(LayoutError::NotALayout { dir })
            }
            Err(e) => return Err(io_err("read", &marker)(e)),
        };
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Marker {
            image_layout_version: String,
        }
        let m: Marker = serde_json::from_slice(&text).map_err(|source| LayoutError::Json {
            path: marker.clone(),
            source: OciJsonError::Json {
                what: "oci-layout",
                source,
            },
        })?;
        if !m.image_layout_version.starts_with("1.") {
            return Err(LayoutError::BadVersion {
                dir,
                version: m.image_layout_version,
            });
        }
        Ok(OciLayout { dir })
    }

    /// Opens the layout at `dir`, creating the directory, marker, empty index and blob
    /// directory as needed.
    pub fn create(dir: impl Into<PathBuf>) -> Result<Self, LayoutError> {
        let dir = dir.into();
        let blobs = dir.join("blobs").join("sha256");
        fs::create_dir_all(&blobs).map_err(io_err("create directory", &blobs))?;
        let marker = dir.join(OCI_LAYOUT_FILE);
        if !marker.exists() {
            atomic_write(&marker, OCI_LAYOUT_CONTENT.as_bytes())?;
        }
        let layout = OciLayout::open(dir)?;
        if !layout.index_path().exists() {
            layout.write_index(&ImageIndex::new())?;
        }
        Ok(layout)
    }

    /// The layout directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn index_path(&self) -> PathBuf {
        self.dir.join("index.json")
    }

    /// Where the blob `digest` is (or would be) stored.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs").join("sha256").join(digest.hex())
    }

    /// Whether a blob file exists for `digest` (content not checked).
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Reads `index.json`.
    pub fn index(&self) -> Result<ImageIndex, LayoutError> {
        let path = self.index_path();
        let bytes = read_limited(&path, DEFAULT_MAX_JSON)?;
        ImageIndex::from_json(&bytes).map_err(|source| LayoutError::Json { path, source })
    }

    /// Replaces `index.json` atomically.
    pub fn write_index(&self, index: &ImageIndex) -> Result<(), LayoutError> {
        atomic_write(&self.index_path(), &index.to_json())
    }

    /// Stores `data` as a blob and returns its digest. An existing blob of the right
    /// size is kept (content is checked on every read); one of another size, left by
    /// corruption, is replaced.
    pub fn write_blob(&self, data: &[u8]) -> Result<Digest, LayoutError> {
        let digest = Digest::of(data);
        let path = self.blob_path(&digest);
        let present =
            fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() == data.len() as u64);
        if !present {
            atomic_write(&path, data)?;
        }
        Ok(digest)
    }

    /// Streams `reader` into a blob, hashing on the way; returns its digest and size.
    /// Memory use is one copy buffer whatever the blob size.
    pub fn write_blob_from_reader(
        &self,
        mut reader: impl Read,
    ) -> Result<(Digest, u64), LayoutError> {
        let blobs = self.dir.join("blobs").join("sha256");
        let tmp = temp_path(&blobs);
        let result = (|| {
            let mut file = File::create(&tmp).map_err(io_err("create", &tmp))?;
            let mut hasher = Hasher::new();
            let mut buf = vec![0u8; 256 * 1024];
            let mut size = 0u64;
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(io_err("read blob source for", &tmp)(e)),
                };
                hasher.update(&buf[..n]);
                file.write_all(&buf[..n]).map_err(io_err("write", &tmp))?;
                size += n as u64;
            }
            file.sync_data().map_err(io_err("sync", &tmp))?;
            let digest = hasher.finish();
            let path = self.blob_path(&digest);
            fs::rename(&tmp, &path).map_err(io_err("rename into place", &path))?;
            Ok((digest, size))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Reads a whole blob of at most `limit` bytes, verified against `digest`.
    pub fn read_blob(&self, digest: &Digest, limit: u64) -> Result<Vec<u8>, LayoutError> {
        let path = self.blob_path(digest);
        let data = match read_limited(&path, limit) {
            Err(LayoutError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Err(LayoutError::BlobNotFound {
                    dir: self.dir.clone(),
                    digest: *digest,
                })
            }
            other => other?,
        };
        let actual = Digest::of(&data);
        if actual != *digest {
            return Err(LayoutError::DigestMismatch {
                path,
                expected: *digest,
                actual,
            });
        }
        Ok(data)
    }

    /// Opens a blob for streaming; the reader fails at end of stream if the content
    /// does not hash to `digest`, so consumers must read to the end before trusting it.
    pub fn open_blob(&self, digest: &Digest) -> Result<BlobReader, LayoutError> {
        let path = self.blob_path(digest);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(LayoutError::BlobNotFound {
                    dir: self.dir.clone(),
                    digest: *digest,
                })
            }
            Err(e) => return Err(io_err("open", &path)(e)),
        };
        Ok(BlobReader {
            inner: file,
            hasher: Some(Hasher::new()),
            expected: *digest,
            path,
        })
    }

    /// Adds a manifest to `index.json`. With a tag, the entry gets the ref-name
    /// annotation and any other entry with that tag is dropped (the tag moves); an
    /// identical untagged entry is not duplicated.
    pub fn add_manifest(&self, mut desc: Descriptor, tag: Option<&str>) -> Result<(), LayoutError> {
        let mut index = self.index()?;
        match tag {
            Some(t) => {
                desc.annotations
                    .insert(REF_NAME_ANNOTATION.to_string(), t.to_string());
                index.manifests.retain(|d| {
                    d.annotations.get(REF_NAME_ANNOTATION).map(String::as_str) != Some(t)
                });
            }
            None => {
                desc.annotations.remove(REF_NAME_ANNOTATION);
                index.manifests.retain(|d| {
                    d.digest != desc.digest || d.annotations.contains_key(REF_NAME_ANNOTATION)
                });
            }
        }
        index.manifests.push(desc);
        self.write_index(&index)
    }

    /// The index entry for `tag`, or the only entry when `tag` is `None`.
    pub fn resolve(&self, tag: Option<&str>) -> Result<Descriptor, LayoutError> {
        let index = self.index()?;
        match tag {
            Some(t) => index
                .manifests
                .iter()
                .find(|d| d.annotations.get(REF_NAME_ANNOTATION).map(String::as_str) == Some(t))
                .cloned()
                .ok_or_else(|| LayoutError::TagNotFound {
                    dir: self.dir.clone(),
                    tag: t.to_string(),
                    available: index
                        .manifests
                        .iter()
                        .filter_map(|d| d.annotations.get(REF_NAME_ANNOTATION).cloned())
                        .collect::<Vec<_>>()
                        .join(", "),
                }),
            None => match index.manifests.as_slice() {
                [one] => Ok(one.clone()),
                all => Err(LayoutError::Ambiguous {
                    dir: self.dir.clone(),
                    count: all.len(),
                }),
            },
        }
    }
}

/// Reads at most `limit` bytes of `path`, failing if the file is larger.
fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, LayoutError> {
    let file = File::open(path).map_err(io_err("open", path))?;
    let mut data = Vec::new();
    file.take(limit.saturating_add(1))
        .read_to_end(&mut data)
        .map_err(io_err("read", path))?;
    if data.len() as u64 > limit {
        return Err(LayoutError::TooLarge {
            path: path.to_path_buf(),
            limit,
        });
    }
    Ok(data)
}

/// A blob being read from a layout; returns an `InvalidData` error instead of
/// end-of-file if the content does not match its digest.
pub struct BlobReader {
    inner: File,
    hasher: Option<Hasher>,
    expected: Digest,
    path: PathBuf,
}

impl std::fmt::Debug for BlobReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobReader")
            .field("path", &self.path)
            .field("expected", &self.expected)
            .finish()
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            if let Some(h) = self.hasher.as_mut() {
                h.update(&buf[..n]);
            }
            return Ok(n);
        }
        if !buf.is_empty() {
            if let Some(h) = self.hasher.take() {
                let actual = h.finish();
                if actual != self.expected {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "blob {} is corrupt: expected {}, content hashes to {actual}",
                            self.path.display(),
                            self.expected
                        ),
                    ));
                }
            }
        }
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media_type;

    #[test]
    fn layout_ref_parsing() {
        let r = LayoutRef::parse("oci:/tmp/img:v1").unwrap();
        assert_eq!(r.dir, PathBuf::from("/tmp/img"));
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.to_string(), "oci:/tmp/img:v1");
        let r = LayoutRef::parse("oci:rel/dir").unwrap();
        assert_eq!(r.tag, None);
        for bad in ["", "oci:", "docker://x", "oci::tag", "oci:dir:"] {
            assert!(LayoutRef::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn blobs_index_and_tags() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("img");
        assert!(matches!(
            OciLayout::open(&dir),
            Err(LayoutError::NotALayout { .. })
        ));
        let layout = OciLayout::create(&dir).unwrap();
        let d = layout.write_blob(b"hello").unwrap();
        assert_eq!(d, Digest::of(b"hello"));
        assert_eq!(layout.read_blob(&d, 100).unwrap(), b"hello");
        assert!(matches!(
            layout.read_blob(&d, 3),
            Err(LayoutError::TooLarge { .. })
        ));
        let (d2, n) = layout.write_blob_from_reader(&b"streamed"[..]).unwrap();
        assert_eq!((d2, n), (Digest::of(b"streamed"), 8));
        let mut s = String::new();
        layout
            .open_blob(&d2)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "streamed");
        let missing = Digest::of(b"missing");
        assert!(matches!(
            layout.read_blob(&missing, 10),
            Err(LayoutError::BlobNotFound { .. })
        ));

        // A truncated blob is replaced by a new write.
        fs::write(layout.blob_path(&d), b"hel").unwrap();
        layout.write_blob(b"hello").unwrap();
        assert_eq!(layout.read_blob(&d, 100).unwrap(), b"hello");
        // Corruption is detected on both read paths.
        fs::write(layout.blob_path(&d), b"HELLO").unwrap();
        assert!(matches!(
            layout.read_blob(&d, 100),
            Err(LayoutError::DigestMismatch { .. })
        ));
        let mut v = Vec::new();
        let err = layout
            .open_blob(&d)
            .unwrap()
            .read_to_end(&mut v)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);

        // Tags move; the untagged only entry resolves.
        let m1 = Descriptor::new(media_type::OCI_MANIFEST, Digest::of(b"m1"), 2);
        let m2 = Descriptor::new(media_type::OCI_MANIFEST, Digest::of(b"m2"), 2);
        assert!(matches!(
            layout.resolve(None),
            Err(LayoutError::Ambiguous { count: 0, .. })
        ));
        layout.add_manifest(m1.clone(), Some("v1")).unwrap();
        assert_eq!(layout.resolve(None).unwrap().digest, m1.digest);
        layout.add_manifest(m2.clone(), Some("v1")).unwrap();
        layout.add_manifest(m1.clone(), Some("old")).unwrap();
        assert_eq!(layout.resolve(Some("v1")).unwrap().digest, m2.digest);
        assert_eq!(layout.resolve(Some("old")).unwrap().digest, m1.digest);
        let err = layout.resolve(Some("nope")).unwrap_err().to_string();
        assert!(err.contains("v1") && err.contains("old"), "{err}");
        assert_eq!(layout.index().unwrap().manifests.len(), 2);
        // No temporary files are left behind.
        let leftovers = fs::read_dir(dir.join("blobs/sha256"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(".tmp")
            })
            .count();
        assert_eq!(leftovers, 0);
        // Reopening checks the marker.
        fs::write(
            dir.join(OCI_LAYOUT_FILE),
            r#"{"imageLayoutVersion":"2.0.0"}"#,
        )
        .unwrap();
        assert!(matches!(
            OciLayout::open(&dir),
            Err(LayoutError::BadVersion { .. })
        ));
    }
}
