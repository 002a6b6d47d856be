//! Publishing a driver's devices as ResourceSlices: one pool per driver and
//! node (named after the node), one slice per [`MAX_DEVICES_PER_SLICE`]
//! devices, owned by the Node so that the API server deletes them with it.
//!
//! The publisher follows the resource's snapshots: each one that changes what
//! the slices say (a device appearing, going, turning unhealthy or healthy
//! again, its attributes changing with a new module version) is published
//! with the pool's generation one higher, every slice of the pool rewritten.
//! Unhealthy devices are left out of the slices, so the scheduler allocates
//! only healthy ones (device taints would say more, but need a feature gate
//! that 1.35 clusters do not enable by default). At start the generation
//! continues from the highest one already published for the pool (an earlier
//! run's), since the scheduler ignores slices of an older generation. When the
//! resource is withdrawn (its module removed, or the kind gone or moved to the
//! device-plugin API), the pool's slices are deleted; when the whole host
//! stops they are left to the host that takes over, as upstream's helper
//! does: in a rolling update the new pod publishes the same pool already.
//! A failed publication is retried with backoff (1 s doubling to 60 s),
//! logged once per run of failures.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::resource::v1::{
    Device, DeviceAttribute, DeviceCapacity, ResourcePool, ResourceSlice, ResourceSliceSpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::domain::{AttributeValue, Health};
use crate::frontend::Snapshots;
use crate::kubelet::dra::driver::Driver;
use crate::kubelet::dra::names::DeviceNames;
use crate::snapshot::ResourceSnapshot;

/// The most devices one ResourceSlice may hold (`resource.k8s.io/v1`
/// `ResourceSliceMaxDevices`).
pub const MAX_DEVICES_PER_SLICE: usize = 128;
/// The longest string attribute value the API server takes.
const MAX_ATTRIBUTE_STRING: usize = 64;
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// How long withdrawing a driver waits for its slices to be deleted.
const DELETE_TIMEOUT: Duration = Duration::from_secs(10);

/// One device as a slice publishes it.
#[derive(Debug, Clone, PartialEq)]
struct SliceDevice {
    name: String,
    attributes: BTreeMap<String, DeviceAttribute>,
    capacity: BTreeMap<String, DeviceCapacity>,
}

/// Where a driver's slices stand, for readiness and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SliceStatus {
    /// Not published yet (or the last attempt failed before any succeeded).
    Pending(String),
    /// Published at this pool generation.
    Published(i64),
}

/// The devices `snapshot` publishes: its healthy devices that have a name,
/// with the host's attributes and what the module described (its
/// attribute names are checked not to be the host's, by the output policy).
fn slice_devices(snapshot: &ResourceSnapshot, names: &DeviceNames) -> Vec<SliceDevice> {
    let kind = snapshot.kind();
    snapshot
        .real()
        .devices()
        .iter()
        .enumerate()
        .filter(|(_, d)| d.health == Health::Healthy)
        .filter_map(|(at, d)| {
            let name = names.name(at)?.to_string();
            let mut attributes = BTreeMap::new();
            if kind.len() <= MAX_ATTRIBUTE_STRING {
                attributes.insert("kind".to_string(), string(kind));
            }
            if d.id.len() <= MAX_ATTRIBUTE_STRING {
                attributes.insert("id".to_string(), string(&d.id));
            }
            if let [numa] = d.numa_nodes[..] {
                attributes.insert(
                    "numaNode".to_string(),
                    DeviceAttribute {
                        int: Some(numa),
                        ..DeviceAttribute::default()
                    },
                );
            }
            let mut capacity = BTreeMap::new();
            if let Some(details) = snapshot.details(&d.id) {
                for (key, value) in &details.attributes {
                    attributes.insert(key.clone(), attribute(value));
                }
                for (key, value) in &details.capacities {
                    capacity.insert(
                        key.clone(),
                        DeviceCapacity {
                            value: Quantity(value.clone()),
                            ..DeviceCapacity::default()
                        },
                    );
                }
            }
            Some(SliceDevice {
                name,
                attributes,
                capacity,
            })
        })
        .collect()
}

/// A described attribute as the API publishes it.
fn attribute(value: &AttributeValue) -> DeviceAttribute {
    let mut attribute = DeviceAttribute::default();
    match value {
        AttributeValue::Text(text) => attribute.string = Some(text.clone()),
        AttributeValue::Int(n) => attribute.int = Some(*n),
        AttributeValue::Bool(b) => attribute.bool = Some(*b),
        AttributeValue::Version(v) => attribute.version = Some(v.clone()),
    }
    attribute
}

fn string(value: &str) -> DeviceAttribute {
    DeviceAttribute {
        string: Some(value.to_string()),
        ..DeviceAttribute::default()
    }
}

/// The name of slice `index` of `driver`'s pool on `node`:
/// `<node>-<driver>-<index>` when that is a DNS subdomain, else a hash of
/// both.
fn slice_name(node: &str, driver: &str, index: usize) -> String {
    let name = format!("{node}-{driver}-{index}");
    if crate::domain::is_dns_subdomain(&name) {
        return name;
    }
    let digest = Sha256::digest(format!("{node}\0{driver}").as_bytes());
    let hash: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("wdp-{hash}-{index}")
}

/// Keeps `driver`'s slices matching its snapshots until `shutdown`, then
/// deletes them, unless the whole host is stopping (`host_stopping`): then a
/// host taking over (a rolling update's new pod, already publishing the same
/// pool, or the next start) owns them, and kubelet deletes the slices of a
/// driver that does not come back. `status` follows where they stand.
pub async fn publish(
    driver: Arc<Driver>,
    mut snapshots: Snapshots,
    status: watch::Sender<SliceStatus>,
    shutdown: CancellationToken,
    host_stopping: CancellationToken,
) {
    let mut publisher = Publisher {
        driver: driver.clone(),
        owner: None,
        generation: None,
        published: None,
        count: 0,
    };
    let mut backoff = RETRY_FIRST;
    let mut failing = false;
    loop {
        let snapshot = snapshots.borrow_and_update().clone();
        let names = driver.names_of(&snapshot);
        let devices = slice_devices(&snapshot, &names);
        let due = match publisher.publish(devices).await {
            Ok(Some(generation)) => {
                if failing {
                    tracing::info!(driver = %driver.name, generation, "ResourceSlices published again");
                }
                failing = false;
                backoff = RETRY_FIRST;
                status.send_replace(SliceStatus::Published(generation));
                None
            }
            Ok(None) => None,
            Err(error) => {
                if failing {
                    tracing::debug!(driver = %driver.name, cause = %error, "ResourceSlices still not published");
                } else {
                    tracing::error!(driver = %driver.name, cause = %error, retry_in = ?backoff, "cannot publish ResourceSlices; retrying");
                }
                driver.metrics.slices_published("error");
                failing = true;
                status.send_if_modified(|s| match s {
                    SliceStatus::Pending(_) => {
                        *s = SliceStatus::Pending(error.clone());
                        true
                    }
                    SliceStatus::Published(_) => false,
                });
                let wait = backoff;
                backoff = (backoff * 2).min(RETRY_MAX);
                Some(wait)
            }
        };
        let retry = async {
            match due {
                Some(wait) => tokio::time::sleep(wait).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => break,
            changed = snapshots.changed() => if changed.is_err() { break },
            () = retry => {}
        }
    }
    if host_stopping.is_cancelled() {
        tracing::info!(driver = %driver.name, "host stopping: leaving the ResourceSlices to the host that takes over (kubelet deletes them if none does)");
        return;
    }
    // Bounded: withdrawing with the API server away must still finish (kubelet
    // deletes the slices of a driver that is gone anyway).
    if tokio::time::timeout(DELETE_TIMEOUT, publisher.delete_all())
        .await
        .is_err()
    {
        tracing::warn!(driver = %driver.name, "ResourceSlices not deleted in time; kubelet removes a gone driver's slices");
    }
}

struct Publisher {
    driver: Arc<Driver>,
    /// The Node's UID, once read.
    owner: Option<String>,
    /// The pool generation last published (or found at start).
    generation: Option<i64>,
    /// What was last published.
    published: Option<Vec<SliceDevice>>,
    /// How many slices the pool has now.
    count: usize,
}

impl Publisher {
    /// Publishes `devices` unless they are what was published; returns the
    /// new generation, `None` when nothing changed.
    async fn publish(&mut self, devices: Vec<SliceDevice>) -> Result<Option<i64>, String> {
        if self.published.as_ref() == Some(&devices) {
            return Ok(None);
        }
        let driver = &self.driver;
        let owner = match &self.owner {
            Some(uid) => uid.clone(),
            None => {
                let uid = driver.client.node_uid(&driver.node).await?;
                self.owner = Some(uid.clone());
                uid
            }
        };
        let existing = driver.client.slices(&driver.name, &driver.node).await?;
        let highest = existing
            .iter()
            .map(|s| s.spec.pool.generation)
            .max()
            .unwrap_or(0);
        let generation = self.generation.unwrap_or(0).max(highest) + 1;
        let chunks: Vec<&[SliceDevice]> = if devices.is_empty() {
            vec![&[]]
        } else {
            devices.chunks(MAX_DEVICES_PER_SLICE).collect()
        };
        let count = chunks.len();
        for (index, chunk) in chunks.iter().enumerate() {
            let slice = ResourceSlice {
                metadata: ObjectMeta {
                    name: Some(slice_name(&driver.node, &driver.name, index)),
                    owner_references: Some(vec![OwnerReference {
                        api_version: "v1".into(),
                        kind: "Node".into(),
                        name: driver.node.clone(),
                        uid: owner.clone(),
                        controller: Some(true),
                        block_owner_deletion: None,
                    }]),
                    labels: Some(
                        [(
                            "app.kubernetes.io/managed-by".to_string(),
                            "wasm-device-plugin".to_string(),
                        )]
                        .into(),
                    ),
                    ..ObjectMeta::default()
                },
                spec: ResourceSliceSpec {
                    driver: driver.name.clone(),
                    node_name: Some(driver.node.clone()),
                    pool: ResourcePool {
                        name: driver.node.clone(),
                        generation,
                        resource_slice_count: i64::try_from(count).unwrap_or(i64::MAX),
                    },
                    devices: Some(
                        chunk
                            .iter()
                            .map(|d| Device {
                                name: d.name.clone(),
                                attributes: (!d.attributes.is_empty())
                                    .then(|| d.attributes.clone()),
                                capacity: (!d.capacity.is_empty()).then(|| d.capacity.clone()),
                                ..Device::default()
                            })
                            .collect(),
                    ),
                    ..ResourceSliceSpec::default()
                },
            };
            driver.client.apply_slice(&slice).await?;
        }
        // Slices beyond the new count (the pool shrank, or an earlier run
        // named them otherwise) go.
        let keep: Vec<String> = (0..count)
            .map(|i| slice_name(&driver.node, &driver.name, i))
            .collect();
        for slice in existing {
            let name = slice.metadata.name.unwrap_or_default();
            if !keep.contains(&name) {
                driver.client.delete_slice(&name).await?;
            }
        }
        tracing::info!(driver = %driver.name, node = %driver.node, generation, devices = devices.len(), slices = count, "ResourceSlices published");
        driver.metrics.slices_published("ok");
        self.generation = Some(generation);
        self.published = Some(devices);
        self.count = count;
        Ok(Some(generation))
    }

    /// Deletes every slice of the pool (those this run published, and any
    /// other of the driver on the node).
    async fn delete_all(&self) {
        let driver = &self.driver;
        let mut names: Vec<String> = (0..self.count)
            .map(|i| slice_name(&driver.node, &driver.name, i))
            .collect();
        if let Ok(existing) = driver.client.slices(&driver.name, &driver.node).await {
            for slice in existing {
                let name = slice.metadata.name.unwrap_or_default();
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        for name in names {
            match driver.client.delete_slice(&name).await {
                Ok(()) => {
                    tracing::info!(driver = %driver.name, slice = %name, "ResourceSlice deleted")
                }
                Err(error) => {
                    tracing::warn!(driver = %driver.name, slice = %name, cause = %error, "cannot delete ResourceSlice (kubelet removes a gone driver's slices too)")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_names_are_dns_subdomains_even_for_long_parts() {
        assert_eq!(
            slice_name("node-1", "dev-1.example.com", 0),
            "node-1-dev-1.example.com-0"
        );
        let long = slice_name(
            &"n".repeat(60),
            &format!("{}.example.com", "d".repeat(50)),
            3,
        );
        assert!(crate::domain::is_dns_subdomain(&long), "{long}");
        assert!(long.starts_with("wdp-") && long.ends_with("-3"), "{long}");
    }
}
