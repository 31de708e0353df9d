//! Compiles proto/ with protox (no system `protoc`) into Rust with tonic-prost-build, and
//! writes the encoded descriptor set that server reflection serves.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/inference/grpc_service.proto",
        "proto/xds/data/orca/v3/orca_load_report.proto",
        "proto/xds/service/orca/v3/orca.proto",
        "proto/infergate/admin/v1/admin.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("infergate_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
