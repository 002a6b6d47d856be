//! The `DevicePlugin` gRPC service for one resource: protocol messages in, domain
//! values out, and the one place where errors become `tonic::Status`.
//!
//! It knows nothing of wasm: each request reads the resource's current
//! [`ResourceSnapshot`](crate::snapshot::ResourceSnapshot) once and allocates through the [`Backend`](crate::frontend::Backend) that snapshot
//! carries, so this file runs the same against a guest module or any other
//! backend.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::{Stream, StreamExt};
use tokio::net::UnixListener;
use tokio_stream::wrappers::{UnixListenerStream, WatchStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::domain::{ContainerAllocation, DeviceNode, DeviceSet, Mount, ResourceName};
use crate::frontend::{AllocateError, RequestError, Snapshots};
use crate::gauge::Gauge;
use crate::kubelet::coalesce::Coalesced;
use crate::kubelet::deviceplugin::preferred::preferred_allocation;
use crate::kubelet::deviceplugin::proto::{
    self, AllocateRequest, AllocateResponse, ContainerAllocateResponse,
    ContainerPreferredAllocationResponse, DevicePluginOptions, Empty, ListAndWatchResponse,
    PreStartContainerRequest, PreStartContainerResponse, PreferredAllocationRequest,
    PreferredAllocationResponse,
    device_plugin_server::{DevicePlugin, DevicePluginServer},
};
use crate::kubelet::deviceplugin::registration::plugin_options;
use crate::metrics::ResourceMetrics;

/// Each way a backend fails maps to one gRPC code.
/// The gRPC code kubelet gets for a failed allocation.
pub fn allocate_code(err: &AllocateError) -> tonic::Code {
    match err {
        AllocateError::Rejected(_) => tonic::Code::InvalidArgument,
        AllocateError::Unavailable(_) => tonic::Code::FailedPrecondition,
        AllocateError::TimedOut(_) => tonic::Code::DeadlineExceeded,
        AllocateError::Failed(_) => tonic::Code::Internal,
    }
}

impl From<AllocateError> for Status {
    fn from(err: AllocateError) -> Self {
        Status::new(allocate_code(&err), err.to_string())
    }
}

/// A request kubelet must not have sent (or sent for a list that has changed
/// since): `FailedPrecondition` for an unhealthy device, as kubelet's device
/// manager expects for a device that went bad, `InvalidArgument` otherwise.
pub fn request_code(err: &RequestError) -> tonic::Code {
    match err {
        RequestError::Unhealthy { .. } => tonic::Code::FailedPrecondition,
        RequestError::NoContainers
        | RequestError::NoDevices { .. }
        | RequestError::UnknownDevice { .. }
        | RequestError::Duplicate { .. } => tonic::Code::InvalidArgument,
    }
}

fn request_status(resource: &ResourceName, err: RequestError) -> Status {
    Status::new(request_code(&err), format!("resource {resource}: {err}"))
}

/// The `DevicePlugin` service of one resource.
pub struct PluginService {
    resource: ResourceName,
    snapshots: Snapshots,
    streams: Gauge,
    shutdown: CancellationToken,
    metrics: Option<ResourceMetrics>,
}

impl PluginService {
    /// A service advertising each snapshot's devices and allocating through
    /// its backend; its ListAndWatch streams are counted in `streams` while
    /// open, and end when `shutdown` is cancelled or the sender of `snapshots`
    /// drops.
    pub fn new(
        resource: ResourceName,
        snapshots: Snapshots,
        streams: Gauge,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            resource,
            snapshots,
            streams,
            shutdown,
            metrics: None,
        }
    }

    /// Records each Allocate's latency and outcome in `metrics`.
    #[must_use]
    pub fn with_metrics(mut self, metrics: ResourceMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Serves the service on `listener` until `shutdown` is cancelled, then waits
    /// for calls in flight.
    ///
    /// # Errors
    /// The transport failed.
    pub async fn serve(self, listener: UnixListener) -> Result<(), tonic::transport::Error> {
        let shutdown = self.shutdown.clone();
        // Each connection's writes leave in one piece per answer (see `coalesce`).
        let incoming = UnixListenerStream::new(listener).map(|conn| conn.map(Coalesced::new));
        tonic::transport::Server::builder()
            .add_service(DevicePluginServer::new(self))
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await
    }
}

/// The wire form of a device list.
pub fn list_response(set: &DeviceSet) -> ListAndWatchResponse {
    ListAndWatchResponse {
        devices: set
            .devices()
            .iter()
            .map(|d| proto::Device {
                id: d.id.clone(),
                health: d.health.as_str().to_string(),
                topology: (!d.numa_nodes.is_empty()).then(|| proto::TopologyInfo {
                    nodes: d
                        .numa_nodes
                        .iter()
                        .map(|&id| proto::NumaNode { id })
                        .collect(),
                }),
            })
            .collect(),
    }
}

fn container_response(allocation: ContainerAllocation) -> ContainerAllocateResponse {
    ContainerAllocateResponse {
        envs: allocation.envs.into_iter().collect(),
        mounts: allocation
            .mounts
            .into_iter()
            .map(|m| proto::Mount {
                container_path: m.container_path,
                host_path: m.host_path,
                read_only: m.read_only,
            })
            .collect(),
        devices: allocation
            .devices
            .into_iter()
            .map(|d| proto::DeviceSpec {
                container_path: d.container_path,
                host_path: d.host_path,
                permissions: d.permissions,
            })
            .collect(),
        annotations: allocation.annotations.into_iter().collect(),
        cdi_devices: allocation
            .cdi_devices
            .into_iter()
            .map(|name| proto::CdiDevice { name })
            .collect(),
    }
}

/// What kubelet was sent for a container, as a domain value again (the demo
/// prints what the simulated kubelet received).
pub fn allocation_from_wire(response: &ContainerAllocateResponse) -> ContainerAllocation {
    ContainerAllocation {
        envs: response.envs.clone().into_iter().collect(),
        devices: response
            .devices
            .iter()
            .map(|d| DeviceNode {
                host_path: d.host_path.clone(),
                container_path: d.container_path.clone(),
                permissions: d.permissions.clone(),
            })
            .collect(),
        mounts: response
            .mounts
            .iter()
            .map(|m| Mount {
                host_path: m.host_path.clone(),
                container_path: m.container_path.clone(),
                read_only: m.read_only,
            })
            .collect(),
        annotations: response.annotations.clone().into_iter().collect(),
        cdi_devices: response
            .cdi_devices
            .iter()
            .map(|c| c.name.clone())
            .collect(),
    }
}

type ListAndWatchStream = Pin<Box<dyn Stream<Item = Result<ListAndWatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DevicePlugin for PluginService {
    async fn get_device_plugin_options(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<DevicePluginOptions>, Status> {
        Ok(Response::new(plugin_options()))
    }

    type ListAndWatchStream = ListAndWatchStream;

    async fn list_and_watch(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        tracing::info!(resource = %self.resource, "kubelet opened ListAndWatch");
        // WatchStream yields the current list at once, then every change; it ends
        // when the resource's sender drops (resource removed) and `take_until`
        // ends it on shutdown, so graceful shutdown never waits on an open stream.
        // The guard lives in the stream: kubelet hanging up drops it.
        let open = self.streams.enter();
        // A snapshot that keeps the list (a new allocation or module version)
        // is not sent: kubelet hears only of real changes.
        // Only the last list sent is kept (not its snapshot, which would hold an
        // old module version alive while the stream is open).
        let mut last: Option<Arc<DeviceSet>> = None;
        let stream = WatchStream::new(self.snapshots.clone())
            .filter_map(move |snapshot| {
                let _ = &open;
                let list = snapshot.advertised_arc();
                let changed = last.as_ref().is_none_or(|l| !Arc::ptr_eq(l, list));
                let response = changed.then(|| Ok(list_response(list)));
                last = Some(list.clone());
                std::future::ready(response)
            })
            .take_until(self.shutdown.clone().cancelled_owned());
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_preferred_allocation(
        &self,
        request: Request<PreferredAllocationRequest>,
    ) -> Result<Response<PreferredAllocationResponse>, Status> {
        let request = request.into_inner();
        let snapshot = self.snapshots.borrow().clone();
        let set = snapshot.advertised();
        let container_responses = request
            .container_requests
            .iter()
            .map(|c| {
                let size = usize::try_from(c.allocation_size).map_err(|_| {
                    Status::invalid_argument(format!(
                        "resource {}: allocation_size {} is negative",
                        self.resource, c.allocation_size
                    ))
                })?;
                // Kubelet asks for at most what it offers (must-include ids are
                // among the available ones); more would only make the answer, and
                // its allocation, as large as the request says.
                let offered = c.available_device_i_ds.len();
                if size > offered {
                    return Err(Status::invalid_argument(format!(
                        "resource {}: allocation_size {size} is more than the {offered} devices offered",
                        self.resource
                    )));
                }
                Ok(ContainerPreferredAllocationResponse {
                    device_i_ds: preferred_allocation(
                        set,
                        // Which real device an advertised id is, as the
                        // snapshot maps it (an id it does not know is its own).
                        |id| snapshot.device_of(id).map_or(id, |d| d.id.as_str()),
                        &c.available_device_i_ds,
                        &c.must_include_device_i_ds,
                        size,
                    ),
                })
            })
            .collect::<Result<_, Status>>()?;
        Ok(Response::new(PreferredAllocationResponse {
            container_responses,
        }))
    }

    async fn allocate(
        &self,
        request: Request<AllocateRequest>,
    ) -> Result<Response<AllocateResponse>, Status> {
        let started = Instant::now();
        let result = self.answer_allocate(request.into_inner()).await;
        if let Some(metrics) = &self.metrics {
            let outcome = match &result {
                Ok(_) => "ok",
                Err(status) => code_label(status.code()),
            };
            metrics.allocated(started.elapsed(), outcome);
        }
        result.map(Response::new)
    }

    async fn pre_start_container(
        &self,
        _: Request<PreStartContainerRequest>,
    ) -> Result<Response<PreStartContainerResponse>, Status> {
        // Options say pre_start_required = false; answer anyway, as kubelet may call it.
        Ok(Response::new(PreStartContainerResponse {}))
    }
}

impl PluginService {
    /// Checks the request against the current snapshot, allocates through that
    /// snapshot's backend (with the CDI names of a resource served with CDI),
    /// and builds the answer: one snapshot throughout, so
    /// every device that passed the check is allocated as that snapshot has it.
    async fn answer_allocate(&self, request: AllocateRequest) -> Result<AllocateResponse, Status> {
        let snapshot = self.snapshots.borrow().clone();
        let containers: Vec<Vec<String>> = request
            .container_requests
            .into_iter()
            .map(|c| c.devices_ids)
            .collect();
        let plan = snapshot
            .plan(&containers)
            .map_err(|err| request_status(&self.resource, err))?;
        let count = containers.len();
        let allocations = snapshot.allocate(&plan).await.map_err(|err| {
            tracing::warn!(resource = %self.resource, cause = %err, "Allocate failed");
            Status::from(err)
        })?;
        if allocations.len() != count {
            return Err(Status::internal(format!(
                "resource {}: backend answered {} containers for {count} requested",
                self.resource,
                allocations.len()
            )));
        }
        Ok(AllocateResponse {
            container_responses: allocations.into_iter().map(container_response).collect(),
        })
    }
}

/// A gRPC code as a metric label: its name in snake case.
fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}
