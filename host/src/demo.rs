//! `wasm-device-plugin demo`: the host and the kubelet simulator in one process,
//! over real sockets in a temporary directory. Prints what kubelet receives
//! (registrations, ListAndWatch), what a pod gets (Allocate responses) and the
//! CDI specs the host wrote for resources served with CDI. With `--kubeconfig`
//! (of a throwaway API server) it then serves the virtual guest's
//! `example.com/dev-1` as a DRA driver too ([`dra`]); without, it says how to
//! see that.

#[cfg(feature = "dra")]
pub mod dra;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::app::{Host, HostConfig};
use crate::config::DemoArgs;
use crate::kubelet::deviceplugin::server::allocation_from_wire;
use crate::kubelet::deviceplugin::simulator::Simulator;
use crate::registry::ModuleState;

/// How long modules may take to load and register in the demo.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the demo, writing its report to `out`.
///
/// # Errors
/// No module could be served, or a step did not complete in time.
pub async fn run(args: &DemoArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("wdp-demo")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let kubelet_dir = dir.path().join("kubelet");
    std::fs::create_dir(&kubelet_dir).context("cannot create the kubelet directory")?;
    let cdi_dir = dir.path().join("cdi");
    std::fs::create_dir(&cdi_dir).context("cannot create the CDI spec directory")?;
    let (modules_dir, simulated) = stage(&args.modules_dir, dir.path())?;
    #[cfg(feature = "dra")]
    let (mut cluster, dra) = match &args.kubeconfig {
        Some(kubeconfig) => {
            let (cluster, dra) = dra::Cluster::connect(kubeconfig, dir.path()).await?;
            (Some(cluster), dra)
        }
        None => (None, crate::app::DraConfig::default()),
    };
    #[cfg(not(feature = "dra"))]
    let dra = crate::app::DraConfig::default();
    let kubelet = Simulator::start(&kubelet_dir)?;
    let shutdown = CancellationToken::new();
    let config = HostConfig {
        modules_dir: modules_dir.clone(),
        cache_dir: None,
        settle: crate::app::DEFAULT_SETTLE,
        settings: args.host.settings(kubelet_dir, cdi_dir.clone()),
        dra: dra.clone(),
    };
    let host = Host::start(config, &shutdown)?;
    let result = report(&host, &kubelet, args, &simulated, out).await;
    let mut result = result.and_then(|()| cdi_specs(&cdi_dir, out));
    #[cfg(feature = "dra")]
    if result.is_ok() {
        result = match cluster.as_mut() {
            Some(cluster) => {
                cluster
                    .show(&host, &kubelet, &dra, &modules_dir, &cdi_dir, out)
                    .await
            }
            None => dra_skipped(out),
        };
    }
    #[cfg(not(feature = "dra"))]
    if result.is_ok() {
        result = match args.kubeconfig {
            Some(_) => writeln!(
                out,
                "\nDRA: skipped: this build has no `dra` feature (the DRA frontend)"
            )
            .map_err(Into::into),
            None => dra_skipped(out),
        };
    }
    host.stop().await;
    // After the host stopped: a running host would republish the slices.
    #[cfg(feature = "dra")]
    if let Some(cluster) = cluster {
        let cleaned = cluster.clean(out).await;
        result = result.and(cleaned);
    }
    kubelet.stop().await;
    result
}

/// The line that ends a demo run without `--kubeconfig`.
fn dra_skipped(out: &mut impl Write) -> anyhow::Result<()> {
    writeln!(
        out,
        "\nDRA: skipped (no --kubeconfig). `cargo xtask demo` starts a throwaway \
         kube-apiserver and passes its kubeconfig, to show example.com/dev-1 served as a \
         DRA driver as well."
    )?;
    Ok(())
}

async fn report(
    host: &Host,
    kubelet: &Simulator,
    args: &DemoArgs,
    simulated: &[String],
    out: &mut impl Write,
) -> anyhow::Result<()> {
    writeln!(out, "wasm-device-plugin demo")?;
    writeln!(out, "  modules directory: {}", args.modules_dir.display())?;
    writeln!(
        out,
        "  kubelet simulator: {}",
        kubelet.dir().join("kubelet.sock").display()
    )?;
    for line in simulated {
        writeln!(out, "  simulated hardware: {line}")?;
    }
    let states = host.settled(READY_TIMEOUT).await?;
    let mut resources = Vec::new();
    writeln!(out, "\nModules")?;
    for (name, state) in &states {
        match state {
            ModuleState::Serving(served) => {
                writeln!(out, "  {name}: serving {}", served.join(", "))?;
                resources.extend(served.iter().cloned());
            }
            ModuleState::Failed(reason) => writeln!(out, "  {name}: FAILED: {reason}")?,
            other => writeln!(out, "  {name}: {other:?}")?,
        }
    }
    anyhow::ensure!(!resources.is_empty(), "no module is serving a resource");

    let view = kubelet
        .wait_for(
            READY_TIMEOUT,
            "every resource registered with its first ListAndWatch update",
            |v| {
                resources
                    .iter()
                    .all(|r| v.plugin(r).is_some_and(|p| !p.updates.is_empty()))
            },
        )
        .await?;
    writeln!(
        out,
        "\nRegistrations (Registration.Register, as kubelet received them)"
    )?;
    for resource in &resources {
        let Some(plugin) = view.plugin(resource) else {
            continue;
        };
        let r = &plugin.registration;
        let options = r.options.unwrap_or_default();
        writeln!(
            out,
            "  {}  version={}  endpoint={}  pre_start_required={}  get_preferred_allocation_available={}",
            r.resource_name,
            r.version,
            r.endpoint,
            options.pre_start_required,
            options.get_preferred_allocation_available
        )?;
    }
    writeln!(out, "\nDevices (ListAndWatch, as kubelet sees them)")?;
    for resource in &resources {
        let Some(plugin) = view.plugin(resource) else {
            continue;
        };
        writeln!(out, "  {resource}: {} devices", plugin.devices.len())?;
        for d in &plugin.devices {
            let numa = d
                .topology
                .as_ref()
                .map(|t| {
                    t.nodes
                        .iter()
                        .map(|n| n.id.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_else(|| "-".into());
            writeln!(out, "    {:<20} {:<10} numa={numa}", d.id, d.health)?;
        }
    }

    writeln!(out, "\nAllocate (what a pod's containers get)")?;
    for resource in &resources {
        let Some(plugin) = view.plugin(resource) else {
            continue;
        };
        let healthy = plugin.healthy_ids();
        let want = healthy.len().min(2);
        if want == 0 {
            writeln!(out, "  {resource}: no healthy device to allocate")?;
            continue;
        }
        let preferred = kubelet
            .preferred_allocation(resource, &healthy, &[], i32::try_from(want)?)
            .await?;
        let chosen: Vec<&str> = preferred
            .container_responses
            .first()
            .map(|c| c.device_i_ds.iter().map(String::as_str).collect())
            .unwrap_or_default();
        writeln!(
            out,
            "  pod asking for {want} x {resource}: kubelet's preferred devices {chosen:?}"
        )?;
        let response = kubelet.allocate(resource, &[&chosen]).await?;
        for (n, container) in response.container_responses.iter().enumerate() {
            writeln!(out, "    container {n}:")?;
            crate::inspect::print_allocation(&allocation_from_wire(container), "      ", out)?;
        }
    }
    if let Some(resource) = resources.first() {
        writeln!(out, "\n  Allocate of an unknown device on {resource}:")?;
        match kubelet.allocate(resource, &[&["/no/such/device"]]).await {
            Err(err) => writeln!(out, "    refused: {err}")?,
            Ok(_) => writeln!(out, "    unexpectedly accepted")?,
        }
    }
    probes_and_metrics(host, out)
}

/// The CDI specs the host wrote to `dir`: each file, its kind and each
/// device's name with the device nodes and mounts it injects.
fn cdi_specs(dir: &Path, out: &mut impl Write) -> anyhow::Result<()> {
    writeln!(
        out,
        "\nCDI specs (--cdi-dir; the runtime resolves Allocate's `cdi` names in them)"
    )?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    if files.is_empty() {
        writeln!(
            out,
            "  (none: no resource has `cdi = true` in its manifest)"
        )?;
    }
    for path in files {
        print_spec(&path, "  ", out)?;
    }
    Ok(())
}

/// The CDI spec at `path`, its lines indented by `indent`: the file, its kind,
/// and each device's name with what it injects (device nodes, mounts, and
/// environment variables).
fn print_spec(path: &Path, indent: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let spec: crate::cdi::Spec = serde_json::from_slice(
        &std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?,
    )
    .with_context(|| format!("cannot read {}", path.display()))?;
    writeln!(
        out,
        "{indent}{}  (cdiVersion {}, kind {})",
        path.display(),
        spec.cdi_version,
        spec.kind
    )?;
    for device in &spec.devices {
        let edits = &device.container_edits;
        let injects: Vec<String> = edits
            .device_nodes
            .iter()
            .map(|n| format!("{} -> {} ({})", n.host_path, n.path, n.permissions))
            .chain(
                edits
                    .mounts
                    .iter()
                    .map(|m| format!("{} -> {} (mount)", m.host_path, m.container_path)),
            )
            .chain(edits.env.iter().map(|e| format!("env {e}")))
            .collect();
        writeln!(
            out,
            "{indent}  {}={}: {}",
            spec.kind,
            device.name,
            injects.join(", ")
        )?;
    }
    Ok(())
}

/// What the host's `/readyz` answers and the Allocate counts Prometheus would
/// scrape from `/metrics` (which `run` serves on `--metrics-addr`).
fn probes_and_metrics(host: &Host, out: &mut impl Write) -> anyhow::Result<()> {
    writeln!(
        out,
        "\nProbes and metrics (what `run` serves on --metrics-addr)"
    )?;
    match host.ready() {
        Ok(()) => writeln!(out, "  /readyz: 200 ok")?,
        Err(why) => writeln!(out, "  /readyz: 503 {why}")?,
    }
    let page = host.metrics().render();
    let mut lines: Vec<&str> = page
        .lines()
        .filter(|l| l.starts_with("wdp_allocations_total{") && !l.ends_with(" 0"))
        .collect();
    lines.sort_unstable();
    for line in lines {
        writeln!(out, "  /metrics: {line}")?;
    }
    Ok(())
}

/// Copies the modules (and manifests) of `modules` into `dir/modules`; for the
/// shipped guests that read hardware and come without a manifest (`fpga`,
/// `generic`), builds a simulated node under `dir/node` and writes a manifest
/// that grants it, so that the demo shows them serving. Returns the directory to
/// serve and a line per simulated node. The benchmarks stage the shipped
/// guests with it too (`host/benches/scale.rs`).
///
/// # Errors
/// A directory or file cannot be read, created or written; `dir/modules`
/// already exists.
pub fn stage(modules: &Path, dir: &Path) -> anyhow::Result<(PathBuf, Vec<String>)> {
    let staged = dir.join("modules");
    std::fs::create_dir(&staged).context("cannot create the demo's modules directory")?;
    let entries =
        std::fs::read_dir(modules).with_context(|| format!("cannot read {}", modules.display()))?;
    for entry in entries {
        let path = entry?.path();
        let wanted = path.extension().is_some_and(|e| e == "wasm" || e == "toml");
        if let (true, Some(name)) = (wanted && path.is_file(), path.file_name()) {
            std::fs::copy(&path, staged.join(name))
                .with_context(|| format!("cannot copy {}", path.display()))?;
        }
    }
    let node = dir.join("node");
    let mut simulated = Vec::new();
    let needs_node = |name: &str| {
        staged.join(format!("{name}.wasm")).is_file()
            && !staged.join(format!("{name}.toml")).exists()
    };
    if needs_node("fpga") {
        simulated.push(fpga_node(&node, &staged)?);
    }
    if needs_node("generic") {
        simulated.push(generic_node(&node, &staged)?);
    }
    Ok((staged, simulated))
}

/// An FPGA card as Linux's DFL driver lays it out in sysfs (see `guests/fpga`),
/// with an interface id and one port whose function is loaded; the `fpga`
/// module in region mode, granted it.
fn fpga_node(node: &Path, modules: &Path) -> anyhow::Result<String> {
    const INTERFACE: &str = "ce48969398f05f33946d560708be108a";
    const FUNCTION: &str = "d8424dc4a4a3c413f89e433683f9040b";
    let sys = node.join("sys");
    let dev = node.join("dev");
    let card = "devices/pci0000:00/0000:00:00.0/fpga_region/region0";
    let pr = format!("{card}/dfl-fme.0/dfl-fme-region.0/fpga_region/region1");
    std::fs::create_dir_all(sys.join(&pr))?;
    std::fs::write(sys.join(&pr).join("compat_id"), format!("{INTERFACE}\n"))?;
    std::fs::create_dir_all(sys.join(card).join("dfl-port.0"))?;
    std::fs::write(
        sys.join(card).join("dfl-port.0/afu_id"),
        format!("{FUNCTION}\n"),
    )?;
    let class = sys.join("class/fpga_region");
    std::fs::create_dir_all(&class)?;
    std::os::unix::fs::symlink(format!("../../{card}"), class.join("region0"))?;
    std::os::unix::fs::symlink(format!("../../{pr}"), class.join("region1"))?;
    std::fs::create_dir_all(&dev)?;
    for name in ["dfl-fme.0", "dfl-port.0"] {
        std::fs::write(dev.join(name), "")?;
    }
    std::fs::write(
        modules.join("fpga.toml"),
        format!(
            "[grants]\nread-only-dirs = [{sys:?}]\ndevice-paths = [{dev:?}]\n\
             [config]\nmode = \"region\"\nsysfs-root = {class:?}\ndev-root = {dev:?}\n"
        ),
    )?;
    Ok(format!(
        "fpga: one DFL card (interface {INTERFACE}, a function loaded) under {}, region mode",
        node.display()
    ))
}

/// Two USB serial adapters and a sound card in a simulated `/dev`; the
/// `generic` module serving them, each serial port shared by two containers
/// and handed out through CDI (a spec in the demo's `--cdi-dir`).
fn generic_node(node: &Path, modules: &Path) -> anyhow::Result<String> {
    let dev = node.join("dev");
    std::fs::create_dir_all(dev.join("snd"))?;
    for name in ["ttyUSB0", "ttyUSB1", "snd/controlC0", "snd/pcmC0D0p"] {
        std::fs::write(dev.join(name), "")?;
    }
    std::fs::write(
        modules.join("generic.toml"),
        format!(
            "[grants]\nread-only-dirs = [{dev:?}]\ndevice-paths = [{dev:?}]\n\
             [config]\nkinds = \"serial,audio\"\nroot = {node:?}\n\
             \"serial.paths\" = \"/dev/ttyUSB*\"\n\
             \"audio.paths\" = \"/dev/snd/*\"\n\"audio.group\" = \"all\"\n\
             [resources.serial]\nreplicas = 2\ncdi = true\n"
        ),
    )?;
    Ok(format!(
        "generic: /dev/ttyUSB0, /dev/ttyUSB1 and /dev/snd/* under {}",
        node.display()
    ))
}
