//! [`ContainerdClient`]: typed calls to containerd's gRPC services over its unix
//! socket.
//!
//! Every request carries the namespace (`containerd-namespace` metadata) and, on a
//! client made by [`ContainerdClient::with_lease`], the lease (`containerd-lease`), so
//! that what it creates belongs to that lease. Every call is bounded in time; errors
//! name the operation, the object and containerd's gRPC code.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Request, Status};

use zest_api::content::content_client::ContentClient;
use zest_api::content::{self as pb_content, WriteAction};
use zest_api::diff::diff_client::DiffClient;
use zest_api::diff::ApplyRequest;
use zest_api::images::images_client::ImagesClient;
use zest_api::images::{self as pb_images};
use zest_api::labels::LABEL_GC_EXPIRE;
use zest_api::leases::leases_client::LeasesClient;
use zest_api::leases::{self as pb_leases};
use zest_api::snapshots::snapshots_client::SnapshotsClient;
use zest_api::snapshots::{self as pb_snapshots};
use zest_api::types::{Descriptor as PbDescriptor, Mount};
use zest_oci::digest::Digest;
use zest_oci::Descriptor;

/// containerd's default socket.
pub const DEFAULT_ADDRESS: &str = "/run/containerd/containerd.sock";
/// The namespace `ctr` uses by default (Kubernetes uses `k8s.io`).
pub const DEFAULT_NAMESPACE: &str = "default";

const NAMESPACE_HEADER: &str = "containerd-namespace";
const LEASE_HEADER: &str = "containerd-lease";
/// Bytes per content write message: far below containerd's 16 MiB message limit, big
/// enough that the per-message round trip does not matter.
const WRITE_CHUNK: usize = 1 << 20;
/// Limit for one metadata call (containerd may run garbage collection inside one).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Limit for applying one layer (decompressing and unpacking a large tar).
const APPLY_TIMEOUT: Duration = Duration::from_secs(3600);

/// Error of a call to containerd.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    /// The socket could not be dialled.
    #[error("cannot connect to containerd at {}: is containerd running, and is this its socket (--address)?", address.display())]
    Connect {
        /// The socket path.
        address: PathBuf,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// An argument cannot be sent (e.g. a namespace that is not a valid header value).
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidArgument {
        /// What the value is.
        what: &'static str,
        /// The value.
        value: String,
        /// Why it was rejected.
        reason: String,
    },
    /// containerd answered with an error status.
    #[error("containerd {op} {object}: {kind:?}: {message}")]
    Rpc {
        /// The operation, e.g. "content write".
        op: &'static str,
        /// The object, e.g. a digest or snapshot key.
        object: String,
        /// What kind of failure containerd reported.
        kind: RpcErrorKind,
        /// containerd's message.
        message: String,
    },
    /// containerd did not answer in time.
    #[error("containerd {op} {object}: no answer within {limit:?}")]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The object.
        object: String,
        /// The time limit.
        limit: Duration,
    },
    /// containerd's answer breaks the protocol (missing field, wrong size, ...).
    #[error("containerd {op} {object}: unexpected answer: {detail}")]
    Protocol {
        /// The operation.
        op: &'static str,
        /// The object.
        object: String,
        /// What was wrong.
        detail: String,
    },
}

/// The kind of an error status from containerd: the gRPC codes callers act on,
/// without exposing the gRPC library.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RpcErrorKind {
    /// The object does not exist.
    NotFound,
    /// The object exists already.
    AlreadyExists,
    /// The object is in the wrong state for the call.
    FailedPrecondition,
    /// The request is malformed.
    InvalidArgument,
    /// containerd (or a plugin it called) is unavailable; retrying may help.
    Unavailable,
    /// The caller may not do this.
    PermissionDenied,
    /// containerd does not implement the call (an older version).
    Unimplemented,
    /// containerd failed internally.
    Internal,
    /// Any other status.
    Other,
}

impl RpcErrorKind {
    fn from_code(code: Code) -> RpcErrorKind {
        match code {
            Code::NotFound => RpcErrorKind::NotFound,
            Code::AlreadyExists => RpcErrorKind::AlreadyExists,
            Code::FailedPrecondition => RpcErrorKind::FailedPrecondition,
            Code::InvalidArgument => RpcErrorKind::InvalidArgument,
            Code::Unavailable => RpcErrorKind::Unavailable,
            Code::PermissionDenied => RpcErrorKind::PermissionDenied,
            Code::Unimplemented => RpcErrorKind::Unimplemented,
            Code::Internal => RpcErrorKind::Internal,
            _ => RpcErrorKind::Other,
        }
    }
}

impl ContainerdError {
    /// The kind of an error status from containerd (`None` for other errors).
    pub fn rpc_kind(&self) -> Option<RpcErrorKind> {
        match self {
            ContainerdError::Rpc { kind, .. } => Some(*kind),
            _ => None,
        }
    }

    /// Whether containerd answered ALREADY_EXISTS.
    pub fn is_already_exists(&self) -> bool {
        self.rpc_kind() == Some(RpcErrorKind::AlreadyExists)
    }

    /// Whether containerd answered NOT_FOUND.
    pub fn is_not_found(&self) -> bool {
        self.rpc_kind() == Some(RpcErrorKind::NotFound)
    }

    fn rpc(op: &'static str, object: impl fmt::Display, status: Status) -> Self {
        ContainerdError::Rpc {
            op,
            object: object.to_string(),
            kind: RpcErrorKind::from_code(status.code()),
            message: status.message().to_owned(),
        }
    }

    fn protocol(op: &'static str, object: impl fmt::Display, detail: impl Into<String>) -> Self {
        ContainerdError::Protocol {
            op,
            object: object.to_string(),
            detail: detail.into(),
        }
    }
}

/// A committed blob of the content store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContentInfo {
    /// Its digest as containerd reports it.
    pub digest: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
}

/// A connection to containerd, scoped to one namespace and optionally one lease.
/// Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct ContainerdClient {
    channel: Channel,
    namespace: String,
    namespace_header: AsciiMetadataValue,
    lease: Option<(String, AsciiMetadataValue)>,
}

impl fmt::Debug for ContainerdClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContainerdClient")
            .field("namespace", &self.namespace)
            .field("lease", &self.lease.as_ref().map(|(id, _)| id))
            .finish()
    }
}

fn header_value(what: &'static str, value: &str) -> Result<AsciiMetadataValue, ContainerdError> {
    let invalid = |reason: &str| ContainerdError::InvalidArgument {
        what,
        value: value.to_owned(),
        reason: reason.to_owned(),
    };
    if value.is_empty() {
        return Err(invalid("must not be empty"));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid("only printable ASCII without spaces is allowed"));
    }
    MetadataValue::try_from(value).map_err(|e| invalid(&e.to_string()))
}

/// Runs one call with a time limit, turning its status into a [`ContainerdError`].
async fn bounded<T>(
    op: &'static str,
    object: &(dyn fmt::Display + Sync),
    limit: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, ContainerdError> {
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(ContainerdError::rpc(op, object, status)),
        Err(_) => Err(ContainerdError::Timeout {
            op,
            object: object.to_string(),
            limit,
        }),
    }
}

fn size_i64(
    op: &'static str,
    object: &(dyn fmt::Display + Sync),
    size: u64,
) -> Result<i64, ContainerdError> {
    i64::try_from(size).map_err(|_| ContainerdError::InvalidArgument {
        what: op,
        value: object.to_string(),
        reason: format!("size {size} does not fit containerd's int64"),
    })
}

/// containerd's protobuf form of an OCI descriptor.
pub(crate) fn pb_descriptor(desc: &Descriptor) -> Result<PbDescriptor, ContainerdError> {
    Ok(PbDescriptor {
        media_type: desc.media_type.clone(),
        digest: desc.digest.to_string(),
        size: size_i64("descriptor", &desc.digest, desc.size)?,
        annotations: desc
            .annotations
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    })
}

impl ContainerdClient {
    /// Dials containerd's unix socket at `address`; requests go to `namespace`.
    pub async fn connect(address: &Path, namespace: &str) -> Result<Self, ContainerdError> {
        let namespace_header = header_value("namespace", namespace)?;
        let socket = address.to_path_buf();
        // The URI is required by the API but unused: the connector dials the socket.
        let endpoint =
            Endpoint::from_static("http://containerd").connect_timeout(Duration::from_secs(10));
        let channel = endpoint
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(socket).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }))
            .await
            .map_err(|source| ContainerdError::Connect {
                address: address.to_path_buf(),
                source,
            })?;
        Ok(ContainerdClient {
            channel,
            namespace: namespace.to_owned(),
            namespace_header,
            lease: None,
        })
    }

    /// The namespace requests go to.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The lease requests are made under, if any.
    pub fn lease(&self) -> Option<&str> {
        self.lease.as_ref().map(|(id, _)| id.as_str())
    }

    /// A client on the same connection whose requests belong to lease `id`.
    pub fn with_lease(&self, id: &str) -> Result<Self, ContainerdError> {
        let mut client = self.clone();
        client.lease = Some((id.to_owned(), header_value("lease id", id)?));
        Ok(client)
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        let metadata = request.metadata_mut();
        metadata.insert(NAMESPACE_HEADER, self.namespace_header.clone());
        if let Some((_, lease)) = &self.lease {
            metadata.insert(LEASE_HEADER, lease.clone());
        }
        request
    }

    // ----- leases -------------------------------------------------------------------

    /// Creates a lease that containerd deletes by itself after `expire_after` (in case
    /// this process dies); returns its id.
    pub async fn create_lease(&self, expire_after: Duration) -> Result<String, ContainerdError> {
        let expire = chrono::Utc::now()
            + chrono::Duration::from_std(expire_after).unwrap_or(chrono::Duration::hours(24));
        let request = pb_leases::CreateRequest {
            id: format!("zest-pull-{:016x}", rand::random::<u64>()),
            labels: HashMap::from([(
                LABEL_GC_EXPIRE.to_owned(),
                expire.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            )]),
        };
        let id = request.id.clone();
        let response = bounded(
            "lease create",
            &id,
            CALL_TIMEOUT,
            LeasesClient::new(self.channel.clone()).create(self.request(request)),
        )
        .await?;
        Ok(response.lease.map(|l| l.id).unwrap_or(id))
    }

    /// Deletes lease `id`; with `sync`, containerd collects garbage before answering.
    pub async fn delete_lease(&self, id: &str, sync: bool) -> Result<(), ContainerdError> {
        let request = pb_leases::DeleteRequest {
            id: id.to_owned(),
            sync,
        };
        bounded(
            "lease delete",
            &id,
            CALL_TIMEOUT,
            LeasesClient::new(self.channel.clone()).delete(self.request(request)),
        )
        .await
    }

    /// Ids of the namespace's leases.
    pub async fn list_leases(&self) -> Result<Vec<String>, ContainerdError> {
        let response = bounded(
            "lease list",
            &self.namespace,
            CALL_TIMEOUT,
            LeasesClient::new(self.channel.clone())
                .list(self.request(pb_leases::ListRequest::default())),
        )
        .await?;
        Ok(response.leases.into_iter().map(|l| l.id).collect())
    }

    // ----- content ------------------------------------------------------------------

    /// Info of blob `digest`, `None` if the content store does not have it.
    pub async fn content_info(
        &self,
        digest: &Digest,
    ) -> Result<Option<ContentInfo>, ContainerdError> {
        let request = pb_content::InfoRequest {
            digest: digest.to_string(),
        };
        match bounded(
            "content info",
            digest,
            CALL_TIMEOUT,
            ContentClient::new(self.channel.clone()).info(self.request(request)),
        )
        .await
        {
            Ok(response) => {
                let info = response.info.ok_or_else(|| {
                    ContainerdError::protocol("content info", digest, "no info in the answer")
                })?;
                Ok(Some(ContentInfo {
                    digest: info.digest,
                    size: u64::try_from(info.size).unwrap_or(0),
                    labels: info.labels.into_iter().collect(),
                }))
            }
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sets `labels` on blob `digest`, leaving its other labels alone.
    pub async fn set_content_labels(
        &self,
        digest: &Digest,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), ContainerdError> {
        if labels.is_empty() {
            return Ok(());
        }
        let request = pb_content::UpdateRequest {
            info: Some(pb_content::Info {
                digest: digest.to_string(),
                labels: labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: labels.keys().map(|k| format!("labels.{k}")).collect(),
            }),
        };
        bounded(
            "content update",
            digest,
            CALL_TIMEOUT,
            ContentClient::new(self.channel.clone()).update(self.request(request)),
        )
        .await
        .map(drop)
    }

    /// Starts writing blob `digest` of `size` bytes under ingest reference
    /// `ingest_ref`. `None` if the content store already has the blob (it is then
    /// added to this client's lease).
    pub async fn open_writer(
        &self,
        ingest_ref: &str,
        digest: &Digest,
        size: u64,
    ) -> Result<Option<ContentWriter>, ContainerdError> {
        const OP: &str = "content write";
        let total = size_i64(OP, digest, size)?;
        let (tx, rx) = mpsc::channel(2);
        // The first message must be queued before the call is awaited: containerd
        // sends its response headers only once it has read it.
        tx.send(pb_content::WriteContentRequest {
            action: WriteAction::Stat as i32,
            r#ref: ingest_ref.to_owned(),
            total,
            expected: digest.to_string(),
            ..Default::default()
        })
        .await
        .map_err(|_| ContainerdError::protocol(OP, digest, "request stream closed"))?;
        let mut content = ContentClient::new(self.channel.clone());
        let call = content.write(self.request(ReceiverStream::new(rx)));
        let responses = match bounded(OP, digest, CALL_TIMEOUT, call).await {
            Ok(responses) => responses,
            Err(e) if e.is_already_exists() => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut writer = ContentWriter {
            client: self.clone(),
            ingest_ref: ingest_ref.to_owned(),
            digest: *digest,
            size,
            tx: Some(tx),
            responses,
            offset: 0,
        };
        match writer.receive().await {
            Ok(_) => Ok(Some(writer)),
            Err(e) if e.is_already_exists() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Stores `data` as blob `digest` with `labels`. If the blob is already there,
    /// `labels` are set on it instead. Returns whether the blob was written.
    pub async fn write_blob(
        &self,
        ingest_ref: &str,
        digest: &Digest,
        data: &[u8],
        labels: &BTreeMap<String, String>,
    ) -> Result<bool, ContainerdError> {
        let Some(mut writer) = self
            .open_writer(ingest_ref, digest, data.len() as u64)
            .await?
        else {
            self.set_content_labels(digest, labels).await?;
            return Ok(false);
        };
        writer.write(data).await?;
        if writer.commit(labels).await? {
            Ok(true)
        } else {
            self.set_content_labels(digest, labels).await?;
            Ok(false)
        }
    }

    /// Abandons ingest `ingest_ref` (best effort: the lease removes it anyway).
    pub async fn abort_ingest(&self, ingest_ref: &str) -> Result<(), ContainerdError> {
        let request = pb_content::AbortRequest {
            r#ref: ingest_ref.to_owned(),
        };
        bounded(
            "content abort",
            &ingest_ref,
            CALL_TIMEOUT,
            ContentClient::new(self.channel.clone()).abort(self.request(request)),
        )
        .await
    }

    // ----- diff ---------------------------------------------------------------------

    /// Unpacks layer blob `layer` (from the content store) onto `mounts` (a prepared
    /// snapshot); returns the digest of the uncompressed tar (the layer's diff ID).
    pub async fn apply_layer(
        &self,
        layer: &Descriptor,
        mounts: Vec<Mount>,
    ) -> Result<Digest, ContainerdError> {
        const OP: &str = "diff apply";
        let request = ApplyRequest {
            diff: Some(pb_descriptor(layer)?),
            mounts,
        };
        let response = bounded(
            OP,
            &layer.digest,
            APPLY_TIMEOUT,
            DiffClient::new(self.channel.clone()).apply(self.request(request)),
        )
        .await?;
        let applied = response
            .applied
            .ok_or_else(|| ContainerdError::protocol(OP, layer.digest, "no applied descriptor"))?;
        applied.digest.parse().map_err(|e| {
            ContainerdError::protocol(
                OP,
                layer.digest,
                format!("applied digest {:?}: {e}", applied.digest),
            )
        })
    }

    // ----- images -------------------------------------------------------------------

    /// The target of image `name`, `None` if there is no such image.
    pub async fn image_target(&self, name: &str) -> Result<Option<PbDescriptor>, ContainerdError> {
        let request = pb_images::GetImageRequest {
            name: name.to_owned(),
        };
        match bounded(
            "image get",
            &name,
            CALL_TIMEOUT,
            ImagesClient::new(self.channel.clone()).get(self.request(request)),
        )
        .await
        {
            Ok(response) => Ok(response.image.and_then(|i| i.target)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Names of the namespace's images.
    pub async fn list_images(&self) -> Result<Vec<String>, ContainerdError> {
        let response = bounded(
            "image list",
            &self.namespace,
            CALL_TIMEOUT,
            ImagesClient::new(self.channel.clone())
                .list(self.request(pb_images::ListImagesRequest::default())),
        )
        .await?;
        Ok(response.images.into_iter().map(|i| i.name).collect())
    }

    /// Creates image `name` pointing at `target`, or points an existing image of that
    /// name at it (keeping its labels).
    pub async fn create_or_update_image(
        &self,
        name: &str,
        target: &Descriptor,
    ) -> Result<(), ContainerdError> {
        let image = pb_images::Image {
            name: name.to_owned(),
            target: Some(pb_descriptor(target)?),
            ..Default::default()
        };
        let created = bounded(
            "image create",
            &name,
            CALL_TIMEOUT,
            ImagesClient::new(self.channel.clone()).create(self.request(
                pb_images::CreateImageRequest {
                    image: Some(image.clone()),
                },
            )),
        )
        .await;
        match created {
            Ok(_) => Ok(()),
            Err(e) if e.is_already_exists() => bounded(
                "image update",
                &name,
                CALL_TIMEOUT,
                ImagesClient::new(self.channel.clone()).update(self.request(
                    pb_images::UpdateImageRequest {
                        image: Some(image),
                        update_mask: Some(prost_types::FieldMask {
                            paths: vec!["target".to_owned()],
                        }),
                    },
                )),
            )
            .await
            .map(drop),
            Err(e) => Err(e),
        }
    }

    // ----- snapshots ----------------------------------------------------------------

    /// Prepares active snapshot `key` on `parent` (empty: none) in `snapshotter`;
    /// returns its mounts. ALREADY_EXISTS from a remote snapshotter means it committed
    /// the layer itself (see [`super::pull`]).
    pub async fn prepare_snapshot(
        &self,
        snapshotter: &str,
        key: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, ContainerdError> {
        let request = pb_snapshots::PrepareSnapshotRequest {
            snapshotter: snapshotter.to_owned(),
            key: key.to_owned(),
            parent: parent.to_owned(),
            labels: labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        };
        let response = bounded(
            "snapshot prepare",
            &key,
            CALL_TIMEOUT,
            SnapshotsClient::new(self.channel.clone()).prepare(self.request(request)),
        )
        .await?;
        Ok(response.mounts)
    }

    /// Commits active snapshot `key` as `name` with `labels`.
    pub async fn commit_snapshot(
        &self,
        snapshotter: &str,
        name: &str,
        key: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), ContainerdError> {
        let request = pb_snapshots::CommitSnapshotRequest {
            snapshotter: snapshotter.to_owned(),
            name: name.to_owned(),
            key: key.to_owned(),
            labels: labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            parent: String::new(),
        };
        bounded(
            "snapshot commit",
            &name,
            CALL_TIMEOUT,
            SnapshotsClient::new(self.channel.clone()).commit(self.request(request)),
        )
        .await
    }

    /// Info of snapshot `key`, `None` if it does not exist.
    pub async fn stat_snapshot(
        &self,
        snapshotter: &str,
        key: &str,
    ) -> Result<Option<pb_snapshots::Info>, ContainerdError> {
        let request = pb_snapshots::StatSnapshotRequest {
            snapshotter: snapshotter.to_owned(),
            key: key.to_owned(),
        };
        match bounded(
            "snapshot stat",
            &key,
            CALL_TIMEOUT,
            SnapshotsClient::new(self.channel.clone()).stat(self.request(request)),
        )
        .await
        {
            Ok(response) => Ok(response.info),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Removes snapshot `key`.
    pub async fn remove_snapshot(
        &self,
        snapshotter: &str,
        key: &str,
    ) -> Result<(), ContainerdError> {
        let request = pb_snapshots::RemoveSnapshotRequest {
            snapshotter: snapshotter.to_owned(),
            key: key.to_owned(),
        };
        bounded(
            "snapshot remove",
            &key,
            CALL_TIMEOUT,
            SnapshotsClient::new(self.channel.clone()).remove(self.request(request)),
        )
        .await
    }
}

/// An open write of one blob into containerd's content store. Data goes out in 1 MiB
/// messages, each answered before the next is sent (as containerd's own client does).
/// Dropping the writer without [`ContentWriter::commit`] abandons the ingest.
pub struct ContentWriter {
    client: ContainerdClient,
    ingest_ref: String,
    digest: Digest,
    size: u64,
    tx: Option<mpsc::Sender<pb_content::WriteContentRequest>>,
    responses: tonic::Streaming<pb_content::WriteContentResponse>,
    offset: u64,
}

impl fmt::Debug for ContentWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContentWriter")
            .field("ingest_ref", &self.ingest_ref)
            .field("digest", &self.digest)
            .field("offset", &self.offset)
            .finish()
    }
}

impl ContentWriter {
    const OP: &'static str = "content write";

    /// Bytes written so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The ingest reference.
    pub fn ingest_ref(&self) -> &str {
        &self.ingest_ref
    }

    async fn receive(&mut self) -> Result<pb_content::WriteContentResponse, ContainerdError> {
        match tokio::time::timeout(CALL_TIMEOUT, self.responses.message()).await {
            Ok(Ok(Some(response))) => Ok(response),
            Ok(Ok(None)) => Err(ContainerdError::protocol(
                Self::OP,
                self.digest,
                "the write stream ended early",
            )),
            Ok(Err(status)) => Err(ContainerdError::rpc(Self::OP, self.digest, status)),
            Err(_) => Err(ContainerdError::Timeout {
                op: Self::OP,
                object: self.digest.to_string(),
                limit: CALL_TIMEOUT,
            }),
        }
    }

    async fn exchange(
        &mut self,
        request: pb_content::WriteContentRequest,
    ) -> Result<pb_content::WriteContentResponse, ContainerdError> {
        let sent = match &self.tx {
            Some(tx) => tx.send(request).await.is_ok(),
            None => false,
        };
        if !sent {
            // The call ended: its status says why.
            self.tx = None;
            return Err(match self.receive().await {
                Err(e) => e,
                Ok(_) => ContainerdError::protocol(Self::OP, self.digest, "request stream closed"),
            });
        }
        self.receive().await
    }

    /// Appends `data`.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), ContainerdError> {
        if self.offset + data.len() as u64 > self.size {
            return Err(ContainerdError::protocol(
                Self::OP,
                self.digest,
                format!(
                    "{} bytes written would exceed the blob's size {}",
                    self.offset + data.len() as u64,
                    self.size
                ),
            ));
        }
        for chunk in data.chunks(WRITE_CHUNK) {
            let offset = size_i64(Self::OP, &self.digest, self.offset)?;
            let response = self
                .exchange(pb_content::WriteContentRequest {
                    action: WriteAction::Write as i32,
                    offset,
                    data: chunk.to_vec(),
                    ..Default::default()
                })
                .await?;
            let expected = self.offset + chunk.len() as u64;
            if u64::try_from(response.offset).ok() != Some(expected) {
                return Err(ContainerdError::protocol(
                    Self::OP,
                    self.digest,
                    format!(
                        "containerd is at offset {} after a write up to {expected}",
                        response.offset
                    ),
                ));
            }
            self.offset = expected;
        }
        Ok(())
    }

    /// Commits the blob with `labels`; containerd verifies size and digest. Returns
    /// `false` if the blob was committed meanwhile by someone else (ALREADY_EXISTS),
    /// in which case `labels` were not applied.
    pub async fn commit(
        mut self,
        labels: &BTreeMap<String, String>,
    ) -> Result<bool, ContainerdError> {
        let request = pb_content::WriteContentRequest {
            action: WriteAction::Commit as i32,
            total: size_i64(Self::OP, &self.digest, self.size)?,
            expected: self.digest.to_string(),
            offset: size_i64(Self::OP, &self.digest, self.offset)?,
            labels: labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            ..Default::default()
        };
        let response = match self.exchange(request).await {
            Ok(response) => response,
            Err(e) if e.is_already_exists() => return Ok(false),
            Err(e) => return Err(e),
        };
        self.tx = None;
        if response.digest != self.digest.to_string()
            || u64::try_from(response.offset).ok() != Some(self.size)
        {
            return Err(ContainerdError::protocol(
                Self::OP,
                self.digest,
                format!(
                    "committed {} bytes with digest {:?}, expected {} bytes",
                    response.offset, response.digest, self.size
                ),
            ));
        }
        Ok(true)
    }

    /// Abandons the write and removes the ingest (best effort).
    pub async fn abort(mut self) {
        self.tx = None;
        // Let containerd see the end of the stream and release the ingest's lock.
        let _ = tokio::time::timeout(Duration::from_secs(5), self.responses.message()).await;
        if let Err(e) = self.client.abort_ingest(&self.ingest_ref).await {
            tracing::debug!(ingest = %self.ingest_ref, error = %e, "could not abort ingest");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_are_checked() {
        assert!(header_value("namespace", "k8s.io").is_ok());
        for bad in ["", "with space", "new\nline", "naïve"] {
            assert!(
                matches!(
                    header_value("namespace", bad),
                    Err(ContainerdError::InvalidArgument { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_missing_socket_is_a_clear_connect_error() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let socket = dir.path().join("containerd.sock");
        let err = ContainerdClient::connect(&socket, DEFAULT_NAMESPACE)
            .await
            .err()
            .unwrap_or_else(|| panic!("connecting to a missing socket succeeded"));
        assert!(matches!(err, ContainerdError::Connect { .. }), "{err:?}");
        assert!(err.to_string().contains("is containerd running"), "{err}");
    }

    #[test]
    fn descriptors_convert_to_containerds_form() {
        let mut desc = Descriptor::new("application/x", Digest::of(b"x"), 42);
        desc.annotations.insert("a".into(), "b".into());
        let pb = pb_descriptor(&desc).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(pb.digest, desc.digest.to_string());
        assert_eq!(pb.size, 42);
        assert_eq!(pb.annotations.get("a").map(String::as_str), Some("b"));
        desc.size = u64::MAX;
        assert!(pb_descriptor(&desc).is_err());
    }
}
