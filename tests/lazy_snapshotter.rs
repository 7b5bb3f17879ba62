//! Lazy pulling end to end: zest's snapshotter with the [`LazyLayerProvider`] behind a
//! real containerd, images converted to zstd:chunked in a real registry, layers
//! mounted through FUSE and read through overlayfs.
//!
//! The test drives containerd's snapshot API (on containerd's own socket) the way
//! containerd's unpacker does for CRI: one `Prepare("extract-<random> <chainID>")` per
//! layer, with the layer labels, expecting ALREADY_EXISTS for every lazy layer. Then it
//! prepares container snapshots on top, mounts them, reads files and runs a container
//! on them, and checks in the registry's access log that no layer blob was ever
//! downloaded whole. It restarts the service (the layers come back from the stored
//! TOCs and the warm chunk cache, with no range request), and restarts it again with
//! the registry down (the socket answers at once, the layer that needs the registry
//! is refused until the registry is back, then mounts by itself).

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use support::containerd::{
    connect, fail, lazy_provider, lazy_provider_with, mount_at, only, require_containerd,
    require_tools, unmount, wait_for, Containerd, ContainerdVersion, KillMentioningOnDrop,
    TestCache, TestDir, TestResult, ZestService,
};
use support::image::{build_image, busybox_layer_tar, data_layer_tar, gzip, TarBuilder};
use support::{Auth, Registry};
use tonic::Code;
use zest_api::labels::{
    LABEL_IMAGE_LAYERS, LABEL_IMAGE_REF, LABEL_LAYER_DIGEST, LABEL_MANIFEST_DIGEST,
    LABEL_SNAPSHOT_REF,
};
use zest_api::snapshots as pb;
use zest_api::snapshots::snapshots_client::SnapshotsClient;
use zest_api::types::Mount as PbMount;
use zest_daemon::{LazyLayerProvider, Metrics};
use zest_format::WriteOptions;
use zest_image::convert::{convert, ConvertOptions, NoProgress, PlatformChoice};
use zest_oci::digest::Digest;
use zest_oci::{media_type, Descriptor, ImageManifest, LayerCompression, Platform, Reference};
use zest_registry::RegistryClient;
use zest_snapshotter::FallbackReason;
use zest_store::{ImageRef, ImageStore};

const NAMESPACE: &str = "zest-test";
const LEASE: &str = "zest-lazy-test";

/// An image as the test knows it: reference, manifest digest, layers with diff_ids.
#[derive(Clone, Debug)]
struct Image {
    reference: String,
    manifest: Digest,
    layers: Vec<Descriptor>,
    diff_ids: Vec<Digest>,
}

impl Image {
    /// Chain IDs of the layers, bottom first.
    fn chain_ids(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for diff_id in &self.diff_ids {
            let chain = match out.last() {
                None => diff_id.to_string(),
                Some(parent) => Digest::of(format!("{parent} {diff_id}").as_bytes()).to_string(),
            };
            out.push(chain);
        }
        out
    }

    fn top(&self) -> TestResult<String> {
        self.chain_ids()
            .last()
            .cloned()
            .ok_or_else(|| fail("image without layers"))
    }
}

/// containerd's snapshot API on containerd's socket, for snapshotter `zest`, in the
/// test namespace, under a lease (so that garbage collection keeps what we create).
#[derive(Clone)]
struct Snapshots {
    client: SnapshotsClient<tonic::transport::Channel>,
}

impl Snapshots {
    fn request<T>(message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let metadata = request.metadata_mut();
        metadata.insert(
            "containerd-namespace",
            tonic::metadata::MetadataValue::from_static(NAMESPACE),
        );
        metadata.insert(
            "containerd-lease",
            tonic::metadata::MetadataValue::from_static(LEASE),
        );
        request.set_timeout(Duration::from_secs(60));
        request
    }

    async fn prepare(
        &mut self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<PbMount>, tonic::Status> {
        self.client
            .prepare(Self::request(pb::PrepareSnapshotRequest {
                snapshotter: "zest".into(),
                key: key.into(),
                parent: parent.into(),
                labels,
            }))
            .await
            .map(|r| r.into_inner().mounts)
    }

    async fn view(&mut self, key: &str, parent: &str) -> Result<Vec<PbMount>, tonic::Status> {
        self.client
            .view(Self::request(pb::ViewSnapshotRequest {
                snapshotter: "zest".into(),
                key: key.into(),
                parent: parent.into(),
                labels: HashMap::new(),
            }))
            .await
            .map(|r| r.into_inner().mounts)
    }

    async fn stat(&mut self, key: &str) -> Result<pb::Info, tonic::Status> {
        self.client
            .stat(Self::request(pb::StatSnapshotRequest {
                snapshotter: "zest".into(),
                key: key.into(),
            }))
            .await
            .and_then(|r| {
                r.into_inner()
                    .info
                    .ok_or_else(|| tonic::Status::internal("stat without info"))
            })
    }

    async fn remove(&mut self, key: &str) -> Result<(), tonic::Status> {
        self.client
            .remove(Self::request(pb::RemoveSnapshotRequest {
                snapshotter: "zest".into(),
                key: key.into(),
            }))
            .await
            .map(|_| ())
    }

    async fn list(&mut self) -> Result<Vec<pb::Info>, tonic::Status> {
        let mut stream = self
            .client
            .list(Self::request(pb::ListSnapshotsRequest {
                snapshotter: "zest".into(),
                filters: Vec::new(),
            }))
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(batch) = stream.message().await? {
            out.extend(batch.info);
        }
        Ok(out)
    }
}

/// The labels CRI puts on the prepare of layer `index` of `image`.
fn layer_labels(image: &Image, index: usize) -> TestResult<HashMap<String, String>> {
    let chain = image
        .chain_ids()
        .get(index)
        .cloned()
        .ok_or_else(|| fail("layer index"))?;
    let layer = image.layers.get(index).ok_or_else(|| fail("layer index"))?;
    let following: Vec<String> = image
        .layers
        .iter()
        .skip(index)
        .map(|l| l.digest.to_string())
        .collect();
    Ok(HashMap::from([
        (LABEL_SNAPSHOT_REF.to_owned(), chain),
        (LABEL_IMAGE_REF.to_owned(), image.reference.clone()),
        (LABEL_MANIFEST_DIGEST.to_owned(), image.manifest.to_string()),
        (LABEL_LAYER_DIGEST.to_owned(), layer.digest.to_string()),
        (LABEL_IMAGE_LAYERS.to_owned(), following.join(",")),
    ]))
}

/// What the unpacker's prepare of one layer led to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Unpacked {
    /// ALREADY_EXISTS: the layer is a (lazy) snapshot under its chain ID.
    Remote,
    /// Mounts were returned: containerd would download and apply the layer.
    Fallback,
}

/// Prepares every layer of `image` in order like containerd's unpacker with CRI's
/// labels. Fallback layers are not applied: their extraction snapshot is removed
/// and the remaining layers are not prepared.
async fn unpack(snapshots: &mut Snapshots, image: &Image) -> TestResult<Vec<Unpacked>> {
    let chains = image.chain_ids();
    let mut out = Vec::new();
    for (index, chain) in chains.iter().enumerate() {
        let parent = if index == 0 {
            String::new()
        } else {
            chains.get(index - 1).cloned().unwrap_or_default()
        };
        let key = format!("extract-{:016x} {chain}", rand::random::<u64>());
        match snapshots
            .prepare(&key, &parent, layer_labels(image, index)?)
            .await
        {
            Err(status) if status.code() == Code::AlreadyExists => {
                let info = snapshots.stat(chain).await?;
                assert_eq!(info.kind, pb::Kind::Committed as i32, "{info:?}");
                assert_eq!(info.parent, parent);
                out.push(Unpacked::Remote);
            }
            Ok(_) => {
                snapshots.remove(&key).await?;
                out.push(Unpacked::Fallback);
                break;
            }
            Err(status) => {
                return Err(fail(format!(
                    "prepare of layer {index} of {}: {status}",
                    image.reference
                )))
            }
        }
    }
    Ok(out)
}

/// Prepares a container snapshot on `parent` through containerd and mounts it at a
/// new directory.
async fn container_rootfs(
    snapshots: &mut Snapshots,
    dir: &Path,
    key: &str,
    parent: &str,
) -> TestResult<PathBuf> {
    let mounts = snapshots.prepare(key, parent, HashMap::new()).await?;
    let target = dir.join(key);
    std::fs::create_dir_all(&target)?;
    mount_at(only(&mounts)?, &target)?;
    Ok(target)
}

/// Reads a file off the async workers (the FUSE server of this process needs them).
async fn read(path: PathBuf) -> TestResult<Vec<u8>> {
    let p = path.clone();
    tokio::task::spawn_blocking(move || std::fs::read(&p))
        .await?
        .map_err(|e| fail(format!("read {}: {e}", path.display())))
}

/// Pushes a manifest for `layers` (blobs already in the repository) with a matching
/// config; returns the image.
async fn push_manifest(
    client: &RegistryClient,
    reference: &Reference,
    layers: Vec<(Descriptor, Digest)>,
) -> TestResult<Image> {
    let platform = Platform::host();
    let diff_ids: Vec<String> = layers.iter().map(|(_, d)| d.to_string()).collect();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": platform.architecture,
        "os": platform.os,
        "config": {"Entrypoint": ["/bin/sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))?;
    let repo = &reference.repository;
    client
        .push_blob_bytes(repo, Bytes::from(config.clone()))
        .await?;
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(media_type::OCI_MANIFEST.to_owned()),
        artifact_type: None,
        config: Descriptor::for_bytes(media_type::OCI_CONFIG, &config),
        layers: layers.iter().map(|(l, _)| l.clone()).collect(),
        subject: None,
        annotations: Default::default(),
        extra: Default::default(),
    };
    let digest = client
        .push_manifest(
            repo,
            &reference.manifest_ref(),
            media_type::OCI_MANIFEST,
            Bytes::from(manifest.to_json()),
        )
        .await?;
    Ok(Image {
        reference: reference.to_string(),
        manifest: digest,
        layers: layers.iter().map(|(l, _)| l.clone()).collect(),
        diff_ids: layers.iter().map(|(_, d)| *d).collect(),
    })
}

/// Builds `tars` as a gzip image in an OCI layout and converts it to zstd:chunked
/// into `reference`.
async fn convert_image(
    client: &RegistryClient,
    work: &Path,
    reference: &Reference,
    tars: Vec<Vec<u8>>,
) -> TestResult<Image> {
    let layout = work.join(format!("oci-{:08x}", rand::random::<u32>()));
    let built = build_image(
        &layout,
        "src",
        tars,
        LayerCompression::Gzip,
        &Platform::host(),
        &["/bin/sh"],
    );
    let src = ImageStore::open(
        &format!("oci:{}:src", layout.display()).parse::<ImageRef>()?,
        client,
    )?;
    let dst = ImageStore::open(&ImageRef::Registry(reference.clone()), client)?;
    let options = ConvertOptions {
        platforms: PlatformChoice::One(Platform::host()),
        parallelism: 2,
        write: WriteOptions::default(),
        work_dir: work.to_path_buf(),
    };
    convert(&src, &dst, &options, Arc::new(NoProgress)).await?;
    let fetched = client.get_manifest(reference).await?;
    let manifest = ImageManifest::from_json(&fetched.bytes)?;
    for layer in &manifest.layers {
        assert!(
            layer
                .annotations
                .keys()
                .any(|k| k.contains("zstd-chunked.manifest-checksum")),
            "converted layer {} has no zstd:chunked annotations",
            layer.digest
        );
    }
    Ok(Image {
        reference: reference.to_string(),
        manifest: fetched.digest,
        layers: manifest.layers,
        diff_ids: built.layers.iter().map(|l| l.diff_id).collect(),
    })
}

/// A client of containerd's snapshot API.
async fn containerd_snapshots(containerd: &Containerd) -> TestResult<Snapshots> {
    Ok(Snapshots {
        client: connect(&containerd.address).await?,
    })
}

/// Runs containerd's garbage collection now (deleting a lease with `--sync` does),
/// instead of relying on its scheduler to notice every deletion.
async fn collect_garbage(containerd: &Containerd) -> TestResult {
    let id = format!("zest-gc-{:08x}", rand::random::<u32>());
    containerd
        .ctr_ok(&["leases", "create", "--id", &id])
        .await?;
    containerd
        .ctr_ok(&["leases", "delete", "--sync", &id])
        .await?;
    Ok(())
}

/// Full-blob GETs (status 200) of `digest` in the access log.
fn full_gets(registry: &Registry, digest: &Digest) -> usize {
    registry.count_requests("GET", &format!("/blobs/{digest}"), Some(200))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lazy_pull_through_containerd() -> TestResult {
    lazy_pull(ContainerdVersion::V1).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lazy_pull_through_containerd2() -> TestResult {
    lazy_pull(ContainerdVersion::V2).await
}

async fn lazy_pull(version: ContainerdVersion) -> TestResult {
    if !require_containerd(version)
        || !require_tools(&["docker-registry", "busybox", "fusermount3"])
    {
        return Ok(());
    }
    // runc's state directory is shared by every containerd of the machine.
    let container = format!("lazy-a-{version:?}").to_lowercase();
    let Some(busybox_tar) = busybox_layer_tar() else {
        return Ok(());
    };
    let busybox_bin = std::fs::read("/usr/bin/busybox")?;
    let dir = TestDir::new()?;
    let mut registry = tokio::task::spawn_blocking(|| Registry::start(Auth::None)).await?;
    let client = registry.client();
    let repo = |tag: &str| -> TestResult<Reference> {
        Ok(format!("{}/zest/img:{tag}", registry.host()).parse()?)
    };

    // Images, all in one repository:
    //   a: busybox base + data(1), converted to zstd:chunked;
    //   b: the same base + data(2) (a second chain sharing the base layer);
    //   c: a's data(1) layer alone (the same layer in another chain);
    //   d: the same base + a gzip layer (falls back to a normal pull).
    let a = convert_image(
        &client,
        dir.path(),
        &repo("a")?,
        vec![busybox_tar.clone(), data_layer_tar(1)],
    )
    .await?;
    let b_src = convert_image(
        &client,
        dir.path(),
        &repo("b-src")?,
        vec![data_layer_tar(2)],
    )
    .await?;
    let (base, data1, data2) = (
        a.layers[0].clone(),
        a.layers[1].clone(),
        b_src.layers[0].clone(),
    );
    let b = push_manifest(
        &client,
        &repo("b")?,
        vec![
            (base.clone(), a.diff_ids[0]),
            (data2.clone(), b_src.diff_ids[0]),
        ],
    )
    .await?;
    let c = push_manifest(&client, &repo("c")?, vec![(data1.clone(), a.diff_ids[1])]).await?;
    let data3 = data_layer_tar(3);
    let gzip_blob = Bytes::from(gzip(&data3));
    let gzip_digest = client
        .push_blob_bytes(&repo("d")?.repository, gzip_blob.clone())
        .await?;
    let gzip_layer = Descriptor::new(
        media_type::OCI_LAYER_GZIP,
        gzip_digest,
        gzip_blob.len() as u64,
    );
    let d = push_manifest(
        &client,
        &repo("d")?,
        vec![
            (base.clone(), a.diff_ids[0]),
            (gzip_layer, Digest::of(&data3)),
        ],
    )
    .await?;

    // The service and containerd.
    let state = dir.path().join("state");
    // Exact request counts below: no advice fetched on the side (library and
    // start command prefetch have a test of their own).
    let lazy = lazy_provider_with(&registry, &state, TestCache::Disk, |c| {
        c.library_prefetch = None
    })
    .await?;
    let service = ZestService::start(dir.path(), lazy.clone()).await?;
    let containerd = Containerd::start_version(dir.path(), &service.socket, version).await?;
    containerd
        .ctr_ok(&["leases", "create", "--id", LEASE, "--expires", "0"])
        .await?;
    let mut snapshots = containerd_snapshots(&containerd).await?;

    // Image a: both layers lazy; one manifest fetch and one TOC request per layer
    // (the second layer's TOC is prefetched while the first one mounts).
    let unpack_started = Instant::now();
    assert_eq!(unpack(&mut snapshots, &a).await?, vec![Unpacked::Remote; 2]);
    let unpack_time = unpack_started.elapsed();
    let stats = lazy.stats();
    assert_eq!(stats.mounted, 2);
    assert_eq!(stats.manifest_fetches_total, 1);
    assert_eq!(stats.toc_fetches_total, 2);
    assert_eq!(registry.range_gets(&base.digest.to_string()), 1);
    assert_eq!(registry.range_gets(&data1.digest.to_string()), 1);

    // A container on image a: files read through overlayfs over the FUSE layers are
    // the source bytes.
    let rootfs_a = container_rootfs(&mut snapshots, dir.path(), "ctr-a", &a.top()?).await?;
    assert_eq!(read(rootfs_a.join("bin/busybox")).await?, busybox_bin);
    assert_eq!(
        read(rootfs_a.join("data/random.bin")).await?,
        support::pseudo_random(1 << 20, 1)
    );
    assert_eq!(
        read(rootfs_a.join("data/hello.txt")).await?,
        b"hello from zest\n"
    );
    // A real container runs from it (runc through containerd).
    let out = containerd
        .ctr_ok(&[
            "run",
            "--rm",
            "--rootfs",
            &rootfs_a.display().to_string(),
            &container,
            "/bin/sh",
            "-c",
            "cat /data/nested/deeper/file.txt && ls /data | wc -l",
        ])
        .await?;
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["deep", "6"],
        "{out}"
    );
    let after_a = lazy.stats();
    assert!(after_a.fetch.range_requests > 0);
    assert_eq!(after_a.fetch.verification_failures, 0);
    let layer_bytes: u64 = a.layers.iter().map(|l| l.size).sum();
    eprintln!(
        "image a: {} layers, {layer_bytes} bytes compressed; unpack through containerd {unpack_time:?} \
         ({} manifest request, {} TOC requests, {} TOC bytes); reading busybox + 1 MiB file \
         and running a container: {} range requests, {} bytes ({:.0}% of the layers), {} blocking misses",
        a.layers.len(),
        after_a.manifest_fetches_total,
        after_a.toc_fetches_total,
        after_a.toc_bytes_total,
        after_a.fetch.range_requests,
        after_a.fetch.bytes_fetched,
        100.0 * after_a.fetch.bytes_fetched as f64 / layer_bytes as f64,
        after_a.fetch.blocking_misses,
    );

    // Image b shares the base layer: it is not prepared again, its TOC not fetched
    // again; only data(2) is new.
    let base_gets = registry.range_gets(&base.digest.to_string());
    assert_eq!(unpack(&mut snapshots, &b).await?, vec![Unpacked::Remote; 2]);
    assert_eq!(registry.range_gets(&base.digest.to_string()), base_gets);
    let stats = lazy.stats();
    assert_eq!(stats.mounted, 3);
    assert_eq!(stats.toc_fetches_total, 3);

    // Image c uses a's data(1) layer in another chain: a mount of its own on the
    // shared fetcher, no TOC request, and what a's container read is in the cache.
    let data1_gets = registry.range_gets(&data1.digest.to_string());
    assert_eq!(unpack(&mut snapshots, &c).await?, vec![Unpacked::Remote]);
    let stats = lazy.stats();
    assert_eq!(stats.mounted, 4);
    assert_eq!(stats.layers, 3, "one index per distinct layer");
    assert_eq!(stats.toc_fetches_total, 3);
    let view_c = dir.path().join("view-c");
    std::fs::create_dir_all(&view_c)?;
    mount_at(only(&snapshots.view("view-c", &c.top()?).await?)?, &view_c)?;
    assert_eq!(
        read(view_c.join("data/random.bin")).await?,
        support::pseudo_random(1 << 20, 1)
    );
    assert_eq!(registry.range_gets(&data1.digest.to_string()), data1_gets);
    unmount(&view_c)?;

    // Image d's gzip layer falls back to a normal pull, counted by reason.
    assert_eq!(
        unpack(&mut snapshots, &d).await?,
        vec![Unpacked::Remote, Unpacked::Fallback]
    );
    assert_eq!(
        service
            .store
            .fallback_counts()
            .get(&FallbackReason::NotChunked),
        Some(&1)
    );
    let text = Metrics::new(service.store.clone(), Some(lazy.clone())).render();
    assert!(
        text.contains("zest_fallbacks_total{reason=\"not-chunked\"} 1"),
        "{text}"
    );
    assert!(text.contains("zest_lazy_mounted_layers 4"), "{text}");

    // No lazy layer blob was ever downloaded whole: only range requests.
    for layer in [&base, &data1, &data2] {
        assert_eq!(full_gets(&registry, &layer.digest), 0, "{}", layer.digest);
        assert!(registry.range_gets(&layer.digest.to_string()) >= 1);
    }

    // Restart (as on SIGTERM): the layers are mounted again from the stored TOCs
    // and read from the warm chunk cache, without a single range request.
    unmount(&rootfs_a)?;
    let ranges_before = registry.count_requests("GET", "/blobs/", Some(206));
    service.stop().await?;
    drop(lazy);
    let lazy = lazy_provider(&registry, &state, TestCache::Disk).await?;
    let service = ZestService::start(dir.path(), lazy.clone()).await?;
    wait_for(
        "the four lazy layers to be mounted again",
        Duration::from_secs(30),
        || {
            let lazy = lazy.clone();
            async move { (lazy.stats().mounted == 4).then_some(()) }
        },
    )
    .await?;
    let stats = lazy.stats();
    assert_eq!(stats.restores_total, 4);
    assert_eq!(stats.toc_local_loads_total, 3);
    assert_eq!(stats.toc_fetches_total, 0);
    let rootfs_a2 = wait_for(
        "containerd to reach the restarted zest",
        Duration::from_secs(30),
        || {
            let mut snapshots = snapshots.clone();
            let dir = dir.path().to_path_buf();
            let top = a.top().unwrap_or_default();
            async move {
                container_rootfs(&mut snapshots, &dir, "ctr-a2", &top)
                    .await
                    .ok()
            }
        },
    )
    .await?;
    assert_eq!(read(rootfs_a2.join("bin/busybox")).await?, busybox_bin);
    assert_eq!(
        read(rootfs_a2.join("data/random.bin")).await?,
        support::pseudo_random(1 << 20, 1)
    );
    assert_eq!(
        registry.count_requests("GET", "/blobs/", Some(206)),
        ranges_before,
        "a restart with a warm cache fetched chunks again"
    );
    assert!(lazy.stats().cache.hits() > 0);
    unmount(&rootfs_a2)?;

    // Restart with the registry down and b's data(2) TOC gone from the store: the
    // socket answers at once, the layers whose TOC is stored mount without the
    // registry, b's top layer is refused until the registry is back, then mounts.
    service.stop().await?;
    drop(lazy);
    std::fs::remove_file(
        state
            .join("tocs")
            .join(format!("{}.toc", data2.digest.hex())),
    )?;
    registry.stop();
    let lazy = lazy_provider(&registry, &state, TestCache::Disk).await?;
    let started = Instant::now();
    let service = ZestService::start(dir.path(), lazy.clone()).await?;
    let mut direct = service.client().await?;
    let listed = direct
        .list(pb::ListSnapshotsRequest {
            snapshotter: "zest".into(),
            filters: Vec::new(),
        })
        .await?;
    drop(listed);
    let info = direct
        .stat(pb::StatSnapshotRequest {
            snapshotter: "zest".into(),
            key: b.top()?,
        })
        .await?;
    assert!(info.into_inner().info.is_some());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the socket was not answering promptly with the registry down: {:?}",
        started.elapsed()
    );
    wait_for(
        "the layers with stored TOCs to mount",
        Duration::from_secs(30),
        || {
            let lazy = lazy.clone();
            async move { (lazy.stats().mounted == 3).then_some(()) }
        },
    )
    .await?;
    assert_eq!(lazy.stats().restoring, 1);
    let refused = wait_for(
        "containerd to reach the restarted zest",
        Duration::from_secs(30),
        || {
            let mut snapshots = snapshots.clone();
            let top = b.top().unwrap_or_default();
            async move {
                match snapshots.prepare("ctr-b", &top, HashMap::new()).await {
                    Err(status)
                        if status.code() == Code::Unavailable
                            && status.message().contains("not mounted yet") =>
                    {
                        Some(Ok(()))
                    }
                    Err(status) if status.code() == Code::Unavailable => None,
                    Err(status) => Some(Err(fail(format!("unexpected error: {status}")))),
                    Ok(_) => Some(Err(fail("a container got a layer that is not mounted"))),
                }
            }
        },
    )
    .await?;
    refused?;
    // The first restore attempt fails once the registry client has given up its
    // retries, which may be after containerd was refused.
    wait_for(
        "the restore of b's top layer to fail with the registry down",
        Duration::from_secs(60),
        || {
            let lazy = lazy.clone();
            async move { (lazy.stats().restore_failures_total >= 1).then_some(()) }
        },
    )
    .await?;
    let registry = tokio::task::spawn_blocking(move || {
        registry.restart();
        registry
    })
    .await?;
    wait_for(
        "b's top layer to mount once the registry is back",
        Duration::from_secs(30),
        || {
            let lazy = lazy.clone();
            async move { (lazy.stats().mounted == 4).then_some(()) }
        },
    )
    .await?;
    let rootfs_b = container_rootfs(&mut snapshots, dir.path(), "ctr-b", &b.top()?).await?;
    assert_eq!(
        read(rootfs_b.join("data/random.bin")).await?,
        support::pseudo_random(1 << 20, 2)
    );
    assert_eq!(read(rootfs_b.join("bin/busybox")).await?, busybox_bin);
    unmount(&rootfs_b)?;
    for layer in [&base, &data1, &data2] {
        assert_eq!(full_gets(&registry, &layer.digest), 0, "{}", layer.digest);
    }
    let listed = snapshots.list().await?;
    assert!(listed.len() >= 6, "{listed:?}");

    // Removing snapshots (containerd's garbage collection removes them from zest)
    // releases their mounts; a stored TOC goes with the last snapshot of its layer.
    let tocs = state.join("tocs");
    let toc_of = |d: &Descriptor| tocs.join(format!("{}.toc", d.digest.hex()));
    snapshots.remove("ctr-b").await?;
    snapshots.remove("view-c").await?;
    snapshots.remove(&c.top()?).await?;
    collect_garbage(&containerd).await?;
    wait_for("c's layer to be unmounted", Duration::from_secs(30), || {
        let lazy = lazy.clone();
        async move { (lazy.stats().mounted == 3).then_some(()) }
    })
    .await?;
    assert!(toc_of(&data1).exists(), "data(1) is still used by image a");
    snapshots.remove(&b.top()?).await?;
    collect_garbage(&containerd).await?;
    let data2_toc = toc_of(&data2);
    wait_for(
        "b's top layer to be unmounted and its stored TOC deleted",
        Duration::from_secs(30),
        || {
            let lazy = lazy.clone();
            let gone = !data2_toc.exists();
            async move { (lazy.stats().mounted == 2 && gone).then_some(()) }
        },
    )
    .await?;
    assert!(toc_of(&base).exists());

    drop(containerd);
    service.stop().await?;
    Ok(())
}

/// A registry holding a busybox image with `top` as its second layer
/// (converted to zstd:chunked, named `zest/NAME`), a lazy layer provider with
/// its state under `dir`, zest's snapshotter service and containerd (1.x) on
/// it, and the image unpacked, every layer mounted from the registry. `None`
/// without busybox (a loud skip outside CI).
struct LazyNode {
    registry: Registry,
    image: Image,
    lazy: Arc<LazyLayerProvider>,
    service: ZestService,
    containerd: Containerd,
    snapshots: Snapshots,
}

async fn busybox_node(dir: &Path, name: &str, top: Vec<u8>) -> TestResult<Option<LazyNode>> {
    let Some(busybox_tar) = busybox_layer_tar() else {
        return Ok(None);
    };
    let registry = tokio::task::spawn_blocking(|| Registry::start(Auth::None)).await?;
    let reference: Reference = format!("{}/zest/{name}", registry.host()).parse()?;
    let image = convert_image(&registry.client(), dir, &reference, vec![busybox_tar, top]).await?;
    let lazy = lazy_provider(&registry, &dir.join("state"), TestCache::Memory).await?;
    let service = ZestService::start(dir, lazy.clone()).await?;
    let containerd = Containerd::start_version(dir, &service.socket, ContainerdVersion::V1).await?;
    containerd
        .ctr_ok(&["leases", "create", "--id", LEASE, "--expires", "0"])
        .await?;
    let mut snapshots = containerd_snapshots(&containerd).await?;
    assert_eq!(
        unpack(&mut snapshots, &image).await?,
        vec![Unpacked::Remote; 2]
    );
    Ok(Some(LazyNode {
        registry,
        image,
        lazy,
        service,
        containerd,
        snapshots,
    }))
}

/// `zest serve` as a process: the configuration file wires the registry options,
/// the cache and the metrics endpoint; a lazy layer serves reads; SIGTERM stops it
/// and leaves the layer mounted (its connection kept by the fd holder), the next
/// start takes it over, and SIGINT stops it releasing the mount.
/// The image's start command (its Cmd, `/bin/sh`, a link to busybox in the base
/// layer) is examined and fetched while the image is unpacked, before any
/// container reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_start_command_is_fetched_while_the_image_is_unpacked() -> TestResult {
    if !require_containerd(ContainerdVersion::V1)
        || !require_tools(&["docker-registry", "busybox", "fusermount3"])
    {
        return Ok(());
    }
    let busybox_bin = std::fs::read("/usr/bin/busybox")?;
    let dir = TestDir::new()?;
    let Some(LazyNode {
        registry,
        image: a,
        lazy,
        service,
        containerd,
        mut snapshots,
    }) = busybox_node(dir.path(), "start:a", data_layer_tar(1)).await?
    else {
        return Ok(());
    };
    let base = a.layers[0].digest.to_string();
    let gets_after_unpack = registry.range_gets(&base);

    wait_for(
        "the start command's program to be examined and fetched",
        Duration::from_secs(20),
        || {
            let s = lazy.stats().library_prefetch;
            async move { (s.elf_files >= 1 && s.bytes > 0).then_some(()) }
        },
    )
    .await?;
    assert!(
        registry.range_gets(&base) > 1,
        "busybox fetched from the base layer ({gets_after_unpack} range requests after unpack)"
    );
    let stats = lazy.stats();
    assert_eq!(stats.fetch.blocking_misses, 0, "no read happened yet");

    // What a container then reads is the source bytes.
    let rootfs = container_rootfs(&mut snapshots, dir.path(), "ctr-start", &a.top()?).await?;
    assert_eq!(read(rootfs.join("bin/busybox")).await?, busybox_bin);
    unmount(&rootfs)?;
    snapshots.remove("ctr-start").await?;

    drop(containerd);
    service.stop().await?;
    Ok(())
}

/// A process in a container that runs another command than the image's (its
/// Cmd is `/bin/sh`): its command is read from `/proc` when the process first
/// reaches a layer, and the script it names is fetched before it reads it
/// (this one never does).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_containers_own_command_is_fetched_when_its_process_starts() -> TestResult {
    if !require_containerd(ContainerdVersion::V1)
        || !require_tools(&["docker-registry", "busybox", "fusermount3", "chroot"])
    {
        return Ok(());
    }
    let script = b"#!/bin/sh\necho run\n".to_vec();
    let mut app = TarBuilder::new();
    app.dir("app/", 0o755).file("app/run.sh", 0o755, &script);
    let dir = TestDir::new()?;
    let Some(mut node) = busybox_node(dir.path(), "process:a", app.finish()).await? else {
        return Ok(());
    };
    let (registry, lazy) = (&node.registry, &node.lazy);
    let app_layer = node.image.layers[1].digest.to_string();
    let rootfs = container_rootfs(
        &mut node.snapshots,
        dir.path(),
        "ctr-process",
        &node.image.top()?,
    )
    .await?;
    let gets_before = registry.range_gets(&app_layer);
    assert_eq!(lazy.stats().library_prefetch.processes, 0);

    // `chroot` gives the process a root of its own, as a container's.
    let mut process = std::process::Command::new("chroot")
        .arg(&rootfs)
        .args(["/bin/sh", "-c", "sleep 30", "/app/run.sh"])
        .stdin(std::process::Stdio::null())
        .spawn()?;
    let prefetched = wait_for(
        "the process's command to be prefetched",
        Duration::from_secs(20),
        || {
            let s = lazy.stats();
            let gets = registry.range_gets(&app_layer);
            async move { (s.library_prefetch.processes >= 1 && gets > gets_before).then_some(()) }
        },
    )
    .await;
    let _ = process.kill();
    let _ = tokio::task::spawn_blocking(move || process.wait()).await?;
    prefetched?;
    // The script was fetched: reading it now waits for nothing.
    let misses = lazy.stats().fetch.blocking_misses;
    assert_eq!(read(rootfs.join("app/run.sh")).await?, script);
    assert_eq!(lazy.stats().fetch.blocking_misses, misses);

    unmount(&rootfs)?;
    node.snapshots.remove("ctr-process").await?;
    drop(node.containerd);
    node.service.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zest_serve_binary() -> TestResult {
    if !require_tools(&["docker-registry", "fusermount3"]) {
        return Ok(());
    }
    let dir = TestDir::new()?;
    // `zest serve` and its fd holder name paths under `dir`.
    let _reaper = KillMentioningOnDrop(dir.path().display().to_string());
    let registry = tokio::task::spawn_blocking(|| Registry::start(Auth::None)).await?;
    let client = registry.client();
    let reference: Reference = format!("{}/zest/serve:1", registry.host()).parse()?;
    let image = convert_image(&client, dir.path(), &reference, vec![data_layer_tar(7)]).await?;
    let layer = image
        .layers
        .first()
        .cloned()
        .ok_or_else(|| fail("no layer"))?;

    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let socket = dir.path().join("zest.sock");
    let state = dir.path().join("state");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[snapshotter]\nsocket = \"{}\"\nstate_dir = \"{}\"\nmetrics_address = \"127.0.0.1:{metrics_port}\"\n\
             [registry]\nplain_http_hosts = [\"{}\"]\nanonymous = true\nhosts_dir = \"{}\"\n\
             [cache]\nmemory_size = \"32MiB\"\ndisk_size = \"256MiB\"\n\
             [lazy]\ncheck_interval_secs = 1\n",
            socket.display(),
            state.display(),
            registry.host(),
            dir.path().join("certs.d").display(),
        ),
    )?;
    let start = |log: &str| -> TestResult<std::process::Child> {
        let log = std::fs::File::create(dir.path().join(log))?;
        Ok(std::process::Command::new(env!("CARGO_BIN_EXE_zest"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("ZEST_LOG", "zest=debug")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?)
    };
    let scrape = move || support::scrape_metrics(metrics_port);
    let stop = |child: &mut std::process::Child, signal: i32| -> TestResult {
        let pid = i32::try_from(child.id())?;
        // SAFETY: kill(2) on the pid of the child this test started.
        unsafe { libc::kill(pid, signal) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    return Err(fail(format!("zest serve exited with {status}")));
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        Err(fail("zest serve did not stop within 20 s"))
    };
    let log = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();

    let mut child = start("serve-1.log")?;
    let text = wait_for("the metrics endpoint", Duration::from_secs(30), scrape)
        .await
        .map_err(|e| fail(format!("{e}\n{}", log("serve-1.log"))))?;
    assert!(text.contains("zest_lazy_enabled 1"), "{text}");
    let mut direct = wait_for("the socket", Duration::from_secs(30), || {
        let socket = socket.clone();
        async move { connect(&socket).await.ok() }
    })
    .await?;
    // HEADs of the layer so far (the push's).
    let blob_path = format!("/blobs/{}", layer.digest);
    let heads = registry.count_requests("HEAD", &blob_path, None);
    let chain = image.top()?;
    let status = direct
        .prepare(pb::PrepareSnapshotRequest {
            snapshotter: "zest".into(),
            key: format!("extract-1 {chain}"),
            parent: String::new(),
            labels: layer_labels(&image, 0)?,
        })
        .await;
    match status {
        Err(s) if s.code() == Code::AlreadyExists => {}
        other => {
            return Err(fail(format!(
                "expected ALREADY_EXISTS, got {other:?}\n{}",
                log("serve-1.log")
            )))
        }
    }
    let view = direct
        .view(pb::ViewSnapshotRequest {
            snapshotter: "zest".into(),
            key: "view".into(),
            parent: chain.clone(),
            labels: HashMap::new(),
        })
        .await?
        .into_inner()
        .mounts;
    // The view's availability check found the TOC fetch of the mount a moment ago
    // (as good as a HEAD); once that is older than check_interval_secs, a new view
    // asks the registry again.
    assert_eq!(registry.count_requests("HEAD", &blob_path, None), heads);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    direct
        .view(pb::ViewSnapshotRequest {
            snapshotter: "zest".into(),
            key: "view-2".into(),
            parent: chain.clone(),
            labels: HashMap::new(),
        })
        .await?;
    assert_eq!(registry.count_requests("HEAD", &blob_path, None), heads + 1);
    direct
        .remove(pb::RemoveSnapshotRequest {
            snapshotter: "zest".into(),
            key: "view-2".into(),
        })
        .await?;
    let target = dir.path().join("view");
    std::fs::create_dir_all(&target)?;
    mount_at(only(&view)?, &target)?;
    let expected = support::pseudo_random(1 << 20, 7);
    assert_eq!(read(target.join("data/random.bin")).await?, expected);
    unmount(&target)?;
    let text = scrape()
        .await
        .ok_or_else(|| fail("metrics endpoint gone"))?;
    for expected in [
        "zest_lazy_mounted_layers 1",
        "zest_toc_fetches_total 1",
        "zest_manifest_fetches_total 1",
        "zest_fetch_verification_failures_total 0",
    ] {
        assert!(text.contains(expected), "{expected} missing:\n{text}");
    }
    assert!(
        !text.contains("zest_fetch_range_requests_total 0\n"),
        "{text}"
    );
    stop(&mut child, libc::SIGTERM)?;
    let left = support::containerd::mounts_under(&state);
    assert_eq!(
        left.len(),
        1,
        "the layer mount stays across SIGTERM: {left:?}"
    );

    // Next start: the layer is taken over (its index rebuilt from the stored TOC),
    // reads come from the disk cache; SIGINT stops it and releases the mount.
    let ranges = registry.range_gets(&layer.digest.to_string());
    let mut child = start("serve-2.log")?;
    wait_for(
        "the layer to be taken over",
        Duration::from_secs(30),
        || async move {
            scrape().await.filter(|t| {
                t.contains("zest_lazy_mounted_layers 1")
                    && t.contains("zest_lazy_takeovers_total 1")
            })
        },
    )
    .await
    .map_err(|e| fail(format!("{e}\n{}", log("serve-2.log"))))?;
    let mut direct = connect(&socket).await?;
    let view = direct
        .mounts(pb::MountsRequest {
            snapshotter: "zest".into(),
            key: "view".into(),
        })
        .await?
        .into_inner()
        .mounts;
    mount_at(only(&view)?, &target)?;
    assert_eq!(read(target.join("data/random.bin")).await?, expected);
    unmount(&target)?;
    assert_eq!(registry.range_gets(&layer.digest.to_string()), ranges);
    stop(&mut child, libc::SIGINT)?;
    assert!(support::containerd::mounts_under(&state).is_empty());
    Ok(())
}

/// A change to a prepare's labels.
type LabelTweak = Box<dyn FnOnce(&mut HashMap<String, String>) + Send>;

/// Prepares `image`'s layer `index` directly on zest's socket; returns the code.
async fn prepare_direct(
    client: &mut SnapshotsClient<tonic::transport::Channel>,
    image: &Image,
    index: usize,
    tweak: impl FnOnce(&mut HashMap<String, String>),
) -> TestResult<Code> {
    let chain = image
        .chain_ids()
        .get(index)
        .cloned()
        .ok_or_else(|| fail("layer index"))?;
    let mut labels = layer_labels(image, index)?;
    tweak(&mut labels);
    let key = format!("extract-{:016x} {chain}", rand::random::<u64>());
    let parent = if index == 0 {
        String::new()
    } else {
        image
            .chain_ids()
            .get(index - 1)
            .cloned()
            .unwrap_or_default()
    };
    let result = client
        .prepare(pb::PrepareSnapshotRequest {
            snapshotter: "zest".into(),
            key: key.clone(),
            parent,
            labels,
        })
        .await;
    match result {
        Ok(_) => {
            // A fallback: containerd would apply the layer here; drop it instead.
            client
                .remove(pb::RemoveSnapshotRequest {
                    snapshotter: "zest".into(),
                    key,
                })
                .await?;
            Ok(Code::Ok)
        }
        Err(status) => Ok(status.code()),
    }
}

/// Manifest digests naming an index resolve to this host's platform; every way a
/// layer cannot be lazy falls back with its reason; a zstd:chunked layer whose
/// manifest lost its annotations is refused by default and served through its footer
/// when the configuration allows unauthenticated TOCs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexes_and_fallback_reasons() -> TestResult {
    if !require_tools(&["docker-registry", "fusermount3"]) {
        return Ok(());
    }
    let dir = TestDir::new()?;
    let registry = tokio::task::spawn_blocking(|| Registry::start(Auth::None)).await?;
    let client = registry.client();
    let reference = |tag: &str| -> TestResult<Reference> {
        Ok(format!("{}/zest/reasons:{tag}", registry.host()).parse()?)
    };
    let image = convert_image(
        &client,
        dir.path(),
        &reference("e")?,
        vec![data_layer_tar(5)],
    )
    .await?;
    let layer = image
        .layers
        .first()
        .cloned()
        .ok_or_else(|| fail("no layer"))?;

    // An index over e's manifest.
    let manifest = client.get_manifest(&reference("e")?).await?;
    let mut entry = manifest.descriptor();
    entry.platform = Some(Platform::host());
    let mut index = zest_oci::ImageIndex::new();
    index.manifests.push(entry);
    let index_digest = client
        .push_manifest(
            &reference("idx")?.repository,
            "idx",
            media_type::OCI_INDEX,
            Bytes::from(index.to_json()),
        )
        .await?;
    // e's layer under another converted layer, in a two-layer image.
    let f = convert_image(
        &client,
        dir.path(),
        &reference("f")?,
        vec![data_layer_tar(6)],
    )
    .await?;
    let two = push_manifest(
        &client,
        &reference("two")?,
        vec![
            (layer.clone(), image.diff_ids[0]),
            (f.layers[0].clone(), f.diff_ids[0]),
        ],
    )
    .await?;
    // e's layer with its zstd:chunked annotations stripped, in an image of its own.
    let mut bare = layer.clone();
    bare.annotations.clear();
    let stripped = push_manifest(
        &client,
        &reference("stripped")?,
        vec![(bare, image.diff_ids[0])],
    )
    .await?;

    let state = dir.path().join("state");
    let lazy = lazy_provider(&registry, &state, TestCache::Disk).await?;
    let service = ZestService::start(dir.path(), lazy.clone()).await?;
    let mut direct = service.client().await?;
    let counts = |service: &ZestService, reason: FallbackReason| {
        service
            .store
            .fallback_counts()
            .get(&reason)
            .copied()
            .unwrap_or(0)
    };

    // The manifest digest label names the index: resolved, layer mounted lazily.
    let by_index = Image {
        manifest: index_digest,
        ..image.clone()
    };
    assert_eq!(
        prepare_direct(&mut direct, &by_index, 0, |_| {}).await?,
        Code::AlreadyExists
    );
    assert_eq!(lazy.stats().mounted, 1);

    // Fallbacks, each with its reason (a fresh chain ID each time, so that the
    // snapshot mounted above is not simply found).
    let other_chain = |labels: &mut HashMap<String, String>| {
        labels.insert(
            LABEL_SNAPSHOT_REF.to_owned(),
            Digest::of(rand::random::<u64>().to_string().as_bytes()).to_string(),
        );
    };
    let cases: Vec<(FallbackReason, LabelTweak)> = vec![
        (
            FallbackReason::MissingLabels,
            Box::new(move |l: &mut HashMap<String, String>| {
                other_chain(l);
                l.remove(LABEL_MANIFEST_DIGEST);
            }),
        ),
        (
            FallbackReason::ManifestUnavailable,
            Box::new(move |l: &mut HashMap<String, String>| {
                other_chain(l);
                l.insert(
                    LABEL_MANIFEST_DIGEST.to_owned(),
                    Digest::of(b"no such manifest").to_string(),
                );
            }),
        ),
        (
            FallbackReason::ManifestUnavailable,
            Box::new(move |l: &mut HashMap<String, String>| {
                other_chain(l);
                l.insert(
                    LABEL_LAYER_DIGEST.to_owned(),
                    Digest::of(b"not in the manifest").to_string(),
                );
            }),
        ),
        (
            FallbackReason::InvalidLabels,
            Box::new(move |l: &mut HashMap<String, String>| {
                other_chain(l);
                l.insert(LABEL_IMAGE_REF.to_owned(), "UPPER/Case:bad ref".to_owned());
            }),
        ),
    ];
    for (reason, tweak) in cases {
        let before = counts(&service, reason);
        assert_eq!(
            prepare_direct(&mut direct, &image, 0, tweak).await?,
            Code::Ok
        );
        assert_eq!(counts(&service, reason), before + 1, "{reason}");
    }
    // A parallel unpack (containerd 2.2+ with the `rebase` capability) prepares the
    // second layer without its parent: it cannot be lazy. containerd 2.2 does not
    // say so (zest finds the layer's place in the manifest); 2.3 adds the parent's
    // chain ID as a label.
    for label_parent in [false, true] {
        let before = counts(&service, FallbackReason::UnpackWithoutParent);
        let mut labels = layer_labels(&two, 1)?;
        other_chain(&mut labels);
        if label_parent {
            labels.insert(
                "containerd.io/snapshot/parent-chain-id".to_owned(),
                two.chain_ids()[0].clone(),
            );
        }
        let key = format!(
            "extract-{:016x} {}",
            rand::random::<u64>(),
            two.chain_ids()[1]
        );
        direct
            .prepare(pb::PrepareSnapshotRequest {
                snapshotter: "zest".into(),
                key: key.clone(),
                parent: String::new(),
                labels,
            })
            .await?;
        direct
            .remove(pb::RemoveSnapshotRequest {
                snapshotter: "zest".into(),
                key,
            })
            .await?;
        assert_eq!(
            counts(&service, FallbackReason::UnpackWithoutParent),
            before + 1,
            "label_parent={label_parent}"
        );
    }
    // The stripped layer: no annotations, so no authenticated TOC.
    assert_eq!(
        prepare_direct(&mut direct, &stripped, 0, other_chain).await?,
        Code::Ok
    );
    assert_eq!(counts(&service, FallbackReason::NotChunked), 1);
    assert_eq!(lazy.stats().mounted, 1);
    service.stop().await?;
    drop(lazy);

    // Allowing unauthenticated TOCs: the footer locates it.
    let lazy = lazy_provider_with(&registry, &state, TestCache::Disk, |config| {
        config.require_authenticated_toc = false;
    })
    .await?;
    let service = ZestService::start(dir.path(), lazy.clone()).await?;
    let mut direct = service.client().await?;
    assert_eq!(
        prepare_direct(&mut direct, &stripped, 0, other_chain).await?,
        Code::AlreadyExists
    );
    let remote = service
        .store
        .list(&[format!(
            "labels.\"{LABEL_IMAGE_REF}\"=={}",
            stripped.reference
        )])
        .await?;
    assert_eq!(remote.len(), 1, "{remote:?}");
    wait_for("both lazy layers", Duration::from_secs(30), || {
        let lazy = lazy.clone();
        async move { (lazy.stats().mounted == 2).then_some(()) }
    })
    .await?;
    service.stop().await?;
    Ok(())
}
