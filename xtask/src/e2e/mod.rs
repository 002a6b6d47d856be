//! `cargo xtask e2e [--release]`: the host on a real one-node Kubernetes cluster on this
//! machine, deployed by its own DaemonSet from `deploy/`.
//!
//! In order: checks it runs as root; installs the Debian packages the node needs
//! (runc, the CNI plugins, a static busybox); builds Kubernetes, etcd and containerd
//! from the Go modules in `e2e/cluster/` (once: cached under `target/e2e/bin/`);
//! stages `cargo xtask dist` and builds the host's image from it, a pause image and a
//! busybox image, as OCI archives (`image`); starts the cluster in a temporary
//! directory (`cluster`), imports the images, runs the scenarios (`scenarios`), and
//! tears everything down, putting back what the cluster changed on the machine
//! (`machine`). The processes' logs stay in `target/e2e/logs/`.

mod binaries;
mod cluster;
mod image;
mod machine;
mod scenarios;

pub use binaries::build_control_plane;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cluster::{Cluster, Images};
use scenarios::{Context, Outcome, SCENARIOS};

use crate::root;

/// The host image's reference in the overlay (`e2e/overlay/kustomization.yaml`).
const HOST_IMAGE: &str = "localhost/wasm-device-plugin:e2e-1";
/// The same build with another revision label: the rolling update's new image.
const HOST_IMAGE_2: &str = "localhost/wasm-device-plugin:e2e-2";
/// The sandbox image containerd is configured with.
const PAUSE_IMAGE: &str = "localhost/wdp-e2e/pause:1";
/// What `examples/pods` ask for (`busybox:1.36`, as kubelet normalises it). A stand-in
/// built from Debian's static busybox: the pods need only sh, env, grep, sort, sleep.
const BUSYBOX_IMAGE: &str = "docker.io/library/busybox:1.36";

/// Set by SIGINT or SIGTERM: every wait gives up, and the cluster is torn down.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// An error that makes [`poll`] give up at once rather than try again.
const FATAL: &str = "fatal: ";

pub fn fatal(message: String) -> String {
    format!("{FATAL}{message}")
}

/// Calls `check` every 250 ms until it returns `Ok(Some(_))`, for at most `timeout`.
/// `Ok(None)` and `Err` mean "not yet" (the last error is reported on timeout), except
/// an error made by [`fatal`], which ends the wait.
///
/// # Errors
/// On timeout, on a fatal error, or when interrupted.
pub fn poll<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>, String>,
) -> Result<T, String> {
    let started = Instant::now();
    let mut last = String::from("no answer yet");
    loop {
        match check() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) if e.starts_with(FATAL) => {
                return Err(format!("while waiting for {what}: {}", &e[FATAL.len()..]));
            }
            Err(e) => last = e,
        }
        if interrupted() {
            return Err(format!("interrupted while waiting for {what}"));
        }
        if started.elapsed() > timeout {
            return Err(format!(
                "timed out after {timeout:?} waiting for {what} (last: {last})"
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `cargo xtask e2e [--release]`.
pub fn e2e(args: &[String]) -> Result<(), String> {
    let mut release = false;
    for arg in args {
        match arg.as_str() {
            "--release" => release = true,
            other => {
                return Err(format!(
                    "unknown argument `{other}` (usage: cargo xtask e2e [--release])"
                ));
            }
        }
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(
            "needs root: it starts kubelet, containerd and runc, mounts, and changes cgroups, network links and sysctls (which it puts back). Run it as root, e.g. `sudo -E cargo xtask e2e`; nothing was run"
                .into(),
        );
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let started = Instant::now();
    binaries::ensure_packages()?;
    let bins = binaries::build()?;
    let built = started.elapsed();

    let dist = root().join("target/e2e/dist");
    crate::dist(&dist, release, false)?;
    crate::check_dist(&dist)?;
    let binary = dist.join(crate::DIST_BIN);
    let images = Images {
        pause: (PAUSE_IMAGE.to_string(), image::pause(PAUSE_IMAGE)?),
        others: vec![
            image::busybox(BUSYBOX_IMAGE, std::path::Path::new(binaries::BUSYBOX))?,
            image::host(HOST_IMAGE, &dist, &binary, "e2e-1")?,
            image::host(HOST_IMAGE_2, &dist, &binary, "e2e-2")?,
        ],
    };
    let logs = root().join("target/e2e/logs");
    if logs.exists() {
        std::fs::remove_dir_all(&logs)
            .map_err(|e| format!("cannot clear {}: {e}", logs.display()))?;
    }
    std::fs::create_dir_all(&logs).map_err(|e| format!("cannot create {}: {e}", logs.display()))?;
    eprintln!(
        "e2e: Kubernetes {}, containerd {}; binaries ready after {:.0?}, images after {:.0?}",
        bins.kubernetes_version,
        bins.containerd_version,
        built,
        started.elapsed()
    );

    let cluster_started = Instant::now();
    let mut cluster = Cluster::start(&bins, &images, &logs)?;
    eprintln!("e2e: cluster up in {:.1?}", cluster_started.elapsed());
    let modules = dist.join(crate::DIST_MODULES);
    let mut passed = 0;
    let mut failure = None;
    {
        let mut ctx = Context::new(&mut cluster, modules, HOST_IMAGE_2.to_string());
        for (name, scenario) in SCENARIOS {
            let began = Instant::now();
            match scenario(&mut ctx) {
                Ok(Outcome::Passed(saw)) => {
                    passed += 1;
                    eprintln!("e2e: PASS {name} ({:.1?}): {saw}", began.elapsed());
                }
                Err(e) => {
                    eprintln!("e2e: FAIL {name} ({:.1?}): {e}", began.elapsed());
                    failure = Some(format!("{name}: {e}"));
                    break;
                }
            }
        }
    }
    if failure.is_some() && !interrupted() {
        diagnose(&cluster);
    }
    let problems = cluster.teardown();
    drop(cluster);
    let not_run = SCENARIOS.len() - passed - usize::from(failure.is_some());
    println!(
        "e2e: {passed} passed, {} failed",
        usize::from(failure.is_some())
    );
    if not_run > 0 {
        println!("e2e: {not_run} scenario(s) not run after the failure");
    }
    eprintln!(
        "e2e: logs in {}; total {:.0?}",
        logs.display(),
        started.elapsed()
    );
    if let Some(failure) = failure {
        return Err(failure);
    }
    if !problems.is_empty() {
        return Err(format!(
            "the machine was not put back as found: {}",
            problems.join("; ")
        ));
    }
    Ok(())
}

/// Prints what helps to see why a scenario failed.
fn diagnose(cluster: &Cluster) {
    for args in [
        &["get", "nodes,pods", "--all-namespaces", "-o", "wide"][..],
        &[
            "get",
            "events",
            "--all-namespaces",
            "--sort-by=.lastTimestamp",
        ][..],
        &[
            "-n",
            "kube-system",
            "logs",
            "-l",
            "app.kubernetes.io/name=wasm-device-plugin",
            "--tail=30",
        ][..],
    ] {
        match cluster.kubectl(args) {
            Ok(out) => eprintln!("+ kubectl {}\n{out}", args.join(" ")),
            Err(e) => eprintln!("{e}"),
        }
    }
}
