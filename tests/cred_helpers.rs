//! Docker credential helpers (`credHelpers`, `credsStore` in config.json) against a
//! real registry with htpasswd Basic auth: the helper is a real executable the test
//! writes (`docker-credential-<name>`, a shell script) on a PATH the test sets, so
//! this file holds one test (PATH is process-wide). Covers a per-host helper, the
//! default store, the per-host answer cache, "credentials not found", a missing
//! helper, a failing helper and a hanging one (killed after the timeout).

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use support::{require_tool, Auth, Registry};
use zest_oci::{Digest, Repository};
use zest_registry::{Credential, DockerConfigSource, DockerCredentials, RegistryClient};

const USER: &str = "helper-user";
const PASS: &str = "helper-Secret-51d2";

fn write_helper(bin: &Path, name: &str, body: &str) {
    let path = bin.join(format!("docker-credential-{name}"));
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write helper");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod helper");
}

/// A client whose config.json is `json`, with a 2 s helper timeout.
fn client_with(registry: &Registry, dir: &Path, json: &str) -> RegistryClient {
    std::fs::create_dir_all(dir).expect("mkdir");
    let path = dir.join("config.json");
    std::fs::write(&path, json).expect("write config.json");
    let mut config = registry.client_config();
    config.docker_config = DockerConfigSource::Path(path);
    config.credential_helper_timeout = Duration::from_secs(2);
    RegistryClient::new(config).expect("client")
}

async fn read(
    client: &RegistryClient,
    repo: &Repository,
    digest: &Digest,
) -> Result<Bytes, String> {
    client
        .get_blob_bytes(repo, digest, 1 << 20)
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_helpers() {
    if !require_tool(support::REGISTRY_BIN) || !require_tool("sh") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir bin");
    let calls = tmp.path().join("calls");
    let answer = format!(r#"{{"ServerURL":"x","Username":"{USER}","Secret":"{PASS}"}}"#);
    // Records the server it was asked about (stdin), then answers.
    write_helper(
        &bin,
        "good",
        &format!(
            "[ \"$1\" = get ] || exit 3\nread server\necho \"$server\" >> '{}'\necho '{answer}'",
            calls.display()
        ),
    );
    write_helper(
        &bin,
        "none",
        "cat >/dev/null\necho 'credentials not found in native keychain'\nexit 1",
    );
    write_helper(
        &bin,
        "broken",
        "cat >/dev/null\necho 'keyring locked' >&2\nexit 2",
    );
    write_helper(&bin, "hangs", "exec sleep 60");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // SAFETY: the only test of this binary sets it before any thread reads it.
    unsafe { std::env::set_var("PATH", path) };

    let registry = tokio::task::spawn_blocking(|| {
        Registry::start(Auth::Basic {
            user: USER.into(),
            pass: PASS.into(),
        })
    })
    .await
    .expect("registry");
    let host = registry.host();
    let repo = Repository::new(&host, "helpers/blob").expect("repository");
    let mut creds = DockerCredentials::empty();
    creds.insert(
        &host,
        Credential::Basic {
            username: USER.into(),
            password: PASS.into(),
        },
    );
    let pusher = RegistryClient::with_credentials(registry.client_config(), creds).expect("client");
    let data = Bytes::from_static(b"read through a credential helper\n");
    let digest = pusher
        .push_blob_bytes(&repo, data.clone())
        .await
        .expect("push");

    // credHelpers for this host; asked once, then answered from the cache.
    let dir = tmp.path();
    let per_host = client_with(
        &registry,
        &dir.join("per-host"),
        &format!(r#"{{"credHelpers": {{"{host}": "good"}}, "credsStore": "broken"}}"#),
    );
    assert_eq!(read(&per_host, &repo, &digest).await.as_ref(), Ok(&data));
    assert_eq!(read(&per_host, &repo, &digest).await.as_ref(), Ok(&data));
    let asked = std::fs::read_to_string(&calls).unwrap_or_default();
    assert_eq!(
        asked.lines().collect::<Vec<_>>(),
        vec![host.as_str()],
        "{asked}"
    );

    // credsStore, the default for hosts without their own helper.
    let store = client_with(&registry, &dir.join("store"), r#"{"credsStore": "good"}"#);
    assert_eq!(read(&store, &repo, &digest).await.as_ref(), Ok(&data));

    // An auths entry wins over helpers (the helper would fail).
    let auths = client_with(
        &registry,
        &dir.join("auths"),
        &format!(
            r#"{{"auths": {{"{host}": {{"username": "{USER}", "password": "{PASS}"}}}}, "credsStore": "broken"}}"#
        ),
    );
    assert_eq!(read(&auths, &repo, &digest).await.as_ref(), Ok(&data));

    // "credentials not found": anonymous, so the registry's 401 is reported.
    let none = client_with(&registry, &dir.join("none"), r#"{"credsStore": "none"}"#);
    let e = read(&none, &repo, &digest)
        .await
        .expect_err("anonymous read");
    assert!(e.contains("401"), "{e}");

    // A helper that is not installed.
    let missing = client_with(
        &registry,
        &dir.join("missing"),
        r#"{"credsStore": "absent"}"#,
    );
    let e = read(&missing, &repo, &digest)
        .await
        .expect_err("missing helper");
    assert!(
        e.contains("docker-credential-absent") && e.contains("not on PATH"),
        "{e}"
    );

    // A helper that fails: its message is shown.
    let broken = client_with(
        &registry,
        &dir.join("broken"),
        r#"{"credsStore": "broken"}"#,
    );
    let e = read(&broken, &repo, &digest)
        .await
        .expect_err("failing helper");
    assert!(
        e.contains("docker-credential-broken") && e.contains("keyring locked"),
        "{e}"
    );

    // A helper that hangs is killed after the timeout, with a clear error.
    let hangs = client_with(&registry, &dir.join("hangs"), r#"{"credsStore": "hangs"}"#);
    let started = Instant::now();
    let e = read(&hangs, &repo, &digest)
        .await
        .expect_err("hanging helper");
    assert!(e.contains("did not answer within"), "{e}");
    // Bounded, not a speed goal: the helper would sleep 60 s.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );

    // No secret in the error texts.
    assert!(!e.contains(PASS), "{e}");
}
