//! Domain types of the snapshotter: snapshot kinds, info, mounts, usage, and the error
//! enum whose variants map one-to-one onto the gRPC codes containerd understands.
//!
//! Nothing here knows about gRPC; `grpc.rs` converts.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::SystemTime;

/// Labels of a snapshot. Ordered so that listings and stored records are stable.
pub type Labels = BTreeMap<String, String>;

use zest_api::labels::MAX_LABEL_SIZE;
use zest_mount::SysError;

/// The kind of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Read-only view of a committed parent; cannot be committed.
    View,
    /// Writable snapshot, e.g. a container's root or a layer being extracted.
    Active,
    /// Immutable snapshot that can be a parent.
    Committed,
}

impl Kind {
    /// The name containerd's filters use for this kind.
    pub fn as_filter_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// What containerd knows about a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// Key of an active or view snapshot, name of a committed one.
    pub name: String,
    /// Name of the committed parent; `None` for a base snapshot.
    pub parent: Option<String>,
    /// Kind.
    pub kind: Kind,
    /// Creation time (for a committed snapshot: commit time).
    pub created: SystemTime,
    /// Last update of the labels.
    pub updated: SystemTime,
    /// Labels.
    pub labels: Labels,
}

/// One mount of a snapshot's root filesystem, as handed to containerd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Filesystem type: `bind` or `overlay`.
    pub fs_type: String,
    /// Source path, or `overlay`.
    pub source: String,
    /// Mount options.
    pub options: Vec<String>,
}

/// Disk resources used by a snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// Bytes allocated on disk (`st_blocks * 512`, hard links counted once).
    pub size: i64,
    /// Number of distinct inodes.
    pub inodes: i64,
}

/// Errors of the snapshot service. The first five variants are caller errors and
/// carry the message containerd shows to the user; the rest are server-side failures.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The named snapshot (or parent) does not exist.
    #[error("{0}: not found")]
    NotFound(String),
    /// A snapshot with that key or name exists already.
    #[error("{0}: already exists")]
    AlreadyExists(String),
    /// The snapshot is in the wrong state for the operation.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request itself is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// A remote layer the snapshot depends on cannot be reached.
    #[error("{0}")]
    Unavailable(String),
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The metadata database failed.
    #[error("snapshot metadata database: {op}: {source}")]
    Database {
        /// What was being done.
        op: &'static str,
        /// The database error.
        #[source]
        source: Box<redb::Error>,
    },
    /// A stored record cannot be decoded or is inconsistent.
    #[error(
        "snapshot metadata is corrupt: {0}; restore the state directory from a backup or remove it"
    )]
    Corrupt(String),
    /// A background task failed unexpectedly.
    #[error("internal error: {0}")]
    Internal(String),
}

impl SnapshotError {
    /// Builds an [`SnapshotError::Io`] error.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SnapshotError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

impl From<SysError> for SnapshotError {
    fn from(e: SysError) -> Self {
        match e {
            SysError::Io { op, path, source } => SnapshotError::Io { op, path, source },
            // Deleting would reach into a live mount: the caller must unmount first.
            e @ SysError::StillMounted { .. } => SnapshotError::FailedPrecondition(e.to_string()),
            e => SnapshotError::InvalidArgument(e.to_string()),
        }
    }
}

/// Adds the operation name to redb errors.
pub(crate) trait DbResultExt<T> {
    /// Converts a redb error into [`SnapshotError::Database`].
    fn db(self, op: &'static str) -> Result<T, SnapshotError>;
}

impl<T, E: Into<redb::Error>> DbResultExt<T> for Result<T, E> {
    fn db(self, op: &'static str) -> Result<T, SnapshotError> {
        self.map_err(|e| SnapshotError::Database {
            op,
            source: Box::new(e.into()),
        })
    }
}

/// Checks containerd's label size limit and drops labels with empty values, which
/// containerd treats as "unset".
pub fn normalize_labels(labels: Labels) -> Result<Labels, SnapshotError> {
    for (key, value) in &labels {
        if key.len() + value.len() > MAX_LABEL_SIZE {
            let shown: String = key.chars().take(64).collect();
            return Err(SnapshotError::InvalidArgument(format!(
                "label key and value greater than maximum size ({MAX_LABEL_SIZE} bytes), key: {shown}"
            )));
        }
    }
    Ok(labels.into_iter().filter(|(_, v)| !v.is_empty()).collect())
}
