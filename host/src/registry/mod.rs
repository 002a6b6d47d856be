//! The modules this host serves: following the modules directory (`watch`),
//! reading each module's manifest (`manifest`), and running each module through
//! its lifecycle (`lifecycle`: load, first scan, serve every resource, health
//! checks and re-scans, replacement and reconfiguration, stop).

pub mod lifecycle;
pub mod manifest;
pub mod watch;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::domain::ResourceName;
use crate::runtime::Limits;

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The module.
    pub module: String,
    /// Why: names the file and, for a manifest, the field; for a check, the
    /// call and the rule or failure.
    pub reason: String,
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
