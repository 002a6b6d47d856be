//! One module's life: load → first scan → serve each resource → (health checks,
//! re-scans, configuration changes)* → stop.
//!
//! ```text
//!   Loading ──compile + first scan ok──▶ Serving ──token cancelled──▶ Stopped
//!      │                                  │  ▲
//!      └──bad file / scan failed──▶ Failed │  └─ health tick: update health
//!                                         └──── scan tick / new config: re-scan;
//!                                               resources appear (serve + register)
//!                                               or disappear (server stopped, socket removed)
//! ```
//!
//! Each resource keeps its device list in a `watch` channel that its
//! ListAndWatch streams follow; only real changes are published. A failed health
//! check or re-scan keeps the last good state and is logged: one bad answer never
//! withdraws devices that pods may be using.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior, interval_at};
use tokio_util::sync::CancellationToken;

use crate::domain::{ContainerAllocation, DeviceSet, Health, ResourceName};
use crate::kubelet::server::{AllocateError, DeviceBackend};
use crate::kubelet::{self, ServedResource};
use crate::policy::{self, ScannedResource};
use crate::registry::{Claim, Claims, ModuleSpec, ModuleState, ModuleStates, Settings};
use crate::runtime::bindings::{AllocateRequest, ContainerRequest, DeviceRef, ModuleError};
use crate::runtime::{CallError, CallFailure, Guest, ModuleConfig, Runtime};

/// Messages to a running module.
#[derive(Debug)]
pub enum Control {
    /// Use this configuration from later calls on; re-scan at once if `rescan`,
    /// otherwise the next health check or scheduled scan sees it.
    SetConfig {
        /// The new configuration.
        config: ModuleConfig,
        /// Re-scan now.
        rescan: bool,
        /// Told once the configuration is in use (and the re-scan done).
        applied: oneshot::Sender<()>,
    },
}

/// Allocates through a module for one of its resources.
pub struct GuestBackend {
    guest: Arc<Guest>,
    kind: String,
}

impl DeviceBackend for GuestBackend {
    async fn allocate(
        &self,
        containers: Vec<Vec<String>>,
    ) -> Result<Vec<ContainerAllocation>, AllocateError> {
        let count = containers.len();
        let request = AllocateRequest {
            kind: self.kind.clone(),
            containers: containers
                .into_iter()
                .map(|device_ids| ContainerRequest { device_ids })
                .collect(),
        };
        let responses = self
            .guest
            .allocate(&request)
            .await
            .map_err(allocate_error)?;
        policy::allocation(self.guest.name(), count, responses)
            .map_err(|e| AllocateError::Failed(e.to_string()))
    }
}

fn allocate_error(err: CallError) -> AllocateError {
    let message = err.to_string();
    match err {
        CallError::Module {
            error: ModuleError::InvalidRequest(_),
            ..
        } => AllocateError::Rejected(message),
        CallError::Module {
            error: ModuleError::Unavailable(_),
            ..
        } => AllocateError::Unavailable(message),
        CallError::Module {
            error: ModuleError::Internal(_),
            ..
        } => AllocateError::Failed(message),
        CallError::Failed {
            failure: CallFailure::Deadline(_),
            ..
        } => AllocateError::TimedOut(message),
        CallError::Failed { .. } => AllocateError::Failed(message),
    }
}

/// A resource being served.
struct Resource {
    kind: String,
    devices: watch::Sender<Arc<DeviceSet>>,
    token: CancellationToken,
    served: ServedResource,
    /// Dropped last, when `stop` returns: the name is free only once the socket is gone.
    _claim: Claim,
}

impl Resource {
    async fn stop(self) {
        self.token.cancel();
        // Dropping the sender ends the ListAndWatch streams; the task ends when
        // the server has stopped and removed its socket.
        drop(self.devices);
        let _ = self.served.task.await;
    }
}

/// Runs one module until `token` is cancelled, publishing its state in `states`.
pub async fn run(
    runtime: Arc<Runtime>,
    settings: Arc<Settings>,
    spec: ModuleSpec,
    claims: Claims,
    states: watch::Sender<ModuleStates>,
    mut control: mpsc::Receiver<Control>,
    token: CancellationToken,
) {
    let name = spec.name.clone();
    // Publishes only real changes: watchers (readiness, tests) wake on each send.
    let set_state = |state: ModuleState| {
        states.send_if_modified(|s| s.insert(name.clone(), state.clone()).as_ref() != Some(&state));
    };
    set_state(ModuleState::Loading);
    let guest = tokio::select! {
        () = token.cancelled() => return set_state(ModuleState::Stopped),
        guest = load(&runtime, &settings, &spec) => guest,
    };
    let guest = match guest {
        Ok(guest) => Arc::new(guest),
        Err(reason) => {
            tracing::error!(module = %name, file = %spec.path.display(), %reason, "module not loaded");
            return set_state(ModuleState::Failed(reason));
        }
    };
    let first = tokio::select! {
        () = token.cancelled() => return set_state(ModuleState::Stopped),
        scanned = scan(&guest, &settings) => scanned,
    };
    let scanned = match first {
        Ok(scanned) => scanned,
        Err(reason) => {
            tracing::error!(module = %name, %reason, "first scan failed; module not served");
            return set_state(ModuleState::Failed(reason));
        }
    };
    let mut module = Module {
        guest,
        settings,
        claims,
        resources: BTreeMap::new(),
        token: token.clone(),
    };
    module.apply_scan(scanned).await;
    set_state(ModuleState::Serving(module.resource_names()));

    let settings = module.settings.clone();
    let mut health_tick = interval_at(
        Instant::now() + settings.health_interval,
        settings.health_interval,
    );
    health_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut scan_tick = interval_at(
        Instant::now() + settings.scan_interval,
        settings.scan_interval,
    );
    scan_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = token.cancelled() => break,
            _ = health_tick.tick() => module.check_health().await,
            _ = scan_tick.tick() => module.rescan().await,
            Some(message) = control.recv() => match message {
                Control::SetConfig { config, rescan, applied } => {
                    tracing::info!(module = %name, rescan, "configuration changed");
                    module.guest.set_config(config);
                    if rescan {
                        module.rescan().await;
                    }
                    // The caller may have stopped waiting; nothing to undo then.
                    let _ = applied.send(());
                }
            },
        }
        set_state(ModuleState::Serving(module.resource_names()));
    }
    module.stop().await;
    set_state(ModuleState::Stopped);
}

async fn load(
    runtime: &Arc<Runtime>,
    settings: &Settings,
    spec: &ModuleSpec,
) -> Result<Guest, String> {
    let bytes = tokio::fs::read(&spec.path)
        .await
        .map_err(|e| format!("cannot read: {e}"))?;
    let (runtime, limits, name, config) = (
        runtime.clone(),
        settings.limits,
        spec.name.clone(),
        spec.config.clone(),
    );
    let started = std::time::Instant::now();
    // Compiling is CPU-bound for tens of milliseconds: keep it off the executor.
    let guest = tokio::task::spawn_blocking(move || {
        Guest::compile(&runtime, &name, &bytes, limits, config)
    })
    .await
    .map_err(|e| format!("compilation task failed: {e}"))?
    .map_err(|e| e.to_string())?;
    tracing::info!(module = %spec.name, file = %spec.path.display(), elapsed_ms = started.elapsed().as_millis() as u64, "module compiled");
    Ok(guest)
}

async fn scan(guest: &Guest, settings: &Settings) -> Result<Vec<ScannedResource>, String> {
    let kinds = guest.scan().await.map_err(|e| e.to_string())?;
    policy::scan(guest.name(), &settings.default_domain, kinds).map_err(|e| e.to_string())
}

struct Module {
    guest: Arc<Guest>,
    settings: Arc<Settings>,
    claims: Claims,
    resources: BTreeMap<ResourceName, Resource>,
    token: CancellationToken,
}

impl Module {
    fn resource_names(&self) -> Vec<String> {
        self.resources.keys().map(ToString::to_string).collect()
    }

    /// Publishes a scan: changed lists go out on the existing streams, new
    /// resources are served and registered, vanished ones stopped.
    async fn apply_scan(&mut self, scanned: Vec<ScannedResource>) {
        let mut seen = Vec::with_capacity(scanned.len());
        for found in scanned {
            seen.push(found.name.clone());
            if let Some(resource) = self.resources.get(&found.name) {
                resource.devices.send_if_modified(|current| {
                    let changed = **current != found.devices;
                    if changed {
                        *current = Arc::new(found.devices.clone());
                    }
                    changed
                });
                continue;
            }
            let claim = match self.claims.claim(&found.name, self.guest.name()) {
                Ok(claim) => claim,
                Err(owner) => {
                    tracing::error!(
                        module = %self.guest.name(),
                        resource = %found.name,
                        served_by = %owner,
                        "resource is already served by another module; not serving it from this one"
                    );
                    continue;
                }
            };
            let (tx, rx) = watch::channel(Arc::new(found.devices));
            let backend = Arc::new(GuestBackend {
                guest: self.guest.clone(),
                kind: found.kind.clone(),
            });
            let token = self.token.child_token();
            match kubelet::serve(
                &self.settings.kubelet_dir,
                &found.name,
                rx,
                backend,
                token.clone(),
            )
            .await
            {
                Ok(served) => {
                    self.resources.insert(
                        found.name,
                        Resource {
                            kind: found.kind,
                            devices: tx,
                            token,
                            served,
                            _claim: claim,
                        },
                    );
                }
                Err(err) => {
                    tracing::error!(module = %self.guest.name(), resource = %found.name, cause = %err, "cannot serve resource");
                }
            }
        }
        let gone: Vec<ResourceName> = self
            .resources
            .keys()
            .filter(|n| !seen.contains(n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(resource) = self.resources.remove(&name) {
                tracing::info!(module = %self.guest.name(), resource = %name, "resource no longer reported; unregistering");
                resource.stop().await;
            }
        }
    }

    async fn rescan(&mut self) {
        match scan(&self.guest, &self.settings).await {
            Ok(scanned) => self.apply_scan(scanned).await,
            Err(reason) => {
                tracing::warn!(module = %self.guest.name(), %reason, "re-scan failed; keeping the last good device list")
            }
        }
    }

    async fn check_health(&mut self) {
        let mut refs = Vec::new();
        for resource in self.resources.values() {
            let devices = resource.devices.borrow().clone();
            refs.extend(devices.devices().iter().map(|d| DeviceRef {
                kind: resource.kind.clone(),
                id: d.id.clone(),
            }));
        }
        if refs.is_empty() {
            return;
        }
        let answer = match self.guest.health(&refs).await {
            Ok(answer) => answer,
            Err(err) => {
                tracing::warn!(module = %self.guest.name(), cause = %err, "health check failed; keeping the last known health");
                return;
            }
        };
        if let Err(err) = policy::health_answer(self.guest.name(), refs.len(), &answer) {
            tracing::warn!(cause = %err, "health answer refused; keeping the last known health");
            return;
        }
        let mut by_kind: HashMap<&str, HashMap<&str, Health>> = HashMap::new();
        for (r, h) in refs.iter().zip(answer) {
            by_kind
                .entry(r.kind.as_str())
                .or_default()
                .insert(r.id.as_str(), policy::health(h));
        }
        for (name, resource) in &self.resources {
            let Some(health) = by_kind.get(resource.kind.as_str()) else {
                continue;
            };
            resource.devices.send_if_modified(|current| match current.with_health(health) {
                Some(next) => {
                    for d in next.devices() {
                        if current.get(&d.id).is_some_and(|old| old.health != d.health) {
                            tracing::info!(resource = %name, device = %d.id, health = d.health.as_str(), "device health changed");
                        }
                    }
                    *current = Arc::new(next);
                    true
                }
                None => false,
            });
        }
    }

    async fn stop(self) {
        for resource in self.resources.into_values() {
            resource.stop().await;
        }
    }
}
