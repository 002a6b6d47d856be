//! The kubelet device-plugin API `v1beta1`, generated from `proto/` at build time.
//! Nothing hand-written lives here.
#![allow(missing_docs, clippy::all, clippy::pedantic, unreachable_pub)]

tonic::include_proto!("v1beta1");

/// The API version this host speaks (upstream `pluginapi.Version`).
pub const VERSION: &str = "v1beta1";
/// The file name of kubelet's registration socket in the device-plugin directory.
pub const KUBELET_SOCKET: &str = "kubelet.sock";
