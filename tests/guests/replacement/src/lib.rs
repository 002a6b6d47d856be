//! "Version 2" of a device module, for tests that replace a running module: it
//! serves the same kind as `virtual-devices`' first one (`dev-1`) with other
//! devices (`/v2/dev1/1` to `/v2/dev1/3`), and its `allocate` sets `VERSION=2`
//! and `DEV_<n>=<id>`, so a test can tell which version answered.

wit_bindgen::generate!({
    path: "../../../wit",
    world: "device-plugin",
});

use wasm_device_plugin::device::types::{Device, KeyValue};

struct Replacement;

impl Guest for Replacement {
    fn scan() -> Result<Vec<DeviceKind>, ModuleError> {
        Ok(vec![DeviceKind {
            name: "dev-1".to_string(),
            devices: (1..=3)
                .map(|n| Device {
                    id: format!("/v2/dev1/{n}"),
                    health: Health::Healthy,
                    numa_nodes: Vec::new(),
                    allocation: ContainerResponse {
                        envs: Vec::new(),
                        devices: Vec::new(),
                        mounts: Vec::new(),
                        annotations: Vec::new(),
                        cdi_devices: Vec::new(),
                    },
                })
                .collect(),
        }])
    }

    fn health(devices: Vec<DeviceRef>) -> Result<Vec<Health>, ModuleError> {
        Ok(devices.iter().map(|_| Health::Healthy).collect())
    }

    fn allocate(request: AllocateRequest) -> Result<Vec<ContainerResponse>, ModuleError> {
        Ok(request
            .containers
            .iter()
            .map(|c| {
                let mut envs = vec![KeyValue {
                    key: "VERSION".into(),
                    value: "2".into(),
                }];
                envs.extend(c.device_ids.iter().enumerate().map(|(n, id)| KeyValue {
                    key: format!("DEV_{n}"),
                    value: id.clone(),
                }));
                ContainerResponse {
                    envs,
                    devices: Vec::new(),
                    mounts: Vec::new(),
                    annotations: Vec::new(),
                    cdi_devices: Vec::new(),
                }
            })
            .collect())
    }

    fn post_allocate(
        _request: AllocateRequest,
        response: Vec<ContainerResponse>,
    ) -> Result<Vec<ContainerResponse>, ModuleError> {
        Ok(response)
    }
}

export!(Replacement);
