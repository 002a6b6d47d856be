//! The seam between the registry and the kubelet APIs.
//!
//! A *frontend* speaks one kubelet API (the v1beta1 device-plugin API in
//! `kubelet/deviceplugin/` today) and serves each resource it is given from two
//! things only: a stream of immutable [`ResourceSnapshot`]s, one per accepted
//! change, and the [`Backend`] each snapshot carries. The registry builds and
//! publishes the snapshots; it never names a protocol type, and a frontend never
//! reaches into the registry. Errors cross the seam as [`AllocateError`] and
//! [`RequestError`], each of which a frontend maps to its protocol's codes in one
//! place.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::domain::ContainerAllocation;
use crate::metrics::ResourceMetrics;
use crate::snapshot::{AllocationPlan, ResourceSnapshot};

pub use crate::snapshot::RequestError;

/// Why a backend could not allocate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocateError {
    /// The request cannot be satisfied as asked (the module said so, or its
    /// defaults cannot be combined): the device-plugin API's `InvalidArgument`.
    #[error("{0}")]
    Rejected(String),
    /// A device or something it needs is unavailable now: `FailedPrecondition`.
    #[error("{0}")]
    Unavailable(String),
    /// The call did not finish in time: `DeadlineExceeded`.
    #[error("{0}")]
    TimedOut(String),
    /// Anything else (a trap, an answer the output policy refuses): `Internal`.
    #[error("{0}")]
    Failed(String),
}

/// What an allocation resolves to: one answer per container of the plan.
pub type AllocateFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<ContainerAllocation>, AllocateError>> + Send + 'a>>;

/// Allocates devices of a resource: the module version that produced a snapshot,
/// or any other provider of devices (benchmarks, tests).
pub trait Backend: Send + Sync + 'static {
    /// Builds one allocation per container of `plan`, in order. `plan` was
    /// checked against `snapshot` ([`ResourceSnapshot::plan`]): every device is
    /// one of the snapshot's real devices, healthy when checked, and named once
    /// per container. Everything the backend needs about the resource is read
    /// from `snapshot`, never from a second place, so an allocation always
    /// matches the list it was checked against.
    fn allocate<'a>(
        &'a self,
        snapshot: &'a ResourceSnapshot,
        plan: &'a AllocationPlan,
    ) -> AllocateFuture<'a>;
}

/// A resource's snapshots: the current one at once, then each change. The
/// sender dropping means the resource is withdrawn.
pub type Snapshots = watch::Receiver<Arc<ResourceSnapshot>>;

/// One resource for a frontend to serve.
pub struct ServeRequest {
    /// Its snapshots; the name and kind never change over the stream.
    pub snapshots: Snapshots,
    /// Where its Allocate latency and outcomes are counted.
    pub metrics: ResourceMetrics,
    /// Cancelled when the resource is withdrawn or the host stops.
    pub shutdown: CancellationToken,
}

/// A resource a frontend is serving: a task that ends once the frontend has
/// stopped serving it (its endpoint removed) after the request's token was
/// cancelled.
#[derive(Debug)]
pub struct Served {
    /// Await it after cancelling to know the resource is no longer served.
    pub task: JoinHandle<()>,
}

/// A kubelet API, serving resources.
pub trait Frontend: Send + Sync + 'static {
    /// Starts serving one resource, in a task of its own; returns at once.
    fn serve(&self, request: ServeRequest) -> Served;
}
