//! A loaded module: compiled once per module version into an `InstancePre`, then
//! each call runs one export (or, for an allocation, `allocate` then
//! `post-allocate` on the same instance).
//!
//! Only `scan` is required; which optional exports a module has is found at
//! load ([`Exports`]) and the host supplies the rest: no health call (the
//! registry takes health from scans), an allocation merged from the devices'
//! scan-time allocations ([`crate::merge`], made by the caller), no post-processing. A module with neither
//! `allocate` nor `post-allocate` is not instantiated for an Allocate at all.
//!
//! `scan` and `health` always run in a fresh instance (they read the granted
//! files, and run seldom). Allocations, which sit on kubelet's pod-admission
//! path, reuse a *warm* instance when one is kept: instantiating costs several
//! times the guest call itself (`BENCHMARKS.md`). An instance is kept only after
//! an allocation in which both exports returned (a value or the module's own
//! error), nothing was written to stdout or stderr and the memory cap was never
//! hit; it serves at most [`WARM_CALLS`] allocations within [`WARM_AGE`], and
//! only with the settings (limits, configuration, grants) it was made with. A
//! trap, a missed deadline, a dropped call, a new module version or an edited
//! manifest therefore always leads to a fresh instance.

use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, InstancePre};
use wasmtime::{Store, Trap};

use crate::gauge::Gauge;
use crate::metrics::{CallFailureKind, Function, ModuleMetrics};
use crate::runtime::bindings::{
    AllocateRequest, ContainerResponse, DeviceDetails, DeviceKind, DeviceRef, Health, ModuleError,
    PrepareRequest, UnprepareRequest,
};
use crate::runtime::engine::Runtime;
use crate::runtime::exports::{Exports, Funcs, Indices};
use crate::runtime::limits::{Call, CallSettings, HostState, arm, new_store};
use crate::runtime::{CallError, CallFailure, LoadError, PACKAGE, PACKAGE_VERSION};

/// The WASI 0.2 interfaces a module may import (sockets are not among them: a
/// module has no network), besides this host's own package.
pub const PROVIDED_IMPORTS: &[&str] = &[
    "wasi:io/",
    "wasi:clocks/",
    "wasi:random/",
    "wasi:cli/",
    "wasi:filesystem/",
];

/// The WASI version the host provides (any 0.2.x).
const WASI_VERSION: &str = "0.2.";

/// Whether a module built against `version` of our package runs here: the same
/// `0.minor` (semver-compatible, which is also how wasmtime's linker matches
/// the import to the host's definition) and no newer patch, which might import
/// functions this host lacks.
fn compatible(version: &str) -> bool {
    let parts = |v: &str| -> Option<(u64, u64, u64)> {
        let mut it = v.split('.').map(|p| p.parse::<u64>().ok());
        let parsed = (it.next()??, it.next()??, it.next()??);
        it.next().is_none().then_some(parsed)
    };
    match (parts(version), parts(PACKAGE_VERSION)) {
        (Some((0, minor, patch)), Some((0, our_minor, our_patch))) => {
            minor == our_minor && patch <= our_patch
        }
        _ => false,
    }
}

/// Refuses a component that imports an interface this host does not provide, or
/// an incompatible version of our package, naming each such import. (The
/// linker would also refuse most of these, with a less helpful message; WASI
/// sockets it would accept, as wasmtime links them whole.) Exports are checked
/// by [`Indices::new`].
fn check_world(engine: &wasmtime::Engine, component: &Component) -> Result<(), LoadError> {
    let ty = component.component_type();
    let mut foreign = Vec::new();
    for (name, item) in ty.imports(engine) {
        if matches!(item.ty, ComponentItem::Type(_)) {
            continue;
        }
        if let Some(rest) = name.strip_prefix(PACKAGE).and_then(|r| r.strip_prefix('/')) {
            let version = rest.split_once('@').map_or("", |(_, v)| v);
            if !compatible(version) {
                return Err(LoadError::Incompatible(format!(
                    "it imports `{name}`: built against {PACKAGE}@{}, this host implements {PACKAGE}@{PACKAGE_VERSION} (and runs modules built against an earlier 0.{}.x)",
                    if version.is_empty() {
                        "an unversioned package"
                    } else {
                        version
                    },
                    PACKAGE_VERSION.split('.').nth(1).unwrap_or("?"),
                )));
            }
            continue;
        }
        let wasi_02 = name
            .split_once('@')
            .is_some_and(|(_, version)| version.starts_with(WASI_VERSION));
        if !(wasi_02 && PROVIDED_IMPORTS.iter().any(|p| name.starts_with(p))) {
            foreign.push(format!("`{name}`"));
        }
    }
    if !foreign.is_empty() {
        return Err(LoadError::UnsupportedImports(foreign.join(", ")));
    }
    Ok(())
}

/// The call the host's own `allocate` is reported as.
const DEFAULT_ALLOCATE: &str = "allocate (host default)";

/// What a call of an export that [`Exports`] says is missing would return;
/// `Guest::allocate` checks first, so this is a failure of the host, reported
/// as one rather than a panic in a long-lived task.
fn unreachable_export<T>(name: &str) -> wasmtime::Result<T> {
    Err(wasmtime::format_err!(
        "host bug: called `{name}`, which the module does not export"
    ))
}

/// Most allocations one warm instance answers before it is dropped.
pub const WARM_CALLS: u32 = 1000;
/// Longest a warm instance is used after it was made: a granted directory opened
/// then is at most this stale.
pub const WARM_AGE: Duration = Duration::from_secs(10);
/// Most warm instances kept per module version (one per allocation that was
/// running at once, up to this).
const WARM_MAX: usize = 4;

/// An instance kept for the next allocation, in its store.
struct Warm {
    store: Store<HostState>,
    instance: Funcs,
    made: Instant,
    calls: u32,
}

/// A compiled module, ready to be called.
pub struct Guest {
    name: Arc<str>,
    engine: wasmtime::Engine,
    pre: InstancePre<HostState>,
    /// Where the exports are; which are present never changes for a version.
    indices: Indices,
    settings: RwLock<Arc<CallSettings>>,
    /// Instances that answered an allocation and may answer another.
    warm: Mutex<Vec<Warm>>,
    calls: Gauge,
    metrics: ModuleMetrics,
}

impl Guest {
    /// Compiles `bytes` (or reads them from the compiled-module cache) and checks
    /// that they are a component of our package: its imports provided, `scan`
    /// exported, and each optional export present of the world's type.
    /// CPU-bound (tens of milliseconds when it compiles): call it off the async
    /// executor.
    ///
    /// # Errors
    /// [`LoadError`] saying why the bytes are not a usable module.
    pub fn compile(
        runtime: &Runtime,
        name: &str,
        bytes: &[u8],
        settings: CallSettings,
    ) -> Result<Self, LoadError> {
        let component = runtime.component(name, bytes)?;
        if let Err(err) = check_world(runtime.engine(), &component) {
            runtime.count_refused();
            return Err(err);
        }
        let incompatible = |e: wasmtime::Error| {
            runtime.count_refused();
            LoadError::Incompatible(format!("{e:#}"))
        };
        let pre = runtime
            .linker()
            .instantiate_pre(&component)
            .map_err(incompatible)?;
        let indices = Indices::new(&pre).inspect_err(|_| runtime.count_refused())?;
        Ok(Self {
            name: name.into(),
            engine: runtime.engine().clone(),
            pre,
            indices,
            settings: RwLock::new(Arc::new(settings)),
            warm: Mutex::new(Vec::new()),
            calls: runtime.calls().clone(),
            metrics: runtime.metrics().module(name),
        })
    }

    /// The module's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The compiled component (for tools that describe its imports and exports).
    pub fn component(&self) -> &Component {
        self.pre.component()
    }

    /// Which optional functions the module exports; the host supplies the
    /// others (see [`Exports`]).
    pub fn exports(&self) -> Exports {
        self.indices.exports()
    }

    /// Replaces the settings (limits, configuration, grants) that later calls
    /// see; calls in flight keep theirs.
    pub fn set_settings(&self, settings: CallSettings) {
        *self.settings.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(settings);
    }

    /// The settings calls run with now.
    pub fn settings(&self) -> Arc<CallSettings> {
        self.settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn store(&self, call: Call, settings: &Arc<CallSettings>) -> Store<HostState> {
        new_store(&self.engine, self.name.clone(), call, settings)
    }

    async fn instantiate(
        &self,
        store: &mut Store<HostState>,
        call: Call,
    ) -> Result<Funcs, CallError> {
        let started = Instant::now();
        let instance = self
            .pre
            .instantiate_async(&mut *store)
            .await
            .and_then(|instance| self.indices.load(&mut *store, &instance))
            .map_err(|e| self.failure(call, store, e))?;
        self.metrics.instantiated(started.elapsed());
        Ok(instance)
    }

    /// Runs one export on `store`, timing it (a value or the module's own error
    /// counts as returned; a failure is counted as such by `failure`).
    async fn timed<T>(
        &self,
        function: Function,
        run: impl Future<Output = wasmtime::Result<T>>,
    ) -> wasmtime::Result<T> {
        let started = Instant::now();
        let result = run.await;
        if result.is_ok() {
            self.metrics.called(function, started.elapsed());
        }
        result
    }

    /// Turns a wasmtime error into what went wrong, by the trap code and the
    /// limiter's record, never by the message text.
    fn failure(&self, call: Call, store: &Store<HostState>, err: wasmtime::Error) -> CallError {
        store.data().flush_stdio();
        let limits = &store.data().settings().limits;
        let failure = if store.data().memory_exceeded() {
            CallFailure::OutOfMemory(limits.memory_bytes)
        } else {
            match err.downcast_ref::<Trap>() {
                Some(Trap::Interrupt) => CallFailure::Deadline(limits.deadline(call)),
                Some(trap) => CallFailure::Trap(format!("{trap}: {err:#}")),
                None => CallFailure::Trap(format!("{err:#}")),
            }
        };
        CallError::Failed {
            module: self.name.to_string(),
            call: call.as_str(),
            failure,
        }
    }

    fn module_error(&self, call: Call, error: ModuleError) -> CallError {
        CallError::Module {
            module: self.name.to_string(),
            call: call.as_str(),
            error,
        }
    }

    /// Runs `scan`.
    ///
    /// # Errors
    /// [`CallError`]: the module returned an error, trapped, ran out of time or memory.
    pub async fn scan(&self) -> Result<Vec<DeviceKind>, CallError> {
        let call = Call::Scan;
        let settings = self.settings();
        self.bounded(call, &settings, async {
            let mut store = self.store(call, &settings);
            let instance = self.instantiate(&mut store, call).await?;
            let result = self
                .timed(Function::Scan, instance.scan(&mut store))
                .await
                .map_err(|e| self.failure(call, &store, e))?;
            store.data().flush_stdio();
            result.map_err(|e| self.module_error(call, e))
        })
        .await
    }

    /// Runs `health` for `devices`. Callers check [`Exports::health`] first: a
    /// module without `health` gets its health from scans.
    ///
    /// # Errors
    /// As [`Guest::scan`]; [`ModuleError::Internal`] when the module does not
    /// export `health` (without instantiating it).
    pub async fn health(&self, devices: &[DeviceRef]) -> Result<Vec<Health>, CallError> {
        let call = Call::Health;
        if !self.exports().health {
            return Err(self.module_error(
                call,
                ModuleError::Internal(
                    "the module does not export `health`; its health comes from scan".into(),
                ),
            ));
        }
        let settings = self.settings();
        self.bounded(call, &settings, async {
            let mut store = self.store(call, &settings);
            let instance = self.instantiate(&mut store, call).await?;
            let result = self
                .timed(Function::Health, async {
                    instance
                        .health(&mut store, devices)
                        .await
                        .unwrap_or_else(|| unreachable_export("health"))
                })
                .await
                .map_err(|e| self.failure(call, &store, e))?;
            store.data().flush_stdio();
            result.map_err(|e| self.module_error(call, e))
        })
        .await
    }

    /// Runs `allocate`, then `post-allocate` with its answer, on one instance (a
    /// warm one when one is kept for `settings`, see the module docs); the
    /// deadline covers both. `settings` is what [`Guest::settings`] returned, so
    /// that the caller judges the answer by the grants the call ran with.
    ///
    /// `host_answer` stands in for `allocate`'s answer when the module does not
    /// export it (the caller's merge of the devices' scan-time allocations,
    /// [`crate::merge`]), and is ignored when it does; without `post-allocate`
    /// that answer is final, and no instance is made.
    ///
    /// # Errors
    /// As [`Guest::scan`], for either call; [`ModuleError::Internal`] (a host
    /// bug) when the module exports no `allocate` and no `host_answer` was given.
    pub async fn allocate(
        &self,
        settings: &Arc<CallSettings>,
        request: &AllocateRequest,
        host_answer: Option<Vec<ContainerResponse>>,
    ) -> Result<Vec<ContainerResponse>, CallError> {
        let call = Call::Allocate;
        let exports = self.exports();
        let merged = if exports.allocate {
            None
        } else {
            let Some(merged) = host_answer else {
                return Err(CallError::Module {
                    module: self.name.to_string(),
                    call: DEFAULT_ALLOCATE,
                    error: ModuleError::Internal(
                        "host bug: the module exports no `allocate` and the host gave no answer of its own"
                            .into(),
                    ),
                });
            };
            if !exports.post_allocate {
                return Ok(merged);
            }
            Some(merged)
        };
        self.bounded(call, settings, async {
            let mut warm = self.warm_instance(call, settings).await?;
            // A failure returns early and drops the instance with its store.
            let store = &mut warm.store;
            let response = match merged {
                Some(merged) => Ok(merged),
                None => self
                    .timed(Function::Allocate, async {
                        warm.instance
                            .allocate(&mut *store, request)
                            .await
                            .unwrap_or_else(|| unreachable_export("allocate"))
                    })
                    .await
                    .map_err(|e| self.failure(call, store, e))?,
            };
            let result = match response {
                Ok(response) if exports.post_allocate => self
                    .timed(Function::PostAllocate, async {
                        warm.instance
                            .post_allocate(&mut *store, request, &response)
                            .await
                            .unwrap_or_else(|| unreachable_export("post-allocate"))
                    })
                    .await
                    .map_err(|e| self.failure(call, store, e))?,
                other => other,
            };
            store.data().flush_stdio();
            warm.calls += 1;
            self.keep_warm(warm);
            result.map_err(|e| self.module_error(call, e))
        })
        .await
    }

    /// Runs `describe` for `devices` (the devices a scan just reported), in a
    /// fresh instance. Callers check [`Exports::describe`] first.
    ///
    /// # Errors
    /// As [`Guest::scan`]; [`ModuleError::Internal`] when the module does not
    /// export `describe` (without instantiating it).
    pub async fn describe(&self, devices: &[DeviceRef]) -> Result<Vec<DeviceDetails>, CallError> {
        let call = Call::Describe;
        if !self.exports().describe {
            return Err(self.module_error(
                call,
                ModuleError::Internal("host bug: the module does not export `describe`".into()),
            ));
        }
        let settings = self.settings();
        self.bounded(call, &settings, async {
            let mut store = self.store(call, &settings);
            let instance = self.instantiate(&mut store, call).await?;
            let result = self
                .timed(Function::Describe, async {
                    instance
                        .describe(&mut store, devices)
                        .await
                        .unwrap_or_else(|| unreachable_export("describe"))
                })
                .await
                .map_err(|e| self.failure(call, &store, e))?;
            store.data().flush_stdio();
            result.map_err(|e| self.module_error(call, e))
        })
        .await
    }

    /// Runs `prepare` on an instance as an allocation does (a warm one when
    /// one is kept for `settings`). Callers check [`Exports::prepare`] first.
    ///
    /// # Errors
    /// As [`Guest::scan`]; [`ModuleError::Internal`] when the module does not
    /// export `prepare`.
    pub async fn prepare(
        &self,
        settings: &Arc<CallSettings>,
        request: &PrepareRequest,
    ) -> Result<Vec<ContainerResponse>, CallError> {
        let call = Call::Prepare;
        if !self.exports().prepare {
            return Err(self.module_error(
                call,
                ModuleError::Internal("host bug: the module does not export `prepare`".into()),
            ));
        }
        self.bounded(call, settings, async {
            let mut warm = self.warm_instance(call, settings).await?;
            let store = &mut warm.store;
            let result = self
                .timed(Function::Prepare, async {
                    warm.instance
                        .prepare(&mut *store, request)
                        .await
                        .unwrap_or_else(|| unreachable_export("prepare"))
                })
                .await
                .map_err(|e| self.failure(call, store, e))?;
            store.data().flush_stdio();
            warm.calls += 1;
            self.keep_warm(warm);
            result.map_err(|e| self.module_error(call, e))
        })
        .await
    }

    /// Runs `unprepare` in a fresh instance (it runs seldom, off the pod-start
    /// path). Callers check [`Exports::unprepare`] first.
    ///
    /// # Errors
    /// As [`Guest::scan`]; [`ModuleError::Internal`] when the module does not
    /// export `unprepare`.
    pub async fn unprepare(&self, request: &UnprepareRequest) -> Result<(), CallError> {
        let call = Call::Unprepare;
        if !self.exports().unprepare {
            return Err(self.module_error(
                call,
                ModuleError::Internal("host bug: the module does not export `unprepare`".into()),
            ));
        }
        let settings = self.settings();
        self.bounded(call, &settings, async {
            let mut store = self.store(call, &settings);
            let instance = self.instantiate(&mut store, call).await?;
            let result = self
                .timed(Function::Unprepare, async {
                    instance
                        .unprepare(&mut store, request)
                        .await
                        .unwrap_or_else(|| unreachable_export("unprepare"))
                })
                .await
                .map_err(|e| self.failure(call, &store, e))?;
            store.data().flush_stdio();
            result.map_err(|e| self.module_error(call, e))
        })
        .await
    }

    /// A warm instance kept for `settings`, armed for `call`, or a new one.
    ///
    /// # Errors
    /// The new instance could not be made.
    async fn warm_instance(
        &self,
        call: Call,
        settings: &Arc<CallSettings>,
    ) -> Result<Warm, CallError> {
        if let Some(mut warm) = self.take_warm(settings) {
            arm(&mut warm.store, call);
            return Ok(warm);
        }
        let mut store = self.store(call, settings);
        let instance = self.instantiate(&mut store, call).await?;
        Ok(Warm {
            store,
            instance,
            made: Instant::now(),
            calls: 0,
        })
    }

    /// A warm instance made with `settings`, if one is kept; warm instances made
    /// with other settings are dropped.
    fn take_warm(&self, settings: &Arc<CallSettings>) -> Option<Warm> {
        let mut warm = self.warm.lock().unwrap_or_else(|e| e.into_inner());
        warm.retain(|w| {
            Arc::ptr_eq(w.store.data().settings_arc(), settings) && w.made.elapsed() < WARM_AGE
        });
        warm.pop()
    }

    /// Keeps `warm` (made with the settings it ran with) for a later
    /// allocation, unless it has served its share, is too old, wrote to stdio or
    /// was refused memory.
    fn keep_warm(&self, warm: Warm) {
        let state = warm.store.data();
        if warm.calls >= WARM_CALLS
            || warm.made.elapsed() >= WARM_AGE
            || state.memory_exceeded()
            || state.wrote_stdio()
        {
            return;
        }
        let mut kept = self.warm.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() < WARM_MAX {
            kept.push(warm);
        }
    }

    /// Runs one call under its deadline as measured by the host's clock too. The
    /// epoch deadline stops a guest that computes; this stops one that waits in
    /// a host function (a WASI sleep or poll), where no wasm runs to trap.
    async fn bounded<T>(
        &self,
        call: Call,
        settings: &CallSettings,
        run: impl Future<Output = Result<T, CallError>>,
    ) -> Result<T, CallError> {
        let deadline = settings.limits.deadline(call);
        // Counted out when the call ends, or when its future is dropped (kubelet
        // hung up, the module was removed).
        let _running = self.calls.enter();
        let result = tokio::time::timeout(deadline, run)
            .await
            .unwrap_or_else(|_| {
                Err(CallError::Failed {
                    module: self.name.to_string(),
                    call: call.as_str(),
                    failure: CallFailure::Deadline(deadline),
                })
            });
        if let Err(err) = &result {
            let reason = match err {
                CallError::Module { .. } => CallFailureKind::Error,
                CallError::Failed { failure, .. } => match failure {
                    CallFailure::Deadline(_) => CallFailureKind::Deadline,
                    CallFailure::OutOfMemory(_) => CallFailureKind::Memory,
                    CallFailure::Trap(_) => CallFailureKind::Trap,
                },
            };
            self.metrics.failed(function_of(call), reason);
        }
        result
    }
}

/// The export a call is named after (an allocation's failure counts against
/// `allocate`, whichever of its two exports failed).
fn function_of(call: Call) -> Function {
    match call {
        Call::Scan => Function::Scan,
        Call::Health => Function::Health,
        Call::Allocate => Function::Allocate,
        Call::Describe => Function::Describe,
        Call::Prepare => Function::Prepare,
        Call::Unprepare => Function::Unprepare,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_of_this_or_an_earlier_patch_of_the_package_are_compatible() {
        assert_eq!(PACKAGE_VERSION, "0.2.2");
        assert!(compatible("0.2.0"));
        assert!(compatible("0.2.1"));
        assert!(compatible("0.2.2"));
    }

    #[test]
    fn modules_of_a_newer_patch_or_another_minor_are_not() {
        for version in ["0.2.3", "0.1.0", "0.3.0", "1.0.0", "0.2", "0.2.0-rc1", ""] {
            assert!(!compatible(version), "{version}");
        }
    }
}
