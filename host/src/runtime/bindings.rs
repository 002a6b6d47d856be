//! Host bindings for the `device-driver` world in `wit/` (every export), generated at compile
//! time: the types and the `host` import. Nothing hand-written lives here.
//! Exports are optional, so they are found and called through
//! `runtime::exports`, not the generated `DevicePluginPre` (which requires all).
#![allow(missing_docs, clippy::all, clippy::pedantic)]

wasmtime::component::bindgen!({
    path: "../wit",
    world: "device-driver",
    exports: { default: async },
});

// The world's `use` already puts `AllocateRequest`, `ContainerResponse`, `DeviceKind`,
// `DeviceRef`, `Health`, `ModuleError`, `DeviceDetails`, `PrepareRequest` and
// `UnprepareRequest` here.
pub use self::wasm_device_plugin::device::host::LogLevel;
pub use self::wasm_device_plugin::device::types::{
    Attribute, AttributeValue, Capacity, ClaimRef, ClaimRequest, ContainerRequest, DeviceSpec,
    KeyValue, Mount,
};
