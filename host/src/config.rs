//! The command line: clap arguments and their conversion into plain config
//! structs. The only place that reads flags or environment variables.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::app::{DEFAULT_SETTLE, DraConfig, HostConfig};
use crate::registry::Settings;
use crate::registry::manifest::MAX_DURATION;
use crate::runtime::Limits;

/// Kubelet's device-plugin directory.
pub const DEFAULT_KUBELET_DIR: &str = "/var/lib/kubelet/device-plugins";
/// Where the container image keeps its modules.
pub const DEFAULT_MODULES_DIR: &str = "/etc/wasm-device-plugin/modules";
/// Where compiled modules are cached.
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/wasm-device-plugin";
/// Domain given to modules' bare kind names.
pub const DEFAULT_DOMAIN: &str = "example.com";
/// How often `health` runs.
pub const DEFAULT_HEALTH_INTERVAL: &str = "10s";
/// How often `scan` runs again.
pub const DEFAULT_SCAN_INTERVAL: &str = "60s";
/// Where `/metrics`, `/healthz` and `/readyz` are served.
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9477";

/// A Kubernetes device plugin host whose device logic runs in sandboxed
/// WebAssembly components.
///
/// Each `*.wasm` component in the modules directory reports devices grouped by
/// kind; the host serves one kubelet resource per kind over the device-plugin API
/// (v1beta1): a socket in the kubelet directory, registration with kubelet,
/// ListAndWatch, Allocate, GetPreferredAllocation.
#[derive(Debug, Parser)]
#[command(name = "wasm-device-plugin", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t = LogFormat::Text,
        env = "WDP_LOG_FORMAT",
        help_heading = "Logging"
    )]
    pub log_format: LogFormat,
    /// Log filter, in `tracing` env-filter syntax (e.g. `info`,
    /// `wasm_device_plugin=debug`). `RUST_LOG` is used when this is not given.
    #[arg(long, global = true, env = "WDP_LOG", help_heading = "Logging")]
    pub log: Option<String>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the modules of a directory to kubelet (what the DaemonSet runs).
    Run(RunArgs),
    /// Run the host on the shipped guests against a built-in kubelet simulator in
    /// a temporary directory, and print what kubelet sees and what a pod gets.
    Demo(DemoArgs),
    /// Check a module file as the host would load it: a component of this host's
    /// package, its imports and exports, a first scan in the sandbox with its
    /// manifest's settings, and the output policy. Prints the devices it reports,
    /// and (`hooks`) which functions it exports and what the host supplies for
    /// the optional ones it leaves out (`health`, `allocate`, `post-allocate`).
    ///
    /// Exit code 0 when the host would serve the module; 1, with one line on
    /// stderr saying why, when it would refuse it; 2 for a command-line error.
    /// The guest's log lines and output go to stderr with `--log info`.
    Validate(ValidateArgs),
    /// Dry-run an Allocate through a module as the host would answer kubelet: scan,
    /// check the requested ids (known, healthy, each once), `allocate` and
    /// `post-allocate` in the sandbox (or the host's merge of scan's device
    /// allocations for a module without `allocate`), the output policy. Prints
    /// what the containers would get.
    ///
    /// Exit code 0 when the host would answer the request; 1, with one line on
    /// stderr saying why, when it would refuse it; 2 for a command-line error.
    /// The guest's log lines and output go to stderr with `--log info`.
    Allocate(AllocateArgs),
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Settings of every module's calls, shared by `run`, `demo`, `validate` and
/// `allocate` (a module's manifest overrides them).
#[derive(Debug, Clone, clap::Args)]
pub struct ModuleArgs {
    /// Domain prefixed to a module's bare kind names: kind `dev-1` is served as
    /// resource `<domain>/dev-1`. Kinds that already hold a `/` are used as they
    /// are. Set a domain you own; `example.com` is for trying things out.
    #[arg(long, default_value = DEFAULT_DOMAIN, env = "WDP_DOMAIN")]
    pub domain: String,
    /// Deadline of each `allocate` + `post-allocate` call.
    #[arg(long, default_value = "1s", value_parser = positive_duration)]
    pub allocate_timeout: Duration,
    /// Deadline of each `scan` and `health` call.
    #[arg(long, default_value = "10s", value_parser = positive_duration)]
    pub scan_timeout: Duration,
    /// Largest memory one module instance may use, in MiB (1 to 4096).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub memory_limit_mib: u32,
}

/// Settings shared by `run` and `demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct HostArgs {
    /// Domain and limits.
    #[command(flatten)]
    pub module: ModuleArgs,
    /// How often each module's `health` runs (e.g. `500ms`, `10s`, `1m`).
    #[arg(long, default_value = DEFAULT_HEALTH_INTERVAL, value_parser = positive_duration)]
    pub health_interval: Duration,
    /// How often each module's `scan` runs again to find added or removed devices.
    #[arg(long, default_value = DEFAULT_SCAN_INTERVAL, value_parser = positive_duration)]
    pub scan_interval: Duration,
}

/// `run` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Directory of `*.wasm` device modules to serve, each with an optional
    /// `<name>.toml` manifest. Watched: modules and manifests added, replaced,
    /// edited or removed are picked up while the host runs.
    #[arg(long, default_value = DEFAULT_MODULES_DIR, env = "WDP_MODULES_DIR")]
    pub modules_dir: PathBuf,
    /// Kubelet's device-plugin directory: holds `kubelet.sock`; the host creates
    /// one socket per resource here. Watched: when kubelet restarts, every
    /// resource is registered again; while kubelet is absent, the host waits.
    #[arg(long, default_value = DEFAULT_KUBELET_DIR, env = "WDP_KUBELET_DIR")]
    pub kubelet_dir: PathBuf,
    /// Directory for compiled modules, so a restart does not compile them again.
    /// Created (mode 0700) if missing; used only if owned by this user and not
    /// writable by group or others.
    #[arg(long, default_value = DEFAULT_CACHE_DIR, env = "WDP_CACHE_DIR")]
    pub cache_dir: PathBuf,
    /// Compile every module at load; read and write no cache.
    #[arg(long, conflicts_with = "cache_dir")]
    pub no_cache: bool,
    /// Directory for the CDI specs of resources whose manifest turns `cdi` on
    /// (one `wasm-device-plugin_<resource>.json` each, mode 0644): the
    /// container runtime's CDI spec directory, where it resolves the CDI names
    /// that Allocate returns. It must exist: a resource whose spec cannot be
    /// written there is not served. At start, specs an earlier run wrote for
    /// resources no longer served are deleted; files without this host's marks
    /// are never touched.
    #[arg(long, default_value = crate::cdi::DEFAULT_DIR, env = "WDP_CDI_DIR")]
    pub cdi_dir: PathBuf,
    /// Address of the HTTP endpoints: `/metrics` (Prometheus), `/healthz`
    /// (liveness) and `/readyz` (ready once every loaded module's resources are
    /// registered with kubelet). On by default, as kubelet's probes need it; in
    /// a pod it is reachable on the pod's network only. `off` turns it off;
    /// port 0 picks a free port (logged).
    #[arg(
        long,
        default_value = DEFAULT_METRICS_ADDR,
        env = "WDP_METRICS_ADDR",
        value_parser = metrics_addr,
        value_name = "ADDR|off"
    )]
    pub metrics_addr: MetricsAddr,
    /// Host settings.
    #[command(flatten)]
    pub host: HostArgs,
    /// DRA settings.
    #[command(flatten)]
    pub dra: DraArgs,
}

/// What resources served through DRA (`api = "dra"` in a manifest) need. Unused,
/// and nothing of DRA started, while no resource asks for it.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Dynamic Resource Allocation (resources with api = \"dra\")")]
pub struct DraArgs {
    /// This node's name, as the API server knows it: the pool name of every DRA
    /// driver's ResourceSlices, and the Node that owns them. Required once a
    /// resource is served through DRA; deploy/ sets NODE_NAME from the pod's
    /// spec.nodeName.
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
    /// Kubeconfig for the API server (ResourceSlices, ResourceClaims, the Node).
    /// Without it: the pod's service account when in a cluster, else
    /// $KUBECONFIG or ~/.kube/config.
    #[arg(long, env = "KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// kubelet's plugin-watcher directory, where each DRA driver's registration
    /// socket goes (<kubelet root>/plugins_registry).
    #[arg(long, default_value = crate::app::DEFAULT_REGISTRY_DIR, env = "WDP_KUBELET_REGISTRY_DIR", value_name = "DIR")]
    pub kubelet_registry_dir: PathBuf,
    /// kubelet's plugins directory: each DRA driver listens in
    /// <dir>/<driver>/dra.sock (<kubelet root>/plugins).
    #[arg(long, default_value = crate::app::DEFAULT_PLUGINS_DIR, env = "WDP_KUBELET_PLUGINS_DIR", value_name = "DIR")]
    pub kubelet_plugins_dir: PathBuf,
    /// Where the host keeps state across restarts: the claims each DRA driver
    /// has prepared (dra/<driver>.json), so that kubelet can unprepare them
    /// after a restart. Created if missing; keep it on the node (a hostPath).
    #[arg(long, default_value = crate::app::DEFAULT_STATE_DIR, env = "WDP_STATE_DIR", value_name = "DIR")]
    pub state_dir: PathBuf,
    /// The host pod's UID. When set, socket names carry it (as upstream's DRA
    /// helper does for rolling updates), so a new host pod can register beside
    /// the old one; deploy/ sets POD_UID from metadata.uid.
    #[arg(long, env = "POD_UID", value_name = "UID")]
    pub pod_uid: Option<String>,
}

impl DraArgs {
    /// As the host takes them.
    pub fn dra_config(&self) -> DraConfig {
        DraConfig {
            node_name: self.node_name.clone().filter(|n| !n.is_empty()),
            kubeconfig: self
                .kubeconfig
                .clone()
                .filter(|p| !p.as_os_str().is_empty()),
            registry_dir: self.kubelet_registry_dir.clone(),
            plugins_dir: self.kubelet_plugins_dir.clone(),
            state_dir: self.state_dir.clone(),
            pod_uid: self.pod_uid.clone().filter(|u| !u.is_empty()),
        }
    }
}

/// `demo` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Directory of `*.wasm` modules to demonstrate (`cargo xtask demo` builds the
    /// shipped guests and passes their directory).
    #[arg(long, env = "WDP_MODULES_DIR")]
    pub modules_dir: PathBuf,
    /// Kubeconfig of a throwaway API server, to show the DRA half: after the
    /// device-plugin half, the module serving example.com/dev-1 (the shipped
    /// virtual-devices guest) is switched to DRA by rewriting its manifest live;
    /// the demo creates a Node for its simulated node, prints the ResourceSlices
    /// the host publishes, creates and allocates a ResourceClaim (playing the
    /// scheduler), prepares and unprepares it through the driver, and deletes
    /// what it created. kube-apiserver and etcd suffice (no kubelet, scheduler or
    /// controllers); `cargo xtask demo` starts them and passes this. Deliberately
    /// not read from $KUBECONFIG: the demo writes a Node. Without it the DRA half
    /// is skipped.
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Host settings.
    #[command(flatten)]
    pub host: HostArgs,
}

/// The module file and manifest that `validate` and `allocate` read, and how
/// they judge it.
#[derive(Debug, Clone, clap::Args)]
pub struct ModuleFileArgs {
    /// The module: a `.wasm` component, as it would be put in the modules
    /// directory. Its name (in messages) is the file name without `.wasm`.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// The module's manifest. Default: `<name>.toml` beside FILE, if there is
    /// one, as the host reads it; otherwise the flags alone, as for a module
    /// without a manifest.
    #[arg(long, value_name = "TOML", conflicts_with = "no_manifest")]
    pub manifest: Option<PathBuf>,
    /// Use no manifest, not even `<name>.toml` beside FILE.
    #[arg(long)]
    pub no_manifest: bool,
    /// Print one JSON document on stdout instead of text (see the README for
    /// its shape); also on failure, with the reason in `error`.
    #[arg(long)]
    pub json: bool,
    /// Kubelet's device-plugin directory. Nothing is written there; like the
    /// host, an allocation may never hand out a path in it.
    #[arg(long, default_value = DEFAULT_KUBELET_DIR, env = "WDP_KUBELET_DIR")]
    pub kubelet_dir: PathBuf,
    /// The CDI spec directory `run` would write a resource's spec to, for the
    /// path shown with the spec of each resource with `cdi`. Nothing is written.
    #[arg(long, default_value = crate::cdi::DEFAULT_DIR, env = "WDP_CDI_DIR")]
    pub cdi_dir: PathBuf,
    /// Domain and limits, as for `run`.
    #[command(flatten)]
    pub module: ModuleArgs,
}

/// `validate` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ValidateArgs {
    /// The module and how to judge it.
    #[command(flatten)]
    pub target: ModuleFileArgs,
}

/// `allocate` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct AllocateArgs {
    /// The resource to allocate from: its full name (`example.com/dev-1`), the
    /// kind name the module reports (`dev-1`), or a name the module's domain
    /// completes (`gpu` for a kind the manifest renamed to `example.com/gpu`).
    #[arg(long, value_name = "RESOURCE")]
    pub resource: String,
    /// Device ids for one container, comma-separated (`a,b`), as kubelet would
    /// name them (with `replicas`, the advertised ids such as `a::0`). Repeat
    /// the flag for each further container of the pod.
    #[arg(long = "devices", value_name = "IDS", required = true, value_parser = device_ids)]
    pub containers: Vec<DeviceIds>,
    /// The module and how to judge it.
    #[command(flatten)]
    pub target: ModuleFileArgs,
}

/// Where the metrics and probes are served, if at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsAddr(pub Option<SocketAddr>);

/// `host:port` (an IP address, v4 or `[v6]`), or `off`.
fn metrics_addr(raw: &str) -> Result<MetricsAddr, String> {
    if raw == "off" {
        return Ok(MetricsAddr(None));
    }
    raw.parse::<SocketAddr>()
        .map(|a| MetricsAddr(Some(a)))
        .map_err(|_| {
            "expected an IP address and port (`0.0.0.0:9477`, `127.0.0.1:0`, `[::]:9477`) or `off`"
                .into()
        })
}

/// The device ids one container asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIds(pub Vec<String>);

/// `a,b,c`: device ids, none of them empty.
fn device_ids(raw: &str) -> Result<DeviceIds, String> {
    let ids: Vec<String> = raw.split(',').map(str::to_string).collect();
    if ids.iter().any(String::is_empty) {
        return Err("expected device ids separated by commas, none of them empty".into());
    }
    Ok(DeviceIds(ids))
}

/// A duration such as `500ms`, `10s` or `1m`, greater than zero.
fn positive_duration(raw: &str) -> Result<Duration, String> {
    match humantime::parse_duration(raw) {
        Ok(d) if d.is_zero() => Err("must be greater than zero".into()),
        Ok(d) if d > MAX_DURATION => Err(format!(
            "must be at most {}",
            humantime::format_duration(MAX_DURATION)
        )),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

impl ModuleArgs {
    /// The limits of every call.
    pub fn limits(&self) -> Limits {
        Limits {
            memory_bytes: usize::try_from(self.memory_limit_mib)
                .unwrap_or(usize::MAX)
                .saturating_mul(1024 * 1024),
            scan_deadline: self.scan_timeout,
            allocate_deadline: self.allocate_timeout,
        }
    }
}

impl HostArgs {
    /// The registry settings these flags describe, serving into `kubelet_dir`
    /// and writing CDI specs into `cdi_dir`.
    pub fn settings(&self, kubelet_dir: PathBuf, cdi_dir: PathBuf) -> Settings {
        Settings {
            kubelet_dir,
            cdi_dir,
            default_domain: self.module.domain.clone(),
            health_interval: self.health_interval,
            scan_interval: self.scan_interval,
            limits: self.module.limits(),
        }
    }
}

impl ModuleFileArgs {
    /// The registry settings a module is judged with: the flags, `--kubelet-dir`
    /// and the default intervals (a one-off check runs no periodic calls).
    pub fn settings(&self) -> Settings {
        let default = |raw| positive_duration(raw).unwrap_or(Duration::from_secs(10));
        Settings {
            kubelet_dir: self.kubelet_dir.clone(),
            cdi_dir: self.cdi_dir.clone(),
            default_domain: self.module.domain.clone(),
            health_interval: default(DEFAULT_HEALTH_INTERVAL),
            scan_interval: default(DEFAULT_SCAN_INTERVAL),
            limits: self.module.limits(),
        }
    }
}

impl RunArgs {
    /// The host configuration.
    pub fn host_config(&self) -> HostConfig {
        HostConfig {
            modules_dir: self.modules_dir.clone(),
            cache_dir: (!self.no_cache).then(|| self.cache_dir.clone()),
            settle: DEFAULT_SETTLE,
            settings: self
                .host
                .settings(self.kubelet_dir.clone(), self.cdi_dir.clone()),
            dra: self.dra.dra_config(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    /// The flags documented in the table of the README section `heading`.
    fn readme_flags(heading: &str) -> Vec<String> {
        let readme = include_str!("../../README.md");
        let section = readme
            .split_once(&format!("\n{heading}\n"))
            .map(|(_, rest)| rest)
            .unwrap_or_else(|| panic!("README has no section {heading:?}"));
        let section = section.split("\n#").next().unwrap_or(section);
        let mut documented: Vec<String> = section
            .lines()
            .filter_map(|l| l.strip_prefix("| `--"))
            .filter_map(|l| l.split([' ', '`']).next())
            .map(str::to_string)
            .collect();
        documented.sort();
        documented
    }

    /// The long flags of `subcommand`, global ones included.
    fn flags_of(subcommand: &str) -> Vec<String> {
        let mut cli = Cli::command();
        cli.build();
        let sub = cli.find_subcommand(subcommand).expect("subcommand");
        let mut flags: Vec<String> = sub
            .get_arguments()
            .filter_map(|a| a.get_long())
            .filter(|l| !matches!(*l, "help" | "version"))
            .map(str::to_string)
            .collect();
        flags.sort();
        flags
    }

    /// The README's flag table lists exactly the flags `run` takes.
    #[test]
    fn readme_documents_every_run_flag() {
        assert_eq!(readme_flags("### Flags"), flags_of("run"));
    }

    /// The README's table for `validate` and `allocate` lists exactly their flags.
    #[test]
    fn readme_documents_every_check_flag() {
        let mut flags = flags_of("validate");
        flags.extend(flags_of("allocate"));
        flags.sort();
        flags.dedup();
        assert_eq!(
            readme_flags("### Flags of `validate` and `allocate`"),
            flags
        );
    }

    #[test]
    fn allocate_takes_one_devices_flag_per_container() {
        let cli = Cli::try_parse_from([
            "wasm-device-plugin",
            "allocate",
            "m.wasm",
            "--resource",
            "dev-1",
            "--devices",
            "a,b",
            "--devices",
            "c",
        ])
        .expect("parses");
        let Command::Allocate(args) = cli.command else {
            panic!("not allocate")
        };
        assert_eq!(
            args.containers,
            [
                DeviceIds(vec!["a".into(), "b".into()]),
                DeviceIds(vec!["c".into()])
            ]
        );
        assert_eq!(args.target.file, PathBuf::from("m.wasm"));
        for bad in [&["--devices", "a,,b"][..], &["--devices", ""], &[]] {
            let mut argv = vec![
                "wasm-device-plugin",
                "allocate",
                "m.wasm",
                "--resource",
                "r",
            ];
            argv.extend_from_slice(bad);
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?} accepted");
        }
        assert!(
            Cli::try_parse_from([
                "wasm-device-plugin",
                "validate",
                "m.wasm",
                "--manifest",
                "m.toml",
                "--no-manifest"
            ])
            .is_err(),
            "--manifest with --no-manifest"
        );
    }

    #[test]
    fn zero_or_malformed_durations_are_refused() {
        for bad in ["0s", "ten seconds", "-1s", "366d", "300000000000years"] {
            let parsed =
                Cli::try_parse_from(["wasm-device-plugin", "run", "--health-interval", bad]);
            assert!(parsed.is_err(), "{bad} accepted");
        }
        for bad in ["0", "4097"] {
            let parsed =
                Cli::try_parse_from(["wasm-device-plugin", "run", "--memory-limit-mib", bad]);
            assert!(parsed.is_err(), "memory limit {bad} accepted");
        }
        let parsed = Cli::try_parse_from(["wasm-device-plugin", "run", "--scan-interval", "1m30s"])
            .expect("parses");
        let Command::Run(args) = parsed.command else {
            panic!("not run")
        };
        assert_eq!(args.host.scan_interval, Duration::from_secs(90));
    }

    #[test]
    fn run_defaults() {
        let cli = Cli::try_parse_from(["wasm-device-plugin", "run"]).expect("parses");
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        let config = args.host_config();
        assert_eq!(
            config.settings.kubelet_dir,
            PathBuf::from(DEFAULT_KUBELET_DIR)
        );
        assert_eq!(config.settings.health_interval, Duration::from_secs(10));
        assert_eq!(config.settings.limits.memory_bytes, 64 * 1024 * 1024);
        assert_eq!(config.settings.cdi_dir, PathBuf::from("/var/run/cdi"));
    }
}
