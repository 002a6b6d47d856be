//! The DRA frontend: each resource whose manifest says `api = "dra"` is served
//! as a Dynamic Resource Allocation kubelet plugin (driver) of its own,
//! speaking `resource.k8s.io/v1` to the API server and kubelet's DRA plugin API
//! (v1 and v1beta1) over unix sockets, as upstream's `kubeletplugin` helper
//! does for a Go driver:
//!
//! - `registration`: the plugin-watcher socket in kubelet's `plugins_registry`;
//! - `service` and `driver`: NodePrepareResources / NodeUnprepareResources,
//!   through the snapshot's backend (the guest), with a CDI spec per claim
//!   ([`crate::cdi`]) and prepared claims kept in `checkpoint`;
//! - `slices`: the driver's devices published as ResourceSlices (`names` maps
//!   guest ids to device names);
//! - `client`: the API server, connected on first use;
//! - `simulator`: kubelet's plugin watcher and DRA client, for the demo and
//!   the tests.
//!
//! Created only when a resource first asks for DRA (see [`crate::frontend::Frontends`]).
//! Never names a wasmtime type, nor a registry one.

pub mod checkpoint;
pub mod client;
pub mod driver;
pub mod names;
pub mod proto;
pub mod registration;
pub mod service;
pub mod simulator;
pub mod slices;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;

use crate::cdi::{self, CdiDir};
use crate::frontend::{Frontend, ServeAs, ServeRequest, Served};
use crate::kubelet::dataplane::DataPlane;
use crate::kubelet::registrations::{PluginStatus, Registrations};
use crate::kubelet::socket;
use checkpoint::Checkpoint;
use client::ApiClient;
use driver::Driver;
use registration::{RegistrationService, RegistrationState};
use slices::SliceStatus;

/// What the DRA frontend needs to know (the `run` flags).
#[derive(Debug, Clone)]
pub struct DraSettings {
    /// This node's name: the pool of every driver, and the Node that owns the
    /// slices.
    pub node_name: String,
    /// The kubeconfig to use; `None`: in-cluster, then the usual places.
    pub kubeconfig: Option<PathBuf>,
    /// kubelet's plugin-watcher directory.
    pub registry_dir: PathBuf,
    /// kubelet's plugins directory (each driver's socket in a directory of its own).
    pub plugins_dir: PathBuf,
    /// Where prepared claims are checkpointed.
    pub state_dir: PathBuf,
    /// The host pod's UID, for rolling-update socket names.
    pub pod_uid: Option<String>,
}

/// The DRA frontend.
pub struct Dra {
    settings: Arc<DraSettings>,
    client: Arc<ApiClient>,
    cdi: Arc<CdiDir>,
    data_plane: Arc<DataPlane>,
    /// Driver names being served: one resource per driver.
    drivers: Arc<Mutex<HashSet<String>>>,
    /// Where each resource stands with kubelet: registered once kubelet
    /// registered its driver and its slices are published.
    registrations: Registrations,
    /// Cancelled when the whole host stops (not when one resource goes).
    host_stopping: CancellationToken,
}

impl Dra {
    /// A frontend serving drivers on this node; connects to the API server
    /// on first use.
    pub fn new(
        settings: DraSettings,
        cdi: Arc<CdiDir>,
        data_plane: Arc<DataPlane>,
        registrations: Registrations,
        host_stopping: CancellationToken,
    ) -> Self {
        let client = Arc::new(ApiClient::new(settings.kubeconfig.clone()));
        Self {
            settings: Arc::new(settings),
            client,
            cdi,
            data_plane,
            drivers: Arc::default(),
            registrations,
            host_stopping,
        }
    }
}

/// A driver name held while served; released when dropped.
struct DriverHold {
    drivers: Arc<Mutex<HashSet<String>>>,
    name: String,
}

impl Drop for DriverHold {
    fn drop(&mut self) {
        self.drivers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.name);
    }
}

impl Frontend for Dra {
    fn serve(&self, request: ServeRequest) -> Result<Served, String> {
        let ServeAs::Dra { driver: name } = &request.serve_as else {
            return Err(format!(
                "the DRA frontend cannot serve as {}",
                request.serve_as
            ));
        };
        let name = name.clone();
        let resource = request.snapshots.borrow().name().clone();
        if !self
            .drivers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.clone())
        {
            return Err(format!(
                "DRA driver {name} is already served for another resource; give this one its own `driver`"
            ));
        }
        let hold = DriverHold {
            drivers: self.drivers.clone(),
            name: name.clone(),
        };
        let cdi_kind = cdi::claim_kind(&name)?;
        let settings = &self.settings;
        let checkpoint = Checkpoint::open(&settings.state_dir, &name)?;
        let pod_uid = settings.pod_uid.as_deref();
        let plugin_dir = settings.plugins_dir.join(&name);
        std::fs::create_dir_all(&plugin_dir).map_err(|e| {
            format!(
                "cannot create the driver's directory {} (is kubelet's plugins directory, --kubelet-plugins-dir, mounted and writable?): {e}",
                plugin_dir.display()
            )
        })?;
        let (dra_listener, dra_socket) =
            socket::bind(&plugin_dir, &registration::dra_socket(pod_uid))
                .map_err(|e| format!("cannot listen in {}: {e}", plugin_dir.display()))?;
        let registration_name =
            registration::registration_socket(&settings.registry_dir, &name, pod_uid);
        let (registration_listener, registration_socket) =
            socket::bind(&settings.registry_dir, &registration_name).map_err(|e| {
                format!(
                    "cannot listen in kubelet's plugin-watcher directory {} (--kubelet-registry-dir; is it mounted?): {e}",
                    settings.registry_dir.display()
                )
            })?;

        let ServeRequest {
            snapshots,
            metrics,
            shutdown,
            ..
        } = request;
        let driver = Arc::new(Driver::new(
            name.clone(),
            settings.node_name.clone(),
            resource.clone(),
            cdi_kind,
            snapshots.clone(),
            self.cdi.clone(),
            self.client.clone(),
            checkpoint,
            metrics,
        ));
        self.registrations.set(&resource, PluginStatus::Waiting);

        // Serve first, then let kubelet find the registration socket: both
        // are bound already, so kubelet can dial the endpoint at once.
        let servers = shutdown.child_token();
        let dra_server = {
            let service = service::DraService::new(driver.clone());
            let stop = servers.clone();
            self.data_plane.spawn(async move {
                tonic::transport::Server::builder()
                    .add_service(proto::v1::dra_plugin_server::DraPluginServer::new(
                        service.clone(),
                    ))
                    .add_service(proto::v1beta1::dra_plugin_server::DraPluginServer::new(
                        service,
                    ))
                    .serve_with_incoming_shutdown(
                        UnixListenerStream::new(dra_listener),
                        stop.cancelled_owned(),
                    )
                    .await
            })
        };
        let (registration_tx, mut registration_rx) = watch::channel(RegistrationState::Waiting);
        let registration_server = {
            let service = RegistrationService {
                driver: name.clone(),
                endpoint: dra_socket.path().display().to_string(),
                state: registration_tx,
            };
            let stop = servers.clone();
            self.data_plane.spawn(async move {
                tonic::transport::Server::builder()
                    .add_service(
                        proto::registration::registration_server::RegistrationServer::new(service),
                    )
                    .serve_with_incoming_shutdown(
                        UnixListenerStream::new(registration_listener),
                        stop.cancelled_owned(),
                    )
                    .await
            })
        };
        let (slices_tx, mut slices_rx) =
            watch::channel(SliceStatus::Pending("not published yet".into()));
        let publisher = tokio::spawn(slices::publish(
            driver.clone(),
            snapshots,
            slices_tx,
            shutdown.clone(),
            self.host_stopping.clone(),
        ));
        tracing::info!(driver = %name, resource = %resource, socket = %dra_socket.path().display(), registration = %registration_socket.path().display(), "serving DRA driver");

        let registrations = self.registrations.clone();
        let endpoint = registration_socket.file_name();
        let task = tokio::spawn(async move {
            loop {
                let registered = *registration_rx.borrow_and_update()
                    == RegistrationState::Registered
                    && matches!(*slices_rx.borrow_and_update(), SliceStatus::Published(_));
                registrations.set(
                    &resource,
                    if registered {
                        PluginStatus::Registered(endpoint.clone())
                    } else {
                        PluginStatus::Waiting
                    },
                );
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    changed = registration_rx.changed() => if changed.is_err() { break },
                    // The publisher ends only when the resource is withdrawn.
                    changed = slices_rx.changed() => if changed.is_err() { break },
                }
            }
            // kubelet loses the registration socket first, then the service.
            drop(registration_socket);
            servers.cancel();
            for (what, server) in [("registration", registration_server), ("DRA", dra_server)] {
                match server.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(driver = %name, server = what, cause = %e, "gRPC server failed")
                    }
                    Err(e) => {
                        tracing::warn!(driver = %name, server = what, cause = %e, "gRPC server task failed")
                    }
                }
            }
            drop(dra_socket);
            let _ = publisher.await;
            registrations.remove(&resource);
            tracing::info!(driver = %name, "DRA driver no longer served");
            drop(hold);
        });
        Ok(Served { task })
    }
}
