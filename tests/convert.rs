//! `zest convert` end to end, against a real registry: the converted image is valid
//! zstd:chunked, every file can be read back by range request with exactly the
//! original bytes, diff_ids are unchanged, and conversion is idempotent.

mod support;

use std::collections::BTreeMap;
use std::io::Read;
use std::process::Command;
use std::sync::Arc;

use zest_fetch::toc::{fetch_layer_index, TocFetchOptions};
use zest_format::{ChunkDecoder, TocLocation, WriteOptions};
use zest_image::convert::{convert, ConvertOptions, LayerAction, NoProgress, PlatformChoice};
use zest_oci::digest::Digest;
use zest_oci::{
    media_type, ImageConfig, ImageIndex, ImageManifest, LayerCompression, Platform, Reference,
};
use zest_registry::{DockerConfigSource, RegistryClient};
use zest_store::RegistryBlob;
use zest_store::{ImageRef, ImageStore};

use support::image::{build_image, busybox_layer_tar, data_layer_tar, TestImage};
use support::{Auth, Registry, REGISTRY_BIN};

fn options(work: &std::path::Path, platforms: PlatformChoice) -> ConvertOptions {
    ConvertOptions {
        platforms,
        parallelism: 2,
        write: WriteOptions::default(),
        work_dir: work.to_path_buf(),
    }
}

/// Files of a tar: path (without `./`) -> content.
fn tar_files(tar: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut archive = tar::Archive::new(tar);
    for entry in archive.entries().expect("tar entries") {
        let mut entry = entry.expect("tar entry");
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = entry
            .path()
            .expect("path")
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).expect("read tar entry");
        out.insert(path, data);
    }
    out
}

/// Busybox base + data layer, gzip, in an OCI layout; `None` to skip (no busybox).
fn source_image(dir: &std::path::Path) -> Option<TestImage> {
    support::image::busybox_image(dir, "src")
}

async fn fetch_json<T: serde::de::DeserializeOwned>(
    client: &RegistryClient,
    reference: &Reference,
) -> (T, Digest) {
    let m = client.get_manifest(reference).await.expect("get manifest");
    (
        serde_json::from_slice(&m.bytes).expect("manifest json"),
        m.digest,
    )
}

/// Checks the converted image at `reference` against `source`: media types,
/// annotations, diff_ids, every file's bytes by range request, and that the whole
/// blob decompresses (plain zstd) to a tar with the diff_id.
async fn check_converted(
    registry: &Registry,
    client: &RegistryClient,
    reference: &Reference,
    source: &TestImage,
) {
    let (manifest, _) = fetch_json::<ImageManifest>(client, reference).await;
    assert_eq!(
        manifest.media_type.as_deref(),
        Some(media_type::OCI_MANIFEST)
    );
    assert_eq!(manifest.layers.len(), source.layers.len());
    let repo = &reference.repository;
    let config_bytes = client
        .get_blob_bytes(repo, &manifest.config.digest, 1 << 20)
        .await
        .expect("config");
    let config = ImageConfig::from_json(&config_bytes).expect("config json");
    let source_config = ImageConfig::from_json(&source.config).expect("source config");
    assert_eq!(
        config.diff_ids().unwrap(),
        source_config.diff_ids().unwrap(),
        "diff_ids must not change"
    );
    assert_eq!(
        config.entrypoint().unwrap(),
        source_config.entrypoint().unwrap()
    );

    let mut decoder = ChunkDecoder::new().expect("decoder");
    for (layer, src) in manifest.layers.iter().zip(&source.layers) {
        assert_eq!(layer.media_type, media_type::OCI_LAYER_ZSTD);
        let location = TocLocation::from_annotations(&layer.annotations)
            .expect("valid annotations")
            .expect("zstd:chunked annotations present");
        assert!(
            location.toc_digest.is_some(),
            "manifest-checksum annotation present"
        );

        // The TOC is found from the annotations in ONE range request, authenticated.
        let before = registry.range_gets(&layer.digest.to_string());
        let blob = RegistryBlob::for_layer(client.clone(), repo.clone(), layer);
        let fetched = fetch_layer_index(
            &blob,
            layer.size,
            &layer.annotations,
            &TocFetchOptions::default(),
        )
        .await
        .expect("fetch TOC");
        assert!(fetched.authenticated);
        assert_eq!(fetched.requests, 1);
        assert_eq!(registry.range_gets(&layer.digest.to_string()) - before, 1);
        let index = fetched.index;

        // Every regular file, chunk by chunk, by range request: the original bytes.
        let files = tar_files(&src.tar);
        assert!(!files.is_empty());
        for (path, data) in &files {
            let id = index
                .resolve_path(path)
                .unwrap_or_else(|| panic!("{path} missing from TOC"));
            let entry = index.entry(id);
            assert_eq!(entry.size(), data.len() as u64, "{path} size");
            if !data.is_empty() {
                assert_eq!(entry.digest(), Some(Digest::of(data)), "{path} digest");
            }
            let mut rebuilt = Vec::with_capacity(data.len());
            for chunk in entry.chunks() {
                let compressed = client
                    .get_range(repo, &layer.digest, chunk.compressed_range())
                    .await
                    .expect("range read of a chunk");
                rebuilt.extend(decoder.decode(chunk, &compressed).expect("verified chunk"));
            }
            assert!(
                rebuilt == *data,
                "{path}: bytes read back by range differ from the source"
            );
        }

        // A plain zstd decoder yields the byte-identical tar (valid tar+zstd layer).
        let whole = client
            .get_blob_bytes(repo, &layer.digest, 64 << 20)
            .await
            .expect("whole blob");
        let tar = zstd::stream::decode_all(&whole[..]).expect("plain zstd decode");
        assert_eq!(
            Digest::of(&tar),
            src.diff_id,
            "decompressed tar must hash to the diff_id"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converts_layout_to_registry_and_every_file_reads_back_by_range() {
    if !support::require_tool(REGISTRY_BIN) {
        return;
    }
    let registry = Registry::start(Auth::None);
    let dir = tempfile::tempdir().unwrap();
    let Some(source) = source_image(&dir.path().join("oci")) else {
        return;
    };
    let client = registry.client();
    let src_name = format!("oci:{}:src", dir.path().join("oci").display());
    let dst_ref: Reference = format!("{}/zest/busybox:chunked", registry.host())
        .parse()
        .unwrap();
    let report = support::convert_image(
        &client,
        &src_name,
        &dst_ref.to_string(),
        dir.path(),
        PlatformChoice::One(Platform::host()),
    )
    .await
    .expect("convert");
    assert_eq!(report.layers.len(), 2);
    assert!(report
        .layers
        .iter()
        .all(|l| l.action == LayerAction::Converted));
    assert!(report.layers.iter().all(|l| l.chunks > 0));
    check_converted(&registry, &client, &dst_ref, &source).await;

    // Converting the converted image again keeps every layer byte for byte, and the
    // push to another repository of the same registry mounts instead of uploading.
    let again_ref: Reference = format!("{}/zest/again:chunked", registry.host())
        .parse()
        .unwrap();
    let report2 = support::convert_image(
        &client,
        &dst_ref.to_string(),
        &again_ref.to_string(),
        dir.path(),
        PlatformChoice::One(Platform::host()),
    )
    .await
    .expect("reconvert");
    assert!(report2.layers.iter().all(|l| l.action == LayerAction::Kept));
    let layer_digests = |r: &zest_image::convert::ConvertReport| {
        r.layers.iter().map(|l| l.output.digest).collect::<Vec<_>>()
    };
    assert_eq!(layer_digests(&report), layer_digests(&report2));
    check_converted(&registry, &client, &again_ref, &source).await;
    assert!(
        registry.count_requests("POST", "mount=", None) >= 2,
        "kept layers should be cross-repository mounts:\n{}",
        registry.access_log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converts_every_platform_of_an_index_and_shared_layers_once() {
    if !support::require_tool(REGISTRY_BIN) {
        return;
    }
    let Some(base) = busybox_layer_tar() else {
        return;
    };
    let registry = Registry::start(Auth::None);
    let dir = tempfile::tempdir().unwrap();
    let layout_dir = dir.path().join("oci");
    let amd = Platform::new("linux", "amd64", None);
    let arm = Platform::new("linux", "arm64", Some("v8"));
    let a = build_image(
        &layout_dir,
        "amd",
        vec![base.clone(), data_layer_tar(1)],
        LayerCompression::Gzip,
        &amd,
        &["/bin/sh"],
    );
    let b = build_image(
        &layout_dir,
        "arm",
        vec![base, data_layer_tar(2)],
        LayerCompression::Uncompressed,
        &arm,
        &["/bin/sh"],
    );

    // An index over both manifests, tagged "multi".
    let layout = zest_oci::layout::OciLayout::open(&layout_dir).unwrap();
    let mut index = ImageIndex::new();
    index.media_type = Some(media_type::OCI_INDEX.to_string());
    index.manifests = vec![a.manifest_descriptor.clone(), b.manifest_descriptor.clone()];
    let index_bytes = index.to_json();
    layout.write_blob(&index_bytes).unwrap();
    layout
        .add_manifest(
            zest_oci::Descriptor::for_bytes(media_type::OCI_INDEX, &index_bytes),
            Some("multi"),
        )
        .unwrap();

    let client = registry.client();
    let src = ImageStore::open(
        &format!("oci:{}:multi", layout_dir.display())
            .parse()
            .unwrap(),
        &client,
    )
    .unwrap();
    let dst_ref: Reference = format!("{}/zest/multi:chunked", registry.host())
        .parse()
        .unwrap();
    let dst = ImageStore::open(&ImageRef::Registry(dst_ref.clone()), &client).unwrap();
    let report = convert(
        &src,
        &dst,
        &options(dir.path(), PlatformChoice::All),
        Arc::new(NoProgress),
    )
    .await
    .expect("convert index");
    assert_eq!(report.manifests, 2);
    // The gzip and the uncompressed copy of the base are different blobs with one
    // tar: both convert, and to the same zstd:chunked blob.
    assert_eq!(report.layers.len(), 4);
    let base_outputs: Vec<_> = report
        .layers
        .iter()
        .filter(|l| l.diff_id == Some(a.layers[0].diff_id))
        .map(|l| l.output.digest)
        .collect();
    assert_eq!(base_outputs.len(), 2);
    assert_eq!(
        base_outputs[0], base_outputs[1],
        "same tar, same settings: same blob"
    );

    let (out_index, _) = fetch_json::<ImageIndex>(&client, &dst_ref).await;
    assert_eq!(out_index.manifests.len(), 2);
    let platforms: Vec<_> = out_index
        .manifests
        .iter()
        .map(|d| d.platform.clone().unwrap())
        .collect();
    assert!(
        platforms.contains(&amd) && platforms.contains(&arm),
        "{platforms:?}"
    );
    for (desc, source) in out_index.manifests.iter().zip([&a, &b]) {
        let r = dst_ref.with_digest(desc.digest);
        check_converted(&registry, &client, &r, source).await;
    }

    // One platform of an index becomes a plain manifest.
    let one_ref: Reference = format!("{}/zest/multi:arm", registry.host())
        .parse()
        .unwrap();
    let one = ImageStore::open(&ImageRef::Registry(one_ref.clone()), &client).unwrap();
    convert(
        &dst,
        &one,
        &options(dir.path(), PlatformChoice::One(arm.clone())),
        Arc::new(NoProgress),
    )
    .await
    .expect("convert one platform");
    check_converted(&registry, &client, &one_ref, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_with_basic_auth_credentials_from_docker_config() {
    if !support::require_tool(REGISTRY_BIN) || !support::require_tool("htpasswd") {
        return;
    }
    let registry = Registry::start(Auth::Basic {
        user: "zest".into(),
        pass: "s3cret".into(),
    });
    let dir = tempfile::tempdir().unwrap();
    let Some(source) = source_image(&dir.path().join("oci")) else {
        return;
    };
    let mut config = registry.client_config();
    config.docker_config = DockerConfigSource::Path(registry.write_docker_config("zest", "s3cret"));
    let client = RegistryClient::new(config).unwrap();
    let src = ImageStore::open(
        &format!("oci:{}:src", dir.path().join("oci").display())
            .parse()
            .unwrap(),
        &client,
    )
    .unwrap();
    let dst_ref: Reference = format!("{}/private/busybox:chunked", registry.host())
        .parse()
        .unwrap();
    let dst = ImageStore::open(&ImageRef::Registry(dst_ref.clone()), &client).unwrap();
    convert(
        &src,
        &dst,
        &options(dir.path(), PlatformChoice::One(Platform::host())),
        Arc::new(NoProgress),
    )
    .await
    .expect("convert with credentials");
    check_converted(&registry, &client, &dst_ref, &source).await;

    // Wrong credentials: a clear error, no panic.
    let mut bad = registry.client_config();
    bad.docker_config = DockerConfigSource::Path(support::write_docker_config(
        &dir.path().join("bad"),
        &registry.host(),
        "zest",
        "wrong",
    ));
    let bad_client = RegistryClient::new(bad).unwrap();
    let dst = ImageStore::open(&ImageRef::Registry(dst_ref.clone()), &bad_client).unwrap();
    let err = convert(
        &src,
        &dst,
        &options(dir.path(), PlatformChoice::One(Platform::host())),
        Arc::new(NoProgress),
    )
    .await
    .expect_err("wrong password must fail");
    let msg = format!("{err}");
    assert!(
        msg.contains("401")
            || msg.to_lowercase().contains("auth")
            || msg.to_lowercase().contains("credential"),
        "{msg}"
    );
}

/// The binary as a user runs it: convert, then inspect with --json.
#[test]
fn cli_converts_and_inspects() {
    if !support::require_tool(REGISTRY_BIN) {
        return;
    }
    let registry = Registry::start(Auth::None);
    let dir = tempfile::tempdir().unwrap();
    if source_image(&dir.path().join("oci")).is_none() {
        return;
    }
    let zest = env!("CARGO_BIN_EXE_zest");
    let target = format!("{}/cli/busybox:chunked", registry.host());
    let out = Command::new(zest)
        .args([
            "convert",
            "--quiet",
            "--plain-http-host",
            &registry.host(),
            "--hosts-dir",
            "/nonexistent",
        ])
        .arg(format!("oci:{}:src", dir.path().join("oci").display()))
        .arg(&target)
        .output()
        .expect("run zest convert");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "zest convert failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("2 converted"), "{stdout}");

    let out = Command::new(zest)
        .args([
            "inspect",
            "--json",
            "--toc",
            "--plain-http-host",
            &registry.host(),
            "--hosts-dir",
            "/nonexistent",
            &target,
        ])
        .output()
        .expect("run zest inspect");
    assert!(
        out.status.success(),
        "zest inspect failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("inspect --json output");
    let layers = report["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 2);
    for layer in layers {
        assert_eq!(layer["format"], "zstd:chunked");
        assert_eq!(layer["toc"]["authenticated"], true);
    }
    let busybox = layers[0]["toc"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["path"] == "bin/busybox")
        .expect("bin/busybox listed");
    assert_eq!(busybox["kind"], "reg");
    assert!(
        busybox["chunks"].as_u64().unwrap() > 1,
        "a 2 MB binary is split into chunks"
    );

    // A missing image: a clear error naming it, exit code 1.
    let out = Command::new(zest)
        .args([
            "inspect",
            "--plain-http-host",
            &registry.host(),
            "--hosts-dir",
            "/nonexistent",
        ])
        .arg(format!("{}/cli/missing:tag", registry.host()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cli/missing"), "{stderr}");
}

/// Interop: an image written by `zest convert` is pulled and run by containerd's
/// ordinary path (its own overlayfs snapshotter, no zest involved), so converted
/// images stay valid for every runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converted_image_runs_through_containerds_ordinary_pull() {
    use support::containerd::{require_tools, Containerd, TestDir};
    if !support::require_tool(REGISTRY_BIN) || !require_tools(&["containerd", "ctr", "runc"]) {
        return;
    }
    let registry = Registry::start(Auth::None);
    let dir = TestDir::new().unwrap();
    let Some(_) = source_image(&dir.path().join("oci")) else {
        return;
    };
    let image = format!("{}/interop/busybox:chunked", registry.host());
    support::convert_image(
        &registry.client(),
        &format!("oci:{}:src", dir.path().join("oci").display()),
        &image,
        dir.path(),
        PlatformChoice::One(Platform::host()),
    )
    .await
    .expect("convert");

    let containerd = Containerd::start(dir.path(), &dir.path().join("unused-zest.sock"))
        .await
        .expect("start containerd");
    containerd
        .ctr_ok(&["images", "pull", "--plain-http", &image])
        .await
        .expect("ctr images pull of a zest-converted image");
    let out = containerd
        .ctr_ok(&[
            "run",
            "--rm",
            &image,
            "zest-interop",
            "/bin/sh",
            "-c",
            "cat /data/hello.txt; sha256sum /data/random.bin",
        ])
        .await
        .expect("ctr run");
    assert!(out.contains("hello from zest"), "{out}");
    let random = support::pseudo_random(1 << 20, 1);
    assert!(
        out.contains(&Digest::of(&random).hex()),
        "file bytes inside the container: {out}"
    );
}
