//! Everything kubelet-facing. Each kubelet API is a *frontend* in a folder of its
//! own that serves resources from the registry's snapshots through the seam in
//! [`crate::frontend`]: `deviceplugin/` speaks the v1beta1 device-plugin API.
//! What frontends share lives beside them: plugin sockets (`socket`), the watched
//! kubelet directory (`dir`), the thread the gRPC servers run on (`dataplane`)
//! and the write coalescing of its connections (`coalesce`).
//! Never names a wasmtime type.

pub mod coalesce;
pub mod dataplane;
pub mod deviceplugin;
pub mod dir;
pub mod socket;
