//! Format benchmarks: conversion throughput (tar in, single thread) on a
//! realistic synthetic layer, and TOC decoding of a 100k-entry layer, with the
//! resulting model's memory per entry printed.
//!
//! Run: `cargo bench --bench format -- --warm-up-time 1 --measurement-time 5`

use std::io::Write as _;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use zest_format::{write_chunked, Extent, Generation, LayerIndex, TocLocation, WriteOptions};
use zest_oci::digest::Digest;

/// CPU time of this thread: unlike wall time it is not inflated when other
/// processes compete for the cores, so it is printed next to criterion's numbers.
fn thread_cpu_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Deterministic xorshift stream.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Text-like content (source code, docs): words from a 4096-word random
/// vocabulary with a skewed frequency, indentation and punctuation; zstd -3
/// compresses it about 3x, like real source trees.
fn text(rng: &mut Rng, vocab: &[Vec<u8>], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    while out.len() < len {
        let r = rng.next();
        // Squaring a uniform variate skews towards frequent (low-index) words.
        let u = (r & 0xffff) as usize;
        out.extend_from_slice(&vocab[(u * u) >> 20]);
        out.push(match (r >> 16) % 16 {
            0 => b'\n',
            1 => b'(',
            2 => b'.',
            3 => b',',
            _ => b' ',
        });
        if (r >> 24).is_multiple_of(24) {
            out.extend(std::iter::repeat_n(b' ', 4 * ((r >> 32) % 4) as usize));
        }
    }
    out.truncate(len);
    out
}

/// Binary content like machine code: random literals, copies of recent bytes,
/// short zero runs and occasional alignment padding (about 1.7x with zstd -3).
fn binary(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8192);
    while out.len() < len {
        let r = rng.next();
        match r % 16 {
            0..=8 => out.extend_from_slice(&rng.next().to_le_bytes()[..1 + (r >> 8) as usize % 8]),
            9..=13 => {
                let back = 1 + (r >> 8) as usize % 4096;
                let n = 4 + (r >> 20) as usize % 28;
                if out.len() > back {
                    let start = out.len() - back;
                    for i in 0..n {
                        out.push(out[start + i % back]);
                    }
                }
            }
            14 => out.extend(std::iter::repeat_n(0u8, 1 + (r >> 8) as usize % 16)),
            _ => {
                if (r >> 8).is_multiple_of(64) {
                    out.extend(std::iter::repeat_n(0u8, 1024 + (r >> 16) as usize % 4096));
                }
            }
        }
    }
    out.truncate(len);
    out
}

/// About 64 MiB of tar: many small files, some medium, a few large.
fn synthetic_tar() -> Vec<u8> {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let vocab: Vec<Vec<u8>> = (0..4096)
        .map(|_| {
            let r = rng.next();
            (0..2 + r % 9)
                .map(|i| b'a' + ((r >> (8 + i * 5)) % 26) as u8)
                .collect()
        })
        .collect();
    let mut b = tar::Builder::new(Vec::with_capacity(70 << 20));
    let mut total = 0usize;
    let mut i = 0u64;
    while total < 64 << 20 {
        let r = rng.next();
        let size = match r % 100 {
            0..=74 => 100 + (r >> 8) as usize % 8_000,
            75..=96 => 8_000 + (r >> 8) as usize % 120_000,
            _ => 128_000 + (r >> 8) as usize % 4_000_000,
        };
        let data = if (r >> 40).is_multiple_of(2) {
            text(&mut rng, &vocab, size)
        } else {
            binary(&mut rng, size)
        };
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        b.append_data(&mut h, format!("usr/lib/pkg{}/file{i}", i % 97), &data[..])
            .unwrap();
        total += data.len() + 512;
        i += 1;
    }
    b.into_inner().unwrap()
}

fn bench_convert(c: &mut Criterion) {
    let tar = synthetic_tar();
    let opts = WriteOptions::default();
    let mut blob = Vec::new();
    let s = write_chunked(&tar[..], &mut blob, &opts).unwrap();
    println!(
        "synthetic tar: {} bytes, {} entries -> blob {} bytes ({:.2}x), {} chunks",
        tar.len(),
        s.entries,
        s.blob_size,
        tar.len() as f64 / s.blob_size as f64,
        s.chunks
    );
    let t0 = thread_cpu_secs();
    const RUNS: usize = 3;
    for _ in 0..RUNS {
        write_chunked(&tar[..], std::io::sink(), &opts).unwrap();
    }
    let cpu = (thread_cpu_secs() - t0) / RUNS as f64;
    println!(
        "convert: {:.1} ms CPU per run = {:.1} MiB/s of tar per core",
        cpu * 1e3,
        tar.len() as f64 / cpu / (1 << 20) as f64
    );
    let mut g = c.benchmark_group("convert");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(tar.len() as u64));
    g.bench_function("write_chunked_64MiB_level3", |bench| {
        bench.iter(|| write_chunked(&tar[..], std::io::sink(), &opts).unwrap())
    });
    g.finish();
}

/// A 100k-entry TOC shaped like a distribution image: nested directories,
/// files with digests and times, some multi-chunk files, symlinks.
fn synthetic_toc(n: usize) -> Vec<u8> {
    let mut rng = Rng(0xfeed_beef_0000_0001);
    let mut out = Vec::with_capacity(n * 300);
    out.extend_from_slice(b"{\"version\":1,\"entries\":[");
    let mut offset = 100u64;
    let mut written = 0usize;
    let mut dir = 0usize;
    while written < n {
        if written.is_multiple_of(40) {
            dir += 1;
            if written > 0 {
                out.push(b',');
            }
            write!(
                out,
                r#"{{"type":"dir","name":"usr/share/pkg{}/sub{}/","mode":493,"modtime":"2024-03-01T10:00:00Z"}}"#,
                dir / 10,
                dir
            )
            .unwrap();
            written += 1;
            continue;
        }
        out.push(b',');
        let r = rng.next();
        let name = format!("usr/share/pkg{}/sub{}/file-{written}.py", dir / 10, dir);
        if r.is_multiple_of(20) {
            write!(
                out,
                r#"{{"type":"symlink","name":"{name}","linkName":"../target","mode":511}}"#
            )
            .unwrap();
            written += 1;
            continue;
        }
        let chunks = if r % 50 == 1 { 4 } else { 1 };
        let size = 1000 + (r >> 16) % 60_000;
        let d = Digest::of(&r.to_le_bytes());
        let start = offset;
        if chunks == 1 {
            offset += 300 + size / 3;
            write!(
                out,
                r#"{{"type":"reg","name":"{name}","mode":420,"size":{size},"modtime":"2024-03-01T10:00:00Z","digest":"{d}","offset":{start},"endOffset":{offset}}}"#
            )
            .unwrap();
        } else {
            let cs = size / 4;
            let last = size - 3 * cs;
            let offs: Vec<u64> = (0..4).map(|i| start + i * 1000).collect();
            offset = start + 4000;
            write!(
                out,
                r#"{{"type":"reg","name":"{name}","mode":420,"size":{size},"modtime":"2024-03-01T10:00:00Z","digest":"{d}","offset":{},"endOffset":{offset},"chunkSize":{cs},"chunkDigest":"{d}"}}"#,
                offs[0]
            )
            .unwrap();
            for (i, o) in offs.iter().enumerate().skip(1) {
                let len = if i == 3 { last } else { cs };
                write!(
                    out,
                    r#",{{"type":"chunk","name":"{name}","offset":{o},"chunkSize":{len},"chunkOffset":{},"chunkDigest":"{d}"}}"#,
                    cs * i as u64
                )
                .unwrap();
            }
        }
        offset += 600;
        written += 1;
    }
    out.extend_from_slice(b"]}");
    out
}

fn bench_toc(c: &mut Criterion) {
    const N: usize = 100_000;
    let json = synthetic_toc(N);
    let z = zstd::bulk::compress(&json, 3).unwrap();
    let loc = TocLocation {
        generation: Generation::Old,
        toc: Extent {
            offset: 1 << 40,
            compressed_len: z.len() as u64,
            uncompressed_len: json.len() as u64,
        },
        tar_split: None,
        toc_digest: Some(Digest::of(&z)),
    };
    let blob_size = (1u64 << 40) + z.len() as u64 + 48;
    let idx = LayerIndex::decode(&z, &loc, blob_size).unwrap();
    println!(
        "TOC: {} entries in index, JSON {} bytes, compressed {} bytes; memory {} bytes = {:.1} bytes/entry",
        idx.len(),
        json.len(),
        z.len(),
        idx.memory_bytes(),
        idx.memory_bytes() as f64 / idx.len() as f64
    );
    let t0 = thread_cpu_secs();
    const RUNS: usize = 10;
    for _ in 0..RUNS {
        LayerIndex::decode(&z, &loc, blob_size).unwrap();
    }
    println!(
        "toc: {:.1} ms CPU per decode of {N} entries",
        (thread_cpu_secs() - t0) / RUNS as f64 * 1e3
    );
    let mut g = c.benchmark_group("toc");
    g.sample_size(10);
    g.bench_function("decode_100k_entries", |bench| {
        bench.iter_batched(
            || (),
            |_| LayerIndex::decode(&z, &loc, blob_size).unwrap(),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, bench_convert, bench_toc);
criterion_main!(benches);
