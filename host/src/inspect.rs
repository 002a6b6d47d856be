//! `validate` and `allocate`: one module file judged the way the host judges it,
//! without serving it. Operators and CI run these before putting a module in the
//! modules directory.
//!
//! Every step is the host's own code, not a copy of its rules: the manifest is
//! parsed by [`manifest::parse`] over the same flags, the file is compiled and
//! loaded by the registry's own load path ([`load`]: compiled and checked
//! against our world, `scan` run in the same sandbox with the manifest's
//! limits, configuration and grants, its answer judged by the output policy);
//! an allocation is checked against the resource's snapshot as the serving host
//! builds it and answered through the same [`GuestBackend`], so the requested
//! ids are checked as kubelet's Allocate checks them and the answer is judged
//! by the output policy. Reports print domain values; only the gRPC code
//! kubelet would get is asked of the device-plugin frontend.
//!
//! Reports go to any [`Write`], as text or as one JSON document; the caller
//! (`main`) turns an [`InspectError`] into the exit code. Reads only the module
//! file and its manifest; never touches the kubelet directory, the cache, or
//! anything a serving host uses.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use wasmtime::component::types::ComponentItem;

use crate::cdi::{CdiDir, CdiError, CdiNames, Spec};
use crate::config::{AllocateArgs, DeviceIds, ModuleFileArgs, ValidateArgs};
use crate::domain::{ContainerAllocation, ResourceName};
use crate::kubelet::deviceplugin::server;
use crate::metrics::Metrics;
use crate::policy::{PolicyError, ScannedResource};
use crate::registry::RegistryError;
use crate::registry::backend::GuestBackend;
use crate::registry::load::{self, ScanError};
use crate::registry::manifest::{self, ManifestError, ModuleSettings};
use crate::registry::resource::{build_snapshot, spec_of};
use crate::registry::watch::{MAX_MANIFEST_BYTES, MAX_MODULE_BYTES};
use crate::runtime::cache::content_hash;
use crate::runtime::{CallError, CallFailure, Guest, LoadError, Runtime, RuntimeError};
use crate::snapshot::SnapshotParts;

/// Why the host would not serve a module, or not answer an allocation, or why
/// the check could not run. One line, naming the file, the call or the rule.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The module file cannot be read.
    #[error("{}: cannot read: {message}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The module file is larger than the host reads.
    #[error(
        "{}: {bytes} bytes is more than the {} MiB allowed",
        path.display(),
        max / (1024 * 1024)
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        bytes: u64,
        /// The most the host reads.
        max: u64,
    },
    /// The manifest cannot be read or is refused.
    #[error("{0}")]
    Manifest(ManifestError),
    /// The file is not a module of this host's world.
    #[error("{}: {error}", path.display())]
    Load {
        /// The module file.
        path: PathBuf,
        /// Why.
        error: LoadError,
    },
    /// The wasm runtime could not start.
    #[error("{0}")]
    Runtime(RuntimeError),
    /// `scan` returned an error, trapped, ran out of time or memory.
    #[error("first scan failed: {0}")]
    Scan(CallError),
    /// `scan`'s answer breaks the output policy.
    #[error("first scan refused by the output policy: {0}")]
    ScanPolicy(PolicyError),
    /// A resource with `cdi` on would get no CDI spec: its name is not a CDI
    /// kind, or two of its devices map to one CDI name.
    #[error("{0}")]
    Cdi(CdiError),
    /// `--resource` names no resource the module reports.
    #[error("module {module} reports no resource or kind `{resource}`; it reports {known}")]
    UnknownResource {
        /// The module.
        module: String,
        /// What was asked for.
        resource: String,
        /// What it reports.
        known: String,
    },
    /// The host's Allocate would fail: a requested id is unknown, unhealthy or
    /// repeated, the module failed, or its answer breaks the output policy.
    #[error("Allocate would fail with {}: {message}", grpc_code_name(*code))]
    Allocate {
        /// The gRPC code kubelet would get.
        code: tonic::Code,
        /// The message kubelet would get.
        message: String,
    },
    /// The report could not be written.
    #[error("cannot write the report: {0}")]
    Output(io::Error),
}

impl InspectError {
    /// A stable name for the reason, as the JSON report's `error.kind` gives it.
    pub fn kind(&self) -> &'static str {
        match self {
            InspectError::Read { .. } => "read",
            InspectError::TooLarge { .. } => "too-large",
            InspectError::Manifest(_) => "manifest",
            InspectError::Load { error, .. } => match error {
                LoadError::NotWasm => "not-wasm",
                LoadError::CoreModule => "core-module",
                LoadError::Invalid(_) => "invalid-component",
                LoadError::UnsupportedImports(_) => "unsupported-imports",
                LoadError::Incompatible(_) => "incompatible",
            },
            InspectError::Runtime(_) => "runtime",
            InspectError::Scan(CallError::Module { .. }) => "module-error",
            InspectError::Scan(CallError::Failed { failure, .. }) => match failure {
                CallFailure::Deadline(_) => "deadline",
                CallFailure::OutOfMemory(_) => "out-of-memory",
                CallFailure::Trap(_) => "trap",
            },
            InspectError::ScanPolicy(_) => "policy",
            InspectError::Cdi(_) => "cdi",
            InspectError::UnknownResource { .. } => "unknown-resource",
            InspectError::Allocate { .. } => "allocate-refused",
            InspectError::Output(_) => "output",
        }
    }
}

impl InspectError {
    /// The message on one line, for stderr. Only a trap's message has more: a
    /// wasm backtrace, which the JSON report keeps.
    pub fn summary(&self) -> String {
        let message = self.to_string();
        match message.split_once('\n') {
            None => message,
            Some((first, _)) => format!(
                "{} (full message with --json)",
                first.trim_end().trim_end_matches(':')
            ),
        }
    }
}

/// kubelet's name of a gRPC code (`InvalidArgument`), as the JSON report gives it.
fn grpc_code_name(code: tonic::Code) -> String {
    format!("{code:?}")
}

/// Checks `args.target` as the host would load it, and writes what it found to
/// `out` (text, or JSON with `--json`, also on failure).
///
/// # Errors
/// [`InspectError`]: why the host would refuse the module (or the report could
/// not be written).
pub async fn validate(args: &ValidateArgs, out: &mut impl Write) -> Result<(), InspectError> {
    let target = &args.target;
    let mut report = ValidateReport {
        ok: false,
        file: FileReport::new(target),
        imports: None,
        exports: None,
        resources: None,
        error: None,
    };
    let result = async {
        let loaded = load(target, &mut report.file).await?;
        let engine = loaded.runtime.engine();
        let ty = loaded.guest.component().component_type();
        report.imports = Some(ty.imports(engine).map(Item::new).collect());
        report.exports = Some(ty.exports(engine).map(Item::new).collect());
        let scanned = first_scan(&loaded).await?;
        report.resources = Some(
            scanned
                .iter()
                .map(|r| {
                    let cdi = cdi_report(r, &loaded.settings, &target.cdi_dir)?;
                    Ok(ResourceReport::new(
                        r,
                        &loaded.settings,
                        cdi.map(|(c, _)| c),
                    ))
                })
                .collect::<Result<_, InspectError>>()?,
        );
        Ok(())
    }
    .await;
    if let Err(err) = &result {
        report.error = Some(ErrorReport::new(err));
    }
    report.ok = result.is_ok();
    finish(target.json, out, &report, result, validate_text)
}

/// Dry-runs `args`' Allocate through the module as the host would answer it,
/// and writes what the containers would get to `out` (text, or JSON with
/// `--json`, also on failure).
///
/// # Errors
/// [`InspectError`]: why the host would refuse the module or fail the Allocate
/// (or the report could not be written).
pub async fn allocate(args: &AllocateArgs, out: &mut impl Write) -> Result<(), InspectError> {
    let target = &args.target;
    let mut report = AllocateReport {
        ok: false,
        file: FileReport::new(target),
        resource: None,
        kind: None,
        cdi: None,
        containers: None,
        error: None,
    };
    let result = async {
        let loaded = load(target, &mut report.file).await?;
        let scanned = first_scan(&loaded).await?;
        let found = resource(&loaded, scanned, &args.resource)?;
        report.resource = Some(found.name.to_string());
        report.kind = Some(found.kind.clone());
        let cdi = cdi_report(&found, &loaded.settings, &target.cdi_dir)?;
        let names = cdi.as_ref().map(|(_, names)| names.clone());
        report.cdi = cdi.map(|(c, _)| c);
        let containers = allocate_through_host(loaded, found, names, &args.containers).await?;
        report.containers = Some(
            args.containers
                .iter()
                .zip(containers)
                .map(|(ids, c)| ContainerReport::new(ids, &c))
                .collect(),
        );
        Ok(())
    }
    .await;
    if let Err(err) = &result {
        report.error = Some(ErrorReport::new(err));
    }
    report.ok = result.is_ok();
    finish(target.json, out, &report, result, allocate_text)
}

/// A module compiled and checked, with the settings it runs with.
struct Loaded {
    /// Keeps the epoch ticker (call deadlines) running while the guest is used.
    runtime: Arc<Runtime>,
    guest: Guest,
    settings: ModuleSettings,
}

/// Reads the module and its manifest, and compiles the module as the host
/// does, recording in `file` what it read.
async fn load(target: &ModuleFileArgs, file: &mut FileReport) -> Result<Loaded, InspectError> {
    let bytes = read_bounded(&target.file, MAX_MODULE_BYTES).map_err(|e| match e {
        ReadFailure::Io(e) => InspectError::Read {
            path: target.file.clone(),
            message: e.to_string(),
        },
        ReadFailure::TooLarge(bytes) => InspectError::TooLarge {
            path: target.file.clone(),
            bytes,
            max: MAX_MODULE_BYTES,
        },
    })?;
    file.sha256 = Some(content_hash(&bytes));
    let base = target.settings();
    let manifest_path = manifest_path(target);
    file.manifest = manifest_path.as_deref().map(display);
    let settings = match &manifest_path {
        None => ModuleSettings::defaults(&base),
        Some(path) => {
            // Refused as the host refuses a manifest it cannot read: naming the
            // file, in the host's words.
            let unreadable = |message: String| {
                InspectError::Manifest(ManifestError {
                    file: path.clone(),
                    field: "file".into(),
                    message,
                })
            };
            let bytes = read_bounded(path, MAX_MANIFEST_BYTES).map_err(|e| {
                unreadable(match e {
                    ReadFailure::Io(e) => format!("cannot read: {e}"),
                    ReadFailure::TooLarge(bytes) => format!(
                        "{bytes} bytes is more than the {} MiB allowed",
                        MAX_MANIFEST_BYTES / (1024 * 1024)
                    ),
                })
            })?;
            let text = String::from_utf8(bytes).map_err(|_| unreadable("not UTF-8 text".into()))?;
            manifest::parse(path, &text, &base).map_err(InspectError::Manifest)?
        }
    };
    let runtime =
        Arc::new(Runtime::new(None, Arc::new(Metrics::new())).map_err(InspectError::Runtime)?);
    let guest = load::compile(
        &runtime,
        &module_name(&target.file),
        &target.file,
        bytes.into(),
        &settings,
    )
    .await
    .map_err(|err| match err {
        RegistryError::Load { path, error } => InspectError::Load { path, error },
        other => InspectError::Read {
            path: target.file.clone(),
            message: other.to_string(),
        },
    })?;
    file.hooks = Some(guest.exports().describe());
    Ok(Loaded {
        runtime,
        guest,
        settings,
    })
}

/// Runs `scan` and judges its answer, as the host's first scan does.
async fn first_scan(loaded: &Loaded) -> Result<Vec<ScannedResource>, InspectError> {
    load::scan(&loaded.guest, &loaded.settings)
        .await
        .map_err(|err| match err {
            ScanError::Call(err) => InspectError::Scan(err),
            ScanError::Policy(err) => InspectError::ScanPolicy(err),
        })
}

/// The resource `wanted` names: its full name, else the module's kind name, else
/// a name that the module's domain completes (`gpu` for `example.com/gpu`).
fn resource(
    loaded: &Loaded,
    mut scanned: Vec<ScannedResource>,
    wanted: &str,
) -> Result<ScannedResource, InspectError> {
    let bare = ResourceName::for_kind(&loaded.settings.domain, wanted).ok();
    let at = scanned
        .iter()
        .position(|r| r.name.as_str() == wanted)
        .or_else(|| scanned.iter().position(|r| r.kind == wanted))
        .or_else(|| scanned.iter().position(|r| Some(&r.name) == bare.as_ref()));
    match at {
        Some(at) => Ok(scanned.swap_remove(at)),
        None => Err(InspectError::UnknownResource {
            module: loaded.guest.name().to_string(),
            resource: wanted.to_string(),
            known: if scanned.is_empty() {
                "none".to_string()
            } else {
                scanned
                    .iter()
                    .map(|r| format!("{} (kind {})", r.name, r.kind))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        }),
    }
}

/// Allocates as the serving host would: the resource's snapshot as it would be
/// published, the request checked against it as kubelet's Allocate is, then
/// the module's allocation through the same backend, judged by the output
/// policy.
async fn allocate_through_host(
    loaded: Loaded,
    found: ScannedResource,
    cdi: Option<Arc<CdiNames>>,
    containers: &[DeviceIds],
) -> Result<Vec<ContainerAllocation>, InspectError> {
    // The runtime stays until the call is over: its ticker enforces deadlines.
    let Loaded {
        runtime: _runtime,
        guest,
        settings,
    } = loaded;
    let snapshot = build_snapshot(SnapshotParts {
        replicas: settings.resource(&found.kind).replicas,
        name: found.name,
        kind: found.kind,
        generation: 1,
        real: Arc::new(found.devices),
        allocations: Arc::new(found.allocations),
        cdi,
        backend: Arc::new(GuestBackend::new(Arc::new(guest))),
    });
    let ids: Vec<Vec<String>> = containers.iter().map(|c| c.0.clone()).collect();
    let plan = snapshot.plan(&ids).map_err(|err| InspectError::Allocate {
        code: server::request_code(&err),
        message: format!("resource {}: {err}", snapshot.name()),
    })?;
    snapshot
        .allocate(&plan)
        .await
        .map_err(|err| InspectError::Allocate {
            code: server::allocate_code(&err),
            message: err.to_string(),
        })
}

/// For a resource whose manifest turns `cdi` on, the spec the serving host
/// would write for its first scan, where, and its devices' CDI names (built by
/// the registry's own [`spec_of`]); `None` without `cdi`.
fn cdi_report(
    found: &ScannedResource,
    settings: &ModuleSettings,
    cdi_dir: &Path,
) -> Result<Option<(CdiReport, Arc<CdiNames>)>, InspectError> {
    if !settings.resource(&found.kind).resource_spec() {
        return Ok(None);
    }
    let built =
        spec_of(&found.name, &found.devices, &found.allocations).map_err(InspectError::Cdi)?;
    let report = CdiReport {
        path: display(&CdiDir::new(cdi_dir).path_of(&found.name)),
        names: built
            .names
            .iter()
            .map(|(id, name)| (id.clone(), name.clone()))
            .collect(),
        spec: built.spec,
    };
    Ok(Some((report, Arc::new(built.names))))
}

/// The module's name, as the host names it: the file name without `.wasm`.
fn module_name(file: &Path) -> String {
    file.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| display(file))
}

/// The manifest to use: `--manifest`, else `<name>.toml` beside the module when
/// it exists (as the host reads it), else none.
fn manifest_path(target: &ModuleFileArgs) -> Option<PathBuf> {
    if target.no_manifest {
        return None;
    }
    if let Some(path) = &target.manifest {
        return Some(path.clone());
    }
    let beside = target
        .file
        .with_file_name(format!("{}.toml", module_name(&target.file)));
    std::fs::symlink_metadata(&beside).is_ok().then_some(beside)
}

/// Why a file was not read.
#[derive(Debug)]
enum ReadFailure {
    Io(io::Error),
    TooLarge(u64),
}

/// Reads a file of at most `max` bytes; the size is checked before reading.
fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, ReadFailure> {
    let file = std::fs::File::open(path).map_err(ReadFailure::Io)?;
    let bytes = file.metadata().map_err(ReadFailure::Io)?.len();
    if bytes > max {
        return Err(ReadFailure::TooLarge(bytes));
    }
    let mut out = Vec::new();
    // `take`: a file that grows while being read is still bounded.
    file.take(max + 1)
        .read_to_end(&mut out)
        .map_err(ReadFailure::Io)?;
    match u64::try_from(out.len()) {
        Ok(read) if read <= max => Ok(out),
        Ok(read) => Err(ReadFailure::TooLarge(read)),
        Err(_) => Err(ReadFailure::TooLarge(u64::MAX)),
    }
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

// ---------------------------------------------------------------------------
// Reports. The JSON shape is documented in the README ("Checking a module");
// fields are only ever added. Every key is always present (null when the step
// that fills it was not reached).

/// The module file and manifest that were read.
#[derive(Debug, Serialize)]
struct FileReport {
    /// The module's name (the file name without `.wasm`).
    module: String,
    /// The module file, as given.
    file: String,
    /// The manifest used, if any.
    manifest: Option<String>,
    /// SHA-256 of the module file (the host's cache key and change detection).
    sha256: Option<String>,
    /// The functions the module exports and what the host supplies for the
    /// optional ones it does not ([`crate::runtime::Exports::describe`]).
    hooks: Option<String>,
}

impl FileReport {
    fn new(target: &ModuleFileArgs) -> Self {
        Self {
            module: module_name(&target.file),
            file: display(&target.file),
            manifest: None,
            sha256: None,
            hooks: None,
        }
    }
}

#[derive(Debug, Serialize)]
struct ValidateReport {
    ok: bool,
    #[serde(flatten)]
    file: FileReport,
    imports: Option<Vec<Item>>,
    exports: Option<Vec<Item>>,
    resources: Option<Vec<ResourceReport>>,
    error: Option<ErrorReport>,
}

#[derive(Debug, Serialize)]
struct AllocateReport {
    ok: bool,
    #[serde(flatten)]
    file: FileReport,
    resource: Option<String>,
    kind: Option<String>,
    /// The resource's CDI spec, with `cdi` on.
    cdi: Option<CdiReport>,
    containers: Option<Vec<ContainerReport>>,
    error: Option<ErrorReport>,
}

/// The CDI spec the serving host would write for a resource with `cdi` on.
#[derive(Debug, Serialize)]
struct CdiReport {
    /// Where (`--cdi-dir`).
    path: String,
    /// Per device id with a CDI device, its qualified name.
    names: BTreeMap<String, String>,
    /// The spec; `null` when no device has a device node or mount to inject
    /// (then no file is written and no name handed out).
    spec: Option<Spec>,
}

#[derive(Debug, Serialize)]
struct ErrorReport {
    kind: &'static str,
    message: String,
    grpc_code: Option<String>,
}

impl ErrorReport {
    fn new(err: &InspectError) -> Self {
        Self {
            kind: err.kind(),
            message: err.to_string(),
            grpc_code: match err {
                InspectError::Allocate { code, .. } => Some(grpc_code_name(*code)),
                _ => None,
            },
        }
    }
}

/// An import or export of the component.
#[derive(Debug, Serialize)]
struct Item {
    name: String,
    kind: &'static str,
}

impl Item {
    fn new((name, item): (&str, wasmtime::component::types::ComponentExtern<'_>)) -> Self {
        let kind = match item.ty {
            ComponentItem::ComponentFunc(_) => "function",
            ComponentItem::CoreFunc(_) => "core-function",
            ComponentItem::Module(_) => "module",
            ComponentItem::Component(_) => "component",
            ComponentItem::ComponentInstance(_) => "interface",
            ComponentItem::Type(_) => "type",
            ComponentItem::Resource(_) => "resource",
        };
        Self {
            name: name.to_string(),
            kind,
        }
    }
}

#[derive(Debug, Serialize)]
struct ResourceReport {
    name: String,
    kind: String,
    replicas: u32,
    /// With `cdi` on, the spec the host would write.
    cdi: Option<CdiReport>,
    devices: Vec<DeviceReport>,
}

impl ResourceReport {
    fn new(r: &ScannedResource, settings: &ModuleSettings, cdi: Option<CdiReport>) -> Self {
        Self {
            name: r.name.to_string(),
            kind: r.kind.clone(),
            replicas: settings.resource(&r.kind).replicas,
            cdi,
            devices: r
                .devices
                .devices()
                .iter()
                .map(|d| DeviceReport {
                    id: d.id.clone(),
                    health: d.health.as_str(),
                    numa_nodes: d.numa_nodes.clone(),
                    allocation: r
                        .allocations
                        .get(&d.id)
                        .map(AllocationReport::new)
                        .unwrap_or_default(),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize)]
struct DeviceReport {
    id: String,
    health: &'static str,
    numa_nodes: Vec<i64>,
    /// What a container given this device needs, as `scan` reported it.
    allocation: AllocationReport,
}

/// What one container gets (or, for a scanned device, needs).
#[derive(Debug, Default, Serialize)]
struct AllocationReport {
    envs: BTreeMap<String, String>,
    device_nodes: Vec<DeviceNodeReport>,
    mounts: Vec<MountReport>,
    annotations: BTreeMap<String, String>,
    cdi_devices: Vec<String>,
}

#[derive(Debug, Serialize)]
struct DeviceNodeReport {
    host_path: String,
    container_path: String,
    permissions: String,
}

#[derive(Debug, Serialize)]
struct MountReport {
    host_path: String,
    container_path: String,
    read_only: bool,
}

impl AllocationReport {
    /// What a container gets, or what a scanned device needs.
    fn new(a: &ContainerAllocation) -> Self {
        Self {
            envs: a.envs.clone(),
            device_nodes: a
                .devices
                .iter()
                .map(|d| DeviceNodeReport {
                    host_path: d.host_path.clone(),
                    container_path: d.container_path.clone(),
                    permissions: d.permissions.clone(),
                })
                .collect(),
            mounts: a
                .mounts
                .iter()
                .map(|m| MountReport {
                    host_path: m.host_path.clone(),
                    container_path: m.container_path.clone(),
                    read_only: m.read_only,
                })
                .collect(),
            annotations: a.annotations.clone(),
            cdi_devices: a.cdi_devices.clone(),
        }
    }

    fn is_empty(&self) -> bool {
        self.envs.is_empty()
            && self.device_nodes.is_empty()
            && self.mounts.is_empty()
            && self.annotations.is_empty()
            && self.cdi_devices.is_empty()
    }
}

#[derive(Debug, Serialize)]
struct ContainerReport {
    /// The ids requested for this container.
    device_ids: Vec<String>,
    #[serde(flatten)]
    allocation: AllocationReport,
}

impl ContainerReport {
    fn new(ids: &DeviceIds, allocation: &ContainerAllocation) -> Self {
        Self {
            device_ids: ids.0.clone(),
            allocation: AllocationReport::new(allocation),
        }
    }
}

/// Writes `report` as JSON (always) or as text (when `result` is a success; a
/// failure is reported by the caller on stderr), then hands `result` back.
fn finish<R: Serialize, W: Write>(
    json: bool,
    out: &mut W,
    report: &R,
    result: Result<(), InspectError>,
    text: fn(&R, &mut W) -> io::Result<()>,
) -> Result<(), InspectError> {
    let written = if json {
        serde_json::to_writer_pretty(&mut *out, report)
            .map_err(io::Error::from)
            .and_then(|()| writeln!(out))
    } else if result.is_ok() {
        text(report, out)
    } else {
        Ok(())
    };
    let written = written.and_then(|()| out.flush());
    result?;
    written.map_err(InspectError::Output)
}

fn validate_text<W: Write>(r: &ValidateReport, out: &mut W) -> io::Result<()> {
    writeln!(
        out,
        "{}: the host would serve module `{}`",
        r.file.file, r.file.module
    )?;
    file_text(&r.file, out)?;
    for (label, items) in [("imports", &r.imports), ("exports", &r.exports)] {
        for (n, item) in items.iter().flatten().enumerate() {
            let label = if n == 0 { label } else { "" };
            writeln!(out, "  {label:<9} {} ({})", item.name, item.kind)?;
        }
    }
    let resources = r.resources.as_deref().unwrap_or_default();
    writeln!(out)?;
    if resources.is_empty() {
        return writeln!(out, "scan reported no devices");
    }
    let mut rows = vec![[
        "RESOURCE".to_string(),
        "KIND".into(),
        "ID".into(),
        "HEALTH".into(),
        "NUMA".into(),
        "DEVICE NODES".into(),
    ]];
    for resource in resources {
        if resource.devices.is_empty() {
            rows.push([
                resource.name.clone(),
                resource.kind.clone(),
                "(no devices)".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
        }
        for d in &resource.devices {
            rows.push([
                resource.name.clone(),
                resource.kind.clone(),
                d.id.clone(),
                d.health.to_string(),
                or_dash(d.numa_nodes.iter().map(i64::to_string)),
                or_dash(
                    d.allocation
                        .device_nodes
                        .iter()
                        .map(|n| format!("{}:{}:{}", n.host_path, n.container_path, n.permissions)),
                ),
            ]);
        }
    }
    table(out, &rows)?;
    let devices: usize = resources.iter().map(|r| r.devices.len()).sum();
    let unhealthy = resources
        .iter()
        .flat_map(|r| &r.devices)
        .filter(|d| d.health != "Healthy")
        .count();
    writeln!(
        out,
        "\n{} resource(s), {devices} device(s), {unhealthy} unhealthy",
        resources.len()
    )?;
    for resource in resources.iter().filter(|r| r.replicas > 1) {
        writeln!(
            out,
            "{}: each device advertised {} times, as <id>::0 to <id>::{}",
            resource.name,
            resource.replicas,
            resource.replicas - 1
        )?;
    }
    for resource in resources {
        if let Some(cdi) = &resource.cdi {
            cdi_text(&resource.name, cdi, out)?;
        }
    }
    Ok(())
}

/// The CDI spec of `resource`: where, each device's name, the spec itself.
fn cdi_text<W: Write>(resource: &str, cdi: &CdiReport, out: &mut W) -> io::Result<()> {
    writeln!(out, "\nCDI spec of {resource}: {}", cdi.path)?;
    let Some(spec) = &cdi.spec else {
        return writeln!(
            out,
            "  (none: no device has a device node or mount to inject, so no CDI name is handed out)"
        );
    };
    for (id, name) in &cdi.names {
        writeln!(out, "  {id}  ->  {name}")?;
    }
    let json = serde_json::to_string_pretty(spec).map_err(io::Error::from)?;
    for line in json.lines() {
        writeln!(out, "  {line}")?;
    }
    Ok(())
}

fn allocate_text<W: Write>(r: &AllocateReport, out: &mut W) -> io::Result<()> {
    writeln!(
        out,
        "{}: the host would answer Allocate for {} (kind {})",
        r.file.file,
        r.resource.as_deref().unwrap_or("-"),
        r.kind.as_deref().unwrap_or("-")
    )?;
    file_text(&r.file, out)?;
    for (n, c) in r.containers.iter().flatten().enumerate() {
        writeln!(out, "\ncontainer {n}: {}", c.device_ids.join(", "))?;
        allocation_text(&c.allocation, "  ", out)?;
    }
    if let (Some(resource), Some(cdi)) = (&r.resource, &r.cdi) {
        cdi_text(resource, cdi, out)?;
    }
    Ok(())
}

fn file_text<W: Write>(f: &FileReport, out: &mut W) -> io::Result<()> {
    writeln!(
        out,
        "  manifest  {}",
        f.manifest.as_deref().unwrap_or("none (the flags alone)")
    )?;
    writeln!(out, "  sha256    {}", f.sha256.as_deref().unwrap_or("-"))?;
    match &f.hooks {
        Some(hooks) => writeln!(out, "  hooks     {hooks}"),
        None => Ok(()),
    }
}

/// Prints what a container gets, one line per item, each line after `indent`
/// (what `allocate` prints, and the demo for each container it allocates).
///
/// # Errors
/// Writing failed.
pub fn print_allocation<W: Write>(
    allocation: &ContainerAllocation,
    indent: &str,
    out: &mut W,
) -> io::Result<()> {
    allocation_text(&AllocationReport::new(allocation), indent, out)
}

fn allocation_text<W: Write>(a: &AllocationReport, indent: &str, out: &mut W) -> io::Result<()> {
    if a.is_empty() {
        return writeln!(out, "{indent}(nothing)");
    }
    for (k, v) in &a.envs {
        writeln!(out, "{indent}env         {k}={v}")?;
    }
    for d in &a.device_nodes {
        writeln!(
            out,
            "{indent}device      {} -> {} ({})",
            d.host_path, d.container_path, d.permissions
        )?;
    }
    for m in &a.mounts {
        let ro = if m.read_only { " (ro)" } else { "" };
        writeln!(
            out,
            "{indent}mount       {} -> {}{ro}",
            m.host_path, m.container_path
        )?;
    }
    for (k, v) in &a.annotations {
        writeln!(out, "{indent}annotation  {k}={v}")?;
    }
    for name in &a.cdi_devices {
        writeln!(out, "{indent}cdi         {name}")?;
    }
    Ok(())
}

/// The items joined with `,`, or `-` when there are none.
fn or_dash(items: impl Iterator<Item = String>) -> String {
    let joined = items.collect::<Vec<_>>().join(",");
    if joined.is_empty() {
        "-".into()
    } else {
        joined
    }
}

/// Writes `rows` as columns two spaces apart; the last column is not padded.
fn table<W: Write, const N: usize>(out: &mut W, rows: &[[String; N]]) -> io::Result<()> {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns_and_leaves_the_last_unpadded() {
        let rows = [
            ["A".to_string(), "BB".into(), "C".into()],
            ["long".to_string(), "x".into(), "-".into()],
        ];
        let mut out = Vec::new();
        table(&mut out, &rows).expect("written");
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "A     BB  C\nlong  x   -\n"
        );
    }

    #[test]
    fn module_name_drops_the_wasm_extension() {
        assert_eq!(module_name(Path::new("/m/virtual.wasm")), "virtual");
        assert_eq!(module_name(Path::new("plain")), "plain");
    }

    #[test]
    fn the_manifest_beside_the_module_is_used_unless_told_otherwise() {
        let dir = tempfile::tempdir().expect("temp dir");
        let wasm = dir.path().join("m.wasm");
        let beside = dir.path().join("m.toml");
        let args = |extra: &[&str]| {
            let mut argv = vec!["wasm-device-plugin", "validate"];
            argv.extend_from_slice(extra);
            argv.push(wasm.to_str().expect("utf-8"));
            let cli = <crate::config::Cli as clap::Parser>::try_parse_from(argv).expect("parses");
            match cli.command {
                crate::config::Command::Validate(v) => v.target,
                other => panic!("not validate: {other:?}"),
            }
        };
        assert_eq!(manifest_path(&args(&[])), None);
        std::fs::write(&beside, "").expect("write");
        assert_eq!(manifest_path(&args(&[])), Some(beside.clone()));
        assert_eq!(manifest_path(&args(&["--no-manifest"])), None);
        assert_eq!(
            manifest_path(&args(&["--manifest", "/other.toml"])),
            Some(PathBuf::from("/other.toml"))
        );
    }

    #[test]
    fn reads_are_bounded_before_reading() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("big");
        std::fs::write(&path, [0u8; 11]).expect("write");
        assert!(matches!(
            read_bounded(&path, 10),
            Err(ReadFailure::TooLarge(11))
        ));
        assert_eq!(read_bounded(&path, 11).map(|b| b.len()).ok(), Some(11));
        assert!(matches!(
            read_bounded(&dir.path().join("missing"), 10),
            Err(ReadFailure::Io(_))
        ));
    }
}
