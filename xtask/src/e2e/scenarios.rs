//! The e2e's scenarios, run in order against one cluster (each builds on the state the
//! one before left: the DaemonSet deployed, pods holding devices). Each returns what it
//! saw, or an error that fails the run; none can pass without its condition being met.
//! Talks to the cluster only through kubectl, the pod IP and the device-plugin directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::cluster::{Cluster, DEVICE_PLUGIN_DIR, NODE, http_get};
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

pub enum Outcome {
    Passed(String),
    Skipped(String),
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
        }
    }
}

type Scenario = fn(&mut Context) -> Result<Outcome, String>;

/// The scenarios, in the order they run.
pub const SCENARIOS: [(&str, Scenario); 7] = [
    ("daemonset-ready", daemonset_ready),
    ("example-pods", example_pods),
    ("configmap-module-replace", configmap_module_replace),
    ("kubelet-restart", kubelet_restart),
    ("rolling-update", rolling_update),
    ("metrics", metrics),
    ("cdi", cdi),
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
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || watch_sockets(&stop))
    };
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
    stop.store(true, Ordering::SeqCst);
    let watch = watcher
        .join()
        .map_err(|_| "the socket watcher panicked".to_string())?;
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
        "{} → {} ({}); at most one socket per resource in {} samples; longest gap without a socket {:.1?}; allocatable {} {took:.1?} after the update started",
        old.name,
        new.name,
        new.image,
        watch.samples,
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

/// A container gets its device node through containerd's CDI injection. The host's CDI
/// writer is issue 17 (branch `cdi`); containerd already runs with CDI on and
/// `cdi_spec_dirs` set (cluster.rs). To turn this on: deploy a module whose allocation
/// names CDI devices, run a pod asking for one, and check the device node in it.
fn cdi(_ctx: &mut Context) -> Result<Outcome, String> {
    Ok(Outcome::Skipped(
        "needs issue 17 (the host's CDI writer); containerd here has enable_cdi and cdi_spec_dirs set".into(),
    ))
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

/// What [`watch_sockets`] saw.
struct SocketWatch {
    samples: u64,
    /// A resource and its sockets at a moment more than one host served it.
    doubled: Option<(String, Vec<String>)>,
    /// The longest time some resource had no socket.
    longest_gap: Duration,
}

/// Samples kubelet's device-plugin directory every 20 ms until `stop`, grouping the
/// host's sockets (`<resource>-<millis>-<n>.sock`) by resource.
fn watch_sockets(stop: &AtomicBool) -> Result<SocketWatch, String> {
    let mut watch = SocketWatch {
        samples: 0,
        doubled: None,
        longest_gap: Duration::ZERO,
    };
    let mut missing_since: BTreeMap<String, Instant> = BTreeMap::new();
    let mut known: Vec<String> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let mut by_resource: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let entries = std::fs::read_dir(DEVICE_PLUGIN_DIR)
            .map_err(|e| format!("cannot read {DEVICE_PLUGIN_DIR}: {e}"))?;
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            if let Some(resource) = socket_resource(&file) {
                by_resource.entry(resource).or_default().push(file);
            }
        }
        watch.samples += 1;
        for (resource, sockets) in &by_resource {
            if sockets.len() > 1 && watch.doubled.is_none() {
                watch.doubled = Some((resource.clone(), sockets.clone()));
            }
            if !known.contains(resource) {
                known.push(resource.clone());
            }
        }
        let now = Instant::now();
        for resource in &known {
            if by_resource.contains_key(resource) {
                if let Some(since) = missing_since.remove(resource) {
                    watch.longest_gap = watch.longest_gap.max(now - since);
                }
            } else {
                missing_since.entry(resource.clone()).or_insert(now);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some(resource) = missing_since.keys().next() {
        return Err(format!("{resource} had no socket when the rollout ended"));
    }
    Ok(watch)
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
    fn metric_matches_name_and_labels() {
        let text = "# HELP x\nwdp_allocations_total{resource=\"a/b\",outcome=\"ok\"} 2\nwdp_allocations_total{resource=\"a/c\",outcome=\"ok\"} 1\nwdp_kubelet_restarts_total 3\n";
        assert_eq!(
            metric(text, "wdp_allocations_total", &[("resource", "a/c")]),
            Some(1.0)
        );
        assert_eq!(metric(text, "wdp_kubelet_restarts_total", &[]), Some(3.0));
        assert_eq!(metric(text, "wdp_allocations", &[]), None);
    }
}
