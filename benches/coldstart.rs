//! Cold start of an image layer nobody profiled, over an emulated link: how
//! many times the workload blocks on the network, how long its reads take and
//! how many bytes are fetched, with the fetcher's speculative batching of
//! misses off, set like the fetcher before it existed, and at its defaults.
//!
//! The layer looks like the start of a python program: an interpreter binary,
//! a multiarch library directory of which a few shared objects are loaded, the
//! standard library's package directories of which some modules are imported,
//! `lib-dynload` extension modules, and documentation nobody reads. Files are
//! read whole, one after the other, in an order unrelated to blob order (as a
//! dynamic loader and an import system do).
//!
//! Run as root: `cargo bench --bench coldstart` (needs /dev/fuse, GNU tar and
//! docker-registry; prints a notice and exits otherwise). `ZEST_BENCH_LINK`
//! picks the link profile (`lan`, `region` (default), `wan`);
//! `ZEST_BENCH_SAMPLES` the samples per setting (default 3).

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use zest_bench::link::{LinkConfig, LinkEmulator, LinkProfile};
use zest_cache::{CacheConfig, ChunkCache};
use zest_fetch::toc::{open_layer, TocFetchOptions};
use zest_fetch::{FetchConfig, FetchLimits, Fetcher};
use zest_format::{write_chunked, WriteOptions};
use zest_fs::{LayerMount, MountOptions};
use zest_oci::{media_type, Descriptor, Repository};
use zest_registry::{PlainHttp, RegistryClient};
use zest_store::{BlobSource, RegistryBlob};

use support::{test_client_config, Auth, Registry, REGISTRY_BIN};

/// Deterministic text-like bytes (compress about 3:1, like binaries and code).
fn content(len: usize, seed: u64) -> Vec<u8> {
    const WORDS: [&[u8]; 16] = [
        b"import ",
        b"return ",
        b"self.",
        b"def ",
        b"\x00\x00\x48\x8b",
        b"class ",
        b"if ",
        b"None",
        b"\xe8\x00\x00",
        b"__init__",
        b"value",
        b"(",
        b")",
        b"\n    ",
        b", ",
        b"=",
    ];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(3) {
            out.extend_from_slice(&x.to_le_bytes()[..3]);
        } else {
            out.extend_from_slice(WORDS[(x >> 40) as usize % WORDS.len()]);
        }
    }
    out.truncate(len);
    out
}

/// Writes the layer's files under `root`; returns the paths the workload reads,
/// in read order, and their total size.
fn make_layer(root: &Path) -> (Vec<String>, u64) {
    let mut seed = 1u64;
    let mut write = |rel: &str, len: usize| {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        seed += 1;
        std::fs::write(&p, content(len, seed)).expect("write");
    };
    let size = |i: usize, lo: usize, hi: usize| lo + (i * 7919) % (hi - lo);
    write("usr/bin/python3.11", 6 << 20);
    for i in 0..120 {
        write(
            &format!("usr/lib/x86_64-linux-gnu/lib{i:03}.so.1"),
            size(i, 8 << 10, 300 << 10),
        );
    }
    let packages = [
        "encodings",
        "json",
        "collections",
        "importlib",
        "email",
        "http",
        "xml",
        "asyncio",
        "logging",
        "unittest",
    ];
    for (p, pkg) in packages.iter().enumerate() {
        for i in 0..20 {
            write(
                &format!("usr/lib/python3.11/{pkg}/m{i:02}.py"),
                size(p * 20 + i, 2 << 10, 40 << 10),
            );
        }
    }
    for i in 0..60 {
        write(
            &format!("usr/lib/python3.11/lib-dynload/_ext{i:02}.cpython-311-x86_64-linux-gnu.so"),
            size(i, 20 << 10, 150 << 10),
        );
    }
    for i in 0..300 {
        write(
            &format!("usr/share/doc/pkg{i:03}/copyright"),
            size(i, 1 << 10, 20 << 10),
        );
    }
    // The workload: the interpreter, 25 libraries, 8 extension modules, and
    // 6 modules of each of the first 6 packages, in a scrambled order.
    let mut reads = vec!["usr/bin/python3.11".to_string()];
    for k in 0..25 {
        reads.push(format!(
            "usr/lib/x86_64-linux-gnu/lib{:03}.so.1",
            (k * 37) % 120
        ));
    }
    for (p, pkg) in packages.iter().enumerate().take(6) {
        for k in 0..6 {
            reads.push(format!(
                "usr/lib/python3.11/{pkg}/m{:02}.py",
                (k * 7 + p) % 20
            ));
        }
        reads.push(format!(
            "usr/lib/python3.11/lib-dynload/_ext{:02}.cpython-311-x86_64-linux-gnu.so",
            (p * 13) % 60
        ));
    }
    for k in 0..2 {
        reads.push(format!(
            "usr/lib/python3.11/lib-dynload/_ext{:02}.cpython-311-x86_64-linux-gnu.so",
            50 + k
        ));
    }
    let total = reads
        .iter()
        .map(|r| std::fs::metadata(root.join(r)).expect("stat").len())
        .sum();
    (reads, total)
}

fn tar_of(src: &Path, tar: &Path) {
    let st = Command::new("tar")
        .args(["--numeric-owner", "--format=posix", "--sort=name", "-cpf"])
        .arg(tar)
        .arg("-C")
        .arg(src)
        .arg(".")
        .status()
        .expect("tar");
    assert!(st.success(), "tar failed");
}

fn main() {
    if !support::require_root_and_fuse()
        || !support::require_tool(REGISTRY_BIN)
        || !support::require_tool("tar")
    {
        return;
    }
    let profile_name = std::env::var("ZEST_BENCH_LINK").unwrap_or_else(|_| "region".into());
    let profile: LinkProfile = profile_name
        .parse()
        .expect("ZEST_BENCH_LINK: lan, region or wan");
    let samples: usize = std::env::var("ZEST_BENCH_SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let registry = Registry::start(Auth::None);
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    let (reads, wanted) = make_layer(&src);
    let tar = dir.path().join("layer.tar");
    tar_of(&src, &tar);
    let blob = dir.path().join("layer.zst");
    let summary = write_chunked(
        std::io::BufReader::new(std::fs::File::open(&tar).expect("open tar")),
        std::io::BufWriter::new(std::fs::File::create(&blob).expect("create")),
        &WriteOptions::default(),
    )
    .expect("convert");
    let repo = Repository::new(&registry.host(), "bench/coldstart").expect("repo");
    rt.block_on(registry.client().push_blob(
        &repo,
        &summary.blob_digest,
        zest_registry::UploadBody::File(blob),
        None,
    ))
    .expect("push");
    let mut desc = Descriptor::new(
        media_type::OCI_LAYER_ZSTD,
        summary.blob_digest,
        summary.blob_size,
    );
    desc.annotations = summary.annotations;

    let link = rt
        .block_on(LinkEmulator::bind(LinkConfig::new(
            "127.0.0.1:0".parse().expect("addr"),
            registry.host(),
            profile,
        )))
        .expect("link");
    let link_host = link.local_addr().to_string();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let link_task = rt.spawn(link.run(async move {
        let _ = stop_rx.await;
    }));
    let client = RegistryClient::new(test_client_config(PlainHttp::Hosts(
        vec![link_host.clone()],
    )))
    .expect("client");
    let link_repo = Repository::new(&link_host, "bench/coldstart").expect("repo");

    println!(
        "\nzest cold start of an unprofiled layer over the {profile_name} link ({} files, {:.1} MiB read of a {:.1} MiB blob), {samples} samples, medians\n",
        reads.len(),
        wanted as f64 / (1 << 20) as f64,
        summary.blob_size as f64 / (1 << 20) as f64,
    );
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>10} {:>12}",
        "setting", "reads s", "blocking", "requests", "fetched MB", "spec used/MB"
    );
    let settings: [(&str, FetchConfig); 3] = [
        (
            "speculation off",
            FetchConfig {
                speculative_neighbour_bytes: 0,
                speculative_dir_bytes: 0,
                ..FetchConfig::default()
            },
        ),
        (
            // The fetcher before speculative batching: 128 KiB of whatever
            // followed the file read, no directory batches.
            "like before (128 KiB neighbours)",
            FetchConfig {
                speculative_neighbour_bytes: 128 << 10,
                speculative_dir_bytes: 0,
                speculative_file_bytes: u64::MAX,
                ..FetchConfig::default()
            },
        ),
        ("defaults", FetchConfig::default()),
    ];
    for (name, config) in settings {
        let mut rows = Vec::new();
        for s in 0..samples {
            let cache = Arc::new(
                ChunkCache::open(&CacheConfig {
                    memory_bytes: 512 << 20,
                    disk_bytes: 0,
                    disk_root: dir.path().join(format!("cache-{s}")),
                    ..CacheConfig::default()
                })
                .expect("cache"),
            );
            let source: Arc<dyn BlobSource> = Arc::new(RegistryBlob::for_layer(
                client.clone(),
                link_repo.clone(),
                &desc,
            ));
            let fetcher: Arc<Fetcher> = rt
                .block_on(open_layer(
                    source,
                    desc.size,
                    &desc.annotations,
                    cache,
                    FetchLimits::default(),
                    config.clone(),
                    &TocFetchOptions::default(),
                ))
                .expect("open layer");
            let mnt: PathBuf = dir.path().join(format!("mnt-{s}"));
            std::fs::create_dir_all(&mnt).expect("mkdir");
            let m = LayerMount::mount(Arc::clone(&fetcher), &mnt, &MountOptions::default())
                .expect("mount");
            let before = fetcher.stats();
            let t = Instant::now();
            for r in &reads {
                let got = std::fs::read(m.mountpoint().join(r))
                    .unwrap_or_else(|e| panic!("{name}: reading {r}: {e}; {:?}", fetcher.stats()));
                assert_eq!(
                    got.len() as u64,
                    std::fs::metadata(src.join(r)).expect("stat").len()
                );
            }
            let d = t.elapsed();
            // Let speculative fetches still in flight land before counting.
            std::thread::sleep(Duration::from_millis(300));
            let after = fetcher.stats();
            drop(m);
            rows.push((
                d,
                after.blocking_misses - before.blocking_misses,
                after.range_requests - before.range_requests,
                after.bytes_fetched - before.bytes_fetched,
                after.speculative_used_bytes,
                after.speculative_bytes,
            ));
        }
        rows.sort_by_key(|r| r.0);
        let (d, blocking, requests, bytes, used, spec) = rows[rows.len() / 2];
        println!(
            "{:<34} {:>9.3} {:>9} {:>9} {:>10.1} {:>5.1}/{:<6.1}",
            name,
            d.as_secs_f64(),
            blocking,
            requests,
            bytes as f64 / 1e6,
            used as f64 / 1e6,
            spec as f64 / 1e6,
        );
    }
    let _ = stop_tx.send(());
    let _ = rt.block_on(link_task);
    println!(
        "\nworking set {:.1} MB (uncompressed)\n",
        wanted as f64 / 1e6
    );
}
