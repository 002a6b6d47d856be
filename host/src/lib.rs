//! wasm-device-plugin: a Kubernetes device plugin host whose device logic runs in
//! sandboxed WebAssembly components.
//!
//! Layers, with dependencies pointing one way
//! (`app → {kubelet frontends, registry} → {runtime, policy} → domain`):
//! - [`kubelet`]: what kubelet-facing frontends share (sockets, the watched
//!   kubelet directory, the data-plane thread), and the frontends themselves:
//!   [`kubelet::deviceplugin`], the v1beta1 device-plugin API with its simulator;
//! - [`frontend`] and [`snapshot`]: the seam between the registry and the
//!   frontends: one immutable [`snapshot::ResourceSnapshot`] per change of a
//!   resource, carrying the [`frontend::Backend`] that allocates its devices;
//! - [`registry`]: module discovery, the one load path, each module's lifecycle
//!   and the snapshots of its resources; names no protocol type;
//! - [`runtime`]: wasmtime engine, bindings, per-call stores, guest calls;
//! - [`merge`]: the host's allocation for modules that do not export `allocate`;
//! - [`policy`]: guest output → validated [`domain`] values, host paths checked
//!   against the module's [`grants`];
//! - [`app`]: wiring, shutdown and probes; [`demo`]: the demo run; [`config`]:
//!   the CLI;
//! - [`inspect`]: `validate` and `allocate`, one module judged as the host would;
//! - [`cdi`]: Container Device Interface specs: names, the spec of a resource,
//!   and the spec files the host writes, removes and sweeps;
//! - [`gauge`]: counts of calls and streams in progress, for tests and metrics;
//! - [`metrics`]: Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` endpoints.
#![warn(missing_docs)]

pub mod app;
pub mod cdi;
pub mod config;
pub mod demo;
pub mod domain;
pub mod frontend;
pub mod gauge;
pub mod grants;
pub mod inspect;
pub mod kubelet;
pub mod merge;
pub mod metrics;
pub mod policy;
pub mod registry;
pub mod runtime;
pub mod snapshot;
