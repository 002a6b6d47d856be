//! A module that opens a TCP connection, so its component imports
//! `wasi:sockets/*`: the host provides no network and must refuse it at load.

wit_bindgen::generate!({
    path: "../../../wit",
    world: "device-plugin",
});

use wasm_device_plugin::device::types::Device;

struct Sockets;

impl Guest for Sockets {
    fn scan() -> Result<Vec<DeviceKind>, ModuleError> {
        Ok(vec![DeviceKind {
            name: "sockets".to_string(),
            devices: vec![Device {
                id: "s0".into(),
                health: Health::Healthy,
                numa_nodes: Vec::new(),
                allocation: empty(),
            }],
        }])
    }

    fn health(devices: Vec<DeviceRef>) -> Result<Vec<Health>, ModuleError> {
        Ok(devices.iter().map(|_| Health::Healthy).collect())
    }

    fn allocate(request: AllocateRequest) -> Result<Vec<ContainerResponse>, ModuleError> {
        std::net::TcpStream::connect("10.0.0.1:443")
            .map_err(|e| ModuleError::Unavailable(e.to_string()))?;
        post_nothing(request)
    }

    fn post_allocate(
        _request: AllocateRequest,
        response: Vec<ContainerResponse>,
    ) -> Result<Vec<ContainerResponse>, ModuleError> {
        Ok(response)
    }
}

fn post_nothing(request: AllocateRequest) -> Result<Vec<ContainerResponse>, ModuleError> {
    Ok(request.containers.iter().map(|_| empty()).collect())
}

fn empty() -> ContainerResponse {
    ContainerResponse {
        envs: Vec::new(),
        devices: Vec::new(),
        mounts: Vec::new(),
        annotations: Vec::new(),
        cdi_devices: Vec::new(),
    }
}

export!(Sockets);
