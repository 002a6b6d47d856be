//! The DRA frontend against a real kube-apiserver (`tests/apiserver/src/lib.rs`): kubelet's
//! side is played over real unix sockets by the host's own simulator
//! (`kubelet/dra/simulator.rs`: the plugin watcher's registration handshake and a DRA
//! client), the scheduler's by the test (it writes the claim's allocation), and every
//! object the host writes is validated by the API server.
//!
//! Each test has its own node name (so its own pool and slices), namespace and
//! directories (the fixture, shared with the prepare bench: `tests/src/dra.rs`); the
//! API server is shared by the binary.

use std::collections::BTreeMap;

use k8s_openapi::api::resource::v1::ResourceSlice;
use wasm_device_plugin::kubelet::dra::proto::v1beta1;
use wasm_device_plugin::kubelet::dra::simulator;
use wdp_tests::apiserver::{ApiServer, attributes};
use wdp_tests::dra::{
    DRIVER, DraHost, MODULE, device_names, device_of, generation, manifest, prepare, serving,
    unprepare,
};
use wdp_tests::{Dirs, WAIT, fixtures, guests, init_logging, manifest_with_config, test_settings};

#[tokio::test]
async fn dra_driver_registers_and_publishes_its_devices() {
    let Some(fixture) = DraHost::start("publish", &manifest(4, &[("numa-nodes", "2")])).await
    else {
        return;
    };
    assert!(
        fixture.host.ready().is_err(),
        "not ready before kubelet registered the driver"
    );
    fixture.register().await;
    fixture
        .host
        .wait_ready(true, WAIT)
        .await
        .expect("ready once registered and published");
    let slices = fixture
        .slices("four devices", |s| device_names(s).len() == 4)
        .await;
    for slice in &slices {
        assert_eq!(slice.spec.driver, DRIVER);
        assert_eq!(slice.spec.node_name.as_deref(), Some(fixture.node.as_str()));
        assert_eq!(slice.spec.pool.name, fixture.node);
        let owner = &slice.metadata.owner_references.as_ref().expect("owner")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("Node", fixture.node.as_str())
        );
    }
    let mut devices: Vec<(String, BTreeMap<String, String>)> = slices
        .iter()
        .flat_map(|s| s.spec.devices.iter().flatten())
        .map(|d| (d.name.clone(), attributes(d)))
        .collect();
    devices.sort();
    // The host's attributes, then what the guest's `describe` adds.
    let expected: Vec<(String, BTreeMap<String, String>)> = (1..=4)
        .map(|n| {
            let id = format!("/node1/dev1/{n}");
            let attrs = [
                ("kind", "dev-1".to_string()),
                ("id", id.clone()),
                ("numaNode", ((n - 1) % 2).to_string()),
                ("model", "virtual".to_string()),
                ("index", n.to_string()),
                ("firmware", "1.0.0".to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            (device_name(&id), attrs)
        })
        .collect();
    assert_eq!(devices, expected);
    for device in slices.iter().flat_map(|s| s.spec.devices.iter().flatten()) {
        let capacity = device.capacity.as_ref().expect("described capacity");
        assert_eq!(capacity["memory"].value.0, "1Gi", "{device:?}");
        let firmware = &device.attributes.as_ref().expect("attributes")["firmware"];
        assert_eq!(
            firmware.version.as_deref(),
            Some("1.0.0"),
            "typed as a version"
        );
    }
    fixture.stop().await;
}

/// The contract's device name of guest id `id` when it is not a DNS label:
/// lowercased, runs of other characters made one `-`, trimmed, cut to 54, then `-`
/// and the first 8 hex digits of its SHA-256.
fn device_name(id: &str) -> String {
    use sha2::Digest;
    let mut name = String::new();
    for c in id.to_ascii_lowercase().chars() {
        if c.is_ascii_alphanumeric() {
            name.push(c);
        } else if !name.ends_with('-') {
            name.push('-');
        }
    }
    let mut name: String = name.trim_matches('-').chars().take(54).collect();
    let hash: String = sha2::Sha256::digest(id.as_bytes())[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if name.is_empty() {
        name = "dev".into();
    }
    format!("{name}-{hash}")
}

#[tokio::test]
async fn dra_rescan_republishes_with_a_higher_generation() {
    let Some(fixture) = DraHost::start("rescan", &manifest(2, &[])).await else {
        return;
    };
    fixture.register().await;
    let before = fixture
        .slices("two devices", |s| device_names(s).len() == 2)
        .await;
    let first = generation(&before);
    fixture.dirs.write_manifest(MODULE, &manifest(3, &[]));
    let after = fixture
        .slices("three devices", |s| device_names(s).len() == 3)
        .await;
    assert!(generation(&after) > first, "{first} then {after:#?}");
    fixture.stop().await;
}

#[tokio::test]
async fn dra_unhealthy_device_leaves_the_slice() {
    let Some(fixture) = DraHost::start("health", &manifest(3, &[])).await else {
        return;
    };
    fixture.register().await;
    let before = fixture
        .slices("three devices", |s| device_names(s).len() == 3)
        .await;
    let sick = device_of(&before, "/node1/dev1/2");
    fixture
        .dirs
        .write_manifest(MODULE, &manifest(3, &[("unhealthy", "/node1/dev1/2")]));
    let after = fixture
        .slices("two devices", |s| device_names(s).len() == 2)
        .await;
    assert!(!device_names(&after).contains(&sick));
    assert!(generation(&after) > generation(&before));
    fixture.stop().await;
}

#[tokio::test]
async fn dra_claim_prepared_idempotently_and_unprepared() {
    let Some(fixture) = DraHost::start("prepare", &manifest(4, &[])).await else {
        return;
    };
    let mut client = fixture.register().await;
    let slices = fixture
        .slices("four devices", |s| device_names(s).len() == 4)
        .await;
    let device = device_of(&slices, "/node1/dev1/3");
    let uid = fixture.allocated_claim("claim", &[("gpu", &device)]).await;

    let answer = prepare(&mut client, fixture.claim_ref("claim", &uid)).await;
    assert_eq!(answer.error, "");
    assert_eq!(answer.devices.len(), 1, "{answer:?}");
    let prepared = &answer.devices[0];
    assert_eq!(prepared.request_names, ["gpu"]);
    assert_eq!(prepared.pool_name, fixture.node);
    assert_eq!(prepared.device_name, device);
    assert_eq!(
        prepared.cdi_device_ids,
        [format!("{DRIVER}/claim={uid}-gpu")]
    );
    let spec = std::fs::read_to_string(fixture.spec_file(&uid)).expect("the claim's CDI spec");
    let spec: serde_json::Value = serde_json::from_str(&spec).expect("JSON spec");
    assert_eq!(spec["kind"], format!("{DRIVER}/claim"));
    let env = &spec["devices"][0]["containerEdits"]["env"];
    assert_eq!(spec["devices"][0]["name"], format!("{uid}-gpu"));
    assert!(
        env.as_array()
            .is_some_and(|e| e.iter().any(|v| v == "DEV_dev_1_ID_0=/node1/dev1/3")),
        "{spec:#}"
    );

    let again = prepare(&mut client, fixture.claim_ref("claim", &uid)).await;
    assert_eq!(again, answer, "preparing twice answers the same");
    let mut beta = simulator::client_v1beta1(&fixture.endpoint()).expect("v1beta1 client");
    let claim = fixture.claim_ref("claim", &uid);
    let beta_answer = tokio::time::timeout(
        WAIT,
        beta.node_prepare_resources(v1beta1::NodePrepareResourcesRequest {
            claims: vec![v1beta1::Claim {
                namespace: claim.namespace,
                name: claim.name,
                uid: claim.uid,
            }],
        }),
    )
    .await
    .expect("v1beta1 prepare in time")
    .expect("v1beta1 prepare succeeds as a call")
    .into_inner();
    let beta_devices: Vec<(Vec<String>, String, String, Vec<String>)> = beta_answer.claims[&uid]
        .devices
        .iter()
        .map(|d| {
            (
                d.request_names.clone(),
                d.pool_name.clone(),
                d.device_name.clone(),
                d.cdi_device_ids.clone(),
            )
        })
        .collect();
    let v1_devices: Vec<(Vec<String>, String, String, Vec<String>)> = answer
        .devices
        .iter()
        .map(|d| {
            (
                d.request_names.clone(),
                d.pool_name.clone(),
                d.device_name.clone(),
                d.cdi_device_ids.clone(),
            )
        })
        .collect();
    assert_eq!(beta_devices, v1_devices, "v1beta1 answers as v1");

    assert_eq!(
        unprepare(&mut client, fixture.claim_ref("claim", &uid)).await,
        ""
    );
    assert!(
        !fixture.spec_file(&uid).exists(),
        "unprepare removes the spec"
    );
    assert_eq!(
        unprepare(&mut client, fixture.claim_ref("claim", &uid)).await,
        "",
        "unpreparing twice is done"
    );
    fixture.stop().await;
}

#[tokio::test]
async fn dra_prepared_claim_survives_a_host_restart() {
    let Some(fixture) = DraHost::start("restart", &manifest(2, &[])).await else {
        return;
    };
    let mut client = fixture.register().await;
    let slices = fixture
        .slices("two devices", |s| device_names(s).len() == 2)
        .await;
    let device = device_of(&slices, "/node1/dev1/1");
    let uid = fixture.allocated_claim("claim", &[("gpu", &device)]).await;
    let answer = prepare(&mut client, fixture.claim_ref("claim", &uid)).await;
    assert_eq!(answer.error, "");
    drop(client);

    let fixture = fixture.restart().await;
    let mut client = fixture.register().await;
    assert!(
        fixture.spec_file(&uid).exists(),
        "the spec outlives the restart"
    );
    assert_eq!(
        prepare(&mut client, fixture.claim_ref("claim", &uid)).await,
        answer,
        "the restarted host answers as it prepared"
    );
    assert_eq!(
        unprepare(&mut client, fixture.claim_ref("claim", &uid)).await,
        ""
    );
    assert!(
        !fixture.spec_file(&uid).exists(),
        "unprepare after a restart removes the spec"
    );
    fixture.stop().await;
}

#[tokio::test]
async fn dra_module_removal_deletes_its_slices() {
    let Some(fixture) = DraHost::start("removal", &manifest(2, &[])).await else {
        return;
    };
    fixture.register().await;
    fixture
        .slices("two devices", |s| device_names(s).len() == 2)
        .await;
    fixture.dirs.remove_module(MODULE);
    fixture.slices("none", <[ResourceSlice]>::is_empty).await;
    assert!(
        !fixture.registration_socket().exists(),
        "the registration socket goes with the module"
    );
    fixture.stop().await;
}

#[tokio::test]
async fn dra_claim_for_a_device_the_guest_no_longer_has_fails_naming_it() {
    let Some(fixture) = DraHost::start("gone", &manifest(3, &[])).await else {
        return;
    };
    let mut client = fixture.register().await;
    let slices = fixture
        .slices("three devices", |s| device_names(s).len() == 3)
        .await;
    let device = device_of(&slices, "/node1/dev1/3");
    let uid = fixture.allocated_claim("claim", &[("gpu", &device)]).await;
    fixture.dirs.write_manifest(MODULE, &manifest(2, &[]));
    fixture
        .slices("two devices", |s| device_names(s).len() == 2)
        .await;
    let answer = prepare(&mut client, fixture.claim_ref("claim", &uid)).await;
    assert!(answer.devices.is_empty());
    assert!(answer.error.contains(&device), "{}", answer.error);
    let claim = format!("{}/claim", fixture.api.namespace);
    assert!(answer.error.contains(&claim), "{}", answer.error);
    assert!(!fixture.spec_file(&uid).exists());
    fixture.stop().await;
}

#[tokio::test]
async fn dra_claim_with_another_uid_is_refused() {
    let Some(fixture) = DraHost::start("uid", &manifest(2, &[])).await else {
        return;
    };
    let mut client = fixture.register().await;
    let slices = fixture
        .slices("two devices", |s| device_names(s).len() == 2)
        .await;
    let device = device_of(&slices, "/node1/dev1/1");
    let uid = fixture.allocated_claim("claim", &[("gpu", &device)]).await;
    let stale = "00000000-0000-4000-8000-000000000000";
    assert_ne!(uid, stale);
    let answer = prepare(&mut client, fixture.claim_ref("claim", stale)).await;
    assert!(answer.devices.is_empty());
    assert!(answer.error.contains(stale), "{}", answer.error);
    assert!(!fixture.spec_file(stale).exists());
    assert!(!fixture.spec_file(&uid).exists());
    fixture.stop().await;
}

#[tokio::test]
async fn dra_annotations_in_a_guest_answer_fail_the_claim() {
    // The 0.2.1 guest has no `prepare`: a claim goes through its `allocate`,
    // which annotates its answers by default.
    let text = manifest_with_config(
        "domain = \"example.com\"\napi = \"dra\"",
        &[("kinds", "dev-1=2"), ("annotation", "on")],
    );
    let Some(fixture) =
        DraHost::start_module("annotation", &text, fixtures::VIRTUAL_DEVICES_0_2_1).await
    else {
        return;
    };
    let mut client = fixture.register().await;
    let slices = fixture
        .slices("two devices", |s| device_names(s).len() == 2)
        .await;
    let device = device_of(&slices, "/node1/dev1/1");
    let uid = fixture.allocated_claim("claim", &[("gpu", &device)]).await;
    let answer = prepare(&mut client, fixture.claim_ref("claim", &uid)).await;
    assert!(answer.devices.is_empty());
    assert!(answer.error.contains("annotation"), "{}", answer.error);
    assert!(!fixture.spec_file(&uid).exists());
    fixture.stop().await;
}

/// A stopping host leaves its pool to the host that takes over (a rolling update's
/// new pod, or the next start), as upstream's helper does; kubelet deletes the slices
/// of a driver that does not come back. Module removal deletes them (tested above).
#[tokio::test]
async fn dra_host_stop_leaves_its_slices_to_the_next_host() {
    let Some(fixture) = DraHost::start("stop", &manifest(2, &[])).await else {
        return;
    };
    fixture.register().await;
    fixture
        .slices("two devices", |s| device_names(s).len() == 2)
        .await;
    let node = fixture.node.clone();
    let api = fixture.stop().await;
    let left = api.slices(DRIVER, &node).await;
    assert_eq!(
        device_names(&left).len(),
        2,
        "a stopped host leaves its slices: {left:?}"
    );
}

/// A rolling update (`--pod-uid`): the new host pod starts beside the old one on the
/// same node and publishes; the old one then stops. The new pod's devices must stay
/// published.
#[tokio::test]
async fn dra_rolling_update_keeps_the_new_hosts_slices() {
    let Some(server) = ApiServer::shared() else {
        return;
    };
    init_logging();
    let api = server.session("rolling").await;
    let node = format!("{}-node", api.namespace);
    api.create_node(&node).await;
    let dirs = Dirs::new();
    for dir in ["registry", "plugins", "state"] {
        std::fs::create_dir(dirs.root.path().join(dir)).expect("create dir");
    }
    dirs.write_manifest(MODULE, &manifest(2, &[]));
    dirs.add_module(MODULE, guests::VIRTUAL_DEVICES);
    let settings = test_settings(&dirs.kubelet());

    let (old, old_shutdown) = DraHost::start_host(&dirs, &node, Some("old-pod"), settings.clone());
    serving(&old).await;
    let old_socket = dirs
        .root
        .path()
        .join("registry")
        .join(format!("{DRIVER}-old-pod-reg.sock"));
    simulator::register(&old_socket)
        .await
        .expect("old pod registers");
    let first = api
        .wait_slices(DRIVER, &node, WAIT, "two devices", |s| {
            device_names(s).len() == 2
        })
        .await;

    let (new, new_shutdown) = DraHost::start_host(&dirs, &node, Some("new-pod"), settings);
    serving(&new).await;
    let new_socket = dirs
        .root
        .path()
        .join("registry")
        .join(format!("{DRIVER}-new-pod-reg.sock"));
    simulator::register(&new_socket)
        .await
        .expect("new pod registers");
    api.wait_slices(DRIVER, &node, WAIT, "republished by the new pod", |s| {
        device_names(s).len() == 2 && generation(s) > generation(&first)
    })
    .await;

    old_shutdown.cancel();
    old.stop().await;
    let left = api.slices(DRIVER, &node).await;
    assert_eq!(
        device_names(&left).len(),
        2,
        "the old pod stopping took the new pod's slices with it: {left:#?}"
    );
    new_shutdown.cancel();
    new.stop().await;
}

/// The claim's opaque configuration for this driver reaches the guest's
/// `prepare`: the DeviceClass's first, then the claim's (a later one wins), and
/// another driver's is not passed on.
#[tokio::test]
async fn dra_claim_configuration_reaches_the_modules_prepare() {
    let Some(fixture) = DraHost::start("config", &manifest(2, &[])).await else {
        return;
    };
    let mut client = fixture.register().await;
    let slices = fixture
        .slices("two devices", |s| device_names(s).len() == 2)
        .await;
    let device = device_of(&slices, "/node1/dev1/2");
    let uid = fixture
        .configured_claim(
            "claim",
            &device,
            &[
                (
                    "FromClaim",
                    &["gpu"],
                    serde_json::json!({ "env": { "MODE": "fast" } }),
                ),
                (
                    "FromClass",
                    &[],
                    serde_json::json!({ "env": { "MODE": "slow", "TIER": "gold" } }),
                ),
            ],
        )
        .await;
    let answer = prepare(&mut client, fixture.claim_ref("claim", &uid)).await;
    assert_eq!(answer.error, "");
    let mut env = fixture.spec_env(&uid);
    env.sort();
    assert_eq!(
        env,
        ["DEV_dev_1_ID_0=/node1/dev1/2", "MODE=fast", "TIER=gold"],
        "the class's configuration, then the claim's over it"
    );
    fixture.stop().await;
}

#[tokio::test]
async fn dra_configuration_the_module_refuses_fails_the_claim_naming_it() {
    let Some(fixture) = DraHost::start("badconfig", &manifest(1, &[])).await else {
        return;
    };
    let mut client = fixture.register().await;
    let slices = fixture
        .slices("one device", |s| device_names(s).len() == 1)
        .await;
    let device = device_of(&slices, "/node1/dev1/1");
    let uid = fixture
        .configured_claim(
            "claim",
            &device,
            &[("FromClaim", &[], serde_json::json!({ "speed": 11 }))],
        )
        .await;
    let answer = prepare(&mut client, fixture.claim_ref("claim", &uid)).await;
    assert!(answer.devices.is_empty());
    let claim = format!("{}/claim", fixture.api.namespace);
    assert!(
        answer.error.contains(&claim) && answer.error.contains("speed"),
        "{}",
        answer.error
    );
    assert!(!fixture.spec_file(&uid).exists());
    fixture.stop().await;
}

/// A module built before `prepare` existed still prepares claims (through its
/// `allocate`), and refuses one with configuration rather than ignore it.
#[tokio::test]
async fn dra_configuration_for_a_module_without_prepare_is_refused() {
    let Some(fixture) = DraHost::start_module(
        "noprepare",
        &manifest(2, &[]),
        fixtures::VIRTUAL_DEVICES_0_2_1,
    )
    .await
    else {
        return;
    };
    let mut client = fixture.register().await;
    let slices = fixture
        .slices("two devices", |s| device_names(s).len() == 2)
        .await;
    let plain = fixture
        .allocated_claim("plain", &[("gpu", &device_of(&slices, "/node1/dev1/1"))])
        .await;
    let answer = prepare(&mut client, fixture.claim_ref("plain", &plain)).await;
    assert_eq!(answer.error, "");
    assert!(
        fixture
            .spec_env(&plain)
            .contains(&"DEV_dev_1_ID_0=/node1/dev1/1".to_string())
    );

    let device = device_of(&slices, "/node1/dev1/2");
    let uid = fixture
        .configured_claim(
            "configured",
            &device,
            &[("FromClaim", &[], serde_json::json!({ "env": { "A": "1" } }))],
        )
        .await;
    let answer = prepare(&mut client, fixture.claim_ref("configured", &uid)).await;
    assert!(answer.devices.is_empty());
    assert!(
        answer.error.contains("does not export `prepare`") && answer.error.contains("`gpu`"),
        "{}",
        answer.error
    );
    assert!(!fixture.spec_file(&uid).exists());
    fixture.stop().await;
}

/// The guest's `unprepare` runs with the requests as prepared; when it fails,
/// the claim stays prepared (spec and checkpoint), for kubelet to retry.
#[tokio::test]
async fn dra_a_failed_unprepare_keeps_the_claim_prepared() {
    let Some(fixture) = DraHost::start("unprepare", &manifest(1, &[])).await else {
        return;
    };
    let mut client = fixture.register().await;
    let slices = fixture
        .slices("one device", |s| device_names(s).len() == 1)
        .await;
    let device = device_of(&slices, "/node1/dev1/1");
    let uid = fixture
        .configured_claim(
            "claim",
            &device,
            &[(
                "FromClaim",
                &[],
                serde_json::json!({ "failUnprepare": true }),
            )],
        )
        .await;
    let answer = prepare(&mut client, fixture.claim_ref("claim", &uid)).await;
    assert_eq!(answer.error, "");
    let error = unprepare(&mut client, fixture.claim_ref("claim", &uid)).await;
    assert!(error.contains("failUnprepare"), "{error}");
    assert!(fixture.spec_file(&uid).exists(), "the spec stays");
    let again = prepare(&mut client, fixture.claim_ref("claim", &uid)).await;
    assert_eq!(
        again, answer,
        "still prepared: answered from the checkpoint"
    );
    let error = unprepare(&mut client, fixture.claim_ref("claim", &uid)).await;
    assert!(
        error.contains("failUnprepare"),
        "a retry runs the hook again: {error}"
    );
    fixture.stop().await;
}
