//! Which of the world's functions a module exports, found and type-checked once
//! at load, and the typed calls into an instance's exports.
//!
//! Only `scan` is required (`wit/device-plugin.wit`); `health`, `allocate`,
//! `post-allocate` and, since 0.2.2, the DRA exports `describe`, `prepare` and
//! `unprepare` are optional and the host supplies what a module leaves out
//! (see [`Exports`]). Spin detects which handler a component implements from its
//! `InstancePre` the same way (`HandlerType::from_instance_pre`). This replaces
//! `bindgen!`'s `DevicePluginPre`, which insists on every export of the world;
//! the generated types and the `host` import still come from
//! [`crate::runtime::bindings`]. Owns no store and runs no guest code.

use wasmtime::AsContextMut;
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{
    ComponentExportIndex, ComponentNamedList, Func, Instance, InstancePre, Lift, Lower, TypedFunc,
};

use crate::runtime::LoadError;
use crate::runtime::bindings::{
    AllocateRequest, ContainerResponse, DeviceDetails, DeviceKind, DeviceRef, Health, ModuleError,
    PrepareRequest, UnprepareRequest,
};

/// The parameter and result types of each export, as the generated bindings
/// would call them. One definition each, used both to type-check at load and to
/// call, so the two cannot disagree.
type ScanParams = ();
type ScanResults = (Result<Vec<DeviceKind>, ModuleError>,);
type HealthParams<'a> = (&'a [DeviceRef],);
type HealthResults = (Result<Vec<Health>, ModuleError>,);
type AllocateParams<'a> = (&'a AllocateRequest,);
type AllocateResults = (Result<Vec<ContainerResponse>, ModuleError>,);
type PostAllocateParams<'a> = (&'a AllocateRequest, &'a [ContainerResponse]);
type PostAllocateResults = AllocateResults;
type DescribeParams<'a> = (&'a [DeviceRef],);
type DescribeResults = (Result<Vec<DeviceDetails>, ModuleError>,);
type PrepareParams<'a> = (&'a PrepareRequest,);
type PrepareResults = AllocateResults;
type UnprepareParams<'a> = (&'a UnprepareRequest,);
type UnprepareResults = (Result<(), ModuleError>,);

/// Which optional functions a module exports (`scan` it always does). Where one
/// is missing the host supplies the default the WIT contract documents: health
/// from each scan, an allocation merged from scan's device allocations
/// ([`crate::merge`]), no post-processing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Exports {
    /// `health`: without it the host never asks; each scan's health counts.
    pub health: bool,
    /// `allocate`: without it the host merges the devices' scan-time allocations.
    pub allocate: bool,
    /// `post-allocate`: without it the response is final as it is.
    pub post_allocate: bool,
    /// `describe` (DRA): without it devices are published with the host's own
    /// attributes only.
    pub describe: bool,
    /// `prepare` (DRA): without it a claim is prepared through the allocation
    /// path, one container per request, and opaque configuration is refused.
    pub prepare: bool,
    /// `unprepare` (DRA): without it unpreparing only removes the claim's spec.
    pub unprepare: bool,
}

impl Exports {
    /// The WIT names of the functions exported, in the world's order.
    pub fn names(&self) -> Vec<&'static str> {
        let mut names = vec!["scan"];
        for (present, name) in [
            (self.health, "health"),
            (self.allocate, "allocate"),
            (self.post_allocate, "post-allocate"),
            (self.describe, "describe"),
            (self.prepare, "prepare"),
            (self.unprepare, "unprepare"),
        ] {
            if present {
                names.push(name);
            }
        }
        names
    }

    /// What the host does for each optional function the module does not
    /// export, one phrase each, in the world's order.
    pub fn defaults(&self) -> Vec<&'static str> {
        let mut defaults = Vec::new();
        if !self.health {
            defaults.push("health from each scan");
        }
        if !self.allocate {
            defaults.push("allocate as the merge of scan's device allocations");
        }
        if !self.post_allocate {
            defaults.push("no post-allocate step");
        }
        if !(self.describe || self.prepare || self.unprepare) {
            // One phrase: most modules serve the device-plugin API only.
            defaults.push("DRA claims prepared as allocations, no describe or unprepare");
            return defaults;
        }
        if !self.describe {
            defaults.push("DRA attributes kind, id and numaNode only");
        }
        if !self.prepare {
            defaults.push("DRA claims prepared as allocations, without opaque configuration");
        }
        if !self.unprepare {
            defaults.push("no DRA unprepare step");
        }
        defaults
    }

    /// One line for operators: what is exported and what the host supplies, e.g.
    /// `scan, allocate (the host supplies: health from each scan; no
    /// post-allocate step)`.
    pub fn describe(&self) -> String {
        let exported = self.names().join(", ");
        let defaults = self.defaults();
        if defaults.is_empty() {
            format!("{exported} (the host supplies nothing)")
        } else {
            format!("{exported} (the host supplies: {})", defaults.join("; "))
        }
    }
}

/// Where each export is, found and type-checked once per module version.
#[derive(Debug, Clone)]
pub(crate) struct Indices {
    scan: ComponentExportIndex,
    health: Option<ComponentExportIndex>,
    allocate: Option<ComponentExportIndex>,
    post_allocate: Option<ComponentExportIndex>,
    describe: Option<ComponentExportIndex>,
    prepare: Option<ComponentExportIndex>,
    unprepare: Option<ComponentExportIndex>,
}

impl Indices {
    /// Finds the exports of `pre`'s component and checks the type of each one
    /// present.
    ///
    /// # Errors
    /// [`LoadError::Incompatible`] naming `scan` when it is missing, or the
    /// first export present whose type is not the world's.
    pub(crate) fn new<T>(pre: &InstancePre<T>) -> Result<Self, LoadError> {
        let scan = find::<T, ScanParams, ScanResults>(pre, "scan")?
            .ok_or_else(|| LoadError::Incompatible("it does not export `scan`".into()))?;
        Ok(Self {
            scan,
            health: find::<T, HealthParams<'_>, HealthResults>(pre, "health")?,
            allocate: find::<T, AllocateParams<'_>, AllocateResults>(pre, "allocate")?,
            post_allocate: find::<T, PostAllocateParams<'_>, PostAllocateResults>(
                pre,
                "post-allocate",
            )?,
            describe: find::<T, DescribeParams<'_>, DescribeResults>(pre, "describe")?,
            prepare: find::<T, PrepareParams<'_>, PrepareResults>(pre, "prepare")?,
            unprepare: find::<T, UnprepareParams<'_>, UnprepareResults>(pre, "unprepare")?,
        })
    }

    /// Which optional exports are present.
    pub(crate) fn exports(&self) -> Exports {
        Exports {
            health: self.health.is_some(),
            allocate: self.allocate.is_some(),
            post_allocate: self.post_allocate.is_some(),
            describe: self.describe.is_some(),
            prepare: self.prepare.is_some(),
            unprepare: self.unprepare.is_some(),
        }
    }

    /// The functions of `instance`, an instance of the component these indices
    /// were found in.
    ///
    /// # Errors
    /// When an export is missing or of another type; [`Indices::new`] ruled
    /// that out for instances of its component, so this is only wasmtime's
    /// own check repeated, as the generated bindings do.
    pub(crate) fn load(
        &self,
        mut store: impl AsContextMut,
        instance: &Instance,
    ) -> wasmtime::Result<Funcs> {
        let mut store = store.as_context_mut();
        let scan = *instance
            .get_typed_func::<ScanParams, ScanResults>(&mut store, &self.scan)?
            .func();
        Ok(Funcs {
            scan,
            health: optional::<HealthParams<'_>, HealthResults>(
                &mut store,
                instance,
                &self.health,
            )?,
            allocate: optional::<AllocateParams<'_>, AllocateResults>(
                &mut store,
                instance,
                &self.allocate,
            )?,
            post_allocate: optional::<PostAllocateParams<'_>, PostAllocateResults>(
                &mut store,
                instance,
                &self.post_allocate,
            )?,
            describe: optional::<DescribeParams<'_>, DescribeResults>(
                &mut store,
                instance,
                &self.describe,
            )?,
            prepare: optional::<PrepareParams<'_>, PrepareResults>(
                &mut store,
                instance,
                &self.prepare,
            )?,
            unprepare: optional::<UnprepareParams<'_>, UnprepareResults>(
                &mut store,
                instance,
                &self.unprepare,
            )?,
        })
    }
}

/// The optional export at `index` of `instance`, typed `Params -> Results`.
fn optional<Params, Results>(
    store: impl AsContextMut,
    instance: &Instance,
    index: &Option<ComponentExportIndex>,
) -> wasmtime::Result<Option<Func>>
where
    Params: ComponentNamedList + Lower,
    Results: ComponentNamedList + Lift,
{
    match index {
        Some(index) => Ok(Some(
            *instance
                .get_typed_func::<Params, Results>(store, index)?
                .func(),
        )),
        None => Ok(None),
    }
}

/// The export `name` of `pre`'s component, if present, checked to be a
/// function of type `Params -> Results`.
fn find<T, Params, Results>(
    pre: &InstancePre<T>,
    name: &str,
) -> Result<Option<ComponentExportIndex>, LoadError>
where
    Params: ComponentNamedList + Lower,
    Results: ComponentNamedList + Lift,
{
    let Some((item, index)) = pre.component().get_export(None, name) else {
        return Ok(None);
    };
    let ComponentItem::ComponentFunc(func) = item else {
        return Err(LoadError::Incompatible(format!(
            "its export `{name}` is not a function"
        )));
    };
    // The check `bindgen!`'s generated `Indices::new` runs for each export.
    func.typecheck::<Params, Results>(&pre.instance_type())
        .map_err(|e| {
            LoadError::Incompatible(format!(
                "its export `{name}` does not have the world's type: {e:#}"
            ))
        })?;
    Ok(Some(index))
}

/// One instance's exports, type-checked when the instance was made.
pub(crate) struct Funcs {
    scan: Func,
    health: Option<Func>,
    allocate: Option<Func>,
    post_allocate: Option<Func>,
    describe: Option<Func>,
    prepare: Option<Func>,
    unprepare: Option<Func>,
}

impl Funcs {
    /// Calls `scan`.
    pub(crate) async fn scan(
        &self,
        store: impl AsContextMut<Data: Send>,
    ) -> wasmtime::Result<Result<Vec<DeviceKind>, ModuleError>> {
        // SAFETY: `Indices::load` got `self.scan` from `get_typed_func` with
        // exactly these types.
        let func = unsafe { TypedFunc::<ScanParams, ScanResults>::new_unchecked(self.scan) };
        Ok(func.call_async(store, ()).await?.0)
    }

    /// Calls `health`, or `None` when the module does not export it.
    pub(crate) async fn health(
        &self,
        store: impl AsContextMut<Data: Send>,
        devices: &[DeviceRef],
    ) -> Option<wasmtime::Result<Result<Vec<Health>, ModuleError>>> {
        let func = self.health?;
        // SAFETY: as in `scan`, for `self.health`.
        let func = unsafe { TypedFunc::<HealthParams<'_>, HealthResults>::new_unchecked(func) };
        Some(func.call_async(store, (devices,)).await.map(|r| r.0))
    }

    /// Calls `allocate`, or `None` when the module does not export it.
    pub(crate) async fn allocate(
        &self,
        store: impl AsContextMut<Data: Send>,
        request: &AllocateRequest,
    ) -> Option<wasmtime::Result<Result<Vec<ContainerResponse>, ModuleError>>> {
        let func = self.allocate?;
        // SAFETY: as in `scan`, for `self.allocate`.
        let func = unsafe { TypedFunc::<AllocateParams<'_>, AllocateResults>::new_unchecked(func) };
        Some(func.call_async(store, (request,)).await.map(|r| r.0))
    }

    /// Calls `post-allocate`, or `None` when the module does not export it.
    pub(crate) async fn post_allocate(
        &self,
        store: impl AsContextMut<Data: Send>,
        request: &AllocateRequest,
        response: &[ContainerResponse],
    ) -> Option<wasmtime::Result<Result<Vec<ContainerResponse>, ModuleError>>> {
        let func = self.post_allocate?;
        // SAFETY: as in `scan`, for `self.post_allocate`.
        let func = unsafe {
            TypedFunc::<PostAllocateParams<'_>, PostAllocateResults>::new_unchecked(func)
        };
        Some(
            func.call_async(store, (request, response))
                .await
                .map(|r| r.0),
        )
    }

    /// Calls `describe`, or `None` when the module does not export it.
    pub(crate) async fn describe(
        &self,
        store: impl AsContextMut<Data: Send>,
        devices: &[DeviceRef],
    ) -> Option<wasmtime::Result<Result<Vec<DeviceDetails>, ModuleError>>> {
        let func = self.describe?;
        // SAFETY: as in `scan`, for `self.describe`.
        let func = unsafe { TypedFunc::<DescribeParams<'_>, DescribeResults>::new_unchecked(func) };
        Some(func.call_async(store, (devices,)).await.map(|r| r.0))
    }

    /// Calls `prepare`, or `None` when the module does not export it.
    pub(crate) async fn prepare(
        &self,
        store: impl AsContextMut<Data: Send>,
        request: &PrepareRequest,
    ) -> Option<wasmtime::Result<Result<Vec<ContainerResponse>, ModuleError>>> {
        let func = self.prepare?;
        // SAFETY: as in `scan`, for `self.prepare`.
        let func = unsafe { TypedFunc::<PrepareParams<'_>, PrepareResults>::new_unchecked(func) };
        Some(func.call_async(store, (request,)).await.map(|r| r.0))
    }

    /// Calls `unprepare`, or `None` when the module does not export it.
    pub(crate) async fn unprepare(
        &self,
        store: impl AsContextMut<Data: Send>,
        request: &UnprepareRequest,
    ) -> Option<wasmtime::Result<Result<(), ModuleError>>> {
        let func = self.unprepare?;
        // SAFETY: as in `scan`, for `self.unprepare`.
        let func =
            unsafe { TypedFunc::<UnprepareParams<'_>, UnprepareResults>::new_unchecked(func) };
        Some(func.call_async(store, (request,)).await.map(|r| r.0))
    }
}
