//! Registry options shared by every subcommand that talks to a registry.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use zest_registry::{DockerConfigSource, PlainHttp, RegistryClient, RegistryConfig};

/// How to reach registries: plain HTTP, CAs, host configuration, credentials.
#[derive(Debug, Clone, Args)]
pub struct RegistryArgs {
    /// Speak plain HTTP to every registry (for a local test registry). Without it,
    /// HTTPS is used unless a hosts.toml names an http:// endpoint.
    #[arg(long, global = true)]
    pub plain_http: bool,

    /// Speak plain HTTP to this registry only (`host:port`); repeatable.
    #[arg(long = "plain-http-host", value_name = "HOST", global = true)]
    pub plain_http_hosts: Vec<String>,

    /// Directory of containerd-style per-registry `<host>/hosts.toml` files.
    #[arg(long, value_name = "DIR", global = true, default_value = zest_registry::DEFAULT_HOSTS_DIR)]
    pub hosts_dir: PathBuf,

    /// An extra PEM CA bundle to trust besides the system roots.
    #[arg(long, value_name = "FILE", global = true)]
    pub ca_file: Option<PathBuf>,

    /// Docker `config.json` with registry credentials (default: $DOCKER_CONFIG/config.json,
    /// else ~/.docker/config.json).
    #[arg(long, value_name = "FILE", global = true)]
    pub docker_config: Option<PathBuf>,
}

impl RegistryArgs {
    /// The client configuration these options describe.
    pub fn config(&self) -> RegistryConfig {
        let plain_http = if self.plain_http {
            PlainHttp::Always
        } else if !self.plain_http_hosts.is_empty() {
            PlainHttp::Hosts(self.plain_http_hosts.clone())
        } else {
            PlainHttp::Never
        };
        RegistryConfig {
            hosts_dir: Some(self.hosts_dir.clone()),
            plain_http,
            extra_ca_file: self.ca_file.clone(),
            docker_config: match &self.docker_config {
                Some(p) => DockerConfigSource::Path(p.clone()),
                None => DockerConfigSource::Default,
            },
            ..RegistryConfig::default()
        }
    }

    /// A registry client for these options.
    pub fn client(&self) -> anyhow::Result<RegistryClient> {
        RegistryClient::new(self.config()).context("setting up the registry client")
    }
}
