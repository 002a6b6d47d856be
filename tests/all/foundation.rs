//! The first slice: a wasm guest's devices registered, advertised and allocated
//! through the device-plugin protocol.

use std::collections::BTreeMap;

use clap::Parser;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::ResourceClaim;
use kube::Api;
use tonic::Code;
use wasm_device_plugin::config::{Cli, Command};
use wasm_device_plugin::kubelet::deviceplugin::simulator::KubeletView;
use wasm_device_plugin::registry::ModuleState;
use wdp_tests::apiserver::ApiServer;
use wdp_tests::{Dirs, Fixture, WAIT, guests, ids, status_of};

const DEV1: &str = "example.com/dev-1";
const DEV2: &str = "example.com/dev-2";

fn virtual_devices() -> Dirs {
    let dirs = Dirs::new();
    dirs.add_module("virtual", guests::VIRTUAL_DEVICES);
    dirs
}

/// Waits until both virtual-devices resources have sent their first list.
async fn both_listed(fixture: &Fixture) -> KubeletView {
    fixture
        .kubelet
        .wait_for(WAIT, "both resources listed", |v| {
            [DEV1, DEV2]
                .iter()
                .all(|r| v.plugin(r).is_some_and(|p| !p.updates.is_empty()))
        })
        .await
        .expect("registered and listed")
}

#[tokio::test]
async fn registration_carries_version_endpoint_and_resource_names() {
    let fixture = Fixture::start(virtual_devices());
    let view = both_listed(&fixture).await;
    for resource in [DEV1, DEV2] {
        let plugin = view.plugin(resource).expect("registered");
        let r = &plugin.registration;
        assert_eq!(r.version, "v1beta1");
        assert_eq!(r.resource_name, resource);
        assert!(
            !r.endpoint.contains('/'),
            "endpoint {} must be a file name",
            r.endpoint
        );
        assert!(
            r.endpoint.starts_with(&resource.replace('/', "_")),
            "endpoint {} names the resource",
            r.endpoint
        );
        let path = fixture.dirs.kubelet().join(&r.endpoint);
        assert!(std::os::unix::fs::FileTypeExt::is_socket(
            &std::fs::metadata(&path).expect("socket").file_type()
        ));
        let options = r.options.expect("options sent");
        assert!(!options.pre_start_required);
        assert!(options.get_preferred_allocation_available);
        assert_eq!(
            plugin.options,
            Some(options),
            "GetDevicePluginOptions agrees with the registration"
        );
        assert_eq!(plugin.registrations, 1);
    }
    assert_ne!(
        view.plugins[DEV1].registration.endpoint,
        view.plugins[DEV2].registration.endpoint
    );
    assert!(view.refused.is_empty());
    fixture.stop().await;
}

#[tokio::test]
async fn list_and_watch_lists_the_guests_devices() {
    let fixture = Fixture::start(virtual_devices());
    let view = both_listed(&fixture).await;
    assert_eq!(
        ids(&view, DEV1),
        [
            "/node1/dev1/1",
            "/node1/dev1/2",
            "/node1/dev1/3",
            "/node1/dev1/4"
        ]
    );
    assert_eq!(ids(&view, DEV2), ["/node1/dev2/1", "/node1/dev2/2"]);
    assert!(
        view.plugins[DEV1]
            .devices
            .iter()
            .all(|d| d.health == "Healthy" && d.topology.is_none())
    );
    let states = fixture.settled().await;
    assert_eq!(
        states.get("virtual"),
        Some(&ModuleState::Serving(vec![
            DEV1.to_string(),
            DEV2.to_string()
        ]))
    );
    fixture.stop().await;
}

#[tokio::test]
async fn allocate_two_devices_returns_the_guests_env_and_annotations() {
    let fixture = Fixture::start(virtual_devices());
    both_listed(&fixture).await;
    let response = fixture
        .kubelet
        .allocate(DEV1, &[&["/node1/dev1/2", "/node1/dev1/4"]])
        .await
        .expect("allocated");
    assert_eq!(response.container_responses.len(), 1);
    let c = &response.container_responses[0];
    let envs: BTreeMap<_, _> = c
        .envs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        envs,
        BTreeMap::from([
            ("DEV_dev_1_ID_0", "/node1/dev1/2"),
            ("DEV_dev_1_ID_1", "/node1/dev1/4")
        ])
    );
    // Added by the guest's allocate (by its post-allocate up to 0.2.0).
    assert_eq!(
        c.annotations
            .get("virtual.example.com/devices")
            .map(String::as_str),
        Some("/node1/dev1/2,/node1/dev1/4")
    );
    fixture.stop().await;
}

#[tokio::test]
async fn allocate_answers_each_container_in_order() {
    let fixture = Fixture::start(virtual_devices());
    both_listed(&fixture).await;
    let response = fixture
        .kubelet
        .allocate(
            DEV1,
            &[&["/node1/dev1/3"], &["/node1/dev1/1", "/node1/dev1/2"]],
        )
        .await
        .expect("allocated");
    let envs: Vec<BTreeMap<&str, &str>> = response
        .container_responses
        .iter()
        .map(|c| {
            c.envs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect()
        })
        .collect();
    assert_eq!(
        envs,
        [
            BTreeMap::from([("DEV_dev_1_ID_0", "/node1/dev1/3")]),
            BTreeMap::from([
                ("DEV_dev_1_ID_0", "/node1/dev1/1"),
                ("DEV_dev_1_ID_1", "/node1/dev1/2")
            ]),
        ]
    );
    fixture.stop().await;
}

#[tokio::test]
async fn allocate_of_an_unknown_device_is_invalid_argument_naming_it() {
    let fixture = Fixture::start(virtual_devices());
    both_listed(&fixture).await;
    let err = fixture
        .kubelet
        .allocate(DEV1, &[&["/node1/dev1/1", "/node1/dev9/9"]])
        .await;
    let (code, message) = status_of(err);
    assert_eq!(code, Code::InvalidArgument);
    assert!(
        message.contains("/node1/dev9/9"),
        "message names the id: {message}"
    );
    // A device of another resource is unknown here too.
    let err = fixture.kubelet.allocate(DEV2, &[&["/node1/dev1/1"]]).await;
    assert_eq!(status_of(err).0, Code::InvalidArgument);
    fixture.stop().await;
}

#[tokio::test]
async fn allocate_without_devices_or_with_a_repeated_id_is_invalid_argument() {
    let fixture = Fixture::start(virtual_devices());
    both_listed(&fixture).await;
    let err = fixture.kubelet.allocate(DEV1, &[]).await;
    assert_eq!(status_of(err).0, Code::InvalidArgument);
    let err = fixture.kubelet.allocate(DEV1, &[&[]]).await;
    assert_eq!(status_of(err).0, Code::InvalidArgument);
    let err = fixture
        .kubelet
        .allocate(DEV1, &[&["/node1/dev1/1"], &["/node1/dev1/1"]])
        .await;
    assert_eq!(status_of(err).0, Code::InvalidArgument);
    fixture.stop().await;
}

#[tokio::test]
async fn device_unhealthy_then_recovered_reaches_the_same_stream_both_times() {
    let fixture = Fixture::start(virtual_devices());
    both_listed(&fixture).await;
    // The operator's edit re-scans; the scan's health and the periodic health
    // check agree.
    fixture
        .set_config("virtual", &[("unhealthy", "/node1/dev1/2")])
        .await;
    let view = fixture
        .kubelet
        .wait_for(WAIT, "dev1/2 unhealthy", |v| {
            v.plugin(DEV1).is_some_and(|p| {
                p.devices
                    .iter()
                    .any(|d| d.id == "/node1/dev1/2" && d.health == "Unhealthy")
            })
        })
        .await
        .expect("unhealthy advertised");
    assert_eq!(
        view.plugins[DEV1].healthy_ids(),
        ["/node1/dev1/1", "/node1/dev1/3", "/node1/dev1/4"]
    );

    // An unhealthy device cannot be allocated.
    let err = fixture.kubelet.allocate(DEV1, &[&["/node1/dev1/2"]]).await;
    let (code, message) = status_of(err);
    assert_eq!(code, Code::FailedPrecondition);
    assert!(message.contains("/node1/dev1/2"));

    fixture.set_config("virtual", &[]).await;
    let view = fixture
        .kubelet
        .wait_for(WAIT, "dev1/2 healthy again", |v| {
            v.plugin(DEV1).is_some_and(|p| p.healthy_ids().len() == 4)
        })
        .await
        .expect("recovery advertised");
    let plugin = &view.plugins[DEV1];
    assert_eq!(plugin.registrations, 1, "no re-registration was needed");
    assert!(plugin.streaming);
    let health_of_2: Vec<&str> = plugin
        .updates
        .iter()
        .filter_map(|u| {
            u.iter()
                .find(|d| d.id == "/node1/dev1/2")
                .map(|d| d.health.as_str())
        })
        .collect();
    assert_eq!(
        health_of_2,
        ["Healthy", "Unhealthy", "Healthy"],
        "one update per change, on one stream"
    );
    fixture
        .kubelet
        .allocate(DEV1, &[&["/node1/dev1/2"]])
        .await
        .expect("allocatable again");
    fixture.stop().await;
}

#[tokio::test]
async fn rescan_sends_a_changed_device_list_on_the_same_stream() {
    let fixture = Fixture::start(virtual_devices());
    both_listed(&fixture).await;
    fixture
        .set_config("virtual", &[("kinds", "dev-1=6,dev-2=2")])
        .await;
    let view = fixture
        .kubelet
        .wait_for(WAIT, "six dev-1 devices", |v| {
            v.plugin(DEV1).is_some_and(|p| p.devices.len() == 6)
        })
        .await
        .expect("new list");
    assert_eq!(view.plugins[DEV1].registrations, 1);
    assert_eq!(
        view.plugins[DEV1].updates.len(),
        2,
        "first list, then the changed one"
    );
    assert_eq!(
        view.plugins[DEV2].updates.len(),
        1,
        "an unchanged resource gets no update"
    );
    fixture.stop().await;
}

#[tokio::test]
async fn preferred_allocation_keeps_must_include_and_fills_from_available() {
    let fixture = Fixture::start(virtual_devices());
    both_listed(&fixture).await;
    let response = fixture
        .kubelet
        .preferred_allocation(
            DEV1,
            &["/node1/dev1/1", "/node1/dev1/3", "/node1/dev1/4"],
            &["/node1/dev1/4"],
            2,
        )
        .await
        .expect("preferred");
    assert_eq!(response.container_responses.len(), 1);
    assert_eq!(
        response.container_responses[0].device_i_ds,
        ["/node1/dev1/4", "/node1/dev1/1"]
    );
    fixture.stop().await;
}

#[tokio::test]
async fn pre_start_container_is_answered_though_not_required() {
    let fixture = Fixture::start(virtual_devices());
    both_listed(&fixture).await;
    fixture
        .kubelet
        .pre_start_container(DEV1, &["/node1/dev1/1"])
        .await
        .expect("answered");
    fixture.stop().await;
}

#[tokio::test]
async fn stopping_the_host_removes_its_sockets_and_ends_the_streams() {
    let fixture = Fixture::start(virtual_devices());
    let view = both_listed(&fixture).await;
    let sockets: Vec<_> = [DEV1, DEV2]
        .iter()
        .map(|r| {
            fixture
                .dirs
                .kubelet()
                .join(&view.plugins[*r].registration.endpoint)
        })
        .collect();
    assert!(sockets.iter().all(|s| s.exists()));
    let kubelet_view = fixture.kubelet.subscribe();
    let dirs = {
        let Fixture {
            kubelet,
            host,
            dirs,
            ..
        } = fixture;
        host.stop().await;
        let view = kubelet
            .wait_for(WAIT, "streams ended", |v| {
                v.plugins.values().all(|p| !p.streaming)
            })
            .await
            .expect("streams end");
        assert!(view.plugins.values().all(|p| p.stream_error.is_some()));
        kubelet.stop().await;
        dirs
    };
    drop(kubelet_view);
    for socket in sockets {
        assert!(!socket.exists(), "{} left behind", socket.display());
    }
    drop(dirs);
}

/// What `wasm-device-plugin demo --modules-dir <modules>` prints, with the demo's
/// own defaults.
async fn demo(modules: &std::path::Path) -> String {
    demo_with(modules, &[]).await
}

/// [`demo`] with `extra` arguments.
async fn demo_with(modules: &std::path::Path, extra: &[&std::ffi::OsStr]) -> String {
    let mut args = vec![
        "wasm-device-plugin".as_ref(),
        "demo".as_ref(),
        "--modules-dir".as_ref(),
        modules.as_os_str(),
    ];
    args.extend_from_slice(extra);
    let cli = Cli::try_parse_from(args).expect("demo arguments parse");
    let Command::Demo(args) = cli.command else {
        panic!("not the demo subcommand")
    };
    let mut out = Vec::new();
    wasm_device_plugin::demo::run(&args, &mut out)
        .await
        .expect("demo runs");
    String::from_utf8(out).expect("utf-8")
}

#[tokio::test]
async fn demo_prints_registrations_devices_and_an_allocation_from_the_guest() {
    let dirs = virtual_devices();
    let modules = dirs.modules();
    let out = demo(&modules).await;
    assert!(
        out.contains("virtual: serving example.com/dev-1, example.com/dev-2"),
        "{out}"
    );
    assert!(out.contains("version=v1beta1"), "{out}");
    assert!(out.contains("/node1/dev1/4"), "{out}");
    assert!(out.contains("DEV_dev_1_ID_0=/node1/dev1/1"), "{out}");
    assert!(
        out.contains("annotation  virtual.example.com/devices="),
        "{out}"
    );
    assert!(out.contains("unknown device id `/no/such/device`"), "{out}");
    assert!(out.contains("/readyz: 200 ok"), "{out}");
    for line in [
        r#"/metrics: wdp_allocations_total{resource="example.com/dev-1",outcome="ok"} 1"#,
        r#"/metrics: wdp_allocations_total{resource="example.com/dev-1",outcome="invalid_argument"} 1"#,
    ] {
        assert!(out.contains(line), "{line} in:\n{out}");
    }
    // Without an API server the DRA half is skipped, saying how to see it.
    assert!(
        out.trim_end().ends_with(
            "DRA: skipped (no --kubeconfig). `cargo xtask demo` starts a throwaway \
             kube-apiserver and passes its kubeconfig, to show example.com/dev-1 served as a \
             DRA driver as well."
        ),
        "{out}"
    );
}

#[tokio::test]
async fn demo_with_an_api_server_serves_the_virtual_guest_through_dra_too() {
    const DRIVER: &str = "dev-1.example.com";
    let Some(server) = ApiServer::shared() else {
        return;
    };
    let dirs = virtual_devices();
    let modules = dirs.modules();
    let kubeconfig = server.kubeconfig();
    let out = demo_with(&modules, &["--kubeconfig".as_ref(), kubeconfig.as_os_str()]).await;
    // The device-plugin half first, as without an API server.
    assert!(
        out.contains("virtual: serving example.com/dev-1, example.com/dev-2"),
        "{out}"
    );
    assert!(out.contains("DEV_dev_1_ID_0=/node1/dev1/1"), "{out}");
    assert!(!out.contains("DRA: skipped"), "{out}");
    let (_, dra) = out
        .split_once("\nDRA: the same module's example.com/dev-1")
        .unwrap_or_else(|| panic!("no DRA half in:\n{out}"));

    // The same module's dev-1 leaves the device-plugin API; dev-2 stays.
    for line in [
        "virtual.toml rewritten, applied live by the host",
        "device-plugin API: example.com/dev-1 withdrawn",
        "device-plugin API: example.com/dev-2 still served",
        "driver dev-1.example.com  endpoint=",
        "versions=v1.DRAPlugin,v1beta1.DRAPlugin",
    ] {
        assert!(dra.contains(line), "{line} in:\n{dra}");
    }
    let node = dra
        .split_once("  Node ")
        .and_then(|(_, rest)| rest.split_once(' '))
        .map(|(node, _)| node.to_string())
        .unwrap_or_else(|| panic!("no Node in:\n{dra}"));

    // One slice of the node's pool, owned by the Node, listing the guest's 4 devices.
    let slices: Vec<&str> = dra
        .lines()
        .filter(|l| l.contains(&format!("driver={DRIVER}  pool={node} (generation")))
        .collect();
    assert_eq!(slices.len(), 1, "{dra}");
    assert!(slices[0].ends_with(&format!("owner=Node/{node}")), "{dra}");
    // The host's attributes, and what the guest's `describe` adds.
    for n in 1..=4 {
        let id = format!("  id=/node1/dev1/{n}  index={n}  kind=dev-1  model=virtual  ");
        let lines: Vec<&str> = dra.lines().filter(|l| l.contains(&id)).collect();
        assert_eq!(lines.len(), 1, "{id} in:\n{dra}");
        assert!(
            lines[0].contains("  firmware=1.0.0  ")
                && lines[0].ends_with("  memory=1Gi (capacity)"),
            "{dra}"
        );
    }

    // The claim, prepared: the CDI id the answer names is in the claim's spec,
    // which the unprepare removed.
    let uid = dra
        .split_once(" (uid ")
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(uid, _)| uid.to_string())
        .unwrap_or_else(|| panic!("no claim uid in:\n{dra}"));
    let cdi_id = format!("{DRIVER}/claim={uid}-dev");
    assert!(dra.contains(&format!("CDI ids {cdi_id}\n")), "{dra}");
    let spec = format!("wasm-device-plugin-claim_{DRIVER}_{uid}.json");
    assert!(
        dra.contains(&format!(
            "{spec}  (cdiVersion 0.6.0, kind {DRIVER}/claim)\n      {cdi_id}: env DEV_dev_1_ID_0=/node1/dev1/"
        )),
        "{dra}"
    );
    // The claim's opaque configuration reached the guest's `prepare`.
    assert!(
        dra.contains(", env GREETING=hello-from-the-claim\n"),
        "{dra}"
    );
    assert!(dra.contains("unprepared; "), "{dra}");
    assert!(dra.contains(&format!("{spec} removed")), "{dra}");

    // Nothing of the demo's is left in the API server.
    assert!(dra.contains(&format!("deleted Node {node}")), "{dra}");
    let api = server.session("demo").await;
    assert!(
        api.get(&api.cluster::<Node>(), &node).await.is_none(),
        "Node {node} left behind"
    );
    let slices = api.slices(DRIVER, &node).await;
    assert!(slices.is_empty(), "slices left behind: {slices:#?}");
    let claims: Api<ResourceClaim> = Api::namespaced(api.client.clone(), "default");
    assert!(
        api.get(&claims, &format!("{node}-claim")).await.is_none(),
        "claim left behind"
    );
}

#[tokio::test]
async fn demo_serves_the_hardware_guests_on_a_simulated_node() {
    // As `cargo xtask demo` lays them out: the shipped guests, no manifests.
    let dirs = Dirs::new();
    dirs.add_module("fpga", guests::FPGA);
    dirs.add_module("generic", guests::GENERIC);
    let modules = dirs.modules();
    let out = demo(&modules).await;
    assert!(
        out.contains("fpga: serving fpga.intel.com/region-ce48969398f05f33946d560708be108a"),
        "{out}"
    );
    assert!(
        out.contains("annotation  com.intel.fpga.mode=fpga.intel.com/region"),
        "{out}"
    );
    assert!(out.contains("-> /dev/dfl-port.0 (rw)"), "{out}");
    assert!(
        out.contains("generic: serving example.com/audio, example.com/serial"),
        "{out}"
    );
    assert!(out.contains("ttyUSB1::1"), "{out}");
    assert!(out.contains("-> /dev/snd/pcmC0D0p (rw)"), "{out}");
    // Serial goes through CDI: the containers get names, the spec is shown.
    assert!(
        out.contains("cdi         example.com/serial=ttyUSB0"),
        "{out}"
    );
    assert!(
        out.contains("cdi/wasm-device-plugin_example.com_serial.json  (cdiVersion 0.6.0, kind example.com/serial)"),
        "{out}"
    );
    assert!(out.contains("example.com/serial=ttyUSB1: "), "{out}");
    // The operator's directory is left as it was: the demo works on a copy.
    assert!(!modules.join("fpga.toml").exists());
}

#[tokio::test]
async fn modules_serve_side_by_side_and_a_resource_is_served_by_one_module_only() {
    let dirs = Dirs::new();
    dirs.add_module("first", guests::VIRTUAL_DEVICES);
    dirs.add_module("second", guests::VIRTUAL_DEVICES);
    let fixture = Fixture::start(dirs);
    both_listed(&fixture).await;
    let states = fixture.settled().await;
    let serving = |name: &str| match states.get(name) {
        Some(ModuleState::Serving(resources)) => resources.clone(),
        other => panic!("{name}: expected Serving, got {other:?}"),
    };
    // Both load; each resource name goes to exactly one of them.
    let (first, second) = (serving("first"), serving("second"));
    let mut all: Vec<_> = first.iter().chain(&second).cloned().collect();
    all.sort();
    assert_eq!(all, [DEV1, DEV2], "first {first:?}, second {second:?}");
    let view = fixture.kubelet.view();
    assert!(
        view.plugins.values().all(|p| p.registrations == 1),
        "no resource was registered twice"
    );

    // Reconfigured to report a kind of its own, one module serves that too, and
    // the other keeps serving what it had. (Which module won which name depends on
    // which scan finished first.)
    let (moved, kept) = if first.len() <= second.len() {
        ("first", second)
    } else {
        ("second", first)
    };
    fixture.set_config(moved, &[("kinds", "dev-3=1")]).await;
    fixture
        .kubelet
        .wait_for(WAIT, "dev-3 listed", |v| {
            v.plugin("example.com/dev-3")
                .is_some_and(|p| p.devices.len() == 1)
        })
        .await
        .expect("the reconfigured module serves its own resource");
    fixture
        .kubelet
        .allocate("example.com/dev-3", &[&["/node1/dev3/1"]])
        .await
        .expect("allocated");
    for resource in &kept {
        let id = if resource == DEV1 {
            "/node1/dev1/1"
        } else {
            "/node1/dev2/1"
        };
        fixture
            .kubelet
            .allocate(resource, &[&[id]])
            .await
            .expect("the other module still allocates");
    }
    fixture.stop().await;
}
