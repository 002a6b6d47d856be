//! The one way a module is loaded, used by the serving host and by `validate`
//! and `allocate` alike: compile it (or read it from the compiled-module cache),
//! check it against our world, run its first scan in its sandbox and judge the
//! answer by the output policy. Reading the files is the caller's (the watched
//! directory, or the command line), with the same size limits.

use std::path::Path;
use std::sync::Arc;

use crate::policy::{self, ScannedResource};
use crate::registry::RegistryError;
use crate::registry::manifest::ModuleSettings;
use crate::runtime::bindings::DeviceRef;
use crate::runtime::{Guest, Runtime};

/// Compiles `bytes` as module `name` (from `path`) with `settings`, off the
/// async executor (compiling is CPU-bound for tens of milliseconds).
///
/// # Errors
/// [`RegistryError::Load`]: not a module this host can run.
pub async fn compile(
    runtime: &Arc<Runtime>,
    name: &str,
    path: &Path,
    bytes: Arc<[u8]>,
    settings: &ModuleSettings,
) -> Result<Guest, RegistryError> {
    let (runtime, module, call) = (runtime.clone(), name.to_string(), settings.call.clone());
    let started = std::time::Instant::now();
    let compiled =
        tokio::task::spawn_blocking(move || Guest::compile(&runtime, &module, &bytes, call))
            .await
            .map_err(|e| RegistryError::Read {
                path: path.to_path_buf(),
                cause: format!("compilation task failed: {e}"),
            })?;
    let guest = compiled.map_err(|error| RegistryError::Load {
        path: path.to_path_buf(),
        error,
    })?;
    tracing::info!(module = %name, elapsed_ms = started.elapsed().as_millis() as u64, "module loaded");
    Ok(guest)
}

/// Why a scan's answer was not taken.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// The call failed or the module returned an error.
    #[error(transparent)]
    Call(#[from] crate::runtime::CallError),
    /// The answer breaks the output policy.
    #[error(transparent)]
    Policy(#[from] policy::PolicyError),
}

/// Runs `scan` and judges its answer by the grants the call ran with (as an
/// allocation is judged), naming each kind's resource by `settings`; then, when
/// the module exports it, `describe` for every device scanned, judged too.
///
/// # Errors
/// [`ScanError`]: either call failed or its answer breaks a rule.
pub async fn scan(
    guest: &Guest,
    settings: &ModuleSettings,
) -> Result<Vec<ScannedResource>, ScanError> {
    let call_settings = guest.settings();
    let kinds = guest.scan().await?;
    let mut scanned = policy::scan(
        guest.name(),
        |kind| settings.resource_name(kind),
        &call_settings.grants,
        kinds,
    )?;
    if guest.exports().describe {
        describe(guest, &mut scanned).await?;
    }
    Ok(scanned)
}

/// Fills each resource's `details` from one `describe` call for every device.
async fn describe(guest: &Guest, scanned: &mut [ScannedResource]) -> Result<(), ScanError> {
    let asked: Vec<DeviceRef> = scanned
        .iter()
        .flat_map(|resource| {
            resource.devices.devices().iter().map(|device| DeviceRef {
                kind: resource.kind.clone(),
                id: device.id.clone(),
            })
        })
        .collect();
    let answer = guest.describe(&asked).await?;
    let mut details = policy::details(guest.name(), &asked, answer)?.into_iter();
    for resource in scanned {
        for device in resource.devices.devices() {
            if let Some(described) = details.next() {
                resource.details.insert(device.id.clone(), described);
            }
        }
    }
    Ok(())
}

/// The whole load: [`compile`], then the first [`scan`].
///
/// # Errors
/// [`RegistryError::Load`] or [`RegistryError::FirstScan`].
pub async fn load(
    runtime: &Arc<Runtime>,
    name: &str,
    path: &Path,
    bytes: Arc<[u8]>,
    settings: &ModuleSettings,
) -> Result<(Guest, Vec<ScannedResource>), RegistryError> {
    let guest = compile(runtime, name, path, bytes, settings).await?;
    let scanned = scan(&guest, settings)
        .await
        .map_err(|error| RegistryError::FirstScan {
            path: path.to_path_buf(),
            error,
        })?;
    Ok((guest, scanned))
}
