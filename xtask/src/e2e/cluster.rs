//! A one-node cluster on this machine: certificates, kubeconfigs and configuration in a
//! temporary directory, then etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler, containerd and kubelet as child processes. [`Cluster`] owns every
//! process it started (by PID) and the [`Machine`] record; dropping it stops them and
//! puts the machine back, so a failing scenario still tears everything down.
//!
//! Ready for DRA as well as the device-plugin API: `resource.k8s.io/v1` is served by
//! default at this Kubernetes version, every component runs with the feature gate
//! [`FEATURE_GATE`] (KEP-5004's extended resources through DRA), containerd has CDI on,
//! kubelet's root directory is its default (where the DaemonSet mounts the plugin
//! watcher's directory from), and pods reach the API server on the pod network.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::binaries::{Binaries, CNI_BIN_DIR, RUNC};
use super::machine::{BRIDGE, CGROUP_ROOT, Machine};
use super::poll;

/// The node's name (kubelet's `--hostname-override`).
pub const NODE: &str = "wdp-e2e";
/// The label `deploy/daemonset.yaml` selects nodes by.
const NODE_LABEL: &str = "wasm-device-plugin/enabled=true";
/// Kubelet's device-plugin directory: fixed, whatever its `--root-dir`.
pub const DEVICE_PLUGIN_DIR: &str = "/var/lib/kubelet/device-plugins";
/// Kubelet's `--root-dir`: its default, because `deploy/daemonset.yaml` mounts the
/// plugin watcher's `plugins_registry` and DRA's `plugins` from below it. Removed after
/// the run (see `machine`); a machine that has it already is refused.
pub const KUBELET_ROOT: &str = "/var/lib/kubelet";
/// The kubelet plugin watcher's directory, where a DRA driver's registration socket goes.
pub const PLUGINS_REGISTRY_DIR: &str = "/var/lib/kubelet/plugins_registry";
/// Where the DaemonSet's host keeps its prepared DRA claims (`--state-dir`, a hostPath).
pub const HOST_STATE_DIR: &str = "/var/lib/wasm-device-plugin";
/// The feature gate every component runs with (`--feature-gates`, kubelet's
/// `featureGates`): KEP-5004 (alpha in 1.34 and 1.35, default off) lets a DeviceClass's
/// `extendedResourceName` serve pods that ask for an extended resource. The API server
/// drops the field without it; the scheduler, the controller-manager (the claims it
/// manages) and kubelet act on it.
const FEATURE_GATE: &str = "DRAExtendedResource";
/// The pod network: the bridge's subnet (only this machine's pods are on it).
const POD_SUBNET: &str = "10.244.0.0/24";
/// The pod network's gateway (the bridge's address, host-local's default `.1`), and the
/// only address the API server listens on: kubectl and the components reach it from
/// this machine, pods through the bridge. No kube-proxy runs, so the `kubernetes`
/// Service's address leads nowhere: `e2e/overlay` tells the host's pod this one
/// (`KUBERNETES_SERVICE_HOST` / `_PORT`), which the certificate names.
pub const APISERVER_HOST: &str = "10.244.0.1";
const SERVICE_SUBNET: &str = "10.96.0.0/24";
const ETCD_CLIENT_PORT: u16 = 23790;
const ETCD_PEER_PORT: u16 = 23800;
pub const APISERVER_PORT: u16 = 16443;
const KUBELET_PORT: u16 = 20250;
const KUBELET_HEALTHZ_PORT: u16 = 20248;
/// How long a component may take to answer after it starts (a busy 2-core machine).
const START_TIMEOUT: Duration = Duration::from_secs(180);

/// A child process of the cluster.
struct Process {
    name: &'static str,
    child: Child,
}

/// Images the cluster needs before kubelet starts: (reference, archive).
pub struct Images {
    pub pause: (String, PathBuf),
    pub others: Vec<PathBuf>,
}

pub struct Cluster {
    /// The temporary directory holding everything the cluster writes.
    pub dir: PathBuf,
    /// Where each process's output goes (under `target/e2e/logs`, kept after a run).
    pub logs: PathBuf,
    pub kubeconfig: PathBuf,
    kubectl: PathBuf,
    ctr: PathBuf,
    shim: PathBuf,
    kubelet_command: Vec<String>,
    processes: Vec<Process>,
    machine: Option<Machine>,
    torn_down: bool,
}

impl Cluster {
    /// Starts the cluster: returns once the node is Ready and the default service
    /// account exists (pods can be created).
    ///
    /// # Errors
    /// When a port is taken, a file cannot be written, or a component does not start
    /// in time. The processes started so far are stopped (the value is dropped).
    pub fn start(bins: &Binaries, images: &Images, logs: &Path) -> Result<Cluster, String> {
        for port in [
            ETCD_CLIENT_PORT,
            ETCD_PEER_PORT,
            APISERVER_PORT,
            KUBELET_PORT,
            KUBELET_HEALTHZ_PORT,
        ] {
            TcpListener::bind(("127.0.0.1", port)).map_err(|e| {
                format!("port {port} is taken ({e}): is another cluster running on this machine?")
            })?;
        }
        if Path::new(KUBELET_ROOT).symlink_metadata().is_ok() {
            return Err(format!(
                "{KUBELET_ROOT} exists: this machine has (or had) a kubelet of its own, whose directory the e2e's kubelet would share and then remove; or an earlier run was not cleaned up (then remove it, once nothing is mounted below it)"
            ));
        }
        let dir = temp_dir()?;
        let mut cluster = Cluster {
            kubeconfig: dir.join("admin.kubeconfig"),
            dir,
            logs: logs.to_path_buf(),
            kubectl: bins.kube("kubectl"),
            ctr: bins.containerd("ctr"),
            shim: bins.containerd("containerd-shim-runc-v2"),
            kubelet_command: Vec::new(),
            processes: Vec::new(),
            machine: None,
            torn_down: false,
        };
        cluster.machine = Some(Machine::record()?);
        cluster.write_pki()?;
        cluster.start_control_plane(bins)?;
        cluster.start_containerd(bins, images)?;
        cluster.start_kubelet(bins)?;
        cluster.wait_node_ready()?;
        poll("the default service account", START_TIMEOUT, || {
            cluster
                .kubectl(&["get", "serviceaccount", "default", "-o", "name"])
                .map(|_| Some(()))
        })?;
        Ok(cluster)
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.dir.join(relative)
    }

    fn p(&self, relative: &str) -> String {
        self.path(relative).display().to_string()
    }

    /// The CA, the apiserver's serving certificate, client certificates for the admin
    /// (system:masters: kubectl, controller-manager, scheduler, apiserver→kubelet) and
    /// the node, the service-account key pair, and their kubeconfigs. ECDSA P-256.
    fn write_pki(&self) -> Result<(), String> {
        let pki = self.path("pki");
        std::fs::create_dir_all(&pki)
            .map_err(|e| format!("cannot create {}: {e}", pki.display()))?;
        let key = |name: &str| -> Result<(), String> {
            openssl(&[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                &self.p(&format!("pki/{name}.key")),
            ])
        };
        key("ca")?;
        openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            &self.p("pki/ca.key"),
            "-subj",
            "/CN=wdp-e2e-ca",
            "-days",
            "2",
            "-out",
            &self.p("pki/ca.crt"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        ])?;
        let cert =
            |name: &str, subject: &str, usage: &str, san: Option<&str>| -> Result<(), String> {
                key(name)?;
                let mut args = vec![
                    "req".to_string(),
                    "-x509".into(),
                    "-new".into(),
                    "-key".into(),
                    self.p(&format!("pki/{name}.key")),
                    "-subj".into(),
                    subject.into(),
                    "-CA".into(),
                    self.p("pki/ca.crt"),
                    "-CAkey".into(),
                    self.p("pki/ca.key"),
                    "-days".into(),
                    "2".into(),
                    "-out".into(),
                    self.p(&format!("pki/{name}.crt")),
                    "-addext".into(),
                    "basicConstraints=critical,CA:FALSE".into(),
                    "-addext".into(),
                    "keyUsage=critical,digitalSignature,keyEncipherment".into(),
                    "-addext".into(),
                    format!("extendedKeyUsage={usage}"),
                ];
                if let Some(san) = san {
                    args.extend(["-addext".to_string(), format!("subjectAltName={san}")]);
                }
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                openssl(&args)
            };
        cert(
            "apiserver",
            "/CN=kube-apiserver",
            "serverAuth",
            Some(&format!(
                "DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:127.0.0.1,IP:10.96.0.1,IP:{APISERVER_HOST}"
            )),
        )?;
        cert(
            "admin",
            "/O=system:masters/CN=wdp-e2e-admin",
            "clientAuth",
            None,
        )?;
        cert(
            "node",
            &format!("/O=system:nodes/CN=system:node:{NODE}"),
            "clientAuth",
            None,
        )?;
        key("sa")?;
        openssl(&[
            "pkey",
            "-in",
            &self.p("pki/sa.key"),
            "-pubout",
            "-out",
            &self.p("pki/sa.pub"),
        ])?;
        for (file, user) in [("admin.kubeconfig", "admin"), ("node.kubeconfig", "node")] {
            self.write(
                file,
                &format!(
                    "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: https://{APISERVER_HOST}:{APISERVER_PORT}\n    certificate-authority: {ca}\nusers:\n- name: {user}\n  user:\n    client-certificate: {crt}\n    client-key: {key}\ncontexts:\n- name: e2e\n  context: {{cluster: e2e, user: {user}}}\ncurrent-context: e2e\n",
                    ca = self.p("pki/ca.crt"),
                    crt = self.p(&format!("pki/{user}.crt")),
                    key = self.p(&format!("pki/{user}.key")),
                ),
            )?;
        }
        Ok(())
    }

    fn write(&self, relative: &str, text: &str) -> Result<PathBuf, String> {
        let path = self.path(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(path)
    }

    fn start_control_plane(&mut self, bins: &Binaries) -> Result<(), String> {
        let etcd_client = format!("http://127.0.0.1:{ETCD_CLIENT_PORT}");
        let etcd_peer = format!("http://127.0.0.1:{ETCD_PEER_PORT}");
        self.spawn(
            "etcd",
            &bins.kube("etcd"),
            &[
                "--name=e2e".into(),
                format!("--data-dir={}", self.p("etcd")),
                format!("--listen-client-urls={etcd_client}"),
                format!("--advertise-client-urls={etcd_client}"),
                format!("--listen-peer-urls={etcd_peer}"),
                format!("--initial-advertise-peer-urls={etcd_peer}"),
                format!("--initial-cluster=e2e={etcd_peer}"),
                // A throwaway cluster: durability buys nothing and fsyncs are slow on a busy disk.
                "--unsafe-no-fsync".into(),
            ],
            &[],
        )?;
        poll("etcd's /health", START_TIMEOUT, || {
            let body = http_get("127.0.0.1", ETCD_CLIENT_PORT, "/health")?;
            Ok(body.contains("\"health\":\"true\"").then_some(()))
        })?;
        create_bridge()?;
        self.spawn(
            "kube-apiserver",
            &bins.kube("kube-apiserver"),
            &[
                format!("--etcd-servers={etcd_client}"),
                format!("--bind-address={APISERVER_HOST}"),
                format!("--secure-port={APISERVER_PORT}"),
                // No reconciler: there is no kube-proxy, so nothing reaches the apiserver
                // through the kubernetes Service (pods are given its address instead).
                "--endpoint-reconciler-type=none".into(),
                format!("--tls-cert-file={}", self.p("pki/apiserver.crt")),
                format!("--tls-private-key-file={}", self.p("pki/apiserver.key")),
                format!("--client-ca-file={}", self.p("pki/ca.crt")),
                format!("--service-account-key-file={}", self.p("pki/sa.pub")),
                format!(
                    "--service-account-signing-key-file={}",
                    self.p("pki/sa.key")
                ),
                "--service-account-issuer=https://kubernetes.default.svc".into(),
                format!("--service-cluster-ip-range={SERVICE_SUBNET}"),
                "--authorization-mode=Node,RBAC".into(),
                "--enable-admission-plugins=NodeRestriction".into(),
                "--allow-privileged=true".into(),
                format!("--kubelet-client-certificate={}", self.p("pki/admin.crt")),
                format!("--kubelet-client-key={}", self.p("pki/admin.key")),
                "--kubelet-preferred-address-types=InternalIP".into(),
                "--profiling=false".into(),
                format!("--feature-gates={FEATURE_GATE}=true"),
            ],
            &[],
        )?;
        poll("kube-apiserver's /readyz", START_TIMEOUT, || {
            let ready = self.kubectl(&["get", "--raw=/readyz"])?;
            Ok((ready.trim() == "ok").then_some(()))
        })?;
        let kubeconfig = self.p("admin.kubeconfig");
        self.spawn(
            "kube-controller-manager",
            &bins.kube("kube-controller-manager"),
            &[
                format!("--kubeconfig={kubeconfig}"),
                "--leader-elect=false".into(),
                "--secure-port=0".into(),
                format!("--root-ca-file={}", self.p("pki/ca.crt")),
                format!(
                    "--service-account-private-key-file={}",
                    self.p("pki/sa.key")
                ),
                "--use-service-account-credentials=false".into(),
                format!("--service-cluster-ip-range={SERVICE_SUBNET}"),
                format!("--feature-gates={FEATURE_GATE}=true"),
            ],
            &[],
        )?;
        self.spawn(
            "kube-scheduler",
            &bins.kube("kube-scheduler"),
            &[
                format!("--kubeconfig={kubeconfig}"),
                "--leader-elect=false".into(),
                "--secure-port=0".into(),
                format!("--feature-gates={FEATURE_GATE}=true"),
            ],
            &[],
        )?;
        Ok(())
    }

    fn start_containerd(&mut self, bins: &Binaries, images: &Images) -> Result<(), String> {
        let cni_conf = format!(
            r#"{{"cniVersion": "1.0.0", "name": "wdp-e2e", "plugins": [{{"type": "bridge", "bridge": "{BRIDGE}", "isGateway": true, "ipMasq": false, "hairpinMode": true, "ipam": {{"type": "host-local", "ranges": [[{{"subnet": "{POD_SUBNET}"}}]], "dataDir": "{ipam}"}}}}]}}"#,
            ipam = self.p("cni/ipam"),
        );
        self.write("cni/net.d/10-wdp-e2e.conflist", &cni_conf)?;
        let config = format!(
            r#"version = 3
root = "{root}"
state = "{state}"
# Plugins that would write outside the directories above, and snapshotters the node
# does not use.
disabled_plugins = [
  "io.containerd.nri.v1.nri",
  "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.blockfile",
  "io.containerd.snapshotter.v1.erofs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[plugins.'io.containerd.cri.v1.runtime']
  # The VM lacks CAP_SYS_RESOURCE: runc cannot set a negative oom_score_adj
  # (symptom: "can't get final child's PID from pipe: EOF").
  restrict_oom_score_adj = true
  # Pods' network namespaces under the state directory above, not /run/netns.
  netns_mounts_under_state_dir = true
  # CDI injection (the CDI issue's scenario); upstream's default directories, where a
  # host in the DaemonSet writes its specs.
  enable_cdi = true
  cdi_spec_dirs = ["/etc/cdi", "/var/run/cdi"]

  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"

    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        Root = "{runc_root}"
        # cgroup v1 without systemd: kubelet's cgroupDriver is cgroupfs too.
        SystemdCgroup = false

  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["{cni_bin}"]
    conf_dir = "{cni_conf_dir}"
    max_conf_num = 1

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"

  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    # Imported from a local archive: nothing can be pulled.
    sandbox = "{pause}"
"#,
            root = self.p("containerd/root"),
            state = self.p("containerd/state"),
            sock = self.p("containerd/containerd.sock"),
            runc = RUNC,
            runc_root = self.p("containerd/runc"),
            cni_bin = CNI_BIN_DIR,
            cni_conf_dir = self.p("cni/net.d"),
            pause = images.pause.0,
        );
        let config = self.write("containerd/config.toml", &config)?;
        // containerd finds its shim on PATH.
        let path = format!(
            "{}:{}",
            bins.containerd.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        self.spawn(
            "containerd",
            &bins.containerd("containerd"),
            &[format!("--config={}", config.display())],
            &[("PATH", path)],
        )?;
        poll("containerd's socket", START_TIMEOUT, || {
            self.ctr(&["version"]).map(|_| Some(()))
        })?;
        for archive in std::iter::once(&images.pause.1).chain(&images.others) {
            self.import(archive)?;
        }
        Ok(())
    }

    /// Imports an OCI archive into containerd's `k8s.io` namespace (the CRI's).
    pub fn import(&self, archive: &Path) -> Result<(), String> {
        self.ctr(&["images", "import", &archive.display().to_string()])
            .map(drop)
    }

    fn start_kubelet(&mut self, bins: &Binaries) -> Result<(), String> {
        let config = format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# cgroup v1 (hybrid) without systemd.
cgroupDriver: cgroupfs
# Kubelet >= 1.35 refuses cgroup v1 unless told.
failCgroupV1: false
# Every pod's cgroup under one that the e2e created and removes.
cgroupRoot: /{CGROUP_ROOT}
failSwapOn: false
containerRuntimeEndpoint: unix://{sock}
port: {KUBELET_PORT}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {KUBELET_HEALTHZ_PORT}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: false}}
  x509: {{clientCAFile: {ca}}}
authorization:
  mode: AlwaysAllow
podLogsDir: {pod_logs}
# Faster than the defaults, for a test: ConfigMap volumes follow a replace within
# seconds, and device-plugin capacity reaches the node's status within 2 s.
syncFrequency: 10s
nodeStatusUpdateFrequency: 2s
# A test node on a shared disk: never evict for disk space, never collect images
# (nothing could pull them back).
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1%
  imagefs.available: 1%
  nodefs.inodesFree: 1%
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
# No KUBE-IPTABLES-HINT / KUBE-FIREWALL chains: they are for kube-proxy, which does not
# run here, and would leave iptables tables behind on a machine that had none.
makeIPTablesUtilChains: false
featureGates:
  {FEATURE_GATE}: true
"#,
            sock = self.p("containerd/containerd.sock"),
            ca = self.p("pki/ca.crt"),
            pod_logs = self.p("pod-logs"),
        );
        let config = self.write("kubelet/config.yaml", &config)?;
        self.kubelet_command = vec![
            bins.kube("kubelet").display().to_string(),
            format!("--config={}", config.display()),
            format!("--kubeconfig={}", self.p("node.kubeconfig")),
            format!("--root-dir={KUBELET_ROOT}"),
            format!("--hostname-override={NODE}"),
            format!("--node-labels={NODE_LABEL}"),
            "--v=2".into(),
        ];
        self.spawn_kubelet()
    }

    fn spawn_kubelet(&mut self) -> Result<(), String> {
        let (program, args) = self
            .kubelet_command
            .split_first()
            .ok_or("kubelet was never configured")?;
        let program = PathBuf::from(program);
        let args = args.to_vec();
        self.spawn("kubelet", &program, &args, &[])
    }

    fn wait_node_ready(&self) -> Result<(), String> {
        poll("kubelet's /healthz", START_TIMEOUT, || {
            let body = http_get("127.0.0.1", KUBELET_HEALTHZ_PORT, "/healthz")?;
            Ok((body.trim() == "ok").then_some(()))
        })?;
        poll(&format!("node {NODE} Ready"), START_TIMEOUT, || {
            let ready = self.kubectl(&[
                "get",
                "node",
                NODE,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ])?;
            Ok((ready.trim() == "True").then_some(()))
        })
    }

    /// Kills kubelet outright (SIGKILL) and starts it again with the same command;
    /// returns once its `/healthz` answers.
    ///
    /// # Errors
    /// When kubelet is not running or does not come back in time.
    pub fn restart_kubelet(&mut self) -> Result<(), String> {
        let index = self
            .processes
            .iter()
            .position(|p| p.name == "kubelet")
            .ok_or("kubelet is not running")?;
        let mut kubelet = self.processes.remove(index);
        eprintln!("e2e: killing kubelet (pid {})", kubelet.child.id());
        kubelet
            .child
            .kill()
            .map_err(|e| format!("cannot kill kubelet: {e}"))?;
        kubelet
            .child
            .wait()
            .map_err(|e| format!("cannot reap kubelet: {e}"))?;
        self.spawn_kubelet()?;
        poll("the restarted kubelet's /healthz", START_TIMEOUT, || {
            let body = http_get("127.0.0.1", KUBELET_HEALTHZ_PORT, "/healthz")?;
            Ok((body.trim() == "ok").then_some(()))
        })
    }

    /// Starts `program` with `args`, its output into `<logs>/<name>.log`, in a process
    /// group of its own (a Ctrl-C reaches xtask, which tears down in order).
    fn spawn(
        &mut self,
        name: &'static str,
        program: &Path,
        args: &[String],
        env: &[(&str, String)],
    ) -> Result<(), String> {
        let log_path = self.logs.join(format!("{name}.log"));
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .process_group(0);
        for (key, value) in env {
            cmd.env(key, value);
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        eprintln!(
            "e2e: started {name} (pid {}), log {}",
            child.id(),
            log_path.display()
        );
        self.processes.push(Process { name, child });
        Ok(())
    }

    /// Runs kubectl (the built one, at the cluster's version) as the admin; its stdout.
    pub fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        self.kubectl_stdin(args, None)
    }

    /// [`Cluster::kubectl`] with `input` on its stdin.
    pub fn kubectl_stdin(&self, args: &[&str], input: Option<&str>) -> Result<String, String> {
        let mut cmd = Command::new(&self.kubectl);
        cmd.args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .current_dir(crate::root());
        command_stdout(&mut cmd, input)
    }

    /// Runs ctr on containerd's socket in the `k8s.io` namespace; its stdout.
    pub fn ctr(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new(&self.ctr);
        cmd.arg("--address")
            .arg(self.path("containerd/containerd.sock"))
            .args(["--namespace", "k8s.io"])
            .args(args);
        command_stdout(&mut cmd, None)
    }

    /// Stops every process (kubelet's pods first, through the API, so their sandboxes'
    /// networks are torn down by containerd), then puts the machine back. Returns what
    /// could not be put back. Runs once; dropping the cluster runs it if not yet run.
    pub fn teardown(&mut self) -> Vec<String> {
        if std::mem::replace(&mut self.torn_down, true) {
            return Vec::new();
        }
        let started = Instant::now();
        let mut problems = Vec::new();
        let running = |name: &str, procs: &[Process]| procs.iter().any(|p| p.name == name);
        if running("kube-apiserver", &self.processes) && running("kubelet", &self.processes) {
            // Best effort: whatever is left is killed below. The test pods first, while
            // the host still runs: a pod holding a DRA claim is finished only once the
            // host has unprepared it.
            let _ = self.kubectl(&[
                "delete",
                "pods",
                "--all",
                "--namespace=default",
                "--grace-period=1",
                "--timeout=60s",
            ]);
            let _ = self.kubectl(&[
                "delete",
                "daemonsets",
                "--all",
                "--all-namespaces",
                "--wait=false",
            ]);
            let _ = self.kubectl(&[
                "delete",
                "pods",
                "--all",
                "--all-namespaces",
                "--grace-period=1",
                "--timeout=60s",
            ]);
        }
        // Kubelet first (it would restart what is killed under it), then the pods'
        // processes, then containerd, its shims, and the control plane, newest first.
        self.stop("kubelet");
        if let Some(machine) = &self.machine {
            for pid in machine.cgroup_pids() {
                // SAFETY: kill(2) has no memory effects; the PIDs are in the e2e's own cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        self.stop("containerd");
        for pid in processes_running(&self.shim) {
            // SAFETY: as above; the processes run this e2e's own shim binary.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        while let Some(process) = self.processes.pop() {
            stop_process(process);
        }
        if let Some(machine) = self.machine.take() {
            // A killed container's cgroup empties asynchronously: wait for it.
            let _ = poll(
                "the pods' processes to exit",
                Duration::from_secs(30),
                || Ok(machine.cgroup_pids().is_empty().then_some(())),
            );
            problems.extend(machine.restore(&self.dir));
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            problems.push(format!("cannot remove {}: {e}", self.dir.display()));
        }
        for problem in &problems {
            eprintln!("e2e: teardown: {problem}");
        }
        eprintln!("e2e: torn down in {:.1?}", started.elapsed());
        problems
    }

    fn stop(&mut self, name: &str) {
        if let Some(index) = self.processes.iter().position(|p| p.name == name) {
            stop_process(self.processes.remove(index));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Whether our unreaped child `pid` exits within `timeout`: its pidfd (Linux 5.3)
/// turns readable when it does; the child is left for `wait` to reap.
fn exits_within(pid: i32, timeout: Duration) -> bool {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let Ok(fd) = i32::try_from(fd) else {
        return false;
    };
    if fd < 0 {
        eprintln!(
            "e2e: pidfd_open({pid}): {}",
            std::io::Error::last_os_error()
        );
        return false;
    }
    let deadline = Instant::now() + timeout;
    let exited = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd, for the length given.
        match unsafe { libc::poll(&mut pfd, 1, ms) } {
            n if n > 0 => break true,
            0 => break false,
            // A signal (Ctrl-C) interrupted the wait: wait on for the time left.
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => break false,
        }
    };
    // SAFETY: `fd` is ours and closed once.
    unsafe { libc::close(fd) };
    exited
}

/// SIGTERM, up to 20 s to exit, then SIGKILL; reaped either way.
fn stop_process(mut process: Process) {
    let pid = process.child.id() as i32;
    // SAFETY: kill(2) has no memory effects; `pid` is our unreaped child, so it cannot
    // have been reused.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    if exits_within(pid, Duration::from_secs(20)) {
        let _ = process.child.wait();
        return;
    }
    eprintln!(
        "e2e: {} (pid {pid}) ignored SIGTERM for 20 s: killing it",
        process.name
    );
    let _ = process.child.kill();
    let _ = process.child.wait();
}

/// PIDs of the processes whose executable is `program`.
fn processes_running(program: &Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == program)
        })
        .collect()
}

/// Creates the pod network's bridge with the gateway address before the API server
/// starts, so that it can listen there; the CNI bridge plugin takes the bridge over as
/// it finds it (its address is the one the plugin would give it). Removed by
/// [`Machine::restore`] like a bridge the plugin made.
fn create_bridge() -> Result<(), String> {
    let prefix = POD_SUBNET.split_once('/').map_or("24", |(_, p)| p);
    let address = format!("{APISERVER_HOST}/{prefix}");
    for args in [
        &["link", "add", BRIDGE, "type", "bridge"][..],
        &["addr", "add", &address, "dev", BRIDGE],
        &["link", "set", BRIDGE, "up"],
    ] {
        command_stdout(Command::new("ip").args(args), None)?;
    }
    Ok(())
}

/// A new directory under the system's temporary directory, mode 0700.
fn temp_dir() -> Result<PathBuf, String> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("wdp-e2e-{}-{nanos:x}", std::process::id()));
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

fn openssl(args: &[&str]) -> Result<(), String> {
    command_stdout(Command::new("openssl").args(args), None).map(drop)
}

/// Runs `cmd` (with `input` on stdin), returning stdout; an error with its stderr.
fn command_stdout(cmd: &mut Command, input: Option<&str>) -> Result<String, String> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        use std::io::Write;
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| format!("cannot write to {:?}: {e}", cmd.get_program()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy()).collect();
        Err(format!(
            "`{} {}` failed ({}): {}",
            Path::new(cmd.get_program())
                .file_name()
                .unwrap_or_default()
                .to_string_lossy(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A plain HTTP/1.0 GET; the body of a 200 answer.
pub fn http_get(host: &str, port: u16, path: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let address = format!("{host}:{port}");
    let socket_address = address
        .parse()
        .map_err(|e| format!("bad address {address}: {e}"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&socket_address, Duration::from_secs(5))
        .map_err(|e| format!("cannot connect to {address}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n")
        .map_err(|e| format!("cannot write to {address}: {e}"))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| format!("cannot read from {address}: {e}"))?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) == Some("200") {
        Ok(body.to_string())
    } else {
        Err(format!("GET http://{address}{path}: {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `e2e/overlay` tells the host's pod where the API server listens: the same
    /// address and port as the cluster's.
    #[test]
    fn overlay_gives_pods_the_apiservers_address() {
        let path = crate::root().join("e2e/overlay/kustomization.yaml");
        let text = std::fs::read_to_string(&path).expect("the e2e overlay");
        for (name, value) in [
            ("KUBERNETES_SERVICE_HOST", APISERVER_HOST.to_string()),
            ("KUBERNETES_SERVICE_PORT", APISERVER_PORT.to_string()),
        ] {
            let entry = format!("name: {name}\n          value: \"{value}\"");
            assert!(text.contains(&entry), "{} lacks {entry:?}", path.display());
        }
        assert!(
            POD_SUBNET.starts_with(APISERVER_HOST.trim_end_matches('1')),
            "{APISERVER_HOST} is not {POD_SUBNET}'s gateway"
        );
    }
}
