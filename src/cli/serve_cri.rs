//! The `[cri]` part of `zest serve`: the credentials of CRI pulls (opened before the
//! registry client, which consults them first) and the CRI image-service proxy that
//! records them, served next to the snapshotter until shutdown.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use zest_cri::{CredentialStoreConfig, CriCredentials, CriError, CriProxy, ProxyConfig};
use zest_daemon::{CriSection, ServiceConfig};
use zest_registry::{RegistryClient, RegistryConfig};

/// The proxy's configuration and credentials, before its socket is bound.
pub struct CriSetup {
    config: ProxyConfig,
    credentials: Arc<CriCredentials>,
}

impl CriSetup {
    /// Opens the credentials store when `[cri]` is enabled.
    pub async fn open(config: &ServiceConfig, state_dir: &Path) -> anyhow::Result<Option<Self>> {
        if !config.cri.enabled {
            return Ok(None);
        }
        let proxy = ProxyConfig {
            socket: config.cri.socket.clone(),
            socket_mode: config.cri.socket_mode,
            upstream: config.cri.containerd_socket.clone(),
            store: CredentialStoreConfig {
                dir: CriSection::credentials_dir(state_dir),
                ttl: Duration::from_secs(config.cri.credential_ttl_secs),
                max_entries: config.cri.max_credentials,
            },
        };
        let store_config = proxy.store.clone();
        let credentials = tokio::task::spawn_blocking(move || CriCredentials::open(store_config))
            .await
            .context("opening the CRI credentials")?
            .context("opening the CRI credentials")?;
        Ok(Some(CriSetup {
            config: proxy,
            credentials: Arc::new(credentials),
        }))
    }

    /// The registry client, asking the CRI credentials first when there are any.
    pub fn registry_client(
        setup: Option<&Self>,
        config: RegistryConfig,
    ) -> anyhow::Result<RegistryClient> {
        let client = match setup {
            Some(s) => RegistryClient::with_credential_source(config, s.credentials.clone()),
            None => RegistryClient::new(config),
        };
        client.context("setting up the registry client")
    }

    /// Binds the proxy's socket and serves it in a task.
    pub async fn start(self) -> anyhow::Result<CriTask> {
        let proxy = CriProxy::bind(&self.config, self.credentials)
            .await
            .context("starting the CRI image service proxy")?;
        tracing::info!(
            socket = %self.config.socket.display(),
            containerd = %self.config.upstream.display(),
            "serving the CRI image service (point the kubelet's --image-service-endpoint here)"
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(proxy.run(async {
            let _ = stopped.await;
        }));
        Ok(CriTask { stop, handle })
    }
}

/// The running proxy.
pub struct CriTask {
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<Result<(), CriError>>,
}

impl CriTask {
    /// Stops serving and removes the socket.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        match tokio::time::timeout(Duration::from_secs(10), self.handle).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "CRI image service proxy"),
            Ok(Err(e)) => tracing::warn!(error = %e, "CRI image service proxy task"),
            Err(_) => tracing::warn!("CRI image service proxy did not stop within 10 s"),
        }
    }
}
