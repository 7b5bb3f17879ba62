//! `zest optimize` end to end, against a real registry and real FUSE/overlay
//! mounts: a busybox image is converted, its startup (a shell reading two data
//! files) is profiled, and the optimized image is checked: the recorded files
//! come first in the data layer's blob, inside its prefetch extent; every layer
//! still decompresses to a tar with the new diff_id and the same entries; and a
//! mount that waits for prefetch serves the recorded files without any further
//! range request.
//!
//! Needs root, /dev/fuse, busybox and docker-registry; without them the test
//! skips loudly (and fails under `CI=true`).

mod support;

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use zest_cache::{CacheConfig, ChunkCache};
use zest_fetch::toc::{open_layer, TocFetchOptions};
use zest_fetch::{FetchConfig, FetchLimits, Fetcher};
use zest_format::WriteOptions;
use zest_fs::{LayerMount, MountOptions};
use zest_image::convert::{convert, ConvertOptions, NoProgress, PlatformChoice};
use zest_image::optimize::{optimize, OptimizeOptions, RunOutcome};
use zest_oci::digest::Digest;
use zest_oci::layout::LayoutRef;
use zest_oci::{ImageConfig, Platform, Reference};
use zest_store::{ImageRef, ImageStore};

use support::{require_root_and_fuse, require_tool, unmount_settled, Auth, Registry, REGISTRY_BIN};

fn can_run() -> bool {
    require_root_and_fuse() && require_tool(REGISTRY_BIN)
}

/// Entries of a tar: path (without `./`) -> (type, content).
fn tar_entries(tar: &[u8]) -> BTreeMap<String, (u8, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut archive = tar::Archive::new(tar);
    for entry in archive.entries().expect("tar entries") {
        let mut entry = entry.expect("tar entry");
        let path = entry.path().expect("path").to_string_lossy().into_owned();
        let path = path
            .trim_start_matches("./")
            .trim_end_matches('/')
            .to_string();
        let kind = entry.header().entry_type().as_byte();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).expect("read entry");
        out.insert(path, (kind, data));
    }
    out
}

fn store(reference: &str, client: &zest_registry::RegistryClient) -> ImageStore {
    let r: Reference = reference.parse().expect("reference");
    ImageStore::open(&ImageRef::Registry(r), client).expect("open store")
}

#[test]
fn optimized_image_prefetches_the_recorded_startup_files() {
    if !can_run() {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let registry = Registry::start(Auth::None);
    let client = registry.client();
    let dir = tempfile::tempdir().expect("temp dir");
    let Some(source) = support::image::busybox_image(&dir.path().join("oci"), "src") else {
        return;
    };
    let layout = ImageStore::open(
        &ImageRef::Layout(
            LayoutRef::parse(&format!("oci:{}:src", dir.path().join("oci").display()))
                .expect("layout ref"),
        ),
        &client,
    )
    .expect("open layout");

    // The zstd:chunked source, in the registry.
    let chunked = store(&format!("{}/opt/busybox:chunked", registry.host()), &client);
    rt.block_on(convert(
        &layout,
        &chunked,
        &ConvertOptions {
            platforms: PlatformChoice::One(Platform::host()),
            parallelism: 2,
            write: WriteOptions::default(),
            work_dir: dir.path().join("work"),
        },
        Arc::new(NoProgress),
    ))
    .expect("convert");

    // Profile and rewrite.
    let optimized = store(
        &format!("{}/opt/busybox:optimized", registry.host()),
        &client,
    );
    let mut opts = OptimizeOptions::new(Platform::host(), dir.path().join("work"));
    opts.timeout = Duration::from_secs(30);
    opts.command = Some(vec![
        "/bin/sh".into(),
        "-c".into(),
        "cat /data/hello.txt /data/nested/deeper/file.txt".into(),
    ]);
    let report = rt
        .block_on(optimize(&chunked, &optimized, &opts))
        .expect("optimize");
    assert_eq!(report.outcome, RunOutcome::Exited(0), "{report:?}");
    assert_eq!(report.layers.len(), 2);
    let base = &report.layers[0];
    assert!(
        base.recorded.iter().any(|p| p == "bin/busybox"),
        "the shell's binary is recorded: {:?}",
        base.recorded
    );
    let data = &report.layers[1];
    assert_eq!(
        data.recorded,
        vec![
            "data/hello.txt".to_string(),
            "data/nested/deeper/file.txt".into()
        ],
        "exactly the files read, in access order"
    );
    assert_eq!(
        data.prioritized_bytes,
        (b"hello from zest\n".len() + b"deep\n".len()) as u64
    );
    assert!(data.prefetch_extent.is_some());
    // No mount is left behind.
    let mounts = zest_mount::mount_points_under(dir.path()).expect("mount table");
    assert!(
        mounts.is_empty(),
        "mounts left under the work directory: {mounts:?}"
    );

    // The published image: new diff_ids match the decompressed tars, which hold
    // the same entries as the source layers.
    let resolved = rt
        .block_on(optimized.resolve(&Platform::host()))
        .expect("resolve optimized");
    let repo: Reference = format!("{}/opt/busybox:optimized", registry.host())
        .parse()
        .expect("reference");
    let config_bytes = rt
        .block_on(client.get_blob_bytes(
            &repo.repository,
            &resolved.manifest.config.digest,
            1 << 20,
        ))
        .expect("config");
    let config = ImageConfig::from_json(&config_bytes).expect("config json");
    let diff_ids = config.diff_ids().expect("diff_ids");
    assert_eq!(diff_ids.len(), 2);
    assert_ne!(
        diff_ids[1], source.layers[1].diff_id,
        "the data layer was reordered"
    );
    for ((layer, diff_id), src) in resolved
        .manifest
        .layers
        .iter()
        .zip(&diff_ids)
        .zip(&source.layers)
    {
        let blob = rt
            .block_on(client.get_blob_bytes(&repo.repository, &layer.digest, 64 << 20))
            .expect("layer blob");
        let tar = zstd::stream::decode_all(&blob[..]).expect("plain zstd decode");
        assert_eq!(
            Digest::of(&tar),
            *diff_id,
            "tar of {} hashes to its diff_id",
            layer.digest
        );
        assert_eq!(
            tar_entries(&tar),
            tar_entries(&src.tar),
            "same entries as the source"
        );
    }

    // The data layer's TOC: the recorded files are the first in blob order and
    // their chunks lie inside the prefetch extent.
    let cache = Arc::new(
        ChunkCache::open(&CacheConfig {
            memory_bytes: 64 << 20,
            disk_bytes: 0,
            disk_root: dir.path().join("cache"),
            ..CacheConfig::default()
        })
        .expect("cache"),
    );
    let fetchers: Vec<Arc<Fetcher>> = resolved
        .manifest
        .layers
        .iter()
        .map(|layer| {
            rt.block_on(open_layer(
                optimized.layer_source(layer).expect("layer source"),
                layer.size,
                &layer.annotations,
                Arc::clone(&cache),
                FetchLimits::default(),
                FetchConfig::default(),
                &TocFetchOptions::default(),
            ))
            .expect("open layer")
        })
        .collect();
    let index = fetchers[1].index();
    let extent = index
        .prefetch_extent()
        .expect("the data layer has a prefetch extent");
    assert_eq!(
        Some(extent.end),
        data.prefetch_extent.as_ref().map(|e| e.end),
        "the TOC's extent ends where the report says"
    );
    let first: Vec<String> = index
        .files_in_blob_order()
        .take(2)
        .map(|id| index.entry(id).path())
        .collect();
    assert_eq!(
        first, data.recorded,
        "recorded files come first in the blob"
    );
    for path in &data.recorded {
        let id = index.resolve_path(path).expect("recorded file in the TOC");
        for chunk in index.entry(id).chunks() {
            let r = chunk.compressed_range();
            assert!(
                r.start >= extent.start && r.end <= extent.end,
                "{path}: chunk {r:?} outside the prefetch extent {extent:?}"
            );
        }
    }
    let other = index.resolve_path("data/random.bin").expect("random.bin");
    assert!(
        index
            .entry(other)
            .chunks()
            .iter()
            .all(|c| c.compressed_range().start >= extent.end),
        "files not read stay outside the extent"
    );

    // Mounted with prefetch: reading the recorded files makes no range request.
    let mut mounts = Vec::new();
    for (i, f) in fetchers.iter().enumerate() {
        let mp = dir.path().join(format!("mnt{i}"));
        std::fs::create_dir_all(&mp).expect("mountpoint");
        let m = LayerMount::mount(Arc::clone(f), &mp, &MountOptions::default()).expect("mount");
        assert!(
            m.wait_prefetch(Duration::from_secs(60)),
            "prefetch did not finish"
        );
        mounts.push(m);
    }
    let digests: Vec<String> = resolved
        .manifest
        .layers
        .iter()
        .map(|l| l.digest.to_string())
        .collect();
    let count = || {
        digests
            .iter()
            .map(|d| registry.range_gets(d))
            .sum::<usize>()
    };
    let before = count();
    assert_eq!(
        std::fs::read(mounts[1].mountpoint().join("data/hello.txt")).expect("read"),
        b"hello from zest\n"
    );
    assert_eq!(
        std::fs::read(mounts[1].mountpoint().join("data/nested/deeper/file.txt")).expect("read"),
        b"deep\n"
    );
    let busybox = std::fs::read(mounts[0].mountpoint().join("bin/busybox")).expect("read");
    assert_eq!(
        Digest::of(&busybox),
        Digest::of(&std::fs::read("/usr/bin/busybox").expect("busybox"))
    );
    assert_eq!(count(), before, "the recorded files were all prefetched");
    assert!(fetchers.iter().all(|f| f.stats().blocking_misses == 0));
    // A file the run did not read is still fetched on demand.
    let random = std::fs::read(mounts[1].mountpoint().join("data/random.bin")).expect("read");
    assert_eq!(random.len(), 1 << 20);
    assert!(count() > before, "unrecorded files are lazy");
    for mut m in mounts {
        unmount_settled("unmount", || m.unmount());
    }
}
