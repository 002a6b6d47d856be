//! A kubelet for the demo and the tests: serves `Registration` on `kubelet.sock`,
//! and for every registration dials the plugin's endpoint, reads its options and
//! follows its `ListAndWatch` stream, as kubelet's device manager does. It can
//! then call `Allocate` and `GetPreferredAllocation` like kubelet admitting a pod.
//!
//! It checks registrations the way kubelet does (API version, extended resource
//! name) and keeps only what a test needs to look at, published through a `watch`
//! channel so callers wait on a state instead of sleeping.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::domain::ResourceName;
use crate::kubelet::deviceplugin::proto::{
    self, AllocateRequest, AllocateResponse, ContainerAllocateRequest,
    ContainerPreferredAllocationRequest, DevicePluginOptions, Empty, PreStartContainerRequest,
    PreferredAllocationRequest, PreferredAllocationResponse, RegisterRequest,
    device_plugin_client::DevicePluginClient,
    registration_server::{Registration, RegistrationServer},
};
use crate::kubelet::socket;

/// How many ListAndWatch updates a plugin's history keeps.
const HISTORY: usize = 256;

/// What the simulated kubelet knows of one registered resource.
#[derive(Debug, Clone, Default)]
pub struct PluginView {
    /// The last registration received for the resource.
    pub registration: RegisterRequest,
    /// How many registrations the resource has made.
    pub registrations: u32,
    /// The plugin's answer to GetDevicePluginOptions, once received.
    pub options: Option<DevicePluginOptions>,
    /// The devices of the last ListAndWatch update.
    pub devices: Vec<proto::Device>,
    /// Every ListAndWatch update received on the current stream (the last 256).
    pub updates: Vec<Vec<proto::Device>>,
    /// Whether the ListAndWatch stream is open.
    pub streaming: bool,
    /// Why the last stream ended or could not start, if it did.
    pub stream_error: Option<String>,
}

impl PluginView {
    /// Ids of the devices currently advertised healthy.
    pub fn healthy_ids(&self) -> Vec<&str> {
        self.devices
            .iter()
            .filter(|d| d.health == "Healthy")
            .map(|d| d.id.as_str())
            .collect()
    }
}

/// Everything the simulated kubelet knows, by resource name.
#[derive(Debug, Clone, Default)]
pub struct KubeletView {
    /// Registered resources.
    pub plugins: BTreeMap<String, PluginView>,
    /// Registrations refused, with the reason.
    pub refused: Vec<(RegisterRequest, String)>,
}

impl KubeletView {
    /// The resource's view, if it registered.
    pub fn plugin(&self, resource: &str) -> Option<&PluginView> {
        self.plugins.get(resource)
    }
}

/// Errors talking to a plugin through the simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimulatorError {
    /// No plugin registered that resource.
    #[error("no plugin registered resource {0}")]
    NotRegistered(String),
    /// The plugin answered with an error.
    #[error(transparent)]
    Status(#[from] Status),
    /// A wait ran out of time.
    #[error("timed out after {0:?} waiting for the kubelet simulator to see {1}")]
    Timeout(Duration, String),
    /// The socket could not be bound.
    #[error("cannot serve {path}: {cause}")]
    Bind {
        /// The socket path.
        path: String,
        /// What went wrong.
        cause: std::io::Error,
    },
}

struct Shared {
    dir: PathBuf,
    view: watch::Sender<KubeletView>,
    /// Per resource: the channel to its endpoint and the token that ends its stream task.
    clients: Mutex<HashMap<String, (Channel, CancellationToken)>>,
    shutdown: CancellationToken,
}

/// A running simulated kubelet. Dropping it stops the server and every stream.
pub struct Simulator {
    shared: Arc<Shared>,
    view: watch::Receiver<KubeletView>,
    task: Option<JoinHandle<()>>,
}

impl Simulator {
    /// Serves `Registration` on `dir/kubelet.sock`. First removes every socket
    /// in `dir`, as kubelet's device manager does when it starts: a restarted
    /// kubelet leaves plugins to notice that and register again.
    ///
    /// # Errors
    /// The socket could not be bound.
    pub fn start(dir: &Path) -> Result<Self, SimulatorError> {
        remove_sockets(dir);
        let (listener, socket_file) =
            socket::bind(dir, proto::KUBELET_SOCKET).map_err(|cause| SimulatorError::Bind {
                path: dir.join(proto::KUBELET_SOCKET).display().to_string(),
                cause,
            })?;
        let (tx, rx) = watch::channel(KubeletView::default());
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            view: tx,
            clients: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
        });
        let service = RegistrationService {
            shared: shared.clone(),
        };
        let shutdown = shared.shutdown.clone();
        let task = tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(RegistrationServer::new(service))
                .serve_with_incoming_shutdown(
                    UnixListenerStream::new(listener),
                    shutdown.cancelled_owned(),
                )
                .await;
            if let Err(err) = served {
                tracing::error!(cause = %err, "kubelet simulator stopped");
            }
            drop(socket_file);
        });
        Ok(Self {
            shared,
            view: rx,
            task: Some(task),
        })
    }

    /// The directory holding `kubelet.sock` and the plugins' sockets.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// What the simulator knows now.
    pub fn view(&self) -> KubeletView {
        self.view.borrow().clone()
    }

    /// A receiver that sees every change of the view.
    pub fn subscribe(&self) -> watch::Receiver<KubeletView> {
        self.view.clone()
    }

    /// Waits until `condition` holds for the view, at most `timeout`; returns the
    /// view that satisfied it.
    ///
    /// # Errors
    /// [`SimulatorError::Timeout`] naming `what`.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        mut condition: impl FnMut(&KubeletView) -> bool,
    ) -> Result<KubeletView, SimulatorError> {
        let mut rx = self.view.clone();
        match tokio::time::timeout(timeout, rx.wait_for(|v| condition(v))).await {
            Ok(Ok(view)) => Ok(view.clone()),
            _ => Err(SimulatorError::Timeout(timeout, what.to_string())),
        }
    }

    /// A client on the connection kubelet keeps to `resource`'s endpoint (for
    /// calls a test sends on its own, e.g. one held while it changes the
    /// resource).
    ///
    /// # Errors
    /// The resource is not registered.
    pub fn client(&self, resource: &str) -> Result<DevicePluginClient<Channel>, SimulatorError> {
        let clients = self
            .shared
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let (channel, _) = clients
            .get(resource)
            .ok_or_else(|| SimulatorError::NotRegistered(resource.to_string()))?;
        Ok(DevicePluginClient::new(channel.clone()))
    }

    /// Calls the resource's Allocate with one container request per entry of
    /// `containers`, as kubelet does when admitting a pod.
    ///
    /// # Errors
    /// Not registered, or the plugin's error status.
    pub async fn allocate(
        &self,
        resource: &str,
        containers: &[&[&str]],
    ) -> Result<AllocateResponse, SimulatorError> {
        let request = AllocateRequest {
            container_requests: containers
                .iter()
                .map(|ids| ContainerAllocateRequest {
                    devices_ids: ids.iter().map(|s| s.to_string()).collect(),
                })
                .collect(),
        };
        Ok(self.client(resource)?.allocate(request).await?.into_inner())
    }

    /// Calls GetPreferredAllocation for one container.
    ///
    /// # Errors
    /// Not registered, or the plugin's error status.
    pub async fn preferred_allocation(
        &self,
        resource: &str,
        available: &[&str],
        must_include: &[&str],
        size: i32,
    ) -> Result<PreferredAllocationResponse, SimulatorError> {
        let request = PreferredAllocationRequest {
            container_requests: vec![ContainerPreferredAllocationRequest {
                available_device_i_ds: available.iter().map(|s| s.to_string()).collect(),
                must_include_device_i_ds: must_include.iter().map(|s| s.to_string()).collect(),
                allocation_size: size,
            }],
        };
        Ok(self
            .client(resource)?
            .get_preferred_allocation(request)
            .await?
            .into_inner())
    }

    /// Calls PreStartContainer with `ids` (kubelet does so only when the plugin's
    /// options ask for it; a plugin must answer anyway).
    ///
    /// # Errors
    /// Not registered, or the plugin's error status.
    pub async fn pre_start_container(
        &self,
        resource: &str,
        ids: &[&str],
    ) -> Result<(), SimulatorError> {
        let request = PreStartContainerRequest {
            devices_ids: ids.iter().map(|s| s.to_string()).collect(),
        };
        self.client(resource)?.pre_start_container(request).await?;
        Ok(())
    }

    /// Restarts in place, as kubelet does: stops (every stream ends,
    /// `kubelet.sock` is removed), then starts afresh in the same directory with an
    /// empty view, removing the plugins' sockets.
    ///
    /// # Errors
    /// The new socket could not be bound.
    pub async fn restart(&mut self) -> Result<(), SimulatorError> {
        self.shared.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let dir = self.shared.dir.clone();
        *self = Self::start(&dir)?;
        Ok(())
    }

    /// Stops serving, ends every stream and removes `kubelet.sock`.
    pub async fn stop(mut self) {
        self.shared.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

/// Removes the unix sockets in `dir` (best effort, like kubelet's clean-up).
fn remove_sockets(dir: &Path) {
    use std::os::unix::fs::FileTypeExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_socket()) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

struct RegistrationService {
    shared: Arc<Shared>,
}

impl RegistrationService {
    fn refuse(&self, request: RegisterRequest, reason: String) -> Status {
        tracing::warn!(resource = %request.resource_name, %reason, "kubelet simulator refused a registration");
        self.shared
            .view
            .send_modify(|v| v.refused.push((request, reason.clone())));
        Status::invalid_argument(reason)
    }
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<Empty>, Status> {
        let request = request.into_inner();
        // The checks kubelet's device manager makes before accepting a plugin.
        if request.version != proto::VERSION {
            let reason = format!(
                "version {:?} is not supported (kubelet supports {})",
                request.version,
                proto::VERSION
            );
            return Err(self.refuse(request, reason));
        }
        if let Err(err) = ResourceName::parse(&request.resource_name) {
            let reason = format!("invalid extended resource name: {err}");
            return Err(self.refuse(request, reason));
        }
        if request.endpoint.is_empty() {
            return Err(self.refuse(request, "empty endpoint".to_string()));
        }
        let resource = request.resource_name.clone();
        let endpoint = self.shared.dir.join(&request.endpoint);
        let channel = socket::channel(&endpoint).map_err(|e| Status::internal(e.to_string()))?;
        let stream_token = self.shared.shutdown.child_token();
        // A new registration of the same resource replaces the old endpoint.
        if let Some((_, old)) = self
            .shared
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(resource.clone(), (channel.clone(), stream_token.clone()))
        {
            old.cancel();
        }
        self.shared.view.send_modify(|v| {
            let plugin = v.plugins.entry(resource.clone()).or_default();
            plugin.registration = request.clone();
            plugin.registrations += 1;
            plugin.options = None;
            plugin.updates.clear();
            plugin.streaming = false;
            plugin.stream_error = None;
        });
        tracing::info!(resource = %resource, endpoint = %request.endpoint, "kubelet simulator accepted a registration");
        tokio::spawn(follow_plugin(
            self.shared.clone(),
            resource,
            channel,
            stream_token,
        ));
        Ok(Response::new(Empty {}))
    }
}

/// Reads the plugin's options, then follows its ListAndWatch stream until it ends
/// or the token is cancelled.
async fn follow_plugin(
    shared: Arc<Shared>,
    resource: String,
    channel: Channel,
    token: CancellationToken,
) {
    let mut client = DevicePluginClient::new(channel);
    let record_error = |reason: String| {
        shared.view.send_modify(|v| {
            if let Some(p) = v.plugins.get_mut(&resource) {
                p.streaming = false;
                p.stream_error = Some(reason.clone());
            }
        });
    };
    let options = tokio::select! {
        () = token.cancelled() => return,
        options = client.get_device_plugin_options(Empty {}) => options,
    };
    match options {
        Ok(options) => shared.view.send_modify(|v| {
            if let Some(p) = v.plugins.get_mut(&resource) {
                p.options = Some(options.into_inner());
            }
        }),
        Err(status) => return record_error(format!("GetDevicePluginOptions: {status}")),
    }
    let stream = tokio::select! {
        () = token.cancelled() => return,
        stream = client.list_and_watch(Empty {}) => stream,
    };
    let mut stream = match stream {
        Ok(stream) => stream.into_inner(),
        Err(status) => return record_error(format!("ListAndWatch: {status}")),
    };
    shared.view.send_modify(|v| {
        if let Some(p) = v.plugins.get_mut(&resource) {
            p.streaming = true;
        }
    });
    loop {
        let message = tokio::select! {
            () = token.cancelled() => return,
            message = stream.next() => message,
        };
        match message {
            Some(Ok(update)) => shared.view.send_modify(|v| {
                if let Some(p) = v.plugins.get_mut(&resource) {
                    if p.updates.len() == HISTORY {
                        p.updates.remove(0);
                    }
                    p.updates.push(update.devices.clone());
                    p.devices = update.devices;
                }
            }),
            Some(Err(status)) => return record_error(format!("ListAndWatch: {status}")),
            None => return record_error("ListAndWatch stream ended".to_string()),
        }
    }
}
