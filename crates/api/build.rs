//! Generates the Rust code for containerd's and Kubernetes' APIs from the workspace's
//! `proto/` at build time.
//!
//! `protox` compiles the `.proto` files in pure Rust, so no system `protoc` is needed;
//! the well-known Google types come from `prost-types`. Three sets, each in `OUT_DIR`:
//!
//! - the snapshot API (server and client: zest serves it) with `containerd.types`
//!   (`Mount`, `Descriptor`);
//! - containerd's content, images, leases and diff services (client only: `zest pull`
//!   calls them); they refer to the `containerd.types` generated above instead of
//!   generating their own copy;
//! - the Kubernetes CRI image service (client; the proxy in `zest-cri` serves it by
//!   forwarding bytes, so no server code is generated).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = "../../proto";
    let snapshots = [
        "../../proto/api/services/snapshots/v1/snapshots.proto",
        "../../proto/api/types/mount.proto",
        "../../proto/api/types/descriptor.proto",
    ];
    let services = [
        "../../proto/api/services/content/v1/content.proto",
        "../../proto/api/services/images/v1/images.proto",
        "../../proto/api/services/leases/v1/leases.proto",
        "../../proto/api/services/diff/v1/diff.proto",
    ];
    let cri = ["../../proto/cri/runtime/v1/api.proto"];
    for proto in snapshots.iter().chain(&services).chain(&cri) {
        println!("cargo:rerun-if-changed={proto}");
    }

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(protox::compile(snapshots, [root])?)?;

    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .extern_path(".containerd.types", "crate::types")
        .compile_fds(protox::compile(services, [root])?)?;

    // AuthConfig carries pull secrets: its Debug is written by hand (redacted).
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .skip_debug([".runtime.v1.AuthConfig"])
        .compile_fds(protox::compile(cri, ["../../proto/cri"])?)?;
    Ok(())
}
