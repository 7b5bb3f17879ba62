//! The warm path of the lazy layer filesystem, printed as a table: what a
//! container start pays for files whose bytes are all local already.
//!
//! A layer of 2,000 small files (200 B to 12 KiB, in 50 directories) is converted
//! to zstd:chunked from a local blob file (no registry: the warm path never
//! touches one) and mounted through FUSE; a first pass reads every file, so every
//! chunk is in the memory tier and every page in the kernel's cache. Each sample
//! then stacks a fresh writable overlay on the layer, as containerd does for each
//! container, and opens, reads whole and closes every file and lists every
//! directory. The same is done with an overlay over a local copy of the tree.
//!
//! Run as root: `cargo bench --bench warmfs` (needs /dev/fuse and GNU tar;
//! prints a notice and exits otherwise). `ZEST_BENCH_SAMPLES` sets the samples
//! per row (default 9).
//!
//! Layer mounts compared: the defaults (the kernel is told the layer has no
//! OPEN, so it opens files itself), every OPEN answered (as before that), and
//! passthrough of every file. FUSE requests per sample are counted by the
//! layer's own counters; the kernel's `fuse:fuse_request_send` tracepoint gives
//! the same figures for any build (`perf record -e fuse:fuse_request_send -a`).

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use zest_cache::{CacheConfig, ChunkCache};
use zest_fetch::toc::{open_layer, TocFetchOptions};
use zest_fetch::{FetchConfig, FetchLimits, Fetcher};
use zest_format::{write_chunked, WriteOptions};
use zest_fs::{LayerFsOptions, LayerMount, MountOptions, PassthroughStore};
use zest_store::{BlobSource, FileBlob};

const DIRS: usize = 50;
const FILES_PER_DIR: usize = 40;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn row(name: &str, value: String) {
    println!("{name:<64} {value}");
}

/// The tree: `d{nn}/f{nnn}.py`, sizes spread over 200 B to 12 KiB.
fn build_tree(root: &Path) -> usize {
    let mut bytes = 0;
    for d in 0..DIRS {
        let dir = root.join(format!("d{d:02}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        for f in 0..FILES_PER_DIR {
            let len = 200 + (d * 7919 + f * 104_729) % 12_000;
            let line = format!("# module {d}/{f}\n");
            let data: Vec<u8> = line.bytes().cycle().take(len).collect();
            std::fs::write(dir.join(format!("f{f:03}.py")), &data).expect("write");
            bytes += len;
        }
    }
    bytes
}

/// Opens, reads and closes every file, listing each directory first; returns
/// the bytes read.
fn workload(root: &Path) -> usize {
    let mut buf = Vec::with_capacity(16 << 10);
    let mut total = 0;
    for d in 0..DIRS {
        let dir = root.join(format!("d{d:02}"));
        let listed = std::fs::read_dir(&dir).expect("list").count();
        assert_eq!(listed, FILES_PER_DIR);
        for f in 0..FILES_PER_DIR {
            buf.clear();
            let mut file = std::fs::File::open(dir.join(format!("f{f:03}.py"))).expect("open");
            total += file.read_to_end(&mut buf).expect("read");
        }
    }
    total
}

/// A fresh writable overlay over `lower` (as containerd stacks a container's
/// root filesystem), the workload timed on it, and the overlay unmounted.
fn timed_on_overlay(lower: &Path, scratch: &Path, want: usize) -> Duration {
    let _ = std::fs::remove_dir_all(scratch);
    let (upper, work, target) = (
        scratch.join("upper"),
        scratch.join("work"),
        scratch.join("rootfs"),
    );
    for d in [&upper, &work, &target] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    let stack = zest_mount::Overlay {
        lower: vec![lower],
        upper: Some((&upper, &work)),
    };
    zest_mount::overlay(&target, &stack).expect("overlay");
    let t = Instant::now();
    let n = workload(&target);
    let took = t.elapsed();
    zest_mount::umount(&target).expect("unmount overlay");
    assert_eq!(n, want);
    took
}

fn samples() -> usize {
    std::env::var("ZEST_BENCH_SAMPLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(9)
}

fn per_file(d: Duration) -> String {
    let files = (DIRS * FILES_PER_DIR) as f64;
    format!(
        "{:>8.2} ms ({:>5.1} us/file)",
        d.as_secs_f64() * 1e3,
        d.as_secs_f64() * 1e6 / files
    )
}

fn main() {
    if !support::require_root_and_fuse() || !support::require_tool("tar") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("tree");
    let bytes = build_tree(&src);
    let tar = dir.path().join("tree.tar");
    let st = Command::new("tar")
        .args(["--numeric-owner", "--format=posix", "-cpf"])
        .arg(&tar)
        .arg("-C")
        .arg(&src)
        .arg(".")
        .status()
        .expect("tar");
    assert!(st.success());
    let blob_path = dir.path().join("tree.zst");
    let summary = write_chunked(
        std::io::BufReader::new(std::fs::File::open(&tar).expect("open tar")),
        std::io::BufWriter::new(std::fs::File::create(&blob_path).expect("create")),
        &WriteOptions::default(),
    )
    .expect("convert");
    let cache = Arc::new(
        ChunkCache::open(&CacheConfig {
            memory_bytes: 256 << 20,
            disk_bytes: 0,
            ..CacheConfig::default()
        })
        .expect("cache"),
    );
    let source: Arc<dyn BlobSource> = Arc::new(FileBlob::open(&blob_path).expect("blob"));
    let fetcher: Arc<Fetcher> = rt
        .block_on(open_layer(
            source,
            summary.blob_size,
            &summary.annotations,
            Arc::clone(&cache),
            FetchLimits::default(),
            FetchConfig::default(),
            &TocFetchOptions::default(),
        ))
        .expect("open layer");
    let n = samples();
    println!(
        "\nzest warm path: {} files of 200 B-12 KiB ({} KiB) in {DIRS} directories, \
         open + read + close each, list each directory, on a fresh writable overlay; \
         median of {n}\n",
        DIRS * FILES_PER_DIR,
        bytes / 1024
    );

    // Local copy: overlay over a directory of the same tree, pages cached.
    let scratch = dir.path().join("scratch");
    workload(&src);
    let local: Vec<Duration> = (0..n)
        .map(|_| timed_on_overlay(&src, &scratch, bytes))
        .collect();
    let local = median(local);
    row("overlay over a local copy", per_file(local));

    for (i, (name, options)) in modes(dir.path()).into_iter().enumerate() {
        let mnt = dir.path().join(format!("mnt-{i}"));
        std::fs::create_dir_all(&mnt).expect("mkdir");
        let m = LayerMount::mount(Arc::clone(&fetcher), &mnt, &options).expect("mount");
        // Warm-up: every chunk and page cached (and, with passthrough, every
        // file closed once while fully cached, so it is stored).
        timed_on_overlay(m.mountpoint(), &scratch, bytes);
        if let Some(store) = &options.fs.passthrough {
            if !m.fs().passthrough_active() {
                row(name, "n/a (the kernel refused FUSE passthrough)".into());
                continue;
            }
            let deadline = Instant::now() + Duration::from_secs(120);
            while store.len() < DIRS * FILES_PER_DIR {
                assert!(
                    Instant::now() < deadline,
                    "files not stored for passthrough"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let before = m.fs().stats();
        let times: Vec<Duration> = (0..n)
            .map(|_| timed_on_overlay(m.mountpoint(), &scratch, bytes))
            .collect();
        let after = m.fs().stats();
        let d = median(times);
        let (r0, r1) = (before.requests, after.requests);
        let per_sample = |a: u64, b: u64| (b - a) / n as u64;
        row(
            &format!("zest layer, {name}"),
            format!(
                "{} = {:.2}x local; per sample: {} OPEN ({} passthrough), {} FLUSH, \
                 {} RELEASE, {} OPENDIR, {} READ, {} LOOKUP",
                per_file(d),
                d.as_secs_f64() / local.as_secs_f64(),
                per_sample(r0.opens, r1.opens),
                per_sample(before.passthrough_opens, after.passthrough_opens),
                per_sample(r0.flushes, r1.flushes),
                per_sample(r0.releases, r1.releases),
                per_sample(r0.opendirs, r1.opendirs),
                per_sample(before.reads, after.reads),
                per_sample(r0.lookups, r1.lookups),
            ),
        );
        drop(m);
    }
    println!();
}

/// The layer mount settings compared.
fn modes(dir: &Path) -> Vec<(&'static str, MountOptions)> {
    let store_dir: PathBuf = dir.join("passthrough");
    let store = PassthroughStore::open(&store_dir, 1 << 30, 1).expect("passthrough store");
    vec![
        (
            "defaults (no OPEN: the kernel opens files itself)",
            MountOptions::default(),
        ),
        (
            "every OPEN answered, no passthrough",
            MountOptions {
                fs: LayerFsOptions {
                    skip_opens: false,
                    ..LayerFsOptions::default()
                },
                ..MountOptions::default()
            },
        ),
        (
            "passthrough of every file",
            MountOptions {
                fs: LayerFsOptions {
                    passthrough: Some(store),
                    ..LayerFsOptions::default()
                },
                ..MountOptions::default()
            },
        ),
    ]
}
