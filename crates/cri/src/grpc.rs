//! The gRPC adapter (the only file of this crate naming tonic): the CRI image
//! service on a unix socket, every call forwarded as bytes to containerd's CRI
//! socket and its answer (or error status) returned as is.
//!
//! Forwarding bytes rather than decoded messages keeps every field the kubelet and
//! containerd exchange, including those zest's protobuf subset does not model, and
//! any method the image service gains later.

use std::convert::Infallible;
use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::body::Body;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

use crate::error::CriError;
use crate::proxy::{before_forward, ProxyConfig, IMAGE_SERVICE};
use crate::store::CriCredentials;

/// Largest message either way; the kubelet allows 16 MiB (long image lists).
const MAX_MESSAGE: usize = 16 << 20;

/// Messages as their wire bytes.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// The image service: every `/runtime.v1.ImageService/<Method>` call forwarded.
#[derive(Clone)]
struct ImageServiceProxy {
    upstream: Channel,
    creds: Arc<CriCredentials>,
}

impl NamedService for ImageServiceProxy {
    const NAME: &'static str = IMAGE_SERVICE;
}

/// One call: `method` of the image service.
struct Forward {
    proxy: ImageServiceProxy,
    method: String,
}

impl tonic::server::UnaryService<Bytes> for Forward {
    type Response = Bytes;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<tonic::Response<Bytes>, Status>> + Send + 'static>,
    >;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let proxy = self.proxy.clone();
        let method = self.method.clone();
        Box::pin(async move {
            // Recorded before containerd sees the pull: it asks zest for the
            // layers while PullImage is still running.
            before_forward(&proxy.creds, &method, request.get_ref()).await;
            let path = http::uri::PathAndQuery::try_from(format!("/{IMAGE_SERVICE}/{method}"))
                .map_err(|_| Status::unimplemented(format!("no method {method:?}")))?;
            let (metadata, extensions, body) = request.into_parts();
            let forwarded = tonic::Request::from_parts(metadata, extensions, body);
            let mut client = tonic::client::Grpc::new(proxy.upstream.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE);
            client.ready().await.map_err(|e| {
                Status::unavailable(format!(
                    "zest's CRI proxy cannot reach containerd's CRI socket: {e}"
                ))
            })?;
            client.unary(forwarded, path, RawCodec).await
        })
    }
}

impl<B> tower::Service<http::Request<B>> for ImageServiceProxy
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req
            .uri()
            .path()
            .strip_prefix(&format!("/{IMAGE_SERVICE}/"))
            .filter(|m| !m.is_empty() && !m.contains('/'))
            .map(str::to_owned);
        let proxy = self.clone();
        Box::pin(async move {
            let Some(method) = method else {
                return Ok(
                    Status::unimplemented("not a method of runtime.v1.ImageService").into_http(),
                );
            };
            let mut grpc = tonic::server::Grpc::new(RawCodec)
                .apply_max_message_size_config(Some(MAX_MESSAGE), Some(MAX_MESSAGE));
            Ok(grpc.unary(Forward { proxy, method }, req).await)
        })
    }
}

/// A channel to containerd's socket, connected on first use (containerd may start
/// after zest) and again after containerd restarts.
fn upstream_channel(socket: &Path) -> Result<Channel, CriError> {
    let socket = socket.to_path_buf();
    // The URI is required by the API but unused: the connector dials the socket.
    let endpoint = Endpoint::try_from("http://localhost")
        .map_err(|e| CriError::Serve(e.to_string()))?
        .connect_timeout(Duration::from_secs(10));
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        })),
    )
}

/// Binds `path` as a unix socket with `mode`, replacing a stale socket.
async fn bind_socket(path: &Path, mode: u32) -> Result<UnixListener, CriError> {
    let err = |detail: String| CriError::Socket {
        path: path.to_path_buf(),
        detail,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| err(format!("creating its directory: {e}")))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(err(
                    "another process serves it; stop it or choose another cri.socket".into(),
                ));
            }
            std::fs::remove_file(path)
                .map_err(|e| err(format!("removing the stale socket: {e}")))?;
        }
        Ok(_) => {
            return Err(err(
                "the path exists and is not a socket; remove it or choose another cri.socket"
                    .into(),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e.to_string())),
    }
    let listener = UnixListener::bind(path).map_err(|e| err(e.to_string()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| err(format!("setting its mode: {e}")))?;
    Ok(listener)
}

/// The CRI image-service proxy, bound and ready to serve.
pub struct CriProxy {
    listener: UnixListener,
    socket: PathBuf,
    service: ImageServiceProxy,
}

impl std::fmt::Debug for CriProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CriProxy")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl CriProxy {
    /// Binds the socket (so that a mistake shows at start) and prepares the
    /// channel to containerd; `creds` receives the credentials of pulls.
    pub async fn bind(config: &ProxyConfig, creds: Arc<CriCredentials>) -> Result<Self, CriError> {
        let listener = bind_socket(&config.socket, config.socket_mode).await?;
        let upstream = upstream_channel(&config.upstream)?;
        Ok(CriProxy {
            listener,
            socket: config.socket.clone(),
            service: ImageServiceProxy { upstream, creds },
        })
    }

    /// Serves until `shutdown` completes, then removes the socket.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), CriError> {
        let result = tonic::transport::Server::builder()
            .add_service(self.service)
            .serve_with_incoming_shutdown(UnixListenerStream::new(self.listener), shutdown)
            .await
            .map_err(|e| CriError::Serve(e.to_string()));
        let _ = std::fs::remove_file(&self.socket);
        result
    }
}
