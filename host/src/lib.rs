//! wasm-device-plugin: a Kubernetes device plugin host whose device logic runs in
//! sandboxed WebAssembly components.
//!
//! Layers, with dependencies pointing one way
//! (`app → registry → {kubelet, runtime, policy} → domain`):
//! - [`kubelet`]: the v1beta1 protocol, sockets, registration, simulator;
//! - [`runtime`]: wasmtime engine, bindings, per-call stores, guest calls;
//! - [`policy`]: guest output → validated [`domain`] values, host paths checked
//!   against the module's [`grants`];
//! - [`registry`]: module discovery and lifecycle;
//! - [`app`]: wiring and shutdown; [`demo`]: the demo run; [`config`]: the CLI;
//! - [`inspect`]: `validate` and `allocate`, one module judged as the host would;
//! - [`gauge`]: counts of calls and streams in progress, for tests and metrics;
//! - [`metrics`]: Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` endpoints.
#![warn(missing_docs)]

pub mod app;
pub mod config;
pub mod demo;
pub mod domain;
pub mod gauge;
pub mod grants;
pub mod inspect;
pub mod kubelet;
pub mod metrics;
pub mod policy;
pub mod registry;
pub mod runtime;
