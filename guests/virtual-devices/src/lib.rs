//! Imaginary devices, in the manner of the classic example device plugins.
//!
//! Configuration (all optional):
//! - `kinds`: comma-separated `name=count`, default `dev-1=4,dev-2=2`;
//! - `node`: the node segment of the ids, default `node1`;
//! - `unhealthy`: comma-separated device ids that `health` reports unhealthy;
//! - `numa-nodes`: spread the devices round-robin over this many NUMA nodes;
//! - `annotation`: `on` (default) or `off`: whether `allocate` sets the
//!   annotation below. It does not matter through DRA, where `prepare` answers
//!   and never annotates (a claim reaches its container through CDI, which
//!   carries no annotations);
//! - `model`: the `model` attribute `describe` gives every device, default
//!   `virtual`;
//! - `firmware`: its `firmware` attribute, a semantic version, default `1.0.0`;
//! - `memory`: its `memory` capacity, a Kubernetes quantity, default `1Gi`.
//!
//! Ids look like `/node1/dev1/3` (kind `dev-1`, device 3). `allocate` sets
//! `DEV_<kind>_ID_<n>=<id>` for the n-th device of the container, from 0 (kind
//! with every character outside `[A-Za-z0-9]` made `_`) and, unless
//! `annotation` is `off`, the annotation `virtual.example.com/devices` listing
//! the container's ids.
//!
//! Exports `scan`, `health` (the `unhealthy` list is checked every health
//! interval, cheaper than a scan) and `allocate` (numbering is per container, so
//! the host's merge of scan-time allocations would not do). No `post-allocate`:
//! up to 0.2.0 it added the annotation, which `allocate` knows as well; the
//! answer kubelet gets is the same.
//!
//! And, for a resource served through DRA, all three DRA hooks:
//! - `describe`: every device gets the attributes `model` (text), `index` (an
//!   integer: the device's number, the last segment of its id) and `firmware`
//!   (a version), and the capacity `memory`, from the configuration above. A
//!   device the configuration does not list is described from its id all the
//!   same; an id whose last segment is no number is an invalid request.
//! - `prepare`: per request of the claim, `DEV_<kind>_ID_<n>=<id>` for the n-th
//!   device of the request, numbered as `allocate` numbers a container's, and
//!   never an annotation, whatever `annotation` says. Then the request's opaque
//!   configuration (see below) is applied, entry by entry in order.
//! - `unprepare`: fails with `unavailable` when the claim's configuration asks
//!   for it (`failUnprepare`), for testing kubelet's retries; otherwise logs
//!   `unprepared claim <namespace>/<name>` at info and succeeds.
//!
//! The opaque configuration (`opaque.parameters` of a DeviceClass or claim
//! naming this driver) is a JSON object with two optional keys:
//!
//! ```json
//! {"env": {"MODE": "fast", "LEVEL": "3"}, "failUnprepare": false}
//! ```
//!
//! - `env`: an object of strings: each sets that environment variable in the
//!   request's containers (replacing the module's own, or an earlier entry's);
//! - `failUnprepare`: a boolean, read only by `unprepare`; where several
//!   entries set it, the last one counts, and the claim fails to unprepare when
//!   it is `true` for any of its requests.
//!
//! Any other key, another type, or text that is not a JSON object fails
//! `prepare` with `invalid-request`, naming the claim, the request, the entry
//! and the problem.

mod opaque;

use opaque::OpaqueConfig;
use wdp_sdk::{
    Allocate, AllocateRequest, ClaimRef, ClaimRequest, ContainerResponse, Describe, Device,
    DeviceDetails, DeviceKind, DevicePlugin, DeviceRef, Health, HealthCheck, ModuleError, Prepare,
    PrepareRequest, Unprepare, UnprepareRequest, config, debug, info,
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

/// What `describe` gives every device besides its index, from the configuration.
struct DetailsSpec {
    model: String,
    firmware: String,
    memory: String,
}

/// The details of the device `id` of `kind`: its index is the id's last segment.
fn details(spec: &DetailsSpec, kind: &str, id: &str) -> Result<DeviceDetails, ModuleError> {
    let segment = id.rsplit('/').next().unwrap_or(id);
    let index: u32 = segment.parse().map_err(|_| {
        ModuleError::InvalidRequest(format!(
            "device `{id}` of kind `{kind}`: its last segment `{segment}` is not a device number"
        ))
    })?;
    Ok(DeviceDetails::new()
        .text("model", &spec.model)
        .integer("index", i64::from(index))
        .version("firmware", &spec.firmware)
        .capacity("memory", &spec.memory))
}

impl Describe for VirtualDevices {
    fn describe(devices: Vec<DeviceRef>) -> Result<Vec<DeviceDetails>, ModuleError> {
        let spec = DetailsSpec {
            model: config::get_or("model", "virtual"),
            firmware: config::get_or("firmware", "1.0.0"),
            memory: config::get_or("memory", "1Gi"),
        };
        devices
            .iter()
            .map(|device| details(&spec, &device.kind, &device.id))
            .collect()
    }
}

/// The response for one request of `claim`: its devices numbered as
/// `allocate` numbers a container's, then each configuration entry's `env`.
fn prepare_request(
    kind: &str,
    claim: &ClaimRef,
    request: &ClaimRequest,
) -> Result<ContainerResponse, ModuleError> {
    let mut response = request
        .device_ids
        .iter()
        .enumerate()
        .fold(ContainerResponse::new(), |response, (n, id)| {
            response.env(&format!("DEV_{kind}_ID_{n}"), id)
        });
    for (entry, text) in request.config.iter().enumerate() {
        let config = OpaqueConfig::parse(text).map_err(|problem| {
            ModuleError::InvalidRequest(format!(
                "claim {claim}, request `{}`: configuration entry {}: {problem}",
                request.name,
                entry + 1
            ))
        })?;
        for (key, value) in &config.env {
            response = response.env(key, value);
        }
    }
    Ok(response)
}

impl Prepare for VirtualDevices {
    fn prepare(request: PrepareRequest) -> Result<Vec<ContainerResponse>, ModuleError> {
        // No annotation, whatever `annotation` says: CDI cannot carry one, and
        // the host fails a claim whose answer has any.
        let kind = env_safe(&request.kind);
        request
            .requests
            .iter()
            .map(|claim_request| prepare_request(&kind, &request.claim, claim_request))
            .collect()
    }
}

/// Whether the configuration of `request` asks unprepare to fail: the last
/// entry that sets `failUnprepare` says so. Entries that do not parse are
/// skipped: `prepare` refused them, so a prepared claim has none.
fn fails_unprepare(request: &ClaimRequest) -> bool {
    request
        .config
        .iter()
        .rev()
        .find_map(|text| OpaqueConfig::parse(text).ok()?.fail_unprepare)
        .unwrap_or(false)
}

impl Unprepare for VirtualDevices {
    fn unprepare(request: UnprepareRequest) -> Result<(), ModuleError> {
        if request.requests.iter().any(fails_unprepare) {
            return Err(ModuleError::Unavailable(format!(
                "claim {}: unprepare fails as its configuration asks (failUnprepare)",
                request.claim
            )));
        }
        info!("unprepared claim {}", request.claim);
        Ok(())
    }
}

wdp_sdk::export_device_plugin!(VirtualDevices with health, allocate);
wdp_sdk::export_dra_hooks!(VirtualDevices with describe, prepare, unprepare);

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DetailsSpec {
        DetailsSpec {
            model: "virtual".into(),
            firmware: "1.0.0".into(),
            memory: "1Gi".into(),
        }
    }

    fn claim() -> ClaimRef {
        ClaimRef {
            namespace: "default".into(),
            name: "pair".into(),
            uid: "u1".into(),
        }
    }

    fn request(ids: &[&str], config: &[&str]) -> ClaimRequest {
        ClaimRequest {
            name: "devs".into(),
            device_ids: ids.iter().map(|id| id.to_string()).collect(),
            allocations: ids.iter().map(|_| ContainerResponse::new()).collect(),
            config: config.iter().map(|c| c.to_string()).collect(),
        }
    }

    fn envs(response: &ContainerResponse) -> Vec<(&str, &str)> {
        response
            .envs
            .iter()
            .map(|kv| (kv.key.as_str(), kv.value.as_str()))
            .collect()
    }

    #[test]
    fn details_index_is_the_last_segment_of_the_id() {
        let details = details(&spec(), "dev-1", "/node1/dev1/3").unwrap();
        assert!(matches!(
            details.get("index"),
            Some(wdp_sdk::AttributeValue::Integer(3))
        ));
        assert!(matches!(
            details.get("model"),
            Some(wdp_sdk::AttributeValue::Text(m)) if m == "virtual"
        ));
        assert!(matches!(
            details.get("firmware"),
            Some(wdp_sdk::AttributeValue::Version(v)) if v == "1.0.0"
        ));
        assert_eq!(details.capacities.len(), 1);
        assert_eq!(details.capacities[0].name, "memory");
        assert_eq!(details.capacities[0].value, "1Gi");
    }

    #[test]
    fn details_of_an_unknown_device_come_from_its_id() {
        let details = details(&spec(), "other", "/elsewhere/x/17").unwrap();
        assert!(matches!(
            details.get("index"),
            Some(wdp_sdk::AttributeValue::Integer(17))
        ));
    }

    #[test]
    fn details_of_an_id_without_a_number_are_refused() {
        let err = details(&spec(), "dev-1", "/node1/dev1/x").unwrap_err();
        assert!(matches!(err, ModuleError::InvalidRequest(m) if m.contains("/node1/dev1/x")));
    }

    #[test]
    fn prepare_numbers_devices_and_never_annotates() {
        let response = prepare_request(
            "dev_1",
            &claim(),
            &request(&["/node1/dev1/2", "/node1/dev1/4"], &[]),
        )
        .unwrap();
        assert_eq!(
            envs(&response),
            [
                ("DEV_dev_1_ID_0", "/node1/dev1/2"),
                ("DEV_dev_1_ID_1", "/node1/dev1/4")
            ]
        );
        assert!(response.annotations.is_empty());
    }

    #[test]
    fn prepare_applies_config_entries_in_order() {
        let response = prepare_request(
            "dev_1",
            &claim(),
            &request(
                &["/node1/dev1/1"],
                &[
                    r#"{"env": {"MODE": "slow", "A": "1"}}"#,
                    r#"{"env": {"MODE": "fast"}, "failUnprepare": false}"#,
                ],
            ),
        )
        .unwrap();
        assert_eq!(
            envs(&response),
            [
                ("DEV_dev_1_ID_0", "/node1/dev1/1"),
                ("MODE", "fast"),
                ("A", "1")
            ]
        );
    }

    #[test]
    fn prepare_refuses_bad_config_naming_the_request() {
        for bad in [r#"{"other": 1}"#, "[]", r#"{"env": {"A": 1}}"#, "{"] {
            let err =
                prepare_request("k", &claim(), &request(&["/n/k/1"], &["{}", bad])).unwrap_err();
            assert!(
                matches!(&err, ModuleError::InvalidRequest(m)
                    if m.contains("default/pair") && m.contains("`devs`") && m.contains("entry 2")),
                "{bad}: {err:?}"
            );
        }
    }

    #[test]
    fn unprepare_fails_when_the_last_setting_asks() {
        assert!(!fails_unprepare(&request(&[], &[])));
        assert!(!fails_unprepare(&request(&[], &[r#"{"env": {}}"#])));
        assert!(fails_unprepare(&request(
            &[],
            &[r#"{"failUnprepare": true}"#]
        )));
        assert!(fails_unprepare(&request(
            &[],
            &[
                r#"{"failUnprepare": false}"#,
                r#"{"failUnprepare": true}"#,
                "{}"
            ]
        )));
        assert!(!fails_unprepare(&request(
            &[],
            &[r#"{"failUnprepare": true}"#, r#"{"failUnprepare": false}"#]
        )));
    }
}
