//! Private images on Kubernetes' path: the kubelet passes a pod's imagePullSecret
//! with CRI `PullImage`; with `[cri]` enabled it calls zest's image-service proxy,
//! which records the credentials and forwards the call to a real containerd, whose
//! pull makes zest mount every layer lazily from a registry that requires
//! authentication (real docker-registry with htpasswd, or with token auth and a real
//! token service). The real `zest serve` binary
//! runs with trace logging; the tests check that no secret reaches its logs, that
//! the socket and credential files are not world-accessible, and that after a
//! restart of zest a new container still reads files never fetched before, with the
//! credentials read back from the state directory.

mod support;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use support::containerd::{
    fail, require_tools, unix_channel, wait_for, Containerd, TestDir, TestResult,
};
use support::image::{build_image, busybox_layer_tar, data_layer_tar};
use support::token_issuer::TokenIssuer;
use support::{Auth, Registry};
use zest_api::cri as runtime;
use zest_format::WriteOptions;
use zest_image::convert::{convert, ConvertOptions, NoProgress, PlatformChoice};
use zest_oci::layout::LayoutRef;
use zest_oci::{ImageManifest, LayerCompression, Platform, Reference};
use zest_registry::{Credential, DockerCredentials, RegistryClient};
use zest_store::{ImageRef, ImageStore};

use runtime::image_service_client::ImageServiceClient;

const USER: &str = "kube-puller";
const PASS: &str = "pull-Secret-8f3a9c1e";

/// `zest serve`, started by this test (stopped by its pid only).
struct Serve {
    child: tokio::process::Child,
}

impl Serve {
    fn start(config: &Path, log: &Path) -> TestResult<Serve> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_zest"))
            .args(["serve", "--config"])
            .arg(config)
            // Every level: the test greps the logs for secrets.
            .env("ZEST_LOG", "trace")
            .env("RUST_LOG", "trace")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        Ok(Serve { child })
    }

    /// SIGTERM, then wait (bounded) for a clean exit.
    async fn stop(mut self) -> TestResult {
        let pid = self
            .child
            .id()
            .ok_or_else(|| fail("zest serve already exited"))?;
        // SAFETY: kill(2) on the pid of the child this test started.
        unsafe { libc::kill(i32::try_from(pid)?, libc::SIGTERM) };
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .map_err(|_| fail("zest serve did not stop within 30 s"))??;
        if !status.success() {
            return Err(fail(format!("zest serve exited with {status}")));
        }
        Ok(())
    }
}

fn spec(image: &str) -> runtime::ImageSpec {
    runtime::ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    }
}

/// Builds busybox + data, converts it to zstd:chunked and pushes it with `client`.
async fn push_private_image(
    dir: &Path,
    client: &RegistryClient,
    image: &str,
) -> TestResult<Option<ImageManifest>> {
    let Some(base) = busybox_layer_tar() else {
        return Ok(None);
    };
    let layout = dir.join("oci");
    build_image(
        &layout,
        "src",
        vec![base, data_layer_tar(7)],
        LayerCompression::Gzip,
        &Platform::host(),
        &["/bin/sh"],
    );
    let reference: Reference = image.parse()?;
    convert(
        &ImageStore::open(
            &ImageRef::Layout(LayoutRef::parse(&format!("oci:{}:src", layout.display()))?),
            client,
        )?,
        &ImageStore::open(&ImageRef::Registry(reference.clone()), client)?,
        &ConvertOptions {
            platforms: PlatformChoice::One(Platform::host()),
            parallelism: 2,
            write: WriteOptions::default(),
            work_dir: dir.to_path_buf(),
        },
        Arc::new(NoProgress),
    )
    .await?;
    let fetched = client.get_manifest(&reference).await?;
    Ok(Some(ImageManifest::from_json(&fetched.bytes)?))
}

/// The zest configuration: no Docker config (the only credentials are CRI's), no
/// disk cache (so that every read after a restart goes to the registry).
fn write_zest_config(dir: &Path, host: &str, containerd_socket: &Path) -> TestResult<PathBuf> {
    let config = dir.join("zest.toml");
    std::fs::write(
        &config,
        format!(
            "[snapshotter]\nsocket = \"{}\"\nstate_dir = \"{}\"\n\
             [registry]\nplain_http_hosts = [\"{host}\"]\nanonymous = true\nhosts_dir = \"{}\"\n\
             [cache]\nmemory_size = \"32MiB\"\ndisk_size = 0\n\
             [lazy]\ncheck_interval_secs = 1\n\
             [cri]\nenabled = true\nsocket = \"{}\"\ncontainerd_socket = \"{}\"\n",
            dir.join("zest.sock").display(),
            dir.join("zest-state").display(),
            dir.join("no-certs.d").display(),
            dir.join("zest-cri.sock").display(),
            containerd_socket.display(),
        ),
    )?;
    Ok(config)
}

async fn pull(
    cri: &mut ImageServiceClient<tonic::transport::Channel>,
    image: &str,
    auth: Option<runtime::AuthConfig>,
) -> Result<runtime::PullImageResponse, tonic::Status> {
    tokio::time::timeout(
        Duration::from_secs(180),
        cri.pull_image(runtime::PullImageRequest {
            image: Some(spec(image)),
            auth,
        }),
    )
    .await
    .map_err(|_| tonic::Status::deadline_exceeded("PullImage did not finish within 180 s"))?
    .map(tonic::Response::into_inner)
}

/// How the registry checks credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RegistryAuth {
    /// htpasswd Basic auth.
    Htpasswd,
    /// Bearer tokens from a real token service, which checks the Basic credentials.
    Token,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_pull_from_htpasswd_registry() -> TestResult {
    private_image(RegistryAuth::Htpasswd, true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_pull_from_token_auth_registry() -> TestResult {
    private_image(RegistryAuth::Token, true).await
}

/// The kubelet talking to containerd directly: containerd pulls with the secret,
/// zest never sees it, and the layers are downloaded whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_pull_around_the_proxy_is_not_lazy() -> TestResult {
    private_image(RegistryAuth::Htpasswd, false).await
}

/// Through the proxy: the pull with credentials is lazy, the image runs, a restart
/// of zest keeps the credentials, and no secret is logged at any level. Around it
/// (`through_proxy` false): the pull works but is not lazy.
async fn private_image(kind: RegistryAuth, through_proxy: bool) -> TestResult {
    if !require_tools(&[
        "containerd",
        "ctr",
        "runc",
        "docker-registry",
        "busybox",
        "openssl",
    ]) {
        return Ok(());
    }
    let dir = TestDir::new()?;
    let issuer = match kind {
        RegistryAuth::Htpasswd => None,
        // Short-lived tokens: the lazy reads outlive several.
        RegistryAuth::Token => Some(TokenIssuer::start(dir.path(), USER, PASS, "", 5)),
    };
    let auth = match &issuer {
        None => Auth::Basic {
            user: USER.into(),
            pass: PASS.into(),
        },
        Some(issuer) => Auth::Token {
            realm: issuer.realm(),
            cert: issuer.cert.clone(),
        },
    };
    let registry = tokio::task::spawn_blocking(move || Registry::start(auth)).await?;
    let host = registry.host();
    let image = format!("{host}/private/app:v1");
    let mut pusher_creds = DockerCredentials::empty();
    pusher_creds.insert(
        &host,
        Credential::Basic {
            username: USER.into(),
            password: PASS.into(),
        },
    );
    let pusher = RegistryClient::with_credentials(registry.client_config(), pusher_creds)?;
    let Some(manifest) = push_private_image(dir.path(), &pusher, &image).await? else {
        return Ok(());
    };
    let data_layer = manifest
        .layers
        .last()
        .ok_or_else(|| fail("no layer"))?
        .digest
        .to_string();

    // containerd reaches the plain-HTTP registry through a hosts.toml.
    let certs = dir.path().join("certs.d");
    std::fs::create_dir_all(certs.join(&host))?;
    std::fs::write(
        certs.join(&host).join("hosts.toml"),
        format!(
            "server = \"http://{host}\"\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )?;
    let containerd_socket = dir.path().join("containerd.sock");
    let config = write_zest_config(dir.path(), &host, &containerd_socket)?;
    let log = dir.path().join("zest.log");
    let serve = Serve::start(&config, &log)?;
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let proxy_socket = dir.path().join("zest-cri.sock");
    wait_for("zest's sockets", Duration::from_secs(30), || {
        let ready = dir.path().join("zest.sock").exists() && proxy_socket.exists();
        async move { ready.then_some(()) }
    })
    .await
    .map_err(|e| fail(format!("{e}\n{}", read_log())))?;
    let mut containerd = Containerd::start_with_cri(
        dir.path(),
        &dir.path().join("zest.sock"),
        &format!(
            "[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{}\"",
            certs.display()
        ),
    )
    .await?;
    assert_eq!(containerd.address, containerd_socket);
    containerd.namespace = "k8s.io".to_owned();
    let auth_b64 = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASS}"));
    let kubelet_auth = runtime::AuthConfig {
        auth: auth_b64.clone(),
        // The kubelet leaves it empty unless the secret names a URL; containerd
        // 1.6 parses it as one.
        ..Default::default()
    };
    if !through_proxy {
        let mut direct = ImageServiceClient::new(unix_channel(&containerd_socket).await?);
        pull(&mut direct, &image, Some(kubelet_auth))
            .await
            .map_err(|e| {
                fail(format!(
                    "PullImage: {e}\ncontainerd:\n{}",
                    containerd.log_tail()
                ))
            })?;
        assert!(
            registry.count_requests("GET", &format!("/blobs/{data_layer}"), Some(200)) > 0,
            "the data layer was not downloaded"
        );
        assert!(
            read_log().contains("manifest-unavailable"),
            "{}",
            tail(&read_log())
        );
        return serve.stop().await;
    }
    let mut cri = ImageServiceClient::new(unix_channel(&proxy_socket).await?);

    // The socket is as containerd's: owner and group only.
    assert_eq!(std::fs::metadata(&proxy_socket)?.mode() & 0o777, 0o660);

    // Without credentials, the pull fails as it does at containerd.
    let denied = pull(&mut cri, &image, None).await;
    let status = denied
        .err()
        .ok_or_else(|| fail("anonymous pull of a private image succeeded"))?;
    assert!(
        status.message().contains("401")
            || status.message().to_lowercase().contains("unauthorized"),
        "{status:?}"
    );

    // The kubelet's pull with the pod's secret (as `auth`: base64 user:password).
    let pulled = pull(&mut cri, &image, Some(kubelet_auth))
        .await
        .map_err(|e| {
            fail(format!(
                "PullImage: {e}\nzest log tail:\n{}\ncontainerd:\n{}",
                tail(&read_log()),
                containerd.log_tail()
            ))
        })?;
    assert_eq!(pulled.image_ref, manifest.config.digest.to_string());

    // Lazy: no layer was downloaded whole; zest read the data layer by range.
    for layer in &manifest.layers {
        assert_eq!(
            registry.count_requests("GET", &format!("/blobs/{}", layer.digest), Some(200)),
            0,
            "layer {} was downloaded in full",
            layer.digest
        );
    }
    assert!(registry.range_gets(&data_layer) > 0, "no range request");
    assert!(
        read_log().contains("recorded pull credentials from CRI"),
        "{}",
        tail(&read_log())
    );

    // Every call of the image service goes through the proxy.
    let status = cri
        .image_status(runtime::ImageStatusRequest {
            image: Some(spec(&image)),
            verbose: false,
        })
        .await?
        .into_inner();
    assert_eq!(
        status.image.map(|i| i.id),
        Some(manifest.config.digest.to_string())
    );
    let listed = cri
        .list_images(runtime::ListImagesRequest::default())
        .await?
        .into_inner();
    assert!(listed.images.iter().any(|i| i.repo_tags.contains(&image)));
    let fs = cri
        .image_fs_info(runtime::ImageFsInfoRequest {})
        .await?
        .into_inner();
    assert!(!fs.image_filesystems.is_empty(), "{fs:?}");

    // The image runs; its file comes from the private registry through FUSE.
    let out = containerd
        .run_on_zest(&image, "cri-private-1", &["/bin/cat", "/data/hello.txt"])
        .await?;
    assert_eq!(out.trim(), "hello from zest");

    // The credentials file is root-only, in a root-only directory.
    let cred_dir = dir.path().join("zest-state").join("credentials");
    let cred_file = cred_dir.join(zest_cri::CREDENTIALS_FILE);
    assert_eq!(std::fs::metadata(&cred_dir)?.mode() & 0o777, 0o700);
    assert_eq!(std::fs::metadata(&cred_file)?.mode() & 0o777, 0o600);
    // And it is the only file of the state directory holding the secret.
    let holders = files_containing(&dir.path().join("zest-state"), PASS.as_bytes());
    assert_eq!(holders, vec![cred_file.clone()]);

    // Restart zest: the credentials come back from the file, and a new container
    // reads a file no one read before (no disk cache: it must come from the
    // registry, authenticated).
    serve.stop().await?;
    let before = registry.range_gets(&data_layer);
    let serve = Serve::start(&config, &log)?;
    // containerd reconnects to zest on its own schedule: retry, with a fresh
    // container name each time (a failed `ctr run` may leave its container).
    let attempt = AtomicUsize::new(0);
    let out = wait_for(
        "a container after the restart",
        Duration::from_secs(90),
        || {
            let containerd = &containerd;
            let image = image.clone();
            let name = format!("cri-private-2-{}", attempt.fetch_add(1, Ordering::Relaxed));
            async move {
                containerd
                    .run_on_zest(&image, &name, &["/bin/cat", "/data/nested/deeper/file.txt"])
                    .await
                    .ok()
            }
        },
    )
    .await
    .map_err(|e| {
        fail(format!(
            "{e}\nzest log tail:\n{}\ncontainerd:\n{}",
            tail(&read_log()),
            containerd.log_tail()
        ))
    })?;
    assert_eq!(out.trim(), "deep");
    assert!(
        registry.range_gets(&data_layer) > before,
        "the read after the restart did not reach the registry"
    );
    assert!(read_log().contains("loaded credentials from earlier CRI pulls"));
    if let Some(issuer) = &issuer {
        // The restarted zest got its own tokens with the persisted credentials.
        assert!(issuer.issued() >= 2, "{}", issuer.issued());
    }
    serve.stop().await?;
    drop(containerd);

    // No secret in any log line, at any level.
    let text = read_log();
    assert!(
        text.lines().count() > 100,
        "trace logging produced almost nothing"
    );
    let mut secrets = vec![PASS.to_owned(), auth_b64];
    if let Some(issuer) = &issuer {
        let tokens = issuer.tokens();
        assert!(!tokens.is_empty(), "no token was issued");
        secrets.extend(tokens);
    }
    for secret in &secrets {
        assert!(
            !text.contains(secret.as_str()),
            "a secret appears in zest's log"
        );
    }
    Ok(())
}

/// Regular files under `root` (bounded walk, not into mounted layers) whose bytes
/// contain `needle`.
fn files_containing(root: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let device = std::fs::metadata(root).map(|m| m.dev()).unwrap_or(0);
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    let mut visited = 0;
    while let Some(dir) = stack.pop() {
        visited += 1;
        assert!(visited < 100_000, "state directory walk does not end");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                if meta.dev() == device {
                    stack.push(path);
                }
            } else if meta.is_file() && meta.len() < (64 << 20) {
                let bytes = std::fs::read(&path).unwrap_or_default();
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    found.push(path);
                }
            }
        }
    }
    found
}

/// The last lines of zest's log that are its own (not the HTTP/2 library's traces).
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.contains(" h2::")).collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}
