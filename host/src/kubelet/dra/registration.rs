//! Registration through kubelet's plugin watcher: kubelet finds the socket in
//! its `plugins_registry` directory, asks `GetInfo` (a DRA plugin, the driver
//! name, where its DRA service listens, the service versions it speaks) and
//! tells the plugin whether it took it (`NotifyRegistrationStatus`). Socket
//! names follow upstream's `kubeletplugin` helper, rolling-update names
//! included.

use base64::Engine as _;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::kubelet::dra::proto::registration::{
    DRA_PLUGIN, InfoRequest, PluginInfo, RegistrationStatus, RegistrationStatusResponse,
    registration_server::Registration,
};
use crate::kubelet::dra::proto::{v1, v1beta1};

/// The longest unix socket path (as upstream counts it).
const UNIX_PATH_MAX: usize = 108;

/// Where a driver stands with kubelet's plugin watcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrationState {
    /// kubelet has not (yet) said.
    Waiting,
    /// kubelet registered the driver.
    Registered,
    /// kubelet refused it; why.
    Refused(String),
}

/// The registration socket's file name in the registry directory: without a
/// pod UID `<driver>-reg.sock`; with one (a rolling update may run two hosts
/// at once), the first that fits of `<driver>-<uid>-reg.sock`,
/// `<driver>-<base64(sha256(uid)[..8])>-reg.sock` and
/// `dra-<base64(sha256(driver NUL uid)[..16])>-reg.sock`, as upstream's
/// `RollingUpdateRegistrarSocketFile`.
pub fn registration_socket(
    registry_dir: &std::path::Path,
    driver: &str,
    pod_uid: Option<&str>,
) -> String {
    let Some(uid) = pod_uid else {
        return format!("{driver}-reg.sock");
    };
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let uid_hash = Sha256::digest(uid.as_bytes());
    let both_hash = Sha256::digest(format!("{driver}\0{uid}").as_bytes());
    let candidates = [
        format!("{driver}-{uid}-reg.sock"),
        format!("{driver}-{}-reg.sock", b64.encode(&uid_hash[..8])),
        format!("dra-{}-reg.sock", b64.encode(&both_hash[..16])),
    ];
    let dir_len = registry_dir.as_os_str().len() + 1;
    candidates
        .iter()
        .find(|name| dir_len + name.len() < UNIX_PATH_MAX)
        .unwrap_or(&candidates[2])
        .clone()
}

/// The DRA socket's file name in the driver's plugin directory: `dra.sock`,
/// or `dra-<uid>.sock` with a pod UID.
pub fn dra_socket(pod_uid: Option<&str>) -> String {
    match pod_uid {
        Some(uid) => format!("dra-{uid}.sock"),
        None => "dra.sock".into(),
    }
}

/// The `Registration` service of one driver.
pub struct RegistrationService {
    /// The driver name.
    pub driver: String,
    /// The DRA socket's absolute path.
    pub endpoint: String,
    /// What kubelet said last.
    pub state: watch::Sender<RegistrationState>,
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn get_info(&self, _: Request<InfoRequest>) -> Result<Response<PluginInfo>, Status> {
        tracing::debug!(driver = %self.driver, "kubelet asked for the plugin's info");
        Ok(Response::new(PluginInfo {
            r#type: DRA_PLUGIN.into(),
            name: self.driver.clone(),
            endpoint: self.endpoint.clone(),
            supported_versions: vec![v1::SERVICE.into(), v1beta1::SERVICE.into()],
        }))
    }

    async fn notify_registration_status(
        &self,
        request: Request<RegistrationStatus>,
    ) -> Result<Response<RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        let state = if status.plugin_registered {
            tracing::info!(driver = %self.driver, "kubelet registered the DRA driver");
            RegistrationState::Registered
        } else {
            tracing::error!(driver = %self.driver, cause = %status.error, "kubelet refused the DRA driver");
            RegistrationState::Refused(status.error)
        };
        self.state.send_replace(state);
        Ok(Response::new(RegistrationStatusResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn socket_names_follow_upstreams_helper() {
        let dir = Path::new("/var/lib/kubelet/plugins_registry");
        assert_eq!(
            registration_socket(dir, "d.example.com", None),
            "d.example.com-reg.sock"
        );
        let uid = "0b7a6c2e-1f1d-4c55-9a43-7a3f1e5c9d21";
        assert_eq!(
            registration_socket(dir, "d.example.com", Some(uid)),
            format!("d.example.com-{uid}-reg.sock")
        );
        let long_driver = format!("{}.example.com", "d".repeat(40));
        let name = registration_socket(dir, &long_driver, Some(uid));
        assert!(
            name.starts_with(&format!("{long_driver}-")) && !name.contains(uid),
            "{name}"
        );
        assert!(dir.as_os_str().len() + 1 + name.len() < UNIX_PATH_MAX);
        assert_eq!(dra_socket(None), "dra.sock");
        assert_eq!(dra_socket(Some("u")), "dra-u.sock");
    }
}
