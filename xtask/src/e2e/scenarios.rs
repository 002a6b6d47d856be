//! The e2e's scenarios, run in order against one cluster (each builds on the state the
//! one before left: the DaemonSet deployed, pods holding devices). Each returns what it
//! saw, or an error that fails the run; none can pass without its condition being met.
//! Talks to the cluster only through kubectl and the pod IP, and looks at the node's
//! files the host writes (the device-plugin and plugin-watcher directories, CDI specs,
//! the DRA state directory) and at kubelet's log. The DRA scenarios serve the virtual
//! guest with `examples/modules/virtual_dra.toml` from the ConfigMap and apply
//! `examples/dra`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::cluster::{
    Cluster, DEVICE_PLUGIN_DIR, HOST_STATE_DIR, NODE, PLUGINS_REGISTRY_DIR, http_get,
};
use super::{fatal, poll};
use crate::root;

const NAMESPACE: &str = "kube-system";
const DAEMONSET: &str = "wasm-device-plugin";
const SELECTOR: &str = "app.kubernetes.io/name=wasm-device-plugin";
const GPU: &str = "virtual.example.com/gpu";
const NIC: &str = "virtual.example.com/nic";
/// The overlay that swaps only the image reference and pull policy.
const OVERLAY: &str = "e2e/overlay";
/// That overlay plus deploy/'s modules-configmap component.
const OVERLAY_CONFIGMAP: &str = "e2e/overlay-configmap";
const CONFIGMAP: &str = "wasm-device-plugin-modules";
/// How long a pod may take to become Ready on a busy 2-core machine.
const POD_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a change may take to reach the node's allocatable.
const ALLOCATABLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How fast allocatable must be back after a rolling update starts.
const ROLLOUT_BOUND: Duration = Duration::from_secs(45);
/// The virtual guest served through DRA: its module name in the ConfigMap (a copy of
/// virtual_devices.wasm beside `examples/modules/virtual_dra.toml`).
const DRA_MODULE: &str = "virtual_dra";
/// The DRA driver that serves `example.com/dev-1` (the manifest's default driver name).
const DRIVER: &str = "dev-1.example.com";
/// The extended resource the DeviceClass of `examples/dra` serves (KEP-5004).
const DRA_RESOURCE: &str = "example.com/dev-1";
/// The DRA examples the scenarios apply.
const DRA_EXAMPLES: &str = "examples/dra";
/// The node's CDI spec directory, the host's default `--cdi-dir` (a DaemonSet hostPath).
const CDI_DIR: &str = "/var/run/cdi";
/// How long a change may take to reach the DRA driver's ResourceSlices, and a removed
/// pod's claim to be unprepared (kubelet's ConfigMap sync is 10 s here).
const DRA_TIMEOUT: Duration = Duration::from_secs(60);

pub enum Outcome {
    Passed(String),
}

/// What the scenarios share.
pub struct Context<'a> {
    pub cluster: &'a mut Cluster,
    /// The staged modules directory (`dist`), for the ConfigMap.
    pub modules: PathBuf,
    /// The host image's second tag, for the rolling update.
    pub second_image: String,
    /// The extended resources the node must advertise now.
    expected: BTreeMap<String, u64>,
    /// The files the ConfigMap holds now (each key is a file's name), once a scenario
    /// has created it.
    configmap: Vec<PathBuf>,
    /// A device the DRA guest reported and no longer does: (device name in the slice,
    /// guest id).
    vanished: Option<(String, String)>,
}

impl<'a> Context<'a> {
    pub fn new(cluster: &'a mut Cluster, modules: PathBuf, second_image: String) -> Self {
        // examples/modules/virtual_devices.toml: kinds gpu=2,nic=4, each gpu shared by 4.
        let expected = [(GPU.to_string(), 8), (NIC.to_string(), 4)].into();
        Context {
            cluster,
            modules,
            second_image,
            expected,
            configmap: Vec::new(),
            vanished: None,
        }
    }
}

type Scenario = fn(&mut Context) -> Result<Outcome, String>;

/// The scenarios, in the order they run.
pub const SCENARIOS: [(&str, Scenario); 15] = [
    ("daemonset-ready", daemonset_ready),
    ("example-pods", example_pods),
    ("configmap-module-replace", configmap_module_replace),
    ("kubelet-restart", kubelet_restart),
    ("rolling-update", rolling_update),
    ("metrics", metrics),
    ("cdi", cdi),
    ("dra-registration", dra_registration),
    ("dra-slices", dra_slices),
    ("dra-claims", dra_claims),
    ("dra-unprepare", dra_unprepare),
    ("dra-host-restart", dra_host_restart),
    ("dra-extended-resource", dra_extended_resource),
    ("dra-vanished-device", dra_vanished_device),
    ("dra-module-removal", dra_module_removal),
];

/// The DaemonSet from `deploy/` (through the overlay) becomes Ready through its own
/// probes, and the node advertises the shipped guests' resources.
fn daemonset_ready(ctx: &mut Context) -> Result<Outcome, String> {
    let started = Instant::now();
    ctx.cluster.kubectl(&["apply", "-k", OVERLAY])?;
    rollout(ctx.cluster)?;
    let pod = host_pod(ctx.cluster)?;
    let probes = ctx.cluster.kubectl(&[
        "-n", NAMESPACE, "get", "pod", &pod.name, "-o",
        "jsonpath={.spec.containers[0].readinessProbe.httpGet.path} {.spec.containers[0].startupProbe.httpGet.path}",
    ])?;
    if probes.trim() != "/readyz /healthz" {
        return Err(format!(
            "the host pod's probes are {probes:?}, not deploy/'s /readyz and /healthz"
        ));
    }
    let ready_after = started.elapsed();
    let allocatable = wait_allocatable(ctx.cluster, &ctx.expected)?;
    Ok(Outcome::Passed(format!(
        "pod {} Ready after {ready_after:.1?} (readiness /readyz, startup /healthz); allocatable {}",
        pod.name,
        show(&allocatable)
    )))
}

/// examples/pods: gpu-share sees the guest's env; nic-hog takes every NIC; nic-waiting
/// is Pending (Insufficient NIC) until nic-hog is deleted, then runs.
fn example_pods(ctx: &mut Context) -> Result<Outcome, String> {
    let c = &*ctx.cluster;
    c.kubectl(&["apply", "-f", "examples/pods/gpu-share.yaml"])?;
    wait_pod_ready(c, "gpu-share")?;
    let gpu_env = device_env(c, "gpu-share", "gpu", 1)?;

    c.kubectl(&["apply", "-f", "examples/pods/nic-hog.yaml"])?;
    wait_pod_ready(c, "nic-hog")?;
    let nics = device_env(c, "nic-hog", "nic", 4)?;
    let nic_total = ctx.expected.get(NIC).copied().unwrap_or(0);
    if nics.len() as u64 != nic_total {
        return Err(format!(
            "nic-hog got {} NICs, the node has {nic_total}",
            nics.len()
        ));
    }

    c.kubectl(&["apply", "-f", "examples/pods/nic-waiting.yaml"])?;
    let reason = poll("nic-waiting to be found unschedulable", POD_TIMEOUT, || {
        let pod = pod_json(c, "default", "nic-waiting")?;
        if pod["status"]["phase"] != "Pending" {
            return Err(fatal(format!(
                "nic-waiting is {} while nic-hog holds every NIC",
                pod["status"]["phase"]
            )));
        }
        Ok(condition(&pod, "PodScheduled")
            .filter(|c| c["status"] == "False")
            .and_then(|c| c["message"].as_str().map(str::to_string)))
    })?;
    if !reason.contains(&format!("Insufficient {NIC}")) {
        return Err(format!(
            "nic-waiting is unschedulable for another reason: {reason}"
        ));
    }
    let still = pod_json(c, "default", "nic-waiting")?;
    if still["status"]["phase"] != "Pending" {
        return Err("nic-waiting left Pending while nic-hog still runs".into());
    }
    c.kubectl(&["delete", "pod", "nic-hog", "--wait=true", "--timeout=60s"])?;
    let freed = Instant::now();
    wait_pod_ready(c, "nic-waiting")?;
    let waited = freed.elapsed();
    let nic_env = device_env(c, "nic-waiting", "nic", 1)?;
    Ok(Outcome::Passed(format!(
        "gpu-share: {}; nic-hog: {}; nic-waiting Pending ({reason}) until nic-hog was deleted, Running {waited:.1?} later with {}",
        gpu_env.join(" "),
        nics.join(" "),
        nic_env.join(" ")
    )))
}

/// Serving the modules from the ConfigMap (deploy/components/modules-configmap), then
/// `kubectl replace` of the ConfigMap with a changed manifest: the node's allocatable
/// follows, and the host's pod is the same and never restarted.
fn configmap_module_replace(ctx: &mut Context) -> Result<Outcome, String> {
    let wasm = ctx.modules.join("virtual_devices.wasm");
    let manifest_path = ctx.modules.join("virtual_devices.toml");
    let manifest = std::fs::read_to_string(&manifest_path)
        .map_err(|e| format!("cannot read {}: {e}", manifest_path.display()))?;
    let configmap = |manifest: &Path| -> Result<String, String> {
        ctx.cluster.kubectl(&[
            "-n",
            NAMESPACE,
            "create",
            "configmap",
            CONFIGMAP,
            &format!("--from-file={}", wasm.display()),
            &format!("--from-file={}", manifest.display()),
            "--dry-run=client",
            "-o",
            "yaml",
        ])
    };
    let yaml = configmap(&manifest_path)?;
    ctx.cluster
        .kubectl_stdin(&["create", "-f", "-"], Some(&yaml))?;
    let before = host_pod(ctx.cluster)?;
    ctx.cluster.kubectl(&["apply", "-k", OVERLAY_CONFIGMAP])?;
    rollout(ctx.cluster)?;
    let pod = host_pod(ctx.cluster)?;
    if pod.uid == before.uid {
        return Err("applying the ConfigMap overlay did not replace the host's pod".into());
    }
    wait_allocatable(ctx.cluster, &ctx.expected)?;

    const FROM: &str = "kinds = \"gpu=2,nic=4\"";
    const TO: &str = "kinds = \"gpu=2,nic=6\"";
    if !manifest.contains(FROM) {
        return Err(format!(
            "{} no longer says {FROM}: update this scenario",
            manifest_path.display()
        ));
    }
    let changed_dir = ctx.cluster.dir.join("configmap");
    std::fs::create_dir_all(&changed_dir).map_err(|e| e.to_string())?;
    // The key is the file name: the same name, a changed manifest.
    let changed = changed_dir.join("virtual_devices.toml");
    std::fs::write(&changed, manifest.replace(FROM, TO)).map_err(|e| e.to_string())?;
    let yaml = configmap(&changed)?;
    let replaced = Instant::now();
    ctx.cluster
        .kubectl_stdin(&["replace", "-f", "-"], Some(&yaml))?;
    ctx.expected.insert(NIC.into(), 6);
    ctx.configmap = vec![wasm.clone(), changed.clone()];
    let allocatable = wait_allocatable(ctx.cluster, &ctx.expected)?;
    let took = replaced.elapsed();
    let after = host_pod(ctx.cluster)?;
    if after.uid != pod.uid
        || after.restarts != pod.restarts
        || after.container_id != pod.container_id
    {
        return Err(format!(
            "the host's pod changed across the ConfigMap replace: {} (restarts {}) → {} (restarts {})",
            pod.name, pod.restarts, after.name, after.restarts
        ));
    }
    Ok(Outcome::Passed(format!(
        "ConfigMap replaced (nic=4 → nic=6): allocatable {} after {took:.1?}; pod {} unchanged, {} restarts",
        show(&allocatable),
        after.name,
        after.restarts
    )))
}

/// Kubelet killed (SIGKILL) and restarted: the host re-registers every resource, the
/// running pod keeps its container (and devices), and a new pod still gets a device.
fn kubelet_restart(ctx: &mut Context) -> Result<Outcome, String> {
    let host = host_pod(ctx.cluster)?;
    let before = scrape(&host.ip)?;
    let registrations = |text: &str, resource: &str| {
        metric(
            text,
            "wdp_registrations_total",
            &[("resource", resource), ("outcome", "ok")],
        )
        .unwrap_or(0.0)
    };
    let restarts_before = metric(&before, "wdp_kubelet_restarts_total", &[]).unwrap_or(0.0);
    let gpu_share = pod_json(ctx.cluster, "default", "gpu-share")?;
    let container_before = gpu_share["status"]["containerStatuses"][0]["containerID"].clone();

    ctx.cluster.restart_kubelet()?;
    let back = Instant::now();
    let resources: Vec<String> = ctx.expected.keys().cloned().collect();
    poll(
        "the host to register again with the new kubelet",
        ALLOCATABLE_TIMEOUT,
        || {
            let now = scrape(&host.ip)?;
            let all = resources
                .iter()
                .all(|r| registrations(&now, r) > registrations(&before, r));
            let noticed =
                metric(&now, "wdp_kubelet_restarts_total", &[]).unwrap_or(0.0) > restarts_before;
            Ok((all && noticed).then_some(()))
        },
    )?;
    let reregistered = back.elapsed();

    let gpu_share = pod_json(ctx.cluster, "default", "gpu-share")?;
    let status = &gpu_share["status"]["containerStatuses"][0];
    if status["containerID"] != container_before
        || status["restartCount"] != 0
        || status["ready"] != true
    {
        return Err(format!(
            "gpu-share's container did not survive the kubelet restart: {status}"
        ));
    }
    let after_host = host_pod(ctx.cluster)?;
    if after_host.uid != host.uid || after_host.restarts != host.restarts {
        return Err("the host's pod was restarted with kubelet".into());
    }
    wait_allocatable(ctx.cluster, &ctx.expected)?;
    let pod = example_pod(ctx.cluster, "gpu-share", "gpu-after-restart")?;
    wait_pod_ready(ctx.cluster, &pod)?;
    let env = device_env(ctx.cluster, &pod, "gpu", 1)?;
    Ok(Outcome::Passed(format!(
        "re-registered {} within {reregistered:.1?} of the new kubelet's /healthz answering; gpu-share kept its container; {pod}: {}",
        resources.join(", "),
        env.join(" ")
    )))
}

/// A rolling update to a new image: at no moment do two hosts serve one resource (at
/// most one socket per resource in kubelet's directory), and allocatable is back soon.
fn rolling_update(ctx: &mut Context) -> Result<Outcome, String> {
    let old = host_pod(ctx.cluster)?;
    let sockets = SocketWatch::start()?;
    let started = Instant::now();
    let set = ctx.cluster.kubectl(&[
        "-n",
        NAMESPACE,
        "set",
        "image",
        &format!("daemonset/{DAEMONSET}"),
        &format!("wasm-device-plugin={}", ctx.second_image),
    ]);
    let rolled = set.and_then(|_| rollout(ctx.cluster));
    let back = rolled.and_then(|_| wait_allocatable(ctx.cluster, &ctx.expected));
    let took = started.elapsed();
    let watch = sockets.finish();
    let allocatable = back?;
    let watch = watch?;
    if let Some((resource, sockets)) = &watch.doubled {
        return Err(format!(
            "two hosts served {resource} at once: kubelet's directory held {}",
            sockets.join(", ")
        ));
    }
    let new = host_pod(ctx.cluster)?;
    if new.uid == old.uid || new.image != ctx.second_image {
        return Err(format!("the rollout left {} on {} ", new.name, new.image));
    }
    if took > ROLLOUT_BOUND {
        return Err(format!(
            "allocatable was back only {took:.1?} after the update started (bound {ROLLOUT_BOUND:?})"
        ));
    }
    for pod in ["gpu-share", "nic-waiting", "gpu-after-restart"] {
        let json = pod_json(ctx.cluster, "default", pod)?;
        if json["status"]["containerStatuses"][0]["ready"] != true {
            return Err(format!(
                "{pod} is no longer running after the rolling update"
            ));
        }
    }
    Ok(Outcome::Passed(format!(
        "{} → {} ({}); at most one socket per resource over {} directory events; longest gap without a socket {:.1?}; allocatable {} {took:.1?} after the update started",
        old.name,
        new.name,
        new.image,
        watch.events,
        watch.longest_gap,
        show(&allocatable)
    )))
}

/// `/metrics`, scraped through the pod IP, counts the Allocates that happened: one per
/// device-holding container started since this host started.
fn metrics(ctx: &mut Context) -> Result<Outcome, String> {
    let host = host_pod(ctx.cluster)?;
    let gpu = example_pod(ctx.cluster, "gpu-share", "metrics-gpu")?;
    let nic = example_pod(ctx.cluster, "nic-waiting", "metrics-nic")?;
    wait_pod_ready(ctx.cluster, &gpu)?;
    wait_pod_ready(ctx.cluster, &nic)?;
    let text = scrape(&host.ip)?;
    let mut seen = Vec::new();
    for resource in [GPU, NIC] {
        let ok = metric(
            &text,
            "wdp_allocations_total",
            &[("resource", resource), ("outcome", "ok")],
        );
        if ok != Some(1.0) {
            return Err(format!(
                "http://{}:9477/metrics says {ok:?} Allocates of {resource} since {} started; one pod asked since",
                host.ip, host.name
            ));
        }
        seen.push(format!(
            "wdp_allocations_total{{resource=\"{resource}\",outcome=\"ok\"}} 1"
        ));
    }
    let failed: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("wdp_allocations_total{") && !l.contains("outcome=\"ok\""))
        .collect();
    if !failed.is_empty() {
        return Err(format!(
            "the host answered Allocates with errors: {}",
            failed.join("; ")
        ));
    }
    Ok(Outcome::Passed(format!(
        "scraped http://{}:9477/metrics: {}",
        host.ip,
        seen.join(", ")
    )))
}

/// A container gets its device node through containerd's CDI injection (containerd
/// runs with CDI on and `cdi_spec_dirs` set, cluster.rs): the generic guest, served
/// from the ConfigMap with `cdi = true`, reports the node's `/dev/fuse`; the host writes
/// its CDI spec into the node's `/var/run/cdi` and answers Allocate with the CDI name
/// only; the pod sees the node with the node's device numbers.
fn cdi(ctx: &mut Context) -> Result<Outcome, String> {
    // A node no container has by default (runc adds null, zero, full, random,
    // urandom, tty, ptmx and console): the generic guest reports it, the host
    // writes it into a CDI spec and answers Allocate with its CDI name only.
    const NODE_PATH: &str = "/dev/fuse";
    const RESOURCE: &str = "cdi.example.com/fuse";
    const POD: &str = "cdi-fuse";
    let rdev = std::os::unix::fs::MetadataExt::rdev(
        &std::fs::metadata(NODE_PATH)
            .map_err(|e| format!("this scenario needs the node's {NODE_PATH}: {e}"))?,
    );
    let (major, minor) = ((rdev >> 8) & 0xfff, (rdev & 0xff) | ((rdev >> 12) & !0xff));

    // The ConfigMap's modules as the ConfigMap scenario left them, plus the generic
    // guest with `cdi = true`.
    let dir = ctx.cluster.dir.join("cdi-modules");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let generic_toml = dir.join("generic.toml");
    std::fs::write(
        &generic_toml,
        format!(
            "domain = \"cdi.example.com\"\ncdi = true\n\n[grants]\nread-only-dirs = [\"/dev\"]\n\n\
             [config]\nkinds = \"fuse\"\n\"fuse.paths\" = \"{NODE_PATH}\"\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    let changed = ctx.cluster.dir.join("configmap/virtual_devices.toml");
    let virtual_toml = if changed.is_file() {
        changed
    } else {
        ctx.modules.join("virtual_devices.toml")
    };
    let files = [
        ctx.modules.join("virtual_devices.wasm"),
        virtual_toml,
        ctx.modules.join("generic.wasm"),
        generic_toml,
    ];
    let mut args: Vec<String> = ["-n", NAMESPACE, "create", "configmap", CONFIGMAP]
        .map(str::to_string)
        .to_vec();
    args.extend(files.iter().map(|f| format!("--from-file={}", f.display())));
    args.extend(["--dry-run=client", "-o", "yaml"].map(str::to_string));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let yaml = ctx.cluster.kubectl(&args)?;
    ctx.cluster
        .kubectl_stdin(&["replace", "-f", "-"], Some(&yaml))?;
    ctx.configmap = files.to_vec();
    ctx.expected.insert(RESOURCE.into(), 1);
    wait_allocatable(ctx.cluster, &ctx.expected)?;

    // The spec on the node, as the host wrote it (the DaemonSet mounts the node's
    // /var/run/cdi, which containerd reads).
    let spec_path = Path::new("/var/run/cdi").join(format!(
        "wasm-device-plugin_{}.json",
        RESOURCE.replace('/', "_")
    ));
    let spec: Value = serde_json::from_str(
        &std::fs::read_to_string(&spec_path)
            .map_err(|e| format!("the host wrote no CDI spec at {}: {e}", spec_path.display()))?,
    )
    .map_err(|e| format!("{}: {e}", spec_path.display()))?;
    let device = &spec["devices"][0];
    if spec["kind"] != RESOURCE
        || device["name"] != "fuse"
        || device["containerEdits"]["deviceNodes"][0]["path"] != NODE_PATH
    {
        return Err(format!(
            "{} does not name {RESOURCE}=fuse with the node {NODE_PATH}: {spec}",
            spec_path.display()
        ));
    }

    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {POD}\nspec:\n  restartPolicy: Never\n  \
         terminationGracePeriodSeconds: 5\n  containers:\n    - name: show-node\n      \
         image: busybox:1.36\n      command: [\"sh\", \"-c\", \"stat -c 'node %t %T' {NODE_PATH}; \
         while true; do sleep 3600; done\"]\n      resources:\n        limits:\n          \
         {RESOURCE}: 1\n"
    );
    ctx.cluster
        .kubectl_stdin(&["apply", "-f", "-"], Some(&pod))?;
    wait_pod_ready(ctx.cluster, POD)?;
    let want = format!("node {major:x} {minor:x}");
    let seen = poll(&format!("{POD}'s output"), POD_TIMEOUT, || {
        let logs = ctx.cluster.kubectl(&["logs", POD])?;
        Ok((!logs.trim().is_empty()).then(|| logs.trim().to_string()))
    })?;
    if seen != want {
        return Err(format!(
            "{POD} sees {NODE_PATH} as {seen:?}, not the node's {want:?}"
        ));
    }
    // What kubelet was answered (its checkpoint keeps every container's Allocate
    // response): the CDI name, and no device node of the plugin's own, so the
    // container's node came from containerd's CDI injection.
    let (cdi_names, nodes) = checkpointed_answer(RESOURCE)?;
    if cdi_names != [format!("{RESOURCE}=fuse")] || nodes != 0 {
        return Err(format!(
            "kubelet was answered CDI names {cdi_names:?} and {nodes} device nodes for {RESOURCE}; \
             expected only {RESOURCE}=fuse"
        ));
    }
    ctx.cluster
        .kubectl(&["delete", "pod", POD, "--wait=true", "--timeout=60s"])?;
    Ok(Outcome::Passed(format!(
        "{} holds {RESOURCE}=fuse; Allocate answered only that CDI name; {POD} sees {NODE_PATH} ({want}) through containerd's CDI injection",
        spec_path.display()
    )))
}

/// The virtual guest joins the ConfigMap with the DRA manifest
/// (`examples/modules/virtual_dra.toml`, `api = "dra"`): the host binds its registration
/// socket in kubelet's plugin watcher directory, named with the pod's UID (the
/// DaemonSet's POD_UID, upstream's rolling-update naming), and kubelet registers the
/// driver: its plugin manager starts the registration and connects to the DRA endpoint
/// the host named (kubelet's log, `-v=2`), with no registration error.
fn dra_registration(ctx: &mut Context) -> Result<Outcome, String> {
    let host = host_pod(ctx.cluster)?;
    let mut files = ctx.configmap.clone();
    if files.is_empty() {
        return Err("the ConfigMap scenarios did not run: no ConfigMap to add to".into());
    }
    files.extend(dra_module_files(ctx, "dev-1=4", "")?);
    replace_configmap(ctx.cluster, &files)?;
    ctx.configmap = files;
    let added = Instant::now();

    let socket = Path::new(PLUGINS_REGISTRY_DIR).join(format!("{DRIVER}-{}-reg.sock", host.uid));
    poll(
        &format!("the registration socket {}", socket.display()),
        DRA_TIMEOUT,
        || {
            use std::os::unix::fs::FileTypeExt;
            Ok(std::fs::symlink_metadata(&socket)
                .is_ok_and(|m| m.file_type().is_socket())
                .then_some(()))
        },
    )?;
    let bound = added.elapsed();
    let endpoint = kubelet_connected(ctx.cluster, &host.uid)?;
    let socket_text = socket.display().to_string();
    let log = kubelet_log(ctx.cluster)?;
    if !log
        .lines()
        .any(|l| l.contains("OperationExecutor.RegisterPlugin started") && l.contains(&socket_text))
    {
        return Err(format!(
            "kubelet's plugin watcher never started registering {socket_text}"
        ));
    }
    if let Some(error) = log
        .lines()
        .find(|l| l.contains("RegisterPlugin error") && l.contains(&socket_text))
    {
        return Err(format!("kubelet refused the registration: {error}"));
    }
    Ok(Outcome::Passed(format!(
        "{} bound {bound:.1?} after the ConfigMap replace; kubelet registered driver {DRIVER} and connected to {endpoint} after {:.1?}",
        socket.display(),
        added.elapsed()
    )))
}

/// The driver's ResourceSlices, as the API server accepted them: one pool named after
/// the node, on the node, owned by the Node object, with the guest's 4 devices (names
/// per the host's DNS-label mapping, attributes `kind` and `id`). Shrinking the
/// manifest's kinds to dev-1=3 in the ConfigMap publishes a new pool generation with 3
/// devices, the remaining ones under the same names.
fn dra_slices(ctx: &mut Context) -> Result<Outcome, String> {
    let node_uid = ctx
        .cluster
        .kubectl(&["get", "node", NODE, "-o", "jsonpath={.metadata.uid}"])?;
    let first = wait_pool(ctx.cluster, node_uid.trim(), &dev1_ids(4, None), None)?;
    let (gone_name, gone_id) = first
        .devices
        .iter()
        .find(|(_, id)| id.as_str() == "/node1/dev1/4")
        .cloned()
        .ok_or_else(|| format!("no device /node1/dev1/4 in the pool: {:?}", first.devices))?;

    let mut files: Vec<PathBuf> = ctx
        .configmap
        .iter()
        .filter(|f| !is_dra_module(f))
        .cloned()
        .collect();
    files.extend(dra_module_files(ctx, "dev-1=3", "")?);
    let replaced = Instant::now();
    replace_configmap(ctx.cluster, &files)?;
    ctx.configmap = files;
    let second = wait_pool(
        ctx.cluster,
        node_uid.trim(),
        &dev1_ids(3, None),
        Some(first.generation),
    )?;
    let took = replaced.elapsed();
    for (name, id) in &second.devices {
        if !first.devices.contains(&(name.clone(), id.clone())) {
            return Err(format!(
                "device {id} is {name} after the rescan, not as before: {:?}",
                first.devices
            ));
        }
    }
    ctx.vanished = Some((gone_name.clone(), gone_id.clone()));

    // A health change republishes too: the guest's `health` reports /node1/dev1/2
    // unhealthy, and the pool drops it; healthy again, it is back.
    const SICK: &str = "/node1/dev1/2";
    let healthy_files = ctx.configmap.clone();
    let mut sick_files: Vec<PathBuf> = healthy_files
        .iter()
        .filter(|f| !is_dra_module(f))
        .cloned()
        .collect();
    sick_files.extend(dra_module_files(ctx, "dev-1=3", SICK)?);
    replace_configmap(ctx.cluster, &sick_files)?;
    let sick = wait_pool(
        ctx.cluster,
        node_uid.trim(),
        &dev1_ids(3, Some(SICK)),
        Some(second.generation),
    )?;
    if sick.devices.iter().any(|(_, id)| id == SICK) {
        return Err(format!(
            "{SICK} is unhealthy and still in the pool: {:?}",
            sick.devices
        ));
    }
    replace_configmap(ctx.cluster, &healthy_files)?;
    let well = wait_pool(
        ctx.cluster,
        node_uid.trim(),
        &dev1_ids(3, None),
        Some(sick.generation),
    )?;
    if !well.devices.iter().any(|(_, id)| id == SICK) {
        return Err(format!(
            "{SICK} is healthy again and not back in the pool: {:?}",
            well.devices
        ));
    }
    let names: Vec<&str> = first.devices.iter().map(|(n, _)| n.as_str()).collect();
    Ok(Outcome::Passed(format!(
        "pool {NODE} generation {} in {} slice(s) owned by Node {NODE}: {} (kind dev-1, ids /node1/dev1/1-4); dev-1=3: generation {} with 3 devices {took:.1?} after the replace ({gone_name} gone); {SICK} unhealthy: generation {} without it; healthy: generation {} with it",
        first.generation,
        first.slices,
        names.join(" "),
        second.generation,
        sick.generation,
        well.generation
    )))
}

/// examples/dra: the DeviceClass (its extendedResourceName kept by the API server, so
/// the feature gate is on), a pod with a claim from the ResourceClaimTemplate and a pod
/// with the ResourceClaim `dev-1`. Both run; each claim is allocated a device of our
/// pool; the host wrote the claim's CDI spec, and the container shows the env the guest
/// gave for exactly the allocated device (containerd applied the spec). The claim
/// `dev-1` selects by an attribute the guest described and carries opaque
/// configuration, which the guest's `prepare` turned into `GREETING` in its pod.
fn dra_claims(ctx: &mut Context) -> Result<Outcome, String> {
    let c = &*ctx.cluster;
    for file in [
        "deviceclass.yaml",
        "resourceclaimtemplate.yaml",
        "resourceclaim.yaml",
        "template-pod.yaml",
        "claim-pod.yaml",
    ] {
        c.kubectl(&["apply", "-f", &format!("{DRA_EXAMPLES}/{file}")])?;
    }
    let extended = c.kubectl(&[
        "get",
        "deviceclass",
        DRIVER,
        "-o",
        "jsonpath={.spec.extendedResourceName}",
    ])?;
    if extended.trim() != DRA_RESOURCE {
        return Err(format!(
            "the API server kept extendedResourceName {extended:?}, not {DRA_RESOURCE}: is DRAExtendedResource on?"
        ));
    }
    let mut seen = Vec::new();
    let mut devices = BTreeSet::new();
    for pod in ["dra-template", "dra-claim"] {
        wait_pod_ready(c, pod)?;
        let prepared = prepared_claim(c, pod)?;
        if !devices.insert(prepared.device.clone()) {
            return Err(format!("two claims hold {}: {devices:?}", prepared.device));
        }
        seen.push(format!(
            "{pod}: claim {} → {} ({}), {}, {}",
            prepared.claim,
            prepared.device,
            prepared.id,
            prepared.env,
            prepared.spec.display()
        ));
    }
    let greeting = "GREETING=hello-from-the-claim";
    let logs = c.kubectl(&["logs", "dra-claim"])?;
    if !logs.lines().any(|l| l == greeting) {
        return Err(format!(
            "dra-claim does not show {greeting} from its claim's configuration: {logs:?}"
        ));
    }
    seen.push(format!(
        "dra-claim: {greeting} from the claim's configuration"
    ));
    Ok(Outcome::Passed(seen.join("; ")))
}

/// Deleting the pod with the templated claim: kubelet unprepares it, the host removes
/// the claim's CDI spec, and the claim made for the pod is deleted.
fn dra_unprepare(ctx: &mut Context) -> Result<Outcome, String> {
    let c = &*ctx.cluster;
    let prepared = prepared_claim(c, "dra-template")?;
    c.kubectl(&[
        "delete",
        "pod",
        "dra-template",
        "--wait=true",
        "--timeout=60s",
    ])?;
    let deleted = Instant::now();
    wait_removed(&prepared.spec)?;
    let removed = deleted.elapsed();
    poll(
        &format!("the claim {} to be deleted", prepared.claim),
        DRA_TIMEOUT,
        || {
            let left = c.kubectl(&[
                "get",
                "resourceclaims",
                "--ignore-not-found",
                "-o",
                "name",
                &prepared.claim,
            ])?;
            Ok(left.trim().is_empty().then_some(()))
        },
    )?;
    Ok(Outcome::Passed(format!(
        "dra-template deleted: {} removed within {removed:.1?}; claim {} deleted",
        prepared.spec.display(),
        prepared.claim
    )))
}

/// The host's pod deleted (the DaemonSet starts another) while dra-claim holds its
/// prepared claim: the pod keeps running, the new host registers under its own UID,
/// and deleting dra-claim afterwards is still unprepared (the new host found the claim
/// in the state directory it checkpointed to).
fn dra_host_restart(ctx: &mut Context) -> Result<Outcome, String> {
    let c = &*ctx.cluster;
    let prepared = prepared_claim(c, "dra-claim")?;
    let container =
        pod_json(c, "default", "dra-claim")?["status"]["containerStatuses"][0]["containerID"]
            .clone();
    let old = host_pod(c)?;
    c.kubectl(&[
        "-n",
        NAMESPACE,
        "delete",
        "pod",
        &old.name,
        "--wait=true",
        "--timeout=60s",
    ])?;
    let deleted = Instant::now();
    let new = poll("a new host pod Ready", POD_TIMEOUT, || {
        Ok(ready_host_pod(c).ok().filter(|p| p.uid != old.uid))
    })?;
    let endpoint = kubelet_connected(c, &new.uid)?;
    let back = deleted.elapsed();
    let checkpoints = std::fs::read_dir(Path::new(HOST_STATE_DIR).join("dra"))
        .map(|entries| entries.flatten().count())
        .unwrap_or(0);
    let json = pod_json(c, "default", "dra-claim")?;
    let status = &json["status"]["containerStatuses"][0];
    if status["containerID"] != container || status["ready"] != true {
        return Err(format!(
            "dra-claim's container did not survive the host's restart: {status}"
        ));
    }
    if !prepared.spec.exists() {
        return Err(format!(
            "{} is gone while dra-claim still runs: the host's restart removed a prepared claim's spec",
            prepared.spec.display()
        ));
    }
    c.kubectl(&["delete", "pod", "dra-claim", "--wait=true", "--timeout=60s"])?;
    wait_removed(&prepared.spec)?;
    Ok(Outcome::Passed(format!(
        "{} → {} (kubelet connected to {endpoint}) {back:.1?} after the delete, {checkpoints} checkpoint file(s) in {HOST_STATE_DIR}/dra; dra-claim kept running; deleted afterwards, its claim {} was unprepared ({} removed)",
        old.name,
        new.name,
        prepared.claim,
        prepared.spec.display()
    )))
}

/// KEP-5004: a pod asking `limits: example.com/dev-1: 1`, which the node does not
/// advertise as a device plugin, runs with a dev-1 device of the driver: the scheduler
/// made a claim for it from the DeviceClass's extendedResourceName, and the host
/// prepared it like any other. Deleted afterwards, the claim is unprepared.
fn dra_extended_resource(ctx: &mut Context) -> Result<Outcome, String> {
    let c = &*ctx.cluster;
    if allocatable(c)?.contains_key(DRA_RESOURCE) {
        return Err(format!(
            "the node advertises {DRA_RESOURCE} through a device plugin"
        ));
    }
    c.kubectl(&[
        "apply",
        "-f",
        &format!("{DRA_EXAMPLES}/extended-resource-pod.yaml"),
    ])?;
    wait_pod_ready(c, "dra-extended")?;
    let prepared = prepared_claim(c, "dra-extended")?;
    c.kubectl(&[
        "delete",
        "pod",
        "dra-extended",
        "--wait=true",
        "--timeout=60s",
    ])?;
    wait_removed(&prepared.spec)?;
    Ok(Outcome::Passed(format!(
        "dra-extended ({DRA_RESOURCE}: 1) ran with the scheduler's claim {} → {} ({}), {}; unprepared after the delete",
        prepared.claim, prepared.device, prepared.id, prepared.env
    )))
}

/// A claim allocated a device the guest no longer reports is refused at prepare, with
/// the host's error naming the device. The allocation is written by hand (as a
/// scheduler working from a slice published before the rescan would have): the
/// device the guest reported until dra-slices shrank its kinds. The scheduler takes
/// the allocated claim as it is and binds the pod; kubelet's prepare must fail, and
/// its event carries the host's message.
fn dra_vanished_device(ctx: &mut Context) -> Result<Outcome, String> {
    const CLAIM: &str = "dra-gone";
    let c = &*ctx.cluster;
    let (device, id) = ctx
        .vanished
        .clone()
        .ok_or("dra-slices did not record a device that went away")?;
    let current: Vec<Value> = dra_slices_now(c)?;
    if current
        .iter()
        .flat_map(|s| s["spec"]["devices"].as_array().cloned().unwrap_or_default())
        .any(|d| d["name"] == device.as_str())
    {
        return Err(format!("{device} is still published"));
    }
    let claim = std::fs::read_to_string(root().join(DRA_EXAMPLES).join("resourceclaim.yaml"))
        .map_err(|e| format!("cannot read the example claim: {e}"))?
        .replace("\n  name: dev-1\n", &format!("\n  name: {CLAIM}\n"));
    c.kubectl_stdin(&["create", "-f", "-"], Some(&claim))?;
    let allocation = serde_json::json!({"status": {"allocation": {
        "devices": {"results": [{
            "request": "dev", "driver": DRIVER, "pool": NODE, "device": device,
        }]},
        "nodeSelector": {"nodeSelectorTerms": [{"matchFields": [{
            "key": "metadata.name", "operator": "In", "values": [NODE],
        }]}]},
    }}});
    c.kubectl(&[
        "patch",
        "resourceclaim",
        CLAIM,
        "--subresource=status",
        "--type=merge",
        "-p",
        &allocation.to_string(),
    ])?;
    let pod = std::fs::read_to_string(root().join(DRA_EXAMPLES).join("claim-pod.yaml"))
        .map_err(|e| format!("cannot read the example pod: {e}"))?
        .replace("\n  name: dra-claim\n", &format!("\n  name: {CLAIM}\n"))
        .replace(
            "resourceClaimName: dev-1",
            &format!("resourceClaimName: {CLAIM}"),
        );
    c.kubectl_stdin(&["apply", "-f", "-"], Some(&pod))?;
    let message = poll(
        &format!("kubelet to report {CLAIM}'s prepare failing"),
        POD_TIMEOUT,
        || {
            let json = pod_json(c, "default", CLAIM)?;
            if condition(&json, "Ready").is_some_and(|r| r["status"] == "True") {
                return Err(fatal(format!(
                    "{CLAIM} runs with {device}, which the guest no longer reports"
                )));
            }
            let events = c.kubectl(&[
                "get",
                "events",
                "--field-selector",
                &format!("involvedObject.name={CLAIM},reason=FailedPrepareDynamicResources"),
                "-o",
                "jsonpath={range .items[*]}{.message}{\"\\n\"}{end}",
            ])?;
            Ok(events.lines().next().map(str::to_string))
        },
    )?;
    let host_part = message
        .split_once(&format!("for ResourceClaim {CLAIM}: "))
        .map(|(_, rest)| rest)
        .ok_or_else(|| {
            format!("the event does not carry the host's answer for {CLAIM}: {message}")
        })?;
    if !host_part.contains(&device) && !host_part.contains(&id) {
        return Err(format!(
            "the host refused {CLAIM} without naming {device} ({id}): {message}"
        ));
    }
    c.kubectl(&["delete", "pod", CLAIM, "--wait=true", "--timeout=60s"])?;
    c.kubectl(&[
        "delete",
        "resourceclaim",
        CLAIM,
        "--wait=true",
        "--timeout=60s",
    ])?;
    Ok(Outcome::Passed(format!(
        "{CLAIM} allocated {device} ({id}), gone since the rescan: kubelet's event {message:?}"
    )))
}

/// The DRA module removed from the ConfigMap: the host deletes the driver's
/// ResourceSlices and its registration socket.
fn dra_module_removal(ctx: &mut Context) -> Result<Outcome, String> {
    let host = host_pod(ctx.cluster)?;
    let before = dra_slices_now(ctx.cluster)?.len();
    if before == 0 {
        return Err(format!("no slices of {DRIVER} to remove"));
    }
    let files: Vec<PathBuf> = ctx
        .configmap
        .iter()
        .filter(|f| !is_dra_module(f))
        .cloned()
        .collect();
    replace_configmap(ctx.cluster, &files)?;
    ctx.configmap = files;
    let removed = Instant::now();
    poll(
        &format!("{DRIVER}'s slices to be deleted"),
        DRA_TIMEOUT,
        || {
            let left = dra_slices_now(ctx.cluster)?;
            Ok(left.is_empty().then_some(()))
        },
    )?;
    let took = removed.elapsed();
    let socket = Path::new(PLUGINS_REGISTRY_DIR).join(format!("{DRIVER}-{}-reg.sock", host.uid));
    wait_removed(&socket)?;
    Ok(Outcome::Passed(format!(
        "{DRA_MODULE} removed from the ConfigMap: {before} slice(s) deleted within {took:.1?}, {} removed",
        socket.display()
    )))
}

/// Writes `<module>.wasm` (the virtual guest) and `<module>.toml` (the example DRA
/// manifest with its `kinds` set to `kinds`, and `unhealthy` set to `unhealthy` when
/// not empty) for the ConfigMap; their paths.
fn dra_module_files(ctx: &Context, kinds: &str, unhealthy: &str) -> Result<Vec<PathBuf>, String> {
    const FROM: &str = "kinds = \"dev-1=4\"";
    let example = root().join(format!("examples/modules/{DRA_MODULE}.toml"));
    let manifest = std::fs::read_to_string(&example)
        .map_err(|e| format!("cannot read {}: {e}", example.display()))?;
    if !manifest.contains(FROM) || !manifest.contains("api = \"dra\"") {
        return Err(format!(
            "{} no longer says api = \"dra\" and {FROM}: update these scenarios",
            example.display()
        ));
    }
    let dir = ctx.cluster.dir.join(format!(
        "dra-modules/{}{}",
        kinds.replace('=', "-"),
        if unhealthy.is_empty() {
            ""
        } else {
            "-unhealthy"
        }
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let wasm = dir.join(format!("{DRA_MODULE}.wasm"));
    let guest = ctx.modules.join("virtual_devices.wasm");
    std::fs::copy(&guest, &wasm).map_err(|e| format!("{}: {e}", guest.display()))?;
    let toml = dir.join(format!("{DRA_MODULE}.toml"));
    let mut config = format!("kinds = \"{kinds}\"");
    if !unhealthy.is_empty() {
        config.push_str(&format!("\nunhealthy = \"{unhealthy}\""));
    }
    std::fs::write(&toml, manifest.replace(FROM, &config))
        .map_err(|e| format!("{}: {e}", toml.display()))?;
    Ok(vec![wasm, toml])
}

fn is_dra_module(file: &Path) -> bool {
    file.file_stem().is_some_and(|s| s == DRA_MODULE)
}

/// `kubectl replace`s the ConfigMap with `files` (each key its file's name).
fn replace_configmap(c: &Cluster, files: &[PathBuf]) -> Result<(), String> {
    let mut args: Vec<String> = ["-n", NAMESPACE, "create", "configmap", CONFIGMAP]
        .map(str::to_string)
        .to_vec();
    args.extend(files.iter().map(|f| format!("--from-file={}", f.display())));
    args.extend(["--dry-run=client", "-o", "yaml"].map(str::to_string));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let yaml = c.kubectl(&args)?;
    c.kubectl_stdin(&["replace", "-f", "-"], Some(&yaml))
        .map(drop)
}

fn kubelet_log(c: &Cluster) -> Result<String, String> {
    let path = c.logs.join("kubelet.log");
    std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Waits for kubelet's log to say it connected to our driver's DRA endpoint of the
/// host pod `uid` (upstream's rolling-update names carry it); the endpoint.
fn kubelet_connected(c: &Cluster, uid: &str) -> Result<String, String> {
    let driver = format!("driverName=\"{DRIVER}\"");
    poll(
        &format!("kubelet to connect to {DRIVER}'s endpoint of host pod {uid}"),
        DRA_TIMEOUT,
        || {
            let log = kubelet_log(c)?;
            Ok(log.lines().find_map(|l| {
                let hit = l.contains("\"Connection changed\"")
                    && l.contains(&driver)
                    && l.contains(uid)
                    && l.contains("connected=true");
                hit.then(|| {
                    l.split("endpoint=\"")
                        .nth(1)
                        .and_then(|rest| rest.split('"').next())
                        .unwrap_or("?")
                        .to_string()
                })
            }))
        },
    )
}

/// The driver's ResourceSlices on the node, by field selector (the names are the
/// host's business).
fn dra_slices_now(c: &Cluster) -> Result<Vec<Value>, String> {
    let text = c.kubectl(&[
        "get",
        "resourceslices",
        "--field-selector",
        &format!("spec.driver={DRIVER},spec.nodeName={NODE}"),
        "-o",
        "json",
    ])?;
    let list: Value = serde_json::from_str(&text).map_err(|e| format!("resourceslices: {e}"))?;
    Ok(list["items"].as_array().cloned().unwrap_or_default())
}

/// The driver's pool on the node, complete at its newest generation.
struct Pool {
    generation: i64,
    slices: usize,
    /// (device name, guest id), sorted by id.
    devices: Vec<(String, String)>,
}

/// The ids of the virtual guest's first `count` devices of kind dev-1, but `without`.
fn dev1_ids(count: usize, without: Option<&str>) -> Vec<String> {
    (1..=count)
        .map(|n| format!("/node1/dev1/{n}"))
        .filter(|id| Some(id.as_str()) != without)
        .collect()
}

/// Waits until the pool is complete with as many devices as `expected` has ids (at
/// a generation above `after`), then checks every slice and device against the node,
/// and their ids against `expected` (sorted).
fn wait_pool(
    c: &Cluster,
    node_uid: &str,
    expected: &[String],
    after: Option<i64>,
) -> Result<Pool, String> {
    let count = expected.len();
    let what = format!("{DRIVER}'s pool with {count} devices");
    poll(&what, DRA_TIMEOUT, || {
        let slices = dra_slices_now(c)?;
        let generation = slices
            .iter()
            .filter_map(|s| s["spec"]["pool"]["generation"].as_i64())
            .max()
            .ok_or("no slices yet")?;
        if after.is_some_and(|a| generation <= a) {
            return Err(format!("pool generation still {generation}"));
        }
        let newest: Vec<&Value> = slices
            .iter()
            .filter(|s| s["spec"]["pool"]["generation"].as_i64() == Some(generation))
            .collect();
        let wanted = newest[0]["spec"]["pool"]["resourceSliceCount"].as_u64();
        if wanted != Some(newest.len() as u64) {
            return Err(format!(
                "{} of {wanted:?} slices at generation {generation}",
                newest.len()
            ));
        }
        let mut devices = Vec::new();
        for slice in &newest {
            check_slice(slice, node_uid)?;
            for device in slice["spec"]["devices"].as_array().into_iter().flatten() {
                devices.push(check_device(device)?);
            }
        }
        devices.sort_by(|a, b| a.1.cmp(&b.1));
        if devices.len() != count {
            return Err(format!(
                "{} devices at generation {generation}",
                devices.len()
            ));
        }
        let ids: Vec<String> = devices.iter().map(|(_, id)| id.clone()).collect();
        if ids != expected {
            return Err(fatal(format!(
                "the pool has ids {ids:?}, the guest {expected:?}"
            )));
        }
        Ok(Some(Pool {
            generation,
            slices: newest.len(),
            devices,
        }))
    })
}

/// A slice of ours: the driver, the node, the pool named after the node, owned by the
/// Node object.
fn check_slice(slice: &Value, node_uid: &str) -> Result<(), String> {
    let spec = &slice["spec"];
    let name = &slice["metadata"]["name"];
    if spec["driver"] != DRIVER || spec["nodeName"] != NODE || spec["pool"]["name"] != NODE {
        return Err(fatal(format!(
            "slice {name}: driver {}, node {}, pool {}; expected {DRIVER}, {NODE}, {NODE}",
            spec["driver"], spec["nodeName"], spec["pool"]["name"]
        )));
    }
    let owned = slice["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|o| o["kind"] == "Node" && o["name"] == NODE && o["uid"] == node_uid);
    if !owned {
        return Err(fatal(format!(
            "slice {name} is not owned by Node {NODE} ({node_uid}): {}",
            slice["metadata"]["ownerReferences"]
        )));
    }
    Ok(())
}

/// A published device: its name is the host's mapping of its `id` attribute, and its
/// `kind` is dev-1. Attribute names may be written with the driver's domain or without.
fn check_device(device: &Value) -> Result<(String, String), String> {
    let name = device["name"].as_str().unwrap_or_default().to_string();
    let attribute = |key: &str| -> Option<String> {
        let attributes = device["attributes"].as_object()?;
        let value = attributes
            .get(key)
            .or_else(|| attributes.get(&format!("{DRIVER}/{key}")))?;
        value["string"].as_str().map(str::to_string)
    };
    let (Some(kind), Some(id)) = (attribute("kind"), attribute("id")) else {
        return Err(fatal(format!(
            "device {name} lacks the string attributes kind and id: {device}"
        )));
    };
    // What the guest's `describe` adds (WIT 0.2.2), typed as it said.
    let described = attribute("model").as_deref() == Some("virtual")
        && device["attributes"]["firmware"]["version"] == "1.0.0"
        && device["capacity"]["memory"]["value"] == "1Gi";
    if !described {
        return Err(fatal(format!(
            "device {name} lacks what the guest describes (model virtual, firmware version 1.0.0, capacity memory 1Gi): {device}"
        )));
    }
    if kind != "dev-1" || name != dra_device_name(&id) {
        return Err(fatal(format!(
            "device {name} (kind {kind}, id {id}): expected kind dev-1 and name {}",
            dra_device_name(&id)
        )));
    }
    Ok((name, id))
}

/// The host's device name for guest id `id` (dra-interface: the id itself if it is a
/// DNS label, else a sanitised prefix and 8 hex digits of its SHA-256).
fn dra_device_name(id: &str) -> String {
    let label = !id.is_empty()
        && id.len() <= 63
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
        && !id.ends_with('-');
    if label {
        return id.to_string();
    }
    use sha2::{Digest, Sha256};
    let hash: String = Sha256::digest(id.as_bytes())
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut cleaned = String::new();
    for c in id.chars().map(|c| c.to_ascii_lowercase()) {
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if !(c == '-' && cleaned.ends_with('-')) {
            cleaned.push(c);
        }
    }
    let cleaned: String = cleaned.trim_matches('-').chars().take(54).collect();
    // A cut may end in `-`: dropped, so the hash follows a single `-`.
    let cleaned = cleaned.trim_end_matches('-');
    if cleaned.is_empty() {
        format!("dev-{hash}")
    } else {
        format!("{cleaned}-{hash}")
    }
}

/// What a running pod's one claim shows.
struct Prepared {
    claim: String,
    device: String,
    id: String,
    env: String,
    spec: PathBuf,
}

/// Pod `pod`'s claim (its one named claim, or the scheduler's for an extended
/// resource), checked: allocated one device of our pool and reserved for the pod; the
/// pod printed the env the guest gives for that device's id; the host's CDI spec for
/// the claim is on the node, of kind `<driver>/claim`, with that env.
fn prepared_claim(c: &Cluster, pod: &str) -> Result<Prepared, String> {
    let json = pod_json(c, "default", pod)?;
    // A claim named in the spec; one made from a template, named in the status; or
    // the scheduler's for an extended resource.
    let claim = json["spec"]["resourceClaims"][0]["resourceClaimName"]
        .as_str()
        .or(json["status"]["resourceClaimStatuses"][0]["resourceClaimName"].as_str())
        .or(json["status"]["extendedResourceClaimStatus"]["resourceClaimName"].as_str())
        .ok_or_else(|| format!("{pod} has no claim in its status: {}", json["status"]))?
        .to_string();
    let text = c.kubectl(&["get", "resourceclaim", &claim, "-o", "json"])?;
    let claim_json: Value = serde_json::from_str(&text).map_err(|e| format!("{claim}: {e}"))?;
    let uid = claim_json["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let results = claim_json["status"]["allocation"]["devices"]["results"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let [result] = &results[..] else {
        return Err(format!(
            "claim {claim} has {} allocated devices, not 1",
            results.len()
        ));
    };
    if result["driver"] != DRIVER || result["pool"] != NODE {
        return Err(format!(
            "claim {claim} holds {result}, not a device of {DRIVER} in pool {NODE}"
        ));
    }
    let device = result["device"].as_str().unwrap_or_default().to_string();
    let reserved = claim_json["status"]["reservedFor"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|r| r["uid"] == json["metadata"]["uid"]);
    if !reserved {
        return Err(format!("claim {claim} is not reserved for {pod}"));
    }
    let id = dra_slices_now(c)?
        .iter()
        .flat_map(|s| s["spec"]["devices"].as_array().cloned().unwrap_or_default())
        .find(|d| d["name"] == device.as_str())
        .map(|d| check_device(&d))
        .transpose()?
        .map(|(_, id)| id)
        .ok_or_else(|| format!("{device} of claim {claim} is in no slice"))?;
    let env = format!("DEV_dev_1_ID_0={id}");
    let lines = poll(&format!("{pod}'s output"), POD_TIMEOUT, || {
        let logs = c.kubectl(&["logs", pod])?;
        let lines: Vec<String> = logs
            .lines()
            .filter(|l| l.starts_with("DEV_"))
            .map(str::to_string)
            .collect();
        Ok((!lines.is_empty()).then_some(lines))
    })?;
    if lines != [env.clone()] {
        return Err(format!(
            "{pod} sees {lines:?}, not the guest's {env} for {device}"
        ));
    }
    let spec = Path::new(CDI_DIR).join(format!("wasm-device-plugin-claim_{DRIVER}_{uid}.json"));
    let text = std::fs::read_to_string(&spec)
        .map_err(|e| format!("no CDI spec for claim {claim} at {}: {e}", spec.display()))?;
    let spec_json: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", spec.display()))?;
    let has_env = spec_json["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["name"].as_str().is_some_and(|n| n.starts_with(&uid)))
        .flat_map(|d| {
            d["containerEdits"]["env"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .any(|e| e == env.as_str());
    if spec_json["kind"] != format!("{DRIVER}/claim") || !has_env {
        return Err(format!(
            "{} is not of kind {DRIVER}/claim with a device <uid>-<request> setting {env}: {spec_json}",
            spec.display()
        ));
    }
    Ok(Prepared {
        claim,
        device,
        id,
        env,
        spec,
    })
}

/// Waits until `path` is gone from the node.
fn wait_removed(path: &Path) -> Result<(), String> {
    poll(
        &format!("{} to be removed", path.display()),
        DRA_TIMEOUT,
        || Ok(path.symlink_metadata().is_err().then_some(())),
    )
}

/// The CDI names and the number of device nodes in the Allocate response kubelet
/// checkpointed for `resource` (kubelet's `kubelet_internal_checkpoint`: JSON, each
/// response a base64 `ContainerAllocateResponse`: `devices` is field 3,
/// `cdi_devices` field 5, a `CDIDevice` whose `name` is field 1).
fn checkpointed_answer(resource: &str) -> Result<(Vec<String>, usize), String> {
    let path = Path::new(DEVICE_PLUGIN_DIR).join("kubelet_internal_checkpoint");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let checkpoint: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let entry = checkpoint["Data"]["PodDeviceEntries"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["ResourceName"] == resource)
        .ok_or_else(|| format!("{} holds no allocation of {resource}", path.display()))?;
    let bytes = base64_decode(entry["AllocResp"].as_str().unwrap_or_default())
        .ok_or_else(|| format!("{}: AllocResp is not base64", path.display()))?;
    let mut names = Vec::new();
    let mut nodes = 0;
    for (field, value) in protobuf_fields(&bytes)? {
        match field {
            3 => nodes += 1,
            5 => {
                for (inner, name) in protobuf_fields(value)? {
                    if inner == 1 {
                        names.push(String::from_utf8_lossy(name).into_owned());
                    }
                }
            }
            _ => {}
        }
    }
    Ok((names, nodes))
}

/// The top-level length-delimited fields of a protobuf message (every field of
/// `ContainerAllocateResponse` is one): (number, bytes).
fn protobuf_fields(mut bytes: &[u8]) -> Result<Vec<(u64, &[u8])>, String> {
    fn varint(bytes: &mut &[u8]) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = bytes.split_first().ok_or("truncated varint")?;
            *bytes = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint too long".into())
    }
    let mut fields = Vec::new();
    while !bytes.is_empty() {
        let key = varint(&mut bytes)?;
        if key & 7 != 2 {
            return Err(format!("field {} is not length-delimited", key >> 3));
        }
        let len = usize::try_from(varint(&mut bytes)?).map_err(|e| e.to_string())?;
        if len > bytes.len() {
            return Err("truncated field".into());
        }
        let (value, rest) = bytes.split_at(len);
        fields.push((key >> 3, value));
        bytes = rest;
    }
    Ok(fields)
}

/// Standard base64 (with padding), as Go's encoding/json writes `[]byte`.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let text = text.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    for chunk in text.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= value(c)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        match chunk.len() {
            4 => out.extend_from_slice(&bytes[1..4]),
            3 => out.extend_from_slice(&bytes[1..3]),
            2 => out.push(bytes[1]),
            _ => return None,
        }
    }
    Some(out)
}

/// What the scenarios read about the host's pod.
struct HostPod {
    name: String,
    uid: String,
    ip: String,
    image: String,
    restarts: u64,
    container_id: String,
}

/// The DaemonSet's one pod, once it is Ready (a restarted kubelet probes it afresh).
fn host_pod(c: &Cluster) -> Result<HostPod, String> {
    poll("the host pod Ready", POD_TIMEOUT, || {
        ready_host_pod(c).map(Some)
    })
}

/// The DaemonSet's one pod, Ready now.
fn ready_host_pod(c: &Cluster) -> Result<HostPod, String> {
    let list = c.kubectl(&["-n", NAMESPACE, "get", "pods", "-l", SELECTOR, "-o", "json"])?;
    let list: Value = serde_json::from_str(&list).map_err(|e| e.to_string())?;
    let pods: Vec<&Value> = list["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
                .collect()
        })
        .unwrap_or_default();
    let [pod] = pods[..] else {
        return Err(format!("expected one host pod, found {}", pods.len()));
    };
    let status = &pod["status"]["containerStatuses"][0];
    if status["ready"] != true {
        return Err(format!(
            "the host pod {} is not Ready",
            pod["metadata"]["name"]
        ));
    }
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    Ok(HostPod {
        name: text(&pod["metadata"]["name"]),
        uid: text(&pod["metadata"]["uid"]),
        ip: text(&pod["status"]["podIP"]),
        image: text(&pod["spec"]["containers"][0]["image"]),
        restarts: status["restartCount"].as_u64().unwrap_or(0),
        container_id: text(&status["containerID"]),
    })
}

/// Waits for the DaemonSet's rollout to finish.
fn rollout(c: &Cluster) -> Result<(), String> {
    c.kubectl(&[
        "-n",
        NAMESPACE,
        "rollout",
        "status",
        &format!("daemonset/{DAEMONSET}"),
        &format!("--timeout={}s", POD_TIMEOUT.as_secs()),
    ])
    .map(drop)
}

fn pod_json(c: &Cluster, namespace: &str, name: &str) -> Result<Value, String> {
    let text = c.kubectl(&["-n", namespace, "get", "pod", name, "-o", "json"])?;
    serde_json::from_str(&text).map_err(|e| format!("kubectl's JSON for {name}: {e}"))
}

fn condition<'v>(pod: &'v Value, kind: &str) -> Option<&'v Value> {
    pod["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
}

/// Waits for pod `name` (namespace default) to be Ready; a pod that fails (kubelet
/// refusing it, say, for want of a device) fails at once.
fn wait_pod_ready(c: &Cluster, name: &str) -> Result<(), String> {
    poll(&format!("pod {name} Ready"), POD_TIMEOUT, || {
        let pod = pod_json(c, "default", name)?;
        match pod["status"]["phase"].as_str() {
            Some("Failed") | Some("Succeeded") => Err(fatal(format!(
                "pod {name} ended: {} {}",
                pod["status"]["reason"], pod["status"]["message"]
            ))),
            _ => Ok(condition(&pod, "Ready")
                .filter(|c| c["status"] == "True")
                .map(drop)),
        }
    })
}

/// The `DEV_<kind>_ID_<n>=<device>` lines pod `name` printed; exactly `count` of them,
/// each naming a device of the virtual_devices guest.
fn device_env(c: &Cluster, name: &str, kind: &str, count: usize) -> Result<Vec<String>, String> {
    let prefix = format!("DEV_{kind}_ID_");
    let lines = poll(&format!("{name}'s output"), POD_TIMEOUT, || {
        let logs = c.kubectl(&["logs", name])?;
        let lines: Vec<String> = logs
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .map(str::to_string)
            .collect();
        Ok((!lines.is_empty()).then_some(lines))
    })?;
    let device = format!("=/node1/{kind}/");
    if lines.len() != count || !lines.iter().all(|l| l.contains(&device)) {
        return Err(format!(
            "{name} sees {lines:?}: expected {count} {prefix}<n>=/node1/{kind}/<m> from the guest's Allocate"
        ));
    }
    let mut devices: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.split_once('='))
        .map(|(_, d)| d)
        .collect();
    devices.sort();
    devices.dedup();
    if kind == "nic" && devices.len() != count {
        return Err(format!("{name} got one NIC twice: {lines:?}"));
    }
    Ok(lines)
}

/// Creates a copy of examples/pods/`example`.yaml named `name`; returns the name.
fn example_pod(c: &Cluster, example: &str, name: &str) -> Result<String, String> {
    let path = root().join(format!("examples/pods/{example}.yaml"));
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let from = format!("\n  name: {example}\n");
    if !text.contains(&from) {
        return Err(format!(
            "{} has no `name: {example}` to rename",
            path.display()
        ));
    }
    c.kubectl_stdin(
        &["apply", "-f", "-"],
        Some(&text.replace(&from, &format!("\n  name: {name}\n"))),
    )?;
    Ok(name.to_string())
}

/// The node's extended resources (names with a `/`) and their allocatable counts.
fn allocatable(c: &Cluster) -> Result<BTreeMap<String, u64>, String> {
    let text = c.kubectl(&["get", "node", NODE, "-o", "jsonpath={.status.allocatable}"])?;
    let map: BTreeMap<String, String> =
        serde_json::from_str(&text).map_err(|e| format!("the node's allocatable {text:?}: {e}"))?;
    Ok(map
        .into_iter()
        .filter(|(name, _)| name.contains('/'))
        .filter_map(|(name, count)| Some((name, count.parse().ok()?)))
        .collect())
}

/// Waits until every `expected` resource has exactly its count in allocatable.
fn wait_allocatable(
    c: &Cluster,
    expected: &BTreeMap<String, u64>,
) -> Result<BTreeMap<String, u64>, String> {
    let mut last = BTreeMap::new();
    poll(
        &format!("allocatable {}", show(expected)),
        ALLOCATABLE_TIMEOUT,
        || {
            last = allocatable(c)?;
            let matches = expected
                .iter()
                .all(|(name, count)| last.get(name) == Some(count));
            if matches {
                Ok(Some(last.clone()))
            } else {
                Err(format!("allocatable is {}", show(&last)))
            }
        },
    )
}

fn show(resources: &BTreeMap<String, u64>) -> String {
    let parts: Vec<String> = resources.iter().map(|(n, c)| format!("{n}={c}")).collect();
    if parts.is_empty() {
        "(none)".into()
    } else {
        parts.join(" ")
    }
}

fn scrape(ip: &str) -> Result<String, String> {
    if ip.is_empty() {
        return Err("the host pod has no IP".into());
    }
    http_get(ip, 9477, "/metrics")
}

/// The value of the sample `name{labels...}` in Prometheus text; labels not named are
/// ignored.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
        if metric != name {
            return None;
        }
        let all = labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        all.then(|| value.parse().ok()).flatten()
    })
}

/// What [`SocketWatch`] saw.
struct Watched {
    /// Directory events seen.
    events: u64,
    /// A resource and its sockets at a moment more than one host served it.
    doubled: Option<(String, Vec<String>)>,
    /// The longest time some resource had no socket.
    longest_gap: Duration,
}

/// What reaches the watcher's thread: an inotify event, or the end.
enum SocketEvent {
    Fs(notify::Result<notify::Event>),
    Stop,
}

/// Kubelet's device-plugin directory, watched with inotify from before a change until
/// [`SocketWatch::finish`]: every socket created and removed is seen, in order, so
/// two sockets of one resource at once are seen however briefly they overlap.
struct SocketWatch {
    _watcher: notify::RecommendedWatcher,
    events: std::sync::mpsc::Sender<SocketEvent>,
    thread: std::thread::JoinHandle<Result<Watched, String>>,
}

impl SocketWatch {
    fn start() -> Result<Self, String> {
        use notify::Watcher;
        let (tx, rx) = std::sync::mpsc::channel();
        let fs = tx.clone();
        let mut watcher = notify::recommended_watcher(move |e| {
            let _ = fs.send(SocketEvent::Fs(e));
        })
        .map_err(|e| format!("cannot watch {DEVICE_PLUGIN_DIR}: {e}"))?;
        watcher
            .watch(
                Path::new(DEVICE_PLUGIN_DIR),
                notify::RecursiveMode::NonRecursive,
            )
            .map_err(|e| format!("cannot watch {DEVICE_PLUGIN_DIR}: {e}"))?;
        // Listed once the watch is set up: a change after the listing is an event.
        let sockets = list_sockets()?;
        let thread = std::thread::spawn(move || follow_sockets(sockets, &rx));
        Ok(Self {
            _watcher: watcher,
            events: tx,
            thread,
        })
    }

    fn finish(self) -> Result<Watched, String> {
        let _ = self.events.send(SocketEvent::Stop);
        self.thread
            .join()
            .map_err(|_| "the socket watcher panicked".to_string())?
    }
}

/// The host's sockets in kubelet's directory.
fn list_sockets() -> Result<BTreeSet<String>, String> {
    Ok(std::fs::read_dir(DEVICE_PLUGIN_DIR)
        .map_err(|e| format!("cannot read {DEVICE_PLUGIN_DIR}: {e}"))?
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|file| socket_resource(file).is_some())
        .collect())
}

/// Applies each event to `sockets` until [`SocketEvent::Stop`], grouping the host's
/// sockets (`<resource>-<millis>-<n>.sock`) by resource after each.
fn follow_sockets(
    mut sockets: BTreeSet<String>,
    events: &std::sync::mpsc::Receiver<SocketEvent>,
) -> Result<Watched, String> {
    use notify::EventKind;
    let mut watched = Watched {
        events: 0,
        doubled: None,
        longest_gap: Duration::ZERO,
    };
    let mut missing_since: BTreeMap<String, Instant> = BTreeMap::new();
    let mut known: BTreeSet<String> = BTreeSet::new();
    let mut observe = |sockets: &BTreeSet<String>, watched: &mut Watched| {
        let mut by_resource: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for file in sockets {
            if let Some(resource) = socket_resource(file) {
                by_resource.entry(resource).or_default().push(file.clone());
            }
        }
        for (resource, files) in &by_resource {
            if files.len() > 1 && watched.doubled.is_none() {
                watched.doubled = Some((resource.clone(), files.clone()));
            }
            known.insert(resource.clone());
        }
        let now = Instant::now();
        for resource in &known {
            if by_resource.contains_key(resource) {
                if let Some(since) = missing_since.remove(resource) {
                    watched.longest_gap = watched.longest_gap.max(now - since);
                }
            } else {
                missing_since.entry(resource.clone()).or_insert(now);
            }
        }
    };
    observe(&sockets, &mut watched);
    while let Ok(SocketEvent::Fs(event)) = events.recv() {
        let event = event.map_err(|e| format!("watching {DEVICE_PLUGIN_DIR}: {e}"))?;
        watched.events += 1;
        if event.need_rescan() {
            // The kernel's queue overflowed: events were lost; read the directory.
            sockets = list_sockets()?;
        } else {
            for path in &event.paths {
                let Some(file) = path.file_name().map(|f| f.to_string_lossy().into_owned()) else {
                    continue;
                };
                if socket_resource(&file).is_none() {
                    continue;
                }
                match event.kind {
                    EventKind::Create(_) => {
                        sockets.insert(file);
                    }
                    EventKind::Remove(_) => {
                        sockets.remove(&file);
                    }
                    // A rename or anything else: what is there now decides.
                    _ => {
                        if path.exists() {
                            sockets.insert(file);
                        } else {
                            sockets.remove(&file);
                        }
                    }
                }
            }
        }
        observe(&sockets, &mut watched);
    }
    if let Some(resource) = missing_since.keys().next() {
        return Err(format!("{resource} had no socket when the rollout ended"));
    }
    Ok(watched)
}

/// The resource part of a host socket's name (`example.com_dev-1-<millis>-<n>.sock`).
fn socket_resource(file: &str) -> Option<String> {
    let stem = file.strip_suffix(".sock")?;
    let mut parts = stem.rsplitn(3, '-');
    let n = parts.next()?;
    let millis = parts.next()?;
    let resource = parts.next()?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(n) && digits(millis)).then(|| resource.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_resource_reads_the_hosts_socket_names_only() {
        assert_eq!(
            socket_resource("virtual.example.com_gpu-1795724936569-0.sock").as_deref(),
            Some("virtual.example.com_gpu")
        );
        assert_eq!(socket_resource("kubelet.sock"), None);
        assert_eq!(socket_resource("kubelet_internal_checkpoint"), None);
    }

    #[test]
    fn dra_device_names_follow_the_hosts_mapping() {
        assert_eq!(dra_device_name("gpu-0"), "gpu-0");
        let name = dra_device_name("/node1/dev-1/3");
        let (prefix, hash) = name.rsplit_once('-').expect("a hash");
        assert_eq!(prefix, "node1-dev-1-3");
        assert_eq!(hash.len(), 8);
        assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(dra_device_name("///").starts_with("dev-"));
        assert_eq!(dra_device_name(&"A".repeat(80)).len(), 54 + 9);
        let cut = dra_device_name(&format!("{}/x", "a".repeat(53)));
        assert!(cut.starts_with(&format!("{}-", "a".repeat(53))) && !cut.contains("--"));
        assert_ne!(dra_device_name("/a/b"), dra_device_name("/a-b"));
    }

    #[test]
    fn metric_matches_name_and_labels() {
        let text = "# HELP x\nwdp_allocations_total{resource=\"a/b\",outcome=\"ok\"} 2\nwdp_allocations_total{resource=\"a/c\",outcome=\"ok\"} 1\nwdp_kubelet_restarts_total 3\n";
        assert_eq!(
            metric(text, "wdp_allocations_total", &[("resource", "a/c")]),
            Some(1.0)
        );
        assert_eq!(metric(text, "wdp_kubelet_restarts_total", &[]), Some(3.0));
        assert_eq!(metric(text, "wdp_allocations", &[]), None);
    }

    #[test]
    fn reads_an_allocate_response_as_kubelet_checkpoints_it() {
        // ContainerAllocateResponse { devices: [DeviceSpec { container_path: "/d" }],
        // cdi_devices: [CdiDevice { name: "a.b/c=d" }] }, protobuf then base64.
        let mut bytes = vec![0x1a, 4, 0x0a, 2, b'/', b'd'];
        bytes.extend([0x2a, 9, 0x0a, 7]);
        bytes.extend(b"a.b/c=d");
        let encoded = "GgQKAi9kKgkKB2EuYi9jPWQ=";
        assert_eq!(base64_decode(encoded), Some(bytes.clone()));
        assert_eq!(base64_decode("YQ=="), Some(b"a".to_vec()));
        assert_eq!(base64_decode("YWI="), Some(b"ab".to_vec()));
        assert_eq!(base64_decode("a!"), None);
        let fields = protobuf_fields(&bytes).expect("valid");
        assert_eq!(fields.iter().map(|f| f.0).collect::<Vec<_>>(), [3, 5]);
        assert_eq!(
            protobuf_fields(fields[1].1).expect("valid"),
            [(1, &b"a.b/c=d"[..])]
        );
        assert!(protobuf_fields(&[0x2a, 9, 0x0a]).is_err());
    }
}
