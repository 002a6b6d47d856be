//! The seam between the registry and the kubelet APIs.
//!
//! A *frontend* speaks one kubelet API (the v1beta1 device-plugin API in
//! `kubelet/deviceplugin/`, Dynamic Resource Allocation in `kubelet/dra/`) and
//! serves each resource it is given from two
//! things only: a stream of immutable [`ResourceSnapshot`]s, one per accepted
//! change, and the [`Backend`] each snapshot carries. The registry builds and
//! publishes the snapshots; it never names a protocol type, and a frontend never
//! reaches into the registry. Errors cross the seam as [`AllocateError`] and
//! [`RequestError`], each of which a frontend maps to its protocol's codes in one
//! place.
//!
//! The manifest chooses the API per resource ([`ServeAs`]); the registry asks
//! [`Frontends`] for the frontend of that API, so a frontend that no resource
//! uses is never started (the DRA frontend's API-server client, in particular).
//! A resource is served by exactly one frontend at a time: the registry holds
//! each resource name once, so one name is never served through both APIs.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::domain::{ContainerAllocation, ResourceName};
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

/// What undoing a claim's preparation resolves to.
pub type UnprepareFuture<'a> = Pin<Box<dyn Future<Output = Result<(), AllocateError>> + Send + 'a>>;

/// A claim on devices, prepared as a whole for the pods that share it (DRA's
/// ResourceClaim, in the seam's terms): who it is and, per request, its
/// devices and the opaque configuration for this resource's driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its UID.
    pub uid: String,
    /// Its requests that were given devices of this resource, in order; to
    /// prepare, one per container of the plan.
    pub requests: Vec<ClaimRequest>,
}

/// One request of a [`Claim`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimRequest {
    /// The request's name (`request` or `request/subrequest`).
    pub name: String,
    /// The device ids it was given.
    pub device_ids: Vec<String>,
    /// The opaque configuration that applies to it, each one JSON text, in
    /// order of precedence (a later one overrides an earlier one).
    #[serde(default)]
    pub config: Vec<String>,
}

impl Claim {
    /// The first request that carries configuration, if any.
    pub fn configured_request(&self) -> Option<&ClaimRequest> {
        self.requests.iter().find(|r| !r.config.is_empty())
    }
}

impl std::fmt::Display for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} ({})", self.namespace, self.name, self.uid)
    }
}

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

    /// Prepares `claim`: one allocation per request, in order, like
    /// [`Backend::allocate`] with one container per request (`plan`), but
    /// knowing the claim and each request's configuration. By default it is
    /// exactly that allocation, and a claim with configuration is refused:
    /// nothing would read it.
    fn prepare<'a>(
        &'a self,
        snapshot: &'a ResourceSnapshot,
        plan: &'a AllocationPlan,
        claim: &'a Claim,
    ) -> AllocateFuture<'a> {
        match claim.configured_request() {
            Some(request) => {
                let refused = unconfigurable(claim, request);
                Box::pin(std::future::ready(Err(refused)))
            }
            None => self.allocate(snapshot, plan),
        }
    }

    /// Undoes what preparing `claim` (its requests as they were prepared) did
    /// beyond the answer; by default nothing.
    fn unprepare<'a>(&'a self, kind: &'a str, claim: &'a Claim) -> UnprepareFuture<'a> {
        let _ = (kind, claim);
        Box::pin(std::future::ready(Ok(())))
    }
}

/// The refusal of a configured claim by a backend that cannot read
/// configuration.
pub fn unconfigurable(claim: &Claim, request: &ClaimRequest) -> AllocateError {
    AllocateError::Rejected(format!(
        "claim {claim}: request `{}` carries opaque configuration for this driver, and the module does not export `prepare` (WIT 0.2.2) to read it; remove the configuration or use a module that takes it",
        request.name
    ))
}

/// A resource's snapshots: the current one at once, then each change. The
/// sender dropping means the resource is withdrawn.
pub type Snapshots = watch::Receiver<Arc<ResourceSnapshot>>;

/// Which API serves a resource, with what that API needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServeAs {
    /// The v1beta1 device-plugin API.
    DevicePlugin,
    /// A DRA kubelet plugin with this driver name ([`check_driver_name`]).
    Dra {
        /// The driver name.
        driver: String,
    },
}

impl std::fmt::Display for ServeAs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServeAs::DevicePlugin => f.write_str("device plugin"),
            ServeAs::Dra { driver } => write!(f, "DRA driver {driver}"),
        }
    }
}

/// The longest DRA driver name (`resource.k8s.io/v1` `DriverNameMaxLength`).
pub const MAX_DRIVER_NAME: usize = 63;

/// Checks a DRA driver name as the API server does: a DNS subdomain of at
/// most [`MAX_DRIVER_NAME`] characters.
///
/// # Errors
/// Says which rule `name` breaks.
pub fn check_driver_name(name: &str) -> Result<(), String> {
    if name.len() > MAX_DRIVER_NAME {
        return Err(format!(
            "`{name}` is longer than the {MAX_DRIVER_NAME} characters a DRA driver name may have"
        ));
    }
    if !crate::domain::is_dns_subdomain(name) {
        return Err(format!(
            "`{name}` is not a DNS subdomain (lowercase letters, digits, '-' and '.')"
        ));
    }
    Ok(())
}

/// The driver name of a DRA resource whose manifest names none: the name part,
/// then the domain, lowercased (`example.com/dev-1` is `dev-1.example.com`).
///
/// # Errors
/// The name is not a valid driver name (an `_` in it, say): the manifest must
/// name one (`driver`).
pub fn default_driver(resource: &ResourceName) -> Result<String, String> {
    let (domain, name) = resource
        .as_str()
        .split_once('/')
        .unwrap_or(("", resource.as_str()));
    let driver = format!("{name}.{domain}").to_ascii_lowercase();
    check_driver_name(&driver).map_err(|why| {
        format!("the default DRA driver name of {resource}: {why}; set `driver` in the manifest")
    })?;
    Ok(driver)
}

/// One resource for a frontend to serve.
pub struct ServeRequest {
    /// Which API, with what it needs (the frontend asked for is that API's).
    pub serve_as: ServeAs,
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
    ///
    /// # Errors
    /// Why the resource cannot be served at all (a DRA driver name another
    /// resource is served as, say); nothing was started.
    fn serve(&self, request: ServeRequest) -> Result<Served, String>;
}

/// The frontends of a host, one per API, each started on first use.
pub trait Frontends: Send + Sync + 'static {
    /// The frontend serving `serve_as`.
    ///
    /// # Errors
    /// The API cannot be served by this host (built without it, or its settings
    /// are missing: DRA needs the node name); says which and what to set.
    fn frontend(&self, serve_as: &ServeAs) -> Result<Arc<dyn Frontend>, String>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_default_driver_name_is_the_name_then_the_domain_lowercased() {
        let name = |s: &str| ResourceName::parse(s).expect("valid");
        assert_eq!(
            default_driver(&name("example.com/dev-1")).as_deref(),
            Ok("dev-1.example.com")
        );
        assert_eq!(
            default_driver(&name("example.com/GPU")).as_deref(),
            Ok("gpu.example.com")
        );
        let err = default_driver(&name("example.com/dev_1")).expect_err("`_` is no DNS");
        assert!(err.contains("set `driver`"), "{err}");
        assert!(check_driver_name(&format!("{}.io", "a".repeat(61))).is_err());
        assert!(check_driver_name("dev-1.example.com").is_ok());
        assert!(check_driver_name("Dev.example.com").is_err());
    }
}
