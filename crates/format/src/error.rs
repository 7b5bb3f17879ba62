//! The single error type of the format module.
//!
//! Every variant names the object at fault (entry name, blob offset, annotation)
//! and the message ends with what the user can do about it. Entry names in
//! messages are truncated so a hostile TOC cannot flood logs.

use zest_oci::digest::Digest;

/// What the user can usually do about a corrupt or hostile layer.
const HINT_CORRUPT: &str = "the layer is corrupt or not zstd:chunked; pull it without lazy \
loading or re-convert the image with `zest convert`";

/// Everything that can go wrong reading or writing a zstd:chunked layer.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Fewer tail bytes than a footer needs.
    #[error(
        "zstd:chunked footer truncated: got {len} tail bytes, need {need}; fetch the last {need} bytes of the blob"
    )]
    FooterTruncated {
        /// Bytes supplied.
        len: usize,
        /// Bytes needed.
        need: usize,
    },

    /// The last 8 bytes are neither footer magic.
    #[error("blob has no zstd:chunked footer (last 8 bytes {found:02x?}); it is a plain tar+zstd layer or truncated: {HINT_CORRUPT}")]
    BadFooterMagic {
        /// The bytes found where the magic belongs.
        found: [u8; 8],
    },

    /// The footer's own fields are inconsistent.
    #[error("zstd:chunked footer invalid: {reason}; {HINT_CORRUPT}")]
    BadFooter {
        /// What is wrong.
        reason: String,
    },

    /// A TOC or tar-split position (from a footer or an annotation) does not fit the blob.
    #[error("{what} position {offset}+{len} does not fit in a blob of {blob_size} bytes; {HINT_CORRUPT}")]
    PositionOutOfBounds {
        /// "TOC" or "tar-split".
        what: &'static str,
        /// Claimed start.
        offset: u64,
        /// Claimed compressed length.
        len: u64,
        /// Actual blob size.
        blob_size: u64,
    },

    /// A zstd:chunked annotation is malformed.
    #[error("layer annotation {key}={value:?} is invalid: {reason}; fix or drop the annotation (the footer will be used instead)")]
    BadAnnotation {
        /// Annotation key.
        key: String,
        /// Annotation value (truncated).
        value: String,
        /// What is wrong.
        reason: String,
    },

    /// The TOC declares an uncompressed size above the hard cap.
    #[error("TOC declares {declared} uncompressed bytes, over the {limit}-byte limit; refusing a possibly hostile layer ({HINT_CORRUPT})")]
    TocTooLarge {
        /// Declared size.
        declared: u64,
        /// The cap.
        limit: u64,
    },

    /// The compressed TOC bytes handed in are not as long as the location says.
    #[error("TOC is {actual} compressed bytes but its position says {expected}; the range fetch was truncated or the wrong range was fetched; retry the fetch")]
    TocLengthMismatch {
        /// Length from the location.
        expected: u64,
        /// Length supplied.
        actual: u64,
    },

    /// The compressed TOC does not hash to the trusted digest.
    #[error("TOC digest mismatch: expected {expected}, got {actual}; the blob does not match its manifest annotation (corrupt registry data or tampering); re-push the image")]
    TocDigestMismatch {
        /// Trusted digest (annotation).
        expected: Digest,
        /// Digest of the bytes received.
        actual: Digest,
    },

    /// zstd decoding of a TOC, tar-split or chunk failed.
    #[error("zstd decompression of {what} failed: {source}; {HINT_CORRUPT}")]
    Decompress {
        /// What was being decompressed.
        what: String,
        /// The decoder's error.
        #[source]
        source: std::io::Error,
    },

    /// Decompressed size differs from the declared size.
    #[error("{what} decompressed to {actual} bytes (or more) but {declared} were declared; {HINT_CORRUPT}")]
    SizeMismatch {
        /// What was decompressed.
        what: String,
        /// Declared size.
        declared: u64,
        /// Size obtained (a lower bound when decoding stopped early).
        actual: u64,
    },

    /// The TOC is not valid JSON of the expected shape.
    #[error("TOC JSON invalid: {source}; {HINT_CORRUPT}")]
    TocJson {
        /// serde_json's error (carries line and column).
        #[source]
        source: serde_json::Error,
    },

    /// The TOC version is not 1.
    #[error("unsupported TOC version {version} (zest reads version 1); upgrade zest or re-convert the image")]
    UnsupportedTocVersion {
        /// Version found.
        version: u64,
    },

    /// An entry name is unusable (absolute, `..`, NUL, too long...).
    #[error("TOC entry {name:?}: invalid name: {reason}; {HINT_CORRUPT}")]
    InvalidName {
        /// The name as found (truncated).
        name: String,
        /// What is wrong.
        reason: &'static str,
    },

    /// An entry field is invalid.
    #[error("TOC entry {name:?}: {reason}; {HINT_CORRUPT}")]
    InvalidEntry {
        /// Entry name (truncated).
        name: String,
        /// What is wrong.
        reason: String,
    },

    /// A digest field is not `sha256:<64 hex>`.
    #[error("TOC entry {name:?}: field {field} is not a sha256 digest: {value:?}; {HINT_CORRUPT}")]
    InvalidDigest {
        /// Entry name (truncated).
        name: String,
        /// JSON field.
        field: &'static str,
        /// Value found (truncated).
        value: String,
    },

    /// Two entries claim the same path.
    #[error("TOC has two entries for {name:?}; {HINT_CORRUPT}")]
    DuplicateEntry {
        /// The path.
        name: String,
    },

    /// An entry's parent path is not a directory.
    #[error("TOC entry {name:?} is inside {parent:?}, which is not a directory; {HINT_CORRUPT}")]
    ParentNotDirectory {
        /// The entry.
        name: String,
        /// Its parent path.
        parent: String,
    },

    /// A hard link has no valid target.
    #[error("hard link {name:?} -> {target:?}: {reason}; {HINT_CORRUPT}")]
    BadHardLink {
        /// The link.
        name: String,
        /// Its target.
        target: String,
        /// What is wrong.
        reason: &'static str,
    },

    /// The chunks of a file do not tile it.
    #[error("file {name:?}: chunk layout invalid: {reason}; {HINT_CORRUPT}")]
    ChunkLayout {
        /// File name (truncated).
        name: String,
        /// What is wrong.
        reason: String,
    },

    /// A chunk's compressed extent lies outside the data area of the blob.
    #[error("file {name:?}: chunk extent {offset}..{end} lies outside the blob data area 0..{limit}; {HINT_CORRUPT}")]
    ExtentOutOfBounds {
        /// File name.
        name: String,
        /// Extent start.
        offset: u64,
        /// Extent end.
        end: u64,
        /// End of the data area (the TOC's offset).
        limit: u64,
    },

    /// Two chunks' compressed extents overlap.
    #[error(
        "chunk extents overlap at blob offset {offset}: {first:?} and {second:?}; {HINT_CORRUPT}"
    )]
    OverlappingExtents {
        /// One file.
        first: String,
        /// The other file.
        second: String,
        /// Where the second one starts.
        offset: u64,
    },

    /// Input exceeds a structural limit (entries, names, xattrs).
    #[error("TOC exceeds a limit: {reason}; {HINT_CORRUPT}")]
    LimitExceeded {
        /// Which limit.
        reason: String,
    },

    /// Chunk bytes did not hash to the chunk digest.
    #[error("chunk at blob offset {offset} (file offset {file_offset}) failed verification: expected {expected}, got {actual}; the registry served corrupt data; retry, and re-push the image if it persists")]
    ChunkDigestMismatch {
        /// Blob offset of the chunk.
        offset: u64,
        /// Offset inside the file.
        file_offset: u64,
        /// Digest from the TOC.
        expected: Digest,
        /// Digest of what was received.
        actual: Digest,
    },

    /// Fetched compressed bytes do not match the chunk's extent.
    #[error("chunk at blob offset {offset}: got {actual} compressed bytes, expected {expected}; the range response was truncated or misaligned; retry the fetch")]
    ChunkLengthMismatch {
        /// Blob offset of the chunk.
        offset: u64,
        /// Compressed length expected.
        expected: u64,
        /// Bytes supplied.
        actual: u64,
    },

    /// A chunk too large to materialize in memory.
    #[error("chunk at blob offset {offset} is {len} bytes, over the {limit}-byte limit for in-memory chunks; re-convert the image with `zest convert` (bounded chunks)")]
    ChunkTooLarge {
        /// Blob offset of the chunk.
        offset: u64,
        /// Its uncompressed length.
        len: u64,
        /// The limit.
        limit: u64,
    },

    /// The tar-split stream is malformed or does not match the content given.
    #[error(
        "tar-split invalid: {reason}; the layer's tar-split is corrupt; pull the layer in full"
    )]
    TarSplit {
        /// What is wrong.
        reason: String,
    },

    /// The writer's input tar is malformed or uses an unsupported feature.
    #[error("input tar invalid at byte {offset}: {reason}; fix the archive (or re-export the layer) and retry")]
    InvalidTar {
        /// Byte offset in the input tar.
        offset: u64,
        /// What is wrong.
        reason: String,
    },

    /// Writer options out of range.
    #[error("invalid writer options: {reason}")]
    InvalidOptions {
        /// What is wrong.
        reason: String,
    },

    /// I/O error of the writer's input or output.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Truncates untrusted text for error messages.
pub(crate) fn trunc(s: &str) -> String {
    const MAX: usize = 200;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}
