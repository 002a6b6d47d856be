//! The demo's DRA half (`wasm-device-plugin demo --kubeconfig FILE`): the module
//! serving [`RESOURCE`] is switched to DRA by rewriting its manifest live, and the
//! demo plays every part of a cluster the host talks to besides the API server:
//! the node (it creates the Node that owns the driver's ResourceSlices), kubelet
//! (the plugin watcher's registration handshake and the DRA client, from
//! `kubelet::dra::simulator`) and the scheduler (it writes the claim's allocation).
//!
//! Demo-only: nothing in the product paths calls this. It writes only the objects
//! it names after its own node (`wdp-demo-<pid>-<n>`), and [`Cluster::clean`]
//! deletes them, also when a step failed.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::{
    AllocationResult, DeviceAllocationConfiguration, DeviceAllocationResult, DeviceClaim,
    DeviceClaimConfiguration, DeviceRequest, DeviceRequestAllocationResult, ExactDeviceRequest,
    OpaqueDeviceConfiguration, ResourceClaim, ResourceClaimSpec, ResourceSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::runtime::RawExtension;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::app::{DraConfig, Host};
use crate::kubelet::deviceplugin::simulator::Simulator;
use crate::kubelet::dra::proto::v1;
use crate::kubelet::dra::simulator;
use crate::registry::ModuleState;

use super::READY_TIMEOUT;

/// The resource the demo switches to DRA: kind dev-1 of the virtual-devices guest.
pub const RESOURCE: &str = "example.com/dev-1";
/// Its driver: `<name>.<domain>` of [`RESOURCE`], the manifest's default.
pub const DRIVER: &str = "dev-1.example.com";
/// The namespace of the demo's claim (the API server creates it when it starts).
const NAMESPACE: &str = "default";
/// The claim's one request.
const REQUEST: &str = "dev";
/// The DeviceClass the claim names (the demo allocates by hand: it need not exist).
const CLASS: &str = "dev-1.example.com";
/// The pod the claim is reserved for (there is none: nothing runs containers here).
const POD: (&str, &str) = ("demo-pod", "0d3e5c1a-0000-4000-8000-00000000d3e0");

/// The manifest the switched module gets: kind dev-1 through DRA, the others
/// (dev-2, by default) still through the device-plugin API.
const MANIFEST: &str = "\
# Written by `wasm-device-plugin demo`: kind dev-1 through DRA, the others still
# through the device-plugin API.
domain = \"example.com\"

[resources.dev-1]
api = \"dra\"
";
/// The opaque configuration the demo's claim carries for the driver (the virtual
/// guest's `prepare` adds its `env` to the container's environment).
const CONFIG: &str = r#"{"env":{"GREETING":"hello-from-the-claim"}}"#;

/// The demo's access to the API server, and what it created there (to delete).
pub struct Cluster {
    client: Client,
    url: String,
    kubeconfig: PathBuf,
    /// The simulated node's name: the drivers' pool, the slices' owner.
    node: String,
    node_created: bool,
    claim_created: Option<String>,
}

impl Cluster {
    /// A client of the API server in `kubeconfig` (nothing is asked of it yet) and
    /// the host's DRA settings for a node of the demo's own, with kubelet's
    /// directories under `dir`.
    ///
    /// # Errors
    /// The kubeconfig cannot be read, or a directory cannot be created.
    pub async fn connect(kubeconfig: &Path, dir: &Path) -> anyhow::Result<(Self, DraConfig)> {
        static NODES: AtomicUsize = AtomicUsize::new(0);
        let file = Kubeconfig::read_from(kubeconfig)
            .with_context(|| format!("cannot read kubeconfig {}", kubeconfig.display()))?;
        let config = Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
            .await
            .with_context(|| format!("kubeconfig {}", kubeconfig.display()))?;
        let url = config.cluster_url.to_string();
        let client = Client::try_from(config).context("cannot build the API-server client")?;
        let node = format!(
            "wdp-demo-{}-{}",
            std::process::id(),
            NODES.fetch_add(1, Ordering::Relaxed)
        );
        let dirs = ["plugins_registry", "plugins", "state"].map(|d| dir.join(d));
        for d in &dirs {
            std::fs::create_dir(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        let [registry_dir, plugins_dir, state_dir] = dirs;
        let dra = DraConfig {
            node_name: Some(node.clone()),
            kubeconfig: Some(kubeconfig.to_path_buf()),
            registry_dir,
            plugins_dir,
            state_dir,
            pod_uid: None,
        };
        let cluster = Self {
            client,
            url,
            kubeconfig: kubeconfig.to_path_buf(),
            node,
            node_created: false,
            claim_created: None,
        };
        Ok((cluster, dra))
    }

    /// Deletes what the demo created: its claim, the slices published for its
    /// node (a stopped host leaves them to the next one, and no garbage collector
    /// runs here) and its Node. Run after the host stopped, so that nothing
    /// republishes.
    ///
    /// # Errors
    /// The API server refused a deletion (the others are still tried).
    pub async fn clean(self, out: &mut impl Write) -> anyhow::Result<()> {
        if !self.node_created && self.claim_created.is_none() {
            return Ok(());
        }
        let mut deleted = Vec::new();
        let mut failed = Vec::new();
        if let Some(claim) = &self.claim_created {
            let api: Api<ResourceClaim> = Api::namespaced(self.client.clone(), NAMESPACE);
            match delete(&api, claim).await {
                Ok(()) => deleted.push(format!("ResourceClaim {NAMESPACE}/{claim}")),
                Err(e) => failed.push(format!("ResourceClaim {NAMESPACE}/{claim}: {e}")),
            }
        }
        if self.node_created {
            let api: Api<ResourceSlice> = Api::all(self.client.clone());
            let params = ListParams::default().fields(&format!("spec.nodeName={}", self.node));
            match api.list(&params).await {
                Ok(list) => {
                    for slice in list.items {
                        let name = slice.metadata.name.unwrap_or_default();
                        match delete(&api, &name).await {
                            Ok(()) => deleted.push(format!("ResourceSlice {name}")),
                            Err(e) => failed.push(format!("ResourceSlice {name}: {e}")),
                        }
                    }
                }
                Err(e) => failed.push(format!("the ResourceSlices of {}: {e}", self.node)),
            }
            let api: Api<Node> = Api::all(self.client.clone());
            match delete(&api, &self.node).await {
                Ok(()) => deleted.push(format!("Node {}", self.node)),
                Err(e) => failed.push(format!("Node {}: {e}", self.node)),
            }
        }
        writeln!(
            out,
            "\nCleaned up (the host stopped first, so nothing republishes)"
        )?;
        for what in &deleted {
            writeln!(out, "  deleted {what}")?;
        }
        if !failed.is_empty() {
            bail!("cannot delete {}", failed.join("; "));
        }
        Ok(())
    }

    /// The DRA half: switches [`RESOURCE`]'s module to DRA and takes one claim
    /// through it. Says so and returns when no module serves [`RESOURCE`].
    ///
    /// # Errors
    /// A step failed or did not complete within the demo's timeout.
    pub async fn show(
        &mut self,
        host: &Host,
        kubelet: &Simulator,
        dra: &DraConfig,
        modules_dir: &Path,
        cdi_dir: &Path,
        out: &mut impl Write,
    ) -> anyhow::Result<()> {
        let states = host.states().borrow().clone();
        let module = states.iter().find_map(|(name, state)| match state {
            ModuleState::Serving(served) if served.iter().any(|r| r == RESOURCE) => {
                Some((name.clone(), served.clone()))
            }
            _ => None,
        });
        writeln!(
            out,
            "\nDRA: the same module's {RESOURCE}, switched to the DRA driver {DRIVER}"
        )?;
        let Some((module, served)) = module else {
            writeln!(
                out,
                "  skipped: no module serves {RESOURCE} (the shipped virtual-devices guest \
                 without a manifest does)"
            )?;
            return Ok(());
        };
        writeln!(
            out,
            "  API server: {} (--kubeconfig {})",
            self.url,
            self.kubeconfig.display()
        )?;

        let node = Node {
            metadata: ObjectMeta {
                name: Some(self.node.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Node>::all(self.client.clone())
            .create(&PostParams::default(), &node)
            .await
            .with_context(|| format!("cannot create Node {}", self.node))?;
        self.node_created = true;
        writeln!(
            out,
            "  Node {} created: the demo plays the node (kubelet would register it); \
             the driver's ResourceSlices name it as their owner",
            self.node
        )?;

        let path = modules_dir.join(format!("{module}.toml"));
        std::fs::write(&path, MANIFEST)
            .with_context(|| format!("cannot write {}", path.display()))?;
        applied(host, &module, MANIFEST).await?;
        writeln!(
            out,
            "  {module}.toml rewritten, applied live by the host:\n    \
             [resources.dev-1] api = \"dra\""
        )?;
        let others: Vec<&String> = served.iter().filter(|r| *r != RESOURCE).collect();
        kubelet
            .wait_for(
                READY_TIMEOUT,
                &format!("{RESOURCE}'s ListAndWatch stream ended, the module's others streaming"),
                |v| {
                    v.plugin(RESOURCE).is_some_and(|p| !p.streaming)
                        && others
                            .iter()
                            .all(|r| v.plugin(r).is_some_and(|p| p.streaming))
                },
            )
            .await?;
        writeln!(
            out,
            "  device-plugin API: {RESOURCE} withdrawn (kubelet's ListAndWatch stream ended)"
        )?;
        for other in others {
            writeln!(out, "  device-plugin API: {other} still served")?;
        }

        let registration = dra.registry_dir.join(format!("{DRIVER}-reg.sock"));
        let registered = tokio::time::timeout(READY_TIMEOUT, simulator::register(&registration))
            .await
            .context("the plugin watcher's registration did not complete in time")?
            .map_err(|e| anyhow::anyhow!("kubelet would not register the driver: {e}"))?;
        writeln!(
            out,
            "\nDRA registration (kubelet's plugin watcher: GetInfo on {}, NotifyRegistrationStatus)",
            registration.display()
        )?;
        writeln!(
            out,
            "  driver {}  endpoint={}  versions={}",
            registered.driver,
            registered.endpoint.display(),
            registered.versions.join(",")
        )?;
        host.wait_ready(true, READY_TIMEOUT)
            .await
            .context("the driver's slices were not published")?;

        let slices = self.slices().await?;
        let devices: Vec<String> = slices
            .iter()
            .flat_map(|s| s.spec.devices.iter().flatten())
            .map(|d| d.name.clone())
            .collect();
        writeln!(
            out,
            "\nResourceSlices (published by the host; the scheduler allocates from them)"
        )?;
        for slice in &slices {
            let owner = slice
                .metadata
                .owner_references
                .iter()
                .flatten()
                .map(|o| format!("{}/{}", o.kind, o.name))
                .collect::<Vec<_>>()
                .join(",");
            writeln!(
                out,
                "  {}  driver={}  pool={} (generation {})  node={}  owner={owner}",
                slice.metadata.name.as_deref().unwrap_or_default(),
                slice.spec.driver,
                slice.spec.pool.name,
                slice.spec.pool.generation,
                slice.spec.node_name.as_deref().unwrap_or("-"),
            )?;
            for device in slice.spec.devices.iter().flatten() {
                let attributes: Vec<String> = attributes(device)
                    .into_iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .chain(
                        device
                            .capacity
                            .iter()
                            .flatten()
                            .map(|(k, c)| format!("{k}={} (capacity)", c.value.0)),
                    )
                    .collect();
                writeln!(out, "    {}  {}", device.name, attributes.join("  "))?;
            }
        }
        let Some(device) = devices.first() else {
            bail!("the driver published no device: {slices:#?}");
        };

        let claim = self.claim(device).await?;
        let uid = claim.metadata.uid.clone().unwrap_or_default();
        let name = claim.metadata.name.clone().unwrap_or_default();
        writeln!(
            out,
            "\nResourceClaim {NAMESPACE}/{name} (uid {uid}): request `{REQUEST}`, one device of \
             DeviceClass {CLASS}"
        )?;
        writeln!(
            out,
            "  opaque configuration for {DRIVER} (passed to the guest's prepare): {CONFIG}"
        )?;
        writeln!(
            out,
            "  allocated by the demo, playing the scheduler (status.allocation): \
             driver {DRIVER}, pool {}, device {device}; reserved for pod {}",
            self.node, POD.0
        )?;

        let mut client = simulator::client(&registered.endpoint)
            .map_err(|e| anyhow::anyhow!("DRA client: {e}"))?;
        let claim_ref = v1::Claim {
            namespace: NAMESPACE.into(),
            name: name.clone(),
            uid: uid.clone(),
        };
        let mut answer = tokio::time::timeout(
            READY_TIMEOUT,
            client.node_prepare_resources(v1::NodePrepareResourcesRequest {
                claims: vec![claim_ref.clone()],
            }),
        )
        .await
        .context("NodePrepareResources did not answer in time")?
        .context("NodePrepareResources")?
        .into_inner();
        let prepared = answer
            .claims
            .remove(&uid)
            .with_context(|| format!("NodePrepareResources answered nothing for claim {uid}"))?;
        if !prepared.error.is_empty() {
            bail!("NodePrepareResources failed the claim: {}", prepared.error);
        }
        writeln!(
            out,
            "\nNodePrepareResources (kubelet, before the pod's containers start)"
        )?;
        for d in &prepared.devices {
            writeln!(
                out,
                "  request {}: device {}/{}  CDI ids {}",
                d.request_names.join(","),
                d.pool_name,
                d.device_name,
                d.cdi_device_ids.join(", ")
            )?;
        }
        let spec = cdi_dir.join(format!("wasm-device-plugin-claim_{DRIVER}_{uid}.json"));
        writeln!(
            out,
            "  the claim's CDI spec (the runtime resolves those ids in it):"
        )?;
        super::print_spec(&spec, "    ", out)?;

        let mut answer = tokio::time::timeout(
            READY_TIMEOUT,
            client.node_unprepare_resources(v1::NodeUnprepareResourcesRequest {
                claims: vec![claim_ref],
            }),
        )
        .await
        .context("NodeUnprepareResources did not answer in time")?
        .context("NodeUnprepareResources")?
        .into_inner();
        let unprepared = answer
            .claims
            .remove(&uid)
            .with_context(|| format!("NodeUnprepareResources answered nothing for claim {uid}"))?;
        if !unprepared.error.is_empty() {
            bail!(
                "NodeUnprepareResources failed the claim: {}",
                unprepared.error
            );
        }
        if spec.exists() {
            bail!("{} is left after NodeUnprepareResources", spec.display());
        }
        writeln!(
            out,
            "\nNodeUnprepareResources (kubelet, once the pod is gone)"
        )?;
        writeln!(
            out,
            "  claim {NAMESPACE}/{name}: unprepared; {} removed",
            spec.display()
        )?;
        Ok(())
    }

    /// The ResourceSlices of [`DRIVER`] on the demo's node, sorted by name.
    async fn slices(&self) -> anyhow::Result<Vec<ResourceSlice>> {
        let params = ListParams::default()
            .fields(&format!("spec.driver={DRIVER},spec.nodeName={}", self.node));
        let mut slices = Api::<ResourceSlice>::all(self.client.clone())
            .list(&params)
            .await
            .context("cannot list the driver's ResourceSlices")?
            .items;
        slices.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        Ok(slices)
    }

    /// Creates the demo's claim (one device of [`CLASS`]) and writes its
    /// allocation, `device` of the demo's pool, as the scheduler would; the claim
    /// as stored.
    async fn claim(&mut self, device: &str) -> anyhow::Result<ResourceClaim> {
        let name = format!("{}-claim", self.node);
        let api: Api<ResourceClaim> = Api::namespaced(self.client.clone(), NAMESPACE);
        let claim = ResourceClaim {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(NAMESPACE.into()),
                ..Default::default()
            },
            spec: ResourceClaimSpec {
                devices: Some(DeviceClaim {
                    requests: Some(vec![DeviceRequest {
                        name: REQUEST.into(),
                        exactly: Some(ExactDeviceRequest {
                            device_class_name: CLASS.into(),
                            allocation_mode: Some("ExactCount".into()),
                            count: Some(1),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }]),
                    config: Some(vec![DeviceClaimConfiguration {
                        requests: None,
                        opaque: Some(opaque()?),
                    }]),
                    ..Default::default()
                }),
            },
            status: None,
        };
        api.create(&PostParams::default(), &claim)
            .await
            .with_context(|| format!("cannot create ResourceClaim {NAMESPACE}/{name}"))?;
        self.claim_created = Some(name.clone());
        let allocation = AllocationResult {
            devices: Some(DeviceAllocationResult {
                results: Some(vec![DeviceRequestAllocationResult {
                    request: REQUEST.into(),
                    driver: DRIVER.into(),
                    pool: self.node.clone(),
                    device: device.into(),
                    ..Default::default()
                }]),
                // The scheduler copies the claim's configuration into the allocation.
                config: Some(vec![DeviceAllocationConfiguration {
                    source: "FromClaim".into(),
                    requests: None,
                    opaque: Some(opaque()?),
                }]),
            }),
            ..Default::default()
        };
        let status = serde_json::json!({
            "status": {
                "allocation": allocation,
                "reservedFor": [{ "resource": "pods", "name": POD.0, "uid": POD.1 }],
            }
        });
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
            .await
            .with_context(|| format!("cannot write the allocation of ResourceClaim {name}"))
    }
}

/// [`CONFIG`] as the claim's opaque configuration for [`DRIVER`].
fn opaque() -> anyhow::Result<OpaqueDeviceConfiguration> {
    Ok(OpaqueDeviceConfiguration {
        driver: DRIVER.into(),
        parameters: RawExtension(serde_json::from_str(CONFIG)?),
    })
}

/// Waits until the host runs `module` with the manifest `text`.
async fn applied(host: &Host, module: &str, text: &str) -> anyhow::Result<()> {
    let hash = crate::runtime::cache::content_hash(text.as_bytes());
    let mut versions = host.versions();
    let waited = tokio::time::timeout(
        READY_TIMEOUT,
        versions.wait_for(|v| {
            v.get(module)
                .is_some_and(|m| m.manifest_sha256.as_deref() == Some(hash.as_str()))
        }),
    )
    .await;
    if matches!(waited, Ok(Ok(_))) {
        return Ok(());
    }
    bail!(
        "the host did not apply {module}'s new manifest within {READY_TIMEOUT:?}; refusals: {:?}",
        *host.refusals().borrow()
    )
}

/// Deletes `name` from `api` (gone already is fine).
async fn delete<K>(api: &Api<K>, name: &str) -> Result<(), kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// A slice device's attributes as text (whichever of string, int, bool or version
/// is set), by name.
fn attributes(device: &k8s_openapi::api::resource::v1::Device) -> BTreeMap<String, String> {
    device
        .attributes
        .iter()
        .flatten()
        .map(|(name, value)| {
            let value = value
                .string
                .clone()
                .or_else(|| value.int.map(|i| i.to_string()))
                .or_else(|| value.bool.map(|b| b.to_string()))
                .or_else(|| value.version.clone())
                .unwrap_or_default();
            (name.clone(), value)
        })
        .collect()
}
