//! The optional manifest beside a module (`<name>.toml` next to `<name>.wasm`):
//! what the operator decides about a module, parsed and checked in one place.
//!
//! ```toml
//! domain = "vendor.example"          # default: --domain
//! cdi = true                         # write a CDI spec per resource (default false)
//! api = "device-plugin"              # which kubelet API serves each kind: "device-plugin"
//!                                    # (the default) or "dra"
//! scan-interval = "60s"              # default: --scan-interval
//! health-interval = "10s"            # default: --health-interval
//!
//! [limits]
//! memory-mib = 64                    # default: --memory-limit-mib
//! allocate-timeout = "1s"            # default: --allocate-timeout
//! scan-timeout = "10s"               # default: --scan-timeout
//!
//! [grants]
//! read-only-dirs = ["/sys/class/fpga_region"]
//! device-paths = ["/dev/fpga"]       # host paths device nodes may use (default ["/dev"])
//! mount-paths = []                   # host paths mounts may use (default none)
//!
//! [config]                           # handed to the guest (`host.config`)
//! kinds = "dev-1=4"
//!
//! [resources."*"]                    # defaults for every kind
//! unhealthy-after = 3
//!
//! [resources.dev-1]                  # the kind name the module reports
//! name = "gpu"                       # served as <domain>/gpu (or a full domain/name)
//! replicas = 4
//! cdi = false                        # this kind without CDI, whatever the top says
//!
//! [resources.dev-2]
//! api = "dra"                        # served as a DRA driver instead
//! driver = "dev-2.vendor.example"    # its driver name (default: <name>.<domain>)
//! healthy-after = 2
//! ```
//!
//! Parsing is strict: an unknown key, a wrong type or an out-of-range value is an
//! error naming the file and the field, never silently ignored. Knows nothing of
//! running modules; `module` applies what this returns.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::domain::{ResourceName, ResourceNameError};
use crate::grants::{DEFAULT_DEVICE_PATH, Grants};
use crate::registry::Settings;
use crate::runtime::{CallSettings, Limits, ModuleConfig};

/// Largest `replicas` value.
pub const MAX_REPLICAS: u32 = 1000;
/// Largest `healthy-after` / `unhealthy-after` value.
pub const MAX_HYSTERESIS: u32 = 1000;
/// The `resources` key whose settings apply to every kind without its own entry.
pub const ALL_KINDS: &str = "*";
/// Longest interval or timeout (humantime's `1year`). Each is added to the current
/// instant for a timer or a call deadline, which panics when the sum overflows
/// (`"300000000000years"` parses); no real setting comes near this.
pub const MAX_DURATION: Duration = Duration::from_secs(31_557_600);

/// A manifest that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("manifest {}: {field}: {message}", file.display())]
pub struct ManifestError {
    /// The manifest file.
    pub file: PathBuf,
    /// The field at fault (`limits.memory-mib`, `resources.dev-1.replicas`), or
    /// where parsing stopped (`line 3`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawManifest {
    domain: Option<String>,
    cdi: Option<bool>,
    api: Option<Api>,
    scan_interval: Option<String>,
    health_interval: Option<String>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    grants: RawGrants,
    #[serde(default)]
    config: BTreeMap<String, ConfigValue>,
    #[serde(default)]
    resources: BTreeMap<String, RawResource>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawLimits {
    memory_mib: Option<u32>,
    allocate_timeout: Option<String>,
    scan_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawGrants {
    #[serde(default)]
    read_only_dirs: Vec<PathBuf>,
    device_paths: Option<Vec<PathBuf>>,
    #[serde(default)]
    mount_paths: Vec<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawResource {
    name: Option<String>,
    replicas: Option<u32>,
    unhealthy_after: Option<u32>,
    healthy_after: Option<u32>,
    cdi: Option<bool>,
    api: Option<Api>,
    driver: Option<String>,
}

/// A `[config]` value: strings as they are; numbers and booleans are handed to
/// the guest in their TOML spelling.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ConfigValue {
    String(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
}

impl fmt::Display for ConfigValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigValue::String(s) => f.write_str(s),
            ConfigValue::Integer(i) => write!(f, "{i}"),
            ConfigValue::Float(x) => write!(f, "{x}"),
            ConfigValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// How one resource is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourcePolicy {
    /// The resource name to serve the kind as, instead of `<domain>/<kind>`:
    /// bare (`gpu`, prefixed with the domain) or full (`vendor.example/gpu`).
    pub name: Option<String>,
    /// How many times each device is advertised (`1`: once, under its own id).
    pub replicas: u32,
    /// Consecutive unhealthy answers that mark a healthy device unhealthy.
    pub unhealthy_after: u32,
    /// Consecutive healthy answers that bring an unhealthy device back.
    pub healthy_after: u32,
    /// Whether the host writes a CDI spec for the resource and Allocate names
    /// its CDI devices (see [`crate::cdi`]).
    pub cdi: bool,
    /// Which kubelet API serves the resource.
    pub api: Api,
    /// With [`Api::Dra`]: the driver name, when the manifest sets one (the
    /// default is derived from the resource name, [`crate::frontend::default_driver`]).
    pub driver: Option<String>,
}

impl ResourcePolicy {
    /// Whether the host writes a CDI spec for the resource as a whole: with
    /// `cdi` on, through the device-plugin API (DRA writes a spec per claim).
    pub fn resource_spec(&self) -> bool {
        self.cdi && self.api == Api::DevicePlugin
    }
}

/// Which kubelet API serves a resource (the manifest's `api`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Api {
    /// The v1beta1 device-plugin API: the host registers the resource with
    /// kubelet, which advertises it as an extended resource.
    #[default]
    DevicePlugin,
    /// Dynamic Resource Allocation: the host publishes ResourceSlices and
    /// prepares ResourceClaims as a DRA kubelet plugin.
    Dra,
}

impl Default for ResourcePolicy {
    fn default() -> Self {
        Self {
            name: None,
            replicas: 1,
            unhealthy_after: 1,
            healthy_after: 1,
            cdi: false,
            api: Api::DevicePlugin,
            driver: None,
        }
    }
}

/// A module's settings: the manifest (if any) over the host's flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleSettings {
    /// Domain given to bare kind names.
    pub domain: String,
    /// How often `scan` runs again.
    pub scan_interval: Duration,
    /// How often `health` runs.
    pub health_interval: Duration,
    /// Limits, configuration and grants of every call.
    pub call: CallSettings,
    /// Per kind, as the module names it.
    pub resources: BTreeMap<String, ResourcePolicy>,
    /// For kinds without an entry.
    pub default_resource: ResourcePolicy,
}

impl ModuleSettings {
    /// The host's flags alone: what a module without a manifest runs with.
    pub fn defaults(settings: &Settings) -> Self {
        Self {
            domain: settings.default_domain.clone(),
            scan_interval: settings.scan_interval,
            health_interval: settings.health_interval,
            call: CallSettings {
                limits: settings.limits,
                config: ModuleConfig::new(),
                grants: Grants::default().protecting(&settings.kubelet_dir),
            },
            resources: BTreeMap::new(),
            default_resource: ResourcePolicy::default(),
        }
    }

    /// How the kind `kind` is served.
    pub fn resource(&self, kind: &str) -> &ResourcePolicy {
        self.resources.get(kind).unwrap_or(&self.default_resource)
    }

    /// The resource name for `kind`: the manifest's `name` or the kind itself,
    /// under this module's domain unless it names its own.
    ///
    /// # Errors
    /// The result is not a valid extended resource name.
    pub fn resource_name(&self, kind: &str) -> Result<ResourceName, ResourceNameError> {
        let name = self.resource(kind).name.as_deref().unwrap_or(kind);
        ResourceName::for_kind(&self.domain, name)
    }
}

/// Parses the manifest `text` (read from `file`) over the host's `settings`.
///
/// # Errors
/// [`ManifestError`] for the first field that is unknown, mistyped or out of range.
pub fn parse(
    file: &Path,
    text: &str,
    settings: &Settings,
) -> Result<ModuleSettings, ManifestError> {
    let err = |field: &str, message: String| ManifestError {
        file: file.to_path_buf(),
        field: field.to_string(),
        message,
    };
    let raw: RawManifest = toml::from_str(text).map_err(|e| {
        let field = e
            .span()
            .map(|span| {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                format!("line {line}")
            })
            .unwrap_or_else(|| "file".to_string());
        err(&field, e.message().trim().to_string())
    })?;

    let mut out = ModuleSettings::defaults(settings);
    if let Some(domain) = raw.domain {
        ResourceName::parse(&format!("{domain}/x")).map_err(|_| {
            err(
                "domain",
                format!("`{domain}` is not a DNS subdomain other than kubernetes.io"),
            )
        })?;
        out.domain = domain;
    }
    let duration = |field: &str, raw: Option<String>, default: Duration| match raw {
        None => Ok(default),
        Some(text) => match humantime::parse_duration(&text) {
            Ok(d) if d.is_zero() => Err(err(field, "must be greater than zero".into())),
            Ok(d) if d > MAX_DURATION => Err(err(
                field,
                format!(
                    "`{text}` is longer than {}",
                    humantime::format_duration(MAX_DURATION)
                ),
            )),
            Ok(d) => Ok(d),
            Err(e) => Err(err(
                field,
                format!("`{text}`: {e} (e.g. \"500ms\", \"10s\")"),
            )),
        },
    };
    out.scan_interval = duration("scan-interval", raw.scan_interval, out.scan_interval)?;
    out.health_interval = duration("health-interval", raw.health_interval, out.health_interval)?;

    let limits = &mut out.call.limits;
    if let Some(mib) = raw.limits.memory_mib {
        if !(1..=4096).contains(&mib) {
            return Err(err(
                "limits.memory-mib",
                format!("{mib} is outside 1 to 4096"),
            ));
        }
        limits.memory_bytes = usize::try_from(mib)
            .unwrap_or(usize::MAX)
            .saturating_mul(1024 * 1024);
    }
    *limits = Limits {
        allocate_deadline: duration(
            "limits.allocate-timeout",
            raw.limits.allocate_timeout,
            limits.allocate_deadline,
        )?,
        scan_deadline: duration(
            "limits.scan-timeout",
            raw.limits.scan_timeout,
            limits.scan_deadline,
        )?,
        ..*limits
    };

    let paths = |field: &str, paths: Vec<PathBuf>| {
        paths
            .into_iter()
            .map(|p| {
                absolute_normal(&p).ok_or_else(|| {
                    err(
                        field,
                        format!(
                            "`{}` is not an absolute path without `.`, `..` or NUL",
                            p.display()
                        ),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let prefixes = |field: &str, raw: Vec<PathBuf>| {
        let prefixes = paths(field, raw)?;
        if prefixes.iter().any(|p| p == Path::new("/")) {
            return Err(err(
                field,
                "`/` would grant the whole host; name the directories instead".into(),
            ));
        }
        Ok(prefixes)
    };
    let device_paths = match raw.grants.device_paths {
        Some(given) => prefixes("grants.device-paths", given)?,
        None => vec![PathBuf::from(DEFAULT_DEVICE_PATH)],
    };
    out.call.grants = Grants::new(
        prefixes("grants.read-only-dirs", raw.grants.read_only_dirs)?,
        device_paths,
        prefixes("grants.mount-paths", raw.grants.mount_paths)?,
    )
    .protecting(&settings.kubelet_dir);

    out.call.config = raw
        .config
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .collect();

    let mut resources = raw.resources;
    // `cdi` at the top is the default of `[resources."*"]`, which is the
    // default of each kind's entry.
    let module_base = ResourcePolicy {
        cdi: raw.cdi.unwrap_or(false),
        api: raw.api.unwrap_or_default(),
        ..ResourcePolicy::default()
    };
    let base = match resources.remove(ALL_KINDS) {
        Some(all) => {
            if all.name.is_some() {
                return Err(err(
                    "resources.\"*\".name",
                    "a name cannot apply to every kind".into(),
                ));
            }
            if all.driver.is_some() {
                return Err(err(
                    "resources.\"*\".driver",
                    "a DRA driver name cannot apply to every kind".into(),
                ));
            }
            resource_policy("resources.\"*\"", all, &module_base, &err)?
        }
        None => module_base,
    };
    for (kind, raw) in resources {
        let field = format!("resources.{kind}");
        let policy = resource_policy(&field, raw, &base, &err)?;
        let name = policy.name.as_deref().unwrap_or(&kind);
        ResourceName::for_kind(&out.domain, name)
            .map_err(|e| err(&format!("{field}.name"), e.to_string()))?;
        out.resources.insert(kind, policy);
    }
    out.default_resource = base;
    Ok(out)
}

fn resource_policy(
    field: &str,
    raw: RawResource,
    base: &ResourcePolicy,
    err: &impl Fn(&str, String) -> ManifestError,
) -> Result<ResourcePolicy, ManifestError> {
    let bounded = |key: &str, value: Option<u32>, default: u32, max: u32| match value {
        None => Ok(default),
        Some(v) if (1..=max).contains(&v) => Ok(v),
        Some(v) => Err(err(
            &format!("{field}.{key}"),
            format!("{v} is outside 1 to {max}"),
        )),
    };
    let api = raw.api.unwrap_or(base.api);
    if let Some(driver) = &raw.driver {
        if api != Api::Dra {
            return Err(err(
                &format!("{field}.driver"),
                "a driver name needs api = \"dra\"".into(),
            ));
        }
        crate::frontend::check_driver_name(driver)
            .map_err(|e| err(&format!("{field}.driver"), e))?;
    }
    let replicas = bounded("replicas", raw.replicas, base.replicas, MAX_REPLICAS)?;
    if api == Api::Dra && replicas > 1 {
        return Err(err(
            &format!("{field}.replicas"),
            format!(
                "{replicas} replicas cannot be served through DRA: a claim gets a whole device \
                 (serve the kind through the device-plugin API to share it)"
            ),
        ));
    }
    Ok(ResourcePolicy {
        name: raw.name,
        api,
        driver: raw.driver,
        replicas,
        unhealthy_after: bounded(
            "unhealthy-after",
            raw.unhealthy_after,
            base.unhealthy_after,
            MAX_HYSTERESIS,
        )?,
        healthy_after: bounded(
            "healthy-after",
            raw.healthy_after,
            base.healthy_after,
            MAX_HYSTERESIS,
        )?,
        cdi: raw.cdi.unwrap_or(base.cdi),
    })
}

/// `path` if it is absolute and has no `.` or `..` parts, with repeated and
/// trailing slashes dropped. A NUL cannot be in a host path, so a grant holding
/// one would silently match nothing: refused too.
fn absolute_normal(path: &Path) -> Option<PathBuf> {
    if !path.is_absolute() || path.as_os_str().as_encoded_bytes().contains(&0) {
        return None;
    }
    let mut out = PathBuf::from("/");
    for part in path.components() {
        match part {
            Component::RootDir => {}
            Component::Normal(p) => out.push(p),
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            kubelet_dir: "/k".into(),
            default_domain: "example.com".into(),
            health_interval: Duration::from_secs(10),
            scan_interval: Duration::from_secs(60),
            limits: Limits::default(),
            cdi_dir: "/c".into(),
        }
    }

    fn parse_ok(text: &str) -> ModuleSettings {
        parse(Path::new("m.toml"), text, &settings()).expect("valid manifest")
    }

    fn parse_err(text: &str) -> ManifestError {
        parse(Path::new("m.toml"), text, &settings()).expect_err("invalid manifest")
    }

    #[test]
    fn empty_manifest_is_the_host_defaults() {
        assert_eq!(parse_ok(""), ModuleSettings::defaults(&settings()));
    }

    #[test]
    fn full_manifest_overrides_every_default() {
        let m = parse_ok(
            r#"
            domain = "vendor.example"
            scan-interval = "2m"
            health-interval = "500ms"
            [limits]
            memory-mib = 16
            allocate-timeout = "250ms"
            scan-timeout = "3s"
            [grants]
            read-only-dirs = ["/sys/class/fpga_region/"]
            device-paths = ["/dev/fpga"]
            [config]
            kinds = "dev-1=4"
            count = 3
            verbose = true
            [resources."*"]
            unhealthy-after = 3
            [resources.dev-1]
            name = "gpu"
            replicas = 4
            "#,
        );
        assert_eq!(m.domain, "vendor.example");
        assert_eq!(m.scan_interval, Duration::from_secs(120));
        assert_eq!(m.health_interval, Duration::from_millis(500));
        assert_eq!(m.call.limits.memory_bytes, 16 << 20);
        assert_eq!(m.call.limits.allocate_deadline, Duration::from_millis(250));
        assert_eq!(m.call.limits.scan_deadline, Duration::from_secs(3));
        assert_eq!(
            m.call.grants.read_only_dirs(),
            vec![PathBuf::from("/sys/class/fpga_region")]
        );
        assert_eq!(
            m.call.grants.device_paths().collect::<Vec<_>>(),
            [Path::new("/dev/fpga")]
        );
        assert_eq!(m.call.config["count"], "3");
        assert_eq!(m.call.config["verbose"], "true");
        let dev1 = m.resource("dev-1");
        assert_eq!(
            (dev1.replicas, dev1.unhealthy_after, dev1.healthy_after),
            (4, 3, 1)
        );
        assert_eq!(
            m.resource_name("dev-1").expect("name").as_str(),
            "vendor.example/gpu"
        );
        assert_eq!(m.resource("other").unhealthy_after, 3);
        assert_eq!(
            m.resource_name("other").expect("name").as_str(),
            "vendor.example/other"
        );
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("colour = 1", "line 1"),
            ("[limits]\nmemory-mib = 0", "limits.memory-mib"),
            ("[limits]\nmemory-mib = \"lots\"", "line 2"),
            ("scan-interval = \"0s\"", "scan-interval"),
            ("health-interval = \"soon\"", "health-interval"),
            ("domain = \"kubernetes.io\"", "domain"),
            (
                "[grants]\nread-only-dirs = [\"sys\"]",
                "grants.read-only-dirs",
            ),
            (
                "[grants]\nmount-paths = [\"/var/../etc\"]",
                "grants.mount-paths",
            ),
            ("[grants]\nmount-paths = [\"/\"]", "grants.mount-paths"),
            (
                "[grants]\nread-only-dirs = [\"/\"]",
                "grants.read-only-dirs",
            ),
            ("[grants]\ndevice-paths = [\"//\"]", "grants.device-paths"),
            (
                "[resources.dev-1]\nreplicas = 0",
                "resources.dev-1.replicas",
            ),
            (
                "[resources.dev-1]\nhealthy-after = 1001",
                "resources.dev-1.healthy-after",
            ),
            (
                "[resources.dev-1]\nname = \"Bad Name\"",
                "resources.dev-1.name",
            ),
            ("[resources.\"*\"]\nname = \"x\"", "resources.\"*\".name"),
            ("[resources.dev-1]\nreplica = 2", "line 2"),
        ];
        for (text, field) in cases {
            let e = parse_err(text);
            assert_eq!(e.field, field, "{text}: {e}");
            assert!(e.to_string().starts_with("manifest m.toml: "), "{e}");
        }
    }

    /// The manifests the README and `examples/` show are valid.
    #[test]
    fn documented_manifests_parse() {
        let readme = include_str!("../../../README.md");
        let section = readme
            .split("### Manifests")
            .nth(1)
            .expect("README has a Manifests section");
        let block = section
            .split("```toml\n")
            .nth(1)
            .and_then(|b| b.split("```").next())
            .expect("a toml block");
        let m = parse_ok(block);
        assert_eq!(m.resource("dev-1").replicas, 4);
        let example = parse_ok(include_str!(
            "../../../examples/modules/virtual_devices.toml"
        ));
        assert_eq!(
            m.resource_name("dev-1").expect("name").as_str(),
            "vendor.example/gpu"
        );
        assert_eq!(example.resource("gpu").replicas, 4);
        // The other shipped guests' examples parse too (their tests load them).
        let generic = parse_ok(include_str!("../../../examples/modules/generic.toml"));
        assert_eq!(generic.resource("audio").replicas, 4);
        let fpga = parse_ok(include_str!("../../../examples/modules/fpga.toml"));
        assert_eq!(
            fpga.call.config.get("mode").map(String::as_str),
            Some("region")
        );
    }

    #[test]
    fn grant_paths_with_nul_are_refused() {
        for (text, field) in [
            (
                "[grants]\ndevice-paths = [\"/dev/fpga\\u0000x\"]",
                "grants.device-paths",
            ),
            (
                "[grants]\nmount-paths = [\"/opt\\u0000\"]",
                "grants.mount-paths",
            ),
            (
                "[grants]\nread-only-dirs = [\"/sys\\u0000\"]",
                "grants.read-only-dirs",
            ),
        ] {
            assert_eq!(parse_err(text).field, field, "{text}");
        }
    }

    #[test]
    fn durations_longer_than_a_year_are_refused() {
        for (text, field) in [
            ("scan-interval = \"300000000000years\"", "scan-interval"),
            ("health-interval = \"2years\"", "health-interval"),
            (
                "[limits]\nallocate-timeout = \"300000000000years\"",
                "limits.allocate-timeout",
            ),
            ("[limits]\nscan-timeout = \"366d\"", "limits.scan-timeout"),
        ] {
            assert_eq!(parse_err(text).field, field, "{text}");
        }
        assert_eq!(
            parse_ok("scan-interval = \"1year\"").scan_interval,
            MAX_DURATION
        );
    }

    #[test]
    fn the_device_plugin_api_is_the_default_and_the_nearest_api_wins() {
        assert_eq!(parse_ok("").resource("any").api, Api::DevicePlugin);
        let m = parse_ok(
            "api = \"dra\"\n[resources.old]\napi = \"device-plugin\"\nreplicas = 2\n[resources.gpu]\ndriver = \"gpu.vendor.example\"",
        );
        assert_eq!(m.resource("any").api, Api::Dra);
        assert_eq!(m.resource("old").api, Api::DevicePlugin);
        let gpu = m.resource("gpu");
        assert_eq!(
            (gpu.api, gpu.driver.as_deref()),
            (Api::Dra, Some("gpu.vendor.example"))
        );
        // DRA delivers through a spec per claim: a resource spec would be unused.
        assert!(
            !parse_ok("cdi = true\napi = \"dra\"")
                .resource("x")
                .resource_spec()
        );
        let m = parse_ok("cdi = true\napi = \"dra\"\n[resources.dp]\napi = \"device-plugin\"");
        assert!(m.resource("dp").resource_spec());
        assert_eq!(parse_err("api = \"grpc\"").field, "line 1");
    }

    #[test]
    fn dra_settings_that_cannot_work_are_refused_naming_the_field() {
        let err = parse_err("[resources.gpu]\ndriver = \"gpu.vendor.example\"");
        assert_eq!(err.field, "resources.gpu.driver");
        assert!(err.message.contains("api = \"dra\""), "{err}");
        let err = parse_err("api = \"dra\"\n[resources.gpu]\ndriver = \"GPU_1\"");
        assert_eq!(err.field, "resources.gpu.driver");
        let err = parse_err("api = \"dra\"\n[resources.gpu]\nreplicas = 4");
        assert_eq!(err.field, "resources.gpu.replicas");
        assert!(err.message.contains("DRA"), "{err}");
        let err = parse_err("api = \"dra\"\n[resources.\"*\"]\ndriver = \"a.example\"");
        assert_eq!(err.field, "resources.\"*\".driver");
    }

    #[test]
    fn cdi_is_off_by_default_and_the_nearest_setting_wins() {
        assert!(!parse_ok("").resource("any").cdi);
        let all = parse_ok("cdi = true");
        assert!(all.resource("any").cdi);
        let m = parse_ok(
            "cdi = true\n[resources.\"*\"]\nreplicas = 2\n[resources.off]\ncdi = false\n[resources.gpu]\nname = \"g\"",
        );
        assert!(
            m.resource("any").cdi,
            "the top's value reaches kinds without an entry"
        );
        assert!(m.resource("gpu").cdi, "and kinds whose entry does not say");
        assert!(!m.resource("off").cdi);
        let m = parse_ok("[resources.\"*\"]\ncdi = true\n[resources.dev]\nreplicas = 2");
        assert!(m.resource("dev").cdi && m.resource("other").cdi);
        assert_eq!(parse_err("cdi = \"yes\"").field, "line 1");
        assert_eq!(parse_err("[resources.x]\ncdi = 1").field, "line 2");
    }

    #[test]
    fn unknown_key_message_names_it() {
        let e = parse_err("[resources.dev-1]\nreplica = 2");
        assert!(e.message.contains("replica"), "{e}");
    }
}
