//! Imaginary devices, in the manner of the classic example device plugins.
//!
//! Configuration (all optional):
//! - `kinds`: comma-separated `name=count`, default `dev-1=4,dev-2=2`;
//! - `node`: the node segment of the ids, default `node1`;
//! - `unhealthy`: comma-separated device ids that `health` reports unhealthy;
//! - `numa-nodes`: spread the devices round-robin over this many NUMA nodes;
//! - `annotation`: `on` (default) or `off`: whether `allocate` sets the
//!   annotation below. Served through DRA, set it `off`: a claim reaches its
//!   container through CDI, which carries no annotations, and the host fails
//!   a claim rather than drop part of the module's answer.
//!
//! Ids look like `/node1/dev1/3` (kind `dev-1`, device 3). `allocate` sets
//! `DEV_<kind>_ID_<n>=<id>` for the n-th device of the container (kind with every
//! character outside `[A-Za-z0-9]` made `_`) and, unless `annotation` is `off`,
//! the annotation `virtual.example.com/devices` listing the container's ids.
//! Served through DRA, each request of a claim is one "container".
//!
//! Exports `scan`, `health` (the `unhealthy` list is checked every health
//! interval, cheaper than a scan) and `allocate` (numbering is per container, so
//! the host's merge of scan-time allocations would not do). No `post-allocate`:
//! up to 0.2.0 it added the annotation, which `allocate` knows as well; the
//! answer kubelet gets is the same.

use wdp_sdk::{
    Allocate, AllocateRequest, ContainerResponse, Device, DeviceKind, DevicePlugin, DeviceRef,
    Health, HealthCheck, ModuleError, config, debug,
};

const DEFAULT_KINDS: &str = "dev-1=4,dev-2=2";
const ANNOTATION: &str = "virtual.example.com/devices";

struct VirtualDevices;

/// One configured kind: its resource name and how many devices it has.
struct KindSpec {
    name: String,
    count: u32,
}

fn kinds() -> Result<Vec<KindSpec>, ModuleError> {
    let raw = config::get_or("kinds", DEFAULT_KINDS);
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
            Ok(KindSpec {
                name: name.trim().to_string(),
                count,
            })
        })
        .collect()
}

fn device_id(node: &str, kind: &str, n: u32) -> String {
    let segment: String = kind.chars().filter(|c| *c != '-').collect();
    format!("/{node}/{segment}/{n}")
}

fn env_safe(kind: &str) -> String {
    kind.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

impl DevicePlugin for VirtualDevices {
    fn scan() -> Result<Vec<DeviceKind>, ModuleError> {
        let node = config::get_or("node", "node1");
        let numa: i64 = config::parse("numa-nodes")?.unwrap_or(0);
        let unhealthy = config::list("unhealthy");
        let kinds = kinds()?;
        debug!("scanning {} kinds", kinds.len());
        Ok(kinds
            .into_iter()
            .map(|kind| {
                let devices = (1..=kind.count).map(|n| {
                    let id = device_id(&node, &kind.name, n);
                    let healthy = !unhealthy.contains(&id);
                    let device = Device::new(id).healthy(healthy);
                    if numa > 0 {
                        device.numa_node(i64::from(n - 1) % numa)
                    } else {
                        device
                    }
                });
                DeviceKind::new(kind.name.clone()).with_devices(devices)
            })
            .collect())
    }
}

impl HealthCheck for VirtualDevices {
    fn health(devices: Vec<DeviceRef>) -> Result<Vec<Health>, ModuleError> {
        // Cheaper than a whole scan: only the `unhealthy` list matters.
        let unhealthy = config::list("unhealthy");
        Ok(devices
            .iter()
            .map(|d| {
                if unhealthy.contains(&d.id) {
                    Health::Unhealthy
                } else {
                    Health::Healthy
                }
            })
            .collect())
    }
}

impl Allocate for VirtualDevices {
    fn allocate(request: AllocateRequest) -> Result<Vec<ContainerResponse>, ModuleError> {
        // Numbered per container, so not from scan: the host's merge would not do.
        let kind = env_safe(&request.kind);
        let annotate = match config::get_or("annotation", "on").as_str() {
            "on" => true,
            "off" => false,
            other => {
                return Err(ModuleError::InvalidRequest(format!(
                    "config `annotation`: `{other}` is neither on nor off"
                )));
            }
        };
        Ok(request
            .containers
            .iter()
            .map(|container| {
                let response = container
                    .device_ids
                    .iter()
                    .enumerate()
                    .fold(ContainerResponse::new(), |response, (n, id)| {
                        response.env(&format!("DEV_{kind}_ID_{n}"), id)
                    });
                if annotate {
                    response.annotation(ANNOTATION, &container.device_ids.join(","))
                } else {
                    response
                }
            })
            .collect())
    }
}

wdp_sdk::export_device_plugin!(VirtualDevices with health, allocate);
