//! [`LayerIndex`]: the validated, compact in-memory model of one layer's TOC.
//!
//! Layout (about 150 bytes per entry for a typical layer):
//! - one byte arena holds every name, symlink target and xattr name/value;
//!   records refer to it by `(u32 offset, u32 len)` spans;
//! - `entries` holds one fixed-size record per entry; `EntryId` is its index and
//!   the inode number is `index + 1`, so inode numbers are deterministic for a TOC
//!   (root = 1);
//! - `chunks` holds every file's chunks, each file's contiguous and in file order;
//! - `dirents` holds entry indices sorted by `(parent, name)`; each directory owns
//!   one contiguous slice, so `lookup` is a binary search and `readdir` a slice;
//! - rare data (xattrs, atime/ctime, whole-file digests of multi-chunk files) lives
//!   in side tables sorted by entry index.
//!
//! Hard links are records in `entries` that carry only a name and the target's
//! index: `lookup`, `children` and `entry` resolve them, so every name of a file
//! yields the same `EntryId` and inode, and `nlink` counts the names.
//!
//! Whiteouts `.wh.NAME` become entries of kind [`EntryKind::Whiteout`] named `NAME`
//! (a real `NAME` in the same directory wins over the whiteout); the opaque
//! marker `.wh..wh..opq` becomes a flag on its directory and no entry.

use std::collections::HashMap;
use std::ops::Range;

use base64::Engine as _;

use super::error::{trunc, FormatError};
use super::footer::{Generation, TocLocation};
use super::toc::{parse_time, RawEntry, TocHeader, TocSeed};
use super::Result;
use zest_oci::digest::Digest;

/// Hard cap on a TOC's uncompressed size (podman's limit): larger is hostile.
pub const MAX_TOC_UNCOMPRESSED: u64 = 150 << 20;

/// Largest data chunk accepted: a chunk is verified as a whole, so it must fit in
/// memory. Zero chunks may be larger (they are synthesized, never buffered whole).
pub const MAX_DATA_CHUNK_LEN: u64 = 256 << 20;

/// Longest entry name (bytes) accepted (Linux PATH_MAX).
const MAX_PATH_LEN: usize = 4096;
/// Longest path component (Linux NAME_MAX).
const MAX_COMPONENT_LEN: usize = 255;
/// Linux limits for extended attributes.
const MAX_XATTR_NAME_LEN: usize = 255;
const MAX_XATTR_VALUE_LEN: usize = 64 << 10;
/// At most this many xattrs per entry.
const MAX_XATTRS_PER_ENTRY: usize = 1024;
/// Entry count cap (indices must fit u32 with room to spare).
const MAX_ENTRIES: usize = 1 << 26;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
const WHITEOUT_META_PREFIX: &str = ".wh..wh.";
const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";

/// Identifies one entry of a [`LayerIndex`]; valid only for the index that made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntryId(u32);

impl EntryId {
    /// The root directory.
    pub const ROOT: EntryId = EntryId(0);

    /// The inode number of this entry (`index + 1`; the root is inode 1).
    pub fn ino(self) -> u64 {
        u64::from(self.0) + 1
    }

    /// Position in the index's entry table.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// A point in time as stored in the TOC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Timestamp {
    /// Seconds since the Unix epoch (may be negative).
    pub secs: i64,
    /// Nanoseconds, `0..1_000_000_000`.
    pub nanos: u32,
}

/// What an entry is, as the filesystem must present it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// Directory.
    Dir,
    /// Regular file.
    Reg,
    /// Symbolic link.
    Symlink,
    /// Character device.
    Char,
    /// Block device.
    Block,
    /// Named pipe.
    Fifo,
    /// An overlay whiteout: present it as a character device 0:0.
    Whiteout,
}

// Internal kind codes (`HARDLINK` never escapes: it is resolved to its target).
const K_DIR: u8 = 0;
const K_REG: u8 = 1;
const K_SYMLINK: u8 = 2;
const K_CHAR: u8 = 3;
const K_BLOCK: u8 = 4;
const K_FIFO: u8 = 5;
const K_WHITEOUT: u8 = 6;
const K_HARDLINK: u8 = 7;

const F_OPAQUE: u8 = 1;
const F_SYNTHESIZED: u8 = 2;
const F_XATTRS: u8 = 4;
const F_TIMES: u8 = 8;
const F_FILE_DIGEST: u8 = 16;

/// One entry record. Fields `a`/`b` depend on the kind:
/// reg: first chunk index / chunk count; dir: first dirent / dirent count;
/// symlink: target span in the arena; char/block: major / minor;
/// hard link: target entry index / unused.
#[derive(Clone, Debug, Default)]
struct Entry {
    size: u64,
    mtime_secs: i64,
    name_off: u32,
    name_len: u32,
    parent: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime_nanos: u32,
    nlink: u32,
    a: u32,
    b: u32,
    kind: u8,
    flags: u8,
}

/// One chunk of a regular file: a run of the file's bytes stored as one or more
/// whole zstd frames at `compressed_offset..compressed_offset + compressed_len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Blob offset of the chunk's first frame.
    pub compressed_offset: u64,
    /// Offset of the chunk inside the file.
    pub file_offset: u64,
    /// Uncompressed length (> 0).
    pub len: u64,
    /// Compressed length (may be 0 only for `zeros` chunks).
    pub compressed_len: u32,
    /// A run of zeros: may be synthesized without fetching anything.
    pub zeros: bool,
    /// The extent starts with a gzip member (eStargz) rather than a zstd frame.
    pub gzip: bool,
    /// sha256 of the chunk's uncompressed bytes.
    pub digest: Digest,
}

impl Chunk {
    /// The blob byte range to fetch for this chunk.
    pub fn compressed_range(&self) -> Range<u64> {
        self.compressed_offset
            ..self
                .compressed_offset
                .saturating_add(u64::from(self.compressed_len))
    }

    /// The file byte range this chunk provides.
    pub fn file_range(&self) -> Range<u64> {
        self.file_offset..self.file_offset.saturating_add(self.len)
    }
}

#[derive(Clone, Debug)]
struct XattrRec {
    entry: u32,
    /// Ordinal of the TOC entry that set it (a directory listed twice keeps the
    /// last listing's attributes).
    ord: u32,
    name_off: u32,
    name_len: u32,
    value_off: u32,
    value_len: u32,
}

#[derive(Clone, Debug)]
struct TimesRec {
    entry: u32,
    ord: u32,
    atime: Option<Timestamp>,
    ctime: Option<Timestamp>,
}

/// The validated model of one layer's TOC. Immutable once built; share it with
/// `Arc`.
#[derive(Debug)]
pub struct LayerIndex {
    entries: Vec<Entry>,
    chunks: Vec<Chunk>,
    arena: Vec<u8>,
    dirents: Vec<u32>,
    xattrs: Vec<XattrRec>,
    times: Vec<TimesRec>,
    file_digests: Vec<(u32, Digest)>,
    blob_order: Vec<u32>,
    toc_digest: Digest,
    tar_split_digest: Option<Digest>,
    prefetch: Option<Range<u64>>,
    location: TocLocation,
}

impl LayerIndex {
    /// Builds the model from the compressed TOC bytes fetched at
    /// `location.toc_range()`.
    ///
    /// Checks, in order: the positions fit `blob_size`; the byte count matches; the
    /// digest matches `location.toc_digest` (when known) *before* decompressing;
    /// the declared size is within [`MAX_TOC_UNCOMPRESSED`] and the output has
    /// exactly that size; then every entry (see the module docs).
    ///
    /// An eStargz location ([`Generation::Estargz`]) is decoded the eStargz way: see
    /// [`crate::estargz`].
    pub fn decode(compressed: &[u8], location: &TocLocation, blob_size: u64) -> Result<Self> {
        if location.generation == Generation::Estargz {
            return crate::estargz::decode_toc(compressed, location, blob_size);
        }
        location.check_bounds(blob_size)?;
        let toc = &location.toc;
        if compressed.len() as u64 != toc.compressed_len {
            return Err(FormatError::TocLengthMismatch {
                expected: toc.compressed_len,
                actual: compressed.len() as u64,
            });
        }
        let actual = Digest::of(compressed);
        if let Some(expected) = location.toc_digest {
            if expected != actual {
                return Err(FormatError::TocDigestMismatch { expected, actual });
            }
        }
        if toc.uncompressed_len > MAX_TOC_UNCOMPRESSED {
            return Err(FormatError::TocTooLarge {
                declared: toc.uncompressed_len,
                limit: MAX_TOC_UNCOMPRESSED,
            });
        }
        let json = decompress_bounded(compressed, toc.uncompressed_len, "TOC")?;
        Self::from_json(&json, location, actual)
    }

    /// Builds the model from already-decompressed TOC JSON. `toc_digest` is
    /// recorded as the TOC's identity; no digest check happens here.
    pub fn from_json(json: &[u8], location: &TocLocation, toc_digest: Digest) -> Result<Self> {
        let mut b = Builder::new(location.data_end(), json.len());
        b.gzip = location.generation == Generation::Estargz;
        let mut failure = None;
        let header = {
            let mut sink = |e: RawEntry<'_>| b.add(e);
            let seed = TocSeed {
                sink: &mut sink,
                failure: &mut failure,
            };
            let mut de = serde_json::Deserializer::from_slice(json);
            let r = serde::de::DeserializeSeed::deserialize(seed, &mut de).and_then(|h| {
                de.end()?;
                Ok(h)
            });
            match (r, failure) {
                (_, Some(e)) => return Err(e),
                (Err(source), None) => return Err(FormatError::TocJson { source }),
                (Ok(h), None) => h,
            }
        };
        b.finish(header, *location, toc_digest)
    }

    /// The root directory.
    pub fn root(&self) -> EntryId {
        EntryId::ROOT
    }

    /// Number of entry records (including synthesized directories and hard-link
    /// names; inode numbers are in `1..=len()`).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Always false: the root directory always exists.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry for an inode number from the kernel (`None` if out of range).
    /// Hard-link names resolve to their target.
    pub fn entry_for_ino(&self, ino: u64) -> Option<EntryId> {
        let idx = u32::try_from(ino.checked_sub(1)?).ok()?;
        self.entries.get(idx as usize)?;
        Some(EntryId(self.resolve(idx)))
    }

    fn resolve(&self, idx: u32) -> u32 {
        match self.entries.get(idx as usize) {
            Some(e) if e.kind == K_HARDLINK => e.a,
            _ => idx,
        }
    }

    fn rec(&self, idx: u32) -> &Entry {
        // Ids come from this index; an id from another index is a caller bug and
        // gets the root rather than a panic.
        self.entries
            .get(idx as usize)
            .unwrap_or_else(|| &self.entries[0])
    }

    /// Whether any entry has extended attributes.
    pub fn has_xattrs(&self) -> bool {
        !self.xattrs.is_empty()
    }

    /// The entry `id` (hard-link names resolved to their target).
    pub fn entry(&self, id: EntryId) -> EntryRef<'_> {
        let id = self.resolve(id.0);
        EntryRef {
            index: self,
            id,
            e: self.rec(id),
        }
    }

    fn span(&self, off: u32, len: u32) -> &[u8] {
        self.arena
            .get(off as usize..off as usize + len as usize)
            .unwrap_or_default()
    }

    fn name_of(&self, idx: u32) -> &[u8] {
        let e = self.rec(idx);
        self.span(e.name_off, e.name_len)
    }

    fn dirent_slice(&self, dir: EntryId) -> &[u32] {
        let e = self.rec(self.resolve(dir.0));
        if e.kind != K_DIR {
            return &[];
        }
        self.dirents
            .get(e.a as usize..e.a as usize + e.b as usize)
            .unwrap_or_default()
    }

    /// Looks `name` up in directory `dir` (O(log n)); `None` if absent or `dir` is
    /// not a directory. The result is resolved through hard links.
    pub fn lookup(&self, dir: EntryId, name: &[u8]) -> Option<EntryId> {
        let slice = self.dirent_slice(dir);
        let pos = slice
            .binary_search_by(|&i| self.name_of(i).cmp(name))
            .ok()?;
        Some(EntryId(self.resolve(slice[pos])))
    }

    /// The entries of directory `dir` in name order (empty if not a directory).
    /// `.` and `..` are not included. Supports O(1) `nth`/`skip` for readdir offsets.
    pub fn children(&self, dir: EntryId) -> Children<'_> {
        Children {
            index: self,
            iter: self.dirent_slice(dir).iter(),
        }
    }

    /// Resolves a slash-separated path relative to the root (`""`, `"."` and `"/"`
    /// are the root; `..` is not supported).
    pub fn resolve_path(&self, path: &str) -> Option<EntryId> {
        let mut cur = EntryId::ROOT;
        for comp in path.split('/') {
            match comp {
                "" | "." => continue,
                ".." => return None,
                c => cur = self.lookup(cur, c.as_bytes())?,
            }
        }
        Some(cur)
    }

    /// The chunks of file `id` covering bytes `offset..offset + len` (clamped to
    /// the file size; empty for non-files or empty ranges).
    pub fn chunk_range_for(&self, id: EntryId, offset: u64, len: u64) -> &[Chunk] {
        let chunks = self.entry(id).chunks();
        let end = offset.saturating_add(len);
        if len == 0 || chunks.is_empty() {
            return &[];
        }
        let first = chunks.partition_point(|c| c.file_offset + c.len <= offset);
        let last = chunks.partition_point(|c| c.file_offset < end);
        chunks.get(first..last.max(first)).unwrap_or_default()
    }

    /// Regular files that have data, in the order their chunks appear in the blob.
    pub fn files_in_blob_order(&self) -> impl ExactSizeIterator<Item = EntryId> + '_ {
        self.blob_order.iter().map(|&i| EntryId(i))
    }

    /// Every chunk of every file (each file's chunks contiguous, in file order).
    pub fn all_chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    /// sha256 of the compressed TOC bytes (the layer's TOC identity).
    pub fn toc_digest(&self) -> Digest {
        self.toc_digest
    }

    /// The TOC's `tarSplitDigest` (current generation).
    pub fn tar_split_digest(&self) -> Option<Digest> {
        self.tar_split_digest
    }

    /// Where the TOC and tar-split were found.
    pub fn location(&self) -> &TocLocation {
        &self.location
    }

    /// The blob range a startup profile asks to prefetch: from the writer's
    /// `zest.prefetch` field, or everything before an eStargz-style
    /// `.prefetch.landmark` file. `None` when the layer has no profile.
    pub fn prefetch_extent(&self) -> Option<Range<u64>> {
        self.prefetch.clone()
    }

    /// Approximate heap bytes held by this index.
    pub fn memory_bytes(&self) -> usize {
        use std::mem::size_of;
        self.entries.capacity() * size_of::<Entry>()
            + self.chunks.capacity() * size_of::<Chunk>()
            + self.arena.capacity()
            + self.dirents.capacity() * size_of::<u32>()
            + self.xattrs.capacity() * size_of::<XattrRec>()
            + self.times.capacity() * size_of::<TimesRec>()
            + self.file_digests.capacity() * size_of::<(u32, Digest)>()
            + self.blob_order.capacity() * size_of::<u32>()
    }
}

/// A name in a directory and the entry it resolves to.
#[derive(Clone, Copy, Debug)]
pub struct DirEntry<'a> {
    /// The name in this directory (for a hard link, the link's own name).
    pub name: &'a [u8],
    /// The entry (hard links resolved: same id as the target).
    pub id: EntryId,
}

/// Iterator over a directory's entries in name order.
#[derive(Clone, Debug)]
pub struct Children<'a> {
    index: &'a LayerIndex,
    iter: std::slice::Iter<'a, u32>,
}

impl<'a> Iterator for Children<'a> {
    type Item = DirEntry<'a>;

    fn next(&mut self) -> Option<DirEntry<'a>> {
        let &i = self.iter.next()?;
        Some(DirEntry {
            name: self.index.name_of(i),
            id: EntryId(self.index.resolve(i)),
        })
    }

    fn nth(&mut self, n: usize) -> Option<DirEntry<'a>> {
        let &i = self.iter.nth(n)?;
        Some(DirEntry {
            name: self.index.name_of(i),
            id: EntryId(self.index.resolve(i)),
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.iter.size_hint()
    }
}

impl ExactSizeIterator for Children<'_> {}

/// A view of one entry.
#[derive(Clone, Copy, Debug)]
pub struct EntryRef<'a> {
    index: &'a LayerIndex,
    id: u32,
    e: &'a Entry,
}

impl<'a> EntryRef<'a> {
    /// This entry's id.
    pub fn id(&self) -> EntryId {
        EntryId(self.id)
    }

    /// Inode number (`id + 1`).
    pub fn ino(&self) -> u64 {
        self.id().ino()
    }

    /// The parent directory (the root is its own parent).
    pub fn parent(&self) -> EntryId {
        EntryId(self.e.parent)
    }

    /// The entry's name in its directory (whiteouts: the name they hide; for a
    /// file with hard links, the name it was first listed under). Empty for root.
    pub fn name(&self) -> &'a [u8] {
        self.index.span(self.e.name_off, self.e.name_len)
    }

    /// The full path from the root, for messages (`""` for the root).
    pub fn path(&self) -> String {
        let mut parts = Vec::new();
        let mut cur = self.id;
        // Parents always have smaller... not necessarily; bound by entry count.
        for _ in 0..self.index.entries.len() {
            if cur == 0 {
                break;
            }
            let e = self.index.rec(cur);
            parts.push(String::from_utf8_lossy(
                self.index.span(e.name_off, e.name_len),
            ));
            cur = e.parent;
        }
        parts.reverse();
        parts.join("/")
    }

    /// The entry's kind.
    pub fn kind(&self) -> EntryKind {
        match self.e.kind {
            K_DIR => EntryKind::Dir,
            K_REG => EntryKind::Reg,
            K_SYMLINK => EntryKind::Symlink,
            K_CHAR => EntryKind::Char,
            K_BLOCK => EntryKind::Block,
            K_FIFO => EntryKind::Fifo,
            _ => EntryKind::Whiteout,
        }
    }

    /// Permission bits including setuid/setgid/sticky (`0o7777` mask).
    pub fn mode(&self) -> u32 {
        self.e.mode
    }

    /// `st_mode`: file type bits (`S_IFDIR`...) | [`mode`](Self::mode). Whiteouts
    /// are character devices.
    pub fn st_mode(&self) -> u32 {
        let t = match self.kind() {
            EntryKind::Dir => 0o040000,
            EntryKind::Reg => 0o100000,
            EntryKind::Symlink => 0o120000,
            EntryKind::Char | EntryKind::Whiteout => 0o020000,
            EntryKind::Block => 0o060000,
            EntryKind::Fifo => 0o010000,
        };
        t | self.e.mode
    }

    /// Owner uid.
    pub fn uid(&self) -> u32 {
        self.e.uid
    }

    /// Owner gid.
    pub fn gid(&self) -> u32 {
        self.e.gid
    }

    /// Size: file length for regular files, target length for symlinks, else 0.
    pub fn size(&self) -> u64 {
        self.e.size
    }

    /// Modification time (the epoch when the TOC has none).
    pub fn mtime(&self) -> Timestamp {
        Timestamp {
            secs: self.e.mtime_secs,
            nanos: self.e.mtime_nanos,
        }
    }

    fn times(&self) -> Option<&'a TimesRec> {
        if self.e.flags & F_TIMES == 0 {
            return None;
        }
        let t = &self.index.times;
        t.binary_search_by_key(&self.id, |r| r.entry)
            .ok()
            .and_then(|i| t.get(i))
    }

    /// Access time, if the TOC has one.
    pub fn atime(&self) -> Option<Timestamp> {
        self.times().and_then(|t| t.atime)
    }

    /// Change time, if the TOC has one.
    pub fn ctime(&self) -> Option<Timestamp> {
        self.times().and_then(|t| t.ctime)
    }

    /// Link count: names of a file (1 + hard links), `2 + subdirectories` for dirs.
    pub fn nlink(&self) -> u32 {
        self.e.nlink
    }

    /// Device numbers `(major, minor)` for char/block devices; `(0, 0)` otherwise
    /// (which is also what a whiteout must present).
    pub fn rdev(&self) -> (u32, u32) {
        match self.e.kind {
            K_CHAR | K_BLOCK => (self.e.a, self.e.b),
            _ => (0, 0),
        }
    }

    /// Symlink target.
    pub fn link_target(&self) -> Option<&'a [u8]> {
        (self.e.kind == K_SYMLINK).then(|| self.index.span(self.e.a, self.e.b))
    }

    /// Extended attributes `(name, value)` in name order.
    pub fn xattrs(&self) -> Xattrs<'a> {
        let recs: &'a [XattrRec] = if self.e.flags & F_XATTRS == 0 {
            &[]
        } else {
            let x = &self.index.xattrs;
            let lo = x.partition_point(|r| r.entry < self.id);
            let hi = x.partition_point(|r| r.entry <= self.id);
            x.get(lo..hi).unwrap_or_default()
        };
        Xattrs {
            index: self.index,
            iter: recs.iter(),
        }
    }

    /// The value of one extended attribute.
    pub fn xattr(&self, name: &[u8]) -> Option<&'a [u8]> {
        self.xattrs()
            .find(|(n, _)| n.as_bytes() == name)
            .map(|(_, v)| v)
    }

    /// Whether this directory hides lower layers' content (`.wh..wh..opq`).
    pub fn is_opaque_dir(&self) -> bool {
        self.e.kind == K_DIR && self.e.flags & F_OPAQUE != 0
    }

    /// Whether the directory was not in the TOC but implied by a descendant.
    pub fn is_synthesized(&self) -> bool {
        self.e.flags & F_SYNTHESIZED != 0
    }

    /// The file's chunks in file order, tiling `0..size()` exactly (empty for
    /// non-files and empty files).
    pub fn chunks(&self) -> &'a [Chunk] {
        if self.e.kind != K_REG {
            return &[];
        }
        self.index
            .chunks
            .get(self.e.a as usize..self.e.a as usize + self.e.b as usize)
            .unwrap_or_default()
    }

    /// sha256 of the whole file (`None` for non-files, empty files, and multi-chunk
    /// files whose TOC entry carries no `digest`).
    pub fn digest(&self) -> Option<Digest> {
        if self.e.flags & F_FILE_DIGEST != 0 {
            let d = &self.index.file_digests;
            return d
                .binary_search_by_key(&self.id, |r| r.0)
                .ok()
                .and_then(|i| d.get(i))
                .map(|r| r.1);
        }
        match self.chunks() {
            [only] => Some(only.digest),
            _ => None,
        }
    }
}

/// Iterator over an entry's extended attributes.
#[derive(Clone, Debug)]
pub struct Xattrs<'a> {
    index: &'a LayerIndex,
    iter: std::slice::Iter<'a, XattrRec>,
}

impl<'a> Iterator for Xattrs<'a> {
    type Item = (&'a str, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let r = self.iter.next()?;
        let name = std::str::from_utf8(self.index.span(r.name_off, r.name_len)).unwrap_or_default();
        Some((name, self.index.span(r.value_off, r.value_len)))
    }
}

/// Decompresses `data`, requiring exactly `declared` bytes of output and never
/// producing more than `declared + 1`.
pub(crate) fn decompress_bounded(data: &[u8], declared: u64, what: &str) -> Result<Vec<u8>> {
    let err = |source| FormatError::Decompress {
        what: what.to_owned(),
        source,
    };
    let cap = usize::try_from(declared).map_err(|_| FormatError::SizeMismatch {
        what: what.to_owned(),
        declared,
        actual: 0,
    })?;
    if cap > ONE_SHOT_LIMIT {
        return decompress_streaming(data, declared, what);
    }
    // Capacity is reserved, not touched: pages are only committed as zstd writes
    // them, so a small frame claiming a large size costs address space only.
    // Output beyond the capacity is an error from zstd, never a reallocation.
    let mut out = Vec::with_capacity(cap);
    let mut dctx = zstd::bulk::Decompressor::new().map_err(err)?;
    let n = match dctx.decompress_to_buffer(data, &mut out) {
        Ok(n) => n,
        // Say "too big" rather than "corrupt" when the frame header says so.
        Err(e) => {
            return Err(match zstd::zstd_safe::get_frame_content_size(data) {
                Ok(Some(size)) if size > declared => FormatError::SizeMismatch {
                    what: what.to_owned(),
                    declared,
                    actual: size,
                },
                _ => err(e),
            })
        }
    };
    if n as u64 != declared {
        return Err(FormatError::SizeMismatch {
            what: what.to_owned(),
            declared,
            actual: n as u64,
        });
    }
    Ok(out)
}

/// Above this declared size, decompression grows its buffer as data arrives
/// instead of reserving the declared size up front.
const ONE_SHOT_LIMIT: usize = 64 << 20;

fn decompress_streaming(data: &[u8], declared: u64, what: &str) -> Result<Vec<u8>> {
    use std::io::Read;
    let err = |source| FormatError::Decompress {
        what: what.to_owned(),
        source,
    };
    let dec = zstd::stream::read::Decoder::with_buffer(data).map_err(err)?;
    let mut out = Vec::with_capacity(ONE_SHOT_LIMIT);
    dec.take(declared.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(err)?;
    if out.len() as u64 != declared {
        return Err(FormatError::SizeMismatch {
            what: what.to_owned(),
            declared,
            actual: out.len() as u64,
        });
    }
    Ok(out)
}

/// Normalizes a TOC name into a clean relative path ("" is the root).
pub(crate) fn normalize(
    name: &str,
) -> std::result::Result<std::borrow::Cow<'_, str>, &'static str> {
    if name.len() > MAX_PATH_LEN {
        return Err("longer than 4096 bytes");
    }
    if name.contains('\0') {
        return Err("contains a NUL byte");
    }
    if name.starts_with('/') {
        return Err("absolute path");
    }
    // Common shapes (`./a/b`, `a/b/`) are clean once trimmed: borrow, don't copy.
    let mut trimmed = name;
    while let Some(rest) = trimmed.strip_prefix("./") {
        trimmed = rest;
    }
    let trimmed = trimmed.trim_end_matches('/');
    let name = if trimmed == "." { "" } else { trimmed };
    if name.is_empty() {
        return Ok(std::borrow::Cow::Borrowed(""));
    }
    let mut clean = true;
    let mut out_len = 0usize;
    let mut count = 0usize;
    for comp in name.split('/') {
        match comp {
            "" | "." => clean = false,
            ".." => return Err("contains a `..` component"),
            c if c.len() > MAX_COMPONENT_LEN => return Err("has a component over 255 bytes"),
            c => {
                out_len += c.len() + usize::from(count > 0);
                count += 1;
            }
        }
    }
    if clean {
        return Ok(std::borrow::Cow::Borrowed(name));
    }
    let mut out = String::with_capacity(out_len);
    for comp in name.split('/').filter(|c| !c.is_empty() && *c != ".") {
        if !out.is_empty() {
            out.push('/');
        }
        out.push_str(comp);
    }
    Ok(std::borrow::Cow::Owned(out))
}

fn split_parent(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    }
}

struct PendingChunk {
    offset: u64,
    file_offset: u64,
    size: Option<u64>,
    digest: Option<Digest>,
    zeros: bool,
}

/// The regular file whose `chunk` entries are being collected.
struct PendingFile {
    /// Entry to attach chunks to (`None` for whiteouts and hidden entries).
    entry: Option<u32>,
    path: String,
    size: u64,
    end_offset: u64,
    file_digest: Option<Digest>,
    chunks: Vec<PendingChunk>,
}

struct Builder {
    entries: Vec<Entry>,
    chunks: Vec<Chunk>,
    arena: Vec<u8>,
    xattrs: Vec<XattrRec>,
    times: Vec<TimesRec>,
    file_digests: Vec<(u32, Digest)>,
    /// `(parent index, name)` -> index, for directories only (files are found
    /// through the sorted dirents once built). Keyed per component so memory
    /// stays proportional to the names, whatever the path depths.
    dirs: HashMap<(u32, Box<str>), u32>,
    /// The directory most recently resolved (entries come grouped by directory).
    last_dir: (String, u32),
    hardlinks: Vec<(u32, Box<str>)>,
    /// Every non-empty compressed extent: (start, end, entry index or u32::MAX).
    extents: Vec<(u64, u64, u32)>,
    pending: Option<PendingFile>,
    data_end: u64,
    landmark: Option<u64>,
    no_prefetch: bool,
    raw_count: usize,
    max_entries: usize,
    /// Entries whose metadata was set again (directory listed twice, root): the
    /// ordinal of the last setting; older side-table records are dropped.
    reset: HashMap<u32, u32>,
    /// Chunks are gzip members (eStargz).
    gzip: bool,
}

fn parse_digest(name: &str, field: &'static str, v: &str) -> Result<Digest> {
    fast_digest(v).ok_or_else(|| FormatError::InvalidDigest {
        name: trunc(name),
        field,
        value: trunc(v),
    })
}

/// `sha256:` + 64 lowercase hex digits, parsed with a lookup table: digests are
/// the bulk of a TOC, so this is on the hot path of decoding.
fn fast_digest(v: &str) -> Option<Digest> {
    const INVALID: u8 = 0xff;
    const fn table() -> [u8; 256] {
        let mut t = [INVALID; 256];
        let mut i = 0;
        while i < 10 {
            t[b'0' as usize + i] = i as u8;
            i += 1;
        }
        let mut i = 0;
        while i < 6 {
            t[b'a' as usize + i] = 10 + i as u8;
            i += 1;
        }
        t
    }
    static HEX: [u8; 256] = table();
    let hex = v.strip_prefix("sha256:")?.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let (hi, lo) = (HEX[pair[0] as usize], HEX[pair[1] as usize]);
        if hi == INVALID || lo == INVALID {
            return None;
        }
        *o = hi << 4 | lo;
    }
    Some(Digest::from_bytes(out))
}

fn parse_opt_digest(
    name: &str,
    field: &'static str,
    v: &Option<std::borrow::Cow<'_, str>>,
) -> Result<Option<Digest>> {
    match v.as_deref() {
        None | Some("") => Ok(None),
        Some(s) => parse_digest(name, field, s).map(Some),
    }
}

fn invalid(name: &str, reason: impl Into<String>) -> FormatError {
    FormatError::InvalidEntry {
        name: trunc(name),
        reason: reason.into(),
    }
}

fn to_u32(name: &str, field: &str, v: u64) -> Result<u32> {
    u32::try_from(v).map_err(|_| invalid(name, format!("{field} {v} does not fit 32 bits")))
}

impl Builder {
    fn new(data_end: u64, json_len: usize) -> Self {
        let root = Entry {
            mode: 0o755,
            nlink: 2,
            kind: K_DIR,
            flags: F_SYNTHESIZED,
            ..Entry::default()
        };
        // Each JSON entry is at least ~20 bytes: a cheap bound on the entry count.
        let max_entries = (json_len / 16 + 1).min(MAX_ENTRIES);
        Builder {
            entries: vec![root],
            chunks: Vec::new(),
            arena: Vec::new(),
            xattrs: Vec::new(),
            times: Vec::new(),
            file_digests: Vec::new(),
            dirs: HashMap::new(),
            last_dir: (String::new(), 0),
            hardlinks: Vec::new(),
            extents: Vec::new(),
            pending: None,
            data_end,
            landmark: None,
            no_prefetch: false,
            raw_count: 0,
            max_entries,
            reset: HashMap::new(),
            gzip: false,
        }
    }

    fn push_bytes(&mut self, b: &[u8]) -> Result<(u32, u32)> {
        let off = u32::try_from(self.arena.len()).ok();
        let len = u32::try_from(b.len()).ok();
        let (Some(off), Some(len)) = (off, len) else {
            return Err(FormatError::LimitExceeded {
                reason: "names and attributes exceed 4 GiB".into(),
            });
        };
        if off.checked_add(len).is_none() {
            return Err(FormatError::LimitExceeded {
                reason: "names and attributes exceed 4 GiB".into(),
            });
        }
        self.arena.extend_from_slice(b);
        Ok((off, len))
    }

    fn new_entry(&mut self, name: &str, parent: u32, kind: u8) -> Result<u32> {
        if self.entries.len() >= self.max_entries {
            return Err(FormatError::LimitExceeded {
                reason: format!("more than {} entries", self.max_entries),
            });
        }
        let (name_off, name_len) = self.push_bytes(name.as_bytes())?;
        let idx = self.entries.len() as u32;
        self.entries.push(Entry {
            name_off,
            name_len,
            parent,
            nlink: if kind == K_DIR { 2 } else { 1 },
            kind,
            ..Entry::default()
        });
        Ok(idx)
    }

    /// The directory at a normalized `path`, creating missing ones (0755,
    /// root-owned). Iterative: depth is attacker-controlled (but bounded by
    /// the path length limit).
    fn ensure_dir(&mut self, path: &str) -> Result<u32> {
        if path.is_empty() {
            return Ok(0);
        }
        if self.last_dir.0 == path {
            return Ok(self.last_dir.1);
        }
        let mut cur = 0u32;
        for comp in path.split('/') {
            let key = (cur, Box::<str>::from(comp));
            cur = match self.dirs.get(&key) {
                Some(&idx) => idx,
                // A non-directory of this name, if any, is caught as a
                // conflict when the directory listing is built.
                None => {
                    let idx = self.new_entry(comp, cur, K_DIR)?;
                    let e = &mut self.entries[idx as usize];
                    e.mode = 0o755;
                    e.flags = F_SYNTHESIZED;
                    self.dirs.insert(key, idx);
                    idx
                }
            };
        }
        self.last_dir.0.clear();
        self.last_dir.0.push_str(path);
        self.last_dir.1 = cur;
        Ok(cur)
    }

    fn add(&mut self, raw: RawEntry<'_>) -> Result<()> {
        self.raw_count += 1;
        if self.raw_count > self.max_entries {
            return Err(FormatError::LimitExceeded {
                reason: format!("more than {} entries", self.max_entries),
            });
        }
        if raw.kind == "chunk" {
            return self.add_chunk(&raw);
        }
        self.finish_pending()?;
        let name = normalize(&raw.name).map_err(|reason| FormatError::InvalidName {
            name: trunc(&raw.name),
            reason,
        })?;
        let kind = match raw.kind.as_ref() {
            "dir" => K_DIR,
            "reg" => K_REG,
            "symlink" => K_SYMLINK,
            "hardlink" => K_HARDLINK,
            "char" => K_CHAR,
            "block" => K_BLOCK,
            "fifo" => K_FIFO,
            other => {
                return Err(invalid(
                    &name,
                    format!("unknown entry type {:?}", trunc(other)),
                ))
            }
        };
        if name.is_empty() {
            if kind != K_DIR {
                return Err(invalid(".", "the root must be a directory"));
            }
            self.reset.insert(0, self.raw_count as u32);
            self.entries[0].flags &= !F_SYNTHESIZED;
            self.set_metadata(0, &raw, ".")?;
            return Ok(());
        }
        let (parent_path, base) = split_parent(&name);
        if name == PREFETCH_LANDMARK && kind == K_REG {
            self.landmark = Some(raw.offset);
        }
        if name == NO_PREFETCH_LANDMARK {
            self.no_prefetch = true;
        }
        // Whiteouts and the opaque marker.
        let mut display = base;
        let mut entry_kind = kind;
        let mut hidden = false;
        if let Some(rest) = base.strip_prefix(WHITEOUT_PREFIX) {
            if base == OPAQUE_MARKER {
                let dir = self.ensure_dir(parent_path)?;
                self.entries[dir as usize].flags |= F_OPAQUE;
                hidden = true;
            } else if base.starts_with(WHITEOUT_META_PREFIX) {
                // Other aufs metadata (`.wh..wh.plnk`...): meaningless to overlay.
                hidden = true;
            } else if kind == K_DIR {
                return Err(invalid(&name, "a whiteout cannot be a directory"));
            } else {
                display = rest;
                entry_kind = K_WHITEOUT;
            }
        }
        if hidden {
            if kind == K_REG {
                self.start_pending(None, &name, &raw)?;
            }
            return Ok(());
        }
        let parent = self.ensure_dir(parent_path)?;
        if entry_kind == K_DIR {
            let key = (parent, Box::<str>::from(base));
            if let Some(&existing) = self.dirs.get(&key) {
                // A directory listed twice (or after a descendant): later metadata
                // wins, as when extracting a tar.
                self.entries[existing as usize].flags &= !F_SYNTHESIZED;
                self.reset.insert(existing, self.raw_count as u32);
                return self.set_metadata(existing, &raw, &name);
            }
            let idx = self.new_entry(display, parent, entry_kind)?;
            self.dirs.insert(key, idx);
            return self.set_metadata(idx, &raw, &name);
        }
        // Other duplicates are found when the directory listing is sorted.
        let idx = self.new_entry(display, parent, entry_kind)?;
        match entry_kind {
            K_HARDLINK => {
                let target = raw.link_name.as_deref().unwrap_or_default();
                let t = normalize(target).map_err(|reason| FormatError::BadHardLink {
                    name: trunc(&name),
                    target: trunc(target),
                    reason,
                })?;
                self.hardlinks.push((idx, t.as_ref().into()));
                // A hard link's attributes are its target's.
                return Ok(());
            }
            K_SYMLINK => {
                let target = raw.link_name.as_deref().unwrap_or_default();
                if target.is_empty() {
                    return Err(invalid(&name, "symlink without linkName"));
                }
                if target.len() > MAX_PATH_LEN || target.contains('\0') {
                    return Err(invalid(&name, "symlink target too long or contains NUL"));
                }
                let (off, len) = self.push_bytes(target.as_bytes())?;
                let e = &mut self.entries[idx as usize];
                e.a = off;
                e.b = len;
                e.size = u64::from(len);
            }
            K_CHAR | K_BLOCK => {
                let major = to_u32(&name, "devMajor", raw.dev_major)?;
                let minor = to_u32(&name, "devMinor", raw.dev_minor)?;
                let e = &mut self.entries[idx as usize];
                e.a = major;
                e.b = minor;
            }
            _ => {}
        }
        self.set_metadata(idx, &raw, &name)?;
        if kind == K_REG {
            let attach = (entry_kind == K_REG).then_some(idx);
            if attach.is_some() {
                self.entries[idx as usize].size = raw.size;
            }
            self.start_pending(attach, &name, &raw)?;
        }
        Ok(())
    }

    fn set_metadata(&mut self, idx: u32, raw: &RawEntry<'_>, name: &str) -> Result<()> {
        let uid = to_u32(name, "uid", raw.uid)?;
        let gid = to_u32(name, "gid", raw.gid)?;
        let time =
            |field: &str, v: &Option<std::borrow::Cow<'_, str>>| -> Result<Option<Timestamp>> {
                match v.as_deref() {
                    None | Some("") => Ok(None),
                    Some(s) => parse_time(s).map(Some).ok_or_else(|| {
                        invalid(name, format!("{field} {:?} is not RFC 3339", trunc(s)))
                    }),
                }
            };
        let mtime = time("modtime", &raw.modtime)?.unwrap_or_default();
        let atime = time("accesstime", &raw.accesstime)?;
        let ctime = time("changetime", &raw.changetime)?;
        {
            let e = &mut self.entries[idx as usize];
            e.mode = (raw.mode & 0o7777) as u32;
            e.uid = uid;
            e.gid = gid;
            e.mtime_secs = mtime.secs;
            e.mtime_nanos = mtime.nanos;
        }
        let ord = self.raw_count as u32;
        if atime.is_some() || ctime.is_some() {
            self.times.push(TimesRec {
                entry: idx,
                ord,
                atime,
                ctime,
            });
        }
        if let Some(x) = raw.xattrs.as_ref().filter(|x| !x.is_empty()) {
            if x.len() > MAX_XATTRS_PER_ENTRY {
                return Err(invalid(
                    name,
                    format!("{} xattrs (limit {MAX_XATTRS_PER_ENTRY})", x.len()),
                ));
            }
            let b64 = base64::engine::general_purpose::STANDARD;
            for (k, v) in x {
                if k.is_empty() || k.len() > MAX_XATTR_NAME_LEN || k.contains('\0') {
                    return Err(invalid(name, format!("invalid xattr name {:?}", trunc(k))));
                }
                let value = b64.decode(v.as_bytes()).map_err(|_| {
                    invalid(name, format!("xattr {:?} value is not base64", trunc(k)))
                })?;
                if value.len() > MAX_XATTR_VALUE_LEN {
                    return Err(invalid(
                        name,
                        format!("xattr {:?} value over 64 KiB", trunc(k)),
                    ));
                }
                let (name_off, name_len) = self.push_bytes(k.as_bytes())?;
                let (value_off, value_len) = self.push_bytes(&value)?;
                self.xattrs.push(XattrRec {
                    entry: idx,
                    ord,
                    name_off,
                    name_len,
                    value_off,
                    value_len,
                });
            }
        }
        Ok(())
    }

    fn start_pending(&mut self, entry: Option<u32>, name: &str, raw: &RawEntry<'_>) -> Result<()> {
        let file_digest = parse_opt_digest(name, "digest", &raw.digest)?;
        let mut p = PendingFile {
            entry,
            path: name.to_owned(),
            size: raw.size,
            end_offset: raw.end_offset,
            file_digest,
            chunks: Vec::new(),
        };
        if raw.size > 0 {
            p.chunks.push(self.pending_chunk(name, raw)?);
        }
        self.pending = Some(p);
        Ok(())
    }

    fn pending_chunk(&self, name: &str, raw: &RawEntry<'_>) -> Result<PendingChunk> {
        let zeros = match raw.chunk_type.as_deref() {
            None | Some("") => false,
            Some("zeros") => true,
            Some(other) => {
                return Err(invalid(
                    name,
                    format!("unknown chunkType {:?}", trunc(other)),
                ))
            }
        };
        Ok(PendingChunk {
            offset: raw.offset,
            file_offset: raw.chunk_offset,
            size: raw.chunk_size.filter(|&s| s > 0),
            digest: parse_opt_digest(name, "chunkDigest", &raw.chunk_digest)?,
            zeros,
        })
    }

    fn add_chunk(&mut self, raw: &RawEntry<'_>) -> Result<()> {
        let name = normalize(&raw.name).map_err(|reason| FormatError::InvalidName {
            name: trunc(&raw.name),
            reason,
        })?;
        let chunk = self.pending_chunk(&name, raw)?;
        match self.pending.as_mut() {
            Some(p) if p.path == name && p.size > 0 => {
                p.chunks.push(chunk);
                Ok(())
            }
            _ => Err(FormatError::ChunkLayout {
                name: trunc(&name),
                reason: "`chunk` entry does not follow a non-empty regular file of the same name"
                    .into(),
            }),
        }
    }

    fn finish_pending(&mut self) -> Result<()> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        if p.size == 0 {
            return Ok(());
        }
        let layout = |reason: String| FormatError::ChunkLayout {
            name: trunc(&p.path),
            reason,
        };
        let n = p.chunks.len();
        let first_chunk =
            u32::try_from(self.chunks.len()).map_err(|_| FormatError::LimitExceeded {
                reason: "too many chunks".into(),
            })?;
        let mut expected_file_off = 0u64;
        let owner = p.entry.unwrap_or(u32::MAX);
        for (i, c) in p.chunks.iter().enumerate() {
            let next = p.chunks.get(i + 1);
            if c.file_offset != expected_file_off {
                return Err(layout(format!(
                    "chunk {i} starts at file offset {} but the previous one ends at {expected_file_off}",
                    c.file_offset
                )));
            }
            let len = match (c.size, next) {
                (Some(s), _) => s,
                (None, Some(nx)) => nx.file_offset.saturating_sub(c.file_offset),
                (None, None) => p.size.saturating_sub(c.file_offset),
            };
            if len == 0 {
                return Err(layout(format!("chunk {i} is empty")));
            }
            let end_in_file = c
                .file_offset
                .checked_add(len)
                .filter(|&e| e <= p.size)
                .ok_or_else(|| layout(format!("chunk {i} ends past the file size {}", p.size)))?;
            expected_file_off = end_in_file;
            if !c.zeros && len > MAX_DATA_CHUNK_LEN {
                return Err(FormatError::ChunkTooLarge {
                    offset: c.offset,
                    len,
                    limit: MAX_DATA_CHUNK_LEN,
                });
            }
            let cend = match next {
                Some(nx) => nx.offset,
                None => p.end_offset,
            };
            if cend < c.offset || (cend == c.offset && !c.zeros) || cend > self.data_end {
                return Err(FormatError::ExtentOutOfBounds {
                    name: trunc(&p.path),
                    offset: c.offset,
                    end: cend,
                    limit: self.data_end,
                });
            }
            let compressed_len = u32::try_from(cend - c.offset)
                .map_err(|_| layout(format!("chunk {i} has over 4 GiB of compressed data")))?;
            let digest = match (c.digest, n) {
                (Some(d), 1) => {
                    if let Some(fd) = p.file_digest {
                        if fd != d {
                            return Err(layout(
                                "single chunk's chunkDigest differs from the file digest".into(),
                            ));
                        }
                    }
                    d
                }
                (Some(d), _) => d,
                (None, 1) => p
                    .file_digest
                    .ok_or_else(|| layout("no digest or chunkDigest".into()))?,
                (None, _) => return Err(layout(format!("chunk {i} has no chunkDigest"))),
            };
            if cend > c.offset {
                self.extents.push((c.offset, cend, owner));
            }
            if p.entry.is_some() {
                self.chunks.push(Chunk {
                    compressed_offset: c.offset,
                    file_offset: c.file_offset,
                    len,
                    compressed_len,
                    zeros: c.zeros,
                    gzip: self.gzip,
                    digest,
                });
            }
        }
        if expected_file_off != p.size {
            return Err(layout(format!(
                "chunks cover {expected_file_off} bytes of a {}-byte file",
                p.size
            )));
        }
        if let Some(idx) = p.entry {
            let e = &mut self.entries[idx as usize];
            e.a = first_chunk;
            e.b = n as u32;
            if n > 1 {
                if let Some(fd) = p.file_digest {
                    e.flags |= F_FILE_DIGEST;
                    self.file_digests.push((idx, fd));
                }
            }
        }
        Ok(())
    }

    fn finish(
        mut self,
        header: TocHeader,
        location: TocLocation,
        toc_digest: Digest,
    ) -> Result<LayerIndex> {
        self.finish_pending()?;
        match header.version {
            Some(1) => {}
            Some(v) => return Err(FormatError::UnsupportedTocVersion { version: v }),
            None => return Err(FormatError::UnsupportedTocVersion { version: 0 }),
        }
        let tar_split_digest = match header.tar_split_digest.as_deref() {
            None | Some("") => None,
            Some(s) => Some(parse_digest("(toc)", "tarSplitDigest", s)?),
        };
        if location.generation == Generation::New
            && location.tar_split.is_some()
            && tar_split_digest.is_none()
        {
            tracing::debug!("TOC has a tar-split position but no tarSplitDigest");
        }

        // Compressed extents must not overlap (two files sharing bytes would let a
        // TOC alias data; podman never writes that).
        self.extents.sort_unstable();
        for w in self.extents.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(FormatError::OverlappingExtents {
                    first: trunc(&self.path_of(w[0].2)),
                    second: trunc(&self.path_of(w[1].2)),
                    offset: w[1].0,
                });
            }
        }

        let mut index = LayerIndex {
            entries: self.entries,
            chunks: self.chunks,
            arena: self.arena,
            dirents: Vec::new(),
            xattrs: self.xattrs,
            times: self.times,
            file_digests: self.file_digests,
            blob_order: Vec::new(),
            toc_digest,
            tar_split_digest,
            prefetch: None,
            location,
        };
        index.build_dirents()?;
        index.resolve_hardlinks(std::mem::take(&mut self.hardlinks))?;
        let reset = std::mem::take(&mut self.reset);
        let current = |entry: u32, ord: u32| reset.get(&entry).is_none_or(|&o| ord >= o);
        index.times.retain(|t| current(t.entry, t.ord));
        index.xattrs.retain(|x| current(x.entry, x.ord));
        index.times.sort_by_key(|t| t.entry);
        for t in &index.times {
            index.entries[t.entry as usize].flags |= F_TIMES;
        }
        for x in &index.xattrs {
            index.entries[x.entry as usize].flags |= F_XATTRS;
        }
        {
            let arena = &index.arena;
            let name =
                |r: &XattrRec| arena.get(r.name_off as usize..(r.name_off + r.name_len) as usize);
            index
                .xattrs
                .sort_by(|a, b| (a.entry, name(a)).cmp(&(b.entry, name(b))));
        }
        index.file_digests.sort_unstable_by_key(|d| d.0);
        let mut order: Vec<u32> = (0..index.entries.len() as u32)
            .filter(|&i| {
                let e = &index.entries[i as usize];
                e.kind == K_REG && e.b > 0
            })
            .collect();
        order.sort_by_key(|&i| {
            index
                .chunks
                .get(index.entries[i as usize].a as usize)
                .map(|c| c.compressed_offset)
        });
        index.blob_order = order;
        let data_end = location.data_end();
        index.prefetch = if self.no_prefetch {
            None
        } else if let Some(end) = header.prefetch_end {
            Some(0..end.min(data_end))
        } else {
            self.landmark.map(|o| 0..o.min(data_end))
        };
        index.entries.shrink_to_fit();
        index.chunks.shrink_to_fit();
        index.arena.shrink_to_fit();
        index.xattrs.shrink_to_fit();
        index.times.shrink_to_fit();
        index.file_digests.shrink_to_fit();
        Ok(index)
    }

    fn path_of(&self, idx: u32) -> String {
        if idx == u32::MAX {
            return "(hidden entry)".into();
        }
        let mut parts = Vec::new();
        let mut cur = idx;
        for _ in 0..self.entries.len() {
            if cur == 0 {
                break;
            }
            let e = &self.entries[cur as usize];
            let n = self
                .arena
                .get(e.name_off as usize..(e.name_off + e.name_len) as usize)
                .unwrap_or_default();
            parts.push(String::from_utf8_lossy(n).into_owned());
            cur = e.parent;
        }
        parts.reverse();
        parts.join("/")
    }
}

impl LayerIndex {
    /// The raw record at a normalized path (hard links not followed).
    fn find_raw(&self, path: &str) -> Option<u32> {
        let mut cur = 0u32;
        for comp in path.split('/').filter(|c| !c.is_empty()) {
            let slice = self.dirent_slice(EntryId(cur));
            let pos = slice
                .binary_search_by(|&i| self.name_of(i).cmp(comp.as_bytes()))
                .ok()?;
            cur = slice[pos];
        }
        Some(cur)
    }

    /// Points each hard link at its target: one level, to an existing
    /// non-directory, non-link, non-whiteout entry.
    fn resolve_hardlinks(&mut self, links: Vec<(u32, Box<str>)>) -> Result<()> {
        for (idx, target) in links {
            let bad = |reason| FormatError::BadHardLink {
                name: trunc(&self.entry_path(idx)),
                target: trunc(&target),
                reason,
            };
            let t = self
                .find_raw(&target)
                .ok_or_else(|| bad("target does not exist"))?;
            match self.entries[t as usize].kind {
                K_HARDLINK => {
                    return Err(bad("target is itself a hard link (chains are not allowed)"))
                }
                K_DIR => return Err(bad("target is a directory")),
                K_WHITEOUT => return Err(bad("target is a whiteout")),
                _ => {}
            }
            self.entries[idx as usize].a = t;
            let te = &mut self.entries[t as usize];
            te.nlink = te.nlink.saturating_add(1);
        }
        Ok(())
    }

    /// Path of a raw record (no hard-link resolution), for messages.
    fn entry_path(&self, idx: u32) -> String {
        EntryRef {
            index: self,
            id: idx,
            e: self.rec(idx),
        }
        .path()
    }

    /// Sorts all names into per-directory slices and computes directory ranges.
    fn build_dirents(&mut self) -> Result<()> {
        let mut d: Vec<u32> = (1..self.entries.len() as u32).collect();
        // Stable (adaptive) sort: TOCs list each directory's entries mostly in
        // name order already, so this is close to linear.
        d.sort_by(|&x, &y| {
            let (ex, ey) = (&self.entries[x as usize], &self.entries[y as usize]);
            ex.parent.cmp(&ey.parent).then_with(|| {
                self.span(ex.name_off, ex.name_len)
                    .cmp(self.span(ey.name_off, ey.name_len))
            })
        });
        // A whiteout `.wh.X` and a real `X` in one directory: the real one wins.
        let mut keep: Vec<u32> = Vec::with_capacity(d.len());
        for &i in &d {
            if let Some(&prev) = keep.last() {
                let (ep, ei) = (&self.entries[prev as usize], &self.entries[i as usize]);
                if ep.parent == ei.parent && self.name_of(prev) == self.name_of(i) {
                    match (ep.kind == K_WHITEOUT, ei.kind == K_WHITEOUT) {
                        (true, false) => {
                            keep.pop();
                        }
                        (false, true) => continue,
                        _ => {
                            let name = trunc(&self.entry_path(i));
                            // A file where a descendant implied a directory.
                            let synthesized = |e: &Entry| e.flags & F_SYNTHESIZED != 0;
                            return Err(if synthesized(ep) || synthesized(ei) {
                                FormatError::ParentNotDirectory {
                                    name: format!("{name}/..."),
                                    parent: name,
                                }
                            } else {
                                FormatError::DuplicateEntry { name }
                            });
                        }
                    }
                }
            }
            keep.push(i);
        }
        let mut start = 0usize;
        while start < keep.len() {
            let parent = self.entries[keep[start] as usize].parent;
            let mut end = start;
            while end < keep.len() && self.entries[keep[end] as usize].parent == parent {
                end += 1;
            }
            let subdirs = keep[start..end]
                .iter()
                .filter(|&&i| self.entries[i as usize].kind == K_DIR)
                .count();
            let p = &mut self.entries[parent as usize];
            p.a = start as u32;
            p.b = (end - start) as u32;
            p.nlink = 2u32.saturating_add(subdirs as u32);
            start = end;
        }
        keep.shrink_to_fit();
        self.dirents = keep;
        Ok(())
    }
}

#[cfg(test)]
#[path = "index_tests.rs"]
mod tests;
