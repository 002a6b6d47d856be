//! Clients that are not kubelet and do not behave: oversized and absurd
//! requests get errors, and calls or streams abandoned halfway leave nothing
//! behind. A raw gRPC client dials the plugin's socket directly.

use std::time::Duration;

use tokio::sync::watch;
use tonic::Code;
use tonic::transport::Channel;
use wasm_device_plugin::kubelet::deviceplugin::proto::device_plugin_client::DevicePluginClient;
use wasm_device_plugin::kubelet::deviceplugin::proto::{
    AllocateRequest, ContainerAllocateRequest, ContainerPreferredAllocationRequest, Empty,
    PreferredAllocationRequest,
};
use wasm_device_plugin::kubelet::socket;
use wdp_tests::{Dirs, Fixture, WAIT, guests, test_settings};

const DEV1: &str = "example.com/dev-1";
const FAULTY: &str = "example.com/faulty";

/// The virtual-devices and faulty modules, allowed a minute per allocation (so
/// that only a client hanging up can end a call early), with no health check
/// during a test (so that the only guest calls are the test's).
async fn fixture() -> Fixture {
    let dirs = Dirs::new();
    dirs.add_module("virtual", guests::VIRTUAL_DEVICES);
    dirs.add_module("faulty", guests::FAULTY);
    let mut settings = test_settings(&dirs.kubelet());
    settings.limits.allocate_deadline = Duration::from_secs(60);
    settings.health_interval = Duration::from_secs(3600);
    let fixture = Fixture::start_with(dirs, settings);
    fixture.listed(DEV1).await;
    fixture.listed(FAULTY).await;
    fixture
}

/// A client of `resource`'s socket that is not the simulator.
fn rogue(fixture: &Fixture, resource: &str) -> DevicePluginClient<Channel> {
    let view = fixture.kubelet.view();
    let endpoint = &view.plugins[resource].registration.endpoint;
    let channel = socket::channel(&fixture.dirs.kubelet().join(endpoint)).expect("channel");
    DevicePluginClient::new(channel)
}

fn allocate_request(containers: Vec<Vec<String>>) -> AllocateRequest {
    AllocateRequest {
        container_requests: containers
            .into_iter()
            .map(|devices_ids| ContainerAllocateRequest { devices_ids })
            .collect(),
    }
}

/// Waits until the gauge reads `value`.
async fn gauge_reaches(mut gauge: watch::Receiver<u64>, value: u64, what: &str) {
    let reached = tokio::time::timeout(WAIT, gauge.wait_for(|v| *v == value))
        .await
        .is_ok_and(|r| r.is_ok());
    assert!(reached, "{what} never reached {value}: {}", *gauge.borrow());
}

/// The plugin still answers the simulator normally.
async fn still_serves(fixture: &Fixture) {
    fixture
        .kubelet
        .allocate(DEV1, &[&["/node1/dev1/1"]])
        .await
        .expect("still allocates");
}

#[tokio::test]
async fn a_request_over_the_message_limit_is_refused_by_the_transport() {
    let fixture = fixture().await;
    let mut client = rogue(&fixture, DEV1);
    // 5 MiB of ids: more than the 4 MiB a gRPC message may hold.
    let ids = vec!["x".repeat(1024); 5 * 1024];
    let status = client
        .allocate(allocate_request(vec![ids]))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    still_serves(&fixture).await;
    fixture.stop().await;
}

#[tokio::test]
async fn a_request_naming_thousands_of_unknown_devices_is_invalid_argument() {
    let fixture = fixture().await;
    let mut client = rogue(&fixture, DEV1);
    let ids: Vec<String> = (0..10_000).map(|n| format!("/no/such/{n}")).collect();
    let containers: Vec<Vec<String>> = (0..10).map(|_| ids.clone()).collect();
    let status = client
        .allocate(allocate_request(containers))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("/no/such/0"), "{status:?}");
    still_serves(&fixture).await;
    fixture.stop().await;
}

#[tokio::test]
async fn a_preferred_allocation_asking_for_more_than_offered_is_invalid_argument() {
    let fixture = fixture().await;
    let mut client = rogue(&fixture, DEV1);
    let status = client
        .get_preferred_allocation(PreferredAllocationRequest {
            container_requests: vec![ContainerPreferredAllocationRequest {
                available_device_i_ds: vec!["/node1/dev1/1".into()],
                must_include_device_i_ds: Vec::new(),
                allocation_size: i32::MAX,
            }],
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("more than the 1 devices offered"),
        "{status:?}"
    );
    still_serves(&fixture).await;
    fixture.stop().await;
}

#[tokio::test]
async fn list_and_watch_streams_dropped_mid_stream_are_released() {
    let fixture = fixture().await;
    let streams = fixture.host.open_streams();
    // The simulator holds one stream per resource: dev-1, dev-2 and faulty.
    let baseline = 3;
    gauge_reaches(streams.clone(), baseline, "the simulator's streams").await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut client = rogue(&fixture, DEV1);
        let mut stream = client
            .list_and_watch(Empty {})
            .await
            .expect("stream")
            .into_inner();
        stream.message().await.expect("first list").expect("a list");
        clients.push((client, stream));
    }
    gauge_reaches(streams.clone(), baseline + 20, "open streams").await;
    drop(clients);
    gauge_reaches(streams, baseline, "open streams").await;
    still_serves(&fixture).await;
    fixture.stop().await;
}

#[tokio::test]
async fn an_allocate_abandoned_by_its_client_stops_the_guest_call() {
    let fixture = fixture().await;
    fixture.set_config("faulty", &[("sleep", "allocate")]).await;
    let calls = fixture.host.calls_in_flight();
    let mut client = rogue(&fixture, FAULTY);
    let call = tokio::spawn(async move {
        client
            .allocate(allocate_request(vec![vec!["f0".into()]]))
            .await
    });
    // The guest sleeps for an hour under a one-minute deadline; the call is
    // running once the gauge says so.
    gauge_reaches(calls.clone(), 1, "guest calls").await;
    // Meanwhile the other module answers, and the stuck call is still running.
    still_serves(&fixture).await;
    assert_eq!(*calls.borrow(), 1, "the stuck call runs on");
    call.abort();
    let _ = call.await;
    // Only the hang-up can end the call within the wait.
    gauge_reaches(calls, 0, "guest calls").await;
    still_serves(&fixture).await;
    fixture.stop().await;
}
