//! The Python guest (`guests/python-virtual`, built with componentize-py
//! `--stub-wasi`): loaded, scanned, health-checked and allocated through the
//! device-plugin protocol like the Rust guests, beside them.
//!
//! The component is ~17 MiB (a whole CPython); compiling it takes seconds. These
//! tests share one compiled-module cache in cargo's scratch directory and load one
//! at a time, so it is compiled once per change of the guest, not once per test.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, UNIX_EPOCH};

use tokio::sync::{Mutex, MutexGuard};
use tonic::Code;
use wasm_device_plugin::kubelet::deviceplugin::proto::ContainerAllocateResponse;
use wasm_device_plugin::registry::ModuleState;
use wdp_tests::{Dirs, Fixture, guests, host_config, ids, status_of, test_settings};

const PY_DEV: &str = "example.com/py-dev";

/// How long the first load may take: compiling the component takes about 25 s
/// on two idle cores, and several times that beside the other tests' builds
/// and hosts (the usual wait, 30 s, was seen to run out on a fresh clone).
const LOAD_WAIT: Duration = Duration::from_secs(300);

/// Held while a test's host loads the Python guest: the first to load compiles it
/// into the shared cache, the others read it from there.
static LOADING: Mutex<()> = Mutex::const_new(());

/// The compiled-module cache these tests share, in cargo's scratch directory
/// (the host creates it, mode 0700). One directory per build of the guest:
/// componentize-py bakes random seeds in, so every build has new bytes and the
/// entries of earlier builds are never read again; they are removed.
fn shared_cache() -> &'static Path {
    static CACHE: OnceLock<PathBuf> = OnceLock::new();
    CACHE.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("python-guest-cache");
        let built = std::fs::metadata(guests::PYTHON_VIRTUAL).expect("the Python guest is built");
        let mtime = built
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let dir = root.join(format!("{}-{mtime}", built.len()));
        for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            if entry.path() != dir {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        dir
    })
}

/// The Python guest as module `py`, with `manifest` beside it if given.
fn python_guest(manifest: Option<&str>) -> Dirs {
    let dirs = Dirs::new();
    dirs.add_module("py", guests::PYTHON_VIRTUAL);
    if let Some(text) = manifest {
        dirs.write_manifest("py", text);
    }
    dirs
}

/// Starts the host on `dirs` with the shared cache and waits (up to
/// [`LOAD_WAIT`]) until module `py` has loaded or failed; returns the fixture
/// and the loading guard, to be dropped by the caller.
async fn start(dirs: Dirs) -> (Fixture, MutexGuard<'static, ()>) {
    let loading = LOADING.lock().await;
    let mut config = host_config(&dirs, test_settings(&dirs.kubelet()));
    config.cache_dir = Some(shared_cache().to_path_buf());
    let fixture = Fixture::start_config(dirs, config);
    let mut states = fixture.host.states();
    let loaded = tokio::time::timeout(
        LOAD_WAIT,
        states.wait_for(|s| {
            s.get("py")
                .is_some_and(|s| !matches!(s, ModuleState::Settling | ModuleState::Loading))
        }),
    )
    .await;
    assert!(
        matches!(loaded, Ok(Ok(_))),
        "module py did not load within {LOAD_WAIT:?}: {:?}",
        *fixture.host.states().borrow()
    );
    (fixture, loading)
}

/// Starts the host on `dirs` and waits until `resource` is listed.
async fn serving(dirs: Dirs, resource: &str) -> Fixture {
    let (fixture, loading) = start(dirs).await;
    fixture.listed(resource).await;
    drop(loading);
    fixture
}

fn envs(c: &ContainerAllocateResponse) -> BTreeMap<&str, &str> {
    c.envs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

#[tokio::test]
async fn python_guest_serves_its_own_resource_beside_the_rust_guest() {
    let dirs = python_guest(None);
    dirs.add_module("virtual", guests::VIRTUAL_DEVICES);
    let fixture = serving(dirs, PY_DEV).await;
    let view = fixture
        .wait_for("the Rust guest's resources listed too", |v| {
            ["example.com/dev-1", "example.com/dev-2"]
                .iter()
                .all(|r| v.plugin(r).is_some_and(|p| !p.updates.is_empty()))
        })
        .await;

    let plugin = view.plugin(PY_DEV).expect("registered");
    assert_eq!(plugin.registration.version, "v1beta1");
    assert_eq!(plugin.registration.resource_name, PY_DEV);
    assert!(plugin.streaming);
    assert_eq!(ids(&view, PY_DEV), ["/node1/pydev/1", "/node1/pydev/2"]);
    assert!(
        plugin
            .devices
            .iter()
            .all(|d| d.health == "Healthy" && d.topology.is_none()),
        "{:?}",
        plugin.devices
    );
    assert_eq!(ids(&view, "example.com/dev-1").len(), 4);
    assert!(view.refused.is_empty(), "{:?}", view.refused);
    let states = fixture.settled().await;
    assert_eq!(
        states.get("py"),
        Some(&ModuleState::Serving(vec![PY_DEV.to_string()]))
    );
    assert!(
        fixture.host.refusals().borrow().is_empty(),
        "{:?}",
        *fixture.host.refusals().borrow()
    );
    fixture.stop().await;
}

#[tokio::test]
async fn python_guest_takes_its_config_from_the_manifest_and_allocates() {
    let manifest = "[config]\nkinds = \"gpu=3, fpga-x=1\"\nnode = \"n7\"\nnuma-nodes = 2\n";
    let fixture = serving(python_guest(Some(manifest)), "example.com/gpu").await;
    let view = fixture.listed("example.com/fpga-x").await;
    assert!(
        view.plugin(PY_DEV).is_none(),
        "`kinds` replaces the default kind"
    );
    assert_eq!(
        ids(&view, "example.com/gpu"),
        ["/n7/gpu/1", "/n7/gpu/2", "/n7/gpu/3"]
    );
    assert_eq!(ids(&view, "example.com/fpga-x"), ["/n7/fpgax/1"]);
    let numa: Vec<Vec<i64>> = view.plugins["example.com/gpu"]
        .devices
        .iter()
        .map(|d| {
            d.topology
                .as_ref()
                .map(|t| t.nodes.iter().map(|n| n.id).collect())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(numa, [vec![0], vec![1], vec![0]]);

    // Two containers, answered in order: envs from allocate, the annotation from
    // post-allocate.
    let response = fixture
        .kubelet
        .allocate(
            "example.com/gpu",
            &[&["/n7/gpu/3"], &["/n7/gpu/1", "/n7/gpu/2"]],
        )
        .await
        .expect("allocated");
    let containers = &response.container_responses;
    assert_eq!(containers.len(), 2);
    assert_eq!(
        envs(&containers[0]),
        BTreeMap::from([("DEV_gpu_ID_0", "/n7/gpu/3")])
    );
    assert_eq!(
        envs(&containers[1]),
        BTreeMap::from([("DEV_gpu_ID_0", "/n7/gpu/1"), ("DEV_gpu_ID_1", "/n7/gpu/2")])
    );
    let annotations: Vec<_> = containers
        .iter()
        .map(|c| c.annotations.get("virtual.example.com/devices").cloned())
        .collect();
    assert_eq!(
        annotations,
        [
            Some("/n7/gpu/3".to_string()),
            Some("/n7/gpu/1,/n7/gpu/2".to_string())
        ]
    );
    assert!(
        containers
            .iter()
            .all(|c| c.devices.is_empty() && c.mounts.is_empty() && c.cdi_devices.is_empty())
    );

    // A kind name's non-alphanumerics become `_` in the variable name.
    let response = fixture
        .kubelet
        .allocate("example.com/fpga-x", &[&["/n7/fpgax/1"]])
        .await
        .expect("allocated");
    assert_eq!(
        envs(&response.container_responses[0]),
        BTreeMap::from([("DEV_fpga_x_ID_0", "/n7/fpgax/1")])
    );
    fixture.stop().await;
}

#[tokio::test]
async fn python_guest_health_check_reports_configured_unhealthy_devices() {
    let fixture = serving(python_guest(None), PY_DEV).await;
    // The operator's edit re-scans; the guest's scan and its `health` export
    // both report it.
    fixture
        .set_config("py", &[("unhealthy", "/node1/pydev/2")])
        .await;
    let view = fixture
        .wait_for("pydev/2 unhealthy", |v| {
            v.plugin(PY_DEV).is_some_and(|p| {
                p.devices
                    .iter()
                    .any(|d| d.id == "/node1/pydev/2" && d.health == "Unhealthy")
            })
        })
        .await;
    assert_eq!(view.plugins[PY_DEV].healthy_ids(), ["/node1/pydev/1"]);
    let err = fixture
        .kubelet
        .allocate(PY_DEV, &[&["/node1/pydev/2"]])
        .await;
    assert_eq!(status_of(err).0, Code::FailedPrecondition);
    fixture
        .kubelet
        .allocate(PY_DEV, &[&["/node1/pydev/1"]])
        .await
        .expect("the healthy device still allocates");
    fixture.stop().await;
}

#[tokio::test]
async fn python_guest_unknown_device_is_invalid_argument() {
    let fixture = serving(python_guest(None), PY_DEV).await;
    let err = fixture
        .kubelet
        .allocate(PY_DEV, &[&["/node1/pydev/1", "/node1/pydev/9"]])
        .await;
    let (code, message) = status_of(err);
    assert_eq!(code, Code::InvalidArgument);
    assert!(
        message.contains("/node1/pydev/9"),
        "names the id: {message}"
    );
    fixture.stop().await;
}

#[tokio::test]
async fn python_guest_config_error_is_a_typed_module_error_not_a_trap() {
    let (fixture, loading) = start(python_guest(Some("[config]\nkinds = \"gpu\"\n"))).await;
    let state = fixture
        .module_state("py", |s| matches!(s, Some(ModuleState::Failed(_))))
        .await;
    drop(loading);
    let Some(ModuleState::Failed(reason)) = state else {
        unreachable!()
    };
    // The guest raised `Err(ModuleError_InvalidRequest(..))`.
    assert!(
        reason.contains("scan returned an error: invalid request"),
        "{reason}"
    );
    assert!(reason.contains("`gpu` is not name=count"), "{reason}");
    fixture.stop().await;
}
