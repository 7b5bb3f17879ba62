//! The TOC's JSON schema: borrowed input entries (streamed, never collected into
//! a `Vec`, so a huge hostile TOC cannot cost more than its own size), the
//! top-level document visitor, and the output entry the writer serializes.
//!
//! Field names and omit-if-empty behaviour follow what containers-storage writes
//! (Go `omitempty`): zero numbers, empty strings and empty maps are left out.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::error::FormatError;
use super::index::Timestamp;
use crate::digest::Digest;

/// One TOC entry as found in the JSON. Unknown fields are ignored.
#[derive(Deserialize, Default)]
pub(crate) struct RawEntry<'a> {
    #[serde(rename = "type", borrow, default)]
    pub kind: Cow<'a, str>,
    #[serde(borrow, default)]
    pub name: Cow<'a, str>,
    #[serde(rename = "linkName", borrow, default)]
    pub link_name: Option<Cow<'a, str>>,
    #[serde(default)]
    pub mode: u64,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub uid: u64,
    #[serde(default)]
    pub gid: u64,
    #[serde(borrow, default)]
    pub modtime: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub accesstime: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub changetime: Option<Cow<'a, str>>,
    #[serde(rename = "devMajor", default)]
    pub dev_major: u64,
    #[serde(rename = "devMinor", default)]
    pub dev_minor: u64,
    #[serde(borrow, default)]
    pub xattrs: Option<BTreeMap<Cow<'a, str>, Cow<'a, str>>>,
    #[serde(borrow, default)]
    pub digest: Option<Cow<'a, str>>,
    #[serde(default)]
    pub offset: u64,
    #[serde(rename = "endOffset", default)]
    pub end_offset: u64,
    #[serde(rename = "chunkSize", default)]
    pub chunk_size: Option<u64>,
    #[serde(rename = "chunkOffset", default)]
    pub chunk_offset: u64,
    #[serde(rename = "chunkDigest", borrow, default)]
    pub chunk_digest: Option<Cow<'a, str>>,
    #[serde(rename = "chunkType", borrow, default)]
    pub chunk_type: Option<Cow<'a, str>>,
}

/// Top-level fields other than the entries.
#[derive(Default)]
pub(crate) struct TocHeader {
    pub version: Option<u64>,
    pub tar_split_digest: Option<String>,
    pub prefetch_end: Option<u64>,
}

/// Name of the writer's prefetch extension field (ignored by other readers).
pub(crate) const PREFETCH_FIELD: &str = "zest.prefetch";

#[derive(Deserialize)]
struct PrefetchField {
    end: u64,
}

/// Streams a TOC document, handing each entry to `sink` as soon as it is parsed.
///
/// `sink` errors are carried out through `failure` (serde only transports
/// strings) and take precedence over the JSON error that aborts parsing.
pub(crate) struct TocSeed<'s, F> {
    pub sink: &'s mut F,
    pub failure: &'s mut Option<FormatError>,
}

impl<'de, F> DeserializeSeed<'de> for TocSeed<'_, F>
where
    F: FnMut(RawEntry<'de>) -> Result<(), FormatError>,
{
    type Value = TocHeader;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<TocHeader, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, F> Visitor<'de> for TocSeed<'_, F>
where
    F: FnMut(RawEntry<'de>) -> Result<(), FormatError>,
{
    type Value = TocHeader;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a zstd:chunked TOC object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TocHeader, A::Error> {
        let mut header = TocHeader::default();
        let mut seen_entries = false;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match key.as_ref() {
                "version" => header.version = Some(map.next_value()?),
                "entries" => {
                    if seen_entries {
                        return Err(de::Error::custom("duplicate field `entries`"));
                    }
                    seen_entries = true;
                    map.next_value_seed(EntriesSeed {
                        sink: &mut *self.sink,
                        failure: &mut *self.failure,
                    })?;
                }
                "tarSplitDigest" => {
                    header.tar_split_digest = map.next_value::<Option<String>>()?;
                }
                PREFETCH_FIELD => {
                    header.prefetch_end = map.next_value::<Option<PrefetchField>>()?.map(|p| p.end);
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if !seen_entries {
            return Err(de::Error::missing_field("entries"));
        }
        Ok(header)
    }
}

struct EntriesSeed<'s, F> {
    sink: &'s mut F,
    failure: &'s mut Option<FormatError>,
}

impl<'de, F> DeserializeSeed<'de> for EntriesSeed<'_, F>
where
    F: FnMut(RawEntry<'de>) -> Result<(), FormatError>,
{
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, F> Visitor<'de> for EntriesSeed<'_, F>
where
    F: FnMut(RawEntry<'de>) -> Result<(), FormatError>,
{
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of TOC entries")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(entry) = seq.next_element::<RawEntry<'de>>()? {
            if let Err(e) = (self.sink)(entry) {
                *self.failure = Some(e);
                return Err(de::Error::custom("rejected TOC entry"));
            }
        }
        Ok(())
    }
}

/// Parses an RFC 3339 timestamp as written by Go's `time.Time` JSON encoding.
pub(crate) fn parse_time(s: &str) -> Option<Timestamp> {
    let t = chrono::DateTime::parse_from_rfc3339(s).ok()?;
    Some(Timestamp {
        secs: t.timestamp(),
        // chrono encodes a leap second as nanos >= 1e9; POSIX has no such thing.
        nanos: t.timestamp_subsec_nanos().min(999_999_999),
    })
}

/// Formats a timestamp as RFC 3339 in UTC (`None` outside years 0..=9999, which
/// Go's encoder refuses too).
pub(crate) fn format_time(t: Timestamp) -> Option<String> {
    let dt = chrono::DateTime::from_timestamp(t.secs, t.nanos)?;
    use chrono::Datelike;
    if !(0..=9999).contains(&dt.year()) {
        return None;
    }
    Some(dt.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// One TOC entry as the writer emits it.
#[derive(Serialize, Default)]
pub(crate) struct OutEntry<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub name: &'a str,
    #[serde(rename = "linkName", skip_serializing_if = "str::is_empty")]
    pub link_name: &'a str,
    #[serde(skip_serializing_if = "is_zero")]
    pub mode: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub size: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub uid: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub gid: u64,
    #[serde(rename = "userName", skip_serializing_if = "str::is_empty")]
    pub user_name: &'a str,
    #[serde(rename = "groupName", skip_serializing_if = "str::is_empty")]
    pub group_name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub modtime: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accesstime: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changetime: Option<String>,
    #[serde(rename = "devMajor", skip_serializing_if = "is_zero")]
    pub dev_major: u64,
    #[serde(rename = "devMinor", skip_serializing_if = "is_zero")]
    pub dev_minor: u64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<&'a str, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
    #[serde(skip_serializing_if = "is_zero")]
    pub offset: u64,
    #[serde(rename = "endOffset", skip_serializing_if = "is_zero")]
    pub end_offset: u64,
    #[serde(rename = "chunkSize", skip_serializing_if = "is_zero")]
    pub chunk_size: u64,
    #[serde(rename = "chunkOffset", skip_serializing_if = "is_zero")]
    pub chunk_offset: u64,
    #[serde(rename = "chunkDigest", skip_serializing_if = "Option::is_none")]
    pub chunk_digest: Option<Digest>,
    #[serde(rename = "chunkType", skip_serializing_if = "str::is_empty")]
    pub chunk_type: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip() {
        for (s, secs, nanos) in [
            ("2023-01-02T03:04:05Z", 1672628645, 0),
            ("2023-01-02T03:04:05.5+01:00", 1672625045, 500_000_000),
            ("1969-12-31T23:59:59.000000001Z", -1, 1),
        ] {
            let t = parse_time(s).unwrap();
            assert_eq!((t.secs, t.nanos), (secs, nanos), "{s}");
            assert_eq!(parse_time(&format_time(t).unwrap()).unwrap(), t);
        }
        assert!(parse_time("yesterday").is_none());
        assert!(format_time(Timestamp {
            secs: i64::MAX / 2,
            nanos: 0
        })
        .is_none());
    }
}
