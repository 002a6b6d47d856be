//! Validated values that cross the boundary between kubelet, the registry and the
//! guests: resource names, devices and their health, and what a container gets.
//!
//! Everything here is plain data with no knowledge of gRPC or wasmtime; `policy`
//! builds these from guest output and `kubelet` turns them into protocol messages.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// Longest device id accepted (kubelet keeps ids in checkpoints; 253 is the longest
/// DNS name, which covers PCI addresses, paths and UUIDs).
pub const MAX_DEVICE_ID_LEN: usize = 253;
/// Most devices one resource may advertise.
pub const MAX_DEVICES_PER_RESOURCE: usize = 10_000;

/// An extended resource name, `domain/name`, as kubelet accepts it in a
/// registration: the domain a DNS subdomain other than `kubernetes.io` (and its
/// subdomains), the name 1 to 63 characters of `[A-Za-z0-9._-]` that start and end
/// with an alphanumeric character.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceName(String);

/// Why a string is not a valid [`ResourceName`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceNameError {
    /// No `/` between domain and name.
    #[error("`{0}` is not of the form domain/name")]
    NoDomain(String),
    /// The domain is not a DNS subdomain.
    #[error(
        "`{0}`: the domain is not a DNS subdomain (lowercase letters, digits, '-' and '.', at most 253 characters)"
    )]
    BadDomain(String),
    /// The domain belongs to Kubernetes itself.
    #[error("`{0}`: the kubernetes.io domain is reserved for Kubernetes")]
    ReservedDomain(String),
    /// The name part is not a qualified-name segment.
    #[error(
        "`{0}`: the name must be 1 to 63 characters of [A-Za-z0-9._-], starting and ending alphanumeric"
    )]
    BadName(String),
}

impl ResourceName {
    /// Parses `domain/name`.
    ///
    /// # Errors
    /// [`ResourceNameError`] naming the rule the input breaks.
    pub fn parse(raw: &str) -> Result<Self, ResourceNameError> {
        let (domain, name) = raw
            .split_once('/')
            .ok_or_else(|| ResourceNameError::NoDomain(raw.to_string()))?;
        if !is_dns_subdomain(domain) {
            return Err(ResourceNameError::BadDomain(raw.to_string()));
        }
        if domain == "kubernetes.io" || domain.ends_with(".kubernetes.io") {
            return Err(ResourceNameError::ReservedDomain(raw.to_string()));
        }
        if !is_qualified_name_segment(name) {
            return Err(ResourceNameError::BadName(raw.to_string()));
        }
        Ok(Self(raw.to_string()))
    }

    /// Builds `domain/kind`, or takes `kind` as the whole name when it has a `/`.
    ///
    /// # Errors
    /// As [`ResourceName::parse`].
    pub fn for_kind(default_domain: &str, kind: &str) -> Result<Self, ResourceNameError> {
        if kind.contains('/') {
            Self::parse(kind)
        } else {
            Self::parse(&format!("{default_domain}/{kind}"))
        }
    }

    /// The name as kubelet sees it.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name made safe for a file name: every character outside
    /// `[A-Za-z0-9._-]` becomes `_` (so `example.com/dev-1` is `example.com_dev-1`).
    pub fn file_safe(&self) -> String {
        self.0
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }
}

impl fmt::Display for ResourceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A DNS-1123 subdomain: dot-separated labels of `[a-z0-9-]`, each starting and
/// ending alphanumeric, at most 253 characters in all.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && label.as_bytes()[0].is_ascii_alphanumeric()
                && label.as_bytes()[label.len() - 1].is_ascii_alphanumeric()
        })
}

/// The name part of a Kubernetes qualified name: 1 to 63 characters of
/// `[A-Za-z0-9._-]`, starting and ending alphanumeric.
pub fn is_qualified_name_segment(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// A Kubernetes qualified name (annotation keys): `[prefix/]name`, the prefix a DNS
/// subdomain.
pub fn is_qualified_name(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_qualified_name_segment(name),
        None => is_qualified_name_segment(s),
    }
}

/// A C identifier as Kubernetes means it (DRA attribute and capacity names):
/// `[A-Za-z_][A-Za-z0-9_]*`, at most 32 characters.
pub fn is_c_identifier(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// A Kubernetes quantity (`16Gi`, `4`, `500m`, `1e3`, `+1.5k`): a signed
/// decimal number, then an optional binary (`Ki`..`Ei`) or decimal (`n`, `u`,
/// `m`, `k`, `M`..`E`) suffix or a decimal exponent.
pub fn is_quantity(s: &str) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let number_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(number_end);
    let mut parts = number.splitn(2, '.');
    let whole = parts.next().unwrap_or_default();
    let fraction = parts.next();
    let number_ok = match fraction {
        Some(f) => !f.contains('.') && (!whole.is_empty() || !f.is_empty()),
        None => !whole.is_empty(),
    };
    let suffix_ok = match suffix {
        "" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" | "n" | "u" | "m" | "k" | "M" | "G" | "T"
        | "P" | "E" => true,
        exponent => exponent
            .strip_prefix(['e', 'E'])
            .map(|e| e.strip_prefix(['+', '-']).unwrap_or(e))
            .is_some_and(|e| !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit())),
    };
    number_ok && suffix_ok && s.len() <= 64
}

/// A typed value of a device attribute, as DRA publishes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttributeValue {
    /// Text, at most 64 bytes.
    Text(String),
    /// An integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
    /// A semantic version, at most 64 bytes.
    Version(String),
}

/// What a module described of a device for DRA, checked: attributes and
/// capacities by name (unqualified names are the driver's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceDetails {
    /// Attributes by name.
    pub attributes: BTreeMap<String, AttributeValue>,
    /// Capacities by name, each a Kubernetes quantity.
    pub capacities: BTreeMap<String, String>,
}

/// Whether a device can be handed out. Kubelet's strings are `Healthy`/`Unhealthy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Health {
    /// Allocatable.
    Healthy,
    /// Not allocatable until it recovers.
    Unhealthy,
}

impl Health {
    /// Kubelet's wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "Healthy",
            Health::Unhealthy => "Unhealthy",
        }
    }
}

/// One advertised device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Unique within its resource, 1 to [`MAX_DEVICE_ID_LEN`] bytes.
    pub id: String,
    /// Current health.
    pub health: Health,
    /// NUMA nodes; empty when unknown.
    pub numa_nodes: Vec<i64>,
}

/// The devices of one resource, in advertised order, with an index by id so that
/// Allocate checks each requested id without scanning the list.
///
/// Built once per change and shared (`Arc`) by every reader: ListAndWatch streams
/// and Allocate calls never copy it.
#[derive(Debug, Clone, Default)]
pub struct DeviceSet {
    devices: Vec<Device>,
    index: HashMap<String, usize>,
}

/// Why a list of devices cannot be advertised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceSetError {
    /// Two devices share an id.
    #[error("device id `{0}` appears more than once")]
    DuplicateId(String),
    /// An id is empty or too long.
    #[error("device id `{0}` is empty or longer than 253 bytes")]
    BadId(String),
    /// Too many devices.
    #[error("{0} devices is more than the 10000 one resource may advertise")]
    TooMany(usize),
}

impl DeviceSet {
    /// Checks ids (non-empty, bounded, unique) and the count, and indexes them.
    ///
    /// # Errors
    /// [`DeviceSetError`] for the first device that breaks a rule.
    pub fn new(devices: Vec<Device>) -> Result<Self, DeviceSetError> {
        if devices.len() > MAX_DEVICES_PER_RESOURCE {
            return Err(DeviceSetError::TooMany(devices.len()));
        }
        let mut index = HashMap::with_capacity(devices.len());
        for (i, device) in devices.iter().enumerate() {
            if device.id.is_empty() || device.id.len() > MAX_DEVICE_ID_LEN {
                return Err(DeviceSetError::BadId(device.id.clone()));
            }
            if index.insert(device.id.clone(), i).is_some() {
                return Err(DeviceSetError::DuplicateId(device.id.clone()));
            }
        }
        Ok(Self { devices, index })
    }

    /// The devices in advertised order.
    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// Where the device with this id is in the list.
    pub fn position(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }

    /// The device with this id.
    pub fn get(&self, id: &str) -> Option<&Device> {
        self.index.get(id).map(|&i| &self.devices[i])
    }

    /// How many devices.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// The same devices with health replaced where `health` names an id; returns
    /// `None` when nothing changes, so callers publish only real changes.
    pub fn with_health(&self, health: &HashMap<&str, Health>) -> Option<Self> {
        let changed = self
            .devices
            .iter()
            .any(|d| health.get(d.id.as_str()).is_some_and(|h| *h != d.health));
        if !changed {
            return None;
        }
        let mut next = self.clone();
        for device in &mut next.devices {
            if let Some(h) = health.get(device.id.as_str()) {
                device.health = *h;
            }
        }
        Some(next)
    }
}

impl DeviceSet {
    /// The set advertised when each device is shared `replicas` times: device `a`
    /// becomes `a::0` … `a::<replicas-1>` (in that order, each with `a`'s health
    /// and NUMA nodes). With `replicas` 1 it is the set itself, ids unchanged.
    ///
    /// # Errors
    /// [`DeviceSetError::TooMany`] when the replicas exceed the per-resource limit.
    pub fn replicated(&self, replicas: u32) -> Result<Self, DeviceSetError> {
        if replicas <= 1 {
            return Ok(self.clone());
        }
        let total = self.devices.len().saturating_mul(replicas as usize);
        if total > MAX_DEVICES_PER_RESOURCE {
            return Err(DeviceSetError::TooMany(total));
        }
        let mut devices = Vec::with_capacity(total);
        for device in &self.devices {
            for n in 0..replicas {
                devices.push(Device {
                    id: format!("{}{REPLICA_SEPARATOR}{n}", device.id),
                    ..device.clone()
                });
            }
        }
        Self::new(devices)
    }
}

/// Between a device id and its replica number in an advertised id (`a::0`).
pub const REPLICA_SEPARATOR: &str = "::";

/// Health with hysteresis: a device's health changes only after `threshold`
/// consecutive answers that differ from it (`unhealthy_after` to go unhealthy,
/// `healthy_after` to come back); one answer that agrees resets the count.
#[derive(Debug, Clone, Default)]
pub struct HealthTracker {
    /// Per device: consecutive answers that disagreed with its current health.
    streaks: HashMap<String, u32>,
}

impl HealthTracker {
    /// Feeds one answer about device `id`, whose health is `current`; returns its
    /// health after it.
    pub fn observe(
        &mut self,
        id: &str,
        current: Health,
        answer: Health,
        unhealthy_after: u32,
        healthy_after: u32,
    ) -> Health {
        if answer == current {
            self.streaks.remove(id);
            return current;
        }
        let threshold = match answer {
            Health::Unhealthy => unhealthy_after,
            Health::Healthy => healthy_after,
        }
        .max(1);
        let streak = self.streaks.entry(id.to_string()).or_insert(0);
        *streak += 1;
        if *streak >= threshold {
            self.streaks.remove(id);
            answer
        } else {
            current
        }
    }

    /// Forgets devices that are no longer listed.
    pub fn retain(&mut self, set: &DeviceSet) {
        self.streaks.retain(|id, _| set.get(id).is_some());
    }
}

impl PartialEq for DeviceSet {
    fn eq(&self, other: &Self) -> bool {
        self.devices == other.devices
    }
}

/// A device node for a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNode {
    /// Path on the host.
    pub host_path: String,
    /// Path in the container.
    pub container_path: String,
    /// cgroup permissions (`r`, `w`, `m`).
    pub permissions: String,
}

/// A host path mounted into a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Path on the host.
    pub host_path: String,
    /// Path in the container.
    pub container_path: String,
    /// Read-only mount.
    pub read_only: bool,
}

/// What one container gets for the devices allocated to it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerAllocation {
    /// Environment variables.
    pub envs: BTreeMap<String, String>,
    /// Device nodes.
    pub devices: Vec<DeviceNode>,
    /// Mounts.
    pub mounts: Vec<Mount>,
    /// Annotations for the runtime.
    pub annotations: BTreeMap<String, String>,
    /// Fully qualified CDI device names.
    pub cdi_devices: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_name_accepts_extended_names() {
        assert!(ResourceName::parse("example.com/dev-1").is_ok());
        assert!(
            ResourceName::parse("fpga.intel.com/region-ce48969398f05f33946d560708be108a").is_ok()
        );
        assert_eq!(
            ResourceName::for_kind("example.com", "dev-1").map(|n| n.to_string()),
            Ok("example.com/dev-1".to_string())
        );
        assert_eq!(
            ResourceName::for_kind("example.com", "vendor.io/gpu").map(|n| n.to_string()),
            Ok("vendor.io/gpu".to_string())
        );
    }

    #[test]
    fn resource_name_rejects_what_kubelet_rejects() {
        assert!(matches!(
            ResourceName::parse("dev-1"),
            Err(ResourceNameError::NoDomain(_))
        ));
        assert!(matches!(
            ResourceName::parse("Example.com/x"),
            Err(ResourceNameError::BadDomain(_))
        ));
        assert!(matches!(
            ResourceName::parse("kubernetes.io/x"),
            Err(ResourceNameError::ReservedDomain(_))
        ));
        assert!(matches!(
            ResourceName::parse("a.kubernetes.io/x"),
            Err(ResourceNameError::ReservedDomain(_))
        ));
        assert!(matches!(
            ResourceName::parse("example.com/-x"),
            Err(ResourceNameError::BadName(_))
        ));
        assert!(matches!(
            ResourceName::parse("example.com/a/b"),
            Err(ResourceNameError::BadName(_))
        ));
        assert!(matches!(
            ResourceName::parse(&format!("example.com/{}", "a".repeat(64))),
            Err(ResourceNameError::BadName(_))
        ));
    }

    #[test]
    fn file_safe_name_has_no_slash() {
        let name = ResourceName::parse("example.com/dev-1").expect("valid");
        assert_eq!(name.file_safe(), "example.com_dev-1");
    }

    #[test]
    fn qualified_names() {
        assert!(is_qualified_name("com.intel.fpga.mode"));
        assert!(is_qualified_name("virtual.example.com/devices"));
        assert!(!is_qualified_name("bad key"));
        assert!(!is_qualified_name("UPPER.com/x"));
        assert!(!is_qualified_name(""));
    }

    fn dev(id: &str, health: Health) -> Device {
        Device {
            id: id.to_string(),
            health,
            numa_nodes: vec![],
        }
    }

    #[test]
    fn device_set_rejects_duplicates_and_empty_ids() {
        assert_eq!(
            DeviceSet::new(vec![dev("a", Health::Healthy), dev("a", Health::Healthy)]).err(),
            Some(DeviceSetError::DuplicateId("a".into()))
        );
        assert_eq!(
            DeviceSet::new(vec![dev("", Health::Healthy)]).err(),
            Some(DeviceSetError::BadId(String::new()))
        );
    }

    #[test]
    fn with_health_reports_only_changes() {
        let set = DeviceSet::new(vec![dev("a", Health::Healthy), dev("b", Health::Healthy)])
            .expect("valid");
        let same: HashMap<&str, Health> = [("a", Health::Healthy)].into();
        assert!(set.with_health(&same).is_none());
        let sick: HashMap<&str, Health> = [("b", Health::Unhealthy)].into();
        let next = set.with_health(&sick).expect("changed");
        assert_eq!(next.get("b").map(|d| d.health), Some(Health::Unhealthy));
        assert_eq!(next.get("a").map(|d| d.health), Some(Health::Healthy));
    }

    #[test]
    fn replicas_share_a_device_under_derived_ids() {
        let set = DeviceSet::new(vec![
            Device {
                id: "a".into(),
                health: Health::Healthy,
                numa_nodes: vec![1],
            },
            Device {
                id: "x::y".into(),
                health: Health::Unhealthy,
                numa_nodes: vec![],
            },
        ])
        .expect("valid");
        assert_eq!(set.replicated(1).expect("same"), set);
        let shared = set.replicated(3).expect("replicated");
        let ids: Vec<&str> = shared.devices().iter().map(|d| d.id.as_str()).collect();
        assert_eq!(
            ids,
            ["a::0", "a::1", "a::2", "x::y::0", "x::y::1", "x::y::2"]
        );
        assert_eq!(
            shared.get("a::2").map(|d| d.numa_nodes.clone()),
            Some(vec![1])
        );
        assert_eq!(
            shared.get("x::y::1").map(|d| d.health),
            Some(Health::Unhealthy)
        );
        let many = DeviceSet::new(vec![Device {
            id: "a".into(),
            health: Health::Healthy,
            numa_nodes: vec![],
        }])
        .expect("valid");
        assert!(matches!(
            many.replicated(10_001),
            Err(DeviceSetError::TooMany(_))
        ));
    }

    #[test]
    fn hysteresis_needs_consecutive_answers_both_ways() {
        use Health::{Healthy as H, Unhealthy as U};
        let mut t = HealthTracker::default();
        // Unhealthy after 3 in a row; a good answer in between resets the count.
        assert_eq!(t.observe("a", H, U, 3, 2), H);
        assert_eq!(t.observe("a", H, U, 3, 2), H);
        assert_eq!(t.observe("a", H, H, 3, 2), H);
        assert_eq!(t.observe("a", H, U, 3, 2), H);
        assert_eq!(t.observe("a", H, U, 3, 2), H);
        assert_eq!(t.observe("a", H, U, 3, 2), U);
        // Back after 2 in a row.
        assert_eq!(t.observe("a", U, H, 3, 2), U);
        assert_eq!(t.observe("a", U, H, 3, 2), H);
        // Thresholds of 1 follow every answer.
        assert_eq!(t.observe("b", H, U, 1, 1), U);
        assert_eq!(t.observe("b", U, H, 1, 1), H);
    }

    #[test]
    fn quantities_are_what_kubernetes_parses() {
        for ok in [
            "16Gi", "4", "500m", "1e3", "+1.5k", "0.5", ".5", "1E-2", "2Ei",
        ] {
            assert!(is_quantity(ok), "{ok}");
        }
        for bad in ["", "16 Gi", "GiB", "1.2.3", "1Gb", "e3", "1e", "--1", "."] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }

    #[test]
    fn c_identifiers_are_at_most_32_characters() {
        assert!(is_c_identifier("firmwareVersion"));
        assert!(is_c_identifier("_x9"));
        assert!(!is_c_identifier("9x"));
        assert!(!is_c_identifier("a-b"));
        assert!(!is_c_identifier(&"a".repeat(33)));
    }
}
