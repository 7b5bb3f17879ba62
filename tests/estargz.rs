//! eStargz layers from the reference writer (containerd's estargz package, built
//! offline by `scripts/newer-debian` from `tests/estargz-writer`) mount through zest's
//! TOC loader, chunk decoder and FUSE layer as exactly the tree GNU tar extracts from
//! the same blob: the layer of every kind of entry of `support::tree`, cut into small
//! chunks so that files span many gzip members, every one checked against its
//! `chunkDigest`. The TOC is trusted through the `containerd.io/snapshot/stargz/toc.digest`
//! annotation, and a wrong digest refuses the layer. And an image of eStargz layers
//! pulls lazily through containerd 2.x with zest as its snapshotter, runs, and runs
//! again after zest restarts.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use support::containerd::{
    fail, lazy_provider, require_containerd, run_ok, Containerd, ContainerdVersion, TestCache,
    TestDir, TestResult, ZestService,
};
use support::image::busybox_layer_tar;
use support::tree::{build_tree, describe, tar_tree};
use support::{Auth, Registry};
use zest_api::labels::{LABEL_LAYER_DIGEST, LABEL_REMOTE};
use zest_cache::{CacheConfig, ChunkCache};
use zest_fetch::toc::{open_layer, TocFetchOptions};
use zest_fetch::{FetchConfig, FetchError, FetchLimits};
use zest_format::estargz::TOC_DIGEST_ANNOTATION;
use zest_format::FormatError;
use zest_fs::{LayerMount, MountOptions};
use zest_oci::digest::Digest;
use zest_oci::{media_type, Descriptor, ImageManifest, Platform, Reference};
use zest_store::{BlobSource, FileBlob};

/// The reference writer `scripts/newer-debian` builds.
fn writer() -> PathBuf {
    std::env::var_os("ZEST_NEWER_DEBIAN_DIR")
        .map_or_else(
            || PathBuf::from("/var/cache/zest/newer-debian"),
            PathBuf::from,
        )
        .join("estargz/bin/estargz-writer")
}

/// Opens the eStargz blob file as a lazily read layer, requiring an authenticated TOC.
async fn open(
    blob: &Path,
    annotations: &BTreeMap<String, String>,
) -> TestResult<Result<Arc<zest_fetch::Fetcher>, FetchError>> {
    let file = FileBlob::open(blob)?;
    let size = std::fs::metadata(blob)?.len();
    let source: Arc<dyn BlobSource> = Arc::new(file);
    let cache = Arc::new(ChunkCache::open(&CacheConfig {
        memory_bytes: 64 << 20,
        disk_bytes: 0,
        ..CacheConfig::default()
    })?);
    Ok(open_layer(
        source,
        size,
        annotations,
        cache,
        FetchLimits::default(),
        FetchConfig::default(),
        &TocFetchOptions {
            require_digest: true,
            ..TocFetchOptions::default()
        },
    )
    .await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_estargz_layer_mounts_as_gnu_tar_extracts_it() -> TestResult {
    let writer = writer();
    if !support::require_root_and_fuse()
        || !support::require_tool("tar")
        || !(writer.is_file()
            || support::unavailable(
                &format!("the eStargz writer is missing ({})", writer.display()),
                "run scripts/install-deps (scripts/newer-debian builds it)",
            ))
    {
        return Ok(());
    }
    let dir = TestDir::new()?;
    let limit = Duration::from_secs(120);
    let src = dir.path().join("src");
    build_tree(&src)?;
    let layer_tar = dir.path().join("layer.tar");
    tar_tree(&src, &layer_tar, limit).await?;
    let blob = dir.path().join("layer.esgz");
    // 16 KiB chunks: files span many gzip members.
    let written = run_ok(
        &writer.display().to_string(),
        &[
            &layer_tar.display().to_string(),
            &blob.display().to_string(),
            "16384",
        ],
        limit,
    )
    .await?;
    let written: BTreeMap<String, String> = serde_json::from_str(written.trim())?;
    let toc_digest = written
        .get("tocDigest")
        .ok_or_else(|| fail(format!("no tocDigest in {written:?}")))?;

    // A wrong TOC digest refuses the layer before anything is served.
    let wrong = BTreeMap::from([(
        TOC_DIGEST_ANNOTATION.to_owned(),
        Digest::of(b"another TOC").to_string(),
    )]);
    match open(&blob, &wrong).await? {
        Err(FetchError::Toc { source, .. })
            if matches!(*source, FormatError::TocDigestMismatch { .. }) => {}
        other => {
            return Err(fail(format!(
                "a wrong TOC digest was not refused: {other:?}"
            )))
        }
    }

    let annotations = BTreeMap::from([(TOC_DIGEST_ANNOTATION.to_owned(), toc_digest.clone())]);
    let fetcher = open(&blob, &annotations).await??;
    let chunks = fetcher.index().all_chunks().len();
    assert!(
        chunks > 100,
        "only {chunks} chunks: the layer was not cut small"
    );
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt)?;
    let mount = LayerMount::mount(fetcher.clone(), &mnt, &MountOptions::default())?;

    // GNU tar reads the same blob as an ordinary tar.gz. The TOC's own tar entry
    // is not in the TOC, so no eStargz reader presents it: it is left out below.
    let extracted = dir.path().join("extracted");
    std::fs::create_dir(&extracted)?;
    run_ok(
        "tar",
        &[
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "--same-owner",
            "-xzpf",
            &blob.display().to_string(),
            "-C",
            &extracted.display().to_string(),
        ],
        limit,
    )
    .await?;
    // The reference writer records modification times rounded to whole seconds in
    // the TOC (the tar keeps nanoseconds): that is all a TOC-based reader can present.
    let mut want = describe(&extracted)?;
    // (Dropped from the description, not deleted: that would change the root's mtime.)
    want.remove(Path::new("stargz.index.json"))
        .ok_or_else(|| fail("GNU tar extracted no stargz.index.json"))?;
    for entry in want.values_mut() {
        let (secs, nanos) = entry.mtime;
        entry.mtime = (secs + i64::from(nanos >= 500_000_000), 0);
    }
    let root = mount.mountpoint().to_path_buf();
    let got = tokio::task::spawn_blocking(move || describe(&root).map_err(|e| e.to_string()))
        .await?
        .map_err(fail)?;
    assert!(want.len() > 20, "{:?}", want.keys());
    for (path, entry) in &want {
        assert_eq!(got.get(path), Some(entry), "{}", path.display());
    }
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    let stats = fetcher.stats();
    assert_eq!(stats.verification_failures, 0);
    eprintln!(
        "eStargz layer: {} entries, {chunks} chunks, {} range reads of the blob",
        want.len(),
        stats.range_requests
    );
    drop(mount);
    Ok(())
}

/// Writes `tar` as eStargz with the reference writer; returns the blob, its TOC
/// digest and its diff ID (of the eStargz stream, which adds its TOC entry).
async fn estargz_blob(
    writer: &Path,
    dir: &Path,
    name: &str,
    tar: &[u8],
) -> TestResult<(Vec<u8>, String, Digest)> {
    let (tar_path, blob_path) = (
        dir.join(format!("{name}.tar")),
        dir.join(format!("{name}.esgz")),
    );
    std::fs::write(&tar_path, tar)?;
    let out = run_ok(
        &writer.display().to_string(),
        &[
            &tar_path.display().to_string(),
            &blob_path.display().to_string(),
            "65536",
        ],
        Duration::from_secs(120),
    )
    .await?;
    let out: BTreeMap<String, String> = serde_json::from_str(out.trim())?;
    let field = |k: &str| {
        out.get(k)
            .cloned()
            .ok_or_else(|| fail(format!("no {k} in {out:?}")))
    };
    Ok((
        std::fs::read(&blob_path)?,
        field("tocDigest")?,
        field("diffID")?.parse()?,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn estargz_image_pulls_lazily_through_containerd2_and_runs() -> TestResult {
    let writer = writer();
    let version = ContainerdVersion::V2;
    if !require_containerd(version)
        || !support::require_tool("tar")
        || !(writer.is_file()
            || support::unavailable(
                &format!("the eStargz writer is missing ({})", writer.display()),
                "run scripts/install-deps (scripts/newer-debian builds it)",
            ))
    {
        return Ok(());
    }
    let Some(base) = busybox_layer_tar() else {
        return Ok(());
    };
    let dir = TestDir::new()?;
    let registry = tokio::task::spawn_blocking(|| Registry::start(Auth::None)).await?;
    let src = dir.path().join("src");
    build_tree(&src)?;
    let tree_tar = dir.path().join("tree.tar");
    run_ok(
        "tar",
        &[
            "--format=posix",
            "--numeric-owner",
            "-C",
            &src.display().to_string(),
            "-cf",
            &tree_tar.display().to_string(),
            ".",
        ],
        Duration::from_secs(60),
    )
    .await?;

    // Both layers eStargz, pushed with their TOC digest annotation.
    let image = format!("{}/zest/estargz:latest", registry.host());
    let reference: Reference = image.parse()?;
    let client = registry.client();
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for (name, tar) in [("base", base), ("tree", std::fs::read(&tree_tar)?)] {
        let (blob, toc_digest, diff_id) = estargz_blob(&writer, dir.path(), name, &tar).await?;
        let digest = client
            .push_blob_bytes(&reference.repository, bytes::Bytes::from(blob.clone()))
            .await?;
        let mut desc = Descriptor::new(media_type::OCI_LAYER_GZIP, digest, blob.len() as u64);
        desc.annotations
            .insert(TOC_DIGEST_ANNOTATION.to_owned(), toc_digest);
        layers.push(desc);
        diff_ids.push(diff_id.to_string());
    }
    let platform = Platform::host();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": platform.architecture,
        "os": platform.os,
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))?;
    client
        .push_blob_bytes(&reference.repository, bytes::Bytes::from(config.clone()))
        .await?;
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(media_type::OCI_MANIFEST.to_owned()),
        artifact_type: None,
        config: Descriptor::for_bytes(media_type::OCI_CONFIG, &config),
        layers: layers.clone(),
        subject: None,
        annotations: Default::default(),
        extra: Default::default(),
    };
    client
        .push_manifest(
            &reference.repository,
            &reference.manifest_ref(),
            media_type::OCI_MANIFEST,
            bytes::Bytes::from(manifest.to_json()),
        )
        .await?;

    let lazy_state = dir.path().join("lazy");
    let service = ZestService::start(
        dir.path(),
        lazy_provider(&registry, &lazy_state, TestCache::Memory).await?,
    )
    .await?;
    let containerd = Containerd::start_version(dir.path(), &service.socket, version).await?;
    containerd
        .ctr_ok(&[
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            "zest",
            &image,
        ])
        .await?;
    let snapshots = service.snapshots().await?;
    for layer in &layers {
        let digest = layer.digest.to_string();
        assert!(
            snapshots.iter().any(|s| s.labels.contains_key(LABEL_REMOTE)
                && s.labels.get(LABEL_LAYER_DIGEST) == Some(&digest)),
            "eStargz layer {digest} was not mounted lazily: {snapshots:#?}"
        );
    }
    let data = std::fs::read(src.join("tree/data.bin"))?;
    let check = |out: String| {
        assert_eq!(
            out.lines().collect::<Vec<_>>(),
            [
                format!("{}  /tree/data.bin", Digest::of(&data).hex()).as_str(),
                "s3cret"
            ],
            "{out}"
        );
    };
    let script = "sha256sum /tree/data.bin && cat /tree/private/secret";
    check(
        containerd
            .run_on_zest(
                &image,
                "estargz-check",
                &["/bin/busybox", "sh", "-c", script],
            )
            .await?,
    );

    // After a restart the layers are mounted again (their TOCs fetched again) and
    // a new container runs.
    service.stop().await?;
    let lazy = lazy_provider(&registry, &lazy_state, TestCache::Memory).await?;
    let service = ZestService::start(dir.path(), lazy.clone()).await?;
    support::containerd::wait_for(
        "the eStargz layers to be mounted again",
        Duration::from_secs(30),
        || {
            let lazy = lazy.clone();
            let want = layers.len();
            async move { (lazy.stats().mounted == want).then_some(()) }
        },
    )
    .await?;
    // containerd reconnects to the restarted socket with a backoff: retry the run
    // (a fresh container ID each time) until it gets through.
    let attempt = std::sync::atomic::AtomicUsize::new(0);
    let out = support::containerd::wait_for(
        "containerd to reach the restarted zest",
        Duration::from_secs(30),
        || {
            let n = attempt.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (containerd, image) = (&containerd, &image);
            async move {
                let id = format!("estargz-check-r{n}");
                let args = [
                    "run",
                    "--rm",
                    "--snapshotter",
                    "zest",
                    image,
                    &id,
                    "/bin/busybox",
                    "sh",
                    "-c",
                    script,
                ];
                let out = containerd.ctr(&args).await.ok()?;
                out.success.then_some(out.stdout)
            }
        },
    )
    .await?;
    check(out);
    for layer in &layers {
        assert_eq!(
            registry.count_requests("GET", &format!("/blobs/{}", layer.digest), Some(200)),
            0,
            "layer {} was downloaded in full",
            layer.digest
        );
    }
    drop(containerd);
    service.stop().await
}
