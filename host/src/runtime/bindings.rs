//! Host bindings for the `device-plugin` world in `wit/`, generated at compile
//! time. Nothing hand-written lives here.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

wasmtime::component::bindgen!({
    path: "../wit",
    world: "device-plugin",
    exports: { default: async },
});

// The world's `use` already puts `AllocateRequest`, `ContainerResponse`, `DeviceKind`,
// `DeviceRef`, `Health` and `ModuleError` here.
pub use self::wasm_device_plugin::device::host::LogLevel;
pub use self::wasm_device_plugin::device::types::{ContainerRequest, DeviceSpec, KeyValue, Mount};
