//! zstd:chunked as the current containers toolchain writes it (skopeo 1.22 from
//! Debian's newer suite, see `scripts/newer-debian`): the new generation, with the
//! 64-byte footer, the tar-split frame and the `io.github.containers.zstd-chunked.*`
//! annotations. A layer with every kind of entry a real image has (hard links,
//! symlinks, names longer than ustar allows, xattrs, empty and zero-filled files, a
//! FIFO, setuid and unusual owners and modes), archived by GNU tar and compressed by
//! skopeo, must mount through zest as exactly the tree GNU tar extracts from the same
//! blob; and the image must pull lazily and run.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::containerd::{
    fail, lazy_provider, require_containerd, require_tools, run_ok, Containerd, ContainerdVersion,
    TestCache, TestDir, TestResult, ZestService,
};
use support::image::{build_image, busybox_layer_tar};
use support::tree::{build_tree, describe, tar_tree};
use support::{Auth, Registry};
use zest_api::labels::{LABEL_LAYER_DIGEST, LABEL_REMOTE};
use zest_format::{parse_footer, Generation, TocLocation};
use zest_oci::digest::Digest;
use zest_oci::{ImageManifest, LayerCompression, Platform, Reference};

/// The newer skopeo `scripts/newer-debian` extracts.
fn newer_skopeo() -> PathBuf {
    std::env::var_os("ZEST_NEWER_DEBIAN_DIR")
        .map_or_else(
            || PathBuf::from("/var/cache/zest/newer-debian"),
            PathBuf::from,
        )
        .join("skopeo/bin/skopeo")
}

/// `zest mount --layer` as a process, killed (by pid) if the test ends early.
struct MountProcess(Option<Child>);

impl Drop for MountProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_new_generation_layer_mounts_as_gnu_tar_extracts_it() -> TestResult {
    let skopeo = newer_skopeo();
    if !support::require_root_and_fuse()
        || !require_tools(&["docker-registry", "tar", "busybox"])
        || !(skopeo.is_file()
            || support::unavailable(
                &format!("the newer skopeo is missing ({})", skopeo.display()),
                "run scripts/install-deps (scripts/newer-debian extracts it)",
            ))
    {
        return Ok(());
    }
    let version = ContainerdVersion::V2;
    let run_containers = require_containerd(version);
    let Some(base) = busybox_layer_tar() else {
        return Ok(());
    };
    let dir = TestDir::new()?;
    let registry = tokio::task::spawn_blocking(|| Registry::start(Auth::None)).await?;
    let limit = Duration::from_secs(180);

    // The layer: GNU tar (POSIX format, for long names and xattrs) of the tree.
    let src = dir.path().join("src");
    build_tree(&src)?;
    let layer_tar = dir.path().join("layer.tar");
    tar_tree(&src, &layer_tar, limit).await?;
    let layout = dir.path().join("oci");
    build_image(
        &layout,
        "src",
        vec![base, std::fs::read(&layer_tar)?],
        LayerCompression::Gzip,
        &Platform::host(),
        &["/bin/sh"],
    );

    // skopeo recompresses it to zstd:chunked on the way to the registry.
    let image = format!("{}/third-party/skopeo122:chunked", registry.host());
    run_ok(
        &skopeo.display().to_string(),
        &[
            "--insecure-policy",
            "copy",
            "--dest-compress-format",
            "zstd:chunked",
            "--dest-force-compress-format",
            "--dest-tls-verify=false",
            &format!("oci:{}:src", layout.display()),
            &format!("docker://{image}"),
        ],
        limit,
    )
    .await?;
    let client = registry.client();
    let reference: Reference = image.parse()?;
    let manifest = ImageManifest::from_json(&client.get_manifest(&reference).await?.bytes)?;
    assert_eq!(manifest.layers.len(), 2);

    // What the writer wrote agrees with what zest-format reads: new-generation
    // annotations with a TOC digest and a tar-split, a 64-byte footer at the same
    // positions, and the annotation's digest is the TOC's.
    for layer in &manifest.layers {
        let annotations = layer
            .annotations
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>();
        assert!(
            layer
                .annotations
                .keys()
                .any(|k| k.starts_with("io.github.containers.zstd-chunked.")),
            "{annotations:?}"
        );
        let location = TocLocation::from_annotations(&layer.annotations)?
            .ok_or_else(|| fail(format!("no zstd:chunked annotations: {annotations:?}")))?;
        assert_eq!(location.generation, Generation::New);
        assert!(location.tar_split.is_some(), "{annotations:?}");
        let blob = client
            .get_blob_bytes(&reference.repository, &layer.digest, 64 << 20)
            .await?;
        let footer = parse_footer(&blob[blob.len() - 64..], blob.len() as u64)?;
        assert_eq!(footer.generation, Generation::New);
        assert_eq!(footer.toc, location.toc);
        assert_eq!(footer.tar_split, location.tar_split);
        assert_eq!(
            location.toc_digest,
            Some(Digest::of(
                &blob[location.toc.range().start as usize..location.toc.range().end as usize]
            ))
        );
        let index = zest_format::LayerIndex::decode(
            &blob[location.toc.range().start as usize..location.toc.range().end as usize],
            &location,
            blob.len() as u64,
        )?;
        assert!(index.tar_split_digest().is_some());
    }

    // GNU tar's extraction of the pushed layer blob (a plain zstd decode).
    let data_layer = &manifest.layers[1];
    let blob = client
        .get_blob_bytes(&reference.repository, &data_layer.digest, 64 << 20)
        .await?;
    let plain = zstd::decode_all(&blob[..])?;
    let pushed_tar = dir.path().join("pushed.tar");
    std::fs::write(&pushed_tar, &plain)?;
    let extracted = dir.path().join("extracted");
    std::fs::create_dir(&extracted)?;
    run_ok(
        "tar",
        &[
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "--same-owner",
            "-xpf",
            &pushed_tar.display().to_string(),
            "-C",
            &extracted.display().to_string(),
        ],
        limit,
    )
    .await?;

    // Its tar-split (the digest the TOC names) rebuilds the exact tar from the files'
    // contents, as containers-storage would: zest-format reads the writer's tar-split.
    let location = TocLocation::from_annotations(&data_layer.annotations)?
        .ok_or_else(|| fail("no zstd:chunked annotations"))?;
    let toc = &blob[location.toc.range().start as usize..location.toc.range().end as usize];
    let index = zest_format::LayerIndex::decode(toc, &location, blob.len() as u64)?;
    let split_extent = location
        .tar_split
        .ok_or_else(|| fail("no tar-split position"))?;
    let split_range = split_extent.range();
    let split_compressed = &blob[split_range.start as usize..split_range.end as usize];
    assert_eq!(index.tar_split_digest(), Some(Digest::of(split_compressed)));
    let split = zest_format::tarsplit::decompress(split_compressed, &split_extent)?;
    let mut rebuilt = Vec::new();
    zest_format::tarsplit::reassemble(
        &split,
        |name, _size, out| {
            let path = extracted.join(String::from_utf8_lossy(name).as_ref());
            let bytes = std::fs::read(&path).map_err(|e| zest_format::FormatError::Io {
                context: "reading an extracted file",
                source: e,
            })?;
            out.write_all(&bytes)
                .map_err(|e| zest_format::FormatError::Io {
                    context: "rebuilding the tar",
                    source: e,
                })
        },
        &mut rebuilt,
    )?;
    assert!(
        rebuilt == plain,
        "the tar rebuilt from the tar-split differs"
    );

    // The same layer mounted by zest (one raw layer, no overlay).
    let target = dir.path().join("mnt");
    std::fs::create_dir(&target)?;
    let mut mount = MountProcess(Some(
        Command::new(env!("CARGO_BIN_EXE_zest"))
            .args(["mount", "--plain-http-host", &registry.host()])
            .args(["--hosts-dir", "/nonexistent", "--layer", "1", "--cache-dir"])
            .arg(dir.path().join("cache"))
            .arg(&image)
            .arg(&target)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?,
    ));
    let started = Instant::now();
    while !zest_mount::is_mount_point(&target).unwrap_or(false) {
        if let Some(child) = mount.0.as_mut() {
            if let Some(status) = child.try_wait()? {
                let out = mount.0.take().map(Child::wait_with_output).transpose()?;
                return Err(fail(format!(
                    "zest mount exited with {status}: {}",
                    out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                        .unwrap_or_default()
                )));
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            return Err(fail("zest mount did not mount within 30 s"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let want = describe(&extracted)?;
    let got = tokio::task::spawn_blocking({
        let target = target.clone();
        move || describe(&target).map_err(|e| e.to_string())
    })
    .await?
    .map_err(fail)?;
    let tree = Path::new("tree");
    assert!(want.contains_key(&tree.join("fifo")), "{:?}", want.keys());
    assert!(!want[&tree.join("data.bin")].links.is_empty());
    assert_eq!(want[&tree.join("data.bin")].xattrs.len(), 2);
    eprintln!(
        "comparing {} entries of the mounted layer with GNU tar's extraction",
        want.len()
    );
    for (path, entry) in &want {
        assert_eq!(got.get(path), Some(entry), "{}", path.display());
    }
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    // SAFETY: plain kill(2) of the child we started.
    if let Some(child) = mount.0.as_ref() {
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    }
    if let Some(child) = mount.0.take() {
        let out = child.wait_with_output()?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // A lazy pull through containerd 2.x's own pull, and a container from it. The
    // test itself downloaded the blobs above: count only what comes after.
    if !run_containers {
        return Ok(());
    }
    let full_gets =
        |digest: &Digest| registry.count_requests("GET", &format!("/blobs/{digest}"), Some(200));
    let before: Vec<usize> = manifest
        .layers
        .iter()
        .map(|l| full_gets(&l.digest))
        .collect();
    let service = ZestService::start(
        dir.path(),
        lazy_provider(&registry, &dir.path().join("lazy"), TestCache::Memory).await?,
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
    for layer in &manifest.layers {
        let digest = layer.digest.to_string();
        assert!(
            snapshots.iter().any(|s| s.labels.contains_key(LABEL_REMOTE)
                && s.labels.get(LABEL_LAYER_DIGEST) == Some(&digest)),
            "layer {digest} was not mounted lazily: {snapshots:#?}"
        );
    }
    let script = format!(
        "sha256sum /tree/data.bin /tree/sparse.img && stat -c '%a %u %g' /tree/private /tree/setuid && cat /tree/{}/{}/{}/link-to-long",
        "a".repeat(60),
        "b".repeat(60),
        "c".repeat(60)
    );
    let out = containerd
        .run_on_zest(
            &image,
            "new-generation-check",
            &["/bin/busybox", "sh", "-c", &script],
        )
        .await?;
    let data = std::fs::read(src.join("tree/data.bin"))?;
    let sparse = std::fs::read(src.join("tree/sparse.img"))?;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            format!("{}  /tree/data.bin", Digest::of(&data).hex()),
            format!("{}  /tree/sparse.img", Digest::of(&sparse).hex()),
            "750 1000 1001".to_owned(),
            "4755 0 0".to_owned(),
            "a long way down".to_owned(),
        ],
        "{out}"
    );
    for (layer, before) in manifest.layers.iter().zip(before) {
        assert_eq!(
            full_gets(&layer.digest),
            before,
            "layer {} was downloaded in full",
            layer.digest
        );
    }
    drop(containerd);
    service.stop().await
}
