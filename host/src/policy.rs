//! The only place that sees both raw guest output and domain values: it turns what
//! a module returned into what kubelet may see, or refuses it with the module, the
//! field and the rule broken.
//!
//! Rules enforced here: resource names are valid extended resource names, unique
//! per module; device ids are non-empty, at most 253 bytes, unique per resource, at
//! most 10 000 per resource; a health answer has one entry per device asked about;
//! an allocation has one response per container; env var names are POSIX names;
//! container and host paths are absolute and normalised; host paths lie under
//! the module's grants once symlinks are resolved ([`crate::grants`]), and
//! kubelet is given them resolved; annotation
//! keys are Kubernetes qualified names; CDI names are `vendor/class=name` as the
//! runtime's CDI parser accepts them; no list in a response holds more than
//! [`MAX_ENTRIES`] entries and the whole response stays under [`MAX_RESPONSE_BYTES`].
//! A `describe` answer ([`details`]) has one entry per device, attribute and
//! capacity names as Kubernetes accepts them in a ResourceSlice (not the
//! host's own `kind`, `id` and `numaNode`), at most [`MAX_DETAILS`] per device,
//! text and versions at most 64 bytes, versions semver and capacities
//! quantities.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use crate::domain::{
    AttributeValue, ContainerAllocation, Device, DeviceDetails, DeviceNode, DeviceSet, Health,
    Mount, ResourceName, ResourceNameError, is_c_identifier, is_dns_subdomain, is_qualified_name,
    is_quantity,
};
use crate::grants::{Grants, PathUse};
use crate::runtime::bindings::{self, ContainerResponse, DeviceKind};
use crate::snapshot::DeviceAllocations;

/// Most kinds (resources) one module may report.
pub const MAX_KINDS: usize = 256;
/// Most entries in each list of one container's response (envs, device nodes,
/// mounts, annotations, CDI devices).
pub const MAX_ENTRIES: usize = 1024;
/// Most bytes of text in one Allocate response, all containers together. Kubelet's
/// gRPC client takes messages of up to 4 MiB; this leaves room for framing, so a
/// response that kubelet would drop is refused here with a clear reason instead.
pub const MAX_RESPONSE_BYTES: usize = 3 << 20;
/// Longest path accepted (Linux `PATH_MAX` less the NUL).
pub const MAX_PATH: usize = 4095;

/// A guest answer that breaks a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("module {module}: {field}: {rule}")]
pub struct PolicyError {
    /// The module that answered.
    pub module: String,
    /// Where in the answer, e.g. `containers[0].envs["1X"]`.
    pub field: String,
    /// The rule broken.
    pub rule: String,
}

struct Ctx<'a> {
    module: &'a str,
}

impl Ctx<'_> {
    fn err(&self, field: impl fmt::Display, rule: impl fmt::Display) -> PolicyError {
        PolicyError {
            module: self.module.to_string(),
            field: field.to_string(),
            rule: rule.to_string(),
        }
    }
}

/// One resource found by a scan: its kubelet name, the module's kind name and the
/// checked devices.
#[derive(Debug, Clone)]
pub struct ScannedResource {
    /// The resource name kubelet sees.
    pub name: ResourceName,
    /// The kind name as the module reported it (passed back in `allocate`).
    pub kind: String,
    /// The devices.
    pub devices: DeviceSet,
    /// Each device's `allocation` as the module reported it, checked (host
    /// paths resolved), for devices whose allocation is not empty; handed back to
    /// `allocate` (see [`guest_allocation`]).
    pub allocations: DeviceAllocations,
    /// What `describe` answered for each device, by id (empty when the module
    /// does not export it); published by DRA.
    pub details: BTreeMap<String, DeviceDetails>,
}

/// An allocation the host accepted, in the module's terms again: what the
/// module's `allocate` is handed back for a device (`container-request.allocations`).
/// Host paths are the resolved ones kubelet would be given; maps are in key order.
pub fn guest_allocation(a: &ContainerAllocation) -> ContainerResponse {
    let pairs = |map: &BTreeMap<String, String>| {
        map.iter()
            .map(|(key, value)| bindings::KeyValue {
                key: key.clone(),
                value: value.clone(),
            })
            .collect()
    };
    ContainerResponse {
        envs: pairs(&a.envs),
        devices: a
            .devices
            .iter()
            .map(|d| bindings::DeviceSpec {
                host_path: d.host_path.clone(),
                container_path: d.container_path.clone(),
                permissions: d.permissions.clone(),
            })
            .collect(),
        mounts: a
            .mounts
            .iter()
            .map(|m| bindings::Mount {
                host_path: m.host_path.clone(),
                container_path: m.container_path.clone(),
                read_only: m.read_only,
            })
            .collect(),
        annotations: pairs(&a.annotations),
        cdi_devices: a.cdi_devices.clone(),
    }
}

/// Whether a reported allocation holds nothing.
pub fn is_empty_allocation(r: &ContainerResponse) -> bool {
    r.envs.is_empty()
        && r.devices.is_empty()
        && r.mounts.is_empty()
        && r.annotations.is_empty()
        && r.cdi_devices.is_empty()
}

/// Checks a scan and names each kind's resource with `name_of` (the module's
/// domain and the operator's renames). Each device's `allocation` is checked by
/// the rules of an `allocate` answer, host paths against `grants`, and all of a
/// kind's allocations together hold at most [`MAX_RESPONSE_BYTES`] of text (so
/// that what `allocate` is handed back always fits).
///
/// # Errors
/// [`PolicyError`] for the first rule broken.
pub fn scan(
    module: &str,
    name_of: impl Fn(&str) -> Result<ResourceName, ResourceNameError>,
    grants: &Grants,
    kinds: Vec<DeviceKind>,
) -> Result<Vec<ScannedResource>, PolicyError> {
    let ctx = Ctx { module };
    if kinds.len() > MAX_KINDS {
        return Err(ctx.err(
            "scan",
            format!("{} kinds is more than the {MAX_KINDS} allowed", kinds.len()),
        ));
    }
    let mut names = HashSet::new();
    kinds
        .into_iter()
        .map(|kind| {
            let field = format!("kinds[{:?}]", kind.name);
            let name = name_of(&kind.name).map_err(|e| ctx.err(&field, e))?;
            if !names.insert(name.clone()) {
                return Err(ctx.err(&field, format!("resource {name} is reported twice")));
            }
            let mut allocations = DeviceAllocations::new(grants.clone());
            let mut text = 0usize;
            let mut devices = Vec::with_capacity(kind.devices.len());
            for d in kind.devices {
                if !is_empty_allocation(&d.allocation) {
                    let at = format!("{field}.devices[{:?}].allocation", d.id);
                    text = text.saturating_add(text_bytes(&d.allocation));
                    if text > MAX_RESPONSE_BYTES {
                        return Err(ctx.err(
                            at,
                            format!(
                                "the kind's allocations hold more than the {MAX_RESPONSE_BYTES} bytes of text one Allocate response may"
                            ),
                        ));
                    }
                    let checked = container(&Ctx { module }, grants, 0, d.allocation)
                        .map_err(|e| {
                            let within = e.field.trim_start_matches("containers[0].");
                            ctx.err(format!("{at}.{within}"), e.rule)
                        })?;
                    allocations.insert(d.id.clone(), checked);
                }
                devices.push(Device {
                    id: d.id,
                    health: health(d.health),
                    numa_nodes: d.numa_nodes,
                });
            }
            let devices =
                DeviceSet::new(devices).map_err(|e| ctx.err(format!("{field}.devices"), e))?;
            Ok(ScannedResource {
                name,
                kind: kind.name,
                devices,
                allocations,
                details: BTreeMap::new(),
            })
        })
        .collect()
}

/// Most attributes and capacities together a module may describe per device:
/// Kubernetes allows 32 per ResourceSlice device, and the host publishes up
/// to three of its own ([`HOST_ATTRIBUTES`]).
pub const MAX_DETAILS: usize = 29;
/// The attributes the host publishes itself, which a module may not describe.
pub const HOST_ATTRIBUTES: [&str; 3] = ["kind", "id", "numaNode"];
/// Longest text or version attribute value Kubernetes accepts.
const MAX_ATTRIBUTE_VALUE: usize = 64;

/// Checks a `describe` answer for the `asked` devices (kind and id each) and
/// converts it, one entry per device in order.
///
/// # Errors
/// [`PolicyError`] for the first rule broken, naming the device and the field.
pub fn details(
    module: &str,
    asked: &[bindings::DeviceRef],
    answer: Vec<bindings::DeviceDetails>,
) -> Result<Vec<DeviceDetails>, PolicyError> {
    let ctx = Ctx { module };
    if answer.len() != asked.len() {
        return Err(ctx.err(
            "describe",
            format!(
                "answered {} entries for {} devices",
                answer.len(),
                asked.len()
            ),
        ));
    }
    asked
        .iter()
        .zip(answer)
        .map(|(device, described)| {
            let at = format!("describe[{:?}][{:?}]", device.kind, device.id);
            let count = described.attributes.len() + described.capacities.len();
            if count > MAX_DETAILS {
                return Err(ctx.err(
                    &at,
                    format!(
                        "{count} attributes and capacities is more than the {MAX_DETAILS} a device may have (Kubernetes allows 32, the host publishes up to 3)"
                    ),
                ));
            }
            let mut details = DeviceDetails::default();
            for attribute in described.attributes {
                let field = format!("{at}.attributes[{:?}]", attribute.name);
                check_detail_name(&ctx, &field, &attribute.name)?;
                if HOST_ATTRIBUTES.contains(&attribute.name.as_str()) {
                    return Err(ctx.err(
                        field,
                        "the host publishes this attribute itself; qualify the name (`example.com/kind`) or choose another",
                    ));
                }
                let value = match attribute.value {
                    bindings::AttributeValue::Text(text) => {
                        if text.len() > MAX_ATTRIBUTE_VALUE {
                            return Err(ctx.err(
                                field,
                                format!("text of {} bytes is more than {MAX_ATTRIBUTE_VALUE}", text.len()),
                            ));
                        }
                        AttributeValue::Text(text)
                    }
                    bindings::AttributeValue::Integer(n) => AttributeValue::Int(n),
                    bindings::AttributeValue::Boolean(b) => AttributeValue::Bool(b),
                    bindings::AttributeValue::Version(version) => {
                        if version.len() > MAX_ATTRIBUTE_VALUE {
                            return Err(ctx.err(
                                field,
                                format!("version of {} bytes is more than {MAX_ATTRIBUTE_VALUE}", version.len()),
                            ));
                        }
                        if let Err(e) = semver::Version::parse(&version) {
                            return Err(ctx.err(
                                field,
                                format!("`{version}` is not a semantic version (semver 2.0.0): {e}"),
                            ));
                        }
                        AttributeValue::Version(version)
                    }
                };
                if details.attributes.insert(attribute.name, value).is_some() {
                    return Err(ctx.err(field, "named twice"));
                }
            }
            for capacity in described.capacities {
                let field = format!("{at}.capacities[{:?}]", capacity.name);
                check_detail_name(&ctx, &field, &capacity.name)?;
                if !is_quantity(&capacity.value) {
                    return Err(ctx.err(
                        field,
                        format!(
                            "`{}` is not a Kubernetes quantity (like `16Gi`, `4`, `500m`)",
                            capacity.value
                        ),
                    ));
                }
                if details
                    .capacities
                    .insert(capacity.name, capacity.value)
                    .is_some()
                {
                    return Err(ctx.err(field, "named twice"));
                }
            }
            Ok(details)
        })
        .collect()
}

/// An attribute or capacity name: a C identifier of at most 32 characters, or
/// `domain/identifier` with a DNS subdomain of at most 63 characters.
fn check_detail_name(ctx: &Ctx<'_>, field: &str, name: &str) -> Result<(), PolicyError> {
    let valid = match name.split_once('/') {
        Some((domain, identifier)) => {
            domain.len() <= 63 && is_dns_subdomain(domain) && is_c_identifier(identifier)
        }
        None => is_c_identifier(name),
    };
    if valid {
        Ok(())
    } else {
        Err(ctx.err(
            field,
            "not a C identifier of at most 32 characters, optionally after a DNS domain and `/` (`model`, `example.com/model`)",
        ))
    }
}

/// The domain value of a guest health.
pub fn health(h: bindings::Health) -> Health {
    match h {
        bindings::Health::Healthy => Health::Healthy,
        bindings::Health::Unhealthy => Health::Unhealthy,
    }
}

/// Checks that a health answer has one entry per device asked about.
///
/// # Errors
/// [`PolicyError`] when the lengths differ.
pub fn health_answer(
    module: &str,
    asked: usize,
    answer: &[bindings::Health],
) -> Result<(), PolicyError> {
    if answer.len() == asked {
        Ok(())
    } else {
        Err(Ctx { module }.err(
            "health",
            format!("answered {} entries for {asked} devices", answer.len()),
        ))
    }
}

/// Checks an allocation for `containers` containers, with host paths judged by
/// `grants`, and converts it.
///
/// # Errors
/// [`PolicyError`] for the first rule broken.
pub fn allocation(
    module: &str,
    containers: usize,
    responses: Vec<ContainerResponse>,
    grants: &Grants,
) -> Result<Vec<ContainerAllocation>, PolicyError> {
    let ctx = Ctx { module };
    if responses.len() != containers {
        return Err(ctx.err(
            "allocate",
            format!(
                "answered {} containers for {containers} requested",
                responses.len()
            ),
        ));
    }
    response_size(&ctx, responses.iter().map(text_bytes).sum())?;
    responses
        .into_iter()
        .enumerate()
        .map(|(n, r)| container(&ctx, grants, n, r))
        .collect()
}

/// Checks the host's merge of scan-time allocations ([`crate::merge`]) that were
/// checked against the grants the module runs with now: each entry passed the
/// rules when scanned, so only what merging can break is checked again (the
/// number of entries per list, the size of the whole response). No host path
/// is resolved again.
///
/// # Errors
/// [`PolicyError`] for the first rule broken.
pub fn merged(
    module: &str,
    allocations: Vec<ContainerAllocation>,
) -> Result<Vec<ContainerAllocation>, PolicyError> {
    let ctx = Ctx { module };
    let pairs =
        |m: &BTreeMap<String, String>| -> usize { m.iter().map(|(k, v)| k.len() + v.len()).sum() };
    let mut size = 0usize;
    for (n, a) in allocations.iter().enumerate() {
        entry_counts(
            &ctx,
            n,
            [
                a.envs.len(),
                a.devices.len(),
                a.mounts.len(),
                a.annotations.len(),
                a.cdi_devices.len(),
            ],
        )?;
        size += pairs(&a.envs)
            + pairs(&a.annotations)
            + a.devices
                .iter()
                .map(|d| d.host_path.len() + d.container_path.len() + d.permissions.len())
                .sum::<usize>()
            + a.mounts
                .iter()
                .map(|m| m.host_path.len() + m.container_path.len())
                .sum::<usize>()
            + a.cdi_devices.iter().map(String::len).sum::<usize>();
    }
    response_size(&ctx, size)?;
    Ok(allocations)
}

/// No list of container `n`'s response (envs, device nodes, mounts,
/// annotations, CDI devices, in that order) holds more than [`MAX_ENTRIES`].
fn entry_counts(ctx: &Ctx<'_>, n: usize, lens: [usize; 5]) -> Result<(), PolicyError> {
    let lists = ["envs", "devices", "mounts", "annotations", "cdi-devices"];
    for (list, len) in lists.into_iter().zip(lens) {
        if len > MAX_ENTRIES {
            return Err(ctx.err(
                format!("containers[{n}].{list}"),
                format!("{len} entries is more than the {MAX_ENTRIES} allowed"),
            ));
        }
    }
    Ok(())
}

/// A response of `size` bytes of text can be sent to kubelet.
fn response_size(ctx: &Ctx<'_>, size: usize) -> Result<(), PolicyError> {
    if size > MAX_RESPONSE_BYTES {
        return Err(ctx.err(
            "allocate",
            format!(
                "the response holds {size} bytes of text, more than the {MAX_RESPONSE_BYTES} kubelet can be sent"
            ),
        ));
    }
    Ok(())
}

/// The bytes of text in one container's response.
fn text_bytes(r: &ContainerResponse) -> usize {
    let kv = |list: &[bindings::KeyValue]| -> usize {
        list.iter().map(|kv| kv.key.len() + kv.value.len()).sum()
    };
    kv(&r.envs)
        + kv(&r.annotations)
        + r.devices
            .iter()
            .map(|d| d.host_path.len() + d.container_path.len() + d.permissions.len())
            .sum::<usize>()
        + r.mounts
            .iter()
            .map(|m| m.host_path.len() + m.container_path.len())
            .sum::<usize>()
        + r.cdi_devices.iter().map(String::len).sum::<usize>()
}

fn container(
    ctx: &Ctx<'_>,
    grants: &Grants,
    n: usize,
    r: ContainerResponse,
) -> Result<ContainerAllocation, PolicyError> {
    entry_counts(
        ctx,
        n,
        [
            r.envs.len(),
            r.devices.len(),
            r.mounts.len(),
            r.annotations.len(),
            r.cdi_devices.len(),
        ],
    )?;
    let mut envs = BTreeMap::new();
    for kv in r.envs {
        if !is_env_name(&kv.key) {
            return Err(ctx.err(
                format!("containers[{n}].envs[{:?}]", kv.key),
                "not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)",
            ));
        }
        if envs.insert(kv.key.clone(), kv.value).is_some() {
            return Err(ctx.err(format!("containers[{n}].envs[{:?}]", kv.key), "set twice"));
        }
    }
    let mut annotations = BTreeMap::new();
    for kv in r.annotations {
        if !is_qualified_name(&kv.key) {
            return Err(ctx.err(
                format!("containers[{n}].annotations[{:?}]", kv.key),
                "not a Kubernetes qualified name ([prefix/]name)",
            ));
        }
        if annotations.insert(kv.key.clone(), kv.value).is_some() {
            return Err(ctx.err(
                format!("containers[{n}].annotations[{:?}]", kv.key),
                "set twice",
            ));
        }
    }
    let devices = r
        .devices
        .into_iter()
        .enumerate()
        .map(|(i, d)| {
            let field = format!("containers[{n}].devices[{i}]");
            check_path(ctx, &format!("{field}.container-path"), &d.container_path)?;
            let host_path = check_host_path(
                ctx,
                grants,
                &format!("{field}.host-path"),
                PathUse::Device,
                &d.host_path,
            )?;
            if d.permissions.is_empty()
                || !d.permissions.chars().all(|c| matches!(c, 'r' | 'w' | 'm'))
            {
                return Err(ctx.err(format!("{field}.permissions"), "must be made of r, w and m"));
            }
            Ok(DeviceNode {
                host_path,
                container_path: d.container_path,
                permissions: d.permissions,
            })
        })
        .collect::<Result<_, _>>()?;
    let mounts = r
        .mounts
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let field = format!("containers[{n}].mounts[{i}]");
            check_path(ctx, &format!("{field}.container-path"), &m.container_path)?;
            let host_path = check_host_path(
                ctx,
                grants,
                &format!("{field}.host-path"),
                PathUse::Mount,
                &m.host_path,
            )?;
            Ok(Mount {
                host_path,
                container_path: m.container_path,
                read_only: m.read_only,
            })
        })
        .collect::<Result<_, _>>()?;
    for (i, name) in r.cdi_devices.iter().enumerate() {
        if !crate::cdi::is_qualified_name(name) {
            return Err(ctx.err(
                format!("containers[{n}].cdi-devices[{i}]"),
                "not a CDI device name (vendor.com/class=name)",
            ));
        }
    }
    Ok(ContainerAllocation {
        envs,
        devices,
        mounts,
        annotations,
        cdi_devices: r.cdi_devices,
    })
}

/// POSIX environment variable name.
fn is_env_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && !b[0].is_ascii_digit()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// A host path: absolute and normalised, and allowed by the module's grants for
/// `use_` once symlinks are resolved. Returns the resolved path, which is what
/// kubelet is given.
fn check_host_path(
    ctx: &Ctx<'_>,
    grants: &Grants,
    field: &str,
    use_: PathUse,
    path: &str,
) -> Result<String, PolicyError> {
    check_path(ctx, field, path)?;
    let resolved = grants
        .check_host_path(use_, path)
        .map_err(|rule| ctx.err(field, rule))?;
    resolved.into_os_string().into_string().map_err(|real| {
        ctx.err(
            field,
            format!(
                "`{path}` resolves to `{}`, which is not UTF-8",
                real.display()
            ),
        )
    })
}

/// Absolute and normalised: starts with `/`, no `.`, `..` or empty segments, no
/// trailing `/` (other than `/` itself), no NUL, at most [`MAX_PATH`] bytes.
fn check_path(ctx: &Ctx<'_>, field: &str, path: &str) -> Result<(), PolicyError> {
    if path.len() > MAX_PATH {
        return Err(ctx.err(
            field,
            format!("a path of {} bytes is longer than {MAX_PATH}", path.len()),
        ));
    }
    if !path.starts_with('/') {
        return Err(ctx.err(field, format!("`{path}` is not an absolute path")));
    }
    if path.contains('\0')
        || (path != "/"
            && path[1..]
                .split('/')
                .any(|s| s.is_empty() || s == "." || s == ".."))
    {
        return Err(ctx.err(
            field,
            format!("`{path}` is not a normalised path (no `.`, `..`, `//` or trailing `/`)"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EX: fn(&str) -> Result<ResourceName, ResourceNameError> =
        |kind| ResourceName::for_kind("example.com", kind);
    use crate::runtime::bindings::wasm_device_plugin::device::types::{
        Device as GuestDevice, DeviceSpec, KeyValue, Mount as GuestMount,
    };

    fn kind(name: &str, ids: &[&str]) -> DeviceKind {
        DeviceKind {
            name: name.to_string(),
            devices: ids
                .iter()
                .map(|id| GuestDevice {
                    id: id.to_string(),
                    health: bindings::Health::Healthy,
                    numa_nodes: vec![],
                    allocation: response(),
                })
                .collect(),
        }
    }

    fn allocation_(
        module: &str,
        containers: usize,
        responses: Vec<ContainerResponse>,
    ) -> Result<Vec<ContainerAllocation>, PolicyError> {
        allocation(module, containers, responses, &Grants::default())
    }

    fn response() -> ContainerResponse {
        ContainerResponse {
            envs: vec![],
            devices: vec![],
            mounts: vec![],
            annotations: vec![],
            cdi_devices: vec![],
        }
    }

    #[test]
    fn scan_prefixes_bare_kind_names() {
        let got = scan(
            "m",
            EX,
            &Grants::default(),
            vec![kind("dev-1", &["a"]), kind("vendor.io/x", &["b"])],
        )
        .expect("valid");
        let names: Vec<_> = got.iter().map(|r| r.name.to_string()).collect();
        assert_eq!(names, ["example.com/dev-1", "vendor.io/x"]);
        assert_eq!(got[0].kind, "dev-1");
    }

    #[test]
    fn scan_rejects_duplicate_device_ids() {
        let err = scan(
            "m",
            EX,
            &Grants::default(),
            vec![kind("dev-1", &["a", "a"])],
        )
        .expect_err("duplicate");
        assert_eq!(err.module, "m");
        assert!(err.field.contains("dev-1"));
    }

    #[test]
    fn scan_rejects_duplicate_kinds_and_bad_names() {
        assert!(
            scan(
                "m",
                EX,
                &Grants::default(),
                vec![kind("x", &[]), kind("x", &[])]
            )
            .is_err()
        );
        assert!(
            scan(
                "m",
                EX,
                &Grants::default(),
                vec![kind("kubernetes.io/x", &[])]
            )
            .is_err()
        );
        assert!(scan("m", EX, &Grants::default(), vec![kind("bad name", &[])]).is_err());
    }

    #[test]
    fn scan_keeps_reported_allocations_and_checks_them() {
        let mut dev = kind("fpga", &["a", "b"]);
        dev.devices[0].allocation.devices.push(DeviceSpec {
            host_path: "/dev/null".into(),
            container_path: "/dev/fpga0".into(),
            permissions: "rw".into(),
        });
        let got = scan("m", EX, &Grants::default(), vec![dev.clone()]).expect("valid");
        // Only the device that reported something is kept, as reported.
        assert_eq!(got[0].allocations.iter().count(), 1);
        assert_eq!(
            got[0].allocations.get("a").expect("a has one").devices[0].host_path,
            "/dev/null"
        );

        dev.devices[1].allocation.devices.push(DeviceSpec {
            host_path: "/dev/mem".into(),
            container_path: "/dev/mem".into(),
            permissions: "r".into(),
        });
        let err = scan("m", EX, &Grants::default(), vec![dev]).expect_err("protected path");
        assert_eq!(
            err.field,
            "kinds[\"fpga\"].devices[\"b\"].allocation.devices[0].host-path"
        );
        assert!(err.rule.contains("/dev/mem"), "{}", err.rule);
    }

    #[test]
    fn scan_bounds_a_kinds_allocations() {
        let mut dev = kind("k", &["a", "b"]);
        for d in &mut dev.devices {
            d.allocation.envs.push(KeyValue {
                key: "BIG".into(),
                value: "x".repeat(MAX_RESPONSE_BYTES / 2 + 1),
            });
        }
        let err = scan("m", EX, &Grants::default(), vec![dev]).expect_err("too big together");
        assert!(err.field.contains("devices[\"b\"]"), "{}", err.field);
    }

    #[test]
    fn allocation_must_cover_every_container() {
        assert!(allocation_("m", 2, vec![response()]).is_err());
        assert_eq!(
            allocation_("m", 1, vec![response()]).map(|v| v.len()),
            Ok(1)
        );
    }

    #[test]
    fn allocation_rejects_bad_env_names() {
        let mut r = response();
        r.envs.push(KeyValue {
            key: "1BAD".into(),
            value: "x".into(),
        });
        let err = allocation_("m", 1, vec![r]).expect_err("bad env");
        assert!(err.field.contains("envs"));
    }

    #[test]
    fn allocation_rejects_relative_or_unnormalised_paths() {
        for path in ["dev/x", "/dev/../etc", "/dev//x", "/dev/x/"] {
            let mut r = response();
            r.devices.push(DeviceSpec {
                host_path: path.into(),
                container_path: "/dev/x".into(),
                permissions: "rw".into(),
            });
            assert!(allocation_("m", 1, vec![r]).is_err(), "{path} accepted");
        }
        let mut r = response();
        r.mounts.push(GuestMount {
            host_path: "/opt/x".into(),
            container_path: "opt".into(),
            read_only: true,
        });
        assert!(allocation_("m", 1, vec![r]).is_err());
    }

    #[test]
    fn allocation_rejects_bad_annotation_keys_and_cdi_names() {
        let mut r = response();
        r.annotations.push(KeyValue {
            key: "not a key".into(),
            value: "x".into(),
        });
        assert!(allocation_("m", 1, vec![r]).is_err());
        let mut r = response();
        r.cdi_devices.push("no-equals-sign".into());
        assert!(allocation_("m", 1, vec![r]).is_err());
        let mut r = response();
        r.cdi_devices.push("vendor.com/fpga=dev0".into());
        r.annotations.push(KeyValue {
            key: "com.intel.fpga.mode".into(),
            value: "fpga.intel.com/region".into(),
        });
        assert!(allocation_("m", 1, vec![r]).is_ok());
    }

    fn described(
        attributes: Vec<(&str, bindings::AttributeValue)>,
        capacities: Vec<(&str, &str)>,
    ) -> bindings::DeviceDetails {
        bindings::DeviceDetails {
            attributes: attributes
                .into_iter()
                .map(|(name, value)| bindings::Attribute {
                    name: name.into(),
                    value,
                })
                .collect(),
            capacities: capacities
                .into_iter()
                .map(|(name, value)| bindings::Capacity {
                    name: name.into(),
                    value: value.into(),
                })
                .collect(),
        }
    }

    fn one_device() -> Vec<bindings::DeviceRef> {
        vec![bindings::DeviceRef {
            kind: "k".into(),
            id: "d0".into(),
        }]
    }

    #[test]
    fn details_are_converted_by_name() {
        use bindings::AttributeValue as V;
        let answer = described(
            vec![
                ("model", V::Text("x".into())),
                ("index", V::Integer(3)),
                ("example.com/fast", V::Boolean(true)),
                ("firmware", V::Version("1.2.3-rc.1".into())),
            ],
            vec![("memory", "16Gi")],
        );
        let details = details("m", &one_device(), vec![answer]).expect("valid");
        assert_eq!(
            details[0].attributes.get("index"),
            Some(&AttributeValue::Int(3))
        );
        assert_eq!(
            details[0].attributes.get("example.com/fast"),
            Some(&AttributeValue::Bool(true))
        );
        assert_eq!(
            details[0].capacities.get("memory").map(String::as_str),
            Some("16Gi")
        );
    }

    #[test]
    fn details_break_no_slice_rule() {
        use bindings::AttributeValue as V;
        let refused = |answer: bindings::DeviceDetails, why: &str| {
            let err = details("m", &one_device(), vec![answer]).expect_err(why);
            assert!(err.to_string().contains("describe[\"k\"][\"d0\"]"), "{err}");
        };
        refused(
            described(vec![("kind", V::Text("x".into()))], vec![]),
            "host's own",
        );
        refused(
            described(vec![("numaNode", V::Integer(1))], vec![]),
            "host's own",
        );
        refused(
            described(vec![("1model", V::Integer(1))], vec![]),
            "not a C identifier",
        );
        refused(
            described(vec![("Example.com/m", V::Integer(1))], vec![]),
            "bad domain",
        );
        refused(
            described(vec![("m", V::Text("x".repeat(65)))], vec![]),
            "long text",
        );
        refused(
            described(vec![("m", V::Version("1.2".into()))], vec![]),
            "not semver",
        );
        refused(
            described(vec![("m", V::Integer(1)), ("m", V::Integer(2))], vec![]),
            "twice",
        );
        refused(
            described(vec![], vec![("memory", "16 GiB")]),
            "not a quantity",
        );
        let many: Vec<(String, V)> = (0..30).map(|n| (format!("a{n}"), V::Integer(n))).collect();
        refused(
            described(
                many.iter().map(|(k, v)| (k.as_str(), v.clone())).collect(),
                vec![],
            ),
            "too many",
        );
        let err = details("m", &one_device(), vec![]).expect_err("one entry per device");
        assert!(
            err.to_string().contains("answered 0 entries for 1 devices"),
            "{err}"
        );
    }
}
