//! Running guest modules: the engine, the generated bindings, per-call stores with
//! limits, and the `Guest` handle with typed calls. Never names a tonic type.

pub mod bindings;
pub mod cache;
pub mod engine;
pub mod exports;
pub mod guest;
pub mod limits;

use std::time::Duration;

pub use bindings::ModuleError;
pub use engine::{Runtime, RuntimeStats};
pub use exports::Exports;
pub use guest::Guest;
pub use limits::{CallSettings, Limits, ModuleConfig};

/// Our WIT package (`wit/device-plugin.wit`).
pub const PACKAGE: &str = "wasm-device-plugin:device";
/// The version of [`PACKAGE`] this host implements: the one place it is written
/// in the host. Modules built against this version or an earlier one of the
/// same `0.minor` run (see `guest::check_world`).
pub const PACKAGE_VERSION: &str = "0.2.2";

/// The runtime could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// wasmtime refused the engine or linker configuration.
    #[error("wasm engine: {0}")]
    Engine(String),
}

/// Why a file is not a module this host can run.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Not WebAssembly at all.
    #[error("not a WebAssembly binary")]
    NotWasm,
    /// A core module, not a component.
    #[error(
        "a core WebAssembly module, not a component: build for wasm32-wasip2 (or run `wasm-tools component new`)"
    )]
    CoreModule,
    /// WebAssembly that does not validate or compile.
    #[error("invalid component: {0}")]
    Invalid(String),
    /// A component imports interfaces this host does not provide.
    #[error(
        "component imports {0}, which this host does not provide (modules get WASI 0.2 io, clocks, random, cli and filesystem, and no network)"
    )]
    UnsupportedImports(String),
    /// A component that does not fit our package (an incompatible version of it,
    /// no `scan` export, an export of the wrong type).
    #[error("component does not fit {package}@{version}: {0}", package = PACKAGE, version = PACKAGE_VERSION)]
    Incompatible(String),
}

/// How a guest call failed without returning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallFailure {
    /// It ran past its deadline.
    Deadline(Duration),
    /// It asked for more memory than its cap (bytes).
    OutOfMemory(usize),
    /// It trapped (a panic in a Rust guest, an unreachable, ...).
    Trap(String),
}

/// A guest call that did not produce a value.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The module answered with an error of its own.
    #[error("module {module}: {call} returned an error: {}", describe(error))]
    Module {
        /// Module name.
        module: String,
        /// The export called.
        call: &'static str,
        /// What the module said.
        error: ModuleError,
    },
    /// The call trapped or hit a limit.
    #[error("module {module}: {call} failed: {}", describe_failure(failure))]
    Failed {
        /// Module name.
        module: String,
        /// The export called.
        call: &'static str,
        /// How it failed.
        failure: CallFailure,
    },
}

fn describe(error: &ModuleError) -> String {
    match error {
        ModuleError::InvalidRequest(m) => format!("invalid request: {m}"),
        ModuleError::Unavailable(m) => format!("unavailable: {m}"),
        ModuleError::Internal(m) => format!("internal: {m}"),
    }
}

fn describe_failure(failure: &CallFailure) -> String {
    match failure {
        CallFailure::Deadline(d) => format!("deadline of {d:?} exceeded"),
        CallFailure::OutOfMemory(bytes) => {
            format!("memory limit of {} MiB exceeded", bytes / (1024 * 1024))
        }
        CallFailure::Trap(m) => format!("trapped: {m}"),
    }
}
