//! The DRA frontend against a real kube-apiserver (`tests/apiserver/src/lib.rs`): kubelet's
//! side is played over real unix sockets by the host's own simulator
//! (`kubelet/dra/simulator.rs`: the plugin watcher's registration handshake and a DRA
//! client), the scheduler's by the test (it writes the claim's allocation), and every
//! object the host writes is validated by the API server.
//!
//! Each test has its own node name (so its own pool and slices), namespace and
//! directories; the API server is shared by the binary.

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::resource::v1::ResourceSlice;
use tokio_util::sync::CancellationToken;
use wasm_device_plugin::app::{DraConfig, Host, HostConfig};
use wasm_device_plugin::kubelet::dra::proto::{v1, v1beta1};
use wasm_device_plugin::kubelet::dra::simulator;
use wasm_device_plugin::registry::ModuleState;
use wdp_tests::apiserver::{Allocated, ApiServer, Session, attributes};
use wdp_tests::{
    Dirs, WAIT, guests, host_config, init_logging, manifest_with_config, test_settings,
};

/// The module's name in the modules directory.
const MODULE: &str = "virtual";
/// The driver of kind dev-1 (the default: `<name>.<domain>` of `example.com/dev-1`).
const DRIVER: &str = "dev-1.example.com";
/// The DeviceClass the claims name (nothing allocates here: it need not exist).
const CLASS: &str = "dev-1.example.com";

/// The example manifest's settings: kind dev-1 with `count` devices, through DRA,
/// without the guest's annotation, plus `extra` config pairs.
fn manifest(count: u32, extra: &[(&str, &str)]) -> String {
    let kinds = format!("dev-1={count}");
    let mut pairs = vec![("kinds", kinds.as_str()), ("annotation", "off")];
    pairs.extend_from_slice(extra);
    manifest_with_config("domain = \"example.com\"\napi = \"dra\"", &pairs)
}

/// The host with the DRA frontend pointed at the shared API server and at
/// directories of its own, and the test's session there.
struct DraHost {
    api: Session,
    node: String,
    dirs: Dirs,
    host: Host,
    shutdown: CancellationToken,
}

impl DraHost {
    /// Creates the Node `node`, writes the virtual guest with `manifest` into a new
    /// modules directory, and starts the host; `None` when there is no API server
    /// to run (the test skips).
    async fn start(name: &str, manifest: &str) -> Option<Self> {
        let server = ApiServer::shared()?;
        init_logging();
        let api = server.session(name).await;
        let node = format!("{}-node", api.namespace);
        api.create_node(&node).await;
        let dirs = Dirs::new();
        for dir in ["registry", "plugins", "state"] {
            std::fs::create_dir(dirs.root.path().join(dir)).expect("create dir");
        }
        dirs.write_manifest(MODULE, manifest);
        dirs.add_module(MODULE, guests::VIRTUAL_DEVICES);
        let (host, shutdown) = Self::start_host(&dirs, &node, None);
        let fixture = Self {
            api,
            node,
            dirs,
            host,
            shutdown,
        };
        fixture.serving().await;
        Some(fixture)
    }

    /// A host on `dirs` for `node`, as the pod `pod_uid` when given (rolling-update
    /// socket names).
    fn start_host(dirs: &Dirs, node: &str, pod_uid: Option<&str>) -> (Host, CancellationToken) {
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
            ..host_config(dirs, test_settings(&dirs.kubelet()))
        };
        let shutdown = CancellationToken::new();
        let host = Host::start(config, &shutdown).expect("host starts");
        (host, shutdown)
    }

    /// Stops the host (as a restart does) and starts it again on the same directories.
    async fn restart(self) -> Self {
        let Self {
            api,
            node,
            dirs,
            host,
            shutdown,
        } = self;
        shutdown.cancel();
        host.stop().await;
        let (host, shutdown) = Self::start_host(&dirs, &node, None);
        let fixture = Self {
            api,
            node,
            dirs,
            host,
            shutdown,
        };
        fixture.serving().await;
        fixture
    }

    /// Waits until the module serves (its sockets are bound by then).
    async fn serving(&self) {
        serving(&self.host).await;
    }

    fn registration_socket(&self) -> PathBuf {
        self.dirs
            .root
            .path()
            .join("registry")
            .join(format!("{DRIVER}-reg.sock"))
    }

    fn cdi(&self) -> PathBuf {
        self.dirs.cdi()
    }

    /// Registers the driver as kubelet's plugin watcher does; its DRA client.
    async fn register(&self) -> v1::dra_plugin_client::DraPluginClient<tonic::transport::Channel> {
        let registered =
            tokio::time::timeout(WAIT, simulator::register(&self.registration_socket()))
                .await
                .expect("registration in time")
                .expect("kubelet registers the driver");
        assert_eq!(registered.driver, DRIVER);
        assert_eq!(
            registered.endpoint,
            self.dirs
                .root
                .path()
                .join("plugins")
                .join(DRIVER)
                .join("dra.sock")
        );
        assert!(registered.versions.iter().any(|v| v == "v1.DRAPlugin"));
        assert!(registered.versions.iter().any(|v| v == "v1beta1.DRAPlugin"));
        simulator::client(&registered.endpoint).expect("DRA client")
    }

    /// Waits until the driver's slices on this node satisfy `condition`.
    async fn slices(
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
    async fn allocated_claim(&self, name: &str, requests: &[(&str, &str)]) -> String {
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
        self.api
            .allocate(
                name,
                &results,
                &[("pod", "6a9c5c1e-0000-4000-8000-00000000000a")],
            )
            .await;
        claim.metadata.uid.expect("claim uid")
    }

    fn claim_ref(&self, name: &str, uid: &str) -> v1::Claim {
        v1::Claim {
            namespace: self.api.namespace.clone(),
            name: name.into(),
            uid: uid.into(),
        }
    }

    /// The claim's CDI spec file, as the contract names it.
    fn spec_file(&self, uid: &str) -> PathBuf {
        self.cdi()
            .join(format!("wasm-device-plugin-claim_{DRIVER}_{uid}.json"))
    }

    /// Stops the host; the test's session, to look at what it left.
    async fn stop(self) -> Session {
        self.shutdown.cancel();
        self.host.stop().await;
        self.api
    }
}

/// Waits until `host` serves the module (its sockets are bound by then).
async fn serving(host: &Host) {
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
async fn prepare(
    client: &mut v1::dra_plugin_client::DraPluginClient<tonic::transport::Channel>,
    claim: v1::Claim,
) -> v1::NodePrepareResourceResponse {
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
async fn unprepare(
    client: &mut v1::dra_plugin_client::DraPluginClient<tonic::transport::Channel>,
    claim: v1::Claim,
) -> String {
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
fn device_names(slices: &[ResourceSlice]) -> Vec<String> {
    let mut names: Vec<String> = slices
        .iter()
        .flat_map(|s| s.spec.devices.iter().flatten())
        .map(|d| d.name.clone())
        .collect();
    names.sort();
    names
}

fn generation(slices: &[ResourceSlice]) -> i64 {
    slices.first().map_or(0, |s| s.spec.pool.generation)
}

/// The slice name of guest id `/node1/dev1/<n>` (not a DNS label: lowercased,
/// dashes, and a hash of the id), found by its `id` attribute.
fn device_of(slices: &[ResourceSlice], id: &str) -> String {
    slices
        .iter()
        .flat_map(|s| s.spec.devices.iter().flatten())
        .find(|d| attributes(d).get("id").map(String::as_str) == Some(id))
        .map(|d| d.name.clone())
        .unwrap_or_else(|| panic!("no device with id {id} in {slices:#?}"))
}

#[tokio::test]
async fn dra_driver_registers_and_publishes_its_devices() {
    let Some(fixture) = DraHost::start("publish", &manifest(4, &[("numa-nodes", "2")])).await
    else {
        return;
    };
    assert!(
        fixture.host.ready().is_err(),
        "not ready before kubelet registered the driver"
    );
    fixture.register().await;
    fixture
        .host
        .wait_ready(true, WAIT)
        .await
        .expect("ready once registered and published");
    let slices = fixture
        .slices("four devices", |s| device_names(s).len() == 4)
        .await;
    for slice in &slices {
        assert_eq!(slice.spec.driver, DRIVER);
        assert_eq!(slice.spec.node_name.as_deref(), Some(fixture.node.as_str()));
        assert_eq!(slice.spec.pool.name, fixture.node);
        let owner = &slice.metadata.owner_references.as_ref().expect("owner")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("Node", fixture.node.as_str())
        );
    }
    let mut devices: Vec<(String, BTreeMap<String, String>)> = slices
        .iter()
        .flat_map(|s| s.spec.devices.iter().flatten())
        .map(|d| (d.name.clone(), attributes(d)))
        .collect();
    devices.sort();
    let expected: Vec<(String, BTreeMap<String, String>)> = (1..=4)
        .map(|n| {
            let id = format!("/node1/dev1/{n}");
            let attrs = [
                ("kind", "dev-1".to_string()),
                ("id", id.clone()),
                ("numaNode", ((n - 1) % 2).to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            (device_name(&id), attrs)
        })
        .collect();
    assert_eq!(devices, expected);
    fixture.stop().await;
}

/// The contract's device name of guest id `id` when it is not a DNS label:
/// lowercased, runs of other characters made one `-`, trimmed, cut to 54, then `-`
/// and the first 8 hex digits of its SHA-256.
fn device_name(id: &str) -> String {
    use sha2::Digest;
    let mut name = String::new();
    for c in id.to_ascii_lowercase().chars() {
        if c.is_ascii_alphanumeric() {
            name.push(c);
        } else if !name.ends_with('-') {
            name.push('-');
        }
    }
    let mut name: String = name.trim_matches('-').chars().take(54).collect();
    let hash: String = sha2::Sha256::digest(id.as_bytes())[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if name.is_empty() {
        name = "dev".into();
    }
    format!("{name}-{hash}")
}

#[tokio::test]
async fn dra_rescan_republishes_with_a_higher_generation() {
    let Some(fixture) = DraHost::start("rescan", &manifest(2, &[])).await else {
        return;
    };
    fixture.register().await;
    let before = fixture
        .slices("two devices", |s| device_names(s).len() == 2)
        .await;
    let first = generation(&before);
    fixture.dirs.write_manifest(MODULE, &manifest(3, &[]));
    let after = fixture
        .slices("three devices", |s| device_names(s).len() == 3)
        .await;
    assert!(generation(&after) > first, "{first} then {after:#?}");
    fixture.stop().await;
}

#[tokio::test]
async fn dra_unhealthy_device_leaves_the_slice() {
    let Some(fixture) = DraHost::start("health", &manifest(3, &[])).await else {
        return;
    };
    fixture.register().await;
    let before = fixture
        .slices("three devices", |s| device_names(s).len() == 3)
        .await;
    let sick = device_of(&before, "/node1/dev1/2");
    fixture
        .dirs
        .write_manifest(MODULE, &manifest(3, &[("unhealthy", "/node1/dev1/2")]));
    let after = fixture
        .slices("two devices", |s| device_names(s).len() == 2)
        .await;
    assert!(!device_names(&after).contains(&sick));
    assert!(generation(&after) > generation(&before));
    fixture.stop().await;
}

#[tokio::test]
async fn dra_claim_prepared_idempotently_and_unprepared() {
    let Some(fixture) = DraHost::start("prepare", &manifest(4, &[])).await else {
        return;
    };
    let mut client = fixture.register().await;
    let slices = fixture
        .slices("four devices", |s| device_names(s).len() == 4)
        .await;
    let device = device_of(&slices, "/node1/dev1/3");
    let uid = fixture.allocated_claim("claim", &[("gpu", &device)]).await;

    let answer = prepare(&mut client, fixture.claim_ref("claim", &uid)).await;
    assert_eq!(answer.error, "");
    assert_eq!(answer.devices.len(), 1, "{answer:?}");
    let prepared = &answer.devices[0];
    assert_eq!(prepared.request_names, ["gpu"]);
    assert_eq!(prepared.pool_name, fixture.node);
    assert_eq!(prepared.device_name, device);
    assert_eq!(
        prepared.cdi_device_ids,
        [format!("{DRIVER}/claim={uid}-gpu")]
    );
    let spec = std::fs::read_to_string(fixture.spec_file(&uid)).expect("the claim's CDI spec");
    let spec: serde_json::Value = serde_json::from_str(&spec).expect("JSON spec");
    assert_eq!(spec["kind"], format!("{DRIVER}/claim"));
    let env = &spec["devices"][0]["containerEdits"]["env"];
    assert_eq!(spec["devices"][0]["name"], format!("{uid}-gpu"));
    assert!(
        env.as_array()
            .is_some_and(|e| e.iter().any(|v| v == "DEV_dev_1_ID_0=/node1/dev1/3")),
        "{spec:#}"
    );

    let again = prepare(&mut client, fixture.claim_ref("claim", &uid)).await;
    assert_eq!(again, answer, "preparing twice answers the same");
    let endpoint = fixture
        .dirs
        .root
        .path()
        .join("plugins")
        .join(DRIVER)
        .join("dra.sock");
    let mut beta = simulator::client_v1beta1(&endpoint).expect("v1beta1 client");
    let claim = fixture.claim_ref("claim", &uid);
    let beta_answer = tokio::time::timeout(
        WAIT,
        beta.node_prepare_resources(v1beta1::NodePrepareResourcesRequest {
            claims: vec![v1beta1::Claim {
                namespace: claim.namespace,
                name: claim.name,
                uid: claim.uid,
            }],
        }),
    )
    .await
    .expect("v1beta1 prepare in time")
    .expect("v1beta1 prepare succeeds as a call")
    .into_inner();
    let beta_devices: Vec<(Vec<String>, String, String, Vec<String>)> = beta_answer.claims[&uid]
        .devices
        .iter()
        .map(|d| {
            (
                d.request_names.clone(),
                d.pool_name.clone(),
                d.device_name.clone(),
                d.cdi_device_ids.clone(),
            )
        })
        .collect();
    let v1_devices: Vec<(Vec<String>, String, String, Vec<String>)> = answer
        .devices
        .iter()
        .map(|d| {
            (
                d.request_names.clone(),
                d.pool_name.clone(),
                d.device_name.clone(),
                d.cdi_device_ids.clone(),
            )
        })
        .collect();
    assert_eq!(beta_devices, v1_devices, "v1beta1 answers as v1");

    assert_eq!(
        unprepare(&mut client, fixture.claim_ref("claim", &uid)).await,
        ""
    );
    assert!(
        !fixture.spec_file(&uid).exists(),
        "unprepare removes the spec"
    );
    assert_eq!(
        unprepare(&mut client, fixture.claim_ref("claim", &uid)).await,
        "",
        "unpreparing twice is done"
    );
    fixture.stop().await;
}

#[tokio::test]
async fn dra_prepared_claim_survives_a_host_restart() {
    let Some(fixture) = DraHost::start("restart", &manifest(2, &[])).await else {
        return;
    };
    let mut client = fixture.register().await;
    let slices = fixture
        .slices("two devices", |s| device_names(s).len() == 2)
        .await;
    let device = device_of(&slices, "/node1/dev1/1");
    let uid = fixture.allocated_claim("claim", &[("gpu", &device)]).await;
    let answer = prepare(&mut client, fixture.claim_ref("claim", &uid)).await;
    assert_eq!(answer.error, "");
    drop(client);

    let fixture = fixture.restart().await;
    let mut client = fixture.register().await;
    assert!(
        fixture.spec_file(&uid).exists(),
        "the spec outlives the restart"
    );
    assert_eq!(
        prepare(&mut client, fixture.claim_ref("claim", &uid)).await,
        answer,
        "the restarted host answers as it prepared"
    );
    assert_eq!(
        unprepare(&mut client, fixture.claim_ref("claim", &uid)).await,
        ""
    );
    assert!(
        !fixture.spec_file(&uid).exists(),
        "unprepare after a restart removes the spec"
    );
    fixture.stop().await;
}

#[tokio::test]
async fn dra_module_removal_deletes_its_slices() {
    let Some(fixture) = DraHost::start("removal", &manifest(2, &[])).await else {
        return;
    };
    fixture.register().await;
    fixture
        .slices("two devices", |s| device_names(s).len() == 2)
        .await;
    fixture.dirs.remove_module(MODULE);
    fixture.slices("none", <[ResourceSlice]>::is_empty).await;
    assert!(
        !fixture.registration_socket().exists(),
        "the registration socket goes with the module"
    );
    fixture.stop().await;
}

#[tokio::test]
async fn dra_claim_for_a_device_the_guest_no_longer_has_fails_naming_it() {
    let Some(fixture) = DraHost::start("gone", &manifest(3, &[])).await else {
        return;
    };
    let mut client = fixture.register().await;
    let slices = fixture
        .slices("three devices", |s| device_names(s).len() == 3)
        .await;
    let device = device_of(&slices, "/node1/dev1/3");
    let uid = fixture.allocated_claim("claim", &[("gpu", &device)]).await;
    fixture.dirs.write_manifest(MODULE, &manifest(2, &[]));
    fixture
        .slices("two devices", |s| device_names(s).len() == 2)
        .await;
    let answer = prepare(&mut client, fixture.claim_ref("claim", &uid)).await;
    assert!(answer.devices.is_empty());
    assert!(answer.error.contains(&device), "{}", answer.error);
    let claim = format!("{}/claim", fixture.api.namespace);
    assert!(answer.error.contains(&claim), "{}", answer.error);
    assert!(!fixture.spec_file(&uid).exists());
    fixture.stop().await;
}

#[tokio::test]
async fn dra_claim_with_another_uid_is_refused() {
    let Some(fixture) = DraHost::start("uid", &manifest(2, &[])).await else {
        return;
    };
    let mut client = fixture.register().await;
    let slices = fixture
        .slices("two devices", |s| device_names(s).len() == 2)
        .await;
    let device = device_of(&slices, "/node1/dev1/1");
    let uid = fixture.allocated_claim("claim", &[("gpu", &device)]).await;
    let stale = "00000000-0000-4000-8000-000000000000";
    assert_ne!(uid, stale);
    let answer = prepare(&mut client, fixture.claim_ref("claim", stale)).await;
    assert!(answer.devices.is_empty());
    assert!(answer.error.contains(stale), "{}", answer.error);
    assert!(!fixture.spec_file(stale).exists());
    assert!(!fixture.spec_file(&uid).exists());
    fixture.stop().await;
}

#[tokio::test]
async fn dra_annotations_in_a_guest_answer_fail_the_claim() {
    // The guest's default: it annotates its answers.
    let text = manifest_with_config(
        "domain = \"example.com\"\napi = \"dra\"",
        &[("kinds", "dev-1=2"), ("annotation", "on")],
    );
    let Some(fixture) = DraHost::start("annotation", &text).await else {
        return;
    };
    let mut client = fixture.register().await;
    let slices = fixture
        .slices("two devices", |s| device_names(s).len() == 2)
        .await;
    let device = device_of(&slices, "/node1/dev1/1");
    let uid = fixture.allocated_claim("claim", &[("gpu", &device)]).await;
    let answer = prepare(&mut client, fixture.claim_ref("claim", &uid)).await;
    assert!(answer.devices.is_empty());
    assert!(answer.error.contains("annotation"), "{}", answer.error);
    assert!(!fixture.spec_file(&uid).exists());
    fixture.stop().await;
}

/// A stopping host leaves its pool to the host that takes over (a rolling update's
/// new pod, or the next start), as upstream's helper does; kubelet deletes the slices
/// of a driver that does not come back. Module removal deletes them (tested above).
#[tokio::test]
async fn dra_host_stop_leaves_its_slices_to_the_next_host() {
    let Some(fixture) = DraHost::start("stop", &manifest(2, &[])).await else {
        return;
    };
    fixture.register().await;
    fixture
        .slices("two devices", |s| device_names(s).len() == 2)
        .await;
    let node = fixture.node.clone();
    let api = fixture.stop().await;
    let left = api.slices(DRIVER, &node).await;
    assert_eq!(
        device_names(&left).len(),
        2,
        "a stopped host leaves its slices: {left:?}"
    );
}

/// A rolling update (`--pod-uid`): the new host pod starts beside the old one on the
/// same node and publishes; the old one then stops. The new pod's devices must stay
/// published.
#[tokio::test]
async fn dra_rolling_update_keeps_the_new_hosts_slices() {
    let Some(server) = ApiServer::shared() else {
        return;
    };
    init_logging();
    let api = server.session("rolling").await;
    let node = format!("{}-node", api.namespace);
    api.create_node(&node).await;
    let dirs = Dirs::new();
    for dir in ["registry", "plugins", "state"] {
        std::fs::create_dir(dirs.root.path().join(dir)).expect("create dir");
    }
    dirs.write_manifest(MODULE, &manifest(2, &[]));
    dirs.add_module(MODULE, guests::VIRTUAL_DEVICES);

    let (old, old_shutdown) = DraHost::start_host(&dirs, &node, Some("old-pod"));
    serving(&old).await;
    let old_socket = dirs
        .root
        .path()
        .join("registry")
        .join(format!("{DRIVER}-old-pod-reg.sock"));
    simulator::register(&old_socket)
        .await
        .expect("old pod registers");
    let first = api
        .wait_slices(DRIVER, &node, WAIT, "two devices", |s| {
            device_names(s).len() == 2
        })
        .await;

    let (new, new_shutdown) = DraHost::start_host(&dirs, &node, Some("new-pod"));
    serving(&new).await;
    let new_socket = dirs
        .root
        .path()
        .join("registry")
        .join(format!("{DRIVER}-new-pod-reg.sock"));
    simulator::register(&new_socket)
        .await
        .expect("new pod registers");
    api.wait_slices(DRIVER, &node, WAIT, "republished by the new pod", |s| {
        device_names(s).len() == 2 && generation(s) > generation(&first)
    })
    .await;

    old_shutdown.cancel();
    old.stop().await;
    let left = api.slices(DRIVER, &node).await;
    assert_eq!(
        device_names(&left).len(),
        2,
        "the old pod stopping took the new pod's slices with it: {left:#?}"
    );
    new_shutdown.cancel();
    new.stop().await;
}
