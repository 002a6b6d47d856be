//! A guest's errors, traps and runaway calls become clear gRPC errors for kubelet,
//! and the module keeps serving afterwards.

use std::collections::BTreeMap;
use std::time::Duration;

use tonic::Code;
use wdp_tests::{Dirs, Fixture, WAIT, guests, status_of, test_settings};

const FAULTY: &str = "example.com/faulty";

async fn faulty() -> Fixture {
    let dirs = Dirs::new();
    dirs.add_module("faulty", guests::FAULTY);
    let mut settings = test_settings(&dirs.kubelet());
    settings.limits.allocate_deadline = Duration::from_millis(300);
    settings.limits.memory_bytes = 16 * 1024 * 1024;
    let fixture = Fixture::start_with(dirs, settings);
    fixture
        .kubelet
        .wait_for(WAIT, "faulty listed", |v| {
            v.plugin(FAULTY).is_some_and(|p| p.devices.len() == 3)
        })
        .await
        .expect("faulty registered");
    fixture
}

async fn configure(fixture: &Fixture, key: &str, value: &str) {
    let config = BTreeMap::from([(key.to_string(), value.to_string())]);
    assert!(
        fixture
            .host
            .set_module_config("faulty", config, false)
            .await
    );
}

/// Allocates `f0` and returns the gRPC code and message.
async fn allocate_error(fixture: &Fixture) -> (Code, String) {
    status_of(fixture.kubelet.allocate(FAULTY, &[&["f0"]]).await)
}

/// After a failure, a well-behaved call on the same module succeeds.
async fn still_allocates(fixture: &Fixture) {
    assert!(
        fixture
            .host
            .set_module_config("faulty", BTreeMap::new(), false)
            .await
    );
    let response = fixture
        .kubelet
        .allocate(FAULTY, &[&["f1"]])
        .await
        .expect("allocates again");
    assert_eq!(
        response.container_responses[0]
            .envs
            .get("FAULTY_0")
            .map(String::as_str),
        Some("f1")
    );
}

#[tokio::test]
async fn typed_module_errors_map_to_grpc_codes() {
    let fixture = faulty().await;
    for (spec, code) in [
        ("allocate=invalid-request", Code::InvalidArgument),
        ("allocate=unavailable", Code::FailedPrecondition),
        ("allocate=internal", Code::Internal),
        ("post-allocate=invalid-request", Code::InvalidArgument),
    ] {
        configure(&fixture, "fail", spec).await;
        let (got, message) = allocate_error(&fixture).await;
        assert_eq!(got, code, "{spec}: {message}");
        assert!(
            message.contains("module faulty"),
            "{spec}: names the module: {message}"
        );
        assert!(
            message.contains("faulty guest:"),
            "{spec}: carries the guest's message: {message}"
        );
    }
    still_allocates(&fixture).await;
    fixture.stop().await;
}

#[tokio::test]
async fn a_trap_in_allocate_is_internal_and_the_module_keeps_serving() {
    let fixture = faulty().await;
    for export in ["allocate", "post-allocate"] {
        configure(&fixture, "trap", export).await;
        let (code, message) = allocate_error(&fixture).await;
        assert_eq!(code, Code::Internal, "{message}");
        assert!(message.contains("trapped"), "{message}");
    }
    still_allocates(&fixture).await;
    fixture.stop().await;
}

#[tokio::test]
async fn an_allocate_that_never_returns_is_stopped_at_its_deadline() {
    let fixture = faulty().await;
    configure(&fixture, "spin", "allocate").await;
    let (code, message) = allocate_error(&fixture).await;
    assert_eq!(code, Code::DeadlineExceeded, "{message}");
    assert!(message.contains("deadline"), "{message}");
    still_allocates(&fixture).await;
    fixture.stop().await;
}

#[tokio::test]
async fn an_allocate_that_hoards_memory_is_stopped_at_its_cap() {
    let fixture = faulty().await;
    configure(&fixture, "grow", "allocate").await;
    let (code, message) = allocate_error(&fixture).await;
    assert_eq!(code, Code::Internal, "{message}");
    assert!(message.contains("memory limit of 16 MiB"), "{message}");
    still_allocates(&fixture).await;
    fixture.stop().await;
}

#[tokio::test]
async fn a_failed_rescan_keeps_the_last_good_device_list() {
    let dirs = Dirs::new();
    dirs.add_module("virtual", guests::VIRTUAL_DEVICES);
    let fixture = Fixture::start(dirs);
    let dev1 = "example.com/dev-1";
    fixture
        .kubelet
        .wait_for(WAIT, "both resources listed", |v| {
            v.plugins.len() == 2 && v.plugins.values().all(|p| !p.updates.is_empty())
        })
        .await
        .expect("listed");
    // The guest refuses this configuration: its scan returns an error.
    let bad = BTreeMap::from([("kinds".to_string(), "dev-1=many".to_string())]);
    assert!(fixture.host.set_module_config("virtual", bad, true).await);
    // A good configuration afterwards: its list is the next update on the stream.
    let good = BTreeMap::from([("kinds".to_string(), "dev-1=5,dev-2=2".to_string())]);
    assert!(fixture.host.set_module_config("virtual", good, true).await);
    let view = fixture
        .kubelet
        .wait_for(WAIT, "five devices", |v| {
            v.plugin(dev1).is_some_and(|p| p.devices.len() == 5)
        })
        .await
        .expect("updated");
    let sizes: Vec<usize> = view.plugins[dev1].updates.iter().map(Vec::len).collect();
    assert_eq!(sizes, [4, 5], "the failed scan published nothing");
    assert!(
        view.plugins
            .values()
            .all(|p| p.registrations == 1 && p.streaming),
        "{view:#?}"
    );
    fixture.stop().await;
}

#[tokio::test]
async fn a_guest_has_no_environment_files_or_network() {
    let fixture = faulty().await;
    // A listener the guest would reach if it had network access.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    let addr = listener.local_addr().expect("address").to_string();
    let config = BTreeMap::from([
        ("probe".to_string(), "sandbox".to_string()),
        ("probe-addr".to_string(), addr),
    ]);
    assert!(
        fixture
            .host
            .set_module_config("faulty", config, false)
            .await
    );
    let response = fixture
        .kubelet
        .allocate(FAULTY, &[&["f0"]])
        .await
        .expect("probe answers");
    let envs: BTreeMap<&str, &str> = response.container_responses[0]
        .envs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        envs,
        BTreeMap::from([
            ("PROBE_ENV", "0"),
            ("PROBE_ARGS", "0"),
            ("PROBE_READ", "denied"),
            ("PROBE_LIST", "denied"),
            ("PROBE_CWD", "denied"),
            ("PROBE_TCP", "denied"),
        ])
    );
    fixture.stop().await;
}
