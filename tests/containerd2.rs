//! containerd 2.x's own pull is lazy: with `packaging/containerd2-config.toml`, plain
//! `ctr images pull --snapshotter zest` goes through containerd's transfer service,
//! which passes each layer's labels to zest (the proxy plugin exports
//! `enable_remote_snapshot_annotations`), so every zstd:chunked layer is mounted from
//! the registry (which sees range requests only) and `ctr run --snapshotter zest`
//! runs the image. On containerd 1.6 the same command sends no labels (see
//! `docs/kubernetes.md`), which is why `zest pull` exists.

mod support;

use std::sync::Arc;

use support::containerd::{
    lazy_provider, require_containerd, require_tools, Containerd, ContainerdVersion, TestCache,
    TestDir, TestResult, ZestService,
};
use support::image::{build_image, busybox_layer_tar, data_layer_tar};
use support::{Auth, Registry};
use zest_api::labels::{LABEL_IMAGE_REF, LABEL_LAYER_DIGEST, LABEL_REMOTE};
use zest_format::WriteOptions;
use zest_image::convert::{convert, ConvertOptions, NoProgress, PlatformChoice};
use zest_oci::layout::LayoutRef;
use zest_oci::{ImageManifest, LayerCompression, Platform, Reference};
use zest_store::{ImageRef, ImageStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctr_pull_through_the_transfer_service_is_lazy() -> TestResult {
    let version = ContainerdVersion::V2;
    if !require_containerd(version) || !require_tools(&["docker-registry", "busybox"]) {
        return Ok(());
    }
    let Some(base) = busybox_layer_tar() else {
        return Ok(());
    };
    let dir = TestDir::new()?;
    let registry = tokio::task::spawn_blocking(|| Registry::start(Auth::None)).await?;
    let layout = dir.path().join("oci");
    build_image(
        &layout,
        "src",
        vec![base, data_layer_tar(5)],
        LayerCompression::Gzip,
        &Platform::host(),
        &["/bin/sh"],
    );
    let image = format!("{}/zest/ctr2:chunked", registry.host());
    let client = registry.client();
    let reference: Reference = image.parse()?;
    convert(
        &ImageStore::open(
            &ImageRef::Layout(LayoutRef::parse(&format!("oci:{}:src", layout.display()))?),
            &client,
        )?,
        &ImageStore::open(&ImageRef::Registry(reference.clone()), &client)?,
        &ConvertOptions {
            platforms: PlatformChoice::One(Platform::host()),
            parallelism: 2,
            write: WriteOptions::default(),
            work_dir: dir.path().to_path_buf(),
        },
        Arc::new(NoProgress),
    )
    .await?;
    let manifest = ImageManifest::from_json(&client.get_manifest(&reference).await?.bytes)?;

    let service = ZestService::start(
        dir.path(),
        lazy_provider(&registry, dir.path(), TestCache::Memory).await?,
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
    let remote: Vec<_> = snapshots
        .iter()
        .filter(|s| s.labels.contains_key(LABEL_REMOTE))
        .collect();
    assert_eq!(remote.len(), manifest.layers.len(), "{snapshots:#?}");
    for layer in &manifest.layers {
        let digest = layer.digest.to_string();
        assert!(
            remote
                .iter()
                .any(|s| s.labels.get(LABEL_LAYER_DIGEST) == Some(&digest)
                    && s.labels.get(LABEL_IMAGE_REF) == Some(&image)),
            "no remote snapshot for layer {digest}: {remote:#?}"
        );
    }

    // runc's state directory is shared by every containerd of the machine: a unique ID.
    let out = containerd
        .run_on_zest(&image, "ctr2-lazy-cat", &["/bin/cat", "/data/hello.txt"])
        .await?;
    assert_eq!(out.trim(), "hello from zest");
    for layer in &manifest.layers {
        assert_eq!(
            registry.count_requests("GET", &format!("/blobs/{}", layer.digest), Some(200)),
            0,
            "layer {} was downloaded in full",
            layer.digest
        );
        assert!(registry.range_gets(&layer.digest.to_string()) >= 1);
    }
    drop(containerd);
    service.stop().await
}
