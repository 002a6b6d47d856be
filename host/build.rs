//! Generates the kubelet APIs (`proto/`) into `OUT_DIR` with protox, a pure-Rust
//! protobuf compiler, so no build needs a system `protoc`: the device-plugin API,
//! and for the DRA frontend the plugin-watcher registration API and the DRA
//! plugin API (v1 and v1beta1).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = "../proto";
    let apis = [
        "../proto/deviceplugin/v1beta1/api.proto",
        "../proto/pluginregistration/v1/api.proto",
        "../proto/dra/v1/api.proto",
        "../proto/dra/v1beta1/api.proto",
    ];
    for api in apis {
        println!("cargo:rerun-if-changed={api}");
    }
    let descriptors = protox::compile(apis, [proto_root])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
