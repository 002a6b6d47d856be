//! Generic devices from configuration alone, in the manner of the generic device
//! plugins (squat/generic-device-plugin): name a kind, give the path patterns of
//! its device nodes, and every match is a device that a container gets as a node.
//!
//! # Configuration
//!
//! The manifest's `[config]` is flat, so each kind's settings are keys
//! `<kind>.<setting>`. Quote those keys: an unquoted dotted key is a nested table
//! in TOML, which the host refuses.
//!
//! ```toml
//! [config]
//! kinds = "serial,audio"                          # the kinds (resources) to serve
//! "serial.paths" = "/dev/ttyUSB*,/dev/ttyACM*"    # each match is one device
//! "audio.paths" = "/dev/snd/*"
//! "audio.group" = "all"                           # every match together is one device
//! "audio.permissions" = "rw"                      # cgroup permissions, default "rw"
//! # root = "/srv/fake"                            # tests and demos: a fake device tree
//! ```
//!
//! - `kinds` (required): comma-separated kind names, bare (`serial`, served as
//!   `<domain>/serial`) or full resource names (`vendor.example/serial`).
//! - `<kind>.paths` (required): comma-separated absolute path patterns. Per path
//!   segment, `*` matches any run of characters, `?` one character, `[...]` one
//!   of a set (`[0-9]`, `[!0]`); no wildcard crosses a `/`, and a hidden name
//!   (leading `.`) is matched only by a literal `.`. Patterns cannot hold a comma.
//! - `<kind>.group`: `each` (default): every match is a device of its own;
//!   `all`: all matches together are one device, with id `<kind>`.
//! - `<kind>.permissions`: cgroup permissions of the nodes, of `r`, `w`, `m`;
//!   default `rw`.
//! - `root`: a host directory that stands for `/` when looking for nodes
//!   (default `/`). Patterns, ids and container paths leave it out; the host
//!   paths handed to kubelet keep it. Meant for tests and demos on a fake tree;
//!   on a node leave it unset.
//!
//! Any other key, a kind's key for a kind `kinds` does not list, a missing or
//! empty `paths`, a pattern that is not an absolute, normalised path (or has an
//! unclosed `[`), a `group` other than `each`/`all`, `permissions` with other
//! letters or a `root` that is not an absolute, normalised path fails the call
//! with `invalid-request` naming the key; at load that means the module does
//! not load, with that reason.
//!
//! # Devices
//!
//! A match is a file that exists and is not a directory (symlinks followed: a
//! dangling link, or one leading out of what the module may read, is no match;
//! directories are only walked into). A kind's devices come in the order of its
//! patterns, each pattern's matches sorted by name; a path matched twice is one
//! device. A kind that matches nothing is served with no devices (kubelet shows
//! 0) until a re-scan finds some.
//!
//! - **Id**: the path with a leading `/dev/` removed (`ttyUSB0`, `snd/pcmC0D0p`),
//!   otherwise the whole path; with `group = "all"`, the kind's name. A match
//!   whose id would be longer than 253 bytes or hold anything but printable ASCII
//!   without spaces is skipped, with a warning.
//! - **What a container gets**: each node at the path it has on the host
//!   (`root` left out in the container), with the kind's permissions, reported
//!   at scan time; the module exports no `allocate`, so the host gives each
//!   container the nodes of the devices kubelet chose, merged. A symlink is handed out at its own path
//!   in the container (`/dev/serial/by-id/usb-...`) while the host gives kubelet
//!   the node it resolves to.
//! - **Health**: a device is healthy while its node still exists and still
//!   matches the kind's patterns (checked with one `stat` per device, no
//!   directory listing); a `group = "all"` device while at least one node
//!   matches (until the next scan, its allocation still names the nodes the
//!   last scan found). A vanished node makes its device unhealthy at the next
//!   health check; the next scan drops it.
//! - **Sharing**: not done here. The manifest's `[resources.<kind>] replicas = N`
//!   makes the host advertise each device N times (`ttyUSB0::0` ...) and hand
//!   every container that gets one the same node.
//!
//! # Grants
//!
//! The module must see the nodes: grant `read-only-dirs` covering the patterns
//! (and any symlink's target), e.g. `["/dev"]` or narrower (`["/dev/snd"]` for
//! `/dev/snd/*`: literal leading segments are never listed). The host hands out
//! a node only under `device-paths` (default `["/dev"]`).

mod config;
mod pattern;

use config::{Config, Group, KindSpec};
use wdp_sdk::{
    Device, DeviceKind, DevicePlugin, DeviceRef, Health, HealthCheck, ModuleError, debug, warn,
};

/// Longest device id kubelet accepts from the host.
const MAX_ID_LEN: usize = 253;

struct Generic;

/// The device id of the node at `path` (for `group = "each"`).
fn device_id(path: &str) -> &str {
    path.strip_prefix("/dev/").unwrap_or(path)
}

/// The node path of a `group = "each"` device: the inverse of [`device_id`].
fn node_path(id: &str) -> String {
    if id.starts_with('/') {
        id.to_string()
    } else {
        format!("/dev/{id}")
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic())
}

impl KindSpec {
    /// Every node the kind's patterns match under `root`, once each, in order.
    fn nodes(&self, root: &str) -> Vec<String> {
        let mut nodes: Vec<String> = Vec::new();
        for pattern in &self.patterns {
            for path in pattern.expand(root) {
                if !nodes.contains(&path) {
                    nodes.push(path);
                }
            }
        }
        nodes
    }

    /// The kind's devices as found now under `root`.
    fn devices(&self, root: &str) -> Vec<Device> {
        let nodes = self.nodes(root);
        let node = |device: Device, path: &str| {
            device.node(&format!("{root}{path}"), path, &self.permissions)
        };
        match self.group {
            Group::All if nodes.is_empty() => Vec::new(),
            Group::All => vec![
                nodes
                    .iter()
                    .fold(Device::new(self.name.clone()), |d, p| node(d, p)),
            ],
            Group::Each => nodes
                .iter()
                .filter(|path| {
                    let ok = valid_id(device_id(path));
                    if !ok {
                        warn!(
                            "kind {}: skipping {path}: its id would be over {MAX_ID_LEN} bytes \
                             or not printable ASCII without spaces",
                            self.name
                        );
                    }
                    ok
                })
                .map(|path| node(Device::new(device_id(path)), path))
                .collect(),
        }
    }

    /// Whether the device `id` of this kind would be found by a scan now.
    fn healthy(&self, root: &str, id: &str) -> bool {
        match self.group {
            Group::All => id == self.name && !self.nodes(root).is_empty(),
            Group::Each => {
                let path = node_path(id);
                self.patterns.iter().any(|p| p.matches(&path)) && pattern::is_node(root, &path)
            }
        }
    }
}

impl DevicePlugin for Generic {
    fn scan() -> Result<Vec<DeviceKind>, ModuleError> {
        let config = Config::load()?;
        Ok(config
            .kinds
            .iter()
            .map(|kind| {
                let devices = kind.devices(&config.root);
                debug!("kind {}: {} devices", kind.name, devices.len());
                DeviceKind::new(kind.name.clone()).with_devices(devices)
            })
            .collect())
    }
}

/// Health every health interval, cheaper than a scan: a `stat` per device.
impl HealthCheck for Generic {
    fn health(devices: Vec<DeviceRef>) -> Result<Vec<Health>, ModuleError> {
        let config = Config::load()?;
        Ok(devices
            .iter()
            .map(|device| {
                let healthy = config
                    .kind(&device.kind)
                    .is_some_and(|kind| kind.healthy(&config.root, &device.id));
                if healthy {
                    Health::Healthy
                } else {
                    Health::Unhealthy
                }
            })
            .collect())
    }
}

wdp_sdk::export_device_plugin!(Generic with health);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_node_paths_are_inverse() {
        for (path, id) in [
            ("/dev/ttyUSB0", "ttyUSB0"),
            ("/dev/snd/pcmC0D0p", "snd/pcmC0D0p"),
            ("/run/devices/x", "/run/devices/x"),
        ] {
            assert_eq!(device_id(path), id);
            assert_eq!(node_path(id), path);
        }
        assert!(valid_id("snd/pcmC0D0p"));
        assert!(!valid_id("with space"));
        assert!(!valid_id(&"x".repeat(254)));
    }
}
