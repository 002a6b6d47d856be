//! Imaginary devices, in the manner of the classic example device plugins.
//!
//! Configuration (all optional):
//! - `kinds`: comma-separated `name=count`, default `dev-1=4,dev-2=2`;
//! - `node`: the node segment of the ids, default `node1`;
//! - `unhealthy`: comma-separated device ids that `health` reports unhealthy;
//! - `numa-nodes`: spread the devices round-robin over this many NUMA nodes.
//!
//! Ids look like `/node1/dev1/3` (kind `dev-1`, device 3). `allocate` sets
//! `DEV_<kind>_ID_<n>=<id>` for the n-th device of the container (kind with every
//! character outside `[A-Za-z0-9]` made `_`), and `post-allocate` adds the annotation
//! `virtual.example.com/devices` listing the container's ids.

wit_bindgen::generate!({
    path: "../../wit",
    world: "device-plugin",
});

use wasm_device_plugin::device::host::{self, LogLevel};
// The world's `use` makes `DeviceKind`, `DeviceRef`, `Health`, `AllocateRequest`,
// `ContainerResponse` and `ModuleError` available at the crate root already.
use wasm_device_plugin::device::types::{ContainerRequest, Device, KeyValue};

const DEFAULT_KINDS: &str = "dev-1=4,dev-2=2";
const ANNOTATION: &str = "virtual.example.com/devices";

struct VirtualDevices;

/// One configured kind: its resource name and how many devices it has.
struct KindSpec {
    name: String,
    count: u32,
}

fn kinds() -> Result<Vec<KindSpec>, ModuleError> {
    let raw = host::get_config("kinds").unwrap_or_else(|| DEFAULT_KINDS.to_string());
    raw.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            let (name, count) = entry.split_once('=').ok_or_else(|| {
                ModuleError::InvalidRequest(format!("config `kinds`: `{entry}` is not name=count"))
            })?;
            let count = count.trim().parse::<u32>().map_err(|_| {
                ModuleError::InvalidRequest(format!("config `kinds`: `{count}` is not a count"))
            })?;
            Ok(KindSpec { name: name.trim().to_string(), count })
        })
        .collect()
}

fn device_id(node: &str, kind: &str, n: u32) -> String {
    let segment: String = kind.chars().filter(|c| *c != '-').collect();
    format!("/{node}/{segment}/{n}")
}

fn unhealthy_ids() -> Vec<String> {
    host::get_config("unhealthy")
        .map(|raw| raw.split(',').map(|id| id.trim().to_string()).collect())
        .unwrap_or_default()
}

fn env_safe(kind: &str) -> String {
    kind.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect()
}

impl Guest for VirtualDevices {
    fn scan() -> Result<Vec<DeviceKind>, ModuleError> {
        let node = host::get_config("node").unwrap_or_else(|| "node1".to_string());
        let numa = match host::get_config("numa-nodes") {
            Some(raw) => raw.trim().parse::<i64>().map_err(|_| {
                ModuleError::InvalidRequest(format!("config `numa-nodes`: `{raw}` is not a number"))
            })?,
            None => 0,
        };
        let unhealthy = unhealthy_ids();
        let kinds = kinds()?;
        host::log(LogLevel::Debug, &format!("scanning {} kinds", kinds.len()));
        Ok(kinds
            .into_iter()
            .map(|kind| DeviceKind {
                devices: (1..=kind.count)
                    .map(|n| {
                        let id = device_id(&node, &kind.name, n);
                        let health =
                            if unhealthy.contains(&id) { Health::Unhealthy } else { Health::Healthy };
                        let numa_nodes =
                            if numa > 0 { vec![i64::from(n - 1) % numa] } else { Vec::new() };
                        Device { id, health, numa_nodes }
                    })
                    .collect(),
                name: kind.name,
            })
            .collect())
    }

    fn health(devices: Vec<DeviceRef>) -> Result<Vec<Health>, ModuleError> {
        let unhealthy = unhealthy_ids();
        Ok(devices
            .iter()
            .map(|d| if unhealthy.contains(&d.id) { Health::Unhealthy } else { Health::Healthy })
            .collect())
    }

    fn allocate(request: AllocateRequest) -> Result<Vec<ContainerResponse>, ModuleError> {
        let kind = env_safe(&request.kind);
        Ok(request
            .containers
            .iter()
            .map(|ContainerRequest { device_ids }| ContainerResponse {
                envs: device_ids
                    .iter()
                    .enumerate()
                    .map(|(n, id)| KeyValue { key: format!("DEV_{kind}_ID_{n}"), value: id.clone() })
                    .collect(),
                devices: Vec::new(),
                mounts: Vec::new(),
                annotations: Vec::new(),
                cdi_devices: Vec::new(),
            })
            .collect())
    }

    fn post_allocate(
        request: AllocateRequest,
        mut response: Vec<ContainerResponse>,
    ) -> Result<Vec<ContainerResponse>, ModuleError> {
        for (container, reply) in request.containers.iter().zip(response.iter_mut()) {
            reply.annotations.push(KeyValue {
                key: ANNOTATION.to_string(),
                value: container.device_ids.join(","),
            });
        }
        Ok(response)
    }
}

export!(VirtualDevices);
