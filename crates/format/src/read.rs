//! Turning fetched compressed bytes into verified chunk bytes.
//!
//! Invariant: every byte returned matched the chunk's `chunkDigest`. Output is
//! bounded by the chunk's declared length: a frame that decodes to more stops
//! the decoder at `len` and is an error, never a bigger allocation.

use std::ops::Range;

use super::error::FormatError;
use super::index::{Chunk, MAX_DATA_CHUNK_LEN};
use super::Result;
use zest_oci::digest::Digest;

/// Decompresses and verifies chunks, reusing one zstd decompression context.
/// Not `Sync`; keep one per worker thread.
pub struct ChunkDecoder {
    dctx: zstd::bulk::Decompressor<'static>,
}

impl std::fmt::Debug for ChunkDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChunkDecoder")
    }
}

impl ChunkDecoder {
    /// A decoder with a fresh zstd context.
    pub fn new() -> Result<Self> {
        let dctx = zstd::bulk::Decompressor::new().map_err(|source| FormatError::Decompress {
            what: "context creation".into(),
            source,
        })?;
        Ok(ChunkDecoder { dctx })
    }

    /// Decompresses one chunk from its compressed extent and verifies its digest.
    ///
    /// `compressed` must be exactly the bytes at [`Chunk::compressed_range`]. For a
    /// `zeros` chunk an empty slice is also accepted: the zeros are synthesized
    /// (and still checked against the digest).
    pub fn decode(&mut self, chunk: &Chunk, compressed: &[u8]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.decode_into(chunk, compressed, &mut out)?;
        Ok(out)
    }

    /// Like [`decode`](Self::decode), writing into `out` (cleared first) so callers
    /// can reuse buffers. On error `out` is left empty.
    pub fn decode_into(
        &mut self,
        chunk: &Chunk,
        compressed: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<()> {
        out.clear();
        if chunk.len > MAX_DATA_CHUNK_LEN {
            return Err(FormatError::ChunkTooLarge {
                offset: chunk.compressed_offset,
                len: chunk.len,
                limit: MAX_DATA_CHUNK_LEN,
            });
        }
        let len = chunk.len as usize;
        if chunk.zeros && compressed.is_empty() {
            out.resize(len, 0);
        } else if chunk.gzip {
            if compressed.len() as u64 != u64::from(chunk.compressed_len) {
                return Err(FormatError::ChunkLengthMismatch {
                    offset: chunk.compressed_offset,
                    expected: u64::from(chunk.compressed_len),
                    actual: compressed.len() as u64,
                });
            }
            crate::estargz::gunzip_chunk(chunk, compressed, out)?;
        } else {
            if compressed.len() as u64 != u64::from(chunk.compressed_len) {
                return Err(FormatError::ChunkLengthMismatch {
                    offset: chunk.compressed_offset,
                    expected: u64::from(chunk.compressed_len),
                    actual: compressed.len() as u64,
                });
            }
            out.reserve_exact(len);
            let what = || format!("chunk at blob offset {}", chunk.compressed_offset);
            // Decoding into the reserved capacity: output beyond it is an error
            // from zstd, so a hostile frame cannot make us allocate more.
            let n = self
                .dctx
                .decompress_to_buffer(compressed, out)
                .map_err(|source| FormatError::Decompress {
                    what: what(),
                    source,
                })?;
            if n != len {
                out.clear();
                return Err(FormatError::SizeMismatch {
                    what: what(),
                    declared: chunk.len,
                    actual: n as u64,
                });
            }
        }
        let actual = Digest::of(out);
        if actual != chunk.digest {
            out.clear();
            return Err(FormatError::ChunkDigestMismatch {
                offset: chunk.compressed_offset,
                file_offset: chunk.file_offset,
                expected: chunk.digest,
                actual,
            });
        }
        Ok(())
    }

    /// Decodes several chunks fetched with one range request.
    ///
    /// `fetched` holds the blob bytes `range_start..range_start + fetched.len()`;
    /// every chunk's compressed extent must lie inside it (gaps between chunks,
    /// e.g. tar header frames, are skipped). Returns the verified bytes of each
    /// chunk, in the order given.
    pub fn decode_run(
        &mut self,
        chunks: &[Chunk],
        fetched: &[u8],
        range_start: u64,
    ) -> Result<Vec<Vec<u8>>> {
        chunks
            .iter()
            .map(|c| {
                let slice = slice_extent(fetched, range_start, c.compressed_range()).ok_or(
                    FormatError::ChunkLengthMismatch {
                        offset: c.compressed_offset,
                        expected: u64::from(c.compressed_len),
                        actual: 0,
                    },
                )?;
                self.decode(c, slice)
            })
            .collect()
    }
}

/// The part of `fetched` (which starts at blob offset `start`) covering `range`.
fn slice_extent(fetched: &[u8], start: u64, range: Range<u64>) -> Option<&[u8]> {
    let lo = usize::try_from(range.start.checked_sub(start)?).ok()?;
    let hi = usize::try_from(range.end.checked_sub(start)?).ok()?;
    fetched.get(lo..hi)
}

/// The smallest blob range covering all `chunks` (for one merged range request).
pub fn covering_range(chunks: &[Chunk]) -> Option<Range<u64>> {
    let start = chunks.iter().map(|c| c.compressed_offset).min()?;
    let end = chunks.iter().map(|c| c.compressed_range().end).max()?;
    Some(start..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk_for(data: &[u8], offset: u64, compressed: &[u8], zeros: bool) -> Chunk {
        Chunk {
            compressed_offset: offset,
            file_offset: 0,
            len: data.len() as u64,
            compressed_len: compressed.len() as u32,
            zeros,
            gzip: false,
            digest: Digest::of(data),
        }
    }

    #[test]
    fn decodes_and_verifies() {
        let data = b"hello hello hello hello".repeat(100);
        let z = zstd::bulk::compress(&data, 3).unwrap();
        let c = chunk_for(&data, 100, &z, false);
        let mut dec = ChunkDecoder::new().unwrap();
        assert_eq!(dec.decode(&c, &z).unwrap(), data);

        // Wrong digest.
        let mut bad = c;
        bad.digest = Digest::of(b"other");
        assert!(matches!(
            dec.decode(&bad, &z),
            Err(FormatError::ChunkDigestMismatch { .. })
        ));
        // Declared length shorter than the frame: bounded, error.
        let mut short = c;
        short.len -= 1;
        assert!(dec.decode(&short, &z).is_err());
        // Longer than the frame.
        let mut long = c;
        long.len += 1;
        assert!(dec.decode(&long, &z).is_err());
        // Truncated fetch.
        assert!(matches!(
            dec.decode(&c, &z[..z.len() - 1]),
            Err(FormatError::ChunkLengthMismatch { .. })
        ));
        // Garbage of the right length.
        let garbage = vec![0x55u8; z.len()];
        assert!(matches!(
            dec.decode(&c, &garbage),
            Err(FormatError::Decompress { .. })
        ));
    }

    #[test]
    fn zeros_are_synthesized_or_decoded() {
        let zeros = vec![0u8; 5000];
        let z = zstd::bulk::compress(&zeros, 3).unwrap();
        let c = chunk_for(&zeros, 0, &z, true);
        let mut dec = ChunkDecoder::new().unwrap();
        assert_eq!(dec.decode(&c, &[]).unwrap(), zeros);
        assert_eq!(dec.decode(&c, &z).unwrap(), zeros);
    }

    #[test]
    fn decodes_a_run_with_gaps() {
        let a = b"first chunk".to_vec();
        let b = b"second chunk, after a header frame".to_vec();
        let za = zstd::bulk::compress(&a, 3).unwrap();
        let zb = zstd::bulk::compress(&b, 3).unwrap();
        let mut blob = vec![9u8; 50];
        let ca = chunk_for(&a, blob.len() as u64, &za, false);
        blob.extend_from_slice(&za);
        blob.extend_from_slice(&[7u8; 13]);
        let cb = chunk_for(&b, blob.len() as u64, &zb, false);
        blob.extend_from_slice(&zb);
        let range = covering_range(&[ca, cb]).unwrap();
        let fetched = &blob[range.start as usize..range.end as usize];
        let mut dec = ChunkDecoder::new().unwrap();
        let out = dec.decode_run(&[ca, cb], fetched, range.start).unwrap();
        assert_eq!(out, vec![a, b]);
        // A range that misses the end of the last chunk.
        assert!(dec
            .decode_run(&[ca, cb], &fetched[..fetched.len() - 1], range.start)
            .is_err());
    }
}
