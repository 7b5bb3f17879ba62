//! Unit tests of TOC validation and the layer model.

use super::*;
use crate::footer::Extent;
use serde_json::{json, Value};

/// The data area of the fake blobs these tests describe.
const DATA_END: u64 = 1 << 20;

fn location_for(compressed: &[u8], json_len: usize, digest: Option<Digest>) -> (TocLocation, u64) {
    let loc = TocLocation {
        generation: Generation::Old,
        toc: Extent {
            offset: DATA_END + 8,
            compressed_len: compressed.len() as u64,
            uncompressed_len: json_len as u64,
        },
        tar_split: None,
        toc_digest: digest,
    };
    let blob_size = DATA_END + 8 + compressed.len() as u64 + 48;
    (loc, blob_size)
}

fn build_doc(doc: &Value) -> Result<LayerIndex> {
    let json = serde_json::to_vec(doc).unwrap();
    let z = zstd::bulk::compress(&json, 3).unwrap();
    let (loc, blob_size) = location_for(&z, json.len(), Some(Digest::of(&z)));
    LayerIndex::decode(&z, &loc, blob_size)
}

fn build(entries: Value) -> Result<LayerIndex> {
    build_doc(&json!({"version": 1, "entries": entries}))
}

fn d(s: &str) -> String {
    Digest::of(s.as_bytes()).to_string()
}

fn sample() -> Value {
    json!([
        {"type": "dir", "name": "./", "mode": 0o755, "modtime": "2024-05-06T07:08:09.5Z"},
        {"type": "dir", "name": "./usr/", "mode": 0o755, "uid": 0, "gid": 0},
        {"type": "dir", "name": "./usr/bin/", "mode": 0o755},
        {"type": "reg", "name": "./usr/bin/env", "mode": 0o4755, "size": 10, "uid": 1000, "gid": 1001,
         "digest": d("env"), "offset": 100, "endOffset": 150,
         "xattrs": {"security.capability": "AQIDBA==", "user.a": ""}},
        {"type": "reg", "name": "usr/bin/big", "mode": 0o644, "size": 300, "digest": d("big"),
         "offset": 200, "endOffset": 500, "chunkSize": 100, "chunkDigest": d("c0")},
        {"type": "chunk", "name": "usr/bin/big", "offset": 260, "chunkSize": 100, "chunkOffset": 100,
         "chunkDigest": d("c1"), "chunkType": "zeros"},
        {"type": "chunk", "name": "usr/bin/big", "offset": 270, "chunkSize": 100, "chunkOffset": 200,
         "chunkDigest": d("c2")},
        {"type": "reg", "name": "usr/bin/empty", "mode": 0o644},
        {"type": "hardlink", "name": "usr/bin/env2", "linkName": "./usr/bin/env"},
        {"type": "symlink", "name": "usr/bin/sh", "linkName": "/bin/dash", "mode": 0o777},
        {"type": "char", "name": "dev/null", "mode": 0o666, "devMajor": 1, "devMinor": 3},
        {"type": "block", "name": "dev/sda", "mode": 0o660, "devMajor": 8, "devMinor": 0},
        {"type": "fifo", "name": "run/fifo", "mode": 0o1777},
        {"type": "reg", "name": "etc/.wh.passwd", "mode": 0o600},
        {"type": "reg", "name": "opt/.wh..wh..opq"},
        {"type": "dir", "name": "tmp", "mode": 0o1777, "accesstime": "2020-01-01T00:00:00Z"},
        {"type": "reg", "name": "etc/hosts", "size": 5, "offset": 600, "endOffset": 610,
         "chunkDigest": d("hosts"), "unknownField": [1, 2, {"x": null}]},
    ])
}

#[test]
fn builds_the_model() {
    let idx = build(sample()).unwrap();
    let root = idx.root();
    assert_eq!(root.ino(), 1);
    let r = idx.entry(root);
    assert_eq!(r.kind(), EntryKind::Dir);
    assert_eq!(
        r.mtime(),
        Timestamp {
            secs: 1714979289,
            nanos: 500_000_000
        }
    );
    assert!(!r.is_synthesized());

    let names: Vec<&[u8]> = idx.children(root).map(|c| c.name).collect();
    assert_eq!(names, [&b"dev"[..], b"etc", b"opt", b"run", b"tmp", b"usr"]);
    // Root nlink: 2 + six subdirectories.
    assert_eq!(r.nlink(), 8);

    let env = idx.resolve_path("usr/bin/env").unwrap();
    let e = idx.entry(env);
    assert_eq!(e.kind(), EntryKind::Reg);
    assert_eq!(e.mode(), 0o4755);
    assert_eq!(e.st_mode(), 0o104755);
    assert_eq!((e.uid(), e.gid(), e.size()), (1000, 1001, 10));
    assert_eq!(e.nlink(), 2);
    assert_eq!(e.path(), "usr/bin/env");
    assert_eq!(e.digest(), Some(Digest::of(b"env")));
    assert_eq!(e.chunks().len(), 1);
    assert_eq!(e.chunks()[0].compressed_range(), 100..150);
    assert_eq!(e.chunks()[0].digest, Digest::of(b"env"));
    let x: Vec<(&str, &[u8])> = e.xattrs().collect();
    assert_eq!(
        x,
        [
            ("security.capability", &[1u8, 2, 3, 4][..]),
            ("user.a", &[][..])
        ]
    );
    assert_eq!(e.xattr(b"user.a"), Some(&[][..]));
    assert_eq!(e.xattr(b"user.b"), None);

    // The hard link is the same inode.
    let bin = idx.resolve_path("usr/bin").unwrap();
    assert_eq!(idx.lookup(bin, b"env2"), Some(env));
    let listed: Vec<(String, EntryId)> = idx
        .children(bin)
        .map(|c| (String::from_utf8(c.name.to_vec()).unwrap(), c.id))
        .collect();
    assert_eq!(
        listed.iter().map(|l| l.0.as_str()).collect::<Vec<_>>(),
        ["big", "empty", "env", "env2", "sh"]
    );
    assert_eq!(listed[2].1, listed[3].1);
    assert_eq!(idx.children(bin).nth(4).unwrap().name, b"sh");

    let big = idx.entry(idx.lookup(bin, b"big").unwrap());
    assert_eq!(big.size(), 300);
    assert_eq!(big.digest(), Some(Digest::of(b"big")));
    let c = big.chunks();
    assert_eq!(c.len(), 3);
    assert_eq!(
        (c[0].compressed_range(), c[0].file_range()),
        (200..260, 0..100)
    );
    assert_eq!((c[1].compressed_range(), c[1].zeros), (260..270, true));
    assert_eq!(
        (c[2].compressed_range(), c[2].file_range()),
        (270..500, 200..300)
    );
    assert_eq!(idx.chunk_range_for(big.id(), 0, 1), &c[..1]);
    assert_eq!(idx.chunk_range_for(big.id(), 99, 2), &c[..2]);
    assert_eq!(idx.chunk_range_for(big.id(), 100, 200), &c[1..]);
    assert_eq!(idx.chunk_range_for(big.id(), 250, 1000), &c[2..]);
    assert!(idx.chunk_range_for(big.id(), 300, 10).is_empty());
    assert!(idx.chunk_range_for(big.id(), 0, 0).is_empty());

    let empty = idx.entry(idx.lookup(bin, b"empty").unwrap());
    assert_eq!(
        (empty.size(), empty.chunks().len(), empty.digest()),
        (0, 0, None)
    );

    let sh = idx.entry(idx.lookup(bin, b"sh").unwrap());
    assert_eq!(sh.kind(), EntryKind::Symlink);
    assert_eq!(sh.link_target(), Some(&b"/bin/dash"[..]));
    assert_eq!(sh.size(), 9);

    let null = idx.entry(idx.resolve_path("dev/null").unwrap());
    assert_eq!((null.kind(), null.rdev()), (EntryKind::Char, (1, 3)));
    let sda = idx.entry(idx.resolve_path("/dev/sda").unwrap());
    assert_eq!(
        (sda.kind(), sda.rdev(), sda.st_mode()),
        (EntryKind::Block, (8, 0), 0o060660)
    );
    let dev = idx.entry(idx.resolve_path("dev").unwrap());
    assert!(dev.is_synthesized());
    assert_eq!((dev.mode(), dev.uid()), (0o755, 0));
    let fifo = idx.entry(idx.resolve_path("run/fifo").unwrap());
    assert_eq!((fifo.kind(), fifo.mode()), (EntryKind::Fifo, 0o1777));

    // Whiteouts present as NAME; opaque markers become a flag.
    let etc = idx.resolve_path("etc").unwrap();
    let wh = idx.entry(idx.lookup(etc, b"passwd").unwrap());
    assert_eq!(
        (wh.kind(), wh.rdev(), wh.st_mode() & 0o170000),
        (EntryKind::Whiteout, (0, 0), 0o020000)
    );
    assert!(idx.lookup(etc, b".wh.passwd").is_none());
    let opt = idx.entry(idx.resolve_path("opt").unwrap());
    assert!(opt.is_opaque_dir());
    assert_eq!(idx.children(opt.id()).len(), 0);
    assert!(!idx.entry(etc).is_opaque_dir());

    let tmp = idx.entry(idx.resolve_path("tmp").unwrap());
    assert_eq!(
        tmp.atime(),
        Some(Timestamp {
            secs: 1577836800,
            nanos: 0
        })
    );
    assert_eq!(tmp.ctime(), None);

    let hosts = idx.entry(idx.resolve_path("etc/hosts").unwrap());
    assert_eq!(hosts.digest(), Some(Digest::of(b"hosts")));

    // Blob order and inode numbering.
    let order: Vec<String> = idx
        .files_in_blob_order()
        .map(|i| idx.entry(i).path())
        .collect();
    assert_eq!(order, ["usr/bin/env", "usr/bin/big", "etc/hosts"]);
    for i in 1..=idx.len() as u64 {
        let id = idx.entry_for_ino(i).unwrap();
        assert!(id.ino() <= idx.len() as u64);
    }
    assert!(idx.entry_for_ino(0).is_none());
    assert!(idx.entry_for_ino(idx.len() as u64 + 1).is_none());
    assert!(idx.resolve_path("usr/../etc").is_none());
    assert!(idx.resolve_path("usr/bin/env/x").is_none());
    assert_eq!(idx.prefetch_extent(), None);
    assert!(idx.memory_bytes() > 0);
}

#[test]
fn inode_numbers_are_deterministic() {
    let a = build(sample()).unwrap();
    let b = build(sample()).unwrap();
    for p in [
        "usr/bin/env",
        "usr/bin/env2",
        "dev/null",
        "etc/passwd",
        "tmp",
    ] {
        assert_eq!(a.resolve_path(p), b.resolve_path(p), "{p}");
    }
}

#[test]
fn prefetch_from_field_or_landmark() {
    let doc = json!({"version": 1, "zest.prefetch": {"end": 4096}, "entries": [
        {"type": "reg", "name": "a", "size": 1, "offset": 10, "endOffset": 20, "digest": d("a")}]});
    assert_eq!(build_doc(&doc).unwrap().prefetch_extent(), Some(0..4096));
    let idx = build(json!([
        {"type": "reg", "name": "a", "size": 1, "offset": 10, "endOffset": 20, "digest": d("a")},
        {"type": "reg", "name": ".prefetch.landmark", "size": 1, "offset": 30, "endOffset": 40, "digest": d("l")},
        {"type": "reg", "name": "b", "size": 1, "offset": 50, "endOffset": 60, "digest": d("b")}]))
    .unwrap();
    assert_eq!(idx.prefetch_extent(), Some(0..30));
}

#[test]
fn directory_listed_twice_keeps_last_metadata() {
    let idx = build(json!([
        {"type": "reg", "name": "a/b", "size": 0},
        {"type": "dir", "name": "a", "mode": 0o700, "xattrs": {"user.x": "eA=="}},
        {"type": "dir", "name": "a/", "mode": 0o750},
        {"type": "reg", "name": "x/.wh.y"},
        {"type": "reg", "name": "x/y"},
    ]))
    .unwrap();
    let a = idx.entry(idx.resolve_path("a").unwrap());
    assert_eq!(a.mode(), 0o750);
    assert_eq!(a.xattrs().count(), 0);
    assert!(!a.is_synthesized());
    // A real entry wins over a whiteout of the same name.
    let y = idx.entry(idx.resolve_path("x/y").unwrap());
    assert_eq!(y.kind(), EntryKind::Reg);
    assert_eq!(idx.children(idx.resolve_path("x").unwrap()).len(), 1);
}

fn rejects(entries: Value, want: fn(&FormatError) -> bool) {
    match build(entries.clone()) {
        Ok(_) => panic!("accepted {entries}"),
        Err(e) => assert!(want(&e), "wrong error for {entries}: {e:?}"),
    }
}

#[test]
fn rejects_path_traversal_and_bad_names() {
    for name in ["../x", "a/../../x", "/abs", "/", "a/\u{0}b"] {
        rejects(json!([{"type": "reg", "name": name}]), |e| {
            matches!(e, FormatError::InvalidName { .. })
        });
    }
    let long = "x".repeat(256);
    rejects(json!([{"type": "dir", "name": long}]), |e| {
        matches!(e, FormatError::InvalidName { .. })
    });
    rejects(
        json!([{"type": "hardlink", "name": "l", "linkName": "../etc/shadow"}]),
        |e| matches!(e, FormatError::BadHardLink { .. }),
    );
}

#[test]
fn rejects_structural_errors() {
    rejects(
        json!([{"type": "reg", "name": "a"}, {"type": "reg", "name": "./a"}]),
        |e| matches!(e, FormatError::DuplicateEntry { .. }),
    );
    rejects(
        json!([{"type": "reg", "name": "a"}, {"type": "reg", "name": "a/b"}]),
        |e| matches!(e, FormatError::ParentNotDirectory { .. }),
    );
    rejects(json!([{"type": "socket", "name": "a"}]), |e| {
        matches!(e, FormatError::InvalidEntry { .. })
    });
    rejects(json!([{"type": "reg", "name": "", "size": 0}]), |e| {
        matches!(e, FormatError::InvalidEntry { .. })
    });
    rejects(
        json!([{"type": "hardlink", "name": "l", "linkName": "missing"}]),
        |e| matches!(e, FormatError::BadHardLink { .. }),
    );
    rejects(
        json!([{"type": "reg", "name": "a"}, {"type": "hardlink", "name": "b", "linkName": "a"},
               {"type": "hardlink", "name": "c", "linkName": "b"}]),
        |e| matches!(e, FormatError::BadHardLink { .. }),
    );
    rejects(
        json!([{"type": "hardlink", "name": "c", "linkName": "c"}]),
        |e| matches!(e, FormatError::BadHardLink { .. }),
    );
    rejects(
        json!([{"type": "dir", "name": "d"}, {"type": "hardlink", "name": "c", "linkName": "d"}]),
        |e| matches!(e, FormatError::BadHardLink { .. }),
    );
    rejects(json!([{"type": "symlink", "name": "s"}]), |e| {
        matches!(e, FormatError::InvalidEntry { .. })
    });
    rejects(
        json!([{"type": "reg", "name": "a", "uid": 1u64 << 32}]),
        |e| matches!(e, FormatError::InvalidEntry { .. }),
    );
    rejects(
        json!([{"type": "reg", "name": "a", "modtime": "not a time"}]),
        |e| matches!(e, FormatError::InvalidEntry { .. }),
    );
    rejects(
        json!([{"type": "reg", "name": "a", "xattrs": {"user.x": "!!notbase64"}}]),
        |e| matches!(e, FormatError::InvalidEntry { .. }),
    );
    rejects(json!([{"type": "reg", "name": "a", "size": -1}]), |e| {
        matches!(e, FormatError::TocJson { .. })
    });
}

#[test]
fn rejects_bad_chunks() {
    // Bad digest strings.
    rejects(
        json!([{"type": "reg", "name": "a", "size": 1, "offset": 1, "endOffset": 2, "digest": "sha256:xyz"}]),
        |e| matches!(e, FormatError::InvalidDigest { .. }),
    );
    rejects(
        json!([{"type": "reg", "name": "a", "size": 1, "offset": 1, "endOffset": 2, "digest": "md5:00"}]),
        |e| matches!(e, FormatError::InvalidDigest { .. }),
    );
    // No digest at all for a non-empty file.
    rejects(
        json!([{"type": "reg", "name": "a", "size": 1, "offset": 1, "endOffset": 2}]),
        |e| matches!(e, FormatError::ChunkLayout { .. }),
    );
    // Chunk sizes that do not add up to the file size.
    rejects(
        json!([{"type": "reg", "name": "a", "size": 10, "offset": 1, "endOffset": 9, "chunkSize": 4, "chunkDigest": d("1")},
               {"type": "chunk", "name": "a", "offset": 5, "chunkOffset": 4, "chunkSize": 4, "chunkDigest": d("2")}]),
        |e| matches!(e, FormatError::ChunkLayout { .. }),
    );
    // A gap between chunks.
    rejects(
        json!([{"type": "reg", "name": "a", "size": 10, "offset": 1, "endOffset": 9, "chunkSize": 4, "chunkDigest": d("1")},
               {"type": "chunk", "name": "a", "offset": 5, "chunkOffset": 5, "chunkSize": 5, "chunkDigest": d("2")}]),
        |e| matches!(e, FormatError::ChunkLayout { .. }),
    );
    // Chunk past the end of the file.
    rejects(
        json!([{"type": "reg", "name": "a", "size": 4, "offset": 1, "endOffset": 9, "chunkSize": 8, "chunkDigest": d("1")}]),
        |e| matches!(e, FormatError::ChunkLayout { .. }),
    );
    // Multi-chunk file without chunk digests.
    rejects(
        json!([{"type": "reg", "name": "a", "size": 8, "offset": 1, "endOffset": 9, "chunkSize": 4, "digest": d("1")},
               {"type": "chunk", "name": "a", "offset": 5, "chunkOffset": 4, "chunkSize": 4}]),
        |e| matches!(e, FormatError::ChunkLayout { .. }),
    );
    // Chunk entry without a file before it / with another name.
    rejects(
        json!([{"type": "chunk", "name": "a", "offset": 5, "chunkOffset": 4, "chunkSize": 4, "chunkDigest": d("2")}]),
        |e| matches!(e, FormatError::ChunkLayout { .. }),
    );
    rejects(
        json!([{"type": "reg", "name": "a", "size": 8, "offset": 1, "endOffset": 9, "chunkSize": 4, "chunkDigest": d("1")},
               {"type": "chunk", "name": "b", "offset": 5, "chunkOffset": 4, "chunkSize": 4, "chunkDigest": d("2")}]),
        |e| matches!(e, FormatError::ChunkLayout { .. }),
    );
    // Unknown chunk type.
    rejects(
        json!([{"type": "reg", "name": "a", "size": 1, "offset": 1, "endOffset": 2, "digest": d("a"), "chunkType": "holes"}]),
        |e| matches!(e, FormatError::InvalidEntry { .. }),
    );
    // Extent past the data area (into the TOC) and past the blob.
    rejects(
        json!([{"type": "reg", "name": "a", "size": 1, "offset": DATA_END - 1, "endOffset": DATA_END + 1, "digest": d("a")}]),
        |e| matches!(e, FormatError::ExtentOutOfBounds { .. }),
    );
    rejects(
        json!([{"type": "reg", "name": "a", "size": 1, "offset": 5, "endOffset": u64::MAX, "digest": d("a")}]),
        |e| matches!(e, FormatError::ExtentOutOfBounds { .. }),
    );
    // Empty and reversed extents.
    rejects(
        json!([{"type": "reg", "name": "a", "size": 1, "offset": 5, "endOffset": 5, "digest": d("a")}]),
        |e| matches!(e, FormatError::ExtentOutOfBounds { .. }),
    );
    rejects(
        json!([{"type": "reg", "name": "a", "size": 1, "offset": 5, "digest": d("a")}]),
        |e| matches!(e, FormatError::ExtentOutOfBounds { .. }),
    );
    // Overlapping extents of two files, and duplicates.
    rejects(
        json!([{"type": "reg", "name": "a", "size": 1, "offset": 10, "endOffset": 20, "digest": d("a")},
               {"type": "reg", "name": "b", "size": 1, "offset": 15, "endOffset": 30, "digest": d("b")}]),
        |e| matches!(e, FormatError::OverlappingExtents { .. }),
    );
    rejects(
        json!([{"type": "reg", "name": "a", "size": 1, "offset": 10, "endOffset": 20, "digest": d("a")},
               {"type": "reg", "name": "b", "size": 1, "offset": 10, "endOffset": 20, "digest": d("a")}]),
        |e| matches!(e, FormatError::OverlappingExtents { .. }),
    );
    // A whiteout's (hidden) data still may not alias another file's.
    rejects(
        json!([{"type": "reg", "name": "a", "size": 1, "offset": 10, "endOffset": 20, "digest": d("a")},
               {"type": "reg", "name": ".wh.b", "size": 1, "offset": 12, "endOffset": 14, "digest": d("a")}]),
        |e| matches!(e, FormatError::OverlappingExtents { .. }),
    );
    // Single chunk whose chunkDigest contradicts the file digest.
    rejects(
        json!([{"type": "reg", "name": "a", "size": 1, "offset": 10, "endOffset": 20, "digest": d("a"), "chunkDigest": d("b")}]),
        |e| matches!(e, FormatError::ChunkLayout { .. }),
    );
    // A data chunk too large to verify in memory.
    rejects(
        json!([{"type": "reg", "name": "a", "size": MAX_DATA_CHUNK_LEN + 1, "offset": 10, "endOffset": 20, "digest": d("a")}]),
        |e| matches!(e, FormatError::ChunkTooLarge { .. }),
    );
}

#[test]
fn huge_zero_chunks_are_fine() {
    let size = 10u64 << 30;
    let idx = build(
        json!([{"type": "reg", "name": "disk.img", "size": size, "offset": 10, "endOffset": 20,
        "chunkSize": size, "chunkDigest": d("zeros"), "chunkType": "zeros"}]),
    )
    .unwrap();
    let f = idx.entry(idx.resolve_path("disk.img").unwrap());
    assert_eq!(f.chunks()[0].len, size);
    assert!(f.chunks()[0].zeros);
}

#[test]
fn rejects_bad_documents() {
    assert!(matches!(
        build_doc(&json!({"version": 2, "entries": []})),
        Err(FormatError::UnsupportedTocVersion { version: 2 })
    ));
    assert!(matches!(
        build_doc(&json!({"entries": []})),
        Err(FormatError::UnsupportedTocVersion { .. })
    ));
    assert!(matches!(
        build_doc(&json!({"version": 1})),
        Err(FormatError::TocJson { .. })
    ));
    assert!(matches!(
        build_doc(&json!([1, 2])),
        Err(FormatError::TocJson { .. })
    ));
    assert!(matches!(
        build_doc(&json!({"version": 1, "entries": [], "tarSplitDigest": "nope"})),
        Err(FormatError::InvalidDigest { .. })
    ));
    // Trailing garbage after the document.
    let json = br#"{"version":1,"entries":[]} x"#;
    let z = zstd::bulk::compress(json, 3).unwrap();
    let (loc, size) = location_for(&z, json.len(), None);
    assert!(matches!(
        LayerIndex::decode(&z, &loc, size),
        Err(FormatError::TocJson { .. })
    ));
}

#[test]
fn verifies_toc_digest_size_and_cap() {
    let json = br#"{"version":1,"entries":[]}"#;
    let z = zstd::bulk::compress(json, 3).unwrap();
    let (mut loc, size) = location_for(&z, json.len(), Some(Digest::of(b"other")));
    assert!(matches!(
        LayerIndex::decode(&z, &loc, size),
        Err(FormatError::TocDigestMismatch { .. })
    ));
    loc.toc_digest = Some(Digest::of(&z));
    let idx = LayerIndex::decode(&z, &loc, size).unwrap();
    assert_eq!(idx.len(), 1);
    assert_eq!(idx.toc_digest(), Digest::of(&z));
    // Declared size off by one either way.
    loc.toc.uncompressed_len = json.len() as u64 - 1;
    assert!(matches!(
        LayerIndex::decode(&z, &loc, size),
        Err(FormatError::SizeMismatch { .. })
    ));
    loc.toc.uncompressed_len = json.len() as u64 + 1;
    assert!(matches!(
        LayerIndex::decode(&z, &loc, size),
        Err(FormatError::SizeMismatch { .. })
    ));
    // Over the cap, refused before decompressing.
    loc.toc.uncompressed_len = MAX_TOC_UNCOMPRESSED + 1;
    assert!(matches!(
        LayerIndex::decode(&z, &loc, size),
        Err(FormatError::TocTooLarge { .. })
    ));
    // Wrong number of bytes fetched.
    loc.toc.uncompressed_len = json.len() as u64;
    assert!(matches!(
        LayerIndex::decode(&z[1..], &loc, size),
        Err(FormatError::TocLengthMismatch { .. })
    ));
    // TOC position beyond the blob.
    assert!(matches!(
        LayerIndex::decode(&z, &loc, size - 1),
        Err(FormatError::PositionOutOfBounds { .. })
    ));
    // Not zstd at all.
    let garbage = vec![0x42u8; z.len()];
    loc.toc_digest = None;
    assert!(matches!(
        LayerIndex::decode(&garbage, &loc, size),
        Err(FormatError::Decompress { .. })
    ));
}

#[test]
fn a_zip_bomb_is_bounded() {
    // 100 MiB of spaces compress to a few KiB; declared small, decoding must stop.
    let mut json = br#"{"version":1,"entries":[]}"#.to_vec();
    json.resize(100 << 20, b' ');
    let z = zstd::bulk::compress(&json, 3).unwrap();
    let (mut loc, size) = location_for(&z, 30, None);
    assert!(matches!(
        LayerIndex::decode(&z, &loc, size),
        Err(FormatError::SizeMismatch { .. })
    ));
    loc.toc.uncompressed_len = json.len() as u64;
    assert!(LayerIndex::decode(&z, &loc, size).is_ok());
    // The streaming path (large declared sizes) is bounded too.
    assert!(matches!(
        decompress_bounded(&z, (100 << 20) - 1, "test"),
        Err(FormatError::SizeMismatch { .. })
    ));
    assert_eq!(
        decompress_bounded(&z, 100 << 20, "test").unwrap().len(),
        100 << 20
    );
}

#[test]
fn memory_per_entry_is_compact() {
    let mut entries = Vec::new();
    for i in 0..10_000u64 {
        entries.push(json!({"type": "reg", "name": format!("usr/lib/pkg{}/file{i}.so", i % 100), "mode": 0o644,
            "size": 100, "offset": 10 + i * 100, "endOffset": 10 + i * 100 + 50, "digest": d(&i.to_string()),
            "modtime": "2024-01-01T00:00:00Z"}));
    }
    let idx = build(Value::Array(entries)).unwrap();
    let per_entry = idx.memory_bytes() / idx.len();
    assert!(per_entry <= 200, "{per_entry} bytes per entry");
    assert_eq!(std::mem::size_of::<Entry>(), 64);
    assert_eq!(std::mem::size_of::<Chunk>(), 64);
}
