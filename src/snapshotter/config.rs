//! Configuration of the snapshotter service: the `[snapshotter]` section of zest's
//! TOML configuration file (`/etc/zest/config.toml` by default), and the command-line
//! arguments of `zest serve`.
//!
//! Other sections of the file belong to other parts of zest and are ignored here;
//! unknown keys inside `[snapshotter]` are rejected so that typos are reported.
//! `packaging/config.toml` documents every key with its default.

use std::path::{Path, PathBuf};

/// Default configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/zest/config.toml";
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
    /// `RUST_LOG` overrides it.
    pub log_level: String,
    /// Extra overlayfs mount options added to every overlay mount.
    pub overlay_mount_options: Vec<String>,
    /// Remove unreferenced snapshot directories (left by a crash) at start.
    pub cleanup_on_start: bool,
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
        }
    }
}

/// Error reading the configuration.
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

/// The part of the configuration file this module reads.
#[derive(serde::Deserialize)]
struct File {
    #[serde(default)]
    snapshotter: SnapshotterConfig,
}

impl SnapshotterConfig {
    /// Reads `[snapshotter]` from TOML text (other sections are ignored).
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let file: File = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            source: Box::new(e),
        })?;
        file.snapshotter.validate()?;
        Ok(file.snapshotter)
    }

    /// Reads `[snapshotter]` from a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_owned(),
            source: e,
        })?;
        Self::from_toml(&text, path)
    }

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

/// Arguments of `zest serve`; flatten into the CLI's subcommand with
/// `#[command(flatten)]` and call [`ServeArgs::config`].
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// Configuration file [default: /etc/zest/config.toml, if it exists]
    #[arg(long, value_name = "FILE", env = "ZEST_CONFIG")]
    pub config: Option<PathBuf>,
    /// Unix socket to listen on (overrides `snapshotter.socket`)
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// State directory (overrides `snapshotter.state_dir`)
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

impl ServeArgs {
    /// The effective configuration: the file named by `--config` (which must exist),
    /// else the default file if it exists, else the defaults; then the overrides.
    pub fn config(&self) -> Result<SnapshotterConfig, ConfigError> {
        let mut config = match &self.config {
            Some(path) => SnapshotterConfig::load(path)?,
            None => {
                let default = Path::new(DEFAULT_CONFIG_PATH);
                if default.exists() {
                    SnapshotterConfig::load(default)?
                } else {
                    SnapshotterConfig::default()
                }
            }
        };
        if let Some(socket) = &self.socket {
            config.socket = socket.clone();
        }
        if let Some(state_dir) = &self.state_dir {
            config.state_dir = state_dir.clone();
        }
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packaged_config_is_the_default() -> Result<(), ConfigError> {
        let text = include_str!("../../packaging/config.toml");
        let config = SnapshotterConfig::from_toml(text, Path::new("packaging/config.toml"))?;
        assert_eq!(config, SnapshotterConfig::default());
        Ok(())
    }

    #[test]
    fn serve_args_override_the_file() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("config.toml");
        std::fs::write(
            &file,
            "[snapshotter]\nsocket = \"/a.sock\"\nstate_dir = \"/s\"\n",
        )?;
        let args = ServeArgs {
            config: Some(file),
            socket: None,
            state_dir: Some(PathBuf::from("/override")),
        };
        let config = args.config()?;
        assert_eq!(config.socket, PathBuf::from("/a.sock"));
        assert_eq!(config.state_dir, PathBuf::from("/override"));
        let missing = ServeArgs {
            config: Some(dir.path().join("absent.toml")),
            ..ServeArgs::default()
        };
        assert!(matches!(missing.config(), Err(ConfigError::Read { .. })));
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
