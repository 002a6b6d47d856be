//! Everything kubelet-facing. Each kubelet API is a *frontend* in a folder of its
//! own that serves resources from the registry's snapshots through the seam in
//! [`crate::frontend`]: `deviceplugin/` speaks the v1beta1 device-plugin API,
//! `dra/` (with the `dra` feature) Dynamic Resource Allocation.
//! What frontends share lives beside them: plugin sockets (`socket`), the watched
//! kubelet directory (`dir`), the thread the gRPC servers run on (`dataplane`)
//! the write coalescing of its connections (`coalesce`), and where each
//! resource stands with kubelet (`registrations`).
//! Never names a wasmtime type.

pub mod coalesce;
pub mod dataplane;
pub mod deviceplugin;
pub mod dir;
#[cfg(feature = "dra")]
pub mod dra;
pub mod registrations;
pub mod socket;
