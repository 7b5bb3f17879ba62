//! eStargz layers: the gzip-based lazily pullable format of containerd's stargz
//! snapshotter, read into the same [`LayerIndex`] as zstd:chunked.
//!
//! An eStargz blob is a sequence of gzip members that still decodes as one tar.gz.
//! Each payload chunk of a file starts a fresh member at the `offset` its TOC entry
//! records; the TOC is the JSON of a last tar entry, `stargz.index.json`, in a member
//! of its own; a 51-byte footer (an empty gzip member whose extra field carries the
//! TOC offset) ends the blob. Legacy CRFS stargz blobs have a 47-byte footer without
//! the `SG` subfield header.
//!
//! The TOC's entries have zstd:chunked's schema (zstd:chunked took it from eStargz),
//! minus `endOffset`: a chunk's compressed extent runs to the next payload offset of
//! the blob (past the members holding the next tar headers, which decoding stops
//! before), the last one to the TOC. Trust comes from the layer annotation
//! [`TOC_DIGEST_ANNOTATION`], the sha256 of the TOC JSON; then every chunk is
//! checked against its `chunkDigest` as for zstd:chunked.
//!
//! Not supported (a clear error): chunks sharing a gzip member (`innerOffset`, written
//! only with a minimum chunk size option).

use std::io::Read;

use serde_json::{Map, Value};

use super::error::FormatError;
use super::footer::{Extent, Generation, TocLocation};
use super::index::{Chunk, LayerIndex, MAX_TOC_UNCOMPRESSED};
use super::Result;
use zest_oci::digest::Digest;

/// Layer annotation with the sha256 of the TOC JSON (`stargz.index.json`).
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Name of the tar entry holding the TOC.
pub const TOC_ENTRY_NAME: &str = "stargz.index.json";
/// Length of the eStargz footer.
pub const FOOTER_LEN: usize = 51;
/// Length of the legacy (CRFS stargz) footer.
pub const LEGACY_FOOTER_LEN: usize = 47;

/// gzip header with FEXTRA, no mtime, XFL 0, OS unknown (255).
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff];
/// An empty deflate stream, then CRC32 and ISIZE of zero bytes.
const EMPTY_MEMBER_TAIL: [u8; 13] = [0x01, 0x00, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0];

fn bad_footer(reason: impl Into<String>) -> FormatError {
    FormatError::BadFooter {
        reason: format!("eStargz: {}", reason.into()),
    }
}

fn le_u16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

/// Reads `%016x` + `STARGZ`: the TOC offset.
fn parse_offset_payload(payload: &[u8]) -> Option<u64> {
    let (hex, magic) = payload.split_at(16);
    if magic != b"STARGZ" || !hex.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
}

/// Parses the footer from the blob's tail (at least its last 51 bytes, or the whole
/// blob) and returns the TOC's location, without a digest (set
/// [`TocLocation::toc_digest`] from [`TOC_DIGEST_ANNOTATION`] to trust it).
///
/// The TOC extent runs from the footer's offset to the footer; its uncompressed
/// length is unknown (0) until decoded.
pub fn parse_footer(tail: &[u8], blob_size: u64) -> Result<TocLocation> {
    if tail.len() as u64 > blob_size {
        return Err(bad_footer(format!(
            "{} tail bytes for a {blob_size}-byte blob",
            tail.len()
        )));
    }
    let try_len = |len: usize| -> Option<Result<u64>> {
        let footer = tail.get(tail.len().checked_sub(len)?..)?;
        if footer[..10] != GZIP_HEADER {
            return None;
        }
        let offset = if len == FOOTER_LEN {
            // XLEN 26, subfield "SG" of 22 bytes.
            if le_u16(&footer[10..12]) != 26
                || &footer[12..14] != b"SG"
                || le_u16(&footer[14..16]) != 22
            {
                return None;
            }
            parse_offset_payload(&footer[16..38])
        } else {
            // Legacy: XLEN 22, the payload directly.
            if le_u16(&footer[10..12]) != 22 {
                return None;
            }
            parse_offset_payload(&footer[12..34])
        };
        let rest = &footer[len - EMPTY_MEMBER_TAIL.len()..];
        Some(match offset {
            Some(off) if rest == EMPTY_MEMBER_TAIL => Ok(off),
            Some(_) => Err(bad_footer("the footer member is not empty")),
            None => Err(bad_footer(
                "the footer's extra field has no %016x STARGZ offset",
            )),
        })
    };
    let (footer_len, toc_offset) = match try_len(FOOTER_LEN).or_else(|| try_len(LEGACY_FOOTER_LEN))
    {
        Some(found) => (
            if try_len(FOOTER_LEN).is_some() {
                FOOTER_LEN
            } else {
                LEGACY_FOOTER_LEN
            },
            found?,
        ),
        None => return Err(bad_footer(
            "the blob does not end in an eStargz footer; it is a plain tar+gzip layer or truncated",
        )),
    };
    let footer_start = blob_size - footer_len as u64;
    if toc_offset == 0 || toc_offset >= footer_start {
        return Err(FormatError::PositionOutOfBounds {
            what: "TOC",
            offset: toc_offset,
            len: footer_start.saturating_sub(toc_offset),
            blob_size,
        });
    }
    Ok(TocLocation {
        generation: Generation::Estargz,
        toc: Extent {
            offset: toc_offset,
            compressed_len: footer_start - toc_offset,
            uncompressed_len: 0,
        },
        tar_split: None,
        toc_digest: None,
    })
}

/// Decompresses gzip data, at most `limit` bytes of output (more is an error).
fn gunzip_bounded(data: &[u8], limit: u64, what: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(data)
        .take(limit.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|source| FormatError::Decompress {
            what: format!("gzip {what}"),
            source,
        })?;
    if out.len() as u64 > limit {
        return Err(FormatError::TocTooLarge {
            declared: out.len() as u64,
            limit,
        });
    }
    Ok(out)
}

/// Extracts the TOC JSON from the decompressed TOC member: one tar entry named
/// [`TOC_ENTRY_NAME`] (ustar, as every writer emits it), then only the end marker.
fn toc_json_from_tar(tar: &[u8]) -> Result<&[u8]> {
    let bad = |reason: &str| FormatError::InvalidTar {
        offset: 0,
        reason: format!("eStargz TOC entry: {reason}"),
    };
    let header = tar
        .get(..512)
        .ok_or_else(|| bad("shorter than a tar header"))?;
    let name_end = header[..100].iter().position(|&b| b == 0).unwrap_or(100);
    if &header[..name_end] != TOC_ENTRY_NAME.as_bytes() {
        return Err(bad(&format!(
            "named {:?}, not {TOC_ENTRY_NAME}",
            String::from_utf8_lossy(&header[..name_end])
        )));
    }
    if !matches!(header[156], b'0' | 0) {
        return Err(bad("not a regular file"));
    }
    let size = crate::tar::parse_number(&header[124..136]).ok_or_else(|| bad("invalid size"))?;
    let end = usize::try_from(size)
        .ok()
        .and_then(|s| s.checked_add(512))
        .filter(|&e| e <= tar.len())
        .ok_or_else(|| bad("its content is truncated"))?;
    Ok(&tar[512..end])
}

/// The TOC JSON of an eStargz blob, from its compressed TOC bytes (fetched at
/// `location.toc_range()`), checked against `location.toc_digest` when known.
/// Returns the JSON and its digest.
pub fn toc_json(compressed: &[u8], location: &TocLocation) -> Result<(Vec<u8>, Digest)> {
    if compressed.len() as u64 != location.toc.compressed_len {
        return Err(FormatError::TocLengthMismatch {
            expected: location.toc.compressed_len,
            actual: compressed.len() as u64,
        });
    }
    // Room for the tar header, padding and end marker around the JSON.
    let tar = gunzip_bounded(compressed, MAX_TOC_UNCOMPRESSED + 4096, "TOC")?;
    let json = toc_json_from_tar(&tar)?;
    let actual = Digest::of(json);
    if let Some(expected) = location.toc_digest {
        if expected != actual {
            return Err(FormatError::TocDigestMismatch { expected, actual });
        }
    }
    Ok((json.to_vec(), actual))
}

/// Builds the [`LayerIndex`] of an eStargz layer (see [`toc_json`]); called by
/// [`LayerIndex::decode`] for [`Generation::Estargz`] locations.
pub(crate) fn decode_toc(
    compressed: &[u8],
    location: &TocLocation,
    blob_size: u64,
) -> Result<LayerIndex> {
    location.check_bounds(blob_size)?;
    let (json, _) = toc_json(compressed, location)?;
    index_from_toc_json(&json, location)
}

/// Builds the [`LayerIndex`] from eStargz TOC JSON already extracted and trusted
/// (see [`toc_json`]); `location` is the blob's [`Generation::Estargz`] location.
pub fn index_from_toc_json(json: &[u8], location: &TocLocation) -> Result<LayerIndex> {
    let translated = translate(json, location.toc.offset)?;
    LayerIndex::from_json(&translated, location, Digest::of(json))
}

/// Rewrites eStargz TOC JSON into zstd:chunked's schema: every regular file with
/// content gets the `endOffset` of its last chunk (the next payload offset of the
/// blob, or the TOC's offset), owner names are dropped; chunks sharing a member
/// (`innerOffset`) are refused.
fn translate(json: &[u8], toc_offset: u64) -> Result<Vec<u8>> {
    let mut toc: Value =
        serde_json::from_slice(json).map_err(|source| FormatError::TocJson { source })?;
    let entries = match toc.get_mut("entries") {
        Some(Value::Array(entries)) => entries,
        _ => {
            return Err(FormatError::InvalidEntry {
                name: "(toc)".into(),
                reason: "no \"entries\" array".into(),
            })
        }
    };
    let offset_of = |e: &Map<String, Value>| e.get("offset").and_then(Value::as_u64).unwrap_or(0);
    let name_of = |e: &Map<String, Value>| {
        e.get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .chars()
            .take(200)
            .collect::<String>()
    };
    let mut payload_offsets = Vec::new();
    for entry in entries.iter() {
        let Some(e) = entry.as_object() else {
            return Err(FormatError::InvalidEntry {
                name: "(toc)".into(),
                reason: "an entry is not an object".into(),
            });
        };
        if e.get("innerOffset").and_then(Value::as_u64).unwrap_or(0) != 0 {
            return Err(FormatError::InvalidEntry {
                name: name_of(e),
                reason: "chunks sharing a gzip member (innerOffset) are not supported; \
                         rebuild the image without a minimum chunk size"
                    .into(),
            });
        }
        let kind = e.get("type").and_then(Value::as_str).unwrap_or("");
        let size = e.get("size").and_then(Value::as_u64).unwrap_or(0);
        if kind == "chunk" || (kind == "reg" && size > 0) {
            payload_offsets.push(offset_of(e));
        }
    }
    payload_offsets.sort_unstable();
    payload_offsets.dedup();
    let next_payload = |after: u64| -> u64 {
        let i = payload_offsets.partition_point(|&o| o <= after);
        payload_offsets.get(i).copied().unwrap_or(toc_offset)
    };
    // The end of each file is that of its last chunk: walk back from the entries
    // so that a file's `chunk` entries are seen before its `reg` entry.
    let mut last_chunk_offset: Option<u64> = None;
    for entry in entries.iter_mut().rev() {
        let Some(e) = entry.as_object_mut() else {
            continue;
        };
        e.remove("userName");
        e.remove("groupName");
        e.remove("innerOffset");
        match e.get("type").and_then(Value::as_str).unwrap_or("") {
            "chunk" => {
                let offset = offset_of(e);
                last_chunk_offset = Some(last_chunk_offset.map_or(offset, |o| o.max(offset)));
            }
            "reg" => {
                let size = e.get("size").and_then(Value::as_u64).unwrap_or(0);
                let last = last_chunk_offset.take().unwrap_or(0).max(offset_of(e));
                if size > 0 {
                    e.insert("endOffset".into(), Value::from(next_payload(last)));
                }
            }
            _ => last_chunk_offset = None,
        }
    }
    serde_json::to_vec(&toc).map_err(|source| FormatError::TocJson { source })
}

/// Decompresses one eStargz chunk: the gzip member at the start of `compressed`,
/// exactly `chunk.len` bytes (the extent may continue with members of the next tar
/// headers, which are not read). Leaves `out` with the bytes, unverified.
pub(crate) fn gunzip_chunk(chunk: &Chunk, compressed: &[u8], out: &mut Vec<u8>) -> Result<()> {
    let what = || format!("gzip chunk at blob offset {}", chunk.compressed_offset);
    let mut decoder = flate2::read::GzDecoder::new(compressed).take(chunk.len);
    out.reserve_exact(chunk.len as usize);
    decoder
        .read_to_end(out)
        .map_err(|source| FormatError::Decompress {
            what: what(),
            source,
        })?;
    if out.len() as u64 != chunk.len {
        let actual = out.len() as u64;
        out.clear();
        return Err(FormatError::SizeMismatch {
            what: what(),
            declared: chunk.len,
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ChunkDecoder;
    use std::io::Write;

    fn member(data: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(data).unwrap_or_default();
        gz.finish().unwrap_or_default()
    }

    fn tar_header(name: &str, size: usize) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..108].copy_from_slice(b"0000644\0");
        h[108..116].copy_from_slice(b"0000000\0");
        h[116..124].copy_from_slice(b"0000000\0");
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        h[136..148].copy_from_slice(b"00000000000\0");
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        h
    }

    fn padded(data: &[u8]) -> Vec<u8> {
        let mut v = data.to_vec();
        v.resize(data.len().div_ceil(512) * 512, 0);
        v
    }

    /// A small eStargz blob as the reference writer lays it out: per file a member
    /// with its tar header, one member per chunk; the TOC entry; the footer.
    /// Returns the blob, the TOC location (with digest) and the TOC JSON.
    fn blob(files: &[(&str, Vec<u8>)], chunk: usize, legacy: bool) -> (Vec<u8>, TocLocation) {
        let mut out = Vec::new();
        let mut entries = Vec::new();
        for (name, data) in files {
            out.extend(member(&tar_header(name, data.len())));
            for (i, piece) in data.chunks(chunk).enumerate() {
                let mut e = serde_json::json!({
                    "name": name, "type": if i == 0 { "reg" } else { "chunk" },
                    "offset": out.len(), "chunkOffset": i * chunk, "chunkSize": piece.len(),
                    "chunkDigest": Digest::of(piece).to_string(),
                });
                if i == 0 {
                    e["size"] = data.len().into();
                    e["mode"] = 0o644.into();
                    e["userName"] = "root".into();
                    e["digest"] = Digest::of(data).to_string().into();
                }
                entries.push(e);
                let mut bytes = piece.to_vec();
                if (i + 1) * chunk >= data.len() {
                    bytes = padded(&bytes);
                }
                out.extend(member(&bytes));
            }
        }
        let json = serde_json::to_vec(&serde_json::json!({"version": 1, "entries": entries}))
            .unwrap_or_default();
        let toc_offset = out.len() as u64;
        let mut toc_tar = tar_header(TOC_ENTRY_NAME, json.len());
        toc_tar.extend(padded(&json));
        toc_tar.extend([0u8; 1024]);
        out.extend(member(&toc_tar));
        let payload = format!("{toc_offset:016x}STARGZ");
        out.extend(GZIP_HEADER);
        if legacy {
            out.extend(22u16.to_le_bytes());
        } else {
            out.extend(26u16.to_le_bytes());
            out.extend(b"SG");
            out.extend(22u16.to_le_bytes());
        }
        out.extend(payload.as_bytes());
        out.extend(EMPTY_MEMBER_TAIL);
        let size = out.len() as u64;
        let mut loc = parse_footer(&out[out.len() - 64..], size).unwrap_or_else(|e| panic!("{e}"));
        loc.toc_digest = Some(Digest::of(&json));
        (out, loc)
    }

    fn files() -> Vec<(&'static str, Vec<u8>)> {
        let big: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        vec![("a.txt", b"hello\n".to_vec()), ("dir/big.bin", big)]
    }

    fn toc_of<'a>(blob: &'a [u8], loc: &TocLocation) -> &'a [u8] {
        &blob[loc.toc.offset as usize..(loc.toc.offset + loc.toc.compressed_len) as usize]
    }

    #[test]
    fn reads_files_back_through_their_gzip_chunks() -> Result<()> {
        for legacy in [false, true] {
            let (blob, loc) = blob(&files(), 4096, legacy);
            assert_eq!(loc.generation, Generation::Estargz);
            let index = LayerIndex::decode(toc_of(&blob, &loc), &loc, blob.len() as u64)?;
            let mut decoder = ChunkDecoder::new()?;
            for (name, data) in files() {
                let id = index
                    .resolve_path(name)
                    .unwrap_or_else(|| panic!("{name} missing"));
                let mut read = Vec::new();
                for chunk in index.entry(id).chunks() {
                    assert!(chunk.gzip);
                    let range = chunk.compressed_range();
                    read.extend(
                        decoder.decode(chunk, &blob[range.start as usize..range.end as usize])?,
                    );
                }
                assert_eq!(read, data, "{name}");
            }
        }
        Ok(())
    }

    #[test]
    fn the_toc_digest_and_the_chunk_digests_are_checked() -> Result<()> {
        let (blob, mut loc) = blob(&files(), 4096, false);
        let good = loc;
        loc.toc_digest = Some(Digest::of(b"other"));
        assert!(matches!(
            LayerIndex::decode(toc_of(&blob, &loc), &loc, blob.len() as u64),
            Err(FormatError::TocDigestMismatch { .. })
        ));
        let index = LayerIndex::decode(toc_of(&blob, &good), &good, blob.len() as u64)?;
        let id = index
            .resolve_path("dir/big.bin")
            .unwrap_or_else(|| panic!("missing"));
        let chunk = index.entry(id).chunks()[1];
        let mut tampered = blob.clone();
        // A different member of the same length: another chunk's bytes.
        let other = member(&[0u8; 4096]);
        let at = chunk.compressed_offset as usize;
        tampered.splice(at..at + other.len(), other.iter().copied());
        let range = chunk.compressed_range();
        let err = ChunkDecoder::new()?
            .decode(&chunk, &tampered[range.start as usize..range.end as usize]);
        assert!(
            matches!(
                err,
                Err(FormatError::ChunkDigestMismatch { .. }
                    | FormatError::Decompress { .. }
                    | FormatError::SizeMismatch { .. })
            ),
            "{err:?}"
        );
        Ok(())
    }

    #[test]
    fn bad_footers_and_shared_members_are_errors() {
        let (blob, loc) = blob(&files(), 4096, false);
        let size = blob.len() as u64;
        // Not a footer at all (a zstd:chunked or plain gzip blob).
        assert!(matches!(
            parse_footer(&[0u8; 64], 64),
            Err(FormatError::BadFooter { .. })
        ));
        // An offset beyond the footer.
        let mut far = blob.clone();
        let at = far.len() - FOOTER_LEN + 16;
        far[at..at + 16].copy_from_slice(format!("{:016x}", size).as_bytes());
        assert!(matches!(
            parse_footer(&far[far.len() - 64..], size),
            Err(FormatError::PositionOutOfBounds { .. })
        ));
        // A footer whose member is not empty.
        let mut full = blob.clone();
        let last = full.len() - 1;
        full[last] = 1;
        assert!(parse_footer(&full[full.len() - 64..], size).is_err());
        // Chunks sharing a member are refused, not misread.
        let json = toc_json(toc_of(&blob, &loc), &loc)
            .map(|(j, _)| j)
            .unwrap_or_default();
        let shared = String::from_utf8_lossy(&json).replacen(
            "\"chunkOffset\":4096",
            "\"chunkOffset\":4096,\"innerOffset\":10",
            1,
        );
        assert!(matches!(
            translate(shared.as_bytes(), loc.toc.offset),
            Err(FormatError::InvalidEntry { .. })
        ));
    }

    /// Seeded random edits of a valid blob (footer, TOC member, chunk members) and
    /// of its TOC JSON: never a panic, and whatever is accepted still reads back
    /// only verified bytes.
    #[test]
    fn mutations_never_panic() {
        let (good, loc) = blob(&files(), 1000, false);
        let json = toc_json(toc_of(&good, &loc), &loc)
            .map(|(j, _)| j)
            .unwrap_or_default();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut decoder = ChunkDecoder::new().unwrap_or_else(|e| panic!("{e}"));
        for _ in 0..3000 {
            let mut b = good.clone();
            for _ in 0..=(next() % 4) {
                let at = match next() % 3 {
                    0 => b.len() - 1 - (next() as usize % FOOTER_LEN),
                    1 => {
                        loc.toc.offset as usize + next() as usize % loc.toc.compressed_len as usize
                    }
                    _ => next() as usize % b.len(),
                };
                b[at] = next() as u8;
            }
            let size = b.len() as u64;
            let Ok(mut l) = parse_footer(&b[b.len() - 64..], size) else {
                continue;
            };
            l.toc_digest = None;
            let r = l.toc_range();
            let Some(toc) = b.get(r.start as usize..r.end as usize) else {
                continue;
            };
            if let Ok(index) = LayerIndex::decode(toc, &l, size) {
                for chunk in index.all_chunks() {
                    let r = chunk.compressed_range();
                    if let Some(bytes) = b.get(r.start as usize..r.end as usize) {
                        if let Ok(out) = decoder.decode(chunk, bytes) {
                            assert_eq!(Digest::of(&out), chunk.digest);
                        }
                    }
                }
            }
        }
        let text = String::from_utf8_lossy(&json).into_owned();
        let splices = [
            "-1",
            "1e30",
            "18446744073709551615",
            "null",
            "\"\"",
            "[]",
            "{}",
            "\"../x\"",
        ];
        for _ in 0..3000 {
            let mut t = text.clone();
            let at = next() as usize % t.len();
            if t.is_char_boundary(at) {
                t.insert_str(at, splices[next() as usize % splices.len()]);
            }
            let _ = index_from_toc_json(t.as_bytes(), &loc);
        }
    }
}
