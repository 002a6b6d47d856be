//! `Registration.Register` on kubelet's socket: tells kubelet that a resource is
//! served at an endpoint in the device-plugin directory.

use std::path::Path;
use std::time::Duration;

use crate::domain::ResourceName;
use crate::kubelet::deviceplugin::proto;
use crate::kubelet::deviceplugin::proto::{
    DevicePluginOptions, RegisterRequest, registration_client::RegistrationClient,
};
use crate::kubelet::socket;

/// How long one Register call may take before it counts as failed.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a registration failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    /// Kubelet's socket could not be reached.
    #[error("cannot reach kubelet at {path}: {cause}")]
    Unreachable {
        /// The socket dialed.
        path: String,
        /// What went wrong.
        cause: String,
    },
    /// Kubelet answered with an error (wrong version, bad resource name, ...).
    #[error("kubelet refused the registration: {0}")]
    Refused(tonic::Status),
}

/// The options this host advertises for every resource: no PreStartContainer
/// (nothing to do before a container starts), GetPreferredAllocation available.
pub fn plugin_options() -> DevicePluginOptions {
    DevicePluginOptions {
        pre_start_required: false,
        get_preferred_allocation_available: true,
    }
}

/// Registers `resource`, served at `endpoint` (a file name in `kubelet_dir`), with
/// the kubelet listening on `kubelet_dir/kubelet.sock`.
///
/// # Errors
/// [`RegistrationError`]: kubelet unreachable, or it refused.
pub async fn register(
    kubelet_dir: &Path,
    endpoint: &str,
    resource: &ResourceName,
) -> Result<(), RegistrationError> {
    let path = kubelet_dir.join(proto::KUBELET_SOCKET);
    let unreachable = |cause: String| RegistrationError::Unreachable {
        path: path.display().to_string(),
        cause,
    };
    let channel = socket::channel(&path).map_err(|e| unreachable(e.to_string()))?;
    let mut client = RegistrationClient::new(channel);
    let request = RegisterRequest {
        version: proto::VERSION.to_string(),
        endpoint: endpoint.to_string(),
        resource_name: resource.as_str().to_string(),
        options: Some(plugin_options()),
    };
    let mut request = tonic::Request::new(request);
    request.set_timeout(REGISTER_TIMEOUT);
    match client.register(request).await {
        Ok(_) => Ok(()),
        // A transport failure surfaces as Unavailable/Unknown with no answer from kubelet.
        Err(status) if status.code() == tonic::Code::Unavailable => {
            Err(unreachable(status.message().to_string()))
        }
        Err(status) => Err(RegistrationError::Refused(status)),
    }
}
