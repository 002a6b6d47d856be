//! One module's life, from its files appearing to their removal:
//!
//! ```text
//!            files (wasm + manifest)
//!                    │
//!                    ▼
//!   ┌──────────── Loading ── manifest bad / not a component / first scan failed ──▶ Failed
//!   │                │ compiled (or from cache) + first scan ok                       │
//!   │                ▼                                                                │
//!   │   ┌──────▶ Serving ◀─── new files: replaced / reconfigured in place ◀───────────┘
//!   │   │            │            (a bad new version is refused; the old one keeps serving)
//!   │   └─ ticks ────┤  health tick: health with hysteresis → same streams
//!   │                │  scan tick:   re-scan → lists change on the same streams;
//!   │                │               resources appear (served + registered) or go
//!   │                │               (server stopped, socket removed)
//!   │                ▼
//!   └─ cancelled ─▶ Stopped  (every resource's server stopped, sockets removed)
//! ```
//!
//! Each resource keeps the module's real devices and publishes the advertised
//! list (replicas expanded) in a `watch` channel that its ListAndWatch streams
//! follow; only real changes are published, so a replaced module or an edited
//! manifest that leaves a resource's devices alone is invisible to kubelet.
//!
//! A failed health check or re-scan (an error, a trap, a missed deadline, the
//! memory cap, an answer the output policy refuses) keeps the last good state:
//! a broken module never withdraws devices that pods may be using, nor flips
//! their health. The failure is logged, recorded as a refusal when a run of
//! failures starts, and the check is retried after 1 s, doubling up to its
//! regular interval, until it succeeds. Every call runs in a fresh instance, so
//! nothing a trapped call left behind is ever reused.
//!
//! A replaced module is swapped in behind a lock that Allocate reads once per
//! call: calls in flight finish on the old version, later calls use the new one.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, Interval, MissedTickBehavior, interval_at};
use tokio_util::sync::CancellationToken;

use crate::domain::{
    ContainerAllocation, Device, DeviceSet, Health, HealthTracker, ResourceName, replica_device,
};
use crate::kubelet::server::{AllocateError, DeviceBackend};
use crate::kubelet::{self, Plugins, ServedResource};
use crate::metrics::{MODULE_STATES, Metrics, ResourceMetrics};
use crate::policy::{self, DeviceAllocations, ScannedResource};
use crate::registry::manifest::{self, ManifestError, ModuleSettings, ResourcePolicy};
use crate::registry::watch::ModuleFiles;
use crate::registry::{
    Claim, Claims, MAX_REFUSALS, ModuleState, ModuleStates, Refusal, Refusals, Settings,
};
use crate::runtime::bindings::{
    AllocateRequest, ContainerRequest, ContainerResponse, DeviceRef, ModuleError,
};
use crate::runtime::{CallError, CallFailure, CallSettings, Guest, ModuleConfig, Runtime};

/// What every module's lifecycle shares.
pub struct Context {
    /// The engine and the compiled-module cache.
    pub runtime: Arc<Runtime>,
    /// The host's settings (defaults under each module's manifest).
    pub settings: Arc<Settings>,
    /// Which module serves which resource name.
    pub claims: Claims,
    /// The kubelet directory, the stream count and the registrations that every
    /// resource's plugin task shares.
    pub plugins: Plugins,
    /// Every module's state.
    pub states: watch::Sender<ModuleStates>,
    /// Refused files and failing checks, newest last (see [`Refusal`]).
    pub refusals: watch::Sender<Refusals>,
}

impl Context {
    /// Publishes `name`'s state; watchers (readiness, tests) wake only on changes.
    pub fn set_state(&self, name: &str, state: ModuleState) {
        self.states.send_if_modified(|s| {
            let changed = s.insert(name.to_string(), state.clone()).as_ref() != Some(&state);
            if changed {
                count_states(s, self.metrics());
            }
            changed
        });
    }

    /// Forgets a removed module's state.
    pub fn remove_state(&self, name: &str) {
        self.states.send_if_modified(|s| {
            let removed = s.remove(name).is_some();
            if removed {
                count_states(s, self.metrics());
            }
            removed
        });
    }

    /// The host's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        self.runtime.metrics()
    }
}

/// Sets the `modules` gauges from `states`.
fn count_states(states: &ModuleStates, metrics: &Metrics) {
    let mut counts = MODULE_STATES.map(|state| (state, 0i64));
    for state in states.values() {
        let name = match state {
            ModuleState::Settling => "settling",
            ModuleState::Loading => "loading",
            ModuleState::Serving(_) => "serving",
            ModuleState::Failed(_) => "failed",
            ModuleState::Stopped => continue,
        };
        if let Some(count) = counts.iter_mut().find(|(s, _)| *s == name) {
            count.1 += 1;
        }
    }
    metrics.set_module_states(&counts);
}

/// Messages to a running module (its files arrive on a `watch` channel of
/// their own, so that only the newest matter and the sender never waits).
#[derive(Debug)]
pub enum Control {
    /// Use this configuration from later calls on (until the manifest changes);
    /// re-scan at once if `rescan`, otherwise the next health check or scheduled
    /// scan sees it.
    SetConfig {
        /// The new configuration.
        config: ModuleConfig,
        /// Re-scan now.
        rescan: bool,
        /// Told once the configuration is in use (and the re-scan done).
        applied: oneshot::Sender<()>,
    },
}

/// The module version that new calls use; swapped when the module is replaced.
type GuestSlot = RwLock<Arc<Guest>>;

fn current(slot: &GuestSlot) -> Arc<Guest> {
    slot.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The allocations the last accepted scan reported for a resource's devices;
/// swapped whole on each scan, read once per Allocate.
type AllocationsSlot = RwLock<Arc<DeviceAllocations>>;

/// Allocates through a module for one of its resources.
pub struct GuestBackend {
    guest: Arc<GuestSlot>,
    kind: String,
    replicas: Arc<AtomicU32>,
    allocations: Arc<AllocationsSlot>,
}

impl GuestBackend {
    /// A backend for one resource of `guest`, of kind `kind`, with each device
    /// advertised `replicas` times and `allocations` as its scan reported them:
    /// what a served resource allocates through, for a one-off allocation that
    /// serves nothing (`inspect`).
    pub fn new(
        guest: Arc<Guest>,
        kind: String,
        replicas: u32,
        allocations: DeviceAllocations,
    ) -> Self {
        Self {
            guest: Arc::new(RwLock::new(guest)),
            kind,
            replicas: Arc::new(AtomicU32::new(replicas)),
            allocations: Arc::new(RwLock::new(Arc::new(allocations))),
        }
    }
}

impl DeviceBackend for GuestBackend {
    async fn allocate(
        &self,
        containers: Vec<Vec<String>>,
    ) -> Result<Vec<ContainerAllocation>, AllocateError> {
        let count = containers.len();
        let replicas = self.replicas.load(Ordering::Relaxed);
        let reported = self
            .allocations
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let containers = containers
            .into_iter()
            .map(|ids| {
                let device_ids = if replicas > 1 {
                    // Replicas of one device in a container are that device, once.
                    let mut devices: Vec<String> = Vec::with_capacity(ids.len());
                    for id in &ids {
                        let device = replica_device(id, replicas);
                        if !devices.iter().any(|d| d == device) {
                            devices.push(device.to_string());
                        }
                    }
                    devices
                } else {
                    ids
                };
                let allocations = device_ids
                    .iter()
                    .map(|id| reported.get(id).cloned().unwrap_or_else(empty_allocation))
                    .collect();
                ContainerRequest {
                    device_ids,
                    allocations,
                }
            })
            .collect();
        let request = AllocateRequest {
            kind: self.kind.clone(),
            containers,
        };
        // One version per call: a replacement arriving now is used by later calls.
        let guest = current(&self.guest);
        let settings = guest.settings();
        let responses = guest
            .allocate(&settings, &request)
            .await
            .map_err(allocate_error)?;
        policy::allocation(guest.name(), count, responses, &settings.grants)
            .map_err(|e| AllocateError::Failed(e.to_string()))
    }
}

fn empty_allocation() -> ContainerResponse {
    ContainerResponse {
        envs: Vec::new(),
        devices: Vec::new(),
        mounts: Vec::new(),
        annotations: Vec::new(),
        cdi_devices: Vec::new(),
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
    policy: ResourcePolicy,
    /// The module's devices, health after hysteresis.
    real: DeviceSet,
    tracker: HealthTracker,
    /// The replicas the advertised list was built with (read by Allocate).
    replicas: Arc<AtomicU32>,
    /// What the last scan reported each device needs (read by Allocate).
    allocations: Arc<AllocationsSlot>,
    /// The advertised list.
    devices: watch::Sender<Arc<DeviceSet>>,
    token: CancellationToken,
    served: ServedResource,
    metrics: ResourceMetrics,
    /// Dropped last, when `stop` returns: the name is free only once the socket is gone.
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

/// The list to advertise for `real` shared `replicas` times, and the replicas
/// used: 1 when sharing would exceed the per-resource device limit (logged).
pub fn advertise(resource: &ResourceName, real: &DeviceSet, replicas: u32) -> (DeviceSet, u32) {
    match real.replicated(replicas) {
        Ok(set) => (set, replicas),
        Err(err) => {
            tracing::error!(resource = %resource, replicas, cause = %err, "cannot advertise replicas; advertising each device once");
            (real.clone(), 1)
        }
    }
}

impl Resource {
    /// Publishes the advertised list if it changed.
    fn publish(&self, name: &ResourceName) {
        let (advertised, replicas) = advertise(name, &self.real, self.policy.replicas);
        self.replicas.store(replicas, Ordering::Relaxed);
        self.devices.send_if_modified(|current| {
            let changed = **current != advertised;
            if changed {
                set_device_counts(&self.metrics, &advertised);
                *current = Arc::new(advertised);
            }
            changed
        });
    }

    /// Takes a scan's devices: the ids and NUMA nodes as scanned; for devices
    /// already known, the scanned health counts as one more health answer.
    fn update(&mut self, name: &ResourceName, scanned: ScannedResource, policy: ResourcePolicy) {
        // Before the list goes out, so that a device kubelet may allocate has
        // its allocation in place.
        *self.allocations.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(scanned.allocations);
        let scanned = scanned.devices;
        let merged: Vec<Device> = scanned
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
        self.real = DeviceSet::new(merged).unwrap_or(scanned);
        self.tracker.retain(&self.real);
        self.policy = policy;
        self.publish(name);
    }

    async fn stop(self) {
        self.token.cancel();
        // Dropping the sender ends the ListAndWatch streams; the task ends when
        // the server has stopped and removed its socket.
        drop(self.devices);
        let _ = self.served.task.await;
        self.metrics.forget_devices();
    }
}

/// Runs one module from its current `files` until `token` is cancelled (the
/// file was removed, or the host stops), publishing its state in `ctx.states`.
/// Newer files replace older ones not yet applied: a busy module applies only
/// the newest.
pub async fn run(
    ctx: Arc<Context>,
    mut files: watch::Receiver<ModuleFiles>,
    mut control: mpsc::Receiver<Control>,
    token: CancellationToken,
) {
    let first = files.borrow_and_update().clone();
    let name = first.name.clone();
    ctx.set_state(&name, ModuleState::Loading);
    let mut module: Option<Module> = None;
    let mut next_files = Some(first);
    let mut ticks: Option<Ticks> = None;
    loop {
        if let Some(files) = next_files.take() {
            let applied = token
                .run_until_cancelled(apply_files(&ctx, &mut module, files, &token))
                .await;
            if applied.is_none() {
                break;
            }
            if let Some(m) = &module
                && ticks.as_ref().is_none_or(|t| !t.matches(&m.settings))
            {
                ticks = Some(Ticks::new(&m.settings));
            }
        } else {
            let (health_due, scan_due) = match ticks.as_mut() {
                Some(t) => (Some(&mut t.health), Some(&mut t.scan)),
                None => (None, None),
            };
            let scan_retry = module.as_ref().and_then(|m| m.scan_retry.at);
            let health_retry = module.as_ref().and_then(|m| m.health_retry.at);
            tokio::select! {
                () = token.cancelled() => break,
                () = retry_due(scan_retry) => {
                    if let Some(m) = module.as_mut() {
                        // Due once: a failure schedules the next retry, and a
                        // check with nothing to do must not leave this ready.
                        m.scan_retry.at = None;
                        if token.run_until_cancelled(m.rescan()).await.is_none() {
                            break;
                        }
                    }
                }
                () = retry_due(health_retry) => {
                    if let Some(m) = module.as_mut() {
                        m.health_retry.at = None;
                        if token.run_until_cancelled(m.check_health()).await.is_none() {
                            break;
                        }
                    }
                }
                Some(_) = tick(health_due) => {
                    if let Some(m) = module.as_mut()
                        && token.run_until_cancelled(m.check_health()).await.is_none()
                    {
                        break;
                    }
                }
                Some(_) = tick(scan_due) => {
                    if let Some(m) = module.as_mut()
                        && token.run_until_cancelled(m.rescan()).await.is_none()
                    {
                        break;
                    }
                }
                changed = files.changed() => {
                    if changed.is_err() {
                        // The supervisor let go of this module: it is being removed.
                        break;
                    }
                    next_files = Some(files.borrow_and_update().clone());
                }
                message = control.recv() => match message {
                    None => break,
                    Some(Control::SetConfig { config, rescan, applied }) => {
                        if let Some(m) = module.as_mut() {
                            tracing::info!(module = %name, rescan, "configuration changed");
                            m.settings.call.config = config;
                            current(&m.guest).set_settings(m.settings.call.clone());
                            if rescan && token.run_until_cancelled(m.rescan()).await.is_none() {
                                break;
                            }
                        }
                        // The caller may have stopped waiting; nothing to undo then.
                        let _ = applied.send(());
                    }
                },
            }
        }
        if let Some(m) = &module {
            ctx.set_state(&name, ModuleState::Serving(m.resource_names()));
        }
    }
    if let Some(m) = module {
        m.stop().await;
    }
    ctx.metrics().forget_module(&name);
    ctx.set_state(&name, ModuleState::Stopped);
}

/// The health and scan timers of a serving module.
struct Ticks {
    health: Interval,
    scan: Interval,
    periods: (Duration, Duration),
}

impl Ticks {
    fn new(settings: &ModuleSettings) -> Self {
        let every = |period: Duration| {
            let mut t = interval_at(Instant::now() + period, period);
            t.set_missed_tick_behavior(MissedTickBehavior::Delay);
            t
        };
        Self {
            health: every(settings.health_interval),
            scan: every(settings.scan_interval),
            periods: (settings.health_interval, settings.scan_interval),
        }
    }

    fn matches(&self, settings: &ModuleSettings) -> bool {
        self.periods == (settings.health_interval, settings.scan_interval)
    }
}

/// The next tick of `interval`, or never when there is none.
async fn tick(interval: Option<&mut Interval>) -> Option<Instant> {
    match interval {
        Some(i) => Some(i.tick().await),
        None => std::future::pending().await,
    }
}

/// Keeps `reason` in the refusals (the newest [`MAX_REFUSALS`]).
fn record_refusal(ctx: &Context, name: &str, reason: &str) {
    ctx.metrics().module_refused(name);
    ctx.refusals.send_modify(|r| {
        if r.len() == MAX_REFUSALS {
            r.remove(0);
        }
        r.push(Refusal {
            module: name.to_string(),
            reason: reason.to_string(),
        });
    });
}

/// Why a module's files are not used; logged, and the module's state when it
/// has nothing serving.
fn refuse(ctx: &Context, module: &Option<Module>, name: &str, reason: String) {
    record_refusal(ctx, name, &reason);
    if module.is_some() {
        tracing::error!(module = %name, %reason, "new module files refused; the running version keeps serving");
    } else {
        tracing::error!(module = %name, %reason, "module not loaded");
        ctx.set_state(name, ModuleState::Failed(reason));
    }
}

/// Applies new files: a new manifest reconfigures in place, new module bytes
/// replace the running version once they compile and scan.
async fn apply_files(
    ctx: &Arc<Context>,
    module: &mut Option<Module>,
    files: ModuleFiles,
    token: &CancellationToken,
) {
    let name = files.name.clone();
    let manifest_hash = files.manifest_hash.clone();
    let manifest_changed = module
        .as_ref()
        .is_none_or(|m| m.manifest_hash != manifest_hash);
    let new_settings = if manifest_changed {
        let parsed = match &files.manifest {
            None => Ok(ModuleSettings::defaults(&ctx.settings)),
            Some(Ok(text)) => manifest::parse(&files.manifest_path, text, &ctx.settings),
            Some(Err(reason)) => Err(ManifestError {
                file: files.manifest_path.clone(),
                field: "file".into(),
                message: reason.clone(),
            }),
        };
        match parsed {
            Ok(settings) => Some(settings),
            Err(err) => {
                refuse(ctx, module, &name, err.to_string());
                if module.is_none() {
                    return;
                }
                None
            }
        }
    } else {
        None
    };

    let wasm_changed = module
        .as_ref()
        .is_none_or(|m| m.wasm_hash != files.wasm_hash);
    if wasm_changed {
        let settings = new_settings
            .clone()
            .or_else(|| module.as_ref().map(|m| m.settings.clone()))
            .unwrap_or_else(|| ModuleSettings::defaults(&ctx.settings));
        let loaded = async {
            let bytes = files
                .wasm
                .clone()
                .map_err(|e| format!("{}: {e}", files.wasm_path.display()))?;
            let guest = load(&ctx.runtime, &name, bytes, settings.call.clone())
                .await
                .map_err(|e| format!("{}: {e}", files.wasm_path.display()))?;
            let scanned = scan(&guest, &settings)
                .await
                .map_err(|e| format!("{}: first scan failed: {e}", files.wasm_path.display()))?;
            Ok::<_, String>((guest, scanned))
        };
        match loaded.await {
            Ok((guest, scanned)) => {
                let guest = Arc::new(guest);
                match module.as_mut() {
                    Some(m) => {
                        tracing::info!(module = %name, "module replaced; new calls use the new version");
                        *m.guest.write().unwrap_or_else(|e| e.into_inner()) = guest;
                        m.wasm_hash = files.wasm_hash.clone();
                        m.settings = settings;
                        if new_settings.is_some() {
                            m.manifest_hash = manifest_hash;
                        }
                        // The new version's first scan succeeded: a run of
                        // failures of the old one is over.
                        m.check_succeeded(Check::Scan);
                        m.apply_scan(scanned).await;
                    }
                    None => {
                        let mut m = Module {
                            name: name.clone(),
                            ctx: ctx.clone(),
                            guest: Arc::new(RwLock::new(guest)),
                            wasm_hash: files.wasm_hash.clone(),
                            manifest_hash,
                            settings,
                            resources: BTreeMap::new(),
                            token: token.clone(),
                            scan_retry: Retry::default(),
                            health_retry: Retry::default(),
                        };
                        m.apply_scan(scanned).await;
                        *module = Some(m);
                    }
                }
                return;
            }
            Err(reason) => {
                refuse(ctx, module, &name, reason);
                if module.is_none() {
                    return;
                }
            }
        }
    }
    if let (Some(m), Some(settings)) = (module.as_mut(), new_settings) {
        tracing::info!(module = %name, manifest = %files.manifest_path.display(), "manifest changed; reconfiguring in place");
        current(&m.guest).set_settings(settings.call.clone());
        m.settings = settings;
        m.manifest_hash = manifest_hash;
        m.rescan().await;
    }
}

async fn load(
    runtime: &Arc<Runtime>,
    name: &str,
    bytes: Arc<[u8]>,
    settings: CallSettings,
) -> Result<Guest, String> {
    let (runtime, module) = (runtime.clone(), name.to_string());
    let started = std::time::Instant::now();
    // Compiling is CPU-bound for tens of milliseconds: keep it off the executor.
    let guest =
        tokio::task::spawn_blocking(move || Guest::compile(&runtime, &module, &bytes, settings))
            .await
            .map_err(|e| format!("compilation task failed: {e}"))?
            .map_err(|e| e.to_string())?;
    tracing::info!(module = %name, elapsed_ms = started.elapsed().as_millis() as u64, "module loaded");
    Ok(guest)
}

async fn scan(guest: &Guest, settings: &ModuleSettings) -> Result<Vec<ScannedResource>, String> {
    // Judged by the grants the call ran with, as Allocate is.
    let call_settings = guest.settings();
    let kinds = guest.scan().await.map_err(|e| e.to_string())?;
    policy::scan(
        guest.name(),
        |kind| settings.resource_name(kind),
        &call_settings.grants,
        kinds,
    )
    .map_err(|e| e.to_string())
}

struct Module {
    name: String,
    ctx: Arc<Context>,
    guest: Arc<GuestSlot>,
    wasm_hash: String,
    manifest_hash: Option<String>,
    settings: ModuleSettings,
    resources: BTreeMap<ResourceName, Resource>,
    token: CancellationToken,
    scan_retry: Retry,
    health_retry: Retry,
}

/// The first retry of a failed check comes this soon; each further one twice as
/// late, up to the check's regular interval.
pub const FIRST_RETRY: Duration = Duration::from_secs(1);

/// A periodic check of a serving module.
#[derive(Debug, Clone, Copy)]
enum Check {
    Scan,
    Health,
}

impl Check {
    fn as_str(self) -> &'static str {
        match self {
            Check::Scan => "scan",
            Check::Health => "health",
        }
    }
}

/// A run of failures of one periodic check, and when to try it again.
#[derive(Debug, Default)]
struct Retry {
    failures: u32,
    at: Option<Instant>,
}

impl Retry {
    /// Counts a failure; returns the delay until the retry.
    fn failed(&mut self, interval: Duration) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let delay = FIRST_RETRY
            .saturating_mul(1 << (self.failures - 1).min(16))
            .min(interval);
        self.at = Some(Instant::now() + delay);
        delay
    }

    /// Ends the run of failures; returns how long it was.
    fn succeeded(&mut self) -> u32 {
        self.at = None;
        std::mem::take(&mut self.failures)
    }
}

/// Waits until `at`, or forever when there is no retry due.
async fn retry_due(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
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
            let policy = self.settings.resource(&found.kind).clone();
            if let Some(resource) = self.resources.get_mut(&found.name) {
                if resource.kind == found.kind {
                    let name = found.name.clone();
                    resource.update(&name, found, policy);
                    continue;
                }
                // Another kind renamed onto this name: serve it afresh.
                if let Some(old) = self.resources.remove(&found.name) {
                    old.stop().await;
                }
            }
            let claim = match self.ctx.claims.claim(&found.name, &self.name) {
                Ok(claim) => claim,
                Err(owner) => {
                    tracing::error!(
                        module = %self.name,
                        resource = %found.name,
                        served_by = %owner,
                        "resource is already served by another module; not serving it from this one"
                    );
                    continue;
                }
            };
            let (advertised, replicas) = advertise(&found.name, &found.devices, policy.replicas);
            let replicas = Arc::new(AtomicU32::new(replicas));
            let (tx, rx) = watch::channel(Arc::new(advertised));
            let allocations = Arc::new(RwLock::new(Arc::new(found.allocations)));
            let backend = Arc::new(GuestBackend {
                guest: self.guest.clone(),
                kind: found.kind.clone(),
                replicas: replicas.clone(),
                allocations: allocations.clone(),
            });
            let token = self.token.child_token();
            let metrics = self.ctx.metrics().resource(found.name.as_str());
            set_device_counts(&metrics, &rx.borrow());
            let served = kubelet::serve(
                &self.ctx.plugins,
                found.name.clone(),
                rx,
                backend,
                metrics.clone(),
                token.clone(),
            );
            tracing::info!(module = %self.name, resource = %found.name, devices = found.devices.len(), replicas = policy.replicas, "serving resource");
            self.resources.insert(
                found.name,
                Resource {
                    kind: found.kind,
                    policy,
                    real: found.devices,
                    tracker: HealthTracker::default(),
                    replicas,
                    allocations,
                    devices: tx,
                    token,
                    served,
                    metrics,
                    _claim: claim,
                },
            );
        }
        let gone: Vec<ResourceName> = self
            .resources
            .keys()
            .filter(|n| !seen.contains(n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(resource) = self.resources.remove(&name) {
                tracing::info!(module = %self.name, resource = %name, "resource no longer reported; unregistering");
                resource.stop().await;
            }
        }
    }

    async fn rescan(&mut self) {
        let guest = current(&self.guest);
        match scan(&guest, &self.settings).await {
            Ok(scanned) => {
                self.check_succeeded(Check::Scan);
                self.apply_scan(scanned).await;
            }
            Err(reason) => self.check_failed(Check::Scan, &reason),
        }
    }

    fn retry(&mut self, check: Check) -> (&mut Retry, Duration) {
        match check {
            Check::Scan => (&mut self.scan_retry, self.settings.scan_interval),
            Check::Health => (&mut self.health_retry, self.settings.health_interval),
        }
    }

    fn check_succeeded(&mut self, check: Check) {
        let failures = self.retry(check).0.succeeded();
        if failures > 0 {
            tracing::info!(module = %self.name, check = check.as_str(), failures, "check succeeds again");
        }
    }

    /// Logs a failed check, records the first of a run as a refusal, and
    /// schedules the retry. What kubelet sees stays as it was.
    fn check_failed(&mut self, check: Check, reason: &str) {
        let (retry, interval) = self.retry(check);
        let delay = retry.failed(interval);
        let failures = retry.failures;
        let keeping = match check {
            Check::Scan => "the last good device list",
            Check::Health => "the last known health",
        };
        let check = check.as_str();
        tracing::warn!(
            module = %self.name,
            check,
            failures,
            retry_in_ms = delay.as_millis() as u64,
            %reason,
            "{check} failed; keeping {keeping}"
        );
        if failures == 1 {
            record_refusal(
                &self.ctx,
                &self.name,
                &format!("{check} failed, keeping {keeping}: {reason}"),
            );
        }
    }

    async fn check_health(&mut self) {
        // A module without `health` gets its health from scans (`Resource::update`).
        if !current(&self.guest).exports().health {
            return;
        }
        let mut refs = Vec::new();
        for resource in self.resources.values() {
            refs.extend(resource.real.devices().iter().map(|d| DeviceRef {
                kind: resource.kind.clone(),
                id: d.id.clone(),
            }));
        }
        if refs.is_empty() {
            return;
        }
        let guest = current(&self.guest);
        let answer = match guest.health(&refs).await {
            Ok(answer) => answer,
            Err(err) => return self.check_failed(Check::Health, &err.to_string()),
        };
        if let Err(err) = policy::health_answer(&self.name, refs.len(), &answer) {
            return self.check_failed(Check::Health, &err.to_string());
        }
        self.check_succeeded(Check::Health);
        let mut answers = answer.into_iter().map(policy::health);
        for (name, resource) in &mut self.resources {
            let mut next: HashMap<&str, Health> = HashMap::new();
            for device in resource.real.devices() {
                let Some(answer) = answers.next() else { break };
                let health = resource.tracker.observe(
                    &device.id,
                    device.health,
                    answer,
                    resource.policy.unhealthy_after,
                    resource.policy.healthy_after,
                );
                if health != device.health {
                    tracing::info!(resource = %name, device = %device.id, health = health.as_str(), "device health changed");
                    next.insert(&device.id, health);
                }
            }
            if let Some(updated) = resource.real.with_health(&next) {
                resource.real = updated;
                resource.publish(name);
            }
        }
    }

    async fn stop(self) {
        futures::future::join_all(self.resources.into_values().map(Resource::stop)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_double_from_one_second_up_to_the_interval_and_reset_on_success() {
        let interval = Duration::from_secs(10);
        let mut retry = Retry::default();
        let delays: Vec<u64> = (0..6).map(|_| retry.failed(interval).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 10, 10]);
        assert!(retry.at.is_some());
        assert_eq!(retry.succeeded(), 6);
        assert!(retry.at.is_none());
        assert_eq!(retry.failed(interval), FIRST_RETRY);
        // Many failures never overflow.
        for _ in 0..100 {
            retry.failed(interval);
        }
        assert_eq!(retry.failed(interval), interval);
        // An interval shorter than the first retry caps it too.
        assert_eq!(
            Retry::default().failed(Duration::from_millis(50)),
            Duration::from_millis(50)
        );
    }
}
