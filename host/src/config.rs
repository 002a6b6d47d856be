//! The command line: clap arguments and their conversion into plain config
//! structs. The only place that reads flags or environment variables.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::app::{DEFAULT_SETTLE, HostConfig};
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
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Settings shared by `run` and `demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct HostArgs {
    /// Domain prefixed to a module's bare kind names: kind `dev-1` is served as
    /// resource `<domain>/dev-1`. Kinds that already hold a `/` are used as they
    /// are. Set a domain you own; `example.com` is for trying things out.
    #[arg(long, default_value = DEFAULT_DOMAIN, env = "WDP_DOMAIN")]
    pub domain: String,
    /// How often each module's `health` runs (e.g. `500ms`, `10s`, `1m`).
    #[arg(long, default_value = "10s", value_parser = positive_duration)]
    pub health_interval: Duration,
    /// How often each module's `scan` runs again to find added or removed devices.
    #[arg(long, default_value = "60s", value_parser = positive_duration)]
    pub scan_interval: Duration,
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
    /// Host settings.
    #[command(flatten)]
    pub host: HostArgs,
}

/// `demo` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Directory of `*.wasm` modules to demonstrate (`cargo xtask demo` builds the
    /// shipped guests and passes their directory).
    #[arg(long, env = "WDP_MODULES_DIR")]
    pub modules_dir: PathBuf,
    /// Host settings.
    #[command(flatten)]
    pub host: HostArgs,
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

impl HostArgs {
    /// The registry settings these flags describe, serving into `kubelet_dir`.
    pub fn settings(&self, kubelet_dir: PathBuf) -> Settings {
        Settings {
            kubelet_dir,
            default_domain: self.domain.clone(),
            health_interval: self.health_interval,
            scan_interval: self.scan_interval,
            limits: Limits {
                memory_bytes: usize::try_from(self.memory_limit_mib)
                    .unwrap_or(usize::MAX)
                    .saturating_mul(1024 * 1024),
                scan_deadline: self.scan_timeout,
                allocate_deadline: self.allocate_timeout,
            },
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
            settings: self.host.settings(self.kubelet_dir.clone()),
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

    /// The README's flag table lists exactly the flags `run` takes.
    #[test]
    fn readme_documents_every_run_flag() {
        let readme = include_str!("../../README.md");
        let mut documented: Vec<String> = readme
            .lines()
            .filter_map(|l| l.strip_prefix("| `--"))
            .filter_map(|l| l.split([' ', '`']).next())
            .map(str::to_string)
            .collect();
        documented.sort();
        let mut cli = Cli::command();
        cli.build();
        let run = cli.find_subcommand("run").expect("run subcommand");
        let mut flags: Vec<String> = run
            .get_arguments()
            .filter_map(|a| a.get_long())
            .filter(|l| !matches!(*l, "help" | "version"))
            .map(str::to_string)
            .collect();
        flags.sort();
        assert_eq!(documented, flags);
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
    }
}
