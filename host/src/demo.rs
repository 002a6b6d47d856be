//! `wasm-device-plugin demo`: the host and the kubelet simulator in one process,
//! over real sockets in a temporary directory. Prints what kubelet receives
//! (registrations, ListAndWatch) and what a pod gets (Allocate responses).

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::app::{Host, HostConfig};
use crate::config::DemoArgs;
use crate::kubelet::proto::ContainerAllocateResponse;
use crate::kubelet::simulator::Simulator;
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
    let kubelet = Simulator::start(dir.path())?;
    let shutdown = CancellationToken::new();
    let config = HostConfig {
        modules_dir: args.modules_dir.clone(),
        cache_dir: None,
        settle: crate::app::DEFAULT_SETTLE,
        settings: args.host.settings(dir.path().to_path_buf()),
    };
    let host = Host::start(config, &shutdown)?;
    let result = report(&host, &kubelet, args, out).await;
    host.stop().await;
    kubelet.stop().await;
    result
}

async fn report(
    host: &Host,
    kubelet: &Simulator,
    args: &DemoArgs,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    writeln!(out, "wasm-device-plugin demo")?;
    writeln!(out, "  modules directory: {}", args.modules_dir.display())?;
    writeln!(
        out,
        "  kubelet simulator: {}",
        kubelet.dir().join("kubelet.sock").display()
    )?;
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
            print_container(out, n, container)?;
        }
    }
    if let Some(resource) = resources.first() {
        writeln!(out, "\n  Allocate of an unknown device on {resource}:")?;
        match kubelet.allocate(resource, &[&["/no/such/device"]]).await {
            Err(err) => writeln!(out, "    refused: {err}")?,
            Ok(_) => writeln!(out, "    unexpectedly accepted")?,
        }
    }
    Ok(())
}

fn print_container(
    out: &mut impl Write,
    n: usize,
    c: &ContainerAllocateResponse,
) -> std::io::Result<()> {
    writeln!(out, "    container {n}:")?;
    let mut envs: Vec<_> = c.envs.iter().collect();
    envs.sort();
    for (k, v) in envs {
        writeln!(out, "      env         {k}={v}")?;
    }
    let mut annotations: Vec<_> = c.annotations.iter().collect();
    annotations.sort();
    for (k, v) in annotations {
        writeln!(out, "      annotation  {k}={v}")?;
    }
    for d in &c.devices {
        writeln!(
            out,
            "      device      {} -> {} ({})",
            d.host_path, d.container_path, d.permissions
        )?;
    }
    for m in &c.mounts {
        writeln!(
            out,
            "      mount       {} -> {}{}",
            m.host_path,
            m.container_path,
            if m.read_only { " (ro)" } else { "" }
        )?;
    }
    for cdi in &c.cdi_devices {
        writeln!(out, "      cdi         {}", cdi.name)?;
    }
    Ok(())
}
