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
//!
//! A resource served with CDI (`cdi` in its manifest) writes its spec before
//! each snapshot that needs a new one goes out, so that every CDI name an
//! Allocate answers with resolves in the spec on disk: at start (a spec that
//! cannot be written refuses the resource), on each scan that changes a
//! device's edits (a spec that cannot be written keeps the last good state,
//! as a failed scan does), and it is removed when the resource is withdrawn
//! (not when the host stops: containers that restart meanwhile still resolve
//! their names, and the next start sweeps what is no longer served).

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cdi::{self, CdiDir, CdiError, CdiNames};
use crate::domain::{Device, DeviceSet, Health, HealthTracker, ResourceName};
use crate::frontend::{Backend, Frontend, ServeAs, ServeRequest, Served};
use crate::metrics::ResourceMetrics;
use crate::policy::ScannedResource;
use crate::registry::Claim;
use crate::registry::manifest::ResourcePolicy;
use crate::snapshot::{Described, DeviceAllocations, ResourceSnapshot, SnapshotParts};

/// A resource being served.
pub(super) struct Resource {
    name: ResourceName,
    kind: String,
    /// The API serving it; a manifest that changes it serves the resource afresh.
    serve_as: ServeAs,
    policy: ResourcePolicy,
    /// The module's devices, health after hysteresis.
    real: Arc<DeviceSet>,
    tracker: HealthTracker,
    allocations: Arc<DeviceAllocations>,
    /// What the module's `describe` said of the devices (DRA).
    details: Arc<Described>,
    /// With CDI on: the names in the spec written for `real` and `allocations`.
    cdi: Option<Arc<CdiNames>>,
    cdi_dir: Arc<CdiDir>,
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

/// Why a resource could not be served.
#[derive(Debug, thiserror::Error)]
pub(super) enum StartError {
    /// Its CDI spec cannot be built or written.
    #[error(transparent)]
    Cdi(#[from] CdiError),
    /// The frontend refused it; why.
    #[error("{0}")]
    Frontend(String),
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
        cdi: parts.cdi.clone(),
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

/// The spec `policy` asks for of `real` with `allocations`, built and written
/// to `dir` (or, with CDI off, the spec of `name` removed if `had_spec`);
/// returns the names to publish, `current` itself when they did not change.
///
/// # Errors
/// [`CdiError`]: the spec cannot be built or written; nothing changed.
pub fn write_spec(
    dir: &CdiDir,
    name: &ResourceName,
    policy: &ResourcePolicy,
    real: &DeviceSet,
    allocations: &DeviceAllocations,
    current: Option<&Arc<CdiNames>>,
) -> Result<Option<Arc<CdiNames>>, CdiError> {
    if !policy.resource_spec() {
        if current.is_some() {
            dir.remove(name)?;
        }
        return Ok(None);
    }
    let built = spec_of(name, real, allocations)?;
    dir.write(name, built.spec.as_ref())?;
    Ok(Some(match current {
        Some(names) if **names == built.names => names.clone(),
        _ => Arc::new(built.names),
    }))
}

/// The CDI spec of resource `name` with devices `real` whose allocations are
/// `allocations`: each device's nodes and mounts ([`cdi::device_plugin_edits`]).
///
/// # Errors
/// As [`cdi::build`].
pub fn spec_of(
    name: &ResourceName,
    real: &DeviceSet,
    allocations: &DeviceAllocations,
) -> Result<cdi::ResourceSpec, CdiError> {
    let edits: Vec<_> = real
        .devices()
        .iter()
        .filter_map(|d| {
            allocations
                .get(&d.id)
                .map(|a| (d.id.as_str(), cdi::device_plugin_edits(a)))
        })
        .collect();
    cdi::build(name, edits.iter().map(|(id, a)| (*id, a)))
}

impl Resource {
    /// Starts serving `found` through `frontend` (the one of `serve_as`) with
    /// `backend`, once its CDI spec is written to `cdi_dir` when `policy` asks
    /// for one.
    ///
    /// # Errors
    /// [`StartError`]: the spec cannot be built or written, or the frontend
    /// refused the resource; nothing is served.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start(
        frontend: &dyn Frontend,
        serve_as: ServeAs,
        found: ScannedResource,
        policy: ResourcePolicy,
        backend: Arc<dyn Backend>,
        cdi_dir: &Arc<CdiDir>,
        metrics: ResourceMetrics,
        token: CancellationToken,
        claim: Claim,
    ) -> Result<Self, StartError> {
        let policy_replicas = policy.replicas;
        let real = Arc::new(found.devices);
        let allocations = Arc::new(found.allocations);
        let details = Arc::new(found.details);
        let cdi = write_spec(cdi_dir, &found.name, &policy, &real, &allocations, None)?;
        let snapshot = build_snapshot(SnapshotParts {
            name: found.name.clone(),
            kind: found.kind.clone(),
            generation: 1,
            replicas: policy.replicas,
            real: real.clone(),
            allocations: allocations.clone(),
            cdi: cdi.clone(),
            backend: backend.clone(),
        })
        .with_details(details.clone());
        set_device_counts(&metrics, snapshot.advertised());
        let (snapshots, rx) = watch::channel(Arc::new(snapshot));
        let served = frontend
            .serve(ServeRequest {
                serve_as: serve_as.clone(),
                snapshots: rx,
                metrics: metrics.clone(),
                shutdown: token.clone(),
            })
            .map_err(|reason| {
                if cdi.is_some() {
                    let _ = cdi_dir.remove(&found.name);
                }
                metrics.forget_devices();
                StartError::Frontend(reason)
            })?;
        Ok(Self {
            name: found.name,
            kind: found.kind,
            serve_as,
            policy,
            real,
            tracker: HealthTracker::default(),
            allocations,
            details,
            cdi,
            cdi_dir: cdi_dir.clone(),
            backend,
            published_replicas: policy_replicas,
            snapshots,
            token,
            served,
            metrics,
            _claim: claim,
        })
    }

    /// The module's kind name.
    pub(super) fn kind(&self) -> &str {
        &self.kind
    }

    /// The API serving it.
    pub(super) fn serve_as(&self) -> &ServeAs {
        &self.serve_as
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
                && Arc::ptr_eq(current.details_arc(), &self.details)
                && match (current.cdi(), &self.cdi) {
                    (None, None) => true,
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    _ => false,
                }
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
                cdi: self.cdi.clone(),
                backend: self.backend.clone(),
            })
            .with_details(self.details.clone())
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
    /// answer. With CDI, writes the spec of the result first. Publishes the
    /// result as one snapshot.
    ///
    /// # Errors
    /// [`CdiError`]: the spec cannot be written; the resource keeps its last
    /// good state (and its spec on disk still matches it).
    pub(super) fn update(
        &mut self,
        scanned: ScannedResource,
        policy: ResourcePolicy,
        backend: &Arc<dyn Backend>,
    ) -> Result<(), CdiError> {
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
        let real = if real == *self.real {
            self.real.clone()
        } else {
            Arc::new(real)
        };
        let allocations = if *self.allocations == scanned.allocations {
            self.allocations.clone()
        } else {
            Arc::new(scanned.allocations)
        };
        // Health alone never changes a spec: rewritten only when what it is
        // built from changed (a write of the same bytes is skipped anyway).
        let spec_inputs_changed = !Arc::ptr_eq(&real, &self.real)
            || !Arc::ptr_eq(&allocations, &self.allocations)
            || policy.resource_spec() != self.cdi.is_some();
        if spec_inputs_changed {
            self.cdi = write_spec(
                &self.cdi_dir,
                &self.name,
                &policy,
                &real,
                &allocations,
                self.cdi.as_ref(),
            )?;
        }
        self.real = real;
        self.tracker.retain(&self.real);
        self.allocations = allocations;
        if *self.details != scanned.details {
            self.details = Arc::new(scanned.details);
        }
        self.policy = policy;
        self.backend = backend.clone();
        self.publish();
        Ok(())
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
    /// Then, with `withdrawn` (the resource or its module is gone, not the
    /// host stopping), its CDI spec is removed: only once nothing can answer
    /// with its names any more.
    pub(super) async fn stop(self, withdrawn: bool) {
        self.token.cancel();
        // Dropping the sender ends the streams; the task ends when the frontend
        // has stopped serving and removed its endpoint.
        drop(self.snapshots);
        let _ = self.served.task.await;
        self.metrics.forget_devices();
        if withdrawn && self.cdi.is_some() {
            match self.cdi_dir.remove(&self.name) {
                Ok(()) => tracing::info!(resource = %self.name, "CDI spec removed"),
                Err(err) => {
                    tracing::warn!(resource = %self.name, cause = %err, "cannot remove the CDI spec")
                }
            }
        }
    }
}
