//! The `DevicePlugin` gRPC service for one resource: protocol messages in, domain
//! values out, and the one place where errors become `tonic::Status`.
//!
//! It knows nothing of wasm: device state arrives through a `watch` channel and
//! allocations through the [`DeviceBackend`] trait, so this file runs the same
//! against a guest module or any other backend.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::{Stream, StreamExt};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_stream::wrappers::{UnixListenerStream, WatchStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::domain::{ContainerAllocation, DeviceSet, Health, ResourceName};
use crate::gauge::Gauge;
use crate::kubelet::coalesce::Coalesced;
use crate::kubelet::preferred::preferred_allocation;
use crate::kubelet::proto::{
    self, AllocateRequest, AllocateResponse, ContainerAllocateResponse,
    ContainerPreferredAllocationResponse, DevicePluginOptions, Empty, ListAndWatchResponse,
    PreStartContainerRequest, PreStartContainerResponse, PreferredAllocationRequest,
    PreferredAllocationResponse,
    device_plugin_server::{DevicePlugin, DevicePluginServer},
};
use crate::kubelet::registration::plugin_options;
use crate::metrics::ResourceMetrics;

/// Why a backend could not allocate. Each variant maps to one gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum AllocateError {
    /// The request cannot be satisfied as asked: `InvalidArgument`.
    #[error("{0}")]
    Rejected(String),
    /// A device or something it needs is unavailable now: `FailedPrecondition`.
    #[error("{0}")]
    Unavailable(String),
    /// The call did not finish in time: `DeadlineExceeded`.
    #[error("{0}")]
    TimedOut(String),
    /// Anything else: `Internal`.
    #[error("{0}")]
    Failed(String),
}

impl From<AllocateError> for Status {
    fn from(err: AllocateError) -> Self {
        match err {
            AllocateError::Rejected(m) => Status::invalid_argument(m),
            AllocateError::Unavailable(m) => Status::failed_precondition(m),
            AllocateError::TimedOut(m) => Status::deadline_exceeded(m),
            AllocateError::Failed(m) => Status::internal(m),
        }
    }
}

/// What a resource's server needs from whatever provides the devices.
pub trait DeviceBackend: Send + Sync + 'static {
    /// Builds one allocation per container, in order. Every id has been checked
    /// to be advertised, healthy and requested once.
    fn allocate(
        &self,
        containers: Vec<Vec<String>>,
    ) -> impl Future<Output = Result<Vec<ContainerAllocation>, AllocateError>> + Send;
}

/// The `DevicePlugin` service of one resource.
pub struct PluginService<B> {
    resource: ResourceName,
    devices: watch::Receiver<Arc<DeviceSet>>,
    backend: Arc<B>,
    streams: Gauge,
    shutdown: CancellationToken,
    metrics: Option<ResourceMetrics>,
}

impl<B: DeviceBackend> PluginService<B> {
    /// A service advertising `devices` and allocating through `backend`; its
    /// ListAndWatch streams are counted in `streams` while open, and end when
    /// `shutdown` is cancelled or the sender of `devices` drops.
    pub fn new(
        resource: ResourceName,
        devices: watch::Receiver<Arc<DeviceSet>>,
        backend: Arc<B>,
        streams: Gauge,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            resource,
            devices,
            backend,
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

    /// Checks every requested id: advertised, healthy, and requested once.
    fn check_request(&self, request: &AllocateRequest) -> Result<(), Status> {
        if request.container_requests.is_empty() {
            return Err(Status::invalid_argument(format!(
                "resource {}: Allocate names no containers",
                self.resource
            )));
        }
        let set = self.devices.borrow();
        let mut seen: HashSet<&str> = HashSet::new();
        for (n, container) in request.container_requests.iter().enumerate() {
            if container.devices_ids.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "resource {}: container request {n} names no devices",
                    self.resource
                )));
            }
            for id in &container.devices_ids {
                match set.get(id) {
                    None => {
                        return Err(Status::invalid_argument(format!(
                            "resource {}: unknown device id `{id}` (container request {n})",
                            self.resource
                        )));
                    }
                    Some(device) if device.health == Health::Unhealthy => {
                        return Err(Status::failed_precondition(format!(
                            "resource {}: device `{id}` is unhealthy (container request {n})",
                            self.resource
                        )));
                    }
                    Some(_) => {}
                }
                if !seen.insert(id.as_str()) {
                    return Err(Status::invalid_argument(format!(
                        "resource {}: device id `{id}` is requested more than once",
                        self.resource
                    )));
                }
            }
        }
        Ok(())
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

type ListAndWatchStream = Pin<Box<dyn Stream<Item = Result<ListAndWatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl<B: DeviceBackend> DevicePlugin for PluginService<B> {
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
        let stream = WatchStream::new(self.devices.clone())
            .map(move |set| {
                let _ = &open;
                Ok(list_response(&set))
            })
            .take_until(self.shutdown.clone().cancelled_owned());
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_preferred_allocation(
        &self,
        request: Request<PreferredAllocationRequest>,
    ) -> Result<Response<PreferredAllocationResponse>, Status> {
        let request = request.into_inner();
        let set = self.devices.borrow().clone();
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
                        &set,
                        |id| set.device_of(id),
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

impl<B: DeviceBackend> PluginService<B> {
    /// Checks the request, allocates through the backend, and builds the answer.
    async fn answer_allocate(&self, request: AllocateRequest) -> Result<AllocateResponse, Status> {
        self.check_request(&request)?;
        let containers: Vec<Vec<String>> = request
            .container_requests
            .into_iter()
            .map(|c| c.devices_ids)
            .collect();
        let count = containers.len();
        let allocations = self.backend.allocate(containers).await.map_err(|err| {
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
