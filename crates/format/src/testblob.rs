//! Builder of small zstd:chunked blobs for tests of the crates above this one (old-generation footer, no
//! tar-split), so the fetcher and filesystem can be unit tested without the
//! writer or a registry.

use serde_json::{json, Value};

use crate::{Generation, LayerIndex, TocLocation};
use zest_oci::digest::Digest;

/// One file of a test blob: name, content, chunk size (content split evenly).
pub struct TestFile<'a> {
    pub name: &'a str,
    pub data: &'a [u8],
    pub chunk: usize,
}

/// A built blob and its TOC location.
pub struct TestBlob {
    pub bytes: Vec<u8>,
    pub location: TocLocation,
}

impl TestBlob {
    /// The validated index of this blob.
    pub fn index(&self) -> LayerIndex {
        let z = &self.bytes
            [self.location.toc_range().start as usize..self.location.toc_range().end as usize];
        LayerIndex::decode(z, &self.location, self.bytes.len() as u64).expect("test TOC is valid")
    }
}

fn frame(data: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(data, 3).expect("zstd compress")
}

/// Builds a blob holding only the file `name` (the set-up most tests need).
pub fn build_one(name: &str, data: &[u8], chunk: usize) -> TestBlob {
    build(&[TestFile { name, data, chunk }], Vec::new())
}

/// Builds a blob holding `files` (each file's chunks as separate frames, a
/// small "header" frame between files), plus `extra` TOC entries (dirs,
/// links, whiteouts...).
pub fn build(files: &[TestFile<'_>], extra: Vec<Value>) -> TestBlob {
    build_with_modes(files, extra, |_| 0o644)
}

/// Like [`build`], each file with the permission bits `mode` gives its name.
pub fn build_with_modes(
    files: &[TestFile<'_>],
    extra: Vec<Value>,
    mode: impl Fn(&str) -> u32,
) -> TestBlob {
    let mut blob = frame(b"leading tar headers");
    let mut entries = vec![json!({"type": "dir", "name": "./", "mode": 0o755})];
    entries.extend(extra);
    for f in files {
        blob.extend(frame(format!("header of {}", f.name).as_bytes()));
        let mut first = true;
        let start = blob.len();
        let mut recs = Vec::new();
        for (i, piece) in f.data.chunks(f.chunk.max(1)).enumerate() {
            let off = blob.len();
            let zeros = piece.len() >= 1024 && piece.iter().all(|&b| b == 0);
            blob.extend(frame(piece));
            let mut e = json!({
                "type": if first { "reg" } else { "chunk" },
                "name": f.name,
                "offset": off,
                "chunkSize": piece.len(),
                "chunkOffset": i * f.chunk,
                "chunkDigest": Digest::of(piece).to_string(),
            });
            if zeros {
                e["chunkType"] = json!("zeros");
            }
            recs.push(e);
            first = false;
        }
        if recs.is_empty() {
            entries.push(json!({"type": "reg", "name": f.name, "mode": mode(f.name), "size": 0}));
            continue;
        }
        let end = blob.len();
        if let Some(r) = recs.first_mut() {
            r["mode"] = json!(mode(f.name));
            r["size"] = json!(f.data.len());
            r["digest"] = json!(Digest::of(f.data).to_string());
            r["endOffset"] = json!(end);
            r["modtime"] = json!("2024-01-02T03:04:05Z");
        }
        let _ = start;
        entries.extend(recs);
    }
    let toc_json = serde_json::to_vec(&json!({"version": 1, "entries": entries})).expect("json");
    let z = frame(&toc_json);
    blob.extend([0x50, 0x2a, 0x4d, 0x18]);
    blob.extend((z.len() as u32).to_le_bytes());
    let toc_offset = blob.len() as u64;
    blob.extend(&z);
    blob.extend([0x50, 0x2a, 0x4d, 0x18]);
    blob.extend(40u32.to_le_bytes());
    for v in [toc_offset, z.len() as u64, toc_json.len() as u64, 1] {
        blob.extend(v.to_le_bytes());
    }
    blob.extend(b"GnUlInUx");
    let location = TocLocation {
        generation: Generation::Old,
        toc: crate::Extent {
            offset: toc_offset,
            compressed_len: z.len() as u64,
            uncompressed_len: toc_json.len() as u64,
        },
        tar_split: None,
        toc_digest: Some(Digest::of(&z)),
    };
    TestBlob {
        bytes: blob,
        location,
    }
}
