//! Kubernetes' path: a private containerd with its CRI plugin configured as zest's
//! packaging says (`snapshotter = "zest"`, `disable_snapshot_annotations = false`)
//! pulls a zstd:chunked image when asked over CRI (`runtime.v1.ImageService`, the
//! call the kubelet makes), and the pull is lazy: zest mounts every layer from the
//! registry, which sees range requests only. The image is then reported by CRI, runs,
//! and is collected after CRI removes it.
//!
//! The same test runs against the system's containerd 1.6 and against containerd 2.x
//! (configured with `packaging/containerd2-config.toml`) twice: with CRI pulling
//! through the transfer service (2.1's default; the labels come from the proxy
//! plugin's `enable_remote_snapshot_annotations` export) and with CRI's local pull
//! (`disable_snapshot_annotations = false`, which 2.1 answers by falling back to it).

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::containerd::{
    fail, lazy_provider, mounts_under, require_containerd, require_tools, unix_channel, wait_for,
    Containerd, ContainerdVersion, TestCache, TestDir, TestResult, ZestService,
};
use support::image::{build_image, busybox_layer_tar, data_layer_tar};
use support::{Auth, Registry};
use zest_api::labels::{LABEL_IMAGE_REF, LABEL_LAYER_DIGEST, LABEL_REMOTE};
use zest_api::snapshots as pb;
use zest_format::WriteOptions;
use zest_image::convert::{convert, ConvertOptions, NoProgress, PlatformChoice};
use zest_oci::layout::LayoutRef;
use zest_oci::{ImageManifest, LayerCompression, Platform, Reference};
use zest_store::{ImageRef, ImageStore};

use runtime::image_service_client::ImageServiceClient;
use zest_api::cri as runtime;

/// The namespace CRI keeps Kubernetes' images and containers in.
const CRI_NAMESPACE: &str = "k8s.io";

fn spec(image: &str) -> runtime::ImageSpec {
    runtime::ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    }
}

/// How CRI pulls images.
#[derive(Clone, Copy, Debug)]
enum CriPull {
    /// containerd 1.6's CRI (always its own pull, labels with
    /// `disable_snapshot_annotations = false`).
    V1,
    /// containerd 2.x's CRI through the transfer service, as packaged.
    V2Transfer,
    /// containerd 2.x's CRI local pull (`disable_snapshot_annotations = false`).
    V2Local,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_pull_is_lazy_and_the_image_runs() -> TestResult {
    cri_pull(CriPull::V1).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_pull_is_lazy_and_the_image_runs_containerd2_transfer() -> TestResult {
    cri_pull(CriPull::V2Transfer).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_pull_is_lazy_and_the_image_runs_containerd2_local_pull() -> TestResult {
    cri_pull(CriPull::V2Local).await
}

async fn cri_pull(mode: CriPull) -> TestResult {
    let version = match mode {
        CriPull::V1 => ContainerdVersion::V1,
        CriPull::V2Transfer | CriPull::V2Local => ContainerdVersion::V2,
    };
    if !require_containerd(version) || !require_tools(&["docker-registry", "busybox"]) {
        return Ok(());
    }
    let Some(base) = busybox_layer_tar() else {
        return Ok(());
    };
    let dir = TestDir::new()?;
    let registry = tokio::task::spawn_blocking(|| Registry::start(Auth::None)).await?;
    let host = registry.host();

    // A busybox + data image, converted by zest to zstd:chunked in the registry.
    let layout = dir.path().join("oci");
    build_image(
        &layout,
        "src",
        vec![base, data_layer_tar(7)],
        LayerCompression::Gzip,
        &Platform::host(),
        &["/bin/sh"],
    );
    let image = format!("{host}/zest/cri:chunked");
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
    let fetched = client.get_manifest(&reference).await?;
    let manifest = ImageManifest::from_json(&fetched.bytes)?;

    // CRI reaches the plain-HTTP registry through a containerd hosts.toml.
    let certs = dir.path().join("certs.d");
    std::fs::create_dir_all(certs.join(&host))?;
    std::fs::write(
        certs.join(&host).join("hosts.toml"),
        format!(
            "server = \"http://{host}\"\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )?;
    let service = ZestService::start(
        dir.path(),
        lazy_provider(&registry, dir.path(), TestCache::Memory).await?,
    )
    .await?;
    let (registry_table, images_keys) = match mode {
        CriPull::V1 => ("io.containerd.grpc.v1.cri", ""),
        CriPull::V2Transfer => ("io.containerd.cri.v1.images", ""),
        CriPull::V2Local => (
            "io.containerd.cri.v1.images",
            "disable_snapshot_annotations = false",
        ),
    };
    let mut containerd = Containerd::start_with_cri_version(
        dir.path(),
        &service.socket,
        &format!(
            "[plugins.\"{registry_table}\".registry]\n  config_path = \"{}\"",
            certs.display()
        ),
        images_keys,
        version,
    )
    .await?;
    containerd.namespace = CRI_NAMESPACE.to_owned();
    let mut cri = ImageServiceClient::new(unix_channel(&containerd.address).await?);

    // The kubelet's pull.
    let pulled = tokio::time::timeout(
        Duration::from_secs(180),
        cri.pull_image(runtime::PullImageRequest {
            image: Some(spec(&image)),
            auth: None,
        }),
    )
    .await
    .map_err(|_| fail("CRI PullImage did not finish within 180 s"))?
    .map_err(|e| {
        fail(format!(
            "CRI PullImage: {e}\ncontainerd log:\n{}",
            containerd.log_tail()
        ))
    })?
    .into_inner();
    assert_eq!(pulled.image_ref, manifest.config.digest.to_string());

    // Lazy: zest mounted every layer from the registry, with the labels CRI passed.
    let snapshots = service.snapshots().await?;
    let remote: Vec<&pb::Info> = snapshots
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
        assert_eq!(
            registry.count_requests("GET", &format!("/blobs/{digest}"), Some(200)),
            0,
            "layer {digest} was downloaded in full"
        );
    }

    // CRI reports the image.
    let status = cri
        .image_status(runtime::ImageStatusRequest {
            image: Some(spec(&image)),
            verbose: false,
        })
        .await?
        .into_inner();
    let reported = status
        .image
        .ok_or_else(|| fail("ImageStatus does not know the image"))?;
    assert_eq!(reported.id, manifest.config.digest.to_string());
    assert!(reported.repo_tags.contains(&image), "{reported:?}");
    let listed = cri
        .list_images(runtime::ListImagesRequest::default())
        .await?
        .into_inner();
    assert!(listed.images.iter().any(|i| i.id == reported.id));

    // A container from it runs (started with ctr in CRI's namespace; no pod needed).
    // runc's state directory is shared by every containerd of the machine: the ID is
    // unique to the variant.
    let container = format!("cri-echo-{mode:?}").to_lowercase();
    let out = containerd
        .run_on_zest(&image, &container, &["/bin/cat", "/data/hello.txt"])
        .await?;
    assert_eq!(out.trim(), "hello from zest");
    for layer in &manifest.layers {
        assert_eq!(
            registry.count_requests("GET", &format!("/blobs/{}", layer.digest), Some(200)),
            0
        );
    }

    // Removing it over CRI lets the garbage collector take every snapshot and mount.
    cri.remove_image(runtime::RemoveImageRequest {
        image: Some(spec(&image)),
    })
    .await?;
    let gone = cri
        .image_status(runtime::ImageStatusRequest {
            image: Some(spec(&image)),
            verbose: false,
        })
        .await?
        .into_inner();
    assert!(gone.image.is_none(), "{gone:?}");
    wait_for(
        "GC of the image's snapshots",
        Duration::from_secs(30),
        || async {
            service
                .snapshots()
                .await
                .ok()
                .filter(|s| s.is_empty())
                .map(drop)
        },
    )
    .await
    .map_err(|e| fail(format!("{e}\ncontainerd log:\n{}", containerd.log_tail())))?;
    let mounts = mounts_under(&service.state_dir);
    assert!(mounts.is_empty(), "{mounts:?}");
    drop(containerd);
    service.stop().await
}
