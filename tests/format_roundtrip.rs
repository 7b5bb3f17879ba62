//! End-to-end tests of the zstd:chunked format: tars built in code with every
//! entry type go through the writer and come back out through a plain zstd
//! decoder, the footer/annotations, the TOC model, chunk reads and tar-split;
//! and a real skopeo-written (old generation) blob is read and checked against
//! its own tar.

mod support;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::Command;

use zest_format::{
    parse_footer, tarsplit, write_chunked, ChunkDecoder, EntryId, EntryKind, FormatError,
    Generation, LayerIndex, TocLocation, WriteOptions, FOOTER_FETCH_LEN,
};
use zest_oci::digest::Digest;

/// Deterministic pseudo-random bytes.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn text(len: usize) -> Vec<u8> {
    let words = [
        "alpha ", "beta ", "gamma\n", "delta ", "epsilon ", "zeta\n", "eta ", "theta ",
    ];
    let mut out = Vec::with_capacity(len);
    let mut i = 0usize;
    while out.len() < len {
        out.extend_from_slice(words[(i * 7 + i / 3) % words.len()].as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// A tar exercising every entry type and header extension the writer meets.
fn sample_tar() -> Vec<u8> {
    use tar::EntryType as T;
    let mut b = tar::Builder::new(Vec::new());
    let dir = |b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32| {
        let mut h = header(T::Directory, mode, 0);
        b.append_data(&mut h, path, &[][..]).unwrap();
    };
    let file = |b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, data: &[u8]| {
        let mut h = header(T::Regular, mode, data.len() as u64);
        b.append_data(&mut h, path, data).unwrap();
    };
    // The root written the way many layer tools do.
    {
        let mut h = header(T::Directory, 0o755, 0);
        h.as_mut_bytes()[..2].copy_from_slice(b"./");
        h.set_cksum();
        b.append(&h, &[][..]).unwrap();
    }
    dir(&mut b, "etc/", 0o755);
    file(&mut b, "etc/empty", 0o644, b"");
    file(
        &mut b,
        "etc/hosts",
        0o644,
        b"127.0.0.1 localhost\n::1 localhost\n",
    );
    dir(&mut b, "usr/", 0o755);
    dir(&mut b, "usr/bin", 0o2755);
    file(&mut b, "usr/bin/su", 0o4755, &noise(1, 30_000));
    // Large multi-chunk file: text, binary and zero runs, ending in zeros.
    let mut big = text(700_000);
    big.extend(noise(2, 900_000));
    big.extend(vec![0u8; 20_000]);
    big.extend(text(300_000));
    big.extend(vec![0u8; 700]); // a short run stays data
    big.extend(noise(3, 100_000));
    big.extend(vec![0u8; 5000]);
    {
        let mut h = header(T::Regular, 0o755, big.len() as u64);
        h.set_uid(1000);
        h.set_gid(1001);
        h.set_username("alice").unwrap();
        h.set_groupname("staff").unwrap();
        b.append_data(&mut h, "usr/lib/big.bin", &big[..]).unwrap();
    }
    file(&mut b, "var/zeros", 0o600, &vec![0u8; 300_000]);
    // Symlink, hard link, devices, fifo, sticky directory.
    {
        let mut h = header(T::Symlink, 0o777, 0);
        b.append_link(&mut h, "usr/bin/sh", "dash").unwrap();
        let mut h = header(T::Link, 0o644, 0);
        b.append_link(&mut h, "usr/bin/hosts2", "etc/hosts")
            .unwrap();
        let mut h = header(T::Char, 0o666, 0);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        b.append_data(&mut h, "dev/null", &[][..]).unwrap();
        let mut h = header(T::Block, 0o660, 0);
        h.set_device_major(8).unwrap();
        h.set_device_minor(1).unwrap();
        b.append_data(&mut h, "dev/sda1", &[][..]).unwrap();
        let mut h = header(T::Fifo, 0o644, 0);
        b.append_data(&mut h, "run/initctl", &[][..]).unwrap();
    }
    dir(&mut b, "tmp/", 0o1777);
    // Extended attributes and a sub-second mtime via PAX.
    b.append_pax_extensions([
        ("SCHILY.xattr.user.comment", &b"hello"[..]),
        (
            "SCHILY.xattr.security.capability",
            &[1u8, 0, 0, 2, 0, 0x20, 0, 0][..],
        ),
        ("mtime", &b"1700000001.123456789"[..]),
    ])
    .unwrap();
    file(&mut b, "usr/bin/ping", 0o755, &noise(4, 5000));
    // Long names: GNU long-name header, then a PAX path.
    let long_a = format!("usr/share/{}/a-very-long-file-name.txt", "d".repeat(120));
    {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(T::Regular);
        h.set_mode(0o644);
        h.set_mtime(1_600_000_000);
        h.set_uid(7);
        h.set_gid(8);
        let data = text(4000);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, &long_a, &data[..]).unwrap();
    }
    let long_b = format!("usr/share/{}/pax-named-file", "p".repeat(140));
    b.append_pax_extensions([("path", long_b.as_bytes())])
        .unwrap();
    {
        let data = text(100);
        let mut h = header(T::Regular, 0o640, data.len() as u64);
        h.set_path("placeholder").unwrap();
        h.set_cksum();
        b.append(&h, &data[..]).unwrap();
    }
    let long_target = format!("../{}", "t".repeat(150));
    {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(T::Symlink);
        h.set_mode(0o777);
        h.set_mtime(1_600_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(0);
        b.append_link(&mut h, "usr/bin/longlink", &long_target)
            .unwrap();
    }
    // Overlay whiteouts.
    file(&mut b, "etc/.wh.removed", 0o644, b"");
    dir(&mut b, "opt/", 0o755);
    file(&mut b, "opt/.wh..wh..opq", 0o644, b"");
    // A file whose parent is not listed.
    file(&mut b, "srv/www/index.html", 0o644, b"<html></html>\n");
    let mut tar = b.into_inner().unwrap();
    // Record padding after the end-of-archive marker, as GNU tar writes it.
    tar.extend(vec![0u8; 8192]);
    tar
}

fn convert(tar: &[u8], opts: &WriteOptions) -> (Vec<u8>, zest_format::WriteSummary) {
    let mut blob = Vec::new();
    let summary = write_chunked(tar, &mut blob, opts).unwrap();
    (blob, summary)
}

fn open_index(blob: &[u8], loc: &TocLocation) -> LayerIndex {
    let r = loc.toc_range();
    LayerIndex::decode(
        &blob[r.start as usize..r.end as usize],
        loc,
        blob.len() as u64,
    )
    .unwrap()
}

/// Reads a whole file through its chunks, each decompressed from its own extent.
fn read_file(blob: &[u8], idx: &LayerIndex, id: EntryId, dec: &mut ChunkDecoder) -> Vec<u8> {
    let mut out = Vec::new();
    for c in idx.entry(id).chunks() {
        let r = c.compressed_range();
        out.extend(
            dec.decode(c, &blob[r.start as usize..r.end as usize])
                .unwrap(),
        );
    }
    out
}

fn clean(p: &str) -> String {
    p.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

/// Checks that the index describes exactly the tar: every entry's metadata and
/// every file's bytes (read chunk by chunk from the blob).
fn check_against_tar(blob: &[u8], idx: &LayerIndex, tar_bytes: &[u8]) {
    let mut dec = ChunkDecoder::new().unwrap();
    let mut archive = tar::Archive::new(tar_bytes);
    let mut seen_names = 0usize;
    let mut reg_files = 0usize;
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = String::from_utf8(entry.path_bytes().to_vec()).unwrap();
        let path = clean(&path);
        let h = entry.header().clone();
        let mut mtime = h.mtime().unwrap() as i64;
        let mut xattrs = BTreeMap::new();
        if let Some(exts) = entry.pax_extensions().unwrap() {
            for e in exts {
                let e = e.unwrap();
                let k = e.key().unwrap().to_string();
                if let Some(x) = k.strip_prefix("SCHILY.xattr.") {
                    xattrs.insert(x.to_string(), e.value_bytes().to_vec());
                } else if k == "mtime" {
                    mtime = e
                        .value()
                        .unwrap()
                        .split('.')
                        .next()
                        .unwrap()
                        .parse()
                        .unwrap();
                }
            }
        }
        let base = path.rsplit('/').next().unwrap().to_string();
        let parent = path.rsplit_once('/').map(|p| p.0).unwrap_or("");
        if base == ".wh..wh..opq" {
            let dir = idx.entry(idx.resolve_path(parent).unwrap());
            assert!(dir.is_opaque_dir(), "{parent} should be opaque");
            continue;
        }
        if path.is_empty() {
            let root = idx.entry(idx.root());
            assert_eq!(root.mode(), h.mode().unwrap() & 0o7777);
            continue;
        }
        seen_names += 1;
        if let Some(hidden) = base.strip_prefix(".wh.") {
            let id = idx
                .lookup(idx.resolve_path(parent).unwrap(), hidden.as_bytes())
                .unwrap();
            let e = idx.entry(id);
            assert_eq!(e.kind(), EntryKind::Whiteout, "{path}");
            assert_eq!(e.rdev(), (0, 0));
            continue;
        }
        let id = idx
            .resolve_path(&path)
            .unwrap_or_else(|| panic!("{path} missing from the index"));
        let e = idx.entry(id);
        let kind = h.entry_type();
        if kind.is_hard_link() {
            let target = clean(std::str::from_utf8(&entry.link_name_bytes().unwrap()).unwrap());
            assert_eq!(
                idx.resolve_path(&target),
                Some(id),
                "hard link {path} must share the inode"
            );
            assert!(e.nlink() >= 2);
            continue;
        }
        let want = match kind {
            tar::EntryType::Directory => EntryKind::Dir,
            tar::EntryType::Regular | tar::EntryType::Continuous => EntryKind::Reg,
            tar::EntryType::Symlink => EntryKind::Symlink,
            tar::EntryType::Char => EntryKind::Char,
            tar::EntryType::Block => EntryKind::Block,
            tar::EntryType::Fifo => EntryKind::Fifo,
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(e.kind(), want, "{path}");
        assert_eq!(e.mode(), h.mode().unwrap() & 0o7777, "{path} mode");
        assert_eq!(u64::from(e.uid()), h.uid().unwrap(), "{path} uid");
        assert_eq!(u64::from(e.gid()), h.gid().unwrap(), "{path} gid");
        assert_eq!(e.mtime().secs, mtime, "{path} mtime");
        let got_x: BTreeMap<String, Vec<u8>> = e
            .xattrs()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect();
        assert_eq!(got_x, xattrs, "{path} xattrs");
        match want {
            EntryKind::Reg => {
                reg_files += 1;
                let mut data = Vec::new();
                entry.read_to_end(&mut data).unwrap();
                assert_eq!(e.size(), data.len() as u64, "{path} size");
                assert_eq!(read_file(blob, idx, id, &mut dec), data, "{path} content");
                if data.is_empty() {
                    assert_eq!(e.digest(), None);
                } else {
                    assert_eq!(e.digest(), Some(Digest::of(&data)), "{path} digest");
                }
            }
            EntryKind::Symlink => {
                let target = entry.link_name_bytes().unwrap().to_vec();
                assert_eq!(e.link_target(), Some(&target[..]), "{path}");
            }
            EntryKind::Char | EntryKind::Block => {
                let dev = (
                    h.device_major().unwrap().unwrap(),
                    h.device_minor().unwrap().unwrap(),
                );
                assert_eq!(e.rdev(), dev, "{path}");
            }
            _ => {}
        }
    }
    assert!(reg_files > 0);
    // Nothing in the index that the tar does not have (beyond synthesized parents).
    let mut names = 0usize;
    let mut stack = vec![idx.root()];
    while let Some(d) = stack.pop() {
        for c in idx.children(d) {
            let e = idx.entry(c.id);
            if !e.is_synthesized() {
                names += 1;
            }
            if e.kind() == EntryKind::Dir {
                stack.push(c.id);
            }
        }
    }
    assert_eq!(names, seen_names, "index names vs tar entries");
}

#[test]
fn writer_round_trips_every_entry_type() {
    let tar = sample_tar();
    let opts = WriteOptions {
        prioritized: vec!["etc/hosts".into(), "./usr/bin/su".into()],
        ..WriteOptions::default()
    };
    let (blob, s) = convert(&tar, &opts);

    // A plain zstd decoder yields the input tar, byte for byte.
    let plain = zstd::stream::decode_all(&blob[..]).unwrap();
    assert!(plain == tar, "decoded blob differs from the input tar");
    assert_eq!(s.diff_id, Digest::of(&tar));
    assert_eq!(s.blob_digest, Digest::of(&blob));
    assert_eq!(s.blob_size, blob.len() as u64);

    // The footer and the annotations agree.
    let tail = &blob[blob.len() - FOOTER_FETCH_LEN as usize..];
    let footer = parse_footer(tail, blob.len() as u64).unwrap();
    assert_eq!(footer.generation, Generation::New);
    assert_eq!(footer.toc, s.toc);
    assert_eq!(footer.tar_split, Some(s.tar_split));
    let loc = TocLocation::from_annotations(&s.annotations)
        .unwrap()
        .unwrap();
    assert_eq!(loc.toc, s.toc);
    assert_eq!(loc.tar_split, Some(s.tar_split));
    assert_eq!(loc.toc_digest, Some(s.toc_digest));

    // The model matches the tar, file bytes included.
    let idx = open_index(&blob, &loc);
    assert_eq!(idx.toc_digest(), s.toc_digest);
    assert_eq!(idx.tar_split_digest(), Some(s.tar_split_digest));
    check_against_tar(&blob, &idx, &tar);
    // The footer path gives the same model.
    let idx2 = open_index(&blob, &footer.location());
    assert_eq!(idx2.len(), idx.len());

    // Specific expectations.
    let big = idx.entry(idx.resolve_path("usr/lib/big.bin").unwrap());
    assert!(big.chunks().len() > 10, "{} chunks", big.chunks().len());
    assert!(big.chunks().iter().any(|c| c.zeros && c.len == 20_000));
    assert!(big.chunks().last().unwrap().zeros);
    assert!(!big.chunks().iter().any(|c| c.zeros && c.len == 700));
    assert!(big.chunks().iter().all(|c| c.len <= 256 << 10));
    let zeros = idx.entry(idx.resolve_path("var/zeros").unwrap());
    assert_eq!(zeros.chunks().len(), 1);
    let hosts = idx.resolve_path("etc/hosts").unwrap();
    assert_eq!(idx.resolve_path("usr/bin/hosts2"), Some(hosts));
    assert_eq!(idx.entry(hosts).nlink(), 2);
    assert!(idx.entry(idx.resolve_path("srv").unwrap()).is_synthesized());
    assert_eq!(idx.entry(idx.resolve_path("tmp").unwrap()).mode(), 0o1777);
    let ping = idx.entry(idx.resolve_path("usr/bin/ping").unwrap());
    assert_eq!(ping.mtime().nanos, 123_456_789);
    assert_eq!(ping.xattr(b"user.comment"), Some(&b"hello"[..]));

    // Prefetch: ends where the last prioritized file's data ends.
    let su = idx.entry(idx.resolve_path("usr/bin/su").unwrap());
    let su_end = su.chunks().last().unwrap().compressed_range().end;
    assert_eq!(s.prefetch_end, Some(su_end));
    assert_eq!(idx.prefetch_extent(), Some(0..su_end));

    // Blob order is offset order and covers all data files.
    let offsets: Vec<u64> = idx
        .files_in_blob_order()
        .map(|f| idx.entry(f).chunks()[0].compressed_offset)
        .collect();
    assert!(offsets.windows(2).all(|w| w[0] < w[1]));

    // Adjacent chunks fetched with one range decode to the same bytes.
    let chunks = &big.chunks()[2..6];
    let range = zest_format::covering_range(chunks).unwrap();
    let mut dec = ChunkDecoder::new().unwrap();
    let run = dec
        .decode_run(
            chunks,
            &blob[range.start as usize..range.end as usize],
            range.start,
        )
        .unwrap();
    for (c, bytes) in chunks.iter().zip(&run) {
        assert_eq!(bytes.len() as u64, c.len);
        assert_eq!(Digest::of(bytes), c.digest);
    }

    // tar-split plus file contents rebuild the identical tar.
    let ts = s.tar_split;
    let ts_lines = tarsplit::decompress(
        &blob[ts.offset as usize..(ts.offset + ts.compressed_len) as usize],
        &ts,
    )
    .unwrap();
    assert_eq!(
        Digest::of(&blob[ts.offset as usize..(ts.offset + ts.compressed_len) as usize]),
        s.tar_split_digest
    );
    let mut rebuilt = Vec::new();
    tarsplit::reassemble(
        &ts_lines,
        |name, _size, w| {
            let name = std::str::from_utf8(name).unwrap();
            let id = idx.resolve_path(name).unwrap();
            w.write_all(&read_file(&blob, &idx, id, &mut dec)).unwrap();
            Ok(())
        },
        &mut rebuilt,
    )
    .unwrap();
    assert!(
        rebuilt == tar,
        "tar-split reassembly differs from the input tar"
    );
    // Lines have the field names tar-split's Go decoder expects.
    let first = std::str::from_utf8(ts_lines.split(|&b| b == b'\n').next().unwrap()).unwrap();
    assert!(
        first.starts_with("{\"type\":2,\"payload\":\"") && first.ends_with(",\"position\":0}"),
        "{first}"
    );
}

#[test]
fn every_chunk_starts_a_frame_at_its_offset() {
    let tar = sample_tar();
    let (blob, s) = convert(&tar, &WriteOptions::default());
    let loc = TocLocation::from_annotations(&s.annotations)
        .unwrap()
        .unwrap();
    let idx = open_index(&blob, &loc);
    for c in idx.all_chunks() {
        let r = c.compressed_range();
        assert_eq!(
            &blob[r.start as usize..r.start as usize + 4],
            &[0x28, 0xb5, 0x2f, 0xfd]
        );
        // The extent is whole frames: a one-shot decode gives exactly the chunk.
        let d = zstd::stream::decode_all(&blob[r.start as usize..r.end as usize]).unwrap();
        assert_eq!(d.len() as u64, c.len);
    }
}

#[test]
fn zstd_cli_decodes_the_blob() {
    if !support::require_tool("zstd") {
        return;
    }
    let tar = sample_tar();
    let (blob, _) = convert(&tar, &WriteOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("layer.tar.zst");
    std::fs::write(&p, &blob).unwrap();
    let out = Command::new("zstd")
        .args(["-d", "-c", "-q"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout == tar,
        "zstd -d output differs from the input tar"
    );
}

#[test]
fn writer_options_and_levels() {
    let tar = sample_tar();
    for opts in [
        WriteOptions {
            level: 1,
            min_chunk: 4096,
            avg_chunk: 16384,
            max_chunk: 65536,
            ..WriteOptions::default()
        },
        WriteOptions {
            level: 9,
            zero_run_min: 4096,
            ..WriteOptions::default()
        },
    ] {
        let (blob, s) = convert(&tar, &opts);
        assert_eq!(zstd::stream::decode_all(&blob[..]).unwrap(), tar);
        let idx = open_index(
            &blob,
            &TocLocation::from_annotations(&s.annotations)
                .unwrap()
                .unwrap(),
        );
        check_against_tar(&blob, &idx, &tar);
    }
    let bad = WriteOptions {
        min_chunk: 1 << 20,
        avg_chunk: 1 << 10,
        ..WriteOptions::default()
    };
    assert!(matches!(
        write_chunked(&tar[..], Vec::new(), &bad),
        Err(FormatError::InvalidOptions { .. })
    ));
}

#[test]
fn writer_rejects_unrepresentable_tars() {
    use tar::EntryType as T;
    let one = |path: &str| {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = header(T::Regular, 0o644, 1);
        h.as_mut_bytes()[..100].fill(0);
        h.as_mut_bytes()[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        b.append(&h, &b"x"[..]).unwrap();
        b.into_inner().unwrap()
    };
    for path in ["../escape", "/abs/path", "a/../../b", ".", "./"] {
        let r = write_chunked(&one(path)[..], Vec::new(), &WriteOptions::default());
        assert!(
            matches!(r, Err(FormatError::InvalidTar { .. })),
            "{path}: {r:?}"
        );
    }
    // Duplicate paths.
    let mut b = tar::Builder::new(Vec::new());
    for p in ["a", "./a"] {
        let mut h = header(T::Regular, 0o644, 0);
        b.append_data(&mut h, p, &[][..]).unwrap();
    }
    let dup = b.into_inner().unwrap();
    assert!(matches!(
        write_chunked(&dup[..], Vec::new(), &WriteOptions::default()),
        Err(FormatError::InvalidTar { .. })
    ));
    // Truncated content, bad checksum, garbage.
    let t = one("file");
    assert!(write_chunked(&t[..512 + 1][..512], Vec::new(), &WriteOptions::default()).is_err());
    // Content cut short: header says 200 KiB, 50 KiB follow (found by fuzzing:
    // this used to loop forever waiting for data that never came).
    let mut b = tar::Builder::new(Vec::new());
    let big = noise(5, 200 << 10);
    let mut h = header(T::Regular, 0o644, big.len() as u64);
    b.append_data(&mut h, "big", &big[..]).unwrap();
    let full = b.into_inner().unwrap();
    let r = write_chunked(
        &full[..512 + (50 << 10)],
        Vec::new(),
        &WriteOptions::default(),
    );
    assert!(matches!(r, Err(FormatError::InvalidTar { .. })), "{r:?}");
    let mut corrupt = t.clone();
    corrupt[0] ^= 1;
    assert!(matches!(
        write_chunked(&corrupt[..], Vec::new(), &WriteOptions::default()),
        Err(FormatError::InvalidTar { .. })
    ));
    assert!(write_chunked(&[0x41u8; 700][..], Vec::new(), &WriteOptions::default()).is_err());
    // An empty input is an empty (but valid) layer.
    let (blob, s) = convert(&[], &WriteOptions::default());
    assert_eq!(s.diff_id, Digest::of(b""));
    let idx = open_index(
        &blob,
        &TocLocation::from_annotations(&s.annotations)
            .unwrap()
            .unwrap(),
    );
    assert_eq!(idx.len(), 1);
}

// ---- A real skopeo-written blob (old generation) ----

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

fn tools_present(tools: &[&str]) -> bool {
    tools.iter().all(|t| support::require_tool(t))
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn blob_path(layout: &Path, digest: &str) -> std::path::PathBuf {
    let (alg, hex) = digest.split_once(':').unwrap();
    layout.join("blobs").join(alg).join(hex)
}

#[test]
fn reads_a_real_skopeo_zstd_chunked_blob() {
    if !tools_present(&["skopeo", "umoci"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    let bundle = dir.path().join("bundle");
    let src_ref = format!("{}:test", src.display());
    run(Command::new("umoci").args(["init", "--layout"]).arg(&src)).unwrap();
    run(Command::new("umoci").args(["new", "--image", &src_ref])).unwrap();
    run(Command::new("umoci")
        .args(["unpack", "--rootless", "--image", &src_ref])
        .arg(&bundle))
    .unwrap();
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(rootfs.join("usr/bin")).unwrap();
    std::fs::create_dir_all(rootfs.join("etc/deep/er")).unwrap();
    std::fs::write(rootfs.join("etc/hosts"), b"127.0.0.1 localhost\n").unwrap();
    std::fs::write(rootfs.join("etc/empty"), b"").unwrap();
    std::fs::write(rootfs.join("etc/deep/er/text.txt"), text(400_000)).unwrap();
    let mut big = noise(9, 600_000);
    big.extend(vec![0u8; 50_000]);
    big.extend(noise(10, 200_000));
    std::fs::write(rootfs.join("usr/bin/tool"), &big).unwrap();
    std::os::unix::fs::symlink("tool", rootfs.join("usr/bin/tool-link")).unwrap();
    std::fs::hard_link(rootfs.join("etc/hosts"), rootfs.join("etc/hosts.hard")).unwrap();
    run(Command::new("umoci")
        .args(["repack", "--image", &src_ref])
        .arg(&bundle))
    .unwrap();

    // Without this, skopeo may reuse a previously recorded blob instead of compressing.
    let _ = std::fs::remove_file("/var/lib/containers/cache/blob-info-cache-v1.boltdb");
    run(Command::new("skopeo").args([
        "copy",
        "--dest-compress",
        "--dest-compress-format",
        "zstd:chunked",
        &format!("oci:{src_ref}"),
        &format!("oci:{}:test", dst.display()),
    ]))
    .unwrap();

    let index = read_json(&dst.join("index.json"));
    let manifest = read_json(&blob_path(
        &dst,
        index["manifests"][0]["digest"].as_str().unwrap(),
    ));
    let layers = manifest["layers"].as_array().unwrap();
    let layer = layers.last().unwrap();
    let annotations: BTreeMap<String, String> = layer["annotations"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    let blob = std::fs::read(blob_path(&dst, layer["digest"].as_str().unwrap())).unwrap();
    assert_eq!(
        Digest::of(&blob).to_string(),
        layer["digest"].as_str().unwrap()
    );

    let loc = TocLocation::from_annotations(&annotations)
        .unwrap()
        .expect("skopeo wrote no zstd:chunked annotations");
    let footer = parse_footer(&blob[blob.len() - 64..], blob.len() as u64).unwrap();
    assert_eq!(footer.toc, loc.toc);
    assert_eq!(footer.generation, loc.generation);
    eprintln!(
        "skopeo blob: generation {:?}, TOC at {:?}",
        loc.generation, loc.toc
    );
    let idx = open_index(&blob, &loc);
    let tar = zstd::stream::decode_all(&blob[..]).unwrap();
    check_against_tar(&blob, &idx, &tar);
    let tool = idx.entry(idx.resolve_path("usr/bin/tool").unwrap());
    assert!(
        tool.chunks().len() > 1,
        "skopeo should have chunked the big file"
    );
    assert_eq!(
        idx.resolve_path("etc/hosts.hard"),
        idx.resolve_path("etc/hosts"),
        "hard link shares the inode"
    );
}
