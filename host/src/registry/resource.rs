//! One served resource of a module: its real devices with their health after
//! hysteresis, and the snapshots it publishes to the frontend serving it.
//!
//! Every accepted change (a scan, a health change, a manifest edit, a new module
//! version) builds one new [`ResourceSnapshot`] and swaps it whole into the
//! resource's `watch` channel; nothing else about the resource is read by a
//! request. A snapshot that changes nothing (same list, same allocations, same
//! module version, same replicas) is not published at all, and one that keeps
//! the advertised list shares it with the previous snapshot, so that kubelet is
//! sent a list only when the list changed.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::domain::{Device, DeviceSet, Health, HealthTracker, ResourceName};
use crate::frontend::{Backend, Frontend, ServeRequest, Served};
use crate::metrics::ResourceMetrics;
use crate::policy::ScannedResource;
use crate::registry::Claim;
use crate::registry::manifest::ResourcePolicy;
use crate::snapshot::{DeviceAllocations, ResourceSnapshot, SnapshotParts};

/// A resource being served.
pub(super) struct Resource {
    name: ResourceName,
    kind: String,
    policy: ResourcePolicy,
    /// The module's devices, health after hysteresis.
    real: Arc<DeviceSet>,
    tracker: HealthTracker,
    allocations: Arc<DeviceAllocations>,
    backend: Arc<dyn Backend>,
    /// The replicas the policy asked for when the current snapshot was built
    /// (the snapshot may advertise fewer, see [`build_snapshot`]).
    published_replicas: u32,
    snapshots: watch::Sender<Arc<ResourceSnapshot>>,
    token: CancellationToken,
    served: Served,
    metrics: ResourceMetrics,
    /// Dropped last, when `stop` returns: the name is free only once the
    /// frontend has stopped serving it.
    _claim: Claim,
}

/// Sets the advertised device counts of a resource, by health.
fn set_device_counts(metrics: &ResourceMetrics, advertised: &DeviceSet) {
    let healthy = advertised
        .devices()
        .iter()
        .filter(|d| d.health == Health::Healthy)
        .count();
    metrics.set_devices(healthy, advertised.len() - healthy);
}

/// The snapshot of `parts`, advertising each device `parts.replicas` times, or
/// once when sharing would exceed the per-resource device limit (logged).
pub fn build_snapshot(parts: SnapshotParts) -> ResourceSnapshot {
    let fallback = SnapshotParts {
        replicas: 1,
        name: parts.name.clone(),
        kind: parts.kind.clone(),
        real: parts.real.clone(),
        allocations: parts.allocations.clone(),
        backend: parts.backend.clone(),
        generation: parts.generation,
    };
    let replicas = parts.replicas;
    match ResourceSnapshot::new(parts) {
        Ok(snapshot) => snapshot,
        Err(err) => {
            tracing::error!(resource = %fallback.name, replicas, cause = %err, "cannot advertise replicas; advertising each device once");
            // With one replica the list is the real set, which is valid.
            match ResourceSnapshot::new(fallback) {
                Ok(snapshot) => snapshot,
                Err(_) => unreachable!("a snapshot without replicas advertises a valid set"),
            }
        }
    }
}

impl Resource {
    /// Starts serving `found` through `frontend` with `backend`.
    pub(super) fn start(
        frontend: &dyn Frontend,
        found: ScannedResource,
        policy: ResourcePolicy,
        backend: Arc<dyn Backend>,
        metrics: ResourceMetrics,
        token: CancellationToken,
        claim: Claim,
    ) -> Self {
        let policy_replicas = policy.replicas;
        let real = Arc::new(found.devices);
        let allocations = Arc::new(found.allocations);
        let snapshot = build_snapshot(SnapshotParts {
            name: found.name.clone(),
            kind: found.kind.clone(),
            generation: 1,
            replicas: policy.replicas,
            real: real.clone(),
            allocations: allocations.clone(),
            backend: backend.clone(),
        });
        set_device_counts(&metrics, snapshot.advertised());
        let (snapshots, rx) = watch::channel(Arc::new(snapshot));
        let served = frontend.serve(ServeRequest {
            snapshots: rx,
            metrics: metrics.clone(),
            shutdown: token.clone(),
        });
        Self {
            name: found.name,
            kind: found.kind,
            policy,
            real,
            tracker: HealthTracker::default(),
            allocations,
            backend,
            published_replicas: policy_replicas,
            snapshots,
            token,
            served,
            metrics,
            _claim: claim,
        }
    }

    /// The module's kind name.
    pub(super) fn kind(&self) -> &str {
        &self.kind
    }

    /// The real devices.
    pub(super) fn real(&self) -> &DeviceSet {
        &self.real
    }

    /// Publishes a snapshot of the current state, if anything in it changed.
    fn publish(&mut self) {
        let asked = self.policy.replicas;
        let replicas_unchanged = self.published_replicas == asked;
        self.published_replicas = asked;
        self.snapshots.send_if_modified(|current| {
            let unchanged = replicas_unchanged
                && Arc::ptr_eq(current.real_arc(), &self.real)
                && Arc::ptr_eq(current.allocations(), &self.allocations)
                && Arc::ptr_eq(current.backend(), &self.backend);
            if unchanged {
                return false;
            }
            let next = build_snapshot(SnapshotParts {
                name: self.name.clone(),
                kind: self.kind.clone(),
                generation: current.generation() + 1,
                replicas: self.policy.replicas,
                real: self.real.clone(),
                allocations: self.allocations.clone(),
                backend: self.backend.clone(),
            })
            .sharing_list_with(current);
            if !next.same_list(current) {
                set_device_counts(&self.metrics, next.advertised());
            }
            *current = Arc::new(next);
            true
        });
    }

    /// Takes a scan's devices, allocations and policy, and the backend of the
    /// module version that scanned: the ids and NUMA nodes as scanned; for
    /// devices already known, the scanned health counts as one more health
    /// answer. Publishes the result as one snapshot.
    pub(super) fn update(
        &mut self,
        scanned: ScannedResource,
        policy: ResourcePolicy,
        backend: &Arc<dyn Backend>,
    ) {
        let merged: Vec<Device> = scanned
            .devices
            .devices()
            .iter()
            .map(|d| match self.real.get(&d.id) {
                Some(old) => Device {
                    health: self.tracker.observe(
                        &d.id,
                        old.health,
                        d.health,
                        policy.unhealthy_after,
                        policy.healthy_after,
                    ),
                    ..d.clone()
                },
                None => d.clone(),
            })
            .collect();
        // Same ids as a valid set, so this cannot fail; keep the scan if it did.
        let real = DeviceSet::new(merged).unwrap_or(scanned.devices);
        if real != *self.real {
            self.real = Arc::new(real);
        }
        self.tracker.retain(&self.real);
        if *self.allocations != scanned.allocations {
            self.allocations = Arc::new(scanned.allocations);
        }
        self.policy = policy;
        self.backend = backend.clone();
        self.publish();
    }

    /// Feeds one health answer per real device, in order, through the
    /// hysteresis (stopping early if `answers` runs out); publishes a snapshot
    /// if any device's health changed.
    pub(super) fn observe_health(&mut self, answers: &mut impl Iterator<Item = Health>) {
        let real = self.real.clone();
        let mut changed: HashMap<&str, Health> = HashMap::new();
        for device in real.devices() {
            let Some(answer) = answers.next() else { break };
            let health = self.tracker.observe(
                &device.id,
                device.health,
                answer,
                self.policy.unhealthy_after,
                self.policy.healthy_after,
            );
            if health != device.health {
                tracing::info!(resource = %self.name, device = %device.id, health = health.as_str(), "device health changed");
                changed.insert(&device.id, health);
            }
        }
        if let Some(updated) = real.with_health(&changed) {
            self.real = Arc::new(updated);
            self.publish();
        }
    }

    /// Stops serving: the frontend ends its streams and removes its endpoint.
    pub(super) async fn stop(self) {
        self.token.cancel();
        // Dropping the sender ends the streams; the task ends when the frontend
        // has stopped serving and removed its endpoint.
        drop(self.snapshots);
        let _ = self.served.task.await;
        self.metrics.forget_devices();
    }
}
