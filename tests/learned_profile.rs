//! Learned start-up profiles end to end, with real parts: a loopback
//! docker-registry (Distribution 2.8: no referrers API), two "nodes" each with its
//! own containerd 1.6 + runc and its own `zest serve` (the binary) with an empty
//! state directory and cache.
//!
//! Node 1 (publishing on) runs a container that reads some files of a data layer
//! in a known order; when the recording window ends, its profile is recorded, kept in
//! the state directory naming those files in read order, and published as a
//! referrer of the image manifest through the `sha256-<hex>` tag-schema index;
//! the image's manifest and tag are unchanged. Node 2 pulls the same image: it
//! fetches the profile from the registry, prefetches its files (bytes counted
//! before any container runs), and the container's output equals node 1's.
//!
//! Also against a scripted registry: a profile blob that does not match its
//! digest, a profile of another image and an oversized one are refused; and
//! against a registry with Basic auth, a push without credentials is denied.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

use support::containerd::{
    child_path, fail, require_tools, wait_for, Containerd, TestDir, TestResult,
};
use support::fake_http::{FakeServer, Response};
use support::image::{build_image, busybox_layer_tar, TarBuilder};
use support::Registry;
use zest_format::profile::{ProfileEntry, StartupProfile, PROFILE_MEDIA_TYPE};
use zest_oci::digest::Digest;
use zest_oci::{media_type, Descriptor, ImageIndex, ImageManifest, LayerCompression, Platform};
use zest_oci::{Reference, Repository};
use zest_registry::{referrers_tag, PlainHttp, RegistryClient};

const TOOLS: &[&str] = &["containerd", "ctr", "runc", "docker-registry", "busybox"];
const FILES: usize = 12;
const FILE_SIZE: usize = 96 << 10;
/// The files the container reads, in this order.
const READ_ORDER: [usize; 4] = [7, 2, 10, 5];

fn file_bytes(i: usize) -> Vec<u8> {
    support::pseudo_random(FILE_SIZE, 500 + i as u64)
}

fn file_path(i: usize) -> String {
    format!("files/f{i:02}")
}

/// One node: its own containerd and `zest serve`, state and cache.
struct Node {
    name: &'static str,
    containerd: Option<Containerd>,
    serve: Option<Child>,
    socket: PathBuf,
    state: PathBuf,
    metrics_port: u16,
    dir: TestDir,
}

impl Node {
    async fn start(name: &'static str, registry: &Registry, profiles: &str) -> TestResult<Node> {
        let dir = TestDir::new()?;
        let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let socket = dir.path().join("zest.sock");
        let state = dir.path().join("zs");
        let config = dir.path().join("config.toml");
        std::fs::create_dir_all(dir.path().join("certs.d"))?;
        std::fs::write(
            &config,
            format!(
                "[snapshotter]\nsocket = \"{}\"\nstate_dir = \"{}\"\nmetrics_address = \"127.0.0.1:{metrics_port}\"\n\
                 [registry]\nplain_http_hosts = [\"{}\"]\nanonymous = true\nhosts_dir = \"{}\"\n\
                 [cache]\nmemory_size = \"32MiB\"\ndisk_size = \"256MiB\"\n\
                 [profiles]\n{profiles}\n",
                socket.display(),
                state.display(),
                registry.host(),
                dir.path().join("certs.d").display(),
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("serve.log"))?;
        let serve = Command::new(env!("CARGO_BIN_EXE_zest"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("ZEST_LOG", "zest=debug")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let mut node = Node {
            name,
            containerd: None,
            serve: Some(serve),
            socket,
            state,
            metrics_port,
            dir,
        };
        let socket = node.socket.clone();
        wait_for("zest's socket", Duration::from_secs(30), || {
            let socket = socket.clone();
            async move { tokio::net::UnixStream::connect(&socket).await.ok() }
        })
        .await
        .map_err(|e| fail(format!("{e}\n{}", node.log())))?;
        node.containerd = Some(Containerd::start(node.dir.path(), &node.socket).await?);
        Ok(node)
    }

    fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default();
        format!("--- {} serve.log\n{text}", self.name)
    }

    fn containerd(&self) -> TestResult<&Containerd> {
        self.containerd
            .as_ref()
            .ok_or_else(|| fail("containerd not running"))
    }

    async fn metrics(&self) -> Option<String> {
        support::scrape_metrics(self.metrics_port).await
    }

    /// The value of the sample `line_start` (metric name and labels).
    async fn metric(&self, line_start: &str) -> Option<u64> {
        let text = self.metrics().await?;
        text.lines()
            .find_map(|l| l.strip_prefix(line_start)?.strip_prefix(' ')?.parse().ok())
    }

    /// Waits until the sample `line_start` is at least `min`.
    async fn wait_metric_at_least(&self, line_start: &str, min: u64) -> TestResult<u64> {
        wait_for(
            &format!("{line_start} >= {min} on {}", self.name),
            Duration::from_secs(60),
            || async { self.metric(line_start).await.filter(|v| *v >= min) },
        )
        .await
        .map_err(|e| fail(format!("{e}\n{}", self.log())))
    }

    /// `zest pull` of `reference` into this node's containerd (lazy mounts).
    async fn pull(&self, reference: &str) -> TestResult {
        let hosts = self.dir.path().join("certs.d");
        let out = self.containerd()?.zest_pull(&[], &hosts, reference).await?;
        if !out.success {
            return Err(fail(format!(
                "zest pull on {} failed: {}{}\n{}",
                self.name,
                out.stdout,
                out.stderr,
                self.log()
            )));
        }
        Ok(())
    }

    /// Runs a container of `image` reading the files in [`READ_ORDER`]; returns
    /// its output (one `sha256sum` line per file).
    async fn run_reader(&self, image: &str, id: &str) -> TestResult<String> {
        let containerd = self.containerd()?;
        let script: Vec<String> = READ_ORDER
            .iter()
            .map(|i| format!("sha256sum /{}", file_path(*i)))
            .collect();
        let script = script.join(" && ");
        let output = Command::new("ctr")
            .arg("--address")
            .arg(&containerd.address)
            .args(["--namespace", &containerd.namespace])
            .args(["run", "--rm", "--snapshotter", "zest", image, id])
            .args(["/bin/sh", "-c", &script])
            .env("PATH", child_path())
            .stdin(Stdio::null())
            .output()?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            return Err(fail(format!(
                "container on {} failed: {stdout}{}\n{}",
                self.name,
                String::from_utf8_lossy(&output.stderr),
                self.log()
            )));
        }
        Ok(stdout)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        drop(self.containerd.take());
        if let Some(mut child) = self.serve.take() {
            // SIGINT releases every lazy mount and kept connection.
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: kill(2) on the pid of the child this test started.
                unsafe { libc::kill(pid, libc::SIGINT) };
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Ok(pid) = std::fs::read_to_string(self.state.join("fd-holder.sock.pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                // SAFETY: the holder this node's zest started (its pid file is in
                // this node's state directory).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// Builds busybox + a data layer, converts it to zstd:chunked and pushes it;
/// returns the reference and the data layer's digest.
async fn push_test_image(registry: &Registry, work: &Path) -> TestResult<(String, Digest)> {
    let Some(base) = busybox_layer_tar() else {
        return Err(fail("busybox missing"));
    };
    let mut files = TarBuilder::new();
    files.dir("files/", 0o755);
    for i in 0..FILES {
        files.file(&file_path(i), 0o644, &file_bytes(i));
    }
    let layout = work.join("oci");
    build_image(
        &layout,
        "src",
        vec![base, files.finish()],
        LayerCompression::Gzip,
        &Platform::host(),
        &["/bin/sh"],
    );
    let reference = format!("{}/zest/profiled:1", registry.host());
    support::convert_image(
        &registry.client(),
        &format!("oci:{}:src", layout.display()),
        &reference,
        work,
        zest_image::convert::PlatformChoice::One(Platform::host()),
    )
    .await?;
    let resolved = registry
        .client()
        .resolve_image(&reference.parse()?, &Platform::host())
        .await?;
    let data_layer = resolved
        .image
        .layers
        .last()
        .map(|l| l.digest)
        .ok_or_else(|| fail("image without layers"))?;
    Ok((reference, data_layer))
}

fn expected_output() -> String {
    READ_ORDER
        .iter()
        .map(|i| {
            format!(
                "{}  /{}\n",
                hex::encode(Sha256::digest(file_bytes(*i))),
                file_path(*i)
            )
        })
        .collect()
}

#[tokio::test]
async fn profile_recorded_published_and_used_by_a_second_node() -> TestResult {
    if !require_tools(TOOLS) {
        return Ok(());
    }
    let registry = tokio::task::spawn_blocking(|| Registry::start(support::Auth::None)).await?;
    let work = TestDir::new()?;
    let (reference, data_layer) = push_test_image(&registry, work.path()).await?;
    let client = registry.client();
    let tagged: Reference = reference.parse()?;
    let manifest_before = client.get_manifest(&tagged).await?;
    let image = manifest_before.digest;

    // Node 1: records for a window that the container run falls in, and
    // publishes.
    let node1 = Node::start("node1", &registry, "publish = true\nwindow_secs = 10").await?;
    node1.pull(&reference).await?;
    let out1 = node1.run_reader(&reference, "reader1").await?;
    assert_eq!(out1, expected_output());
    assert_eq!(node1.metric("zest_profiles_recorded_total").await, Some(0));
    node1
        .wait_metric_at_least("zest_profiles_recorded_total", 1)
        .await?;
    node1
        .wait_metric_at_least("zest_profiles_published_total", 1)
        .await?;
    assert_eq!(
        node1.metric("zest_profile_publish_failures_total").await,
        Some(0)
    );

    // The local profile names the files in read order.
    let kept = std::fs::read(
        node1
            .state
            .join("profiles")
            .join(format!("{}.json", image.hex())),
    )?;
    let profile = StartupProfile::decode(&kept)?;
    profile.check_image(image)?;
    let data_paths: Vec<&str> = profile.paths_in_layer(&data_layer).collect();
    let expected_paths: Vec<String> = READ_ORDER.iter().map(|i| file_path(*i)).collect();
    assert_eq!(data_paths, expected_paths, "{profile:?}");
    assert!(
        profile.entries().len() > data_paths.len(),
        "the shell's own files (busybox layer) are recorded too: {profile:?}"
    );

    // The registry holds it as a referrer through the tag schema.
    let repo = tagged.repository.clone();
    let index = client
        .referrers_tag_index(&repo, &image)
        .await?
        .ok_or_else(|| fail(format!("no {} tag", referrers_tag(&image))))?;
    let referrer = index
        .manifests
        .iter()
        .find(|d| d.artifact_type.as_deref() == Some(PROFILE_MEDIA_TYPE))
        .ok_or_else(|| fail(format!("no profile in the referrers index: {index:?}")))?;
    let artifact = client.get_manifest_by_descriptor(&repo, referrer).await?;
    let artifact = ImageManifest::from_json(&artifact.bytes)?;
    assert_eq!(artifact.subject.as_ref().map(|s| s.digest), Some(image));
    assert_eq!(artifact.artifact_type.as_deref(), Some(PROFILE_MEDIA_TYPE));
    let blob = client
        .get_blob_bytes(&repo, &artifact.layers[0].digest, 1 << 22)
        .await?;
    assert_eq!(StartupProfile::decode(&blob)?, profile);
    // The image is byte-identical under its tag.
    let manifest_after = client.get_manifest(&tagged).await?;
    assert_eq!(manifest_after.bytes, manifest_before.bytes);

    // Node 2: empty state and cache; fetches the profile and prefetches.
    let node2 = Node::start("node2", &registry, "").await?;
    node2.pull(&reference).await?;
    node2
        .wait_metric_at_least("zest_profiles_fetched_total{source=\"registry\"}", 1)
        .await?;
    let prefetched = node2
        .wait_metric_at_least("zest_profile_prefetch_bytes_total", 1)
        .await?;
    eprintln!(
        "profile: {} files ({} in the data layer); node 2 prefetched {prefetched} compressed bytes",
        profile.len(),
        data_paths.len()
    );
    let out2 = node2.run_reader(&reference, "reader2").await?;
    assert_eq!(out2, out1);
    assert!(prefetched > 0);
    // Node 2 had a profile: it recorded none.
    assert_eq!(node2.metric("zest_profiles_recorded_total").await, Some(0));
    Ok(())
}

/// A registry that serves one profile referrer of `image` through the tag
/// schema, with `blob` as the profile bytes announced as `announced` by the
/// artifact's manifest and, with `annotated`, by the referrer's descriptor too
/// (as zest publishes them: readers then skip the manifest).
async fn scripted_registry(
    image: Digest,
    blob: Vec<u8>,
    announced: Descriptor,
    annotated: bool,
) -> (FakeServer, Repository) {
    let config = b"{}".to_vec();
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(media_type::OCI_MANIFEST.to_owned()),
        artifact_type: Some(PROFILE_MEDIA_TYPE.to_owned()),
        config: Descriptor::for_bytes("application/vnd.oci.empty.v1+json", &config),
        layers: vec![announced.clone()],
        subject: Some(Descriptor::new(media_type::OCI_MANIFEST, image, 100)),
        annotations: Default::default(),
        extra: serde_json::Map::new(),
    };
    let manifest_bytes = manifest.to_json();
    let mut desc = Descriptor::for_bytes(media_type::OCI_MANIFEST, &manifest_bytes);
    desc.artifact_type = Some(PROFILE_MEDIA_TYPE.to_owned());
    if annotated {
        desc.annotations.insert(
            "io.github.zest.profile.digest".into(),
            announced.digest.to_string(),
        );
        desc.annotations.insert(
            "io.github.zest.profile.size".into(),
            announced.size.to_string(),
        );
    }
    let mut index = ImageIndex::new();
    index.manifests.push(desc.clone());
    let index_bytes = index.to_json();
    let tag = referrers_tag(&image);
    let blob_path = format!("/v2/test/app/blobs/{}", announced.digest);
    let manifest_path = format!("/v2/test/app/manifests/{}", desc.digest);
    let server = FakeServer::start(move |req| {
        let path = req.path_only();
        if path == format!("/v2/test/app/manifests/{tag}") {
            Response::new(200)
                .header("Content-Type", media_type::OCI_INDEX)
                .body(index_bytes.clone())
        } else if path == manifest_path {
            Response::new(200)
                .header("Content-Type", media_type::OCI_MANIFEST)
                .body(manifest_bytes.clone())
        } else if path == blob_path {
            Response::new(200).body(blob.clone())
        } else {
            Response::error(404, "NOT_FOUND", "not here")
        }
    })
    .await;
    let repo = Repository::new(&server.host(), "test/app").expect("repository");
    (server, repo)
}

fn scripted_client(server: &FakeServer) -> RegistryClient {
    let mut config = support::test_client_config(PlainHttp::Hosts(vec![server.host()]));
    config.retry.max_attempts = 1;
    RegistryClient::new(config).expect("client")
}

fn small_profile(image: Digest) -> StartupProfile {
    StartupProfile::new(
        image,
        vec![ProfileEntry {
            layer: Digest::of(b"layer"),
            path: "bin/app".into(),
            ms: Some(3),
        }],
    )
    .expect("valid profile")
}

#[tokio::test]
async fn tampered_foreign_and_oversized_profiles_are_refused() {
    // Both ways to the blob: named by the artifact's manifest, and named by
    // the referrer's descriptor (no manifest fetched).
    for annotated in [false, true] {
        refused_profiles(annotated).await;
    }
}

async fn refused_profiles(annotated: bool) {
    let image = Digest::of(b"image manifest");
    let manifest_fetched = |server: &FakeServer| {
        server
            .requests()
            .iter()
            .any(|r| r.path_only().contains("/manifests/sha256:"))
    };

    // The genuine profile is accepted (the scripted registry works).
    let good = small_profile(image).encode();
    let (server, repo) = scripted_registry(
        image,
        good.clone(),
        Descriptor::for_bytes(PROFILE_MEDIA_TYPE, &good),
        annotated,
    )
    .await;
    let got = zest_daemon::fetch_profile(&scripted_client(&server), &repo, image).await;
    assert_eq!(got.unwrap(), Some(small_profile(image)));
    assert_eq!(
        manifest_fetched(&server),
        !annotated,
        "annotated: {annotated}"
    );

    // Same size, other bytes: the blob does not hash to its digest.
    let mut tampered = good.clone();
    let at = tampered.len() - 10;
    tampered[at] ^= 1;
    let (server, repo) = scripted_registry(
        image,
        tampered,
        Descriptor::for_bytes(PROFILE_MEDIA_TYPE, &good),
        annotated,
    )
    .await;
    let err = zest_daemon::fetch_profile(&scripted_client(&server), &repo, image)
        .await
        .expect_err("a tampered profile is refused");
    assert!(err.to_string().contains("digest"), "{err}");

    // A valid profile of another image, filed as this image's referrer.
    let other = small_profile(Digest::of(b"another image")).encode();
    let (server, repo) = scripted_registry(
        image,
        other.clone(),
        Descriptor::for_bytes(PROFILE_MEDIA_TYPE, &other),
        annotated,
    )
    .await;
    let err = zest_daemon::fetch_profile(&scripted_client(&server), &repo, image)
        .await
        .expect_err("a profile of another image is refused");
    assert!(
        err.to_string().contains("belongs to image manifest"),
        "{err}"
    );

    // An announced size over the cap is refused before anything is read.
    let mut huge = Descriptor::for_bytes(PROFILE_MEDIA_TYPE, &good);
    huge.size = 1 << 30;
    let (server, repo) = scripted_registry(image, good.clone(), huge, annotated).await;
    let err = zest_daemon::fetch_profile(&scripted_client(&server), &repo, image)
        .await
        .expect_err("an oversized profile is refused");
    assert!(err.to_string().contains("limit"), "{err}");
    assert!(!server
        .requests()
        .iter()
        .any(|r| r.path_only().contains("/blobs/")));

    // A blob longer than announced is cut off at the announced size.
    let mut short = Descriptor::for_bytes(PROFILE_MEDIA_TYPE, &good);
    short.size -= 1;
    let (server, repo) = scripted_registry(image, good, short, annotated).await;
    zest_daemon::fetch_profile(&scripted_client(&server), &repo, image)
        .await
        .expect_err("a blob longer than announced is refused");
}

/// Publishing without push rights fails with a `Denied` error (which the daemon
/// counts and warns about once per repository) and leaves the registry as it was.
#[tokio::test]
async fn publishing_without_push_rights_is_denied() -> TestResult {
    if !support::require_tool(support::REGISTRY_BIN) || !support::require_tool("htpasswd") {
        return Ok(());
    }
    let registry = tokio::task::spawn_blocking(|| {
        Registry::start(support::Auth::Basic {
            user: "owner".into(),
            pass: "secret".into(),
        })
    })
    .await?;
    // The client has no credentials for this registry.
    let anonymous = registry.client();
    let repo = Repository::new(&registry.host(), "test/app")?;
    let image = Digest::of(b"image manifest");
    let subject = Descriptor::new(media_type::OCI_MANIFEST, image, 100);
    let err = zest_daemon::push_profile(&anonymous, &repo, &subject, &small_profile(image))
        .await
        .expect_err("an anonymous push is refused");
    assert_eq!(err.kind(), zest_registry::ErrorKind::Denied, "{err}");
    Ok(())
}
