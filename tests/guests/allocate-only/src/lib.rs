//! A module that exports `scan` and `allocate` but neither `health` nor
//! `post-allocate`: a world of its own, written as the guide shows, with the
//! functions' types from `wasm-device-plugin:device`.
//!
//! Kind `gadget`, devices `g0` and `g1`, each reporting `GADGET_SCANNED=gN` at
//! scan time. `allocate` answers each container with `GADGET_IDS` set to its
//! device ids joined with `:` (not the host's merge, which would give
//! `GADGET_SCANNED=g0,g1`).

wit_bindgen::generate!({
    inline: "
        package test:allocate-only;

        world allocate-only {
            use wasm-device-plugin:device/types@0.2.2.{device-kind, allocate-request, container-response, module-error};
            import wasm-device-plugin:device/host@0.2.2;

            export scan: func() -> result<list<device-kind>, module-error>;
            export allocate: func(request: allocate-request) -> result<list<container-response>, module-error>;
        }
    ",
    path: "../../../wit",
    generate_all,
});

use wasm_device_plugin::device::types::{Device, Health, KeyValue};

struct AllocateOnly;

fn env(key: &str, value: &str) -> ContainerResponse {
    ContainerResponse {
        envs: vec![KeyValue {
            key: key.to_string(),
            value: value.to_string(),
        }],
        devices: Vec::new(),
        mounts: Vec::new(),
        annotations: Vec::new(),
        cdi_devices: Vec::new(),
    }
}

impl Guest for AllocateOnly {
    fn scan() -> Result<Vec<DeviceKind>, ModuleError> {
        Ok(vec![DeviceKind {
            name: "gadget".to_string(),
            devices: (0..2)
                .map(|n| Device {
                    id: format!("g{n}"),
                    health: Health::Healthy,
                    numa_nodes: Vec::new(),
                    allocation: env("GADGET_SCANNED", &format!("g{n}")),
                })
                .collect(),
        }])
    }

    fn allocate(request: AllocateRequest) -> Result<Vec<ContainerResponse>, ModuleError> {
        Ok(request
            .containers
            .iter()
            .map(|c| env("GADGET_IDS", &c.device_ids.join(":")))
            .collect())
    }
}

export!(AllocateOnly);
