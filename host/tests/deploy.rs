//! The deployment files checked against the binary they deploy: `deploy/`
//! (Dockerfile, kustomization, DaemonSet, components) and `examples/` (modules
//! directory, pods).
//!
//! No cluster and no image build: the YAML is read as data, the Dockerfile as
//! instructions, and the truth they must agree with comes from the real binary
//! (`wasm-device-plugin run --help` for flags and defaults, `validate --json` for
//! what the shipped guests report with the example manifests).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::Value;
use tokio::process::Command;
use wdp_tests::{WAIT, guests};
use yaml_rust2::{Yaml, YamlLoader};

/// The DaemonSet's container that runs the host.
const CONTAINER: &str = "wasm-device-plugin";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ is inside the repository")
        .to_path_buf()
}

/// Runs the binary with `args`, at most `WAIT`, with none of its environment
/// variables set (they would change the defaults `--help` shows); returns the
/// exit code and stdout.
async fn wdp(args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wasm-device-plugin"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("WDP_") {
            cmd.env_remove(name);
        }
    }
    let output = tokio::time::timeout(WAIT, cmd.env_remove("RUST_LOG").output())
        .await
        .unwrap_or_else(|_| panic!("{args:?} did not finish within {WAIT:?}"))
        .expect("the binary runs");
    let stdout = String::from_utf8(output.stdout).expect("UTF-8 stdout");
    (output.status.code(), stdout)
}

/// A long flag of `run`, as its `--help` describes it.
#[derive(Debug)]
struct Flag {
    /// Takes a value (`--flag <VALUE>`), rather than being a switch.
    takes_value: bool,
    /// The `[default: ...]` the help states.
    default: Option<String>,
}

/// The long flags of `wasm-device-plugin run`, by name without `--`, read from
/// its `--help`.
async fn run_flags() -> BTreeMap<String, Flag> {
    let (code, help) = wdp(&["run", "--help"]).await;
    assert_eq!(code, Some(0), "run --help");
    let mut flags = BTreeMap::new();
    let mut current: Option<(String, Flag)> = None;
    for line in help.lines() {
        let text = line.trim_start();
        let indent = line.len() - text.len();
        // Flags start at a small indent; their descriptions (possible values
        // such as "- json" included) sit deeper.
        if indent > 0 && indent <= 6 && text.starts_with('-') {
            flags.extend(current.take());
            let Some(long) = text.split_whitespace().find(|w| w.starts_with("--")) else {
                continue;
            };
            current = Some((
                long.trim_start_matches("--")
                    .trim_end_matches(',')
                    .to_string(),
                Flag {
                    takes_value: text.contains('<'),
                    default: None,
                },
            ));
        } else if let Some((_, flag)) = current.as_mut()
            && let Some(default) = text
                .strip_prefix("[default: ")
                .and_then(|d| d.strip_suffix(']'))
        {
            flag.default = Some(default.to_string());
        } else if indent == 0 && !text.is_empty() {
            // A heading ("Logging:") or the usage: no flag continues past it.
            flags.extend(current.take());
        }
    }
    flags.extend(current);
    assert!(
        flags.contains_key("modules-dir") && flags.contains_key("log-format"),
        "run --help was not read: {flags:?}\n{help}"
    );
    flags
}

/// The documents of the YAML file at `path`, relative to the repository root.
fn load(path: &str) -> Vec<Yaml> {
    let file = root().join(path);
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

/// The only document of the YAML file at `path`.
fn load_one(path: &str) -> Yaml {
    let mut docs = load(path);
    assert_eq!(docs.len(), 1, "{path} holds one document");
    docs.remove(0)
}

/// The strings of a YAML sequence (none when it is missing).
fn strings(yaml: &Yaml) -> Vec<String> {
    yaml.as_vec()
        .map(|items| {
            items
                .iter()
                .map(|i| i.as_str().expect("a string").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The `*.yaml` / `*.yml` files under `dir`, recursively, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            files.extend(yaml_files(&path));
        } else if path
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml")
        {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// The DaemonSet in `deploy/daemonset.yaml`.
fn daemonset() -> Yaml {
    let ds = load_one("deploy/daemonset.yaml");
    assert_eq!(ds["kind"].as_str(), Some("DaemonSet"));
    ds
}

/// The container named [`CONTAINER`] of a DaemonSet (or a patch of one).
fn container(ds: &Yaml) -> &Yaml {
    ds["spec"]["template"]["spec"]["containers"]
        .as_vec()
        .and_then(|cs| cs.iter().find(|c| c["name"].as_str() == Some(CONTAINER)))
        .unwrap_or_else(|| panic!("no container named {CONTAINER}"))
}

/// The volume named `name` of a DaemonSet (or a patch of one).
fn volume<'a>(ds: &'a Yaml, name: &str) -> &'a Yaml {
    ds["spec"]["template"]["spec"]["volumes"]
        .as_vec()
        .and_then(|vs| vs.iter().find(|v| v["name"].as_str() == Some(name)))
        .unwrap_or_else(|| panic!("no volume named {name}"))
}

/// The container's volume mounts, as (mount path, mount).
fn mounts(container: &Yaml) -> Vec<(PathBuf, &Yaml)> {
    container["volumeMounts"]
        .as_vec()
        .map(|ms| {
            ms.iter()
                .map(|m| {
                    (
                        PathBuf::from(m["mountPath"].as_str().expect("mountPath")),
                        m,
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The container's volume mount at exactly `path`, and its volume.
fn mount_at<'a>(ds: &'a Yaml, container: &'a Yaml, path: &Path) -> (&'a Yaml, &'a Yaml) {
    let (_, mount) = mounts(container)
        .into_iter()
        .find(|(at, _)| at == path)
        .unwrap_or_else(|| panic!("nothing is mounted at {}", path.display()));
    (
        mount,
        volume(ds, mount["name"].as_str().expect("volume name")),
    )
}

/// The flags the container passes to `run`, by name without `--`, with their
/// values (`--flag=value` or `--flag value`; `None` for a switch).
fn args_of(container: &Yaml, flags: &BTreeMap<String, Flag>) -> BTreeMap<String, Option<String>> {
    let args = strings(&container["args"]);
    assert!(
        container["command"].is_badvalue(),
        "command replaces the image's entrypoint"
    );
    assert_eq!(
        args.first().map(String::as_str),
        Some("run"),
        "args: {args:?}"
    );
    let mut given = BTreeMap::new();
    let mut rest = args[1..].iter().peekable();
    while let Some(arg) = rest.next() {
        let flag = arg
            .strip_prefix("--")
            .unwrap_or_else(|| panic!("`{arg}` in args is not a flag"));
        let (name, value) = match flag.split_once('=') {
            Some((name, value)) => (name, Some(value.to_string())),
            // As clap reads it: a value never starts with `--`.
            None if flags.get(flag).is_some_and(|f| f.takes_value) => {
                (flag, rest.next_if(|next| !next.starts_with("--")).cloned())
            }
            None => (flag, None),
        };
        given.insert(name.to_string(), value);
    }
    given
}

/// The value `flag` has in the DaemonSet's host: the one its args give, else the
/// binary's default.
fn effective(
    given: &BTreeMap<String, Option<String>>,
    flags: &BTreeMap<String, Flag>,
    flag: &str,
) -> String {
    if let Some(Some(value)) = given.get(flag) {
        return value.clone();
    }
    flags
        .get(flag)
        .and_then(|f| f.default.clone())
        .unwrap_or_else(|| panic!("`run --help` states no default for --{flag}"))
}

/// The port of an address such as `0.0.0.0:9477`.
fn port_of(addr: &str) -> i64 {
    addr.rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or_else(|| panic!("`{addr}` has no port"))
}

/// One instruction of a Dockerfile: the keyword, upper case, and the rest.
#[derive(Debug)]
struct Instruction {
    keyword: String,
    args: String,
}

/// The instructions of the final stage of `deploy/Dockerfile` (after its last
/// `FROM`), and the `FROM` lines of every stage.
fn dockerfile() -> (Vec<Instruction>, Vec<String>) {
    let text =
        std::fs::read_to_string(root().join("deploy/Dockerfile")).expect("deploy/Dockerfile");
    let mut instructions = Vec::new();
    let mut logical = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        // Comments (and parser directives) are dropped, also inside a continuation.
        if trimmed.starts_with('#') || (trimmed.is_empty() && logical.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                logical.push_str(part);
                logical.push(' ');
            }
            None => {
                logical.push_str(trimmed);
                let (keyword, args) = logical
                    .split_once(char::is_whitespace)
                    .unwrap_or((&logical, ""));
                instructions.push(Instruction {
                    keyword: keyword.to_uppercase(),
                    args: args.trim().to_string(),
                });
                logical.clear();
            }
        }
    }
    let froms = instructions
        .iter()
        .filter(|i| i.keyword == "FROM")
        .map(|i| i.args.clone())
        .collect();
    let last_from = instructions
        .iter()
        .rposition(|i| i.keyword == "FROM")
        .expect("a FROM");
    (instructions.split_off(last_from + 1), froms)
}

/// The exec-form (JSON array) arguments of the one `keyword` instruction.
fn exec_form(stage: &[Instruction], keyword: &str) -> Vec<String> {
    let found: Vec<&Instruction> = stage.iter().filter(|i| i.keyword == keyword).collect();
    assert_eq!(found.len(), 1, "one {keyword} in the final stage");
    serde_json::from_str(&found[0].args)
        .unwrap_or_else(|e| panic!("{keyword} is not in exec form ({e}): {}", found[0].args))
}

/// The destination of each `COPY` of the final stage, without a trailing `/`.
fn copy_destinations(stage: &[Instruction]) -> Vec<String> {
    stage
        .iter()
        .filter(|i| i.keyword == "COPY")
        .filter_map(|i| i.args.split_whitespace().last())
        .map(|dest| dest.trim_end_matches('/').to_string())
        .collect()
}

/// The resources a shipped guest reports with its example manifest, as the
/// host's `validate --json` says: resource name → devices a node advertises
/// (devices × replicas).
async fn advertised(guest: &str, manifest: &str) -> BTreeMap<String, i64> {
    let manifest = root().join(manifest);
    let manifest = manifest.to_str().expect("UTF-8 path");
    let (code, stdout) = wdp(&["validate", guest, "--manifest", manifest, "--json"]).await;
    let report: Value = serde_json::from_str(&stdout).expect("validate --json prints JSON");
    assert_eq!(code, Some(0), "validate {guest} with {manifest}: {report}");
    report["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| {
            let devices = r["devices"].as_array().expect("devices").len();
            let replicas = r["replicas"].as_i64().expect("replicas");
            let count = i64::try_from(devices).expect("a count") * replicas;
            (r["name"].as_str().expect("name").to_string(), count)
        })
        .collect()
}

/// The extended resources (names with a `/`) the containers of the pod in
/// `path` ask for, summed over its containers.
fn pod_requests(path: &str) -> BTreeMap<String, i64> {
    let pod = load_one(path);
    assert_eq!(pod["kind"].as_str(), Some("Pod"), "{path}");
    let mut wanted = BTreeMap::new();
    for c in pod["spec"]["containers"].as_vec().expect("containers") {
        let limits = c["resources"]["limits"]
            .as_hash()
            .cloned()
            .unwrap_or_default();
        for (name, count) in &limits {
            let name = name.as_str().expect("resource name");
            if !name.contains('/') {
                continue;
            }
            let count = count
                .as_i64()
                .unwrap_or_else(|| panic!("{path}: {name} is not a count"));
            // Kubernetes wants requests equal to limits for extended resources.
            let request = &c["resources"]["requests"][name];
            assert!(
                request.is_badvalue() || request.as_i64() == Some(count),
                "{path}: {name} requests differ from limits"
            );
            *wanted.entry(name.to_string()).or_insert(0) += count;
        }
    }
    wanted
}

#[test]
fn every_yaml_file_in_deploy_and_examples_parses() {
    let mut files = yaml_files(&root().join("deploy"));
    files.extend(yaml_files(&root().join("examples")));
    for expected in [
        "deploy/kustomization.yaml",
        "deploy/daemonset.yaml",
        "deploy/components/modules-hostpath/kustomization.yaml",
        "deploy/components/modules-configmap/kustomization.yaml",
        "examples/pods/gpu-share.yaml",
        "examples/pods/nic-hog.yaml",
        "examples/pods/nic-waiting.yaml",
        "deploy/rbac.yaml",
        "examples/dra/deviceclass.yaml",
    ] {
        assert!(
            files.contains(&root().join(expected)),
            "{expected} is missing"
        );
    }
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read");
        let docs =
            YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(!docs.is_empty(), "{}: no document", file.display());
        for doc in docs {
            assert!(
                doc["apiVersion"].as_str().is_some() && doc["kind"].as_str().is_some(),
                "{}: a document without apiVersion and kind",
                file.display()
            );
        }
    }
}

#[test]
fn every_path_a_kustomization_names_exists() {
    let kustomizations: Vec<PathBuf> = yaml_files(&root().join("deploy"))
        .into_iter()
        .filter(|f| f.file_name().is_some_and(|n| n == "kustomization.yaml"))
        .collect();
    assert!(kustomizations.len() >= 3, "{kustomizations:?}");
    for file in kustomizations {
        let dir = file.parent().expect("a directory");
        let relative = file.strip_prefix(root()).expect("in the repository");
        let k = load_one(relative.to_str().expect("UTF-8 path"));
        let is_component = dir.parent().is_some_and(|p| p.ends_with("components"));
        let kind = if is_component {
            "Component"
        } else {
            "Kustomization"
        };
        assert_eq!(k["kind"].as_str(), Some(kind), "{}", file.display());
        let mut named = strings(&k["resources"]);
        named.extend(strings(&k["components"]));
        named.extend(strings(&k["patchesStrategicMerge"]));
        if let Some(patches) = k["patches"].as_vec() {
            named.extend(
                patches
                    .iter()
                    .filter_map(|p| p["path"].as_str().map(str::to_string)),
            );
        }
        assert!(!named.is_empty(), "{} names nothing", file.display());
        for path in named {
            let target = dir.join(&path);
            let exists = target.is_file() || target.join("kustomization.yaml").is_file();
            assert!(
                exists,
                "{} names {path}, which does not exist",
                file.display()
            );
        }
    }
}

#[tokio::test]
async fn daemonset_args_are_flags_of_run() {
    let flags = run_flags().await;
    let ds = daemonset();
    for (flag, value) in args_of(container(&ds), &flags) {
        let Some(known) = flags.get(&flag) else {
            panic!("--{flag} is not a flag of `wasm-device-plugin run` (see its --help)");
        };
        assert_eq!(
            known.takes_value,
            value.is_some(),
            "--{flag}: a value where the flag takes none, or none where it takes one"
        );
    }
}

#[tokio::test]
async fn kubelet_dir_is_mounted_from_the_node_where_the_host_looks() {
    let flags = run_flags().await;
    let ds = daemonset();
    let c = container(&ds);
    let kubelet_dir = effective(&args_of(c, &flags), &flags, "kubelet-dir");
    let (mount, volume) = mount_at(&ds, c, Path::new(&kubelet_dir));
    assert_ne!(
        mount["readOnly"].as_bool(),
        Some(true),
        "the host writes its sockets there"
    );
    // The node's kubelet keeps its device-plugin directory where the binary's
    // default says (kubelet's own default root directory).
    let node_default = flags["kubelet-dir"].default.as_deref();
    assert_eq!(volume["hostPath"]["path"].as_str(), node_default);
    assert_eq!(volume["hostPath"]["type"].as_str(), Some("Directory"));
}

#[tokio::test]
async fn cdi_dir_is_the_nodes_mounted_where_the_host_writes_specs() {
    let flags = run_flags().await;
    let ds = daemonset();
    let c = container(&ds);
    let cdi_dir = effective(&args_of(c, &flags), &flags, "cdi-dir");
    let (mount, volume) = mount_at(&ds, c, Path::new(&cdi_dir));
    assert_ne!(
        mount["readOnly"].as_bool(),
        Some(true),
        "the host writes its CDI specs there"
    );
    // The runtime reads the node's directory: the same path on the node.
    assert_eq!(volume["hostPath"]["path"].as_str(), Some(cdi_dir.as_str()));
    // The host refuses a resource whose spec it cannot write; the volume makes
    // sure the directory exists.
    assert_eq!(
        volume["hostPath"]["type"].as_str(),
        Some("DirectoryOrCreate")
    );
}

#[tokio::test]
async fn modules_dir_is_the_images_own_by_default() {
    let flags = run_flags().await;
    let ds = daemonset();
    let c = container(&ds);
    let modules_dir = PathBuf::from(effective(&args_of(c, &flags), &flags, "modules-dir"));
    for (at, _) in mounts(c) {
        assert!(
            !modules_dir.starts_with(&at),
            "the volume at {} hides the image's modules in {}",
            at.display(),
            modules_dir.display()
        );
    }
    let (stage, _) = dockerfile();
    assert!(
        copy_destinations(&stage).contains(&modules_dir.display().to_string()),
        "the image puts no modules in {}",
        modules_dir.display()
    );
}

#[tokio::test]
async fn module_components_mount_their_source_read_only_at_the_modules_dir() {
    let flags = run_flags().await;
    let base = daemonset();
    let modules_dir = PathBuf::from(effective(
        &args_of(container(&base), &flags),
        &flags,
        "modules-dir",
    ));
    for (component, source) in [
        ("modules-hostpath", "hostPath"),
        ("modules-configmap", "configMap"),
    ] {
        let dir = format!("deploy/components/{component}");
        let k = load_one(&format!("{dir}/kustomization.yaml"));
        let patches = k["patches"].as_vec().expect("patches");
        assert_eq!(patches.len(), 1, "{component}: one patch");
        let patch = load_one(&format!(
            "{dir}/{}",
            patches[0]["path"].as_str().expect("path")
        ));
        assert_eq!(patch["kind"].as_str(), Some("DaemonSet"), "{component}");
        assert_eq!(
            patch["metadata"]["name"], base["metadata"]["name"],
            "{component}"
        );
        let (mount, volume) = mount_at(&patch, container(&patch), &modules_dir);
        assert_eq!(mount["readOnly"].as_bool(), Some(true), "{component}");
        // subPath mounts of a ConfigMap are never updated.
        assert!(mount["subPath"].is_badvalue(), "{component}");
        assert!(
            !volume[source].is_badvalue(),
            "{component}: not a {source} volume"
        );
    }
    let hostpath = load_one("deploy/components/modules-hostpath/daemonset-patch.yaml");
    let node_dir = &volume(&hostpath, "modules")["hostPath"];
    assert_eq!(
        node_dir["path"].as_str(),
        Some("/var/lib/wasm-device-plugin/modules")
    );
    assert_eq!(node_dir["type"].as_str(), Some("DirectoryOrCreate"));
    let configmap = load_one("deploy/components/modules-configmap/daemonset-patch.yaml");
    assert_eq!(
        volume(&configmap, "modules")["configMap"]["name"].as_str(),
        Some("wasm-device-plugin-modules")
    );
}

#[tokio::test]
async fn cache_dir_is_created_by_the_host_in_a_writable_volume() {
    let flags = run_flags().await;
    let ds = daemonset();
    let c = container(&ds);
    let given = args_of(c, &flags);
    assert!(!given.contains_key("no-cache"), "the cache is off");
    let cache_dir = PathBuf::from(effective(&given, &flags, "cache-dir"));
    // The image's filesystem is read-only: the deepest mount holding the cache
    // directory must be a writable volume.
    let (at, mount) = mounts(c)
        .into_iter()
        .filter(|(at, _)| cache_dir.starts_with(at))
        .max_by_key(|(at, _)| at.components().count())
        .unwrap_or_else(|| panic!("no volume holds {}", cache_dir.display()));
    assert_ne!(mount["readOnly"].as_bool(), Some(true), "{}", at.display());
    let volume = volume(&ds, mount["name"].as_str().expect("name"));
    assert!(
        !volume["emptyDir"].is_badvalue() || !volume["hostPath"].is_badvalue(),
        "the cache volume is neither an emptyDir nor a hostPath"
    );
    // The host refuses a cache directory that group or others may write, and an
    // emptyDir's own directory is mode 0777: the host must create its own inside.
    assert!(
        at != cache_dir || volume["emptyDir"].is_badvalue(),
        "an emptyDir mounted at the cache directory itself is mode 0777, which the host refuses"
    );
}

#[test]
fn dev_is_the_nodes_dev_read_only() {
    let ds = daemonset();
    let (mount, volume) = mount_at(&ds, container(&ds), Path::new("/dev"));
    assert_eq!(mount["readOnly"].as_bool(), Some(true));
    assert_eq!(volume["hostPath"]["path"].as_str(), Some("/dev"));
}

/// The runtime creates the termination-message file before the container
/// starts; under a read-only /dev (the default path, /dev/termination-log) that
/// fails and the container never starts (intel-device-plugins-for-kubernetes
/// PR 261). It must lie in a writable volume.
#[test]
fn termination_message_file_lies_in_a_writable_volume() {
    let ds = daemonset();
    let c = container(&ds);
    let path = c["terminationMessagePath"]
        .as_str()
        .unwrap_or("/dev/termination-log");
    let (mount, volume) = mounts(c)
        .into_iter()
        .filter(|(at, _)| Path::new(path).starts_with(at))
        .max_by_key(|(at, _)| at.components().count())
        .map(|(at, mount)| {
            let name = mount["name"].as_str().expect("mount name").to_string();
            (at, volume(&ds, &name).clone())
        })
        .unwrap_or_else(|| panic!("{path} is in no volume, and the image is read-only"));
    assert!(
        !volume["emptyDir"].is_badvalue(),
        "{path} is under {}, which is not an emptyDir",
        mount.display()
    );
    let (m, _) = mount_at(&ds, c, &mount);
    assert_ne!(m["readOnly"].as_bool(), Some(true), "{path} is read-only");
}

#[tokio::test]
async fn probes_use_the_metrics_port_and_endpoints() {
    let flags = run_flags().await;
    let ds = daemonset();
    let c = container(&ds);
    let addr = effective(&args_of(c, &flags), &flags, "metrics-addr");
    let port = port_of(&addr);
    let ports = c["ports"].as_vec().expect("ports");
    let metrics = ports
        .iter()
        .find(|p| p["name"].as_str() == Some("metrics"))
        .expect("a port named metrics");
    assert_eq!(
        metrics["containerPort"].as_i64(),
        Some(port),
        "--metrics-addr={addr}"
    );
    for (probe, path) in [
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ] {
        let get = &c[probe]["httpGet"];
        if probe == "startupProbe" && c[probe].is_badvalue() {
            continue;
        }
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        let by_name = get["port"].as_str() == Some("metrics");
        assert!(
            by_name || get["port"].as_i64() == Some(port),
            "{probe} port"
        );
    }
    let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
    if let Some(scrape_port) = annotations["prometheus.io/port"].as_str() {
        assert_eq!(scrape_port, port.to_string(), "prometheus.io/port");
    }
}

#[test]
fn host_runs_as_root_without_capabilities() {
    let ds = daemonset();
    let pod = &ds["spec"]["template"]["spec"];
    let sc = &container(&ds)["securityContext"];
    assert_eq!(
        sc["runAsUser"].as_i64(),
        Some(0),
        "kubelet.sock accepts only root"
    );
    assert_eq!(sc["privileged"].as_bool(), Some(false));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert!(
        sc["capabilities"]["add"].is_badvalue(),
        "capabilities added"
    );
    let seccomp = sc["seccompProfile"]["type"]
        .as_str()
        .or(pod["securityContext"]["seccompProfile"]["type"].as_str());
    assert_eq!(seccomp, Some("RuntimeDefault"));
    for host_namespace in ["hostNetwork", "hostPID", "hostIPC"] {
        assert_ne!(
            pod[host_namespace].as_bool(),
            Some(true),
            "{host_namespace}"
        );
    }
}

/// The API access is for DRA alone: the DaemonSet's ServiceAccount may write
/// ResourceSlices, read ResourceClaims and Nodes, and nothing else.
#[test]
fn service_account_has_only_what_dra_needs() {
    let k = load_one("deploy/kustomization.yaml");
    assert!(strings(&k["resources"]).contains(&"rbac.yaml".to_string()));
    let docs = load("deploy/rbac.yaml");
    let of_kind = |kind: &str| -> &Yaml {
        let found: Vec<&Yaml> = docs
            .iter()
            .filter(|d| d["kind"].as_str() == Some(kind))
            .collect();
        assert_eq!(found.len(), 1, "one {kind} in deploy/rbac.yaml");
        found[0]
    };
    let account = of_kind("ServiceAccount");
    let role = of_kind("ClusterRole");
    let binding = of_kind("ClusterRoleBinding");
    assert_eq!(docs.len(), 3, "deploy/rbac.yaml holds more than the three");

    let ds = daemonset();
    let pod = &ds["spec"]["template"]["spec"];
    let name = account["metadata"]["name"].as_str().expect("a name");
    assert_eq!(pod["serviceAccountName"].as_str(), Some(name));
    assert_ne!(
        pod["automountServiceAccountToken"].as_bool(),
        Some(false),
        "DRA talks to the API server with the ServiceAccount's token"
    );

    let mut granted = BTreeMap::new();
    for rule in role["rules"].as_vec().expect("rules") {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                let mut verbs = strings(&rule["verbs"]);
                verbs.sort();
                assert!(
                    granted
                        .insert(format!("{group}/{resource}"), verbs)
                        .is_none(),
                    "{group}/{resource} in two rules"
                );
            }
        }
    }
    let sorted = |verbs: &[&str]| {
        let mut v: Vec<String> = verbs.iter().map(|v| v.to_string()).collect();
        v.sort();
        v
    };
    let wanted = BTreeMap::from([
        (
            "resource.k8s.io/resourceslices".to_string(),
            sorted(&[
                "get",
                "list",
                "watch",
                "create",
                "update",
                "patch",
                "delete",
                "deletecollection",
            ]),
        ),
        (
            "resource.k8s.io/resourceclaims".to_string(),
            sorted(&["get"]),
        ),
        ("/nodes".to_string(), sorted(&["get"])),
    ]);
    assert_eq!(granted, wanted);

    assert_eq!(binding["roleRef"]["kind"].as_str(), Some("ClusterRole"));
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    let subjects = binding["subjects"].as_vec().expect("subjects");
    assert_eq!(subjects.len(), 1, "{subjects:?}");
    assert_eq!(subjects[0]["kind"].as_str(), Some("ServiceAccount"));
    assert_eq!(subjects[0]["name"].as_str(), Some(name));
    // Left to kustomize, which gives it the ServiceAccount's namespace: a namespace
    // written here would stay behind when an overlay moves the DaemonSet.
    assert!(subjects[0]["namespace"].is_badvalue(), "subject namespace");
}

/// The DRA frontend takes the node's name and the pod's UID from the environment
/// (`NODE_NAME`, `POD_UID`); the downward API supplies both.
#[test]
fn node_name_and_pod_uid_come_from_the_downward_api() {
    let ds = daemonset();
    let env = container(&ds)["env"].as_vec().expect("env");
    for (name, field) in [("NODE_NAME", "spec.nodeName"), ("POD_UID", "metadata.uid")] {
        let var = env
            .iter()
            .find(|e| e["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no {name} in env"));
        assert_eq!(
            var["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
            Some(field),
            "{name}"
        );
    }
}

/// `examples/dra`: the DeviceClass selects the virtual guest's dev-1 devices by
/// driver and kind and names the extended resource; the claims, the template and
/// the pods use what the others define.
#[test]
fn dra_examples_refer_to_each_other() {
    let class = load_one("examples/dra/deviceclass.yaml");
    assert_eq!(class["kind"].as_str(), Some("DeviceClass"));
    let class_name = class["metadata"]["name"].as_str().expect("name");
    assert_eq!(class_name, "dev-1.example.com");
    let selectors = class["spec"]["selectors"].as_vec().expect("selectors");
    let expression = selectors[0]["cel"]["expression"]
        .as_str()
        .expect("a CEL expression");
    for part in [
        "device.driver == \"dev-1.example.com\"",
        "device.attributes[\"dev-1.example.com\"].kind == \"dev-1\"",
    ] {
        assert!(expression.contains(part), "{expression} lacks {part}");
    }
    let extended = class["spec"]["extendedResourceName"]
        .as_str()
        .expect("extendedResourceName");
    assert_eq!(extended, "example.com/dev-1");

    let mut docs = BTreeMap::new();
    for file in yaml_files(&root().join("examples/dra")) {
        let path = file.strip_prefix(root()).expect("in the repository");
        let doc = load_one(path.to_str().expect("UTF-8 path"));
        assert_eq!(
            doc["apiVersion"].as_str(),
            Some(if doc["kind"].as_str() == Some("Pod") {
                "v1"
            } else {
                "resource.k8s.io/v1"
            }),
            "{}",
            path.display()
        );
        docs.insert(path.display().to_string(), doc);
    }
    let claim_specs: Vec<&Yaml> = docs
        .values()
        .filter_map(|d| match d["kind"].as_str() {
            Some("ResourceClaim") => Some(&d["spec"]),
            Some("ResourceClaimTemplate") => Some(&d["spec"]["spec"]),
            _ => None,
        })
        .collect();
    assert_eq!(claim_specs.len(), 2, "a claim and a template");
    for spec in &claim_specs {
        for request in spec["devices"]["requests"].as_vec().expect("requests") {
            assert_eq!(
                request["exactly"]["deviceClassName"].as_str(),
                Some(class_name)
            );
        }
    }
    let named = |kind: &str| -> Vec<String> {
        docs.values()
            .filter(|d| d["kind"].as_str() == Some(kind))
            .filter_map(|d| d["metadata"]["name"].as_str().map(str::to_string))
            .collect()
    };
    let (claims, templates) = (named("ResourceClaim"), named("ResourceClaimTemplate"));
    let pods: Vec<(&String, &Yaml)> = docs
        .iter()
        .filter(|(_, d)| d["kind"].as_str() == Some("Pod"))
        .collect();
    let (mut by_template, mut by_claim, mut by_limit) = (0, 0, 0);
    for (path, pod) in pods {
        let spec = &pod["spec"];
        let pod_claims = spec["resourceClaims"].as_vec().cloned().unwrap_or_default();
        for claim in &pod_claims {
            if let Some(template) = claim["resourceClaimTemplateName"].as_str() {
                assert!(templates.contains(&template.to_string()), "{path}");
                by_template += 1;
            } else {
                let name = claim["resourceClaimName"].as_str().expect("a claim name");
                assert!(claims.contains(&name.to_string()), "{path}");
                by_claim += 1;
            }
        }
        for c in spec["containers"].as_vec().expect("containers") {
            for used in c["resources"]["claims"].as_vec().into_iter().flatten() {
                let used = used["name"].as_str().expect("name");
                assert!(
                    pod_claims.iter().any(|p| p["name"].as_str() == Some(used)),
                    "{path}: container uses claim {used}, which the pod does not list"
                );
            }
            if c["resources"]["limits"][extended].as_i64() == Some(1) {
                by_limit += 1;
            }
        }
    }
    assert_eq!(
        (by_template, by_claim, by_limit),
        (1, 1, 1),
        "a pod with a templated claim, one with a claim, one asking {extended}"
    );
}

#[test]
fn host_is_node_critical_on_opted_in_linux_nodes() {
    let ds = daemonset();
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(
        pod["priorityClassName"].as_str(),
        Some("system-node-critical")
    );
    assert_eq!(
        pod["nodeSelector"]["kubernetes.io/os"].as_str(),
        Some("linux")
    );
    assert_eq!(
        pod["nodeSelector"]["wasm-device-plugin/enabled"].as_str(),
        Some("true")
    );
    let tolerations = pod["tolerations"].as_vec().expect("tolerations");
    let tolerates = |key: Option<&str>, effect: Option<&str>| {
        tolerations.iter().any(|t| {
            t["key"].as_str() == key
                && t["effect"].as_str() == effect
                && t["operator"].as_str() == Some("Exists")
        })
    };
    assert!(
        tolerates(Some("CriticalAddonsOnly"), None),
        "CriticalAddonsOnly"
    );
    assert!(
        tolerates(None, Some("NoSchedule")),
        "every NoSchedule taint"
    );
    assert_eq!(
        ds["spec"]["updateStrategy"]["type"].as_str(),
        Some("RollingUpdate")
    );
    // The host stops and removes its sockets well within this on SIGTERM.
    assert_eq!(pod["terminationGracePeriodSeconds"].as_i64(), Some(30));
}

#[test]
fn host_requests_cpu_and_memory_and_limits_only_memory() {
    let ds = daemonset();
    let resources = &container(&ds)["resources"];
    for request in ["cpu", "memory"] {
        assert!(
            resources["requests"][request].as_str().is_some(),
            "requests.{request}"
        );
    }
    assert!(
        resources["limits"]["memory"].as_str().is_some(),
        "limits.memory"
    );
    // CFS throttling would delay Allocate, on kubelet's pod-admission path.
    assert!(resources["limits"]["cpu"].is_badvalue(), "a CPU limit");
}

#[test]
fn kustomization_sets_the_daemonsets_image_and_labels() {
    let k = load_one("deploy/kustomization.yaml");
    let ds = daemonset();
    assert_eq!(k["namespace"].as_str(), Some("kube-system"));
    assert!(strings(&k["resources"]).contains(&"daemonset.yaml".to_string()));
    let image = container(&ds)["image"].as_str().expect("image");
    let images = k["images"].as_vec().expect("images");
    assert!(
        images.iter().any(|i| i["name"].as_str() == Some(image)),
        "no images entry for {image}: `kustomize edit set image` would change nothing"
    );
    let label = k["labels"]
        .as_vec()
        .and_then(|ls| ls.first())
        .expect("labels");
    assert_eq!(
        label["pairs"]["app.kubernetes.io/name"].as_str(),
        Some("wasm-device-plugin")
    );
    let selector = &ds["spec"]["selector"]["matchLabels"];
    let labels = &ds["spec"]["template"]["metadata"]["labels"];
    for (key, value) in selector.as_hash().expect("matchLabels") {
        assert_eq!(
            &labels[key.as_str().expect("a key")],
            value,
            "the selector matches the pods"
        );
    }
}

#[test]
fn image_and_manifests_name_the_crate_version() {
    let version = env!("CARGO_PKG_VERSION");
    let k = load_one("deploy/kustomization.yaml");
    let tags: Vec<&str> = k["images"]
        .as_vec()
        .expect("images")
        .iter()
        .filter_map(|i| i["newTag"].as_str())
        .collect();
    assert_eq!(tags, [version], "the image tag deployed");
    let (stage, froms) = dockerfile();
    assert!(
        stage
            .iter()
            .any(|i| i.keyword == "ARG" && i.args == format!("VERSION={version}")),
        "the image's version label"
    );
    // The builder's Rust is the workspace's rust-version (wasmtime needs it).
    let workspace: toml::Table = std::fs::read_to_string(root().join("Cargo.toml"))
        .expect("Cargo.toml")
        .parse()
        .expect("Cargo.toml parses");
    let rust = workspace["workspace"]["package"]["rust-version"]
        .as_str()
        .expect("rust-version");
    assert!(
        froms
            .iter()
            .any(|f| f.starts_with(&format!("rust:{rust}-"))),
        "no builder on Rust {rust}: {froms:?}"
    );
}

#[tokio::test]
async fn image_runs_the_host_with_its_defaults() {
    let flags = run_flags().await;
    let (stage, _) = dockerfile();
    let entrypoint = exec_form(&stage, "ENTRYPOINT");
    assert_eq!(entrypoint.len(), 1, "{entrypoint:?}");
    assert!(
        entrypoint[0].ends_with("/wasm-device-plugin"),
        "{entrypoint:?}"
    );
    let copied = copy_destinations(&stage);
    assert!(
        copied.contains(&entrypoint[0]),
        "the image has no {}",
        entrypoint[0]
    );
    assert_eq!(exec_form(&stage, "CMD"), ["run"]);
    let modules_dir = flags["modules-dir"].default.clone().expect("a default");
    assert!(copied.contains(&modules_dir), "no modules in {modules_dir}");
    let metrics = flags
        .get("metrics-addr")
        .and_then(|f| f.default.as_deref())
        .expect("`run --help` states the default --metrics-addr");
    let exposed: Vec<i64> = stage
        .iter()
        .filter(|i| i.keyword == "EXPOSE")
        .flat_map(|i| i.args.split_whitespace())
        .map(|p| p.trim_end_matches("/tcp").parse().expect("a port"))
        .collect();
    assert_eq!(exposed, [port_of(metrics)], "EXPOSE");
}

/// Each example manifest belongs to a shipped guest, and the host would serve
/// the pair: what the image ships (`cargo xtask dist`) is what this checks.
#[tokio::test]
async fn example_modules_validate_with_their_guests() {
    let dir = root().join("examples/modules");
    let mut manifests: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("examples/modules")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    manifests.sort();
    let names: Vec<String> = manifests
        .iter()
        .map(|p| {
            p.file_stem()
                .expect("a name")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(names, ["fpga", "generic", "virtual_devices", "virtual_dra"]);
    for (name, manifest) in names.iter().zip(&manifests) {
        let guest = match name.as_str() {
            "fpga" => guests::FPGA,
            "generic" => guests::GENERIC,
            // The same guest, served through DRA (a copy named virtual_dra.wasm).
            "virtual_devices" | "virtual_dra" => guests::VIRTUAL_DEVICES,
            other => panic!("no shipped guest is named {other}"),
        };
        let manifest = manifest.to_str().expect("UTF-8 path");
        let (code, stdout) = wdp(&["validate", guest, "--manifest", manifest, "--json"]).await;
        assert_eq!(code, Some(0), "{name}: {stdout}");
    }
}

#[tokio::test]
async fn example_pods_ask_only_for_what_the_virtual_guest_reports() {
    let offered = advertised(
        guests::VIRTUAL_DEVICES,
        "examples/modules/virtual_devices.toml",
    )
    .await;
    let pods = yaml_files(&root().join("examples/pods"));
    assert!(!pods.is_empty(), "no example pods");
    for pod in pods {
        let path = pod.strip_prefix(root()).expect("in the repository");
        let path = path.to_str().expect("UTF-8 path");
        let wanted = pod_requests(path);
        assert!(!wanted.is_empty(), "{path} asks for no device");
        for (resource, count) in wanted {
            let Some(&available) = offered.get(&resource) else {
                panic!("{path} asks for {resource}, which the guest does not report: {offered:?}");
            };
            assert!(
                count <= available,
                "{path}: {count} {resource} of {available}"
            );
        }
    }
}

#[tokio::test]
async fn waiting_pod_fits_alone_but_not_beside_the_hog() {
    let offered = advertised(
        guests::VIRTUAL_DEVICES,
        "examples/modules/virtual_devices.toml",
    )
    .await;
    let hog = pod_requests("examples/pods/nic-hog.yaml");
    let waiting = pod_requests("examples/pods/nic-waiting.yaml");
    let (resource, wants) = waiting
        .iter()
        .next()
        .expect("the waiting pod asks for a device");
    let available = offered[resource];
    let held = hog.get(resource).copied().unwrap_or(0);
    assert!(*wants <= available, "the waiting pod never fits");
    assert!(held <= available, "the hog never fits");
    assert!(
        held + wants > available,
        "both fit ({held} + {wants} of {available} {resource}): the waiting pod would not wait"
    );
}

/// DRA: kubelet's plugin watcher directory, the DRA sockets' directory and the state
/// directory are the node's, each mounted writable where the host looks for it, at
/// the node's own path (kubelet dials the endpoint path the host hands it).
#[tokio::test]
async fn dra_directories_are_the_nodes_where_the_host_uses_them() {
    let flags = run_flags().await;
    let ds = daemonset();
    let c = container(&ds);
    let given = args_of(c, &flags);
    for (flag, node_path, kind) in [
        (
            "kubelet-registry-dir",
            "/var/lib/kubelet/plugins_registry",
            "DirectoryOrCreate",
        ),
        (
            "kubelet-plugins-dir",
            "/var/lib/kubelet/plugins",
            "DirectoryOrCreate",
        ),
        (
            "state-dir",
            "/var/lib/wasm-device-plugin",
            "DirectoryOrCreate",
        ),
    ] {
        let dir = effective(&given, &flags, flag);
        assert_eq!(dir, node_path, "--{flag}");
        let (mount, volume) = mount_at(&ds, c, Path::new(&dir));
        assert_ne!(mount["readOnly"].as_bool(), Some(true), "--{flag}");
        assert_eq!(
            volume["hostPath"]["path"].as_str(),
            Some(node_path),
            "--{flag}"
        );
        assert_eq!(volume["hostPath"]["type"].as_str(), Some(kind), "--{flag}");
    }
}

/// The variables the DaemonSet sets are the ones `run` reads.
#[tokio::test]
async fn downward_api_variables_are_the_ones_run_reads() {
    let (code, help) = wdp(&["run", "--help"]).await;
    assert_eq!(code, Some(0));
    for var in ["NODE_NAME", "POD_UID"] {
        assert!(
            help.contains(&format!("[env: {var}")),
            "run --help names no {var}"
        );
    }
}
