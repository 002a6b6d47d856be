//! A module that exports `scan` and `post-allocate` but not `allocate`: the host
//! merges the devices' scan-time allocations and hands the merge to
//! `post-allocate`.
//!
//! Kind `gizmo`, devices `z0` and `z1`, each reporting `GIZMO_IDS=zN` at scan
//! time. `post-allocate` adds to each container the annotation
//! `example.com/seen` holding the `GIZMO_IDS` value of the response it received.

wit_bindgen::generate!({
    inline: "
        package test:post-allocate-only;

        world post-allocate-only {
            use wasm-device-plugin:device/types@0.2.2.{device-kind, allocate-request, container-response, module-error};
            import wasm-device-plugin:device/host@0.2.2;

            export scan: func() -> result<list<device-kind>, module-error>;
            export post-allocate: func(request: allocate-request, response: list<container-response>) -> result<list<container-response>, module-error>;
        }
    ",
    path: "../../../wit",
    generate_all,
});

use wasm_device_plugin::device::types::{Device, Health, KeyValue};

struct PostAllocateOnly;

fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: value.to_string(),
    }
}

impl Guest for PostAllocateOnly {
    fn scan() -> Result<Vec<DeviceKind>, ModuleError> {
        Ok(vec![DeviceKind {
            name: "gizmo".to_string(),
            devices: (0..2)
                .map(|n| Device {
                    id: format!("z{n}"),
                    health: Health::Healthy,
                    numa_nodes: Vec::new(),
                    allocation: ContainerResponse {
                        envs: vec![kv("GIZMO_IDS", &format!("z{n}"))],
                        devices: Vec::new(),
                        mounts: Vec::new(),
                        annotations: Vec::new(),
                        cdi_devices: Vec::new(),
                    },
                })
                .collect(),
        }])
    }

    fn post_allocate(
        _request: AllocateRequest,
        mut response: Vec<ContainerResponse>,
    ) -> Result<Vec<ContainerResponse>, ModuleError> {
        for container in &mut response {
            let seen = container
                .envs
                .iter()
                .find(|e| e.key == "GIZMO_IDS")
                .map_or(String::new(), |e| e.value.clone());
            container.annotations.push(kv("example.com/seen", &seen));
        }
        Ok(response)
    }
}

export!(PostAllocateOnly);
