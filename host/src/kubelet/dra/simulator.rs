//! kubelet's side of DRA, for the demo and the tests: the plugin watcher's
//! registration handshake (`GetInfo`, check the plugin, dial its endpoint,
//! `NotifyRegistrationStatus`) and a client of the DRA service, as kubelet's
//! `pluginmanager` and DRA manager do it.

use std::path::{Path, PathBuf};

use crate::kubelet::dra::proto::registration::{
    DRA_PLUGIN, InfoRequest, RegistrationStatus, registration_client::RegistrationClient,
};
use crate::kubelet::dra::proto::{v1, v1beta1};
use crate::kubelet::socket;

/// What a plugin registered as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// The driver name.
    pub driver: String,
    /// Its DRA socket.
    pub endpoint: PathBuf,
    /// The service versions it offered.
    pub versions: Vec<String>,
}

/// Registers the plugin behind the registration socket `path` as kubelet's
/// plugin watcher does: asks its info, checks that it is a DRA plugin offering
/// a version kubelet speaks and that its endpoint accepts, then tells it the
/// outcome (a refusal too, with the reason).
///
/// # Errors
/// Why kubelet would not register it.
pub async fn register(path: &Path) -> Result<Registered, String> {
    let channel = socket::channel(path).map_err(|e| e.to_string())?;
    let mut client = RegistrationClient::new(channel);
    let info = client
        .get_info(InfoRequest {})
        .await
        .map_err(|e| format!("GetInfo on {}: {e}", path.display()))?
        .into_inner();
    let verdict = if info.r#type != DRA_PLUGIN {
        Err(format!("plugin type {:?} is not {DRA_PLUGIN}", info.r#type))
    } else if !info
        .supported_versions
        .iter()
        .any(|v| v == v1::SERVICE || v == v1beta1::SERVICE)
    {
        Err(format!(
            "none of the versions {:?} is {} or {}",
            info.supported_versions,
            v1::SERVICE,
            v1beta1::SERVICE
        ))
    } else if !Path::new(&info.endpoint).is_absolute() {
        Err(format!(
            "endpoint {:?} is not an absolute path",
            info.endpoint
        ))
    } else {
        socket::check_accepting(Path::new(&info.endpoint))
            .await
            .map_err(|e| format!("endpoint {}: {e}", info.endpoint))
    };
    client
        .notify_registration_status(RegistrationStatus {
            plugin_registered: verdict.is_ok(),
            error: verdict.clone().err().unwrap_or_default(),
        })
        .await
        .map_err(|e| format!("NotifyRegistrationStatus on {}: {e}", path.display()))?;
    verdict?;
    Ok(Registered {
        driver: info.name,
        endpoint: info.endpoint.into(),
        versions: info.supported_versions,
    })
}

/// A v1 DRA client of the plugin at `endpoint`.
///
/// # Errors
/// Never in practice (the channel connects lazily).
pub fn client(
    endpoint: &Path,
) -> Result<v1::dra_plugin_client::DraPluginClient<tonic::transport::Channel>, String> {
    Ok(v1::dra_plugin_client::DraPluginClient::new(
        socket::channel(endpoint).map_err(|e| e.to_string())?,
    ))
}

/// A v1beta1 DRA client of the plugin at `endpoint`.
///
/// # Errors
/// As [`client`].
pub fn client_v1beta1(
    endpoint: &Path,
) -> Result<v1beta1::dra_plugin_client::DraPluginClient<tonic::transport::Channel>, String> {
    Ok(v1beta1::dra_plugin_client::DraPluginClient::new(
        socket::channel(endpoint).map_err(|e| e.to_string())?,
    ))
}
