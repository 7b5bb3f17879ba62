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
use zest_oci::digest::Digest;

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
    // Hand-rolled fast path (every TOC entry has a modtime); unusual forms such
    // as leap seconds go through chrono.
    fast_time(s.as_bytes()).or_else(|| {
        let t = chrono::DateTime::parse_from_rfc3339(s).ok()?;
        Some(Timestamp {
            secs: t.timestamp(),
            // chrono encodes a leap second as nanos >= 1e9; POSIX has no such thing.
            nanos: t.timestamp_subsec_nanos().min(999_999_999),
        })
    })
}

/// `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`.
fn fast_time(b: &[u8]) -> Option<Timestamp> {
    fn num(b: &[u8]) -> Option<i64> {
        b.iter().try_fold(0i64, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
        })
    }
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (year, month, day) = (num(&b[0..4])?, num(&b[5..7])?, num(&b[8..10])?);
    let (hour, min, sec) = (num(&b[11..13])?, num(&b[14..16])?, num(&b[17..19])?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&month)
        || day < 1
        || day > month_days[(month - 1) as usize]
        || hour > 23
        || min > 59
        || sec > 59
    {
        return None;
    }
    let mut rest = &b[19..];
    let mut nanos: u32 = 0;
    if let Some((&b'.', frac)) = rest.split_first() {
        let digits = frac.iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return None;
        }
        for (i, &c) in frac[..digits].iter().take(9).enumerate() {
            nanos += u32::from(c - b'0') * 10u32.pow(8 - i as u32);
        }
        rest = &frac[digits..];
    }
    let offset = match rest {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let (h, m) = (num(&[*h1, *h2])?, num(&[*m1, *m2])?);
            if h > 23 || m > 59 {
                return None;
            }
            let o = h * 3600 + m * 60;
            if *sign == b'-' {
                -o
            } else {
                o
            }
        }
        _ => return None,
    };
    // Days since the epoch for a proleptic Gregorian date (Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(Timestamp {
        secs: days * 86_400 + hour * 3600 + min * 60 + sec - offset,
        nanos,
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
        assert!(parse_time("2023-02-29T00:00:00Z").is_none());
        assert!(parse_time("2023-01-01T00:00:00.Z").is_none());
        // Leap second: accepted through the slow path.
        assert!(parse_time("2016-12-31T23:59:60Z").is_some());
    }

    #[test]
    fn fast_time_parser_agrees_with_chrono() {
        let mut x: u64 = 0x1234_5678_9abc_def0;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let secs = (x % 315_000_000_000) as i64 - 62_000_000_000;
            let nanos = ((x >> 40) % 1_000_000_000) as u32;
            let dt = chrono::DateTime::from_timestamp(secs, nanos).unwrap();
            let offset =
                chrono::FixedOffset::east_opt(((x >> 20) % 86_000) as i32 - 43_000).unwrap();
            for s in [
                dt.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
                dt.with_timezone(&offset)
                    .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false),
                dt.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            ] {
                let c = chrono::DateTime::parse_from_rfc3339(&s).unwrap();
                let want = Timestamp {
                    secs: c.timestamp(),
                    nanos: c.timestamp_subsec_nanos(),
                };
                assert_eq!(fast_time(s.as_bytes()), Some(want), "{s}");
            }
        }
        assert!(format_time(Timestamp {
            secs: i64::MAX / 2,
            nanos: 0
        })
        .is_none());
    }
}
