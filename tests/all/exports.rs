//! Optional exports: only `scan` is required, the host supplies health (from
//! scans), allocation (the merge of scan's device allocations) and no
//! post-processing for what a module leaves out, and modules built against
//! `wasm-device-plugin:device@0.2.0` keep working unchanged.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;

use tonic::Code;
use wasm_device_plugin::registry::ModuleState;
use wasm_device_plugin::runtime::PACKAGE_VERSION;
use wdp_tests::{Dirs, Fixture, fixtures, guests, health_of, sample, status_of};

const DEV1: &str = "example.com/dev-1";
const WIDGET: &str = "example.com/widget";

/// Serves the module `wasm` alone (as `name`, with `manifest` when given) and
/// waits until `resource` is listed.
async fn serving(name: &str, wasm: &str, manifest: Option<&str>, resource: &str) -> Fixture {
    let dirs = Dirs::new();
    dirs.add_module(name, wasm);
    if let Some(text) = manifest {
        dirs.write_manifest(name, text);
    }
    let fixture = Fixture::start(dirs);
    fixture.listed(resource).await;
    fixture
}

/// What kubelet gets from virtual-devices `wasm` for two containers of dev-1.
async fn virtual_devices_answer(wasm: &str) -> impl Debug + PartialEq {
    let fixture = serving("virtual", wasm, None, DEV1).await;
    let response = fixture
        .kubelet
        .allocate(
            DEV1,
            &[&["/node1/dev1/2", "/node1/dev1/4"], &["/node1/dev1/1"]],
        )
        .await
        .expect("allocated");
    fixture.stop().await;
    response
}

/// A response's `envs` or `annotations`, sorted.
fn sorted(map: &HashMap<String, String>) -> BTreeMap<&str, &str> {
    map.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

#[tokio::test]
async fn a_module_built_against_0_2_0_allocates_as_the_current_guest_does() {
    let old = virtual_devices_answer(fixtures::VIRTUAL_DEVICES_0_2_0).await;
    let current = virtual_devices_answer(guests::VIRTUAL_DEVICES).await;
    assert_eq!(old, current);
}

#[tokio::test]
async fn a_module_built_against_0_2_1_allocates_as_the_current_guest_does() {
    let old = virtual_devices_answer(fixtures::VIRTUAL_DEVICES_0_2_1).await;
    let current = virtual_devices_answer(guests::VIRTUAL_DEVICES).await;
    assert_eq!(old, current);
}

/// `describe` runs after every scan and its answer is judged like the scan's:
/// a version that is not semver fails the first scan, naming the device and
/// the attribute.
#[tokio::test]
async fn a_describe_answer_that_breaks_the_rules_fails_the_scan_naming_it() {
    let dirs = Dirs::new();
    dirs.add_module("virtual", guests::VIRTUAL_DEVICES);
    dirs.add_module("bad", guests::VIRTUAL_DEVICES);
    dirs.write_manifest(
        "bad",
        "domain = \"bad.example.com\"\n[config]\nkinds = \"dev-1=1\"\nfirmware = \"1.2\"\n",
    );
    let fixture = Fixture::start(dirs);
    fixture.listed(DEV1).await;
    let states = fixture.settled().await;
    let Some(ModuleState::Failed(reason)) = states.get("bad") else {
        panic!("a module whose describe breaks the rules served: {states:?}");
    };
    assert!(
        reason.contains("describe[\"dev-1\"][\"/node1/dev1/1\"].attributes[\"firmware\"]")
            && reason.contains("semantic version"),
        "{reason}"
    );
    fixture.stop().await;
}

#[tokio::test]
async fn a_module_built_against_0_2_0_gets_its_health_checked() {
    let fixture = serving("virtual", fixtures::VIRTUAL_DEVICES_0_2_0, None, DEV1).await;
    let addr = fixture.serve_endpoints().await;
    fixture
        .set_config("virtual", &[("unhealthy", "/node1/dev1/2")])
        .await;
    fixture
        .wait_for("dev1/2 unhealthy", |v| {
            health_of(v, DEV1, "/node1/dev1/2") == Some("Unhealthy")
        })
        .await;
    let page = fixture.scrape(addr).await;
    let health_calls = sample(
        &page,
        "wdp_guest_call_duration_seconds_count",
        &[("module", "virtual"), ("function", "health")],
    );
    assert!(
        health_calls.is_some_and(|n| n >= 1.0),
        "the 0.2.0 module's own `health` export is called: {health_calls:?}"
    );
    fixture.stop().await;
}

#[tokio::test]
async fn a_scan_only_module_is_served_and_allocates_the_merge_of_its_devices() {
    let fixture = serving("widgets", guests::SCAN_ONLY, None, WIDGET).await;
    let response = fixture
        .kubelet
        .allocate(WIDGET, &[&["w0", "w1"], &["w2"]])
        .await
        .expect("allocated");
    assert_eq!(
        sorted(&response.container_responses[0].envs),
        BTreeMap::from([("WIDGET_IDS", "w0,w1"), ("WIDGET_MODE", "shared")])
    );
    assert_eq!(
        sorted(&response.container_responses[0].annotations),
        BTreeMap::from([("example.com/widgets", "w0,w1")])
    );
    let nodes: Vec<&str> = response.container_responses[0]
        .devices
        .iter()
        .map(|d| d.container_path.as_str())
        .collect();
    assert_eq!(nodes, ["/dev/widget0", "/dev/widget-ctl", "/dev/widget1"]);
    let cdi: Vec<&str> = response.container_responses[0]
        .cdi_devices
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    assert_eq!(
        cdi,
        [
            "example.com/widget=w0",
            "example.com/widget=ctl",
            "example.com/widget=w1"
        ]
    );
    assert_eq!(
        sorted(&response.container_responses[1].envs),
        BTreeMap::from([("WIDGET_IDS", "w2"), ("WIDGET_MODE", "shared")])
    );
    fixture.stop().await;
}

#[tokio::test]
async fn a_scan_only_module_is_not_instantiated_to_allocate() {
    let fixture = serving("widgets", guests::SCAN_ONLY, None, WIDGET).await;
    let addr = fixture.serve_endpoints().await;
    let instances = |page: &str| {
        sample(
            page,
            "wdp_guest_instantiation_duration_seconds_count",
            &[("module", "widgets")],
        )
    };
    let before = instances(&fixture.scrape(addr).await);
    assert_eq!(before, Some(1.0), "the first scan's instance");
    fixture
        .kubelet
        .allocate(WIDGET, &[&["w0", "w1"]])
        .await
        .expect("allocated");
    assert_eq!(instances(&fixture.scrape(addr).await), before);
    fixture.stop().await;
}

#[tokio::test]
async fn a_scan_only_module_whose_grants_narrow_is_refused_what_they_no_longer_allow() {
    let fixture = serving("widgets", guests::SCAN_ONLY, None, WIDGET).await;
    fixture
        .kubelet
        .allocate(WIDGET, &[&["w0"]])
        .await
        .expect("allocated under the default grants");
    // The rescan the edit starts is refused (w0's node `/dev/null` is no longer
    // granted), so the resource keeps the snapshot checked under the old
    // grants while the module runs with the new ones: its allocations are
    // checked again, not trusted.
    fixture
        .dirs
        .write_manifest("widgets", "[grants]\ndevice-paths = [\"/dev/zero\"]\n");
    let reason = fixture.refused("widgets", 1).await;
    assert!(reason.contains("/dev/null"), "{reason}");
    let (code, message) = status_of(fixture.kubelet.allocate(WIDGET, &[&["w0"]]).await);
    assert_eq!(code, Code::Internal);
    assert!(
        message.contains("/dev/null") && message.contains("devices[0].host-path"),
        "{message}"
    );
    fixture.stop().await;
}

#[tokio::test]
async fn a_scan_only_module_with_two_mounts_at_one_path_is_refused_the_allocation() {
    let manifest = "[grants]\nmount-paths = [\"/var/lib\"]\n\n[config]\nconflict = \"mount\"\n";
    let fixture = serving("widgets", guests::SCAN_ONLY, Some(manifest), WIDGET).await;
    let (code, message) = status_of(fixture.kubelet.allocate(WIDGET, &[&["w0", "w1"]]).await);
    assert_eq!(code, Code::InvalidArgument);
    assert!(message.contains("/data"), "names the path: {message}");
    // Devices that do not conflict still allocate.
    let response = fixture
        .kubelet
        .allocate(WIDGET, &[&["w0", "w2"]])
        .await
        .expect("no conflict");
    assert_eq!(response.container_responses[0].mounts.len(), 1);
    fixture.stop().await;
}

#[tokio::test]
async fn a_module_without_health_gets_health_from_rescans() {
    let fixture = serving("widgets", guests::SCAN_ONLY, None, WIDGET).await;
    fixture.set_config("widgets", &[("unhealthy", "w1")]).await;
    let view = fixture
        .wait_for("w1 unhealthy", |v| {
            health_of(v, WIDGET, "w1") == Some("Unhealthy")
        })
        .await;
    assert_eq!(health_of(&view, WIDGET, "w0"), Some("Healthy"));
    // Health checks (every 50 ms here) never ran, so never failed.
    assert!(
        fixture
            .host
            .refusals()
            .borrow()
            .iter()
            .all(|r| r.module != "widgets"),
        "{:?}",
        fixture.host.refusals().borrow()
    );
    fixture.stop().await;
}

#[tokio::test]
async fn a_module_with_allocate_but_no_post_allocate_answers_with_its_allocate() {
    let fixture = serving("gadgets", guests::ALLOCATE_ONLY, None, "example.com/gadget").await;
    let response = fixture
        .kubelet
        .allocate("example.com/gadget", &[&["g0", "g1"]])
        .await
        .expect("allocated");
    assert_eq!(
        sorted(&response.container_responses[0].envs),
        BTreeMap::from([("GADGET_IDS", "g0:g1")])
    );
    assert!(response.container_responses[0].annotations.is_empty());
    fixture.stop().await;
}

#[tokio::test]
async fn post_allocate_without_allocate_receives_the_hosts_merge() {
    let fixture = serving(
        "gizmos",
        guests::POST_ALLOCATE_ONLY,
        None,
        "example.com/gizmo",
    )
    .await;
    let response = fixture
        .kubelet
        .allocate("example.com/gizmo", &[&["z0", "z1"]])
        .await
        .expect("allocated");
    assert_eq!(
        sorted(&response.container_responses[0].envs),
        BTreeMap::from([("GIZMO_IDS", "z0,z1")])
    );
    assert_eq!(
        sorted(&response.container_responses[0].annotations),
        BTreeMap::from([("example.com/seen", "z0,z1")])
    );
    fixture.stop().await;
}

/// Loads `wasm` as module `bad` beside virtual-devices; the reason it failed.
async fn refused(wasm: &str) -> String {
    let dirs = Dirs::new();
    dirs.add_module("virtual", guests::VIRTUAL_DEVICES);
    dirs.add_module("bad", wasm);
    let fixture = Fixture::start(dirs);
    fixture.listed(DEV1).await;
    let states = fixture.settled().await;
    let Some(ModuleState::Failed(reason)) = states.get("bad") else {
        panic!("bad module not refused: {states:?}");
    };
    let reason = reason.clone();
    fixture.stop().await;
    reason
}

#[tokio::test]
async fn an_optional_export_of_the_wrong_type_is_refused_naming_it() {
    let reason = refused(guests::WRONG_ALLOCATE).await;
    assert!(
        reason.contains(&format!("wasm-device-plugin:device@{PACKAGE_VERSION}"))
            && reason.contains("export `allocate`"),
        "{reason}"
    );
}

#[tokio::test]
async fn a_component_without_scan_is_refused_naming_it() {
    let reason = refused(guests::MISSING_EXPORT).await;
    assert!(reason.contains("does not export `scan`"), "{reason}");
}
