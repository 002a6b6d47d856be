//! The `ApiServer` fixture itself (`tests/apiserver/src/lib.rs`): a real kube-apiserver
//! accepts and stores what the DRA tests write, as the scheduler and the host would
//! write it, and refuses what it should.

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::{
    Device, DeviceAttribute, ResourceClaim, ResourcePool, ResourceSlice, ResourceSliceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::PostParams;
use wdp_tests::WAIT;
use wdp_tests::apiserver::{Allocated, ApiServer, attributes};

const DRIVER: &str = "fixture.example.com";

/// A slice of `driver`'s pool on `node` (owned by it) with one device per id, each
/// with a `kind` attribute.
fn slice(
    name: &str,
    driver: &str,
    node: &Node,
    generation: i64,
    devices: &[&str],
) -> ResourceSlice {
    let node_name = node.metadata.name.clone().expect("node name");
    ResourceSlice {
        metadata: ObjectMeta {
            name: Some(name.into()),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: node_name.clone(),
                uid: node.metadata.uid.clone().expect("node uid"),
                controller: Some(true),
                ..Default::default()
            }]),
            ..Default::default()
        },
        spec: ResourceSliceSpec {
            driver: driver.into(),
            node_name: Some(node_name.clone()),
            pool: ResourcePool {
                name: node_name,
                generation,
                resource_slice_count: 1,
            },
            devices: Some(
                devices
                    .iter()
                    .map(|id| Device {
                        name: (*id).into(),
                        attributes: Some(
                            [(
                                "kind".to_string(),
                                DeviceAttribute {
                                    string: Some("dev-1".into()),
                                    ..Default::default()
                                },
                            )]
                            .into(),
                        ),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        },
    }
}

#[tokio::test]
async fn apiserver_stores_slices_and_allocated_claims() {
    let Some(server) = ApiServer::shared() else {
        return;
    };
    eprintln!(
        "API server {} ready in {:?}",
        server.url(),
        server.started_in()
    );
    let api = server.session("fixture").await;
    let node = api.create_node("fixture-node").await;
    assert!(
        node.metadata.uid.is_some(),
        "the API server gave the node a UID"
    );

    let slices = api.cluster::<ResourceSlice>();
    api.apply(
        &slices,
        &slice("fixture-node-1", DRIVER, &node, 1, &["dev-0", "dev-1"]),
    )
    .await;
    // Another driver's slice on the node, and this driver's on another node: the
    // field selector leaves both out.
    let other_node = api.create_node("fixture-other-node").await;
    api.apply(
        &slices,
        &slice("other-driver", "other.example.com", &node, 1, &["dev-0"]),
    )
    .await;
    api.apply(
        &slices,
        &slice("other-node", DRIVER, &other_node, 1, &["dev-0"]),
    )
    .await;
    let listed = api.slices(DRIVER, "fixture-node").await;
    assert_eq!(
        listed.len(),
        1,
        "one slice of {DRIVER} on the node: {listed:#?}"
    );
    let devices = listed[0].spec.devices.clone().unwrap_or_default();
    let names: Vec<&str> = devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["dev-0", "dev-1"]);
    assert_eq!(
        attributes(&devices[0]).get("kind").map(String::as_str),
        Some("dev-1")
    );

    // A new generation is seen by a waiter that started before it was written.
    let waiting = api.wait_slices(DRIVER, "fixture-node", WAIT, "at generation 2", |s| {
        s.len() == 1 && s[0].spec.pool.generation == 2
    });
    let update = async {
        api.apply(
            &slices,
            &slice("fixture-node-1", DRIVER, &node, 2, &["dev-1"]),
        )
        .await
    };
    let (seen, _) = tokio::join!(waiting, update);
    assert_eq!(seen[0].spec.devices.as_ref().map(Vec::len), Some(1));

    let claim = api
        .create_claim("claim", "dev-1.example.com", &["gpu"])
        .await;
    let uid = claim.metadata.uid.clone().expect("claim uid");
    let allocated = api
        .allocate(
            "claim",
            &[Allocated {
                request: "gpu",
                driver: DRIVER,
                pool: "fixture-node",
                device: "dev-1",
            }],
            &[("pod", "0b0e6a5e-0000-4000-8000-000000000001")],
        )
        .await;
    let stored: ResourceClaim = api
        .get(&api.namespaced::<ResourceClaim>(), "claim")
        .await
        .expect("the claim exists");
    assert_eq!(stored.metadata.uid.as_deref(), Some(uid.as_str()));
    assert_eq!(stored.status, allocated.status);
    let results = stored
        .status
        .as_ref()
        .and_then(|s| s.allocation.as_ref())
        .and_then(|a| a.devices.as_ref())
        .and_then(|d| d.results.clone())
        .unwrap_or_default();
    assert_eq!(results.len(), 1);
    assert_eq!(
        (
            results[0].request.as_str(),
            results[0].driver.as_str(),
            results[0].pool.as_str(),
            results[0].device.as_str()
        ),
        ("gpu", DRIVER, "fixture-node", "dev-1")
    );
    let reserved = stored
        .status
        .and_then(|s| s.reserved_for)
        .unwrap_or_default();
    assert_eq!(reserved.len(), 1);
    assert_eq!(reserved[0].name, "pod");

    api.delete(&slices, "fixture-node-1").await;
    assert!(api.slices(DRIVER, "fixture-node").await.is_empty());
}

/// The API server validates: an allocation result naming a request the claim does not
/// have is refused, so the fixture's writes are checked, not just stored.
#[tokio::test]
async fn apiserver_refuses_an_allocation_of_an_unknown_request() {
    let Some(server) = ApiServer::shared() else {
        return;
    };
    let api = server.session("refuse").await;
    api.create_claim("claim", "dev-1.example.com", &["gpu"])
        .await;
    let claims = api.namespaced::<ResourceClaim>();
    let patch = serde_json::json!({"status": {"allocation": {"devices": {"results": [
        {"request": "not-a-request", "driver": DRIVER, "pool": "node", "device": "dev-0"}
    ]}}}});
    let refused = claims
        .patch_status(
            "claim",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(patch),
        )
        .await;
    match refused {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 422, "{status:?}"),
        other => panic!("expected the API server to refuse the allocation, got {other:?}"),
    }
    // And a device name that is not a DNS label.
    let bad = slice(
        "bad",
        DRIVER,
        &api.create_node("refuse-node").await,
        1,
        &["Not_A_Label"],
    );
    let created = api
        .cluster::<ResourceSlice>()
        .create(&PostParams::default(), &bad)
        .await;
    assert!(
        matches!(&created, Err(kube::Error::Api(s)) if s.code == 422),
        "expected 422 for a bad device name, got {created:?}"
    );
}

/// The API server does not check an allocation against the slices: the scheduler
/// does. So a test can allocate a device that no slice lists (as when a guest stopped
/// reporting it after the scheduler chose it).
#[tokio::test]
async fn apiserver_accepts_an_allocation_of_a_device_no_slice_lists() {
    let Some(server) = ApiServer::shared() else {
        return;
    };
    let api = server.session("unlisted").await;
    api.create_claim("claim", "dev-1.example.com", &["gpu"])
        .await;
    let allocated = api
        .allocate(
            "claim",
            &[Allocated {
                request: "gpu",
                driver: DRIVER,
                pool: "no-such-node",
                device: "no-such-device",
            }],
            &[],
        )
        .await;
    assert!(allocated.status.and_then(|s| s.allocation).is_some());
}
