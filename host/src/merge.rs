//! The host's `allocate` for modules that do not export one: per container, the
//! merge of what `scan` reported each requested device needs (the snapshot's
//! allocations, checked by the output policy when scanned). Pure: on domain
//! values, no guest runs, nothing is cached. The one home of the rule; a module
//! that exports `post-allocate` but not `allocate` is handed this merge as the
//! answer to post-process.
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

use std::collections::BTreeMap;

use crate::domain::{ContainerAllocation, DeviceNode, Mount};

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

/// The default allocation of one container (number `container` in its
/// request) from its devices, in order: each device's id and its scan-time
/// allocation (`None` for a device whose scan reported none).
///
/// # Errors
/// [`MergeConflict`] for the first container path two of the devices fill
/// differently (boxed: it is large, and rare).
pub fn container<'a>(
    container: usize,
    devices: impl IntoIterator<Item = (&'a str, Option<&'a ContainerAllocation>)>,
) -> Result<ContainerAllocation, Box<MergeConflict>> {
    let mut merged = ContainerAllocation::default();
    // Which device each kept node and mount came from, to name both in a conflict.
    let mut node_owner: Vec<&str> = Vec::new();
    let mut mount_owner: Vec<&str> = Vec::new();
    for (id, allocation) in devices {
        let Some(allocation) = allocation else {
            continue;
        };
        let at_path = AtPath { container, id };
        at_path.keep(&mut merged.devices, &mut node_owner, &allocation.devices)?;
        at_path.keep(&mut merged.mounts, &mut mount_owner, &allocation.mounts)?;
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

/// What one container path holds: a device node or a mount.
trait Placed: Clone + PartialEq {
    /// `device node` or `mount`, for a conflict.
    const WHAT: &'static str;
    fn container_path(&self) -> &str;
    /// Its host path and permissions or read-only flag, for a conflict.
    fn describe(&self) -> String;
}

impl Placed for DeviceNode {
    const WHAT: &'static str = "device node";
    fn container_path(&self) -> &str {
        &self.container_path
    }
    fn describe(&self) -> String {
        format!("`{}` {}", self.host_path, self.permissions)
    }
}

impl Placed for Mount {
    const WHAT: &'static str = "mount";
    fn container_path(&self) -> &str {
        &self.container_path
    }
    fn describe(&self) -> String {
        let mode = if self.read_only {
            "read-only"
        } else {
            "read-write"
        };
        format!("`{}` {mode}", self.host_path)
    }
}

/// Device `id`'s entries for container number `container`.
struct AtPath<'a> {
    container: usize,
    id: &'a str,
}

impl<'a> AtPath<'a> {
    /// Adds each of `entries` that `kept` does not hold yet (recording `id` as its
    /// owner in `owners`); an entry at a container path that a different one
    /// already holds is a conflict.
    fn keep<T: Placed>(
        &self,
        kept: &mut Vec<T>,
        owners: &mut Vec<&'a str>,
        entries: &[T],
    ) -> Result<(), Box<MergeConflict>> {
        for entry in entries {
            match kept
                .iter()
                .position(|k| k.container_path() == entry.container_path())
            {
                Some(at) if kept[at] == *entry => {}
                Some(at) => {
                    return Err(Box::new(MergeConflict {
                        container: self.container,
                        what: T::WHAT,
                        path: entry.container_path().to_string(),
                        first: owners[at].to_string(),
                        first_host: kept[at].describe(),
                        second: self.id.to_string(),
                        second_host: entry.describe(),
                    }));
                }
                None => {
                    kept.push(entry.clone());
                    owners.push(self.id);
                }
            }
        }
        Ok(())
    }
}

/// Adds `more` to `map`: a new key is added; a key already there gets the
/// value appended after a `,` unless it is already one of its `,`-separated
/// values (the SDK 0.2.0 rule, byte for byte).
fn join(map: &mut BTreeMap<String, String>, more: &BTreeMap<String, String>) {
    for (key, value) in more {
        match map.get_mut(key) {
            Some(have) => {
                if !have.split(',').any(|v| v == value) {
                    have.push(',');
                    have.push_str(value);
                }
            }
            None => {
                map.insert(key.clone(), value.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(host: &str, container: &str, permissions: &str) -> DeviceNode {
        DeviceNode {
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

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn merge(
        devices: &[(&str, &ContainerAllocation)],
    ) -> Result<ContainerAllocation, Box<MergeConflict>> {
        container(0, devices.iter().map(|(id, a)| (*id, Some(*a))))
    }

    #[test]
    fn merge_keeps_shared_nodes_mounts_and_cdi_names_once() {
        let a = ContainerAllocation {
            devices: vec![
                node("/dev/a", "/dev/a", "rw"),
                node("/dev/ctl", "/dev/ctl", "rw"),
            ],
            mounts: vec![mount("/opt/lib", "/opt/lib")],
            cdi_devices: vec!["example.com/x=a".into(), "example.com/x=ctl".into()],
            ..Default::default()
        };
        let b = ContainerAllocation {
            devices: vec![
                node("/dev/b", "/dev/b", "rw"),
                node("/dev/ctl", "/dev/ctl", "rw"),
            ],
            mounts: vec![mount("/opt/lib", "/opt/lib")],
            cdi_devices: vec!["example.com/x=ctl".into(), "example.com/x=b".into()],
            ..Default::default()
        };
        let merged = merge(&[("a", &a), ("b", &b)]).expect("no conflict");
        let nodes: Vec<&str> = merged
            .devices
            .iter()
            .map(|d| d.host_path.as_str())
            .collect();
        assert_eq!(nodes, ["/dev/a", "/dev/ctl", "/dev/b"]);
        assert_eq!(merged.mounts.len(), 1);
        assert_eq!(
            merged.cdi_devices,
            ["example.com/x=a", "example.com/x=ctl", "example.com/x=b"]
        );
    }

    #[test]
    fn merge_joins_distinct_values_of_one_key_in_device_order() {
        let a = ContainerAllocation {
            envs: map(&[("IDS", "a"), ("MODE", "x")]),
            annotations: map(&[("example.com/ids", "a")]),
            ..Default::default()
        };
        let b = ContainerAllocation {
            envs: map(&[("IDS", "b"), ("MODE", "x")]),
            annotations: map(&[("example.com/ids", "b")]),
            ..Default::default()
        };
        let c = ContainerAllocation {
            envs: map(&[("IDS", "a")]),
            ..Default::default()
        };
        let merged = merge(&[("b", &b), ("a", &a), ("c", &c)]).expect("no conflict");
        assert_eq!(merged.envs, map(&[("IDS", "b,a"), ("MODE", "x")]));
        assert_eq!(merged.annotations, map(&[("example.com/ids", "b,a")]));
    }

    #[test]
    fn merge_skips_devices_without_an_allocation() {
        let a = ContainerAllocation {
            envs: map(&[("IDS", "a")]),
            ..Default::default()
        };
        let merged = container(0, [("none", None), ("a", Some(&a))]).expect("no conflict");
        assert_eq!(merged, a);
    }

    #[test]
    fn merge_refuses_two_mounts_at_one_container_path() {
        let a = ContainerAllocation {
            mounts: vec![mount("/opt/a", "/opt/lib")],
            ..Default::default()
        };
        let b = ContainerAllocation {
            mounts: vec![mount("/opt/b", "/opt/lib")],
            ..Default::default()
        };
        let err = merge(&[("a", &a), ("b", &b)]).expect_err("conflict");
        assert_eq!((err.what, err.path.as_str()), ("mount", "/opt/lib"));
        assert_eq!((err.first.as_str(), err.second.as_str()), ("a", "b"));
    }

    #[test]
    fn merge_refuses_two_device_nodes_at_one_container_path() {
        let a = ContainerAllocation {
            devices: vec![node("/dev/a", "/dev/accel", "rw")],
            ..Default::default()
        };
        let b = ContainerAllocation {
            devices: vec![node("/dev/a", "/dev/accel", "r")],
            ..Default::default()
        };
        let err = container(3, [("a", Some(&a)), ("b", Some(&b))]).expect_err("conflict");
        assert_eq!((err.what, err.path.as_str()), ("device node", "/dev/accel"));
        assert_eq!(err.container, 3);
    }
}
