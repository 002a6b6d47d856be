//! [`ResourceSnapshot`]: everything a request needs about one resource, as of one
//! accepted change, in one immutable value.
//!
//! The registry builds a new snapshot for every change it accepts (a scan, a
//! health change, a manifest edit, a new module version) and swaps it whole in
//! the resource's `watch` channel; a frontend reads the current one once per
//! request and answers from it alone. Several locks or atomics that must agree
//! would be a race with every rescan: an Allocate could pass its check against
//! one list and find no allocation in the next, and answer OK with less than
//! kubelet asked for. Here an id the snapshot knows has its device and its
//! allocation by construction.
//!
//! A resource served with CDI also carries, per real device, its CDI name in
//! the spec the registry wrote before publishing the snapshot
//! ([`ResourceSnapshot::cdi`]); [`ResourceSnapshot::allocate`] names those
//! devices in each answer instead of repeating what the spec injects.
//!
//! Advertised ids map to real devices by position, not by string surgery: with
//! `replicas` r, advertised device `i` is replica `i % r` of real device `i / r`
//! (see [`DeviceSet::replicated`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use crate::cdi::{self, CdiNames};
use crate::domain::{
    ContainerAllocation, Device, DeviceDetails, DeviceSet, DeviceSetError, Health, ResourceName,
};
use crate::frontend::{AllocateError, Backend, Claim};
use crate::grants::Grants;

/// Per real device id, what a container given the device needs, as the last
/// accepted scan reported it and the output policy accepted it (host paths
/// resolved), with the grants it was checked against. Devices whose report was
/// empty have no entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceAllocations {
    by_device: HashMap<String, ContainerAllocation>,
    checked_with: Grants,
}

impl DeviceAllocations {
    /// No allocations yet, to be checked against `grants`.
    pub fn new(checked_with: Grants) -> Self {
        Self {
            by_device: HashMap::new(),
            checked_with,
        }
    }

    /// Records what device `id` needs, checked against [`Self::checked_with`].
    pub fn insert(&mut self, id: String, allocation: ContainerAllocation) {
        self.by_device.insert(id, allocation);
    }

    /// What device `id` needs (`None` when its scan reported nothing).
    pub fn get(&self, id: &str) -> Option<&ContainerAllocation> {
        self.by_device.get(id)
    }

    /// Every device with an allocation, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &ContainerAllocation)> {
        self.by_device.iter().map(|(id, a)| (id.as_str(), a))
    }

    /// The grants every allocation here was checked against: while a module
    /// runs with these, the allocations need no second check.
    pub fn checked_with(&self) -> &Grants {
        &self.checked_with
    }
}

/// One resource as of one accepted change. Cheap to clone and to rebuild: the
/// device lists and allocations are shared with the snapshots they did not
/// change from.
#[derive(Clone)]
pub struct ResourceSnapshot {
    name: ResourceName,
    kind: String,
    generation: u64,
    replicas: u32,
    real: Arc<DeviceSet>,
    advertised: Arc<DeviceSet>,
    allocations: Arc<DeviceAllocations>,
    cdi: Option<Arc<CdiNames>>,
    backend: Arc<dyn Backend>,
    details: Arc<Described>,
}

/// What the module's `describe` said of each real device, by id (DRA's
/// attributes and capacities); empty when it does not export `describe`.
pub type Described = BTreeMap<String, DeviceDetails>;

impl std::fmt::Debug for ResourceSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResourceSnapshot")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("generation", &self.generation)
            .field("replicas", &self.replicas)
            .field("devices", &self.real.len())
            .field("advertised", &self.advertised.len())
            .field("cdi", &self.cdi.as_ref().map(|names| names.len()))
            .finish_non_exhaustive()
    }
}

/// What a snapshot is built from.
pub struct SnapshotParts {
    /// The resource name kubelet sees.
    pub name: ResourceName,
    /// The module's kind name (passed back to the module).
    pub kind: String,
    /// Counts the snapshots of one resource, from 1; a frontend may publish it
    /// (a ResourceSlice's pool generation).
    pub generation: u64,
    /// How many times each real device is advertised (at least 1).
    pub replicas: u32,
    /// The real devices, with their health.
    pub real: Arc<DeviceSet>,
    /// What each real device needs (see [`DeviceAllocations`]).
    pub allocations: Arc<DeviceAllocations>,
    /// With CDI: per real device in the resource's written spec, its CDI name.
    pub cdi: Option<Arc<CdiNames>>,
    /// What allocates these devices.
    pub backend: Arc<dyn Backend>,
}

/// Why a request cannot be served from a snapshot. Each names the first
/// offending container request (by position) or id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The request names no containers.
    #[error("Allocate names no containers")]
    NoContainers,
    /// A container request names no devices.
    #[error("container request {container} names no devices")]
    NoDevices {
        /// Its position in the request.
        container: usize,
    },
    /// An id the resource does not advertise (any more).
    #[error("unknown device id `{id}` (container request {container})")]
    UnknownDevice {
        /// The id.
        id: String,
        /// The container request naming it.
        container: usize,
    },
    /// A device that is unhealthy now.
    #[error("device `{id}` is unhealthy (container request {container})")]
    Unhealthy {
        /// The id.
        id: String,
        /// The container request naming it.
        container: usize,
    },
    /// An id named twice in one request.
    #[error("device id `{id}` is requested more than once")]
    Duplicate {
        /// The id.
        id: String,
    },
}

/// A request checked against one snapshot: per container, in order, the
/// positions of its real devices in [`ResourceSnapshot::real`], each once, in
/// the order first requested (two replicas of one device in a container are that
/// device, once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationPlan {
    containers: Vec<Vec<usize>>,
}

impl AllocationPlan {
    /// Per container, the positions of its real devices.
    pub fn containers(&self) -> &[Vec<usize>] {
        &self.containers
    }
}

impl ResourceSnapshot {
    /// Builds a snapshot, advertising each real device `replicas` times.
    ///
    /// # Errors
    /// [`DeviceSetError::TooMany`] when the replicas would advertise more
    /// devices than one resource may.
    pub fn new(parts: SnapshotParts) -> Result<Self, DeviceSetError> {
        let replicas = parts.replicas.max(1);
        let advertised = if replicas == 1 {
            parts.real.clone()
        } else {
            Arc::new(parts.real.replicated(replicas)?)
        };
        Ok(Self {
            name: parts.name,
            kind: parts.kind,
            generation: parts.generation,
            replicas,
            real: parts.real,
            advertised,
            allocations: parts.allocations,
            cdi: parts.cdi,
            backend: parts.backend,
            details: Arc::default(),
        })
    }

    /// This snapshot with `details` as what the module described of its
    /// devices.
    #[must_use]
    pub fn with_details(mut self, details: Arc<Described>) -> Self {
        self.details = details;
        self
    }

    /// What the module described of the real device `id` (`None`: nothing).
    pub fn details(&self, id: &str) -> Option<&DeviceDetails> {
        self.details.get(id)
    }

    /// Every real device's description, shared.
    pub fn details_arc(&self) -> &Arc<Described> {
        &self.details
    }

    /// Keeps `previous`'s advertised list when this one advertises the same, so
    /// that [`ResourceSnapshot::same_list`] tells a frontend cheaply that only
    /// something else changed (an allocation, the module version).
    #[must_use]
    pub fn sharing_list_with(mut self, previous: &ResourceSnapshot) -> Self {
        if !Arc::ptr_eq(&self.advertised, &previous.advertised)
            && *self.advertised == *previous.advertised
        {
            self.advertised = previous.advertised.clone();
        }
        self
    }

    /// Whether `other` advertises the very same list (see
    /// [`ResourceSnapshot::sharing_list_with`]).
    pub fn same_list(&self, other: &ResourceSnapshot) -> bool {
        Arc::ptr_eq(&self.advertised, &other.advertised)
    }

    /// The resource name kubelet sees.
    pub fn name(&self) -> &ResourceName {
        &self.name
    }

    /// The module's kind name.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// Which snapshot of the resource this is, counting from 1.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// How many times each real device is advertised.
    pub fn replicas(&self) -> u32 {
        self.replicas
    }

    /// The advertised devices (each real device `replicas` times), in order.
    pub fn advertised(&self) -> &DeviceSet {
        &self.advertised
    }

    /// The advertised devices, shared: the same `Arc` as the previous
    /// snapshot's when the list did not change.
    pub fn advertised_arc(&self) -> &Arc<DeviceSet> {
        &self.advertised
    }

    /// The real devices, in order.
    pub fn real(&self) -> &DeviceSet {
        &self.real
    }

    /// The real devices, shared.
    pub fn real_arc(&self) -> &Arc<DeviceSet> {
        &self.real
    }

    /// The real device behind an advertised id.
    pub fn device_of(&self, advertised: &str) -> Option<&Device> {
        let at = self.advertised.position(advertised)?;
        self.real.devices().get(at / self.replicas as usize)
    }

    /// What the real device `id` needs, as its scan reported it (`None` when it
    /// reported nothing).
    pub fn allocation(&self, id: &str) -> Option<&ContainerAllocation> {
        self.allocations.get(id)
    }

    /// Every real device's reported allocation.
    pub fn allocations(&self) -> &Arc<DeviceAllocations> {
        &self.allocations
    }

    /// What allocates these devices.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// With CDI, per real device in the resource's spec, its CDI name; `None`
    /// for a resource served without CDI.
    pub fn cdi(&self) -> Option<&Arc<CdiNames>> {
        self.cdi.as_ref()
    }

    /// Prepares `claim` (one container of `plan` per request, checked against
    /// this snapshot) through its backend ([`Backend::prepare`]).
    ///
    /// # Errors
    /// The backend's [`AllocateError`].
    pub async fn prepare(
        &self,
        plan: &AllocationPlan,
        claim: &Claim,
    ) -> Result<Vec<ContainerAllocation>, AllocateError> {
        self.backend.prepare(self, plan, claim).await
    }

    /// Allocates `plan` (checked against this snapshot) through its backend,
    /// and, for a resource served with CDI, names each container's CDI devices
    /// in its answer instead of the device nodes and mounts their spec injects
    /// ([`cdi::substitute`]). No file is read: the names were fixed when the
    /// spec was written.
    ///
    /// # Errors
    /// The backend's [`AllocateError`].
    pub async fn allocate(
        &self,
        plan: &AllocationPlan,
    ) -> Result<Vec<ContainerAllocation>, AllocateError> {
        let mut answers = self.backend.allocate(self, plan).await?;
        if let Some(names) = &self.cdi {
            let devices = self.real.devices();
            for (answer, real) in answers.iter_mut().zip(plan.containers()) {
                let injected = real.iter().map(|&at| {
                    let id = devices[at].id.as_str();
                    (id, self.allocations.get(id))
                });
                cdi::substitute(answer, injected, names);
            }
        }
        Ok(answers)
    }

    /// Checks a request of advertised ids, one list per container: at least one
    /// container, each naming at least one device, every id advertised and
    /// healthy and named once in the whole request. Returns the plan of real
    /// devices.
    ///
    /// # Errors
    /// [`RequestError`] for the first rule broken.
    pub fn plan<S: AsRef<str>>(
        &self,
        containers: &[Vec<S>],
    ) -> Result<AllocationPlan, RequestError> {
        if containers.is_empty() {
            return Err(RequestError::NoContainers);
        }
        let replicas = self.replicas as usize;
        let mut seen: HashSet<&str> = HashSet::new();
        let mut plan = Vec::with_capacity(containers.len());
        for (container, ids) in containers.iter().enumerate() {
            if ids.is_empty() {
                return Err(RequestError::NoDevices { container });
            }
            let mut real: Vec<usize> = Vec::with_capacity(ids.len());
            for id in ids {
                let id = id.as_ref();
                let Some(at) = self.advertised.position(id) else {
                    return Err(RequestError::UnknownDevice {
                        id: id.to_string(),
                        container,
                    });
                };
                if self.advertised.devices()[at].health == Health::Unhealthy {
                    return Err(RequestError::Unhealthy {
                        id: id.to_string(),
                        container,
                    });
                }
                if !seen.insert(id) {
                    return Err(RequestError::Duplicate { id: id.to_string() });
                }
                let device = at / replicas;
                if !real.contains(&device) {
                    real.push(device);
                }
            }
            plan.push(real);
        }
        Ok(AllocationPlan { containers: plan })
    }
}

/// What unit tests of the seam's users need: a backend that gives every
/// container nothing.
#[cfg(test)]
pub(crate) mod testing {
    use super::{AllocationPlan, Backend, ResourceSnapshot};
    use crate::domain::ContainerAllocation;
    use crate::frontend::AllocateFuture;

    /// Allocates nothing to every container.
    pub(crate) struct Nothing;

    impl Backend for Nothing {
        fn allocate<'a>(
            &'a self,
            _: &'a ResourceSnapshot,
            plan: &'a AllocationPlan,
        ) -> AllocateFuture<'a> {
            let n = plan.containers().len();
            Box::pin(async move { Ok(vec![ContainerAllocation::default(); n]) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Nothing;
    use super::*;

    fn device(id: &str, health: Health) -> Device {
        Device {
            id: id.into(),
            health,
            numa_nodes: vec![],
        }
    }

    fn snapshot(replicas: u32) -> ResourceSnapshot {
        let real = DeviceSet::new(vec![
            device("a", Health::Healthy),
            device("b::x", Health::Healthy),
            device("c", Health::Unhealthy),
        ])
        .expect("valid");
        let mut allocations = DeviceAllocations::default();
        allocations.insert(
            "a".into(),
            ContainerAllocation {
                envs: [("A".to_string(), "1".to_string())].into(),
                ..ContainerAllocation::default()
            },
        );
        ResourceSnapshot::new(SnapshotParts {
            name: ResourceName::parse("example.com/dev").expect("valid"),
            kind: "dev".into(),
            generation: 1,
            replicas,
            real: Arc::new(real),
            allocations: Arc::new(allocations),
            cdi: None,
            backend: Arc::new(Nothing),
        })
        .expect("snapshot")
    }

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn replicas_map_to_their_real_device_by_position() {
        let s = snapshot(3);
        assert_eq!(s.advertised().len(), 9);
        // An id that itself holds the replica separator is still its own device.
        assert_eq!(s.device_of("b::x::2").map(|d| d.id.as_str()), Some("b::x"));
        assert_eq!(s.device_of("a::0").map(|d| d.id.as_str()), Some("a"));
        assert_eq!(s.device_of("a"), None);
        let one = snapshot(1);
        assert_eq!(one.device_of("b::x").map(|d| d.id.as_str()), Some("b::x"));
    }

    #[test]
    fn plan_merges_replicas_of_one_device_in_a_container() {
        let s = snapshot(2);
        let plan = s
            .plan(&[ids(&["a::1", "b::x::0", "a::0"]), ids(&["b::x::1"])])
            .expect("valid request");
        assert_eq!(plan.containers(), [vec![0, 1], vec![1]]);
        assert_eq!(s.allocation("a").map(|a| a.envs.len()), Some(1));
        assert_eq!(s.allocation("b::x"), None);
    }

    #[test]
    fn plan_refuses_what_kubelet_must_not_be_given() {
        let s = snapshot(1);
        let none: Vec<Vec<String>> = vec![];
        assert_eq!(s.plan(&none), Err(RequestError::NoContainers));
        assert_eq!(
            s.plan(&[ids(&["a"]), ids(&[])]),
            Err(RequestError::NoDevices { container: 1 })
        );
        assert_eq!(
            s.plan(&[ids(&["zz"])]),
            Err(RequestError::UnknownDevice {
                id: "zz".into(),
                container: 0
            })
        );
        assert_eq!(
            s.plan(&[ids(&["c"])]),
            Err(RequestError::Unhealthy {
                id: "c".into(),
                container: 0
            })
        );
        assert_eq!(
            s.plan(&[ids(&["a"]), ids(&["a"])]),
            Err(RequestError::Duplicate { id: "a".into() })
        );
    }

    #[test]
    fn an_unchanged_list_is_shared_with_the_previous_snapshot() {
        let first = snapshot(2);
        let again = snapshot(2).sharing_list_with(&first);
        assert!(again.same_list(&first));
        let other = snapshot(1).sharing_list_with(&first);
        assert!(!other.same_list(&first));
    }
}
