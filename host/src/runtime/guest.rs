//! A loaded module: compiled once per module version into an `InstancePre`, then
//! each call instantiates into a fresh store and runs one export (or, for an
//! allocation, `allocate` then `post-allocate` on the same instance).

use std::sync::{Arc, RwLock};

use wasmtime::{Store, Trap};

use crate::runtime::bindings::{
    AllocateRequest, ContainerResponse, DeviceKind, DevicePlugin, DevicePluginPre, DeviceRef,
    Health, ModuleError,
};
use crate::runtime::engine::Runtime;
use crate::runtime::limits::{Call, CallSettings, HostState, new_store};
use crate::runtime::{CallError, CallFailure, LoadError};

/// A compiled module, ready to be called.
pub struct Guest {
    name: Arc<str>,
    engine: wasmtime::Engine,
    pre: DevicePluginPre<HostState>,
    settings: RwLock<Arc<CallSettings>>,
}

impl Guest {
    /// Compiles `bytes` (or reads them from the compiled-module cache) and checks
    /// that they are a component of our world. CPU-bound (tens of milliseconds
    /// when it compiles): call it off the async executor.
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
        let incompatible = |e: wasmtime::Error| {
            runtime.count_refused();
            LoadError::Incompatible(format!("{e:#}"))
        };
        let instance_pre = runtime
            .linker()
            .instantiate_pre(&component)
            .map_err(incompatible)?;
        let pre = DevicePluginPre::new(instance_pre).map_err(incompatible)?;
        Ok(Self {
            name: name.into(),
            engine: runtime.engine().clone(),
            pre,
            settings: RwLock::new(Arc::new(settings)),
        })
    }

    /// The module's name.
    pub fn name(&self) -> &str {
        &self.name
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

    fn store(&self, call: Call) -> Store<HostState> {
        new_store(&self.engine, self.name.clone(), call, &self.settings())
    }

    async fn instantiate(
        &self,
        store: &mut Store<HostState>,
        call: Call,
    ) -> Result<DevicePlugin, CallError> {
        self.pre
            .instantiate_async(&mut *store)
            .await
            .map_err(|e| self.failure(call, store, e))
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
                Some(Trap::Interrupt) => CallFailure::Deadline(match call {
                    Call::Scan | Call::Health => limits.scan_deadline,
                    Call::Allocate => limits.allocate_deadline,
                }),
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
        let mut store = self.store(call);
        let instance = self.instantiate(&mut store, call).await?;
        let result = instance
            .call_scan(&mut store)
            .await
            .map_err(|e| self.failure(call, &store, e))?;
        store.data().flush_stdio();
        result.map_err(|e| self.module_error(call, e))
    }

    /// Runs `health` for `devices`.
    ///
    /// # Errors
    /// As [`Guest::scan`].
    pub async fn health(&self, devices: &[DeviceRef]) -> Result<Vec<Health>, CallError> {
        let call = Call::Health;
        let mut store = self.store(call);
        let instance = self.instantiate(&mut store, call).await?;
        let result = instance
            .call_health(&mut store, devices)
            .await
            .map_err(|e| self.failure(call, &store, e))?;
        store.data().flush_stdio();
        result.map_err(|e| self.module_error(call, e))
    }

    /// Runs `allocate`, then `post-allocate` with its answer, on one instance; the
    /// deadline covers both.
    ///
    /// # Errors
    /// As [`Guest::scan`], for either call.
    pub async fn allocate(
        &self,
        request: &AllocateRequest,
    ) -> Result<Vec<ContainerResponse>, CallError> {
        let call = Call::Allocate;
        let mut store = self.store(call);
        let instance = self.instantiate(&mut store, call).await?;
        let response = instance
            .call_allocate(&mut store, request)
            .await
            .map_err(|e| self.failure(call, &store, e))?
            .map_err(|e| self.module_error(call, e))?;
        let result = instance
            .call_post_allocate(&mut store, request, &response)
            .await
            .map_err(|e| self.failure(call, &store, e))?;
        store.data().flush_stdio();
        result.map_err(|e| self.module_error(call, e))
    }
}
