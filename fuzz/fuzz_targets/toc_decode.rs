//! Fuzzes blob-tail parsing and TOC decoding: the input is treated as a whole
//! blob (footer at its end, TOC wherever the footer says), and also as raw TOC
//! JSON, so both the binary and the JSON layers are explored. Any panic is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zest_format::{parse_footer, EntryKind, LayerIndex, TocLocation, FOOTER_FETCH_LEN};

fuzz_target!(|data: &[u8]| {
    let size = data.len() as u64;
    let tail = &data[data.len().saturating_sub(FOOTER_FETCH_LEN as usize)..];
    if let Ok(footer) = parse_footer(tail, size) {
        let loc = footer.location();
        let r = loc.toc_range();
        if let Some(toc) = data.get(r.start as usize..r.end as usize) {
            if let Ok(idx) = LayerIndex::decode(toc, &loc, size) {
                walk(&idx);
            }
        }
    }
    // The same bytes as TOC JSON, located in a fake blob.
    let loc = TocLocation {
        generation: zest_format::Generation::Old,
        toc: zest_format::Extent {
            offset: 1 << 20,
            compressed_len: 1,
            uncompressed_len: data.len() as u64,
        },
        tar_split: None,
        toc_digest: None,
    };
    if let Ok(idx) = LayerIndex::from_json(data, &loc, zest_oci::digest::Digest::of(data)) {
        walk(&idx);
    }
});

fn walk(idx: &LayerIndex) {
    let mut stack = vec![idx.root()];
    let mut steps = 0usize;
    while let Some(d) = stack.pop() {
        steps += 1;
        assert!(steps <= idx.len() + 1, "directory cycle");
        for c in idx.children(d) {
            assert_eq!(idx.lookup(d, c.name), Some(c.id));
            let e = idx.entry(c.id);
            let _ = (e.path(), e.xattrs().count(), e.digest(), e.link_target());
            let total: u64 = e.chunks().iter().map(|c| c.len).sum();
            if e.kind() == EntryKind::Reg {
                assert_eq!(total, e.size());
            }
            if e.kind() == EntryKind::Dir && e.parent() == d {
                stack.push(c.id);
            }
        }
    }
}
