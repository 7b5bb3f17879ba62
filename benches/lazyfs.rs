//! Figures of the lazy layer filesystem, printed as a table:
//!
//! - mount time of a 10k-file layer from a registry on loopback (TOC fetch +
//!   index build + FUSE mount), and a full metadata walk of it;
//! - daemon memory per TOC entry (index heap, and process RSS growth);
//! - sequential read of a warm 256 MiB file (chunks in the memory tier, and in
//!   the disk tier only) against the same file on local disk;
//! - the same warm read with FUSE passthrough (the kernel reads a local copy
//!   of the fully cached file; the daemon sees no reads);
//! - random 4 KiB reads of the warm file against local disk;
//! - daemon memory per cached 64 KiB chunk in the memory tier (charged
//!   accounting and process RSS growth over 10k chunks);
//! - cold reads: latency of a small file and a 4 MiB file, with request counts.
//!
//! Run as root: `cargo bench --bench lazyfs` (needs /dev/fuse, GNU tar and
//! docker-registry; prints a notice and exits otherwise). `ZEST_BENCH_BIG_MIB`
//! sets the size of the big file (default 256). `ZEST_BENCH_FUSE_IO_URING=1`
//! mounts every layer with FUSE over io_uring (it turns the fuse module's
//! `enable_uring` on for the run and puts it back after) and reports how many
//! requests came through the rings.

#[path = "../tests/support/mod.rs"]
mod support;

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use zest_cache::{CacheConfig, ChunkCache};
use zest_fetch::toc::{open_layer, TocFetchOptions};
use zest_fetch::{FetchConfig, FetchLimits, Fetcher};
use zest_format::{write_chunked, WriteOptions};
use zest_fs::{LayerFsOptions, LayerMount, MountOptions, PassthroughStore};
use zest_oci::digest::Digest;
use zest_oci::{media_type, Descriptor, Repository};
use zest_store::{BlobSource, RegistryBlob};

use support::{pseudo_random, Auth, Registry, REGISTRY_BIN};

struct Bench {
    rt: tokio::runtime::Runtime,
    registry: Registry,
    dir: tempfile::TempDir,
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn drop_page_cache(p: &Path) {
    let f = std::fs::File::open(p).expect("open");
    // SAFETY: valid fd.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

impl Bench {
    fn path(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p).expect("mkdir");
        p
    }

    fn tar_of(&self, src: &Path, name: &str) -> PathBuf {
        let tar = self.dir.path().join(name);
        let st = Command::new("tar")
            .args(["--numeric-owner", "--format=posix", "-cpf"])
            .arg(&tar)
            .arg("-C")
            .arg(src)
            .arg(".")
            .status()
            .expect("tar");
        assert!(st.success());
        tar
    }

    fn push(&self, repo: &Repository, tar: &Path) -> Descriptor {
        let blob_path = tar.with_extension("zst");
        let out = std::io::BufWriter::new(std::fs::File::create(&blob_path).expect("create"));
        let summary = write_chunked(
            std::io::BufReader::new(std::fs::File::open(tar).expect("open tar")),
            out,
            &WriteOptions::default(),
        )
        .expect("convert");
        let client = self.registry.client();
        self.rt
            .block_on(client.push_blob(
                repo,
                &summary.blob_digest,
                zest_registry::UploadBody::File(blob_path),
                None,
            ))
            .expect("push");
        let mut d = Descriptor::new(
            media_type::OCI_LAYER_ZSTD,
            summary.blob_digest,
            summary.blob_size,
        );
        d.annotations = summary.annotations;
        d
    }

    fn open(&self, repo: &Repository, desc: &Descriptor, cache: &Arc<ChunkCache>) -> Arc<Fetcher> {
        let source: Arc<dyn BlobSource> = Arc::new(RegistryBlob::for_layer(
            self.registry.client(),
            repo.clone(),
            desc,
        ));
        self.rt
            .block_on(open_layer(
                source,
                desc.size,
                &desc.annotations,
                Arc::clone(cache),
                FetchLimits::default(),
                FetchConfig::default(),
                &TocFetchOptions::default(),
            ))
            .expect("open layer")
    }

    fn cache(&self, name: &str, memory: u64, disk: u64) -> Arc<ChunkCache> {
        Arc::new(
            ChunkCache::open(&CacheConfig {
                memory_bytes: memory,
                disk_bytes: disk,
                disk_root: self.path(name),
                ..CacheConfig::default()
            })
            .expect("cache"),
        )
    }
}

fn row(name: &str, value: String) {
    println!("{name:<58} {value}");
}

fn mib_per_s(bytes: u64, d: Duration) -> String {
    format!(
        "{:>9.1} MiB/s",
        bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
    )
}

fn seq_read(p: &Path) -> (u64, Duration) {
    drop_page_cache(p);
    let f = std::fs::File::open(p).expect("open");
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    let t = Instant::now();
    loop {
        let n = f.read_at(&mut buf, total).expect("read");
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    (total, t.elapsed())
}

fn random_4k(p: &Path, size: u64, n: usize) -> Duration {
    drop_page_cache(p);
    let f = std::fs::File::open(p).expect("open");
    // SAFETY: valid fd; disables kernel readahead for a fair random-read figure.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    let mut buf = vec![0u8; 4096];
    let mut x = 0x1234_5678_9abc_def0u64;
    let blocks = size / 4096;
    let t = Instant::now();
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % blocks) * 4096;
        f.read_exact_at(&mut buf, off).expect("pread");
    }
    t.elapsed() / n as u32
}

/// Warm sequential read of the big file through a second mount with FUSE
/// Mount options of every mount of the run: `/dev/fuse`, or io_uring when
/// `ZEST_BENCH_FUSE_IO_URING=1`.
fn mount_options() -> MountOptions {
    MountOptions {
        io_uring: std::env::var("ZEST_BENCH_FUSE_IO_URING").as_deref() == Ok("1"),
        ..MountOptions::default()
    }
}

/// The fuse module's `enable_uring`, turned on for an io_uring run and put back
/// as it was on drop.
struct EnableUring(Option<String>);

impl EnableUring {
    const PATH: &'static str = "/sys/module/fuse/parameters/enable_uring";

    fn for_run() -> EnableUring {
        if !mount_options().io_uring {
            return EnableUring(None);
        }
        let before = std::fs::read_to_string(Self::PATH)
            .expect("this kernel has no FUSE over io_uring (6.14+ with CONFIG_FUSE_IO_URING)");
        std::fs::write(Self::PATH, "Y").expect("turn enable_uring on");
        EnableUring(Some(before.trim().to_string()))
    }
}

impl Drop for EnableUring {
    fn drop(&mut self) {
        if let Some(before) = &self.0 {
            let _ = std::fs::write(Self::PATH, before);
        }
    }
}

/// passthrough: once the file is fully cached and its handles are closed, it is
/// copied to the passthrough store and later opens hand the kernel that copy.
fn passthrough_read(bench: &Bench, fetcher: &Arc<Fetcher>, big_mib: usize, big_len: u64) {
    let name = format!("{big_mib} MiB file: warm sequential read with passthrough");
    let store = PassthroughStore::open(&bench.dir.path().join("passthrough"), big_len * 2, 1)
        .expect("passthrough store");
    let options = MountOptions {
        fs: LayerFsOptions {
            passthrough: Some(Arc::clone(&store)),
            ..LayerFsOptions::default()
        },
        ..mount_options()
    };
    let m = LayerMount::mount(Arc::clone(fetcher), &bench.path("mnt-big-pt"), &options)
        .expect("mount with passthrough");
    if !m.fs().passthrough_active() {
        row(&name, "n/a (the kernel refused FUSE passthrough)".into());
        return;
    }
    let p = m.mountpoint().join("big.bin");
    // The first read is served by the daemon (from the warm memory tier); closing
    // the fully cached file stores it for passthrough.
    let (n, _) = seq_read(&p);
    assert_eq!(n, big_len);
    let ready = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    ready("the file to be stored", &|| store.len() == 1);
    ready("the handles to be released", &|| {
        m.fs().stats().open_files == 0
    });
    let before = m.fs().stats();
    let mut times = Vec::new();
    let mut cold_times = Vec::new();
    for _ in 0..3 {
        let (n, d) = seq_read(&p);
        assert_eq!(n, big_len);
        times.push(d);
        // Again with the local copy's pages dropped too, as for the local-disk row.
        for e in std::fs::read_dir(bench.dir.path().join("passthrough")).expect("store dir") {
            let e = e.expect("store entry");
            if e.file_type().expect("file type").is_file() {
                drop_page_cache(&e.path());
            }
        }
        let (n, d) = seq_read(&p);
        assert_eq!(n, big_len);
        cold_times.push(d);
    }
    let after = m.fs().stats();
    assert!(
        after.passthrough_opens >= before.passthrough_opens + 6,
        "passthrough was not used: {after:?}"
    );
    assert_eq!(
        after.reads, before.reads,
        "passthrough reads reached the daemon"
    );
    row(
        &format!("{name} (local copy in page cache)"),
        mib_per_s(big_len, median(times)),
    );
    row(
        &format!("{name} (page cache dropped)"),
        mib_per_s(big_len, median(cold_times)),
    );
}

/// Memory tier cost of 10k cached 64 KiB chunks: what the cache charges per
/// entry beyond the data, and what the process RSS actually grows by.
fn chunk_memory() {
    const CHUNKS: usize = 10_000;
    const CHUNK: usize = 64 << 10;
    let cache = ChunkCache::open(&CacheConfig {
        memory_bytes: 1 << 40,
        disk_bytes: 0,
        ..CacheConfig::default()
    })
    .expect("memory-only cache");
    let rss0 = rss_bytes();
    for i in 0..CHUNKS {
        // Non-zero filler so every page is really touched.
        let data = vec![(i % 251) as u8 + 1; CHUNK];
        cache.insert(Digest::of(&(i as u64).to_le_bytes()), Bytes::from(data));
    }
    let rss1 = rss_bytes();
    let s = cache.stats().memory;
    assert_eq!(s.entries, CHUNKS as u64);
    let charged = s.bytes as f64 / CHUNKS as f64 - CHUNK as f64;
    let measured = rss1.saturating_sub(rss0) as f64 / CHUNKS as f64 - CHUNK as f64;
    row(
        "memory per cached 64 KiB chunk beyond its data (10k chunks)",
        format!("{charged:>9.0} B charged, {measured:.0} B measured (RSS growth)"),
    );
    drop(cache);
    // Hands the freed heap back, so later RSS figures are not hidden by reuse.
    // SAFETY: malloc_trim only releases free memory.
    unsafe { libc::malloc_trim(0) };
}

fn main() {
    if !support::require_root_and_fuse() || !support::require_tool(REGISTRY_BIN) {
        return;
    }
    // `cargo bench` passes `--bench`; a filter argument is ignored.
    let _enable_uring = EnableUring::for_run();
    let bench = Bench {
        rt: tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime"),
        registry: Registry::start(Auth::None),
        dir: tempfile::tempdir().expect("tempdir"),
    };
    let repo = Repository::new(&bench.registry.host(), "bench/lazyfs").expect("repo");
    println!(
        "\nzest lazy layer filesystem, registry {} on loopback, FUSE requests through {}\n",
        bench.registry.host(),
        if mount_options().io_uring {
            "io_uring"
        } else {
            "/dev/fuse"
        }
    );

    // First, while the heap holds no freed memory to reuse, so RSS growth is real.
    chunk_memory();

    // ---- 10k-file layer: mount time, metadata walk, memory per entry.
    let src = bench.path("many");
    for d in 0..100 {
        for f in 0..100 {
            let p = src.join(format!("dir{d:03}/file{f:03}.txt"));
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(&p, format!("file {d}/{f}\n").repeat(1 + (d * f) % 50)).expect("write");
        }
    }
    let tar = bench.tar_of(&src, "many.tar");
    let desc = bench.push(&repo, &tar);
    let cache = bench.cache("cache-many", 64 << 20, 0);
    let mut mount_times = Vec::new();
    let mut open_times = Vec::new();
    let mut walk_times = Vec::new();
    let mut entries = 0;
    let mut index_bytes = 0;
    let mut toc_len = 0;
    for i in 0..7 {
        let rss0 = rss_bytes();
        let t = Instant::now();
        let fetcher = bench.open(&repo, &desc, &cache);
        let opened = t.elapsed();
        let rss1 = rss_bytes();
        let m = LayerMount::mount(
            Arc::clone(&fetcher),
            &bench.path(&format!("mnt-many-{i}")),
            &mount_options(),
        )
        .expect("mount");
        let total = t.elapsed();
        open_times.push(opened);
        mount_times.push(total);
        entries = fetcher.index().len();
        index_bytes = fetcher.index().memory_bytes();
        toc_len = fetcher.index().location().toc.compressed_len;
        if i == 0 {
            row(
                "RSS growth while loading the 10k-entry index",
                format!("{:>9} KiB", rss1.saturating_sub(rss0) / 1024),
            );
        }
        let t = Instant::now();
        let mut n = 0;
        let mut stack = vec![m.mountpoint().to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).expect("readdir") {
                let e = e.expect("entry");
                let md = std::fs::symlink_metadata(e.path()).expect("stat");
                n += 1;
                if md.is_dir() {
                    stack.push(e.path());
                }
            }
        }
        walk_times.push(t.elapsed());
        assert_eq!(n, 10_100);
        drop(m);
    }
    row("10k-file layer: entries in index", format!("{entries:>9}"));
    row(
        "10k-file layer: compressed TOC",
        format!("{:>9} KiB (blob {} KiB)", toc_len / 1024, desc.size / 1024),
    );
    row(
        "10k-file layer: TOC fetch + index build (median of 7)",
        format!("{:>9.2} ms", median(open_times).as_secs_f64() * 1e3),
    );
    row(
        "10k-file layer: ... + FUSE mount ready (median of 7)",
        format!("{:>9.2} ms", median(mount_times).as_secs_f64() * 1e3),
    );
    row(
        "10k-file layer: readdir + lstat of every entry, cold kernel",
        format!("{:>9.2} ms", median(walk_times).as_secs_f64() * 1e3),
    );
    row(
        "index memory per TOC entry",
        format!("{:>9.1} bytes", index_bytes as f64 / entries.max(1) as f64),
    );

    // ---- Big file: warm sequential and random reads vs local disk.
    let big_mib: usize = std::env::var("ZEST_BENCH_BIG_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let big_len = big_mib << 20;
    let src = bench.path("big");
    {
        // Sparse-ish: 3/4 incompressible data, 1/4 runs of zeros.
        let mut data = Vec::with_capacity(big_len);
        let mut seed = 1;
        while data.len() < big_len {
            data.extend(pseudo_random(3 << 20, seed));
            data.extend(std::iter::repeat_n(0u8, 1 << 20));
            seed += 1;
        }
        data.truncate(big_len);
        std::fs::write(src.join("big.bin"), &data).expect("write big");
        let local = bench.path("local").join("big.bin");
        std::fs::write(&local, &data).expect("write local copy");
        // Flushed, so dropping its page cache really drops it.
        std::fs::File::open(&local)
            .and_then(|f| f.sync_all())
            .expect("sync local copy");
    }
    let local = bench.dir.path().join("local/big.bin");
    let tar = bench.tar_of(&src, "big.tar");
    let t = Instant::now();
    let desc = bench.push(&repo, &tar);
    row(
        "big file: convert + push",
        format!("{:>9.2} s", t.elapsed().as_secs_f64()),
    );
    let cache = bench.cache("cache-big", 2 << 30, 2 << 30);
    let fetcher = bench.open(&repo, &desc, &cache);
    let mnt = bench.path("mnt-big");
    let m = LayerMount::mount(Arc::clone(&fetcher), &mnt, &mount_options()).expect("mount");
    let lazy = m.mountpoint().join("big.bin");

    let (n, d) = seq_read(&lazy);
    assert_eq!(n as usize, big_len);
    let s = fetcher.stats();
    row(
        &format!("{big_mib} MiB file: cold sequential read (registry)"),
        format!("{} ({} requests)", mib_per_s(n, d), s.range_requests),
    );
    cache.flush();
    // Chunks the disk write queue had no room for (it is bounded in bytes) are
    // fetched again in the disk-tier part below.
    let unwritten = cache.stats().writes.dropped_full;
    let mut warm = Vec::new();
    for _ in 0..3 {
        warm.push(seq_read(&lazy).1);
    }
    row(
        &format!("{big_mib} MiB file: warm sequential read (memory tier)"),
        mib_per_s(n, median(warm)),
    );
    let mut localt = Vec::new();
    for _ in 0..3 {
        localt.push(seq_read(&local).1);
    }
    row(
        &format!("{big_mib} MiB file: sequential read, local disk"),
        mib_per_s(n, median(localt)),
    );
    passthrough_read(&bench, &fetcher, big_mib, big_len as u64);
    let r_lazy = random_4k(&lazy, big_len as u64, 20_000);
    let r_local = random_4k(&local, big_len as u64, 20_000);
    row(
        "random 4 KiB reads, warm (memory tier)",
        format!(
            "{:>9.1} us/read ({:.0} IOPS)",
            r_lazy.as_secs_f64() * 1e6,
            1.0 / r_lazy.as_secs_f64()
        ),
    );
    row(
        "random 4 KiB reads, local disk (page cache dropped)",
        format!(
            "{:>9.1} us/read ({:.0} IOPS)",
            r_local.as_secs_f64() * 1e6,
            1.0 / r_local.as_secs_f64()
        ),
    );
    drop(m);
    drop(fetcher);
    drop(cache);

    // Disk tier only: a small memory tier forces verified disk reads.
    let cache = bench.cache("cache-big", 32 << 20, 2 << 30);
    let fetcher = bench.open(&repo, &desc, &cache);
    let m = LayerMount::mount(
        Arc::clone(&fetcher),
        &bench.path("mnt-big2"),
        &mount_options(),
    )
    .expect("mount");
    let lazy = m.mountpoint().join("big.bin");
    let mut warm = Vec::new();
    for _ in 0..3 {
        warm.push(seq_read(&lazy).1);
    }
    row(
        &format!("{big_mib} MiB file: warm sequential read (disk tier)"),
        mib_per_s(big_len as u64, median(warm)),
    );
    let r_disk = random_4k(&lazy, big_len as u64, 20_000);
    row(
        "random 4 KiB reads, warm (disk tier, 32 MiB memory tier)",
        format!(
            "{:>9.1} us/read ({:.0} IOPS)",
            r_disk.as_secs_f64() * 1e6,
            1.0 / r_disk.as_secs_f64()
        ),
    );
    if unwritten == 0 {
        assert_eq!(
            fetcher.stats().range_requests,
            0,
            "warm disk tier: no requests"
        );
    } else {
        row(
            "disk tier: chunks the write queue dropped in the cold read",
            format!(
                "{unwritten:>9} (fetched again: {} requests in the disk-tier reads)",
                fetcher.stats().range_requests
            ),
        );
    }
    drop(m);
    drop(fetcher);
    drop(cache);

    // ---- Cold reads against the registry.
    let src = bench.path("cold");
    for i in 0..64 {
        std::fs::write(
            src.join(format!("small{i:02}")),
            format!("small file {i}\n"),
        )
        .expect("write");
    }
    std::fs::write(src.join("four.bin"), pseudo_random(4 << 20, 99)).expect("write");
    let tar = bench.tar_of(&src, "cold.tar");
    let desc = bench.push(&repo, &tar);
    let cache = bench.cache("cache-cold", 256 << 20, 0);
    let fetcher = bench.open(&repo, &desc, &cache);
    let config = mount_options();
    let m =
        LayerMount::mount(Arc::clone(&fetcher), &bench.path("mnt-cold"), &config).expect("mount");
    // Read every 8th small file so read-ahead of one does not warm the next.
    let mut lat = Vec::new();
    for i in (0..64).step_by(8) {
        let t = Instant::now();
        let _ = std::fs::read(m.mountpoint().join(format!("small{i:02}"))).expect("read");
        lat.push(t.elapsed());
    }
    let s0 = fetcher.stats();
    row(
        "cold small-file read (one range request), median",
        format!(
            "{:>9.2} ms ({} requests for {} files)",
            median(lat).as_secs_f64() * 1e3,
            s0.range_requests,
            8
        ),
    );
    let t = Instant::now();
    let got = std::fs::read(m.mountpoint().join("four.bin")).expect("read");
    let d = t.elapsed();
    assert_eq!(got.len(), 4 << 20);
    let s1 = fetcher.stats();
    row(
        "cold 4 MiB file read",
        format!(
            "{:>9.2} ms ({} requests, {} blocking misses)",
            d.as_secs_f64() * 1e3,
            s1.range_requests - s0.range_requests,
            s1.blocking_misses - s0.blocking_misses
        ),
    );
    drop(m);
    if mount_options().io_uring {
        let (requests, _) = zest_fs::io_uring_totals();
        row(
            "FUSE requests received through io_uring (whole run)",
            format!("{requests:>9}"),
        );
        assert!(requests > 0, "io_uring asked for but not used");
    }
    println!();
}
