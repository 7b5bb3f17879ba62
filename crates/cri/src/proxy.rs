//! What the proxy does with a request before forwarding it: on `PullImage` with
//! credentials, record them for the image's registry and repository, so that the
//! lazy mounts containerd asks zest for next fetch with them. Nothing here knows
//! the transport: requests arrive as their method name and wire bytes.

use std::path::PathBuf;
use std::sync::Arc;

use crate::auth::{credential_of, repository_of};
use crate::store::{CredentialStoreConfig, CriCredentials};

/// The CRI image service all forwarded methods belong to.
pub const IMAGE_SERVICE: &str = "runtime.v1.ImageService";

/// How the proxy is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// The socket the kubelet is pointed at (`--image-service-endpoint`).
    pub socket: PathBuf,
    /// Permission bits of that socket.
    pub socket_mode: u32,
    /// containerd's CRI socket, where every call is forwarded.
    pub upstream: PathBuf,
    /// Where the credentials are kept.
    pub store: CredentialStoreConfig,
}

/// Looks at one request before it is forwarded. Never fails the request: a pull
/// whose credentials cannot be read or stored is still forwarded, and containerd
/// answers it as it would without zest (the lazy mount then falls back).
pub(crate) async fn before_forward(creds: &Arc<CriCredentials>, method: &str, body: &[u8]) {
    if method != "PullImage" {
        return;
    }
    let req = match zest_api::decode_pull_image_request(body) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "CRI PullImage request is not valid protobuf; forwarding it as is");
            return;
        }
    };
    let Some(auth) = req.auth else {
        return;
    };
    let image = req.image.map(|s| s.image).unwrap_or_default();
    let (host, repository) = match repository_of(&image) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "CRI PullImage: credentials not recorded");
            return;
        }
    };
    let cred = match credential_of(&auth) {
        Ok(Some(c)) => c,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(%image, error = %e, "CRI PullImage: credentials not recorded");
            return;
        }
    };
    // The Debug form of a credential names its kind and user, never the secret.
    tracing::debug!(%host, %repository, credential = ?cred, "recording CRI pull credentials");
    let store = creds.clone();
    let (h, r) = (host.clone(), repository.clone());
    let recorded = tokio::task::spawn_blocking(move || store.record(&h, &r, cred)).await;
    match recorded {
        Ok(Ok(())) => {
            tracing::info!(%host, %repository, "recorded pull credentials from CRI")
        }
        Ok(Err(e)) => tracing::warn!(
            %host, %repository, error = %e,
            "pull credentials kept in memory only: they will be lost at the next restart"
        ),
        Err(e) => tracing::warn!(error = %e, "recording CRI pull credentials failed"),
    }
}
