//! The gRPC face of the snapshotter: converts containerd's protobuf messages to and
//! from the domain types of [`SnapshotStore`], maps [`SnapshotError`] to gRPC codes,
//! and runs the gRPC server on a listener ([`serve`]).
//! The only file of the snapshotter that names tonic or the generated types.

use std::future::Future;
use std::pin::Pin;

use futures::Stream;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Code, Request, Response, Status};

use super::store::{SnapshotStore, UpdateInfo};
use super::types::{Info, Kind, Labels, Mount, SnapshotError};
use zest_api::snapshots as pb;
use zest_api::snapshots::snapshots_server::{Snapshots, SnapshotsServer};
use zest_api::types as pbtypes;

/// Infos per `List` response message; keeps each message far below gRPC's 4 MiB limit
/// even with large labels.
const LIST_BATCH: usize = 100;

/// Serves [`SnapshotStore`] as `containerd.services.snapshots.v1.Snapshots`.
#[derive(Clone)]
pub struct SnapshotService {
    store: SnapshotStore,
}

impl SnapshotService {
    /// Wraps a store.
    pub fn new(store: SnapshotStore) -> Self {
        SnapshotService { store }
    }

    /// The tonic service, ready for `tonic::transport::Server::add_service`.
    pub fn into_server(self) -> SnapshotsServer<Self> {
        SnapshotsServer::new(self)
    }
}

/// The gRPC server failed (accepting connections or speaking HTTP/2); the
/// transport's own error is the source.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TransportError(#[source] tonic::transport::Error);

/// Serves `store` on `listener` until `shutdown` completes, then lets in-flight
/// requests finish.
pub(crate) async fn serve(
    store: SnapshotStore,
    listener: UnixListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), TransportError> {
    tonic::transport::Server::builder()
        .add_service(SnapshotService::new(store).into_server())
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(TransportError)
}

/// Maps a domain error to the gRPC status containerd turns back into its error kinds.
fn status(error: SnapshotError) -> Status {
    let code = match &error {
        SnapshotError::NotFound(_) => Code::NotFound,
        SnapshotError::AlreadyExists(_) => Code::AlreadyExists,
        SnapshotError::FailedPrecondition(_) => Code::FailedPrecondition,
        SnapshotError::InvalidArgument(_) => Code::InvalidArgument,
        SnapshotError::Unavailable(_) => Code::Unavailable,
        SnapshotError::Io { .. }
        | SnapshotError::Database { .. }
        | SnapshotError::Corrupt(_)
        | SnapshotError::Internal(_) => {
            tracing::error!(error = %error, "snapshot operation failed");
            Code::Internal
        }
    };
    Status::new(code, error.to_string())
}

/// The containerd namespace of a request, for the log only: containerd's metadata
/// layer already makes keys unique across namespaces.
fn namespace<T>(request: &Request<T>) -> String {
    request
        .metadata()
        .get("containerd-namespace")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

fn parent(parent: String) -> Option<String> {
    (!parent.is_empty()).then_some(parent)
}

fn mounts(mounts: Vec<Mount>) -> Vec<pbtypes::Mount> {
    mounts
        .into_iter()
        .map(|m| pbtypes::Mount {
            r#type: m.fs_type,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn kind(kind: Kind) -> pb::Kind {
    match kind {
        Kind::View => pb::Kind::View,
        Kind::Active => pb::Kind::Active,
        Kind::Committed => pb::Kind::Committed,
    }
}

fn info(info: Info) -> pb::Info {
    pb::Info {
        name: info.name,
        parent: info.parent.unwrap_or_default(),
        kind: kind(info.kind) as i32,
        created_at: Some(info.created.into()),
        updated_at: Some(info.updated.into()),
        labels: info.labels.into_iter().collect(),
    }
}

fn labels(map: std::collections::HashMap<String, String>) -> Labels {
    map.into_iter().collect()
}

type ListStream = Pin<Box<dyn Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Snapshots for SnapshotService {
    async fn prepare(
        &self,
        request: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let ns = namespace(&request);
        let r = request.into_inner();
        tracing::debug!(namespace = %ns, key = %r.key, parent = %r.parent, labels = ?r.labels, "prepare");
        let result = self
            .store
            .prepare(&r.key, parent(r.parent).as_deref(), labels(r.labels))
            .await;
        Ok(Response::new(pb::PrepareSnapshotResponse {
            mounts: mounts(result.map_err(status)?),
        }))
    }

    async fn view(
        &self,
        request: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let ns = namespace(&request);
        let r = request.into_inner();
        tracing::debug!(namespace = %ns, key = %r.key, parent = %r.parent, "view");
        let result = self
            .store
            .view(&r.key, parent(r.parent).as_deref(), labels(r.labels))
            .await;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: mounts(result.map_err(status)?),
        }))
    }

    async fn mounts(
        &self,
        request: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let ns = namespace(&request);
        let r = request.into_inner();
        tracing::debug!(namespace = %ns, key = %r.key, "mounts");
        let result = self.store.mounts(&r.key).await;
        Ok(Response::new(pb::MountsResponse {
            mounts: mounts(result.map_err(status)?),
        }))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let ns = namespace(&request);
        let r = request.into_inner();
        tracing::debug!(namespace = %ns, key = %r.key, name = %r.name, "commit");
        self.store
            .commit(
                &r.name,
                &r.key,
                labels(r.labels),
                parent(r.parent).as_deref(),
            )
            .await
            .map_err(status)?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let ns = namespace(&request);
        let r = request.into_inner();
        tracing::debug!(namespace = %ns, key = %r.key, "remove");
        self.store.remove(&r.key).await.map_err(status)?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let r = request.into_inner();
        let result = self.store.stat(&r.key).await.map_err(status)?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(info(result)),
        }))
    }

    async fn update(
        &self,
        request: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let ns = namespace(&request);
        let r = request.into_inner();
        let Some(requested) = r.info else {
            return Err(Status::invalid_argument(
                "update request without snapshot info",
            ));
        };
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        tracing::debug!(namespace = %ns, name = %requested.name, ?paths, "update");
        let updated = self
            .store
            .update(
                UpdateInfo {
                    name: requested.name,
                    labels: labels(requested.labels),
                },
                &paths,
            )
            .await
            .map_err(status)?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(info(updated)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = request.into_inner();
        let infos = self.store.list(&r.filters).await.map_err(status)?;
        let mut batches = Vec::with_capacity(infos.len().div_ceil(LIST_BATCH));
        let mut infos = infos.into_iter().map(info).peekable();
        while infos.peek().is_some() {
            let batch: Vec<pb::Info> = infos.by_ref().take(LIST_BATCH).collect();
            batches.push(Ok(pb::ListSnapshotsResponse { info: batch }));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        request: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let r = request.into_inner();
        let usage = self.store.usage(&r.key).await.map_err(status)?;
        Ok(Response::new(pb::UsageResponse {
            size: usage.size,
            inodes: usage.inodes,
        }))
    }

    async fn cleanup(&self, _request: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        self.store.cleanup().await.map_err(status)?;
        Ok(Response::new(()))
    }
}
