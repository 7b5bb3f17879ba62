//! The Bearer token flow against a real registry (`docker-registry` with `auth:
//! token`) and a real token service (`support::token_issuer`, signed JWTs the
//! registry verifies against its `rootcertbundle`): Basic credentials at the token
//! service, refresh of a token when it expires (`expires_in`) and when the registry
//! rejects it (401), identity (refresh) tokens, registry tokens used as is, and a
//! clear error for wrong credentials.

mod support;

use std::time::Duration;

use bytes::Bytes;
use support::token_issuer::TokenIssuer;
use support::{require_tool, Auth, Registry};
use zest_oci::Repository;
use zest_registry::{Credential, DockerCredentials, ErrorKind, RegistryClient};

const USER: &str = "token-user";
const PASS: &str = "token-Secret-77ab";
const REFRESH: &str = "refresh-token-0c4e";

fn client(registry: &Registry, cred: Credential) -> RegistryClient {
    let mut creds = DockerCredentials::empty();
    creds.insert(&registry.host(), cred);
    RegistryClient::with_credentials(registry.client_config(), creds).expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_from_a_real_token_service() {
    if !require_tool(support::REGISTRY_BIN) || !require_tool("openssl") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    // Short-lived tokens, so that expiry is exercised.
    let issuer = TokenIssuer::start(tmp.path(), USER, PASS, REFRESH, 3);
    let (realm, cert) = (issuer.realm(), issuer.cert.clone());
    let registry =
        tokio::task::spawn_blocking(move || Registry::start(Auth::Token { realm, cert }))
            .await
            .expect("registry");
    let repo = Repository::new(&registry.host(), "tokens/blob").expect("repository");
    let basic = client(
        &registry,
        Credential::Basic {
            username: USER.into(),
            password: PASS.into(),
        },
    );
    let data = Bytes::from_static(b"behind a token service\n");
    let digest = basic
        .push_blob_bytes(&repo, data.clone())
        .await
        .expect("push");
    let read = |c: RegistryClient| {
        let (repo, digest) = (repo.clone(), digest);
        async move { c.get_blob_bytes(&repo, &digest, 1 << 20).await }
    };
    assert_eq!(read(basic.clone()).await.expect("read"), data);
    let after_first = issuer.issued();
    assert!(after_first >= 1);
    // The cached token serves the next read.
    assert_eq!(read(basic.clone()).await.expect("read"), data);
    assert_eq!(
        issuer.issued(),
        after_first,
        "a valid cached token was not reused"
    );

    // Expired (expires_in = 3 s): fetched again with the stored credentials.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(read(basic.clone()).await.expect("read after expiry"), data);
    assert_eq!(
        issuer.issued(),
        after_first + 1,
        "the expired token was not refreshed"
    );

    // Rejected by the registry (issued already expired while the client believes
    // it good): the 401 makes the client fetch a new one, once.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    issuer.issue_stale_next();
    assert_eq!(
        read(basic.clone())
            .await
            .expect("read after a rejected token"),
        data
    );
    assert_eq!(
        issuer.issued(),
        after_first + 3,
        "the rejected token was not replaced"
    );
    assert!(
        registry.count_requests("GET", &format!("/blobs/{digest}"), Some(401)) >= 1,
        "the registry never rejected a token"
    );

    // An identity token is exchanged by the refresh grant.
    let identity = client(
        &registry,
        Credential::IdentityToken {
            username: "<token>".into(),
            token: REFRESH.into(),
        },
    );
    assert_eq!(read(identity).await.expect("identity token"), data);

    // A registry token is sent as is.
    let token = issuer.tokens().last().cloned().expect("a token");
    let as_is = client(&registry, Credential::RegistryToken(token));
    let before = issuer.issued();
    assert_eq!(read(as_is).await.expect("registry token"), data);
    assert_eq!(issuer.issued(), before);

    // Wrong password: the token service refuses, and the error says so.
    let wrong = client(
        &registry,
        Credential::Basic {
            username: USER.into(),
            password: "wrong".into(),
        },
    );
    let e = read(wrong).await.expect_err("wrong password");
    assert_eq!(e.kind(), ErrorKind::Denied, "{e}");
    assert!(e.to_string().contains("refused"), "{e}");
    assert!(!e.to_string().contains(PASS));
}
