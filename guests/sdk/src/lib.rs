//! Write a [wasm-device-plugin] device module in Rust.
//!
//! The host serves kubelet; a module answers up to four questions about its
//! devices (see `wit/device-plugin.wit`, package
//! `wasm-device-plugin:device@0.2.2`), and only the first is required; a
//! resource served through DRA may ask three more (see [DRA](#dra)). With
//! this crate a module implements [`DevicePlugin::scan`] and exports it with
//! [`export_device_plugin!`]:
//!
//! ```no_run
//! use wdp_sdk::{config, info, Device, DeviceKind, DevicePlugin, ModuleError};
//!
//! struct Serial;
//!
//! impl DevicePlugin for Serial {
//!     fn scan() -> Result<Vec<DeviceKind>, ModuleError> {
//!         let count: u32 = config::parse("count")?.unwrap_or(2);
//!         info!("reporting {count} ports");
//!         Ok(vec![DeviceKind::new("serial").with_devices((0..count).map(|n| {
//!             let path = format!("/dev/ttyUSB{n}");
//!             Device::new(format!("ttyUSB{n}")).node(&path, &path, "rw")
//!         }))])
//!     }
//! }
//!
//! wdp_sdk::export_device_plugin!(Serial);
//! ```
//!
//! That module exports `scan` alone (the WIT `scanner` world), and the host
//! supplies the rest:
//! - **health** comes from each scan (a device's [`Device::health`]), at the
//!   scan interval;
//! - **allocate** gives each container the merge of what `scan` reported for
//!   its devices ([`Device::allocation`]): nodes, mounts and CDI names once each,
//!   an environment variable or annotation set by several devices with its
//!   distinct values joined by `,` (`IDS=a,b`), and an error when two devices
//!   need different mounts or nodes at one container path. The host does this
//!   without running the module;
//! - **post-allocate**: none; the response is final.
//!
//! A module that needs more implements the hook's trait ([`HealthCheck`],
//! [`Allocate`], [`PostAllocate`]) and names the hook in the macro, in this
//! order:
//!
//! ```ignore
//! wdp_sdk::export_device_plugin!(Serial with health);
//! wdp_sdk::export_device_plugin!(Serial with allocate, post_allocate);
//! wdp_sdk::export_device_plugin!(Serial with health, allocate, post_allocate);
//! ```
//!
//! Only the named hooks are exported, so the host knows which it must call
//! (each exported hook costs a call into the module; an Allocate of a module
//! with neither `allocate` nor `post_allocate` never instantiates it). A trait
//! implemented but not named is not exported; a hook named but not implemented
//! does not compile.
//!
//! ## DRA
//!
//! A resource served through Dynamic Resource Allocation (`api = "dra"` in the
//! manifest) may ask three more questions, each optional and never asked
//! through the device-plugin API: [`Describe`] (the attributes and capacities
//! published for each device in its ResourceSlice), [`Prepare`] (what the
//! containers of a claim's pods get, one response per request of the claim,
//! with the claim's opaque configuration for this driver as JSON text) and
//! [`Unprepare`] (undo what `prepare` did once no pod uses the claim). Export
//! them with [`export_dra_hooks!`], beside [`export_device_plugin!`]:
//!
//! ```no_run
//! use wdp_sdk::{
//!     ContainerResponse, Describe, Device, DeviceDetails, DeviceKind, DevicePlugin, DeviceRef,
//!     ModuleError, Prepare, PrepareRequest, config,
//! };
//!
//! struct Accelerators;
//!
//! impl DevicePlugin for Accelerators {
//!     fn scan() -> Result<Vec<DeviceKind>, ModuleError> {
//!         Ok(vec![DeviceKind::new("accel").device(Device::new("accel0").node(
//!             "/dev/accel0",
//!             "/dev/accel0",
//!             "rw",
//!         ))])
//!     }
//! }
//!
//! impl Describe for Accelerators {
//!     fn describe(devices: Vec<DeviceRef>) -> Result<Vec<DeviceDetails>, ModuleError> {
//!         let model = config::get_or("model", "a1");
//!         Ok(devices
//!             .iter()
//!             .map(|_| {
//!                 DeviceDetails::new()
//!                     .text("model", &model)
//!                     .version("driverVersion", "1.2.0")
//!                     .capacity("memory", "16Gi")
//!             })
//!             .collect())
//!     }
//! }
//!
//! impl Prepare for Accelerators {
//!     fn prepare(request: PrepareRequest) -> Result<Vec<ContainerResponse>, ModuleError> {
//!         request
//!             .requests
//!             .iter()
//!             .map(|asked| {
//!                 // The opaque configuration: one JSON text per entry, the
//!                 // DeviceClass's first, then the claim's. Parse it (with
//!                 // serde_json, say) and refuse what you do not understand;
//!                 // this driver takes none.
//!                 if !asked.config.is_empty() {
//!                     return Err(ModuleError::InvalidRequest(format!(
//!                         "claim {}, request `{}`: this driver takes no configuration",
//!                         request.claim, asked.name
//!                     )));
//!                 }
//!                 let mut response = ContainerResponse::new();
//!                 for allocation in &asked.allocations {
//!                     response.merge(allocation);
//!                 }
//!                 Ok(response.env("ACCEL_IDS", &asked.device_ids.join(",")))
//!             })
//!             .collect()
//!     }
//! }
//!
//! wdp_sdk::export_device_plugin!(Accelerators);
//! wdp_sdk::export_dra_hooks!(Accelerators with describe, prepare);
//! ```
//!
//! The component then exports `scan`, `describe` and `prepare`. Without
//! `describe` the host publishes only its own attributes (`kind`, `id`,
//! `numaNode`); without `prepare` it prepares a claim through `allocate` (or
//! its default) with one container per request, and refuses a claim that
//! carries opaque configuration; without `unprepare` it only removes the
//! claim's CDI spec. A `prepare` answer must carry no annotations: the host
//! writes it into a CDI spec, which cannot carry them.
//!
//! Keep no state between calls, derive everything from [`config`] and the files
//! the operator granted: `scan` and `health` run in a fresh instance, and an
//! allocation may run in one that answered earlier allocations (see the WIT
//! contract), so what a call leaves in memory may or may not be there later.
//!
//! [wasm-device-plugin]: https://example.invalid/wasm-device-plugin

#![warn(missing_docs)]

/// The bindings generated from the host's WIT `device-driver` world (every
/// export, so every type of the package). Everything a module needs is
/// re-exported at the crate root; this is here for the rare lower-level need.
/// Its `export_world!` would export all seven functions; the SDK's macros
/// export through [`worlds`] instead.
#[allow(missing_docs, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "device-driver",
        pub_export_macro: true,
        export_macro_name: "export_world",
        default_bindings_module: "wdp_sdk::bindings",
    });
}

/// One world per choice of device-plugin hooks, for [`export_device_plugin!`]:
/// `scanner` and `device-plugin` from the WIT package, the others restating the
/// package's signatures (a WIT world cannot `include` one that `use`s the same
/// types). And one world per DRA hook, each exporting that function alone, for
/// [`export_dra_hooks!`]: every `export!` embeds its world in the module (a
/// `component-type` custom section), and wit-component merges the worlds of
/// all the sections a module links into one component, so a module exports
/// the union of the worlds it invoked `export!` for, and nothing else. All
/// share the types and the `host` import of [`bindings`].
#[doc(hidden)]
pub mod worlds {
    /// Generates the bindings of world `$world` of the SDK's worlds into
    /// module `$module`.
    macro_rules! sdk_world {
        ($module:ident, $world:literal, $bindings:literal) => {
            #[allow(missing_docs, clippy::all)]
            pub mod $module {
                wit_bindgen::generate!({
                    inline: "
                        package wdp:sdk;

                        world scan-health {
                            use wasm-device-plugin:device/types@0.2.2.{device-kind, device-ref, health, module-error};
                            import wasm-device-plugin:device/host@0.2.2;
                            export scan: func() -> result<list<device-kind>, module-error>;
                            export health: func(devices: list<device-ref>) -> result<list<health>, module-error>;
                        }

                        world scan-allocate {
                            use wasm-device-plugin:device/types@0.2.2.{device-kind, allocate-request, container-response, module-error};
                            import wasm-device-plugin:device/host@0.2.2;
                            export scan: func() -> result<list<device-kind>, module-error>;
                            export allocate: func(request: allocate-request) -> result<list<container-response>, module-error>;
                        }

                        world scan-post-allocate {
                            use wasm-device-plugin:device/types@0.2.2.{device-kind, allocate-request, container-response, module-error};
                            import wasm-device-plugin:device/host@0.2.2;
                            export scan: func() -> result<list<device-kind>, module-error>;
                            export post-allocate: func(request: allocate-request, response: list<container-response>) -> result<list<container-response>, module-error>;
                        }

                        world scan-health-allocate {
                            use wasm-device-plugin:device/types@0.2.2.{device-kind, device-ref, health, allocate-request, container-response, module-error};
                            import wasm-device-plugin:device/host@0.2.2;
                            export scan: func() -> result<list<device-kind>, module-error>;
                            export health: func(devices: list<device-ref>) -> result<list<health>, module-error>;
                            export allocate: func(request: allocate-request) -> result<list<container-response>, module-error>;
                        }

                        world scan-health-post-allocate {
                            use wasm-device-plugin:device/types@0.2.2.{device-kind, device-ref, health, allocate-request, container-response, module-error};
                            import wasm-device-plugin:device/host@0.2.2;
                            export scan: func() -> result<list<device-kind>, module-error>;
                            export health: func(devices: list<device-ref>) -> result<list<health>, module-error>;
                            export post-allocate: func(request: allocate-request, response: list<container-response>) -> result<list<container-response>, module-error>;
                        }

                        world dra-describe {
                            use wasm-device-plugin:device/types@0.2.2.{device-ref, device-details, module-error};
                            import wasm-device-plugin:device/host@0.2.2;
                            export describe: func(devices: list<device-ref>) -> result<list<device-details>, module-error>;
                        }

                        world dra-prepare {
                            use wasm-device-plugin:device/types@0.2.2.{prepare-request, container-response, module-error};
                            import wasm-device-plugin:device/host@0.2.2;
                            export prepare: func(request: prepare-request) -> result<list<container-response>, module-error>;
                        }

                        world dra-unprepare {
                            use wasm-device-plugin:device/types@0.2.2.{unprepare-request, module-error};
                            import wasm-device-plugin:device/host@0.2.2;
                            export unprepare: func(request: unprepare-request) -> result<_, module-error>;
                        }

                        world scan-allocate-post-allocate {
                            use wasm-device-plugin:device/types@0.2.2.{device-kind, allocate-request, container-response, module-error};
                            import wasm-device-plugin:device/host@0.2.2;
                            export scan: func() -> result<list<device-kind>, module-error>;
                            export allocate: func(request: allocate-request) -> result<list<container-response>, module-error>;
                            export post-allocate: func(request: allocate-request, response: list<container-response>) -> result<list<container-response>, module-error>;
                        }
                    ",
                    path: "../../wit",
                    world: $world,
                    with: {
                        "wasm-device-plugin:device/types@0.2.2": crate::bindings::wasm_device_plugin::device::types,
                        "wasm-device-plugin:device/host@0.2.2": crate::bindings::wasm_device_plugin::device::host,
                    },
                    pub_export_macro: true,
                    export_macro_name: "export",
                    default_bindings_module: $bindings,
                });
            }
        };
    }

    #[allow(missing_docs, clippy::all)]
    pub mod scanner {
        wit_bindgen::generate!({
            path: "../../wit",
            world: "scanner",
            with: {
                "wasm-device-plugin:device/types@0.2.2": crate::bindings::wasm_device_plugin::device::types,
                "wasm-device-plugin:device/host@0.2.2": crate::bindings::wasm_device_plugin::device::host,
            },
            pub_export_macro: true,
            export_macro_name: "export",
            default_bindings_module: "wdp_sdk::worlds::scanner",
        });
    }
    #[allow(missing_docs, clippy::all)]
    pub mod device_plugin {
        wit_bindgen::generate!({
            path: "../../wit",
            world: "device-plugin",
            with: {
                "wasm-device-plugin:device/types@0.2.2": crate::bindings::wasm_device_plugin::device::types,
                "wasm-device-plugin:device/host@0.2.2": crate::bindings::wasm_device_plugin::device::host,
            },
            pub_export_macro: true,
            export_macro_name: "export",
            default_bindings_module: "wdp_sdk::worlds::device_plugin",
        });
    }
    sdk_world!(health, "scan-health", "wdp_sdk::worlds::health");
    sdk_world!(allocate, "scan-allocate", "wdp_sdk::worlds::allocate");
    sdk_world!(
        post_allocate,
        "scan-post-allocate",
        "wdp_sdk::worlds::post_allocate"
    );
    sdk_world!(
        health_allocate,
        "scan-health-allocate",
        "wdp_sdk::worlds::health_allocate"
    );
    sdk_world!(
        health_post_allocate,
        "scan-health-post-allocate",
        "wdp_sdk::worlds::health_post_allocate"
    );
    sdk_world!(
        allocate_post_allocate,
        "scan-allocate-post-allocate",
        "wdp_sdk::worlds::allocate_post_allocate"
    );
    sdk_world!(describe, "dra-describe", "wdp_sdk::worlds::describe");
    sdk_world!(prepare, "dra-prepare", "wdp_sdk::worlds::prepare");
    sdk_world!(unprepare, "dra-unprepare", "wdp_sdk::worlds::unprepare");
}

pub use bindings::wasm_device_plugin::device::host::LogLevel;
pub use bindings::wasm_device_plugin::device::types::{
    AllocateRequest, Attribute, AttributeValue, Capacity, ClaimRef, ClaimRequest, ContainerRequest,
    ContainerResponse, Device, DeviceDetails, DeviceKind, DeviceRef, DeviceSpec, Health, KeyValue,
    ModuleError, Mount, PrepareRequest, UnprepareRequest,
};

/// A device module: what it must do, report its devices.
pub trait DevicePlugin {
    /// Reports the module's devices, grouped by kind (one kubelet resource per
    /// kind). Give each device what a container needs to use it (device nodes,
    /// mounts, environment, annotations, CDI names) with [`Device`]'s builder
    /// methods, and health ([`Device::healthy`]): without the optional hooks the
    /// host allocates and judges health from these.
    ///
    /// # Errors
    /// A [`ModuleError`] when the devices cannot be listed; the host keeps the last
    /// good list and retries.
    fn scan() -> Result<Vec<DeviceKind>, ModuleError>;
}

/// The optional `health` hook (export it with `with health`). Without it the
/// host takes each device's health from each scan; implement it when health is
/// cheaper to check than a scan, or must be checked more often (the health
/// interval rather than the scan interval).
pub trait HealthCheck: DevicePlugin {
    /// The health of `devices`, one entry each, in order. [`health_from_scan`]
    /// answers from a fresh scan.
    ///
    /// # Errors
    /// As [`DevicePlugin::scan`]: a failed check keeps the last known health.
    fn health(devices: Vec<DeviceRef>) -> Result<Vec<Health>, ModuleError>;
}

/// The optional `allocate` hook (export it with `with allocate`). Without it
/// the host gives each container the merge of what `scan` reported for its
/// devices; implement it when a container's needs depend on the whole request
/// (numbering, counts) rather than on each device.
pub trait Allocate: DevicePlugin {
    /// What each container needs for the devices kubelet chose, one response
    /// per container, in order. `request.containers[n].allocations` holds what
    /// `scan` reported for each device; [`allocate_from_scan`] merges them.
    ///
    /// # Errors
    /// A [`ModuleError`] fails the whole Allocate; kubelet does not start the pod.
    fn allocate(request: AllocateRequest) -> Result<Vec<ContainerResponse>, ModuleError>;
}

/// The optional `post-allocate` hook (export it with `with post_allocate`):
/// amends the complete response, e.g. adds annotations for a runtime hook.
/// Without `allocate`, `response` is the host's merge.
pub trait PostAllocate: DevicePlugin {
    /// The final responses, same length and order as `response`.
    ///
    /// # Errors
    /// As [`Allocate::allocate`].
    fn post_allocate(
        request: AllocateRequest,
        response: Vec<ContainerResponse>,
    ) -> Result<Vec<ContainerResponse>, ModuleError>;
}

/// The optional DRA `describe` hook (export it with [`export_dra_hooks!`]`(X
/// with describe)`): the attributes and capacities the host publishes for each
/// device in its ResourceSlices, where DeviceClasses and claims select devices
/// with CEL. Called after every successful scan of a resource served through
/// DRA, with every device that scan reported. Without it each device is
/// published with the host's own attributes only (`kind`, `id`, `numaNode`,
/// which a module may not set).
pub trait Describe: DevicePlugin {
    /// One [`DeviceDetails`] per entry of `devices`, in order; build each with
    /// [`DeviceDetails::new`] and its builder methods.
    ///
    /// # Errors
    /// A [`ModuleError`] fails the scan it follows: the host keeps the last good
    /// devices and details and retries (a first scan's failure fails the load).
    fn describe(devices: Vec<DeviceRef>) -> Result<Vec<DeviceDetails>, ModuleError>;
}

/// The optional DRA `prepare` hook (export it with [`export_dra_hooks!`]`(X
/// with prepare)`): what the containers of the pods using a claim get, one
/// [`ContainerResponse`] per request of the claim. Each request carries its
/// devices, their scan-time allocations and the claim's opaque configuration
/// for this driver (JSON text, parsed by the module). Without it the host
/// prepares a claim through `allocate` (or its default) with one container per
/// request, and refuses a claim that carries opaque configuration.
pub trait Prepare: DevicePlugin {
    /// One response per entry of `request.requests`, in order. The host writes
    /// them into the claim's CDI spec, which carries no annotations: a response
    /// with annotations fails the claim.
    ///
    /// # Errors
    /// A [`ModuleError`] leaves the claim unprepared and the pod not started; the
    /// message reaches kubelet's event for the pod.
    fn prepare(request: PrepareRequest) -> Result<Vec<ContainerResponse>, ModuleError>;
}

/// The optional DRA `unprepare` hook (export it with [`export_dra_hooks!`]`(X
/// with unprepare)`): undoes what `prepare` did outside the containers (a
/// device reset, say) once no pod on the node uses the claim. Without it the
/// host only removes the claim's CDI spec.
pub trait Unprepare: DevicePlugin {
    /// Releases the claim's devices.
    ///
    /// # Errors
    /// A [`ModuleError`] keeps the claim prepared; kubelet retries later.
    fn unprepare(request: UnprepareRequest) -> Result<(), ModuleError>;
}

/// Exports a [`DevicePlugin`] as the module's component, with the optional hooks
/// named after `with` (in the order `health`, `allocate`, `post_allocate`), each
/// implemented through its trait ([`HealthCheck`], [`Allocate`],
/// [`PostAllocate`]). Use once, at the crate root of a `cdylib` built for
/// `wasm32-wasip2`:
///
/// ```ignore
/// wdp_sdk::export_device_plugin!(Serial);                           // scan only
/// wdp_sdk::export_device_plugin!(Serial with health);
/// wdp_sdk::export_device_plugin!(Serial with allocate, post_allocate);
/// ```
#[macro_export]
macro_rules! export_device_plugin {
    ($plugin:ident) => {
        $crate::__export_world!($plugin, $crate::worlds::scanner, []);
    };
    ($plugin:ident with health) => {
        $crate::__export_world!($plugin, $crate::worlds::health, [health]);
    };
    ($plugin:ident with allocate) => {
        $crate::__export_world!($plugin, $crate::worlds::allocate, [allocate]);
    };
    ($plugin:ident with post_allocate) => {
        $crate::__export_world!($plugin, $crate::worlds::post_allocate, [post_allocate]);
    };
    ($plugin:ident with health, allocate) => {
        $crate::__export_world!($plugin, $crate::worlds::health_allocate, [health, allocate]);
    };
    ($plugin:ident with health, post_allocate) => {
        $crate::__export_world!(
            $plugin,
            $crate::worlds::health_post_allocate,
            [health, post_allocate]
        );
    };
    ($plugin:ident with allocate, post_allocate) => {
        $crate::__export_world!(
            $plugin,
            $crate::worlds::allocate_post_allocate,
            [allocate, post_allocate]
        );
    };
    ($plugin:ident with health, allocate, post_allocate) => {
        $crate::__export_world!(
            $plugin,
            $crate::worlds::device_plugin,
            [health, allocate, post_allocate]
        );
    };
}

/// Exports the DRA hooks named after `with` (any of `describe`, `prepare`,
/// `unprepare`, in this order), each implemented through its trait
/// ([`Describe`], [`Prepare`], [`Unprepare`]). Use it beside
/// [`export_device_plugin!`], which exports `scan` and the device-plugin
/// hooks: the module's component exports what both name.
///
/// ```ignore
/// wdp_sdk::export_device_plugin!(Gpu with health);
/// wdp_sdk::export_dra_hooks!(Gpu with describe, prepare);
/// ```
///
/// Each hook is exported through a world of its own (see [`worlds`]); the
/// component's world is their union with the one of [`export_device_plugin!`].
#[macro_export]
macro_rules! export_dra_hooks {
    ($plugin:ident with describe) => {
        $crate::__export_dra_hook!($plugin, describe);
    };
    ($plugin:ident with prepare) => {
        $crate::__export_dra_hook!($plugin, prepare);
    };
    ($plugin:ident with unprepare) => {
        $crate::__export_dra_hook!($plugin, unprepare);
    };
    ($plugin:ident with describe, prepare) => {
        $crate::__export_dra_hook!($plugin, describe);
        $crate::__export_dra_hook!($plugin, prepare);
    };
    ($plugin:ident with describe, unprepare) => {
        $crate::__export_dra_hook!($plugin, describe);
        $crate::__export_dra_hook!($plugin, unprepare);
    };
    ($plugin:ident with prepare, unprepare) => {
        $crate::__export_dra_hook!($plugin, prepare);
        $crate::__export_dra_hook!($plugin, unprepare);
    };
    ($plugin:ident with describe, prepare, unprepare) => {
        $crate::__export_dra_hook!($plugin, describe);
        $crate::__export_dra_hook!($plugin, prepare);
        $crate::__export_dra_hook!($plugin, unprepare);
    };
}

/// Exports one DRA hook of `$plugin` through its own world. Not for direct
/// use: see [`export_dra_hooks!`].
#[doc(hidden)]
#[macro_export]
macro_rules! __export_dra_hook {
    ($plugin:ident, describe) => {
        const _: () = {
            struct Exported;
            impl $crate::worlds::describe::Guest for Exported {
                fn describe(
                    devices: ::std::vec::Vec<$crate::DeviceRef>,
                ) -> ::core::result::Result<
                    ::std::vec::Vec<$crate::DeviceDetails>,
                    $crate::ModuleError,
                > {
                    <$plugin as $crate::Describe>::describe(devices)
                }
            }
            $crate::worlds::describe::export! { Exported with_types_in $crate::worlds::describe }
        };
    };
    ($plugin:ident, prepare) => {
        const _: () = {
            struct Exported;
            impl $crate::worlds::prepare::Guest for Exported {
                fn prepare(
                    request: $crate::PrepareRequest,
                ) -> ::core::result::Result<
                    ::std::vec::Vec<$crate::ContainerResponse>,
                    $crate::ModuleError,
                > {
                    <$plugin as $crate::Prepare>::prepare(request)
                }
            }
            $crate::worlds::prepare::export! { Exported with_types_in $crate::worlds::prepare }
        };
    };
    ($plugin:ident, unprepare) => {
        const _: () = {
            struct Exported;
            impl $crate::worlds::unprepare::Guest for Exported {
                fn unprepare(
                    request: $crate::UnprepareRequest,
                ) -> ::core::result::Result<(), $crate::ModuleError> {
                    <$plugin as $crate::Unprepare>::unprepare(request)
                }
            }
            $crate::worlds::unprepare::export! { Exported with_types_in $crate::worlds::unprepare }
        };
    };
}

/// Implements `$world`'s `Guest` for `$plugin` with `scan` and `$hook`s, and
/// exports it. Not for direct use: see [`export_device_plugin!`].
#[doc(hidden)]
#[macro_export]
macro_rules! __export_world {
    ($plugin:ident, $($world:ident)::+, [$($hook:ident),*]) => {
        const _: () = {
            struct Exported;
            impl $($world)::+::Guest for Exported {
                fn scan()
                -> ::core::result::Result<::std::vec::Vec<$crate::DeviceKind>, $crate::ModuleError>
                {
                    <$plugin as $crate::DevicePlugin>::scan()
                }
                $($crate::__hook!($plugin, $hook);)*
            }
            $($world)::+::export! { Exported with_types_in $($world)::+ }
        };
    };
}

/// One hook's method of a world's `Guest`, calling `$plugin`'s trait.
#[doc(hidden)]
#[macro_export]
macro_rules! __hook {
    ($plugin:ident, health) => {
        fn health(
            devices: ::std::vec::Vec<$crate::DeviceRef>,
        ) -> ::core::result::Result<::std::vec::Vec<$crate::Health>, $crate::ModuleError> {
            <$plugin as $crate::HealthCheck>::health(devices)
        }
    };
    ($plugin:ident, allocate) => {
        fn allocate(
            request: $crate::AllocateRequest,
        ) -> ::core::result::Result<::std::vec::Vec<$crate::ContainerResponse>, $crate::ModuleError>
        {
            <$plugin as $crate::Allocate>::allocate(request)
        }
    };
    ($plugin:ident, post_allocate) => {
        fn post_allocate(
            request: $crate::AllocateRequest,
            response: ::std::vec::Vec<$crate::ContainerResponse>,
        ) -> ::core::result::Result<::std::vec::Vec<$crate::ContainerResponse>, $crate::ModuleError>
        {
            <$plugin as $crate::PostAllocate>::post_allocate(request, response)
        }
    };
}

/// Per container, the merge of the allocations `scan` reported for its devices
/// (in the request, one per device id), by [`ContainerResponse::merge`]: what
/// the SDK's `allocate` did by default in 0.2.0, for an [`Allocate`] that
/// starts from it. (The host's own default, for modules without `allocate`,
/// merges the same way but refuses two different mounts or nodes at one
/// container path instead of keeping the first.)
pub fn allocate_from_scan(request: &AllocateRequest) -> Vec<ContainerResponse> {
    request
        .containers
        .iter()
        .map(|container| {
            let mut merged = ContainerResponse::new();
            for allocation in &container.allocations {
                merged.merge(allocation);
            }
            merged
        })
        .collect()
}

/// Each asked device's health in `scanned`; unhealthy when it is no longer
/// there. For a [`HealthCheck`] that scans again.
pub fn health_from_scan(scanned: &[DeviceKind], devices: &[DeviceRef]) -> Vec<Health> {
    devices
        .iter()
        .map(|asked| {
            scanned
                .iter()
                .filter(|kind| kind.name == asked.kind)
                .flat_map(|kind| kind.devices.iter())
                .find(|device| device.id == asked.id)
                .map_or(Health::Unhealthy, |device| device.health)
        })
        .collect()
}

impl DeviceKind {
    /// A kind with no devices yet. `name` is bare (`dev-1`, served as
    /// `<domain>/dev-1`) or a full resource name (`vendor.example/dev-1`).
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            devices: Vec::new(),
        }
    }

    /// Adds a device.
    #[must_use]
    pub fn device(mut self, device: Device) -> Self {
        self.devices.push(device);
        self
    }

    /// Adds devices.
    #[must_use]
    pub fn with_devices(mut self, devices: impl IntoIterator<Item = Device>) -> Self {
        self.devices.extend(devices);
        self
    }
}

impl Device {
    /// A healthy device with no NUMA affinity that needs nothing in a container
    /// (add what it needs with the builder methods).
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            health: Health::Healthy,
            numa_nodes: Vec::new(),
            allocation: ContainerResponse::new(),
        }
    }

    /// Sets the health.
    #[must_use]
    pub fn health(mut self, health: Health) -> Self {
        self.health = health;
        self
    }

    /// Healthy when `healthy`, otherwise unhealthy.
    #[must_use]
    pub fn healthy(self, healthy: bool) -> Self {
        self.health(if healthy {
            Health::Healthy
        } else {
            Health::Unhealthy
        })
    }

    /// Adds a NUMA node the device is attached to.
    #[must_use]
    pub fn numa_node(mut self, node: i64) -> Self {
        self.numa_nodes.push(node);
        self
    }

    /// A container given this device gets the device node `host_path` at
    /// `container_path`, with cgroup `permissions` (`r`, `w`, `m`).
    #[must_use]
    pub fn node(mut self, host_path: &str, container_path: &str, permissions: &str) -> Self {
        self.allocation = self.allocation.node(host_path, container_path, permissions);
        self
    }

    /// A container given this device gets `host_path` mounted at `container_path`.
    #[must_use]
    pub fn mount(mut self, host_path: &str, container_path: &str, read_only: bool) -> Self {
        self.allocation = self.allocation.mount(host_path, container_path, read_only);
        self
    }

    /// A container given this device gets the environment variable `key=value`.
    #[must_use]
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.allocation = self.allocation.env(key, value);
        self
    }

    /// A container given this device gets the annotation `key: value`.
    #[must_use]
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.allocation = self.allocation.annotation(key, value);
        self
    }

    /// A container given this device gets the CDI device `name`
    /// (`vendor.com/class=name`).
    #[must_use]
    pub fn cdi_device(mut self, name: &str) -> Self {
        self.allocation = self.allocation.cdi_device(name);
        self
    }
}

impl Default for DeviceDetails {
    fn default() -> Self {
        Self::new()
    }
}

impl DeviceDetails {
    /// No attributes and no capacities (add them with the builder methods).
    pub fn new() -> Self {
        Self {
            attributes: Vec::new(),
            capacities: Vec::new(),
        }
    }

    /// Sets the attribute `name` to `value`, replacing an earlier value of
    /// that name (names are unique). `name` is a C identifier of at most 32
    /// bytes or `domain/identifier`; not `kind`, `id` or `numaNode`, which the
    /// host publishes itself.
    #[must_use]
    pub fn attribute(mut self, name: &str, value: AttributeValue) -> Self {
        match self.attributes.iter_mut().find(|a| a.name == name) {
            Some(attribute) => attribute.value = value,
            None => self.attributes.push(Attribute {
                name: name.to_string(),
                value,
            }),
        }
        self
    }

    /// Sets a text attribute (at most 64 bytes).
    #[must_use]
    pub fn text(self, name: &str, value: &str) -> Self {
        self.attribute(name, AttributeValue::Text(value.to_string()))
    }

    /// Sets an integer attribute.
    #[must_use]
    pub fn integer(self, name: &str, value: i64) -> Self {
        self.attribute(name, AttributeValue::Integer(value))
    }

    /// Sets a boolean attribute.
    #[must_use]
    pub fn boolean(self, name: &str, value: bool) -> Self {
        self.attribute(name, AttributeValue::Boolean(value))
    }

    /// Sets a semantic-version attribute (`1.2.3`, `2.0.0-rc.1`), which CEL
    /// compares as a version. The host checks the syntax.
    #[must_use]
    pub fn version(self, name: &str, value: &str) -> Self {
        self.attribute(name, AttributeValue::Version(value.to_string()))
    }

    /// Sets the capacity `name` to the Kubernetes quantity `value` (`16Gi`,
    /// `4`, `500m`), replacing an earlier value of that name.
    #[must_use]
    pub fn capacity(mut self, name: &str, value: &str) -> Self {
        match self.capacities.iter_mut().find(|c| c.name == name) {
            Some(capacity) => capacity.value = value.to_string(),
            None => self.capacities.push(Capacity {
                name: name.to_string(),
                value: value.to_string(),
            }),
        }
        self
    }

    /// The value of the attribute `name`, if set.
    pub fn get(&self, name: &str) -> Option<&AttributeValue> {
        self.attributes
            .iter()
            .find(|a| a.name == name)
            .map(|a| &a.value)
    }
}

/// `<namespace>/<name>`, as kubectl names a claim (the UID left out).
impl std::fmt::Display for ClaimRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl Default for ContainerResponse {
    fn default() -> Self {
        Self::new()
    }
}

impl ContainerResponse {
    /// A response that gives the container nothing.
    pub fn new() -> Self {
        Self {
            envs: Vec::new(),
            devices: Vec::new(),
            mounts: Vec::new(),
            annotations: Vec::new(),
            cdi_devices: Vec::new(),
        }
    }

    /// Whether it gives the container nothing.
    pub fn is_empty(&self) -> bool {
        self.envs.is_empty()
            && self.devices.is_empty()
            && self.mounts.is_empty()
            && self.annotations.is_empty()
            && self.cdi_devices.is_empty()
    }

    /// Adds the device node `host_path` at `container_path` with cgroup
    /// `permissions` (`r`, `w`, `m`).
    #[must_use]
    pub fn node(mut self, host_path: &str, container_path: &str, permissions: &str) -> Self {
        self.devices.push(DeviceSpec {
            host_path: host_path.to_string(),
            container_path: container_path.to_string(),
            permissions: permissions.to_string(),
        });
        self
    }

    /// Adds a mount of `host_path` at `container_path`.
    #[must_use]
    pub fn mount(mut self, host_path: &str, container_path: &str, read_only: bool) -> Self {
        self.mounts.push(Mount {
            host_path: host_path.to_string(),
            container_path: container_path.to_string(),
            read_only,
        });
        self
    }

    /// Sets the environment variable `key=value` (replacing an earlier value).
    #[must_use]
    pub fn env(mut self, key: &str, value: &str) -> Self {
        set(&mut self.envs, key, value);
        self
    }

    /// Sets the annotation `key: value` (replacing an earlier value).
    #[must_use]
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        set(&mut self.annotations, key, value);
        self
    }

    /// Adds the CDI device `name`.
    #[must_use]
    pub fn cdi_device(mut self, name: &str) -> Self {
        self.cdi_devices.push(name.to_string());
        self
    }

    /// Adds what `other` gives a container, as for a container given both
    /// devices: device nodes, mounts and CDI names once each (the first mount of a
    /// container path wins, as two cannot share it); an environment variable or
    /// annotation set by both keeps both distinct values joined with `,` in
    /// order (`FPGA_IDS=a,b`).
    pub fn merge(&mut self, other: &ContainerResponse) {
        for spec in &other.devices {
            if !self.devices.contains(spec) {
                self.devices.push(spec.clone());
            }
        }
        for mount in &other.mounts {
            if !self
                .mounts
                .iter()
                .any(|m| m.container_path == mount.container_path)
            {
                self.mounts.push(mount.clone());
            }
        }
        for name in &other.cdi_devices {
            if !self.cdi_devices.contains(name) {
                self.cdi_devices.push(name.clone());
            }
        }
        join(&mut self.envs, &other.envs);
        join(&mut self.annotations, &other.annotations);
    }
}

fn set(list: &mut Vec<KeyValue>, key: &str, value: &str) {
    match list.iter_mut().find(|kv| kv.key == key) {
        Some(kv) => kv.value = value.to_string(),
        None => list.push(KeyValue {
            key: key.to_string(),
            value: value.to_string(),
        }),
    }
}

fn join(list: &mut Vec<KeyValue>, more: &[KeyValue]) {
    for kv in more {
        match list.iter_mut().find(|have| have.key == kv.key) {
            Some(have) => {
                if !have.value.split(',').any(|v| v == kv.value) {
                    have.value.push(',');
                    have.value.push_str(&kv.value);
                }
            }
            None => list.push(kv.clone()),
        }
    }
}

impl PartialEq for DeviceSpec {
    fn eq(&self, other: &Self) -> bool {
        self.host_path == other.host_path
            && self.container_path == other.container_path
            && self.permissions == other.permissions
    }
}

/// The module's configuration: the `[config]` table of its manifest.
pub mod config {
    use crate::ModuleError;
    use crate::bindings::wasm_device_plugin::device::host;

    /// Every key and value, in key order.
    pub fn all() -> Vec<(String, String)> {
        host::config()
    }

    /// One value, if set.
    pub fn get(key: &str) -> Option<String> {
        host::get_config(key)
    }

    /// One value, or `default` when unset.
    pub fn get_or(key: &str, default: &str) -> String {
        get(key).unwrap_or_else(|| default.to_string())
    }

    /// One value parsed as `T`, if set.
    ///
    /// # Errors
    /// [`ModuleError::InvalidRequest`] naming the key and value when the value
    /// does not parse.
    pub fn parse<T: std::str::FromStr>(key: &str) -> Result<Option<T>, ModuleError> {
        get(key)
            .map(|raw| {
                raw.trim().parse().map_err(|_| {
                    ModuleError::InvalidRequest(format!(
                        "config `{key}`: `{raw}` is not a valid {}",
                        std::any::type_name::<T>()
                    ))
                })
            })
            .transpose()
    }

    /// A comma-separated value as its trimmed, non-empty items; empty when unset.
    pub fn list(key: &str) -> Vec<String> {
        get(key)
            .map(|raw| {
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Logging to the host's log, tagged with the module and the call.
pub mod log {
    use crate::LogLevel;
    use crate::bindings::wasm_device_plugin::device::host;

    /// Writes `message` at `level`.
    pub fn write(level: LogLevel, message: &str) {
        host::log(level, message);
    }
}

/// Logs at trace level, with `format!` arguments.
#[macro_export]
macro_rules! trace { ($($arg:tt)*) => { $crate::log::write($crate::LogLevel::Trace, &format!($($arg)*)) }; }
/// Logs at debug level, with `format!` arguments.
#[macro_export]
macro_rules! debug { ($($arg:tt)*) => { $crate::log::write($crate::LogLevel::Debug, &format!($($arg)*)) }; }
/// Logs at info level, with `format!` arguments.
#[macro_export]
macro_rules! info { ($($arg:tt)*) => { $crate::log::write($crate::LogLevel::Info, &format!($($arg)*)) }; }
/// Logs at warn level, with `format!` arguments.
#[macro_export]
macro_rules! warn { ($($arg:tt)*) => { $crate::log::write($crate::LogLevel::Warn, &format!($($arg)*)) }; }
/// Logs at error level, with `format!` arguments.
#[macro_export]
macro_rules! error { ($($arg:tt)*) => { $crate::log::write($crate::LogLevel::Error, &format!($($arg)*)) }; }

#[cfg(test)]
mod tests {
    use super::*;

    fn allocation(device: Device) -> ContainerResponse {
        device.allocation
    }

    #[test]
    fn merge_keeps_each_node_once_and_joins_distinct_values() {
        let a = allocation(
            Device::new("a")
                .node("/dev/fpga0", "/dev/fpga0", "rw")
                .node("/dev/ctl", "/dev/ctl", "rw")
                .mount("/opt/a", "/opt/lib", true)
                .env("FPGA_IDS", "a")
                .env("MODE", "x")
                .annotation("example.com/mode", "region")
                .cdi_device("example.com/fpga=a"),
        );
        let b = allocation(
            Device::new("b")
                .node("/dev/fpga1", "/dev/fpga1", "rw")
                .node("/dev/ctl", "/dev/ctl", "rw")
                .mount("/opt/b", "/opt/lib", true)
                .env("FPGA_IDS", "b")
                .env("MODE", "x")
                .annotation("example.com/mode", "region")
                .cdi_device("example.com/fpga=b"),
        );
        let mut merged = ContainerResponse::new();
        merged.merge(&a);
        merged.merge(&b);
        let nodes: Vec<&str> = merged
            .devices
            .iter()
            .map(|d| d.host_path.as_str())
            .collect();
        assert_eq!(nodes, ["/dev/fpga0", "/dev/ctl", "/dev/fpga1"]);
        // One mount per container path: the first device's.
        assert_eq!(merged.mounts.len(), 1);
        assert_eq!(merged.mounts[0].host_path, "/opt/a");
        let env = |k: &str| {
            merged
                .envs
                .iter()
                .find(|kv| kv.key == k)
                .map(|kv| kv.value.as_str())
        };
        assert_eq!(env("FPGA_IDS"), Some("a,b"));
        assert_eq!(env("MODE"), Some("x"));
        assert_eq!(merged.annotations.len(), 1);
        assert_eq!(merged.annotations[0].value, "region");
        assert_eq!(
            merged.cdi_devices,
            ["example.com/fpga=a", "example.com/fpga=b"]
        );
    }

    #[test]
    fn details_builder_sets_typed_attributes_and_capacities() {
        let details = DeviceDetails::new()
            .text("model", "x")
            .integer("index", 3)
            .boolean("virtual", true)
            .version("firmware", "1.0.0")
            .capacity("memory", "1Gi");
        let names: Vec<&str> = details.attributes.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["model", "index", "virtual", "firmware"]);
        assert!(matches!(details.get("model"), Some(AttributeValue::Text(t)) if t == "x"));
        assert!(matches!(
            details.get("index"),
            Some(AttributeValue::Integer(3))
        ));
        assert!(matches!(
            details.get("virtual"),
            Some(AttributeValue::Boolean(true))
        ));
        assert!(
            matches!(details.get("firmware"), Some(AttributeValue::Version(v)) if v == "1.0.0")
        );
        assert!(details.get("absent").is_none());
        assert_eq!(details.capacities.len(), 1);
        assert_eq!(details.capacities[0].name, "memory");
        assert_eq!(details.capacities[0].value, "1Gi");
    }

    #[test]
    fn details_builder_replaces_a_name_set_twice() {
        let details = DeviceDetails::new()
            .text("model", "x")
            .integer("model", 7)
            .capacity("memory", "1Gi")
            .capacity("memory", "2Gi");
        assert_eq!(details.attributes.len(), 1);
        assert!(matches!(
            details.get("model"),
            Some(AttributeValue::Integer(7))
        ));
        assert_eq!(details.capacities.len(), 1);
        assert_eq!(details.capacities[0].value, "2Gi");
    }

    #[test]
    fn claim_ref_displays_as_namespace_slash_name() {
        let claim = ClaimRef {
            namespace: "default".into(),
            name: "gpu".into(),
            uid: "1234".into(),
        };
        assert_eq!(claim.to_string(), "default/gpu");
    }

    #[test]
    fn default_allocate_merges_per_container() {
        let one = allocation(Device::new("a").node("/dev/a", "/dev/a", "rw"));
        let two = allocation(Device::new("b").node("/dev/b", "/dev/b", "r"));
        let request = AllocateRequest {
            kind: "k".into(),
            containers: vec![
                ContainerRequest {
                    device_ids: vec!["a".into(), "b".into()],
                    allocations: vec![one.clone(), two],
                },
                ContainerRequest {
                    device_ids: vec!["a".into()],
                    allocations: vec![one],
                },
            ],
        };
        let response = allocate_from_scan(&request);
        assert_eq!(response.len(), 2);
        assert_eq!(response[0].devices.len(), 2);
        assert_eq!(response[1].devices.len(), 1);
        assert_eq!(response[1].devices[0].permissions, "rw");
    }

    #[test]
    fn default_health_reports_vanished_devices_unhealthy() {
        let scanned = vec![
            DeviceKind::new("k")
                .device(Device::new("a"))
                .device(Device::new("b").healthy(false)),
        ];
        let ask = |kind: &str, id: &str| DeviceRef {
            kind: kind.into(),
            id: id.into(),
        };
        let health = health_from_scan(
            &scanned,
            &[
                ask("k", "a"),
                ask("k", "b"),
                ask("k", "gone"),
                ask("x", "a"),
            ],
        );
        assert_eq!(
            health,
            [
                Health::Healthy,
                Health::Unhealthy,
                Health::Unhealthy,
                Health::Unhealthy
            ]
        );
    }
}
