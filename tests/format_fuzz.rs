//! Deterministic mutation testing of every parser in `zest::format`: seeded
//! random edits of a valid footer, TOC (JSON and compressed), annotations,
//! tar-split and input tar. The property is "no panic, and anything accepted
//! still satisfies the model's invariants". Complements the cargo-fuzz targets
//! in `fuzz/`, and runs in the normal test suite with a fixed seed so failures
//! reproduce.

use std::collections::BTreeMap;

use zest_format::{
    parse_footer, tarsplit, write_chunked, ChunkDecoder, EntryId, EntryKind, Extent, LayerIndex,
    TocLocation, WriteOptions,
};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const SPLICES: &[&str] = &[
    "..",
    "/",
    "./",
    "\\u0000",
    "-1",
    "1e30",
    "18446744073709551615",
    "null",
    "\"\"",
    "[]",
    "{}",
    "\"chunk\"",
    "\"hardlink\"",
    "\"zeros\"",
    ".wh.",
    ".wh..wh..opq",
    "sha256:",
    "0",
    "99999999999",
    ",",
    ":",
    "\"",
    "\\",
];

fn mutate(rng: &mut Rng, data: &mut Vec<u8>) {
    let edits = 1 + rng.below(4);
    for _ in 0..edits {
        if data.is_empty() {
            data.push(rng.next() as u8);
            continue;
        }
        let at = rng.below(data.len());
        match rng.below(6) {
            0 => data[at] ^= 1 << rng.below(8),
            1 => data[at] = rng.next() as u8,
            2 => {
                let end = (at + 1 + rng.below(16)).min(data.len());
                data.drain(at..end);
            }
            3 => {
                let s = SPLICES[rng.below(SPLICES.len())].as_bytes();
                data.splice(at..at, s.iter().copied());
            }
            4 => {
                // Duplicate a slice elsewhere (repeats entries, fields, digits).
                let len = rng.below(64).min(data.len() - at);
                let piece = data[at..at + len].to_vec();
                let to = rng.below(data.len());
                data.splice(to..to, piece);
            }
            _ => {
                if data[at].is_ascii_digit() {
                    data[at] = b'0' + rng.below(10) as u8;
                } else {
                    let set = b"0123456789/.\"{}[],:";
                    data[at] = set[rng.below(set.len())];
                }
            }
        }
    }
}

/// A small but feature-complete layer from the writer.
fn seed_layer() -> (Vec<u8>, Vec<u8>) {
    use tar::EntryType as T;
    let mut b = tar::Builder::new(Vec::new());
    let add =
        |b: &mut tar::Builder<Vec<u8>>, kind: T, path: &str, data: &[u8], link: Option<&str>| {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(kind);
            h.set_mode(0o4755);
            h.set_size(data.len() as u64);
            h.set_mtime(1_700_000_000);
            h.set_uid(1);
            h.set_gid(2);
            match link {
                Some(l) => b.append_link(&mut h, path, l).unwrap(),
                None => b.append_data(&mut h, path, data).unwrap(),
            }
        };
    add(&mut b, T::Directory, "d/", b"", None);
    let mut big = Vec::new();
    for i in 0..40_000u32 {
        big.extend_from_slice(&(i.wrapping_mul(2_654_435_761)).to_le_bytes()[..2]);
    }
    big.extend(vec![0u8; 3000]);
    add(&mut b, T::Regular, "d/big", &big, None);
    add(&mut b, T::Regular, "d/small", b"hello", None);
    add(&mut b, T::Symlink, "d/link", b"", Some("small"));
    add(&mut b, T::Link, "d/hard", b"", Some("d/small"));
    add(&mut b, T::Regular, "d/.wh.gone", b"", None);
    add(&mut b, T::Regular, "e/.wh..wh..opq", b"", None);
    b.append_pax_extensions([("SCHILY.xattr.user.x", &b"y"[..])])
        .unwrap();
    add(&mut b, T::Fifo, "e/fifo", b"", None);
    let tar = b.into_inner().unwrap();
    let mut blob = Vec::new();
    let opts = WriteOptions {
        min_chunk: 1024,
        avg_chunk: 4096,
        max_chunk: 16384,
        ..WriteOptions::default()
    };
    write_chunked(&tar[..], &mut blob, &opts).unwrap();
    (tar, blob)
}

/// Uses the whole read API of an accepted index and checks its invariants.
fn exercise(idx: &LayerIndex, data_end: u64) {
    let mut stack = vec![idx.root()];
    let mut visited = 0usize;
    while let Some(d) = stack.pop() {
        visited += 1;
        assert!(visited <= idx.len() + 1, "directory cycle");
        let kids: Vec<_> = idx.children(d).collect();
        for w in kids.windows(2) {
            assert!(w[0].name < w[1].name, "children not sorted/unique");
        }
        for c in kids {
            assert_eq!(idx.lookup(d, c.name), Some(c.id));
            let e = idx.entry(c.id);
            let _ = (
                e.path(),
                e.st_mode(),
                e.nlink(),
                e.rdev(),
                e.link_target(),
                e.digest(),
                e.atime(),
            );
            let _ = e.xattrs().count();
            if e.kind() == EntryKind::Dir && !c.name.is_empty() && e.parent() == d {
                stack.push(c.id);
            }
            let chunks = e.chunks();
            let mut off = 0;
            for ch in chunks {
                assert_eq!(ch.file_offset, off);
                assert!(ch.len > 0);
                assert!(ch.compressed_range().end <= data_end);
                off += ch.len;
            }
            if e.kind() == EntryKind::Reg {
                assert_eq!(off, e.size());
                let _ = idx.chunk_range_for(c.id, e.size() / 2, 1 + e.size() / 3);
            }
        }
    }
    for f in idx.files_in_blob_order() {
        assert_eq!(idx.entry(f).kind(), EntryKind::Reg);
    }
    let _ = idx.entry_for_ino(u64::MAX);
    let _ = idx.entry(EntryId::ROOT);
    let _ = idx.resolve_path("d/../x");
}

#[test]
fn mutated_tocs_never_panic() {
    let (_, blob) = seed_layer();
    let footer = parse_footer(&blob[blob.len() - 64..], blob.len() as u64).unwrap();
    let loc = footer.location();
    let toc_bytes = &blob[loc.toc_range().start as usize..loc.toc_range().end as usize];
    let json = zstd::stream::decode_all(toc_bytes).unwrap();
    let blob_size = blob.len() as u64;
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut accepted = 0;
    for _ in 0..12_000 {
        let mut j = json.clone();
        mutate(&mut rng, &mut j);
        let z = zstd::bulk::compress(&j, 1).unwrap();
        let mut l = loc;
        l.toc = Extent {
            offset: loc.toc.offset,
            compressed_len: z.len() as u64,
            uncompressed_len: j.len() as u64,
        };
        // Keep the claimed position inside the blob so decoding gets past bounds checks.
        let size = blob_size.max(l.toc.offset + z.len() as u64 + 200);
        if let Ok(idx) = LayerIndex::decode(&z, &l, size) {
            accepted += 1;
            exercise(&idx, l.data_end());
        }
    }
    eprintln!("accepted {accepted} of 12000 mutated TOCs");
    // Some mutations are harmless (e.g. inside a digest-free name); most are not.
    assert!(accepted > 0 && accepted < 12_000, "accepted {accepted}");
}

#[test]
fn mutated_footers_compressed_tocs_and_garbage_never_panic() {
    let (_, blob) = seed_layer();
    let size = blob.len() as u64;
    let footer = parse_footer(&blob[blob.len() - 64..], size).unwrap();
    let loc = footer.location();
    let toc_bytes = blob[loc.toc_range().start as usize..loc.toc_range().end as usize].to_vec();
    let mut rng = Rng(0x5eed_1234_abcd_0002);
    for _ in 0..4000 {
        let mut tail = blob[blob.len() - 72..].to_vec();
        mutate(&mut rng, &mut tail);
        if let Ok(f) = parse_footer(&tail, size) {
            f.location().check_bounds(size).unwrap();
            assert!(f.toc.range().end <= size);
        }
        let mut z = toc_bytes.clone();
        mutate(&mut rng, &mut z);
        let mut l = loc;
        l.toc.compressed_len = z.len() as u64;
        if let Ok(idx) = LayerIndex::decode(&z, &l, size + 100) {
            exercise(&idx, l.data_end());
        }
        // Pure garbage everywhere.
        let n = rng.below(200);
        let garbage: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
        let _ = parse_footer(&garbage, rng.next() % 1000);
        let _ = LayerIndex::from_json(&garbage, &loc, zest_oci::digest::Digest::of(&garbage));
        let mut l2 = loc;
        l2.toc.compressed_len = garbage.len() as u64;
        let _ = LayerIndex::decode(&garbage, &l2, size + 1000);
    }
}

#[test]
fn mutated_annotations_and_tar_splits_never_panic() {
    let (tar, blob) = seed_layer();
    let mut out = Vec::new();
    let s = write_chunked(&tar[..], &mut out, &WriteOptions::default()).unwrap();
    let ts = s.tar_split;
    let lines = tarsplit::decompress(
        &out[ts.offset as usize..(ts.offset + ts.compressed_len) as usize],
        &ts,
    )
    .unwrap();
    let mut rng = Rng(0x5eed_1234_abcd_0003);
    for _ in 0..3000 {
        let mut ann: BTreeMap<String, String> = s.annotations.clone();
        for v in ann.values_mut() {
            if rng.below(2) == 0 {
                let mut b = v.clone().into_bytes();
                mutate(&mut rng, &mut b);
                *v = String::from_utf8_lossy(&b).into_owned();
            }
        }
        if let Ok(Some(loc)) = TocLocation::from_annotations(&ann) {
            let _ = loc.check_bounds(blob.len() as u64);
            let _ = loc.toc_in_tail(&blob, 0);
        }
        let mut l = lines.clone();
        mutate(&mut rng, &mut l);
        for e in tarsplit::entries(&l) {
            let _ = e;
        }
        let mut sink = Vec::new();
        let _ = tarsplit::reassemble(
            &l,
            |_, size, w| {
                let _ = w.write_all(&vec![0u8; size.min(1 << 16) as usize]);
                Ok(())
            },
            &mut sink,
        );
    }
}

#[test]
fn mutated_input_tars_never_panic_and_round_trip_when_accepted() {
    let (tar, _) = seed_layer();
    let mut rng = Rng(0x5eed_1234_abcd_0004);
    let mut dec = ChunkDecoder::new().unwrap();
    let mut accepted = 0;
    for _ in 0..1500 {
        let mut t = tar.clone();
        // Mutate mostly the header area so the tar stays recognizable.
        let keep = t.split_off(rng.below(t.len()).min(4096));
        mutate(&mut rng, &mut t);
        t.extend(keep);
        let mut blob = Vec::new();
        let opts = WriteOptions {
            min_chunk: 1024,
            avg_chunk: 4096,
            max_chunk: 16384,
            ..WriteOptions::default()
        };
        let Ok(s) = write_chunked(&t[..], &mut blob, &opts) else {
            continue;
        };
        accepted += 1;
        assert_eq!(zstd::stream::decode_all(&blob[..]).unwrap(), t);
        let loc = TocLocation::from_annotations(&s.annotations)
            .unwrap()
            .unwrap();
        let r = loc.toc_range();
        // The writer passes names through untouched, so its TOC must always
        // be accepted by the reader.
        let idx = LayerIndex::decode(
            &blob[r.start as usize..r.end as usize],
            &loc,
            blob.len() as u64,
        )
        .unwrap_or_else(|e| panic!("writer produced a TOC the reader rejects: {e}"));
        exercise(&idx, loc.data_end());
        for f in idx.files_in_blob_order().collect::<Vec<_>>() {
            for c in idx.entry(f).chunks() {
                let cr = c.compressed_range();
                dec.decode(c, &blob[cr.start as usize..cr.end as usize])
                    .unwrap();
            }
        }
    }
    eprintln!("accepted {accepted} of 1500 mutated tars");
    assert!(accepted > 0, "no mutated tar was accepted");
}

#[test]
fn mutated_startup_profiles_never_panic_and_round_trip_when_accepted() {
    use zest_format::profile::{ProfileEntry, StartupProfile};
    use zest_oci::digest::Digest;
    let layer = Digest::of(b"layer");
    let seed = StartupProfile::new(
        Digest::of(b"image"),
        ["usr/bin/app", "etc/app.conf", "usr/lib/libc.so.6"]
            .iter()
            .enumerate()
            .map(|(i, p)| ProfileEntry {
                layer,
                path: (*p).to_owned(),
                ms: Some(i as u64),
            })
            .collect(),
    )
    .unwrap()
    .encode();
    let mut rng = Rng(0x5eed_1234_abcd_0042);
    let mut accepted = 0;
    for _ in 0..12_000 {
        let mut doc = seed.clone();
        mutate(&mut rng, &mut doc);
        if let Ok(profile) = StartupProfile::decode(&doc) {
            accepted += 1;
            for e in profile.entries() {
                assert!(!e.path.starts_with('/') && !e.path.split('/').any(|c| c == ".."));
            }
            assert_eq!(StartupProfile::decode(&profile.encode()).unwrap(), profile);
        }
    }
    eprintln!("accepted {accepted} of 12000 mutated profiles");
    assert!(accepted < 12_000, "every mutation accepted");
}

#[test]
fn mutated_elf_files_never_panic() {
    use zest_format::elf::{string_at, ElfFile};
    // The test binary itself: a real dynamically linked ELF file. Only its
    // first 16 KiB (headers; the dynamic section often lies further, then the
    // same bytes stand in for it).
    let own = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    let seed = own[..own.len().min(16 << 10)].to_vec();
    let mut rng = Rng(0x5eed_e1f0_0000_0007);
    let (mut parsed, mut rounds) = (0, 0);
    for _ in 0..20_000 {
        let mut data = seed.clone();
        mutate(&mut rng, &mut data);
        // Aim some edits at the header and program headers themselves.
        for _ in 0..rng.below(4) {
            let at = rng.below(data.len().min(1024));
            if let Some(b) = data.get_mut(at) {
                *b = rng.next() as u8;
            }
        }
        rounds += 1;
        let Ok(elf) = ElfFile::parse(&data) else {
            continue;
        };
        parsed += 1;
        let dynamic = elf
            .dynamic
            .clone()
            .and_then(|r| data.get(r.start as usize..r.end.min(data.len() as u64) as usize))
            .unwrap_or(&data);
        if let Ok(info) = elf.dynamic_info(dynamic) {
            assert!(info.needed.len() <= zest_format::elf::MAX_NEEDED);
            let strtab = info.strtab.and_then(|v| elf.file_offset(v)).unwrap_or(0);
            for off in &info.needed {
                if let Some(name) = strtab.checked_add(*off).and_then(|at| string_at(&data, at)) {
                    assert!(!name.is_empty() && name.len() <= zest_format::elf::MAX_NAME_LEN);
                }
            }
        }
    }
    eprintln!("parsed {parsed} of {rounds} mutated ELF heads");
    assert!(parsed > 0, "no mutation kept a parseable header");
}

#[test]
fn mutated_python_modules_never_panic_and_name_only_modules() {
    use zest_format::python::{imported_names, ImportContext, ModuleFile, MAX_NAMES};
    // A module CPython 3.11 compiled (its code decoded for imports), and the
    // identifier scan's shape (a magic no decoder knows, short strings).
    let compiled = include_bytes!("../crates/format/testdata/imports.cpython-311.pyc").to_vec();
    let mut pyc = vec![
        0x0d, 0x0e, 0x0d, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xe3,
    ];
    for name in ["os", "json.decoder", "_ssl", "helper", "__name__"] {
        pyc.extend([b'z' | 0x80, name.len() as u8]);
        pyc.extend(name.as_bytes());
        pyc.extend([b')', 2, b'r', 1, 0, 0, 0]);
    }
    let source =
        b"import os, sys as s\nfrom . import helper\nfrom json import (decoder,\n  encoder)\n"
            .to_vec();
    let context =
        ImportContext::of("/usr/lib/python3.11/pkg/__pycache__/m.cpython-311.pyc").unwrap();
    let mut rng = Rng(0x5eed_0070_7963_0001);
    let mut named = 0usize;
    for round in 0..20_000 {
        let (kind, seed) = match round % 3 {
            0 => (ModuleFile::Compiled, &compiled),
            1 => (ModuleFile::Compiled, &pyc),
            _ => (ModuleFile::Source, &source),
        };
        let mut data = seed.clone();
        mutate(&mut rng, &mut data);
        let names: Vec<String> = imported_names(kind, &data)
            .into_iter()
            .map(|i| i.name)
            .collect();
        assert!(names.len() <= MAX_NAMES);
        named += names.len();
        for name in &names {
            assert!(
                name.split('.').all(|p| !p.is_empty() && !p.contains('/')),
                "{name}"
            );
            for base in context.bases(name) {
                for group in context.files_under(base, name) {
                    assert!(group.iter().all(|p| p.starts_with(base.as_str())));
                }
            }
        }
    }
    assert!(named > 0, "no mutation kept a name");
}

#[test]
fn mutated_c_sources_never_panic_and_name_only_paths_inside_the_image() {
    use zest_format::c_include::{includes, join, MAX_INCLUDES, MAX_NAME_LEN};
    let seed = b"#include <stdio.h>\n  # include \"../lib/util.h\"\n#include_next <limits.h>\n\
                 #if defined(X)\n#import <bits/types.h>\n#endif\n#include MACRO\n"
        .to_vec();
    let mut rng = Rng(0x5eed_0063_696e_0001);
    let mut named = 0usize;
    for _ in 0..20_000 {
        let mut data = seed.clone();
        mutate(&mut rng, &mut data);
        let found = includes(&data);
        assert!(found.len() <= MAX_INCLUDES);
        named += found.len();
        for include in &found {
            let name = &include.name;
            assert!(!name.is_empty() && name.len() <= MAX_NAME_LEN && !name.starts_with('/'));
            for dir in ["usr/include", "app/src", ""] {
                let Some(path) = join(dir, name) else {
                    continue;
                };
                assert!(!path.starts_with('/'), "{path}");
                assert!(
                    path.split('/')
                        .all(|c| !c.is_empty() && c != "." && c != ".."),
                    "{path}"
                );
                if !name.split('/').any(|c| c == "..") {
                    assert!(path.starts_with(dir), "{path} under {dir}");
                }
            }
        }
    }
    assert!(named > 0, "no mutation kept a directive");
}
