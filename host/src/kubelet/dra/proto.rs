//! kubelet's plugin-watcher registration API and DRA plugin API (v1 and
//! v1beta1, which are the same messages), generated from `proto/` at build
//! time. Nothing hand-written lives here but upstream's Go constants.
#![allow(missing_docs, clippy::all, clippy::pedantic, unreachable_pub)]

/// `pluginregistration` (upstream `k8s.io/kubelet/pkg/apis/pluginregistration/v1`).
pub mod registration {
    #![allow(missing_docs, clippy::all, clippy::pedantic, unreachable_pub)]
    tonic::include_proto!("pluginregistration");

    /// The plugin type of a DRA driver (upstream `DRAPlugin`).
    pub const DRA_PLUGIN: &str = "DRAPlugin";
}

/// `k8s.io.kubelet.pkg.apis.dra.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic, unreachable_pub)]
    tonic::include_proto!("k8s.io.kubelet.pkg.apis.dra.v1");

    /// The service name kubelet looks for in `supported_versions` (upstream
    /// `drapbv1.DRAPluginService`).
    pub const SERVICE: &str = "v1.DRAPlugin";
}

/// `k8s.io.kubelet.pkg.apis.dra.v1beta1`.
pub mod v1beta1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic, unreachable_pub)]
    tonic::include_proto!("k8s.io.kubelet.pkg.apis.dra.v1beta1");

    /// As [`super::v1::SERVICE`], for v1beta1.
    pub const SERVICE: &str = "v1beta1.DRAPlugin";
}
