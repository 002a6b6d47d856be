//! The modules this host serves: following the modules directory (`watch`) and
//! starting, feeding and stopping a task per module (`supervisor`), reading each
//! module's manifest (`manifest`), loading it (`load`, shared with `validate`
//! and `allocate`), running it through its lifecycle (`module`: first scan,
//! health checks and re-scans, replacement and reconfiguration, stop), and
//! publishing each of its resources to a frontend as one snapshot per change
//! (`resource`), allocating through the module version that scanned it
//! (`backend`), with the CDI spec of each resource that opts in written
//! before its snapshots go out ([`crate::cdi`]). Names no protocol type:
//! resources are served through [`crate::frontend::Frontend`].

pub mod backend;
pub mod load;
pub mod manifest;
pub mod module;
pub mod resource;
pub mod supervisor;
pub mod watch;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cdi::{CdiDir, CdiError};
use crate::domain::ResourceName;
use crate::frontend::Frontends;
use crate::metrics::{MODULE_STATES, Metrics};
use crate::registry::load::ScanError;
use crate::registry::manifest::ManifestError;
use crate::runtime::{Limits, LoadError, Runtime};

/// Why the registry did not take a module's files.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A file could not be read.
    #[error("{}: {cause}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        cause: String,
    },
    /// The manifest is not valid.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The module is not a component this host can run.
    #[error("{}: {error}", path.display())]
    Load {
        /// The module file.
        path: PathBuf,
        /// Why.
        error: LoadError,
    },
    /// The first scan failed or its answer breaks the output policy.
    #[error("{}: first scan failed: {error}", path.display())]
    FirstScan {
        /// The module file.
        path: PathBuf,
        /// Why.
        error: ScanError,
    },
    /// A resource's CDI spec could not be built or written: the resource is
    /// not served (at start), or keeps its last good state (after a scan).
    #[error("{error}")]
    Cdi {
        /// The resource.
        resource: ResourceName,
        /// Why.
        error: CdiError,
    },
    /// A resource could not be served through the API its manifest asks for
    /// (the host lacks it, or the frontend refused the resource).
    #[error("{resource}: {reason}")]
    Serve {
        /// The resource.
        resource: ResourceName,
        /// Why.
        reason: String,
    },
    /// A periodic check of a serving module started failing (recorded once per
    /// run of failures); the module keeps its last good state.
    #[error("{check} failed, keeping {keeping}: {reason}")]
    Check {
        /// `scan` or `health`.
        check: &'static str,
        /// What the host keeps meanwhile.
        keeping: &'static str,
        /// Why it failed.
        reason: String,
    },
}

/// What every module's task shares.
pub struct Context {
    /// The engine and the compiled-module cache.
    pub runtime: Arc<Runtime>,
    /// The host's settings (defaults under each module's manifest).
    pub settings: Arc<Settings>,
    /// Which module serves which resource name.
    pub claims: Claims,
    /// The kubelet APIs resources are served through.
    pub frontends: Arc<dyn Frontends>,
    /// Every module's state.
    pub states: tokio::sync::watch::Sender<ModuleStates>,
    /// Refused files and failing checks, newest last (see [`Refusal`]).
    pub refusals: tokio::sync::watch::Sender<Refusals>,
    /// The files each loaded module runs from.
    pub versions: tokio::sync::watch::Sender<ModuleVersions>,
    /// Where resources served with CDI write their specs.
    pub cdi: Arc<CdiDir>,
    /// Cancelled when the whole host stops (not when one module is removed):
    /// resources then keep their CDI specs for containers that restart
    /// meanwhile.
    pub host_stopping: CancellationToken,
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

/// The files a module runs from, once the host has applied them (a refused file
/// leaves the version as it was).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleVersion {
    /// SHA-256 (hex) of the module file.
    pub wasm_sha256: String,
    /// SHA-256 (hex) of the manifest text; `None` without a manifest.
    pub manifest_sha256: Option<String>,
}

/// Every loaded module's [`ModuleVersion`], by name.
pub type ModuleVersions = BTreeMap<String, ModuleVersion>;

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

/// What the registry needs to know to serve modules.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where kubelet's `kubelet.sock` is and plugin sockets go.
    pub kubelet_dir: PathBuf,
    /// Domain prefixed to bare kind names (`<domain>/<kind>`).
    pub default_domain: String,
    /// How often `health` runs.
    pub health_interval: Duration,
    /// How often `scan` runs again after the first.
    pub scan_interval: Duration,
    /// Limits of every guest call.
    pub limits: Limits,
    /// Where the CDI specs of resources served with `cdi` are written.
    pub cdi_dir: PathBuf,
}

/// Where a module is in its lifecycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleState {
    /// Its file is still being written; it loads once the file is complete.
    Settling,
    /// Compiling or running its first scan.
    Loading,
    /// Registered with kubelet; the resource names it serves.
    Serving(Vec<String>),
    /// It could not be loaded; why. It loads again when its files change.
    Failed(String),
    /// Stopped (the host is stopping, or its file was removed).
    Stopped,
}

/// Module files that were not used, and why: the newest last, at most
/// [`MAX_REFUSALS`]. A refused file leaves the module as it was (serving its
/// earlier version, or failed).
pub type Refusals = Vec<Refusal>;

/// How many refusals [`Refusals`] keeps.
pub const MAX_REFUSALS: usize = 64;

/// Something of a module's the host did not use: its files (a bad module or
/// manifest), or a periodic check that started failing (a scan or health call
/// that trapped, timed out or broke the output policy; recorded once per run of
/// failures).
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The module.
    pub module: String,
    /// Why, as logged: names the file and, for a manifest, the field; for a
    /// check, the call and the rule or failure.
    pub reason: String,
    /// Why, as a value to branch on.
    pub error: Arc<RegistryError>,
}

/// The state of every module, by name.
pub type ModuleStates = BTreeMap<String, ModuleState>;

/// Which module serves each resource name. Kubelet keeps one endpoint per
/// resource, so a second module registering the same name would silently take
/// the resource from the first: the second is refused instead.
#[derive(Debug, Clone, Default)]
pub struct Claims {
    owners: Arc<Mutex<HashMap<ResourceName, String>>>,
}

impl Claims {
    /// Claims `resource` for `module`; the claim lasts as long as the returned
    /// guard. Errs with the module that holds it already (then nothing changes).
    ///
    /// # Errors
    /// The name of the module that holds `resource`.
    pub fn claim(&self, resource: &ResourceName, module: &str) -> Result<Claim, String> {
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        match owners.get(resource) {
            Some(owner) if owner != module => Err(owner.clone()),
            _ => {
                owners.insert(resource.clone(), module.to_string());
                Ok(Claim {
                    claims: self.clone(),
                    resource: resource.clone(),
                    module: module.to_string(),
                })
            }
        }
    }
}

/// A module's hold on a resource name, released when dropped.
#[derive(Debug)]
pub struct Claim {
    claims: Claims,
    resource: ResourceName,
    module: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut owners = self.claims.owners.lock().unwrap_or_else(|e| e.into_inner());
        if owners
            .get(&self.resource)
            .is_some_and(|owner| *owner == self.module)
        {
            owners.remove(&self.resource);
        }
    }
}
