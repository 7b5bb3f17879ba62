//! Registry client against a real Distribution registry on 127.0.0.1 (push, pull,
//! ranges, manifests, indexes, mounts, Basic auth, hosts.toml mirrors), and against a
//! scripted loopback HTTP server for misbehaviour (truncation, wrong ranges, retries,
//! bearer tokens, wrong digests).

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use support::fake_http::{Body, FakeServer, Request, Response};
use support::image::{build_image, data_layer_tar, push_image};
use support::{pseudo_random, require_tool, test_client_config, Auth, Registry, REGISTRY_BIN};
use zest_oci::digest::Digest;
use zest_oci::{
    media_type, Descriptor, ImageConfig, ImageIndex, LayerCompression, Platform, Reference,
    Repository,
};
use zest_registry::{
    Credential, DockerConfigSource, DockerCredentials, PlainHttp, PushOutcome, RegistryClient,
    RegistryError, UploadBody,
};

fn start_registry(auth: Auth) -> Option<Registry> {
    if !require_tool(REGISTRY_BIN) {
        return None;
    }
    if matches!(auth, Auth::Basic { .. }) && !require_tool("htpasswd") {
        return None;
    }
    Some(Registry::start(auth))
}

fn repo(host: &str, name: &str) -> Repository {
    Repository::new(host, name).expect("valid repository")
}

#[tokio::test]
async fn blobs_push_monolithic_and_chunked_then_read_back() {
    let Some(reg) = start_registry(Auth::None) else {
        return;
    };
    let mut cfg = reg.client_config();
    cfg.chunked_upload_threshold = 1 << 20;
    cfg.upload_chunk_size = 256 << 10;
    let client = RegistryClient::new(cfg).unwrap();
    let repo = repo(&reg.host(), "test/blobs");

    // Monolithic from memory; a second push finds it present.
    let small = Bytes::from(pseudo_random(100_000, 1));
    let d_small = client.push_blob_bytes(&repo, small.clone()).await.unwrap();
    assert_eq!(d_small, Digest::of(&small));
    assert_eq!(
        client
            .push_blob(&repo, &d_small, UploadBody::Bytes(small.clone()), None)
            .await
            .unwrap(),
        PushOutcome::AlreadyPresent
    );
    assert_eq!(reg.count_requests("PATCH", "/blobs/uploads/", None), 0);

    // Chunked, streamed from a file: 3 MiB + 17 bytes in 256 KiB chunks = 13 PATCHes.
    let tmp = tempfile::tempdir().unwrap();
    let big = pseudo_random(3 * (1 << 20) + 17, 2);
    let big_path = tmp.path().join("big.bin");
    std::fs::write(&big_path, &big).unwrap();
    let d_big = Digest::of(&big);
    assert_eq!(
        client
            .push_blob(&repo, &d_big, UploadBody::File(big_path), None)
            .await
            .unwrap(),
        PushOutcome::Uploaded
    );
    assert_eq!(
        reg.count_requests("PATCH", "/v2/test/blobs/blobs/uploads/", Some(202)),
        13
    );
    assert_eq!(
        reg.count_requests("PUT", "/v2/test/blobs/blobs/uploads/", Some(201)),
        2
    );

    // HEAD.
    assert_eq!(
        client.blob_exists(&repo, &d_big).await.unwrap(),
        Some(big.len() as u64)
    );
    assert_eq!(client.blob_size(&repo, &d_small).await.unwrap(), 100_000);

    // Whole-blob reads, verified.
    assert_eq!(
        client
            .get_blob_bytes(&repo, &d_small, 1 << 20)
            .await
            .unwrap(),
        small
    );
    let err = client
        .get_blob_bytes(&repo, &d_big, 1 << 20)
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::TooLarge { limit, .. } if limit == 1 << 20),
        "{err}"
    );
    let out = tmp.path().join("out").join("big.copy");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    assert_eq!(
        client.get_blob_to_file(&repo, &d_big, &out).await.unwrap(),
        big.len() as u64
    );
    assert_eq!(std::fs::read(&out).unwrap(), big);
    assert_eq!(
        std::fs::read_dir(out.parent().unwrap()).unwrap().count(),
        1,
        "temporary file left behind"
    );
    let mut sink = Vec::new();
    client
        .get_blob_to_writer(&repo, &d_big, &mut sink)
        .await
        .unwrap();
    assert_eq!(sink, big);

    // A missing blob is a clear 404.
    let missing = Digest::of(b"not pushed");
    assert_eq!(client.blob_exists(&repo, &missing).await.unwrap(), None);
    let err = client.blob_size(&repo, &missing).await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
    let err = client
        .get_blob_bytes(&repo, &missing, 100)
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&reg.host()) && msg.contains("test/blobs") && msg.contains("BLOB_UNKNOWN"),
        "{msg}"
    );

    let stats = client.stats();
    assert!(
        stats.upload_bytes >= (small.len() + big.len()) as u64,
        "{stats:?}"
    );
    assert!(
        stats.blob_bytes >= (small.len() + 2 * big.len()) as u64,
        "{stats:?}"
    );
    assert_eq!(stats.range_requests, 0);
}

#[tokio::test]
async fn range_reads_return_exact_bytes() {
    let Some(reg) = start_registry(Auth::None) else {
        return;
    };
    let client = reg.client();
    let repo = repo(&reg.host(), "test/ranges");
    let data = pseudo_random((1 << 20) + 3, 3);
    let len = data.len() as u64;
    let d = client
        .push_blob_bytes(&repo, Bytes::from(data.clone()))
        .await
        .unwrap();

    let cases = [
        0..1,
        len - 1..len,
        1000..5000,
        0..len,
        12_345..12_346,
        65_536..196_608,
    ];
    for r in &cases {
        let got = client.get_range(&repo, &d, r.clone()).await.unwrap();
        assert_eq!(
            &got[..],
            &data[r.start as usize..r.end as usize],
            "range {r:?}"
        );
    }
    assert_eq!(reg.range_gets(&d.to_string()), cases.len());
    let stats = client.stats();
    assert_eq!(stats.range_requests, cases.len() as u64);
    assert_eq!(
        stats.range_bytes,
        cases.iter().map(|r| r.end - r.start).sum::<u64>()
    );

    // Past the end, partly or wholly: an error naming the blob size.
    for r in [len - 1..len + 10, len..len + 1, len + 100..len + 200] {
        let err = client.get_range(&repo, &d, r.clone()).await.unwrap_err();
        match &err {
            RegistryError::RangeNotSatisfiable { blob_size, .. } => {
                assert_eq!(*blob_size, Some(len), "{r:?}")
            }
            other => panic!("range {r:?}: expected RangeNotSatisfiable, got {other}"),
        }
    }
    // Empty ranges are a caller error, not a request.
    let before = client.stats().range_requests;
    assert!(matches!(
        client.get_range(&repo, &d, 5..5).await,
        Err(RegistryError::InvalidArgument(_))
    ));
    assert_eq!(client.stats().range_requests, before);
    // Unknown blob.
    let err = client
        .get_range(&repo, &Digest::of(b"x"), 0..1)
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");
}

#[tokio::test]
async fn manifests_by_tag_and_digest_and_platform_selection() {
    let Some(reg) = start_registry(Auth::None) else {
        return;
    };
    let client = reg.client();
    let tmp = tempfile::tempdir().unwrap();
    let amd64: Platform = "linux/amd64".parse().unwrap();
    let arm64: Platform = "linux/arm64/v8".parse().unwrap();
    let img_amd = build_image(
        &tmp.path().join("amd"),
        "v1",
        vec![data_layer_tar(1)],
        LayerCompression::Gzip,
        &amd64,
        &["/bin/sh"],
    );
    let img_arm = build_image(
        &tmp.path().join("arm"),
        "v1",
        vec![data_layer_tar(2)],
        LayerCompression::Gzip,
        &arm64,
        &["/bin/sh"],
    );

    let tagged: Reference = format!("{}/test/app:amd", reg.host()).parse().unwrap();
    let d_amd = push_image(&client, &img_amd, &tagged).await;
    assert_eq!(d_amd, Digest::of(&img_amd.manifest));
    // Pushed by digest, without tag.
    let d_arm = Digest::of(&img_arm.manifest);
    assert_eq!(
        push_image(&client, &img_arm, &tagged.with_digest(d_arm)).await,
        d_arm
    );

    for r in [tagged.clone(), tagged.with_digest(d_amd)] {
        let m = client.get_manifest(&r).await.unwrap();
        assert_eq!(m.bytes, img_amd.manifest);
        assert_eq!(m.digest, d_amd);
        assert_eq!(m.media_type, media_type::OCI_MANIFEST);
    }

    // The config round-trips and its diff_ids match the layers.
    let resolved = client.resolve_image(&tagged, &amd64).await.unwrap();
    assert!(resolved.index.is_none());
    let cfg_bytes = client
        .get_blob_bytes(&tagged.repository, &resolved.image.config.digest, 1 << 20)
        .await
        .unwrap();
    let cfg = ImageConfig::from_json(&cfg_bytes).unwrap();
    assert_eq!(cfg.diff_ids().unwrap(), vec![img_amd.layers[0].diff_id]);
    assert_eq!(cfg.entrypoint().unwrap(), Some(vec!["/bin/sh".to_string()]));

    // A multi-platform index.
    let mut index = ImageIndex::new();
    for (img, p) in [(&img_amd, &amd64), (&img_arm, &arm64)] {
        let mut desc = Descriptor::for_bytes(media_type::OCI_MANIFEST, &img.manifest);
        desc.platform = Some(p.clone());
        index.manifests.push(desc);
    }
    let index_bytes = Bytes::from(index.to_json());
    let repo = &tagged.repository;
    let d_index = client
        .push_manifest(repo, "multi", media_type::OCI_INDEX, index_bytes.clone())
        .await
        .unwrap();
    let multi = tagged.with_tag("multi").unwrap();
    let r = client.resolve_image(&multi, &amd64).await.unwrap();
    assert_eq!(r.index.as_ref().map(|i| i.digest), Some(d_index));
    assert_eq!(
        r.index.as_ref().map(|i| i.media_type.as_str()),
        Some(media_type::OCI_INDEX)
    );
    assert_eq!(r.manifest.digest, d_amd);
    assert_eq!(
        r.image.layers[0].digest,
        img_amd.layers[0].descriptor.digest
    );
    let r = client
        .resolve_image(&multi, &"linux/arm64".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(r.manifest.digest, d_arm);
    let err = client
        .resolve_image(&multi, &"linux/s390x".parse().unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::PlatformNotFound { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("linux/amd64") && err.to_string().contains("linux/arm64/v8"),
        "{err}"
    );

    // Unknown tag; a push by a digest that does not match; a bad tag.
    let err = client
        .get_manifest(&tagged.with_tag("nope").unwrap())
        .await
        .unwrap_err();
    assert!(
        err.is_not_found() && err.to_string().contains("MANIFEST_UNKNOWN"),
        "{err}"
    );
    let wrong = Digest::of(b"other").to_string();
    assert!(matches!(
        client
            .push_manifest(repo, &wrong, media_type::OCI_INDEX, index_bytes.clone())
            .await,
        Err(RegistryError::InvalidArgument(_))
    ));
    assert!(matches!(
        client
            .push_manifest(repo, "bad/tag", media_type::OCI_INDEX, index_bytes)
            .await,
        Err(RegistryError::InvalidArgument(_))
    ));
}

#[tokio::test]
async fn cross_repository_mount_and_fallback_upload() {
    let Some(reg) = start_registry(Auth::None) else {
        return;
    };
    let client = reg.client();
    let a = repo(&reg.host(), "test/source");
    let b = repo(&reg.host(), "test/target");
    let c = repo(&reg.host(), "test/empty");
    let data = Bytes::from(pseudo_random(50_000, 4));
    let d = client.push_blob_bytes(&a, data.clone()).await.unwrap();
    let uploads_before = client.stats().upload_bytes;

    let out = client
        .push_blob(&b, &d, UploadBody::Bytes(data.clone()), Some(&a))
        .await
        .unwrap();
    assert_eq!(out, PushOutcome::Mounted);
    assert_eq!(
        client.stats().upload_bytes,
        uploads_before,
        "a mount uploads nothing"
    );
    assert_eq!(
        client.blob_exists(&b, &d).await.unwrap(),
        Some(data.len() as u64)
    );
    assert_eq!(reg.count_requests("POST", "mount=", Some(201)), 1);

    // The source lacks the blob: the registry opens an upload instead (202).
    let data2 = Bytes::from(pseudo_random(10_000, 5));
    let d2 = Digest::of(&data2);
    let out = client
        .push_blob(&b, &d2, UploadBody::Bytes(data2.clone()), Some(&c))
        .await
        .unwrap();
    assert_eq!(out, PushOutcome::Uploaded);
    assert_eq!(
        client.get_blob_bytes(&b, &d2, 1 << 20).await.unwrap(),
        data2
    );

    let other = repo("elsewhere.example:5000", "x");
    assert!(matches!(
        client
            .push_blob(&b, &d2, UploadBody::Bytes(data2), Some(&other))
            .await,
        Err(RegistryError::InvalidArgument(_))
    ));
}

#[tokio::test]
async fn basic_auth_with_docker_config_credentials() {
    let Some(reg) = start_registry(Auth::Basic {
        user: "zest".into(),
        pass: "s3cret:pw".into(),
    }) else {
        return;
    };
    let repo = repo(&reg.host(), "private/app");
    let mut cfg = reg.client_config();
    cfg.docker_config = DockerConfigSource::Path(reg.write_docker_config("zest", "s3cret:pw"));
    let client = RegistryClient::new(cfg).unwrap();
    let data = Bytes::from(pseudo_random(70_000, 6));
    let d = client.push_blob_bytes(&repo, data.clone()).await.unwrap();
    assert_eq!(
        client.get_blob_bytes(&repo, &d, 1 << 20).await.unwrap(),
        data
    );
    assert_eq!(
        &client.get_range(&repo, &d, 10..20).await.unwrap()[..],
        &data[10..20]
    );
    client
        .push_manifest(
            &repo,
            "v1",
            media_type::OCI_INDEX,
            Bytes::from(ImageIndex::new().to_json()),
        )
        .await
        .unwrap();
    let m = client
        .get_manifest(&format!("{}/private/app:v1", reg.host()).parse().unwrap())
        .await
        .unwrap();
    assert_eq!(m.media_type, media_type::OCI_INDEX);

    // Wrong password: rejected, and the message says where the credentials came from.
    let tmp = tempfile::tempdir().unwrap();
    let bad_path = support::write_docker_config(tmp.path(), &reg.host(), "zest", "wrong");
    let mut cfg = reg.client_config();
    cfg.docker_config = DockerConfigSource::Path(bad_path.clone());
    let bad = RegistryClient::new(cfg).unwrap();
    let err = bad.get_blob_bytes(&repo, &d, 1 << 20).await.unwrap_err();
    match &err {
        RegistryError::Unauthorized {
            status: 401, hint, ..
        } => {
            assert!(
                hint.contains("rejected") && hint.contains(&bad_path.display().to_string()),
                "{err}"
            )
        }
        other => panic!("expected Unauthorized, got {other}"),
    }

    // No credentials at all: the message says how to add them.
    let anon = reg.client();
    let err = anon.get_range(&repo, &d, 0..1).await.unwrap_err();
    assert!(
        matches!(err, RegistryError::Unauthorized { status: 401, .. })
            && err.to_string().contains("requires credentials"),
        "{err}"
    );
}

#[tokio::test]
async fn https_to_a_plain_http_registry_suggests_plain_http() {
    let Some(reg) = start_registry(Auth::None) else {
        return;
    };
    let client = RegistryClient::new(test_client_config(PlainHttp::Never)).unwrap();
    let err = client
        .blob_exists(&repo(&reg.host(), "test/x"), &Digest::of(b"x"))
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Connect { .. }), "{err}");
    assert!(err.to_string().contains("--plain-http"), "{err}");
}

#[tokio::test]
async fn hosts_toml_mirror_is_tried_first_and_falls_back() {
    let Some(upstream) = start_registry(Auth::None) else {
        return;
    };
    let mirror = Registry::start(Auth::None);
    let hosts = tempfile::tempdir().unwrap();
    let dir = hosts.path().join(upstream.host());
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("hosts.toml"),
        format!(
            "server = \"http://{}\"\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            upstream.host(),
            mirror.host()
        ),
    )
    .unwrap();
    let mut cfg = test_client_config(PlainHttp::Never);
    cfg.hosts_dir = Some(hosts.path().to_path_buf());
    let client = RegistryClient::new(cfg).unwrap();
    let repo = repo(&upstream.host(), "test/mirrored");
    let data = Bytes::from(pseudo_random(20_000, 7));

    // Pushes skip the pull-only mirror.
    let d = client.push_blob_bytes(&repo, data.clone()).await.unwrap();
    assert_eq!(mirror.count_requests("POST", "/blobs/uploads/", None), 0);
    assert_eq!(
        upstream.count_requests("POST", "/blobs/uploads/", Some(202)),
        1
    );

    // Pulls ask the mirror first (404 there), then the upstream.
    assert_eq!(
        &client.get_range(&repo, &d, 0..10).await.unwrap()[..],
        &data[..10]
    );
    assert_eq!(
        mirror.count_requests("GET", &format!("/blobs/{d}?ns=127.0.0.1"), Some(404)),
        1
    );
    assert_eq!(upstream.range_gets(&d.to_string()), 1);

    // Once the mirror has it, the upstream is not asked again.
    let mirror_repo = Repository::new(&mirror.host(), "test/mirrored").unwrap();
    mirror
        .client()
        .push_blob_bytes(&mirror_repo, data.clone())
        .await
        .unwrap();
    assert_eq!(
        &client.get_range(&repo, &d, 5..15).await.unwrap()[..],
        &data[5..15]
    );
    assert_eq!(mirror.range_gets(&d.to_string()), 1);
    assert_eq!(upstream.range_gets(&d.to_string()), 1);
}

// ---- Misbehaving peers (scripted loopback server) ----

fn fake_client(server: &FakeServer) -> RegistryClient {
    RegistryClient::new(test_client_config(PlainHttp::Hosts(vec![server.host()]))).unwrap()
}

/// A client of `server` holding `credential` for it.
fn fake_client_with(server: &FakeServer, credential: Credential) -> RegistryClient {
    let mut creds = DockerCredentials::empty();
    creds.insert(&server.host(), credential);
    RegistryClient::with_credentials(
        test_client_config(PlainHttp::Hosts(vec![server.host()])),
        creds,
    )
    .unwrap()
}

fn fake_repo(server: &FakeServer) -> Repository {
    repo(&server.host(), "test/app")
}

fn requested_range(req: &Request) -> Option<(u64, u64)> {
    let v = req.header("range")?.strip_prefix("bytes=")?;
    let (a, b) = v.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

#[tokio::test]
async fn range_answered_with_whole_blob_reads_only_what_is_needed() {
    let chunk: Vec<u8> = pseudo_random(65_536, 8);
    let total: u64 = 256 << 20;
    let c2 = chunk.clone();
    let server = FakeServer::start(move |_req| Response {
        status: 200,
        headers: vec![],
        body: Body::Repeat {
            chunk: c2.clone(),
            total,
        },
        content_length: None,
        truncate_at: None,
        delay: None,
    })
    .await;
    let client = fake_client(&server);
    let d = Digest::of(b"irrelevant: the server ignores it");
    let got = client
        .get_range(&fake_repo(&server), &d, 0..100)
        .await
        .unwrap();
    assert_eq!(&got[..], &chunk[..100]);
    let got = client
        .get_range(&fake_repo(&server), &d, 70_000..70_100)
        .await
        .unwrap();
    assert_eq!(&got[..], &chunk[70_000 - 65_536..70_100 - 65_536]);
    // Only the needed prefix was read, not the 256 MiB.
    let read = client.stats().range_bytes;
    assert!(read < 8 << 20, "read {read} bytes");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent = server.body_bytes_written.load(Ordering::Relaxed);
    assert!(sent < 128 << 20, "server managed to send {sent} bytes");

    // A whole-blob answer that is shorter than the range's end.
    let short = FakeServer::start(|_req| Response::new(200).body(vec![7u8; 50])).await;
    let err = fake_client(&short)
        .get_range(&fake_repo(&short), &d, 40..60)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            RegistryError::RangeNotSatisfiable {
                blob_size: Some(50),
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn truncated_range_body_is_an_error_after_retries() {
    let data = pseudo_random(1000, 9);
    let server = FakeServer::start(move |req| {
        let (a, b) = requested_range(req).expect("a range request");
        let body = data[a as usize..=b as usize].to_vec();
        let n = body.len() as u64;
        let mut r = Response::new(206)
            .header("Content-Range", &format!("bytes {a}-{b}/1000"))
            .body(body);
        r.truncate_at = Some(n / 2);
        r
    })
    .await;
    let client = fake_client(&server);
    let err = client
        .get_range(&fake_repo(&server), &Digest::of(b"blob"), 100..300)
        .await
        .unwrap_err();
    match &err {
        RegistryError::Truncated {
            got,
            expected,
            range,
            ..
        } => {
            assert_eq!(
                (*got, *expected, range.clone()),
                (100, 200, 100..300),
                "{err}"
            )
        }
        other => panic!("expected Truncated, got {other}"),
    }
    assert_eq!(
        server.requests().len(),
        3,
        "one request per allowed attempt"
    );
    assert_eq!(client.stats().retries, 2);
}

#[tokio::test]
async fn wrong_content_range_or_length_is_rejected() {
    let server = FakeServer::start(|req| {
        let (a, b) = requested_range(req).expect("a range request");
        if a == 0 {
            // Answers a different range than asked.
            Response::new(206)
                .header("Content-Range", &format!("bytes {}-{}/100", a + 5, b + 5))
                .body(vec![1u8; (b - a + 1) as usize])
        } else {
            // Right range, but more bytes than asked.
            Response::new(206)
                .header("Content-Range", &format!("bytes {a}-{b}/100"))
                .body(vec![1u8; (b - a + 11) as usize])
        }
    })
    .await;
    let client = fake_client(&server);
    let repo = fake_repo(&server);
    let d = Digest::of(b"blob");
    for r in [0..10, 20..30] {
        let err = client.get_range(&repo, &d, r.clone()).await.unwrap_err();
        assert!(
            matches!(err, RegistryError::Protocol { .. }),
            "{r:?}: {err}"
        );
    }
    assert_eq!(
        server.requests().len(),
        2,
        "protocol violations are not retried"
    );
}

#[tokio::test]
async fn server_errors_are_retried_honouring_retry_after() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let server = FakeServer::start(move |req| {
        let i = n2.fetch_add(1, Ordering::SeqCst);
        let (a, b) = requested_range(req).expect("a range request");
        match (req.path_only().contains("/always-busy/"), i) {
            (true, _) => Response::error(503, "UNAVAILABLE", "maintenance"),
            (false, 0) => Response::error(500, "UNKNOWN", "transient"),
            (false, 1) => Response::new(429).header("Retry-After", "1"),
            (false, _) => Response::new(206)
                .header("Content-Range", &format!("bytes {a}-{b}/100"))
                .body(vec![b'x'; (b - a + 1) as usize]),
        }
    })
    .await;
    let client = fake_client(&server);
    let d = Digest::of(b"blob");
    let t0 = Instant::now();
    let got = client
        .get_range(&fake_repo(&server), &d, 0..10)
        .await
        .unwrap();
    assert_eq!(&got[..], b"xxxxxxxxxx");
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "Retry-After was not honoured"
    );
    assert_eq!(client.stats().retries, 2);

    let busy = repo(&server.host(), "always-busy/app");
    let err = client.get_range(&busy, &d, 0..10).await.unwrap_err();
    assert!(
        matches!(err, RegistryError::Status { status: 503, .. })
            && err.to_string().contains("UNAVAILABLE: maintenance"),
        "{err}"
    );
}

/// A registry that wants Bearer tokens from its own token service.
struct TokenRegistry {
    server: FakeServer,
    generation: Arc<AtomicUsize>,
    token_requests: Arc<Mutex<Vec<Request>>>,
}

async fn token_registry() -> TokenRegistry {
    let generation = Arc::new(AtomicUsize::new(1));
    let token_requests = Arc::new(Mutex::new(Vec::new()));
    let (g, tr) = (generation.clone(), token_requests.clone());
    let host = Arc::new(Mutex::new(String::new()));
    let h2 = host.clone();
    let server = FakeServer::start(move |req| {
        let gen = g.load(Ordering::SeqCst);
        if req.path_only() == "/token" && req.method == "POST" {
            // OAuth2 refresh-token grant (identity tokens).
            tr.lock().unwrap().push(req.clone());
            if req.form("grant_type") != ["refresh_token"] || req.form("refresh_token") != ["refresh-me"] {
                return Response::error(401, "DENIED", "bad refresh token");
            }
            let scopes = req.form("scope").join(" ");
            return Response::new(200)
                .header("Content-Type", "application/json")
                .body(format!(r#"{{"access_token":"tok-{gen}-{}","expires_in":300}}"#, scopes.replace(' ', "+")));
        }
        if req.path_only() == "/token" {
            tr.lock().unwrap().push(req.clone());
            let scopes = req.query("scope").join(" ");
            return Response::new(200)
                .header("Content-Type", "application/json")
                .body(format!(r#"{{"token":"tok-{gen}-{}","expires_in":300}}"#, scopes.replace(' ', "+")));
        }
        let name = req.path_only().split("/blobs/").next().unwrap_or("").trim_start_matches("/v2/").to_string();
        let want = format!("Bearer tok-{gen}-repository:{name}:pull");
        if req.header("authorization") != Some(want.as_str()) {
            let realm = format!("http://{}/token", h2.lock().unwrap());
            return Response::error(401, "UNAUTHORIZED", "authentication required").header(
                "WWW-Authenticate",
                &format!(r#"Bearer realm="{realm}",service="fake-registry",scope="repository:{name}:pull""#),
            );
        }
        let (a, b) = requested_range(req).unwrap_or((0, 9));
        Response::new(206)
            .header("Content-Range", &format!("bytes {a}-{b}/100"))
            .body(vec![b't'; (b - a + 1) as usize])
    })
    .await;
    *host.lock().unwrap() = server.host();
    TokenRegistry {
        server,
        generation,
        token_requests,
    }
}

#[tokio::test]
async fn bearer_token_flow_caches_and_refreshes() {
    let t = token_registry().await;
    let client = fake_client(&t.server);
    let repo = fake_repo(&t.server);
    let d = Digest::of(b"blob");

    // 401 → token → retry.
    assert_eq!(
        &client.get_range(&repo, &d, 0..4).await.unwrap()[..],
        b"tttt"
    );
    assert_eq!(t.server.requests().len(), 3);
    {
        let tr = t.token_requests.lock().unwrap();
        assert_eq!(tr.len(), 1);
        assert_eq!(tr[0].query("service"), vec!["fake-registry"]);
        assert_eq!(tr[0].query("scope"), vec!["repository:test/app:pull"]);
        assert_eq!(
            tr[0].header("authorization"),
            None,
            "anonymous token request"
        );
    }
    // Cached: one request.
    client.get_range(&repo, &d, 4..8).await.unwrap();
    assert_eq!(t.server.requests().len(), 4);

    // Another repository: the scheme is known, so the token is fetched up front.
    let other = repo_named(&t.server, "test/other");
    client.get_range(&other, &d, 0..1).await.unwrap();
    let reqs = t.server.requests();
    assert_eq!(reqs.len(), 6, "token + authorised request, no 401 first");
    assert!(reqs[4].path_only() == "/token" && reqs[5].header("authorization").is_some());

    // The registry stops accepting the old tokens: one 401, a new token, success.
    t.generation.store(2, Ordering::SeqCst);
    client.get_range(&repo, &d, 0..1).await.unwrap();
    assert_eq!(t.token_requests.lock().unwrap().len(), 3);
    assert_eq!(client.stats().auth_requests, 3);
}

fn repo_named(server: &FakeServer, name: &str) -> Repository {
    repo(&server.host(), name)
}

#[tokio::test]
async fn bearer_token_request_carries_basic_credentials() {
    let t = token_registry().await;
    let client = fake_client_with(
        &t.server,
        Credential::Basic {
            username: "alice".into(),
            password: "pw".into(),
        },
    );
    client
        .get_range(&fake_repo(&t.server), &Digest::of(b"b"), 0..2)
        .await
        .unwrap();
    let tr = t.token_requests.lock().unwrap();
    assert_eq!(tr[0].header("authorization"), Some("Basic YWxpY2U6cHc="));
}

#[tokio::test]
async fn wrong_content_is_never_returned() {
    let manifest = ImageIndex::new().to_json();
    let good = Digest::of(&manifest);
    let server = FakeServer::start(|req| {
        let p = req.path_only();
        if p.contains("/manifests/sha256:") {
            // Serves a different document than the digest asked for.
            Response::new(200)
                .header("Content-Type", media_type::OCI_INDEX)
                .body(r#"{"schemaVersion":2,"manifests":[],"annotations":{"evil":"yes"}}"#)
        } else if p.contains("/manifests/") {
            Response::new(200)
                .header("Content-Type", media_type::OCI_INDEX)
                .header(
                    "Docker-Content-Digest",
                    &Digest::of(b"announced").to_string(),
                )
                .body(ImageIndex::new().to_json())
        } else {
            Response::new(200).body(b"not the blob you asked for".to_vec())
        }
    })
    .await;
    let client = fake_client(&server);
    let repo = fake_repo(&server);
    let base: Reference = format!("{}/test/app:v1", server.host()).parse().unwrap();
    let err = client
        .get_manifest(&base.with_digest(good))
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::DigestMismatch { expected, .. } if expected == good),
        "{err}"
    );
    let err = client.get_manifest(&base).await.unwrap_err();
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");

    let d = Digest::of(b"the real blob");
    let err = client.get_blob_bytes(&repo, &d, 1 << 20).await.unwrap_err();
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("blob");
    assert!(client.get_blob_to_file(&repo, &d, &path).await.is_err());
    assert!(!path.exists());
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "temporary file left behind"
    );
}

#[tokio::test]
async fn blob_download_resumes_after_a_broken_transfer() {
    let data = pseudo_random(1 << 20, 10);
    let d = Digest::of(&data);
    let data2 = data.clone();
    let server = FakeServer::start(move |req| {
        let len = data2.len();
        match req.header("range") {
            None => {
                let mut r = Response::new(200).body(data2.clone());
                r.truncate_at = Some(300_000);
                r
            }
            Some(v) => {
                let start: usize = v
                    .trim_start_matches("bytes=")
                    .trim_end_matches('-')
                    .parse()
                    .unwrap();
                Response::new(206)
                    .header("Content-Range", &format!("bytes {start}-{}/{len}", len - 1))
                    .body(data2[start..].to_vec())
            }
        }
    })
    .await;
    let client = fake_client(&server);
    let got = client
        .get_blob_bytes(&fake_repo(&server), &d, 2 << 20)
        .await
        .unwrap();
    assert_eq!(&got[..], &data[..]);
    let reqs = server.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[1].header("range"), Some("bytes=300000-"));
    assert_eq!(client.stats().blob_bytes, data.len() as u64);

    // A server that ignores the resume Range and starts over: still correct.
    let data3 = data.clone();
    let n = Arc::new(AtomicUsize::new(0));
    let server = FakeServer::start(move |_req| {
        let mut r = Response::new(200).body(data3.clone());
        if n.fetch_add(1, Ordering::SeqCst) == 0 {
            r.truncate_at = Some(123_456);
        }
        r
    })
    .await;
    let client = fake_client(&server);
    let got = client
        .get_blob_bytes(&fake_repo(&server), &d, 2 << 20)
        .await
        .unwrap();
    assert_eq!(&got[..], &data[..]);
}

#[tokio::test]
async fn oversized_manifest_is_refused() {
    let server = FakeServer::start(|_req| {
        let mut r = Response::new(200).header("Content-Type", media_type::OCI_MANIFEST);
        r.body = Body::Repeat {
            chunk: vec![b' '; 4096],
            total: 5 << 20,
        };
        r
    })
    .await;
    let client = fake_client(&server);
    let r: Reference = format!("{}/test/app:big", server.host()).parse().unwrap();
    let err = client.get_manifest(&r).await.unwrap_err();
    assert!(matches!(err, RegistryError::TooLarge { .. }), "{err}");
}

#[tokio::test]
async fn failed_upload_is_restarted() {
    let stored = Arc::new(Mutex::new(None::<Vec<u8>>));
    let puts = Arc::new(AtomicUsize::new(0));
    let (s2, p2) = (stored.clone(), puts.clone());
    let server = FakeServer::start(move |req| match req.method.as_str() {
        "HEAD" => match &*s2.lock().unwrap() {
            Some(b) => Response::new(200).header("Content-Length", &b.len().to_string()),
            None => Response::error(404, "BLOB_UNKNOWN", "blob unknown"),
        },
        "POST" => {
            Response::new(202).header("Location", "/v2/test/app/blobs/uploads/session?_state=abc")
        }
        "PUT" => {
            if p2.fetch_add(1, Ordering::SeqCst) == 0 {
                return Response::error(500, "UNKNOWN", "disk hiccup");
            }
            assert_eq!(
                req.query("_state"),
                vec!["abc"],
                "the Location's query is kept"
            );
            let digest = req.query("digest").pop().expect("digest parameter");
            assert_eq!(digest, Digest::of(&req.body).to_string());
            *s2.lock().unwrap() = Some(req.body.clone());
            Response::new(201).header("Docker-Content-Digest", &digest)
        }
        _ => Response::new(400),
    })
    .await;
    let client = fake_client(&server);
    let data = Bytes::from(pseudo_random(5000, 11));
    client
        .push_blob_bytes(&fake_repo(&server), data.clone())
        .await
        .unwrap();
    assert_eq!(stored.lock().unwrap().as_deref(), Some(&data[..]));
    let methods: Vec<String> = server.requests().iter().map(|r| r.method.clone()).collect();
    assert_eq!(methods, ["HEAD", "POST", "PUT", "HEAD", "POST", "PUT"]);
}

#[tokio::test]
async fn parallel_requests_share_one_token_request() {
    let t = token_registry().await;
    let client = fake_client(&t.server);
    let repo = fake_repo(&t.server);
    let d = Digest::of(b"blob");
    // Cold: every request meets a 401, but only one asks the token service.
    let reads = (0..8u64).map(|i| client.get_range(&repo, &d, i..i + 1));
    for r in futures::future::join_all(reads).await {
        assert_eq!(&r.unwrap()[..], b"t");
    }
    assert_eq!(t.token_requests.lock().unwrap().len(), 1);
    // Warm scheme, new scope: again one token request for all.
    let other = repo_named(&t.server, "test/parallel");
    let reads = (0..8u64).map(|i| client.get_range(&other, &d, i..i + 1));
    for r in futures::future::join_all(reads).await {
        r.unwrap();
    }
    assert_eq!(t.token_requests.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn identity_token_is_exchanged_with_a_refresh_grant() {
    let t = token_registry().await;
    let client = fake_client_with(
        &t.server,
        Credential::IdentityToken {
            username: "<token>".into(),
            token: "refresh-me".into(),
        },
    );
    client
        .get_range(&fake_repo(&t.server), &Digest::of(b"b"), 0..2)
        .await
        .unwrap();
    {
        // Scoped: the server's handler needs this lock for later requests.
        let tr = t.token_requests.lock().unwrap();
        assert_eq!(tr.len(), 1);
        assert_eq!(tr[0].method, "POST");
        assert_eq!(tr[0].form("service"), vec!["fake-registry"]);
        assert_eq!(tr[0].form("scope"), vec!["repository:test/app:pull"]);
    }

    // A refresh token the service refuses gives an authentication error, not a loop.
    let client = fake_client_with(
        &t.server,
        Credential::IdentityToken {
            username: "<token>".into(),
            token: "stale".into(),
        },
    );
    let err = client
        .get_range(&fake_repo(&t.server), &Digest::of(b"b"), 0..2)
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::Auth { .. }) && err.to_string().contains("DENIED"),
        "{err}"
    );
}

#[tokio::test]
async fn slow_answers_time_out_and_are_retried() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let server = FakeServer::start(move |req| {
        let (a, b) = requested_range(req).expect("a range request");
        let mut r = Response::new(206)
            .header("Content-Range", &format!("bytes {a}-{b}/100"))
            .body(vec![b's'; (b - a + 1) as usize]);
        // The first answer, and every answer for the "stuck" repository, is late.
        if n2.fetch_add(1, Ordering::SeqCst) == 0 || req.path_only().contains("/stuck/") {
            r.delay = Some(Duration::from_secs(3));
        }
        r
    })
    .await;
    let mut cfg = test_client_config(PlainHttp::Hosts(vec![server.host()]));
    cfg.range_timeout = Duration::from_millis(300);
    let client = RegistryClient::new(cfg).unwrap();
    let d = Digest::of(b"blob");
    assert_eq!(
        &client
            .get_range(&fake_repo(&server), &d, 0..3)
            .await
            .unwrap()[..],
        b"sss"
    );
    assert_eq!(client.stats().retries, 1);
    let err = client
        .get_range(&repo_named(&server, "stuck/app"), &d, 0..3)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("stuck/app"), "{err}");
}

// ---- Interoperability with independent tools ----

fn run(cmd: &mut std::process::Command) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .expect("valid gzip");
    out
}

/// The test image helper writes layouts umoci unpacks, skopeo copies into a registry
/// as OCI and as Docker v2 images, and this client reads back; what this client
/// pushes, skopeo reads.
#[tokio::test]
async fn interoperates_with_umoci_and_skopeo() {
    let Some(reg) = start_registry(Auth::None) else {
        return;
    };
    if !require_tool("umoci") || !require_tool("skopeo") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let Some(image) = support::image::busybox_image(&layout, "v1") else {
        return;
    };

    // umoci validates and unpacks the layout.
    let bundle = tmp.path().join("bundle");
    run(std::process::Command::new("umoci")
        .args(["unpack", "--rootless", "--image"])
        .arg(format!("{}:v1", layout.display()))
        .arg(&bundle));
    let rootfs = bundle.join("rootfs");
    assert_eq!(
        std::fs::read(rootfs.join("bin/busybox")).unwrap(),
        std::fs::read("/usr/bin/busybox").unwrap()
    );
    assert_eq!(
        std::fs::read_link(rootfs.join("bin/sh")).unwrap(),
        std::path::Path::new("busybox")
    );
    assert_eq!(
        std::fs::read(rootfs.join("data/random.bin")).unwrap(),
        pseudo_random(1 << 20, 1)
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("data/link")).unwrap(),
        "hello from zest\n"
    );

    // skopeo copies it to the registry in both formats; this client reads both.
    let policy = tmp.path().join("policy.json");
    std::fs::write(
        &policy,
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )
    .unwrap();
    let client = reg.client();
    for (format, manifest_type, layer_type) in [
        ("oci", media_type::OCI_MANIFEST, media_type::OCI_LAYER_GZIP),
        (
            "v2s2",
            media_type::DOCKER_MANIFEST,
            media_type::DOCKER_LAYER_GZIP,
        ),
    ] {
        let dest = format!("{}/interop/{format}:v1", reg.host());
        run(std::process::Command::new("skopeo")
            .arg("--policy")
            .arg(&policy)
            .args([
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                "--format",
                format,
            ])
            .arg(format!("oci:{}:v1", layout.display()))
            .arg(format!("docker://{dest}")));
        let reference: Reference = dest.parse().unwrap();
        let resolved = client
            .resolve_image(&reference, &Platform::host())
            .await
            .unwrap();
        assert_eq!(resolved.manifest.media_type, manifest_type, "{format}");
        let cfg = client
            .get_blob_bytes(
                &reference.repository,
                &resolved.image.config.digest,
                1 << 20,
            )
            .await
            .unwrap();
        let diff_ids = ImageConfig::from_json(&cfg).unwrap().diff_ids().unwrap();
        assert_eq!(resolved.image.layers.len(), image.layers.len());
        for ((desc, ours), diff_id) in resolved
            .image
            .layers
            .iter()
            .zip(&image.layers)
            .zip(&diff_ids)
        {
            assert_eq!(desc.media_type, layer_type);
            assert_eq!(
                LayerCompression::from_media_type(&desc.media_type),
                Some(LayerCompression::Gzip)
            );
            let blob = client
                .get_blob_bytes(&reference.repository, &desc.digest, 64 << 20)
                .await
                .unwrap();
            let tar = gunzip(&blob);
            assert_eq!(Digest::of(&tar), *diff_id);
            assert_eq!(tar, ours.tar);
        }
    }

    // What this client pushes, skopeo reads byte for byte.
    let ours: Reference = format!("{}/interop/ours:v1", reg.host()).parse().unwrap();
    let digest = push_image(&client, &image, &ours).await;
    let out = run(std::process::Command::new("skopeo")
        .arg("--policy")
        .arg(&policy)
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{ours}")));
    assert_eq!(Digest::of(&out.stdout), digest);
}

#[tokio::test]
async fn tls_registry_with_ca_files_and_skip_verify() {
    if !require_tool(REGISTRY_BIN) || !require_tool("openssl") {
        return;
    }
    let reg = Registry::start_tls(Auth::None);
    let ca = reg.ca.clone().expect("TLS registry has a CA");
    let repo = repo(&reg.host(), "test/tls");
    let data = Bytes::from(pseudo_random(4096, 12));
    let d = Digest::of(&data);

    // Not trusted by default: a clear error naming the fix.
    let plain = RegistryClient::new(test_client_config(PlainHttp::Never)).unwrap();
    let err = plain
        .push_blob_bytes(&repo, data.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::Connect { .. }) && err.to_string().contains("not trusted"),
        "{err}"
    );

    // Trusted through the extra CA file.
    let mut cfg = test_client_config(PlainHttp::Never);
    cfg.extra_ca_file = Some(ca.clone());
    let client = RegistryClient::new(cfg).unwrap();
    client.push_blob_bytes(&repo, data.clone()).await.unwrap();
    assert_eq!(
        &client.get_range(&repo, &d, 1..3).await.unwrap()[..],
        &data[1..3]
    );

    // Trusted through a hosts.toml `ca` relative to the file, then through skip_verify.
    for setting in [
        "ca = \"ca.pem\"".to_string(),
        "skip_verify = true".to_string(),
    ] {
        let hosts = tempfile::tempdir().unwrap();
        let dir = hosts.path().join(reg.host());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(&ca, dir.join("ca.pem")).unwrap();
        std::fs::write(
            dir.join("hosts.toml"),
            format!("server = \"https://{}\"\n{setting}\n", reg.host()),
        )
        .unwrap();
        let mut cfg = test_client_config(PlainHttp::Never);
        cfg.hosts_dir = Some(hosts.path().to_path_buf());
        let client = RegistryClient::new(cfg).unwrap();
        assert_eq!(
            client.get_blob_bytes(&repo, &d, 1 << 20).await.unwrap(),
            data,
            "{setting}"
        );
    }

    // A CA file that is not PEM is a configuration error at start.
    let tmp = tempfile::tempdir().unwrap();
    let junk = tmp.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let mut cfg = test_client_config(PlainHttp::Never);
    cfg.extra_ca_file = Some(junk);
    assert!(matches!(
        RegistryClient::new(cfg),
        Err(RegistryError::Config { .. })
    ));
}

/// An artifact manifest with an empty config and one layer, referring to `subject`.
fn referrer_manifest(
    artifact_type: &str,
    layer: &Descriptor,
    subject: &Descriptor,
    created: &str,
) -> zest_oci::ImageManifest {
    let mut annotations = std::collections::BTreeMap::new();
    annotations.insert(
        "org.opencontainers.image.created".to_owned(),
        created.to_owned(),
    );
    zest_oci::ImageManifest {
        schema_version: 2,
        media_type: Some(media_type::OCI_MANIFEST.to_owned()),
        artifact_type: Some(artifact_type.to_owned()),
        config: Descriptor::for_bytes("application/vnd.oci.empty.v1+json", b"{}"),
        layers: vec![layer.clone()],
        subject: Some(subject.clone()),
        annotations,
        extra: serde_json::Map::new(),
    }
}

/// Distribution 2.8 has no referrers API: referrers pushed to it go to the
/// `sha256-<hex>` tag-schema index, each push keeping the entries already there
/// (another tool's referrer included), and are listed back by artifact type; the
/// subject manifest itself is unchanged.
#[tokio::test]
async fn referrers_use_the_tag_schema_on_a_registry_without_the_api() {
    let Some(reg) = start_registry(Auth::None) else {
        return;
    };
    let client = reg.client();
    let repo = repo(&reg.host(), "test/referrers");
    let image = build_image(
        &reg.dir().join("layout"),
        "img",
        vec![data_layer_tar(3)],
        LayerCompression::Gzip,
        &Platform::host(),
        &["/bin/true"],
    );
    let tagged = Reference {
        repository: repo.clone(),
        tag: Some("v1".into()),
        digest: None,
    };
    push_image(&client, &image, &tagged).await;
    let before = client.get_manifest(&tagged).await.unwrap();
    let subject = before.descriptor();

    assert!(client
        .referrers_api(&repo, &subject.digest, None)
        .await
        .unwrap()
        .is_none());
    assert!(client
        .referrers_tag_index(&repo, &subject.digest)
        .await
        .unwrap()
        .is_none());

    client
        .push_blob_bytes(&repo, Bytes::from_static(b"{}"))
        .await
        .unwrap();
    let mut pushed = Vec::new();
    for (i, artifact_type) in [
        "application/x.other+json",
        "application/x.mine+json",
        "application/x.mine+json",
    ]
    .iter()
    .enumerate()
    {
        let blob = Bytes::from(format!("payload {i}"));
        client.push_blob_bytes(&repo, blob.clone()).await.unwrap();
        let layer = Descriptor::for_bytes(*artifact_type, &blob);
        let manifest = referrer_manifest(
            artifact_type,
            &layer,
            &subject,
            &format!("2026-01-0{}T00:00:00.000Z", i + 1),
        );
        let (desc, source) = client.push_referrer(&repo, &manifest).await.unwrap();
        assert_eq!(source, zest_registry::ReferrersSource::TagSchema);
        assert_eq!(desc.artifact_type.as_deref(), Some(*artifact_type));
        pushed.push(desc);
        // Pushing the same referrer again adds nothing.
        client.push_referrer(&repo, &manifest).await.unwrap();
    }

    let index = client
        .referrers_tag_index(&repo, &subject.digest)
        .await
        .unwrap()
        .expect("the tag-schema index exists");
    let listed: Vec<Digest> = index.manifests.iter().map(|d| d.digest).collect();
    assert_eq!(
        listed,
        pushed.iter().map(|d| d.digest).collect::<Vec<_>>(),
        "every referrer kept, once each, in push order"
    );
    let (mine, source) = client
        .list_referrers(&repo, &subject.digest, "application/x.mine+json")
        .await
        .unwrap();
    assert_eq!(source, zest_registry::ReferrersSource::TagSchema);
    assert_eq!(
        mine.iter().map(|d| d.digest).collect::<Vec<_>>(),
        vec![pushed[1].digest, pushed[2].digest]
    );
    // The referrer manifest names the subject; the subject is untouched.
    let fetched = client
        .get_manifest_by_descriptor(&repo, &pushed[2])
        .await
        .unwrap();
    let parsed = zest_oci::ImageManifest::from_json(&fetched.bytes).unwrap();
    assert_eq!(parsed.subject.map(|s| s.digest), Some(subject.digest));
    let after = client.get_manifest(&tagged).await.unwrap();
    assert_eq!(after.bytes, before.bytes);
}

/// A registry with the referrers API: referrers are listed from its answer (the
/// artifact type asked for in the query and filtered again on our side; the tag
/// schema, asked at the same time, is not used), and a pushed referrer is left for
/// the registry to index (no tag read or written).
#[tokio::test]
async fn referrers_come_from_the_api_when_the_registry_has_it() {
    let subject = Digest::of(b"subject manifest");
    let mut index = ImageIndex::new();
    for (i, artifact_type) in ["application/x.mine+json", "application/x.other+json"]
        .iter()
        .enumerate()
    {
        let mut d = Descriptor::for_bytes(media_type::OCI_MANIFEST, format!("m{i}").as_bytes());
        d.artifact_type = Some((*artifact_type).to_owned());
        index.manifests.push(d);
    }
    let index_bytes = index.to_json();
    let api_path = format!("/v2/test/app/referrers/{subject}");
    let server = FakeServer::start(move |req| {
        if req.path_only() == api_path {
            Response::new(200)
                .header("Content-Type", media_type::OCI_INDEX)
                .body(index_bytes.clone())
        } else if req.method == "PUT" && req.path_only().contains("/manifests/sha256:") {
            Response::new(201)
        } else if req.path_only().contains("/manifests/sha256-") {
            // The tag schema, asked at the same time, fails: the API's answer
            // stands.
            Response::error(403, "DENIED", "no tags here")
        } else {
            Response::error(404, "NOT_FOUND", "not here")
        }
    })
    .await;
    let client = fake_client(&server);
    let repo = fake_repo(&server);
    let (found, source) = client
        .list_referrers(&repo, &subject, "application/x.mine+json")
        .await
        .unwrap();
    assert_eq!(source, zest_registry::ReferrersSource::Api);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].digest, index.manifests[0].digest);
    let asked = server.requests();
    assert!(asked
        .iter()
        .any(|r| r.query("artifactType") == ["application/x.mine+json"]));

    assert!(
        asked
            .iter()
            .any(|r| r.path_only().contains("/manifests/sha256-")),
        "the tag schema is asked along with the API"
    );
    let listed = asked.len();

    let blob = Descriptor::for_bytes("application/x.mine+json", b"payload");
    let manifest = referrer_manifest(
        "application/x.mine+json",
        &blob,
        &Descriptor::new(media_type::OCI_MANIFEST, subject, 10),
        "2026-01-01T00:00:00.000Z",
    );
    let (_, source) = client.push_referrer(&repo, &manifest).await.unwrap();
    assert_eq!(source, zest_registry::ReferrersSource::Api);
    assert!(
        !server.requests()[listed..]
            .iter()
            .any(|r| r.path_only().contains("/manifests/sha256-")),
        "no tag-schema request on a registry with the API"
    );
}
