//! Generates the Rust code for containerd's snapshot API from `proto/` at build time.
//!
//! `protox` compiles the `.proto` files in pure Rust, so no system `protoc` is needed;
//! the well-known Google types come from `prost-types`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/api/services/snapshots/v1/snapshots.proto",
        "proto/api/types/mount.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
