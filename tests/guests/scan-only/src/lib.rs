//! A module of the `scanner` world: it exports `scan` and nothing else, so the
//! host supplies health (from scans) and allocation (the merge of the devices'
//! scan-time allocations) itself.
//!
//! Kind `widget`, devices `w0` to `w2`. Each device `wN` needs the node
//! `/dev/null` at `/dev/widgetN`, the shared node `/dev/zero` at
//! `/dev/widget-ctl`, `WIDGET_IDS=wN`, `WIDGET_MODE=shared`, the annotation
//! `example.com/widgets: wN` and the CDI names `example.com/widget=wN` and
//! `example.com/widget=ctl`.
//!
//! Configuration:
//! - `unhealthy`: comma-separated ids that `scan` reports unhealthy;
//! - `conflict = "mount"`: `w0` and `w1` also mount different host paths
//!   (`/var/lib/widget-a`, `/var/lib/widget-b`) at `/data` (grant `/var/lib`).

wit_bindgen::generate!({
    path: "../../../wit",
    world: "scanner",
});

use wasm_device_plugin::device::host::get_config;
use wasm_device_plugin::device::types::{
    ContainerResponse, Device, DeviceSpec, Health, KeyValue, Mount,
};

struct ScanOnly;

fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: value.to_string(),
    }
}

fn node(host_path: &str, container_path: &str) -> DeviceSpec {
    DeviceSpec {
        host_path: host_path.to_string(),
        container_path: container_path.to_string(),
        permissions: "rw".to_string(),
    }
}

impl Guest for ScanOnly {
    fn scan() -> Result<Vec<DeviceKind>, ModuleError> {
        let unhealthy = get_config("unhealthy").unwrap_or_default();
        let unhealthy: Vec<&str> = unhealthy.split(',').map(str::trim).collect();
        let conflict = get_config("conflict").is_some_and(|c| c == "mount");
        let devices = (0..3)
            .map(|n| {
                let id = format!("w{n}");
                let mut mounts = Vec::new();
                if conflict && n < 2 {
                    mounts.push(Mount {
                        host_path: format!("/var/lib/widget-{}", if n == 0 { "a" } else { "b" }),
                        container_path: "/data".to_string(),
                        read_only: true,
                    });
                }
                Device {
                    health: if unhealthy.contains(&id.as_str()) {
                        Health::Unhealthy
                    } else {
                        Health::Healthy
                    },
                    numa_nodes: Vec::new(),
                    allocation: ContainerResponse {
                        envs: vec![kv("WIDGET_IDS", &id), kv("WIDGET_MODE", "shared")],
                        devices: vec![
                            node("/dev/null", &format!("/dev/widget{n}")),
                            node("/dev/zero", "/dev/widget-ctl"),
                        ],
                        mounts,
                        annotations: vec![kv("example.com/widgets", &id)],
                        cdi_devices: vec![
                            format!("example.com/widget={id}"),
                            "example.com/widget=ctl".to_string(),
                        ],
                    },
                    id,
                }
            })
            .collect();
        Ok(vec![DeviceKind {
            name: "widget".to_string(),
            devices,
        }])
    }
}

export!(ScanOnly);
