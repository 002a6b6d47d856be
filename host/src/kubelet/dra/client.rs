//! The DRA frontend's API-server access, through kube-rs: connected on first
//! use (never when no resource is served through DRA), from `--kubeconfig` or,
//! without it, the in-cluster service account (then `$KUBECONFIG`,
//! `~/.kube/config`), and the few calls the frontend makes.

use std::path::PathBuf;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::{ResourceClaim, ResourceSlice};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use tokio::sync::OnceCell;

/// The field manager of the host's server-side applies.
pub const FIELD_MANAGER: &str = "wasm-device-plugin";

/// A lazily connected API-server client.
pub struct ApiClient {
    kubeconfig: Option<PathBuf>,
    client: OnceCell<Client>,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("kubeconfig", &self.kubeconfig)
            .field("connected", &self.client.initialized())
            .finish()
    }
}

impl ApiClient {
    /// A client that connects on first use, with `kubeconfig` if given.
    pub fn new(kubeconfig: Option<PathBuf>) -> Self {
        Self {
            kubeconfig,
            client: OnceCell::new(),
        }
    }

    async fn client(&self) -> Result<Client, String> {
        self.client
            .get_or_try_init(|| async {
                let config = match &self.kubeconfig {
                    Some(path) => {
                        let file = Kubeconfig::read_from(path).map_err(|e| {
                            format!("cannot read kubeconfig {}: {e}", path.display())
                        })?;
                        Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                            .await
                            .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
                    }
                    None => Config::infer().await.map_err(|e| {
                        format!("no API-server configuration (in-cluster, $KUBECONFIG or ~/.kube/config; or pass --kubeconfig): {e}")
                    })?,
                };
                tracing::info!(server = %config.cluster_url, "connecting to the API server");
                Client::try_from(config).map_err(|e| format!("cannot build the API-server client: {e}"))
            })
            .await
            .cloned()
    }

    /// The ResourceClaim `namespace/name`.
    ///
    /// # Errors
    /// Not found, not allowed, or the API server unreachable; says which.
    pub async fn claim(&self, namespace: &str, name: &str) -> Result<ResourceClaim, String> {
        let api: Api<ResourceClaim> = Api::namespaced(self.client().await?, namespace);
        api.get(name)
            .await
            .map_err(|e| describe("get the ResourceClaim", e))
    }

    /// The Node `name`'s UID.
    ///
    /// # Errors
    /// As [`ApiClient::claim`].
    pub async fn node_uid(&self, name: &str) -> Result<String, String> {
        let api: Api<Node> = Api::all(self.client().await?);
        let node = api
            .get(name)
            .await
            .map_err(|e| describe(&format!("get Node {name}"), e))?;
        node.metadata
            .uid
            .ok_or_else(|| format!("Node {name} has no UID"))
    }

    /// The ResourceSlices of `driver` on `node`.
    ///
    /// # Errors
    /// As [`ApiClient::claim`].
    pub async fn slices(&self, driver: &str, node: &str) -> Result<Vec<ResourceSlice>, String> {
        let api: Api<ResourceSlice> = Api::all(self.client().await?);
        let params =
            ListParams::default().fields(&format!("spec.driver={driver},spec.nodeName={node}"));
        Ok(api
            .list(&params)
            .await
            .map_err(|e| describe("list ResourceSlices", e))?
            .items)
    }

    /// Creates or replaces `slice` (server-side apply, owning every field).
    ///
    /// # Errors
    /// As [`ApiClient::claim`]; the API server's validation errors included.
    pub async fn apply_slice(&self, slice: &ResourceSlice) -> Result<(), String> {
        let api: Api<ResourceSlice> = Api::all(self.client().await?);
        let name = slice.metadata.name.clone().unwrap_or_default();
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(slice),
        )
        .await
        .map(drop)
        .map_err(|e| describe(&format!("apply ResourceSlice {name}"), e))
    }

    /// Deletes the ResourceSlice `name` (gone already is fine).
    ///
    /// # Errors
    /// As [`ApiClient::claim`].
    pub async fn delete_slice(&self, name: &str) -> Result<(), String> {
        let api: Api<ResourceSlice> = Api::all(self.client().await?);
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(e) => Err(describe(&format!("delete ResourceSlice {name}"), e)),
        }
    }
}

/// `error` while trying `what`, in words an operator can act on.
fn describe(what: &str, error: kube::Error) -> String {
    match error {
        kube::Error::Api(status) if status.code == 403 => format!(
            "cannot {what}: forbidden ({}); does the host's ServiceAccount have the RBAC of deploy/?",
            status.message
        ),
        kube::Error::Api(status) if status.code == 404 => {
            format!("cannot {what}: not found ({})", status.message)
        }
        kube::Error::Api(status) => format!("cannot {what}: {} ({})", status.message, status.code),
        other => format!("cannot {what}: {other}"),
    }
}
