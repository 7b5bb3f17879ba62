//! Fuzzes eStargz reading: the input as a whole blob (footer at its end, the TOC's
//! gzip member and tar entry where the footer says, then every chunk decoded from the
//! input), and as raw TOC JSON. Any panic is a bug; a chunk that decodes must match
//! its digest.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zest_format::estargz;
use zest_format::{ChunkDecoder, LayerIndex, FOOTER_FETCH_LEN};
use zest_oci::digest::Digest;

fuzz_target!(|data: &[u8]| {
    let size = data.len() as u64;
    let tail = &data[data.len().saturating_sub(FOOTER_FETCH_LEN as usize)..];
    if let Ok(loc) = estargz::parse_footer(tail, size) {
        let r = loc.toc_range();
        if let Some(toc) = data.get(r.start as usize..r.end as usize) {
            if let Ok(idx) = LayerIndex::decode(toc, &loc, size) {
                check_chunks(&idx, data);
            }
        }
    }
    // The same bytes as TOC JSON of a blob whose TOC starts at 1 MiB.
    let loc = zest_format::TocLocation {
        generation: zest_format::Generation::Estargz,
        toc: zest_format::Extent {
            offset: 1 << 20,
            compressed_len: 64,
            uncompressed_len: 0,
        },
        tar_split: None,
        toc_digest: None,
    };
    if let Ok(idx) = estargz::index_from_toc_json(data, &loc) {
        let total: u64 = idx.all_chunks().iter().map(|c| c.len).sum();
        let _ = total;
    }
});

fn check_chunks(idx: &LayerIndex, data: &[u8]) {
    let Ok(mut decoder) = ChunkDecoder::new() else {
        return;
    };
    for chunk in idx.all_chunks().iter().take(64) {
        let r = chunk.compressed_range();
        if let Some(bytes) = data.get(r.start as usize..r.end as usize) {
            if let Ok(out) = decoder.decode(chunk, bytes) {
                assert_eq!(Digest::of(&out), chunk.digest);
            }
        }
    }
}
