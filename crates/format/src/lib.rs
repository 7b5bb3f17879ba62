//! The zstd:chunked layer format: footer, TOC location, a validated in-memory
//! layer model, verified chunk reads, and a writer.
//!
//! A zstd:chunked blob is an ordinary `tar+zstd` layer whose payload chunks each
//! start a fresh zstd frame at an offset recorded in a table of contents (TOC)
//! stored in a skippable frame near the end of the blob. This module owns every
//! byte-level fact about that format; nothing above it parses blob bytes.
//!
//! Flow for a reader:
//! 1. locate the TOC: [`TocLocation::from_annotations`] (preferred: one round trip
//!    saved and the TOC digest is trusted) or fetch [`footer_range`] and call
//!    [`parse_footer`];
//! 2. fetch [`TocLocation::toc_range`] and build the model with
//!    [`LayerIndex::decode`], which verifies the digest, decompresses with a hard cap
//!    and validates every entry, name, chunk and extent;
//! 3. for file reads, fetch a chunk's [`Chunk::compressed_range`] and turn it into
//!    verified bytes with [`ChunkDecoder`].
//!
//! Invariants the rest of zest relies on:
//! - a [`LayerIndex`] only exists if the whole TOC validated: names are clean
//!   relative paths, every entry has a directory parent, hard links point at a
//!   real non-link entry, chunks of a file are contiguous and cover it exactly,
//!   and compressed extents lie before the TOC and never overlap;
//! - [`ChunkDecoder`] never returns a byte that does not match the chunk digest;
//! - nothing here panics on untrusted input; every input-driven allocation and loop
//!   is bounded (see [`MAX_TOC_UNCOMPRESSED`], [`MAX_DATA_CHUNK_LEN`]).
//!
//! The writer, [`write_chunked`], produces the current (podman/containers-storage)
//! generation: TOC + tar-split + 64-byte footer, with content-defined chunks.
//!
//! Learned start-up profiles ([`profile::StartupProfile`]: which files of which
//! layer an image reads first) are decoded and validated here too, as untrusted
//! documents from a registry.
//!
//! eStargz layers (gzip members, the format of containerd's stargz snapshotter) read
//! into the same [`LayerIndex`]: [`estargz::parse_footer`] gives a
//! [`Generation::Estargz`] location, [`LayerIndex::decode`] builds the model from the
//! TOC, and [`ChunkDecoder`] decodes their chunks (gzip members) with the same checks.

pub mod c_include;
pub mod elf;
mod error;
pub mod estargz;
mod footer;
mod index;
pub mod profile;
pub mod python;
mod read;
pub mod reorder;
pub(crate) mod tar;
pub mod tarsplit;
#[cfg(feature = "testing")]
pub mod testblob;
mod toc;
mod writer;

pub use error::FormatError;
pub use footer::{
    footer_range, parse_footer, Extent, Footer, Generation, TocLocation, FOOTER_FETCH_LEN,
    SKIPPABLE_FRAME_MAGIC,
};
pub use index::{
    Children, Chunk, DirEntry, EntryId, EntryKind, EntryRef, LayerIndex, Timestamp, Xattrs,
    MAX_DATA_CHUNK_LEN, MAX_TOC_UNCOMPRESSED,
};
pub use read::{covering_range, ChunkDecoder};
pub use writer::{write_chunked, WriteOptions, WriteSummary};

/// Annotation keys of the current generation (`io.github.containers.zstd-chunked.`).
pub mod annotations {
    /// sha256 digest of the compressed TOC bytes (current generation).
    pub const MANIFEST_CHECKSUM: &str = "io.github.containers.zstd-chunked.manifest-checksum";
    /// `offset:compressed_len:uncompressed_len:1` of the TOC (current generation).
    pub const MANIFEST_POSITION: &str = "io.github.containers.zstd-chunked.manifest-position";
    /// `offset:compressed_len:uncompressed_len` of the tar-split (current generation).
    pub const TARSPLIT_POSITION: &str = "io.github.containers.zstd-chunked.tarsplit-position";
    /// sha256 digest of the compressed TOC bytes (old generation).
    pub const OLD_MANIFEST_CHECKSUM: &str = "io.containers.zstd-chunked.manifest-checksum";
    /// TOC position (old generation).
    pub const OLD_MANIFEST_POSITION: &str = "io.containers.zstd-chunked.manifest-position";
}

/// Result type of this module.
pub type Result<T, E = FormatError> = std::result::Result<T, E>;
