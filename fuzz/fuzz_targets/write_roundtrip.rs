//! Fuzzes the writer with arbitrary input "tars": it must never panic, and
//! whatever it accepts must decode back to the input byte for byte and yield a
//! TOC the reader accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zest_format::{write_chunked, LayerIndex, TocLocation, WriteOptions};

fuzz_target!(|data: &[u8]| {
    let opts = WriteOptions {
        min_chunk: 64,
        avg_chunk: 256,
        max_chunk: 1024,
        zero_run_min: 64,
        ..WriteOptions::default()
    };
    let mut blob = Vec::new();
    let Ok(s) = write_chunked(data, &mut blob, &opts) else {
        return;
    };
    assert_eq!(zstd::stream::decode_all(&blob[..]).unwrap(), data);
    let loc = TocLocation::from_annotations(&s.annotations)
        .unwrap()
        .unwrap();
    let r = loc.toc_range();
    LayerIndex::decode(
        &blob[r.start as usize..r.end as usize],
        &loc,
        blob.len() as u64,
    )
    .expect("the writer's own TOC must be accepted");
});
