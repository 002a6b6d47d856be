//! Everything kubelet-facing: the v1beta1 protocol, plugin sockets, the
//! `DevicePlugin` service, registration, and a kubelet simulator for the demo and
//! the tests. Never names a wasmtime type.

pub mod preferred;
pub mod proto;
pub mod registration;
pub mod server;
pub mod simulator;
pub mod socket;

use std::path::Path;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::domain::{DeviceSet, ResourceName};
use registration::RegistrationError;
use server::{DeviceBackend, PluginService};

/// Why a resource could not be served.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// Binding or checking the plugin socket failed.
    #[error("socket {path}: {cause}")]
    Socket {
        /// The socket path.
        path: String,
        /// What went wrong.
        cause: std::io::Error,
    },
    /// Kubelet did not take the registration.
    #[error(transparent)]
    Registration(#[from] RegistrationError),
}

/// A resource being served: its socket's file name and the server task, which
/// ends (and removes the socket) once the shutdown token passed to [`serve`] is
/// cancelled.
#[derive(Debug)]
pub struct ServedResource {
    /// The socket's file name in the kubelet directory (the registered endpoint).
    pub endpoint: String,
    /// The gRPC server; await it after cancelling to know the socket is gone.
    pub task: JoinHandle<()>,
}

/// Serves `resource` on a new socket in `kubelet_dir`, confirms the socket accepts,
/// then registers it with kubelet: serve first, so kubelet can dial the endpoint
/// the moment it learns of it.
///
/// # Errors
/// [`PluginError`]: the socket could not be bound or the registration failed. On
/// error the server is stopped and the socket removed.
pub async fn serve<B: DeviceBackend>(
    kubelet_dir: &Path,
    resource: &ResourceName,
    devices: watch::Receiver<Arc<DeviceSet>>,
    backend: Arc<B>,
    shutdown: CancellationToken,
) -> Result<ServedResource, PluginError> {
    let name = socket::plugin_socket_name(resource);
    let socket_err = |cause| PluginError::Socket {
        path: kubelet_dir.join(&name).display().to_string(),
        cause,
    };
    let (listener, socket_file) = socket::bind(kubelet_dir, &name).map_err(socket_err)?;
    let path = socket_file.path().to_path_buf();
    // The server gets its own child token so that a failed registration below can
    // stop it without touching the caller's token.
    let server_token = shutdown.child_token();
    let service = PluginService::new(resource.clone(), devices, backend, server_token.clone());
    let span_resource = resource.to_string();
    let task = tokio::spawn(async move {
        if let Err(err) = service.serve(listener).await {
            tracing::error!(resource = %span_resource, cause = %err, "device plugin server failed");
        }
        // Dropped only after the server has stopped accepting.
        drop(socket_file);
    });
    let started = async {
        socket::check_accepting(&path).await.map_err(socket_err)?;
        registration::register(kubelet_dir, &name, resource).await?;
        Ok::<_, PluginError>(())
    };
    if let Err(err) = started.await {
        server_token.cancel();
        let _ = task.await;
        return Err(err);
    }
    tracing::info!(resource = %resource, endpoint = %name, "registered with kubelet");
    Ok(ServedResource {
        endpoint: name,
        task,
    })
}
