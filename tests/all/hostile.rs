//! Hostile and broken guests: each misbehaviour of the `faulty` test guest is
//! stopped or refused with a clear reason, and the well-behaved `virtual`
//! module loaded beside it keeps answering throughout.

use std::collections::BTreeMap;
use std::time::Duration;

use tonic::Code;
use wasm_device_plugin::registry::ModuleState;
use wdp_tests::{Dirs, Fixture, WAIT, guests, ids, status_of, test_settings};

const FAULTY: &str = "example.com/faulty";
const DEV1: &str = "example.com/dev-1";

/// The faulty module (with `manifest`, if any) beside the virtual-devices one,
/// with short limits: 300 ms per allocation, 500 ms per scan, 16 MiB of memory.
/// Returns once the virtual module is listed and the faulty one has loaded or
/// failed.
async fn beside_a_good_module(manifest: Option<&str>) -> Fixture {
    let dirs = Dirs::new();
    dirs.add_module("faulty", guests::FAULTY);
    dirs.add_module("virtual", guests::VIRTUAL_DEVICES);
    if let Some(text) = manifest {
        dirs.write_manifest("faulty", text);
    }
    let mut settings = test_settings(&dirs.kubelet());
    settings.limits.allocate_deadline = Duration::from_millis(300);
    settings.limits.scan_deadline = Duration::from_millis(500);
    settings.limits.memory_bytes = 16 * 1024 * 1024;
    let fixture = Fixture::start_with(dirs, settings);
    fixture.listed(DEV1).await;
    fixture.settled().await;
    fixture
}

/// The faulty module serving its three devices beside the good one.
async fn faulty() -> Fixture {
    let fixture = beside_a_good_module(None).await;
    fixture
        .wait_for("faulty listed", |v| ids(v, FAULTY).len() == 3)
        .await;
    fixture
}

/// The faulty module failed to load with a reason containing `expected`; the
/// good one serves.
async fn fails_to_load(config: &str, expected: &str) {
    let fixture = beside_a_good_module(Some(&format!("[config]\n{config}\n"))).await;
    let state = fixture
        .module_state("faulty", |s| matches!(s, Some(ModuleState::Failed(_))))
        .await;
    let Some(ModuleState::Failed(reason)) = state else {
        unreachable!()
    };
    assert!(reason.contains(expected), "{reason}");
    assert!(
        reason.contains("faulty.wasm") || reason.contains("module faulty"),
        "names the module: {reason}"
    );
    neighbour_still_answers(&fixture).await;
    fixture.stop().await;
}

/// Sets the faulty module's configuration through its manifest.
async fn configure(fixture: &Fixture, pairs: &[(&str, &str)]) {
    fixture.set_config("faulty", pairs).await;
}

/// Allocates `f0` from the faulty module and returns the gRPC code and message.
/// Bounded by [`WAIT`]: a call the host fails to stop fails the test.
async fn allocate_error(fixture: &Fixture) -> (Code, String) {
    let call = fixture.kubelet.allocate(FAULTY, &[&["f0"]]);
    match tokio::time::timeout(WAIT, call).await {
        Ok(result) => status_of(result),
        Err(_) => panic!("Allocate did not return within {WAIT:?}"),
    }
}

/// The well-behaved module answers Allocate.
async fn neighbour_still_answers(fixture: &Fixture) {
    let response = fixture
        .kubelet
        .allocate(DEV1, &[&["/node1/dev1/1"]])
        .await
        .expect("the well-behaved module still allocates");
    assert_eq!(
        response.container_responses[0]
            .envs
            .get("DEV_dev_1_ID_0")
            .map(String::as_str),
        Some("/node1/dev1/1")
    );
}

/// After a failure, a well-behaved call on the faulty module succeeds too, and
/// so does one on its neighbour.
async fn both_still_answer(fixture: &Fixture) {
    configure(fixture, &[]).await;
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
    neighbour_still_answers(fixture).await;
}

/// Allocate fails with `code` and a message containing `expected`, naming the
/// module; both modules answer afterwards.
async fn allocate_refused(pairs: &[(&str, &str)], code: Code, expected: &str) {
    let fixture = faulty().await;
    configure(&fixture, pairs).await;
    let (got, message) = allocate_error(&fixture).await;
    assert_eq!(got, code, "{pairs:?}: {message}");
    assert!(
        message.contains("module faulty"),
        "names the module: {message}"
    );
    assert!(message.contains(expected), "{pairs:?}: {message}");
    both_still_answer(&fixture).await;
    fixture.stop().await;
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
        configure(&fixture, &[("fail", spec)]).await;
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
    both_still_answer(&fixture).await;
    fixture.stop().await;
}

// --- Traps, one per export -------------------------------------------------

#[tokio::test]
async fn a_trap_in_scan_at_load_fails_the_module() {
    fails_to_load("trap = \"scan\"", "scan failed: trapped").await;
}

#[tokio::test]
async fn a_trap_in_a_rescan_keeps_the_last_good_list_and_is_retried_with_backoff() {
    let fixture = faulty().await;
    configure(&fixture, &[("trap", "scan"), ("devices", "5")]).await;
    let reason = fixture.refused("faulty", 1).await;
    assert!(reason.contains("scan failed"), "{reason}");
    assert!(reason.contains("trapped"), "{reason}");
    assert_eq!(
        ids(&fixture.kubelet.view(), FAULTY).len(),
        3,
        "last good list kept"
    );
    neighbour_still_answers(&fixture).await;
    // Fixed without asking for a re-scan, and the scheduled one is an hour away:
    // only the retry can bring the five devices.
    configure(&fixture, &[("devices", "5")]).await;
    fixture
        .wait_for("the retried scan's list", |v| ids(v, FAULTY).len() == 5)
        .await;
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
    fixture
        .set_config("virtual", &[("kinds", "dev-1=many")])
        .await;
    // A good configuration afterwards: its list is the next update on the stream.
    fixture
        .set_config("virtual", &[("kinds", "dev-1=5,dev-2=2")])
        .await;
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
async fn a_trap_in_health_keeps_the_last_known_health() {
    let fixture = faulty().await;
    let updates = fixture.kubelet.view().plugins[FAULTY].updates.len();
    configure(&fixture, &[("trap", "health")]).await;
    let reason = fixture.refused("faulty", 1).await;
    assert!(reason.contains("health failed"), "{reason}");
    assert!(reason.contains("trapped"), "{reason}");
    let view = fixture.kubelet.view();
    let plugin = &view.plugins[FAULTY];
    assert_eq!(plugin.updates.len(), updates, "nothing published");
    assert_eq!(plugin.healthy_ids(), ["f0", "f1", "f2"]);
    both_still_answer(&fixture).await;
    fixture.stop().await;
}

#[tokio::test]
async fn a_trap_in_allocate_is_internal() {
    allocate_refused(&[("trap", "allocate")], Code::Internal, "trapped").await;
}

#[tokio::test]
async fn a_trap_in_post_allocate_is_internal() {
    allocate_refused(&[("trap", "post-allocate")], Code::Internal, "trapped").await;
}

// --- Runaway calls ---------------------------------------------------------

#[tokio::test]
async fn an_allocate_that_never_returns_is_stopped_at_its_deadline() {
    allocate_refused(
        &[("spin", "allocate")],
        Code::DeadlineExceeded,
        "deadline of 300ms",
    )
    .await;
}

#[tokio::test]
async fn an_allocate_that_sleeps_in_the_host_is_stopped_at_its_deadline() {
    allocate_refused(
        &[("sleep", "allocate")],
        Code::DeadlineExceeded,
        "deadline of 300ms",
    )
    .await;
}

#[tokio::test]
async fn a_scan_that_never_returns_fails_the_module_at_its_deadline() {
    fails_to_load("spin = \"scan\"", "deadline of 500ms").await;
}

#[tokio::test]
async fn an_allocate_that_hoards_memory_is_stopped_at_its_cap() {
    allocate_refused(
        &[("grow", "allocate")],
        Code::Internal,
        "memory limit of 16 MiB",
    )
    .await;
}

#[tokio::test]
async fn a_scan_that_hoards_memory_fails_the_module_at_its_cap() {
    fails_to_load("grow = \"scan\"", "memory limit of 16 MiB").await;
}

// --- The sandbox -----------------------------------------------------------

#[tokio::test]
async fn a_guest_sees_no_environment_arguments_or_files() {
    let fixture = faulty().await;
    configure(&fixture, &[("probe", "sandbox")]).await;
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
        ])
    );
    neighbour_still_answers(&fixture).await;
    fixture.stop().await;
}

#[tokio::test]
async fn a_granted_directory_is_readable_and_nothing_beside_or_through_it() {
    let outside = tempfile::tempdir().expect("temp dir");
    let granted = outside.path().join("granted");
    std::fs::create_dir(&granted).expect("granted dir");
    std::fs::write(granted.join("ok.txt"), "visible").expect("file");
    std::fs::write(outside.path().join("secret.txt"), "secret").expect("file");
    std::os::unix::fs::symlink("/etc/passwd", granted.join("passwd")).expect("link");
    let manifest = format!(
        "[grants]\nread-only-dirs = [{granted:?}]\n[config]\nprobe = \"sandbox\"\nprobe-read = \"{}\"\nprobe-escape = \"{}\"\nprobe-write = \"{}\"\n",
        granted.join("ok.txt").display(),
        granted.join("../secret.txt").display(),
        granted.join("new.txt").display(),
    );
    let fixture = beside_a_good_module(Some(&manifest)).await;
    fixture
        .wait_for("faulty listed", |v| ids(v, FAULTY).len() == 3)
        .await;
    let response = fixture
        .kubelet
        .allocate(FAULTY, &[&["f0"]])
        .await
        .expect("probe answers");
    let envs = &response.container_responses[0].envs;
    let env = |k: &str| envs.get(k).map(String::as_str);
    assert_eq!(env("PROBE_GRANTED"), Some("ok:visible"));
    assert_eq!(env("PROBE_ESCAPE"), Some("denied"), "`..` out of the grant");
    assert_eq!(env("PROBE_READ"), Some("denied"), "/etc/passwd");
    assert_eq!(env("PROBE_WRITE"), Some("denied"), "read-only");
    assert!(!granted.join("new.txt").exists());
    // The symlink inside the grant that points at /etc/passwd does not lead out.
    configure(
        &fixture,
        &[
            ("probe", "sandbox"),
            ("probe-read", &granted.join("passwd").display().to_string()),
        ],
    )
    .await;
    let response = fixture
        .kubelet
        .allocate(FAULTY, &[&["f0"]])
        .await
        .expect("probe answers");
    assert_eq!(
        response.container_responses[0]
            .envs
            .get("PROBE_GRANTED")
            .map(String::as_str),
        Some("denied"),
        "symlink out of the grant"
    );
    neighbour_still_answers(&fixture).await;
    fixture.stop().await;
}

// --- Output policy: scans --------------------------------------------------

/// A module whose first scan breaks `rule` is not loaded; the reason names the
/// field and the rule.
async fn scan_refused(rule: &str, field: &str, expected: &str) {
    let fixture = beside_a_good_module(Some(&format!("[config]\nbogus = \"{rule}\"\n"))).await;
    let Some(ModuleState::Failed(reason)) = fixture
        .module_state("faulty", |s| matches!(s, Some(ModuleState::Failed(_))))
        .await
    else {
        unreachable!()
    };
    assert!(reason.contains("module faulty"), "{rule}: {reason}");
    assert!(reason.contains(field), "{rule}: names {field}: {reason}");
    assert!(reason.contains(expected), "{rule}: {reason}");
    neighbour_still_answers(&fixture).await;
    fixture.stop().await;
}

#[tokio::test]
async fn scan_with_an_empty_device_id_is_refused() {
    scan_refused("empty-id", "kinds[\"faulty\"].devices", "empty").await;
}

#[tokio::test]
async fn scan_with_a_device_id_over_253_bytes_is_refused() {
    scan_refused("long-id", "kinds[\"faulty\"].devices", "253").await;
}

#[tokio::test]
async fn scan_with_a_repeated_device_id_is_refused() {
    scan_refused("duplicate-id", "kinds[\"faulty\"].devices", "f0").await;
}

#[tokio::test]
async fn scan_with_more_than_10000_devices_in_a_kind_is_refused() {
    scan_refused("too-many-devices", "kinds[\"faulty\"].devices", "10000").await;
}

#[tokio::test]
async fn scan_with_an_invalid_resource_name_is_refused() {
    scan_refused("bad-kind-name", "kinds[\"Bad Kind!\"]", "Bad Kind!").await;
}

#[tokio::test]
async fn scan_with_a_kubernetes_io_resource_name_is_refused() {
    scan_refused(
        "kubernetes-io",
        "kinds[\"kubernetes.io/faulty\"]",
        "kubernetes.io",
    )
    .await;
}

#[tokio::test]
async fn scan_with_a_repeated_kind_is_refused() {
    scan_refused("duplicate-kind", "kinds[\"faulty\"]", "reported twice").await;
}

#[tokio::test]
async fn scan_with_more_than_256_kinds_is_refused() {
    scan_refused("too-many-kinds", "scan", "257 kinds").await;
}

#[tokio::test]
async fn scan_reporting_a_protected_device_node_for_a_device_is_refused() {
    // What a device needs is judged when the scan reports it, before any Allocate.
    let fixture = beside_a_good_module(Some(
        "[config]\nbogus = \"scan-allocation\"\npath = \"/dev/mem\"\n",
    ))
    .await;
    let Some(ModuleState::Failed(reason)) = fixture
        .module_state("faulty", |s| matches!(s, Some(ModuleState::Failed(_))))
        .await
    else {
        unreachable!()
    };
    assert!(
        reason.contains("kinds[\"faulty\"].devices[\"f0\"].allocation.devices[0].host-path")
            && reason.contains("/dev/mem"),
        "{reason}"
    );
    neighbour_still_answers(&fixture).await;
    fixture.stop().await;
}

#[tokio::test]
async fn a_health_answer_of_the_wrong_length_is_refused() {
    let fixture = faulty().await;
    configure(&fixture, &[("bogus", "health-count")]).await;
    let reason = fixture.refused("faulty", 1).await;
    assert!(
        reason.contains("health failed") && reason.contains("answered 4 entries for 3 devices"),
        "{reason}"
    );
    assert_eq!(
        fixture.kubelet.view().plugins[FAULTY].healthy_ids(),
        ["f0", "f1", "f2"]
    );
    both_still_answer(&fixture).await;
    fixture.stop().await;
}

// --- Output policy: allocations ----------------------------------------------

/// Allocate is refused with Internal, naming the module, `field` and `rule`.
async fn allocation_refused(pairs: &[(&str, &str)], field: &str, rule: &str) {
    let fixture = faulty().await;
    refused_on(&fixture, pairs, field, rule).await;
    fixture.stop().await;
}

async fn refused_on(fixture: &Fixture, pairs: &[(&str, &str)], field: &str, rule: &str) {
    configure(fixture, pairs).await;
    let (code, message) = allocate_error(fixture).await;
    assert_eq!(code, Code::Internal, "{pairs:?}: {message}");
    assert!(message.contains("module faulty"), "{pairs:?}: {message}");
    assert!(
        message.contains(field),
        "{pairs:?}: names {field}: {message}"
    );
    assert!(message.contains(rule), "{pairs:?}: {message}");
    both_still_answer(fixture).await;
}

#[tokio::test]
async fn allocation_for_another_number_of_containers_is_refused() {
    allocation_refused(
        &[("bogus", "container-count")],
        "allocate",
        "answered 2 containers for 1 requested",
    )
    .await;
}

#[tokio::test]
async fn allocation_with_an_invalid_env_name_is_refused() {
    allocation_refused(
        &[("bogus", "env-name")],
        "containers[0].envs[\"1NOT-A-NAME\"]",
        "not a valid environment variable name",
    )
    .await;
}

#[tokio::test]
async fn allocation_setting_an_env_var_twice_is_refused() {
    allocation_refused(
        &[("bogus", "duplicate-env")],
        "containers[0].envs[\"SAME\"]",
        "set twice",
    )
    .await;
}

#[tokio::test]
async fn allocation_with_too_many_env_vars_is_refused() {
    allocation_refused(
        &[("bogus", "too-many-envs")],
        "containers[0].envs",
        "1025 entries is more than the 1024 allowed",
    )
    .await;
}

#[tokio::test]
async fn allocation_larger_than_kubelet_accepts_is_refused() {
    allocation_refused(
        &[("bogus", "huge-response")],
        "allocate",
        "more than the 3145728 kubelet can be sent",
    )
    .await;
}

#[tokio::test]
async fn allocation_with_an_invalid_annotation_key_is_refused() {
    allocation_refused(
        &[("bogus", "annotation-key")],
        "containers[0].annotations[\"not a key\"]",
        "not a Kubernetes qualified name",
    )
    .await;
}

#[tokio::test]
async fn allocation_with_an_invalid_cdi_name_is_refused() {
    allocation_refused(
        &[("bogus", "cdi-name")],
        "containers[0].cdi-devices[0]",
        "not a CDI device name",
    )
    .await;
}

#[tokio::test]
async fn allocation_with_a_relative_container_path_is_refused() {
    allocation_refused(
        &[("bogus", "container-path")],
        "containers[0].devices[0].container-path",
        "not an absolute path",
    )
    .await;
}

#[tokio::test]
async fn allocation_with_a_dot_dot_host_path_is_refused() {
    allocation_refused(
        &[("bogus", "unnormalised-path")],
        "containers[0].devices[0].host-path",
        "not a normalised path",
    )
    .await;
}

#[tokio::test]
async fn allocation_with_bad_device_permissions_is_refused() {
    allocation_refused(
        &[("bogus", "permissions")],
        "containers[0].devices[0].permissions",
        "must be made of r, w and m",
    )
    .await;
}

#[tokio::test]
async fn device_node_outside_dev_is_refused_by_default() {
    allocation_refused(
        &[("bogus", "device-path"), ("path", "/etc/passwd")],
        "containers[0].devices[0].host-path",
        "protected host path `/etc`",
    )
    .await;
    allocation_refused(
        &[("bogus", "device-path"), ("path", "/opt/fpga0")],
        "containers[0].devices[0].host-path",
        "not under a host path the operator allowed (granted: `/dev`",
    )
    .await;
}

#[tokio::test]
async fn device_node_symlinked_out_of_its_granted_prefix_is_refused() {
    let root = tempfile::tempdir().expect("temp dir");
    let dev = root.path().join("dev");
    std::fs::create_dir(&dev).expect("dev");
    std::fs::write(dev.join("fpga0"), "").expect("node");
    std::os::unix::fs::symlink("fpga0", dev.join("alias")).expect("link");
    std::os::unix::fs::symlink("/etc", dev.join("x")).expect("link");
    let fixture =
        beside_a_good_module(Some(&format!("[grants]\ndevice-paths = [{dev:?}]\n"))).await;
    fixture
        .wait_for("faulty listed", |v| ids(v, FAULTY).len() == 3)
        .await;
    // A node under the grant is handed out, resolved: kubelet gets the node the
    // host checked, whatever the link says later...
    let node = dev.join("fpga0").display().to_string();
    for path in [dev.join("fpga0"), dev.join("alias")] {
        let path = path.display().to_string();
        configure(&fixture, &[("bogus", "device-path"), ("path", &path)]).await;
        let response = fixture
            .kubelet
            .allocate(FAULTY, &[&["f0"]])
            .await
            .expect("a granted node is allowed");
        assert_eq!(response.container_responses[0].devices[0].host_path, node);
    }
    // ...but the link under the grant that points at /etc is not.
    let link = dev.join("x").display().to_string();
    refused_on(
        &fixture,
        &[("bogus", "device-path"), ("path", &link)],
        "containers[0].devices[0].host-path",
        "(resolves to `/etc`)",
    )
    .await;
    fixture.stop().await;
}

#[tokio::test]
async fn mount_without_a_grant_is_refused() {
    allocation_refused(
        &[("bogus", "mount-path"), ("path", "/opt/data")],
        "containers[0].mounts[0].host-path",
        "none are granted",
    )
    .await;
}

#[tokio::test]
async fn mount_of_kubelet_state_is_refused_even_when_its_parent_is_granted() {
    let fixture = beside_a_good_module(Some("[grants]\nmount-paths = [\"/var/lib\"]\n")).await;
    fixture
        .wait_for("faulty listed", |v| ids(v, FAULTY).len() == 3)
        .await;
    configure(
        &fixture,
        &[("bogus", "mount-path"), ("path", "/var/lib/data")],
    )
    .await;
    let response = fixture
        .kubelet
        .allocate(FAULTY, &[&["f0"]])
        .await
        .expect("a granted mount is allowed");
    assert_eq!(
        response.container_responses[0].mounts[0].host_path,
        "/var/lib/data"
    );
    for path in ["/var/lib/kubelet", "/var/lib/kubelet/pods"] {
        refused_on(
            &fixture,
            &[("bogus", "mount-path"), ("path", path)],
            "containers[0].mounts[0].host-path",
            "protected host path `/var/lib/kubelet`",
        )
        .await;
    }
    // The granted directory itself holds kubelet's state: refused too.
    refused_on(
        &fixture,
        &[("bogus", "mount-path"), ("path", "/var/lib")],
        "containers[0].mounts[0].host-path",
        "is or holds the protected host path",
    )
    .await;
    fixture.stop().await;
}
