//! One snapshot per change: an Allocate is checked and answered against the same
//! snapshot of its resource, whatever changes while it runs. The faulty guest
//! holds the allocation at a gate (a file the test creates) while the test edits
//! the manifest as an operator would; the answer must be the allocation of the
//! snapshot the request was checked against, never OK with less than was asked.

use std::path::Path;
use std::time::Duration;

use wasm_device_plugin::kubelet::deviceplugin::proto::{
    AllocateRequest, AllocateResponse, ContainerAllocateRequest,
};
use wdp_tests::{Dirs, Fixture, WAIT, guests, ids, manifest_with_config, status_of, test_settings};

const FAULTY: &str = "example.com/faulty";

/// The manifest of the faulty module: the gate directory granted, a long
/// allocation deadline (the gate holds the call), `resources` (TOML) and `config`.
fn manifest(gates: &Path, resources: &str, config: &[(&str, &str)]) -> String {
    let base = format!(
        "[limits]\nallocate-timeout = \"60s\"\n[grants]\nread-only-dirs = [{gates:?}]\n{resources}"
    );
    manifest_with_config(&base, config)
}

/// The faulty module alone, serving with `manifest`; no periodic health check
/// (so that the only guest call in flight is the test's allocation).
async fn gated(manifest: &str) -> Fixture {
    let dirs = Dirs::new();
    dirs.add_module("faulty", guests::FAULTY);
    dirs.write_manifest("faulty", manifest);
    let mut settings = test_settings(&dirs.kubelet());
    settings.health_interval = Duration::from_secs(3600);
    let fixture = Fixture::start_with(dirs, settings);
    fixture.listed(FAULTY).await;
    fixture
}

/// Sends an Allocate of `id` in the background, on the connection kubelet
/// uses, and waits until it is held in the guest (the guest-call gauge says one
/// call runs).
async fn held_allocation(
    fixture: &Fixture,
    id: &str,
) -> tokio::task::JoinHandle<Result<AllocateResponse, tonic::Status>> {
    let mut client = fixture.kubelet.client(FAULTY).expect("registered");
    let request = AllocateRequest {
        container_requests: vec![ContainerAllocateRequest {
            devices_ids: vec![id.to_string()],
        }],
    };
    let call = tokio::spawn(async move { Ok(client.allocate(request).await?.into_inner()) });
    let mut calls = fixture.host.calls_in_flight();
    tokio::time::timeout(WAIT, calls.wait_for(|n| *n == 1))
        .await
        .expect("the allocation reaches the guest")
        .expect("host running");
    call
}

/// Opens the gate and returns the held allocation's answer, which must be OK.
async fn open_gate(
    gates: &Path,
    call: tokio::task::JoinHandle<Result<AllocateResponse, tonic::Status>>,
) -> AllocateResponse {
    std::fs::write(gates.join("open"), "").expect("open the gate");
    tokio::time::timeout(WAIT, call)
        .await
        .expect("answered")
        .expect("task")
        .expect("the allocation of the snapshot it was checked against")
}

/// The environment kubelet was given for the first container.
fn envs(response: &AllocateResponse) -> Vec<(String, String)> {
    let mut envs: Vec<(String, String)> = response.container_responses[0]
        .envs
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    envs.retain(|(k, _)| k != "ALLOCATIONS");
    envs.sort();
    envs
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn allocate_racing_a_rescan_that_removes_its_device_answers_from_the_snapshot_it_checked() {
    let gates = tempfile::tempdir().expect("temp dir");
    let gate = gates.path().join("open").display().to_string();
    let before = [
        ("devices", "3"),
        ("scan-env", "first"),
        ("gate", gate.as_str()),
    ];
    let fixture = gated(&manifest(gates.path(), "", &before)).await;
    assert_eq!(ids(&fixture.kubelet.view(), FAULTY), ["f0", "f1", "f2"]);

    let call = held_allocation(&fixture, "f2").await;
    // The operator drops f2 while the allocation is in the guest.
    let after = [
        ("devices", "2"),
        ("scan-env", "second"),
        ("gate", gate.as_str()),
    ];
    fixture
        .apply_manifest("faulty", &manifest(gates.path(), "", &after))
        .await;
    fixture
        .wait_for("f2 withdrawn", |v| ids(v, FAULTY) == ["f0", "f1"])
        .await;
    let response = open_gate(gates.path(), call).await;
    assert_eq!(
        envs(&response),
        pairs(&[
            ("DEVICE", "f2"),
            ("FAULTY_0", "f2"),
            ("SCANNED_BY", "first")
        ]),
        "the device and the allocation the first scan reported"
    );
    // A request checked against the new snapshot no longer finds f2.
    let (code, message) = status_of(fixture.kubelet.allocate(FAULTY, &[&["f2"]]).await);
    assert_eq!(code, tonic::Code::InvalidArgument, "{message}");
    fixture.stop().await;
}

#[tokio::test]
async fn allocate_racing_a_replicas_edit_answers_from_the_snapshot_it_checked() {
    let gates = tempfile::tempdir().expect("temp dir");
    let gate = gates.path().join("open").display().to_string();
    let config = [
        ("devices", "2"),
        ("scan-env", "scan"),
        ("gate", gate.as_str()),
    ];
    let shared = "[resources.faulty]\nreplicas = 2\n";
    let fixture = gated(&manifest(gates.path(), shared, &config)).await;
    assert_eq!(
        ids(&fixture.kubelet.view(), FAULTY),
        ["f0::0", "f0::1", "f1::0", "f1::1"]
    );

    let call = held_allocation(&fixture, "f1::1").await;
    // The operator stops sharing the devices while the allocation is in the guest.
    fixture
        .apply_manifest("faulty", &manifest(gates.path(), "", &config))
        .await;
    fixture
        .wait_for("replicas gone", |v| ids(v, FAULTY) == ["f0", "f1"])
        .await;
    let response = open_gate(gates.path(), call).await;
    assert_eq!(
        envs(&response),
        pairs(&[("DEVICE", "f1"), ("FAULTY_0", "f1"), ("SCANNED_BY", "scan")]),
        "replica 1 of f1 is f1, with f1's allocation"
    );
    let (code, message) = status_of(fixture.kubelet.allocate(FAULTY, &[&["f1::1"]]).await);
    assert_eq!(code, tonic::Code::InvalidArgument, "{message}");
    fixture.stop().await;
}

#[tokio::test]
async fn a_rescan_that_changes_only_allocations_is_used_without_a_new_list() {
    let gates = tempfile::tempdir().expect("temp dir");
    let fixture = gated(&manifest(gates.path(), "", &[("scan-env", "first")])).await;
    let response = fixture
        .kubelet
        .allocate(FAULTY, &[&["f0"]])
        .await
        .expect("allocated");
    assert!(envs(&response).contains(&("SCANNED_BY".to_string(), "first".to_string())));

    fixture
        .apply_manifest(
            "faulty",
            &manifest(gates.path(), "", &[("scan-env", "second")]),
        )
        .await;
    let response = fixture
        .kubelet
        .allocate(FAULTY, &[&["f0"]])
        .await
        .expect("allocated");
    assert!(
        envs(&response).contains(&("SCANNED_BY".to_string(), "second".to_string())),
        "the new scan's allocation: {response:?}"
    );
    let view = fixture.kubelet.view();
    assert_eq!(
        view.plugin(FAULTY).map(|p| p.updates.len()),
        Some(1),
        "the list did not change, so kubelet was sent none"
    );
    fixture.stop().await;
}
