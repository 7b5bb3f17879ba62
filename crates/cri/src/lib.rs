//! A proxy of Kubernetes CRI's image service (`runtime.v1.ImageService`) in front of
//! containerd's, so that zest's lazy mounts can use the pull credentials the kubelet
//! passes (from the pod's imagePullSecrets).
//!
//! The kubelet is pointed at the proxy's socket (`--image-service-endpoint`); every
//! call is forwarded to containerd's CRI socket unchanged. On `PullImage` with
//! credentials, they are recorded first ([`CriCredentials`], by registry host and
//! repository, persisted root-only in the state directory), and the registry client
//! of `zest serve` consults them as a [`zest_registry::CredentialSource`] when
//! containerd then asks zest to mount the image's layers.
//!
//! | module | owns |
//! |---|---|
//! | `store` | the credentials: memory, the 0600 file, expiry, bounds |
//! | `auth` | CRI `AuthConfig` → registry credential; image name → repository |
//! | `proxy` | what happens to a request before it is forwarded |
//! | `grpc` | the tonic adapter: socket, byte forwarding, containerd channel |

mod auth;
mod error;
mod grpc;
mod proxy;
mod store;

pub use auth::{credential_of, repository_of};
pub use error::CriError;
pub use grpc::CriProxy;
pub use proxy::{ProxyConfig, IMAGE_SERVICE};
pub use store::{CredentialStoreConfig, CriCredentials, CREDENTIALS_FILE};
