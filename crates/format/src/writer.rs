//! Converting a tar into a zstd:chunked blob (current generation).
//!
//! Output layout, matching what containers-storage writes:
//! - tar headers and padding go into ordinary zstd frames;
//! - each regular file's payload is cut into content-defined chunks (FastCDC
//!   2020), runs of zeros of at least `zero_run_min` bytes become `zeros`
//!   chunks, and every chunk is its own zstd frame starting exactly at its TOC
//!   `offset` — one chunk, one range request, no header to skip;
//! - the end-of-archive blocks (and any trailing bytes) in a final frame;
//! - skippable frames: zstd(TOC JSON), zstd(tar-split), the 64-byte footer.
//!
//! Invariants: a plain zstd decoder yields the input tar byte for byte (so the
//! layer's diff_id is the sha256 of the input), and tar-split + file contents
//! rebuild it too. Memory is bounded by the read buffer (independent of file
//! sizes), the TOC and the tar-split. The input is read once; every byte is
//! hashed while it streams.

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};

use base64::Engine as _;
use fastcdc::v2020 as cdc;

use super::annotations as ann;
use super::error::{trunc, FormatError};
use super::footer::{new_footer_payload, Extent, SKIPPABLE_FRAME_MAGIC, SKIPPABLE_HEADER_LEN};
use super::index::{normalize, MAX_TOC_UNCOMPRESSED};
use super::tar::{next_header, BlockSource, Kind, BLOCK};
use super::tarsplit::{TarSplitWriter, CRC64};
use super::toc::{format_time, OutEntry, PREFETCH_FIELD};
use super::Result;
use zest_oci::digest::{Digest, Hasher};

/// Writer settings.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// zstd compression level (default 3).
    pub level: i32,
    /// Minimum content-defined chunk size (default 16 KiB).
    pub min_chunk: u32,
    /// Average chunk size (default 64 KiB).
    pub avg_chunk: u32,
    /// Maximum chunk size (default 256 KiB).
    pub max_chunk: u32,
    /// Runs of zeros at least this long become `zeros` chunks (default 1 KiB,
    /// minimum 64).
    pub zero_run_min: u32,
    /// Paths a startup profile needs first. The caller puts them first in the
    /// tar; the writer records the blob offset where they end as the TOC's
    /// `zest.prefetch` field.
    pub prioritized: Vec<String>,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            level: 3,
            min_chunk: 16 << 10,
            avg_chunk: 64 << 10,
            max_chunk: 256 << 10,
            zero_run_min: 1 << 10,
            prioritized: Vec::new(),
        }
    }
}

/// What [`write_chunked`] produced.
#[derive(Debug, Clone)]
pub struct WriteSummary {
    /// sha256 of the blob written.
    pub blob_digest: Digest,
    /// Bytes written.
    pub blob_size: u64,
    /// sha256 of the input tar (the layer's diff_id).
    pub diff_id: Digest,
    /// sha256 of the compressed TOC bytes.
    pub toc_digest: Digest,
    /// TOC position.
    pub toc: Extent,
    /// tar-split position.
    pub tar_split: Extent,
    /// sha256 of the compressed tar-split (the TOC's `tarSplitDigest`).
    pub tar_split_digest: Digest,
    /// Layer annotations to put on the descriptor (`manifest-checksum`,
    /// `manifest-position`, `tarsplit-position`).
    pub annotations: BTreeMap<String, String>,
    /// Tar entries converted.
    pub entries: u64,
    /// Payload chunks written.
    pub chunks: u64,
    /// End of the prioritized files' data (`None` without prioritized paths found).
    pub prefetch_end: Option<u64>,
}

/// Converts `tar` into a zstd:chunked blob written to `out`.
///
/// Rejects archives the format cannot represent faithfully (non-UTF-8 names,
/// names that are absolute or contain `..`, duplicate paths, GNU sparse files,
/// unknown entry types). `out` is written sequentially; wrap it in a
/// `BufWriter` if it is unbuffered.
pub fn write_chunked<R: Read, W: Write>(
    tar: R,
    out: W,
    opts: &WriteOptions,
) -> Result<WriteSummary> {
    let chunker = Chunker::new(opts)?;
    let buf_len = (4usize << 20).max(2 * opts.max_chunk as usize + 2 * opts.zero_run_min as usize);
    let w = Writer {
        input: Input::new(tar, buf_len),
        out: Out {
            w: out,
            pos: 0,
            hasher: Hasher::new(),
        },
        frames: Frames::new(opts.level)?,
        ts: TarSplitWriter::new(opts.level)?,
        toc: Vec::with_capacity(64 << 10),
        toc_entries: 0,
        chunker,
        seen: HashSet::new(),
        prioritized: opts
            .prioritized
            .iter()
            .filter_map(|p| normalize(p).ok().map(|p| p.into_owned()))
            .collect(),
        prefetch_end: None,
        entries: 0,
        chunks: 0,
    };
    w.run()
}

/// Meta frames are cut when they reach this size (any frame boundary is fine
/// for a plain decoder; this bounds the buffer).
const META_FRAME_MAX: usize = 1 << 20;
/// Trailing bytes after the end-of-archive marker kept at most.
const MAX_TRAILER: u64 = 64 << 20;

struct Writer<R, W> {
    input: Input<R>,
    out: Out<W>,
    frames: Frames,
    ts: TarSplitWriter,
    toc: Vec<u8>,
    toc_entries: u64,
    chunker: Chunker,
    seen: HashSet<String>,
    prioritized: HashSet<String>,
    prefetch_end: Option<u64>,
    entries: u64,
    chunks: u64,
}

/// One chunk as written.
struct ChunkOut {
    offset: u64,
    end: u64,
    file_offset: u64,
    len: u64,
    digest: Digest,
    zeros: bool,
}

impl<R: Read, W: Write> Writer<R, W> {
    fn run(mut self) -> Result<WriteSummary> {
        self.toc.extend_from_slice(b"{\"version\":1,\"entries\":[");
        // Raw bytes since the last tar-split segment (padding + headers).
        let mut seg: Vec<u8> = Vec::with_capacity(4096);
        while let Some(h) = next_header(&mut self.input, &mut seg)? {
            self.entries += 1;
            let clean = normalize(&h.name).map_err(|reason| FormatError::InvalidTar {
                offset: h.offset,
                reason: format!("entry {:?}: {reason}", trunc(&h.name)),
            })?;
            if clean.is_empty() && h.kind != Kind::Dir {
                return Err(FormatError::InvalidTar {
                    offset: h.offset,
                    reason: format!(
                        "entry {:?} names the root but is not a directory",
                        trunc(&h.name)
                    ),
                });
            }
            // tar-split refuses duplicate paths; so must we.
            if !self.seen.insert(clean.to_string()) {
                return Err(FormatError::InvalidTar {
                    offset: h.offset,
                    reason: format!(
                        "path {:?} appears twice (zstd:chunked cannot represent it)",
                        trunc(&h.name)
                    ),
                });
            }
            if h.kind == Kind::HardLink {
                normalize(&h.link_name).map_err(|reason| FormatError::InvalidTar {
                    offset: h.offset,
                    reason: format!("hard link {:?} target: {reason}", trunc(&h.name)),
                })?;
            }
            self.ts.segment(&seg, false)?;
            self.frames.meta.extend_from_slice(&seg);
            seg.clear();

            let mut chunks = Vec::new();
            let mut file_digest = None;
            let mut crc = None;
            if h.size > 0 {
                self.frames.flush_meta(&mut self.out)?;
                let mut sink = FileSink {
                    frames: &mut self.frames,
                    out: &mut self.out,
                    chunks: &mut chunks,
                    file_hasher: None,
                    crc: CRC64.digest(),
                    file_offset: 0,
                };
                let mut remaining = h.size;
                let mut state = ChunkState::default();
                while remaining > 0 {
                    let want = usize::try_from(remaining).unwrap_or(usize::MAX);
                    self.input.fill(want)?;
                    let avail = self.input.data().len().min(want);
                    if avail == 0 || (self.input.eof && (avail as u64) < remaining) {
                        return Err(FormatError::InvalidTar {
                            offset: self.input.offset,
                            reason: format!(
                                "archive ends inside the content of {:?}",
                                trunc(&h.name)
                            ),
                        });
                    }
                    let window = &self.input.data()[..avail];
                    let last = avail as u64 == remaining;
                    let used = self.chunker.process(window, last, &mut state, &mut sink)?;
                    // A non-final window is a full buffer (at least twice the
                    // maximum chunk), so the chunker always makes progress; guard
                    // the loop anyway rather than trust that reasoning blindly.
                    if used == 0 && !last {
                        return Err(FormatError::InvalidTar {
                            offset: self.input.offset,
                            reason: "internal error: chunker made no progress".into(),
                        });
                    }
                    self.input.consume(used);
                    remaining -= used as u64;
                }
                file_digest = sink.file_hasher.take().map(Hasher::finish);
                crc = Some(sink.crc.finalize());
                self.chunks += chunks.len() as u64;
                // Padding to the block boundary belongs with the next header.
                let pad = (BLOCK as u64 - h.size % BLOCK as u64) % BLOCK as u64;
                let start = seg.len();
                seg.resize(start + pad as usize, 0);
                if pad > 0 && !self.input.read_exact_or_eof(&mut seg[start..])? {
                    return Err(FormatError::InvalidTar {
                        offset: self.input.offset,
                        reason: "archive ends before the padding of the last file".into(),
                    });
                }
            }
            self.ts.file(&h.name, h.size, crc)?;
            if let (Some(last), true) = (chunks.last(), self.prioritized.contains(clean.as_ref())) {
                self.prefetch_end = Some(self.prefetch_end.unwrap_or(0).max(last.end));
            }
            self.toc_entry(&h, file_digest, &chunks)?;
            if self.frames.meta.len() >= META_FRAME_MAX {
                self.frames.flush_meta(&mut self.out)?;
            }
        }

        // End of archive: `seg` holds the last padding and the first zero block.
        // Like tar-split, emit them with the second zero block, then the rest.
        let start = seg.len();
        seg.resize(start + BLOCK, 0);
        let got = self.input.read_up_to(&mut seg[start..])?;
        seg.truncate(start + got);
        self.ts.segment(&seg, true)?;
        self.frames.meta.extend_from_slice(&seg);
        let mut rest = Vec::new();
        loop {
            self.input.fill(1)?;
            let data = self.input.data();
            if data.is_empty() {
                break;
            }
            if rest.len() as u64 + data.len() as u64 > MAX_TRAILER {
                return Err(FormatError::InvalidTar {
                    offset: self.input.offset,
                    reason: format!(
                        "more than {MAX_TRAILER} bytes after the end-of-archive marker"
                    ),
                });
            }
            rest.extend_from_slice(data);
            self.frames.meta.extend_from_slice(data);
            let n = data.len();
            self.input.consume(n);
            if self.frames.meta.len() >= META_FRAME_MAX {
                self.frames.flush_meta(&mut self.out)?;
            }
        }
        self.ts.segment(&rest, false)?;
        self.frames.flush_meta(&mut self.out)?;
        self.finish()
    }

    fn toc_entry(
        &mut self,
        h: &super::tar::Header,
        file_digest: Option<Digest>,
        chunks: &[ChunkOut],
    ) -> Result<()> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut e = OutEntry {
            kind: h.kind.toc_type(),
            name: &h.name,
            link_name: if matches!(h.kind, Kind::HardLink | Kind::Symlink) {
                &h.link_name
            } else {
                ""
            },
            mode: h.mode,
            size: h.size,
            uid: h.uid,
            gid: h.gid,
            user_name: &h.uname,
            group_name: &h.gname,
            modtime: format_time(h.mtime),
            accesstime: h.atime.and_then(format_time),
            changetime: h.ctime.and_then(format_time),
            ..OutEntry::default()
        };
        if matches!(h.kind, Kind::Char | Kind::Block) {
            e.dev_major = h.dev_major;
            e.dev_minor = h.dev_minor;
        }
        for (k, v) in &h.xattrs {
            e.xattrs.insert(k.as_str(), b64.encode(v));
        }
        if let (Some(first), Some(last)) = (chunks.first(), chunks.last()) {
            e.digest = file_digest;
            e.offset = first.offset;
            e.end_offset = last.end;
            if chunks.len() > 1 {
                e.chunk_size = first.len;
                e.chunk_digest = Some(first.digest);
                e.chunk_type = if first.zeros { "zeros" } else { "" };
            }
        }
        self.push_toc(&e)?;
        if chunks.len() > 1 {
            for c in &chunks[1..] {
                let ce = OutEntry {
                    kind: "chunk",
                    name: &h.name,
                    offset: c.offset,
                    chunk_size: c.len,
                    chunk_offset: c.file_offset,
                    chunk_digest: Some(c.digest),
                    chunk_type: if c.zeros { "zeros" } else { "" },
                    ..OutEntry::default()
                };
                self.push_toc(&ce)?;
            }
        }
        Ok(())
    }

    fn push_toc(&mut self, e: &OutEntry<'_>) -> Result<()> {
        if self.toc_entries > 0 {
            self.toc.push(b',');
        }
        self.toc_entries += 1;
        serde_json::to_writer(&mut self.toc, e).map_err(|err| FormatError::Io {
            context: "encoding the TOC",
            source: err.into(),
        })?;
        if self.toc.len() as u64 > MAX_TOC_UNCOMPRESSED {
            return Err(FormatError::TocTooLarge {
                declared: self.toc.len() as u64,
                limit: MAX_TOC_UNCOMPRESSED,
            });
        }
        Ok(())
    }

    fn finish(self) -> Result<WriteSummary> {
        let Writer {
            input,
            mut out,
            mut frames,
            ts,
            toc: mut toc_json,
            prefetch_end,
            entries,
            chunks,
            ..
        } = self;
        let diff_id = input.hasher.finish();
        let (ts_compressed, ts_len) = ts.finish()?;
        let tar_split_digest = Digest::of(&ts_compressed);
        toc_json.extend_from_slice(b"],\"tarSplitDigest\":\"");
        toc_json.extend_from_slice(tar_split_digest.to_string().as_bytes());
        toc_json.push(b'"');
        if let Some(end) = prefetch_end {
            toc_json
                .extend_from_slice(format!(",\"{PREFETCH_FIELD}\":{{\"end\":{end}}}").as_bytes());
        }
        toc_json.push(b'}');
        if toc_json.len() as u64 > MAX_TOC_UNCOMPRESSED {
            return Err(FormatError::TocTooLarge {
                declared: toc_json.len() as u64,
                limit: MAX_TOC_UNCOMPRESSED,
            });
        }
        let toc_compressed = frames.compress(&toc_json)?.to_vec();
        let toc_digest = Digest::of(&toc_compressed);

        let toc = Extent {
            offset: out.pos + SKIPPABLE_HEADER_LEN,
            compressed_len: toc_compressed.len() as u64,
            uncompressed_len: toc_json.len() as u64,
        };
        out.skippable(&toc_compressed)?;
        let tar_split = Extent {
            offset: out.pos + SKIPPABLE_HEADER_LEN,
            compressed_len: ts_compressed.len() as u64,
            uncompressed_len: ts_len,
        };
        out.skippable(&ts_compressed)?;
        out.skippable(&new_footer_payload(&toc, &tar_split))?;
        out.w.flush().map_err(|source| FormatError::Io {
            context: "flushing the output blob",
            source,
        })?;

        let mut annotations = BTreeMap::new();
        annotations.insert(ann::MANIFEST_CHECKSUM.to_owned(), toc_digest.to_string());
        annotations.insert(
            ann::MANIFEST_POSITION.to_owned(),
            format!(
                "{}:{}:{}:1",
                toc.offset, toc.compressed_len, toc.uncompressed_len
            ),
        );
        annotations.insert(
            ann::TARSPLIT_POSITION.to_owned(),
            format!(
                "{}:{}:{}",
                tar_split.offset, tar_split.compressed_len, tar_split.uncompressed_len
            ),
        );
        Ok(WriteSummary {
            blob_digest: out.hasher.finish(),
            blob_size: out.pos,
            diff_id,
            toc_digest,
            toc,
            tar_split,
            tar_split_digest,
            annotations,
            entries,
            chunks,
            prefetch_end,
        })
    }
}

/// Buffered input that hashes everything it reads (the diff_id).
struct Input<R> {
    r: R,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Input offset of `buf[start]`.
    offset: u64,
    hasher: Hasher,
    eof: bool,
}

impl<R: Read> Input<R> {
    fn new(r: R, len: usize) -> Self {
        Input {
            r,
            buf: vec![0u8; len].into_boxed_slice(),
            start: 0,
            end: 0,
            offset: 0,
            hasher: Hasher::new(),
            eof: false,
        }
    }

    /// Makes at least `min(want, buffer size)` bytes available unless EOF comes first.
    fn fill(&mut self, want: usize) -> Result<()> {
        let want = want.min(self.buf.len());
        if self.end - self.start >= want || self.eof {
            return Ok(());
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        // Fill the whole buffer when possible: fewer, larger windows for the chunker.
        while self.end < self.buf.len() {
            match self.r.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => {
                    self.hasher.update(&self.buf[self.end..self.end + n]);
                    self.end += n;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(FormatError::Io {
                        context: "reading the input tar",
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        let n = n.min(self.end - self.start);
        self.start += n;
        self.offset += n as u64;
    }

    /// Reads up to `buf.len()` bytes; returns how many (fewer only at EOF).
    fn read_up_to(&mut self, buf: &mut [u8]) -> Result<usize> {
        self.fill(buf.len())?;
        let n = self.data().len().min(buf.len());
        buf[..n].copy_from_slice(&self.data()[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl<R: Read> BlockSource for Input<R> {
    fn read_exact_or_eof(&mut self, buf: &mut [u8]) -> Result<bool> {
        let at = self.offset;
        let n = self.read_up_to(buf)?;
        if n == 0 && !buf.is_empty() {
            return Ok(false);
        }
        if n < buf.len() {
            return Err(FormatError::InvalidTar {
                offset: at,
                reason: "archive truncated in the middle of a block".into(),
            });
        }
        Ok(true)
    }

    fn offset(&self) -> u64 {
        self.offset
    }
}

/// The output blob: counts and hashes every byte.
struct Out<W> {
    w: W,
    pos: u64,
    hasher: Hasher,
}

impl<W: Write> Out<W> {
    fn write(&mut self, b: &[u8]) -> Result<()> {
        self.w.write_all(b).map_err(|source| FormatError::Io {
            context: "writing the output blob",
            source,
        })?;
        self.hasher.update(b);
        self.pos += b.len() as u64;
        Ok(())
    }

    fn skippable(&mut self, payload: &[u8]) -> Result<()> {
        let len = u32::try_from(payload.len()).map_err(|_| FormatError::LimitExceeded {
            reason: "metadata frame over 4 GiB".into(),
        })?;
        self.write(&SKIPPABLE_FRAME_MAGIC)?;
        self.write(&len.to_le_bytes())?;
        self.write(payload)
    }
}

/// zstd frame production with one reused compression context.
struct Frames {
    cctx: zstd::bulk::Compressor<'static>,
    scratch: Vec<u8>,
    /// Header/padding bytes waiting for their frame.
    meta: Vec<u8>,
}

impl Frames {
    fn new(level: i32) -> Result<Self> {
        let cctx = zstd::bulk::Compressor::new(level).map_err(|source| FormatError::Io {
            context: "creating the zstd compressor",
            source,
        })?;
        Ok(Frames {
            cctx,
            scratch: Vec::with_capacity(zstd::zstd_safe::compress_bound(512 << 10)),
            meta: Vec::with_capacity(64 << 10),
        })
    }

    /// Compresses `data` into one frame, returned from the scratch buffer.
    fn compress(&mut self, data: &[u8]) -> Result<&[u8]> {
        self.scratch.clear();
        self.scratch
            .reserve(zstd::zstd_safe::compress_bound(data.len()));
        self.cctx
            .compress_to_buffer(data, &mut self.scratch)
            .map_err(|source| FormatError::Io {
                context: "zstd compression",
                source,
            })?;
        Ok(&self.scratch)
    }

    fn flush_meta<W: Write>(&mut self, out: &mut Out<W>) -> Result<()> {
        if self.meta.is_empty() {
            return Ok(());
        }
        let meta = std::mem::take(&mut self.meta);
        let r = self.compress(&meta).map(|_| ());
        self.meta = meta;
        r?;
        out.write(&self.scratch)?;
        self.meta.clear();
        Ok(())
    }
}

/// Builds a zstd frame of `n` zeros from RLE blocks: a few bytes per 128 KiB,
/// a 128 KiB window (so streaming decoders never need a big buffer), and the
/// content size in the header.
fn zeros_frame(n: u64, out: &mut Vec<u8>) {
    const BLOCK_MAX: u64 = 128 << 10;
    out.clear();
    out.extend_from_slice(&[0x28, 0xb5, 0x2f, 0xfd]);
    // Frame header descriptor: 8-byte content size, not single-segment, no checksum.
    out.push(0b1100_0000);
    // Window descriptor: 2^(10 + 7) = 128 KiB.
    out.push(7 << 3);
    out.extend_from_slice(&n.to_le_bytes());
    let mut left = n;
    loop {
        let size = left.min(BLOCK_MAX);
        left -= size;
        let last = u32::from(left == 0);
        // Block header: last flag, type 1 (RLE), size; then the repeated byte.
        let header = last | (1 << 1) | ((size as u32) << 3);
        out.extend_from_slice(&header.to_le_bytes()[..3]);
        out.push(0);
        if left == 0 {
            break;
        }
    }
}

/// Where the chunker's output goes.
trait ChunkSink {
    fn data(&mut self, bytes: &[u8]) -> Result<()>;
    fn zeros(&mut self, n: u64) -> Result<()>;
}

struct FileSink<'a, W> {
    frames: &'a mut Frames,
    out: &'a mut Out<W>,
    chunks: &'a mut Vec<ChunkOut>,
    /// Whole-file hash; starts as a copy of the first chunk's hash state so a
    /// single-chunk file is hashed once.
    file_hasher: Option<Hasher>,
    crc: crc::Digest<'static, u64, crc::Table<16>>,
    file_offset: u64,
}

static ZEROS: [u8; 64 << 10] = [0u8; 64 << 10];

impl<W: Write> FileSink<'_, W> {
    fn record(&mut self, offset: u64, len: u64, chunk_hasher: Hasher, zeros: bool) {
        self.chunks.push(ChunkOut {
            offset,
            end: self.out.pos,
            file_offset: self.file_offset,
            len,
            digest: chunk_hasher.finish(),
            zeros,
        });
        self.file_offset += len;
    }
}

impl<W: Write> ChunkSink for FileSink<'_, W> {
    fn data(&mut self, bytes: &[u8]) -> Result<()> {
        let mut h = Hasher::new();
        h.update(bytes);
        match &mut self.file_hasher {
            Some(f) => f.update(bytes),
            None => self.file_hasher = Some(h.clone()),
        }
        self.crc.update(bytes);
        let offset = self.out.pos;
        self.frames.compress(bytes)?;
        self.out.write(&self.frames.scratch)?;
        self.record(offset, bytes.len() as u64, h, false);
        Ok(())
    }

    fn zeros(&mut self, n: u64) -> Result<()> {
        let mut h = Hasher::new();
        let mut f = self.file_hasher.take();
        let mut left = n;
        while left > 0 {
            let k = left.min(ZEROS.len() as u64) as usize;
            h.update(&ZEROS[..k]);
            if let Some(f) = &mut f {
                f.update(&ZEROS[..k]);
            }
            self.crc.update(&ZEROS[..k]);
            left -= k as u64;
        }
        self.file_hasher = Some(f.unwrap_or_else(|| h.clone()));
        let offset = self.out.pos;
        zeros_frame(n, &mut self.frames.scratch);
        self.out.write(&self.frames.scratch)?;
        self.record(offset, n, h, true);
        Ok(())
    }
}

/// Content-defined chunking with zero-run detection over a sliding window.
struct Chunker {
    min: usize,
    avg: usize,
    max: usize,
    masks: (u64, u64),
    zero_min: usize,
}

/// Per-file chunker state carried across windows.
#[derive(Default)]
struct ChunkState {
    /// Zeros counted so far in a run that may continue into the next window.
    zero_run: Option<u64>,
}

impl Chunker {
    fn new(o: &WriteOptions) -> Result<Self> {
        let bad = |reason: String| Err(FormatError::InvalidOptions { reason });
        if !(cdc::MINIMUM_MIN..=cdc::MINIMUM_MAX).contains(&o.min_chunk)
            || !(cdc::AVERAGE_MIN..=cdc::AVERAGE_MAX).contains(&o.avg_chunk)
            || !(cdc::MAXIMUM_MIN..=cdc::MAXIMUM_MAX).contains(&o.max_chunk)
            || o.min_chunk > o.avg_chunk
            || o.avg_chunk > o.max_chunk
        {
            return bad(format!(
                "chunk sizes min {} avg {} max {} must satisfy {}..={} <= {}..={} <= {}..={}",
                o.min_chunk,
                o.avg_chunk,
                o.max_chunk,
                cdc::MINIMUM_MIN,
                cdc::MINIMUM_MAX,
                cdc::AVERAGE_MIN,
                cdc::AVERAGE_MAX,
                cdc::MAXIMUM_MIN,
                cdc::MAXIMUM_MAX
            ));
        }
        if !(64..=(1 << 20)).contains(&o.zero_run_min) {
            return bad(format!(
                "zero_run_min {} must be in 64..=1048576",
                o.zero_run_min
            ));
        }
        if !(1..=22).contains(&o.level) {
            return bad(format!("zstd level {} must be in 1..=22", o.level));
        }
        // FastCDC normalization level 1, as `FastCDC::new` uses.
        let bits = cdc::logarithm2(o.avg_chunk) as usize;
        let masks = (cdc::MASKS[bits + 1], cdc::MASKS[bits - 1]);
        Ok(Chunker {
            min: o.min_chunk as usize,
            avg: o.avg_chunk as usize,
            max: o.max_chunk as usize,
            masks,
            zero_min: o.zero_run_min as usize,
        })
    }

    /// Consumes a prefix of `window` (the next bytes of the file), emitting every
    /// chunk whose boundaries are final. `last` says the window ends the file.
    /// Returns the bytes consumed; the caller refills and calls again.
    fn process(
        &self,
        window: &[u8],
        last: bool,
        st: &mut ChunkState,
        sink: &mut impl ChunkSink,
    ) -> Result<usize> {
        let mut pos = 0usize;
        loop {
            if let Some(count) = st.zero_run {
                let z = leading_zeros(&window[pos..]);
                pos += z;
                let count = count + z as u64;
                if pos == window.len() && !last {
                    st.zero_run = Some(count);
                    return Ok(pos);
                }
                st.zero_run = None;
                sink.zeros(count)?;
                continue;
            }
            let rest = &window[pos..];
            if rest.is_empty() {
                return Ok(pos);
            }
            if let Some(s) = find_zero_run(rest, self.zero_min) {
                // Everything before the run is final data.
                self.cut(&rest[..s], true, sink)?;
                pos += s;
                st.zero_run = Some(0);
                continue;
            }
            if last {
                self.cut(rest, true, sink)?;
                return Ok(window.len());
            }
            // Trailing zeros might begin a run that continues: leave them.
            let region = &rest[..rest.len() - trailing_zeros(rest)];
            return Ok(pos + self.cut(region, false, sink)?);
        }
    }

    /// Cuts `region` into chunks. Unless `fin`, stops while less than `max`
    /// bytes remain, since the cut point could depend on bytes not seen yet.
    fn cut(&self, region: &[u8], fin: bool, sink: &mut impl ChunkSink) -> Result<usize> {
        let mut p = 0usize;
        while p < region.len() {
            let rem = region.len() - p;
            if !fin && rem < self.max {
                break;
            }
            let (ms, ml) = self.masks;
            let (_, n) = cdc::cut(
                &region[p..],
                self.min,
                self.avg,
                self.max,
                ms,
                ml,
                ms << 1,
                ml << 1,
            );
            let n = n.clamp(1, rem);
            sink.data(&region[p..p + n])?;
            p += n;
        }
        Ok(p)
    }
}

fn word(b: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[i..i + 8]);
    u64::from_ne_bytes(a)
}

fn leading_zeros(b: &[u8]) -> usize {
    let mut i = 0;
    while i + 8 <= b.len() && word(b, i) == 0 {
        i += 8;
    }
    while i < b.len() && b[i] == 0 {
        i += 1;
    }
    i
}

fn trailing_zeros(b: &[u8]) -> usize {
    b.iter().rev().take_while(|&&x| x == 0).count()
}

/// Start of the first run of at least `min` zero bytes (a run reaching the end of
/// `b` counts if it is already `min` long).
fn find_zero_run(b: &[u8], min: usize) -> Option<usize> {
    let mut i = 0usize;
    // A run of >= 64 zeros covers at least one whole 8-byte step.
    while i + 8 <= b.len() {
        if word(b, i) != 0 {
            i += 8;
            continue;
        }
        let mut start = i;
        while start > 0 && b[start - 1] == 0 {
            start -= 1;
        }
        let end = i + leading_zeros(&b[i..]);
        if end - start >= min {
            return Some(start);
        }
        // b[end] is non-zero (or the end): later back-scans stop after it.
        i = end + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Collect(Vec<(bool, Vec<u8>)>);
    impl ChunkSink for Collect {
        fn data(&mut self, b: &[u8]) -> Result<()> {
            self.0.push((false, b.to_vec()));
            Ok(())
        }
        fn zeros(&mut self, n: u64) -> Result<()> {
            self.0.push((true, vec![0; n as usize]));
            Ok(())
        }
    }

    fn chunk_all(data: &[u8], window: usize) -> Vec<(bool, Vec<u8>)> {
        let c = Chunker::new(&WriteOptions {
            min_chunk: 256,
            avg_chunk: 1024,
            max_chunk: 4096,
            zero_run_min: 128,
            ..WriteOptions::default()
        })
        .unwrap();
        let mut out = Collect::default();
        let mut st = ChunkState::default();
        let mut pos = 0;
        let mut buf: Vec<u8> = Vec::new();
        while pos < data.len() || !buf.is_empty() {
            // Emulate a refilling window of at most `window` bytes.
            let take = (window - buf.len()).min(data.len() - pos);
            buf.extend_from_slice(&data[pos..pos + take]);
            pos += take;
            let last = pos == data.len();
            let used = c.process(&buf, last, &mut st, &mut out).unwrap();
            buf.drain(..used);
            if last && buf.is_empty() {
                break;
            }
        }
        out.0
    }

    #[test]
    fn chunking_is_independent_of_window_size_and_finds_zero_runs() {
        let mut data = Vec::new();
        let mut x: u32 = 1;
        for i in 0..200_000u32 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            data.push((x >> 16) as u8);
            if i % 50_000 == 0 {
                data.extend(std::iter::repeat_n(0u8, 300 + i as usize / 100));
            }
            if i % 7_000 == 0 {
                data.extend(std::iter::repeat_n(0u8, 100)); // too short to be a run
            }
        }
        data.extend(std::iter::repeat_n(0u8, 5000));
        let reference = chunk_all(&data, 10_000_000);
        for w in [4096 + 256, 5000, 9000, 65536] {
            assert_eq!(chunk_all(&data, w), reference, "window {w}");
        }
        let joined: Vec<u8> = reference.iter().flat_map(|c| c.1.clone()).collect();
        assert_eq!(joined, data);
        let zero_chunks: Vec<usize> = reference
            .iter()
            .filter(|c| c.0)
            .map(|c| c.1.len())
            .collect();
        // At i = 0 both runs are adjacent: 300 + 100.
        assert_eq!(zero_chunks, [400, 800, 1300, 1800, 5000]);
        assert!(reference.iter().filter(|c| !c.0).all(|c| c.1.len() <= 4096));
        assert!(reference.iter().filter(|c| !c.0).all(|c| !c.1.is_empty()));
    }

    #[test]
    fn zero_run_search() {
        let mut b = vec![1u8; 100];
        b.extend(std::iter::repeat_n(0u8, 63));
        b.push(1);
        b.extend(std::iter::repeat_n(0u8, 65));
        b.push(2);
        assert_eq!(find_zero_run(&b, 64), Some(164));
        assert_eq!(find_zero_run(&b, 66), None);
        assert_eq!(find_zero_run(&[0u8; 64], 64), Some(0));
        assert_eq!(find_zero_run(&[0u8; 7], 1), None);
    }

    #[test]
    fn zero_frames_decode() {
        let mut f = Vec::new();
        for n in [1u64, 1024, 128 << 10, (128 << 10) + 1, 3 << 20] {
            zeros_frame(n, &mut f);
            let d = zstd::stream::decode_all(&f[..]).unwrap();
            assert_eq!(d.len() as u64, n);
            assert!(d.iter().all(|&b| b == 0));
        }
    }
}
