//! The `[snapshotter]` section of zest's TOML configuration file
//! (`/etc/zest/config.toml` by default): what the snapshot service itself needs
//! (socket, state directory, logging, overlay options, metrics address). The whole
//! file, with the sections of the lazy layer provider, is read by the `zest-daemon`
//! crate, which embeds this section. Unknown keys are rejected so that typos are
//! reported.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Default gRPC socket, the address to put in containerd's `proxy_plugins`.
pub const DEFAULT_SOCKET: &str = "/run/zest/zest.sock";
/// Default state directory (metadata and snapshot directories).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/zest";

/// The `[snapshotter]` section.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnapshotterConfig {
    /// Unix socket the gRPC service listens on.
    pub socket: PathBuf,
    /// Permission bits of the socket (containerd runs as root; group members may
    /// use the socket too).
    pub socket_mode: u32,
    /// State directory: `metadata.redb` and `snapshots/`. Must be on a filesystem
    /// that can hold overlayfs upper directories (ext4, xfs with d_type, btrfs).
    pub state_dir: PathBuf,
    /// Log filter (tracing `EnvFilter` syntax, e.g. `info` or `zest=debug`);
    /// `zest serve --log` (or `ZEST_LOG`) overrides it, else `RUST_LOG`.
    pub log_level: String,
    /// Extra overlayfs mount options added to every overlay mount.
    pub overlay_mount_options: Vec<String>,
    /// Remove unreferenced snapshot directories (left by a crash) at start.
    pub cleanup_on_start: bool,
    /// Address of the Prometheus metrics endpoint (`GET /metrics`); `None` (the
    /// default) serves no metrics. Meant for loopback (e.g. `127.0.0.1:9464`).
    pub metrics_address: Option<SocketAddr>,
}

impl Default for SnapshotterConfig {
    fn default() -> Self {
        SnapshotterConfig {
            socket: PathBuf::from(DEFAULT_SOCKET),
            socket_mode: 0o660,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            log_level: "info".to_owned(),
            overlay_mount_options: Vec::new(),
            cleanup_on_start: true,
            metrics_address: None,
        }
    }
}

/// Error reading the configuration file (the `zest-daemon` crate reads it; the
/// `[snapshotter]` section's own checks report [`ConfigError::Invalid`]).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or `[snapshotter]` has a bad key or value.
    #[error("invalid configuration file {path}: {source}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Parser error, with the line.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl SnapshotterConfig {
    /// Checks values that TOML types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.socket_mode > 0o777 {
            return Err(ConfigError::Invalid(format!(
                "snapshotter.socket_mode {:#o} is not a permission mode (at most 0o777)",
                self.socket_mode
            )));
        }
        if !self.socket.is_absolute() || !self.state_dir.is_absolute() {
            return Err(ConfigError::Invalid(
                "snapshotter.socket and snapshotter.state_dir must be absolute paths".to_owned(),
            ));
        }
        // Overlay mount options are separated by ',' and lower directories by ':'.
        let state_dir = self.state_dir.to_string_lossy();
        if state_dir.contains([',', ':']) {
            return Err(ConfigError::Invalid(format!(
                "snapshotter.state_dir {state_dir:?} contains ',' or ':', which overlay mount options cannot express"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// The part of the configuration file this section is.
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        snapshotter: SnapshotterConfig,
    }

    impl SnapshotterConfig {
        /// Reads `[snapshotter]` from TOML text (other sections are ignored).
        fn from_toml(text: &str, origin: &Path) -> Result<Self, ConfigError> {
            let file: File = toml::from_str(text).map_err(|e| ConfigError::Parse {
                path: origin.to_owned(),
                source: Box::new(e),
            })?;
            file.snapshotter.validate()?;
            Ok(file.snapshotter)
        }
    }

    #[test]
    fn packaged_config_is_the_default() -> Result<(), ConfigError> {
        let text = include_str!("../../../packaging/config.toml");
        let config = SnapshotterConfig::from_toml(text, Path::new("packaging/config.toml"))?;
        assert_eq!(config, SnapshotterConfig::default());
        Ok(())
    }

    #[test]
    fn sections_and_typos() -> Result<(), ConfigError> {
        let text = "[registry]\nanything = 1\n[snapshotter]\nsocket = \"/tmp/z.sock\"\nsocket_mode = 0o600\n";
        let config = SnapshotterConfig::from_toml(text, Path::new("t.toml"))?;
        assert_eq!(config.socket, PathBuf::from("/tmp/z.sock"));
        assert_eq!(config.socket_mode, 0o600);
        assert_eq!(config.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        let typo = "[snapshotter]\nsocket_path = \"/x\"\n";
        let err = SnapshotterConfig::from_toml(typo, Path::new("t.toml"));
        assert!(matches!(err, Err(ConfigError::Parse { .. })), "{err:?}");
        let relative = "[snapshotter]\nstate_dir = \"var/lib\"\n";
        assert!(SnapshotterConfig::from_toml(relative, Path::new("t.toml")).is_err());
        let colon = "[snapshotter]\nstate_dir = \"/var/lib/a:b\"\n";
        assert!(SnapshotterConfig::from_toml(colon, Path::new("t.toml")).is_err());
        let mode = "[snapshotter]\nsocket_mode = 0o1777\n";
        assert!(SnapshotterConfig::from_toml(mode, Path::new("t.toml")).is_err());
        Ok(())
    }
}
