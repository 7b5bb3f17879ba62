//! Learned start-up profiles: which files an image's container read first, in
//! order, so that the next cold start can fetch them at mount time.
//!
//! A profile is a small JSON document published beside the image (never inside
//! it) and kept locally; it names the image manifest it was learned from and lists
//! `(layer digest, path)` entries in first-read order. Profiles come from other
//! nodes through a registry, so [`StartupProfile::decode`] treats the bytes as
//! hostile: size, entry count and path length are capped, paths must be clean
//! relative paths (they are looked up in a layer index, never on disk), and an
//! entry may not repeat. Only a value that passed every check exists as a
//! [`StartupProfile`]; a profile built in memory is checked the same way.
//!
//! A profile gives no byte of file data: it only says what to fetch early, and
//! every chunk fetched because of it is verified like any other read.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use zest_oci::digest::Digest;

use crate::error::trunc;

/// Media type of the profile document (also the OCI artifact type of the
/// manifest that publishes it).
pub const PROFILE_MEDIA_TYPE: &str = "application/vnd.zest.startup-profile.v1+json";

/// The only document version this code reads and writes.
pub const PROFILE_SCHEMA_VERSION: u32 = 1;

/// Largest encoded profile accepted, in bytes.
pub const MAX_PROFILE_BYTES: u64 = 4 << 20;

/// Most entries a profile may hold.
pub const MAX_PROFILE_ENTRIES: usize = 32 * 1024;

/// Longest path accepted in an entry, in bytes (Linux's `PATH_MAX`).
pub const MAX_PROFILE_PATH: usize = 4096;

/// Why a profile was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// More bytes than [`MAX_PROFILE_BYTES`].
    #[error("start-up profile is {size} bytes, more than the {MAX_PROFILE_BYTES}-byte limit; it is ignored (the image still starts, without profile prefetch)")]
    TooLarge {
        /// Size of the document.
        size: u64,
    },
    /// Not the expected JSON document.
    #[error("start-up profile is not a valid profile document: {reason}; it is ignored")]
    Malformed {
        /// What the parser or a check said.
        reason: String,
    },
    /// Another version than [`PROFILE_SCHEMA_VERSION`] or another media type.
    #[error("start-up profile has schemaVersion {version} and mediaType {media_type:?}; this zest reads version {PROFILE_SCHEMA_VERSION} of {PROFILE_MEDIA_TYPE}")]
    Unsupported {
        /// The version found.
        version: u32,
        /// The media type found (truncated).
        media_type: String,
    },
    /// More entries than [`MAX_PROFILE_ENTRIES`].
    #[error("start-up profile has {count} entries, more than the {MAX_PROFILE_ENTRIES} limit; it is ignored")]
    TooManyEntries {
        /// Entries found.
        count: usize,
    },
    /// A path that is not a clean relative path.
    #[error("start-up profile entry {position} has an unusable path {path:?}: {reason}; the profile is ignored")]
    BadPath {
        /// Position of the entry.
        position: usize,
        /// The path (truncated).
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The same layer and path twice.
    #[error("start-up profile lists {path:?} of layer {layer} twice (entry {position}); the profile is ignored")]
    Duplicate {
        /// Position of the repeated entry.
        position: usize,
        /// The layer.
        layer: Digest,
        /// The path (truncated).
        path: String,
    },
    /// Learned from another image than the one it is used for.
    #[error("start-up profile belongs to image manifest {found}, not {expected}; it is ignored")]
    WrongImage {
        /// The manifest digest the caller expected.
        expected: Digest,
        /// The one the profile names.
        found: Digest,
    },
}

/// One file of a profile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileEntry {
    /// Digest of the layer blob the file was read from.
    pub layer: Digest,
    /// Path of the file in that layer, relative to its root, `/`-separated.
    pub path: String,
    /// Milliseconds from the first mount of the image to the first read, when
    /// known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ms: Option<u64>,
}

/// The document as it is encoded.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Document {
    schema_version: u32,
    media_type: String,
    image: Digest,
    entries: Vec<ProfileEntry>,
}

/// A validated start-up profile of one image manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartupProfile {
    image: Digest,
    entries: Vec<ProfileEntry>,
}

impl StartupProfile {
    /// A profile of image manifest `image`, with `entries` in first-read order;
    /// checked like a decoded one.
    pub fn new(image: Digest, entries: Vec<ProfileEntry>) -> Result<Self, ProfileError> {
        check_entries(&entries)?;
        Ok(StartupProfile { image, entries })
    }

    /// Decodes and validates `bytes` (see the module docs for the checks).
    pub fn decode(bytes: &[u8]) -> Result<Self, ProfileError> {
        let size = bytes.len() as u64;
        if size > MAX_PROFILE_BYTES {
            return Err(ProfileError::TooLarge { size });
        }
        let doc: Document = serde_json::from_slice(bytes).map_err(|e| ProfileError::Malformed {
            reason: trunc(&e.to_string()),
        })?;
        if doc.schema_version != PROFILE_SCHEMA_VERSION || doc.media_type != PROFILE_MEDIA_TYPE {
            return Err(ProfileError::Unsupported {
                version: doc.schema_version,
                media_type: trunc(&doc.media_type),
            });
        }
        Self::new(doc.image, doc.entries)
    }

    /// The encoded document (deterministic: same profile, same bytes).
    pub fn encode(&self) -> Vec<u8> {
        let doc = Document {
            schema_version: PROFILE_SCHEMA_VERSION,
            media_type: PROFILE_MEDIA_TYPE.to_owned(),
            image: self.image,
            entries: self.entries.clone(),
        };
        // Serializing plain strings, integers and digests cannot fail.
        serde_json::to_vec(&doc).unwrap_or_default()
    }

    /// The image manifest digest the profile was learned from.
    pub fn image(&self) -> Digest {
        self.image
    }

    /// Fails unless the profile belongs to image manifest `expected`.
    pub fn check_image(&self, expected: Digest) -> Result<(), ProfileError> {
        if self.image == expected {
            Ok(())
        } else {
            Err(ProfileError::WrongImage {
                expected,
                found: self.image,
            })
        }
    }

    /// Every entry, in first-read order.
    pub fn entries(&self) -> &[ProfileEntry] {
        &self.entries
    }

    /// The paths read from `layer`, in first-read order.
    pub fn paths_in_layer<'a>(&'a self, layer: &'a Digest) -> impl Iterator<Item = &'a str> + 'a {
        self.entries
            .iter()
            .filter(move |e| e.layer == *layer)
            .map(|e| e.path.as_str())
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the profile lists no file.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn check_entries(entries: &[ProfileEntry]) -> Result<(), ProfileError> {
    if entries.len() > MAX_PROFILE_ENTRIES {
        return Err(ProfileError::TooManyEntries {
            count: entries.len(),
        });
    }
    let mut seen: HashSet<(&Digest, &str)> = HashSet::with_capacity(entries.len());
    for (position, e) in entries.iter().enumerate() {
        if let Err(reason) = validate_path(&e.path) {
            return Err(ProfileError::BadPath {
                position,
                path: trunc(&e.path),
                reason,
            });
        }
        if !seen.insert((&e.layer, e.path.as_str())) {
            return Err(ProfileError::Duplicate {
                position,
                layer: e.layer,
                path: trunc(&e.path),
            });
        }
    }
    Ok(())
}

/// Checks that `path` can be a profile entry: a clean relative path (`a/b/c`:
/// no empty, `.` or `..` component, no NUL, at most [`MAX_PROFILE_PATH`] bytes);
/// the error says why not.
pub fn validate_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("empty");
    }
    if path.len() > MAX_PROFILE_PATH {
        return Err("longer than 4096 bytes");
    }
    if path.starts_with('/') {
        return Err("absolute");
    }
    if path.contains('\0') {
        return Err("contains NUL");
    }
    for component in path.split('/') {
        match component {
            "" => return Err("empty component"),
            "." | ".." => return Err("`.` or `..` component"),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> Digest {
        Digest::of(&[n])
    }

    fn entry(layer: u8, path: &str) -> ProfileEntry {
        ProfileEntry {
            layer: digest(layer),
            path: path.to_owned(),
            ms: None,
        }
    }

    #[test]
    fn round_trip_keeps_order_and_times() {
        let mut entries = vec![entry(1, "usr/bin/app"), entry(2, "etc/app.conf")];
        entries[1].ms = Some(12);
        let p = StartupProfile::new(digest(9), entries.clone()).unwrap();
        let decoded = StartupProfile::decode(&p.encode()).unwrap();
        assert_eq!(decoded, p);
        assert_eq!(decoded.entries(), &entries[..]);
        let l1 = digest(1);
        assert_eq!(
            decoded.paths_in_layer(&l1).collect::<Vec<_>>(),
            ["usr/bin/app"]
        );
        decoded.check_image(digest(9)).unwrap();
    }

    #[test]
    fn wrong_image_is_refused() {
        let p = StartupProfile::new(digest(9), vec![entry(1, "a")]).unwrap();
        assert!(matches!(
            p.check_image(digest(8)),
            Err(ProfileError::WrongImage { .. })
        ));
    }

    #[test]
    fn traversal_and_odd_paths_are_refused() {
        for bad in [
            "",
            "/etc/passwd",
            "../etc/passwd",
            "a/../../b",
            "a//b",
            "a/./b",
            "a/",
            ".",
            "a\0b",
        ] {
            let r = StartupProfile::new(digest(9), vec![entry(1, bad)]);
            assert!(
                matches!(r, Err(ProfileError::BadPath { .. })),
                "{bad:?} accepted"
            );
        }
        let long = "a/".repeat(MAX_PROFILE_PATH) + "b";
        assert!(StartupProfile::new(digest(9), vec![entry(1, &long)]).is_err());
    }

    #[test]
    fn duplicates_are_refused_but_same_path_in_two_layers_is_fine() {
        assert!(matches!(
            StartupProfile::new(digest(9), vec![entry(1, "a"), entry(1, "a")]),
            Err(ProfileError::Duplicate { .. })
        ));
        StartupProfile::new(digest(9), vec![entry(1, "a"), entry(2, "a")]).unwrap();
    }

    #[test]
    fn hostile_documents_are_errors() {
        let too_big = vec![b' '; MAX_PROFILE_BYTES as usize + 1];
        assert!(matches!(
            StartupProfile::decode(&too_big),
            Err(ProfileError::TooLarge { .. })
        ));
        let many: Vec<ProfileEntry> = (0..=MAX_PROFILE_ENTRIES)
            .map(|i| entry(1, &format!("f{i}")))
            .collect();
        assert!(matches!(
            StartupProfile::new(digest(9), many),
            Err(ProfileError::TooManyEntries { .. })
        ));
        let image = digest(9);
        let cases = [
            "".to_owned(),
            "{".to_owned(),
            "[]".to_owned(),
            // A digest that is not one.
            format!(
                r#"{{"schemaVersion":1,"mediaType":"{PROFILE_MEDIA_TYPE}","image":"sha256:12","entries":[]}}"#
            ),
            format!(
                r#"{{"schemaVersion":1,"mediaType":"{PROFILE_MEDIA_TYPE}","image":"md5:00","entries":[]}}"#
            ),
            format!(
                r#"{{"schemaVersion":1,"mediaType":"{PROFILE_MEDIA_TYPE}","image":"{image}","entries":[{{"layer":"x","path":"a"}}]}}"#
            ),
            // Unknown version, media type, field.
            format!(
                r#"{{"schemaVersion":2,"mediaType":"{PROFILE_MEDIA_TYPE}","image":"{image}","entries":[]}}"#
            ),
            format!(
                r#"{{"schemaVersion":1,"mediaType":"text/plain","image":"{image}","entries":[]}}"#
            ),
            format!(
                r#"{{"schemaVersion":1,"mediaType":"{PROFILE_MEDIA_TYPE}","image":"{image}","entries":[],"x":1}}"#
            ),
            // A negative time.
            format!(
                r#"{{"schemaVersion":1,"mediaType":"{PROFILE_MEDIA_TYPE}","image":"{image}","entries":[{{"layer":"{image}","path":"a","ms":-1}}]}}"#
            ),
        ];
        for doc in cases {
            assert!(
                StartupProfile::decode(doc.as_bytes()).is_err(),
                "{doc} accepted"
            );
        }
        let ok = format!(
            r#"{{"schemaVersion":1,"mediaType":"{PROFILE_MEDIA_TYPE}","image":"{image}","entries":[{{"layer":"{image}","path":"a/b","ms":3}}]}}"#
        );
        let p = StartupProfile::decode(ok.as_bytes()).unwrap();
        assert_eq!(p.len(), 1);
    }
}
