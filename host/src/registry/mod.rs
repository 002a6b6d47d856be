//! The modules this host serves: finding them in the modules directory, and
//! running each through its lifecycle (load, first scan, serve every resource,
//! periodic health checks and re-scans, stop).

pub mod lifecycle;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::domain::ResourceName;

use crate::runtime::{Limits, ModuleConfig};

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

/// One module to serve.
#[derive(Debug, Clone)]
pub struct ModuleSpec {
    /// Its name: the file name without `.wasm`.
    pub name: String,
    /// The component file.
    pub path: PathBuf,
    /// Configuration handed to the guest.
    pub config: ModuleConfig,
}

/// Where a module is in its lifecycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleState {
    /// Compiling or running its first scan.
    Loading,
    /// Registered with kubelet; the resource names it serves.
    Serving(Vec<String>),
    /// It could not be loaded; why.
    Failed(String),
    /// Stopped.
    Stopped,
}

/// The state of every module, by name.
pub type ModuleStates = BTreeMap<String, ModuleState>;

/// The `*.wasm` files directly in `dir`, sorted by name.
///
/// # Errors
/// The directory cannot be read.
pub fn discover(dir: &Path) -> std::io::Result<Vec<ModuleSpec>> {
    let mut specs = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "wasm") && path.is_file() {
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            specs.push(ModuleSpec {
                name,
                path,
                config: ModuleConfig::new(),
            });
        }
    }
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(specs)
}

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
