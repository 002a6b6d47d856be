//! Generates the kubelet device-plugin API (`proto/`) into `OUT_DIR` with protox, a
//! pure-Rust protobuf compiler, so no build needs a system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = "../proto";
    let api = "../proto/deviceplugin/v1beta1/api.proto";
    println!("cargo:rerun-if-changed={api}");
    let descriptors = protox::compile([api], [proto_root])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
