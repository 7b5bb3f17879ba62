//! `zest pull` end to end: a private containerd with zest as its proxy snapshotter
//! (served in this process with the lazy layer provider), a loopback registry, and the
//! `zest` binary run as a user would.
//!
//! - zstd:chunked images (converted by zest, or written by skopeo) are pulled lazily:
//!   every layer is mounted from the registry, the registry sees no full download of
//!   any layer, and `ctr run` starts containers from them;
//! - an ordinary gzip image goes through the fallback path (downloaded into
//!   containerd's content store, applied, committed) and runs;
//! - what the pull leaves in containerd matches its own unpacker: garbage-collection
//!   labels, the image record, no leftover lease;
//! - two containers run at once from one lazily pulled image; an image sharing its
//!   base layer with another reuses it;
//! - removing the images lets containerd's garbage collector remove every snapshot,
//!   directory and mount of zest's.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use support::containerd::{
    build_busybox_image, containerd_content_dir, fail, lazy_provider_with, mounts_under,
    require_containerd, require_tools, run, wait_for, Containerd, ContainerdVersion, TestCache,
    TestDir, TestResult, ZestService,
};
use support::image::{build_image, busybox_layer_tar, data_layer_tar, push_image, TestImage};
use support::{Auth, Registry};
use zest_api::labels::{
    LABEL_GC_REF_CONFIG, LABEL_GC_REF_LAYER, LABEL_GC_REF_SNAPSHOT, LABEL_GC_REF_TOC, LABEL_REMOTE,
    LABEL_UNCOMPRESSED,
};
use zest_api::snapshots as pb;
use zest_containerd::ContainerdClient;
use zest_daemon::LazyLayerProvider;
use zest_format::{TocLocation, WriteOptions};
use zest_image::convert::{convert, ConvertOptions, NoProgress, PlatformChoice};
use zest_oci::digest::Digest;
use zest_oci::layout::LayoutRef;
use zest_oci::{ImageManifest, LayerCompression, Platform, Reference};
use zest_store::{ImageRef, ImageStore};

/// Tools besides containerd itself (see [`require_containerd`]).
const TOOLS: &[&str] = &["docker-registry", "busybox"];

/// Everything one test runs against. Fields drop in order: containerd before the
/// snapshotter it talks to, the directory last.
struct Env {
    containerd: Containerd,
    service: ZestService,
    lazy: Arc<LazyLayerProvider>,
    registry: Registry,
    hosts_dir: PathBuf,
    dir: TestDir,
}

impl Env {
    /// Starts registry, zest (lazy provider) and containerd; `None` to skip (a tool is
    /// missing outside CI).
    async fn start(extra_tools: &[&str]) -> TestResult<Option<Env>> {
        Self::start_version(extra_tools, ContainerdVersion::V1).await
    }

    /// [`Env::start`] with the given containerd.
    async fn start_version(
        extra_tools: &[&str],
        version: ContainerdVersion,
    ) -> TestResult<Option<Env>> {
        let tools: Vec<&str> = TOOLS.iter().chain(extra_tools).copied().collect();
        if !require_containerd(version) || !require_tools(&tools) {
            return Ok(None);
        }
        let dir = TestDir::new()?;
        let registry = tokio::task::spawn_blocking(|| Registry::start(Auth::None)).await?;
        let hosts_dir = dir.path().join("certs.d");
        std::fs::create_dir_all(&hosts_dir)?;
        // The manifests and configs containerd stores are read from its content
        // store, as on a node.
        let content_dir = containerd_content_dir(dir.path());
        let lazy = lazy_provider_with(&registry, dir.path(), TestCache::Memory, |c| {
            c.containerd_content_dir = Some(content_dir)
        })
        .await?;
        let service = ZestService::start(dir.path(), lazy.clone()).await?;
        let containerd = Containerd::start_version(dir.path(), &service.socket, version).await?;
        Ok(Some(Env {
            containerd,
            service,
            lazy,
            registry,
            hosts_dir,
            dir,
        }))
    }

    fn reference(&self, repo_tag: &str) -> String {
        format!("{}/{repo_tag}", self.registry.host())
    }

    /// Runs `zest pull` (the built binary) against this containerd; returns stdout.
    async fn zest_pull(&self, reference: &str) -> TestResult<String> {
        let out = self
            .containerd
            .zest_pull(&["--log", "zest=info"], &self.hosts_dir, reference)
            .await?;
        if !out.success {
            return Err(fail(format!(
                "zest pull {reference} failed:\nstdout: {}\nstderr: {}\ncontainerd log:\n{}",
                out.stdout,
                out.stderr,
                self.containerd.log_tail()
            )));
        }
        eprintln!("zest pull {reference}:\n{}{}", out.stdout, out.stderr);
        Ok(out.stdout)
    }

    async fn client(&self) -> TestResult<ContainerdClient> {
        Ok(ContainerdClient::connect(&self.containerd.address, &self.containerd.namespace).await?)
    }

    /// `ctr run --rm --snapshotter zest IMAGE ID ARGS...`; returns stdout.
    async fn ctr_run(&self, image: &str, id: &str, args: &[&str]) -> TestResult<String> {
        let mut full = vec!["run", "--rm", "--snapshotter", "zest", image, id];
        full.extend_from_slice(args);
        self.containerd.ctr_ok(&full).await
    }

    /// Snapshots in zest's own store (all namespaces), by name.
    async fn zest_snapshots(&self) -> TestResult<BTreeMap<String, pb::Info>> {
        let snapshots = self.service.snapshots().await?;
        Ok(snapshots.into_iter().map(|i| (i.name.clone(), i)).collect())
    }

    /// Names of zest's committed snapshots (image layers).
    async fn committed(&self) -> TestResult<Vec<String>> {
        Ok(self
            .zest_snapshots()
            .await?
            .into_values()
            .filter(|s| s.kind == pb::Kind::Committed as i32)
            .map(|s| s.name)
            .collect())
    }

    /// Directories under zest's state dir holding snapshots.
    fn snapshot_dirs(&self) -> TestResult<Vec<String>> {
        let path = self.service.state_dir.join("snapshots");
        if !path.exists() {
            return Ok(Vec::new());
        }
        let mut names: Vec<String> = std::fs::read_dir(path)?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()?;
        names.sort();
        Ok(names)
    }

    /// Converts the image `src` of the OCI layout `<dir>/<layout>` (see
    /// [`gzip_image`]) to zstd:chunked and pushes it as `destination`.
    async fn convert_to_registry(&self, layout: &str, destination: &str) -> TestResult {
        let client = self.registry.client();
        let layout = self.dir.path().join(layout);
        let source = ImageStore::open(
            &ImageRef::Layout(LayoutRef::parse(&format!("oci:{}:src", layout.display()))?),
            &client,
        )?;
        let target = ImageStore::open(&ImageRef::Registry(destination.parse()?), &client)?;
        let options = ConvertOptions {
            platforms: PlatformChoice::One(Platform::host()),
            parallelism: 2,
            write: WriteOptions::default(),
            work_dir: self.dir.path().to_path_buf(),
        };
        convert(&source, &target, &options, Arc::new(NoProgress)).await?;
        Ok(())
    }

    /// GETs of layer blob `digest` answered in full (200): what a lazy pull must
    /// never cause.
    fn full_gets(&self, digest: &Digest) -> usize {
        self.registry
            .count_requests("GET", &format!("/blobs/{digest}"), Some(200))
    }

    /// Checks that no layer blob of `manifest` was downloaded in full.
    fn assert_no_full_gets(&self, manifest: &ImageManifest) {
        for layer in &manifest.layers {
            assert_eq!(
                self.full_gets(&layer.digest),
                0,
                "full GET of {}",
                layer.digest
            );
        }
    }
}

/// Parses the counts of zest pull's summary line:
/// `... (N layers: R lazy (remote), A downloaded+applied, P already present)`.
fn outcome_counts(stdout: &str) -> TestResult<(usize, usize, usize)> {
    let line = stdout
        .lines()
        .find(|l| l.contains("lazy (remote)"))
        .ok_or_else(|| fail(format!("no summary line in {stdout:?}")))?;
    let number_before = |marker: &str| -> TestResult<usize> {
        let head = line
            .split(marker)
            .next()
            .ok_or_else(|| fail(format!("no {marker:?} in {line:?}")))?;
        head.rsplit([' ', ':', ','])
            .find(|w| !w.is_empty())
            .and_then(|w| w.parse().ok())
            .ok_or_else(|| fail(format!("no count before {marker:?} in {line:?}")))
    };
    Ok((
        number_before(" lazy (remote)")?,
        number_before(" downloaded+applied")?,
        number_before(" already present")?,
    ))
}

/// The manifest of `reference` in `registry`.
/// The digest of each layer's TOC, as its annotations give it.
fn toc_digests(manifest: &ImageManifest) -> TestResult<Vec<Digest>> {
    let mut digests = Vec::new();
    for layer in &manifest.layers {
        let location = TocLocation::from_annotations(&layer.annotations)?
            .ok_or_else(|| fail(format!("layer {} has no TOC annotations", layer.digest)))?;
        digests.push(
            location
                .toc_digest
                .ok_or_else(|| fail(format!("layer {} has no TOC digest", layer.digest)))?,
        );
    }
    Ok(digests)
}

async fn manifest(registry: &Registry, reference: &str) -> TestResult<ImageManifest> {
    let fetched = registry.client().get_manifest(&reference.parse()?).await?;
    Ok(ImageManifest::from_json(&fetched.bytes)?)
}

/// A busybox + data image (gzip) in an OCI layout at `<dir>/<name>`, tag `src`;
/// `data_seed` varies the second layer, the busybox layer is always the same.
fn gzip_image(dir: &Path, name: &str, data_seed: u64) -> TestResult<Option<TestImage>> {
    let Some(base) = busybox_layer_tar() else {
        return Ok(None);
    };
    Ok(Some(build_image(
        &dir.join(name),
        "src",
        vec![base, data_layer_tar(data_seed)],
        LayerCompression::Gzip,
        &Platform::host(),
        &["/bin/sh"],
    )))
}

/// Checks a lazy pull: every layer mounted remotely by zest, no layer blob
/// downloaded in full.
async fn assert_lazy(env: &Env, stdout: &str, manifest: &ImageManifest) -> TestResult {
    let layers = manifest.layers.len();
    assert_eq!(outcome_counts(stdout)?, (layers, 0, 0), "{stdout}");
    let remote = env
        .zest_snapshots()
        .await?
        .into_values()
        .filter(|info| info.labels.contains_key(LABEL_REMOTE))
        .count();
    assert_eq!(remote, layers, "zest's remote snapshots");
    env.assert_no_full_gets(manifest);
    Ok(())
}

// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converted_image_is_pulled_lazily_and_runs() -> TestResult {
    converted_image_pull(ContainerdVersion::V1).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converted_image_is_pulled_lazily_and_runs_containerd2() -> TestResult {
    converted_image_pull(ContainerdVersion::V2).await
}

async fn converted_image_pull(version: ContainerdVersion) -> TestResult {
    let Some(env) = Env::start_version(&[], version).await? else {
        return Ok(());
    };
    // runc's state directory is shared by every containerd of the machine.
    let (echo, cat) = match version {
        ContainerdVersion::V1 => ("lazy-echo", "lazy-cat"),
        ContainerdVersion::V2 => ("lazy-echo-2", "lazy-cat-2"),
    };
    let Some(_) = gzip_image(env.dir.path(), "oci", 1)? else {
        return Ok(());
    };
    let image = env.reference("zest/busybox:chunked");
    env.convert_to_registry("oci", &image).await?;
    let manifest = manifest(&env.registry, &image).await?;

    let stdout = env.zest_pull(&image).await?;
    assert_lazy(&env, &stdout, &manifest).await?;
    let listed = env.containerd.ctr_ok(&["images", "ls", "-q"]).await?;
    assert!(listed.lines().any(|l| l == image), "{listed}");
    // The snapshotter read the manifest containerd had just stored (verified)
    // instead of fetching it again.
    let stats = env.lazy.stats();
    assert_eq!(stats.manifest_fetches_total, 0);
    assert!(stats.local_content_reads_total >= 1, "{stats:?}");
    // The pull fetched the layers' TOCs while the config came and stored them,
    // named by the manifest for the garbage collector; the snapshotter read
    // them there and asked the registry for none.
    assert_eq!(stats.toc_fetches_total, 0, "{stats:?}");
    assert_eq!(
        stats.toc_local_loads_total,
        manifest.layers.len() as u64,
        "{stats:?}"
    );
    let client = env.client().await?;
    let target = client
        .image_target(&image)
        .await?
        .ok_or_else(|| fail("no image record"))?;
    let stored = client
        .content_info(&target.digest.parse::<Digest>()?)
        .await?
        .ok_or_else(|| fail("the manifest is not in the content store"))?;
    for (index, toc) in toc_digests(&manifest)?.iter().enumerate() {
        assert!(
            client.content_info(toc).await?.is_some(),
            "TOC {toc} not stored"
        );
        assert_eq!(
            stored.labels.get(&format!("{LABEL_GC_REF_TOC}{index}")),
            Some(&toc.to_string()),
            "{:?}",
            stored.labels
        );
    }

    let out = env.ctr_run(&image, echo, &["/bin/echo", "hello"]).await?;
    assert_eq!(out.trim(), "hello");
    let out = env
        .ctr_run(&image, cat, &["/bin/cat", "/data/hello.txt"])
        .await?;
    assert_eq!(out.trim(), "hello from zest");
    // Running read the files by range request, never a whole layer.
    env.assert_no_full_gets(&manifest);
    assert!(
        manifest
            .layers
            .iter()
            .map(|l| env.registry.range_gets(&l.digest.to_string()))
            .sum::<usize>()
            > 0,
        "running the container read nothing from the registry"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_zstd_chunked_image_is_pulled_lazily_and_runs() -> TestResult {
    let Some(env) = Env::start(&["umoci", "skopeo"]).await? else {
        return Ok(());
    };
    let layout = build_busybox_image(env.dir.path()).await?;
    let image = env.reference("zest/skopeo:chunked");
    // skopeo reuses a blob it has seen before in another compression unless its
    // blob-info cache is gone.
    let _ = std::fs::remove_file("/var/lib/containers/cache/blob-info-cache-v1.boltdb");
    support::containerd::run_ok(
        "skopeo",
        &[
            "--insecure-policy",
            "copy",
            "--dest-compress-format",
            "zstd:chunked",
            "--dest-compress",
            "--dest-tls-verify=false",
            &format!("oci:{}:latest", layout.display()),
            &format!("docker://{image}"),
        ],
        Duration::from_secs(180),
    )
    .await?;
    let manifest = manifest(&env.registry, &image).await?;
    for layer in &manifest.layers {
        let location = TocLocation::from_annotations(&layer.annotations)?;
        assert!(
            location.is_some_and(|l| l.toc_digest.is_some()),
            "skopeo did not write a zstd:chunked layer: {layer:?}"
        );
    }

    let stdout = env.zest_pull(&image).await?;
    assert_lazy(&env, &stdout, &manifest).await?;
    let out = env
        .ctr_run(&image, "skopeo-echo", &["/bin/echo", "hello"])
        .await?;
    assert_eq!(out.trim(), "hello");
    let out = env
        .ctr_run(&image, "skopeo-cat", &["/bin/cat", "/etc/zest-hello"])
        .await?;
    assert_eq!(out.trim(), "hello from the second layer");
    env.assert_no_full_gets(&manifest);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_image_falls_back_to_download_and_apply() -> TestResult {
    gzip_image_pull(ContainerdVersion::V1).await
}

/// containerd 2.x's differ applies the layers into the mounts zest hands out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_image_falls_back_to_download_and_apply_containerd2() -> TestResult {
    gzip_image_pull(ContainerdVersion::V2).await
}

async fn gzip_image_pull(version: ContainerdVersion) -> TestResult {
    let Some(env) = Env::start_version(&[], version).await? else {
        return Ok(());
    };
    let echo = match version {
        ContainerdVersion::V1 => "gzip-echo",
        ContainerdVersion::V2 => "gzip-echo-2",
    };
    let Some(built) = gzip_image(env.dir.path(), "oci", 1)? else {
        return Ok(());
    };
    let image = env.reference("zest/busybox:gzip");
    push_image(&env.registry.client(), &built, &image.parse()?).await;

    let stdout = env.zest_pull(&image).await?;
    assert_eq!(outcome_counts(&stdout)?, (0, 2, 0), "{stdout}");
    for layer in &built.layers {
        assert_eq!(env.full_gets(&layer.descriptor.digest), 1);
    }
    let out = env.ctr_run(&image, echo, &["/bin/echo", "hello"]).await?;
    assert_eq!(out.trim(), "hello");

    // What the pull left matches containerd's own unpacker.
    let client = env.client().await?;
    let manifest_digest = built.manifest_descriptor.digest;
    let manifest = client
        .content_info(&manifest_digest)
        .await?
        .ok_or_else(|| fail("manifest not in the content store"))?;
    let config_digest = Digest::of(&built.config);
    assert_eq!(
        manifest.labels.get(LABEL_GC_REF_CONFIG),
        Some(&config_digest.to_string())
    );
    let layers = &built.layers;
    for (i, layer) in layers.iter().enumerate() {
        assert_eq!(
            manifest.labels.get(&format!("{LABEL_GC_REF_LAYER}{i}")),
            Some(&layer.descriptor.digest.to_string())
        );
        let info = client
            .content_info(&layer.descriptor.digest)
            .await?
            .ok_or_else(|| fail("layer not in the content store"))?;
        assert_eq!(info.size, layer.descriptor.size);
        assert_eq!(
            info.labels.get(LABEL_UNCOMPRESSED),
            Some(&layer.diff_id.to_string())
        );
    }
    let chain = zest_oci::chain_ids(&layers.iter().map(|l| l.diff_id).collect::<Vec<_>>());
    let config = client
        .content_info(&config_digest)
        .await?
        .ok_or_else(|| fail("config not in the content store"))?;
    assert_eq!(
        config.labels.get(&format!("{LABEL_GC_REF_SNAPSHOT}zest")),
        chain.last().map(|c| c.to_string()).as_ref()
    );
    let target = client
        .image_target(&image)
        .await?
        .ok_or_else(|| fail("no image record"))?;
    assert_eq!(target.digest, manifest_digest.to_string());
    assert!(
        client.list_leases().await?.is_empty(),
        "the pull's lease is left"
    );
    // The layers were committed under their chain IDs.
    let committed = env.committed().await?;
    assert_eq!(committed.len(), 2, "{committed:?}");
    for chain_id in &chain {
        assert!(
            committed
                .iter()
                .any(|name| name.ends_with(&format!("/{chain_id}"))),
            "{chain_id} not committed: {committed:?}"
        );
    }

    // Pulling again finds everything in place and downloads nothing.
    let stdout = env.zest_pull(&image).await?;
    assert_eq!(outcome_counts(&stdout)?, (0, 0, 2), "{stdout}");
    for layer in &built.layers {
        assert_eq!(env.full_gets(&layer.descriptor.digest), 1);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_containers_run_at_once_from_one_image() -> TestResult {
    let Some(env) = Env::start(&[]).await? else {
        return Ok(());
    };
    let Some(_) = gzip_image(env.dir.path(), "oci", 1)? else {
        return Ok(());
    };
    let image = env.reference("zest/busybox:twice");
    env.convert_to_registry("oci", &image).await?;
    env.zest_pull(&image).await?;
    // Each writes its own name to the same path, waits for the other to do the
    // same, and reads back its own: both run at once on the same layers, each with
    // its own writable layer.
    let script =
        |name: &str| format!("echo {name} > /tmp/who && sleep 1 && cat /tmp/who /data/hello.txt");
    let (a, b) = (script("first"), script("second"));
    let (args_a, args_b) = (["/bin/sh", "-c", a.as_str()], ["/bin/sh", "-c", b.as_str()]);
    let (out_a, out_b) = tokio::join!(
        env.ctr_run(&image, "twice-a", &args_a),
        env.ctr_run(&image, "twice-b", &args_b),
    );
    assert_eq!(out_a?, "first\nhello from zest\n");
    assert_eq!(out_b?, "second\nhello from zest\n");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_base_layer_is_reused_and_gc_removes_everything() -> TestResult {
    let Some(env) = Env::start(&[]).await? else {
        return Ok(());
    };
    let (Some(_), Some(_)) = (
        gzip_image(env.dir.path(), "one", 1)?,
        gzip_image(env.dir.path(), "two", 2)?,
    ) else {
        return Ok(());
    };
    let one = env.reference("zest/one:chunked");
    let two = env.reference("zest/two:chunked");
    for (layout, image) in [("one", &one), ("two", &two)] {
        env.convert_to_registry(layout, image).await?;
    }
    let (m1, m2) = (
        manifest(&env.registry, &one).await?,
        manifest(&env.registry, &two).await?,
    );
    assert_eq!(m1.layers[0].digest, m2.layers[0].digest, "same base layer");
    assert_ne!(m1.layers[1].digest, m2.layers[1].digest);

    let stdout = env.zest_pull(&one).await?;
    assert_lazy(&env, &stdout, &m1).await?;
    let stdout = env.zest_pull(&two).await?;
    assert_eq!(outcome_counts(&stdout)?, (1, 0, 1), "{stdout}");
    assert_eq!(
        env.committed().await?.len(),
        3,
        "base, one's and two's data layers"
    );
    for (image, id) in [(&one, "shared-one"), (&two, "shared-two")] {
        let out = env.ctr_run(image, id, &["/bin/echo", "hello"]).await?;
        assert_eq!(out.trim(), "hello");
    }

    // Removing one image keeps the shared base for the other.
    env.containerd
        .ctr_ok(&["images", "rm", "--sync", &one])
        .await?;
    wait_for(
        "GC of the first image's own layer",
        Duration::from_secs(30),
        || async {
            env.committed()
                .await
                .ok()
                .filter(|s| s.len() == 2)
                .map(drop)
        },
    )
    .await?;
    let out = env
        .ctr_run(&two, "shared-again", &["/bin/cat", "/data/hello.txt"])
        .await?;
    assert_eq!(out.trim(), "hello from zest");
    // The garbage collection that took the first image kept the TOCs of the
    // second: its manifest names them.
    let client = env.client().await?;
    for toc in toc_digests(&m2)? {
        assert!(
            client.content_info(&toc).await?.is_some(),
            "TOC {toc} of the remaining image was collected"
        );
    }

    // Removing the other leaves nothing of zest's: no snapshot, no directory, no
    // mount (lazy layers are FUSE mounts under the state dir).
    env.containerd
        .ctr_ok(&["images", "rm", "--sync", &two])
        .await?;
    wait_for("GC of every snapshot", Duration::from_secs(30), || async {
        env.zest_snapshots()
            .await
            .ok()
            .filter(|s| s.is_empty())
            .map(drop)
    })
    .await
    .map_err(|e| {
        fail(format!(
            "{e}\ncontainerd log:\n{}",
            env.containerd.log_tail()
        ))
    })?;
    assert_eq!(env.snapshot_dirs()?, Vec::<String>::new());
    let mounts = mounts_under(&env.service.state_dir);
    assert!(mounts.is_empty(), "{mounts:?}");
    assert!(client.list_images().await?.is_empty());
    assert!(client.list_leases().await?.is_empty());
    // The TOCs the pulls stored went with their manifests.
    for toc in toc_digests(&m1)?.iter().chain(&toc_digests(&m2)?) {
        assert!(
            client.content_info(toc).await?.is_none(),
            "TOC {toc} left behind"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_reported_and_leave_nothing_behind() -> TestResult {
    let Some(env) = Env::start(&[]).await? else {
        return Ok(());
    };
    let Some(built) = gzip_image(env.dir.path(), "oci", 1)? else {
        return Ok(());
    };
    let client = env.registry.client();

    // No containerd at the address: a clear error, before anything is fetched.
    let missing = env.dir.path().join("no-containerd.sock");
    let out = run(
        env!("CARGO_BIN_EXE_zest"),
        &[
            "pull",
            "--address",
            &missing.display().to_string(),
            "--plain-http",
            "--quiet",
            &env.reference("zest/none:1"),
        ],
        Duration::from_secs(60),
    )
    .await?;
    assert!(!out.success);
    assert!(
        out.stderr.contains("cannot connect to containerd"),
        "{}",
        out.stderr
    );

    // An unknown tag: the registry's answer, naming the reference.
    let unknown = env.reference("zest/none:1");
    let err = env
        .zest_pull(&unknown)
        .await
        .err()
        .ok_or_else(|| fail("pulling an unknown image succeeded"))?;
    assert!(err.to_string().contains("zest/none:1"), "{err}");

    // An image whose config lists a wrong diff ID for its second layer: the layer is
    // downloaded and applied, the mismatch is caught, and nothing is committed.
    let mut config = zest_oci::ImageConfig::from_json(&built.config)?;
    config.set_diff_ids(&[built.layers[0].diff_id, Digest::of(b"not this layer")]);
    let config_bytes = bytes::Bytes::from(config.to_json());
    let reference: Reference = env.reference("zest/corrupt:1").parse()?;
    let repo = &reference.repository;
    for layer in &built.layers {
        client.push_blob_bytes(repo, layer.blob.clone()).await?;
    }
    let config_digest = client.push_blob_bytes(repo, config_bytes.clone()).await?;
    let mut manifest = ImageManifest::from_json(&built.manifest)?;
    manifest.config.digest = config_digest;
    manifest.config.size = config_bytes.len() as u64;
    client
        .push_manifest(
            repo,
            "1",
            zest_oci::media_type::OCI_MANIFEST,
            bytes::Bytes::from(manifest.to_json()),
        )
        .await?;
    let err = env
        .zest_pull(&reference.to_string())
        .await
        .err()
        .ok_or_else(|| fail("pulling an image with a wrong diff ID succeeded"))?;
    assert!(err.to_string().contains("diff ID"), "{err}");

    // No image record, no lease; garbage collection takes what the pull had made,
    // and of the chain only the correct base layer was ever committed.
    let containerd = env.client().await?;
    assert!(containerd.list_images().await?.is_empty());
    assert!(containerd.list_leases().await?.is_empty());
    let chain = zest_oci::chain_ids(&config.diff_ids()?);
    let committed = env.committed().await?;
    assert!(
        !committed.iter().any(|n| n.ends_with(&chain[1].to_string())),
        "{committed:?}"
    );
    let collected = wait_for("GC of the failed pull", Duration::from_secs(30), || async {
        env.zest_snapshots()
            .await
            .ok()
            .filter(|s| s.is_empty())
            .map(drop)
    })
    .await;
    if let Err(e) = collected {
        return Err(fail(format!(
            "{e}: {:#?}\ncontainerd log:\n{}",
            env.zest_snapshots().await?,
            env.containerd.log_tail()
        )));
    }
    Ok(())
}
