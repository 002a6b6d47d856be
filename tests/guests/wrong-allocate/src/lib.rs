//! A module with a good `scan` whose optional `allocate` export has another
//! type than the world's: the host must refuse it at load, naming `allocate`.

wit_bindgen::generate!({
    inline: "
        package test:wrong-allocate;

        world wrong-allocate {
            use wasm-device-plugin:device/types@0.2.2.{device-kind, module-error};
            import wasm-device-plugin:device/host@0.2.2;

            export scan: func() -> result<list<device-kind>, module-error>;
            export allocate: func(ids: list<string>) -> list<string>;
        }
    ",
    path: "../../../wit",
    generate_all,
});

use wasm_device_plugin::device::types::{ContainerResponse, Device, Health};

struct WrongAllocate;

impl Guest for WrongAllocate {
    fn scan() -> Result<Vec<DeviceKind>, ModuleError> {
        Ok(vec![DeviceKind {
            name: "wrong".to_string(),
            devices: vec![Device {
                id: "x0".to_string(),
                health: Health::Healthy,
                numa_nodes: Vec::new(),
                allocation: ContainerResponse {
                    envs: Vec::new(),
                    devices: Vec::new(),
                    mounts: Vec::new(),
                    annotations: Vec::new(),
                    cdi_devices: Vec::new(),
                },
            }],
        }])
    }

    fn allocate(ids: Vec<String>) -> Vec<String> {
        ids
    }
}

export!(WrongAllocate);
