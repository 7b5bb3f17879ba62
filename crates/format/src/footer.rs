//! Locating the TOC: the blob footer and the layer annotations.
//!
//! Both sources are untrusted until checked: every position is checked against
//! the blob size before anyone fetches it. Only the annotation carries a digest
//! for the TOC; a footer-located TOC is as trustworthy as the blob digest that
//! covered the bytes fetched (i.e. not at all until the whole blob is hashed), so
//! callers should prefer annotations whenever they have the manifest.

use std::ops::Range;

use super::annotations as ann;
use super::error::{trunc, FormatError};
use super::Result;
use zest_oci::digest::Digest;

/// Magic of a zstd skippable frame (`0x184D2A50`, little-endian).
pub const SKIPPABLE_FRAME_MAGIC: [u8; 4] = [0x50, 0x2a, 0x4d, 0x18];

/// How many tail bytes to fetch to read either footer generation.
pub const FOOTER_FETCH_LEN: u64 = 64;

/// Footer magic of the current generation (`GNUlInUx`).
pub(crate) const MAGIC_NEW: [u8; 8] = *b"GNUlInUx";
/// Footer magic of the old generation (`GnUlInUx`).
pub(crate) const MAGIC_OLD: [u8; 8] = *b"GnUlInUx";
/// Footer payload sizes.
pub(crate) const FOOTER_LEN_NEW: usize = 64;
pub(crate) const FOOTER_LEN_OLD: usize = 40;
/// Skippable frame header: magic + u32 length.
pub(crate) const SKIPPABLE_HEADER_LEN: u64 = 8;
/// The only TOC manifest type ever written ("CRFS").
const MANIFEST_TYPE_CRFS: u64 = 1;

/// Which generation of zstd:chunked wrote a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generation {
    /// 40-byte footer `GnUlInUx`, annotations `io.containers.zstd-chunked.*`, no tar-split.
    Old,
    /// 64-byte footer `GNUlInUx`, annotations `io.github.containers.zstd-chunked.*`, tar-split.
    New,
    /// Not zstd:chunked but eStargz: gzip members, a 51-byte (47 for legacy stargz)
    /// footer, the TOC in a tar entry `stargz.index.json`; see [`crate::estargz`].
    Estargz,
}

/// A byte range of the blob holding zstd-compressed metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Blob offset of the compressed bytes (after the skippable frame header).
    pub offset: u64,
    /// Compressed length.
    pub compressed_len: u64,
    /// Declared uncompressed length.
    pub uncompressed_len: u64,
}

impl Extent {
    /// The blob byte range to fetch. Saturates instead of overflowing; call
    /// [`TocLocation::check_bounds`] first for untrusted values.
    pub fn range(&self) -> Range<u64> {
        self.offset..self.offset.saturating_add(self.compressed_len)
    }

    fn check(&self, what: &'static str, blob_size: Option<u64>, limit: u64) -> Result<()> {
        let err = || FormatError::PositionOutOfBounds {
            what,
            offset: self.offset,
            len: self.compressed_len,
            blob_size: blob_size.unwrap_or(limit),
        };
        let end = self
            .offset
            .checked_add(self.compressed_len)
            .ok_or_else(err)?;
        if self.compressed_len == 0 || self.offset < SKIPPABLE_HEADER_LEN || end > limit {
            return Err(err());
        }
        Ok(())
    }
}

/// A parsed footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footer {
    /// Which footer was found.
    pub generation: Generation,
    /// The TOC's position.
    pub toc: Extent,
    /// The tar-split's position (current generation only).
    pub tar_split: Option<Extent>,
}

/// The blob range holding the footer (the last [`FOOTER_FETCH_LEN`] bytes, or the
/// whole blob if it is shorter).
pub fn footer_range(blob_size: u64) -> Range<u64> {
    blob_size.saturating_sub(FOOTER_FETCH_LEN)..blob_size
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

/// Parses the footer from the blob's tail.
///
/// `tail` is the last bytes of the blob (at least the last 40 for an old footer,
/// 64 for a new one; pass [`footer_range`] or more), `blob_size` the blob's total
/// size. The positions are checked against the blob size.
pub fn parse_footer(tail: &[u8], blob_size: u64) -> Result<Footer> {
    if tail.len() < FOOTER_LEN_OLD {
        return Err(FormatError::FooterTruncated {
            len: tail.len(),
            need: FOOTER_FETCH_LEN as usize,
        });
    }
    if tail.len() as u64 > blob_size {
        return Err(FormatError::BadFooter {
            reason: format!("{} tail bytes for a {blob_size}-byte blob", tail.len()),
        });
    }
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&tail[tail.len() - 8..]);
    let (generation, payload_len) = match magic {
        MAGIC_NEW => (Generation::New, FOOTER_LEN_NEW),
        MAGIC_OLD => (Generation::Old, FOOTER_LEN_OLD),
        found => return Err(FormatError::BadFooterMagic { found }),
    };
    if tail.len() < payload_len {
        return Err(FormatError::FooterTruncated {
            len: tail.len(),
            need: payload_len,
        });
    }
    let p = &tail[tail.len() - payload_len..];
    // The skippable frame header precedes the payload; check it when it was fetched.
    if tail.len() >= payload_len + SKIPPABLE_HEADER_LEN as usize {
        let h = &tail[tail.len() - payload_len - 8..tail.len() - payload_len];
        if h[..4] != SKIPPABLE_FRAME_MAGIC || h[4..8] != (payload_len as u32).to_le_bytes() {
            return Err(FormatError::BadFooter {
                reason: "footer is not wrapped in a skippable frame of its size".into(),
            });
        }
    }
    let manifest_type = le_u64(p, 24);
    if manifest_type != MANIFEST_TYPE_CRFS {
        return Err(FormatError::BadFooter {
            reason: format!("manifest type {manifest_type}, expected 1"),
        });
    }
    let toc = Extent {
        offset: le_u64(p, 0),
        compressed_len: le_u64(p, 8),
        uncompressed_len: le_u64(p, 16),
    };
    let tar_split = match generation {
        // (Only the two magics above reach here.)
        Generation::Old | Generation::Estargz => None,
        Generation::New => Some(Extent {
            offset: le_u64(p, 32),
            compressed_len: le_u64(p, 40),
            uncompressed_len: le_u64(p, 48),
        }),
    };
    let footer = Footer {
        generation,
        toc,
        tar_split,
    };
    footer.location().check_bounds(blob_size)?;
    Ok(footer)
}

/// The current generation's footer: the payload of its skippable frame, which
/// [`parse_footer`] reads back.
pub(crate) fn new_footer_payload(toc: &Extent, tar_split: &Extent) -> Vec<u8> {
    let mut payload = Vec::with_capacity(FOOTER_LEN_NEW);
    for v in [
        toc.offset,
        toc.compressed_len,
        toc.uncompressed_len,
        MANIFEST_TYPE_CRFS,
        tar_split.offset,
        tar_split.compressed_len,
        tar_split.uncompressed_len,
    ] {
        payload.extend_from_slice(&v.to_le_bytes());
    }
    payload.extend_from_slice(&MAGIC_NEW);
    payload
}

impl Footer {
    /// The TOC location this footer describes (no digest: a footer cannot vouch
    /// for the TOC).
    pub fn location(&self) -> TocLocation {
        TocLocation {
            generation: self.generation,
            toc: self.toc,
            tar_split: self.tar_split,
            toc_digest: None,
        }
    }
}

fn footer_frame_len(g: Generation) -> u64 {
    SKIPPABLE_HEADER_LEN
        + match g {
            Generation::Old => FOOTER_LEN_OLD as u64,
            Generation::New => FOOTER_LEN_NEW as u64,
            // The footer is the last gzip member, without a skippable frame header.
            Generation::Estargz => crate::estargz::LEGACY_FOOTER_LEN as u64 - SKIPPABLE_HEADER_LEN,
        }
}

/// Where a layer's TOC (and tar-split) lives, and the TOC digest when known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TocLocation {
    /// Producer generation.
    pub generation: Generation,
    /// TOC position.
    pub toc: Extent,
    /// tar-split position, if any.
    pub tar_split: Option<Extent>,
    /// sha256 of the compressed TOC bytes, from the `manifest-checksum` annotation
    /// (for eStargz: of the TOC JSON, from `containerd.io/snapshot/stargz/toc.digest`).
    /// `None` when located by footer: the TOC is then unauthenticated.
    pub toc_digest: Option<Digest>,
}

impl TocLocation {
    /// Reads the zstd:chunked annotations of a layer descriptor.
    ///
    /// Accepts both generations' prefixes (the current one wins when both exist).
    /// Returns `Ok(None)` when the layer carries no zstd:chunked annotations, and
    /// an error when they are present but malformed. Works with any map type:
    /// `TocLocation::from_annotations(&map)`.
    pub fn from_annotations<I, K, V>(annotations: I) -> Result<Option<TocLocation>>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut found: [Option<String>; 5] = Default::default();
        let keys = [
            ann::MANIFEST_CHECKSUM,
            ann::MANIFEST_POSITION,
            ann::TARSPLIT_POSITION,
            ann::OLD_MANIFEST_CHECKSUM,
            ann::OLD_MANIFEST_POSITION,
        ];
        for (k, v) in annotations {
            if let Some(i) = keys.iter().position(|key| *key == k.as_ref()) {
                found[i] = Some(v.as_ref().to_owned());
            }
        }
        let [checksum, position, tarsplit, old_checksum, old_position] = found;
        let (generation, checksum_key, checksum, position_key, position) =
            if position.is_some() || checksum.is_some() {
                (
                    Generation::New,
                    ann::MANIFEST_CHECKSUM,
                    checksum,
                    ann::MANIFEST_POSITION,
                    position,
                )
            } else if old_position.is_some() || old_checksum.is_some() {
                (
                    Generation::Old,
                    ann::OLD_MANIFEST_CHECKSUM,
                    old_checksum,
                    ann::OLD_MANIFEST_POSITION,
                    old_position,
                )
            } else {
                return Ok(None);
            };
        let Some(position) = position else {
            return Err(FormatError::BadAnnotation {
                key: checksum_key.into(),
                value: checksum.unwrap_or_default(),
                reason: format!("present without {position_key}"),
            });
        };
        let bad = |key: &str, value: &str, reason: &str| FormatError::BadAnnotation {
            key: key.into(),
            value: trunc(value),
            reason: reason.into(),
        };
        let nums = parse_position(&position)
            .ok_or_else(|| bad(position_key, &position, "expected offset:length:length:1"))?;
        let toc = match nums[..] {
            [offset, compressed_len, uncompressed_len, MANIFEST_TYPE_CRFS] => Extent {
                offset,
                compressed_len,
                uncompressed_len,
            },
            _ => {
                return Err(bad(
                    position_key,
                    &position,
                    "expected offset:length:length:1",
                ))
            }
        };
        let toc_digest = match checksum {
            Some(c) => Some(
                c.parse::<Digest>()
                    .map_err(|_| bad(checksum_key, &c, "not a sha256:<64 lowercase hex> digest"))?,
            ),
            None => None,
        };
        let tar_split = match (generation, tarsplit) {
            (Generation::New, Some(ts)) => {
                let nums = parse_position(&ts).ok_or_else(|| {
                    bad(ann::TARSPLIT_POSITION, &ts, "expected offset:length:length")
                })?;
                match nums[..] {
                    [offset, compressed_len, uncompressed_len] => Some(Extent {
                        offset,
                        compressed_len,
                        uncompressed_len,
                    }),
                    _ => {
                        return Err(bad(
                            ann::TARSPLIT_POSITION,
                            &ts,
                            "expected offset:length:length",
                        ))
                    }
                }
            }
            _ => None,
        };
        Ok(Some(TocLocation {
            generation,
            toc,
            tar_split,
            toc_digest,
        }))
    }

    /// Checks every position against the blob size: the TOC and tar-split must be
    /// non-empty, preceded by a skippable frame header, and end before the footer.
    pub fn check_bounds(&self, blob_size: u64) -> Result<()> {
        let limit = blob_size.saturating_sub(footer_frame_len(self.generation));
        self.toc.check("TOC", Some(blob_size), limit)?;
        if let Some(ts) = &self.tar_split {
            ts.check("tar-split", Some(blob_size), limit)?;
            // The tar-split frame follows the TOC frame; they must not overlap.
            let toc_end = self.toc.offset + self.toc.compressed_len;
            let ts_end = ts.offset + ts.compressed_len;
            if ts.offset < toc_end && self.toc.offset < ts_end {
                return Err(FormatError::BadFooter {
                    reason: "TOC and tar-split positions overlap".into(),
                });
            }
        }
        Ok(())
    }

    /// The blob range holding the compressed TOC.
    pub fn toc_range(&self) -> Range<u64> {
        self.toc.range()
    }

    /// The blob range holding the compressed tar-split, if the layer has one.
    pub fn tar_split_range(&self) -> Option<Range<u64>> {
        self.tar_split.as_ref().map(Extent::range)
    }

    /// The end of the data area: chunk extents must lie in `0..data_end()`.
    pub fn data_end(&self) -> u64 {
        if self.generation == Generation::Estargz {
            // The TOC's gzip member starts right after the data.
            return self.toc.offset;
        }
        let toc_frame = self.toc.offset.saturating_sub(SKIPPABLE_HEADER_LEN);
        match &self.tar_split {
            Some(ts) => toc_frame.min(ts.offset.saturating_sub(SKIPPABLE_HEADER_LEN)),
            None => toc_frame,
        }
    }

    /// Slices the compressed TOC out of an already-fetched tail of the blob
    /// (`tail` starts at blob offset `tail_start`), so a reader that fetched a
    /// generous tail gets footer and TOC in one round trip. `None` if the tail
    /// does not cover the TOC.
    pub fn toc_in_tail<'a>(&self, tail: &'a [u8], tail_start: u64) -> Option<&'a [u8]> {
        let start = self.toc.offset.checked_sub(tail_start)?;
        let end = start.checked_add(self.toc.compressed_len)?;
        tail.get(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
    }
}

fn parse_position(s: &str) -> Option<Vec<u64>> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() > 4 {
        return None;
    }
    parts
        .into_iter()
        .map(|p| {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                None
            } else {
                p.parse::<u64>().ok()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashMap};

    fn new_footer(toc: Extent, ts: Extent) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&SKIPPABLE_FRAME_MAGIC);
        v.extend_from_slice(&64u32.to_le_bytes());
        v.extend_from_slice(&new_footer_payload(&toc, &ts));
        v
    }

    #[test]
    fn parses_new_footer_and_checks_bounds() {
        let toc = Extent {
            offset: 1008,
            compressed_len: 100,
            uncompressed_len: 300,
        };
        let ts = Extent {
            offset: 1116,
            compressed_len: 50,
            uncompressed_len: 90,
        };
        let f = new_footer(toc, ts);
        let blob_size = 1166 + 72;
        let parsed = parse_footer(&f[8..], blob_size).unwrap();
        assert_eq!(parsed.generation, Generation::New);
        assert_eq!(parsed.toc, toc);
        assert_eq!(parsed.tar_split, Some(ts));
        assert_eq!(parsed.location().data_end(), 1000);
        // With the frame header included too.
        assert_eq!(parse_footer(&f, blob_size).unwrap(), parsed);
        // A blob one byte too short cannot hold the claimed TOC + tar-split.
        assert!(matches!(
            parse_footer(&f[8..], blob_size - 1),
            Err(FormatError::PositionOutOfBounds { .. })
        ));
        assert_eq!(footer_range(blob_size), blob_size - 64..blob_size);
        assert_eq!(footer_range(10), 0..10);
    }

    #[test]
    fn parses_old_footer() {
        let mut v = Vec::new();
        v.extend_from_slice(&SKIPPABLE_FRAME_MAGIC);
        v.extend_from_slice(&40u32.to_le_bytes());
        for x in [1059682u64, 2267, 8216, 1] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v.extend_from_slice(&MAGIC_OLD);
        let blob_size = 1059682 + 2267 + 48;
        let mut tail = vec![0xaa; 16];
        tail.extend_from_slice(&v);
        let f = parse_footer(&tail, blob_size).unwrap();
        assert_eq!(f.generation, Generation::Old);
        assert_eq!(f.toc.offset, 1059682);
        assert_eq!(f.tar_split, None);
        // Corrupting the frame header around the footer is detected.
        tail[16] = 0;
        assert!(matches!(
            parse_footer(&tail, blob_size),
            Err(FormatError::BadFooter { .. })
        ));
    }

    #[test]
    fn rejects_bad_footers() {
        assert!(matches!(
            parse_footer(&[0u8; 10], 100),
            Err(FormatError::FooterTruncated { .. })
        ));
        assert!(matches!(
            parse_footer(&[0u8; 64], 100),
            Err(FormatError::BadFooterMagic { .. })
        ));
        // New magic but only 40 bytes.
        let mut t = vec![0u8; 40];
        t[32..].copy_from_slice(&MAGIC_NEW);
        assert!(matches!(
            parse_footer(&t, 100),
            Err(FormatError::FooterTruncated { .. })
        ));
        // Overflowing offset.
        let f = new_footer(
            Extent {
                offset: u64::MAX - 1,
                compressed_len: 10,
                uncompressed_len: 1,
            },
            Extent {
                offset: 8,
                compressed_len: 1,
                uncompressed_len: 1,
            },
        );
        assert!(matches!(
            parse_footer(&f[8..], 1000),
            Err(FormatError::PositionOutOfBounds { .. })
        ));
    }

    #[test]
    fn reads_annotations_of_both_generations() {
        let d = Digest::of(b"toc");
        let mut m = BTreeMap::new();
        m.insert(ann::MANIFEST_CHECKSUM.to_string(), d.to_string());
        m.insert(
            ann::MANIFEST_POSITION.to_string(),
            "100:20:50:1".to_string(),
        );
        m.insert(ann::TARSPLIT_POSITION.to_string(), "128:10:30".to_string());
        let loc = TocLocation::from_annotations(&m).unwrap().unwrap();
        assert_eq!(loc.generation, Generation::New);
        assert_eq!(loc.toc_digest, Some(d));
        assert_eq!(loc.toc_range(), 100..120);
        assert_eq!(loc.tar_split_range(), Some(128..138));
        loc.check_bounds(138 + 72).unwrap();
        assert!(loc.check_bounds(138 + 71).is_err());

        let mut h = HashMap::new();
        h.insert(ann::OLD_MANIFEST_CHECKSUM, d.to_string());
        h.insert(
            ann::OLD_MANIFEST_POSITION,
            "1059682:2267:8216:1".to_string(),
        );
        let loc = TocLocation::from_annotations(&h).unwrap().unwrap();
        assert_eq!(loc.generation, Generation::Old);
        assert_eq!(loc.tar_split, None);

        let none: HashMap<String, String> = HashMap::new();
        assert!(TocLocation::from_annotations(&none).unwrap().is_none());

        for bad in [
            "1:2:3",
            "1:2:3:2",
            "a:b:c:1",
            "-1:2:3:1",
            "1::3:1",
            "99999999999999999999:1:1:1",
        ] {
            let mut m = BTreeMap::new();
            m.insert(ann::MANIFEST_POSITION, bad);
            assert!(TocLocation::from_annotations(&m).is_err(), "{bad}");
        }
        let mut m = BTreeMap::new();
        m.insert(ann::MANIFEST_POSITION, "1:2:3:1");
        m.insert(ann::MANIFEST_CHECKSUM, "sha256:zz");
        assert!(TocLocation::from_annotations(&m).is_err());
    }
}
