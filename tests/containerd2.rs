//! containerd 2.x's own pull is lazy: with `packaging/containerd2-config.toml`, plain
//! `ctr images pull --snapshotter zest` goes through containerd's transfer service,
//! which passes each layer's labels to zest (the proxy plugin exports
//! `enable_remote_snapshot_annotations`), so every zstd:chunked layer is mounted from
//! the registry (which sees range requests only) and `ctr run --snapshotter zest`
//! runs the image. On containerd 1.6 the same command sends no labels (see
//! `docs/kubernetes.md`), which is why `zest pull` exists. And the call sequence of
//! containerd 2.2's parallel unpack (the `rebase` capability) keeps layers intact.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use support::containerd::{
    lazy_provider, mount_at, only, require_containerd, require_tools, unmount, Containerd,
    ContainerdVersion, TestCache, TestDir, TestResult, ZestService,
};
use support::image::{build_image, busybox_layer_tar, data_layer_tar, TarBuilder};
use support::{Auth, Registry};
use zest_api::labels::{LABEL_IMAGE_REF, LABEL_LAYER_DIGEST, LABEL_REMOTE};
use zest_api::snapshots as pb;
use zest_containerd::ContainerdClient;
use zest_format::WriteOptions;
use zest_image::convert::{convert, ConvertOptions, NoProgress, PlatformChoice};
use zest_oci::digest::Digest;
use zest_oci::layout::LayoutRef;
use zest_oci::{media_type, Descriptor, ImageManifest, LayerCompression, Platform, Reference};
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

/// containerd 2.2's parallel unpack (with the `rebase` capability) as a sequence of
/// calls, since the containerd 2.1 here unpacks one layer at a time: every layer is
/// prepared in zest without its parent, containerd's own differ applies all of them at
/// once into the mounts zest returned, and they are committed bottom up, each naming
/// the one below as parent. A container view of the top must show the layers stacked,
/// with the upper layers' whiteout and opaque directory hiding what lies below: the
/// differ kept them in overlay form only because zest handed out overlay mounts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_unpack_rebases_layers_and_keeps_whiteouts() -> TestResult {
    let version = ContainerdVersion::V2;
    if !require_containerd(version) || !support::require_root_and_fuse() {
        return Ok(());
    }
    let dir = TestDir::new()?;
    let service =
        ZestService::start(dir.path(), Arc::new(zest_snapshotter::NoRemoteLayers)).await?;
    let containerd = Containerd::start_version(dir.path(), &service.socket, version).await?;
    let client = ContainerdClient::connect(&containerd.address, &containerd.namespace).await?;
    let lease = client.create_lease(Duration::from_secs(600)).await?;
    let client = client.with_lease(&lease)?;

    let mut l1 = TarBuilder::new();
    l1.dir("d/", 0o755)
        .file("d/keep", 0o644, b"keep\n")
        .file("d/gone", 0o644, b"gone\n")
        .dir("o/", 0o755)
        .file("o/old", 0o644, b"old\n");
    let mut l2 = TarBuilder::new();
    l2.dir("d/", 0o755)
        .file("d/.wh.gone", 0o644, b"")
        .dir("o/", 0o755)
        .file("o/.wh..wh..opq", 0o644, b"")
        .file("o/new", 0o644, b"new\n");
    let mut l3 = TarBuilder::new();
    l3.file("top", 0o644, b"top\n");
    let tars = [l1.finish(), l2.finish(), l3.finish()];
    let diff_ids: Vec<Digest> = tars.iter().map(|t| Digest::of(t)).collect();
    let chain = zest_oci::chain_ids(&diff_ids);

    let mut zest = service.client().await?;
    let mut prepared = Vec::new();
    for (i, tar) in tars.iter().enumerate() {
        let desc = Descriptor::new(media_type::OCI_LAYER_TAR, Digest::of(tar), tar.len() as u64);
        client
            .write_blob(&format!("layer-{i}"), &desc.digest, tar, &BTreeMap::new())
            .await?;
        let key = format!("ns/{i}/extract-{i} {}", chain[i]);
        let mounts = zest
            .prepare(pb::PrepareSnapshotRequest {
                snapshotter: "zest".into(),
                key: key.clone(),
                parent: String::new(),
                labels: Default::default(),
            })
            .await?
            .into_inner()
            .mounts;
        prepared.push((key, desc, mounts));
    }
    let applied = futures::future::join_all(
        prepared
            .iter()
            .map(|(_, desc, mounts)| client.apply_layer(desc, mounts.clone())),
    )
    .await;
    for (applied, want) in applied.into_iter().zip(&diff_ids) {
        assert_eq!(&applied?, want);
    }
    for (i, (key, _, _)) in prepared.iter().enumerate() {
        zest.commit(pb::CommitSnapshotRequest {
            snapshotter: "zest".into(),
            name: chain[i].to_string(),
            key: key.clone(),
            labels: Default::default(),
            parent: if i == 0 {
                String::new()
            } else {
                chain[i - 1].to_string()
            },
        })
        .await?;
    }

    let mounts = zest
        .view(pb::ViewSnapshotRequest {
            snapshotter: "zest".into(),
            key: "ns/9/view".into(),
            parent: chain[2].to_string(),
            labels: Default::default(),
        })
        .await?
        .into_inner()
        .mounts;
    let root = dir.path().join("view");
    std::fs::create_dir(&root)?;
    mount_at(only(&mounts)?, &root)?;
    let listing = |d: &str| -> TestResult<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(root.join(d))?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()?;
        names.sort();
        Ok(names)
    };
    let seen = (listing("")?, listing("d")?, listing("o")?);
    let top = std::fs::read(root.join("top"));
    unmount(&root)?;
    assert_eq!(
        seen,
        (
            vec!["d".to_owned(), "o".to_owned(), "top".to_owned()],
            vec!["keep".to_owned()],
            vec!["new".to_owned()],
        )
    );
    assert_eq!(top?, b"top\n");
    drop(containerd);
    service.stop().await
}
