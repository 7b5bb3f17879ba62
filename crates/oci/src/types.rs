//! Typed views of descriptors, image manifests, indexes and image configurations.
//!
//! Manifests and indexes keep fields they do not model in a flattened `extra` map so a
//! parse + serialise cycle loses nothing. The image configuration is kept entirely as a
//! JSON value with typed accessors, because runtimes read fields zest never looks at.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

use super::media_type;
use super::platform::Platform;
use crate::digest::Digest;

/// A malformed OCI/Docker JSON document.
#[derive(Debug, thiserror::Error)]
pub enum OciJsonError {
    /// Not valid JSON for the expected structure.
    #[error("invalid {what} JSON: {source}")]
    Json {
        /// Which document (manifest, index, config, ...).
        what: &'static str,
        /// The parser's error, with line and column.
        #[source]
        source: serde_json::Error,
    },
    /// `schemaVersion` is not 2.
    #[error("unsupported {what} schemaVersion {found}: only schema version 2 is supported (Docker schema 1 images must be converted by re-pushing them with a current tool)")]
    SchemaVersion {
        /// Which document.
        what: &'static str,
        /// The version found.
        found: u64,
    },
    /// A document whose media type is neither an image manifest nor an index.
    #[error("unsupported manifest media type {media_type:?}: expected an OCI/Docker image manifest or index")]
    UnsupportedMediaType {
        /// The media type that was given or found in the document.
        media_type: String,
    },
    /// A field holds a value of the wrong shape.
    #[error("invalid {what}: field {field}: {detail}")]
    BadField {
        /// Which document.
        what: &'static str,
        /// JSON path of the field.
        field: &'static str,
        /// What is wrong.
        detail: String,
    },
}

/// Accepts `null` where a JSON collection is expected (some producers write it).
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `bytes` parsed as JSON of a `what`.
fn parse<T: DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T, OciJsonError> {
    serde_json::from_slice(bytes).map_err(|source| OciJsonError::Json { what, source })
}

/// Fails unless `found` is 2, the only schema version of manifests and indexes.
fn check_schema_v2(what: &'static str, found: u64) -> Result<(), OciJsonError> {
    if found != 2 {
        return Err(OciJsonError::SchemaVersion { what, found });
    }
    Ok(())
}

/// A content descriptor: media type, digest and size of a blob or manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the referenced content.
    pub media_type: String,
    /// sha256 digest of the referenced content.
    pub digest: Digest,
    /// Size in bytes of the referenced content.
    pub size: u64,
    /// Alternative download URLs (foreign layers).
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub urls: Vec<String>,
    /// Arbitrary metadata (zstd:chunked TOC positions live here).
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub annotations: BTreeMap<String, String>,
    /// The platform of a manifest referenced from an index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Artifact type of a referenced artifact manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// Fields zest does not model (e.g. embedded `data`), kept for round trips.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Descriptor {
    /// A descriptor with only the required fields.
    pub fn new(media_type: impl Into<String>, digest: Digest, size: u64) -> Self {
        Descriptor {
            media_type: media_type.into(),
            digest,
            size,
            urls: Vec::new(),
            annotations: BTreeMap::new(),
            platform: None,
            artifact_type: None,
            extra: serde_json::Map::new(),
        }
    }

    /// The descriptor of `data` with `media_type`.
    pub fn for_bytes(media_type: impl Into<String>, data: &[u8]) -> Self {
        Descriptor::new(media_type, Digest::of(data), data.len() as u64)
    }
}

/// An OCI image manifest or Docker v2 schema 2 manifest (same JSON shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    /// Always 2.
    pub schema_version: u64,
    /// The manifest's own media type (required by Docker, recommended by OCI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// Artifact type, for artifact manifests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// The image configuration blob.
    pub config: Descriptor,
    /// Layer blobs, base first.
    #[serde(default, deserialize_with = "null_as_default")]
    pub layers: Vec<Descriptor>,
    /// The manifest this one refers to (referrers API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    /// Arbitrary metadata.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub annotations: BTreeMap<String, String>,
    /// Fields zest does not model, kept for round trips.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ImageManifest {
    /// Parses and validates (schema version 2) a manifest.
    pub fn from_json(bytes: &[u8]) -> Result<Self, OciJsonError> {
        let m: ImageManifest = parse(bytes, "image manifest")?;
        check_schema_v2("image manifest", m.schema_version)?;
        Ok(m)
    }

    /// Serialises the manifest (compact JSON). The result has a new digest whenever
    /// anything changed; callers publish it with its new descriptor.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The media type to publish this manifest under: its own `mediaType`, else OCI.
    pub fn effective_media_type(&self) -> &str {
        self.media_type
            .as_deref()
            .unwrap_or(media_type::OCI_MANIFEST)
    }
}

/// An OCI image index or Docker manifest list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    /// Always 2.
    pub schema_version: u64,
    /// The index's own media type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// Artifact type, for artifact indexes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// The manifests, usually one per platform.
    #[serde(default, deserialize_with = "null_as_default")]
    pub manifests: Vec<Descriptor>,
    /// The manifest this one refers to (referrers API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    /// Arbitrary metadata.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub annotations: BTreeMap<String, String>,
    /// Fields zest does not model, kept for round trips.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ImageIndex {
    /// An empty OCI index.
    pub fn new() -> Self {
        ImageIndex {
            schema_version: 2,
            media_type: Some(media_type::OCI_INDEX.to_string()),
            artifact_type: None,
            manifests: Vec::new(),
            subject: None,
            annotations: BTreeMap::new(),
            extra: serde_json::Map::new(),
        }
    }

    /// Parses and validates (schema version 2) an index.
    pub fn from_json(bytes: &[u8]) -> Result<Self, OciJsonError> {
        let m: ImageIndex = parse(bytes, "image index")?;
        check_schema_v2("image index", m.schema_version)?;
        Ok(m)
    }

    /// Serialises the index (compact JSON).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The image manifest best suited to `platform`: the closest platform match among
    /// entries that are image manifests; an entry without a platform is taken only when
    /// nothing matches explicitly (single-entry indexes written by some tools). Among
    /// equal matches the first entry wins, as in the index order.
    pub fn select(&self, platform: &Platform) -> Option<&Descriptor> {
        let mut best: Option<(u32, &Descriptor)> = None;
        for d in &self.manifests {
            if !media_type::is_image_manifest(&d.media_type) {
                continue;
            }
            let rank = match &d.platform {
                Some(p) => match platform.match_rank(p) {
                    Some(r) => r,
                    None => continue,
                },
                None => u32::MAX,
            };
            if best.is_none_or(|(r, _)| rank < r) {
                best = Some((rank, d));
            }
        }
        best.map(|(_, d)| d)
    }
}

impl Default for ImageIndex {
    fn default() -> Self {
        Self::new()
    }
}

/// A parsed manifest of either kind.
// Values are short-lived (one per resolve), so the size difference does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum ManifestKind {
    /// A single-platform image manifest.
    Image(ImageManifest),
    /// A multi-platform index.
    Index(ImageIndex),
}

impl ManifestKind {
    /// Parses `bytes` according to `media_type`. When the media type is missing or
    /// generic (`application/json`, `application/octet-stream`, as some servers send),
    /// the document's own `mediaType`, else its shape, decides.
    pub fn parse(media_type: &str, bytes: &[u8]) -> Result<Self, OciJsonError> {
        let mt = media_type::essence(media_type);
        if media_type::is_index(mt) {
            return ImageIndex::from_json(bytes).map(Self::Index);
        }
        if media_type::is_image_manifest(mt) {
            return ImageManifest::from_json(bytes).map(Self::Image);
        }
        if !(mt.is_empty() || mt == "application/json" || mt == "application/octet-stream") {
            return Err(OciJsonError::UnsupportedMediaType {
                media_type: mt.to_string(),
            });
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Probe {
            media_type: Option<String>,
            manifests: Option<serde::de::IgnoredAny>,
            layers: Option<serde::de::IgnoredAny>,
        }
        let probe: Probe = parse(bytes, "manifest")?;
        match probe.media_type.as_deref() {
            Some(t) if media_type::is_index(t) => ImageIndex::from_json(bytes).map(Self::Index),
            Some(t) if media_type::is_image_manifest(t) => {
                ImageManifest::from_json(bytes).map(Self::Image)
            }
            Some(t) => Err(OciJsonError::UnsupportedMediaType {
                media_type: t.to_string(),
            }),
            None if probe.manifests.is_some() => ImageIndex::from_json(bytes).map(Self::Index),
            None if probe.layers.is_some() => ImageManifest::from_json(bytes).map(Self::Image),
            None => Err(OciJsonError::UnsupportedMediaType {
                media_type: mt.to_string(),
            }),
        }
    }
}

/// An image configuration, kept as raw JSON so unknown fields survive a rewrite.
///
/// Only `architecture`, `os`, `variant`, `config.Entrypoint`, `config.Cmd` and
/// `rootfs.diff_ids` are typed. A parse + serialise cycle preserves every field and
/// value (key order may change, which changes the digest; a rewritten config is always
/// published under its new digest).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageConfig {
    raw: serde_json::Map<String, serde_json::Value>,
}

impl ImageConfig {
    /// Parses a configuration blob; it must be a JSON object.
    pub fn from_json(bytes: &[u8]) -> Result<Self, OciJsonError> {
        match parse(bytes, "image config")? {
            serde_json::Value::Object(raw) => Ok(ImageConfig { raw }),
            _ => Err(OciJsonError::BadField {
                what: "image config",
                field: "(root)",
                detail: "expected a JSON object".into(),
            }),
        }
    }

    /// Serialises the configuration (compact JSON).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.raw).unwrap_or_default()
    }

    /// The whole document.
    pub fn as_json(&self) -> &serde_json::Map<String, serde_json::Value> {
        &self.raw
    }

    fn str_field(&self, key: &str) -> Option<&str> {
        self.raw.get(key).and_then(|v| v.as_str())
    }

    /// `architecture`.
    pub fn architecture(&self) -> Option<&str> {
        self.str_field("architecture")
    }

    /// `os`.
    pub fn os(&self) -> Option<&str> {
        self.str_field("os")
    }

    /// `variant`.
    pub fn variant(&self) -> Option<&str> {
        self.str_field("variant")
    }

    /// The platform the image declares, if `os` and `architecture` are present.
    pub fn platform(&self) -> Option<Platform> {
        Some(Platform::new(
            self.os()?,
            self.architecture()?,
            self.variant(),
        ))
    }

    fn string_list(&self, key: &'static str) -> Result<Option<Vec<String>>, OciJsonError> {
        let Some(v) = self.raw.get("config").and_then(|c| c.get(key)) else {
            return Ok(None);
        };
        if v.is_null() {
            return Ok(None);
        }
        serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|e| OciJsonError::BadField {
                what: "image config",
                field: if key == "Cmd" {
                    "config.Cmd"
                } else {
                    "config.Entrypoint"
                },
                detail: e.to_string(),
            })
    }

    /// `config.Entrypoint`, `None` when absent or null.
    pub fn entrypoint(&self) -> Result<Option<Vec<String>>, OciJsonError> {
        self.string_list("Entrypoint")
    }

    /// `config.Cmd`, `None` when absent or null.
    pub fn cmd(&self) -> Result<Option<Vec<String>>, OciJsonError> {
        self.string_list("Cmd")
    }

    /// `config.Env` as (name, value) pairs, in order; entries without `=`
    /// and values that are not strings are skipped.
    pub fn env(&self) -> Vec<(String, String)> {
        self.raw
            .get("config")
            .and_then(|c| c.get("Env"))
            .and_then(|e| e.as_array())
            .map(|list| {
                list.iter()
                    .filter_map(|v| v.as_str())
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `config.WorkingDir` when it is an absolute path.
    pub fn working_dir(&self) -> Option<&str> {
        self.raw
            .get("config")
            .and_then(|c| c.get("WorkingDir"))
            .and_then(|w| w.as_str())
            .filter(|w| w.starts_with('/'))
    }

    /// `rootfs.diff_ids`: digests of the uncompressed layers, base first.
    pub fn diff_ids(&self) -> Result<Vec<Digest>, OciJsonError> {
        let Some(ids) = self.raw.get("rootfs").and_then(|r| r.get("diff_ids")) else {
            return Ok(Vec::new());
        };
        if ids.is_null() {
            return Ok(Vec::new());
        }
        serde_json::from_value(ids.clone()).map_err(|e| OciJsonError::BadField {
            what: "image config",
            field: "rootfs.diff_ids",
            detail: e.to_string(),
        })
    }

    /// Replaces `rootfs.diff_ids` (creating `rootfs` with `type: layers` if missing),
    /// leaving every other field untouched.
    pub fn set_diff_ids(&mut self, ids: &[Digest]) {
        let list: Vec<serde_json::Value> = ids
            .iter()
            .map(|d| serde_json::Value::String(d.to_string()))
            .collect();
        let rootfs = self
            .raw
            .entry("rootfs")
            .or_insert_with(|| serde_json::json!({"type": "layers"}));
        if !rootfs.is_object() {
            *rootfs = serde_json::json!({"type": "layers"});
        }
        if let Some(obj) = rootfs.as_object_mut() {
            obj.insert("diff_ids".into(), serde_json::Value::Array(list));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    fn manifest_json() -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"{}","digest":"{D1}","size":7}},
            "layers":[{{"mediaType":"{}","digest":"{D1}","size":5,"annotations":{{"a":"b"}},"data":"aGVsbG8="}}],
            "x-vendor":{{"k":[1,2]}}}}"#,
            media_type::OCI_MANIFEST,
            media_type::OCI_CONFIG,
            media_type::OCI_LAYER_ZSTD
        )
    }

    #[test]
    fn manifest_round_trip_keeps_unknown_fields() {
        let m = ImageManifest::from_json(manifest_json().as_bytes()).unwrap();
        assert_eq!(m.layers.len(), 1);
        assert_eq!(m.layers[0].annotations["a"], "b");
        let back: serde_json::Value = serde_json::from_slice(&m.to_json()).unwrap();
        let orig: serde_json::Value = serde_json::from_str(&manifest_json()).unwrap();
        assert_eq!(back, orig);
    }

    #[test]
    fn manifest_rejects_bad_input() {
        let v1 = manifest_json().replace("\"schemaVersion\":2", "\"schemaVersion\":1");
        assert!(matches!(
            ImageManifest::from_json(v1.as_bytes()),
            Err(OciJsonError::SchemaVersion { found: 1, .. })
        ));
        let bad_digest = manifest_json().replace(D1, "sha256:abc");
        assert!(ImageManifest::from_json(bad_digest.as_bytes()).is_err());
        assert!(ImageManifest::from_json(b"[]").is_err());
        assert!(ImageManifest::from_json(b"").is_err());
    }

    #[test]
    fn parse_by_kind_and_sniffing() {
        let m = manifest_json();
        assert!(matches!(
            ManifestKind::parse(media_type::OCI_MANIFEST, m.as_bytes()),
            Ok(ManifestKind::Image(_))
        ));
        assert!(matches!(
            ManifestKind::parse("application/json", m.as_bytes()),
            Ok(ManifestKind::Image(_))
        ));
        let idx = r#"{"schemaVersion":2,"manifests":[]}"#;
        assert!(matches!(
            ManifestKind::parse("", idx.as_bytes()),
            Ok(ManifestKind::Index(_))
        ));
        assert!(matches!(
            ManifestKind::parse("text/html", idx.as_bytes()),
            Err(OciJsonError::UnsupportedMediaType { .. })
        ));
    }

    #[test]
    fn index_selects_platform() {
        let entry = |arch: &str, variant: Option<&str>| {
            let mut d = Descriptor::new(media_type::OCI_MANIFEST, Digest::of(arch.as_bytes()), 1);
            d.platform = Some(Platform::new("linux", arch, variant));
            d
        };
        let mut idx = ImageIndex::new();
        idx.manifests.push(entry("amd64", None));
        idx.manifests.push(entry("arm", Some("v6")));
        idx.manifests.push(entry("arm", Some("v7")));
        idx.manifests.push(entry("arm64", Some("v8")));
        let mut attest = Descriptor::new(media_type::OCI_MANIFEST, Digest::of(b"att"), 1);
        attest.platform = Some(Platform::new("unknown", "unknown", None));
        idx.manifests.push(attest);
        let pick = |s: &str| idx.select(&s.parse().unwrap()).map(|d| d.digest);
        assert_eq!(pick("linux/amd64"), Some(Digest::of(b"amd64")));
        assert_eq!(pick("linux/arm64"), Some(Digest::of(b"arm64")));
        assert_eq!(pick("linux/arm/v7"), Some(Digest::of(b"arm")));
        assert_eq!(pick("linux/s390x"), None);
        let json = idx.to_json();
        assert_eq!(ImageIndex::from_json(&json).unwrap(), idx);
    }

    #[test]
    fn config_typed_view_and_rewrite() {
        let json = format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"Entrypoint":["/bin/sh"],"Cmd":null,"Env":["A=1"]}},
            "rootfs":{{"type":"layers","diff_ids":["{D1}"]}},"history":[{{"created_by":"x"}}],"zz-unknown":1.5}}"#
        );
        let mut c = ImageConfig::from_json(json.as_bytes()).unwrap();
        assert_eq!(c.platform().unwrap().to_string(), "linux/amd64");
        assert_eq!(c.entrypoint().unwrap(), Some(vec!["/bin/sh".to_string()]));
        assert_eq!(c.cmd().unwrap(), None);
        assert_eq!(c.diff_ids().unwrap(), vec![D1.parse::<Digest>().unwrap()]);
        let new = Digest::of(b"new");
        c.set_diff_ids(&[new]);
        let back: serde_json::Value = serde_json::from_slice(&c.to_json()).unwrap();
        let mut expect: serde_json::Value = serde_json::from_str(&json).unwrap();
        expect["rootfs"]["diff_ids"] = serde_json::json!([new.to_string()]);
        assert_eq!(back, expect);
        assert!(ImageConfig::from_json(b"[1]").is_err());
        let bad = ImageConfig::from_json(br#"{"rootfs":{"diff_ids":["nope"]}}"#).unwrap();
        assert!(bad.diff_ids().is_err());
    }
}
