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
//!   │   └─ ticks ────┤  health tick: health with hysteresis → a new snapshot
//!   │                │  scan tick:   re-scan → a new snapshot per changed resource;
//!   │                │               resources appear (served through the frontend)
//!   │                │               or go (the frontend stops serving them)
//!   │                ▼
//!   └─ cancelled ─▶ Stopped  (every resource withdrawn from its frontend)
//! ```
//!
//! Each resource ([`super::resource`]) publishes one immutable snapshot per
//! accepted change; the snapshot carries the backend of the module version that
//! scanned it, so a replaced module serves calls that already hold a snapshot in
//! the old version and later ones in the new, with no lock between them.
//!
//! A failed health check or re-scan (an error, a trap, a missed deadline, the
//! memory cap, an answer the output policy refuses) keeps the last good state:
//! a broken module never withdraws devices that pods may be using, nor flips
//! their health. The failure is logged, recorded as a refusal when a run of
//! failures starts, and the check is retried after 1 s, doubling up to its
//! regular interval, until it succeeds. `scan` and `health` always run in a
//! fresh instance, so nothing a trapped check left behind is seen by the next.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, Interval, MissedTickBehavior, interval_at};
use tokio_util::sync::CancellationToken;

use crate::domain::ResourceName;
use crate::frontend::{Backend, ServeAs, default_driver};
use crate::policy::{self, ScannedResource};
use crate::registry::backend::GuestBackend;
use crate::registry::load;
use crate::registry::manifest::{self, Api, ManifestError, ModuleSettings, ResourcePolicy};
use crate::registry::resource::{Resource, StartError};
use crate::registry::watch::ModuleFiles;
use crate::registry::{Context, MAX_REFUSALS, ModuleState, ModuleVersion, Refusal, RegistryError};
use crate::runtime::Guest;
use crate::runtime::bindings::DeviceRef;

/// Runs one module from its current `files` until `token` is cancelled (the
/// file was removed, or the host stops), publishing its state in `ctx.states`.
/// Newer files replace older ones not yet applied: a busy module applies only
/// the newest.
pub async fn run(
    ctx: Arc<Context>,
    mut files: watch::Receiver<ModuleFiles>,
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
            if let Some(m) = &module {
                let version = ModuleVersion {
                    wasm_sha256: m.wasm_hash.clone(),
                    manifest_sha256: m.manifest_hash.clone(),
                };
                ctx.versions.send_if_modified(|all| {
                    all.insert(name.clone(), version.clone()).as_ref() != Some(&version)
                });
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
            }
        }
        if let Some(m) = &module {
            ctx.set_state(&name, ModuleState::Serving(m.resource_names()));
        }
    }
    if let Some(m) = module {
        // Removed (its file deleted) rather than the host stopping: its
        // resources are withdrawn for good, CDI specs included.
        let withdrawn = !ctx.host_stopping.is_cancelled();
        m.stop(withdrawn).await;
    }
    ctx.metrics().forget_module(&name);
    ctx.versions
        .send_if_modified(|all| all.remove(&name).is_some());
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

/// Keeps `error` in the refusals (the newest [`MAX_REFUSALS`]); returns its
/// message.
fn record_refusal(ctx: &Context, name: &str, error: RegistryError) -> String {
    ctx.metrics().module_refused(name);
    let reason = error.to_string();
    ctx.refusals.send_modify(|r| {
        if r.len() == MAX_REFUSALS {
            r.remove(0);
        }
        r.push(Refusal {
            module: name.to_string(),
            reason: reason.clone(),
            error: Arc::new(error),
        });
    });
    reason
}

/// Why a module's files are not used; logged, and the module's state when it
/// has nothing serving.
fn refuse(ctx: &Context, module: &Option<Module>, name: &str, error: RegistryError) {
    let reason = record_refusal(ctx, name, error);
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
                refuse(ctx, module, &name, RegistryError::Manifest(err));
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
            let bytes = files.wasm.clone().map_err(|cause| RegistryError::Read {
                path: files.wasm_path.clone(),
                cause,
            })?;
            load::load(&ctx.runtime, &name, &files.wasm_path, bytes, &settings).await
        };
        match loaded.await {
            Ok((guest, scanned)) => {
                let guest = Arc::new(guest);
                let backend: Arc<dyn Backend> = Arc::new(GuestBackend::new(guest.clone()));
                match module.as_mut() {
                    Some(m) => {
                        tracing::info!(module = %name, "module replaced; new calls use the new version");
                        m.guest = guest;
                        m.backend = backend;
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
                            guest,
                            backend,
                            wasm_hash: files.wasm_hash.clone(),
                            manifest_hash,
                            settings,
                            resources: BTreeMap::new(),
                            cdi_refused: BTreeSet::new(),
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
            Err(err) => {
                refuse(ctx, module, &name, err);
                if module.is_none() {
                    return;
                }
            }
        }
    }
    if let (Some(m), Some(settings)) = (module.as_mut(), new_settings) {
        tracing::info!(module = %name, manifest = %files.manifest_path.display(), "manifest changed; reconfiguring in place");
        m.guest.set_settings(settings.call.clone());
        m.settings = settings;
        m.manifest_hash = manifest_hash;
        m.rescan().await;
    }
}

struct Module {
    name: String,
    ctx: Arc<Context>,
    /// The version that calls run in now.
    guest: Arc<Guest>,
    /// Allocates through `guest`; every snapshot published since it was loaded
    /// carries it.
    backend: Arc<dyn Backend>,
    wasm_hash: String,
    manifest_hash: Option<String>,
    settings: ModuleSettings,
    resources: BTreeMap<ResourceName, Resource>,
    /// Resources that could not be served as asked at the last try (their CDI
    /// spec not written, their frontend refused them; logged once per run of
    /// failures).
    cdi_refused: BTreeSet<ResourceName>,
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

/// Which API serves the resource `name` under `policy`.
///
/// # Errors
/// A DRA resource without a `driver` whose name makes no driver name.
fn serve_as(policy: &ResourcePolicy, name: &ResourceName) -> Result<ServeAs, String> {
    Ok(match policy.api {
        Api::DevicePlugin => ServeAs::DevicePlugin,
        Api::Dra => ServeAs::Dra {
            driver: match &policy.driver {
                Some(driver) => driver.clone(),
                None => default_driver(name)?,
            },
        },
    })
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

    /// Publishes a scan: each resource gets a new snapshot (only changed ones
    /// are sent on), new resources are served through the frontend, vanished
    /// ones withdrawn.
    async fn apply_scan(&mut self, scanned: Vec<ScannedResource>) {
        let mut seen = Vec::with_capacity(scanned.len());
        for found in scanned {
            seen.push(found.name.clone());
            let policy = self.settings.resource(&found.kind).clone();
            let serve_as = match serve_as(&policy, &found.name) {
                Ok(serve_as) => serve_as,
                Err(reason) => {
                    let name = found.name.clone();
                    if let Some(old) = self.resources.remove(&name) {
                        old.stop(true).await;
                    }
                    self.serve_failed(name, StartError::Frontend(reason), "not serving it");
                    continue;
                }
            };
            if let Some(resource) = self.resources.get_mut(&found.name) {
                if resource.kind() == found.kind && *resource.serve_as() == serve_as {
                    let name = found.name.clone();
                    match resource.update(found, policy, &self.backend) {
                        Ok(()) => {
                            self.cdi_refused.remove(&name);
                        }
                        Err(error) => self.serve_failed(
                            name,
                            StartError::Cdi(error),
                            "keeping its last good state",
                        ),
                    }
                    continue;
                }
                // Another kind renamed onto this name, or the manifest moved it
                // to another API: serve it afresh (the old API stops serving it
                // first, so the name is never served through both).
                if let Some(old) = self.resources.remove(&found.name) {
                    tracing::info!(module = %self.name, resource = %found.name, from = %old.serve_as(), to = %serve_as, "serving resource afresh");
                    old.stop(true).await;
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
            let token = self.token.child_token();
            let metrics = self.ctx.metrics().resource(found.name.as_str());
            let (name, devices, replicas) =
                (found.name.clone(), found.devices.len(), policy.replicas);
            let frontend = match self.ctx.frontends.frontend(&serve_as) {
                Ok(frontend) => frontend,
                Err(reason) => {
                    self.serve_failed(found.name, StartError::Frontend(reason), "not serving it");
                    continue;
                }
            };
            let started = Resource::start(
                &*frontend,
                serve_as.clone(),
                found,
                policy,
                self.backend.clone(),
                &self.ctx.cdi,
                metrics,
                token,
                claim,
            );
            match started {
                Ok(resource) => {
                    tracing::info!(module = %self.name, resource = %name, devices, replicas, api = %serve_as, "serving resource");
                    self.cdi_refused.remove(&name);
                    self.resources.insert(name, resource);
                }
                Err(error) => self.serve_failed(name, error, "not serving it"),
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
                tracing::info!(module = %self.name, resource = %name, "resource no longer reported; unregistering");
                resource.stop(true).await;
            }
        }
    }

    /// A resource could not be served (its CDI spec not written, or its
    /// frontend refused it): one log line and a refusal to branch on, once per
    /// run of failures (each scan tries again).
    fn serve_failed(&mut self, resource: ResourceName, error: StartError, outcome: &'static str) {
        if !self.cdi_refused.insert(resource.clone()) {
            tracing::debug!(module = %self.name, resource = %resource, cause = %error, "resource still not served as asked; {outcome}");
            return;
        }
        let error = match error {
            StartError::Cdi(error) => {
                tracing::error!(module = %self.name, resource = %resource, cause = %error, "CDI spec not written; {outcome}");
                RegistryError::Cdi { resource, error }
            }
            StartError::Frontend(reason) => {
                tracing::error!(module = %self.name, resource = %resource, cause = %reason, "cannot serve the resource; {outcome}");
                RegistryError::Serve { resource, reason }
            }
        };
        record_refusal(&self.ctx, &self.name, error);
    }

    async fn rescan(&mut self) {
        let guest = self.guest.clone();
        match load::scan(&guest, &self.settings).await {
            Ok(scanned) => {
                self.check_succeeded(Check::Scan);
                self.apply_scan(scanned).await;
            }
            Err(err) => self.check_failed(Check::Scan, &err.to_string()),
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
                RegistryError::Check {
                    check,
                    keeping,
                    reason: reason.to_string(),
                },
            );
        }
    }

    async fn check_health(&mut self) {
        // A module without `health` gets its health from scans (`Resource::update`).
        if !self.guest.exports().health {
            return;
        }
        let mut refs = Vec::new();
        for resource in self.resources.values() {
            refs.extend(resource.real().devices().iter().map(|d| DeviceRef {
                kind: resource.kind().to_string(),
                id: d.id.clone(),
            }));
        }
        if refs.is_empty() {
            return;
        }
        let guest = self.guest.clone();
        let answer = match guest.health(&refs).await {
            Ok(answer) => answer,
            Err(err) => return self.check_failed(Check::Health, &err.to_string()),
        };
        if let Err(err) = policy::health_answer(&self.name, refs.len(), &answer) {
            return self.check_failed(Check::Health, &err.to_string());
        }
        self.check_succeeded(Check::Health);
        let mut answers = answer.into_iter().map(policy::health);
        for resource in self.resources.values_mut() {
            resource.observe_health(&mut answers);
        }
    }

    async fn stop(self, withdrawn: bool) {
        futures::future::join_all(
            self.resources
                .into_values()
                .map(|resource| resource.stop(withdrawn)),
        )
        .await;
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
