//! What an operator watches: the Prometheus metrics, `/healthz` and `/readyz`,
//! read over HTTP as Prometheus and kubelet's probes do, while the host is
//! driven through the kubelet simulator.

use tonic::Code;
use wasm_device_plugin::kubelet::deviceplugin::simulator::Simulator;
use wasm_device_plugin::registry::ModuleState;
use wdp_tests::{
    Dirs, Fixture, WAIT, guests, http_get, sample, serve_endpoints, start_host_without_kubelet,
    status_of,
};

const DEV1: &str = "example.com/dev-1";
const DEV2: &str = "example.com/dev-2";
const FAULTY: &str = "example.com/faulty";

fn virtual_devices() -> Dirs {
    let dirs = Dirs::new();
    dirs.add_module("virtual", guests::VIRTUAL_DEVICES);
    dirs
}

/// The value of a sample that must be there.
fn value(page: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(page, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{page}"))
}

#[tokio::test]
async fn metrics_report_an_allocate_made_through_the_kubelet_simulator() {
    let fixture = Fixture::start(virtual_devices());
    fixture.listed(DEV1).await;
    fixture.listed(DEV2).await;
    let addr = fixture.serve_endpoints().await;
    let before = fixture.scrape(addr).await;
    assert_eq!(
        sample(
            &before,
            "wdp_allocations_total",
            &[("resource", DEV1), ("outcome", "ok")]
        ),
        Some(0.0),
        "served resources start at zero"
    );

    fixture
        .kubelet
        .allocate(DEV1, &[&["/node1/dev1/1", "/node1/dev1/2"]])
        .await
        .expect("allocate");
    let (code, _) = status_of(fixture.kubelet.allocate(DEV1, &[&["no-such-device"]]).await);
    assert_eq!(code, Code::InvalidArgument);

    let page = fixture.scrape(addr).await;
    let ok = [("resource", DEV1), ("outcome", "ok")];
    assert_eq!(value(&page, "wdp_allocations_total", &ok), 1.0);
    let refused = [("resource", DEV1), ("outcome", "invalid_argument")];
    assert_eq!(value(&page, "wdp_allocations_total", &refused), 1.0);
    assert_eq!(
        value(
            &page,
            "wdp_allocate_duration_seconds_count",
            &[("resource", DEV1)]
        ),
        2.0,
        "both answers timed"
    );
    assert!(
        value(
            &page,
            "wdp_allocate_duration_seconds_sum",
            &[("resource", DEV1)]
        ) > 0.0
    );
    // The unknown id is refused before any guest runs: one guest allocation
    // (virtual-devices exports no `post-allocate`, so `allocate` is its only call).
    let labels = [("module", "virtual"), ("function", "allocate")];
    assert_eq!(
        value(&page, "wdp_guest_call_duration_seconds_count", &labels),
        1.0,
        "allocate timed once"
    );
    assert!(
        value(
            &page,
            "wdp_guest_call_duration_seconds_count",
            &[("module", "virtual"), ("function", "scan")]
        ) >= 1.0
    );
    assert!(
        value(
            &page,
            "wdp_guest_instantiation_duration_seconds_count",
            &[("module", "virtual")]
        ) >= 2.0,
        "an instance for the first scan and one for the allocation"
    );
    let view = fixture.kubelet.view();
    for resource in [DEV1, DEV2] {
        let healthy = [("resource", resource), ("health", "Healthy")];
        let advertised = view.plugins[resource].devices.len();
        assert!(advertised > 0);
        assert_eq!(
            value(&page, "wdp_devices", &healthy),
            advertised as f64,
            "as many as kubelet was told of"
        );
        let unhealthy = [("resource", resource), ("health", "Unhealthy")];
        assert_eq!(value(&page, "wdp_devices", &unhealthy), 0.0);
        let registered = [("resource", resource), ("outcome", "ok")];
        assert_eq!(value(&page, "wdp_registrations_total", &registered), 1.0);
    }
    assert_eq!(value(&page, "wdp_modules", &[("state", "serving")]), 1.0);
    assert_eq!(value(&page, "wdp_modules", &[("state", "failed")]), 0.0);
    assert_eq!(
        value(&page, "wdp_module_loads_total", &[("outcome", "compiled")]),
        1.0
    );
    assert_eq!(value(&page, "wdp_list_and_watch_streams", &[]), 2.0);
    assert_eq!(value(&page, "wdp_kubelet_restarts_total", &[]), 0.0);
    assert!(page.ends_with("# EOF\n"), "a complete OpenMetrics page");
    fixture.stop().await;
}

#[tokio::test]
async fn readiness_flips_when_registration_completes_and_when_kubelet_goes() {
    let dirs = virtual_devices();
    let (host, shutdown) = start_host_without_kubelet(&dirs);
    let addr = serve_endpoints(&host, &shutdown).await;
    let states = host.settled(WAIT).await.expect("settles");
    assert!(matches!(
        states.get("virtual"),
        Some(ModuleState::Serving(_))
    ));

    // Loaded, but kubelet is not there to register with.
    let (status, body) = http_get(addr, "/readyz").await;
    assert_eq!(status, 503, "not ready before registration: {body}");
    assert!(
        body.contains(DEV1) && body.contains("not registered"),
        "says what is missing: {body}"
    );
    let (status, _) = http_get(addr, "/healthz").await;
    assert_eq!(status, 200, "alive while waiting for kubelet");

    let kubelet = Simulator::start(&dirs.kubelet()).expect("kubelet starts");
    host.wait_ready(true, WAIT)
        .await
        .expect("ready once registered");
    let (status, body) = http_get(addr, "/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let view = kubelet.view();
    assert!(view.plugin(DEV1).is_some() && view.plugin(DEV2).is_some());

    // Kubelet goes away: the resources wait to register again, and say so.
    kubelet.stop().await;
    host.wait_ready(false, WAIT)
        .await
        .expect("not ready without kubelet");
    let (status, _) = http_get(addr, "/readyz").await;
    assert_eq!(status, 503);

    shutdown.cancel();
    host.stop().await;
}

#[tokio::test]
async fn a_module_that_fails_to_load_is_counted_and_does_not_hold_readiness_back() {
    let dirs = virtual_devices();
    dirs.write_module("broken.wasm", b"not a wasm module");
    let fixture = Fixture::start(dirs);
    fixture.settled().await;
    fixture
        .host
        .wait_ready(true, WAIT)
        .await
        .expect("ready with the good module registered");
    let addr = fixture.serve_endpoints().await;
    let (status, _) = http_get(addr, "/readyz").await;
    assert_eq!(status, 200);
    let page = fixture.scrape(addr).await;
    assert_eq!(value(&page, "wdp_modules", &[("state", "serving")]), 1.0);
    assert_eq!(value(&page, "wdp_modules", &[("state", "failed")]), 1.0);
    assert_eq!(
        value(&page, "wdp_module_loads_total", &[("outcome", "refused")]),
        1.0
    );
    assert_eq!(
        value(&page, "wdp_module_refusals_total", &[("module", "broken")]),
        1.0
    );
    fixture.stop().await;
}

#[tokio::test]
async fn a_trapping_allocate_is_counted_as_the_guest_failure_and_the_grpc_outcome() {
    let dirs = virtual_devices();
    dirs.add_module("faulty", guests::FAULTY);
    dirs.write_manifest("faulty", "[config]\ntrap = \"allocate\"\n");
    let fixture = Fixture::start(dirs);
    fixture.listed(FAULTY).await;
    let (code, _) = status_of(fixture.kubelet.allocate(FAULTY, &[&["f0"]]).await);
    assert_eq!(code, Code::Internal);
    let addr = fixture.serve_endpoints().await;
    let page = fixture.scrape(addr).await;
    let trapped = [
        ("module", "faulty"),
        ("function", "allocate"),
        ("reason", "trap"),
    ];
    assert_eq!(value(&page, "wdp_guest_call_failures_total", &trapped), 1.0);
    let internal = [("resource", FAULTY), ("outcome", "internal")];
    assert_eq!(value(&page, "wdp_allocations_total", &internal), 1.0);
    let ok = [("resource", FAULTY), ("outcome", "ok")];
    assert_eq!(value(&page, "wdp_allocations_total", &ok), 0.0);
    // A failed export is not timed as a returned one.
    let timed = [("module", "faulty"), ("function", "allocate")];
    assert_eq!(
        value(&page, "wdp_guest_call_duration_seconds_count", &timed),
        0.0
    );
    fixture.stop().await;
}

#[tokio::test]
async fn a_kubelet_restart_is_counted_once_and_each_resource_registers_again() {
    let mut fixture = Fixture::start(virtual_devices());
    fixture.listed(DEV1).await;
    fixture.listed(DEV2).await;
    fixture.kubelet.restart().await.expect("kubelet restarts");
    fixture
        .wait_for("both registered again", |v| {
            [DEV1, DEV2]
                .iter()
                .all(|r| v.plugin(r).is_some_and(|p| p.streaming))
        })
        .await;
    fixture
        .host
        .wait_ready(true, WAIT)
        .await
        .expect("ready again");
    let addr = fixture.serve_endpoints().await;
    let page = fixture.scrape(addr).await;
    assert_eq!(value(&page, "wdp_kubelet_restarts_total", &[]), 1.0);
    for resource in [DEV1, DEV2] {
        let registered = [("resource", resource), ("outcome", "ok")];
        assert_eq!(value(&page, "wdp_registrations_total", &registered), 2.0);
    }
    fixture.stop().await;
}

#[tokio::test]
async fn a_removed_module_takes_its_device_counts_with_it() {
    let fixture = Fixture::start(virtual_devices());
    fixture.listed(DEV1).await;
    let addr = fixture.serve_endpoints().await;
    assert!(
        fixture
            .scrape(addr)
            .await
            .contains(&format!("resource=\"{DEV1}\",health="))
    );
    fixture.dirs.remove_module("virtual");
    fixture.module_state("virtual", |s| s.is_none()).await;
    let page = fixture.scrape(addr).await;
    assert!(
        !page.contains("wdp_devices{"),
        "no device counts for resources no longer served:\n{page}"
    );
    assert_eq!(value(&page, "wdp_modules", &[("state", "serving")]), 0.0);
    fixture.stop().await;
}
