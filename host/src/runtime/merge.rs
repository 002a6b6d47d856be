//! The host's `allocate` for modules that do not export one: per container, the
//! merge of what `scan` reported each requested device needs
//! (`container-request.allocations`, which the host already holds, checked by
//! the output policy at scan time). Pure: no guest runs, nothing is cached.
//!
//! The rule is the WIT contract's (`container-request.allocations` in
//! `wit/device-plugin.wit`):
//! - device nodes, mounts and CDI names are kept once each (equal in every
//!   field is one entry), in device order;
//! - an environment variable or annotation set by several devices keeps each
//!   distinct value once, joined with `,` in device order. This is the Rust
//!   SDK's 0.2.0 `allocate` default, kept so that a module moving from the SDK's
//!   default to the host's behaves the same;
//! - two *different* device nodes, or two different mounts, at one container
//!   path are an error. The SDK kept the first silently; the host must never
//!   answer success for less than the pod asked for, and a container path can
//!   hold only one of them.
//!
//! The answer still goes through [`crate::policy::allocation`] like any
//! module's: the grants may have changed since the scan.

use crate::runtime::bindings::{
    AllocateRequest, ContainerRequest, ContainerResponse, DeviceSpec, KeyValue, Mount,
};

/// Two devices of one container need different things at one container path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "container {container}: devices `{first}` and `{second}` both need a {what} at `{path}`, and they differ ({first_host} and {second_host}); one container path cannot hold both"
)]
pub struct MergeConflict {
    /// The container's index in the request.
    pub container: usize,
    /// `device node` or `mount`.
    pub what: &'static str,
    /// The container path both want.
    pub path: String,
    /// The device whose entry came first, and its host path.
    pub first: String,
    /// Its host path (and permissions or read-only flag).
    pub first_host: String,
    /// The device whose entry conflicts.
    pub second: String,
    /// Its host path (and permissions or read-only flag).
    pub second_host: String,
}

/// The default allocation for `request`: one merged response per container, in
/// order.
///
/// # Errors
/// [`MergeConflict`] for the first container path two devices of one container
/// fill differently (boxed: it is large, and rare).
pub fn allocate(request: &AllocateRequest) -> Result<Vec<ContainerResponse>, Box<MergeConflict>> {
    request
        .containers
        .iter()
        .enumerate()
        .map(|(n, container)| merge_container(n, container))
        .collect()
}

fn merge_container(
    container: usize,
    request: &ContainerRequest,
) -> Result<ContainerResponse, Box<MergeConflict>> {
    let mut merged = ContainerResponse {
        envs: Vec::new(),
        devices: Vec::new(),
        mounts: Vec::new(),
        annotations: Vec::new(),
        cdi_devices: Vec::new(),
    };
    // Which device each kept node and mount came from, to name both in a conflict.
    let mut node_owner: Vec<&str> = Vec::new();
    let mut mount_owner: Vec<&str> = Vec::new();
    for (id, allocation) in request.device_ids.iter().zip(&request.allocations) {
        for spec in &allocation.devices {
            match merged
                .devices
                .iter()
                .position(|d| d.container_path == spec.container_path)
            {
                Some(at) if same_node(&merged.devices[at], spec) => {}
                Some(at) => {
                    return Err(Box::new(MergeConflict {
                        container,
                        what: "device node",
                        path: spec.container_path.clone(),
                        first: node_owner[at].to_string(),
                        first_host: describe_node(&merged.devices[at]),
                        second: id.clone(),
                        second_host: describe_node(spec),
                    }));
                }
                None => {
                    merged.devices.push(spec.clone());
                    node_owner.push(id);
                }
            }
        }
        for mount in &allocation.mounts {
            match merged
                .mounts
                .iter()
                .position(|m| m.container_path == mount.container_path)
            {
                Some(at) if same_mount(&merged.mounts[at], mount) => {}
                Some(at) => {
                    return Err(Box::new(MergeConflict {
                        container,
                        what: "mount",
                        path: mount.container_path.clone(),
                        first: mount_owner[at].to_string(),
                        first_host: describe_mount(&merged.mounts[at]),
                        second: id.clone(),
                        second_host: describe_mount(mount),
                    }));
                }
                None => {
                    merged.mounts.push(mount.clone());
                    mount_owner.push(id);
                }
            }
        }
        for name in &allocation.cdi_devices {
            if !merged.cdi_devices.contains(name) {
                merged.cdi_devices.push(name.clone());
            }
        }
        join(&mut merged.envs, &allocation.envs);
        join(&mut merged.annotations, &allocation.annotations);
    }
    Ok(merged)
}

fn same_node(a: &DeviceSpec, b: &DeviceSpec) -> bool {
    a.host_path == b.host_path
        && a.container_path == b.container_path
        && a.permissions == b.permissions
}

fn same_mount(a: &Mount, b: &Mount) -> bool {
    a.host_path == b.host_path && a.container_path == b.container_path && a.read_only == b.read_only
}

fn describe_node(d: &DeviceSpec) -> String {
    format!("`{}` {}", d.host_path, d.permissions)
}

fn describe_mount(m: &Mount) -> String {
    format!(
        "`{}` {}",
        m.host_path,
        if m.read_only {
            "read-only"
        } else {
            "read-write"
        }
    )
}

/// Adds `more` to `list`: a new key is appended; a key already there gets the
/// value appended after a `,` unless it is already one of its `,`-separated
/// values (the SDK 0.2.0 rule, byte for byte).
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

/// A response that gives a container nothing (a device whose scan reported no
/// allocation).
pub fn empty() -> ContainerResponse {
    ContainerResponse {
        envs: Vec::new(),
        devices: Vec::new(),
        mounts: Vec::new(),
        annotations: Vec::new(),
        cdi_devices: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(host: &str, container: &str, permissions: &str) -> DeviceSpec {
        DeviceSpec {
            host_path: host.into(),
            container_path: container.into(),
            permissions: permissions.into(),
        }
    }

    fn mount(host: &str, container: &str) -> Mount {
        Mount {
            host_path: host.into(),
            container_path: container.into(),
            read_only: true,
        }
    }

    fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.into(),
        }
    }

    fn request(devices: Vec<(&str, ContainerResponse)>) -> AllocateRequest {
        AllocateRequest {
            kind: "k".into(),
            containers: vec![ContainerRequest {
                device_ids: devices.iter().map(|(id, _)| id.to_string()).collect(),
                allocations: devices.into_iter().map(|(_, a)| a).collect(),
            }],
        }
    }

    #[test]
    fn merge_keeps_shared_nodes_mounts_and_cdi_names_once() {
        let a = ContainerResponse {
            devices: vec![
                node("/dev/a", "/dev/a", "rw"),
                node("/dev/ctl", "/dev/ctl", "rw"),
            ],
            mounts: vec![mount("/opt/lib", "/opt/lib")],
            cdi_devices: vec!["example.com/x=a".into(), "example.com/x=ctl".into()],
            ..empty()
        };
        let b = ContainerResponse {
            devices: vec![
                node("/dev/b", "/dev/b", "rw"),
                node("/dev/ctl", "/dev/ctl", "rw"),
            ],
            mounts: vec![mount("/opt/lib", "/opt/lib")],
            cdi_devices: vec!["example.com/x=ctl".into(), "example.com/x=b".into()],
            ..empty()
        };
        let merged = allocate(&request(vec![("a", a), ("b", b)])).expect("no conflict");
        let nodes: Vec<&str> = merged[0]
            .devices
            .iter()
            .map(|d| d.host_path.as_str())
            .collect();
        assert_eq!(nodes, ["/dev/a", "/dev/ctl", "/dev/b"]);
        assert_eq!(merged[0].mounts.len(), 1);
        assert_eq!(
            merged[0].cdi_devices,
            ["example.com/x=a", "example.com/x=ctl", "example.com/x=b"]
        );
    }

    #[test]
    fn merge_joins_distinct_values_of_one_key_in_device_order() {
        let a = ContainerResponse {
            envs: vec![kv("IDS", "a"), kv("MODE", "x")],
            annotations: vec![kv("example.com/ids", "a")],
            ..empty()
        };
        let b = ContainerResponse {
            envs: vec![kv("IDS", "b"), kv("MODE", "x")],
            annotations: vec![kv("example.com/ids", "b")],
            ..empty()
        };
        let merged = allocate(&request(vec![("a", a), ("b", b)])).expect("no conflict");
        let pairs = |list: &[KeyValue]| -> Vec<(String, String)> {
            list.iter()
                .map(|kv| (kv.key.clone(), kv.value.clone()))
                .collect()
        };
        let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(
            pairs(&merged[0].envs),
            [pair("IDS", "a,b"), pair("MODE", "x")]
        );
        assert_eq!(
            pairs(&merged[0].annotations),
            [pair("example.com/ids", "a,b")]
        );
    }

    #[test]
    fn merge_refuses_two_mounts_at_one_container_path() {
        let a = ContainerResponse {
            mounts: vec![mount("/opt/a", "/opt/lib")],
            ..empty()
        };
        let b = ContainerResponse {
            mounts: vec![mount("/opt/b", "/opt/lib")],
            ..empty()
        };
        let err = allocate(&request(vec![("a", a), ("b", b)])).expect_err("conflict");
        assert_eq!((err.what, err.path.as_str()), ("mount", "/opt/lib"));
        assert_eq!((err.first.as_str(), err.second.as_str()), ("a", "b"));
    }

    #[test]
    fn merge_refuses_two_device_nodes_at_one_container_path() {
        let a = ContainerResponse {
            devices: vec![node("/dev/a", "/dev/accel", "rw")],
            ..empty()
        };
        let b = ContainerResponse {
            devices: vec![node("/dev/a", "/dev/accel", "r")],
            ..empty()
        };
        let err = allocate(&request(vec![("a", a), ("b", b)])).expect_err("conflict");
        assert_eq!((err.what, err.path.as_str()), ("device node", "/dev/accel"));
    }

    #[test]
    fn merge_answers_each_container_from_its_own_devices() {
        let a = ContainerResponse {
            devices: vec![node("/dev/a", "/dev/x", "rw")],
            ..empty()
        };
        let b = ContainerResponse {
            devices: vec![node("/dev/b", "/dev/x", "rw")],
            ..empty()
        };
        // The same container path in two containers is no conflict.
        let request = AllocateRequest {
            kind: "k".into(),
            containers: vec![
                ContainerRequest {
                    device_ids: vec!["a".into()],
                    allocations: vec![a],
                },
                ContainerRequest {
                    device_ids: vec!["b".into()],
                    allocations: vec![b],
                },
            ],
        };
        let merged = allocate(&request).expect("no conflict");
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[1].devices[0].host_path, "/dev/b");
    }
}
