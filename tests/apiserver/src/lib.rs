//! A real kube-apiserver (with its etcd) for the tests that involve the API server: no
//! kubelet, no scheduler, no controllers. The tests play the scheduler's part (they
//! write a claim's allocation) and the host talks to the API server as on a node, with
//! every object it writes validated by the real thing.
//!
//! One API server per test binary, started on first use ([`ApiServer::shared`]) and
//! stopped when the binary exits; each test works in a [`Session`] of its own (its own
//! namespace, and the node and driver names it chooses), so tests do not see each
//! other's objects.
//!
//! The binaries are those `WDP_KUBE_APISERVER` and `WDP_ETCD` name (`cargo xtask test`
//! builds them from `e2e/cluster/kubernetes` and sets both), else the ones an earlier
//! `cargo xtask test` or `cargo xtask e2e` left in `target/e2e/bin/`. Without either the
//! tests that need them skip, saying so on stderr; with `CI` set they fail instead.
//!
//! Everything runs as the current user in a temporary directory: etcd and the API server
//! on free ports of 127.0.0.1, TLS with a CA made by `openssl` for the run, the tests
//! and the host authenticated by a client certificate in `system:masters`. The
//! processes are started from a thread that lives as long as the test binary, with
//! `PR_SET_PDEATHSIG`, so they die with the binary however it ends; on a normal exit an
//! `atexit` handler also kills them and deletes the directory.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::api::resource::v1::{
    AllocationResult, DeviceAllocationConfiguration, DeviceAllocationResult, DeviceRequest,
    DeviceRequestAllocationResult, ExactDeviceRequest, OpaqueDeviceConfiguration, ResourceClaim,
    ResourceClaimConsumerReference, ResourceSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::runtime::RawExtension;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Names the kube-apiserver binary to run.
pub const KUBE_APISERVER_ENV: &str = "WDP_KUBE_APISERVER";
/// Names the etcd binary to run.
pub const ETCD_ENV: &str = "WDP_ETCD";
/// Where `cargo xtask` caches the binaries it builds from `e2e/cluster/kubernetes`
/// (relative to the workspace root): `kubernetes-<version>/` below it.
const E2E_BIN: &str = "target/e2e/bin";
/// Feature gates the API server runs with: those the DRA frontend's DeviceClass
/// (KEP-5004, `extendedResourceName`) needs.
const FEATURE_GATES: &str = "DRAExtendedResource=true";
/// How long etcd and the API server may take to answer ready (a cold start on a busy
/// 2-core machine takes a few seconds).
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// Attempts at starting, each on fresh free ports: another process may take a port
/// between our choosing it and the server binding it.
const START_ATTEMPTS: usize = 3;
/// The field manager of the tests' writes.
const MANAGER: &str = "wdp-tests";
/// Prefix of the temporary directories (`<prefix><pid>-<n>`); one left by a binary
/// that was killed is deleted by the next run.
const DIR_PREFIX: &str = "wdp-apiserver-";

/// A running kube-apiserver and etcd, and the kubeconfig to reach them.
#[derive(Debug)]
pub struct ApiServer {
    /// The temporary directory: certificates, kubeconfig, etcd's data, logs.
    dir: PathBuf,
    /// `https://127.0.0.1:<port>`.
    url: String,
    /// How long starting took (both processes, to ready).
    started_in: Duration,
}

/// What the `atexit` handler stops: the processes (each the leader of its group) and
/// the directory.
struct Running {
    children: Vec<Child>,
    dir: PathBuf,
}

static SHARED: OnceLock<Result<ApiServer, String>> = OnceLock::new();
static RUNNING: Mutex<Option<Running>> = Mutex::new(None);

impl ApiServer {
    /// The test binary's API server, started by the first caller (the others wait for
    /// it); `None`, after saying so on stderr, when there are no binaries to run and
    /// this is not CI.
    ///
    /// # Panics
    /// The binaries are missing and `CI` is set, or the API server did not start (its
    /// logs are in the message). Every later caller panics too.
    pub fn shared() -> Option<&'static ApiServer> {
        let Some((apiserver, etcd)) = binaries() else {
            let message = format!(
                "no kube-apiserver and etcd to run: set {KUBE_APISERVER_ENV} and {ETCD_ENV}, \
                 or run the tests with `cargo xtask test`, which builds them"
            );
            assert!(!in_ci(), "{message}");
            eprintln!("SKIPPED: {message}");
            return None;
        };
        let shared = SHARED.get_or_init(|| start(apiserver, etcd));
        match shared {
            Ok(server) => Some(server),
            Err(err) => panic!("the API server did not start: {err}"),
        }
    }

    /// A kubeconfig for the API server's admin (client certificate, `system:masters`),
    /// as the host's `--kubeconfig` reads it.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// The API server's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// How long etcd and the API server took to start and answer ready.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// A client of the admin. Make one per test: a client's connection pool lives on
    /// the tokio runtime that made it, and each test has its own.
    ///
    /// # Panics
    /// The kubeconfig cannot be read.
    pub async fn client(&self) -> Client {
        client_for(&self.kubeconfig()).await.expect("admin client")
    }

    /// A [`Session`] in a new namespace `<name>-<n>`.
    ///
    /// # Panics
    /// The namespace cannot be created.
    pub async fn session(&'static self, name: &str) -> Session {
        static SESSIONS: AtomicUsize = AtomicUsize::new(0);
        let namespace = format!("{name}-{}", SESSIONS.fetch_add(1, Ordering::Relaxed));
        let client = self.client().await;
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(namespace.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("create namespace {namespace}: {e}"));
        Session {
            server: self,
            client,
            namespace,
        }
    }
}

/// One test's view of the API server: a client and a namespace of its own.
pub struct Session {
    /// The API server.
    pub server: &'static ApiServer,
    /// The admin's client, made on this test's runtime.
    pub client: Client,
    /// The test's namespace (created by [`ApiServer::session`]).
    pub namespace: String,
}

impl Session {
    /// The API of namespaced `K` in the test's namespace.
    pub fn namespaced<K>(&self) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The API of cluster-scoped `K` (or of namespaced `K` in every namespace).
    pub fn cluster<K>(&self) -> Api<K>
    where
        K: Resource,
        K::DynamicType: Default,
    {
        Api::all(self.client.clone())
    }

    /// Creates or updates `object` in `api` by server-side apply (forced: the tests'
    /// field manager owns what it writes); returns it as stored.
    ///
    /// # Panics
    /// The API server refuses it (the message has its reason).
    pub async fn apply<K>(&self, api: &Api<K>, object: &K) -> K
    where
        K: Resource + Clone + DeserializeOwned + Serialize + Debug,
        K::DynamicType: Default,
    {
        let name = object.meta().name.clone().expect("the object has a name");
        let mut object = serde_json::to_value(object).expect("serialisable object");
        // Server-side apply needs both in the body; k8s-openapi leaves them to serde.
        object["apiVersion"] = K::api_version(&Default::default()).into();
        object["kind"] = K::kind(&Default::default()).into();
        api.patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&object),
        )
        .await
        .unwrap_or_else(|e| panic!("apply {name}: {e}"))
    }

    /// `name` in `api`, if it exists.
    ///
    /// # Panics
    /// The API server fails the request.
    pub async fn get<K>(&self, api: &Api<K>, name: &str) -> Option<K>
    where
        K: Resource + Clone + DeserializeOwned + Debug,
    {
        api.get_opt(name)
            .await
            .unwrap_or_else(|e| panic!("get {name}: {e}"))
    }

    /// Deletes `name` from `api` (nothing if it does not exist).
    ///
    /// # Panics
    /// The API server fails the request.
    pub async fn delete<K>(&self, api: &Api<K>, name: &str)
    where
        K: Resource + Clone + DeserializeOwned + Debug,
    {
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => panic!("delete {name}: {e}"),
        }
    }

    /// Creates the Node `name` (as kubelet registers it; no status). The host's
    /// ResourceSlices name it as their owner.
    ///
    /// # Panics
    /// The API server refuses it.
    pub async fn create_node(&self, name: &str) -> Node {
        let node = Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        self.cluster::<Node>()
            .create(&PostParams::default(), &node)
            .await
            .unwrap_or_else(|e| panic!("create node {name}: {e}"))
    }

    /// The ResourceSlices of `driver` on `node` (by field selector, as the DRA
    /// frontend's contract says to find them), sorted by name.
    ///
    /// # Panics
    /// The API server fails the request.
    pub async fn slices(&self, driver: &str, node: &str) -> Vec<ResourceSlice> {
        self.slices_at(driver, node).await.1
    }

    /// [`Session::slices`] and the list's resourceVersion.
    async fn slices_at(&self, driver: &str, node: &str) -> (String, Vec<ResourceSlice>) {
        let list = self
            .cluster::<ResourceSlice>()
            .list(&ListParams::default().fields(&slice_selector(driver, node)))
            .await
            .unwrap_or_else(|e| panic!("list the slices of {driver} on {node}: {e}"));
        let version = list.metadata.resource_version.clone().unwrap_or_default();
        let mut slices = list.items;
        slices.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        (version, slices)
    }

    /// Waits until the ResourceSlices of `driver` on `node` satisfy `condition`, and
    /// returns them: lists, and while the condition does not hold, watches from that
    /// list's version until something changes, then lists again.
    ///
    /// # Panics
    /// The condition does not hold within `timeout` (the message has the last list).
    pub async fn wait_slices(
        &self,
        driver: &str,
        node: &str,
        timeout: Duration,
        what: &str,
        mut condition: impl FnMut(&[ResourceSlice]) -> bool,
    ) -> Vec<ResourceSlice> {
        let deadline = tokio::time::Instant::now() + timeout;
        let api = self.cluster::<ResourceSlice>();
        loop {
            let (version, slices) = self.slices_at(driver, node).await;
            if condition(&slices) {
                return slices;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let params = kube::api::WatchParams::default()
                .fields(&slice_selector(driver, node))
                .timeout(u32::try_from(left.as_secs()).unwrap_or(u32::MAX).max(1));
            let changed = tokio::time::timeout(left, async {
                let mut events = api
                    .watch(&params, &version)
                    .await
                    .unwrap_or_else(|e| panic!("watch the slices of {driver} on {node}: {e}"))
                    .boxed();
                // Any event (or the watch ending) is worth a new list; bookmarks are
                // not asked for.
                events
                    .try_next()
                    .await
                    .map(|e| matches!(e, Some(WatchEvent::Error(_))))
            })
            .await;
            if changed.is_err() {
                let (_, slices) = self.slices_at(driver, node).await;
                if condition(&slices) {
                    return slices;
                }
                panic!(
                    "the slices of {driver} on {node} never came to be {what} within \
                     {timeout:?}; they are: {slices:#?}"
                );
            }
        }
    }

    /// Creates the ResourceClaim `name` asking, per request name in `requests`, for one
    /// device of DeviceClass `class` (which need not exist: nothing here allocates).
    ///
    /// # Panics
    /// The API server refuses it.
    pub async fn create_claim(&self, name: &str, class: &str, requests: &[&str]) -> ResourceClaim {
        let claim = ResourceClaim {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(self.namespace.clone()),
                ..Default::default()
            },
            spec: k8s_openapi::api::resource::v1::ResourceClaimSpec {
                devices: Some(k8s_openapi::api::resource::v1::DeviceClaim {
                    requests: Some(
                        requests
                            .iter()
                            .map(|request| DeviceRequest {
                                name: (*request).into(),
                                exactly: Some(ExactDeviceRequest {
                                    device_class_name: class.into(),
                                    allocation_mode: Some("ExactCount".into()),
                                    count: Some(1),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            })
                            .collect(),
                    ),
                    ..Default::default()
                }),
            },
            status: None,
        };
        self.namespaced::<ResourceClaim>()
            .create(&PostParams::default(), &claim)
            .await
            .unwrap_or_else(|e| panic!("create claim {name}: {e}"))
    }

    /// Writes claim `name`'s `status.allocation` through the status subresource, as the
    /// scheduler does: one result per [`Allocated`], and `reservedFor` the pods named
    /// (as `(name, uid)`). Returns the claim as stored.
    ///
    /// # Panics
    /// The API server refuses it.
    pub async fn allocate(
        &self,
        name: &str,
        results: &[Allocated<'_>],
        reserved_for: &[(&str, &str)],
    ) -> ResourceClaim {
        self.allocate_configured(name, results, reserved_for, &[])
            .await
    }

    /// [`Session::allocate`], with `config` as the allocation's device
    /// configuration: each `(source, requests, driver, parameters)` an opaque
    /// configuration from `FromClass` or `FromClaim` for the requests named
    /// (none: all), as the scheduler copies it from the DeviceClass and the claim.
    ///
    /// # Panics
    /// The API server refuses it.
    pub async fn allocate_configured(
        &self,
        name: &str,
        results: &[Allocated<'_>],
        reserved_for: &[(&str, &str)],
        config: &[(&str, &[&str], &str, serde_json::Value)],
    ) -> ResourceClaim {
        let config: Vec<DeviceAllocationConfiguration> = config
            .iter()
            .map(
                |(source, requests, driver, parameters)| DeviceAllocationConfiguration {
                    source: (*source).into(),
                    requests: (!requests.is_empty())
                        .then(|| requests.iter().map(|r| (*r).to_string()).collect()),
                    opaque: Some(OpaqueDeviceConfiguration {
                        driver: (*driver).into(),
                        parameters: RawExtension(parameters.clone()),
                    }),
                },
            )
            .collect();
        let allocation = AllocationResult {
            devices: Some(DeviceAllocationResult {
                results: Some(
                    results
                        .iter()
                        .map(|r| DeviceRequestAllocationResult {
                            request: r.request.into(),
                            driver: r.driver.into(),
                            pool: r.pool.into(),
                            device: r.device.into(),
                            ..Default::default()
                        })
                        .collect(),
                ),
                config: (!config.is_empty()).then_some(config),
            }),
            ..Default::default()
        };
        let reserved: Vec<ResourceClaimConsumerReference> = reserved_for
            .iter()
            .map(|(pod, uid)| ResourceClaimConsumerReference {
                api_group: None,
                resource: "pods".into(),
                name: (*pod).into(),
                uid: (*uid).into(),
            })
            .collect();
        let mut status = serde_json::json!({ "allocation": allocation });
        if !reserved.is_empty() {
            status["reservedFor"] = serde_json::to_value(&reserved).expect("serialisable");
        }
        self.namespaced::<ResourceClaim>()
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "status": status })),
            )
            .await
            .unwrap_or_else(|e| panic!("write the allocation of claim {name}: {e}"))
    }
}

/// One device of an allocation: the claim's `request` got `device` of `pool` of
/// `driver`.
#[derive(Clone, Copy, Debug)]
pub struct Allocated<'a> {
    pub request: &'a str,
    pub driver: &'a str,
    pub pool: &'a str,
    pub device: &'a str,
}

/// The field selector of a driver's slices on a node.
fn slice_selector(driver: &str, node: &str) -> String {
    format!("spec.driver={driver},spec.nodeName={node}")
}

/// A client from the kubeconfig at `path`.
async fn client_for(path: &Path) -> Result<Client, String> {
    let kubeconfig = Kubeconfig::read_from(path).map_err(|e| e.to_string())?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    Client::try_from(config).map_err(|e| e.to_string())
}

/// Whether the tests run in CI, where a missing tool is a failure.
fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false")
}

/// The kube-apiserver and etcd to run: named by the environment, else the ones in the
/// xtask cache (when exactly one version there has both).
fn binaries() -> Option<(PathBuf, PathBuf)> {
    if let (Some(apiserver), Some(etcd)) = (
        std::env::var_os(KUBE_APISERVER_ENV),
        std::env::var_os(ETCD_ENV),
    ) {
        return Some((apiserver.into(), etcd.into()));
    }
    let cache = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(E2E_BIN);
    let found: Vec<PathBuf> = std::fs::read_dir(cache)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|dir| {
            dir.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("kubernetes-"))
                && dir.join("kube-apiserver").is_file()
                && dir.join("etcd").is_file()
        })
        .collect();
    match found.as_slice() {
        [dir] => Some((dir.join("kube-apiserver"), dir.join("etcd"))),
        _ => None,
    }
}

/// Starts etcd and the API server from a thread that lives as long as the binary
/// (their parent-death signal is tied to the thread that forked them), trying again
/// on other ports when one was taken.
fn start(apiserver: PathBuf, etcd: PathBuf) -> Result<ApiServer, String> {
    remove_orphaned_dirs();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("apiserver".into())
        .spawn(move || {
            let mut errors = Vec::new();
            for attempt in 0..START_ATTEMPTS {
                match launch(&apiserver, &etcd, attempt) {
                    Ok(server) => {
                        let _ = tx.send(Ok(server));
                        // Keep the thread: when it ends, the kernel kills its children.
                        loop {
                            std::thread::park();
                        }
                    }
                    Err(err) => errors.push(err),
                }
            }
            let _ = tx.send(Err(errors.join("\n---\n")));
        })
        .map_err(|e| format!("cannot start a thread: {e}"))?;
    rx.recv()
        .map_err(|_| "the API server's thread ended".to_string())?
}

/// One attempt at [`start`]: a fresh directory, certificates, free ports, etcd, then
/// the API server, then waits for `/readyz`. On failure everything it started is
/// stopped and the logs are in the error.
fn launch(apiserver: &Path, etcd: &Path, attempt: usize) -> Result<ApiServer, String> {
    let started = Instant::now();
    let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{}-{attempt}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .map_err(|e| format!("cannot clear {}: {e}", dir.display()))?;
    }
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let mut running = Running {
        children: Vec::new(),
        dir: dir.clone(),
    };
    let result = (|| -> Result<String, String> {
        write_pki(&dir)?;
        let [etcd_client, etcd_peer, secure] = free_ports()?;
        let url = format!("https://127.0.0.1:{secure}");
        std::fs::write(dir.join("admin.kubeconfig"), kubeconfig(&dir, &url))
            .map_err(|e| format!("cannot write the kubeconfig: {e}"))?;
        let p = |name: &str| dir.join(name).display().to_string();
        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        running.children.push(spawn(
            etcd,
            &[
                "--name=wdp-tests".into(),
                format!("--data-dir={}", p("etcd")),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"),
                format!("--initial-cluster=wdp-tests=http://127.0.0.1:{etcd_peer}"),
                // Throwaway data: durability buys nothing, and fsyncs are slow.
                "--unsafe-no-fsync".into(),
                "--log-level=warn".into(),
            ],
            &dir.join("etcd.log"),
        )?);
        // The API server retries etcd until it answers: no need to wait for etcd first.
        running.children.push(spawn(
            apiserver,
            &[
                format!("--etcd-servers={etcd_url}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--secure-port={secure}"),
                // Nothing reaches the API server through the kubernetes Service.
                "--endpoint-reconciler-type=none".into(),
                format!("--tls-cert-file={}", p("apiserver.crt")),
                format!("--tls-private-key-file={}", p("apiserver.key")),
                format!("--client-ca-file={}", p("ca.crt")),
                format!("--service-account-key-file={}", p("sa.pub")),
                format!("--service-account-signing-key-file={}", p("sa.key")),
                "--service-account-issuer=https://kubernetes.default.svc".into(),
                "--service-cluster-ip-range=10.96.0.0/16".into(),
                "--authorization-mode=RBAC".into(),
                format!("--feature-gates={FEATURE_GATES}"),
                "--profiling=false".into(),
            ],
            &dir.join("kube-apiserver.log"),
        )?);
        let url = wait_ready(&dir, &url, &mut running.children, START_TIMEOUT)?;
        Ok(url)
    })();
    match result {
        Ok(url) => {
            register_stop(running);
            Ok(ApiServer {
                dir,
                url,
                started_in: started.elapsed(),
            })
        }
        Err(err) => {
            let logs = ["etcd.log", "kube-apiserver.log"]
                .iter()
                .map(|log| format!("{log}:\n{}", tail(&dir.join(log), 30)))
                .collect::<Vec<_>>()
                .join("\n");
            stop(running);
            Err(format!("{err}\n{logs}"))
        }
    }
}

/// Waits until the API server answers `/readyz` with `ok`, or one of `children` exits,
/// or `timeout` passes. The API server has no readiness signal to wait on other than
/// answering: it is asked again 50 ms after each "not yet".
fn wait_ready(
    dir: &Path,
    url: &str,
    children: &mut [Child],
    timeout: Duration,
) -> Result<String, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot build a runtime: {e}"))?;
    runtime.block_on(async {
        let client = client_for(&dir.join("admin.kubeconfig")).await?;
        let deadline = Instant::now() + timeout;
        let mut last;
        loop {
            for child in children.iter_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("a control-plane process exited ({status})"));
                }
            }
            let request = http::Request::get("/readyz")
                .body(Vec::new())
                .map_err(|e| e.to_string())?;
            match tokio::time::timeout(Duration::from_secs(5), client.request_text(request)).await {
                Ok(Ok(body)) if body.trim() == "ok" => return Ok(url.to_string()),
                Ok(Ok(body)) => last = body,
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "/readyz did not answer within 5 s".into(),
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the API server was not ready within {timeout:?}: {last}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// Starts `program` with `args`, output to `log`, as the leader of a new process group
/// and with SIGKILL as its parent-death signal.
fn spawn(program: &Path, args: &[String], log: &Path) -> Result<Child, String> {
    use std::os::unix::process::CommandExt;
    let out =
        std::fs::File::create(log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent's; the
    // closure allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(|e| format!("cannot start {}: {e}", program.display()))
}

/// Hands `running` to the `atexit` handler (registered once).
fn register_stop(running: Running) {
    extern "C" fn at_exit() {
        let running = match RUNNING.lock() {
            Ok(mut guard) => guard.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(running) = running {
            stop(running);
        }
    }
    let mut guard = match RUNNING.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    };
    let first = guard.is_none();
    *guard = Some(running);
    if first {
        // SAFETY: `at_exit` is a plain function that never unwinds (it only locks, kills,
        // waits and removes files, and ignores their errors).
        unsafe { libc::atexit(at_exit) };
    }
}

/// Kills every process group in `running` (throwaway state: no need to be gentle),
/// reaps the leaders, and deletes the directory.
fn stop(mut running: Running) {
    for child in &mut running.children {
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: kill(2) has no memory effects; the group is our unreaped child's.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
        let _ = child.wait();
    }
    let _ = std::fs::remove_dir_all(&running.dir);
}

/// Deletes the directories of earlier test binaries that were killed before their
/// `atexit` handler ran (their processes died with them).
fn remove_orphaned_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(DIR_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Three distinct free ports of 127.0.0.1 (free when asked: a server may still lose
/// one to another process, which [`start`] survives by trying again).
fn free_ports() -> Result<[u16; 3], String> {
    let listeners: Vec<std::net::TcpListener> = (0..3)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot find a free port: {e}"))?;
    let port = |l: &std::net::TcpListener| l.local_addr().map(|a| a.port()).unwrap_or(0);
    Ok([
        port(&listeners[0]),
        port(&listeners[1]),
        port(&listeners[2]),
    ])
}

/// The CA, the API server's serving certificate (127.0.0.1 and localhost), the
/// admin's client certificate (`system:masters`) and the service-account key pair,
/// ECDSA P-256, by `openssl`, as `cargo xtask e2e` makes them.
fn write_pki(dir: &Path) -> Result<(), String> {
    let p = |name: &str| dir.join(name).display().to_string();
    let key = |name: &str| {
        openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &p(&format!("{name}.key")),
        ])
    };
    key("ca")?;
    openssl(&[
        "req",
        "-x509",
        "-new",
        "-key",
        &p("ca.key"),
        "-subj",
        "/CN=wdp-tests-ca",
        "-days",
        "2",
        "-out",
        &p("ca.crt"),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
    ])?;
    let cert = |name: &str, subject: &str, usage: &str, san: Option<&str>| {
        key(name)?;
        let (ca_crt, ca_key, key_file, crt) = (
            p("ca.crt"),
            p("ca.key"),
            p(&format!("{name}.key")),
            p(&format!("{name}.crt")),
        );
        let usage = format!("extendedKeyUsage={usage}");
        let mut args = vec![
            "req",
            "-x509",
            "-new",
            "-key",
            &key_file,
            "-subj",
            subject,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-days",
            "2",
            "-out",
            &crt,
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "keyUsage=critical,digitalSignature,keyEncipherment",
            "-addext",
            &usage,
        ];
        let san = san.map(|san| format!("subjectAltName={san}"));
        if let Some(san) = &san {
            args.extend(["-addext", san]);
        }
        openssl(&args)
    };
    cert(
        "apiserver",
        "/CN=kube-apiserver",
        "serverAuth",
        Some("DNS:localhost,IP:127.0.0.1,IP:10.96.0.1"),
    )?;
    cert(
        "admin",
        "/O=system:masters/CN=wdp-tests-admin",
        "clientAuth",
        None,
    )?;
    key("sa")?;
    openssl(&["pkey", "-in", &p("sa.key"), "-pubout", "-out", &p("sa.pub")])
}

/// The admin's kubeconfig for the API server at `url`.
fn kubeconfig(dir: &Path, url: &str) -> String {
    let p = |name: &str| dir.join(name).display().to_string();
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: wdp-tests\n  cluster:\n    server: {url}\n    certificate-authority: {ca}\nusers:\n- name: admin\n  user:\n    client-certificate: {crt}\n    client-key: {key}\ncontexts:\n- name: wdp-tests\n  context: {{cluster: wdp-tests, user: admin}}\ncurrent-context: wdp-tests\n",
        ca = p("ca.crt"),
        crt = p("admin.crt"),
        key = p("admin.key"),
    )
}

fn openssl(args: &[&str]) -> Result<(), String> {
    let out = Command::new("openssl").args(args).output().map_err(|e| {
        format!("cannot run openssl (the test API server's certificates need it): {e}")
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The last `lines` lines of `path`.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Device attributes of a slice's device, as strings (`string`, `int`, `bool` or
/// `version`, whichever is set): what the tests compare.
pub fn attributes(device: &k8s_openapi::api::resource::v1::Device) -> BTreeMap<String, String> {
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
