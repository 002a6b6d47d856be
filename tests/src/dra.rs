//! The host with its DRA frontend against the shared API server ([`ApiServer`]), for
//! the DRA tests (`tests/all/dra.rs`) and the prepare bench
//! (`host/benches/prepare.rs`): kubelet's side is played over real unix sockets by the
//! host's own simulator (`kubelet/dra/simulator.rs`), the scheduler's by the caller
//! (it writes the claim's allocation through [`DraHost::allocated_claim`]).
//!
//! Each fixture has its own node name (so its own pool and slices), namespace and
//! directories. It serves the virtual-devices guest as module [`MODULE`], whose kind
//! `dev-1` is driver [`DRIVER`]; it asserts nothing about behaviour beyond what it
//! needs to go on (the tests do that).

use std::path::PathBuf;

use k8s_openapi::api::resource::v1::ResourceSlice;
use tokio_util::sync::CancellationToken;
use wasm_device_plugin::app::{DraConfig, Host, HostConfig};
use wasm_device_plugin::kubelet::dra::proto::v1;
use wasm_device_plugin::kubelet::dra::simulator;
use wasm_device_plugin::registry::{ModuleState, Settings};

use crate::apiserver::{Allocated, ApiServer, Session, attributes};
use crate::{Dirs, WAIT, guests, host_config, init_logging, manifest_with_config, test_settings};

/// The module's name in the modules directory.
pub const MODULE: &str = "virtual";
/// The driver of kind dev-1 (the default: `<name>.<domain>` of `example.com/dev-1`).
pub const DRIVER: &str = "dev-1.example.com";
/// The DeviceClass the claims name (nothing allocates here: it need not exist).
pub const CLASS: &str = "dev-1.example.com";
/// The pod the claims are reserved for (as `(name, uid)`).
const POD: (&str, &str) = ("pod", "6a9c5c1e-0000-4000-8000-00000000000a");

/// A DRA client of the driver, as kubelet's DRA manager holds one.
pub type DraClient = v1::dra_plugin_client::DraPluginClient<tonic::transport::Channel>;

/// The example manifest's settings: kind dev-1 with `count` devices, through DRA,
/// without the guest's annotation, plus `extra` config pairs.
pub fn manifest(count: u32, extra: &[(&str, &str)]) -> String {
    let kinds = format!("dev-1={count}");
    let mut pairs = vec![("kinds", kinds.as_str()), ("annotation", "off")];
    pairs.extend_from_slice(extra);
    manifest_with_config("domain = \"example.com\"\napi = \"dra\"", &pairs)
}

/// The host with the DRA frontend pointed at the shared API server and at
/// directories of its own, and the caller's session there.
pub struct DraHost {
    /// The session (namespace) its claims are in.
    pub api: Session,
    /// The Node it runs on, which is also its pool.
    pub node: String,
    /// Its modules, kubelet, CDI, registry, plugins and state directories.
    pub dirs: Dirs,
    /// The host.
    pub host: Host,
    /// What it was started with, for [`DraHost::restart`].
    settings: Settings,
    shutdown: CancellationToken,
}

impl DraHost {
    /// Logs to the test's output, then [`DraHost::start_with`] the tests' settings.
    pub async fn start(name: &str, manifest: &str) -> Option<Self> {
        init_logging();
        let dirs = Dirs::new();
        let settings = test_settings(&dirs.kubelet());
        Self::start_with(name, manifest, guests::VIRTUAL_DEVICES, dirs, settings).await
    }

    /// [`DraHost::start`] with the module `wasm` instead of the current virtual guest.
    pub async fn start_module(name: &str, manifest: &str, wasm: &str) -> Option<Self> {
        init_logging();
        let dirs = Dirs::new();
        let settings = test_settings(&dirs.kubelet());
        Self::start_with(name, manifest, wasm, dirs, settings).await
    }

    /// Creates the Node `<namespace>-node`, writes the module `wasm` with `manifest`
    /// into `dirs`' modules directory, starts the host with `settings` (no logging set
    /// up here) and waits until it serves the module; `None` when there is no API
    /// server to run (the caller skips; [`ApiServer::shared`] said so).
    ///
    /// # Panics
    /// The API server refuses the session or the Node, or the host does not serve the
    /// module in time.
    pub async fn start_with(
        name: &str,
        manifest: &str,
        wasm: &str,
        dirs: Dirs,
        settings: Settings,
    ) -> Option<Self> {
        let server = ApiServer::shared()?;
        let api = server.session(name).await;
        let node = format!("{}-node", api.namespace);
        api.create_node(&node).await;
        for dir in ["registry", "plugins", "state"] {
            std::fs::create_dir(dirs.root.path().join(dir)).expect("create dir");
        }
        dirs.write_manifest(MODULE, manifest);
        dirs.add_module(MODULE, wasm);
        let (host, shutdown) = Self::start_host(&dirs, &node, None, settings.clone());
        let fixture = Self {
            api,
            node,
            dirs,
            host,
            settings,
            shutdown,
        };
        fixture.serving().await;
        Some(fixture)
    }

    /// A host on `dirs` for `node` with `settings`, as the pod `pod_uid` when given
    /// (rolling-update socket names).
    ///
    /// # Panics
    /// There is no shared API server, or the host does not start.
    pub fn start_host(
        dirs: &Dirs,
        node: &str,
        pod_uid: Option<&str>,
        settings: Settings,
    ) -> (Host, CancellationToken) {
        let server = ApiServer::shared().expect("started");
        let root = dirs.root.path();
        let config = HostConfig {
            dra: DraConfig {
                node_name: Some(node.into()),
                kubeconfig: Some(server.kubeconfig()),
                registry_dir: root.join("registry"),
                plugins_dir: root.join("plugins"),
                state_dir: root.join("state"),
                pod_uid: pod_uid.map(str::to_string),
            },
            ..host_config(dirs, settings)
        };
        let shutdown = CancellationToken::new();
        let host = Host::start(config, &shutdown).expect("host starts");
        (host, shutdown)
    }

    /// Stops the host (as a restart does) and starts it again on the same directories.
    pub async fn restart(self) -> Self {
        let Self {
            api,
            node,
            dirs,
            host,
            settings,
            shutdown,
        } = self;
        shutdown.cancel();
        host.stop().await;
        let (host, shutdown) = Self::start_host(&dirs, &node, None, settings.clone());
        let fixture = Self {
            api,
            node,
            dirs,
            host,
            settings,
            shutdown,
        };
        fixture.serving().await;
        fixture
    }

    /// Waits until the module serves (its sockets are bound by then).
    pub async fn serving(&self) {
        serving(&self.host).await;
    }

    /// The driver's registration socket in the plugin-watcher directory.
    pub fn registration_socket(&self) -> PathBuf {
        self.dirs
            .root
            .path()
            .join("registry")
            .join(format!("{DRIVER}-reg.sock"))
    }

    /// The driver's DRA socket.
    pub fn endpoint(&self) -> PathBuf {
        self.dirs
            .root
            .path()
            .join("plugins")
            .join(DRIVER)
            .join("dra.sock")
    }

    /// The CDI spec directory.
    pub fn cdi(&self) -> PathBuf {
        self.dirs.cdi()
    }

    /// Registers the driver as kubelet's plugin watcher does; its DRA client.
    ///
    /// # Panics
    /// Registration fails or takes longer than [`WAIT`], or the driver registers as
    /// other than [`DRIVER`] on [`DraHost::endpoint`] offering v1 and v1beta1.
    pub async fn register(&self) -> DraClient {
        let registered =
            tokio::time::timeout(WAIT, simulator::register(&self.registration_socket()))
                .await
                .expect("registration in time")
                .expect("kubelet registers the driver");
        assert_eq!(registered.driver, DRIVER);
        assert_eq!(registered.endpoint, self.endpoint());
        assert!(registered.versions.iter().any(|v| v == "v1.DRAPlugin"));
        assert!(registered.versions.iter().any(|v| v == "v1beta1.DRAPlugin"));
        self.client()
    }

    /// Another DRA client of the driver (a connection of its own).
    ///
    /// # Panics
    /// The endpoint is not a usable socket path.
    pub fn client(&self) -> DraClient {
        simulator::client(&self.endpoint()).expect("DRA client")
    }

    /// Waits until the driver's slices on this node satisfy `condition`.
    pub async fn slices(
        &self,
        what: &str,
        condition: impl FnMut(&[ResourceSlice]) -> bool,
    ) -> Vec<ResourceSlice> {
        self.api
            .wait_slices(DRIVER, &self.node, WAIT, what, condition)
            .await
    }

    /// Creates claim `name` with `requests` and allocates to each the device named
    /// alongside it, of this driver on this node; returns its UID.
    ///
    /// # Panics
    /// The API server refuses the claim or its allocation.
    pub async fn allocated_claim(&self, name: &str, requests: &[(&str, &str)]) -> String {
        let names: Vec<&str> = requests.iter().map(|(r, _)| *r).collect();
        let claim = self.api.create_claim(name, CLASS, &names).await;
        let results: Vec<Allocated<'_>> = requests
            .iter()
            .map(|(request, device)| Allocated {
                request,
                driver: DRIVER,
                pool: &self.node,
                device,
            })
            .collect();
        self.api.allocate(name, &results, &[POD]).await;
        claim.metadata.uid.expect("claim uid")
    }

    /// [`DraHost::allocated_claim`] of one request `gpu` given `device`, with
    /// `config` as its allocation's opaque configuration for this driver (each
    /// `(source, requests, parameters)`).
    pub async fn configured_claim(
        &self,
        name: &str,
        device: &str,
        config: &[(&str, &[&str], serde_json::Value)],
    ) -> String {
        let claim = self.api.create_claim(name, CLASS, &["gpu"]).await;
        let config: Vec<(&str, &[&str], &str, serde_json::Value)> = config
            .iter()
            .map(|(source, requests, parameters)| (*source, *requests, DRIVER, parameters.clone()))
            .collect();
        self.api
            .allocate_configured(
                name,
                &[Allocated {
                    request: "gpu",
                    driver: DRIVER,
                    pool: &self.node,
                    device,
                }],
                &[POD],
                &config,
            )
            .await;
        claim.metadata.uid.expect("claim uid")
    }

    /// The environment of the claim `uid`'s CDI device for request `gpu`.
    ///
    /// # Panics
    /// The claim has no readable CDI spec with an environment.
    pub fn spec_env(&self, uid: &str) -> Vec<String> {
        let spec = std::fs::read_to_string(self.spec_file(uid)).expect("the claim's CDI spec");
        let spec: serde_json::Value = serde_json::from_str(&spec).expect("JSON spec");
        spec["devices"][0]["containerEdits"]["env"]
            .as_array()
            .expect("env")
            .iter()
            .map(|v| v.as_str().expect("text").to_string())
            .collect()
    }

    /// Claim `name` with `uid` in this session's namespace, as kubelet names it.
    pub fn claim_ref(&self, name: &str, uid: &str) -> v1::Claim {
        v1::Claim {
            namespace: self.api.namespace.clone(),
            name: name.into(),
            uid: uid.into(),
        }
    }

    /// The claim's CDI spec file, as the contract names it.
    pub fn spec_file(&self, uid: &str) -> PathBuf {
        self.cdi()
            .join(format!("wasm-device-plugin-claim_{DRIVER}_{uid}.json"))
    }

    /// Stops the host; the session, to look at what it left.
    pub async fn stop(self) -> Session {
        self.shutdown.cancel();
        self.host.stop().await;
        self.api
    }
}

/// Waits until `host` serves [`MODULE`] (its sockets are bound by then).
///
/// # Panics
/// It does not within [`WAIT`]; the message has the module states and refusals.
pub async fn serving(host: &Host) {
    let mut states = host.states();
    let served = tokio::time::timeout(
        WAIT,
        states.wait_for(|s| matches!(s.get(MODULE), Some(ModuleState::Serving(_)))),
    )
    .await;
    assert!(
        matches!(served, Ok(Ok(_))),
        "the module never served: {:?}, refusals {:?}",
        *host.states().borrow(),
        *host.refusals().borrow()
    );
}

/// NodePrepareResources of one claim; its answer.
///
/// # Panics
/// The call fails, takes longer than [`WAIT`], or the answer leaves the claim out.
pub async fn prepare(client: &mut DraClient, claim: v1::Claim) -> v1::NodePrepareResourceResponse {
    let uid = claim.uid.clone();
    let mut answer = tokio::time::timeout(
        WAIT,
        client.node_prepare_resources(v1::NodePrepareResourcesRequest {
            claims: vec![claim],
        }),
    )
    .await
    .expect("prepare answers in time")
    .expect("prepare succeeds as a call")
    .into_inner();
    answer
        .claims
        .remove(&uid)
        .unwrap_or_else(|| panic!("no answer for claim {uid}: {answer:?}"))
}

/// NodeUnprepareResources of one claim; its error (empty: done).
///
/// # Panics
/// The call fails, takes longer than [`WAIT`], or the answer leaves the claim out.
pub async fn unprepare(client: &mut DraClient, claim: v1::Claim) -> String {
    let uid = claim.uid.clone();
    let mut answer = tokio::time::timeout(
        WAIT,
        client.node_unprepare_resources(v1::NodeUnprepareResourcesRequest {
            claims: vec![claim],
        }),
    )
    .await
    .expect("unprepare answers in time")
    .expect("unprepare succeeds as a call")
    .into_inner();
    answer
        .claims
        .remove(&uid)
        .unwrap_or_else(|| panic!("no answer for claim {uid}: {answer:?}"))
        .error
}

/// The device names in `slices`, sorted.
pub fn device_names(slices: &[ResourceSlice]) -> Vec<String> {
    let mut names: Vec<String> = slices
        .iter()
        .flat_map(|s| s.spec.devices.iter().flatten())
        .map(|d| d.name.clone())
        .collect();
    names.sort();
    names
}

/// The pool generation of `slices` (0 when there are none).
pub fn generation(slices: &[ResourceSlice]) -> i64 {
    slices.first().map_or(0, |s| s.spec.pool.generation)
}

/// The slice name of guest id `id` (such as `/node1/dev1/<n>`: not a DNS label, so
/// lowercased, dashes, and a hash of the id), found by its `id` attribute.
///
/// # Panics
/// No device in `slices` has that id.
pub fn device_of(slices: &[ResourceSlice], id: &str) -> String {
    slices
        .iter()
        .flat_map(|s| s.spec.devices.iter().flatten())
        .find(|d| attributes(d).get("id").map(String::as_str) == Some(id))
        .map(|d| d.name.clone())
        .unwrap_or_else(|| panic!("no device with id {id} in {slices:#?}"))
}
