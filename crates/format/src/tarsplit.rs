//! tar-split: the metadata that rebuilds a layer's exact tar from file contents.
//!
//! Format (github.com/vbatts/tar-split, `tar/storage`): JSON lines, one object
//! per entry, `position` counting from 0:
//! - `{"type":2,"payload":"<base64 raw bytes>","position":N}` — raw header and
//!   padding bytes, copied verbatim into the tar;
//! - `{"type":1,"name":"...","size":N,"payload":"<base64>","position":N}` — a
//!   file's content goes here; `payload` is the CRC-64 (Go's ISO table) of the
//!   content, 8 bytes big-endian, `null` for empty files; `size` is omitted when 0.
//!   Names that are not UTF-8 are carried base64-encoded in `name_raw`.
//!
//! Invariant of [`reassemble`]: every file's bytes are checked against its size and
//! CRC before the next segment is written.

use std::io::Write;

use base64::Engine as _;
use crc::{Crc, Table, CRC_64_GO_ISO};
use serde::Deserialize;

use super::error::{trunc, FormatError};
use super::footer::Extent;
use super::index::decompress_bounded;
use super::Result;

/// Cap on a tar-split's uncompressed size (it is about 1.4 bytes per tar header
/// byte, so this allows millions of entries).
pub const MAX_TAR_SPLIT_UNCOMPRESSED: u64 = 1 << 30;

/// Go's `crc64.MakeTable(crc64.ISO)` checksum, slice-by-16.
pub(crate) static CRC64: Crc<u64, Table<16>> = Crc::<u64, Table<16>>::new(&CRC_64_GO_ISO);

const SEGMENT: u8 = 2;
const FILE: u8 = 1;

/// Streams tar-split lines into a zstd encoder.
pub(crate) struct TarSplitWriter {
    enc: zstd::stream::write::Encoder<'static, Vec<u8>>,
    position: u64,
    uncompressed: u64,
    line: Vec<u8>,
}

impl TarSplitWriter {
    pub fn new(level: i32) -> Result<Self> {
        let enc = zstd::stream::write::Encoder::new(Vec::new(), level).map_err(|source| {
            FormatError::Io {
                context: "creating the tar-split compressor",
                source,
            }
        })?;
        Ok(TarSplitWriter {
            enc,
            position: 0,
            uncompressed: 0,
            line: Vec::with_capacity(4096),
        })
    }

    fn emit(&mut self) -> Result<()> {
        self.uncompressed += self.line.len() as u64;
        self.position += 1;
        self.enc
            .write_all(&self.line)
            .map_err(|source| FormatError::Io {
                context: "compressing the tar-split",
                source,
            })
    }

    /// A raw segment. `null_if_empty` mirrors Go's encoding of a nil slice.
    pub fn segment(&mut self, bytes: &[u8], null_if_empty: bool) -> Result<()> {
        self.line.clear();
        self.line.extend_from_slice(b"{\"type\":2,\"payload\":");
        if bytes.is_empty() && null_if_empty {
            self.line.extend_from_slice(b"null");
        } else {
            self.line.push(b'"');
            base64_append(&mut self.line, bytes);
            self.line.push(b'"');
        }
        self.finish_line()
    }

    /// A file entry; `crc` is `None` for empty files.
    pub fn file(&mut self, name: &str, size: u64, crc: Option<u64>) -> Result<()> {
        self.line.clear();
        self.line.extend_from_slice(b"{\"type\":1,\"name\":");
        serde_json::to_writer(&mut self.line, name).map_err(|e| FormatError::Io {
            context: "encoding the tar-split",
            source: e.into(),
        })?;
        if size > 0 {
            self.line.extend_from_slice(b",\"size\":");
            self.line.extend_from_slice(size.to_string().as_bytes());
        }
        self.line.extend_from_slice(b",\"payload\":");
        match crc {
            Some(c) => {
                self.line.push(b'"');
                base64_append(&mut self.line, &c.to_be_bytes());
                self.line.push(b'"');
            }
            None => self.line.extend_from_slice(b"null"),
        }
        self.finish_line()
    }

    fn finish_line(&mut self) -> Result<()> {
        self.line.extend_from_slice(b",\"position\":");
        self.line
            .extend_from_slice(self.position.to_string().as_bytes());
        self.line.extend_from_slice(b"}\n");
        self.emit()
    }

    /// The compressed tar-split and its uncompressed length.
    pub fn finish(self) -> Result<(Vec<u8>, u64)> {
        let compressed = self.enc.finish().map_err(|source| FormatError::Io {
            context: "finishing the tar-split",
            source,
        })?;
        Ok((compressed, self.uncompressed))
    }
}

fn base64_append(out: &mut Vec<u8>, bytes: &[u8]) {
    let engine = base64::engine::general_purpose::STANDARD;
    let start = out.len();
    out.resize(
        start + base64::encoded_len(bytes.len(), true).unwrap_or(0),
        0,
    );
    let n = engine.encode_slice(bytes, &mut out[start..]).unwrap_or(0);
    out.truncate(start + n);
}

/// One tar-split entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TarSplitEntry {
    /// Raw tar bytes (headers, padding, end-of-archive).
    Segment(Vec<u8>),
    /// A file's content of `size` bytes goes here.
    File {
        /// The tar entry name (as bytes: may come from `name_raw`).
        name: Vec<u8>,
        /// Content length.
        size: u64,
        /// CRC-64/GO-ISO of the content (`None` for empty files).
        crc64: Option<u64>,
    },
}

#[derive(Deserialize)]
struct RawLine {
    #[serde(rename = "type")]
    kind: u8,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    name_raw: Option<String>,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    payload: Option<String>,
}

/// Decompresses a tar-split fetched at `extent` (bounded by its declared size and
/// [`MAX_TAR_SPLIT_UNCOMPRESSED`]).
pub fn decompress(compressed: &[u8], extent: &Extent) -> Result<Vec<u8>> {
    if extent.uncompressed_len > MAX_TAR_SPLIT_UNCOMPRESSED {
        return Err(FormatError::TarSplit {
            reason: format!(
                "declared size {} over the {MAX_TAR_SPLIT_UNCOMPRESSED}-byte limit",
                extent.uncompressed_len
            ),
        });
    }
    if compressed.len() as u64 != extent.compressed_len {
        return Err(FormatError::TarSplit {
            reason: format!(
                "got {} compressed bytes, expected {}",
                compressed.len(),
                extent.compressed_len
            ),
        });
    }
    decompress_bounded(compressed, extent.uncompressed_len, "tar-split")
}

/// Iterates over the entries of decompressed tar-split JSON lines.
pub fn entries(json_lines: &[u8]) -> impl Iterator<Item = Result<TarSplitEntry>> + '_ {
    json_lines
        .split(|&b| b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .map(parse_line)
}

fn ts_err(reason: impl Into<String>) -> FormatError {
    FormatError::TarSplit {
        reason: reason.into(),
    }
}

fn parse_line(line: &[u8]) -> Result<TarSplitEntry> {
    let raw: RawLine =
        serde_json::from_slice(line).map_err(|e| ts_err(format!("bad line: {e}")))?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let payload = match raw.payload.as_deref() {
        None => None,
        Some(p) => Some(b64.decode(p).map_err(|_| ts_err("payload is not base64"))?),
    };
    match raw.kind {
        SEGMENT => Ok(TarSplitEntry::Segment(payload.unwrap_or_default())),
        FILE => {
            let name = match (raw.name_raw, raw.name) {
                (Some(r), _) if !r.is_empty() => b64
                    .decode(r)
                    .map_err(|_| ts_err("name_raw is not base64"))?,
                (_, Some(n)) => n.into_bytes(),
                _ => Vec::new(),
            };
            let crc64 = match payload {
                None => None,
                Some(p) => Some(u64::from_be_bytes(
                    p.as_slice()
                        .try_into()
                        .map_err(|_| ts_err("file checksum is not 8 bytes"))?,
                )),
            };
            Ok(TarSplitEntry::File {
                name,
                size: raw.size,
                crc64,
            })
        }
        t => Err(ts_err(format!("unknown entry type {t}"))),
    }
}

/// Counts and checksums file content on its way to the output.
struct Checked<'w, W: Write + ?Sized> {
    out: &'w mut W,
    crc: crc::Digest<'static, u64, Table<16>>,
    written: u64,
}

impl<W: Write + ?Sized> Write for Checked<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        self.crc.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Rebuilds the tar from tar-split lines and file contents.
///
/// For every file entry with `size > 0`, `content(name, size, writer)` must write
/// exactly the file's bytes; their length and CRC are checked. Returns the number
/// of tar bytes written.
pub fn reassemble<W, F>(json_lines: &[u8], mut content: F, out: &mut W) -> Result<u64>
where
    W: Write + ?Sized,
    F: FnMut(&[u8], u64, &mut dyn Write) -> Result<()>,
{
    let io = |source| FormatError::Io {
        context: "writing the reassembled tar",
        source,
    };
    let mut total = 0u64;
    for e in entries(json_lines) {
        match e? {
            TarSplitEntry::Segment(b) => {
                out.write_all(&b).map_err(io)?;
                total += b.len() as u64;
            }
            TarSplitEntry::File { size: 0, .. } => {}
            TarSplitEntry::File { name, size, crc64 } => {
                let mut w = Checked {
                    out: &mut *out,
                    crc: CRC64.digest(),
                    written: 0,
                };
                content(&name, size, &mut w)?;
                let (written, crc) = (w.written, w.crc.finalize());
                let shown = trunc(&String::from_utf8_lossy(&name));
                if written != size {
                    return Err(ts_err(format!(
                        "{shown:?}: content is {written} bytes, tar-split says {size}"
                    )));
                }
                if crc64.is_some_and(|c| c != crc) {
                    return Err(ts_err(format!(
                        "{shown:?}: content does not match the tar-split CRC"
                    )));
                }
                total += size;
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reassembles `lines` with `payload` as every file's content.
    fn reassemble_with(lines: &[u8], payload: &[u8]) -> (Result<u64>, Vec<u8>) {
        let mut out = Vec::new();
        let r = reassemble(
            lines,
            |_, _, w| {
                w.write_all(payload).map_err(|source| FormatError::Io {
                    context: "t",
                    source,
                })
            },
            &mut out,
        );
        (r, out)
    }

    #[test]
    fn crc_matches_go() {
        // Go: crc64.Checksum([]byte("123456789"), crc64.MakeTable(crc64.ISO)).
        assert_eq!(CRC64.checksum(b"123456789"), 0xb90956c775a41001);
    }

    #[test]
    fn writes_and_reads_lines() {
        let mut w = TarSplitWriter::new(3).unwrap();
        w.segment(b"HDR", false).unwrap();
        w.file("a \"quoted\" name", 5, Some(CRC64.checksum(b"hello")))
            .unwrap();
        w.file("empty", 0, None).unwrap();
        w.segment(b"", true).unwrap();
        w.segment(b"", false).unwrap();
        let (z, n) = w.finish().unwrap();
        let lines = decompress(
            &z,
            &Extent {
                offset: 8,
                compressed_len: z.len() as u64,
                uncompressed_len: n,
            },
        )
        .unwrap();
        let text = String::from_utf8(lines.clone()).unwrap();
        assert_eq!(
            text.lines().next().unwrap(),
            r#"{"type":2,"payload":"SERS","position":0}"#
        );
        assert!(text.contains(r#"{"type":1,"name":"empty","payload":null,"position":2}"#));
        assert!(text.contains(r#"{"type":2,"payload":"","position":4}"#));
        let all: Vec<_> = entries(&lines).collect::<Result<_>>().unwrap();
        assert_eq!(all.len(), 5);
        let (r, out) = reassemble_with(&lines, b"hello");
        r.unwrap();
        assert_eq!(out, b"HDRhello");
        let (r, _) = reassemble_with(&lines, b"hellO");
        assert!(matches!(r, Err(FormatError::TarSplit { .. })));
        assert!(entries(b"{\"type\":7}").next().unwrap().is_err());
        assert!(entries(b"not json").next().unwrap().is_err());
    }
}
